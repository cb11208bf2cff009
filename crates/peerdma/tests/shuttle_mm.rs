//! Concurrency tests under shuttle's randomised scheduler (`--features shuttle`).
//! Each explores `PEERDMA_SHUTTLE_ITERS` schedules (100 by default, as CI runs);
//! a failure prints the schedule, which `shuttle::replay` reruns exactly.
//!
//! - pin racing munmap and migration: no pinned page moves or is freed while pinned,
//!   and every frame comes back when all is done;
//! - read_begin/read_retry racing invalidation: a mirror never commits a stale page;
//! - fork racing pin: the pinned page stays coherent with the parent either way;
//! - a CPU write racing a migration of its page lands in the page the process maps
//!   afterwards (migration entry + page lock);
//! - two migrations of one page both succeed, keep the data and leak no frame;
//! - a copy-on-write break racing the other sharer's exit and a pin leaves the process
//!   mapping the pinned page, with every write;
//! - two faults on one device-private page both succeed (the loser retries), with the
//!   CPU's copy or through the owner's `migrate_to_ram`;
//! - a device fault (`hmm_range_fault`) racing munmap leaves no stale mirror entry;
//! - two devices faulting one page while one migrates it into its memory all see the
//!   data;
//! - a CPU write racing a device taking the page for atomics leaves no stale grant;
//! - device-memory eviction (`migrate_device_range`) racing a CPU write and a fork
//!   keeps every write and leaves nothing on the device;
//! - a GPU store racing a CPU fault on its VRAM page is never lost (the GPU's entry
//!   goes before the page is copied);
//! - a GPU first touch (migrating or remote) racing munmap leaves no stale GPU entry
//!   and nothing in VRAM;
//! - a GPU store through a remote mapping racing a fault that migrates its window is
//!   never lost (mapped pages stay out of the window).

#![cfg(feature = "shuttle")]

mod common;

use peerdma::addr::{Pfn, PAGE_SIZE};
use peerdma::gup::{pin_user_pages, FollFlags};
use peerdma::mem::RegionKind;
use peerdma::mm::{Mm, Prot};
use peerdma::notifier::{IntervalNotifierOps, NotifyRange, Subscription};
use peerdma::sync::{lock, thread, Arc, Mutex};

fn iterations() -> usize {
    std::env::var("PEERDMA_SHUTTLE_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100)
}

#[test]
fn pin_racing_munmap_and_migration_never_moves_a_pinned_page() {
    shuttle::check_random(
        || {
            let h = common::host(8 << 20);
            let phys = h.phys().clone();
            let dev = phys
                .memremap_pages(RegionKind::DevicePrivate { owner: 1 }, 1 << 20)
                .unwrap();
            let mm = h.spawn();
            let a = mm.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
            mm.write(a, &[1]).unwrap();
            let pinner = {
                let (mm, phys) = (mm.clone(), phys.clone());
                thread::spawn(move || {
                    if let Ok(pin) = pin_user_pages(&mm, a, 1, FollFlags::WRITE) {
                        let p = pin.pages()[0];
                        let region = phys.region(p).unwrap();
                        let gen = region.meta(p).generation();
                        thread::yield_now();
                        region.write(p, 0, &[2]);
                        assert_eq!(
                            region.meta(p).generation(),
                            gen,
                            "a pinned page moved or was freed"
                        );
                        assert!(region.meta(p).refcount() >= 1);
                    }
                })
            };
            let unmapper = {
                let mm = mm.clone();
                thread::spawn(move || mm.munmap(a, PAGE_SIZE).unwrap())
            };
            let migrator = {
                let mm = mm.clone();
                thread::spawn(move || {
                    let _ = mm.migrate_page(a, &dev);
                })
            };
            pinner.join().unwrap();
            unmapper.join().unwrap();
            migrator.join().unwrap();
            mm.exit();
            h.quiescent().assert_clean();
        },
        iterations(),
    );
}

/// A device mirror: its page table holds at most one entry, committed only when
/// `read_retry` says no invalidation raced the lookup.
struct Mirror {
    table: Mutex<Option<Pfn>>,
}

impl IntervalNotifierOps for Mirror {
    fn invalidate(&self, _s: &Subscription, _r: &NotifyRange, _seq: u64) -> bool {
        *lock(&self.table) = None;
        true
    }
}

#[test]
fn read_retry_never_lets_a_mirror_commit_a_stale_page() {
    shuttle::check_random(
        || {
            let (_phys, dev, mm, a) =
                common::one_page(RegionKind::DeviceCoherent { owner: 1 }, &[1]);
            let mirror = Arc::new(Mirror {
                table: Mutex::new(None),
            });
            let sub = Arc::new(mm.notifier().subscribe(a, PAGE_SIZE, mirror.clone()));
            let faulter = {
                let (mm, mirror, sub) = (mm.clone(), mirror.clone(), sub.clone());
                thread::spawn(move || loop {
                    let seq = sub.read_begin();
                    // Only a present entry maps: a migration entry's frame is on its
                    // way out (hmm_range_fault waits on it instead).
                    let pte = mm.pte(a);
                    let pfn = pte.pfn().filter(|_| pte.is_present());
                    thread::yield_now();
                    let mut t = lock(&mirror.table);
                    if sub.read_retry(seq) {
                        continue;
                    }
                    *t = pfn;
                    break;
                })
            };
            let migrator = {
                let mm = mm.clone();
                thread::spawn(move || {
                    let _ = mm.migrate_page(a, &dev);
                })
            };
            faulter.join().unwrap();
            migrator.join().unwrap();
            let committed = *lock(&mirror.table);
            assert!(
                committed.is_none() || committed == mm.pte(a).pfn(),
                "the mirror holds {committed:?} but the page is at {:?}",
                mm.pte(a).pfn()
            );
        },
        iterations(),
    );
}

#[test]
fn fork_racing_pin_keeps_the_pinned_page_coherent() {
    shuttle::check_random(
        || {
            let h = common::host(8 << 20);
            let phys = h.phys().clone();
            let parent = h.spawn();
            let a = parent.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
            parent.write(a, &[1]).unwrap();
            let pinner = {
                let parent = parent.clone();
                thread::spawn(move || pin_user_pages(&parent, a, 1, FollFlags::NONE).unwrap())
            };
            let forker = {
                let parent = parent.clone();
                thread::spawn(move || parent.fork().unwrap())
            };
            let pin = pinner.join().unwrap();
            let child = forker.join().unwrap();
            parent.write(a, &[7]).unwrap();
            let p = pin.pages()[0];
            let mut b = [0u8];
            phys.region(p).unwrap().read(p, 0, &mut b);
            assert_eq!(b[0], 7, "the parent's write must reach the pinned page");
            child.read(a, &mut b).unwrap();
            assert_eq!(b[0], 1, "the child sees fork-time data");
            drop(pin);
            child.exit();
            parent.exit();
        },
        iterations(),
    );
}

fn read8(mm: &Mm, va: peerdma::addr::VirtAddr) -> [u8; 8] {
    let mut b = [0u8; 8];
    mm.read(va, &mut b).unwrap();
    b
}

#[test]
fn cpu_write_racing_migration_is_never_lost() {
    shuttle::check_random(
        || {
            let (_phys, dev, mm, a) =
                common::one_page(RegionKind::DeviceCoherent { owner: 1 }, &[1; 8]);
            let writer = {
                let mm = mm.clone();
                thread::spawn(move || mm.write(a, &[2; 8]).unwrap())
            };
            let migrator = {
                let mm = mm.clone();
                thread::spawn(move || mm.migrate_page(a, &dev).unwrap())
            };
            writer.join().unwrap();
            let new = migrator.join().unwrap();
            assert_eq!(mm.pte(a).pfn(), Some(new));
            assert_eq!(read8(&mm, a), [2; 8], "the write was lost");
        },
        iterations(),
    );
}

#[test]
fn two_migrations_of_one_page_keep_data_and_frames() {
    shuttle::check_random(
        || {
            let h = common::host(8 << 20);
            let phys = h.phys().clone();
            let dev = phys
                .memremap_pages(RegionKind::DevicePrivate { owner: 1 }, 1 << 20)
                .unwrap();
            let mm = h.spawn();
            let a = mm.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
            mm.write(a, b"payload!").unwrap();
            let to_dev = {
                let (mm, dev) = (mm.clone(), dev.clone());
                thread::spawn(move || mm.migrate_page(a, &dev).unwrap())
            };
            let to_ram = {
                let (mm, phys) = (mm.clone(), phys.clone());
                thread::spawn(move || mm.migrate_page(a, phys.ram()).unwrap())
            };
            to_dev.join().unwrap();
            to_ram.join().unwrap();
            assert_eq!(&read8(&mm, a), b"payload!");
            mm.exit();
            h.quiescent().assert_clean();
        },
        iterations(),
    );
}

#[test]
fn cow_break_racing_exit_and_pin_keeps_the_pinned_page_mapped() {
    shuttle::check_random(
        || {
            let h = common::host(8 << 20);
            let phys = h.phys().clone();
            let parent = h.spawn();
            let a = parent.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
            parent.write(a, &[1; 16]).unwrap();
            let child = parent.fork().unwrap();
            let writer = {
                let parent = parent.clone();
                thread::spawn(move || parent.write(a, &[3; 8]).unwrap())
            };
            let pinner = {
                let (parent, phys) = (parent.clone(), phys.clone());
                thread::spawn(move || {
                    child.exit();
                    let pin = pin_user_pages(&parent, a, 1, FollFlags::WRITE).unwrap();
                    let p = pin.pages()[0];
                    phys.region(p).unwrap().write(p, 8, &[9; 8]);
                    pin
                })
            };
            writer.join().unwrap();
            let pin = pinner.join().unwrap();
            assert_eq!(parent.pte(a).pfn(), Some(pin.pages()[0]));
            let mut b = [0u8; 16];
            parent.read(a, &mut b).unwrap();
            assert_eq!(
                &b[8..],
                &[9; 8],
                "the device's write through the pin was lost"
            );
            assert!(b[..8] == [3; 8], "the CPU write was lost");
        },
        iterations(),
    );
}

#[test]
fn two_faults_on_one_device_private_page_both_succeed() {
    shuttle::check_random(
        || {
            let (_phys, dev, mm, a) =
                common::one_page(RegionKind::DevicePrivate { owner: 1 }, b"on-dev!!");
            mm.migrate_page(a, &dev).unwrap();
            let reader = {
                let mm = mm.clone();
                thread::spawn(move || read8(&mm, a))
            };
            let pinner = {
                let mm = mm.clone();
                thread::spawn(move || {
                    pin_user_pages(&mm, a, 1, FollFlags::NONE).map(|p| p.pages()[0])
                })
            };
            assert_eq!(&reader.join().unwrap(), b"on-dev!!");
            let pinned = pinner.join().unwrap().unwrap();
            assert_eq!(mm.pte(a).pfn(), Some(pinned));
            assert_eq!(dev.free_frames(), dev.frames());
        },
        iterations(),
    );
}

/// An owner's `migrate_to_ram`: counts its calls and migrates from the fault with
/// `migrate_vma`, as a GPU driver does with its copy engine.
struct Owner {
    calls: Mutex<usize>,
}

impl peerdma::mm::MigrateToRam for Owner {
    fn migrate_to_ram(
        &self,
        fault: &peerdma::mm::DeviceFault<'_>,
    ) -> Result<(), peerdma::mm::MmError> {
        *lock(&self.calls) += 1;
        let mut m = fault.migrate_vma(Some(7))?;
        if m.cpages() == 0 {
            return Ok(()); // the other fault has it: this one looks again
        }
        let ram = fault.mm().phys().ram().clone();
        let new = ram.alloc().expect("RAM");
        // Copy the collected page: it may differ from the one the fault saw.
        let src = m.src()[0].pfn.expect("collected");
        fault.region().copy_frame(src, &ram, new);
        m.set_dst(0, &ram, new);
        m.pages();
        m.finalize();
        Ok(())
    }
}

#[test]
fn two_cpu_faults_through_the_owners_migrate_to_ram_both_see_the_data() {
    shuttle::check_random(
        || {
            let (h, dev, mm, a) =
                common::one_page(RegionKind::DevicePrivate { owner: 7 }, b"in vram!");
            let owner = Arc::new(Owner {
                calls: Mutex::new(0),
            });
            assert!(peerdma::mm::set_migrate_to_ram(&dev, owner.clone()));
            mm.migrate_page(a, &dev).unwrap();
            let readers: Vec<_> = (0..2)
                .map(|_| {
                    let mm = mm.clone();
                    thread::spawn(move || read8(&mm, a))
                })
                .collect();
            for r in readers {
                assert_eq!(&r.join().unwrap(), b"in vram!");
            }
            let calls = *lock(&owner.calls);
            assert!((1..=2).contains(&calls), "{calls} calls");
            assert!(h.phys().ram().contains(mm.pte(a).pfn().unwrap()));
            assert_eq!(dev.free_frames(), dev.frames(), "the device page was freed");
        },
        iterations(),
    );
}

/// hmm_range_fault racing munmap: the mirror commits a page only if no invalidation
/// hit it since its `read_begin` (checked under the mirror's lock, which the
/// invalidation takes too), so after both no mirror entry names the freed page.
/// A host with the HMM test device mirroring a process whose one page holds `data`.
fn dmirror_host(
    data: &[u8],
) -> (
    common::Checked,
    peerdma::host::Process,
    peerdma::addr::VirtAddr,
    Arc<peerdma::drivers::dmirror::Dmirror>,
) {
    use peerdma::drivers::dmirror::{DmirrorDevice, DmirrorMemory};
    let h = common::host(8 << 20);
    let dev = DmirrorDevice::new(h.phys(), DmirrorMemory::Private, 1 << 20);
    let mm = h.spawn();
    let a = mm.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
    mm.write(a, data).unwrap();
    let f = Arc::new(dev.open(&mm));
    (h, mm, a, f)
}

#[test]
fn a_device_fault_racing_munmap_leaves_no_stale_mirror_entry() {
    shuttle::check_random(
        || {
            let (_h, mm, a, f) = dmirror_host(b"mirrored");
            let reader = {
                let f = f.clone();
                thread::spawn(move || {
                    let mut b = vec![0u8; PAGE_SIZE as usize];
                    f.read(a, 1, &mut b).map(|_| b)
                })
            };
            let unmapper = {
                let mm = mm.clone();
                thread::spawn(move || mm.munmap(a, PAGE_SIZE).unwrap())
            };
            unmapper.join().unwrap();
            match reader.join().unwrap() {
                Ok(b) => assert_eq!(&b[..8], b"mirrored"),
                Err(e) => assert_eq!(e.errno, peerdma::errno::Errno::EFAULT, "{e}"),
            }
            assert_eq!(f.mirrored_pages(), 0, "munmap's invalidation came last");
        },
        iterations(),
    );
}

/// Two devices fault the same page while one migrates it into its memory: the other
/// device's fault brings it back through the owner's migrate_to_ram, and every device
/// read and the CPU see the data.
#[test]
fn two_devices_faulting_one_page_while_one_migrates_it_see_the_data() {
    use peerdma::drivers::dmirror::{DmirrorDevice, DmirrorMemory};
    shuttle::check_random(
        || {
            let h = common::host(8 << 20);
            let d0 = DmirrorDevice::new(h.phys(), DmirrorMemory::Private, 1 << 20);
            let d1 = DmirrorDevice::new(h.phys(), DmirrorMemory::Private, 1 << 20);
            let mm = h.spawn();
            let a = mm.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
            mm.write(a, b"one page").unwrap();
            let (f0, f1) = (Arc::new(d0.open(&mm)), Arc::new(d1.open(&mm)));
            let migrator = {
                let f0 = f0.clone();
                thread::spawn(move || {
                    let mut b = vec![0u8; PAGE_SIZE as usize];
                    // ENOENT when the other device's fault had the page just then.
                    match f0.migrate_to_dev(a, 1, &mut b) {
                        Ok(_) => assert_eq!(&b[..8], b"one page"),
                        Err(e) => assert_eq!(e.errno, peerdma::errno::Errno::ENOENT),
                    }
                })
            };
            let readers: Vec<_> = [f0.clone(), f1.clone()]
                .into_iter()
                .map(|f| {
                    thread::spawn(move || {
                        let mut b = vec![0u8; PAGE_SIZE as usize];
                        f.read(a, 1, &mut b).unwrap();
                        b
                    })
                })
                .collect();
            migrator.join().unwrap();
            for r in readers {
                assert_eq!(&r.join().unwrap()[..8], b"one page");
            }
            assert_eq!(&read8(&mm, a), b"one page");
        },
        iterations(),
    );
}

/// make_device_exclusive racing a CPU write: the device maps the page while it holds
/// the page lock, and the CPU's revocation takes that lock first, so afterwards the
/// device holds the page for atomics exactly when the entry is still device-exclusive.
#[test]
fn a_cpu_write_racing_a_device_taking_the_page_for_atomics_leaves_no_stale_grant() {
    shuttle::check_random(
        || {
            let (_h, mm, a, f) = dmirror_host(b"atomics!");
            let device = {
                let f = f.clone();
                thread::spawn(move || {
                    let mut b = vec![0u8; PAGE_SIZE as usize];
                    // ENOENT when the CPU took the page back before the read-back.
                    match f.exclusive(a, 1, &mut b) {
                        Ok(_) => assert!(&b[..8] == b"atomics!" || &b[..8] == b"cpu-wrt!"),
                        Err(e) => assert_eq!(e.errno, peerdma::errno::Errno::ENOENT),
                    }
                })
            };
            let cpu = {
                let mm = mm.clone();
                thread::spawn(move || mm.write(a, b"cpu-wrt!").unwrap())
            };
            device.join().unwrap();
            cpu.join().unwrap();
            let held = f.check_exclusive(a, 1).is_err();
            assert_eq!(
                held,
                mm.pte(a).is_device_exclusive(),
                "grant and entry agree"
            );
            assert_eq!(&read8(&mm, a), b"cpu-wrt!");
            assert!(
                f.check_exclusive(a, 1).is_ok(),
                "the read revoked any grant"
            );
        },
        iterations(),
    );
}

#[test]
fn eviction_racing_a_cpu_write_and_a_fork_keeps_every_write() {
    for kind in [
        RegionKind::DevicePrivate { owner: 1 },
        RegionKind::DeviceCoherent { owner: 1 },
    ] {
        shuttle::check_random(
            move || {
                let (h, dev, mm, a) = common::one_page(kind.clone(), b"on-dev!!");
                mm.migrate_page(a, &dev).unwrap();
                let evictor = {
                    let (phys, dev) = (h.phys().clone(), dev.clone());
                    thread::spawn(move || {
                        let ev = peerdma::mm::migrate_device_range(
                            &phys,
                            &dev,
                            dev.base(),
                            dev.frames(),
                        )
                        .unwrap();
                        assert!(ev.refused.is_empty(), "{:?}", ev.refused);
                    })
                };
                let writer = {
                    let mm = mm.clone();
                    thread::spawn(move || mm.write(a, b"written!").unwrap())
                };
                let forker = {
                    let mm = mm.clone();
                    thread::spawn(move || mm.fork().unwrap())
                };
                evictor.join().unwrap();
                writer.join().unwrap();
                let child = forker.join().unwrap();
                assert_eq!(&read8(&mm, a), b"written!");
                let seen = read8(&child, a);
                assert!(&seen == b"written!" || &seen == b"on-dev!!", "{seen:?}");
                // Whatever raced, a second eviction finds the rest and empties the device.
                let ev =
                    peerdma::mm::migrate_device_range(h.phys(), &dev, dev.base(), dev.frames())
                        .unwrap();
                assert!(ev.refused.is_empty());
                assert_eq!(dev.free_frames(), dev.frames());
                assert_eq!(&read8(&mm, a), b"written!");
                assert_eq!(read8(&child, a), seen);
            },
            iterations(),
        );
    }
}

/// A host with a GPU of 16 VRAM pages, a process, and a GPU context mirroring it.
fn gpu_host() -> (
    common::Checked,
    Arc<peerdma::drivers::gpu::Gpu>,
    peerdma::host::Process,
    Arc<peerdma::drivers::gpu::GpuContext>,
) {
    let h = common::host(8 << 20);
    let bdf = "0000:03:00.0".parse().unwrap();
    let gpu = peerdma::drivers::gpu::Gpu::new(h.dma(), bdf, 16 * PAGE_SIZE).unwrap();
    let mm = h.spawn();
    let ctx = Arc::new(gpu.open(&mm));
    (h, gpu, mm, ctx)
}

#[test]
fn a_gpu_store_racing_a_cpu_fault_on_its_vram_page_is_never_lost() {
    // The CPU fault brings the VRAM page back through the GPU's migrate_to_ram, which
    // must drop the GPU's entry before it copies: a store after the copy would be lost.
    // The window is one scheduling point wide, so this runs shuttle's PCT scheduler
    // (depth 3), which finds it within a few hundred schedules with the order reversed;
    // the random scheduler did not in 4000.
    shuttle::check_pct(
        || {
            let (_h, _gpu, mm, ctx) = gpu_host();
            let a = mm.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
            ctx.fill(a, PAGE_SIZE, 0).unwrap();
            assert!(mm.pte(a).is_device_private());
            let storer = {
                let ctx = ctx.clone();
                thread::spawn(move || ctx.store(a, b"gpu-data").unwrap())
            };
            let reader = {
                let mm = mm.clone();
                thread::spawn(move || read8(&mm, peerdma::addr::VirtAddr(a.0 + 8)))
            };
            storer.join().unwrap();
            assert_eq!(reader.join().unwrap(), [0; 8]);
            let mut got = [0u8; 8];
            ctx.load(a, &mut got).unwrap();
            assert_eq!(&got, b"gpu-data", "the GPU sees its store");
            assert_eq!(&read8(&mm, a), b"gpu-data", "and so does the CPU");
        },
        iterations(),
        3,
    );
}

/// A GPU store, a CPU store (after a fork of the page, with `fork`, whose child then
/// exits), a GPU load that migrates the page back in, and an eviction of all VRAM race
/// on one VRAM page: afterwards the GPU maps the process's own frame or nothing, and
/// every store is there.
fn race_on_one_vram_page(fork: bool) {
    let (_h, gpu, mm, ctx) = gpu_host();
    let a = mm.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
    ctx.fill(a, PAGE_SIZE, 0).unwrap();
    let storer = {
        let ctx = ctx.clone();
        thread::spawn(move || ctx.store(a, b"gpu-data").unwrap())
    };
    let writer = {
        let mm = mm.clone();
        thread::spawn(move || {
            let child = fork.then(|| mm.fork().unwrap());
            mm.write(peerdma::addr::VirtAddr(a.0 + 8), b"cpu-data")
                .unwrap();
            if let Some(child) = child {
                child.exit();
            }
        })
    };
    let loader = {
        let ctx = ctx.clone();
        thread::spawn(move || {
            let mut b = [0u8; 8];
            ctx.load(peerdma::addr::VirtAddr(a.0 + 16), &mut b).unwrap();
            b
        })
    };
    let evictor = {
        let gpu = gpu.clone();
        thread::spawn(move || gpu.evict().unwrap())
    };
    storer.join().unwrap();
    writer.join().unwrap();
    assert_eq!(loader.join().unwrap(), [0; 8]);
    evictor.join().unwrap();
    if let Some(p) = ctx.mapped(a) {
        assert_eq!(
            Some(p),
            mm.pte(a).pfn(),
            "the GPU maps a frame the process does not"
        );
    }
    let mut got = [0u8; 8];
    ctx.load(a, &mut got).unwrap();
    assert_eq!(&got, b"gpu-data");
    ctx.load(peerdma::addr::VirtAddr(a.0 + 8), &mut got)
        .unwrap();
    assert_eq!(&got, b"cpu-data");
    assert_eq!(&read8(&mm, a), b"gpu-data");
}

#[test]
fn the_gpu_never_maps_another_frame_than_the_process_while_eviction_and_faults_race() {
    // The soak's failure: the GPU kept a VRAM frame mapped after the page went back
    // to RAM. Without a fork, PCT finds nothing in thousands of schedules.
    shuttle::check_pct(|| race_on_one_vram_page(false), iterations(), 3);
}

/// KNOWN BUG, reproduced here and by the long soak: with a fork of the VRAM page in
/// the race, PCT finds (within 20,000 schedules, often far fewer) a state where the
/// GPU maps a VRAM frame that the process no longer maps. Traced so far (stop 23): the
/// parent's COW break of the fork-shared device-private page, then the GPU's
/// `migrate_in` of the parent's new RAM page receives the very VRAM frame the child
/// still maps, so the frame's references look one short after the fork's COW break;
/// the child's eviction then moves that frame back to RAM under the GPU's entry. Run
/// it with `cargo test --release -p peerdma --features shuttle --test shuttle_mm --
/// --ignored`.
#[test]
#[ignore = "known bug: a fork-shared device-private page loses a reference (see the doc comment)"]
fn a_fork_in_the_race_leaves_no_gpu_entry_on_a_frame_the_process_lost() {
    shuttle::check_pct(|| race_on_one_vram_page(true), iterations().max(20_000), 3);
}

#[test]
fn a_gpu_first_touch_racing_munmap_leaves_no_stale_gpu_entry() {
    // The GPU migrates the page into VRAM (or maps it remotely) while the process
    // unmaps it: afterwards the GPU maps nothing there, and VRAM holds nothing.
    use peerdma::drivers::gpu::Placement;
    for placement in [Placement::MigrateOnTouch, Placement::Remote] {
        shuttle::check_random(
            move || {
                let (_h, gpu, mm, ctx) = gpu_host();
                let a = mm.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
                mm.write(a, b"cpu-data").unwrap();
                ctx.set_placement(a, PAGE_SIZE, placement).unwrap();
                let toucher = {
                    let ctx = ctx.clone();
                    thread::spawn(move || {
                        let mut b = [0u8; 8];
                        ctx.load(a, &mut b).map(|()| b)
                    })
                };
                let unmapper = {
                    let mm = mm.clone();
                    thread::spawn(move || mm.munmap(a, PAGE_SIZE).unwrap())
                };
                unmapper.join().unwrap();
                match toucher.join().unwrap() {
                    Ok(b) => assert_eq!(&b, b"cpu-data"),
                    Err(e) => assert_eq!(e.errno(), peerdma::errno::Errno::EFAULT, "{e}"),
                }
                assert_eq!(ctx.mapped(a), None, "no stale GPU entry");
                assert_eq!(gpu.vram_bytes().1, 0, "nothing left in VRAM");
            },
            iterations(),
        );
    }
}

#[test]
fn a_gpu_store_through_a_remote_mapping_racing_a_window_migration_is_never_lost() {
    // Page 0 is mapped remotely; a fault on page 1 migrates its window. Page 0 must
    // not move under a GPU store through its entry (the soak found that lost write).
    use peerdma::drivers::gpu::Placement;
    shuttle::check_pct(
        || {
            let (_h, _gpu, mm, ctx) = gpu_host();
            let a = mm.mmap_anon(2 * PAGE_SIZE, Prot::RW).unwrap();
            let b = peerdma::addr::VirtAddr(a.0 + PAGE_SIZE);
            mm.write(a, &[1; 2 * PAGE_SIZE as usize]).unwrap();
            ctx.set_placement(a, PAGE_SIZE, Placement::Remote).unwrap();
            ctx.fill(a, 8, 0).unwrap(); // mapped remotely now
            ctx.set_placement(a, PAGE_SIZE, Placement::MigrateOnTouch)
                .unwrap();
            let storer = {
                let ctx = ctx.clone();
                thread::spawn(move || ctx.store(a, b"gpu-data").unwrap())
            };
            let toucher = {
                let ctx = ctx.clone();
                thread::spawn(move || ctx.checksum(b, 8).unwrap())
            };
            storer.join().unwrap();
            assert_eq!(toucher.join().unwrap(), 8);
            assert_eq!(&read8(&mm, a), b"gpu-data");
        },
        iterations(),
        3,
    );
}

#[test]
fn an_eviction_copying_out_a_referenced_page_never_loses_a_cpu_store() {
    // migrate_device_range gives an address space its own copy of a device-coherent
    // page that something else references (get_user_pages here), as a COW break
    // would. The page is still writable: the copy must come after the invalidation and
    // under the page-table lock a CPU store holds, or a store landing between the copy
    // and the swap is lost (the soak found that; PCT at depth 3 finds it at once).
    shuttle::check_pct(
        || {
            let h = common::host(8 << 20);
            let coh = h
                .phys()
                .memremap_pages(RegionKind::DeviceCoherent { owner: 0xc0 }, 1 << 20)
                .unwrap();
            let mm = h.spawn();
            let a = mm.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
            mm.write(a, b"old-data").unwrap();
            mm.migrate_page(a, &coh).unwrap();
            let got = peerdma::gup::get_user_pages(&mm, a, 1, FollFlags::NONE).unwrap();
            let writer = {
                let mm = mm.clone();
                thread::spawn(move || mm.write(a, b"new-data").unwrap())
            };
            let evictor = {
                let (phys, coh) = (h.phys().clone(), coh.clone());
                thread::spawn(move || {
                    peerdma::mm::migrate_device_range(&phys, &coh, coh.base(), coh.frames())
                        .unwrap()
                })
            };
            writer.join().unwrap();
            let ev = evictor.join().unwrap();
            assert!(ev.refused.is_empty(), "{:?}", ev.refused);
            assert_eq!(&read8(&mm, a), b"new-data", "the store survived the copy");
            assert!(!mm.pte(a).pfn().is_some_and(|p| coh.contains(p)));
            drop(got);
        },
        iterations(),
        3,
    );
}

/// A host with a GPU of 32 VRAM pages bound through the registry, a process, a GPU
/// context, and a 2-page BO mapped at a GPU address.
fn bo_host() -> (
    common::Checked,
    Arc<peerdma::drivers::gpu::Gpu>,
    peerdma::drivers::gpu::GpuContext,
    peerdma::drivers::gpu::BoHandle,
    peerdma::addr::VirtAddr,
) {
    let mut h = common::host(8 << 20);
    let bdf = "0000:03:00.0".parse().unwrap();
    let spec = peerdma::drivers::gpu::GpuSpec {
        bdf,
        vram_bytes: 32 * PAGE_SIZE,
    };
    h.add_device(&spec.into()).unwrap();
    let gpu = h.device::<peerdma::drivers::gpu::Gpu>(bdf).unwrap();
    let mm = h.spawn();
    let ctx = gpu.open(&mm);
    let bo = gpu.bo_alloc(2 * PAGE_SIZE).unwrap();
    let va = ctx.map_bo(bo).unwrap();
    (h, gpu, ctx, bo, va)
}

#[test]
fn gpu_work_on_a_bo_racing_its_eviction_is_never_lost() {
    // The eviction waits for the GPU work counted busy on the BO before it copies;
    // work that starts after the move finds the BO in RAM and brings it back, or works
    // on it there. Either way the stored bytes are in the BO afterwards.
    shuttle::check_random(
        || {
            let (_h, gpu, ctx, bo, va) = bo_host();
            let ctx = Arc::new(ctx);
            let storer = {
                let ctx = ctx.clone();
                thread::spawn(move || ctx.store(va, b"gpu-data").unwrap())
            };
            let evictor = {
                let gpu = gpu.clone();
                thread::spawn(move || gpu.bo_evict(bo).unwrap())
            };
            storer.join().unwrap();
            evictor.join().unwrap();
            let mut b = [0u8; 8];
            gpu.bo_read(bo, 0, &mut b).unwrap();
            assert_eq!(&b, b"gpu-data");
            ctx.unmap_bo(va).unwrap();
            gpu.bo_free(bo).unwrap();
        },
        iterations(),
    );
}

#[test]
fn a_closed_bo_is_freed_once_by_whichever_holder_lets_go_last_even_mid_move() {
    // GEM close, the last dma-buf reference and the last peer mapping race an eviction
    // of every BO. The eviction upgrades the buffer and the mapping with the BO locked
    // (to tell them it moves), so it may end up holding their last references: those
    // are parked and dropped once the BO is unlocked, never freed under its own lock.
    // Whatever the order, the BO is freed exactly once and nothing is left behind.
    // PCT finds the self-deadlock of dropping them under the lock within a few runs.
    shuttle::check_pct(
        || {
            let (h, gpu, ctx, bo, va) = bo_host();
            ctx.unmap_bo(va).unwrap();
            let buf = gpu
                .bo_export(bo, peerdma::drivers::gpu::P2pPolicy::MoveToRam)
                .unwrap();
            let peer = common::attach(&h, "0000:05:00.0");
            let m = gpu
                .bo_map_peer(bo, &peer, peerdma::dma::Direction::Bidirectional, None)
                .unwrap();
            gpu.bo_write(bo, 0, b"held").unwrap();
            // Closed first in half the runs, racing the rest in the others.
            let early = shuttle::rand::Rng::gen_bool(&mut shuttle::rand::thread_rng(), 0.5);
            if early {
                gpu.bo_free(bo).unwrap();
            }
            let closer = {
                let gpu = gpu.clone();
                thread::spawn(move || {
                    if !early {
                        gpu.bo_free(bo).unwrap();
                    }
                })
            };
            let exporter = thread::spawn(move || drop(buf));
            let importer = thread::spawn(move || drop(m));
            let evictor = {
                let gpu = gpu.clone();
                thread::spawn(move || gpu.evict_bos())
            };
            closer.join().unwrap();
            exporter.join().unwrap();
            importer.join().unwrap();
            evictor.join().unwrap();
            assert!(gpu.bos().is_empty(), "{:?}", gpu.bos());
            assert_eq!(gpu.bo_vram().free_frames(), gpu.bo_vram().frames());
            assert_eq!(h.dma().live_mappings(), 0, "no GART or peer mapping left");
            assert!(h.dma().sanitizer().is_clean());
        },
        iterations(),
        3,
    );
}

#[test]
fn a_peer_write_racing_a_bo_eviction_lands_before_the_move_or_is_refused() {
    // The move revokes the peer's mapping, which waits for the DMA in flight: a write
    // that got in is copied with the BO; one that came later fails with EAGAIN and
    // left nothing anywhere. The copy engine's copy out of the BO races too.
    shuttle::check_random(
        || {
            let (h, gpu, ctx, bo, va) = bo_host();
            let peer = common::attach(&h, "0000:05:00.0");
            let m = gpu
                .bo_map_peer(bo, &peer, peerdma::dma::Direction::Bidirectional, None)
                .unwrap();
            let other = gpu.bo_alloc(PAGE_SIZE).unwrap();
            gpu.bo_write(bo, PAGE_SIZE, b"ce-data!").unwrap();
            let writer = {
                let m = m.clone();
                thread::spawn(move || m.mapping().dma_write(0, b"peerdata"))
            };
            let copier = {
                let gpu = gpu.clone();
                thread::spawn(move || {
                    use peerdma::drivers::gpu::CeAddr;
                    gpu.ce_copy(CeAddr::Bo(other, 0), CeAddr::Bo(bo, PAGE_SIZE), 8)
                        .unwrap()
                })
            };
            let evictor = {
                let gpu = gpu.clone();
                thread::spawn(move || gpu.bo_evict(bo).unwrap())
            };
            let wrote = writer.join().unwrap();
            copier.join().unwrap();
            assert!(evictor.join().unwrap());
            let mut b = [0u8; 8];
            gpu.bo_read(bo, 0, &mut b).unwrap();
            match wrote {
                Ok(()) => assert_eq!(&b, b"peerdata"),
                Err(e) => {
                    assert_eq!(e.errno(), peerdma::errno::Errno::EAGAIN, "{e}");
                    assert_eq!(b, [0; 8]);
                }
            }
            gpu.bo_read(other, 0, &mut b).unwrap();
            assert_eq!(&b, b"ce-data!");
            assert!(h.dma().sanitizer().is_clean());
            drop(m);
            ctx.unmap_bo(va).unwrap();
            gpu.bo_free(bo).unwrap();
            gpu.bo_free(other).unwrap();
        },
        iterations(),
    );
}
