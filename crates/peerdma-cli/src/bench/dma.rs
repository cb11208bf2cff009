//! `peerdma bench dma`: the DMA data path and get_user_dma_sg, each against a baseline
//! measured in the same run:
//! - device writes of 1 MiB through mapped memory (contiguous frames, and frames
//!   scattered one page apart) vs memcpy of the same bytes;
//! - get_user_dma_sg + release of 1 GiB of resident memory vs the kernel's pinning of a
//!   1 GiB buffer through io_uring buffer registration.

use std::time::{Duration, Instant};

use anyhow::Result;
use peerdma::addr::{Bdf, VirtAddr, PAGE_SIZE};
use peerdma::dma::{Direction, Dma};
use peerdma::fabric::preset;
use peerdma::gup::{get_user_dma_sg, UserSg};
use peerdma::mem::PhysMem;
use peerdma::mm::{Mm, Prot};
use peerdma::sync::Arc;

/// One run's figures.
pub struct DmaFigures {
    pub transfer: u64,
    pub contiguous: Duration,
    pub scattered: Duration,
    pub memcpy: Duration,
    pub sg_bytes: u64,
    pub sg_ours: Duration,
    pub sg_kernel: Option<Duration>,
    pub kernel_skip: Option<String>,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn dev() -> Bdf {
    Bdf::new(0, 3, 0, 0).unwrap_or_else(|| unreachable!())
}

/// The pieces of the transfer of `len` bytes at byte `at` of a mapped buffer, as a
/// PRP list would describe them.
fn pieces_at(
    segs: &[peerdma::dma::DmaSegment],
    starts: &[u64],
    mut at: u64,
    len: u64,
) -> Result<Vec<(peerdma::addr::DmaAddr, u64)>> {
    let mut i = starts.partition_point(|&s| s <= at) - 1;
    let mut done = 0u64;
    let mut pieces = Vec::new();
    while done < len {
        let s = segs
            .get(i)
            .ok_or_else(|| anyhow::anyhow!("the mapping is shorter than the transfer"))?;
        let off = at - starts[i];
        let n = (s.len - off).min(len - done);
        pieces.push((peerdma::addr::DmaAddr(s.addr.0 + off), n));
        done += n;
        at += n;
        i += 1;
    }
    Ok(pieces)
}

/// Byte offset of each segment in its buffer.
fn starts(segs: &[peerdma::dma::DmaSegment]) -> Vec<u64> {
    segs.iter()
        .scan(0u64, |at, s| {
            let here = *at;
            *at += s.len;
            Some(here)
        })
        .collect()
}

/// Runs both benchmarks: `transfer` bytes per DMA, `sg_bytes` for get_user_dma_sg.
pub fn run(transfer: u64, sg_bytes: u64, runs: usize) -> Result<DmaFigures> {
    let topo = Arc::new(preset("workstation")?);
    let span = 64 * transfer;
    // Three buffers of `span` (one contiguous, two interleaved) and the big one.
    let phys = PhysMem::new(3 * span + sg_bytes + (64 << 20))?;
    let dma = Dma::new(topo, phys.clone(), true).attach(dev())?;
    // A GPU driver's setting (amdgpu and nouveau allow 4 GiB segments).
    dma.set_max_segment(u64::from(u32::MAX));
    let src: Vec<u8> = (0..transfer).map(|i| (i * 31 % 251) as u8).collect();
    let reps = 64;
    // Contiguous: frames handed out in order.
    let mm = Mm::new(&phys);
    let a = mm.mmap_anon(span, Prot::RW)?;
    super::make_resident(&mm, a, span)?;
    let contig = get_user_dma_sg(&mm, &dma, UserSg::new(a, span, Direction::Bidirectional))?;
    // Scattered: two processes touch pages alternately, so each one's frames are two
    // apart and no segment is longer than a page.
    let mm2 = Mm::new(&phys);
    let other = Mm::new(&phys);
    let b = mm2.mmap_anon(span, Prot::RW)?;
    let c = other.mmap_anon(span, Prot::RW)?;
    for off in (0..span).step_by(PAGE_SIZE as usize) {
        mm2.write(VirtAddr(b.0 + off), &[1])?;
        other.write(VirtAddr(c.0 + off), &[1])?;
    }
    let scat = get_user_dma_sg(&mm2, &dma, UserSg::new(b, span, Direction::Bidirectional))?;
    anyhow::ensure!(
        scat.sg().entries().iter().all(|e| e.len <= PAGE_SIZE),
        "scattered frames coalesced"
    );
    let contig_segments = contig.segments();
    // Fault the baseline's destination in, as the mapped buffers are.
    let mut dst = vec![1u8; span as usize];
    // The three copies take turns transfer by transfer, so machine noise hits all alike.
    let scat_segments = scat.segments();
    let (cs, ss) = (starts(&contig_segments), starts(&scat_segments));
    let (mut tc, mut ts, mut tm) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs.max(1) {
        let (mut c, mut sc, mut m) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
        for r in 0..reps {
            let at = (r * 7 % 64) as u64 * transfer;
            let p = pieces_at(&contig_segments, &cs, at, transfer)?;
            let t = Instant::now();
            dma.dma_write_sg(&p, &src)?;
            c += t.elapsed();
            let p = pieces_at(&scat_segments, &ss, at, transfer)?;
            let t = Instant::now();
            dma.dma_write_sg(&p, &src)?;
            sc += t.elapsed();
            let t = Instant::now();
            dst[at as usize..at as usize + src.len()].copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&dst);
            m += t.elapsed();
        }
        tc.push(c);
        ts.push(sc);
        tm.push(m);
    }
    anyhow::ensure!(
        dma.dma().sanitizer().is_clean(),
        "sanitizer violations during the benchmark"
    );
    drop((contig, scat));
    // get_user_dma_sg of resident memory vs io_uring registration.
    let big = mm.mmap_anon(sg_bytes, Prot::RW)?;
    super::make_resident(&mm, big, sg_bytes)?;
    let mut ours = Vec::new();
    let mut kernel = Vec::new();
    let mut skip = None;
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        let sg = get_user_dma_sg(
            &mm,
            &dma,
            UserSg::new(big, sg_bytes, Direction::Bidirectional),
        )?;
        drop(sg);
        ours.push(t.elapsed());
        if skip.is_none() {
            match super::mm::pin_kernel(sg_bytes) {
                Ok((d, ())) => kernel.push(d),
                Err(e) => skip = Some(format!("{e:#}")),
            }
        }
    }
    Ok(DmaFigures {
        transfer,
        contiguous: median(tc),
        scattered: median(ts),
        memcpy: median(tm),
        sg_bytes,
        sg_ours: median(ours),
        sg_kernel: (!kernel.is_empty()).then(|| median(kernel)),
        kernel_skip: skip,
    })
}

/// Prints the figures against the goals.
pub fn print(f: &DmaFigures) {
    let gbs = |d: Duration| (64 * f.transfer) as f64 / d.as_secs_f64() / 1e9;
    crate::outln!(
        "dma benchmark: 64 device writes of {} KiB, IOMMU on, medians of runs",
        f.transfer >> 10
    );
    crate::outln!("{}", crate::bench::RATIOS);
    crate::outln!(
        "  memcpy baseline                    {:>7.2} GB/s",
        gbs(f.memcpy)
    );
    for (name, d) in [
        ("contiguous frames", f.contiguous),
        ("scattered frames", f.scattered),
    ] {
        crate::outln!(
            "  DMA engine, {name:<20} {:>7.2} GB/s   ratio {:.2}x memcpy (goal >= 0.8x)",
            gbs(d),
            f.memcpy.as_secs_f64() / d.as_secs_f64()
        );
    }
    let pages = f.sg_bytes / PAGE_SIZE;
    let mpps = |d: Duration| pages as f64 / d.as_secs_f64() / 1e6;
    match f.sg_kernel {
        Some(k) => crate::outln!(
            "  get_user_dma_sg {} MiB + release   {:>8.2} ms {:>6.1} Mpages/s   kernel io_uring register+unregister {:>8.2} ms {:>6.1} Mpages/s   ratio {:.2}x (goal >= 1x)",
            f.sg_bytes >> 20,
            f.sg_ours.as_secs_f64() * 1e3,
            mpps(f.sg_ours),
            k.as_secs_f64() * 1e3,
            mpps(k),
            k.as_secs_f64() / f.sg_ours.as_secs_f64()
        ),
        None => crate::outln!(
            "  get_user_dma_sg {} MiB + release   {:>8.2} ms   kernel baseline skipped: {}",
            f.sg_bytes >> 20,
            f.sg_ours.as_secs_f64() * 1e3,
            f.kernel_skip.as_deref().unwrap_or("io_uring unavailable")
        ),
    }
}
