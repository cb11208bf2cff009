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
//! The locks of the memory subsystem are [`OrderedMutex`] and [`OrderedRwLock`]
//! values, each carrying a [`LockClass`] with a rank from the table in [`order`]; a
//! lock may be taken only while every lock the thread holds has a lower or equal rank.
//! In debug builds (not under shuttle, whose tasks share one OS thread) each thread
//! keeps the classes it holds, and taking a lock against the order panics naming both
//! locks, before it can deadlock; so does a device callback or a sleep on a page lock
//! made while a lock that forbids it (the page-table lock and everything after it) is
//! held. Release builds check nothing. Locks of equal rank may nest: they are either
//! leaves or, like two address spaces' locks during fork, the second one is private to
//! the thread (the kernel's `_nested` annotations).
//!
//! The order, as [`order`] declares it:
//! 1. a p2p provider's state (`Provider::removing`, held shared across a p2p mmap),
//! 2. `Mm::mmap` (the address-space lock, a `RwLock`; faults take it shared),
//! 3. `Notifier::state` (held only to find subscriptions and move the sequence, never
//!    across a subscriber's callback),
//! 4. a shared object's page list (`ShmObject::pages`, held across RAM allocation),
//! 5. `Mm::pt` (the page-table lock); CPU accesses copy bytes under it,
//! 6. the DMA registry and a device's live DMA mappings (a transfer holds them shared
//!    while it copies, an unmap exclusively),
//! 7. the IOMMU's domain table, then a domain's IOVA allocator, then its IO page table,
//! 8. physical memory's region list (held across a new region's set-up),
//! 9. a region's allocator (`Region::free`), then the leaves: a
//!    provider's user list, the sanitizer's logs, IOMMU faults.
//!
//! Besides these, a frame's page lock (the `LOCKED` flag, `Region::trylock_page`) is
//! taken with a try-lock under the page-table lock and held, with no other lock, while
//! a migration copies the page; a thread that finds it taken drops every lock but the
//! address-space lock before waiting for it.
//!
//! A subscriber's `invalidate` callback is called with none of 3–9 held, so it may
//! block (to drain in-flight DMA) and may take its own locks.

#[cfg(not(feature = "shuttle"))]
pub use std::sync::{
    atomic, Arc, Barrier, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard,
    Weak,
};
#[cfg(not(feature = "shuttle"))]
pub use std::thread;

#[cfg(feature = "shuttle")]
pub use shuttle::sync::{
    atomic, Arc, Barrier, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard,
    Weak,
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

/// Threads sleeping until a condition on atomics holds, woken by whoever makes it
/// hold (the kernel's wait queues): a page lock released, transfers drained. A wake-up
/// with nobody waiting costs one atomic load.
///
/// # Invariants
/// `waiters` counts the threads inside [`wait_until`](Self::wait_until). A waiter
/// counts itself before it checks the condition and a waker changes the condition
/// (with a `SeqCst` atomic) before it reads the count, so either the waiter sees the
/// change or the waker sees the waiter and wakes it under `lock`.
#[derive(Debug, Default)]
pub struct WaitQueue {
    waiters: atomic::AtomicU32,
    lock: Mutex<()>,
    cv: Condvar,
}

impl WaitQueue {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sleeps until `done()` holds; `what` names the wait for the lock checker (no
    /// lock that forbids sleeping may be held).
    pub fn wait_until(&self, what: &str, mut done: impl FnMut() -> bool) {
        if done() {
            return;
        }
        might_sleep(what);
        self.waiters.fetch_add(1, atomic::Ordering::SeqCst);
        let mut g = lock(&self.lock);
        while !done() {
            g = wait(&self.cv, g);
        }
        drop(g);
        self.waiters.fetch_sub(1, atomic::Ordering::SeqCst);
    }

    /// Wakes every waiter; call after the `SeqCst` change that may make their
    /// condition hold.
    pub fn wake_all(&self) {
        if self.waiters.load(atomic::Ordering::SeqCst) > 0 {
            let _g = lock(&self.lock);
            self.cv.notify_all();
        }
    }
}

/// Operations in progress that another thread can wait to drain: DMA transfers
/// through one mapping, which an unmap or an invalidation waits for. `enter` and `exit`
/// are one atomic each; the last `exit` wakes the waiters, nothing polls.
///
/// # Invariants
/// `count` is the number of `enter`s not yet matched by an `exit`.
#[derive(Debug, Default)]
pub struct InFlight {
    count: atomic::AtomicU64,
    idle: WaitQueue,
}

impl InFlight {
    /// Nothing in flight.
    pub fn new() -> Self {
        Self::default()
    }

    /// One more operation in flight. Check afterwards whatever a waiter changes before
    /// it waits (a revocation flag): `enter` and that check are ordered against it.
    pub fn enter(&self) {
        self.count.fetch_add(1, atomic::Ordering::SeqCst);
    }

    /// One operation done; the last one wakes the waiters.
    pub fn exit(&self) {
        let before = self.count.fetch_sub(1, atomic::Ordering::SeqCst);
        debug_assert!(before > 0, "InFlight::exit without enter");
        if before == 1 {
            self.idle.wake_all();
        }
    }

    /// Operations in flight now.
    pub fn count(&self) -> u64 {
        self.count.load(atomic::Ordering::SeqCst)
    }

    /// Waits until nothing is in flight.
    pub fn wait_idle(&self) {
        self.idle
            .wait_until("waiting for operations in flight", || self.count() == 0);
    }
}

/// A kind of lock and its place in the lock order.
#[derive(Debug)]
pub struct LockClass {
    /// The lock's name, for reports.
    pub name: &'static str,
    /// Its rank: a lock may be taken while holding only locks of lower or equal rank.
    pub rank: u16,
    /// Whether holding it forbids sleeping and device callbacks (the page-table lock
    /// and everything after it).
    pub atomic: bool,
}

/// The lock classes of the crate, in order. New locks join this table.
pub mod order {
    use super::LockClass;

    const fn class(name: &'static str, rank: u16, atomic: bool) -> LockClass {
        LockClass { name, rank, atomic }
    }

    /// A p2p provider's state (removal flag), held shared across a p2p mmap.
    pub static P2P_STATE: LockClass = class("Provider::removing", 10, false);
    /// The address-space lock.
    pub static MMAP: LockClass = class("Mm::mmap", 20, false);
    /// The interval notifiers' state.
    pub static NOTIFIER: LockClass = class("Notifier::state", 30, false);
    /// A shared memory object's page list.
    pub static SHM_PAGES: LockClass = class("ShmObject::pages", 35, false);
    /// The page-table lock.
    pub static PAGE_TABLE: LockClass = class("Mm::pt", 40, true);
    /// A dma-buf's reservation object (`dma_resv_lock`): held to map, pin and move
    /// the buffer, and by the exporter while it tells importers the buffer moves.
    pub static DMA_RESV: LockClass = class("dma_resv", 44, false);
    /// A GPU buffer object's state (where it lives, its pins and importers), held
    /// while it moves — which waits for the DMA through its importers' mappings.
    pub static GPU_BO: LockClass = class("GPU buffer object", 45, false);
    /// An RDMA NIC's atomic unit: held across an atomic's read-modify-write.
    pub static RDMA_ATOMIC: LockClass = class("RDMA NIC atomics", 46, false);
    /// An RDMA memory region's translation (`umem_mutex`, the dma-buf MR's mapping):
    /// held while the NIC reaches memory through it, so taking it drains the NIC.
    pub static RDMA_MR: LockClass = class("RDMA MR translation", 47, false);
    /// The DMA registry of devices.
    pub static DMA_DEVICES: LockClass = class("Dma::devices", 50, true);
    /// One device's live DMA mappings.
    pub static DMA_MAPPINGS: LockClass = class("Dma device mappings", 51, true);
    /// The IOMMU's domains by group.
    pub static IOMMU_DOMAINS: LockClass = class("Iommu::domains", 55, true);
    /// A domain's IOVA allocator.
    pub static IOVA: LockClass = class("Domain::iova", 60, true);
    /// A domain's IO page table.
    pub static IO_PAGE_TABLE: LockClass = class("Domain::table", 61, true);
    /// A device's list of memory chunks, held while it adds one.
    pub static DEVICE_MEMORY: LockClass = class("device memory chunks", 65, false);
    /// A device's own page table mirroring a process (the HMM test device's), held
    /// while it reads and writes the frames it names.
    pub static DEVICE_PT: LockClass = class("device page table", 66, false);
    /// Physical memory's region list.
    pub static PHYS_REGIONS: LockClass = class("PhysMem::regions", 70, true);
    /// A region's frame allocator.
    pub static REGION_FREE: LockClass = class("Region::free", 80, true);
    /// Leaves: a provider's user list, transfer hooks, verdict caches, the p2p
    /// registry, the process table, logs.
    pub static LEAF: LockClass = class("leaf", 90, true);
}

#[cfg(all(debug_assertions, not(feature = "shuttle")))]
mod lockdep {
    use super::LockClass;
    use std::cell::RefCell;

    std::thread_local! {
        static HELD: RefCell<Vec<&'static LockClass>> = const { RefCell::new(Vec::new()) };
    }

    pub(super) fn acquire(class: &'static LockClass) {
        HELD.with(|h| {
            let h = h.borrow();
            if let Some(worst) = h
                .iter()
                .filter(|c| c.rank > class.rank)
                .max_by_key(|c| c.rank)
            {
                panic!(
                    "lock order inversion: taking {} (rank {}) while holding {} (rank {})",
                    class.name, class.rank, worst.name, worst.rank
                );
            }
        });
    }

    pub(super) fn acquired(class: &'static LockClass) {
        HELD.with(|h| h.borrow_mut().push(class));
    }

    pub(super) fn release(class: &'static LockClass) {
        HELD.with(|h| {
            let mut h = h.borrow_mut();
            if let Some(i) = h.iter().rposition(|c| std::ptr::eq(*c, class)) {
                h.remove(i);
            }
        });
    }

    pub(super) fn might_sleep(what: &str) {
        HELD.with(|h| {
            if let Some(c) = h.borrow().iter().find(|c| c.atomic) {
                panic!("{what} while holding {}", c.name);
            }
        });
    }
}

#[cfg(not(all(debug_assertions, not(feature = "shuttle"))))]
mod lockdep {
    use super::LockClass;
    pub(super) fn acquire(_: &'static LockClass) {}
    pub(super) fn acquired(_: &'static LockClass) {}
    pub(super) fn release(_: &'static LockClass) {}
    pub(super) fn might_sleep(_: &str) {}
}

/// Checks, in debug builds, that the thread holds no lock that forbids sleeping and
/// device callbacks (`might_sleep()`); `what` names what is about to happen.
pub fn might_sleep(what: &str) {
    lockdep::might_sleep(what);
}

/// A held lock of some class: the guard, and the record that the thread holds it.
///
/// # Invariants
/// `guard` is `Some` except inside a condition-variable wait; while this value lives,
/// the thread's record of held locks lists `class` once for it.
pub struct Held<G> {
    guard: Option<G>,
    class: &'static LockClass,
}

impl<G> Held<G> {
    fn new(class: &'static LockClass, take: impl FnOnce() -> G) -> Self {
        lockdep::acquire(class);
        let guard = take();
        lockdep::acquired(class);
        Held {
            guard: Some(guard),
            class,
        }
    }

    fn inner(&self) -> &G {
        self.guard
            .as_ref()
            .unwrap_or_else(|| unreachable!("guard taken only during a wait"))
    }
}

impl<G: std::ops::Deref> std::ops::Deref for Held<G> {
    type Target = G::Target;
    fn deref(&self) -> &G::Target {
        self.inner()
    }
}

impl<G: std::ops::DerefMut> std::ops::DerefMut for Held<G> {
    fn deref_mut(&mut self) -> &mut G::Target {
        self.guard
            .as_mut()
            .unwrap_or_else(|| unreachable!("guard taken only during a wait"))
    }
}

impl<G> Drop for Held<G> {
    fn drop(&mut self) {
        drop(self.guard.take());
        lockdep::release(self.class);
    }
}

impl<'a, T> Held<MutexGuard<'a, T>> {
    /// Waits on `cv`, releasing the lock meanwhile; see [`lock`] on poisoning.
    pub fn wait(mut self, cv: &Condvar) -> Self {
        let g = self.guard.take().unwrap_or_else(|| unreachable!());
        self.guard = Some(wait(cv, g));
        self
    }

    /// Waits on `cv` for at most `d`; returns whether it timed out.
    pub fn wait_timeout(mut self, cv: &Condvar, d: std::time::Duration) -> (Self, bool) {
        let g = self.guard.take().unwrap_or_else(|| unreachable!());
        let (g, timed_out) = wait_timeout(cv, g, d);
        self.guard = Some(g);
        (self, timed_out)
    }
}

/// A mutex with a place in the lock order.
pub struct OrderedMutex<T> {
    m: Mutex<T>,
    class: &'static LockClass,
}

impl<T> OrderedMutex<T> {
    /// A mutex of `class` holding `v`.
    pub fn new(class: &'static LockClass, v: T) -> Self {
        OrderedMutex {
            m: Mutex::new(v),
            class,
        }
    }

    /// Locks it, checking the order in debug builds; poisoning is ignored as in [`lock`].
    pub fn lock(&self) -> Held<MutexGuard<'_, T>> {
        Held::new(self.class, || lock(&self.m))
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for OrderedMutex<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrderedMutex")
            .field("class", &self.class.name)
            .finish()
    }
}

/// A reader-writer lock with a place in the lock order.
pub struct OrderedRwLock<T> {
    l: RwLock<T>,
    class: &'static LockClass,
}

impl<T> OrderedRwLock<T> {
    /// A lock of `class` holding `v`.
    pub fn new(class: &'static LockClass, v: T) -> Self {
        OrderedRwLock {
            l: RwLock::new(v),
            class,
        }
    }

    /// Takes it shared, checking the order in debug builds.
    pub fn read(&self) -> Held<RwLockReadGuard<'_, T>> {
        Held::new(self.class, || read(&self.l))
    }

    /// Takes it exclusively, checking the order in debug builds.
    pub fn write(&self) -> Held<RwLockWriteGuard<'_, T>> {
        Held::new(self.class, || write(&self.l))
    }
}

impl<T> std::fmt::Debug for OrderedRwLock<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrderedRwLock")
            .field("class", &self.class.name)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_in_order_nest() {
        let a = OrderedRwLock::new(&order::MMAP, 1);
        let b = OrderedMutex::new(&order::PAGE_TABLE, 2);
        let c = OrderedMutex::new(&order::REGION_FREE, 3);
        let ga = a.read();
        let gb = b.lock();
        let gc = c.lock();
        assert_eq!(*ga + *gb + *gc, 6);
        // Released out of order, then taken again: the record follows.
        drop(gb);
        drop(ga);
        drop(gc);
        let _gb = b.lock();
        let _gc = c.lock();
    }

    #[test]
    #[cfg(all(debug_assertions, not(feature = "shuttle")))]
    #[should_panic(
        expected = "lock order inversion: taking Mm::mmap (rank 20) while holding Mm::pt (rank 40)"
    )]
    fn an_inversion_is_caught_before_it_can_deadlock() {
        let mmap = OrderedRwLock::new(&order::MMAP, ());
        let pt = OrderedMutex::new(&order::PAGE_TABLE, ());
        let _pt = pt.lock();
        let _mmap = mmap.write();
    }

    #[test]
    #[cfg(all(debug_assertions, not(feature = "shuttle")))]
    #[should_panic(expected = "an interval-notifier callback while holding Mm::pt")]
    fn a_callback_under_the_page_table_lock_is_caught() {
        let pt = OrderedMutex::new(&order::PAGE_TABLE, ());
        let _pt = pt.lock();
        might_sleep("an interval-notifier callback");
    }

    #[test]
    #[cfg(all(debug_assertions, not(feature = "shuttle")))]
    fn the_address_space_lock_allows_callbacks() {
        let mmap = OrderedRwLock::new(&order::MMAP, ());
        let _g = mmap.read();
        might_sleep("an interval-notifier callback");
    }
}
