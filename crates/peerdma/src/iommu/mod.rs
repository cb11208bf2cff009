//! The IOMMU: one translation domain per IOMMU group (functions in a group share it),
//! an IOVA allocator per domain, an IO page table from IOVA pages to frames with
//! read/write permission, and a record of DMA faults. With the IOMMU off (passthrough),
//! a device's DMA address is the physical address.
//!
//! Kernel analogue: drivers/iommu/iommu.c, dma-iommu.c, iova.c. What this layer leaves
//! to others: which frames to map (`dma`), and whether a peer is reached by bus address
//! at all (`fabric`): bus-address DMA bypasses the IOMMU entirely.

mod domain;

pub use domain::{Domain, IoPerm};

use std::collections::HashMap;

use crate::addr::{Bdf, DmaAddr};
use crate::fabric::Topology;
use crate::sync::{lock, Arc, Mutex};

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
    pub reason: String,
}

/// The host's IOMMU.
///
/// # Invariants
/// Every function maps to exactly one group; a group has at most one domain, created on
/// first use and shared by the group's functions.
pub struct Iommu {
    enabled: bool,
    groups: HashMap<Bdf, u32>,
    /// Domains by group. Lock order: a leaf.
    domains: Mutex<HashMap<u32, Arc<Domain>>>,
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
            groups.insert(f.bdf, g);
        }
        Iommu {
            enabled,
            groups,
            domains: Mutex::new(HashMap::new()),
            faults: Mutex::new(Vec::new()),
        }
    }

    /// Whether DMA is translated (false: passthrough, DMA address = physical address).
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The IOMMU group of a function.
    pub fn group(&self, dev: Bdf) -> Option<u32> {
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
            lock(&self.domains)
                .entry(g)
                .or_insert_with(|| Arc::new(Domain::new(g)))
                .clone(),
        )
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
