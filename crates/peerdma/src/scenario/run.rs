//! Checking and running a scenario: [`compile`] turns parsed statements into a plan —
//! every name, argument and expectation checked, the machine and devices known —
//! before anything runs; [`Plan::run`] builds the host, runs the steps (a parallel
//! group's steps on their own threads, started together), checks each expectation,
//! and at the end exits every process, drops every handle and checks that the host
//! holds nothing and the DMA sanitizer saw nothing.

use crate::sync::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::addr::{Bdf, VirtAddr};
use crate::dmabuf::FdTable;
use crate::errno::Errno;
use crate::fabric::{DeviceClass, PortKind, Topology};
use crate::host::{DeviceSpec, Host, HostConfig, Process};
use crate::mm::Mm;
use crate::scenario::lang::{self, Check, Diag, Loader, Op, Sources, Span, Stmt, StmtKind, Tok};
use crate::scenario::vocab::{
    bind_args, is_name, nearest, parse_errno, parse_size, ActorUse, Args, Compile, Dev, ModelDef,
    Param, StepDef, StepFn, SymKind, Symbols, Ty, Vocabulary, HOST_COUNTERS,
};
use crate::sync::Arc;

/// The JSON schema of a scenario run's report.
pub const SCHEMA: &str = "peerdma-scenario/1";

/// Why a step failed: the kernel's error number when there is one, and the message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// The error number.
    pub errno: Option<Errno>,
    /// What went wrong.
    pub message: String,
}

impl Failure {
    /// A failure with an error number.
    pub fn new(errno: Errno, e: impl std::fmt::Display) -> Failure {
        Failure {
            errno: Some(errno),
            message: e.to_string(),
        }
    }
    /// A failure of the scenario itself (a name that holds nothing at run time).
    pub fn msg(m: impl Into<String>) -> Failure {
        Failure {
            errno: None,
            message: m.into(),
        }
    }
}

/// Converts a layer's error (anything with `errno()`) into a [`Failure`].
#[macro_export]
#[doc(hidden)]
macro_rules! fail {
    ($e:expr) => {{
        let e = $e;
        $crate::scenario::run::Failure::new(e.errno(), e)
    }};
}

/// What a step reports: its values, in its definition's `outputs` order, and the bytes
/// it read with the offset they start at in their region.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// One value per output.
    pub values: Vec<u64>,
    /// Bytes read and their region offset.
    pub data: Option<(Vec<u8>, u64)>,
}

impl Outcome {
    /// Values only.
    pub fn values(v: Vec<u64>) -> Outcome {
        Outcome {
            values: v,
            data: None,
        }
    }
}

/// A step's result.
pub type StepResult = Result<Outcome, Failure>;

/// The byte at region offset `off` of pattern `seed`: what `write ... pattern=SEED`
/// stores and `expect pattern=SEED` compares, so a read of any part of a region checks
/// against the same bytes whichever step wrote them.
pub fn pattern_fill(seed: u64, base: u64, buf: &mut [u8]) {
    // One 64-bit hash per 8-byte word of the region, its bytes little-endian.
    let mut i = 0;
    while i < buf.len() {
        let off = base + i as u64;
        let mut z = seed ^ (off >> 3).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let word = z.to_le_bytes();
        let start = (off & 7) as usize;
        let n = (8 - start).min(buf.len() - i);
        buf[i..i + n].copy_from_slice(&word[start..start + n]);
        i += n;
    }
}

/// One process of a running scenario.
pub struct ProcSlot {
    /// Its address space.
    pub mm: Arc<Mm>,
    /// Its descriptors.
    pub files: Arc<FdTable>,
    proc: Mutex<Option<Process>>,
}

impl ProcSlot {
    /// Forks it.
    pub fn fork(&self) -> Result<Process, Failure> {
        let g = self
            .proc
            .lock()
            .map_err(|_| Failure::msg("process table poisoned"))?;
        let p = g
            .as_ref()
            .ok_or_else(|| Failure::msg("the process has exited"))?;
        p.fork().map_err(|e| fail!(e))
    }
    /// Exits it (once).
    pub fn exit(&self) {
        let p = self.proc.lock().ok().and_then(|mut g| g.take());
        if let Some(p) = p {
            p.exit();
        }
    }
}

/// A handle in the runtime's table: the order it was made in, and the value.
type Held = (u64, Box<dyn std::any::Any + Send>);

/// A mapped range a scenario named.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionRef {
    /// Its first address.
    pub va: VirtAddr,
    /// Its length.
    pub len: u64,
}

struct DevSlot {
    dev: Dev,
    removed: crate::sync::atomic::AtomicBool,
}

/// A running scenario's host and names.
pub struct Runtime {
    /// The machine.
    pub host: Host,
    devs: BTreeMap<String, DevSlot>,
    procs: Mutex<HashMap<String, Arc<ProcSlot>>>,
    regions: Mutex<HashMap<String, RegionRef>>,
    /// Handles by name, each with the order it was made in: the teardown drops the
    /// newest first, as a program closes what it opened last first (an MR before the
    /// dma-buf it imports, the dma-buf before its buffer object).
    handles: Mutex<HashMap<String, Held>>,
    made: crate::sync::atomic::AtomicU64,
}

/// The `what` called `name` in `table`.
fn lookup<T: Clone>(
    table: &Mutex<HashMap<String, T>>,
    name: &str,
    what: &str,
) -> Result<T, Failure> {
    table
        .lock()
        .map_err(|_| Failure::msg(format!("{what} table poisoned")))?
        .get(name)
        .cloned()
        .ok_or_else(|| Failure::msg(format!("no {what} `{name}`")))
}

impl Runtime {
    /// Process `name`.
    pub fn proc(&self, name: &str) -> Result<Arc<ProcSlot>, Failure> {
        lookup(&self.procs, name, "process")
    }
    /// Names a new process.
    pub fn add_proc(&self, name: &str, p: Process) {
        let slot = Arc::new(ProcSlot {
            mm: p.mm().clone(),
            files: p.files().clone(),
            proc: Mutex::new(Some(p)),
        });
        if let Ok(mut t) = self.procs.lock() {
            t.insert(name.to_string(), slot);
        }
    }
    /// Removes a process's name (after exit).
    pub fn drop_proc(&self, name: &str) -> Option<Arc<ProcSlot>> {
        self.procs.lock().ok().and_then(|mut t| t.remove(name))
    }
    /// Region `name`.
    pub fn region(&self, name: &str) -> Result<RegionRef, Failure> {
        lookup(&self.regions, name, "region")
    }
    /// The address `off` bytes into region `name`. The offset must lie inside the
    /// region (or at its end); `len` may run past it, as a system call's range may:
    /// the kernel, not the scenario, decides what an unmapped tail means.
    pub fn at(&self, (name, off): &(String, u64), len: u64) -> Result<VirtAddr, Failure> {
        let r = self.region(name)?;
        if *off > r.len || r.va.0.checked_add(off + len).is_none() {
            return Err(Failure::msg(format!(
                "{name}+{off:#x} is outside the region's {:#x} bytes",
                r.len
            )));
        }
        Ok(VirtAddr(r.va.0 + off))
    }
    /// Names a region.
    pub fn add_region(&self, name: &str, r: RegionRef) {
        if let Ok(mut t) = self.regions.lock() {
            t.insert(name.to_string(), r);
        }
    }
    /// Names a handle.
    pub fn put<T: Send + 'static>(&self, name: &str, v: T) {
        let seq = self
            .made
            .fetch_add(1, crate::sync::atomic::Ordering::Relaxed);
        if let Ok(mut t) = self.handles.lock() {
            t.insert(name.to_string(), (seq, Box::new(v)));
        }
    }
    /// Takes handle `name` out (dropping it releases what it holds).
    pub fn take<T: Send + 'static>(&self, name: &str) -> Result<T, Failure> {
        let b = self
            .handles
            .lock()
            .map_err(|_| Failure::msg("handle table poisoned"))?
            .remove(name)
            .ok_or_else(|| Failure::msg(format!("no handle `{name}`")))?
            .1;
        b.downcast::<T>()
            .map(|b| *b)
            .map_err(|_| Failure::msg(format!("`{name}` is a different kind of handle")))
    }
    /// Drops handle `name`, whatever it is, outside the table's lock (dropping may wait
    /// for DMA in flight).
    pub fn release(&self, name: &str) -> Result<(), Failure> {
        let b = self
            .handles
            .lock()
            .map_err(|_| Failure::msg("handle table poisoned"))?
            .remove(name)
            .ok_or_else(|| Failure::msg(format!("no handle `{name}`")))?;
        drop(b);
        Ok(())
    }
    /// `f` of handle `name` as a `T`, under the table's lock (for a short look).
    pub fn with_handle<T: Send + 'static, R>(
        &self,
        name: &str,
        f: impl FnOnce(&T) -> R,
    ) -> Result<R, Failure> {
        let t = self
            .handles
            .lock()
            .map_err(|_| Failure::msg("handle table poisoned"))?;
        t.get(name)
            .and_then(|b| b.1.downcast_ref::<T>())
            .map(f)
            .ok_or_else(|| Failure::msg(format!("no handle `{name}` of that kind")))
    }
    /// A clone of handle `name`.
    pub fn get<T: Clone + Send + 'static>(&self, name: &str) -> Result<T, Failure> {
        self.with_handle(name, T::clone)
    }
    /// A clone of handle `name`, made by `make` the first time.
    pub fn get_or<T: Clone + Send + 'static>(
        &self,
        name: &str,
        make: impl FnOnce() -> Result<T, Failure>,
    ) -> Result<T, Failure> {
        if let Ok(v) = self.get::<T>(name) {
            return Ok(v);
        }
        let v = make()?;
        self.put(name, v.clone());
        Ok(v)
    }
    /// Device `name`, ENODEV once it was removed.
    fn live_dev(&self, name: &str) -> Result<&Dev, Failure> {
        let slot = self
            .devs
            .get(name)
            .ok_or_else(|| Failure::msg(format!("no device `{name}`")))?;
        if slot.removed.load(crate::sync::atomic::Ordering::Acquire) {
            return Err(Failure::new(
                Errno::ENODEV,
                format!("device `{name}` was removed"),
            ));
        }
        Ok(&slot.dev)
    }
    /// Device `name`'s object as a `T` (`Arc<Nvme>`); ENODEV once it was removed.
    pub fn dev<T: Send + Sync + 'static>(&self, name: &str) -> Result<Arc<T>, Failure> {
        self.live_dev(name)?
            .obj
            .clone()
            .downcast::<T>()
            .map_err(|_| Failure::msg(format!("device `{name}` is another model")))
    }
    /// Device `name`'s function and DMA handle.
    pub fn dev_dma(&self, name: &str) -> Result<(Option<Bdf>, crate::dma::DmaDevice), Failure> {
        let dev = self.live_dev(name)?;
        let dma = dev
            .dma
            .clone()
            .ok_or_else(|| Failure::msg(format!("device `{name}` does no DMA")))?;
        Ok((dev.bdf, dma))
    }
    /// Hot-removes device `name`.
    pub fn remove_dev(&self, name: &str) -> Result<(), Failure> {
        let slot = self
            .devs
            .get(name)
            .ok_or_else(|| Failure::msg(format!("no device `{name}`")))?;
        (slot.dev.remove)(&self.host)?;
        slot.removed
            .store(true, crate::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// A host counter ([`HOST_COUNTERS`]) or a device's (`NAME.counter`).
    pub fn counter(&self, key: &str, models: &BTreeMap<String, ModelDef>) -> Option<u64> {
        if let Some((dev, c)) = key.split_once('.') {
            if let (Some(slot), Some(m)) = (self.devs.get(dev), models.get(dev)) {
                let i = m.counters.iter().position(|x| *x == c)?;
                return (slot.dev.counters)().get(i).copied();
            }
        }
        // Each counter reads only what it needs: a frame walk for frame counts, the
        // DMA side's own tallies for the rest (the fuzzer checks after many steps).
        let usage = || {
            self.host
                .phys()
                .regions()
                .iter()
                .map(|r| r.usage())
                .fold((0, 0), |(a, p), u| (a + u.allocated, p + u.pinned))
        };
        let s = self.host.dma().stats();
        Some(match key {
            "pinned" => usage().1,
            "frames" => usage().0,
            "ram_frames" => self.host.phys().ram().usage().allocated,
            "mappings" => self.host.dma().live_mappings() as u64,
            "iova_pages" => self.host.dma().iommu().usage().0,
            "subscriptions" => self.host.quiescent().notifier_subscriptions as u64,
            "processes" => self.host.quiescent().processes.len() as u64,
            "violations" => self.host.dma().sanitizer().violations().len() as u64,
            "p2p_bytes" => self
                .host
                .p2p()
                .providers()
                .iter()
                .map(|p| p.size() - p.available())
                .sum(),
            "bytes.switch" => s.via_switch,
            "bytes.host_bridge" => s.via_host_bridge,
            "bytes.ram" => s.host_ram,
            "bytes.same_device" => s.same_device,
            _ => return None,
        })
    }
}

/// A compiled expectation.
#[derive(Clone, Debug)]
enum Expect {
    Ok,
    AnyError,
    /// Success or any error: the step's outcome is not checked (what follows checks its
    /// effect).
    Either,
    Errno(Errno),
    Pattern(u64),
    Fill(u8),
    Output(usize, &'static str, Op, u64),
    Counter(String, Op, u64),
}

#[derive(Clone, Debug)]
struct CheckPlan {
    what: Expect,
    span: Span,
    text: String,
}

struct Planned {
    span: Span,
    text: String,
    verb: &'static str,
    outputs: &'static [&'static str],
    run: StepFn,
    checks: Vec<CheckPlan>,
}

enum Node {
    Step(Planned),
    Expect(Span, String, Vec<CheckPlan>),
    Parallel(String, Vec<Planned>),
}

impl Node {
    /// Where a failure after the node is reported: the step, the expectation, or a
    /// group's last step.
    fn site(&self) -> (Span, &str) {
        match self {
            Node::Step(p) => (p.span, &p.text),
            Node::Expect(span, text, _) => (*span, text),
            Node::Parallel(_, steps) => steps
                .last()
                .map_or((Span::default(), ""), |p| (p.span, &p.text)),
        }
    }
}

/// The machine a scenario runs on.
#[derive(Clone, Debug)]
pub struct MachineSpec {
    /// The fabric, shared: a plan, its clones and the host built from it read one copy.
    pub topology: Arc<Topology>,
    /// What names it (preset name or file).
    pub source: String,
    /// RAM bytes.
    pub ram: u64,
    /// IOMMU.
    pub iommu: Option<bool>,
}

struct DeviceDecl {
    name: String,
    model: ModelDef,
    bdf: Option<Bdf>,
    args: Args,
}

/// A checked scenario, ready to run.
pub struct Plan {
    /// Where it came from.
    pub sources: Sources,
    /// Its machine.
    pub machine: MachineSpec,
    devices: Vec<DeviceDecl>,
    nodes: Vec<Node>,
    models: BTreeMap<String, ModelDef>,
    counts_violations: bool,
    /// Check the DMA sanitizer after every step, not only at the end (the fuzzer's
    /// invariant: a violation is reported at the step that caused it).
    pub sanitizer_each_step: bool,
    /// Recompute every frame's references from its holders after every step and
    /// group (`Host::frame_audit`): a leaked frame, one freed while mapped or one
    /// shared where it must be exclusive fails the step that did it. On by default.
    pub audit_each_step: bool,
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan")
            .field("machine", &self.machine.source)
            .field("steps", &self.nodes.len())
            .finish()
    }
}

const MACHINE_PARAMS: &[Param] = &[
    Param::opt(
        "preset",
        Ty::Text,
        "a built-in machine (q35, workstation, dgx, ...)",
    ),
    Param::opt(
        "topology",
        Ty::Text,
        "a topology TOML file, relative to the scenario",
    ),
    Param::opt(
        "iommu",
        Ty::Bool,
        "turn the IOMMU on or off (default: as the machine says)",
    ),
    Param::opt("ram", Ty::Size, "system RAM (default 256M)"),
];

/// Parses and checks the scenario file `path`.
pub fn load(path: &Path, vocab: &Vocabulary) -> Result<Plan, Diag> {
    let name = path.display().to_string();
    let text = lang::read_capped(path).map_err(|e| Diag {
        path: name.clone(),
        line: 0,
        col: 0,
        len: 0,
        line_text: String::new(),
        message: format!("cannot read the scenario: {e}"),
        hint: None,
    })?;
    compile_text(&name, &text, &lang::FsLoader, vocab)
}

/// Parses and checks scenario `text`, named `path` in errors.
pub fn compile_text(
    path: &str,
    text: &str,
    loader: &dyn Loader,
    vocab: &Vocabulary,
) -> Result<Plan, Diag> {
    let parsed = lang::parse(path, text, loader)?;
    compile(parsed.sources, &parsed.stmts, vocab)
}

struct Compiler<'v> {
    vocab: &'v Vocabulary,
    lines: Vec<Vec<String>>,
    sources: Sources,
    syms: Symbols,
    machine: Option<MachineSpec>,
    devices: Vec<DeviceDecl>,
    taken: Vec<Bdf>,
    models: BTreeMap<String, ModelDef>,
    counts_violations: bool,
}

/// Checks parsed statements against `vocab`.
pub fn compile(sources: Sources, stmts: &[Stmt], vocab: &Vocabulary) -> Result<Plan, Diag> {
    let mut c = Compiler {
        vocab,
        lines: split_lines(&sources),
        sources,
        syms: Symbols::default(),
        machine: None,
        devices: Vec::new(),
        taken: Vec::new(),
        models: BTreeMap::new(),
        counts_violations: false,
    };
    let mut nodes = Vec::new();
    for s in stmts {
        if let Some(n) = c.stmt(s)? {
            nodes.push(n);
        }
    }
    let machine = c.machine_or_default()?;
    if nodes.is_empty() && c.devices.is_empty() {
        let span = stmts.first().map_or(
            Span {
                file: 0,
                line: 1,
                col: 1,
                len: 1,
            },
            |s| s.span,
        );
        return Err(c.sources.diag(span, "the scenario has no steps", None));
    }
    Ok(Plan {
        sources: c.sources,
        machine,
        devices: c.devices,
        nodes,
        models: c.models,
        counts_violations: c.counts_violations,
        sanitizer_each_step: false,
        audit_each_step: true,
    })
}

/// Every file's lines, so a statement's text is found without scanning the file.
fn split_lines(sources: &Sources) -> Vec<Vec<String>> {
    sources
        .files
        .iter()
        .map(|f| f.text.lines().map(str::to_string).collect())
        .collect()
}

/// The statement at `span`, comment and blanks trimmed.
fn line_text(lines: &[Vec<String>], span: Span) -> String {
    lines
        .get(span.file as usize)
        .and_then(|f| f.get(span.line.saturating_sub(1) as usize))
        .map(|l| l.split('#').next().unwrap_or("").trim().to_string())
        .unwrap_or_default()
}

impl Compiler<'_> {
    fn machine_or_default(&mut self) -> Result<MachineSpec, Diag> {
        if self.machine.is_none() {
            let topology = crate::fabric::preset_shared("workstation").map_err(|e| {
                self.sources
                    .diag(Span::default(), format!("default machine: {e}"), None)
            })?;
            self.machine = Some(MachineSpec {
                topology,
                source: "workstation".into(),
                ram: 256 << 20,
                iommu: None,
            });
        }
        Ok(self.machine.clone().unwrap_or_else(|| unreachable!()))
    }

    fn stmt(&mut self, s: &Stmt) -> Result<Option<Node>, Diag> {
        match &s.kind {
            StmtKind::Expect(checks) => {
                let plan = self.checks(checks, None)?;
                Ok(Some(Node::Expect(
                    s.span,
                    line_text(&self.lines, s.span),
                    plan,
                )))
            }
            StmtKind::Parallel { name, body } => {
                self.syms.group = Some(name.text.clone());
                let mut steps = Vec::new();
                for b in body {
                    match &b.kind {
                        StmtKind::Call(call) => {
                            if matches!(call.verb.text.as_str(), "machine" | "device") {
                                return Err(self.sources.diag(
                                    call.verb.span,
                                    format!("`{}` inside a parallel group", call.verb.text),
                                    Some("declare the machine and devices first".into()),
                                ));
                            }
                            steps.push(self.call(b.span, call)?);
                        }
                        _ => {
                            return Err(self.sources.diag(
                                b.span,
                                "only operations may stand in a parallel group",
                                Some("put `expect` lines after the group's `}`".into()),
                            ))
                        }
                    }
                }
                self.syms.end_group();
                Ok(Some(Node::Parallel(name.text.clone(), steps)))
            }
            StmtKind::Call(call) => match call.verb.text.as_str() {
                "machine" => {
                    self.machine_stmt(s.span, call)?;
                    Ok(None)
                }
                "device" => {
                    self.device_stmt(call)?;
                    Ok(None)
                }
                _ => {
                    self.machine_or_default()?;
                    Ok(Some(Node::Step(self.call(s.span, call)?)))
                }
            },
        }
    }

    fn machine_stmt(&mut self, span: Span, call: &lang::Call) -> Result<(), Diag> {
        if self.machine.is_some() {
            return Err(self.sources.diag(
                call.verb.span,
                "the machine is already set: `machine` must come once, before any device or step",
                None,
            ));
        }
        let a = bind_args(
            &self.sources,
            &call.verb,
            MACHINE_PARAMS,
            &call.args,
            &self.syms,
        )?;
        let (topology, source) = match (a.text("preset"), a.text("topology")) {
            (Some(_), Some(_)) | (None, None) => {
                return Err(self.sources.diag(
                    call.verb.span,
                    "`machine` needs one of preset=NAME or topology=FILE",
                    Some(format!(
                        "presets: {}",
                        crate::fabric::PRESETS.map(|p| p.0).join(", ")
                    )),
                ))
            }
            (Some(p), None) => {
                let t = crate::fabric::preset_shared(&p).map_err(|e| {
                    self.sources.diag(
                        a.span("preset").unwrap_or(span),
                        e.to_string(),
                        nearest(&p, crate::fabric::PRESETS.iter().map(|p| p.0))
                            .map(|n| format!("did you mean `{n}`?")),
                    )
                })?;
                (t, p)
            }
            (None, Some(f)) => {
                let base = self
                    .sources
                    .files
                    .get(span.file as usize)
                    .and_then(|s| Path::new(&s.path).parent().map(Path::to_path_buf))
                    .unwrap_or_default();
                let path = base.join(&f);
                let at = a.span("topology").unwrap_or(span);
                let text = lang::read_capped(&path).map_err(|e| {
                    self.sources
                        .diag(at, format!("cannot read {}: {e}", path.display()), None)
                })?;
                let t = crate::fabric::import::file::parse(&path.display().to_string(), &text)
                    .map_err(|e| self.sources.diag(at, e.to_string(), None))?;
                (Arc::new(t), f)
            }
        };
        let ram = a.num("ram", 256 << 20);
        if !(16 << 20..=64 << 30).contains(&ram) {
            return Err(self.sources.diag(
                a.span("ram").unwrap_or(span),
                "ram must be between 16M and 64G",
                None,
            ));
        }
        self.machine = Some(MachineSpec {
            topology,
            source,
            ram,
            iommu: a.get("iommu").map(|_| a.bool("iommu", false)),
        });
        Ok(())
    }

    /// "models: nvme, gpu, ...", for hints.
    fn model_names(&self) -> String {
        let names: Vec<&str> = self.vocab.models().map(|m| m.name).collect();
        format!("models: {}", names.join(", "))
    }

    fn device_stmt(&mut self, call: &lang::Call) -> Result<(), Diag> {
        let machine = self.machine_or_default()?;
        let (Some(name), Some(model)) = (call.args.first(), call.args.get(1)) else {
            return Err(self.sources.diag(
                call.verb.span,
                "`device` needs a name and a model: device NAME MODEL [at=BDF] ...",
                Some(self.model_names()),
            ));
        };
        if name.key.is_some() || !is_name(&name.value.text) {
            return Err(self
                .sources
                .diag(name.value.span, "`device` needs a name first", None));
        }
        self.syms.check_new(&self.sources, &name.value)?;
        let m = self
            .vocab
            .get_model(&model.value.text)
            .copied()
            .ok_or_else(|| {
                self.sources.diag(
                    model.value.span,
                    format!("unknown device model `{}`", model.value.text),
                    Some(self.model_names()),
                )
            })?;
        let mut params: Vec<Param> = m.params.to_vec();
        if m.class.is_some() {
            params.push(Param::opt(
                "at",
                Ty::Text,
                "the function (BDF); default: the next free one of the model's class",
            ));
        }
        let rest = &call.args[2..];
        let a = bind_args(&self.sources, &model.value, &params, rest, &self.syms)?;
        if let Some(Err((param, why))) = m.check.map(|c| c(&a)) {
            let span = a.span(param).unwrap_or(model.value.span);
            return Err(self.sources.diag(span, why, None));
        }
        let bdf = match m.class {
            None => None,
            Some(class) => Some(self.pick_bdf(&machine.topology, class, &a, &model.value)?),
        };
        if let Some(b) = bdf {
            self.taken.push(b);
        }
        let span = name.value.span;
        self.syms_define(&name.value.text, SymKind::Device(m.name), span);
        self.models.insert(name.value.text.clone(), m);
        self.devices.push(DeviceDecl {
            name: name.value.text.clone(),
            model: m,
            bdf,
            args: a,
        });
        Ok(())
    }

    fn syms_define(&mut self, name: &str, kind: SymKind, span: Span) {
        let tok = Tok {
            text: name.into(),
            span,
        };
        let mut cx = Compile {
            args: Args::default(),
            actor: None,
            bind: None,
            verb: &tok,
            sources: &self.sources,
            syms: &mut self.syms,
        };
        cx.define(name, kind);
    }

    fn pick_bdf(
        &self,
        topo: &Topology,
        class: DeviceClass,
        a: &Args,
        at: &Tok,
    ) -> Result<Bdf, Diag> {
        let span = a.span("at").unwrap_or(at.span);
        if let Some(t) = a.text("at") {
            let f = topo.function(
                topo.find(&t)
                    .map_err(|e| self.sources.diag(span, e.to_string(), None))?,
            );
            if f.kind != PortKind::Endpoint {
                return Err(self.sources.diag(
                    span,
                    format!("{} is a {:?}, not an endpoint", f.bdf, f.kind),
                    None,
                ));
            }
            if self.taken.contains(&f.bdf) {
                return Err(self.sources.diag(
                    span,
                    format!("{} has a device model already", f.bdf),
                    None,
                ));
            }
            return Ok(f.bdf);
        }
        topo.functions()
            .iter()
            .filter(|f| f.kind == PortKind::Endpoint && f.device_class() == class)
            .map(|f| f.bdf)
            .find(|b| !self.taken.contains(b))
            .ok_or_else(|| {
                self.sources.diag(
                    at.span,
                    format!("the machine has no free {class:?} endpoint for this device"),
                    Some("give at=BDF, or pick a machine with more of them".into()),
                )
            })
    }

    fn call(&mut self, span: Span, call: &lang::Call) -> Result<Planned, Diag> {
        let def: StepDef = *self.vocab.get(&call.verb.text).ok_or_else(|| {
            let hint = if self.vocab.get_model(&call.verb.text).is_some() {
                Some(format!("to declare one: device NAME {}", call.verb.text))
            } else {
                self.vocab
                    .nearest(&call.verb.text)
                    .map(|n| format!("did you mean `{n}`?"))
            };
            self.sources.diag(
                call.verb.span,
                format!("unknown operation `{}`", call.verb.text),
                hint,
            )
        })?;
        match (def.actor, &call.actor) {
            (ActorUse::Required, None) => {
                return Err(self.sources.diag(
                    call.verb.span,
                    format!("`{}` runs in a process: write `P: {}`", def.verb, def.verb),
                    None,
                ))
            }
            (ActorUse::None, Some(a)) => {
                return Err(self.sources.diag(
                    a.span,
                    format!("`{}` does not run in a process", def.verb),
                    Some("drop the `P:` prefix".into()),
                ))
            }
            (_, Some(a)) => self.syms.check_use(&self.sources, a, SymKind::Process)?,
            _ => {}
        }
        match (def.binds, &call.bind) {
            (None, Some(b)) => {
                return Err(self.sources.diag(
                    b.span,
                    format!("`{}` makes nothing to name", def.verb),
                    None,
                ))
            }
            (Some(_), None) => {
                return Err(self.sources.diag(
                    call.verb.span,
                    format!(
                        "`{}` makes something: name it, `NAME = {} ...`",
                        def.verb, def.verb
                    ),
                    None,
                ))
            }
            (Some(_), Some(b)) => self.syms.check_new(&self.sources, b)?,
            _ => {}
        }
        let args = bind_args(
            &self.sources,
            &call.verb,
            def.params,
            &call.args,
            &self.syms,
        )?;
        let mut cx = Compile {
            args,
            actor: call.actor.as_ref().map(|t| t.text.clone()),
            bind: call.bind.as_ref().map(|t| t.text.clone()),
            verb: &call.verb,
            sources: &self.sources,
            syms: &mut self.syms,
        };
        // New names among the arguments, then the bind.
        for p in def.params {
            if let (Ty::New(k), Some(crate::scenario::vocab::Val::Name(n))) =
                (p.ty, cx.args.get(p.name).cloned())
            {
                cx.define(&n, k);
            }
        }
        let run = (def.compile)(&mut cx)?;
        if let (Some(k), Some(b)) = (def.binds, &call.bind) {
            cx.define(&b.text, k);
        }
        let checks = self.checks(&call.checks, Some(&def))?;
        Ok(Planned {
            span,
            text: line_text(&self.lines, span),
            verb: def.verb,
            outputs: def.outputs,
            run,
            checks,
        })
    }

    fn checks(&mut self, checks: &[Check], def: Option<&StepDef>) -> Result<Vec<CheckPlan>, Diag> {
        let mut out = Vec::new();
        for c in checks {
            let key = c.key.text.as_str();
            let what = match (&c.cmp, def) {
                (None, Some(_)) if key == "ok" => Expect::Ok,
                (None, Some(_)) if key == "error" => Expect::AnyError,
                (None, Some(_)) if key == "any" => Expect::Either,
                (None, Some(_)) if parse_errno(key).is_some() => {
                    Expect::Errno(parse_errno(key).unwrap_or(Errno::EINVAL))
                }
                (None, _) => {
                    return Err(self.sources.diag(
                        c.key.span,
                        format!("`{key}` is not a check"),
                        Some(if def.is_some() {
                            "a check is ok, error, any, an errno name (EFAULT), or KEY=VALUE".into()
                        } else {
                            "a check here compares a counter: KEY=VALUE, KEY>=VALUE...".into()
                        }),
                    ))
                }
                (Some((op, v)), _) => self.compare(c, *op, v, def)?,
            };
            if matches!(&what, Expect::Counter(k, ..) if k == "violations") {
                self.counts_violations = true;
            }
            out.push(CheckPlan {
                what,
                span: c.key.span,
                text: match &c.cmp {
                    Some((op, v)) => format!("{}{}{}", c.key.text, op.as_str(), v.text),
                    None => c.key.text.clone(),
                },
            });
        }
        let outcome_checks = out
            .iter()
            .filter(|c| {
                matches!(
                    c.what,
                    Expect::Ok | Expect::AnyError | Expect::Either | Expect::Errno(_)
                )
            })
            .count();
        if outcome_checks > 1 {
            return Err(self.sources.diag(
                checks[0].key.span,
                "more than one of ok / error / any / ERRNO in one expect",
                None,
            ));
        }
        Ok(out)
    }

    fn compare(&self, c: &Check, op: Op, v: &Tok, def: Option<&StepDef>) -> Result<Expect, Diag> {
        let key = c.key.text.as_str();
        let num = |t: &Tok| -> Result<u64, Diag> {
            parse_size(&t.text).map_err(|e| self.sources.diag(t.span, e, None))
        };
        if let Some(d) = def {
            if key == "pattern" || key == "fill" {
                if !d.data {
                    return Err(self.sources.diag(
                        c.key.span,
                        format!("`{}` reads no data to compare", d.verb),
                        None,
                    ));
                }
                if op != Op::Eq {
                    return Err(self.sources.diag(
                        c.key.span,
                        format!("{key} compares with `=`"),
                        None,
                    ));
                }
                let n = num(v)?;
                return Ok(if key == "pattern" {
                    Expect::Pattern(n)
                } else if n > 255 {
                    return Err(self.sources.diag(v.span, "fill is a byte (0..255)", None));
                } else {
                    Expect::Fill(n as u8)
                });
            }
            if let Some(i) = d.outputs.iter().position(|o| *o == key) {
                return Ok(Expect::Output(i, d.outputs[i], op, num(v)?));
            }
        }
        if HOST_COUNTERS.iter().any(|(k, _)| *k == key) {
            return Ok(Expect::Counter(key.to_string(), op, num(v)?));
        }
        if let Some((dev, counter)) = key.split_once('.') {
            if let Some(m) = self.models.get(dev) {
                if m.counters.contains(&counter) {
                    return Ok(Expect::Counter(key.to_string(), op, num(v)?));
                }
                return Err(self.sources.diag(
                    c.key.span,
                    format!("a {} has no counter `{counter}`", m.name),
                    Some(format!("its counters: {}", m.counters.join(", "))),
                ));
            }
        }
        let mut known: Vec<&str> = def.map(|d| d.outputs.to_vec()).unwrap_or_default();
        if def.is_some_and(|d| d.data) {
            known.extend(["pattern", "fill"]);
        }
        known.extend(HOST_COUNTERS.iter().map(|(k, _)| *k));
        Err(self.sources.diag(
            c.key.span,
            match def {
                Some(d) => format!(
                    "`{key}` is neither something `{}` reports nor a counter",
                    d.verb
                ),
                None => format!("`{key}` is not a counter"),
            },
            Some(match nearest(key, known.iter().copied()) {
                Some(n) => format!("did you mean `{n}`?"),
                None => format!("known here: {}", known.join(", ")),
            }),
        ))
    }
}

/// One step as it ran.
#[derive(Clone, Debug, Serialize)]
pub struct StepRecord {
    /// Its line.
    pub line: u32,
    /// Its text.
    pub text: String,
    /// The operation.
    pub op: String,
    /// The parallel group it ran in.
    pub group: Option<String>,
    /// `ok` or the error's name.
    pub result: String,
    /// The error's message.
    pub error: Option<String>,
    /// What it reported.
    pub values: BTreeMap<String, u64>,
    /// Checks made (all passed unless this is the failing step).
    pub checks: usize,
    /// Microseconds it took.
    pub micros: u64,
}

/// The first expectation that did not hold.
#[derive(Clone, Debug, Serialize)]
pub struct Mismatch {
    /// File.
    pub file: String,
    /// Line.
    pub line: u32,
    /// Column of the check (or the step).
    pub col: u32,
    /// The step's text.
    pub step: String,
    /// What was expected.
    pub expected: String,
    /// What happened.
    pub got: String,
}

/// What a scenario run did.
#[derive(Clone, Debug, Serialize)]
pub struct ScenarioReport {
    /// Always [`SCHEMA`].
    pub schema: &'static str,
    /// Whether the IOMMU was on.
    pub iommu: bool,
    /// The scenario file.
    pub scenario: String,
    /// The machine.
    pub machine: String,
    /// Device models bound, `name model bdf`.
    pub devices: Vec<String>,
    /// Steps in the order they finished (a group's steps in text order).
    pub steps: Vec<StepRecord>,
    /// Checks that held.
    pub checks_passed: usize,
    /// The first that did not, if any.
    pub mismatch: Option<Mismatch>,
    /// What the host still held after the teardown, when not clean.
    pub leaks: Option<String>,
    /// DMA sanitizer reports.
    pub violations: Vec<String>,
    /// DMA bytes by path over the run.
    pub dma: crate::dma::DmaStats,
    /// The same per device that does DMA.
    pub device_dma: Vec<DeviceDma>,
    /// Whether every expectation held and nothing leaked.
    pub passed: bool,
}

/// One device's DMA over a run.
#[derive(Clone, Debug, Serialize)]
pub struct DeviceDma {
    /// Its name in the scenario.
    pub name: String,
    /// Its model.
    pub model: String,
    /// Its function.
    pub bdf: Option<String>,
    /// Bytes by path and mapping counts.
    pub stats: crate::dma::DmaStats,
}

/// Why a plan could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The host did not come up.
    #[error("building the machine: {0}")]
    Host(#[from] crate::host::HostError),
    /// A device model could not attach.
    #[error("device `{name}`: {why}")]
    Attach {
        /// The device.
        name: String,
        /// Why.
        why: String,
    },
}

impl Plan {
    /// The scenario's main file.
    pub fn path(&self) -> &str {
        self.sources
            .files
            .first()
            .map_or("<scenario>", |f| f.path.as_str())
    }

    /// Builds the machine and runs every step.
    pub fn run(&self) -> Result<ScenarioReport, RunError> {
        let m = &self.machine;
        let specs: Vec<DeviceSpec> = self
            .devices
            .iter()
            .filter_map(|d| Some((d.model.spec?)(&m.topology, &d.args, d.bdf?)))
            .collect();
        let host = Host::build_shared(
            m.topology.clone(),
            &HostConfig {
                ram_bytes: m.ram,
                iommu: m.iommu,
            },
            &specs,
        )?;
        let mut devs = BTreeMap::new();
        let mut names = Vec::new();
        for d in &self.devices {
            let dev = (d.model.attach)(&host, &d.args, d.bdf).map_err(|why| RunError::Attach {
                name: d.name.clone(),
                why,
            })?;
            names.push(match d.bdf {
                Some(b) => format!("{} {} {b}", d.name, d.model.name),
                None => format!("{} {}", d.name, d.model.name),
            });
            devs.insert(
                d.name.clone(),
                DevSlot {
                    dev,
                    removed: crate::sync::atomic::AtomicBool::new(false),
                },
            );
        }
        let iommu = host.dma().iommu().enabled();
        let rt = Runtime {
            host,
            devs,
            procs: Mutex::new(HashMap::new()),
            regions: Mutex::new(HashMap::new()),
            handles: Mutex::new(HashMap::new()),
            made: crate::sync::atomic::AtomicU64::new(0),
        };
        let mut report = ScenarioReport {
            schema: SCHEMA,
            scenario: self.path().to_string(),
            machine: m.source.clone(),
            iommu,
            devices: names,
            steps: Vec::new(),
            checks_passed: 0,
            mismatch: None,
            leaks: None,
            violations: Vec::new(),
            dma: Default::default(),
            device_dma: Vec::new(),
            passed: false,
        };
        let mut seen_violations = 0;
        with_group_runner(self, &rt, |groups: &mut dyn RunGroup<'_>| {
            for node in &self.nodes {
                let r = match node {
                    Node::Step(p) => {
                        let (rec, res) = self.run_step(&rt, p, None);
                        report.steps.push(rec);
                        res
                    }
                    Node::Expect(span, text, checks) => {
                        self.check_all(&rt, *span, text, checks, &Ok(Outcome::default()), None)
                    }
                    Node::Parallel(name, steps) => {
                        let results = groups.run(name, steps);
                        let mut first = Ok(0);
                        for (rec, res) in results {
                            report.steps.push(rec);
                            match (res, &first) {
                                (Ok(n), Ok(k)) => first = Ok(k + n),
                                (Err(e), Ok(_)) => first = Err(e),
                                _ => {}
                            }
                        }
                        first
                    }
                };
                let r = match (r, node) {
                    (Ok(n), Node::Step(p)) if self.sanitizer_each_step => {
                        // A new report fails the step unless the step expects it (checks
                        // the `violations` counter itself).
                        let v = rt.host.dma().sanitizer().violations();
                        let expected = p.checks.iter().any(
                            |c| matches!(&c.what, Expect::Counter(k, ..) if k == "violations"),
                        );
                        match v.get(seen_violations) {
                            Some(new) if !expected => Err(self.mismatch(
                                p.span,
                                &p.text,
                                "no DMA sanitizer report",
                                &new.to_string(),
                            )),
                            _ => {
                                seen_violations = v.len();
                                Ok(n)
                            }
                        }
                    }
                    (r, _) => r,
                };
                let r = match r {
                    // An `expect` line changes nothing: the audit after the step before
                    // it stands.
                    Ok(n) if self.audit_each_step && !matches!(node, Node::Expect(..)) => {
                        match rt.host.frame_audit() {
                            Ok(_) => Ok(n),
                            Err(f) => {
                                let (span, text) = node.site();
                                Err(self.mismatch(
                                    span,
                                    text,
                                    "every frame's references held by its mappings, pins and owner",
                                    &f.to_string(),
                                ))
                            }
                        }
                    }
                    r => r,
                };
                match r {
                    Ok(n) => report.checks_passed += n,
                    Err(m) => {
                        report.mismatch = Some(m);
                        break;
                    }
                }
            }
        });
        // Teardown: every process exits, every handle drops, then nothing may be held.
        let procs: Vec<Arc<ProcSlot>> = rt
            .procs
            .lock()
            .map(|mut t| t.drain().map(|(_, p)| p).collect())
            .unwrap_or_default();
        for p in procs {
            p.exit();
        }
        let mut held: Vec<Held> = rt
            .handles
            .lock()
            .map(|mut h| h.drain().map(|(_, v)| v).collect())
            .unwrap_or_default();
        held.sort_by_key(|h| std::cmp::Reverse(h.0));
        for h in held {
            drop(h);
        }
        rt.host.exit_all();
        report.violations = rt
            .host
            .dma()
            .sanitizer()
            .violations()
            .iter()
            .map(|v| v.to_string())
            .collect();
        report.dma = rt.host.dma().stats();
        report.device_dma = self
            .devices
            .iter()
            .filter_map(|d| {
                let dev = &rt.devs.get(&d.name)?.dev;
                Some(DeviceDma {
                    name: d.name.clone(),
                    model: d.model.name.to_string(),
                    bdf: dev.bdf.map(|b| b.to_string()),
                    stats: dev.dma.as_ref()?.stats(),
                })
            })
            .collect();
        let q = rt.host.quiescent();
        if report.mismatch.is_none() {
            if !q.is_clean() {
                report.leaks = Some(q.to_string());
            }
            if !report.violations.is_empty() && !self.counts_violations {
                report.mismatch = Some(Mismatch {
                    file: self.path().to_string(),
                    line: 0,
                    col: 0,
                    step: "(end of scenario)".into(),
                    expected: "no DMA sanitizer reports".into(),
                    got: report.violations.join("; "),
                });
            }
        }
        report.passed = report.mismatch.is_none() && report.leaks.is_none();
        Ok(report)
    }

    fn mismatch(&self, span: Span, step: &str, expected: &str, got: &str) -> Mismatch {
        Mismatch {
            file: self
                .sources
                .files
                .get(span.file as usize)
                .map_or_else(String::new, |f| f.path.clone()),
            line: span.line,
            col: span.col,
            step: step.to_string(),
            expected: expected.to_string(),
            got: got.to_string(),
        }
    }

    fn run_step(
        &self,
        rt: &Runtime,
        p: &Planned,
        group: Option<&str>,
    ) -> (StepRecord, Result<usize, Mismatch>) {
        let t0 = Instant::now();
        let res = (p.run)(rt);
        let micros = t0.elapsed().as_micros() as u64;
        let def = p.outputs;
        let mut rec = StepRecord {
            line: p.span.line,
            text: p.text.clone(),
            op: p.verb.to_string(),
            group: group.map(str::to_string),
            result: match &res {
                Ok(_) => "ok".into(),
                Err(f) => f.errno.map_or("failed".into(), |e| e.name().to_string()),
            },
            error: res.as_ref().err().map(|f| f.message.clone()),
            values: BTreeMap::new(),
            checks: p.checks.len(),
            micros,
        };
        if let Ok(o) = &res {
            for (k, v) in def.iter().zip(&o.values) {
                rec.values.insert((*k).to_string(), *v);
            }
        }
        let r = self.check_all(rt, p.span, &p.text, &p.checks, &res, Some(p));
        (rec, r)
    }

    fn check_all(
        &self,
        rt: &Runtime,
        span: Span,
        text: &str,
        checks: &[CheckPlan],
        res: &StepResult,
        step: Option<&Planned>,
    ) -> Result<usize, Mismatch> {
        let at = |c: &CheckPlan, expected: String, got: String| {
            let mut m = self.mismatch(span, text, &expected, &got);
            m.col = c.span.col;
            m
        };
        let wants_outcome = checks.iter().any(|c| {
            matches!(
                c.what,
                Expect::Ok | Expect::AnyError | Expect::Either | Expect::Errno(_)
            )
        });
        if step.is_some() && !wants_outcome {
            if let Err(f) = res {
                return Err(self.mismatch(span, text, "success", &describe(f)));
            }
        }
        for c in checks {
            match (&c.what, res) {
                (Expect::Ok, Err(f)) => return Err(at(c, "success".into(), describe(f))),
                (Expect::AnyError, Ok(_)) => {
                    return Err(at(c, "an error".into(), "success".into()))
                }
                (Expect::Errno(e), Ok(_)) => return Err(at(c, e.name().into(), "success".into())),
                (Expect::Errno(e), Err(f)) if f.errno != Some(*e) => {
                    return Err(at(c, e.name().into(), describe(f)))
                }
                (Expect::Ok | Expect::AnyError | Expect::Either | Expect::Errno(_), _) => {}
                // Counters are the host's: they are checked whatever the step returned.
                (Expect::Counter(key, op, want), _) => {
                    let got = rt.counter(key, &self.models).unwrap_or(0);
                    if !op.holds(got, *want) {
                        return Err(at(c, c.text.clone(), format!("{key}={got}")));
                    }
                }
                (_, Err(f)) => {
                    return Err(at(
                        c,
                        c.text.clone(),
                        format!("the step failed: {}", describe(f)),
                    ))
                }
                (Expect::Pattern(seed), Ok(o)) => {
                    let Some((data, base)) = &o.data else {
                        return Err(at(c, c.text.clone(), "no data".into()));
                    };
                    let mut want = vec![0u8; data.len()];
                    pattern_fill(*seed, *base, &mut want);
                    if let Some(i) = data.iter().zip(&want).position(|(a, b)| a != b) {
                        return Err(at(
                            c,
                            format!(
                                "pattern {seed}: byte {:#x} at offset {:#x}",
                                want[i],
                                base + i as u64
                            ),
                            format!("{:#x}{}", data[i], guess(data, i)),
                        ));
                    }
                }
                (Expect::Fill(b), Ok(o)) => {
                    let Some((data, base)) = &o.data else {
                        return Err(at(c, c.text.clone(), "no data".into()));
                    };
                    if let Some(i) = data.iter().position(|x| x != b) {
                        return Err(at(
                            c,
                            format!("every byte {b:#x}"),
                            format!(
                                "{:#x} at offset {:#x}{}",
                                data[i],
                                base + i as u64,
                                guess(data, i)
                            ),
                        ));
                    }
                }
                (Expect::Output(i, name, op, want), Ok(o)) => {
                    let got = o.values.get(*i).copied().unwrap_or(0);
                    if !op.holds(got, *want) {
                        return Err(at(c, c.text.clone(), format!("{name}={got}")));
                    }
                }
            }
        }
        Ok(checks.len())
    }
}

fn describe(f: &Failure) -> String {
    match f.errno {
        Some(e) => format!("{} ({})", e.name(), f.message),
        None => f.message.clone(),
    }
}

/// A word on what the bytes at `i` look like instead.
fn guess(data: &[u8], i: usize) -> String {
    let run = data[i..].iter().take_while(|&&x| x == data[i]).count();
    if run > 1 {
        format!(" ({run} bytes of {:#x} from there)", data[i])
    } else {
        String::new()
    }
}

impl StepRecord {
    fn panicked(p: &Planned, group: &str) -> StepRecord {
        StepRecord {
            line: p.span.line,
            text: p.text.clone(),
            op: p.verb.to_string(),
            group: Some(group.to_string()),
            result: "panicked".into(),
            error: None,
            values: BTreeMap::new(),
            checks: 0,
            micros: 0,
        }
    }
}

impl ScenarioReport {
    /// The report as text: one line per step, then the verdict.
    pub fn text(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "scenario {} on {} (IOMMU {})",
            self.scenario,
            self.machine,
            if self.iommu { "on" } else { "off" }
        );
        for d in &self.devices {
            let _ = writeln!(out, "  device {d}");
        }
        for s in &self.steps {
            let vals: Vec<String> = s.values.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let _ = writeln!(
                out,
                "  {:>4}  {:<9} {}{}{}",
                s.line,
                s.result,
                s.group
                    .as_ref()
                    .map_or(String::new(), |g| format!("[{g}] ")),
                s.text,
                if vals.is_empty() {
                    String::new()
                } else {
                    format!("  -> {}", vals.join(" "))
                }
            );
        }
        let d = &self.dma;
        let _ = writeln!(
            out,
            "DMA bytes: {} through a common bridge, {} through the host bridge, {} system RAM, {} within a device",
            d.via_switch, d.via_host_bridge, d.host_ram, d.same_device
        );
        match (&self.mismatch, &self.leaks) {
            (Some(m), _) => {
                let _ = writeln!(
                    out,
                    "FAILED at {}:{}:{}: {}\n  expected: {}\n  got:      {}",
                    m.file, m.line, m.col, m.step, m.expected, m.got
                );
            }
            (None, Some(l)) => {
                let _ = writeln!(
                    out,
                    "FAILED: the host still holds, after every process exited:\n{l}"
                );
            }
            (None, None) => {
                let _ = writeln!(
                    out,
                    "passed: {} checks, {} steps; nothing leaked",
                    self.checks_passed,
                    self.steps.len()
                );
            }
        }
        out
    }
}

/// How long a removal waits for users before it gives up.
pub const REMOVE_TIMEOUT: Duration = Duration::from_secs(5);

/// One step's record and result, as a `parallel` group returns them.
type GroupResult = (StepRecord, Result<usize, Mismatch>);

/// Runs the steps of `parallel` groups at once: every step but the last on a helper
/// thread, the last on the caller's, all released together by a barrier.
trait RunGroup<'env> {
    /// Runs `steps` of group `name`; their results in order.
    fn run(&mut self, name: &'env str, steps: &'env [Planned]) -> Vec<GroupResult>;
}

impl Plan {
    /// A step that panicked: a mismatch at it, naming the group.
    fn panicked_step(&self, p: &Planned, group: &str) -> GroupResult {
        (
            StepRecord::panicked(p, group),
            Err(self.mismatch(p.span, &p.text, "no panic", "the step panicked")),
        )
    }

    /// Runs one step of group `group`, a panic in it made a mismatch.
    fn run_group_step(&self, rt: &Runtime, p: &Planned, group: &str) -> GroupResult {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.run_step(rt, p, Some(group))
        }))
        .unwrap_or_else(|_| self.panicked_step(p, group))
    }
}

/// Calls `f` with the runner of `plan`'s groups. Outside shuttle the helper threads
/// live as long as the run and take one group after another (a campaign runs
/// thousands of groups, and starting a thread for each cost more than the steps);
/// under shuttle every group spawns its tasks, which shuttle schedules.
#[cfg(not(feature = "shuttle"))]
fn with_group_runner<'env, R>(
    plan: &'env Plan,
    rt: &'env Runtime,
    f: impl FnOnce(&mut dyn RunGroup<'env>) -> R,
) -> R {
    std::thread::scope(|scope| {
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let mut pool = Helpers {
            scope,
            plan,
            rt,
            workers: Vec::new(),
            done_tx,
            done_rx,
        };
        f(&mut pool)
        // The pool drops here: its channels close, its helpers return, the scope
        // joins them.
    })
}

/// A group step handed to a helper.
#[cfg(not(feature = "shuttle"))]
struct Job<'env> {
    index: usize,
    step: &'env Planned,
    group: &'env str,
    barrier: Arc<crate::sync::Barrier>,
}

/// The helper threads of one run.
#[cfg(not(feature = "shuttle"))]
struct Helpers<'scope, 'env> {
    scope: &'scope std::thread::Scope<'scope, 'env>,
    plan: &'env Plan,
    rt: &'env Runtime,
    workers: Vec<std::sync::mpsc::Sender<Job<'env>>>,
    done_tx: std::sync::mpsc::Sender<(usize, GroupResult)>,
    done_rx: std::sync::mpsc::Receiver<(usize, GroupResult)>,
}

#[cfg(not(feature = "shuttle"))]
impl<'env> Helpers<'_, 'env> {
    /// A new helper thread, and the sender of its jobs.
    fn spawn(&self) -> std::sync::mpsc::Sender<Job<'env>> {
        let (tx, rx) = std::sync::mpsc::channel::<Job<'env>>();
        let done = self.done_tx.clone();
        let (plan, rt) = (self.plan, self.rt);
        self.scope.spawn(move || {
            for job in rx {
                job.barrier.wait();
                let r = plan.run_group_step(rt, job.step, job.group);
                if done.send((job.index, r)).is_err() {
                    break;
                }
            }
        });
        tx
    }
}

#[cfg(not(feature = "shuttle"))]
impl<'env> RunGroup<'env> for Helpers<'_, 'env> {
    fn run(&mut self, name: &'env str, steps: &'env [Planned]) -> Vec<GroupResult> {
        let Some((last, others)) = steps.split_last() else {
            return Vec::new();
        };
        while self.workers.len() < others.len() {
            let tx = self.spawn();
            self.workers.push(tx);
        }
        let barrier = Arc::new(crate::sync::Barrier::new(steps.len()));
        for (index, step) in others.iter().enumerate() {
            let mut job = Job {
                index,
                step,
                group: name,
                barrier: barrier.clone(),
            };
            // A helper ends only when the run drops its results' receiver, so this
            // cannot fail; were one gone, a fresh one takes the job, or the barrier
            // would wait for it forever.
            while let Err(std::sync::mpsc::SendError(back)) = self.workers[index].send(job) {
                self.workers[index] = self.spawn();
                job = back;
            }
        }
        barrier.wait();
        let mine = self.plan.run_group_step(self.rt, last, name);
        let mut got: Vec<Option<GroupResult>> = others.iter().map(|_| None).collect();
        for _ in others {
            match self.done_rx.recv() {
                Ok((i, r)) => got[i] = Some(r),
                Err(_) => break,
            }
        }
        let mut all: Vec<GroupResult> = got
            .into_iter()
            .zip(others)
            .map(|(r, p)| r.unwrap_or_else(|| self.plan.panicked_step(p, name)))
            .collect();
        all.push(mine);
        all
    }
}

#[cfg(feature = "shuttle")]
fn with_group_runner<'env, R>(
    plan: &'env Plan,
    rt: &'env Runtime,
    f: impl FnOnce(&mut dyn RunGroup<'env>) -> R,
) -> R {
    f(&mut Spawning { plan, rt })
}

/// Under shuttle: the tasks of each group spawned for it.
#[cfg(feature = "shuttle")]
struct Spawning<'env> {
    plan: &'env Plan,
    rt: &'env Runtime,
}

#[cfg(feature = "shuttle")]
impl<'env> RunGroup<'env> for Spawning<'env> {
    fn run(&mut self, name: &'env str, steps: &'env [Planned]) -> Vec<GroupResult> {
        let Some((last, others)) = steps.split_last() else {
            return Vec::new();
        };
        let (plan, rt) = (self.plan, self.rt);
        let barrier = crate::sync::Barrier::new(steps.len());
        crate::sync::thread::scope(|s| {
            let hs: Vec<_> = others
                .iter()
                .map(|p| {
                    let barrier = &barrier;
                    s.spawn(move || {
                        barrier.wait();
                        plan.run_step(rt, p, Some(name))
                    })
                })
                .collect();
            barrier.wait();
            let mine = plan.run_group_step(rt, last, name);
            let mut all: Vec<GroupResult> = hs
                .into_iter()
                .zip(others)
                .map(|(h, p)| h.join().unwrap_or_else(|_| plan.panicked_step(p, name)))
                .collect();
            all.push(mine);
            all
        })
    }
}

#[cfg(test)]
mod tests {
    use super::pattern_fill;

    #[test]
    fn a_pattern_depends_on_the_region_offset_only() {
        // Any slice of the pattern equals the same offsets of the whole.
        let mut whole = vec![0u8; 4096];
        pattern_fill(7, 0, &mut whole);
        for (start, len) in [(0, 1), (3, 5), (5, 17), (8, 8), (4000, 96)] {
            let mut part = vec![0u8; len];
            pattern_fill(7, start as u64, &mut part);
            assert_eq!(part, whole[start..start + len], "at {start}+{len}");
        }
        let mut other = vec![0u8; 4096];
        pattern_fill(8, 0, &mut other);
        assert_ne!(whole, other, "the seed matters");
        // Not a constant: a fill would pass a pattern check otherwise.
        assert!(whole.windows(2).any(|w| w[0] != w[1]));
    }
}
