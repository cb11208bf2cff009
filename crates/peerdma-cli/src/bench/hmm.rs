//! `peerdma bench hmm`: the HMM benchmarks, each against a baseline measured in the
//! same run:
//! - `hmm_range_fault` snapshot of 1 GiB of resident anonymous memory vs the kernel's
//!   long-term pin of a 1 GiB buffer through io_uring buffer registration (what a
//!   device without HMM would have to do to learn the same frames);
//! - migration of 1 GiB to device-private memory and back with `migrate_vma`, the data
//!   copied both ways, vs memcpy of the same bytes twice.

use std::time::{Duration, Instant};

use anyhow::Result;
use peerdma::addr::{VirtAddr, PAGE_SIZE};
use peerdma::hmm::{hmm_range_fault, HmmPfn, HmmRange};
use peerdma::mem::{PhysMem, RegionKind};
use peerdma::mm::{Mm, Select};
use peerdma::notifier::{IntervalNotifierOps, NotifyRange, Subscription};
use peerdma::sync::Arc;

/// Results of one run.
pub struct HmmFigures {
    pub pages: u64,
    pub snapshot: Duration,
    pub pin_kernel: Option<Duration>,
    pub kernel_skip: Option<String>,
    pub migrate: Duration,
    pub memcpy: Duration,
}

struct Quiet;
impl IntervalNotifierOps for Quiet {
    fn invalidate(&self, _s: &Subscription, _r: &NotifyRange, _q: u64) -> bool {
        true
    }
}

/// Pages per migrate_vma call, as a driver migrates (test_hmm: 64; GPU drivers: 512).
const MIGRATE_STEP: u64 = 512;

fn snapshot(mm: &Arc<Mm>, a: VirtAddr, bytes: u64) -> Result<Duration> {
    let sub = mm.notifier().subscribe(a, bytes, Arc::new(Quiet));
    let t = Instant::now();
    let mut range = HmmRange::new(&sub, a, VirtAddr(a.0 + bytes));
    hmm_range_fault(mm, &mut range)?;
    let d = t.elapsed();
    anyhow::ensure!(
        range.pfns.iter().all(|f| f.contains(HmmPfn::VALID)),
        "a resident page was not reported"
    );
    Ok(d)
}

/// Moves `[a, a + bytes)` to `dev` and back, copying every page each way.
fn migrate_round_trip(
    mm: &Arc<Mm>,
    a: VirtAddr,
    bytes: u64,
    dev: &Arc<peerdma::mem::Region>,
) -> Result<Duration> {
    let ram = mm.phys().ram().clone();
    let t = Instant::now();
    for (select, target) in [(Select::SYSTEM, dev), (Select::DEVICE_PRIVATE, &ram)] {
        let mut at = a.0;
        while at < a.0 + bytes {
            let next = (at + MIGRATE_STEP * PAGE_SIZE).min(a.0 + bytes);
            let mut m = mm.migrate_vma_setup(VirtAddr(at), VirtAddr(next), select, Some(1))?;
            let src = m.src();
            let mut dst = Vec::with_capacity(src.len());
            target.alloc_bulk_for_copy(src.len() as u64, &mut dst)?;
            let from = if select == Select::SYSTEM { &ram } else { dev };
            // The copy engine moves physically contiguous runs in one transfer.
            let mut i = 0;
            while i < src.len() {
                let Some(p) = src[i].pfn.filter(|_| src[i].migrate) else {
                    target.put(dst[i]);
                    i += 1;
                    continue;
                };
                let mut n = 1;
                while i + n < src.len()
                    && src[i + n].migrate
                    && src[i + n].pfn == Some(peerdma::addr::Pfn(p.0 + n as u64))
                    && dst[i + n].0 == dst[i].0 + n as u64
                {
                    n += 1;
                }
                from.copy_frames(p, target, dst[i], n as u64);
                for (k, &d) in dst.iter().enumerate().skip(i).take(n) {
                    m.set_dst(k, target, d);
                }
                i += n;
            }
            m.pages();
            anyhow::ensure!(m.cpages() == src.len(), "a page did not migrate");
            m.finalize();
            at = next;
        }
    }
    Ok(t.elapsed())
}

/// memcpy of the same bytes twice, between buffers made resident beforehand (as the
/// migrated memory is).
fn memcpy_twice(src: &[u8], mid: &mut [u8], dst: &mut [u8]) -> Duration {
    let t = Instant::now();
    mid.copy_from_slice(std::hint::black_box(src));
    dst.copy_from_slice(std::hint::black_box(mid));
    std::hint::black_box((&mid, &dst));
    t.elapsed()
}

/// Runs both benchmarks over `bytes`, `runs` alternating times; medians are reported.
pub fn run(bytes: u64, runs: usize) -> Result<HmmFigures> {
    let pages = bytes / PAGE_SIZE;
    let phys = PhysMem::new(bytes + (64 << 20))?;
    let dev = phys.memremap_pages(RegionKind::DevicePrivate { owner: 1 }, bytes + (64 << 20))?;
    let mm = Mm::new(&phys);
    let a = mm.mmap_anon(bytes, peerdma::mm::Prot::RW)?;
    super::make_resident(&mm, a, bytes)?;
    let (mut snap, mut kern, mut mig, mut cpy) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut skip = None;
    let src = vec![1u8; bytes as usize];
    let mut mid = vec![2u8; bytes as usize];
    let mut dst = vec![3u8; bytes as usize];
    for _ in 0..runs.max(1) {
        snap.push(snapshot(&mm, a, bytes)?);
        if skip.is_none() {
            match super::mm::pin_kernel(bytes) {
                Ok((d, ())) => kern.push(d),
                Err(e) => skip = Some(format!("{e:#}")),
            }
        }
        mig.push(migrate_round_trip(&mm, a, bytes, &dev)?);
        cpy.push(memcpy_twice(&src, &mut mid, &mut dst));
    }
    mm.exit();
    Ok(HmmFigures {
        pages,
        snapshot: super::median(snap),
        pin_kernel: skip.is_none().then(|| super::median(kern)),
        kernel_skip: skip,
        migrate: super::median(mig),
        memcpy: super::median(cpy),
    })
}

/// Prints the figures against the goals.
pub fn print(f: &HmmFigures) {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mpps = |d: Duration| f.pages as f64 / d.as_secs_f64() / 1e6;
    crate::outln!(
        "hmm benchmark: {} pages ({} MiB), medians of alternating runs",
        f.pages,
        (f.pages * PAGE_SIZE) >> 20
    );
    crate::outln!("{}", crate::bench::RATIOS);
    match f.pin_kernel {
        Some(k) => crate::outln!(
            "  hmm_range_fault snapshot         {:>8.2} ms  {:>6.1} Mpages/s (goal >= 30)   kernel io_uring register+unregister {:>8.2} ms  {:>6.1} Mpages/s   ratio {:.2}x (goal >= 2x)",
            ms(f.snapshot), mpps(f.snapshot), ms(k), mpps(k), k.as_secs_f64() / f.snapshot.as_secs_f64()
        ),
        None => crate::outln!(
            "  hmm_range_fault snapshot         {:>8.2} ms  {:>6.1} Mpages/s (goal >= 30)   kernel baseline skipped: {}",
            ms(f.snapshot),
            mpps(f.snapshot),
            f.kernel_skip.as_deref().unwrap_or("io_uring unavailable")
        ),
    }
    crate::outln!(
        "  migrate to device-private and back {:>8.2} ms  {:>6.2} Mpages/s each way   memcpy twice {:>8.2} ms   ratio {:.2}x memcpy (goal >= 0.5x)",
        ms(f.migrate),
        2.0 * f.pages as f64 / f.migrate.as_secs_f64() / 1e6,
        ms(f.memcpy),
        f.memcpy.as_secs_f64() / f.migrate.as_secs_f64()
    );
}
