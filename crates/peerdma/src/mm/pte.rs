//! Page-table entries: a frame number and a few bits, in one word as the hardware
//! keeps them.

use crate::addr::{Pfn, PAGE_SHIFT};

/// One page-table entry.
///
/// # Invariants
/// Every non-empty entry — [`present`](Pte::is_present),
/// [`device_private`](Pte::is_device_private), [`migration`](Pte::is_migration) or
/// [`device_exclusive`](Pte::is_device_exclusive) — holds one reference on its frame; the empty entry holds none. A migration
/// entry exists only while the thread migrating its frame holds the frame's page lock
/// and the address-space lock shared.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pte(u64);

impl Pte {
    const PRESENT: u64 = 1 << 0;
    const WRITE: u64 = 1 << 1;
    /// A non-present entry naming a device-private frame (the kernel's
    /// device-private swap entry): a CPU access faults and migrates it to RAM.
    const DEVICE_PRIVATE: u64 = 1 << 2;
    /// A non-present entry naming a frame being migrated (the kernel's migration swap
    /// entry): faults and GUP wait for the migration to finish, then retry.
    const MIGRATION: u64 = 1 << 3;
    /// A non-present entry naming a system page a device holds for atomic access (the
    /// kernel's device-exclusive swap entry): a CPU access faults, the device is told
    /// through its notifier, and the present entry comes back.
    const EXCLUSIVE: u64 = 1 << 4;
    const FLAGS: u64 = (1 << PAGE_SHIFT) - 1;

    /// No mapping.
    pub const EMPTY: Pte = Pte(0);

    /// A present mapping of `pfn`.
    pub fn present(pfn: Pfn, writable: bool) -> Self {
        Pte((pfn.0 << PAGE_SHIFT) | Self::PRESENT | if writable { Self::WRITE } else { 0 })
    }

    /// A device-private entry for `pfn`, remembering whether the page was writable.
    pub fn device(pfn: Pfn, writable: bool) -> Self {
        Pte((pfn.0 << PAGE_SHIFT) | Self::DEVICE_PRIVATE | if writable { Self::WRITE } else { 0 })
    }

    /// A migration entry for `pfn`, standing in for a present or device-private entry
    /// while its page is copied; remembers whether the page was writable.
    pub fn migration(pfn: Pfn, writable: bool) -> Self {
        Pte((pfn.0 << PAGE_SHIFT) | Self::MIGRATION | if writable { Self::WRITE } else { 0 })
    }

    /// A device-exclusive entry for `pfn`, remembering whether the page was writable.
    pub fn exclusive(pfn: Pfn, writable: bool) -> Self {
        Pte((pfn.0 << PAGE_SHIFT) | Self::EXCLUSIVE | if writable { Self::WRITE } else { 0 })
    }

    /// Whether nothing is mapped.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
    /// Whether the CPU can access the page without a fault.
    pub fn is_present(self) -> bool {
        self.0 & Self::PRESENT != 0
    }
    /// Whether it names a device-private frame.
    pub fn is_device_private(self) -> bool {
        self.0 & Self::DEVICE_PRIVATE != 0
    }
    /// Whether it is a migration entry: the page is being moved right now.
    pub fn is_migration(self) -> bool {
        self.0 & Self::MIGRATION != 0
    }
    /// Whether a device holds the page exclusively for atomics.
    pub fn is_device_exclusive(self) -> bool {
        self.0 & Self::EXCLUSIVE != 0
    }
    /// Whether writes are allowed without a fault.
    pub fn writable(self) -> bool {
        self.0 & Self::WRITE != 0
    }
    /// The frame, for a present or device-private entry.
    pub fn pfn(self) -> Option<Pfn> {
        (!self.is_empty()).then_some(Pfn(self.0 >> PAGE_SHIFT))
    }
    /// The same entry without write permission.
    pub fn wrprotect(self) -> Self {
        Pte(self.0 & !Self::WRITE)
    }
    /// The same entry with write permission.
    pub fn mkwrite(self) -> Self {
        Pte(self.0 | Self::WRITE)
    }
    /// The raw flag bits, for tests.
    pub fn flags(self) -> u64 {
        self.0 & Self::FLAGS
    }
}
