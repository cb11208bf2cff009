//! `peerdma fuzz`: random scenarios drawn from a seed, with a model of what every page
//! holds, run through the same checker and runner as a hand-written scenario.
//!
//! The generator keeps a simple model — per process and region, what each page holds
//! (zero, a fill byte or a pattern seed), which pages are pinned or mapped for DMA, and
//! which processes and devices are alive — and writes each operation as a scenario line
//! with the expectation the model predicts: the bytes a read returns, the errno of an
//! access the protection forbids, and `pinned=0 mappings=0` whenever the model holds
//! nothing. Operations the model cannot predict (a migration that may refuse some
//! pages, an operation racing another) are written `expect any`; what they must not
//! change — the data — is checked by the reads that follow. The runner adds the rest:
//! the DMA sanitizer is checked after every step, and at the end every process exits
//! and the host must hold nothing.
//!
//! Swarm testing: each seed enables a random subset of the operation kinds with random
//! weights, so some runs hammer pins and fork while others hammer migration. Fault
//! injection is operation kinds like any other: device removal while in use, process
//! exit with pages pinned or DMA racing it, a device memory pool of two chunks that
//! runs out (ENOMEM), DMA to an offset outside a mapping (an IOMMU fault), and an
//! invalidation racing a device fault (`parallel` groups).
//!
//! Determinism: the scenario text is a function of the seed alone, and a run without
//! parallel groups is sequential, so a seed replays byte for byte. The model only
//! writes expectations that hold in every interleaving of a group, so the verdict does
//! not depend on the schedule. Groups run on OS threads ([`run_text`]) or, in a build
//! with the `shuttle` feature, as shuttle tasks under a seeded PCT scheduler
//! (`run_text_shuttle`), which explores the interleavings inside operations and
//! replays them from the seed. A failure is minimised by dropping operations while the
//! scenario still fails the same way, and written out as a scenario file that
//! `peerdma run` replays.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::scenario::lang::NoIncludes;
use crate::scenario::run::{compile_text, Mismatch, ScenarioReport};
use crate::scenario::vocab::Vocabulary;

/// What one page holds, as the model sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Content {
    Fill(u8),
    Pattern(u64),
    /// An operation that may have stopped part-way wrote some of its data: a read
    /// checks nothing here until the page is written again.
    Unknown,
}

const ZERO: Content = Content::Fill(0);

impl Content {
    /// The `expect` a read of it writes; nothing for unknown data.
    fn check(self) -> String {
        match self {
            Content::Fill(b) => format!(" expect fill={b:#x}"),
            Content::Pattern(s) => format!(" expect pattern={s}"),
            Content::Unknown => String::new(),
        }
    }
    /// The data argument of a write.
    fn data(self) -> String {
        match self {
            Content::Fill(b) => format!("fill={b:#x}"),
            Content::Pattern(s) => format!("pattern={s}"),
            Content::Unknown => "fill=0".into(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Prot {
    Rw,
    R,
    None,
}

impl Prot {
    fn word(self) -> &'static str {
        match self {
            Prot::Rw => "rw",
            Prot::R => "r",
            Prot::None => "none",
        }
    }
}

/// One process's view of one private region.
#[derive(Clone, Debug)]
struct View {
    prot: Prot,
    /// Per page; `None` for a shared region (its store holds the data).
    content: Option<Vec<Content>>,
    /// Per page: written since the last zap, so a real page (not the shared zero page)
    /// backs it. Only such pages are pinned read-only: a read-only pin of the zero page
    /// would rightly not follow a later write.
    populated: Vec<bool>,
}

#[derive(Clone, Debug)]
struct Region {
    name: String,
    pages: u64,
    /// A migration ran over it: some pages may be the mirror's device-private pages,
    /// which a fork leaves read-only and which the owning device's own fault never
    /// faults in (hmm_range_fault reports them as they are), so a device write there
    /// may stop with EFAULT part-way, as test_hmm's does.
    maybe_device: bool,
    /// Index into the stores for a shared mapping.
    store: Option<usize>,
    /// An mmap of the drive's p2pmem (its controller memory buffer): shared like a
    /// shared mapping, its pages from the p2p pool (p2pmem_alloc_mmap).
    p2p: bool,
}

#[derive(Clone, Debug)]
struct Proc {
    name: String,
    alive: bool,
    views: BTreeMap<usize, View>,
}

/// Where a pin or DMA mapping's pages are, as the model sees it.
#[derive(Clone, Debug)]
enum Target {
    /// A process's private pages (a pinned page stays with the process that pinned it).
    View {
        proc: usize,
        region: usize,
        first: u64,
    },
    /// A shared object's pages, or pinned frames no process maps any more.
    Store { store: usize, first: u64 },
}

#[derive(Clone, Debug)]
struct Handle {
    name: String,
    dev_reads: bool,
    dev_writes: bool,
    dma: bool,
    pages: u64,
    target: Target,
    /// For an RDMA memory region, the process that registered it (its PD).
    mr: Option<usize>,
    /// For an on-demand MR: the process and region it follows. It pins nothing, so its
    /// target is whatever that process maps there now.
    odp: Option<(usize, usize)>,
    /// An on-demand MR whose range its process unmapped: a later mapping may take the
    /// same addresses, which the MR would then reach, so the model uses it no more.
    dead: bool,
    /// For an MR over a dma-buf: the buffer object behind it.
    bo: Option<usize>,
}

impl Handle {
    /// A memory region process `owner` registered over `pages` pages at `target`.
    fn mr(name: String, owner: usize, pages: u64, target: Target) -> Handle {
        Handle {
            name,
            dev_reads: false,
            dev_writes: false,
            dma: false,
            pages,
            target,
            mr: Some(owner),
            odp: None,
            dead: false,
            bo: None,
        }
    }
}

/// A GPU buffer object, as the model sees it: its pages' data (a store, wherever TTM
/// has placed it) and whether its owner still holds the GEM handle.
#[derive(Clone, Debug)]
struct BoModel {
    name: String,
    store: usize,
    alive: bool,
    /// Processes whose descriptor tables hold a dma-buf of it (an export, or a fork
    /// of one): each keeps the BO, and the GPU's mapping of it in RAM, alive.
    fds: BTreeSet<usize>,
}

/// The operation kinds, each with a swarm weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Mmap,
    Write,
    Read,
    Fork,
    Exit,
    Munmap,
    Mprotect,
    Dontneed,
    Pin,
    DmaSg,
    DmaRead,
    DmaWrite,
    Release,
    MirrorRead,
    MirrorWrite,
    Migrate,
    RemoveMirror,
    RaceFault,
    RaceExit,
    IommuFault,
    GpuRead,
    GpuWrite,
    GpuMove,
    RaceMove,
    RaceRemove,
    NvmeWrite,
    NvmeRead,
    P2pMmap,
    RegMr,
    RdmaWrite,
    RdmaRead,
    BoAlloc,
    BoRead,
    BoMove,
    BoFree,
    DmabufMr,
}

const KINDS: [Kind; 36] = [
    Kind::Mmap,
    Kind::Write,
    Kind::Read,
    Kind::Fork,
    Kind::Exit,
    Kind::Munmap,
    Kind::Mprotect,
    Kind::Dontneed,
    Kind::Pin,
    Kind::DmaSg,
    Kind::DmaRead,
    Kind::DmaWrite,
    Kind::Release,
    Kind::MirrorRead,
    Kind::MirrorWrite,
    Kind::Migrate,
    Kind::RemoveMirror,
    Kind::RaceFault,
    Kind::RaceExit,
    Kind::IommuFault,
    Kind::GpuRead,
    Kind::GpuWrite,
    Kind::GpuMove,
    Kind::RaceMove,
    Kind::RaceRemove,
    Kind::NvmeWrite,
    Kind::NvmeRead,
    Kind::P2pMmap,
    Kind::RegMr,
    Kind::RdmaWrite,
    Kind::RdmaRead,
    Kind::BoAlloc,
    Kind::BoRead,
    Kind::BoMove,
    Kind::BoFree,
    Kind::DmabufMr,
];

/// The kinds that may touch a p2pmem mapping: CPU access, munmap, a pin (whose flags
/// decide: FOLL_PCI_P2PDMA is needed, FOLL_LONGTERM refused), and the drive's own DMA
/// into its buffer. Device mirrors and migration cannot take p2p pages on the fuzz
/// machine, and zapping or reprotecting them is not modelled.
const P2P_KINDS: [Kind; 6] = [
    Kind::Write,
    Kind::Read,
    Kind::Munmap,
    Kind::Pin,
    Kind::NvmeWrite,
    Kind::NvmeRead,
];

/// The fuzz drive's controller memory buffer, and how much of it the model lets live
/// mappings hold: at most a quarter, in at most 8 mappings, so an allocation of up to
/// 8 pages always finds a free run (the pool is first-fit over 512 pages).
const P2P_POOL_PAGES: u64 = 512;
const P2P_LIVE_PAGES: u64 = P2P_POOL_PAGES / 4;
const P2P_LIVE_MAPPINGS: usize = 8;

/// Blocks of each fuzz drive's NVMe namespace (1 MiB of 4 KiB blocks).
const DISK_BLOCKS: u64 = 256;

/// The fuzz machines: where the second drive `n1` sits against `n0`, whose controller
/// memory buffer is the p2pmem the model maps, and so how `n1`'s DMA into that buffer
/// goes (pci_p2pdma_distance between the two functions).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Peer {
    /// A q35: both drives on the root complex of a host bridge that is not on the
    /// P2PDMA allowlist, so `n1` cannot reach `n0`'s buffer (EREMOTEIO).
    Refused,
    /// The workstation: both drives below one PCIe switch; the data goes by bus
    /// address through the switch.
    Switch,
    /// The workstation with `n1` on a root port of its own: the data goes through the
    /// (allowlisted) host bridge.
    HostBridge,
}

/// The kinds that need the RDMA NIC, which only the q35 has.
const NIC_KINDS: [Kind; 4] = [Kind::RegMr, Kind::RdmaWrite, Kind::RdmaRead, Kind::DmabufMr];

/// Buffer objects a seed allocates at most, each of [`BO_PAGES`] pages: with two of
/// them pinned the GPU's 64 pages of VRAM still hold every other, so an allocation
/// never fails.
const BO_MAX: usize = 4;
const BO_PAGES: u64 = 4;

/// The kinds that race in a `parallel` group.
const RACES: [Kind; 4] = [
    Kind::RaceFault,
    Kind::RaceExit,
    Kind::RaceMove,
    Kind::RaceRemove,
];

/// Which operation kinds a seed draws.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mix {
    /// Swarm testing: each kind on with probability 3/4, weights 1..=8.
    #[default]
    Swarm,
    /// As [`Mix::Swarm`], but every racing kind on at the highest weight: for exploring
    /// interleavings under a controlled scheduler.
    Races,
}

/// What the generator knows of the machine: everything but its random stream and the
/// text written so far.
#[derive(Clone)]
struct Model {
    ops: usize,
    regions: Vec<Region>,
    stores: Vec<Vec<Content>>,
    procs: Vec<Proc>,
    handles: Vec<Handle>,
    mirror_alive: bool,
    next: u64,
    /// DMA sanitizer reports injected so far (each IOMMU fault makes one).
    violations: u64,
    /// Per drive (`n0`, `n1`), the namespace's blocks written so far: what each holds
    /// and the region page offset it came from (a pattern is keyed by region offset,
    /// so a block read back checks as that pattern only at the same offset).
    disk: [BTreeMap<u64, (Content, u64)>; 2],
    /// Where `n1` sits against `n0`'s buffer.
    peer: Peer,
    /// Bytes the drives moved into and out of p2pmem so far, by path: within `n0`
    /// (its own buffer), through the switch and through the host bridge. Nothing
    /// else on the fuzz machines moves data between two devices.
    p2p_moved: [u64; 3],
    /// QPs (actor, peer) whose request failed: an RC QP in the error state flushes
    /// every later request (IBV_WC_WR_FLUSH_ERR).
    broken_qps: BTreeSet<(usize, usize)>,
    /// Buffer objects allocated so far.
    bos: Vec<BoModel>,
}

struct Gen {
    rng: ChaCha8Rng,
    out: String,
    weights: Vec<(Kind, u32)>,
    m: Model,
    /// The kind being drawn: which regions [`Gen::view_of`] may pick.
    kind: Kind,
}

impl Gen {
    fn new(seed: u64, mix: Mix) -> Gen {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        // Swarm: each kind on with probability 3/4 and a weight of 1..=8; the basics
        // always on, so every run has something to check.
        let weights = KINDS
            .iter()
            .filter_map(|&k| {
                let basic = matches!(k, Kind::Mmap | Kind::Write | Kind::Read);
                let on = basic || rng.gen_bool(0.75);
                let w = rng.gen_range(1..=8);
                match mix {
                    Mix::Races if RACES.contains(&k) => Some((k, 8)),
                    _ => on.then_some((k, w)),
                }
            })
            .collect();
        Gen {
            rng,
            out: String::new(),
            weights,
            kind: Kind::Read,
            m: Model {
                ops: 0,
                regions: Vec::new(),
                stores: Vec::new(),
                procs: Vec::new(),
                handles: Vec::new(),
                mirror_alive: true,
                next: 0,
                violations: 0,
                disk: [BTreeMap::new(), BTreeMap::new()],
                peer: Peer::Refused,
                p2p_moved: [0; 3],
                broken_qps: BTreeSet::new(),
                bos: Vec::new(),
            },
        }
    }

    fn line(&mut self, s: impl AsRef<str>) {
        self.out.push_str(s.as_ref());
        self.out.push('\n');
        self.m.ops += 1;
    }

    fn fresh(&mut self, prefix: &str) -> String {
        self.m.next += 1;
        format!("{prefix}{}", self.m.next)
    }

    fn spawn(&mut self) -> usize {
        let name = self.fresh("p");
        self.line(format!("process {name}"));
        self.m.procs.push(Proc {
            name,
            alive: true,
            views: BTreeMap::new(),
        });
        self.m.procs.len() - 1
    }

    fn live_proc(&mut self) -> usize {
        let live: Vec<usize> = (0..self.m.procs.len())
            .filter(|&i| self.m.procs[i].alive)
            .collect();
        if live.is_empty() {
            return self.spawn();
        }
        live[self.rng.gen_range(0..live.len())]
    }

    /// A mapped region of process `p` the current kind may touch, if it has any.
    fn view_of(&mut self, p: usize) -> Option<usize> {
        let p2p_ok = P2P_KINDS.contains(&self.kind);
        let keys: Vec<usize> = self.m.procs[p]
            .views
            .keys()
            .copied()
            .filter(|&r| p2p_ok || !self.m.regions[r].p2p)
            .collect();
        (!keys.is_empty()).then(|| keys[self.rng.gen_range(0..keys.len())])
    }

    /// Pages of the p2p pool in use: a p2pmem mapping's pages go back when its last
    /// mapping and its last pin are gone (p2pdma_page_free).
    fn p2p_pages(&self) -> (u64, usize) {
        let mut pages = 0;
        let mut live = 0;
        for (r, region) in self.m.regions.iter().enumerate() {
            let Some(store) = region.store.filter(|_| region.p2p) else {
                continue;
            };
            let mapped = self
                .m
                .procs
                .iter()
                .any(|p| p.alive && p.views.contains_key(&r));
            // Each page is freed on its own last reference: unmapped, a region keeps
            // only its pinned pages.
            let mut held = vec![mapped; region.pages as usize];
            for h in &self.m.handles {
                if let Target::Store { store: s, first } = h.target {
                    if s == store {
                        for i in first..first + h.pages {
                            held[i as usize] = true;
                        }
                    }
                }
            }
            let n = held.iter().filter(|&&b| b).count() as u64;
            if n > 0 {
                pages += n;
                live += 1;
            }
        }
        (pages, live)
    }

    /// `expect p2p_bytes=...`, after an operation that may have freed p2p pages.
    fn check_p2p(&mut self) {
        if self.m.regions.iter().any(|r| r.p2p) {
            let (pages, _) = self.p2p_pages();
            let text = if pages == 0 {
                "0".to_string()
            } else {
                format!("{}K", pages * 4)
            };
            self.line(format!("expect p2p_bytes={text}"));
        }
    }

    /// A new zeroed region `name` of `pages` pages mapped read-write by process `p`:
    /// private unless it has a `store`, p2pmem when `p2p` (whose pages exist from the
    /// start, each a fresh pool page).
    fn map_region(&mut self, p: usize, name: String, pages: u64, store: Option<usize>, p2p: bool) {
        self.m.regions.push(Region {
            name,
            pages,
            store,
            maybe_device: false,
            p2p,
        });
        let r = self.m.regions.len() - 1;
        self.m.procs[p].views.insert(
            r,
            View {
                prot: Prot::Rw,
                content: store.is_none().then(|| vec![ZERO; pages as usize]),
                populated: vec![p2p; pages as usize],
            },
        );
    }

    /// A buffer object whose GEM handle is still held, if there is one.
    fn live_bo(&mut self) -> Option<usize> {
        let live: Vec<usize> = (0..self.m.bos.len())
            .filter(|&b| self.m.bos[b].alive)
            .collect();
        (!live.is_empty()).then(|| live[self.rng.gen_range(0..live.len())])
    }

    fn content(&self, p: usize, r: usize, i: u64) -> Content {
        match self.m.regions[r].store {
            Some(s) => self.m.stores[s][i as usize],
            None => self.m.procs[p].views[&r]
                .content
                .as_ref()
                .map_or(ZERO, |c| c[i as usize]),
        }
    }

    fn set(&mut self, p: usize, r: usize, i: u64, c: Content) {
        match self.m.regions[r].store {
            Some(s) => self.m.stores[s][i as usize] = c,
            None => {
                if let Some(v) = self.m.procs[p].views.get_mut(&r) {
                    if let Some(content) = v.content.as_mut() {
                        content[i as usize] = c;
                    }
                    v.populated[i as usize] = true;
                }
            }
        }
    }

    /// The one content of pages `[first, first + n)`, if they all hold the same.
    fn uniform(&self, p: usize, r: usize, first: u64, n: u64) -> Option<Content> {
        let c = self.content(p, r, first);
        (first..first + n)
            .all(|i| self.content(p, r, i) == c)
            .then_some(c)
    }

    fn handle_content(&self, h: &Handle, i: u64) -> Content {
        match &h.target {
            Target::View {
                proc,
                region,
                first,
            } => self.content(*proc, *region, first + i),
            Target::Store { store, first } => self.m.stores[*store][(first + i) as usize],
        }
    }

    /// Handles on `p`'s view of `r` (or all of `p`'s when `r` is `None`) detach: the
    /// pinned frames leave the process and keep what they held. Handles on the same
    /// view share them (two pins of one page are one frame), so they move to one new
    /// store together.
    fn detach(&mut self, p: usize, r: Option<usize>) {
        let regions: Vec<usize> = self.m.procs[p]
            .views
            .keys()
            .copied()
            .filter(|&x| r.is_none_or(|r| r == x))
            .collect();
        for region in regions {
            let on: Vec<usize> = (0..self.m.handles.len())
                .filter(|&k| {
                    self.m.handles[k].odp.is_none()
                        && matches!(self.m.handles[k].target,
                            Target::View { proc, region: hr, .. } if proc == p && hr == region)
                })
                .collect();
            if on.is_empty() {
                continue;
            }
            let frames = (0..self.m.regions[region].pages)
                .map(|i| self.content(p, region, i))
                .collect();
            self.m.stores.push(frames);
            let store = self.m.stores.len() - 1;
            for k in on {
                if let Target::View { first, .. } = self.m.handles[k].target {
                    self.m.handles[k].target = Target::Store { store, first };
                }
            }
        }
    }

    /// Pages `[first, first + n)` of `p`'s `r` as a pin (or MR) holds them: a write pin
    /// breaks copy-on-write first, which the model sees as the process's own, populated
    /// pages; a shared mapping's pages are its object's.
    fn pinned(&mut self, p: usize, r: usize, first: u64, n: u64, write: bool) -> Target {
        if write {
            for i in first..first + n {
                let c = self.content(p, r, i);
                self.set(p, r, i, c);
            }
        }
        match self.m.regions[r].store {
            Some(store) => Target::Store { store, first },
            None => Target::View {
                proc: p,
                region: r,
                first,
            },
        }
    }

    /// On-demand MRs over `p`'s mapping of `r` (all of `p`'s when `None`) lose their
    /// range: the process exited or unmapped it.
    fn kill_odp(&mut self, p: usize, r: Option<usize>) {
        for h in &mut self.m.handles {
            if let Some((q, region)) = h.odp {
                if q == p && r.is_none_or(|r| r == region) {
                    h.dead = true;
                }
            }
        }
    }

    /// A range of a region: first page and count.
    fn range(&mut self, pages: u64) -> (u64, u64) {
        let first = self.rng.gen_range(0..pages);
        let n = self.rng.gen_range(1..=(pages - first).min(4));
        (first, n)
    }

    fn data(&mut self) -> Content {
        if self.rng.gen_bool(0.5) {
            Content::Fill(self.rng.gen_range(1..=255))
        } else {
            Content::Pattern(self.rng.gen_range(1..1000))
        }
    }

    fn pick_kind(&mut self) -> Kind {
        let total: u32 = self.weights.iter().map(|w| w.1).sum();
        let mut x = self.rng.gen_range(0..total);
        for &(k, w) in &self.weights {
            if x < w {
                return k;
            }
            x -= w;
        }
        Kind::Read
    }

    fn maybe_check_quiet(&mut self) {
        // A BO in system RAM is mapped for its GPU: while any lives (its handle, a
        // descriptor or an MR holds it), the model cannot say how many mappings.
        let bos = self
            .m
            .bos
            .iter()
            .any(|b| b.alive || b.fds.iter().any(|&q| self.m.procs[q].alive));
        if self.m.handles.is_empty() && !bos {
            self.line("expect pinned=0 mappings=0");
        }
    }

    fn step(&mut self) {
        let kind = self.pick_kind();
        self.kind = kind;
        let p = self.live_proc();
        let pn = self.m.procs[p].name.clone();
        match kind {
            Kind::Mmap => {
                let pages = self.rng.gen_range(1..=8);
                let name = self.fresh("r");
                let shared = self.rng.gen_bool(0.25);
                let store = shared.then(|| {
                    self.m.stores.push(vec![ZERO; pages as usize]);
                    self.m.stores.len() - 1
                });
                let kind = if shared { "shared" } else { "anon" };
                self.line(format!("{pn}: {name} = mmap {kind} {}K", pages * 4));
                self.map_region(p, name, pages, store, false);
            }
            Kind::P2pMmap => {
                // A fresh allocation from the drive's CMB, zeroed, shared with children.
                let pages = self.rng.gen_range(1..=8);
                let (live_pages, live) = self.p2p_pages();
                if live >= P2P_LIVE_MAPPINGS || live_pages + pages > P2P_LIVE_PAGES {
                    return;
                }
                let name = self.fresh("q");
                self.line(format!("{pn}: {name} = mmap p2pmem {}K dev=n0", pages * 4));
                self.m.stores.push(vec![ZERO; pages as usize]);
                let store = self.m.stores.len() - 1;
                self.map_region(p, name, pages, Some(store), true);
                self.check_p2p();
            }
            Kind::Write
            | Kind::Read
            | Kind::MirrorRead
            | Kind::MirrorWrite
            | Kind::GpuRead
            | Kind::GpuWrite => {
                let Some(r) = self.view_of(p) else { return };
                let mirror = matches!(kind, Kind::MirrorRead | Kind::MirrorWrite);
                if mirror && !self.m.mirror_alive {
                    return;
                }
                let (first, n) = self.range(self.m.regions[r].pages);
                let (rn, prot) = (
                    self.m.regions[r].name.clone(),
                    self.m.procs[p].views[&r].prot,
                );
                let at = format!("{rn}+{}K {}K", first * 4, n * 4);
                let op = match kind {
                    Kind::Write => "write",
                    Kind::Read => "read",
                    Kind::MirrorRead => "dmirror.read dm",
                    Kind::GpuRead => "gpu.read g",
                    Kind::GpuWrite => "gpu.write g",
                    _ => "dmirror.write dm",
                };
                if matches!(kind, Kind::Write | Kind::MirrorWrite | Kind::GpuWrite) {
                    let d = self.data();
                    if prot != Prot::Rw {
                        self.line(format!("{pn}: {op} {at} {} expect error", d.data()));
                        return;
                    }
                    if matches!(kind, Kind::MirrorWrite | Kind::GpuWrite)
                        && self.m.regions[r].maybe_device
                    {
                        self.line(format!("{pn}: {op} {at} {} expect any", d.data()));
                        for i in first..first + n {
                            self.set(p, r, i, Content::Unknown);
                        }
                        return;
                    }
                    self.line(format!("{pn}: {op} {at} {}", d.data()));
                    for i in first..first + n {
                        self.set(p, r, i, d);
                    }
                } else if prot == Prot::None {
                    self.line(format!("{pn}: {op} {at} expect error"));
                } else {
                    match self.uniform(p, r, first, n) {
                        Some(c) => self.line(format!("{pn}: {op} {at}{}", c.check())),
                        None => {
                            // Mixed content: check each page.
                            for i in first..first + n {
                                let c = self.content(p, r, i);
                                self.line(format!("{pn}: {op} {rn}+{}K 4K{}", i * 4, c.check()));
                            }
                        }
                    }
                }
            }
            Kind::Fork => {
                if self.m.procs.iter().filter(|p| p.alive).count() >= 4 {
                    return;
                }
                let child = self.fresh("p");
                self.line(format!("{pn}: {child} = fork"));
                let views = self.m.procs[p].views.clone();
                self.m.procs.push(Proc {
                    name: child,
                    alive: true,
                    views,
                });
                let c = self.m.procs.len() - 1;
                for bo in &mut self.m.bos {
                    if bo.fds.contains(&p) {
                        bo.fds.insert(c);
                    }
                }
            }
            Kind::Exit => {
                // A process that registered MRs keeps running until they are released
                // (what its exit does to them is the RDMA tests' subject).
                if self.m.procs.iter().filter(|p| p.alive).count() < 2
                    || self.m.handles.iter().any(|h| h.mr == Some(p))
                {
                    return;
                }
                self.line(format!("{pn}: exit"));
                for bo in &mut self.m.bos {
                    bo.fds.remove(&p);
                }
                self.detach(p, None);
                self.kill_odp(p, None);
                self.m.procs[p].alive = false;
                self.m.procs[p].views.clear();
                self.maybe_check_quiet();
                self.check_p2p();
            }
            Kind::Munmap | Kind::Dontneed => {
                let Some(r) = self.view_of(p) else { return };
                let rn = self.m.regions[r].name.clone();
                let len = self.m.regions[r].pages * 4;
                if kind == Kind::Munmap {
                    self.line(format!("{pn}: munmap {rn} {len}K"));
                    self.detach(p, Some(r));
                    self.kill_odp(p, Some(r));
                    self.m.procs[p].views.remove(&r);
                    self.line(format!("{pn}: read {rn} 4K expect EFAULT"));
                    if self.m.regions[r].p2p {
                        self.check_p2p();
                    }
                } else {
                    self.line(format!("{pn}: madvise {rn} {len}K dontneed"));
                    self.zap(p, r);
                }
            }
            Kind::Mprotect => {
                let Some(r) = self.view_of(p) else { return };
                let prot = [Prot::Rw, Prot::R, Prot::None][self.rng.gen_range(0..3)];
                let rn = self.m.regions[r].name.clone();
                let len = self.m.regions[r].pages * 4;
                self.line(format!("{pn}: mprotect {rn} {len}K {}", prot.word()));
                if let Some(v) = self.m.procs[p].views.get_mut(&r) {
                    v.prot = prot;
                }
            }
            Kind::Pin | Kind::DmaSg => {
                let Some(r) = self.view_of(p) else { return };
                let (first, n) = self.range(self.m.regions[r].pages);
                let view = &self.m.procs[p].views[&r];
                let (prot, populated) = (view.prot, view.populated.clone());
                let write = self.rng.gen_bool(0.5);
                let longterm = self.rng.gen_bool(0.5);
                let private = self.m.regions[r].store.is_none();
                let all_populated = (first..first + n).all(|i| populated[i as usize]);
                if prot != Prot::Rw || (private && !write && !all_populated) {
                    // Read-only pins only of real pages; nothing of PROT_NONE or
                    // read-only mappings (covered by the selftests' scenarios).
                    return;
                }
                let h = self.fresh("h");
                let rn = self.m.regions[r].name.clone();
                // p2p pages go only to a caller that asks (FOLL_PCI_P2PDMA): the walk
                // refuses them to others first (try_grab_folio, EREMOTEIO), and a
                // long-term pin of them fails after it (EINVAL): they cannot be
                // migrated out of the device.
                let p2p = self.m.regions[r].p2p;
                let asks = p2p && self.rng.gen_bool(0.6);
                let mut flags = Vec::new();
                if asks {
                    flags.push("p2pdma");
                }
                if write {
                    flags.push("write");
                }
                if longterm {
                    flags.push("longterm");
                }
                let flags = if flags.is_empty() {
                    String::new()
                } else {
                    format!(" flags={}", flags.join(","))
                };
                if p2p && (!asks || longterm) {
                    let errno = if asks { "EINVAL" } else { "EREMOTEIO" };
                    self.line(format!(
                        "{pn}: {h} = pin {rn}+{}K {}K{flags} expect {errno}",
                        first * 4,
                        n * 4
                    ));
                    return;
                }
                let dma = kind == Kind::DmaSg;
                let (dev_reads, dev_writes, text) = if dma {
                    // get_user_dma_sg pins with FOLL_WRITE when the device writes.
                    let dir = if write {
                        ["from_device", "bidirectional"][self.rng.gen_range(0..2)]
                    } else {
                        "to_device"
                    };
                    let flags = if longterm { " flags=longterm" } else { "" };
                    (
                        dir != "from_device",
                        dir != "to_device",
                        format!(
                            "{pn}: {h} = dma_sg n0 {rn}+{}K {}K dir={dir}{flags} expect pages={n}",
                            first * 4,
                            n * 4
                        ),
                    )
                } else {
                    (
                        false,
                        false,
                        format!(
                            "{pn}: {h} = pin {rn}+{}K {}K{flags} expect pages={n}",
                            first * 4,
                            n * 4
                        ),
                    )
                };
                self.line(text);
                let target = self.pinned(p, r, first, n, write);
                self.m.handles.push(Handle {
                    name: h,
                    dev_reads,
                    dev_writes,
                    dma,
                    pages: n,
                    target,
                    mr: None,
                    odp: None,
                    dead: false,
                    bo: None,
                });
            }
            Kind::DmaRead | Kind::DmaWrite | Kind::IommuFault => {
                let cands: Vec<usize> = (0..self.m.handles.len())
                    .filter(|&k| {
                        let h = &self.m.handles[k];
                        h.dma
                            && match kind {
                                Kind::DmaRead => h.dev_reads,
                                Kind::DmaWrite => h.dev_writes,
                                _ => h.dev_reads,
                            }
                    })
                    .collect();
                if cands.is_empty() {
                    return;
                }
                let k = cands[self.rng.gen_range(0..cands.len())];
                let h = self.m.handles[k].clone();
                match kind {
                    Kind::IommuFault => {
                        // DMA past the end of the mapping: refused and reported by the
                        // sanitizer, never a stray access.
                        self.m.violations += 1;
                        self.line(format!(
                            "dma.read {} 4K offset={}K expect error violations={}",
                            h.name,
                            h.pages * 4,
                            self.m.violations
                        ));
                    }
                    Kind::DmaRead => {
                        let i = self.rng.gen_range(0..h.pages);
                        let c = self.handle_content(&h, i);
                        self.line(format!(
                            "dma.read {} 4K offset={}K{}",
                            h.name,
                            i * 4,
                            c.check()
                        ));
                    }
                    _ => {
                        let i = self.rng.gen_range(0..h.pages);
                        let b = self.rng.gen_range(1..=255u8);
                        self.line(format!(
                            "dma.write {} 4K offset={}K fill={b:#x}",
                            h.name,
                            i * 4
                        ));
                        self.dma_wrote(k, i, Content::Fill(b));
                    }
                }
            }
            Kind::RegMr => {
                // ibv_reg_mr with local and remote write: a long-term write pin of the
                // range (copy-on-write broken first), mapped for the NIC.
                let Some(r) = self.view_of(p) else { return };
                if self.m.procs[p].views[&r].prot != Prot::Rw {
                    return;
                }
                let (first, n) = self.range(self.m.regions[r].pages);
                let h = self.fresh("mr");
                let rn = self.m.regions[r].name.clone();
                // On demand (ODP): nothing pinned, the NIC faults what the process maps.
                let odp = self.rng.gen_bool(0.4);
                let access = if odp {
                    " access=local_write,remote_write,remote_read,on_demand"
                } else {
                    ""
                };
                self.line(format!(
                    "{pn}: {h} = rnic.reg_mr nic {rn}+{}K {}K{access}",
                    first * 4,
                    n * 4
                ));
                // An ODP MR's target is only where it starts: it follows the process.
                let target = self.pinned(p, r, first, n, !odp);
                self.m.handles.push(Handle {
                    odp: odp.then_some((p, r)),
                    ..Handle::mr(h, p, n, target)
                });
            }
            Kind::RdmaWrite | Kind::RdmaRead => {
                // One RC QP between this process and another: a WRITE moves this
                // process's MR into the peer's, a READ the other way, from offset 0
                // over the shorter of the two.
                let mine: Vec<usize> = (0..self.m.handles.len())
                    .filter(|&k| self.m.handles[k].mr == Some(p) && !self.m.handles[k].dead)
                    .collect();
                let theirs: Vec<usize> = (0..self.m.handles.len())
                    .filter(|&k| {
                        let h = &self.m.handles[k];
                        !h.dead && h.mr.is_some_and(|q| q != p && self.m.procs[q].alive)
                    })
                    .collect();
                if mine.is_empty() || theirs.is_empty() {
                    return;
                }
                let l = mine[self.rng.gen_range(0..mine.len())];
                let r = theirs[self.rng.gen_range(0..theirs.len())];
                let n = self.m.handles[l].pages.min(self.m.handles[r].pages);
                let peer = self.m.handles[r].mr.unwrap_or(p);
                let verb = if kind == Kind::RdmaWrite {
                    "write"
                } else {
                    "read"
                };
                let (src, dst) = if kind == Kind::RdmaWrite {
                    (l, r)
                } else {
                    (r, l)
                };
                // An on-demand MR works only while its process maps the range with the
                // access the NIC needs: reading the source, writing the destination.
                let usable = |g: &Gen, k: usize, write: bool| {
                    let h = &g.m.handles[k];
                    match h.odp {
                        None => true,
                        Some((q, region)) => g.m.procs[q].views.get(&region).is_some_and(|v| {
                            if write {
                                v.prot == Prot::Rw
                            } else {
                                v.prot != Prot::None
                            }
                        }),
                    }
                };
                let qp = (p, peer);
                let ok = !self.m.broken_qps.contains(&qp)
                    && usable(self, src, false)
                    && usable(self, dst, true);
                let request = format!(
                    "{pn}: rnic.{verb} nic {} {} {} {}K expect {}",
                    self.m.handles[l].name,
                    self.m.procs[peer].name,
                    self.m.handles[r].name,
                    n * 4,
                    if ok {
                        format!("bytes={}K", n * 4)
                    } else {
                        "error".to_string()
                    }
                );
                // A request through a dma-buf MR may race TTM moving the buffer: the
                // move waits for the NIC's DMA (the reservation's fences), and a request
                // after move_notify maps the buffer again where it now is. Either way the
                // request completes and its data is in the buffer.
                let bo = self.m.handles[l].bo.or(self.m.handles[r].bo);
                match bo {
                    Some(b) if self.m.bos[b].alive && self.rng.gen_bool(0.5) => {
                        let mover = if self.rng.gen_bool(0.5) {
                            "bo_evict"
                        } else {
                            "bo_validate"
                        };
                        let g = self.fresh("race");
                        self.line(format!("parallel {g} {{"));
                        self.line(format!("  {request}"));
                        self.line(format!("  gpu.{mover} {} expect any", self.m.bos[b].name));
                        self.line("}");
                    }
                    _ => self.line(request),
                }
                if !ok {
                    // The failed request, or the flush of one after it, leaves the QP in
                    // the error state.
                    self.m.broken_qps.insert(qp);
                    return;
                }
                let offset = |h: &Handle| match h.target {
                    Target::View { first, .. } | Target::Store { first, .. } => first,
                };
                let (from, to) = (offset(&self.m.handles[src]), offset(&self.m.handles[dst]));
                // Two MRs over one memory that overlap: the order the NIC copies in is
                // its own, so the model names nothing it wrote.
                let same_memory = match (&self.m.handles[src].target, &self.m.handles[dst].target) {
                    (Target::Store { store: a, .. }, Target::Store { store: b, .. }) => a == b,
                    (
                        Target::View {
                            proc: a, region: x, ..
                        },
                        Target::View {
                            proc: b, region: y, ..
                        },
                    ) => a == b && x == y,
                    _ => false,
                };
                let overlap = same_memory && from < to + n && to < from + n;
                let data: Vec<Content> = (0..n)
                    .map(|i| self.handle_content(&self.m.handles[src], i))
                    .collect();
                for (i, c) in (0..n).zip(data) {
                    // A pattern is keyed by region offset: moved elsewhere it is data
                    // the model no longer names.
                    let c = match c {
                        _ if overlap => Content::Unknown,
                        Content::Pattern(_) if from != to => Content::Unknown,
                        c => c,
                    };
                    self.dma_wrote(dst, i, c);
                }
            }
            Kind::BoAlloc => {
                // A GEM create in VRAM (evicting other buffers or unified memory to
                // make room), then the GPU fills it.
                if self.m.bos.len() >= BO_MAX {
                    return;
                }
                let name = self.fresh("b");
                let d = self.data();
                let len = BO_PAGES * 4;
                self.line(format!("{name} = gpu.bo_alloc g {len}K"));
                self.line(format!("gpu.bo_write {name} {len}K {}", d.data()));
                self.m.stores.push(vec![d; BO_PAGES as usize]);
                let store = self.m.stores.len() - 1;
                self.m.bos.push(BoModel {
                    name,
                    store,
                    alive: true,
                    fds: BTreeSet::new(),
                });
            }
            Kind::BoRead => {
                // The GPU reads the buffer wherever TTM placed it: the data follows.
                let Some(b) = self.live_bo() else { return };
                let (first, n) = self.range(BO_PAGES);
                let store = self.m.bos[b].store;
                let c = self.m.stores[store][first as usize];
                if (first..first + n).any(|i| self.m.stores[store][i as usize] != c) {
                    return;
                }
                self.line(format!(
                    "gpu.bo_read {} {}K offset={}K{}",
                    self.m.bos[b].name,
                    n * 4,
                    first * 4,
                    c.check()
                ));
            }
            Kind::BoMove => {
                // TTM moves the buffer (to RAM, or back to VRAM): dynamic importers hear
                // move_notify first, pinned ones refuse it (EBUSY).
                let Some(b) = self.live_bo() else { return };
                let verb = if self.rng.gen_bool(0.5) {
                    "bo_evict"
                } else {
                    "bo_validate"
                };
                self.line(format!("gpu.{verb} {} expect any", self.m.bos[b].name));
            }
            Kind::BoFree => {
                // The owner drops its GEM handle; a dma-buf exported from it keeps the
                // buffer alive for its importers.
                let Some(b) = self.live_bo() else { return };
                self.line(format!("release {}", self.m.bos[b].name));
                self.m.bos[b].alive = false;
            }
            Kind::DmabufMr => {
                // The process exports the buffer as a dma-buf and registers part of it
                // (ibv_reg_dmabuf_mr): a dynamic attachment, or a pinned one. The NIC
                // cannot reach the q35 GPU's VRAM, so an exporter that may move the
                // buffer to RAM (amdgpu) does, one that may not (xe) refuses.
                let Some(b) = self.live_bo() else { return };
                let (first, n) = self.range(BO_PAGES);
                let d = self.fresh("d");
                let h = self.fresh("mr");
                let bn = self.m.bos[b].name.clone();
                self.m.bos[b].fds.insert(p);
                if self.rng.gen_bool(0.15) {
                    self.line(format!("{pn}: {d} = gpu.bo_export {bn} p2p=refuse"));
                    self.line(format!(
                        "{pn}: {h} = rnic.reg_dmabuf_mr nic {d} {}K offset={}K expect EOPNOTSUPP",
                        n * 4,
                        first * 4
                    ));
                    return;
                }
                self.line(format!("{pn}: {d} = gpu.bo_export {bn}"));
                let pinned = if self.rng.gen_bool(0.3) {
                    " pinned=yes"
                } else {
                    ""
                };
                self.line(format!(
                    "{pn}: {h} = rnic.reg_dmabuf_mr nic {d} {}K offset={}K{pinned}",
                    n * 4,
                    first * 4
                ));
                let store = self.m.bos[b].store;
                self.m.handles.push(Handle {
                    bo: Some(b),
                    ..Handle::mr(h, p, n, Target::Store { store, first })
                });
            }
            Kind::Release => {
                if self.m.handles.is_empty() {
                    return;
                }
                let k = self.rng.gen_range(0..self.m.handles.len());
                let h = self.m.handles.remove(k);
                self.line(format!("release {}", h.name));
                self.maybe_check_quiet();
                self.check_p2p();
            }
            Kind::Migrate => {
                if !self.m.mirror_alive {
                    return;
                }
                let Some(r) = self.view_of(p) else { return };
                let (first, n) = self.range(self.m.regions[r].pages);
                let rn = self.m.regions[r].name.clone();
                let to = if self.rng.gen_bool(0.7) {
                    "migrate_to_dev"
                } else {
                    "migrate_to_sys"
                };
                // Pinned, shared or unreadable pages do not move, the pool may run out:
                // the outcome varies, the data must not.
                self.m.regions[r].maybe_device = true;
                self.line(format!(
                    "{pn}: dmirror.{to} dm {rn}+{}K {}K expect any",
                    first * 4,
                    n * 4
                ));
            }
            Kind::GpuMove => {
                let Some(r) = self.view_of(p) else { return };
                let (first, n) = self.range(self.m.regions[r].pages);
                let rn = self.m.regions[r].name.clone();
                self.m.regions[r].maybe_device = true;
                match self.rng.gen_range(0..4) {
                    0 => self.line("gpu.evict g expect any"),
                    1 => self.line(format!(
                        "{pn}: gpu.prefetch g {rn}+{}K {}K ram expect any",
                        first * 4,
                        n * 4
                    )),
                    2 => self.line(format!(
                        "{pn}: gpu.placement g {rn}+{}K {}K remote",
                        first * 4,
                        n * 4
                    )),
                    _ => self.line(format!(
                        "{pn}: gpu.prefetch g {rn}+{}K {}K vram expect any",
                        first * 4,
                        n * 4
                    )),
                }
            }
            Kind::RemoveMirror => {
                if !self.m.mirror_alive || self.m.ops < 20 {
                    return;
                }
                // Every page in device memory goes back to system RAM, data intact.
                self.line("remove dm");
                self.m.mirror_alive = false;
            }
            Kind::NvmeWrite => {
                // A drive reads the buffer by DMA (get_user_dma_sg, to the device)
                // into blocks lba.. of its namespace.
                let Some(r) = self.view_of(p) else { return };
                let (first, n) = self.range(self.m.regions[r].pages);
                let lba = self.rng.gen_range(0..DISK_BLOCKS - n);
                let d = self.rng.gen_range(0..2);
                let rn = self.m.regions[r].name.clone();
                let at = format!("n{d} {rn}+{}K {}K lba={lba}", first * 4, n * 4);
                if self.m.procs[p].views[&r].prot == Prot::None {
                    self.line(format!("{pn}: nvme.write {at} expect error"));
                    return;
                }
                if !self.drive_dma(&pn, "write", &at, r, d, n) {
                    return;
                }
                for k in 0..n {
                    let c = self.content(p, r, first + k);
                    self.m.disk[d].insert(lba + k, (c, first + k));
                }
            }
            Kind::NvmeRead => {
                // A drive writes one block into a page by DMA (FOLL_WRITE: copy-on-
                // write broken first); a pattern lands at the offset it came from.
                let Some(r) = self.view_of(p) else { return };
                let d = self.rng.gen_range(0..2);
                // Mostly a block written before, so there is data to check.
                let written: Vec<u64> = self.m.disk[d].keys().copied().collect();
                let lba = if !written.is_empty() && self.rng.gen_bool(0.75) {
                    written[self.rng.gen_range(0..written.len())]
                } else {
                    self.rng.gen_range(0..DISK_BLOCKS)
                };
                let (c, from) = self.m.disk[d].get(&lba).copied().unwrap_or((ZERO, 0));
                let pages = self.m.regions[r].pages;
                let i = match c {
                    Content::Pattern(_) if from < pages => from,
                    Content::Pattern(_) => return,
                    _ => self.rng.gen_range(0..pages),
                };
                let rn = self.m.regions[r].name.clone();
                let at = format!("n{d} {rn}+{}K 4K lba={lba}", i * 4);
                if self.m.procs[p].views[&r].prot != Prot::Rw {
                    self.line(format!("{pn}: nvme.read {at} expect error"));
                    return;
                }
                if !self.drive_dma(&pn, "read", &at, r, d, 1) {
                    return;
                }
                self.set(p, r, i, c);
                let check = c.check();
                if !check.is_empty() {
                    self.line(format!("{pn}: read {rn}+{}K 4K{check}", i * 4));
                }
            }
            Kind::RaceMove => {
                // A CPU write racing a migration of the same pages: whichever order
                // the schedule picks, the write lands and stays (a migration that
                // copied the page before the write must not install the old copy).
                let Some(r) = self.view_of(p) else { return };
                if self.m.procs[p].views[&r].prot != Prot::Rw {
                    return;
                }
                let (first, n) = self.range(self.m.regions[r].pages);
                let rn = self.m.regions[r].name.clone();
                let at = format!("{rn}+{}K {}K", first * 4, n * 4);
                let d = self.data();
                let mover = match self.rng.gen_range(0..4) {
                    0 if self.m.mirror_alive => {
                        format!("{pn}: dmirror.migrate_to_dev dm {at} expect any")
                    }
                    1 => format!("{pn}: gpu.prefetch g {at} vram expect any"),
                    2 => "gpu.evict g expect any".to_string(),
                    _ => format!("{pn}: gpu.prefetch g {at} ram expect any"),
                };
                self.m.regions[r].maybe_device = true;
                let g = self.fresh("race");
                self.line(format!("parallel {g} {{"));
                self.line(format!("  {pn}: write {at} {}", d.data()));
                self.line(format!("  {mover}"));
                self.line("}");
                for i in first..first + n {
                    self.set(p, r, i, d);
                }
            }
            Kind::RaceFault | Kind::RaceRemove => {
                // A device access through the mirror racing an invalidation of the
                // range (MADV_DONTNEED) or the mirror's hot removal: the access may
                // work or fail; the data is zero after the one, intact after the other.
                let remove = kind == Kind::RaceRemove;
                if !self.m.mirror_alive || (remove && self.m.ops < 20) {
                    return;
                }
                let Some(r) = self.view_of(p) else { return };
                if self.m.procs[p].views[&r].prot == Prot::None {
                    return;
                }
                let rn = self.m.regions[r].name.clone();
                let len = self.m.regions[r].pages * 4;
                let g = self.fresh("race");
                self.line(format!("parallel {g} {{"));
                self.line(format!("  {pn}: dmirror.read dm {rn} {len}K expect any"));
                if remove {
                    self.line("  remove dm");
                } else {
                    self.line(format!("  {pn}: madvise {rn} {len}K dontneed"));
                }
                self.line("}");
                if remove {
                    self.m.mirror_alive = false;
                } else {
                    self.zap(p, r);
                }
            }
            Kind::RaceExit => {
                let cands: Vec<usize> = (0..self.m.handles.len())
                    .filter(|&k| {
                        self.m.handles[k].dev_writes
                            && matches!(self.m.handles[k].target, Target::View { proc, .. } if self.m.procs[proc].alive)
                    })
                    .collect();
                if cands.is_empty() || self.m.procs.iter().filter(|p| p.alive).count() < 2 {
                    return;
                }
                let k = cands[self.rng.gen_range(0..cands.len())];
                let Target::View { proc, .. } = self.m.handles[k].target else {
                    return;
                };
                let b = self.rng.gen_range(1..=255u8);
                let (h, victim) = (
                    self.m.handles[k].name.clone(),
                    self.m.procs[proc].name.clone(),
                );
                let g = self.fresh("race");
                self.line(format!("parallel {g} {{"));
                self.line(format!("  dma.write {h} 4K fill={b:#x}"));
                self.line(format!("  {victim}: exit"));
                self.line("}");
                // Whichever ran first, the DMA landed in the pinned page, which the
                // handle keeps once the process is gone.
                self.dma_wrote(k, 0, Content::Fill(b));
                self.detach(proc, None);
                self.kill_odp(proc, None);
                self.m.procs[proc].alive = false;
                self.m.procs[proc].views.clear();
            }
        }
    }

    fn dma_wrote(&mut self, k: usize, i: u64, c: Content) {
        match self.m.handles[k].target.clone() {
            Target::View {
                proc,
                region,
                first,
            } => self.set(proc, region, first + i, c),
            Target::Store { store, first } => self.m.stores[store][(first + i) as usize] = c,
        }
    }

    /// Writes drive `d`'s command `verb` (`at` names the drive, buffer and blocks) on
    /// `n` pages of region `r`, with what the model expects of it, and says whether it
    /// moves data. A buffer in system RAM is always reachable. A p2pmem buffer is
    /// `n0`'s own memory: `n0` reaches it within the device, `n1` as the machine's
    /// [`Peer`] says, and the bytes by path are checked after each such command.
    fn drive_dma(&mut self, pn: &str, verb: &str, at: &str, r: usize, d: usize, n: u64) -> bool {
        if !self.m.regions[r].p2p {
            self.line(format!("{pn}: nvme.{verb} {at}"));
            return true;
        }
        let path = match (d, self.m.peer) {
            (0, _) => 0,
            (_, Peer::Refused) => {
                // pci_p2pdma_map_type() is NOT_SUPPORTED: the mapping fails before the
                // command runs, and nothing moves.
                self.line(format!("{pn}: nvme.{verb} {at} expect EREMOTEIO"));
                return false;
            }
            (_, Peer::Switch) => 1,
            (_, Peer::HostBridge) => 2,
        };
        self.line(format!("{pn}: nvme.{verb} {at}"));
        self.m.p2p_moved[path] += n * 4096;
        let k = |b: u64| {
            if b == 0 {
                "0".to_string()
            } else {
                format!("{}K", b / 1024)
            }
        };
        let [same, switch, bridge] = self.m.p2p_moved;
        self.line(format!(
            "expect bytes.same_device={} bytes.switch={} bytes.host_bridge={}",
            k(same),
            k(switch),
            k(bridge)
        ));
        true
    }

    /// MADV_DONTNEED: private pages drop (zero, unpopulated; pins keep the old pages),
    /// shared ones stay in their object.
    fn zap(&mut self, p: usize, r: usize) {
        if self.m.regions[r].store.is_some() {
            return;
        }
        self.detach(p, Some(r));
        if let Some(v) = self.m.procs[p].views.get_mut(&r) {
            if let Some(c) = v.content.as_mut() {
                c.fill(ZERO);
            }
            v.populated.fill(false);
        }
    }
}

impl Gen {
    /// The model and how much text there was, for a skipped operation to go back to.
    fn save(&self) -> (usize, Model) {
        (self.out.len(), self.m.clone())
    }
    fn restore(&mut self, (out, m): (usize, Model)) {
        self.out.truncate(out);
        self.m = m;
    }
}

/// The scenario seed `seed` draws: `steps` operations on a q35 or the workstation
/// (drawn per seed) with two NVMe drives (the first with a 2 MiB controller memory
/// buffer, mapped as p2pmem), a dmirror whose memory pool holds two 64 KiB chunks, a
/// GPU with 256 KiB of VRAM and, on the q35, an RDMA NIC.
pub fn generate(seed: u64, steps: usize) -> String {
    generate_skipping(seed, steps, &BTreeSet::new())
}

/// As [`generate`], drawing kinds as `mix` says.
pub fn generate_mix(seed: u64, steps: usize, mix: Mix) -> String {
    generate_mix_skipping(seed, steps, mix, &BTreeSet::new())
}

/// As [`generate`], but the operations numbered in `skip` are drawn (so the random
/// stream stays the same) and then dropped: model and text as if they never ran. Every
/// scenario this makes is consistent with the model, so a minimised failure's
/// expectations are as right as the original's.
pub fn generate_skipping(seed: u64, steps: usize, skip: &BTreeSet<usize>) -> String {
    generate_mix_skipping(seed, steps, Mix::Swarm, skip)
}

/// [`generate_skipping`] with a [`Mix`].
pub fn generate_mix_skipping(seed: u64, steps: usize, mix: Mix, skip: &BTreeSet<usize>) -> String {
    let mut g = Gen::new(seed, mix);
    match mix {
        Mix::Swarm => {
            let _ = writeln!(
                g.out,
                "# peerdma fuzz: seed {seed}, {steps} operations (replay: peerdma fuzz --seeds {seed} --ops {steps})"
            );
        }
        Mix::Races => {
            let _ = writeln!(
                g.out,
                "# peerdma fuzz: seed {seed}, {steps} operations, races at the highest weight"
            );
        }
    }
    let iommu = if g.rng.gen_bool(0.5) { "on" } else { "off" };
    // Half the seeds on the q35 (the NIC, and peer DMA refused), the rest on the
    // workstation with the second drive below the switch or beside it.
    g.m.peer = match g.rng.gen_range(0..4) {
        0 | 1 => Peer::Refused,
        2 => Peer::Switch,
        _ => Peer::HostBridge,
    };
    if g.m.peer != Peer::Refused {
        g.weights.retain(|(k, _)| !NIC_KINDS.contains(k));
    }
    let (machine, n0, n1, gpu) = match g.m.peer {
        Peer::Refused => ("q35", "", "", ""),
        Peer::Switch => (
            "workstation",
            " at=0000:05:00.0",
            " at=0000:06:00.0",
            " at=0000:03:00.0",
        ),
        Peer::HostBridge => (
            "workstation",
            " at=0000:05:00.0",
            " at=0000:07:00.0",
            " at=0000:03:00.0",
        ),
    };
    let kinds: Vec<String> = g
        .weights
        .iter()
        .map(|(k, w)| format!("{k:?}:{w}"))
        .collect();
    let _ = writeln!(g.out, "# swarm weights: {}", kinds.join(" "));
    if !skip.is_empty() {
        let _ = writeln!(
            g.out,
            "# minimised: {} of the {steps} operations dropped",
            skip.len()
        );
    }
    let _ = writeln!(g.out, "machine preset={machine} ram=16M iommu={iommu}");
    let _ = writeln!(g.out, "device n0 nvme{n0} capacity=1M cmb=2M");
    let _ = writeln!(g.out, "device n1 nvme{n1} capacity=1M");
    g.out
        .push_str("device dm dmirror memory=private chunk=64K max_chunks=2\n");
    let _ = writeln!(g.out, "device g gpu{gpu} vram=256K");
    if g.m.peer == Peer::Refused {
        g.out.push_str("device nic rnic\n");
    }
    g.spawn();
    for i in 0..steps {
        if skip.contains(&i) {
            let saved = g.save();
            g.step();
            g.restore(saved);
        } else {
            g.step();
        }
    }
    g.out
}

/// One seed's result.
#[derive(Clone, Debug, Serialize)]
pub struct SeedResult {
    /// The seed.
    pub seed: u64,
    /// Scenario lines run (operations and checks).
    pub ops: usize,
    /// The first expectation that failed, if any.
    pub mismatch: Option<Mismatch>,
    /// What leaked, if anything.
    pub leaks: Option<String>,
    /// The failing scenario, minimised (a file `peerdma run` replays).
    pub scenario: Option<String>,
}

/// What a failure is, so minimisation keeps failing the same way: the operation that
/// failed and what kind of expectation it broke (data, success, an errno, a counter,
/// the sanitizer), or a leak.
fn failure_kind(r: &ScenarioReport) -> Option<String> {
    if let Some(m) = &r.mismatch {
        let step = m.step.split_once(": ").map_or(m.step.as_str(), |x| x.1);
        let step = step.split_once(" = ").map_or(step, |x| x.1);
        let op = step.split_whitespace().next().unwrap_or("");
        let what = if m.expected.starts_with("pattern") || m.expected.starts_with("every byte") {
            "data".to_string()
        } else if m.expected.starts_with("no DMA") {
            "sanitizer".to_string()
        } else {
            m.expected.split('=').next().unwrap_or("").to_string()
        };
        return Some(format!("{op}: {what}"));
    }
    r.leaks.as_ref().map(|_| "leak".to_string())
}

/// Runs a scenario's text once, with the fuzzer's checks on (the sanitizer and the
/// frame books after every step).
pub fn run_text(text: &str, vocab: &Vocabulary) -> Result<ScenarioReport, Mismatch> {
    let mut plan = compile_text("fuzz.scn", text, &NoIncludes, vocab).map_err(|d| Mismatch {
        file: "fuzz.scn".into(),
        line: d.line,
        col: d.col,
        step: d.line_text.clone(),
        expected: "a valid scenario (the generator wrote one the checker refuses)".into(),
        got: d.message,
    })?;
    plan.sanitizer_each_step = true;
    plan.run().map_err(|e| Mismatch {
        file: "fuzz.scn".into(),
        line: 0,
        col: 0,
        step: "(machine)".into(),
        expected: "the machine to build".into(),
        got: e.to_string(),
    })
}

/// How a scenario runs: its text in, its report out (or why it could not run).
/// [`run_text`] runs it once; `run_text_shuttle` (with the `shuttle` feature) runs it
/// under shuttle's scheduler.
pub type Exec<'a> = &'a dyn Fn(&str) -> Result<ScenarioReport, Mismatch>;

/// Runs seed `seed` with `steps` operations; a failure is minimised when `minimise`.
pub fn run_seed(seed: u64, steps: usize, minimise: bool, vocab: &Vocabulary) -> SeedResult {
    run_seed_with(seed, steps, Mix::Swarm, minimise, &|t| run_text(t, vocab))
}

/// [`run_seed`] with a [`Mix`] and an executor: every candidate of the minimisation
/// runs through `exec` too, so a failure found under a scheduler is minimised under
/// the same one.
pub fn run_seed_with(
    seed: u64,
    steps: usize,
    mix: Mix,
    minimise: bool,
    exec: Exec<'_>,
) -> SeedResult {
    let text = generate_mix(seed, steps, mix);
    let lines = text.lines().filter(|l| !l.starts_with('#')).count();
    let report = match exec(&text) {
        Ok(r) => r,
        Err(m) => {
            return SeedResult {
                seed,
                ops: 0,
                mismatch: Some(m),
                leaks: None,
                scenario: Some(text),
            }
        }
    };
    let Some(kind) = failure_kind(&report) else {
        return SeedResult {
            seed,
            ops: lines,
            mismatch: None,
            leaks: None,
            scenario: None,
        };
    };
    let (scenario, report) = if minimise {
        let skip = minimise_skips(steps, |skip| {
            exec(&generate_mix_skipping(seed, steps, mix, skip))
                .ok()
                .and_then(|r| failure_kind(&r))
                .as_deref()
                == Some(kind.as_str())
        });
        let text = generate_mix_skipping(seed, steps, mix, &skip);
        let r = exec(&text).unwrap_or(report);
        (text, r)
    } else {
        (text, report)
    };
    SeedResult {
        seed,
        ops: lines,
        mismatch: report.mismatch,
        leaks: report.leaks,
        scenario: Some(scenario),
    }
}

/// Runs a scenario under shuttle's PCT scheduler for `schedules` schedules drawn from
/// `seed`, and returns the first failing report (or the last passing one). The steps
/// of a `parallel` group become shuttle tasks and every lock, condition variable and
/// atomic of the host a scheduling point, so the interleavings inside operations — an
/// invalidation while a device fault holds its snapshot, a removal while DMA is in
/// flight — are explored, and the same (text, seed, schedules) explores the same ones.
/// A deadlock or panic is shuttle's own failure (it panics with the schedule).
#[cfg(feature = "shuttle")]
pub fn run_text_shuttle(
    text: &str,
    schedules: usize,
    seed: u64,
) -> Result<ScenarioReport, Mismatch> {
    type Slot = std::sync::Mutex<Option<Result<ScenarioReport, Mismatch>>>;
    let text: std::sync::Arc<str> = text.into();
    let out: std::sync::Arc<Slot> = std::sync::Arc::default();
    let (t, o) = (text.clone(), out.clone());
    let failed = |r: &Option<Result<ScenarioReport, Mismatch>>| match r {
        Some(Ok(r)) => !r.passed,
        Some(Err(_)) => true,
        None => false,
    };
    let config = || {
        let mut c = shuttle::Config::new();
        c.stack_size = 1 << 20;
        c
    };
    let body = move || {
        if failed(&o.lock().unwrap_or_else(|p| p.into_inner())) {
            return;
        }
        let r = run_text(&t, &Vocabulary::standard());
        *o.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
    };
    // One schedule first: a scenario that fails before any group ran (or has none)
    // offers PCT no choice to make, which it refuses.
    let once = shuttle::scheduler::RandomScheduler::new_from_seed(seed, 1);
    shuttle::Runner::new(once, config()).run(body.clone());
    let reached_a_group = match &*out.lock().unwrap_or_else(|p| p.into_inner()) {
        Some(Ok(r)) => r.passed && r.steps.iter().any(|s| s.group.is_some()),
        _ => false,
    };
    if reached_a_group && schedules > 1 {
        let pct = shuttle::scheduler::PctScheduler::new_from_seed(seed, 3, schedules - 1);
        shuttle::Runner::new(pct, config()).run(body);
    }
    let r = out.lock().unwrap_or_else(|p| p.into_inner()).take();
    r.unwrap_or_else(|| {
        Err(Mismatch {
            file: "fuzz.scn".into(),
            line: 0,
            col: 0,
            step: "(shuttle)".into(),
            expected: "at least one schedule to run".into(),
            got: "none ran".into(),
        })
    })
}

/// Delta debugging over operation numbers: the largest set of operations to drop
/// (found greedily, halving the chunk size) such that `fails` still holds; at most
/// 1500 tries.
pub fn minimise_skips(
    steps: usize,
    mut fails: impl FnMut(&BTreeSet<usize>) -> bool,
) -> BTreeSet<usize> {
    let mut skip = BTreeSet::new();
    let mut chunk = steps.div_ceil(2).max(1);
    let mut tries = 0;
    loop {
        let mut progressed = false;
        let mut i = 0;
        while i < steps && tries < 1500 {
            let add: Vec<usize> = (i..(i + chunk).min(steps))
                .filter(|k| !skip.contains(k))
                .collect();
            i += chunk;
            if add.is_empty() {
                continue;
            }
            let mut cand = skip.clone();
            cand.extend(add);
            tries += 1;
            if fails(&cand) {
                skip = cand;
                progressed = true;
            }
        }
        if tries >= 1500 || (chunk == 1 && !progressed) {
            return skip;
        }
        if !progressed {
            chunk = chunk.div_ceil(2).max(1);
        }
    }
}

/// A seed range as `A..B` (B excluded, not empty) or one seed `A`: what
/// `peerdma fuzz --seeds` and `PEERDMA_FUZZ_SEEDS` take.
pub fn parse_seeds(s: &str) -> Result<(u64, u64), String> {
    let parse = |x: &str| {
        x.trim()
            .parse::<u64>()
            .map_err(|_| format!("`{x}` is not a seed (a number)"))
    };
    match s.split_once("..") {
        Some((a, b)) => {
            let (a, b) = (parse(a)?, parse(b)?);
            if b <= a {
                return Err(format!("the range {a}..{b} is empty"));
            }
            Ok((a, b))
        }
        None => {
            let a = parse(s)?;
            Ok((a, a.checked_add(1).ok_or("seed too large")?))
        }
    }
}

/// A campaign's summary (`peerdma-fuzz/1`).
#[derive(Clone, Debug, Serialize)]
pub struct Campaign {
    /// Always `peerdma-fuzz/1`.
    pub schema: &'static str,
    /// The first seed.
    pub first_seed: u64,
    /// One past the last seed.
    pub end_seed: u64,
    /// Operations per seed asked for.
    pub ops_per_seed: usize,
    /// Scenario lines run over all seeds.
    pub ops: usize,
    /// Wall time.
    pub seconds: f64,
    /// Lines per second, all checks on.
    pub ops_per_second: f64,
    /// The seeds that failed, each with its minimised scenario.
    pub failures: Vec<SeedResult>,
}

/// Runs seeds `first..end`, calling `progress` after each.
pub fn campaign(
    first: u64,
    end: u64,
    ops: usize,
    minimise: bool,
    progress: &mut dyn FnMut(u64),
) -> Campaign {
    let vocab = Vocabulary::standard();
    let t0 = std::time::Instant::now();
    let mut total = 0;
    let mut failures = Vec::new();
    for seed in first..end {
        let r = run_seed(seed, ops, minimise, &vocab);
        total += r.ops;
        if r.mismatch.is_some() || r.leaks.is_some() {
            failures.push(r);
        }
        progress(seed - first + 1);
    }
    let seconds = t0.elapsed().as_secs_f64();
    Campaign {
        schema: "peerdma-fuzz/1",
        first_seed: first,
        end_seed: end,
        ops_per_seed: ops,
        ops: total,
        seconds,
        ops_per_second: total as f64 / seconds.max(1e-9),
        failures,
    }
}
