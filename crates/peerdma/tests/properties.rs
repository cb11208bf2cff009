//! Property tests over random trees: the verdict is symmetric where the kernel's is,
//! distance 0 exactly for the same function, never a bus address across a port with
//! ACS redirect, and the all-pairs matrix agrees with pair-by-pair verdicts.

use peerdma::addr::{Bdf, BusId};
use peerdma::fabric::model::FunctionSpec;
use peerdma::fabric::{
    calc_map_type_and_dist, Acs, AcsFlags, FnId, Function, Gaps, HostBridge, HostInfo, MapType,
    Matrix, PortKind, Topology,
};
use proptest::prelude::*;

#[derive(Clone, Debug)]
struct Node {
    /// Index of an earlier bridge node, or `None` for a root bus.
    parent: Option<usize>,
    host: usize,
    bridge: bool,
    acs: u8, // 0 unknown, 1 absent, 2.. present with ctrl bits
}

fn arb_nodes() -> impl Strategy<Value = (Vec<Node>, u8, bool)> {
    (1usize..40, 1usize..4, any::<u8>(), any::<bool>()).prop_flat_map(|(n, hosts, hb_id, amd)| {
        let nodes = proptest::collection::vec(
            (
                any::<prop::sample::Index>(),
                0..hosts,
                any::<bool>(),
                any::<u8>(),
                any::<bool>(),
            ),
            n,
        )
        .prop_map(move |raw| {
            let mut nodes: Vec<Node> = Vec::new();
            for (i, (pick, host, bridge, acs, at_root)) in raw.into_iter().enumerate() {
                let bridges: Vec<usize> = (0..i).filter(|&j| nodes[j].bridge).collect();
                let parent = if at_root || bridges.is_empty() {
                    None
                } else {
                    Some(bridges[pick.index(bridges.len())])
                };
                let host = parent.map_or(host, |p| nodes[p].host);
                nodes.push(Node {
                    parent,
                    host,
                    bridge,
                    acs,
                });
            }
            nodes
        });
        (nodes, Just(hb_id), Just(amd))
    })
}

fn build(nodes: &[Node], hb_id: u8, amd: bool) -> Topology {
    let hosts = nodes.iter().map(|n| n.host).max().unwrap_or(0) + 1;
    let ids = [0x2020u16, 0x3c00, 0x29c0, 0x2f01];
    let mut specs = Vec::new();
    let bdf_of = |i: usize, n: &Node| -> Bdf {
        if n.parent.is_none() {
            Bdf::new(0, (n.host * 0x40) as u8, (i % 31 + 1) as u8, (i / 31) as u8).unwrap()
        } else {
            Bdf::new(0, (n.host * 0x40 + 1 + i) as u8, 0, 0).unwrap()
        }
    };
    for (i, n) in nodes.iter().enumerate() {
        let acs = match n.acs % 4 {
            0 => Acs::Unknown,
            1 => Acs::Absent,
            _ => Acs::Present {
                cap: AcsFlags(0x7f),
                ctrl: AcsFlags(u16::from(n.acs >> 2) & 0x7f),
            },
        };
        specs.push(FunctionSpec {
            function: Function {
                vendor: 0x1234,
                device: 0x1,
                class: if n.bridge { 0x060400 } else { 0x010802 },
                name: "x".into(),
                kind: if n.bridge {
                    PortKind::PciBridge
                } else {
                    PortKind::Endpoint
                },
                acs,
                ..Function::bare(bdf_of(i, n))
            },
            parent: n.parent.map(|p| bdf_of(p, &nodes[p])),
            kind_known: true,
        });
    }
    for h in 0..hosts {
        let id = ids[(usize::from(hb_id) + h) % ids.len()];
        specs.push(FunctionSpec {
            function: Function {
                vendor: 0x8086,
                device: id,
                class: 0x060000,
                name: "hb".into(),
                kind: PortKind::HostBridge,
                acs: Acs::Absent,
                ..Function::bare(Bdf::new(0, (h * 0x40) as u8, 0, 0).unwrap())
            },
            parent: None,
            kind_known: true,
        });
    }
    let host_bridges = (0..hosts)
        .map(|h| HostBridge {
            root: BusId {
                domain: 0,
                bus: (h * 0x40) as u8,
            },
            numa_node: Some(h as u32 / 2),
        })
        .collect();
    let host = HostInfo {
        cpu_vendor: Some(if amd { "AuthenticAMD" } else { "GenuineIntel" }.into()),
        cpu_family: Some(if amd { 0x19 } else { 6 }),
        iommu: Some(true),
        ..HostInfo::default()
    };
    Topology::build("random", host, host_bridges, specs, Gaps::default()).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PEERDMA_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn verdicts_are_symmetric_and_never_bus_address_across_acs_redirect((nodes, hb_id, amd) in arb_nodes()) {
        let t = build(&nodes, hb_id, amd);
        let ids: Vec<FnId> = t.ids().collect();
        let m = Matrix::build(&t, &ids);
        for (i, &a) in ids.iter().enumerate() {
            for (j, &b) in ids.iter().enumerate() {
                let v = calc_map_type_and_dist(&t, a, b);
                let w = calc_map_type_and_dist(&t, b, a);
                // Symmetric: map type, distance, certainty and the set of redirecting ports.
                prop_assert_eq!(v.map_type, w.map_type);
                prop_assert_eq!(v.distance, w.distance);
                prop_assert_eq!(v.uncertain(), w.uncertain());
                let mut x = v.acs_redirect.clone();
                let mut y = w.acs_redirect.clone();
                x.sort();
                y.sort();
                prop_assert_eq!(x, y);
                // Distance 0 exactly for the same function.
                prop_assert_eq!(v.distance == 0, a == b);
                // Never a bus address across a redirecting port on the walk to the common bridge.
                if v.map_type == MapType::BusAddr {
                    let c = t.lookup(v.common_bridge.unwrap()).unwrap();
                    for side in [a, b] {
                        for id in t.upstream_path(side) {
                            prop_assert_ne!(t.function(id).acs.redirects(), Some(true));
                            if id == c { break; }
                        }
                    }
                }
                // AMD Zen never refuses.
                if amd {
                    prop_assert_ne!(v.map_type, MapType::NotSupported);
                }
                let cell = m.get(i, j);
                prop_assert_eq!((cell.map_type, cell.distance, cell.uncertain), (v.map_type, v.distance, v.uncertain()));
                prop_assert_eq!(cell.level, peerdma::fabric::topo_level(&t, a, b));
            }
        }
    }
}
