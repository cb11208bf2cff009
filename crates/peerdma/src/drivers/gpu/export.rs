//! The GPU as a dma-buf exporter of its buffer objects (amdgpu_dma_buf.c, xe_dma_buf.c).
//!
//! The exporter is dynamic: the BO may move, and every move runs with the BO's
//! reservation lock held, tells each dynamic importer (`move_notify`), revokes their
//! mappings, waits for their fences, moves, then signals its KERNEL fence. An importer
//! that allows peer-to-peer, on a GPU whose BAR opens onto all of VRAM and that the
//! fabric lets reach it, maps VRAM by bus address or IOVA. Any other importer gets the
//! [`P2pPolicy`]: the BO moves to system RAM first (amdgpu), or the attach is refused
//! (xe when the BO cannot move).

use std::fmt;

use crate::addr::{Bdf, VirtAddr, PAGE_SIZE};
use crate::dma::Direction;
use crate::dmabuf::{AttachInfo, DmaBuf, DmaBufError, Exporter, Mapped, ResvGuard};
use crate::drivers::gpu::bo::By;
use crate::drivers::gpu::{BoDmaMap, BoDomain, BoHandle, Gpu, GpuError};
use crate::errno::Errno;
use crate::fabric::MapType;
use crate::mm::{Mm, PagesOwner, PagesOwnerRef, Prot};
use crate::sync::atomic::{AtomicU64, Ordering};
use crate::sync::{Arc, Weak};

/// What the exporter does for an importer that cannot reach VRAM peer-to-peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum P2pPolicy {
    /// Move the BO to system RAM and map that (amdgpu).
    MoveToRam,
    /// Refuse the attach with EOPNOTSUPP (xe, for a BO that cannot leave VRAM).
    Refuse,
}

impl Mapped for BoDmaMap {
    fn mapping(&self) -> &crate::dma::DmaMapping {
        BoDmaMap::mapping(self)
    }
}

/// One exported BO.
///
/// # Invariants
/// While the buffer lives the BO's memory does: its GEM handle may close, and the
/// exporter then frees it when the buffer goes (the dma-buf's reference on the GEM
/// object, drm_gem_dmabuf_release).
struct BoExporter {
    gpu: Weak<Gpu>,
    bdf: Bdf,
    handle: BoHandle,
    policy: P2pPolicy,
}

impl Drop for BoExporter {
    fn drop(&mut self) {
        if let Some(gpu) = self.gpu.upgrade() {
            gpu.reap_handle(self.handle);
        }
    }
}

impl fmt::Debug for BoExporter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

fn err(op: &'static str, e: GpuError) -> DmaBufError {
    DmaBufError::new(op, e.errno(), e.to_string())
}

impl BoExporter {
    fn gpu(&self, op: &'static str) -> Result<Arc<Gpu>, DmaBufError> {
        match self.gpu.upgrade() {
            Some(g) if !g.removed() => Ok(g),
            _ => Err(DmaBufError::new(
                op,
                Errno::ENODEV,
                format!("{}: the GPU was removed", self.describe()),
            )),
        }
    }

    fn holder(att: &AttachInfo) -> String {
        format!("dma-buf importer {}", att.dev.bdf())
    }

    /// Why `att`'s device cannot reach VRAM peer-to-peer, if it cannot.
    fn no_p2p(&self, gpu: &Gpu, att: &AttachInfo) -> Option<String> {
        if !att.peer2peer {
            return Some(format!(
                "{} does not take peer-to-peer addresses",
                att.dev.bdf()
            ));
        }
        match gpu.bar() {
            None => return Some("the GPU has no memory BAR onto VRAM".into()),
            Some(b) if !b.full => {
                return Some(format!(
                    "the GPU's BAR {} ({:#x} bytes) does not open onto all of VRAM",
                    b.index, b.bytes
                ))
            }
            Some(_) => {}
        }
        match att.dev.verdict(self.bdf) {
            Ok(v) if v.map_type == MapType::NotSupported => Some(v.reason()),
            Ok(_) => None,
            Err(e) => Some(e.to_string()),
        }
    }
}

impl Exporter for BoExporter {
    fn describe(&self) -> String {
        format!("GPU {} {}", self.bdf, self.handle)
    }

    fn attach(&self, att: &AttachInfo) -> Result<bool, DmaBufError> {
        let gpu = self.gpu("attach")?;
        match self.no_p2p(&gpu, att) {
            None => Ok(true),
            Some(why) if self.policy == P2pPolicy::Refuse => Err(DmaBufError::new(
                "attach",
                Errno::EOPNOTSUPP,
                format!(
                    "{} stays in VRAM and {} cannot reach it: {why}",
                    self.describe(),
                    att.dev.bdf()
                ),
            )),
            Some(why) => {
                tracing::debug!(buf = %self.describe(), dev = %att.dev.bdf(), %why,
                    "dma-buf: no peer-to-peer, the BO will be mapped from system RAM");
                Ok(false)
            }
        }
    }

    fn dynamic(&self) -> bool {
        true
    }

    /// Pins where the importer can reach it: in place for a peer-to-peer importer, in
    /// system RAM otherwise.
    fn pin(&self, resv: &mut ResvGuard<'_>, att: &AttachInfo) -> Result<(), DmaBufError> {
        let op = "pin";
        let gpu = self.gpu(op)?;
        let info = gpu
            .bo_info_by(self.handle, By::Holder)
            .map_err(|e| err(op, e))?;
        if !att.peer2peer && info.domain == BoDomain::Vram {
            gpu.bo_to_ram_locked(self.handle, resv)
                .map_err(|e| err(op, e))?;
        }
        gpu.bo_pin_by(self.handle, &Self::holder(att), By::Holder)
            .map(|_| ())
            .map_err(|e| err(op, e))
    }

    fn unpin(&self, _resv: &ResvGuard<'_>, att: &AttachInfo) {
        if let Some(gpu) = self.gpu.upgrade() {
            let _ = gpu.bo_unpin_by(self.handle, &Self::holder(att), By::Holder);
        }
    }

    fn map(
        &self,
        resv: &mut ResvGuard<'_>,
        att: &AttachInfo,
        dir: Direction,
    ) -> Result<Arc<dyn Mapped>, DmaBufError> {
        let op = "map_attachment";
        let gpu = self.gpu(op)?;
        let info = gpu
            .bo_info_by(self.handle, By::Holder)
            .map_err(|e| err(op, e))?;
        if !att.peer2peer && info.domain == BoDomain::Vram {
            gpu.bo_to_ram_locked(self.handle, resv)
                .map_err(|e| err(op, e))?;
        }
        let m = gpu
            .bo_map_peer_by(self.handle, &att.dev, dir, None, By::Holder)
            .map_err(|e| err(op, e))?;
        Ok(m)
    }

    /// Maps the BO's pages where they are and pins it there while any process maps it.
    fn mmap(
        &self,
        mm: &Arc<Mm>,
        offset: u64,
        len: u64,
        prot: Prot,
    ) -> Result<VirtAddr, DmaBufError> {
        let op = "mmap";
        let gpu = self.gpu(op)?;
        let owner = Arc::new(CpuMaps {
            gpu: self.gpu.clone(),
            handle: self.handle,
            pages: AtomicU64::new(0),
        });
        gpu.bo_pin_by(self.handle, CpuMaps::HOLDER, By::Holder)
            .map_err(|e| err(op, e))?;
        let frames = match gpu.bo_frames(self.handle) {
            Ok(f) => f,
            Err(e) => {
                let _ = gpu.bo_unpin_by(self.handle, CpuMaps::HOLDER, By::Holder);
                return Err(err(op, e));
            }
        };
        let first = (offset / PAGE_SIZE) as usize;
        let n = (len / PAGE_SIZE) as usize;
        owner.pages.store(n as u64, Ordering::SeqCst);
        match mm.mmap_pages(&frames[first..first + n], prot, Some(PagesOwnerRef(owner))) {
            Ok(va) => Ok(va),
            Err(e) => {
                let _ = gpu.bo_unpin_by(self.handle, CpuMaps::HOLDER, By::Holder);
                Err(DmaBufError::new(op, e.errno(), e.to_string()))
            }
        }
    }
}

/// The CPU mappings of one `mmap` of an exported BO, fork copies included: the BO
/// stays pinned while any page of them is mapped.
struct CpuMaps {
    gpu: Weak<Gpu>,
    handle: BoHandle,
    pages: AtomicU64,
}

impl CpuMaps {
    const HOLDER: &'static str = "a CPU mapping of its dma-buf";
}

impl PagesOwner for CpuMaps {
    fn forked(&self, _child: &Arc<Mm>, _start: VirtAddr, len: u64) {
        self.pages.fetch_add(len / PAGE_SIZE, Ordering::SeqCst);
    }
    fn unmapped(&self, _mm: &Mm, _start: VirtAddr, len: u64) {
        let pages = len / PAGE_SIZE;
        if self.pages.fetch_sub(pages, Ordering::SeqCst) == pages {
            if let Some(gpu) = self.gpu.upgrade() {
                let _ = gpu.bo_unpin_by(self.handle, Self::HOLDER, By::Holder);
            }
        }
    }
}

impl Gpu {
    /// Exports a BO as a dma-buf (`drm_gem_prime_export`); importers that cannot
    /// reach VRAM get `policy`. The buffer holds the BO: closing its GEM handle
    /// leaves it to the buffer's importers and CPU mappings until the buffer goes.
    pub fn bo_export(
        self: &Arc<Self>,
        h: BoHandle,
        policy: P2pPolicy,
    ) -> Result<Arc<DmaBuf>, GpuError> {
        let info = self.bo_info(h)?;
        if self.removed() {
            return Err(GpuError::Removed { dev: self.bdf });
        }
        let exporter = BoExporter {
            gpu: Arc::downgrade(self),
            bdf: self.bdf,
            handle: h,
            policy,
        };
        let buf = DmaBuf::export(Box::new(exporter), info.bytes, Some(self.bo_resv(h)?)).map_err(
            |e| GpuError::Invalid {
                dev: self.bdf,
                op: "bo_export",
                va: VirtAddr(0),
                len: info.bytes,
                why: if e.errno == Errno::EINVAL {
                    "the BO cannot be exported"
                } else {
                    "export failed"
                },
            },
        )?;
        self.bo_add_export(h, &buf)?;
        Ok(buf)
    }
}
