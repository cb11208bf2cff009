//! All-pairs view over a chosen set of functions: the `nvidia-smi topo -m` level and the
//! kernel's verdict for every pair.
//!
//! A million pairs must take milliseconds, so this does not replay the kernel's nested
//! walk per pair ([`calc_map_type_and_dist`](crate::fabric::calc_map_type_and_dist)
//! stays the reference, and a property test holds the two equal). Instead each function
//! carries counts from itself to its root bus: ACS-redirecting ports, ports of unknown
//! ACS, and switches. With the lowest common ancestor `c` of `a` and `b`, the kernel's
//! walk crosses `a..=c` and `b..c`, so the number of redirecting ports on it is
//! `R(a) + R(b) - 2 R(c) + r(c)`, and likewise for the other counts.

use serde::Serialize;

use crate::fabric::model::{FnId, PortKind, Topology, Upstream};
use crate::fabric::p2p::{MapType, HOST_BRIDGE_ALLOWLIST};
use crate::fabric::path::TopoLevel;

/// One pair's summary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Cell {
    /// The `nvidia-smi topo -m` level.
    pub level: TopoLevel,
    /// The kernel's map type.
    pub map_type: MapType,
    /// The kernel's distance.
    pub distance: u32,
    /// Whether the verdict rests on state that could not be read.
    pub uncertain: bool,
    /// Whether the level is NODE only because a NUMA node is unknown: it may be SYS.
    pub level_uncertain: bool,
}

/// The all-pairs matrix.
///
/// # Invariants
/// `cells.len() == ids.len()²`, row-major, row = provider, column = client.
#[derive(Clone, Debug)]
pub struct Matrix {
    /// The functions, in row order.
    pub ids: Vec<FnId>,
    cells: Vec<Cell>,
}

const NONE: u32 = u32::MAX;

/// Per-function counts from the function to its root bus, inclusive.
struct Prefix {
    parent: Vec<u32>,
    depth: Vec<u32>,
    host: Vec<u32>,
    redirect: Vec<u32>,
    unknown: Vec<u32>,
    switches: Vec<u32>,
}

impl Prefix {
    fn new(topo: &Topology) -> Self {
        let n = topo.functions().len();
        let mut p = Prefix {
            parent: vec![NONE; n],
            depth: vec![0; n],
            host: vec![0; n],
            redirect: vec![0; n],
            unknown: vec![0; n],
            switches: vec![0; n],
        };
        let mut order: Vec<FnId> = topo.ids().collect();
        order.sort_by_key(|&id| topo.depth(id));
        for id in order {
            let i = id.index();
            let f = topo.function(id);
            let (r, u) = match f.acs.redirects() {
                Some(true) => (1, 0),
                Some(false) => (0, 0),
                None => (0, 1),
            };
            let s = u32::from(is_switch(f.kind));
            p.depth[i] = topo.depth(id);
            match f.upstream {
                Upstream::HostBridge(h) => {
                    p.host[i] = h as u32;
                    (p.redirect[i], p.unknown[i], p.switches[i]) = (r, u, s);
                }
                Upstream::Bridge(q) => {
                    let q = q.index();
                    p.parent[i] = q as u32;
                    p.host[i] = p.host[q];
                    p.redirect[i] = p.redirect[q] + r;
                    p.unknown[i] = p.unknown[q] + u;
                    p.switches[i] = p.switches[q] + s;
                }
            }
        }
        p
    }

    fn own(v: &[u32], parent: &[u32], i: usize) -> u32 {
        match parent[i] {
            NONE => v[i],
            q => v[i] - v[q as usize],
        }
    }

    /// The lowest common ancestor, walking the deeper side up first.
    fn lca(&self, mut a: usize, mut b: usize) -> Option<usize> {
        while self.depth[a] > self.depth[b] {
            a = self.parent[a] as usize;
        }
        while self.depth[b] > self.depth[a] {
            b = self.parent[b] as usize;
        }
        while a != b {
            let (pa, pb) = (self.parent[a], self.parent[b]);
            if pa == NONE || pb == NONE {
                return None;
            }
            a = pa as usize;
            b = pb as usize;
        }
        Some(a)
    }
}

/// A switch upstream port or legacy bridge: one "PCIe bridge" in NVIDIA's counting.
fn is_switch(kind: PortKind) -> bool {
    matches!(kind, PortKind::SwitchUpstream | PortKind::PciBridge)
}

/// Whether each host bridge passes the allowlist for devices below it, and for devices
/// below different host bridges.
fn allowlist(topo: &Topology) -> Vec<(bool, bool)> {
    (0..topo.host_bridges().len())
        .map(|h| {
            match topo.host_bridge_function(h).and_then(|f| {
                HOST_BRIDGE_ALLOWLIST
                    .iter()
                    .find(|e| e.vendor == f.vendor && e.device == f.device)
            }) {
                Some(e) => (true, !e.same_host_bridge_only),
                None => (false, false),
            }
        })
        .collect()
}

impl Matrix {
    /// Computes every pair of `ids`.
    pub fn build(topo: &Topology, ids: &[FnId]) -> Self {
        let p = Prefix::new(topo);
        let allow = allowlist(topo);
        let cpu_allows = topo.host().cpu_supports_p2pdma();
        let cpu_unknown = topo.host().cpu_vendor.is_none();
        let numa: Vec<Option<u32>> = topo.host_bridges().iter().map(|h| h.numa_node).collect();
        let n = ids.len();
        let blank = Cell {
            level: TopoLevel::X,
            map_type: MapType::BusAddr,
            distance: 0,
            uncertain: false,
            level_uncertain: false,
        };
        let mut cells = vec![blank; n * n];
        for i in 0..n {
            let a = ids[i].index();
            for j in i..n {
                let b = ids[j].index();
                let cell = Self::pair(topo, &p, &allow, cpu_allows, cpu_unknown, &numa, a, b);
                cells[i * n + j] = cell;
                cells[j * n + i] = cell;
            }
        }
        Matrix {
            ids: ids.to_vec(),
            cells,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn pair(
        topo: &Topology,
        p: &Prefix,
        allow: &[(bool, bool)],
        cpu_allows: bool,
        cpu_unknown: bool,
        numa: &[Option<u32>],
        a: usize,
        b: usize,
    ) -> Cell {
        let (ha, hb) = (p.host[a] as usize, p.host[b] as usize);
        let host_path = || -> (MapType, bool) {
            let ok = cpu_allows
                || if ha == hb {
                    allow[ha].0
                } else {
                    allow[ha].1 && allow[hb].1
                };
            if ok {
                (MapType::ThruHostBridge, false)
            } else {
                (MapType::NotSupported, cpu_unknown)
            }
        };
        let common = if ha == hb { p.lca(a, b) } else { None };
        let Some(c) = common else {
            let (map_type, uncertain) = host_path();
            let (level, level_uncertain) = if ha == hb {
                (TopoLevel::PHB, false)
            } else {
                match (numa[ha], numa[hb]) {
                    (Some(x), Some(y)) => (
                        if x != y {
                            TopoLevel::SYS
                        } else {
                            TopoLevel::NODE
                        },
                        false,
                    ),
                    _ => (TopoLevel::NODE, true),
                }
            };
            return Cell {
                level,
                map_type,
                distance: p.depth[a] + p.depth[b] + 2,
                uncertain,
                level_uncertain,
            };
        };
        let distance = p.depth[a] + p.depth[b] - 2 * p.depth[c];
        let on_walk = |v: &[u32]| v[a] + v[b] - 2 * v[c] + Prefix::own(v, &p.parent, c);
        let (map_type, uncertain) = if on_walk(&p.redirect) > 0 {
            host_path()
        } else {
            (MapType::BusAddr, on_walk(&p.unknown) > 0)
        };
        let level = if a == b {
            TopoLevel::X
        } else if topo.function(FnId(c as u32)).kind == PortKind::RootPort {
            TopoLevel::PHB
        } else {
            // Switches strictly between each end and `c`; the one `c` belongs to makes
            // one more, so PIX means none in between.
            let between = |x: usize| {
                if x == c {
                    0
                } else {
                    p.switches[x] - Prefix::own(&p.switches, &p.parent, x) - p.switches[c]
                }
            };
            if between(a) + between(b) == 0 {
                TopoLevel::PIX
            } else {
                TopoLevel::PXB
            }
        };
        Cell {
            level,
            map_type,
            distance,
            uncertain,
            level_uncertain: false,
        }
    }

    /// The cell for provider row `i`, client column `j`.
    pub fn get(&self, i: usize, j: usize) -> &Cell {
        &self.cells[i * self.ids.len() + j]
    }
}
