//! fork(): the child gets a copy of every VMA. Shared mappings share their pages, and
//! private ones their zero page and file pages (read-only already). Private anonymous
//! pages are shared copy-on-write, except a page that may be
//! DMA-pinned, which the child gets a copy of right away so the parent's pinned page
//! stays writable and coherent with DMA (`page_needs_cow_for_dma()`).

use crate::addr::{Pfn, VirtAddr};
use crate::mem::flags;
use crate::mm::pte::Pte;
use crate::mm::space::Mm;
use crate::mm::vma::VmaKind;
use crate::mm::MmError;
use crate::notifier::NotifyEvent;
use crate::sync::Arc;

impl Mm {
    /// Forks the address space; returns the child's.
    pub fn fork(&self) -> Result<Arc<Mm>, MmError> {
        let op = "fork";
        let vmas = self.mmap.write();
        let child = Mm::new(&self.phys);
        // Write-protecting the parent's anonymous entries is a protection change its
        // subscribers must hear of first.
        let mut guards = Vec::new();
        for v in vmas.iter().filter(|v| v.is_private()) {
            guards.push(self.invalidate(op, v.start, v.end, NotifyEvent::ProtectionChange)?);
        }
        let has_pinned = self.has_pinned.load(crate::sync::atomic::Ordering::Acquire);
        let mut copies: Vec<(VirtAddr, Pfn, Pfn, bool)> = Vec::new();
        let mut child_entries: Vec<(VirtAddr, Pte)> = Vec::new();
        {
            let mut pt = self.pt.lock();
            for v in vmas.iter() {
                let private = v.is_private();
                let writable = v.prot.writable();
                pt.walk_mut(v.start, v.end, |va, pte| {
                    let Some(pfn) = pte.pfn() else { return };
                    if pte.is_device_exclusive() {
                        // Exclusivity is lost on fork: the parent's entry is restored
                        // (its device heard the fork's invalidation) and copied.
                        *pte = Pte::present(pfn, pte.writable());
                    }
                    let region = self.region(pfn);
                    // Shared mappings share their pages; so do private ones their
                    // zero page and file pages, which are mapped read-only already.
                    let anon = private
                        && !region
                            .meta(pfn)
                            .test_any(flags::RESERVED | flags::PAGECACHE);
                    if !anon {
                        region.get(pfn);
                        child_entries.push((va, *pte));
                        return;
                    }
                    if pte.is_present() && has_pinned && region.maybe_dma_pinned(pfn) {
                        // Copied below, outside the lock.
                        copies.push((va, pfn, Pfn(0), writable));
                        return;
                    }
                    region.get(pfn);
                    region.meta(pfn).clear(flags::ANON_EXCLUSIVE);
                    *pte = pte.wrprotect();
                    child_entries.push((va, *pte));
                });
            }
        }
        // The pinned pages cannot change under us: the parent's address-space lock is
        // held exclusively and a pin keeps the frame.
        let ram = self.phys.ram();
        for c in &mut copies {
            let new = ram.alloc().map_err(|e| MmError::nomem(op, c.0, e))?;
            self.region(c.1).copy_frame(c.1, ram, new);
            ram.meta(new).set(flags::ANON_EXCLUSIVE);
            c.2 = new;
        }
        drop(guards);
        {
            let mut cpt = child.pt.lock();
            for (va, pte) in child_entries {
                cpt.set(va, pte);
            }
            for (va, _, new, writable) in copies {
                cpt.set(va, Pte::present(new, writable));
            }
        }
        *child.mmap.write() = vmas.clone();
        for v in vmas.iter() {
            if let VmaKind::Pages { owner: Some(owner) } = &v.kind {
                owner.0.forked(&child, v.start, v.end.0 - v.start.0);
            }
        }
        Ok(child)
    }
}
