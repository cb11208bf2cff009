//! dma-buf: a buffer one driver exports and other devices and processes import
//! (drivers/dma-buf/dma-buf.c, dma-resv.c, include/linux/dma-buf.h).
//!
//! An exporter ([`Exporter`]) owns the storage; [`DmaBuf::export`] wraps it with a size
//! and a reservation object ([`Resv`]: a lock plus [`Fence`]s by [`Usage`]). A device
//! attaches ([`DmaBuf::attach`] for a static importer, [`DmaBuf::dynamic_attach`] with
//! [`Importer`] ops for a dynamic one) and maps its attachment with the reservation lock
//! held ([`Attachment::map`]), getting DMA addresses of wherever the buffer is — a
//! peer's BAR by bus address or IOVA when the importer allows peer-to-peer and the
//! fabric does, system RAM otherwise. An exporter that can pin is dynamic: it may move
//! the buffer, and does so with the lock held, first calling [`DmaBuf::move_notify`]
//! (every dynamic importer's [`Importer::move_notify`]), then waiting for the
//! importers' fences, and only then freeing the old storage. A static importer of a
//! dynamic exporter pins the buffer for as long as it maps it.
//!
//! Processes share buffers through file descriptors ([`FdTable`]): export to an fd,
//! pass it ([`FdTable::pass`], what SCM_RIGHTS does), import it ([`FdTable::dma_buf`]:
//! EBADF for a bad fd, EINVAL for a file that is not a dma-buf). The buffer lives until
//! the last file reference and the last attachment drop; then the exporter's
//! `release` runs.
//!
//! Where peerdma differs on purpose: mapping returns the exporter's live DMA mapping
//! object rather than an sg_table, and a mapping whose buffer moved is *revoked* (a
//! DMA through it fails) rather than left pointing at memory that may be reused — the
//! kernel trusts the importer to stop in time, peerdma proves it; waiting for the
//! importers' accesses is done by that revocation (it drains the DMA in flight through
//! the old mapping) plus any fences importers added. CPU `mmap` of a dma-buf pins the
//! buffer where it is for as long as the mapping exists (the kernel's TTM would zap and
//! re-fault it instead).

mod p2p;
mod resv;

pub use p2p::P2pMemExporter;
pub use resv::{Fence, Resv, ResvGuard, Usage};

use std::any::Any;
use std::collections::BTreeMap;
use std::fmt;

use crate::addr::{Bdf, VirtAddr, PAGE_SIZE};
use crate::dma::{Direction, DmaDevice, DmaMapping};
use crate::errno::Errno;
use crate::mm::{Mm, Prot};
use crate::sync::atomic::{AtomicU64, Ordering};
use crate::sync::{order, Arc, OrderedMutex, Weak};

/// A dma-buf call refused: the operation, the kernel's errno and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("dma-buf {op}: {why} ({errno})")]
pub struct DmaBufError {
    /// The call.
    pub op: &'static str,
    /// The kernel's error number.
    pub errno: Errno,
    /// Why, naming the buffer or device.
    pub why: String,
}

impl DmaBufError {
    /// A refusal of `op` with `errno`.
    pub fn new(op: &'static str, errno: Errno, why: impl Into<String>) -> Self {
        DmaBufError {
            op,
            errno,
            why: why.into(),
        }
    }
    /// The kernel's error number.
    pub fn errno(&self) -> Errno {
        self.errno
    }
}

/// What an exporter's `map` hands an importer: a DMA mapping of the buffer for the
/// importing device, kept alive (and, for a movable buffer, revocable) by the
/// exporter's object behind it.
pub trait Mapped: Send + Sync {
    /// The mapping as the importing device addresses it.
    fn mapping(&self) -> &DmaMapping;
}

impl Mapped for DmaMapping {
    fn mapping(&self) -> &DmaMapping {
        self
    }
}

/// What an exporter is told of an attachment.
#[derive(Clone, Debug)]
pub struct AttachInfo {
    /// The attachment's id, unique on its buffer.
    pub id: u64,
    /// The importing device.
    pub dev: DmaDevice,
    /// Whether the importer takes peer-to-peer addresses (`attach->peer2peer`); the
    /// exporter's `attach` may clear it.
    pub peer2peer: bool,
    /// Whether the importer is dynamic (has `move_notify`).
    pub dynamic: bool,
}

/// The exporter's side of a dma-buf (`struct dma_buf_ops`). Every call but `attach`,
/// `detach`, `release`, `mmap` and `cpu_access` comes with the reservation lock held.
pub trait Exporter: Send + Sync + fmt::Debug {
    /// What the buffer is, for messages ("gpu 0000:41:00.0 BO 3").
    fn describe(&self) -> String;
    /// `ops->attach`: may refuse (EOPNOTSUPP, EBUSY) or return false to clear the
    /// attachment's peer-to-peer flag.
    fn attach(&self, att: &AttachInfo) -> Result<bool, DmaBufError>;
    /// `ops->detach`.
    fn detach(&self, _att: &AttachInfo) {}
    /// Whether it can pin (`ops->pin`): an exporter that can is dynamic, it may move
    /// the buffer.
    fn dynamic(&self) -> bool {
        false
    }
    /// `ops->pin`: keep the buffer where an importer that cannot be told of moves can
    /// reach it, until `unpin`.
    fn pin(&self, _resv: &mut ResvGuard<'_>, _att: &AttachInfo) -> Result<(), DmaBufError> {
        Ok(())
    }
    /// `ops->unpin`.
    fn unpin(&self, _resv: &ResvGuard<'_>, _att: &AttachInfo) {}
    /// `ops->map_dma_buf`: the buffer mapped for `att.dev`, wherever it is now (moving
    /// it first where the importer cannot reach it there).
    fn map(
        &self,
        resv: &mut ResvGuard<'_>,
        att: &AttachInfo,
        dir: Direction,
    ) -> Result<Arc<dyn Mapped>, DmaBufError>;
    /// `ops->mmap`: maps `len` bytes from `offset` into `mm`.
    fn mmap(
        &self,
        mm: &Arc<Mm>,
        offset: u64,
        len: u64,
        prot: Prot,
    ) -> Result<VirtAddr, DmaBufError>;
    /// `ops->begin_cpu_access` / `end_cpu_access`.
    fn cpu_access(&self, _begin: bool, _dir: Direction) -> Result<(), DmaBufError> {
        Ok(())
    }
    /// `ops->release`: the last reference dropped.
    fn release(&self) {}
}

/// The importer's side of a dynamic attachment (`struct dma_buf_attach_ops`).
pub trait Importer: Send + Sync {
    /// Whether it can take peer-to-peer addresses (`allow_peer2peer`).
    fn allow_peer2peer(&self) -> bool;
    /// `move_notify` (`invalidate_mappings`): the buffer is about to move. Called with
    /// the reservation lock held; the importer stops using its mapping and drops it
    /// (the next map points at the new place). Must not take the reservation lock.
    fn move_notify(&self, att: &Attachment);
}

/// Counters of one buffer, for tests and reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DmaBufStats {
    /// Live attachments.
    pub attachments: u64,
    /// Live mappings handed out.
    pub mappings: u64,
    /// Pins held by static importers' mappings and by pinning importers.
    pub pins: u64,
    /// Times `move_notify` went round the importers.
    pub move_notifies: u64,
}

/// A dma-buf (`struct dma_buf`).
///
/// # Invariants
/// `size` never changes. Every live [`Attachment`] holds the buffer; the exporter's
/// `release` runs once, after the last reference (fd, attachment, handle) dropped.
pub struct DmaBuf {
    id: u64,
    size: u64,
    exporter: Box<dyn Exporter>,
    resv: Arc<Resv>,
    /// Lock order: a leaf.
    attachments: OrderedMutex<Vec<Weak<Attachment>>>,
    next_attach: AtomicU64,
    mappings: AtomicU64,
    pins: AtomicU64,
    move_notifies: AtomicU64,
}

impl fmt::Debug for DmaBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaBuf")
            .field("id", &self.id)
            .field("size", &self.size)
            .field("exporter", &self.exporter)
            .finish()
    }
}

/// Buffer numbers, unique in the process (a plain std atomic: a shuttle atomic may not
/// live in a static shared by test executions).
static NEXT_BUF: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl DmaBuf {
    /// `dma_buf_export`: a buffer of `size` bytes backed by `exporter`, sharing the
    /// reservation object `resv` when the exporter has one (a GPU object's own),
    /// otherwise with a new one. EINVAL for a size of zero or not page aligned.
    pub fn export(
        exporter: Box<dyn Exporter>,
        size: u64,
        resv: Option<Arc<Resv>>,
    ) -> Result<Arc<DmaBuf>, DmaBufError> {
        if size == 0 || !size.is_multiple_of(PAGE_SIZE) {
            return Err(DmaBufError::new(
                "export",
                Errno::EINVAL,
                format!(
                    "{}: size {size:#x} is not a non-zero multiple of the page size",
                    exporter.describe()
                ),
            ));
        }
        Ok(Arc::new(DmaBuf {
            id: NEXT_BUF.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            size,
            exporter,
            resv: resv.unwrap_or_default(),
            attachments: OrderedMutex::new(&order::LEAF, Vec::new()),
            next_attach: AtomicU64::new(1),
            mappings: AtomicU64::new(0),
            pins: AtomicU64::new(0),
            move_notifies: AtomicU64::new(0),
        }))
    }

    /// Its size in bytes (the file's `i_size`).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// A number unique on the machine, for messages.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// What it is.
    pub fn describe(&self) -> String {
        format!("dma-buf {} ({})", self.id, self.exporter.describe())
    }

    /// Its reservation object.
    pub fn resv(&self) -> &Arc<Resv> {
        &self.resv
    }

    /// `dma_buf_is_dynamic`.
    pub fn is_dynamic(&self) -> bool {
        self.exporter.dynamic()
    }

    /// Its counters now.
    pub fn stats(&self) -> DmaBufStats {
        DmaBufStats {
            attachments: self.live_attachments().len() as u64,
            mappings: self.mappings.load(Ordering::Relaxed),
            pins: self.pins.load(Ordering::Relaxed),
            move_notifies: self.move_notifies.load(Ordering::Relaxed),
        }
    }

    fn live_attachments(&self) -> Vec<Arc<Attachment>> {
        let mut list = self.attachments.lock();
        list.retain(|w| w.strong_count() > 0);
        list.iter().filter_map(Weak::upgrade).collect()
    }

    /// `dma_buf_attach`: a static importer on `dev`, which cannot be told of moves (it
    /// never gets peer-to-peer addresses; a dynamic exporter pins the buffer while it
    /// is mapped).
    pub fn attach(self: &Arc<Self>, dev: &DmaDevice) -> Result<Arc<Attachment>, DmaBufError> {
        self.attach_with(dev, None)
    }

    /// `dma_buf_dynamic_attach`: an importer on `dev` with move notification.
    pub fn dynamic_attach(
        self: &Arc<Self>,
        dev: &DmaDevice,
        importer: Arc<dyn Importer>,
    ) -> Result<Arc<Attachment>, DmaBufError> {
        self.attach_with(dev, Some(importer))
    }

    fn attach_with(
        self: &Arc<Self>,
        dev: &DmaDevice,
        importer: Option<Arc<dyn Importer>>,
    ) -> Result<Arc<Attachment>, DmaBufError> {
        let mut info = AttachInfo {
            id: self.next_attach.fetch_add(1, Ordering::Relaxed),
            dev: dev.clone(),
            peer2peer: importer.as_ref().is_some_and(|i| i.allow_peer2peer()),
            dynamic: importer.is_some(),
        };
        info.peer2peer &= self.exporter.attach(&info)?;
        let att = Arc::new(Attachment {
            buf: self.clone(),
            info,
            importer,
        });
        let _resv = self.resv.lock();
        self.attachments.lock().push(Arc::downgrade(&att));
        Ok(att)
    }

    /// `dma_buf_move_notify`: tells every dynamic importer the buffer is about to
    /// move. The exporter calls it with the reservation lock held (`resv`).
    pub fn move_notify(&self, resv: &ResvGuard<'_>) {
        debug_assert!(
            resv.holds(&self.resv),
            "move_notify without the buffer's lock"
        );
        self.move_notifies.fetch_add(1, Ordering::Relaxed);
        for att in self.live_attachments() {
            if let Some(imp) = &att.importer {
                imp.move_notify(&att);
            }
        }
    }

    /// `mmap` of the buffer's fd: maps `len` bytes from `offset` (page aligned) into
    /// `mm`. EINVAL when the range runs past the buffer or is not page aligned.
    pub fn mmap(
        &self,
        mm: &Arc<Mm>,
        offset: u64,
        len: u64,
        prot: Prot,
    ) -> Result<VirtAddr, DmaBufError> {
        let op = "mmap";
        if !offset.is_multiple_of(PAGE_SIZE) || len == 0 {
            return Err(DmaBufError::new(
                op,
                Errno::EINVAL,
                "offset must be page aligned and length not zero",
            ));
        }
        let pages = len.div_ceil(PAGE_SIZE);
        if (offset / PAGE_SIZE).saturating_add(pages) > self.size / PAGE_SIZE {
            return Err(DmaBufError::new(
                op,
                Errno::EINVAL,
                format!(
                    "{} pages from offset {offset:#x} run past the end of {} ({:#x} bytes)",
                    pages,
                    self.describe(),
                    self.size
                ),
            ));
        }
        self.exporter.mmap(mm, offset, pages * PAGE_SIZE, prot)
    }

    /// `DMA_BUF_IOCTL_SYNC`: `begin` waits for the fences a CPU access in `dir` must
    /// wait for (a write waits for readers and writers, a read for writers) after the
    /// exporter's hook; the end only runs the hook. EINVAL when no direction is given.
    pub fn sync(&self, flags: SyncFlags) -> Result<(), DmaBufError> {
        let dir = match (flags.read, flags.write) {
            (true, true) => Direction::Bidirectional,
            (true, false) => Direction::FromDevice,
            (false, true) => Direction::ToDevice,
            (false, false) => {
                return Err(DmaBufError::new(
                    "sync",
                    Errno::EINVAL,
                    "neither READ nor WRITE asked",
                ))
            }
        };
        self.exporter.cpu_access(!flags.end, dir)?;
        if !flags.end {
            self.resv.wait(Usage::rw(flags.write));
        }
        Ok(())
    }
}

impl Drop for DmaBuf {
    fn drop(&mut self) {
        self.exporter.release();
    }
}

/// `struct dma_buf_sync` flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncFlags {
    /// `DMA_BUF_SYNC_READ`.
    pub read: bool,
    /// `DMA_BUF_SYNC_WRITE`.
    pub write: bool,
    /// `DMA_BUF_SYNC_END` (else START).
    pub end: bool,
}

/// One device's attachment to a buffer (`struct dma_buf_attachment`); dropping it
/// detaches.
///
/// # Invariants
/// `info.peer2peer` is what the exporter agreed to at attach and never changes.
pub struct Attachment {
    buf: Arc<DmaBuf>,
    info: AttachInfo,
    importer: Option<Arc<dyn Importer>>,
}

impl fmt::Debug for Attachment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Attachment")
            .field("buf", &self.buf.id)
            .field("dev", &self.info.dev.bdf())
            .field("peer2peer", &self.info.peer2peer)
            .field("dynamic", &self.info.dynamic)
            .finish()
    }
}

impl Attachment {
    /// The buffer.
    pub fn buf(&self) -> &Arc<DmaBuf> {
        &self.buf
    }
    /// The importing device.
    pub fn dev(&self) -> Bdf {
        self.info.dev.bdf()
    }
    /// Whether the importer gets peer-to-peer addresses.
    pub fn peer2peer(&self) -> bool {
        self.info.peer2peer
    }
    /// Whether the importer is dynamic.
    pub fn is_dynamic(&self) -> bool {
        self.info.dynamic
    }

    fn check_lock(&self, op: &'static str, resv: &ResvGuard<'_>) -> Result<(), DmaBufError> {
        if resv.holds(&self.buf.resv) {
            Ok(())
        } else {
            Err(DmaBufError::new(
                op,
                Errno::EINVAL,
                format!(
                    "the reservation lock of {} is not held",
                    self.buf.describe()
                ),
            ))
        }
    }

    /// `dma_buf_map_attachment` (the reservation lock held): the buffer mapped for the
    /// device. A static importer of a dynamic exporter pins the buffer first, and
    /// waits for the KERNEL fences (a move or clear in progress); a dynamic importer
    /// must wait for those itself before it uses the mapping.
    pub fn map(
        self: &Arc<Self>,
        resv: &mut ResvGuard<'_>,
        dir: Direction,
    ) -> Result<AttachMapping, DmaBufError> {
        let op = "map_attachment";
        self.check_lock(op, resv)?;
        let pin = self.buf.is_dynamic() && self.importer.is_none();
        if pin {
            self.buf.exporter.pin(resv, &self.info)?;
        }
        let mapped = match self.buf.exporter.map(resv, &self.info, dir) {
            Ok(m) => m,
            Err(e) => {
                if pin {
                    self.buf.exporter.unpin(resv, &self.info);
                }
                return Err(e);
            }
        };
        if self.importer.is_none() {
            resv.wait(Usage::Kernel);
        }
        self.buf.mappings.fetch_add(1, Ordering::Relaxed);
        if pin {
            self.buf.pins.fetch_add(1, Ordering::Relaxed);
        }
        Ok(AttachMapping {
            att: self.clone(),
            mapped: Some(mapped),
            pinned: pin,
        })
    }

    /// `dma_buf_pin` (the reservation lock held): a dynamic importer that cannot take
    /// faults keeps the buffer in place (the pinned RDMA registration). EINVAL for a
    /// static importer.
    pub fn pin(&self, resv: &mut ResvGuard<'_>) -> Result<(), DmaBufError> {
        let op = "pin";
        self.check_lock(op, resv)?;
        if self.importer.is_none() {
            return Err(DmaBufError::new(
                op,
                Errno::EINVAL,
                "only a dynamic importer pins",
            ));
        }
        self.buf.exporter.pin(resv, &self.info)?;
        self.buf.pins.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// `dma_buf_unpin` (the reservation lock held).
    pub fn unpin(&self, resv: &ResvGuard<'_>) {
        if self.check_lock("unpin", resv).is_ok() && self.importer.is_some() {
            self.buf.exporter.unpin(resv, &self.info);
            self.buf.pins.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        self.buf.exporter.detach(&self.info);
    }
}

/// A mapped attachment; dropping it unmaps (and unpins what mapping pinned).
pub struct AttachMapping {
    att: Arc<Attachment>,
    mapped: Option<Arc<dyn Mapped>>,
    pinned: bool,
}

impl fmt::Debug for AttachMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AttachMapping")
            .field("att", &self.att)
            .field("pinned", &self.pinned)
            .finish()
    }
}

impl AttachMapping {
    /// The DMA mapping, as the device addresses it.
    pub fn mapping(&self) -> &DmaMapping {
        self.mapped
            .as_ref()
            .map(|m| m.mapping())
            .unwrap_or_else(|| unreachable!("set until drop"))
    }
    /// The attachment.
    pub fn attachment(&self) -> &Arc<Attachment> {
        &self.att
    }
}

impl AttachMapping {
    /// `dma_buf_unmap_attachment` with the reservation lock held (dropping the mapping
    /// takes the lock itself when mapping pinned the buffer).
    pub fn unmap(mut self, resv: &ResvGuard<'_>) {
        drop(self.mapped.take());
        if self.pinned && resv.holds(&self.att.buf.resv) {
            self.pinned = false;
            self.att.buf.exporter.unpin(resv, &self.att.info);
            self.att.buf.pins.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for AttachMapping {
    fn drop(&mut self) {
        drop(self.mapped.take());
        let buf = &self.att.buf;
        buf.mappings.fetch_sub(1, Ordering::Relaxed);
        if self.pinned {
            let resv = buf.resv.lock();
            buf.exporter.unpin(&resv, &self.att.info);
            buf.pins.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A file a descriptor names.
#[derive(Clone)]
pub enum File {
    /// A dma-buf.
    DmaBuf(Arc<DmaBuf>),
    /// Any other file (a device's open file such as an RDMA context): what it is, and
    /// the object, which lives while a descriptor names it.
    Other {
        /// What it is ("uverbs", "regular file").
        what: &'static str,
        /// The object.
        obj: Arc<dyn Any + Send + Sync>,
    },
}

impl fmt::Debug for File {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            File::DmaBuf(b) => write!(f, "{}", b.describe()),
            File::Other { what, .. } => f.write_str(what),
        }
    }
}

/// A process's file-descriptor table.
///
/// # Invariants
/// Descriptors are non-negative and each names one file; the lowest free number is
/// handed out first, as `open` does.
#[derive(Debug)]
pub struct FdTable {
    /// Lock order: a leaf.
    files: OrderedMutex<BTreeMap<i32, File>>,
}

impl Default for FdTable {
    fn default() -> Self {
        FdTable {
            files: OrderedMutex::new(&order::LEAF, BTreeMap::new()),
        }
    }
}

impl FdTable {
    /// An empty table.
    pub fn new() -> Arc<FdTable> {
        Arc::new(FdTable::default())
    }

    /// Installs `file` at the lowest free descriptor (`fd_install`).
    pub fn install(&self, file: File) -> i32 {
        let mut files = self.files.lock();
        let fd = (0..)
            .find(|n| !files.contains_key(n))
            .unwrap_or_else(|| unreachable!("an i32 is free"));
        files.insert(fd, file);
        fd
    }

    /// `dma_buf_fd`: installs the buffer.
    pub fn export_fd(&self, buf: &Arc<DmaBuf>) -> i32 {
        self.install(File::DmaBuf(buf.clone()))
    }

    /// The file `fd` names; EBADF when none.
    pub fn get(&self, fd: i32) -> Result<File, DmaBufError> {
        self.files
            .lock()
            .get(&fd)
            .cloned()
            .ok_or_else(|| DmaBufError::new("fget", Errno::EBADF, format!("fd {fd} is not open")))
    }

    /// `dma_buf_get(fd)`: EBADF for a descriptor that is not open, EINVAL for a file
    /// that is not a dma-buf.
    pub fn dma_buf(&self, fd: i32) -> Result<Arc<DmaBuf>, DmaBufError> {
        match self.get(fd) {
            Ok(File::DmaBuf(b)) => Ok(b),
            Ok(File::Other { what, .. }) => Err(DmaBufError::new(
                "dma_buf_get",
                Errno::EINVAL,
                format!("fd {fd} is a {what}, not a dma-buf"),
            )),
            Err(e) => Err(DmaBufError::new("dma_buf_get", e.errno, e.why)),
        }
    }

    /// `close(fd)`; EBADF when it is not open. The file lives on while anything else
    /// holds it.
    pub fn close(&self, fd: i32) -> Result<(), DmaBufError> {
        let file = self.files.lock().remove(&fd);
        match file {
            Some(f) => {
                drop(f);
                Ok(())
            }
            None => Err(DmaBufError::new(
                "close",
                Errno::EBADF,
                format!("fd {fd} is not open"),
            )),
        }
    }

    /// Passes `fd` to the process whose table is `to` (SCM_RIGHTS): the file gets a
    /// descriptor there too. EBADF when `fd` is not open here.
    pub fn pass(&self, fd: i32, to: &FdTable) -> Result<i32, DmaBufError> {
        let file = self.get(fd)?;
        Ok(to.install(file))
    }

    /// A copy for a forked child: the same files under the same numbers.
    pub fn fork(&self) -> Arc<FdTable> {
        Arc::new(FdTable {
            files: OrderedMutex::new(&order::LEAF, self.files.lock().clone()),
        })
    }

    /// Closes every descriptor (process exit). Files drop outside the table's lock.
    pub fn close_all(&self) {
        let files = std::mem::take(&mut *self.files.lock());
        drop(files);
    }

    /// Open descriptors.
    pub fn len(&self) -> usize {
        self.files.lock().len()
    }

    /// Whether none is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
