//! The PCIe fabric: the tree of host bridges, ports and functions, the kernel's
//! peer-to-peer verdict over it, the `nvidia-smi topo -m` view of the same tree, and the
//! importers that build it from the live machine, sysfs snapshots, `lspci -tv` text,
//! TOML files and presets.
//!
//! Kernel analogue: drivers/pci (the tree), drivers/pci/p2pdma.c (the verdict).

pub mod error;
pub mod import;
pub mod matrix;
pub mod model;
pub mod names;
pub mod p2p;
pub mod path;

pub use error::FabricError;
pub use import::presets::{preset, preset_shared, PRESETS};
pub use matrix::{Cell, Matrix};
pub use model::{
    Acs, AcsFlags, Bar, BusRange, ConfigState, DeviceClass, FnId, Function, Gaps, HostBridge,
    HostInfo, IommuMode, KernelFacts, Link, LinkSpeed, NvmeCmb, P2pmem, PortKind, Topology,
    Upstream, CONFIG_OPTIONS,
};
pub use p2p::{
    calc_map_type_and_dist, distance_many, find_closest_provider, HostBridgeCheck, MapType,
    Verdict, HOST_BRIDGE_ALLOWLIST,
};
pub use path::{path_bandwidth, topo_level, topo_level_uncertain, PathBandwidth, TopoLevel};

/// Reads the running machine's PCI tree from `/sys` and `/proc`.
pub fn read_live() -> Result<Topology, FabricError> {
    import::sysfs::read(std::path::Path::new("/"))
}
