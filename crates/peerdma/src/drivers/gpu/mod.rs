//! A GPU whose memory moves: VRAM managed as buffer objects and as device-private pages
//! for unified memory through HMM (what amdgpu's SVM, nouveau's SVMM and NVIDIA's UVM
//! do), a BAR through which peers reach VRAM, a copy engine, and eviction.
//!
//! A [`Gpu`] owns its VRAM (16 GiB by default, sparse): one budget shared by two
//! page maps, buffer objects ([`bo`]: a device-coherent region the BAR opens onto) and
//! the device-private pages unified memory migrates into. It mirrors processes into
//! its address space: [`Gpu::open`] gives a [`GpuContext`]
//! whose GPU virtual addresses are the process's own (shared virtual memory). GPU work
//! ([`GpuContext::fill`], [`copy`](GpuContext::copy), [`checksum`](GpuContext::checksum),
//! [`add_u32`](GpuContext::add_u32)) touches memory through the GPU page table; a page
//! the table lacks is a GPU fault, which the driver resolves by the range's
//! [`Placement`]: migrate the page into VRAM on first touch (CUDA managed memory), or
//! map the system page where it is (remote access, host-mapped memory). A page that
//! cannot move (pinned, shared by fork, a file's) and any page when VRAM is full is
//! mapped remotely. A CPU access to a page in VRAM faults it back through the GPU's
//! `migrate_to_ram`; [`Gpu::evict`] moves every VRAM page back with
//! `migrate_device_range`, as VRAM pressure or removal does.
//!
//! Buffer objects are mapped into a context at GPU addresses above every process
//! address ([`bo::BO_VA_BASE`]); GPU work reaches them there, and the copy engine
//! ([`Gpu::ce_copy`]) moves bytes between them, system RAM and peers' BARs through DMA
//! mappings. When VRAM runs out, BOs move to system RAM (and their DMA address
//! changes) and unified-memory pages are evicted; see [`bo`] for the order of a move.

pub mod bo;
mod ce;
mod export;

pub use bo::{Bar, BoDmaMap, BoDomain, BoEviction, BoHandle, BoInfo, MoveNotify};
pub use ce::CeAddr;
pub use export::P2pPolicy;

use std::collections::BTreeMap;
use std::time::Duration;

use crate::addr::{Bdf, Pfn, VirtAddr, PAGE_SIZE};
use crate::dma::{Dma, DmaDevice, DmaError};
use crate::drivers::mirror::{owner_fault_to_ram, MirrorSet, MirrorTable, PtEntry};
use crate::drivers::{Device, Probe, ProbeError};
use crate::errno::Errno;
use crate::mem::{PageMapOps, PhysMem, Region, RegionKind};
use crate::mm::{
    migrate_device_range, set_migrate_to_ram, Access, DeviceFault, DeviceRangeEviction,
    MigrateToRam, Mm, MmError, Select,
};
use crate::notifier::IntervalNotifier;
use crate::p2pmem::{P2pError, P2pRegistry};
use crate::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use crate::sync::{order, Arc, OrderedMutex, Weak};

/// VRAM per GPU unless configured.
pub const DEFAULT_VRAM: u64 = 16 << 30;
/// Pages a GPU fault migrates at once: the aligned 256 KiB window around the faulting
/// page, inside its VMA (drivers fault ranges: nouveau up to 2 MiB, amdgpu whole SVM
/// ranges).
pub const FAULT_AROUND: u64 = 64;

/// Where a range's pages go when the GPU first touches them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub enum Placement {
    /// Into VRAM (`migrate_vma`), as CUDA managed memory and HMM SVM do by default.
    #[default]
    MigrateOnTouch,
    /// Mapped where they are in system RAM and reached over the bus.
    Remote,
}

/// Where [`GpuContext::prefetch`] moves pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Location {
    /// The GPU's VRAM.
    Vram,
    /// System RAM.
    Ram,
}

/// A GPU operation refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GpuError {
    /// A GPU fault the driver could not resolve (no mapping, no permission): reported
    /// to the caller, as a GPU driver reports it to the process, not a crash.
    #[error("GPU {dev}: unresolvable fault at {va}: {source}")]
    Fault {
        /// The GPU.
        dev: Bdf,
        /// The faulting GPU virtual address.
        va: VirtAddr,
        /// Why the fault failed.
        #[source]
        source: MmError,
    },
    /// A malformed request.
    #[error("GPU {dev} {op} {va}+{len:#x}: {why}")]
    Invalid {
        /// The GPU.
        dev: Bdf,
        /// The operation.
        op: &'static str,
        /// Its address.
        va: VirtAddr,
        /// Its length.
        len: u64,
        /// Why.
        why: &'static str,
    },
    /// The GPU was removed (ENODEV).
    #[error("GPU {dev} was removed")]
    Removed {
        /// The GPU.
        dev: Bdf,
    },
    /// No buffer object has this handle (ENOENT).
    #[error("GPU {dev}: no {handle} (ENOENT)")]
    NoBo {
        /// The GPU.
        dev: Bdf,
        /// The handle.
        handle: BoHandle,
    },
    /// An access past a buffer object's end (EFAULT).
    #[error("GPU {dev}: {len:#x} bytes at offset {offset:#x} run past the end of {handle} ({bytes:#x} bytes) (EFAULT)")]
    BoRange {
        /// The GPU.
        dev: Bdf,
        /// The BO.
        handle: BoHandle,
        /// The offset asked for.
        offset: u64,
        /// The length asked for.
        len: u64,
        /// The BO's size.
        bytes: u64,
    },
    /// A GPU address that nothing maps: an unresolvable GPU fault, reported (EFAULT).
    #[error("GPU {dev}: unresolvable fault at {va}: {why} (EFAULT)")]
    Unmapped {
        /// The GPU.
        dev: Bdf,
        /// The faulting GPU address.
        va: VirtAddr,
        /// What is (not) there.
        why: String,
    },
    /// Something still holds what was to be freed or moved (EBUSY).
    #[error("GPU {dev}: {what} is busy (EBUSY): {holders}")]
    Busy {
        /// The GPU.
        dev: Bdf,
        /// What was to be freed or moved.
        what: String,
        /// Who holds it.
        holders: String,
    },
    /// VRAM cannot take the request even after evicting what may move (ENOMEM).
    #[error("GPU {dev}: out of VRAM (ENOMEM): {bytes:#x} bytes asked, {free:#x} free; held by {holders}")]
    NoVram {
        /// The GPU.
        dev: Bdf,
        /// Bytes asked for.
        bytes: u64,
        /// Bytes free.
        free: u64,
        /// What holds VRAM.
        holders: String,
    },
    /// The GPU's function has no memory BAR onto its VRAM (ENXIO).
    #[error("GPU {dev}: no BAR opens onto its VRAM (ENXIO)")]
    NoBar {
        /// The GPU.
        dev: Bdf,
    },
    /// A DMA mapping or transfer was refused.
    #[error("GPU {dev}: {source}")]
    Dma {
        /// The GPU.
        dev: Bdf,
        /// The DMA layer's refusal.
        #[source]
        source: DmaError,
    },
    /// The GPU's VRAM could not be registered.
    #[error("GPU {dev}: cannot register {bytes:#x} bytes of VRAM: {why}")]
    Vram {
        /// The GPU.
        dev: Bdf,
        /// The size asked for.
        bytes: u64,
        /// Why.
        why: String,
    },
}

impl GpuError {
    /// The error number a driver would return.
    pub fn errno(&self) -> Errno {
        match self {
            GpuError::Fault { source, .. } => source.errno(),
            GpuError::Invalid { .. } => Errno::EINVAL,
            GpuError::Removed { .. } => Errno::ENODEV,
            GpuError::Vram { .. } | GpuError::NoVram { .. } => Errno::ENOMEM,
            GpuError::NoBo { .. } => Errno::ENOENT,
            GpuError::BoRange { .. } | GpuError::Unmapped { .. } => Errno::EFAULT,
            GpuError::Busy { .. } => Errno::EBUSY,
            GpuError::NoBar { .. } => Errno::ENXIO,
            GpuError::Dma { source, .. } => source.errno(),
        }
    }
}

/// What the GPU did, since it came up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct GpuStats {
    /// GPU faults: accesses to a page the GPU page table lacked (or held read-only
    /// for a write).
    pub faults: u64,
    /// Pages migrated into VRAM on first touch.
    pub migrated_to_vram: u64,
    /// Pages mapped remotely in system RAM.
    pub remote_mapped: u64,
    /// Pages a CPU access brought back from VRAM.
    pub migrated_to_ram: u64,
    /// Pages eviction moved out of VRAM.
    pub evicted: u64,
    /// First touches that found VRAM full and mapped the page remotely instead.
    pub vram_full: u64,
    /// Buffer objects moved from VRAM to system RAM.
    pub bo_evicted: u64,
    /// Buffer objects moved back into VRAM.
    pub bo_restored: u64,
    /// Bytes those moves copied.
    pub bo_bytes_moved: u64,
    /// Bytes the copy engine copied for `ce_copy`.
    pub ce_bytes: u64,
}

impl GpuStats {
    /// What happened since `before` was taken.
    pub fn since(&self, before: &GpuStats) -> GpuStats {
        GpuStats {
            faults: self.faults - before.faults,
            migrated_to_vram: self.migrated_to_vram - before.migrated_to_vram,
            remote_mapped: self.remote_mapped - before.remote_mapped,
            migrated_to_ram: self.migrated_to_ram - before.migrated_to_ram,
            evicted: self.evicted - before.evicted,
            vram_full: self.vram_full - before.vram_full,
            bo_evicted: self.bo_evicted - before.bo_evicted,
            bo_restored: self.bo_restored - before.bo_restored,
            bo_bytes_moved: self.bo_bytes_moved - before.bo_bytes_moved,
            ce_bytes: self.ce_bytes - before.ce_bytes,
        }
    }
}

#[derive(Default)]
struct Counters {
    faults: AtomicU64,
    migrated_to_vram: AtomicU64,
    remote_mapped: AtomicU64,
    migrated_to_ram: AtomicU64,
    evicted: AtomicU64,
    vram_full: AtomicU64,
    bo_evicted: AtomicU64,
    bo_restored: AtomicU64,
    bo_bytes_moved: AtomicU64,
    ce_bytes: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// A GPU bound to a PCI function.
///
/// # Invariants
/// `vram` is a device-private region owned by `owner`, with this GPU's
/// `migrate_to_ram`; every entry of every context's table that names a VRAM frame was
/// put there by this GPU's own migration, while the page was locked. `used` counts the
/// frames allocated (or reserved for allocation) of `vram` and `bo_vram` together and
/// never exceeds `vram_pages`: every allocation reserves first, every free returns
/// through the regions' `page_free`.
pub struct Gpu {
    bdf: Bdf,
    phys: Arc<PhysMem>,
    dma: DmaDevice,
    owner: u64,
    vram: Arc<Region>,
    /// VRAM for buffer objects.
    bo_vram: Arc<Region>,
    bo_ops: Arc<bo::BoVramOps>,
    vram_pages: u64,
    used: Arc<AtomicU64>,
    /// Live BOs by handle. Lock order: a leaf.
    bos: OrderedMutex<BTreeMap<u32, Arc<bo::Bo>>>,
    next_handle: AtomicU32,
    /// Which BO a small BAR's window shows. Lock order: a leaf.
    window_target: OrderedMutex<Option<BoHandle>>,
    /// A use counter for least-recently-used eviction.
    clock: AtomicU64,
    /// Last references a move let go of with a BO locked (`Gpu::drop_orphans`).
    /// Lock order: a leaf.
    orphans: OrderedMutex<Vec<Box<dyn std::any::Any + Send>>>,
    mirrors: MirrorSet,
    stats: Counters,
    /// Set when hot removal begins: no new work, no new VRAM.
    removed: AtomicBool,
}

/// The device-private pool's page-map ops: a page freed leaves the VRAM budget.
struct Budget(Arc<AtomicU64>);

impl PageMapOps for Budget {
    fn page_free(&self, _pfn: Pfn) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("bdf", &self.bdf)
            .field("vram", &self.vram.frames())
            .finish()
    }
}

/// The GPU's `migrate_to_ram`: a CPU access to a page in VRAM brings it back.
struct VramOps(Weak<Gpu>);

impl MigrateToRam for VramOps {
    fn migrate_to_ram(&self, fault: &DeviceFault<'_>) -> Result<(), MmError> {
        let Some(gpu) = self.0.upgrade() else {
            return fault.copy_to_ram();
        };
        if owner_fault_to_ram(fault, gpu.owner, &gpu.mirrors, false)? {
            bump(&gpu.stats.migrated_to_ram, 1);
        }
        Ok(())
    }
}

/// The BAR of `bdf` that opens onto VRAM: its largest prefetchable memory BAR (BAR 1
/// on NVIDIA GPUs, BAR 0 on AMD ones), whole VRAM when at least `vram` bytes.
fn vram_bar(dma: &Dma, bdf: Bdf, vram: u64) -> Option<Bar> {
    let topo = dma.topology();
    let f = topo.function(topo.lookup(bdf)?);
    let b = f
        .bars
        .iter()
        .filter(|b| !b.io && b.prefetchable && b.size >= PAGE_SIZE)
        .max_by_key(|b| b.size)?;
    Some(Bar {
        index: b.index,
        bus: b.bus,
        bytes: b.size.min(vram),
        full: b.size >= vram,
    })
}

/// A GPU to bring up at an endpoint.
#[derive(Clone, Debug)]
pub struct GpuSpec {
    /// The endpoint.
    pub bdf: Bdf,
    /// Its VRAM in bytes ([`DEFAULT_VRAM`] if unsure; a topology file may state it as the
    /// function's [`memory`](crate::fabric::Function::memory)).
    pub vram_bytes: u64,
}

impl Probe for GpuSpec {
    fn bdf(&self) -> Bdf {
        self.bdf
    }
    fn probe(&self, p2p: &Arc<P2pRegistry>) -> Result<Arc<dyn Device>, ProbeError> {
        match Gpu::new(p2p.dma(), self.bdf, self.vram_bytes) {
            Ok(g) => Ok(g),
            Err(e) => Err(ProbeError {
                dev: self.bdf,
                kind: "gpu",
                errno: e.errno(),
                source: Box::new(e),
            }),
        }
    }
}

impl Device for Gpu {
    fn bdf(&self) -> Bdf {
        self.bdf
    }
    fn kind(&self) -> &'static str {
        "gpu"
    }
    /// Hot removal: new GPU work is refused (ENODEV) and no page moves into VRAM any
    /// more; every VRAM page goes back to system RAM (`migrate_device_range`, again as
    /// racing faults bring pages home), and the VRAM region is unregistered once free.
    /// EBUSY, with the GPU left removed but its region in place, when VRAM is still
    /// in use at `timeout`.
    fn remove(&self, p2p: &P2pRegistry, timeout: Option<Duration>) -> Result<(), P2pError> {
        self.removed.store(true, Ordering::SeqCst);
        // Buffer objects go first: importers are told and revoked, storage freed.
        self.remove_bos();
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        loop {
            // Device-private pages are never pinned: eviction refuses nothing.
            let _ = self.evict();
            if self.vram.free_frames() == self.vram.frames() {
                break;
            }
            let slice = Duration::from_millis(10);
            let wait = match deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        return Err(P2pError::Busy {
                            dev: self.bdf,
                            frames: self.vram.frames() - self.vram.free_frames(),
                            pinned: 0,
                            holders: "none (VRAM pages still referenced)".into(),
                        });
                    }
                    left.min(slice)
                }
                None => slice,
            };
            self.vram.wait_until_free(Some(wait));
        }
        let _ = self.phys.memunmap_pages(self.vram.id());
        let _ = self.phys.memunmap_pages(self.bo_vram.id());
        p2p.remove_device(self.bdf, timeout)
    }
}

impl Gpu {
    /// Brings up a GPU at `bdf` of `dma`'s fabric with `vram_bytes` of VRAM (rounded up
    /// to pages; EINVAL for none): attaches it for DMA and finds its BAR onto VRAM (the
    /// function's largest prefetchable memory BAR: all of VRAM when at least as large,
    /// otherwise a window).
    pub fn new(dma: &Arc<Dma>, bdf: Bdf, vram_bytes: u64) -> Result<Arc<Self>, GpuError> {
        let phys = dma.phys();
        let vram_err = |why: String| GpuError::Vram {
            dev: bdf,
            bytes: vram_bytes,
            why,
        };
        if vram_bytes == 0 {
            return Err(GpuError::Invalid {
                dev: bdf,
                op: "probe",
                va: VirtAddr(0),
                len: 0,
                why: "a GPU needs some VRAM",
            });
        }
        let handle = dma.attach(bdf).map_err(|e| GpuError::Dma {
            dev: bdf,
            source: e,
        })?;
        // GPUs address 4 GiB segments.
        handle.set_max_segment(4 << 30);
        let vram_pages = vram_bytes.div_ceil(PAGE_SIZE);
        let owner = phys.next_id() | 0x6770_0000_0000;
        let vram = phys
            .memremap_pages(RegionKind::DevicePrivate { owner }, vram_bytes)
            .map_err(|e| vram_err(e.to_string()))?;
        let bo_vram = match phys.memremap_pages(
            RegionKind::DeviceCoherent {
                owner: owner | 0x1_0000_0000_0000,
            },
            vram_bytes,
        ) {
            Ok(r) => r,
            Err(e) => {
                let _ = phys.memunmap_pages(vram.id());
                return Err(vram_err(e.to_string()));
            }
        };
        let bar = vram_bar(dma, bdf, vram_pages * PAGE_SIZE);
        let window = bar.filter(|b| b.full).map(|b| {
            let base = bo_vram.base();
            (base, vram_pages, b.bus.0.wrapping_sub(base.addr().0))
        });
        let used = Arc::new(AtomicU64::new(0));
        let bo_ops = Arc::new(bo::BoVramOps {
            used: used.clone(),
            dev: bdf,
            bar,
            window: Arc::new(OrderedMutex::new(&order::LEAF, window)),
        });
        bo_vram.set_page_map_ops(bo_ops.clone());
        vram.set_page_map_ops(Arc::new(Budget(used.clone())));
        let gpu = Arc::new(Gpu {
            bdf,
            phys: phys.clone(),
            dma: handle,
            owner,
            vram: vram.clone(),
            bo_vram,
            bo_ops,
            vram_pages,
            used,
            bos: OrderedMutex::new(&order::LEAF, BTreeMap::new()),
            next_handle: AtomicU32::new(1),
            window_target: OrderedMutex::new(&order::LEAF, None),
            clock: AtomicU64::new(1),
            orphans: OrderedMutex::new(&order::LEAF, Vec::new()),
            mirrors: MirrorSet::new(),
            stats: Counters::default(),
            removed: AtomicBool::new(false),
        });
        set_migrate_to_ram(&vram, Arc::new(VramOps(Arc::downgrade(&gpu))));
        Ok(gpu)
    }

    /// Its function.
    pub fn bdf(&self) -> Bdf {
        self.bdf
    }

    /// Its VRAM region for unified memory (device-private pages).
    pub fn vram(&self) -> &Arc<Region> {
        &self.vram
    }

    /// Its VRAM region for buffer objects.
    pub fn bo_vram(&self) -> &Arc<Region> {
        &self.bo_vram
    }

    /// Its DMA handle: the copy engine's accesses go through it.
    pub fn dma(&self) -> &DmaDevice {
        &self.dma
    }

    /// VRAM in bytes: total, used, free (`nvidia-smi`'s memory columns), buffer
    /// objects and unified-memory pages together.
    pub fn vram_bytes(&self) -> (u64, u64, u64) {
        let total = self.vram_pages * PAGE_SIZE;
        let used = self.used.load(Ordering::Acquire).min(self.vram_pages) * PAGE_SIZE;
        (total, used, total - used)
    }

    /// What it has done so far.
    pub fn stats(&self) -> GpuStats {
        let s = &self.stats;
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        GpuStats {
            faults: l(&s.faults),
            migrated_to_vram: l(&s.migrated_to_vram),
            remote_mapped: l(&s.remote_mapped),
            migrated_to_ram: l(&s.migrated_to_ram),
            evicted: l(&s.evicted),
            vram_full: l(&s.vram_full),
            bo_evicted: l(&s.bo_evicted),
            bo_restored: l(&s.bo_restored),
            bo_bytes_moved: l(&s.bo_bytes_moved),
            ce_bytes: l(&s.ce_bytes),
        }
    }

    /// A context mirroring `mm` into the GPU's address space, every range placed
    /// [`Placement::MigrateOnTouch`] until told otherwise. Dropping it ends the mirror.
    pub fn open(self: &Arc<Self>, mm: &Arc<Mm>) -> GpuContext {
        let table = Arc::new(MirrorTable::new(self.owner, mm.id()));
        self.mirrors.add(&table);
        let top = crate::mm::page_table::TASK_SIZE - PAGE_SIZE;
        let sub = mm.notifier().subscribe(VirtAddr(0), top, table.clone());
        GpuContext {
            gpu: self.clone(),
            table,
            mm: mm.clone(),
            sub,
            placement: OrderedMutex::new(&order::LEAF, BTreeMap::new()),
            bo_vas: OrderedMutex::new(&order::LEAF, BTreeMap::new()),
        }
    }

    /// Moves every page of VRAM back to system RAM, wherever it is mapped
    /// (`migrate_device_range`): what VRAM pressure and removal do. Pinned pages cannot
    /// be (device-private pages never are: a pin brings them back first).
    pub fn evict(&self) -> Result<DeviceRangeEviction, MmError> {
        // Eviction moves pages through the GPU's own migrate_to_ram, which counts
        // them as brought back by the CPU: count them as evicted instead (pages a CPU
        // access brings back while an eviction runs may land in either count).
        let back = self.stats.migrated_to_ram.load(Ordering::Relaxed);
        let ev =
            migrate_device_range(&self.phys, &self.vram, self.vram.base(), self.vram.frames())?;
        let by_eviction = (self.stats.migrated_to_ram.load(Ordering::Relaxed))
            .saturating_sub(back)
            .min(ev.moved);
        self.stats
            .migrated_to_ram
            .fetch_sub(by_eviction, Ordering::Relaxed);
        bump(&self.stats.evicted, ev.moved);
        Ok(ev)
    }

    /// One VRAM page for unified memory, or `None` when VRAM is full or the GPU is
    /// going away. (A unified-memory fault does not evict buffer objects: a page that
    /// finds no room is mapped remotely.)
    fn alloc_vram(&self) -> Option<Pfn> {
        if self.removed.load(Ordering::SeqCst) || !self.reserve(1) {
            return None;
        }
        match self.vram.alloc() {
            Ok(p) => Some(p),
            Err(_) => {
                self.used.fetch_sub(1, Ordering::AcqRel);
                None
            }
        }
    }

    /// Whether hot removal has begun.
    pub fn removed(&self) -> bool {
        self.removed.load(Ordering::SeqCst)
    }
}

/// A process mirrored into a GPU (a CUDA context with unified memory, an HSA queue
/// with SVM). Dropping it unsubscribes the mirror.
pub struct GpuContext {
    gpu: Arc<Gpu>,
    table: Arc<MirrorTable>,
    mm: Arc<Mm>,
    sub: IntervalNotifier,
    /// Placement of ranges by start: (end, placement). Lock order: a leaf.
    placement: OrderedMutex<BTreeMap<u64, (u64, Placement)>>,
    /// Buffer objects mapped at GPU addresses. Lock order: a leaf.
    bo_vas: OrderedMutex<bo::BoVas>,
}

impl Drop for GpuContext {
    fn drop(&mut self) {
        let vas = std::mem::take(&mut *self.bo_vas.lock());
        for bo in vas.into_values() {
            self.gpu.bo_unmap_va(&bo);
        }
    }
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuContext")
            .field("gpu", &self.gpu.bdf)
            .field("mm", &self.mm.id())
            .finish()
    }
}

impl GpuContext {
    /// The GPU.
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// The frame the GPU page table maps at `va`, if any.
    pub fn mapped(&self, va: VirtAddr) -> Option<Pfn> {
        self.table
            .pt
            .lock()
            .get(&(va.0 & !(PAGE_SIZE - 1)))
            .map(|e| e.pfn)
    }

    /// Pages the GPU page table maps.
    pub fn mapped_pages(&self) -> usize {
        self.table.pt.lock().len()
    }

    /// Places `[start, start + len)` (page aligned) for the GPU's first touches from
    /// now on (`cudaMemAdvise`, `hipMemAdvise`); pages already mapped stay where they
    /// are.
    pub fn set_placement(&self, start: VirtAddr, len: u64, p: Placement) -> Result<(), GpuError> {
        let end = self.check("set_placement", start, len, PAGE_SIZE)?;
        let mut map = self.placement.lock();
        // Cut the ranges that overlap, keep their parts outside, insert the new one.
        let overlapping: Vec<(u64, (u64, Placement))> = map
            .range(..end)
            .filter(|(_, (e, _))| *e > start.0)
            .map(|(s, v)| (*s, *v))
            .collect();
        for (s, (e, q)) in overlapping {
            map.remove(&s);
            if s < start.0 {
                map.insert(s, (start.0, q));
            }
            if e > end {
                map.insert(end, (e, q));
            }
        }
        map.insert(start.0, (end, p));
        Ok(())
    }

    fn placement_of(&self, va: u64) -> Placement {
        self.placement
            .lock()
            .range(..=va)
            .next_back()
            .filter(|(_, (e, _))| va < *e)
            .map_or(Placement::MigrateOnTouch, |(_, (_, p))| *p)
    }

    /// EINVAL for an empty or wrapping range, or one not aligned to `align`.
    fn check(&self, op: &'static str, va: VirtAddr, len: u64, align: u64) -> Result<u64, GpuError> {
        let bad = |why| GpuError::Invalid {
            dev: self.gpu.bdf,
            op,
            va,
            len,
            why,
        };
        if len == 0 {
            return Err(bad("the range is empty"));
        }
        if !va.0.is_multiple_of(align) || !len.is_multiple_of(align) {
            return Err(bad("the range is not aligned"));
        }
        va.0.checked_add(len).ok_or(bad("the range wraps"))
    }

    /// Moves the pages of `[start, start + len)` (page aligned) ahead of use, as
    /// `cudaMemPrefetchAsync` and `hipMemPrefetchAsync` do: into VRAM (every page the
    /// GPU may take there, whatever the range's placement; pages it maps remotely are
    /// let go first, which waits for a GPU access in progress), or back to system RAM
    /// (as a CPU access would bring each). Pages that cannot move stay. Returns the
    /// pages moved.
    pub fn prefetch(&self, start: VirtAddr, len: u64, to: Location) -> Result<u64, GpuError> {
        let end = self.check("prefetch", start, len, PAGE_SIZE)?;
        if self.gpu.removed() {
            return Err(GpuError::Removed { dev: self.gpu.bdf });
        }
        let fault = |va: u64, source| GpuError::Fault {
            dev: self.gpu.bdf,
            va: VirtAddr(va),
            source,
        };
        let own = |va: u64| {
            let pte = self.mm.pte(VirtAddr(va));
            pte.is_device_private() && pte.pfn().is_some_and(|p| self.gpu.vram.contains(p))
        };
        let mut moved = 0;
        match to {
            Location::Vram => {
                // The GPU lets go of its remote mappings of the range first.
                self.table.erase(start.0, end);
                let before = self.gpu.stats().migrated_to_vram;
                let window = FAULT_AROUND * PAGE_SIZE;
                let mut va = start.0;
                while va < end {
                    if !own(va) {
                        self.migrate_in(va, false, true)?;
                    }
                    va = (va - va % window + window).min(end);
                }
                moved = self.gpu.stats().migrated_to_vram - before;
            }
            Location::Ram => {
                for va in (start.0..end).step_by(PAGE_SIZE as usize) {
                    if own(va) {
                        self.mm
                            .handle_mm_fault(VirtAddr(va), Access::Read)
                            .map_err(|e| fault(va, e))?;
                        moved += 1;
                    }
                }
            }
        }
        Ok(moved)
    }

    /// GPU work: fills `[va, va + len)` with `byte`.
    pub fn fill(&self, va: VirtAddr, len: u64, byte: u8) -> Result<(), GpuError> {
        self.check("fill", va, len, 1)?;
        let chunk = [byte; PAGE_SIZE as usize];
        self.access(va, len, true, |r, pfn, off, _, n| {
            r.write(pfn, off, &chunk[..n]);
        })
    }

    /// GPU work: loads `buf.len()` bytes at `va` (a kernel reading its input).
    pub fn load(&self, va: VirtAddr, buf: &mut [u8]) -> Result<(), GpuError> {
        self.check("load", va, buf.len() as u64, 1)?;
        self.access(va, buf.len() as u64, false, |r, pfn, off, at, n| {
            r.read(pfn, off, &mut buf[at..at + n]);
        })
    }

    /// GPU work: stores `data` at `va` (a kernel writing its output).
    pub fn store(&self, va: VirtAddr, data: &[u8]) -> Result<(), GpuError> {
        self.check("store", va, data.len() as u64, 1)?;
        self.access(va, data.len() as u64, true, |r, pfn, off, at, n| {
            r.write(pfn, off, &data[at..at + n]);
        })
    }

    /// GPU work: the sum of the bytes of `[va, va + len)`, each as a u64 (a checksum
    /// a test can compute from what it wrote).
    pub fn checksum(&self, va: VirtAddr, len: u64) -> Result<u64, GpuError> {
        self.check("checksum", va, len, 1)?;
        let mut sum = 0u64;
        let mut buf = [0u8; PAGE_SIZE as usize];
        self.access(va, len, false, |r, pfn, off, _, n| {
            r.read(pfn, off, &mut buf[..n]);
            sum = buf[..n]
                .iter()
                .fold(sum, |s, &b| s.wrapping_add(u64::from(b)));
        })?;
        Ok(sum)
    }

    /// GPU work: copies `len` bytes from `src` to `dst` (ranges must not overlap),
    /// a page at a time through the GPU page table.
    pub fn copy(&self, dst: VirtAddr, src: VirtAddr, len: u64) -> Result<(), GpuError> {
        self.check("copy", dst, len, 1)?;
        self.check("copy", src, len, 1)?;
        if dst.0 < src.0 + len && src.0 < dst.0 + len {
            return Err(GpuError::Invalid {
                dev: self.gpu.bdf,
                op: "copy",
                va: dst,
                len,
                why: "the source and destination overlap",
            });
        }
        let mut buf = vec![0u8; PAGE_SIZE as usize];
        let mut done = 0;
        while done < len {
            let n = (PAGE_SIZE - (src.0 + done) % PAGE_SIZE)
                .min(PAGE_SIZE - (dst.0 + done) % PAGE_SIZE)
                .min(len - done);
            let part = &mut buf[..n as usize];
            self.access(VirtAddr(src.0 + done), n, false, |r, pfn, off, _, k| {
                r.read(pfn, off, &mut part[..k]);
            })?;
            self.access(VirtAddr(dst.0 + done), n, true, |r, pfn, off, _, k| {
                r.write(pfn, off, &part[..k]);
            })?;
            done += n;
        }
        Ok(())
    }

    /// GPU work: adds `k` (wrapping) to every native-endian u32 of `[va, va + len)`
    /// (4-byte aligned).
    pub fn add_u32(&self, va: VirtAddr, len: u64, k: u32) -> Result<(), GpuError> {
        self.check("add_u32", va, len, 4)?;
        let mut buf = [0u8; PAGE_SIZE as usize];
        self.access(va, len, true, |r, pfn, off, _, n| {
            r.read(pfn, off, &mut buf[..n]);
            for w in buf[..n].chunks_exact_mut(4) {
                let v = u32::from_ne_bytes([w[0], w[1], w[2], w[3]]).wrapping_add(k);
                w.copy_from_slice(&v.to_ne_bytes());
            }
            r.write(pfn, off, &buf[..n]);
        })
    }

    /// Runs `f(region, pfn, offset in page, offset from va, bytes)` for each page of
    /// `[va, va + len)` as the GPU's engines reach it: through the GPU page table, with
    /// the table locked so no invalidation can take the page meanwhile; a page missing
    /// (or read-only, for `write`) is a GPU fault, resolved and retried.
    fn access(
        &self,
        va: VirtAddr,
        len: u64,
        write: bool,
        mut f: impl FnMut(&Region, Pfn, u64, usize, usize),
    ) -> Result<(), GpuError> {
        if self.gpu.removed() {
            return Err(GpuError::Removed { dev: self.gpu.bdf });
        }
        if va.0 >= bo::BO_VA_BASE {
            return self.bo_access(va, len, write, f);
        }
        let mut done = 0u64;
        let mut region: Option<Arc<Region>> = None;
        while done < len {
            let at = va.0 + done;
            let page = at & !(PAGE_SIZE - 1);
            let off = at - page;
            let n = (PAGE_SIZE - off).min(len - done);
            let hit = {
                let pt = self.table.pt.lock();
                match pt.get(&page).copied() {
                    Some(e) if e.write || !write => {
                        if !region.as_ref().is_some_and(|r| r.contains(e.pfn)) {
                            region = self.gpu.phys.region(e.pfn);
                        }
                        let r = region
                            .as_deref()
                            .unwrap_or_else(|| unreachable!("a mapped frame has a region"));
                        f(r, e.pfn, off, done as usize, n as usize);
                        true
                    }
                    _ => false,
                }
            };
            if hit {
                done += n;
            } else {
                self.gpu_fault(page, write)?;
            }
        }
        Ok(())
    }

    /// Maps buffer object `h` into this context's GPU address space (`GEM_VA` map);
    /// returns its GPU address, above every process address. GPU work reaches the BO
    /// there wherever it lives; the BO cannot be freed while mapped.
    pub fn map_bo(&self, h: BoHandle) -> Result<VirtAddr, GpuError> {
        if self.gpu.removed() {
            return Err(GpuError::Removed { dev: self.gpu.bdf });
        }
        let bo = self.gpu.bo_map_va(h)?;
        let mut vas = self.bo_vas.lock();
        // After the last mapping, 2 MiB aligned, as drivers place BOs.
        let align = 2 << 20;
        let start = vas.iter().next_back().map_or(bo::BO_VA_BASE, |(s, b)| {
            (s + b.bytes()).next_multiple_of(align)
        });
        if start + bo.bytes() > bo::BO_VA_END {
            drop(vas);
            self.gpu.bo_unmap_va(&bo);
            return Err(GpuError::Invalid {
                dev: self.gpu.bdf,
                op: "map_bo",
                va: VirtAddr(start),
                len: bo.bytes(),
                why: "the GPU address space is full",
            });
        }
        vas.insert(start, bo);
        Ok(VirtAddr(start))
    }

    /// Unmaps the buffer object mapped at GPU address `va`; EINVAL when none starts
    /// there.
    pub fn unmap_bo(&self, va: VirtAddr) -> Result<(), GpuError> {
        let bo = self.bo_vas.lock().remove(&va.0).ok_or(GpuError::Invalid {
            dev: self.gpu.bdf,
            op: "unmap_bo",
            va,
            len: 0,
            why: "no buffer object is mapped at this address",
        })?;
        self.gpu.bo_unmap_va(&bo);
        Ok(())
    }

    /// GPU work on a buffer object's GPU addresses: the BO is moved into VRAM first
    /// when it may (`ttm_bo_validate` on command submission; it is worked on in system
    /// RAM through the GART when VRAM cannot take it), counted busy, and reached page
    /// by page. An address no BO maps, or a range running past its BO, is an
    /// unresolvable GPU fault.
    fn bo_access(
        &self,
        va: VirtAddr,
        len: u64,
        write: bool,
        mut f: impl FnMut(&Region, Pfn, u64, usize, usize),
    ) -> Result<(), GpuError> {
        let unmapped = |why: String| GpuError::Unmapped {
            dev: self.gpu.bdf,
            va,
            why,
        };
        let (start, bo) = self
            .bo_vas
            .lock()
            .range(..=va.0)
            .next_back()
            .map(|(s, b)| (*s, b.clone()))
            .ok_or_else(|| unmapped("no buffer object is mapped there".into()))?;
        let off = va.0 - start;
        if off >= bo.bytes() {
            return Err(unmapped("no buffer object is mapped there".into()));
        }
        if off + len > bo.bytes() {
            return Err(unmapped(format!(
                "the access runs past the end of {} at {:#x}",
                bo.handle(),
                start + bo.bytes()
            )));
        }
        let u = self.gpu.bo_use_of(bo, off, len, true)?;
        self.gpu
            .place_access(&u, off, len, write, |r, p, o, at, n| {
                // Split into pages, as the GPU work's callbacks expect.
                let (mut o, mut at, mut left) = (o, at, n);
                while left > 0 {
                    let k = ((PAGE_SIZE - o % PAGE_SIZE) as usize).min(left);
                    f(r, Pfn(p.0 + o / PAGE_SIZE), o % PAGE_SIZE, at, k);
                    o += k as u64;
                    at += k;
                    left -= k;
                }
            })
    }

    /// Resolves a GPU fault on `page` by its placement: into VRAM if it should and can
    /// go there, otherwise mapped where it is.
    fn gpu_fault(&self, page: u64, write: bool) -> Result<(), GpuError> {
        let gpu = &self.gpu;
        bump(&gpu.stats.faults, 1);
        let fault = |source| GpuError::Fault {
            dev: gpu.bdf,
            va: VirtAddr(page),
            source,
        };
        // svm_fault_allowed(): a write to a mapping without write permission is EPERM
        // before anything moves (no mapping, or PROT_NONE, is reported by the fault).
        let vma = self.mm.vma(VirtAddr(page));
        if write
            && vma
                .as_ref()
                .is_some_and(|v| v.prot.readable() && !v.prot.writable())
        {
            return Err(fault(MmError::NotPermitted {
                op: "gpu write",
                addr: VirtAddr(page),
                why: "the mapping is read-only",
            }));
        }
        // Other threads move the page meanwhile (a CPU access takes it back, another
        // GPU access migrates it in read-only): look again until the fault sticks.
        let mut attempts = 0;
        loop {
            attempts += 1;
            let pte = self.mm.pte(VirtAddr(page));
            let own_vram =
                pte.is_device_private() && pte.pfn().is_some_and(|p| gpu.vram.contains(p));
            if own_vram && write && !pte.writable() {
                // A read-only VRAM page (fork left it so, or it moved in read-only):
                // the write needs a page of this process's own, which the CPU's write
                // fault makes (bringing it back first).
                self.mm
                    .handle_mm_fault(VirtAddr(page), Access::Write)
                    .map_err(fault)?;
            } else if !own_vram
                && self.placement_of(page) == Placement::MigrateOnTouch
                && self.migrate_in(page, write, false)?
            {
                return Ok(());
            }
            match self
                .table
                .fault(&self.mm, &self.sub, page, page + PAGE_SIZE, write)
            {
                Ok(()) => break,
                // hmm_range_fault reports the GPU's own read-only VRAM page without
                // faulting it for the write: make it writable, then map it.
                Err(MmError::Fault { .. })
                    if write
                        && attempts < 64
                        && self.mm.pte(VirtAddr(page)).is_device_private() =>
                {
                    continue
                }
                Err(e) => return Err(fault(e)),
            }
        }
        if !self
            .mapped(VirtAddr(page))
            .is_some_and(|p| gpu.vram.contains(p))
        {
            bump(&gpu.stats.remote_mapped, 1);
        }
        Ok(())
    }

    /// Migrates the pages around `page` (its [`FAULT_AROUND`] window, inside its VMA)
    /// that are placed to migrate on touch (all of them for `any_placement`: a
    /// prefetch) into VRAM and maps them, as drivers fault a range at a time. Returns whether `page` itself moved; when it did not (no VMA
    /// or one it cannot migrate in, a page that is pinned, shared or not anonymous, a
    /// read-only page the GPU wants to write, or VRAM full) the caller maps it
    /// remotely.
    fn migrate_in(&self, page: u64, write: bool, any_placement: bool) -> Result<bool, GpuError> {
        let gpu = &self.gpu;
        let Some(vma) = self.mm.vma(VirtAddr(page)).filter(|v| v.prot.readable()) else {
            return Ok(false); // the remote path reports the fault
        };
        let span = FAULT_AROUND * PAGE_SIZE;
        let start = (page - page % span).max(vma.start.0);
        let end = (page - page % span + span).min(vma.end.0);
        // Placement is read before the migration holds the address-space lock.
        let wanted: Vec<bool> = (start..end)
            .step_by(PAGE_SIZE as usize)
            .map(|va| any_placement || self.placement_of(va) == Placement::MigrateOnTouch)
            .collect();
        let mut m = match self.mm.migrate_vma_setup(
            VirtAddr(start),
            VirtAddr(end),
            Select::SYSTEM,
            Some(gpu.owner),
        ) {
            Ok(m) => m,
            Err(MmError::Busy { .. }) => return Ok(false),
            Err(e) => {
                return Err(GpuError::Fault {
                    dev: gpu.bdf,
                    va: VirtAddr(page),
                    source: e,
                })
            }
        };
        let me = ((page - start) / PAGE_SIZE) as usize;
        // Pages the GPU maps already stay where they are: its own migration does not
        // drop its entries, and a GPU store through one after the copy would be lost
        // (the soak found that). No entry appears for a collected page meanwhile: a
        // fault on it waits for the migration, and a fault result from before it is
        // stale by the notifier's sequence.
        let mapped: Vec<bool> = {
            let pt = self.table.pt.lock();
            (0..wanted.len())
                .map(|i| pt.contains_key(&(start + i as u64 * PAGE_SIZE)))
                .collect()
        };
        let mut chosen = Vec::new();
        let mut full = false;
        for (i, src) in m.src().iter().enumerate() {
            // A read-only page (copy-on-write) would need a CPU write fault right
            // after: a write maps it remotely, breaking COW in RAM, instead.
            if !src.migrate || !wanted[i] || mapped[i] || (write && src.pfn.is_some() && !src.write)
            {
                continue;
            }
            let Some(dst) = gpu.alloc_vram() else {
                full = true;
                break;
            };
            if let Some(s) = src.pfn {
                if let Some(r) = gpu.phys.region(s) {
                    r.copy_frame(s, &gpu.vram, dst);
                }
            }
            // Writable as the page was, or as the mapping is for an empty entry.
            let w = if src.pfn.is_some() {
                src.write
            } else {
                vma.prot.writable()
            };
            chosen.push((i, dst, w));
        }
        for &(i, dst, _) in &chosen {
            m.set_dst(i, &gpu.vram, dst);
        }
        m.pages();
        let moved = m.src();
        let mut mine = false;
        {
            // Mapped while the pages are still locked by the migration: a CPU access
            // bringing one back waits, then drops its entry.
            let mut pt = self.table.pt.lock();
            for &(i, dst, write) in chosen.iter().filter(|(i, _, _)| moved[*i].migrate) {
                let entry = PtEntry {
                    pfn: dst,
                    write,
                    atomic: false,
                };
                pt.insert(start + i as u64 * PAGE_SIZE, entry);
                bump(&gpu.stats.migrated_to_vram, 1);
                mine |= i == me;
            }
        }
        m.finalize();
        if full && !mine {
            bump(&gpu.stats.vram_full, 1);
        }
        Ok(mine)
    }
}
