//! Range operations over holes, as the kernel does them: mprotect changes VMA after
//! VMA and stops at the first hole with ENOMEM, keeping (and having announced) what it
//! changed (mm/mprotect.c `do_mprotect_pkey`); madvise(MADV_DONTNEED) drops every
//! mapped part of the range and then reports ENOMEM for the holes (mm/madvise.c
//! `madvise_walk_vmas`).

mod common;

use peerdma::addr::{VirtAddr, PAGE_SIZE};
use peerdma::errno::Errno;
use peerdma::mm::Prot;
use peerdma::notifier::{IntervalNotifierOps, NotifyEvent, NotifyRange, Subscription};
use peerdma::sync::{lock, Arc, Mutex};

#[derive(Default)]
struct Ranges(Mutex<Vec<(NotifyEvent, VirtAddr, VirtAddr)>>);

impl IntervalNotifierOps for Ranges {
    fn invalidate(&self, _: &Subscription, r: &NotifyRange, _: u64) -> bool {
        lock(&self.0).push((r.event, r.start, r.end));
        true
    }
}

fn page(a: VirtAddr, i: u64) -> VirtAddr {
    VirtAddr(a.0 + i * PAGE_SIZE)
}

/// Three written pages with the middle one unmapped, and a subscription over them.
fn with_hole() -> (
    common::Checked,
    peerdma::host::Process,
    VirtAddr,
    Arc<Ranges>,
    peerdma::notifier::IntervalNotifier,
) {
    let h = common::host(8 << 20);
    let p = h.spawn();
    let a = p.mmap_anon(3 * PAGE_SIZE, Prot::RW).unwrap();
    p.write(a, &[7; 3 * PAGE_SIZE as usize]).unwrap();
    p.munmap(page(a, 1), PAGE_SIZE).unwrap();
    let rec = Arc::new(Ranges::default());
    let sub = p.notifier().subscribe(a, 3 * PAGE_SIZE, rec.clone());
    (h, p, a, rec, sub)
}

#[test]
fn mprotect_over_a_hole_changes_what_precedes_it_then_fails_enomem() {
    let (_h, p, a, rec, _sub) = with_hole();
    let e = p.mprotect(a, 3 * PAGE_SIZE, Prot::READ).unwrap_err();
    assert_eq!(e.errno(), Errno::ENOMEM);
    // The first page changed (and its subscribers heard of it); the third did not.
    assert_eq!(p.vma(a).unwrap().prot, Prot::READ);
    assert!(!p.pte(a).writable());
    assert_eq!(p.vma(page(a, 2)).unwrap().prot, Prot::RW);
    assert!(p.pte(page(a, 2)).writable());
    assert_eq!(
        *lock(&rec.0),
        [(NotifyEvent::ProtectionChange, a, page(a, 1))]
    );
    assert_eq!(p.write(a, b"x").unwrap_err().errno(), Errno::EACCES);
    p.write(page(a, 2), b"x").unwrap();
}

#[test]
fn mprotect_starting_in_a_hole_changes_nothing() {
    let (_h, p, a, rec, _sub) = with_hole();
    let e = p
        .mprotect(page(a, 1), 2 * PAGE_SIZE, Prot::READ)
        .unwrap_err();
    assert_eq!(e.errno(), Errno::ENOMEM);
    assert_eq!(p.vma(page(a, 2)).unwrap().prot, Prot::RW);
    assert!(lock(&rec.0).is_empty());
}

#[test]
fn madvise_dontneed_over_holes_drops_every_mapped_part_then_fails_enomem() {
    let (h, p, a, rec, _sub) = with_hole();
    let e = p.madvise_dontneed(a, 3 * PAGE_SIZE).unwrap_err();
    assert_eq!(e.errno(), Errno::ENOMEM);
    assert!(p.pte(a).is_empty() && p.pte(page(a, 2)).is_empty());
    assert_eq!(
        *lock(&rec.0),
        [
            (NotifyEvent::Clear, a, page(a, 1)),
            (NotifyEvent::Clear, page(a, 2), page(a, 3)),
        ]
    );
    let mut b = [1u8; 2];
    p.read(page(a, 2), &mut b).unwrap();
    assert_eq!(b, [0, 0], "anonymous memory reads as zeros again");
    assert_eq!(p.pte(page(a, 2)).pfn(), Some(peerdma::mem::ZERO_PFN));
    assert_eq!(
        h.quiescent().frames(),
        0,
        "a read maps the shared zero page"
    );
    // Nothing mapped at all: ENOMEM, nothing to do.
    let e = p.madvise_dontneed(page(a, 1), PAGE_SIZE).unwrap_err();
    assert_eq!(e.errno(), Errno::ENOMEM);
}
