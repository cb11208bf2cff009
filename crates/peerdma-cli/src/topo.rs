//! `peerdma topo`: load a topology from one source, then print the devices, the
//! `nvidia-smi topo -m` matrix, the kernel's verdict matrix, or one pair explained.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use peerdma::fabric::import::{file, lspci, sysfs};
use peerdma::fabric::{
    calc_map_type_and_dist, path_bandwidth, preset, topo_level, Acs, DeviceClass, FnId, MapType,
    Matrix, PortKind, TopoLevel, Topology,
};
use serde::Serialize;

/// Where the topology comes from and what to show of it.
#[derive(Args)]
pub struct TopoArgs {
    /// Read a sysfs snapshot rooted at DIR (holding sys/ and proc/) instead of this machine.
    #[arg(long, value_name = "DIR", group = "source")]
    sysfs: Option<PathBuf>,
    /// Read `lspci -tv` or `lspci -tvnn` output from FILE, or `-` for stdin.
    #[arg(long, value_name = "FILE|-", group = "source")]
    lspci: Option<String>,
    /// Read a TOML topology file (docs/topology.md).
    #[arg(long, value_name = "TOPO.toml", group = "source")]
    file: Option<PathBuf>,
    /// Use a built-in machine: workstation, dgx, dgx-acs, q35.
    #[arg(long, value_name = "NAME", group = "source")]
    preset: Option<String>,
    /// Print JSON (docs/json.md) instead of text.
    #[arg(long)]
    json: bool,
    /// Only these device classes in the matrices: gpu, nic, nvme, storage, bridge, other.
    /// Default: gpu, nic, nvme, storage.
    #[arg(long, value_delimiter = ',', value_name = "CLASS,...")]
    class: Vec<String>,
    /// Explain the path and verdict between two functions (provider, then client).
    #[arg(long, num_args = 2, value_names = ["A", "B"])]
    explain: Option<Vec<String>>,
    /// Write a sysfs snapshot to DIR (readable with --sysfs DIR): of this machine, or of
    /// the topology another source option names.
    #[arg(long, value_name = "DIR")]
    save: Option<PathBuf>,
    /// Print the topology as a TOML file (docs/topology.md) instead of the report.
    #[arg(long, conflicts_with_all = ["json", "explain"])]
    toml: bool,
}

pub fn run(args: &TopoArgs) -> Result<()> {
    if let Some(dir) = &args.save {
        let n = sysfs::save(std::path::Path::new("/"), dir)
            .with_context(|| format!("saving a sysfs snapshot to {}", dir.display()))?;
        println!(
            "saved {n} PCI functions to {} (read it back with --sysfs {0})",
            dir.display()
        );
        return Ok(());
    }
    let topo = load(args)?;
    if args.toml {
        print!("{}", file::to_toml(&topo));
        return Ok(());
    }
    if let Some(pair) = &args.explain {
        let a = topo.find(&pair[0])?;
        let b = topo.find(&pair[1])?;
        let e = explain(&topo, a, b);
        if args.json {
            println!("{}", serde_json::to_string_pretty(&e)?);
        } else {
            print_explain(&topo, &e);
        }
        return Ok(());
    }
    let classes = parse_classes(&args.class)?;
    let ids = select(&topo, &classes);
    let report = Report::new(&topo, &ids);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&topo, &report, &classes);
    }
    Ok(())
}

fn load(args: &TopoArgs) -> Result<Topology> {
    Ok(if let Some(dir) = &args.sysfs {
        sysfs::read(dir)?
    } else if let Some(src) = &args.lspci {
        let text = if src == "-" {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading lspci text from stdin")?;
            s
        } else {
            std::fs::read_to_string(src).with_context(|| format!("reading {src}"))?
        };
        lspci::parse(src, &text)?
    } else if let Some(path) = &args.file {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        file::parse(&path.display().to_string(), &text)?
    } else if let Some(name) = &args.preset {
        preset(name)?
    } else {
        peerdma::fabric::read_live().context(
            "reading this machine's PCI devices from /sys (use --preset, --file, --lspci or --sysfs elsewhere)",
        )?
    })
}

fn parse_classes(names: &[String]) -> Result<Vec<DeviceClass>> {
    if names.is_empty() {
        return Ok(vec![
            DeviceClass::Gpu,
            DeviceClass::Nic,
            DeviceClass::Nvme,
            DeviceClass::Storage,
        ]);
    }
    names
        .iter()
        .map(|n| {
            DeviceClass::parse(n).with_context(|| {
                let known: Vec<&str> = DeviceClass::NAMES.iter().map(|(n, _)| *n).collect();
                format!("unknown class `{n}`; the classes are {}", known.join(", "))
            })
        })
        .collect()
}

/// Functions shown in the matrices: endpoints of the chosen classes (bridges only when
/// `bridge` is asked for).
fn select(topo: &Topology, classes: &[DeviceClass]) -> Vec<FnId> {
    topo.ids()
        .filter(|&id| {
            let f = topo.function(id);
            let c = f.device_class();
            classes.contains(&c) && (f.kind == PortKind::Endpoint || c == DeviceClass::Bridge)
        })
        .collect()
}

#[derive(Serialize)]
struct DeviceRow {
    label: String,
    bdf: String,
    class: &'static str,
    kind: PortKind,
    id: String,
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
}

#[derive(Serialize)]
struct HostBridgeRow {
    root: String,
    numa_node: Option<u32>,
    id: Option<String>,
    allowlisted: bool,
}

#[derive(Serialize)]
struct Report {
    schema: &'static str,
    source: String,
    cpu_vendor: Option<String>,
    cpu_family: Option<u32>,
    cpu_supports_p2pdma: bool,
    iommu: Option<bool>,
    not_read: Vec<String>,
    host_bridges: Vec<HostBridgeRow>,
    devices: Vec<DeviceRow>,
    pairs: Vec<PairRow>,
    #[serde(skip)]
    matrix: Matrix,
}

impl Report {
    fn new(topo: &Topology, ids: &[FnId]) -> Self {
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
                    id: format!("{:04x}:{:04x}", f.vendor, f.device),
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
                });
            }
        }
        let host_bridges = (0..topo.host_bridges().len())
            .map(|h| {
                let f = topo.host_bridge_function(h);
                HostBridgeRow {
                    root: topo.host_bridges()[h].root.to_string(),
                    numa_node: topo.host_bridges()[h].numa_node,
                    id: f.map(|f| format!("{:04x}:{:04x}", f.vendor, f.device)),
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
            cpu_supports_p2pdma: topo.host().cpu_supports_p2pdma(),
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

fn print_report(topo: &Topology, r: &Report, classes: &[DeviceClass]) {
    println!(
        "{}: {} functions below {} host bridge(s)",
        r.source,
        topo.functions().len(),
        topo.host_bridges().len()
    );
    println!(
        "CPU: {} family {}{}   IOMMU: {}",
        r.cpu_vendor.as_deref().unwrap_or("unknown"),
        r.cpu_family.map_or("?".to_string(), |f| format!("{f:#x}")),
        if r.cpu_supports_p2pdma {
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
        println!(
            "Host bridge {}: NUMA {}, 00.0 = {}{}",
            hb.root,
            opt(hb.numa_node),
            hb.id.as_deref().unwrap_or("none"),
            if hb.allowlisted {
                " (on the P2PDMA allowlist)"
            } else {
                ""
            }
        );
    }
    for n in &r.not_read {
        println!("Not read: {n}");
    }
    println!();
    if r.devices.is_empty() {
        let names: Vec<&str> = classes.iter().map(|c| c.name()).collect();
        println!(
            "No endpoints of class {} here; try --class other or --class bridge.",
            names.join(",")
        );
        return;
    }
    println!(
        "{:<4} {:<14} {:<7} {:<5} {:<34} NAME",
        "", "BDF", "CLASS", "NUMA", "LINK"
    );
    for d in &r.devices {
        println!(
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
        print!("{:<6}", "");
        for d in &r.devices {
            print!("{:>width$}", d.label);
        }
    };
    println!("\nnvidia-smi topo -m view:");
    header();
    println!("{:>8}", "NUMA");
    for i in 0..n {
        print!("{:<6}", r.devices[i].label);
        for j in 0..n {
            print!("{:>width$}", r.matrix.get(i, j).level.to_string());
        }
        println!("{:>8}", opt(r.devices[i].numa_node));
    }
    println!("\nLegend:");
    for (l, text) in TopoLevel::LEGEND {
        println!("  {:<5} = {text}", l.to_string());
    }
    println!("\nKernel P2PDMA verdict, provider row to client column (map type, distance):");
    let width = 8;
    print!("{:<6}", "");
    for d in &r.devices {
        print!("{:>width$}", d.label);
    }
    println!();
    let mut any_uncertain = false;
    for i in 0..n {
        print!("{:<6}", r.devices[i].label);
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
            print!("{cell:>width$}");
        }
        println!();
    }
    println!("\nLegend:");
    println!("  BUS n = by PCI bus address through a common switch or port, distance n (PCI_P2PDMA_MAP_BUS_ADDR)");
    println!("  HB n  = through the host bridge, by IOVA or physical address (PCI_P2PDMA_MAP_THRU_HOST_BRIDGE)");
    println!("  --    = not supported: the host bridge is not known to forward peer traffic");
    if any_uncertain {
        println!("  ?     = uncertain: rests on ACS or CPU state that could not be read");
    }
    println!("Ask why with: peerdma topo --explain A B (BDFs)");
}

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
struct Explain {
    schema: &'static str,
    provider: String,
    client: String,
    walk: Vec<HopRow>,
    common_bridge: Option<String>,
    level: TopoLevel,
    verdict: peerdma::fabric::Verdict,
    reason: String,
    uncertain: bool,
    bandwidth: peerdma::fabric::PathBandwidth,
    to_get_bus_address: Vec<String>,
}

fn explain(topo: &Topology, a: FnId, b: FnId) -> Explain {
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
        MapType::BusAddr if v.uncertain() => advice.push(
            "Already a bus-address path if no port on it redirects; read ACS as root (sudo peerdma topo) to be sure."
                .to_string(),
        ),
        MapType::BusAddr => advice.push("Nothing: this pair already uses bus addresses.".to_string()),
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
        reason: v.reason(),
        uncertain: v.uncertain(),
        bandwidth: path_bandwidth(topo, a, b, via_hb),
        verdict: v,
        to_get_bus_address: advice,
    }
}

fn print_explain(topo: &Topology, e: &Explain) {
    println!(
        "{}: {} (provider) -> {} (client)",
        topo.source(),
        e.provider,
        e.client
    );
    println!("\nPath, provider side up, then client side down:");
    for h in &e.walk {
        let marker = match h.side {
            "common" => "* ",
            "host" => "# ",
            _ => "  ",
        };
        if h.side == "host" {
            println!("{marker}{}", h.bdf);
            continue;
        }
        println!(
            "{marker}{:<14} {:<23} {:<34} {:<22} {}",
            h.bdf,
            h.kind.to_string(),
            h.link.as_deref().unwrap_or("link -"),
            h.acs.to_string(),
            h.name
        );
    }
    println!("  (* common upstream bridge, # host bridge crossed)");
    println!(
        "\nKernel verdict: {}, distance {}{}",
        e.verdict.map_type,
        e.verdict.distance,
        if e.uncertain { " (UNCERTAIN)" } else { "" }
    );
    println!("Why: {}", e.reason);
    println!("nvidia-smi topo level: {}", e.level);
    match (e.bandwidth.bottleneck, e.bandwidth.bottleneck_gbytes_per_s) {
        (Some(i), Some(g)) => {
            let h = &e.bandwidth.hops[i];
            println!(
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
        _ => println!("Bottleneck: unknown (no link speeds in this source)"),
    }
    println!("\nTo get a bus-address path:");
    for a in &e.to_get_bus_address {
        println!("  - {a}");
    }
}
