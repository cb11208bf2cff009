//! Helpers shared by the integration tests: where ../shared lives and unpacking its
//! sysfs snapshots.

#![allow(dead_code)]

pub mod rdma;

use std::path::PathBuf;

/// `../shared/data/sysfs` of the workspace, or `$PEERDMA_SHARED/data/sysfs`.
pub fn shared_sysfs() -> PathBuf {
    let base = std::env::var_os("PEERDMA_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared"));
    let dir = base.join("data/sysfs");
    assert!(
        dir.is_dir(),
        "reference data not found at {} (set PEERDMA_SHARED to the shared/ directory)",
        dir.display()
    );
    dir
}

/// The snapshot names in shared/data/sysfs.
pub fn snapshot_names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(shared_sysfs())
        .unwrap()
        .filter_map(|e| {
            let n = e.ok()?.file_name().to_string_lossy().into_owned();
            n.strip_suffix(".tar.gz").map(str::to_string)
        })
        .collect();
    names.sort();
    assert!(
        names.len() >= 4,
        "expected the four shared snapshots, found {names:?}"
    );
    names
}

/// Unpacks `NAME.tar.gz` into a temporary directory; returns it and the snapshot root.
pub fn unpack(name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let file = std::fs::File::open(shared_sysfs().join(format!("{name}.tar.gz"))).unwrap();
    tar::Archive::new(flate2::read::GzDecoder::new(file))
        .unpack(tmp.path())
        .unwrap();
    let root = tmp.path().join(name);
    (tmp, root)
}

/// A host that checks for leaks when it goes out of scope: every process still
/// running exits, and then `Host::quiescent()` must report nothing held (a pin, a DMA
/// mapping, an IOVA, a subscription, a p2p allocation, a frame). Bind it first in a
/// test, so that it is dropped after everything else the test made. Dereferences to
/// the host.
pub struct Checked(pub peerdma::host::Host);

impl std::ops::Deref for Checked {
    type Target = peerdma::host::Host;
    fn deref(&self) -> &peerdma::host::Host {
        &self.0
    }
}

impl std::ops::DerefMut for Checked {
    fn deref_mut(&mut self) -> &mut peerdma::host::Host {
        &mut self.0
    }
}

impl Drop for Checked {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        self.0.exit_all();
        self.0.quiescent().assert_clean();
    }
}

/// The workstation preset booted with `ram_bytes` of RAM, the IOMMU on or off, and an
/// NVMe controller (1 MiB namespace, a CMB where BAR 2 allows) on every NVMe endpoint.
pub fn workstation(ram_bytes: u64, iommu: bool) -> Checked {
    use peerdma::host::{Host, HostConfig};
    let topo = peerdma::fabric::preset("workstation").unwrap();
    let specs = Host::nvme_specs(&topo, 1 << 20);
    Checked(
        Host::build(
            topo,
            &HostConfig {
                ram_bytes,
                iommu: Some(iommu),
            },
            &specs,
        )
        .unwrap(),
    )
}

/// The CMB of the workstation's NVMe drive at 0000:05:00.0, under the switch.
pub fn cmb(h: &peerdma::host::Host) -> peerdma::sync::Arc<peerdma::p2pmem::Provider> {
    h.device::<peerdma::drivers::nvme::Nvme>("0000:05:00.0".parse().unwrap())
        .unwrap()
        .cmb()
        .unwrap()
        .clone()
}

/// `h`'s DMA handle of the function `bdf` (a "dddd:bb:dd.f" string).
pub fn attach(h: &peerdma::host::Host, bdf: &str) -> peerdma::dma::DmaDevice {
    h.dma().attach(bdf.parse().unwrap()).unwrap()
}

/// The workstation preset with `ram_bytes` of RAM, no IOMMU and no device models: a
/// machine for tests of memory alone, checked for leaks when dropped.
pub fn host(ram_bytes: u64) -> Checked {
    bare(ram_bytes, false)
}

/// The workstation preset with `ram_bytes` of RAM, the IOMMU on or off, and no device
/// models, checked for leaks when dropped.
pub fn bare(ram_bytes: u64, iommu: bool) -> Checked {
    use peerdma::host::{Host, HostConfig};
    Checked(
        Host::build(
            peerdma::fabric::preset("workstation").unwrap(),
            &HostConfig {
                ram_bytes,
                iommu: Some(iommu),
            },
            &[],
        )
        .unwrap(),
    )
}

/// A leak-checked host with 8 MiB of RAM, a 1 MiB device region of `kind`, and a process with one
/// anonymous page holding `data` at its start.
pub fn one_page(
    kind: peerdma::mem::RegionKind,
    data: &[u8],
) -> (
    Checked,
    peerdma::sync::Arc<peerdma::mem::Region>,
    peerdma::host::Process,
    peerdma::addr::VirtAddr,
) {
    let h = host(8 << 20);
    let dev = h.phys().memremap_pages(kind, 1 << 20).unwrap();
    let mm = h.spawn();
    let a = mm
        .mmap_anon(peerdma::addr::PAGE_SIZE, peerdma::mm::Prot::RW)
        .unwrap();
    mm.write(a, data).unwrap();
    (h, dev, mm, a)
}
