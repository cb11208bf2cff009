//! get_user_pages and pin_user_pages (mm/gup.c): resolve a user range to frames, fault
//! in what is missing, break copy-on-write for writes, unshare for read-only pins, and
//! hold the frames by reference (`FOLL_GET`) or by DMA pin (`FOLL_PIN`).
//!
//! Rules kept from the kernel:
//! - `LONGTERM` only with pinning; device-coherent pages are migrated to system RAM
//!   first (a long-term pin must not hold device memory the device may want back), and
//!   device-private pages always are (the CPU cannot address them);
//! - p2p pages are refused with EREMOTEIO unless `PCI_P2PDMA` is passed, and
//!   `PCI_P2PDMA` together with `LONGTERM` is invalid (the provider must be able to
//!   go away);
//! - a partial result reports how many pages it got and why it stopped; an error before
//!   the first page is an error.
//!
//! The returned values are RAII: dropping them unpins (or puts) every page.

mod dma_sg;
mod pin;

pub use dma_sg::{get_user_dma_sg, UserDmaSg, UserSg};
pub use pin::{get_user_pages, pin_user_pages, FollFlags, GotPages, PinnedPages};

use crate::addr::{Bdf, VirtAddr};
use crate::errno::Errno;
use crate::mm::MmError;

/// What pinning can refuse, with the kernel's error number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GupError {
    /// The address space refused (EFAULT, EACCES, ENOMEM, EBUSY, EAGAIN).
    #[error(transparent)]
    Mm(#[from] MmError),
    /// A p2p page without `PCI_P2PDMA` (EREMOTEIO: will not succeed if retried).
    #[error(
        "{op} at {addr}: remote I/O (EREMOTEIO): p2p memory of {provider} needs FOLL_PCI_P2PDMA"
    )]
    RemoteIo {
        /// The operation.
        op: &'static str,
        /// The page.
        addr: VirtAddr,
        /// The device whose p2p memory it is.
        provider: Bdf,
    },
    /// Mapping the pinned pages for the device failed (EREMOTEIO for an unreachable
    /// peer, ENOMEM for IOVA space, ENODEV).
    #[error(transparent)]
    Dma(#[from] crate::dma::DmaError),
    /// A flag combination the kernel rejects (EINVAL).
    #[error("{op}: invalid argument (EINVAL): {why}")]
    Invalid {
        /// The operation.
        op: &'static str,
        /// Why.
        why: &'static str,
    },
}

impl GupError {
    /// The kernel's error number.
    pub fn errno(&self) -> Errno {
        match self {
            GupError::Mm(e) => e.errno(),
            GupError::RemoteIo { .. } => Errno::EREMOTEIO,
            GupError::Dma(e) => e.errno(),
            GupError::Invalid { .. } => Errno::EINVAL,
        }
    }
}
