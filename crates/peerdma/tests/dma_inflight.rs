//! In-flight DMA is tracked per mapping: unmapping or revoking a mapping waits for the
//! transfers through it and only those, and no transfer completes through a mapping
//! after its revocation returned (what an ODP or HMM mirror's invalidation callback
//! relies on, the way `ib_umem_odp_unmap_dma_pages` and `mmu_interval_set_seq` order a
//! device's accesses against the CPU's page-table change).

use std::sync::mpsc;
use std::time::Duration;

use peerdma::addr::{Bdf, PAGE_SIZE};
use peerdma::dma::{Direction, DmaError};
use peerdma::errno::Errno;
use peerdma::gup::{get_user_dma_sg, UserSg};
use peerdma::mm::Prot;
use peerdma::sync::{Arc, Mutex};
use std::thread;

mod common;

fn gpu() -> Bdf {
    "0000:03:00.0".parse().unwrap()
}

/// A transfer hook that parks the first transfer until released, and says when it has
/// parked.
fn park_first_transfer() -> (
    peerdma::dma::TransferHook,
    mpsc::Receiver<()>,
    mpsc::Sender<()>,
) {
    let (parked_tx, parked_rx) = mpsc::channel::<()>();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let once = Mutex::new(Some((parked_tx, release_rx)));
    let hook: peerdma::dma::TransferHook = Arc::new(move || {
        let first = once.lock().unwrap().take();
        if let Some((parked, release)) = first {
            parked.send(()).unwrap();
            release.recv().unwrap();
        }
    });
    (hook, parked_rx, release_tx)
}

#[test]
fn unmapping_one_mapping_does_not_wait_for_a_transfer_through_another() {
    for iommu in [true, false] {
        let h = common::workstation(16 << 20, iommu);
        let mm = h.spawn();
        let a = mm.mmap_anon(2 * PAGE_SIZE, Prot::RW).unwrap();
        let map = |va, dir| {
            get_user_dma_sg(
                &mm,
                &h.dma().attach(gpu()).unwrap(),
                UserSg::new(va, PAGE_SIZE, dir),
            )
            .unwrap()
        };
        let busy = map(a, Direction::FromDevice);
        let other = map(
            peerdma::addr::VirtAddr(a.0 + PAGE_SIZE),
            Direction::FromDevice,
        );
        let addr = busy.segments()[0].addr;
        let (hook, parked, release) = park_first_transfer();
        h.dma().attach(gpu()).unwrap().set_transfer_hook(Some(hook));
        thread::scope(|s| {
            let dma = h.dma().clone();
            let transfer =
                s.spawn(move || dma.attach(gpu()).unwrap().dma_write(addr, b"in flight"));
            parked.recv().unwrap();
            // The other mapping goes at once, with the first transfer still in flight.
            let (done_tx, done_rx) = mpsc::channel();
            s.spawn(move || {
                drop(other);
                done_tx.send(()).unwrap();
            });
            done_rx
                .recv_timeout(Duration::from_secs(5))
                .expect("unmapping another mapping waited for an unrelated transfer");
            // Its own mapping waits for it.
            let (done_tx, done_rx) = mpsc::channel();
            s.spawn(move || {
                drop(busy);
                done_tx.send(()).unwrap();
            });
            assert!(
                done_rx.recv_timeout(Duration::from_millis(100)).is_err(),
                "unmapping returned while a transfer through the mapping was in flight"
            );
            release.send(()).unwrap();
            transfer.join().unwrap().unwrap();
            done_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        });
        h.dma().attach(gpu()).unwrap().set_transfer_hook(None);
        let mut b = [0u8; 9];
        mm.read(a, &mut b).unwrap();
        assert_eq!(&b, b"in flight", "the transfer completed before the unmap");
        assert_eq!(h.quiescent().dma_mappings, 0);
        assert!(h.dma().sanitizer().is_clean());
    }
}

#[test]
fn revoke_waits_for_transfers_in_flight_and_refuses_later_ones() {
    let h = common::workstation(16 << 20, true);
    let mm = h.spawn();
    let a = mm.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
    let sg = get_user_dma_sg(
        &mm,
        &h.dma().attach(gpu()).unwrap(),
        UserSg::new(a, PAGE_SIZE, Direction::Bidirectional),
    )
    .unwrap();
    let addr = sg.segments()[0].addr;
    let (hook, parked, release) = park_first_transfer();
    h.dma().attach(gpu()).unwrap().set_transfer_hook(Some(hook));
    let sg = Arc::new(sg);
    thread::scope(|s| {
        let dma = h.dma().clone();
        let transfer = s.spawn(move || dma.attach(gpu()).unwrap().dma_write(addr, b"first"));
        parked.recv().unwrap();
        let (done_tx, done_rx) = mpsc::channel();
        let sg2 = sg.clone();
        s.spawn(move || {
            sg2.mapping().revoke();
            done_tx.send(()).unwrap();
        });
        assert!(done_rx.recv_timeout(Duration::from_millis(100)).is_err());
        release.send(()).unwrap();
        transfer.join().unwrap().unwrap();
        done_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    });
    match h.dma().attach(gpu()).unwrap().dma_write(addr, b"late") {
        Err(e @ DmaError::Revoked { .. }) => assert_eq!(e.errno(), Errno::EAGAIN),
        other => panic!("a transfer after revocation: {other:?}"),
    }
    let mut b = [0u8; 5];
    mm.read(a, &mut b).unwrap();
    assert_eq!(&b, b"first");
    assert!(sg.mapping().is_revoked());
    assert!(
        h.dma().sanitizer().is_clean(),
        "a revoked mapping is no violation"
    );
}
