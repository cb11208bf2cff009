//! DMA mapping and the DMA engine: scatter-gather tables, mapping them for one device
//! (system RAM through that device's IOMMU domain, a peer's memory by bus address
//! through a switch or by IOVA through an allowed host bridge, or a refusal), in-flight
//! tracking so unmapping waits for DMA in progress, the engine every device model moves
//! bytes with, and the sanitizer that checks every access.
//!
//! Kernel analogue: kernel/dma/mapping.c, drivers/iommu/dma-iommu.c
//! (`iommu_dma_map_sg` with its p2pdma handling), lib/scatterlist.c. What this layer
//! leaves to others: pinning (`gup`), the memory providers (`p2pmem`), and the devices.

mod engine;
mod map;
pub mod sanitizer;
pub mod sg;

pub use map::{DmaMapping, DmaSegment, MapKind};
pub use sanitizer::{Sanitizer, Violation, ViolationKind};
pub use sg::{SgEntry, SgTable};

use std::collections::{BTreeMap, HashMap};

use crate::addr::{Bdf, DmaAddr, Pfn};
use crate::errno::Errno;
use crate::fabric::{Topology, Verdict};
use crate::iommu::{Iommu, IommuError};
use crate::mem::PhysMem;
use crate::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use crate::sync::{order, Arc, OrderedRwLock, RwLock};

/// Which way the data of a mapping flows (`enum dma_data_direction`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Direction {
    /// The device reads memory.
    ToDevice,
    /// The device writes memory.
    FromDevice,
    /// Both.
    Bidirectional,
}

impl Direction {
    /// Whether the device may read memory through the mapping.
    pub fn device_reads(self) -> bool {
        matches!(self, Direction::ToDevice | Direction::Bidirectional)
    }
    /// Whether the device may write memory through the mapping.
    pub fn device_writes(self) -> bool {
        matches!(self, Direction::FromDevice | Direction::Bidirectional)
    }
}

/// What DMA mapping and the engine can refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DmaError {
    /// The fabric does not let the device reach the peer's memory (EREMOTEIO: will not
    /// succeed if retried). The verdict says which bridge or ACS setting is in the way.
    #[error("{} cannot reach memory of {} (EREMOTEIO): {}", .verdict.client, .verdict.provider, .verdict.reason())]
    RemoteIo {
        /// The fabric's verdict for this provider/client pair.
        verdict: Box<Verdict>,
    },
    /// The memory is not addressable on the bus at all: device-private pages live
    /// only in their device (EREMOTEIO).
    #[error("{dev} cannot map {pfn} (EREMOTEIO): {kind} is not addressable on the bus")]
    NotAddressable {
        /// The DMA-ing device.
        dev: Bdf,
        /// The frame.
        pfn: Pfn,
        /// What memory it is.
        kind: String,
    },
    /// The device is not in the host's fabric (ENODEV).
    #[error("{dev}: no such device (ENODEV)")]
    NoDevice {
        /// The device.
        dev: Bdf,
    },
    /// The p2p memory's provider is not in the fabric (ENODEV).
    #[error("{dev} cannot map {pfn}: its provider {provider} is not in the fabric (ENODEV)")]
    NoProvider {
        /// The DMA-ing device.
        dev: Bdf,
        /// The frame.
        pfn: Pfn,
        /// The provider the frame's page map names.
        provider: Bdf,
    },
    /// An SG entry names a frame in no memory region (EFAULT).
    #[error("{dev}: cannot map {pfn}, which is in no memory region (EFAULT)")]
    NoSuchFrame {
        /// The device.
        dev: Bdf,
        /// The frame.
        pfn: Pfn,
    },
    /// The device's IOMMU domain refused: its IOVA space is exhausted (ENOMEM).
    #[error("{dev}: cannot map {bytes:#x} bytes through the IOMMU")]
    Iommu {
        /// The device.
        dev: Bdf,
        /// Bytes asked for.
        bytes: u64,
        /// The IOMMU's refusal.
        source: IommuError,
    },
    /// The mapping the access went through was revoked (an invalidation of memory it
    /// is not pinning): the device must fault the range in again and retry (EAGAIN).
    /// Not a violation: an ODP device meets this in normal operation.
    #[error("{dev}: the mapping at {addr} was revoked by an invalidation (EAGAIN)")]
    Revoked {
        /// The device.
        dev: Bdf,
        /// The first DMA address of the revoked mapping segment.
        addr: DmaAddr,
    },
    /// A device access broke a rule; the sanitizer recorded it (EFAULT).
    #[error("DMA fault: {0}")]
    Fault(Box<Violation>),
}

impl DmaError {
    /// The kernel's error number.
    pub fn errno(&self) -> Errno {
        match self {
            DmaError::RemoteIo { .. } | DmaError::NotAddressable { .. } => Errno::EREMOTEIO,
            DmaError::NoDevice { .. } | DmaError::NoProvider { .. } => Errno::ENODEV,
            DmaError::NoSuchFrame { .. } | DmaError::Fault(_) => Errno::EFAULT,
            DmaError::Revoked { .. } => Errno::EAGAIN,
            DmaError::Iommu { source, .. } => source.errno(),
        }
    }
}

/// One device's live mappings by (first DMA address, mapping id).
type LiveMap = BTreeMap<(u64, u64), Arc<map::Record>>;

/// Bytes the engine moved, by the path they took.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DmaStats {
    /// Peer memory reached by bus address, through a switch.
    pub via_switch: u64,
    /// Peer memory reached through the host bridge (IOVA or physical address).
    pub via_host_bridge: u64,
    /// System RAM.
    pub host_ram: u64,
    /// Mappings made.
    pub mappings: u64,
    /// Mappings released.
    pub unmappings: u64,
}

#[derive(Default)]
struct Counters {
    via_switch: AtomicU64,
    via_host_bridge: AtomicU64,
    host_ram: AtomicU64,
    mappings: AtomicU64,
    unmappings: AtomicU64,
}

/// The DMA side of one host: its fabric, memory, IOMMU, live mappings and sanitizer.
///
/// # Invariants
/// `live` holds exactly the mappings whose [`DmaMapping`] has not been dropped, keyed by
/// device, then first DMA address and mapping id (one page may be mapped twice). A
/// transfer holds its device's map shared for its whole duration, so an unmap (which
/// takes it exclusively) waits for DMA in flight: that is the in-flight tracking.
pub struct Dma {
    topo: Arc<Topology>,
    phys: Arc<PhysMem>,
    iommu: Iommu,
    /// Live mappings per device. Lock order: after the page-table lock, before a
    /// mapping's in-flight lock.
    live: OrderedRwLock<HashMap<Bdf, Arc<OrderedRwLock<LiveMap>>>>,
    sanitizer: Sanitizer,
    counters: Counters,
    next_id: AtomicU64,
    /// Per-device maximum segment sizes set by drivers. Lock order: a leaf.
    max_segment: RwLock<HashMap<Bdf, u64>>,
    /// Hooks run in the middle of a device's transfers (after they are checked and in
    /// flight, before any byte moves), for fault injection and tests.
    transfer_hooks: OrderedRwLock<HashMap<Bdf, TransferHook>>,
    has_hooks: AtomicBool,
}

/// What [`Dma::set_transfer_hook`] runs in the middle of a transfer.
pub type TransferHook = Arc<dyn Fn() + Send + Sync>;

impl std::fmt::Debug for Dma {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dma").field("iommu", &self.iommu).finish()
    }
}

impl Dma {
    /// The DMA side of a host: the IOMMU translates when `iommu` is true (the
    /// topology's own IOMMU flag is the usual choice).
    pub fn new(topo: Arc<Topology>, phys: Arc<PhysMem>, iommu: bool) -> Arc<Self> {
        let iommu = Iommu::new(&topo, iommu);
        Arc::new(Dma {
            topo,
            phys,
            iommu,
            live: OrderedRwLock::new(&order::DMA_DEVICES, HashMap::new()),
            sanitizer: Sanitizer::default(),
            counters: Counters::default(),
            next_id: AtomicU64::new(1),
            max_segment: RwLock::new(HashMap::new()),
            transfer_hooks: OrderedRwLock::new(&order::LEAF, HashMap::new()),
            has_hooks: AtomicBool::new(false),
        })
    }

    /// The fabric.
    pub fn topology(&self) -> &Arc<Topology> {
        &self.topo
    }
    /// Physical memory.
    pub fn phys(&self) -> &Arc<PhysMem> {
        &self.phys
    }
    /// The IOMMU.
    pub fn iommu(&self) -> &Iommu {
        &self.iommu
    }
    /// The sanitizer.
    pub fn sanitizer(&self) -> &Sanitizer {
        &self.sanitizer
    }
    /// The largest segment an SG table built for `dev` may hold
    /// (`dma_get_max_seg_size()`): 64 KiB unless its driver set more.
    pub fn max_segment(&self, dev: Bdf) -> u64 {
        crate::sync::read(&self.max_segment)
            .get(&dev)
            .copied()
            .unwrap_or(64 << 10)
    }

    /// `dma_set_max_seg_size(dev, bytes)`, as a driver calls it at probe (NVMe and
    /// most GPUs allow 4 GiB).
    pub fn set_max_segment(&self, dev: Bdf, bytes: u64) {
        crate::sync::write(&self.max_segment).insert(dev, bytes.max(crate::addr::PAGE_SIZE));
    }
    /// Bytes moved by path, and mapping counts.
    pub fn stats(&self) -> DmaStats {
        let c = &self.counters;
        DmaStats {
            via_switch: c.via_switch.load(Ordering::Relaxed),
            via_host_bridge: c.via_host_bridge.load(Ordering::Relaxed),
            host_ram: c.host_ram.load(Ordering::Relaxed),
            mappings: c.mappings.load(Ordering::Relaxed),
            unmappings: c.unmappings.load(Ordering::Relaxed),
        }
    }
    /// Live mappings of all devices.
    pub fn live_mappings(&self) -> usize {
        self.live.read().values().map(|m| m.read().len()).sum()
    }
    /// Devices with a live mapping of any of `frames`, for reports of who holds memory.
    pub fn holders(&self, contains: impl Fn(crate::addr::Pfn) -> bool) -> Vec<Bdf> {
        let live = self.live.read();
        let mut out: Vec<Bdf> = live
            .iter()
            .filter(|(_, m)| m.read().values().any(|r| r.frames().any(&contains)))
            .map(|(d, _)| *d)
            .collect();
        out.sort();
        out
    }

    /// Runs `hook` in the middle of every transfer of `dev` from now on — after the
    /// transfer is checked and counted in flight on its mappings, before any byte moves
    /// — or stops with `None`. For fault injection and for tests that need a transfer to
    /// stand still (an unmap of another mapping must not wait for it).
    pub fn set_transfer_hook(&self, dev: Bdf, hook: Option<TransferHook>) {
        let mut hooks = self.transfer_hooks.write();
        match hook {
            Some(h) => hooks.insert(dev, h),
            None => hooks.remove(&dev),
        };
        self.has_hooks.store(!hooks.is_empty(), Ordering::SeqCst);
    }

    fn run_transfer_hook(&self, dev: Bdf) {
        if !self.has_hooks.load(Ordering::Relaxed) {
            return;
        }
        let hook = self.transfer_hooks.read().get(&dev).cloned();
        if let Some(h) = hook {
            h();
        }
    }

    /// The live-mapping map of `dev`, created empty on first use.
    fn device_map(&self, dev: Bdf) -> Arc<OrderedRwLock<LiveMap>> {
        if let Some(m) = self.live.read().get(&dev) {
            return m.clone();
        }
        self.live
            .write()
            .entry(dev)
            .or_insert_with(|| Arc::new(OrderedRwLock::new(&order::DMA_MAPPINGS, LiveMap::new())))
            .clone()
    }

    fn fault(&self, v: Violation) -> DmaError {
        DmaError::Fault(Box::new(self.sanitizer.record(v)))
    }

    fn bump(&self, counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}
