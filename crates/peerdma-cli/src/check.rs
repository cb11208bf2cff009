//! `peerdma check`: is this machine (or a snapshot, a preset, a topology file) ready for
//! peer-to-peer DMA, and if not, exactly why. See `peerdma::check` and docs/check.md.

use anyhow::Result;
use clap::Args;
use peerdma::check::{check, CheckReport, PairCheck};
use peerdma::fabric::MapType;

use crate::topo::{load, SourceArgs};

/// What to check and how to say it.
#[derive(Args)]
pub struct CheckArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// Check this pair (provider, then client; BDFs); may be repeated. Without it, every
    /// GPU-NVMe, GPU-NIC, NVMe-NVMe, GPU-GPU and NIC-NVMe pair is checked and the
    /// GPU-NVMe and GPU-NIC ones decide the exit status.
    #[arg(long, num_args = 2, value_names = ["A", "B"], action = clap::ArgAction::Append)]
    pair: Vec<String>,
    /// Print JSON (docs/json.md, schema peerdma-check/1) instead of text.
    #[arg(long)]
    json: bool,
    /// Print only problems: pairs that cannot do P2P, warnings and what could not be read.
    #[arg(long, conflicts_with = "json")]
    quiet: bool,
}

/// Runs the check; `Ok(false)` when some deciding pair cannot do P2P (exit status 1).
pub fn run(args: &CheckArgs) -> Result<bool> {
    let topo = load(&args.source)?;
    let mut pairs = Vec::new();
    for ab in args.pair.chunks(2) {
        pairs.push((topo.find(&ab[0])?, topo.find(&ab[1])?));
    }
    let report = check(&topo, (!pairs.is_empty()).then_some(pairs.as_slice()));
    if args.json {
        peerdma_cli::outln!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_text(&report, args.quiet);
    }
    Ok(report.ok)
}

fn human(bytes: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (1 << 40, "TiB"),
        (1 << 30, "GiB"),
        (1 << 20, "MiB"),
        (1 << 10, "KiB"),
    ];
    for (u, name) in UNITS {
        if bytes >= u && bytes.is_multiple_of(u) {
            return format!("{} {name}", bytes / u);
        }
    }
    format!("{bytes} bytes")
}

fn map(m: MapType) -> &'static str {
    match m {
        MapType::BusAddr => "bus address",
        MapType::ThruHostBridge => "host bridge",
        MapType::NotSupported => "not supported",
    }
}

fn status(p: &PairCheck) -> &'static str {
    match p.status {
        "ok" => "OK",
        "not-supported" => "NS (kernel)",
        "chipset-not-supported" => "CNS (chipset)",
        _ => "U (unknown)",
    }
}

fn print_text(r: &CheckReport, quiet: bool) {
    let k = &r.kernel;
    if !quiet {
        peerdma_cli::outln!("peerdma check: {}", r.source);
        peerdma_cli::outln!("\nKernel");
        peerdma_cli::outln!("  release   {}", k.release.as_deref().unwrap_or("unknown"));
        peerdma_cli::outln!(
            "  config    {}",
            k.config_source
                .as_deref()
                .map_or("unknown".to_string(), |s| format!("from {s}"))
        );
        for c in &k.config {
            peerdma_cli::outln!(
                "    {:<27} {:<3} {}",
                c.option,
                c.state.as_deref().unwrap_or("?"),
                c.meaning
            );
        }
        let iommu = match k.iommu {
            Some(m) => m.to_string(),
            None => "unknown".to_string(),
        };
        let types: Vec<String> = k
            .iommu_group_types
            .iter()
            .map(|g| format!("{} group(s) {}", g.groups, g.kind))
            .collect();
        peerdma_cli::outln!(
            "  IOMMU     {iommu}{}",
            if types.is_empty() {
                String::new()
            } else {
                format!(" ({})", types.join(", "))
            }
        );
        if !k.cmdline_options.is_empty() {
            peerdma_cli::outln!("  cmdline   {}", k.cmdline_options.join(" "));
        }
        peerdma_cli::outln!("\nP2P memory providers");
        if r.providers.is_empty() {
            peerdma_cli::outln!(
                "  none shown (no p2pmem/ in sysfs, no NVMe controller memory buffer)"
            );
        }
        for p in &r.providers {
            let size = p.size.map_or(String::new(), |s| format!(" {}", human(s)));
            let avail = p
                .available
                .map_or(String::new(), |a| format!(", {} available", human(a)));
            peerdma_cli::outln!("  {} {}{size}{avail}: {}", p.bdf, p.kind, p.status);
        }
    } else if k.p2pdma == Some(false) {
        peerdma_cli::outln!(
            "kernel {}: no CONFIG_PCI_P2PDMA (or CONFIG_ZONE_DEVICE)",
            k.release.as_deref().unwrap_or("?")
        );
    }
    if !quiet {
        peerdma_cli::outln!(
            "\nPairs (provider <-> client: kernel verdict, distance, nvidia-smi level, P2P status)"
        );
        if r.pairs.is_empty() {
            peerdma_cli::outln!("  none: no GPU, NVMe drive or NIC pair to check");
        }
    }
    for p in &r.pairs {
        let problem = !p.ok() || !p.warnings.is_empty();
        if quiet && !problem {
            continue;
        }
        peerdma_cli::outln!(
            "  {:<8} {} <-> {}  {}, {}, {}{}  {}",
            p.kind,
            p.a,
            p.b,
            map(p.map_type),
            p.distance,
            p.level,
            if p.level_uncertain { "?" } else { "" },
            status(p)
        );
        if !p.ok() {
            peerdma_cli::outln!("      why: {}", p.reason);
        }
        for w in &p.warnings {
            peerdma_cli::outln!("      warning: {w}");
        }
        for f in &p.fixes {
            peerdma_cli::outln!("      fix: {f}");
        }
    }
    if !r.affinity.is_empty() {
        let show: Vec<_> = r
            .affinity
            .iter()
            .filter(|a| !quiet || !a.warnings.is_empty())
            .collect();
        if !show.is_empty() {
            peerdma_cli::outln!("\nAffinity (closest by the kernel's distance)");
        }
        for a in show {
            let list = |v: &[peerdma::check::Nearest]| {
                if v.is_empty() {
                    "none".to_string()
                } else {
                    v.iter()
                        .map(|n| {
                            format!(
                                "{} ({}, {}, {})",
                                n.bdf,
                                n.distance,
                                n.level,
                                map(n.map_type)
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            };
            peerdma_cli::outln!(
                "  GPU {}: NIC {}; NVMe {}",
                a.gpu,
                list(&a.nics),
                list(&a.nvme)
            );
            for w in &a.warnings {
                peerdma_cli::outln!("      warning: {w}");
            }
        }
    }
    if !r.not_read.is_empty() {
        peerdma_cli::outln!("\nNot read");
        for n in &r.not_read {
            peerdma_cli::outln!("  {n}");
        }
    }
    let deciding: Vec<&PairCheck> = r
        .pairs
        .iter()
        .filter(|p| r.decided_by == "requested" || p.kind == "gpu-nvme" || p.kind == "gpu-nic")
        .collect();
    let good = deciding.iter().filter(|p| p.ok()).count();
    if k.p2pdma == Some(false) {
        peerdma_cli::outln!(
            "\nThe kernel cannot do P2PDMA: it lacks CONFIG_PCI_P2PDMA (or CONFIG_ZONE_DEVICE)."
        );
    }
    peerdma_cli::outln!(
        "\nResult: {good} of {} {} can do P2P{}",
        deciding.len(),
        if r.decided_by == "requested" {
            "requested pair(s)"
        } else {
            "GPU-NVMe/NIC pair(s)"
        },
        if r.ok { "" } else { " (exit status 1)" }
    );
}
