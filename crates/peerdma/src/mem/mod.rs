//! Physical memory with real bytes: page frames named by [`Pfn`],
//! their metadata (reference and pin counts, flags, generation), regions of system RAM
//! and device page maps, and each region's allocator.
//!
//! Kernel analogue: mm/page_alloc.c, mm/memremap.c, `struct page`. What this layer
//! leaves to others: mapping frames into address spaces (`mm`), deciding when a frame
//! may move (`mm`, `gup`), and who may DMA to it (`dma`). Nothing here knows about
//! devices beyond the owner recorded on a device region.

pub mod alloc;
pub mod backing;
pub mod frame;
pub mod phys;
pub mod region;

pub use frame::{flags, FrameMeta};
pub use phys::{is_zero_pfn, PhysMem, ZERO_PFN};
pub use region::{FrameUsage, PageMapOps, PeerReach, Region, RegionId, RegionKind};

use crate::addr::Pfn;
use crate::errno::Errno;

/// What the memory layer can refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemError {
    /// The region has too few free frames (ENOMEM).
    #[error("out of memory: {region} has no {frames} free frames")]
    NoMemory {
        /// The region.
        region: String,
        /// How many were asked for.
        frames: u64,
    },
    /// The host refused the backing mapping.
    #[error("cannot map {len:#x} bytes of backing memory: {reason}")]
    Backing {
        /// Bytes asked for.
        len: u64,
        /// The host's error.
        reason: String,
    },
    /// A frame number outside every region.
    #[error("{pfn} is in no memory region")]
    NoSuchFrame {
        /// The frame.
        pfn: Pfn,
    },
    /// The object is in use (EBUSY).
    #[error("busy: {what}")]
    Busy {
        /// What holds it.
        what: String,
    },
    /// A request that makes no sense (EINVAL).
    #[error("invalid: {what}")]
    Invalid {
        /// What was wrong.
        what: String,
    },
}

impl MemError {
    /// The kernel's error number.
    pub fn errno(&self) -> Errno {
        match self {
            MemError::NoMemory { .. } | MemError::Backing { .. } => Errno::ENOMEM,
            MemError::NoSuchFrame { .. } => Errno::EFAULT,
            MemError::Busy { .. } => Errno::EBUSY,
            MemError::Invalid { .. } => Errno::EINVAL,
        }
    }
}
