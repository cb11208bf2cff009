//! Bad input into every importer: truncated and random bytes give typed errors that name
//! the place, never panics.

mod common;

use std::fs;

use peerdma::fabric::import::{config, file, lspci, sysfs};
use peerdma::fabric::{preset, FabricError, PRESETS};
use proptest::prelude::*;

fn lspci_samples() -> Vec<String> {
    common::snapshot_names()
        .iter()
        .flat_map(|n| ["tv", "tvnn"].map(|f| format!("{n}.lspci-{f}.txt")))
        .map(|f| fs::read_to_string(common::shared_sysfs().join(f)).unwrap())
        .collect()
}

#[test]
fn truncated_lspci_text_never_panics() {
    for text in lspci_samples() {
        for cut in (0..text.len()).step_by(7) {
            if text.is_char_boundary(cut) {
                let _ = lspci::parse("cut", &text[..cut]);
            }
        }
    }
}

#[test]
fn lspci_errors_name_line_and_column() {
    let err = lspci::parse(
        "pasted",
        "-[0000:00]-+-00.0  Host\n           +-zz.0  Bad\n",
    )
    .unwrap_err();
    match &err {
        FabricError::Lspci {
            source_name,
            line,
            column,
            ..
        } => {
            assert_eq!((source_name.as_str(), *line, *column), ("pasted", 2, 14));
        }
        other => panic!("{other:?}"),
    }
    assert!(
        err.to_string().starts_with("pasted, line 2, column 14:"),
        "{err}"
    );
    assert!(matches!(
        lspci::parse("-", "hello"),
        Err(FabricError::Lspci { line: 1, .. })
    ));
    assert!(matches!(
        lspci::parse("-", ""),
        Err(FabricError::Lspci { .. })
    ));
    // A continuation line that continues nothing.
    let e = lspci::parse("-", "-[0000:00]---00.0  A\n   +-01.0  B\n").unwrap_err();
    assert!(e.to_string().contains("line 2"), "{e}");
}

#[test]
fn truncated_topology_files_never_panic_and_name_the_file() {
    for (name, _, text) in PRESETS {
        for cut in (0..text.len()).step_by(11) {
            if !text.is_char_boundary(cut) {
                continue;
            }
            if let Err(e) = file::parse(name, &text[..cut]) {
                assert!(e.to_string().starts_with(name), "{e}");
            }
        }
    }
}

#[test]
fn topology_file_errors_say_what_is_wrong() {
    let e = file::parse(
        "t.toml",
        "[[function]]\nbdf = \"0000:00:20.0\"\nid = \"1:2\"\nclass = \"0x0\"\n",
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("t.toml") && e.to_string().contains("0000:00:20.0"),
        "{e}"
    );
    let e = file::parse("t.toml", "[[host_bridge]]\nroot = \"0000:00\"\n[[function]]\nbdf = \"0000:00:01.0\"\nid = \"zz:2\"\nclass = \"0x0\"\n").unwrap_err();
    assert!(
        e.to_string().contains("function 0000:00:01.0: id `zz:2`"),
        "{e}"
    );
    let e = file::parse(
        "t.toml",
        "[[function]]\nbdf = \"0000:05:00.0\"\nid = \"1:2\"\nclass = \"0x010802\"\n",
    )
    .unwrap_err();
    assert!(
        e.to_string().contains(
            "0000:05:00.0 has no parent: there is no bridge to bus 0000:05 and no host bridge 0000:05"
        ),
        "{e}"
    );
    let e = file::parse("t.toml", "[host]\ncpu = 1\n").unwrap_err();
    assert!(e.to_string().contains("unknown field `cpu`"), "{e}");
    let e = preset("nope").unwrap_err();
    assert!(
        e.to_string().contains("workstation, dgx, dgx-acs, q35"),
        "{e}"
    );
}

#[test]
fn broken_sysfs_snapshots_give_errors_naming_the_path() {
    let (_tmp, root) = common::unpack("vm-virtio-flat");
    let dev = root.join("sys/devices/pci0000:00/0000:00:02.0");
    // Garbage in an attribute.
    fs::write(dev.join("vendor"), "not hex\n").unwrap();
    let e = sysfs::read(&root).unwrap_err();
    assert!(e.to_string().contains("0000:00:02.0/vendor"), "{e}");
    fs::write(dev.join("vendor"), "0x1af4\n").unwrap();
    // A resource line that is not three numbers.
    fs::write(dev.join("resource"), "0x1000 0x2000\n").unwrap();
    let e = sysfs::read(&root).unwrap_err();
    assert!(e.to_string().contains("resource: line 1"), "{e}");
    fs::write(dev.join("resource"), "0x2000 0x1000 0x200\n").unwrap();
    assert!(sysfs::read(&root)
        .unwrap_err()
        .to_string()
        .contains("below start"));
    fs::write(dev.join("resource"), "").unwrap();
    // A truncated config file is not an error: ACS and bus ranges are just unknown.
    fs::write(dev.join("config"), [0x86u8, 0x80, 0x01]).unwrap();
    assert!(sysfs::read(&root).is_ok());
    // A missing mandatory attribute.
    fs::remove_file(dev.join("class")).unwrap();
    let e = sysfs::read(&root).unwrap_err();
    assert!(e.to_string().contains("0000:00:02.0/class: missing"), "{e}");
    // A dangling device link.
    let (_tmp2, root2) = common::unpack("vm-virtio-flat");
    fs::remove_dir_all(root2.join("sys/devices/pci0000:00/0000:00:03.0")).unwrap();
    let e = sysfs::read(&root2).unwrap_err();
    assert!(e.to_string().contains("0000:00:03.0"), "{e}");
    // No sysfs at all.
    let empty = tempfile::tempdir().unwrap();
    let e = sysfs::read(empty.path()).unwrap_err();
    assert!(e.to_string().contains("sys/bus/pci/devices"), "{e}");
}

#[test]
fn random_bytes_in_every_sysfs_attribute_never_panic() {
    let (_tmp, root) = common::unpack("32em64t-2n8c-dax-nvme-mic-dimms");
    let dev = root.join("sys/devices/pci0000:00/0000:00:1c.0");
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for attr in sysfs::ATTRIBUTES {
        let keep = fs::read(dev.join(attr)).ok();
        for len in [0usize, 1, 3, 17, 64, 300] {
            let bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            fs::write(dev.join(attr), &bytes).unwrap();
            let _ = sysfs::read(&root);
        }
        match keep {
            Some(k) => fs::write(dev.join(attr), k).unwrap(),
            None => fs::remove_file(dev.join(attr)).unwrap(),
        }
    }
    assert!(sysfs::read(&root).is_ok(), "restored snapshot reads again");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_text_into_lspci_and_toml_never_panics(text in "[-+|\\\\\\[\\]0-9a-f:. \\n]{0,200}") {
        let _ = lspci::parse("r", &text);
        let _ = file::parse("r", &text);
    }

    #[test]
    fn random_bytes_into_config_decode_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4200)) {
        let _ = config::decode(&bytes);
    }

    #[test]
    fn random_utf8_into_importers_never_panics(text in any::<String>()) {
        let _ = lspci::parse("r", &text);
        let _ = file::parse("r", &text);
    }
}

/// One validation of bus numbers for every source (Topology::build): each case is a
/// machine that used to be accepted silently or blamed on a function below it.
#[test]
fn contradictory_bus_ranges_are_refused_naming_the_bridge() {
    let machine = |bridges: &str| {
        format!(
            "[[host_bridge]]\nroot = \"0000:00\"\n{bridges}[[function]]\nbdf = \"0000:00:00.0\"\nclass = \"0x060000\"\nkind = \"host-bridge\"\n"
        )
    };
    let bridge = |bdf: &str, buses: &str| {
        format!(
            "[[function]]\nbdf = \"{bdf}\"\nclass = \"0x060400\"\nkind = \"root-port\"\nbuses = \"{buses}\"\n"
        )
    };
    let down = |bdf: &str, buses: &str| {
        format!(
            "[[function]]\nbdf = \"{bdf}\"\nclass = \"0x060400\"\nkind = \"switch-downstream\"\nbuses = \"{buses}\"\n"
        )
    };
    let up = |bdf: &str, buses: &str| {
        format!(
            "[[function]]\nbdf = \"{bdf}\"\nclass = \"0x060400\"\nkind = \"switch-upstream\"\nbuses = \"{buses}\"\n"
        )
    };
    for (what, text, bdf, why) in [
        (
            "two root ports opening one bus",
            machine(&(bridge("0000:00:01.0", "05-05") + &bridge("0000:00:02.0", "05-06"))),
            "0000:00:02.0",
            "opens bus 05, which 0000:00:01.0 opens too",
        ),
        (
            "sibling ranges overlapping",
            machine(&(bridge("0000:00:01.0", "05-08") + &bridge("0000:00:02.0", "07-09"))),
            "0000:00:01.0",
            "overlap those of 0000:00:02.0",
        ),
        (
            "a child range wider than its parent's",
            machine(&(bridge("0000:00:01.0", "05-08") + &up("0000:05:00.0", "06-0a"))),
            "0000:05:00.0",
            "reach outside its parent 0000:00:01.0's 05-08",
        ),
        (
            "a switch below a bridge, fine, then a downstream port outside it",
            machine(
                &(bridge("0000:00:01.0", "05-08")
                    + &up("0000:05:00.0", "06-08")
                    + &down("0000:06:00.0", "07-07")
                    + &down("0000:06:01.0", "09-09")),
            ),
            "0000:06:01.0",
            "reach outside its parent 0000:05:00.0's 06-08",
        ),
    ] {
        let e = file::parse("t.toml", &text).expect_err(what).to_string();
        assert!(e.contains(&format!("bridge {bdf}")), "{what}: {e}");
        assert!(e.contains(why), "{what}: {e}");
    }
    // A bridge's range never holds its own bus (the lspci importer took `-[00]-`).
    let e = lspci::parse("t", "-[0000:00]-+-00.0  Intel Corporation Host bridge\n           \\-03.0-[02]----00.0  Intel Corporation Ethernet Controller\n")
        .map(|_| ())
        .and_then(|_| lspci::parse("t", "-[0000:05]-+-00.0  Intel Corporation Host bridge\n           \\-03.0-[04]----00.0  Intel Corporation Ethernet Controller\n").map(|_| ()))
        .expect_err("bus 04 below bus 05");
    assert!(
        e.to_string().contains("do not lie above its own bus 05"),
        "{e}"
    );
}

/// A bridge whose class file says it is something else (found by the sysfs fuzz target:
/// the importer accepted it as an endpoint with bus numbers, which its TOML refused).
#[test]
fn bus_numbers_on_a_function_that_is_no_bridge_are_refused() {
    let (_tmp, root) = common::unpack("40intel64-2g2n4c-pcilocality");
    let class = root.join("sys/devices/pci0000:00/0000:00:07.0/class");
    assert_eq!(fs::read_to_string(&class).unwrap().trim(), "0x060400");
    fs::write(&class, "0x020000\n").unwrap();
    let e = sysfs::read(&root).unwrap_err().to_string();
    assert!(
        e.contains("function 0000:00:07.0 has bus numbers, but its class 0x020000"),
        "{e}"
    );
}
