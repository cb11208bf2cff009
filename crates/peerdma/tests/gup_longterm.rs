//! Which memory may be pinned, and how, after tools/testing/selftests/mm/gup_longterm.c
//! and the FOLL_* rules of mm/gup.c, plus device memory: device-private pages are
//! migrated to RAM by any pin, device-coherent ones by a long-term pin, and p2p pages
//! need FOLL_PCI_P2PDMA and never take FOLL_LONGTERM.

mod common;

use peerdma::addr::{Bdf, VirtAddr, PAGE_SIZE};
use peerdma::gup::{get_user_pages, pin_user_pages, FollFlags, GupError};
use peerdma::mem::RegionKind;
use peerdma::mm::{Prot, ShmObject};

fn host() -> (common::Checked, peerdma::host::Process) {
    let h = common::host(64 << 20);
    let _phys = h.phys().clone();
    let mm = h.spawn();
    (h, mm)
}

#[test]
fn longterm_pin_of_anonymous_memory_works() {
    let (h, mm) = host();

    let phys = h.phys().clone();
    let a = mm.mmap_anon(8 * PAGE_SIZE, Prot::RW).unwrap();
    let pin = pin_user_pages(&mm, a, 8, FollFlags::WRITE | FollFlags::LONGTERM).unwrap();
    assert_eq!(pin.len(), 8, "faulted in and pinned");
    for p in pin.pages() {
        assert_eq!(phys.ram().meta(p).pincount(), 1);
    }
    drop(pin);
    assert!(mm.resident_pages() == 8);
}

#[test]
fn longterm_pin_of_shared_memory_object_works() {
    // gup_longterm.c: memfd / shmem may be long-term pinned.
    let (h, mm) = host();
    let obj = ShmObject::new(mm.phys(), 4 * PAGE_SIZE);
    let a = mm.mmap_shared(&obj, 0, 4 * PAGE_SIZE, Prot::RW).unwrap();
    let pin = pin_user_pages(&mm, a, 4, FollFlags::WRITE | FollFlags::LONGTERM).unwrap();
    assert_eq!(pin.len(), 4);
    let other = h.spawn();
    let b = other.mmap_shared(&obj, 0, 4 * PAGE_SIZE, Prot::RW).unwrap();
    assert_eq!(other.pte(b).pfn(), None);
    other.write(b, b"dma").unwrap();
    assert_eq!(
        other.pte(b).pfn(),
        Some(pin.pages()[0]),
        "the pinned page is the object's page"
    );
}

#[test]
fn longterm_without_pin_is_invalid() {
    let (_h, mm) = host();
    let a = mm.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
    let e = get_user_pages(&mm, a, 1, FollFlags::LONGTERM).unwrap_err();
    assert_eq!(e.errno(), 22);
}

/// mm/gup.c `check_vma_flags`: without FOLL_FORCE, a write pin of a read-only VMA and
/// any pin of a PROT_NONE VMA fail with EFAULT (not the CPU's EACCES).
#[test]
fn write_pin_of_read_only_mapping_is_refused_with_efault() {
    let (_h, mm) = host();
    let a = mm.mmap_anon(PAGE_SIZE, Prot::READ).unwrap();
    let e = pin_user_pages(&mm, a, 1, FollFlags::WRITE).unwrap_err();
    assert_eq!(e.errno(), 14, "{e}");
    let e = get_user_pages(&mm, a, 1, FollFlags::WRITE).unwrap_err();
    assert_eq!(e.errno(), 14, "{e}");
    assert_eq!(pin_user_pages(&mm, a, 1, FollFlags::NONE).unwrap().len(), 1);
    // The CPU's own write is a permission fault.
    assert_eq!(mm.write(a, b"x").unwrap_err().errno(), 13);
}

#[test]
fn any_pin_of_a_prot_none_mapping_is_refused_with_efault() {
    let (_h, mm) = host();
    let a = mm.mmap_anon(2 * PAGE_SIZE, Prot::RW).unwrap();
    mm.write(a, b"x").unwrap();
    mm.mprotect(a, 2 * PAGE_SIZE, Prot::NONE).unwrap();
    for flags in [FollFlags::NONE, FollFlags::WRITE] {
        assert_eq!(pin_user_pages(&mm, a, 2, flags).unwrap_err().errno(), 14);
        assert_eq!(get_user_pages(&mm, a, 2, flags).unwrap_err().errno(), 14);
    }
}

#[test]
fn partial_pin_reports_how_many_and_why() {
    let (_h, mm) = host();
    let a = mm.mmap_anon(3 * PAGE_SIZE, Prot::RW).unwrap();
    let pin = pin_user_pages(&mm, a, 5, FollFlags::WRITE).unwrap();
    assert_eq!((pin.len(), pin.requested()), (3, 5));
    assert_eq!(
        pin.stopped_by().unwrap().errno(),
        14,
        "EFAULT past the mapping"
    );
    let e = pin_user_pages(&mm, VirtAddr(a.0 + 3 * PAGE_SIZE), 1, FollFlags::NONE).unwrap_err();
    assert_eq!(e.errno(), 14, "an error before the first page is an error");
}

#[test]
fn any_pin_migrates_device_private_pages_to_ram_first() {
    let (h, mm) = host();

    let phys = h.phys().clone();
    let dev = phys
        .memremap_pages(RegionKind::DevicePrivate { owner: 0xd1 }, 16 << 20)
        .unwrap();
    let a = mm.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
    mm.write(a, b"moved").unwrap();
    let on_dev = mm.migrate_page(a, &dev).unwrap();
    assert!(dev.contains(on_dev));
    assert!(mm.pte(a).is_device_private() && !mm.pte(a).is_present());
    let pin = pin_user_pages(&mm, a, 1, FollFlags::NONE).unwrap();
    let p = pin.pages()[0];
    assert!(phys.ram().contains(p), "pinned page is system RAM");
    let mut buf = [0u8; 5];
    phys.ram().read(p, 0, &mut buf);
    assert_eq!(&buf, b"moved");
    assert_eq!(dev.free_frames(), dev.frames(), "the device page was freed");
}

#[test]
fn cpu_access_migrates_device_private_pages_back() {
    let (h, mm) = host();

    let phys = h.phys().clone();
    let dev = phys
        .memremap_pages(RegionKind::DevicePrivate { owner: 1 }, 1 << 20)
        .unwrap();
    let a = mm.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
    mm.write(a, b"abc").unwrap();
    let d = mm.migrate_page(a, &dev).unwrap();
    let gen = dev.meta(d).generation();
    let mut buf = [0u8; 3];
    mm.read(a, &mut buf).unwrap();
    assert_eq!(&buf, b"abc");
    assert!(mm.pte(a).is_present() && phys.ram().contains(mm.pte(a).pfn().unwrap()));
    assert_ne!(
        dev.meta(d).generation(),
        gen,
        "the device frame's identity changed"
    );
}

#[test]
fn longterm_pin_migrates_device_coherent_pages_but_a_short_pin_does_not() {
    let (h, mm) = host();

    let phys = h.phys().clone();
    let coh = phys
        .memremap_pages(RegionKind::DeviceCoherent { owner: 2 }, 1 << 20)
        .unwrap();
    let a = mm.mmap_anon(2 * PAGE_SIZE, Prot::RW).unwrap();
    mm.write(a, &[7u8; 8192]).unwrap();
    let c0 = mm.migrate_page(a, &coh).unwrap();
    let c1 = mm.migrate_page(VirtAddr(a.0 + PAGE_SIZE), &coh).unwrap();
    assert!(mm.pte(a).is_present(), "coherent memory is CPU-addressable");
    let short = pin_user_pages(&mm, VirtAddr(a.0 + PAGE_SIZE), 1, FollFlags::NONE).unwrap();
    assert_eq!(
        short.pages(),
        [c1],
        "a short pin may hold device-coherent memory"
    );
    let long = pin_user_pages(&mm, a, 1, FollFlags::LONGTERM).unwrap();
    assert!(
        phys.ram().contains(long.pages()[0]),
        "a long-term pin may not"
    );
    assert_ne!(long.pages()[0], c0);
    let mut b = [0u8];
    phys.ram().read(long.pages()[0], 0, &mut b);
    assert_eq!(b[0], 7);
}

#[test]
fn p2p_pages_need_pci_p2pdma_and_refuse_longterm() {
    let (h, mm) = host();

    let phys = h.phys().clone();
    let bar = phys
        .memremap_pages(
            RegionKind::P2p {
                provider: Bdf::new(0, 5, 0, 0).unwrap(),
                bar: 4,
                bus_offset: 0,
            },
            1 << 20,
        )
        .unwrap();
    let frames: Vec<_> = (0..2).map(|_| bar.alloc().unwrap()).collect();
    let a = mm.mmap_pages(&frames, Prot::RW, None).unwrap();
    let e = pin_user_pages(&mm, a, 2, FollFlags::WRITE).unwrap_err();
    assert!(matches!(e, GupError::RemoteIo { .. }), "{e}");
    assert_eq!(e.errno(), 121);
    assert!(e.to_string().contains("0000:05:00.0"), "{e}");
    let e = pin_user_pages(&mm, a, 2, FollFlags::PCI_P2PDMA | FollFlags::LONGTERM).unwrap_err();
    assert_eq!(e.errno(), 22);
    let pin = pin_user_pages(&mm, a, 2, FollFlags::WRITE | FollFlags::PCI_P2PDMA).unwrap();
    assert_eq!(pin.pages(), frames.as_slice());
    // A p2p mapping is never faulted in beyond what was inserted.
    assert_eq!(
        mm.read(VirtAddr(a.0 + 2 * PAGE_SIZE), &mut [0u8])
            .unwrap_err()
            .errno(),
        14
    );
    // The driver's own references (vm_insert_page took the mapping's).
    drop(pin);
    bar.put_many(&frames);
}

#[test]
fn a_pinned_page_is_never_migrated() {
    let (h, mm) = host();

    let phys = h.phys().clone();
    let dev = phys
        .memremap_pages(RegionKind::DevicePrivate { owner: 3 }, 1 << 20)
        .unwrap();
    let a = mm.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
    mm.write(a, &[1]).unwrap();
    let pin = pin_user_pages(&mm, a, 1, FollFlags::NONE).unwrap();
    let e = mm.migrate_page(a, &dev).unwrap_err();
    assert_eq!(e.errno(), 16, "{e}");
    assert_eq!(mm.pte(a).pfn(), Some(pin.pages()[0]));
    drop(pin);
    assert!(
        mm.migrate_page(a, &dev).is_ok(),
        "movable again after unpin"
    );
}
