//! Built-in machines, each shipped as a TOML file under `presets/` in this crate and
//! compiled in, so `--preset NAME` and `--file presets/NAME.toml` give the same model.

use crate::fabric::error::FabricError;
use crate::fabric::import::file;
use crate::fabric::model::Topology;

/// `(name, what it is, TOML text)`.
pub const PRESETS: [(&str, &str, &str); 4] = [
    (
        "workstation",
        "two GPUs and an NVMe under one PCIe switch, another NVMe on its own root port",
        include_str!("../../../presets/workstation.toml"),
    ),
    (
        "dgx",
        "dual-socket server: 8 GPUs and 8 NICs under 4 PCIe switches, one per root port",
        include_str!("../../../presets/dgx.toml"),
    ),
    (
        "dgx-acs",
        "the dgx server with ACS request/completion redirect on every switch downstream port",
        include_str!("../../../presets/dgx-acs.toml"),
    ),
    (
        "q35",
        "a QEMU q35 guest: one flat root bus, no switch, host bridge 8086:29c0 (not allowlisted)",
        include_str!("../../../presets/q35.toml"),
    ),
];

/// The preset called `name`.
pub fn preset(name: &str) -> Result<Topology, FabricError> {
    preset_shared(name).map(|t| (*t).clone())
}

/// [`preset`] without the copy: the one parsed model, shared (what a scenario compiled
/// once per fuzz seed uses).
pub fn preset_shared(name: &str) -> Result<std::sync::Arc<Topology>, FabricError> {
    static PARSED: [std::sync::OnceLock<Option<std::sync::Arc<Topology>>>; PRESETS.len()] =
        [const { std::sync::OnceLock::new() }; PRESETS.len()];
    let i = PRESETS
        .iter()
        .position(|(n, _, _)| *n == name)
        .ok_or_else(|| FabricError::UnknownPreset {
            name: name.to_string(),
            known: PRESETS.map(|p| p.0).join(", "),
        })?;
    let (n, _, text) = PRESETS[i];
    let parse = || file::parse(&format!("preset {n}"), text);
    match PARSED[i].get_or_init(|| parse().ok().map(std::sync::Arc::new)) {
        Some(t) => Ok(t.clone()),
        None => parse().map(std::sync::Arc::new),
    }
}

/// A generated machine of exactly `functions` functions (at least one per host
/// bridge): host bridges in domains of their own, each with root ports leading to a
/// PCIe switch with eight downstream ports and a two-function endpoint below each.
/// Every other switch has ACS redirect on its downstream ports. For benchmarks and
/// scale tests.
pub fn synthetic(functions: usize) -> Topology {
    use crate::addr::{Bdf, BusId};
    use crate::fabric::model::{
        Acs, AcsFlags, BusRange, Function, FunctionSpec, Gaps, HostBridge, HostInfo, Link,
        LinkSpeed, PortKind,
    };
    const PER_PORT: usize = 1 + 1 + 8 + 16;
    const PORTS_PER_HOST: usize = 24;
    let link = Link {
        speed: LinkSpeed::Gt16,
        width: 16,
        max_speed: LinkSpeed::Gt16,
        max_width: 16,
    };
    let acs = |ctrl| Acs::Present {
        cap: AcsFlags(0x7f),
        ctrl: AcsFlags(ctrl),
    };
    let mut specs = Vec::with_capacity(functions);
    let mut host_bridges = Vec::new();
    let push = |specs: &mut Vec<FunctionSpec>, bdf: Bdf, class, kind, buses, acs, numa, group| {
        specs.push(FunctionSpec {
            function: Function {
                vendor: if kind == PortKind::Endpoint {
                    0x10de
                } else {
                    0x8086
                },
                device: if kind == PortKind::Endpoint {
                    0x20b0
                } else {
                    0x2030
                },
                class,
                kind,
                buses,
                link: (kind != PortKind::HostBridge).then_some(link),
                acs,
                iommu_group: Some(group),
                numa_node: Some(numa),
                ..Function::bare(bdf)
            },
            parent: None,
            kind_known: true,
        })
    };
    let mut domain = 0u32;
    'outer: while specs.len() < functions {
        let numa = domain % 2;
        host_bridges.push(HostBridge {
            root: BusId { domain, bus: 0 },
            numa_node: Some(numa),
        });
        let bdf = |bus: usize, dev: usize, func: usize| {
            Bdf::new(domain, bus as u8, dev as u8, func as u8).unwrap_or_else(|| unreachable!())
        };
        let host_group = domain * (PORTS_PER_HOST as u32 + 1);
        push(
            &mut specs,
            bdf(0, 0, 0),
            0x060000,
            PortKind::HostBridge,
            None,
            Acs::Absent,
            numa,
            host_group,
        );
        for port in 0..PORTS_PER_HOST {
            let base = 1 + port * 10; // buses base..base+9
            let range = |s: usize, e: usize| {
                Some(BusRange {
                    secondary: s as u8,
                    subordinate: e as u8,
                })
            };
            let redirect = if port % 2 == 1 {
                AcsFlags::RR | AcsFlags::CR
            } else {
                0
            };
            let mut members = vec![(
                bdf(0, port + 1, 0),
                0x060400,
                PortKind::RootPort,
                range(base, base + 9),
                acs(0),
            )];
            members.push((
                bdf(base, 0, 0),
                0x060400,
                PortKind::SwitchUpstream,
                range(base + 1, base + 9),
                Acs::Absent,
            ));
            for d in 0..8 {
                members.push((
                    bdf(base + 1, d, 0),
                    0x060400,
                    PortKind::SwitchDownstream,
                    range(base + 2 + d, base + 2 + d),
                    acs(redirect),
                ));
            }
            for d in 0..8 {
                for f in 0..2 {
                    members.push((
                        bdf(base + 2 + d, 0, f),
                        0x030200,
                        PortKind::Endpoint,
                        None,
                        Acs::Absent,
                    ));
                }
            }
            debug_assert_eq!(members.len(), PER_PORT);
            for (b, class, kind, buses, a) in members {
                if specs.len() == functions {
                    break 'outer;
                }
                push(
                    &mut specs,
                    b,
                    class,
                    kind,
                    buses,
                    a,
                    numa,
                    host_group + 1 + port as u32,
                );
            }
        }
        domain += 1;
    }
    let host = HostInfo {
        cpu_vendor: Some("GenuineIntel".to_string()),
        cpu_family: Some(6),
        iommu: Some(true),
        ..HostInfo::default()
    };
    Topology::build(
        format!("synthetic {functions}"),
        host,
        host_bridges,
        specs,
        Gaps::default(),
    )
    .unwrap_or_else(|e| unreachable!("the generator builds a valid tree: {e}"))
}
