//! `lspci -vvv` text, alone or with `lspci -tv` text of the same machine: the tree
//! rebuilt from the bridges' bus numbers, and what only `-vvv` carries (class, port type,
//! BARs, links, ACS, NUMA node, IOMMU group) read into the model, so that the verdicts
//! stop being uncertain. The samples in tests/lspci/ are laid out as pciutils prints
//! them: a PLX switch with a V100 and a dual-port ConnectX-5, ACS redirect on the NIC's
//! downstream port, an NVMe on its own root port.

use std::path::PathBuf;

use peerdma::fabric::import::{file, lspci};
use peerdma::fabric::{
    calc_map_type_and_dist, topo_level, Acs, AcsFlags, FabricError, LinkSpeed, MapType, PortKind,
    TopoLevel, Topology,
};

fn sample(name: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/lspci")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn f<'a>(t: &'a Topology, bdf: &str) -> &'a peerdma::fabric::Function {
    t.function(t.find(bdf).unwrap())
}

#[test]
fn vvv_text_alone_rebuilds_the_tree_and_carries_acs_links_bars_and_numa() {
    let vvv = lspci::parse("server", &sample("server.lspci-vvvnn.txt")).unwrap();
    let tree = lspci::parse("server", &sample("server.lspci-tvnn.txt")).unwrap();
    // The tree from bus numbers is the tree lspci -tv draws.
    assert_eq!(vvv.shape(), tree.shape());
    assert_eq!(vvv.functions().len(), 10);
    // Port types from the Express capability, classes with prog-if.
    for (bdf, kind) in [
        ("0000:00:00.0", PortKind::HostBridge),
        ("0000:00:01.0", PortKind::RootPort),
        ("0000:01:00.0", PortKind::SwitchUpstream),
        ("0000:02:10.0", PortKind::SwitchDownstream),
        ("0000:04:00.1", PortKind::Endpoint),
    ] {
        assert_eq!(f(&vvv, bdf).kind, kind, "{bdf}");
    }
    assert_eq!(f(&vvv, "0000:06:00.0").class, 0x010802);
    assert_eq!(f(&vvv, "0000:03:00.0").class, 0x030200);
    assert_eq!(
        (
            f(&vvv, "0000:03:00.0").vendor,
            f(&vvv, "0000:03:00.0").device
        ),
        (0x10de, 0x1db1)
    );
    assert_eq!(f(&vvv, "0000:03:00.0").subsystem, Some((0x10de, 0x1212)));
    // ACS: present with its control bits; absent where extended capabilities were read
    // and ACS is not among them.
    assert_eq!(
        f(&vvv, "0000:02:10.0").acs,
        Acs::Present {
            cap: AcsFlags(0x7d),
            ctrl: AcsFlags(AcsFlags::RR | AcsFlags::CR)
        }
    );
    assert_eq!(f(&vvv, "0000:01:00.0").acs, Acs::Absent);
    assert_eq!(vvv.gaps().acs_unknown, 0);
    // Links: the NIC trained at x8 of x16.
    let l = f(&vvv, "0000:04:00.0").link.unwrap();
    assert_eq!(
        (l.speed, l.width, l.max_speed, l.max_width),
        (LinkSpeed::Gt8, 8, LinkSpeed::Gt8, 16)
    );
    // BARs: the V100's 16 GiB window, 64-bit and prefetchable; the 32-bit register BAR.
    let gpu = f(&vvv, "0000:03:00.0");
    assert_eq!(gpu.bars.len(), 3);
    let b1 = gpu.bars.iter().find(|b| b.index == 1).unwrap();
    assert_eq!(
        (b1.cpu.0, b1.size, b1.is_64bit, b1.prefetchable),
        (0x380_0000_0000, 16 << 30, true, true)
    );
    assert!(!gpu.bars[0].is_64bit && !gpu.bars[0].prefetchable);
    // NUMA and IOMMU groups.
    assert_eq!(vvv.host_bridges()[0].numa_node, Some(0));
    assert!(!vvv.gaps().numa_unknown);
    assert_eq!(f(&vvv, "0000:06:00.0").iommu_group, Some(2));
    // The verdicts are now certain: ACS redirect on the NIC's port sends GPU<->NIC
    // through the (allowlisted Sky Lake-E) host bridge; the switch still makes it PIX.
    let (gpu, nic) = (
        vvv.find("0000:03:00.0").unwrap(),
        vvv.find("0000:04:00.0").unwrap(),
    );
    let v = calc_map_type_and_dist(&vvv, gpu, nic);
    assert_eq!(v.map_type, MapType::ThruHostBridge);
    assert!(!v.uncertain(), "{v:?}");
    assert_eq!(topo_level(&vvv, gpu, nic), TopoLevel::PIX);
    // The NIC's two functions meet at the redirecting port itself, which the kernel's
    // walk checks too (calc_map_type_and_dist tests each bridge before comparing).
    let (n0, n1) = (nic, vvv.find("0000:04:00.1").unwrap());
    let v = calc_map_type_and_dist(&vvv, n0, n1);
    assert_eq!(
        (v.map_type, v.uncertain()),
        (MapType::ThruHostBridge, false)
    );
    // Without the redirect bits the pair is by bus address, and certain.
    let cleared = sample("server.lspci-vvvnn.txt").replace(
        "ACSCtl:\tSrcValid- TransBlk- ReqRedir+ CmpltRedir+",
        "ACSCtl:\tSrcValid- TransBlk- ReqRedir- CmpltRedir-",
    );
    let c = lspci::parse("cleared", &cleared).unwrap();
    let (g, n) = (
        c.find("0000:03:00.0").unwrap(),
        c.find("0000:04:00.0").unwrap(),
    );
    let v = calc_map_type_and_dist(&c, g, n);
    assert_eq!(
        (v.map_type, v.distance, v.uncertain()),
        (MapType::BusAddr, 4, false)
    );
    // From the tree alone the same pair is uncertain: ACS unknown.
    let (tg, tn) = (
        tree.find("0000:03:00.0").unwrap(),
        tree.find("0000:04:00.0").unwrap(),
    );
    assert!(calc_map_type_and_dist(&tree, tg, tn).uncertain());
}

#[test]
fn tree_and_vvv_text_together_give_the_vvv_facts_on_the_drawn_tree() {
    let both = format!(
        "{}\n{}",
        sample("server.lspci-tvnn.txt"),
        sample("server.lspci-vvvnn.txt")
    );
    let t = lspci::parse("both", &both).unwrap();
    let vvv = lspci::parse("both", &sample("server.lspci-vvvnn.txt")).unwrap();
    assert_eq!(t.functions(), vvv.functions());
    assert_eq!(t.shape(), vvv.shape());
    // Whatever it accepts reads back from its TOML.
    let back = file::parse("back.toml", &file::to_toml(&t)).unwrap();
    assert_eq!(back.functions(), t.functions());
    assert_eq!(back.host_bridges(), t.host_bridges());
    // The -vvv text may cover only part of the tree (`lspci -vvv -s ...`).
    let one_block: String = sample("server.lspci-vvvnn.txt")
        .split("\n\n")
        .find(|b| b.starts_with("0000:02:10.0"))
        .unwrap()
        .to_string();
    let part = lspci::parse(
        "part",
        &format!("{}{one_block}\n", sample("server.lspci-tvnn.txt")),
    )
    .unwrap();
    assert_eq!(f(&part, "0000:02:10.0").acs, f(&vvv, "0000:02:10.0").acs);
    assert_eq!(f(&part, "0000:03:00.0").acs, Acs::Unknown);
    assert!(
        part.gaps()
            .notes
            .iter()
            .any(|n| n.starts_with("9 functions of the tree have no `lspci -vvv` block")),
        "{:?}",
        part.gaps().notes
    );
}

#[test]
fn vvv_text_of_another_machine_than_the_tree_is_refused() {
    let other = sample("server.lspci-vvvnn.txt").replace("0000:06:00.0 ", "0000:07:00.0 ");
    let e = lspci::parse("x", &format!("{}{other}", sample("server.lspci-tvnn.txt")))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("0000:07:00.0 is not in the tree: are the two texts of the same machine?"),
        "{e}"
    );
    let other = sample("server.lspci-vvvnn.txt").replace(
        "secondary=06, subordinate=06",
        "secondary=06, subordinate=07",
    );
    let e = lspci::parse("x", &format!("{}{other}", sample("server.lspci-tvnn.txt")))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("the tree gives 0000:00:02.0 buses [06], this block [06-07]"),
        "{e}"
    );
    let twice = format!(
        "{}\n{}",
        sample("server.lspci-vvvnn.txt"),
        sample("server.lspci-vvvnn.txt")
    );
    let e = lspci::parse("x", &twice).unwrap_err();
    assert!(
        matches!(&e, FabricError::Lspci { reason, .. } if reason.contains("0000:00:00.0 is listed again (first at line 1)")),
        "{e}"
    );
}

/// lspci run without root prints `Capabilities: <access denied>`, and without `-n` no
/// IDs: classes come from the class names, ACS stays unknown, and the notes say what to
/// run instead.
#[test]
fn vvv_text_of_an_unprivileged_run_without_ids_says_what_it_lacks() {
    let t = lspci::parse("user", &sample("server.lspci-vvv-user.txt")).unwrap();
    let vvv = lspci::parse("root", &sample("server.lspci-vvvnn.txt")).unwrap();
    assert_eq!(t.shape(), vvv.shape());
    for (a, b) in t.functions().iter().zip(vvv.functions()) {
        assert_eq!(a.class, b.class, "{}", a.bdf);
        assert_eq!(a.acs, Acs::Unknown, "{}", a.bdf);
        assert_eq!(a.vendor, peerdma::fabric::Function::UNKNOWN_ID);
        assert_eq!(
            a.bars, b.bars,
            "{}: BARs come from sysfs, root or not",
            a.bdf
        );
    }
    // Without the Express capability the port kinds are inferred from the tree.
    assert_eq!(f(&t, "0000:02:10.0").kind, PortKind::SwitchDownstream);
    assert_eq!(t.gaps().acs_unknown, 10);
    let notes = t.gaps().notes.join("\n");
    assert!(notes.contains("`Capabilities: <access denied>`"), "{notes}");
    assert!(notes.contains("give `lspci -vvvnn`"), "{notes}");
    assert!(t.gaps().acs_hint.contains("sudo lspci -vvv"));
    let (g, n) = (
        t.find("0000:03:00.0").unwrap(),
        t.find("0000:04:00.0").unwrap(),
    );
    assert!(calc_map_type_and_dist(&t, g, n).uncertain());
}

/// A link lspci reports that no PCIe device can train is dropped with a note, as in a
/// sysfs snapshot; a malformed line is an error at its line.
#[test]
fn impossible_and_malformed_vvv_lines() {
    let text = sample("server.lspci-vvvnn.txt");
    let nvme_at = text.find("0000:06:00.0").unwrap();
    let (head, tail) = text.split_at(nvme_at);
    let bad_width = format!(
        "{head}{}",
        tail.replacen("Width x4 (ok)", "Width x3 (ok)", 1)
    );
    let t = lspci::parse("w", &bad_width).unwrap();
    assert_eq!(f(&t, "0000:06:00.0").link, None);
    assert!(
        t.gaps()
            .notes
            .iter()
            .any(|n| n.starts_with("0000:06:00.0: link ignored: link width x3")),
        "{:?}",
        t.gaps().notes
    );
    let bad_bus = text.replacen("secondary=06,", "secondary=zz,", 1);
    let e = lspci::parse("b", &bad_bus).unwrap_err().to_string();
    let line = 1 + text[..text.find("secondary=06,").unwrap()]
        .matches('\n')
        .count();
    assert!(
        e.starts_with(&format!(
            "b, line {line}, column 2: expected `Bus: primary=PP"
        )),
        "{e}"
    );
    let bad_numa = text.replacen("NUMA node: 0", "NUMA node: zero", 1);
    let e = lspci::parse("n", &bad_numa).unwrap_err().to_string();
    assert!(
        e.starts_with("n, line 6, column 2: `NUMA node:` is not a number"),
        "{e}"
    );
}

/// The real thing: where pciutils is installed (`.ci/run` installs it), `lspci -tvnn`
/// and `lspci -vvvnn` of this machine, read alone and together, describe what its /sys
/// does: the same tree, and per function the same IDs, class, kind, buses, BARs, link,
/// ACS (both unknown without root), NUMA node and IOMMU group.
#[test]
fn live_lspci_text_agrees_with_live_sysfs() {
    let run = |flags: &str| {
        std::process::Command::new("lspci")
            .arg(flags)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let (Some(tv), Some(vvv)) = (run("-tvnn"), run("-vvvnn")) else {
        eprintln!("skipped: lspci is not installed (.ci/run installs pciutils)");
        return;
    };
    if !std::path::Path::new("/sys/bus/pci/devices").is_dir() {
        eprintln!("skipped: no /sys/bus/pci/devices");
        return;
    }
    let sys = peerdma::fabric::import::sysfs::read(std::path::Path::new("/")).unwrap();
    let tree = lspci::parse("lspci -tvnn", &tv).unwrap();
    let alone = lspci::parse("lspci -vvvnn", &vvv).unwrap();
    let both = lspci::parse("both", &format!("{tv}{vvv}")).unwrap();
    assert_eq!(tree.shape(), sys.shape());
    assert_eq!(alone.shape(), sys.shape());
    assert_eq!(both.functions(), alone.functions());
    for (l, s) in alone.functions().iter().zip(sys.functions()) {
        let at = s.bdf;
        assert_eq!((l.vendor, l.device), (s.vendor, s.device), "{at}");
        assert_eq!(l.class, s.class, "{at}");
        assert_eq!(l.kind, s.kind, "{at}");
        assert_eq!(l.buses, s.buses, "{at}");
        assert_eq!(l.bars, s.bars, "{at}");
        assert_eq!(l.link, s.link, "{at}");
        assert_eq!(l.acs, s.acs, "{at}");
        assert_eq!(l.numa_node, s.numa_node, "{at}");
        assert_eq!(l.iommu_group, s.iommu_group, "{at}");
        if l.subsystem.is_some() {
            assert_eq!(l.subsystem, s.subsystem, "{at}");
        }
    }
}

/// Text captured from a QEMU guest (pciutils 3.9.0): conventional PCI virtio functions
/// on one root bus, as root and as a user. Root or not, the BARs and classes are read
/// (they come from sysfs); the host bridge, whose status says it has no capability list,
/// has no ACS either way; the virtio functions' ACS is absent as root (no Express
/// capability) and unknown to a user (`<access denied>`).
#[test]
fn captured_vm_text_as_root_and_as_user() {
    let root = lspci::parse("vm", &sample("vm-virtio.lspci-vvvnn.txt")).unwrap();
    let user = lspci::parse("vm", &sample("vm-virtio.lspci-vvvnn-user.txt")).unwrap();
    let tree = lspci::parse("vm", &sample("vm-virtio.lspci-tvnn.txt")).unwrap();
    assert_eq!(root.shape(), tree.shape());
    assert_eq!(user.shape(), tree.shape());
    let blk = f(&root, "0000:00:02.0");
    assert_eq!(
        (blk.vendor, blk.device, blk.class),
        (0x1af4, 0x1042, 0x018000)
    );
    assert_eq!(blk.bars.len(), 1);
    assert_eq!(
        (blk.bars[0].cpu.0, blk.bars[0].size, blk.bars[0].is_64bit),
        (0x40_0008_0000, 512 << 10, true)
    );
    assert_eq!(f(&root, "0000:00:00.0").kind, PortKind::HostBridge);
    for t in [&root, &user] {
        assert_eq!(f(t, "0000:00:00.0").acs, Acs::Absent);
    }
    assert_eq!(blk.acs, Acs::Absent);
    assert_eq!(f(&user, "0000:00:02.0").acs, Acs::Unknown);
    assert_eq!(f(&user, "0000:00:02.0").bars, blk.bars);
}
