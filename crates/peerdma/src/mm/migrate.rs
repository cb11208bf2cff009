//! Migrating a range of an address space the way a device driver does it
//! (mm/migrate_device.c): [`Mm::migrate_vma_setup`] collects the pages of a range that
//! the caller selected (system RAM, device-private or device-coherent pages of one
//! owner), locks each, takes a reference and replaces its entry with a migration entry,
//! all under one `Migrate` invalidation that carries the owner; the caller allocates
//! destination frames and copies (with its copy engine, or `Region::copy_frame`);
//! [`MigrateVma::pages`] re-checks what may move and [`MigrateVma::finalize`] installs
//! the new entries, restores the ones that stay, unlocks and drops the old pages.
//! Dropping a `MigrateVma` without finalizing restores every entry.
//!
//! The zero page counts as an empty entry (replaced by the destination, as
//! `migrate_vma_insert_page` does); a file's pages are never collected. Compound (huge)
//! pages are not modelled. Where the kernel requires the device-private owner to
//! match, `owner: None` is peerdma's "any owner", which the one-page
//! [`Mm::migrate_page`] uses.

use crate::addr::{Pfn, VirtAddr, PAGE_SIZE};
use crate::mem::{flags, Region, RegionKind};
use crate::mm::pte::Pte;
use crate::mm::space::Mm;
use crate::mm::vma::Vmas;
use crate::mm::MmError;
use crate::notifier::NotifyEvent;
use crate::sync::{Arc, Held, RwLockReadGuard};

/// Which pages `migrate_vma_setup` collects (`MIGRATE_VMA_SELECT_*`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Select(u8);

impl Select {
    /// System RAM pages (and empty entries of anonymous memory).
    pub const SYSTEM: Select = Select(1);
    /// Device-private pages of the owner.
    pub const DEVICE_PRIVATE: Select = Select(2);
    /// Device-coherent pages of the owner.
    pub const DEVICE_COHERENT: Select = Select(4);
    /// Select the owner's pages, but announce the invalidation with no owner: peerdma's
    /// own CPU copy of an owner's page (`DeviceFault::copy_to_ram`), which the owner's
    /// mirror must hear of because the owner is not the one moving it.
    pub(crate) const UNANNOUNCED_OWNER: Select = Select(0x80);

    /// Whether all of `other` is selected.
    pub fn contains(self, other: Select) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether pages of this kind are selected (the owner is checked apart; p2p
    /// memory never migrates).
    pub fn selects(self, kind: &RegionKind) -> bool {
        if kind.is_device_private() {
            self.contains(Select::DEVICE_PRIVATE)
        } else if kind.is_device_coherent() {
            self.contains(Select::DEVICE_COHERENT)
        } else {
            !kind.is_device() && self.contains(Select::SYSTEM)
        }
    }
}

impl std::ops::BitOr for Select {
    type Output = Select;
    fn bitor(self, rhs: Select) -> Select {
        Select(self.0 | rhs.0)
    }
}

/// One page of the range as collected (a `migrate_pfn` source entry).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MigrateSrc {
    /// The page, when there is one (an empty entry of anonymous memory has none and
    /// may still be migrated: the destination is inserted as a new page).
    pub pfn: Option<Pfn>,
    /// Whether the page will move (`MIGRATE_PFN_MIGRATE`).
    pub migrate: bool,
    /// Whether it was mapped writable (`MIGRATE_PFN_WRITE`).
    pub write: bool,
}

/// What collection hands `MigrateVma`: the entries, the regions they index, and
/// whether the mapping is writable.
type Collected = (Vec<Entry>, Vec<Arc<Region>>, bool);

/// One collected page: what the caller sees, and what finalize needs.
struct Entry {
    src: MigrateSrc,
    /// The entry before the migration entry replaced it.
    old: Pte,
    /// The source's region, as an index into [`MigrateVma::regions`], when collected.
    region: Option<u32>,
    /// The destination the caller handed over (its reference now ours), with its
    /// region's index.
    dst: Option<(u32, Pfn)>,
    /// Left out because another migration holds the page.
    busy: bool,
    /// An empty entry whose destination `pages` already installed.
    inserted: bool,
    /// The destination page, locked from [`MigrateVma::set_dst`] until finalize (the
    /// kernel's `zone_device_page_init` hands the driver its page locked): a fault on
    /// an entry `pages` installed early waits for the caller to finish mapping it.
    locked: Option<(u32, Pfn)>,
}

/// A range under migration (`struct migrate_vma`). Holds the address-space lock
/// shared from setup to finalize, as the kernel's caller must.
///
/// # Invariants
/// Every entry with a source page and `migrate` set holds that page's page lock and
/// one reference, and its page-table entry is a migration entry naming it; no other
/// thread changes such an entry. Every `dst` holds one reference owned by this value.
pub struct MigrateVma<'m> {
    mm: &'m Mm,
    /// The address-space lock, when this value took it; `None` when the caller holds
    /// it for at least `'m` (a fault handing a page to its owner).
    _held: Option<Held<RwLockReadGuard<'m, Vmas>>>,
    start: VirtAddr,
    /// Whether the VMA allows writes: a page inserted for an empty entry maps so.
    writable: bool,
    entries: Vec<Entry>,
    /// The regions of sources and destinations (few: one Arc per region, not per
    /// page).
    regions: Vec<Arc<Region>>,
    done: bool,
}

impl std::fmt::Debug for MigrateVma<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MigrateVma")
            .field("start", &self.start)
            .field("pages", &self.entries.len())
            .field("cpages", &self.cpages())
            .finish()
    }
}

impl Mm {
    /// `migrate_vma_setup()`: collects the pages of `[start, end)` selected by `select`
    /// (device pages only when their owner is `owner`, or any owner for `None`) under
    /// one `Migrate` invalidation carrying `owner`, and replaces each collected page's
    /// entry with a migration entry. Pages that are pinned, referenced by anything but
    /// their entry, or being migrated already are left out, as are entries of
    /// non-anonymous mappings. EINVAL when the range is not page aligned, empty, or not
    /// inside one VMA; EFAULT when nothing is mapped there.
    pub fn migrate_vma_setup(
        &self,
        start: VirtAddr,
        end: VirtAddr,
        select: Select,
        owner: Option<u64>,
    ) -> Result<MigrateVma<'_>, MmError> {
        let held = self.mmap_read();
        let (entries, regions, writable) =
            self.migrate_vma_collect(&held, start, end, select, owner)?;
        Ok(MigrateVma {
            mm: self,
            _held: Some(held),
            start,
            writable,
            entries,
            regions,
            done: false,
        })
    }

    /// [`migrate_vma_setup`](Self::migrate_vma_setup) for a caller that holds the
    /// address-space lock (`held`) for as long as the migration lives.
    pub(crate) fn migrate_vma_setup_locked<'m>(
        &'m self,
        held: &'m Vmas,
        start: VirtAddr,
        end: VirtAddr,
        select: Select,
        owner: Option<u64>,
    ) -> Result<MigrateVma<'m>, MmError> {
        let (entries, regions, writable) =
            self.migrate_vma_collect(held, start, end, select, owner)?;
        Ok(MigrateVma {
            mm: self,
            _held: None,
            start,
            writable,
            entries,
            regions,
            done: false,
        })
    }

    /// The collection step of a migration: checks the range, invalidates it, and
    /// replaces each collected page's entry with a migration entry. Returns the
    /// entries, the regions they index, and whether the mapping is writable.
    fn migrate_vma_collect(
        &self,
        held: &Vmas,
        start: VirtAddr,
        end: VirtAddr,
        select: Select,
        owner: Option<u64>,
    ) -> Result<Collected, MmError> {
        let op = "migrate_vma_setup";
        let bad = |why| MmError::Invalid {
            op,
            addr: start,
            len: end.0.saturating_sub(start.0),
            why,
        };
        if !start.is_aligned(PAGE_SIZE) || !end.is_aligned(PAGE_SIZE) {
            return Err(bad("the range is not page aligned"));
        }
        if end.0 <= start.0 {
            return Err(bad("the range is empty"));
        }
        let vma = held.find(start).ok_or(MmError::Fault {
            op,
            addr: start,
            why: "no mapping",
        })?;
        if end.0 > vma.end.0 {
            return Err(bad("the range is not inside one mapping"));
        }
        // Empty entries (and the zero page) are filled only in anonymous memory
        // (`migrate_vma_collect_hole`); present pages move in any private mapping, but
        // only anonymous ones (a file's pages stay where they are).
        let (anon, private, writable) = (vma.is_anon(), vma.is_private(), vma.prot.writable());
        let announce = if select.contains(Select::UNANNOUNCED_OWNER) {
            None
        } else {
            owner
        };
        let guard = self.invalidate_owned(op, start, end, NotifyEvent::Migrate, announce)?;
        let npages = ((end.0 - start.0) / PAGE_SIZE) as usize;
        let mut entries = Vec::with_capacity(npages);
        let mut regions: Vec<Arc<Region>> = Vec::new();
        let mut cur: Option<(Arc<Region>, u32)> = None;
        {
            let mut pt = self.pt_lock();
            for i in 0..npages {
                let va = VirtAddr(start.0 + i as u64 * PAGE_SIZE);
                let pte = pt.get(va);
                let mut e = Entry {
                    src: MigrateSrc::default(),
                    old: pte,
                    region: None,
                    dst: None,
                    busy: false,
                    inserted: false,
                    locked: None,
                };
                if pte.is_empty() || is_zero_pte(pte) {
                    e.src.migrate = anon && select.contains(Select::SYSTEM);
                    entries.push(e);
                    continue;
                }
                if pte.is_device_exclusive() {
                    // A device holds it for atomics: not collected (migrate_device.c
                    // skips every non-present entry but device-private ones).
                    entries.push(e);
                    continue;
                }
                let pfn = pte.pfn().unwrap_or_else(|| unreachable!("non-empty entry"));
                if !cur.as_ref().is_some_and(|(r, _)| r.contains(pfn)) {
                    let r = self.region(pfn);
                    let idx = region_index(&mut regions, &r);
                    cur = Some((r, idx));
                }
                let (region, idx) = cur.as_ref().unwrap_or_else(|| unreachable!("set above"));
                let (region, idx) = (region, *idx);
                let kind = region.kind();
                // "Any owner" (peerdma's, for its own one-page helpers) still leaves
                // alone the device-private pages of an owner with a migrate_to_ram:
                // only that owner moves them, as in the kernel, so it can keep its
                // own page table right.
                let owned = match owner {
                    Some(_) => kind.owner() == owner,
                    None => !(kind.is_device_private() && crate::mm::fault::has_owner_ops(region)),
                };
                e.busy = pte.is_migration();
                let anon_page = !region
                    .meta(pfn)
                    .test_any(flags::RESERVED | flags::PAGECACHE);
                let selected = private
                    && anon_page
                    && !e.busy
                    && select.selects(kind)
                    && (!kind.is_device() || owned);
                e.src.pfn = Some(pfn);
                e.src.write = pte.writable();
                let m = region.meta(pfn);
                // A possibly pinned page, or one referenced by anything but its entry
                // (shared after fork, held by get_user_pages), stays.
                if selected && m.pincount() == 0 && m.refcount() == 1 {
                    if region.trylock_page(pfn) {
                        region.get(pfn);
                        pt.set(va, Pte::migration(pfn, pte.writable()));
                        e.src.migrate = true;
                        e.region = Some(idx);
                    } else {
                        e.busy = true;
                    }
                }
                entries.push(e);
            }
        }
        drop(guard);
        Ok((entries, regions, writable))
    }

    /// One attempt at moving the page at `va` to a fresh frame of `target` with a
    /// one-page migration copied by the CPU, under the caller's hold of the
    /// address-space lock. `Moved` with the new frame; `Again` after waiting out a
    /// migration of the page in progress (the caller looks again); `Skipped` when the
    /// page is of a kind `select` leaves alone (moved already). EBUSY when the page is
    /// pinned or referenced by anything but its entry; EFAULT when nothing is there.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn migrate_one(
        &self,
        vmas: &Vmas,
        va: VirtAddr,
        target: &Arc<Region>,
        select: Select,
        owner: Option<u64>,
        op: &'static str,
    ) -> Result<OnePage, MmError> {
        let end = VirtAddr(va.0 + PAGE_SIZE);
        let mut m = self.migrate_vma_setup_locked(vmas, va, end, select, owner)?;
        let src = m.src()[0];
        let Some(old) = src.pfn else {
            drop(m);
            let pte = self.pt_lock().get(va);
            if is_zero_pte(pte) {
                return Err(MmError::Fault {
                    op,
                    addr: va,
                    why: "only the shared zero page is mapped there",
                });
            }
            if pte.is_device_exclusive() {
                return Err(MmError::Busy {
                    op,
                    addr: va,
                    why: "a device holds the page for atomics",
                });
            }
            if !pte.is_empty() {
                // Collection found no page, but one is mapped now: a device held it
                // for atomics and a CPU access took it back in between (the soak
                // found that). Look again.
                return Ok(OnePage::Again);
            }
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
                return Ok(OnePage::Again);
            }
            if !select.selects(region.kind()) {
                return Ok(OnePage::Skipped);
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
        Ok(if moved {
            OnePage::Moved(new)
        } else {
            OnePage::Again
        })
    }
}

/// Whether `pte` maps the shared zero page.
fn is_zero_pte(pte: Pte) -> bool {
    pte.is_present() && pte.pfn().is_some_and(crate::mem::is_zero_pfn)
}

/// How one attempt of [`Mm::migrate_one`] ended.
pub(crate) enum OnePage {
    /// The page moved to this frame.
    Moved(Pfn),
    /// A migration of the page was in progress and is over: look again.
    Again,
    /// The page is not of a selected kind (it moved already).
    Skipped,
}

impl MigrateVma<'_> {
    /// The first address of the range.
    pub fn start(&self) -> VirtAddr {
        self.start
    }

    /// The collected source entries, one per page.
    pub fn src(&self) -> Vec<MigrateSrc> {
        self.entries.iter().map(|e| e.src).collect()
    }

    /// Whether page `i` was left out because another migration holds it (the caller
    /// may wait for its page lock and try again).
    pub fn busy(&self, i: usize) -> bool {
        self.entries[i].busy
    }

    /// Pages that will move (`cpages`): collected pages and empty anonymous entries.
    pub fn cpages(&self) -> usize {
        self.entries.iter().filter(|e| e.src.migrate).count()
    }

    /// Hands over the destination of page `i`: a frame of `region` holding one
    /// reference, which this value now owns, already filled by the caller (copied from
    /// the source, or zeroed for an empty entry). Ignored — and freed at finalize —
    /// for a page that does not migrate.
    pub fn set_dst(&mut self, i: usize, region: &Arc<Region>, pfn: Pfn) {
        assert!(region.contains(pfn), "{pfn} is not in {}", region.kind());
        let idx = region_index(&mut self.regions, region);
        let locked = region.trylock_page(pfn);
        debug_assert!(locked, "a destination is a fresh page nobody else locks");
        if let Some((r, old)) = self.entries[i].locked.replace((idx, pfn)) {
            self.regions[r as usize].unlock_page(old);
        }
        if let Some((r, old)) = self.entries[i].dst.replace((idx, pfn)) {
            self.regions[r as usize].put(old);
        }
    }

    /// `migrate_vma_pages()`: decides, for each page, whether it moves: it needs a
    /// destination, and a source page must still be referenced only by its entry and
    /// the migration (references can only have dropped since setup).
    pub fn pages(&mut self) {
        let mut pt = None;
        let mut zero_puts = 0;
        for (i, e) in self.entries.iter_mut().enumerate() {
            if !e.src.migrate {
                continue;
            }
            if e.dst.is_none() {
                e.src.migrate = false;
                continue;
            }
            if let (Some(p), Some(r)) = (e.src.pfn, e.region) {
                let m = self.regions[r as usize].meta(p);
                if m.pincount() > 0 || m.refcount() != 2 {
                    e.src.migrate = false;
                }
            } else if e.src.pfn.is_none() {
                // An empty entry (`migrate_vma_insert_page`): nothing locks it, so a
                // fault may fill it any time. The destination goes in now, under the
                // page-table lock, or the page does not migrate: once this returns,
                // `migrate` tells the caller the truth, as it maps what moved.
                let pt = pt.get_or_insert_with(|| self.mm.pt_lock());
                let va = VirtAddr(self.start.0 + i as u64 * PAGE_SIZE);
                let Some((r, p)) = e.dst.as_ref() else {
                    unreachable!("checked above")
                };
                let r = &self.regions[*r as usize];
                // Empty, or still the zero page it was (`migrate_vma_insert_page`
                // replaces that too).
                if pt.get(va) == e.old {
                    r.meta(*p).set(flags::ANON_EXCLUSIVE);
                    let entry = if r.kind().is_device_private() {
                        Pte::device(*p, self.writable)
                    } else {
                        Pte::present(*p, self.writable)
                    };
                    pt.set(va, entry);
                    zero_puts += usize::from(!e.old.is_empty());
                    e.inserted = true;
                    e.dst = None; // the entry owns its reference now
                } else {
                    e.src.migrate = false;
                }
            }
        }
        drop(pt);
        for _ in 0..zero_puts {
            self.mm.phys().ram().put(crate::mem::ZERO_PFN);
        }
    }

    /// `migrate_vma_finalize()`: installs the destination of every page that moves,
    /// restores the entry of every collected page that does not, unlocks the sources
    /// and drops them (a moved page's old frame changes identity: DMA mappings of it
    /// are stale), and frees destinations that were not used.
    pub fn finalize(mut self) {
        self.finish();
    }

    fn finish(&mut self) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        // References to drop once the page-table lock is released (a last reference
        // frees the frame and calls its owner's page_free, which takes no lock of
        // ours), one list per region so each frees under one allocator lock.
        let mut puts: Vec<Vec<Pfn>> = vec![Vec::new(); self.regions.len()];
        let mut zero_puts = Vec::new();
        let regions = &self.regions;
        let mut pt = self.mm.pt_lock();
        let vma_writable = self.writable;
        for (i, e) in self.entries.iter_mut().enumerate() {
            let va = VirtAddr(self.start.0 + i as u64 * PAGE_SIZE);
            let new_entry = |r: u32, p: Pfn, write: bool| {
                let r = &regions[r as usize];
                r.meta(p).set(flags::ANON_EXCLUSIVE);
                if r.kind().is_device_private() {
                    Pte::device(p, write)
                } else {
                    Pte::present(p, write)
                }
            };
            match (e.src.pfn, e.region.take()) {
                (Some(old), Some(src)) => {
                    // A collected page: ours to switch or restore.
                    debug_assert_eq!(pt.get(va), Pte::migration(old, e.src.write));
                    let region = &regions[src as usize];
                    let list = &mut puts[src as usize];
                    let dst = if e.src.migrate { e.dst.take() } else { None };
                    if let Some((r, p)) = dst {
                        pt.set(va, new_entry(r, p, e.src.write));
                        region.bump_generation(old);
                        region.unlock_page(old);
                        list.push(old); // the migration's reference
                        list.push(old); // the old entry's
                    } else {
                        pt.set(va, e.old);
                        region.unlock_page(old);
                        list.push(old);
                    }
                }
                (None, _) if e.src.migrate && !e.inserted => {
                    // An empty entry `pages` was not called for: the destination goes
                    // in unless a fault filled it.
                    if let Some((r, p)) = e.dst.take() {
                        if pt.get(va) == e.old {
                            pt.set(va, new_entry(r, p, vma_writable));
                            zero_puts.extend(e.old.pfn());
                        } else {
                            e.dst = Some((r, p));
                        }
                    }
                }
                _ => {}
            }
        }
        drop(pt);
        for e in &mut self.entries {
            if let Some((r, p)) = e.locked.take() {
                regions[r as usize].unlock_page(p);
            }
            if let Some((r, p)) = e.dst.take() {
                puts[r as usize].push(p);
            }
        }
        for (r, list) in regions.iter().zip(&puts) {
            if !list.is_empty() {
                r.put_many(list);
            }
        }
        self.mm.phys().ram().put_many(&zero_puts);
    }
}

/// The index of `r` in `regions`, added if new.
fn region_index(regions: &mut Vec<Arc<Region>>, r: &Arc<Region>) -> u32 {
    let idx = match regions.iter().position(|x| Arc::ptr_eq(x, r)) {
        Some(i) => i,
        None => {
            regions.push(r.clone());
            regions.len() - 1
        }
    };
    u32::try_from(idx).unwrap_or_else(|_| unreachable!("fewer regions than pages"))
}

impl Drop for MigrateVma<'_> {
    fn drop(&mut self) {
        // Without `pages`, nothing is marked to move unless the caller set
        // destinations; an abandoned migration restores whatever it did not switch.
        if !self.done {
            for e in &mut self.entries {
                e.src.migrate = false;
            }
            self.finish();
        }
    }
}
