//! Address and identifier newtypes shared by every layer.
//!
//! Every address space of the system has its own type, the way rust-vmm's vm-memory
//! separates guest and host addresses: a CPU physical address ([`PhysAddr`]) can never be
//! handed to a device where a bus address ([`BusAddr`]) or a DMA address ([`DmaAddr`],
//! an [`Iova`] behind a translating IOMMU) is meant.
//! Arithmetic is explicit (`checked_add`, `offset_from`) and `Display` prints hex the way
//! the kernel and lspci do. This module owns no state and knows nothing of devices.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// log2 of the base page size.
pub const PAGE_SHIFT: u32 = 12;
/// The base page size, 4 KiB, as on x86-64 and most arm64 kernels.
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;

macro_rules! address_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub u64);

        impl $name {
            /// The raw value.
            pub const fn raw(self) -> u64 {
                self.0
            }

            /// `self + off`, or `None` on overflow.
            pub fn checked_add(self, off: u64) -> Option<Self> {
                self.0.checked_add(off).map(Self)
            }

            /// `self - base`, or `None` when `base` lies above `self`.
            pub fn offset_from(self, base: Self) -> Option<u64> {
                self.0.checked_sub(base.0)
            }

            /// Whether the address is a multiple of `align` (a power of two).
            pub fn is_aligned(self, align: u64) -> bool {
                debug_assert!(align.is_power_of_two());
                self.0 & (align - 1) == 0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }

        impl fmt::LowerHex for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::LowerHex::fmt(&self.0, f)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&format!("{:#x}", self.0))
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                parse_hex_u64(&text).map(Self).ok_or_else(|| {
                    serde::de::Error::custom(format!("`{text}` is not a hex address like 0x1000"))
                })
            }
        }
    };
}

address_type!(
    /// A CPU physical address (what /proc/iomem and a BAR's `resource` line show).
    PhysAddr
);
address_type!(
    /// A PCI bus address: what a device puts on the wire to reach a BAR. It differs from
    /// the CPU physical address when the host bridge translates (an `_TRA` offset).
    BusAddr
);
address_type!(
    /// An address a device uses for DMA: an IOVA behind an IOMMU, or a physical or bus
    /// address when the device is in passthrough or reaches a peer by bus address.
    DmaAddr
);
address_type!(
    /// An I/O virtual address inside one IOMMU domain: what a device behind a
    /// translating IOMMU puts on the wire, and what the IO page table translates.
    Iova
);
address_type!(
    /// A user-space virtual address inside one address space.
    VirtAddr
);

impl Iova {
    /// The DMA address a device uses for this IOVA.
    pub const fn dma(self) -> DmaAddr {
        DmaAddr(self.0)
    }
}

impl DmaAddr {
    /// This DMA address read as an IOVA (what it is for a device behind a translating
    /// IOMMU).
    pub const fn iova(self) -> Iova {
        Iova(self.0)
    }
}

/// A page frame number: a physical address divided by [`PAGE_SIZE`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pfn(pub u64);

impl Pfn {
    /// The physical address of the first byte of the frame.
    pub const fn addr(self) -> PhysAddr {
        PhysAddr(self.0 << PAGE_SHIFT)
    }

    /// The frame holding `addr`.
    pub const fn containing(addr: PhysAddr) -> Self {
        Pfn(addr.0 >> PAGE_SHIFT)
    }
}

impl fmt::Display for Pfn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pfn {:#x}", self.0)
    }
}

/// Parses `0x`-prefixed or bare hex.
pub(crate) fn parse_hex_u64(text: &str) -> Option<u64> {
    let t = text.trim();
    let t = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t);
    if t.is_empty() {
        return None;
    }
    u64::from_str_radix(t, 16).ok()
}

/// A PCI function address: domain (segment), bus, device, function.
///
/// # Invariants
/// `dev < 32` and `func < 8`, as in the 8-bit devfn the hardware uses. The domain is
/// 32 bits wide: Linux uses domains above 0xffff for VMD and some architectures
/// (the PA-RISC snapshot in shared/data has domain 0x10000).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bdf {
    domain: u32,
    bus: u8,
    dev: u8,
    func: u8,
}

/// Why a string is not a BDF.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{text}` is not a PCI address like 0000:01:00.0 ({reason})")]
pub struct BdfParseError {
    /// The rejected text.
    pub text: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl Bdf {
    /// Builds a BDF; `None` when `dev >= 32` or `func >= 8`.
    pub const fn new(domain: u32, bus: u8, dev: u8, func: u8) -> Option<Self> {
        if dev >= 32 || func >= 8 {
            return None;
        }
        Some(Bdf {
            domain,
            bus,
            dev,
            func,
        })
    }

    /// The PCI domain (segment group).
    pub const fn domain(self) -> u32 {
        self.domain
    }
    /// The bus number.
    pub const fn bus(self) -> u8 {
        self.bus
    }
    /// The device (slot) number, below 32.
    pub const fn dev(self) -> u8 {
        self.dev
    }
    /// The function number, below 8.
    pub const fn func(self) -> u8 {
        self.func
    }
    /// The 8-bit devfn as the kernel's `PCI_DEVFN()` packs it.
    pub const fn devfn(self) -> u8 {
        (self.dev << 3) | self.func
    }
    /// The same device's function `func`.
    pub const fn with_func(self, func: u8) -> Option<Self> {
        Bdf::new(self.domain, self.bus, self.dev, func)
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.dev, self.func
        )
    }
}

impl FromStr for Bdf {
    type Err = BdfParseError;

    /// Accepts `DDDD:BB:DD.F` and the short `BB:DD.F` (domain 0), as lspci does.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let err = |reason| BdfParseError {
            text: text.to_string(),
            reason,
        };
        let t = text.trim();
        let (head, func) = t.rsplit_once('.').ok_or_else(|| err("no `.function`"))?;
        let parts: Vec<&str> = head.split(':').collect();
        let (domain, bus, dev) = match parts.as_slice() {
            [d, b, s] => (*d, *b, *s),
            [b, s] => ("0", *b, *s),
            _ => return Err(err("expected domain:bus:device.function")),
        };
        fn hex(s: &str, e: BdfParseError) -> Result<&str, BdfParseError> {
            if s.is_empty() || !s.chars().all(|c| c.is_ascii_hexdigit()) {
                Err(e)
            } else {
                Ok(s)
            }
        }
        let domain = u32::from_str_radix(hex(domain, err("domain is not hex"))?, 16)
            .map_err(|_| err("domain wider than 32 bits"))?;
        let bus = u8::from_str_radix(hex(bus, err("bus is not hex"))?, 16)
            .map_err(|_| err("bus above 0xff"))?;
        let dev = u8::from_str_radix(hex(dev, err("device is not hex"))?, 16)
            .map_err(|_| err("device above 0x1f"))?;
        let func = u8::from_str_radix(hex(func, err("function is not hex"))?, 16)
            .map_err(|_| err("function above 7"))?;
        Bdf::new(domain, bus, dev, func).ok_or_else(|| err("device above 0x1f or function above 7"))
    }
}

impl Serialize for Bdf {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Bdf {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A root bus: the bus a host bridge opens, named like the sysfs `pci0000:00` directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BusId {
    /// The PCI domain.
    pub domain: u32,
    /// The bus number.
    pub bus: u8,
}

impl fmt::Display for BusId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04x}:{:02x}", self.domain, self.bus)
    }
}

impl FromStr for BusId {
    type Err = BdfParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let err = |reason| BdfParseError {
            text: text.to_string(),
            reason,
        };
        let (d, b) = text
            .trim()
            .split_once(':')
            .ok_or_else(|| err("expected domain:bus"))?;
        let domain = u32::from_str_radix(d, 16).map_err(|_| err("domain is not 32-bit hex"))?;
        let bus = u8::from_str_radix(b, 16).map_err(|_| err("bus is not 8-bit hex"))?;
        Ok(BusId { domain, bus })
    }
}

impl Serialize for BusId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for BusId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bdf_parses_and_prints_like_lspci() {
        let b: Bdf = "0000:3b:1f.7".parse().unwrap();
        assert_eq!((b.domain(), b.bus(), b.dev(), b.func()), (0, 0x3b, 0x1f, 7));
        assert_eq!(b.to_string(), "0000:3b:1f.7");
        assert_eq!(b.devfn(), 0xff);
        let short: Bdf = "02:00.1".parse().unwrap();
        assert_eq!(short.to_string(), "0000:02:00.1");
        let wide: Bdf = "10000:00:04.0".parse().unwrap();
        assert_eq!(wide.domain(), 0x10000);
        assert_eq!(wide.to_string(), "10000:00:04.0");
    }

    #[test]
    fn bdf_rejects_out_of_range_parts() {
        for bad in [
            "0000:00:20.0",
            "0000:00:00.8",
            "0000:100:00.0",
            "zz:00.0",
            "",
            "0000:00:00",
        ] {
            assert!(bad.parse::<Bdf>().is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn address_arithmetic_is_checked() {
        assert_eq!(PhysAddr(u64::MAX).checked_add(1), None);
        assert_eq!(BusAddr(0x2000).offset_from(BusAddr(0x1000)), Some(0x1000));
        assert_eq!(BusAddr(0x1000).offset_from(BusAddr(0x2000)), None);
        assert_eq!(Pfn::containing(PhysAddr(0x1fff)).addr(), PhysAddr(0x1000));
        assert_eq!(PhysAddr(0xfe00_0000).to_string(), "0xfe000000");
    }
}
