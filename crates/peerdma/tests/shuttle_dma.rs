//! DMA-layer concurrency under shuttle (`--features shuttle`, `PEERDMA_SHUTTLE_ITERS`
//! schedules, 100 by default): a transfer racing the unmap of its mapping lands whole
//! or not at all, p2p device removal racing a pin finishes once the pin drops, removal
//! racing an mmap and a fork of the mapping leaves no entry naming the provider's pages,
//! removal racing an munmap whose address is reused leaves the new memory alone, and a
//! transfer through a mapping protected by a notifier (not by pins) racing a migration
//! of its page lands before the invalidation returns — and migrates with the page — or
//! is refused, never after.

#![cfg(feature = "shuttle")]

mod common;

use peerdma::addr::PAGE_SIZE;
use peerdma::dma::Direction;
use peerdma::gup::{get_user_dma_sg, pin_user_pages, FollFlags, UserSg};
use peerdma::mm::Prot;
use peerdma::sync::{thread, Arc, Mutex};

fn iterations() -> usize {
    std::env::var("PEERDMA_SHUTTLE_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100)
}

fn host() -> common::Checked {
    common::workstation(8 << 20, true)
}

#[test]
fn a_transfer_racing_its_unmap_lands_whole_or_not_at_all() {
    shuttle::check_random(
        || {
            let h = host();
            let mm = h.spawn();
            let a = mm.mmap_anon(2 * PAGE_SIZE, Prot::RW).unwrap();
            let gpu = "0000:03:00.0".parse().unwrap();
            let sg = get_user_dma_sg(
                &mm,
                &h.dma().attach(gpu).unwrap(),
                UserSg::new(a, 2 * PAGE_SIZE, Direction::FromDevice),
            )
            .unwrap();
            let pieces: Vec<_> = sg.segments().iter().map(|s| (s.addr, s.len)).collect();
            let sg = Arc::new(Mutex::new(Some(sg)));
            let dma = h.dma().clone();
            let writer = thread::spawn(move || {
                dma.attach(gpu)
                    .unwrap()
                    .dma_write_sg(&pieces, &[7u8; 2 * PAGE_SIZE as usize])
                    .is_ok()
            });
            let unmapper = {
                let sg = sg.clone();
                thread::spawn(move || drop(peerdma::sync::lock(&sg).take()))
            };
            let landed = writer.join().unwrap();
            unmapper.join().unwrap();
            let mut b = vec![0u8; 2 * PAGE_SIZE as usize];
            mm.read(a, &mut b).unwrap();
            let expect = if landed { 7 } else { 0 };
            assert!(
                b.iter().all(|&x| x == expect),
                "torn or lost transfer (landed: {landed})"
            );
            assert_eq!(h.dma().live_mappings(), 0);
        },
        iterations(),
    );
}

#[test]
fn p2p_removal_racing_a_pin_completes_after_the_pin_drops() {
    shuttle::check_random(
        || {
            let h = host();
            let p = common::cmb(&h);
            let mm = h.spawn();
            let va = p.mmap(&mm, PAGE_SIZE, true, 0, Prot::RW).unwrap();
            let pinner = {
                let mm = mm.clone();
                thread::spawn(move || {
                    // May find the mapping already torn down: EFAULT is fine.
                    if let Ok(pin) = pin_user_pages(&mm, va, 1, FollFlags::PCI_P2PDMA) {
                        thread::yield_now();
                        drop(pin);
                    }
                })
            };
            let remover = {
                let p = p.clone();
                thread::spawn(move || p.remove(None))
            };
            pinner.join().unwrap();
            remover.join().unwrap().unwrap();
            assert_eq!(p.region().free_frames(), p.region().frames());
            assert!(mm.pte(va).is_empty());
        },
        iterations(),
    );
}

#[test]
fn removal_racing_mmap_and_fork_zaps_every_copy() {
    shuttle::check_random(
        || {
            let h = host();
            let p = common::cmb(&h);
            let parent = h.spawn();
            let va = p.mmap(&parent, PAGE_SIZE, true, 0, Prot::RW).unwrap();
            let mapper = {
                let (p, parent) = (p.clone(), parent.clone());
                thread::spawn(move || p.mmap(&parent, PAGE_SIZE, true, 0, Prot::RW).ok())
            };
            let forker = {
                let parent = parent.clone();
                thread::spawn(move || parent.fork().unwrap())
            };
            let remover = {
                let p = p.clone();
                thread::spawn(move || p.remove(None))
            };
            let late = mapper.join().unwrap();
            let child = forker.join().unwrap();
            remover.join().unwrap().unwrap();
            for mm in [&parent, &child] {
                for v in [Some(va), late].into_iter().flatten() {
                    assert!(
                        mm.pte(v).is_empty(),
                        "a copy of the mapping survived removal"
                    );
                }
            }
            assert_eq!(p.region().free_frames(), p.region().frames());
        },
        iterations(),
    );
}

#[test]
fn removal_racing_munmap_leaves_reused_addresses_alone() {
    shuttle::check_random(
        || {
            let h = host();
            let p = common::cmb(&h);
            let mm = h.spawn();
            let va = p.mmap(&mm, PAGE_SIZE, true, 0, Prot::RW).unwrap();
            let reuser = {
                let mm = mm.clone();
                thread::spawn(move || {
                    mm.munmap(va, PAGE_SIZE).unwrap();
                    let anon = mm.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
                    mm.write(anon, b"mine").unwrap();
                    anon
                })
            };
            let remover = {
                let p = p.clone();
                thread::spawn(move || p.remove(None))
            };
            let anon = reuser.join().unwrap();
            remover.join().unwrap().unwrap();
            let mut b = [0u8; 4];
            mm.read(anon, &mut b).unwrap();
            assert_eq!(&b, b"mine");
        },
        iterations(),
    );
}

/// An ODP-style mirror: the device maps a page it does not pin, and the notifier's
/// `invalidate` callback revokes the mapping, waiting for transfers through it.
struct OdpMirror {
    mapping: Mutex<Option<peerdma::dma::DmaMapping>>,
}

impl peerdma::notifier::IntervalNotifierOps for OdpMirror {
    fn invalidate(
        &self,
        _s: &peerdma::notifier::Subscription,
        _r: &peerdma::notifier::NotifyRange,
        _seq: u64,
    ) -> bool {
        if let Some(m) = peerdma::sync::lock(&self.mapping).as_ref() {
            m.revoke();
        }
        true
    }
}

#[test]
fn a_transfer_through_a_notifier_protected_mapping_racing_migration_lands_before_or_not_at_all() {
    shuttle::check_random(
        || {
            let h = host();
            let gpu: peerdma::addr::Bdf = "0000:03:00.0".parse().unwrap();
            let dev_mem = h
                .phys()
                .memremap_pages(
                    peerdma::mem::RegionKind::DeviceCoherent { owner: 1 },
                    1 << 20,
                )
                .unwrap();
            let mm = h.spawn();
            let a = mm.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
            mm.write(a, &[1; 8]).unwrap();
            let mirror = Arc::new(OdpMirror {
                mapping: Mutex::new(None),
            });
            let sub = mm.notifier().subscribe(a, PAGE_SIZE, mirror.clone());
            // Fault the page in for the device under the sequence protocol: no pin.
            let seq = sub.read_begin();
            let pfn = mm.pte(a).pfn().unwrap();
            let sg = peerdma::dma::SgTable::from_runs(
                &[(pfn, 1)],
                0,
                PAGE_SIZE,
                h.dma().attach(gpu).unwrap().max_segment(),
            );
            let mapping = h
                .dma()
                .attach(gpu)
                .unwrap()
                .map_sg(&sg, Direction::FromDevice)
                .unwrap();
            let addr = mapping.segments()[0].addr;
            {
                let mut m = peerdma::sync::lock(&mirror.mapping);
                assert!(!sub.read_retry(seq));
                *m = Some(mapping);
            }
            let writer = {
                let dma = h.dma().clone();
                thread::spawn(move || dma.attach(gpu).unwrap().dma_write(addr, &[7; 8]))
            };
            let migrator = {
                let mm = mm.clone();
                thread::spawn(move || mm.migrate_page(a, &dev_mem).unwrap())
            };
            let wrote = writer.join().unwrap();
            migrator.join().unwrap();
            let mut got = [0u8; 8];
            mm.read(a, &mut got).unwrap();
            match wrote {
                Ok(()) => assert_eq!(got, [7; 8], "a completed transfer's bytes were lost"),
                Err(peerdma::dma::DmaError::Revoked { .. }) => assert_eq!(got, [1; 8]),
                Err(e) => panic!("{e}"),
            }
            assert!(
                h.dma().sanitizer().is_clean(),
                "{:?}",
                h.dma().sanitizer().violations()
            );
            drop(sub);
            peerdma::sync::lock(&mirror.mapping).take();
            assert_eq!(h.dma().live_mappings(), 0);
        },
        iterations(),
    );
}

/// Without an IOMMU one page mapped twice for a device has one DMA address. A transfer
/// to it racing the revocation of one mapping is carried by the other: the device's
/// access is valid as long as some live mapping covers it.
#[test]
fn a_transfer_racing_the_revocation_of_one_of_two_mappings_of_a_page_succeeds() {
    shuttle::check_random(
        || {
            let h = common::workstation(8 << 20, false);
            let gpu: peerdma::addr::Bdf = "0000:03:00.0".parse().unwrap();
            let mm = h.spawn();
            let a = mm.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
            let pinned = get_user_dma_sg(
                &mm,
                &h.dma().attach(gpu).unwrap(),
                UserSg::new(a, PAGE_SIZE, Direction::Bidirectional),
            )
            .unwrap();
            let pfn = mm.pte(a).pfn().unwrap();
            let sg = peerdma::dma::SgTable::from_runs(&[(pfn, 1)], 0, PAGE_SIZE, PAGE_SIZE);
            let odp = Arc::new(
                h.dma()
                    .attach(gpu)
                    .unwrap()
                    .map_sg(&sg, Direction::FromDevice)
                    .unwrap(),
            );
            let addr = pinned.segments()[0].addr;
            assert_eq!(addr, odp.segments()[0].addr, "one DMA address");
            let writer = {
                let dma = h.dma().clone();
                thread::spawn(move || dma.attach(gpu).unwrap().dma_write(addr, &[5; 8]))
            };
            let revoker = {
                let odp = odp.clone();
                thread::spawn(move || odp.revoke())
            };
            writer.join().unwrap().unwrap();
            revoker.join().unwrap();
            let mut b = [0u8; 8];
            mm.read(a, &mut b).unwrap();
            assert_eq!(b, [5; 8]);
            assert!(h.dma().sanitizer().is_clean());
        },
        iterations(),
    );
}
