//! The frame allocator of one region: free runs of frames keyed by start, first fit,
//! coalesced on free (the role of the kernel's buddy allocator, without the orders).
//! Frames above the high-water mark were never handed out and are still zero in the
//! sparse backing, so only reused frames need clearing.

use std::collections::BTreeMap;

/// Free frame runs of one region, as indices from the region's first frame.
///
/// # Invariants
/// Runs are non-empty, disjoint and never adjacent (adjacent runs are merged);
/// `free` is the sum of their lengths.
#[derive(Debug)]
pub struct FreeRuns {
    runs: BTreeMap<u64, u64>,
    free: u64,
    high_water: u64,
}

impl FreeRuns {
    /// All `frames` frames free.
    pub fn new(frames: u64) -> Self {
        let mut runs = BTreeMap::new();
        if frames > 0 {
            runs.insert(0, frames);
        }
        FreeRuns {
            runs,
            free: frames,
            high_water: 0,
        }
    }

    /// Free frames.
    pub fn free(&self) -> u64 {
        self.free
    }

    /// Frames at or above this index have never been allocated.
    pub fn high_water(&self) -> u64 {
        self.high_water
    }

    /// `n` contiguous frames whose first index is a multiple of `align` (a power of two),
    /// first fit; `None` when no run is long enough.
    pub fn alloc_contig(&mut self, n: u64, align: u64) -> Option<u64> {
        debug_assert!(n > 0 && align.is_power_of_two());
        let (start, len, at) = self.runs.iter().find_map(|(&s, &l)| {
            let at = s.next_multiple_of(align);
            (at + n <= s + l).then_some((s, l, at))
        })?;
        self.runs.remove(&start);
        if at > start {
            self.runs.insert(start, at - start);
        }
        if at + n < start + len {
            self.runs.insert(at + n, start + len - at - n);
        }
        self.free -= n;
        self.high_water = self.high_water.max(at + n);
        Some(at)
    }

    /// Up to `n` single frames, appended to `out` (from the lowest runs).
    pub fn alloc_bulk(&mut self, mut n: u64, out: &mut Vec<u64>) {
        while n > 0 {
            let Some((&s, &l)) = self.runs.iter().next() else {
                break;
            };
            let take = l.min(n);
            self.runs.remove(&s);
            if take < l {
                self.runs.insert(s + take, l - take);
            }
            out.extend(s..s + take);
            self.free -= take;
            self.high_water = self.high_water.max(s + take);
            n -= take;
        }
    }

    /// Returns `[start, start + n)` to the free runs, merging neighbours.
    pub fn free_run(&mut self, start: u64, n: u64) {
        debug_assert!(n > 0);
        let mut s = start;
        let mut l = n;
        if let Some((&ps, &pl)) = self.runs.range(..start).next_back() {
            debug_assert!(ps + pl <= start, "double free of frame {start:#x}");
            if ps + pl == start {
                self.runs.remove(&ps);
                s = ps;
                l += pl;
            }
        }
        if let Some(&nl) = self.runs.get(&(start + n)) {
            self.runs.remove(&(start + n));
            l += nl;
        }
        debug_assert!(
            self.runs.range(start..start + n).next().is_none(),
            "double free of frames {start:#x}+{n}"
        );
        self.runs.insert(s, l);
        self.free += n;
    }

    /// Frees sorted or unsorted single frames, merging consecutive ones into runs first.
    pub fn free_many(&mut self, idx: &mut [u64]) {
        idx.sort_unstable();
        let mut i = 0;
        while i < idx.len() {
            let mut j = i + 1;
            while j < idx.len() && idx[j] == idx[j - 1] + 1 {
                j += 1;
            }
            self.free_run(idx[i], (j - i) as u64);
            i = j;
        }
    }

    /// The free runs, for tests and `trim`.
    pub fn runs(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.runs.iter().map(|(&s, &l)| (s, l))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The allocator never hands out a frame twice and loses none: a model set of
        /// owned frames stays disjoint from the free runs, and free + owned = all.
        #[test]
        fn never_hands_out_a_frame_twice(ops in proptest::collection::vec((0u8..4, 1u64..40, 0usize..64), 1..200)) {
            const N: u64 = 1024;
            let mut a = FreeRuns::new(N);
            let mut owned: Vec<u64> = Vec::new();
            for (op, n, pick) in ops {
                match op {
                    0 => {
                        let mut out = Vec::new();
                        a.alloc_bulk(n, &mut out);
                        owned.extend(out);
                    }
                    1 => {
                        if let Some(s) = a.alloc_contig(n, 1 << (pick % 4)) {
                            prop_assert_eq!(s % (1 << (pick % 4)), 0);
                            owned.extend(s..s + n);
                        }
                    }
                    _ => {
                        if !owned.is_empty() {
                            let k = (pick % owned.len()).min(owned.len());
                            let mut freed: Vec<u64> = owned.drain(k..(k + n as usize).min(owned.len())).collect();
                            a.free_many(&mut freed);
                        }
                    }
                }
                let mut sorted = owned.clone();
                sorted.sort_unstable();
                let before = sorted.len();
                sorted.dedup();
                prop_assert_eq!(before, sorted.len(), "a frame was handed out twice");
                for (s, l) in a.runs() {
                    prop_assert!(sorted.iter().all(|&f| f < s || f >= s + l));
                }
                prop_assert_eq!(a.free() + owned.len() as u64, N);
                let runs: Vec<(u64, u64)> = a.runs().collect();
                for w in runs.windows(2) {
                    prop_assert!(w[0].0 + w[0].1 < w[1].0, "adjacent runs not merged");
                }
            }
        }
    }
}
