//! `dma_map_sg` / `dma_unmap_sg` for one device, and the live mapping records the
//! engine and the sanitizer check every access against.

use crate::addr::{Bdf, DmaAddr, Pfn, PAGE_SIZE};
use crate::dma::sg::SgTable;
use crate::dma::{Direction, DmaDevice, DmaError};
use crate::fabric::MapType;
use crate::iommu::{IoPerm, IovaRange};
use crate::mem::Region;
use crate::sync::atomic::{AtomicBool, Ordering};
use crate::sync::Arc;
use crate::sync::InFlight;

/// How a segment is addressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub enum MapKind {
    /// An IOVA in the device's IOMMU domain.
    Iova,
    /// The physical address (IOMMU in passthrough).
    Phys,
    /// A PCI bus address of a peer's BAR, routed by a switch; the IOMMU is bypassed.
    BusAddr,
}

/// One mapped segment, as a driver puts it in a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaSegment {
    /// The address the device uses.
    pub addr: DmaAddr,
    /// Bytes.
    pub len: u64,
    /// How it is addressed.
    pub kind: MapKind,
}

/// One live mapped segment: contiguous in DMA address space, backed page by page by
/// `pages` (physically contiguous except for an IOVA segment that merged several SG
/// entries, as `iommu_dma_map_sg()` does).
pub(crate) struct Record {
    pub(crate) id: u64,
    pub(crate) dir: Direction,
    pub(crate) start: DmaAddr,
    pub(crate) len: u64,
    pub(crate) kind: MapKind,
    /// Offset of `start` into the first page.
    pub(crate) offset: u64,
    /// The frame behind each page of the segment.
    pub(crate) pages: Vec<Pfn>,
    /// Each frame's generation when mapped.
    pub(crate) gens: Vec<u32>,
    pub(crate) region: Arc<Region>,
    /// Whether the memory is a peer's BAR (reached by bus address or through the host
    /// bridge), for the statistics.
    pub(crate) peer: bool,
    /// Whether the memory is the mapping device's own BAR.
    pub(crate) own: bool,
    /// The IOVA range the segment is linked in, for a translated mapping; dropping the
    /// record (after it left the live mappings, so no transfer can use it) unlinks and
    /// frees it.
    pub(crate) iova: Option<IovaRange>,
    /// Transfers through this record now: unmap and revocation wait for them.
    pub(crate) inflight: InFlight,
    /// Set by unmap or revocation before they wait: a transfer that enters afterwards
    /// sees it and is refused, so none completes after they return.
    pub(crate) revoked: AtomicBool,
}

impl Record {
    pub(crate) fn frames(&self) -> impl Iterator<Item = Pfn> + '_ {
        self.pages.iter().copied()
    }
}

/// A scatter-gather table mapped for one device; dropping it unmaps, first waiting for
/// the transfers through it that are in progress (and only those) to finish.
///
/// # Invariants
/// Every record is registered in the host's live mappings until drop.
pub struct DmaMapping {
    dev: DmaDevice,
    records: Vec<Arc<Record>>,
}

impl std::fmt::Debug for DmaMapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaMapping")
            .field("dev", &self.dev.bdf())
            .field("segments", &self.records.len())
            .finish()
    }
}

impl DmaMapping {
    /// The device it is mapped for.
    pub fn dev(&self) -> Bdf {
        self.dev.bdf()
    }

    /// The device handle it is mapped for.
    pub fn device(&self) -> &DmaDevice {
        &self.dev
    }

    /// The direction it was mapped for.
    pub fn direction(&self) -> Direction {
        self.records
            .first()
            .map_or(Direction::Bidirectional, |r| r.dir)
    }

    /// The segments in order, as the device addresses them.
    pub fn segments(&self) -> Vec<DmaSegment> {
        self.records
            .iter()
            .map(|r| DmaSegment {
                addr: r.start,
                len: r.len,
                kind: r.kind,
            })
            .collect()
    }

    /// Total bytes.
    pub fn len(&self) -> u64 {
        self.records.iter().map(|r| r.len).sum()
    }

    /// Whether it maps nothing.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Unmaps now (the same as dropping).
    pub fn unmap(self) {}
}

impl DmaMapping {
    /// Revokes the mapping without unmapping it: transfers that began through it
    /// finish first, later ones are refused with [`DmaError::Revoked`]. What a
    /// mapping protected by an interval notifier rather than by pins calls from the
    /// notifier's `invalidate` callback, so that no transfer lands in a page after the
    /// invalidation returns and the page moves. Waits only for this mapping's
    /// transfers, not for the device's others.
    pub fn revoke(&self) {
        for r in &self.records {
            r.revoked.store(true, Ordering::SeqCst);
        }
        for r in &self.records {
            r.inflight.wait_idle();
        }
    }

    /// The device writes `data` through this mapping at `offset` bytes into it, as a
    /// device that names the mapping (an RDMA key, a device page-table entry) rather
    /// than a bare DMA address does: only this mapping can carry it, so once revoked it
    /// refuses with [`DmaError::Revoked`] even where another mapping covers the same
    /// address. The access must lie inside one segment.
    pub fn dma_write(&self, offset: u64, data: &[u8]) -> Result<(), DmaError> {
        self.dev.access_mapping(
            &self.records,
            offset,
            data.len() as u64,
            true,
            |r, first, off, at, n| r.write_span(first, off, &data[at..at + n]),
        )
    }

    /// The device reads `buf.len()` bytes through this mapping at `offset`; see
    /// [`dma_write`](Self::dma_write).
    pub fn dma_read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let len = buf.len() as u64;
        self.dev
            .access_mapping(&self.records, offset, len, false, |r, first, off, at, n| {
                r.read_span(first, off, &mut buf[at..at + n])
            })
    }

    /// Transfers through this mapping at `offset` where the device model is the
    /// other end: `f(region, first frame, offset, bytes before, bytes)` runs for every
    /// physically contiguous run (see [`DmaDevice::transfer_with`]). Unlike
    /// [`dma_write`](Self::dma_write) the span may cross segments: one transfer per
    /// segment it touches, in order.
    pub(crate) fn transfer_with(
        &self,
        offset: u64,
        len: u64,
        write: bool,
        mut f: impl FnMut(&Region, Pfn, u64, usize, usize),
    ) -> Result<(), DmaError> {
        let mut base = 0u64;
        let mut done = 0u64;
        for r in &self.records {
            let (lo, hi) = (base, base + r.len);
            base = hi;
            let at = offset + done;
            if done == len || at >= hi {
                continue;
            }
            if at < lo {
                break;
            }
            let n = (hi - at).min(len - done);
            let skip = done as usize;
            self.dev.access_mapping(
                std::slice::from_ref(r),
                at - lo,
                n,
                write,
                |reg, p, o, k, m| f(reg, p, o, skip + k, m),
            )?;
            done += n;
        }
        if done < len {
            // Past the end: let the engine refuse it and record the violation.
            return self.dev.access_mapping(
                &self.records,
                offset + done,
                len - done,
                write,
                |_, _, _, _, _| {},
            );
        }
        Ok(())
    }

    /// Whether [`revoke`](Self::revoke) was called.
    pub fn is_revoked(&self) -> bool {
        self.records
            .iter()
            .any(|r| r.revoked.load(Ordering::SeqCst))
    }
}

impl Drop for DmaMapping {
    fn drop(&mut self) {
        if self.records.is_empty() {
            return;
        }
        let bdf = self.dev.bdf();
        {
            // After this no transfer can find the records; the ones that found them
            // before are waited for below, each record for its own.
            let mut m = self.dev.state.live.write();
            for r in &self.records {
                m.remove(&(r.start.0, r.id));
            }
        }
        self.revoke();
        for r in &self.records {
            tracing::debug!(dev = %bdf, id = r.id, addr = %r.start, "dma unmap");
            for (first, n) in runs(&r.pages) {
                self.dev.dma.sanitizer.unmapped(r.id, bdf, first, n);
            }
        }
        self.dev.count(|c| &c.unmappings, 1);
    }
}

/// Runs of physically consecutive frames, as (first, count).
pub(crate) fn runs(pages: &[Pfn]) -> Vec<(Pfn, u64)> {
    let mut out: Vec<(Pfn, u64)> = Vec::new();
    for &p in pages {
        match out.last_mut() {
            Some((f, n)) if f.0 + *n == p.0 => *n += 1,
            _ => out.push((p, 1)),
        }
    }
    out
}

impl DmaDevice {
    /// `dma_map_sgtable(dev, sg, dir)`: maps every entry for `dev`. System RAM and
    /// device-coherent memory go through the device's IOMMU domain (or by physical
    /// address in passthrough); p2p memory by the fabric's verdict between its provider
    /// and `dev`: by bus address through a switch, like RAM through an allowed host
    /// bridge, refused with EREMOTEIO otherwise. Through the IOMMU, entries that join
    /// at page boundaries are merged into one IOVA segment.
    pub fn map_sg(&self, sg: &SgTable, dir: Direction) -> Result<DmaMapping, DmaError> {
        let dev = self.bdf();
        let mask = self.dma_mask();
        let dma = &self.dma;
        let mut mapping = DmaMapping {
            dev: self.clone(),
            records: Vec::with_capacity(sg.entries().len()),
        };
        let perm = IoPerm {
            read: dir.device_reads(),
            write: dir.device_writes(),
        };
        let entries = sg.entries();
        let mut i = 0;
        while i < entries.len() {
            let e = entries[i];
            let region = dma
                .phys
                .region(e.pfn)
                .ok_or(DmaError::NoSuchFrame { dev, pfn: e.pfn })?;
            debug_assert!(
                region.contains(Pfn(e.pfn.0 + e.frames() - 1)),
                "SG entry crosses regions"
            );
            let phys = e.pfn.0 * PAGE_SIZE + e.offset;
            let kind = region.kind();
            if !kind.bus_addressable() {
                return Err(DmaError::NotAddressable {
                    dev,
                    pfn: e.pfn,
                    kind: kind.to_string(),
                });
            }
            // Device memory its owner keeps off the bus just now (VRAM outside a
            // small BAR's window) cannot be mapped.
            if let Some(why) = (0..e.frames()).find_map(|k| region.bus_hidden(Pfn(e.pfn.0 + k))) {
                return Err(DmaError::NotAddressable {
                    dev,
                    pfn: e.pfn,
                    kind: format!("{kind} ({why})"),
                });
            }
            // Memory a BAR exposes (p2p memory, or device memory whose owner says
            // where peers find it) goes by the fabric's verdict between its provider
            // and this device.
            let peer = region.peer_reach(e.pfn);
            let direct = match peer.map(|r| (r.provider, r.bus_offset)) {
                Some((provider, bus_offset)) => {
                    let v = self.verdict(provider).map_err(|_| DmaError::NoProvider {
                        dev,
                        pfn: e.pfn,
                        provider,
                    })?;
                    match v.map_type {
                        MapType::BusAddr => {
                            Some((MapKind::BusAddr, DmaAddr(phys.wrapping_add(bus_offset))))
                        }
                        MapType::ThruHostBridge => None,
                        MapType::NotSupported => {
                            return Err(DmaError::RemoteIo {
                                verdict: Box::new((*v).clone()),
                            })
                        }
                    }
                }
                None => None,
            };
            let domain = if direct.is_none() {
                self.state.domain.as_ref()
            } else {
                None
            };
            // Through the IOMMU, following entries of the same region that join at page
            // boundaries share one IOVA range: one segment for the device.
            let mut j = i + 1;
            if domain.is_some() {
                while j < entries.len()
                    && entries[j].offset == 0
                    && (entries[j - 1].offset + entries[j - 1].len).is_multiple_of(PAGE_SIZE)
                    && region.contains(entries[j].pfn)
                {
                    j += 1;
                }
            }
            let group = &entries[i..j];
            let pages: Vec<Pfn> = group
                .iter()
                .flat_map(|g| (0..g.frames()).map(move |k| Pfn(g.pfn.0 + k)))
                .collect();
            let len: u64 = group.iter().map(|g| g.len).sum();
            let (kind, addr, iova) = match (direct, domain) {
                (Some((k, a)), _) => (k, a, None),
                (None, None) => (MapKind::Phys, DmaAddr(phys), None),
                (None, Some(domain)) => {
                    let iommu = |source| DmaError::Iommu {
                        dev,
                        bytes: len,
                        source,
                    };
                    let range = domain.reserve(pages.len() as u64, 1).map_err(iommu)?;
                    range.link(0, &pages, perm).map_err(iommu)?;
                    let addr = DmaAddr(range.iova().0 + e.offset);
                    (MapKind::Iova, addr, Some(range))
                }
            };
            if addr
                .0
                .checked_add(len.saturating_sub(1))
                .is_none_or(|end| end > mask)
            {
                return Err(DmaError::Mask {
                    dev,
                    addr,
                    len,
                    mask,
                });
            }
            let id = dma.next_id.fetch_add(1, Ordering::Relaxed);
            for (first, n) in runs(&pages) {
                dma.sanitizer.mapped(id, dev, first, n, dir, addr);
            }
            let record = Arc::new(Record {
                id,
                dir,
                start: addr,
                len,
                kind,
                offset: e.offset,
                gens: pages.iter().map(|&p| region.meta(p).generation()).collect(),
                pages,
                region: region.clone(),
                peer: peer.is_some(),
                own: peer.is_some_and(|r| r.provider == dev),
                iova,
                inflight: InFlight::new(),
                revoked: AtomicBool::new(false),
            });
            tracing::debug!(dev = %dev, id, addr = %addr, len, kind = ?kind, dir = ?dir, "dma map");
            self.state.live.write().insert((addr.0, id), record.clone());
            mapping.records.push(record);
            i = j;
        }
        self.count(|c| &c.mappings, 1);
        Ok(mapping)
    }
}
