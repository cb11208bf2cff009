//! The main job end to end, after p2pmem-test: NVMe drive A reads into drive B's
//! controller memory buffer mapped in a process, B writes it out, every byte checked.
//! On the workstation the data crosses the switch by bus address; with ACS redirect on
//! the switch ports it goes through the host bridge by IOVA; on a q35 guest, whose host
//! bridge is not allowlisted, it is refused with the reason.

use peerdma::dma::MapKind;
use peerdma::fabric::import::file;
use peerdma::fabric::{preset, MapType, PRESETS};
use peerdma::gup::GupError;
use peerdma::host::{Host, HostConfig};
use peerdma::scenario::p2p_copy::{self, CopyError, P2pCopyParams};

fn host(topo: peerdma::fabric::Topology, iommu: Option<bool>) -> Host {
    let specs = Host::nvme_specs(&topo, 16 << 20);
    Host::build(
        topo,
        &HostConfig {
            ram_bytes: 64 << 20,
            iommu,
        },
        &specs,
    )
    .unwrap()
}

fn params() -> P2pCopyParams {
    P2pCopyParams {
        chunk_size: 256 << 10,
        chunks: 8,
        ..P2pCopyParams::default()
    }
}

#[test]
fn p2pmem_copy_crosses_the_switch_by_bus_address_and_verifies() {
    let h = host(preset("workstation").unwrap(), None);
    let mut calls = 0;
    let r = p2p_copy::run(&h, &params(), &mut |_, _| calls += 1).unwrap();
    // Target: the first drive with a published CMB; source: the drive closest to it.
    assert_eq!(
        (r.source.as_str(), r.target.as_str()),
        ("0000:06:00.0", "0000:05:00.0")
    );
    assert_eq!(r.source_to_cmb, MapType::BusAddr);
    assert!(r.p2p.verified && r.host_ram.verified, "checksums");
    let total = 8 * (256 << 10);
    // A writes into B's CMB through the switch; B reads its own CMB, which crosses
    // no link and is counted apart.
    assert_eq!(r.dma.via_switch, total);
    assert_eq!(r.dma.same_device, total);
    assert_eq!(r.dma.host_ram, 2 * total);
    assert_eq!(r.dma.via_host_bridge, 0);
    assert_eq!(r.dma.mappings, 32);
    assert_eq!(r.dma.unmappings, 32);
    assert_eq!(r.pages_pinned, 32 * 64);
    assert_eq!((r.pins_left, r.mappings_left), (0, 0), "nothing leaks");
    assert!(r.sanitizer.is_empty(), "{:?}", r.sanitizer);
    assert_eq!(calls, 16);
    // The CMB pages went back to the pool.
    let cmb = h
        .device::<peerdma::drivers::nvme::Nvme>(r.target.parse().unwrap())
        .unwrap()
        .cmb()
        .unwrap()
        .clone();
    assert_eq!(cmb.available(), cmb.size());
}

#[test]
fn p2pmem_copy_on_q35_is_refused_naming_the_host_bridge() {
    let h = host(preset("q35").unwrap(), None);
    let e = p2p_copy::run(&h, &params(), &mut |_, _| {}).unwrap_err();
    match &e {
        CopyError::Gup(GupError::Dma(d)) => {
            assert_eq!(GupError::Dma(d.clone()).errno(), 121, "EREMOTEIO");
            assert_eq!(e.errno(), peerdma::errno::Errno::EREMOTEIO);
            // The refusal keeps the fabric's verdict, not a string.
            match d {
                peerdma::dma::DmaError::RemoteIo { verdict } => {
                    assert_eq!(verdict.map_type, MapType::NotSupported);
                    assert!(!verdict.host_bridges.is_empty(), "{verdict:?}");
                }
                other => panic!("{other}"),
            }
        }
        other => panic!("{other}"),
    }
    assert!(e.to_string().contains("8086:29c0"), "{e}");
    assert!(h.dma().sanitizer().is_clean());
    assert_eq!(h.dma().live_mappings(), 0);
}

#[test]
fn p2pmem_copy_with_acs_redirect_goes_through_the_host_bridge_by_iova() {
    let text = PRESETS.iter().find(|p| p.0 == "workstation").unwrap().2;
    // Turn on request/completion redirect on every switch downstream port.
    let acs = text.replace(
        "kind = \"switch-downstream\"",
        "kind = \"switch-downstream\"\n# ACS",
    );
    let mut out = String::new();
    let mut in_dsp = false;
    for line in acs.lines() {
        if line == "# ACS" {
            in_dsp = true;
            continue;
        }
        if in_dsp && line.starts_with("acs = ") {
            out.push_str("acs = { state = \"present\", cap = \"SV|TB|RR|CR|UF|EC|DT\", ctrl = \"SV|RR|CR|UF\" }\n");
            in_dsp = false;
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    let topo = file::parse("workstation with ACS", &out).unwrap();
    let h = host(topo, Some(true));
    let r = p2p_copy::run(&h, &params(), &mut |_, _| {}).unwrap();
    assert_eq!(r.source_to_cmb, MapType::ThruHostBridge);
    assert!(
        r.source_to_cmb_reason.contains("pci=disable_acs_redir")
            || r.source_to_cmb_reason.contains("ACS redirect")
    );
    assert!(r.p2p.verified && r.host_ram.verified);
    let total = 8 * (256 << 10);
    assert_eq!(
        r.dma.via_host_bridge, total,
        "A to B's CMB through the root complex"
    );
    assert_eq!(
        (r.dma.via_switch, r.dma.same_device),
        (0, total),
        "B reads its own CMB: no link crossed, nothing through the switch"
    );
    assert!(r.sanitizer.is_empty(), "{:?}", r.sanitizer);
    // And the mapping A gets for the CMB is an IOVA.
    let mm = h.spawn();
    let cmb = h
        .device::<peerdma::drivers::nvme::Nvme>(r.target.parse().unwrap())
        .unwrap()
        .cmb()
        .unwrap()
        .clone();
    let va = cmb.mmap(&mm, 8192, true, 0, peerdma::mm::Prot::RW).unwrap();
    let sg = peerdma::gup::get_user_dma_sg(
        &mm,
        &h.dma().attach(r.source.parse().unwrap()).unwrap(),
        peerdma::gup::UserSg::new(va, 8192, peerdma::dma::Direction::FromDevice),
    )
    .unwrap();
    assert!(sg.segments().iter().all(|s| s.kind == MapKind::Iova));
}

#[test]
fn find_p2pmem_picks_a_published_cmb_every_client_reaches() {
    // pci_p2pmem_find_many: on the workstation both CMBs under the switch serve both
    // drives (distance 0 + 4 each, a tie broken by the seed, reproducibly).
    let h = host(preset("workstation").unwrap(), None);
    let clients: Vec<peerdma::addr::Bdf> = ["0000:05:00.0", "0000:06:00.0"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    let mut seen = std::collections::BTreeSet::new();
    for seed in 0..16 {
        let p = h.find_p2pmem(&clients, seed).unwrap();
        assert_eq!(h.find_p2pmem(&clients, seed).unwrap().dev(), p.dev());
        seen.insert(p.dev());
    }
    assert_eq!(seen.len(), 2);
    // Adding the drive on its own root port: still reachable through the allowlisted
    // host bridge, so a provider is found.
    let mut three = clients.clone();
    three.push("0000:07:00.0".parse().unwrap());
    assert!(h.find_p2pmem(&three, 1).is_some());
    // On q35 no CMB reaches the other drive: none.
    let q = host(preset("q35").unwrap(), None);
    let qc: Vec<peerdma::addr::Bdf> = ["0000:00:03.0", "0000:00:04.0"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    assert!(q.find_p2pmem(&qc, 1).is_none());
    assert!(
        q.find_p2pmem(&qc[..1], 1).is_some(),
        "a drive reaches its own CMB"
    );
}
