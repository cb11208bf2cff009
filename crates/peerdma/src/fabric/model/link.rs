//! PCIe link rates and widths, and the bandwidth they give after line coding.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A PCIe link rate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LinkSpeed {
    /// 2.5 GT/s, PCIe 1.x, 8b/10b.
    Gt2_5,
    /// 5 GT/s, PCIe 2.x, 8b/10b.
    Gt5,
    /// 8 GT/s, PCIe 3.x, 128b/130b.
    Gt8,
    /// 16 GT/s, PCIe 4.0, 128b/130b.
    Gt16,
    /// 32 GT/s, PCIe 5.0, 128b/130b.
    Gt32,
    /// 64 GT/s, PCIe 6.0, PAM4 with 242B/256B FLITs.
    Gt64,
}

impl LinkSpeed {
    const ALL: [(LinkSpeed, &'static str, f64); 6] = [
        (LinkSpeed::Gt2_5, "2.5", 2.5),
        (LinkSpeed::Gt5, "5.0", 5.0),
        (LinkSpeed::Gt8, "8.0", 8.0),
        (LinkSpeed::Gt16, "16.0", 16.0),
        (LinkSpeed::Gt32, "32.0", 32.0),
        (LinkSpeed::Gt64, "64.0", 64.0),
    ];

    /// Transfers per second per lane, in GT/s.
    pub fn gts(self) -> f64 {
        Self::ALL[self as usize].2
    }

    /// Payload bits per transferred bit after line coding.
    pub fn encoding_efficiency(self) -> f64 {
        match self {
            LinkSpeed::Gt2_5 | LinkSpeed::Gt5 => 8.0 / 10.0,
            LinkSpeed::Gt8 | LinkSpeed::Gt16 | LinkSpeed::Gt32 => 128.0 / 130.0,
            LinkSpeed::Gt64 => 242.0 / 256.0,
        }
    }

    /// Parses sysfs's `8.0 GT/s PCIe`, `2.5 GT/s`, or plain `8`; `None` for `Unknown`.
    pub fn parse(text: &str) -> Option<Self> {
        let num = text.split_whitespace().next()?;
        let v: f64 = num.parse().ok()?;
        Self::ALL
            .iter()
            .find(|(_, _, g)| (g - v).abs() < 0.01)
            .map(|(s, _, _)| *s)
    }
}

impl fmt::Display for LinkSpeed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} GT/s", Self::ALL[*self as usize].1)
    }
}

impl Serialize for LinkSpeed {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for LinkSpeed {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        LinkSpeed::parse(&text).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "`{text}` is not a PCIe link speed (2.5, 5.0, 8.0, 16.0, 32.0 or 64.0 GT/s)"
            ))
        })
    }
}

/// A function's PCIe link: for an endpoint or switch upstream port the link above it,
/// for a root port or switch downstream port the link below it (as the PCIe Link Status
/// register of each reports).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Link {
    /// Negotiated rate.
    pub speed: LinkSpeed,
    /// Negotiated lanes.
    pub width: u8,
    /// Highest rate both ends support.
    pub max_speed: LinkSpeed,
    /// Lanes the slot offers.
    pub max_width: u8,
}

impl Link {
    /// Usable bandwidth of the negotiated link, one direction, in GB/s.
    pub fn gbytes_per_s(&self) -> f64 {
        self.speed.gts() * self.speed.encoding_efficiency() * f64::from(self.width) / 8.0
    }
}

impl fmt::Display for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} x{}", self.speed, self.width)?;
        if self.speed != self.max_speed || self.width != self.max_width {
            write!(f, " (max {} x{})", self.max_speed, self.max_width)?;
        }
        Ok(())
    }
}
