//! What the running kernel was built with and booted as, as far as peer DMA cares: its
//! release, the config options the P2PDMA, HMM and device-memory code need, the command
//! line, and each IOMMU group's domain type. Read from a machine's /proc, /boot and
//! /sys (live or a snapshot), or stated by a topology file; anything not read stays
//! unknown and says what would tell.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// The config options `peerdma check` reports, each with the kernel symbols that exist
/// only when it is built in (all are bool options, so a symbol's absence from a full
/// /proc/kallsyms means "not set").
pub const CONFIG_OPTIONS: [(&str, &str, &[&str]); 5] = [
    (
        "CONFIG_PCI_P2PDMA",
        "peer-to-peer DMA between PCI devices (drivers/pci/p2pdma.c)",
        &["pci_p2pdma_add_resource", "pci_alloc_p2pmem"],
    ),
    (
        "CONFIG_ZONE_DEVICE",
        "struct pages for device memory (memremap_pages), which P2PDMA and HMM need",
        &["memremap_pages"],
    ),
    (
        "CONFIG_DEVICE_PRIVATE",
        "device-private memory that the CPU faults back to RAM (HMM migration)",
        &["make_device_exclusive", "make_device_exclusive_range"],
    ),
    (
        "CONFIG_HMM_MIRROR",
        "hmm_range_fault, mirroring a process's page table into a device",
        &["hmm_range_fault"],
    ),
    (
        "CONFIG_DMABUF_MOVE_NOTIFY",
        "dynamic dma-buf importers (move_notify), as RDMA uses for GPU memory",
        &[],
    ),
];

/// How a config option was built.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ConfigState {
    /// `=y`.
    BuiltIn,
    /// `=m`.
    Module,
    /// `is not set`.
    Off,
}

impl ConfigState {
    /// Whether the feature is there (built in or a module).
    pub fn enabled(self) -> bool {
        self != ConfigState::Off
    }
}

impl fmt::Display for ConfigState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConfigState::BuiltIn => "y",
            ConfigState::Module => "m",
            ConfigState::Off => "n",
        })
    }
}

impl Serialize for ConfigState {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ConfigState {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match String::deserialize(d)?.as_str() {
            "y" => Ok(ConfigState::BuiltIn),
            "m" => Ok(ConfigState::Module),
            "n" => Ok(ConfigState::Off),
            other => Err(serde::de::Error::custom(format!(
                "`{other}` is not a config state: y, m or n"
            ))),
        }
    }
}

/// The IOMMU as the kernel set it up, summed over its groups.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum IommuMode {
    /// No IOMMU groups: DMA uses physical addresses.
    Off,
    /// Every group is `identity`: DMA addresses are physical (iommu=pt).
    Passthrough,
    /// Some group translates (`DMA`, `DMA-FQ`): DMA addresses are IOVAs.
    Translated,
}

impl fmt::Display for IommuMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IommuMode::Off => "off",
            IommuMode::Passthrough => "passthrough (identity)",
            IommuMode::Translated => "translated",
        })
    }
}

/// What is known of the kernel. Every field may be unknown; what an importer could not
/// read, and why, is in [`Gaps::kernel_unread`](crate::fabric::Gaps::kernel_unread).
///
/// # Invariants
/// `config` holds only options of [`CONFIG_OPTIONS`]; `config_source` is `Some` when
/// `config` is not empty.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelFacts {
    /// `uname -r`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<String>,
    /// The options of [`CONFIG_OPTIONS`] that could be told, by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, ConfigState>,
    /// Where `config` came from: `/boot/config-6.8.0`, `/proc/config.gz`, or
    /// `/proc/kallsyms` (symbols that exist only with an option).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_source: Option<String>,
    /// The kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// Each IOMMU group's default domain type (`identity`, `DMA`, `DMA-FQ`, ...), by
    /// group number.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        with = "group_keys"
    )]
    pub iommu_groups: BTreeMap<u32, String>,
}

impl KernelFacts {
    /// Whether nothing at all is known.
    pub fn is_empty(&self) -> bool {
        self.release.is_none()
            && self.config.is_empty()
            && self.cmdline.is_none()
            && self.iommu_groups.is_empty()
    }

    /// The state of `option`, `None` when unknown.
    pub fn config(&self, option: &str) -> Option<ConfigState> {
        self.config.get(option).copied()
    }

    /// The IOMMU mode over all groups, given whether the machine has any (`iommu` of
    /// [`HostInfo`](crate::fabric::HostInfo)).
    pub fn iommu_mode(&self, any_groups: Option<bool>) -> Option<IommuMode> {
        if !self.iommu_groups.is_empty() {
            let translated = self
                .iommu_groups
                .values()
                .any(|t| t.starts_with("DMA") || t == "unmanaged");
            return Some(if translated {
                IommuMode::Translated
            } else {
                IommuMode::Passthrough
            });
        }
        match any_groups {
            Some(false) => Some(IommuMode::Off),
            _ => None,
        }
    }

    /// The command-line options that change IOMMU or ACS behaviour (`iommu=pt`,
    /// `intel_iommu=on`, `amd_iommu=off`, `iommu.passthrough=1`,
    /// `pci=disable_acs_redir=...`, ...).
    pub fn relevant_cmdline(&self) -> Vec<&str> {
        let Some(c) = &self.cmdline else {
            return Vec::new();
        };
        c.split_whitespace()
            .take_while(|t| *t != "--")
            .filter(|t| {
                [
                    "iommu=",
                    "intel_iommu=",
                    "amd_iommu=",
                    "iommu.",
                    "pcie_acs_override=",
                ]
                .iter()
                .any(|p| t.starts_with(p))
                    || (t.starts_with("pci=")
                        && t.split([',', '=']).any(|o| {
                            matches!(o, "disable_acs_redir" | "noats" | "realloc" | "nocrs")
                        }))
            })
            .collect()
    }
}

/// Group numbers as TOML keys, which are strings: `0 = "identity"`.
mod group_keys {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(m: &BTreeMap<u32, String>, s: S) -> Result<S::Ok, S::Error> {
        let as_text: BTreeMap<String, &String> =
            m.iter().map(|(k, v)| (k.to_string(), v)).collect();
        as_text.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<u32, String>, D::Error> {
        BTreeMap::<String, String>::deserialize(d)?
            .into_iter()
            .map(|(k, v)| {
                k.parse::<u32>().map(|g| (g, v)).map_err(|_| {
                    serde::de::Error::custom(format!("`{k}` is not an IOMMU group number"))
                })
            })
            .collect()
    }
}

/// Reads `CONFIG_X=y` / `# CONFIG_X is not set` lines of a kernel config for the
/// options of [`CONFIG_OPTIONS`]. An option the text does not mention does not exist
/// in that kernel's Kconfig, which for these bool options means off.
pub fn parse_config(text: &str) -> BTreeMap<String, ConfigState> {
    let mut out = BTreeMap::new();
    for (name, _, _) in CONFIG_OPTIONS {
        let mut state = ConfigState::Off;
        for line in text.lines() {
            let l = line.trim();
            if let Some(v) = l.strip_prefix(name).and_then(|r| r.strip_prefix('=')) {
                state = match v.trim() {
                    "y" => ConfigState::BuiltIn,
                    "m" => ConfigState::Module,
                    _ => ConfigState::Off,
                };
            }
        }
        out.insert(name.to_string(), state);
    }
    out
}

/// The options [`CONFIG_OPTIONS`] can tell from the symbol names of /proc/kallsyms;
/// `None` when the text is not a symbol table (an empty or cut file).
pub fn config_from_kallsyms(text: &str) -> Option<BTreeMap<String, ConfigState>> {
    let names: std::collections::HashSet<&str> = text
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .collect();
    // Every kernel has these; without them the table is not a full one.
    if !names.contains("schedule") || names.len() < 1000 {
        return None;
    }
    Some(
        CONFIG_OPTIONS
            .iter()
            .filter(|(_, _, syms)| !syms.is_empty())
            .map(|(name, _, syms)| {
                let on = syms.iter().any(|s| names.contains(s));
                (
                    name.to_string(),
                    if on {
                        ConfigState::BuiltIn
                    } else {
                        ConfigState::Off
                    },
                )
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_lines_and_symbols_give_the_options() {
        let c = parse_config(
            "CONFIG_ZONE_DEVICE=y\n# CONFIG_DEVICE_PRIVATE is not set\nCONFIG_HMM_MIRROR=y\n# CONFIG_PCI_P2PDMA is not set\n",
        );
        assert_eq!(c["CONFIG_ZONE_DEVICE"], ConfigState::BuiltIn);
        assert_eq!(c["CONFIG_PCI_P2PDMA"], ConfigState::Off);
        assert_eq!(c["CONFIG_DEVICE_PRIVATE"], ConfigState::Off);
        // Not mentioned: not in that kernel's Kconfig.
        assert_eq!(c["CONFIG_DMABUF_MOVE_NOTIFY"], ConfigState::Off);
        let mut syms = String::from("0000000000000000 T schedule\n");
        for i in 0..1000 {
            syms.push_str(&format!("0000000000000000 t helper_{i}\n"));
        }
        syms.push_str(
            "0000000000000000 T pci_p2pdma_add_resource\n0000000000000000 T memremap_pages\n",
        );
        let k = config_from_kallsyms(&syms).unwrap();
        assert_eq!(k["CONFIG_PCI_P2PDMA"], ConfigState::BuiltIn);
        assert_eq!(k["CONFIG_HMM_MIRROR"], ConfigState::Off);
        assert!(!k.contains_key("CONFIG_DMABUF_MOVE_NOTIFY"));
        assert_eq!(config_from_kallsyms(""), None);
    }

    #[test]
    fn iommu_mode_and_cmdline() {
        let mut k = KernelFacts::default();
        assert_eq!(k.iommu_mode(None), None);
        assert_eq!(k.iommu_mode(Some(false)), Some(IommuMode::Off));
        k.iommu_groups.insert(1, "identity".into());
        assert_eq!(k.iommu_mode(Some(true)), Some(IommuMode::Passthrough));
        k.iommu_groups.insert(2, "DMA-FQ".into());
        assert_eq!(k.iommu_mode(Some(true)), Some(IommuMode::Translated));
        k.cmdline = Some(
            "BOOT_IMAGE=/vmlinuz root=/dev/sda1 intel_iommu=on iommu=pt pci=noaer,disable_acs_redir=0000:02:08.0 quiet -- iommu=off".into(),
        );
        assert_eq!(
            k.relevant_cmdline(),
            [
                "intel_iommu=on",
                "iommu=pt",
                "pci=noaer,disable_acs_redir=0000:02:08.0"
            ]
        );
    }
}
