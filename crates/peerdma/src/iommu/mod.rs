//! The IOMMU: one translation domain per IOMMU group (functions in a group share it),
//! an IOVA allocator per domain, an IO page table from IOVA pages to frames with
//! read/write permission, and a record of DMA faults. With the IOMMU off (passthrough),
//! a device's DMA address is the physical address.
//!
//! Kernel analogue: drivers/iommu/iommu.c, dma-iommu.c, iova.c. What this layer leaves
//! to others: which frames to map (`dma`), and whether a peer is reached by bus address
//! at all (`fabric`): bus-address DMA bypasses the IOMMU entirely.

mod domain;

pub use domain::{Domain, IoPerm, IovaRange};

use std::collections::HashMap;
use std::fmt;

use crate::addr::{Bdf, DmaAddr, Iova};
use crate::errno::Errno;
use crate::fabric::Topology;
use crate::sync::{lock, Arc, Mutex};
use crate::sync::{order, OrderedMutex};

/// An IOMMU group: the functions the IOMMU cannot tell apart, which share one domain
/// (`/sys/kernel/iommu_groups/N`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct IommuGroup(pub u32);

impl fmt::Display for IommuGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IOMMU group {}", self.0)
    }
}

/// What the IOMMU can refuse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IommuError {
    /// The domain's IOVA space has no free range of this size (ENOMEM).
    #[error("{group}: no free IOVA range of {pages} pages (ENOMEM)")]
    NoSpace {
        /// The domain's group.
        group: IommuGroup,
        /// Pages asked for.
        pages: u64,
    },
    /// A page of a reserved range is linked already (EBUSY).
    #[error("{group}: IOVA {iova} is linked already (EBUSY)")]
    AlreadyLinked {
        /// The domain's group.
        group: IommuGroup,
        /// The page.
        iova: Iova,
    },
    /// An index past the end of a reserved range (ERANGE).
    #[error("{group}: page {index} is outside a reservation of {pages} pages (ERANGE)")]
    OutOfRange {
        /// The domain's group.
        group: IommuGroup,
        /// The index asked for.
        index: u64,
        /// The reservation's size.
        pages: u64,
    },
}

impl IommuError {
    /// The kernel's error number.
    pub fn errno(&self) -> Errno {
        match self {
            IommuError::NoSpace { .. } => Errno::ENOMEM,
            IommuError::AlreadyLinked { .. } => Errno::EBUSY,
            IommuError::OutOfRange { .. } => Errno::ERANGE,
        }
    }
}

/// Why the IOMMU refused a DMA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultReason {
    /// No IO page-table entry translates the address.
    NoEntry,
    /// The entries do not map what the device's mapping says, or lack write
    /// permission for a write.
    Mismatch,
}

impl fmt::Display for FaultReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FaultReason::NoEntry => "no IO page-table entry",
            FaultReason::Mismatch => "IO page-table entry missing or without permission",
        })
    }
}

/// One DMA the IOMMU refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DmaFault {
    /// The device that issued it.
    pub dev: Bdf,
    /// The address it used.
    pub addr: DmaAddr,
    /// Whether it was a write to memory.
    pub write: bool,
    /// Why it was refused.
    pub reason: FaultReason,
}

/// The host's IOMMU.
///
/// # Invariants
/// Every function maps to exactly one group; a group has at most one domain, created on
/// first use and shared by the group's functions.
pub struct Iommu {
    enabled: bool,
    groups: HashMap<Bdf, IommuGroup>,
    /// Domains by group. Lock order: a leaf.
    domains: OrderedMutex<HashMap<IommuGroup, Arc<Domain>>>,
    faults: Mutex<Vec<DmaFault>>,
}

impl std::fmt::Debug for Iommu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Iommu")
            .field("enabled", &self.enabled)
            .finish()
    }
}

impl Iommu {
    /// The IOMMU of a host with this topology: groups from the topology where it has
    /// them, else one group per function; `enabled` false is passthrough.
    pub fn new(topo: &Topology, enabled: bool) -> Self {
        let mut groups = HashMap::new();
        let mut next = topo
            .functions()
            .iter()
            .filter_map(|f| f.iommu_group)
            .max()
            .map_or(0, |g| g + 1);
        for f in topo.functions() {
            let g = f.iommu_group.unwrap_or_else(|| {
                next += 1;
                next - 1
            });
            groups.insert(f.bdf, IommuGroup(g));
        }
        Iommu {
            enabled,
            groups,
            domains: OrderedMutex::new(&order::IOMMU_DOMAINS, HashMap::new()),
            faults: Mutex::new(Vec::new()),
        }
    }

    /// Whether DMA is translated (false: passthrough, DMA address = physical address).
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The IOMMU group of a function.
    pub fn group(&self, dev: Bdf) -> Option<IommuGroup> {
        self.groups.get(&dev).copied()
    }

    /// The domain `dev` translates through (created on first use), or `None` in
    /// passthrough or for an unknown function.
    pub fn domain(&self, dev: Bdf) -> Option<Arc<Domain>> {
        if !self.enabled {
            return None;
        }
        let g = self.group(dev)?;
        Some(
            self.domains
                .lock()
                .entry(g)
                .or_insert_with(|| Arc::new(Domain::new(g)))
                .clone(),
        )
    }

    /// IOVA pages handed out and IO page-table entries linked, over every domain.
    pub fn usage(&self) -> (u64, u64) {
        self.domains
            .lock()
            .values()
            .fold((0, 0), |(iova, linked), d| {
                (
                    iova + d.allocated_iova_pages(),
                    linked + d.mapped_pages() as u64,
                )
            })
    }

    /// Records a refused DMA.
    pub fn report_fault(&self, fault: DmaFault) {
        lock(&self.faults).push(fault);
    }

    /// Every DMA fault so far.
    pub fn faults(&self) -> Vec<DmaFault> {
        lock(&self.faults).clone()
    }
}
