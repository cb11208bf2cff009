//! The host's p2p memory providers, whichever device's BAR they live in: the list
//! `pci_p2pmem_find_many()` searches (the kernel walks every PCI device's `p2pdma`
//! state; here a device adds its resources through the registry at probe).

use crate::addr::Bdf;
use crate::dma::Dma;
use crate::fabric::find_closest_provider;
use crate::p2pmem::{P2pError, Provider};
use crate::sync::{order, Arc, OrderedRwLock};

/// Every p2p provider registered on one host, published or not.
///
/// # Invariants
/// Each provider is listed once, in registration order; a removed provider's entry is
/// dropped once its removal completed.
pub struct P2pRegistry {
    dma: Arc<Dma>,
    /// Lock order: a leaf.
    providers: OrderedRwLock<Vec<Arc<Provider>>>,
}

impl std::fmt::Debug for P2pRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("P2pRegistry")
            .field("providers", &self.providers.read().len())
            .finish()
    }
}

impl P2pRegistry {
    /// An empty registry for the host `dma` belongs to.
    pub fn new(dma: &Arc<Dma>) -> Arc<Self> {
        Arc::new(P2pRegistry {
            dma: dma.clone(),
            providers: OrderedRwLock::new(&order::LEAF, Vec::new()),
        })
    }

    /// `pci_p2pdma_add_resource(dev, bar, size, offset)`: `size` bytes of BAR `bar` of
    /// `dev` from `offset` (0: the rest of the BAR) become p2p memory, registered
    /// here and not yet published.
    pub fn add_resource(
        &self,
        dev: Bdf,
        bar: u8,
        size: u64,
        offset: u64,
    ) -> Result<Arc<Provider>, P2pError> {
        let p = Provider::add_resource(&self.dma, dev, bar, size, offset)?;
        self.providers.write().push(p.clone());
        Ok(p)
    }

    /// The DMA side of the host.
    pub fn dma(&self) -> &Arc<Dma> {
        &self.dma
    }

    /// Every registered provider.
    pub fn providers(&self) -> Vec<Arc<Provider>> {
        self.providers.read().clone()
    }

    /// The published providers (those `pci_p2pmem_find_many` may hand out).
    pub fn published(&self) -> Vec<Arc<Provider>> {
        self.providers
            .read()
            .iter()
            .filter(|p| p.published())
            .cloned()
            .collect()
    }

    /// The providers of one device.
    pub fn of(&self, dev: Bdf) -> Vec<Arc<Provider>> {
        self.providers
            .read()
            .iter()
            .filter(|p| p.dev() == dev)
            .cloned()
            .collect()
    }

    /// `pci_p2pmem_find_many(clients)`: the published provider closest to all
    /// `clients` that every client can reach, ties broken by `seed`.
    pub fn find_many(&self, clients: &[Bdf], seed: u64) -> Option<Arc<Provider>> {
        let topo = self.dma.topology();
        let providers = self.published();
        let ids: Vec<_> = providers
            .iter()
            .filter_map(|p| topo.lookup(p.dev()))
            .collect();
        let clients: Vec<_> = clients.iter().filter_map(|c| topo.lookup(*c)).collect();
        let best = find_closest_provider(topo, &ids, &clients, seed)?;
        let bdf = topo.function(best).bdf;
        providers.into_iter().find(|p| p.dev() == bdf)
    }

    /// Removes every provider of `dev` ([`Provider::remove`]) and drops them from the
    /// registry once removed; a provider whose removal timed out stays listed.
    pub fn remove_device(
        &self,
        dev: Bdf,
        timeout: Option<std::time::Duration>,
    ) -> Result<(), P2pError> {
        for p in self.of(dev) {
            p.remove(timeout)?;
            self.providers.write().retain(|q| !Arc::ptr_eq(q, &p));
        }
        Ok(())
    }
}
