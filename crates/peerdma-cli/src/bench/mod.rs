//! `peerdma bench`: the benchmarks, runnable on any machine from the CLI (and from
//! `cargo bench`), each reported beside a baseline measured in the same run.

pub mod dma;
pub mod gpu;
pub mod hmm;
pub mod mm;
pub mod rdma;

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use crate::opts::{count, size};
use peerdma::fabric::import::{presets, sysfs};
use peerdma::fabric::{FnId, Matrix};

/// Which benchmark to run.
#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    which: Which,
}

#[derive(Subcommand)]
enum Which {
    /// Import a generated sysfs snapshot and build the all-pairs matrix.
    Topo {
        /// Functions in the generated machine.
        #[arg(long, default_value = "1000", value_parser = count(2, 100_000))]
        functions: u64,
        /// Timed repetitions; the median is reported.
        #[arg(long, default_value = "20", value_parser = count(1, 10_000))]
        iterations: u64,
    },
    /// The DMA data path against memcpy, and get_user_dma_sg against io_uring pinning.
    Dma {
        /// Bytes per device transfer (default 1 MiB).
        #[arg(long, default_value = "1M", value_parser = size(4 << 10, 1 << 30))]
        transfer: u64,
        /// Bytes for get_user_dma_sg (default 1 GiB).
        #[arg(long, default_value = "1G", value_parser = size(1 << 20, 64 << 30))]
        bytes: u64,
        /// Runs; medians are reported.
        #[arg(long, default_value = "5", value_parser = count(1, 1000))]
        runs: u64,
    },
    /// The GPU model: unified-memory first touches (migrating or remote) and mapped
    /// reads, the copy engine in 1 MiB blocks, and BO eviction, against memcpy.
    Gpu {
        /// Bytes of process memory the GPU touches, and of BOs evicted (default 1 GiB;
        /// the copy engine copies up to 256 MiB of it).
        #[arg(long, default_value = "1G", value_parser = size(1 << 20, 64 << 30))]
        bytes: u64,
        /// Alternating runs; medians are reported.
        #[arg(long, default_value = "5", value_parser = count(1, 1000))]
        runs: u64,
    },
    /// hmm_range_fault and migration to device memory against pinning and memcpy.
    Hmm {
        /// Bytes of memory to snapshot and migrate (default 1 GiB).
        #[arg(long, default_value = "1G", value_parser = size(1 << 20, 64 << 30))]
        bytes: u64,
        /// Alternating runs; medians are reported.
        #[arg(long, default_value = "5", value_parser = count(1, 1000))]
        runs: u64,
    },
    /// The RDMA NIC: pinned registration against io_uring pinning, ODP faults and
    /// invalidation against munmap, RDMA WRITE into VRAM by dma-buf against memcpy.
    Rdma {
        /// Bytes to register, fault and invalidate (default 1 GiB; up to 256 MiB of it
        /// is written into VRAM).
        #[arg(long, default_value = "1G", value_parser = size(1 << 20, 64 << 30))]
        bytes: u64,
        /// Alternating runs; medians are reported.
        #[arg(long, default_value = "3", value_parser = count(1, 1000))]
        runs: u64,
    },
    /// Sequential fuzz throughput with every check on (generation, checking and
    /// running of seeded scenarios), against the goal of 100 k operations/s.
    Fuzz {
        /// Seeds per run.
        #[arg(long, default_value = "300", value_parser = count(1, 1_000_000))]
        seeds: u64,
        /// Operations per seed.
        #[arg(long, default_value = "300", value_parser = count(1, 100_000))]
        ops: u64,
        /// Runs; the median is reported.
        #[arg(long, default_value = "3", value_parser = count(1, 100))]
        runs: u64,
    },
    /// Pin, munmap and metadata of the memory core against the kernel's own.
    Mm {
        /// Bytes of memory to pin and unmap (default 1 GiB).
        #[arg(long, default_value = "1G", value_parser = size(1 << 20, 64 << 30))]
        bytes: u64,
        /// Alternating runs of ours and the kernel's; medians are reported.
        #[arg(long, default_value = "7", value_parser = count(1, 1000))]
        runs: u64,
    },
}

/// Writes one byte to every page of `[a, a + len)` of `mm`, so it is resident, as the
/// kernel baselines' buffers are.
pub(crate) fn make_resident(
    mm: &peerdma::mm::Mm,
    a: peerdma::addr::VirtAddr,
    len: u64,
) -> Result<()> {
    let page = peerdma::addr::PAGE_SIZE;
    for off in (0..len).step_by(page as usize) {
        mm.write(peerdma::addr::VirtAddr(a.0 + off), &[1])?;
    }
    Ok(())
}

pub(crate) fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time<T>(iterations: usize, mut f: impl FnMut() -> Result<T>) -> Result<Duration> {
    let mut out = Vec::with_capacity(iterations);
    for _ in 0..iterations.max(1) {
        let t = Instant::now();
        std::hint::black_box(f()?);
        out.push(t.elapsed());
    }
    Ok(median(out))
}

/// What every benchmark's ratios mean, printed under its heading.
pub const RATIOS: &str =
    "  (every ratio is the baseline's time over ours, so higher is better, goals included)";

/// Runs the benchmark the arguments name.
pub fn run(args: &BenchArgs) -> Result<()> {
    // The parsers bound every count, so these conversions are lossless.
    let n = |v: u64| v as usize;
    match args.which {
        Which::Topo {
            functions,
            iterations,
        } => topo(n(functions), n(iterations)),
        Which::Dma {
            transfer,
            bytes,
            runs,
        } => {
            dma::print(&dma::run(transfer, bytes, n(runs))?);
            Ok(())
        }
        Which::Gpu { bytes, runs } => {
            gpu::print(&gpu::run(bytes, n(runs))?);
            Ok(())
        }
        Which::Hmm { bytes, runs } => {
            hmm::print(&hmm::run(bytes, n(runs))?);
            Ok(())
        }
        Which::Rdma { bytes, runs } => {
            rdma::print(&rdma::run(bytes, n(runs))?);
            Ok(())
        }
        Which::Mm { bytes, runs } => {
            mm::print(&mm::run(bytes, n(runs))?);
            Ok(())
        }
        Which::Fuzz { seeds, ops, runs } => fuzz(seeds, n(ops), n(runs)),
    }
}

/// `peerdma bench fuzz`: the median campaign's scenario lines per second, and where the
/// time goes (drawing scenarios from seeds alone, for comparison).
fn fuzz(seeds: u64, ops: usize, runs: usize) -> Result<()> {
    use peerdma::scenario::fuzz as f;
    let mut rates = Vec::new();
    let mut lines = 0;
    let mut failures = 0;
    for _ in 0..runs.max(1) {
        let c = f::campaign(0, seeds, ops, false, &mut |_| {});
        lines = c.ops;
        failures = c.failures.len();
        rates.push(c.ops_per_second);
    }
    rates.sort_by(f64::total_cmp);
    let rate = rates[rates.len() / 2];
    let gen = time(runs, || {
        Ok((0..seeds).map(|s| f::generate(s, ops).len()).sum::<usize>())
    })?;
    let gen_rate = lines as f64 / gen.as_secs_f64().max(1e-9);
    crate::outln!(
        "fuzz benchmark: seeds 0..{seeds}, {ops} operations each ({lines} scenario lines), median of {runs}, one core"
    );
    crate::outln!(
        "  generate the scenarios (the model alone)        {:>10.0} lines/s",
        gen_rate
    );
    crate::outln!(
        "  generate, check and run, every check on         {:>10.0} lines/s  (goal 100000: {:.2}x)",
        rate,
        rate / 100_000.0
    );
    if failures > 0 {
        anyhow::bail!("{failures} seeds failed: run peerdma fuzz on them");
    }
    Ok(())
}

fn topo(functions: usize, iterations: usize) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("peerdma-bench-topo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let model = presets::synthetic(functions);
    sysfs::write_snapshot(&model, &dir).context("writing the generated snapshot")?;
    let result = (|| -> Result<()> {
        let baseline = time(iterations, || {
            let mut bytes = 0usize;
            for e in std::fs::read_dir(dir.join("sys/bus/pci/devices"))? {
                let d = std::fs::canonicalize(e?.path())?;
                for a in sysfs::ATTRIBUTES {
                    bytes += std::fs::read(d.join(a)).map_or(0, |b| b.len());
                }
            }
            Ok(bytes)
        })?;
        let import = time(iterations, || Ok(sysfs::read(&dir)?))?;
        let topo = sysfs::read(&dir)?;
        let ids: Vec<FnId> = topo.ids().collect();
        let matrix = time(iterations, || Ok(Matrix::build(&topo, &ids)))?;
        let both = time(iterations, || {
            let t = sysfs::read(&dir)?;
            let ids: Vec<FnId> = t.ids().collect();
            Ok(Matrix::build(&t, &ids).ids.len())
        })?;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        crate::outln!(
            "topo benchmark: {functions} functions, {} pairs, median of {iterations}",
            functions * functions
        );
        crate::outln!("{}", crate::bench::RATIOS);
        crate::outln!(
            "  baseline: read the snapshot's attribute files   {:>8.2} ms",
            ms(baseline)
        );
        crate::outln!(
            "  import the snapshot (sysfs::read)              {:>8.2} ms  (ratio {:.2}x)",
            ms(import),
            ms(baseline) / ms(import)
        );
        crate::outln!(
            "  all-pairs matrix                               {:>8.2} ms",
            ms(matrix)
        );
        crate::outln!("  import + all pairs                             {:>8.2} ms  (ratio {:.2}x; goal < 100 ms)", ms(both), ms(baseline) / ms(both));
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}
