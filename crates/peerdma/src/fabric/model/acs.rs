//! Access Control Services: the extended capability (ID 0x000d) whose Request Redirect,
//! Completion Redirect and Egress Control bits send peer traffic up to the root complex,
//! and what is known of it for one function.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Bits of the ACS capability and control registers (PCI_ACS_*).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AcsFlags(pub u16);

impl AcsFlags {
    /// Source Validation.
    pub const SV: u16 = 0x0001;
    /// Translation Blocking.
    pub const TB: u16 = 0x0002;
    /// P2P Request Redirect.
    pub const RR: u16 = 0x0004;
    /// P2P Completion Redirect.
    pub const CR: u16 = 0x0008;
    /// Upstream Forwarding.
    pub const UF: u16 = 0x0010;
    /// P2P Egress Control.
    pub const EC: u16 = 0x0020;
    /// Direct Translated P2P.
    pub const DT: u16 = 0x0040;
    const NAMES: [(u16, &'static str); 7] = [
        (Self::SV, "SV"),
        (Self::TB, "TB"),
        (Self::RR, "RR"),
        (Self::CR, "CR"),
        (Self::UF, "UF"),
        (Self::EC, "EC"),
        (Self::DT, "DT"),
    ];

    /// Whether the bits that make a port send peer traffic upstream (RR, CR, EC) are set,
    /// the test of the kernel's `pci_bridge_has_acs_redir()`.
    pub fn redirects(self) -> bool {
        self.0 & (Self::RR | Self::CR | Self::EC) != 0
    }
}

impl fmt::Display for AcsFlags {
    /// Prints like lspci: `SrcValid+ TransBlk- ReqRedir+ ...` is long, so the short names
    /// joined with `|`, or `-` when none is set. Unnamed high bits print as hex.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = Self::NAMES
            .iter()
            .filter(|(b, _)| self.0 & b != 0)
            .map(|(_, n)| (*n).to_string())
            .collect();
        let rest = self.0 & !0x7f;
        if rest != 0 {
            parts.push(format!("{rest:#x}"));
        }
        if parts.is_empty() {
            f.write_str("-")
        } else {
            f.write_str(&parts.join("|"))
        }
    }
}

impl std::str::FromStr for AcsFlags {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "-" || s.is_empty() {
            return Ok(AcsFlags(0));
        }
        let mut v = 0u16;
        for part in s.split('|') {
            let part = part.trim();
            if let Some((bit, _)) = Self::NAMES
                .iter()
                .find(|(_, n)| n.eq_ignore_ascii_case(part))
            {
                v |= bit;
            } else if let Some(x) =
                crate::addr::parse_hex_u64(part).filter(|_| part.starts_with("0x"))
            {
                v |= u16::try_from(x).map_err(|_| format!("`{part}` is wider than 16 bits"))?;
            } else {
                return Err(format!(
                    "`{part}` is not an ACS bit (SV, TB, RR, CR, UF, EC, DT or 0x..)"
                ));
            }
        }
        Ok(AcsFlags(v))
    }
}

impl Serialize for AcsFlags {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for AcsFlags {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// What is known of a function's Access Control Services capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case", tag = "state", deny_unknown_fields)]
pub enum Acs {
    /// Not read: the extended config space was not readable (non-root reads stop at 64
    /// bytes) or the source (lspci text) does not carry it.
    #[default]
    Unknown,
    /// The function has no ACS capability, so it never redirects.
    Absent,
    /// The capability is present with these capability and control bits.
    Present {
        /// What the port can do.
        cap: AcsFlags,
        /// What is enabled.
        ctrl: AcsFlags,
    },
}

impl Acs {
    /// `Some(true)` when the function redirects peer traffic upstream, `None` when unknown.
    pub fn redirects(&self) -> Option<bool> {
        match self {
            Acs::Unknown => None,
            Acs::Absent => Some(false),
            Acs::Present { ctrl, .. } => Some(ctrl.redirects()),
        }
    }
}

impl fmt::Display for Acs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Acs::Unknown => f.write_str("ACS unknown"),
            Acs::Absent => f.write_str("no ACS"),
            Acs::Present { ctrl, .. } => write!(f, "ACS ctrl {ctrl}"),
        }
    }
}
