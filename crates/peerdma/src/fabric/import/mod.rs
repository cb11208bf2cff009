//! Importers: every way a [`Topology`](crate::fabric::Topology) comes to be. Each
//! returns a typed error naming the file, line or sysfs path on bad input.

pub mod config;
pub mod file;
pub mod lspci;
pub mod presets;
pub mod sysfs;
