//! The GPU's copy engine (amdgpu's SDMA, the copy engines of NVIDIA GPUs): copies
//! between its own VRAM, system memory and a peer's BAR. VRAM is the engine's own
//! memory; everything else it reaches only through DMA addresses mapped for the GPU
//! the normal way (`dma_map_sgtable` of RAM, or of a peer's p2p memory), through the
//! DMA engine, so the sanitizer checks every access — a BO that eviction put in system
//! RAM is reached through the GPU's own mapping of it too.

use crate::addr::{DmaAddr, Pfn};
use crate::drivers::gpu::bo::{BoHandle, BoUse, Place};
use crate::drivers::gpu::{bump, Gpu, GpuError};
use crate::mem::Region;

/// One end of a copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CeAddr {
    /// A byte offset into one of the GPU's buffer objects, wherever it lives.
    Bo(BoHandle, u64),
    /// A DMA address mapped for the GPU: system RAM (an IOVA or physical address) or
    /// a peer's BAR (a bus address, or an IOVA through the host bridge).
    Dma(DmaAddr),
}

/// Bytes a copy between two DMA addresses moves through the engine's buffer at once.
const BOUNCE: u64 = 1 << 20;

/// An end of a copy, resolved.
enum End<'a> {
    Vram(Pfn, u64),
    Mapped(&'a BoUse, u64),
    Bus(DmaAddr),
}

impl Gpu {
    /// Copies `len` bytes from `src` to `dst` with the copy engine. A BO end is
    /// counted busy for the copy (eviction waits for it); a DMA end is checked by the
    /// DMA engine like any device's access (an address not mapped for the GPU, or
    /// mapped the wrong way, is a DMA fault the sanitizer records). EINVAL for an
    /// empty copy or overlapping ranges of one BO; a range past a BO's end is refused
    /// before any byte moves.
    pub fn ce_copy(&self, dst: CeAddr, src: CeAddr, len: u64) -> Result<(), GpuError> {
        let invalid = |why| GpuError::Invalid {
            dev: self.bdf,
            op: "ce_copy",
            va: crate::addr::VirtAddr(0),
            len,
            why,
        };
        if len == 0 {
            return Err(invalid("the copy is empty"));
        }
        if self.removed() {
            return Err(GpuError::Removed { dev: self.bdf });
        }
        // BOs are taken busy in handle order, so two copies never wait on each other;
        // a copy within one BO takes it once (a second take could wait behind a move
        // that waits for the first).
        let (du, su) = match (dst, src) {
            (CeAddr::Bo(d, doff), CeAddr::Bo(s, soff)) if d == s => {
                if doff < soff.saturating_add(len) && soff < doff.saturating_add(len) {
                    return Err(invalid("the source and destination overlap"));
                }
                let lo = doff.min(soff);
                let span = (doff.max(soff) - lo).saturating_add(len);
                (Some(self.bo_use(d, lo, span, false)?), None)
            }
            (CeAddr::Bo(d, doff), CeAddr::Bo(s, soff)) if s < d => {
                let v = self.bo_use(s, soff, len, false)?;
                let u = self.bo_use(d, doff, len, false)?;
                (Some(u), Some(v))
            }
            _ => {
                let u = match dst {
                    CeAddr::Bo(d, doff) => Some(self.bo_use(d, doff, len, false)?),
                    CeAddr::Dma(_) => None,
                };
                let v = match src {
                    CeAddr::Bo(s, soff) => Some(self.bo_use(s, soff, len, false)?),
                    CeAddr::Dma(_) => None,
                };
                (u, v)
            }
        };
        let (d, s) = (
            end_of(dst, du.as_ref()),
            end_of(src, su.as_ref().or(du.as_ref())),
        );
        let vram = &*self.bo_vram;
        match (d, s) {
            (End::Vram(df, doff), End::Vram(sf, soff)) => {
                vram.engine_copy_span(sf, soff, vram, df, doff, len as usize);
            }
            (dst_end, End::Vram(sf, soff)) => {
                self.ce_transfer(&dst_end, len, true, |r, p, o, at, n| {
                    vram.engine_copy_span(sf, soff + at as u64, r, p, o, n);
                })?;
            }
            (End::Vram(df, doff), src_end) => {
                self.ce_transfer(&src_end, len, false, |r, p, o, at, n| {
                    r.engine_copy_span(p, o, vram, df, doff + at as u64, n);
                })?;
            }
            (dst_end, src_end) => {
                // Neither end is the engine's own memory: through its buffer.
                let mut buf = vec![0u8; BOUNCE.min(len) as usize];
                let mut done = 0;
                while done < len {
                    let n = BOUNCE.min(len - done);
                    let part = &mut buf[..n as usize];
                    self.ce_transfer(&shift(&src_end, done), n, false, |r, p, o, at, k| {
                        r.read_span(p, o, &mut part[at..at + k]);
                    })?;
                    self.ce_transfer(&shift(&dst_end, done), n, true, |r, p, o, at, k| {
                        r.write_span(p, o, &part[at..at + k]);
                    })?;
                    done += n;
                }
            }
        }
        drop((du, su));
        bump(&self.stats.ce_bytes, len);
        Ok(())
    }

    /// One transfer between the engine and memory it reaches by DMA.
    fn ce_transfer(
        &self,
        end: &End<'_>,
        len: u64,
        write: bool,
        f: impl FnMut(&Region, Pfn, u64, usize, usize),
    ) -> Result<(), GpuError> {
        match end {
            End::Mapped(u, off) => self.place_access(u, *off, len, write, f),
            End::Bus(addr) => self
                .dma
                .transfer_with(&[(*addr, len)], write, f)
                .map_err(|e| GpuError::Dma {
                    dev: self.bdf,
                    source: e,
                }),
            End::Vram(..) => unreachable!("VRAM is copied directly"),
        }
    }
}

/// Resolves one end: a BO by where its use found it, a DMA address as it is.
fn end_of(a: CeAddr, u: Option<&BoUse>) -> End<'_> {
    match (a, u) {
        (CeAddr::Bo(_, off), Some(u)) => match &u.place {
            Place::Vram(first) => End::Vram(*first, off),
            Place::Gart(_) => End::Mapped(u, off),
        },
        (CeAddr::Dma(addr), _) => End::Bus(addr),
        (CeAddr::Bo(..), None) => unreachable!("a BO end always has its use"),
    }
}

fn shift<'a>(e: &End<'a>, by: u64) -> End<'a> {
    match *e {
        End::Vram(f, o) => End::Vram(f, o + by),
        End::Mapped(u, o) => End::Mapped(u, o + by),
        End::Bus(a) => End::Bus(DmaAddr(a.0 + by)),
    }
}
