//! Buffer objects: VRAM the driver hands out whole (GEM/TTM objects in amdgpu, xe and
//! nouveau), the BAR through which peers reach them, and their eviction to system RAM
//! and back, which changes their DMA address.
//!
//! A BO lives in one place at a time: a physically contiguous run of the GPU's BO
//! VRAM, or system RAM frames that the GPU reaches through a DMA mapping of its own
//! (the GART/GTT). Moving it — eviction under VRAM pressure, [`Gpu::bo_evict`], or
//! back in by [`Gpu::bo_validate`] and GPU work that touches it — first tells every
//! importer ([`MoveNotify`], the hook the dma-buf layer fills) and revokes the
//! importer's DMA mapping, which waits for the DMA in flight through it; then waits
//! for GPU work using the BO (its fence); then copies with the copy engine through
//! the GART mapping, so the sanitizer sees every byte; only then frees the old
//! storage. A pinned BO never moves: eviction skips it and says who pinned it.
//!
//! Lock discipline: a BO's state lock is taken with no other BO's held; GPU work and
//! the copy engine take it only to look up the storage and count themselves busy
//! (the BO's fence), in BO handle order when they use two, and move bytes after
//! releasing it; a move holds it and waits for the busy count to drain, so no
//! access sees storage that is being freed.

use std::collections::BTreeMap;
use std::fmt;

use crate::addr::{Bdf, BusAddr, Pfn, VirtAddr, PAGE_SIZE};
use crate::dma::{Direction, DmaDevice, DmaMapping, SgTable};
use crate::dmabuf::{DmaBuf, Fence, Resv, ResvGuard, Usage};
use crate::drivers::gpu::{bump, Gpu, GpuError};
use crate::mem::{PageMapOps, PeerReach, Region};
use crate::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use crate::sync::{order, Arc, InFlight, OrderedMutex, Weak};

/// GPU virtual addresses of BOs start here: above every process address, so a GPU
/// address names either shared virtual memory or a BO, never both.
pub const BO_VA_BASE: u64 = crate::mm::page_table::TASK_SIZE;
/// The end of the GPU's BO address range (48-bit GPU virtual addresses).
pub const BO_VA_END: u64 = 1 << 48;

/// A buffer object's handle on its GPU (a GEM handle).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct BoHandle(pub u32);

impl fmt::Display for BoHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BO {}", self.0)
    }
}

/// Where a BO lives (amdgpu's VRAM and GTT domains).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum BoDomain {
    /// The GPU's VRAM.
    Vram,
    /// System RAM, reached by the GPU through its own DMA mapping.
    Ram,
}

/// What a BO is and who holds it ([`Gpu::bo_info`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct BoInfo {
    /// Its handle.
    pub handle: BoHandle,
    /// Its size in bytes.
    pub bytes: u64,
    /// Where it lives now.
    pub domain: BoDomain,
    /// Who pinned it, one entry per pin.
    pub pinned_by: Vec<String>,
    /// GPU virtual address mappings of it, over all contexts.
    pub gpu_mappings: usize,
    /// Live peer DMA mappings of it (revoked ones included until their importer
    /// drops them).
    pub peer_mappings: usize,
    /// Whether peers can reach it through the BAR now.
    pub bar_visible: bool,
    /// Times it moved between VRAM and system RAM.
    pub moves: u64,
    /// Its GEM handle was closed: it lives on only for its holders.
    pub handle_closed: bool,
}

/// An importer's hook, called when a BO it maps is about to move (the dma-buf
/// importer's `move_notify`): with the BO's lock held, before its storage changes. Its
/// DMA mapping is revoked right after (waiting for the DMA in flight through it); the
/// importer maps the BO again to reach it at its new place. It must not call back
/// into the same BO.
pub trait MoveNotify: Send + Sync {
    /// `bo` of the GPU `gpu` is about to move.
    fn move_notify(&self, gpu: Bdf, bo: BoHandle);
}

/// The GPU's BAR onto VRAM, read from its function's largest prefetchable memory BAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Bar {
    /// The BAR's index.
    pub index: u8,
    /// Its bus address.
    pub bus: BusAddr,
    /// Its size in bytes.
    pub bytes: u64,
    /// Whether it opens onto all of VRAM (a resized BAR); otherwise it is a window
    /// that the driver points at one BO at a time ([`Gpu::bar_point`]).
    pub full: bool,
}

/// What eviction did ([`Gpu::evict_bos`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct BoEviction {
    /// BOs moved to system RAM.
    pub moved: Vec<BoHandle>,
    /// Bytes they hold.
    pub bytes: u64,
    /// BOs left in VRAM, with why (pinned, and by whom).
    pub skipped: Vec<(BoHandle, String)>,
}

/// Where a BO's bytes are.
enum Storage {
    /// `pages` contiguous frames of the BO VRAM from this one.
    Vram(Pfn),
    /// System RAM frames, and the GPU's own mapping of them (its GART entry).
    Ram {
        frames: Vec<Pfn>,
        gart: Arc<DmaMapping>,
    },
    /// Freed.
    Gone,
}

struct BoState {
    storage: Storage,
    pins: Vec<String>,
    gpu_mappings: usize,
    importers: Vec<Weak<BoDmaMap>>,
    /// The dma-bufs exporting it, told before every move.
    exports: Vec<Weak<DmaBuf>>,
    last_use: u64,
    moves: u64,
}

/// One buffer object.
///
/// # Invariants
/// While `storage` is `Vram(first)`, frames `first .. first + pages` of the BO VRAM
/// hold one reference each, owned by this BO; while `Ram`, `frames` do and `gart`
/// maps exactly them for the GPU. Storage changes only under `state` with `busy` idle
/// and every importer's mapping revoked.
pub(crate) struct Bo {
    handle: BoHandle,
    pages: u64,
    /// Its reservation object (the GEM object's `resv`, shared with its dma-bufs):
    /// taken before `state` by whoever moves, maps for a peer or pins it.
    pub(crate) resv: Arc<Resv>,
    state: OrderedMutex<BoState>,
    /// GPU work and copies using the storage now (the BO's fence).
    busy: InFlight,
    /// Its GEM handle was closed (`bo_free`): the owner reaches it no more, and it is
    /// freed when its last holder — a dma-buf, a peer's mapping, a pin, a GPU address
    /// mapping — lets go, as the GEM object's last reference does.
    closed: AtomicBool,
}

/// Who looks a BO up by handle: its owner (through the GEM handle, which `bo_free`
/// closes), or a holder of a reference the BO outlives its handle for (the dma-buf
/// exporter and the CPU mappings of its buffer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum By {
    Owner,
    Holder,
}

/// A peer's DMA mapping of a BO (what a dma-buf importer's `map_attachment` gives):
/// addresses where the BO is when it was made. When the BO moves, the importer's
/// [`MoveNotify`] runs and the mapping is revoked: accesses through it then fail with
/// EAGAIN, and the importer maps again. Dropping it unmaps.
pub struct BoDmaMap {
    bo: Arc<Bo>,
    gpu: Bdf,
    mapping: DmaMapping,
    notify: Option<Arc<dyn MoveNotify>>,
    /// Declared after `mapping`, so it drops after the mapping is gone: a closed BO
    /// this was the last holder of is freed only once nothing maps its pages.
    _last: ReapOnDrop,
}

/// Frees a closed BO, if nothing else holds it, when dropped.
struct ReapOnDrop {
    bo: Arc<Bo>,
    owner: Weak<Gpu>,
}

impl Drop for ReapOnDrop {
    fn drop(&mut self) {
        if self.bo.closed.load(Ordering::Acquire) {
            if let Some(gpu) = self.owner.upgrade() {
                gpu.reap(&self.bo);
            }
        }
    }
}

impl fmt::Debug for BoDmaMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BoDmaMap")
            .field("gpu", &self.gpu)
            .field("bo", &self.bo.handle)
            .field("dev", &self.mapping.dev())
            .finish()
    }
}

impl BoDmaMap {
    /// The BO.
    pub fn handle(&self) -> BoHandle {
        self.bo.handle
    }
    /// The DMA mapping, as the importing device addresses it.
    pub fn mapping(&self) -> &DmaMapping {
        &self.mapping
    }
    /// Whether the BO moved since (the mapping is revoked).
    pub fn is_revoked(&self) -> bool {
        self.mapping.is_revoked()
    }
}

/// The BO VRAM's page-map ops: frames going back to the allocator leave the VRAM
/// budget; peers find the VRAM behind the BAR (all of it, or the window's BO).
pub(crate) struct BoVramOps {
    pub(crate) used: Arc<AtomicU64>,
    pub(crate) dev: Bdf,
    pub(crate) bar: Option<Bar>,
    /// The frames the BAR opens onto: all of the BO VRAM for a full BAR, the window's
    /// target otherwise, as (first, pages, bus offset). Lock order: a leaf.
    pub(crate) window: Arc<OrderedMutex<Option<(Pfn, u64, u64)>>>,
}

impl PageMapOps for BoVramOps {
    fn page_free(&self, _pfn: Pfn) {
        self.used.fetch_sub(1, Ordering::AcqRel);
    }
    fn peer_reach(&self, pfn: Pfn) -> Option<PeerReach> {
        let w = *self.window.lock();
        match w {
            Some((first, pages, bus_offset)) if pfn.0 >= first.0 && pfn.0 < first.0 + pages => {
                Some(PeerReach {
                    provider: self.dev,
                    bus_offset,
                })
            }
            _ => None,
        }
    }
    fn bus_hidden(&self, pfn: Pfn) -> Option<&'static str> {
        if self.bar.is_none() {
            return Some("the GPU has no memory BAR onto its VRAM");
        }
        if self.peer_reach(pfn).is_none() {
            return Some("VRAM outside the GPU's BAR window");
        }
        None
    }
}

/// A snapshot of a BO's storage for one access, taken with the BO counted busy.
pub(crate) enum Place {
    /// VRAM from this frame.
    Vram(Pfn),
    /// System RAM through the GPU's mapping.
    Gart(Arc<DmaMapping>),
}

/// A BO counted busy for an access; dropping it ends the access.
pub(crate) struct BoUse {
    bo: Arc<Bo>,
    pub(crate) place: Place,
}

impl Drop for BoUse {
    fn drop(&mut self) {
        self.bo.busy.exit();
    }
}

impl Gpu {
    /// The BAR peers reach VRAM through, if the function has one.
    pub fn bar(&self) -> Option<Bar> {
        self.bo_ops.bar
    }

    fn bo(&self, h: BoHandle) -> Result<Arc<Bo>, GpuError> {
        self.find(h, By::Owner)
    }

    /// The BO behind `h`; for its owner, only while the handle is open (ENOENT after
    /// `bo_free`).
    pub(crate) fn find(&self, h: BoHandle, by: By) -> Result<Arc<Bo>, GpuError> {
        self.bos
            .lock()
            .get(&h.0)
            .filter(|b| by == By::Holder || !b.closed.load(Ordering::Acquire))
            .cloned()
            .ok_or(GpuError::NoBo {
                dev: self.bdf,
                handle: h,
            })
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }

    /// Reserves `pages` of the VRAM budget; false when they do not fit.
    pub(crate) fn reserve(&self, pages: u64) -> bool {
        let total = self.vram_pages;
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                (u + pages <= total).then_some(u + pages)
            })
            .is_ok()
    }

    fn unreserve(&self, pages: u64) {
        self.used.fetch_sub(pages, Ordering::AcqRel);
    }

    /// `pages` contiguous frames of BO VRAM, making room when VRAM is full: unpinned
    /// BOs other than `keep` go to system RAM, least recently used first, then the
    /// unified-memory pages (`migrate_device_range`). ENOMEM naming what holds VRAM
    /// when nothing more can go.
    fn vram_for_bo(&self, pages: u64, keep: Option<BoHandle>) -> Result<Pfn, GpuError> {
        let mut tried_unified = false;
        loop {
            if self.removed() {
                return Err(GpuError::Removed { dev: self.bdf });
            }
            if self.reserve(pages) {
                match self.bo_vram.alloc_contig(pages, 1) {
                    Ok(first) => {
                        let frames: Vec<Pfn> = (0..pages).map(|i| Pfn(first.0 + i)).collect();
                        self.bo_vram.mark_owned(&frames);
                        return Ok(first);
                    }
                    Err(_) => self.unreserve(pages),
                }
            }
            if self.evict_one_bo(keep) {
                continue;
            }
            let unified = self.vram.frames() - self.vram.free_frames();
            if unified > 0 && !tried_unified {
                tried_unified = true;
                let _ = self.evict();
                continue;
            }
            return Err(self.no_vram(pages * PAGE_SIZE));
        }
    }

    /// ENOMEM naming what holds VRAM.
    fn no_vram(&self, bytes: u64) -> GpuError {
        let mut holders = Vec::new();
        let all: Vec<Arc<Bo>> = self.bos.lock().values().cloned().collect();
        for bo in all {
            let s = bo.state.lock();
            if matches!(s.storage, Storage::Vram(_)) {
                let size = bo.pages * PAGE_SIZE;
                if s.pins.is_empty() {
                    holders.push(format!("{} ({size:#x} bytes, in use)", bo.handle));
                } else {
                    holders.push(format!(
                        "{} ({size:#x} bytes, pinned by {})",
                        bo.handle,
                        s.pins.join(", ")
                    ));
                }
            }
        }
        let unified = self.vram.frames() - self.vram.free_frames();
        if unified > 0 {
            holders.push(format!("{unified} unified-memory pages"));
        }
        let (total, used, _) = self.vram_bytes();
        GpuError::NoVram {
            dev: self.bdf,
            bytes,
            free: total - used,
            holders: if holders.is_empty() {
                "nothing (fragmented)".into()
            } else {
                holders.join(", ")
            },
        }
    }

    /// Evicts the least recently used BO in VRAM that may move (not pinned, not
    /// `keep`); whether one moved.
    fn evict_one_bo(&self, keep: Option<BoHandle>) -> bool {
        let mut cands: Vec<(u64, Arc<Bo>)> = Vec::new();
        for bo in self.bos.lock().values() {
            if Some(bo.handle) != keep {
                cands.push((0, bo.clone()));
            }
        }
        for c in &mut cands {
            let s = c.1.state.lock();
            c.0 = if matches!(s.storage, Storage::Vram(_)) && s.pins.is_empty() {
                s.last_use
            } else {
                u64::MAX
            };
        }
        cands.sort_by_key(|c| c.0);
        for (lru, bo) in cands {
            if lru == u64::MAX {
                break;
            }
            let mut resv = bo.resv.lock();
            let mut s = bo.state.lock();
            if self.move_to_ram(&bo, &mut s, &mut resv).unwrap_or(false) {
                return true;
            }
        }
        false
    }

    /// Allocates a BO of `bytes` (rounded up to pages) in VRAM, evicting others when
    /// VRAM is full (`amdgpu_gem_create`, `ttm_bo_validate`). ENOMEM naming the holders
    /// when nothing can make room; ENODEV once the GPU is being removed.
    pub fn bo_alloc(&self, bytes: u64) -> Result<BoHandle, GpuError> {
        let r = self.bo_alloc_inner(bytes);
        self.drop_orphans();
        r
    }

    fn bo_alloc_inner(&self, bytes: u64) -> Result<BoHandle, GpuError> {
        if bytes == 0 {
            return Err(GpuError::Invalid {
                dev: self.bdf,
                op: "bo_alloc",
                va: VirtAddr(0),
                len: 0,
                why: "a buffer object needs a size",
            });
        }
        let pages = bytes.div_ceil(PAGE_SIZE);
        if pages > self.vram_pages {
            return Err(self.no_vram(bytes));
        }
        let first = self.vram_for_bo(pages, None)?;
        let handle = BoHandle(self.next_handle.fetch_add(1, Ordering::Relaxed));
        let bo = Arc::new(Bo {
            handle,
            pages,
            state: OrderedMutex::new(
                &order::GPU_BO,
                BoState {
                    storage: Storage::Vram(first),
                    pins: Vec::new(),
                    gpu_mappings: 0,
                    importers: Vec::new(),
                    exports: Vec::new(),
                    last_use: self.tick(),
                    moves: 0,
                },
            ),
            resv: Resv::new(),
            busy: InFlight::new(),
            closed: AtomicBool::new(false),
        });
        self.bos.lock().insert(handle.0, bo.clone());
        if self.removed() {
            // Removal began meanwhile and may have emptied the table already.
            if self.bos.lock().remove(&handle.0).is_some() {
                self.release_storage(&bo, &mut bo.state.lock());
            }
            return Err(GpuError::Removed { dev: self.bdf });
        }
        Ok(handle)
    }

    /// Closes the BO's GEM handle (`GEM_CLOSE`); ENOENT for an unknown or closed
    /// handle. The owner reaches the BO no more. Its memory goes at once when nothing
    /// else holds it, or else when the last holder lets go: an exported dma-buf, a
    /// peer's DMA mapping, a pin, a GPU address mapping (drm_gem_object_put of the
    /// last reference); [`Gpu::bos`] lists it, closed, until then.
    pub fn bo_free(&self, h: BoHandle) -> Result<(), GpuError> {
        let bo = self.bo(h)?;
        if bo.closed.swap(true, Ordering::AcqRel) {
            // A racing close won.
            return Err(GpuError::NoBo {
                dev: self.bdf,
                handle: h,
            });
        }
        self.reap(&bo);
        Ok(())
    }

    /// Frees a closed BO that nothing holds any more. Every holder calls it as it
    /// lets go; whichever is last frees the memory (the state lock orders them).
    pub(crate) fn reap(&self, bo: &Arc<Bo>) {
        if !bo.closed.load(Ordering::Acquire) {
            return;
        }
        let mut s = bo.state.lock();
        s.importers.retain(|w| w.strong_count() > 0);
        s.exports.retain(|w| w.strong_count() > 0);
        let held = !s.pins.is_empty()
            || s.gpu_mappings > 0
            || !s.importers.is_empty()
            || !s.exports.is_empty();
        if held || matches!(s.storage, Storage::Gone) {
            return;
        }
        bo.busy.wait_idle();
        self.release_storage(bo, &mut s);
        drop(s);
        let mut table = self.bos.lock();
        if table.get(&bo.handle.0).is_some_and(|b| Arc::ptr_eq(b, bo)) {
            table.remove(&bo.handle.0);
        }
    }

    /// [`Gpu::reap`] by handle, for a holder that keeps only the handle.
    pub(crate) fn reap_handle(&self, h: BoHandle) {
        if let Ok(bo) = self.find(h, By::Holder) {
            self.reap(&bo);
        }
    }

    /// Frees whatever storage the BO has; it is gone afterwards.
    fn release_storage(&self, bo: &Bo, s: &mut BoState) {
        match std::mem::replace(&mut s.storage, Storage::Gone) {
            Storage::Vram(first) => {
                self.close_window(first);
                let frames: Vec<Pfn> = (0..bo.pages).map(|i| Pfn(first.0 + i)).collect();
                self.bo_vram.put_owned(&frames);
            }
            Storage::Ram { frames, gart } => {
                drop(gart);
                self.phys.ram().put_owned(&frames);
            }
            Storage::Gone => {}
        }
    }

    /// What a BO is and who holds it.
    pub fn bo_info(&self, h: BoHandle) -> Result<BoInfo, GpuError> {
        self.bo_info_by(h, By::Owner)
    }

    /// [`Gpu::bo_info`] for the owner or a holder.
    pub(crate) fn bo_info_by(&self, h: BoHandle, by: By) -> Result<BoInfo, GpuError> {
        let bo = self.find(h, by)?;
        let s = bo.state.lock();
        let (domain, visible) = match &s.storage {
            Storage::Vram(first) => (BoDomain::Vram, self.bo_vram.bus_hidden(*first).is_none()),
            _ => (BoDomain::Ram, false),
        };
        Ok(BoInfo {
            handle: h,
            bytes: bo.pages * PAGE_SIZE,
            domain,
            pinned_by: s.pins.clone(),
            gpu_mappings: s.gpu_mappings,
            peer_mappings: s.importers.iter().filter(|w| w.strong_count() > 0).count(),
            bar_visible: visible,
            moves: s.moves,
            handle_closed: bo.closed.load(Ordering::Acquire),
        })
    }

    /// Every live BO, by handle: closed ones too while something holds them.
    pub fn bos(&self) -> Vec<BoInfo> {
        let handles: Vec<u32> = self.bos.lock().keys().copied().collect();
        handles
            .into_iter()
            .filter_map(|h| self.bo_info_by(BoHandle(h), By::Holder).ok())
            .collect()
    }

    /// Pins a BO where it is for a long-term user named `holder` (a static dma-buf
    /// importer, an RDMA registration, scan-out): it cannot move until every pin is
    /// dropped.
    pub fn bo_pin(&self, h: BoHandle, holder: &str) -> Result<BoDomain, GpuError> {
        self.bo_pin_by(h, holder, By::Owner)
    }

    /// [`Gpu::bo_pin`] for the owner or a holder.
    pub(crate) fn bo_pin_by(
        &self,
        h: BoHandle,
        holder: &str,
        by: By,
    ) -> Result<BoDomain, GpuError> {
        let bo = self.find(h, by)?;
        let mut s = bo.state.lock();
        s.pins.push(holder.to_string());
        Ok(match s.storage {
            Storage::Vram(_) => BoDomain::Vram,
            _ => BoDomain::Ram,
        })
    }

    /// Drops one pin `holder` took; EINVAL when it holds none.
    ///
    /// A pin is a reference of its own: its holder drops it even after the GEM handle
    /// closed, and the last one frees a closed BO.
    pub fn bo_unpin(&self, h: BoHandle, holder: &str) -> Result<(), GpuError> {
        self.bo_unpin_by(h, holder, By::Holder)
    }

    /// [`Gpu::bo_unpin`] for the owner or a holder; the last holder of a closed BO
    /// frees it.
    pub(crate) fn bo_unpin_by(&self, h: BoHandle, holder: &str, by: By) -> Result<(), GpuError> {
        let bo = self.find(h, by)?;
        let mut s = bo.state.lock();
        let Some(i) = s.pins.iter().position(|p| p == holder) else {
            return Err(GpuError::Invalid {
                dev: self.bdf,
                op: "bo_unpin",
                va: VirtAddr(0),
                len: bo.pages * PAGE_SIZE,
                why: "the BO holds no pin of that holder",
            });
        };
        s.pins.remove(i);
        drop(s);
        self.reap(&bo);
        Ok(())
    }

    /// Before a move (the reservation lock held): adds the move's KERNEL fence, tells
    /// every importer of the BO that it moves and revokes its mapping (which waits for
    /// the DMA in flight through it), waits for the fences importers added and for GPU
    /// work using it. The caller signals the returned fence once the BO is in place.
    fn quiesce(&self, bo: &Bo, s: &mut BoState, resv: &mut ResvGuard<'_>) -> Fence {
        let fence = Fence::new(format!("{} {} move", self.bdf, bo.handle));
        resv.add_fence(fence.clone(), Usage::Kernel);
        self.revoke_importers(bo.handle, s, resv);
        for f in resv.fences(Usage::Bookkeep) {
            if !f.same(&fence) {
                f.wait();
            }
        }
        bo.busy.wait_idle();
        fence
    }

    /// Tells every importer of the BO that its address changes (the dma-bufs'
    /// `move_notify`, then each mapping's own hook) and revokes its mapping, waiting
    /// for the DMA in flight through it. The reservation lock is held.
    fn revoke_importers(&self, h: BoHandle, s: &mut BoState, resv: &ResvGuard<'_>) {
        s.exports.retain(|w| w.strong_count() > 0);
        let bufs: Vec<Arc<DmaBuf>> = s.exports.iter().filter_map(Weak::upgrade).collect();
        for buf in bufs {
            buf.move_notify(resv);
            // Its last reference may have gone meanwhile: it must not go here, with
            // the BO locked, since the buffer's going may free the BO.
            self.park(buf);
        }
        let maps: Vec<Arc<BoDmaMap>> = s.importers.drain(..).filter_map(|w| w.upgrade()).collect();
        for m in maps {
            if let Some(n) = &m.notify {
                n.move_notify(self.bdf, h);
            }
            m.mapping.revoke();
            self.park(m);
        }
    }

    /// Keeps `a` for [`Gpu::drop_orphans`] when it is its last reference: a move
    /// holds the BO's lock, and the last reference to a dma-buf or a peer's mapping
    /// of a closed BO frees the BO, which takes that lock.
    fn park<T: Send + 'static>(&self, a: Arc<T>) {
        if let Some(last) = Arc::into_inner(a) {
            self.orphans.lock().push(Box::new(last));
        }
    }

    /// Drops what moves parked, with no BO locked: every public entry that can move a
    /// BO calls it on its way out.
    pub(crate) fn drop_orphans(&self) {
        let parked = std::mem::take(&mut *self.orphans.lock());
        drop(parked);
    }

    /// Moves a BO from VRAM to system RAM with the copy engine; Ok(false) when it is
    /// not in VRAM; Err(why) when it may not or cannot move.
    fn move_to_ram(
        &self,
        bo: &Bo,
        s: &mut BoState,
        resv: &mut ResvGuard<'_>,
    ) -> Result<bool, String> {
        let Storage::Vram(first) = s.storage else {
            return Ok(false);
        };
        if !s.pins.is_empty() {
            return Err(format!("pinned by {}", s.pins.join(", ")));
        }
        let mut frames = Vec::with_capacity(bo.pages as usize);
        if self
            .phys
            .ram()
            .alloc_bulk_for_copy(bo.pages, &mut frames)
            .is_err()
        {
            return Err("system RAM is full".into());
        }
        self.phys.ram().mark_owned(&frames);
        let bytes = bo.pages * PAGE_SIZE;
        let sg = SgTable::from_frames(&frames, 0, bytes, self.dma.max_segment());
        let gart = match self.dma.map_sg(&sg, Direction::Bidirectional) {
            Ok(m) => m,
            Err(e) => {
                self.phys.ram().put_owned(&frames);
                return Err(format!("the GPU cannot map system RAM: {e}"));
            }
        };
        let fence = self.quiesce(bo, s, resv);
        self.close_window(first);
        let vram = &self.bo_vram;
        let copied = gart.transfer_with(0, bytes, true, |r, p, off, at, n| {
            vram.engine_copy_span(first, at as u64, r, p, off, n);
        });
        if let Err(e) = copied {
            drop(gart);
            self.phys.ram().put_owned(&frames);
            fence.signal();
            return Err(format!("the copy engine failed: {e}"));
        }
        s.storage = Storage::Ram {
            frames,
            gart: Arc::new(gart),
        };
        s.moves += 1;
        let old: Vec<Pfn> = (0..bo.pages).map(|i| Pfn(first.0 + i)).collect();
        vram.put_owned(&old);
        fence.signal();
        bump(&self.stats.bo_evicted, 1);
        bump(&self.stats.bo_bytes_moved, bytes);
        Ok(true)
    }

    /// Moves one BO to system RAM (what VRAM pressure does to it): Ok(true) when it
    /// moved, Ok(false) when it was there already; EBUSY naming the pin holders when
    /// it is pinned.
    pub fn bo_evict(&self, h: BoHandle) -> Result<bool, GpuError> {
        let r = self.bo_evict_inner(h);
        self.drop_orphans();
        r
    }

    fn bo_evict_inner(&self, h: BoHandle) -> Result<bool, GpuError> {
        let bo = self.bo(h)?;
        let mut resv = bo.resv.lock();
        let mut s = bo.state.lock();
        self.move_to_ram(&bo, &mut s, &mut resv)
            .map_err(|why| GpuError::Busy {
                dev: self.bdf,
                what: h.to_string(),
                holders: why,
            })
    }

    /// Moves every BO that may move to system RAM (suspend, or a driver freeing all of
    /// VRAM); pinned ones stay and are listed with who pinned them.
    pub fn evict_bos(&self) -> BoEviction {
        let r = self.evict_bos_inner();
        self.drop_orphans();
        r
    }

    fn evict_bos_inner(&self) -> BoEviction {
        let all: Vec<Arc<Bo>> = self.bos.lock().values().cloned().collect();
        let mut out = BoEviction::default();
        for bo in all {
            let mut resv = bo.resv.lock();
            let mut s = bo.state.lock();
            match self.move_to_ram(&bo, &mut s, &mut resv) {
                Ok(true) => {
                    out.moved.push(bo.handle);
                    out.bytes += bo.pages * PAGE_SIZE;
                }
                Ok(false) => {}
                Err(why) => out.skipped.push((bo.handle, why)),
            }
        }
        out
    }

    /// Moves a BO back into VRAM if it is in system RAM and may move, making room as
    /// allocation does (`ttm_bo_validate` into VRAM). Returns where it is afterwards:
    /// a pinned BO stays in RAM; ENOMEM naming the holders when VRAM cannot take it.
    pub fn bo_validate(&self, h: BoHandle) -> Result<BoDomain, GpuError> {
        let r = self.bo_validate_inner(h);
        self.drop_orphans();
        r
    }

    fn bo_validate_inner(&self, h: BoHandle) -> Result<BoDomain, GpuError> {
        let bo = self.bo(h)?;
        self.validate(&bo)
    }

    fn validate(&self, bo: &Arc<Bo>) -> Result<BoDomain, GpuError> {
        {
            let s = bo.state.lock();
            match s.storage {
                Storage::Vram(_) => return Ok(BoDomain::Vram),
                Storage::Gone => {
                    return Err(GpuError::NoBo {
                        dev: self.bdf,
                        handle: bo.handle,
                    })
                }
                Storage::Ram { .. } if !s.pins.is_empty() => return Ok(BoDomain::Ram),
                Storage::Ram { .. } => {}
            }
        }
        // Room first, with no BO locked: making it may evict other BOs.
        let first = self.vram_for_bo(bo.pages, Some(bo.handle))?;
        let release = |first: Pfn| {
            let frames: Vec<Pfn> = (0..bo.pages).map(|i| Pfn(first.0 + i)).collect();
            self.bo_vram.put_owned(&frames);
        };
        let mut resv = bo.resv.lock();
        let mut s = bo.state.lock();
        if !matches!(s.storage, Storage::Ram { .. }) || !s.pins.is_empty() {
            // Moved or pinned meanwhile.
            release(first);
            return Ok(match s.storage {
                Storage::Vram(_) => BoDomain::Vram,
                _ => BoDomain::Ram,
            });
        }
        let fence = self.quiesce(bo, &mut s, &mut resv);
        let Storage::Ram { gart, .. } = &s.storage else {
            unreachable!("checked above")
        };
        let bytes = bo.pages * PAGE_SIZE;
        let vram = &self.bo_vram;
        let copied = gart.transfer_with(0, bytes, false, |r, p, off, at, n| {
            r.engine_copy_span(p, off, vram, first, at as u64, n);
        });
        if let Err(e) = copied {
            release(first);
            fence.signal();
            return Err(GpuError::Dma {
                dev: self.bdf,
                source: e,
            });
        }
        if let Storage::Ram { frames, gart } =
            std::mem::replace(&mut s.storage, Storage::Vram(first))
        {
            drop(gart);
            self.phys.ram().put_owned(&frames);
        }
        s.moves += 1;
        s.last_use = self.tick();
        fence.signal();
        bump(&self.stats.bo_restored, 1);
        bump(&self.stats.bo_bytes_moved, bytes);
        Ok(BoDomain::Vram)
    }

    /// Points a small BAR's window at a BO in VRAM, so peers reach it (a full BAR
    /// reaches every BO already). Peer mappings of the BO the window showed before are
    /// revoked first (their importers are told). Returns the BO's bus address.
    /// EINVAL when the BO is in system RAM or larger than the window; ENXIO-like
    /// `NoBar` when the GPU has no BAR onto VRAM.
    pub fn bar_point(&self, h: BoHandle) -> Result<BusAddr, GpuError> {
        let r = self.bar_point_inner(h);
        self.drop_orphans();
        r
    }

    fn bar_point_inner(&self, h: BoHandle) -> Result<BusAddr, GpuError> {
        let bar = self.bo_ops.bar.ok_or(GpuError::NoBar { dev: self.bdf })?;
        let bo = self.bo(h)?;
        let invalid = |why| GpuError::Invalid {
            dev: self.bdf,
            op: "bar_point",
            va: VirtAddr(0),
            len: bo.pages * PAGE_SIZE,
            why,
        };
        let first = {
            let s = bo.state.lock();
            match s.storage {
                Storage::Vram(first) => first,
                _ => return Err(invalid("the BO is not in VRAM")),
            }
        };
        if bar.full {
            let (_, _, off) = self.bo_ops.window.lock().unwrap_or((first, 0, 0));
            return Ok(BusAddr(first.addr().0.wrapping_add(off)));
        }
        if bo.pages * PAGE_SIZE > bar.bytes {
            return Err(invalid("the BO is larger than the BAR window"));
        }
        // Revoke the peers of the BO shown now, then move the window.
        let shown = self.window_target.lock().take();
        if let Some(old) = shown.and_then(|o| self.bo(o).ok()) {
            if old.handle != h {
                let resv = old.resv.lock();
                self.revoke_importers(old.handle, &mut old.state.lock(), &resv);
            }
        }
        let s = bo.state.lock();
        let Storage::Vram(first) = s.storage else {
            return Err(invalid("the BO is not in VRAM"));
        };
        let off = bar.bus.0.wrapping_sub(first.addr().0);
        *self.bo_ops.window.lock() = Some((first, bo.pages, off));
        *self.window_target.lock() = Some(h);
        Ok(bar.bus)
    }

    /// Closes a small BAR's window when it shows the BO at `first` (which is moving
    /// or going away).
    fn close_window(&self, first: Pfn) {
        if self.bo_ops.bar.is_none_or(|b| b.full) {
            return;
        }
        let mut w = self.bo_ops.window.lock();
        if w.is_some_and(|(f, _, _)| f == first) {
            *w = None;
            drop(w);
            *self.window_target.lock() = None;
        }
    }

    /// Maps a BO for DMA by the peer `dev` (a dma-buf importer's map): where the BO is
    /// in VRAM, by the fabric's rules for reaching the GPU's BAR (bus address through a
    /// switch, through the host bridge when allowed, otherwise EREMOTEIO naming why;
    /// VRAM the BAR does not show is not addressable); where it is in system RAM, as
    /// RAM. `notify` is told before the BO next moves.
    pub fn bo_map_peer(
        self: &Arc<Self>,
        h: BoHandle,
        dev: &DmaDevice,
        dir: Direction,
        notify: Option<Arc<dyn MoveNotify>>,
    ) -> Result<Arc<BoDmaMap>, GpuError> {
        self.bo_map_peer_by(h, dev, dir, notify, By::Owner)
    }

    /// [`Gpu::bo_map_peer`] for the owner or a holder.
    pub(crate) fn bo_map_peer_by(
        self: &Arc<Self>,
        h: BoHandle,
        dev: &DmaDevice,
        dir: Direction,
        notify: Option<Arc<dyn MoveNotify>>,
        by: By,
    ) -> Result<Arc<BoDmaMap>, GpuError> {
        let bo = self.find(h, by)?;
        if self.removed() {
            return Err(GpuError::Removed { dev: self.bdf });
        }
        let mut s = bo.state.lock();
        let bytes = bo.pages * PAGE_SIZE;
        let sg = match &s.storage {
            Storage::Vram(first) => {
                let runs = [(*first, bo.pages as u32)];
                SgTable::from_runs(&runs, 0, bytes, dev.max_segment())
            }
            Storage::Ram { frames, .. } => {
                SgTable::from_frames(frames, 0, bytes, dev.max_segment())
            }
            Storage::Gone => {
                return Err(GpuError::NoBo {
                    dev: self.bdf,
                    handle: h,
                })
            }
        };
        let mapping = dev.map_sg(&sg, dir).map_err(|e| GpuError::Dma {
            dev: self.bdf,
            source: e,
        })?;
        let m = Arc::new(BoDmaMap {
            bo: bo.clone(),
            gpu: self.bdf,
            mapping,
            notify,
            _last: ReapOnDrop {
                bo: bo.clone(),
                owner: Arc::downgrade(self),
            },
        });
        s.importers.retain(|w| w.strong_count() > 0);
        s.importers.push(Arc::downgrade(&m));
        Ok(m)
    }

    /// The driver's CPU access to a BO (`ttm_bo_access`, what a debugger or
    /// `amdgpu_ttm_access_memory` does): writes `data` at `offset`.
    pub fn bo_write(&self, h: BoHandle, offset: u64, data: &[u8]) -> Result<(), GpuError> {
        let u = self.bo_use(h, offset, data.len() as u64, false)?;
        self.place_access(&u, offset, data.len() as u64, true, |r, p, off, at, n| {
            r.write_span(p, off, &data[at..at + n]);
        })
    }

    /// The driver's CPU access to a BO: reads `buf.len()` bytes at `offset`.
    pub fn bo_read(&self, h: BoHandle, offset: u64, buf: &mut [u8]) -> Result<(), GpuError> {
        let u = self.bo_use(h, offset, buf.len() as u64, false)?;
        self.place_access(&u, offset, buf.len() as u64, false, |r, p, off, at, n| {
            r.read_span(p, off, &mut buf[at..at + n]);
        })
    }

    /// Counts the BO busy for an access of `[offset, offset + len)` and snapshots
    /// where it is; `validate` first moves it into VRAM when it may (GPU work does).
    /// EFAULT-like `BoRange` for a range past its end.
    pub(crate) fn bo_use(
        &self,
        h: BoHandle,
        offset: u64,
        len: u64,
        validate: bool,
    ) -> Result<BoUse, GpuError> {
        let bo = self.bo(h)?;
        self.bo_use_of(bo, offset, len, validate)
    }

    pub(crate) fn bo_use_of(
        &self,
        bo: Arc<Bo>,
        offset: u64,
        len: u64,
        validate: bool,
    ) -> Result<BoUse, GpuError> {
        let bytes = bo.pages * PAGE_SIZE;
        if offset.checked_add(len).is_none_or(|e| e > bytes) {
            return Err(GpuError::BoRange {
                dev: self.bdf,
                handle: bo.handle,
                offset,
                len,
                bytes,
            });
        }
        if self.removed() {
            return Err(GpuError::Removed { dev: self.bdf });
        }
        if validate {
            match self.validate(&bo) {
                Ok(_) => {}
                // No room: the GPU works on it in system RAM.
                Err(GpuError::NoVram { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        let mut s = bo.state.lock();
        let place = match &s.storage {
            Storage::Vram(first) => Place::Vram(*first),
            Storage::Ram { gart, .. } => Place::Gart(gart.clone()),
            Storage::Gone => {
                return Err(GpuError::NoBo {
                    dev: self.bdf,
                    handle: bo.handle,
                })
            }
        };
        s.last_use = self.tick();
        bo.busy.enter();
        drop(s);
        Ok(BoUse { bo, place })
    }

    /// Runs `f(region, first frame, offset, bytes before, bytes)` over the physically
    /// contiguous runs of `[offset, offset + len)` of a BO in use: VRAM directly,
    /// system RAM through the GPU's own DMA mapping (the sanitizer checks it).
    pub(crate) fn place_access(
        &self,
        u: &BoUse,
        offset: u64,
        len: u64,
        write: bool,
        mut f: impl FnMut(&Region, Pfn, u64, usize, usize),
    ) -> Result<(), GpuError> {
        match &u.place {
            Place::Vram(first) => {
                let p = Pfn(first.0 + offset / PAGE_SIZE);
                f(&self.bo_vram, p, offset % PAGE_SIZE, 0, len as usize);
                Ok(())
            }
            Place::Gart(m) => m
                .transfer_with(offset, len, write, f)
                .map_err(|e| GpuError::Dma {
                    dev: self.bdf,
                    source: e,
                }),
        }
    }

    /// Takes a GPU virtual address mapping of the BO (counted, so it cannot be freed
    /// meanwhile); returns it.
    pub(crate) fn bo_map_va(&self, h: BoHandle) -> Result<Arc<Bo>, GpuError> {
        let bo = self.bo(h)?;
        bo.state.lock().gpu_mappings += 1;
        Ok(bo)
    }

    pub(crate) fn bo_unmap_va(&self, bo: &Arc<Bo>) {
        let mut s = bo.state.lock();
        s.gpu_mappings = s.gpu_mappings.saturating_sub(1);
        drop(s);
        self.reap(bo);
    }

    /// Hot removal of the BOs: every importer is told and revoked, every BO freed.
    pub(crate) fn remove_bos(&self) {
        self.remove_bos_inner();
        self.drop_orphans();
    }

    fn remove_bos_inner(&self) {
        let all: Vec<Arc<Bo>> = std::mem::take(&mut *self.bos.lock())
            .into_values()
            .collect();
        for bo in all {
            let mut resv = bo.resv.lock();
            let mut s = bo.state.lock();
            let fence = self.quiesce(&bo, &mut s, &mut resv);
            self.release_storage(&bo, &mut s);
            fence.signal();
        }
    }
}

/// What the dma-buf exporter needs of a BO (drivers/gpu/export.rs).
impl Gpu {
    /// Records `buf` as an export of the BO (told before every move) and returns the
    /// BO's reservation object, which the buffer shares.
    pub(crate) fn bo_add_export(&self, h: BoHandle, buf: &Arc<DmaBuf>) -> Result<(), GpuError> {
        let bo = self.bo(h)?;
        let _resv = bo.resv.lock();
        let mut s = bo.state.lock();
        s.exports.retain(|w| w.strong_count() > 0);
        s.exports.push(Arc::downgrade(buf));
        Ok(())
    }

    /// The BO's reservation object.
    pub(crate) fn bo_resv(&self, h: BoHandle) -> Result<Arc<Resv>, GpuError> {
        Ok(self.find(h, By::Holder)?.resv.clone())
    }

    /// Moves the BO to system RAM with its reservation lock held (`resv`), for an
    /// importer that cannot reach VRAM. EBUSY naming the holders when pinned in VRAM.
    pub(crate) fn bo_to_ram_locked(
        &self,
        h: BoHandle,
        resv: &mut ResvGuard<'_>,
    ) -> Result<(), GpuError> {
        let bo = self.find(h, By::Holder)?;
        debug_assert!(resv.holds(&bo.resv));
        let mut s = bo.state.lock();
        self.move_to_ram(&bo, &mut s, resv)
            .map(|_| ())
            .map_err(|why| GpuError::Busy {
                dev: self.bdf,
                what: h.to_string(),
                holders: why,
            })
    }

    /// The frames holding the BO now, in order (for a CPU mapping of a pinned BO).
    pub(crate) fn bo_frames(&self, h: BoHandle) -> Result<Vec<Pfn>, GpuError> {
        let bo = self.find(h, By::Holder)?;
        let s = bo.state.lock();
        match &s.storage {
            Storage::Vram(first) => Ok((0..bo.pages).map(|i| Pfn(first.0 + i)).collect()),
            Storage::Ram { frames, .. } => Ok(frames.clone()),
            Storage::Gone => Err(GpuError::NoBo {
                dev: self.bdf,
                handle: h,
            }),
        }
    }
}

impl Bo {
    pub(crate) fn handle(&self) -> BoHandle {
        self.handle
    }
    pub(crate) fn bytes(&self) -> u64 {
        self.pages * PAGE_SIZE
    }
}

/// A context's BO mappings by GPU virtual address: start -> BO.
pub(crate) type BoVas = BTreeMap<u64, Arc<Bo>>;
