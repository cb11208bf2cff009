//! The report of `peerdma topo`: devices, the `nvidia-smi topo -m` matrix and the
//! kernel's verdict matrix, as text or as the `peerdma-topo/1` JSON of docs/json.md.

use peerdma::fabric::{Acs, DeviceClass, FnId, MapType, Matrix, PortKind, TopoLevel, Topology};
use serde::Serialize;

#[derive(Serialize)]
struct DeviceRow {
    label: String,
    bdf: String,
    class: &'static str,
    kind: PortKind,
    /// `vendor:device`; null when the source does not give it.
    id: Option<String>,
    name: String,
    numa_node: Option<u32>,
    link: Option<String>,
    acs: Acs,
    iommu_group: Option<u32>,
    host_bridge: String,
}

#[derive(Serialize)]
struct PairRow {
    provider: String,
    client: String,
    level: TopoLevel,
    map_type: MapType,
    distance: u32,
    uncertain: bool,
    /// NODE only because a NUMA node is unknown: it may be SYS.
    level_uncertain: bool,
}

#[derive(Serialize)]
struct HostBridgeRow {
    root: String,
    numa_node: Option<u32>,
    /// Its 00.0 function's `vendor:device`; null when there is none or its id is
    /// unknown.
    id: Option<String>,
    allowlisted: bool,
    /// Whether the root bus has a 00.0 function (for the text report).
    #[serde(skip)]
    function: bool,
}

#[derive(Serialize)]
pub struct Report {
    schema: &'static str,
    source: String,
    cpu_vendor: Option<String>,
    cpu_family: Option<u32>,
    /// `null` when the CPU is unknown: the kernel's answer depends on it.
    cpu_supports_p2pdma: Option<bool>,
    iommu: Option<bool>,
    not_read: Vec<String>,
    host_bridges: Vec<HostBridgeRow>,
    devices: Vec<DeviceRow>,
    pairs: Vec<PairRow>,
    #[serde(skip)]
    matrix: Matrix,
}

impl Report {
    pub fn new(topo: &Topology, ids: &[FnId]) -> Self {
        let matrix = Matrix::build(topo, ids);
        let label = |i: usize| format!("D{i}");
        let devices = ids
            .iter()
            .enumerate()
            .map(|(i, &id)| {
                let f = topo.function(id);
                DeviceRow {
                    label: label(i),
                    bdf: f.bdf.to_string(),
                    class: f.device_class().name(),
                    kind: f.kind,
                    id: f.id(),
                    name: f.name.clone(),
                    numa_node: topo.numa_node(id),
                    link: f.link.map(|l| l.to_string()),
                    acs: f.acs,
                    iommu_group: f.iommu_group,
                    host_bridge: topo.host_bridges()[topo.host_bridge_of(id)]
                        .root
                        .to_string(),
                }
            })
            .collect();
        let mut pairs = Vec::new();
        for (i, &a) in ids.iter().enumerate() {
            for (j, &b) in ids.iter().enumerate() {
                let c = matrix.get(i, j);
                pairs.push(PairRow {
                    provider: topo.function(a).bdf.to_string(),
                    client: topo.function(b).bdf.to_string(),
                    level: c.level,
                    map_type: c.map_type,
                    distance: c.distance,
                    uncertain: c.uncertain,
                    level_uncertain: c.level_uncertain,
                });
            }
        }
        let host_bridges = (0..topo.host_bridges().len())
            .map(|h| {
                let f = topo.host_bridge_function(h);
                HostBridgeRow {
                    root: topo.host_bridges()[h].root.to_string(),
                    numa_node: topo.host_bridges()[h].numa_node,
                    id: f.and_then(|f| f.id()),
                    function: f.is_some(),
                    allowlisted: f.is_some_and(|f| {
                        peerdma::fabric::HOST_BRIDGE_ALLOWLIST
                            .iter()
                            .any(|e| e.vendor == f.vendor && e.device == f.device)
                    }),
                }
            })
            .collect();
        Report {
            schema: "peerdma-topo/1",
            source: topo.source().to_string(),
            cpu_vendor: topo.host().cpu_vendor.clone(),
            cpu_family: topo.host().cpu_family,
            cpu_supports_p2pdma: {
                // The kernel's answer depends on the vendor, and for AMD on the family.
                let h = topo.host();
                let amd = h.cpu_vendor.as_deref() == Some("AuthenticAMD");
                (h.cpu_vendor.is_some() && (!amd || h.cpu_family.is_some()))
                    .then(|| h.cpu_supports_p2pdma())
            },
            iommu: topo.host().iommu,
            not_read: not_read(topo),
            host_bridges,
            devices,
            pairs,
            matrix,
        }
    }
}

fn not_read(topo: &Topology) -> Vec<String> {
    let g = topo.gaps();
    let mut out = g.notes.clone();
    if g.acs_unknown > 0 && !out.iter().any(|n| n.contains("ACS")) {
        out.push(format!(
            "ACS unknown for {} of {} functions",
            g.acs_unknown,
            topo.functions().len()
        ));
    }
    if g.numa_unknown && !out.iter().any(|n| n.contains("NUMA")) {
        out.push("NUMA nodes unknown: NODE and SYS cannot be told apart".to_string());
    }
    if g.cpu_unknown && !out.iter().any(|n| n.contains("CPU")) {
        out.push("CPU unknown: the AMD Zen rule cannot be applied".to_string());
    }
    out
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

pub fn print_report(topo: &Topology, r: &Report, classes: &[DeviceClass]) {
    peerdma_cli::outln!(
        "{}: {} functions below {} host bridge(s)",
        r.source,
        topo.functions().len(),
        topo.host_bridges().len()
    );
    peerdma_cli::outln!(
        "CPU: {} family {}{}   IOMMU: {}",
        r.cpu_vendor.as_deref().unwrap_or("unknown"),
        r.cpu_family.map_or("?".to_string(), |f| format!("{f:#x}")),
        if r.cpu_supports_p2pdma == Some(true) {
            " (AMD Zen or newer: any host bridge forwards P2P)"
        } else {
            ""
        },
        match r.iommu {
            Some(true) => "on",
            Some(false) => "off",
            None => "unknown",
        }
    );
    for hb in &r.host_bridges {
        peerdma_cli::outln!(
            "Host bridge {}: NUMA {}, 00.0 = {}{}",
            hb.root,
            opt(hb.numa_node),
            match (&hb.id, hb.function) {
                (Some(id), _) => id.as_str(),
                (None, true) => "id unknown",
                (None, false) => "none",
            },
            if hb.allowlisted {
                " (on the P2PDMA allowlist)"
            } else {
                ""
            }
        );
    }
    for n in &r.not_read {
        // What an importer recovered is read, not missing: say it as such.
        match n.strip_prefix("recovered ") {
            Some(what) => peerdma_cli::outln!("Recovered: {what}"),
            None => peerdma_cli::outln!("Not read: {n}"),
        }
    }
    peerdma_cli::outln!();
    if r.devices.is_empty() {
        let names: Vec<&str> = classes.iter().map(|c| c.name()).collect();
        peerdma_cli::outln!(
            "No endpoints of class {} here; try --class other or --class bridge.",
            names.join(",")
        );
        return;
    }
    peerdma_cli::outln!(
        "{:<4} {:<14} {:<7} {:<5} {:<34} NAME",
        "",
        "BDF",
        "CLASS",
        "NUMA",
        "LINK"
    );
    for d in &r.devices {
        peerdma_cli::outln!(
            "{:<4} {:<14} {:<7} {:<5} {:<34} {}",
            d.label,
            d.bdf,
            d.class,
            opt(d.numa_node),
            d.link.as_deref().unwrap_or("-"),
            d.name
        );
    }
    let n = r.devices.len();
    let width = 6;
    let header = || {
        peerdma_cli::outp!("{:<6}", "");
        for d in &r.devices {
            peerdma_cli::outp!("{:>width$}", d.label);
        }
    };
    peerdma_cli::outln!("\nnvidia-smi topo -m view:");
    header();
    peerdma_cli::outln!("{:>8}", "NUMA");
    let mut any_level_uncertain = false;
    for i in 0..n {
        peerdma_cli::outp!("{:<6}", r.devices[i].label);
        for j in 0..n {
            let c = r.matrix.get(i, j);
            any_level_uncertain |= c.level_uncertain;
            let mark = if c.level_uncertain { "?" } else { "" };
            peerdma_cli::outp!("{:>width$}", format!("{}{mark}", c.level));
        }
        peerdma_cli::outln!("{:>8}", opt(r.devices[i].numa_node));
    }
    peerdma_cli::outln!("\nLegend:");
    for (l, text) in TopoLevel::LEGEND {
        peerdma_cli::outln!("  {:<5} = {text}", l.to_string());
    }
    if any_level_uncertain {
        peerdma_cli::outln!("  NODE? = uncertain: a NUMA node is unknown, so this may be SYS");
    }
    peerdma_cli::outln!(
        "\nKernel P2PDMA verdict, provider row to client column (map type, distance):"
    );
    let width = 8;
    peerdma_cli::outp!("{:<6}", "");
    for d in &r.devices {
        peerdma_cli::outp!("{:>width$}", d.label);
    }
    peerdma_cli::outln!();
    let mut any_uncertain = false;
    for i in 0..n {
        peerdma_cli::outp!("{:<6}", r.devices[i].label);
        for j in 0..n {
            let c = r.matrix.get(i, j);
            let kind = match c.map_type {
                MapType::BusAddr => "BUS",
                MapType::ThruHostBridge => "HB",
                MapType::NotSupported => "--",
            };
            let mark = if c.uncertain { "?" } else { "" };
            any_uncertain |= c.uncertain;
            let cell = if c.map_type == MapType::NotSupported {
                format!("--{mark}")
            } else {
                format!("{kind} {}{mark}", c.distance)
            };
            peerdma_cli::outp!("{cell:>width$}");
        }
        peerdma_cli::outln!();
    }
    peerdma_cli::outln!("\nLegend:");
    peerdma_cli::outln!("  BUS n = by PCI bus address through a common switch or port, distance n (PCI_P2PDMA_MAP_BUS_ADDR)");
    peerdma_cli::outln!("  HB n  = through the host bridge, by IOVA or physical address (PCI_P2PDMA_MAP_THRU_HOST_BRIDGE)");
    peerdma_cli::outln!(
        "  --    = not supported: the host bridge is not known to forward peer traffic"
    );
    if any_uncertain {
        peerdma_cli::outln!(
            "  ?     = uncertain: rests on ACS or CPU state that could not be read"
        );
    }
    peerdma_cli::outln!("Ask why with: peerdma topo --explain A B (BDFs)");
}
