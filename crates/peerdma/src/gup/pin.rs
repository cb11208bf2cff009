//! The pinning walk and the RAII values it returns.

use std::ops::BitOr;

use crate::addr::{Pfn, VirtAddr, PAGE_SIZE};
use crate::gup::GupError;
use crate::mem::Region;
use crate::mm::{Access, Mm, MmError, Pte, Visit, WalkOps, Want};
use crate::sync::Arc;

/// `FOLL_*` flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FollFlags(u32);

impl FollFlags {
    /// No flags: read access.
    pub const NONE: FollFlags = FollFlags(0);
    /// The device will write the pages: break copy-on-write first.
    pub const WRITE: FollFlags = FollFlags(1 << 0);
    /// The pin may last indefinitely (RDMA registrations, io_uring fixed buffers).
    pub const LONGTERM: FollFlags = FollFlags(1 << 1);
    /// The caller can DMA to p2p memory: allow p2p pages.
    pub const PCI_P2PDMA: FollFlags = FollFlags(1 << 2);

    /// Whether all of `other` is set.
    pub fn contains(self, other: FollFlags) -> bool {
        self.0 & other.0 == other.0
    }
}

impl BitOr for FollFlags {
    type Output = FollFlags;
    fn bitor(self, rhs: FollFlags) -> FollFlags {
        FollFlags(self.0 | rhs.0)
    }
}

/// Frames in address order, stored as runs of physically contiguous frames: pinning
/// 1 GiB of memory the allocator handed out in order costs a few entries, not a
/// quarter-million, and the runs are what a scatter-gather list is built from.
///
/// # Invariants
/// Every run has a count of at least 1; `len` is the sum of the counts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct PageRuns {
    runs: Vec<(Pfn, u32)>,
    len: usize,
}

impl PageRuns {
    fn push(&mut self, pfn: Pfn) {
        match self.runs.last_mut() {
            Some((first, n)) if first.0 + u64::from(*n) == pfn.0 && *n < u32::MAX => *n += 1,
            _ => self.runs.push((pfn, 1)),
        }
        self.len += 1;
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn iter(&self) -> impl Iterator<Item = Pfn> + '_ {
        self.runs
            .iter()
            .flat_map(|&(first, n)| (0..u64::from(n)).map(move |k| Pfn(first.0 + k)))
    }

    fn get(&self, mut i: usize) -> Option<Pfn> {
        for &(first, n) in &self.runs {
            if i < n as usize {
                return Some(Pfn(first.0 + i as u64));
            }
            i -= n as usize;
        }
        None
    }
}

/// What the walk holds each page by.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hold {
    Get,
    Pin,
}

/// GUP's policy for [`Mm::walk_range`]: every page faulted for the access, checked
/// against the flags (p2p memory needs `FOLL_PCI_P2PDMA`, a long-term pin moves
/// device-coherent memory to RAM first) and held by a reference or a pin.
struct GupWalk {
    access: Access,
    gup: FollFlags,
    hold: Hold,
    op: &'static str,
    start: VirtAddr,
    pages: PageRuns,
}

impl WalkOps for GupWalk {
    type Error = GupError;
    const UNIFORM: bool = true;

    fn want(&self, _i: usize) -> Want {
        Want::Fault(self.access)
    }

    fn visit(&mut self, i: usize, ptes: &[Pte], region: &Region) -> Visit<GupError> {
        let va = VirtAddr(self.start.0 + i as u64 * PAGE_SIZE);
        // The region decides for the whole run whether it may be held.
        let kind = region.kind();
        if let Some((provider, _)) = kind.p2p() {
            if !self.gup.contains(FollFlags::PCI_P2PDMA) {
                return Visit::Stop {
                    taken: 0,
                    error: GupError::RemoteIo {
                        op: self.op,
                        addr: va,
                        provider,
                    },
                };
            }
        } else if kind.is_device_coherent() && self.gup.contains(FollFlags::LONGTERM) {
            return Visit::Migrate { taken: 0 };
        }
        // The pins first, touching only frame metadata; then the frame list, kept
        // apart so the locked adds never wait behind stores to the list.
        let pin = self.hold == Hold::Pin;
        let grabbed = ptes
            .iter()
            .take_while(|pte| region.try_grab(pte.pfn().unwrap_or_else(|| unreachable!()), pin))
            .count();
        for pte in &ptes[..grabbed] {
            self.pages.push(pte.pfn().unwrap_or_else(|| unreachable!()));
        }
        if grabbed < ptes.len() {
            // A count at its limit: the kernel's try_grab_folio fails with ENOMEM.
            return Visit::Stop {
                taken: grabbed,
                error: GupError::Mm(MmError::NoMemory {
                    op: self.op,
                    addr: VirtAddr(va.0 + grabbed as u64 * PAGE_SIZE),
                    why: "the page's reference or pin count is at its limit".into(),
                    source: None,
                }),
            };
        }
        Visit::All
    }
}

/// The common walk: `npages` pages from `start`, each made to satisfy the access and
/// held; stops at the first refusal, keeping what it took.
fn walk(
    mm: &Arc<Mm>,
    start: VirtAddr,
    npages: usize,
    gup: FollFlags,
    hold: Hold,
    op: &'static str,
) -> (PageRuns, Option<GupError>) {
    let start = VirtAddr(start.0 & !(PAGE_SIZE - 1));
    // gup_must_unshare(): a read-only pin needs an exclusive anonymous page; a
    // long-term one also copies the zero page and file pages of a private mapping.
    let access = if gup.contains(FollFlags::WRITE) {
        Access::Write
    } else if hold == Hold::Pin && gup.contains(FollFlags::LONGTERM) {
        Access::Unshare
    } else if hold == Hold::Pin {
        Access::Pin
    } else {
        Access::Read
    };
    let mut w = GupWalk {
        access,
        gup,
        hold,
        op,
        start,
        pages: PageRuns::default(),
    };
    let stopped = mm
        .walk_range(start, npages, &mut w, op)
        .err()
        .map(|e| match e {
            // check_vma_flags(): GUP without FOLL_FORCE on a VMA that forbids the access
            // (a write to a read-only mapping, anything on PROT_NONE) is EFAULT, where the
            // CPU's own access is a permission fault.
            GupError::Mm(MmError::Access { op, addr, why }) => {
                GupError::Mm(MmError::Fault { op, addr, why })
            }
            e => e,
        });
    (w.pages, stopped)
}

fn check_args(gup: FollFlags, hold: Hold, op: &'static str) -> Result<(), GupError> {
    if gup.contains(FollFlags::LONGTERM) && hold != Hold::Pin {
        return Err(GupError::Invalid {
            op,
            why: "FOLL_LONGTERM is only valid with FOLL_PIN",
        });
    }
    if gup.contains(FollFlags::LONGTERM | FollFlags::PCI_P2PDMA) {
        return Err(GupError::Invalid {
            op,
            why: "FOLL_LONGTERM with FOLL_PCI_P2PDMA: p2p providers must stay removable",
        });
    }
    Ok(())
}

/// As the kernel returns it: a partial result keeps its reason, an empty one is the
/// error that stopped it.
fn nothing_is_an_error(
    pages: &PageRuns,
    npages: usize,
    stopped: Option<GupError>,
    op: &'static str,
    start: VirtAddr,
) -> Result<Option<GupError>, GupError> {
    if pages.is_empty() && npages > 0 {
        return Err(stopped.unwrap_or(GupError::Mm(MmError::Fault {
            op,
            addr: start,
            why: "no page could be taken",
        })));
    }
    Ok(stopped)
}

/// Pages pinned for DMA; dropping the value unpins them (and marks them dirty when
/// pinned for writing, as `unpin_user_pages_dirty_lock` does).
///
/// # Invariants
/// Each frame in `pages` carries one pin taken by this value.
pub struct PinnedPages {
    mm: Arc<Mm>,
    start: VirtAddr,
    pages: PageRuns,
    requested: usize,
    stopped: Option<GupError>,
    write: bool,
}

impl std::fmt::Debug for PinnedPages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinnedPages")
            .field("start", &self.start)
            .field("pinned", &self.pages.len)
            .field("requested", &self.requested)
            .finish()
    }
}

impl PinnedPages {
    /// The pinned frames, in address order from `start`.
    pub fn pages(&self) -> Vec<Pfn> {
        self.pages.iter().collect()
    }
    /// The `i`th pinned frame.
    pub fn page(&self, i: usize) -> Option<Pfn> {
        self.pages.get(i)
    }
    /// The pinned frames as runs of physically contiguous frames `(first, count)`.
    pub fn runs(&self) -> &[(Pfn, u32)] {
        &self.pages.runs
    }
    /// How many were pinned.
    pub fn len(&self) -> usize {
        self.pages.len
    }
    /// Whether none were (never true for a returned value).
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }
    /// How many were asked for.
    pub fn requested(&self) -> usize {
        self.requested
    }
    /// Why the walk stopped early, when it pinned fewer than requested.
    pub fn stopped_by(&self) -> Option<&GupError> {
        self.stopped.as_ref()
    }
    /// The first user address.
    pub fn start(&self) -> VirtAddr {
        self.start
    }
    /// Unpins now (the same as dropping).
    pub fn unpin(self) {}
}

impl Drop for PinnedPages {
    fn drop(&mut self) {
        for &(first, n) in &self.pages.runs {
            let region = self.mm.region(first);
            region.unpin_run(first, u64::from(n), self.write);
        }
    }
}

/// Pages held by reference (`FOLL_GET`); dropping the value puts them.
///
/// # Invariants
/// Each frame in `pages` carries one reference taken by this value.
pub struct GotPages {
    mm: Arc<Mm>,
    pages: PageRuns,
    stopped: Option<GupError>,
}

impl std::fmt::Debug for GotPages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GotPages")
            .field("pages", &self.pages.len)
            .finish()
    }
}

impl GotPages {
    /// The frames, in address order.
    pub fn pages(&self) -> Vec<Pfn> {
        self.pages.iter().collect()
    }
    /// Why the walk stopped early.
    pub fn stopped_by(&self) -> Option<&GupError> {
        self.stopped.as_ref()
    }
}

impl Drop for GotPages {
    fn drop(&mut self) {
        self.mm.put_frames(&self.pages());
    }
}

/// `pin_user_pages(start, npages, gup_flags)`: pins up to `npages` pages for DMA.
/// Returns the pinned pages (possibly fewer than asked, with the reason), or the error
/// that stopped it before the first page.
pub fn pin_user_pages(
    mm: &Arc<Mm>,
    start: VirtAddr,
    npages: usize,
    gup: FollFlags,
) -> Result<PinnedPages, GupError> {
    let op = "pin_user_pages";
    check_args(gup, Hold::Pin, op)?;
    mm.set_has_pinned();
    let (pages, stopped) = walk(mm, start, npages, gup, Hold::Pin, op);
    let stopped = nothing_is_an_error(&pages, npages, stopped, op, start)?;
    Ok(PinnedPages {
        mm: mm.clone(),
        start,
        pages,
        requested: npages,
        stopped,
        write: gup.contains(FollFlags::WRITE),
    })
}

/// `get_user_pages(start, npages, gup_flags)`: takes a reference on up to `npages`
/// pages. `LONGTERM` is invalid here.
pub fn get_user_pages(
    mm: &Arc<Mm>,
    start: VirtAddr,
    npages: usize,
    gup: FollFlags,
) -> Result<GotPages, GupError> {
    let op = "get_user_pages";
    check_args(gup, Hold::Get, op)?;
    let (pages, stopped) = walk(mm, start, npages, gup, Hold::Get, op);
    let stopped = nothing_is_an_error(&pages, npages, stopped, op, start)?;
    Ok(GotPages {
        mm: mm.clone(),
        pages,
        stopped,
    })
}
