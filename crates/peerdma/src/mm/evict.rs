//! `migrate_device_range()`: moving every page of a range of device memory back to
//! system RAM, wherever it is mapped — what a driver does before it removes device
//! memory (test_hmm's RELEASE, a GPU's hot unplug) or when VRAM runs out.
//!
//! The kernel starts from the frames: each one with references is locked, and its
//! reverse map replaces every mapping with a migration entry at once
//! (`migrate_device_unmap` → `try_to_migrate`). peerdma has no reverse map, so it starts
//! from the address spaces instead: it looks in each live one for entries naming a
//! frame of the range, and moves each page the way that address space would — a
//! device-private page through its owner's `migrate_to_ram`, exactly as a CPU access
//! would fault it back (the owner updates its own page table there), and a
//! device-coherent page by a one-page migration to RAM. A page that fork left mapped by
//! several address spaces gets a copy in each, as the fault path copies it.
//!
//! Pinned pages are refused, as `migrate_vma_check_page` refuses them: the page stays
//! where it is, mapped, and the report names it. The kernel's driver would then block in
//! `memunmap_pages` until the last reference drops; a peerdma driver decides itself
//! whether to wait ([`crate::mem::Region::wait_until_free`]) or to give up.

use crate::addr::{Pfn, VirtAddr, PAGE_SIZE};
use crate::mem::{PhysMem, Region};
use crate::mm::fault::Access;
use crate::mm::migrate::OnePage;
use crate::mm::space::live_mms;
use crate::mm::{Mm, MmError, Select};
use crate::notifier::NotifyEvent;
use crate::sync::Arc;

/// What [`migrate_device_range`] did.
#[derive(Debug, Default)]
pub struct DeviceRangeEviction {
    /// Mappings moved to system RAM (a page mapped by two address spaces counts twice).
    pub moved: u64,
    /// Pages that stayed, with the refusal: pinned, or an owner's `migrate_to_ram`
    /// failed.
    pub refused: Vec<(Pfn, MmError)>,
}

/// Moves every mapped page of `npages` frames of `region` (of the host `phys`) from
/// `first` to system RAM, in every live address space. EINVAL when the range is not inside the region or the
/// region is not device memory. Pages no address space maps (free, or held by their
/// driver) are left to their holder; pinned ones are refused (see the module
/// documentation).
pub fn migrate_device_range(
    phys: &PhysMem,
    region: &Arc<Region>,
    first: Pfn,
    npages: u64,
) -> Result<DeviceRangeEviction, MmError> {
    let op = "migrate_device_range";
    let bad = |why| MmError::Invalid {
        op,
        addr: VirtAddr(first.0 * PAGE_SIZE),
        len: npages * PAGE_SIZE,
        why,
    };
    if !region.kind().is_device() || region.kind().is_p2p() {
        return Err(bad(
            "not a region of device-private or device-coherent memory",
        ));
    }
    let end = first.0.checked_add(npages).ok_or(bad("the range wraps"))?;
    if npages == 0 || !region.contains(first) || !region.contains(Pfn(end - 1)) {
        return Err(bad("the range is not inside the region"));
    }
    let in_range = |p: Pfn| first.0 <= p.0 && p.0 < end;
    let mut report = DeviceRangeEviction::default();
    for mm in live_mms(phys) {
        mm.evict_range(region, &in_range, &mut report, op);
    }
    Ok(report)
}

impl Mm {
    /// Moves this address space's mappings of frames `in_range` of `region` to RAM.
    fn evict_range(
        &self,
        region: &Arc<Region>,
        in_range: &dyn Fn(Pfn) -> bool,
        report: &mut DeviceRangeEviction,
        op: &'static str,
    ) {
        let vmas = self.mmap_read();
        let mut hits = Vec::new();
        {
            let mut pt = self.pt_lock();
            for v in vmas.iter() {
                pt.walk_mut(v.start, v.end, |va, pte| {
                    if pte.pfn().is_some_and(|p| region.contains(p) && in_range(p)) {
                        hits.push(va);
                    }
                });
            }
        }
        for va in hits {
            if let Err((pfn, e)) = self.evict_one(&vmas, va, region, in_range, op) {
                report.refused.push((pfn, e));
            } else {
                report.moved += 1;
            }
        }
    }

    /// Moves the page mapped at `va` to RAM if it is still a frame `in_range`.
    fn evict_one(
        &self,
        vmas: &crate::mm::vma::Vmas,
        va: VirtAddr,
        region: &Arc<Region>,
        in_range: &dyn Fn(Pfn) -> bool,
        op: &'static str,
    ) -> Result<(), (Pfn, MmError)> {
        loop {
            let pte = self.pt_lock().get(va);
            let Some(pfn) = pte.pfn().filter(|p| region.contains(*p) && in_range(*p)) else {
                return Ok(()); // moved or unmapped meanwhile
            };
            if pte.is_migration() {
                region.wait_page_unlocked(pfn);
                continue;
            }
            if pte.is_device_exclusive() {
                // A device holds it for atomics: take it back first, as a CPU access
                // would (its device is told), then move it.
                region.get(pfn); // the reference restore_exclusive drops
                self.restore_exclusive(va, pte, op).map_err(|e| (pfn, e))?;
                continue;
            }
            if region.meta(pfn).pincount() > 0 {
                return Err((
                    pfn,
                    MmError::Busy {
                        op,
                        addr: va,
                        why: "the page is DMA-pinned",
                    },
                ));
            }
            if pte.is_device_private() {
                // As a CPU access faults it back: through the owner's migrate_to_ram
                // (whatever the mapping's protection: eviction is not an access).
                self.device_page_to_ram(vmas, va, pte, Access::Read, op)
                    .map_err(|e| (pfn, e))?;
                continue;
            }
            let ram = self.phys.ram().clone();
            match self.migrate_one(vmas, va, &ram, Select::DEVICE_COHERENT, None, op) {
                Ok(OnePage::Moved(_)) | Ok(OnePage::Skipped) => return Ok(()),
                Ok(OnePage::Again) => continue,
                Err(MmError::Busy { .. }) if region.meta(pfn).pincount() == 0 => {
                    // Mapped elsewhere too (fork) or held by get_user_pages: this
                    // address space gets its own copy, as a COW break makes one.
                    let took = {
                        let pt = self.pt_lock();
                        let same = pt.get(va) == pte;
                        if same {
                            region.get(pfn);
                        }
                        same
                    };
                    if took {
                        self.copy_page(va, pfn, region, pte.writable(), NotifyEvent::Migrate, op)
                            .map_err(|e| (pfn, e))?;
                    }
                    continue;
                }
                Err(e) => return Err((pfn, e)),
            }
        }
    }
}
