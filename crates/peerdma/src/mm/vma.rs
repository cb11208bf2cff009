//! Virtual memory areas: the ranges an address space has mapped, their protection and
//! what backs them (`struct vm_area_struct`), and shared memory objects (the memfd /
//! shmem analogue) that several address spaces can map.

use std::collections::BTreeMap;
use std::ops::Bound;

use crate::addr::{Pfn, VirtAddr, PAGE_SIZE};
use crate::mem::{flags, MemError, PhysMem};
use crate::sync::Arc;
use crate::sync::{order, OrderedMutex};

/// Page protection (`PROT_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Prot(u8);

impl Prot {
    /// No access.
    pub const NONE: Prot = Prot(0);
    /// Readable.
    pub const READ: Prot = Prot(1);
    /// Writable (and readable: x86 has no write-only pages).
    pub const WRITE: Prot = Prot(2);
    /// Readable and writable.
    pub const RW: Prot = Prot(3);

    /// Whether reads are allowed.
    pub fn readable(self) -> bool {
        self.0 & 3 != 0
    }
    /// Whether writes are allowed.
    pub fn writable(self) -> bool {
        self.0 & 2 != 0
    }
}

/// A memory object shared by every mapping of it — a memfd, shared anonymous memory, or
/// a file on tmpfs (its page cache is its storage): its pages are allocated on first
/// touch from system RAM and belong to the object until it is dropped. `pread` and
/// `pwrite` reach the same pages the mappings do.
///
/// # Invariants
/// Each `Some(pfn)` in `pages` holds one reference on its frame, which is flagged
/// [`flags::PAGECACHE`] (never anonymous).
pub struct ShmObject {
    phys: Arc<PhysMem>,
    pages: OrderedMutex<Vec<Option<Pfn>>>,
}

impl std::fmt::Debug for ShmObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmObject")
            .field("pages", &self.pages.lock().len())
            .finish()
    }
}

impl ShmObject {
    /// An object of `len` bytes (rounded up to pages), no page allocated yet.
    pub fn new(phys: &Arc<PhysMem>, len: u64) -> Arc<Self> {
        Arc::new(ShmObject {
            phys: phys.clone(),
            pages: OrderedMutex::new(
                &order::SHM_PAGES,
                vec![None; len.div_ceil(PAGE_SIZE) as usize],
            ),
        })
    }

    /// Size in pages.
    pub fn pages(&self) -> u64 {
        self.pages.lock().len() as u64
    }

    /// The frame of page `idx`, allocated zeroed on first use.
    pub fn page(&self, idx: u64) -> Result<Option<Pfn>, MemError> {
        let mut pages = self.pages.lock();
        let Some(slot) = pages.get_mut(idx as usize) else {
            return Ok(None);
        };
        if slot.is_none() {
            let pfn = self.phys.ram().alloc()?;
            self.phys.ram().meta(pfn).set(flags::PAGECACHE);
            *slot = Some(pfn);
        }
        Ok(*slot)
    }

    /// The pieces of `[off, off + len)` clipped to the object, a page at a time: (page
    /// index, offset in the page, offset from `off`, bytes).
    fn spans(&self, off: u64, len: usize) -> impl Iterator<Item = (u64, u64, usize, usize)> {
        let size = self.pages() * PAGE_SIZE;
        let n = (len as u64).min(size.saturating_sub(off)) as usize;
        let mut done = 0;
        std::iter::from_fn(move || {
            (done < n).then(|| {
                let at = off + done as u64;
                let (idx, in_page) = (at / PAGE_SIZE, at % PAGE_SIZE);
                let len = ((PAGE_SIZE - in_page) as usize).min(n - done);
                let piece = (idx, in_page, done, len);
                done += len;
                piece
            })
        })
    }

    /// `pread(fd, buf, off)`: bytes from `off`, short at the end of the object; a page
    /// never written reads as zeros without being allocated. Returns the bytes read.
    pub fn pread(&self, off: u64, buf: &mut [u8]) -> usize {
        let mut n = 0;
        for (idx, in_page, at, len) in self.spans(off, buf.len()) {
            let page = self.pages.lock().get(idx as usize).copied().flatten();
            let dst = &mut buf[at..at + len];
            match page {
                Some(pfn) => self.phys.ram().read(pfn, in_page, dst),
                None => dst.fill(0),
            }
            n = at + len;
        }
        n
    }

    /// `pwrite(fd, data, off)`: writes `data` at `off`, short at the end of the object
    /// (an object does not grow). Returns the bytes written; fails when a page cannot be
    /// allocated, keeping what was written before it.
    pub fn pwrite(&self, off: u64, data: &[u8]) -> Result<usize, MemError> {
        let mut n = 0;
        for (idx, in_page, at, len) in self.spans(off, data.len()) {
            let pfn = self
                .page(idx)?
                .unwrap_or_else(|| unreachable!("inside the object"));
            self.phys.ram().write(pfn, in_page, &data[at..at + len]);
            n = at + len;
        }
        Ok(n)
    }
}

impl Drop for ShmObject {
    fn drop(&mut self) {
        let pages: Vec<Pfn> = self.pages.lock().iter().flatten().copied().collect();
        // Out of the page cache (truncation clears `folio->mapping`): a page a pin
        // still holds is nobody's page cache any more, and its owner's reference goes.
        for &pfn in &pages {
            self.phys.ram().meta(pfn).clear(flags::PAGECACHE);
        }
        self.phys.ram().put_many(&pages);
    }
}

/// What backs a VMA.
#[derive(Clone, Debug)]
pub enum VmaKind {
    /// Private anonymous memory: zero-filled on first touch, copy-on-write after fork.
    Anon,
    /// A shared mapping of a memory object starting at page `pgoff` of it.
    Shared {
        /// The object.
        obj: Arc<ShmObject>,
        /// Its first page mapped here.
        pgoff: u64,
    },
    /// A private mapping of an object or file (`MAP_PRIVATE` of a file) from page
    /// `pgoff` of it: reads see the object's pages, mapped read-only; the first write to
    /// a page copies it into an anonymous page of this address space (copy-on-write),
    /// which from then on behaves as private anonymous memory.
    PrivateFile {
        /// The object.
        obj: Arc<ShmObject>,
        /// Its first page mapped here.
        pgoff: u64,
    },
    /// Device pages inserted at mmap time (`vm_insert_page`), shared, never faulted in:
    /// the p2p memory and device BAR mappings of later layers.
    Pages {
        /// Who inserted them, told when a fork copies the mapping.
        owner: Option<PagesOwnerRef>,
    },
}

/// Whoever inserted a `Pages` mapping and must be able to revoke every copy of it (the
/// kernel reaches them all through the provider's `address_space`; without a reverse
/// map, the owner is told of each copy a fork makes instead).
pub trait PagesOwner: Send + Sync {
    /// `child` now maps `[start, start + len)` as a copy of the owner's mapping.
    fn forked(&self, child: &Arc<crate::mm::Mm>, start: VirtAddr, len: u64);
    /// `mm` no longer maps `[start, start + len)` of the owner's mapping (munmap, exit).
    /// Called with no lock of the address space held.
    fn unmapped(&self, _mm: &crate::mm::Mm, _start: VirtAddr, _len: u64) {}
}

/// A shared reference to a [`PagesOwner`].
#[derive(Clone)]
pub struct PagesOwnerRef(pub Arc<dyn PagesOwner>);

impl std::fmt::Debug for PagesOwnerRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PagesOwner")
    }
}

/// One mapped range.
#[derive(Clone, Debug)]
pub struct Vma {
    /// First address (page aligned).
    pub start: VirtAddr,
    /// One past the last address (page aligned).
    pub end: VirtAddr,
    /// Protection.
    pub prot: Prot,
    /// Backing.
    pub kind: VmaKind,
}

impl Vma {
    /// Whether `va` lies inside.
    pub fn contains(&self, va: VirtAddr) -> bool {
        self.start <= va && va < self.end
    }

    /// Whether it is private anonymous memory (`vma_is_anonymous`).
    pub fn is_anon(&self) -> bool {
        matches!(self.kind, VmaKind::Anon)
    }

    /// Whether it is a private, copy-on-write mapping (`is_cow_mapping`): anonymous
    /// memory or a private file mapping. Its pages are anonymous but for the zero page
    /// and the file's own pages, which a write copies first.
    pub fn is_private(&self) -> bool {
        matches!(self.kind, VmaKind::Anon | VmaKind::PrivateFile { .. })
    }

    /// The object and its page backing `va`, for a mapping of an object.
    pub fn object_page(&self, va: VirtAddr) -> Option<(&Arc<ShmObject>, u64)> {
        match &self.kind {
            VmaKind::Shared { obj, pgoff } | VmaKind::PrivateFile { obj, pgoff } => {
                Some((obj, pgoff + (va.0 - self.start.0) / PAGE_SIZE))
            }
            _ => None,
        }
    }

    /// The part from `at` on, leaving `self` as the part before it.
    fn split_off(&mut self, at: VirtAddr) -> Vma {
        debug_assert!(self.start < at && at < self.end);
        let mut tail = self.clone();
        tail.start = at;
        if let VmaKind::Shared { pgoff, .. } | VmaKind::PrivateFile { pgoff, .. } = &mut tail.kind {
            *pgoff += (at.0 - self.start.0) / PAGE_SIZE;
        }
        self.end = at;
        tail
    }
}

/// Where mmap starts looking for room, bottom up.
pub const MMAP_BASE: u64 = 0x1000_0000;

/// The VMAs of one address space, keyed by start.
///
/// # Invariants
/// VMAs are non-empty, page aligned and disjoint.
#[derive(Clone, Debug, Default)]
pub struct Vmas {
    map: BTreeMap<u64, Vma>,
}

impl Vmas {
    /// The VMA holding `va`.
    pub fn find(&self, va: VirtAddr) -> Option<&Vma> {
        self.map
            .range(..=va.0)
            .next_back()
            .map(|(_, v)| v)
            .filter(|v| v.contains(va))
    }

    /// VMAs overlapping `[start, end)`, in order.
    pub fn overlapping(&self, start: VirtAddr, end: VirtAddr) -> impl Iterator<Item = &Vma> {
        let first = self
            .map
            .range(..=start.0)
            .next_back()
            .filter(|(_, v)| v.end > start)
            .map_or(start.0, |(&s, _)| s);
        self.map
            .range((Bound::Included(first), Bound::Excluded(end.0)))
            .map(|(_, v)| v)
    }

    /// All VMAs in order.
    pub fn iter(&self) -> impl Iterator<Item = &Vma> {
        self.map.values()
    }

    /// The end of the mapped run that starts at `start`: `start` itself when nothing
    /// maps it, `end` when VMAs cover the whole range without a hole.
    pub fn mapped_prefix(&self, start: VirtAddr, end: VirtAddr) -> VirtAddr {
        let mut at = start;
        for v in self.overlapping(start, end) {
            if v.start > at {
                break;
            }
            at = v.end.min(end);
        }
        at
    }

    /// Whether every page of `[start, end)` is mapped.
    pub fn covers(&self, start: VirtAddr, end: VirtAddr) -> bool {
        self.mapped_prefix(start, end) == end
    }

    /// Splits any VMA that straddles `at`.
    pub fn split_at(&mut self, at: VirtAddr) {
        let Some((&s, v)) = self.map.range_mut(..at.0).next_back() else {
            return;
        };
        if v.end > at {
            let tail = v.split_off(at);
            debug_assert!(s < at.0);
            self.map.insert(at.0, tail);
        }
    }

    /// Adds a VMA; the range must be free.
    pub fn insert(&mut self, vma: Vma) {
        debug_assert!(self.overlapping(vma.start, vma.end).next().is_none());
        self.map.insert(vma.start.0, vma);
    }

    /// Removes and returns the VMAs inside `[start, end)` after splitting at both ends.
    pub fn remove_range(&mut self, start: VirtAddr, end: VirtAddr) -> Vec<Vma> {
        self.split_at(start);
        self.split_at(end);
        let keys: Vec<u64> = self.map.range(start.0..end.0).map(|(&k, _)| k).collect();
        keys.into_iter()
            .filter_map(|k| self.map.remove(&k))
            .collect()
    }

    /// Applies `f` to every VMA inside `[start, end)` after splitting at both ends.
    pub fn update_range(&mut self, start: VirtAddr, end: VirtAddr, mut f: impl FnMut(&mut Vma)) {
        self.split_at(start);
        self.split_at(end);
        for (_, v) in self.map.range_mut(start.0..end.0) {
            f(v);
        }
    }

    /// The lowest free range of `len` bytes at or above [`MMAP_BASE`].
    pub fn find_gap(&self, len: u64, limit: u64) -> Option<VirtAddr> {
        // A VMA below MMAP_BASE may reach above it.
        let mut at = self
            .find(VirtAddr(MMAP_BASE))
            .map_or(MMAP_BASE, |v| v.end.0);
        for v in self.map.range(at..).map(|(_, v)| v) {
            if v.start.0 >= at + len {
                break;
            }
            at = at.max(v.end.0);
        }
        (at + len <= limit).then_some(VirtAddr(at))
    }
}
