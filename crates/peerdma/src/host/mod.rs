//! One emulated machine: a fabric (preset or topology file), system RAM, the IOMMU and
//! DMA side, and device models bound to the fabric's endpoints. Processes are address
//! spaces spawned on it. A `Host` owns everything it made; there is no global state, so
//! hosts run side by side in tests.

pub mod p2p_copy;

use std::collections::BTreeMap;

use crate::addr::Bdf;
use crate::dma::Dma;
use crate::drivers::nvme::{CmbRegs, Nvme, NvmeConfig, NvmeError};
use crate::fabric::{find_closest_provider, DeviceClass, FabricError, PortKind, Topology};
use crate::mem::{MemError, PhysMem};
use crate::mm::Mm;
use crate::p2pmem::Provider;
use crate::sync::Arc;

/// What building a host can refuse.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// Memory could not be set up.
    #[error(transparent)]
    Mem(#[from] MemError),
    /// A device spec names a function the fabric lacks.
    #[error(transparent)]
    Fabric(#[from] FabricError),
    /// A device model failed to come up.
    #[error(transparent)]
    Nvme(#[from] NvmeError),
}

impl HostError {
    /// The kernel's error number.
    pub fn errno(&self) -> crate::errno::Errno {
        match self {
            HostError::Mem(e) => e.errno(),
            HostError::Fabric(e) => e.errno(),
            HostError::Nvme(e) => e.errno(),
        }
    }
}

/// A device model to bind to an endpoint.
#[derive(Clone, Debug)]
pub enum DeviceSpec {
    /// An NVMe controller.
    Nvme {
        /// The endpoint.
        bdf: Bdf,
        /// Its configuration.
        config: NvmeConfig,
    },
}

/// How to build a host.
#[derive(Clone, Debug)]
pub struct HostConfig {
    /// System RAM in bytes.
    pub ram_bytes: u64,
    /// IOMMU on or off; `None` takes the topology's (off when it does not say).
    pub iommu: Option<bool>,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            ram_bytes: 4 << 30,
            iommu: None,
        }
    }
}

/// An emulated machine.
pub struct Host {
    topo: Arc<Topology>,
    phys: Arc<PhysMem>,
    dma: Arc<Dma>,
    nvme: BTreeMap<Bdf, Arc<Nvme>>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("topology", &self.topo.source())
            .field("nvme", &self.nvme.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Host {
    /// Builds a host from a topology, a configuration and the devices to bind.
    pub fn build(
        topo: Topology,
        cfg: &HostConfig,
        devices: &[DeviceSpec],
    ) -> Result<Self, HostError> {
        let topo = Arc::new(topo);
        let phys = PhysMem::new(cfg.ram_bytes)?;
        let iommu = cfg.iommu.unwrap_or(topo.host().iommu.unwrap_or(false));
        let dma = Dma::new(topo.clone(), phys.clone(), iommu);
        let mut nvme = BTreeMap::new();
        for d in devices {
            match d {
                DeviceSpec::Nvme { bdf, config } => {
                    topo.find(&bdf.to_string())?;
                    nvme.insert(*bdf, Nvme::new(&dma, *bdf, config.clone())?);
                }
            }
        }
        Ok(Host {
            topo,
            phys,
            dma,
            nvme,
        })
    }

    /// Every NVMe endpoint of the topology as a controller with a namespace of
    /// `capacity` bytes; a prefetchable BAR 2 of at least 2 MiB becomes its CMB.
    pub fn nvme_specs(topo: &Topology, capacity: u64) -> Vec<DeviceSpec> {
        topo.functions()
            .iter()
            .filter(|f| f.kind == PortKind::Endpoint && f.device_class() == DeviceClass::Nvme)
            .map(|f| {
                let cmb = f
                    .bars
                    .iter()
                    .find(|b| b.index == 2 && b.prefetchable && b.size >= 2 << 20)
                    .map(|b| CmbRegs::whole(2, b.size & !((1 << 20) - 1), 0));
                DeviceSpec::Nvme {
                    bdf: f.bdf,
                    config: NvmeConfig {
                        capacity,
                        cmb,
                        ..NvmeConfig::default()
                    },
                }
            })
            .collect()
    }

    /// The fabric.
    pub fn topology(&self) -> &Arc<Topology> {
        &self.topo
    }
    /// Physical memory.
    pub fn phys(&self) -> &Arc<PhysMem> {
        &self.phys
    }
    /// The DMA side (IOMMU, engine, sanitizer).
    pub fn dma(&self) -> &Arc<Dma> {
        &self.dma
    }
    /// The NVMe controller at `bdf`.
    pub fn nvme(&self, bdf: Bdf) -> Option<&Arc<Nvme>> {
        self.nvme.get(&bdf)
    }
    /// All NVMe controllers in BDF order.
    pub fn nvmes(&self) -> impl Iterator<Item = &Arc<Nvme>> {
        self.nvme.values()
    }
    /// A new process (address space).
    pub fn spawn(&self) -> Arc<Mm> {
        Mm::new(&self.phys)
    }
    /// Published p2p memory providers.
    pub fn providers(&self) -> Vec<Arc<Provider>> {
        self.nvme
            .values()
            .filter_map(|n| n.cmb().cloned())
            .filter(|p| p.published())
            .collect()
    }
    /// `pci_p2pmem_find_many(clients)`: the published provider closest to all clients
    /// that every client can reach, ties broken by `seed`.
    pub fn find_p2pmem(&self, clients: &[Bdf], seed: u64) -> Option<Arc<Provider>> {
        let providers = self.providers();
        let ids: Vec<_> = providers
            .iter()
            .filter_map(|p| self.topo.lookup(p.dev()))
            .collect();
        let clients: Vec<_> = clients
            .iter()
            .filter_map(|c| self.topo.lookup(*c))
            .collect();
        let best = find_closest_provider(&self.topo, &ids, &clients, seed)?;
        let bdf = self.topo.function(best).bdf;
        providers.into_iter().find(|p| p.dev() == bdf)
    }
}
