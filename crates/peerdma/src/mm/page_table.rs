//! A four-level radix page table like x86-64's: 48-bit virtual addresses, 512 entries a
//! level, tables allocated on demand and freed when they empty. A lookup is four
//! indexings; a range walk skips absent tables whole.

use crate::addr::{VirtAddr, PAGE_SHIFT};
use crate::mm::pte::Pte;

const BITS: u32 = 9;
const FANOUT: usize = 1 << BITS;
/// One past the highest user address (47 bits, as x86-64 user space).
pub const TASK_SIZE: u64 = 1 << 47;

struct Leaf {
    ptes: Box<[Pte; FANOUT]>,
    used: u32,
}

struct Dir<T> {
    slots: Box<[Option<Box<T>>]>,
    used: u32,
}

impl<T> Dir<T> {
    fn new() -> Self {
        Dir {
            slots: (0..FANOUT).map(|_| None).collect(),
            used: 0,
        }
    }

    /// The table in slot `i`, made by `make` (and counted) if absent.
    fn child(&mut self, i: usize, make: impl FnOnce() -> T) -> &mut T {
        if self.slots[i].is_none() {
            self.slots[i] = Some(Box::new(make()));
            self.used += 1;
        }
        self.slots[i]
            .as_deref_mut()
            .unwrap_or_else(|| unreachable!())
    }
}

fn index(va: u64, level: u32) -> usize {
    ((va >> (PAGE_SHIFT + BITS * level)) & (FANOUT as u64 - 1)) as usize
}

/// The page table of one address space.
///
/// # Invariants
/// Every allocated table has `used` equal to its number of non-empty slots; tables
/// with `used == 0` are freed by the walk that emptied them.
pub struct PageTable {
    root: Dir<Dir<Dir<Leaf>>>,
    present: u64,
}

impl Default for PageTable {
    fn default() -> Self {
        Self::new()
    }
}

impl PageTable {
    /// An empty table.
    pub fn new() -> Self {
        PageTable {
            root: Dir::new(),
            present: 0,
        }
    }

    /// Non-empty entries.
    pub fn entries(&self) -> u64 {
        self.present
    }

    fn leaf(&self, va: u64) -> Option<&Leaf> {
        let l3 = self.root.slots[index(va, 3)].as_deref()?;
        let l2 = l3.slots[index(va, 2)].as_deref()?;
        l2.slots[index(va, 1)].as_deref()
    }

    /// The entries from `va` to the end of its leaf table (empty when there is none):
    /// a batch walk reads a run of pages with one lookup.
    pub fn run(&self, va: VirtAddr) -> &[Pte] {
        self.leaf(va.0)
            .map_or(&[][..], |l| &l.ptes[index(va.0, 0)..])
    }

    /// The entry for `va` (empty if none).
    pub fn get(&self, va: VirtAddr) -> Pte {
        self.leaf(va.0)
            .map_or(Pte::EMPTY, |l| l.ptes[index(va.0, 0)])
    }

    /// Replaces the entry for `va`, allocating tables as needed; returns the old one.
    pub fn set(&mut self, va: VirtAddr, pte: Pte) -> Pte {
        debug_assert!(va.0 < TASK_SIZE);
        let (i3, i2, i1) = (index(va.0, 3), index(va.0, 2), index(va.0, 1));
        let root = &mut self.root;
        let l3 = root.child(i3, Dir::new);
        let l2 = l3.child(i2, Dir::new);
        let leaf = l2.child(i1, || Leaf {
            ptes: Box::new([Pte::EMPTY; FANOUT]),
            used: 0,
        });
        let old = std::mem::replace(&mut leaf.ptes[index(va.0, 0)], pte);
        match (old.is_empty(), pte.is_empty()) {
            (true, false) => {
                leaf.used += 1;
                self.present += 1;
            }
            (false, true) => {
                leaf.used -= 1;
                self.present -= 1;
            }
            _ => {}
        }
        if leaf.used == 0 {
            self.free_empty(i3, i2, i1);
        }
        old
    }

    /// Sets `count` consecutive entries from `start` to `pte(i)` for `i` in
    /// `0..count`, creating tables as needed, one leaf lookup per 512 entries (bulk
    /// mapping, as an IO page table is filled).
    pub fn fill(&mut self, start: VirtAddr, count: u64, mut pte: impl FnMut(u64) -> Pte) {
        let mut i = 0u64;
        while i < count {
            let va = start.0 + i * (1 << PAGE_SHIFT);
            debug_assert!(va < TASK_SIZE);
            let (i3, i2, i1) = (index(va, 3), index(va, 2), index(va, 1));
            let leaf = self
                .root
                .child(i3, Dir::new)
                .child(i2, Dir::new)
                .child(i1, || Leaf {
                    ptes: Box::new([Pte::EMPTY; FANOUT]),
                    used: 0,
                });
            let first = index(va, 0);
            let n = ((FANOUT - first) as u64).min(count - i);
            let mut added = 0u64;
            let mut removed = 0u64;
            for k in 0..n {
                let new = pte(i + k);
                let slot = &mut leaf.ptes[first + k as usize];
                match (slot.is_empty(), new.is_empty()) {
                    (true, false) => added += 1,
                    (false, true) => removed += 1,
                    _ => {}
                }
                *slot = new;
            }
            leaf.used = leaf.used + added as u32 - removed as u32;
            self.present = self.present + added - removed;
            if leaf.used == 0 {
                self.free_empty(i3, i2, i1);
            }
            i += n;
        }
    }

    /// Frees the leaf at `(i3, i2, i1)` if it is empty, and the directories above it
    /// that this leaves empty.
    fn free_empty(&mut self, i3: usize, i2: usize, i1: usize) {
        let Some(l3) = self.root.slots[i3].as_deref_mut() else {
            return;
        };
        let Some(l2) = l3.slots[i2].as_deref_mut() else {
            return;
        };
        if l2.slots[i1].as_ref().is_some_and(|l| l.used == 0) {
            l2.slots[i1] = None;
            l2.used -= 1;
        }
        if l2.used == 0 {
            l3.slots[i2] = None;
            l3.used -= 1;
        }
        if l3.used == 0 {
            self.root.slots[i3] = None;
            self.root.used -= 1;
        }
    }

    /// Calls `f` for every non-empty entry in `[start, end)`, in address order; `f` may
    /// change the entry (to empty, too). Absent tables are skipped whole.
    pub fn walk_mut(
        &mut self,
        start: VirtAddr,
        end: VirtAddr,
        mut f: impl FnMut(VirtAddr, &mut Pte),
    ) {
        let (start, end) = (start.0, end.0.min(TASK_SIZE));
        let span = |level: u32| 1u64 << (PAGE_SHIFT + BITS * level);
        let mut va = start;
        let mut present = self.present;
        while va < end {
            let i3 = index(va, 3);
            let Some(l3) = self.root.slots[i3].as_deref_mut() else {
                va = (va & !(span(3) - 1)) + span(3);
                continue;
            };
            let i2 = index(va, 2);
            let Some(l2) = l3.slots[i2].as_deref_mut() else {
                va = (va & !(span(2) - 1)) + span(2);
                continue;
            };
            let i1 = index(va, 1);
            let Some(leaf) = l2.slots[i1].as_deref_mut() else {
                va = (va & !(span(1) - 1)) + span(1);
                continue;
            };
            let leaf_end = ((va & !(span(1) - 1)) + span(1)).min(end);
            while va < leaf_end {
                let slot = &mut leaf.ptes[index(va, 0)];
                if !slot.is_empty() {
                    f(VirtAddr(va), slot);
                    if slot.is_empty() {
                        leaf.used -= 1;
                        present -= 1;
                    }
                }
                va += span(0);
            }
            if leaf.used == 0 {
                self.free_empty(i3, i2, i1);
            }
        }
        self.present = present;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::Pfn;
    use proptest::prelude::*;
    use std::collections::HashMap;

    proptest! {
        /// The page table agrees with a HashMap model under random sets, clears and
        /// range walks that write-protect or clear.
        #[test]
        fn matches_a_hashmap_model(ops in proptest::collection::vec((0u8..5, 0u64..1u64 << 20, 1u64..3000, any::<bool>()), 1..300)) {
            let mut pt = PageTable::new();
            let mut model: HashMap<u64, Pte> = HashMap::new();
            // Spread pages over several top-level tables.
            let va = |p: u64| VirtAddr(((p * 0x9e37) % (1 << 35)) << PAGE_SHIFT);
            for (op, page, len, flag) in ops {
                match op {
                    0 => {
                        let pte = Pte::present(Pfn(page + 1), flag);
                        let old = pt.set(va(page), pte);
                        prop_assert_eq!(old, model.insert(va(page).0, pte).unwrap_or(Pte::EMPTY));
                    }
                    1 => {
                        let old = pt.set(va(page), Pte::EMPTY);
                        prop_assert_eq!(old, model.remove(&va(page).0).unwrap_or(Pte::EMPTY));
                    }
                    4 => {
                        // Bulk fill of a run (possibly across leaves), clearing every
                        // third entry.
                        let s = va(page).0;
                        let len = len % 700 + 1; // up to two leaf boundaries
                        pt.fill(VirtAddr(s), len, |i| {
                            if flag && i % 3 == 0 { Pte::EMPTY } else { Pte::present(Pfn(i + 7), true) }
                        });
                        for i in 0..len {
                            let k = s + i * (1 << PAGE_SHIFT);
                            if flag && i % 3 == 0 {
                                model.remove(&k);
                            } else {
                                model.insert(k, Pte::present(Pfn(i + 7), true));
                            }
                        }
                    }
                    _ => {
                        let s = va(page).0;
                        let e = s + len * (1 << PAGE_SHIFT);
                        let mut seen = Vec::new();
                        pt.walk_mut(VirtAddr(s), VirtAddr(e), |a, p| {
                            seen.push(a.0);
                            *p = if flag { p.wrprotect() } else { Pte::EMPTY };
                        });
                        let mut expect: Vec<u64> = model.keys().copied().filter(|k| *k >= s && *k < e).collect();
                        expect.sort_unstable();
                        prop_assert_eq!(&seen, &expect, "walk visits exactly the mapped pages in order");
                        for k in expect {
                            if flag {
                                let p = model[&k].wrprotect();
                                model.insert(k, p);
                            } else {
                                model.remove(&k);
                            }
                        }
                    }
                }
                prop_assert_eq!(pt.entries(), model.len() as u64);
            }
            for (k, v) in &model {
                prop_assert_eq!(pt.get(VirtAddr(*k)), *v);
            }
        }
    }

    #[test]
    fn emptied_tables_are_freed() {
        let mut pt = PageTable::new();
        let a = VirtAddr(0x7f00_0000_0000);
        pt.set(a, Pte::present(Pfn(5), true));
        assert!(pt.root.slots.iter().any(Option::is_some));
        pt.walk_mut(a, VirtAddr(a.0 + 4096), |_, p| *p = Pte::EMPTY);
        assert!(pt.root.slots.iter().all(Option::is_none));
        pt.set(a, Pte::present(Pfn(5), true));
        pt.set(a, Pte::EMPTY);
        assert!(pt.root.slots.iter().all(Option::is_none));
        assert_eq!(pt.entries(), 0);
    }
}
