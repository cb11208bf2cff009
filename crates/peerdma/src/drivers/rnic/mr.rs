//! Memory regions: registration in the three styles and the NIC's access through
//! them. Rule numbers (U, O, D) are those of shared/reference/rdma-dmabuf.md.

use std::collections::BTreeMap;
use std::fmt;

use crate::addr::{Pfn, VirtAddr, PAGE_SIZE};
use crate::dma::{Direction, DmaError, DmaMapping, SgTable};
use crate::dmabuf::{AttachMapping, Attachment, DmaBuf, Importer, Usage};
use crate::drivers::rnic::{bump, Access, Context, Pd, Rnic, RnicError};
use crate::errno::Errno;
use crate::gup::{pin_user_pages, FollFlags, PinnedPages};
use crate::hmm::{hmm_range_fault, HmmPfn, HmmRange};
use crate::mem::Region;
use crate::mm::page_table::TASK_SIZE;
use crate::mm::{Mm, MmError};
use crate::notifier::{IntervalNotifier, IntervalNotifierOps, NotifyRange, Subscription};
use crate::sync::atomic::{AtomicU32, Ordering};
use crate::sync::{order, Arc, OrderedMutex, Weak};

/// How long an ODP fault retries a range that stays busy (`HMM_RANGE_DEFAULT_TIMEOUT`).
const FAULT_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(1000);

/// Which registration style an MR is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum MrKind {
    /// Pinned user memory (`ib_umem`).
    Pinned,
    /// On-demand paging over a range (`ib_umem_odp`).
    Odp,
    /// Implicit on-demand paging over the whole address space.
    ImplicitOdp,
    /// A dynamic dma-buf import (`ib_umem_dmabuf`).
    DmaBuf,
    /// A pinned dma-buf import (`ib_umem_dmabuf_get_pinned`).
    DmaBufPinned,
}

/// `ibv_advise_mr` advice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Advice {
    /// Fault in for reading, even on a writable MR.
    Prefetch,
    /// Fault in for writing; EPERM on a read-only MR.
    PrefetchWrite,
    /// Map what the CPU has present, with its permissions; fault nothing.
    PrefetchNoFault,
}

/// Why an access through an MR failed, for the completion status.
#[derive(Debug)]
pub(crate) enum AccessFault {
    /// The key, PD, rights or range do not allow it.
    Protection(String),
    /// The memory could not be reached (an ODP fault failed, the MR is gone).
    Fault(String),
}

impl AccessFault {
    pub(crate) fn why(&self) -> &str {
        match self {
            AccessFault::Protection(w) | AccessFault::Fault(w) => w,
        }
    }
}

/// One NIC translation of an ODP page: the frame, whether the NIC may write it, and
/// where in the DMA mapping of its fault's run it sits.
struct OdpPage {
    pfn: Pfn,
    write: bool,
    /// The mapping of a run of physically contiguous pages faulted together (one
    /// `map_sg` per run, not per page); it is unmapped when its last page goes.
    map: Arc<DmaMapping>,
    off: u64,
}

/// Pages per chunk of the translation table.
const CHUNK: u64 = 512;

/// An ODP MR's translations (the kernel's `pfn_list` / `dma_list`), in chunks of
/// [`CHUNK`] pages so an implicit MR over the whole address space stays sparse.
///
/// # Invariants
/// `mapped` counts the `Some` entries.
struct OdpState {
    sub: Arc<IntervalNotifier>,
    /// By page address / (CHUNK pages).
    chunks: BTreeMap<u64, Vec<Option<OdpPage>>>,
    mapped: u64,
}

struct DmabufState {
    att: Arc<Attachment>,
    map: Option<AttachMapping>,
    pinned: bool,
}

enum Backing {
    Pinned {
        map: DmaMapping,
        pin: PinnedPages,
        mm: Arc<Mm>,
        pages: u64,
    },
    Odp(OdpState),
    DmaBuf(DmabufState),
    Dead,
}

/// A registered memory region (`ibv_mr`).
///
/// # Invariants
/// `backing` is the NIC's only way to the memory; every access holds its lock for the
/// whole transfer, so whoever takes the lock to change it (an invalidation, a
/// move_notify, dereg) waits for the accesses in flight.
pub struct Mr {
    lkey: u32,
    /// Its PD's number (rereg may change it).
    pd: AtomicU32,
    kind: MrKind,
    /// Its access flags (rereg may change them).
    access: AtomicU32,
    /// Whether the memory was registered writable (`umem->writable`: pinned with
    /// FOLL_WRITE); rereg may not grant writes beyond it without a new translation.
    writable_umem: bool,
    /// The MR's I/O virtual address (what remote peers and SGEs name).
    iova: u64,
    len: u64,
    /// The user address `iova` stands for (the dma-buf offset for dma-buf MRs).
    addr: u64,
    mm: Option<Arc<Mm>>,
    backing: OrderedMutex<Backing>,
}

impl fmt::Debug for Mr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mr")
            .field("lkey", &format_args!("{:#x}", self.lkey))
            .field("kind", &self.kind)
            .field("iova", &format_args!("{:#x}", self.iova))
            .field("len", &self.len)
            .finish()
    }
}

impl Mr {
    /// The local key.
    pub fn lkey(&self) -> u32 {
        self.lkey
    }
    /// The remote key (the same number, as mlx5 and rxe give).
    pub fn rkey(&self) -> u32 {
        self.lkey
    }
    /// Its PD.
    pub fn pd(&self) -> Pd {
        Pd(self.pd.load(Ordering::Acquire))
    }
    /// Its style.
    pub fn kind(&self) -> MrKind {
        self.kind
    }
    /// Its access flags.
    pub fn access(&self) -> Access {
        Access(self.access.load(Ordering::Acquire))
    }
    /// Its I/O virtual address.
    pub fn iova(&self) -> u64 {
        self.iova
    }
    /// Its length.
    pub fn len(&self) -> u64 {
        self.len
    }
    /// Whether it is empty (never, for a registered MR).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Pages the NIC has translations for now (ODP: mapped pages; pinned: all;
    /// dma-buf: the buffer's pages while mapped).
    pub fn mapped_pages(&self) -> u64 {
        match &*self.backing.lock() {
            Backing::Pinned { pages, .. } => *pages,
            Backing::Odp(st) => st.mapped,
            Backing::DmaBuf(st) => st
                .map
                .as_ref()
                .map_or(0, |m| m.mapping().len().div_ceil(PAGE_SIZE)),
            Backing::Dead => 0,
        }
    }
    /// The DMA addresses the NIC uses now (pinned and dma-buf MRs; per page for ODP),
    /// for tests that check they never change.
    pub fn dma_addrs(&self) -> Vec<u64> {
        match &*self.backing.lock() {
            Backing::Pinned { map, .. } => map.segments().iter().map(|s| s.addr.0).collect(),
            Backing::Odp(st) => st
                .chunks
                .values()
                .flatten()
                .flatten()
                .filter_map(|p| p.map.segments().first().map(|g| g.addr.0 + p.off))
                .collect(),
            Backing::DmaBuf(st) => st.map.as_ref().map_or(Vec::new(), |m| {
                m.mapping().segments().iter().map(|s| s.addr.0).collect()
            }),
            Backing::Dead => Vec::new(),
        }
    }

    /// Whether `[iova, iova + len)` lies inside the MR.
    fn covers(&self, iova: u64, len: u64) -> bool {
        iova >= self.iova
            && iova
                .checked_add(len)
                .is_some_and(|e| e <= self.iova + self.len)
    }

    /// Checks an access by the PD `pd` needing `need` to `[iova, iova + len)`.
    pub(crate) fn check(
        &self,
        pd: Pd,
        iova: u64,
        len: u64,
        need: Access,
    ) -> Result<(), AccessFault> {
        if pd != self.pd() {
            return Err(AccessFault::Protection(format!(
                "key {:#x} belongs to PD {}, not PD {}",
                self.lkey,
                self.pd().0,
                pd.0
            )));
        }
        if !self.access().contains(need) {
            return Err(AccessFault::Protection(format!(
                "key {:#x} lacks the access right {:#x}",
                self.lkey, need.0
            )));
        }
        if !self.covers(iova, len) {
            return Err(AccessFault::Protection(format!(
                "{iova:#x}+{len:#x} is outside key {:#x} ({:#x}+{:#x})",
                self.lkey, self.iova, self.len
            )));
        }
        Ok(())
    }

    /// The NIC `nic` moves `len` bytes at `iova` through the MR: `f(region, frame,
    /// offset, bytes before, bytes)` for each physically contiguous run, with the MR's
    /// lock held throughout. ODP pages missing (or read-only for a write) are faulted
    /// first; a dma-buf MR whose mapping was dropped maps the buffer again.
    pub(crate) fn transfer(
        &self,
        nic: &Rnic,
        iova: u64,
        len: u64,
        write: bool,
        mut f: impl FnMut(&Region, Pfn, u64, usize, usize),
    ) -> Result<(), AccessFault> {
        let deadline = std::time::Instant::now() + FAULT_TIMEOUT;
        loop {
            let mut b = self.backing.lock();
            match &mut *b {
                Backing::Dead => return Err(AccessFault::Fault("the MR was deregistered".into())),
                Backing::Pinned { map, .. } => {
                    return map
                        .transfer_with(iova - self.iova, len, write, &mut f)
                        .map_err(|e| AccessFault::Fault(e.to_string()));
                }
                Backing::Odp(st) => {
                    let va = self.addr + (iova - self.iova);
                    if st.present(va, len, write) {
                        return st.transfer(va, len, write, &mut f);
                    }
                    let sub = st.sub.clone();
                    drop(b);
                    let mut b = self.odp_fault(nic, &sub, va, len, write, false)?;
                    let Backing::Odp(st) = &mut *b else {
                        return Err(AccessFault::Fault("the MR was deregistered".into()));
                    };
                    if st.present(va, len, write) {
                        return st.transfer(va, len, write, &mut f);
                    }
                    // Invalidated between the fault and here cannot happen (the lock
                    // is held); a write still not allowed is a permission fault.
                    return Err(AccessFault::Fault(format!(
                        "the CPU page at {va:#x} stays read-only"
                    )));
                }
                Backing::DmaBuf(st) => {
                    let off = self.addr + (iova - self.iova);
                    if let Some(m) = &st.map {
                        match m.mapping().transfer_with(off, len, write, &mut f) {
                            Ok(()) => return Ok(()),
                            // Moved under us: drop the stale mapping and fault again.
                            Err(DmaError::Revoked { .. }) if !st.pinned => {
                                st.map = None;
                            }
                            Err(e) => return Err(AccessFault::Fault(e.to_string())),
                        }
                    }
                    let att = st.att.clone();
                    drop(b);
                    if std::time::Instant::now() > deadline {
                        return Err(AccessFault::Fault(
                            "the dma-buf kept moving during the access".into(),
                        ));
                    }
                    self.dmabuf_fault(nic, &att)?;
                }
            }
        }
    }

    /// `pagefault_dmabuf_mr`: maps the buffer under its reservation lock, waits for
    /// its KERNEL fences, installs the mapping (D4, D6).
    fn dmabuf_fault(&self, nic: &Rnic, att: &Arc<Attachment>) -> Result<(), AccessFault> {
        let buf = att.buf().clone();
        let mut resv = buf.resv().lock();
        let m = att
            .map(&mut resv, Direction::Bidirectional)
            .map_err(|e| AccessFault::Fault(e.to_string()))?;
        resv.wait(Usage::Kernel);
        let mut b = self.backing.lock();
        if let Backing::DmaBuf(st) = &mut *b {
            st.map = Some(m);
            bump(&nic.counters.dmabuf_faults, 1);
        }
        Ok(())
    }

    /// `ib_umem_odp_map_dma_and_lock` (O13–O16): faults `[va, va + len)` (for writing
    /// when `write`; only what is present when `snapshot`), retrying while the range
    /// is busy or the result went stale, and maps the pages for the NIC. Returns with
    /// the MR's lock held, so the caller uses the pages before any invalidation.
    fn odp_fault(
        &self,
        nic: &Rnic,
        sub: &IntervalNotifier,
        va: u64,
        len: u64,
        write: bool,
        snapshot: bool,
    ) -> Result<crate::sync::Held<crate::sync::MutexGuard<'_, Backing>>, AccessFault> {
        let Some(mm) = &self.mm else {
            return Err(AccessFault::Fault("no address space".into()));
        };
        if mm.is_exited() {
            return Err(AccessFault::Fault("the process exited".into()));
        }
        let start = va & !(PAGE_SIZE - 1);
        let end = (va + len).div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let deadline = std::time::Instant::now() + FAULT_TIMEOUT;
        loop {
            let mut range = HmmRange::new(sub, VirtAddr(start), VirtAddr(end));
            if !snapshot {
                range.default_flags = HmmPfn::REQ_FAULT
                    | if write {
                        HmmPfn::REQ_WRITE
                    } else {
                        HmmPfn::NONE
                    };
            }
            // No device-private owner: a GPU's private pages are foreign and migrate
            // back to RAM (O25).
            match hmm_range_fault(mm, &mut range) {
                Ok(()) => {}
                Err(MmError::Busy { .. }) if std::time::Instant::now() < deadline => continue,
                Err(e) => return Err(AccessFault::Fault(e.to_string())),
            }
            let mut b = self.backing.lock();
            if sub.read_retry(range.notifier_seq) {
                continue;
            }
            let Backing::Odp(st) = &mut *b else {
                return Err(AccessFault::Fault("the MR was deregistered".into()));
            };
            // Pages already mapped to the same frame only change permission; the
            // others are mapped a physically contiguous run at a time.
            let mut fresh: Vec<(u64, Pfn, bool)> = Vec::new();
            let pfns = &range.pfns;
            let mut i = 0;
            while i < pfns.len() {
                // One table chunk at a time: one lookup per chunk, not per page.
                let page = start / PAGE_SIZE + i as u64;
                let end = pfns.len().min(i + (CHUNK - page % CHUNK) as usize);
                let mut chunk = st.chunks.get_mut(&(page / CHUNK));
                for (k, p) in pfns.iter().enumerate().take(end).skip(i) {
                    let Some(pfn) = p.pfn() else { continue };
                    let at = start + k as u64 * PAGE_SIZE;
                    let w = p.contains(HmmPfn::WRITE);
                    let slot = chunk
                        .as_mut()
                        .and_then(|c| c[((at / PAGE_SIZE) % CHUNK) as usize].as_mut());
                    match slot {
                        Some(e) if e.pfn == pfn => e.write = w,
                        _ => fresh.push((at, pfn, w)),
                    }
                }
                i = end;
            }
            let mapped = fresh.len() as u64;
            let mut k = 0;
            while k < fresh.len() {
                let mut n = 1;
                while k + n < fresh.len()
                    && fresh[k + n].0 == fresh[k].0 + n as u64 * PAGE_SIZE
                    && fresh[k + n].1 .0 == fresh[k].1 .0 + n as u64
                {
                    n += 1;
                }
                let run = [(fresh[k].1, n as u32)];
                let bytes = n as u64 * PAGE_SIZE;
                let sg = SgTable::from_runs(&run, 0, bytes, bytes);
                let map = Arc::new(
                    nic.dma
                        .map_sg(&sg, Direction::Bidirectional)
                        .map_err(|e| AccessFault::Fault(e.to_string()))?,
                );
                st.insert_run(&fresh[k..k + n], &map);
                k += n;
            }
            // A snapshot that mapped nothing is no fault.
            if !snapshot || mapped > 0 {
                bump(&nic.counters.odp_faults, 1);
                bump(&nic.counters.odp_pages_faulted, mapped);
            }
            return Ok(b);
        }
    }

    /// Tears the MR down (dereg, context close, NIC removal): waits for accesses in
    /// flight (they hold the lock), then releases in the kernel's order — unmap,
    /// unpin (dirtying writable pages), uncharge `pinned_vm` (U20); for ODP, unmap
    /// every page, then end the subscription (O29); for dma-buf, unmap, unpin, detach
    /// (D8).
    pub(crate) fn teardown(&self, nic: &Rnic) {
        let old = std::mem::replace(&mut *self.backing.lock(), Backing::Dead);
        match old {
            Backing::Pinned {
                map,
                pin,
                mm,
                pages,
            } => {
                drop(map);
                drop(pin);
                mm.uncharge_pinned(pages);
                nic.counters
                    .pinned_pages
                    .fetch_sub(pages, crate::sync::atomic::Ordering::Relaxed);
            }
            Backing::Odp(st) => {
                drop(st.chunks);
                drop(st.sub);
            }
            Backing::DmaBuf(st) => {
                let buf = st.att.buf().clone();
                let resv = buf.resv().lock();
                if let Some(m) = st.map {
                    m.unmap(&resv);
                }
                if st.pinned {
                    st.att.unpin(&resv);
                }
                drop(resv);
                drop(st.att);
            }
            Backing::Dead => {}
        }
    }
}

impl OdpState {
    fn get(&self, va: u64) -> Option<&OdpPage> {
        let page = va / PAGE_SIZE;
        self.chunks.get(&(page / CHUNK))?[(page % CHUNK) as usize].as_ref()
    }

    /// Installs a run of pages `(address, frame, writable)` that `map` maps in order.
    fn insert_run(&mut self, run: &[(u64, Pfn, bool)], map: &Arc<DmaMapping>) {
        let mut j = 0;
        while j < run.len() {
            let c = run[j].0 / PAGE_SIZE / CHUNK;
            let chunk = self
                .chunks
                .entry(c)
                .or_insert_with(|| (0..CHUNK).map(|_| None).collect());
            while j < run.len() && run[j].0 / PAGE_SIZE / CHUNK == c {
                let (at, pfn, write) = run[j];
                let p = OdpPage {
                    pfn,
                    write,
                    map: map.clone(),
                    off: j as u64 * PAGE_SIZE,
                };
                if chunk[((at / PAGE_SIZE) % CHUNK) as usize]
                    .replace(p)
                    .is_none()
                {
                    self.mapped += 1;
                }
                j += 1;
            }
        }
    }

    /// Drops the translations of `[start, end)`; how many there were.
    fn clear(&mut self, start: u64, end: u64) -> u64 {
        let (first, last) = (start / PAGE_SIZE, end.div_ceil(PAGE_SIZE));
        if first >= last {
            return 0;
        }
        let mut gone = 0;
        let mut empty = Vec::new();
        for (&c, chunk) in self
            .chunks
            .range_mut(first / CHUNK..=(last.saturating_sub(1)) / CHUNK)
        {
            let lo = first.saturating_sub(c * CHUNK).min(CHUNK) as usize;
            let hi = (last - c * CHUNK).min(CHUNK) as usize;
            for e in &mut chunk[lo..hi] {
                gone += u64::from(e.take().is_some());
            }
            if chunk.iter().all(Option::is_none) {
                empty.push(c);
            }
        }
        for c in empty {
            self.chunks.remove(&c);
        }
        self.mapped -= gone;
        gone
    }

    fn present(&self, va: u64, len: u64, write: bool) -> bool {
        let start = va & !(PAGE_SIZE - 1);
        let end = (va + len).div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let mut at = start;
        while at < end {
            match self.get(at) {
                Some(p) if !write || p.write => {}
                _ => return false,
            }
            at += PAGE_SIZE;
        }
        true
    }

    fn transfer(
        &self,
        va: u64,
        len: u64,
        write: bool,
        f: &mut impl FnMut(&Region, Pfn, u64, usize, usize),
    ) -> Result<(), AccessFault> {
        let mut done = 0u64;
        while done < len {
            let at = va + done;
            let page = at & !(PAGE_SIZE - 1);
            let off = at - page;
            let n = (PAGE_SIZE - off).min(len - done);
            let p = self
                .get(page)
                .unwrap_or_else(|| unreachable!("present() checked every page"));
            let base = done as usize;
            p.map
                .transfer_with(p.off + off, n, write, |r, pfn, o, b, k| {
                    f(r, pfn, o, base + b, k)
                })
                .map_err(|e| AccessFault::Fault(e.to_string()))?;
            done += n;
        }
        Ok(())
    }
}

/// The ODP MR's interval-notifier callback (`mlx5_ib_invalidate_range`,
/// `rxe_ib_invalidate_range`, O9–O11).
struct OdpOps {
    mr: Weak<Mr>,
    nic: Weak<Rnic>,
}

impl IntervalNotifierOps for OdpOps {
    fn invalidate(&self, _sub: &Subscription, range: &NotifyRange, _seq: u64) -> bool {
        if !range.blockable {
            return false;
        }
        let Some(mr) = self.mr.upgrade() else {
            return true;
        };
        // Taking the lock waits for the NIC's accesses through the MR.
        let mut b = mr.backing.lock();
        let Backing::Odp(st) = &mut *b else {
            return true;
        };
        let gone = st.clear(range.start.0, range.end.0);
        if gone == 0 {
            return true;
        }
        if let Some(nic) = self.nic.upgrade() {
            bump(&nic.counters.odp_invalidations, 1);
            bump(&nic.counters.odp_pages_invalidated, gone);
        }
        true
    }
}

/// The dma-buf MR's importer ops (`mlx5_ib_dmabuf_invalidate_cb`, D7): with the
/// reservation lock held, drop the NIC's translation and unmap, so the next access
/// faults at the new place.
struct DmabufOps {
    mr: OrderedMutex<Weak<Mr>>,
    nic: Weak<Rnic>,
    pinned: bool,
}

impl Importer for DmabufOps {
    fn allow_peer2peer(&self) -> bool {
        true
    }
    fn move_notify(&self, _att: &Attachment) {
        if self.pinned {
            tracing::warn!("move_notify on a pinned dma-buf MR: the exporter moved pinned memory");
        }
        let mr = self.mr.lock().upgrade();
        let Some(mr) = mr else { return };
        let old = {
            let mut b = mr.backing.lock();
            match &mut *b {
                Backing::DmaBuf(st) => st.map.take(),
                _ => None,
            }
        };
        if let Some(nic) = self.nic.upgrade() {
            bump(&nic.counters.dmabuf_move_notifies, 1);
        }
        drop(old);
    }
}

const DMABUF_ACCESS: u32 = Access::LOCAL_WRITE.0
    | Access::REMOTE_READ.0
    | Access::REMOTE_WRITE.0
    | Access::REMOTE_ATOMIC.0
    | Access::RELAXED_ORDERING.0;

impl Context {
    fn access_err(&self, op: &'static str, access: Access) -> Result<(), RnicError> {
        let nic = &self.nic;
        // U2: ib_check_mr_access.
        if access.0 & !Access::SUPPORTED != 0 {
            return Err(nic.err(
                op,
                Errno::EINVAL,
                format!("unknown access bits {:#x}", access.0),
            ));
        }
        if (access.contains(Access::REMOTE_WRITE) || access.contains(Access::REMOTE_ATOMIC))
            && !access.contains(Access::LOCAL_WRITE)
        {
            return Err(nic.err(
                op,
                Errno::EINVAL,
                "REMOTE_WRITE or REMOTE_ATOMIC without LOCAL_WRITE",
            ));
        }
        if access.contains(Access::ON_DEMAND) && !nic.caps.odp {
            return Err(nic.err(op, Errno::EOPNOTSUPP, "the NIC has no on-demand paging"));
        }
        Ok(())
    }

    /// `ibv_reg_mr_iova2(pd, addr, len, iova, access)`: a pinned MR, or an ODP MR with
    /// [`Access::ON_DEMAND`] (implicit when `addr` is 0 and `len` is `u64::MAX`).
    ///
    /// Refusals, in the kernel's order: EINVAL when `addr` and `iova` differ in their
    /// page offset (U1), for unknown access bits or a remote write/atomic right without
    /// LOCAL_WRITE (U2), for a zero length or one that wraps (U5, U8); EOPNOTSUPP for
    /// ON_DEMAND on a NIC without ODP. A pinned MR then: EPERM when RLIMIT_MEMLOCK is 0
    /// (U6), ENOMEM past it (U9), the pin's errno (EFAULT for an unmapped range or a
    /// write pin of a read-only one, EREMOTEIO for p2p memory, U11).
    pub fn reg_mr(
        &self,
        pd: Pd,
        addr: VirtAddr,
        len: u64,
        iova: u64,
        access: Access,
    ) -> Result<Arc<Mr>, RnicError> {
        let op = "reg_mr";
        self.check(op)?;
        self.check_pd(op, pd)?;
        let nic = &self.nic;
        if addr.0 % PAGE_SIZE != iova % PAGE_SIZE {
            return Err(nic.err(op, Errno::EINVAL, "address and IOVA differ in page offset"));
        }
        self.access_err(op, access)?;
        if access.contains(Access::ON_DEMAND) {
            return self.reg_odp(pd, addr, len, iova, access);
        }
        let end = addr
            .0
            .checked_add(len)
            .filter(|e| e.checked_next_multiple_of(PAGE_SIZE).is_some());
        let Some(end) = end else {
            return Err(nic.err(op, Errno::EINVAL, "the range wraps"));
        };
        if len == 0 {
            return Err(nic.err(op, Errno::EINVAL, "zero length"));
        }
        let first = addr.0 & !(PAGE_SIZE - 1);
        let pages = (end.div_ceil(PAGE_SIZE) * PAGE_SIZE - first) / PAGE_SIZE;
        let mm = self.mm.clone();
        mm.charge_pinned(pages)
            .map_err(|e| nic.err(op, e.errno(), e.to_string()))?;
        let writable = access.writable();
        let mut gup = FollFlags::LONGTERM;
        if writable {
            gup = gup | FollFlags::WRITE;
        }
        let pinned =
            pin_user_pages(&mm, VirtAddr(first), pages as usize, gup).and_then(|p| {
                match p.stopped_by() {
                    Some(e) => Err(e.clone()),
                    None => Ok(p),
                }
            });
        let pin = match pinned {
            Ok(p) => p,
            Err(e) => {
                mm.uncharge_pinned(pages);
                return Err(nic.err(
                    op,
                    e.errno(),
                    format!("cannot pin {pages} pages at {}: {e}", VirtAddr(first)),
                ));
            }
        };
        let sg = SgTable::from_runs(pin.runs(), addr.0 - first, len, nic.dma.max_segment());
        let map = match nic.dma.map_sg(&sg, Direction::Bidirectional) {
            Ok(m) => m,
            Err(e) => {
                drop(pin);
                mm.uncharge_pinned(pages);
                return Err(nic.err(op, e.errno(), e.to_string()));
            }
        };
        bump(&nic.counters.pinned_pages, pages);
        let mr = Arc::new(Mr {
            lkey: nic.new_key(),
            pd: AtomicU32::new(pd.0),
            kind: MrKind::Pinned,
            access: AtomicU32::new(access.0),
            writable_umem: writable,
            iova,
            len,
            addr: addr.0,
            mm: Some(mm.clone()),
            backing: OrderedMutex::new(
                &order::RDMA_MR,
                Backing::Pinned {
                    map,
                    pin,
                    mm,
                    pages,
                },
            ),
        });
        Ok(self.add_mr(mr))
    }

    fn reg_odp(
        &self,
        pd: Pd,
        addr: VirtAddr,
        len: u64,
        iova: u64,
        access: Access,
    ) -> Result<Arc<Mr>, RnicError> {
        let op = "reg_mr";
        let nic = &self.nic;
        let implicit = addr.0 == 0 && len == u64::MAX;
        let (start, span, kind) = if implicit {
            // O6: implicit ODP needs IOVA 0 and the capability.
            if iova != 0 {
                return Err(nic.err(op, Errno::EINVAL, "implicit ODP needs IOVA 0"));
            }
            if !nic.caps.implicit_odp {
                return Err(nic.err(op, Errno::EINVAL, "the NIC has no implicit ODP"));
            }
            (0, TASK_SIZE - PAGE_SIZE, MrKind::ImplicitOdp)
        } else {
            // O3.
            let Some(end) = addr.0.checked_add(len) else {
                return Err(nic.err(op, Errno::EOVERFLOW, "the range wraps"));
            };
            let Some(end) = end.checked_next_multiple_of(PAGE_SIZE) else {
                return Err(nic.err(op, Errno::EOVERFLOW, "the range wraps"));
            };
            let start = addr.0 & !(PAGE_SIZE - 1);
            if len == 0 {
                return Err(nic.err(op, Errno::EINVAL, "zero length"));
            }
            (start, end - start, MrKind::Odp)
        };
        let mr = Arc::new_cyclic(|me: &Weak<Mr>| {
            let ops = Arc::new(OdpOps {
                mr: me.clone(),
                nic: Arc::downgrade(nic),
            });
            let sub = self.mm.notifier().subscribe(VirtAddr(start), span, ops);
            Mr {
                lkey: nic.new_key(),
                pd: AtomicU32::new(pd.0),
                kind,
                access: AtomicU32::new(access.0),
                writable_umem: access.writable(),
                iova,
                len: if implicit { TASK_SIZE - PAGE_SIZE } else { len },
                addr: addr.0,
                mm: Some(self.mm.clone()),
                backing: OrderedMutex::new(
                    &order::RDMA_MR,
                    Backing::Odp(OdpState {
                        sub: Arc::new(sub),
                        chunks: BTreeMap::new(),
                        mapped: 0,
                    }),
                ),
            }
        });
        // O5: one snapshot pass maps what is present now (explicit MRs only).
        if !implicit {
            let sub = match &*mr.backing.lock() {
                Backing::Odp(st) => st.sub.clone(),
                _ => unreachable!("made as ODP above"),
            };
            let _ = mr.odp_fault(nic, &sub, addr.0, len, false, true);
        }
        Ok(self.add_mr(mr))
    }

    /// `ibv_reg_dmabuf_mr(pd, offset, len, iova, fd, access)`: a dynamic importer of
    /// the dma-buf `fd` that allows peer-to-peer; nothing is mapped until the first
    /// access. Refusals (D1, D2): EOPNOTSUPP without dma-buf support; EINVAL for offset
    /// and IOVA of different page offsets, access bits other than local/remote
    /// read/write/atomic and relaxed ordering, a wrapping range, or one past the
    /// buffer; EBADF for a bad fd; EINVAL for a file that is not a dma-buf; the
    /// exporter's errno when it refuses the attach.
    pub fn reg_dmabuf_mr(
        &self,
        pd: Pd,
        offset: u64,
        len: u64,
        iova: u64,
        fd: i32,
        access: Access,
    ) -> Result<Arc<Mr>, RnicError> {
        self.reg_dmabuf(pd, (offset, len, iova), fd, access, false)
    }

    /// The pinned variant (`ib_umem_dmabuf_get_pinned`, D9), for importers that cannot
    /// take move_notify: the buffer is pinned where this NIC reaches it and mapped now;
    /// the exporter cannot move it until dereg. Refusals as
    /// [`reg_dmabuf_mr`](Self::reg_dmabuf_mr), plus the exporter's when it cannot pin.
    pub fn reg_dmabuf_mr_pinned(
        &self,
        pd: Pd,
        offset: u64,
        len: u64,
        iova: u64,
        fd: i32,
        access: Access,
    ) -> Result<Arc<Mr>, RnicError> {
        self.reg_dmabuf(pd, (offset, len, iova), fd, access, true)
    }

    fn reg_dmabuf(
        &self,
        pd: Pd,
        (offset, len, iova): (u64, u64, u64),
        fd: i32,
        access: Access,
        pinned: bool,
    ) -> Result<Arc<Mr>, RnicError> {
        let op = "reg_dmabuf_mr";
        self.check(op)?;
        self.check_pd(op, pd)?;
        let nic = &self.nic;
        if !nic.caps.dmabuf {
            return Err(nic.err(op, Errno::EOPNOTSUPP, "the NIC cannot import dma-bufs"));
        }
        if offset % PAGE_SIZE != iova % PAGE_SIZE {
            return Err(nic.err(op, Errno::EINVAL, "offset and IOVA differ in page offset"));
        }
        if access.0 & !DMABUF_ACCESS != 0 {
            return Err(nic.err(
                op,
                Errno::EINVAL,
                format!(
                    "access bits {:#x} are not allowed on a dma-buf MR",
                    access.0
                ),
            ));
        }
        self.access_err(op, access)?;
        let Some(end) = offset.checked_add(len) else {
            return Err(nic.err(op, Errno::EINVAL, "offset + length wraps"));
        };
        let files = self
            .files
            .upgrade()
            .ok_or_else(|| nic.err(op, Errno::EBADF, "the process's files are gone"))?;
        let buf: Arc<DmaBuf> = files.dma_buf(fd).map_err(|e| nic.err(op, e.errno, e.why))?;
        if end > buf.size() {
            return Err(nic.err(
                op,
                Errno::EINVAL,
                format!(
                    "{offset:#x}+{len:#x} runs past {} ({:#x} bytes)",
                    buf.describe(),
                    buf.size()
                ),
            ));
        }
        if len == 0 {
            return Err(nic.err(op, Errno::EINVAL, "zero length"));
        }
        let ops = Arc::new(DmabufOps {
            mr: OrderedMutex::new(&order::LEAF, Weak::new()),
            nic: Arc::downgrade(nic),
            pinned,
        });
        let att = buf
            .dynamic_attach(&nic.dma, ops.clone())
            .map_err(|e| nic.err(op, e.errno, e.why))?;
        let mut st = DmabufState {
            att: att.clone(),
            map: None,
            pinned: false,
        };
        if pinned {
            let mut resv = buf.resv().lock();
            att.pin(&mut resv)
                .map_err(|e| nic.err(op, e.errno, e.why))?;
            st.pinned = true;
            match att.map(&mut resv, Direction::Bidirectional) {
                Ok(m) => st.map = Some(m),
                Err(e) => {
                    att.unpin(&resv);
                    return Err(nic.err(op, e.errno, e.why));
                }
            }
        }
        let mr = Arc::new(Mr {
            lkey: nic.new_key(),
            pd: AtomicU32::new(pd.0),
            kind: if pinned {
                MrKind::DmaBufPinned
            } else {
                MrKind::DmaBuf
            },
            access: AtomicU32::new(access.0),
            writable_umem: access.writable(),
            iova,
            len,
            addr: offset,
            mm: None,
            backing: OrderedMutex::new(&order::RDMA_MR, Backing::DmaBuf(st)),
        });
        *ops.mr.lock() = Arc::downgrade(&mr);
        Ok(self.add_mr(mr))
    }

    /// `ibv_rereg_mr(mr, flags, pd, addr, length, access)` for the PD and the access
    /// flags (`IB_MR_REREG_PD | IB_MR_REREG_ACCESS`; a new translation is not offered,
    /// as rxe has none). EINVAL with nothing to change, for a PD of another context,
    /// for access flags `reg_mr` would refuse or that add or drop ON_DEMAND; EACCES
    /// for write access on memory registered read-only (`ib_umem_check_rereg`, U25: the
    /// pages were pinned without FOLL_WRITE).
    pub fn rereg_mr(
        &self,
        mr: &Arc<Mr>,
        pd: Option<Pd>,
        access: Option<Access>,
    ) -> Result<(), RnicError> {
        let op = "rereg_mr";
        self.check(op)?;
        let nic = &self.nic;
        if !self.objects.lock().mrs.iter().any(|m| Arc::ptr_eq(m, mr)) {
            return Err(nic.err(
                op,
                Errno::EINVAL,
                "the MR is not registered in this context",
            ));
        }
        if pd.is_none() && access.is_none() {
            return Err(nic.err(op, Errno::EINVAL, "nothing to change"));
        }
        if let Some(pd) = pd {
            self.check_pd(op, pd)?;
        }
        if let Some(a) = access {
            self.access_err(op, a)?;
            if a.contains(Access::ON_DEMAND) != mr.access().contains(Access::ON_DEMAND) {
                return Err(nic.err(op, Errno::EINVAL, "ON_DEMAND cannot change by rereg"));
            }
            if a.writable() && !mr.writable_umem {
                return Err(nic.err(
                    op,
                    Errno::EACCES,
                    "the memory was registered read-only; making it writable needs a new translation",
                ));
            }
        }
        // Under the MR's lock: no access runs with half the change.
        let _b = mr.backing.lock();
        if let Some(pd) = pd {
            mr.pd.store(pd.0, Ordering::Release);
        }
        if let Some(a) = access {
            mr.access.store(a.0, Ordering::Release);
        }
        Ok(())
    }

    /// `ibv_advise_mr(pd, advice, flags, sg_list)` on ODP MRs: faults the ranges in
    /// ahead of the NIC. `flush` waits for the faults and returns the first error
    /// (EFAULT for a range the MR does not cover or cannot fault); without it the
    /// faults run on a worker and their errors are dropped, as the kernel's best-effort
    /// prefetch does. EINVAL for an unknown key or one of another PD, EPERM for
    /// PREFETCH_WRITE on a read-only MR, EOPNOTSUPP for a non-ODP MR.
    pub fn advise_mr(
        &self,
        pd: Pd,
        advice: Advice,
        flush: bool,
        sges: &[crate::drivers::rnic::Sge],
    ) -> Result<(), RnicError> {
        let op = "advise_mr";
        self.check(op)?;
        let nic = self.nic.clone();
        if sges.is_empty() {
            return Err(nic.err(op, Errno::EINVAL, "no SGE"));
        }
        let mut work = Vec::new();
        for s in sges {
            let mr = nic
                .lookup_mr(s.lkey)
                .filter(|m| m.pd() == pd)
                .ok_or_else(|| {
                    nic.err(
                        op,
                        Errno::EINVAL,
                        format!("no MR with key {:#x} in this PD", s.lkey),
                    )
                })?;
            if !matches!(mr.kind, MrKind::Odp | MrKind::ImplicitOdp) {
                return Err(nic.err(op, Errno::EOPNOTSUPP, "prefetch is for ODP MRs"));
            }
            if advice == Advice::PrefetchWrite && !mr.access().writable() {
                return Err(nic.err(op, Errno::EPERM, "PREFETCH_WRITE on a read-only MR"));
            }
            work.push((mr, s.addr, u64::from(s.len)));
        }
        let run = move |nic: &Rnic| -> Result<(), RnicError> {
            for (mr, iova, len) in &work {
                if !mr.covers(*iova, *len) {
                    return Err(nic.err(op, Errno::EFAULT, "the range is outside the MR"));
                }
                let sub = match &*mr.backing.lock() {
                    Backing::Odp(st) => st.sub.clone(),
                    _ => return Err(nic.err(op, Errno::EFAULT, "the MR was deregistered")),
                };
                let va = mr.addr + (iova - mr.iova);
                let (write, snapshot) = match advice {
                    Advice::Prefetch => (false, false),
                    Advice::PrefetchWrite => (true, false),
                    Advice::PrefetchNoFault => (false, true),
                };
                mr.odp_fault(nic, &sub, va, *len, write, snapshot)
                    .map_err(|e| nic.err(op, Errno::EFAULT, e.why().to_string()))?;
            }
            Ok(())
        };
        if flush {
            return run(&nic);
        }
        crate::sync::thread::spawn(move || {
            let _ = run(&nic);
        });
        Ok(())
    }
}
