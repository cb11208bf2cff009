//! The pinning walk and the RAII values it returns.

use std::ops::BitOr;

use crate::addr::{Pfn, VirtAddr, PAGE_SIZE};
use crate::gup::GupError;
use crate::mem::{flags, Region};
use crate::mm::{Access, Mm, MmError, Pte};
use crate::sync::atomic::Ordering;
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

enum Check {
    Ok,
    NeedsMigration,
    Refused(GupError),
}

enum Step {
    Held,
    NeedsMigration,
    Refused(GupError),
}

/// The common walk: `npages` pages from `start`, each made to satisfy the access and
/// held; stops at the first refusal. Runs of pages already in shape are taken under one
/// page-table lock, a leaf table at a time; the rest go through the fault path singly.
fn walk(
    mm: &Arc<Mm>,
    start: VirtAddr,
    npages: usize,
    gup: FollFlags,
    hold: Hold,
    op: &'static str,
) -> (PageRuns, Option<GupError>) {
    let start = VirtAddr(start.0 & !(PAGE_SIZE - 1));
    let access = if gup.contains(FollFlags::WRITE) {
        Access::Write
    } else if hold == Hold::Pin {
        Access::Unshare
    } else {
        Access::Read
    };
    let mut pages = PageRuns::default();
    let vmas = mm.mmap_read();
    let mut cur: Option<Arc<Region>> = None;
    // A count at its limit: the kernel's try_grab_folio fails with ENOMEM.
    let overflow = |va: VirtAddr| {
        GupError::Mm(MmError::NoMemory {
            op,
            addr: va,
            why: "the page's reference or pin count is at its limit".into(),
            source: None,
        })
    };
    // Whether frames of a region may be held with these flags.
    let take_check = |region: &Region, va: VirtAddr| -> Check {
        let kind = region.kind();
        match kind.p2p() {
            Some((provider, _)) if !gup.contains(FollFlags::PCI_P2PDMA) => {
                Check::Refused(GupError::RemoteIo {
                    op,
                    addr: va,
                    provider,
                })
            }
            _ if kind.is_device_coherent() && gup.contains(FollFlags::LONGTERM) => {
                Check::NeedsMigration
            }
            _ => Check::Ok,
        }
    };
    // Holds one frame the page table maps, under the page-table lock.
    let take = |pfn: Pfn, region: &Region, va: VirtAddr| -> Step {
        match take_check(region, va) {
            Check::Refused(e) => return Step::Refused(e),
            Check::NeedsMigration => return Step::NeedsMigration,
            Check::Ok => {}
        }
        if region.try_grab(pfn, hold == Hold::Pin) {
            Step::Held
        } else {
            Step::Refused(overflow(va))
        }
    };
    let mut i = 0;
    while i < npages {
        let va = VirtAddr(start.0 + i as u64 * PAGE_SIZE);
        // Fast path over the VMA holding `va`, if it allows the access.
        if let Some(v) = vmas
            .find(va)
            .filter(|v| v.prot.readable() && (access != Access::Write || v.prot.writable()))
        {
            let (anon, end) = (v.is_anon(), v.end);
            let pt = mm.pt_lock();
            while i < npages {
                let va = VirtAddr(start.0 + i as u64 * PAGE_SIZE);
                let left = ((end.0.saturating_sub(va.0)) / PAGE_SIZE) as usize;
                let run = pt.run(va);
                let n = run.len().min(left).min(npages - i);
                if n == 0 {
                    break;
                }
                // Pass 1, no atomics: how many leading pages are ready, all in one region.
                let first = run[0];
                let Some(pfn0) = first.pfn().filter(|_| first.is_present()) else {
                    break;
                };
                if !cur.as_ref().is_some_and(|r| r.contains(pfn0)) {
                    cur = Some(mm.region(pfn0));
                }
                let region = cur.as_deref().unwrap_or_else(|| unreachable!());
                let ready = |pte: &Pte| -> bool {
                    let Some(pfn) = pte.pfn().filter(|_| pte.is_present()) else {
                        return false;
                    };
                    region.contains(pfn)
                        && match access {
                            Access::Write => pte.writable(),
                            Access::Unshare => {
                                !anon || region.meta(pfn).test(flags::ANON_EXCLUSIVE)
                            }
                            Access::Read => true,
                        }
                };
                let m = run[..n].iter().take_while(|p| ready(p)).count();
                if m == 0 {
                    break;
                }
                // The region decides for the whole batch whether it may be held.
                match take_check(region, va) {
                    Check::Ok => {}
                    Check::NeedsMigration => break,
                    Check::Refused(e) => return (pages, Some(e)),
                }
                // Pass 2: the pins, touching only frame metadata. Pass 3: the frame list.
                // Kept apart so the locked adds never wait behind stores to the list.
                let grabbed = run[..m]
                    .iter()
                    .take_while(|pte| {
                        let pfn = pte.pfn().unwrap_or_else(|| unreachable!());
                        region.try_grab(pfn, hold == Hold::Pin)
                    })
                    .count();
                for pte in &run[..grabbed] {
                    pages.push(pte.pfn().unwrap_or_else(|| unreachable!()));
                }
                i += grabbed;
                if grabbed < m {
                    let va = VirtAddr(start.0 + i as u64 * PAGE_SIZE);
                    return (pages, Some(overflow(va)));
                }
            }
            drop(pt);
            if i >= npages {
                break;
            }
        }
        // Slow path for one page: fault it into shape, then take it.
        let va = VirtAddr(start.0 + i as u64 * PAGE_SIZE);
        let step = mm.with_page(&vmas, va, access, op, |_, pfn| {
            let region = mm.region(pfn);
            (take(pfn, &region, va), pfn)
        });
        match step {
            Ok((Step::Held, pfn)) => {
                pages.push(pfn);
                i += 1;
            }
            Ok((Step::NeedsMigration, _)) => {
                if let Err(e) = mm.migrate_to_ram(&vmas, va, op) {
                    return (pages, Some(e.into()));
                }
            }
            Ok((Step::Refused(e), _)) => return (pages, Some(e)),
            Err(e) => return (pages, Some(e.into())),
        }
    }
    (pages, None)
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
    mm.has_pinned.store(true, Ordering::Release);
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
