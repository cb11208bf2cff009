//! The RDMA NIC model: the kernel's registration rules (rule numbers from
//! shared/reference/rdma-dmabuf.md: U pinned umem, O ODP, D dma-buf MR), the queue pair
//! state machine and completion statuses of rxe, and real bytes moved by DMA between
//! two NICs (on one host or two) — into pinned memory, ODP memory, and GPU VRAM through
//! a dma-buf. Every host is leak-checked when it drops: pins, mappings, attachments and
//! frames return to zero.

mod common;

use common::rdma::{bdf, connect, side, Side, RW};
use peerdma::addr::{VirtAddr, PAGE_SIZE};
use peerdma::drivers::gpu::Gpu;
use peerdma::drivers::rnic::{
    Access, Advice, MrKind, QpState, RecvWr, Rnic, RnicCaps, SendOp, SendWr, Sge, Wc, WcOpcode,
    WcStatus,
};
use peerdma::errno::Errno;
use peerdma::host::Host;
use peerdma::mm::Prot;
use peerdma::sync::Arc;

const GPU: &str = "0000:1a:00.0";
const NIC_A: &str = "0000:1b:00.0";
const NIC_B: &str = "0000:1d:00.0";

/// The dgx with 32 MiB of RAM, NICs A and B and a GPU of 64 VRAM pages.
fn dgx(iommu: bool) -> common::Checked {
    common::rdma::machine("dgx", 32 << 20, iommu, &[NIC_A, NIC_B], (GPU, 64), false)
}

/// Two sides on NICs A and B with their QPs connected and in RTS.
fn pair(h: &Host) -> (Side, Side) {
    let a = side(h, NIC_A);
    let b = side(h, NIC_B);
    connect(&a.qp, &b.qp);
    (a, b)
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i % 253) as u8 ^ seed.wrapping_mul(29))
        .collect()
}

fn one(cq: &peerdma::drivers::rnic::Cq) -> Wc {
    let wcs = cq.poll(16);
    assert_eq!(wcs.len(), 1, "{wcs:?}");
    wcs[0]
}

fn write_wr(local: (u64, u32, u32), remote_addr: u64, rkey: u32) -> SendWr {
    SendWr {
        wr_id: 7,
        op: SendOp::Write { remote_addr, rkey },
        sg: vec![Sge {
            addr: local.0,
            len: local.1,
            lkey: local.2,
        }],
        signaled: true,
    }
}

#[test]
fn registration_refusals_follow_ib_check_mr_access_and_ib_umem_get() {
    let h = dgx(true);
    let a = side(&h, NIC_A);
    let buf = a.p.mmap_anon(4 * PAGE_SIZE, Prot::RW).unwrap();
    let reg = |addr: u64, len: u64, iova: u64, acc: Access| {
        a.ctx
            .reg_mr(a.pd, VirtAddr(addr), len, iova, acc)
            .map(|_| ())
            .map_err(|e| e.errno)
    };
    // U1: VA and IOVA with different page offsets.
    assert_eq!(reg(buf.0 + 8, 64, 0x1000, RW), Err(Errno::EINVAL));
    // U2: remote write or atomic without LOCAL_WRITE; unknown bits.
    assert_eq!(
        reg(buf.0, 64, buf.0, Access::REMOTE_WRITE),
        Err(Errno::EINVAL)
    );
    assert_eq!(
        reg(buf.0, 64, buf.0, Access::REMOTE_ATOMIC),
        Err(Errno::EINVAL)
    );
    assert_eq!(reg(buf.0, 64, buf.0, Access(1 << 30)), Err(Errno::EINVAL));
    // U5, U8: zero length and wrap.
    assert_eq!(reg(buf.0, 0, buf.0, RW), Err(Errno::EINVAL));
    assert_eq!(
        reg(u64::MAX - 10, 100, u64::MAX - 10, RW),
        Err(Errno::EINVAL)
    );
    // U11: an unmapped range, and a write pin of a read-only mapping: EFAULT.
    assert_eq!(
        reg(0x7000_0000, PAGE_SIZE, 0x7000_0000, RW),
        Err(Errno::EFAULT)
    );
    let ro = a.p.mmap_anon(PAGE_SIZE, Prot::READ).unwrap();
    assert_eq!(reg(ro.0, PAGE_SIZE, ro.0, RW), Err(Errno::EFAULT));
    // A read-only MR pins a read-only mapping (no FOLL_WRITE).
    assert_eq!(reg(ro.0, PAGE_SIZE, ro.0, Access::REMOTE_READ), Ok(()));
    // An unaligned address counts every page it touches (U8): 0x..ff0 + 0x20 = 2 pages.
    let before = a.p.pinned_vm();
    let mr = a
        .ctx
        .reg_mr(a.pd, VirtAddr(buf.0 + 0xff0), 0x20, 0xff0, RW)
        .unwrap();
    assert_eq!(a.p.pinned_vm() - before, 2);
    a.ctx.dereg_mr(&mr).unwrap();
    assert_eq!(a.p.pinned_vm(), before);
    // ON_DEMAND on a NIC without ODP: EOPNOTSUPP.
    let nic = Rnic::new(
        h.dma(),
        bdf("0000:3e:00.0"),
        RnicCaps {
            odp: false,
            implicit_odp: false,
            dmabuf: false,
        },
    )
    .unwrap();
    let ctx = nic.open(&a.p, a.p.files()).unwrap();
    let pd = ctx.alloc_pd().unwrap();
    let e = ctx
        .reg_mr(pd, buf, PAGE_SIZE, buf.0, RW | Access::ON_DEMAND)
        .unwrap_err();
    assert_eq!(e.errno, Errno::EOPNOTSUPP);
    // O6: implicit ODP needs IOVA 0.
    let e = a
        .ctx
        .reg_mr(a.pd, VirtAddr(0), u64::MAX, 0x1000, RW | Access::ON_DEMAND)
        .unwrap_err();
    assert_eq!(e.errno, Errno::EINVAL);
    // A PD of another context.
    assert_eq!(
        a.ctx
            .reg_mr(pd, buf, PAGE_SIZE, buf.0, RW)
            .unwrap_err()
            .errno,
        Errno::EINVAL
    );
}

#[test]
fn pinned_mrs_are_charged_to_pinned_vm_against_rlimit_memlock() {
    let h = dgx(false);
    let a = side(&h, NIC_A);
    let buf = a.p.mmap_anon(8 * PAGE_SIZE, Prot::RW).unwrap();
    // U6: a limit of zero is EPERM; U9: past the limit ENOMEM, nothing charged.
    a.p.set_memlock_limit(Some(0));
    let e = a.ctx.reg_mr(a.pd, buf, PAGE_SIZE, buf.0, RW).unwrap_err();
    assert_eq!(e.errno, Errno::EPERM);
    a.p.set_memlock_limit(Some(4 * PAGE_SIZE));
    let m1 = a.ctx.reg_mr(a.pd, buf, 3 * PAGE_SIZE, buf.0, RW).unwrap();
    let e = a
        .ctx
        .reg_mr(a.pd, buf, 2 * PAGE_SIZE, buf.0, RW)
        .unwrap_err();
    assert_eq!(e.errno, Errno::ENOMEM);
    assert_eq!(a.p.pinned_vm(), 3);
    // Two MRs over the same page count twice.
    let m2 = a.ctx.reg_mr(a.pd, buf, PAGE_SIZE, buf.0, RW).unwrap();
    assert_eq!(a.p.pinned_vm(), 4);
    // ODP is never charged (O1).
    let odp = a
        .ctx
        .reg_mr(a.pd, buf, 8 * PAGE_SIZE, buf.0, RW | Access::ON_DEMAND)
        .unwrap();
    assert_eq!(a.p.pinned_vm(), 4);
    assert_eq!(odp.kind(), MrKind::Odp);
    let nic = h.device::<Rnic>(bdf(NIC_A)).unwrap();
    assert_eq!(nic.stats().pinned_pages, 4);
    for m in [m1, m2, odp] {
        a.ctx.dereg_mr(&m).unwrap();
    }
    assert_eq!(a.p.pinned_vm(), 0);
    assert_eq!(nic.stats().pinned_pages, 0);
    assert_eq!(nic.stats().mrs, 0);
}

#[test]
fn rdma_write_read_send_and_atomics_move_real_bytes_between_two_nics() {
    for iommu in [false, true] {
        let h = dgx(iommu);
        let (a, b) = pair(&h);
        let n = 3 * PAGE_SIZE as usize + 100;
        let src = a.p.mmap_anon(4 * PAGE_SIZE, Prot::RW).unwrap();
        let dst = b.p.mmap_anon(4 * PAGE_SIZE, Prot::RW).unwrap();
        let data = pattern(n, 3);
        a.p.write(src, &data).unwrap();
        let la = a.ctx.reg_mr(a.pd, src, 4 * PAGE_SIZE, src.0, RW).unwrap();
        let rb = b
            .ctx
            .reg_mr(
                b.pd,
                dst,
                4 * PAGE_SIZE,
                0x10_0000,
                RW | Access::REMOTE_ATOMIC,
            )
            .unwrap();
        // RDMA WRITE at an offset into B's MR, named by its IOVA.
        a.qp.post_send(write_wr(
            (src.0, n as u32, la.lkey()),
            0x10_0000 + 16,
            rb.rkey(),
        ))
        .unwrap();
        let wc = one(&a.cq);
        assert_eq!(
            (wc.status, wc.opcode, wc.byte_len),
            (WcStatus::Success, WcOpcode::RdmaWrite, n as u32)
        );
        let mut got = vec![0u8; n];
        b.p.read(VirtAddr(dst.0 + 16), &mut got).unwrap();
        assert_eq!(got, data, "iommu {iommu}");
        // RDMA READ back into the start of A's buffer.
        a.qp.post_send(SendWr {
            wr_id: 8,
            op: SendOp::Read {
                remote_addr: 0x10_0000 + 16,
                rkey: rb.rkey(),
            },
            sg: vec![Sge {
                addr: src.0 + 2 * PAGE_SIZE,
                len: 200,
                lkey: la.lkey(),
            }],
            signaled: true,
        })
        .unwrap();
        assert_eq!(one(&a.cq).status, WcStatus::Success);
        let mut back = vec![0u8; 200];
        a.p.read(VirtAddr(src.0 + 2 * PAGE_SIZE), &mut back)
            .unwrap();
        assert_eq!(back, data[..200]);
        // SEND into a posted receive.
        b.qp.post_recv(RecvWr {
            wr_id: 99,
            sg: vec![Sge {
                addr: 0x10_0000 + 3 * PAGE_SIZE,
                len: 512,
                lkey: rb.lkey(),
            }],
        })
        .unwrap();
        a.qp.post_send(SendWr {
            wr_id: 9,
            op: SendOp::Send,
            sg: vec![Sge {
                addr: src.0 + 1000,
                len: 300,
                lkey: la.lkey(),
            }],
            signaled: true,
        })
        .unwrap();
        assert_eq!(one(&a.cq).status, WcStatus::Success);
        let r = one(&b.cq);
        assert_eq!(
            (r.wr_id, r.status, r.opcode, r.byte_len),
            (99, WcStatus::Success, WcOpcode::Recv, 300)
        );
        let mut msg = vec![0u8; 300];
        b.p.read(VirtAddr(dst.0 + 3 * PAGE_SIZE), &mut msg).unwrap();
        assert_eq!(msg, data[1000..1300]);
        // Atomics on an aligned word: fetch-and-add, then a failing and a succeeding CAS.
        b.p.write(dst, &40u64.to_le_bytes()).unwrap();
        let old_at = src.0 + 3 * PAGE_SIZE;
        let atomic = |op| SendWr {
            wr_id: 10,
            op,
            sg: vec![Sge {
                addr: old_at,
                len: 8,
                lkey: la.lkey(),
            }],
            signaled: true,
        };
        let old = |s: &Side| {
            let mut w = [0u8; 8];
            s.p.read(VirtAddr(old_at), &mut w).unwrap();
            u64::from_le_bytes(w)
        };
        let word = || {
            let mut w = [0u8; 8];
            b.p.read(dst, &mut w).unwrap();
            u64::from_le_bytes(w)
        };
        // Each atomic returns the old value and leaves the new one (rkey atomics).
        let rkey = rb.rkey();
        for (op, want_old, want_word) in [
            (
                SendOp::FetchAdd {
                    remote_addr: 0x10_0000,
                    rkey,
                    add: 2,
                },
                40,
                42,
            ),
            (
                SendOp::CompSwap {
                    remote_addr: 0x10_0000,
                    rkey,
                    compare: 7,
                    swap: 1,
                },
                42,
                42,
            ),
            (
                SendOp::CompSwap {
                    remote_addr: 0x10_0000,
                    rkey,
                    compare: 42,
                    swap: 5,
                },
                42,
                5,
            ),
        ] {
            a.qp.post_send(atomic(op)).unwrap();
            assert_eq!(one(&a.cq).status, WcStatus::Success, "{op:?}");
            assert_eq!((old(&a), word()), (want_old, want_word), "{op:?}");
        }
        assert!(h.dma().sanitizer().is_clean());
    }
}

#[test]
fn errors_complete_with_the_kernels_statuses_and_move_qps_to_error() {
    let h = dgx(false);
    let (a, b) = pair(&h);
    let src = a.p.mmap_anon(2 * PAGE_SIZE, Prot::RW).unwrap();
    let dst = b.p.mmap_anon(2 * PAGE_SIZE, Prot::RW).unwrap();
    let la = a.ctx.reg_mr(a.pd, src, 2 * PAGE_SIZE, src.0, RW).unwrap();
    // Read-only remote MR: no REMOTE_WRITE right.
    let ro = b
        .ctx
        .reg_mr(b.pd, dst, 2 * PAGE_SIZE, dst.0, Access::REMOTE_READ)
        .unwrap();
    a.qp.post_send(write_wr((src.0, 64, la.lkey()), dst.0, ro.rkey()))
        .unwrap();
    assert_eq!(one(&a.cq).status, WcStatus::RemAccessErr);
    assert_eq!((a.qp.state(), b.qp.state()), (QpState::Err, QpState::Err));
    // In ERR, new requests flush; posted receives flushed when it went to ERR.
    a.qp.post_send(write_wr((src.0, 64, la.lkey()), dst.0, ro.rkey()))
        .unwrap();
    assert_eq!(one(&a.cq).status, WcStatus::WrFlushErr);
    b.qp.post_recv(RecvWr {
        wr_id: 5,
        sg: vec![],
    })
    .unwrap();
    assert_eq!(one(&b.cq).status, WcStatus::WrFlushErr);
    // The state machine: RESET cannot go to RTS; post_send before RTS is EINVAL.
    a.qp.modify(QpState::Reset, None).unwrap();
    assert_eq!(
        a.qp.modify(QpState::Rts, None).unwrap_err().errno,
        Errno::EINVAL
    );
    assert_eq!(
        a.qp.post_send(write_wr((src.0, 64, la.lkey()), dst.0, ro.rkey()))
            .unwrap_err()
            .errno,
        Errno::EINVAL
    );
    assert_eq!(
        a.qp.post_recv(RecvWr {
            wr_id: 1,
            sg: vec![]
        })
        .unwrap_err()
        .errno,
        Errno::EINVAL
    );

    // Each case on a fresh pair: a page registered on each side (the responder's with
    // atomics too), an optional set-up, one request, and what each side sees.
    // Each case on a fresh pair: a page registered on each side (the responder's with
    // atomics too), an optional set-up, one request, what the requester and the
    // responder's receive queue see, and the responder QP's state afterwards (the
    // requester's goes to ERR every time).
    type Case = (
        &'static str,
        fn(&Fresh),
        fn(&Fresh) -> SendWr,
        WcStatus,
        Option<WcStatus>,
        QpState,
    );
    let cases: [Case; 6] = [
        (
            "a local key of another PD",
            |_| {},
            |f| {
                let pd2 = f.a.ctx.alloc_pd().unwrap();
                let other = f.a.ctx.reg_mr(pd2, f.src, PAGE_SIZE, f.src.0, RW).unwrap();
                write_wr((f.src.0, 64, other.lkey()), f.dst.0, f.rb.rkey())
            },
            WcStatus::LocProtErr,
            None,
            QpState::Rts,
        ),
        (
            "past the end of the remote MR",
            |_| {},
            |f| {
                write_wr(
                    (f.src.0, 64, f.la.lkey()),
                    f.dst.0 + PAGE_SIZE - 32,
                    f.rb.rkey(),
                )
            },
            WcStatus::RemAccessErr,
            None,
            QpState::Err,
        ),
        (
            "an unknown rkey",
            |_| {},
            |f| write_wr((f.src.0, 64, f.la.lkey()), 0, 0xdead_be00),
            WcStatus::RemAccessErr,
            None,
            QpState::Err,
        ),
        (
            "a misaligned atomic",
            |_| {},
            |f| {
                f.wr(
                    SendOp::FetchAdd {
                        remote_addr: f.dst.0 + 4,
                        rkey: f.rb.rkey(),
                        add: 1,
                    },
                    8,
                )
            },
            WcStatus::RemInvReqErr,
            None,
            QpState::Err,
        ),
        (
            "a SEND with no receive posted",
            |_| {},
            |f| f.wr(SendOp::Send, 8),
            WcStatus::RnrRetryExcErr,
            None,
            QpState::Rts,
        ),
        (
            "a SEND longer than the receive",
            |f| {
                let sg = vec![Sge {
                    addr: f.dst.0,
                    len: 16,
                    lkey: f.rb.lkey(),
                }];
                f.b.qp.post_recv(RecvWr { wr_id: 3, sg }).unwrap();
            },
            |f| f.wr(SendOp::Send, 64),
            WcStatus::RemInvReqErr,
            Some(WcStatus::LocLenErr),
            QpState::Err,
        ),
    ];
    for (what, setup, wr, want, want_recv, responder) in cases {
        let f = fresh(&h);
        setup(&f);
        f.a.qp.post_send(wr(&f)).unwrap();
        assert_eq!(one(&f.a.cq).status, want, "{what}");
        assert_eq!(f.a.qp.state(), QpState::Err, "{what}");
        assert_eq!(
            f.b.cq.poll(4).first().map(|w| w.status),
            want_recv,
            "{what}"
        );
        assert_eq!(f.b.qp.state(), responder, "{what}: the responder's QP");
    }
}

/// A connected pair with one page registered on each side (the responder's also for
/// atomics).
struct Fresh {
    a: Side,
    b: Side,
    src: VirtAddr,
    la: Arc<peerdma::drivers::rnic::Mr>,
    dst: VirtAddr,
    rb: Arc<peerdma::drivers::rnic::Mr>,
}

fn fresh(h: &Host) -> Fresh {
    let (a, b) = pair(h);
    let src = a.p.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
    let la = a.ctx.reg_mr(a.pd, src, PAGE_SIZE, src.0, RW).unwrap();
    let dst = b.p.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
    let acc = RW | Access::REMOTE_ATOMIC;
    let rb = b.ctx.reg_mr(b.pd, dst, PAGE_SIZE, dst.0, acc).unwrap();
    Fresh {
        a,
        b,
        src,
        la,
        dst,
        rb,
    }
}

impl Fresh {
    /// A signaled request `op` with `len` bytes of the local page.
    fn wr(&self, op: SendOp, len: u32) -> SendWr {
        SendWr {
            wr_id: 1,
            op,
            sg: vec![Sge {
                addr: self.src.0,
                len,
                lkey: self.la.lkey(),
            }],
            signaled: true,
        }
    }
}

#[test]
fn a_pinned_mr_keeps_its_frames_across_munmap_and_fork_and_its_dma_address_never_changes() {
    let h = dgx(true);
    let (a, b) = pair(&h);
    let src = a.p.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
    let la = a.ctx.reg_mr(a.pd, src, PAGE_SIZE, src.0, RW).unwrap();
    let dst = b.p.mmap_anon(2 * PAGE_SIZE, Prot::RW).unwrap();
    b.p.write(dst, b"parent").unwrap();
    let rb = b.ctx.reg_mr(b.pd, dst, 2 * PAGE_SIZE, dst.0, RW).unwrap();
    let addrs = rb.dma_addrs();
    // Fork: the parent keeps the pinned page (U22); the child has a copy.
    let child = b.p.fork().unwrap();
    a.p.write(src, b"after fork").unwrap();
    a.qp.post_send(write_wr((src.0, 10, la.lkey()), dst.0, rb.rkey()))
        .unwrap();
    assert_eq!(one(&a.cq).status, WcStatus::Success);
    let mut got = [0u8; 10];
    b.p.read(dst, &mut got).unwrap();
    assert_eq!(&got, b"after fork");
    child.read(dst, &mut got[..6]).unwrap();
    assert_eq!(&got[..6], b"parent");
    child.exit();
    // munmap: the MR keeps the old frames (U24); a new mapping there is not seen.
    b.p.munmap(dst, 2 * PAGE_SIZE).unwrap();
    let again = b.p.mmap_anon(2 * PAGE_SIZE, Prot::RW).unwrap();
    assert_eq!(again, dst, "the same address is reused");
    a.p.write(src, b"into the void").unwrap();
    a.qp.post_send(write_wr((src.0, 13, la.lkey()), dst.0, rb.rkey()))
        .unwrap();
    assert_eq!(
        one(&a.cq).status,
        WcStatus::Success,
        "no error for a pinned MR"
    );
    b.p.read(again, &mut got).unwrap();
    assert_eq!(
        got, [0u8; 10],
        "the new mapping does not see the NIC's write"
    );
    assert_eq!(rb.dma_addrs(), addrs);
    // Migration of a pinned page is refused (hmm migrate to a GPU leaves it).
    let gpu = h.device::<Gpu>(bdf(GPU)).unwrap();
    let ctx = gpu.open(&a.p);
    ctx.prefetch(src, PAGE_SIZE, peerdma::drivers::gpu::Location::Vram)
        .unwrap();
    assert_eq!(
        gpu.vram().frames() - gpu.vram().free_frames(),
        0,
        "a pinned page does not move"
    );
    let before = la.dma_addrs();
    a.p.write(src, b"still here").unwrap();
    a.qp.post_send(write_wr((src.0, 10, la.lkey()), dst.0, rb.rkey()))
        .unwrap();
    assert_eq!(one(&a.cq).status, WcStatus::Success);
    assert_eq!(la.dma_addrs(), before);
    assert!(h.dma().sanitizer().is_clean());
}

#[test]
fn process_exit_deregisters_everything_and_counters_return_to_zero() {
    let h = dgx(true);
    let (a, b) = pair(&h);
    let nic = h.device::<Rnic>(bdf(NIC_B)).unwrap();
    let dst = b.p.mmap_anon(4 * PAGE_SIZE, Prot::RW).unwrap();
    b.ctx.reg_mr(b.pd, dst, 4 * PAGE_SIZE, dst.0, RW).unwrap();
    b.ctx
        .reg_mr(b.pd, dst, 4 * PAGE_SIZE, dst.0, RW | Access::ON_DEMAND)
        .unwrap();
    b.ctx
        .reg_mr(b.pd, VirtAddr(0), u64::MAX, 0, RW | Access::ON_DEMAND)
        .unwrap();
    assert_eq!(nic.stats().mrs, 3);
    assert_eq!(nic.stats().pinned_pages, 4);
    let Side { p, ctx, qp, .. } = b;
    p.exit();
    assert_eq!(nic.stats().mrs, 0);
    assert_eq!(nic.stats().pinned_pages, 0);
    assert_eq!(qp.state(), QpState::Err);
    assert_eq!(ctx.alloc_pd().unwrap_err().errno, Errno::EBADF);
    // The peer's requests now fail: the responder is gone.
    let src = a.p.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
    let la = a.ctx.reg_mr(a.pd, src, PAGE_SIZE, src.0, RW).unwrap();
    a.qp.post_send(write_wr((src.0, 8, la.lkey()), dst.0, 0x100))
        .unwrap();
    assert_ne!(one(&a.cq).status, WcStatus::Success);
}

fn odp() -> Access {
    RW | Access::ON_DEMAND
}

#[test]
fn odp_faults_on_first_access_follows_munmap_and_remaps_and_breaks_cow_in_the_parent() {
    let h = dgx(true);
    let (a, b) = pair(&h);
    let nic_b = h.device::<Rnic>(bdf(NIC_B)).unwrap();
    let src = a.p.mmap_anon(2 * PAGE_SIZE, Prot::RW).unwrap();
    a.p.write(src, &pattern(2 * PAGE_SIZE as usize, 1)).unwrap();
    let la = a.ctx.reg_mr(a.pd, src, 2 * PAGE_SIZE, src.0, RW).unwrap();
    let dst = b.p.mmap_anon(4 * PAGE_SIZE, Prot::RW).unwrap();
    let rb = b
        .ctx
        .reg_mr(b.pd, dst, 4 * PAGE_SIZE, dst.0, odp())
        .unwrap();
    // O5: nothing was present, nothing is mapped; the first write faults 2 pages.
    assert_eq!(rb.mapped_pages(), 0);
    assert_eq!(b.p.pinned_vm(), 0);
    let s0 = nic_b.stats();
    a.qp.post_send(write_wr(
        (src.0, 2 * PAGE_SIZE as u32, la.lkey()),
        dst.0 + PAGE_SIZE,
        rb.rkey(),
    ))
    .unwrap();
    assert_eq!(one(&a.cq).status, WcStatus::Success);
    let s1 = nic_b.stats();
    assert_eq!(
        (
            s1.odp_faults - s0.odp_faults,
            s1.odp_pages_faulted - s0.odp_pages_faulted
        ),
        (1, 2)
    );
    let mut got = vec![0u8; 2 * PAGE_SIZE as usize];
    b.p.read(VirtAddr(dst.0 + PAGE_SIZE), &mut got).unwrap();
    assert_eq!(got, pattern(2 * PAGE_SIZE as usize, 1));
    // Resident now: the same write faults no more.
    a.qp.post_send(write_wr(
        (src.0, 64, la.lkey()),
        dst.0 + PAGE_SIZE,
        rb.rkey(),
    ))
    .unwrap();
    assert_eq!(one(&a.cq).status, WcStatus::Success);
    assert_eq!(nic_b.stats().odp_faults, s1.odp_faults);
    // O27: munmap invalidates; the next access finds no VMA: REM_ACCESS_ERR.
    b.p.munmap(dst, 4 * PAGE_SIZE).unwrap();
    assert_eq!(rb.mapped_pages(), 0);
    assert!(nic_b.stats().odp_invalidations > s1.odp_invalidations);
    a.qp.post_send(write_wr((src.0, 64, la.lkey()), dst.0, rb.rkey()))
        .unwrap();
    assert_eq!(one(&a.cq).status, WcStatus::RemAccessErr);
    // A new mapping at the same address is followed (unlike a pinned MR).
    let (a, b2) = (a, b);
    let again = b2.p.mmap_anon(4 * PAGE_SIZE, Prot::RW).unwrap();
    assert_eq!(again, dst);
    for q in [&a.qp, &b2.qp] {
        q.modify(QpState::Reset, None).unwrap();
    }
    connect(&a.qp, &b2.qp);
    a.qp.post_send(write_wr((src.0, 64, la.lkey()), dst.0, rb.rkey()))
        .unwrap();
    assert_eq!(one(&a.cq).status, WcStatus::Success);
    let mut w = vec![0u8; 64];
    b2.p.read(again, &mut w).unwrap();
    assert_eq!(w, pattern(2 * PAGE_SIZE as usize, 1)[..64]);
    // O28: fork makes the parent's pages read-only (invalidating the NIC); the next
    // NIC write faults for write and breaks COW in the parent.
    let child = b2.p.fork().unwrap();
    a.p.write(src, b"after the fork").unwrap();
    a.qp.post_send(write_wr((src.0, 14, la.lkey()), dst.0, rb.rkey()))
        .unwrap();
    assert_eq!(one(&a.cq).status, WcStatus::Success);
    let mut p = [0u8; 14];
    b2.p.read(dst, &mut p).unwrap();
    assert_eq!(&p, b"after the fork");
    child.read(dst, &mut p).unwrap();
    assert_eq!(
        p[..],
        pattern(2 * PAGE_SIZE as usize, 1)[..14],
        "the child keeps the old bytes"
    );
    child.exit();
    assert!(h.dma().sanitizer().is_clean());
}

#[test]
fn odp_write_permission_follows_the_cpu_page_and_a_read_only_mapping_refuses_writes() {
    let h = dgx(false);
    let (a, b) = pair(&h);
    let src = a.p.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
    a.p.write(src, b"0123456789").unwrap();
    let la = a.ctx.reg_mr(a.pd, src, PAGE_SIZE, src.0, RW).unwrap();
    let dst = b.p.mmap_anon(PAGE_SIZE, Prot::READ).unwrap();
    let rb = b.ctx.reg_mr(b.pd, dst, PAGE_SIZE, dst.0, odp()).unwrap();
    // A read maps the page read-only (rxe asks no write for reads, O21).
    a.qp.post_send(SendWr {
        wr_id: 1,
        op: SendOp::Read {
            remote_addr: dst.0,
            rkey: rb.rkey(),
        },
        sg: vec![Sge {
            addr: src.0,
            len: 8,
            lkey: la.lkey(),
        }],
        signaled: true,
    })
    .unwrap();
    assert_eq!(one(&a.cq).status, WcStatus::Success);
    assert_eq!(rb.mapped_pages(), 1);
    let mut got = [0xffu8; 8];
    a.p.read(src, &mut got).unwrap();
    assert_eq!(got, [0u8; 8], "a never-written page reads as zeros");
    // A write needs the CPU page writable: the fault fails (EPERM/EFAULT), and the
    // requester sees REM_ACCESS_ERR.
    a.qp.post_send(write_wr((src.0, 8, la.lkey()), dst.0, rb.rkey()))
        .unwrap();
    assert_eq!(one(&a.cq).status, WcStatus::RemAccessErr);
    // PREFETCH_WRITE on a read-only MR is EPERM (O24); a prefetch outside the MR EFAULT.
    let ro = b
        .ctx
        .reg_mr(
            b.pd,
            dst,
            PAGE_SIZE,
            dst.0,
            Access::REMOTE_READ | Access::ON_DEMAND,
        )
        .unwrap();
    let sge = |mr: &peerdma::drivers::rnic::Mr, addr: u64| Sge {
        addr,
        len: PAGE_SIZE as u32,
        lkey: mr.lkey(),
    };
    assert_eq!(
        b.ctx
            .advise_mr(b.pd, Advice::PrefetchWrite, true, &[sge(&ro, dst.0)])
            .unwrap_err()
            .errno,
        Errno::EPERM
    );
    assert_eq!(
        b.ctx
            .advise_mr(b.pd, Advice::Prefetch, true, &[sge(&ro, dst.0 + PAGE_SIZE)])
            .unwrap_err()
            .errno,
        Errno::EFAULT
    );
    assert_eq!(
        b.ctx
            .advise_mr(b.pd, Advice::Prefetch, true, &[])
            .unwrap_err()
            .errno,
        Errno::EINVAL
    );
}

#[test]
fn advise_mr_prefetches_for_read_write_or_only_what_is_present() {
    let h = dgx(true);
    let b = side(&h, NIC_B);
    let dst = b.p.mmap_anon(4 * PAGE_SIZE, Prot::RW).unwrap();
    b.p.write(dst, b"present").unwrap();
    let mr = b
        .ctx
        .reg_mr(b.pd, dst, 4 * PAGE_SIZE, dst.0, odp())
        .unwrap();
    // The registration snapshot mapped the one present page.
    assert_eq!(mr.mapped_pages(), 1);
    let sge = Sge {
        addr: dst.0,
        len: 4 * PAGE_SIZE as u32,
        lkey: mr.lkey(),
    };
    b.ctx
        .advise_mr(b.pd, Advice::PrefetchNoFault, true, &[sge])
        .unwrap();
    assert_eq!(mr.mapped_pages(), 1, "NO_FAULT maps only present pages");
    b.ctx
        .advise_mr(b.pd, Advice::PrefetchWrite, true, &[sge])
        .unwrap();
    assert_eq!(mr.mapped_pages(), 4);
    assert_eq!(
        b.p.resident_pages(),
        4,
        "PREFETCH_WRITE faulted the CPU pages in"
    );
    // Asynchronous prefetch on an implicit MR: best effort, returns at once.
    let imr = b.ctx.reg_mr(b.pd, VirtAddr(0), u64::MAX, 0, odp()).unwrap();
    assert_eq!(imr.kind(), MrKind::ImplicitOdp);
    let sge = Sge {
        addr: dst.0,
        len: PAGE_SIZE as u32,
        lkey: imr.lkey(),
    };
    b.ctx
        .advise_mr(b.pd, Advice::Prefetch, true, &[sge])
        .unwrap();
    assert_eq!(imr.mapped_pages(), 1);
    b.ctx
        .advise_mr(b.pd, Advice::Prefetch, false, &[sge])
        .unwrap();
}

#[test]
fn an_odp_access_migrates_gpu_private_pages_back_to_ram() {
    let h = dgx(true);
    let (a, b) = pair(&h);
    let gpu = h.device::<Gpu>(bdf(GPU)).unwrap();
    let dst = b.p.mmap_anon(2 * PAGE_SIZE, Prot::RW).unwrap();
    b.p.write(dst, &pattern(2 * PAGE_SIZE as usize, 9)).unwrap();
    let gctx = gpu.open(&b.p);
    assert_eq!(
        gctx.prefetch(dst, 2 * PAGE_SIZE, peerdma::drivers::gpu::Location::Vram)
            .unwrap(),
        2
    );
    let rb = b
        .ctx
        .reg_mr(b.pd, dst, 2 * PAGE_SIZE, dst.0, odp())
        .unwrap();
    assert_eq!(
        rb.mapped_pages(),
        0,
        "device-private pages are not present for the snapshot"
    );
    let src = a.p.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
    let la = a.ctx.reg_mr(a.pd, src, PAGE_SIZE, src.0, RW).unwrap();
    // RDMA READ of the GPU's pages: they come home first (O25).
    a.qp.post_send(SendWr {
        wr_id: 1,
        op: SendOp::Read {
            remote_addr: dst.0 + PAGE_SIZE - 8,
            rkey: rb.rkey(),
        },
        sg: vec![Sge {
            addr: src.0,
            len: 16,
            lkey: la.lkey(),
        }],
        signaled: true,
    })
    .unwrap();
    assert_eq!(one(&a.cq).status, WcStatus::Success);
    let mut got = [0u8; 16];
    a.p.read(src, &mut got).unwrap();
    assert_eq!(
        got[..],
        pattern(2 * PAGE_SIZE as usize, 9)[PAGE_SIZE as usize - 8..PAGE_SIZE as usize + 8]
    );
    assert_eq!(
        gpu.vram().frames() - gpu.vram().free_frames(),
        0,
        "both pages left VRAM"
    );
    assert!(h.dma().sanitizer().is_clean());
}

/// Case 2 of the thread: an ODP MR over memory the GPU migrates into VRAM (and the CPU
/// brings back) while the NIC keeps writing; every write lands exactly once, in the
/// page where the address points now.
#[test]
fn odp_writes_race_hmm_migration_and_every_byte_lands_once() {
    let h = dgx(true);
    let (a, b) = pair(&h);
    let nic_b = h.device::<Rnic>(bdf(NIC_B)).unwrap();
    let gpu = h.device::<Gpu>(bdf(GPU)).unwrap();
    let pages = 8u64;
    let dst = b.p.mmap_anon(pages * PAGE_SIZE, Prot::RW).unwrap();
    b.p.write(dst, &vec![0u8; (pages * PAGE_SIZE) as usize])
        .unwrap();
    let rb = b
        .ctx
        .reg_mr(b.pd, dst, pages * PAGE_SIZE, dst.0, odp())
        .unwrap();
    let src = a.p.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
    let la = a.ctx.reg_mr(a.pd, src, PAGE_SIZE, src.0, RW).unwrap();
    let rounds = 200u64;
    let stop = std::sync::atomic::AtomicBool::new(false);
    // Migration cycles the GPU thread finished; the writer keeps going until two whole
    // cycles ran after its first round mapped pages, so the race happens however the
    // threads are scheduled on a busy machine.
    let cycles = std::sync::atomic::AtomicU64::new(0);
    let ordering = std::sync::atomic::Ordering::SeqCst;
    let written = std::thread::scope(|s| {
        s.spawn(|| {
            let g = gpu.open(&b.p);
            while !stop.load(ordering) {
                let _ = g.prefetch(
                    dst,
                    pages * PAGE_SIZE,
                    peerdma::drivers::gpu::Location::Vram,
                );
                let _ = g.prefetch(dst, pages * PAGE_SIZE, peerdma::drivers::gpu::Location::Ram);
                cycles.fetch_add(1, ordering);
            }
        });
        // Each round writes an 8-byte counter into each page's slot `round % 512`.
        let mut r = 0;
        let mut after_first = u64::MAX;
        while r < rounds || cycles.load(ordering) < after_first.saturating_add(2) {
            for p in 0..pages {
                a.p.write(src, &(r * pages + p + 1).to_le_bytes()).unwrap();
                let at = dst.0 + p * PAGE_SIZE + (r % 512) * 8;
                a.qp.post_send(write_wr((src.0, 8, la.lkey()), at, rb.rkey()))
                    .unwrap();
                let wc = one(&a.cq);
                assert_eq!(wc.status, WcStatus::Success, "round {r} page {p}");
            }
            if r == 0 {
                after_first = cycles.load(ordering);
            }
            r += 1;
        }
        stop.store(true, ordering);
        r
    });
    // Every slot holds the last round that wrote it.
    for p in 0..pages {
        for r in written.saturating_sub(512)..written {
            let mut w = [0u8; 8];
            b.p.read(VirtAddr(dst.0 + p * PAGE_SIZE + (r % 512) * 8), &mut w)
                .unwrap();
            assert_eq!(
                u64::from_le_bytes(w),
                r * pages + p + 1,
                "page {p} round {r}"
            );
        }
    }
    let st = nic_b.stats();
    assert!(st.odp_faults >= 1 && st.odp_invalidations >= 1, "{st:?}");
    assert!(
        gpu.stats().migrated_to_vram > 0,
        "the GPU did migrate meanwhile"
    );
    assert!(
        h.dma().sanitizer().is_clean(),
        "{:?}",
        h.dma().sanitizer().violations()
    );
}

#[test]
fn rereg_changes_pd_and_access_but_never_makes_read_only_pins_writable() {
    let h = dgx(false);
    let (a, b) = pair(&h);
    let src = a.p.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
    a.p.write(src, b"rereg").unwrap();
    let la = a.ctx.reg_mr(a.pd, src, PAGE_SIZE, src.0, RW).unwrap();
    let dst = b.p.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
    // Registered read-only (pinned without FOLL_WRITE): rereg to writable is EACCES
    // (U25, ib_umem_check_rereg), and nothing changes.
    let ro = b
        .ctx
        .reg_mr(b.pd, dst, PAGE_SIZE, dst.0, Access::REMOTE_READ)
        .unwrap();
    let e = b.ctx.rereg_mr(&ro, None, Some(RW)).unwrap_err();
    assert_eq!(e.errno, Errno::EACCES);
    assert_eq!(ro.access(), Access::REMOTE_READ);
    a.qp.post_send(write_wr((src.0, 5, la.lkey()), dst.0, ro.rkey()))
        .unwrap();
    assert_eq!(one(&a.cq).status, WcStatus::RemAccessErr);
    // Nothing to change, a bad access combination, ON_DEMAND toggled: EINVAL.
    assert_eq!(
        b.ctx.rereg_mr(&ro, None, None).unwrap_err().errno,
        Errno::EINVAL
    );
    assert_eq!(
        b.ctx
            .rereg_mr(&ro, None, Some(Access::REMOTE_WRITE))
            .unwrap_err()
            .errno,
        Errno::EINVAL
    );
    assert_eq!(
        b.ctx
            .rereg_mr(&ro, None, Some(Access::REMOTE_READ | Access::ON_DEMAND))
            .unwrap_err()
            .errno,
        Errno::EINVAL
    );
    // A writable registration may drop and regain rights, and move to another PD.
    let (a, b) = pair(&h);
    let src = a.p.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
    a.p.write(src, b"rereg").unwrap();
    let la = a.ctx.reg_mr(a.pd, src, PAGE_SIZE, src.0, RW).unwrap();
    let dst = b.p.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
    let rw = b.ctx.reg_mr(b.pd, dst, PAGE_SIZE, dst.0, RW).unwrap();
    b.ctx
        .rereg_mr(&rw, None, Some(Access::REMOTE_READ))
        .unwrap();
    a.qp.post_send(write_wr((src.0, 5, la.lkey()), dst.0, rw.rkey()))
        .unwrap();
    assert_eq!(one(&a.cq).status, WcStatus::RemAccessErr);
    let (a, b2) = (a, b);
    let (a2, b3) = pair(&h);
    let _ = (&a, &b2);
    let other_pd = b3.ctx.alloc_pd().unwrap();
    assert_eq!(
        b2.ctx
            .rereg_mr(&rw, Some(other_pd), None)
            .unwrap_err()
            .errno,
        Errno::EINVAL,
        "a PD of another context"
    );
    let pd2 = b2.ctx.alloc_pd().unwrap();
    b2.ctx.rereg_mr(&rw, Some(pd2), Some(RW)).unwrap();
    assert_eq!((rw.pd(), rw.access()), (pd2, RW));
    drop((a2, b3));
}

#[test]
fn removing_a_nic_errors_its_qps_and_releases_its_mrs() {
    let mut h = dgx(true);
    let (a, b) = pair(&h);
    let dst = b.p.mmap_anon(2 * PAGE_SIZE, Prot::RW).unwrap();
    let rb = b.ctx.reg_mr(b.pd, dst, 2 * PAGE_SIZE, dst.0, RW).unwrap();
    b.ctx
        .reg_mr(b.pd, dst, 2 * PAGE_SIZE, dst.0, odp())
        .unwrap();
    assert_eq!(b.p.pinned_vm(), 2);
    let mappings = h.dma().live_mappings();
    assert!(mappings > 0);
    h.remove_device(bdf(NIC_B), Some(std::time::Duration::from_secs(5)))
        .unwrap();
    assert_eq!(b.qp.state(), QpState::Err);
    assert_eq!(b.p.pinned_vm(), 0, "the pinned MR was released");
    assert!(h.dma().live_mappings() < mappings);
    assert_eq!(b.ctx.alloc_pd().unwrap_err().errno, Errno::ENODEV);
    let src = a.p.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
    let la = a.ctx.reg_mr(a.pd, src, PAGE_SIZE, src.0, RW).unwrap();
    a.qp.post_send(write_wr((src.0, 8, la.lkey()), dst.0, rb.rkey()))
        .unwrap();
    assert_eq!(
        one(&a.cq).status,
        WcStatus::RetryExcErr,
        "the peer NIC is gone"
    );
    drop(b);
}

/// O9/O10: an invalidation of an ODP range waits for the NIC's DMA in flight into it:
/// munmap does not return while the responder's write is stopped mid-transfer, and the
/// write lands in the page before it goes.
#[test]
fn an_odp_invalidation_waits_for_the_nics_dma_in_flight() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc;
    let h = dgx(true);
    let (a, b) = pair(&h);
    let nic_b = h.device::<Rnic>(bdf(NIC_B)).unwrap();
    let src = a.p.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
    a.p.write(src, b"in flight").unwrap();
    let la = a.ctx.reg_mr(a.pd, src, PAGE_SIZE, src.0, RW).unwrap();
    let dst = b.p.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
    let rb = b.ctx.reg_mr(b.pd, dst, PAGE_SIZE, dst.0, odp()).unwrap();
    // Map the page for the NIC first, so the write below is a plain transfer.
    b.ctx
        .advise_mr(
            b.pd,
            Advice::PrefetchWrite,
            true,
            &[Sge {
                addr: dst.0,
                len: 8,
                lkey: rb.lkey(),
            }],
        )
        .unwrap();
    let (entered_tx, entered) = mpsc::channel();
    let (go, go_rx) = mpsc::channel::<()>();
    let go_rx = std::sync::Mutex::new(go_rx);
    let first = AtomicBool::new(true);
    let hook: peerdma::dma::TransferHook = Arc::new(move || {
        if first.swap(false, Ordering::SeqCst) {
            entered_tx.send(()).unwrap();
            go_rx.lock().unwrap().recv().unwrap();
        }
    });
    nic_b.dma().set_transfer_hook(Some(hook));
    let unmapped = AtomicBool::new(false);
    std::thread::scope(|s| {
        let writer = s.spawn(|| {
            a.qp.post_send(write_wr((src.0, 9, la.lkey()), dst.0, rb.rkey()))
                .unwrap();
            one(&a.cq).status
        });
        entered.recv().unwrap();
        // The responder's DMA is in flight: unmap the page.
        let unmapper = s.spawn(|| {
            b.p.munmap(dst, PAGE_SIZE).unwrap();
            unmapped.store(true, Ordering::SeqCst);
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(
            !unmapped.load(Ordering::SeqCst),
            "munmap returned with the NIC's DMA in flight"
        );
        go.send(()).unwrap();
        unmapper.join().unwrap();
        assert_eq!(writer.join().unwrap(), WcStatus::Success);
    });
    nic_b.dma().set_transfer_hook(None);
    assert!(unmapped.load(Ordering::SeqCst));
    assert_eq!(rb.mapped_pages(), 0);
    assert!(nic_b.stats().odp_invalidations >= 1);
    assert!(
        h.dma().sanitizer().is_clean(),
        "{:?}",
        h.dma().sanitizer().violations()
    );
}

/// Two hosts joined by a link: a NIC on one writes into GPU VRAM on the other through a
/// dma-buf MR; each NIC reaches only its own host's memory, by its own DMA.
#[test]
fn rdma_between_two_hosts_lands_in_the_remote_gpus_vram() {
    let h1 = dgx(true);
    let h2 = dgx(false);
    let a = side(&h1, NIC_A);
    let b = side(&h2, NIC_A);
    connect(&a.qp, &b.qp);
    let gpu = h2.device::<Gpu>(bdf(GPU)).unwrap();
    let bo = gpu.bo_alloc(PAGE_SIZE).unwrap();
    let buf = gpu
        .bo_export(bo, peerdma::drivers::gpu::P2pPolicy::Refuse)
        .unwrap();
    let fd = b.p.files().export_fd(&buf);
    let mr = b.ctx.reg_dmabuf_mr(b.pd, 0, PAGE_SIZE, 0, fd, RW).unwrap();
    let src = a.p.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
    a.p.write(src, b"across the link").unwrap();
    let la = a.ctx.reg_mr(a.pd, src, PAGE_SIZE, src.0, RW).unwrap();
    let before = (h1.dma().stats(), h2.dma().stats());
    a.qp.post_send(write_wr((src.0, 15, la.lkey()), 0, mr.rkey()))
        .unwrap();
    assert_eq!(one(&a.cq).status, WcStatus::Success);
    let mut got = [0u8; 15];
    gpu.bo_read(bo, 0, &mut got).unwrap();
    assert_eq!(&got, b"across the link");
    let (s1, s2) = (h1.dma().stats(), h2.dma().stats());
    assert_eq!(
        s1.host_ram - before.0.host_ram,
        15,
        "host 1's NIC read its RAM"
    );
    assert_eq!(
        s2.via_switch - before.1.via_switch,
        15,
        "host 2's NIC wrote VRAM by bus address"
    );
    b.ctx.dereg_mr(&mr).unwrap();
    b.p.files().close(fd).unwrap();
    drop((buf, a, b));
    gpu.bo_free(bo).unwrap();
}

/// U11: a pinned MR over p2p memory (an NVMe CMB mapped into the process) is refused
/// with EREMOTEIO — long-term pins of p2p memory are — while an ODP MR over it maps the
/// CMB by bus address (O26) and RDMA lands in the drive's memory.
#[test]
fn p2p_memory_cannot_be_pinned_long_term_but_odp_reaches_it() {
    let h = common::rdma::machine(
        "workstation",
        16 << 20,
        true,
        &["0000:06:00.0", "0000:04:00.0"],
        ("0000:03:00.0", 16),
        true,
    );
    let cmb = common::cmb(&h);
    let a = side(&h, "0000:06:00.0");
    let b = side(&h, "0000:04:00.0");
    connect(&a.qp, &b.qp);
    let p2p = cmb.mmap(&b.p, PAGE_SIZE, true, 0, Prot::RW).unwrap();
    let e = b.ctx.reg_mr(b.pd, p2p, PAGE_SIZE, p2p.0, RW).unwrap_err();
    assert_eq!(e.errno, Errno::EREMOTEIO, "{e}");
    assert_eq!(b.p.pinned_vm(), 0, "the charge was taken back");
    let mr = b.ctx.reg_mr(b.pd, p2p, PAGE_SIZE, p2p.0, odp()).unwrap();
    let src = a.p.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
    a.p.write(src, b"into the cmb").unwrap();
    let la = a.ctx.reg_mr(a.pd, src, PAGE_SIZE, src.0, RW).unwrap();
    let before = h.dma().stats().via_switch;
    a.qp.post_send(write_wr((src.0, 12, la.lkey()), p2p.0, mr.rkey()))
        .unwrap();
    assert_eq!(one(&a.cq).status, WcStatus::Success);
    assert_eq!(
        h.dma().stats().via_switch - before,
        12,
        "by bus address through the switch"
    );
    let mut got = [0u8; 12];
    b.p.read(p2p, &mut got).unwrap();
    assert_eq!(&got, b"into the cmb");
    b.p.munmap(p2p, PAGE_SIZE).unwrap();
    assert_eq!(mr.mapped_pages(), 0);
}

/// A process that exits with MRs registered and the NIC's DMA in flight into one: exit
/// closes the verbs context, whose dereg waits for the DMA (it holds the MR), then
/// releases the pin, the mapping and the charge; the requester's write completes.
#[test]
fn exit_with_dma_in_flight_waits_for_it_and_releases_everything() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc;
    let h = dgx(true);
    let (a, b) = pair(&h);
    let nic_b = h.device::<Rnic>(bdf(NIC_B)).unwrap();
    let src = a.p.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
    a.p.write(src, b"last words").unwrap();
    let la = a.ctx.reg_mr(a.pd, src, PAGE_SIZE, src.0, RW).unwrap();
    let dst = b.p.mmap_anon(2 * PAGE_SIZE, Prot::RW).unwrap();
    let rb = b.ctx.reg_mr(b.pd, dst, 2 * PAGE_SIZE, dst.0, RW).unwrap();
    b.ctx
        .reg_mr(b.pd, dst, 2 * PAGE_SIZE, dst.0, odp())
        .unwrap();
    let frame = b.p.pte(dst).pfn().unwrap();
    let (entered_tx, entered) = mpsc::channel();
    let (go, go_rx) = mpsc::channel::<()>();
    let go_rx = std::sync::Mutex::new(go_rx);
    let first = AtomicBool::new(true);
    nic_b.dma().set_transfer_hook(Some(Arc::new(move || {
        if first.swap(false, Ordering::SeqCst) {
            entered_tx.send(()).unwrap();
            go_rx.lock().unwrap().recv().unwrap();
        }
    })));
    let exited = AtomicBool::new(false);
    let Side { p, ctx, qp, .. } = b;
    std::thread::scope(|s| {
        let writer = s.spawn(|| {
            a.qp.post_send(write_wr((src.0, 10, la.lkey()), dst.0, rb.rkey()))
                .unwrap();
            one(&a.cq).status
        });
        entered.recv().unwrap();
        let exiter = s.spawn(|| {
            p.exit();
            exited.store(true, Ordering::SeqCst);
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(
            !exited.load(Ordering::SeqCst),
            "exit returned with the NIC's DMA in flight"
        );
        go.send(()).unwrap();
        exiter.join().unwrap();
        assert_eq!(writer.join().unwrap(), WcStatus::Success);
    });
    nic_b.dma().set_transfer_hook(None);
    let st = nic_b.stats();
    assert_eq!((st.mrs, st.pinned_pages), (0, 0));
    assert_eq!(qp.state(), QpState::Err);
    assert_eq!(ctx.alloc_pd().unwrap_err().errno, Errno::EBADF);
    assert_eq!(
        h.phys().region(frame).unwrap().meta(frame).pincount(),
        0,
        "the pinned frame was unpinned"
    );
    assert!(
        h.dma().sanitizer().is_clean(),
        "{:?}",
        h.dma().sanitizer().violations()
    );
}

/// U12: a pinned MR's SG table merges physically contiguous pages up to the NIC's
/// segment size (2 GiB, as mlx5 sets), so with the IOMMU off the NIC sees one segment
/// per physically contiguous run of the buffer.
#[test]
fn a_pinned_mr_maps_one_segment_per_contiguous_run() {
    let h = dgx(false);
    let a = side(&h, NIC_A);
    let pages = 64u64;
    let buf = a.p.mmap_anon(pages * PAGE_SIZE, Prot::RW).unwrap();
    let mr = a
        .ctx
        .reg_mr(a.pd, buf, pages * PAGE_SIZE, buf.0, RW)
        .unwrap();
    let frames: Vec<u64> = (0..pages)
        .map(|i| a.p.pte(VirtAddr(buf.0 + i * PAGE_SIZE)).pfn().unwrap().0)
        .collect();
    let runs = 1 + frames.windows(2).filter(|w| w[1] != w[0] + 1).count();
    assert_eq!(mr.dma_addrs().len(), runs, "frames {frames:?}");
    assert!(runs < pages as usize / 4, "pages fault in mostly in order");
}
