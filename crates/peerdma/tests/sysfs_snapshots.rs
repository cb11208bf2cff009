//! The real sysfs snapshots of shared/data/sysfs: the tree read from each must be the
//! tree pciutils printed for it (same parents, same bus ranges), and the `lspci -tv`
//! importer fed that text must rebuild the same tree.

mod common;

use peerdma::fabric::import::{lspci, sysfs};
use peerdma::fabric::{Acs, MapType, PortKind, Topology};

fn lspci_text(name: &str, flavour: &str) -> String {
    std::fs::read_to_string(common::shared_sysfs().join(format!("{name}.lspci-{flavour}.txt")))
        .unwrap()
}

#[test]
fn sysfs_tree_matches_pciutils_for_every_snapshot() {
    for name in common::snapshot_names() {
        let (_tmp, root) = common::unpack(&name);
        let from_sysfs = sysfs::read(&root).unwrap_or_else(|e| panic!("{name}: {e}"));
        for flavour in ["tv", "tvnn"] {
            let from_lspci = lspci::parse(
                &format!("{name}.lspci-{flavour}.txt"),
                &lspci_text(&name, flavour),
            )
            .unwrap_or_else(|e| panic!("{name} {flavour}: {e}"));
            assert_eq!(
                from_sysfs.shape(),
                from_lspci.shape(),
                "{name}: sysfs tree differs from lspci -{flavour}"
            );
            let roots = |t: &Topology| t.host_bridges().iter().map(|h| h.root).collect::<Vec<_>>();
            assert_eq!(
                roots(&from_sysfs),
                roots(&from_lspci),
                "{name}: root buses differ"
            );
        }
    }
}

#[test]
fn lspci_nn_ids_match_sysfs_ids() {
    for name in common::snapshot_names() {
        let (_tmp, root) = common::unpack(&name);
        let s = sysfs::read(&root).unwrap();
        let l = lspci::parse("nn", &lspci_text(&name, "tvnn")).unwrap();
        for (a, b) in s.functions().iter().zip(l.functions()) {
            if b.kind.is_bridge() {
                continue; // lspci -tv prints no name or id for bridges
            }
            assert_eq!(
                (a.bdf, a.vendor, a.device),
                (b.bdf, b.vendor, b.device),
                "{name}"
            );
        }
    }
}

#[test]
fn sandy_bridge_snapshot_has_allowlisted_host_bridge_and_four_root_buses() {
    let (_tmp, root) = common::unpack("32em64t-2n8c-dax-nvme-mic-dimms");
    let t = sysfs::read(&root).unwrap();
    let roots: Vec<String> = t
        .host_bridges()
        .iter()
        .map(|h| h.root.to_string())
        .collect();
    assert_eq!(roots, ["0000:00", "0000:7f", "0000:80", "0000:ff"]);
    let hb = t.host_bridge_function(0).unwrap();
    assert_eq!((hb.vendor, hb.device), (0x8086, 0x3c00));
    assert_eq!(t.host().cpu_vendor.as_deref(), Some("GenuineIntel"));
    assert_eq!(t.host().cpu_family, Some(6));
    // 64-byte config dumps: no ACS capability can be seen; functions with a capability
    // list are unknown (the list may lead to PCIe and extended space), those without one
    // are conventional PCI and have none. The gaps count them and say so.
    assert!(t
        .functions()
        .iter()
        .all(|f| !matches!(f.acs, Acs::Present { .. })));
    let unknown = t
        .functions()
        .iter()
        .filter(|f| f.acs == Acs::Unknown)
        .count();
    assert!(unknown > 0 && unknown < t.functions().len());
    assert_eq!(t.gaps().acs_unknown, unknown);
    let note = format!(
        "ACS could not be read for {unknown} of {}",
        t.functions().len()
    );
    assert!(
        t.gaps().notes.iter().any(|n| n.contains(&note)),
        "{:?}",
        t.gaps().notes
    );
    // NVMe on root bus 00 and the NIC below 00:01.1: both below host bridge 3c00, no
    // common bridge: through the host bridge (same-host-bridge entry), certain.
    let nvme = t.find("0000:00:02.0").unwrap();
    let nic = t.find("0000:02:00.0").unwrap();
    let v = peerdma::fabric::calc_map_type_and_dist(&t, nvme, nic);
    assert_eq!(v.map_type, MapType::ThruHostBridge);
    assert!(!v.uncertain());
    // The Xeon Phi on root bus 80 is below another host bridge with no 00.0 function.
    let phi = t.find("0000:83:00.0").unwrap();
    let v = peerdma::fabric::calc_map_type_and_dist(&t, nvme, phi);
    assert_eq!(v.map_type, MapType::NotSupported);
    assert!(v.reason().contains("0000:80"), "{}", v.reason());
    // The two functions of the I350 share root port 00:01.1: distance 2, bus address,
    // but uncertain because that root port's ACS was not readable.
    let nic1 = t.find("0000:02:00.3").unwrap();
    let v = peerdma::fabric::calc_map_type_and_dist(&t, nic, nic1);
    assert_eq!((v.map_type, v.distance), (MapType::BusAddr, 2));
    assert!(v.uncertain());
    assert_eq!(
        t.function(t.find("0000:00:01.1").unwrap()).kind,
        PortKind::RootPort
    );
    assert_eq!(t.function(nic).acs, Acs::Unknown);
    assert_eq!(t.function(nic).numa_node, Some(0));
}

#[test]
fn pa_risc_snapshot_keeps_32_bit_domain() {
    let (_tmp, root) = common::unpack("2pa-pcidomain32bits");
    let t = sysfs::read(&root).unwrap();
    assert!(t.find("10000:00:04.0").is_ok());
    assert_eq!(t.host_bridges()[1].root.domain, 0x10000);
}

#[test]
fn saved_snapshot_reads_back_identically() {
    for name in common::snapshot_names() {
        let (_tmp, root) = common::unpack(&name);
        let original = sysfs::read(&root).unwrap();
        let out = tempfile::tempdir().unwrap();
        let n = sysfs::save(&root, out.path()).unwrap();
        assert_eq!(n, original.functions().len());
        let again = sysfs::read(out.path()).unwrap();
        assert_eq!(original.functions(), again.functions(), "{name}");
        assert_eq!(original.host_bridges(), again.host_bridges(), "{name}");
        assert_eq!(original.host(), again.host(), "{name}");
    }
}

/// The lspci-text importer has no class codes in `-tv`/`-tvnn` text; what it guesses
/// from names and ids must put every device in the class the sysfs snapshot of the
/// same machine says (a VGA card is no NIC because "Electronics" contains "nic").
#[test]
fn lspci_text_classes_match_the_sysfs_classes() {
    let mut wrong = Vec::new();
    for name in common::snapshot_names() {
        let (_tmp, root) = common::unpack(&name);
        let s = sysfs::read(&root).unwrap();
        for flavour in ["tv", "tvnn"] {
            let l = lspci::parse(flavour, &lspci_text(&name, flavour)).unwrap();
            for b in l.functions() {
                if b.kind.is_bridge() {
                    continue;
                }
                let Some(a) = s.functions().iter().find(|a| a.bdf == b.bdf) else {
                    continue;
                };
                if a.device_class() != b.device_class() {
                    wrong.push(format!(
                        "{name} -{flavour} {}: sysfs {:?} ({:#08x}), lspci {:?} from {:?}",
                        b.bdf,
                        a.device_class(),
                        a.class,
                        b.device_class(),
                        b.name
                    ));
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} misclassified:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

/// A real server's snapshot where a bridge is in sys/devices (class, config) but has no
/// link in sys/bus/pci/devices: the bridge is recovered from sys/devices, the report
/// says so, and the machine reads as it does whole (what pciutils and hwloc do).
#[test]
fn a_bridge_missing_from_sys_bus_is_recovered_from_sys_devices() {
    let mut tried = 0;
    for name in common::snapshot_names() {
        let (_tmp, root) = common::unpack(&name);
        let whole = sysfs::read(&root).unwrap();
        // Drop the bus link of every bridge that has a function below it.
        let bridges: Vec<String> = whole
            .functions()
            .iter()
            .filter(|f| f.buses.is_some())
            .filter(|f| {
                whole.functions().iter().any(|c| {
                    f.buses.is_some_and(|b| {
                        b.secondary == c.bdf.bus() && c.bdf.domain() == f.bdf.domain()
                    })
                })
            })
            .map(|f| f.bdf.to_string())
            .collect();
        if bridges.is_empty() {
            continue;
        }
        for b in &bridges {
            std::fs::remove_file(root.join("sys/bus/pci/devices").join(b)).unwrap();
        }
        let t = sysfs::read(&root).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(whole.functions(), t.functions(), "{name}");
        assert_eq!(whole.host_bridges(), t.host_bridges(), "{name}");
        let note = t
            .gaps()
            .notes
            .iter()
            .find(|n| n.starts_with("recovered from sys/devices"))
            .unwrap_or_else(|| panic!("{name}: no note of what was recovered"));
        for b in &bridges {
            assert!(note.contains(b.as_str()), "{name}: {note} lacks {b}");
        }
        tried += 1;
    }
    assert!(tried >= 2, "snapshots with bridges: {tried}");
}

/// A snapshot whose sys/bus/pci/devices entries are plain directories holding only
/// `class` and `local_cpus` (copied without symlinks) has no device tree: the refusal
/// says so and how to take one that works, instead of blaming sys/devices.
#[test]
fn a_snapshot_without_links_is_refused_saying_what_it_lacks() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = tmp.path().join("sys/bus/pci/devices/0000:00:00.0");
    std::fs::create_dir_all(&dev).unwrap();
    std::fs::create_dir_all(tmp.path().join("sys/devices")).unwrap();
    std::fs::write(dev.join("class"), "0x060000\n").unwrap();
    std::fs::write(dev.join("local_cpus"), "ff\n").unwrap();
    let e = sysfs::read(tmp.path()).unwrap_err().to_string();
    assert!(e.contains("0000:00:00.0"), "{e}");
    assert!(
        e.contains("plain directory, not a link into sys/devices"),
        "{e}"
    );
    assert!(e.contains("keeping symlinks"), "{e}");
}
