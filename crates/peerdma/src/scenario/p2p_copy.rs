//! The main job, modelled on p2pmem-test: allocate p2p memory from one NVMe drive's
//! controller memory buffer, map it into a process, read chunks from another drive
//! into it and write them from it to the first drive, each transfer through
//! `get_user_dma_sg()` — so the data crosses the switch by bus address where the
//! fabric allows — then do the same copy through a buffer in host RAM, and verify
//! every byte by checksum.

use std::os::unix::fs::FileExt;
use std::time::Instant;

use serde::Serialize;

use crate::addr::{Bdf, VirtAddr};
use crate::dma::{Direction, DmaStats};
use crate::drivers::nvme::{DataPointer, Nvme, NvmeError};
use crate::fabric::{calc_map_type_and_dist, MapType};
use crate::gup::{get_user_dma_sg, GupError, UserSg};
use crate::host::Host;
use crate::mm::{Mm, MmError, Prot};
use crate::p2pmem::P2pError;
use crate::sync::Arc;

/// What to copy.
#[derive(Clone, Debug)]
pub struct P2pCopyParams {
    /// Bytes per transfer (a multiple of the LBA size, at most the CMB).
    pub chunk_size: u64,
    /// Transfers.
    pub chunks: u64,
    /// Seed of the test data.
    pub seed: u64,
    /// The drive read from; by default the one closest to the target.
    pub source: Option<Bdf>,
    /// The drive whose CMB is used and which is written; by default the first with a
    /// published CMB.
    pub target: Option<Bdf>,
}

impl Default for P2pCopyParams {
    fn default() -> Self {
        P2pCopyParams {
            chunk_size: 1 << 20,
            chunks: 64,
            seed: 0x5eed,
            source: None,
            target: None,
        }
    }
}

/// One copy's figures.
#[derive(Clone, Debug, Serialize)]
pub struct Phase {
    /// Bytes copied.
    pub bytes: u64,
    /// Wall time.
    pub seconds: f64,
    /// Bytes per second.
    pub bytes_per_second: f64,
    /// Whether every chunk arrived intact.
    pub verified: bool,
}

/// What the job did.
#[derive(Clone, Debug, Serialize)]
pub struct P2pCopyReport {
    /// The drive read from.
    pub source: String,
    /// The drive written to, whose CMB held the data.
    pub target: String,
    /// How the source reaches the CMB: the kernel's map type.
    pub source_to_cmb: MapType,
    /// Why.
    pub source_to_cmb_reason: String,
    /// Chunk size.
    pub chunk_size: u64,
    /// Chunks.
    pub chunks: u64,
    /// The copy through the CMB.
    pub p2p: Phase,
    /// The same copy through host RAM.
    pub host_ram: Phase,
    /// Bytes by path and mapping counts, from the DMA engine.
    pub dma: DmaStats,
    /// Pages pinned by `get_user_dma_sg`.
    pub pages_pinned: u64,
    /// Pins and live mappings left at the end (0 when nothing leaked).
    pub pins_left: u64,
    /// Live DMA mappings left at the end.
    pub mappings_left: usize,
    /// Sanitizer violations, one line each.
    pub sanitizer: Vec<String>,
}

/// Why the job failed.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// No suitable pair of drives.
    #[error("no drives to copy between: {0}")]
    NoPair(String),
    /// Bad parameters.
    #[error("invalid parameters: {0}")]
    Params(String),
    /// Pinning or mapping refused (a peer the fabric cannot reach lands here).
    #[error(transparent)]
    Gup(#[from] GupError),
    /// A command failed.
    #[error(transparent)]
    Nvme(#[from] NvmeError),
    /// The CMB refused an allocation.
    #[error(transparent)]
    P2p(#[from] P2pError),
    /// The process's address space refused.
    #[error(transparent)]
    Mm(#[from] MmError),
    /// Test data could not be written or read back.
    #[error("namespace file of {dev}")]
    Io {
        /// The drive.
        dev: Bdf,
        /// The OS error.
        source: std::io::Error,
    },
}

impl CopyError {
    /// The kernel's error number.
    pub fn errno(&self) -> crate::errno::Errno {
        use crate::errno::Errno;
        match self {
            CopyError::NoPair(_) => Errno::ENODEV,
            CopyError::Params(_) => Errno::EINVAL,
            CopyError::Gup(e) => e.errno(),
            CopyError::Nvme(e) => e.errno(),
            CopyError::P2p(e) => e.errno(),
            CopyError::Mm(e) => e.errno(),
            CopyError::Io { .. } => Errno::EIO,
        }
    }
}

/// Deterministic test bytes for chunk `i`.
fn fill(seed: u64, i: u64, buf: &mut [u8]) {
    let mut x = seed ^ (i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    for chunk in buf.chunks_mut(8) {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
    }
}

fn checksum(buf: &[u8]) -> u64 {
    // FNV-1a: enough to tell chunks apart.
    buf.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn pick(host: &Host, p: &P2pCopyParams) -> Result<(Arc<Nvme>, Arc<Nvme>), CopyError> {
    let target = match p.target {
        Some(t) => host
            .device::<Nvme>(t)
            .ok_or_else(|| CopyError::NoPair(format!("{t} is not an NVMe drive of this host")))?,
        None => host
            .devices_of::<Nvme>()
            .into_iter()
            .find(|n| n.cmb().is_some_and(|c| c.published()))
            .ok_or_else(|| {
                let each: Vec<String> = host
                    .devices_of::<Nvme>()
                    .iter()
                    .map(|n| format!("{}: {}", n.dev(), n.cmb_status()))
                    .collect();
                CopyError::NoPair(if each.is_empty() {
                    "no NVMe drive is bound on this host".into()
                } else {
                    format!(
                        "no drive has a published controller memory buffer ({})",
                        each.join("; ")
                    )
                })
            })?,
    };
    if target.cmb().is_none() {
        return Err(CopyError::NoPair(format!(
            "{} has no usable CMB: {}",
            target.dev(),
            target.cmb_status()
        )));
    }
    let topo = host.topology();
    let source = match p.source {
        Some(s) => host
            .device::<Nvme>(s)
            .ok_or_else(|| CopyError::NoPair(format!("{s} is not an NVMe drive of this host")))?,
        None => {
            let t = topo
                .lookup(target.dev())
                .ok_or_else(|| CopyError::NoPair("target not in fabric".into()))?;
            host.devices_of::<Nvme>()
                .into_iter()
                .filter(|n| n.dev() != target.dev())
                .min_by_key(|n| {
                    topo.lookup(n.dev())
                        .map_or(u32::MAX, |s| calc_map_type_and_dist(topo, t, s).distance)
                })
                .ok_or_else(|| CopyError::NoPair("only one NVMe drive".into()))?
        }
    };
    if source.dev() == target.dev() {
        return Err(CopyError::NoPair(
            "source and target are the same drive".into(),
        ));
    }
    Ok((source, target))
}

/// Copies `chunks` chunks from the source drive to the target drive through the
/// target's CMB mapped into a process, then through host RAM, verifying both.
/// `progress(done, total)` is called after each chunk of both phases.
pub fn run(
    host: &Host,
    p: &P2pCopyParams,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<P2pCopyReport, CopyError> {
    let (src, dst) = pick(host, p)?;
    let lba = u64::from(src.lba_size().max(dst.lba_size()));
    let cmb = dst
        .cmb()
        .cloned()
        .ok_or_else(|| CopyError::NoPair("target lost its CMB".into()))?;
    if p.chunk_size == 0 || !p.chunk_size.is_multiple_of(lba) {
        return Err(CopyError::Params(format!(
            "chunk size {:#x} is not a multiple of the {lba}-byte block",
            p.chunk_size
        )));
    }
    if p.chunk_size > cmb.size() {
        return Err(CopyError::Params(format!(
            "chunk size {:#x} exceeds the CMB of {:#x} bytes",
            p.chunk_size,
            cmb.size()
        )));
    }
    let total = p.chunk_size * p.chunks;
    let need = 2 * total;
    for n in [&src, &dst] {
        if n.nlba() * u64::from(n.lba_size()) < need {
            return Err(CopyError::Params(format!(
                "{} holds {:#x} bytes, the job needs {need:#x}",
                n.dev(),
                n.nlba() * u64::from(n.lba_size())
            )));
        }
    }
    let topo = host.topology();
    let verdict = match (topo.lookup(cmb.dev()), topo.lookup(src.dev())) {
        (Some(a), Some(b)) => calc_map_type_and_dist(topo, a, b),
        _ => return Err(CopyError::NoPair("drive not in fabric".into())),
    };
    // Test data on the source drive, and its checksums.
    let mut sums = Vec::with_capacity(p.chunks as usize);
    let mut buf = vec![0u8; p.chunk_size as usize];
    for i in 0..p.chunks {
        fill(p.seed, i, &mut buf);
        sums.push(checksum(&buf));
        src.backing()
            .write_all_at(&buf, i * p.chunk_size)
            .map_err(|source| CopyError::Io {
                dev: src.dev(),
                source,
            })?;
    }
    let dma = host.dma().clone();
    let mm = host.spawn();
    let mut pinned = 0u64;
    let steps = 2 * p.chunks;
    let mut done = 0u64;
    // Copy through one buffer: source reads into it, target writes from it.
    let mut copy =
        |mm: &Arc<Mm>, buf: VirtAddr, dst_base: u64, pinned: &mut u64| -> Result<f64, CopyError> {
            let t = Instant::now();
            let nlb_src = p.chunk_size / u64::from(src.lba_size());
            let nlb_dst = p.chunk_size / u64::from(dst.lba_size());
            for i in 0..p.chunks {
                let sg = get_user_dma_sg(
                    mm,
                    src.dma(),
                    UserSg::new(buf, p.chunk_size, Direction::FromDevice),
                )?;
                *pinned += sg.pinned().len() as u64;
                src.read(
                    i * nlb_src,
                    nlb_src,
                    &DataPointer::for_segments(&sg.segments()),
                )?;
                drop(sg);
                let sg = get_user_dma_sg(
                    mm,
                    dst.dma(),
                    UserSg::new(buf, p.chunk_size, Direction::ToDevice),
                )?;
                *pinned += sg.pinned().len() as u64;
                dst.write(
                    (dst_base + i * p.chunk_size) / u64::from(dst.lba_size()),
                    nlb_dst,
                    &DataPointer::for_segments(&sg.segments()),
                )?;
                drop(sg);
                done += 1;
                progress(done, steps);
            }
            Ok(t.elapsed().as_secs_f64())
        };
    let verify = |base: u64| -> Result<bool, CopyError> {
        let mut b = vec![0u8; p.chunk_size as usize];
        for (i, sum) in sums.iter().enumerate() {
            dst.backing()
                .read_exact_at(&mut b, base + i as u64 * p.chunk_size)
                .map_err(|source| CopyError::Io {
                    dev: dst.dev(),
                    source,
                })?;
            if checksum(&b) != *sum {
                return Ok(false);
            }
        }
        Ok(true)
    };
    let before = dma.stats();
    // Phase 1: through the target's CMB.
    let p2p_buf = cmb.mmap(&mm, p.chunk_size, true, 0, Prot::RW)?;
    let p2p_secs = copy(&mm, p2p_buf, 0, &mut pinned)?;
    mm.munmap(p2p_buf, p.chunk_size)?;
    let p2p_ok = verify(0)?;
    // Phase 2: through host RAM, into the second half of the target.
    let ram_buf = mm.mmap_anon(p.chunk_size, Prot::RW)?;
    let ram_secs = copy(&mm, ram_buf, total, &mut pinned)?;
    mm.munmap(ram_buf, p.chunk_size)?;
    let ram_ok = verify(total)?;
    mm.exit();
    let after = dma.stats();
    let pins_left = cmb.region().usage().pinned;
    let phase = |secs: f64, ok: bool| Phase {
        bytes: total,
        seconds: secs,
        bytes_per_second: if secs > 0.0 { total as f64 / secs } else { 0.0 },
        verified: ok,
    };
    Ok(P2pCopyReport {
        source: src.dev().to_string(),
        target: dst.dev().to_string(),
        source_to_cmb: verdict.map_type,
        source_to_cmb_reason: verdict.reason(),
        chunk_size: p.chunk_size,
        chunks: p.chunks,
        p2p: phase(p2p_secs, p2p_ok),
        host_ram: phase(ram_secs, ram_ok),
        dma: after.since(&before),
        pages_pinned: pinned,
        pins_left,
        mappings_left: dma.live_mappings(),
        sanitizer: dma
            .sanitizer()
            .violations()
            .iter()
            .map(ToString::to_string)
            .collect(),
    })
}
