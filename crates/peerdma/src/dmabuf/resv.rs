//! Fences and the reservation object (drivers/dma-buf/dma-fence.c, dma-resv.c).

use std::fmt;

use crate::sync::atomic::{AtomicBool, Ordering};
use crate::sync::{order, Arc, Held, MutexGuard, OrderedMutex, WaitQueue};

/// What a fence in a reservation object stands for (`enum dma_resv_usage`), in the
/// kernel's order: asking for a usage returns every fence at or below it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Usage {
    /// Memory management by the kernel (a move, a clear): everyone waits for these
    /// before touching the buffer, unless it is pinned.
    Kernel,
    /// An implicitly synchronised write.
    Write,
    /// An implicitly synchronised read.
    Read,
    /// Work that takes no part in implicit synchronisation (page-table updates,
    /// preemption fences).
    Bookkeep,
}

impl Usage {
    /// `dma_resv_usage_rw`: what an access must wait for — a write waits for readers
    /// and writers (READ), a read for writers (WRITE).
    pub fn rw(write: bool) -> Usage {
        if write {
            Usage::Read
        } else {
            Usage::Write
        }
    }
}

struct FenceInner {
    name: String,
    signaled: AtomicBool,
    wq: WaitQueue,
}

/// A one-shot completion signal (`struct dma_fence`): work that will finish, which
/// others wait for. Cloning shares the fence.
///
/// # Invariants
/// Once signalled it stays signalled.
#[derive(Clone)]
pub struct Fence(Arc<FenceInner>);

impl fmt::Debug for Fence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Fence({}, {})",
            self.0.name,
            if self.is_signaled() {
                "signaled"
            } else {
                "pending"
            }
        )
    }
}

impl Fence {
    /// A pending fence for the work `name`.
    pub fn new(name: impl Into<String>) -> Fence {
        Fence(Arc::new(FenceInner {
            name: name.into(),
            signaled: AtomicBool::new(false),
            wq: WaitQueue::new(),
        }))
    }

    /// The work it stands for.
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// `dma_fence_signal`: the work is done; waiters wake.
    pub fn signal(&self) {
        self.0.signaled.store(true, Ordering::SeqCst);
        self.0.wq.wake_all();
    }

    /// Whether it has signalled.
    pub fn is_signaled(&self) -> bool {
        self.0.signaled.load(Ordering::SeqCst)
    }

    /// `dma_fence_wait`: sleeps until it signals.
    pub fn wait(&self) {
        self.0
            .wq
            .wait_until("waiting for a fence", || self.is_signaled());
    }

    /// Whether `other` is this same fence.
    pub fn same(&self, other: &Fence) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// The fences of a reservation object.
#[derive(Default)]
pub struct ResvFences {
    fences: Vec<(Fence, Usage)>,
}

/// A reservation object (`struct dma_resv`): the lock that serialises whoever maps,
/// pins or moves a buffer, and the fences of the work that uses it.
///
/// # Invariants
/// Fences are added and read only under the lock; a fence appears at most once, with
/// the lowest usage it was ever added with (a usage is promoted, never demoted).
pub struct Resv {
    state: OrderedMutex<ResvFences>,
}

impl fmt::Debug for Resv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Resv")
    }
}

impl Default for Resv {
    fn default() -> Self {
        Resv {
            state: OrderedMutex::new(&order::DMA_RESV, ResvFences::default()),
        }
    }
}

/// The reservation lock, held (`dma_resv_lock`). Proof for the calls that require it.
pub struct ResvGuard<'a> {
    resv: &'a Resv,
    held: Held<MutexGuard<'a, ResvFences>>,
}

impl Resv {
    /// An unlocked reservation object without fences.
    pub fn new() -> Arc<Resv> {
        Arc::new(Resv::default())
    }

    /// `dma_resv_lock`.
    pub fn lock(&self) -> ResvGuard<'_> {
        ResvGuard {
            resv: self,
            held: self.state.lock(),
        }
    }

    /// `dma_resv_wait_timeout(usage)` without the lock held: waits for every fence at
    /// or below `usage` that is pending now.
    pub fn wait(&self, usage: Usage) {
        let pending = self.lock().fences(usage);
        for f in pending {
            f.wait();
        }
    }

    /// `dma_resv_test_signaled`: whether every fence at or below `usage` signalled.
    pub fn test_signaled(&self, usage: Usage) -> bool {
        self.lock().fences(usage).is_empty()
    }
}

impl ResvGuard<'_> {
    /// Whether this guard holds `resv`.
    pub fn holds(&self, resv: &Resv) -> bool {
        std::ptr::eq(self.resv, resv)
    }

    /// `dma_resv_add_fence`: `fence` for work of `usage`. Adding a fence again with a
    /// lower usage promotes it; a higher one leaves it. Signalled fences are pruned.
    pub fn add_fence(&mut self, fence: Fence, usage: Usage) {
        let fences = &mut self.held.fences;
        fences.retain(|(f, _)| !f.is_signaled());
        if let Some((_, u)) = fences.iter_mut().find(|(f, _)| f.same(&fence)) {
            *u = (*u).min(usage);
            return;
        }
        fences.push((fence, usage));
    }

    /// The pending fences at or below `usage` (`dma_resv_for_each_fence`).
    pub fn fences(&self, usage: Usage) -> Vec<Fence> {
        self.held
            .fences
            .iter()
            .filter(|(f, u)| *u <= usage && !f.is_signaled())
            .map(|(f, _)| f.clone())
            .collect()
    }

    /// `dma_resv_wait_timeout(usage)` with the lock held, as an importer mapping a
    /// buffer does: whoever signals the fences must not need this lock.
    pub fn wait(&self, usage: Usage) {
        for f in self.fences(usage) {
            f.wait();
        }
    }
}
