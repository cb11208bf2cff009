//! Peer-to-peer memory providers (drivers/pci/p2pdma.c, provider side): a device
//! publishes part of a BAR as p2p memory (`pci_p2pdma_add_resource`), which becomes a
//! p2p device page map with its bus offset and an allocator over it (the genalloc
//! pool); clients allocate from it (`pci_alloc_p2pmem`) or a process maps fresh
//! allocations of it the way the sysfs `p2pmem/allocate` file does. Removing the device
//! refuses new allocations and mappings, zaps the provider's pages out of every
//! process that maps them (the VMAs stay, as `unmap_mapping_range()` leaves them), and
//! waits — woken by the last page reference, not polling — for every reference to
//! drop; a long-lived pin holds removal up, and the report names who.
//!
//! Removal is ordered against new users: allocation and mmap hold the provider's state
//! lock shared from the "removing" check until the mapping is recorded, and removal
//! takes it exclusively to set the flag, so every mapping is either refused or
//! recorded before removal looks. A fork copies a mapping while holding the parent's
//! address-space lock, and records the child before releasing it; removal zaps the
//! parent under that same lock and then looks again, until a pass finds no address
//! space it has not zapped.

mod registry;

pub use registry::P2pRegistry;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::addr::{Bdf, BusAddr, Pfn, VirtAddr, PAGE_SIZE};
use crate::dma::Dma;
use crate::errno::Errno;
use crate::mem::{MemError, Region, RegionKind};
use crate::mm::{Mm, MmError, MmId, PagesOwner, PagesOwnerRef, Prot};
use crate::sync::atomic::{AtomicBool, Ordering};
use crate::sync::{order, OrderedMutex, OrderedRwLock};
use crate::sync::{Arc, Weak};

/// What a provider can refuse, with the kernel's error number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum P2pError {
    /// A malformed request (EINVAL).
    #[error("p2pmem of {dev}: invalid argument (EINVAL): {why}")]
    Invalid {
        /// The provider.
        dev: Bdf,
        /// Why.
        why: String,
    },
    /// The pool is exhausted (ENOMEM).
    #[error(
        "p2pmem of {dev}: out of memory (ENOMEM): {bytes:#x} bytes asked, {available:#x} available"
    )]
    NoMemory {
        /// The provider.
        dev: Bdf,
        /// Bytes asked for.
        bytes: u64,
        /// Bytes free.
        available: u64,
    },
    /// The device is going away (ENODEV).
    #[error("p2pmem of {dev}: the device is being removed (ENODEV)")]
    NoDevice {
        /// The provider.
        dev: Bdf,
    },
    /// Removal timed out waiting for page references (EBUSY).
    #[error("p2pmem of {dev}: removal waits on {frames} referenced frames ({pinned} DMA-pinned); live DMA mappings by: {holders}")]
    Busy {
        /// The provider.
        dev: Bdf,
        /// Frames still referenced.
        frames: u64,
        /// Of those, pinned.
        pinned: u64,
        /// Devices holding DMA mappings of them.
        holders: String,
    },
    /// The page map could not be set up or an allocation failed oddly.
    #[error("p2pmem of {dev}: the page map refused")]
    Mem {
        /// The provider.
        dev: Bdf,
        /// The memory layer's refusal.
        source: MemError,
    },
    /// The address space refused.
    #[error(transparent)]
    Mm(#[from] MmError),
}

impl P2pError {
    /// The kernel's error number.
    pub fn errno(&self) -> Errno {
        match self {
            P2pError::Invalid { .. } => Errno::EINVAL,
            P2pError::NoMemory { .. } => Errno::ENOMEM,
            P2pError::NoDevice { .. } => Errno::ENODEV,
            P2pError::Busy { .. } => Errno::EBUSY,
            P2pError::Mem { source, .. } => source.errno(),
            P2pError::Mm(e) => e.errno(),
        }
    }
}

/// One BAR range published (or not) as p2p memory.
///
/// # Invariants
/// Every allocated frame of `region` is mapped only by address spaces in `users`, held
/// by a [`P2pAlloc`], or referenced by a pin or DMA user. Once `removing` is set no
/// frame is allocated again.
pub struct Provider {
    dev: Bdf,
    bar: u8,
    bus: BusAddr,
    region: Arc<Region>,
    dma: Arc<Dma>,
    published: AtomicBool,
    /// Whether removal has begun. Lock order: before the address-space lock (mmap
    /// holds it shared across the mapping); removal holds it exclusively only to set it.
    removing: OrderedRwLock<bool>,
    /// Address spaces that mapped this provider's pages, or inherited such a mapping
    /// by fork: removal zaps each. One entry per address space, dead ones pruned as it
    /// grows. Lock order: a leaf.
    users: OrderedMutex<Users>,
}

/// The address spaces that may map a provider's pages.
#[derive(Default)]
struct Users {
    by_mm: HashMap<MmId, Weak<Mm>>,
    /// Size after the last pruning; prune again when it doubles.
    pruned_at: usize,
}

impl Users {
    fn add(&mut self, mm: &Arc<Mm>) {
        self.by_mm
            .entry(mm.id())
            .or_insert_with(|| Arc::downgrade(mm));
        if self.by_mm.len() > 2 * self.pruned_at.max(16) {
            self.by_mm.retain(|_, w| w.strong_count() > 0);
            self.pruned_at = self.by_mm.len();
        }
    }
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("dev", &self.dev)
            .field("bar", &self.bar)
            .finish()
    }
}

impl Provider {
    /// `pci_p2pdma_add_resource(dev, bar, size, offset)`: `size` bytes of BAR `bar` from
    /// `offset` (size 0: the rest of the BAR) become p2p memory. Devices of a host go
    /// through [`P2pRegistry::add_resource`], which also lists the provider.
    pub(crate) fn add_resource(
        dma: &Arc<Dma>,
        dev: Bdf,
        bar: u8,
        size: u64,
        offset: u64,
    ) -> Result<Arc<Self>, P2pError> {
        let bad = |why: String| P2pError::Invalid { dev, why };
        let topo = dma.topology();
        let f = topo
            .lookup(dev)
            .map(|id| topo.function(id))
            .ok_or_else(|| bad("no such function in the fabric".into()))?;
        let b = f
            .bars
            .iter()
            .find(|b| b.index == bar && !b.io)
            .ok_or_else(|| bad(format!("BAR {bar} is not a memory BAR")))?;
        let size = if size == 0 {
            b.size.saturating_sub(offset)
        } else {
            size
        };
        if size == 0 || offset.checked_add(size).is_none_or(|e| e > b.size) {
            return Err(bad(format!(
                "{size:#x} bytes at offset {offset:#x} do not fit BAR {bar} of {:#x} bytes",
                b.size
            )));
        }
        if !size.is_multiple_of(PAGE_SIZE) || !offset.is_multiple_of(PAGE_SIZE) {
            return Err(bad("size and offset must be page multiples".into()));
        }
        let bus = BusAddr(b.bus.0 + offset);
        // The region's frames get physical addresses in the host's map; the bus address
        // a peer uses is the BAR's: the difference is the region's bus offset.
        let region = dma
            .phys()
            .memremap_pages_with(size, |base| RegionKind::P2p {
                provider: dev,
                bar,
                bus_offset: bus.0.wrapping_sub(base.addr().0),
            })
            .map_err(|source| P2pError::Mem { dev, source })?;
        let RegionKind::P2p { bus_offset, .. } = *region.kind() else {
            unreachable!("made as p2p above")
        };
        debug_assert_eq!(region.base().addr().0.wrapping_add(bus_offset), bus.0);
        Ok(Arc::new(Provider {
            dev,
            bar,
            bus,
            region,
            dma: dma.clone(),
            published: AtomicBool::new(false),
            removing: OrderedRwLock::new(&order::P2P_STATE, false),
            users: OrderedMutex::new(&order::LEAF, Users::default()),
        }))
    }

    /// The providing function.
    pub fn dev(&self) -> Bdf {
        self.dev
    }
    /// The BAR.
    pub fn bar(&self) -> u8 {
        self.bar
    }
    /// The bus address of the first byte.
    pub fn bus_addr(&self) -> BusAddr {
        self.bus
    }
    /// The p2p page map.
    pub fn region(&self) -> &Arc<Region> {
        &self.region
    }
    /// `pci_p2pmem_publish`: whether clients looking for p2p memory may find it.
    pub fn publish(&self, on: bool) {
        self.published.store(on, Ordering::Release);
    }
    /// Whether it is published (sysfs `p2pmem/published`).
    pub fn published(&self) -> bool {
        self.published.load(Ordering::Acquire)
    }
    /// Bytes in the pool (sysfs `p2pmem/size`).
    pub fn size(&self) -> u64 {
        self.region.frames() * PAGE_SIZE
    }
    /// Bytes free (sysfs `p2pmem/available`).
    pub fn available(&self) -> u64 {
        self.region.free_frames() * PAGE_SIZE
    }

    /// Allocates contiguous frames; the caller holds `removing` shared and saw it clear.
    fn alloc_frames(&self, bytes: u64) -> Result<Pfn, P2pError> {
        let pages = bytes.div_ceil(PAGE_SIZE).max(1);
        self.region.alloc_contig(pages, 1).map_err(|e| match e {
            MemError::NoMemory { .. } => P2pError::NoMemory {
                dev: self.dev,
                bytes,
                available: self.available(),
            },
            source => P2pError::Mem {
                dev: self.dev,
                source,
            },
        })
    }

    /// `pci_alloc_p2pmem(dev, size)`: contiguous p2p memory for a kernel client.
    /// ENODEV once removal has begun.
    pub fn alloc(self: &Arc<Self>, bytes: u64) -> Result<P2pAlloc, P2pError> {
        let removing = self.removing.read();
        if *removing {
            return Err(P2pError::NoDevice { dev: self.dev });
        }
        let first = self.alloc_frames(bytes)?;
        let frames: Vec<Pfn> = (0..bytes.div_ceil(PAGE_SIZE).max(1))
            .map(|i| Pfn(first.0 + i))
            .collect();
        self.region.mark_owned(&frames);
        Ok(P2pAlloc {
            provider: self.clone(),
            first,
            pages: bytes.div_ceil(PAGE_SIZE).max(1),
        })
    }

    /// mmap of the sysfs `p2pmem/allocate` file: each call is a fresh allocation of
    /// `len` bytes mapped into `mm`. Only a shared mapping at offset 0 is allowed
    /// (EINVAL otherwise); ENODEV once removal has begun. The pages go back to the pool
    /// when the last reference to them (the mapping, a pin) drops.
    pub fn mmap(
        self: &Arc<Self>,
        mm: &Arc<Mm>,
        len: u64,
        shared: bool,
        offset: u64,
        prot: Prot,
    ) -> Result<VirtAddr, P2pError> {
        if !shared {
            return Err(P2pError::Invalid {
                dev: self.dev,
                why: "p2pmem must be mapped MAP_SHARED".into(),
            });
        }
        if offset != 0 {
            return Err(P2pError::Invalid {
                dev: self.dev,
                why: "p2pmem can only be mapped at offset 0".into(),
            });
        }
        // Held until the mapping is recorded: removal cannot begin in between.
        let removing = self.removing.read();
        if *removing {
            return Err(P2pError::NoDevice { dev: self.dev });
        }
        let first = self.alloc_frames(len)?;
        let pages = len.div_ceil(PAGE_SIZE).max(1);
        let frames: Vec<Pfn> = (0..pages).map(|i| Pfn(first.0 + i)).collect();
        self.users.lock().add(mm);
        let owner = PagesOwnerRef(self.clone());
        let mapped = mm.mmap_pages(&frames, prot, Some(owner));
        // The mapping took its own references; the allocation's go back.
        self.region.put_many(&frames);
        drop(removing);
        Ok(mapped?)
    }

    /// Removes the device: new allocations and mappings fail with ENODEV, the
    /// provider's pages are zapped from every address space that maps them (their VMAs
    /// stay; an access then faults with EFAULT), then waits for every page reference to
    /// drop (a pin held for DMA holds it up). With a `timeout`, gives up with EBUSY
    /// naming what still holds pages; the provider stays half-removed and `remove` may
    /// be called again.
    pub fn remove(&self, timeout: Option<Duration>) -> Result<(), P2pError> {
        tracing::info!(dev = %self.dev, bar = self.bar, "p2pmem: removing");
        *self.removing.write() = true;
        self.publish(false);
        let mut zapped: HashSet<MmId> = HashSet::new();
        loop {
            let todo: Vec<Arc<Mm>> = self
                .users
                .lock()
                .by_mm
                .iter()
                .filter(|(id, _)| !zapped.contains(id))
                .filter_map(|(_, w)| w.upgrade())
                .collect();
            if todo.is_empty() {
                break;
            }
            for mm in todo {
                mm.zap_device_pages(&self.region)?;
                zapped.insert(mm.id());
            }
        }
        self.users.lock().by_mm.clear();
        if !self.region.wait_until_free(timeout) {
            let region = self.region.clone();
            let (mut frames, mut pinned) = (0, 0);
            for i in 0..region.frames() {
                let p = Pfn(region.base().0 + i);
                let m = region.meta(p);
                if m.refcount() > 0 {
                    frames += 1;
                    pinned += u64::from(m.pincount() > 0);
                }
            }
            let holders: Vec<String> = self
                .dma
                .holders(|p| region.contains(p))
                .iter()
                .map(Bdf::to_string)
                .collect();
            return Err(P2pError::Busy {
                dev: self.dev,
                frames,
                pinned,
                holders: if holders.is_empty() {
                    "none".into()
                } else {
                    holders.join(", ")
                },
            });
        }
        // Every frame is free; the only refusal left is a region already gone (a
        // second remove), which is fine.
        let _ = self.dma.phys().memunmap_pages(self.region.id());
        Ok(())
    }

    /// Recorded address spaces that are still alive.
    pub fn live_users(&self) -> usize {
        self.users
            .lock()
            .by_mm
            .values()
            .filter(|w| w.strong_count() > 0)
            .count()
    }

    /// Address spaces recorded as possibly mapping this provider's pages (for leak
    /// checks: bounded by the live address spaces, not by how often they mapped).
    pub fn recorded_users(&self) -> usize {
        self.users.lock().by_mm.len()
    }
}

impl PagesOwner for Provider {
    /// A fork copied one of this provider's user mappings: revoke that copy on removal
    /// too.
    fn forked(&self, child: &Arc<Mm>, _start: VirtAddr, _len: u64) {
        self.users.lock().add(child);
    }
}

/// Contiguous p2p memory held by a kernel client; dropping it frees it
/// (`pci_free_p2pmem`).
pub struct P2pAlloc {
    provider: Arc<Provider>,
    first: Pfn,
    pages: u64,
}

impl P2pAlloc {
    /// The first frame.
    pub fn pfn(&self) -> Pfn {
        self.first
    }
    /// Pages held.
    pub fn pages(&self) -> u64 {
        self.pages
    }
    /// The bus address of its first byte (`pci_p2pmem_virt_to_bus`).
    pub fn bus_addr(&self) -> BusAddr {
        BusAddr(self.provider.bus.0 + (self.first.0 - self.provider.region.base().0) * PAGE_SIZE)
    }
    /// The provider.
    pub fn provider(&self) -> &Arc<Provider> {
        &self.provider
    }
    /// Maps `pages` of the allocation from page `pgoff` into `mm` (what an exporter of
    /// p2p memory does for a CPU mmap of its buffer): shared, revoked with the rest of
    /// the provider's user mappings on removal. EINVAL past the allocation; ENODEV once
    /// removal has begun.
    pub fn mmap(
        &self,
        mm: &Arc<Mm>,
        pgoff: u64,
        pages: u64,
        prot: Prot,
    ) -> Result<VirtAddr, P2pError> {
        let p = &self.provider;
        if pgoff.checked_add(pages).is_none_or(|e| e > self.pages) || pages == 0 {
            return Err(P2pError::Invalid {
                dev: p.dev,
                why: format!("{pages} pages from page {pgoff} run past the allocation"),
            });
        }
        let removing = p.removing.read();
        if *removing {
            return Err(P2pError::NoDevice { dev: p.dev });
        }
        let frames: Vec<Pfn> = (0..pages).map(|i| Pfn(self.first.0 + pgoff + i)).collect();
        p.users.lock().add(mm);
        let mapped = mm.mmap_pages(&frames, prot, Some(PagesOwnerRef(p.clone())));
        drop(removing);
        Ok(mapped?)
    }
}

impl Drop for P2pAlloc {
    fn drop(&mut self) {
        let frames: Vec<Pfn> = (0..self.pages).map(|i| Pfn(self.first.0 + i)).collect();
        self.provider.region.put_owned(&frames);
    }
}
