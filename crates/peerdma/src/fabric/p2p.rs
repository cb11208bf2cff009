//! The kernel's peer-to-peer verdict, as drivers/pci/p2pdma.c decides it in
//! `calc_map_type_and_dist()`, `pci_p2pdma_distance_many()` and `pci_p2pmem_find_many()`.
//!
//! The walk: for each device from the provider up (the provider itself first), walk from
//! the client up; the first device both walks reach is the common upstream bridge, and
//! the distance is the number of steps each side took to reach it. A port with ACS
//! Request Redirect, Completion Redirect or Egress Control enabled anywhere on either
//! walk (the common bridge included) sends the TLPs up to the root complex, so the
//! traffic goes through the host bridge; so does a pair with no common bridge. Through
//! the host bridge is allowed only on AMD Zen or newer CPUs or when the host bridge is
//! on the allowlist below; otherwise the pair is not supported.
//!
//! Where we differ on purpose: the verdict also says when it rests on ACS state that
//! could not be read (non-root sysfs, lspci text) instead of treating it as "no ACS".

use std::fmt;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::addr::Bdf;
use crate::fabric::model::{FnId, Topology};

/// How a client reaches a provider's memory (the kernel's `enum pci_p2pdma_map_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MapType {
    /// Through a common switch, by PCI bus address; the IOMMU is not involved.
    BusAddr,
    /// Up through the root complex: the DMA address is an IOVA (or the physical address
    /// with the IOMMU off), and the host bridge forwards it to the peer.
    ThruHostBridge,
    /// The host bridge is not known to forward peer traffic: the kernel refuses.
    NotSupported,
}

impl fmt::Display for MapType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MapType::BusAddr => "bus address",
            MapType::ThruHostBridge => "through host bridge",
            MapType::NotSupported => "not supported",
        })
    }
}

/// One entry of the host-bridge allowlist.
#[derive(Clone, Copy, Debug)]
pub struct AllowlistEntry {
    /// The 00.0 function's vendor.
    pub vendor: u16,
    /// The 00.0 function's device.
    pub device: u16,
    /// Allowed only when provider and client are below this same host bridge.
    pub same_host_bridge_only: bool,
}

const INTEL: u16 = 0x8086;

/// `pci_p2pdma_whitelist[]` as of Linux v6.1 (the 0x09a2 Ice Lake-SP entry arrived in
/// v5.14). Later kernels add Google SoCs and further Intel accelerators and also accept
/// a root port as the identifying device; we keep the v6.1 table and the 00.0 rule.
pub const HOST_BRIDGE_ALLOWLIST: &[AllowlistEntry] = &[
    // Intel Xeon E5 / Core i7 (Sandy Bridge-EP): only between ports of one root complex.
    AllowlistEntry {
        vendor: INTEL,
        device: 0x3c00,
        same_host_bridge_only: true,
    },
    AllowlistEntry {
        vendor: INTEL,
        device: 0x3c01,
        same_host_bridge_only: true,
    },
    // Intel Xeon E7 v3 / E5 v3 (Haswell-EP).
    AllowlistEntry {
        vendor: INTEL,
        device: 0x2f00,
        same_host_bridge_only: true,
    },
    AllowlistEntry {
        vendor: INTEL,
        device: 0x2f01,
        same_host_bridge_only: true,
    },
    // Intel Skylake-SP and later: across root complexes too.
    AllowlistEntry {
        vendor: INTEL,
        device: 0x2030,
        same_host_bridge_only: false,
    },
    AllowlistEntry {
        vendor: INTEL,
        device: 0x2031,
        same_host_bridge_only: false,
    },
    AllowlistEntry {
        vendor: INTEL,
        device: 0x2032,
        same_host_bridge_only: false,
    },
    AllowlistEntry {
        vendor: INTEL,
        device: 0x2033,
        same_host_bridge_only: false,
    },
    AllowlistEntry {
        vendor: INTEL,
        device: 0x2020,
        same_host_bridge_only: false,
    },
    AllowlistEntry {
        vendor: INTEL,
        device: 0x09a2,
        same_host_bridge_only: false,
    },
];

/// Why a host bridge did or did not pass the allowlist.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "result")]
pub enum HostBridgeCheck {
    /// The CPU forwards peer traffic between any root complexes (AMD Zen or newer).
    CpuAllows,
    /// The host bridges are on the allowlist.
    Allowed,
    /// The root bus has no 00.0 function to identify the host bridge by.
    NoIdentifyingFunction {
        /// The root bus.
        root: String,
    },
    /// The identifying function is not on the allowlist.
    NotListed {
        /// The root bus.
        root: String,
        /// Its 00.0 function's `vendor:device`.
        id: String,
    },
    /// Listed, but only for devices below the same host bridge.
    SameHostBridgeOnly {
        /// The root bus.
        root: String,
        /// Its 00.0 function's `vendor:device`.
        id: String,
    },
}

/// The kernel's answer for one provider/client pair, with the facts behind it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// The device whose memory is targeted.
    pub provider: Bdf,
    /// The device doing the DMA.
    pub client: Bdf,
    /// How the client reaches the provider.
    pub map_type: MapType,
    /// Hops to the common upstream bridge summed over both sides, or, with no common
    /// bridge, the depth of both devices summed (what the kernel reports then).
    pub distance: u32,
    /// The first device both walks share.
    pub common_bridge: Option<Bdf>,
    /// Devices on the walks with ACS RR, CR or EC enabled, provider side first.
    pub acs_redirect: Vec<Bdf>,
    /// Devices on the walks whose ACS state could not be read.
    pub acs_unknown: Vec<Bdf>,
    /// The allowlist result for each host bridge crossed (one, or provider's then
    /// client's), when the traffic goes through the host bridge.
    pub host_bridges: Vec<HostBridgeCheck>,
    /// Whether the CPU vendor or family was unknown when the allowlist refused.
    pub cpu_unknown: bool,
    /// Why ACS may be unknown with this topology's source and what would tell (for
    /// the reason; not part of the JSON verdict).
    #[serde(skip)]
    pub acs_hint: &'static str,
}

impl Verdict {
    /// True when the verdict depends on state that could not be read: a bus-address
    /// answer that an unread ACS control could overturn, or a refusal that the AMD Zen
    /// rule might lift for an unknown CPU.
    pub fn uncertain(&self) -> bool {
        (self.map_type == MapType::BusAddr && !self.acs_unknown.is_empty())
            || (self.map_type == MapType::NotSupported && self.cpu_unknown)
    }

    /// The kernel parameter that clears the redirecting ports, as the kernel advises it.
    pub fn acs_advice(&self) -> Option<String> {
        if self.acs_redirect.is_empty() {
            return None;
        }
        let list: Vec<String> = self.acs_redirect.iter().map(Bdf::to_string).collect();
        Some(format!("pci=disable_acs_redir={}", list.join(";")))
    }

    /// One or two sentences saying why.
    pub fn reason(&self) -> String {
        let mut out = match (self.common_bridge, self.acs_redirect.is_empty()) {
            (Some(c), true) if self.provider == self.client => {
                format!("same function ({c}): distance 0")
            }
            (Some(c), true) => format!("both sit below {c}; TLPs route through it by bus address"),
            (Some(c), false) => {
                let list: Vec<String> = self.acs_redirect.iter().map(Bdf::to_string).collect();
                format!(
                    "they share {c}, but ACS redirect is set on {}, so requests go up to the host bridge",
                    list.join(", ")
                )
            }
            (None, _) => "no common upstream bridge: the path crosses the host bridge".to_string(),
        };
        for check in &self.host_bridges {
            out.push_str(&match check {
                HostBridgeCheck::CpuAllows => {
                    "; AMD Zen or newer CPU forwards peer traffic".to_string()
                }
                HostBridgeCheck::Allowed => "; host bridge is on the P2PDMA allowlist".to_string(),
                HostBridgeCheck::NoIdentifyingFunction { root } => format!(
                    "; host bridge {root} has no 00.0 function to match against the P2PDMA allowlist"
                ),
                HostBridgeCheck::NotListed { root, id } => {
                    format!("; host bridge {root} ({id}) is not on the P2PDMA allowlist")
                }
                HostBridgeCheck::SameHostBridgeOnly { root, id } => format!(
                    "; host bridge {root} ({id}) is allowlisted only for devices below the same host bridge"
                ),
            });
        }
        if self.cpu_unknown && self.map_type == MapType::NotSupported {
            out.push_str("; the CPU is unknown, so the AMD Zen rule could not be applied");
        }
        if !self.acs_unknown.is_empty() && self.map_type == MapType::BusAddr {
            let list: Vec<String> = self.acs_unknown.iter().map(Bdf::to_string).collect();
            let why = if self.acs_hint.is_empty() {
                "the source does not give it"
            } else {
                self.acs_hint
            };
            out.push_str(&format!(
                "; UNCERTAIN: ACS could not be read on {} ({why})",
                list.join(", ")
            ));
        }
        out
    }
}

/// `calc_map_type_and_dist()`: the verdict for DMA from `client` to `provider`'s memory.
pub fn calc_map_type_and_dist(topo: &Topology, provider: FnId, client: FnId) -> Verdict {
    let path_a = topo.upstream_path(provider);
    let path_b = topo.upstream_path(client);
    calc_with_paths(topo, provider, client, &path_a, &path_b)
}

/// The verdict from precomputed upstream paths (each the device first, then its bridges).
pub(crate) fn calc_with_paths(
    topo: &Topology,
    provider: FnId,
    client: FnId,
    path_a: &[FnId],
    path_b: &[FnId],
) -> Verdict {
    let mut acs_redirect = Vec::new();
    let mut acs_unknown = Vec::new();
    let note = |id: FnId, redirect: &mut Vec<Bdf>, unknown: &mut Vec<Bdf>| {
        let f = topo.function(id);
        match f.acs.redirects() {
            Some(true) => redirect.push(f.bdf),
            Some(false) => {}
            None => unknown.push(f.bdf),
        }
    };
    // The provider-side walk, checking each device for ACS before looking for it on the
    // client side, exactly as the kernel orders it.
    let mut common = None;
    for (dist_a, &a) in path_a.iter().enumerate() {
        note(a, &mut acs_redirect, &mut acs_unknown);
        if let Some(dist_b) = path_b.iter().position(|&b| b == a) {
            common = Some((a, dist_a, dist_b));
            break;
        }
    }
    let provider_bdf = topo.function(provider).bdf;
    let client_bdf = topo.function(client).bdf;
    let Some((c, dist_a, dist_b)) = common else {
        // No common bridge: ACS on the way does not change anything, the host bridge decides.
        let (supported, host_bridges) = host_bridge_allows(topo, provider, client);
        return Verdict {
            provider: provider_bdf,
            client: client_bdf,
            map_type: if supported {
                MapType::ThruHostBridge
            } else {
                MapType::NotSupported
            },
            distance: (path_a.len() + path_b.len()) as u32,
            common_bridge: None,
            acs_redirect: Vec::new(),
            acs_unknown: Vec::new(),
            cpu_unknown: !supported && topo.host().cpu_vendor.is_none(),
            host_bridges,
            acs_hint: topo.gaps().acs_hint,
        };
    };
    // The client-side walk up to, not including, the common bridge (already checked).
    for &b in &path_b[..dist_b] {
        note(b, &mut acs_redirect, &mut acs_unknown);
    }
    let distance = (dist_a + dist_b) as u32;
    let common_bdf = topo.function(c).bdf;
    if acs_redirect.is_empty() {
        return Verdict {
            provider: provider_bdf,
            client: client_bdf,
            map_type: MapType::BusAddr,
            distance,
            common_bridge: Some(common_bdf),
            acs_redirect,
            acs_unknown,
            host_bridges: Vec::new(),
            cpu_unknown: false,
            acs_hint: topo.gaps().acs_hint,
        };
    }
    let (supported, host_bridges) = host_bridge_allows(topo, provider, client);
    Verdict {
        provider: provider_bdf,
        client: client_bdf,
        map_type: if supported {
            MapType::ThruHostBridge
        } else {
            MapType::NotSupported
        },
        distance,
        common_bridge: Some(common_bdf),
        acs_redirect,
        acs_unknown,
        cpu_unknown: !supported && topo.host().cpu_vendor.is_none(),
        host_bridges,
        acs_hint: topo.gaps().acs_hint,
    }
}

/// `cpu_supports_p2pdma() || host_bridge_whitelist()`: whether traffic may cross the
/// host bridge(s), and the check of each one (both are checked when they differ, so the
/// reason names every host bridge in the way).
pub fn host_bridge_allows(
    topo: &Topology,
    provider: FnId,
    client: FnId,
) -> (bool, Vec<HostBridgeCheck>) {
    if topo.host().cpu_supports_p2pdma() {
        return (true, vec![HostBridgeCheck::CpuAllows]);
    }
    let ha = topo.host_bridge_of(provider);
    let hb = topo.host_bridge_of(client);
    let same = ha == hb;
    let check = |h: usize| -> HostBridgeCheck {
        let root = topo.host_bridges()[h].root.to_string();
        let Some(f) = topo.host_bridge_function(h) else {
            return HostBridgeCheck::NoIdentifyingFunction { root };
        };
        let id = f.id().unwrap_or_else(|| "id unknown".into());
        match HOST_BRIDGE_ALLOWLIST
            .iter()
            .find(|e| e.vendor == f.vendor && e.device == f.device)
        {
            None => HostBridgeCheck::NotListed { root, id },
            Some(e) if e.same_host_bridge_only && !same => {
                HostBridgeCheck::SameHostBridgeOnly { root, id }
            }
            Some(_) => HostBridgeCheck::Allowed,
        }
    };
    let mut checks = vec![check(ha)];
    if !same {
        checks.push(check(hb));
    }
    let allowed = checks.iter().all(|c| *c == HostBridgeCheck::Allowed);
    if allowed {
        checks.truncate(1);
    } else {
        checks.retain(|c| *c != HostBridgeCheck::Allowed);
    }
    (allowed, checks)
}

/// `pci_p2pdma_distance_many()`: the summed distance from a provider to every client,
/// `None` when any client cannot reach it.
pub fn distance_many(topo: &Topology, provider: FnId, clients: &[FnId]) -> Option<u32> {
    let mut total = 0;
    for &c in clients {
        let v = calc_map_type_and_dist(topo, provider, c);
        if v.map_type == MapType::NotSupported {
            return None;
        }
        total += v.distance;
    }
    Some(total)
}

/// `pci_p2pmem_find_many()`: among the published providers, the one closest to all
/// clients; ties broken at random as the kernel does, with a seeded generator so the
/// choice is reproducible.
pub fn find_closest_provider(
    topo: &Topology,
    published: &[FnId],
    clients: &[FnId],
    seed: u64,
) -> Option<FnId> {
    let mut best = u32::MAX;
    let mut closest: Vec<FnId> = Vec::new();
    for &p in published {
        let Some(d) = distance_many(topo, p, clients) else {
            continue;
        };
        if d < best {
            best = d;
            closest.clear();
        }
        if d == best {
            closest.push(p);
        }
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    closest.choose(&mut rng).copied()
}
