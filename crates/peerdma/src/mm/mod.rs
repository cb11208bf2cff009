//! Address spaces: VMAs, a radix page table, CPU faults with zero fill and
//! copy-on-write, mmap/munmap/mprotect/madvise, fork and exit, and page migration.
//! Every change of a page-table entry is preceded by the interval-notifier
//! invalidation of its range, so a device mirroring the range stops using the old page
//! (and drains its DMA) before the entry changes.
//!
//! Kernel analogue: mm/mmap.c, mm/memory.c, mm/mprotect.c, mm/madvise.c, kernel/fork.c,
//! mm/migrate.c. Fork follows today's kernel (the rules tools/testing/selftests/mm/cow.c
//! checks):
//! - an anonymous page that may be DMA-pinned is copied for the child at fork time, so
//!   the parent keeps the pinned page writable and DMA stays coherent with what the
//!   parent sees;
//! - any other anonymous page is shared copy-on-write: both sides lose write access and
//!   the page loses its anon-exclusive mark;
//! - pinning an anonymous page requires it to be exclusive: a read-only pin of a shared
//!   page first "unshares" it (copies it unless this address space is its only user);
//! - a write fault reuses an exclusive page and copies a shared one.
//!
//! What this layer leaves to others: deciding what to pin (`gup`), device callbacks
//! (`hmm`, drivers), reclaim (not modelled).

pub mod audit;
mod evict;
mod fault;
mod fork;
mod migrate;
pub mod page_table;
pub mod pte;
mod space;
pub mod vma;
mod walk;

pub use audit::{audit_frames, FrameFault, Ledger};
pub use evict::{migrate_device_range, DeviceRangeEviction};
pub use fault::{set_migrate_to_ram, Access, DeviceFault, ExclusivePage, MigrateToRam};
pub use migrate::{MigrateSrc, MigrateVma, Select};
pub use page_table::PageTable;
pub use pte::Pte;
pub use space::{Mm, MmId};
pub use vma::{PagesOwner, PagesOwnerRef, Prot, ShmObject, Vma, VmaKind};
pub use walk::{Visit, WalkOps, Want};

use crate::addr::VirtAddr;
use crate::errno::Errno;
use crate::mem::MemError;
use crate::notifier::Again;

/// What an address-space operation can refuse, with the kernel's error number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MmError {
    /// No mapping, or nothing can be faulted in there (EFAULT).
    #[error("{op} at {addr}: bad address (EFAULT): {why}")]
    Fault {
        /// The operation.
        op: &'static str,
        /// The address.
        addr: VirtAddr,
        /// Why.
        why: &'static str,
    },
    /// The mapping does not allow the access (EACCES).
    #[error("{op} at {addr}: permission denied (EACCES): {why}")]
    Access {
        /// The operation.
        op: &'static str,
        /// The address.
        addr: VirtAddr,
        /// Why.
        why: &'static str,
    },
    /// Out of memory or of address space, or part of the range is unmapped where the
    /// kernel says ENOMEM (mprotect) (ENOMEM).
    #[error("{op} at {addr}: out of memory (ENOMEM): {why}")]
    NoMemory {
        /// The operation.
        op: &'static str,
        /// The address.
        addr: VirtAddr,
        /// Why.
        why: String,
        /// The allocator's refusal, when a frame could not be had.
        #[source]
        source: Option<MemError>,
    },
    /// The operation is not permitted on this mapping: a device asked to write a
    /// mapping without write permission (EPERM, as `hmm_range_fault` returns it).
    #[error("{op} at {addr}: operation not permitted (EPERM): {why}")]
    NotPermitted {
        /// The operation.
        op: &'static str,
        /// The address.
        addr: VirtAddr,
        /// Why.
        why: &'static str,
    },
    /// The operation does not apply to this kind of memory (EOPNOTSUPP).
    #[error("{op} at {addr}: not supported (EOPNOTSUPP): {why}")]
    NotSupported {
        /// The operation.
        op: &'static str,
        /// The address.
        addr: VirtAddr,
        /// Why.
        why: &'static str,
    },
    /// A malformed request (EINVAL).
    #[error("{op} {addr}+{len:#x}: invalid argument (EINVAL): {why}")]
    Invalid {
        /// The operation.
        op: &'static str,
        /// The address.
        addr: VirtAddr,
        /// The length.
        len: u64,
        /// Why.
        why: &'static str,
    },
    /// The page is in use and cannot be moved now (EBUSY).
    #[error("{op} at {addr}: busy (EBUSY): {why}")]
    Busy {
        /// The operation.
        op: &'static str,
        /// The address.
        addr: VirtAddr,
        /// Why.
        why: &'static str,
    },
    /// A subscriber refused a non-blockable invalidation (EAGAIN).
    #[error("{op}: try again (EAGAIN)")]
    Again {
        /// The operation.
        op: &'static str,
        /// The refusal.
        source: Again,
    },
}

impl MmError {
    /// The kernel's error number.
    pub fn errno(&self) -> Errno {
        match self {
            MmError::Fault { .. } => Errno::EFAULT,
            MmError::Access { .. } => Errno::EACCES,
            MmError::NotPermitted { .. } => Errno::EPERM,
            MmError::NotSupported { .. } => Errno::EOPNOTSUPP,
            MmError::NoMemory { .. } => Errno::ENOMEM,
            MmError::Invalid { .. } => Errno::EINVAL,
            MmError::Busy { .. } => Errno::EBUSY,
            MmError::Again { .. } => Errno::EAGAIN,
        }
    }

    pub(crate) fn nomem(op: &'static str, addr: VirtAddr, e: MemError) -> Self {
        MmError::NoMemory {
            op,
            addr,
            why: "no frame could be allocated".into(),
            source: Some(e),
        }
    }
}
