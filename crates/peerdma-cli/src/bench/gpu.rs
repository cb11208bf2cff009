//! `peerdma bench gpu`: the GPU model's unified memory, against memcpy of the same bytes
//! measured in the same run:
//! - GPU faults with migrate-on-first-touch over resident process pages (each GPU
//!   fault migrates one page into VRAM, copying it), pages/s;
//! - the same with remote access (each GPU fault maps the system page where it is);
//! - the GPU then reading the whole buffer through its page table (no faults);
//! - the copy engine in 1 MiB blocks: VRAM to VRAM, VRAM to system RAM (a DMA mapping
//!   of kernel memory for the GPU), and VRAM to a peer GPU's BAR (a BO of the GPU at
//!   0000:04:00.0, by bus address through the switch), against memcpy of 1 MiB blocks;
//! - eviction of buffer objects to system RAM and back into VRAM, GB/s against memcpy
//!   of the same bytes.

use std::time::{Duration, Instant};

use anyhow::Result;
use peerdma::addr::Pfn;
use peerdma::addr::{Bdf, PAGE_SIZE};
use peerdma::dma::{Direction, Dma, SgTable};
use peerdma::drivers::gpu::{CeAddr, Gpu, Placement};
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
    /// Bytes each copy-engine run moved, in 1 MiB blocks.
    pub ce_bytes: u64,
    pub ce_vram_to_vram: Duration,
    pub ce_vram_to_ram: Duration,
    pub ce_vram_to_peer: Duration,
    /// memcpy of `ce_bytes` in 1 MiB blocks.
    pub ce_memcpy: Duration,
    /// Bytes of BOs evicted.
    pub bo_bytes: u64,
    pub bo_evict: Duration,
    pub bo_restore: Duration,
    /// memcpy of `bo_bytes`.
    pub bo_memcpy: Duration,
}

/// Copy-engine block size.
const BLOCK: u64 = 1 << 20;

/// One timed pass of the copy engine from BO `src` to `dst` block by block.
fn ce_pass(
    gpu: &Gpu,
    bytes: u64,
    dst: impl Fn(u64) -> CeAddr,
    src: impl Fn(u64) -> CeAddr,
) -> Result<Duration> {
    let t = Instant::now();
    for off in (0..bytes).step_by(BLOCK as usize) {
        gpu.ce_copy(dst(off), src(off), BLOCK)?;
    }
    Ok(t.elapsed())
}

/// memcpy of `bytes` in `block`-sized pieces between two buffers.
fn memcpy_blocks(src: &[u8], dst: &mut [u8], block: usize) -> Duration {
    let t = Instant::now();
    for (d, s) in dst.chunks_mut(block).zip(src.chunks(block)) {
        d.copy_from_slice(std::hint::black_box(s));
    }
    std::hint::black_box(&dst);
    t.elapsed()
}

/// A fresh resident buffer of `bytes` in a new address space, and a GPU context on it
/// with `placement`; the first GPU pass over it (a checksum) is timed.
fn first_touch(
    phys: &Arc<PhysMem>,
    gpu: &Arc<Gpu>,
    bytes: u64,
    placement: Placement,
) -> Result<(Duration, Duration)> {
    let used = gpu.vram_bytes().1;
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
    anyhow::ensure!(gpu.vram_bytes().1 == used, "VRAM was not freed at exit");
    Ok((touch, mapped))
}

/// Runs the benchmarks over `bytes`, `runs` alternating times; medians are reported.
pub fn run(bytes: u64, runs: usize) -> Result<GpuFigures> {
    let bytes = bytes.next_multiple_of(PAGE_SIZE);
    let ce_bytes = bytes.min(256 << 20).next_multiple_of(BLOCK);
    let bo_bytes = bytes.next_multiple_of(BLOCK);
    let phys = PhysMem::new(bytes + ce_bytes + bo_bytes + (64 << 20))?;
    let bdf: Bdf = "0000:03:00.0".parse()?;
    let dma = Dma::new(Arc::new(preset("workstation")?), phys.clone(), false);
    let gpu = Gpu::new(&dma, bdf, bytes + 2 * ce_bytes + (64 << 20))?;
    let peer = Gpu::new(&dma, "0000:04:00.0".parse()?, ce_bytes)?;
    // Copy-engine set-up: two BOs, kernel RAM mapped for the GPU, a peer BO mapped
    // for the GPU through the peer's BAR.
    let (a, b) = (gpu.bo_alloc(ce_bytes)?, gpu.bo_alloc(ce_bytes)?);
    let fill = vec![0x5au8; BLOCK as usize];
    for off in (0..ce_bytes).step_by(BLOCK as usize) {
        gpu.bo_write(a, off, &fill)?;
    }
    let pages = ce_bytes / PAGE_SIZE;
    let ram: Pfn = phys.ram().alloc_contig(pages, 1)?;
    let ram_map = gpu.dma().map_sg(
        &SgTable::from_runs(&[(ram, pages as u32)], 0, ce_bytes, gpu.dma().max_segment()),
        Direction::FromDevice,
    )?;
    let ram_addr = ram_map.segments()[0].addr;
    let pbo = peer.bo_alloc(ce_bytes)?;
    let peer_map = peer.bo_map_peer(pbo, gpu.dma(), Direction::FromDevice, None)?;
    let peer_addr = peer_map.mapping().segments()[0].addr;
    let dma_at = |base: peerdma::addr::DmaAddr| {
        move |off: u64| CeAddr::Dma(peerdma::addr::DmaAddr(base.0 + off))
    };
    let src = vec![1u8; bytes as usize];
    let mut dst = vec![2u8; bytes as usize];
    let (mut mig, mut rem, mut rd, mut cpy) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut vv, mut vr, mut vp, mut cm) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut ev, mut rs, mut bm) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs.max(1) {
        let (touch, mapped) = first_touch(&phys, &gpu, bytes, Placement::MigrateOnTouch)?;
        mig.push(touch);
        rd.push(mapped);
        rem.push(first_touch(&phys, &gpu, bytes, Placement::Remote)?.0);
        let t = Instant::now();
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&dst);
        cpy.push(t.elapsed());
        vv.push(ce_pass(
            &gpu,
            ce_bytes,
            |o| CeAddr::Bo(b, o),
            |o| CeAddr::Bo(a, o),
        )?);
        cm.push(memcpy_blocks(
            &src[..ce_bytes as usize],
            &mut dst[..ce_bytes as usize],
            BLOCK as usize,
        ));
        vr.push(ce_pass(&gpu, ce_bytes, dma_at(ram_addr), |o| {
            CeAddr::Bo(a, o)
        })?);
        vp.push(ce_pass(&gpu, ce_bytes, dma_at(peer_addr), |o| {
            CeAddr::Bo(a, o)
        })?);
        // Eviction: BOs of 64 MiB (or less) adding up to `bo_bytes`, written, moved
        // to system RAM and back.
        let chunk = bo_bytes.min(64 << 20);
        let bos = (0..bo_bytes / chunk)
            .map(|_| gpu.bo_alloc(chunk))
            .collect::<Result<Vec<_>, _>>()?;
        for &h in &bos {
            for off in (0..chunk).step_by(BLOCK as usize) {
                gpu.bo_write(h, off, &fill)?;
            }
        }
        let t = Instant::now();
        for &h in &bos {
            anyhow::ensure!(gpu.bo_evict(h)?, "{h} did not move");
        }
        ev.push(t.elapsed());
        let t = Instant::now();
        for &h in &bos {
            gpu.bo_validate(h)?;
        }
        rs.push(t.elapsed());
        bm.push(memcpy_blocks(
            &src[..bo_bytes as usize],
            &mut dst[..bo_bytes as usize],
            bo_bytes as usize,
        ));
        for h in bos {
            gpu.bo_free(h)?;
        }
    }
    // Every byte arrived.
    let mut check = vec![0u8; BLOCK as usize];
    gpu.bo_read(b, ce_bytes - BLOCK, &mut check)?;
    anyhow::ensure!(check == fill, "VRAM to VRAM copied wrong bytes");
    phys.ram()
        .read_span(Pfn(ram.0 + pages - BLOCK / PAGE_SIZE), 0, &mut check);
    anyhow::ensure!(check == fill, "VRAM to RAM copied wrong bytes");
    peer.bo_read(pbo, ce_bytes - BLOCK, &mut check)?;
    anyhow::ensure!(check == fill, "VRAM to the peer copied wrong bytes");
    anyhow::ensure!(dma.sanitizer().is_clean(), "the sanitizer saw a violation");
    drop((ram_map, peer_map));
    let frames: Vec<Pfn> = (0..pages).map(|i| Pfn(ram.0 + i)).collect();
    phys.ram().put_many(&frames);
    for h in [a, b] {
        gpu.bo_free(h)?;
    }
    peer.bo_free(pbo)?;
    Ok(GpuFigures {
        pages: bytes / PAGE_SIZE,
        migrate_on_touch: super::median(mig),
        remote: super::median(rem),
        mapped_read: super::median(rd),
        memcpy: super::median(cpy),
        ce_bytes,
        ce_vram_to_vram: super::median(vv),
        ce_vram_to_ram: super::median(vr),
        ce_vram_to_peer: super::median(vp),
        ce_memcpy: super::median(cm),
        bo_bytes,
        bo_evict: super::median(ev),
        bo_restore: super::median(rs),
        bo_memcpy: super::median(bm),
    })
}

/// Prints the figures beside memcpy.
pub fn print(f: &GpuFigures) {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mpps = |d: Duration| f.pages as f64 / d.as_secs_f64() / 1e6;
    let ratio = |d: Duration| f.memcpy.as_secs_f64() / d.as_secs_f64();
    crate::outln!(
        "gpu benchmark: unified memory over {} pages ({} MiB), medians of alternating runs; memcpy of the same bytes {:.2} ms",
        f.pages,
        (f.pages * PAGE_SIZE) >> 20,
        ms(f.memcpy)
    );
    crate::outln!("{}", crate::bench::RATIOS);
    for (name, d) in [
        ("GPU first touch, migrate into VRAM", f.migrate_on_touch),
        ("GPU first touch, remote access", f.remote),
        ("GPU read, all pages mapped", f.mapped_read),
    ] {
        crate::outln!(
            "  {name:<36} {:>9.2} ms  {:>6.2} Mpages/s  {:.2}x memcpy",
            ms(d),
            mpps(d),
            ratio(d)
        );
    }
    let gbps = |b: u64, d: Duration| b as f64 / d.as_secs_f64() / 1e9;
    // Rows of GB/s over `bytes`, each beside `memcpy` of the same bytes.
    let rows = |bytes: u64, memcpy: Duration, rows: &[(&str, Duration)]| {
        for &(name, d) in rows {
            crate::outln!(
                "    {name:<34} {:>9.2} GB/s  {:.2}x memcpy",
                gbps(bytes, d),
                memcpy.as_secs_f64() / d.as_secs_f64()
            );
        }
    };
    crate::outln!(
        "  copy engine, 1 MiB blocks over {} MiB; memcpy of 1 MiB blocks {:.2} GB/s",
        f.ce_bytes >> 20,
        gbps(f.ce_bytes, f.ce_memcpy)
    );
    rows(
        f.ce_bytes,
        f.ce_memcpy,
        &[
            ("VRAM to VRAM", f.ce_vram_to_vram),
            ("VRAM to system RAM", f.ce_vram_to_ram),
            ("VRAM to a peer's BAR", f.ce_vram_to_peer),
        ],
    );
    crate::outln!(
        "  BO eviction of {} MiB; memcpy of the same bytes {:.2} GB/s",
        f.bo_bytes >> 20,
        gbps(f.bo_bytes, f.bo_memcpy)
    );
    rows(
        f.bo_bytes,
        f.bo_memcpy,
        &[
            ("to system RAM", f.bo_evict),
            ("back into VRAM", f.bo_restore),
        ],
    );
}
