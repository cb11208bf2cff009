//! One emulated machine: a fabric (preset or topology file), system RAM, the IOMMU and
//! DMA side, the p2p memory providers, device models bound to the fabric's endpoints,
//! and the processes running on it. A `Host` owns everything it made; there is no
//! global state, so hosts run side by side in tests.

mod process;
mod quiescent;

pub use process::{Pid, Process};
pub use quiescent::{P2pUse, Quiescence, RegionUse};

use std::time::Duration;

use crate::addr::Bdf;
use crate::dma::Dma;
use crate::drivers::nvme::{CmbRegs, NvmeConfig, NvmeSpec};
use crate::drivers::{Device, Devices, Probe, ProbeError};
use crate::fabric::{DeviceClass, FabricError, PortKind, Topology};
use crate::mem::{MemError, PhysMem};
use crate::p2pmem::{P2pError, P2pRegistry, Provider};
use crate::sync::Arc;

/// What building or changing a host can refuse.
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
    Probe(#[from] ProbeError),
    /// Two device specs name one function (EBUSY).
    #[error("{dev} has a device model already (EBUSY)")]
    Duplicate {
        /// The function.
        dev: Bdf,
    },
    /// No device model is bound at that function (ENODEV).
    #[error("{dev}: no device model bound there (ENODEV)")]
    NoDevice {
        /// The function.
        dev: Bdf,
    },
    /// Removing a device's p2p memory failed or timed out.
    #[error(transparent)]
    P2p(#[from] P2pError),
}

impl HostError {
    /// The kernel's error number.
    pub fn errno(&self) -> crate::errno::Errno {
        match self {
            HostError::Mem(e) => e.errno(),
            HostError::Fabric(e) => e.errno(),
            HostError::Probe(e) => e.errno,
            HostError::Duplicate { .. } => crate::errno::Errno::EBUSY,
            HostError::NoDevice { .. } => crate::errno::Errno::ENODEV,
            HostError::P2p(e) => e.errno(),
        }
    }
}

/// A device model to bind to an endpoint: any driver's [`Probe`] spec.
#[derive(Clone, Debug)]
pub struct DeviceSpec(Arc<dyn Probe>);

impl DeviceSpec {
    /// The function it binds to.
    pub fn bdf(&self) -> Bdf {
        self.0.bdf()
    }
}

impl<P: Probe + 'static> From<P> for DeviceSpec {
    fn from(p: P) -> Self {
        DeviceSpec(Arc::new(p))
    }
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
///
/// # Invariants
/// Every device model in `devices` was probed on this host's DMA side and p2p
/// registry; every process was spawned here (or forked from one that was).
pub struct Host {
    topo: Arc<Topology>,
    phys: Arc<PhysMem>,
    dma: Arc<Dma>,
    p2p: Arc<P2pRegistry>,
    devices: Devices,
    processes: Arc<process::Table>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("topology", &self.topo.source())
            .field("devices", &self.devices)
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
        Self::build_shared(Arc::new(topo), cfg, devices)
    }

    /// [`Host::build`] on a topology already shared (a scenario plan's, a preset's).
    pub fn build_shared(
        topo: Arc<Topology>,
        cfg: &HostConfig,
        devices: &[DeviceSpec],
    ) -> Result<Self, HostError> {
        let phys = PhysMem::new(cfg.ram_bytes)?;
        let iommu = cfg.iommu.unwrap_or(topo.host().iommu.unwrap_or(false));
        let dma = Dma::new(topo.clone(), phys.clone(), iommu);
        let mut host = Host {
            p2p: P2pRegistry::new(&dma),
            topo,
            phys,
            dma,
            devices: Devices::default(),
            processes: process::Table::new(),
        };
        for d in devices {
            host.add_device(d)?;
        }
        Ok(host)
    }

    /// Probes one more device model (hot-plug).
    pub fn add_device(&mut self, spec: &DeviceSpec) -> Result<Arc<dyn Device>, HostError> {
        let bdf = spec.bdf();
        self.topo.find(&bdf.to_string())?;
        if self.devices.get_dyn(bdf).is_some() {
            return Err(HostError::Duplicate { dev: bdf });
        }
        let dev = spec.0.probe(&self.p2p)?;
        self.devices.insert(dev.clone());
        Ok(dev)
    }

    /// Hot-removes the device model at `bdf`: its p2p memory is retracted (zapped from
    /// every process, waited for up to `timeout`), then the model leaves the registry.
    /// On a timeout the model stays bound and removal may be tried again.
    pub fn remove_device(&mut self, bdf: Bdf, timeout: Option<Duration>) -> Result<(), HostError> {
        let dev = self
            .devices
            .get_dyn(bdf)
            .cloned()
            .ok_or(HostError::NoDevice { dev: bdf })?;
        dev.remove(&self.p2p, timeout)?;
        self.devices.remove(bdf);
        Ok(())
    }

    /// A GPU model (`drivers::gpu`) for every GPU-class endpoint of `topo`, with
    /// `vram_bytes` of VRAM when given, else the memory its topology entry states,
    /// else [`DEFAULT_VRAM`](crate::drivers::gpu::DEFAULT_VRAM).
    pub fn gpu_specs(topo: &Topology, vram_bytes: Option<u64>) -> Vec<DeviceSpec> {
        topo.functions()
            .iter()
            .filter(|f| f.kind == PortKind::Endpoint && f.device_class() == DeviceClass::Gpu)
            .map(|f| {
                crate::drivers::gpu::GpuSpec {
                    bdf: f.bdf,
                    vram_bytes: vram_bytes
                        .or(f.memory)
                        .unwrap_or(crate::drivers::gpu::DEFAULT_VRAM),
                }
                .into()
            })
            .collect()
    }

    /// An RDMA NIC model (`drivers::rnic`) with `caps` for every network-class
    /// endpoint of `topo`.
    pub fn rnic_specs(topo: &Topology, caps: crate::drivers::rnic::RnicCaps) -> Vec<DeviceSpec> {
        topo.functions()
            .iter()
            .filter(|f| f.kind == PortKind::Endpoint && f.device_class() == DeviceClass::Nic)
            .map(|f| crate::drivers::rnic::RnicSpec { bdf: f.bdf, caps }.into())
            .collect()
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
                NvmeSpec {
                    bdf: f.bdf,
                    config: NvmeConfig {
                        capacity,
                        cmb,
                        ..NvmeConfig::default()
                    },
                }
                .into()
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
    /// The p2p memory providers, whichever device registered them.
    pub fn p2p(&self) -> &Arc<P2pRegistry> {
        &self.p2p
    }
    /// The device models.
    pub fn devices(&self) -> &Devices {
        &self.devices
    }
    /// The device model at `bdf` when it is a `T` (`host.device::<Nvme>(bdf)`).
    pub fn device<T: Device>(&self, bdf: Bdf) -> Option<Arc<T>> {
        self.devices.get(bdf)
    }
    /// Every device model of type `T`, in BDF order.
    pub fn devices_of<T: Device>(&self) -> Vec<Arc<T>> {
        self.devices.of_type()
    }
    /// A new process with an empty address space. It runs until [`Process::exit`],
    /// whether or not its handle is kept.
    pub fn spawn(&self) -> Process {
        Process::spawn(&self.processes, &self.phys)
    }
    /// Shutdown: every process still running exits (in pid order), as at power-off
    /// after `kill -9` of everything. Handles kept elsewhere stay valid but name exited
    /// processes.
    pub fn exit_all(&self) {
        for mm in self.processes.take_running() {
            mm.exit();
        }
    }
    /// Published p2p memory providers.
    pub fn providers(&self) -> Vec<Arc<Provider>> {
        self.p2p.published()
    }
    /// `pci_p2pmem_find_many(clients)`: the published provider closest to all clients
    /// that every client can reach, ties broken by `seed`.
    pub fn find_p2pmem(&self, clients: &[Bdf], seed: u64) -> Option<Arc<Provider>> {
        self.p2p.find_many(clients, seed)
    }
}
