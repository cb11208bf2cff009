//! Resolving one page for an access: zero-fill and shared-object faults, write faults
//! that reuse an exclusive page or copy a shared one, the "unshare" fault a read-only
//! pin needs, migration of a device-private page back to RAM on CPU access, and the
//! migration primitive itself.
//!
//! Every path that replaces a present entry drops the page-table lock, runs the
//! invalidation, retakes the lock and re-checks the entry before changing it: the
//! invalidation callbacks may sleep, and the entry may have changed meanwhile.

use crate::addr::{Pfn, VirtAddr, PAGE_SIZE};
use crate::mem::{flags, Region};
use crate::mm::migrate::Select;
use crate::mm::page_table::PageTable;
use crate::mm::pte::Pte;
use crate::mm::space::Mm;
use crate::mm::vma::{VmaKind, Vmas};
use crate::mm::MmError;
use crate::notifier::NotifyEvent;
use crate::sync::Arc;

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
    /// A migration entry: wait for the frame's page lock, then retry.
    Wait(Arc<Region>, Pfn),
    MakeWritable,
    /// Break copy-on-write; the walk took a reference on `old` (held in `region`'s
    /// counts) under the page-table lock, so the page cannot be freed or made
    /// exclusive by anyone else while it is copied.
    Copy {
        old: Pfn,
        region: Arc<Region>,
        writable: bool,
    },
    MarkExclusive(Pfn),
}

/// How one attempt at migrating an entry ended, short of an error.
pub(crate) enum Migrated {
    /// The page moved to this frame.
    To(Pfn),
    /// The entry is not the one the caller saw any more: look again.
    Changed,
    /// Another migration holds the page: wait for its page lock, then look again.
    Locked(Arc<Region>, Pfn),
}

impl Migrated {
    /// Waits out a migration in progress; true when the page moved (the caller is done).
    fn settle(self) -> Option<Pfn> {
        match self {
            Migrated::To(p) => Some(p),
            Migrated::Changed => None,
            Migrated::Locked(region, pfn) => {
                region.wait_page_unlocked(pfn);
                None
            }
        }
    }
}

impl Mm {
    /// `handle_mm_fault(va, flags)`: resolves a fault at `va` as the CPU (or a device
    /// faulting through HMM or ODP) would meet it — populates an empty entry, breaks
    /// copy-on-write for a write, makes an anonymous page exclusive for `Unshare`,
    /// brings a device-private page back to RAM, waits out a migration — and returns
    /// the frame now mapped there. EFAULT where nothing is mapped, EACCES where the
    /// mapping forbids the access. Takes the address-space lock shared; the same path
    /// CPU reads and writes and GUP's slow path take.
    pub fn handle_mm_fault(&self, va: VirtAddr, access: Access) -> Result<Pfn, MmError> {
        let va = VirtAddr(va.0 & !(PAGE_SIZE - 1));
        let vmas = self.mmap_read();
        self.with_page(&vmas, va, access, "handle_mm_fault", |_, pfn| pfn)
    }

    /// Makes the page at `va` satisfy `access`, then calls `f` with the page table
    /// locked and the frame, and returns its result. The caller holds the address-space
    /// lock shared (`vmas`). A fault that races another fault or a migration of the same
    /// page waits for it and retries, as the kernel's fault handler does; it never
    /// reports the race.
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
                let mut pt = self.pt.lock();
                let pte = pt.get(va);
                let fix = if pte.is_empty() {
                    Fix::Populate
                } else if pte.is_migration() {
                    let pfn = pte.pfn().unwrap_or_else(|| unreachable!("non-empty PTE"));
                    Fix::Wait(self.region(pfn), pfn)
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
                                self.copy_fix(pfn, true)
                            }
                        }
                        (Access::Unshare, true) if !self.is_exclusive(pfn) => {
                            if self.reusable(pfn) {
                                Fix::MarkExclusive(pfn)
                            } else {
                                self.copy_fix(pfn, pte.writable())
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
                Fix::Wait(region, pfn) => region.wait_page_unlocked(pfn),
                Fix::FromDevice(pte) => {
                    let ram = self.phys.ram().clone();
                    self.migrate_entry(va, Some(pte), &ram, true, op)?.settle();
                }
                Fix::Copy {
                    old,
                    region,
                    writable,
                } => self.copy_page(va, old, &region, writable, op)?,
                Fix::MakeWritable | Fix::MarkExclusive(_) => unreachable!(),
            }
        }
    }

    /// Decides a copy-on-write break of `old`, taking the reference the copy holds
    /// (`wp_page_copy()` holds one on the old page). Called under the page-table lock.
    fn copy_fix(&self, old: Pfn, writable: bool) -> Fix {
        let region = self.region(old);
        region.get(old);
        Fix::Copy {
            old,
            region,
            writable,
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
        let mut pt = self.pt.lock();
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
    /// swaps it in after invalidating the page. The caller's reference on `old` (taken
    /// when the break was decided) keeps the page from being freed, reused or made
    /// exclusive while it is copied; this drops it.
    fn copy_page(
        &self,
        va: VirtAddr,
        old: Pfn,
        region: &Region,
        writable: bool,
        op: &'static str,
    ) -> Result<(), MmError> {
        let ram = self.phys.ram();
        let new = match ram.alloc() {
            Ok(p) => p,
            Err(e) => {
                region.put(old);
                return Err(MmError::nomem(op, va, e));
            }
        };
        region.copy_frame(old, ram, new);
        ram.meta(new).set(flags::ANON_EXCLUSIVE);
        let guard = match self.invalidate(op, va, VirtAddr(va.0 + PAGE_SIZE), NotifyEvent::Clear) {
            Ok(g) => g,
            Err(e) => {
                ram.put(new);
                region.put(old);
                return Err(e);
            }
        };
        let mut pt = self.pt.lock();
        let cur = pt.get(va);
        let swapped = cur.is_present() && cur.pfn() == Some(old);
        if swapped {
            pt.set(va, Pte::present(new, writable));
        }
        drop(pt);
        drop(guard);
        if swapped {
            region.put(old); // the entry's reference
        } else {
            ram.put(new); // another fault got there first: theirs stands
        }
        region.put(old); // the copy's reference
        Ok(())
    }

    /// One attempt at moving the page behind the entry at `va` to a fresh frame of
    /// `dst`, as mm/migrate.c does it: invalidate (`Migrate`); under the page-table
    /// lock check the entry (against `expected`, when given) and that nothing but the
    /// entry references the frame (unless `copy_out`), take the frame's page lock and a
    /// reference, and replace the entry with a migration entry (faults and GUP now wait);
    /// copy; install the new entry; unlock and drop the old frame (its generation
    /// changes: a DMA mapping of it is now stale). Refused while the old frame is
    /// pinned. With `copy_out` (a CPU fault on a device-private page that fork left
    /// shared) this address space gets its own copy and the others keep the device page.
    /// The caller holds the address-space lock shared.
    pub(crate) fn migrate_entry(
        &self,
        va: VirtAddr,
        expected: Option<Pte>,
        dst: &Arc<Region>,
        copy_out: bool,
        op: &'static str,
    ) -> Result<Migrated, MmError> {
        let busy = |why| MmError::Busy { op, addr: va, why };
        let new = dst.alloc().map_err(|e| MmError::nomem(op, va, e))?;
        let guard = match self.invalidate(op, va, VirtAddr(va.0 + PAGE_SIZE), NotifyEvent::Migrate)
        {
            Ok(g) => g,
            Err(e) => {
                dst.put(new);
                return Err(e);
            }
        };
        // Phase 1, under the page-table lock: check, lock the page, install the
        // migration entry. No reference can be taken through the entry after this.
        let taken = {
            let mut pt = self.pt.lock();
            let pte = pt.get(va);
            (|| {
                if expected.is_some_and(|e| e != pte) {
                    return Ok(Err(Migrated::Changed));
                }
                let old = pte.pfn().ok_or(MmError::Fault {
                    op,
                    addr: va,
                    why: "the page is not populated",
                })?;
                let src = self.region(old);
                if pte.is_migration() {
                    return Ok(Err(Migrated::Locked(src, old)));
                }
                let m = src.meta(old);
                if m.pincount() > 0 {
                    return Err(busy("the page is DMA-pinned"));
                }
                if m.refcount() != 1 && !copy_out {
                    return Err(busy(
                        "the page is referenced elsewhere (shared after fork, or in use)",
                    ));
                }
                if !src.trylock_page(old) {
                    return Ok(Err(Migrated::Locked(src, old)));
                }
                src.get(old);
                pt.set(va, Pte::migration(old, pte.writable()));
                Ok(Ok((src, old, pte)))
            })()
        };
        let (src, old, pte) = match taken {
            Ok(Ok(t)) => t,
            Ok(Err(outcome)) => {
                drop(guard);
                dst.put(new);
                return Ok(outcome);
            }
            Err(e) => {
                drop(guard);
                dst.put(new);
                return Err(e);
            }
        };
        // Phase 2: the copy. Nobody can write the old frame: no entry maps it, it is
        // not pinned, and every other reference (a fork's sharer, with `copy_out`)
        // meets the page lock first.
        src.copy_frame(old, dst, new);
        dst.meta(new).set(flags::ANON_EXCLUSIVE);
        // Phase 3: the new entry. Only the holder of the page lock changes a migration
        // entry, and munmap, fork and exit wait for the address-space lock the caller
        // holds, so the entry is still ours.
        {
            let mut pt = self.pt.lock();
            debug_assert_eq!(pt.get(va), Pte::migration(old, pte.writable()));
            let entry = if dst.kind().is_device_private() {
                Pte::device(new, pte.writable())
            } else {
                Pte::present(new, pte.writable())
            };
            pt.set(va, entry);
        }
        drop(guard);
        tracing::debug!(mm = self.id().0, va = %va, old = %old, new = %new, "migrate page");
        // The contents moved: the old frame's identity changes now, whoever still
        // holds it (with `copy_out`, the other sharers keep the frame and its identity).
        if !copy_out {
            src.bump_generation(old);
        }
        src.unlock_page(old);
        src.put(old); // the migration's reference
        src.put(old); // the old entry's
        Ok(Migrated::To(new))
    }

    /// Moves the page at `va` to system RAM (a long-term pin of device-coherent memory).
    /// `_held` is the caller's shared hold of the address-space lock. A race with
    /// another migration of the page is waited out and reported as success: the caller
    /// looks at the page again either way.
    pub(crate) fn migrate_to_ram(
        &self,
        _held: &Vmas,
        va: VirtAddr,
        op: &'static str,
    ) -> Result<(), MmError> {
        let ram = self.phys.ram().clone();
        self.migrate_entry(va, None, &ram, false, op)?.settle();
        Ok(())
    }

    /// Migrates the anonymous page at `va` to a fresh frame of `target` (system RAM, a
    /// device-coherent region, or a device-private one, after which the CPU faults it
    /// back on access). Returns the new frame. EBUSY while the page is pinned or
    /// referenced by anything but its entry (shared after fork, held by
    /// `get_user_pages`); EINVAL for non-anonymous mappings; EFAULT when nothing is
    /// mapped there. A migration of the same page in progress is waited for, and then
    /// the page is moved again from wherever that one put it. A one-page use of
    /// [`Mm::migrate_vma_setup`] in which this address space does the copy.
    pub fn migrate_page(&self, va: VirtAddr, target: &Arc<Region>) -> Result<Pfn, MmError> {
        let op = "migrate";
        let va = VirtAddr(va.0 & !(PAGE_SIZE - 1));
        {
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
        }
        if target.kind().is_p2p() {
            return Err(MmError::Invalid {
                op,
                addr: va,
                len: PAGE_SIZE,
                why: "p2p memory is not a migration target",
            });
        }
        let all = Select::SYSTEM | Select::DEVICE_PRIVATE | Select::DEVICE_COHERENT;
        let end = VirtAddr(va.0 + PAGE_SIZE);
        loop {
            let mut m = self.migrate_vma_setup(va, end, all, None)?;
            let src = m.src()[0];
            let Some(old) = src.pfn else {
                return Err(MmError::Fault {
                    op,
                    addr: va,
                    why: "the page is not populated",
                });
            };
            let region = self.region(old);
            if !src.migrate {
                if m.busy(0) {
                    drop(m);
                    region.wait_page_unlocked(old);
                    continue;
                }
                return Err(MmError::Busy {
                    op,
                    addr: va,
                    why: if region.meta(old).pincount() > 0 {
                        "the page is DMA-pinned"
                    } else {
                        "the page is referenced elsewhere (shared after fork, or in use)"
                    },
                });
            }
            let new = target.alloc().map_err(|e| MmError::nomem(op, va, e))?;
            region.copy_frame(old, target, new);
            m.set_dst(0, target, new);
            m.pages();
            let moved = m.src()[0].migrate;
            m.finalize();
            tracing::debug!(mm = self.id().0, va = %va, old = %old, new = %new, moved, "migrate page");
            if moved {
                return Ok(new);
            }
        }
    }
}
