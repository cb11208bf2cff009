//! The TOML topology format: file -> model -> file -> model is lossless, for every
//! preset and for every real snapshot.

mod common;

use peerdma::fabric::import::{file, sysfs};
use peerdma::fabric::{preset, Topology, PRESETS};

fn assert_same(a: &Topology, b: &Topology, what: &str) {
    assert_eq!(a.functions(), b.functions(), "{what}: functions");
    assert_eq!(a.host_bridges(), b.host_bridges(), "{what}: host bridges");
    assert_eq!(a.host(), b.host(), "{what}: host");
    assert_eq!(a.shape(), b.shape(), "{what}: tree");
    assert_eq!(a.description(), b.description(), "{what}: description");
}

#[test]
fn presets_round_trip_losslessly() {
    for (name, _, _) in PRESETS {
        let model = preset(name).unwrap();
        let text = file::to_toml(&model);
        let again = file::parse(name, &text).unwrap();
        assert!(
            model.description().is_some(),
            "{name}: the preset says what it is"
        );
        assert!(text.contains("description = "), "{name}: --toml keeps it");
        assert_same(&model, &again, name);
        assert_eq!(
            file::to_toml(&again),
            text,
            "{name}: the written file is a fixed point"
        );
    }
}

#[test]
fn sysfs_snapshots_round_trip_through_toml() {
    for name in common::snapshot_names() {
        let (_tmp, root) = common::unpack(&name);
        let model = sysfs::read(&root).unwrap();
        let text = file::to_toml(&model);
        let again = file::parse(&name, &text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_same(&model, &again, &name);
    }
}

#[test]
fn presets_written_as_sysfs_snapshots_read_back_the_same() {
    for (name, _, _) in PRESETS {
        let model = preset(name).unwrap();
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            sysfs::write_snapshot(&model, dir.path()).unwrap(),
            model.functions().len()
        );
        let again = sysfs::read(dir.path()).unwrap_or_else(|e| panic!("{name}: {e}"));
        // sysfs has no place for a sentence about the machine.
        assert_same(&model.clone().with_description(None), &again, name);
    }
}

#[test]
fn synthetic_machine_has_the_asked_size_and_survives_a_snapshot() {
    let model = peerdma::fabric::import::presets::synthetic(1000);
    assert_eq!(model.functions().len(), 1000);
    assert!(model.host_bridges().len() >= 2);
    let dir = tempfile::tempdir().unwrap();
    sysfs::write_snapshot(&model, dir.path()).unwrap();
    let again = sysfs::read(dir.path()).unwrap();
    assert_same(&model, &again, "synthetic");
}
