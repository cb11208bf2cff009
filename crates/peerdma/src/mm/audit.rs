//! Frame accounting between operations: every reference on every frame has an owner,
//! and no frame has an owner it must not share. The kernel keeps the same books
//! (`page_ref`, `_mapcount`, `_pincount`, `PageAnonExclusive`) and checks pieces of them
//! with `VM_BUG_ON_PAGE`; here the whole ledger is recomputed from the page tables and
//! compared with every frame's counts, so a fuzzer can ask after each step whether a
//! frame leaked, was freed while still mapped, or became shared where it must be
//! exclusive.
//!
//! A frame's references, when nothing is in flight, come from:
//! - each non-empty page-table entry naming it, in every live address space
//!   ([`Pte`](crate::mm::Pte)'s invariant);
//! - each DMA pin (a pin counts in both the reference and the pin count);
//! - its owner: a shared object or file holds one on each of its pages
//!   ([`flags::PAGECACHE`]), a driver one on each frame it owns outright — VRAM and
//!   system RAM backing buffer objects, device-private frames it keeps
//!   ([`flags::OWNED`]).
//!
//! And the exclusivity rules (mm/memory.c, mm/gup.c): a writable entry of an anonymous
//! page is the page's only mapping and carries [`flags::ANON_EXCLUSIVE`]; an
//! anonymous page pinned while mapped is exclusive (GUP unshares before pinning).

use std::fmt;

use crate::addr::{Pfn, VirtAddr};
use crate::mem::{flags, PhysMem};
use crate::mm::space::live_mms;
use crate::mm::MmId;

/// What the page tables say of one frame.
#[derive(Clone, Copy, Debug, Default)]
struct Maps {
    /// Non-empty entries naming it, all address spaces.
    entries: u32,
    /// Of those, present and writable.
    writable: u32,
    /// Address spaces it is mapped in (counted once each).
    spaces: u32,
    last: Option<MmId>,
    /// One of its entries, for the report.
    at: Option<(MmId, VirtAddr)>,
}

/// The books balance: frames in use, and how they are held.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ledger {
    /// Frames with a reference, all regions (reserved frames not counted).
    pub frames: u64,
    /// References from page-table entries.
    pub mapped: u64,
    /// References from DMA pins.
    pub pinned: u64,
    /// References from owners (page cache and drivers).
    pub owned: u64,
}

/// A frame whose books do not balance.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("frame {pfn} ({region}): {what}")]
pub struct FrameFault {
    /// The frame.
    pub pfn: Pfn,
    /// Its region's kind.
    pub region: String,
    /// What is wrong, with the counts.
    pub what: String,
}

struct Counts<'a>(&'a Maps, u32, u32, u32);

impl fmt::Display for Counts<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Counts(m, refs, pins, owner) = self;
        write!(
            f,
            "{refs} references, {} page-table entries, {pins} pins, {owner} owner",
            m.entries
        )?;
        if let Some((mm, va)) = m.at {
            write!(f, " (mapped at {va} in address space {})", mm.0)?;
        }
        Ok(())
    }
}

/// Recomputes every frame's references from the page tables of the live address
/// spaces on `phys`, its pins and its owner, and checks them against its counts and
/// the exclusivity rules. Meaningful only between operations: a fault, migration or
/// pin in flight holds references of its own (and an entry or page lock this reports).
pub fn audit_frames(phys: &PhysMem) -> Result<Ledger, FrameFault> {
    // Every entry of every live address space, then folded per frame in frame order,
    // so the frames of each region are matched with a merge instead of a lookup.
    let mut entries: Vec<(Pfn, MmId, VirtAddr, bool)> = Vec::new();
    for mm in live_mms(phys) {
        let id = mm.id();
        // Entries live only inside VMAs: walking those alone skips the empty parts of
        // leaf tables, and the count the table keeps shows any entry outside them.
        let vmas = mm.mmap.read();
        let ranges: Vec<(VirtAddr, VirtAddr)> = vmas.iter().map(|v| (v.start, v.end)).collect();
        let mut pt = mm.pt_lock();
        let mut bad = None;
        let mut seen = 0;
        for (start, end) in ranges {
            pt.walk_mut(start, end, |va, pte| {
                seen += 1;
                if pte.is_migration() && bad.is_none() {
                    bad = Some((va, *pte));
                }
                if let Some(pfn) = pte.pfn() {
                    entries.push((pfn, id, va, pte.is_present() && pte.writable()));
                }
            });
        }
        let outside = pt.entries() - seen;
        drop(pt);
        drop(vmas);
        if outside > 0 {
            return Err(FrameFault {
                pfn: Pfn(0),
                region: String::from("?"),
                what: format!(
                    "{outside} page-table entries outside every VMA of address space {}",
                    id.0
                ),
            });
        }
        if let Some((va, pte)) = bad {
            return Err(FrameFault {
                pfn: pte.pfn().unwrap_or(Pfn(0)),
                region: String::from("?"),
                what: format!(
                    "a migration entry at {va} in address space {} with no migration running",
                    id.0
                ),
            });
        }
    }
    entries.sort_unstable_by_key(|e| (e.0, e.1));
    let mut maps: Vec<(Pfn, Maps)> = Vec::new();
    for (pfn, id, va, writable) in entries {
        if maps.last().is_none_or(|l| l.0 != pfn) {
            maps.push((pfn, Maps::default()));
        }
        let Some((_, m)) = maps.last_mut() else {
            continue;
        };
        m.entries += 1;
        m.writable += u32::from(writable);
        if m.last != Some(id) {
            m.spaces += 1;
            m.last = Some(id);
        }
        m.at.get_or_insert((id, va));
    }
    let mut ledger = Ledger::default();
    let none = Maps::default();
    let mut matched = 0;
    for region in phys.regions() {
        let mut fault = None;
        let mut next = maps.partition_point(|m| m.0 < region.base());
        region.for_each_frame(|pfn, meta| {
            if fault.is_some() {
                return;
            }
            let m = match maps.get(next) {
                Some((p, m)) if *p == pfn => {
                    next += 1;
                    matched += 1;
                    m
                }
                _ => &none,
            };
            let (refs, pins, fl) = (meta.refcount(), meta.pincount(), meta.flags());
            if refs == 0 && m.entries == 0 {
                return;
            }
            let owner = u32::from(fl & (flags::PAGECACHE | flags::OWNED) != 0);
            let c = Counts(m, refs, pins, owner);
            let what = if refs == 0 {
                Some(format!("mapped after it was freed: {c}"))
            } else if fl & flags::LOCKED != 0 {
                Some(format!("page lock held with no migration running: {c}"))
            } else if fl & flags::RESERVED != 0 {
                // The zero page and frame 0 are never freed; their references are
                // not counted.
                None
            } else if fl & flags::PAGECACHE != 0 && fl & flags::OWNED != 0 {
                Some(format!(
                    "owned by a driver and by the page cache at once: {c}"
                ))
            } else if refs != m.entries + pins + owner {
                let kind = if refs > m.entries + pins + owner {
                    "leaked: references nobody holds"
                } else {
                    "more holders than references (one will free it under the others)"
                };
                Some(format!("{kind}: {c}"))
            } else if fl & (flags::PAGECACHE | flags::OWNED) == 0
                && !region.kind().is_device()
                && m.writable > 0
                && (m.entries > 1 || fl & flags::ANON_EXCLUSIVE == 0)
            {
                Some(format!(
                    "an anonymous page writable in one mapping but not exclusive: {c}"
                ))
            } else if fl & (flags::PAGECACHE | flags::OWNED) == 0
                && !region.kind().is_device()
                && pins > 0
                && m.entries > 0
                && (m.spaces > 1 || fl & flags::ANON_EXCLUSIVE == 0)
            {
                Some(format!("an anonymous page pinned while shared: {c}"))
            } else {
                None
            };
            if let Some(what) = what {
                fault = Some(FrameFault {
                    pfn,
                    region: region.kind().to_string(),
                    what,
                });
                return;
            }
            if fl & flags::RESERVED == 0 {
                ledger.frames += 1;
                ledger.mapped += u64::from(m.entries);
                ledger.pinned += u64::from(pins);
                ledger.owned += u64::from(owner);
            }
        });
        if let Some(f) = fault {
            return Err(f);
        }
    }
    if matched < maps.len() {
        // An entry names a frame no region ever handed out.
        let (pfn, m) = maps
            .iter()
            .find(|(pfn, _)| {
                phys.region(*pfn)
                    .is_none_or(|r| r.meta(*pfn).refcount() == 0)
            })
            .copied()
            .unwrap_or((Pfn(0), none));
        return Err(FrameFault {
            pfn,
            region: String::from("none"),
            what: format!("mapped but never allocated: {}", Counts(&m, 0, 0, 0)),
        });
    }
    Ok(ledger)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::PAGE_SIZE;
    use crate::mem::frame::{PIN, REF};
    use crate::mm::{Mm, Prot};
    use crate::sync::atomic::Ordering;
    use crate::sync::Arc;

    /// Two written pages of a private mapping, and a fork that shares them
    /// copy-on-write: books balance with 2 frames and 4 entries.
    fn forked() -> (Arc<PhysMem>, Arc<Mm>, Arc<Mm>, VirtAddr) {
        let phys = PhysMem::new(1 << 20).unwrap();
        let mm = Mm::new(&phys);
        let a = mm.mmap_anon(2 * PAGE_SIZE, Prot::RW).unwrap();
        mm.write(a, &[7; 2 * PAGE_SIZE as usize]).unwrap();
        let child = mm.fork().unwrap();
        (phys, mm, child, a)
    }

    #[test]
    fn balanced_books_after_cow_fork_and_exit() {
        let (phys, mm, child, a) = forked();
        let l = audit_frames(&phys).unwrap();
        assert_eq!((l.frames, l.mapped, l.pinned, l.owned), (2, 4, 0, 0));
        // The child's write breaks COW: a third frame, each mapped once more or less.
        child.write(a, &[1]).unwrap();
        let l = audit_frames(&phys).unwrap();
        assert_eq!((l.frames, l.mapped), (3, 4));
        child.exit();
        mm.exit();
        assert_eq!(audit_frames(&phys).unwrap(), Ledger::default());
    }

    #[test]
    fn an_extra_reference_is_a_leak() {
        let (phys, mm, _child, a) = forked();
        let pfn = mm.pte(a).pfn().unwrap();
        phys.ram().meta(pfn).counts.fetch_add(REF, Ordering::AcqRel);
        let f = audit_frames(&phys).unwrap_err();
        assert_eq!(f.pfn, pfn);
        assert!(f.what.starts_with("leaked"), "{f}");
        assert!(f.what.contains("3 references, 2 page-table entries"), "{f}");
        phys.ram().meta(pfn).counts.fetch_sub(REF, Ordering::AcqRel);
    }

    #[test]
    fn a_missing_reference_is_an_owner_too_many() {
        // The bug a racing COW break makes: one side drops the other's reference.
        let (phys, mm, _child, a) = forked();
        let pfn = mm.pte(a).pfn().unwrap();
        phys.ram().meta(pfn).counts.fetch_sub(REF, Ordering::AcqRel);
        let f = audit_frames(&phys).unwrap_err();
        assert!(f.what.starts_with("more holders than references"), "{f}");
        phys.ram().meta(pfn).counts.fetch_add(REF, Ordering::AcqRel);
    }

    #[test]
    fn a_writable_entry_of_a_shared_anonymous_page_is_refused() {
        // After fork both sides map the page read-only; a writable entry on one side
        // would let it write the other's memory (what do_wp_page must never allow).
        let (phys, mm, _child, a) = forked();
        let pte = mm.pte(a);
        mm.pt_lock().set(a, pte.mkwrite());
        let f = audit_frames(&phys).unwrap_err();
        assert!(
            f.what.contains("writable in one mapping but not exclusive"),
            "{f}"
        );
        mm.pt_lock().set(a, pte);
    }

    #[test]
    fn a_pin_of_a_shared_anonymous_page_is_refused() {
        // GUP unshares before FOLL_PIN: a pinned page mapped by two address spaces is
        // the state cow.c's tests catch as lost DMA.
        let (phys, mm, _child, a) = forked();
        let pfn = mm.pte(a).pfn().unwrap();
        phys.ram().meta(pfn).counts.fetch_add(PIN, Ordering::AcqRel);
        let f = audit_frames(&phys).unwrap_err();
        assert!(f.what.contains("pinned while shared"), "{f}");
        phys.ram().meta(pfn).counts.fetch_sub(PIN, Ordering::AcqRel);
        audit_frames(&phys).unwrap();
    }
}
