//! Decoding the parts of PCI configuration space the fabric needs: the bridge bus
//! numbers, the PCIe capability's port type, and the ACS extended capability
//! (ID 0x000d at offset 0x100 or above). Every read is bounds-checked against what the
//! reader could see: non-root sysfs readers get only the first 64 bytes.

use crate::fabric::model::{Acs, AcsFlags, BusRange, PortKind};

const PCI_STATUS: usize = 0x06;
const PCI_STATUS_CAP_LIST: u16 = 0x10;
const PCI_HEADER_TYPE: usize = 0x0e;
const PCI_SECONDARY_BUS: usize = 0x19;
const PCI_SUBORDINATE_BUS: usize = 0x1a;
const PCI_CAPABILITY_LIST: usize = 0x34;
const PCI_CB_CAPABILITY_LIST: usize = 0x14;
const PCI_CAP_ID_EXP: u8 = 0x10;
const PCI_EXT_CAP_ID_ACS: u16 = 0x000d;
const PCI_CFG_SPACE_SIZE: usize = 0x100;

/// What a config-space dump tells.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfigFacts {
    /// Secondary and subordinate bus of a type 1 or CardBus header.
    pub buses: Option<BusRange>,
    /// The header says bridge (type 1 or 2).
    pub is_bridge_header: bool,
    /// The PCIe port type, when the capability was readable.
    pub pcie_kind: Option<PortKind>,
    /// The ACS state.
    pub acs: Acs,
    /// Bytes that were readable.
    pub len: usize,
}

fn byte(cfg: &[u8], off: usize) -> Option<u8> {
    cfg.get(off).copied()
}

fn word(cfg: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes([*cfg.get(off)?, *cfg.get(off + 1)?]))
}

fn dword(cfg: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes([
        *cfg.get(off)?,
        *cfg.get(off + 1)?,
        *cfg.get(off + 2)?,
        *cfg.get(off + 3)?,
    ]))
}

/// Whether the standard capability list is fully readable and whether it holds a PCIe
/// capability (`Some(None)`: readable, no PCIe capability; `None`: could not tell).
fn find_pcie_cap(cfg: &[u8], header_type: u8) -> Option<Option<usize>> {
    if word(cfg, PCI_STATUS)? & PCI_STATUS_CAP_LIST == 0 {
        return Some(None);
    }
    let ptr_off = if header_type == 2 {
        PCI_CB_CAPABILITY_LIST
    } else {
        PCI_CAPABILITY_LIST
    };
    let mut pos = usize::from(byte(cfg, ptr_off)? & !3);
    // At most 48 capabilities fit in 192 bytes; stop a malformed loop there.
    for _ in 0..48 {
        if pos < 0x40 {
            return Some(None);
        }
        let id = byte(cfg, pos)?;
        if id == 0xff {
            return Some(None);
        }
        if id == PCI_CAP_ID_EXP {
            return Some(Some(pos));
        }
        pos = usize::from(byte(cfg, pos + 1)? & !3);
    }
    Some(None)
}

/// Decodes what the fabric needs from a config-space dump of any length.
pub fn decode(cfg: &[u8]) -> ConfigFacts {
    let mut facts = ConfigFacts {
        len: cfg.len(),
        ..ConfigFacts::default()
    };
    let Some(header_type) = byte(cfg, PCI_HEADER_TYPE).map(|h| h & 0x7f) else {
        return facts;
    };
    if header_type == 1 || header_type == 2 {
        facts.is_bridge_header = true;
        if let (Some(sec), Some(sub)) =
            (byte(cfg, PCI_SECONDARY_BUS), byte(cfg, PCI_SUBORDINATE_BUS))
        {
            if sec != 0 {
                facts.buses = Some(BusRange {
                    secondary: sec,
                    subordinate: sub.max(sec),
                });
            }
        }
    }
    let pcie = find_pcie_cap(cfg, header_type);
    if let Some(Some(pos)) = pcie {
        if let Some(flags) = word(cfg, pos + 2) {
            facts.pcie_kind = PortKind::from_pcie_type(((flags >> 4) & 0xf) as u8);
        }
    }
    facts.acs = match pcie {
        // Conventional PCI: no extended config space, so no ACS.
        Some(None) => Acs::Absent,
        _ if cfg.len() > PCI_CFG_SPACE_SIZE => find_acs(cfg),
        _ => Acs::Unknown,
    };
    facts
}

fn find_acs(cfg: &[u8]) -> Acs {
    let mut pos = PCI_CFG_SPACE_SIZE;
    // 4096 bytes hold at most (4096 - 256) / 8 capabilities.
    for _ in 0..480 {
        let Some(header) = dword(cfg, pos) else {
            return Acs::Unknown;
        };
        if header == 0 || header == 0xffff_ffff {
            return Acs::Absent;
        }
        if (header & 0xffff) as u16 == PCI_EXT_CAP_ID_ACS {
            return match (word(cfg, pos + 4), word(cfg, pos + 6)) {
                (Some(cap), Some(ctrl)) => Acs::Present {
                    cap: AcsFlags(cap),
                    ctrl: AcsFlags(ctrl),
                },
                _ => Acs::Unknown,
            };
        }
        let next = (header >> 20) as usize & !3;
        if next < PCI_CFG_SPACE_SIZE {
            return Acs::Absent;
        }
        pos = next;
    }
    Acs::Absent
}

/// Builds a config-space image that [`decode`] reads back as the given facts; used to
/// write snapshots of emulated topologies and in tests. An unknown ACS state gives a
/// 64-byte image whose capability list runs past its end, as a non-root read does.
pub fn encode(
    vendor: u16,
    device: u16,
    class: u32,
    buses: Option<BusRange>,
    pcie: Option<PortKind>,
    acs: Acs,
) -> Vec<u8> {
    let len = if matches!(acs, Acs::Unknown) {
        0x40
    } else {
        0x1000
    };
    let mut cfg = vec![0u8; len];
    cfg[0..2].copy_from_slice(&vendor.to_le_bytes());
    cfg[2..4].copy_from_slice(&device.to_le_bytes());
    cfg[0x09] = class as u8;
    cfg[0x0a] = (class >> 8) as u8;
    cfg[0x0b] = (class >> 16) as u8;
    let bridge = buses.is_some() || matches!(class >> 8, 0x0604 | 0x0609);
    cfg[PCI_HEADER_TYPE] = u8::from(bridge);
    if let Some(b) = buses {
        cfg[PCI_SECONDARY_BUS] = b.secondary;
        cfg[PCI_SUBORDINATE_BUS] = b.subordinate;
    }
    cfg[PCI_STATUS..PCI_STATUS + 2].copy_from_slice(&PCI_STATUS_CAP_LIST.to_le_bytes());
    cfg[PCI_CAPABILITY_LIST] = 0x40;
    if len > 0x40 {
        let type_field: u16 = match pcie {
            Some(PortKind::RootPort) => 0x4,
            Some(PortKind::SwitchUpstream) => 0x5,
            Some(PortKind::SwitchDownstream) => 0x6,
            Some(PortKind::PciBridge) => 0x7,
            Some(PortKind::HostBridge) => 0x9,
            _ => 0x0,
        };
        cfg[0x40] = PCI_CAP_ID_EXP;
        cfg[0x41] = 0;
        cfg[0x42..0x44].copy_from_slice(&((type_field << 4) | 2).to_le_bytes());
        if let Acs::Present { cap, ctrl } = acs {
            let header: u32 = u32::from(PCI_EXT_CAP_ID_ACS) | (1 << 16);
            cfg[0x100..0x104].copy_from_slice(&header.to_le_bytes());
            cfg[0x104..0x106].copy_from_slice(&cap.0.to_le_bytes());
            cfg[0x106..0x108].copy_from_slice(&ctrl.0.to_le_bytes());
        }
    }
    cfg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acs_found_behind_other_extended_capabilities() {
        let mut cfg = encode(
            0x10b5,
            0x8747,
            0x060400,
            None,
            Some(PortKind::SwitchDownstream),
            Acs::Absent,
        );
        // AER at 0x100 pointing to ACS at 0x148.
        cfg[0x100..0x104].copy_from_slice(&(0x0001u32 | (1 << 16) | (0x148 << 20)).to_le_bytes());
        cfg[0x148..0x14c].copy_from_slice(&(0x000du32 | (1 << 16)).to_le_bytes());
        cfg[0x14c..0x14e].copy_from_slice(&0x005fu16.to_le_bytes());
        cfg[0x14e..0x150].copy_from_slice(&0x001du16.to_le_bytes());
        let f = decode(&cfg);
        assert_eq!(
            f.acs,
            Acs::Present {
                cap: AcsFlags(0x5f),
                ctrl: AcsFlags(0x1d)
            }
        );
        assert_eq!(f.pcie_kind, Some(PortKind::SwitchDownstream));
    }

    #[test]
    fn sixty_four_bytes_leave_acs_unknown() {
        let mut cfg = vec![0u8; 64];
        cfg[PCI_STATUS] = PCI_STATUS_CAP_LIST as u8;
        cfg[PCI_CAPABILITY_LIST] = 0x40;
        assert_eq!(decode(&cfg).acs, Acs::Unknown);
    }

    #[test]
    fn conventional_pci_has_no_acs() {
        let cfg = vec![0u8; 256];
        assert_eq!(decode(&cfg).acs, Acs::Absent);
    }

    #[test]
    fn looping_extended_capability_list_terminates() {
        let mut cfg = encode(1, 2, 0x020000, None, Some(PortKind::Endpoint), Acs::Absent);
        cfg[0x100..0x104].copy_from_slice(&(0x0001u32 | (0x100 << 20)).to_le_bytes());
        assert_eq!(decode(&cfg).acs, Acs::Absent);
    }

    #[test]
    fn encode_round_trips() {
        let acs = Acs::Present {
            cap: AcsFlags(0x7f),
            ctrl: AcsFlags(0x0c),
        };
        let b = Some(BusRange {
            secondary: 3,
            subordinate: 5,
        });
        let f = decode(&encode(1, 2, 0x060400, b, Some(PortKind::RootPort), acs));
        assert_eq!(
            (f.buses, f.pcie_kind, f.acs),
            (b, Some(PortKind::RootPort), acs)
        );
    }
}
