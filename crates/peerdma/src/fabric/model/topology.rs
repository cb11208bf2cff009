//! The tree: host bridges and functions linked by their upstream bridges, built once
//! by an importer and immutable afterwards. Every query is a walk over parent links, as
//! the kernel's `pci_upstream_bridge()` walk is.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::addr::{Bdf, BusId};
use crate::fabric::error::FabricError;
use crate::fabric::model::{
    validate, Acs, BusRange, FnId, Function, KernelFacts, PortKind, Upstream,
};
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
    /// The kernel's release, config, command line and IOMMU group types, as far as known.
    #[serde(default, skip_serializing_if = "KernelFacts::is_empty")]
    pub kernel: KernelFacts,
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
    /// Kernel facts that could not be read, and why (a file missing or not readable
    /// without root), one sentence each.
    #[serde(skip)]
    pub kernel_unread: Vec<String>,
    /// Why ACS may be unknown with this source, and what would tell (empty: the
    /// source simply does not give it).
    #[serde(skip)]
    pub acs_hint: &'static str,
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
    /// A sentence about the machine, when its source gave one (a topology file's
    /// `description`).
    description: Option<String>,
}

impl Topology {
    /// Links functions into a tree and checks it. `source` names where it came from
    /// (a path, `preset workstation`, `live sysfs`) for messages.
    ///
    /// This is the one gate every source goes through (docs/topology.md, "Validation"):
    /// besides linking, it refuses a model with no function, one whose bus numbers
    /// contradict each other, and any function whose BARs, link, ACS bits or kind no
    /// PCIe function can have ([`validate`](crate::fabric::model::validate)).
    pub fn build(
        source: impl Into<String>,
        host: HostInfo,
        host_bridges: Vec<HostBridge>,
        specs: Vec<FunctionSpec>,
        gaps: Gaps,
    ) -> Result<Self, FabricError> {
        Self::build_located(source.into(), &|_| None, host, host_bridges, specs, gaps)
    }

    /// [`Topology::build`] for a source that can say where each function is written:
    /// `locate` gives the place (`topo.toml, line 12`) an error about that function
    /// names instead of the bare source.
    pub(crate) fn build_located(
        source: String,
        locate: &dyn Fn(Bdf) -> Option<String>,
        host: HostInfo,
        mut host_bridges: Vec<HostBridge>,
        mut specs: Vec<FunctionSpec>,
        mut gaps: Gaps,
    ) -> Result<Self, FabricError> {
        let at = |bdf: Bdf| locate(bdf).unwrap_or_else(|| source.clone());
        if specs.is_empty() {
            return Err(FabricError::Empty {
                source_name: source,
                hint: String::new(),
            });
        }
        specs.sort_by_key(|s| s.function.bdf);
        // A bridge the firmware left unconfigured reads buses 00-00: it opens no bus.
        for s in &mut specs {
            if s.function
                .buses
                .is_some_and(|r| r.secondary == 0 && r.subordinate == 0)
            {
                s.function.buses = None;
            }
        }
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
                    source_name: at(s.function.bdf),
                    bdf: s.function.bdf,
                });
            }
        }
        // Bus-number parents: the bridge whose secondary bus is the function's bus. A
        // bridge's range lies above its own bus, and no two bridges open one bus.
        let bus_error = |bdf: Bdf, why: String| FabricError::BusRanges {
            source_name: at(bdf),
            bdf,
            why,
        };
        let mut bus_owner: HashMap<(u32, u8), FnId> = HashMap::new();
        for (i, s) in specs.iter().enumerate() {
            let f = &s.function;
            if let (true, Some(r)) = (
                f.kind.is_bridge() || Function::class_is_pci_bridge(f.class),
                f.buses,
            ) {
                if r.secondary <= f.bdf.bus() || r.subordinate < r.secondary {
                    return Err(bus_error(
                        f.bdf,
                        format!(
                            "buses {:02x}-{:02x} do not lie above its own bus {:02x}",
                            r.secondary,
                            r.subordinate,
                            f.bdf.bus()
                        ),
                    ));
                }
                if let Some(other) = bus_owner.insert((f.bdf.domain(), r.secondary), FnId(i as u32))
                {
                    return Err(bus_error(
                        f.bdf,
                        format!(
                            "opens bus {:02x}, which {} opens too",
                            r.secondary,
                            specs[other.index()].function.bdf
                        ),
                    ));
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
                            source_name: at(bdf),
                            bdf,
                            parent: format!("there is no {p}"),
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
                            // A bridge of the domain whose buses are not given is the
                            // likely culprit: name it rather than only its orphan.
                            let unnumbered: Vec<String> = specs
                                .iter()
                                .map(|s| &s.function)
                                .filter(|f| {
                                    f.bdf.domain() == bdf.domain()
                                        && f.buses.is_none()
                                        && f.bdf.bus() < bdf.bus()
                                        && (f.kind.is_bridge()
                                            || Function::class_is_pci_bridge(f.class))
                                })
                                .map(|f| f.bdf.to_string())
                                .collect();
                            let hint = if unnumbered.is_empty() {
                                String::new()
                            } else {
                                let (who, has) = if unnumbered.len() == 1 {
                                    ("bridge", "has")
                                } else {
                                    ("bridges", "have")
                                };
                                format!(
                                    " ({who} {} {has} no bus numbers: give the bridge \
                                     `buses`, or the function `parent`)",
                                    unnumbered.join(", ")
                                )
                            };
                            return Err(FabricError::MissingParent {
                                source_name: at(bdf),
                                bdf,
                                parent: format!(
                                    "there is no bridge to bus {root} and no host bridge {root}{hint}"
                                ),
                            });
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
                        source_name: at(functions[start].bdf),
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
                        source_name: at(functions[i].bdf),
                        bdf: functions[i].bdf,
                        parent: pf.bdf,
                    });
                }
            }
        }
        // Below a bridge with known buses, a bridge's range lies inside its parent's,
        // and sibling bridges' ranges do not overlap.
        for (i, f) in functions.iter().enumerate() {
            let Some(r) = f.buses else { continue };
            let siblings = match f.upstream {
                Upstream::Bridge(p) => {
                    if let Some(pr) = functions[p.index()].buses {
                        if r.secondary <= pr.secondary || r.subordinate > pr.subordinate {
                            return Err(bus_error(
                                f.bdf,
                                format!(
                                    "buses {:02x}-{:02x} reach outside its parent {}'s {:02x}-{:02x}",
                                    r.secondary,
                                    r.subordinate,
                                    functions[p.index()].bdf,
                                    pr.secondary,
                                    pr.subordinate
                                ),
                            ));
                        }
                    }
                    &children[p.index()]
                }
                Upstream::HostBridge(h) => &host_children[h],
            };
            for s in siblings.iter().filter(|s| s.index() > i) {
                let g = &functions[s.index()];
                if let Some(q) = g.buses {
                    if r.secondary <= q.subordinate && q.secondary <= r.subordinate {
                        return Err(bus_error(
                            f.bdf,
                            format!(
                                "buses {:02x}-{:02x} overlap those of {}, {:02x}-{:02x}",
                                r.secondary, r.subordinate, g.bdf, q.secondary, q.subordinate
                            ),
                        ));
                    }
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
        // Bus numbers belong to bridges: a function that has them but is none (a class
        // or kind that says otherwise) contradicts itself.
        if let Some(f) = functions
            .iter()
            .find(|f| f.buses.is_some() && !f.kind.is_bridge())
        {
            return Err(FabricError::BusesOnNonBridge {
                source_name: at(f.bdf),
                bdf: f.bdf,
                class: f.class,
                kind: f.kind,
            });
        }
        for f in &functions {
            validate::check_function(f).map_err(|what| FabricError::Invalid {
                source_name: at(f.bdf),
                bdf: f.bdf,
                what,
            })?;
        }
        // BARs of different functions share the address space: no two may overlap.
        let all_bars = functions
            .iter()
            .flat_map(|f| f.bars.iter().map(move |b| (b, f.bdf)));
        if let Some(((a, fa), (b, fb))) = validate::overlapping(all_bars) {
            return Err(FabricError::Invalid {
                source_name: at(fb),
                bdf: fb,
                what: format!(
                    "BAR {} at {:#x} overlaps BAR {} of {fa} ({:#x} + {:#x})",
                    b.index, b.cpu.0, a.index, a.cpu.0, a.size
                ),
            });
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
            description: None,
        })
    }

    /// The model named `source` in reports (a topology file's `name`, once its errors,
    /// which name the file, are behind it).
    pub(crate) fn with_source(mut self, source: String) -> Self {
        self.source = source;
        self
    }

    /// The model with `description` as the sentence about the machine.
    pub fn with_description(mut self, description: Option<String>) -> Self {
        self.description = description;
        self
    }

    /// The sentence about the machine its source gave, if any.
    pub fn description(&self) -> Option<&str> {
        self.description.as_deref()
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
