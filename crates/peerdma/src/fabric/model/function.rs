//! One PCI function and what it carries: its role in the tree, bus range, BARs and
//! class, as the kernel's `struct pci_dev` records them. Links and ACS live in their own
//! files; the tree that links functions together is in `topology.rs`.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::addr::{Bdf, BusAddr, PhysAddr};
use crate::fabric::model::{Acs, Link};

/// The role a function plays in the tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PortKind {
    /// A device function: GPU, NIC, NVMe, ...
    Endpoint,
    /// The function that represents the host bridge on its root bus (class 06:00).
    HostBridge,
    /// A PCIe root port.
    RootPort,
    /// The upstream port of a PCIe switch.
    SwitchUpstream,
    /// A downstream port of a PCIe switch.
    SwitchDownstream,
    /// A PCI-to-PCI or PCIe-to-PCI bridge that is not a PCIe port.
    PciBridge,
}

impl PortKind {
    /// Whether the function has a secondary bus.
    pub fn is_bridge(self) -> bool {
        matches!(
            self,
            PortKind::RootPort
                | PortKind::SwitchUpstream
                | PortKind::SwitchDownstream
                | PortKind::PciBridge
        )
    }

    /// The PCIe capability's device/port type field (PCI_EXP_TYPE_*), where it names a kind.
    pub fn from_pcie_type(t: u8) -> Option<Self> {
        Some(match t {
            0x0 | 0x1 | 0x9 => PortKind::Endpoint,
            0x4 => PortKind::RootPort,
            0x5 => PortKind::SwitchUpstream,
            0x6 => PortKind::SwitchDownstream,
            0x7 | 0x8 => PortKind::PciBridge,
            _ => return None,
        })
    }
}

impl fmt::Display for PortKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PortKind::Endpoint => "endpoint",
            PortKind::HostBridge => "host bridge",
            PortKind::RootPort => "root port",
            PortKind::SwitchUpstream => "switch upstream port",
            PortKind::SwitchDownstream => "switch downstream port",
            PortKind::PciBridge => "PCI bridge",
        })
    }
}

/// A bridge's secondary and subordinate bus numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BusRange {
    /// The bus directly below the bridge.
    pub secondary: u8,
    /// The highest bus number below the bridge.
    pub subordinate: u8,
}

impl BusRange {
    /// Whether `bus` lies below the bridge.
    pub fn contains(&self, bus: u8) -> bool {
        self.secondary <= bus && bus <= self.subordinate
    }
}

impl fmt::Display for BusRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.secondary == self.subordinate {
            write!(f, "[{:02x}]", self.secondary)
        } else {
            write!(f, "[{:02x}-{:02x}]", self.secondary, self.subordinate)
        }
    }
}

/// One base address register's window.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bar {
    /// BAR number, 0..=5 (6 is the expansion ROM).
    pub index: u8,
    /// Where the CPU sees the window.
    pub cpu: PhysAddr,
    /// Where a peer device addresses it on the bus. Equal to `cpu` unless the host bridge
    /// translates; sysfs `resource` shows only the CPU side, so importers set both equal.
    pub bus: BusAddr,
    /// Size in bytes.
    pub size: u64,
    /// A 64-bit memory BAR.
    #[serde(default)]
    pub is_64bit: bool,
    /// Prefetchable memory (the kind p2pdma providers publish).
    #[serde(default)]
    pub prefetchable: bool,
    /// An I/O-port BAR rather than memory.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub io: bool,
}

/// A p2p memory provider as the kernel publishes it under a function's `p2pmem/`
/// (drivers/pci/p2pdma.c: `size`, `available`, `published`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct P2pmem {
    /// Bytes registered.
    pub size: u64,
    /// Bytes not allocated.
    pub available: u64,
    /// Whether other drivers may find and use it (`pci_p2pmem_find`).
    pub published: bool,
}

/// An NVMe controller's CMBLOC and CMBSZ registers (NVMe base spec, Controller Memory
/// Buffer Location and Size), as `nvme/nvmeN/cmb` shows them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NvmeCmb {
    /// CMBLOC: BIR bits 2:0, OFST bits 31:12 in size units.
    pub cmbloc: u32,
    /// CMBSZ: SQS 0, CQS 1, LISTS 2, RDS 3, WDS 4, SZU bits 11:8, SZ bits 31:12.
    pub cmbsz: u32,
}

/// Index of a function inside one [`Topology`](crate::fabric::Topology).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FnId(pub(crate) u32);

impl FnId {
    /// The index into [`Topology::functions`](crate::fabric::Topology::functions).
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// What is directly above a function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Upstream {
    /// The function sits on a root bus: index into [`Topology::host_bridges`](crate::fabric::Topology::host_bridges).
    HostBridge(usize),
    /// The function sits below this bridge.
    Bridge(FnId),
}

/// One PCI function.
///
/// # Invariants
/// Inside a [`Topology`](crate::fabric::Topology), `upstream` names an existing host bridge or a function whose
/// `kind` is a bridge, and following `upstream` from any function ends at a host bridge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Function {
    /// The function's address.
    pub bdf: Bdf,
    /// Vendor ID; [`Function::UNKNOWN_ID`] when the source does not say (`lspci -tv`
    /// without `-nn`).
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Subsystem vendor and device, when known.
    pub subsystem: Option<(u16, u16)>,
    /// The 24-bit class code (base, sub, prog-if).
    pub class: u32,
    /// A readable name: the pci.ids entry, or the text an importer was given.
    pub name: String,
    /// Its role in the tree.
    pub kind: PortKind,
    /// For a bridge, the buses below it; `None` when unassigned or unknown.
    pub buses: Option<BusRange>,
    /// Its BARs, in index order.
    pub bars: Vec<Bar>,
    /// Its link, when known.
    pub link: Option<Link>,
    /// What is known of its ACS capability.
    pub acs: Acs,
    /// Its IOMMU group, when known.
    pub iommu_group: Option<u32>,
    /// Its NUMA node, when known.
    pub numa_node: Option<u32>,
    /// Bytes of on-board memory a device model binding to it should have (a GPU's
    /// VRAM), when the topology states it; the hardware does not tell.
    pub memory: Option<u64>,
    /// The p2p memory the kernel registered for it (sysfs `p2pmem/`), when the source
    /// shows one.
    pub p2pmem: Option<P2pmem>,
    /// Its NVMe controller memory buffer registers, as the nvme driver shows them
    /// (`nvme/nvmeN/cmb`), when it has a buffer.
    pub nvme_cmb: Option<NvmeCmb>,
    /// What is directly above it.
    pub upstream: Upstream,
}

/// The broad class of a function, as `peerdma topo --class` filters it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeviceClass {
    /// Display controllers and 3D/compute accelerators (class 03, 12).
    Gpu,
    /// Network and InfiniBand controllers (class 02, 0c06).
    Nic,
    /// NVM Express controllers (class 0108).
    Nvme,
    /// Other mass storage (class 01).
    Storage,
    /// Bridges (class 06).
    Bridge,
    /// Anything else.
    Other,
}

impl DeviceClass {
    /// The names `--class` accepts.
    pub const NAMES: [(&'static str, DeviceClass); 6] = [
        ("gpu", DeviceClass::Gpu),
        ("nic", DeviceClass::Nic),
        ("nvme", DeviceClass::Nvme),
        ("storage", DeviceClass::Storage),
        ("bridge", DeviceClass::Bridge),
        ("other", DeviceClass::Other),
    ];

    /// Classifies a 24-bit class code.
    pub fn of(class: u32) -> Self {
        let base = (class >> 16) as u8;
        let sub = (class >> 8) as u8;
        match (base, sub) {
            (0x03, _) | (0x12, _) => DeviceClass::Gpu,
            (0x02, _) | (0x0c, 0x06) => DeviceClass::Nic,
            (0x01, 0x08) => DeviceClass::Nvme,
            (0x01, _) => DeviceClass::Storage,
            (0x06, _) => DeviceClass::Bridge,
            _ => DeviceClass::Other,
        }
    }

    /// Parses one `--class` name.
    pub fn parse(name: &str) -> Option<Self> {
        Self::NAMES
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name.trim()))
            .map(|(_, c)| *c)
    }

    /// The short name.
    pub fn name(self) -> &'static str {
        Self::NAMES
            .iter()
            .find(|(_, c)| *c == self)
            .map_or("other", |(n, _)| n)
    }
}

impl Function {
    /// The vendor or device ID of a function whose IDs the source does not give (no
    /// vendor has it: it is what a read of an absent function returns).
    pub const UNKNOWN_ID: u16 = 0xffff;

    /// A function of which only the address is known, as an importer starts one: ids
    /// unknown, class 0, an endpoint, nothing read, not yet linked.
    pub fn bare(bdf: Bdf) -> Function {
        Function {
            bdf,
            vendor: Self::UNKNOWN_ID,
            device: Self::UNKNOWN_ID,
            subsystem: None,
            class: 0,
            name: String::new(),
            kind: PortKind::Endpoint,
            buses: None,
            bars: Vec::new(),
            link: None,
            acs: Acs::Unknown,
            iommu_group: None,
            numa_node: None,
            memory: None,
            p2pmem: None,
            nvme_cmb: None,
            upstream: Upstream::HostBridge(0),
        }
    }

    /// `vendor:device` in hex, or `None` when the source did not say.
    pub fn id(&self) -> Option<String> {
        (self.vendor != Self::UNKNOWN_ID)
            .then(|| format!("{:04x}:{:04x}", self.vendor, self.device))
    }

    /// The function's broad class.
    pub fn device_class(&self) -> DeviceClass {
        DeviceClass::of(self.class)
    }

    /// Whether the class code says bridge (06:04 PCI-to-PCI, 06:09 semi-transparent).
    pub fn class_is_pci_bridge(class: u32) -> bool {
        matches!(class >> 8, 0x0604 | 0x0609)
    }
}
