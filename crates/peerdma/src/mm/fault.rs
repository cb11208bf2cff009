//! Resolving one page for an access: zero-fill and shared-object faults, write faults
//! that reuse an exclusive page or copy a shared one, the "unshare" fault a read-only
//! pin needs, and a device-private page handed to its owner's `migrate_to_ram` (with
//! the page-table lock dropped) to come back to RAM. Moving pages is
//! [`Mm::migrate_vma_setup`]'s job; the one-page helpers here use it.
//!
//! Every path that replaces a present entry drops the page-table lock, runs the
//! invalidation, retakes the lock and re-checks the entry before changing it: the
//! invalidation callbacks may sleep, and the entry may have changed meanwhile.

use crate::addr::{Pfn, VirtAddr, PAGE_SIZE};
use crate::mem::{flags, Region};
use crate::mm::migrate::{MigrateVma, OnePage, Select};
use crate::mm::page_table::PageTable;
use crate::mm::pte::Pte;
use crate::mm::space::Mm;
use crate::mm::vma::{VmaKind, Vmas};
use crate::mm::MmError;
use crate::notifier::NotifyEvent;
use crate::sync::{Arc, Held, RwLockReadGuard};

/// What the caller needs of a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Read it.
    Read,
    /// Write it (breaks copy-on-write).
    Write,
    /// Read it, holding it stably: a long-term read-only pin. In a private mapping the
    /// page must be an anonymous page exclusive to this address space first: a shared
    /// anonymous page is made exclusive or copied, and the zero page or a file's page is
    /// copied (the kernel's `FAULT_FLAG_UNSHARE`, as `gup_must_unshare` asks for
    /// `FOLL_LONGTERM`).
    Unshare,
    /// Read it for a short-term read-only pin: an anonymous page must be exclusive as
    /// for [`Access::Unshare`], but the zero page and a file's page are pinned where
    /// they are (`gup_must_unshare` without `FOLL_LONGTERM`). An empty entry is read
    /// faulted, so an untouched anonymous page pins the zero page.
    Pin,
}

impl Access {
    /// Whether a fault for it fills an empty entry as a read does (the zero page, a
    /// file's page) rather than with a page of this address space's own.
    fn reads(self) -> bool {
        matches!(self, Access::Read | Access::Pin)
    }
}

enum Fix {
    Populate,
    FromDevice(Pte),
    /// A device holds the page exclusively: tell it, then restore the entry.
    RestoreExclusive(Pte),
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

/// What the owner of a device-private page map does when a CPU access (or a fault for
/// a device of another owner) meets one of its pages (`dev_pagemap_ops.migrate_to_ram`).
pub trait MigrateToRam: Send + Sync {
    /// Move the faulting page to system RAM, normally with
    /// [`DeviceFault::migrate_vma`] and the owner's copy engine. Called with the
    /// address-space lock held shared and no page-table lock. The fault is retried
    /// afterwards, so returning `Ok` without moving the page (someone else moved it, or
    /// it is busy) is fine; an error fails the access (`VM_FAULT_SIGBUS`).
    fn migrate_to_ram(&self, fault: &DeviceFault<'_>) -> Result<(), MmError>;
}

/// The handler kept in a region for the fault path ([`set_migrate_to_ram`]).
struct FaultHandler(Arc<dyn MigrateToRam>);

/// Whether the page map's owner has a `migrate_to_ram`.
pub(crate) fn has_owner_ops(region: &Region) -> bool {
    region
        .upper()
        .is_some_and(|u| u.downcast_ref::<FaultHandler>().is_some())
}

/// Gives a device page map its owner's `migrate_to_ram`; once, at set-up. Refused
/// (false) for system RAM or when one is set already. Without one, a fault copies the
/// page with the CPU ([`DeviceFault::copy_to_ram`]).
pub fn set_migrate_to_ram(region: &Region, ops: Arc<dyn MigrateToRam>) -> bool {
    region.set_upper(Arc::new(FaultHandler(ops)))
}

/// A CPU fault (or a fault on behalf of a device of another owner) on a device-private
/// page, as its page map's owner gets it in [`MigrateToRam::migrate_to_ram`]
/// (the kernel's `struct vm_fault`). The address-space lock is held shared for the
/// fault's whole life; no page-table lock is.
///
/// # Invariants
/// `pte` was the entry at `va` when the fault decided to call the owner; it names a
/// frame of `region`.
pub struct DeviceFault<'a> {
    mm: &'a Mm,
    vmas: &'a Vmas,
    va: VirtAddr,
    pte: Pte,
    access: Access,
    region: Arc<Region>,
    op: &'static str,
}

impl std::fmt::Debug for DeviceFault<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceFault")
            .field("mm", &self.mm.id())
            .field("va", &self.va)
            .field("pte", &self.pte)
            .field("access", &self.access)
            .finish()
    }
}

impl<'a> DeviceFault<'a> {
    /// The faulting page's address.
    pub fn va(&self) -> VirtAddr {
        self.va
    }
    /// The device-private frame mapped there.
    pub fn pfn(&self) -> Pfn {
        self.pte
            .pfn()
            .unwrap_or_else(|| unreachable!("a device-private entry"))
    }
    /// The access that faulted.
    pub fn access(&self) -> Access {
        self.access
    }
    /// The faulting address space.
    pub fn mm(&self) -> &'a Mm {
        self.mm
    }
    /// The page's region.
    pub fn region(&self) -> &Arc<Region> {
        &self.region
    }

    /// `migrate_vma_setup()` over the faulting page (with the kernel's `fault_page`):
    /// selects device-private pages of `owner`, under the address-space lock the fault
    /// holds. The owner then copies from the collected source (`src()[0].pfn`, which
    /// may not be [`pfn`](Self::pfn): the page can have moved since the fault looked),
    /// sets the destination, and finalizes.
    pub fn migrate_vma(&self, owner: Option<u64>) -> Result<MigrateVma<'a>, MmError> {
        self.mm.migrate_vma_setup_locked(
            self.vmas,
            self.va,
            VirtAddr(self.va.0 + PAGE_SIZE),
            Select::DEVICE_PRIVATE,
            owner,
        )
    }

    /// Brings the page to system RAM with a CPU copy: by migration when the page is
    /// this address space's alone; when fork left it shared, this address space gets
    /// a copy of its own and the others keep the device page (peerdma has no reverse
    /// map to move every mapping at once, as the kernel does). Returns `Ok` when the
    /// page moved, or when another migration or fault got there first; the fault
    /// looks again either way.
    pub fn copy_to_ram(&self) -> Result<(), MmError> {
        let (mm, va, op) = (self.mm, self.va, self.op);
        let ram = mm.phys.ram();
        // As the page's owner: its pages are selected even when it has ops; but the
        // invalidation names no owner, so the owner's own mirror drops the page too
        // (the soak found a mirror keeping a page this copy had moved).
        let owner = self.region.kind().owner();
        let sel = Select::DEVICE_PRIVATE | Select::UNANNOUNCED_OWNER;
        match mm.migrate_one(self.vmas, va, ram, sel, owner, op) {
            // Moved, or raced: the fault looks again either way.
            Ok(_) | Err(MmError::Fault { .. }) => return Ok(()),
            Err(MmError::Busy { .. }) => {} // shared after fork: copied out below
            Err(e) => return Err(e),
        }
        // Shared after fork: a copy for this address space, as a COW break makes.
        let took = {
            let pt = mm.pt_lock();
            let same = pt.get(va) == self.pte;
            if same {
                self.region.get(self.pfn());
            }
            same
        };
        if took {
            mm.copy_page(
                va,
                self.pfn(),
                &self.region,
                self.pte.writable(),
                NotifyEvent::Migrate,
                op,
            )?;
        }
        Ok(())
    }
}

/// A page a device was just given for atomics ([`Mm::make_device_exclusive`]), locked
/// and referenced until dropped, as the kernel returns the folio, with the
/// address-space lock held shared as the kernel's caller holds it: the device maps it
/// while this lives; a CPU access that revokes it, and munmap and fork, wait for the
/// drop.
///
/// # Invariants
/// Holds the page lock and one reference on `pfn` of `region`.
pub struct ExclusivePage<'m> {
    /// The address-space lock, held shared until the device has mapped the page, as
    /// the kernel's caller holds it: munmap and fork wait for the mapping.
    _held: Held<RwLockReadGuard<'m, Vmas>>,
    region: Arc<Region>,
    pfn: Pfn,
}

impl std::fmt::Debug for ExclusivePage<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExclusivePage")
            .field("pfn", &self.pfn)
            .finish()
    }
}

impl ExclusivePage<'_> {
    /// The page.
    pub fn pfn(&self) -> Pfn {
        self.pfn
    }
}

impl Drop for ExclusivePage<'_> {
    fn drop(&mut self) {
        self.region.unlock_page(self.pfn);
        self.region.put(self.pfn);
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
                    let pfn = pte.pfn().unwrap_or_else(|| unreachable!("non-empty PTE"));
                    let region = self.region(pfn);
                    if region.meta(pfn).test(flags::LOCKED) {
                        // A migration that just installed this page still holds its
                        // lock while its device maps it (`do_swap_page`'s trylock
                        // failing): wait, then look again.
                        Fix::Wait(region, pfn)
                    } else {
                        Fix::FromDevice(pte)
                    }
                } else if pte.is_device_exclusive() {
                    let pfn = pte
                        .pfn()
                        .unwrap_or_else(|| unreachable!("a non-empty entry"));
                    self.region(pfn).get(pfn);
                    Fix::RestoreExclusive(pte)
                } else {
                    let pfn = pte.pfn().unwrap_or_else(|| unreachable!("present PTE"));
                    let private = vma.is_private();
                    // In a private mapping, the zero page and a file's pages are not
                    // anonymous: they are copied, never written or made exclusive.
                    let anon = private && self.is_anon_page(pfn);
                    match access {
                        Access::Write if pte.writable() => {
                            return Ok(f
                                .take()
                                .map(|f| f(&mut pt, pfn))
                                .unwrap_or_else(|| unreachable!()));
                        }
                        Access::Write if !private => Fix::MakeWritable,
                        Access::Write => {
                            if anon && self.reusable(pfn) {
                                Fix::MakeWritable
                            } else {
                                self.copy_fix(pfn, true)
                            }
                        }
                        Access::Unshare | Access::Pin if anon && !self.is_exclusive(pfn) => {
                            if self.reusable(pfn) {
                                Fix::MarkExclusive(pfn)
                            } else {
                                self.copy_fix(pfn, pte.writable())
                            }
                        }
                        Access::Unshare if private && !anon => self.copy_fix(pfn, false),
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
                        if vma.is_private() {
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
                Fix::Populate => self.populate(vma, va, access, op)?,
                Fix::Wait(region, pfn) => region.wait_page_unlocked(pfn),
                Fix::FromDevice(pte) => self.device_page_to_ram(vmas, va, pte, access, op)?,
                Fix::RestoreExclusive(pte) => self.restore_exclusive(va, pte, op)?,
                Fix::Copy {
                    old,
                    region,
                    writable,
                } => self.copy_page(va, old, &region, writable, NotifyEvent::Clear, op)?,
                Fix::MakeWritable | Fix::MarkExclusive(_) => unreachable!(),
            }
        }
    }

    /// Brings the device-private page `pte` maps at `va` to RAM through its owner's
    /// `migrate_to_ram` (or the CPU-copy default), with no page-table lock held, as a
    /// fault for `access` does; the caller looks at the entry again afterwards.
    pub(crate) fn device_page_to_ram(
        &self,
        vmas: &Vmas,
        va: VirtAddr,
        pte: Pte,
        access: Access,
        op: &'static str,
    ) -> Result<(), MmError> {
        let pfn = pte.pfn().unwrap_or_else(|| unreachable!("a device entry"));
        let fault = DeviceFault {
            mm: self,
            vmas,
            va,
            pte,
            access,
            region: self.region(pfn),
            op,
        };
        crate::sync::might_sleep("a page map's migrate_to_ram");
        let handler = fault.region.upper().cloned();
        match handler
            .as_deref()
            .and_then(|u| u.downcast_ref::<FaultHandler>())
        {
            Some(h) => h.0.migrate_to_ram(&fault),
            None => fault.copy_to_ram(),
        }
    }

    /// `remove_device_exclusive_entry`: a CPU access takes the page back from the
    /// device holding it for atomics — the device hears a `Clear` invalidation with no
    /// owner, then the present entry returns (if nobody changed the entry meanwhile).
    pub(crate) fn restore_exclusive(
        &self,
        va: VirtAddr,
        pte: Pte,
        op: &'static str,
    ) -> Result<(), MmError> {
        // The fault took a reference on the page (`folio_try_get`); the page lock comes
        // first (`folio_lock`), so a device still mapping the page it was just given
        // (its ExclusivePage alive) finishes before it is told to let go.
        let pfn = pte
            .pfn()
            .unwrap_or_else(|| unreachable!("an exclusive entry"));
        let region = self.region(pfn);
        while !region.trylock_page(pfn) {
            region.wait_page_unlocked(pfn);
        }
        let restored = (|| {
            let end = VirtAddr(va.0 + PAGE_SIZE);
            let guard = self.invalidate(op, va, end, NotifyEvent::Clear)?;
            let mut pt = self.pt.lock();
            if pt.get(va) == pte {
                pt.set(va, Pte::present(pfn, pte.writable()));
            }
            drop(pt);
            drop(guard);
            Ok(())
        })();
        region.unlock_page(pfn);
        region.put(pfn); // the fault's reference
        restored
    }

    /// `make_device_exclusive(mm, addr, owner)`: a device takes the anonymous page at
    /// `va` for atomic access. The page is write-faulted in (COW broken), the range is
    /// invalidated with `Exclusive` carrying `owner` (the caller's own notifier skips
    /// it), and the entry becomes a device-exclusive entry: any CPU access — or GUP —
    /// then revokes the device's access first. Returns the page locked and referenced:
    /// the device maps it, then drops the [`ExclusivePage`]; a CPU access waits for
    /// that before revoking. EOPNOTSUPP for memory that is not private anonymous; the
    /// fault's errors otherwise.
    pub fn make_device_exclusive(
        &self,
        va: VirtAddr,
        owner: u64,
    ) -> Result<ExclusivePage<'_>, MmError> {
        let op = "make_device_exclusive";
        let va = VirtAddr(va.0 & !(PAGE_SIZE - 1));
        let vmas = self.mmap_read();
        loop {
            let pfn = self.with_page(&vmas, va, Access::Write, op, |_, pfn| pfn)?;
            if !vmas.find(va).is_some_and(|v| v.is_anon()) {
                return Err(MmError::NotSupported {
                    op,
                    addr: va,
                    why: "only private anonymous pages can be made device-exclusive",
                });
            }
            let end = VirtAddr(va.0 + PAGE_SIZE);
            let guard = self.invalidate_owned(op, va, end, NotifyEvent::Exclusive, Some(owner))?;
            let region = self.region(pfn);
            let mut pt = self.pt.lock();
            let cur = pt.get(va);
            // Re-walk: still this page, present and writable, else fault again. The
            // page comes back locked and referenced, as the kernel returns the folio.
            if cur.is_present() && cur.writable() && cur.pfn() == Some(pfn) {
                if region.trylock_page(pfn) {
                    region.get(pfn);
                    pt.set(va, Pte::exclusive(pfn, true));
                    drop(pt);
                    drop(guard);
                    return Ok(ExclusivePage {
                        _held: vmas,
                        region,
                        pfn,
                    });
                }
                drop(pt);
                drop(guard);
                region.wait_page_unlocked(pfn);
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

    /// Whether `pfn`, mapped in a private mapping, is an anonymous page: not the zero
    /// page or any other reserved frame, and not an object's or file's page.
    pub(crate) fn is_anon_page(&self, pfn: Pfn) -> bool {
        !self
            .region(pfn)
            .meta(pfn)
            .test_any(flags::RESERVED | flags::PAGECACHE)
    }

    /// An anonymous page may be reused for writing when it is exclusive, or when this
    /// mapping holds its only reference (so no pin and no other address space).
    fn reusable(&self, pfn: Pfn) -> bool {
        let m = self.region(pfn);
        let meta = m.meta(pfn);
        meta.test(flags::ANON_EXCLUSIVE) || meta.refcount() == 1
    }

    /// Fills an empty entry (`do_anonymous_page`, `do_read_fault`, `do_cow_fault`,
    /// `do_shared_fault`). Private anonymous memory: a read maps the shared zero page
    /// read-only, anything else a fresh zeroed page of its own. A private file mapping:
    /// a read maps the file's page read-only, anything else a private copy of it. A
    /// shared mapping: the object's page, writable when the mapping is.
    fn populate(
        &self,
        vma: &crate::mm::Vma,
        va: VirtAddr,
        access: Access,
        op: &'static str,
    ) -> Result<(), MmError> {
        let ram = self.phys.ram();
        let object_page = || {
            let (obj, idx) = vma
                .object_page(va)
                .unwrap_or_else(|| unreachable!("a mapping of an object"));
            obj.page(idx)
                .map_err(|e| MmError::nomem(op, va, e))?
                .ok_or(MmError::Fault {
                    op,
                    addr: va,
                    why: "beyond the end of the mapped object",
                })
        };
        let writable = vma.prot.writable();
        // The frame with a reference for the entry, whether it is a page of this
        // address space's own, and whether the entry may be written.
        let (pfn, exclusive, writable) = match &vma.kind {
            VmaKind::Anon if access.reads() => {
                ram.get(crate::mem::ZERO_PFN);
                (crate::mem::ZERO_PFN, false, false)
            }
            VmaKind::Anon => (
                ram.alloc().map_err(|e| MmError::nomem(op, va, e))?,
                true,
                writable,
            ),
            VmaKind::PrivateFile { .. } if access.reads() => {
                let pfn = object_page()?;
                ram.get(pfn);
                (pfn, false, false)
            }
            VmaKind::PrivateFile { .. } => {
                let src = object_page()?;
                let new = ram.alloc().map_err(|e| MmError::nomem(op, va, e))?;
                ram.copy_frame(src, ram, new);
                (new, true, writable && access == Access::Write)
            }
            VmaKind::Shared { .. } => {
                let pfn = object_page()?;
                ram.get(pfn);
                (pfn, false, writable)
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
            pt.set(va, Pte::present(pfn, writable));
        } else {
            drop(pt);
            region.put(pfn); // raced with another fault: theirs stands
        }
        Ok(())
    }

    /// Breaks copy-on-write (or unshares, or copies a shared device-private page out):
    /// copies `old` into a fresh exclusive RAM page and swaps it in after invalidating
    /// the page with `event`. The caller's reference on `old` (taken when the copy was
    /// decided) keeps the page from being freed, reused or made exclusive while it is
    /// copied; this drops it.
    pub(crate) fn copy_page(
        &self,
        va: VirtAddr,
        old: Pfn,
        region: &Region,
        writable: bool,
        event: NotifyEvent,
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
        ram.meta(new).set(flags::ANON_EXCLUSIVE);
        let guard = match self.invalidate(op, va, VirtAddr(va.0 + PAGE_SIZE), event) {
            Ok(g) => g,
            Err(e) => {
                ram.put(new);
                region.put(old);
                return Err(e);
            }
        };
        let mut pt = self.pt.lock();
        let cur = pt.get(va);
        let swapped = (cur.is_present() || cur.is_device_private()) && cur.pfn() == Some(old);
        if swapped {
            // Copied here, after the invalidation and under the page-table lock: the
            // old page may still be writable (eviction copies out a page something
            // else references), and a CPU store holds this lock while it writes, a
            // device dropped its mapping in the invalidation. Copied before, a store
            // landing in between was lost (the soak found that).
            region.copy_frame(old, ram, new);
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

    /// Moves the page at `va` to system RAM for a long-term pin (device-coherent
    /// memory must not be pinned long-term), by one-page migration under the caller's
    /// hold of the address-space lock (`vmas`). A migration of the page in progress is
    /// waited out, and an entry that changed meanwhile is left to the caller, which
    /// looks again either way. EBUSY when the page cannot move: pinned, or referenced
    /// by anything but its entry (shared after fork, held by `get_user_pages`).
    pub(crate) fn migrate_to_ram(
        &self,
        vmas: &Vmas,
        va: VirtAddr,
        op: &'static str,
    ) -> Result<(), MmError> {
        let sel = Select::DEVICE_COHERENT | Select::DEVICE_PRIVATE;
        self.migrate_one(vmas, va, self.phys.ram(), sel, None, op)?;
        Ok(())
    }

    /// Migrates the anonymous page at `va` to a fresh frame of `target` (system RAM, a
    /// device-coherent region, or a device-private one, after which the CPU faults it
    /// back on access). A device-private page whose owner has a `migrate_to_ram` comes
    /// to RAM through it first (only an owner moves its device-private pages). Returns the new frame. EBUSY while the page is pinned or
    /// referenced by anything but its entry (shared after fork, held by
    /// `get_user_pages`); EINVAL for non-anonymous mappings; EFAULT when nothing is
    /// mapped there. A migration of the same page in progress is waited for, and then
    /// the page is moved again from wherever that one put it. A one-page use of
    /// [`Mm::migrate_vma_setup`] in which this address space does the copy.
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
        if target.kind().is_p2p() {
            return Err(MmError::Invalid {
                op,
                addr: va,
                len: PAGE_SIZE,
                why: "p2p memory is not a migration target",
            });
        }
        let all = Select::SYSTEM | Select::DEVICE_PRIVATE | Select::DEVICE_COHERENT;
        loop {
            // A device-private page whose owner manages it (it has a migrate_to_ram)
            // moves only through that owner, as in the kernel: bring it to RAM the way
            // a CPU access does — the owner updates its own page table — then move it.
            let pte = self.pt_lock().get(va);
            if pte.is_device_private() {
                let pfn = pte.pfn().unwrap_or_else(|| unreachable!("a device entry"));
                if has_owner_ops(&self.region(pfn)) {
                    self.with_page(&vmas, va, Access::Read, op, |_, _| ())?;
                    continue;
                }
            }
            match self.migrate_one(&vmas, va, target, all, None, op)? {
                OnePage::Moved(new) => return Ok(new),
                OnePage::Again => continue,
                OnePage::Skipped => {
                    return Err(MmError::Invalid {
                        op,
                        addr: va,
                        len: PAGE_SIZE,
                        why: "the page's memory does not migrate",
                    })
                }
            }
        }
    }
}
