//! One device attached to the DMA side (the `struct device` a driver passes to every
//! DMA API call): its IOMMU domain, its live mappings, the limits its driver set (the
//! largest segment, the DMA mask), a cache of the fabric's verdicts for the providers
//! it reached, and its own statistics. Mapping and transfers are methods of the
//! handle, so a device model moves bytes only as the device it was attached as.

use std::collections::HashMap;

use crate::addr::{Bdf, PAGE_SIZE};
use crate::dma::{Counters, Dma, DmaError, DmaStats, LiveMap, TransferHook};
use crate::fabric::{calc_map_type_and_dist, FnId, Verdict};
use crate::iommu::Domain;
use crate::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use crate::sync::{order, Arc, OrderedRwLock};

/// The default largest segment (`dma_get_max_seg_size()` before a driver sets one).
pub const DEFAULT_MAX_SEGMENT: u64 = 64 << 10;

/// What one attached device keeps. Shared by every handle of the device.
pub(crate) struct DeviceState {
    pub(crate) bdf: Bdf,
    pub(crate) client: FnId,
    /// Its IOMMU domain, when the IOMMU translates.
    pub(crate) domain: Option<Arc<Domain>>,
    /// Live mappings by (first DMA address, mapping id). Lock order: after the
    /// page-table lock; transfers hold it shared only while they resolve.
    pub(crate) live: OrderedRwLock<LiveMap>,
    max_segment: AtomicU64,
    dma_mask: AtomicU64,
    /// The fabric's verdict per provider, computed once (the kernel caches it per
    /// provider/client pair in the provider's xarray).
    verdicts: OrderedRwLock<HashMap<Bdf, Arc<Verdict>>>,
    pub(crate) counters: Counters,
    hook: OrderedRwLock<Option<TransferHook>>,
    has_hook: AtomicBool,
}

impl DeviceState {
    pub(crate) fn new(bdf: Bdf, client: FnId, domain: Option<Arc<Domain>>) -> Self {
        DeviceState {
            bdf,
            client,
            domain,
            live: OrderedRwLock::new(&order::DMA_MAPPINGS, LiveMap::new()),
            max_segment: AtomicU64::new(DEFAULT_MAX_SEGMENT),
            dma_mask: AtomicU64::new(u64::MAX),
            verdicts: OrderedRwLock::new(&order::LEAF, HashMap::new()),
            counters: Counters::default(),
            hook: OrderedRwLock::new(&order::LEAF, None),
            has_hook: AtomicBool::new(false),
        }
    }
}

/// A device attached for DMA ([`Dma::attach`]). Cheap to clone; every clone is the
/// same device.
///
/// # Invariants
/// The device is a function of the host's fabric; its state is the one the host's
/// [`Dma`] keeps for that BDF, so two handles of one device see the same mappings,
/// limits and statistics.
#[derive(Clone)]
pub struct DmaDevice {
    pub(crate) dma: Arc<Dma>,
    pub(crate) state: Arc<DeviceState>,
}

impl std::fmt::Debug for DmaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaDevice")
            .field("bdf", &self.state.bdf)
            .field("iommu", &self.state.domain.as_ref().map(|d| d.group()))
            .finish()
    }
}

impl Dma {
    /// Attaches `dev` for DMA, or hands out another handle of it when attached already.
    /// ENODEV when the fabric has no such function.
    pub fn attach(self: &Arc<Self>, dev: Bdf) -> Result<DmaDevice, DmaError> {
        if let Some(state) = self.devices.read().get(&dev) {
            return Ok(DmaDevice {
                dma: self.clone(),
                state: state.clone(),
            });
        }
        let client = self.topo.lookup(dev).ok_or(DmaError::NoDevice { dev })?;
        let domain = self.iommu.domain(dev);
        let state = self
            .devices
            .write()
            .entry(dev)
            .or_insert_with(|| Arc::new(DeviceState::new(dev, client, domain)))
            .clone();
        Ok(DmaDevice {
            dma: self.clone(),
            state,
        })
    }
}

impl DmaDevice {
    /// The device.
    pub fn bdf(&self) -> Bdf {
        self.state.bdf
    }
    /// The host's DMA side.
    pub fn dma(&self) -> &Arc<Dma> {
        &self.dma
    }
    /// Its IOMMU domain, when the IOMMU translates.
    pub fn domain(&self) -> Option<&Arc<Domain>> {
        self.state.domain.as_ref()
    }
    /// The largest segment an SG table built for the device may hold
    /// (`dma_get_max_seg_size()`): 64 KiB unless its driver set more.
    pub fn max_segment(&self) -> u64 {
        self.state.max_segment.load(Ordering::Relaxed)
    }
    /// `dma_set_max_seg_size()`, as a driver calls it at probe (NVMe and most GPUs
    /// allow 4 GiB). At least one page.
    pub fn set_max_segment(&self, bytes: u64) {
        self.state
            .max_segment
            .store(bytes.max(PAGE_SIZE), Ordering::Relaxed);
    }
    /// The highest address the device can put on the bus (`dma_get_mask()`). All
    /// 64 bits unless its driver narrowed it (peerdma's devices are 64-bit capable;
    /// the kernel starts from 32 bits and drivers widen it at probe).
    pub fn dma_mask(&self) -> u64 {
        self.state.dma_mask.load(Ordering::Relaxed)
    }
    /// `dma_set_mask()`: `bits` of address the device can drive, 12 to 64. A mapping
    /// whose address would not fit is refused with EIO, as `dma_map_sgtable()` does
    /// when it cannot bounce.
    pub fn set_dma_mask(&self, bits: u32) -> Result<(), DmaError> {
        if !(12..=64).contains(&bits) {
            return Err(DmaError::BadMask {
                dev: self.bdf(),
                bits,
            });
        }
        let mask = if bits == 64 {
            u64::MAX
        } else {
            (1u64 << bits) - 1
        };
        self.state.dma_mask.store(mask, Ordering::Relaxed);
        Ok(())
    }
    /// Bytes this device moved by path, and its mapping counts.
    pub fn stats(&self) -> DmaStats {
        self.state.counters.snapshot()
    }
    /// Its live mappings (segments).
    pub fn live_mappings(&self) -> usize {
        self.state.live.read().len()
    }

    /// The fabric's verdict for reaching `provider`'s memory from this device, cached.
    pub fn verdict(&self, provider: Bdf) -> Result<Arc<Verdict>, DmaError> {
        if let Some(v) = self.state.verdicts.read().get(&provider) {
            return Ok(v.clone());
        }
        let p = self
            .dma
            .topo
            .lookup(provider)
            .ok_or(DmaError::NoDevice { dev: provider })?;
        let v = Arc::new(calc_map_type_and_dist(&self.dma.topo, p, self.state.client));
        self.state.verdicts.write().insert(provider, v.clone());
        Ok(v)
    }

    /// Runs `hook` in the middle of every transfer of the device from now on — after
    /// the transfer is checked and counted in flight on its mappings, before any byte
    /// moves — or stops with `None`. For fault injection and for tests that need a
    /// transfer to stand still (an unmap of another mapping must not wait for it).
    pub fn set_transfer_hook(&self, hook: Option<TransferHook>) {
        let mut h = self.state.hook.write();
        self.state.has_hook.store(hook.is_some(), Ordering::SeqCst);
        *h = hook;
    }

    pub(crate) fn run_transfer_hook(&self) {
        if !self.state.has_hook.load(Ordering::Relaxed) {
            return;
        }
        let hook = self.state.hook.read().clone();
        if let Some(h) = hook {
            h();
        }
    }

    /// Adds `n` to one counter, the device's and the host's.
    pub(crate) fn count(&self, which: impl Fn(&Counters) -> &AtomicU64, n: u64) {
        which(&self.state.counters).fetch_add(n, Ordering::Relaxed);
        which(&self.dma.counters).fetch_add(n, Ordering::Relaxed);
    }
}
