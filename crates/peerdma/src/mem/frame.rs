//! Per-frame metadata, the analogue of the kernel's `struct page`, in 16 bytes instead
//! of 64, allocated lazily a section at a time.
//!
//! | field | kernel `struct page` | here |
//! |---|---|---|
//! | reference count | `_refcount` (4 B) | low half of `counts` (4 B) |
//! | DMA pins | folded into `_refcount` with `GUP_PIN_COUNTING_BIAS` (1024), exact only in large folios' `_pincount` | high half of `counts` (4 B), always exact, so `page_maybe_dma_pinned` is never a guess; one word so a pin is one atomic add |
//! | flags | `flags` (8 B, also holding zone/node/section bits) | `flags` (4 B): the region is found from the PFN instead |
//! | identity | none: a freed page is simply reused | `generation` (4 B), bumped on free and on migration, so a stale DMA mapping is detectable |
//! | mapping, index, LRU, mapcount, memcg | 40 B | none: no page cache, reclaim LRU or rmap is modelled |
//!
//! A pin is also a reference: pinning bumps both counts, so a pinned frame is never
//! freed, whatever else lets go of it.

use crate::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use crate::sync::OnceLock;

/// log2 of frames per metadata section: 4096 frames (16 MiB) share one allocation (64
/// KiB of metadata), small enough that building a small host is cheap.
pub const SECTION_SHIFT: u32 = 12;
const SECTION_FRAMES: u64 = 1 << SECTION_SHIFT;

/// Flag bits of [`FrameMeta::flags`].
pub mod flags {
    /// Handed out by the allocator and not yet freed.
    pub const ALLOCATED: u32 = 1 << 0;
    /// An anonymous page mapped by exactly one address space, which may write it
    /// without copying (the kernel's `PageAnonExclusive`).
    pub const ANON_EXCLUSIVE: u32 = 1 << 1;
    /// Written since it was allocated.
    pub const DIRTY: u32 = 1 << 2;
    /// Locked for migration.
    pub const LOCKED: u32 = 1 << 3;
    /// Held by the machine itself, never freed (`PageReserved`: frame 0 of RAM, and
    /// the shared zero page).
    pub const RESERVED: u32 = 1 << 4;
    /// A page of a shared object or file (the page cache's): never anonymous, so a
    /// private mapping copies it before writing and migration leaves it alone.
    pub const PAGECACHE: u32 = 1 << 5;
    /// Held outright by a driver, which keeps one reference on it besides any mapping
    /// or pin: VRAM or system RAM backing a buffer object, a device-private frame the
    /// driver keeps for itself. Never set together with [`PAGECACHE`]; the frame
    /// accounting (`mm::audit_frames`) counts the owner's reference by it.
    pub const OWNED: u32 = 1 << 6;
}

/// The metadata of one frame.
///
/// # Invariants
/// `pincount <= refcount`; `refcount > 0` exactly while `ALLOCATED` is set.
#[derive(Debug, Default)]
#[repr(C)]
pub struct FrameMeta {
    /// References in the low 32 bits, pins in the high 32 (a pin counts in both).
    pub(crate) counts: AtomicU64,
    pub(crate) flags: AtomicU32,
    pub(crate) generation: AtomicU32,
}

// 16 bytes with std atomics; shuttle's instrumented atomics are larger, and only tests
// build with them.
#[cfg(not(feature = "shuttle"))]
const _: () = assert!(std::mem::size_of::<FrameMeta>() == 16);

/// One reference, as added to [`FrameMeta::counts`].
pub(crate) const REF: u64 = 1;
/// One pin and the reference it carries.
pub(crate) const PIN: u64 = (1 << 32) | 1;
/// The most references, or pins, a frame may hold: half the counter's range, so an
/// attempt to go past it is caught long before it could carry into the pin count.
pub const REF_LIMIT: u32 = 1 << 31;

impl FrameMeta {
    /// Current references (pins included).
    pub fn refcount(&self) -> u32 {
        self.counts.load(Ordering::Acquire) as u32
    }
    /// Current DMA pins.
    pub fn pincount(&self) -> u32 {
        (self.counts.load(Ordering::Acquire) >> 32) as u32
    }
    /// The flag bits.
    pub fn flags(&self) -> u32 {
        self.flags.load(Ordering::Acquire)
    }
    /// Whether all of `bits` are set.
    pub fn test(&self, bits: u32) -> bool {
        self.flags() & bits == bits
    }
    /// Whether any of `bits` is set.
    pub fn test_any(&self, bits: u32) -> bool {
        self.flags() & bits != 0
    }
    /// Sets `bits`.
    pub fn set(&self, bits: u32) {
        self.flags.fetch_or(bits, Ordering::AcqRel);
    }
    /// Clears `bits`.
    pub fn clear(&self, bits: u32) {
        self.flags.fetch_and(!bits, Ordering::AcqRel);
    }
    /// The DMA-visible identity; changes whenever the frame is freed or its contents move.
    pub fn generation(&self) -> u32 {
        self.generation.load(Ordering::Acquire)
    }
}

/// Lazily allocated metadata for `frames` frames.
///
/// # Invariants
/// `sections[i]`, once set, holds `SECTION_FRAMES` entries for frames
/// `i * SECTION_FRAMES ..`; it is never replaced or freed while `self` lives.
pub struct Sections {
    sections: Box<[OnceLock<Box<[FrameMeta]>>]>,
    frames: u64,
}

impl Sections {
    /// Room for `frames` frames, none allocated yet.
    pub fn new(frames: u64) -> Self {
        let n = frames.div_ceil(SECTION_FRAMES) as usize;
        Sections {
            sections: (0..n).map(|_| OnceLock::new()).collect(),
            frames,
        }
    }

    /// The metadata of frame `idx` (an index inside the region), allocating its section
    /// on first use.
    pub fn get(&self, idx: u64) -> &FrameMeta {
        assert!(
            idx < self.frames,
            "frame index {idx:#x} outside {:#x} frames",
            self.frames
        );
        let s = &self.sections[(idx >> SECTION_SHIFT) as usize];
        let sec = s.get_or_init(|| (0..SECTION_FRAMES).map(|_| FrameMeta::default()).collect());
        &sec[(idx & (SECTION_FRAMES - 1)) as usize]
    }

    /// The metadata of frame `idx` if its section exists.
    pub fn peek(&self, idx: u64) -> Option<&FrameMeta> {
        if idx >= self.frames {
            return None;
        }
        self.sections[(idx >> SECTION_SHIFT) as usize]
            .get()
            .map(|sec| &sec[(idx & (SECTION_FRAMES - 1)) as usize])
    }

    /// The metadata of every frame whose section exists, with its index.
    pub fn present(&self) -> impl Iterator<Item = (u64, &FrameMeta)> + '_ {
        self.sections.iter().enumerate().flat_map(move |(i, s)| {
            let base = (i as u64) << SECTION_SHIFT;
            s.get()
                .into_iter()
                .flat_map(|sec| sec.iter().enumerate())
                .map(move |(k, m)| (base + k as u64, m))
                .filter(move |(idx, _)| *idx < self.frames)
        })
    }

    /// Bytes of metadata allocated so far (sections and the section table).
    pub fn allocated_bytes(&self) -> u64 {
        let live = self.sections.iter().filter(|s| s.get().is_some()).count() as u64;
        live * SECTION_FRAMES * std::mem::size_of::<FrameMeta>() as u64
            + std::mem::size_of_val(&*self.sections) as u64
    }
}
