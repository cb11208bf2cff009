//! DMA mapping and the DMA engine: scatter-gather tables, mapping them for one device
//! (system RAM through that device's IOMMU domain, a peer's memory by bus address
//! through a switch or by IOVA through an allowed host bridge, or a refusal), in-flight
//! tracking so unmapping waits for DMA in progress, the engine every device model moves
//! bytes with, and the sanitizer that checks every access.
//!
//! Kernel analogue: kernel/dma/mapping.c, drivers/iommu/dma-iommu.c
//! (`iommu_dma_map_sg` with its p2pdma handling), lib/scatterlist.c. What this layer
//! leaves to others: pinning (`gup`), the memory providers (`p2pmem`), and the devices.

mod device;
mod engine;
mod map;
pub mod sanitizer;
pub mod sg;

pub use device::{DmaDevice, DEFAULT_MAX_SEGMENT};
pub use map::{DmaMapping, DmaSegment, MapKind};
pub use sanitizer::{Sanitizer, Violation, ViolationKind};
pub use sg::{SgEntry, SgTable};

use std::collections::{BTreeMap, HashMap};

use crate::addr::{Bdf, DmaAddr, Pfn};
use crate::errno::Errno;
use crate::fabric::{Topology, Verdict};
use crate::iommu::{Iommu, IommuError};
use crate::mem::PhysMem;
use crate::sync::atomic::{AtomicU64, Ordering};
use crate::sync::{order, Arc, OrderedRwLock};

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
    /// A mapping's address does not fit the device's DMA mask (EIO: nothing to bounce
    /// through).
    #[error("{dev}: {addr} + {len:#x} is beyond the device's DMA mask {mask:#x} (EIO)")]
    Mask {
        /// The device.
        dev: Bdf,
        /// The address the mapping would have.
        addr: DmaAddr,
        /// Its length.
        len: u64,
        /// The device's mask.
        mask: u64,
    },
    /// A driver asked for a DMA mask the device model cannot take (EINVAL).
    #[error("{dev}: a {bits}-bit DMA mask is not supported (EINVAL)")]
    BadMask {
        /// The device.
        dev: Bdf,
        /// The bits asked for.
        bits: u32,
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
            DmaError::Mask { .. } => Errno::EIO,
            DmaError::BadMask { .. } => Errno::EINVAL,
        }
    }
}

/// One device's live mappings by (first DMA address, mapping id).
type LiveMap = BTreeMap<(u64, u64), Arc<map::Record>>;

/// Bytes the engine moved, by the path they took.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DmaStats {
    /// Peer memory reached by bus address through a common upstream bridge (a switch,
    /// or a root port two functions share).
    pub via_switch: u64,
    /// Peer memory reached through the host bridge (IOVA or physical address).
    pub via_host_bridge: u64,
    /// System RAM.
    pub host_ram: u64,
    /// A device's own BAR memory (a drive reading into its own CMB): no link crossed.
    pub same_device: u64,
    /// Mappings made.
    pub mappings: u64,
    /// Mappings released.
    pub unmappings: u64,
}

impl DmaStats {
    /// What was added since `before`.
    pub fn since(&self, before: &DmaStats) -> DmaStats {
        DmaStats {
            via_switch: self.via_switch - before.via_switch,
            via_host_bridge: self.via_host_bridge - before.via_host_bridge,
            host_ram: self.host_ram - before.host_ram,
            same_device: self.same_device - before.same_device,
            mappings: self.mappings - before.mappings,
            unmappings: self.unmappings - before.unmappings,
        }
    }
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) via_switch: AtomicU64,
    pub(crate) via_host_bridge: AtomicU64,
    pub(crate) host_ram: AtomicU64,
    pub(crate) same_device: AtomicU64,
    pub(crate) mappings: AtomicU64,
    pub(crate) unmappings: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> DmaStats {
        DmaStats {
            via_switch: self.via_switch.load(Ordering::Relaxed),
            via_host_bridge: self.via_host_bridge.load(Ordering::Relaxed),
            host_ram: self.host_ram.load(Ordering::Relaxed),
            same_device: self.same_device.load(Ordering::Relaxed),
            mappings: self.mappings.load(Ordering::Relaxed),
            unmappings: self.unmappings.load(Ordering::Relaxed),
        }
    }
}

/// The DMA side of one host: its fabric, memory, IOMMU, attached devices and sanitizer.
///
/// # Invariants
/// `devices` holds one state per attached BDF, for the host's life; each device's live
/// mappings are exactly its [`DmaMapping`]s not yet dropped. `counters` is the sum of
/// the devices' own.
pub struct Dma {
    topo: Arc<Topology>,
    phys: Arc<PhysMem>,
    iommu: Iommu,
    /// Attached devices. Lock order: after the page-table lock, before a device's
    /// mappings.
    devices: OrderedRwLock<HashMap<Bdf, Arc<device::DeviceState>>>,
    sanitizer: Sanitizer,
    counters: Counters,
    next_id: AtomicU64,
}

/// What [`DmaDevice::set_transfer_hook`] runs in the middle of a transfer.
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
            devices: OrderedRwLock::new(&order::DMA_DEVICES, HashMap::new()),
            sanitizer: Sanitizer::default(),
            counters: Counters::default(),
            next_id: AtomicU64::new(1),
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
    /// Bytes moved by path, and mapping counts.
    pub fn stats(&self) -> DmaStats {
        self.counters.snapshot()
    }
    /// Live mappings of all devices.
    pub fn live_mappings(&self) -> usize {
        self.devices
            .read()
            .values()
            .map(|d| d.live.read().len())
            .sum()
    }
    /// Devices with a live mapping of any of `frames`, for reports of who holds memory.
    pub fn holders(&self, contains: impl Fn(crate::addr::Pfn) -> bool) -> Vec<Bdf> {
        let devices = self.devices.read();
        let mut out: Vec<Bdf> = devices
            .iter()
            .filter(|(_, d)| d.live.read().values().any(|r| r.frames().any(&contains)))
            .map(|(b, _)| *b)
            .collect();
        out.sort();
        out
    }

    fn fault(&self, v: Violation) -> DmaError {
        DmaError::Fault(Box::new(self.sanitizer.record(v)))
    }
}
