//! One IOMMU translation domain: an IOVA allocator and an IO page table. The IO page
//! table is the same four-level radix table the CPU side uses; an entry's presence
//! grants read and its write bit grants write (a write-only mapping is kept readable
//! here, and the DMA engine refuses the read by the mapping's direction).
//!
//! Two ways to use it, as the kernel's DMA API has them: map a whole scatter-gather
//! table at once (`alloc_iova` + `map`, what `iommu_dma_map_sg` does), or reserve a
//! range and link and unlink pages in it one at a time ([`IovaRange`], the
//! `dma_iova_try_alloc` / `dma_iova_link` / `dma_iova_unlink` calls an ODP or HMM
//! mirror uses as pages fault in and are invalidated).

use crate::addr::{Iova, Pfn, VirtAddr, PAGE_SHIFT, PAGE_SIZE};
use crate::iommu::{IommuError, IommuGroup};
use crate::mem::alloc::FreeRuns;
use crate::mm::{PageTable, Pte};
use crate::sync::Arc;
use crate::sync::{order, OrderedMutex};

/// What a device may do through an IO page-table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IoPerm {
    /// The device may read memory (DMA to the device).
    pub read: bool,
    /// The device may write memory (DMA from the device).
    pub write: bool,
}

/// First IOVA handed out: 4 GiB, so a zero or small address is never valid.
const IOVA_BASE_PAGE: u64 = 1 << (32 - PAGE_SHIFT);
/// IOVA pages available: a 47-bit space above the base (the radix table's reach).
const IOVA_PAGES: u64 = (1 << (47 - PAGE_SHIFT)) - IOVA_BASE_PAGE;

/// A translation domain.
///
/// # Invariants
/// Every entry of `table` lies inside an IOVA range the allocator has handed out and
/// not yet taken back; ranges handed out never overlap.
pub struct Domain {
    id: IommuGroup,
    /// Lock order: `iova` before `table`, both leaves otherwise.
    iova: OrderedMutex<FreeRuns>,
    table: OrderedMutex<PageTable>,
}

impl std::fmt::Debug for Domain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Domain").field("group", &self.id).finish()
    }
}

impl Domain {
    pub(crate) fn new(id: IommuGroup) -> Self {
        Domain {
            id,
            iova: OrderedMutex::new(&order::IOVA, FreeRuns::new(IOVA_PAGES)),
            table: OrderedMutex::new(&order::IO_PAGE_TABLE, PageTable::new()),
        }
    }

    /// The IOMMU group this domain serves.
    pub fn group(&self) -> IommuGroup {
        self.id
    }

    /// Allocates `pages` IOVA pages aligned to `align_pages` (a power of two).
    pub fn alloc_iova(&self, pages: u64, align_pages: u64) -> Result<Iova, IommuError> {
        let idx = self
            .iova
            .lock()
            .alloc_contig(pages, align_pages)
            .ok_or(IommuError::NoSpace {
                group: self.id,
                pages,
            })?;
        Ok(Iova((IOVA_BASE_PAGE + idx) << PAGE_SHIFT))
    }

    /// Returns an IOVA range to the allocator (its entries must be unmapped first).
    pub fn free_iova(&self, iova: Iova, pages: u64) {
        let idx = (iova.0 >> PAGE_SHIFT) - IOVA_BASE_PAGE;
        self.iova.lock().free_run(idx, pages);
    }

    /// Maps consecutive IOVA pages from `iova` to `frames`.
    pub fn map(&self, iova: Iova, frames: &[Pfn], perm: IoPerm) {
        let mut t = self.table.lock();
        let base = VirtAddr(iova.0 & !(PAGE_SIZE - 1));
        debug_assert!(
            (0..frames.len() as u64).all(|i| t.get(VirtAddr(base.0 + i * PAGE_SIZE)).is_empty()),
            "IOVA {iova} mapped twice"
        );
        t.fill(base, frames.len() as u64, |i| {
            Pte::present(frames[i as usize], perm.write)
        });
    }

    /// Removes the entries of `pages` IOVA pages from `iova`.
    pub fn unmap(&self, iova: Iova, pages: u64) {
        let base = iova.0 & !(PAGE_SIZE - 1);
        self.table.lock().walk_mut(
            VirtAddr(base),
            VirtAddr(base + pages * PAGE_SIZE),
            |_, p| *p = Pte::EMPTY,
        );
    }

    /// The frame and permission behind the page of `iova`.
    pub fn translate(&self, iova: Iova) -> Option<(Pfn, IoPerm)> {
        let pte = self.table.lock().get(VirtAddr(iova.0 & !(PAGE_SIZE - 1)));
        pte.pfn().filter(|_| pte.is_present()).map(|p| {
            (
                p,
                IoPerm {
                    read: true,
                    write: pte.writable(),
                },
            )
        })
    }

    /// Whether consecutive IOVA pages from `iova` map to `frames`, each with `write`
    /// permission if asked (one lock for the whole run).
    pub fn translates_to(&self, iova: Iova, frames: &[Pfn], write: bool) -> bool {
        let t = self.table.lock();
        let mut va = iova.0 & !(PAGE_SIZE - 1);
        let mut rest = frames;
        // A leaf table's run at a time.
        while !rest.is_empty() {
            let run = t.run(VirtAddr(va));
            if run.is_empty() {
                return false;
            }
            let n = run.len().min(rest.len());
            let ok = run[..n].iter().zip(&rest[..n]).all(|(pte, &pfn)| {
                pte.is_present() && pte.pfn() == Some(pfn) && (!write || pte.writable())
            });
            if !ok {
                return false;
            }
            rest = &rest[n..];
            va += n as u64 * PAGE_SIZE;
        }
        true
    }

    /// Entries mapped now (for tests and leak checks).
    pub fn mapped_pages(&self) -> usize {
        self.table.lock().entries() as usize
    }

    /// IOVA pages currently handed out.
    pub fn allocated_iova_pages(&self) -> u64 {
        IOVA_PAGES - self.iova.lock().free()
    }

    /// Reserves `pages` IOVA pages aligned to `align_pages` with nothing linked yet
    /// (`dma_iova_try_alloc`); pages are then linked and unlinked one run at a time.
    /// Dropping the reservation unlinks what is left and frees the range.
    pub fn reserve(
        self: &Arc<Self>,
        pages: u64,
        align_pages: u64,
    ) -> Result<IovaRange, IommuError> {
        let base = self.alloc_iova(pages, align_pages)?;
        Ok(IovaRange {
            domain: self.clone(),
            base,
            pages,
        })
    }
}

/// A reserved IOVA range of one domain whose pages are linked to frames one run at a
/// time (`dma_iova_link` / `dma_iova_unlink`), for mappings that change page by page.
///
/// # Invariants
/// `[base, base + pages)` is allocated from `domain` and owned by this value; every
/// IO page-table entry in it was linked through it. Dropping it unlinks the whole range
/// and frees it.
pub struct IovaRange {
    domain: Arc<Domain>,
    base: Iova,
    pages: u64,
}

impl std::fmt::Debug for IovaRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IovaRange")
            .field("group", &self.domain.id)
            .field("base", &self.base)
            .field("pages", &self.pages)
            .finish()
    }
}

impl IovaRange {
    /// The first IOVA.
    pub fn iova(&self) -> Iova {
        self.base
    }
    /// Pages reserved.
    pub fn pages(&self) -> u64 {
        self.pages
    }
    /// The domain.
    pub fn domain(&self) -> &Arc<Domain> {
        &self.domain
    }

    fn check(&self, index: u64, n: u64) -> Result<Iova, IommuError> {
        if index.checked_add(n).is_none_or(|end| end > self.pages) {
            return Err(IommuError::OutOfRange {
                group: self.domain.id,
                index: index.saturating_add(n.saturating_sub(1)),
                pages: self.pages,
            });
        }
        Ok(Iova(self.base.0 + index * PAGE_SIZE))
    }

    /// Links pages `index..index + frames.len()` of the range to `frames`
    /// (`dma_iova_link`). Refused, with nothing linked, when any of them is linked
    /// already.
    pub fn link(&self, index: u64, frames: &[Pfn], perm: IoPerm) -> Result<(), IommuError> {
        let at = self.check(index, frames.len() as u64)?;
        let mut t = self.domain.table.lock();
        for i in 0..frames.len() as u64 {
            let va = VirtAddr(at.0 + i * PAGE_SIZE);
            if !t.get(va).is_empty() {
                return Err(IommuError::AlreadyLinked {
                    group: self.domain.id,
                    iova: Iova(va.0),
                });
            }
        }
        t.fill(VirtAddr(at.0), frames.len() as u64, |i| {
            Pte::present(frames[i as usize], perm.write)
        });
        Ok(())
    }

    /// Unlinks `n` pages from `index` (`dma_iova_unlink`); pages not linked are fine.
    pub fn unlink(&self, index: u64, n: u64) -> Result<(), IommuError> {
        let at = self.check(index, n)?;
        self.domain.unmap(at, n);
        Ok(())
    }
}

impl Drop for IovaRange {
    fn drop(&mut self) {
        self.domain.unmap(self.base, self.pages);
        self.domain.free_iova(self.base, self.pages);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// IOVA ranges are aligned, never overlap while held, and come back for reuse.
        #[test]
        fn iova_ranges_are_aligned_disjoint_and_reused(ops in proptest::collection::vec((1u64..64, 0u32..5, any::<bool>()), 1..100)) {
            let d = Domain::new(IommuGroup(0));
            let mut held: Vec<(u64, u64)> = Vec::new();
            for (pages, align_log, free) in ops {
                if free && !held.is_empty() {
                    let (a, n) = held.remove(0);
                    d.free_iova(Iova(a), n);
                    continue;
                }
                let align = 1u64 << align_log;
                let a = d.alloc_iova(pages, align).unwrap();
                prop_assert_eq!((a.0 >> PAGE_SHIFT) % align, 0);
                prop_assert!(a.0 >= 1 << 32);
                let (s, e) = (a.0, a.0 + pages * PAGE_SIZE);
                for &(hs, hn) in &held {
                    prop_assert!(e <= hs || s >= hs + hn * PAGE_SIZE, "overlap");
                }
                held.push((a.0, pages));
            }
            let total: u64 = held.iter().map(|h| h.1).sum();
            prop_assert_eq!(d.allocated_iova_pages(), total);
            for (a, n) in held.drain(..) {
                d.free_iova(Iova(a), n);
            }
            prop_assert_eq!(d.allocated_iova_pages(), 0);
            // Freed space is reused: the first allocation lands at the base again.
            prop_assert_eq!(d.alloc_iova(1, 1), Ok(Iova(IOVA_BASE_PAGE << PAGE_SHIFT)));
        }
    }

    #[test]
    fn translation_follows_the_table_and_its_permissions() {
        let d = Domain::new(IommuGroup(3));
        let iova = d.alloc_iova(2, 1).unwrap();
        d.map(
            iova,
            &[Pfn(10), Pfn(20)],
            IoPerm {
                read: true,
                write: false,
            },
        );
        assert_eq!(
            d.translate(Iova(iova.0 + PAGE_SIZE + 5)).unwrap().0,
            Pfn(20)
        );
        assert!(!d.translate(iova).unwrap().1.write);
        assert_eq!(d.mapped_pages(), 2);
        d.unmap(iova, 2);
        assert_eq!(d.translate(iova), None);
    }

    #[test]
    fn a_reservation_links_and_unlinks_pages_one_at_a_time() {
        let d = Arc::new(Domain::new(IommuGroup(1)));
        let rw = IoPerm {
            read: true,
            write: true,
        };
        let r = d.reserve(4, 1).unwrap();
        assert_eq!((d.allocated_iova_pages(), d.mapped_pages()), (4, 0));
        r.link(2, &[Pfn(7)], rw).unwrap();
        r.link(0, &[Pfn(5), Pfn(6)], rw).unwrap();
        assert_eq!(
            d.translate(Iova(r.iova().0 + 2 * PAGE_SIZE)).unwrap().0,
            Pfn(7)
        );
        assert_eq!(d.translate(Iova(r.iova().0 + 3 * PAGE_SIZE)), None);
        // A linked page is not linked again, and nothing of the refused run is.
        assert_eq!(
            r.link(1, &[Pfn(8), Pfn(9)], rw).unwrap_err(),
            IommuError::AlreadyLinked {
                group: IommuGroup(1),
                iova: Iova(r.iova().0 + PAGE_SIZE)
            }
        );
        assert_eq!(d.mapped_pages(), 3);
        assert_eq!(r.link(3, &[Pfn(1), Pfn(2)], rw).unwrap_err().errno(), 34);
        r.unlink(1, 2).unwrap();
        assert_eq!(d.translate(Iova(r.iova().0 + PAGE_SIZE)), None);
        assert_eq!(d.mapped_pages(), 1);
        drop(r);
        assert_eq!((d.allocated_iova_pages(), d.mapped_pages()), (0, 0));
    }
}
