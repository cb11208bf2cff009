//! Deterministic reproductions of the races the multi-threaded soak (tests/soak.rs)
//! found, one per bug, each pinning the kernel behaviour that closes it. The race
//! window is opened on purpose: an interval-notifier callback runs at a known point in
//! the racing operation (after its invalidation started, before its entry changes) and
//! does the other side's work there.
//!
//! - migration installs a migration entry under the page-table lock and copies only
//!   after it (mm/migrate.c `migrate_folio` with `folio_ref_freeze`): a CPU write that
//!   began first lands in the copy, one that comes later waits;
//! - two migrations of one page serialise on the page lock (`folio_trylock`);
//! - a copy-on-write break holds a reference on the old page (`wp_page_copy`), so a
//!   racing pin cannot make that page exclusive and keep it;
//! - a fault that races another fault or migration retries (`VM_FAULT_RETRY`), it does
//!   not report EBUSY;
//! - a DMA access is valid when any live mapping of the device covers it in its
//!   direction;
//! - p2p removal zaps only the provider's pages (`unmap_mapping_range`), keeps the
//!   VMAs, and orders itself against mmaps and forks in progress.

mod common;

use std::time::Duration;

use peerdma::addr::{Bdf, Pfn, VirtAddr, PAGE_SIZE};
use peerdma::dma::{Direction, DmaError, ViolationKind};
use peerdma::gup::{get_user_dma_sg, pin_user_pages, FollFlags, UserSg};
use peerdma::mem::RegionKind;
use peerdma::mm::{Mm, Prot};
use peerdma::notifier::{
    IntervalNotifier, IntervalNotifierOps, NotifyEvent, NotifyRange, Subscription,
};
use peerdma::sync::{lock, Arc, Mutex};
use std::thread;

/// Runs `action` once, inside the first invalidation of `event` that hits the
/// subscription: the point where the racing operation has started and not yet changed
/// the entry.
struct Once {
    event: NotifyEvent,
    action: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl IntervalNotifierOps for Once {
    fn invalidate(&self, _s: &Subscription, r: &NotifyRange, _seq: u64) -> bool {
        if r.event == self.event {
            let f = lock(&self.action).take();
            if let Some(f) = f {
                f();
            }
        }
        true
    }
}

fn hook(
    mm: &Arc<Mm>,
    va: VirtAddr,
    event: NotifyEvent,
    action: impl FnOnce() + Send + 'static,
) -> (IntervalNotifier, Arc<Once>) {
    let ops = Arc::new(Once {
        event,
        action: Mutex::new(Some(Box::new(action))),
    });
    (mm.notifier().subscribe(va, PAGE_SIZE, ops.clone()), ops)
}

fn fired(ops: &Once) -> bool {
    lock(&ops.action).is_none()
}

fn read8(mm: &Mm, va: VirtAddr) -> [u8; 8] {
    let mut b = [0u8; 8];
    mm.read(va, &mut b).unwrap();
    b
}

/// Bug 1: a CPU write that lands after migration started but before the entry switch
/// used to go to the old frame, after the copy, and be lost.
#[test]
fn migration_keeps_a_cpu_write_that_raced_it() {
    let (_h, dev, mm, a) = common::one_page(RegionKind::DeviceCoherent { owner: 1 }, &[1; 8]);
    let writer = mm.clone();
    let (_sub, ops) = hook(&mm, a, NotifyEvent::Migrate, move || {
        // Another thread's write, finished before the migration goes on.
        thread::scope(|s| {
            s.spawn(|| writer.write(a, &[2; 8]).unwrap());
        });
    });
    let new = mm.migrate_page(a, &dev).unwrap();
    assert!(fired(&ops));
    assert!(dev.contains(new));
    assert_eq!(read8(&mm, a), [2; 8], "the racing write was lost");
}

/// Bug 2, deterministic: a second migration of the page runs to completion inside the
/// first's invalidation. Both succeed; the page ends where the outer one put it, with
/// its data, and no frame is lost or handed out twice.
#[test]
fn a_migration_nested_in_another_of_the_same_page_moves_it_twice() {
    let h = common::host(8 << 20);
    let phys = h.phys().clone();
    let dev = phys
        .memremap_pages(RegionKind::DeviceCoherent { owner: 1 }, 1 << 20)
        .unwrap();
    let mm = h.spawn();
    let a = mm.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
    mm.write(a, b"payload!").unwrap();
    let (inner_mm, inner_dev) = (mm.clone(), dev.clone());
    let inner = Arc::new(Mutex::new(None));
    let inner_out = inner.clone();
    let (sub, ops) = hook(&mm, a, NotifyEvent::Migrate, move || {
        *lock(&inner_out) = Some(inner_mm.migrate_page(a, &inner_dev));
    });
    let outer = mm.migrate_page(a, phys.ram()).unwrap();
    assert!(fired(&ops));
    let inner = lock(&inner).take().unwrap().unwrap();
    assert!(
        dev.contains(inner),
        "the inner migration went to the device"
    );
    assert!(
        phys.ram().contains(outer),
        "the outer one moved it on to RAM"
    );
    assert_eq!(mm.pte(a).pfn(), Some(outer));
    assert_eq!(&read8(&mm, a), b"payload!");
    let q = h.quiescent();
    assert_eq!(q.regions.len(), 1, "the device frame was freed: {q}");
    assert_eq!(q.frames(), 1, "one RAM frame, the page's: {q}");
    drop(sub);
    mm.exit();
    h.quiescent().assert_clean();
}

/// Bug 2 as the soak met it: two threads migrating one page back and forth used to
/// free the source under each other and panic on an overlapping copy.
#[test]
fn concurrent_migrations_of_one_page_keep_data_and_frames() {
    let h = common::host(8 << 20);
    let phys = h.phys().clone();
    let dev = phys
        .memremap_pages(RegionKind::DevicePrivate { owner: 1 }, 1 << 20)
        .unwrap();
    let mm = h.spawn();
    let a = mm.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
    mm.write(a, b"payload!").unwrap();
    thread::scope(|s| {
        for t in 0..2 {
            let (mm, dev, phys) = (&mm, &dev, &phys);
            s.spawn(move || {
                for i in 0..2_000 {
                    let target = if (i + t) % 2 == 0 { dev } else { phys.ram() };
                    mm.migrate_page(a, target).unwrap();
                }
            });
        }
    });
    assert_eq!(&read8(&mm, a), b"payload!");
    assert_eq!(h.quiescent().frames(), 1, "one frame, wherever it ended");
    mm.exit();
    h.quiescent().assert_clean();
}

/// Bug 3: the copy-on-write break decided to copy, then the other sharer exited and a
/// pin made the page exclusive and wrote it through DMA; the break then swapped in its
/// stale copy, so the process no longer mapped its pinned page and lost the write.
#[test]
fn cow_break_keeps_a_reference_so_a_racing_pin_keeps_its_page() {
    let h = common::host(8 << 20);
    let phys = h.phys().clone();
    let parent = h.spawn();
    let a = parent.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
    parent.write(a, &[1; 8]).unwrap();
    let child = parent.fork().unwrap();
    let pinned = Arc::new(Mutex::new(None));
    let (p2, pin_out, phys2) = (parent.clone(), pinned.clone(), phys.clone());
    let (_sub, ops) = hook(&parent, a, NotifyEvent::Clear, move || {
        // The other sharer goes away, then a driver pins the page for DMA and the
        // device writes it.
        child.exit();
        let pin = pin_user_pages(&p2, a, 1, FollFlags::WRITE).unwrap();
        let pfn = pin.pages()[0];
        phys2.region(pfn).unwrap().write(pfn, 8, &[9; 8]);
        *lock(&pin_out) = Some(pin);
    });
    // The write fault that breaks COW (it writes bytes 0..8; the device wrote 8..16).
    parent.write(a, &[3; 8]).unwrap();
    assert!(fired(&ops));
    let pin = lock(&pinned).take().unwrap();
    assert_eq!(
        parent.pte(a).pfn(),
        Some(pin.pages()[0]),
        "the process must map the page pinned for DMA"
    );
    let mut b = [0u8; 16];
    parent.read(a, &mut b).unwrap();
    assert_eq!(b, [[3u8; 8], [9u8; 8]].concat()[..], "a write was lost");
}

fn device_private_page() -> (common::Checked, peerdma::host::Process, VirtAddr) {
    let (h, dev, mm, a) = common::one_page(RegionKind::DevicePrivate { owner: 1 }, b"on-dev!!");
    mm.migrate_page(a, &dev).unwrap();
    assert!(mm.pte(a).is_device_private());
    (h, mm, a)
}

/// Bug 4: a CPU read of a device-private page whose migration back to RAM raced
/// another fault of the same page returned EBUSY; the kernel retries the fault.
#[test]
fn cpu_fault_on_device_private_page_retries_after_a_racing_fault() {
    let (_h, mm, a) = device_private_page();
    let other = mm.clone();
    let (_sub, ops) = hook(&mm, a, NotifyEvent::Migrate, move || {
        thread::scope(|s| {
            s.spawn(|| assert_eq!(&read8(&other, a), b"on-dev!!"));
        });
    });
    assert_eq!(&read8(&mm, a), b"on-dev!!");
    assert!(fired(&ops));
    assert!(mm.pte(a).is_present());
}

/// Bug 4 for pins and writes: a pin of a device-private page racing a CPU write that
/// faults the same page back succeeds, and both see one page.
#[test]
fn pin_of_device_private_page_retries_after_a_racing_write() {
    let (_h, mm, a) = device_private_page();
    let other = mm.clone();
    let (_sub, ops) = hook(&mm, a, NotifyEvent::Migrate, move || {
        thread::scope(|s| {
            s.spawn(|| other.write(a, b"cpu").unwrap());
        });
    });
    let pin = pin_user_pages(&mm, a, 1, FollFlags::WRITE).unwrap();
    assert!(fired(&ops));
    assert_eq!(mm.pte(a).pfn(), Some(pin.pages()[0]));
    assert_eq!(&read8(&mm, a), b"cpudev!!");
}

fn host(iommu: bool) -> common::Checked {
    common::workstation(32 << 20, iommu)
}

fn nic() -> Bdf {
    "0000:03:00.0".parse().unwrap()
}

/// Bug 5: one page mapped twice for a device (FromDevice and ToDevice) without an IOMMU
/// has one DMA address; the engine took the first record it found and refused a valid
/// access as WrongDirection. Likewise a two-page and a one-page mapping of the same
/// pages, in either order, and a refusal still names the real violation.
#[test]
fn dma_through_overlapping_mappings_uses_one_that_allows_it() {
    let h = host(false);
    let mm = h.spawn();
    let a = mm.mmap_anon(2 * PAGE_SIZE, Prot::RW).unwrap();
    mm.write(a, &[5; 16]).unwrap();
    let map = |len, dir| {
        get_user_dma_sg(
            &mm,
            &h.dma().attach(nic()).unwrap(),
            UserSg::new(a, len, dir),
        )
        .unwrap()
    };
    let to = map(PAGE_SIZE, Direction::ToDevice);
    let from = map(PAGE_SIZE, Direction::FromDevice);
    let addr = to.segments()[0].addr;
    assert_eq!(addr, from.segments()[0].addr, "no IOMMU: one DMA address");
    h.dma()
        .attach(nic())
        .unwrap()
        .dma_write(addr, &[7; 8])
        .unwrap();
    let mut b = [0u8; 8];
    h.dma()
        .attach(nic())
        .unwrap()
        .dma_read(addr, &mut b)
        .unwrap();
    assert_eq!(b, [7; 8]);
    drop((to, from));
    for order in [[1, 2], [2, 1]] {
        let maps: Vec<_> = order
            .iter()
            .map(|&n| map(n * PAGE_SIZE, Direction::Bidirectional))
            .collect();
        let mut two = vec![0u8; 2 * PAGE_SIZE as usize];
        h.dma()
            .attach(nic())
            .unwrap()
            .dma_read(addr, &mut two)
            .unwrap();
        assert_eq!(&two[..8], &[7; 8]);
        drop(maps);
    }
    assert!(
        h.dma().sanitizer().is_clean(),
        "{:?}",
        h.dma().sanitizer().violations()
    );
    // Only ToDevice mappings: a device write is a real violation, and says so.
    let to1 = map(PAGE_SIZE, Direction::ToDevice);
    let to2 = map(PAGE_SIZE, Direction::ToDevice);
    match h.dma().attach(nic()).unwrap().dma_write(addr, &[1; 8]) {
        Err(DmaError::Fault(v)) => assert_eq!(v.kind, ViolationKind::WrongDirection),
        other => panic!("expected a WrongDirection fault, got {other:?}"),
    }
    drop((to1, to2));
    assert_eq!(h.quiescent().dma_mappings, 0);
}

/// Bug 6: removal munmapped every range ever recorded, whatever was mapped there now:
/// anonymous memory the process mapped where its p2p buffer had been was lost. The
/// kernel zaps only the device file's pages and keeps the VMAs.
#[test]
fn p2p_removal_zaps_only_the_providers_pages() {
    let h = host(false);
    let p = common::cmb(&h);
    let mm = h.spawn();
    let old = p.mmap(&mm, 2 * PAGE_SIZE, true, 0, Prot::RW).unwrap();
    mm.munmap(old, 2 * PAGE_SIZE).unwrap();
    let anon = mm.mmap_anon(2 * PAGE_SIZE, Prot::RW).unwrap();
    assert_eq!(anon, old, "first fit reuses the address");
    mm.write(anon, b"anonymous").unwrap();
    let live = p.mmap(&mm, PAGE_SIZE, true, 0, Prot::RW).unwrap();
    mm.write(live, b"cmb").unwrap();
    // Many map/unmap cycles record one address space, not one entry per mapping.
    for _ in 0..1000 {
        let v = p.mmap(&mm, PAGE_SIZE, true, 0, Prot::RW).unwrap();
        mm.munmap(v, PAGE_SIZE).unwrap();
    }
    assert_eq!(p.recorded_users(), 1);
    p.remove(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 9];
    mm.read(anon, &mut b).unwrap();
    assert_eq!(&b, b"anonymous", "removal touched unrelated memory");
    assert!(
        mm.vma(live).is_some(),
        "the p2p VMA stays, as in the kernel"
    );
    assert!(mm.pte(live).is_empty());
    assert_eq!(mm.read(live, &mut b).unwrap_err().errno(), 14);
}

/// Bug 7: an mmap that passed the "removing" check and then waited for the
/// address-space lock recorded its mapping after removal had drained the list, so
/// removal timed out with the pages mapped. Now removal waits for the mmap in
/// progress and then zaps it.
#[test]
fn p2p_removal_waits_for_an_mmap_in_progress_and_zaps_it() {
    let h = host(false);
    let p = common::cmb(&h);
    let mm = h.spawn();
    let other = mm.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
    // A munmap that holds the address-space lock until released.
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let (entered_tx, entered_rx) = std::sync::mpsc::channel::<()>();
    let release_rx = Mutex::new(release_rx);
    let (_sub, _ops) = hook(&mm, other, NotifyEvent::Unmap, move || {
        entered_tx.send(()).unwrap();
        lock(&release_rx).recv().unwrap();
    });
    thread::scope(|s| {
        let unmapper = s.spawn(|| mm.munmap(other, PAGE_SIZE).unwrap());
        entered_rx.recv().unwrap();
        let mapper = s.spawn(|| p.mmap(&mm, 4 * PAGE_SIZE, true, 0, Prot::RW));
        // The mmap has allocated and now waits for the address-space lock.
        while p.available() == p.size() {
            thread::sleep(Duration::from_millis(1));
        }
        let remover = s.spawn(|| p.remove(Some(Duration::from_secs(10))));
        thread::sleep(Duration::from_millis(20));
        release_tx.send(()).unwrap();
        unmapper.join().unwrap();
        let va = mapper.join().unwrap().unwrap();
        remover.join().unwrap().unwrap();
        assert!(mm.pte(va).is_empty(), "removal zapped the late mapping");
    });
    assert!(h.quiescent().p2p.is_empty());
}

/// Bug 7 for forks: a child forked from a process mapping the CMB, whose parent then
/// unmapped it, still holds the pages; `remove(None)` zaps the child and completes,
/// woken by the last page reference.
#[test]
fn p2p_removal_zaps_a_forked_child_and_completes() {
    let h = host(false);
    let p = common::cmb(&h);
    let parent = h.spawn();
    let va = p.mmap(&parent, PAGE_SIZE, true, 0, Prot::RW).unwrap();
    parent.write(va, b"x").unwrap();
    let child = parent.fork().unwrap();
    let grandchild = child.fork().unwrap();
    parent.munmap(va, PAGE_SIZE).unwrap();
    let pin = pin_user_pages(&grandchild, va, 1, FollFlags::PCI_P2PDMA).unwrap();
    let pfn: Pfn = pin.pages()[0];
    thread::scope(|s| {
        let remover = s.spawn(|| p.remove(None));
        // Removal zaps both copies, then waits for the pin.
        while !child.pte(va).is_empty() || !grandchild.pte(va).is_empty() {
            thread::sleep(Duration::from_millis(1));
        }
        assert!(!remover.is_finished());
        assert!(p.region().meta(pfn).pincount() == 1);
        drop(pin);
        remover.join().unwrap().unwrap();
    });
    assert!(child.vma(va).is_some(), "zapped, not unmapped");
    assert!(
        h.quiescent().p2p.is_empty(),
        "the removed provider holds nothing"
    );
}
