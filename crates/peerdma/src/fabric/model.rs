//! The PCIe tree: host bridges, bridges (root ports, switch ports, legacy PCI bridges)
//! and functions, with what each carries that the P2P verdict and the reports need.
//!
//! A [`Topology`] is built once by an importer (sysfs, `lspci -tv`, TOML, presets) and
//! is immutable afterwards; every query is a walk over parent links, as the kernel's
//! `pci_upstream_bridge()` walk is. The model deliberately has no address decoding or
//! routing tables: the P2P rules of drivers/pci/p2pdma.c only need the parent chain,
//! the ACS control bits and the host bridge's identity.

use std::collections::HashMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::addr::{Bdf, BusAddr, BusId, PhysAddr};
use crate::fabric::error::FabricError;
use crate::fabric::names;

/// What the host looks like to the P2P rules: the CPU (AMD Zen and newer forward peer
/// traffic between any host bridges) and whether an IOMMU translates DMA.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostInfo {
    /// `vendor_id` of /proc/cpuinfo: `AuthenticAMD`, `GenuineIntel`, ...; `None` when unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_vendor: Option<String>,
    /// `cpu family` of /proc/cpuinfo (0x17 is AMD Zen).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_family: Option<u32>,
    /// Whether DMA is translated by an IOMMU; `None` when unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iommu: Option<bool>,
}

impl HostInfo {
    /// The kernel's `cpu_supports_p2pdma()`: any AMD CPU of family 0x17 (Zen) or newer
    /// routes peer traffic between its root complexes.
    pub fn cpu_supports_p2pdma(&self) -> bool {
        self.cpu_vendor.as_deref() == Some("AuthenticAMD")
            && self.cpu_family.is_some_and(|f| f >= 0x17)
    }
}

/// One host bridge and the root bus below it (a `pci_host_bridge` in the kernel).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostBridge {
    /// The root bus, `domain:bus`.
    pub root: BusId,
    /// The NUMA node of the root complex; `None` when unknown or when the platform has one node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numa_node: Option<u32>,
}

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

/// A PCIe link rate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LinkSpeed {
    /// 2.5 GT/s, PCIe 1.x, 8b/10b.
    Gt2_5,
    /// 5 GT/s, PCIe 2.x, 8b/10b.
    Gt5,
    /// 8 GT/s, PCIe 3.x, 128b/130b.
    Gt8,
    /// 16 GT/s, PCIe 4.0, 128b/130b.
    Gt16,
    /// 32 GT/s, PCIe 5.0, 128b/130b.
    Gt32,
    /// 64 GT/s, PCIe 6.0, PAM4 with 242B/256B FLITs.
    Gt64,
}

impl LinkSpeed {
    const ALL: [(LinkSpeed, &'static str, f64); 6] = [
        (LinkSpeed::Gt2_5, "2.5", 2.5),
        (LinkSpeed::Gt5, "5.0", 5.0),
        (LinkSpeed::Gt8, "8.0", 8.0),
        (LinkSpeed::Gt16, "16.0", 16.0),
        (LinkSpeed::Gt32, "32.0", 32.0),
        (LinkSpeed::Gt64, "64.0", 64.0),
    ];

    /// Transfers per second per lane, in GT/s.
    pub fn gts(self) -> f64 {
        Self::ALL[self as usize].2
    }

    /// Payload bits per transferred bit after line coding.
    pub fn encoding_efficiency(self) -> f64 {
        match self {
            LinkSpeed::Gt2_5 | LinkSpeed::Gt5 => 8.0 / 10.0,
            LinkSpeed::Gt8 | LinkSpeed::Gt16 | LinkSpeed::Gt32 => 128.0 / 130.0,
            LinkSpeed::Gt64 => 242.0 / 256.0,
        }
    }

    /// Parses sysfs's `8.0 GT/s PCIe`, `2.5 GT/s`, or plain `8`; `None` for `Unknown`.
    pub fn parse(text: &str) -> Option<Self> {
        let num = text.split_whitespace().next()?;
        let v: f64 = num.parse().ok()?;
        Self::ALL
            .iter()
            .find(|(_, _, g)| (g - v).abs() < 0.01)
            .map(|(s, _, _)| *s)
    }
}

impl fmt::Display for LinkSpeed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} GT/s", Self::ALL[*self as usize].1)
    }
}

impl Serialize for LinkSpeed {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for LinkSpeed {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        LinkSpeed::parse(&text).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "`{text}` is not a PCIe link speed (2.5, 5.0, 8.0, 16.0, 32.0 or 64.0 GT/s)"
            ))
        })
    }
}

/// A function's PCIe link: for an endpoint or switch upstream port the link above it,
/// for a root port or switch downstream port the link below it (as the PCIe Link Status
/// register of each reports).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Link {
    /// Negotiated rate.
    pub speed: LinkSpeed,
    /// Negotiated lanes.
    pub width: u8,
    /// Highest rate both ends support.
    pub max_speed: LinkSpeed,
    /// Lanes the slot offers.
    pub max_width: u8,
}

impl Link {
    /// Usable bandwidth of the negotiated link, one direction, in GB/s.
    pub fn gbytes_per_s(&self) -> f64 {
        self.speed.gts() * self.speed.encoding_efficiency() * f64::from(self.width) / 8.0
    }
}

impl fmt::Display for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} x{}", self.speed, self.width)?;
        if self.speed != self.max_speed || self.width != self.max_width {
            write!(f, " (max {} x{})", self.max_speed, self.max_width)?;
        }
        Ok(())
    }
}

/// Bits of the ACS capability and control registers (PCI_ACS_*).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AcsFlags(pub u16);

impl AcsFlags {
    /// Source Validation.
    pub const SV: u16 = 0x0001;
    /// Translation Blocking.
    pub const TB: u16 = 0x0002;
    /// P2P Request Redirect.
    pub const RR: u16 = 0x0004;
    /// P2P Completion Redirect.
    pub const CR: u16 = 0x0008;
    /// Upstream Forwarding.
    pub const UF: u16 = 0x0010;
    /// P2P Egress Control.
    pub const EC: u16 = 0x0020;
    /// Direct Translated P2P.
    pub const DT: u16 = 0x0040;
    const NAMES: [(u16, &'static str); 7] = [
        (Self::SV, "SV"),
        (Self::TB, "TB"),
        (Self::RR, "RR"),
        (Self::CR, "CR"),
        (Self::UF, "UF"),
        (Self::EC, "EC"),
        (Self::DT, "DT"),
    ];

    /// Whether the bits that make a port send peer traffic upstream (RR, CR, EC) are set,
    /// the test of the kernel's `pci_bridge_has_acs_redir()`.
    pub fn redirects(self) -> bool {
        self.0 & (Self::RR | Self::CR | Self::EC) != 0
    }
}

impl fmt::Display for AcsFlags {
    /// Prints like lspci: `SrcValid+ TransBlk- ReqRedir+ ...` is long, so the short names
    /// joined with `|`, or `-` when none is set. Unnamed high bits print as hex.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = Self::NAMES
            .iter()
            .filter(|(b, _)| self.0 & b != 0)
            .map(|(_, n)| (*n).to_string())
            .collect();
        let rest = self.0 & !0x7f;
        if rest != 0 {
            parts.push(format!("{rest:#x}"));
        }
        if parts.is_empty() {
            f.write_str("-")
        } else {
            f.write_str(&parts.join("|"))
        }
    }
}

impl std::str::FromStr for AcsFlags {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "-" || s.is_empty() {
            return Ok(AcsFlags(0));
        }
        let mut v = 0u16;
        for part in s.split('|') {
            let part = part.trim();
            if let Some((bit, _)) = Self::NAMES
                .iter()
                .find(|(_, n)| n.eq_ignore_ascii_case(part))
            {
                v |= bit;
            } else if let Some(x) =
                crate::addr::parse_hex_u64(part).filter(|_| part.starts_with("0x"))
            {
                v |= u16::try_from(x).map_err(|_| format!("`{part}` is wider than 16 bits"))?;
            } else {
                return Err(format!(
                    "`{part}` is not an ACS bit (SV, TB, RR, CR, UF, EC, DT or 0x..)"
                ));
            }
        }
        Ok(AcsFlags(v))
    }
}

impl Serialize for AcsFlags {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for AcsFlags {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// What is known of a function's Access Control Services capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case", tag = "state", deny_unknown_fields)]
pub enum Acs {
    /// Not read: the extended config space was not readable (non-root reads stop at 64
    /// bytes) or the source (lspci text) does not carry it.
    #[default]
    Unknown,
    /// The function has no ACS capability, so it never redirects.
    Absent,
    /// The capability is present with these capability and control bits.
    Present {
        /// What the port can do.
        cap: AcsFlags,
        /// What is enabled.
        ctrl: AcsFlags,
    },
}

impl Acs {
    /// `Some(true)` when the function redirects peer traffic upstream, `None` when unknown.
    pub fn redirects(&self) -> Option<bool> {
        match self {
            Acs::Unknown => None,
            Acs::Absent => Some(false),
            Acs::Present { ctrl, .. } => Some(ctrl.redirects()),
        }
    }
}

impl fmt::Display for Acs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Acs::Unknown => f.write_str("ACS unknown"),
            Acs::Absent => f.write_str("no ACS"),
            Acs::Present { ctrl, .. } => write!(f, "ACS ctrl {ctrl}"),
        }
    }
}

/// Index of a function inside one [`Topology`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FnId(pub(crate) u32);

impl FnId {
    /// The index into [`Topology::functions`].
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// What is directly above a function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Upstream {
    /// The function sits on a root bus: index into [`Topology::host_bridges`].
    HostBridge(usize),
    /// The function sits below this bridge.
    Bridge(FnId),
}

/// One PCI function.
///
/// # Invariants
/// Inside a [`Topology`], `upstream` names an existing host bridge or a function whose
/// `kind` is a bridge, and following `upstream` from any function ends at a host bridge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Function {
    /// The function's address.
    pub bdf: Bdf,
    /// Vendor ID.
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
    /// The function's broad class.
    pub fn device_class(&self) -> DeviceClass {
        DeviceClass::of(self.class)
    }

    /// Whether the class code says bridge (06:04 PCI-to-PCI, 06:09 semi-transparent).
    pub fn class_is_pci_bridge(class: u32) -> bool {
        matches!(class >> 8, 0x0604 | 0x0609)
    }
}

/// What an importer could not learn, said once for the whole topology.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Gaps {
    /// Functions whose ACS state could not be read (verdicts that cross them are uncertain).
    pub acs_unknown: usize,
    /// Whether NUMA placement is unknown for the whole source.
    pub numa_unknown: bool,
    /// Whether the CPU is unknown (the AMD Zen rule cannot be applied).
    pub cpu_unknown: bool,
    /// Free-text notes from the importer: what it skipped and why.
    pub notes: Vec<String>,
}

/// A function as an importer describes it, before the tree is linked.
#[derive(Clone, Debug)]
pub struct FunctionSpec {
    /// Every field of [`Function`] but the links; `upstream` is ignored.
    pub function: Function,
    /// The parent bridge when the source says it (sysfs directories, lspci nesting);
    /// `None` derives it from bus numbers: the bridge whose secondary bus is this
    /// function's bus, else the host bridge of that root bus.
    pub parent: Option<Bdf>,
    /// Whether `function.kind` came from the device itself (PCIe capability) rather than
    /// a guess from the class code; unsure kinds are re-inferred from the tree shape.
    pub kind_known: bool,
}

/// An immutable PCIe tree. See the module documentation.
///
/// # Invariants
/// BDFs are unique; every function's upstream chain ends at one of `host_bridges`;
/// `by_bdf` indexes `functions` exactly; `children` lists each bridge's functions in BDF order.
#[derive(Clone, Debug)]
pub struct Topology {
    host: HostInfo,
    host_bridges: Vec<HostBridge>,
    functions: Vec<Function>,
    by_bdf: HashMap<Bdf, FnId>,
    children: Vec<Vec<FnId>>,
    host_children: Vec<Vec<FnId>>,
    depth: Vec<u32>,
    gaps: Gaps,
    source: String,
}

impl Topology {
    /// Links functions into a tree and checks it. `source` names where it came from
    /// (a path, `preset workstation`, `live sysfs`) for messages.
    pub fn build(
        source: impl Into<String>,
        host: HostInfo,
        mut host_bridges: Vec<HostBridge>,
        mut specs: Vec<FunctionSpec>,
        mut gaps: Gaps,
    ) -> Result<Self, FabricError> {
        let source = source.into();
        specs.sort_by_key(|s| s.function.bdf);
        host_bridges.sort_by_key(|h| h.root);
        for w in host_bridges.windows(2) {
            if w[0].root == w[1].root {
                return Err(FabricError::DuplicateHostBridge {
                    source_name: source.clone(),
                    root: w[0].root,
                });
            }
        }
        let mut by_bdf = HashMap::with_capacity(specs.len());
        for (i, s) in specs.iter().enumerate() {
            if by_bdf.insert(s.function.bdf, FnId(i as u32)).is_some() {
                return Err(FabricError::DuplicateFunction {
                    source_name: source.clone(),
                    bdf: s.function.bdf,
                });
            }
        }
        // Bus-number parents: the bridge whose secondary bus is the function's bus.
        let mut bus_owner: HashMap<(u32, u8), FnId> = HashMap::new();
        for (i, s) in specs.iter().enumerate() {
            let f = &s.function;
            if let (true, Some(r)) = (
                f.kind.is_bridge() || Function::class_is_pci_bridge(f.class),
                f.buses,
            ) {
                if r.secondary != 0 {
                    bus_owner
                        .entry((f.bdf.domain(), r.secondary))
                        .or_insert(FnId(i as u32));
                }
            }
        }
        let hb_index: HashMap<BusId, usize> = host_bridges
            .iter()
            .enumerate()
            .map(|(i, h)| (h.root, i))
            .collect();
        let mut upstream = Vec::with_capacity(specs.len());
        for s in &specs {
            let bdf = s.function.bdf;
            let up = match s.parent {
                Some(p) => match by_bdf.get(&p) {
                    Some(&id) => Upstream::Bridge(id),
                    None => {
                        return Err(FabricError::MissingParent {
                            source_name: source.clone(),
                            bdf,
                            parent: p.to_string(),
                        })
                    }
                },
                None => {
                    let root = BusId {
                        domain: bdf.domain(),
                        bus: bdf.bus(),
                    };
                    match (
                        bus_owner.get(&(bdf.domain(), bdf.bus())),
                        hb_index.get(&root),
                    ) {
                        (Some(&id), _) if id != by_bdf[&bdf] => Upstream::Bridge(id),
                        (_, Some(&h)) => Upstream::HostBridge(h),
                        _ => {
                            return Err(FabricError::MissingParent {
                                source_name: source.clone(),
                                bdf,
                                parent: format!("a bridge to bus {root} or a host bridge {root}"),
                            })
                        }
                    }
                }
            };
            upstream.push(up);
        }
        let mut functions: Vec<Function> = specs
            .iter()
            .zip(&upstream)
            .map(|(s, up)| Function {
                upstream: *up,
                ..s.function.clone()
            })
            .collect();
        // Depth and cycle check: every chain must reach a host bridge within n steps.
        let n = functions.len();
        let mut depth = vec![u32::MAX; n];
        for start in 0..n {
            let mut chain = Vec::new();
            let mut cur = start;
            loop {
                if depth[cur] != u32::MAX {
                    break;
                }
                chain.push(cur);
                if chain.len() > n {
                    return Err(FabricError::Cycle {
                        source_name: source.clone(),
                        bdf: functions[start].bdf,
                    });
                }
                match functions[cur].upstream {
                    Upstream::HostBridge(_) => {
                        depth[cur] = 0;
                        chain.pop();
                        break;
                    }
                    Upstream::Bridge(p) => cur = p.index(),
                }
            }
            while let Some(c) = chain.pop() {
                let Upstream::Bridge(p) = functions[c].upstream else {
                    unreachable!("only bridge links are pushed")
                };
                depth[c] = depth[p.index()] + 1;
            }
        }
        let mut children = vec![Vec::new(); n];
        let mut host_children = vec![Vec::new(); host_bridges.len()];
        for (i, f) in functions.iter().enumerate() {
            match f.upstream {
                Upstream::HostBridge(h) => host_children[h].push(FnId(i as u32)),
                Upstream::Bridge(p) => children[p.index()].push(FnId(i as u32)),
            }
        }
        // A parent named by the source must be able to have children.
        for (i, f) in functions.iter().enumerate() {
            if let Upstream::Bridge(p) = f.upstream {
                let pf = &functions[p.index()];
                if !(pf.kind.is_bridge() || Function::class_is_pci_bridge(pf.class)) {
                    return Err(FabricError::ParentNotBridge {
                        source_name: source.clone(),
                        bdf: functions[i].bdf,
                        parent: pf.bdf,
                    });
                }
            }
        }
        // Re-infer kinds the source could not state, from the tree's shape (top down).
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&i| depth[i]);
        for &i in &order {
            if specs[i].kind_known {
                continue;
            }
            let kind = infer_kind(&functions, &children, i);
            functions[i].kind = kind;
        }
        for f in &mut functions {
            if f.name.is_empty() {
                f.name = names::device_name(f.vendor, f.device, f.class);
            }
        }
        gaps.acs_unknown = functions.iter().filter(|f| f.acs == Acs::Unknown).count();
        Ok(Topology {
            host,
            host_bridges,
            functions,
            by_bdf,
            children,
            host_children,
            depth,
            gaps,
            source,
        })
    }

    /// The host's CPU and IOMMU facts.
    pub fn host(&self) -> &HostInfo {
        &self.host
    }
    /// Host bridges in root-bus order.
    pub fn host_bridges(&self) -> &[HostBridge] {
        &self.host_bridges
    }
    /// Functions in BDF order.
    pub fn functions(&self) -> &[Function] {
        &self.functions
    }
    /// What the importer could not read.
    pub fn gaps(&self) -> &Gaps {
        &self.gaps
    }
    /// Where the topology came from.
    pub fn source(&self) -> &str {
        &self.source
    }
    /// The function with this address.
    pub fn lookup(&self, bdf: Bdf) -> Option<FnId> {
        self.by_bdf.get(&bdf).copied()
    }
    /// The function `id`.
    pub fn function(&self, id: FnId) -> &Function {
        &self.functions[id.index()]
    }
    /// All ids in BDF order.
    pub fn ids(&self) -> impl Iterator<Item = FnId> + '_ {
        (0..self.functions.len() as u32).map(FnId)
    }
    /// The kernel's `pci_upstream_bridge()`: the bridge directly above, `None` on a root bus.
    pub fn upstream_bridge(&self, id: FnId) -> Option<FnId> {
        match self.function(id).upstream {
            Upstream::Bridge(p) => Some(p),
            Upstream::HostBridge(_) => None,
        }
    }
    /// Index of the host bridge whose root bus the function descends from.
    pub fn host_bridge_of(&self, id: FnId) -> usize {
        let mut cur = id;
        loop {
            match self.function(cur).upstream {
                Upstream::HostBridge(h) => return h,
                Upstream::Bridge(p) => cur = p,
            }
        }
    }
    /// Bridges between the function and its root bus (0 on a root bus).
    pub fn depth(&self, id: FnId) -> u32 {
        self.depth[id.index()]
    }
    /// Functions directly below a bridge, in BDF order.
    pub fn children(&self, id: FnId) -> &[FnId] {
        &self.children[id.index()]
    }
    /// Functions on a host bridge's root bus, in BDF order.
    pub fn root_bus_functions(&self, host_bridge: usize) -> &[FnId] {
        &self.host_children[host_bridge]
    }
    /// The function and its upstream bridges, nearest first.
    pub fn upstream_path(&self, id: FnId) -> Vec<FnId> {
        let mut out = vec![id];
        let mut cur = id;
        while let Some(p) = self.upstream_bridge(cur) {
            out.push(p);
            cur = p;
        }
        out
    }
    /// The function at devfn 00.0 of a host bridge's root bus: the device the kernel's
    /// host-bridge allowlist identifies the host bridge by.
    pub fn host_bridge_function(&self, host_bridge: usize) -> Option<&Function> {
        let root = self.host_bridges[host_bridge].root;
        let bdf = Bdf::new(root.domain, root.bus, 0, 0)?;
        self.lookup(bdf).map(|id| self.function(id))
    }
    /// NUMA node of a function: its own, else its host bridge's.
    pub fn numa_node(&self, id: FnId) -> Option<u32> {
        self.function(id)
            .numa_node
            .or(self.host_bridges[self.host_bridge_of(id)].numa_node)
    }
    /// Parses a BDF the way users type it and finds it, with a clear error.
    pub fn find(&self, text: &str) -> Result<FnId, FabricError> {
        let bdf: Bdf = text.parse().map_err(FabricError::BadBdf)?;
        self.lookup(bdf).ok_or_else(|| FabricError::NoSuchFunction {
            source_name: self.source.clone(),
            bdf,
        })
    }
}

/// The kind a function most likely has, from its class and position.
fn infer_kind(functions: &[Function], children: &[Vec<FnId>], i: usize) -> PortKind {
    let f = &functions[i];
    if f.class >> 8 == 0x0600 {
        return PortKind::HostBridge;
    }
    if !Function::class_is_pci_bridge(f.class) {
        return PortKind::Endpoint;
    }
    let parent_kind = match f.upstream {
        Upstream::HostBridge(_) => return PortKind::RootPort,
        Upstream::Bridge(p) => functions[p.index()].kind,
    };
    match parent_kind {
        PortKind::SwitchUpstream => PortKind::SwitchDownstream,
        PortKind::RootPort | PortKind::SwitchDownstream => {
            let kids = &children[i];
            let all_bridges = !kids.is_empty()
                && kids
                    .iter()
                    .all(|c| Function::class_is_pci_bridge(functions[c.index()].class));
            if all_bridges {
                PortKind::SwitchUpstream
            } else {
                PortKind::PciBridge
            }
        }
        _ => PortKind::PciBridge,
    }
}

/// One line of a tree's shape: a function, what is above it, and its bus range.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ShapeEntry {
    /// The function.
    pub bdf: Bdf,
    /// `root DDDD:BB` or the parent bridge's BDF.
    pub parent: String,
    /// The bridge's bus range, if any.
    pub buses: Option<BusRange>,
}

impl Topology {
    /// The tree as (function, parent, bus range) in BDF order: what two importers of
    /// one machine must agree on.
    pub fn shape(&self) -> Vec<ShapeEntry> {
        self.functions
            .iter()
            .map(|f| ShapeEntry {
                bdf: f.bdf,
                parent: match f.upstream {
                    Upstream::HostBridge(h) => format!("root {}", self.host_bridges[h].root),
                    Upstream::Bridge(p) => self.function(p).bdf.to_string(),
                },
                buses: f.buses,
            })
            .collect()
    }
}
