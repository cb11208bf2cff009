//! The PCIe tree: host bridges, bridges (root ports, switch ports, legacy PCI bridges)
//! and functions, with what each carries that the P2P verdict and the reports need.
//!
//! A [`Topology`] is built once by an importer (sysfs, `lspci -tv`, TOML, presets) and
//! is immutable afterwards. The model deliberately has no address decoding or routing
//! tables: the P2P rules of drivers/pci/p2pdma.c only need the parent chain, the ACS
//! control bits and the host bridge's identity.

mod acs;
mod function;
mod kernel;
mod link;
mod topology;
pub mod validate;

pub use acs::{Acs, AcsFlags};
pub use function::{
    Bar, BusRange, DeviceClass, FnId, Function, NvmeCmb, P2pmem, PortKind, Upstream,
};
pub use kernel::{
    config_from_kallsyms, parse_config, ConfigState, IommuMode, KernelFacts, CONFIG_OPTIONS,
};
pub use link::{Link, LinkSpeed};
pub use topology::{FunctionSpec, Gaps, HostBridge, HostInfo, ShapeEntry, Topology};
