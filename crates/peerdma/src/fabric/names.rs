//! Readable names for vendor and device IDs, from the pci.ids database that the
//! `pci-ids` crate embeds (the same database lspci uses), and for class codes.

use pci_ids::{Device, FromId, Subclass, Vendor};

/// The vendor's name, or `None` when pci.ids does not know it.
pub fn vendor_name(vendor: u16) -> Option<&'static str> {
    Vendor::from_id(vendor).map(|v| v.name())
}

/// A name in lspci's style: `Vendor Device`, falling back to `Vendor Device 1234`,
/// `Class [vvvv:dddd]` when even the vendor is unknown.
pub fn device_name(vendor: u16, device: u16, class: u32) -> String {
    // pci.ids lists ffff as "Illegal Vendor ID"; here it means the source gave none.
    if vendor == crate::fabric::Function::UNKNOWN_ID {
        return format!("{} (id unknown)", class_name(class));
    }
    if let Some(d) = Device::from_vid_pid(vendor, device) {
        return format!("{} {}", d.vendor().name(), d.name());
    }
    match vendor_name(vendor) {
        Some(v) => format!("{v} Device {device:04x}"),
        None => format!("{} [{vendor:04x}:{device:04x}]", class_name(class)),
    }
}

/// The class code's name (`Non-Volatile memory controller`), or `Class xxxx`.
pub fn class_name(class: u32) -> String {
    let base = (class >> 16) as u8;
    let sub = (class >> 8) as u8;
    Subclass::from_cid_sid(base, sub)
        .map(|s| s.name().to_string())
        .unwrap_or_else(|| format!("Class {:04x}", class >> 8))
}

/// The 16-bit class code (base and sub) whose pci.ids name is `name`, as lspci prints a
/// class without `-nn`; a base class's own name gives sub-class 0x80 ("other").
pub fn class_from_name(name: &str) -> Option<u16> {
    let name = name.trim();
    pci_ids::Classes::iter()
        .find_map(|c| {
            c.subclasses()
                .find(|s| s.name() == name)
                .map(|s| u16::from(c.id()) << 8 | u16::from(s.id()))
        })
        .or_else(|| {
            pci_ids::Classes::iter()
                .find(|c| c.name() == name)
                .map(|c| u16::from(c.id()) << 8 | 0x80)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_pci_ids() {
        assert_eq!(vendor_name(0x8086), Some("Intel Corporation"));
        assert!(device_name(0x10de, 0x2330, 0x030200).starts_with("NVIDIA Corporation"));
        assert_eq!(class_name(0x010802), "Non-Volatile memory controller");
        assert_eq!(
            class_from_name("Non-Volatile memory controller"),
            Some(0x0108)
        );
        assert_eq!(class_from_name("PCI bridge"), Some(0x0604));
        assert_eq!(class_from_name("3D controller"), Some(0x0302));
        assert_eq!(class_from_name("Infiniband controller"), Some(0x0207));
        assert_eq!(class_from_name("No such class"), None);
        let unassigned = (1..=0xfffe_u16)
            .find(|v| vendor_name(*v).is_none())
            .unwrap();
        assert_eq!(
            device_name(unassigned, 0x1, 0x020000),
            format!("Ethernet controller [{unassigned:04x}:0001]")
        );
    }
}
