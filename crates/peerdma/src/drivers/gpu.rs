//! A GPU whose memory moves — first part: VRAM as device-private memory and unified
//! memory through HMM (what amdgpu's SVM, nouveau's SVMM and NVIDIA's UVM do).
//!
//! A [`Gpu`] owns its VRAM (a device-private region, sparse, 16 GiB by default) and
//! mirrors processes into its address space: [`Gpu::open`] gives a [`GpuContext`]
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
//! Not here yet (docs/gpu.md): buffer objects, the BAR and peer access, the copy engine
//! over DMA mappings, BO eviction and the dma-buf hook.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::addr::{Bdf, Pfn, VirtAddr, PAGE_SIZE};
use crate::drivers::mirror::{owner_fault_to_ram, MirrorSet, MirrorTable, PtEntry};
use crate::drivers::{Device, Probe, ProbeError};
use crate::errno::Errno;
use crate::mem::{PhysMem, Region, RegionKind};
use crate::mm::{
    migrate_device_range, set_migrate_to_ram, Access, DeviceFault, DeviceRangeEviction,
    MigrateToRam, Mm, MmError, Select,
};
use crate::notifier::IntervalNotifier;
use crate::p2pmem::{P2pError, P2pRegistry};
use crate::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
            GpuError::Vram { .. } => Errno::ENOMEM,
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
}

#[derive(Default)]
struct Counters {
    faults: AtomicU64,
    migrated_to_vram: AtomicU64,
    remote_mapped: AtomicU64,
    migrated_to_ram: AtomicU64,
    evicted: AtomicU64,
    vram_full: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// A GPU bound to a PCI function.
///
/// # Invariants
/// `vram` is a device-private region owned by `owner`, with this GPU's
/// `migrate_to_ram`; every entry of every context's table that names a VRAM frame was
/// put there by this GPU's own migration, while the page was locked.
pub struct Gpu {
    bdf: Bdf,
    phys: Arc<PhysMem>,
    owner: u64,
    vram: Arc<Region>,
    mirrors: MirrorSet,
    stats: Counters,
    /// Set when hot removal begins: no new work, no new VRAM.
    removed: AtomicBool,
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

/// A GPU to bring up at an endpoint.
#[derive(Clone, Debug)]
pub struct GpuSpec {
    /// The endpoint.
    pub bdf: Bdf,
    /// Its VRAM in bytes ([`DEFAULT_VRAM`] if unsure).
    pub vram_bytes: u64,
}

impl Probe for GpuSpec {
    fn bdf(&self) -> Bdf {
        self.bdf
    }
    fn probe(&self, p2p: &Arc<P2pRegistry>) -> Result<Arc<dyn Device>, ProbeError> {
        match Gpu::new(p2p.dma().phys(), self.bdf, self.vram_bytes) {
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
        p2p.remove_device(self.bdf, timeout)
    }
}

impl Gpu {
    /// Brings up a GPU at `bdf` with `vram_bytes` of VRAM (rounded up to pages; EINVAL
    /// for none).
    pub fn new(phys: &Arc<PhysMem>, bdf: Bdf, vram_bytes: u64) -> Result<Arc<Self>, GpuError> {
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
        let owner = phys.next_id() | 0x6770_0000_0000;
        let vram = phys
            .memremap_pages(RegionKind::DevicePrivate { owner }, vram_bytes)
            .map_err(|e| vram_err(e.to_string()))?;
        let gpu = Arc::new(Gpu {
            bdf,
            phys: phys.clone(),
            owner,
            vram: vram.clone(),
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

    /// Its VRAM region.
    pub fn vram(&self) -> &Arc<Region> {
        &self.vram
    }

    /// VRAM in bytes: total, used, free (`nvidia-smi`'s memory columns).
    pub fn vram_bytes(&self) -> (u64, u64, u64) {
        let total = self.vram.frames() * PAGE_SIZE;
        let free = self.vram.free_frames() * PAGE_SIZE;
        (total, total - free, free)
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

    /// One VRAM page, or `None` when VRAM is full or the GPU is going away.
    fn alloc_vram(&self) -> Option<Pfn> {
        if self.removed.load(Ordering::SeqCst) {
            return None;
        }
        self.vram.alloc().ok()
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
