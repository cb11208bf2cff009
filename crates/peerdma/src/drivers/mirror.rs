//! A device's page table mirroring one process through HMM — what every HMM driver
//! keeps (test_hmm's `dmirror->pt`, nouveau's SVMM, amdgpu's SVM ranges): entries
//! filled by `hmm_range_fault` under the interval-notifier protocol, dropped by any
//! invalidation except the owner's own migrations and exclusive grabs, which update
//! the table themselves. Shared by the HMM test device and the GPU.

use std::collections::BTreeMap;

use crate::addr::{Pfn, VirtAddr, PAGE_SIZE};
use crate::hmm::{hmm_range_fault, HmmPfn, HmmRange};
use crate::mm::{DeviceFault, Mm, MmError, MmId};
use crate::notifier::{
    IntervalNotifier, IntervalNotifierOps, NotifyEvent, NotifyRange, Subscription,
};
use crate::sync::{order, Arc, OrderedMutex, Weak};

/// `HMM_RANGE_DEFAULT_TIMEOUT`: how long a fault retries a range that stays busy.
pub(crate) const FAULT_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(1000);
/// Pages per `hmm_range_fault` (test_hmm's `pfns[64]`).
pub(crate) const STEP: u64 = 64;

/// One entry of a device page table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PtEntry {
    /// The frame.
    pub pfn: Pfn,
    /// The device may write it.
    pub write: bool,
    /// The device holds it exclusively for atomics.
    pub atomic: bool,
}

/// A device page table of one address space, and the notifier callback that keeps it
/// honest.
///
/// # Invariants
/// An entry is inserted only under `pt`'s lock after `read_retry` said the
/// `hmm_range_fault` result is current, or by the owner's own migration or exclusive
/// grab while it holds the page; every other invalidation of a range drops its entries
/// before it returns.
pub(crate) struct MirrorTable {
    owner: u64,
    mm_id: MmId,
    /// By page address. Lock order: the device page table (`DEVICE_PT`), before
    /// physical memory's region list (held while frames are looked up and copied).
    pub pt: OrderedMutex<BTreeMap<u64, PtEntry>>,
}

impl MirrorTable {
    /// An empty table for the address space `mm_id`, of a device whose pages carry
    /// `owner`.
    pub fn new(owner: u64, mm_id: MmId) -> Self {
        MirrorTable {
            owner,
            mm_id,
            pt: OrderedMutex::new(&order::DEVICE_PT, BTreeMap::new()),
        }
    }

    /// The address space it mirrors.
    pub fn mm_id(&self) -> MmId {
        self.mm_id
    }

    /// Drops the entries of `[start, end)`.
    pub fn erase(&self, start: u64, end: u64) {
        let mut pt = self.pt.lock();
        let keys: Vec<u64> = pt.range(start..end).map(|(k, _)| *k).collect();
        for k in keys {
            pt.remove(&k);
        }
    }

    /// `dmirror_range_fault` over `[start, end)`, [`STEP`] pages at a time: faults the
    /// pages in (for writing when `write`) and maps them, retrying while the range is
    /// busy or the result went stale, for at most [`FAULT_TIMEOUT`] per step (EBUSY
    /// then). A write fault that leaves a page read-only is EFAULT.
    pub fn fault(
        &self,
        mm: &Mm,
        sub: &IntervalNotifier,
        start: u64,
        end: u64,
        write: bool,
    ) -> Result<(), MmError> {
        let mut addr = start;
        while addr < end {
            let next = (addr + STEP * PAGE_SIZE).min(end);
            self.range_fault(mm, sub, addr, next, write)?;
            addr = next;
        }
        Ok(())
    }

    fn range_fault(
        &self,
        mm: &Mm,
        sub: &IntervalNotifier,
        start: u64,
        end: u64,
        write: bool,
    ) -> Result<(), MmError> {
        let op = "device fault";
        let deadline = std::time::Instant::now() + FAULT_TIMEOUT;
        loop {
            if std::time::Instant::now() > deadline {
                return Err(MmError::Busy {
                    op,
                    addr: VirtAddr(start),
                    why: "the range stayed busy",
                });
            }
            let mut range = HmmRange::new(sub, VirtAddr(start), VirtAddr(end));
            range.default_flags = HmmPfn::REQ_FAULT
                | if write {
                    HmmPfn::REQ_WRITE
                } else {
                    HmmPfn::NONE
                };
            range.dev_private_owner = Some(self.owner);
            match hmm_range_fault(mm, &mut range) {
                Ok(()) => {}
                Err(MmError::Busy { .. }) => continue,
                Err(e) => return Err(e),
            }
            let mut pt = self.pt.lock();
            if sub.read_retry(range.notifier_seq) {
                continue;
            }
            for (i, f) in range.pfns.iter().enumerate() {
                let va = start + i as u64 * PAGE_SIZE;
                let pfn = f
                    .pfn()
                    .unwrap_or_else(|| unreachable!("faulted pages are valid"));
                if write && !f.contains(HmmPfn::WRITE) {
                    return Err(MmError::Fault {
                        op,
                        addr: VirtAddr(va),
                        why: "a write fault left the page read-only",
                    });
                }
                let entry = PtEntry {
                    pfn,
                    write: f.contains(HmmPfn::WRITE),
                    atomic: false,
                };
                pt.insert(va, entry);
            }
            return Ok(());
        }
    }
}

impl IntervalNotifierOps for MirrorTable {
    /// `dmirror_interval_invalidate`: the owner's own migrations and exclusive grabs
    /// update the table themselves; anything else drops the entries of the range.
    fn invalidate(&self, _sub: &Subscription, range: &NotifyRange, _seq: u64) -> bool {
        let own = range.owner == Some(self.owner);
        if own && matches!(range.event, NotifyEvent::Migrate | NotifyEvent::Exclusive) {
            return true;
        }
        self.erase(range.start.0, range.end.0);
        true
    }
}

/// The mirror tables of one device, one per address space it mirrors, so that a page
/// the device gives back can be dropped from every one.
pub(crate) struct MirrorSet(OrderedMutex<Vec<Weak<MirrorTable>>>);

impl MirrorSet {
    /// No tables yet.
    pub fn new() -> Self {
        MirrorSet(OrderedMutex::new(&order::LEAF, Vec::new()))
    }

    /// Adds `table`, forgetting the tables of closed mirrors.
    pub fn add(&self, table: &Arc<MirrorTable>) {
        let mut tables = self.0.lock();
        tables.retain(|w| w.strong_count() > 0);
        tables.push(Arc::downgrade(table));
    }

    /// Drops every table's entries for `[va, va + len)` of the address space `mm`.
    pub fn forget(&self, mm: MmId, va: VirtAddr, len: u64) {
        let tables: Vec<Arc<MirrorTable>> = self
            .0
            .lock()
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|t| t.mm_id() == mm)
            .collect();
        for t in tables {
            t.erase(va.0, va.0 + len);
        }
    }
}

/// A device's `migrate_to_ram` (`dmirror_devmem_fault`, nouveau's and amdgpu's SVM
/// fault handlers): migrates the faulting device-private page of `owner` to a fresh
/// RAM page from the fault, copying what `migrate_vma` collected — the page may have
/// moved since the fault looked, and the frame it saw may be someone else's by now —
/// and drops every mirror's entry for it before the old page goes. `fail_alloc`
/// injects an allocation failure: the fault fails with ENOMEM and the page stays. A
/// page that is busy or shared by fork is left to peerdma's CPU copy. Returns whether
/// this call moved the page.
pub(crate) fn owner_fault_to_ram(
    fault: &DeviceFault<'_>,
    owner: u64,
    mirrors: &MirrorSet,
    fail_alloc: bool,
) -> Result<bool, MmError> {
    let op = "device migrate_to_ram";
    let mut m = fault.migrate_vma(Some(owner))?;
    if m.cpages() == 0 {
        drop(m);
        fault.copy_to_ram()?;
        return Ok(false);
    }
    let Some(src) = m.src()[0].pfn else {
        return Ok(false);
    };
    let ram = fault.mm().phys().ram().clone();
    let new = if fail_alloc {
        // VM_FAULT_OOM: the migration is abandoned, the page stays mapped as before.
        Err(MmError::NoMemory {
            op,
            addr: fault.va(),
            why: "allocation failure injected (FAIL_ALLOC)".into(),
            source: None,
        })
    } else {
        ram.alloc().map_err(|e| MmError::nomem(op, fault.va(), e))
    }?;
    // The device lets go first: dropping its entries waits for any access in progress
    // (it holds the table) and stops new ones, so nothing writes the old page after
    // the copy (test_hmm erases before copy_highpage too).
    mirrors.forget(fault.mm().id(), fault.va(), PAGE_SIZE);
    fault.region().copy_frame(src, &ram, new);
    m.set_dst(0, &ram, new);
    m.pages();
    let moved = m.src()[0].migrate;
    m.finalize();
    Ok(moved)
}
