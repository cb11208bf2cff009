//! A static exporter of p2p memory (an NVMe CMB, a BAR): the buffer never moves, so it
//! has no pin; an importer reaches it only peer-to-peer, by the fabric's verdict.

use std::fmt;

use crate::addr::{VirtAddr, PAGE_SIZE};
use crate::dma::{Direction, SgTable};
use crate::dmabuf::{AttachInfo, DmaBuf, DmaBufError, Exporter, Mapped, ResvGuard};
use crate::errno::Errno;
use crate::fabric::MapType;
use crate::mm::{Mm, Prot};
use crate::p2pmem::{P2pAlloc, Provider};
use crate::sync::Arc;

/// p2p memory exported as a dma-buf (what a VFIO or NVMe driver exporting its BAR
/// does).
///
/// # Invariants
/// The allocation is held until the buffer is released.
pub struct P2pMemExporter {
    alloc: P2pAlloc,
}

impl fmt::Debug for P2pMemExporter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

impl P2pMemExporter {
    /// Allocates `bytes` of `provider`'s memory and exports it.
    pub fn export(provider: &Arc<Provider>, bytes: u64) -> Result<Arc<DmaBuf>, DmaBufError> {
        let alloc = provider
            .alloc(bytes)
            .map_err(|e| DmaBufError::new("export", e.errno(), e.to_string()))?;
        let size = alloc.pages() * PAGE_SIZE;
        DmaBuf::export(Box::new(P2pMemExporter { alloc }), size, None)
    }
}

impl Exporter for P2pMemExporter {
    fn describe(&self) -> String {
        let p = self.alloc.provider();
        format!("p2pmem of {} BAR {}", p.dev(), p.bar())
    }

    /// p2p memory has no copy in system RAM: an importer that cannot take
    /// peer-to-peer addresses, or that the fabric keeps from the provider, is refused.
    fn attach(&self, att: &AttachInfo) -> Result<bool, DmaBufError> {
        let op = "attach";
        let provider = self.alloc.provider().dev();
        if !att.peer2peer {
            return Err(DmaBufError::new(
                op,
                Errno::EOPNOTSUPP,
                format!(
                    "{} can only be reached peer-to-peer and {} does not allow it",
                    self.describe(),
                    att.dev.bdf()
                ),
            ));
        }
        let v = att
            .dev
            .verdict(provider)
            .map_err(|e| DmaBufError::new(op, e.errno(), e.to_string()))?;
        if v.map_type == MapType::NotSupported {
            return Err(DmaBufError::new(
                op,
                Errno::EOPNOTSUPP,
                format!(
                    "{} cannot reach {}: {}",
                    att.dev.bdf(),
                    self.describe(),
                    v.reason()
                ),
            ));
        }
        Ok(true)
    }

    fn map(
        &self,
        _resv: &mut ResvGuard<'_>,
        att: &AttachInfo,
        dir: Direction,
    ) -> Result<Arc<dyn Mapped>, DmaBufError> {
        let bytes = self.alloc.pages() * PAGE_SIZE;
        let runs = [(self.alloc.pfn(), self.alloc.pages() as u32)];
        let sg = SgTable::from_runs(&runs, 0, bytes, att.dev.max_segment());
        let m = att
            .dev
            .map_sg(&sg, dir)
            .map_err(|e| DmaBufError::new("map_attachment", e.errno(), e.to_string()))?;
        Ok(Arc::new(m))
    }

    fn mmap(
        &self,
        mm: &Arc<Mm>,
        offset: u64,
        len: u64,
        prot: Prot,
    ) -> Result<VirtAddr, DmaBufError> {
        self.alloc
            .mmap(mm, offset / PAGE_SIZE, len / PAGE_SIZE, prot)
            .map_err(|e| DmaBufError::new("mmap", e.errno(), e.to_string()))
    }
}
