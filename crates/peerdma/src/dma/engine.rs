//! The DMA engine: a device reads or writes memory at a DMA address. The address is
//! resolved through the device's live mappings (and, for an IOVA, the IOMMU's IO page
//! table), every rule is checked, and real bytes are copied. Every device model moves
//! data only through here.

use crate::addr::{DmaAddr, Pfn, PAGE_SIZE};
use crate::dma::map::{MapKind, Record};
use crate::dma::sanitizer::{Violation, ViolationKind};
use crate::dma::{DmaDevice, DmaError};
use crate::iommu::{DmaFault, FaultReason};
use crate::mem::Region;
use crate::sync::atomic::Ordering;
use crate::sync::Arc;

/// One checked piece of a transfer: the mapping that carries it, the index of its
/// first page in the mapping, the offset into that page, and the bytes.
type Step = (Arc<Record>, usize, u64, u64);

impl DmaDevice {
    /// The device reads `buf.len()` bytes of memory at `addr` (a DMA to the device).
    pub fn dma_read(&self, addr: DmaAddr, buf: &mut [u8]) -> Result<(), DmaError> {
        let len = buf.len() as u64;
        self.dma_read_sg(&[(addr, len)], buf)
    }

    /// The device writes `data` to memory at `addr` (a DMA from the device).
    pub fn dma_write(&self, addr: DmaAddr, data: &[u8]) -> Result<(), DmaError> {
        self.dma_write_sg(&[(addr, data.len() as u64)], data)
    }

    /// One transfer from memory into the device through a list of (address, bytes)
    /// pieces, as a command's PRP list or SGL describes it: every piece is checked
    /// before any byte moves, and the transfer completes as a whole.
    pub fn dma_read_sg(&self, pieces: &[(DmaAddr, u64)], buf: &mut [u8]) -> Result<(), DmaError> {
        self.access(pieces, false, |region, first, off, at, n| {
            region.read_span(first, off, &mut buf[at..at + n]);
        })
    }

    /// One transfer from the device into memory through a list of pieces; see
    /// [`dma_read_sg`](Self::dma_read_sg).
    pub fn dma_write_sg(&self, pieces: &[(DmaAddr, u64)], data: &[u8]) -> Result<(), DmaError> {
        self.access(pieces, true, |region, first, off, at, n| {
            region.write_span(first, off, &data[at..at + n]);
        })
    }

    /// One transfer through a list of pieces where the device model itself is the
    /// other end: `f(region, first frame, offset, bytes before, bytes)` runs for every
    /// physically contiguous run of memory the transfer reaches, after every piece is
    /// checked, so a copy engine can move bytes between that memory and its own
    /// without a bounce buffer. `write`: the device writes memory.
    pub(crate) fn transfer_with(
        &self,
        pieces: &[(DmaAddr, u64)],
        write: bool,
        f: impl FnMut(&Region, Pfn, u64, usize, usize),
    ) -> Result<(), DmaError> {
        self.access(pieces, write, f)
    }

    fn iommu_fault(&self, addr: DmaAddr, write: bool, reason: FaultReason) {
        self.dma.iommu.report_fault(DmaFault {
            dev: self.bdf(),
            addr,
            write,
            reason,
        });
    }

    fn violation(
        &self,
        addr: DmaAddr,
        len: u64,
        write: bool,
        frame: Option<Pfn>,
        kind: ViolationKind,
    ) -> DmaError {
        self.dma.fault(Violation {
            dev: self.bdf(),
            addr,
            len,
            write,
            frame,
            kind,
            history: Vec::new(),
        })
    }

    /// Resolves and checks every piece under the device's live mappings (shared), marks
    /// the transfer in flight on each mapping it uses, checks none was revoked, then
    /// drops the lock and copies. An unmap or revocation sets the mapping's flag and
    /// then waits for the mapping's transfers in flight, so a transfer either completes
    /// before it returns or is refused; an unmap of another mapping waits for nothing.
    /// Checking before copying means a refused transfer moves no byte; copying with no
    /// lock or atomic in between keeps the copies at memcpy speed.
    fn access(
        &self,
        pieces: &[(DmaAddr, u64)],
        write: bool,
        mut copy: impl FnMut(&Region, Pfn, u64, usize, usize),
    ) -> Result<(), DmaError> {
        // A mapping chosen for a piece may be revoked before the transfer counts itself
        // in flight on it; another live mapping may still carry the address (one page
        // mapped twice without an IOMMU), so resolve again. Each retry follows a
        // revocation, and a piece only revoked mappings cover is refused at once.
        loop {
            let plan = self.resolve(pieces, write)?;
            match self.run(plan, &mut copy) {
                Err(DmaError::Revoked { .. }) => continue,
                done => return done,
            }
        }
    }

    /// Finds, for every piece, a live mapping of the device that can carry it, under
    /// the device's mappings' shared lock; records the violation when none can.
    fn resolve(&self, pieces: &[(DmaAddr, u64)], write: bool) -> Result<Vec<Step>, DmaError> {
        let dev = self.bdf();
        let live = self.state.live.read();
        let mut plan: Vec<Step> = Vec::with_capacity(pieces.len());
        for &(addr, len) in pieces {
            if len == 0 {
                continue;
            }
            // Any live mapping of the device that covers the whole piece in this
            // direction carries it: without an IOMMU (or for p2p memory by bus
            // address) one page mapped twice has one DMA address, and the device's
            // access is valid through either. Nearest start first; if none can carry
            // it, the nearest one's refusal is what the sanitizer reports — unless a
            // revoked mapping covers it: then the device has to fault and retry, which
            // is no violation.
            let mut first_refusal = None;
            let mut revoked = None;
            let mut carried = None;
            for rec in live
                .range(..=(addr.0, u64::MAX))
                .rev()
                .map(|(_, r)| r)
                .filter(|r| addr.0 < r.start.0 + r.len)
            {
                if rec.revoked.load(Ordering::SeqCst) {
                    revoked.get_or_insert(rec.start);
                    continue;
                }
                match self.check(rec, addr, len, write) {
                    Ok((first, off, n)) => {
                        carried = Some((rec.clone(), first, off, n));
                        break;
                    }
                    // Revoked since the flag was read: the frame may have moved
                    // already, legitimately. That is the revocation, not a violation.
                    Err(_) if rec.revoked.load(Ordering::SeqCst) => {
                        revoked.get_or_insert(rec.start);
                    }
                    Err(r) => {
                        first_refusal.get_or_insert(r);
                    }
                }
            }
            if let Some(step) = carried {
                plan.push(step);
                continue;
            }
            drop(live);
            if let Some(start) = revoked {
                return Err(DmaError::Revoked { dev, addr: start });
            }
            let Some(refusal) = first_refusal else {
                if self
                    .state
                    .domain
                    .as_ref()
                    .is_some_and(|d| d.translate(addr.iova()).is_none())
                {
                    self.iommu_fault(addr, write, FaultReason::NoEntry);
                }
                return Err(self.violation(addr, len, write, None, ViolationKind::Unmapped));
            };
            if refusal.iommu {
                self.iommu_fault(addr, write, FaultReason::Mismatch);
            }
            return Err(self.violation(
                refusal.addr,
                refusal.len,
                write,
                Some(refusal.frame),
                refusal.kind,
            ));
        }
        drop(live);
        Ok(plan)
    }

    /// One transfer through one mapping the device names directly (a memory region's
    /// key, a device page-table entry), at `offset` bytes into it: nothing but that
    /// mapping can carry it, so a revoked mapping refuses it even where another
    /// mapping covers the same DMA address.
    pub(crate) fn access_mapping(
        &self,
        records: &[Arc<Record>],
        offset: u64,
        len: u64,
        write: bool,
        copy: impl FnMut(&Region, Pfn, u64, usize, usize),
    ) -> Result<(), DmaError> {
        let mut base = 0u64;
        let found = records.iter().find(|r| {
            let hit = offset >= base && offset < base + r.len;
            if !hit {
                base += r.len;
            }
            hit
        });
        let Some(rec) = found else {
            let addr = records
                .last()
                .map_or(DmaAddr(0), |r| DmaAddr(r.start.0 + r.len));
            return Err(self.violation(addr, len, write, None, ViolationKind::PastEnd));
        };
        let dev = self.bdf();
        if rec.revoked.load(Ordering::SeqCst) {
            return Err(DmaError::Revoked {
                dev,
                addr: rec.start,
            });
        }
        let addr = DmaAddr(rec.start.0 + (offset - base));
        let step = match self.check(rec, addr, len, write) {
            Ok((first, off, n)) => (rec.clone(), first, off, n),
            Err(_) if rec.revoked.load(Ordering::SeqCst) => {
                return Err(DmaError::Revoked {
                    dev,
                    addr: rec.start,
                });
            }
            Err(r) => {
                if r.iommu {
                    self.iommu_fault(addr, write, FaultReason::Mismatch);
                }
                return Err(self.violation(r.addr, r.len, write, Some(r.frame), r.kind));
            }
        };
        self.run(vec![step], copy)
    }

    /// Runs a checked plan: counts it in flight on each mapping, refuses it if one was
    /// revoked meanwhile, copies, and counts the bytes by path.
    fn run(
        &self,
        plan: Vec<Step>,
        mut copy: impl FnMut(&Region, Pfn, u64, usize, usize),
    ) -> Result<(), DmaError> {
        for (rec, ..) in &plan {
            rec.inflight.enter();
        }
        let exit = |plan: &[Step]| {
            for (rec, ..) in plan {
                rec.inflight.exit();
            }
        };
        if let Some((rec, ..)) = plan.iter().find(|p| p.0.revoked.load(Ordering::SeqCst)) {
            let start = rec.start;
            exit(&plan);
            return Err(DmaError::Revoked {
                dev: self.bdf(),
                addr: start,
            });
        }
        self.run_transfer_hook();
        let mut at = 0usize;
        let mut moved = [0u64; 4];
        for (rec, first_page, off, len) in &plan {
            let (rec, first_page, off, len) = (&**rec, *first_page, *off, *len);
            // Copy each physically contiguous run of the piece in one go.
            let (mut k, mut in_page, mut left) = (first_page, off, len);
            while left > 0 {
                let start = k;
                let mut run = PAGE_SIZE - in_page;
                while run < left && rec.pages[k + 1].0 == rec.pages[k].0 + 1 {
                    k += 1;
                    run += PAGE_SIZE;
                }
                let n = run.min(left);
                copy(&rec.region, rec.pages[start], in_page, at, n as usize);
                at += n as usize;
                left -= n;
                k += 1;
                in_page = 0;
            }
            let path = if rec.own {
                3
            } else if rec.kind == MapKind::BusAddr {
                0
            } else if rec.peer {
                1
            } else {
                2
            };
            moved[path] += len;
        }
        exit(&plan);
        drop(plan);
        if moved[0] > 0 {
            self.count(|c| &c.via_switch, moved[0]);
        }
        if moved[1] > 0 {
            self.count(|c| &c.via_host_bridge, moved[1]);
        }
        if moved[2] > 0 {
            self.count(|c| &c.host_ram, moved[2]);
        }
        if moved[3] > 0 {
            self.count(|c| &c.same_device, moved[3]);
        }
        Ok(())
    }

    /// Checks one piece against one mapping: bounds, direction, the IO page table for
    /// an IOVA, and each frame's identity. Returns (first page index, offset in it,
    /// bytes), or why this mapping cannot carry the piece (nothing is recorded here:
    /// another mapping may carry it).
    fn check(
        &self,
        rec: &Record,
        addr: DmaAddr,
        len: u64,
        write: bool,
    ) -> Result<(usize, u64, u64), Refusal> {
        let rel0 = addr.0 - rec.start.0;
        let first_page = (rec.offset + rel0) / PAGE_SIZE;
        let first = rec.pages[first_page as usize];
        let refuse = |kind| Refusal {
            addr,
            len,
            frame: first,
            kind,
            iommu: false,
        };
        if rel0 + len > rec.len {
            return Err(refuse(ViolationKind::PastEnd));
        }
        let allowed = if write {
            rec.dir.device_writes()
        } else {
            rec.dir.device_reads()
        };
        if !allowed {
            return Err(refuse(ViolationKind::WrongDirection));
        }
        let last_page = (rec.offset + rel0 + len - 1) / PAGE_SIZE;
        if rec.kind == MapKind::Iova {
            let ok = rec.iova.as_ref().is_some_and(|r| {
                r.domain().translates_to(
                    addr.iova(),
                    &rec.pages[first_page as usize..=last_page as usize],
                    write,
                )
            });
            if !ok {
                return Err(Refusal {
                    iommu: true,
                    ..refuse(ViolationKind::Unmapped)
                });
            }
        }
        for k in first_page..=last_page {
            let pfn = rec.pages[k as usize];
            let now = rec.region.meta(pfn).generation();
            let then = rec.gens[k as usize];
            if now != then {
                let at = (k * PAGE_SIZE).saturating_sub(rec.offset + rel0);
                return Err(Refusal {
                    addr: DmaAddr(addr.0 + at),
                    len: len - at,
                    frame: pfn,
                    kind: ViolationKind::StaleFrame { mapped: then, now },
                    iommu: false,
                });
            }
        }
        Ok((first_page as usize, (rec.offset + rel0) % PAGE_SIZE, len))
    }
}

/// Why one mapping cannot carry an access.
struct Refusal {
    addr: DmaAddr,
    len: u64,
    frame: Pfn,
    kind: ViolationKind,
    /// The IO page table refused too: an IOMMU fault is reported with the violation.
    iommu: bool,
}
