//! Heterogeneous memory management: a device mirrors a process's address space by
//! snapshotting (and, where asked, faulting) its page table with [`hmm_range_fault`],
//! under the interval-notifier sequence protocol, and moves pages to and from its own
//! device-private memory with `migrate_vma` ([`Mm::migrate_vma_setup`]).
//!
//! Kernel analogue: mm/hmm.c (include/linux/hmm.h), mm/migrate_device.c. The walk is
//! [`Mm::walk_range`] with hmm's policy; faults go through the fault path a CPU access
//! takes.
//!
//! Where peerdma differs on purpose: the caller does not take the address-space lock
//! itself (the walk takes it shared, as `hmm_range_fault_unlocked_timeout` does); huge
//! pages are not modelled, so the map order is always 0; there is no shared zero page
//! yet, so a read fault of never-written anonymous memory maps a fresh zeroed page.

use crate::addr::{Pfn, VirtAddr, PAGE_SIZE};
use crate::mem::Region;
use crate::mm::{Access, Mm, MmError, Prot, Pte, Visit, WalkOps, Want};
use crate::notifier::IntervalNotifier;

/// One page of an [`HmmRange`]: request flags going in, the frame and its flags coming
/// out (`hmm_pfns[]` entries, `HMM_PFN_*`).
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct HmmPfn(u64);

impl HmmPfn {
    /// The page is present and the frame is valid (`HMM_PFN_VALID`).
    pub const VALID: HmmPfn = HmmPfn(1 << 63);
    /// The CPU may write it (`HMM_PFN_WRITE`).
    pub const WRITE: HmmPfn = HmmPfn(1 << 62);
    /// The page cannot be accessed (`HMM_PFN_ERROR`): no VMA, or one that forbids reads.
    pub const ERROR: HmmPfn = HmmPfn(1 << 61);
    /// Request: fault the page in (`HMM_PFN_REQ_FAULT`, the same bit as `VALID`).
    pub const REQ_FAULT: HmmPfn = HmmPfn::VALID;
    /// Request: fault it for writing (`HMM_PFN_REQ_WRITE`, the same bit as `WRITE`).
    pub const REQ_WRITE: HmmPfn = HmmPfn::WRITE;
    /// Nothing: not valid, no request.
    pub const NONE: HmmPfn = HmmPfn(0);

    const FLAGS: u64 = 0xff << 56;
    const ORDER_SHIFT: u32 = 53;

    /// The frame of a valid entry.
    pub fn pfn(self) -> Option<Pfn> {
        self.contains(HmmPfn::VALID).then_some(Pfn(
            self.0 & !(HmmPfn::FLAGS | (0x1f << HmmPfn::ORDER_SHIFT))
        ))
    }
    /// The order of the mapping (`hmm_pfn_to_map_order`): always 0, no huge pages.
    pub fn map_order(self) -> u32 {
        ((self.0 >> HmmPfn::ORDER_SHIFT) & 0x1f) as u32
    }
    /// Whether every flag of `other` is set.
    pub fn contains(self, other: HmmPfn) -> bool {
        self.0 & other.0 == other.0
    }
    /// The raw value.
    pub fn bits(self) -> u64 {
        self.0
    }
    fn frame(pfn: Pfn, write: bool) -> Self {
        let w = if write { HmmPfn::WRITE.0 } else { 0 };
        HmmPfn(pfn.0 | HmmPfn::VALID.0 | w)
    }
}

impl std::ops::BitOr for HmmPfn {
    type Output = HmmPfn;
    fn bitor(self, rhs: HmmPfn) -> HmmPfn {
        HmmPfn(self.0 | rhs.0)
    }
}

impl std::ops::BitAnd for HmmPfn {
    type Output = HmmPfn;
    fn bitand(self, rhs: HmmPfn) -> HmmPfn {
        HmmPfn(self.0 & rhs.0)
    }
}

impl std::fmt::Debug for HmmPfn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut flags = Vec::new();
        for (bit, name) in [
            (HmmPfn::VALID, "VALID"),
            (HmmPfn::WRITE, "WRITE"),
            (HmmPfn::ERROR, "ERROR"),
        ] {
            if self.contains(bit) {
                flags.push(name);
            }
        }
        match self.pfn() {
            Some(p) => write!(f, "{p}|{}", flags.join("|")),
            None if flags.is_empty() => f.write_str("NONE"),
            None => f.write_str(&flags.join("|")),
        }
    }
}

/// A range to mirror (`struct hmm_range`): bound to the caller's interval-notifier
/// subscription and the sequence `read_begin` gave it.
///
/// # Invariants
/// `start` and `end` are page aligned with `start < end`; `pfns` has one entry per
/// page (checked by [`hmm_range_fault`], EINVAL otherwise).
#[derive(Debug)]
pub struct HmmRange<'n> {
    /// The subscription covering the range.
    pub notifier: &'n IntervalNotifier,
    /// The sequence from `notifier.read_begin()`.
    pub notifier_seq: u64,
    /// First address.
    pub start: VirtAddr,
    /// End (exclusive).
    pub end: VirtAddr,
    /// Per page: request flags in, frame and flags out.
    pub pfns: Vec<HmmPfn>,
    /// Requests applied to every page.
    pub default_flags: HmmPfn,
    /// Which per-page request bits count.
    pub pfn_flags_mask: HmmPfn,
    /// Device-private pages of this owner are reported where they are, not faulted.
    pub dev_private_owner: Option<u64>,
}

impl<'n> HmmRange<'n> {
    /// A range over `[start, end)` of the subscription, with the current sequence
    /// (`read_begin`), no requests, and per-page flags ignored.
    pub fn new(notifier: &'n IntervalNotifier, start: VirtAddr, end: VirtAddr) -> Self {
        let pages = (end.0.saturating_sub(start.0) / PAGE_SIZE) as usize;
        HmmRange {
            notifier,
            notifier_seq: notifier.read_begin(),
            start,
            end,
            pfns: vec![HmmPfn::NONE; pages],
            default_flags: HmmPfn::NONE,
            pfn_flags_mask: HmmPfn::NONE,
            dev_private_owner: None,
        }
    }
}

/// hmm's policy for the page walk (`hmm_vma_walk_*` and `hmm_pte_need_fault`).
struct HmmWalk<'r, 'n> {
    range: &'r mut HmmRange<'n>,
}

impl HmmWalk<'_, '_> {
    /// `hmm_pte_need_fault`'s inputs: the request for page `i`.
    fn request(&self, i: usize) -> HmmPfn {
        (self.range.pfns[i] & self.range.pfn_flags_mask) | self.range.default_flags
    }
}

impl WalkOps for HmmWalk<'_, '_> {
    type Error = MmError;

    fn want(&self, i: usize) -> Want {
        let req = self.request(i);
        if !req.contains(HmmPfn::REQ_FAULT) {
            Want::Snapshot
        } else if req.contains(HmmPfn::REQ_WRITE) {
            Want::Fault(Access::Write)
        } else {
            Want::Fault(Access::Read)
        }
    }

    fn owns(&self, owner: u64) -> bool {
        self.range.dev_private_owner == Some(owner)
    }

    fn visit(&mut self, i: usize, ptes: &[Pte], _region: &Region) -> Visit<MmError> {
        for (k, pte) in ptes.iter().enumerate() {
            let pfn = pte.pfn().unwrap_or_else(|| unreachable!("a walked entry"));
            self.range.pfns[i + k] = HmmPfn::frame(pfn, pte.writable());
        }
        Visit::All
    }

    fn hole(
        &mut self,
        i: usize,
        _va: VirtAddr,
        _pte: Pte,
        prot: Option<Prot>,
    ) -> Result<(), MmError> {
        // No fault was asked for: outside every VMA, or in one that forbids reads, the
        // page is an error; anywhere else (nothing there, another owner's device page)
        // it is simply not valid.
        self.range.pfns[i] = match prot {
            Some(p) if p.readable() => HmmPfn::NONE,
            _ => HmmPfn::ERROR,
        };
        Ok(())
    }
}

/// `hmm_range_fault(range)`: fills `range.pfns` with the frame behind every page of the
/// range and its flags, faulting in the pages the requests ask for (`REQ_FAULT`, and
/// `REQ_WRITE` for writing, through `default_flags` and the per-page flags under
/// `pfn_flags_mask`).
///
/// - Without a fault request nothing is faulted: an absent page, or a device-private
///   page of another owner, comes back not valid; a page outside every VMA or in a VMA
///   that forbids reads comes back `ERROR`.
/// - Device-private pages of `dev_private_owner` are reported where they are (`WRITE`
///   when the entry is writable); another owner's are faulted back to RAM when a fault
///   is asked for. Device-coherent pages are ordinary present pages.
/// - `REQ_WRITE` breaks copy-on-write; on a VMA without write permission it is EPERM.
///   A fault outside every VMA, or in a VMA that forbids reads, is EFAULT.
/// - EBUSY when the subscription's sequence moved since `range.notifier_seq` (before or
///   during the call — a fault the call makes may itself move it): the caller takes a
///   new sequence and tries again, and commits the result only if `read_retry` under
///   its own lock says it is still current.
///
/// EINVAL for an unaligned or empty range, or `pfns` of the wrong length.
pub fn hmm_range_fault(mm: &Mm, range: &mut HmmRange<'_>) -> Result<(), MmError> {
    let op = "hmm_range_fault";
    let (start, end) = (range.start, range.end);
    let invalid = |why| MmError::Invalid {
        op,
        addr: start,
        len: end.0.saturating_sub(start.0),
        why,
    };
    if !start.is_aligned(PAGE_SIZE) || !end.is_aligned(PAGE_SIZE) {
        return Err(invalid("the range is not page aligned"));
    }
    if end.0 <= start.0 {
        return Err(invalid("the range is empty"));
    }
    let npages = ((end.0 - start.0) / PAGE_SIZE) as usize;
    if range.pfns.len() != npages {
        return Err(invalid("pfns has not one entry per page"));
    }
    let busy = || MmError::Busy {
        op,
        addr: start,
        why: "the range was invalidated; begin again",
    };
    if range.notifier.read_retry(range.notifier_seq) {
        return Err(busy());
    }
    let mut walk = HmmWalk { range };
    match mm.walk_range(start, npages, &mut walk, op) {
        Ok(()) => {}
        // A fault on a mapping that forbids the access: EPERM when a write was asked
        // of a readable mapping, EFAULT otherwise (`hmm_vma_fault`, `hmm_vma_walk_test`).
        Err(MmError::Access { addr, why, .. }) => {
            return Err(if mm.vma(addr).is_some_and(|v| v.prot.readable()) {
                MmError::NotPermitted { op, addr, why }
            } else {
                MmError::Fault { op, addr, why }
            });
        }
        Err(e) => return Err(e),
    }
    if walk.range.notifier.read_retry(walk.range.notifier_seq) {
        return Err(busy());
    }
    Ok(())
}
