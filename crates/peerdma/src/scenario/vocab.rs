//! The scenario vocabulary: the operations (`StepDef`) and device models (`ModelDef`)
//! a scenario may name, each declared with its parameters, what it binds and what it
//! reports. The language ([`super::lang`]) knows none of them; each layer or device model
//! contributes its own words in a `register` function ([`super::steps`]), and
//! [`Vocabulary::standard`] calls those. Argument checking is generic: a definition
//! states its parameters' types, and every call is checked against them — arity,
//! unknown keys, sizes, flag names, errno names — before anything runs.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::errno::Errno;
use crate::scenario::lang::{Arg, Diag, Sources, Span, Tok};
use crate::scenario::run::{Runtime, StepResult};

/// Largest size a scenario may write: 1 TiB.
pub const MAX_SIZE: u64 = 1 << 40;
/// Largest count (LBAs, pages, milliseconds).
pub const MAX_COUNT: u64 = 1 << 32;

/// What kind of thing a name stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SymKind {
    /// A process.
    Process,
    /// A range of virtual addresses (valid in every process that maps it).
    Region,
    /// A device of a model.
    Device(&'static str),
    /// A handle an operation returned: a pin, a file, a buffer object, an MR.
    Handle(&'static str),
}

impl SymKind {
    fn describe(self) -> String {
        match self {
            SymKind::Process => "a process".into(),
            SymKind::Region => "a mapped region".into(),
            SymKind::Device(m) => format!("a {m} device"),
            SymKind::Handle(h) => format!("a {h}"),
        }
    }
}

/// A parameter's type.
#[derive(Clone, Copy, Debug)]
pub enum Ty {
    /// Bytes: `4096`, `0x1000`, `4K`, `2M`, `1G` (at most [`MAX_SIZE`]).
    Size,
    /// A plain count (at most [`MAX_COUNT`]).
    Count,
    /// A byte value, `0`..`255` or `0x00`..`0xff`.
    Byte,
    /// A seed.
    Seed,
    /// One of a list of words.
    Word(&'static [&'static str]),
    /// Comma-separated words from a list (`longterm,write`).
    Flags(&'static [&'static str]),
    /// `yes`/`no`, `on`/`off`, `true`/`false`.
    Bool,
    /// A new name, bound to what the step makes.
    New(SymKind),
    /// An existing name of this kind.
    Ref(SymKind),
    /// A place in a region: `NAME` or `NAME+OFFSET`.
    Place,
    /// Free text (a file name).
    Text,
}

/// One parameter of an operation.
#[derive(Clone, Copy, Debug)]
pub struct Param {
    /// Its name (the key of `key=value`; positional arguments fill parameters in order).
    pub name: &'static str,
    /// Its type.
    pub ty: Ty,
    /// Whether a call must give it.
    pub required: bool,
    /// One line for the docs and for hints.
    pub help: &'static str,
}

impl Param {
    /// A required parameter.
    pub const fn req(name: &'static str, ty: Ty, help: &'static str) -> Param {
        Param {
            name,
            ty,
            required: true,
            help,
        }
    }
    /// An optional parameter.
    pub const fn opt(name: &'static str, ty: Ty, help: &'static str) -> Param {
        Param {
            name,
            ty,
            required: false,
            help,
        }
    }
}

/// Whether an operation runs in a process (`a: verb ...`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActorUse {
    /// It must.
    Required,
    /// It must not.
    None,
}

/// A checked argument value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Val {
    /// A size, count, byte or seed.
    Num(u64),
    /// A word of a [`Ty::Word`] list.
    Word(&'static str),
    /// Words of a [`Ty::Flags`] list.
    Flags(Vec<&'static str>),
    /// A yes/no.
    Bool(bool),
    /// A name (new or existing).
    Name(String),
    /// A region and an offset into it.
    Place(String, u64),
    /// Free text.
    Text(String),
}

/// A call's arguments, checked against its parameters.
#[derive(Clone, Debug, Default)]
pub struct Args {
    vals: BTreeMap<&'static str, (Val, Span)>,
}

impl Args {
    /// The value of `name`, if given.
    pub fn get(&self, name: &str) -> Option<&Val> {
        self.vals.get(name).map(|v| &v.0)
    }
    /// Where `name` was given.
    pub fn span(&self, name: &str) -> Option<Span> {
        self.vals.get(name).map(|v| v.1)
    }
    /// A number (size, count, byte, seed) or `default`.
    pub fn num(&self, name: &str, default: u64) -> u64 {
        match self.get(name) {
            Some(Val::Num(n)) => *n,
            _ => default,
        }
    }
    /// A word or `default`.
    pub fn word(&self, name: &str, default: &'static str) -> &'static str {
        match self.get(name) {
            Some(Val::Word(w)) => w,
            _ => default,
        }
    }
    /// Flags (none when absent).
    pub fn flags(&self, name: &str) -> Vec<&'static str> {
        match self.get(name) {
            Some(Val::Flags(f)) => f.clone(),
            _ => Vec::new(),
        }
    }
    /// A yes/no or `default`.
    pub fn bool(&self, name: &str, default: bool) -> bool {
        match self.get(name) {
            Some(Val::Bool(b)) => *b,
            _ => default,
        }
    }
    /// A name (empty when absent; required names are always present).
    pub fn name(&self, name: &str) -> String {
        match self.get(name) {
            Some(Val::Name(n)) => n.clone(),
            _ => String::new(),
        }
    }
    /// A place: region name and offset.
    pub fn place(&self, name: &str) -> (String, u64) {
        match self.get(name) {
            Some(Val::Place(r, o)) => (r.clone(), *o),
            _ => (String::new(), 0),
        }
    }
    /// Free text.
    pub fn text(&self, name: &str) -> Option<String> {
        match self.get(name) {
            Some(Val::Text(t)) => Some(t.clone()),
            _ => None,
        }
    }
}

/// What a compiled step does when it runs.
pub type StepFn = Box<dyn Fn(&Runtime) -> StepResult + Send + Sync>;

/// An operation a scenario may use.
#[derive(Clone, Copy)]
pub struct StepDef {
    /// The word that names it (`mmap`, `nvme.read`).
    pub verb: &'static str,
    /// One line for the docs.
    pub help: &'static str,
    /// Whether it runs in a process.
    pub actor: ActorUse,
    /// What `name = verb ...` binds, when the step makes something.
    pub binds: Option<SymKind>,
    /// Its parameters, positional ones first.
    pub params: &'static [Param],
    /// The values it reports, which `expect` may compare.
    pub outputs: &'static [&'static str],
    /// Whether its result carries bytes (`expect pattern=` / `fill=`).
    pub data: bool,
    /// Checks names and builds the step; may add or retire names.
    pub compile: fn(&mut Compile<'_>) -> Result<StepFn, Diag>,
}

impl std::fmt::Debug for StepDef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.verb)
    }
}

/// A device model a scenario may declare with `device NAME MODEL ...`.
#[derive(Clone, Copy)]
pub struct ModelDef {
    /// Its name (`nvme`, `gpu`).
    pub name: &'static str,
    /// One line for the docs.
    pub help: &'static str,
    /// The PCI class it binds to when `at=` is not given (`None`: not a PCI function).
    pub class: Option<crate::fabric::DeviceClass>,
    /// Its parameters (besides `at=`).
    pub params: &'static [Param],
    /// Counters `expect NAME.counter` may compare.
    pub counters: &'static [&'static str],
    /// The device spec a host binds at build, for PCI models.
    pub spec:
        Option<fn(&crate::fabric::Topology, &Args, crate::addr::Bdf) -> crate::host::DeviceSpec>,
    /// The object steps use, once the host is built.
    pub attach: fn(&crate::host::Host, &Args, Option<crate::addr::Bdf>) -> Result<Dev, String>,
    /// Checks the arguments together, before anything runs: the parameter at fault and
    /// why (`None`: any value of the right type will do).
    pub check: Option<ArgsCheck>,
}

impl std::fmt::Debug for ModelDef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

/// A device model's check of its arguments taken together: the parameter at fault and
/// why.
pub type ArgsCheck = fn(&Args) -> Result<(), (&'static str, String)>;

/// How a device model is hot-removed.
pub type RemoveFn =
    Box<dyn Fn(&crate::host::Host) -> Result<(), crate::scenario::run::Failure> + Send + Sync>;

/// A device as the runtime holds it: the model's object, how to read its counters and
/// how to remove it.
pub struct Dev {
    /// Its function, for PCI models.
    pub bdf: Option<crate::addr::Bdf>,
    /// Its DMA handle, for models that do DMA (`dma_sg DEV` maps for it).
    pub dma: Option<crate::dma::DmaDevice>,
    /// The model's object (`Arc<Nvme>`, `Arc<Gpu>`...).
    pub obj: std::sync::Arc<dyn std::any::Any + Send + Sync>,
    /// Its counters, in [`ModelDef::counters`] order.
    pub counters: Box<dyn Fn() -> Vec<u64> + Send + Sync>,
    /// Hot removal.
    pub remove: RemoveFn,
}

/// Host-wide counters `expect` may compare, with what each counts.
pub const HOST_COUNTERS: &[(&str, &str)] = &[
    ("pinned", "frames holding a DMA pin, all regions"),
    ("frames", "frames in use, all regions"),
    ("ram_frames", "system RAM frames in use"),
    ("mappings", "live DMA mapping segments, all devices"),
    ("iova_pages", "IOVA pages allocated, all IOMMU domains"),
    (
        "subscriptions",
        "interval-notifier subscriptions on live address spaces",
    ),
    ("processes", "processes running"),
    ("violations", "DMA sanitizer reports"),
    ("p2p_bytes", "bytes allocated from p2p memory pools"),
    (
        "bytes.switch",
        "DMA bytes to peer memory through a common bridge",
    ),
    (
        "bytes.host_bridge",
        "DMA bytes to peer memory through the host bridge",
    ),
    ("bytes.ram", "DMA bytes to or from system RAM"),
    ("bytes.same_device", "DMA bytes within one device"),
];

/// Every word a scenario may use.
#[derive(Clone, Debug, Default)]
pub struct Vocabulary {
    steps: BTreeMap<&'static str, StepDef>,
    models: BTreeMap<&'static str, ModelDef>,
}

impl Vocabulary {
    /// The layers' and device models' words.
    pub fn standard() -> Vocabulary {
        let mut v = Vocabulary::default();
        crate::scenario::steps::register(&mut v);
        v
    }
    /// Adds an operation; a second definition of a verb replaces the first.
    pub fn step(&mut self, def: StepDef) {
        self.steps.insert(def.verb, def);
    }
    /// Adds a device model.
    pub fn model(&mut self, def: ModelDef) {
        self.models.insert(def.name, def);
    }
    /// The operation `verb`.
    pub fn get(&self, verb: &str) -> Option<&StepDef> {
        self.steps.get(verb)
    }
    /// The model `name`.
    pub fn get_model(&self, name: &str) -> Option<&ModelDef> {
        self.models.get(name)
    }
    /// Every operation, by verb.
    pub fn steps(&self) -> impl Iterator<Item = &StepDef> {
        self.steps.values()
    }
    /// Every model, by name.
    pub fn models(&self) -> impl Iterator<Item = &ModelDef> {
        self.models.values()
    }

    /// The closest verb to `word`, for a "did you mean" hint.
    pub fn nearest(&self, word: &str) -> Option<&'static str> {
        nearest(word, self.steps.keys().copied())
    }

    /// The vocabulary as a markdown reference (docs/scenario.md embeds it; a test
    /// keeps the two equal).
    pub fn reference(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "### Device models\n");
        for m in self.models.values() {
            let _ = writeln!(out, "- `device NAME {}` — {}", m.name, m.help);
            for p in m.params {
                let _ = writeln!(out, "  - `{}`: {}", p.name, p.help);
            }
            if !m.counters.is_empty() {
                let c: Vec<String> = m.counters.iter().map(|c| format!("`NAME.{c}`")).collect();
                let _ = writeln!(out, "  - counters: {}", c.join(", "));
            }
        }
        let _ = writeln!(out, "\n### Operations\n");
        for s in self.steps.values() {
            let mut sig = String::new();
            if s.actor == ActorUse::Required {
                sig.push_str("P: ");
            }
            if let Some(b) = s.binds {
                let _ = write!(sig, "{} = ", bind_word(b));
            }
            sig.push_str(s.verb);
            for p in s.params {
                if p.required {
                    let _ = write!(sig, " {}", p.name.to_uppercase());
                } else {
                    let _ = write!(sig, " [{}=]", p.name);
                }
            }
            let _ = writeln!(out, "- `{}` — {}", sig.trim_end(), s.help);
            for p in s.params {
                let _ = writeln!(out, "  - `{}`: {}", p.name, p.help);
            }
            if !s.outputs.is_empty() {
                let o: Vec<String> = s.outputs.iter().map(|o| format!("`{o}`")).collect();
                let _ = writeln!(out, "  - reports: {}", o.join(", "));
            }
        }
        let _ = writeln!(out, "\n### Host counters\n");
        for (c, what) in HOST_COUNTERS {
            let _ = writeln!(out, "- `{c}`: {what}");
        }
        out
    }
}

fn bind_word(k: SymKind) -> &'static str {
    match k {
        SymKind::Process => "PROC",
        SymKind::Region => "REGION",
        SymKind::Device(_) => "DEV",
        SymKind::Handle(_) => "HANDLE",
    }
}

/// The candidate closest to `word` by edit distance, when close enough to be a typo.
pub fn nearest<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .map(|c| (strsim::levenshtein(word, c), c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min()
        .map(|(_, c)| c)
}

/// One name's state while a scenario is checked.
#[derive(Clone, Debug)]
struct Sym {
    kind: SymKind,
    defined: Span,
    gone: Option<(Span, &'static str)>,
    /// The parallel group that bound it, when inside one.
    group: Option<String>,
}

/// The names a scenario has bound so far, checked in text order.
#[derive(Clone, Debug, Default)]
pub struct Symbols {
    syms: BTreeMap<String, Sym>,
    /// The parallel group being checked.
    pub group: Option<String>,
    /// Names a step of the open group retired: gone once the group ends, since its
    /// other steps run at the same time.
    pending: Vec<(String, Span, &'static str)>,
}

/// One call being checked: its text, its checked arguments and the symbol table.
pub struct Compile<'a> {
    /// The call's arguments.
    pub args: Args,
    /// The process it runs in.
    pub actor: Option<String>,
    /// The name its result binds.
    pub bind: Option<String>,
    /// The verb's token.
    pub verb: &'a Tok,
    pub(crate) sources: &'a Sources,
    pub(crate) syms: &'a mut Symbols,
}

impl Compile<'_> {
    /// An error at argument `param` (or at the verb when it was not given).
    pub fn err(&self, param: &str, message: impl Into<String>, hint: Option<String>) -> Diag {
        let span = self.args.span(param).unwrap_or(self.verb.span);
        self.sources.diag(span, message, hint)
    }
    /// Marks name `param` (a handle or region) as gone from here on (`unpin`, `munmap`
    /// of the whole region, `exit`).
    pub fn retire(&mut self, name: &str, why: &'static str) {
        if self.syms.group.is_some() {
            self.syms
                .pending
                .push((name.to_string(), self.verb.span, why));
        } else if let Some(s) = self.syms.syms.get_mut(name) {
            s.gone = Some((self.verb.span, why));
        }
    }
    /// Binds `name` as `kind` here.
    pub fn define(&mut self, name: &str, kind: SymKind) {
        let sym = Sym {
            kind,
            defined: self.verb.span,
            gone: None,
            group: self.syms.group.clone(),
        };
        self.syms.syms.insert(name.to_string(), sym);
    }
    /// The model of device `name`.
    pub fn device_model(&self, name: &str) -> Option<&'static str> {
        match self.syms.syms.get(name).map(|s| s.kind) {
            Some(SymKind::Device(m)) => Some(m),
            _ => None,
        }
    }
}

impl Symbols {
    /// Closes the open parallel group: what its steps retired is gone from here on.
    pub(crate) fn end_group(&mut self) {
        self.group = None;
        for (name, at, why) in std::mem::take(&mut self.pending) {
            if let Some(s) = self.syms.get_mut(&name) {
                s.gone = Some((at, why));
            }
        }
    }

    pub(crate) fn check_use(
        &self,
        sources: &Sources,
        tok: &Tok,
        want: SymKind,
    ) -> Result<(), Diag> {
        let Some(sym) = self.syms.get(&tok.text) else {
            let similar = nearest(
                &tok.text,
                self.syms
                    .iter()
                    .filter(|(_, s)| kind_matches(s.kind, want))
                    .map(|(n, _)| n.as_str()),
            );
            return Err(sources.diag(
                tok.span,
                format!(
                    "`{}` is not defined; {} is needed here",
                    tok.text,
                    want.describe()
                ),
                similar.map(|s| format!("did you mean `{s}`?")),
            ));
        };
        if !kind_matches(sym.kind, want) {
            return Err(sources.diag(
                tok.span,
                format!(
                    "`{}` is {} (line {}), but {} is needed here",
                    tok.text,
                    sym.kind.describe(),
                    sym.defined.line,
                    want.describe()
                ),
                None,
            ));
        }
        if let Some((at, why)) = sym.gone {
            return Err(sources.diag(
                tok.span,
                format!("`{}` was {why} on line {}", tok.text, at.line),
                None,
            ));
        }
        if sym.group.is_some() && sym.group == self.group {
            return Err(sources.diag(
                tok.span,
                format!(
                    "`{}` is bound in the same parallel group `{}`, whose steps run at once",
                    tok.text,
                    sym.group.clone().unwrap_or_default()
                ),
                Some("use it after the group's `}`".into()),
            ));
        }
        Ok(())
    }

    pub(crate) fn check_new(&self, sources: &Sources, tok: &Tok) -> Result<(), Diag> {
        if let Some(sym) = self.syms.get(&tok.text) {
            if sym.gone.is_none() {
                return Err(sources.diag(
                    tok.span,
                    format!(
                        "`{}` is already {} (line {})",
                        tok.text,
                        sym.kind.describe(),
                        sym.defined.line
                    ),
                    Some("pick another name".into()),
                ));
            }
        }
        Ok(())
    }
}

fn kind_matches(have: SymKind, want: SymKind) -> bool {
    match (have, want) {
        (SymKind::Device(a), SymKind::Device(b)) => a == b || b == "any",
        (SymKind::Handle(a), SymKind::Handle(b)) => a == b || b == "any",
        (a, b) => a == b,
    }
}

/// Parses a size: decimal or `0x` hex, with an optional `K`, `M`, `G`, `T` suffix
/// (powers of two; `KiB` and `KB` read the same).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (digits, mult) = match t.find(|c: char| c.is_ascii_alphabetic() && c != 'x' && c != 'X') {
        Some(i) if !t.starts_with("0x") && !t.starts_with("0X") => {
            let mult: u64 = match t[i..].to_ascii_uppercase().as_str() {
                "K" | "KB" | "KIB" => 1 << 10,
                "M" | "MB" | "MIB" => 1 << 20,
                "G" | "GB" | "GIB" => 1 << 30,
                "T" | "TB" | "TIB" => 1 << 40,
                "B" => 1,
                other => return Err(format!("unknown size suffix `{other}` (K, M, G, T)")),
            };
            (&t[..i], mult)
        }
        _ => (t, 1),
    };
    let n = if let Some(h) = digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        u64::from_str_radix(h, 16)
    } else {
        digits.parse::<u64>()
    }
    .map_err(|_| format!("`{s}` is not a size (4096, 0x1000, 4K, 2M, 1G)"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("`{s}` does not fit in 64 bits"))
}

fn parse_num(s: &str) -> Result<u64, String> {
    if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(h, 16)
    } else {
        s.parse::<u64>()
    }
    .map_err(|_| format!("`{s}` is not a number"))
}

/// Parses an errno name (`EFAULT`).
pub fn parse_errno(s: &str) -> Option<Errno> {
    Errno::ALL.iter().copied().find(|e| e.name() == s)
}

/// Checks a call's arguments against `params`: positional ones fill the parameters in
/// order, `key=value` ones by name; every value is parsed by its type.
pub(crate) fn bind_args(
    sources: &Sources,
    verb: &Tok,
    params: &[Param],
    raw: &[Arg],
    syms: &Symbols,
) -> Result<Args, Diag> {
    let mut out = Args::default();
    let mut next_pos = 0usize;
    let names = || params.iter().map(|p| p.name).collect::<Vec<_>>().join(", ");
    for a in raw {
        let param = match &a.key {
            Some(k) => params.iter().find(|p| p.name == k.text).ok_or_else(|| {
                let near = nearest(&k.text, params.iter().map(|p| p.name));
                sources.diag(
                    k.span,
                    format!("`{}` takes no argument `{}`", verb.text, k.text),
                    Some(match near {
                        Some(n) => format!("did you mean `{n}`? it takes: {}", names()),
                        None if params.is_empty() => "it takes no arguments".into(),
                        None => format!("it takes: {}", names()),
                    }),
                )
            })?,
            None => {
                // Positional arguments fill the required parameters in order; optional
                // ones are always given as key=value.
                while next_pos < params.len()
                    && (out.vals.contains_key(params[next_pos].name) || !params[next_pos].required)
                {
                    next_pos += 1;
                }
                let p = params.get(next_pos).ok_or_else(|| {
                    let required: Vec<&str> = params
                        .iter()
                        .filter(|p| p.required)
                        .map(|p| p.name)
                        .collect();
                    sources.diag(
                        a.value.span,
                        format!(
                            "too many arguments: `{}` takes {} by position ({})",
                            verb.text,
                            required.len(),
                            required.join(", ")
                        ),
                        (!params.is_empty()).then(|| {
                            format!("give the others as key=value; it takes: {}", names())
                        }),
                    )
                })?;
                next_pos += 1;
                p
            }
        };
        let span = a.key.as_ref().map_or(a.value.span, |k| Span {
            len: k.span.len + 1 + a.value.span.len,
            ..k.span
        });
        if out.vals.contains_key(param.name) {
            return Err(sources.diag(span, format!("`{}` is given twice", param.name), None));
        }
        let v = value(sources, &a.value, param, syms)?;
        out.vals.insert(param.name, (v, a.value.span));
    }
    if let Some(missing) = params
        .iter()
        .find(|p| p.required && !out.vals.contains_key(p.name))
    {
        let end = raw.last().map_or(verb.span, |a| a.value.span);
        return Err(sources.diag(
            Span {
                col: end.col + end.len,
                len: 1,
                ..end
            },
            format!(
                "`{}` needs `{}` ({})",
                verb.text, missing.name, missing.help
            ),
            Some(format!("it takes: {}", names())),
        ));
    }
    Ok(out)
}

fn value(sources: &Sources, t: &Tok, p: &Param, syms: &Symbols) -> Result<Val, Diag> {
    let bad = |m: String, hint: Option<String>| sources.diag(t.span, m, hint);
    let s = t.text.as_str();
    Ok(match p.ty {
        Ty::Size => {
            let n = parse_size(s).map_err(|e| bad(format!("{}: {e}", p.name), None))?;
            if n > MAX_SIZE {
                return Err(bad(
                    format!(
                        "{}: {s} is larger than the 1 TiB a scenario may use",
                        p.name
                    ),
                    None,
                ));
            }
            Val::Num(n)
        }
        Ty::Count | Ty::Seed => {
            let n = parse_num(s).map_err(|e| bad(format!("{}: {e}", p.name), None))?;
            if matches!(p.ty, Ty::Count) && n > MAX_COUNT {
                return Err(bad(format!("{}: {s} is too large", p.name), None));
            }
            Val::Num(n)
        }
        Ty::Byte => {
            let n = parse_num(s).map_err(|e| bad(format!("{}: {e}", p.name), None))?;
            if n > 255 {
                return Err(bad(format!("{}: {s} is not a byte (0..255)", p.name), None));
            }
            Val::Num(n)
        }
        Ty::Word(list) => Val::Word(list.iter().copied().find(|w| *w == s).ok_or_else(|| {
            bad(
                format!("{}: `{s}` is not one of {}", p.name, list.join(", ")),
                nearest(s, list.iter().copied()).map(|n| format!("did you mean `{n}`?")),
            )
        })?),
        Ty::Flags(list) => {
            let mut out = Vec::new();
            for f in s.split([',', '|']).filter(|f| !f.is_empty()) {
                let f = f.to_ascii_lowercase();
                let w = list.iter().copied().find(|w| *w == f).ok_or_else(|| {
                    bad(
                        format!(
                            "{}: unknown flag `{f}` (known: {})",
                            p.name,
                            list.join(", ")
                        ),
                        nearest(&f, list.iter().copied()).map(|n| format!("did you mean `{n}`?")),
                    )
                })?;
                out.push(w);
            }
            Val::Flags(out)
        }
        Ty::Bool => Val::Bool(match s {
            "yes" | "on" | "true" | "1" => true,
            "no" | "off" | "false" | "0" => false,
            _ => return Err(bad(format!("{}: `{s}` is not yes/no", p.name), None)),
        }),
        Ty::New(_) => {
            if !is_name(s) {
                return Err(bad(
                    format!("`{s}` is not a name (letters, digits, _)"),
                    None,
                ));
            }
            syms.check_new(sources, t)?;
            Val::Name(s.to_string())
        }
        Ty::Ref(kind) => {
            syms.check_use(sources, t, kind)?;
            Val::Name(s.to_string())
        }
        Ty::Place => {
            let (name, off) = match s.split_once('+') {
                Some((n, o)) => (
                    n,
                    parse_size(o).map_err(|e| bad(format!("offset: {e}"), None))?,
                ),
                None => (s, 0),
            };
            let nt = Tok {
                text: name.to_string(),
                span: Span {
                    len: name.chars().count().max(1) as u32,
                    ..t.span
                },
            };
            syms.check_use(sources, &nt, SymKind::Region)?;
            Val::Place(name.to_string(), off)
        }
        Ty::Text => Val::Text(s.to_string()),
    })
}

/// Whether `s` can name something.
pub fn is_name(s: &str) -> bool {
    let mut c = s.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
}
