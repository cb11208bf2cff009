//! Fork, copy-on-write and pinning, after tools/testing/selftests/mm/cow.c: whatever
//! the order of pin, fork and write, a DMA-pinned page stays coherent with what the
//! pinning process sees, and the child sees the data as of fork time.

mod common;

use peerdma::addr::{VirtAddr, PAGE_SIZE};
use peerdma::gup::{get_user_pages, pin_user_pages, FollFlags};
use peerdma::host::{Host, Process};
use peerdma::mem::PhysMem;
use peerdma::mm::{Mm, MmError, Prot, ShmObject};

/// Every process exits; then the host must hold nothing.
fn finish(h: &Host, procs: impl IntoIterator<Item = Process>) {
    for p in procs {
        p.exit();
    }
    h.quiescent().assert_clean();
}

fn setup() -> (common::Checked, Process, VirtAddr) {
    let h = common::host(64 << 20);
    let mm = h.spawn();
    let a = mm.mmap_anon(4 * PAGE_SIZE, Prot::RW).unwrap();
    mm.write(a, &[0xaa; 4096]).unwrap();
    (h, mm, a)
}

fn read_byte(mm: &Mm, va: VirtAddr) -> u8 {
    let mut b = [0u8];
    mm.read(va, &mut b).unwrap();
    b[0]
}

fn frame_byte(phys: &PhysMem, pfn: peerdma::addr::Pfn) -> u8 {
    let mut b = [0u8];
    phys.region(pfn).unwrap().read(pfn, 0, &mut b);
    b[0]
}

#[test]
fn cow_child_and_parent_writes_stay_private() {
    let (h, parent, a) = setup();
    let child = parent.fork().unwrap();
    child.write(a, &[1]).unwrap();
    parent.write(a, &[2]).unwrap();
    assert_eq!((read_byte(&parent, a), read_byte(&child, a)), (2, 1));
    assert_ne!(parent.pte(a).pfn(), child.pte(a).pfn());
    finish(&h, [parent, child]);
}

#[test]
fn cow_last_user_reuses_the_page_without_copying() {
    let (h, parent, a) = setup();
    let before = parent.pte(a).pfn();
    let child = parent.fork().unwrap();
    assert!(!parent.pte(a).writable(), "fork write-protects the parent");
    child.exit(); // the parent is the page's only user again
    parent.write(a, &[3]).unwrap();
    assert_eq!(parent.pte(a).pfn(), before, "reused, not copied");
    finish(&h, [parent]);
}

#[test]
fn cow_ro_pin_then_fork_then_parent_write_keeps_the_pin_coherent() {
    // cow.c: "R/O-mapping a page registered as iouring fixed buffer" / ro pin + fork.
    let (h, parent, a) = setup();

    let phys = h.phys().clone();
    let pin = pin_user_pages(&parent, a, 1, FollFlags::LONGTERM).unwrap();
    let pinned = pin.pages()[0];
    let child = parent.fork().unwrap();
    parent.write(a, &[0x55]).unwrap();
    assert_eq!(
        frame_byte(&phys, pinned),
        0x55,
        "the pinned page sees the parent's write"
    );
    assert_eq!(
        parent.pte(a).pfn(),
        Some(pinned),
        "the parent kept the pinned page"
    );
    assert_eq!(
        read_byte(&child, a),
        0xaa,
        "the child got a copy at fork time"
    );
    drop(pin);
    finish(&h, [parent, child]);
}

#[test]
fn cow_write_pin_then_fork_gives_the_child_a_copy() {
    // cow.c: "R/W longterm GUP pin ... fork": the child must not share the pinned page.
    let (h, parent, a) = setup();

    let phys = h.phys().clone();
    let pin = pin_user_pages(&parent, a, 1, FollFlags::WRITE | FollFlags::LONGTERM).unwrap();
    let pinned = pin.pages()[0];
    let child = parent.fork().unwrap();
    assert_ne!(child.pte(a).pfn(), Some(pinned));
    assert!(
        parent.pte(a).writable(),
        "the parent's pinned page stays writable"
    );
    // DMA into the pinned page: the parent sees it, the child does not.
    phys.region(pinned).unwrap().write(pinned, 0, &[0x77]);
    assert_eq!((read_byte(&parent, a), read_byte(&child, a)), (0x77, 0xaa));
    // Unpinned pages of the same VMA were shared COW as usual.
    let b = VirtAddr(a.0 + PAGE_SIZE);
    parent.write(b, &[9]).unwrap();
    assert_eq!(read_byte(&child, b), 0);
    drop(pin);
    finish(&h, [parent, child]);
}

#[test]
fn cow_ro_pin_of_a_shared_page_unshares_it_first() {
    // cow.c: "R/O GUP pin on R/O-mapped shared page": the pin must not stay on a page
    // the next write fault would copy away from.
    let (h, parent, a) = setup();

    let phys = h.phys().clone();
    let child = parent.fork().unwrap();
    let shared = parent.pte(a).pfn().unwrap();
    assert_eq!(child.pte(a).pfn(), Some(shared));
    let pin = pin_user_pages(&parent, a, 1, FollFlags::NONE).unwrap();
    let pinned = pin.pages()[0];
    assert_ne!(pinned, shared, "unshare copied the page for the pinner");
    parent.write(a, &[0x11]).unwrap();
    assert_eq!(
        frame_byte(&phys, pinned),
        0x11,
        "the write landed in the pinned page"
    );
    assert_eq!(read_byte(&child, a), 0xaa);
    drop(pin);
    finish(&h, [parent, child]);
}

#[test]
fn cow_get_without_pin_does_not_unshare() {
    // FOLL_GET has no coherency promise: it takes the shared page as it is.
    let (h, parent, a) = setup();
    let child = parent.fork().unwrap();
    let shared = parent.pte(a).pfn().unwrap();
    let got = get_user_pages(&parent, a, 1, FollFlags::NONE).unwrap();
    assert_eq!(got.pages(), [shared]);
    drop(got);
    finish(&h, [parent, child]);
}

#[test]
fn cow_write_gup_breaks_cow_before_taking_the_page() {
    let (h, parent, a) = setup();
    let child = parent.fork().unwrap();
    let got = get_user_pages(&parent, a, 1, FollFlags::WRITE).unwrap();
    assert_eq!(parent.pte(a).pfn(), Some(got.pages()[0]));
    assert_ne!(child.pte(a).pfn(), Some(got.pages()[0]));
    assert!(parent.pte(a).writable());
    drop(got);
    finish(&h, [parent, child]);
}

#[test]
fn shared_mappings_stay_shared_across_fork() {
    let h = common::host(16 << 20);
    let phys = h.phys().clone();
    let mm = h.spawn();
    let obj = ShmObject::new(&phys, 2 * PAGE_SIZE);
    let a = mm.mmap_shared(&obj, 0, 2 * PAGE_SIZE, Prot::RW).unwrap();
    mm.write(a, b"hello").unwrap();
    let child = mm.fork().unwrap();
    child.write(a, b"HE").unwrap();
    let mut buf = [0u8; 5];
    mm.read(a, &mut buf).unwrap();
    assert_eq!(&buf, b"HEllo");
    // A second mapping of the object in another process sees the same bytes.
    let other = h.spawn();
    let b = other.mmap_shared(&obj, 0, PAGE_SIZE, Prot::READ).unwrap();
    other.read(b, &mut buf).unwrap();
    assert_eq!(&buf, b"HEllo");
    assert_eq!(
        other.write(b, b"x").unwrap_err().errno(),
        13,
        "EACCES on a read-only mapping"
    );
    for p in [mm, child, other] {
        p.exit();
    }
    // The object outlives every mapping (a file would); its one touched page goes
    // with it.
    assert_eq!(h.quiescent().frames(), 1);
    drop(obj);
    h.quiescent().assert_clean();
}

#[test]
fn munmap_of_a_pinned_range_keeps_the_frames_until_unpin() {
    let (h, mm, a) = setup();

    let phys = h.phys().clone();
    let ram = phys.ram().clone();
    let pin = pin_user_pages(&mm, a, 1, FollFlags::WRITE).unwrap();
    let pfn = pin.pages()[0];
    mm.munmap(a, 4 * PAGE_SIZE).unwrap();
    assert!(matches!(mm.read(a, &mut [0u8]), Err(MmError::Fault { .. })));
    assert_eq!(ram.meta(pfn).refcount(), 1, "only the pin holds it now");
    assert_eq!(frame_byte(&phys, pfn), 0xaa, "still holding the data");
    assert_eq!(h.quiescent().frames(), 1);
    drop(pin);
    finish(&h, [mm]);
}

#[test]
fn exit_releases_every_frame() {
    let h = common::host(16 << 20);
    let mm = h.spawn();
    let a = mm.mmap_anon(64 * PAGE_SIZE, Prot::RW).unwrap();
    mm.write(a, &vec![1u8; 64 * PAGE_SIZE as usize]).unwrap();
    let child = mm.fork().unwrap();
    child.write(a, &[2]).unwrap();
    assert_eq!(h.quiescent().frames(), 65, "64 shared, one copied");
    mm.exit();
    assert_eq!(h.quiescent().frames(), 64, "the child's own now");
    finish(&h, [child]);
}

/// `handle_mm_fault` is the one fault entry: a read fault populates, a write fault on a
/// page shared after fork breaks copy-on-write (the child keeps the old page), an
/// unshare fault makes the page exclusive, a fault on a device-private page brings it
/// back to RAM, and the refusals carry the kernel's numbers.
#[test]
fn handle_mm_fault_resolves_each_kind_of_fault() {
    use peerdma::mem::RegionKind;
    use peerdma::mm::Access;
    let h = common::host(16 << 20);
    let phys = h.phys().clone();
    let mm = h.spawn();
    let a = mm.mmap_anon(2 * PAGE_SIZE, Prot::RW).unwrap();
    assert!(mm.pte(a).is_empty());
    let p = mm.handle_mm_fault(a, Access::Read).unwrap();
    assert_eq!(mm.pte(a).pfn(), Some(p), "populated");
    mm.write(a, b"orig").unwrap();
    let child = mm.fork().unwrap();
    let shared = mm.pte(a).pfn().unwrap();
    assert!(!mm.pte(a).writable());
    let q = mm.handle_mm_fault(a, Access::Write).unwrap();
    assert_ne!(q, shared, "the write fault copied");
    assert!(mm.pte(a).writable());
    assert_eq!(
        child.pte(a).pfn(),
        Some(shared),
        "the child keeps the old page"
    );
    let mut b = [0u8; 4];
    mm.read(a, &mut b).unwrap();
    assert_eq!(&b, b"orig");
    // Device-private: the fault brings the page back.
    let dev = phys
        .memremap_pages(RegionKind::DevicePrivate { owner: 1 }, 1 << 20)
        .unwrap();
    mm.migrate_page(a, &dev).unwrap();
    assert!(mm.pte(a).is_device_private());
    let r = mm.handle_mm_fault(a, Access::Unshare).unwrap();
    assert!(phys.ram().contains(r) && mm.pte(a).is_present());
    mm.read(a, &mut b).unwrap();
    assert_eq!(&b, b"orig");
    // Refusals.
    assert_eq!(
        mm.handle_mm_fault(VirtAddr(0x1000), Access::Read)
            .unwrap_err()
            .errno(),
        14
    );
    mm.mprotect(a, PAGE_SIZE, Prot::READ).unwrap();
    assert_eq!(
        mm.handle_mm_fault(a, Access::Write).unwrap_err().errno(),
        13
    );
    finish(&h, [mm, child]);
}
