//! `peerdma run`: a scenario or a built-in job on an emulated host. With no argument it
//! runs the built-in scenario (scenarios/thread.scn, embedded): the 2016 thread's three
//! ways an RDMA NIC reaches memory a GPU moves. `peerdma run FILE` runs a scenario
//! file (docs/scenario.md). `peerdma run rdma` runs the RDMA job on the dgx preset: a
//! NIC writing into memory the GPU moves,
//! registered pinned, on-demand and through a dma-buf of VRAM, plus VRAM shared
//! between processes (the 2016 thread's cases). `peerdma run p2pmem` runs the
//! p2pmem-test copy on the workstation preset: drive A reads into drive B's
//! controller memory buffer mapped in a process, drive B writes it out, then the same
//! through host RAM. `peerdma run hmm` runs the HMM job: a process buffer mirrored into
//! a GPU, GPU work migrating it into VRAM under VRAM pressure, the CPU reading it back.
//! Every job checks every byte and says what moved where.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use peerdma::addr::Bdf;
use peerdma::drivers::rnic::RnicCaps;
use peerdma::fabric::import::file;
use peerdma::fabric::{preset, Topology};
use peerdma::host::{Host, HostConfig};
use peerdma::scenario::hmm_job::{self, HmmJobParams, HmmJobReport};
use peerdma::scenario::p2p_copy::{self, P2pCopyParams, P2pCopyReport};
use peerdma::scenario::rdma_job::{self, RdmaJobParams, RdmaJobReport};
use peerdma_cli::opts::{count, size};

/// What to run.
#[derive(Args)]
pub struct RunArgs {
    /// A scenario file (docs/scenario.md), or a built-in job: `rdma`, `p2pmem` or
    /// `hmm`. Without one, the built-in scenario (scenarios/thread.scn: the 2016
    /// thread's cases on a DGX). The options below, up to --json, are the jobs'.
    job: Option<PathBuf>,
    /// The machine: a preset name or a topology TOML file (default: dgx for `rdma`,
    /// workstation for the others).
    #[arg(long, requires = "job")]
    topology: Option<String>,
    /// Bytes per transfer (K, M suffixes allowed).
    #[arg(long, requires = "job", default_value = "1M", value_parser = size(4 << 10, 256 << 20))]
    chunk_size: u64,
    /// Transfers.
    #[arg(long, requires = "job", default_value = "64", value_parser = count(1, 4096))]
    chunks: u64,
    /// The drive to read from (default: the one closest to the target).
    #[arg(long, requires = "job")]
    source: Option<Bdf>,
    /// The drive whose CMB is used and which is written (default: the first with a
    /// published CMB).
    #[arg(long, requires = "job")]
    target: Option<Bdf>,
    /// Turn the IOMMU on or off (default: as the topology says).
    #[arg(long)]
    iommu: Option<bool>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Scenario files: also write a self-contained HTML report (the PCIe tree with the
    /// devices that moved data, DMA by path, a timeline, every step) to FILE.
    #[arg(long, value_name = "FILE.html")]
    report: Option<PathBuf>,
    /// HMM job: bytes of process memory the GPU works on.
    #[arg(long, requires = "job", default_value = "64M", value_parser = size(4 << 10, 64 << 30))]
    buffer_size: u64,
    /// VRAM per GPU (default: 32M for the HMM job, so the buffer puts it under
    /// pressure; what the topology says for the RDMA job).
    #[arg(long, requires = "job", value_parser = size(4 << 10, 1 << 40))]
    vram: Option<u64>,
    /// RDMA job: bytes per RDMA WRITE.
    #[arg(long, requires = "job", default_value = "1M", value_parser = size(4 << 10, 1 << 30))]
    message_size: u64,
    /// RDMA job: messages per case.
    #[arg(long, requires = "job", default_value = "8", value_parser = count(1, 4096))]
    messages: u64,
    /// HMM job: GPU passes over the buffer (VRAM is evicted between them).
    #[arg(long, requires = "job", default_value = "3", value_parser = clap::value_parser!(u32).range(1..=1000))]
    passes: u32,
    /// HMM job: the GPU to use (default: the first).
    #[arg(long, requires = "job")]
    gpu: Option<Bdf>,
}

fn load(topology: &str) -> Result<Topology> {
    let path = std::path::Path::new(topology);
    if path.exists() {
        let text = peerdma_cli::io::read_file(path)?;
        Ok(file::parse(topology, &text)?)
    } else if topology.contains(std::path::MAIN_SEPARATOR) || topology.ends_with(".toml") {
        // Meant as a file, not a preset name: say so.
        bail!("topology file {topology} does not exist")
    } else {
        Ok(preset(topology)?)
    }
}

pub fn run(args: &RunArgs) -> Result<()> {
    match args.job.as_ref().and_then(|p| p.to_str()) {
        None => run_scenario_text("thread.scn (built in)", DEFAULT_SCENARIO, args),
        Some("rdma") => run_rdma(args),
        Some("p2pmem") => run_p2pmem(args),
        Some("hmm") => run_hmm(args),
        _ => {
            let path = args.job.clone().unwrap_or_default();
            if !path.exists() {
                bail!(
                    "`{}` is neither a built-in job (rdma, p2pmem, hmm) nor a scenario file",
                    path.display()
                );
            }
            run_scenario(&path, args)
        }
    }
}

/// The scenario `peerdma run` runs without arguments: the 2016 thread's cases.
const DEFAULT_SCENARIO: &str = include_str!("../../../scenarios/thread.scn");

/// `peerdma run FILE`: checks the whole scenario first (exit 2 on any error, nothing
/// run), then runs it; exit 1 when an expectation fails or the host leaks.
fn run_scenario(path: &std::path::Path, args: &RunArgs) -> Result<()> {
    let vocab = peerdma::scenario::Vocabulary::standard();
    let plan =
        peerdma::scenario::load(path, &vocab).map_err(|d| peerdma_cli::Invalid(d.render()))?;
    run_plan(plan, &path.display().to_string(), args)
}

/// A scenario given as text (the built-in default): it includes nothing.
fn run_scenario_text(name: &str, text: &str, args: &RunArgs) -> Result<()> {
    let vocab = peerdma::scenario::Vocabulary::standard();
    let plan =
        peerdma::scenario::compile_text(name, text, &peerdma::scenario::lang::NoIncludes, &vocab)
            .map_err(|d| peerdma_cli::Invalid(d.render()))?;
    run_plan(plan, name, args)
}

fn run_plan(mut plan: peerdma::scenario::Plan, name: &str, args: &RunArgs) -> Result<()> {
    if let Some(on) = args.iommu {
        plan.machine.iommu = Some(on);
    }
    let report = plan.run().with_context(|| format!("scenario {name}"))?;
    if let Some(out) = &args.report {
        let page = crate::html::scenario(&plan.machine.topology, &report)?;
        std::fs::write(out, page).with_context(|| format!("writing {}", out.display()))?;
    }
    if args.json {
        let text = serde_json::to_string_pretty(&report)?;
        peerdma_cli::outln!("{text}");
    } else {
        peerdma_cli::outp!("{}", report.text());
    }
    if !report.passed {
        bail!("scenario {name} failed (see the report)");
    }
    Ok(())
}

/// `peerdma run p2pmem`.
fn run_p2pmem(args: &RunArgs) -> Result<()> {
    let topo = load(args.topology.as_deref().unwrap_or("workstation"))?;
    let capacity = (2 * args.chunk_size * args.chunks)
        .next_multiple_of(4096)
        .max(1 << 20);
    let specs = Host::nvme_specs(&topo, capacity);
    let host = build(
        topo,
        (args.chunk_size * 4).max(64 << 20),
        args.iommu,
        &specs,
    )?;
    let params = P2pCopyParams {
        chunk_size: args.chunk_size,
        chunks: args.chunks,
        source: args.source,
        target: args.target,
        ..P2pCopyParams::default()
    };
    let bar = progress_bar(args.json, 2 * args.chunks, "chunks", "copying");
    let report = p2p_copy::run(&host, &params, &mut |done, _| bar.set_position(done));
    bar.finish_and_clear();
    let report = report.with_context(|| format!("p2pmem copy on {}", host.topology().source()))?;
    if args.json {
        print_json(&report, "peerdma-run/1", &host)?;
    } else {
        print(&host, &report);
    }
    if !report.sanitizer.is_empty() || !report.p2p.verified || !report.host_ram.verified {
        bail!("the copy did not verify or the sanitizer caught violations (see the report)");
    }
    Ok(())
}

/// The emulated host a job runs on.
fn build(
    topo: Topology,
    ram_bytes: u64,
    iommu: Option<bool>,
    specs: &[peerdma::host::DeviceSpec],
) -> Result<Host> {
    Host::build(topo, &HostConfig { ram_bytes, iommu }, specs).context("building the emulated host")
}

/// A progress bar of `len` `unit`s labelled `msg`; hidden for JSON output.
fn progress_bar(json: bool, len: u64, unit: &str, msg: &'static str) -> ProgressBar {
    if json {
        return ProgressBar::hidden();
    }
    let template = format!("{{msg:>12}} [{{bar:40}}] {{pos}}/{{len}} {unit}");
    let bar = ProgressBar::new(len).with_style(
        ProgressStyle::with_template(&template)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(msg);
    bar
}

/// Prints a job's report — as JSON with its `schema`, or as text by `print` — and fails
/// when the job is not `ok` (a byte wrong, something left held, a sanitizer finding).
fn emit<R: serde::Serialize>(
    json: bool,
    host: &Host,
    report: &R,
    schema: &str,
    print: fn(&Host, &R),
    ok: bool,
    job: &str,
) -> Result<()> {
    if json {
        print_json(report, schema, host)?;
    } else {
        print(host, report);
    }
    if !ok {
        bail!("{job} did not verify, leaked, or the sanitizer caught violations (see the report)");
    }
    Ok(())
}

/// Prints `report` as pretty JSON: `schema` first, whether the host's IOMMU was on,
/// then the report's fields in the order its type declares them (docs/json.md).
fn print_json(report: &impl serde::Serialize, schema: &str, host: &Host) -> Result<()> {
    #[derive(serde::Serialize)]
    struct Tagged<'a, R> {
        schema: &'a str,
        iommu: bool,
        #[serde(flatten)]
        report: &'a R,
    }
    let tagged = Tagged {
        schema,
        iommu: host.dma().iommu().enabled(),
        report,
    };
    peerdma_cli::outln!("{}", serde_json::to_string_pretty(&tagged)?);
    Ok(())
}

/// "IOMMU on" or "IOMMU off", for the first line of a text report.
fn iommu(host: &Host) -> &'static str {
    if host.dma().iommu().enabled() {
        "IOMMU on"
    } else {
        "IOMMU off"
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

fn print(host: &Host, r: &P2pCopyReport) {
    peerdma_cli::outln!(
        "p2pmem copy on {} ({}): {} x {} KiB from {} to {} through {}'s CMB",
        host.topology().source(),
        iommu(host),
        r.chunks,
        r.chunk_size >> 10,
        r.source,
        r.target,
        r.target
    );
    peerdma_cli::outln!(
        "  {} reaches the CMB: {} ({})",
        r.source,
        r.source_to_cmb,
        r.source_to_cmb_reason
    );
    for (name, p) in [
        ("through the CMB", &r.p2p),
        ("through host RAM", &r.host_ram),
    ] {
        peerdma_cli::outln!(
            "  copy {name:<17} {:>8.1} MiB in {:>7.3} s  {:>8.1} MiB/s  {}",
            mib(p.bytes),
            p.seconds,
            mib(p.bytes_per_second as u64),
            if p.verified {
                "checksums match"
            } else {
                "CHECKSUM MISMATCH"
            }
        );
    }
    peerdma_cli::outln!(
        "  bytes moved by path: by bus address through a common bridge {:.1} MiB, through a host bridge {:.1} MiB, to or from host RAM {:.1} MiB, within one device {:.1} MiB",
        mib(r.dma.via_switch),
        mib(r.dma.via_host_bridge),
        mib(r.dma.host_ram),
        mib(r.dma.same_device)
    );
    peerdma_cli::outln!(
        "  DMA mappings made {} / released {} ({} left), pages pinned {} ({} pins left)",
        r.dma.mappings,
        r.dma.unmappings,
        r.mappings_left,
        r.pages_pinned,
        r.pins_left
    );
    if r.sanitizer.is_empty() {
        peerdma_cli::outln!("  sanitizer: clean (every device access was through a live mapping)");
    } else {
        peerdma_cli::outln!("  sanitizer: {} violations", r.sanitizer.len());
        for v in &r.sanitizer {
            peerdma_cli::outln!("    {v}");
        }
    }
}

/// `peerdma run hmm`.
fn run_hmm(args: &RunArgs) -> Result<()> {
    let topo = load(args.topology.as_deref().unwrap_or("workstation"))?;
    let specs = Host::gpu_specs(&topo, Some(args.vram.unwrap_or(32 << 20)));
    if specs.is_empty() {
        bail!(
            "{} has no GPU-class function for the GPU model to bind to",
            topo.source()
        );
    }
    let host = build(
        topo,
        (4 * args.buffer_size).max(64 << 20),
        args.iommu,
        &specs,
    )?;
    let params = HmmJobParams {
        buffer_bytes: args.buffer_size,
        passes: args.passes,
        gpu: args.gpu,
    };
    let bar = progress_bar(args.json, u64::from(args.passes) + 2, "phases", "hmm");
    let report = hmm_job::run(&host, &params, &mut |done, _| {
        bar.set_position(u64::from(done))
    });
    bar.finish_and_clear();
    let report = report.with_context(|| format!("HMM job on {}", host.topology().source()))?;
    let ok = report.verified && report.quiescent && report.sanitizer.is_empty();
    emit(
        args.json,
        &host,
        &report,
        "peerdma-run-hmm/1",
        print_hmm,
        ok,
        "the HMM job",
    )
}

fn print_hmm(host: &Host, r: &HmmJobReport) {
    peerdma_cli::outln!(
        "HMM job on {} ({}): {:.0} MiB of process memory mirrored into GPU {} with {:.0} MiB of VRAM, {} passes",
        host.topology().source(),
        iommu(host),
        mib(r.buffer_bytes),
        r.gpu,
        mib(r.vram_bytes),
        r.passes
    );
    for p in &r.phases {
        peerdma_cli::outln!(
            "  {:<18} {:>8.3} s   {:>7} pages in VRAM after",
            p.name,
            p.seconds,
            p.vram_pages
        );
    }
    let s = &r.gpu_stats;
    peerdma_cli::outln!(
        "  GPU faults {}, migrated into VRAM {} pages, mapped remotely {} (VRAM full {}), evicted {}, brought back by the CPU {}",
        s.faults, s.migrated_to_vram, s.remote_mapped, s.vram_full, s.evicted, s.migrated_to_ram
    );
    peerdma_cli::outln!(
        "  checksums: GPU {:#x}, CPU {:#x}: {}",
        r.gpu_checksum,
        r.cpu_checksum,
        if r.verified {
            "every u32 verified"
        } else {
            "MISMATCH"
        }
    );
    peerdma_cli::outln!(
        "  after exit: {}",
        if r.quiescent {
            "nothing left (frames, pins, mappings, notifiers)".to_string()
        } else {
            format!("{} frames still held", r.frames_left)
        }
    );
    if r.sanitizer.is_empty() {
        peerdma_cli::outln!("  sanitizer: clean (no device access broke a rule; the GPU work reached memory through its page table)");
    } else {
        peerdma_cli::outln!("  sanitizer: {} violations", r.sanitizer.len());
        for v in &r.sanitizer {
            peerdma_cli::outln!("    {v}");
        }
    }
}

/// `peerdma run` / `peerdma run rdma`.
fn run_rdma(args: &RunArgs) -> Result<()> {
    let topo = load(args.topology.as_deref().unwrap_or("dgx"))?;
    let mut specs = Host::gpu_specs(&topo, args.vram);
    if specs.is_empty() {
        bail!(
            "{} has no GPU-class function for the GPU model to bind to",
            topo.source()
        );
    }
    let nics = Host::rnic_specs(&topo, RnicCaps::default());
    if nics.is_empty() {
        bail!(
            "{} has no network-class function for the RDMA NIC model to bind to",
            topo.source()
        );
    }
    specs.extend(nics);
    let total = args.message_size.saturating_mul(args.messages);
    let host = build(topo, (8 * total).max(256 << 20), args.iommu, &specs)?;
    let params = RdmaJobParams {
        message_bytes: args.message_size,
        messages: args.messages,
        gpu: args.gpu,
    };
    let bar = progress_bar(args.json, 5, "cases", "rdma");
    let report = rdma_job::run(&host, &params, &mut |done, _| {
        bar.set_position(u64::from(done))
    });
    bar.finish_and_clear();
    let report = report.with_context(|| format!("RDMA job on {}", host.topology().source()))?;
    let ok =
        report.cases.iter().all(|c| c.verified) && report.quiescent && report.sanitizer.is_empty();
    emit(
        args.json,
        &host,
        &report,
        "peerdma-run-rdma/1",
        print_rdma,
        ok,
        "the RDMA job",
    )
}

fn print_rdma(host: &Host, r: &RdmaJobReport) {
    peerdma_cli::outln!(
        "RDMA job on {} ({}): NIC {} writes into memory the GPU {} moves; requests come from NIC {}",
        host.topology().source(),
        iommu(host),
        r.nic,
        r.gpu,
        r.peer_nic
    );
    peerdma_cli::outln!("  NIC {} reaches the GPU's BAR: {}", r.nic, r.nic_to_gpu);
    for c in &r.cases {
        peerdma_cli::outln!("  {}. {} [{}]", c.case, c.name, c.registration);
        for e in &c.events {
            peerdma_cli::outln!("       {e}");
        }
        peerdma_cli::outln!(
            "       {:.1} MiB in {:.3} s: {}",
            mib(c.bytes),
            c.seconds,
            if c.verified {
                "every byte verified"
            } else {
                "NOT VERIFIED"
            }
        );
    }
    let s = &r.nic_stats;
    peerdma_cli::outln!(
        "  NIC {}: ODP faults {} ({} pages), invalidations {} ({} pages), dma-buf re-faults {}, move_notifies {}, {:.1} MiB placed",
        r.nic,
        s.odp_faults,
        s.odp_pages_faulted,
        s.odp_invalidations,
        s.odp_pages_invalidated,
        s.dmabuf_faults,
        s.dmabuf_move_notifies,
        mib(s.bytes_in)
    );
    peerdma_cli::outln!(
        "  bytes moved by path: by bus address through a common bridge {:.1} MiB, through a host bridge {:.1} MiB, to or from host RAM {:.1} MiB, within one device {:.1} MiB",
        mib(r.dma.via_switch),
        mib(r.dma.via_host_bridge),
        mib(r.dma.host_ram),
        mib(r.dma.same_device)
    );
    peerdma_cli::outln!(
        "  after exit: {}",
        if r.quiescent {
            "nothing left (pins, MRs, mappings, attachments, frames)"
        } else {
            "SOMETHING IS STILL HELD"
        }
    );
    if r.sanitizer.is_empty() {
        peerdma_cli::outln!("  sanitizer: clean (no DMA reached memory outside a live mapping, none reached moved storage)");
    } else {
        peerdma_cli::outln!("  sanitizer: {} violations", r.sanitizer.len());
        for v in &r.sanitizer {
            peerdma_cli::outln!("    {v}");
        }
    }
}
