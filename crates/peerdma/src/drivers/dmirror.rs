//! The kernel's HMM test device (lib/test_hmm.c): a device that mirrors a process's
//! address space in its own page table through an interval notifier and
//! `hmm_range_fault`, and migrates pages to and from its device memory (private or
//! coherent) with `migrate_vma`. Its commands are test_hmm's ioctls, with the same
//! results and error numbers, so tools/testing/selftests/mm/hmm-tests.c ports to it.
//!
//! A [`DmirrorDevice`] is one `/dev/hmm_dmirrorN`: its device memory, in chunks
//! registered as device page maps whose owner is the device. A [`Dmirror`] is one open
//! file: a mirror of the opening process, subscribed to its whole address space.
//!
//! Where peerdma differs on purpose: device-private pages hold their data themselves
//! (test_hmm keeps it in a system "backing" page); `RELEASE` gives up with EBUSY after
//! a timeout where the kernel would block until the last reference to the memory
//! drops; huge pages are not modelled.

use crate::addr::{Pfn, VirtAddr, PAGE_SIZE};
use crate::drivers::mirror::{
    owner_fault_to_ram, MirrorSet, MirrorTable, PtEntry, FAULT_TIMEOUT, STEP,
};
use crate::errno::Errno;
use crate::hmm::{hmm_range_fault, HmmPfn, HmmRange};
use crate::mem::{MemError, PhysMem, Region, RegionKind};
use crate::mm::{
    migrate_device_range, set_migrate_to_ram, DeviceFault, MigrateToRam, Mm, MmError, Select,
};
use crate::notifier::{IntervalNotifier, IntervalNotifierOps, NotifyRange, Subscription};
use crate::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use crate::sync::{order, Arc, OrderedMutex, Weak};

/// test_hmm's `DEVMEM_CHUNK_SIZE`: device memory is added 256 MiB at a time.
pub const DEVMEM_CHUNK_SIZE: u64 = 256 << 20;
/// `HMM_DMIRROR_FLAG_FAIL_ALLOC`: the next page allocation of a migration fails — a
/// device page for MIGRATE_TO_DEV (the page stays in RAM), a system page for a CPU
/// fault on a device-private page (the fault fails with ENOMEM, the page stays on the
/// device).
pub const FLAG_FAIL_ALLOC: u64 = 1;
/// Pages per snapshot step (test_hmm's snapshot `pfns[32]`).
const SNAPSHOT_STEP: u64 = 32;

/// Snapshot bytes (`HMM_DMIRROR_PROT_*`).
pub mod prot {
    /// Not valid.
    pub const NONE: u8 = 0x00;
    /// Readable.
    pub const READ: u8 = 0x01;
    /// Writable.
    pub const WRITE: u8 = 0x02;
    /// The shared zero page.
    pub const ZERO: u8 = 0x10;
    /// Device-private memory of this device.
    pub const DEV_PRIVATE_LOCAL: u8 = 0x20;
    /// Device-private memory of another device.
    pub const DEV_PRIVATE_REMOTE: u8 = 0x30;
    /// Device-coherent memory of this device.
    pub const DEV_COHERENT_LOCAL: u8 = 0x40;
    /// Device-coherent memory of another device.
    pub const DEV_COHERENT_REMOTE: u8 = 0x50;
    /// The page cannot be accessed.
    pub const ERROR: u8 = 0xff;
}

/// Which memory a device has (`HMM_DMIRROR_MEMORY_DEVICE_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmirrorMemory {
    /// Device-private: the CPU faults to reach it.
    Private,
    /// Device-coherent: the CPU maps it directly.
    Coherent,
}

/// A command's refusal: the errno test_hmm's ioctl returns, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("dmirror {cmd}: {why} ({errno})")]
pub struct DmirrorError {
    /// The command.
    pub cmd: &'static str,
    /// The error number.
    pub errno: Errno,
    /// Why.
    pub why: String,
}

impl DmirrorError {
    fn new(cmd: &'static str, errno: Errno, why: impl Into<String>) -> Self {
        DmirrorError {
            cmd,
            errno,
            why: why.into(),
        }
    }
    fn mm(cmd: &'static str, e: MmError) -> Self {
        DmirrorError::new(cmd, e.errno(), e.to_string())
    }
}

/// What a command reports (`cmd.cpages`, `cmd.faults`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Pages the command handled.
    pub cpages: u64,
    /// Times it had to fault the range.
    pub faults: u64,
}

/// One `/dev/hmm_dmirrorN` (`struct dmirror_device`).
///
/// # Invariants
/// Every chunk is a device page map of `memory`'s kind owned by `owner`, with this
/// device's `migrate_to_ram`.
pub struct DmirrorDevice {
    phys: Arc<PhysMem>,
    memory: DmirrorMemory,
    owner: u64,
    chunk_bytes: u64,
    /// Lock order: a leaf but for the allocator (taken to add a chunk).
    chunks: OrderedMutex<Vec<Arc<Region>>>,
    /// The open mirrors, to drop their entries for a page the CPU faults back.
    mirrors: MirrorSet,
    /// The flags of the device (`FLAGS` sets them through any open file).
    flags: AtomicU64,
    /// The most chunks the device adds.
    max_chunks: AtomicUsize,
}

impl std::fmt::Debug for DmirrorDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmirrorDevice")
            .field("memory", &self.memory)
            .field("owner", &self.owner)
            .finish()
    }
}

/// The device's `migrate_to_ram`: the CPU fault on one of its device-private pages.
struct DevmemOps(Weak<DmirrorDevice>);

impl MigrateToRam for DevmemOps {
    /// `dmirror_devmem_fault`: migrate the faulting page to system RAM from the fault,
    /// dropping the mirrors' entries for it.
    fn migrate_to_ram(&self, fault: &DeviceFault<'_>) -> Result<(), MmError> {
        let Some(dev) = self.0.upgrade() else {
            return fault.copy_to_ram();
        };
        owner_fault_to_ram(fault, dev.owner, &dev.mirrors, dev.take_fail_alloc())?;
        Ok(())
    }
}

impl DmirrorDevice {
    /// A device with `memory` of that kind, added in chunks of `chunk_bytes`
    /// ([`DEVMEM_CHUNK_SIZE`] as test_hmm has it) as pages are needed.
    pub fn new(phys: &Arc<PhysMem>, memory: DmirrorMemory, chunk_bytes: u64) -> Arc<Self> {
        Arc::new(DmirrorDevice {
            phys: phys.clone(),
            memory,
            owner: phys.next_id() | 0xd000_0000_0000,
            chunk_bytes: chunk_bytes.max(PAGE_SIZE),
            chunks: OrderedMutex::new(&order::DEVICE_MEMORY, Vec::new()),
            mirrors: MirrorSet::new(),
            flags: AtomicU64::new(0),
            max_chunks: AtomicUsize::new(usize::MAX),
        })
    }

    /// The owner cookie of its memory (`pgmap->owner`).
    pub fn owner(&self) -> u64 {
        self.owner
    }

    /// Its memory kind.
    pub fn memory(&self) -> DmirrorMemory {
        self.memory
    }

    /// Its device memory chunks.
    pub fn chunks(&self) -> Vec<Arc<Region>> {
        self.chunks.lock().clone()
    }

    /// `open()`: a mirror of `mm`, subscribed to its whole address space.
    pub fn open(self: &Arc<Self>, mm: &Arc<Mm>) -> Dmirror {
        let table = Arc::new(MirrorTable::new(self.owner, mm.id()));
        self.mirrors.add(&table);
        let top = crate::mm::page_table::TASK_SIZE - PAGE_SIZE;
        let sub = mm.notifier().subscribe(VirtAddr(0), top, table.clone());
        Dmirror {
            device: self.clone(),
            table,
            mm: mm.clone(),
            sub,
        }
    }

    /// `dmirror_devmem_alloc_page`: a device page, adding a chunk when every chunk is
    /// full; `None` when an allocation failure is injected or memory runs out.
    fn alloc_page(self: &Arc<Self>) -> Option<(Arc<Region>, Pfn)> {
        if self.take_fail_alloc() {
            return None;
        }
        let mut chunks = self.chunks.lock();
        for c in chunks.iter() {
            if let Ok(p) = c.alloc() {
                return Some((c.clone(), p));
            }
        }
        if chunks.len() >= self.max_chunks.load(Ordering::Relaxed) {
            return None; // full: the page stays in system RAM
        }
        let kind = match self.memory {
            DmirrorMemory::Private => RegionKind::DevicePrivate { owner: self.owner },
            DmirrorMemory::Coherent => RegionKind::DeviceCoherent { owner: self.owner },
        };
        let chunk = self.phys.memremap_pages(kind, self.chunk_bytes).ok()?;
        set_migrate_to_ram(&chunk, Arc::new(DevmemOps(Arc::downgrade(self))));
        let p = chunk.alloc().ok()?;
        chunks.push(chunk.clone());
        Some((chunk, p))
    }

    /// `dmirror_device_remove_chunks` (the `RELEASE` command): evicts every page of
    /// every chunk to system RAM with [`migrate_device_range`], wherever it is mapped,
    /// and removes the chunks (`memunmap_pages`). The kernel then blocks until the last
    /// reference to the memory drops; this waits up to `timeout`, evicting again as pins
    /// go, and then gives up with EBUSY, keeping each chunk still in use (a pinned
    /// device-coherent page stays where it is, mapped), so nothing is lost and a later
    /// release can finish. New allocations after this start new chunks.
    pub fn release(&self, timeout: std::time::Duration) -> Result<(), DmirrorError> {
        let cmd = "RELEASE";
        let deadline = std::time::Instant::now() + timeout;
        let mut chunks = std::mem::take(&mut *self.chunks.lock());
        let mut last = None;
        while !chunks.is_empty() {
            let mut busy = Vec::new();
            for chunk in chunks {
                let ev = migrate_device_range(&self.phys, &chunk, chunk.base(), chunk.frames())
                    .map_err(|e| DmirrorError::mm(cmd, e))?;
                if let Some((_, e)) = ev.refused.into_iter().next() {
                    last = Some(e.to_string());
                }
                if chunk.free_frames() == chunk.frames()
                    && self.phys.memunmap_pages(chunk.id()).is_ok()
                {
                    continue;
                }
                busy.push(chunk);
            }
            chunks = busy;
            if chunks.is_empty() {
                break;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                let held: u64 = chunks.iter().map(|c| c.frames() - c.free_frames()).sum();
                self.chunks.lock().append(&mut chunks);
                return Err(DmirrorError::new(
                    cmd,
                    Errno::EBUSY,
                    format!(
                        "{held} device pages are still in use ({})",
                        last.as_deref().unwrap_or("held outside any address space")
                    ),
                ));
            }
            // Woken as soon as a chunk is free; otherwise evict again shortly, in case
            // a pin was dropped.
            chunks[0].wait_until_free(Some(left.min(std::time::Duration::from_millis(10))));
        }
        Ok(())
    }

    /// Consumes an injected allocation failure, if one is set.
    fn take_fail_alloc(&self) -> bool {
        self.flags.fetch_and(!FLAG_FAIL_ALLOC, Ordering::SeqCst) & FLAG_FAIL_ALLOC != 0
    }

    /// Caps the device's memory at `chunks` chunks (unlimited by default, as test_hmm
    /// adds chunks until the physical address space runs out): once they are full, a
    /// page to migrate finds no device page and stays in system RAM.
    pub fn set_max_chunks(&self, chunks: usize) {
        self.max_chunks.store(chunks, Ordering::Relaxed);
    }
}

/// An open `/dev/hmm_dmirrorN`: the device mirroring one process. Dropping it closes
/// the file (the subscription ends).
pub struct Dmirror {
    device: Arc<DmirrorDevice>,
    table: Arc<MirrorTable>,
    mm: Arc<Mm>,
    sub: IntervalNotifier,
}

impl std::fmt::Debug for Dmirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dmirror")
            .field("device", &self.device)
            .field("mm", &self.mm.id())
            .finish()
    }
}

/// The range checks every ioctl makes first: page aligned, not empty, no wrap.
fn check(cmd: &'static str, addr: VirtAddr, npages: u64) -> Result<u64, DmirrorError> {
    let bad = || DmirrorError::new(cmd, Errno::EINVAL, "unaligned, empty or wrapping range");
    if !addr.is_aligned(PAGE_SIZE) {
        return Err(bad());
    }
    let end = npages
        .checked_mul(PAGE_SIZE)
        .and_then(|n| addr.0.checked_add(n))
        .ok_or_else(bad)?;
    if end <= addr.0 {
        return Err(bad());
    }
    Ok(end)
}

impl Dmirror {
    /// The device.
    pub fn device(&self) -> &Arc<DmirrorDevice> {
        &self.device
    }

    /// The frame the device page table maps at `va`, when it maps one.
    pub fn mirrored(&self, va: VirtAddr) -> Option<Pfn> {
        self.table
            .pt
            .lock()
            .get(&(va.0 & !(PAGE_SIZE - 1)))
            .map(|e| e.pfn)
    }

    /// Entries in the device page table.
    pub fn mirrored_pages(&self) -> usize {
        self.table.pt.lock().len()
    }

    /// `HMM_DMIRROR_RELEASE`: [`DmirrorDevice::release`] with the fault timeout (the
    /// range is not looked at, as test_hmm ignores it).
    pub fn release(&self) -> Result<Counts, DmirrorError> {
        self.device.release(FAULT_TIMEOUT)?;
        Ok(Counts::default())
    }

    /// `HMM_DMIRROR_FLAGS`: sets the device's flags ([`FLAG_FAIL_ALLOC`]).
    pub fn set_flags(&self, flags: u64) {
        self.device.flags.store(flags, Ordering::SeqCst);
    }

    /// `dmirror_range_fault` over `[start, end)`, 64 pages at a time.
    fn fault(
        &self,
        cmd: &'static str,
        start: u64,
        end: u64,
        write: bool,
    ) -> Result<(), DmirrorError> {
        self.table
            .fault(&self.mm, &self.sub, start, end, write)
            .map_err(|e| DmirrorError::mm(cmd, e))
    }

    /// Copies the mirrored pages of `[start, end)` into `out` from page `done` on;
    /// stops at the first page the device table lacks (or cannot write, for
    /// `write`). Returns the pages handled.
    fn bounce(&self, start: u64, end: u64, done: u64, write: Option<&[u8]>, out: &mut [u8]) -> u64 {
        let pt = self.table.pt.lock();
        let mut n = done;
        let mut va = start + done * PAGE_SIZE;
        while va < end {
            let Some(e) = pt.get(&va).copied() else { break };
            let Some(region) = self.device.phys.region(e.pfn) else {
                break;
            };
            let at = (n * PAGE_SIZE) as usize..((n + 1) * PAGE_SIZE) as usize;
            match write {
                Some(data) => {
                    if !e.write {
                        break;
                    }
                    region.write(e.pfn, 0, &data[at]);
                }
                None => region.read(e.pfn, 0, &mut out[at]),
            }
            n += 1;
            va += PAGE_SIZE;
        }
        n
    }

    /// `HMM_DMIRROR_READ`: the device reads `npages` pages at `addr` into `out`,
    /// faulting (for reading) whatever its table lacks.
    pub fn read(
        &self,
        addr: VirtAddr,
        npages: u64,
        out: &mut [u8],
    ) -> Result<Counts, DmirrorError> {
        let cmd = "READ";
        let end = check(cmd, addr, npages)?;
        self.copy_loop(cmd, addr.0, end, None, out)
    }

    /// `HMM_DMIRROR_WRITE`: the device writes `data` to `npages` pages at `addr`,
    /// faulting for writing whatever its table lacks or holds read-only.
    pub fn write(&self, addr: VirtAddr, npages: u64, data: &[u8]) -> Result<Counts, DmirrorError> {
        let cmd = "WRITE";
        let end = check(cmd, addr, npages)?;
        self.copy_loop(cmd, addr.0, end, Some(data), &mut [])
    }

    fn copy_loop(
        &self,
        cmd: &'static str,
        start: u64,
        end: u64,
        data: Option<&[u8]>,
        out: &mut [u8],
    ) -> Result<Counts, DmirrorError> {
        let npages = (end - start) / PAGE_SIZE;
        Self::check_buffer(cmd, data.map_or(out.len(), <[u8]>::len), npages)?;
        let mut c = Counts::default();
        loop {
            c.cpages = self.bounce(start, end, c.cpages, data, out);
            if c.cpages == npages {
                return Ok(c);
            }
            let from = start + c.cpages * PAGE_SIZE;
            self.fault(cmd, from, end, data.is_some())?;
            c.faults += 1;
        }
    }

    /// `HMM_DMIRROR_MIGRATE_TO_DEV`: migrates the system pages of the range to device
    /// memory (a VMA at a time, 64 pages at a time), maps them in the device table,
    /// then reads the whole range back from the table into `out`: ENOENT when a page
    /// did not move (shared, pinned, not anonymous). EINVAL where no readable VMA is.
    pub fn migrate_to_dev(
        &self,
        addr: VirtAddr,
        npages: u64,
        out: &mut [u8],
    ) -> Result<Counts, DmirrorError> {
        let cmd = "MIGRATE_TO_DEV";
        let end = check(cmd, addr, npages)?;
        Self::check_buffer(cmd, out.len(), npages)?;
        let dev = &self.device;
        self.each_step(cmd, addr.0, end, |start, next, vma_writable| {
            let mut m = self
                .mm
                .migrate_vma_setup(
                    VirtAddr(start),
                    VirtAddr(next),
                    Select::SYSTEM,
                    Some(dev.owner),
                )
                .map_err(|e| DmirrorError::mm(cmd, e))?;
            let mut dsts = Vec::new();
            for (i, src) in m.src().iter().enumerate() {
                if !src.migrate {
                    continue;
                }
                let Some((region, dpage)) = dev.alloc_page() else {
                    continue;
                };
                if let Some(spage) = src.pfn {
                    if let Some(sr) = dev.phys.region(spage) {
                        sr.copy_frame(spage, &region, dpage);
                    }
                }
                m.set_dst(i, &region, dpage);
                dsts.push((i, dpage));
            }
            m.pages();
            let src = m.src();
            {
                let mut pt = self.table.pt.lock();
                for (i, dpage) in dsts {
                    if src[i].migrate {
                        // As the new entry maps it: writable as the page was, or as
                        // the mapping is for a page inserted where none was.
                        let write = if src[i].pfn.is_some() {
                            src[i].write
                        } else {
                            vma_writable
                        };
                        pt.insert(
                            start + i as u64 * PAGE_SIZE,
                            PtEntry {
                                pfn: dpage,
                                write,
                                atomic: false,
                            },
                        );
                    }
                }
            }
            m.finalize();
            Ok(())
        })?;
        // Return the migrated data for verification: only pages now on the device.
        self.read_back(cmd, addr.0, end, out)
    }

    /// What MIGRATE_TO_DEV and EXCLUSIVE end with: the range read from the device
    /// table into `out` without faulting; ENOENT when a page is not in the table.
    fn read_back(
        &self,
        cmd: &'static str,
        start: u64,
        end: u64,
        out: &mut [u8],
    ) -> Result<Counts, DmirrorError> {
        let n = self.bounce(start, end, 0, None, out);
        if n < (end - start) / PAGE_SIZE {
            return Err(DmirrorError::new(
                cmd,
                Errno::ENOENT,
                "a page is not in the device page table",
            ));
        }
        Ok(Counts {
            cpages: n,
            faults: 0,
        })
    }

    /// Refuses a buffer of `have` bytes shorter than `pages` pages (EFAULT, as a
    /// short user buffer is) before anything is done.
    fn check_buffer(cmd: &'static str, have: usize, pages: u64) -> Result<(), DmirrorError> {
        if (have as u64) < pages * PAGE_SIZE {
            return Err(DmirrorError::new(
                cmd,
                Errno::EFAULT,
                "the buffer is shorter than the range",
            ));
        }
        Ok(())
    }

    /// `HMM_DMIRROR_MIGRATE_TO_SYS`: migrates this device's pages of the range back to
    /// system RAM; `cpages` counts the pages that moved.
    pub fn migrate_to_sys(&self, addr: VirtAddr, npages: u64) -> Result<Counts, DmirrorError> {
        let cmd = "MIGRATE_TO_SYS";
        let end = check(cmd, addr, npages)?;
        let dev = &self.device;
        let select = match dev.memory {
            DmirrorMemory::Private => Select::DEVICE_PRIVATE,
            DmirrorMemory::Coherent => Select::DEVICE_COHERENT,
        };
        let mut moved = 0;
        self.each_step(cmd, addr.0, end, |start, next, _| {
            let mut m = self
                .mm
                .migrate_vma_setup(VirtAddr(start), VirtAddr(next), select, Some(dev.owner))
                .map_err(|e| DmirrorError::mm(cmd, e))?;
            let ram = dev.phys.ram().clone();
            for (i, src) in m.src().iter().enumerate() {
                let Some(spage) = src.pfn.filter(|_| src.migrate) else {
                    continue;
                };
                let new = ram
                    .alloc()
                    .map_err(|e: MemError| DmirrorError::new(cmd, Errno::ENOMEM, e.to_string()))?;
                // The device lets go before the copy, so no write of its lands in the
                // old page afterwards.
                self.table.erase(
                    start + i as u64 * PAGE_SIZE,
                    start + (i as u64 + 1) * PAGE_SIZE,
                );
                if let Some(sr) = dev.phys.region(spage) {
                    sr.copy_frame(spage, &ram, new);
                }
                m.set_dst(i, &ram, new);
            }
            m.pages();
            moved += m
                .src()
                .iter()
                .filter(|s| s.pfn.is_some() && s.migrate)
                .count() as u64;
            m.finalize();
            Ok(())
        })?;
        Ok(Counts {
            cpages: moved,
            faults: 0,
        })
    }

    /// Runs `step(start, next, writable)` over `[start, end)` a VMA and at most 64
    /// pages at a time (`writable`: whether the VMA is); EINVAL where there is no VMA or
    /// one without read permission. The address-space lock is not held across `step`.
    fn each_step(
        &self,
        cmd: &'static str,
        start: u64,
        end: u64,
        mut step: impl FnMut(u64, u64, bool) -> Result<(), DmirrorError>,
    ) -> Result<(), DmirrorError> {
        let mut addr = start;
        while addr < end {
            let vma = self
                .mm
                .vma(VirtAddr(addr))
                .filter(|v| v.prot.readable())
                .ok_or_else(|| {
                    DmirrorError::new(
                        cmd,
                        Errno::EINVAL,
                        format!("no readable mapping at {:#x}", addr),
                    )
                })?;
            let next = (addr + STEP * PAGE_SIZE).min(end).min(vma.end.0);
            step(addr, next, vma.prot.writable())?;
            addr = next;
        }
        Ok(())
    }

    /// `HMM_DMIRROR_EXCLUSIVE`: takes every page of the range for atomic access
    /// (`make_device_exclusive`), maps it in the device table tagged atomic, then reads
    /// the range back from the table into `out`. A CPU access to any of the pages
    /// later revokes the device's access through its notifier.
    pub fn exclusive(
        &self,
        addr: VirtAddr,
        npages: u64,
        out: &mut [u8],
    ) -> Result<Counts, DmirrorError> {
        let cmd = "EXCLUSIVE";
        let end = check(cmd, addr, npages)?;
        Self::check_buffer(cmd, out.len(), npages)?;
        let owner = self.device.owner;
        let mut va = addr.0;
        while va < end {
            let page = self
                .mm
                .make_device_exclusive(VirtAddr(va), owner)
                .map_err(|e| DmirrorError::mm(cmd, e))?;
            // Mapped while the page is locked: a CPU access revoking it waits.
            self.table.pt.lock().insert(
                va,
                PtEntry {
                    pfn: page.pfn(),
                    write: true,
                    atomic: true,
                },
            );
            drop(page);
            va += PAGE_SIZE;
        }
        self.read_back(cmd, addr.0, end, out)
    }

    /// `HMM_DMIRROR_CHECK_EXCLUSIVE`: EPERM while the device still holds any page of
    /// the range for atomics.
    pub fn check_exclusive(&self, addr: VirtAddr, npages: u64) -> Result<Counts, DmirrorError> {
        let cmd = "CHECK_EXCLUSIVE";
        let end = check(cmd, addr, npages)?;
        if self
            .table
            .pt
            .lock()
            .range(addr.0..end)
            .any(|(_, e)| e.atomic)
        {
            return Err(DmirrorError::new(
                cmd,
                Errno::EPERM,
                "a page is still held for atomics",
            ));
        }
        Ok(Counts::default())
    }

    /// `HMM_DMIRROR_SNAPSHOT`: one byte per page describing what the CPU page table
    /// holds (see [`prot`]), without faulting anything.
    pub fn snapshot(
        &self,
        addr: VirtAddr,
        npages: u64,
        out: &mut [u8],
    ) -> Result<Counts, DmirrorError> {
        let cmd = "SNAPSHOT";
        let end = check(cmd, addr, npages)?;
        // One byte per page.
        Self::check_buffer(cmd, out.len() * PAGE_SIZE as usize, npages)?;
        let mut c = Counts::default();
        let mut start = addr.0;
        while start < end {
            let next = (start + SNAPSHOT_STEP * PAGE_SIZE).min(end);
            let sub = self
                .mm
                .notifier()
                .subscribe(VirtAddr(start), next - start, Arc::new(Nop));
            let pfns = loop {
                let mut range = HmmRange::new(&sub, VirtAddr(start), VirtAddr(next));
                range.dev_private_owner = Some(self.device.owner);
                match hmm_range_fault(&self.mm, &mut range) {
                    Ok(()) => {}
                    Err(MmError::Busy { .. }) => continue,
                    Err(e) => return Err(DmirrorError::mm(cmd, e)),
                }
                let _pt = self.table.pt.lock();
                if sub.read_retry(range.notifier_seq) {
                    continue;
                }
                break range.pfns;
            };
            for f in pfns {
                out[c.cpages as usize] = self.mkentry(f);
                c.cpages += 1;
            }
            start = next;
        }
        Ok(c)
    }

    /// `dmirror_mkentry`.
    fn mkentry(&self, f: HmmPfn) -> u8 {
        if f.contains(HmmPfn::ERROR) {
            return prot::ERROR;
        }
        let Some(pfn) = f.pfn() else {
            return prot::NONE;
        };
        let mine = self.device.owner;
        let base = match self.device.phys.region(pfn) {
            Some(r) if r.kind().is_device_private() => {
                if r.kind().owner() == Some(mine) {
                    prot::DEV_PRIVATE_LOCAL
                } else {
                    prot::DEV_PRIVATE_REMOTE
                }
            }
            Some(r) if r.kind().is_device_coherent() => {
                if r.kind().owner() == Some(mine) {
                    prot::DEV_COHERENT_LOCAL
                } else {
                    prot::DEV_COHERENT_REMOTE
                }
            }
            _ if crate::mem::is_zero_pfn(pfn) => prot::ZERO,
            _ => 0,
        };
        base | if f.contains(HmmPfn::WRITE) {
            prot::WRITE
        } else {
            prot::READ
        }
    }
}

struct Nop;

impl IntervalNotifierOps for Nop {
    fn invalidate(&self, _: &Subscription, _: &NotifyRange, _: u64) -> bool {
        true
    }
}
