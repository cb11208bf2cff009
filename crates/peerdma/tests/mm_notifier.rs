//! Every page-table change is preceded by the interval-notifier invalidation of its
//! range (mm/mmu_notifier.c's contract): a subscriber's callback always runs while the
//! old entry is still in place, with the event that names the change, and a blocking
//! callback (a device draining DMA) holds the change back until it returns.

mod common;

use peerdma::addr::{Pfn, VirtAddr, PAGE_SIZE};
use peerdma::mem::RegionKind;
use peerdma::mm::{Mm, Prot, Pte};
use peerdma::notifier::{IntervalNotifierOps, NotifyEvent, NotifyRange, Subscription};
use peerdma::sync::{lock, Arc, Mutex, Weak};

/// Records (event, the PTE of the first page both the range and the subscription cover,
/// as it was when called back).
struct Recorder {
    mm: Mutex<Weak<Mm>>,
    seen: Mutex<Vec<(NotifyEvent, Pte)>>,
}

impl IntervalNotifierOps for Recorder {
    fn invalidate(&self, sub: &Subscription, range: &NotifyRange, _seq: u64) -> bool {
        let first = range.start.max(sub.range.start);
        let pte = lock(&self.mm)
            .upgrade()
            .map_or(Pte::EMPTY, |mm| mm.pte(first));
        lock(&self.seen).push((range.event, pte));
        true
    }
}

fn setup() -> (
    common::Checked,
    peerdma::host::Process,
    VirtAddr,
    Arc<Recorder>,
    peerdma::notifier::IntervalNotifier,
) {
    let h = common::host(16 << 20);
    let _phys = h.phys().clone();
    let mm = h.spawn();
    let a = mm.mmap_anon(2 * PAGE_SIZE, Prot::RW).unwrap();
    mm.write(a, &[1]).unwrap();
    let rec = Arc::new(Recorder {
        mm: Mutex::new(Arc::downgrade(&mm)),
        seen: Mutex::new(Vec::new()),
    });
    let sub = mm.notifier().subscribe(a, 2 * PAGE_SIZE, rec.clone());
    (h, mm, a, rec, sub)
}

fn last(rec: &Recorder) -> (NotifyEvent, Pte) {
    *lock(&rec.seen).last().expect("a callback")
}

#[test]
fn munmap_notifies_unmap_before_clearing() {
    let (_p, mm, a, rec, _sub) = setup();
    let old = mm.pte(a);
    mm.munmap(a, PAGE_SIZE).unwrap();
    assert_eq!(last(&rec), (NotifyEvent::Unmap, old));
    assert!(mm.pte(a).is_empty());
}

#[test]
fn mprotect_notifies_protection_change_before_write_protecting() {
    let (_p, mm, a, rec, _sub) = setup();
    mm.mprotect(a, PAGE_SIZE, Prot::READ).unwrap();
    let (ev, pte) = last(&rec);
    assert_eq!(ev, NotifyEvent::ProtectionChange);
    assert!(
        pte.writable(),
        "still writable when the subscriber hears of it"
    );
    assert!(!mm.pte(a).writable());
}

#[test]
fn madvise_dontneed_notifies_clear() {
    let (_p, mm, a, rec, _sub) = setup();
    let old = mm.pte(a);
    mm.madvise_dontneed(a, PAGE_SIZE).unwrap();
    assert_eq!(last(&rec), (NotifyEvent::Clear, old));
}

#[test]
fn fork_notifies_before_write_protecting_and_cow_break_before_replacing() {
    let (_p, mm, a, rec, _sub) = setup();
    let child = mm.fork().unwrap();
    let (ev, pte) = last(&rec);
    assert_eq!(ev, NotifyEvent::ProtectionChange);
    assert!(pte.writable());
    // The parent's page is now shared; the child writes first (its own COW), then the
    // parent finds itself the only user and reuses without notification... so make the
    // parent write while the child still shares the page.
    let shared = mm.pte(a);
    mm.write(a, &[2]).unwrap();
    assert_eq!(
        last(&rec),
        (NotifyEvent::Clear, shared),
        "COW break replaces the page"
    );
    assert_ne!(mm.pte(a).pfn(), shared.pfn());
    drop(child);
}

#[test]
fn migration_notifies_migrate_before_moving() {
    let (h, mm, a, rec, _sub) = setup();

    let phys = h.phys().clone();
    let dev = phys
        .memremap_pages(RegionKind::DevicePrivate { owner: 9 }, 1 << 20)
        .unwrap();
    let old = mm.pte(a);
    let new = mm.migrate_page(a, &dev).unwrap();
    assert_eq!(last(&rec), (NotifyEvent::Migrate, old));
    assert_eq!(mm.pte(a).pfn(), Some(new));
    // And back on CPU access, again announced.
    mm.read(a, &mut [0u8]).unwrap();
    assert_eq!(last(&rec), (NotifyEvent::Migrate, Pte::device(new, true)));
}

#[test]
fn exit_notifies_release() {
    let (_p, mm, a, rec, _sub) = setup();
    let old = mm.pte(a);
    mm.exit();
    assert_eq!(last(&rec), (NotifyEvent::Release, old));
}

#[test]
fn a_reader_that_raced_munmap_retries() {
    let (_p, mm, a, _rec, sub) = setup();
    let seq = sub.read_begin();
    mm.munmap(VirtAddr(a.0 + PAGE_SIZE), PAGE_SIZE).unwrap();
    assert!(sub.read_retry(seq));
}

/// A device with DMA in flight: its callback blocks until the DMA completes.
struct Draining {
    in_flight: Mutex<bool>,
    done: peerdma::sync::Condvar,
    order: Mutex<Vec<&'static str>>,
}

impl IntervalNotifierOps for Draining {
    fn invalidate(&self, _sub: &Subscription, _r: &NotifyRange, _seq: u64) -> bool {
        let mut busy = lock(&self.in_flight);
        while *busy {
            busy = peerdma::sync::wait(&self.done, busy);
        }
        lock(&self.order).push("drained");
        true
    }
}

#[test]
fn munmap_waits_for_in_flight_dma_to_drain() {
    let h = common::host(16 << 20);
    let phys = h.phys().clone();
    let mm = h.spawn();
    let a = mm.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
    mm.write(a, &[5]).unwrap();
    let pfn: Pfn = mm.pte(a).pfn().unwrap();
    let dev = Arc::new(Draining {
        in_flight: Mutex::new(true),
        done: peerdma::sync::Condvar::new(),
        order: Mutex::new(Vec::new()),
    });
    let _sub = mm.notifier().subscribe(a, PAGE_SIZE, dev.clone());
    let t = {
        let mm = mm.clone();
        let dev = dev.clone();
        peerdma::sync::thread::spawn(move || {
            mm.munmap(a, PAGE_SIZE).unwrap();
            lock(&dev.order).push("unmapped");
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert!(
        lock(&dev.order).is_empty(),
        "munmap must wait while DMA is in flight"
    );
    assert_eq!(mm.pte(a).pfn(), Some(pfn), "the entry is still in place");
    // The DMA finishes: write into the frame, then signal.
    phys.ram().write(pfn, 0, &[6]);
    *lock(&dev.in_flight) = false;
    dev.done.notify_all();
    t.join().unwrap();
    assert_eq!(*lock(&dev.order), ["drained", "unmapped"]);
}
