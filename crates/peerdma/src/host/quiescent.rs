//! `Host::quiescent()`: what a host still holds once a test or a job is done — running
//! processes, frames in use by region, DMA pins, DMA mappings, IOVA space, notifier
//! subscriptions and p2p memory. One report every test checks at its end, instead of
//! counters each test picks by hand.

use std::fmt;

use serde::Serialize;

use crate::addr::Bdf;
use crate::host::{Host, Pid};
use crate::mem::FrameUsage;

/// One memory region's frames still in use.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RegionUse {
    /// What the region is.
    pub kind: String,
    /// Its frames in use.
    pub usage: FrameUsage,
}

/// One p2p provider's memory still in use.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct P2pUse {
    /// The providing function.
    pub dev: Bdf,
    /// Its BAR.
    pub bar: u8,
    /// Bytes allocated from its pool.
    pub bytes: u64,
    /// Live address spaces it recorded as mapping its pages.
    pub users: usize,
}

/// What a host still holds ([`Host::quiescent`]). Clean when every list is empty and
/// every count zero.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Quiescence {
    /// Processes spawned and not exited.
    pub processes: Vec<Pid>,
    /// Regions with frames in use (pinned and page-locked frames counted inside).
    pub regions: Vec<RegionUse>,
    /// Live DMA mapping segments, all devices.
    pub dma_mappings: usize,
    /// IOVA pages allocated, all domains.
    pub iova_pages: u64,
    /// IO page-table entries linked, all domains.
    pub io_ptes: u64,
    /// Interval-notifier subscriptions on address spaces still alive.
    pub notifier_subscriptions: usize,
    /// p2p providers with memory allocated or users recorded.
    pub p2p: Vec<P2pUse>,
}

impl Quiescence {
    /// Whether nothing is held.
    pub fn is_clean(&self) -> bool {
        *self == Quiescence::default()
    }
    /// Frames in use over all regions.
    pub fn frames(&self) -> u64 {
        self.regions.iter().map(|r| r.usage.allocated).sum()
    }
    /// DMA-pinned frames over all regions.
    pub fn pinned(&self) -> u64 {
        self.regions.iter().map(|r| r.usage.pinned).sum()
    }
    /// Panics with the report unless it is clean: the check at the end of a test.
    #[track_caller]
    pub fn assert_clean(&self) {
        assert!(self.is_clean(), "host not quiescent:\n{self}");
    }
}

impl fmt::Display for Quiescence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_clean() {
            return f.write_str("quiescent: nothing held");
        }
        if !self.processes.is_empty() {
            let pids: Vec<String> = self.processes.iter().map(|p| p.0.to_string()).collect();
            writeln!(f, "  processes not exited: {}", pids.join(", "))?;
        }
        for r in &self.regions {
            writeln!(
                f,
                "  {}: {} frames in use ({} DMA-pinned, {} page-locked)",
                r.kind, r.usage.allocated, r.usage.pinned, r.usage.locked
            )?;
        }
        if self.dma_mappings > 0 {
            writeln!(f, "  DMA mapping segments live: {}", self.dma_mappings)?;
        }
        if self.iova_pages > 0 || self.io_ptes > 0 {
            writeln!(
                f,
                "  IOVA pages allocated: {}, IO page-table entries: {}",
                self.iova_pages, self.io_ptes
            )?;
        }
        if self.notifier_subscriptions > 0 {
            writeln!(
                f,
                "  interval-notifier subscriptions: {}",
                self.notifier_subscriptions
            )?;
        }
        for p in &self.p2p {
            writeln!(
                f,
                "  p2p memory of {} BAR {}: {:#x} bytes allocated, {} address spaces recorded",
                p.dev, p.bar, p.bytes, p.users
            )?;
        }
        Ok(())
    }
}

impl Host {
    /// Checks every frame's references against its holders ([`crate::mm::audit_frames`]):
    /// page-table entries, pins and owners. Call it between operations.
    pub fn frame_audit(&self) -> Result<crate::mm::Ledger, crate::mm::FrameFault> {
        crate::mm::audit_frames(&self.phys)
    }

    /// What the host still holds: the leak report. A test ends with
    /// `host.quiescent().assert_clean()` once its processes exited and its handles
    /// (pins, mappings, subscriptions, allocations) were dropped.
    pub fn quiescent(&self) -> Quiescence {
        let regions = self
            .phys
            .regions()
            .iter()
            .map(|r| RegionUse {
                kind: r.kind().to_string(),
                usage: r.usage(),
            })
            .filter(|r| r.usage.allocated > 0 || r.usage.locked > 0)
            .collect();
        let (iova_pages, io_ptes) = self.dma.iommu().usage();
        let p2p = self
            .p2p
            .providers()
            .iter()
            .map(|p| P2pUse {
                dev: p.dev(),
                bar: p.bar(),
                bytes: p.size() - p.available(),
                users: p.live_users(),
            })
            .filter(|p| p.bytes > 0 || p.users > 0)
            .collect();
        Quiescence {
            processes: self.processes.running(),
            regions,
            dma_mappings: self.dma.live_mappings(),
            iova_pages,
            io_ptes,
            notifier_subscriptions: self
                .processes
                .address_spaces()
                .iter()
                .map(|mm| mm.notifier().subscriptions())
                .sum(),
            p2p,
        }
    }
}
