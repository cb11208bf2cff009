//! The GPU model's buffer objects, BAR, copy engine and eviction, as TTM-based drivers
//! (amdgpu, xe, nouveau) do them: BOs allocated in VRAM and accounted, moved to system
//! RAM under VRAM pressure (least recently used first; pinned ones never) and back on
//! use, with their DMA address changing; importers told before a move and their
//! mappings revoked after the DMA in flight drains; peers reaching VRAM through the
//! BAR by the fabric's rules (all of VRAM behind a resized BAR, one BO at a time
//! behind a 256 MiB window); the copy engine moving bytes through DMA mappings the
//! sanitizer checks. Every byte is checked; every host is checked for leaks when it
//! drops, so frames, pins, mappings and subscriptions all return to zero.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use peerdma::addr::{Bdf, DmaAddr, VirtAddr, PAGE_SIZE};
use peerdma::dma::{Direction, DmaError, MapKind, SgTable, ViolationKind};
use peerdma::drivers::gpu::{BoDomain, BoHandle, CeAddr, Gpu, GpuError, GpuSpec, MoveNotify};
use peerdma::errno::Errno;
use peerdma::gup::{get_user_dma_sg, UserSg};
use peerdma::host::{Host, HostConfig};
use peerdma::mm::Prot;
use peerdma::sync::Arc;

fn gpu_bdf() -> Bdf {
    "0000:03:00.0".parse().unwrap()
}

/// `h` with a GPU of `vram_pages` pages bound at 0000:03:00.0.
fn add_gpu(h: &mut common::Checked, vram_pages: u64) -> Arc<Gpu> {
    let spec = GpuSpec {
        bdf: gpu_bdf(),
        vram_bytes: vram_pages * PAGE_SIZE,
    };
    h.add_device(&spec.into()).unwrap();
    h.device::<Gpu>(gpu_bdf()).expect("the GPU model is bound")
}

/// The workstation (the GPU's BAR 1 opens onto all of VRAM) with a GPU.
fn with_gpu(vram_pages: u64, iommu: bool) -> (common::Checked, Arc<Gpu>) {
    let mut h = common::bare(64 << 20, iommu);
    let gpu = add_gpu(&mut h, vram_pages);
    (h, gpu)
}

/// A leak-checked host of `topo` (no IOMMU) with a GPU of `vram` bytes at `gpu`.
fn host_with_gpu(topo: peerdma::fabric::Topology, gpu: Bdf, vram: u64) -> common::Checked {
    common::Checked(
        Host::build(
            topo,
            &HostConfig {
                ram_bytes: 16 << 20,
                iommu: Some(false),
            },
            &[GpuSpec {
                bdf: gpu,
                vram_bytes: vram,
            }
            .into()],
        )
        .unwrap(),
    )
}

/// `n` bytes of a pattern that differs per `seed`.
fn pattern(n: u64, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i % 251) as u8 ^ seed.wrapping_mul(37))
        .collect()
}

fn bo_bytes(gpu: &Gpu, h: BoHandle, len: u64) -> Vec<u8> {
    let mut b = vec![0u8; len as usize];
    gpu.bo_read(h, 0, &mut b).unwrap();
    b
}

fn vram_used(gpu: &Gpu) -> u64 {
    gpu.vram_bytes().1 / PAGE_SIZE
}

/// Counts the move notifications an importer gets.
#[derive(Default)]
struct Importer(AtomicUsize);

impl MoveNotify for Importer {
    fn move_notify(&self, _gpu: Bdf, _bo: BoHandle) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn bos_are_accounted_in_vram_and_freeing_returns_every_page() {
    let (_h, gpu) = with_gpu(64, false);
    assert_eq!(gpu.vram_bytes(), (64 * PAGE_SIZE, 0, 64 * PAGE_SIZE));
    let a = gpu.bo_alloc(10 * PAGE_SIZE).unwrap();
    // Rounded up to pages.
    let b = gpu.bo_alloc(3 * PAGE_SIZE + 1).unwrap();
    assert_ne!(a, b);
    assert_eq!(vram_used(&gpu), 14);
    let info = gpu.bo_info(b).unwrap();
    assert_eq!(info.bytes, 4 * PAGE_SIZE);
    assert_eq!(info.domain, BoDomain::Vram);
    assert!(info.bar_visible, "the resized BAR shows all of VRAM");
    assert_eq!(gpu.bos().len(), 2);
    // A fresh BO reads as zeros.
    assert!(bo_bytes(&gpu, a, 10 * PAGE_SIZE).iter().all(|&x| x == 0));
    gpu.bo_free(a).unwrap();
    assert_eq!(vram_used(&gpu), 4);
    assert_eq!(gpu.bo_free(a).unwrap_err().errno(), Errno::ENOENT);
    assert_eq!(gpu.bo_alloc(0).unwrap_err().errno(), Errno::EINVAL);
    // Bigger than VRAM: ENOMEM at once.
    let e = gpu.bo_alloc(65 * PAGE_SIZE).unwrap_err();
    assert_eq!(e.errno(), Errno::ENOMEM, "{e}");
    gpu.bo_free(b).unwrap();
    assert_eq!(gpu.vram_bytes().1, 0);
    assert_eq!(gpu.bo_vram().free_frames(), gpu.bo_vram().frames());
}

#[test]
fn gpu_work_reaches_a_bo_at_its_gpu_address_and_faults_past_it() {
    let (h, gpu) = with_gpu(64, false);
    let p = h.spawn();
    let ctx = gpu.open(&p);
    let bo = gpu.bo_alloc(4 * PAGE_SIZE).unwrap();
    let va = ctx.map_bo(bo).unwrap();
    assert!(va.0 >= peerdma::drivers::gpu::bo::BO_VA_BASE);
    let data = pattern(4 * PAGE_SIZE, 1);
    ctx.store(va, &data).unwrap();
    assert_eq!(bo_bytes(&gpu, bo, 4 * PAGE_SIZE), data);
    let sum: u64 = data.iter().map(|&x| u64::from(x)).sum();
    assert_eq!(ctx.checksum(va, 4 * PAGE_SIZE).unwrap(), sum);
    ctx.add_u32(va, 4 * PAGE_SIZE, 3).unwrap();
    let mut got = vec![0u8; data.len()];
    ctx.load(va, &mut got).unwrap();
    for (w, old) in got.chunks_exact(4).zip(data.chunks_exact(4)) {
        let o = u32::from_ne_bytes(old.try_into().unwrap());
        assert_eq!(u32::from_ne_bytes(w.try_into().unwrap()), o.wrapping_add(3));
    }
    // A copy from process memory into the BO, through the same GPU address space.
    let a = p.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
    p.write(a, &[0x5a; 64]).unwrap();
    ctx.copy(VirtAddr(va.0 + PAGE_SIZE), a, 64).unwrap();
    assert_eq!(
        bo_bytes(&gpu, bo, 2 * PAGE_SIZE)[PAGE_SIZE as usize..][..64],
        [0x5a; 64]
    );
    // Past the BO, and where no BO is: unresolvable GPU faults, reported.
    let e = ctx
        .fill(VirtAddr(va.0 + 4 * PAGE_SIZE - 8), 16, 0)
        .unwrap_err();
    assert!(matches!(e, GpuError::Unmapped { .. }), "{e}");
    assert_eq!(e.errno(), Errno::EFAULT);
    assert!(e.to_string().contains("past the end of BO"), "{e}");
    let e = ctx.fill(VirtAddr(va.0 + (64 << 20)), 16, 0).unwrap_err();
    assert_eq!(e.errno(), Errno::EFAULT, "{e}");
    // Nothing past the BO changed.
    assert_eq!(bo_bytes(&gpu, bo, 4 * PAGE_SIZE)[..8], got[..8]);
    ctx.unmap_bo(va).unwrap();
    assert_eq!(ctx.unmap_bo(va).unwrap_err().errno(), Errno::EINVAL);
    assert_eq!(ctx.fill(va, 8, 0).unwrap_err().errno(), Errno::EFAULT);
    gpu.bo_free(bo).unwrap();
}

#[test]
fn vram_pressure_moves_the_least_recently_used_bo_to_ram_and_use_brings_it_back() {
    let (h, gpu) = with_gpu(64, true);
    let p = h.spawn();
    let ctx = gpu.open(&p);
    let len = 32 * PAGE_SIZE;
    let (a, b) = (gpu.bo_alloc(len).unwrap(), gpu.bo_alloc(len).unwrap());
    let (da, db) = (pattern(len, 2), pattern(len, 3));
    let ram0 = h.phys().ram().usage().allocated;
    gpu.bo_write(b, 0, &db).unwrap();
    gpu.bo_write(a, 0, &da).unwrap(); // a is now the more recently used
    assert_eq!(vram_used(&gpu), 64);
    // VRAM is full: a third BO pushes out the least recently used one, b.
    let c = gpu.bo_alloc(len).unwrap();
    assert_eq!(gpu.bo_info(b).unwrap().domain, BoDomain::Ram);
    assert_eq!(gpu.bo_info(a).unwrap().domain, BoDomain::Vram);
    assert_eq!(gpu.stats().bo_evicted, 1);
    assert_eq!(gpu.stats().bo_bytes_moved, len);
    assert_eq!(vram_used(&gpu), 64);
    assert_eq!(
        h.phys().ram().usage().allocated,
        ram0 + 32,
        "b's pages in RAM"
    );
    // Its bytes came along, read through the GPU's own mapping of RAM.
    assert_eq!(bo_bytes(&gpu, b, len), db);
    // GPU work on b brings it back, pushing out the least recently used of a and c.
    let vb = ctx.map_bo(b).unwrap();
    ctx.add_u32(vb, len, 1).unwrap();
    assert_eq!(gpu.bo_info(b).unwrap().domain, BoDomain::Vram);
    assert_eq!(gpu.bo_info(a).unwrap().domain, BoDomain::Ram);
    assert_eq!(gpu.bo_info(c).unwrap().domain, BoDomain::Vram);
    let s = gpu.stats();
    assert_eq!((s.bo_evicted, s.bo_restored), (2, 1));
    assert_eq!(gpu.bo_info(b).unwrap().moves, 2);
    let got = bo_bytes(&gpu, b, len);
    for (w, old) in got.chunks_exact(4).zip(db.chunks_exact(4)) {
        let o = u32::from_ne_bytes(old.try_into().unwrap());
        assert_eq!(u32::from_ne_bytes(w.try_into().unwrap()), o.wrapping_add(1));
    }
    assert_eq!(bo_bytes(&gpu, a, len), da);
    assert!(h.dma().sanitizer().is_clean());
    ctx.unmap_bo(vb).unwrap();
    for x in [a, b, c] {
        gpu.bo_free(x).unwrap();
    }
    assert_eq!(vram_used(&gpu), 0);
}

#[test]
fn pinned_bos_never_move_and_a_full_vram_names_who_pinned_them() {
    let (_h, gpu) = with_gpu(32, false);
    let a = gpu.bo_alloc(16 * PAGE_SIZE).unwrap();
    let b = gpu.bo_alloc(16 * PAGE_SIZE).unwrap();
    assert_eq!(gpu.bo_pin(a, "rdma-mr").unwrap(), BoDomain::Vram);
    gpu.bo_pin(b, "scanout").unwrap();
    let e = gpu.bo_alloc(8 * PAGE_SIZE).unwrap_err();
    assert_eq!(e.errno(), Errno::ENOMEM);
    let msg = e.to_string();
    assert!(
        msg.contains("BO 1")
            && msg.contains("pinned by rdma-mr")
            && msg.contains("pinned by scanout"),
        "{msg}"
    );
    let ev = gpu.evict_bos();
    assert!(ev.moved.is_empty());
    assert_eq!(
        ev.skipped,
        vec![
            (a, "pinned by rdma-mr".to_string()),
            (b, "pinned by scanout".to_string())
        ]
    );
    let e = gpu.bo_evict(a).unwrap_err();
    assert_eq!(e.errno(), Errno::EBUSY);
    assert!(e.to_string().contains("rdma-mr"), "{e}");
    assert_eq!(
        gpu.bo_unpin(a, "scanout").unwrap_err().errno(),
        Errno::EINVAL
    );
    gpu.bo_unpin(a, "rdma-mr").unwrap();
    // Now a may move: the allocation succeeds by evicting it.
    let c = gpu.bo_alloc(8 * PAGE_SIZE).unwrap();
    assert_eq!(gpu.bo_info(a).unwrap().domain, BoDomain::Ram);
    assert_eq!(gpu.bo_info(b).unwrap().domain, BoDomain::Vram);
    gpu.bo_unpin(b, "scanout").unwrap();
    for x in [a, b, c] {
        gpu.bo_free(x).unwrap();
    }
}

#[test]
fn gpu_work_on_an_evicted_bo_runs_in_ram_when_pinned_bos_fill_vram() {
    let (h, gpu) = with_gpu(16, true);
    let p = h.spawn();
    let ctx = gpu.open(&p);
    let a = gpu.bo_alloc(8 * PAGE_SIZE).unwrap();
    gpu.bo_write(a, 0, &pattern(8 * PAGE_SIZE, 4)).unwrap();
    assert!(gpu.bo_evict(a).unwrap());
    let big = gpu.bo_alloc(16 * PAGE_SIZE).unwrap();
    gpu.bo_pin(big, "display").unwrap();
    let va = ctx.map_bo(a).unwrap();
    ctx.fill(va, 8 * PAGE_SIZE, 0xee).unwrap();
    assert_eq!(
        gpu.bo_info(a).unwrap().domain,
        BoDomain::Ram,
        "no room: worked on in RAM"
    );
    assert!(bo_bytes(&gpu, a, 8 * PAGE_SIZE).iter().all(|&x| x == 0xee));
    // The GPU's accesses to RAM went through its DMA mapping of the BO.
    assert!(gpu.dma().stats().host_ram >= 8 * PAGE_SIZE);
    assert!(h.dma().sanitizer().is_clean());
    ctx.unmap_bo(va).unwrap();
    gpu.bo_unpin(big, "display").unwrap();
    gpu.bo_free(big).unwrap();
    gpu.bo_free(a).unwrap();
}

#[test]
fn a_peer_reaches_a_bo_through_the_bar_by_the_fabrics_rules() {
    let (h, gpu) = with_gpu(64, true);
    let bar = gpu.bar().expect("BAR 1 opens onto VRAM");
    assert_eq!(bar.index, 1);
    assert!(bar.full);
    let _first = gpu.bo_alloc(8 * PAGE_SIZE).unwrap();
    let bo = gpu.bo_alloc(4 * PAGE_SIZE).unwrap();
    // Under the same switch: bus address, the BO's offset into the BAR.
    let peer = common::attach(&h, "0000:05:00.0");
    let m = gpu
        .bo_map_peer(bo, &peer, Direction::Bidirectional, None)
        .unwrap();
    let seg = m.mapping().segments();
    assert_eq!(seg.len(), 1);
    assert_eq!(seg[0].kind, MapKind::BusAddr);
    assert_eq!(seg[0].addr.0, bar.bus.0 + 8 * PAGE_SIZE);
    assert_eq!(gpu.bar_point(bo).unwrap().0, seg[0].addr.0);
    peer.dma_write(seg[0].addr, b"peer wrote this").unwrap();
    assert_eq!(&bo_bytes(&gpu, bo, 15)[..], b"peer wrote this");
    assert_eq!(peer.stats().via_switch, 15);
    // On its own root port: through the allowlisted host bridge, by IOVA.
    let far = common::attach(&h, "0000:07:00.0");
    let m2 = gpu
        .bo_map_peer(bo, &far, Direction::ToDevice, None)
        .unwrap();
    assert_eq!(m2.mapping().segments()[0].kind, MapKind::Iova);
    let mut got = [0u8; 15];
    far.dma_read(m2.mapping().segments()[0].addr, &mut got)
        .unwrap();
    assert_eq!(&got, b"peer wrote this");
    assert_eq!(far.stats().via_host_bridge, 15);
    assert_eq!(gpu.bo_info(bo).unwrap().peer_mappings, 2);
    drop((m, m2));
    gpu.bo_free(bo).unwrap();
    gpu.bo_free(_first).unwrap();
}

#[test]
fn a_peer_behind_a_non_allowlisted_host_bridge_is_refused_with_the_reason() {
    // q35: the GPU and an NVMe drive on one root bus whose host bridge is not on the
    // kernel's allowlist.
    let topo = peerdma::fabric::preset("q35").unwrap();
    let (gpu_fn, nvme): (Bdf, Bdf) = (
        "0000:00:01.0".parse().unwrap(),
        "0000:00:03.0".parse().unwrap(),
    );
    let h = host_with_gpu(topo, gpu_fn, 16 * PAGE_SIZE);
    let gpu = h.device::<Gpu>(gpu_fn).unwrap();
    assert!(
        gpu.bar().unwrap().full,
        "a 16 MiB BAR shows 64 KiB of VRAM whole"
    );
    let bo = gpu.bo_alloc(PAGE_SIZE).unwrap();
    let peer = h.dma().attach(nvme).unwrap();
    let reason = peer.verdict(gpu_fn).unwrap().reason();
    let e = gpu
        .bo_map_peer(bo, &peer, Direction::ToDevice, None)
        .unwrap_err();
    assert!(
        matches!(
            &e,
            GpuError::Dma {
                source: DmaError::RemoteIo { .. },
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(e.errno(), Errno::EREMOTEIO);
    assert!(e.to_string().contains(&reason), "{e}");
    assert_eq!(h.dma().live_mappings(), 0);
    gpu.bo_free(bo).unwrap();
}

/// On the dgx with ACS redirect on every switch downstream port, two GPUs under one
/// switch cannot use the bus address: the BO is reached through the host bridge, or
/// refused naming the ACS setting.
#[test]
fn acs_redirect_keeps_a_peer_off_the_bus_address() {
    let topo = peerdma::fabric::preset("dgx-acs").unwrap();
    let gpus: Vec<Bdf> = topo
        .functions()
        .iter()
        .filter(|f| {
            f.kind == peerdma::fabric::PortKind::Endpoint
                && f.device_class() == peerdma::fabric::DeviceClass::Gpu
        })
        .map(|f| f.bdf)
        .collect();
    let h = host_with_gpu(topo, gpus[0], 16 * PAGE_SIZE);
    let gpu = h.device::<Gpu>(gpus[0]).unwrap();
    let bo = gpu.bo_alloc(PAGE_SIZE).unwrap();
    let peer = h.dma().attach(gpus[1]).unwrap();
    let v = peer.verdict(gpus[0]).unwrap();
    match gpu.bo_map_peer(bo, &peer, Direction::ToDevice, None) {
        Ok(m) => assert_ne!(
            m.mapping().segments()[0].kind,
            MapKind::BusAddr,
            "ACS redirect forbids the bus address"
        ),
        Err(e) => {
            assert_eq!(e.errno(), Errno::EREMOTEIO, "{e}");
            assert!(e.to_string().contains(&v.reason()), "{e}");
        }
    }
    gpu.bo_free(bo).unwrap();
}

#[test]
fn eviction_tells_importers_revokes_their_mappings_and_the_new_mapping_points_at_ram() {
    let (h, gpu) = with_gpu(64, true);
    let bo = gpu.bo_alloc(4 * PAGE_SIZE).unwrap();
    let data = pattern(4 * PAGE_SIZE, 5);
    gpu.bo_write(bo, 0, &data).unwrap();
    let peer = common::attach(&h, "0000:05:00.0");
    let imp = Arc::new(Importer::default());
    let m = gpu
        .bo_map_peer(bo, &peer, Direction::Bidirectional, Some(imp.clone()))
        .unwrap();
    let old = m.mapping().segments()[0];
    assert_eq!(old.kind, MapKind::BusAddr);
    assert!(gpu.bo_evict(bo).unwrap());
    assert_eq!(
        imp.0.load(Ordering::SeqCst),
        1,
        "told once, before the move"
    );
    assert!(m.is_revoked());
    let e = m.mapping().dma_write(0, b"late").unwrap_err();
    assert_eq!(e.errno(), Errno::EAGAIN, "{e}");
    assert_eq!(
        bo_bytes(&gpu, bo, 4 * PAGE_SIZE),
        data,
        "the late write landed nowhere"
    );
    drop(m);
    // Mapped again: now system RAM, through the peer's IOMMU domain — a new address.
    let m = gpu
        .bo_map_peer(bo, &peer, Direction::Bidirectional, Some(imp.clone()))
        .unwrap();
    let new = m.mapping().segments()[0];
    assert_eq!(new.kind, MapKind::Iova);
    assert_ne!(new.addr, old.addr);
    m.mapping().dma_write(8, b"in ram").unwrap();
    // Back into VRAM: told again; the bytes written in RAM came along.
    assert_eq!(gpu.bo_validate(bo).unwrap(), BoDomain::Vram);
    assert_eq!(imp.0.load(Ordering::SeqCst), 2);
    assert!(m.is_revoked());
    let mut want = data.clone();
    want[8..14].copy_from_slice(b"in ram");
    assert_eq!(bo_bytes(&gpu, bo, 4 * PAGE_SIZE), want);
    assert!(h.dma().sanitizer().is_clean());
    drop(m);
    gpu.bo_free(bo).unwrap();
}

#[test]
fn a_bo_a_peer_is_writing_moves_only_after_that_dma_drains() {
    let (h, gpu) = with_gpu(64, false);
    let bo = gpu.bo_alloc(PAGE_SIZE).unwrap();
    let peer = common::attach(&h, "0000:05:00.0");
    let m = gpu
        .bo_map_peer(bo, &peer, Direction::FromDevice, None)
        .unwrap();
    let (entered_tx, entered_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let go_rx = std::sync::Mutex::new(go_rx);
    let entered_tx = std::sync::Mutex::new(entered_tx);
    peer.set_transfer_hook(Some(Arc::new(move || {
        entered_tx.lock().unwrap().send(()).unwrap();
        go_rx.lock().unwrap().recv().unwrap();
    })));
    std::thread::scope(|s| {
        let writer = s.spawn(|| m.mapping().dma_write(0, b"in flight"));
        entered_rx.recv().unwrap();
        let evictor = s.spawn(|| gpu.bo_evict(bo));
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !evictor.is_finished(),
            "the move waits for the DMA in flight"
        );
        go_tx.send(()).unwrap();
        writer.join().unwrap().unwrap();
        assert!(evictor.join().unwrap().unwrap());
    });
    peer.set_transfer_hook(None);
    // The DMA finished before the copy: its bytes moved with the BO.
    assert_eq!(gpu.bo_info(bo).unwrap().domain, BoDomain::Ram);
    assert_eq!(&bo_bytes(&gpu, bo, 9)[..], b"in flight");
    drop(m);
    gpu.bo_free(bo).unwrap();
}

/// The workstation with the first GPU's BAR 1 cut to a 256 MiB window.
fn small_bar_host(vram: u64) -> (common::Checked, Arc<Gpu>) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/presets/workstation.toml");
    let text = std::fs::read_to_string(path).unwrap();
    let text = text.replacen("size = 34359738368", "size = 268435456", 1);
    let topo = peerdma::fabric::import::file::parse("small-bar", &text).unwrap();
    let h = host_with_gpu(topo, gpu_bdf(), vram);
    let gpu = h.device::<Gpu>(gpu_bdf()).unwrap();
    (h, gpu)
}

#[test]
fn a_256_mib_bar_window_shows_one_bo_at_a_time() {
    let (h, gpu) = small_bar_host(1 << 30);
    let bar = gpu.bar().unwrap();
    assert!(!bar.full);
    assert_eq!(bar.bytes, 256 << 20);
    let (a, b) = (
        gpu.bo_alloc(PAGE_SIZE).unwrap(),
        gpu.bo_alloc(PAGE_SIZE).unwrap(),
    );
    assert!(!gpu.bo_info(a).unwrap().bar_visible);
    let peer = common::attach(&h, "0000:05:00.0");
    // Not pointed at yet: not addressable.
    let e = gpu
        .bo_map_peer(a, &peer, Direction::ToDevice, None)
        .unwrap_err();
    assert!(
        matches!(
            &e,
            GpuError::Dma {
                source: DmaError::NotAddressable { .. },
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("BAR window"), "{e}");
    assert_eq!(gpu.bar_point(a).unwrap(), bar.bus);
    assert!(gpu.bo_info(a).unwrap().bar_visible);
    let imp = Arc::new(Importer::default());
    let ma = gpu
        .bo_map_peer(a, &peer, Direction::ToDevice, Some(imp.clone()))
        .unwrap();
    assert_eq!(ma.mapping().segments()[0].addr.0, bar.bus.0);
    gpu.bo_write(a, 0, b"A").unwrap();
    let mut x = [0u8; 1];
    peer.dma_read(ma.mapping().segments()[0].addr, &mut x)
        .unwrap();
    assert_eq!(&x, b"A");
    // The window moves to b: a's importer is told and revoked.
    assert_eq!(gpu.bar_point(b).unwrap(), bar.bus);
    assert_eq!(imp.0.load(Ordering::SeqCst), 1);
    assert!(ma.is_revoked());
    assert!(!gpu.bo_info(a).unwrap().bar_visible);
    let mb = gpu
        .bo_map_peer(b, &peer, Direction::ToDevice, None)
        .unwrap();
    gpu.bo_write(b, 0, b"B").unwrap();
    peer.dma_read(mb.mapping().segments()[0].addr, &mut x)
        .unwrap();
    assert_eq!(&x, b"B");
    // A BO larger than the window cannot be shown.
    let big = gpu.bo_alloc((256 << 20) + PAGE_SIZE).unwrap();
    assert_eq!(gpu.bar_point(big).unwrap_err().errno(), Errno::EINVAL);
    drop((ma, mb));
    for x in [a, b, big] {
        gpu.bo_free(x).unwrap();
    }
}

#[test]
fn the_copy_engine_moves_bytes_between_vram_system_ram_and_a_peer_bar() {
    let h = common::workstation(64 << 20, true);
    let mut h = h;
    let gpu = add_gpu(&mut h, 64);
    let len = 8 * PAGE_SIZE;
    let (a, b) = (gpu.bo_alloc(len).unwrap(), gpu.bo_alloc(len).unwrap());
    let data = pattern(len, 6);
    gpu.bo_write(a, 0, &data).unwrap();
    // VRAM to VRAM.
    gpu.ce_copy(CeAddr::Bo(b, 0), CeAddr::Bo(a, 0), len)
        .unwrap();
    assert_eq!(bo_bytes(&gpu, b, len), data);
    // VRAM to system RAM, through a DMA mapping of a process buffer for the GPU.
    let p = h.spawn();
    let buf = p.mmap_anon(len, Prot::RW).unwrap();
    let sg = get_user_dma_sg(
        &p,
        gpu.dma(),
        UserSg::new(buf, len, Direction::Bidirectional),
    )
    .unwrap();
    let segs = sg.segments();
    assert_eq!(segs.len(), 1, "one IOVA segment");
    gpu.ce_copy(
        CeAddr::Dma(segs[0].addr),
        CeAddr::Bo(a, PAGE_SIZE),
        3 * PAGE_SIZE,
    )
    .unwrap();
    let mut got = vec![0u8; (3 * PAGE_SIZE) as usize];
    p.read(buf, &mut got).unwrap();
    assert_eq!(got, data[PAGE_SIZE as usize..(4 * PAGE_SIZE) as usize]);
    // System RAM to VRAM.
    p.write(buf, &[0x77; 100]).unwrap();
    gpu.ce_copy(CeAddr::Bo(b, 10), CeAddr::Dma(segs[0].addr), 100)
        .unwrap();
    assert_eq!(bo_bytes(&gpu, b, 110)[10..], [0x77; 100]);
    // VRAM to the peer's BAR: the NVMe CMB under the same switch, by bus address.
    let cmb = common::cmb(&h);
    let p2p = cmb.alloc(len).unwrap();
    let psg = SgTable::from_runs(&[(p2p.pfn(), 8)], 0, len, gpu.dma().max_segment());
    let pm = gpu.dma().map_sg(&psg, Direction::FromDevice).unwrap();
    assert_eq!(pm.segments()[0].kind, MapKind::BusAddr);
    gpu.ce_copy(CeAddr::Dma(pm.segments()[0].addr), CeAddr::Bo(a, 0), len)
        .unwrap();
    let mut got = vec![0u8; len as usize];
    cmb.region().read_span(p2p.pfn(), 0, &mut got);
    assert_eq!(got, data);
    assert_eq!(gpu.dma().stats().via_switch, len);
    // An evicted BO is reached through the GPU's mapping of its RAM.
    assert!(gpu.bo_evict(a).unwrap());
    gpu.ce_copy(CeAddr::Dma(segs[0].addr), CeAddr::Bo(a, 0), 64)
        .unwrap();
    let mut got = [0u8; 64];
    p.read(buf, &mut got).unwrap();
    assert_eq!(got[..], data[..64]);
    assert_eq!(gpu.stats().ce_bytes, len + 3 * PAGE_SIZE + 100 + len + 64);
    assert!(h.dma().sanitizer().is_clean());
    // Refusals: past a BO, overlapping one BO, an address never mapped for the GPU.
    let e = gpu
        .ce_copy(CeAddr::Bo(b, 0), CeAddr::Bo(a, len - 8), 16)
        .unwrap_err();
    assert!(matches!(e, GpuError::BoRange { .. }), "{e}");
    assert_eq!(e.errno(), Errno::EFAULT);
    let e = gpu
        .ce_copy(CeAddr::Bo(b, 0), CeAddr::Bo(b, 8), 16)
        .unwrap_err();
    assert_eq!(e.errno(), Errno::EINVAL);
    let e = gpu
        .ce_copy(CeAddr::Bo(b, 0), CeAddr::Dma(DmaAddr(0xdead_0000)), 16)
        .unwrap_err();
    assert_eq!(e.errno(), Errno::EFAULT, "{e}");
    let v = h.dma().sanitizer().violations();
    assert_eq!(v.len(), 1);
    assert_eq!(v[0].kind, ViolationKind::Unmapped);
    assert_eq!(v[0].dev, gpu_bdf());
    assert_eq!(bo_bytes(&gpu, b, 110)[10..], [0x77; 100], "nothing moved");
    drop((pm, p2p, sg));
    gpu.bo_free(a).unwrap();
    gpu.bo_free(b).unwrap();
}

/// GEM_CLOSE (drm_gem_handle_delete) never fails on a BO in use: the handle goes, and
/// the GEM object lives until its last reference — a GPU address mapping, a peer's
/// DMA mapping, a pin — lets go, which frees it and leaves nothing behind.
#[test]
fn closing_a_bo_in_use_frees_it_with_its_last_holder_and_leaves_nothing_behind() {
    let (h, gpu) = with_gpu(64, true);
    let p = h.spawn();
    let ctx = gpu.open(&p);
    let closed_but_held = |gpu: &Gpu| {
        let all = gpu.bos();
        assert_eq!(all.len(), 1);
        assert!(all[0].handle_closed);
        assert_eq!(vram_used(gpu), all[0].bytes / PAGE_SIZE);
    };
    // Mapped into a context: GPU work keeps reaching it after the close.
    let bo = gpu.bo_alloc(2 * PAGE_SIZE).unwrap();
    let va = ctx.map_bo(bo).unwrap();
    gpu.bo_free(bo).unwrap();
    assert_eq!(gpu.bo_info(bo).unwrap_err().errno(), Errno::ENOENT);
    assert_eq!(gpu.bo_free(bo).unwrap_err().errno(), Errno::ENOENT);
    closed_but_held(&gpu);
    ctx.fill(va, 2 * PAGE_SIZE, 0x5a).unwrap();
    ctx.unmap_bo(va).unwrap();
    assert!(gpu.bos().is_empty(), "the unmap was the last reference");
    assert_eq!(vram_used(&gpu), 0);
    // Mapped by a peer for DMA.
    let bo = gpu.bo_alloc(2 * PAGE_SIZE).unwrap();
    let peer = common::attach(&h, "0000:05:00.0");
    let m = gpu
        .bo_map_peer(bo, &peer, Direction::FromDevice, None)
        .unwrap();
    gpu.bo_free(bo).unwrap();
    closed_but_held(&gpu);
    drop(m);
    assert!(
        gpu.bos().is_empty(),
        "the peer's mapping was the last reference"
    );
    // Pinned, and in system RAM: the unpin frees it, the GART mapping with it.
    let bo = gpu.bo_alloc(2 * PAGE_SIZE).unwrap();
    assert!(gpu.bo_evict(bo).unwrap());
    gpu.bo_pin(bo, "static importer").unwrap();
    gpu.bo_free(bo).unwrap();
    assert_eq!(gpu.bos().len(), 1);
    assert!(h.dma().live_mappings() > 0);
    gpu.bo_unpin(bo, "static importer").unwrap();
    assert!(gpu.bos().is_empty());
    assert_eq!(vram_used(&gpu), 0);
    assert_eq!(h.dma().live_mappings(), 0, "the GART mapping went with it");
    // A context dropped with BOs mapped lets go of them.
    let bo = gpu.bo_alloc(PAGE_SIZE).unwrap();
    ctx.map_bo(bo).unwrap();
    gpu.bo_free(bo).unwrap();
    assert_eq!(gpu.bos().len(), 1);
    drop(ctx);
    assert!(gpu.bos().is_empty());
    assert_eq!(gpu.bo_vram().free_frames(), gpu.bo_vram().frames());
}

#[test]
fn unified_memory_and_bos_share_one_vram_budget() {
    let (h, gpu) = with_gpu(32, false);
    let p = h.spawn();
    let ctx = gpu.open(&p);
    let bo = gpu.bo_alloc(24 * PAGE_SIZE).unwrap();
    let n = 16;
    let a = p.mmap_anon(n * PAGE_SIZE, Prot::RW).unwrap();
    let data = pattern(n * PAGE_SIZE, 7);
    p.write(a, &data).unwrap();
    ctx.checksum(a, n * PAGE_SIZE).unwrap();
    // Only 8 pages of VRAM were left for unified memory; the rest is mapped remotely.
    assert_eq!(gpu.stats().migrated_to_vram, 8);
    assert_eq!(vram_used(&gpu), 32);
    // A new BO needs room: the old BO goes first (least recently used), then the
    // unified-memory pages.
    let big = gpu.bo_alloc(32 * PAGE_SIZE).unwrap();
    assert_eq!(gpu.bo_info(bo).unwrap().domain, BoDomain::Ram);
    assert_eq!(gpu.stats().evicted, 8);
    let mut got = vec![0u8; data.len()];
    p.read(a, &mut got).unwrap();
    assert_eq!(got, data);
    drop(ctx);
    gpu.bo_free(big).unwrap();
    gpu.bo_free(bo).unwrap();
    assert_eq!(vram_used(&gpu), 0);
}

#[test]
fn removing_a_gpu_with_shared_bos_revokes_importers_and_frees_everything() {
    let (mut h, gpu) = with_gpu(64, true);
    let ram0 = h.phys().ram().usage().allocated;
    let a = gpu.bo_alloc(4 * PAGE_SIZE).unwrap();
    let b = gpu.bo_alloc(4 * PAGE_SIZE).unwrap();
    assert!(gpu.bo_evict(b).unwrap());
    let peer = common::attach(&h, "0000:05:00.0");
    let imp = Arc::new(Importer::default());
    let m = gpu
        .bo_map_peer(a, &peer, Direction::ToDevice, Some(imp.clone()))
        .unwrap();
    let p = h.spawn();
    let ctx = gpu.open(&p);
    let va = ctx.map_bo(a).unwrap();
    h.remove_device(gpu_bdf(), Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(imp.0.load(Ordering::SeqCst), 1);
    assert!(m.is_revoked());
    let mut x = [0u8; 1];
    assert_eq!(
        m.mapping().dma_read(0, &mut x).unwrap_err().errno(),
        Errno::EAGAIN
    );
    assert_eq!(ctx.fill(va, 1, 0).unwrap_err().errno(), Errno::ENODEV);
    assert_eq!(gpu.bo_alloc(PAGE_SIZE).unwrap_err().errno(), Errno::ENODEV);
    assert_eq!(gpu.bo_free(a).unwrap_err().errno(), Errno::ENOENT);
    assert_eq!(
        h.phys().ram().usage().allocated,
        ram0,
        "b's RAM pages are freed"
    );
    drop((m, ctx));
}

#[test]
fn the_topology_file_states_each_gpus_vram() {
    // The workstation preset says 24 GiB per GPU; a file may say it in bytes or with
    // a unit; the job's --vram (Some) overrides it; nothing said is 16 GiB.
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/presets/workstation.toml");
    let text = std::fs::read_to_string(path).unwrap();
    let vram_of = |text: &str, vram: Option<u64>| -> Vec<u64> {
        let topo = peerdma::fabric::import::file::parse("t", text).unwrap();
        let specs = Host::gpu_specs(&topo, vram);
        let h = common::Checked(
            Host::build(
                topo,
                &HostConfig {
                    ram_bytes: 8 << 20,
                    iommu: Some(false),
                },
                &specs,
            )
            .unwrap(),
        );
        h.devices_of::<Gpu>()
            .iter()
            .map(|g| g.vram_bytes().0)
            .collect()
    };
    assert_eq!(vram_of(&text, None), vec![24 << 30, 24 << 30]);
    assert_eq!(vram_of(&text, Some(1 << 20)), vec![1 << 20, 1 << 20]);
    let bytes = text.replacen("memory = \"24GiB\"", "memory = 268435456", 1);
    assert_eq!(vram_of(&bytes, None), vec![256 << 20, 24 << 30]);
    let none = text.replace("memory = \"24GiB\"\n", "");
    assert_eq!(vram_of(&none, None), vec![16 << 30, 16 << 30]);
    // The model keeps it: the TOML it writes says it again.
    let topo = peerdma::fabric::import::file::parse("t", &bytes).unwrap();
    let again = peerdma::fabric::import::file::to_toml(&topo);
    assert!(again.contains("memory = 268435456"), "{again}");
    // A size that is not one is refused, naming the function.
    for bad in ["\"24 parsecs\"", "\"\"", "0", "\"99999999999TiB\""] {
        let t = text.replacen("memory = \"24GiB\"", &format!("memory = {bad}"), 1);
        let e = peerdma::fabric::import::file::parse("t", &t)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("0000:03:00.0") && e.contains("not a size"),
            "{bad}: {e}"
        );
    }
}
