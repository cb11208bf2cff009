//! The host layer's seams: `Host::quiescent()`, the leak report every test ends with
//! (each holder the kernel accounts for — a running process, a frame, a DMA pin, a DMA
//! mapping with its IOVA, a notifier subscription, a p2p allocation — shows up until
//! released); processes that run until they exit; the device registry with typed
//! lookup and hot removal; and per-device DMA handles.

mod common;

use peerdma::addr::{Bdf, PAGE_SIZE};
use peerdma::dma::{Direction, DmaError};
use peerdma::drivers::nvme::{Nvme, NvmeConfig, NvmeSpec};
use peerdma::errno::Errno;
use peerdma::gup::{get_user_dma_sg, pin_user_pages, FollFlags, UserSg};
use peerdma::host::{Host, HostConfig, HostError};
use peerdma::mm::Prot;
use peerdma::notifier::{IntervalNotifierOps, NotifyRange, Subscription};
use peerdma::sync::Arc;

fn bdf(s: &str) -> Bdf {
    s.parse().unwrap()
}

struct Nop;
impl IntervalNotifierOps for Nop {
    fn invalidate(&self, _: &Subscription, _: &NotifyRange, _: u64) -> bool {
        true
    }
}

#[test]
fn a_fresh_host_is_quiescent() {
    let h = common::workstation(16 << 20, true);
    let q = h.quiescent();
    assert!(q.is_clean(), "{q}");
    assert_eq!(q.to_string(), "quiescent: nothing held");
}

#[test]
fn every_holder_shows_until_released() {
    let h = common::workstation(16 << 20, true);
    let p = h.spawn();
    let a = p.mmap_anon(4 * PAGE_SIZE, Prot::RW).unwrap();
    p.write(a, &[1; 4 * PAGE_SIZE as usize]).unwrap();
    // A running process and its four frames.
    let q = h.quiescent();
    assert_eq!(q.processes, vec![p.pid()]);
    assert_eq!(q.frames(), 4);
    assert_eq!(q.pinned(), 0);
    // A pin, a DMA mapping through the IOMMU, a subscription, a p2p allocation.
    let pin = pin_user_pages(&p, a, 1, FollFlags::NONE).unwrap();
    let nic = common::attach(&h, "0000:03:00.0");
    let sg = get_user_dma_sg(&p, &nic, UserSg::new(a, 2 * PAGE_SIZE, Direction::ToDevice)).unwrap();
    let sub = p.notifier().subscribe(a, PAGE_SIZE, Arc::new(Nop));
    let cmb = common::cmb(&h);
    let chunk = cmb.alloc(3 * PAGE_SIZE).unwrap();
    let q = h.quiescent();
    assert_eq!(
        q.pinned(),
        2,
        "the pin and the DMA pin of the first two pages"
    );
    assert_eq!(q.dma_mappings, 1);
    assert_eq!((q.iova_pages, q.io_ptes), (2, 2));
    assert_eq!(q.notifier_subscriptions, 1);
    assert_eq!(q.p2p.len(), 1);
    assert_eq!(q.p2p[0].bytes, 3 * PAGE_SIZE);
    assert_eq!(q.frames(), 4 + 3, "the CMB's allocated frames count too");
    let text = q.to_string();
    for what in [
        "processes not exited",
        "DMA-pinned",
        "DMA mapping",
        "IOVA",
        "subscriptions",
        "p2p memory of 0000:05:00.0",
    ] {
        assert!(text.contains(what), "{what} missing from:\n{text}");
    }
    // Released one by one, each disappears.
    drop(sg);
    let q = h.quiescent();
    assert_eq!(
        (q.dma_mappings, q.iova_pages, q.io_ptes, q.pinned()),
        (0, 0, 0, 1)
    );
    drop(pin);
    drop(chunk);
    drop(sub);
    let q = h.quiescent();
    assert_eq!(
        (q.pinned(), q.p2p.len(), q.notifier_subscriptions),
        (0, 0, 0)
    );
    // The process runs until it exits, holding its frames.
    assert_eq!(q.frames(), 4);
    p.exit();
    h.quiescent().assert_clean();
}

#[test]
fn a_dropped_handle_does_not_end_a_process_exit_does() {
    let h = common::workstation(16 << 20, false);
    let p = h.spawn();
    let pid = p.pid();
    let a = p.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
    p.write(a, b"x").unwrap();
    let child = p.fork().unwrap();
    assert_ne!(child.pid(), pid);
    drop(p);
    // Still running: the handle was only a handle.
    let q = h.quiescent();
    assert_eq!(q.processes.len(), 2);
    assert_eq!(
        q.frames(),
        1,
        "parent and child share the page copy-on-write"
    );
    let mut b = [0u8];
    child.read(a, &mut b).unwrap();
    assert_eq!(&b, b"x");
    child.exit();
    let q = h.quiescent();
    assert_eq!(q.processes, vec![pid]);
    assert_eq!(q.frames(), 1);
}

#[test]
fn exit_releases_pages_even_while_the_address_space_is_held() {
    // A device that mirrors the process keeps the Mm object; exit still unmaps.
    let h = common::workstation(16 << 20, false);
    let p = h.spawn();
    let held = p.mm().clone();
    let a = p.mmap_anon(2 * PAGE_SIZE, Prot::RW).unwrap();
    p.write(a, &[3; 2 * PAGE_SIZE as usize]).unwrap();
    p.exit();
    assert_eq!(held.resident_pages(), 0);
    h.quiescent().assert_clean();
}

#[test]
fn devices_are_found_by_type_and_bdf() {
    let h = common::workstation(16 << 20, true);
    let nvmes = h.devices_of::<Nvme>();
    let bdfs: Vec<String> = nvmes.iter().map(|n| n.dev().to_string()).collect();
    assert_eq!(bdfs, ["0000:05:00.0", "0000:06:00.0", "0000:07:00.0"]);
    assert!(h.device::<Nvme>(bdf("0000:05:00.0")).is_some());
    assert!(
        h.device::<Nvme>(bdf("0000:03:00.0")).is_none(),
        "no model there"
    );
    assert_eq!(h.devices().len(), 3);
    assert_eq!(
        h.devices().get_dyn(bdf("0000:06:00.0")).unwrap().kind(),
        "nvme"
    );
    // Both CMBs are registered with the host's p2p registry, through the device.
    let provs: Vec<Bdf> = h.p2p().providers().iter().map(|p| p.dev()).collect();
    assert_eq!(provs, [bdf("0000:05:00.0"), bdf("0000:06:00.0")]);
    for n in &nvmes {
        use peerdma::drivers::Device;
        assert_eq!(n.providers().len(), usize::from(n.cmb().is_some()));
    }
    assert!(h
        .device::<Nvme>(bdf("0000:07:00.0"))
        .unwrap()
        .cmb()
        .is_none());
}

#[test]
fn a_second_model_on_one_function_is_refused() {
    let topo = peerdma::fabric::preset("workstation").unwrap();
    let spec = NvmeSpec {
        bdf: bdf("0000:05:00.0"),
        config: NvmeConfig {
            capacity: 1 << 20,
            ..NvmeConfig::default()
        },
    };
    let e = Host::build(
        topo,
        &HostConfig {
            ram_bytes: 16 << 20,
            iommu: Some(false),
        },
        &[spec.clone().into(), spec.into()],
    )
    .unwrap_err();
    assert!(matches!(e, HostError::Duplicate { .. }), "{e}");
    assert_eq!(e.errno(), Errno::EBUSY);
}

#[test]
fn a_failed_probe_keeps_the_model_error() {
    let topo = peerdma::fabric::preset("workstation").unwrap();
    let spec = NvmeSpec {
        bdf: bdf("0000:05:00.0"),
        config: NvmeConfig {
            capacity: 1 << 20,
            lba_size: 1000,
            ..NvmeConfig::default()
        },
    };
    let e = Host::build(topo, &HostConfig::default(), &[spec.into()]).unwrap_err();
    assert_eq!(e.errno(), Errno::EINVAL);
    let source = std::error::Error::source(&e).expect("the model's error");
    assert!(source.to_string().contains("LBA size 1000"), "{source}");
}

#[test]
fn removing_a_device_retracts_its_p2p_memory() {
    let mut h = common::workstation(16 << 20, true);
    let p = h.spawn();
    let cmb = common::cmb(&h);
    let va = cmb.mmap(&p, PAGE_SIZE, true, 0, Prot::RW).unwrap();
    p.write(va, b"cmb").unwrap();
    h.remove_device(bdf("0000:05:00.0"), None).unwrap();
    assert!(h.device::<Nvme>(bdf("0000:05:00.0")).is_none());
    assert_eq!(h.p2p().providers().len(), 1, "the other drive's CMB stays");
    // The VMA stays; its page is gone (unmap_mapping_range).
    let e = p.read(va, &mut [0u8; 3]).unwrap_err();
    assert_eq!(e.errno(), Errno::EFAULT);
    let e = h.remove_device(bdf("0000:05:00.0"), None).unwrap_err();
    assert_eq!(e.errno(), Errno::ENODEV);
    p.exit();
    h.quiescent().assert_clean();
}

#[test]
fn a_dma_handle_is_per_device_with_its_own_limits_and_stats() {
    let h = common::workstation(16 << 20, false);
    let gpu = common::attach(&h, "0000:03:00.0");
    let nic = common::attach(&h, "0000:04:00.0");
    // Attaching again hands out the same device.
    let again = common::attach(&h, "0000:03:00.0");
    again.set_max_segment(1 << 20);
    assert_eq!(gpu.max_segment(), 1 << 20);
    assert_eq!(nic.max_segment(), peerdma::dma::DEFAULT_MAX_SEGMENT);
    // An unknown function cannot be attached.
    let e = h.dma().attach(bdf("0000:7f:00.0")).unwrap_err();
    assert_eq!(e.errno(), Errno::ENODEV);
    // Transfers count on the device that made them, and on the host.
    let p = h.spawn();
    let a = p.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
    let sg = get_user_dma_sg(&p, &gpu, UserSg::new(a, PAGE_SIZE, Direction::FromDevice)).unwrap();
    gpu.dma_write(sg.segments()[0].addr, &[5; 100]).unwrap();
    assert_eq!(gpu.stats().host_ram, 100);
    assert_eq!(nic.stats().host_ram, 0);
    assert_eq!(h.dma().stats().host_ram, 100);
    assert_eq!((gpu.live_mappings(), nic.live_mappings()), (1, 0));
    // The NIC has no mapping there: its DMA is a violation, not the GPU's.
    let e = nic.dma_write(sg.segments()[0].addr, &[1]).unwrap_err();
    assert!(matches!(e, DmaError::Fault(_)), "{e}");
    drop(sg);
    p.exit();
    h.quiescent().assert_clean();
}

#[test]
fn a_narrow_dma_mask_refuses_addresses_beyond_it() {
    // Without an IOMMU the device sees physical addresses: a 12-bit mask covers only
    // the first page of RAM, which is reserved, so every RAM page is out of reach.
    let h = common::workstation(16 << 20, false);
    let gpu = common::attach(&h, "0000:03:00.0");
    let e = gpu.set_dma_mask(8).unwrap_err();
    assert_eq!(e.errno(), Errno::EINVAL);
    gpu.set_dma_mask(12).unwrap();
    assert_eq!(gpu.dma_mask(), 0xfff);
    let p = h.spawn();
    let a = p.mmap_anon(PAGE_SIZE, Prot::RW).unwrap();
    let e = get_user_dma_sg(&p, &gpu, UserSg::new(a, PAGE_SIZE, Direction::ToDevice)).unwrap_err();
    assert_eq!(e.errno(), Errno::EIO, "{e}");
    assert_eq!(h.dma().live_mappings(), 0, "nothing half-mapped");
    gpu.set_dma_mask(64).unwrap();
    drop(get_user_dma_sg(&p, &gpu, UserSg::new(a, PAGE_SIZE, Direction::ToDevice)).unwrap());
    p.exit();
    h.quiescent().assert_clean();
}

#[test]
fn the_verdict_for_a_provider_is_cached_per_device() {
    let h = common::workstation(16 << 20, true);
    let nvme6 = common::attach(&h, "0000:06:00.0");
    let v1 = nvme6.verdict(bdf("0000:05:00.0")).unwrap();
    let v2 = nvme6.verdict(bdf("0000:05:00.0")).unwrap();
    assert!(Arc::ptr_eq(&v1, &v2), "computed once");
    let topo = h.topology();
    let fresh = peerdma::fabric::calc_map_type_and_dist(
        topo,
        topo.lookup(bdf("0000:05:00.0")).unwrap(),
        topo.lookup(bdf("0000:06:00.0")).unwrap(),
    );
    assert_eq!(*v1, fresh);
}
