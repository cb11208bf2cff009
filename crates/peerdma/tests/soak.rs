//! The multi-threaded soak: real threads on one workstation host (IOMMU on and off)
//! doing random mixes of everything that moves or holds pages at once — CPU reads and
//! writes, migration between RAM, device-private and device-coherent memory, fork and
//! exit, get_user_dma_sg with device DMA through the segments (held across other
//! threads' work), mmap/munmap/mprotect/madvise, p2p memory mapped into processes and
//! reached by peers, one provider removed mid-run, and an interval-notifier mirror that
//! reads pages as a device would.
//!
//! Every thread writes only its own slot of every shared page, so what each slot must
//! hold is always known: a byte oracle per thread, checked on every read, every DMA
//! read and every mirror read. At the end every resource must be back: frames, pins,
//! DMA mappings, IOVAs, p2p pages, notifier subscriptions.
//!
//! `cargo test` runs it briefly with fixed seeds in both IOMMU modes. For a long run:
//! `PEERDMA_SOAK_SECS=600 cargo test --release --test soak -- --nocapture` (a random
//! seed, printed); `PEERDMA_SOAK_SEED=N` replays a seed's operation choices;
//! `PEERDMA_SOAK_IOMMU=on|off` runs one mode. A watchdog aborts with the seed and each
//! thread's current operation when nothing progresses.

#![cfg(not(feature = "shuttle"))]

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use peerdma::addr::{Bdf, Pfn, VirtAddr, PAGE_SIZE};
use peerdma::dma::{Direction, DmaError, DmaMapping, SgTable};
use peerdma::dmabuf::DmaBuf;
use peerdma::drivers::dmirror::{Dmirror, DmirrorDevice, DmirrorMemory};
use peerdma::drivers::gpu::{BoHandle, CeAddr, Gpu, GpuContext, Location, P2pPolicy, Placement};
use peerdma::drivers::nvme::Nvme;
use peerdma::drivers::rnic::{
    Access, Cq, Qp, QpState, Rnic, RnicCaps, SendOp, SendWr, Sge, WcStatus,
};
use peerdma::errno::Errno;
use peerdma::gup::{get_user_dma_sg, GupError, UserDmaSg, UserSg};
use peerdma::host::{Host, Process};
use peerdma::mem::{Region, RegionKind};
use peerdma::mm::{migrate_device_range, Mm, MmError, Prot};
use peerdma::notifier::{IntervalNotifier, IntervalNotifierOps, NotifyRange, Subscription};
use peerdma::p2pmem::{P2pError, Provider};

const THREADS: usize = 4;
const PROCS: usize = 3;
/// Pages of each process's shared region; every thread owns one slot of each.
const SHARED_PAGES: u64 = 16;
/// Bytes of one thread's slot in a shared page.
const SLOT: u64 = 64;
/// Pages of each thread's GPU buffer object.
const BO_PAGES: u64 = 8;
/// Nothing finished for this long: the watchdog aborts.
const WATCHDOG: Duration = Duration::from_secs(60);

/// The operations, by name for the watchdog's report.
const OPS: &[&str] = &[
    "cpu write",
    "cpu read",
    "migrate",
    "dma write",
    "dma read",
    "hold pin",
    "dma through held pin",
    "release pin",
    "fork",
    "exit child",
    "private mmap",
    "private munmap",
    "private mprotect",
    "private madvise",
    "private check",
    "p2p mmap",
    "p2p check",
    "p2p peer dma",
    "p2p munmap",
    "mirror fault",
    "mirror check",
    "odp write",
    "hmm device read",
    "hmm migrate to device",
    "hmm exclusive",
    "evict device range",
    "gpu read",
    "gpu write",
    "gpu placement",
    "gpu evict",
    "gpu prefetch",
    "bo write",
    "bo read",
    "bo peer dma",
    "bo copy",
    "bo evict",
    "bo pin",
    "bo close",
    "rdma odp write",
    "rdma odp read",
    "rdma write into a bo",
];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Op {
    CpuWrite,
    CpuRead,
    Migrate,
    DmaWrite,
    DmaRead,
    HoldPin,
    DmaHeld,
    ReleasePin,
    Fork,
    ExitChild,
    PrivMmap,
    PrivMunmap,
    PrivMprotect,
    PrivMadvise,
    PrivCheck,
    P2pMmap,
    P2pCheck,
    P2pPeerDma,
    P2pMunmap,
    MirrorFault,
    MirrorCheck,
    OdpWrite,
    HmmRead,
    HmmMigrate,
    HmmExclusive,
    Evict,
    GpuRead,
    GpuWrite,
    GpuPlace,
    GpuEvict,
    GpuPrefetch,
    BoWrite,
    BoRead,
    BoPeerDma,
    BoCopy,
    BoEvict,
    BoPin,
    BoClose,
    RdmaOdpWrite,
    RdmaOdpRead,
    RdmaBoWrite,
}

/// Weighted operation mix.
const MIX: &[(Op, u32)] = &[
    (Op::CpuWrite, 14),
    (Op::CpuRead, 14),
    (Op::Migrate, 10),
    (Op::DmaWrite, 6),
    (Op::DmaRead, 5),
    (Op::HoldPin, 3),
    (Op::DmaHeld, 5),
    (Op::ReleasePin, 3),
    (Op::Fork, 2),
    (Op::ExitChild, 2),
    (Op::PrivMmap, 3),
    (Op::PrivMunmap, 2),
    (Op::PrivMprotect, 2),
    (Op::PrivMadvise, 2),
    (Op::PrivCheck, 3),
    (Op::P2pMmap, 2),
    (Op::P2pCheck, 3),
    (Op::P2pPeerDma, 3),
    (Op::P2pMunmap, 2),
    (Op::MirrorFault, 5),
    (Op::MirrorCheck, 5),
    (Op::OdpWrite, 5),
    (Op::HmmRead, 4),
    (Op::HmmMigrate, 3),
    (Op::HmmExclusive, 2),
    (Op::Evict, 1),
    (Op::GpuRead, 4),
    (Op::GpuWrite, 4),
    (Op::GpuPlace, 1),
    (Op::GpuEvict, 1),
    (Op::GpuPrefetch, 1),
    (Op::BoWrite, 3),
    (Op::BoRead, 3),
    (Op::BoPeerDma, 2),
    (Op::BoCopy, 2),
    (Op::BoEvict, 1),
    (Op::BoPin, 1),
    (Op::BoClose, 1),
    (Op::RdmaOdpWrite, 4),
    (Op::RdmaOdpRead, 3),
    (Op::RdmaBoWrite, 2),
];

struct Proc {
    mm: Process,
    shared: VirtAddr,
    /// The HMM test device's mirror of this process.
    hmm: Dmirror,
    /// The GPU's context mirroring this process (unified memory).
    gpu: GpuContext,
}

/// What every thread shares.
struct World {
    host: common::Checked,
    procs: Vec<Proc>,
    dev_private: Arc<Region>,
    dev_coherent: Arc<Region>,
    /// The HMM test device (its chunks are evicted too).
    hmm_dev: Arc<DmirrorDevice>,
    /// Devices that DMA into process memory.
    devices: Vec<Bdf>,
    providers: Vec<Arc<Provider>>,
    /// (provider index, device) pairs the fabric lets reach each other.
    peers: Vec<(usize, Bdf)>,
    /// Provider 0 is removed mid-run: set just before removal begins, and when done.
    removing: AtomicBool,
    removed: AtomicBool,
    stop: AtomicBool,
    done: Vec<AtomicU64>,
    current: Vec<AtomicUsize>,
    checks: AtomicU64,
    /// Operations that did something, by kind (as in `MIX`).
    per_op: Vec<AtomicU64>,
    /// Refusals the kernel also gives: EBUSY migrations, p2p pages revoked by removal.
    refused: AtomicU64,
    /// The GPU, and each thread's buffer object with its GPU address in process 0's
    /// context.
    gpu: Arc<Gpu>,
    bos: Vec<(BoHandle, VirtAddr)>,
    /// The RDMA NIC (looped back to itself) and what each thread uses of it.
    rdma: Rdma,
}

/// The NIC's side of the soak: every process's shared region is under an ODP MR of
/// that process; every thread's BO is exported and imported by a dma-buf MR in process
/// 0; each thread has a source buffer in a process of its own and, per process, a
/// requester QP connected to a responder QP in that process's context.
struct Rdma {
    nic: Arc<Rnic>,
    requester: Process,
    /// Per process: the ODP MR's rkey.
    odp_rkeys: Vec<u32>,
    /// Per thread: the dma-buf and its MR's rkey.
    bo_bufs: Vec<(Arc<DmaBuf>, u32)>,
    threads: Vec<RdmaThread>,
}

struct RdmaThread {
    src: VirtAddr,
    lkey: u32,
    cq: Arc<Cq>,
    /// Per process.
    qps: Vec<Arc<Qp>>,
}

impl World {
    /// Whether provider 0's removal has begun, so its pages may be gone; counts the
    /// refusal this excuses.
    fn revoked(&self) -> bool {
        let r = self.removing.load(Ordering::SeqCst);
        if r {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        r
    }
}

/// A device page table mirroring one process's shared region, kept with the
/// interval-notifier sequence protocol; a "device read" through it must see the bytes
/// the process would.
///
/// Beside the frames it also keeps, per page, a DMA mapping of the frame that holds no
/// pin (on-demand paging): the device writes through it without any lock, and the
/// `invalidate` callback revokes it, waiting for the writes in flight, so none lands
/// in a page after it moved.
struct Mirror {
    table: Mutex<Vec<Option<Pfn>>>,
    /// Lock order: after `table`.
    odp: Mutex<Vec<Option<Arc<DmaMapping>>>>,
    dev: Bdf,
}

impl IntervalNotifierOps for Mirror {
    fn invalidate(&self, sub: &Subscription, range: &NotifyRange, _seq: u64) -> bool {
        let base = sub.range.start.0;
        let hit = |i: usize| {
            let va = base + i as u64 * PAGE_SIZE;
            va < range.end.0 && range.start.0 < va + PAGE_SIZE
        };
        let mut t = self.table.lock().unwrap();
        for (i, e) in t.iter_mut().enumerate() {
            if hit(i) {
                *e = None;
            }
        }
        drop(t);
        let odp = self.odp.lock().unwrap();
        for (i, m) in odp.iter().enumerate() {
            if let Some(m) = m.as_ref().filter(|_| hit(i)) {
                m.revoke();
            }
        }
        true
    }
}

struct PrivRegion {
    proc: usize,
    va: VirtAddr,
    tags: Vec<u64>,
    writable: bool,
}

struct P2pMap {
    proc: usize,
    provider: usize,
    va: VirtAddr,
    pages: u64,
    tag: u64,
}

struct Child {
    mm: Process,
    proc: usize,
    /// This thread's slot of every shared page at fork time.
    snapshot: Vec<u64>,
}

/// One thread's state: its oracle and what it holds.
struct Worker<'w> {
    w: &'w World,
    t: usize,
    rng: ChaCha8Rng,
    next_tag: u64,
    /// This thread's slot of every shared page of every process.
    oracle: Vec<Vec<u64>>,
    /// Held DMA mappings: (mapping, device, process, page).
    held: Vec<(UserDmaSg, Bdf, usize, u64)>,
    children: Vec<Child>,
    private: Vec<PrivRegion>,
    p2p: Vec<P2pMap>,
    mirror: Arc<Mirror>,
    sub: IntervalNotifier,
    /// What each page of this thread's BO holds (its first 8 bytes).
    bo_oracle: Vec<u64>,
    bo_pinned: bool,
    /// The operation under way, for tags.
    op: usize,
}

/// The operation that wrote a tag (see [`Worker::tag`]).
fn writer(tag: u64) -> &'static str {
    OPS.get(((tag >> 48) & 0xff) as usize)
        .copied()
        .unwrap_or("nobody")
}

fn fail(seed: u64, t: usize, op: Op, what: String) -> ! {
    panic!("soak seed {seed} thread {t} during {op:?}: {what}");
}

impl<'w> Worker<'w> {
    /// A fresh value: the thread in the top byte, the operation that writes it (its
    /// index in `MIX`) in the next, so a failure names who wrote what was lost.
    fn tag(&mut self) -> u64 {
        self.next_tag += 1;
        ((self.t as u64 + 1) << 56) | ((self.op as u64) << 48) | self.next_tag
    }

    fn slot(&self, proc: usize, page: u64) -> VirtAddr {
        VirtAddr(self.w.procs[proc].shared.0 + page * PAGE_SIZE + self.t as u64 * SLOT)
    }

    fn check(&self, seed: u64, op: Op, got: u64, want: u64, what: &str) {
        self.w.checks.fetch_add(1, Ordering::Relaxed);
        if got != want {
            fail(
                seed,
                self.t,
                op,
                format!(
                    "{what}: read {got:#x} (written by {}), expected {want:#x} (written by {})",
                    writer(got),
                    writer(want)
                ),
            );
        }
    }

    /// Reads `va` in `mm` as the CPU would and checks it holds `want`.
    fn expect(&self, seed: u64, op: Op, mm: &Mm, va: VirtAddr, want: u64, what: &str) {
        let got = Self::read_u64(mm, va).unwrap_or_else(|e| fail(seed, self.t, op, e.to_string()));
        self.check(seed, op, got, want, what);
    }

    fn read_u64(mm: &Mm, va: VirtAddr) -> Result<u64, MmError> {
        let mut b = [0u8; 8];
        mm.read(va, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Does one operation; false when there was nothing to do it on (no pin held, no
    /// child, the limit reached), which the report counts apart.
    fn step(&mut self, seed: u64, op: Op) -> bool {
        self.op = op_index(op);
        let w = self.w;
        let proc = self.rng.gen_range(0..PROCS);
        let page = self.rng.gen_range(0..SHARED_PAGES);
        let mm = w.procs[proc].mm.clone();
        let slot = self.slot(proc, page);
        let t = self.t;
        let ok_or_fail = |r: Result<(), String>| {
            if let Err(e) = r {
                fail(seed, t, op, e)
            }
        };
        match op {
            Op::CpuWrite => {
                let tag = self.tag();
                ok_or_fail(
                    mm.write(slot, &tag.to_le_bytes())
                        .map_err(|e| e.to_string()),
                );
                self.oracle[proc][page as usize] = tag;
            }
            Op::CpuRead => {
                self.expect(
                    seed,
                    op,
                    &mm,
                    slot,
                    self.oracle[proc][page as usize],
                    "cpu read of own slot",
                );
            }
            Op::Migrate => {
                let target = match self.rng.gen_range(0..3) {
                    0 => &w.dev_private,
                    1 => &w.dev_coherent,
                    _ => w.host.phys().ram(),
                };
                // Pinned pages, pages shared with a fork's child and pages someone holds
                // by reference refuse with EBUSY, a page nobody touched yet with EFAULT;
                // nothing else may fail.
                match mm.migrate_page(slot, target) {
                    Ok(_) => {}
                    Err(e) if e.errno() == 16 || e.errno() == 14 => {
                        w.refused.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => fail(seed, self.t, op, e.to_string()),
                }
            }
            Op::DmaWrite | Op::DmaRead => {
                let dev = w.devices[self.rng.gen_range(0..w.devices.len())];
                let dir = if op == Op::DmaWrite {
                    Direction::FromDevice
                } else {
                    Direction::ToDevice
                };
                let sg = get_user_dma_sg(
                    &mm,
                    &w.host.dma().attach(dev).unwrap(),
                    UserSg::new(slot, 8, dir),
                )
                .unwrap_or_else(|e| fail(seed, self.t, op, e.to_string()));
                let seg = sg.segments()[0];
                if op == Op::DmaWrite {
                    let tag = self.tag();
                    ok_or_fail(
                        w.host
                            .dma()
                            .attach(dev)
                            .unwrap()
                            .dma_write(seg.addr, &tag.to_le_bytes())
                            .map_err(|e| e.to_string()),
                    );
                    self.oracle[proc][page as usize] = tag;
                } else {
                    let mut b = [0u8; 8];
                    ok_or_fail(
                        w.host
                            .dma()
                            .attach(dev)
                            .unwrap()
                            .dma_read(seg.addr, &mut b)
                            .map_err(|e| e.to_string()),
                    );
                    self.check(
                        seed,
                        op,
                        u64::from_le_bytes(b),
                        self.oracle[proc][page as usize],
                        "device read of own slot",
                    );
                }
            }
            Op::HoldPin => {
                if self.held.len() >= 3 || self.held.iter().any(|h| h.2 == proc && h.3 == page) {
                    return false;
                }
                let dev = w.devices[self.rng.gen_range(0..w.devices.len())];
                let sg = get_user_dma_sg(
                    &mm,
                    &w.host.dma().attach(dev).unwrap(),
                    UserSg::new(slot, 8, Direction::Bidirectional),
                )
                .unwrap_or_else(|e| fail(seed, self.t, op, e.to_string()));
                self.held.push((sg, dev, proc, page));
            }
            Op::DmaHeld => {
                if self.held.is_empty() {
                    return false;
                }
                let i = self.rng.gen_range(0..self.held.len());
                let (proc, page, bdf) = (self.held[i].2, self.held[i].3, self.held[i].1);
                let tag = self.tag();
                let seg = self.held[i].0.segments()[0];
                ok_or_fail(
                    w.host
                        .dma()
                        .attach(bdf)
                        .unwrap()
                        .dma_write(seg.addr, &tag.to_le_bytes())
                        .map_err(|e| e.to_string()),
                );
                self.oracle[proc][page as usize] = tag;
                // The process must see what the device wrote through its pin, whatever
                // forks, migrations and COW breaks happened meanwhile.
                self.expect(
                    seed,
                    op,
                    &w.procs[proc].mm,
                    self.slot(proc, page),
                    tag,
                    "cpu read after DMA through a held pin",
                );
            }
            Op::ReleasePin => {
                if !self.held.is_empty() {
                    let i = self.rng.gen_range(0..self.held.len());
                    self.held.swap_remove(i);
                }
            }
            Op::Fork => {
                if self.children.len() >= 2 {
                    return false;
                }
                let child = w.procs[proc]
                    .mm
                    .fork()
                    .unwrap_or_else(|e| fail(seed, self.t, op, e.to_string()));
                let snapshot = self.oracle[proc].clone();
                // The child sees fork-time data; a write in it leaves the parent alone.
                self.expect(
                    seed,
                    op,
                    &child,
                    slot,
                    snapshot[page as usize],
                    "child's copy of own slot",
                );
                let mut snapshot = snapshot;
                let tag = self.tag();
                ok_or_fail(
                    child
                        .write(slot, &tag.to_le_bytes())
                        .map_err(|e| e.to_string()),
                );
                snapshot[page as usize] = tag;
                self.expect(
                    seed,
                    op,
                    &mm,
                    slot,
                    self.oracle[proc][page as usize],
                    "parent after a write in the child",
                );
                self.children.push(Child {
                    mm: child,
                    proc,
                    snapshot,
                });
            }
            Op::ExitChild => {
                if self.children.is_empty() {
                    return false;
                }
                let i = self.rng.gen_range(0..self.children.len());
                let c = self.children.swap_remove(i);
                self.exit_child(seed, op, c);
            }
            Op::PrivMmap => {
                if self.private.len() >= 4 {
                    return false;
                }
                let pages = self.rng.gen_range(1..=8u64);
                let va = mm
                    .mmap_anon(pages * PAGE_SIZE, Prot::RW)
                    .unwrap_or_else(|e| fail(seed, self.t, op, e.to_string()));
                let mut tags = Vec::new();
                for pg in 0..pages {
                    let tag = self.tag();
                    ok_or_fail(
                        mm.write(VirtAddr(va.0 + pg * PAGE_SIZE), &tag.to_le_bytes())
                            .map_err(|e| e.to_string()),
                    );
                    tags.push(tag);
                }
                self.private.push(PrivRegion {
                    proc,
                    va,
                    tags,
                    writable: true,
                });
            }
            Op::PrivMunmap | Op::PrivMprotect | Op::PrivMadvise | Op::PrivCheck => {
                if self.private.is_empty() {
                    return false;
                }
                let i = self.rng.gen_range(0..self.private.len());
                let r = &mut self.private[i];
                let pmm = w.procs[r.proc].mm.clone();
                let len = r.tags.len() as u64 * PAGE_SIZE;
                match op {
                    Op::PrivMunmap => {
                        ok_or_fail(pmm.munmap(r.va, len).map_err(|e| e.to_string()));
                        self.private.swap_remove(i);
                        return true;
                    }
                    Op::PrivMprotect => {
                        let prot = if r.writable { Prot::READ } else { Prot::RW };
                        ok_or_fail(pmm.mprotect(r.va, len, prot).map_err(|e| e.to_string()));
                        r.writable = !r.writable;
                        if !r.writable {
                            match pmm.write(r.va, &[0]) {
                                Err(e) if e.errno() == 13 => {}
                                other => fail(
                                    seed,
                                    self.t,
                                    op,
                                    format!("write to a read-only mapping: {other:?}"),
                                ),
                            }
                        }
                    }
                    Op::PrivMadvise => {
                        let pg = self.rng.gen_range(0..r.tags.len());
                        ok_or_fail(
                            pmm.madvise_dontneed(
                                VirtAddr(r.va.0 + pg as u64 * PAGE_SIZE),
                                PAGE_SIZE,
                            )
                            .map_err(|e| e.to_string()),
                        );
                        r.tags[pg] = 0;
                    }
                    _ => {}
                }
                let r = &self.private[i];
                for (pg, want) in r.tags.iter().enumerate() {
                    self.expect(
                        seed,
                        op,
                        &pmm,
                        VirtAddr(r.va.0 + pg as u64 * PAGE_SIZE),
                        *want,
                        "private page",
                    );
                }
            }
            Op::P2pMmap => {
                if self.p2p.len() >= 3 {
                    return false;
                }
                let pi = self.rng.gen_range(0..w.providers.len());
                let pages = self.rng.gen_range(1..=4u64);
                // Removal that had finished before the mmap began must refuse it; one
                // that finishes while the mmap returns proves nothing.
                let removed_before = w.removed.load(Ordering::SeqCst);
                match w.providers[pi].mmap(&mm, pages * PAGE_SIZE, true, 0, Prot::RW) {
                    Ok(va) => {
                        if pi == 0 && removed_before {
                            fail(
                                seed,
                                self.t,
                                op,
                                "mmap of a removed provider succeeded".into(),
                            );
                        }
                        let tag = self.tag();
                        match mm.write(va, &tag.to_le_bytes()) {
                            Ok(()) => {}
                            // Removal began after the mmap and zapped it already.
                            Err(e) if pi == 0 && e.errno() == 14 && w.revoked() => {}
                            Err(e) => fail(seed, self.t, op, e.to_string()),
                        }
                        self.p2p.push(P2pMap {
                            proc,
                            provider: pi,
                            va,
                            pages,
                            tag,
                        });
                    }
                    Err(P2pError::NoDevice { .. }) if pi == 0 && w.revoked() => {}
                    Err(P2pError::NoMemory { .. }) => {}
                    Err(e) => fail(seed, self.t, op, e.to_string()),
                }
            }
            Op::P2pCheck | Op::P2pPeerDma | Op::P2pMunmap => {
                if self.p2p.is_empty() {
                    return false;
                }
                let i = self.rng.gen_range(0..self.p2p.len());
                let (pproc, pi, va, pages) = (
                    self.p2p[i].proc,
                    self.p2p[i].provider,
                    self.p2p[i].va,
                    self.p2p[i].pages,
                );
                let pmm = w.procs[pproc].mm.clone();
                // Provider 0's pages may vanish at any point once its removal began.
                let revocable = pi == 0;
                match op {
                    Op::P2pMunmap => {
                        ok_or_fail(pmm.munmap(va, pages * PAGE_SIZE).map_err(|e| e.to_string()));
                        self.p2p.swap_remove(i);
                    }
                    Op::P2pCheck => match Self::read_u64(&pmm, va) {
                        Ok(got) => {
                            let want = self.p2p[i].tag;
                            self.check(seed, op, got, want, "p2p page read by the CPU");
                        }
                        Err(e) if revocable && e.errno() == 14 && w.revoked() => {}
                        Err(e) => fail(seed, self.t, op, e.to_string()),
                    },
                    _ => {
                        let peers: Vec<Bdf> = w
                            .peers
                            .iter()
                            .filter(|(p, _)| *p == pi)
                            .map(|(_, d)| *d)
                            .collect();
                        if peers.is_empty() {
                            return false;
                        }
                        let dev = peers[self.rng.gen_range(0..peers.len())];
                        let sg = match get_user_dma_sg(
                            &pmm,
                            &w.host.dma().attach(dev).unwrap(),
                            UserSg::new(va, 8, Direction::Bidirectional),
                        ) {
                            Ok(sg) => sg,
                            Err(GupError::Mm(e)) if revocable && e.errno() == 14 && w.revoked() => {
                                return true;
                            }
                            Err(e) => fail(seed, self.t, op, e.to_string()),
                        };
                        let tag = self.tag();
                        ok_or_fail(
                            w.host
                                .dma()
                                .attach(dev)
                                .unwrap()
                                .dma_write(sg.segments()[0].addr, &tag.to_le_bytes())
                                .map_err(|e| e.to_string()),
                        );
                        let mut b = [0u8; 8];
                        ok_or_fail(
                            w.host
                                .dma()
                                .attach(dev)
                                .unwrap()
                                .dma_read(sg.segments()[0].addr, &mut b)
                                .map_err(|e| e.to_string()),
                        );
                        self.check(
                            seed,
                            op,
                            u64::from_le_bytes(b),
                            tag,
                            "peer read back of its p2p write",
                        );
                        self.p2p[i].tag = tag;
                        drop(sg);
                    }
                }
            }
            Op::MirrorFault => {
                // Only process 0 is mirrored: the device's page table and an ODP
                // mapping of the page, both committed only if no invalidation raced.
                let va = self.slot(0, page);
                let seq = self.sub.read_begin();
                let pte = w.procs[0].mm.pte(va);
                let Some(pfn) = pte.pfn().filter(|_| pte.is_present()) else {
                    return false;
                };
                // Writable for the device only where the CPU may write without a fault
                // (hmm_range_fault reports HMM_PFN_WRITE only then): a copy-on-write
                // page shared with a child must not be written in place.
                let dir = if pte.writable() {
                    Direction::Bidirectional
                } else {
                    Direction::ToDevice
                };
                let sg = SgTable::from_runs(&[(pfn, 1)], 0, PAGE_SIZE, PAGE_SIZE);
                let mapping = w
                    .host
                    .dma()
                    .attach(self.mirror.dev)
                    .unwrap()
                    .map_sg(&sg, dir)
                    .map(Arc::new)
                    .unwrap_or_else(|e| fail(seed, self.t, op, e.to_string()));
                let mut t = self.mirror.table.lock().unwrap();
                let replaced = if !self.sub.read_retry(seq) {
                    t[page as usize] = Some(pfn);
                    self.mirror.odp.lock().unwrap()[page as usize].replace(mapping)
                } else {
                    Some(mapping)
                };
                drop(t);
                drop(replaced);
            }
            Op::OdpWrite => {
                // The device writes its slot through the ODP mapping, holding no lock:
                // done, or refused because an invalidation revoked the mapping.
                let mapping = {
                    let odp = self.mirror.odp.lock().unwrap();
                    match odp[page as usize].as_ref() {
                        Some(m) if m.direction() != Direction::ToDevice => m.clone(),
                        _ => return false,
                    }
                };
                let tag = self.tag();
                match mapping.dma_write(self.t as u64 * SLOT, &tag.to_le_bytes()) {
                    Ok(()) => self.oracle[0][page as usize] = tag,
                    Err(DmaError::Revoked { .. }) => {
                        w.refused.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => fail(seed, self.t, op, e.to_string()),
                }
            }
            Op::Evict => {
                // migrate_device_range over a whole device region, racing everything:
                // only a pinned page may stay, and the oracle checks the data later.
                let mut regions = vec![w.dev_private.clone(), w.dev_coherent.clone()];
                regions.extend(w.hmm_dev.chunks());
                let r = &regions[self.rng.gen_range(0..regions.len())];
                match migrate_device_range(w.host.phys(), r, r.base(), r.frames()) {
                    Ok(ev) => {
                        for (pfn, e) in &ev.refused {
                            if e.errno() != Errno::EBUSY {
                                fail(
                                    seed,
                                    self.t,
                                    op,
                                    format!("{pfn} of {} at {}: {e}", r.kind(), r.base()),
                                );
                            }
                            w.refused.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(e) => fail(seed, self.t, op, e.to_string()),
                }
            }
            Op::GpuRead | Op::GpuWrite => {
                // The GPU loads or stores this thread's slot through its page table
                // (migrating the page into VRAM on first touch, or mapping it remotely):
                // it must see and leave what the oracle says.
                let ctx = &w.procs[proc].gpu;
                if op == Op::GpuWrite {
                    let tag = self.tag();
                    ctx.store(slot, &tag.to_le_bytes())
                        .unwrap_or_else(|e| fail(seed, self.t, op, e.to_string()));
                    self.oracle[proc][page as usize] = tag;
                } else {
                    let mut b = [0u8; 8];
                    ctx.load(slot, &mut b)
                        .unwrap_or_else(|e| fail(seed, self.t, op, e.to_string()));
                    let want = self.oracle[proc][page as usize];
                    let got = u64::from_le_bytes(b);
                    if got != want {
                        let gpu_map = ctx.mapped(slot);
                        let pte = w.procs[proc].mm.pte(slot);
                        let cpu = Self::read_u64(&mm, slot);
                        let what = format!(
                            "gpu load {got:#x} (written by {}), expected {want:#x} (written \
                             by {}); the GPU maps {gpu_map:?}, the process {pte:?}, the CPU \
                             reads {cpu:x?}",
                            writer(got),
                            writer(want)
                        );
                        fail(seed, self.t, op, what);
                    }
                    self.check(seed, op, got, want, "gpu load");
                }
            }
            Op::GpuPlace => {
                let place = if self.rng.gen_bool(0.5) {
                    Placement::Remote
                } else {
                    Placement::MigrateOnTouch
                };
                let page_va = VirtAddr(w.procs[proc].shared.0 + page * PAGE_SIZE);
                ok_or_fail(
                    w.procs[proc]
                        .gpu
                        .set_placement(page_va, PAGE_SIZE, place)
                        .map_err(|e| e.to_string()),
                );
            }
            Op::GpuPrefetch => {
                // A few pages of the shared area into VRAM or back, racing everything.
                let first = self.rng.gen_range(0..SHARED_PAGES);
                let n = self.rng.gen_range(1..=(SHARED_PAGES - first).min(8));
                let to = if self.rng.gen_bool(0.5) {
                    Location::Vram
                } else {
                    Location::Ram
                };
                let va = VirtAddr(w.procs[proc].shared.0 + first * PAGE_SIZE);
                w.procs[proc]
                    .gpu
                    .prefetch(va, n * PAGE_SIZE, to)
                    .unwrap_or_else(|e| fail(seed, self.t, op, e.to_string()));
            }
            Op::GpuEvict => {
                let ev = w.procs[proc]
                    .gpu
                    .gpu()
                    .evict()
                    .unwrap_or_else(|e| fail(seed, self.t, op, e.to_string()));
                if let Some((pfn, e)) = ev.refused.first() {
                    fail(seed, self.t, op, format!("VRAM page {pfn} stayed: {e}"));
                }
            }
            Op::RdmaOdpWrite | Op::RdmaOdpRead | Op::RdmaBoWrite => {
                return self.rdma_step(seed, op, proc, page);
            }
            Op::BoWrite
            | Op::BoRead
            | Op::BoPeerDma
            | Op::BoCopy
            | Op::BoEvict
            | Op::BoPin
            | Op::BoClose => {
                return self.bo_step(seed, op, page % BO_PAGES);
            }
            Op::HmmRead | Op::HmmMigrate | Op::HmmExclusive => {
                // The HMM test device reads the page through its mirror
                // (hmm_range_fault), moves it into its memory (migrate_vma), or takes
                // it for atomics (make_device_exclusive); every way, this thread's slot
                // of what it read must be the oracle's.
                let page_va = VirtAddr(w.procs[proc].shared.0 + page * PAGE_SIZE);
                let f = &w.procs[proc].hmm;
                let mut b = vec![0u8; PAGE_SIZE as usize];
                let r = match op {
                    Op::HmmRead => f.read(page_va, 1, &mut b),
                    Op::HmmMigrate => f.migrate_to_dev(page_va, 1, &mut b),
                    _ => f.exclusive(page_va, 1, &mut b),
                };
                match r {
                    Ok(_) => {
                        let at = self.t * SLOT as usize;
                        let got = u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
                        let want = self.oracle[proc][page as usize];
                        if got != want {
                            let pte = w.procs[proc].mm.pte(page_va);
                            let kind = |p: Option<Pfn>| {
                                p.and_then(|p| w.host.phys().region(p))
                                    .map_or("-".to_string(), |r| r.kind().to_string())
                            };
                            let table = f.mirrored(page_va);
                            fail(
                                seed,
                                self.t,
                                op,
                                format!(
                                    "device read {got:#x}, expected {want:#x} (written by {}); \
                                     the table maps {table:?} ({}), the process {pte:?} ({})",
                                    writer(want),
                                    kind(table),
                                    kind(pte.pfn())
                                ),
                            );
                        }
                        self.check(seed, op, got, want, "device read");
                    }
                    // A page pinned or shared by fork does not move, and a CPU access
                    // can take a page back before the read-back: ENOENT, as in the
                    // kernel; nothing else may fail.
                    Err(e) if op != Op::HmmRead && e.errno == Errno::ENOENT => {
                        w.refused.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => fail(seed, self.t, op, e.to_string()),
                }
            }
            Op::MirrorCheck => {
                let t = self.mirror.table.lock().unwrap();
                for (pg, e) in t.iter().enumerate() {
                    let Some(pfn) = *e else { continue };
                    // Under the mirror's lock no invalidation of the page can finish, so
                    // the entry must still be what the process maps, with its bytes.
                    let va = self.slot(0, pg as u64);
                    let pte = w.procs[0].mm.pte(va);
                    if !(pte.is_present() && pte.pfn() == Some(pfn)) {
                        fail(
                            seed,
                            self.t,
                            op,
                            format!("mirror holds {pfn} for {va}, the process maps {pte:?}"),
                        );
                    }
                    let region =
                        w.host.phys().region(pfn).unwrap_or_else(|| {
                            fail(seed, self.t, op, format!("{pfn} in no region"))
                        });
                    let mut b = [0u8; 8];
                    region.read(pfn, self.t as u64 * SLOT, &mut b);
                    self.check(
                        seed,
                        op,
                        u64::from_le_bytes(b),
                        self.oracle[0][pg],
                        "device read through the mirror",
                    );
                }
            }
        }
        true
    }

    /// Checks a child still holds its fork-time copy of this thread's slots, then
    /// exits it.
    fn exit_child(&self, seed: u64, op: Op, c: Child) {
        for (pg, want) in c.snapshot.iter().enumerate() {
            let va = self.slot(c.proc, pg as u64);
            self.expect(seed, op, &c.mm, va, *want, "child's own slot at exit");
        }
        c.mm.exit();
    }

    /// An operation on this thread's GPU buffer object (or, to evict, anyone's),
    /// racing evictions, the unified memory's use of VRAM and the other threads' BOs:
    /// every byte must be where the oracle says, whichever way it is reached.
    fn bo_step(&mut self, seed: u64, op: Op, page: u64) -> bool {
        let w = self.w;
        let t = self.t;
        let (bo, va) = w.bos[t];
        let off = page * PAGE_SIZE;
        let ctx = &w.procs[0].gpu;
        let die = |e: String| -> ! { fail(seed, t, op, e) };
        match op {
            Op::BoWrite => {
                let tag = self.tag();
                let r = if self.rng.gen_bool(0.5) {
                    ctx.store(VirtAddr(va.0 + off), &tag.to_le_bytes())
                } else {
                    w.gpu.bo_write(bo, off, &tag.to_le_bytes())
                };
                r.unwrap_or_else(|e| die(e.to_string()));
                self.bo_oracle[page as usize] = tag;
            }
            Op::BoRead => {
                let mut b = [0u8; 8];
                let r = if self.rng.gen_bool(0.5) {
                    ctx.load(VirtAddr(va.0 + off), &mut b)
                } else {
                    w.gpu.bo_read(bo, off, &mut b)
                };
                r.unwrap_or_else(|e| die(e.to_string()));
                let want = self.bo_oracle[page as usize];
                self.check(seed, op, u64::from_le_bytes(b), want, "own BO");
            }
            Op::BoPeerDma => {
                // A peer writes the page through its mapping of the BO; when the BO
                // moves first, the mapping is revoked (EAGAIN) and the peer maps again.
                let tag = self.tag();
                let dev = w.host.dma().attach(w.devices[2]).unwrap();
                loop {
                    let m = w
                        .gpu
                        .bo_map_peer(bo, &dev, Direction::Bidirectional, None)
                        .unwrap_or_else(|e| die(e.to_string()));
                    match m.mapping().dma_write(off, &tag.to_le_bytes()) {
                        Ok(()) => break,
                        Err(e) if e.errno() == Errno::EAGAIN => {
                            w.refused.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => die(e.to_string()),
                    }
                }
                self.bo_oracle[page as usize] = tag;
            }
            Op::BoCopy => {
                let src = (page + 1) % BO_PAGES;
                w.gpu
                    .ce_copy(CeAddr::Bo(bo, off), CeAddr::Bo(bo, src * PAGE_SIZE), 8)
                    .unwrap_or_else(|e| die(e.to_string()));
                self.bo_oracle[page as usize] = self.bo_oracle[src as usize];
            }
            Op::BoEvict => {
                if self.rng.gen_bool(0.2) {
                    let ev = w.gpu.evict_bos();
                    for (h, why) in &ev.skipped {
                        if !why.starts_with("pinned by") {
                            die(format!("{h} stayed: {why}"));
                        }
                    }
                } else {
                    let (h, _) = w.bos[self.rng.gen_range(0..THREADS)];
                    match w.gpu.bo_evict(h) {
                        Ok(_) => {}
                        Err(e) if e.errno() == Errno::EBUSY => {
                            w.refused.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => die(e.to_string()),
                    }
                }
            }
            Op::BoPin => {
                let me = format!("soak {t}");
                if self.bo_pinned {
                    w.gpu
                        .bo_unpin(bo, &me)
                        .unwrap_or_else(|e| die(e.to_string()));
                } else {
                    w.gpu.bo_pin(bo, &me).unwrap_or_else(|e| die(e.to_string()));
                }
                self.bo_pinned = !self.bo_pinned;
            }
            Op::BoClose => {
                // A scratch BO whose GEM handle closes while its dma-buf and a peer's
                // mapping hold it, racing the other threads' evictions: the mapping
                // still reads its bytes (or was revoked by a move: EAGAIN), and
                // whichever holder goes last frees it (the end's audit: nothing left).
                let tag = self.tag();
                let h = match w.gpu.bo_alloc(PAGE_SIZE) {
                    Ok(h) => h,
                    Err(e) if e.errno() == Errno::ENOMEM => {
                        w.refused.fetch_add(1, Ordering::Relaxed);
                        return true;
                    }
                    Err(e) => die(e.to_string()),
                };
                w.gpu
                    .bo_write(h, 0, &tag.to_le_bytes())
                    .unwrap_or_else(|e| die(e.to_string()));
                let buf = w
                    .gpu
                    .bo_export(h, P2pPolicy::MoveToRam)
                    .unwrap_or_else(|e| die(e.to_string()));
                let dev = w.host.dma().attach(w.devices[2]).unwrap();
                let m = w
                    .gpu
                    .bo_map_peer(h, &dev, Direction::Bidirectional, None)
                    .unwrap_or_else(|e| die(e.to_string()));
                w.gpu.bo_free(h).unwrap_or_else(|e| die(e.to_string()));
                if w.gpu.bo_info(h).is_ok() {
                    die(format!("{h} still reachable by its closed handle"));
                }
                let mut b = [0u8; 8];
                match m.mapping().dma_read(0, &mut b) {
                    Ok(()) => self.check(seed, op, u64::from_le_bytes(b), tag, "closed BO"),
                    Err(e) if e.errno() == Errno::EAGAIN => {
                        w.refused.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => die(e.to_string()),
                }
                if self.rng.gen_bool(0.5) {
                    drop(buf);
                    drop(m);
                } else {
                    drop(m);
                    drop(buf);
                }
            }
            _ => unreachable!("not a BO operation"),
        }
        true
    }

    /// An RDMA operation through the looped-back NIC: a write or read of this thread's
    /// slot through the process's ODP MR (racing migration, fork, exclusive access,
    /// the GPU), or a write into this thread's BO through its dma-buf MR (racing
    /// evictions): every one must complete, and the bytes be the oracle's.
    fn rdma_step(&mut self, seed: u64, op: Op, proc: usize, page: u64) -> bool {
        let w = self.w;
        let t = self.t;
        let r = &w.rdma.threads[t];
        let die = |e: String| -> ! { fail(seed, t, op, e) };
        let src = &w.rdma.requester;
        // Each request goes to the responder QP in process `to`'s context.
        let run = |to: usize, wr_op: SendOp| {
            r.qps[to]
                .post_send(SendWr {
                    wr_id: 1,
                    op: wr_op,
                    sg: vec![Sge {
                        addr: r.src.0,
                        len: 8,
                        lkey: r.lkey,
                    }],
                    signaled: true,
                })
                .unwrap_or_else(|e| die(e.to_string()));
            let wc = r.cq.poll(4);
            if wc.len() != 1 || wc[0].status != WcStatus::Success {
                die(format!("completion {wc:?}"));
            }
        };
        match op {
            Op::RdmaOdpWrite => {
                let tag = self.tag();
                src.write(r.src, &tag.to_le_bytes())
                    .unwrap_or_else(|e| die(e.to_string()));
                run(
                    proc,
                    SendOp::Write {
                        remote_addr: self.slot(proc, page).0,
                        rkey: w.rdma.odp_rkeys[proc],
                    },
                );
                self.oracle[proc][page as usize] = tag;
            }
            Op::RdmaOdpRead => {
                run(
                    proc,
                    SendOp::Read {
                        remote_addr: self.slot(proc, page).0,
                        rkey: w.rdma.odp_rkeys[proc],
                    },
                );
                let want = self.oracle[proc][page as usize];
                self.expect(seed, op, src, r.src, want, "slot read by RDMA through ODP");
            }
            _ => {
                let (_, rkey) = &w.rdma.bo_bufs[t];
                let tag = self.tag();
                src.write(r.src, &tag.to_le_bytes())
                    .unwrap_or_else(|e| die(e.to_string()));
                let page = page % BO_PAGES;
                // Process 0's responder QP serves the dma-buf MR (same PD).
                run(
                    0,
                    SendOp::Write {
                        remote_addr: page * PAGE_SIZE,
                        rkey: *rkey,
                    },
                );
                self.bo_oracle[page as usize] = tag;
            }
        }
        true
    }

    /// Gives everything back, checking what is checkable.
    fn finish(mut self, seed: u64) {
        self.held.clear();
        let (bo, _) = self.w.bos[self.t];
        if self.bo_pinned {
            self.w
                .gpu
                .bo_unpin(bo, &format!("soak {}", self.t))
                .unwrap();
        }
        for page in 0..BO_PAGES {
            let mut b = [0u8; 8];
            self.w.gpu.bo_read(bo, page * PAGE_SIZE, &mut b).unwrap();
            let want = self.bo_oracle[page as usize];
            self.check(
                seed,
                Op::BoRead,
                u64::from_le_bytes(b),
                want,
                "own BO at the end",
            );
        }
        for c in std::mem::take(&mut self.children) {
            self.exit_child(seed, Op::ExitChild, c);
        }
        for r in std::mem::take(&mut self.private) {
            self.w.procs[r.proc]
                .mm
                .munmap(r.va, r.tags.len() as u64 * PAGE_SIZE)
                .unwrap();
        }
        for m in std::mem::take(&mut self.p2p) {
            self.w.procs[m.proc]
                .mm
                .munmap(m.va, m.pages * PAGE_SIZE)
                .unwrap();
        }
        for proc in 0..PROCS {
            for page in 0..SHARED_PAGES {
                let mm = &self.w.procs[proc].mm;
                self.expect(
                    seed,
                    Op::CpuRead,
                    mm,
                    self.slot(proc, page),
                    self.oracle[proc][page as usize],
                    "own slot at the end",
                );
            }
        }
    }
}

/// Whether the HMM test device's operations join the mix: yes unless
/// `PEERDMA_SOAK_HMM=0` (to tell a failure of the rest apart).
fn hmm_ops() -> bool {
    std::env::var_os("PEERDMA_SOAK_HMM").is_none_or(|v| v != "0")
}

fn pick(rng: &mut ChaCha8Rng) -> Op {
    let hmm = hmm_ops();
    let mix = || {
        MIX.iter().filter(move |(op, _)| {
            hmm || !matches!(
                op,
                Op::HmmRead
                    | Op::HmmMigrate
                    | Op::HmmExclusive
                    | Op::GpuRead
                    | Op::GpuWrite
                    | Op::GpuPlace
                    | Op::GpuEvict
                    | Op::GpuPrefetch
                    | Op::BoWrite
                    | Op::BoRead
                    | Op::BoPeerDma
                    | Op::BoCopy
                    | Op::BoEvict
                    | Op::BoPin
                    | Op::RdmaBoWrite
            )
        })
    };
    let total: u32 = mix().map(|(_, w)| w).sum();
    let mut x = rng.gen_range(0..total);
    for &(op, w) in mix() {
        if x < w {
            return op;
        }
        x -= w;
    }
    unreachable!()
}

fn build(iommu: bool) -> World {
    let host = common::workstation(256 << 20, iommu);
    let phys = host.phys().clone();
    let dev_private = phys
        .memremap_pages(RegionKind::DevicePrivate { owner: 0xd1 }, 8 << 20)
        .unwrap();
    let dev_coherent = phys
        .memremap_pages(RegionKind::DeviceCoherent { owner: 0xd2 }, 8 << 20)
        .unwrap();
    let hmm_dev = DmirrorDevice::new(&phys, DmirrorMemory::Private, 8 << 20);
    // A GPU with little VRAM, so first touches also find it full.
    let gpu = Gpu::new(host.dma(), "0000:03:00.0".parse().unwrap(), 64 * PAGE_SIZE).unwrap();
    let procs: Vec<Proc> = (0..PROCS)
        .map(|_| {
            let mm = host.spawn();
            let shared = mm.mmap_anon(SHARED_PAGES * PAGE_SIZE, Prot::RW).unwrap();
            let hmm = hmm_dev.open(&mm);
            let gpu = gpu.open(&mm);
            Proc {
                mm,
                shared,
                hmm,
                gpu,
            }
        })
        .collect();
    let devices: Vec<Bdf> = [
        "0000:03:00.0",
        "0000:04:00.0",
        "0000:05:00.0",
        "0000:06:00.0",
        "0000:07:00.0",
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect();
    let providers: Vec<Arc<Provider>> = host
        .devices_of::<Nvme>()
        .iter()
        .filter_map(|n| n.cmb().cloned())
        .collect();
    assert!(providers.len() >= 2, "the workstation has two CMBs");
    // Which peers reach which provider, found by trying once.
    let probe = host.spawn();
    let mut peers = Vec::new();
    for (pi, p) in providers.iter().enumerate() {
        let va = p.mmap(&probe, PAGE_SIZE, true, 0, Prot::RW).unwrap();
        for &d in &devices {
            if d != p.dev()
                && get_user_dma_sg(
                    &probe,
                    &host.dma().attach(d).unwrap(),
                    UserSg::new(va, 8, Direction::Bidirectional),
                )
                .is_ok()
            {
                peers.push((pi, d));
            }
        }
    }
    probe.exit();
    assert!(peers.iter().any(|(p, _)| *p == 0), "provider 0 has a peer");
    let bos: Vec<(BoHandle, VirtAddr)> = (0..THREADS)
        .map(|_| {
            let h = gpu.bo_alloc(BO_PAGES * PAGE_SIZE).unwrap();
            (h, procs[0].gpu.map_bo(h).unwrap())
        })
        .collect();
    let rdma = rdma_setup(&host, &procs, &gpu, &bos);
    World {
        rdma,
        host,
        procs,
        dev_private,
        dev_coherent,
        hmm_dev,
        devices,
        providers,
        peers,
        removing: AtomicBool::new(false),
        removed: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        done: (0..THREADS).map(|_| AtomicU64::new(0)).collect(),
        current: (0..THREADS).map(|_| AtomicUsize::new(usize::MAX)).collect(),
        checks: AtomicU64::new(0),
        per_op: MIX.iter().map(|_| AtomicU64::new(0)).collect(),
        refused: AtomicU64::new(0),
        gpu,
        bos,
    }
}

/// The NIC at 0000:04:00.0 (the second GPU's slot, unused by a model here), looped
/// back: see [`Rdma`].
fn rdma_setup(host: &Host, procs: &[Proc], gpu: &Arc<Gpu>, bos: &[(BoHandle, VirtAddr)]) -> Rdma {
    let nic = Rnic::new(
        host.dma(),
        "0000:04:00.0".parse().unwrap(),
        RnicCaps::default(),
    )
    .unwrap();
    let rw = Access(Access::LOCAL_WRITE.0 | Access::REMOTE_WRITE.0 | Access::REMOTE_READ.0);
    let requester = host.spawn();
    let rctx = nic.open(&requester, requester.files()).unwrap();
    let rpd = rctx.alloc_pd().unwrap();
    let mut odp_rkeys = Vec::new();
    let mut resp = Vec::new();
    for p in procs {
        let ctx = nic.open(&p.mm, p.mm.files()).unwrap();
        let pd = ctx.alloc_pd().unwrap();
        let mr = ctx
            .reg_mr(
                pd,
                p.shared,
                SHARED_PAGES * PAGE_SIZE,
                p.shared.0,
                rw | Access::ON_DEMAND,
            )
            .unwrap();
        odp_rkeys.push(mr.rkey());
        resp.push((ctx, pd));
    }
    let bo_bufs = bos
        .iter()
        .map(|(h, _)| {
            let buf = gpu.bo_export(*h, P2pPolicy::MoveToRam).unwrap();
            let fd = procs[0].mm.files().export_fd(&buf);
            let (ctx, pd) = &resp[0];
            let mr = ctx
                .reg_dmabuf_mr(*pd, 0, BO_PAGES * PAGE_SIZE, 0, fd, rw)
                .unwrap();
            (buf, mr.rkey())
        })
        .collect();
    let threads = (0..THREADS)
        .map(|_| {
            let src = requester.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
            let lkey = rctx.reg_mr(rpd, src, PAGE_SIZE, src.0, rw).unwrap().lkey();
            let cq = rctx.create_cq().unwrap();
            let qps = resp
                .iter()
                .map(|(ctx, pd)| {
                    let qcq = ctx.create_cq().unwrap();
                    let rq = ctx.create_qp(*pd, &qcq, &qcq).unwrap();
                    let q = rctx.create_qp(rpd, &cq, &cq).unwrap();
                    for (x, y) in [(&q, &rq), (&rq, &q)] {
                        x.modify(QpState::Init, None).unwrap();
                        x.modify(QpState::Rtr, Some(y)).unwrap();
                        x.modify(QpState::Rts, None).unwrap();
                    }
                    q
                })
                .collect();
            RdmaThread { src, lkey, cq, qps }
        })
        .collect();
    Rdma {
        nic,
        requester,
        odp_rkeys,
        bo_bufs,
        threads,
    }
}

fn op_index(op: Op) -> usize {
    MIX.iter().position(|(o, _)| *o == op).unwrap()
}

/// What one soak did.
struct Report {
    ops: u64,
    checks: u64,
    refused: u64,
    per_op: Vec<(Op, u64)>,
}

/// Runs one soak.
fn soak(seed: u64, iommu: bool, secs: f64) -> Report {
    let w = build(iommu);
    let started = Instant::now();
    let run_for = Duration::from_secs_f64(secs);
    thread::scope(|s| {
        let w = &w;
        for t in 0..THREADS {
            s.spawn(move || {
                let mirror = Arc::new(Mirror {
                    table: Mutex::new(vec![None; SHARED_PAGES as usize]),
                    odp: Mutex::new((0..SHARED_PAGES).map(|_| None).collect()),
                    dev: w.devices[t % w.devices.len()],
                });
                let sub = w.procs[0].mm.notifier().subscribe(
                    w.procs[0].shared,
                    SHARED_PAGES * PAGE_SIZE,
                    mirror.clone(),
                );
                let mut me = Worker {
                    w,
                    t,
                    rng: ChaCha8Rng::seed_from_u64(
                        seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ t as u64,
                    ),
                    next_tag: 0,
                    oracle: vec![vec![0; SHARED_PAGES as usize]; PROCS],
                    held: Vec::new(),
                    children: Vec::new(),
                    private: Vec::new(),
                    p2p: Vec::new(),
                    mirror,
                    sub,
                    bo_oracle: vec![0; BO_PAGES as usize],
                    bo_pinned: false,
                    op: 0,
                };
                while !w.stop.load(Ordering::Relaxed) {
                    let op = pick(&mut me.rng);
                    w.current[t].store(op_index(op), Ordering::Relaxed);
                    let did = me.step(seed, op);
                    w.done[t].fetch_add(1, Ordering::Relaxed);
                    if did {
                        w.per_op[op_index(op)].fetch_add(1, Ordering::Relaxed);
                    }
                }
                w.current[t].store(usize::MAX, Ordering::Relaxed);
                me.finish(seed);
            });
        }
        // Provider 0 goes away part way through, while everything runs.
        let remover = s.spawn(move || {
            thread::sleep(run_for.mul_f64(0.4));
            w.removing.store(true, Ordering::SeqCst);
            w.providers[0].remove(None).unwrap();
            w.removed.store(true, Ordering::SeqCst);
        });
        // The watchdog, and the clock.
        let mut last = (0u64, Instant::now());
        while started.elapsed() < run_for {
            thread::sleep(Duration::from_millis(50));
            let total: u64 = w.done.iter().map(|d| d.load(Ordering::Relaxed)).sum();
            if total != last.0 {
                last = (total, Instant::now());
            } else if last.1.elapsed() > WATCHDOG {
                eprintln!(
                    "soak watchdog: no progress for {WATCHDOG:?}; seed {seed}, iommu {iommu}"
                );
                for t in 0..THREADS {
                    let c = w.current[t].load(Ordering::Relaxed);
                    eprintln!(
                        "  thread {t}: {} operations done, now in {}",
                        w.done[t].load(Ordering::Relaxed),
                        OPS.get(c).copied().unwrap_or("(between operations)")
                    );
                }
                eprintln!(
                    "  provider removal: {}",
                    if remover.is_finished() {
                        "done"
                    } else {
                        "in progress"
                    }
                );
                std::process::abort();
            }
        }
        w.stop.store(true, Ordering::Relaxed);
        // The workers release what they hold as they stop; removal must then finish.
        let deadline = Instant::now() + WATCHDOG;
        while !remover.is_finished() {
            if Instant::now() > deadline {
                eprintln!(
                    "soak watchdog: provider removal did not finish; seed {seed}, iommu {iommu}"
                );
                std::process::abort();
            }
            thread::sleep(Duration::from_millis(10));
        }
    });
    let ops: u64 = w.done.iter().map(|d| d.load(Ordering::Relaxed)).sum();
    // Leak checks: everything the run took is back once the processes exit.
    let dma = w.host.dma();
    assert!(
        dma.sanitizer().is_clean(),
        "DMA violations: {:?}",
        dma.sanitizer().violations()
    );
    assert!(
        dma.iommu().faults().is_empty(),
        "IOMMU faults: {:?}",
        dma.iommu().faults()
    );
    assert!(w.removed.load(Ordering::SeqCst));
    assert!(
        w.host
            .phys()
            .regions()
            .iter()
            .all(|r| r.id() != w.providers[0].region().id()),
        "the removed provider's page map is gone"
    );
    let World {
        host,
        procs,
        gpu,
        bos,
        rdma,
        ..
    } = w;
    for p in procs {
        p.mm.exit();
    }
    let Rdma {
        nic,
        requester,
        bo_bufs,
        ..
    } = rdma;
    requester.exit();
    drop(bo_bufs);
    assert_eq!(nic.stats().mrs, 0, "every MR went with its process");
    for (h, _) in bos {
        gpu.bo_free(h).unwrap();
    }
    host.quiescent().assert_clean();
    Report {
        ops,
        checks: w.checks.load(Ordering::Relaxed),
        refused: w.refused.load(Ordering::Relaxed),
        per_op: MIX
            .iter()
            .zip(&w.per_op)
            .map(|((op, _), n)| (*op, n.load(Ordering::Relaxed)))
            .collect(),
    }
}

fn run(iommu: bool, default_seeds: &[u64]) {
    let secs: f64 = std::env::var("PEERDMA_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.5);
    if let Ok(mode) = std::env::var("PEERDMA_SOAK_IOMMU") {
        if (mode == "on") != iommu {
            return;
        }
    }
    let seeds: Vec<u64> = match std::env::var("PEERDMA_SOAK_SEED") {
        Ok(s) => vec![s.parse().expect("PEERDMA_SOAK_SEED is a number")],
        Err(_) if std::env::var("PEERDMA_SOAK_SECS").is_ok() => {
            vec![rand::thread_rng().gen()]
        }
        Err(_) => default_seeds.to_vec(),
    };
    for seed in seeds {
        eprintln!(
            "soak: seed {seed}, iommu {}, {secs} s",
            if iommu { "on" } else { "off" }
        );
        let t = Instant::now();
        let r = soak(seed, iommu, secs);
        let el = t.elapsed().as_secs_f64();
        eprintln!(
            "soak: seed {seed}, iommu {}: {} operations chosen, {} done ({:.0}/s), {} checks, {} refusals the kernel also gives, clean",
            if iommu { "on" } else { "off" },
            r.ops,
            r.per_op.iter().map(|(_, n)| n).sum::<u64>(),
            r.per_op.iter().map(|(_, n)| n).sum::<u64>() as f64 / el,
            r.checks,
            r.refused,
        );
        let mix: Vec<String> = r
            .per_op
            .iter()
            .map(|(op, n)| format!("{op:?} {n}"))
            .collect();
        eprintln!("soak: done by kind: {}", mix.join(", "));
    }
}

#[test]
fn soak_with_iommu() {
    run(true, &[1]);
}

#[test]
fn soak_without_iommu() {
    run(false, &[2]);
}
