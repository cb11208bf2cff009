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
use crate::fabric::model::{
    Acs, BusRange, Function, FunctionSpec, Gaps, HostBridge, HostInfo, PortKind, Topology, Upstream,
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

/// Reads `lspci -tv` / `-tvnn` text. `source` names it in errors (`-` for stdin).
pub fn parse(source: &str, text: &str) -> Result<Topology, FabricError> {
    let mut p = Parser {
        source,
        line_no: 0,
        line: b"",
        specs: Vec::new(),
        roots: Vec::new(),
        open: Vec::new(),
    };
    let mut started = false;
    for (i, raw) in text.lines().enumerate() {
        p.line_no = i + 1;
        p.line = raw.trim_end().as_bytes();
        if p.line.is_empty() {
            continue;
        }
        if !started {
            started = true;
            if looks_like_plain_lspci(raw) {
                return Err(p.err(
                    0,
                    "this is plain `lspci` output, a line per function without the tree; \
                     give `lspci -tv` (or `lspci -tvnn`, which adds the IDs)",
                ));
            }
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
    let mut roots = p.roots;
    roots.sort();
    roots.dedup();
    let host_bridges = roots
        .into_iter()
        .map(|root| HostBridge {
            root,
            numa_node: None,
        })
        .collect();
    let specs = p.specs;
    let gaps = Gaps {
        acs_unknown: 0,
        numa_unknown: true,
        cpu_unknown: true,
        notes: vec![
            "lspci -tv text carries the tree and names only: ACS, NUMA nodes, links, BARs and \
             the CPU are unknown, so bus-address verdicts are uncertain"
                .to_string(),
        ],
        acs_hint: "`lspci -tv` text carries no ACS state; a sysfs snapshot taken as root has it",
    };
    Topology::build(
        format!("lspci {source}"),
        HostInfo::default(),
        host_bridges,
        specs,
        gaps,
    )
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
        let mut function = Function {
            bdf,
            vendor: Function::UNKNOWN_ID,
            device: Function::UNKNOWN_ID,
            subsystem: None,
            class: 0,
            name: String::new(),
            kind: PortKind::Endpoint,
            buses: None,
            bars: Vec::new(),
            link: None,
            acs: Acs::Unknown,
            iommu_group: None,
            numa_node: None,
            memory: None,
            upstream: Upstream::HostBridge(0),
        };
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

/// Whether a line starts as plain `lspci` prints a function: `BB:DD.F ` or
/// `DDDD:BB:DD.F `, then its class.
fn looks_like_plain_lspci(line: &str) -> bool {
    let Some((addr, rest)) = line.trim_start().split_once(' ') else {
        return false;
    };
    !rest.trim().is_empty()
        && (addr.parse::<Bdf>().is_ok()
            || format!("0000:{addr}").parse::<Bdf>().is_ok() && addr.len() == 7)
}

/// Splits `Name [8086:1234]` (lspci -nn) into the name and the IDs.
fn split_ids(text: &str) -> (&str, Option<(u16, u16)>) {
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
fn guess_class(name: &str, vendor: u16) -> u32 {
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
