//! Importing a generated sysfs snapshot of 1,000 functions and building the full
//! all-pairs matrix (goal: under 100 ms together on a 2-core machine). The baseline,
//! measured in the same run, is reading every attribute file of that snapshot with
//! `std::fs` and nothing else: the I/O any sysfs reader pays.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use peerdma::fabric::import::{presets, sysfs};
use peerdma::fabric::{FnId, Matrix};

const FUNCTIONS: usize = 1000;

fn snapshot() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temporary directory");
        sysfs::write_snapshot(&presets::synthetic(FUNCTIONS), dir.path()).expect("write snapshot");
        let p = dir.path().to_path_buf();
        (dir, p)
    })
    .1
}

fn main() {
    divan::main();
}

/// Baseline: read every file the importer reads, nothing more.
#[divan::bench]
fn baseline_read_attribute_files() -> usize {
    let root = snapshot();
    let mut bytes = 0;
    for e in std::fs::read_dir(root.join("sys/bus/pci/devices")).expect("devices") {
        let dir = std::fs::canonicalize(e.expect("entry").path()).expect("link");
        for a in sysfs::ATTRIBUTES {
            bytes += std::fs::read(dir.join(a)).map_or(0, |b| b.len());
        }
    }
    bytes
}

/// The importer alone.
#[divan::bench]
fn import_sysfs() -> usize {
    sysfs::read(snapshot()).expect("read").functions().len()
}

/// The all-pairs matrix alone (a million pairs).
#[divan::bench]
fn all_pairs_matrix(b: divan::Bencher) {
    let topo = sysfs::read(snapshot()).expect("read");
    let ids: Vec<FnId> = topo.ids().collect();
    b.bench(|| Matrix::build(&topo, &ids));
}

/// The goal: import and all pairs together.
#[divan::bench]
fn import_and_all_pairs() -> usize {
    let topo = sysfs::read(snapshot()).expect("read");
    let ids: Vec<FnId> = topo.ids().collect();
    Matrix::build(&topo, &ids).ids.len()
}
