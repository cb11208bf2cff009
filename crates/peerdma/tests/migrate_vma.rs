//! migrate_vma as mm/migrate_device.c defines it and lib/test_hmm.c's
//! MIGRATE_TO_DEV / MIGRATE_TO_SYS use it: setup collects the selected pages under one
//! `Migrate` invalidation carrying the owner and replaces their entries with migration
//! entries (faults wait on them); the caller allocates and copies; pages re-checks;
//! finalize installs the new entries, restores the rest, unlocks and drops the old
//! pages. Pinned pages, pages shared after fork and other owners' device pages stay.

mod common;

use std::sync::mpsc;
use std::time::Duration;

use peerdma::addr::{Pfn, VirtAddr, PAGE_SIZE};
use peerdma::gup::{pin_user_pages, FollFlags};
use peerdma::mem::{Region, RegionKind};
use peerdma::mm::{Mm, Prot, Select};
use peerdma::notifier::{IntervalNotifierOps, NotifyEvent, NotifyRange, Subscription};
use peerdma::sync::{lock, Arc, Mutex};
use std::thread;

const OWNER: u64 = 0xd1;

fn setup(
    pages: u64,
) -> (
    common::Checked,
    Arc<Region>,
    peerdma::host::Process,
    VirtAddr,
) {
    let h = common::host(16 << 20);
    let phys = h.phys().clone();
    let dev = phys
        .memremap_pages(RegionKind::DevicePrivate { owner: OWNER }, 4 << 20)
        .unwrap();
    let mm = h.spawn();
    let a = mm.mmap_anon(pages * PAGE_SIZE, Prot::RW).unwrap();
    (h, dev, mm, a)
}

fn page(a: VirtAddr, i: u64) -> VirtAddr {
    VirtAddr(a.0 + i * PAGE_SIZE)
}

/// MIGRATE_TO_DEV as test_hmm.c does it: collect system pages, allocate device pages,
/// copy, pages, finalize.
fn migrate_to_dev(mm: &Mm, dev: &Arc<Region>, start: VirtAddr, n: u64) -> usize {
    let mut m = mm
        .migrate_vma_setup(start, page(start, n), Select::SYSTEM, Some(OWNER))
        .unwrap();
    for (i, s) in m.src().iter().enumerate() {
        if !s.migrate {
            continue;
        }
        let d = dev.alloc().unwrap();
        if let Some(p) = s.pfn {
            mm.phys().region(p).unwrap().copy_frame(p, dev, d);
        }
        m.set_dst(i, dev, d);
    }
    m.pages();
    let moved = m.cpages();
    m.finalize();
    moved
}

#[test]
fn migrate_to_device_moves_data_and_the_cpu_faults_it_back() {
    let (h, dev, mm, a) = setup(4);

    let phys = h.phys().clone();
    for i in 0..4 {
        mm.write(page(a, i), &[i as u8 + 1; 16]).unwrap();
    }
    let free_ram = phys.ram().free_frames();
    assert_eq!(migrate_to_dev(&mm, &dev, a, 4), 4);
    for i in 0..4 {
        let pte = mm.pte(page(a, i));
        assert!(pte.is_device_private() && dev.contains(pte.pfn().unwrap()));
    }
    assert_eq!(
        phys.ram().free_frames(),
        free_ram + 4,
        "the RAM pages went back"
    );
    for i in 0..4 {
        let mut b = [0u8; 16];
        mm.read(page(a, i), &mut b).unwrap();
        assert_eq!(b, [i as u8 + 1; 16]);
    }
    assert_eq!(
        dev.free_frames(),
        dev.frames(),
        "faults brought every page back"
    );
}

#[test]
fn empty_entries_of_anonymous_memory_are_migrated_as_new_pages() {
    let (_h, dev, mm, a) = setup(2);
    mm.write(a, b"x").unwrap();
    let m = mm
        .migrate_vma_setup(a, page(a, 2), Select::SYSTEM, Some(OWNER))
        .unwrap();
    let src = m.src();
    assert!(src[0].pfn.is_some() && src[0].migrate && src[0].write);
    assert!(
        src[1].pfn.is_none() && src[1].migrate,
        "pte_none: MIGRATE, no page"
    );
    drop(m);
    assert_eq!(migrate_to_dev(&mm, &dev, a, 2), 2);
    assert!(
        mm.pte(page(a, 1)).is_device_private(),
        "inserted on the device"
    );
    let mut b = [9u8; 4];
    mm.read(page(a, 1), &mut b).unwrap();
    assert_eq!(b, [0; 4], "a new page reads as zeros");
}

#[test]
fn pinned_pages_shared_pages_and_other_owners_pages_stay() {
    let (h, dev, mm, a) = setup(4);

    let phys = h.phys().clone();
    for i in 0..4 {
        mm.write(page(a, i), &[7]).unwrap();
    }
    let pin = pin_user_pages(&mm, page(a, 0), 1, FollFlags::WRITE).unwrap();
    let child = mm.fork().unwrap(); // page 1.. are now shared copy-on-write
    mm.write(page(a, 2), &[8]).unwrap(); // page 2 is exclusive again
    let other = phys
        .memremap_pages(RegionKind::DevicePrivate { owner: 0xbad }, 1 << 20)
        .unwrap();
    mm.migrate_page(page(a, 2), &other).unwrap();
    let before: Vec<_> = (0..4).map(|i| mm.pte(page(a, i))).collect();
    let m = mm
        .migrate_vma_setup(
            a,
            page(a, 4),
            Select::SYSTEM | Select::DEVICE_PRIVATE,
            Some(OWNER),
        )
        .unwrap();
    let src = m.src();
    assert!(!src[0].migrate, "pinned");
    assert!(!src[1].migrate && !src[3].migrate, "shared with the child");
    assert!(!src[2].migrate, "device-private page of another owner");
    assert_eq!(m.cpages(), 0);
    m.finalize();
    let after: Vec<_> = (0..4).map(|i| mm.pte(page(a, i))).collect();
    assert_eq!(before, after, "nothing collected, nothing changed");
    drop((pin, child));
    assert_eq!(dev.free_frames(), dev.frames());
}

#[test]
fn an_abandoned_migration_restores_every_entry() {
    let (h, dev, mm, a) = setup(3);

    let phys = h.phys().clone();
    for i in 0..3 {
        mm.write(page(a, i), &[i as u8]).unwrap();
    }
    let before: Vec<_> = (0..3).map(|i| mm.pte(page(a, i))).collect();
    let free = (phys.ram().free_frames(), dev.free_frames());
    {
        let mut m = mm
            .migrate_vma_setup(a, page(a, 3), Select::SYSTEM, None)
            .unwrap();
        assert_eq!(m.cpages(), 3);
        assert!(mm.pte(a).is_migration());
        // A destination handed over and then abandoned goes back too.
        let d = dev.alloc().unwrap();
        m.set_dst(1, &dev, d);
    }
    let after: Vec<_> = (0..3).map(|i| mm.pte(page(a, i))).collect();
    assert_eq!(before, after);
    assert_eq!((phys.ram().free_frames(), dev.free_frames()), free);
    for i in 0..3 {
        let p: Pfn = after[i as usize].pfn().unwrap();
        let r = phys.region(p).unwrap();
        assert_eq!(
            r.meta(p).refcount(),
            1,
            "the migration's reference went back"
        );
        mm.write(page(a, i), &[1]).unwrap(); // and the page lock: no wait here
    }
}

struct Events(Mutex<Vec<NotifyRange>>);

impl IntervalNotifierOps for Events {
    fn invalidate(&self, _s: &Subscription, r: &NotifyRange, _seq: u64) -> bool {
        lock(&self.0).push(*r);
        true
    }
}

#[test]
fn one_migrate_invalidation_covers_the_range_and_names_the_owner() {
    let (_h, dev, mm, a) = setup(8);
    for i in 0..8 {
        mm.write(page(a, i), &[1]).unwrap();
    }
    let ev = Arc::new(Events(Mutex::new(Vec::new())));
    let _sub = mm.notifier().subscribe(a, 8 * PAGE_SIZE, ev.clone());
    assert_eq!(migrate_to_dev(&mm, &dev, a, 8), 8);
    let seen = lock(&ev.0).clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(
        (seen[0].event, seen[0].start, seen[0].end, seen[0].owner),
        (NotifyEvent::Migrate, a, page(a, 8), Some(OWNER))
    );
}

#[test]
fn a_cpu_access_during_migration_waits_and_sees_the_new_page() {
    let (h, dev, mm, a) = setup(1);

    let phys = h.phys().clone();
    mm.write(a, b"before").unwrap();
    let mut m = mm
        .migrate_vma_setup(a, page(a, 1), Select::SYSTEM, None)
        .unwrap();
    let (tx, rx) = mpsc::channel();
    thread::scope(|s| {
        let reader = {
            let mm = mm.clone();
            s.spawn(move || {
                let mut b = [0u8; 6];
                mm.read(a, &mut b).unwrap();
                tx.send(()).unwrap();
                b
            })
        };
        assert!(
            rx.recv_timeout(Duration::from_millis(100)).is_err(),
            "the read must wait on the migration entry"
        );
        let src = m.src()[0].pfn.unwrap();
        let d = dev.alloc().unwrap();
        phys.ram().copy_frame(src, &dev, d);
        dev.write(d, 0, b"after!");
        m.set_dst(0, &dev, d);
        m.pages();
        m.finalize();
        assert_eq!(&reader.join().unwrap(), b"after!");
    });
}

#[test]
fn setup_refuses_ranges_the_kernel_refuses() {
    let (_h, _dev, mm, a) = setup(2);
    let e = |s, e| {
        mm.migrate_vma_setup(s, e, Select::SYSTEM, None)
            .unwrap_err()
            .errno()
    };
    assert_eq!(e(VirtAddr(a.0 + 1), page(a, 1)), 22, "unaligned");
    assert_eq!(e(a, a), 22, "empty");
    assert_eq!(e(a, page(a, 3)), 22, "past the mapping");
    assert_eq!(e(VirtAddr(0x1000), VirtAddr(0x2000)), 14, "no mapping");
}
