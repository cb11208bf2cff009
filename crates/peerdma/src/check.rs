//! `peerdma check`: is a machine ready for peer-to-peer DMA, and if not, exactly why.
//!
//! The questions people ask gdscheck, `nvidia-smi topo -p2p` and NCCL's topology log,
//! answered from the kernel's own rules for any vendor: whether the kernel was built
//! with P2PDMA and the device-memory options, how the IOMMU is set up, which p2p memory
//! providers exist, the verdict and a status for each interesting pair of devices with
//! the fix a person can apply, and which NIC and drive is closest to each GPU.
//!
//! A fact the source does not give is reported unknown with what would tell; a status
//! is never guessed from it.

use serde::Serialize;

use crate::drivers::nvme::{CmbPlan, CmbRegs};
use crate::fabric::{
    calc_map_type_and_dist, topo_level, topo_level_uncertain, DeviceClass, FnId, HostBridgeCheck,
    IommuMode, MapType, TopoLevel, Topology, CONFIG_OPTIONS,
};

/// The JSON schema name of [`CheckReport`] (docs/json.md).
pub const SCHEMA: &str = "peerdma-check/1";

/// Everything `peerdma check` reports.
#[derive(Clone, Debug, Serialize)]
pub struct CheckReport {
    /// [`SCHEMA`].
    pub schema: &'static str,
    /// Where the machine came from.
    pub source: String,
    /// Kernel readiness.
    pub kernel: KernelReadiness,
    /// p2p memory the kernel registered, and NVMe buffers it would.
    pub providers: Vec<ProviderRow>,
    /// The pairs checked.
    pub pairs: Vec<PairCheck>,
    /// For each GPU, the closest NICs and NVMe drives.
    pub affinity: Vec<Affinity>,
    /// What could not be read, and what would tell.
    pub not_read: Vec<String>,
    /// Whether every pair that decides the exit status can do P2P (exit 0).
    pub ok: bool,
    /// Which pairs decided `ok`: `requested` or `gpu-to-nvme-and-nic`.
    pub decided_by: &'static str,
}

/// What is known of the kernel.
#[derive(Clone, Debug, Serialize)]
pub struct KernelReadiness {
    /// `uname -r`, when known.
    pub release: Option<String>,
    /// Where the config came from, when known.
    pub config_source: Option<String>,
    /// Each option of [`CONFIG_OPTIONS`]: `y`, `m`, `n` or null (unknown).
    pub config: Vec<ConfigRow>,
    /// Whether the kernel can do P2PDMA (CONFIG_PCI_P2PDMA and CONFIG_ZONE_DEVICE);
    /// null when unknown.
    pub p2pdma: Option<bool>,
    /// `off`, `passthrough` or `translated`; null when unknown.
    pub iommu: Option<IommuMode>,
    /// The IOMMU groups' domain types and how many groups have each.
    pub iommu_group_types: Vec<GroupType>,
    /// Command-line options that change IOMMU or ACS behaviour.
    pub cmdline_options: Vec<String>,
}

/// A domain type of IOMMU groups and how many groups have it.
#[derive(Clone, Debug, Serialize)]
pub struct GroupType {
    /// `identity`, `DMA`, `DMA-FQ`, `blocked`, `unmanaged`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Groups of that type.
    pub groups: usize,
}

/// One config option.
#[derive(Clone, Debug, Serialize)]
pub struct ConfigRow {
    /// `CONFIG_PCI_P2PDMA`, ...
    pub option: &'static str,
    /// `y`, `m`, `n`; null when unknown.
    pub state: Option<String>,
    /// What it gives.
    pub meaning: &'static str,
}

/// A p2p memory provider, or an NVMe buffer that is or would be one.
#[derive(Clone, Debug, Serialize)]
pub struct ProviderRow {
    /// The function.
    pub bdf: String,
    /// `p2pmem` (registered, from sysfs) or `nvme-cmb` (from the controller's registers).
    pub kind: &'static str,
    /// Bytes.
    pub size: Option<u64>,
    /// Bytes not allocated (p2pmem only).
    pub available: Option<u64>,
    /// Whether other drivers may use it.
    pub published: Option<bool>,
    /// A sentence: what it is, or why the driver leaves it alone.
    pub status: String,
}

/// The verdict and status for one pair.
#[derive(Clone, Debug, Serialize)]
pub struct PairCheck {
    /// The provider (whose memory is the target).
    pub a: String,
    /// The client (the device doing the DMA).
    pub b: String,
    /// `gpu-nvme`, `gpu-nic`, `nvme-nvme`, `gpu-gpu`, `nic-nvme` or `requested`.
    pub kind: String,
    /// The kernel's map type.
    pub map_type: MapType,
    /// The kernel's distance.
    pub distance: u32,
    /// The `nvidia-smi topo -m` level.
    pub level: TopoLevel,
    /// The level is NODE only because a NUMA node is unknown.
    pub level_uncertain: bool,
    /// `ok`, `not-supported` (the kernel lacks P2PDMA), `chipset-not-supported` (the
    /// host bridge) or `unknown`, in the spirit of `nvidia-smi topo -p2p`'s OK / NS /
    /// CNS / U.
    pub status: &'static str,
    /// Why, in the kernel's terms.
    pub reason: String,
    /// Warnings on a pair that works: ACS redirect, NUMA, the IOMMU.
    pub warnings: Vec<String>,
    /// What a person can do about it.
    pub fixes: Vec<String>,
}

impl PairCheck {
    /// Whether the pair can do P2P.
    pub fn ok(&self) -> bool {
        self.status == "ok"
    }
}

/// The devices closest to one GPU.
#[derive(Clone, Debug, Serialize)]
pub struct Affinity {
    /// The GPU.
    pub gpu: String,
    /// The closest NICs (ties all listed), with their distance.
    pub nics: Vec<Nearest>,
    /// The closest NVMe drives.
    pub nvme: Vec<Nearest>,
    /// When the closest is only reachable through the host bridge, or across NUMA nodes.
    pub warnings: Vec<String>,
}

/// One nearest device.
#[derive(Clone, Debug, Serialize)]
pub struct Nearest {
    /// Its BDF.
    pub bdf: String,
    /// The kernel's distance.
    pub distance: u32,
    /// The nvidia-smi level.
    pub level: TopoLevel,
    /// The kernel's map type.
    pub map_type: MapType,
}

/// Checks `topo`. `pairs` are the pairs asked for (provider, client); `None` checks the
/// interesting ones: GPU to NVMe, GPU to NIC, NVMe to NVMe, GPU to GPU and NIC to NVMe,
/// of which GPU to NVMe and GPU to NIC decide `ok`.
pub fn check(topo: &Topology, pairs: Option<&[(FnId, FnId)]>) -> CheckReport {
    let kernel = readiness(topo);
    let mut not_read = topo.gaps().kernel_unread.clone();
    if kernel.release.is_none() && not_read.is_empty() {
        not_read.push(format!(
            "the kernel: {} does not say which kernel runs (a sysfs snapshot taken by `peerdma \
             topo --save`, or a [host.kernel] table, does)",
            topo.source()
        ));
    }
    if kernel.p2pdma.is_none() && kernel.release.is_some() {
        not_read.push(
            "whether the kernel has CONFIG_PCI_P2PDMA: /boot/config-<release>, \
             /proc/config.gz (CONFIG_IKCONFIG_PROC) or /proc/kallsyms would tell"
                .to_string(),
        );
    }
    if kernel.iommu.is_none() {
        not_read.push("the IOMMU state: sys/kernel/iommu_groups would tell".to_string());
    }
    let g = topo.gaps();
    if g.acs_unknown > 0 {
        not_read.push(format!(
            "ACS of {} functions ({})",
            g.acs_unknown,
            if g.acs_hint.is_empty() {
                "the source does not give it"
            } else {
                g.acs_hint
            }
        ));
    }
    if g.numa_unknown {
        not_read.push("NUMA nodes: NODE and SYS cannot be told apart".to_string());
    }
    let class = |id: FnId| topo.function(id).device_class();
    let of = |c: DeviceClass| -> Vec<FnId> { topo.ids().filter(|&i| class(i) == c).collect() };
    let (gpus, nics, nvmes) = (
        of(DeviceClass::Gpu),
        of(DeviceClass::Nic),
        of(DeviceClass::Nvme),
    );
    let mut checks = Vec::new();
    let decided_by;
    let mut deciding = Vec::new();
    match pairs {
        Some(p) => {
            decided_by = "requested";
            for &(a, b) in p {
                deciding.push(checks.len());
                checks.push(pair(topo, &kernel, a, b, "requested".into()));
            }
        }
        None => {
            decided_by = "gpu-to-nvme-and-nic";
            // Each unordered pair once: within one class, only x < y.
            let mut add = |xs: &[FnId], ys: &[FnId], kind: &str, decides: bool, same: bool| {
                for &x in xs {
                    for &y in ys {
                        if same && x >= y {
                            continue;
                        }
                        if decides {
                            deciding.push(checks.len());
                        }
                        checks.push(pair(topo, &kernel, x, y, kind.to_string()));
                    }
                }
            };
            add(&gpus, &nvmes, "gpu-nvme", true, false);
            add(&gpus, &nics, "gpu-nic", true, false);
            add(&nvmes, &nvmes, "nvme-nvme", false, true);
            add(&gpus, &gpus, "gpu-gpu", false, true);
            add(&nics, &nvmes, "nic-nvme", false, false);
        }
    }
    let ok = deciding.iter().all(|&i| checks[i].ok());
    CheckReport {
        schema: SCHEMA,
        source: topo.source().to_string(),
        providers: providers(topo),
        affinity: gpus
            .iter()
            .map(|&g| affinity(topo, g, &nics, &nvmes))
            .collect(),
        kernel,
        pairs: checks,
        not_read,
        ok,
        decided_by,
    }
}

fn readiness(topo: &Topology) -> KernelReadiness {
    let k = &topo.host().kernel;
    let config: Vec<ConfigRow> = CONFIG_OPTIONS
        .iter()
        .map(|(option, meaning, _)| ConfigRow {
            option,
            state: k.config(option).map(|s| s.to_string()),
            meaning,
        })
        .collect();
    let p2pdma = match (
        k.config("CONFIG_PCI_P2PDMA"),
        k.config("CONFIG_ZONE_DEVICE"),
    ) {
        (Some(p), Some(z)) => Some(p.enabled() && z.enabled()),
        // PCI_P2PDMA depends on ZONE_DEVICE: the one tells for both.
        (Some(p), None) => Some(p.enabled()),
        _ => None,
    };
    let mut types: Vec<GroupType> = Vec::new();
    for t in k.iommu_groups.values() {
        match types.iter_mut().find(|g| &g.kind == t) {
            Some(g) => g.groups += 1,
            None => types.push(GroupType {
                kind: t.clone(),
                groups: 1,
            }),
        }
    }
    KernelReadiness {
        release: k.release.clone(),
        config_source: k.config_source.clone(),
        config,
        p2pdma,
        iommu: k.iommu_mode(topo.host().iommu),
        iommu_group_types: types,
        cmdline_options: k.relevant_cmdline().iter().map(|s| s.to_string()).collect(),
    }
}

fn providers(topo: &Topology) -> Vec<ProviderRow> {
    let mut out = Vec::new();
    for f in topo.functions() {
        if let Some(p) = f.p2pmem {
            out.push(ProviderRow {
                bdf: f.bdf.to_string(),
                kind: "p2pmem",
                size: Some(p.size),
                available: Some(p.available),
                published: Some(p.published),
                status: format!(
                    "registered p2p memory, {}",
                    if p.published {
                        "published: any driver may allocate from it"
                    } else {
                        "not published: only its own driver uses it"
                    }
                ),
            });
        }
        if let Some(c) = f.nvme_cmb {
            let regs = CmbRegs {
                cmbsz: c.cmbsz,
                cmbloc: c.cmbloc,
            };
            let (size, published, status) = match regs.plan(&f.bars) {
                CmbPlan::Absent => (None, None, "no buffer (CMBSZ is 0)".to_string()),
                CmbPlan::Skipped(why) => {
                    (None, None, format!("not used by the nvme driver: {why}"))
                }
                CmbPlan::Usable {
                    bar,
                    offset,
                    size,
                    published,
                } => (
                    Some(size),
                    Some(published),
                    format!(
                        "controller memory buffer in BAR {bar} at offset {offset:#x}: the nvme \
                         driver registers it{}",
                        if published {
                            " and publishes it (WDS and RDS)"
                        } else {
                            " but does not publish it: the controller lacks WDS or RDS"
                        }
                    ),
                ),
            };
            out.push(ProviderRow {
                bdf: f.bdf.to_string(),
                kind: "nvme-cmb",
                size,
                available: None,
                published,
                status,
            });
        }
    }
    out
}

fn pair(topo: &Topology, kernel: &KernelReadiness, a: FnId, b: FnId, kind: String) -> PairCheck {
    let v = calc_map_type_and_dist(topo, a, b);
    let level = topo_level(topo, a, b);
    let level_uncertain = topo_level_uncertain(topo, a, b);
    let mut warnings = Vec::new();
    let mut fixes = Vec::new();
    let redirect: Vec<String> = v.acs_redirect.iter().map(|b| b.to_string()).collect();
    let status = if kernel.p2pdma == Some(false) {
        fixes.push(
            "boot a kernel built with CONFIG_PCI_P2PDMA=y and CONFIG_ZONE_DEVICE=y (most \
             distribution kernels since 5.x have them; check /boot/config-$(uname -r))"
                .to_string(),
        );
        "not-supported"
    } else if v.map_type == MapType::NotSupported {
        if v.cpu_unknown {
            fixes.push(
                "say which CPU it is (an AMD Zen or newer CPU forwards peer traffic between \
                 any root complexes): /proc/cpuinfo in the snapshot, or [host] cpu_vendor and \
                 cpu_family in a topology file"
                    .to_string(),
            );
            "unknown"
        } else {
            for h in &v.host_bridges {
                match h {
                    HostBridgeCheck::NotListed { root, id } => fixes.push(format!(
                        "host bridge {root} ({id}) is not on the kernel's P2PDMA allowlist \
                         (pci_p2pdma_whitelist); no boot option changes that: put both \
                         devices below one PCIe switch, or use a platform the kernel lists \
                         (AMD Zen and newer, listed Intel Xeon host bridges)"
                    )),
                    HostBridgeCheck::SameHostBridgeOnly { root, id } => fixes.push(format!(
                        "host bridge {root} ({id}) forwards peer traffic only between its own \
                         ports: put both devices below one root complex"
                    )),
                    HostBridgeCheck::NoIdentifyingFunction { root } => fixes.push(format!(
                        "root bus {root} has no 00.0 function for the kernel to identify the \
                         host bridge by: put both devices below one PCIe switch"
                    )),
                    _ => {}
                }
            }
            if !redirect.is_empty() {
                fixes.push(format!(
                    "ACS redirect on {} forces the host-bridge path; clearing it \
                     (pci=disable_acs_redir={}) gives a path by bus address through the switch",
                    redirect.join(", "),
                    redirect.join(";")
                ));
            }
            "chipset-not-supported"
        }
    } else if v.uncertain() || kernel.p2pdma.is_none() {
        if kernel.p2pdma.is_none() {
            fixes.push(
                "find out whether the kernel has CONFIG_PCI_P2PDMA: run `peerdma check` on the \
                 machine (as root if /boot is not readable), or state it in the topology file's \
                 [host.kernel.config]"
                    .to_string(),
            );
        }
        if v.uncertain() {
            let unknown: Vec<String> = v.acs_unknown.iter().map(|b| b.to_string()).collect();
            let mut fix = format!(
                "read ACS on {}: {}",
                unknown.join(", "),
                if topo.gaps().acs_hint.is_empty() {
                    "the source does not give it"
                } else {
                    topo.gaps().acs_hint
                }
            );
            if kernel.iommu == Some(IommuMode::Translated) {
                fix.push_str(
                    "; with the IOMMU translating, the kernel enables ACS redirect on switch \
                     downstream ports (pci_enable_acs), so expect the host-bridge path",
                );
            }
            fixes.push(fix);
        }
        "unknown"
    } else {
        if v.map_type == MapType::ThruHostBridge {
            if !redirect.is_empty() {
                warnings.push(format!(
                    "ACS redirect on {} sends it through the root complex; for a path by bus \
                     address through the switch boot with pci=disable_acs_redir={}",
                    redirect.join(", "),
                    redirect.join(";")
                ));
            }
            if kernel.iommu == Some(IommuMode::Translated) {
                warnings.push(
                    "the IOMMU translates: the peer's BAR is mapped as an IOVA for each \
                     transfer (iommu=pt makes it a physical address)"
                        .to_string(),
                );
            }
        }
        "ok"
    };
    PairCheck {
        a: topo.function(a).bdf.to_string(),
        b: topo.function(b).bdf.to_string(),
        kind,
        map_type: v.map_type,
        distance: v.distance,
        level,
        level_uncertain,
        status,
        reason: v.reason(),
        warnings,
        fixes,
    }
}

fn affinity(topo: &Topology, gpu: FnId, nics: &[FnId], nvmes: &[FnId]) -> Affinity {
    let nearest = |set: &[FnId]| -> Vec<Nearest> {
        let all: Vec<Nearest> = set
            .iter()
            .map(|&d| {
                let v = calc_map_type_and_dist(topo, d, gpu);
                Nearest {
                    bdf: topo.function(d).bdf.to_string(),
                    distance: v.distance,
                    level: topo_level(topo, d, gpu),
                    map_type: v.map_type,
                }
            })
            .collect();
        let best = all.iter().map(|n| (n.map_type, n.distance)).min();
        all.into_iter()
            .filter(|n| Some((n.map_type, n.distance)) == best)
            .collect()
    };
    let (n, d) = (nearest(nics), nearest(nvmes));
    let mut warnings = Vec::new();
    for (what, list) in [("NIC", &n), ("NVMe drive", &d)] {
        if let Some(x) = list.first() {
            match x.map_type {
                MapType::BusAddr => {}
                MapType::ThruHostBridge => warnings.push(format!(
                    "the closest {what} ({}) is reachable only through the host bridge",
                    x.bdf
                )),
                MapType::NotSupported => warnings.push(format!(
                    "no {what} is reachable: the kernel refuses even the closest ({})",
                    x.bdf
                )),
            }
            if x.level == TopoLevel::SYS {
                warnings.push(format!(
                    "the closest {what} ({}) is on another NUMA node",
                    x.bdf
                ));
            }
        }
    }
    Affinity {
        gpu: topo.function(gpu).bdf.to_string(),
        nics: n,
        nvme: d,
        warnings,
    }
}
