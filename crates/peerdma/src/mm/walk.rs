//! One page walker for everything that looks up a range of an address space page by
//! page: GUP (pin or get every page, faulting each into shape) and `hmm_range_fault`
//! (snapshot the range, faulting only the pages asked for, leaving the caller's own
//! device-private pages where they are). mm/pagewalk.c with the policies of mm/gup.c
//! and mm/hmm.c as the caller's [`WalkOps`].
//!
//! The walk holds the address-space lock shared throughout. Entries already in shape
//! are handed to the caller a run at a time — as many consecutive entries of one leaf
//! table as map frames of one region — under one page-table lock; anything else goes
//! through the fault path ([`Mm::handle_mm_fault`]'s) one page at a time, after which
//! the page is handed over with the page-table lock held, so it cannot change between
//! the fault and the caller's look.

use crate::addr::{VirtAddr, PAGE_SIZE};
use crate::mem::{flags, Region};
use crate::mm::fault::Access;
use crate::mm::pte::Pte;
use crate::mm::space::Mm;
use crate::mm::vma::Prot;
use crate::mm::MmError;
use crate::sync::Arc;

/// What the walk needs of one page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    /// Fault it until it satisfies the access (`FOLL_*` / `HMM_PFN_REQ_FAULT`).
    Fault(Access),
    /// Look only: a page not in shape for `Access::Read` is a hole, reported to
    /// [`WalkOps::hole`] without faulting.
    Snapshot,
}

/// What the caller made of a run of entries handed to [`WalkOps::visit`].
#[derive(Debug)]
pub enum Visit<E> {
    /// Every entry of the run was taken.
    All,
    /// The first `taken` entries were taken; the walk stops with `error`.
    Stop {
        /// Entries taken.
        taken: usize,
        /// Why the walk stops.
        error: E,
    },
    /// The first `taken` entries were taken; the next one's page must move to system
    /// RAM first (a long-term pin of device-coherent memory), then be visited again.
    Migrate {
        /// Entries taken.
        taken: usize,
    },
}

/// A walk's policy: what each page must satisfy and what to do with it.
pub trait WalkOps {
    /// What stops the walk.
    type Error: From<MmError>;
    /// Whether every page needs the same [`Want`] (then the walk asks once per run).
    const UNIFORM: bool = false;
    /// What page `i` of the range needs.
    fn want(&self, i: usize) -> Want;
    /// Whether a device-private page of this owner counts as in shape where it is,
    /// for any access (`hmm_range.dev_private_owner`); otherwise such a page is faulted
    /// back to RAM.
    fn owns(&self, _owner: u64) -> bool {
        false
    }
    /// Called with the page-table lock held (no sleeping, no call back into the
    /// address space): `ptes` are the entries of pages `i ..` of the range, each in
    /// shape for its [`Want`] and each mapping a frame of `region`.
    fn visit(&mut self, i: usize, ptes: &[Pte], region: &Region) -> Visit<Self::Error>;
    /// Page `i` (at `va`) is not in shape and [`Want::Snapshot`] said not to fault:
    /// `pte` is what is there (empty, or a device-private entry of another owner) and
    /// `prot` the protection of the VMA there, `None` outside every VMA (a present page
    /// of a VMA that forbids reading comes here too). The default refuses with EFAULT.
    fn hole(
        &mut self,
        i: usize,
        va: VirtAddr,
        pte: Pte,
        prot: Option<Prot>,
    ) -> Result<(), Self::Error> {
        let _ = (i, pte, prot);
        Err(MmError::Fault {
            op: "walk_range",
            addr: va,
            why: "the page is not present",
        }
        .into())
    }
}

impl Mm {
    /// Walks `npages` pages from `start` (rounded down to a page) with `ops`: each page
    /// is brought into shape for `ops.want(i)` (or reported as a hole) and handed to
    /// `ops.visit`, in order, until the range ends or `ops` stops the walk. `op` names
    /// the caller in errors.
    pub fn walk_range<W: WalkOps>(
        &self,
        start: VirtAddr,
        npages: usize,
        ops: &mut W,
        op: &'static str,
    ) -> Result<(), W::Error> {
        let start = VirtAddr(start.0 & !(PAGE_SIZE - 1));
        let at = |i: usize| VirtAddr(start.0 + i as u64 * PAGE_SIZE);
        let vmas = self.mmap_read();
        let mut cur: Option<Arc<Region>> = None;
        let mut i = 0;
        while i < npages {
            let va = at(i);
            let before = i;
            // Fast path: runs of entries in shape, a leaf table at a time, under one
            // page-table lock.
            let mut migrate = false;
            if let Some(v) = vmas.find(va).filter(|v| v.prot.readable()) {
                let (private, writable, end) = (v.is_private(), v.prot.writable(), v.end);
                let pt = self.pt_lock();
                while i < npages {
                    let va = at(i);
                    let left = (end.0.saturating_sub(va.0) / PAGE_SIZE) as usize;
                    let run = pt.run(va);
                    let n = run.len().min(left).min(npages - i);
                    if n == 0 {
                        break;
                    }
                    let Some(pfn0) = run[0].pfn().filter(|_| !run[0].is_migration()) else {
                        break;
                    };
                    if !cur.as_ref().is_some_and(|r| r.contains(pfn0)) {
                        cur = Some(self.region(pfn0));
                    }
                    let region = cur.as_deref().unwrap_or_else(|| unreachable!());
                    let private_ok = region.kind().owner().is_some_and(|o| ops.owns(o))
                        && region.kind().is_device_private();
                    // No atomics here: how many leading entries are ready, all in
                    // this region.
                    let m = if W::UNIFORM {
                        let want = ops.want(i);
                        run[..n]
                            .iter()
                            .take_while(|pte| {
                                in_shape(pte, region, want, private, writable, private_ok)
                            })
                            .count()
                    } else {
                        run[..n]
                            .iter()
                            .enumerate()
                            .take_while(|(k, pte)| {
                                in_shape(
                                    pte,
                                    region,
                                    ops.want(i + k),
                                    private,
                                    writable,
                                    private_ok,
                                )
                            })
                            .count()
                    };
                    if m == 0 {
                        break;
                    }
                    match ops.visit(i, &run[..m], region) {
                        Visit::All => i += m,
                        Visit::Stop { error, .. } => return Err(error),
                        Visit::Migrate { taken } => {
                            i += taken;
                            migrate = true;
                            break;
                        }
                    }
                }
            }
            if i >= npages {
                break;
            }
            if i != before && !migrate {
                continue; // a VMA or leaf table ended: the next one may be in shape
            }
            let va = at(i);
            if migrate {
                self.migrate_to_ram(&vmas, va, op)?;
                continue;
            }
            // Slow path, one page: fault it into shape, or report the hole.
            match ops.want(i) {
                Want::Snapshot => {
                    let pte = self.pt_lock().get(va);
                    if pte.is_migration() {
                        // Wait the migration out and look again.
                        let pfn = pte.pfn().unwrap_or_else(|| unreachable!("an entry"));
                        self.region(pfn).wait_page_unlocked(pfn);
                        continue;
                    }
                    ops.hole(i, va, pte, vmas.find(va).map(|v| v.prot))?;
                    i += 1;
                }
                Want::Fault(access) => {
                    let visit = self.with_page(&vmas, va, access, op, |pt, pfn| {
                        let region = self.region(pfn);
                        ops.visit(i, &[pt.get(va)], &region)
                    })?;
                    match visit {
                        Visit::All => i += 1,
                        Visit::Stop { error, .. } => return Err(error),
                        Visit::Migrate { .. } => self.migrate_to_ram(&vmas, va, op)?,
                    }
                }
            }
        }
        Ok(())
    }
}

/// Whether `pte` (mapping a frame of `region`) satisfies `want` as it is.
#[inline(always)]
fn in_shape(
    pte: &Pte,
    region: &Region,
    want: Want,
    private: bool,
    vma_writable: bool,
    private_ok: bool,
) -> bool {
    let Some(pfn) = pte.pfn() else {
        return false;
    };
    if !region.contains(pfn) {
        return false;
    }
    let access = match want {
        Want::Fault(a) => a,
        Want::Snapshot => Access::Read,
    };
    if pte.is_device_private() {
        // The owner's own device page is reported where it is, whatever the access
        // (hmm never faults it; the owner sees from the entry whether it is writable).
        return private_ok;
    }
    if !pte.is_present() {
        return false;
    }
    match access {
        Access::Write => pte.writable() && vma_writable,
        // In a private mapping: a long-term read-only pin wants an exclusive anonymous
        // page; a short-term one takes the zero page or a file's page as it is.
        Access::Unshare => !private || region.meta(pfn).flags() & SHARED_BITS == EXCLUSIVE,
        Access::Pin => {
            let f = region.meta(pfn).flags();
            !private
                || f & (flags::RESERVED | flags::PAGECACHE) != 0
                || f & SHARED_BITS == EXCLUSIVE
        }
        Access::Read => true,
    }
}

/// The flags that tell an exclusive anonymous page: exclusive, and neither reserved
/// (the zero page) nor a file's.
const SHARED_BITS: u32 = flags::ANON_EXCLUSIVE | flags::RESERVED | flags::PAGECACHE;
const EXCLUSIVE: u32 = flags::ANON_EXCLUSIVE;
