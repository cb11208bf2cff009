//! `peerdma bench mm`: the memory-core benchmarks, each against the running kernel's own
//! primitive measured in the same run:
//! - pin + unpin of 1 GiB of resident anonymous memory vs the kernel's long-term pin of
//!   a 1 GiB buffer through io_uring buffer registration (register + unregister);
//! - munmap of 1 GiB with one interval notifier subscribed vs the kernel's munmap of
//!   1 GiB of touched anonymous memory;
//! - frame metadata per frame and resident memory after creating a 1 TiB device region
//!   and touching 1 GiB of it.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use peerdma::addr::PAGE_SIZE;
use peerdma::gup::{pin_user_pages, FollFlags};
use peerdma::mem::{PhysMem, RegionKind};
use peerdma::mm::{Mm, Prot};
use peerdma::notifier::{IntervalNotifierOps, NotifyRange, Subscription};
use peerdma::sync::Arc;

/// Results of one run.
pub struct MmFigures {
    pub pages: u64,
    pub pin_ours: Duration,
    pub pin_kernel: Option<Duration>,
    pub kernel_skip: Option<String>,
    pub munmap_ours: Duration,
    pub munmap_kernel: Duration,
    pub meta_bytes_per_frame: f64,
    pub meta_allocated: u64,
    pub rss_growth: u64,
    pub touched: u64,
}

/// Resident set size of this process, from /proc/self/statm.
fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(0, |pages| pages * PAGE_SIZE)
}

struct Quiet;
impl IntervalNotifierOps for Quiet {
    fn invalidate(&self, _s: &Subscription, _r: &NotifyRange, _q: u64) -> bool {
        true
    }
}

fn pin_ours(bytes: u64) -> Result<(Duration, ())> {
    let phys = PhysMem::new(bytes + (64 << 20))?;
    let mm = Mm::new(&phys);
    let a = mm.mmap_anon(bytes, Prot::RW)?;
    super::make_resident(&mm, a, bytes)?;
    let n = (bytes / PAGE_SIZE) as usize;
    let t = Instant::now();
    let pin = pin_user_pages(&mm, a, n, FollFlags::WRITE | FollFlags::LONGTERM)?;
    anyhow::ensure!(pin.len() == n, "pinned {} of {n}", pin.len());
    drop(pin);
    Ok((t.elapsed(), ()))
}

/// The kernel's long-term pin and unpin of a resident buffer of `bytes` through
/// io_uring buffer registration.
pub fn pin_kernel(bytes: u64) -> Result<(Duration, ())> {
    let mut buf = vec![1u8; bytes as usize];
    for i in (0..buf.len()).step_by(PAGE_SIZE as usize) {
        buf[i] = 2;
    }
    let ring = io_uring::IoUring::new(4).context("io_uring_setup")?;
    let iov = [libc_iovec(&mut buf)];
    let t = Instant::now();
    // SAFETY: the iovec names `buf`, which outlives the registration: it is
    // unregistered below before `buf` is dropped.
    unsafe { ring.submitter().register_buffers(&iov) }
        .context("IORING_REGISTER_BUFFERS of 1 GiB")?;
    ring.submitter()
        .unregister_buffers()
        .context("IORING_UNREGISTER_BUFFERS")?;
    let d = t.elapsed();
    drop(buf);
    Ok((d, ()))
}

fn libc_iovec(buf: &mut [u8]) -> libc::iovec {
    libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }
}

fn munmap_ours(bytes: u64) -> Result<(Duration, ())> {
    let phys = PhysMem::new(bytes + (64 << 20))?;
    let mm = Mm::new(&phys);
    let a = mm.mmap_anon(bytes, Prot::RW)?;
    super::make_resident(&mm, a, bytes)?;
    let _sub = mm.notifier().subscribe(a, bytes, Arc::new(Quiet));
    let t = Instant::now();
    mm.munmap(a, bytes)?;
    Ok((t.elapsed(), ()))
}

/// The kernel's munmap of `bytes` of touched private anonymous memory, timed.
pub(crate) fn munmap_kernel(bytes: u64) -> Result<(Duration, ())> {
    use rustix::mm::{mmap_anonymous, munmap, MapFlags, ProtFlags};
    let len = bytes as usize;
    // SAFETY: a fresh private anonymous mapping aliases nothing.
    let p = unsafe {
        mmap_anonymous(
            std::ptr::null_mut(),
            len,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::PRIVATE,
        )
    }
    .context("mmap")?;
    for off in (0..len).step_by(PAGE_SIZE as usize) {
        // SAFETY: `off < len`, inside the mapping just made, which nothing else uses.
        unsafe { p.cast::<u8>().add(off).write_volatile(1) };
    }
    let t = Instant::now();
    // SAFETY: unmaps exactly the mapping made above; no reference into it remains.
    unsafe { munmap(p, len) }.context("munmap")?;
    Ok((t.elapsed(), ()))
}

/// Runs `ours` and `kernel` alternately `runs` times (so both see the same machine
/// state) and returns the median time of each; a failing `kernel` run ends the kernel
/// side with its error.
fn paired(
    runs: usize,
    mut ours: impl FnMut() -> Result<(Duration, ())>,
    mut kernel: impl FnMut() -> Result<(Duration, ())>,
) -> Result<(Duration, Result<Duration>)> {
    let (mut o, mut k) = (Vec::new(), Vec::new());
    let mut kernel_err = None;
    for _ in 0..runs.max(1) {
        o.push(ours()?.0);
        if kernel_err.is_none() {
            match kernel() {
                Ok((d, ())) => k.push(d),
                Err(e) => kernel_err = Some(e),
            }
        }
    }
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let k = match kernel_err {
        Some(e) => Err(e),
        None => Ok(median(k)),
    };
    Ok((median(o), k))
}

/// Runs the three benchmarks over `bytes` (1 GiB by default): medians of `runs`
/// alternating runs of ours and the kernel's.
pub fn run(bytes: u64, runs: usize) -> Result<MmFigures> {
    let pages = bytes / PAGE_SIZE;
    let (pin_o, pin_k) = paired(runs, || pin_ours(bytes), || pin_kernel(bytes))?;
    let (pin_k, skip) = match pin_k {
        Ok(d) => (Some(d), None),
        Err(e) => (None, Some(format!("{e:#}"))),
    };
    let (mun_o, mun_k) = paired(runs, || munmap_ours(bytes), || munmap_kernel(bytes))?;
    let mun_k = mun_k?;
    // Metadata and resident memory: a 1 TiB device region, `bytes` of it touched.
    let before = rss();
    let phys = PhysMem::new(PAGE_SIZE)?;
    let dev = phys.memremap_pages(RegionKind::DeviceCoherent { owner: 1 }, 1 << 40)?;
    let meta0 = phys.metadata_bytes();
    let mut frames = Vec::with_capacity(pages as usize);
    dev.alloc_bulk(pages, &mut frames)?;
    for &f in &frames {
        dev.write(f, 0, &[1]);
    }
    let meta = phys.metadata_bytes() - meta0;
    let after = rss();
    dev.put_many(&frames);
    Ok(MmFigures {
        pages,
        pin_ours: pin_o,
        pin_kernel: pin_k,
        kernel_skip: skip,
        munmap_ours: mun_o,
        munmap_kernel: mun_k,
        meta_bytes_per_frame: std::mem::size_of::<peerdma::mem::FrameMeta>() as f64,
        meta_allocated: meta,
        rss_growth: after.saturating_sub(before),
        touched: pages * PAGE_SIZE,
    })
}

/// Prints the figures against the goals.
pub fn print(f: &MmFigures) {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mpps = |d: Duration| f.pages as f64 / d.as_secs_f64() / 1e6;
    crate::outln!(
        "mm benchmark: {} pages ({} MiB), medians of alternating runs",
        f.pages,
        (f.pages * PAGE_SIZE) >> 20
    );
    crate::outln!("{}", crate::bench::RATIOS);
    match f.pin_kernel {
        Some(k) => crate::outln!(
            "  pin+unpin (WRITE|LONGTERM)          {:>8.2} ms  {:>6.1} Mpages/s   kernel io_uring register+unregister {:>8.2} ms  {:>6.1} Mpages/s   ratio {:.2}x (goal >= 3x)",
            ms(f.pin_ours), mpps(f.pin_ours), ms(k), mpps(k), k.as_secs_f64() / f.pin_ours.as_secs_f64()
        ),
        None => crate::outln!(
            "  pin+unpin (WRITE|LONGTERM)          {:>8.2} ms  {:>6.1} Mpages/s   kernel baseline skipped: {}",
            ms(f.pin_ours),
            mpps(f.pin_ours),
            f.kernel_skip.as_deref().unwrap_or("io_uring unavailable")
        ),
    }
    crate::outln!(
        "  munmap with one notifier            {:>8.2} ms  {:>6.1} ns/page   kernel munmap {:>8.2} ms  {:>6.1} ns/page   ratio {:.2}x (goal >= 1x)",
        ms(f.munmap_ours),
        f.munmap_ours.as_nanos() as f64 / f.pages as f64,
        ms(f.munmap_kernel),
        f.munmap_kernel.as_nanos() as f64 / f.pages as f64,
        f.munmap_kernel.as_secs_f64() / f.munmap_ours.as_secs_f64()
    );
    crate::outln!(
        "  1 TiB device region, {} MiB touched: {:.1} B metadata/frame (goal <= 16; {} KiB allocated in 16 MiB sections), RSS +{} MiB, of which {} MiB the touched bytes themselves, overhead {} MiB (goal < 100 MiB)",
        f.touched >> 20,
        f.meta_bytes_per_frame,
        f.meta_allocated >> 10,
        f.rss_growth >> 20,
        f.touched >> 20,
        f.rss_growth.saturating_sub(f.touched) >> 20
    );
}
