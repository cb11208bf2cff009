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
    // A bridge without bus numbers, with a function on the bus it would open: the
    // error names the bridge too, not only its orphan.
    let text = machine(
        "[[function]]\nbdf = \"0000:00:01.0\"\nclass = \"0x060400\"\nkind = \"root-port\"\n\
         [[function]]\nbdf = \"0000:01:00.0\"\nclass = \"0x010802\"\n",
    );
    let e = file::parse("t.toml", &text).unwrap_err().to_string();
    assert!(
        e.contains("function 0000:01:00.0 has no parent")
            && e.contains("(bridge 0000:00:01.0 has no bus numbers: give the bridge `buses`"),
        "{e}"
    );
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

/// The function facts the validator (Topology::build through `validate`) refuses for
/// every source, each named at the line of the function's `[[function]]` table: BARs a
/// type-0 header cannot hold, link widths PCIe does not have, a negotiated speed above
/// the maximum, ACS control bits the capability lacks, and a kind the class denies.
#[test]
fn function_facts_no_pcie_function_can_have_are_refused_at_their_table_line() {
    let machine = |extra: &str| {
        format!(
            "[[host_bridge]]\nroot = \"0000:00\"\n[[function]]\nbdf = \"0000:00:00.0\"\nclass = \"0x060000\"\nkind = \"host-bridge\"\n\
             [[function]]\nbdf = \"0000:00:01.0\"\nclass = \"0x010802\"\n{extra}"
        )
    };
    let link = |w: u8, mw: u8, s: &str, ms: &str| {
        format!(
            "link = {{ speed = \"{s}\", width = {w}, max_speed = \"{ms}\", max_width = {mw} }}\n"
        )
    };
    let bar = |index: u8, at: u64, size: u64, is_64bit: bool| {
        format!(
            "[[function.bar]]\nindex = {index}\ncpu = \"{at:#x}\"\nbus = \"{at:#x}\"\nsize = {size}\nis_64bit = {is_64bit}\n"
        )
    };
    // The same function, well formed, is accepted: each case below breaks one fact.
    let good = machine(&(link(4, 4, "8.0 GT/s", "8.0 GT/s") + &bar(0, 0xfe00_0000, 0x4000, false)));
    file::parse("t.toml", &good).expect("a well-formed NVMe function");
    let other = "[[function]]\nbdf = \"0000:00:02.0\"\nclass = \"0x020000\"\n[[function.bar]]\nindex = 0\ncpu = \"0xfe000000\"\nbus = \"0xfe000000\"\nsize = 4096\n";
    for (extra, why) in [
        (
            "kind = \"host-bridge\"\n".to_string(),
            "kind is host bridge but class 0x010802 is not a host bridge",
        ),
        (
            "kind = \"root-port\"\n".to_string(),
            "kind is root port but class 0x010802 is not a PCI-to-PCI bridge",
        ),
        (
            link(0, 4, "8.0 GT/s", "8.0 GT/s"),
            "link width x0 is not a PCIe lane count",
        ),
        (
            link(3, 4, "8.0 GT/s", "8.0 GT/s"),
            "link width x3 is not a PCIe lane count",
        ),
        (
            link(4, 33, "8.0 GT/s", "8.0 GT/s"),
            "link max_width x33 is not a PCIe lane count",
        ),
        (
            link(8, 4, "8.0 GT/s", "8.0 GT/s"),
            "link width x8 is above its maximum x4",
        ),
        (
            link(4, 4, "16.0 GT/s", "8.0 GT/s"),
            "link speed 16.0 GT/s is above its maximum 8.0 GT/s",
        ),
        (
            "acs = { state = \"present\", cap = \"SV|TB\", ctrl = \"SV|RR|CR\" }\n".to_string(),
            "ACS control enables RR|CR that its capability (SV|TB) does not have",
        ),
        (bar(6, 0xfe00_0000, 0x1000, false), "BAR 6 is out of range"),
        (
            bar(1, 0xfe00_0000, 0x1000, false) + &bar(1, 0xfd00_0000, 0x1000, false),
            "BAR 1 is given twice",
        ),
        (
            bar(0, 0x40_0000_0000, 0x1000, true) + &bar(1, 0xfd00_0000, 0x1000, false),
            "BAR 1 is the upper half of 64-bit BAR 0",
        ),
        (bar(0, 0xfe00_0000, 0, false), "BAR 0 has size 0"),
        (
            bar(0, 0xfe00_0000, 0x3000, false),
            "size 0x3000, which is not a power of two",
        ),
        (
            bar(0, 0xffff_ffff_0000_0000, 0x1_0000_0000_0000, true),
            "wraps past 2^64",
        ),
        (
            bar(0, 0x1_0000_0000, 0x1000, false),
            "BAR 0 is 32-bit but its bus address 0x100000000 + 0x1000 reaches above 4 GiB",
        ),
        (
            bar(0, 0xfe00_0000, 0x10_0000, false) + &bar(2, 0xfe08_0000, 0x1000, false),
            "BARs 0 and 2 overlap",
        ),
        (
            bar(0, 0xfe00_0000, 0x1000, false) + other,
            "BAR 0 at 0xfe000000 overlaps BAR 0 of 0000:00:01.0",
        ),
    ] {
        let e = file::parse("t.toml", &machine(&extra)).expect_err(why);
        assert!(matches!(e, FabricError::Invalid { .. }), "{why}: {e:?}");
        let e = e.to_string();
        // The overlap is blamed on the later function, whose table starts at line 16.
        let at = if why.contains("of 0000:00:01.0") {
            "t.toml, line 16: function 0000:00:02.0: "
        } else {
            "t.toml, line 7: function 0000:00:01.0: "
        };
        assert!(e.starts_with(at), "{why}: {e}");
        assert!(e.contains(why), "{why}: {e}");
    }
}

/// A topology with no function is refused, saying whether the file was empty or only
/// lacked `[[function]]` tables (a BOM and a name, or a file cut before its first one).
#[test]
fn topology_files_without_functions_are_refused() {
    let e = file::parse("t.toml", "").unwrap_err().to_string();
    assert_eq!(e, "t.toml: describes no PCI function: the file is empty");
    let e = file::parse("t.toml", "\u{feff}name = \"x\"\n")
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "t.toml: describes no PCI function: it has no [[function]] table (is it cut short?)"
    );
    for (name, _, text) in PRESETS {
        let cut = text.find("[[function]]").unwrap();
        let e = file::parse(name, &text[..cut]).unwrap_err();
        assert!(matches!(e, FabricError::Empty { .. }), "{name}: {e:?}");
    }
    // A BOM before a whole file is read as the file.
    let ws = PRESETS[0].2;
    let with_bom = format!("\u{feff}{ws}");
    assert_eq!(
        file::parse("t", &with_bom).unwrap().functions(),
        preset("workstation").unwrap().functions()
    );
}

/// A sysfs snapshot is a reading of real hardware: a link no PCIe device can train (3
/// lanes) is dropped to unknown with a note naming the function, and the rest is read.
#[test]
fn impossible_link_readings_in_a_snapshot_are_dropped_with_a_note() {
    let (_tmp, root) = common::unpack("40intel64-2g2n4c-pcilocality");
    let before = sysfs::read(&root).unwrap();
    let (id, f) = before
        .ids()
        .map(|id| (id, before.function(id)))
        .find(|(_, f)| f.link.is_some())
        .expect("a function with a link");
    let bdf = f.bdf;
    let dir = fs::canonicalize(root.join("sys/bus/pci/devices").join(bdf.to_string())).unwrap();
    fs::write(dir.join("current_link_width"), "3\n").unwrap();
    let after = sysfs::read(&root).unwrap();
    assert_eq!(after.function(id).link, None);
    assert_eq!(after.functions().len(), before.functions().len());
    let note = format!("{bdf}: link ignored: link width x3 is not a PCIe lane count");
    assert!(
        after.gaps().notes.iter().any(|n| n.starts_with(&note)),
        "{:?}",
        after.gaps().notes
    );
}

/// lspci draws every group of branches as `+-` ... `\-`: a text that stops while a
/// `+-` still promises a sibling was cut short, and is refused at its end; a text that
/// jumps back left past an unfinished group lost lines in between.
#[test]
fn lspci_text_cut_inside_the_tree_is_refused() {
    for text in lspci_samples() {
        assert!(lspci::parse("whole", &text).is_ok());
        let lines: Vec<&str> = text.lines().collect();
        // Every cut after a line that leaves a `+-` group open.
        let mut refused = 0;
        for n in 1..lines.len() {
            let cut = lines[..n].join("\n") + "\n";
            let rest_continues = lines[n..].iter().any(|l| !l.trim().is_empty());
            match lspci::parse("cut", &cut) {
                Err(e) => {
                    refused += 1;
                    let e = e.to_string();
                    assert!(
                        e.contains("never ends with `\\-`"),
                        "cut after line {n}: {e}"
                    );
                }
                // Accepted only where the tree really is complete: no later line
                // continues it at a column still open.
                Ok(_) => assert!(
                    rest_continues,
                    "cut after line {n} accepted though nothing followed"
                ),
            }
        }
        assert!(refused > 0, "no cut of a sample was refused");
    }
    // Lines missing in the middle: the group opened on line 2 is abandoned.
    let e = lspci::parse(
        "gap",
        "-[0000:00]-+-00.0  Host\n           +-01.0-[01]--+-00.0  A\n           |            +-00.1  B\n           \\-02.0  C\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with(
            "gap, line 4, column 12: the branch opened with `+-` at line 2, column 25 never ends"
        ),
        "{e}"
    );
}

/// Plain `lspci` (one line per function, no tree) is answered with the command to run.
#[test]
fn plain_lspci_output_gets_a_hint_to_use_tv() {
    for text in [
        "00:00.0 Host bridge: Intel Corporation 82G33/G31/P35/P31 Express DRAM Controller\n00:01.0 VGA compatible controller: Device 1234:1111 (rev 02)\n",
        "0000:00:00.0 Host bridge: Intel Corporation Device 29c0\n",
    ] {
        let e = lspci::parse("-", text).unwrap_err().to_string();
        assert!(
            e.starts_with("-, line 1, column 1: this is plain `lspci` output")
                && e.contains("give `lspci -tv`"),
            "{e}"
        );
    }
}
