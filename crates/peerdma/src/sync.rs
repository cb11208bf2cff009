//! The one place that decides where locks, condition variables, atomics, `Arc` and
//! threads come from: the standard library normally, shuttle's randomised scheduler
//! under the `shuttle` feature, so every test of the concurrent code can be replayed
//! from a seed. Nothing else in the crate imports `std::sync` or `std::thread`.
//!
//! `OnceLock` always comes from std: it only guards one-time allocation of metadata
//! sections, whose initialiser never blocks, so shuttle has nothing to schedule there.
//!
//! # Lock order
//!
//! Declared where each lock lives; across layers it is always
//! 1. `Mm::mmap` (the address-space lock, a `RwLock`; faults take it shared),
//! 2. `Notifier::state` (held only to find subscriptions and move the sequence, never
//!    across a subscriber's callback),
//! 3. `Mm::pt` (the page-table lock, a `Mutex`),
//! 4. a device's live DMA mappings (`Dma` registry; a transfer holds them shared while
//!    it copies, an unmap exclusively),
//! 5. an IOMMU domain's IOVA allocator, then its IO page table,
//! 6. a region's allocator lock (`Region::free`) and the sanitizer's logs (leaves).
//!
//! Besides these, a frame's page lock (the `LOCKED` flag, `Region::trylock_page`) is
//! taken with a try-lock under the page-table lock and held, with no other lock, while
//! a migration copies the page; a thread that finds it taken drops every lock but the
//! address-space lock before waiting for it. A p2p provider's state lock
//! (`Provider::state`) comes before the address-space lock: mmap of p2p memory holds it
//! shared across the mmap.
//!
//! A subscriber's `invalidate` callback is called with none of 2–4 held, so it may
//! block (to drain in-flight DMA) and may take its own locks.

#[cfg(not(feature = "shuttle"))]
pub use std::sync::{
    atomic, Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak,
};
#[cfg(not(feature = "shuttle"))]
pub use std::thread;

#[cfg(feature = "shuttle")]
pub use shuttle::sync::{
    atomic, Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak,
};
#[cfg(feature = "shuttle")]
pub use shuttle::thread;

pub use std::sync::OnceLock;

/// Sleeps (yields to the scheduler under shuttle, which has no clock).
pub fn sleep(d: std::time::Duration) {
    #[cfg(not(feature = "shuttle"))]
    std::thread::sleep(d);
    #[cfg(feature = "shuttle")]
    {
        let _ = d;
        shuttle::thread::yield_now();
    }
}

/// Locks a mutex. Poisoning (a panic while it was held) is ignored: the panic is
/// reported by the thread that panicked, and the data is used as it was left.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Takes a read lock; see [`lock`] on poisoning.
pub fn read<T>(m: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    match m.read() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Takes a write lock; see [`lock`] on poisoning.
pub fn write<T>(m: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    match m.write() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Waits on a condition variable for at most `d`; see [`lock`] on poisoning. Returns the
/// guard and whether the wait timed out. Under shuttle, which has no clock, it never
/// times out: it waits for a notification.
pub fn wait_timeout<'a, T>(
    cv: &Condvar,
    g: MutexGuard<'a, T>,
    d: std::time::Duration,
) -> (MutexGuard<'a, T>, bool) {
    match cv.wait_timeout(g, d) {
        Ok((g, r)) => (g, r.timed_out()),
        Err(p) => {
            let (g, r) = p.into_inner();
            (g, r.timed_out())
        }
    }
}

/// Waits on a condition variable; see [`lock`] on poisoning.
pub fn wait<'a, T>(cv: &Condvar, g: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    match cv.wait(g) {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}
