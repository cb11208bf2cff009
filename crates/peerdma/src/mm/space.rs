//! One address space (`struct mm_struct`): its VMAs under the address-space lock, its
//! page table under the page-table lock, its interval notifiers, and the operations
//! that change them.

use std::collections::HashMap;

use crate::addr::{Pfn, VirtAddr, PAGE_SIZE};
use crate::mem::{flags, PhysMem, Region};
use crate::mm::fault::Access;
use crate::mm::page_table::{PageTable, TASK_SIZE};
use crate::mm::pte::Pte;
use crate::mm::vma::{PagesOwnerRef, Prot, ShmObject, Vma, VmaKind, Vmas};
use crate::mm::MmError;
use crate::notifier::{InvalidateGuard, Notifier, NotifyEvent, NotifyRange};
use crate::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use crate::sync::{
    order, Arc, Held, MutexGuard, OrderedMutex, OrderedRwLock, RwLockReadGuard, Weak,
};

/// Identifies an address space within a host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MmId(pub u64);

/// An address space.
///
/// # Invariants
/// Every non-empty PTE lies inside a VMA and holds one reference on its frame; a
/// writable PTE in an anonymous VMA maps a frame marked anon-exclusive.
pub struct Mm {
    id: MmId,
    pub(crate) phys: Arc<PhysMem>,
    notifier: Arc<Notifier>,
    /// The address-space lock (`mmap_lock`): shared for faults and CPU access,
    /// exclusive for mmap, munmap, mprotect, fork and exit. Lock order: first.
    pub(crate) mmap: OrderedRwLock<Vmas>,
    /// The page-table lock: taken after `mmap` and after any notifier work, never held
    /// across an invalidation callback.
    pub(crate) pt: OrderedMutex<PageTable>,
    /// Set once any page was pinned (`MMF_HAS_PINNED`): fork then checks pins.
    pub(crate) has_pinned: AtomicBool,
    exited: AtomicBool,
    /// Pages charged by long-term pinning users (`mm->pinned_vm`).
    pinned_vm: AtomicU64,
    /// `RLIMIT_MEMLOCK` in pages; `u64::MAX` is unlimited.
    memlock_pages: AtomicU64,
}

impl std::fmt::Debug for Mm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mm").field("id", &self.id).finish()
    }
}

fn check_range(op: &'static str, addr: VirtAddr, len: u64) -> Result<VirtAddr, MmError> {
    let bad = |why| MmError::Invalid { op, addr, len, why };
    if !addr.is_aligned(PAGE_SIZE) {
        return Err(bad("address is not page aligned"));
    }
    if len == 0 {
        return Err(bad("length is zero"));
    }
    let end = addr
        .0
        .checked_add(len.next_multiple_of(PAGE_SIZE))
        .filter(|e| *e <= TASK_SIZE)
        .ok_or(bad("range runs past the end of user space"))?;
    Ok(VirtAddr(end))
}

/// Every address space of a host, so that device memory can be evicted from all that
/// map it (the kernel finds a page's mappings through its reverse map; peerdma looks in
/// each address space instead). Kept in [`PhysMem`]'s slot for the layers above.
struct MmList(OrderedMutex<Vec<Weak<Mm>>>);

fn mm_list(phys: &PhysMem) -> &MmList {
    phys.upper_or_init(|| Arc::new(MmList(OrderedMutex::new(&order::LEAF, Vec::new()))))
        .downcast_ref::<MmList>()
        .unwrap_or_else(|| unreachable!("only mm fills the slot"))
}

/// The live address spaces on `phys` that have not exited.
pub(crate) fn live_mms(phys: &PhysMem) -> Vec<Arc<Mm>> {
    mm_list(phys)
        .0
        .lock()
        .iter()
        .filter_map(Weak::upgrade)
        .filter(|m| !m.exited.load(Ordering::Acquire))
        .collect()
}

impl Mm {
    /// An empty address space on `phys`.
    pub fn new(phys: &Arc<PhysMem>) -> Arc<Self> {
        let mm = Arc::new(Mm {
            id: MmId(phys.next_id()),
            phys: phys.clone(),
            notifier: Notifier::new(),
            mmap: OrderedRwLock::new(&order::MMAP, Vmas::default()),
            pt: OrderedMutex::new(&order::PAGE_TABLE, PageTable::new()),
            has_pinned: AtomicBool::new(false),
            exited: AtomicBool::new(false),
            pinned_vm: AtomicU64::new(0),
            memlock_pages: AtomicU64::new(u64::MAX),
        });
        let mut list = mm_list(phys).0.lock();
        // Forget the dead whenever the list has doubled.
        if list.len() >= 16 && list.len().is_power_of_two() {
            list.retain(|w| w.strong_count() > 0);
        }
        list.push(Arc::downgrade(&mm));
        drop(list);
        mm
    }

    /// Its id.
    pub fn id(&self) -> MmId {
        self.id
    }
    /// Whether the process exited (its pages are gone; a device faulting on it fails).
    pub fn is_exited(&self) -> bool {
        self.exited.load(Ordering::Acquire)
    }
    /// `setrlimit(RLIMIT_MEMLOCK)`: `None` is unlimited (the default here, as for a
    /// process with `CAP_IPC_LOCK` or `ulimit -l unlimited`, what RDMA setups use).
    pub fn set_memlock_limit(&self, bytes: Option<u64>) {
        let pages = bytes.map_or(u64::MAX, |b| b / PAGE_SIZE);
        self.memlock_pages.store(pages, Ordering::Relaxed);
    }
    /// Pages charged to `pinned_vm`.
    pub fn pinned_vm(&self) -> u64 {
        self.pinned_vm.load(Ordering::Acquire)
    }
    /// Charges `pages` to `pinned_vm` against `RLIMIT_MEMLOCK`, as `ib_umem_get`
    /// does: EPERM when the limit is zero (`can_do_mlock`), ENOMEM when the charge
    /// would pass it (and nothing is charged).
    pub fn charge_pinned(&self, pages: u64) -> Result<(), MmError> {
        let op = "pinned_vm charge";
        let limit = self.memlock_pages.load(Ordering::Relaxed);
        if limit == 0 {
            return Err(MmError::NotPermitted {
                op,
                addr: VirtAddr(0),
                why: "RLIMIT_MEMLOCK is 0",
            });
        }
        let new = self.pinned_vm.fetch_add(pages, Ordering::AcqRel) + pages;
        if new > limit {
            self.pinned_vm.fetch_sub(pages, Ordering::AcqRel);
            return Err(MmError::NoMemory {
                op,
                addr: VirtAddr(0),
                why: format!("{new} pinned pages would pass RLIMIT_MEMLOCK ({limit} pages)"),
                source: None,
            });
        }
        Ok(())
    }
    /// Takes back a charge of [`charge_pinned`](Self::charge_pinned).
    pub fn uncharge_pinned(&self, pages: u64) {
        self.pinned_vm.fetch_sub(pages, Ordering::AcqRel);
    }
    /// The physical memory it maps.
    pub fn phys(&self) -> &Arc<PhysMem> {
        &self.phys
    }
    /// Its interval notifiers.
    pub fn notifier(&self) -> &Arc<Notifier> {
        &self.notifier
    }
    /// Mapped pages (non-empty PTEs).
    pub fn resident_pages(&self) -> u64 {
        self.pt.lock().entries()
    }
    /// The VMA holding `va`, if any.
    pub fn vma(&self, va: VirtAddr) -> Option<Vma> {
        self.mmap.read().find(va).cloned()
    }
    /// The PTE for `va` (for tests and the sanitizer).
    pub fn pte(&self, va: VirtAddr) -> Pte {
        self.pt.lock().get(va)
    }

    pub(crate) fn invalidate(
        &self,
        op: &'static str,
        start: VirtAddr,
        end: VirtAddr,
        event: NotifyEvent,
    ) -> Result<InvalidateGuard, MmError> {
        self.notifier
            .invalidate_range_start(NotifyRange::new(start, end, event))
            .map_err(|source| MmError::Again { op, source })
    }

    /// An invalidation carrying the device-private owner that causes it (a migration
    /// by that owner's driver), so its own mirror may skip it.
    pub(crate) fn invalidate_owned(
        &self,
        op: &'static str,
        start: VirtAddr,
        end: VirtAddr,
        event: NotifyEvent,
        owner: Option<u64>,
    ) -> Result<InvalidateGuard, MmError> {
        let mut range = NotifyRange::new(start, end, event);
        range.owner = owner;
        self.notifier
            .invalidate_range_start(range)
            .map_err(|source| MmError::Again { op, source })
    }

    pub(crate) fn region(&self, pfn: Pfn) -> Arc<Region> {
        self.phys
            .region(pfn)
            .unwrap_or_else(|| panic!("PTE names {pfn}, which is in no region"))
    }

    /// Drops one reference on each frame, one allocator lock per region.
    pub(crate) fn put_frames(&self, pfns: &[Pfn]) {
        let mut by_region: HashMap<u32, (Arc<Region>, Vec<Pfn>)> = HashMap::new();
        let mut last: Option<Arc<Region>> = None;
        for &p in pfns {
            let r = match &last {
                Some(r) if r.contains(p) => r.clone(),
                _ => {
                    let r = self.region(p);
                    last = Some(r.clone());
                    r
                }
            };
            by_region
                .entry(r.id().0)
                .or_insert_with(|| (r, Vec::new()))
                .1
                .push(p);
        }
        for (r, v) in by_region.into_values() {
            r.put_many(&v);
        }
    }

    fn mmap_vma(
        &self,
        len: u64,
        prot: Prot,
        kind: VmaKind,
    ) -> Result<(VirtAddr, VirtAddr), MmError> {
        if len == 0 {
            return Err(MmError::Invalid {
                op: "mmap",
                addr: VirtAddr(0),
                len,
                why: "length is zero",
            });
        }
        let len = len.next_multiple_of(PAGE_SIZE);
        let mut vmas = self.mmap.write();
        let start = vmas
            .find_gap(len, TASK_SIZE)
            .ok_or_else(|| MmError::NoMemory {
                op: "mmap",
                addr: VirtAddr(0),
                why: format!("no free range of {len:#x} bytes"),
                source: None,
            })?;
        let end = VirtAddr(start.0 + len);
        vmas.insert(Vma {
            start,
            end,
            prot,
            kind,
        });
        Ok((start, end))
    }

    /// `mmap(NULL, len, prot, MAP_PRIVATE | MAP_ANONYMOUS)`.
    pub fn mmap_anon(&self, len: u64, prot: Prot) -> Result<VirtAddr, MmError> {
        Ok(self.mmap_vma(len, prot, VmaKind::Anon)?.0)
    }

    /// `mmap(NULL, len, prot, MAP_SHARED, fd, pgoff * PAGE_SIZE)` of a memfd, shared
    /// anonymous memory or a file: writes reach the object (and a file's `pread`).
    pub fn mmap_shared(
        &self,
        obj: &Arc<ShmObject>,
        pgoff: u64,
        len: u64,
        prot: Prot,
    ) -> Result<VirtAddr, MmError> {
        self.mmap_object(obj, pgoff, len, prot, true)
    }

    /// `mmap(NULL, len, prot, MAP_PRIVATE, fd, pgoff * PAGE_SIZE)` of a file: reads see
    /// the file; writes copy the page into this address space and never reach the file.
    pub fn mmap_private_file(
        &self,
        obj: &Arc<ShmObject>,
        pgoff: u64,
        len: u64,
        prot: Prot,
    ) -> Result<VirtAddr, MmError> {
        self.mmap_object(obj, pgoff, len, prot, false)
    }

    fn mmap_object(
        &self,
        obj: &Arc<ShmObject>,
        pgoff: u64,
        len: u64,
        prot: Prot,
        shared: bool,
    ) -> Result<VirtAddr, MmError> {
        let pages = len.div_ceil(PAGE_SIZE);
        if pgoff.checked_add(pages).is_none_or(|e| e > obj.pages()) {
            return Err(MmError::Invalid {
                op: "mmap",
                addr: VirtAddr(0),
                len,
                why: "the mapping runs past the end of the object",
            });
        }
        let obj = obj.clone();
        let kind = if shared {
            VmaKind::Shared { obj, pgoff }
        } else {
            VmaKind::PrivateFile { obj, pgoff }
        };
        Ok(self.mmap_vma(len, prot, kind)?.0)
    }

    /// Maps device frames as a shared mapping, inserting every page now
    /// (`vm_insert_page` for each). Takes one reference per frame for its PTE; the caller
    /// keeps its own. `owner`, if any, hears of every copy a fork makes.
    pub fn mmap_pages(
        &self,
        frames: &[Pfn],
        prot: Prot,
        owner: Option<PagesOwnerRef>,
    ) -> Result<VirtAddr, MmError> {
        let (start, _) = self.mmap_vma(
            frames.len() as u64 * PAGE_SIZE,
            prot,
            VmaKind::Pages { owner },
        )?;
        let mut pt = self.pt.lock();
        for (i, &pfn) in frames.iter().enumerate() {
            self.region(pfn).get(pfn);
            pt.set(
                VirtAddr(start.0 + i as u64 * PAGE_SIZE),
                Pte::present(pfn, prot.writable()),
            );
        }
        Ok(start)
    }

    /// Clears the PTEs of `[start, end)` and returns their frames; the caller holds an
    /// invalidation of the range.
    fn zap(&self, start: VirtAddr, end: VirtAddr) -> Vec<Pfn> {
        let mut freed = Vec::new();
        self.pt.lock().walk_mut(start, end, |_, pte| {
            if let Some(p) = pte.pfn() {
                freed.push(p);
            }
            *pte = Pte::EMPTY;
        });
        freed
    }

    /// `munmap(addr, len)`: unmapped parts of the range are fine, as in the kernel.
    /// Pinned frames stay allocated until their pins drop.
    pub fn munmap(&self, addr: VirtAddr, len: u64) -> Result<(), MmError> {
        let end = check_range("munmap", addr, len)?;
        let mut vmas = self.mmap.write();
        if vmas.overlapping(addr, end).next().is_none() {
            return Ok(());
        }
        tracing::debug!(mm = self.id.0, addr = %addr, len, "munmap");
        let guard = self.invalidate("munmap", addr, end, NotifyEvent::Unmap)?;
        let freed = self.zap(addr, end);
        let gone = vmas.remove_range(addr, end);
        drop(guard);
        drop(vmas);
        self.put_frames(&freed);
        self.tell_owners(&gone);
        Ok(())
    }

    /// Zaps every entry of a device-page mapping ([`VmaKind::Pages`]) that names a
    /// frame of `region`, and nothing else: the VMAs stay, so a later access faults with
    /// EFAULT, as `unmap_mapping_range()` on a device file leaves them. Whatever the
    /// process mapped elsewhere, including at addresses a p2p mapping once had, is
    /// untouched. Returns how many entries went.
    pub fn zap_device_pages(&self, region: &Region) -> Result<u64, MmError> {
        // Exclusive: no fault, fork or mmap of this address space runs meanwhile.
        let vmas = self.mmap.write();
        let ranges: Vec<(VirtAddr, VirtAddr)> = vmas
            .iter()
            .filter(|v| matches!(v.kind, VmaKind::Pages { .. }))
            .map(|v| (v.start, v.end))
            .collect();
        let mut freed = Vec::new();
        for (start, end) in ranges {
            let mut hit = false;
            self.pt.lock().walk_mut(start, end, |_, pte| {
                hit |= pte.pfn().is_some_and(|p| region.contains(p));
            });
            if !hit {
                continue;
            }
            let guard = self.invalidate("unmap_mapping_range", start, end, NotifyEvent::Clear)?;
            self.pt.lock().walk_mut(start, end, |_, pte| {
                if let Some(p) = pte.pfn().filter(|p| region.contains(*p)) {
                    freed.push(p);
                    *pte = Pte::EMPTY;
                }
            });
            drop(guard);
        }
        drop(vmas);
        region.put_many(&freed);
        Ok(freed.len() as u64)
    }

    /// `mprotect(addr, len, prot)`: ENOMEM when part of the range is unmapped. Taking
    /// write away invalidates and write-protects the present entries; granting it
    /// changes no entry (the next write faults).
    pub fn mprotect(&self, addr: VirtAddr, len: u64, prot: Prot) -> Result<(), MmError> {
        let end = check_range("mprotect", addr, len)?;
        let mut vmas = self.mmap.write();
        let hole = || MmError::NoMemory {
            op: "mprotect",
            addr,
            why: "part of the range is not mapped".into(),
            source: None,
        };
        // mm/mprotect.c changes VMA after VMA from `addr` and stops at the first hole
        // with ENOMEM, keeping what it changed.
        let stop = vmas.mapped_prefix(addr, end);
        if stop == addr {
            return Err(hole());
        }
        let guard = if prot.writable() && prot.readable() {
            None
        } else {
            Some(self.invalidate("mprotect", addr, stop, NotifyEvent::ProtectionChange)?)
        };
        if guard.is_some() {
            // PROT_NONE keeps the pages (the VMA refuses every access); losing write
            // access write-protects the entries.
            self.pt
                .lock()
                .walk_mut(addr, stop, |_, pte| *pte = pte.wrprotect());
        }
        vmas.update_range(addr, stop, |v| v.prot = prot);
        drop(guard);
        if stop < end {
            return Err(hole());
        }
        Ok(())
    }

    /// `madvise(addr, len, MADV_DONTNEED)`: drops the pages; anonymous memory reads as
    /// zeros afterwards, shared memory re-reads its object. Over a range with holes,
    /// every mapped part is dropped and the call then fails with ENOMEM (mm/madvise.c).
    pub fn madvise_dontneed(&self, addr: VirtAddr, len: u64) -> Result<(), MmError> {
        let end = check_range("madvise", addr, len)?;
        let vmas = self.mmap.write();
        let parts: Vec<(VirtAddr, VirtAddr)> = vmas
            .overlapping(addr, end)
            .map(|v| (v.start.max(addr), v.end.min(end)))
            .collect();
        let mapped: u64 = parts.iter().map(|(s, e)| e.0 - s.0).sum();
        let mut freed = Vec::new();
        for &(s, e) in &parts {
            let guard = self.invalidate("madvise", s, e, NotifyEvent::Clear)?;
            freed.extend(self.zap(s, e));
            drop(guard);
        }
        drop(vmas);
        self.put_frames(&freed);
        if mapped < end.0 - addr.0 {
            return Err(MmError::NoMemory {
                op: "madvise",
                addr,
                why: "part of the range is not mapped".into(),
                source: None,
            });
        }
        Ok(())
    }

    /// Process exit: every subscriber is told (`Release`), every page unmapped.
    pub fn exit(&self) {
        if self.exited.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut vmas = self.mmap.write();
        let all = NotifyRange::new(VirtAddr(0), VirtAddr(TASK_SIZE), NotifyEvent::Release);
        // Release cannot be refused: it is always blockable.
        let guard = self.notifier.invalidate_range_start(all).ok();
        let freed = self.zap(VirtAddr(0), VirtAddr(TASK_SIZE));
        let gone: Vec<Vma> = std::mem::take(&mut *vmas).iter().cloned().collect();
        drop(guard);
        drop(vmas);
        self.put_frames(&freed);
        self.tell_owners(&gone);
    }

    /// Tells the owners of device-page mappings that `gone` is no longer mapped.
    fn tell_owners(&self, gone: &[Vma]) {
        for v in gone {
            if let VmaKind::Pages { owner: Some(o) } = &v.kind {
                o.0.unmapped(self, v.start, v.end.0 - v.start.0);
            }
        }
    }

    /// Reads `buf.len()` bytes at `addr` as the CPU would, faulting pages in.
    pub fn read(&self, addr: VirtAddr, buf: &mut [u8]) -> Result<(), MmError> {
        let vmas = self.mmap.read();
        self.each_page(
            &vmas,
            addr,
            buf.len(),
            Access::Read,
            "read",
            |region, pfn, off, at, n| {
                region.read(pfn, off, &mut buf[at..at + n]);
            },
        )
    }

    /// Writes `data` at `addr` as the CPU would, faulting and breaking COW.
    pub fn write(&self, addr: VirtAddr, data: &[u8]) -> Result<(), MmError> {
        let vmas = self.mmap.read();
        self.each_page(
            &vmas,
            addr,
            data.len(),
            Access::Write,
            "write",
            |region, pfn, off, at, n| {
                region.write(pfn, off, &data[at..at + n]);
            },
        )
    }

    /// For each page of `[addr, addr + len)`: make it satisfy `access`, then call
    /// `f(region, pfn, offset in page, offset in buffer, bytes)` with the page-table
    /// lock held. Holding it across the copy is what makes a CPU access atomic with
    /// respect to the entry: a migration replaces the entry under the same lock, so an
    /// access either completes before the page is copied or finds the migration entry
    /// and waits (on hardware, the TLB shootdown plays this part).
    fn each_page(
        &self,
        vmas: &Vmas,
        addr: VirtAddr,
        len: usize,
        access: Access,
        op: &'static str,
        mut f: impl FnMut(&Region, Pfn, u64, usize, usize),
    ) -> Result<(), MmError> {
        let mut done = 0usize;
        while done < len {
            let va = VirtAddr(addr.0 + done as u64);
            let page = VirtAddr(va.0 & !(PAGE_SIZE - 1));
            let off = va.0 - page.0;
            let n = ((PAGE_SIZE - off) as usize).min(len - done);
            self.with_page(vmas, page, access, op, |_, pfn| {
                f(&self.region(pfn), pfn, off, done, n)
            })?;
            done += n;
        }
        Ok(())
    }

    /// Marks the address space as having had pages DMA-pinned (`MMF_HAS_PINNED`):
    /// from now on fork copies pages that may be pinned instead of sharing them.
    pub(crate) fn set_has_pinned(&self) {
        self.has_pinned.store(true, Ordering::Release);
    }

    /// Takes the address-space lock shared.
    pub(crate) fn mmap_read(&self) -> Held<RwLockReadGuard<'_, Vmas>> {
        self.mmap.read()
    }

    /// Takes the page-table lock.
    pub(crate) fn pt_lock(&self) -> Held<MutexGuard<'_, PageTable>> {
        self.pt.lock()
    }

    /// Whether the anonymous frame `pfn` is exclusive to this address space.
    pub(crate) fn is_exclusive(&self, pfn: Pfn) -> bool {
        self.region(pfn).meta(pfn).test(flags::ANON_EXCLUSIVE)
    }
}

impl Drop for Mm {
    fn drop(&mut self) {
        self.exit();
    }
}
