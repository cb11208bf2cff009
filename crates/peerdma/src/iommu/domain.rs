//! One IOMMU translation domain: an IOVA allocator and an IO page table. The IO page
//! table is the same four-level radix table the CPU side uses; an entry's presence
//! grants read and its write bit grants write (a write-only mapping is kept readable
//! here, and the DMA engine refuses the read by the mapping's direction).

use crate::addr::{DmaAddr, Pfn, VirtAddr, PAGE_SHIFT, PAGE_SIZE};
use crate::mem::alloc::FreeRuns;
use crate::mm::{PageTable, Pte};
use crate::sync::{lock, Mutex};

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
    id: u32,
    /// Lock order: `iova` before `table`, both leaves otherwise.
    iova: Mutex<FreeRuns>,
    table: Mutex<PageTable>,
}

impl std::fmt::Debug for Domain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Domain").field("group", &self.id).finish()
    }
}

impl Domain {
    pub(crate) fn new(id: u32) -> Self {
        Domain {
            id,
            iova: Mutex::new(FreeRuns::new(IOVA_PAGES)),
            table: Mutex::new(PageTable::new()),
        }
    }

    /// The IOMMU group this domain serves.
    pub fn group(&self) -> u32 {
        self.id
    }

    /// Allocates `pages` IOVA pages aligned to `align_pages` (a power of two); `None`
    /// when the space is exhausted.
    pub fn alloc_iova(&self, pages: u64, align_pages: u64) -> Option<DmaAddr> {
        let idx = lock(&self.iova).alloc_contig(pages, align_pages)?;
        Some(DmaAddr((IOVA_BASE_PAGE + idx) << PAGE_SHIFT))
    }

    /// Returns an IOVA range to the allocator (its entries must be unmapped first).
    pub fn free_iova(&self, iova: DmaAddr, pages: u64) {
        let idx = (iova.0 >> PAGE_SHIFT) - IOVA_BASE_PAGE;
        lock(&self.iova).free_run(idx, pages);
    }

    /// Maps consecutive IOVA pages from `iova` to `frames`.
    pub fn map(&self, iova: DmaAddr, frames: &[Pfn], perm: IoPerm) {
        let mut t = lock(&self.table);
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
    pub fn unmap(&self, iova: DmaAddr, pages: u64) {
        let base = iova.0 & !(PAGE_SIZE - 1);
        lock(&self.table).walk_mut(
            VirtAddr(base),
            VirtAddr(base + pages * PAGE_SIZE),
            |_, p| *p = Pte::EMPTY,
        );
    }

    /// The frame and permission behind the page of `iova`.
    pub fn translate(&self, iova: DmaAddr) -> Option<(Pfn, IoPerm)> {
        let pte = lock(&self.table).get(VirtAddr(iova.0 & !(PAGE_SIZE - 1)));
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
    pub fn translates_to(&self, iova: DmaAddr, frames: &[Pfn], write: bool) -> bool {
        let t = lock(&self.table);
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
        lock(&self.table).entries() as usize
    }

    /// IOVA pages currently handed out.
    pub fn allocated_iova_pages(&self) -> u64 {
        IOVA_PAGES - lock(&self.iova).free()
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
            let d = Domain::new(0);
            let mut held: Vec<(u64, u64)> = Vec::new();
            for (pages, align_log, free) in ops {
                if free && !held.is_empty() {
                    let (a, n) = held.remove(0);
                    d.free_iova(DmaAddr(a), n);
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
                d.free_iova(DmaAddr(a), n);
            }
            prop_assert_eq!(d.allocated_iova_pages(), 0);
            // Freed space is reused: the first allocation lands at the base again.
            prop_assert_eq!(d.alloc_iova(1, 1), Some(DmaAddr(IOVA_BASE_PAGE << PAGE_SHIFT)));
        }
    }

    #[test]
    fn translation_follows_the_table_and_its_permissions() {
        let d = Domain::new(3);
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
            d.translate(DmaAddr(iova.0 + PAGE_SIZE + 5)).unwrap().0,
            Pfn(20)
        );
        assert!(!d.translate(iova).unwrap().1.write);
        assert_eq!(d.mapped_pages(), 2);
        d.unmap(iova, 2);
        assert_eq!(d.translate(iova), None);
    }
}
