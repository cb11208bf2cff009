//! `peerdma topo --explain A B`: one pair's path hop by hop, the verdict and why, and
//! what would give a bus-address path (`peerdma-explain/1` JSON in docs/json.md).

use peerdma::fabric::{
    calc_map_type_and_dist, path_bandwidth, topo_level, topo_level_uncertain, Acs, FnId, MapType,
    PortKind, TopoLevel, Topology,
};
use serde::Serialize;

#[derive(Serialize)]
struct HopRow {
    bdf: String,
    kind: PortKind,
    name: String,
    link: Option<String>,
    acs: Acs,
    side: &'static str,
}

#[derive(Serialize)]
pub struct Explain {
    schema: &'static str,
    provider: String,
    client: String,
    walk: Vec<HopRow>,
    common_bridge: Option<String>,
    level: TopoLevel,
    /// NODE only because a NUMA node is unknown: it may be SYS.
    level_uncertain: bool,
    verdict: peerdma::fabric::Verdict,
    reason: String,
    uncertain: bool,
    bandwidth: peerdma::fabric::PathBandwidth,
    to_get_bus_address: Vec<String>,
}

pub fn explain(topo: &Topology, a: FnId, b: FnId) -> Explain {
    let v = calc_map_type_and_dist(topo, a, b);
    let pa = topo.upstream_path(a);
    let pb = topo.upstream_path(b);
    let common = v.common_bridge.and_then(|c| topo.lookup(c));
    let row = |id: FnId, side| {
        let f = topo.function(id);
        HopRow {
            bdf: f.bdf.to_string(),
            kind: f.kind,
            name: f.name.clone(),
            link: f.link.map(|l| l.to_string()),
            acs: f.acs,
            side,
        }
    };
    let mut walk = Vec::new();
    for &id in &pa {
        walk.push(row(
            id,
            if Some(id) == common {
                "common"
            } else {
                "provider"
            },
        ));
        if Some(id) == common {
            break;
        }
    }
    if common.is_none() {
        walk.push(HopRow {
            bdf: format!(
                "host bridge {}",
                topo.host_bridges()[topo.host_bridge_of(a)].root
            ),
            kind: PortKind::HostBridge,
            name: String::new(),
            link: None,
            acs: Acs::Unknown,
            side: "host",
        });
        if topo.host_bridge_of(a) != topo.host_bridge_of(b) {
            walk.push(HopRow {
                bdf: format!(
                    "host bridge {}",
                    topo.host_bridges()[topo.host_bridge_of(b)].root
                ),
                kind: PortKind::HostBridge,
                name: String::new(),
                link: None,
                acs: Acs::Unknown,
                side: "host",
            });
        }
    }
    let down: Vec<FnId> = pb
        .iter()
        .copied()
        .take_while(|&id| Some(id) != common)
        .collect();
    for &id in down.iter().rev() {
        walk.push(row(id, "client"));
    }
    let mut advice = Vec::new();
    match v.map_type {
        MapType::BusAddr if v.uncertain() => advice.push(format!(
            "Already a bus-address path if no port on it redirects; to be sure, learn ACS: {}.",
            if v.acs_hint.is_empty() {
                "the source does not give it"
            } else {
                v.acs_hint
            }
        )),
        MapType::BusAddr => {
            advice.push("Nothing: this pair already uses bus addresses.".to_string())
        }
        _ => {
            if let Some(p) = v.acs_advice() {
                advice.push(format!(
                    "Clear ACS redirect on the listed ports: boot with `{p}` (at the cost of the isolation ACS gives IOMMU groups)."
                ));
            }
            if v.common_bridge.is_none() {
                advice.push(
                    "Put both devices below one PCIe switch (or one root port): they share no upstream bridge."
                        .to_string(),
                );
            }
            if v.map_type == MapType::NotSupported {
                advice.push(
                    "Or run on a host bridge the kernel allowlists (Intel Skylake-SP and later) or an AMD Zen CPU, which at least allows the host-bridge path."
                        .to_string(),
                );
            }
        }
    }
    let via_hb = v.map_type != MapType::BusAddr;
    Explain {
        schema: "peerdma-explain/1",
        provider: topo.function(a).bdf.to_string(),
        client: topo.function(b).bdf.to_string(),
        walk,
        common_bridge: v.common_bridge.map(|c| c.to_string()),
        level: topo_level(topo, a, b),
        level_uncertain: topo_level_uncertain(topo, a, b),
        reason: v.reason(),
        uncertain: v.uncertain(),
        bandwidth: path_bandwidth(topo, a, b, via_hb),
        verdict: v,
        to_get_bus_address: advice,
    }
}

pub fn print_explain(topo: &Topology, e: &Explain) {
    peerdma_cli::outln!(
        "{}: {} (provider) -> {} (client)",
        topo.source(),
        e.provider,
        e.client
    );
    peerdma_cli::outln!("\nPath, provider side up, then client side down:");
    for h in &e.walk {
        let marker = match h.side {
            "common" => "* ",
            "host" => "# ",
            _ => "  ",
        };
        if h.side == "host" {
            peerdma_cli::outln!("{marker}{}", h.bdf);
            continue;
        }
        peerdma_cli::outln!(
            "{marker}{:<14} {:<23} {:<34} {:<22} {}",
            h.bdf,
            h.kind.to_string(),
            h.link.as_deref().unwrap_or("link -"),
            h.acs.to_string(),
            h.name
        );
    }
    peerdma_cli::outln!("  (* common upstream bridge, # host bridge crossed)");
    peerdma_cli::outln!(
        "\nKernel verdict: {}, distance {}{}",
        e.verdict.map_type,
        e.verdict.distance,
        if e.uncertain { " (UNCERTAIN)" } else { "" }
    );
    peerdma_cli::outln!("Why: {}", e.reason);
    peerdma_cli::outln!(
        "nvidia-smi topo level: {}{}",
        e.level,
        if e.level_uncertain {
            " (UNCERTAIN: a NUMA node is unknown, so it may be SYS)"
        } else {
            ""
        }
    );
    match (e.bandwidth.bottleneck, e.bandwidth.bottleneck_gbytes_per_s) {
        (Some(i), Some(g)) => {
            let h = &e.bandwidth.hops[i];
            peerdma_cli::outln!(
                "Bottleneck: {} <-> {} at {:.1} GB/s ({}){}",
                h.from,
                h.to,
                g,
                h.link.map_or(String::new(), |l| l.to_string()),
                if e.bandwidth.incomplete {
                    "; some links unknown"
                } else {
                    ""
                }
            );
        }
        _ => peerdma_cli::outln!("Bottleneck: unknown (no link speeds in this source)"),
    }
    peerdma_cli::outln!("\nTo get a bus-address path:");
    for a in &e.to_get_bus_address {
        peerdma_cli::outln!("  - {a}");
    }
}
