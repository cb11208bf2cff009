//! Processes of a host: an address space with a process id, alive until it exits.
//! Exit is an explicit act ([`Process::exit`]), as a process's is: dropping a handle
//! does not end the process, and other holders of its address space (a device
//! mirroring it, a pin) do not keep it running.

use std::collections::BTreeMap;

use crate::dmabuf::FdTable;
use crate::mem::PhysMem;
use crate::mm::{Mm, MmError};
use crate::sync::atomic::{AtomicU32, Ordering};
use crate::sync::{order, Arc, OrderedMutex, Weak};

/// A process id, unique on its host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct Pid(pub u32);

impl std::fmt::Display for Pid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {}", self.0)
    }
}

/// The host's process table.
///
/// # Invariants
/// `running` holds exactly the processes spawned or forked here that have not exited;
/// `all` holds every address space ever made here, weakly, for leak reports.
pub(crate) struct Table {
    next: AtomicU32,
    /// Lock order: a leaf.
    running: OrderedMutex<BTreeMap<Pid, Arc<Mm>>>,
    all: OrderedMutex<Vec<Weak<Mm>>>,
}

impl Table {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Table {
            next: AtomicU32::new(1),
            running: OrderedMutex::new(&order::LEAF, BTreeMap::new()),
            all: OrderedMutex::new(&order::LEAF, Vec::new()),
        })
    }

    fn add(self: &Arc<Self>, mm: Arc<Mm>, files: Arc<FdTable>) -> Process {
        let pid = Pid(self.next.fetch_add(1, Ordering::Relaxed));
        self.running.lock().insert(pid, mm.clone());
        let mut all = self.all.lock();
        if all.len() >= 64 && all.len().is_power_of_two() {
            all.retain(|w| w.strong_count() > 0);
        }
        all.push(Arc::downgrade(&mm));
        drop(all);
        Process {
            pid,
            mm,
            files,
            table: self.clone(),
        }
    }

    /// Processes that have not exited.
    pub(crate) fn running(&self) -> Vec<Pid> {
        self.running.lock().keys().copied().collect()
    }

    /// Takes every running process out of the table, for a shutdown.
    pub(crate) fn take_running(&self) -> Vec<Arc<Mm>> {
        std::mem::take(&mut *self.running.lock())
            .into_values()
            .collect()
    }

    /// Every address space made here that something still holds.
    pub(crate) fn address_spaces(&self) -> Vec<Arc<Mm>> {
        self.all.lock().iter().filter_map(Weak::upgrade).collect()
    }
}

/// A process on a host: its id and its address space. Dereferences to the address
/// space (`Arc<Mm>`), so every memory call takes a `&Process` where it takes an
/// `&Arc<Mm>`.
///
/// # Invariants
/// The process is in its host's table from spawn (or fork) until [`exit`](Self::exit).
pub struct Process {
    pid: Pid,
    mm: Arc<Mm>,
    files: Arc<FdTable>,
    table: Arc<Table>,
}

impl std::fmt::Debug for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Process")
            .field("pid", &self.pid)
            .field("mm", &self.mm.id())
            .finish()
    }
}

impl Process {
    pub(crate) fn spawn(table: &Arc<Table>, phys: &Arc<PhysMem>) -> Process {
        table.add(Mm::new(phys), FdTable::new())
    }

    /// Its id.
    pub fn pid(&self) -> Pid {
        self.pid
    }
    /// Its address space.
    pub fn mm(&self) -> &Arc<Mm> {
        &self.mm
    }
    /// Its file descriptors (dma-bufs, open devices).
    pub fn files(&self) -> &Arc<FdTable> {
        &self.files
    }
    /// `fork()`: a child process with a copy of the address space (see [`Mm::fork`])
    /// and of the descriptor table (the same files).
    pub fn fork(&self) -> Result<Process, MmError> {
        let child = self.mm.fork()?;
        Ok(self.table.add(child, self.files.fork()))
    }
    /// `exit()`: every descriptor is closed (an RDMA context deregisters its MRs), every
    /// notifier subscriber hears `Release`, every page is unmapped, and the process
    /// leaves the host's table. Pins and DMA mappings others hold keep
    /// their pages; the address space object lives while anything holds it.
    pub fn exit(self) {
        self.files.close_all();
        self.mm.exit();
        self.table.running.lock().remove(&self.pid);
    }
}

impl std::ops::Deref for Process {
    type Target = Arc<Mm>;
    fn deref(&self) -> &Arc<Mm> {
        &self.mm
    }
}
