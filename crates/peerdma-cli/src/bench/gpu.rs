//! `peerdma bench gpu`: the GPU model's unified memory, against memcpy of the same bytes
//! measured in the same run:
//! - GPU faults with migrate-on-first-touch over resident process pages (each GPU
//!   fault migrates one page into VRAM, copying it), pages/s;
//! - the same with remote access (each GPU fault maps the system page where it is);
//! - the GPU then reading the whole buffer through its page table (no faults).
//!
//! Still to come with buffer objects (docs/gpu.md): the copy engine and BO eviction.

use std::time::{Duration, Instant};

use anyhow::Result;
use peerdma::addr::{Bdf, PAGE_SIZE};
use peerdma::dma::Dma;
use peerdma::drivers::gpu::{Gpu, Placement};
use peerdma::fabric::preset;
use peerdma::mem::PhysMem;
use peerdma::mm::{Mm, Prot};
use peerdma::sync::Arc;

/// Results of one run.
pub struct GpuFigures {
    pub pages: u64,
    pub migrate_on_touch: Duration,
    pub remote: Duration,
    pub mapped_read: Duration,
    pub memcpy: Duration,
}

/// A fresh resident buffer of `bytes` in a new address space, and a GPU context on it
/// with `placement`; the first GPU pass over it (a checksum) is timed.
fn first_touch(
    phys: &Arc<PhysMem>,
    gpu: &Arc<Gpu>,
    bytes: u64,
    placement: Placement,
) -> Result<(Duration, Duration)> {
    let mm = Mm::new(phys);
    let a = mm.mmap_anon(bytes, Prot::RW)?;
    super::make_resident(&mm, a, bytes)?;
    let ctx = gpu.open(&mm);
    ctx.set_placement(a, bytes, placement)?;
    let t = Instant::now();
    let sum = ctx.checksum(a, bytes)?;
    let touch = t.elapsed();
    // Everything mapped now: the GPU reads it without faulting.
    let t = Instant::now();
    anyhow::ensure!(
        ctx.checksum(a, bytes)? == sum,
        "the GPU read different bytes"
    );
    let mapped = t.elapsed();
    drop(ctx);
    mm.exit();
    anyhow::ensure!(gpu.vram_bytes().1 == 0, "VRAM was not freed at exit");
    Ok((touch, mapped))
}

/// Runs the benchmarks over `bytes`, `runs` alternating times; medians are reported.
pub fn run(bytes: u64, runs: usize) -> Result<GpuFigures> {
    let bytes = bytes.next_multiple_of(PAGE_SIZE);
    let phys = PhysMem::new(bytes + (64 << 20))?;
    let bdf: Bdf = "0000:03:00.0".parse()?;
    let dma = Dma::new(Arc::new(preset("workstation")?), phys.clone(), false);
    let gpu = Gpu::new(&dma, bdf, bytes + (64 << 20))?;
    let src = vec![1u8; bytes as usize];
    let mut dst = vec![2u8; bytes as usize];
    let (mut mig, mut rem, mut rd, mut cpy) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs.max(1) {
        let (touch, mapped) = first_touch(&phys, &gpu, bytes, Placement::MigrateOnTouch)?;
        mig.push(touch);
        rd.push(mapped);
        rem.push(first_touch(&phys, &gpu, bytes, Placement::Remote)?.0);
        let t = Instant::now();
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&dst);
        cpy.push(t.elapsed());
    }
    Ok(GpuFigures {
        pages: bytes / PAGE_SIZE,
        migrate_on_touch: super::median(mig),
        remote: super::median(rem),
        mapped_read: super::median(rd),
        memcpy: super::median(cpy),
    })
}

/// Prints the figures beside memcpy.
pub fn print(f: &GpuFigures) {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mpps = |d: Duration| f.pages as f64 / d.as_secs_f64() / 1e6;
    let ratio = |d: Duration| f.memcpy.as_secs_f64() / d.as_secs_f64();
    println!(
        "gpu benchmark: unified memory over {} pages ({} MiB), medians of alternating runs; memcpy of the same bytes {:.2} ms",
        f.pages,
        (f.pages * PAGE_SIZE) >> 20,
        ms(f.memcpy)
    );
    for (name, d) in [
        ("GPU first touch, migrate into VRAM", f.migrate_on_touch),
        ("GPU first touch, remote access", f.remote),
        ("GPU read, all pages mapped", f.mapped_read),
    ] {
        println!(
            "  {name:<36} {:>9.2} ms  {:>6.2} Mpages/s  {:.2}x memcpy",
            ms(d),
            mpps(d),
            ratio(d)
        );
    }
}
