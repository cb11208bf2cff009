//! Device page maps with their owner's ops (`struct dev_pagemap_ops`): a CPU fault on
//! a device-private page goes to the owner's `migrate_to_ram` with the page-table lock
//! dropped (mm/memory.c `do_swap_page`), which migrates with `migrate_vma_*` from the
//! faulting page; the fault is retried afterwards and fails when the owner fails; the
//! last reference to a frame calls `page_free`; and device memory a BAR exposes is
//! reached by peers by bus address, as p2p memory is.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};

use peerdma::addr::{Bdf, Pfn, PAGE_SIZE};
use peerdma::dma::{Direction, MapKind};
use peerdma::errno::Errno;
use peerdma::gup::{get_user_dma_sg, UserSg};
use peerdma::mem::{PageMapOps, PeerReach, RegionKind};
use peerdma::mm::{set_migrate_to_ram, DeviceFault, MigrateToRam, MmError, Prot};
use peerdma::sync::{lock, Arc, Mutex};

const OWNER: u64 = 0x6770;

/// A device driver's page map: counts its callbacks; `migrate_to_ram` moves the page
/// from the fault (after `skip` calls that leave it where it is), or fails.
#[derive(Default)]
struct Driver {
    calls: AtomicUsize,
    skip: usize,
    fail: bool,
    freed: Mutex<Vec<Pfn>>,
    /// What `migrate_vma` from the fault collected, per call.
    collected: Mutex<Vec<usize>>,
    reach: Option<PeerReach>,
    /// Leave the move to peerdma's CPU copy (`DeviceFault::copy_to_ram`).
    copy: bool,
}

impl PageMapOps for Driver {
    fn page_free(&self, pfn: Pfn) {
        lock(&self.freed).push(pfn);
    }

    fn peer_reach(&self, _pfn: Pfn) -> Option<PeerReach> {
        self.reach
    }
}

impl MigrateToRam for Driver {
    fn migrate_to_ram(&self, fault: &DeviceFault<'_>) -> Result<(), MmError> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        // The page-table lock is not held: looking at the entry takes it.
        assert!(fault.mm().pte(fault.va()).is_device_private());
        if self.fail {
            return Err(MmError::Fault {
                op: "test driver",
                addr: fault.va(),
                why: "the device is wedged",
            });
        }
        if n < self.skip {
            return Ok(());
        }
        if self.copy {
            return fault.copy_to_ram();
        }
        // Another owner's selection takes nothing.
        assert_eq!(fault.migrate_vma(Some(OWNER + 1))?.cpages(), 0);
        let mut m = fault.migrate_vma(Some(OWNER))?;
        lock(&self.collected).push(m.cpages());
        let ram = fault.mm().phys().ram().clone();
        let new = ram.alloc().map_err(|e| MmError::NoMemory {
            op: "test driver",
            addr: fault.va(),
            why: "no RAM".into(),
            source: Some(e),
        })?;
        // Copy the collected page: it may differ from the one the fault saw.
        let src = m.src()[0].pfn.expect("collected");
        fault.region().copy_frame(src, &ram, new);
        m.set_dst(0, &ram, new);
        m.pages();
        m.finalize();
        Ok(())
    }
}

/// A host with a device-private region driven by `driver`, and a process whose page
/// holding `data` was migrated into it.
fn on_device(
    driver: Arc<Driver>,
    data: &[u8],
) -> (
    common::Checked,
    peerdma::host::Process,
    peerdma::addr::VirtAddr,
    Pfn,
) {
    let h = common::host(8 << 20);
    let dev = h
        .phys()
        .memremap_pages(RegionKind::DevicePrivate { owner: OWNER }, 1 << 20)
        .unwrap();
    assert!(dev.set_page_map_ops(driver.clone()));
    assert!(set_migrate_to_ram(&dev, driver));
    let p = h.spawn();
    let a = p.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
    p.write(a, data).unwrap();
    let pfn = p.migrate_page(a, &dev).unwrap();
    assert!(p.pte(a).is_device_private());
    (h, p, a, pfn)
}

#[test]
fn a_cpu_fault_calls_the_owners_migrate_to_ram_once() {
    let driver = Arc::new(Driver::default());
    let (_h, p, a, pfn) = on_device(driver.clone(), b"in vram");
    let mut b = [0u8; 7];
    p.read(a, &mut b).unwrap();
    assert_eq!(&b, b"in vram");
    assert_eq!(driver.calls.load(Ordering::SeqCst), 1);
    assert_eq!(
        *lock(&driver.collected),
        [1],
        "the faulting page was collected"
    );
    assert!(p.pte(a).is_present(), "back in RAM");
    assert_eq!(*lock(&driver.freed), [pfn], "page_free told the owner");
    // Present now: a second access does not call the owner.
    p.read(a, &mut b).unwrap();
    assert_eq!(driver.calls.load(Ordering::SeqCst), 1);
}

#[test]
fn a_fault_the_owner_did_not_resolve_is_retried() {
    let driver = Arc::new(Driver {
        skip: 2,
        ..Driver::default()
    });
    let (_h, p, a, _) = on_device(driver.clone(), b"retry");
    p.write(a, b"R").unwrap();
    assert_eq!(driver.calls.load(Ordering::SeqCst), 3);
    let mut b = [0u8; 5];
    p.read(a, &mut b).unwrap();
    assert_eq!(&b, b"Retry");
}

#[test]
fn a_failing_owner_fails_the_access_and_the_page_stays() {
    let driver = Arc::new(Driver {
        fail: true,
        ..Driver::default()
    });
    let (_h, p, a, pfn) = on_device(driver.clone(), b"stuck");
    let e = p.read(a, &mut [0u8; 5]).unwrap_err();
    assert_eq!(e.errno(), Errno::EFAULT);
    assert!(e.to_string().contains("wedged"), "{e}");
    assert_eq!(p.pte(a).pfn(), Some(pfn));
    assert!(p.pte(a).is_device_private());
}

#[test]
fn without_ops_the_cpu_copies_the_page_back() {
    let (h, dev, p, a) = common::one_page(RegionKind::DevicePrivate { owner: 1 }, b"plain");
    p.migrate_page(a, &dev).unwrap();
    let mut b = [0u8; 5];
    p.read(a, &mut b).unwrap();
    assert_eq!(&b, b"plain");
    assert!(h.phys().ram().contains(p.pte(a).pfn().unwrap()));
}

#[test]
fn device_memory_a_bar_exposes_is_reached_by_bus_address() {
    // VRAM-like device-coherent memory in the BAR of 0000:05:00.0 (under the switch);
    // 0000:06:00.0 on the same switch reaches it by bus address, bypassing the IOMMU,
    // as it would p2p memory.
    let h = common::workstation(16 << 20, true);
    let provider: Bdf = "0000:05:00.0".parse().unwrap();
    let bus_offset = 0x4000_0000_0000;
    let vram = h
        .phys()
        .memremap_pages(RegionKind::DeviceCoherent { owner: OWNER }, 1 << 20)
        .unwrap();
    assert!(vram.set_page_map_ops(Arc::new(Driver {
        reach: Some(PeerReach {
            provider,
            bus_offset
        }),
        ..Driver::default()
    })));
    let p = h.spawn();
    let a = p.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
    p.write(a, b"vram").unwrap();
    let pfn = p.migrate_page(a, &vram).unwrap();
    let peer = common::attach(&h, "0000:06:00.0");
    let sg = get_user_dma_sg(&p, &peer, UserSg::new(a, PAGE_SIZE, Direction::ToDevice)).unwrap();
    let seg = sg.segments()[0];
    assert_eq!(seg.kind, MapKind::BusAddr);
    assert_eq!(seg.addr.0, pfn.0 * PAGE_SIZE + bus_offset);
    let mut b = [0u8; 4];
    peer.dma_read(seg.addr, &mut b).unwrap();
    assert_eq!(&b, b"vram");
    assert_eq!(peer.stats().via_switch, 4);
    drop(sg);
    // The same memory without a BAR behind it goes through the IOMMU like RAM.
    let plain = h
        .phys()
        .memremap_pages(RegionKind::DeviceCoherent { owner: OWNER }, 1 << 20)
        .unwrap();
    p.migrate_page(a, &plain).unwrap();
    let sg = get_user_dma_sg(&p, &peer, UserSg::new(a, PAGE_SIZE, Direction::ToDevice)).unwrap();
    assert_eq!(sg.segments()[0].kind, MapKind::Iova);
}

#[test]
fn a_device_page_shared_by_fork_is_copied_out_for_the_faulting_process_only() {
    let (_h, dev, p, a) = common::one_page(RegionKind::DevicePrivate { owner: 1 }, b"shared");
    let pfn = p.migrate_page(a, &dev).unwrap();
    let child = p.fork().unwrap();
    assert_eq!(child.pte(a).pfn(), Some(pfn), "fork shares the device page");
    let mut b = [0u8; 6];
    child.read(a, &mut b).unwrap();
    assert_eq!(&b, b"shared");
    assert!(child.pte(a).is_present(), "the child has a RAM copy");
    assert_eq!(
        p.pte(a).pfn(),
        Some(pfn),
        "the parent keeps the device page"
    );
    assert_eq!(dev.meta(pfn).refcount(), 1);
    p.read(a, &mut b).unwrap();
    assert_eq!(&b, b"shared");
    assert!(p.pte(a).is_present());
}

/// Records each invalidation's event and owner.
struct Heard(Mutex<Vec<(peerdma::notifier::NotifyEvent, Option<u64>)>>);

impl peerdma::notifier::IntervalNotifierOps for Heard {
    fn invalidate(
        &self,
        _: &peerdma::notifier::Subscription,
        r: &peerdma::notifier::NotifyRange,
        _: u64,
    ) -> bool {
        lock(&self.0).push((r.event, r.owner));
        true
    }
}

#[test]
fn the_owner_hears_when_peerdmas_cpu_copy_moves_its_page() {
    // A mirror skips invalidations its own device announces (MIGRATE with its owner),
    // so a move the owner leaves to peerdma's CPU copy must not carry the owner: the
    // soak found the test device still mapping a page this copy had moved.
    let driver = Arc::new(Driver {
        copy: true,
        ..Driver::default()
    });
    let (_h, p, a, _) = on_device(driver.clone(), b"copied");
    let heard = Arc::new(Heard(Mutex::new(Vec::new())));
    let _sub = p.notifier().subscribe(a, PAGE_SIZE, heard.clone());
    let mut b = [0u8; 6];
    p.read(a, &mut b).unwrap();
    assert_eq!(&b, b"copied");
    assert!(p.pte(a).is_present());
    assert_eq!(
        *lock(&heard.0),
        [(peerdma::notifier::NotifyEvent::Migrate, None)]
    );
}
