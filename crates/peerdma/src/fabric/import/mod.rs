//! Importers: every way a [`Topology`](crate::fabric::Topology) comes to be. Each
//! returns a typed error naming the file, line or sysfs path on bad input.

pub mod config;
pub mod file;
pub mod lspci;
mod lspci_verbose;
pub mod presets;
pub mod sysfs;
