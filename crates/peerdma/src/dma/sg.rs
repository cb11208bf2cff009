//! Scatter-gather tables (`struct sg_table`): a byte range of memory as physically
//! contiguous segments, each at most a maximum segment size long.

use crate::addr::{Pfn, PAGE_SIZE};

/// One physically contiguous piece: `len` bytes from byte `offset` of frame `pfn`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SgEntry {
    /// First frame.
    pub pfn: Pfn,
    /// Offset into the first frame.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

impl SgEntry {
    /// Frames the entry touches.
    pub fn frames(&self) -> u64 {
        (self.offset + self.len).div_ceil(PAGE_SIZE)
    }
}

/// A scatter-gather table.
///
/// # Invariants
/// Entries are non-empty, at most `max_segment` bytes, and in order; two neighbours are
/// only split where the frames are not contiguous or the segment limit forced it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SgTable {
    entries: Vec<SgEntry>,
}

impl SgTable {
    /// The table for `len` bytes starting `offset` bytes into the first of `frames`,
    /// one frame at a time (contiguous ones are coalesced, as [`from_runs`] does).
    ///
    /// [`from_runs`]: Self::from_runs
    pub fn from_frames(frames: &[Pfn], offset: u64, len: u64, max_segment: u64) -> Self {
        let runs: Vec<(Pfn, u32)> = frames.iter().map(|&p| (p, 1)).collect();
        Self::from_runs(&runs, offset, len, max_segment)
    }

    /// The table for `len` bytes starting `offset` bytes into the first of `frames`
    /// (given as runs of contiguous frames `(first, count)`), coalescing contiguous
    /// frames and splitting at `max_segment` bytes (at least one page).
    pub fn from_runs(runs: &[(Pfn, u32)], offset: u64, len: u64, max_segment: u64) -> Self {
        let max_segment = max_segment.max(PAGE_SIZE);
        let mut entries: Vec<SgEntry> = Vec::new();
        let mut skip = offset; // bytes still to skip at the start
        let mut left = len;
        for &(first, n) in runs {
            if left == 0 {
                break;
            }
            let run_bytes = u64::from(n) * PAGE_SIZE;
            if skip >= run_bytes {
                skip -= run_bytes;
                continue;
            }
            let mut pos = skip; // byte position inside this run
            skip = 0;
            while pos < run_bytes && left > 0 {
                let take = (run_bytes - pos).min(left);
                let pfn = Pfn(first.0 + pos / PAGE_SIZE);
                let off = pos % PAGE_SIZE;
                // Merge with the previous entry when physically contiguous and room left.
                if let Some(last) = entries.last_mut() {
                    let end = last.pfn.0 * PAGE_SIZE + last.offset + last.len;
                    if end == pfn.0 * PAGE_SIZE + off && last.len < max_segment {
                        let add = take.min(max_segment - last.len);
                        last.len += add;
                        pos += add;
                        left -= add;
                        continue;
                    }
                }
                let add = take.min(max_segment);
                entries.push(SgEntry {
                    pfn,
                    offset: off,
                    len: add,
                });
                pos += add;
                left -= add;
            }
        }
        SgTable { entries }
    }

    /// The entries.
    pub fn entries(&self) -> &[SgEntry] {
        &self.entries
    }

    /// Total bytes.
    pub fn len(&self) -> u64 {
        self.entries.iter().map(|e| e.len).sum()
    }

    /// Whether it has no entry.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The table covers exactly the requested bytes, in order; no entry exceeds the
        /// segment limit; neighbours are split only where frames are not contiguous or
        /// the limit forced it.
        #[test]
        fn sg_tables_coalesce_and_respect_max_segment(
            frames in proptest::collection::vec(0u64..64, 1..40),
            offset in 0u64..4096,
            cut in 0u64..4096,
            max_pages in 1u64..8,
        ) {
            // Frames as runs: turn the random list into ascending frames with gaps.
            let mut pfns = Vec::new();
            let mut at = 100u64;
            for g in &frames {
                at += 1 + if g % 3 == 0 { *g } else { 0 };
                pfns.push(Pfn(at));
            }
            let mut runs: Vec<(Pfn, u32)> = Vec::new();
            for &p in &pfns {
                match runs.last_mut() {
                    Some((f, n)) if f.0 + u64::from(*n) == p.0 => *n += 1,
                    _ => runs.push((p, 1)),
                }
            }
            let total = pfns.len() as u64 * PAGE_SIZE;
            let offset = offset.min(total - 1);
            let len = (total - offset).saturating_sub(cut).max(1);
            let max_segment = max_pages * PAGE_SIZE;
            let sg = SgTable::from_runs(&runs, offset, len, max_segment);
            prop_assert_eq!(sg.len(), len);
            // Byte-by-byte expansion equals the expected physical addresses.
            let expect: Vec<u64> = (offset..offset + len)
                .step_by(509)
                .map(|b| pfns[(b / PAGE_SIZE) as usize].0 * PAGE_SIZE + b % PAGE_SIZE)
                .collect();
            let mut got = Vec::new();
            let mut base = 0u64;
            for e in sg.entries() {
                prop_assert!(e.len > 0 && e.len <= max_segment);
                for b in (offset..offset + len).step_by(509) {
                    let rel = b - offset;
                    if rel >= base && rel < base + e.len {
                        got.push(e.pfn.0 * PAGE_SIZE + e.offset + rel - base);
                    }
                }
                base += e.len;
            }
            prop_assert_eq!(got, expect);
            for w in sg.entries().windows(2) {
                let end = w[0].pfn.0 * PAGE_SIZE + w[0].offset + w[0].len;
                let start = w[1].pfn.0 * PAGE_SIZE + w[1].offset;
                prop_assert!(end != start || w[0].len == max_segment, "contiguous neighbours left split");
            }
        }
    }
}
