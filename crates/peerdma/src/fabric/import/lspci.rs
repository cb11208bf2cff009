//! Reading the tree that `lspci -tv` or `lspci -tvnn` prints (pciutils' ls-tree.c).
//!
//! The text gives the tree, each bridge's bus range and each function's name (and with
//! `-nn` its `[vendor:device]`); it carries no class codes, ACS, NUMA, links or BARs, so
//! a topology read from it says so in its gaps. Functions that have children, or a bus
//! range, are bridges; the class of the others is guessed from the name only to pick a
//! `--class` bucket.
//!
//! The format, as ls-tree.c draws it: a bridge prints `-`, then its one bus directly or
//! several as `+-[DDDD:BB]-` / `\-[DDDD:BB]-` branches; a bus prints `--DEV` for one
//! device or `+-DEV` ... `\-DEV` for several, siblings on later lines in the same
//! column with `|` drawn above them; a device prints `DD.F`, then for a bridge
//! `-[SS-UU]-` (or `-[SS]-`) and its own bus, else two spaces and the name.

use crate::addr::{Bdf, BusId};
use crate::fabric::error::FabricError;
use crate::fabric::import::lspci_verbose;
use crate::fabric::model::{
    validate, BusRange, Function, FunctionSpec, Gaps, HostBridge, HostInfo, Topology,
};

/// What a column's connector continues on later lines.
#[derive(Clone, Copy, Debug)]
enum Open {
    /// More devices of one bus: (domain, bus, parent bridge).
    Bus(u32, u8, Option<Bdf>),
    /// More buses of one bridge (the host bridge when `None`).
    Buses(Option<Bdf>),
}

struct Parser<'a> {
    source: &'a str,
    line_no: usize,
    line: &'a [u8],
    specs: Vec<FunctionSpec>,
    roots: Vec<BusId>,
    /// Columns whose `+-` promised more branches, with the line that opened each.
    open: Vec<(usize, Open, usize)>,
}

/// Reads `lspci -tv` / `-tvnn` text, `lspci -vvv` / `-vvvnn` text, or both of one
/// machine one after the other. `source` names it in errors (`-` for stdin).
///
/// With the tree, functions sit where it draws them; with `-vvv` text alone, where the
/// bridges' bus numbers put them (a function whose bus no bridge opens hangs below the
/// narrowest bridge whose range holds it, as pciutils' ls-tree does, else on a root
/// bus). `-vvv` text adds classes, port types, BARs, links, ACS, NUMA nodes and IOMMU
/// groups to the functions it lists.
pub fn parse(source: &str, text: &str) -> Result<Topology, FabricError> {
    let (tree_lines, blocks) = sort_lines(text);
    if tree_lines.is_empty() && blocks.is_empty() {
        return Err(FabricError::Lspci {
            source_name: source.to_string(),
            line: 1,
            column: 1,
            reason: "no lspci text: expected the tree of `lspci -tv` (a line starting with \
                     `-[0000:00]-` or `-+-[0000:00]-`) or the blocks of `lspci -vvv`"
                .to_string(),
        });
    }
    if tree_lines.is_empty() && blocks.iter().all(|(_, d)| d.is_empty()) {
        return Err(FabricError::Lspci {
            source_name: source.to_string(),
            line: blocks[0].0 .0,
            column: 1,
            reason: "this is plain `lspci` output, a line per function without the tree or \
                     bus numbers; give `lspci -tv` (or `lspci -tvnn`, which adds the IDs), \
                     `sudo lspci -vvvnn`, or both"
                .to_string(),
        });
    }
    let tree = if tree_lines.is_empty() {
        None
    } else {
        Some(parse_tree(source, &tree_lines)?)
    };
    let blocks = blocks
        .iter()
        .map(|(h, d)| lspci_verbose::parse_block(source, *h, d))
        .collect::<Result<Vec<_>, _>>()?;
    let (specs, roots, mut gaps) = match tree {
        Some((specs, roots)) if blocks.is_empty() => (specs, roots, tree_gaps()),
        tree => merge(source, tree, blocks)?,
    };
    let mut roots: Vec<BusId> = roots;
    roots.sort();
    roots.dedup();
    // A host bridge's node is that of the functions on its root bus.
    let host_bridges = roots
        .into_iter()
        .map(|root| HostBridge {
            root,
            numa_node: specs
                .iter()
                .filter(|s| {
                    s.parent.is_none()
                        && s.function.bdf.domain() == root.domain
                        && s.function.bdf.bus() == root.bus
                })
                .find_map(|s| s.function.numa_node),
        })
        .collect();
    gaps.notes.dedup();
    Topology::build(
        format!("lspci {source}"),
        HostInfo::default(),
        host_bridges,
        specs,
        gaps,
    )
}

/// What `lspci -tv` text alone cannot say.
fn tree_gaps() -> Gaps {
    Gaps {
        acs_unknown: 0,
        numa_unknown: true,
        cpu_unknown: true,
        notes: vec![
            "lspci -tv text carries the tree and names only: ACS, NUMA nodes, links, BARs and \
             the CPU are unknown, so bus-address verdicts are uncertain (`sudo lspci -vvvnn` \
             text, given with it, adds them)"
                .to_string(),
        ],
        kernel_unread: Vec::new(),
        acs_hint: "`lspci -tv` text carries no ACS state; add `sudo lspci -vvv` text of the \
                   same machine, or take a sysfs snapshot as root",
    }
}

/// Lines with their 1-based numbers.
type Lines<'a> = Vec<(usize, &'a str)>;
/// A `-vvv` block: its header line and its indented lines.
type RawBlock<'a> = ((usize, &'a str), Lines<'a>);

/// Sorts the lines of a text into the tree's and the `-vvv` blocks' (header, indented
/// lines), each with its 1-based line number. pciutils' own warnings are dropped.
fn sort_lines(text: &str) -> (Lines<'_>, Vec<RawBlock<'_>>) {
    let mut tree = Vec::new();
    let mut blocks: Vec<RawBlock<'_>> = Vec::new();
    let mut in_block = false;
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let line = raw.trim_end();
        if line.trim().is_empty() || line.starts_with("pcilib:") {
            continue;
        }
        let indented = line.starts_with([' ', '\t']);
        if !indented && lspci_verbose::is_header(line) {
            blocks.push(((n, line), Vec::new()));
            in_block = true;
            continue;
        }
        let drawing = matches!(line.trim_start().chars().next(), Some('|' | '+' | '\\'));
        if indented && in_block && !drawing {
            if let Some((_, d)) = blocks.last_mut() {
                d.push((n, line));
            }
            continue;
        }
        in_block = false;
        tree.push((n, raw));
    }
    (tree, blocks)
}

/// Joins the `-vvv` blocks with the tree (or, without one, places them by bus numbers).
fn merge(
    source: &str,
    tree: Option<(Vec<FunctionSpec>, Vec<BusId>)>,
    blocks: Vec<lspci_verbose::Block>,
) -> Result<(Vec<FunctionSpec>, Vec<BusId>, Gaps), FabricError> {
    let mut notes = Vec::new();
    let denied = blocks.iter().filter(|b| b.denied).count();
    let any_numa = blocks.iter().any(|b| b.numa);
    let no_ids = blocks.iter().filter(|b| !b.ids).count();
    let mut seen = std::collections::HashMap::new();
    for b in &blocks {
        if let Some(first) = seen.insert(b.spec.function.bdf, b.line) {
            return Err(FabricError::Lspci {
                source_name: source.to_string(),
                line: b.line,
                column: 1,
                reason: format!(
                    "{} is listed again (first at line {first})",
                    b.spec.function.bdf
                ),
            });
        }
    }
    let (mut specs, roots) = match tree {
        Some((tree_specs, roots)) => {
            let mut by_bdf: std::collections::HashMap<Bdf, lspci_verbose::Block> = blocks
                .into_iter()
                .map(|b| (b.spec.function.bdf, b))
                .collect();
            let mut specs = Vec::with_capacity(tree_specs.len());
            let mut bare = 0usize;
            for t in tree_specs {
                let Some(b) = by_bdf.remove(&t.function.bdf) else {
                    bare += 1;
                    specs.push(t);
                    continue;
                };
                let (tb, vb) = (t.function.buses, b.spec.function.buses);
                if tb.is_some() && tb != vb {
                    return Err(FabricError::Lspci {
                        source_name: source.to_string(),
                        line: b.line,
                        column: 1,
                        reason: format!(
                            "the tree gives {} buses {}, this block {}: are the two texts of \
                             the same machine?",
                            t.function.bdf,
                            tb.map_or("none".to_string(), |r| r.to_string()),
                            vb.map_or("none".to_string(), |r| r.to_string()),
                        ),
                    });
                }
                let mut f = b.spec.function;
                if f.name.is_empty() {
                    f.name = t.function.name;
                }
                notes.extend(validate::drop_impossible(&mut f));
                specs.push(FunctionSpec {
                    function: f,
                    parent: t.parent,
                    kind_known: b.spec.kind_known,
                });
            }
            if let Some(b) = by_bdf.values().min_by_key(|b| b.line) {
                return Err(FabricError::Lspci {
                    source_name: source.to_string(),
                    line: b.line,
                    column: 1,
                    reason: format!(
                        "{} is not in the tree: are the two texts of the same machine?",
                        b.spec.function.bdf
                    ),
                });
            }
            if bare > 0 {
                notes.push(format!(
                    "{bare} functions of the tree have no `lspci -vvv` block: their class, \
                     ACS and links are unknown"
                ));
            }
            (specs, roots)
        }
        None => {
            let mut specs: Vec<FunctionSpec> = blocks.into_iter().map(|b| b.spec).collect();
            for s in &mut specs {
                notes.extend(validate::drop_impossible(&mut s.function));
            }
            let roots = place_by_bus_numbers(&mut specs);
            (specs, roots)
        }
    };
    specs.sort_by_key(|s| s.function.bdf);
    if denied > 0 {
        notes.push(format!(
            "ACS could not be read for {denied} functions: lspci printed `Capabilities: \
             <access denied>` (it was run without root)"
        ));
    }
    if no_ids > 0 {
        notes.push(format!(
            "{no_ids} functions have no [vendor:device] IDs: give `lspci -vvvnn` so that the \
             host bridge allowlist can be applied"
        ));
    }
    notes.push("lspci text does not give the CPU: the AMD Zen rule cannot be applied".into());
    let gaps = Gaps {
        kernel_unread: Vec::new(),
        acs_unknown: 0,
        numa_unknown: !any_numa,
        cpu_unknown: true,
        notes,
        acs_hint: if denied > 0 {
            "lspci was run without root: `sudo lspci -vvv` prints the ACS bits"
        } else {
            "this lspci text does not show the ACS bits: `sudo lspci -vvv` prints them"
        },
    };
    Ok((specs, roots, gaps))
}

/// Places functions with no tree, as pciutils' ls-tree does from config space: below the
/// bridge that opens their bus; else below the narrowest bridge whose range holds it (a
/// bridge between them is missing); else on a root bus, which is returned.
fn place_by_bus_numbers(specs: &mut [FunctionSpec]) -> Vec<BusId> {
    let bridges: Vec<(Bdf, BusRange)> = specs
        .iter()
        .filter_map(|s| Some((s.function.bdf, s.function.buses?)))
        .collect();
    let mut roots = Vec::new();
    for s in specs.iter_mut() {
        let (domain, bus) = (s.function.bdf.domain(), s.function.bdf.bus());
        let same = |b: &&(Bdf, BusRange)| b.0.domain() == domain && b.0 != s.function.bdf;
        if bridges.iter().filter(same).any(|(_, r)| r.secondary == bus) {
            continue;
        }
        match bridges
            .iter()
            .filter(same)
            .filter(|(_, r)| r.contains(bus))
            .min_by_key(|(_, r)| r.subordinate - r.secondary)
        {
            Some((p, _)) => s.parent = Some(*p),
            None => roots.push(BusId { domain, bus }),
        }
    }
    roots
}

/// Reads the tree part of the text.
fn parse_tree(
    source: &str,
    lines: &[(usize, &str)],
) -> Result<(Vec<FunctionSpec>, Vec<BusId>), FabricError> {
    let mut p = Parser {
        source,
        line_no: 0,
        line: b"",
        specs: Vec::new(),
        roots: Vec::new(),
        open: Vec::new(),
    };
    let mut started = false;
    for &(n, raw) in lines {
        p.line_no = n;
        p.line = raw.trim_end().as_bytes();
        if p.line.is_empty() {
            continue;
        }
        if !started {
            started = true;
            p.expect(0, b'-')?;
            p.bridge_body(0, None, 0)?;
            continue;
        }
        let col = p
            .line
            .iter()
            .position(|&c| c != b' ' && c != b'|')
            .ok_or_else(|| p.err(1, "a line of only tree drawing"))?;
        let Some(pos) = p.open.iter().rposition(|(c, _, _)| *c == col) else {
            return Err(p.err(
                col,
                "this branch does not continue any open bus or bridge above it",
            ));
        };
        // lspci ends every group of branches with `\-`: one still open to the right
        // was left unfinished, so lines are missing above this one.
        if let Some(&(c, _, line)) = p.open.get(pos + 1) {
            return Err(p.err(
                col,
                &format!(
                    "the branch opened with `+-` at line {line}, column {} never ends with \
                     `\\-`: lines are missing above this one",
                    c + 1
                ),
            ));
        }
        let (_, ctx, _) = p.open[pos];
        let last = match p.line[col] {
            b'+' => false,
            b'\\' => true,
            _ => return Err(p.err(col, "expected `+-` or `\\-` to continue the branch")),
        };
        if last {
            p.open.pop();
        }
        p.expect(col + 1, b'-')?;
        match ctx {
            Open::Bus(domain, bus, parent) => {
                p.device(col + 2, domain, bus, parent)?;
            }
            Open::Buses(parent) => {
                p.bus_header(col + 2, parent)?;
            }
        }
    }
    if !started {
        return Err(FabricError::Lspci {
            source_name: source.to_string(),
            line: 1,
            column: 1,
            reason: "no lspci tree: expected a line starting with `-[0000:00]-` or `-+-[0000:00]-`"
                .to_string(),
        });
    }
    if let Some(&(c, _, line)) = p.open.last() {
        return Err(FabricError::Lspci {
            source_name: source.to_string(),
            line: p.line_no,
            column: 1,
            reason: format!(
                "the text ends inside the tree: the branch opened with `+-` at line {line}, \
                 column {} never ends with `\\-` (is the text cut short?)",
                c + 1
            ),
        });
    }
    Ok((p.specs, p.roots))
}

impl Parser<'_> {
    fn err(&self, col: usize, reason: &str) -> FabricError {
        FabricError::Lspci {
            source_name: self.source.to_string(),
            line: self.line_no,
            column: col + 1,
            reason: reason.to_string(),
        }
    }

    fn at(&self, col: usize) -> Option<u8> {
        self.line.get(col).copied()
    }

    fn expect(&self, col: usize, c: u8) -> Result<(), FabricError> {
        if self.at(col) == Some(c) {
            Ok(())
        } else {
            Err(self.err(col, &format!("expected `{}`", c as char)))
        }
    }

    /// After a bridge's `-` at `col - 1`... `col` is the column of that `-`.
    fn bridge_body(
        &mut self,
        col: usize,
        parent: Option<Bdf>,
        domain: u32,
    ) -> Result<(), FabricError> {
        let next = col + 1;
        match self.at(next) {
            None => Ok(()), // a bridge with no bus at all
            Some(b'[') if parent.is_none() => self.bus_header(next, None),
            Some(b'+') | Some(b'\\') if self.at(next + 2) == Some(b'[') => {
                if self.at(next) == Some(b'+') {
                    self.open.push((next, Open::Buses(parent), self.line_no));
                }
                self.expect(next + 1, b'-')?;
                self.bus_header(next + 2, parent)
            }
            Some(_) => {
                let Some(bridge) = parent else {
                    return Err(self.err(next, "expected `[DDDD:BB]` after the host bridge"));
                };
                let bus = self
                    .specs
                    .iter()
                    .rev()
                    .find(|s| s.function.bdf == bridge)
                    .and_then(|s| s.function.buses)
                    .map(|r| r.secondary)
                    .ok_or_else(|| {
                        self.err(next, "a bridge without a bus range has devices below it")
                    })?;
                self.bus(next, domain, bus, Some(bridge))
            }
        }
    }

    /// `[DDDD:BB]-` then the bus.
    fn bus_header(&mut self, col: usize, parent: Option<Bdf>) -> Result<(), FabricError> {
        self.expect(col, b'[')?;
        let close = self.line[col..]
            .iter()
            .position(|&c| c == b']')
            .map(|p| col + p)
            .ok_or_else(|| self.err(col, "unterminated `[DDDD:BB]`"))?;
        let text = std::str::from_utf8(&self.line[col + 1..close]).unwrap_or("");
        let id: BusId = text
            .parse()
            .map_err(|_| self.err(col + 1, &format!("`{text}` is not a DDDD:BB bus")))?;
        self.expect(close + 1, b'-')?;
        if parent.is_none() {
            self.roots.push(id);
        }
        self.bus(close + 2, id.domain, id.bus, parent)
    }

    /// A bus's devices starting at `col`: nothing, `--DEV`, or `+-DEV` / `\-DEV`.
    fn bus(
        &mut self,
        col: usize,
        domain: u32,
        bus: u8,
        parent: Option<Bdf>,
    ) -> Result<(), FabricError> {
        match self.at(col) {
            None => return Ok(()),
            Some(b'+') => self
                .open
                .push((col, Open::Bus(domain, bus, parent), self.line_no)),
            Some(b'-') | Some(b'\\') => {}
            Some(_) => return Err(self.err(col, "expected `--`, `+-` or `\\-` before a device")),
        }
        self.expect(col + 1, b'-')?;
        self.device(col + 2, domain, bus, parent)
    }

    /// `DD.F` then a bridge's range and bus, or the name.
    fn device(
        &mut self,
        col: usize,
        domain: u32,
        bus: u8,
        parent: Option<Bdf>,
    ) -> Result<(), FabricError> {
        let slot = self
            .line
            .get(col..col + 4)
            .and_then(|s| std::str::from_utf8(s).ok())
            .ok_or_else(|| self.err(col, "expected a device `DD.F`"))?;
        let bad = || self.err(col, &format!("`{slot}` is not a device `DD.F`"));
        let (d, f) = slot.split_once('.').ok_or_else(bad)?;
        let dev = u8::from_str_radix(d, 16).map_err(|_| bad())?;
        let func = u8::from_str_radix(f, 16).map_err(|_| bad())?;
        let bdf = Bdf::new(domain, bus, dev, func).ok_or_else(bad)?;
        let mut col = col + 4;
        let mut function = Function::bare(bdf);
        if self.at(col) == Some(b'-') {
            // A bridge: `-[SS-UU]-` or a bare `-` when it has no secondary bus.
            col += 1;
            if self.at(col) == Some(b'[') {
                let close = self.line[col..]
                    .iter()
                    .position(|&c| c == b']')
                    .map(|p| col + p)
                    .ok_or_else(|| self.err(col, "unterminated bus range"))?;
                let text = std::str::from_utf8(&self.line[col + 1..close]).unwrap_or("");
                let parse = |s: &str| u8::from_str_radix(s, 16).ok();
                let range = match text.split_once('-') {
                    Some((a, b)) => parse(a).zip(parse(b)),
                    None => parse(text).map(|a| (a, a)),
                }
                .filter(|(a, b)| a <= b)
                .ok_or_else(|| {
                    self.err(col + 1, &format!("`{text}` is not a bus range SS or SS-UU"))
                })?;
                function.buses = Some(BusRange {
                    secondary: range.0,
                    subordinate: range.1,
                });
                self.expect(close + 1, b'-')?;
                col = close + 2;
            }
            function.class = 0x060400;
            self.specs.push(FunctionSpec {
                function,
                parent,
                kind_known: false,
            });
            self.expect(col, b'-')?;
            return self.bridge_body(col, Some(bdf), domain);
        }
        let rest = std::str::from_utf8(&self.line[col..]).unwrap_or("").trim();
        let (name, ids) = split_ids(rest);
        if let Some((v, d)) = ids {
            function.vendor = v;
            function.device = d;
        }
        function.class = guess_class(name, function.vendor);
        // A root bus's 00.0 that names itself no other way is its host bridge (the
        // PCI convention the allowlist check relies on too).
        if function.class == 0xff0000 && parent.is_none() && dev == 0 && func == 0 {
            function.class = 0x060000;
        }
        function.name = name.to_string();
        self.specs.push(FunctionSpec {
            function,
            parent,
            kind_known: false,
        });
        Ok(())
    }
}

/// Splits `Name [8086:1234]` (lspci -nn) into the name and the IDs.
pub(crate) fn split_ids(text: &str) -> (&str, Option<(u16, u16)>) {
    if let Some(open) = text.rfind(" [") {
        let tail = &text[open + 2..];
        if let Some(inner) = tail.strip_suffix(']') {
            if let Some((v, d)) = inner.split_once(':') {
                if v.len() == 4 && d.len() == 4 {
                    if let (Ok(v), Ok(d)) = (u16::from_str_radix(v, 16), u16::from_str_radix(d, 16))
                    {
                        return (text[..open].trim_end(), Some((v, d)));
                    }
                }
            }
        }
    }
    (text, None)
}

/// A class code good enough for `--class` buckets, from what `lspci -tv` text carries:
/// whole words and phrases of the name (never substrings: "Electronics" holds no "nic",
/// "Unicast" none either), then vendors that make only one kind of device.
pub(crate) fn guess_class(name: &str, vendor: u16) -> u32 {
    // The name as lowercase words separated by single spaces, padded, so a phrase
    // matches only at word boundaries.
    let words: Vec<String> = name
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_ascii_lowercase)
        .collect();
    let text = format!(" {} ", words.join(" "));
    let has = |ps: &[&str]| ps.iter().any(|p| text.contains(&format!(" {p} ")));
    if has(&["nvme", "non volatile", "ssd", "nvm express"]) {
        0x010802
    } else if has(&[
        "vga",
        "graphics",
        "display",
        "geforce",
        "quadro",
        "tesla",
        "radeon",
        "3d controller",
        "gpu",
        "h100",
        "a100",
        "mga",
    ]) || matches!(vendor, 0x102b | 0x1013)
        || has(&["matrox", "cirrus logic"])
    {
        // Matrox (102b) and Cirrus Logic (1013) PCI functions are display controllers.
        0x030000
    } else if has(&["infiniband", "connectx", "hca"]) {
        0x020700
    } else if has(&["ethernet", "network", "gigabit", "nic"]) {
        0x020000
    } else if has(&[
        "sata",
        "sas",
        "raid",
        "ide",
        "megaraid",
        "storage",
        "block device",
    ]) {
        0x010000
    } else if has(&[
        "host bridge",
        "pmc",
        "dmi2",
        "i o hub to esi",
        "root complex",
    ]) {
        0x060000
    } else if has(&["isa", "lpc"]) {
        0x060100
    } else if has(&["acpi"]) {
        0x068000
    } else {
        0xff0000
    }
}
