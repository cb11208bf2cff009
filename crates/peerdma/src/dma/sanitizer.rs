//! The DMA sanitizer: shadow state per frame (live mappings, the generation each
//! mapping saw, pins as the frame metadata counts them) and a record of every device
//! access that broke a rule — to an address no live mapping covers, to a frame freed or
//! moved since it was mapped, in a direction the mapping does not allow, or past the
//! end of a mapping. A violation is reported, never silent corruption: the access is
//! refused and the bytes are not moved.

use std::collections::HashMap;
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

const HISTORY: usize = 8;

#[derive(Default)]
struct Shadow {
    live: HashMap<Pfn, u32>,
    history: HashMap<Pfn, Vec<String>>,
}

/// The sanitizer of one host.
#[derive(Default)]
pub struct Sanitizer {
    /// Lock order: a leaf.
    shadow: Mutex<Shadow>,
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
    pub(crate) fn mapped(&self, frames: impl IntoIterator<Item = Pfn>, event: &str) {
        let mut s = lock(&self.shadow);
        for p in frames {
            *s.live.entry(p).or_default() += 1;
            let h = s.history.entry(p).or_default();
            h.push(event.to_string());
            if h.len() > HISTORY {
                h.remove(0);
            }
        }
    }

    pub(crate) fn unmapped(&self, frames: impl IntoIterator<Item = Pfn>, event: &str) {
        let mut s = lock(&self.shadow);
        for p in frames {
            if let Some(n) = s.live.get_mut(&p) {
                *n -= 1;
                if *n == 0 {
                    s.live.remove(&p);
                }
            }
            let h = s.history.entry(p).or_default();
            h.push(event.to_string());
            if h.len() > HISTORY {
                h.remove(0);
            }
        }
    }

    /// Records a violation, adding the frame's history; returns it as recorded.
    pub(crate) fn record(&self, mut v: Violation) -> Violation {
        if let Some(p) = v.frame {
            v.history = lock(&self.shadow)
                .history
                .get(&p)
                .cloned()
                .unwrap_or_default();
        }
        lock(&self.violations).push(v.clone());
        v
    }

    /// Live DMA mappings of a frame.
    pub fn live_mappings(&self, pfn: Pfn) -> u32 {
        lock(&self.shadow).live.get(&pfn).copied().unwrap_or(0)
    }

    /// Frames with at least one live mapping.
    pub fn mapped_frames(&self) -> usize {
        lock(&self.shadow).live.len()
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
