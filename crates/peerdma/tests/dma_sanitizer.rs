//! The DMA sanitizer: every device access is checked against the device's live
//! mappings; use after unmap, DMA to a frame migrated or freed since it was mapped, the
//! wrong direction, and running past a mapping are recorded violations with the
//! frame's history, and no byte moves.

mod common;

use peerdma::addr::{Bdf, DmaAddr, Pfn, PAGE_SIZE};
use peerdma::dma::{Direction, DmaError, SgTable, ViolationKind};
use peerdma::errno::Errno;
use peerdma::gup::{get_user_dma_sg, UserSg};
use peerdma::mem::RegionKind;
use peerdma::mm::Prot;

fn host(iommu: bool) -> common::Checked {
    common::bare(16 << 20, iommu)
}

fn gpu() -> Bdf {
    "0000:03:00.0".parse().unwrap()
}

#[test]
fn use_after_unmap_is_caught_with_iommu_and_without() {
    for iommu in [true, false] {
        let h = host(iommu);
        let d = h.dma().clone();
        let mm = h.spawn();
        let a = mm.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
        let sg = get_user_dma_sg(
            &mm,
            &d.attach(gpu()).unwrap(),
            UserSg::new(a, PAGE_SIZE, Direction::FromDevice),
        )
        .unwrap();
        let addr = sg.segments()[0].addr;
        d.attach(gpu()).unwrap().dma_write(addr, b"ok").unwrap();
        drop(sg);
        let e = d
            .attach(gpu())
            .unwrap()
            .dma_write(addr, b"late")
            .unwrap_err();
        let DmaError::Fault(v) = e else { panic!("{e}") };
        assert_eq!(v.kind, ViolationKind::Unmapped);
        assert_eq!(d.sanitizer().violations().len(), 1);
        if iommu {
            assert_eq!(d.iommu().faults().len(), 1, "the IOMMU saw it too");
        }
        let mut b = [0u8; 4];
        mm.read(a, &mut b).unwrap();
        assert_eq!(&b, b"ok\0\0", "the late write moved no byte");
    }
}

#[test]
fn dma_to_a_frame_migrated_since_mapping_is_caught() {
    let h = host(true);
    let d = h.dma().clone();
    let mm = h.spawn();
    let dev_mem = d
        .phys()
        .memremap_pages(RegionKind::DeviceCoherent { owner: 1 }, 1 << 20)
        .unwrap();
    let a = mm.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
    mm.write(a, &[1]).unwrap();
    // A driver that maps without pinning (the bug the rules forbid).
    let pfn: Pfn = mm.pte(a).pfn().unwrap();
    let sg = SgTable::from_runs(
        &[(pfn, 1)],
        0,
        PAGE_SIZE,
        d.attach(gpu()).unwrap().max_segment(),
    );
    let mapping = d
        .attach(gpu())
        .unwrap()
        .map_sg(&sg, Direction::Bidirectional)
        .unwrap();
    let addr = mapping.segments()[0].addr;
    mm.migrate_page(a, &dev_mem).unwrap();
    let e = d.attach(gpu()).unwrap().dma_write(addr, &[9]).unwrap_err();
    let DmaError::Fault(v) = e else { panic!("{e}") };
    assert!(matches!(v.kind, ViolationKind::StaleFrame { .. }), "{v}");
    assert_eq!(v.frame, Some(pfn));
    assert!(
        v.history.iter().any(|h| h.contains("mapped #")),
        "{:?}",
        v.history
    );
    assert!(v.to_string().contains("changed identity"), "{v}");
    let mut b = [0u8];
    mm.read(a, &mut b).unwrap();
    assert_eq!(b[0], 1, "the migrated page was not touched");
}

#[test]
fn wrong_direction_and_past_the_end_are_caught() {
    let h = host(false);
    let d = h.dma().clone();
    let mm = h.spawn();
    let a = mm.mmap_anon(2 * PAGE_SIZE, Prot::RW).unwrap();
    let sg = get_user_dma_sg(
        &mm,
        &d.attach(gpu()).unwrap(),
        UserSg::new(a, 100, Direction::ToDevice),
    )
    .unwrap();
    let addr = sg.segments()[0].addr;
    let mut buf = [0u8; 100];
    d.attach(gpu()).unwrap().dma_read(addr, &mut buf).unwrap();
    let e = d.attach(gpu()).unwrap().dma_write(addr, &[1]).unwrap_err();
    assert!(
        matches!(e, DmaError::Fault(ref v) if v.kind == ViolationKind::WrongDirection),
        "{e}"
    );
    let e = d
        .attach(gpu())
        .unwrap()
        .dma_read(DmaAddr(addr.0 + 50), &mut buf)
        .unwrap_err();
    assert!(
        matches!(e, DmaError::Fault(ref v) if v.kind == ViolationKind::PastEnd),
        "{e}"
    );
    // Another device cannot use this device's mapping.
    let other: Bdf = "0000:04:00.0".parse().unwrap();
    assert!(d
        .attach(other)
        .unwrap()
        .dma_read(addr, &mut buf[..1])
        .is_err());
    assert_eq!(d.sanitizer().violations().len(), 3);
}

#[test]
fn unmap_waits_for_dma_in_flight() {
    // A DMA holds its mapping: an unmap started meanwhile completes only after it.
    let h = host(true);
    let d = h.dma().clone();
    let mm = h.spawn();
    let a = mm.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
    let sg = get_user_dma_sg(
        &mm,
        &d.attach(gpu()).unwrap(),
        UserSg::new(a, PAGE_SIZE, Direction::FromDevice),
    )
    .unwrap();
    let addr = sg.segments()[0].addr;
    // Many concurrent writers and one unmapper: every write either lands whole before
    // the unmap or is refused after it; none lands after.
    let writers: Vec<_> = (0..4)
        .map(|i| {
            let d = d.clone();
            peerdma::sync::thread::spawn(move || {
                let mut ok = 0;
                for _ in 0..200 {
                    if d.attach(gpu())
                        .unwrap()
                        .dma_write(addr, &[i as u8 + 1; 64])
                        .is_ok()
                    {
                        ok += 1;
                    }
                }
                ok
            })
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(1));
    drop(sg);
    let frame_after_unmap = {
        let mut b = [0u8; 64];
        mm.read(a, &mut b).unwrap();
        b
    };
    let landed: u32 = writers.into_iter().map(|w| w.join().unwrap()).sum();
    let mut b = [0u8; 64];
    mm.read(a, &mut b).unwrap();
    assert_eq!(
        b, frame_after_unmap,
        "no DMA landed after the unmap returned"
    );
    assert!(landed > 0 || b == [0u8; 64]);
    assert!(
        b.iter().all(|&x| x == b[0]),
        "no torn write: every DMA completed whole"
    );
}

#[test]
fn device_private_memory_cannot_be_mapped_for_dma() {
    let h = host(true);
    let d = h.dma().clone();
    let dev_mem = d
        .phys()
        .memremap_pages(RegionKind::DevicePrivate { owner: 1 }, 1 << 20)
        .unwrap();
    let f = dev_mem.alloc().unwrap();
    let sg = SgTable::from_runs(
        &[(f, 1)],
        0,
        PAGE_SIZE,
        d.attach(gpu()).unwrap().max_segment(),
    );
    let e = d
        .attach(gpu())
        .unwrap()
        .map_sg(&sg, Direction::ToDevice)
        .unwrap_err();
    assert!(
        matches!(&e, DmaError::NotAddressable { pfn, .. } if *pfn == f),
        "{e}"
    );
    assert_eq!(e.errno(), Errno::EREMOTEIO);
    dev_mem.put(f);
}
