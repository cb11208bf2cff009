//! The other view of a pair: the `nvidia-smi topo -m` connection level (the one NCCL
//! uses to pick transports) and the links the traffic crosses, with the bottleneck.
//!
//! Both come from the same tree as the kernel's verdict. Levels count a PCIe switch
//! (its upstream port and all its downstream ports) as one bridge, as NVIDIA does:
//! - `PIX`: the pair meets inside one switch, under one non-root port, or directly
//!   below one root port (the functions of one device in a root-port slot);
//! - `PXB`: they meet in a switch (or at a root port), but one of them hangs below a
//!   further bridge;
//! - `PHB`: they meet at the host bridge of one root bus;
//! - `NODE`: different host bridges on one NUMA node; `SYS`: different NUMA nodes.

use std::collections::BTreeSet;
use std::fmt;

use serde::Serialize;

use crate::fabric::model::{FnId, Link, PortKind, Topology, Upstream};

/// A connection level of `nvidia-smi topo -m`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum TopoLevel {
    /// The device itself.
    X,
    /// At most one PCIe bridge (switch) crossed.
    PIX,
    /// Several PCIe bridges crossed, below the root port.
    PXB,
    /// Through the PCIe host bridge (root port or root complex).
    PHB,
    /// Across host bridges within one NUMA node.
    NODE,
    /// Across the inter-socket link between NUMA nodes.
    SYS,
}

impl TopoLevel {
    /// The legend `nvidia-smi topo -m` prints, in order.
    pub const LEGEND: [(TopoLevel, &'static str); 6] = [
        (TopoLevel::X, "Self"),
        (TopoLevel::SYS, "Connection traversing PCIe as well as the SMP interconnect between NUMA nodes"),
        (TopoLevel::NODE, "Connection traversing PCIe as well as the interconnect between PCIe Host Bridges within a NUMA node"),
        (TopoLevel::PHB, "Connection traversing PCIe as well as a PCIe Host Bridge (typically the CPU)"),
        (TopoLevel::PXB, "Connection traversing multiple PCIe bridges (without traversing the PCIe Host Bridge)"),
        (TopoLevel::PIX, "Connection traversing at most a single PCIe bridge"),
    ];
}

impl fmt::Display for TopoLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TopoLevel::X => "X",
            TopoLevel::PIX => "PIX",
            TopoLevel::PXB => "PXB",
            TopoLevel::PHB => "PHB",
            TopoLevel::NODE => "NODE",
            TopoLevel::SYS => "SYS",
        })
    }
}

/// The `nvidia-smi topo -m` level between two functions.
pub fn topo_level(topo: &Topology, a: FnId, b: FnId) -> TopoLevel {
    level_with_paths(topo, &topo.upstream_path(a), &topo.upstream_path(b))
}

/// Whether [`topo_level`] between `a` and `b` is NODE only because a NUMA node is
/// unknown: below different host bridges, one of which has no known node, the pair may
/// as well be SYS.
pub fn topo_level_uncertain(topo: &Topology, a: FnId, b: FnId) -> bool {
    let (ha, hb) = (topo.host_bridge_of(a), topo.host_bridge_of(b));
    let hbs = topo.host_bridges();
    ha != hb && (hbs[ha].numa_node.is_none() || hbs[hb].numa_node.is_none())
}

pub(crate) fn level_with_paths(topo: &Topology, pa: &[FnId], pb: &[FnId]) -> TopoLevel {
    if pa[0] == pb[0] {
        return TopoLevel::X;
    }
    let meet = pa
        .iter()
        .enumerate()
        .find_map(|(i, x)| pb.iter().position(|y| y == x).map(|j| (i, j)));
    let Some((i, j)) = meet else {
        let ha = topo.host_bridge_of(pa[0]);
        let hb = topo.host_bridge_of(pb[0]);
        if ha == hb {
            return TopoLevel::PHB;
        }
        let na = topo.host_bridges()[ha].numa_node;
        let nb = topo.host_bridges()[hb].numa_node;
        return match (na, nb) {
            (Some(x), Some(y)) if x != y => TopoLevel::SYS,
            _ => TopoLevel::NODE,
        };
    };
    let common = pa[i];
    if topo.function(common).kind == PortKind::RootPort {
        // Below one root port without a switch: the functions of one device in a
        // root-port slot (a dual-port NIC). They cross a single bridge, the root port,
        // never the host bridge: PIX, as nvidia-smi shows them on real servers; more
        // bridges on the way make it PXB.
        let more = pa[1..i]
            .iter()
            .chain(&pb[1..j])
            .any(|&id| topo.function(id).kind.is_bridge());
        return if more { TopoLevel::PXB } else { TopoLevel::PIX };
    }
    // Distinct switches (or legacy bridges) the pair crosses up to where they meet.
    let mut switches = BTreeSet::new();
    for &id in pa[1..=i].iter().chain(&pb[1..=j]) {
        let f = topo.function(id);
        let key = match f.kind {
            PortKind::SwitchDownstream => match f.upstream {
                Upstream::Bridge(usp) => usp,
                Upstream::HostBridge(_) => id,
            },
            PortKind::SwitchUpstream | PortKind::PciBridge => id,
            _ => continue,
        };
        switches.insert(key);
    }
    if switches.len() <= 1 {
        TopoLevel::PIX
    } else {
        TopoLevel::PXB
    }
}

/// One step of a path: from a function to the device above it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Hop {
    /// The lower end, a BDF.
    pub from: String,
    /// The upper end: a BDF, or `host bridge DDDD:BB`.
    pub to: String,
    /// The physical link crossed, when the hop is one and its state is known.
    pub link: Option<Link>,
    /// True for a hop inside a switch or root complex (no PCIe link to limit it).
    pub internal: bool,
    /// GB/s of the link, one direction.
    pub gbytes_per_s: Option<f64>,
}

/// The hops between a provider and a client and the slowest of them.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PathBandwidth {
    /// Provider side going up, then the client side going down.
    pub hops: Vec<Hop>,
    /// Index into `hops` of the slowest known link.
    pub bottleneck: Option<usize>,
    /// Its bandwidth in GB/s.
    pub bottleneck_gbytes_per_s: Option<f64>,
    /// Whether some link on the path has no known speed.
    pub incomplete: bool,
}

/// The links a transfer between `a` and `b` crosses, up to their common bridge (or the
/// host bridge when they have none, or when `via_host_bridge` says ACS sends it there).
pub fn path_bandwidth(topo: &Topology, a: FnId, b: FnId, via_host_bridge: bool) -> PathBandwidth {
    let pa = topo.upstream_path(a);
    let pb = topo.upstream_path(b);
    let meet = if via_host_bridge {
        None
    } else {
        pa.iter()
            .enumerate()
            .find_map(|(i, x)| pb.iter().position(|y| y == x).map(|j| (i, j)))
    };
    let (ua, ub) = match meet {
        Some((i, j)) => (&pa[..i], &pb[..j]),
        None => (&pa[..], &pb[..]),
    };
    let hop = |id: FnId| -> Hop {
        let f = topo.function(id);
        let to = match f.upstream {
            Upstream::Bridge(p) => topo.function(p).bdf.to_string(),
            Upstream::HostBridge(h) => format!("host bridge {}", topo.host_bridges()[h].root),
        };
        // Root ports and switch downstream ports report the link below them; going up
        // from them is a hop inside the root complex or the switch.
        let internal = matches!(
            f.kind,
            PortKind::RootPort | PortKind::SwitchDownstream | PortKind::HostBridge
        );
        let link = if internal { None } else { f.link };
        Hop {
            from: f.bdf.to_string(),
            to,
            gbytes_per_s: link.map(|l| l.gbytes_per_s()),
            link,
            internal,
        }
    };
    let mut hops: Vec<Hop> = ua.iter().map(|&id| hop(id)).collect();
    hops.extend(ub.iter().rev().map(|&id| {
        let mut h = hop(id);
        std::mem::swap(&mut h.from, &mut h.to);
        h
    }));
    let mut bottleneck = None;
    let mut best = f64::INFINITY;
    let mut incomplete = false;
    for (i, h) in hops.iter().enumerate() {
        match h.gbytes_per_s {
            Some(g) if g < best => {
                best = g;
                bottleneck = Some(i);
            }
            Some(_) => {}
            None if !h.internal => incomplete = true,
            None => {}
        }
    }
    PathBandwidth {
        hops,
        bottleneck,
        bottleneck_gbytes_per_s: bottleneck.map(|_| best),
        incomplete,
    }
}
