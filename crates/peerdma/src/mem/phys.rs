//! The host's physical address space: system RAM at frame 0 and device page maps
//! registered at run time above it, each at a 1 GiB-aligned base, with lookup from a
//! frame number to its region.

use crate::addr::{Pfn, PAGE_SIZE};
use crate::mem::region::{Region, RegionId, RegionKind};
use crate::mem::MemError;
use crate::sync::atomic::{AtomicU64, Ordering};
use crate::sync::Arc;
use crate::sync::{order, OnceLock, OrderedRwLock};

const REGION_ALIGN_FRAMES: u64 = 1 << 18; // 1 GiB

/// All physical memory of one emulated host.
///
/// # Invariants
/// `regions` is sorted by base and the regions' frame ranges are disjoint; region 0 is
/// system RAM and is never removed; RAM frame 0 is allocated for good.
pub struct PhysMem {
    /// Registered regions. Lock order: a leaf; never held while calling out.
    regions: OrderedRwLock<Vec<Arc<Region>>>,
    ram: Arc<Region>,
    ids: AtomicU64,
    /// Host-wide state of a layer above (mm's list of address spaces), opaque here so
    /// that this layer never names those above it.
    upper: OnceLock<Arc<dyn std::any::Any + Send + Sync>>,
}

impl std::fmt::Debug for PhysMem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PhysMem")
            .field("regions", &*self.regions.read())
            .finish()
    }
}

/// The shared zero page (`ZERO_PAGE(0)`): a reserved RAM frame that is never written.
/// A read fault on never-touched private anonymous memory maps it read-only; the first
/// write replaces it with a page of the address space's own.
pub const ZERO_PFN: Pfn = Pfn(1);

/// Whether `pfn` is the shared zero page (`is_zero_pfn`).
pub fn is_zero_pfn(pfn: Pfn) -> bool {
    pfn == ZERO_PFN
}

impl PhysMem {
    /// A host with `ram_bytes` of system RAM (rounded up to whole pages).
    pub fn new(ram_bytes: u64) -> Result<Arc<Self>, MemError> {
        let ram = Arc::new(Region::new(
            RegionId(0),
            RegionKind::SystemRam,
            Pfn(0),
            ram_bytes.div_ceil(PAGE_SIZE).max(3),
        )?);
        // Frame 0 stays reserved, as page 0 is on x86 (the firmware's): no DMA or
        // physical address handed out is ever zero. Frame 1 is the shared zero page.
        for want in [Pfn(0), ZERO_PFN] {
            let reserved = ram.alloc()?;
            debug_assert_eq!(reserved, want);
            ram.meta(reserved).set(crate::mem::flags::RESERVED);
        }
        Ok(Arc::new(PhysMem {
            regions: OrderedRwLock::new(&order::PHYS_REGIONS, vec![ram.clone()]),
            ram,
            ids: AtomicU64::new(1),
            upper: OnceLock::new(),
        }))
    }

    /// A fresh host-wide id (for address spaces and other per-host objects).
    pub fn next_id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed)
    }

    /// The state a layer above keeps per host, made by `init` on first use.
    pub fn upper_or_init(
        &self,
        init: impl FnOnce() -> Arc<dyn std::any::Any + Send + Sync>,
    ) -> &Arc<dyn std::any::Any + Send + Sync> {
        self.upper.get_or_init(init)
    }

    /// System RAM.
    pub fn ram(&self) -> &Arc<Region> {
        &self.ram
    }

    /// Registers `bytes` of device memory of `kind` (`memremap_pages()`).
    pub fn memremap_pages(&self, kind: RegionKind, bytes: u64) -> Result<Arc<Region>, MemError> {
        self.memremap_pages_with(bytes, |_| kind)
    }

    /// Registers `bytes` of device memory whose kind depends on where it lands:
    /// `kind_at` gets the region's first frame (a p2p region's bus offset is the BAR's
    /// bus address minus that frame's physical address).
    pub fn memremap_pages_with(
        &self,
        bytes: u64,
        kind_at: impl FnOnce(Pfn) -> RegionKind,
    ) -> Result<Arc<Region>, MemError> {
        let frames = bytes.div_ceil(PAGE_SIZE);
        let mut regions = self.regions.write();
        let last = regions.last().map_or(0, |r| r.base().0 + r.frames());
        let base = Pfn(last.next_multiple_of(REGION_ALIGN_FRAMES));
        let kind = kind_at(base);
        if kind == RegionKind::SystemRam {
            return Err(MemError::Invalid {
                what: "memremap_pages of system RAM".into(),
            });
        }
        let id = RegionId(regions.iter().map(|r| r.id().0).max().unwrap_or(0) + 1);
        let region = Arc::new(Region::new(id, kind, base, frames)?);
        regions.push(region.clone());
        Ok(region)
    }

    /// Removes a device region (`memunmap_pages()`); refused while any frame of it is
    /// still allocated.
    pub fn memunmap_pages(&self, id: RegionId) -> Result<(), MemError> {
        let mut regions = self.regions.write();
        let pos = regions
            .iter()
            .position(|r| r.id() == id && id != RegionId(0))
            .ok_or(MemError::Invalid {
                what: format!("no device region {id:?}"),
            })?;
        let r = &regions[pos];
        if r.free_frames() != r.frames() {
            return Err(MemError::Busy {
                what: format!(
                    "{} still has {} frames in use",
                    r.kind(),
                    r.frames() - r.free_frames()
                ),
            });
        }
        regions.remove(pos);
        Ok(())
    }

    /// The region holding `pfn`.
    pub fn region(&self, pfn: Pfn) -> Option<Arc<Region>> {
        let regions = self.regions.read();
        let i = regions.partition_point(|r| r.base().0 <= pfn.0);
        let r = regions.get(i.checked_sub(1)?)?;
        r.contains(pfn).then(|| r.clone())
    }

    /// The region holding `pfn`, or an error naming it.
    pub fn region_of(&self, pfn: Pfn) -> Result<Arc<Region>, MemError> {
        self.region(pfn).ok_or(MemError::NoSuchFrame { pfn })
    }

    /// Every region, RAM first.
    pub fn regions(&self) -> Vec<Arc<Region>> {
        self.regions.read().clone()
    }

    /// Bytes of frame metadata allocated across all regions.
    pub fn metadata_bytes(&self) -> u64 {
        self.regions.read().iter().map(|r| r.metadata_bytes()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_regions_sit_above_ram_and_are_found_by_pfn() {
        let pm = PhysMem::new(64 << 20).unwrap();
        let dev = pm
            .memremap_pages(RegionKind::DevicePrivate { owner: 7 }, 16 << 20)
            .unwrap();
        assert!(dev.base().0 >= pm.ram().frames());
        assert_eq!(dev.base().0 % REGION_ALIGN_FRAMES, 0);
        let f = dev.alloc().unwrap();
        assert_eq!(pm.region(f).unwrap().id(), dev.id());
        let r = pm.ram().alloc().unwrap();
        assert_eq!(pm.region(r).unwrap().id(), RegionId(0));
        assert!(
            pm.region(Pfn(pm.ram().frames())).is_none(),
            "the gap is nobody's"
        );
        assert!(matches!(
            pm.memunmap_pages(dev.id()),
            Err(MemError::Busy { .. })
        ));
        dev.put(f);
        pm.memunmap_pages(dev.id()).unwrap();
        assert!(pm.region(f).is_none());
    }

    #[test]
    fn freed_frames_come_back_zeroed_with_a_new_generation() {
        let pm = PhysMem::new(1 << 20).unwrap();
        let ram = pm.ram();
        let f = ram.alloc().unwrap();
        let gen = ram.meta(f).generation();
        ram.write(f, 100, b"secret");
        assert!(ram.put(f));
        let g = ram.alloc().unwrap();
        assert_eq!(g, f, "first fit reuses the frame");
        assert_eq!(ram.meta(g).generation(), gen + 1);
        let mut buf = [1u8; 6];
        ram.read(g, 100, &mut buf);
        assert_eq!(buf, [0; 6]);
    }

    #[test]
    fn pins_keep_a_frame_alive_and_are_exact() {
        let pm = PhysMem::new(1 << 20).unwrap();
        let ram = pm.ram();
        let f = ram.alloc().unwrap();
        ram.pin(f);
        assert!(ram.maybe_dma_pinned(f));
        assert!(!ram.put(f), "the pin still holds it");
        assert_eq!((ram.meta(f).refcount(), ram.meta(f).pincount()), (1, 1));
        assert!(ram.unpin(f), "the unpin drops the last reference");
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "put_page on free frame")]
    fn freeing_a_free_frame_is_caught() {
        let pm = PhysMem::new(1 << 20).unwrap();
        let f = pm.ram().alloc().unwrap();
        pm.ram().put(f);
        pm.ram().put(f);
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "freed while DMA-pinned")]
    fn freeing_a_pinned_frame_is_caught() {
        // An unbalanced put that would drop the reference a pin holds.
        let pm = PhysMem::new(1 << 20).unwrap();
        let f = pm.ram().alloc().unwrap();
        pm.ram().pin(f);
        pm.ram().put(f);
        pm.ram().put(f);
    }

    #[test]
    fn a_terabyte_device_region_costs_only_what_is_touched() {
        let pm = PhysMem::new(1 << 20).unwrap();
        let dev = pm
            .memremap_pages(RegionKind::DeviceCoherent { owner: 1 }, 1 << 40)
            .unwrap();
        let before = pm.metadata_bytes();
        let f = dev.alloc_contig(4, 4).unwrap();
        dev.write(f, 0, &[9; 16]);
        let after = pm.metadata_bytes();
        assert!(
            after - before <= 16 << 20,
            "one section, not a terabyte's worth: {}",
            after - before
        );
    }

    #[test]
    fn a_count_at_its_limit_refuses_another_grab_and_changes_nothing() {
        use crate::mem::frame::REF_LIMIT;
        let pm = PhysMem::new(1 << 20).unwrap();
        let ram = pm.ram();
        let f = ram.alloc().unwrap();
        assert!(ram.try_grab(f, true));
        let m = ram.meta(f);
        // Pretend the frame already carries the most references allowed.
        let at_limit = u64::from(REF_LIMIT) | (1 << 32);
        m.counts.store(at_limit, Ordering::SeqCst);
        assert!(!ram.try_grab(f, false) && !ram.try_grab(f, true));
        assert_eq!(m.counts.load(Ordering::SeqCst), at_limit, "nothing taken");
        // Pins at the limit refuse too, before they could carry into anything.
        m.counts
            .store((u64::from(REF_LIMIT) << 32) | 5, Ordering::SeqCst);
        assert!(!ram.try_grab(f, true));
        m.counts
            .store(super::super::frame::PIN + 1, Ordering::SeqCst);
        assert!(ram.try_grab(f, false));
    }

    struct Freed(crate::sync::Mutex<Vec<Pfn>>);

    impl crate::mem::PageMapOps for Freed {
        fn page_free(&self, pfn: Pfn) {
            crate::sync::lock(&self.0).push(pfn);
        }
    }

    #[test]
    fn the_owner_hears_of_each_frame_its_last_reference_frees() {
        let pm = PhysMem::new(1 << 20).unwrap();
        let dev = pm
            .memremap_pages(RegionKind::DevicePrivate { owner: 3 }, 1 << 20)
            .unwrap();
        let ops = Arc::new(Freed(crate::sync::Mutex::new(Vec::new())));
        assert!(dev.set_page_map_ops(ops.clone()));
        assert!(!dev.set_page_map_ops(ops.clone()), "once");
        assert!(!pm.ram().set_page_map_ops(ops.clone()), "RAM has no owner");
        let mut frames = Vec::new();
        dev.alloc_bulk(3, &mut frames).unwrap();
        dev.get(frames[0]);
        assert_eq!(dev.put_many(&frames), 2);
        assert_eq!(*crate::sync::lock(&ops.0), frames[1..].to_vec());
        assert!(dev.put(frames[0]));
        assert_eq!(crate::sync::lock(&ops.0).len(), 3);
        assert!(dev.kind().is_device_private() && !dev.kind().bus_addressable());
        assert_eq!(dev.kind().owner(), Some(3));
        assert!(pm.ram().kind().p2p().is_none() && !pm.ram().kind().is_device());
    }
}
