//! Model-based test of address spaces: random mmap, write, munmap, mprotect, madvise,
//! fork, migration and pin sequences over several processes, checked against a plain
//! map of page -> (protection, byte) per process. Data written by the CPU must read
//! back after fork, COW and migration; nothing may leak once every process exits.

mod common;

use std::collections::BTreeMap;

use peerdma::addr::{VirtAddr, PAGE_SIZE};
use peerdma::gup::{pin_user_pages, FollFlags};
use peerdma::host::Process;
use peerdma::mem::RegionKind;
use peerdma::mm::Prot;
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Mmap {
        pages: u64,
        writable: bool,
    },
    Write {
        proc: usize,
        page: usize,
        byte: u8,
    },
    Munmap {
        proc: usize,
        page: usize,
        pages: u64,
    },
    Protect {
        proc: usize,
        page: usize,
        pages: u64,
        prot: u8,
    },
    DontNeed {
        proc: usize,
        page: usize,
        pages: u64,
    },
    Fork {
        proc: usize,
    },
    Migrate {
        proc: usize,
        page: usize,
        private: bool,
    },
    PinWrite {
        proc: usize,
        page: usize,
        byte: u8,
    },
    Exit {
        proc: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (1u64..6, any::<bool>()).prop_map(|(pages, writable)| Op::Mmap { pages, writable }),
        (0usize..4, 0usize..64, any::<u8>()).prop_map(|(proc, page, byte)| Op::Write {
            proc,
            page,
            byte
        }),
        (0usize..4, 0usize..64, 1u64..4).prop_map(|(proc, page, pages)| Op::Munmap {
            proc,
            page,
            pages
        }),
        (0usize..4, 0usize..64, 1u64..4, 0u8..3).prop_map(|(proc, page, pages, prot)| {
            Op::Protect {
                proc,
                page,
                pages,
                prot,
            }
        }),
        (0usize..4, 0usize..64, 1u64..4).prop_map(|(proc, page, pages)| Op::DontNeed {
            proc,
            page,
            pages
        }),
        (0usize..4).prop_map(|proc| Op::Fork { proc }),
        (0usize..4, 0usize..64, any::<bool>()).prop_map(|(proc, page, private)| Op::Migrate {
            proc,
            page,
            private
        }),
        (0usize..4, 0usize..64, any::<u8>()).prop_map(|(proc, page, byte)| Op::PinWrite {
            proc,
            page,
            byte
        }),
        (1usize..4).prop_map(|proc| Op::Exit { proc }),
    ]
}

/// page address -> (protection, the byte at offset 123)
type Model = BTreeMap<u64, (Prot, u8)>;

const OFF: u64 = 123;

fn prot_of(p: u8) -> Prot {
    [Prot::NONE, Prot::READ, Prot::RW][p as usize]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PEERDMA_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn address_spaces_match_the_model(ops in proptest::collection::vec(op(), 1..60)) {
        let h = common::host(32 << 20);
    let phys = h.phys().clone();
        let coherent = phys.memremap_pages(RegionKind::DeviceCoherent { owner: 1 }, 4 << 20).unwrap();
        let private = phys.memremap_pages(RegionKind::DevicePrivate { owner: 2 }, 4 << 20).unwrap();
        let mut procs: Vec<(Process, Model)> = vec![(h.spawn(), Model::new())];
        // Every mapping any process made, so page indices pick real pages.
        for op in ops {
            let pick = |procs: &Vec<(Process, Model)>, proc: usize| proc % procs.len();
            match op {
                Op::Mmap { pages, writable } => {
                    let (mm, model) = &mut procs[0];
                    let prot = if writable { Prot::RW } else { Prot::READ };
                    let a = mm.mmap_anon(pages * PAGE_SIZE, prot).unwrap();
                    for i in 0..pages {
                        model.insert(a.0 + i * PAGE_SIZE, (prot, 0));
                    }
                }
                Op::Write { proc, page, byte } => {
                    let p = pick(&procs, proc);
                    let (mm, model) = &mut procs[p];
                    let Some((&va, &(prot, _))) = model.iter().nth(page % model.len().max(1)) else { continue };
                    let r = mm.write(VirtAddr(va + OFF), &[byte]);
                    if prot.writable() {
                        prop_assert!(r.is_ok(), "{r:?}");
                        model.insert(va, (prot, byte));
                    } else {
                        prop_assert_eq!(r.unwrap_err().errno(), 13);
                    }
                }
                Op::Munmap { proc, page, pages } => {
                    let p = pick(&procs, proc);
                    let (mm, model) = &mut procs[p];
                    let Some(&va) = model.keys().nth(page % model.len().max(1)) else { continue };
                    mm.munmap(VirtAddr(va), pages * PAGE_SIZE).unwrap();
                    for i in 0..pages {
                        model.remove(&(va + i * PAGE_SIZE));
                    }
                }
                Op::Protect { proc, page, pages, prot } => {
                    let p = pick(&procs, proc);
                    let (mm, model) = &mut procs[p];
                    let Some(&va) = model.keys().nth(page % model.len().max(1)) else { continue };
                    // mm/mprotect.c: pages up to the first hole change, then ENOMEM.
                    let prefix = (0..pages)
                        .take_while(|i| model.contains_key(&(va + i * PAGE_SIZE)))
                        .count() as u64;
                    let r = mm.mprotect(VirtAddr(va), pages * PAGE_SIZE, prot_of(prot));
                    for i in 0..prefix {
                        model.get_mut(&(va + i * PAGE_SIZE)).unwrap().0 = prot_of(prot);
                    }
                    if prefix == pages {
                        prop_assert!(r.is_ok(), "{r:?}");
                    } else {
                        prop_assert_eq!(r.unwrap_err().errno(), 12, "ENOMEM over a hole");
                    }
                }
                Op::DontNeed { proc, page, pages } => {
                    // mm/madvise.c: every mapped page of the range is dropped; a hole
                    // anywhere makes the call ENOMEM afterwards.
                    let p = pick(&procs, proc);
                    let (mm, model) = &mut procs[p];
                    let Some(&va) = model.keys().nth(page % model.len().max(1)) else { continue };
                    let r = mm.madvise_dontneed(VirtAddr(va), pages * PAGE_SIZE);
                    let mut holes = false;
                    for i in 0..pages {
                        match model.get_mut(&(va + i * PAGE_SIZE)) {
                            Some(e) => e.1 = 0,
                            None => holes = true,
                        }
                    }
                    if holes {
                        prop_assert_eq!(r.unwrap_err().errno(), 12, "ENOMEM over a hole");
                    } else {
                        prop_assert!(r.is_ok(), "{r:?}");
                    }
                }
                Op::Fork { proc } => {
                    if procs.len() < 4 {
                        let p = pick(&procs, proc);
                        let child = procs[p].0.fork().unwrap();
                        let model = procs[p].1.clone();
                        procs.push((child, model));
                    }
                }
                Op::Migrate { proc, page, private: to_private } => {
                    let p = pick(&procs, proc);
                    let (mm, model) = &procs[p];
                    let Some(&va) = model.keys().nth(page % model.len().max(1)) else { continue };
                    let target = if to_private { &private } else { &coherent };
                    // Busy (shared after fork, unpopulated) is a fine answer; data must survive either way.
                    let _ = mm.migrate_page(VirtAddr(va), target);
                }
                Op::PinWrite { proc, page, byte } => {
                    let p = pick(&procs, proc);
                    let (mm, model) = &mut procs[p];
                    let Some((&va, &(prot, _))) = model.iter().nth(page % model.len().max(1)) else { continue };
                    match pin_user_pages(mm, VirtAddr(va), 1, FollFlags::WRITE) {
                        Ok(pin) => {
                            prop_assert!(prot.writable());
                            // "DMA" into the pinned frame: the process must see it.
                            let f = pin.pages()[0];
                            phys.region(f).unwrap().write(f, OFF, &[byte]);
                            model.insert(va, (prot, byte));
                        }
                        Err(e) => prop_assert!(!prot.writable(), "{e}"),
                    }
                }
                Op::Exit { proc } => {
                    if procs.len() > 1 {
                        let p = 1 + proc % (procs.len() - 1);
                        let (mm, _) = procs.remove(p);
                        mm.exit();
                    }
                }
            }
            // Every process reads back its model.
            for (mm, model) in &procs {
                for (&va, &(prot, byte)) in model {
                    let mut b = [0xffu8];
                    let r = mm.read(VirtAddr(va + OFF), &mut b);
                    if prot.readable() {
                        prop_assert!(r.is_ok(), "{r:?}");
                        prop_assert_eq!(b[0], byte, "page {:#x}", va);
                    } else {
                        prop_assert_eq!(r.unwrap_err().errno(), 13);
                    }
                }
            }
        }
        for (mm, _) in procs.drain(..) {
            mm.exit();
        }
        let q = h.quiescent();
        prop_assert!(q.is_clean(), "{}", q);
    }
}
