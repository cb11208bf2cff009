//! `peerdma bench rdma`: the RDMA NIC model on the dgx preset (IOMMU off), each figure
//! beside a baseline measured in the same run:
//! - pinned MR registration + dereg of 1 GiB of resident memory vs the kernel's
//!   long-term pin of 1 GiB through io_uring buffer registration (goal: >= 2x faster);
//! - ODP: the NIC faulting 1 GiB of resident pages in (a synchronous PREFETCH_WRITE),
//!   pages/s (goal: >= 10 M pages/s);
//! - invalidation of 1 GiB under an ODP MR with every page mapped for the NIC (munmap)
//!   vs the kernel's munmap of 1 GiB (goal: <= 1x its time);
//! - RDMA WRITE of 1 MiB messages into VRAM through a dma-buf MR vs memcpy of the same
//!   bytes (goal: >= 0.8x memcpy's rate), both over memory touched once before;
//! - move_notify to the first successful access after it: the BO's eviction, then the
//!   first RDMA WRITE (which re-faults at the new place), as latencies.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use peerdma::addr::{Bdf, PAGE_SIZE};
use peerdma::drivers::gpu::{Gpu, GpuSpec, P2pPolicy};
use peerdma::drivers::rnic::{
    Access, Advice, Context, Pd, QpState, Rnic, RnicCaps, RnicSpec, SendOp, SendWr, Sge, WcStatus,
};
use peerdma::host::{Host, HostConfig, Process};
use peerdma::mm::Prot;
use peerdma::sync::Arc;

use super::median;

/// Results of one run.
pub struct RdmaFigures {
    pub bytes: u64,
    pub reg_pinned: Duration,
    pub reg_kernel: Option<Duration>,
    pub kernel_skip: Option<String>,
    pub odp_fault: Duration,
    pub odp_invalidate: Duration,
    pub munmap_kernel: Duration,
    /// Bytes written into VRAM in 1 MiB messages.
    pub write_bytes: u64,
    pub write_vram: Duration,
    pub memcpy: Duration,
    pub evict: Duration,
    pub refault_write: Duration,
    pub steady_write: Duration,
}

const RW: Access = Access(Access::LOCAL_WRITE.0 | Access::REMOTE_WRITE.0 | Access::REMOTE_READ.0);
const MSG: u64 = 1 << 20;

fn bdf(s: &str) -> Bdf {
    s.parse().unwrap_or_else(|_| unreachable!("a literal BDF"))
}

/// The dgx with `ram` bytes of RAM, no IOMMU, two NICs and one GPU of `vram` bytes.
fn host(ram: u64, vram: u64) -> Result<Host> {
    let topo = peerdma::fabric::preset("dgx")?;
    let specs = vec![
        RnicSpec {
            bdf: bdf("0000:1b:00.0"),
            caps: RnicCaps::default(),
        }
        .into(),
        RnicSpec {
            bdf: bdf("0000:1d:00.0"),
            caps: RnicCaps::default(),
        }
        .into(),
        GpuSpec {
            bdf: bdf("0000:1a:00.0"),
            vram_bytes: vram,
        }
        .into(),
    ];
    Ok(Host::build(
        topo,
        &HostConfig {
            ram_bytes: ram,
            iommu: Some(false),
        },
        &specs,
    )?)
}

struct Side {
    p: Process,
    ctx: Arc<Context>,
    pd: Pd,
}

fn side(h: &Host, nic: &str) -> Result<Side> {
    let p = h.spawn();
    let nic = h
        .device::<Rnic>(bdf(nic))
        .context("the NIC model is bound")?;
    let ctx = nic.open(&p, p.files())?;
    let pd = ctx.alloc_pd()?;
    Ok(Side { p, ctx, pd })
}

/// Registration + dereg of `bytes` of resident memory as a pinned MR.
fn reg_pinned(bytes: u64) -> Result<Duration> {
    let h = host(bytes + (64 << 20), 64 << 20)?;
    let b = side(&h, "0000:1b:00.0")?;
    let a = b.p.mmap_anon(bytes, Prot::RW)?;
    super::make_resident(&b.p, a, bytes)?;
    let t = Instant::now();
    let mr = b.ctx.reg_mr(b.pd, a, bytes, a.0, RW)?;
    b.ctx.dereg_mr(&mr)?;
    let d = t.elapsed();
    b.p.exit();
    Ok(d)
}

/// ODP over `bytes` of resident memory: the NIC faults every page in (writable), then
/// munmap invalidates them all. Returns (fault, invalidate).
fn odp(bytes: u64) -> Result<(Duration, Duration)> {
    let h = host(bytes + (64 << 20), 64 << 20)?;
    let b = side(&h, "0000:1b:00.0")?;
    let a = b.p.mmap_anon(bytes, Prot::RW)?;
    super::make_resident(&b.p, a, bytes)?;
    // Registered before the pages exist for the NIC: the snapshot maps them, so
    // register over a fresh range and let the prefetch do the faulting instead.
    b.p.madvise_dontneed(a, bytes)?;
    let mr = b.ctx.reg_mr(b.pd, a, bytes, a.0, RW | Access::ON_DEMAND)?;
    super::make_resident(&b.p, a, bytes)?;
    let mut sges = Vec::new();
    let mut at = 0;
    while at < bytes {
        let len = (bytes - at).min(1 << 30);
        sges.push(Sge {
            addr: a.0 + at,
            len: len as u32,
            lkey: mr.lkey(),
        });
        at += len;
    }
    let t = Instant::now();
    b.ctx.advise_mr(b.pd, Advice::PrefetchWrite, true, &sges)?;
    let fault = t.elapsed();
    anyhow::ensure!(
        mr.mapped_pages() == bytes / PAGE_SIZE,
        "the prefetch mapped {} of {} pages",
        mr.mapped_pages(),
        bytes / PAGE_SIZE
    );
    let t = Instant::now();
    b.p.munmap(a, bytes)?;
    let inval = t.elapsed();
    anyhow::ensure!(mr.mapped_pages() == 0, "munmap left NIC translations");
    b.p.exit();
    Ok((fault, inval))
}

/// RDMA WRITEs of 1 MiB messages into a VRAM BO through a dma-buf MR; then the BO's
/// eviction and the first write after it. Returns (all writes, evict, re-fault write,
/// a steady write for comparison).
fn write_vram(bytes: u64) -> Result<(Duration, Duration, Duration, Duration)> {
    let h = host(4 * MSG + (64 << 20) + bytes, bytes + (64 << 20))?;
    let gpu = h
        .device::<Gpu>(bdf("0000:1a:00.0"))
        .context("the GPU model is bound")?;
    let a = side(&h, "0000:1d:00.0")?;
    let b = side(&h, "0000:1b:00.0")?;
    let (acq, bcq) = (a.ctx.create_cq()?, b.ctx.create_cq()?);
    let (aq, bq) = (
        a.ctx.create_qp(a.pd, &acq, &acq)?,
        b.ctx.create_qp(b.pd, &bcq, &bcq)?,
    );
    for (x, y) in [(&aq, &bq), (&bq, &aq)] {
        x.modify(QpState::Init, None)?;
        x.modify(QpState::Rtr, Some(y))?;
        x.modify(QpState::Rts, None)?;
    }
    let src = a.p.mmap_anon(MSG, Prot::RW)?;
    a.p.write(src, &vec![0x5a; MSG as usize])?;
    let lmr = a.ctx.reg_mr(a.pd, src, MSG, src.0, RW)?;
    let bo = gpu.bo_alloc(bytes)?;
    let buf = gpu.bo_export(bo, P2pPolicy::MoveToRam)?;
    let fd = b.p.files().export_fd(&buf);
    let mr = b.ctx.reg_dmabuf_mr(b.pd, 0, bytes, 0, fd, RW)?;
    let write = |off: u64| -> Result<()> {
        aq.post_send(SendWr {
            wr_id: off,
            op: SendOp::Write {
                remote_addr: off,
                rkey: mr.rkey(),
            },
            sg: vec![Sge {
                addr: src.0,
                len: MSG as u32,
                lkey: lmr.lkey(),
            }],
            signaled: true,
        })?;
        let wc = acq.poll(1);
        anyhow::ensure!(
            wc.first().map(|w| w.status) == Some(WcStatus::Success),
            "RDMA WRITE at {off:#x}: {wc:?}"
        );
        Ok(())
    };
    // A first pass maps the buffer and touches the emulated VRAM's host pages (a
    // sparse mapping pays a host page fault per first touch, which the modelled device
    // does not); the second pass is timed.
    for off in (0..bytes).step_by(MSG as usize) {
        write(off)?;
    }
    let t = Instant::now();
    for off in (0..bytes).step_by(MSG as usize) {
        write(off)?;
    }
    let all = t.elapsed();
    let t = Instant::now();
    write(0)?;
    let steady = t.elapsed();
    let t = Instant::now();
    gpu.bo_evict(bo)?;
    let evict = t.elapsed();
    let t = Instant::now();
    write(0)?;
    let refault = t.elapsed();
    b.ctx.dereg_mr(&mr)?;
    b.p.files().close(fd)?;
    drop(buf);
    gpu.bo_free(bo)?;
    Ok((all, evict, refault, steady))
}

/// Runs the benchmarks over `bytes` (1 GiB by default; the VRAM writes cover up to
/// 256 MiB): medians of `runs` alternating runs of ours and the baselines.
pub fn run(bytes: u64, runs: usize) -> Result<RdmaFigures> {
    let bytes = bytes.next_multiple_of(PAGE_SIZE).max(MSG);
    let write_bytes = bytes.min(256 << 20).next_multiple_of(MSG);
    let (mut reg, mut kreg, mut fault, mut inval, mut kmun) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut wr, mut mc, mut ev, mut rf, mut st) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut skip = None;
    let srcbuf = vec![1u8; write_bytes as usize];
    let mut dstbuf = vec![0u8; write_bytes as usize];
    for _ in 0..runs.max(1) {
        reg.push(reg_pinned(bytes)?);
        if skip.is_none() {
            match super::mm::pin_kernel(bytes) {
                Ok((d, ())) => kreg.push(d),
                Err(e) => skip = Some(format!("{e:#}")),
            }
        }
        let (f, i) = odp(bytes)?;
        fault.push(f);
        inval.push(i);
        kmun.push(super::mm::munmap_kernel(bytes)?.0);
        let (w, e, r, s) = write_vram(write_bytes)?;
        wr.push(w);
        ev.push(e);
        rf.push(r);
        st.push(s);
        let t = Instant::now();
        for (d, s) in dstbuf
            .chunks_mut(MSG as usize)
            .zip(srcbuf.chunks(MSG as usize))
        {
            d.copy_from_slice(std::hint::black_box(s));
        }
        std::hint::black_box(&dstbuf);
        mc.push(t.elapsed());
    }
    Ok(RdmaFigures {
        bytes,
        reg_pinned: median(reg),
        reg_kernel: (!kreg.is_empty()).then(|| median(kreg)),
        kernel_skip: skip,
        odp_fault: median(fault),
        odp_invalidate: median(inval),
        munmap_kernel: median(kmun),
        write_bytes,
        write_vram: median(wr),
        memcpy: median(mc),
        evict: median(ev),
        refault_write: median(rf),
        steady_write: median(st),
    })
}

/// Prints the figures against the goals.
pub fn print(f: &RdmaFigures) {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let pages = f.bytes / PAGE_SIZE;
    let gib = f.bytes as f64 / (1u64 << 30) as f64;
    crate::outln!("rdma benchmark: {pages} pages ({gib:.2} GiB), dgx preset, IOMMU off, medians");
    crate::outln!("{}", crate::bench::RATIOS);
    match (f.reg_kernel, &f.kernel_skip) {
        (Some(k), _) => crate::outln!(
            "  pinned MR reg + dereg          {:>9.2} ms   kernel io_uring register+unregister {:>9.2} ms   ratio {:.2}x (goal >= 2x)",
            ms(f.reg_pinned),
            ms(k),
            ms(k) / ms(f.reg_pinned)
        ),
        (None, why) => crate::outln!(
            "  pinned MR reg + dereg          {:>9.2} ms   kernel baseline skipped: {}",
            ms(f.reg_pinned),
            why.as_deref().unwrap_or("unavailable")
        ),
    }
    crate::outln!(
        "  ODP NIC faults, resident pages {:>9.2} ms   {:.1} M pages/s (goal >= 10 M pages/s)",
        ms(f.odp_fault),
        pages as f64 / f.odp_fault.as_secs_f64() / 1e6
    );
    crate::outln!(
        "  ODP invalidation (munmap)      {:>9.2} ms   kernel munmap {:>9.2} ms   ratio {:.2}x (goal >= 1x)",
        ms(f.odp_invalidate),
        ms(f.munmap_kernel),
        ms(f.munmap_kernel) / ms(f.odp_invalidate)
    );
    let rate = |b: u64, d: Duration| b as f64 / d.as_secs_f64() / 1e9;
    crate::outln!(
        "  RDMA WRITE 1 MiB into VRAM     {:>9.2} ms   {:.2} GB/s; memcpy {:.2} GB/s   ratio {:.2}x (goal >= 0.8x)",
        ms(f.write_vram),
        rate(f.write_bytes, f.write_vram),
        rate(f.write_bytes, f.memcpy),
        rate(f.write_bytes, f.write_vram) / rate(f.write_bytes, f.memcpy)
    );
    crate::outln!(
        "  move_notify -> first access    eviction of {} MiB {:.2} ms, then the re-faulting 1 MiB write {:.3} ms (a mapped write: {:.3} ms)",
        f.write_bytes >> 20,
        ms(f.evict),
        ms(f.refault_write),
        ms(f.steady_write)
    );
}
