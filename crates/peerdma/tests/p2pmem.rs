//! p2p memory providers as drivers/pci/p2pdma.c and its sysfs `allocate` file behave:
//! shared mappings at offset 0 only, fresh allocations per mmap, ENOMEM on exhaustion,
//! pages back to the pool when the last reference drops, and device removal that tears
//! down user mappings, refuses new allocations and waits for pins to drop.

mod common;

use std::time::Duration;

use peerdma::addr::PAGE_SIZE;
use peerdma::dma::Direction;
use peerdma::gup::{get_user_dma_sg, pin_user_pages, FollFlags, UserSg};
use peerdma::mm::Prot;
use peerdma::p2pmem::{P2pError, Provider};
use peerdma::sync::Arc;
use std::thread;

fn setup() -> (common::Checked, Arc<Provider>) {
    let h = common::workstation(16 << 20, false);
    let p = common::cmb(&h);
    (h, p)
}

#[test]
fn private_mapping_or_nonzero_offset_is_einval() {
    let (h, p) = setup();
    let mm = h.spawn();
    assert!(matches!(
        p.mmap(&mm, 4096, false, 0, Prot::RW),
        Err(P2pError::Invalid { .. })
    ));
    let e = p.mmap(&mm, 4096, true, 4096, Prot::RW).unwrap_err();
    assert!(e.to_string().contains("offset 0"), "{e}");
    assert_eq!(p.available(), p.size(), "a refused mmap allocates nothing");
}

#[test]
fn each_mmap_is_a_fresh_allocation_and_pages_return_on_last_reference() {
    let (h, p) = setup();
    let mm = h.spawn();
    let a = p.mmap(&mm, 2 * PAGE_SIZE, true, 0, Prot::RW).unwrap();
    let b = p.mmap(&mm, 2 * PAGE_SIZE, true, 0, Prot::RW).unwrap();
    assert_ne!(mm.pte(a).pfn(), mm.pte(b).pfn());
    assert_eq!(p.available(), p.size() - 4 * PAGE_SIZE);
    mm.write(a, b"cmb bytes").unwrap();
    let mut buf = [0u8; 9];
    let f = mm.pte(a).pfn().unwrap();
    p.region().read(f, 0, &mut buf);
    assert_eq!(
        &buf, b"cmb bytes",
        "the process writes straight into the BAR memory"
    );
    // A pin outlives the mapping; the page comes back when it drops.
    let pin = pin_user_pages(&mm, a, 1, FollFlags::PCI_P2PDMA).unwrap();
    mm.munmap(a, 2 * PAGE_SIZE).unwrap();
    assert_eq!(p.available(), p.size() - 3 * PAGE_SIZE);
    drop(pin);
    assert_eq!(p.available(), p.size() - 2 * PAGE_SIZE);
    mm.exit();
    assert_eq!(p.available(), p.size());
}

#[test]
fn exhausted_pool_is_enomem() {
    let (h, p) = setup();
    let mm = h.spawn();
    let all = p.mmap(&mm, p.size(), true, 0, Prot::RW).unwrap();
    let e = p.mmap(&mm, PAGE_SIZE, true, 0, Prot::RW).unwrap_err();
    assert!(matches!(e, P2pError::NoMemory { available: 0, .. }), "{e}");
    mm.munmap(all, p.size()).unwrap();
    assert!(p.mmap(&mm, PAGE_SIZE, true, 0, Prot::RW).is_ok());
}

#[test]
fn removal_waits_for_a_pin_and_completes_after_unpin() {
    let (h, p) = setup();
    let mm = h.spawn();
    let va = p.mmap(&mm, 4 * PAGE_SIZE, true, 0, Prot::RW).unwrap();
    let pin = pin_user_pages(&mm, va, 4, FollFlags::PCI_P2PDMA | FollFlags::WRITE).unwrap();
    let remover = {
        let p = p.clone();
        thread::spawn(move || p.remove(None))
    };
    std::thread::sleep(Duration::from_millis(50));
    assert!(!remover.is_finished(), "a held pin must hold removal up");
    // The user mapping was torn down already; new allocations fail.
    assert!(mm.pte(va).is_empty());
    assert!(matches!(
        p.mmap(&mm, PAGE_SIZE, true, 0, Prot::RW),
        Err(P2pError::NoDevice { .. })
    ));
    assert!(matches!(p.alloc(PAGE_SIZE), Err(P2pError::NoDevice { .. })));
    drop(pin);
    remover.join().unwrap().unwrap();
    assert!(
        h.phys().region(p.region().base()).is_none(),
        "the page map is gone"
    );
}

#[test]
fn removal_timeout_reports_who_holds_the_pages() {
    let (h, p) = setup();
    let mm = h.spawn();
    let va = p.mmap(&mm, 2 * PAGE_SIZE, true, 0, Prot::RW).unwrap();
    let nic: peerdma::addr::Bdf = "0000:03:00.0".parse().unwrap();
    let sg = get_user_dma_sg(
        &mm,
        &h.dma().attach(nic).unwrap(),
        UserSg::new(va, 2 * PAGE_SIZE, Direction::FromDevice),
    )
    .unwrap();
    let e = p.remove(Some(Duration::from_millis(20))).unwrap_err();
    match &e {
        P2pError::Busy {
            frames,
            pinned,
            holders,
            ..
        } => {
            assert_eq!((*frames, *pinned), (2, 2));
            assert_eq!(holders, "0000:03:00.0");
        }
        other => panic!("{other}"),
    }
    drop(sg);
    p.remove(Some(Duration::from_secs(5))).unwrap();
}

#[test]
fn removal_revokes_mappings_a_fork_copied() {
    let (h, p) = setup();
    let parent = h.spawn();
    let va = p.mmap(&parent, 2 * PAGE_SIZE, true, 0, Prot::RW).unwrap();
    parent.write(va, b"shared").unwrap();
    let child = parent.fork().unwrap();
    let mut b = [0u8; 6];
    child.read(va, &mut b).unwrap();
    assert_eq!(&b, b"shared", "the child maps the same p2p pages");
    p.remove(Some(Duration::from_secs(5))).unwrap();
    assert!(parent.pte(va).is_empty() && child.pte(va).is_empty());
    assert_eq!(child.read(va, &mut b).unwrap_err().errno(), 14);
}
