//! The TOML topology file (docs/topology.md): one `[host]` table, `[[host_bridge]]`
//! entries for the root buses and `[[function]]` entries whose parents follow from bus
//! numbers as in the kernel: a function on bus N sits below the bridge whose secondary
//! bus is N, or on the root bus N of a host bridge.
//!
//! Writing a model back gives every field explicitly (names, kinds), so
//! file → model → file → model is the identity on the model and the second file is a
//! fixed point.

use serde::{Deserialize, Serialize};

use crate::addr::Bdf;
use crate::fabric::error::FabricError;
use crate::fabric::model::{
    Acs, Bar, BusRange, Function, FunctionSpec, Gaps, HostBridge, HostInfo, Link, NvmeCmb, P2pmem,
    PortKind, Topology, Upstream,
};
use crate::fabric::names;

/// A topology file as it is on disk.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopologyFile {
    /// A short name for reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// What the machine is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// CPU and IOMMU.
    #[serde(default)]
    pub host: HostInfo,
    /// Root buses.
    #[serde(default, rename = "host_bridge")]
    pub host_bridges: Vec<HostBridge>,
    /// Functions.
    #[serde(default, rename = "function")]
    pub functions: Vec<FunctionEntry>,
}

/// One `[[function]]` table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionEntry {
    /// `DDDD:BB:DD.F`.
    pub bdf: Bdf,
    /// `vendor:device` in hex; omitted when unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Subsystem `vendor:device` in hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subsystem: Option<String>,
    /// The 24-bit class code, `0x010802`.
    pub class: String,
    /// A readable name; from pci.ids when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The role; inferred from class and position when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<PortKind>,
    /// For bridges, `SS-UU` or `SS` in hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buses: Option<String>,
    /// The bridge above it, when bus numbers cannot say (its bridge's buses are
    /// unknown, as in a snapshot whose config space could not be read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<Bdf>,
    /// The link.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<Link>,
    /// The ACS capability; unknown when omitted.
    #[serde(default, skip_serializing_if = "is_unknown")]
    pub acs: Acs,
    /// IOMMU group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iommu_group: Option<u32>,
    /// NUMA node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numa_node: Option<u32>,
    /// On-board memory for a device model (a GPU's VRAM): bytes, or a string with a
    /// unit, `"16GiB"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemSize>,
    /// The p2p memory the kernel registered for it: `{ size, available, published }`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p2pmem: Option<P2pmem>,
    /// An NVMe controller memory buffer: `{ cmbloc, cmbsz }`, the registers' values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nvme_cmb: Option<NvmeCmb>,
    /// BARs.
    #[serde(default, rename = "bar", skip_serializing_if = "Vec::is_empty")]
    pub bars: Vec<Bar>,
}

/// A size in a topology file: an integer of bytes, or text such as `"256MiB"`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MemSize {
    /// Bytes.
    Bytes(u64),
    /// A number with an optional unit: B, KiB, MiB, GiB or TiB (K, M, G, T too).
    Text(String),
}

impl MemSize {
    /// The size in bytes, or `None` when the text is not a size.
    pub fn bytes(&self) -> Option<u64> {
        match self {
            MemSize::Bytes(b) => Some(*b),
            MemSize::Text(t) => {
                let t = t.trim();
                let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
                let (num, unit) = t.split_at(split);
                let n: u64 = num.parse().ok()?;
                let shift = match unit.trim() {
                    "" | "B" => 0,
                    "K" | "KiB" => 10,
                    "M" | "MiB" => 20,
                    "G" | "GiB" => 30,
                    "T" | "TiB" => 40,
                    _ => return None,
                };
                n.checked_mul(1u64 << shift)
            }
        }
    }
}

fn is_unknown(a: &Acs) -> bool {
    *a == Acs::Unknown
}

fn parse_id_pair(text: &str) -> Option<(u16, u16)> {
    let (v, d) = text.trim().split_once(':')?;
    Some((
        u16::from_str_radix(v, 16).ok()?,
        u16::from_str_radix(d, 16).ok()?,
    ))
}

fn parse_buses(text: &str) -> Option<BusRange> {
    let p = |s: &str| u8::from_str_radix(s.trim(), 16).ok();
    let (a, b) = match text.split_once('-') {
        Some((a, b)) => (p(a)?, p(b)?),
        None => (p(text)?, p(text)?),
    };
    (a <= b && a != 0).then_some(BusRange {
        secondary: a,
        subordinate: b,
    })
}

/// Where each `[[function]]` table starts, read in a second, lenient pass over the text
/// so that an error about a function names the line of its table.
#[derive(Deserialize)]
struct Places {
    #[serde(default)]
    function: Vec<toml::Spanned<Place>>,
}

#[derive(Deserialize)]
struct Place {
    bdf: Option<toml::Value>,
}

/// The 1-based line of each function's table, by BDF (the first table when a BDF is
/// repeated).
fn table_lines(text: &str) -> Vec<(Bdf, usize)> {
    let Ok(places) = toml::from_str::<Places>(text) else {
        return Vec::new();
    };
    let mut out: Vec<(Bdf, usize)> = Vec::new();
    for p in places.function {
        let line = 1 + text[..p.span().start.min(text.len())]
            .bytes()
            .filter(|&b| b == b'\n')
            .count();
        if let Some(bdf) = p
            .get_ref()
            .bdf
            .as_ref()
            .and_then(|v| v.as_str())
            .and_then(|t| t.parse::<Bdf>().ok())
        {
            if !out.iter().any(|(b, _)| *b == bdf) {
                out.push((bdf, line));
            }
        }
    }
    out
}

/// Parses topology TOML; `source` names it in errors, with the line of the function's
/// table when an error is about one function.
pub fn parse(source: &str, text: &str) -> Result<Topology, FabricError> {
    let file: TopologyFile = toml::from_str(text).map_err(|e| FabricError::Topology {
        source_name: source.to_string(),
        reason: e.to_string(),
    })?;
    if file.functions.is_empty() {
        return Err(FabricError::Empty {
            source_name: source.to_string(),
            hint: if text.trim_start_matches('\u{feff}').trim().is_empty() {
                ": the file is empty".to_string()
            } else {
                ": it has no [[function]] table (is it cut short?)".to_string()
            },
        });
    }
    let lines = table_lines(text);
    let locate = |bdf: Bdf| {
        lines
            .iter()
            .find(|(b, _)| *b == bdf)
            .map(|(_, l)| format!("{source}, line {l}"))
    };
    from_file_located(source, &locate, &file)
}

/// Builds the model from a parsed file.
pub fn from_file(source: &str, file: &TopologyFile) -> Result<Topology, FabricError> {
    from_file_located(source, &|_| None, file)
}

fn from_file_located(
    source: &str,
    locate: &dyn Fn(Bdf) -> Option<String>,
    file: &TopologyFile,
) -> Result<Topology, FabricError> {
    let bad = |bdf: Bdf, what: String| FabricError::Invalid {
        source_name: locate(bdf).unwrap_or_else(|| source.to_string()),
        bdf,
        what,
    };
    let mut specs = Vec::with_capacity(file.functions.len());
    for e in &file.functions {
        let (vendor, device) = match &e.id {
            None => (Function::UNKNOWN_ID, Function::UNKNOWN_ID),
            Some(id) => parse_id_pair(id)
                .ok_or_else(|| bad(e.bdf, format!("id `{id}` is not vendor:device in hex")))?,
        };
        let subsystem = match &e.subsystem {
            None => None,
            Some(s) => Some(parse_id_pair(s).ok_or_else(|| {
                bad(
                    e.bdf,
                    format!("subsystem `{s}` is not vendor:device in hex"),
                )
            })?),
        };
        let class = crate::addr::parse_hex_u64(&e.class)
            .filter(|c| *c <= 0xff_ffff)
            .ok_or_else(|| {
                bad(
                    e.bdf,
                    format!("class `{}` is not a 24-bit hex class code", e.class),
                )
            })? as u32;
        let buses = match &e.buses {
            None => None,
            Some(b) => Some(parse_buses(b).ok_or_else(|| {
                bad(
                    e.bdf,
                    format!("buses `{b}` is not a hex range SS-UU with 0 < SS <= UU"),
                )
            })?),
        };
        if let Some(k) = e.kind {
            if buses.is_some() && !k.is_bridge() {
                return Err(bad(e.bdf, format!("a {k} cannot have buses")));
            }
        }
        let memory = match &e.memory {
            None => None,
            Some(m) => Some(m.bytes().filter(|b| *b > 0).ok_or_else(|| {
                bad(
                    e.bdf,
                    format!(
                        "memory `{m:?}` is not a size: bytes, or a number with B, KiB, MiB, \
                         GiB or TiB"
                    ),
                )
            })?),
        };
        specs.push(FunctionSpec {
            function: Function {
                bdf: e.bdf,
                vendor,
                device,
                subsystem,
                class,
                name: e.name.clone().unwrap_or_default(),
                kind: e.kind.unwrap_or(PortKind::Endpoint),
                buses,
                bars: e.bars.clone(),
                link: e.link,
                acs: e.acs,
                iommu_group: e.iommu_group,
                numa_node: e.numa_node,
                memory,
                p2pmem: e.p2pmem,
                nvme_cmb: e.nvme_cmb,
                upstream: Upstream::HostBridge(0),
            },
            parent: e.parent,
            kind_known: e.kind.is_some(),
        });
    }
    let numa_unknown = file.host_bridges.iter().all(|h| h.numa_node.is_none())
        && file.functions.iter().all(|f| f.numa_node.is_none());
    let gaps = Gaps {
        numa_unknown,
        cpu_unknown: file.host.cpu_vendor.is_none(),
        acs_hint: "the topology file does not give its `[function.acs]` state",
        ..Gaps::default()
    };
    let name = file.name.clone().unwrap_or_else(|| source.to_string());
    Ok(Topology::build_located(
        source.to_string(),
        locate,
        file.host.clone(),
        file.host_bridges.clone(),
        specs,
        gaps,
    )?
    .with_source(name)
    .with_description(file.description.clone()))
}

/// The file that describes a model, every field explicit.
pub fn to_file(topo: &Topology) -> TopologyFile {
    TopologyFile {
        name: Some(topo.source().to_string()),
        description: topo.description().map(str::to_string),
        host: topo.host().clone(),
        host_bridges: topo.host_bridges().to_vec(),
        functions: topo
            .functions()
            .iter()
            .map(|f| FunctionEntry {
                bdf: f.bdf,
                id: f.id(),
                subsystem: f.subsystem.map(|(v, d)| format!("{v:04x}:{d:04x}")),
                class: format!("{:#08x}", f.class),
                name: (f.name != names::device_name(f.vendor, f.device, f.class))
                    .then(|| f.name.clone()),
                kind: Some(f.kind),
                buses: f.buses.map(|b| {
                    if b.secondary == b.subordinate {
                        format!("{:02x}", b.secondary)
                    } else {
                        format!("{:02x}-{:02x}", b.secondary, b.subordinate)
                    }
                }),
                parent: match f.upstream {
                    // Written only where the bus numbers do not place the function.
                    Upstream::Bridge(p) => {
                        let pf = topo.function(p);
                        (pf.buses.map(|b| b.secondary) != Some(f.bdf.bus())).then_some(pf.bdf)
                    }
                    Upstream::HostBridge(_) => None,
                },
                link: f.link,
                acs: f.acs,
                iommu_group: f.iommu_group,
                numa_node: f.numa_node,
                memory: f.memory.map(MemSize::Bytes),
                p2pmem: f.p2pmem,
                nvme_cmb: f.nvme_cmb,
                bars: f.bars.clone(),
            })
            .collect(),
    }
}

/// The TOML text of a model.
pub fn to_toml(topo: &Topology) -> String {
    // Serialising plain data with string keys cannot fail.
    toml::to_string(&to_file(topo)).unwrap_or_else(|e| format!("# cannot serialise: {e}\n"))
}
