//! What one function may say about itself, checked the same way for every source: a
//! function's BARs, link and ACS bits, and its kind against its class. The tree-wide
//! rules (bus numbers, parents, loops, BARs of different functions) are in
//! [`Topology::build`](crate::fabric::Topology::build), which calls these.
//!
//! Each check returns the sentence that goes after "function BDF:" in the error.

use crate::fabric::model::{Acs, Bar, Function, Link, PortKind};

/// The lane counts a PCIe link can negotiate (PCIe base spec, Link Capabilities' Maximum
/// Link Width: x1, x2, x4, x8, x12, x16, x32).
pub const LINK_WIDTHS: [u8; 7] = [1, 2, 4, 8, 12, 16, 32];

/// The highest BAR number of a type-0 header (six BARs, 0..=5; the expansion ROM is not
/// a BAR).
pub const MAX_BAR_INDEX: u8 = 5;

const FOUR_GIB: u128 = 1 << 32;

/// A function's own facts: its BARs, link, ACS and kind.
pub(crate) fn check_function(f: &Function) -> Result<(), String> {
    check_kind(f)?;
    check_bars(&f.bars)?;
    if let Some(l) = &f.link {
        check_link(l)?;
    }
    check_acs(&f.acs)
}

/// Readings no PCIe function can give (a link of 3 lanes, ACS control bits the
/// capability lacks, BARs that overlap) in a source that reads real hardware (a sysfs
/// snapshot, lspci text) come from a broken device or a damaged copy: the fact is
/// dropped to unknown, with a note naming the function, and the rest of the machine is
/// read. Returns the notes.
pub(crate) fn drop_impossible(f: &mut Function) -> Vec<String> {
    let mut notes = Vec::new();
    if let Some(why) = f.link.as_ref().and_then(|l| check_link(l).err()) {
        notes.push(format!("{}: link ignored: {why}", f.bdf));
        f.link = None;
    }
    if let Err(why) = check_acs(&f.acs) {
        notes.push(format!("{}: ACS taken as unknown: {why}", f.bdf));
        f.acs = Acs::Unknown;
    }
    if let Err(why) = check_bars(&f.bars) {
        notes.push(format!("{}: BARs ignored: {why}", f.bdf));
        f.bars.clear();
    }
    notes
}

/// A host bridge's function has the host-bridge class (06:00), and a port's has a
/// bridge class (06:04 or 06:09): the kind and the class must tell the same story.
fn check_kind(f: &Function) -> Result<(), String> {
    let class16 = f.class >> 8;
    match f.kind {
        PortKind::HostBridge if class16 != 0x0600 => Err(format!(
            "kind is {} but class {:#08x} is not a host bridge (06:00)",
            f.kind, f.class
        )),
        k if k.is_bridge() && !Function::class_is_pci_bridge(f.class) => Err(format!(
            "kind is {k} but class {:#08x} is not a PCI-to-PCI bridge (06:04 or 06:09)",
            f.class
        )),
        _ => Ok(()),
    }
}

/// A link's widths are lane counts PCIe has, and what it negotiated is no more than what
/// it can do.
pub fn check_link(l: &Link) -> Result<(), String> {
    for (what, w) in [("width", l.width), ("max_width", l.max_width)] {
        if !LINK_WIDTHS.contains(&w) {
            return Err(format!(
                "link {what} x{w} is not a PCIe lane count (1, 2, 4, 8, 12, 16 or 32)"
            ));
        }
    }
    if l.width > l.max_width {
        return Err(format!(
            "link width x{} is above its maximum x{}",
            l.width, l.max_width
        ));
    }
    if l.speed > l.max_speed {
        return Err(format!(
            "link speed {} is above its maximum {}",
            l.speed, l.max_speed
        ));
    }
    Ok(())
}

/// Control bits enable features of the capability: a bit the capability lacks is
/// hardwired to 0 (PCIe base spec, ACS Control register), so one set there is a
/// contradiction. Only the seven feature bits pair up; higher bits differ in meaning.
pub fn check_acs(acs: &Acs) -> Result<(), String> {
    if let Acs::Present { cap, ctrl } = acs {
        let stray = ctrl.0 & !cap.0 & 0x7f;
        if stray != 0 {
            return Err(format!(
                "ACS control enables {} that its capability ({cap}) does not have",
                crate::fabric::model::AcsFlags(stray)
            ));
        }
    }
    Ok(())
}

/// One function's BARs: numbered 0..=5, each number used once (a 64-bit BAR also takes
/// the next one), a power-of-two size that fits the address space of its kind, and no
/// two overlapping.
pub fn check_bars(bars: &[Bar]) -> Result<(), String> {
    // Which BAR took each slot.
    let mut used: [Option<u8>; MAX_BAR_INDEX as usize + 1] = [None; MAX_BAR_INDEX as usize + 1];
    for b in bars {
        if b.index > MAX_BAR_INDEX {
            return Err(format!(
                "BAR {} is out of range: a function has BARs 0 to {MAX_BAR_INDEX}",
                b.index
            ));
        }
        let slots = if b.is_64bit { 2 } else { 1 };
        if b.is_64bit && b.io {
            return Err(format!("BAR {} is both I/O and 64-bit memory", b.index));
        }
        if b.index + slots - 1 > MAX_BAR_INDEX {
            return Err(format!(
                "BAR {} is 64-bit and needs BAR {} too, which does not exist",
                b.index,
                b.index + 1
            ));
        }
        for s in b.index..b.index + slots {
            if let Some(owner) = used[s as usize].replace(b.index) {
                return Err(match (owner == b.index, owner < s) {
                    (true, _) => format!("BAR {s} is given twice"),
                    (false, true) => {
                        format!(
                            "BAR {s} is the upper half of 64-bit BAR {owner}, and given as well"
                        )
                    }
                    (false, false) => {
                        format!(
                            "BAR {} is 64-bit and takes BAR {s} too, which is given as well",
                            b.index
                        )
                    }
                });
            }
        }
        if b.size == 0 {
            return Err(format!("BAR {} has size 0", b.index));
        }
        if !b.size.is_power_of_two() {
            return Err(format!(
                "BAR {} has size {:#x}, which is not a power of two",
                b.index, b.size
            ));
        }
        for (side, start) in [("CPU", b.cpu.0), ("bus", b.bus.0)] {
            let end = u128::from(start) + u128::from(b.size);
            if end > u128::from(u64::MAX) + 1 {
                return Err(format!(
                    "BAR {} at {side} address {start:#x} of size {:#x} wraps past 2^64",
                    b.index, b.size
                ));
            }
            if start % b.size != 0 {
                return Err(format!(
                    "BAR {} at {side} address {start:#x} is not aligned to its size {:#x}",
                    b.index, b.size
                ));
            }
        }
        let bus_end = u128::from(b.bus.0) + u128::from(b.size);
        if !b.is_64bit && bus_end > FOUR_GIB {
            return Err(format!(
                "BAR {} is 32-bit but its bus address {:#x} + {:#x} reaches above 4 GiB",
                b.index, b.bus.0, b.size
            ));
        }
    }
    if let Some((a, b)) = overlapping(bars.iter().map(|b| (b, ()))) {
        return Err(format!("BARs {} and {} overlap", a.0.index, b.0.index));
    }
    Ok(())
}

/// A BAR with what it belongs to.
pub(crate) type Tagged<'a, T> = (&'a Bar, T);

/// The first two BARs (with a tag each) whose CPU windows overlap, I/O and memory
/// apart. BARs at address 0 are unassigned and take no space.
pub(crate) fn overlapping<'a, T: Copy>(
    bars: impl Iterator<Item = Tagged<'a, T>>,
) -> Option<(Tagged<'a, T>, Tagged<'a, T>)> {
    let mut v: Vec<(&Bar, T)> = bars.filter(|(b, _)| b.cpu.0 != 0 && b.size > 0).collect();
    v.sort_by_key(|(b, _)| (b.io, b.cpu.0));
    v.windows(2).find_map(|w| {
        let (a, b) = (w[0], w[1]);
        (a.0.io == b.0.io && u128::from(a.0.cpu.0) + u128::from(a.0.size) > u128::from(b.0.cpu.0))
            .then_some((a, b))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::{BusAddr, PhysAddr};
    use crate::fabric::model::{AcsFlags, LinkSpeed};

    fn bar(index: u8, at: u64, size: u64, is_64bit: bool) -> Bar {
        Bar {
            index,
            cpu: PhysAddr(at),
            bus: BusAddr(at),
            size,
            is_64bit,
            prefetchable: is_64bit,
            io: false,
        }
    }

    #[test]
    fn bars_that_a_type0_header_cannot_hold_are_refused() {
        let ok = [
            bar(0, 0xfe00_0000, 0x1_0000, false),
            bar(2, 0x30_0000_0000, 0x10_0000_0000, true),
            bar(4, 0x40_0000_0000, 0x200_0000, true),
        ];
        assert_eq!(check_bars(&ok), Ok(()));
        let cases: [(Vec<Bar>, &str); 9] = [
            (vec![bar(6, 0xfe00_0000, 0x1000, false)], "out of range"),
            (vec![bar(5, 0x40_0000_0000, 0x1000, true)], "needs BAR 6"),
            (
                vec![
                    bar(1, 0xfe00_0000, 0x1000, false),
                    bar(1, 0xfd00_0000, 0x1000, false),
                ],
                "given twice",
            ),
            (
                vec![
                    bar(0, 0x40_0000_0000, 0x1000, true),
                    bar(1, 0xfd00_0000, 0x1000, false),
                ],
                "upper half of 64-bit BAR 0",
            ),
            (vec![bar(0, 0xfe00_0000, 0, false)], "size 0"),
            (
                vec![bar(0, 0xfe00_0000, 0x3000, false)],
                "not a power of two",
            ),
            (
                vec![bar(0, 0xffff_ffff_ffff_0000, 0x1_0000_0000, true)],
                "wraps past 2^64",
            ),
            (vec![bar(0, 0x1_0000_0000, 0x1000, false)], "above 4 GiB"),
            (
                vec![
                    bar(0, 0xfe00_0000, 0x10_0000, false),
                    bar(1, 0xfe08_0000, 0x1000, false),
                ],
                "overlap",
            ),
        ];
        for (bars, want) in cases {
            let err = check_bars(&bars).expect_err(want);
            assert!(err.contains(want), "{err:?} lacks {want:?}");
        }
    }

    #[test]
    fn link_widths_and_speeds_pcie_cannot_negotiate_are_refused() {
        let link = |width, max_width, speed, max_speed| Link {
            speed,
            width,
            max_speed,
            max_width,
        };
        assert_eq!(
            check_link(&link(8, 16, LinkSpeed::Gt8, LinkSpeed::Gt16)),
            Ok(())
        );
        for w in [0u8, 3, 33] {
            let err = check_link(&link(w, 16, LinkSpeed::Gt8, LinkSpeed::Gt8)).unwrap_err();
            assert!(
                err.contains(&format!("x{w} is not a PCIe lane count")),
                "{err}"
            );
        }
        let err = check_link(&link(16, 8, LinkSpeed::Gt8, LinkSpeed::Gt8)).unwrap_err();
        assert!(err.contains("above its maximum x8"), "{err}");
        let err = check_link(&link(8, 8, LinkSpeed::Gt16, LinkSpeed::Gt8)).unwrap_err();
        assert!(
            err.contains("16.0 GT/s is above its maximum 8.0 GT/s"),
            "{err}"
        );
    }

    #[test]
    fn acs_control_bits_without_the_capability_are_refused() {
        let ok = Acs::Present {
            cap: AcsFlags(0x5f),
            ctrl: AcsFlags(0x1d),
        };
        assert_eq!(check_acs(&ok), Ok(()));
        let bad = Acs::Present {
            cap: AcsFlags(AcsFlags::SV),
            ctrl: AcsFlags(AcsFlags::SV | AcsFlags::RR | AcsFlags::EC),
        };
        let err = check_acs(&bad).unwrap_err();
        assert!(err.contains("enables RR|EC"), "{err}");
    }
}
