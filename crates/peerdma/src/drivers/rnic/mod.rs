//! An RDMA NIC (the verbs model of rdma-core and drivers/infiniband, data path after
//! rxe): protection domains, memory regions in the three registration styles the
//! kernel grew for memory that may move, completion queues and reliable-connected
//! queue pairs that move real bytes by DMA.
//!
//! - A **pinned** MR ([`Context::reg_mr`], `ib_umem_get`) pins its pages long-term,
//!   charges them to the process's `pinned_vm` against `RLIMIT_MEMLOCK`, and maps them
//!   for the NIC once: the DMA address never changes while the MR lives, whatever the
//!   process does to its mappings.
//! - An **ODP** MR ([`Access::ON_DEMAND`], `ib_umem_odp`) pins nothing: the NIC maps
//!   pages when it faults on them (`hmm_range_fault` under the interval-notifier
//!   protocol) and an invalidation of the range takes the MR's lock — which every NIC
//!   access holds, so it waits for them — and unmaps. Write permission follows the CPU
//!   page. Implicit ODP (address 0, length `u64::MAX`) covers the whole address space.
//! - A **dma-buf** MR ([`Context::reg_dmabuf_mr`], `ib_umem_dmabuf`) is a dynamic
//!   importer allowing peer-to-peer: it maps the buffer under its reservation lock on
//!   first access, waits for KERNEL fences, and on `move_notify` drops its mapping so
//!   the next access faults at the new place. The pinned variant pins the buffer
//!   instead.
//!
//! Queue pairs run their work requests at post time in the caller's thread, as rxe
//! runs them in its task: the requester NIC reads the local memory by DMA, the
//! responder NIC writes (or reads) the remote memory by DMA. Two NICs on one host, or
//! on two hosts, talk through connected queue pairs; the link is implicit.
//!
//! Where peerdma differs on purpose: an ODP fault is resolved inline (no RNR NAK
//! while a page is faulted, as rxe does); a SEND that finds no receive posted completes
//! with `RNR_RETRY_EXC_ERR` at once (as with `rnr_retry = 0`); implicit ODP subscribes
//! to the whole address space at once instead of 1 GiB children; work requests posted
//! to one QP from several threads at once complete in an unspecified order.

mod mr;
mod qp;

pub use mr::{Advice, Mr, MrKind};
pub use qp::{Cq, Qp, QpState, RecvWr, SendOp, SendWr, Sge, Wc, WcOpcode, WcStatus};

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use crate::addr::Bdf;
use crate::dma::{Dma, DmaDevice};
use crate::dmabuf::{FdTable, File};
use crate::drivers::{Device, Probe, ProbeError};
use crate::errno::Errno;
use crate::mm::Mm;
use crate::p2pmem::{P2pError, P2pRegistry};
use crate::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use crate::sync::{order, Arc, OrderedMutex, Weak};

/// The NIC's largest DMA segment, as mlx5 sets it.
pub const MAX_SEGMENT: u64 = 2 << 30;

/// A verbs call refused: the call, the kernel's errno, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rnic {dev} {op}: {why} ({errno})")]
pub struct RnicError {
    /// The NIC.
    pub dev: Bdf,
    /// The verb.
    pub op: &'static str,
    /// The kernel's error number.
    pub errno: Errno,
    /// Why.
    pub why: String,
}

impl RnicError {
    /// The kernel's error number.
    pub fn errno(&self) -> Errno {
        self.errno
    }
}

/// MR access flags (`IB_ACCESS_*`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Access(pub u32);

impl Access {
    /// Read-only for the local NIC.
    pub const NONE: Access = Access(0);
    /// The local NIC may write (receive buffers, RDMA READ targets, atomic results).
    pub const LOCAL_WRITE: Access = Access(1);
    /// Peers may RDMA WRITE into it.
    pub const REMOTE_WRITE: Access = Access(1 << 1);
    /// Peers may RDMA READ from it.
    pub const REMOTE_READ: Access = Access(1 << 2);
    /// Peers may run atomics on it.
    pub const REMOTE_ATOMIC: Access = Access(1 << 3);
    /// On-demand paging: nothing is pinned.
    pub const ON_DEMAND: Access = Access(1 << 6);
    /// Relaxed ordering of the NIC's writes.
    pub const RELAXED_ORDERING: Access = Access(1 << 20);
    /// Every bit the model knows (`IB_ACCESS_SUPPORTED` for these).
    const SUPPORTED: u32 = 1 | (1 << 1) | (1 << 2) | (1 << 3) | (1 << 6) | (1 << 20);

    /// Whether every bit of `other` is set.
    pub fn contains(self, other: Access) -> bool {
        self.0 & other.0 == other.0
    }
    /// `ib_access_writable`: the NIC may write the memory for some operation.
    pub fn writable(self) -> bool {
        self.0 & (Self::LOCAL_WRITE.0 | Self::REMOTE_WRITE.0 | Self::REMOTE_ATOMIC.0) != 0
    }
}

impl std::ops::BitOr for Access {
    type Output = Access;
    fn bitor(self, rhs: Access) -> Access {
        Access(self.0 | rhs.0)
    }
}

/// What a NIC can do (`ibv_device_attr` and `odp_caps`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RnicCaps {
    /// On-demand paging (`IBV_ODP_SUPPORT`).
    pub odp: bool,
    /// Implicit ODP over the whole address space (`IBV_ODP_SUPPORT_IMPLICIT`).
    pub implicit_odp: bool,
    /// dma-buf MRs (`reg_user_mr_dmabuf`).
    pub dmabuf: bool,
}

impl Default for RnicCaps {
    fn default() -> Self {
        RnicCaps {
            odp: true,
            implicit_odp: true,
            dmabuf: true,
        }
    }
}

/// Counters of one NIC.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RnicStats {
    /// Live memory regions.
    pub mrs: u64,
    /// Live queue pairs.
    pub qps: u64,
    /// Pages pinned by pinned MRs (and dma-buf pins are not counted here).
    pub pinned_pages: u64,
    /// ODP page faults resolved (one per fault call, however many pages).
    pub odp_faults: u64,
    /// Pages those faults mapped.
    pub odp_pages_faulted: u64,
    /// ODP invalidations that reached an MR.
    pub odp_invalidations: u64,
    /// Pages those invalidations unmapped.
    pub odp_pages_invalidated: u64,
    /// dma-buf MR faults (mapping the buffer again).
    pub dmabuf_faults: u64,
    /// move_notify calls that reached an MR.
    pub dmabuf_move_notifies: u64,
    /// Bytes this NIC sent as requester (SEND, WRITE) or as responder (READ data).
    pub bytes_out: u64,
    /// Bytes it placed in memory (received SENDs, WRITEs, READ responses).
    pub bytes_in: u64,
    /// Work completions with an error status.
    pub wc_errors: u64,
}

#[derive(Default)]
struct Counters {
    pinned_pages: AtomicU64,
    odp_faults: AtomicU64,
    odp_pages_faulted: AtomicU64,
    odp_invalidations: AtomicU64,
    odp_pages_invalidated: AtomicU64,
    dmabuf_faults: AtomicU64,
    dmabuf_move_notifies: AtomicU64,
    bytes_out: AtomicU64,
    bytes_in: AtomicU64,
    wc_errors: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// One RDMA NIC function.
///
/// # Invariants
/// Every key in `mrs` names a registered MR of this NIC; an MR leaves the table before
/// it is torn down, so no new access finds it afterwards.
pub struct Rnic {
    bdf: Bdf,
    dma: DmaDevice,
    caps: RnicCaps,
    removed: AtomicBool,
    next_key: AtomicU32,
    next_qpn: AtomicU32,
    /// By lkey (= rkey). Lock order: a leaf.
    mrs: OrderedMutex<BTreeMap<u32, Arc<Mr>>>,
    /// Lock order: a leaf.
    qps: OrderedMutex<BTreeMap<u32, Weak<Qp>>>,
    /// Held across an atomic's read-modify-write on this NIC (its atomic unit).
    atomic: OrderedMutex<()>,
    counters: Counters,
}

impl fmt::Debug for Rnic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rnic")
            .field("bdf", &self.bdf)
            .field("caps", &self.caps)
            .finish()
    }
}

impl Rnic {
    /// Brings the NIC at `bdf` up: attaches it for DMA.
    pub fn new(dma: &Arc<Dma>, bdf: Bdf, caps: RnicCaps) -> Result<Arc<Rnic>, RnicError> {
        let dev = dma.attach(bdf).map_err(|e| RnicError {
            dev: bdf,
            op: "probe",
            errno: e.errno(),
            why: e.to_string(),
        })?;
        // mlx5 sets 2 GiB segments (`dma_set_max_seg_size`), so a pinned MR over
        // contiguous pages maps as few long segments (U12).
        dev.set_max_segment(MAX_SEGMENT);
        Ok(Arc::new(Rnic {
            bdf,
            dma: dev,
            caps,
            removed: AtomicBool::new(false),
            next_key: AtomicU32::new(1),
            next_qpn: AtomicU32::new(0x11),
            mrs: OrderedMutex::new(&order::LEAF, BTreeMap::new()),
            qps: OrderedMutex::new(&order::LEAF, BTreeMap::new()),
            atomic: OrderedMutex::new(&order::RDMA_ATOMIC, ()),
            counters: Counters::default(),
        }))
    }

    /// Its function.
    pub fn bdf(&self) -> Bdf {
        self.bdf
    }
    /// Its DMA handle.
    pub fn dma(&self) -> &DmaDevice {
        &self.dma
    }
    /// What it can do.
    pub fn caps(&self) -> RnicCaps {
        self.caps
    }

    fn err(&self, op: &'static str, errno: Errno, why: impl Into<String>) -> RnicError {
        RnicError {
            dev: self.bdf,
            op,
            errno,
            why: why.into(),
        }
    }

    fn check_alive(&self, op: &'static str) -> Result<(), RnicError> {
        if self.removed.load(Ordering::SeqCst) {
            return Err(self.err(op, Errno::ENODEV, "the NIC was removed"));
        }
        Ok(())
    }

    /// Its counters now.
    pub fn stats(&self) -> RnicStats {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RnicStats {
            mrs: self.mrs.lock().len() as u64,
            qps: self
                .qps
                .lock()
                .values()
                .filter(|w| w.strong_count() > 0)
                .count() as u64,
            pinned_pages: l(&c.pinned_pages),
            odp_faults: l(&c.odp_faults),
            odp_pages_faulted: l(&c.odp_pages_faulted),
            odp_invalidations: l(&c.odp_invalidations),
            odp_pages_invalidated: l(&c.odp_pages_invalidated),
            dmabuf_faults: l(&c.dmabuf_faults),
            dmabuf_move_notifies: l(&c.dmabuf_move_notifies),
            bytes_out: l(&c.bytes_out),
            bytes_in: l(&c.bytes_in),
            wc_errors: l(&c.wc_errors),
        }
    }

    /// `ibv_open_device` by a process: a verbs context for the address space `mm`,
    /// installed as a file in `files`. Closing that descriptor — or the process
    /// exiting — destroys every object of the context (QPs to the error state, MRs
    /// deregistered), as closing the uverbs file does.
    pub fn open(
        self: &Arc<Self>,
        mm: &Arc<Mm>,
        files: &Arc<FdTable>,
    ) -> Result<Arc<Context>, RnicError> {
        self.check_alive("open")?;
        let ctx = Arc::new(Context {
            nic: self.clone(),
            mm: mm.clone(),
            files: Arc::downgrade(files),
            fd: AtomicU32::new(u32::MAX),
            closed: AtomicBool::new(false),
            objects: OrderedMutex::new(&order::LEAF, Objects::default()),
        });
        let fd = files.install(File::Other {
            what: "uverbs device",
            obj: Arc::new(UverbsFile(ctx.clone())),
        });
        ctx.fd.store(fd as u32, Ordering::Relaxed);
        Ok(ctx)
    }

    pub(crate) fn lookup_mr(&self, key: u32) -> Option<Arc<Mr>> {
        self.mrs.lock().get(&key).cloned()
    }

    fn new_key(&self) -> u32 {
        // 24-bit index, 8-bit key byte, as mkeys are.
        let i = self.next_key.fetch_add(1, Ordering::Relaxed);
        (i << 8) | (i.wrapping_mul(0x9d) & 0xff)
    }

    /// Removes an MR from the key table and tears it down.
    fn destroy_mr(&self, mr: &Arc<Mr>) {
        self.mrs.lock().remove(&mr.lkey());
        mr.teardown(self);
    }
}

/// An RDMA NIC to bring up at an endpoint.
#[derive(Clone, Debug)]
pub struct RnicSpec {
    /// The endpoint.
    pub bdf: Bdf,
    /// What it can do.
    pub caps: RnicCaps,
}

impl Probe for RnicSpec {
    fn bdf(&self) -> Bdf {
        self.bdf
    }
    fn probe(&self, p2p: &Arc<P2pRegistry>) -> Result<Arc<dyn Device>, ProbeError> {
        match Rnic::new(p2p.dma(), self.bdf, self.caps) {
            Ok(n) => Ok(n),
            Err(e) => Err(ProbeError {
                dev: self.bdf,
                kind: "rnic",
                errno: e.errno(),
                source: Box::new(e),
            }),
        }
    }
}

impl Device for Rnic {
    fn bdf(&self) -> Bdf {
        self.bdf
    }
    fn kind(&self) -> &'static str {
        "rnic"
    }
    /// Hot removal: every QP moves to the error state and every MR is deregistered
    /// (pins, mappings and attachments released); later verbs fail with ENODEV.
    fn remove(&self, _p2p: &P2pRegistry, _timeout: Option<Duration>) -> Result<(), P2pError> {
        self.removed.store(true, Ordering::SeqCst);
        let qps: Vec<Arc<Qp>> = self.qps.lock().values().filter_map(Weak::upgrade).collect();
        for qp in qps {
            qp.to_error();
        }
        let mrs: Vec<Arc<Mr>> = std::mem::take(&mut *self.mrs.lock())
            .into_values()
            .collect();
        for mr in mrs {
            mr.teardown(self);
        }
        Ok(())
    }
}

/// PD numbers, unique in the process so a PD of one context is never mistaken for
/// another's (a plain std atomic: a shuttle atomic may not live in a static shared by
/// test executions).
static NEXT_PD: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);

/// A protection domain (`ibv_pd`): MRs and QPs of one PD work together only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Pd(pub u32);

#[derive(Default)]
struct Objects {
    pds: Vec<Pd>,
    mrs: Vec<Arc<Mr>>,
    qps: Vec<Arc<Qp>>,
}

/// A process's open verbs device (`ibv_context`, the uverbs file).
///
/// # Invariants
/// Once `closed`, it owns nothing: its MRs are torn down and its QPs in error.
pub struct Context {
    nic: Arc<Rnic>,
    mm: Arc<Mm>,
    files: Weak<FdTable>,
    fd: AtomicU32,
    closed: AtomicBool,
    objects: OrderedMutex<Objects>,
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("nic", &self.nic.bdf)
            .field("mm", &self.mm.id())
            .finish()
    }
}

/// The uverbs file: its last descriptor closing closes the context.
struct UverbsFile(Arc<Context>);

impl Drop for UverbsFile {
    fn drop(&mut self) {
        self.0.close();
    }
}

impl Context {
    /// The NIC.
    pub fn nic(&self) -> &Arc<Rnic> {
        &self.nic
    }
    /// The descriptor the context was installed at.
    pub fn fd(&self) -> i32 {
        self.fd.load(Ordering::Relaxed) as i32
    }

    fn check(&self, op: &'static str) -> Result<(), RnicError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(self
                .nic
                .err(op, Errno::EBADF, "the verbs context is closed"));
        }
        self.nic.check_alive(op)
    }

    fn check_pd(&self, op: &'static str, pd: Pd) -> Result<(), RnicError> {
        if !self.objects.lock().pds.contains(&pd) {
            return Err(self.nic.err(
                op,
                Errno::EINVAL,
                format!("PD {} is not of this context", pd.0),
            ));
        }
        Ok(())
    }

    /// `ibv_alloc_pd`.
    pub fn alloc_pd(&self) -> Result<Pd, RnicError> {
        self.check("alloc_pd")?;
        let pd = Pd(NEXT_PD.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        self.objects.lock().pds.push(pd);
        Ok(pd)
    }

    /// `ibv_create_cq`.
    pub fn create_cq(&self) -> Result<Arc<Cq>, RnicError> {
        self.check("create_cq")?;
        Ok(Cq::new())
    }

    /// `ibv_create_qp` (RC), in the RESET state.
    pub fn create_qp(
        &self,
        pd: Pd,
        send_cq: &Arc<Cq>,
        recv_cq: &Arc<Cq>,
    ) -> Result<Arc<Qp>, RnicError> {
        let op = "create_qp";
        self.check(op)?;
        self.check_pd(op, pd)?;
        let qpn = self.nic.next_qpn.fetch_add(1, Ordering::Relaxed);
        let qp = Qp::new(&self.nic, qpn, pd, send_cq, recv_cq);
        self.nic.qps.lock().insert(qpn, Arc::downgrade(&qp));
        self.objects.lock().qps.push(qp.clone());
        Ok(qp)
    }

    fn add_mr(&self, mr: Arc<Mr>) -> Arc<Mr> {
        self.nic.mrs.lock().insert(mr.lkey(), mr.clone());
        self.objects.lock().mrs.push(mr.clone());
        mr
    }

    /// `ibv_dereg_mr`: the MR's keys stop working at once; the call returns after
    /// accesses through it finished and its pages, mappings and attachment are
    /// released. EINVAL for an MR of another context or one already deregistered.
    pub fn dereg_mr(&self, mr: &Arc<Mr>) -> Result<(), RnicError> {
        let op = "dereg_mr";
        let mut objs = self.objects.lock();
        let Some(i) = objs.mrs.iter().position(|m| Arc::ptr_eq(m, mr)) else {
            return Err(self.nic.err(
                op,
                Errno::EINVAL,
                "the MR is not registered in this context",
            ));
        };
        objs.mrs.swap_remove(i);
        drop(objs);
        self.nic.destroy_mr(mr);
        Ok(())
    }

    /// `ibv_destroy_qp`.
    pub fn destroy_qp(&self, qp: &Arc<Qp>) -> Result<(), RnicError> {
        let mut objs = self.objects.lock();
        let Some(i) = objs.qps.iter().position(|q| Arc::ptr_eq(q, qp)) else {
            return Err(self
                .nic
                .err("destroy_qp", Errno::EINVAL, "the QP is not of this context"));
        };
        objs.qps.swap_remove(i);
        drop(objs);
        qp.destroy();
        self.nic.qps.lock().remove(&qp.qpn());
        Ok(())
    }

    /// Closes the context: every QP is destroyed, every MR deregistered.
    pub fn close(&self) {
        if self.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        let objs = std::mem::take(&mut *self.objects.lock());
        for qp in &objs.qps {
            qp.destroy();
            self.nic.qps.lock().remove(&qp.qpn());
        }
        for mr in &objs.mrs {
            self.nic.destroy_mr(mr);
        }
    }

    /// MRs registered here now.
    pub fn mrs(&self) -> usize {
        self.objects.lock().mrs.len()
    }
}
