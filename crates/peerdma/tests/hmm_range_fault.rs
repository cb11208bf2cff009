//! `hmm_range_fault` by the rules of mm/hmm.c: `hmm_pte_need_fault` decides from the
//! request (`default_flags`, per-page flags under `pfn_flags_mask`) whether a page is
//! faulted; `hmm_vma_walk_hole` / `hmm_vma_walk_test` give ERROR or EFAULT outside
//! readable VMAs; `hmm_vma_handle_pte` reports the caller's own device-private pages
//! in place; `hmm_vma_fault` is EPERM for a write to a read-only VMA; and the call is
//! EBUSY whenever the subscription's sequence moved.

mod common;

use peerdma::addr::{VirtAddr, PAGE_SIZE};
use peerdma::errno::Errno;
use peerdma::hmm::{hmm_range_fault, HmmPfn, HmmRange};
use peerdma::mem::RegionKind;
use peerdma::mm::{Mm, MmError, Prot};
use peerdma::notifier::{IntervalNotifier, IntervalNotifierOps, NotifyRange, Subscription};
use peerdma::sync::Arc;

struct Nop;
impl IntervalNotifierOps for Nop {
    fn invalidate(&self, _: &Subscription, _: &NotifyRange, _: u64) -> bool {
        true
    }
}

fn page(a: VirtAddr, i: u64) -> VirtAddr {
    VirtAddr(a.0 + i * PAGE_SIZE)
}

fn subscribe(mm: &Arc<Mm>, a: VirtAddr, pages: u64) -> IntervalNotifier {
    mm.notifier().subscribe(a, pages * PAGE_SIZE, Arc::new(Nop))
}

/// What a driver does: take a sequence, call, and on EBUSY begin again.
fn fault_until_done(
    mm: &Mm,
    sub: &IntervalNotifier,
    a: VirtAddr,
    pages: u64,
    set: impl Fn(&mut HmmRange<'_>),
) -> Result<Vec<HmmPfn>, MmError> {
    for _ in 0..16 {
        let mut r = HmmRange::new(sub, a, page(a, pages));
        set(&mut r);
        match hmm_range_fault(mm, &mut r) {
            Err(MmError::Busy { .. }) => continue,
            Err(e) => return Err(e),
            Ok(()) if sub.read_retry(r.notifier_seq) => continue,
            Ok(()) => return Ok(r.pfns),
        }
    }
    panic!("never settled")
}

fn snapshot(mm: &Mm, sub: &IntervalNotifier, a: VirtAddr, pages: u64) -> Vec<HmmPfn> {
    fault_until_done(mm, sub, a, pages, |_| {}).unwrap()
}

#[test]
fn a_snapshot_faults_nothing_and_reports_each_kind_of_page() {
    let h = common::host(8 << 20);
    let p = h.spawn();
    // [absent, written, read-only written, PROT_NONE], then a hole with no VMA.
    let a = p.mmap_anon(5 * PAGE_SIZE, Prot::RW).unwrap();
    p.write(page(a, 1), b"rw").unwrap();
    p.write(page(a, 2), b"ro").unwrap();
    p.write(page(a, 3), b"no").unwrap();
    p.mprotect(page(a, 2), PAGE_SIZE, Prot::READ).unwrap();
    p.mprotect(page(a, 3), PAGE_SIZE, Prot::NONE).unwrap();
    p.munmap(page(a, 4), PAGE_SIZE).unwrap();
    let sub = subscribe(&p, a, 5);
    let pfns = snapshot(&p, &sub, a, 5);
    assert_eq!(pfns[0], HmmPfn::NONE, "absent and not asked to fault");
    assert!(pfns[1].contains(HmmPfn::VALID | HmmPfn::WRITE));
    assert_eq!(pfns[1].pfn(), p.pte(page(a, 1)).pfn());
    assert!(pfns[2].contains(HmmPfn::VALID) && !pfns[2].contains(HmmPfn::WRITE));
    assert_eq!(pfns[3], HmmPfn::ERROR, "a VMA without read permission");
    assert_eq!(pfns[4], HmmPfn::ERROR, "no VMA");
    assert!(pfns.iter().all(|f| f.map_order() == 0));
    assert!(p.pte(a).is_empty(), "nothing was faulted in");
}

#[test]
fn req_fault_populates_and_req_write_breaks_copy_on_write() {
    let h = common::host(8 << 20);
    let p = h.spawn();
    let a = p.mmap_anon(2 * PAGE_SIZE, Prot::RW).unwrap();
    p.write(page(a, 1), b"shared").unwrap();
    let child = p.fork().unwrap();
    let shared = p.pte(page(a, 1)).pfn();
    let sub = subscribe(&p, a, 2);
    // Read faults: page 0 populated, page 1 reported read-only (still shared).
    let pfns = fault_until_done(&p, &sub, a, 2, |r| r.default_flags = HmmPfn::REQ_FAULT).unwrap();
    assert!(pfns[0].contains(HmmPfn::VALID) && pfns[0].pfn() == p.pte(a).pfn());
    assert_eq!(pfns[1].pfn(), shared);
    assert!(!pfns[1].contains(HmmPfn::WRITE));
    // Write faults break COW: a new frame for this process, writable.
    let pfns = fault_until_done(&p, &sub, a, 2, |r| {
        r.default_flags = HmmPfn::REQ_FAULT | HmmPfn::REQ_WRITE
    })
    .unwrap();
    assert!(pfns[1].contains(HmmPfn::VALID | HmmPfn::WRITE));
    assert_ne!(pfns[1].pfn(), shared);
    assert_eq!(
        child.pte(page(a, 1)).pfn(),
        shared,
        "the child keeps the old page"
    );
    let mut b = [0u8; 6];
    p.read(page(a, 1), &mut b).unwrap();
    assert_eq!(&b, b"shared");
}

#[test]
fn per_page_requests_count_only_under_the_mask() {
    let h = common::host(8 << 20);
    let p = h.spawn();
    let a = p.mmap_anon(3 * PAGE_SIZE, Prot::RW).unwrap();
    let sub = subscribe(&p, a, 3);
    let pfns = fault_until_done(&p, &sub, a, 3, |r| {
        r.pfns[1] = HmmPfn::REQ_FAULT;
        // Page 2 asks to write without asking for a fault: no fault either way.
        r.pfns[2] = HmmPfn::REQ_WRITE;
        r.pfn_flags_mask = HmmPfn::REQ_FAULT | HmmPfn::REQ_WRITE;
    })
    .unwrap();
    assert_eq!(pfns[0], HmmPfn::NONE);
    assert!(pfns[1].contains(HmmPfn::VALID));
    assert_eq!(pfns[2], HmmPfn::NONE, "REQ_WRITE alone asks for no fault");
    assert!(p.pte(a).is_empty() && p.pte(page(a, 2)).is_empty());
    assert!(p.pte(page(a, 1)).is_present());
}

#[test]
fn refusals_are_eperm_efault_and_einval() {
    let h = common::host(8 << 20);
    let p = h.spawn();
    let a = p.mmap_anon(3 * PAGE_SIZE, Prot::RW).unwrap();
    p.mprotect(page(a, 1), PAGE_SIZE, Prot::READ).unwrap();
    p.mprotect(page(a, 2), PAGE_SIZE, Prot::NONE).unwrap();
    let sub = subscribe(&p, a, 4);
    let run = |from: u64, flags: HmmPfn| {
        let mut r = HmmRange::new(&sub, page(a, from), page(a, from + 1));
        r.default_flags = flags;
        hmm_range_fault(&p, &mut r).map_err(|e| e.errno())
    };
    let write = HmmPfn::REQ_FAULT | HmmPfn::REQ_WRITE;
    assert_eq!(run(1, write), Err(Errno::EPERM), "write to a read-only VMA");
    assert_eq!(run(1, HmmPfn::REQ_FAULT), Ok(()), "reading it is fine");
    assert_eq!(run(2, HmmPfn::REQ_FAULT), Err(Errno::EFAULT), "PROT_NONE");
    assert_eq!(run(3, HmmPfn::REQ_FAULT), Err(Errno::EFAULT), "no VMA");
    // Malformed ranges.
    let mut r = HmmRange::new(&sub, VirtAddr(a.0 + 1), page(a, 1));
    assert_eq!(
        hmm_range_fault(&p, &mut r).unwrap_err().errno(),
        Errno::EINVAL
    );
    let mut r = HmmRange::new(&sub, a, a);
    assert_eq!(
        hmm_range_fault(&p, &mut r).unwrap_err().errno(),
        Errno::EINVAL
    );
    let mut r = HmmRange::new(&sub, a, page(a, 2));
    r.pfns.pop();
    assert_eq!(
        hmm_range_fault(&p, &mut r).unwrap_err().errno(),
        Errno::EINVAL
    );
}

#[test]
fn device_private_pages_of_the_owner_stay_others_fault_back() {
    let h = common::host(8 << 20);
    let p = h.spawn();
    let mine = h
        .phys()
        .memremap_pages(RegionKind::DevicePrivate { owner: 1 }, 1 << 20)
        .unwrap();
    let theirs = h
        .phys()
        .memremap_pages(RegionKind::DevicePrivate { owner: 2 }, 1 << 20)
        .unwrap();
    let a = p.mmap_anon(2 * PAGE_SIZE, Prot::RW).unwrap();
    p.write(a, b"mine").unwrap();
    p.write(page(a, 1), b"theirs").unwrap();
    let m = p.migrate_page(a, &mine).unwrap();
    let t = p.migrate_page(page(a, 1), &theirs).unwrap();
    let sub = subscribe(&p, a, 2);
    let own = |r: &mut HmmRange<'_>| r.dev_private_owner = Some(1);
    // Snapshot: ours in place and writable; theirs not valid.
    let pfns = fault_until_done(&p, &sub, a, 2, own).unwrap();
    assert_eq!(pfns[0].pfn(), Some(m));
    assert!(pfns[0].contains(HmmPfn::WRITE));
    assert_eq!(pfns[1], HmmPfn::NONE);
    // Faulting, even for writing: ours still in place; theirs comes back to RAM.
    let pfns = fault_until_done(&p, &sub, a, 2, |r| {
        own(r);
        r.default_flags = HmmPfn::REQ_FAULT | HmmPfn::REQ_WRITE;
    })
    .unwrap();
    assert_eq!(pfns[0].pfn(), Some(m), "never faulted");
    assert!(p.pte(a).is_device_private());
    let back = pfns[1].pfn().unwrap();
    assert!(h.phys().ram().contains(back) && back != t);
    let mut b = [0u8; 6];
    p.read(page(a, 1), &mut b).unwrap();
    assert_eq!(&b, b"theirs");
}

#[test]
fn device_coherent_pages_are_ordinary_present_pages() {
    let (_h, dev, p, a) = common::one_page(RegionKind::DeviceCoherent { owner: 3 }, b"coh");
    let c = p.migrate_page(a, &dev).unwrap();
    let sub = subscribe(&p, a, 1);
    let pfns = snapshot(&p, &sub, a, 1);
    assert_eq!(pfns[0].pfn(), Some(c));
    assert!(pfns[0].contains(HmmPfn::WRITE));
}

#[test]
fn a_moved_sequence_is_ebusy() {
    let h = common::host(8 << 20);
    let p = h.spawn();
    let a = p.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
    p.write(a, b"x").unwrap();
    let sub = subscribe(&p, a, 1);
    let mut r = HmmRange::new(&sub, a, page(a, 1));
    // An invalidation of the range between read_begin and the call.
    p.madvise_dontneed(a, PAGE_SIZE).unwrap();
    assert_eq!(
        hmm_range_fault(&p, &mut r).unwrap_err().errno(),
        Errno::EBUSY
    );
    // A fresh sequence succeeds.
    let mut r = HmmRange::new(&sub, a, page(a, 1));
    hmm_range_fault(&p, &mut r).unwrap();
    assert_eq!(r.pfns[0], HmmPfn::NONE);
    // A fault that invalidates the range itself (a COW break) also reports EBUSY;
    // the retry with a new sequence then sees the new page without faulting.
    p.write(a, b"x").unwrap();
    let child = p.fork().unwrap();
    let write = HmmPfn::REQ_FAULT | HmmPfn::REQ_WRITE;
    let mut r = HmmRange::new(&sub, a, page(a, 1));
    r.default_flags = write;
    assert_eq!(
        hmm_range_fault(&p, &mut r).unwrap_err().errno(),
        Errno::EBUSY
    );
    assert_ne!(
        p.pte(a).pfn(),
        child.pte(a).pfn(),
        "the fault did break COW"
    );
    let mut r = HmmRange::new(&sub, a, page(a, 1));
    r.default_flags = write;
    hmm_range_fault(&p, &mut r).unwrap();
    assert_eq!(r.pfns[0].pfn(), p.pte(a).pfn());
    assert!(r.pfns[0].contains(HmmPfn::WRITE));
}

/// A device-exclusive entry (`make_device_exclusive`) is not present for the CPU: a
/// snapshot reports it not valid, a fault request restores the page (the device is
/// told with a `Clear` invalidation), and migration leaves it alone.
#[test]
fn device_exclusive_pages_are_faulted_back_not_reported() {
    let h = common::host(8 << 20);
    let p = h.spawn();
    let a = p.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
    p.write(a, b"atomic").unwrap();
    let pfn = p.make_device_exclusive(a, 9).unwrap().pfn();
    assert!(p.pte(a).is_device_exclusive() && p.pte(a).pfn() == Some(pfn));
    let m = p
        .migrate_vma_setup(a, page(a, 1), peerdma::mm::Select::SYSTEM, None)
        .unwrap();
    assert_eq!(m.cpages(), 0, "not collected");
    drop(m);
    let sub = subscribe(&p, a, 1);
    assert_eq!(snapshot(&p, &sub, a, 1), [HmmPfn::NONE]);
    let pfns = fault_until_done(&p, &sub, a, 1, |r| r.default_flags = HmmPfn::REQ_FAULT).unwrap();
    assert_eq!(pfns[0].pfn(), Some(pfn), "the same page, present again");
    assert!(p.pte(a).is_present());
    // Shared memory is not private anonymous.
    let obj = peerdma::mm::ShmObject::new(h.phys(), PAGE_SIZE);
    let s = p.mmap_shared(&obj, 0, PAGE_SIZE, Prot::RW).unwrap();
    let e = p.make_device_exclusive(s, 9).unwrap_err();
    assert_eq!(e.errno(), Errno::EOPNOTSUPP);
    p.exit();
    drop(obj);
}
