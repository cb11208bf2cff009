//! Errors as a caller meets them: every layer's error has the kernel's number
//! (`errno()`), a refusal caused by a lower layer keeps that layer's error as its
//! `source()` rather than a copy of its text, and errors name the object they are about
//! (the page, the provider) rather than a placeholder.

use std::error::Error;

use peerdma::addr::PAGE_SIZE;
use peerdma::errno::Errno;
use peerdma::gup::{pin_user_pages, FollFlags, GupError};
use peerdma::mem::MemError;
use peerdma::mm::{MmError, Prot};
use peerdma::p2pmem::P2pError;

mod common;

#[test]
fn out_of_memory_keeps_the_allocators_refusal_as_its_source() {
    // Two frames of RAM, one of them reserved: the second fault has nothing left.
    let h = common::host(2 * PAGE_SIZE);
    let _phys = h.phys().clone();
    let mm = h.spawn();
    let a = mm.mmap_anon(2 * PAGE_SIZE, Prot::RW).unwrap();
    mm.write(a, &[1]).unwrap();
    let e = mm
        .write(peerdma::addr::VirtAddr(a.0 + PAGE_SIZE), &[1])
        .unwrap_err();
    assert_eq!(e.errno(), Errno::ENOMEM);
    assert!(matches!(e, MmError::NoMemory { .. }), "{e}");
    let src = e.source().expect("the allocator's refusal is the source");
    assert!(
        matches!(
            src.downcast_ref::<MemError>(),
            Some(MemError::NoMemory { frames: 1, .. })
        ),
        "{src}"
    );
    assert!(
        !e.to_string().contains(&src.to_string()),
        "the text is not copied in"
    );
}

#[test]
fn a_p2p_page_pinned_without_pci_p2pdma_names_the_page_and_its_provider() {
    let h = common::workstation(16 << 20, false);
    let p = common::cmb(&h);
    let mm = h.spawn();
    let va = p.mmap(&mm, 2 * PAGE_SIZE, true, 0, Prot::RW).unwrap();
    let second = peerdma::addr::VirtAddr(va.0 + PAGE_SIZE);
    match pin_user_pages(&mm, second, 1, FollFlags::NONE).unwrap_err() {
        e @ GupError::RemoteIo { addr, provider, .. } => {
            assert_eq!((addr, provider), (second, p.dev()));
            assert_eq!(e.errno(), Errno::EREMOTEIO);
        }
        other => panic!("{other}"),
    }
}

#[test]
fn removal_refusals_carry_their_numbers() {
    let h = common::workstation(16 << 20, false);
    let p = common::cmb(&h);
    let mm = h.spawn();
    p.remove(None).unwrap();
    let e = p.mmap(&mm, PAGE_SIZE, true, 0, Prot::RW).unwrap_err();
    assert!(matches!(e, P2pError::NoDevice { .. }));
    assert_eq!(e.errno(), Errno::ENODEV);
    let e = p.mmap(&mm, PAGE_SIZE, false, 0, Prot::RW).unwrap_err();
    assert_eq!(e.errno(), Errno::EINVAL);
}
