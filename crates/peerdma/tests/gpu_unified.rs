//! The GPU model's unified memory, as HMM drivers do it (amdgpu SVM, nouveau SVMM,
//! NVIDIA UVM): GPU work faults pages in through HMM, migrating them into VRAM on first
//! touch (`migrate_vma` with SELECT_SYSTEM) or mapping them where they are; a CPU access
//! brings a VRAM page back through the GPU's `migrate_to_ram`; eviction is
//! `migrate_device_range`; fork leaves VRAM pages read-only in both processes. Every
//! byte is checked, and every host is checked for leaks when it drops.

mod common;

use peerdma::addr::{Bdf, VirtAddr, PAGE_SIZE};
use peerdma::drivers::gpu::{Gpu, GpuSpec, GpuStats, Placement};
use peerdma::errno::Errno;
use peerdma::host::Process;
use peerdma::mm::Prot;
use peerdma::sync::Arc;

fn d0() -> Bdf {
    "0000:03:00.0".parse().unwrap()
}

/// A host with a GPU of `vram_pages` pages at D0, bound through the device registry.
fn with_gpu(vram_pages: u64) -> (common::Checked, Arc<Gpu>) {
    let mut h = common::host(64 << 20);
    let spec = GpuSpec {
        bdf: d0(),
        vram_bytes: vram_pages * PAGE_SIZE,
    };
    h.add_device(&spec.into()).unwrap();
    let gpu = h.device::<Gpu>(d0()).expect("the GPU model is bound");
    (h, gpu)
}

/// `pages` pages whose bytes are `(page * 7 + offset) as u8`.
fn pattern(pages: u64) -> Vec<u8> {
    (0..pages * PAGE_SIZE)
        .map(|i| ((i / PAGE_SIZE) * 7 + i % 251) as u8)
        .collect()
}

fn sum(b: &[u8]) -> u64 {
    b.iter().map(|&x| u64::from(x)).sum()
}

fn read(p: &Process, a: VirtAddr, len: u64) -> Vec<u8> {
    let mut b = vec![0u8; len as usize];
    p.read(a, &mut b).unwrap();
    b
}

#[test]
fn first_touch_migrates_into_vram_and_a_cpu_access_brings_it_back() {
    let (h, gpu) = with_gpu(64);
    let p = h.spawn();
    let ctx = gpu.open(&p);
    let n = 8;
    let a = p.mmap_anon(n * PAGE_SIZE, Prot::RW).unwrap();
    let data = pattern(n);
    p.write(a, &data).unwrap();
    assert_eq!(ctx.checksum(a, n * PAGE_SIZE).unwrap(), sum(&data));
    for i in 0..n {
        let va = VirtAddr(a.0 + i * PAGE_SIZE);
        assert!(p.pte(va).is_device_private(), "page {i} is in VRAM");
        assert!(gpu.vram().contains(ctx.mapped(va).unwrap()));
    }
    assert_eq!(gpu.vram_bytes().1, n * PAGE_SIZE, "VRAM used");
    let s = gpu.stats();
    // One fault migrates the whole window around it (FAULT_AROUND pages, inside the
    // VMA): here all eight pages.
    assert_eq!((s.faults, s.migrated_to_vram, s.remote_mapped), (1, n, 0));
    // A second pass finds everything mapped: no fault.
    assert_eq!(ctx.checksum(a, n * PAGE_SIZE).unwrap(), sum(&data));
    assert_eq!(gpu.stats().faults, 1);
    // The CPU reads: every page comes back, the GPU table forgets it.
    assert_eq!(read(&p, a, n * PAGE_SIZE), data);
    assert_eq!(gpu.stats().migrated_to_ram, n);
    assert_eq!(ctx.mapped_pages(), 0);
    assert_eq!(gpu.vram_bytes().1, 0, "VRAM freed");
}

#[test]
fn gpu_writes_in_vram_reach_the_cpu() {
    let (h, gpu) = with_gpu(64);
    let p = h.spawn();
    let ctx = gpu.open(&p);
    let n = 4;
    let a = p.mmap_anon(n * PAGE_SIZE, Prot::RW).unwrap();
    let words: Vec<u8> = (0..n * PAGE_SIZE / 4)
        .flat_map(|i| (i as u32 * 3).to_ne_bytes())
        .collect();
    p.write(a, &words).unwrap();
    ctx.add_u32(a, n * PAGE_SIZE, 1000).unwrap();
    ctx.fill(VirtAddr(a.0 + 3 * PAGE_SIZE), PAGE_SIZE, 0xab)
        .unwrap();
    let got = read(&p, a, n * PAGE_SIZE);
    for (i, w) in got[..(3 * PAGE_SIZE) as usize].chunks_exact(4).enumerate() {
        assert_eq!(
            u32::from_ne_bytes(w.try_into().unwrap()),
            i as u32 * 3 + 1000
        );
    }
    assert!(got[(3 * PAGE_SIZE) as usize..].iter().all(|&b| b == 0xab));
    // Untouched pages of the VMA migrate in as fresh zeroed VRAM pages.
    let b = p.mmap_anon(2 * PAGE_SIZE, Prot::RW).unwrap();
    assert_eq!(ctx.checksum(b, 2 * PAGE_SIZE).unwrap(), 0);
    assert!(p.pte(b).is_device_private());
}

#[test]
fn remote_placement_maps_system_pages_where_they_are() {
    let (h, gpu) = with_gpu(64);
    let p = h.spawn();
    let ctx = gpu.open(&p);
    let n = 6;
    let a = p.mmap_anon(n * PAGE_SIZE, Prot::RW).unwrap();
    let data = pattern(n);
    p.write(a, &data).unwrap();
    let frames: Vec<_> = (0..n)
        .map(|i| p.pte(VirtAddr(a.0 + i * PAGE_SIZE)).pfn())
        .collect();
    // Half remote, half migrate-on-touch (the default).
    ctx.set_placement(a, 3 * PAGE_SIZE, Placement::Remote)
        .unwrap();
    assert_eq!(ctx.checksum(a, n * PAGE_SIZE).unwrap(), sum(&data));
    for i in 0..n {
        let va = VirtAddr(a.0 + i * PAGE_SIZE);
        let in_vram = p.pte(va).is_device_private();
        assert_eq!(in_vram, i >= 3, "page {i}");
        if i < 3 {
            assert_eq!(ctx.mapped(va), frames[i as usize], "mapped where it is");
        }
    }
    let s = gpu.stats();
    assert_eq!((s.migrated_to_vram, s.remote_mapped), (3, 3));
    // A remote write lands in the process's page directly.
    ctx.fill(a, PAGE_SIZE, 0x11).unwrap();
    assert!(read(&p, a, PAGE_SIZE).iter().all(|&b| b == 0x11));
    assert_eq!(
        gpu.stats().migrated_to_ram,
        0,
        "nothing came back: it never left"
    );
}

#[test]
fn placement_ranges_split_and_override() {
    let (h, gpu) = with_gpu(64);
    let p = h.spawn();
    let ctx = gpu.open(&p);
    let a = p.mmap_anon(4 * PAGE_SIZE, Prot::RW).unwrap();
    p.write(a, &[1; 4 * PAGE_SIZE as usize]).unwrap();
    ctx.set_placement(a, 4 * PAGE_SIZE, Placement::Remote)
        .unwrap();
    // Pages 1 and 2 back to migrate-on-touch, inside the remote range.
    ctx.set_placement(
        VirtAddr(a.0 + PAGE_SIZE),
        2 * PAGE_SIZE,
        Placement::MigrateOnTouch,
    )
    .unwrap();
    ctx.checksum(a, 4 * PAGE_SIZE).unwrap();
    let in_vram: Vec<bool> = (0..4)
        .map(|i| p.pte(VirtAddr(a.0 + i * PAGE_SIZE)).is_device_private())
        .collect();
    assert_eq!(in_vram, [false, true, true, false]);
    let e = ctx
        .set_placement(VirtAddr(a.0 + 1), PAGE_SIZE, Placement::Remote)
        .unwrap_err();
    assert_eq!(e.errno(), Errno::EINVAL);
}

#[test]
fn a_full_vram_maps_the_rest_remotely() {
    let (h, gpu) = with_gpu(4);
    let p = h.spawn();
    let ctx = gpu.open(&p);
    let n = 8;
    let a = p.mmap_anon(n * PAGE_SIZE, Prot::RW).unwrap();
    let data = pattern(n);
    p.write(a, &data).unwrap();
    ctx.add_u32(a, n * PAGE_SIZE, 0).unwrap();
    assert_eq!(ctx.checksum(a, n * PAGE_SIZE).unwrap(), sum(&data));
    let s = gpu.stats();
    assert_eq!(
        (s.migrated_to_vram, s.remote_mapped, s.vram_full),
        (4, 4, 4)
    );
    assert_eq!(gpu.vram_bytes(), (4 * PAGE_SIZE, 4 * PAGE_SIZE, 0));
    assert_eq!(read(&p, a, n * PAGE_SIZE), data);
}

#[test]
fn eviction_moves_every_vram_page_back_and_the_gpu_can_touch_them_again() {
    let (h, gpu) = with_gpu(64);
    let p = h.spawn();
    let ctx = gpu.open(&p);
    let n = 16;
    let a = p.mmap_anon(n * PAGE_SIZE, Prot::RW).unwrap();
    let data = pattern(n);
    p.write(a, &data).unwrap();
    ctx.checksum(a, n * PAGE_SIZE).unwrap();
    assert_eq!(gpu.vram_bytes().1, n * PAGE_SIZE);
    let ev = gpu.evict().unwrap();
    assert_eq!((ev.moved, ev.refused.len()), (n, 0));
    assert_eq!(gpu.vram_bytes().1, 0);
    assert_eq!(
        ctx.mapped_pages(),
        0,
        "the GPU table dropped every evicted page"
    );
    assert!(!p.pte(a).is_device_private());
    // The next GPU touch migrates them in again, data intact.
    assert_eq!(ctx.checksum(a, n * PAGE_SIZE).unwrap(), sum(&data));
    let s = gpu.stats();
    assert_eq!((s.evicted, s.migrated_to_vram), (n, 2 * n));
    assert_eq!(read(&p, a, n * PAGE_SIZE), data);
}

#[test]
fn after_fork_a_gpu_write_gets_the_parent_its_own_page() {
    let (h, gpu) = with_gpu(64);
    let parent = h.spawn();
    let ctx = gpu.open(&parent);
    let a = parent.mmap_anon(2 * PAGE_SIZE, Prot::RW).unwrap();
    parent.write(a, &[5; 2 * PAGE_SIZE as usize]).unwrap();
    ctx.checksum(a, 2 * PAGE_SIZE).unwrap();
    assert!(parent.pte(a).is_device_private());
    let child = parent.fork().unwrap();
    assert!(
        !parent.pte(a).writable(),
        "fork left the VRAM page read-only"
    );
    ctx.fill(a, 2 * PAGE_SIZE, 9).unwrap();
    assert_eq!(
        read(&parent, a, 2 * PAGE_SIZE),
        vec![9; 2 * PAGE_SIZE as usize]
    );
    assert_eq!(
        read(&child, a, 2 * PAGE_SIZE),
        vec![5; 2 * PAGE_SIZE as usize]
    );
}

#[test]
fn gpu_copy_between_vram_and_remote_pages() {
    let (h, gpu) = with_gpu(64);
    let p = h.spawn();
    let ctx = gpu.open(&p);
    let n = 3;
    let src = p.mmap_anon(n * PAGE_SIZE, Prot::RW).unwrap();
    let dst = p.mmap_anon(n * PAGE_SIZE, Prot::RW).unwrap();
    ctx.set_placement(dst, n * PAGE_SIZE, Placement::Remote)
        .unwrap();
    let data = pattern(n);
    p.write(src, &data).unwrap();
    // Unaligned on both sides: pieces cross page boundaries differently.
    ctx.copy(
        VirtAddr(dst.0 + 100),
        VirtAddr(src.0 + 7),
        n * PAGE_SIZE - 200,
    )
    .unwrap();
    let got = read(&p, dst, n * PAGE_SIZE);
    assert_eq!(
        &got[100..(n * PAGE_SIZE - 100) as usize],
        &data[7..(n * PAGE_SIZE - 193) as usize]
    );
    assert!(got[..100].iter().all(|&b| b == 0));
    let e = ctx.copy(src, VirtAddr(src.0 + 8), 64).unwrap_err();
    assert_eq!(e.errno(), Errno::EINVAL, "overlapping copy");
}

#[test]
fn a_gpu_fault_that_cannot_be_resolved_is_reported() {
    let (h, gpu) = with_gpu(64);
    let p = h.spawn();
    let ctx = gpu.open(&p);
    // Nothing mapped there: EFAULT.
    let e = ctx.fill(VirtAddr(0x7000_0000), PAGE_SIZE, 1).unwrap_err();
    assert_eq!(e.errno(), Errno::EFAULT);
    // A write to a read-only mapping: EPERM (hmm_range_fault's rule).
    let ro = p.mmap_anon(PAGE_SIZE, Prot::READ).unwrap();
    let e = ctx.fill(ro, PAGE_SIZE, 1).unwrap_err();
    assert_eq!(e.errno(), Errno::EPERM);
    // PROT_NONE: EFAULT, for reads too.
    let none = p.mmap_anon(PAGE_SIZE, Prot::NONE).unwrap();
    assert_eq!(ctx.checksum(none, 8).unwrap_err().errno(), Errno::EFAULT);
    // Malformed work: EINVAL before anything runs.
    assert_eq!(
        ctx.add_u32(VirtAddr(ro.0 + 2), 8, 1).unwrap_err().errno(),
        Errno::EINVAL
    );
    assert_eq!(ctx.fill(ro, 0, 1).unwrap_err().errno(), Errno::EINVAL);
    let s = gpu.stats();
    assert_eq!(
        (s.migrated_to_vram, s.remote_mapped),
        (0, 0),
        "nothing moved: {s:?}"
    );
    assert_eq!(gpu.vram_bytes().1, 0);
}

#[test]
fn a_gpu_without_vram_is_refused_at_probe() {
    let mut h = common::host(16 << 20);
    let spec = GpuSpec {
        bdf: d0(),
        vram_bytes: 0,
    };
    let e = h.add_device(&spec.into()).unwrap_err();
    assert!(e.to_string().contains("gpu"), "{e}");
    assert!(h.device::<Gpu>(d0()).is_none());
}

#[test]
fn closing_the_context_and_exiting_leave_nothing_behind() {
    // The Checked host asserts no frame, pin, mapping or subscription is left.
    let (h, gpu) = with_gpu(16);
    let p = h.spawn();
    let ctx = gpu.open(&p);
    let a = p.mmap_anon(8 * PAGE_SIZE, Prot::RW).unwrap();
    ctx.fill(a, 8 * PAGE_SIZE, 3).unwrap();
    assert_eq!(gpu.vram_bytes().1, 8 * PAGE_SIZE);
    drop(ctx);
    p.exit();
    assert_eq!(gpu.vram_bytes().1, 0, "exit freed the VRAM pages");
    assert_eq!(
        gpu.stats(),
        GpuStats {
            faults: 1,
            migrated_to_vram: 8,
            ..GpuStats::default()
        }
    );
}

#[test]
fn a_fault_migrates_its_window_inside_the_vma_and_only_pages_placed_to_move() {
    // FAULT_AROUND pages, aligned, clipped to the VMA; pages placed Remote stay.
    use peerdma::drivers::gpu::FAULT_AROUND;
    let (h, gpu) = with_gpu(4 * FAULT_AROUND);
    let p = h.spawn();
    let ctx = gpu.open(&p);
    let n = 2 * FAULT_AROUND;
    let a = p.mmap_anon(n * PAGE_SIZE, Prot::RW).unwrap();
    p.write(a, &pattern(n)).unwrap();
    let window = FAULT_AROUND * PAGE_SIZE;
    let first = a.0.next_multiple_of(window); // the first aligned window inside
    let pg = |i: u64| VirtAddr(a.0 + i * PAGE_SIZE);
    let remote_at = (first - a.0) / PAGE_SIZE + 3;
    ctx.set_placement(pg(remote_at), PAGE_SIZE, Placement::Remote)
        .unwrap();
    ctx.checksum(VirtAddr(first + 5 * PAGE_SIZE), 8).unwrap();
    let in_vram: Vec<u64> = (0..n)
        .filter(|&i| p.pte(pg(i)).is_device_private())
        .collect();
    let want: Vec<u64> = (0..n)
        .filter(|&i| {
            let va = a.0 + i * PAGE_SIZE;
            va >= first && va < first + window && i != remote_at
        })
        .collect();
    assert_eq!(in_vram, want);
    assert_eq!(gpu.stats().faults, 1);
    assert_eq!(ctx.mapped(pg(remote_at)), None, "not touched, not mapped");
}

#[test]
fn hot_removal_brings_every_vram_page_home_and_refuses_new_work() {
    let (mut h, gpu) = with_gpu(64);
    let p = h.spawn();
    let ctx = gpu.open(&p);
    let n = 16;
    let a = p.mmap_anon(n * PAGE_SIZE, Prot::RW).unwrap();
    let data = pattern(n);
    p.write(a, &data).unwrap();
    ctx.add_u32(a, n * PAGE_SIZE, 0).unwrap();
    let vram_pfn = p.pte(a).pfn().unwrap();
    assert!(gpu.vram().contains(vram_pfn));
    h.remove_device(d0(), Some(std::time::Duration::from_secs(1)))
        .unwrap();
    assert!(h.device::<Gpu>(d0()).is_none(), "unbound");
    assert!(gpu.removed());
    assert!(h.phys().region(vram_pfn).is_none(), "VRAM unregistered");
    assert!(!p.pte(a).is_device_private());
    assert_eq!(read(&p, a, n * PAGE_SIZE), data, "every byte came home");
    assert_eq!(gpu.stats().evicted, n);
    let e = ctx.checksum(a, 8).unwrap_err();
    assert_eq!(e.errno(), Errno::ENODEV);
}

#[test]
fn prefetch_moves_a_range_into_vram_and_back_ahead_of_use() {
    use peerdma::drivers::gpu::Location;
    let (h, gpu) = with_gpu(256);
    let p = h.spawn();
    let ctx = gpu.open(&p);
    let n = 100; // more than one fault window
    let a = p.mmap_anon(n * PAGE_SIZE, Prot::RW).unwrap();
    let data = pattern(n);
    p.write(a, &data).unwrap();
    // Placed remote and already mapped remotely: a prefetch takes them anyway.
    ctx.set_placement(a, n * PAGE_SIZE, Placement::Remote)
        .unwrap();
    ctx.checksum(a, PAGE_SIZE).unwrap();
    assert_eq!(ctx.prefetch(a, n * PAGE_SIZE, Location::Vram).unwrap(), n);
    assert!((0..n).all(|i| p.pte(VirtAddr(a.0 + i * PAGE_SIZE)).is_device_private()));
    let faults = gpu.stats().faults;
    assert_eq!(ctx.checksum(a, n * PAGE_SIZE).unwrap(), sum(&data));
    assert_eq!(
        gpu.stats().faults,
        faults,
        "prefetched pages are mapped: no fault"
    );
    // A second prefetch has nothing to move.
    assert_eq!(ctx.prefetch(a, n * PAGE_SIZE, Location::Vram).unwrap(), 0);
    // Back to RAM, every byte with it.
    assert_eq!(ctx.prefetch(a, n * PAGE_SIZE, Location::Ram).unwrap(), n);
    assert_eq!(gpu.vram_bytes().1, 0);
    assert_eq!(read(&p, a, n * PAGE_SIZE), data);
    assert_eq!(
        ctx.prefetch(VirtAddr(a.0 + 1), PAGE_SIZE, Location::Vram)
            .unwrap_err()
            .errno(),
        Errno::EINVAL
    );
}
