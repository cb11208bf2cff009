//! One region of physical memory: system RAM, or a device page map registered at run
//! time (the `memremap_pages()` analogue) of kind device-private, device-coherent or
//! p2p. Each owns its sparse backing, its frame metadata and its allocator.

use std::fmt;

use crate::addr::{Bdf, Pfn, PAGE_SIZE};
use crate::mem::alloc::FreeRuns;
use crate::mem::backing::Backing;
use crate::mem::frame::{flags, FrameMeta, Sections, PIN, REF, REF_LIMIT};
use crate::mem::MemError;
use crate::sync::atomic::{AtomicU32, Ordering};
use crate::sync::Condvar;
use crate::sync::{order, Arc, OnceLock, OrderedMutex, WaitQueue};

/// Identifies a region inside one [`PhysMem`](crate::mem::PhysMem).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RegionId(pub u32);

/// What kind of memory a region is (`enum memory_type` of `struct dev_pagemap`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegionKind {
    /// Ordinary host RAM.
    SystemRam,
    /// Device memory the CPU cannot address (`MEMORY_DEVICE_PRIVATE`): a CPU access, or
    /// a long-term pin, must migrate the page to system RAM first.
    DevicePrivate {
        /// The owner cookie (`pgmap->owner`) a device uses to recognise its pages.
        owner: u64,
    },
    /// Device memory the CPU can address coherently (`MEMORY_DEVICE_COHERENT`); it may
    /// be mapped and pinned, but not pinned long-term.
    DeviceCoherent {
        /// The owner cookie.
        owner: u64,
    },
    /// A PCI BAR published as peer-to-peer memory (`MEMORY_DEVICE_PCI_P2PDMA`).
    P2p {
        /// The providing function.
        provider: Bdf,
        /// Which BAR.
        bar: u8,
        /// Bus address minus CPU physical address of the BAR.
        bus_offset: u64,
    },
}

impl RegionKind {
    /// Whether pages of this kind are ZONE_DEVICE pages.
    pub fn is_device(&self) -> bool {
        !matches!(self, RegionKind::SystemRam)
    }
    /// Device memory the CPU cannot address (`is_device_private_page`): a CPU access
    /// or a pin migrates the page to RAM first, and no peer reaches it on the bus.
    pub fn is_device_private(&self) -> bool {
        matches!(self, RegionKind::DevicePrivate { .. })
    }
    /// Device memory the CPU addresses coherently (`is_device_coherent_page`): it may
    /// be mapped and pinned, but a long-term pin moves it to RAM first.
    pub fn is_device_coherent(&self) -> bool {
        matches!(self, RegionKind::DeviceCoherent { .. })
    }
    /// A BAR published as p2p memory (`is_pci_p2pdma_page`).
    pub fn is_p2p(&self) -> bool {
        matches!(self, RegionKind::P2p { .. })
    }
    /// For p2p memory, its provider and the bus offset a peer adds to a physical
    /// address to reach it.
    pub fn p2p(&self) -> Option<(Bdf, u64)> {
        match self {
            RegionKind::P2p {
                provider,
                bus_offset,
                ..
            } => Some((*provider, *bus_offset)),
            _ => None,
        }
    }
    /// The owner cookie of device-private or device-coherent memory (`pgmap->owner`).
    pub fn owner(&self) -> Option<u64> {
        match self {
            RegionKind::DevicePrivate { owner } | RegionKind::DeviceCoherent { owner } => {
                Some(*owner)
            }
            _ => None,
        }
    }
    /// Whether a device can reach it on the bus at all (all but device-private).
    pub fn bus_addressable(&self) -> bool {
        !self.is_device_private()
    }
}

/// How many of a region's frames are in use, and how ([`Region::usage`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct FrameUsage {
    /// Frames with a reference.
    pub allocated: u64,
    /// Frames with a DMA pin.
    pub pinned: u64,
    /// Frames whose page lock is held.
    pub locked: u64,
}

/// Where a peer finds a device page map's memory on the bus: the function whose BAR
/// holds it and the offset from a frame's physical address to its bus address (the
/// kernel's `pci_p2pdma_pagemap` provider and `bus_offset`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerReach {
    /// The function whose BAR holds the memory.
    pub provider: Bdf,
    /// Bus address minus CPU physical address.
    pub bus_offset: u64,
}

/// What the owner of a device page map supplies (the kernel's `dev_pagemap_ops`) that
/// this layer calls. Every method has a default, so an owner implements only what it
/// does. The op the fault path calls, `migrate_to_ram`, belongs to the address-space
/// layer above (`mm::MigrateToRam`, registered with `mm::set_migrate_to_ram`).
pub trait PageMapOps: Send + Sync {
    /// A frame of the map lost its last reference and went back to the region's free
    /// frames (`page_free` / `folio_free`). Called with no lock held.
    fn page_free(&self, _pfn: Pfn) {}
    /// Where peers reach frame `pfn` of this memory on the bus, when a BAR exposes it
    /// (device memory the CPU and peers both address, like VRAM behind a resizable
    /// BAR; a BAR window makes it depend on the frame); `None` keeps it reachable only
    /// through the IOMMU. A p2p region carries this in its kind and does not need it.
    fn peer_reach(&self, _pfn: Pfn) -> Option<PeerReach> {
        None
    }
    /// Why frame `pfn` cannot be put on the bus at all just now (VRAM outside the
    /// window a small BAR opens onto it), or `None` when it can.
    fn bus_hidden(&self, _pfn: Pfn) -> Option<&'static str> {
        None
    }
}

impl fmt::Display for RegionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegionKind::SystemRam => f.write_str("system RAM"),
            RegionKind::DevicePrivate { owner } => write!(f, "device-private (owner {owner:#x})"),
            RegionKind::DeviceCoherent { owner } => write!(f, "device-coherent (owner {owner:#x})"),
            RegionKind::P2p { provider, bar, .. } => {
                write!(f, "p2p memory of {provider} BAR {bar}")
            }
        }
    }
}

/// A physically contiguous range of frames with real bytes behind it.
///
/// # Invariants
/// Frames `base .. base + frames` belong to this region and no other; `backing` is
/// `frames * PAGE_SIZE` bytes; a frame's metadata section exists once it was allocated.
pub struct Region {
    id: RegionId,
    kind: RegionKind,
    base: Pfn,
    frames: u64,
    backing: Backing,
    meta: Sections,
    /// The allocator. Lock order: taken last, after any page-table lock.
    free: OrderedMutex<FreeRuns>,
    /// Signalled when frames return to `free`, for [`Region::wait_until_free`].
    freed: Condvar,
    /// Threads in `wait_until_free`; frees skip the wake-up when there are none.
    free_waiters: AtomicU32,
    /// Where threads wait for a frame's page lock to be released. Lock order: a leaf,
    /// held only to sleep.
    unlocked: WaitQueue,
    /// The owner's ops, for a device page map that has them.
    ops: OnceLock<Arc<dyn PageMapOps>>,
    /// What a layer above keeps for this page map (mm's fault handler); opaque here.
    upper: OnceLock<Arc<dyn std::any::Any + Send + Sync>>,
}

impl fmt::Debug for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Region")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("base", &self.base)
            .field("frames", &self.frames)
            .finish()
    }
}

impl Region {
    pub(crate) fn new(
        id: RegionId,
        kind: RegionKind,
        base: Pfn,
        frames: u64,
    ) -> Result<Self, MemError> {
        if frames == 0 {
            return Err(MemError::Invalid {
                what: "a region of zero frames".into(),
            });
        }
        let bytes = frames.checked_mul(PAGE_SIZE).ok_or(MemError::Invalid {
            what: format!("{frames} frames overflow the address space"),
        })?;
        Ok(Region {
            id,
            kind,
            base,
            frames,
            backing: Backing::new(bytes as usize)?,
            meta: Sections::new(frames),
            free: OrderedMutex::new(&order::REGION_FREE, FreeRuns::new(frames)),
            freed: Condvar::new(),
            free_waiters: AtomicU32::new(0),
            unlocked: WaitQueue::new(),
            ops: OnceLock::new(),
            upper: OnceLock::new(),
        })
    }

    /// The region's id.
    pub fn id(&self) -> RegionId {
        self.id
    }
    /// Its kind.
    pub fn kind(&self) -> &RegionKind {
        &self.kind
    }
    /// Its first frame.
    pub fn base(&self) -> Pfn {
        self.base
    }
    /// Its size in frames.
    pub fn frames(&self) -> u64 {
        self.frames
    }
    /// Whether `pfn` belongs to it.
    pub fn contains(&self, pfn: Pfn) -> bool {
        pfn.0 >= self.base.0 && pfn.0 - self.base.0 < self.frames
    }
    /// Free frames.
    pub fn free_frames(&self) -> u64 {
        self.free.lock().free()
    }
    /// Bytes of frame metadata allocated so far.
    pub fn metadata_bytes(&self) -> u64 {
        self.meta.allocated_bytes()
    }

    fn idx(&self, pfn: Pfn) -> u64 {
        assert!(
            self.contains(pfn),
            "{pfn} is not in region {:?} ({})",
            self.id,
            self.kind
        );
        pfn.0 - self.base.0
    }

    /// How the region's frames are held now: allocated (some reference; a reserved
    /// frame — the zero page — only while it is pinned or locked), DMA-pinned,
    /// page-locked. Walks the metadata of every frame that was ever allocated; for leak
    /// reports, not hot paths.
    pub fn usage(&self) -> FrameUsage {
        let mut u = FrameUsage::default();
        for (_, m) in self.meta.present() {
            let held = !m.test(flags::RESERVED) || m.pincount() > 0 || m.test(flags::LOCKED);
            if m.refcount() > 0 && held {
                u.allocated += 1;
                u.pinned += u64::from(m.pincount() > 0);
                u.locked += u64::from(m.test(flags::LOCKED));
            }
        }
        u
    }

    /// Calls `f` with every frame whose metadata exists (every frame ever allocated)
    /// and its metadata, in frame order: for audits, not hot paths.
    /// Frames at or above the allocator's high-water mark were never handed out and
    /// are skipped.
    pub fn for_each_frame(&self, mut f: impl FnMut(Pfn, &FrameMeta)) {
        let high_water = self.free.lock().high_water();
        for idx in 0..high_water {
            if let Some(m) = self.meta.peek(idx) {
                f(Pfn(self.base.0 + idx), m);
            }
        }
    }

    /// The metadata of an allocated frame.
    pub fn meta(&self, pfn: Pfn) -> &FrameMeta {
        self.meta.get(self.idx(pfn))
    }

    fn init_frame(&self, idx: u64, reused: bool) {
        let m = self.meta.get(idx);
        debug_assert_eq!(m.refcount(), 0, "allocator handed out a live frame");
        m.counts.store(REF, Ordering::Release);
        m.flags.store(flags::ALLOCATED, Ordering::Release);
        if reused {
            self.backing
                .zero((idx * PAGE_SIZE) as usize, PAGE_SIZE as usize);
        }
    }

    /// One zeroed frame with one reference.
    pub fn alloc(&self) -> Result<Pfn, MemError> {
        let mut out = Vec::with_capacity(1);
        self.alloc_bulk(1, &mut out)?;
        Ok(out[0])
    }

    /// `n` zeroed frames, each with one reference, appended to `out`; all or none.
    pub fn alloc_bulk(&self, n: u64, out: &mut Vec<Pfn>) -> Result<(), MemError> {
        self.alloc_bulk_with(n, out, true)
    }

    /// Like [`alloc_bulk`](Self::alloc_bulk), but a reused frame keeps whatever bytes
    /// it held (an allocation without `__GFP_ZERO`): for destinations the caller
    /// overwrites whole — with [`copy_frame`](Self::copy_frame) — before anything maps
    /// them, as migration does.
    pub fn alloc_bulk_for_copy(&self, n: u64, out: &mut Vec<Pfn>) -> Result<(), MemError> {
        self.alloc_bulk_with(n, out, false)
    }

    fn alloc_bulk_with(&self, n: u64, out: &mut Vec<Pfn>, zero: bool) -> Result<(), MemError> {
        let mut idx = Vec::with_capacity(n as usize);
        let high_water = {
            let mut free = self.free.lock();
            if free.free() < n {
                return Err(MemError::NoMemory {
                    region: self.kind.to_string(),
                    frames: n,
                });
            }
            let hw = free.high_water();
            free.alloc_bulk(n, &mut idx);
            hw
        };
        out.reserve(idx.len());
        for i in idx {
            self.init_frame(i, zero && i < high_water);
            out.push(Pfn(self.base.0 + i));
        }
        Ok(())
    }

    /// `n` physically contiguous zeroed frames aligned to `align` frames, each with one
    /// reference; returns the first.
    pub fn alloc_contig(&self, n: u64, align: u64) -> Result<Pfn, MemError> {
        let (start, high_water) = {
            let mut free = self.free.lock();
            let hw = free.high_water();
            let s = free
                .alloc_contig(n, align.max(1))
                .ok_or_else(|| MemError::NoMemory {
                    region: self.kind.to_string(),
                    frames: n,
                })?;
            (s, hw)
        };
        for i in start..start + n {
            self.init_frame(i, i < high_water);
        }
        Ok(Pfn(self.base.0 + start))
    }

    /// Takes a reference to an allocated frame (`get_page`). A reference count
    /// reaching [`REF_LIMIT`] is a bug that would otherwise spill into the pin count:
    /// it panics.
    pub(crate) fn get(&self, pfn: Pfn) {
        let m = self.meta(pfn);
        let old = m.counts.fetch_add(REF, Ordering::AcqRel);
        debug_assert!(old as u32 > 0, "get_page on free frame {pfn}");
        assert!(
            (old as u32) < REF_LIMIT,
            "reference count overflow on {pfn}"
        );
    }

    /// Takes a reference (`try_get_page`) or a pin and its reference (`try_grab_folio`
    /// with `FOLL_PIN`) unless either count is at [`REF_LIMIT`]; false then, and
    /// nothing is taken. What GUP uses, so that user space cannot overflow a count.
    pub(crate) fn try_grab(&self, pfn: Pfn, pin: bool) -> bool {
        let m = self.meta(pfn);
        let what = if pin { PIN } else { REF };
        let old = m.counts.fetch_add(what, Ordering::AcqRel);
        debug_assert!(old as u32 > 0, "grab of free frame {pfn}");
        if (old as u32) >= REF_LIMIT || ((old >> 32) as u32) >= REF_LIMIT {
            m.counts.fetch_sub(what, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Drops a reference (`put_page`); the last one frees the frame, bumping its
    /// generation. Returns whether it was freed.
    pub fn put(&self, pfn: Pfn) -> bool {
        let idx = self.idx(pfn);
        if self.release(idx) {
            self.free_indices(&mut [idx]);
            true
        } else {
            false
        }
    }

    /// Marks frames as held outright by a driver ([`flags::OWNED`]): their allocation
    /// reference is the driver's own, which the frame accounting counts by the flag.
    pub fn mark_owned(&self, frames: &[Pfn]) {
        for &pfn in frames {
            self.meta(pfn).set(flags::OWNED);
        }
    }

    /// Drops a driver's own references on frames it marked with
    /// [`mark_owned`](Self::mark_owned): the mark goes first, then the reference (a
    /// frame someone else still holds is no longer the driver's).
    pub fn put_owned(&self, frames: &[Pfn]) {
        for &pfn in frames {
            self.meta(pfn).clear(flags::OWNED);
        }
        self.put_many(frames);
    }

    /// Gives a device page map its owner's ops; once, at set-up. Refused (returns
    /// false) for system RAM or when ops are set already.
    pub fn set_page_map_ops(&self, ops: Arc<dyn PageMapOps>) -> bool {
        self.kind.is_device() && self.ops.set(ops).is_ok()
    }

    /// Keeps `data` for a layer above (once; refused for system RAM or when set).
    pub fn set_upper(&self, data: Arc<dyn std::any::Any + Send + Sync>) -> bool {
        self.kind.is_device() && self.upper.set(data).is_ok()
    }

    /// What a layer above keeps for this page map.
    pub fn upper(&self) -> Option<&Arc<dyn std::any::Any + Send + Sync>> {
        self.upper.get()
    }

    /// The owner's ops, when set.
    pub fn page_map_ops(&self) -> Option<&Arc<dyn PageMapOps>> {
        self.ops.get()
    }

    /// Where a peer reaches frame `pfn` of this region on the bus: a p2p region's
    /// provider and bus offset, or what the owner's ops say for other device memory.
    /// `None` for system RAM and device-private memory.
    pub fn peer_reach(&self, pfn: Pfn) -> Option<PeerReach> {
        match self.kind.p2p() {
            Some((provider, bus_offset)) => Some(PeerReach {
                provider,
                bus_offset,
            }),
            None if self.kind.is_device_coherent() => self.ops.get()?.peer_reach(pfn),
            None => None,
        }
    }

    /// Why frame `pfn` cannot be put on the bus now, as its owner says
    /// ([`PageMapOps::bus_hidden`]); `None` when it can (and always for memory
    /// without an owner).
    pub fn bus_hidden(&self, pfn: Pfn) -> Option<&'static str> {
        self.ops.get()?.bus_hidden(pfn)
    }

    /// Returns frames whose last reference dropped to the allocator, under one lock,
    /// wakes anyone waiting for frames to come back, and tells the owner.
    fn free_indices(&self, idx: &mut [u64]) {
        let mut free = self.free.lock();
        if let [one] = idx {
            free.free_run(*one, 1);
        } else {
            free.free_many(idx);
        }
        if self.free_waiters.load(Ordering::SeqCst) > 0 {
            self.freed.notify_all();
        }
        drop(free);
        if let Some(ops) = self.ops.get() {
            for &i in idx.iter() {
                ops.page_free(Pfn(self.base.0 + i));
            }
        }
    }

    /// Waits until every frame of the region is free, or until `timeout` passes
    /// (returns false then). The last reference to drop signals the wait; nothing polls.
    pub fn wait_until_free(&self, timeout: Option<std::time::Duration>) -> bool {
        crate::sync::might_sleep("waiting for a region's frames");
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        self.free_waiters.fetch_add(1, Ordering::SeqCst);
        let mut free = self.free.lock();
        let all = loop {
            if free.free() == self.frames {
                break true;
            }
            match deadline {
                None => free = free.wait(&self.freed),
                Some(d) => {
                    let left = d.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        break false;
                    }
                    free = free.wait_timeout(&self.freed, left).0;
                }
            }
        };
        drop(free);
        self.free_waiters.fetch_sub(1, Ordering::SeqCst);
        all
    }

    /// Takes a frame's page lock if it is free (`folio_trylock`): a migration holds it
    /// from the moment it replaces the frame's entry with a migration entry until the
    /// new entry is in place. Returns whether it was taken.
    pub(crate) fn trylock_page(&self, pfn: Pfn) -> bool {
        self.meta(pfn)
            .flags
            .fetch_or(flags::LOCKED, Ordering::SeqCst)
            & flags::LOCKED
            == 0
    }

    /// Releases a page lock taken with [`trylock_page`](Self::trylock_page) and wakes
    /// the threads waiting for it (`folio_unlock`).
    pub(crate) fn unlock_page(&self, pfn: Pfn) {
        let old = self
            .meta(pfn)
            .flags
            .fetch_and(!flags::LOCKED, Ordering::SeqCst);
        debug_assert!(old & flags::LOCKED != 0, "unlock of unlocked frame {pfn}");
        self.unlocked.wake_all();
    }

    /// Sleeps until the frame's page lock is released (`folio_wait_locked`): a fault
    /// that meets a migration entry waits here, then retries.
    pub(crate) fn wait_page_unlocked(&self, pfn: Pfn) {
        let m = self.meta(pfn);
        self.unlocked.wait_until("waiting for a page lock", || {
            m.flags.load(Ordering::SeqCst) & flags::LOCKED == 0
        });
    }

    /// Drops one reference on each frame, freeing the last ones under one allocator lock.
    /// Returns how many were freed.
    pub fn put_many(&self, pfns: &[Pfn]) -> usize {
        let mut freed: Vec<u64> = pfns
            .iter()
            .map(|&p| self.idx(p))
            .filter(|&i| self.release(i))
            .collect();
        let n = freed.len();
        if n > 0 {
            self.free_indices(&mut freed);
        }
        n
    }

    /// Drops a reference; true when it was the last (the frame is then ready to free).
    fn release(&self, idx: u64) -> bool {
        self.drop_counts(idx, REF)
    }

    /// Subtracts `what` ([`REF`] or [`PIN`]) from a frame's counts; when the last
    /// reference goes, resets the frame for reuse and returns true.
    fn drop_counts(&self, idx: u64, what: u64) -> bool {
        let m = self.meta.get(idx);
        let old = m.counts.fetch_sub(what, Ordering::AcqRel);
        debug_assert!(
            old as u32 > 0,
            "put_page on free frame {:#x}",
            self.base.0 + idx
        );
        debug_assert!(
            what == REF || old >> 32 > 0,
            "unpin of unpinned frame {:#x}",
            self.base.0 + idx
        );
        if old as u32 != 1 {
            return false;
        }
        debug_assert_eq!(
            (old - what) >> 32,
            0,
            "frame {:#x} freed while DMA-pinned",
            self.base.0 + idx
        );
        let was = m.flags.swap(0, Ordering::AcqRel);
        debug_assert_eq!(
            was & flags::LOCKED,
            0,
            "frame {:#x} freed while page-locked",
            self.base.0 + idx
        );
        m.generation.fetch_add(1, Ordering::AcqRel);
        true
    }

    /// Pins a frame for DMA (`FOLL_PIN`): a pin is also a reference.
    #[cfg(test)]
    pub(crate) fn pin(&self, pfn: Pfn) {
        let m = self.meta(pfn);
        let old = m.counts.fetch_add(PIN, Ordering::AcqRel);
        debug_assert!(old as u32 > 0, "pin of free frame {pfn}");
    }

    /// Drops a pin and its reference (`unpin_user_page`); returns whether that freed it.
    #[cfg(test)]
    pub(crate) fn unpin(&self, pfn: Pfn) -> bool {
        let idx = self.idx(pfn);
        if self.drop_counts(idx, PIN) {
            self.free_indices(&mut [idx]);
            true
        } else {
            false
        }
    }

    /// Unpins `n` frames from `first` (marking them dirty first when `dirty`), freeing
    /// the ones whose last reference that was under one allocator lock
    /// (`unpin_user_pages_dirty_lock` over a contiguous run).
    pub(crate) fn unpin_run(&self, first: Pfn, n: u64, dirty: bool) {
        let mut freed = Vec::new();
        let start = self.idx(first);
        assert!(
            start + n <= self.frames,
            "unpin of frames past the region's end"
        );
        for idx in start..start + n {
            if dirty {
                let m = self.meta.get(idx);
                if m.flags() & flags::DIRTY == 0 {
                    m.set(flags::DIRTY);
                }
            }
            if self.drop_counts(idx, PIN) {
                freed.push(idx);
            }
        }
        if !freed.is_empty() {
            self.free_indices(&mut freed);
        }
    }

    /// `page_maybe_dma_pinned()`: exact here, since pins are counted apart.
    pub fn maybe_dma_pinned(&self, pfn: Pfn) -> bool {
        self.meta(pfn).pincount() > 0
    }

    fn offset(&self, pfn: Pfn, off: u64, len: usize) -> usize {
        assert!(
            off + len as u64 <= PAGE_SIZE,
            "access {off:#x}+{len:#x} crosses the frame"
        );
        (self.idx(pfn) * PAGE_SIZE + off) as usize
    }

    /// Reads bytes of one frame.
    pub fn read(&self, pfn: Pfn, off: u64, dst: &mut [u8]) {
        self.backing.read(self.offset(pfn, off, dst.len()), dst)
    }

    /// Writes bytes of one frame and marks it dirty.
    pub fn write(&self, pfn: Pfn, off: u64, src: &[u8]) {
        self.backing.write(self.offset(pfn, off, src.len()), src);
        self.meta(pfn).set(flags::DIRTY);
    }

    /// Byte offset in the backing of `off` bytes into the span of frames from `first`;
    /// the span `[off, off + len)` must lie inside the region.
    fn span_offset(&self, first: Pfn, off: u64, len: usize) -> usize {
        let start = self.idx(first) * PAGE_SIZE + off;
        assert!(
            start + len as u64 <= self.frames * PAGE_SIZE,
            "span of {len:#x} bytes at {first} + {off:#x} runs past the region"
        );
        start as usize
    }

    /// Reads bytes of physically contiguous frames starting `off` bytes into `first`:
    /// one copy for the whole span (device DMA through a contiguous segment).
    pub fn read_span(&self, first: Pfn, off: u64, dst: &mut [u8]) {
        self.backing
            .read(self.span_offset(first, off, dst.len()), dst)
    }

    /// Writes bytes across physically contiguous frames starting `off` bytes into
    /// `first`, and marks the frames touched dirty.
    pub fn write_span(&self, first: Pfn, off: u64, src: &[u8]) {
        let at = self.span_offset(first, off, src.len());
        self.backing.write(at, src);
        self.mark_dirty(at, src.len());
    }

    /// Copies a whole frame of this region to `dst` in region `to` (possibly this one).
    pub fn copy_frame(&self, src: Pfn, to: &Region, dst: Pfn) {
        self.copy_frames(src, to, dst, 1);
    }

    /// Copies `n` consecutive frames from `src` to `n` consecutive frames of `to` from
    /// `dst` in one go, as a copy engine moves a physically contiguous run: a long run
    /// goes around the CPU caches, as DMA does.
    pub fn copy_frames(&self, src: Pfn, to: &Region, dst: Pfn, n: u64) {
        let len = (n * PAGE_SIZE) as usize;
        // Both runs must lie inside their regions (idx panics naming the frame).
        let s = (self.idx(src) * PAGE_SIZE) as usize;
        let d = (to.idx(dst) * PAGE_SIZE) as usize;
        if n > 1 {
            self.idx(Pfn(src.0 + n - 1));
            to.idx(Pfn(dst.0 + n - 1));
        }
        self.backing.engine_copy_to(s, &to.backing, d, len);
    }

    /// Copies `n` bytes from `src_off` bytes into the physically contiguous frames
    /// from `src` to `dst_off` bytes into those from `dst` in region `to` (possibly
    /// this one, not overlapping), as a copy engine does, and marks the destination
    /// frames dirty. Both spans must lie inside their regions.
    pub fn engine_copy_span(
        &self,
        src: Pfn,
        src_off: u64,
        to: &Region,
        dst: Pfn,
        dst_off: u64,
        n: usize,
    ) {
        let s = self.span_offset(src, src_off, n);
        let d = to.span_offset(dst, dst_off, n);
        self.backing.engine_copy_to(s, &to.backing, d, n);
        to.mark_dirty(d, n);
    }

    fn mark_dirty(&self, at: usize, n: usize) {
        let (lo, hi) = (
            at as u64 / PAGE_SIZE,
            (at + n).div_ceil(PAGE_SIZE as usize) as u64,
        );
        for idx in lo..hi {
            let m = self.meta.get(idx);
            if m.flags() & flags::DIRTY == 0 {
                m.set(flags::DIRTY);
            }
        }
    }

    /// Marks a frame's contents as moved elsewhere: the generation changes, so a DMA
    /// mapping taken before is stale.
    pub(crate) fn bump_generation(&self, pfn: Pfn) {
        self.meta(pfn).generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Returns the backing of free runs to the host, so they cost no memory.
    pub fn trim(&self) {
        let free = self.free.lock();
        for (s, l) in free.runs().filter(|(s, _)| *s < free.high_water()) {
            let l = l.min(free.high_water() - s);
            self.backing
                .discard((s * PAGE_SIZE) as usize, (l * PAGE_SIZE) as usize);
        }
    }
}
