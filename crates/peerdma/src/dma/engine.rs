//! The DMA engine: a device reads or writes memory at a DMA address. The address is
//! resolved through the device's live mappings (and, for an IOVA, the IOMMU's IO page
//! table), every rule is checked, and real bytes are copied. Every device model moves
//! data only through here.

use crate::addr::{Bdf, DmaAddr, Pfn, PAGE_SIZE};
use crate::dma::map::{MapKind, Record};
use crate::dma::sanitizer::{Violation, ViolationKind};
use crate::dma::{Dma, DmaError};
use crate::iommu::DmaFault;
use crate::mem::{Region, RegionKind};
use crate::sync::{read, Arc};

impl Dma {
    /// The device reads `buf.len()` bytes of memory at `addr` (a DMA to the device).
    pub fn dma_read(&self, dev: Bdf, addr: DmaAddr, buf: &mut [u8]) -> Result<(), DmaError> {
        let len = buf.len();
        self.access(dev, addr, len as u64, false, |region, pfn, off, at, n| {
            region.read(pfn, off, &mut buf[at..at + n]);
        })
    }

    /// The device writes `data` to memory at `addr` (a DMA from the device).
    pub fn dma_write(&self, dev: Bdf, addr: DmaAddr, data: &[u8]) -> Result<(), DmaError> {
        self.access(
            dev,
            addr,
            data.len() as u64,
            true,
            |region, pfn, off, at, n| {
                region.write(pfn, off, &data[at..at + n]);
            },
        )
    }

    fn violation(
        &self,
        dev: Bdf,
        addr: DmaAddr,
        len: u64,
        write: bool,
        frame: Option<Pfn>,
        kind: ViolationKind,
    ) -> DmaError {
        self.fault(Violation {
            dev,
            addr,
            len,
            write,
            frame,
            kind,
            history: Vec::new(),
        })
    }

    fn access(
        &self,
        dev: Bdf,
        addr: DmaAddr,
        len: u64,
        write: bool,
        mut copy: impl FnMut(&Region, Pfn, u64, usize, usize),
    ) -> Result<(), DmaError> {
        if len == 0 {
            return Ok(());
        }
        // Find the live mapping and enter it before letting go of the registry, so an
        // unmap (which removes the record first, then waits) cannot miss this access.
        let rec: Arc<Record> = {
            let live = read(&self.live);
            // The nearest mapping starting at or below `addr` that covers it.
            let found = live.get(&dev).and_then(|m| {
                m.range(..=(addr.0, u64::MAX))
                    .rev()
                    .map(|(_, r)| r)
                    .find(|r| addr.0 < r.start.0 + r.len)
                    .cloned()
            });
            match found {
                Some(r) => {
                    r.inflight.enter();
                    r
                }
                None => {
                    drop(live);
                    if self.iommu.enabled()
                        && self
                            .iommu
                            .domain(dev)
                            .is_some_and(|d| d.translate(addr).is_none())
                    {
                        self.iommu.report_fault(DmaFault {
                            dev,
                            addr,
                            write,
                            reason: "no IO page-table entry".into(),
                        });
                    }
                    return Err(self.violation(
                        dev,
                        addr,
                        len,
                        write,
                        None,
                        ViolationKind::Unmapped,
                    ));
                }
            }
        };
        let result = self.copy_through(&rec, dev, addr, len, write, &mut copy);
        rec.inflight.exit();
        result
    }

    fn copy_through(
        &self,
        rec: &Record,
        dev: Bdf,
        addr: DmaAddr,
        len: u64,
        write: bool,
        copy: &mut impl FnMut(&Region, Pfn, u64, usize, usize),
    ) -> Result<(), DmaError> {
        let first_frame = |rel: u64| Pfn(rec.first.0 + (rec.offset + rel) / PAGE_SIZE);
        let rel0 = addr.0 - rec.start.0;
        if rel0 + len > rec.len {
            return Err(self.violation(
                dev,
                addr,
                len,
                write,
                Some(first_frame(rel0)),
                ViolationKind::PastEnd,
            ));
        }
        let allowed = if write {
            rec.dir.device_writes()
        } else {
            rec.dir.device_reads()
        };
        if !allowed {
            return Err(self.violation(
                dev,
                addr,
                len,
                write,
                Some(first_frame(rel0)),
                ViolationKind::WrongDirection,
            ));
        }
        // Check every frame first (translation, identity), then move the bytes.
        let mut pos = 0u64;
        while pos < len {
            let rel = rel0 + pos;
            let k = (rec.offset + rel) / PAGE_SIZE;
            let pfn = Pfn(rec.first.0 + k);
            let in_page = (rec.offset + rel) % PAGE_SIZE;
            let n = (PAGE_SIZE - in_page).min(len - pos);
            if rec.kind == MapKind::Iova {
                let iova = DmaAddr(addr.0 + pos);
                let ok = rec
                    .iova
                    .as_ref()
                    .and_then(|(d, _, _)| d.translate(iova))
                    .is_some_and(|(p, perm)| {
                        p == pfn && if write { perm.write } else { perm.read }
                    });
                if !ok {
                    self.iommu.report_fault(DmaFault {
                        dev,
                        addr: iova,
                        write,
                        reason: "IO page-table entry missing or without permission".into(),
                    });
                    return Err(self.violation(
                        dev,
                        iova,
                        n,
                        write,
                        Some(pfn),
                        ViolationKind::Unmapped,
                    ));
                }
            }
            let now = rec.region.meta(pfn).generation();
            let then = rec.gens[k as usize];
            if now != then {
                return Err(self.violation(
                    dev,
                    DmaAddr(addr.0 + pos),
                    n,
                    write,
                    Some(pfn),
                    ViolationKind::StaleFrame { mapped: then, now },
                ));
            }
            pos += n;
        }
        let mut pos = 0u64;
        while pos < len {
            let rel = rel0 + pos;
            let pfn = Pfn(rec.first.0 + (rec.offset + rel) / PAGE_SIZE);
            let in_page = (rec.offset + rel) % PAGE_SIZE;
            let n = (PAGE_SIZE - in_page).min(len - pos);
            copy(&rec.region, pfn, in_page, pos as usize, n as usize);
            pos += n;
        }
        let counter = match (rec.kind, rec.region.kind()) {
            (MapKind::BusAddr, _) => &self.counters.via_switch,
            (_, RegionKind::P2p { .. }) => &self.counters.via_host_bridge,
            _ => &self.counters.host_ram,
        };
        self.bump(counter, len);
        Ok(())
    }
}
