//! The kernel's reference cases for `calc_map_type_and_dist()`, `host_bridge_whitelist()`,
//! `cpu_supports_p2pdma()`, `pci_p2pdma_distance_many()` and `pci_p2pmem_find_many()`
//! (drivers/pci/p2pdma.c), each test named for the rule it pins.

use peerdma::fabric::import::file;
use peerdma::fabric::p2p::HostBridgeCheck;
use peerdma::fabric::{
    calc_map_type_and_dist, distance_many, find_closest_provider, preset, MapType, Topology,
    Verdict,
};

/// A machine: CPU line, then host bridges `(root, 00.0 id or "")`, then functions
/// `(bdf, class, buses, acs ctrl or "" for absent)`. Bridges have a bus range.
fn machine(cpu: (&str, u32), hbs: &[(&str, &str)], fns: &[(&str, &str, &str, &str)]) -> Topology {
    let mut t = format!(
        "[host]\ncpu_vendor = \"{}\"\ncpu_family = {}\n",
        cpu.0, cpu.1
    );
    for (root, id) in hbs {
        t += &format!("[[host_bridge]]\nroot = \"{root}\"\n");
        if !id.is_empty() {
            t += &format!(
                "[[function]]\nbdf = \"{root}:00.0\"\nid = \"{id}\"\nclass = \"0x060000\"\nacs = {{ state = \"absent\" }}\n"
            );
        }
    }
    for (bdf, class, buses, ctrl) in fns {
        t += &format!("[[function]]\nbdf = \"{bdf}\"\nid = \"1234:5678\"\nclass = \"{class}\"\n");
        if !buses.is_empty() {
            t += &format!("buses = \"{buses}\"\n");
        }
        if ctrl.is_empty() {
            t += "acs = { state = \"absent\" }\n";
        } else {
            t += &format!("acs = {{ state = \"present\", cap = \"SV|TB|RR|CR|UF|EC|DT\", ctrl = \"{ctrl}\" }}\n");
        }
    }
    file::parse("test machine", &t).unwrap_or_else(|e| panic!("{e}\n{t}"))
}

const INTEL: (&str, u32) = ("GenuineIntel", 6);
const BRIDGE: &str = "0x060400";
const NVME: &str = "0x010802";

fn verdict(t: &Topology, a: &str, b: &str) -> Verdict {
    calc_map_type_and_dist(t, t.find(a).unwrap(), t.find(b).unwrap())
}

/// Root port 00:01.0 -> switch 01:00.0 -> ports 02:00.0, 02:01.0 -> endpoints 03:00.0,
/// 04:00.0 (two functions .0 and .1 at 04:00), with the given ACS ctrl on each port.
fn switch_machine(rp: &str, usp: &str, dsp0: &str, dsp1: &str, ep: &str) -> Topology {
    machine(
        INTEL,
        &[("0000:00", "8086:2020")],
        &[
            ("0000:00:01.0", BRIDGE, "01-04", rp),
            ("0000:01:00.0", BRIDGE, "02-04", usp),
            ("0000:02:00.0", BRIDGE, "03", dsp0),
            ("0000:02:01.0", BRIDGE, "04", dsp1),
            ("0000:03:00.0", NVME, "", ep),
            ("0000:04:00.0", NVME, "", ""),
            ("0000:04:00.1", NVME, "", ""),
        ],
    )
}

#[test]
fn same_function_is_distance_0_by_bus_address() {
    let t = switch_machine("", "", "", "", "");
    let v = verdict(&t, "0000:03:00.0", "0000:03:00.0");
    assert_eq!((v.map_type, v.distance), (MapType::BusAddr, 0));
    assert_eq!(v.common_bridge, Some("0000:03:00.0".parse().unwrap()));
}

#[test]
fn two_functions_of_one_device_are_distance_2() {
    let t = switch_machine("", "", "", "", "");
    let v = verdict(&t, "0000:04:00.0", "0000:04:00.1");
    assert_eq!((v.map_type, v.distance), (MapType::BusAddr, 2));
    assert_eq!(v.common_bridge, Some("0000:02:01.0".parse().unwrap()));
}

#[test]
fn two_endpoints_under_one_switch_are_distance_4() {
    let t = switch_machine("", "", "", "", "");
    let v = verdict(&t, "0000:03:00.0", "0000:04:00.0");
    assert_eq!((v.map_type, v.distance), (MapType::BusAddr, 4));
    assert_eq!(v.common_bridge, Some("0000:01:00.0".parse().unwrap()));
    assert!(
        v.host_bridges.is_empty(),
        "a bus-address path never consults the allowlist"
    );
}

#[test]
fn acs_redirect_on_a_downstream_port_sends_traffic_through_the_host_bridge() {
    let t = switch_machine("", "", "RR|CR", "SV|RR", "");
    let v = verdict(&t, "0000:03:00.0", "0000:04:00.0");
    assert_eq!(v.map_type, MapType::ThruHostBridge);
    assert_eq!(v.distance, 4, "ACS does not change the distance");
    let listed: Vec<String> = v.acs_redirect.iter().map(|b| b.to_string()).collect();
    assert_eq!(
        listed,
        ["0000:02:00.0", "0000:02:01.0"],
        "provider side first"
    );
    assert_eq!(
        v.acs_advice().unwrap(),
        "pci=disable_acs_redir=0000:02:00.0;0000:02:01.0"
    );
    assert!(v
        .reason()
        .contains("ACS redirect is set on 0000:02:00.0, 0000:02:01.0"));
}

#[test]
fn acs_egress_control_alone_redirects_but_source_validation_does_not() {
    let t = switch_machine("", "", "EC", "", "");
    assert_eq!(
        verdict(&t, "0000:03:00.0", "0000:04:00.0").map_type,
        MapType::ThruHostBridge
    );
    let t = switch_machine("", "", "SV|TB|UF|DT", "SV|TB|UF|DT", "");
    assert_eq!(
        verdict(&t, "0000:03:00.0", "0000:04:00.0").map_type,
        MapType::BusAddr
    );
}

#[test]
fn acs_redirect_on_an_endpoint_counts() {
    // The kernel checks every device on the walk, the provider itself included.
    let t = switch_machine("", "", "", "", "RR");
    let v = verdict(&t, "0000:03:00.0", "0000:04:00.0");
    assert_eq!(v.map_type, MapType::ThruHostBridge);
    assert_eq!(v.acs_redirect, ["0000:03:00.0".parse().unwrap()]);
    // ...and as the client too.
    let v = verdict(&t, "0000:04:00.0", "0000:03:00.0");
    assert_eq!(v.map_type, MapType::ThruHostBridge);
}

#[test]
fn acs_redirect_on_the_common_bridge_counts_once() {
    let t = switch_machine("", "CR", "", "", "");
    let v = verdict(&t, "0000:03:00.0", "0000:04:00.0");
    assert_eq!(v.map_type, MapType::ThruHostBridge);
    assert_eq!(v.acs_redirect, ["0000:01:00.0".parse().unwrap()]);
}

#[test]
fn acs_redirect_above_the_common_bridge_does_not_matter() {
    let t = switch_machine("RR|CR|EC", "", "", "", "");
    let v = verdict(&t, "0000:03:00.0", "0000:04:00.0");
    assert_eq!(v.map_type, MapType::BusAddr);
}

/// Two endpoints on their own root ports of one host bridge with 00.0 = `hb`.
fn two_root_ports(cpu: (&str, u32), hb: &str) -> Topology {
    machine(
        cpu,
        &[("0000:00", hb)],
        &[
            ("0000:00:01.0", BRIDGE, "01", ""),
            ("0000:00:02.0", BRIDGE, "02", ""),
            ("0000:01:00.0", NVME, "", ""),
            ("0000:02:00.0", NVME, "", ""),
        ],
    )
}

#[test]
fn no_common_bridge_with_allowlisted_host_bridge_goes_through_it() {
    let t = two_root_ports(INTEL, "8086:2020");
    let v = verdict(&t, "0000:01:00.0", "0000:02:00.0");
    assert_eq!(v.map_type, MapType::ThruHostBridge);
    assert_eq!(v.common_bridge, None);
    // The kernel reports both walks' lengths summed when there is no common bridge.
    assert_eq!(v.distance, 4);
    assert_eq!(v.host_bridges, [HostBridgeCheck::Allowed]);
}

#[test]
fn no_common_bridge_with_host_bridge_off_the_allowlist_is_not_supported() {
    let t = two_root_ports(INTEL, "8086:29c0");
    let v = verdict(&t, "0000:01:00.0", "0000:02:00.0");
    assert_eq!(v.map_type, MapType::NotSupported);
    assert!(v
        .reason()
        .contains("host bridge 0000:00 (8086:29c0) is not on the P2PDMA allowlist"));
    assert!(
        !v.uncertain(),
        "the CPU is known, so the refusal is certain"
    );
}

#[test]
fn root_bus_without_a_00_0_function_is_not_supported() {
    let t = two_root_ports(INTEL, "");
    let v = verdict(&t, "0000:01:00.0", "0000:02:00.0");
    assert_eq!(v.map_type, MapType::NotSupported);
    assert_eq!(
        v.host_bridges,
        [HostBridgeCheck::NoIdentifyingFunction {
            root: "0000:00".into()
        }]
    );
}

#[test]
fn every_allowlist_entry_is_honoured() {
    for e in peerdma::fabric::HOST_BRIDGE_ALLOWLIST {
        let id = format!("{:04x}:{:04x}", e.vendor, e.device);
        let t = two_root_ports(INTEL, &id);
        assert_eq!(
            verdict(&t, "0000:01:00.0", "0000:02:00.0").map_type,
            MapType::ThruHostBridge,
            "{id}"
        );
    }
}

/// One endpoint below each of two host bridges.
fn two_host_bridges(cpu: (&str, u32), a: &str, b: &str) -> Topology {
    machine(
        cpu,
        &[("0000:00", a), ("0000:80", b)],
        &[
            ("0000:00:01.0", BRIDGE, "01", ""),
            ("0000:80:01.0", BRIDGE, "81", ""),
            ("0000:01:00.0", NVME, "", ""),
            ("0000:81:00.0", NVME, "", ""),
        ],
    )
}

#[test]
fn same_host_bridge_only_entry_allows_devices_below_that_host_bridge() {
    let t = two_root_ports(INTEL, "8086:3c00");
    assert_eq!(
        verdict(&t, "0000:01:00.0", "0000:02:00.0").map_type,
        MapType::ThruHostBridge
    );
}

#[test]
fn same_host_bridge_only_entry_refuses_across_host_bridges() {
    let t = two_host_bridges(INTEL, "8086:3c00", "8086:3c00");
    let v = verdict(&t, "0000:01:00.0", "0000:81:00.0");
    assert_eq!(v.map_type, MapType::NotSupported);
    assert!(v
        .reason()
        .contains("allowlisted only for devices below the same host bridge"));
}

#[test]
fn different_host_bridges_must_both_be_allowlisted() {
    let t = two_host_bridges(INTEL, "8086:2020", "8086:2030");
    assert_eq!(
        verdict(&t, "0000:01:00.0", "0000:81:00.0").map_type,
        MapType::ThruHostBridge
    );
    let t = two_host_bridges(INTEL, "8086:2020", "8086:29c0");
    let v = verdict(&t, "0000:01:00.0", "0000:81:00.0");
    assert_eq!(v.map_type, MapType::NotSupported);
    assert!(v.reason().contains("0000:80 (8086:29c0)"), "{}", v.reason());
    assert!(
        !v.reason().contains("0000:00 (8086:2020)"),
        "the allowed one is not blamed"
    );
    // Either order gives the same answer.
    assert_eq!(
        verdict(&t, "0000:81:00.0", "0000:01:00.0").map_type,
        MapType::NotSupported
    );
}

#[test]
fn amd_zen_allows_any_host_bridge_crossing() {
    let t = two_host_bridges(("AuthenticAMD", 0x17), "1022:1480", "");
    let v = verdict(&t, "0000:01:00.0", "0000:81:00.0");
    assert_eq!(v.map_type, MapType::ThruHostBridge);
    assert_eq!(v.host_bridges, [HostBridgeCheck::CpuAllows]);
    let t = two_host_bridges(("AuthenticAMD", 0x19), "1022:14d8", "1022:14d8");
    assert_eq!(
        verdict(&t, "0000:01:00.0", "0000:81:00.0").map_type,
        MapType::ThruHostBridge
    );
}

#[test]
fn amd_before_zen_and_other_vendors_get_no_cpu_exemption() {
    for cpu in [
        ("AuthenticAMD", 0x15),
        ("HygonGenuine", 0x18),
        ("GenuineIntel", 6),
    ] {
        let t = two_host_bridges(cpu, "1022:1480", "1022:1480");
        assert_eq!(
            verdict(&t, "0000:01:00.0", "0000:81:00.0").map_type,
            MapType::NotSupported,
            "{cpu:?}"
        );
    }
}

#[test]
fn acs_on_the_way_without_a_common_bridge_changes_nothing() {
    // ACS counted on the provider walk is irrelevant when there is no common bridge.
    let t = machine(
        INTEL,
        &[("0000:00", "8086:2020")],
        &[
            ("0000:00:01.0", BRIDGE, "01", "RR|CR"),
            ("0000:00:02.0", BRIDGE, "02", ""),
            ("0000:01:00.0", NVME, "", ""),
            ("0000:02:00.0", NVME, "", ""),
        ],
    );
    let v = verdict(&t, "0000:01:00.0", "0000:02:00.0");
    assert_eq!(v.map_type, MapType::ThruHostBridge);
    assert!(v.acs_redirect.is_empty());
    assert_eq!(v.acs_advice(), None);
}

#[test]
fn unknown_acs_on_a_bus_address_path_makes_the_verdict_uncertain() {
    let mut t = String::from("[host]\ncpu_vendor = \"GenuineIntel\"\ncpu_family = 6\n[[host_bridge]]\nroot = \"0000:00\"\n");
    t += "[[function]]\nbdf = \"0000:00:01.0\"\nid = \"1234:0001\"\nclass = \"0x060400\"\nbuses = \"01\"\n";
    t += "[[function]]\nbdf = \"0000:01:00.0\"\nid = \"1234:0002\"\nclass = \"0x010802\"\nacs = { state = \"absent\" }\n";
    t += "[[function]]\nbdf = \"0000:01:00.1\"\nid = \"1234:0002\"\nclass = \"0x010802\"\nacs = { state = \"absent\" }\n";
    let topo = file::parse("t", &t).unwrap();
    let v = verdict(&topo, "0000:01:00.0", "0000:01:00.1");
    assert_eq!(v.map_type, MapType::BusAddr);
    assert!(v.uncertain());
    assert_eq!(v.acs_unknown, ["0000:00:01.0".parse().unwrap()]);
    assert!(v.reason().contains("UNCERTAIN"));
}

#[test]
fn unknown_cpu_makes_a_refusal_uncertain() {
    // No [host] table: vendor and family unknown.
    let mut text = String::from("[[host_bridge]]\nroot = \"0000:00\"\n");
    for (bdf, class, buses) in [
        ("0000:00:01.0", BRIDGE, Some("01")),
        ("0000:00:02.0", BRIDGE, Some("02")),
        ("0000:01:00.0", NVME, None),
        ("0000:02:00.0", NVME, None),
    ] {
        text += &format!("[[function]]\nbdf = \"{bdf}\"\nid = \"1234:0001\"\nclass = \"{class}\"\nacs = {{ state = \"absent\" }}\n");
        if let Some(b) = buses {
            text += &format!("buses = \"{b}\"\n");
        }
    }
    let topo = file::parse("t", &text).unwrap();
    let v = verdict(&topo, "0000:01:00.0", "0000:02:00.0");
    assert_eq!(v.map_type, MapType::NotSupported);
    assert!(v.uncertain() && v.cpu_unknown);
}

#[test]
fn distance_many_sums_and_fails_if_any_client_is_unsupported() {
    let t = preset("workstation").unwrap();
    let id = |s: &str| t.find(s).unwrap();
    let gpu0 = id("0000:03:00.0");
    assert_eq!(
        distance_many(&t, gpu0, &[id("0000:04:00.0"), id("0000:05:00.0")]),
        Some(8)
    );
    assert_eq!(
        distance_many(&t, gpu0, &[id("0000:04:00.0"), id("0000:07:00.0")]),
        Some(4 + 6)
    );
    let q = preset("q35").unwrap();
    let a = q.find("0000:00:03.0").unwrap();
    let b = q.find("0000:00:04.0").unwrap();
    assert_eq!(distance_many(&q, a, &[a]), Some(0));
    assert_eq!(distance_many(&q, a, &[a, b]), None);
}

#[test]
fn find_closest_provider_prefers_distance_and_breaks_ties_reproducibly() {
    let t = preset("dgx").unwrap();
    let id = |s: &str| t.find(s).unwrap();
    let nic0 = id("0000:1b:00.0");
    let gpus: Vec<_> = [
        "0000:1a:00.0",
        "0000:1c:00.0",
        "0000:3d:00.0",
        "0000:88:00.0",
    ]
    .iter()
    .map(|s| id(s))
    .collect();
    assert!(gpus
        .iter()
        .all(|&g| t.function(g).device_class() == peerdma::fabric::DeviceClass::Gpu));
    // GPU0 and GPU1 share NIC0's switch (distance 4); the others cross host bridges.
    let mut seen = std::collections::BTreeSet::new();
    for seed in 0..32 {
        let p = find_closest_provider(&t, &gpus, &[nic0], seed).unwrap();
        assert!(p == gpus[0] || p == gpus[1]);
        assert_eq!(
            find_closest_provider(&t, &gpus, &[nic0], seed),
            Some(p),
            "same seed, same pick"
        );
        seen.insert(p);
    }
    assert_eq!(seen.len(), 2, "both tied providers get picked across seeds");
    // No provider reachable: none.
    let q = preset("q35").unwrap();
    let (a, b) = (
        q.find("0000:00:03.0").unwrap(),
        q.find("0000:00:04.0").unwrap(),
    );
    assert_eq!(find_closest_provider(&q, &[a], &[b], 1), None);
}

#[test]
fn presets_give_the_verdicts_they_are_built_for() {
    let w = preset("workstation").unwrap();
    assert_eq!(
        verdict(&w, "0000:03:00.0", "0000:05:00.0").map_type,
        MapType::BusAddr
    );
    assert_eq!(
        verdict(&w, "0000:05:00.0", "0000:07:00.0").map_type,
        MapType::ThruHostBridge
    );
    let d = preset("dgx").unwrap();
    assert_eq!(
        verdict(&d, "0000:1a:00.0", "0000:1c:00.0").map_type,
        MapType::BusAddr
    );
    assert_eq!(
        verdict(&d, "0000:1a:00.0", "0000:88:00.0").map_type,
        MapType::ThruHostBridge
    );
    let a = preset("dgx-acs").unwrap();
    let v = verdict(&a, "0000:1a:00.0", "0000:1c:00.0");
    assert_eq!((v.map_type, v.distance), (MapType::ThruHostBridge, 4));
    assert_eq!(
        v.acs_advice().unwrap(),
        "pci=disable_acs_redir=0000:19:00.0;0000:19:02.0"
    );
    let q = preset("q35").unwrap();
    let v = verdict(&q, "0000:00:03.0", "0000:00:04.0");
    assert_eq!(v.map_type, MapType::NotSupported);
    assert!(v.reason().contains("8086:29c0"));
}
