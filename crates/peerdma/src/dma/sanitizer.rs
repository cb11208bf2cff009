//! The DMA sanitizer: shadow state per frame (the generation each mapping saw, kept in
//! the mapping; pins and the current generation in the frame metadata; live mappings in
//! the host's registry; a log of mapping events for histories) and a record of every device
//! access that broke a rule — to an address no live mapping covers, to a frame freed or
//! moved since it was mapped, in a direction the mapping does not allow, or past the
//! end of a mapping. A violation is reported, never silent corruption: the access is
//! refused and the bytes are not moved.

use std::fmt;

use crate::addr::{Bdf, DmaAddr, Pfn};
use crate::sync::{lock, Mutex};

/// Which rule an access broke.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ViolationKind {
    /// No live mapping of the device covers the address (use after unmap, a wild
    /// address).
    Unmapped,
    /// The frame was freed or its contents moved since it was mapped.
    StaleFrame {
        /// The frame's generation when mapped.
        mapped: u32,
        /// Its generation now.
        now: u32,
    },
    /// The mapping does not allow this direction.
    WrongDirection,
    /// The access runs past the end of the mapping.
    PastEnd,
}

/// One refused access.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The device.
    pub dev: Bdf,
    /// The DMA address used.
    pub addr: DmaAddr,
    /// Bytes.
    pub len: u64,
    /// Whether the device was writing memory.
    pub write: bool,
    /// The frame, when one could be named.
    pub frame: Option<Pfn>,
    /// What was wrong.
    pub kind: ViolationKind,
    /// The frame's recent mapping history (oldest first).
    pub history: Vec<String>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {:#x} bytes at {}: ",
            self.dev,
            if self.write { "wrote" } else { "read" },
            self.len,
            self.addr
        )?;
        match &self.kind {
            ViolationKind::Unmapped => f.write_str("no live mapping covers it")?,
            ViolationKind::StaleFrame { mapped, now } => write!(
                f,
                "frame changed identity since it was mapped (generation {mapped} then, {now} now)"
            )?,
            ViolationKind::WrongDirection => {
                f.write_str("the mapping does not allow this direction")?
            }
            ViolationKind::PastEnd => f.write_str("past the end of the mapping")?,
        }
        if let Some(p) = self.frame {
            write!(f, " [{p}")?;
            if !self.history.is_empty() {
                write!(f, "; history: {}", self.history.join(", "))?;
            }
            f.write_str("]")?;
        }
        Ok(())
    }
}

/// Frame history entries attached to a violation.
const HISTORY: usize = 8;
/// Mapping events kept for histories.
const EVENTS: usize = 4096;

#[derive(Clone, Copy, Debug)]
struct Event {
    id: u64,
    dev: Bdf,
    first: Pfn,
    frames: u64,
    /// `Some((direction, address))` for a mapping, `None` for its unmapping.
    mapped: Option<(crate::dma::Direction, DmaAddr)>,
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.mapped {
            Some((dir, addr)) => {
                write!(f, "mapped #{} for {} {dir:?} at {addr}", self.id, self.dev)
            }
            None => write!(f, "unmapped #{} of {}", self.id, self.dev),
        }
    }
}

/// The sanitizer of one host. Per frame it relies on the frame metadata for pins and
/// generation, and on the host's live mappings; it keeps a bounded log of mapping
/// events so a violation can show what happened to its frame.
#[derive(Default)]
pub struct Sanitizer {
    /// Lock order: a leaf.
    events: Mutex<std::collections::VecDeque<Event>>,
    violations: Mutex<Vec<Violation>>,
}

impl fmt::Debug for Sanitizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sanitizer")
            .field("violations", &lock(&self.violations).len())
            .finish()
    }
}

impl Sanitizer {
    fn log(&self, e: Event) {
        let mut ev = lock(&self.events);
        if ev.len() == EVENTS {
            ev.pop_front();
        }
        ev.push_back(e);
    }

    pub(crate) fn mapped(
        &self,
        id: u64,
        dev: Bdf,
        first: Pfn,
        frames: u64,
        dir: crate::dma::Direction,
        addr: DmaAddr,
    ) {
        self.log(Event {
            id,
            dev,
            first,
            frames,
            mapped: Some((dir, addr)),
        });
    }

    pub(crate) fn unmapped(&self, id: u64, dev: Bdf, first: Pfn, frames: u64) {
        self.log(Event {
            id,
            dev,
            first,
            frames,
            mapped: None,
        });
    }

    fn history(&self, pfn: Pfn) -> Vec<String> {
        let ev = lock(&self.events);
        let mut h: Vec<String> = ev
            .iter()
            .rev()
            .filter(|e| pfn.0 >= e.first.0 && pfn.0 < e.first.0 + e.frames)
            .take(HISTORY)
            .map(ToString::to_string)
            .collect();
        h.reverse();
        h
    }

    /// Records a violation, adding the frame's history; returns it as recorded.
    pub(crate) fn record(&self, mut v: Violation) -> Violation {
        if let Some(p) = v.frame {
            v.history = self.history(p);
        }
        tracing::warn!(dev = %v.dev, addr = %v.addr, "DMA sanitizer: {v}");
        lock(&self.violations).push(v.clone());
        v
    }

    /// Every violation so far.
    pub fn violations(&self) -> Vec<Violation> {
        lock(&self.violations).clone()
    }

    /// Whether no access broke a rule.
    pub fn is_clean(&self) -> bool {
        lock(&self.violations).is_empty()
    }
}
