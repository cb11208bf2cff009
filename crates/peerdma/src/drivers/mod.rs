//! Device models that move real bytes, reaching the subsystem only through the calls a
//! driver would use: DMA mappings, the DMA engine, p2p memory providers.
//!
//! Every model implements [`Device`]; a host binds models to endpoints by their
//! [`Probe`] specs and keeps them in a [`Devices`] registry by BDF, from which a caller
//! gets a model back by type. Adding a model is a new module here: the host does not
//! change.

pub mod dmirror;
pub mod gpu;
mod mirror;
pub mod nvme;
pub mod rnic;

use std::any::Any;
use std::collections::BTreeMap;
use std::time::Duration;

use crate::addr::Bdf;
use crate::errno::Errno;
use crate::p2pmem::{P2pError, P2pRegistry, Provider};
use crate::sync::Arc;

/// A device model bound to one PCI function.
pub trait Device: Any + Send + Sync + std::fmt::Debug {
    /// Its function.
    fn bdf(&self) -> Bdf;
    /// What it is ("nvme", "gpu", "rnic"), for reports.
    fn kind(&self) -> &'static str;
    /// The p2p memory it registered, published or not.
    fn providers(&self) -> Vec<Arc<Provider>> {
        Vec::new()
    }
    /// Hot removal (`pci_stop_and_remove_bus_device`): stop handing out memory and wait
    /// — up to `timeout` — until nobody uses what it provided. The default removes its
    /// p2p providers.
    fn remove(&self, p2p: &P2pRegistry, timeout: Option<Duration>) -> Result<(), P2pError> {
        p2p.remove_device(self.bdf(), timeout)
    }
}

/// A driver probe failed; the source is the model's own error.
#[derive(Debug, thiserror::Error)]
#[error("{kind} at {dev} failed to probe")]
pub struct ProbeError {
    /// The function.
    pub dev: Bdf,
    /// The model.
    pub kind: &'static str,
    /// The model's error number.
    pub errno: Errno,
    /// The model's error.
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// How to bring one device model up on a host (its driver's probe with the model's
/// configuration).
pub trait Probe: std::fmt::Debug + Send + Sync {
    /// The function to bind to.
    fn bdf(&self) -> Bdf;
    /// Brings the model up: attaches it for DMA, registers its p2p memory.
    fn probe(&self, p2p: &Arc<P2pRegistry>) -> Result<Arc<dyn Device>, ProbeError>;
}

/// The device models of one host by BDF.
///
/// # Invariants
/// At most one model per function; each model's [`Device::bdf`] is its key.
#[derive(Default, Debug)]
pub struct Devices {
    by_bdf: BTreeMap<Bdf, Arc<dyn Device>>,
}

impl Devices {
    /// Adds `dev`; false (and nothing changes) when its function has a model already.
    pub fn insert(&mut self, dev: Arc<dyn Device>) -> bool {
        let bdf = dev.bdf();
        if self.by_bdf.contains_key(&bdf) {
            return false;
        }
        self.by_bdf.insert(bdf, dev);
        true
    }
    /// Drops the model of `bdf` from the registry and returns it.
    pub fn remove(&mut self, bdf: Bdf) -> Option<Arc<dyn Device>> {
        self.by_bdf.remove(&bdf)
    }
    /// The model at `bdf`, whatever it is.
    pub fn get_dyn(&self, bdf: Bdf) -> Option<&Arc<dyn Device>> {
        self.by_bdf.get(&bdf)
    }
    /// The model at `bdf` when it is a `T`.
    pub fn get<T: Device>(&self, bdf: Bdf) -> Option<Arc<T>> {
        downcast(self.by_bdf.get(&bdf)?)
    }
    /// Every model of type `T`, in BDF order.
    pub fn of_type<T: Device>(&self) -> Vec<Arc<T>> {
        self.by_bdf.values().filter_map(downcast).collect()
    }
    /// Every model in BDF order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn Device>> {
        self.by_bdf.values()
    }
    /// How many.
    pub fn len(&self) -> usize {
        self.by_bdf.len()
    }
    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_bdf.is_empty()
    }
}

fn downcast<T: Device>(d: &Arc<dyn Device>) -> Option<Arc<T>> {
    let any: Arc<dyn Any + Send + Sync> = d.clone();
    any.downcast::<T>().ok()
}
