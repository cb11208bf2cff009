//! The RDMA NIC's races under shuttle's scheduler (`--features shuttle`), each
//! exploring `PEERDMA_SHUTTLE_ITERS` schedules (100 by default):
//!
//! - an RDMA WRITE through a dma-buf MR racing the BO's eviction (move_notify, revoke,
//!   copy, KERNEL fence) and GPU work on it lands in the BO wherever it is, once;
//! - an RDMA WRITE through an ODP MR racing a migration of the page into a GPU's VRAM
//!   lands in the page the process maps afterwards: the invalidation waits for the
//!   NIC (it takes the MR's lock, which the access holds);
//! - two NICs faulting the same ODP page at once both complete, with the bytes;
//! - an RDMA WRITE racing dereg of its target MR completes or fails with
//!   REM_ACCESS_ERR, and no byte lands after dereg returned.

#![cfg(feature = "shuttle")]

mod common;

use common::rdma::{bdf, connect, side, Side, RW};
use peerdma::addr::{VirtAddr, PAGE_SIZE};
use peerdma::drivers::gpu::{Gpu, Location, P2pPolicy};
use peerdma::drivers::rnic::{Access, Rnic, SendOp, SendWr, Sge, WcStatus};
use peerdma::host::Host;
use peerdma::mm::Prot;
use peerdma::sync::thread;

fn iterations() -> usize {
    std::env::var("PEERDMA_SHUTTLE_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100)
}

const NICS: [&str; 3] = ["0000:1b:00.0", "0000:1d:00.0", "0000:3e:00.0"];
const GPU: &str = "0000:1a:00.0";

/// The dgx (IOMMU off) with 8 MiB of RAM, three NICs and a GPU of 16 VRAM pages.
fn dgx() -> common::Checked {
    common::rdma::machine("dgx", 8 << 20, false, &NICS, (GPU, 16), false)
}

/// A requester on `nic` whose QP is connected to a new responder QP in `to`'s context.
fn requester(h: &Host, nic: &str, to: &Side) -> (Side, VirtAddr, u32) {
    let a = side(h, nic);
    let cq = to.ctx.create_cq().unwrap();
    let rq = to.ctx.create_qp(to.pd, &cq, &cq).unwrap();
    connect(&a.qp, &rq);
    let src = a.p.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
    let lkey = a
        .ctx
        .reg_mr(a.pd, src, PAGE_SIZE, src.0, RW)
        .unwrap()
        .lkey();
    (a, src, lkey)
}

/// Writes `data` to `remote_addr` under `rkey` from `a`; the completion status.
fn write(a: &Side, src: VirtAddr, lkey: u32, data: &[u8], remote_addr: u64, rkey: u32) -> WcStatus {
    a.p.write(src, data).unwrap();
    a.qp.post_send(SendWr {
        wr_id: 1,
        op: SendOp::Write { remote_addr, rkey },
        sg: vec![Sge {
            addr: src.0,
            len: data.len() as u32,
            lkey,
        }],
        signaled: true,
    })
    .unwrap();
    let wc = a.cq.poll(4);
    assert_eq!(wc.len(), 1);
    wc[0].status
}

#[test]
fn a_dma_buf_mr_write_racing_the_bos_eviction_lands_in_the_bo_once() {
    shuttle::check_random(
        || {
            let h = dgx();
            let gpu = h.device::<Gpu>(bdf(GPU)).unwrap();
            let b = side(&h, NICS[1]);
            let bo = gpu.bo_alloc(2 * PAGE_SIZE).unwrap();
            let buf = gpu.bo_export(bo, P2pPolicy::MoveToRam).unwrap();
            let fd = b.p.files().export_fd(&buf);
            let mr = b
                .ctx
                .reg_dmabuf_mr(b.pd, 0, 2 * PAGE_SIZE, 0, fd, RW)
                .unwrap();
            let (a, src, lkey) = requester(&h, NICS[0], &b);
            let rkey = mr.rkey();
            let writer = thread::spawn(move || {
                let st = write(&a, src, lkey, b"nic-data", 8, rkey);
                (st, a)
            });
            let evictor = {
                let gpu = gpu.clone();
                thread::spawn(move || gpu.bo_evict(bo).unwrap())
            };
            let (st, a) = writer.join().unwrap();
            assert!(evictor.join().unwrap());
            assert_eq!(st, WcStatus::Success);
            let mut got = [0u8; 8];
            gpu.bo_read(bo, 8, &mut got).unwrap();
            assert_eq!(&got, b"nic-data");
            assert!(
                h.dma().sanitizer().is_clean(),
                "{:?}",
                h.dma().sanitizer().violations()
            );
            drop((a, b, mr, buf));
            gpu.bo_free(bo).unwrap();
        },
        iterations(),
    );
}

#[test]
fn an_odp_write_racing_a_migration_into_vram_lands_in_the_page_mapped_afterwards() {
    shuttle::check_pct(
        || {
            let h = dgx();
            let gpu = h.device::<Gpu>(bdf(GPU)).unwrap();
            let b = side(&h, NICS[1]);
            let dst = b.p.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
            b.p.write(dst, b"old-data").unwrap();
            let mr = b
                .ctx
                .reg_mr(b.pd, dst, PAGE_SIZE, dst.0, RW | Access::ON_DEMAND)
                .unwrap();
            let (a, src, lkey) = requester(&h, NICS[0], &b);
            let rkey = mr.rkey();
            let writer = thread::spawn(move || {
                let st = write(&a, src, lkey, b"nic-data", dst.0, rkey);
                (st, a)
            });
            let migrator = {
                let ctx = gpu.open(&b.p);
                thread::spawn(move || ctx.prefetch(dst, PAGE_SIZE, Location::Vram).unwrap())
            };
            let (st, a) = writer.join().unwrap();
            migrator.join().unwrap();
            assert_eq!(st, WcStatus::Success);
            let mut got = [0u8; 8];
            b.p.read(dst, &mut got).unwrap();
            assert_eq!(&got, b"nic-data");
            assert!(
                h.dma().sanitizer().is_clean(),
                "{:?}",
                h.dma().sanitizer().violations()
            );
            drop((a, b, mr));
        },
        iterations(),
        3,
    );
}

#[test]
fn two_nics_faulting_one_odp_page_both_complete() {
    shuttle::check_random(
        || {
            let h = dgx();
            let b = side(&h, NICS[1]);
            let dst = b.p.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
            let mr0 = b
                .ctx
                .reg_mr(b.pd, dst, PAGE_SIZE, dst.0, RW | Access::ON_DEMAND)
                .unwrap();
            // A second NIC's context in the same process, with its own ODP MR.
            let nic2 = h.device::<Rnic>(bdf(NICS[2])).unwrap();
            let ctx2 = nic2.open(&b.p, b.p.files()).unwrap();
            let pd2 = ctx2.alloc_pd().unwrap();
            let mr2 = ctx2
                .reg_mr(pd2, dst, PAGE_SIZE, dst.0, RW | Access::ON_DEMAND)
                .unwrap();
            let b2 = Side {
                p: h.spawn(),
                ctx: ctx2,
                pd: pd2,
                cq: b.cq.clone(),
                qp: b.qp.clone(),
            };
            let (a0, s0, l0) = requester(&h, NICS[0], &b);
            let (a2, s2, l2) = requester(&h, NICS[0], &b2);
            let (k0, k2) = (mr0.rkey(), mr2.rkey());
            let t0 = thread::spawn(move || (write(&a0, s0, l0, b"first-8b", dst.0, k0), a0));
            let t2 = thread::spawn(move || (write(&a2, s2, l2, b"second-8", dst.0 + 8, k2), a2));
            let (r0, a0) = t0.join().unwrap();
            let (r2, a2) = t2.join().unwrap();
            assert_eq!((r0, r2), (WcStatus::Success, WcStatus::Success));
            let mut got = [0u8; 16];
            b.p.read(dst, &mut got).unwrap();
            assert_eq!(&got, b"first-8bsecond-8");
            drop((a0, a2, b2, mr0, mr2, b));
        },
        iterations(),
    );
}

#[test]
fn a_write_racing_dereg_of_its_target_completes_or_is_refused_and_nothing_lands_after() {
    shuttle::check_random(
        || {
            let h = dgx();
            let b = side(&h, NICS[1]);
            let dst = b.p.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
            for odp in [false, true] {
                let acc = if odp { RW | Access::ON_DEMAND } else { RW };
                let mr = b.ctx.reg_mr(b.pd, dst, PAGE_SIZE, dst.0, acc).unwrap();
                let (a, src, lkey) = requester(&h, NICS[0], &b);
                let rkey = mr.rkey();
                b.p.write(dst, &[0u8; 8]).unwrap();
                let writer =
                    thread::spawn(move || (write(&a, src, lkey, b"late-dma", dst.0, rkey), a));
                b.ctx.dereg_mr(&mr).unwrap();
                // Dereg returned: from here on nothing may change the page.
                let mut at_dereg = [0u8; 8];
                b.p.read(dst, &mut at_dereg).unwrap();
                let (st, a) = writer.join().unwrap();
                let mut now = [0u8; 8];
                b.p.read(dst, &mut now).unwrap();
                assert_eq!(now, at_dereg, "a byte landed after dereg returned");
                match st {
                    WcStatus::Success => assert_eq!(&now, b"late-dma"),
                    WcStatus::RemAccessErr => assert_eq!(now, [0u8; 8]),
                    s => panic!("unexpected status {s:?}"),
                }
                drop(a);
            }
            assert!(h.dma().sanitizer().is_clean());
        },
        iterations(),
    );
}
