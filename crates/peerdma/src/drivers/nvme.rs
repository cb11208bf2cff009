//! An NVMe controller: namespaces backed by a real (sparse, temporary by default) file,
//! read and write commands whose data pointers are DMA addresses (PRP entries or an SGL
//! built from a mapped SG table), and a controller memory buffer in a BAR registered as
//! p2p memory by the rules of the Linux driver's `nvme_map_cmb()`.
//!
//! Not modelled: queues and doorbells (commands are calls), and PRP lists living in
//! host memory (the list is handed over with the command).

use crate::errno::Errno;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use crate::addr::{Bdf, DmaAddr, PAGE_SIZE};
use crate::dma::{DmaDevice, DmaError, DmaSegment};
use crate::drivers::{Device, Probe, ProbeError};
use crate::p2pmem::{P2pError, P2pRegistry, Provider};
use crate::sync::atomic::{AtomicU64, Ordering};
use crate::sync::Arc;

/// The CMBSZ and CMBLOC registers of a controller with a CMB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CmbRegs {
    /// CMBSZ: SQS bit 0, CQS 1, LISTS 2, RDS 3, WDS 4, SZU bits 11:8, SZ bits 31:12.
    pub cmbsz: u32,
    /// CMBLOC: BIR bits 2:0, OFST bits 31:12 (in SZU units).
    pub cmbloc: u32,
}

/// What `nvme_map_cmb()` would do with a controller's buffer, before registering it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CmbPlan {
    /// CMBSZ is zero: no buffer.
    Absent,
    /// The driver leaves it alone, and why.
    Skipped(String),
    /// It becomes p2p memory: `size` bytes at `offset` into BAR `bar`; published for
    /// other drivers when the controller supports both data directions (WDS and RDS).
    Usable {
        /// The BAR.
        bar: u8,
        /// Bytes into the BAR.
        offset: u64,
        /// Bytes registered.
        size: u64,
        /// Whether it is published.
        published: bool,
    },
}

impl CmbRegs {
    /// The kernel's `nvme_map_cmb()` decisions for these registers and the function's
    /// BARs: size and offset from CMBSZ/CMBLOC (in SZU units), the BAR CMBLOC names,
    /// the offset inside it, the size clamped to the BAR, both 2 MiB aligned
    /// (memremap_compat_align), and a size of zero refused (pci_p2pdma_add_resource
    /// would take it as "the rest of the BAR").
    pub fn plan(&self, bars: &[crate::fabric::Bar]) -> CmbPlan {
        if self.cmbsz == 0 {
            return CmbPlan::Absent;
        }
        let unit = 4096u64 << (4 * ((self.cmbsz >> 8) & 0xf));
        let mut size = unit * u64::from(self.cmbsz >> 12);
        let offset = unit * u64::from(self.cmbloc >> 12);
        let bar = (self.cmbloc & 7) as u8;
        let Some(b) = bars.iter().find(|b| b.index == bar && !b.io) else {
            return CmbPlan::Skipped(format!(
                "CMBLOC names BAR {bar}, which is not a memory BAR of the function"
            ));
        };
        if offset > b.size {
            return CmbPlan::Skipped(format!(
                "offset {offset:#x} beyond BAR {bar} of {:#x} bytes",
                b.size
            ));
        }
        size = size.min(b.size - offset);
        if size == 0 {
            return CmbPlan::Skipped(format!(
                "too small: nothing of it lies inside BAR {bar} (CMBSZ {:#x})",
                self.cmbsz
            ));
        }
        if !size.is_multiple_of(CMB_ALIGN) || !b.cpu.0.is_multiple_of(CMB_ALIGN) {
            return CmbPlan::Skipped(format!(
                "misaligned: a CMB of {size:#x} bytes in BAR {bar} at {} is not 2 MiB aligned",
                b.cpu
            ));
        }
        CmbPlan::Usable {
            bar,
            offset,
            size,
            published: self.cmbsz & (Self::WDS | Self::RDS) == Self::WDS | Self::RDS,
        }
    }

    /// Read data support.
    pub const RDS: u32 = 1 << 3;
    /// Write data support.
    pub const WDS: u32 = 1 << 4;

    /// A CMB of `size` bytes (a multiple of 1 MiB) at `offset` (a multiple of 1 MiB)
    /// into BAR `bar`, with both data directions supported.
    pub fn whole(bar: u8, size: u64, offset: u64) -> Self {
        const SZU_1M: u32 = 2; // 4 KiB * 16^2
        CmbRegs {
            cmbsz: Self::RDS | Self::WDS | (SZU_1M << 8) | (((size >> 20) as u32) << 12),
            cmbloc: u32::from(bar & 7) | (((offset >> 20) as u32) << 12),
        }
    }
}

/// How the CMB came out of `nvme_map_cmb()`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CmbStatus {
    /// CMBSZ is zero.
    Absent,
    /// Present but not registered, and why.
    Skipped(String),
    /// Registered as p2p memory.
    Registered {
        /// Bytes.
        size: u64,
        /// Published for other clients (WDS and RDS both supported).
        published: bool,
    },
}

impl std::fmt::Display for CmbStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CmbStatus::Absent => f.write_str("the controller has no memory buffer (CMBSZ is 0)"),
            CmbStatus::Skipped(why) => f.write_str(why),
            CmbStatus::Registered { size, published } => write!(
                f,
                "a {size:#x}-byte buffer registered as p2p memory, {}",
                if *published {
                    "published"
                } else {
                    "not published (it lacks WDS or RDS)"
                }
            ),
        }
    }
}

/// How to build a controller.
#[derive(Clone, Debug)]
pub struct NvmeConfig {
    /// Logical block size: 512 or 4096.
    pub lba_size: u32,
    /// Namespace size in bytes.
    pub capacity: u64,
    /// The backing file; when `None`, an anonymous memory file (memfd) for a
    /// namespace of up to 256 MiB, a sparse temporary file for a larger one.
    pub backing: Option<PathBuf>,
    /// The CMB registers, when the controller has one.
    pub cmb: Option<CmbRegs>,
}

impl Default for NvmeConfig {
    fn default() -> Self {
        NvmeConfig {
            lba_size: 4096,
            capacity: 1 << 30,
            backing: None,
            cmb: None,
        }
    }
}

/// What a controller can refuse.
#[derive(Debug, thiserror::Error)]
pub enum NvmeError {
    /// A bad configuration.
    #[error("NVMe {dev}: {why}")]
    Config {
        /// The controller.
        dev: Bdf,
        /// Why.
        why: String,
    },
    /// The namespace file failed.
    #[error("NVMe {dev}: namespace file")]
    Io {
        /// The controller.
        dev: Bdf,
        /// The OS error.
        source: std::io::Error,
    },
    /// LBA range outside the namespace (the NVMe status LBA Out of Range).
    #[error("NVMe {dev}: LBA {slba}+{nlb} outside the namespace of {nlba} blocks")]
    LbaOutOfRange {
        /// The controller.
        dev: Bdf,
        /// First block.
        slba: u64,
        /// Blocks.
        nlb: u64,
        /// Blocks in the namespace.
        nlba: u64,
    },
    /// The data pointer does not cover the transfer (Data SGL Length Invalid).
    #[error("NVMe {dev}: the data pointer covers {have:#x} bytes, the command moves {need:#x}")]
    DataPointer {
        /// The controller.
        dev: Bdf,
        /// Bytes described.
        have: u64,
        /// Bytes needed.
        need: u64,
    },
    /// A DMA the engine refused (the NVMe status Data Transfer Error).
    #[error("NVMe {dev}: data transfer error")]
    Dma {
        /// The controller.
        dev: Bdf,
        /// The engine's refusal.
        source: DmaError,
    },
    /// Registering the CMB failed.
    #[error(transparent)]
    P2p(#[from] P2pError),
}

impl NvmeError {
    /// The error number the kernel's block layer returns for it (`nvme_error_status`
    /// then `blk_status_to_errno`): an LBA out of range is `BLK_STS_TARGET`, which is
    /// EREMOTEIO; transfer and data-pointer errors are `BLK_STS_IOERR`, EIO.
    pub fn errno(&self) -> Errno {
        match self {
            NvmeError::Config { .. } => Errno::EINVAL,
            NvmeError::Io { .. } | NvmeError::DataPointer { .. } | NvmeError::Dma { .. } => {
                Errno::EIO
            }
            NvmeError::LbaOutOfRange { .. } => Errno::EREMOTEIO,
            NvmeError::P2p(e) => e.errno(),
        }
    }
}

/// A command's data pointer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataPointer {
    /// PRP entries: the first may start anywhere in a page, every later one is page
    /// aligned and covers a whole page (the last possibly in part).
    Prp(Vec<DmaAddr>),
    /// An SGL of data blocks (address, length).
    Sgl(Vec<(DmaAddr, u64)>),
}

impl DataPointer {
    /// The pointer a driver would build for mapped segments: PRPs when the segments
    /// allow (every segment but the first starts page aligned, every one but the last
    /// ends page aligned), else an SGL.
    pub fn for_segments(segments: &[DmaSegment]) -> Self {
        let n = segments.len();
        let prp_ok = segments.iter().enumerate().all(|(i, s)| {
            (i == 0 || s.addr.0 % PAGE_SIZE == 0)
                && (i + 1 == n || (s.addr.0 + s.len) % PAGE_SIZE == 0)
        });
        if !prp_ok {
            return DataPointer::Sgl(segments.iter().map(|s| (s.addr, s.len)).collect());
        }
        let mut prps = Vec::new();
        for s in segments {
            let mut a = s.addr.0;
            let end = s.addr.0 + s.len;
            while a < end {
                prps.push(DmaAddr(a));
                a = (a & !(PAGE_SIZE - 1)) + PAGE_SIZE;
            }
        }
        DataPointer::Prp(prps)
    }

    /// The (address, bytes) pieces of a transfer of `len` bytes.
    fn pieces(&self, len: u64) -> Vec<(DmaAddr, u64)> {
        let mut out = Vec::new();
        let mut left = len;
        match self {
            DataPointer::Prp(prps) => {
                for a in prps {
                    if left == 0 {
                        break;
                    }
                    let n = (PAGE_SIZE - a.0 % PAGE_SIZE).min(left);
                    out.push((*a, n));
                    left -= n;
                }
            }
            DataPointer::Sgl(blocks) => {
                for &(a, l) in blocks {
                    if left == 0 {
                        break;
                    }
                    let n = l.min(left);
                    out.push((a, n));
                    left -= n;
                }
            }
        }
        out
    }
}

/// An NVMe controller with one namespace.
pub struct Nvme {
    dev: Bdf,
    dma: DmaDevice,
    file: File,
    lba_size: u32,
    nlba: u64,
    cmb: Option<Arc<Provider>>,
    cmb_status: CmbStatus,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
}

impl std::fmt::Debug for Nvme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nvme")
            .field("dev", &self.dev)
            .field("cmb", &self.cmb_status)
            .finish()
    }
}

impl Device for Nvme {
    fn bdf(&self) -> Bdf {
        self.dev
    }
    fn kind(&self) -> &'static str {
        "nvme"
    }
    fn providers(&self) -> Vec<Arc<Provider>> {
        self.cmb.iter().cloned().collect()
    }
}

/// An NVMe controller to bring up at an endpoint.
#[derive(Clone, Debug)]
pub struct NvmeSpec {
    /// The endpoint.
    pub bdf: Bdf,
    /// Its configuration.
    pub config: NvmeConfig,
}

impl Probe for NvmeSpec {
    fn bdf(&self) -> Bdf {
        self.bdf
    }
    fn probe(&self, p2p: &Arc<P2pRegistry>) -> Result<Arc<dyn Device>, ProbeError> {
        match Nvme::new(p2p, self.bdf, self.config.clone()) {
            Ok(n) => Ok(n),
            Err(e) => Err(ProbeError {
                dev: self.bdf,
                kind: "nvme",
                errno: e.errno(),
                source: Box::new(e),
            }),
        }
    }
}

/// `memremap_compat_align()` on x86-64: a CMB (size and BAR start) must be a multiple.
const CMB_ALIGN: u64 = 2 << 20;

/// The largest namespace without a backing file that lives in memory (a memfd).
const MEMFD_CAPACITY: u64 = 256 << 20;

impl Nvme {
    /// Brings up a controller at `dev`: creates its namespace and maps its CMB.
    pub fn new(p2p: &Arc<P2pRegistry>, dev: Bdf, cfg: NvmeConfig) -> Result<Arc<Self>, NvmeError> {
        let dma = p2p.dma();
        let bad = |why: String| NvmeError::Config { dev, why };
        if cfg.lba_size != 512 && cfg.lba_size != 4096 {
            return Err(bad(format!(
                "LBA size {} is neither 512 nor 4096",
                cfg.lba_size
            )));
        }
        if cfg.capacity == 0 || !cfg.capacity.is_multiple_of(u64::from(cfg.lba_size)) {
            return Err(bad(format!(
                "capacity {:#x} is not a whole number of blocks",
                cfg.capacity
            )));
        }
        let Ok(handle) = dma.attach(dev) else {
            return Err(bad("no such function in the fabric".into()));
        };
        let io = |source| NvmeError::Io { dev, source };
        let file = match &cfg.backing {
            Some(p) => std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(p)
                .map_err(io)?,
            // A small namespace lives in memory (a memfd: no filesystem journal on
            // every write), a large one in a temporary file on disk.
            None if cfg.capacity <= MEMFD_CAPACITY => {
                rustix::fs::memfd_create("peerdma-nvme", rustix::fs::MemfdFlags::CLOEXEC)
                    .map(std::fs::File::from)
                    .map_err(|e| io(e.into()))?
            }
            None => tempfile::tempfile().map_err(io)?,
        };
        file.set_len(cfg.capacity).map_err(io)?;
        // The Linux driver allows segments up to 4 GiB (dma_set_max_seg_size).
        handle.set_max_segment(u64::from(u32::MAX));
        let (cmb, cmb_status) = Self::map_cmb(p2p, dev, cfg.cmb)?;
        Ok(Arc::new(Nvme {
            dev,
            dma: handle,
            file,
            lba_size: cfg.lba_size,
            nlba: cfg.capacity / u64::from(cfg.lba_size),
            cmb,
            cmb_status,
            bytes_read: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
        }))
    }

    /// `nvme_map_cmb()`: registers the buffer [`CmbRegs::plan`] finds usable as p2p
    /// memory, and publishes it when the controller supports both data directions.
    fn map_cmb(
        p2p: &P2pRegistry,
        dev: Bdf,
        regs: Option<CmbRegs>,
    ) -> Result<(Option<Arc<Provider>>, CmbStatus), NvmeError> {
        let Some(regs) = regs else {
            return Ok((None, CmbStatus::Absent));
        };
        let topo = p2p.dma().topology();
        let f = topo.function(topo.lookup(dev).ok_or(NvmeError::Config {
            dev,
            why: "no such function".into(),
        })?);
        let (bar, offset, size, published) = match regs.plan(&f.bars) {
            CmbPlan::Absent => return Ok((None, CmbStatus::Absent)),
            CmbPlan::Skipped(why) => return Ok((None, CmbStatus::Skipped(why))),
            CmbPlan::Usable {
                bar,
                offset,
                size,
                published,
            } => (bar, offset, size, published),
        };
        let provider = p2p.add_resource(dev, bar, size, offset)?;
        tracing::info!(dev = %dev, bar, size, offset, "nvme: CMB registered as p2p memory");
        provider.publish(published);
        Ok((Some(provider), CmbStatus::Registered { size, published }))
    }

    /// The controller's address.
    pub fn dev(&self) -> Bdf {
        self.dev
    }
    /// Its DMA handle.
    pub fn dma(&self) -> &DmaDevice {
        &self.dma
    }
    /// The CMB provider, when registered.
    pub fn cmb(&self) -> Option<&Arc<Provider>> {
        self.cmb.as_ref()
    }
    /// How the CMB came out.
    pub fn cmb_status(&self) -> &CmbStatus {
        &self.cmb_status
    }
    /// Logical block size.
    pub fn lba_size(&self) -> u32 {
        self.lba_size
    }
    /// Blocks in the namespace.
    pub fn nlba(&self) -> u64 {
        self.nlba
    }
    /// The namespace's backing file (for setup and verification outside DMA).
    pub fn backing(&self) -> &File {
        &self.file
    }
    /// Bytes read from and written to the namespace by commands.
    pub fn bytes_moved(&self) -> (u64, u64) {
        (
            self.bytes_read.load(Ordering::Relaxed),
            self.bytes_written.load(Ordering::Relaxed),
        )
    }

    fn check(&self, slba: u64, nlb: u64, dptr: &DataPointer) -> Result<u64, NvmeError> {
        if nlb == 0 || slba.checked_add(nlb).is_none_or(|e| e > self.nlba) {
            return Err(NvmeError::LbaOutOfRange {
                dev: self.dev,
                slba,
                nlb,
                nlba: self.nlba,
            });
        }
        let need = nlb * u64::from(self.lba_size);
        let have: u64 = dptr.pieces(need).iter().map(|p| p.1).sum();
        if have < need {
            return Err(NvmeError::DataPointer {
                dev: self.dev,
                have,
                need,
            });
        }
        Ok(need)
    }

    /// Read command: `nlb` blocks from `slba` into the memory `dptr` points at (the
    /// controller DMA-writes memory, one transfer through the pointer's pieces).
    pub fn read(&self, slba: u64, nlb: u64, dptr: &DataPointer) -> Result<(), NvmeError> {
        let len = self.check(slba, nlb, dptr)?;
        let mut buf = vec![0u8; len as usize];
        self.file
            .read_exact_at(&mut buf, slba * u64::from(self.lba_size))
            .map_err(|source| NvmeError::Io {
                dev: self.dev,
                source,
            })?;
        self.dma
            .dma_write_sg(&dptr.pieces(len), &buf)
            .map_err(|source| NvmeError::Dma {
                dev: self.dev,
                source,
            })?;
        self.bytes_read.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    /// Write command: `nlb` blocks to `slba` from the memory `dptr` points at (the
    /// controller DMA-reads memory).
    pub fn write(&self, slba: u64, nlb: u64, dptr: &DataPointer) -> Result<(), NvmeError> {
        let len = self.check(slba, nlb, dptr)?;
        let mut buf = vec![0u8; len as usize];
        self.dma
            .dma_read_sg(&dptr.pieces(len), &mut buf)
            .map_err(|source| NvmeError::Dma {
                dev: self.dev,
                source,
            })?;
        self.file
            .write_all_at(&buf, slba * u64::from(self.lba_size))
            .map_err(|source| NvmeError::Io {
                dev: self.dev,
                source,
            })?;
        self.bytes_written.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }
}
