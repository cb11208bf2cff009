//! `get_user_dma_sg()`: the call the 2016 dri-devel thread proposed. One call pins a
//! user range and hands back a scatter-gather list already DMA-mapped for one device:
//! system RAM through that device's IOMMU, a peer's memory by bus address through a
//! switch or by IOVA through an allowed host bridge, or a clear refusal (EREMOTEIO).
//!
//! In today's kernel the same takes three steps a driver strings together:
//! `pin_user_pages_fast(FOLL_PCI_P2PDMA)`, `sg_alloc_table_from_pages()`, and
//! `dma_map_sgtable()` (whose dma-iommu and direct paths ask
//! `pci_p2pdma_map_segment()` how to reach each p2p page). Here the value returned owns
//! both the pins and the mapping: dropping it unmaps first — waiting for DMA in
//! progress — and then unpins, the order the kernel requires.

use crate::addr::{VirtAddr, PAGE_SIZE};
use crate::dma::{Direction, DmaDevice, DmaMapping, DmaSegment, SgTable};
use crate::gup::{pin_user_pages, FollFlags, GupError, PinnedPages};
use crate::mm::{Mm, MmError};
use crate::sync::Arc;

/// A pinned user range mapped for one device.
///
/// # Invariants
/// `mapping` covers exactly the pinned bytes and is dropped before `pin` (field order).
pub struct UserDmaSg {
    mapping: DmaMapping,
    sg: SgTable,
    pin: PinnedPages,
}

impl std::fmt::Debug for UserDmaSg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserDmaSg")
            .field("mapping", &self.mapping)
            .field("pinned", &self.pin.len())
            .finish()
    }
}

impl UserDmaSg {
    /// The mapped segments, as the device addresses them.
    pub fn segments(&self) -> Vec<DmaSegment> {
        self.mapping.segments()
    }
    /// The DMA mapping (to revoke it, or to ask which device it is for).
    pub fn mapping(&self) -> &DmaMapping {
        &self.mapping
    }
    /// The physical scatter-gather table behind them.
    pub fn sg(&self) -> &SgTable {
        &self.sg
    }
    /// The pinned pages.
    pub fn pinned(&self) -> &PinnedPages {
        &self.pin
    }
    /// Bytes mapped.
    pub fn len(&self) -> u64 {
        self.mapping.len()
    }
    /// Whether it maps nothing.
    pub fn is_empty(&self) -> bool {
        self.mapping.is_empty()
    }
}

/// What [`get_user_dma_sg`] is asked for: a user range, the direction the device
/// moves data, and any extra pinning flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UserSg {
    /// The first byte.
    pub start: VirtAddr,
    /// Bytes; not zero.
    pub len: u64,
    /// Which way the device moves data; a device write pins with `FOLL_WRITE`.
    pub dir: Direction,
    /// Further pinning flags (`FOLL_LONGTERM`, which refuses p2p memory).
    pub flags: FollFlags,
}

impl UserSg {
    /// `[start, start + len)` for a transfer in direction `dir`, with no extra flags.
    pub fn new(start: VirtAddr, len: u64, dir: Direction) -> Self {
        UserSg {
            start,
            len,
            dir,
            flags: FollFlags::NONE,
        }
    }
    /// The same, with `flags` added.
    pub fn flags(self, flags: FollFlags) -> Self {
        UserSg {
            flags: self.flags | flags,
            ..self
        }
    }
}

/// Pins `req`'s range of `mm` (allowing p2p memory unless `LONGTERM` is asked, which
/// the kernel forbids with p2p), builds its SG table with the device's largest segment
/// and maps it for `dev`. All or nothing: a range that cannot be pinned whole is an
/// error.
pub fn get_user_dma_sg(mm: &Arc<Mm>, dev: &DmaDevice, req: UserSg) -> Result<UserDmaSg, GupError> {
    let op = "get_user_dma_sg";
    let UserSg {
        start,
        len,
        dir,
        flags,
    } = req;
    if len == 0 {
        return Err(GupError::Mm(MmError::Invalid {
            op,
            addr: start,
            len,
            why: "length is zero",
        }));
    }
    let first = start.0 & !(PAGE_SIZE - 1);
    let npages = ((start.0 + len).div_ceil(PAGE_SIZE) * PAGE_SIZE - first) / PAGE_SIZE;
    let mut gup = flags;
    if !flags.contains(FollFlags::LONGTERM) {
        gup = gup | FollFlags::PCI_P2PDMA;
    }
    if dir.device_writes() {
        gup = gup | FollFlags::WRITE;
    }
    let pin = pin_user_pages(mm, VirtAddr(first), npages as usize, gup)?;
    if let Some(e) = pin.stopped_by() {
        return Err(e.clone());
    }
    let sg = SgTable::from_runs(pin.runs(), start.0 - first, len, dev.max_segment());
    let mapping = dev.map_sg(&sg, dir)?;
    Ok(UserDmaSg { mapping, sg, pin })
}
