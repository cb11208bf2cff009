//! The HMM job (`peerdma run hmm`): a process buffer mirrored into a GPU, touched by
//! GPU work that migrates it into VRAM on first touch, under VRAM pressure (VRAM
//! smaller than the buffer, and an eviction between passes), then read by the CPU,
//! which brings every page back. Every u32 is checked, and the report counts GPU
//! faults, migrations each way, remote mappings and evictions.

use std::time::Instant;

use crate::addr::{Bdf, PAGE_SIZE};
use crate::drivers::gpu::{Gpu, GpuError, GpuStats};
use crate::host::Host;
use crate::mm::{MmError, Prot};

/// What the job does.
#[derive(Clone, Debug)]
pub struct HmmJobParams {
    /// Bytes of process memory the GPU works on (whole pages).
    pub buffer_bytes: u64,
    /// GPU passes, each adding one to every u32; VRAM is evicted between passes.
    pub passes: u32,
    /// The GPU (default: the first GPU model of the host).
    pub gpu: Option<Bdf>,
}

impl Default for HmmJobParams {
    fn default() -> Self {
        HmmJobParams {
            buffer_bytes: 64 << 20,
            passes: 3,
            gpu: None,
        }
    }
}

/// One timed phase.
#[derive(Clone, Debug, serde::Serialize)]
pub struct HmmPhase {
    /// What ran.
    pub name: String,
    /// Wall time.
    pub seconds: f64,
    /// Pages in VRAM when it ended.
    pub vram_pages: u64,
}

/// What the job did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct HmmJobReport {
    /// The GPU.
    pub gpu: String,
    /// Its VRAM in bytes.
    pub vram_bytes: u64,
    /// The buffer in bytes.
    pub buffer_bytes: u64,
    /// GPU passes.
    pub passes: u32,
    /// The phases in order.
    pub phases: Vec<HmmPhase>,
    /// The GPU's counters over the job.
    pub gpu_stats: GpuStats,
    /// The GPU's checksum of the buffer before the CPU read it back.
    pub gpu_checksum: u64,
    /// The CPU's checksum of the same bytes.
    pub cpu_checksum: u64,
    /// Every u32 held its index plus the number of passes, as the CPU read it.
    pub verified: bool,
    /// Frames, pins and mappings left after the process exited (0 when nothing leaked).
    pub frames_left: u64,
    /// Whether the host was left with nothing held.
    pub quiescent: bool,
    /// Sanitizer violations (GPU work reaches memory through the GPU page table, not
    /// through DMA mappings, so this stays empty until the copy engine does DMA).
    pub sanitizer: Vec<String>,
}

/// Why the job could not run.
#[derive(Debug, thiserror::Error)]
pub enum HmmJobError {
    /// No GPU model on the host (or not the one asked for).
    #[error("no GPU model {0} on this host (bind one: the topology needs a GPU-class function)")]
    NoGpu(String),
    /// A malformed request.
    #[error("{0}")]
    Invalid(String),
    /// The process's memory refused.
    #[error(transparent)]
    Mm(#[from] MmError),
    /// The GPU refused.
    #[error(transparent)]
    Gpu(#[from] GpuError),
}

/// Runs the job on `host`, calling `progress(phase, of)` as phases end.
pub fn run(
    host: &Host,
    params: &HmmJobParams,
    progress: &mut dyn FnMut(u32, u32),
) -> Result<HmmJobReport, HmmJobError> {
    let gpus = host.devices_of::<Gpu>();
    let gpu = match params.gpu {
        Some(b) => gpus.into_iter().find(|g| g.bdf() == b),
        None => gpus.into_iter().next(),
    }
    .ok_or_else(|| HmmJobError::NoGpu(params.gpu.map_or(String::new(), |b| b.to_string())))?;
    let len = params.buffer_bytes.next_multiple_of(PAGE_SIZE);
    if len == 0 || params.passes == 0 {
        return Err(HmmJobError::Invalid(
            "the HMM job needs a buffer and at least one pass".into(),
        ));
    }
    let before = gpu.stats();
    let proc = host.spawn();
    let a = proc.mmap_anon(len, Prot::RW)?;
    let steps = params.passes + 2;
    let mut phases = Vec::new();
    let mut phase = |name: String, t: Instant, phases: &mut Vec<HmmPhase>| {
        phases.push(HmmPhase {
            name,
            seconds: t.elapsed().as_secs_f64(),
            vram_pages: gpu.vram_bytes().1 / PAGE_SIZE,
        });
        progress(phases.len() as u32, steps);
    };
    // The CPU fills the buffer: u32 i holds i.
    let t = Instant::now();
    let chunk = 1u64 << 20;
    let mut buf = vec![0u8; chunk as usize];
    let mut at = 0;
    while at < len {
        let n = chunk.min(len - at);
        for (k, w) in buf[..n as usize].chunks_exact_mut(4).enumerate() {
            w.copy_from_slice(&((at / 4 + k as u64) as u32).to_ne_bytes());
        }
        proc.write(crate::addr::VirtAddr(a.0 + at), &buf[..n as usize])?;
        at += n;
    }
    phase("cpu fill".into(), t, &mut phases);
    let ctx = gpu.open(&proc);
    for pass in 1..=params.passes {
        let t = Instant::now();
        ctx.add_u32(a, len, 1)?;
        let name = if pass < params.passes {
            // VRAM pressure between passes: everything goes back to RAM.
            gpu.evict()?;
            format!("gpu pass {pass}, evict")
        } else {
            format!("gpu pass {pass}")
        };
        phase(name, t, &mut phases);
    }
    let gpu_checksum = ctx.checksum(a, len)?;
    // The CPU reads it all back (each VRAM page faults home) and checks every u32.
    let t = Instant::now();
    let mut verified = true;
    let mut cpu_checksum = 0u64;
    let mut at = 0;
    while at < len {
        let n = chunk.min(len - at);
        proc.read(crate::addr::VirtAddr(a.0 + at), &mut buf[..n as usize])?;
        cpu_checksum = buf[..n as usize]
            .iter()
            .fold(cpu_checksum, |s, &b| s.wrapping_add(u64::from(b)));
        for (k, w) in buf[..n as usize].chunks_exact(4).enumerate() {
            let want = ((at / 4 + k as u64) as u32).wrapping_add(params.passes);
            verified &= u32::from_ne_bytes([w[0], w[1], w[2], w[3]]) == want;
        }
        at += n;
    }
    phase("cpu read back".into(), t, &mut phases);
    drop(ctx);
    proc.exit();
    let q = host.quiescent();
    let after = gpu.stats();
    Ok(HmmJobReport {
        gpu: gpu.bdf().to_string(),
        vram_bytes: gpu.vram_bytes().0,
        buffer_bytes: len,
        passes: params.passes,
        phases,
        gpu_stats: after.since(&before),
        gpu_checksum,
        cpu_checksum,
        verified: verified && gpu_checksum == cpu_checksum,
        frames_left: q.frames(),
        quiescent: q.is_clean(),
        sanitizer: host
            .dma()
            .sanitizer()
            .violations()
            .iter()
            .map(ToString::to_string)
            .collect(),
    })
}
