//! `peerdma check` on the presets, generated machines, snapshots with and without the
//! kernel facts, and this machine: every verdict, status, fix and affinity, and
//! "unknown" where the source does not say (never a guess).

mod common;

use peerdma::check::{check, CheckReport, PairCheck};
use peerdma::fabric::import::{file, lspci, sysfs};
use peerdma::fabric::{preset, IommuMode, MapType, TopoLevel, Topology};

fn pair<'a>(r: &'a CheckReport, a: &str, b: &str) -> &'a PairCheck {
    r.pairs
        .iter()
        .find(|p| p.a == a && p.b == b)
        .unwrap_or_else(|| panic!("no pair {a} {b}"))
}

#[test]
fn workstation_is_ready_with_its_cmbs_and_closest_drives() {
    let r = check(&preset("workstation").unwrap(), None);
    assert!(r.ok);
    assert_eq!(r.kernel.p2pdma, Some(true));
    assert_eq!(r.kernel.iommu, Some(IommuMode::Off));
    assert_eq!(r.kernel.release.as_deref(), Some("6.8.0-45-generic"));
    // Two NVMe buffers registered as p2p memory; the one without WDS is not published,
    // as nvme_map_cmb() publishes only with both WDS and RDS.
    let kinds: Vec<(&str, &str, Option<bool>)> = r
        .providers
        .iter()
        .map(|p| (p.bdf.as_str(), p.kind, p.published))
        .collect();
    assert_eq!(
        kinds,
        [
            ("0000:05:00.0", "p2pmem", Some(true)),
            ("0000:05:00.0", "nvme-cmb", Some(true)),
            ("0000:06:00.0", "p2pmem", Some(false)),
            ("0000:06:00.0", "nvme-cmb", Some(false))
        ]
    );
    assert_eq!(r.providers[1].size, Some(64 << 20));
    assert!(r.providers[3].status.contains("lacks WDS or RDS"));
    // Pairs: 2 GPUs x 3 drives, 3 drive pairs, 1 GPU pair; no NIC.
    assert_eq!(r.pairs.len(), 6 + 3 + 1);
    let p = pair(&r, "0000:03:00.0", "0000:05:00.0");
    assert_eq!(
        (p.map_type, p.distance, p.level, p.status),
        (MapType::BusAddr, 4, TopoLevel::PIX, "ok")
    );
    let p = pair(&r, "0000:03:00.0", "0000:07:00.0");
    assert_eq!(
        (p.map_type, p.distance, p.level, p.status),
        (MapType::ThruHostBridge, 6, TopoLevel::PHB, "ok")
    );
    // Affinity: both drives in the switch tie at distance 4; there is no NIC.
    let a = &r.affinity[0];
    assert_eq!(a.gpu, "0000:03:00.0");
    let near: Vec<(&str, u32)> = a
        .nvme
        .iter()
        .map(|n| (n.bdf.as_str(), n.distance))
        .collect();
    assert_eq!(near, [("0000:05:00.0", 4), ("0000:06:00.0", 4)]);
    assert!(a.nics.is_empty() && a.warnings.is_empty());
}

#[test]
fn q35_is_refused_by_its_host_bridge_with_the_reason_and_no_false_fix() {
    let r = check(&preset("q35").unwrap(), None);
    assert!(!r.ok);
    assert!(r.pairs.iter().all(|p| p.status == "chipset-not-supported"));
    let p = &r.pairs[0];
    assert_eq!(p.map_type, MapType::NotSupported);
    assert!(p.fixes[0]
        .contains("host bridge 0000:00 (8086:29c0) is not on the kernel's P2PDMA allowlist"));
    assert!(p.fixes[0].contains("no boot option changes that"));
    assert!(r.affinity[0].warnings[0].starts_with("no NIC is reachable"));
}

#[test]
fn acs_redirect_names_the_ports_and_the_boot_option_and_numa_is_warned() {
    let plain = check(&preset("dgx").unwrap(), None);
    let acs = check(&preset("dgx-acs").unwrap(), None);
    assert!(plain.ok && acs.ok);
    assert_eq!(acs.kernel.iommu, Some(IommuMode::Passthrough));
    assert_eq!(acs.kernel.cmdline_options, ["intel_iommu=on", "iommu=pt"]);
    let p = pair(&plain, "0000:1a:00.0", "0000:1b:00.0");
    assert_eq!((p.map_type, p.distance), (MapType::BusAddr, 4));
    assert!(p.warnings.is_empty());
    let p = pair(&acs, "0000:1a:00.0", "0000:1b:00.0");
    assert_eq!((p.map_type, p.status), (MapType::ThruHostBridge, "ok"));
    assert_eq!(p.warnings.len(), 1);
    assert!(
        p.warnings[0].contains("ACS redirect on 0000:19:00.0, 0000:19:01.0")
            && p.warnings[0].contains("pci=disable_acs_redir=0000:19:00.0;0000:19:01.0"),
        "{:?}",
        p.warnings
    );
    // Across sockets: SYS, through the host bridges, which the allowlist passes.
    let p = pair(&plain, "0000:1a:00.0", "0000:89:00.0");
    assert_eq!(
        (p.level, p.map_type, p.status),
        (TopoLevel::SYS, MapType::ThruHostBridge, "ok")
    );
    // Each GPU's closest NIC is the one in its switch: bus address in dgx, only
    // through the host bridge in dgx-acs.
    let a = &plain.affinity[0];
    assert_eq!(
        a.nics.iter().map(|n| n.bdf.as_str()).collect::<Vec<_>>(),
        ["0000:1b:00.0", "0000:1d:00.0"]
    );
    assert!(a.warnings.is_empty());
    let a = &acs.affinity[0];
    assert_eq!(a.nics[0].map_type, MapType::ThruHostBridge);
    assert!(a.warnings[0].contains("only through the host bridge"));
}

/// A machine from a topology file, with the kernel and host facts given as TOML.
fn machine(host: &str, kernel: &str) -> Topology {
    let base = file::to_toml(&preset("workstation").unwrap());
    let body = &base[base.find("[[host_bridge]]").unwrap()..];
    file::parse("t.toml", &format!("[host]\n{host}\n{kernel}\n{body}")).unwrap()
}

const P2P_KERNEL: &str = "[host.kernel]\nrelease = \"6.8.0\"\nconfig_source = \"/boot/config-6.8.0\"\n[host.kernel.config]\nCONFIG_PCI_P2PDMA = \"y\"\nCONFIG_ZONE_DEVICE = \"y\"\n";

#[test]
fn a_kernel_without_p2pdma_fails_every_pair_with_the_config_fix() {
    let t = machine(
        "cpu_vendor = \"GenuineIntel\"\ncpu_family = 6",
        "[host.kernel]\nrelease = \"6.8.0\"\nconfig_source = \"/boot/config-6.8.0\"\n[host.kernel.config]\nCONFIG_PCI_P2PDMA = \"n\"\nCONFIG_ZONE_DEVICE = \"y\"\n",
    );
    let r = check(&t, None);
    assert!(!r.ok);
    assert_eq!(r.kernel.p2pdma, Some(false));
    assert!(r.pairs.iter().all(|p| p.status == "not-supported"));
    assert!(r.pairs[0].fixes[0].contains("CONFIG_PCI_P2PDMA=y"));
    // The same machine with the option on is fine.
    let r = check(
        &machine("cpu_vendor = \"GenuineIntel\"\ncpu_family = 6", P2P_KERNEL),
        None,
    );
    assert!(r.ok);
}

#[test]
fn unknown_is_said_never_guessed() {
    // No kernel facts at all (lspci text): every pair is unknown, and what would tell
    // is named.
    let text = std::fs::read_to_string(
        common::shared_sysfs().join("40intel64-2g2n4c-pcilocality.lspci-tvnn.txt"),
    )
    .unwrap();
    let t = lspci::parse("t", &text).unwrap();
    let r = check(&t, None);
    assert_eq!(r.kernel.release, None);
    assert_eq!(r.kernel.p2pdma, None);
    assert!(
        r.pairs.iter().all(|p| p.status == "unknown"),
        "{:?}",
        r.pairs
    );
    assert!(!r.ok);
    assert!(r.not_read.iter().any(|n| n.starts_with("the kernel:")));
    assert!(r.not_read.iter().any(|n| n.starts_with("the IOMMU state")));
    // A snapshot without the facts says which files it lacks.
    let (_tmp, root) = common::unpack("40intel64-2g2n4c-pcilocality");
    let r = check(&sysfs::read(&root).unwrap(), None);
    assert_eq!(r.kernel.release, None);
    assert!(
        r.not_read.iter().any(|n| n.contains("/proc/config.gz")),
        "{:?}",
        r.not_read
    );
}

#[test]
fn the_cpu_decides_across_host_bridges_and_unknown_cpu_is_unknown() {
    // Different root complexes with host bridges off the allowlist: an AMD Zen CPU
    // forwards (cpu_supports_p2pdma), an Intel one does not, an unknown one is unknown.
    let q35 = file::to_toml(&preset("q35").unwrap());
    let body = &q35[q35.find("[[host_bridge]]").unwrap()..];
    let with = |host: &str| {
        let t = file::parse("t.toml", &format!("[host]\n{host}\n{P2P_KERNEL}\n{body}")).unwrap();
        check(&t, None)
    };
    let amd = with("cpu_vendor = \"AuthenticAMD\"\ncpu_family = 25");
    assert!(amd.ok);
    assert!(amd
        .pairs
        .iter()
        .all(|p| p.map_type == MapType::ThruHostBridge));
    let intel = with("cpu_vendor = \"GenuineIntel\"\ncpu_family = 6");
    assert!(intel
        .pairs
        .iter()
        .all(|p| p.status == "chipset-not-supported"));
    let unknown = with("");
    assert!(unknown.pairs.iter().all(|p| p.status == "unknown"));
    assert!(unknown.pairs[0].fixes[0].contains("say which CPU it is"));
}

#[test]
fn unknown_acs_under_a_translating_iommu_expects_the_host_bridge_path() {
    let ws = file::to_toml(&preset("workstation").unwrap());
    // Drop every ACS state and give the IOMMU groups DMA domains.
    let body: String = ws[ws.find("[[host_bridge]]").unwrap()..]
        .split("\n[function.acs]\nstate = \"absent\"\n")
        .collect::<Vec<_>>()
        .join("\n")
        .lines()
        .filter(|l| !l.starts_with("acs = "))
        .map(|l| format!("{l}\n"))
        .collect();
    let t = file::parse(
        "t.toml",
        &format!(
            "[host]\ncpu_vendor = \"GenuineIntel\"\ncpu_family = 6\niommu = true\n{P2P_KERNEL}[host.kernel.iommu_groups]\n1 = \"DMA-FQ\"\n\n{body}"
        ),
    )
    .unwrap();
    let r = check(&t, None);
    assert_eq!(r.kernel.iommu, Some(IommuMode::Translated));
    let p = pair(&r, "0000:03:00.0", "0000:05:00.0");
    assert_eq!(p.status, "unknown");
    assert!(
        p.fixes.iter().any(|f| f.contains("pci_enable_acs")),
        "{:?}",
        p.fixes
    );
}

#[test]
fn requested_pairs_decide_alone() {
    let t = preset("q35").unwrap();
    let ids = [t.find("00:01.0").unwrap(), t.find("00:03.0").unwrap()];
    let r = check(&t, Some(&[(ids[0], ids[1])]));
    assert_eq!((r.pairs.len(), r.decided_by, r.ok), (1, "requested", false));
    let t = preset("workstation").unwrap();
    let ids = [t.find("03:00.0").unwrap(), t.find("05:00.0").unwrap()];
    let r = check(&t, Some(&[(ids[0], ids[1])]));
    assert!(r.ok && r.pairs[0].kind == "requested");
}

/// `--save` keeps the kernel facts: a preset written as a snapshot reads back with the
/// same release, config, command line and IOMMU group types, and checks the same.
#[test]
fn snapshots_keep_the_kernel_facts() {
    for name in ["dgx", "workstation"] {
        let t = preset(name).unwrap();
        let dir = tempfile::tempdir().unwrap();
        sysfs::write_snapshot(&t, dir.path()).unwrap();
        let back = sysfs::read(dir.path()).unwrap();
        assert_eq!(back.host().kernel, t.host().kernel, "{name}");
        let (a, b) = (check(&t, None), check(&back, None));
        assert_eq!(a.ok, b.ok);
        assert_eq!(
            serde_json::to_value(&a.pairs).unwrap(),
            serde_json::to_value(&b.pairs).unwrap()
        );
        assert_eq!(
            serde_json::to_value(&a.providers).unwrap(),
            serde_json::to_value(&b.providers).unwrap()
        );
    }
}

/// This machine: the release is /proc's, the config comes from one of the three places
/// or its absence is said, and a live save keeps what was read.
#[test]
fn live_machine_reports_its_own_kernel() {
    if !std::path::Path::new("/sys/bus/pci/devices").is_dir() {
        eprintln!("skipped: no /sys/bus/pci/devices");
        return;
    }
    let t = sysfs::read(std::path::Path::new("/")).unwrap();
    let r = check(&t, None);
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(r.kernel.release.as_deref(), Some(release.trim()));
    match &r.kernel.config_source {
        Some(s) => assert!(
            s.starts_with("/boot/config-") || s == "/proc/config.gz" || s == "/proc/kallsyms",
            "{s}"
        ),
        None => assert!(r
            .not_read
            .iter()
            .any(|n| n.starts_with("the kernel config"))),
    }
    let dir = tempfile::tempdir().unwrap();
    sysfs::save(std::path::Path::new("/"), dir.path()).unwrap();
    let back = sysfs::read(dir.path()).unwrap();
    assert_eq!(back.host().kernel, t.host().kernel);
}

/// Two NUMA nodes: with the NICs of socket 0 gone, a socket-0 GPU's closest NIC is on
/// socket 1, which affinity says (what NCCL and GDS would pick, and why it is slow).
#[test]
fn affinity_warns_when_the_closest_nic_is_on_another_numa_node() {
    let dgx = file::to_toml(&preset("dgx").unwrap());
    let gone = [
        "0000:1b:00.0",
        "0000:1d:00.0",
        "0000:3e:00.0",
        "0000:40:00.0",
    ];
    let text: Vec<&str> = dgx
        .split("\n[[function]]\n")
        .filter(|block| {
            !gone
                .iter()
                .any(|b| block.starts_with(&format!("bdf = \"{b}\"")))
        })
        .collect();
    let t = file::parse("t.toml", &text.join("\n[[function]]\n")).unwrap();
    let r = check(&t, None);
    let a = r.affinity.iter().find(|a| a.gpu == "0000:1a:00.0").unwrap();
    assert!(a.nics.iter().all(|n| n.level == TopoLevel::SYS));
    assert_eq!(a.nics.len(), 4, "{:?}", a.nics);
    assert!(
        a.warnings
            .iter()
            .any(|w| w.contains("is on another NUMA node")),
        "{:?}",
        a.warnings
    );
    // A socket-1 GPU keeps its own switch's NICs, by bus address.
    let a = r.affinity.iter().find(|a| a.gpu == "0000:88:00.0").unwrap();
    assert_eq!(a.nics[0].map_type, MapType::BusAddr);
    assert!(a.warnings.is_empty());
}

/// Partial and broken kernel files in a snapshot: a config.gz that is not gzip, a cut
/// kallsyms, an IOMMU group without `type`. Each is said in `not_read` (or, for the
/// group, left out), nothing panics, and the rest is read.
#[test]
fn broken_kernel_files_are_said_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    sysfs::write_snapshot(&preset("workstation").unwrap(), dir.path()).unwrap();
    let root = dir.path();
    // No boot config: the reader falls to /proc/config.gz, then /proc/kallsyms.
    std::fs::remove_dir_all(root.join("boot")).unwrap();
    std::fs::write(root.join("proc/config.gz"), b"not gzip at all").unwrap();
    std::fs::write(root.join("proc/kallsyms"), b"0000000000000000 T sched").unwrap();
    std::fs::create_dir_all(root.join("sys/kernel/iommu_groups/3")).unwrap();
    let t = sysfs::read(root).unwrap();
    let r = check(&t, None);
    assert_eq!(r.kernel.release.as_deref(), Some("6.8.0-45-generic"));
    assert_eq!(r.kernel.p2pdma, None);
    let not_read = r.not_read.join("\n");
    assert!(not_read.contains("/proc/config.gz:"), "{not_read}");
    assert!(
        not_read.contains("/proc/kallsyms: not a full symbol table"),
        "{not_read}"
    );
    assert!(t.host().kernel.iommu_groups.is_empty());
    assert!(r.pairs.iter().all(|p| p.status == "unknown"));
    // A readable kallsyms with the P2PDMA symbols gives the options back.
    let mut syms = String::from("0000000000000000 T schedule\n");
    for i in 0..2000 {
        syms.push_str(&format!("0000000000000000 t f{i}\n"));
    }
    syms.push_str(
        "0000000000000000 T pci_p2pdma_add_resource\n0000000000000000 T memremap_pages\n",
    );
    std::fs::remove_file(root.join("proc/config.gz")).unwrap();
    std::fs::write(root.join("proc/kallsyms"), syms).unwrap();
    let r = check(&sysfs::read(root).unwrap(), None);
    assert_eq!(r.kernel.config_source.as_deref(), Some("/proc/kallsyms"));
    assert_eq!(r.kernel.p2pdma, Some(true));
    assert!(r.ok);
}

/// Every shared real snapshot: the check's verdicts and levels are the topology
/// report's (one source of truth). With no kernel facts in these snapshots a pair is
/// unknown, unless the host bridge already refuses it (whatever the kernel has), and the
/// missing config is named.
#[test]
fn shared_snapshots_check_with_the_report_verdicts_and_say_the_kernel_is_unknown() {
    for name in common::snapshot_names() {
        let (_tmp, root) = common::unpack(&name);
        let t = sysfs::read(&root).unwrap();
        let r = check(&t, None);
        assert_eq!(r.kernel.p2pdma, None, "{name}");
        assert!(
            r.not_read
                .iter()
                .any(|n| n.starts_with("the kernel config")),
            "{name}: {:?}",
            r.not_read
        );
        for p in &r.pairs {
            let (a, b) = (t.find(&p.a).unwrap(), t.find(&p.b).unwrap());
            let v = peerdma::fabric::calc_map_type_and_dist(&t, a, b);
            assert_eq!((p.map_type, p.distance), (v.map_type, v.distance), "{name}");
            assert_eq!(p.level, peerdma::fabric::topo_level(&t, a, b), "{name}");
            let want = if v.map_type == MapType::NotSupported && !v.cpu_unknown {
                "chipset-not-supported"
            } else {
                "unknown"
            };
            assert_eq!(p.status, want, "{name}: {p:?}");
        }
        assert!(
            !r.ok
                || r.pairs
                    .iter()
                    .all(|p| p.kind != "gpu-nvme" && p.kind != "gpu-nic")
        );
    }
}
