//! Reading the blocks `lspci -vvv` prints, one per function (pciutils' lspci.c and
//! ls-caps.c): a header line `[DDDD:]BB:DD.F Class: Vendor Device (rev xx)`, then
//! indented lines. With `-nn` the class carries `[cccc]` and the device `[vvvv:dddd]`.
//!
//! What is taken from each block, and from which line:
//! - `Bus: primary=, secondary=, subordinate=`: a bridge's buses;
//! - `Region N: Memory at ADDR (64-bit, prefetchable) [size=S]`, `I/O ports at`: BARs;
//! - `Capabilities: [..] Express (v2) Root Port ...`: the port type;
//! - `LnkCap:` and `LnkSta:` under it: the link's maximum and negotiated speed and width;
//! - `Capabilities: [1xx vN] Access Control Services` with `ACSCap:` and `ACSCtl:`: ACS;
//! - `NUMA node:`, `IOMMU group:`, `Subsystem:`.
//!
//! ACS is known to be absent only when the block shows extended capabilities (offsets of
//! 0x100 and up) and ACS is not among them; `Capabilities: <access denied>` (lspci run
//! without root) leaves it unknown, as does `-v` text, which names the capability but
//! not its bits.

use crate::addr::{Bdf, BusAddr, PhysAddr};
use crate::fabric::error::FabricError;
use crate::fabric::model::{
    Acs, AcsFlags, Bar, BusRange, Function, FunctionSpec, Link, LinkSpeed, PortKind,
};

/// One function's block, read.
pub(crate) struct Block {
    /// The function; `parent` is `None` (the tree or bus numbers place it).
    pub spec: FunctionSpec,
    /// The header's line number.
    pub line: usize,
    /// Whether the block gave a `NUMA node:`.
    pub numa: bool,
    /// Whether lspci could not read the capabilities (run without root).
    pub denied: bool,
    /// Whether the header carried `[vvvv:dddd]` (`-nn`).
    pub ids: bool,
}

/// Whether a line opens a block: an address at column 0, a space, and `Class: name`.
pub(crate) fn is_header(line: &str) -> bool {
    let Some((addr, rest)) = line.split_once(' ') else {
        return false;
    };
    addr.contains('.') && addr.parse::<Bdf>().is_ok() && rest.contains(": ")
}

/// Reads one block: its header at `header` and the indented lines after it.
pub(crate) fn parse_block(
    source: &str,
    header: (usize, &str),
    details: &[(usize, &str)],
) -> Result<Block, FabricError> {
    let err = |line: usize, column: usize, reason: String| FabricError::Lspci {
        source_name: source.to_string(),
        line,
        column,
        reason,
    };
    let (line_no, text) = header;
    let (addr, rest) = text
        .split_once(' ')
        .ok_or_else(|| err(line_no, 1, "expected `BB:DD.F Class: Device`".into()))?;
    let bdf: Bdf = addr
        .parse()
        .map_err(|e| err(line_no, 1, format!("`{addr}` is not a PCI address: {e}")))?;
    let (class_text, name_text) = rest.split_once(": ").ok_or_else(|| {
        err(
            line_no,
            addr.len() + 2,
            "expected `Class: Device` after the address".into(),
        )
    })?;
    let (name_text, prog_if) = strip_paren(name_text, "(prog-if ");
    let (name_text, _) = strip_paren(name_text, "(rev ");
    let prog_if = prog_if
        .and_then(|p| p.get(..2))
        .and_then(|p| u8::from_str_radix(p, 16).ok())
        .unwrap_or(0);
    let (name, ids) = super::lspci::split_ids(name_text.trim());
    let class16 = class_code(class_text.trim()).unwrap_or_else(|| {
        (super::lspci::guess_class(name, ids.map_or(Function::UNKNOWN_ID, |i| i.0)) >> 8) as u16
    });
    let mut f = Function {
        vendor: ids.map_or(Function::UNKNOWN_ID, |i| i.0),
        device: ids.map_or(Function::UNKNOWN_ID, |i| i.1),
        class: u32::from(class16) << 8 | u32::from(prog_if),
        name: name.to_string(),
        ..Function::bare(bdf)
    };
    let mut pcie_kind = None;
    let (mut lnk_cap, mut lnk_sta) = (None, None);
    let (mut acs_cap, mut acs_ctl) = (None, None);
    let (mut acs_named, mut extended, mut denied, mut numa) = (false, false, false, false);
    let mut no_caps = false;
    for &(n, raw) in details {
        let l = raw.trim();
        let bad = |what: &str| err(n, raw.len() - raw.trim_start().len() + 1, what.to_string());
        if let Some(v) = l.strip_prefix("Status:") {
            // `Cap-`: the function has no capability list at all.
            no_caps |= v.split_whitespace().any(|t| t == "Cap-");
        } else if let Some(v) = l.strip_prefix("Subsystem:") {
            f.subsystem = super::lspci::split_ids(v.trim()).1;
        } else if let Some(v) = l.strip_prefix("NUMA node:") {
            let v: i64 = v
                .trim()
                .parse()
                .map_err(|_| bad("`NUMA node:` is not a number"))?;
            f.numa_node = u32::try_from(v).ok();
            numa = true;
        } else if let Some(v) = l.strip_prefix("IOMMU group:") {
            f.iommu_group = Some(
                v.trim()
                    .parse()
                    .map_err(|_| bad("`IOMMU group:` is not a number"))?,
            );
        } else if let Some(v) = l.strip_prefix("Bus:") {
            f.buses = bus_numbers(v)
                .ok_or_else(|| bad("expected `Bus: primary=PP, secondary=SS, subordinate=UU`"))?;
        } else if let Some(v) = l.strip_prefix("Region ") {
            if let Some(b) = region(v).map_err(|why| bad(&why))? {
                f.bars.push(b);
            }
        } else if let Some(v) = l.strip_prefix("Capabilities:") {
            let v = v.trim();
            if v.starts_with("<access denied>") {
                denied = true;
                continue;
            }
            // `[40] Name` or `[100 v1] Name`.
            let (off, name) = v
                .strip_prefix('[')
                .and_then(|v| v.split_once(']'))
                .ok_or_else(|| bad("expected `Capabilities: [offset] name`"))?;
            let off = off.split_whitespace().next().unwrap_or("");
            let off = u16::from_str_radix(off, 16)
                .map_err(|_| bad("the capability offset is not hex"))?;
            extended |= off >= 0x100;
            let name = name.trim();
            if let Some(t) = name.strip_prefix("Express ") {
                pcie_kind = express_kind(t);
            } else if name.starts_with("Access Control Services") {
                acs_named = true;
            }
        } else if let Some(v) = l.strip_prefix("LnkCap:") {
            lnk_cap = link_fields(v);
        } else if let Some(v) = l.strip_prefix("LnkSta:") {
            lnk_sta = link_fields(v);
        } else if let Some(v) = l.strip_prefix("ACSCap:") {
            acs_cap = Some(acs_flags(v));
        } else if let Some(v) = l.strip_prefix("ACSCtl:") {
            acs_ctl = Some(acs_flags(v));
        }
    }
    if let (Some((ms, mw)), Some((s, w))) = (lnk_cap, lnk_sta) {
        // Width 0 is a link that is down; an unknown speed tells nothing.
        if let (Some(speed), Some(max_speed), true) = (s, ms, w > 0) {
            f.link = Some(Link {
                speed,
                width: w,
                max_speed,
                max_width: mw,
            });
        }
    }
    f.acs = match (acs_cap, acs_ctl) {
        (Some(cap), Some(ctrl)) => Acs::Present { cap, ctrl },
        _ if acs_named || denied => Acs::Unknown,
        _ if extended => Acs::Absent,
        // A function without a capability list, or a conventional PCI one (no Express
        // capability, so no extended space), has no ACS.
        _ if no_caps
            || (pcie_kind.is_none()
                && details
                    .iter()
                    .any(|(_, l)| l.trim().starts_with("Capabilities:"))) =>
        {
            Acs::Absent
        }
        _ => Acs::Unknown,
    };
    let is_bridge = Function::class_is_pci_bridge(f.class);
    let (kind, kind_known) = match pcie_kind {
        Some(k) if k.is_bridge() == is_bridge && k != PortKind::Endpoint => (k, true),
        Some(PortKind::Endpoint) if !is_bridge && class16 != 0x0600 => (PortKind::Endpoint, true),
        _ => (PortKind::Endpoint, false),
    };
    f.kind = kind;
    Ok(Block {
        spec: FunctionSpec {
            function: f,
            parent: None,
            kind_known,
        },
        line: line_no,
        numa,
        denied,
        ids: ids.is_some(),
    })
}

/// Splits a trailing ` (tag ...)` group off, returning the text before it and the
/// group's contents after the tag.
fn strip_paren<'a>(text: &'a str, tag: &str) -> (&'a str, Option<&'a str>) {
    match text.rfind(&format!(" {tag}")) {
        Some(at) => (&text[..at], Some(&text[at + 1 + tag.len()..])),
        None => (text, None),
    }
}

/// The 16-bit class from `Name [cccc]` (`-nn`), `Class cccc` (a class pci.ids does not
/// name), or the name pci.ids gives a subclass.
fn class_code(text: &str) -> Option<u16> {
    if let Some(open) = text.rfind(" [") {
        if let Some(code) = text[open + 2..].strip_suffix(']') {
            if code.len() == 4 {
                if let Ok(c) = u16::from_str_radix(code, 16) {
                    return Some(c);
                }
            }
        }
    }
    if let Some(code) = text.strip_prefix("Class ") {
        return u16::from_str_radix(code.trim(), 16).ok();
    }
    crate::fabric::names::class_from_name(text)
}

/// `primary=00, secondary=01, subordinate=01, sec-latency=0`; `None` inside when the
/// bridge opens no bus (secondary 0).
fn bus_numbers(text: &str) -> Option<Option<BusRange>> {
    let field = |key: &str| {
        text.split(',')
            .filter_map(|p| p.trim().split_once('='))
            .find(|(k, _)| *k == key)
            .and_then(|(_, v)| u8::from_str_radix(v.trim(), 16).ok())
    };
    let (secondary, subordinate) = (field("secondary")?, field("subordinate")?);
    Some((secondary != 0 || subordinate != 0).then_some(BusRange {
        secondary,
        subordinate,
    }))
}

/// A `Region N: ...` line after `Region `. `Ok(None)` for a BAR without a usable window
/// (unassigned, ignored, no size).
fn region(text: &str) -> Result<Option<Bar>, String> {
    let (index, rest) = text.split_once(':').ok_or("expected `Region N: ...`")?;
    let index: u8 = index
        .trim()
        .parse()
        .map_err(|_| format!("`{}` is not a BAR number", index.trim()))?;
    let rest = rest.trim();
    let rest = rest.strip_prefix("[virtual] ").unwrap_or(rest);
    let rest = rest.strip_prefix("[enhanced] ").unwrap_or(rest);
    let (io, rest) = if let Some(r) = rest.strip_prefix("I/O ports at ") {
        (true, r)
    } else if let Some(r) = rest.strip_prefix("Memory at ") {
        (false, r)
    } else {
        return Err(format!(
            "region {index} is neither `Memory at` nor `I/O ports at`"
        ));
    };
    let addr = rest.split_whitespace().next().unwrap_or("");
    let Some(at) = crate::addr::parse_hex_u64(addr) else {
        // <unassigned>, <ignored>, <invalid-64bit-slot>: no window.
        return Ok(None);
    };
    let Some(size) = rest
        .split("[size=")
        .nth(1)
        .and_then(|s| s.split(']').next())
        .and_then(size_bytes)
    else {
        return Ok(None);
    };
    let flags = rest
        .split_once('(')
        .and_then(|(_, r)| r.split_once(')'))
        .map_or("", |(f, _)| f);
    Ok(Some(Bar {
        index,
        cpu: PhysAddr(at),
        bus: BusAddr(at),
        size,
        is_64bit: flags.contains("64-bit"),
        prefetchable: !io && flags.contains("prefetchable") && !flags.contains("non-prefetchable"),
        io,
    }))
}

/// `16M`, `256K`, `32G`, `128` (pciutils' show_size: powers of 1024).
fn size_bytes(text: &str) -> Option<u64> {
    let t = text.trim();
    let (num, shift) = match t.chars().last()? {
        'K' => (&t[..t.len() - 1], 10),
        'M' => (&t[..t.len() - 1], 20),
        'G' => (&t[..t.len() - 1], 30),
        'T' => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    num.parse::<u64>().ok()?.checked_mul(1 << shift)
}

/// The port type after `Express `: `(v2) Root Port (Slot+), MSI 00`.
fn express_kind(text: &str) -> Option<PortKind> {
    let t = text.trim_start();
    let t = match t.strip_prefix('(') {
        Some(r) => r.split_once(')').map_or(r, |(_, r)| r).trim_start(),
        None => t,
    };
    let table = [
        ("Endpoint", PortKind::Endpoint),
        ("Legacy Endpoint", PortKind::Endpoint),
        ("Root Complex Integrated Endpoint", PortKind::Endpoint),
        ("Root Port", PortKind::RootPort),
        ("Upstream Port", PortKind::SwitchUpstream),
        ("Downstream Port", PortKind::SwitchDownstream),
        ("PCI-Express to PCI/PCI-X Bridge", PortKind::PciBridge),
        ("PCI/PCI-X to PCI-Express Bridge", PortKind::PciBridge),
        ("PCI/PCI-X Bridge", PortKind::PciBridge),
    ];
    table
        .iter()
        .filter(|(name, _)| t.starts_with(name))
        .max_by_key(|(name, _)| name.len())
        .map(|(_, k)| *k)
}

/// `Speed 8GT/s, Width x16` from `LnkCap:` or `LnkSta:` (`Port #0, ` before it,
/// `(ok)` or `(downgraded)` after each in some versions). The speed is `None` when
/// lspci says `unknown`.
fn link_fields(text: &str) -> Option<(Option<LinkSpeed>, u8)> {
    let speed = text.split("Speed ").nth(1)?;
    let speed = speed
        .split(|c: char| c == ',' || c.is_whitespace())
        .next()?
        .trim_end_matches("GT/s");
    let width = text.split("Width x").nth(1)?;
    let width: u8 = width
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    Some((LinkSpeed::parse(speed), width))
}

/// `SrcValid+ TransBlk- ReqRedir+ CmpltRedir+ UpstreamFwd+ EgressCtrl- DirectTrans-`.
fn acs_flags(text: &str) -> AcsFlags {
    const NAMES: [(&str, u16); 7] = [
        ("SrcValid", AcsFlags::SV),
        ("TransBlk", AcsFlags::TB),
        ("ReqRedir", AcsFlags::RR),
        ("CmpltRedir", AcsFlags::CR),
        ("UpstreamFwd", AcsFlags::UF),
        ("EgressCtrl", AcsFlags::EC),
        ("DirectTrans", AcsFlags::DT),
    ];
    let mut v = 0;
    for tok in text.split_whitespace() {
        if let Some(name) = tok.strip_suffix('+') {
            if let Some((_, bit)) = NAMES.iter().find(|(n, _)| *n == name) {
                v |= bit;
            }
        }
    }
    AcsFlags(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_read_as_lspci_prints_them() {
        let b = region("1: Memory at 6000000000 (64-bit, prefetchable) [size=32G]")
            .unwrap()
            .unwrap();
        assert_eq!(
            (b.index, b.cpu.0, b.size, b.is_64bit, b.prefetchable, b.io),
            (1, 0x60_0000_0000, 32 << 30, true, true, false)
        );
        let b = region("0: Memory at f7000000 (32-bit, non-prefetchable) [disabled] [size=16M]")
            .unwrap()
            .unwrap();
        assert_eq!(
            (b.cpu.0, b.size, b.prefetchable),
            (0xf700_0000, 16 << 20, false)
        );
        let b = region("4: I/O ports at e000 [size=128]").unwrap().unwrap();
        assert_eq!((b.index, b.cpu.0, b.size, b.io), (4, 0xe000, 128, true));
        assert!(region("2: Memory at <unassigned> (64-bit, prefetchable)")
            .unwrap()
            .is_none());
        assert!(region("x: Memory at 0").is_err());
    }

    #[test]
    fn link_and_acs_lines_of_old_and_new_pciutils() {
        assert_eq!(
            link_fields("\tPort #0, Speed 8GT/s, Width x16, ASPM L1, Exit Latency L1 <4us"),
            Some((Some(LinkSpeed::Gt8), 16))
        );
        assert_eq!(
            link_fields("\tSpeed 2.5GT/s (downgraded), Width x1 (downgraded)"),
            Some((Some(LinkSpeed::Gt2_5), 1))
        );
        assert_eq!(
            link_fields("\tSpeed 16GT/s, Width x8"),
            Some((Some(LinkSpeed::Gt16), 8))
        );
        assert_eq!(link_fields("\tSpeed unknown, Width x0"), Some((None, 0)));
        let f = acs_flags(
            "\tSrcValid+ TransBlk- ReqRedir+ CmpltRedir+ UpstreamFwd+ EgressCtrl- DirectTrans-",
        );
        assert_eq!(
            f.0,
            AcsFlags::SV | AcsFlags::RR | AcsFlags::CR | AcsFlags::UF
        );
        assert_eq!(
            express_kind("(v2) Root Port (Slot+), MSI 00"),
            Some(PortKind::RootPort)
        );
        assert_eq!(
            express_kind("(v2) Legacy Endpoint, IntMsgNum 0"),
            Some(PortKind::Endpoint)
        );
        assert_eq!(
            express_kind("Downstream Port (Slot-), MSI 00"),
            Some(PortKind::SwitchDownstream)
        );
    }
}
