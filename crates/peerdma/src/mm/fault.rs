//! Resolving one page for an access: zero-fill and shared-object faults, write faults
//! that reuse an exclusive page or copy a shared one, the "unshare" fault a read-only
//! pin needs, migration of a device-private page back to RAM on CPU access, and the
//! migration primitive itself.
//!
//! Every path that replaces a present entry drops the page-table lock, runs the
//! invalidation, retakes the lock and re-checks the entry before changing it: the
//! invalidation callbacks may sleep, and the entry may have changed meanwhile.

use crate::addr::{Pfn, VirtAddr, PAGE_SIZE};
use crate::mem::{flags, Region, RegionKind};
use crate::mm::page_table::PageTable;
use crate::mm::pte::Pte;
use crate::mm::space::Mm;
use crate::mm::vma::{VmaKind, Vmas};
use crate::mm::MmError;
use crate::notifier::NotifyEvent;
use crate::sync::{lock, Arc};

/// What the caller needs of a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Read it.
    Read,
    /// Write it (breaks copy-on-write).
    Write,
    /// Read it, holding it stably: a read-only pin. An anonymous page must be exclusive
    /// to this address space first (the kernel's `FAULT_FLAG_UNSHARE`).
    Unshare,
}

enum Fix {
    Populate,
    FromDevice(Pte),
    MakeWritable,
    Copy { old: Pfn, writable: bool },
    MarkExclusive(Pfn),
}

impl Mm {
    /// Makes the page at `va` satisfy `access`, then calls `f` with the page table
    /// locked and the frame, and returns its result. The caller holds the address-space
    /// lock shared (`vmas`).
    pub(crate) fn with_page<R>(
        &self,
        vmas: &Vmas,
        va: VirtAddr,
        access: Access,
        op: &'static str,
        f: impl FnOnce(&mut PageTable, Pfn) -> R,
    ) -> Result<R, MmError> {
        let vma = vmas.find(va).ok_or(MmError::Fault {
            op,
            addr: va,
            why: "no mapping",
        })?;
        if !vma.prot.readable() || (access == Access::Write && !vma.prot.writable()) {
            return Err(MmError::Access {
                op,
                addr: va,
                why: if vma.prot.readable() {
                    "the mapping is read-only"
                } else {
                    "the mapping is PROT_NONE"
                },
            });
        }
        let mut f = Some(f);
        loop {
            let fix = {
                let mut pt = lock(&self.pt);
                let pte = pt.get(va);
                let fix = if pte.is_empty() {
                    Fix::Populate
                } else if pte.is_device_private() {
                    Fix::FromDevice(pte)
                } else {
                    let pfn = pte.pfn().unwrap_or_else(|| unreachable!("present PTE"));
                    match (access, vma.is_anon()) {
                        (Access::Write, _) if pte.writable() => {
                            return Ok(f
                                .take()
                                .map(|f| f(&mut pt, pfn))
                                .unwrap_or_else(|| unreachable!()));
                        }
                        (Access::Write, false) => Fix::MakeWritable,
                        (Access::Write, true) => {
                            if self.reusable(pfn) {
                                Fix::MakeWritable
                            } else {
                                Fix::Copy {
                                    old: pfn,
                                    writable: true,
                                }
                            }
                        }
                        (Access::Unshare, true) if !self.is_exclusive(pfn) => {
                            if self.reusable(pfn) {
                                Fix::MarkExclusive(pfn)
                            } else {
                                Fix::Copy {
                                    old: pfn,
                                    writable: pte.writable(),
                                }
                            }
                        }
                        _ => {
                            return Ok(f
                                .take()
                                .map(|f| f(&mut pt, pfn))
                                .unwrap_or_else(|| unreachable!()));
                        }
                    }
                };
                match fix {
                    Fix::MakeWritable => {
                        if vma.is_anon() {
                            self.region(pte.pfn().unwrap_or_else(|| unreachable!()))
                                .meta(pte.pfn().unwrap_or_else(|| unreachable!()))
                                .set(flags::ANON_EXCLUSIVE);
                        }
                        pt.set(va, pte.mkwrite());
                        continue;
                    }
                    Fix::MarkExclusive(pfn) => {
                        self.region(pfn).meta(pfn).set(flags::ANON_EXCLUSIVE);
                        continue;
                    }
                    other => other,
                }
            };
            match fix {
                Fix::Populate => self.populate(vma, va, op)?,
                Fix::FromDevice(pte) => {
                    self.migrate_entry(va, pte, None, true, op)?;
                }
                Fix::Copy { old, writable } => self.copy_page(va, old, writable, op)?,
                Fix::MakeWritable | Fix::MarkExclusive(_) => unreachable!(),
            }
        }
    }

    /// An anonymous page may be reused for writing when it is exclusive, or when this
    /// mapping holds its only reference (so no pin and no other address space).
    fn reusable(&self, pfn: Pfn) -> bool {
        let m = self.region(pfn);
        let meta = m.meta(pfn);
        meta.test(flags::ANON_EXCLUSIVE) || meta.refcount() == 1
    }

    /// Fills an empty entry: a fresh zeroed page for anonymous memory, the object's page
    /// for a shared mapping.
    fn populate(
        &self,
        vma: &crate::mm::Vma,
        va: VirtAddr,
        op: &'static str,
    ) -> Result<(), MmError> {
        let (pfn, exclusive) = match &vma.kind {
            VmaKind::Anon => (
                self.phys
                    .ram()
                    .alloc()
                    .map_err(|e| MmError::nomem(op, va, e))?,
                true,
            ),
            VmaKind::Shared { obj, pgoff } => {
                let idx = pgoff + (va.0 - vma.start.0) / PAGE_SIZE;
                let pfn = obj
                    .page(idx)
                    .map_err(|e| MmError::nomem(op, va, e))?
                    .ok_or(MmError::Fault {
                        op,
                        addr: va,
                        why: "beyond the end of the shared object",
                    })?;
                self.phys.ram().get(pfn);
                (pfn, false)
            }
            VmaKind::Pages { .. } => {
                return Err(MmError::Fault {
                    op,
                    addr: va,
                    why: "no device page inserted here",
                })
            }
        };
        let region = self.region(pfn);
        if exclusive {
            region.meta(pfn).set(flags::ANON_EXCLUSIVE);
        }
        let mut pt = lock(&self.pt);
        if pt.get(va).is_empty() {
            // Anonymous pages are exclusive when new; shared ones need no COW: both
            // map writable when the VMA allows it.
            pt.set(va, Pte::present(pfn, vma.prot.writable()));
        } else {
            drop(pt);
            region.put(pfn); // raced with another fault: theirs stands
        }
        Ok(())
    }

    /// Breaks copy-on-write (or unshares): copies `old` into a fresh exclusive page and
    /// swaps it in after invalidating the page.
    fn copy_page(
        &self,
        va: VirtAddr,
        old: Pfn,
        writable: bool,
        op: &'static str,
    ) -> Result<(), MmError> {
        let ram = self.phys.ram();
        let new = ram.alloc().map_err(|e| MmError::nomem(op, va, e))?;
        self.region(old).copy_frame(old, ram, new);
        ram.meta(new).set(flags::ANON_EXCLUSIVE);
        let guard = self.invalidate(op, va, VirtAddr(va.0 + PAGE_SIZE), NotifyEvent::Clear)?;
        let mut pt = lock(&self.pt);
        let cur = pt.get(va);
        let swapped = cur.is_present() && cur.pfn() == Some(old);
        if swapped {
            pt.set(va, Pte::present(new, writable));
        }
        drop(pt);
        drop(guard);
        if swapped {
            self.region(old).put(old);
        } else {
            ram.put(new);
        }
        Ok(())
    }

    /// Moves the page behind entry `pte` at `va` to a fresh frame of `target` (system RAM
    /// when `None`): copy, invalidate (`Migrate`), swap the entry, drop the old frame
    /// (freeing it bumps its generation). Refused while the old frame is pinned, or,
    /// unless `copy_out`, referenced by anything but this entry. With `copy_out` (a CPU
    /// fault on a device-private page that fork left shared) this address space gets
    /// its own copy and the others keep the device page.
    fn migrate_entry(
        &self,
        va: VirtAddr,
        pte: Pte,
        target: Option<&Arc<Region>>,
        copy_out: bool,
        op: &'static str,
    ) -> Result<Pfn, MmError> {
        let old = pte.pfn().ok_or(MmError::Fault {
            op,
            addr: va,
            why: "no page to migrate",
        })?;
        let src = self.region(old);
        let busy = |why| MmError::Busy { op, addr: va, why };
        let movable = |src: &Region| {
            let m = src.meta(old);
            if m.pincount() > 0 {
                Err(busy("the page is DMA-pinned"))
            } else if m.refcount() != 1 && !copy_out {
                Err(busy(
                    "the page is referenced elsewhere (shared after fork, or in use)",
                ))
            } else {
                Ok(())
            }
        };
        movable(&src)?;
        let dst = target.unwrap_or(self.phys.ram());
        let new = dst.alloc().map_err(|e| MmError::nomem(op, va, e))?;
        src.copy_frame(old, dst, new);
        let guard = match self.invalidate(op, va, VirtAddr(va.0 + PAGE_SIZE), NotifyEvent::Migrate)
        {
            Ok(g) => g,
            Err(e) => {
                dst.put(new);
                return Err(e);
            }
        };
        let mut pt = lock(&self.pt);
        let result = if pt.get(va) != pte {
            Err(busy("the page changed during migration"))
        } else {
            movable(&src).map(|()| {
                let writable = pte.writable();
                let entry = if matches!(dst.kind(), RegionKind::DevicePrivate { .. }) {
                    Pte::device(new, writable)
                } else {
                    Pte::present(new, writable)
                };
                dst.meta(new).set(flags::ANON_EXCLUSIVE);
                pt.set(va, entry);
            })
        };
        drop(pt);
        drop(guard);
        tracing::debug!(mm = self.id().0, va = %va, old = %old, new = %new, ok = result.is_ok(), "migrate page");
        match result {
            Ok(()) => {
                // The contents moved: the old frame's identity changes now, whoever
                // still holds it (with `copy_out`, the other sharers keep the frame and
                // its identity).
                if !copy_out {
                    src.bump_generation(old);
                }
                src.put(old);
                Ok(new)
            }
            Err(e) => {
                dst.put(new);
                Err(e)
            }
        }
    }

    /// Moves the page at `va` to system RAM (a long-term pin of device-coherent memory).
    /// `_held` is the caller's shared hold of the address-space lock.
    pub(crate) fn migrate_to_ram(
        &self,
        _held: &Vmas,
        va: VirtAddr,
        op: &'static str,
    ) -> Result<Pfn, MmError> {
        let pte = lock(&self.pt).get(va);
        self.migrate_entry(va, pte, None, false, op)
    }

    /// Migrates the anonymous page at `va` to a fresh frame of `target` (system RAM, a
    /// device-coherent region, or a device-private one, after which the CPU faults it
    /// back on access). Returns the new frame. EBUSY while the page is pinned or shared;
    /// EINVAL for non-anonymous mappings.
    pub fn migrate_page(&self, va: VirtAddr, target: &Arc<Region>) -> Result<Pfn, MmError> {
        let op = "migrate";
        let va = VirtAddr(va.0 & !(PAGE_SIZE - 1));
        let vmas = self.mmap_read();
        let vma = vmas.find(va).ok_or(MmError::Fault {
            op,
            addr: va,
            why: "no mapping",
        })?;
        if !vma.is_anon() {
            return Err(MmError::Invalid {
                op,
                addr: va,
                len: PAGE_SIZE,
                why: "only private anonymous pages migrate",
            });
        }
        if matches!(target.kind(), RegionKind::P2p { .. }) {
            return Err(MmError::Invalid {
                op,
                addr: va,
                len: PAGE_SIZE,
                why: "p2p memory is not a migration target",
            });
        }
        let pte = lock(&self.pt).get(va);
        if pte.is_empty() {
            return Err(MmError::Fault {
                op,
                addr: va,
                why: "the page is not populated",
            });
        }
        self.migrate_entry(va, pte, Some(target), false, op)
    }
}
