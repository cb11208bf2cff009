//! dma-buf: export, static and dynamic attachments, fences, move_notify, sharing
//! between processes, and RDMA into GPU VRAM through a dma-buf MR while the GPU moves
//! the buffer — the kernel's rules (B, D and X numbers of
//! shared/reference/rdma-dmabuf.md). Every host is leak-checked when it drops.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::rdma::{bdf, connect, side, Side, RW};
use peerdma::addr::{VirtAddr, PAGE_SIZE};
use peerdma::dma::{Direction, MapKind};
use peerdma::dmabuf::{DmaBuf, Fence, P2pMemExporter, SyncFlags, Usage};
use peerdma::drivers::gpu::{BoDomain, BoHandle, Gpu, P2pPolicy};
use peerdma::drivers::rnic::{MrKind, Rnic, SendOp, SendWr, Sge, WcStatus};
use peerdma::errno::Errno;
use peerdma::mm::Prot;
use peerdma::sync::Arc;

/// `preset` with 32 MiB of RAM, NICs at `nics` and a GPU of `vram_pages` at `gpu`,
/// plus NVMe controllers (with their CMBs) when `nvme`.
fn machine(
    preset: &str,
    iommu: bool,
    nics: &[&str],
    gpu: &str,
    vram_pages: u64,
    nvme: bool,
) -> common::Checked {
    common::rdma::machine(preset, 32 << 20, iommu, nics, (gpu, vram_pages), nvme)
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i % 251) as u8 ^ seed.wrapping_mul(31))
        .collect()
}

/// The requester `a` writes `data` (put in its own registered buffer first) to
/// `remote_addr` under `rkey`; the completion status.
fn rdma_write(a: &Side, data: &[u8], remote_addr: u64, rkey: u32) -> WcStatus {
    let len = data.len() as u64;
    let pages = len.div_ceil(PAGE_SIZE).max(1);
    let src = a.p.mmap_anon(pages * PAGE_SIZE, Prot::RW).unwrap();
    a.p.write(src, data).unwrap();
    let mr = a
        .ctx
        .reg_mr(a.pd, src, pages * PAGE_SIZE, src.0, RW)
        .unwrap();
    a.qp.post_send(SendWr {
        wr_id: 1,
        op: SendOp::Write { remote_addr, rkey },
        sg: vec![Sge {
            addr: src.0,
            len: len as u32,
            lkey: mr.lkey(),
        }],
        signaled: true,
    })
    .unwrap();
    let wc = a.cq.poll(4);
    a.ctx.dereg_mr(&mr).unwrap();
    a.p.munmap(src, pages * PAGE_SIZE).unwrap();
    assert_eq!(wc.len(), 1);
    wc[0].status
}

fn bo_bytes(gpu: &Gpu, h: BoHandle, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    gpu.bo_read(h, 0, &mut b).unwrap();
    b
}

const DGX_GPU: &str = "0000:1a:00.0";
const DGX_NICS: [&str; 2] = ["0000:1b:00.0", "0000:1d:00.0"];

/// Case 3 of the thread: RDMA WRITE into VRAM through a dma-buf MR, the GPU evicts
/// the BO (move_notify, KERNEL fence), the next write re-faults at the new place, and
/// no byte lands in the old storage.
#[test]
fn rdma_into_vram_through_a_dma_buf_mr_follows_the_bo_when_it_is_evicted() {
    for iommu in [false, true] {
        let h = machine("dgx", iommu, &DGX_NICS, DGX_GPU, 64, false);
        let gpu = h.device::<Gpu>(bdf(DGX_GPU)).unwrap();
        let nic_b = h.device::<Rnic>(bdf(DGX_NICS[1])).unwrap();
        let a = side(&h, DGX_NICS[0]);
        let b = side(&h, DGX_NICS[1]);
        connect(&a.qp, &b.qp);
        let bo = gpu.bo_alloc(4 * PAGE_SIZE).unwrap();
        let buf = gpu.bo_export(bo, P2pPolicy::MoveToRam).unwrap();
        let fd = b.p.files().export_fd(&buf);
        let mr = b
            .ctx
            .reg_dmabuf_mr(b.pd, 0, 4 * PAGE_SIZE, 0x4000_0000, fd, RW)
            .unwrap();
        assert_eq!(mr.kind(), MrKind::DmaBuf);
        assert_eq!(
            mr.mapped_pages(),
            0,
            "D2: nothing is mapped at registration"
        );
        let first = pattern(2 * PAGE_SIZE as usize, 1);
        assert_eq!(
            rdma_write(&a, &first, 0x4000_0000, mr.rkey()),
            WcStatus::Success
        );
        assert_eq!(gpu.bo_info(bo).unwrap().domain, BoDomain::Vram);
        // The NIC reached VRAM by bus address through the switch, IOMMU or not.
        assert_eq!(nic_b.stats().dmabuf_faults, 1);
        let vram_addrs = mr.dma_addrs();
        assert!(
            h.dma().stats().via_switch >= first.len() as u64,
            "{:?}",
            h.dma().stats()
        );
        // Eviction: move_notify reaches the MR, which drops its mapping.
        assert!(gpu.bo_evict(bo).unwrap());
        assert_eq!(buf.stats().move_notifies, 1);
        assert_eq!(nic_b.stats().dmabuf_move_notifies, 1);
        assert_eq!(mr.mapped_pages(), 0);
        assert!(
            buf.resv().test_signaled(Usage::Kernel),
            "the move's fence signalled"
        );
        // The next write faults at the new place (system RAM).
        let second = pattern(2 * PAGE_SIZE as usize, 2);
        assert_eq!(
            rdma_write(&a, &second, 0x4000_0000 + 2 * PAGE_SIZE, mr.rkey()),
            WcStatus::Success
        );
        assert_eq!(nic_b.stats().dmabuf_faults, 2);
        assert_ne!(mr.dma_addrs(), vram_addrs, "the DMA address changed");
        let all = bo_bytes(&gpu, bo, 4 * PAGE_SIZE as usize);
        assert_eq!(all[..2 * PAGE_SIZE as usize], first[..]);
        assert_eq!(all[2 * PAGE_SIZE as usize..], second[..]);
        // Back into VRAM by GPU work: again a move_notify and a re-fault.
        assert_eq!(gpu.bo_validate(bo).unwrap(), BoDomain::Vram);
        assert_eq!(
            rdma_write(&a, b"third", 0x4000_0000, mr.rkey()),
            WcStatus::Success
        );
        assert_eq!(&bo_bytes(&gpu, bo, 5)[..], b"third");
        assert_eq!(buf.stats().move_notifies, 2);
        assert!(
            h.dma().sanitizer().is_clean(),
            "{:?}",
            h.dma().sanitizer().violations()
        );
        // GEM_CLOSE while exported succeeds (drm_gem_handle_delete): the owner's
        // handle is gone, but the dma-buf holds the GEM object, so the MR keeps
        // working on the same memory.
        let vram_before = gpu.vram_bytes().1;
        gpu.bo_free(bo).unwrap();
        assert_eq!(gpu.bo_info(bo).unwrap_err().errno(), Errno::ENOENT);
        assert_eq!(gpu.bo_free(bo).unwrap_err().errno(), Errno::ENOENT);
        let held = gpu.bos();
        assert_eq!(held.len(), 1, "the dma-buf keeps the BO");
        assert!(held[0].handle_closed);
        assert_eq!(gpu.vram_bytes().1, vram_before);
        assert_eq!(
            rdma_write(&a, b"after close", 0x4000_0000, mr.rkey()),
            WcStatus::Success
        );
        // The last reference frees it: dereg, then the descriptor and the buffer.
        b.ctx.dereg_mr(&mr).unwrap();
        assert_eq!(buf.stats().attachments, 0);
        assert_eq!(gpu.bos().len(), 1, "the descriptor still holds it");
        b.p.files().close(fd).unwrap();
        drop(buf);
        assert!(
            gpu.bos().is_empty(),
            "the last dma-buf reference freed the BO"
        );
        assert_eq!(gpu.vram_bytes().1, 0);
        assert_eq!(gpu.bo_vram().free_frames(), gpu.bo_vram().frames());
    }
}

/// X1–X3: with the P2P verdict refused (q35: the host bridge is not on the allowlist),
/// amdgpu's policy moves the BO to system RAM at map, xe's
/// refuses the attach and says why.
#[test]
fn without_p2p_the_exporter_moves_the_bo_to_ram_or_refuses_as_configured() {
    let (preset, nic, gpu_bdf, why) = ("q35", "0000:00:02.0", "0000:00:01.0", "allowlist");
    for iommu in [false, true] {
        let h = machine(preset, iommu, &[nic], gpu_bdf, 16, false);
        let gpu = h.device::<Gpu>(bdf(gpu_bdf)).unwrap();
        let a = side(&h, nic);
        let b = side(&h, nic);
        connect(&a.qp, &b.qp);
        // xe's policy: refused.
        let bo = gpu.bo_alloc(PAGE_SIZE).unwrap();
        let buf = gpu.bo_export(bo, P2pPolicy::Refuse).unwrap();
        let fd = b.p.files().export_fd(&buf);
        let e = b
            .ctx
            .reg_dmabuf_mr(b.pd, 0, PAGE_SIZE, 0, fd, RW)
            .unwrap_err();
        assert_eq!(e.errno, Errno::EOPNOTSUPP, "{preset}: {e}");
        assert!(e.why.contains(why), "{preset}: {e}");
        // amdgpu's policy: the BO moves to system RAM when mapped.
        let bo2 = gpu.bo_alloc(PAGE_SIZE).unwrap();
        let buf2 = gpu.bo_export(bo2, P2pPolicy::MoveToRam).unwrap();
        let fd2 = b.p.files().export_fd(&buf2);
        let mr = b.ctx.reg_dmabuf_mr(b.pd, 0, PAGE_SIZE, 0, fd2, RW).unwrap();
        assert_eq!(gpu.bo_info(bo2).unwrap().domain, BoDomain::Vram);
        assert_eq!(
            rdma_write(&a, b"via system RAM", 0, mr.rkey()),
            WcStatus::Success
        );
        assert_eq!(gpu.bo_info(bo2).unwrap().domain, BoDomain::Ram, "{preset}");
        assert_eq!(&bo_bytes(&gpu, bo2, 14)[..], b"via system RAM");
        assert!(h.dma().sanitizer().is_clean());
        drop((a, b, mr, buf, buf2));
        gpu.bo_free(bo).unwrap();
        gpu.bo_free(bo2).unwrap();
    }
}

/// B8: a static importer of a dynamic exporter pins on map, so eviction skips the BO
/// until it unmaps; a pinned dma-buf MR (D9) blocks eviction for its whole life (case 4:
/// long-term use of VRAM blocks the GPU from moving it).
#[test]
fn static_importers_and_pinned_dma_buf_mrs_keep_the_bo_in_place() {
    let h = machine("dgx", true, &DGX_NICS, DGX_GPU, 16, false);
    let gpu = h.device::<Gpu>(bdf(DGX_GPU)).unwrap();
    let bo = gpu.bo_alloc(2 * PAGE_SIZE).unwrap();
    let buf = gpu.bo_export(bo, P2pPolicy::MoveToRam).unwrap();
    let nic = h.device::<Rnic>(bdf(DGX_NICS[0])).unwrap();
    let att = buf.attach(nic.dma()).unwrap();
    assert!(
        !att.peer2peer(),
        "a static importer never gets peer addresses"
    );
    let m = {
        let mut resv = buf.resv().lock();
        att.map(&mut resv, Direction::Bidirectional).unwrap()
    };
    // Static and no p2p: the BO was moved to RAM and pinned there.
    assert_eq!(gpu.bo_info(bo).unwrap().domain, BoDomain::Ram);
    assert_eq!(buf.stats().pins, 1);
    assert_eq!(gpu.bo_validate(bo).unwrap(), BoDomain::Ram, "pinned: stays");
    drop(m);
    assert_eq!(buf.stats().pins, 0);
    assert_eq!(gpu.bo_validate(bo).unwrap(), BoDomain::Vram);
    drop(att);

    // A pinned dma-buf MR: peer-to-peer, pinned in VRAM.
    let b = side(&h, DGX_NICS[1]);
    let a = side(&h, DGX_NICS[0]);
    connect(&a.qp, &b.qp);
    let fd = b.p.files().export_fd(&buf);
    let mr = b
        .ctx
        .reg_dmabuf_mr_pinned(b.pd, 0, 2 * PAGE_SIZE, 0, fd, RW)
        .unwrap();
    assert_eq!(mr.kind(), MrKind::DmaBufPinned);
    assert_eq!(mr.mapped_pages(), 2, "mapped at registration");
    let e = gpu.bo_evict(bo).unwrap_err();
    assert_eq!(e.errno(), Errno::EBUSY);
    assert!(e.to_string().contains("dma-buf importer"), "{e}");
    let before = mr.dma_addrs();
    assert_eq!(
        rdma_write(&a, b"pinned", PAGE_SIZE, mr.rkey()),
        WcStatus::Success
    );
    assert_eq!(mr.dma_addrs(), before);
    let mut got = [0u8; 6];
    gpu.bo_read(bo, PAGE_SIZE, &mut got).unwrap();
    assert_eq!(&got, b"pinned");
    b.ctx.dereg_mr(&mr).unwrap();
    assert_eq!(buf.stats().pins, 0);
    assert!(gpu.bo_evict(bo).unwrap(), "unpinned by dereg");
    drop((a, b, buf));
    gpu.bo_free(bo).unwrap();
}

/// B12 and B4: fences by usage; SYNC waits for what the access must; a static
/// importer's map waits for KERNEL fences; a move waits for the importers' fences.
#[test]
fn fences_order_by_usage_and_moves_and_maps_wait_for_the_right_ones() {
    let h = machine("dgx", false, &DGX_NICS, DGX_GPU, 16, false);
    let gpu = h.device::<Gpu>(bdf(DGX_GPU)).unwrap();
    let bo = gpu.bo_alloc(PAGE_SIZE).unwrap();
    let buf = gpu.bo_export(bo, P2pPolicy::MoveToRam).unwrap();
    let read = Fence::new("a GPU read");
    buf.resv().lock().add_fence(read.clone(), Usage::Read);
    assert!(
        buf.resv().test_signaled(Usage::Write),
        "a READ fence is above WRITE"
    );
    assert!(!buf.resv().test_signaled(Usage::Read));
    assert!(!buf.resv().test_signaled(Usage::Bookkeep));
    // A CPU read waits for writers only: it returns with the READ fence pending.
    buf.sync(SyncFlags {
        read: true,
        ..Default::default()
    })
    .unwrap();
    assert_eq!(
        buf.sync(SyncFlags::default()).unwrap_err().errno,
        Errno::EINVAL,
        "no direction"
    );
    // A CPU write waits for readers too.
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            buf.sync(SyncFlags {
                write: true,
                ..Default::default()
            })
            .unwrap();
            done.store(true, Ordering::SeqCst);
        });
        std::thread::sleep(Duration::from_millis(30));
        assert!(
            !done.load(Ordering::SeqCst),
            "the write waits for the READ fence"
        );
        read.signal();
    });
    assert!(done.load(Ordering::SeqCst));
    // A fence re-added with a lower usage is promoted.
    let f = Fence::new("bookkeeping");
    buf.resv().lock().add_fence(f.clone(), Usage::Bookkeep);
    assert!(buf.resv().test_signaled(Usage::Read));
    buf.resv().lock().add_fence(f.clone(), Usage::Write);
    assert!(!buf.resv().test_signaled(Usage::Write));
    f.signal();
    // A move waits for an importer's fence before the old storage goes.
    let imp = Fence::new("an importer's DMA");
    buf.resv().lock().add_fence(imp.clone(), Usage::Bookkeep);
    let moved = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            assert!(gpu.bo_evict(bo).unwrap());
            moved.store(true, Ordering::SeqCst);
        });
        std::thread::sleep(Duration::from_millis(30));
        assert!(
            !moved.load(Ordering::SeqCst),
            "the move waits for the importer's fence"
        );
        imp.signal();
    });
    // A static importer's map waits for a pending KERNEL fence (a clear in progress).
    let clear = Fence::new("a clear");
    buf.resv().lock().add_fence(clear.clone(), Usage::Kernel);
    let nic = h.device::<Rnic>(bdf(DGX_NICS[0])).unwrap();
    let att = buf.attach(nic.dma()).unwrap();
    let mapped = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut resv = buf.resv().lock();
            let m = att.map(&mut resv, Direction::Bidirectional).unwrap();
            mapped.store(true, Ordering::SeqCst);
            m.unmap(&resv);
        });
        std::thread::sleep(Duration::from_millis(30));
        assert!(!mapped.load(Ordering::SeqCst));
        clear.signal();
    });
    assert!(mapped.load(Ordering::SeqCst));
    // Mapping without the lock of this buffer is refused.
    let bo2 = gpu.bo_alloc(PAGE_SIZE).unwrap();
    let other = gpu.bo_export(bo2, P2pPolicy::MoveToRam).unwrap();
    let mut wrong = other.resv().lock();
    assert_eq!(
        att.map(&mut wrong, Direction::Bidirectional)
            .unwrap_err()
            .errno,
        Errno::EINVAL
    );
    drop(wrong);
    drop((att, buf, other));
    gpu.bo_free(bo).unwrap();
    gpu.bo_free(bo2).unwrap();
}

/// Case 5 of the thread: a VRAM buffer shared by two processes through a dma-buf fd,
/// written by one, read by the other and by the NIC; B2/B3 errors.
#[test]
fn a_vram_buffer_is_shared_by_two_processes_through_a_dma_buf_fd() {
    let h = machine("dgx", true, &DGX_NICS, DGX_GPU, 16, false);
    let gpu = h.device::<Gpu>(bdf(DGX_GPU)).unwrap();
    let bo = gpu.bo_alloc(2 * PAGE_SIZE).unwrap();
    let buf = gpu.bo_export(bo, P2pPolicy::MoveToRam).unwrap();
    let p1 = h.spawn();
    let p2 = h.spawn();
    let fd1 = p1.files().export_fd(&buf);
    drop(buf);
    // B2: bad fds and files that are not dma-bufs.
    assert_eq!(
        p2.files().dma_buf(fd1 + 10).unwrap_err().errno,
        Errno::EBADF
    );
    let b = side(&h, DGX_NICS[1]);
    assert_eq!(
        b.p.files().dma_buf(b.ctx.fd()).unwrap_err().errno,
        Errno::EINVAL
    );
    let fd2 = p1.files().pass(fd1, p2.files()).unwrap();
    let buf1 = p1.files().dma_buf(fd1).unwrap();
    let buf2 = p2.files().dma_buf(fd2).unwrap();
    assert_eq!(buf1.id(), buf2.id());
    // B3: mmap past the size.
    assert_eq!(
        buf1.mmap(&p1, PAGE_SIZE, 2 * PAGE_SIZE, Prot::RW)
            .unwrap_err()
            .errno,
        Errno::EINVAL
    );
    let v1 = buf1.mmap(&p1, 0, 2 * PAGE_SIZE, Prot::RW).unwrap();
    let v2 = buf2.mmap(&p2, PAGE_SIZE, PAGE_SIZE, Prot::RW).unwrap();
    p1.write(VirtAddr(v1.0 + PAGE_SIZE + 8), b"from process one")
        .unwrap();
    let mut got = [0u8; 16];
    p2.read(VirtAddr(v2.0 + 8), &mut got).unwrap();
    assert_eq!(&got, b"from process one");
    // It is VRAM, and a CPU mapping keeps it there (pinned while mapped).
    assert_eq!(gpu.bo_info(bo).unwrap().domain, BoDomain::Vram);
    assert_eq!(gpu.bo_evict(bo).unwrap_err().errno(), Errno::EBUSY);
    // The NIC reads it through its own import in a third process.
    let a = side(&h, DGX_NICS[0]);
    connect(&a.qp, &b.qp);
    let fd3 = p2.files().pass(fd2, b.p.files()).unwrap();
    let mr = b
        .ctx
        .reg_dmabuf_mr(b.pd, 0, 2 * PAGE_SIZE, 0, fd3, RW)
        .unwrap();
    let dst = a.p.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
    let lmr = a.ctx.reg_mr(a.pd, dst, PAGE_SIZE, dst.0, RW).unwrap();
    a.qp.post_send(SendWr {
        wr_id: 3,
        op: SendOp::Read {
            remote_addr: PAGE_SIZE + 8,
            rkey: mr.rkey(),
        },
        sg: vec![Sge {
            addr: dst.0,
            len: 16,
            lkey: lmr.lkey(),
        }],
        signaled: true,
    })
    .unwrap();
    assert_eq!(a.cq.poll(1)[0].status, WcStatus::Success);
    a.p.read(dst, &mut got).unwrap();
    assert_eq!(&got, b"from process one");
    // The buffer lives until its last reference: unmapping lets the BO move again.
    p1.munmap(v1, 2 * PAGE_SIZE).unwrap();
    p2.munmap(v2, PAGE_SIZE).unwrap();
    drop((buf1, buf2, mr));
    assert!(gpu.bo_evict(bo).unwrap());
    p1.exit();
    p2.exit();
    b.p.exit();
    assert_eq!(
        gpu.bo_free(bo).map_err(|e| e.errno()),
        Ok(()),
        "the last fd closed with exit"
    );
    drop(a);
}

/// The NVMe CMB exported statically: a dynamic importer allowing peer-to-peer gets its
/// bus address; a static importer is refused; RDMA lands in the CMB.
#[test]
fn a_cmb_exported_as_a_dma_buf_takes_rdma_writes_peer_to_peer() {
    let h = machine(
        "workstation",
        true,
        &["0000:06:00.0", "0000:04:00.0"],
        "0000:03:00.0",
        16,
        true,
    );
    let cmb = common::cmb(&h);
    let buf = P2pMemExporter::export(&cmb, 2 * PAGE_SIZE).unwrap();
    assert!(!buf.is_dynamic());
    let nic = h.device::<Rnic>(bdf("0000:06:00.0")).unwrap();
    assert_eq!(buf.attach(nic.dma()).unwrap_err().errno, Errno::EOPNOTSUPP);
    let a = side(&h, "0000:04:00.0");
    let b = side(&h, "0000:06:00.0");
    connect(&a.qp, &b.qp);
    let fd = b.p.files().export_fd(&buf);
    let mr = b
        .ctx
        .reg_dmabuf_mr(b.pd, 0, 2 * PAGE_SIZE, 0, fd, RW)
        .unwrap();
    assert_eq!(
        rdma_write(&a, b"into the CMB", PAGE_SIZE, mr.rkey()),
        WcStatus::Success
    );
    {
        let att = buf.dynamic_attach(nic.dma(), Arc::new(NoMove)).unwrap();
        let mut resv = buf.resv().lock();
        let m = att.map(&mut resv, Direction::Bidirectional).unwrap();
        assert!(m
            .mapping()
            .segments()
            .iter()
            .all(|s| s.kind == MapKind::BusAddr));
        let mut got = [0u8; 12];
        m.mapping().dma_read(PAGE_SIZE, &mut got).unwrap();
        assert_eq!(&got, b"into the CMB");
        m.unmap(&resv);
    }
    b.ctx.dereg_mr(&mr).unwrap();
    drop((a, b, buf));
    assert_eq!(
        cmb.available(),
        cmb.size(),
        "released with the last reference"
    );
}

/// ACS redirect (dgx-acs) does not refuse: the kernel routes the NIC's writes up
/// through the allowlisted host bridge, and the BO stays in VRAM under either policy.
#[test]
fn acs_redirect_sends_rdma_into_vram_through_the_host_bridge() {
    let h = machine("dgx-acs", true, &DGX_NICS, DGX_GPU, 16, false);
    let gpu = h.device::<Gpu>(bdf(DGX_GPU)).unwrap();
    let a = side(&h, DGX_NICS[0]);
    let b = side(&h, DGX_NICS[1]);
    connect(&a.qp, &b.qp);
    for policy in [P2pPolicy::Refuse, P2pPolicy::MoveToRam] {
        let bo = gpu.bo_alloc(PAGE_SIZE).unwrap();
        let buf = gpu.bo_export(bo, policy).unwrap();
        let fd = b.p.files().export_fd(&buf);
        let mr = b.ctx.reg_dmabuf_mr(b.pd, 0, PAGE_SIZE, 0, fd, RW).unwrap();
        let before = h.dma().stats().via_host_bridge;
        assert_eq!(
            rdma_write(&a, b"up and down", 0, mr.rkey()),
            WcStatus::Success
        );
        assert!(h.dma().stats().via_host_bridge >= before + 11);
        assert_eq!(gpu.bo_info(bo).unwrap().domain, BoDomain::Vram);
        assert_eq!(&bo_bytes(&gpu, bo, 11)[..], b"up and down");
        b.ctx.dereg_mr(&mr).unwrap();
        b.p.files().close(fd).unwrap();
        drop(buf);
        gpu.bo_free(bo).unwrap();
    }
}

struct NoMove;
impl peerdma::dmabuf::Importer for NoMove {
    fn allow_peer2peer(&self) -> bool {
        true
    }
    fn move_notify(&self, _: &peerdma::dmabuf::Attachment) {}
}

/// The exporter's device removed: importers are told, and a later import is ENODEV.
#[test]
fn a_dma_buf_of_a_removed_gpu_cannot_be_imported() {
    let mut h = machine("dgx", false, &DGX_NICS, DGX_GPU, 16, false);
    let gpu = h.device::<Gpu>(bdf(DGX_GPU)).unwrap();
    let bo = gpu.bo_alloc(PAGE_SIZE).unwrap();
    let buf: Arc<DmaBuf> = gpu.bo_export(bo, P2pPolicy::MoveToRam).unwrap();
    let (a, b) = (side(&h, DGX_NICS[0]), side(&h, DGX_NICS[1]));
    connect(&a.qp, &b.qp);
    let fd = b.p.files().export_fd(&buf);
    let mr = b.ctx.reg_dmabuf_mr(b.pd, 0, PAGE_SIZE, 0, fd, RW).unwrap();
    assert_eq!(rdma_write(&a, b"before", 0, mr.rkey()), WcStatus::Success);
    drop(gpu);
    h.remove_device(bdf(DGX_GPU), Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(buf.stats().move_notifies, 1, "removal told the importer");
    assert_eq!(
        rdma_write(&a, b"after", 0, mr.rkey()),
        WcStatus::RemAccessErr
    );
    let e = b
        .ctx
        .reg_dmabuf_mr(b.pd, 0, PAGE_SIZE, 0, fd, RW)
        .unwrap_err();
    assert_eq!(e.errno, Errno::ENODEV);
    drop((a, b, mr, buf));
}

/// Case 4, refused: a pinned RDMA registration (FOLL_LONGTERM) over a CPU mapping of a
/// VRAM buffer. The kernel maps VRAM into processes as I/O memory without struct pages
/// (VM_PFNMAP), which GUP refuses; the NIC must use the dma-buf instead.
#[test]
fn a_long_term_pin_of_vram_mapped_into_a_process_is_refused() {
    let h = machine("dgx", true, &DGX_NICS, DGX_GPU, 16, false);
    let gpu = h.device::<Gpu>(bdf(DGX_GPU)).unwrap();
    let bo = gpu.bo_alloc(PAGE_SIZE).unwrap();
    let buf = gpu.bo_export(bo, P2pPolicy::MoveToRam).unwrap();
    let b = side(&h, DGX_NICS[1]);
    let va = buf.mmap(&b.p, 0, PAGE_SIZE, Prot::RW).unwrap();
    // Long-term pins must not hold device memory the owner wants to move; this page
    // cannot leave VRAM (the CPU mapping keeps the BO there), so the pin is refused.
    let e = b.ctx.reg_mr(b.pd, va, PAGE_SIZE, va.0, RW).unwrap_err();
    assert_eq!(e.errno, Errno::EBUSY, "{e}");
    assert_eq!(b.p.pinned_vm(), 0, "the charge was taken back");
    assert_eq!(gpu.bo_info(bo).unwrap().domain, BoDomain::Vram);
    // The dma-buf MR is the way: it reaches the same VRAM.
    let fd = b.p.files().export_fd(&buf);
    let mr = b.ctx.reg_dmabuf_mr(b.pd, 0, PAGE_SIZE, 0, fd, RW).unwrap();
    b.p.write(va, b"cpu wrote").unwrap();
    let a = side(&h, DGX_NICS[0]);
    connect(&a.qp, &b.qp);
    assert_eq!(rdma_write(&a, b"nic", 0, mr.rkey()), WcStatus::Success);
    let mut got = [0u8; 9];
    b.p.read(va, &mut got).unwrap();
    assert_eq!(&got, b"nic wrote", "the CPU mapping sees the NIC's write");
    b.p.munmap(va, PAGE_SIZE).unwrap();
    drop((a, mr));
    drop((b, buf));
    gpu.bo_free(bo).unwrap();
}
