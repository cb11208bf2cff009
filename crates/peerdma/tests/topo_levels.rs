//! The `nvidia-smi topo -m` levels and path bandwidth, from the same tree as the verdict.

use peerdma::fabric::import::file;
use peerdma::fabric::{path_bandwidth, preset, topo_level, TopoLevel, Topology};

fn level(t: &Topology, a: &str, b: &str) -> TopoLevel {
    topo_level(t, t.find(a).unwrap(), t.find(b).unwrap())
}

#[test]
fn dgx_levels_follow_switches_host_bridges_and_numa_nodes() {
    let t = preset("dgx").unwrap();
    assert_eq!(level(&t, "0000:1a:00.0", "0000:1a:00.0"), TopoLevel::X);
    // GPU0 and NIC0 in one switch.
    assert_eq!(level(&t, "0000:1a:00.0", "0000:1b:00.0"), TopoLevel::PIX);
    // GPU0 and GPU2: different root complexes of socket 0.
    assert_eq!(level(&t, "0000:1a:00.0", "0000:3d:00.0"), TopoLevel::NODE);
    // GPU0 and GPU4: across sockets.
    assert_eq!(level(&t, "0000:1a:00.0", "0000:88:00.0"), TopoLevel::SYS);
    // Levels are symmetric.
    assert_eq!(level(&t, "0000:88:00.0", "0000:1a:00.0"), TopoLevel::SYS);
}

#[test]
fn workstation_levels_pix_in_the_switch_phb_to_the_other_root_port() {
    let t = preset("workstation").unwrap();
    assert_eq!(level(&t, "0000:03:00.0", "0000:05:00.0"), TopoLevel::PIX);
    assert_eq!(level(&t, "0000:03:00.0", "0000:07:00.0"), TopoLevel::PHB);
}

#[test]
fn cascaded_switches_are_pxb_and_two_functions_below_one_root_port_are_pix() {
    // Root port 01.0 -> switch A (02:00.0, ports 03:00.0 and 03:01.0);
    // port 03:00.0 -> switch B (04:00.0, port 05:00.0) -> endpoint 06:00.0;
    // port 03:01.0 -> endpoint 07:00.0. Root port 00:02.0 -> a two-function device.
    let text = r#"
[host]
cpu_vendor = "GenuineIntel"
cpu_family = 6
[[host_bridge]]
root = "0000:00"
[[function]]
bdf = "0000:00:01.0"
id = "8086:2030"
class = "0x060400"
buses = "02-07"
[[function]]
bdf = "0000:02:00.0"
id = "10b5:8747"
class = "0x060400"
buses = "03-07"
[[function]]
bdf = "0000:03:00.0"
id = "10b5:8747"
class = "0x060400"
buses = "04-06"
[[function]]
bdf = "0000:03:01.0"
id = "10b5:8747"
class = "0x060400"
buses = "07"
[[function]]
bdf = "0000:04:00.0"
id = "10b5:8747"
class = "0x060400"
buses = "05-06"
[[function]]
bdf = "0000:05:00.0"
id = "10b5:8747"
class = "0x060400"
buses = "06"
[[function]]
bdf = "0000:06:00.0"
id = "10de:2204"
class = "0x030000"
[[function]]
bdf = "0000:07:00.0"
id = "10de:2204"
class = "0x030000"
[[function]]
bdf = "0000:00:02.0"
id = "8086:2031"
class = "0x060400"
buses = "08"
[[function]]
bdf = "0000:08:00.0"
id = "15b3:101b"
class = "0x020700"
[[function]]
bdf = "0000:08:00.1"
id = "15b3:101b"
class = "0x020700"
"#;
    let t = file::parse("cascade", text).unwrap();
    use peerdma::fabric::PortKind::*;
    let kind = |s: &str| t.function(t.find(s).unwrap()).kind;
    assert_eq!(
        [
            kind("0000:00:01.0"),
            kind("0000:02:00.0"),
            kind("0000:03:00.0"),
            kind("0000:04:00.0"),
            kind("0000:05:00.0")
        ],
        [
            RootPort,
            SwitchUpstream,
            SwitchDownstream,
            SwitchUpstream,
            SwitchDownstream
        ],
        "kinds inferred from the tree's shape"
    );
    assert_eq!(level(&t, "0000:06:00.0", "0000:07:00.0"), TopoLevel::PXB);
    // A dual-port NIC in a root-port slot: its two functions cross one bridge, the
    // root port, and never the host bridge — PIX, as nvidia-smi shows on real servers.
    assert_eq!(level(&t, "0000:08:00.0", "0000:08:00.1"), TopoLevel::PIX);
    assert_eq!(level(&t, "0000:06:00.0", "0000:08:00.0"), TopoLevel::PHB);
    let v = peerdma::fabric::calc_map_type_and_dist(
        &t,
        t.find("0000:06:00.0").unwrap(),
        t.find("0000:07:00.0").unwrap(),
    );
    assert_eq!(
        v.distance,
        4 + 2,
        "06 -> 05 -> 04 -> 03 -> 02 is 4 hops, 07 -> 03:01 -> 02 is 2"
    );
}

#[test]
fn path_bandwidth_finds_the_slowest_link() {
    let t = preset("workstation").unwrap();
    let gpu = t.find("0000:03:00.0").unwrap();
    let nvme = t.find("0000:05:00.0").unwrap();
    let p = path_bandwidth(&t, gpu, nvme, false);
    // Up: GPU link (x16), port 02:08.0 is internal; down: port 02:10.0 internal, NVMe x4.
    assert_eq!(p.hops.len(), 4);
    assert_eq!(p.hops.iter().filter(|h| h.internal).count(), 2);
    let b = &p.hops[p.bottleneck.unwrap()];
    assert_eq!(b.to, "0000:05:00.0");
    let expect = 8.0 * 128.0 / 130.0 * 4.0 / 8.0;
    assert!((p.bottleneck_gbytes_per_s.unwrap() - expect).abs() < 1e-9);
    assert!(!p.incomplete);
    // Through the host bridge the walk goes all the way up and includes the switch link.
    let p = path_bandwidth(&t, gpu, nvme, true);
    assert_eq!(p.hops.len(), 8);
}

/// NODE and SYS differ only by NUMA node. Where a host bridge's node is unknown (lspci
/// -tv text, a file without `numa_node`), a pair below different host bridges is NODE
/// only for want of a better answer: the matrix and `topo_level_uncertain` say so, and
/// a pair below one host bridge, whose level needs no node, stays certain.
#[test]
fn node_without_numa_nodes_is_marked_uncertain() {
    use peerdma::fabric::{topo_level_uncertain, Matrix};
    let known = preset("dgx").unwrap();
    let text: String = file::to_toml(&known)
        .lines()
        .filter(|l| !l.starts_with("numa_node"))
        .map(|l| format!("{l}\n"))
        .collect();
    let unknown = file::parse("no-numa.toml", &text).unwrap();
    let ids = |t: &Topology| {
        [
            "0000:1a:00.0",
            "0000:1b:00.0",
            "0000:3d:00.0",
            "0000:88:00.0",
        ]
        .map(|b| t.find(b).unwrap())
    };
    let (mk, mu) = (
        Matrix::build(&known, &ids(&known)),
        Matrix::build(&unknown, &ids(&unknown)),
    );
    // (pair, level with nodes, level without, uncertain without)
    for (i, j, with, without, unsure) in [
        (0, 1, TopoLevel::PIX, TopoLevel::PIX, false),
        (0, 2, TopoLevel::NODE, TopoLevel::NODE, true),
        (0, 3, TopoLevel::SYS, TopoLevel::NODE, true),
    ] {
        assert_eq!(mk.get(i, j).level, with);
        assert!(!mk.get(i, j).level_uncertain);
        assert_eq!(mu.get(i, j).level, without);
        assert_eq!(mu.get(i, j).level_uncertain, unsure, "pair {i},{j}");
        let (a, b) = (ids(&unknown)[i], ids(&unknown)[j]);
        assert_eq!(topo_level_uncertain(&unknown, a, b), unsure);
        assert_eq!(topo_level(&unknown, a, b), without);
    }
}
