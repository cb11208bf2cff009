//! Interval notifiers: the mmu_interval_notifier design of mm/mmu_notifier.c.
//!
//! A subscriber (a device mirroring part of an address space) subscribes to a virtual
//! range and gets a callback before any page-table entry in that range changes. It
//! reads mappings under a sequence: [`IntervalNotifier::read_begin`] gives a sequence
//! number, the subscriber builds its device mapping, then under its own lock checks
//! [`IntervalNotifier::read_retry`] and commits only if no invalidation hit the range in
//! between. Its [`IntervalNotifierOps::invalidate`] callback takes the same lock, tears
//! down the device mapping and, for a blockable event, waits for in-flight DMA to drain.
//!
//! Sequence: `invalidate_seq` is odd while any invalidation is in progress. Each
//! subscription remembers the odd value of the last invalidation that hit it;
//! `read_begin` waits while that invalidation is still running.
//!
//! Where we differ on purpose: the kernel has the callback call
//! `mmu_interval_set_seq()` itself; here the core sets the subscription's sequence just
//! before calling back, which gives the same guarantee (a reader that raced the
//! invalidation always retries) without a step a driver can forget.

use std::collections::HashMap;
use std::ops::Range;

use iset::IntervalMap;

use crate::addr::VirtAddr;
use crate::sync::atomic::{AtomicU64, Ordering};
use crate::sync::{order, OrderedMutex};
use crate::sync::{Arc, Condvar};

/// Why page-table entries are about to change (`enum mmu_notifier_event`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NotifyEvent {
    /// munmap: the range goes away.
    Unmap,
    /// The pages are dropped or replaced (madvise(DONTNEED), a COW break).
    Clear,
    /// Permissions shrink (mprotect, fork's write-protect).
    ProtectionChange,
    /// The pages move to other frames (migration, device-private faults).
    Migrate,
    /// The address space exits.
    Release,
    /// A device takes exclusive access to the pages.
    Exclusive,
}

/// The range and reason of one invalidation (`struct mmu_notifier_range`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotifyRange {
    /// First address.
    pub start: VirtAddr,
    /// One past the last address.
    pub end: VirtAddr,
    /// Why.
    pub event: NotifyEvent,
    /// Whether the callback may sleep (to drain DMA). Non-blockable invalidations come
    /// from paths that cannot wait (reclaim, the OOM reaper); a subscriber that would
    /// have to wait refuses, and the caller backs off.
    pub blockable: bool,
    /// For [`NotifyEvent::Migrate`], the device-private owner doing the migration, so a
    /// device can skip invalidating its own migration (`range->owner`).
    pub owner: Option<u64>,
}

impl NotifyRange {
    /// A blockable range.
    pub fn new(start: VirtAddr, end: VirtAddr, event: NotifyEvent) -> Self {
        NotifyRange {
            start,
            end,
            event,
            blockable: true,
            owner: None,
        }
    }
}

/// What a subscriber supplies (`struct mmu_interval_notifier_ops`).
pub trait IntervalNotifierOps: Send + Sync {
    /// Called before page-table entries in `range` (which overlaps the subscription)
    /// change. Stop using those pages: for a blockable range, wait for in-flight DMA to
    /// them to finish, then return true. For a non-blockable range, return false instead
    /// of waiting. Called with no lock of the address space held.
    fn invalidate(&self, sub: &Subscription, range: &NotifyRange, cur_seq: u64) -> bool;
}

/// Which subscription a callback is for: one ops value may serve several.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscription {
    /// Unique within the address space.
    pub id: u64,
    /// The subscribed range.
    pub range: Range<VirtAddr>,
}

struct SubInner {
    id: u64,
    range: Range<u64>,
    seq: AtomicU64,
    ops: Arc<dyn IntervalNotifierOps>,
}

struct State {
    tree: IntervalMap<u64, u64>,
    subs: HashMap<u64, Arc<SubInner>>,
    /// Odd while `active > 0`.
    invalidate_seq: u64,
    active: usize,
    next_id: u64,
}

/// The interval notifiers of one address space (`struct mmu_notifier_subscriptions`).
///
/// # Invariants
/// `invalidate_seq` is odd exactly while `active > 0`; `tree` and `subs` hold the same
/// subscriptions.
pub struct Notifier {
    /// Lock order: after the address-space lock, before the page-table lock; never held
    /// across a callback.
    state: OrderedMutex<State>,
    done: Condvar,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.state.lock();
        f.debug_struct("Notifier")
            .field("subscriptions", &s.subs.len())
            .field("invalidate_seq", &s.invalidate_seq)
            .finish()
    }
}

/// The invalidation could not complete: a subscriber refused a non-blockable range
/// (EAGAIN). Nothing was changed; the caller backs off and may retry blockably.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a subscriber cannot invalidate {start}..{end} without sleeping")]
pub struct Again {
    /// First address of the refused range.
    pub start: VirtAddr,
    /// End of the refused range.
    pub end: VirtAddr,
}

impl Again {
    /// The kernel's error number (EAGAIN).
    pub fn errno(&self) -> crate::errno::Errno {
        crate::errno::Errno::EAGAIN
    }
}

impl Notifier {
    /// No subscriptions.
    pub fn new() -> Arc<Self> {
        Arc::new(Notifier {
            state: OrderedMutex::new(
                &order::NOTIFIER,
                State {
                    tree: IntervalMap::new(),
                    subs: HashMap::new(),
                    invalidate_seq: 2,
                    active: 0,
                    next_id: 1,
                },
            ),
            done: Condvar::new(),
        })
    }

    /// Subscribes `ops` to `[start, start + len)` (`mmu_interval_notifier_insert`).
    /// The subscription ends when the returned value is dropped.
    pub fn subscribe(
        self: &Arc<Self>,
        start: VirtAddr,
        len: u64,
        ops: Arc<dyn IntervalNotifierOps>,
    ) -> IntervalNotifier {
        let end = start.0.saturating_add(len.max(1));
        let mut s = self.state.lock();
        let id = s.next_id;
        s.next_id += 1;
        // Inserted during an invalidation: readers wait for it to finish, as if it had
        // hit this range; otherwise an odd value no invalidation will ever reuse.
        let seq = if s.active > 0 {
            s.invalidate_seq
        } else {
            s.invalidate_seq - 1
        };
        let inner = Arc::new(SubInner {
            id,
            range: start.0..end,
            seq: AtomicU64::new(seq),
            ops,
        });
        s.tree.force_insert(start.0..end, id);
        s.subs.insert(id, inner.clone());
        IntervalNotifier {
            inner,
            notifier: self.clone(),
        }
    }

    /// Number of live subscriptions.
    pub fn subscriptions(&self) -> usize {
        self.state.lock().subs.len()
    }

    /// `mmu_notifier_invalidate_range_start`: tells every overlapping subscriber the
    /// range is about to change. On success the returned guard must live until the
    /// page-table entries are changed; dropping it is `invalidate_range_end`.
    pub fn invalidate_range_start(
        self: &Arc<Self>,
        range: NotifyRange,
    ) -> Result<InvalidateGuard, Again> {
        let (cur_seq, hit) = {
            let mut s = self.state.lock();
            if s.active == 0 {
                s.invalidate_seq |= 1;
            }
            s.active += 1;
            let hit: Vec<Arc<SubInner>> = s
                .tree
                .values(range.start.0..range.end.0.max(range.start.0 + 1))
                .filter_map(|id| s.subs.get(id).cloned())
                .collect();
            (s.invalidate_seq, hit)
        };
        let guard = InvalidateGuard {
            notifier: self.clone(),
        };
        if range.blockable && !hit.is_empty() {
            crate::sync::might_sleep("a blockable interval-notifier callback");
        }
        for sub in hit {
            sub.seq.store(cur_seq, Ordering::Release);
            let info = Subscription {
                id: sub.id,
                range: VirtAddr(sub.range.start)..VirtAddr(sub.range.end),
            };
            if !sub.ops.invalidate(&info, &range, cur_seq) {
                debug_assert!(
                    !range.blockable,
                    "a subscriber refused a blockable invalidation"
                );
                drop(guard);
                return Err(Again {
                    start: range.start,
                    end: range.end,
                });
            }
        }
        Ok(guard)
    }

    fn invalidate_range_end(&self) {
        let mut s = self.state.lock();
        debug_assert!(s.active > 0);
        s.active -= 1;
        if s.active == 0 {
            s.invalidate_seq += 1;
            self.done.notify_all();
        }
    }

    fn remove(&self, inner: &SubInner) {
        let mut s = self.state.lock();
        s.tree
            .remove_where(inner.range.clone(), |id| *id == inner.id);
        s.subs.remove(&inner.id);
        // An invalidation in progress may still call this subscriber: wait it out, as
        // mmu_interval_notifier_remove() does.
        if s.active > 0 {
            let seq = s.invalidate_seq;
            while s.invalidate_seq == seq {
                s = s.wait(&self.done);
            }
        }
    }
}

/// Ends an invalidation when dropped (`invalidate_range_end`).
#[must_use = "dropping the guard ends the invalidation"]
pub struct InvalidateGuard {
    notifier: Arc<Notifier>,
}

impl Drop for InvalidateGuard {
    fn drop(&mut self) {
        self.notifier.invalidate_range_end();
    }
}

/// One subscription (`struct mmu_interval_notifier`); dropping it unsubscribes, waiting
/// for an invalidation in progress, so the caller must not hold a lock its callback takes.
pub struct IntervalNotifier {
    inner: Arc<SubInner>,
    notifier: Arc<Notifier>,
}

impl std::fmt::Debug for IntervalNotifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntervalNotifier")
            .field("id", &self.id())
            .field("range", &self.range())
            .finish()
    }
}

impl IntervalNotifier {
    /// The subscription's id, as callbacks see it.
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// The subscribed range.
    pub fn range(&self) -> Range<VirtAddr> {
        VirtAddr(self.inner.range.start)..VirtAddr(self.inner.range.end)
    }

    /// `mmu_interval_read_begin`: waits while an invalidation that hit this range is in
    /// progress, then returns the sequence to check with [`read_retry`](Self::read_retry).
    pub fn read_begin(&self) -> u64 {
        let mut s = self.notifier.state.lock();
        loop {
            let seq = self.inner.seq.load(Ordering::Acquire);
            if seq != s.invalidate_seq {
                return seq;
            }
            s = s.wait(&self.notifier.done);
        }
    }

    /// `mmu_interval_read_retry`: true when an invalidation hit the range since
    /// `read_begin` returned `seq`. Check it under the lock the callback takes.
    pub fn read_retry(&self, seq: u64) -> bool {
        self.inner.seq.load(Ordering::Acquire) != seq
    }
}

impl Drop for IntervalNotifier {
    fn drop(&mut self) {
        self.notifier.remove(&self.inner);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::atomic::AtomicUsize;
    use crate::sync::{lock, Mutex};

    #[derive(Default)]
    struct Count {
        calls: AtomicUsize,
        refuse_nonblocking: bool,
        last: Mutex<Option<NotifyRange>>,
    }

    impl IntervalNotifierOps for Count {
        fn invalidate(&self, _sub: &Subscription, range: &NotifyRange, _seq: u64) -> bool {
            self.calls.fetch_add(1, Ordering::SeqCst);
            *lock(&self.last) = Some(*range);
            range.blockable || !self.refuse_nonblocking
        }
    }

    fn r(s: u64, e: u64) -> NotifyRange {
        NotifyRange::new(VirtAddr(s), VirtAddr(e), NotifyEvent::Unmap)
    }

    #[test]
    fn only_overlapping_subscribers_are_called() {
        let n = Notifier::new();
        let a = Arc::new(Count::default());
        let b = Arc::new(Count::default());
        let _sa = n.subscribe(VirtAddr(0x1000), 0x1000, a.clone());
        let _sb = n.subscribe(VirtAddr(0x3000), 0x2000, b.clone());
        drop(n.invalidate_range_start(r(0x1800, 0x3001)).unwrap());
        assert_eq!(
            (
                a.calls.load(Ordering::SeqCst),
                b.calls.load(Ordering::SeqCst)
            ),
            (1, 1)
        );
        drop(n.invalidate_range_start(r(0x2000, 0x3000)).unwrap());
        assert_eq!(
            (
                a.calls.load(Ordering::SeqCst),
                b.calls.load(Ordering::SeqCst)
            ),
            (1, 1),
            "half-open ranges"
        );
        drop(n.invalidate_range_start(r(0x4fff, 0x5000)).unwrap());
        assert_eq!(b.calls.load(Ordering::SeqCst), 2);
        assert_eq!(lock(&b.last).unwrap().start, VirtAddr(0x4fff));
    }

    #[test]
    fn read_retry_sees_an_invalidation_after_read_begin() {
        let n = Notifier::new();
        let ops = Arc::new(Count::default());
        let sub = n.subscribe(VirtAddr(0), 0x10000, ops);
        let seq = sub.read_begin();
        assert!(!sub.read_retry(seq));
        drop(n.invalidate_range_start(r(0x2000, 0x3000)).unwrap());
        assert!(
            sub.read_retry(seq),
            "a reader that raced an invalidation must retry"
        );
        let seq2 = sub.read_begin();
        assert!(!sub.read_retry(seq2));
        // An invalidation elsewhere does not disturb this reader.
        let _other = n.subscribe(VirtAddr(0x20000), 0x1000, Arc::new(Count::default()));
        drop(n.invalidate_range_start(r(0x20000, 0x21000)).unwrap());
        assert!(!sub.read_retry(seq2));
    }

    #[test]
    fn non_blockable_refusal_backs_off_and_ends_the_invalidation() {
        let n = Notifier::new();
        let ops = Arc::new(Count {
            refuse_nonblocking: true,
            ..Count::default()
        });
        let sub = n.subscribe(VirtAddr(0), 0x1000, ops);
        let mut range = r(0, 0x1000);
        range.blockable = false;
        assert_eq!(
            n.invalidate_range_start(range).err(),
            Some(Again {
                start: VirtAddr(0),
                end: VirtAddr(0x1000)
            })
        );
        // The invalidation ended: read_begin does not wait forever.
        let seq = sub.read_begin();
        assert!(!sub.read_retry(seq));
        assert_eq!(n.state.lock().active, 0);
    }

    #[test]
    fn dropping_a_subscription_unsubscribes() {
        let n = Notifier::new();
        let ops = Arc::new(Count::default());
        let sub = n.subscribe(VirtAddr(0), 0x1000, ops.clone());
        assert_eq!(n.subscriptions(), 1);
        drop(sub);
        assert_eq!(n.subscriptions(), 0);
        drop(n.invalidate_range_start(r(0, 0x1000)).unwrap());
        assert_eq!(ops.calls.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn two_identical_ranges_are_two_subscriptions() {
        let n = Notifier::new();
        let a = Arc::new(Count::default());
        let s1 = n.subscribe(VirtAddr(0), 0x1000, a.clone());
        let _s2 = n.subscribe(VirtAddr(0), 0x1000, a.clone());
        drop(s1);
        drop(n.invalidate_range_start(r(0, 0x1000)).unwrap());
        assert_eq!(
            a.calls.load(Ordering::SeqCst),
            1,
            "removing one leaves the other"
        );
    }
}
