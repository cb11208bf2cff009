//! The RDMA job (`peerdma run`, `peerdma run rdma`): the 2016 dri-devel thread's
//! argument made executable on one machine. An RDMA NIC writes into memory that the
//! GPU wants to move, registered the three ways Linux grew:
//!
//! 1. a pinned MR over malloc'ed memory: the writes land, the GPU's attempt to migrate
//!    those pages is refused, the DMA addresses never change;
//! 2. an ODP MR over memory the GPU migrates into VRAM while the NIC writes: every byte
//!    lands once, invalidations wait for the NIC, faults and invalidations are counted;
//! 3. a dma-buf MR over a VRAM buffer object that the GPU evicts under pressure halfway
//!    through: move_notify, re-fault at the new place, no byte in stale storage;
//! 4. a long-term pin of VRAM: a pinned MR over a CPU mapping of it is refused, a
//!    pinned dma-buf MR blocks eviction;
//! 5. a VRAM buffer shared by two processes through a dma-buf fd, written by one, read
//!    by the other and by the NIC.
//!
//! Every byte is checked; the report says what moved where, how many faults,
//! invalidations and evictions it took, the sanitizer's verdict, and whether the host
//! was left with nothing held.

use std::time::Instant;

use crate::addr::{Bdf, VirtAddr, PAGE_SIZE};
use crate::dma::DmaStats;
use crate::drivers::gpu::{BoDomain, Gpu, GpuError, Location, P2pPolicy};
use crate::drivers::rnic::{
    Access, Context, Cq, Mr, Pd, Qp, QpState, Rnic, RnicError, RnicStats, SendOp, SendWr, Sge,
    WcStatus,
};
use crate::fabric::MapType;
use crate::host::{Host, Process};
use crate::mm::{MmError, Prot};
use crate::sync::Arc;

/// What the job does.
#[derive(Clone, Debug)]
pub struct RdmaJobParams {
    /// Bytes per RDMA WRITE.
    pub message_bytes: u64,
    /// Messages per case.
    pub messages: u64,
    /// The GPU (default: the first GPU model).
    pub gpu: Option<Bdf>,
}

impl Default for RdmaJobParams {
    fn default() -> Self {
        RdmaJobParams {
            message_bytes: 1 << 20,
            messages: 8,
            gpu: None,
        }
    }
}

/// One case of the story.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RdmaCase {
    /// Its number in the thread's list (1–5).
    pub case: u32,
    /// What it shows.
    pub name: String,
    /// The registration style used.
    pub registration: String,
    /// Bytes written (or read) by the NIC.
    pub bytes: u64,
    /// Wall time.
    pub seconds: f64,
    /// Every byte was where it should be.
    pub verified: bool,
    /// What happened, one line each.
    pub events: Vec<String>,
}

/// What the job did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RdmaJobReport {
    /// The GPU.
    pub gpu: String,
    /// The NIC the GPU's memory is registered with (the closest to the GPU).
    pub nic: String,
    /// The requester NIC.
    pub peer_nic: String,
    /// How the NIC reaches the GPU's BAR, and why.
    pub nic_to_gpu: String,
    /// The cases in order.
    pub cases: Vec<RdmaCase>,
    /// The responder NIC's counters over the job.
    pub nic_stats: RnicStats,
    /// Bytes the DMA engine moved by path over the job.
    pub dma: DmaStats,
    /// Sanitizer violations (empty: every device access was through a live mapping).
    pub sanitizer: Vec<String>,
    /// Whether the host held nothing once the processes exited.
    pub quiescent: bool,
}

/// Why the job could not run.
#[derive(Debug, thiserror::Error)]
pub enum RdmaJobError {
    /// The host lacks a device model the job needs.
    #[error("{0}")]
    Missing(String),
    /// A verb failed.
    #[error(transparent)]
    Rnic(#[from] RnicError),
    /// The GPU refused.
    #[error(transparent)]
    Gpu(#[from] GpuError),
    /// Process memory refused.
    #[error(transparent)]
    Mm(#[from] MmError),
    /// A dma-buf call failed.
    #[error(transparent)]
    DmaBuf(#[from] crate::dmabuf::DmaBufError),
    /// A work request failed.
    #[error("case {case}: a work request completed with {status:?}")]
    Completion {
        /// The case.
        case: u32,
        /// Its status.
        status: WcStatus,
    },
}

struct Side {
    p: Process,
    ctx: Arc<Context>,
    pd: Pd,
    cq: Arc<Cq>,
    qp: Arc<Qp>,
}

fn side(nic: &Arc<Rnic>, p: Process) -> Result<Side, RdmaJobError> {
    let ctx = nic.open(&p, p.files())?;
    let pd = ctx.alloc_pd()?;
    let cq = ctx.create_cq()?;
    let qp = ctx.create_qp(pd, &cq, &cq)?;
    Ok(Side { p, ctx, pd, cq, qp })
}

fn connect(a: &Side, b: &Side) -> Result<(), RdmaJobError> {
    for (x, y) in [(&a.qp, &b.qp), (&b.qp, &a.qp)] {
        x.modify(QpState::Init, None)?;
        x.modify(QpState::Rtr, Some(y))?;
        x.modify(QpState::Rts, None)?;
    }
    Ok(())
}

const RW: Access = Access(Access::LOCAL_WRITE.0 | Access::REMOTE_WRITE.0 | Access::REMOTE_READ.0);

fn pattern(n: usize, seed: u64) -> Vec<u8> {
    (0..n)
        .map(|i| ((i as u64).wrapping_mul(31) ^ seed.wrapping_mul(0x9e37)) as u8)
        .collect()
}

/// The requester's source buffer and the one-WR-at-a-time data path.
struct Requester {
    side: Side,
    src: VirtAddr,
    mr: Arc<Mr>,
    len: u64,
}

impl Requester {
    fn new(nic: &Arc<Rnic>, p: Process, len: u64) -> Result<Requester, RdmaJobError> {
        let side = side(nic, p)?;
        let src = side.p.mmap_anon(len, Prot::RW)?;
        let mr = side.ctx.reg_mr(side.pd, src, len, src.0, RW)?;
        Ok(Requester { side, src, mr, len })
    }

    fn post(&self, case: u32, op: SendOp, len: u64) -> Result<(), RdmaJobError> {
        self.side.qp.post_send(SendWr {
            wr_id: u64::from(case),
            op,
            sg: vec![Sge {
                addr: self.src.0,
                len: len as u32,
                lkey: self.mr.lkey(),
            }],
            signaled: true,
        })?;
        let wc = self.side.cq.poll(4);
        match wc.first() {
            Some(w) if w.status == WcStatus::Success => Ok(()),
            Some(w) => Err(RdmaJobError::Completion {
                case,
                status: w.status,
            }),
            None => Err(RdmaJobError::Completion {
                case,
                status: WcStatus::RetryExcErr,
            }),
        }
    }

    /// RDMA WRITEs `data` to `remote_addr` under `rkey`.
    fn write(
        &self,
        case: u32,
        data: &[u8],
        remote_addr: u64,
        rkey: u32,
    ) -> Result<(), RdmaJobError> {
        self.side.p.write(self.src, data)?;
        self.post(case, SendOp::Write { remote_addr, rkey }, data.len() as u64)
    }

    /// RDMA READs `len` bytes from `remote_addr` under `rkey`.
    fn read(
        &self,
        case: u32,
        len: u64,
        remote_addr: u64,
        rkey: u32,
    ) -> Result<Vec<u8>, RdmaJobError> {
        self.post(case, SendOp::Read { remote_addr, rkey }, len)?;
        let mut out = vec![0u8; len as usize];
        self.side.p.read(self.src, &mut out)?;
        Ok(out)
    }
}

/// A responder process with its own QP connected to the requester's.
fn responder(nic: &Arc<Rnic>, host: &Host, req: &mut Requester) -> Result<Side, RdmaJobError> {
    let b = side(nic, host.spawn())?;
    // A fresh requester QP for this responder.
    let cq = req.side.ctx.create_cq()?;
    let qp = req.side.ctx.create_qp(req.side.pd, &cq, &cq)?;
    req.side.qp = qp;
    req.side.cq = cq;
    connect(&req.side, &b)?;
    Ok(b)
}

/// Runs the job on `host`, calling `progress(case, of)` as cases end.
pub fn run(
    host: &Host,
    params: &RdmaJobParams,
    progress: &mut dyn FnMut(u32, u32),
) -> Result<RdmaJobReport, RdmaJobError> {
    let gpus = host.devices_of::<Gpu>();
    let gpu = match params.gpu {
        Some(b) => gpus.into_iter().find(|g| g.bdf() == b),
        None => gpus.into_iter().next(),
    }
    .ok_or_else(|| {
        RdmaJobError::Missing("the RDMA job needs a GPU model (a GPU-class function)".into())
    })?;
    let mut nics = host.devices_of::<Rnic>();
    if nics.is_empty() {
        return Err(RdmaJobError::Missing(format!(
            "the RDMA job needs a NIC model (a network-class function); {} has none",
            host.topology().source()
        )));
    }
    // The NIC closest to the GPU takes the GPU's memory; another one sends.
    let dist = |n: &Arc<Rnic>| {
        n.dma().verdict(gpu.bdf()).map_or(u32::MAX, |v| {
            if v.map_type == MapType::NotSupported {
                u32::MAX
            } else {
                v.distance
            }
        })
    };
    nics.sort_by_key(dist);
    let nic = nics[0].clone();
    // With one NIC, it talks to itself (loopback).
    let peer = nics.get(1).unwrap_or(&nics[0]).clone();
    let verdict = nic
        .dma()
        .verdict(gpu.bdf())
        .map(|v| format!("{} ({})", v.map_type, v.reason()))
        .unwrap_or_else(|e| e.to_string());
    let msg = params
        .message_bytes
        .next_multiple_of(PAGE_SIZE)
        .max(PAGE_SIZE);
    let n = params.messages.max(2);
    let total = msg * n;
    let dma_before = host.dma().stats();
    let nic_before = nic.stats();
    let mut cases = Vec::new();
    let steps = 5;
    let mut req = Requester::new(&peer, host.spawn(), msg)?;

    // 1. Pinned MR over malloc'ed memory; the GPU tries to migrate it.
    {
        let t = Instant::now();
        let b = responder(&nic, host, &mut req)?;
        let buf = b.p.mmap_anon(total, Prot::RW)?;
        let mr = b.ctx.reg_mr(b.pd, buf, total, buf.0, RW)?;
        let addrs = mr.dma_addrs();
        let gctx = gpu.open(&b.p);
        let mut moved = 0;
        for i in 0..n {
            req.write(1, &pattern(msg as usize, i), buf.0 + i * msg, mr.rkey())?;
            if i == n / 2 {
                moved = gctx.prefetch(buf, total, Location::Vram)?;
            }
        }
        let verified = verify(&b.p, buf, msg, n, 0)? && mr.dma_addrs() == addrs && moved == 0;
        cases.push(RdmaCase {
            case: 1,
            name: "pinned memory stays put".into(),
            registration: "pinned (ib_umem: FOLL_LONGTERM, pinned_vm charged)".into(),
            bytes: total,
            seconds: t.elapsed().as_secs_f64(),
            verified,
            events: vec![
                format!("{} pages pinned and charged to pinned_vm", b.p.pinned_vm()),
                format!("the GPU asked to migrate them into VRAM: {moved} moved (pinned pages are refused)"),
                format!(
                    "DMA addresses {} while the MR lived",
                    if mr.dma_addrs() == addrs { "never changed" } else { "CHANGED" }
                ),
            ],
        });
        drop(gctx);
        b.p.exit();
        progress(1, steps);
    }

    // 2. ODP MR over memory the GPU migrates into VRAM while the NIC writes.
    {
        let t = Instant::now();
        let b = responder(&nic, host, &mut req)?;
        let buf = b.p.mmap_anon(total, Prot::RW)?;
        let mr = b
            .ctx
            .reg_mr(b.pd, buf, total, buf.0, RW | Access::ON_DEMAND)?;
        let s0 = nic.stats();
        let g0 = gpu.stats();
        let gctx = gpu.open(&b.p);
        let stop = std::sync::atomic::AtomicBool::new(false);
        let result = std::thread::scope(|s| {
            let mover = s.spawn(|| {
                let mut moves = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    moves += gctx.prefetch(buf, total, Location::Vram).unwrap_or(0);
                    moves += gctx.prefetch(buf, total, Location::Ram).unwrap_or(0);
                }
                moves
            });
            let r = (0..n).try_for_each(|i| {
                req.write(
                    2,
                    &pattern(msg as usize, 100 + i),
                    buf.0 + i * msg,
                    mr.rkey(),
                )
            });
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let moves = mover.join().unwrap_or(0);
            r.map(|()| moves)
        });
        let moves = result?;
        let verified = verify(&b.p, buf, msg, n, 100)?;
        let s1 = nic.stats();
        let g1 = gpu.stats().since(&g0);
        cases.push(RdmaCase {
            case: 2,
            name: "on-demand paging follows memory the GPU moves".into(),
            registration: "ODP (ib_umem_odp: no pin, interval notifier, hmm_range_fault)".into(),
            bytes: total,
            seconds: t.elapsed().as_secs_f64(),
            verified,
            events: vec![
                format!(
                    "meanwhile the GPU migrated {} pages into VRAM and {} back ({moves} page moves asked)",
                    g1.migrated_to_vram, g1.migrated_to_ram
                ),
                format!(
                    "NIC page faults {} ({} pages), invalidations {} ({} pages), each waiting for the NIC's DMA in flight",
                    s1.odp_faults - s0.odp_faults,
                    s1.odp_pages_faulted - s0.odp_pages_faulted,
                    s1.odp_invalidations - s0.odp_invalidations,
                    s1.odp_pages_invalidated - s0.odp_pages_invalidated
                ),
                format!("pinned_vm charged: {} pages", b.p.pinned_vm()),
            ],
        });
        drop(gctx);
        b.p.exit();
        progress(2, steps);
    }

    // 3. dma-buf MR over a VRAM BO that the GPU evicts halfway through.
    {
        let t = Instant::now();
        let b = responder(&nic, host, &mut req)?;
        let bo = gpu.bo_alloc(total)?;
        let buf = gpu.bo_export(bo, P2pPolicy::MoveToRam)?;
        let fd = b.p.files().export_fd(&buf);
        let mr = b.ctx.reg_dmabuf_mr(b.pd, 0, total, 0, fd, RW)?;
        let s0 = nic.stats();
        let d0 = host.dma().stats();
        let mut events = Vec::new();
        let mut first_addr = None;
        let mut mid = d0;
        for i in 0..n {
            req.write(3, &pattern(msg as usize, 200 + i), i * msg, mr.rkey())?;
            if first_addr.is_none() && gpu.bo_info(bo)?.domain == BoDomain::Ram {
                events.push(
                    "the NIC cannot reach VRAM: the exporter moved the BO to system RAM at the first map (amdgpu's policy)"
                        .into(),
                );
            }
            first_addr = first_addr.or_else(|| mr.dma_addrs().first().copied());
            if i == n / 2 - 1 {
                mid = host.dma().stats();
                events.push(format!(
                    "first half: {:.1} MiB into VRAM through the switch, {:.1} MiB through a host bridge",
                    mib(mid.via_switch - d0.via_switch),
                    mib(mid.via_host_bridge - d0.via_host_bridge)
                ));
                // VRAM pressure: the GPU moves the BO to system RAM.
                if gpu.bo_evict(bo)? {
                    events.push(format!(
                        "the GPU evicted the BO to system RAM: move_notify reached {} importer(s), the NIC dropped its mapping",
                        buf.stats().attachments
                    ));
                } else {
                    events.push("the BO was in system RAM already: nothing to evict".into());
                }
                mid = host.dma().stats();
            }
        }
        let d1 = host.dma().stats();
        let s1 = nic.stats();
        let mut got = vec![0u8; total as usize];
        gpu.bo_read(bo, 0, &mut got)?;
        let want: Vec<u8> = (0..n)
            .flat_map(|i| pattern(msg as usize, 200 + i))
            .collect();
        let peer_after =
            (d1.via_switch - mid.via_switch) + (d1.via_host_bridge - mid.via_host_bridge);
        let verified = got == want && gpu.bo_info(bo)?.domain == BoDomain::Ram && peer_after == 0;
        events.push(format!(
            "re-faults at the new place: {} (move_notifies {}), DMA address {:#x} -> {:#x}",
            s1.dmabuf_faults - s0.dmabuf_faults,
            s1.dmabuf_move_notifies - s0.dmabuf_move_notifies,
            first_addr.unwrap_or(0),
            mr.dma_addrs().first().copied().unwrap_or(0)
        ));
        events.push(format!(
            "second half: {:.1} MiB into system RAM, {} bytes toward the GPU's BAR after the move",
            mib(msg * (n - n / 2)),
            peer_after
        ));
        cases.push(RdmaCase {
            case: 3,
            name: "RDMA into VRAM that the GPU evicts".into(),
            registration: "dma-buf (ib_umem_dmabuf: dynamic importer, peer-to-peer, move_notify)"
                .into(),
            bytes: total,
            seconds: t.elapsed().as_secs_f64(),
            verified,
            events,
        });
        b.ctx.dereg_mr(&mr)?;
        b.p.exit();
        drop(buf);
        gpu.bo_free(bo)?;
        progress(3, steps);
    }

    // 4. A long-term pin of VRAM: refused through a CPU mapping; a pinned dma-buf MR
    // blocks eviction.
    {
        let t = Instant::now();
        let b = responder(&nic, host, &mut req)?;
        let bo = gpu.bo_alloc(msg)?;
        let buf = gpu.bo_export(bo, P2pPolicy::MoveToRam)?;
        let va = buf.mmap(&b.p, 0, msg, Prot::RW)?;
        let (pin_line, pin_refused) = match b.ctx.reg_mr(b.pd, va, msg, va.0, RW) {
            Err(e) => (
                format!(
                    "a pinned MR (FOLL_LONGTERM) over a CPU mapping of the VRAM: refused ({})",
                    e.errno
                ),
                true,
            ),
            Ok(mr) => {
                b.ctx.dereg_mr(&mr)?;
                (
                    "a pinned MR over a CPU mapping of the VRAM was allowed (UNEXPECTED)".into(),
                    false,
                )
            }
        };
        b.p.munmap(va, msg)?;
        let fd = b.p.files().export_fd(&buf);
        let mr = b.ctx.reg_dmabuf_mr_pinned(b.pd, 0, msg, 0, fd, RW)?;
        req.write(4, &pattern(msg as usize, 400), 0, mr.rkey())?;
        let pinned_in = gpu.bo_info(bo)?.domain;
        // The GPU tries to move it the other way.
        let refused = match pinned_in {
            BoDomain::Vram => match gpu.bo_evict(bo) {
                Err(e) => format!("eviction refused: {e}"),
                Ok(_) => "eviction went ahead (UNEXPECTED)".into(),
            },
            BoDomain::Ram => match gpu.bo_validate(bo)? {
                BoDomain::Ram => "the NIC cannot reach VRAM, so the BO was pinned in system RAM; moving it back into VRAM is refused".into(),
                BoDomain::Vram => "the BO moved back into VRAM (UNEXPECTED)".into(),
            },
        };
        let stayed = gpu.bo_info(bo)?.domain == pinned_in;
        let mut got = vec![0u8; msg as usize];
        gpu.bo_read(bo, 0, &mut got)?;
        b.ctx.dereg_mr(&mr)?;
        let after = match pinned_in {
            BoDomain::Vram => gpu.bo_evict(bo)?,
            BoDomain::Ram => gpu.bo_validate(bo)? == BoDomain::Vram,
        };
        cases.push(RdmaCase {
            case: 4,
            name: "a long-term pin of VRAM is refused or blocks the GPU".into(),
            registration: "pinned (ib_umem) over VRAM, then pinned dma-buf (ib_umem_dmabuf_get_pinned)".into(),
            bytes: msg,
            seconds: t.elapsed().as_secs_f64(),
            verified: pin_refused && stayed && after && got == pattern(msg as usize, 400),
            events: vec![
                pin_line,
                format!("a pinned dma-buf MR instead: {refused}"),
                format!("after dereg the BO moved: {after}"),
            ],
        });
        b.p.exit();
        drop(buf);
        gpu.bo_free(bo)?;
        progress(4, steps);
    }

    // 5. A VRAM buffer shared by two processes through a dma-buf fd, read by the NIC.
    {
        let t = Instant::now();
        let bo = gpu.bo_alloc(msg)?;
        let buf = gpu.bo_export(bo, P2pPolicy::MoveToRam)?;
        let writer = host.spawn();
        let fd_w = writer.files().export_fd(&buf);
        drop(buf);
        let b = responder(&nic, host, &mut req)?;
        let fd_r = writer.files().pass(fd_w, b.p.files())?;
        let wbuf = writer.files().dma_buf(fd_w)?;
        let rbuf = b.p.files().dma_buf(fd_r)?;
        let wva = wbuf.mmap(&writer, 0, msg, Prot::RW)?;
        let rva = rbuf.mmap(&b.p, 0, msg, Prot::READ)?;
        let data = pattern(msg as usize, 500);
        writer.write(wva, &data)?;
        let mut seen = vec![0u8; msg as usize];
        b.p.read(rva, &mut seen)?;
        let mr = b.ctx.reg_dmabuf_mr(b.pd, 0, msg, 0, fd_r, RW)?;
        let in_vram = gpu.bo_info(bo)?.domain == BoDomain::Vram;
        let (nic_line, nic_ok) = match req.read(5, msg.min(req.len), 0, mr.rkey()) {
            Ok(by_nic) => (
                "the reader's mapping and the NIC's RDMA READ saw the writer's bytes".to_string(),
                by_nic == data,
            ),
            // No peer-to-peer to the GPU, and the CPU mappings pin the BO in VRAM: the
            // exporter cannot move it where the NIC reaches, so the NIC is refused.
            Err(RdmaJobError::Completion { status, .. }) if !mr_can_reach(&nic, &gpu) => (
                format!(
                    "the reader's mapping saw the writer's bytes; the NIC cannot reach VRAM and the CPU mappings keep the BO there: RDMA READ refused ({status:?})"
                ),
                true,
            ),
            Err(e) => return Err(e),
        };
        cases.push(RdmaCase {
            case: 5,
            name: "VRAM shared between processes".into(),
            registration: "dma-buf fd passed between processes".into(),
            bytes: msg,
            seconds: t.elapsed().as_secs_f64(),
            verified: seen == data && nic_ok && in_vram,
            events: vec![
                format!(
                    "fd {fd_w} in the writer is fd {fd_r} in the reader: one buffer ({})",
                    rbuf.describe()
                ),
                nic_line,
                format!("the buffer stayed in VRAM: {in_vram}"),
            ],
        });
        writer.munmap(wva, msg)?;
        b.p.munmap(rva, msg)?;
        drop((wbuf, rbuf, mr));
        writer.exit();
        b.p.exit();
        gpu.bo_free(bo)?;
        progress(5, steps);
    }

    let nic_stats = nic.stats();
    let dma = host.dma().stats();
    let Requester { side, mr, .. } = req;
    drop(mr);
    side.p.exit();
    let q = host.quiescent();
    Ok(RdmaJobReport {
        gpu: gpu.bdf().to_string(),
        nic: nic.bdf().to_string(),
        peer_nic: peer.bdf().to_string(),
        nic_to_gpu: verdict,
        cases,
        nic_stats: since(&nic_stats, &nic_before),
        dma: dma.since(&dma_before),
        sanitizer: host
            .dma()
            .sanitizer()
            .violations()
            .iter()
            .map(ToString::to_string)
            .collect(),
        quiescent: q.is_clean(),
    })
}

/// Whether `nic` gets peer-to-peer addresses of `gpu`'s VRAM (a BAR onto all of it,
/// and a fabric that lets the NIC reach it).
fn mr_can_reach(nic: &Rnic, gpu: &Gpu) -> bool {
    gpu.bar().is_some_and(|b| b.full)
        && nic
            .dma()
            .verdict(gpu.bdf())
            .is_ok_and(|v| v.map_type != MapType::NotSupported)
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

fn since(now: &RnicStats, before: &RnicStats) -> RnicStats {
    RnicStats {
        mrs: now.mrs,
        qps: now.qps,
        pinned_pages: now.pinned_pages,
        odp_faults: now.odp_faults - before.odp_faults,
        odp_pages_faulted: now.odp_pages_faulted - before.odp_pages_faulted,
        odp_invalidations: now.odp_invalidations - before.odp_invalidations,
        odp_pages_invalidated: now.odp_pages_invalidated - before.odp_pages_invalidated,
        dmabuf_faults: now.dmabuf_faults - before.dmabuf_faults,
        dmabuf_move_notifies: now.dmabuf_move_notifies - before.dmabuf_move_notifies,
        bytes_out: now.bytes_out - before.bytes_out,
        bytes_in: now.bytes_in - before.bytes_in,
        wc_errors: now.wc_errors - before.wc_errors,
    }
}

/// Whether `n` messages of `msg` bytes at `buf` hold the patterns from `seed` on.
fn verify(p: &Process, buf: VirtAddr, msg: u64, n: u64, seed: u64) -> Result<bool, RdmaJobError> {
    let mut got = vec![0u8; msg as usize];
    for i in 0..n {
        p.read(VirtAddr(buf.0 + i * msg), &mut got)?;
        if got != pattern(msg as usize, seed + i) {
            return Ok(false);
        }
    }
    Ok(true)
}
