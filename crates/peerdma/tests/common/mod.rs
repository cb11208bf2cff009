//! Helpers shared by the integration tests: where ../shared lives and unpacking its
//! sysfs snapshots.

#![allow(dead_code)]

use std::path::PathBuf;

/// `../shared/data/sysfs` of the workspace, or `$PEERDMA_SHARED/data/sysfs`.
pub fn shared_sysfs() -> PathBuf {
    let base = std::env::var_os("PEERDMA_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared"));
    let dir = base.join("data/sysfs");
    assert!(
        dir.is_dir(),
        "reference data not found at {} (set PEERDMA_SHARED to the shared/ directory)",
        dir.display()
    );
    dir
}

/// The snapshot names in shared/data/sysfs.
pub fn snapshot_names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(shared_sysfs())
        .unwrap()
        .filter_map(|e| {
            let n = e.ok()?.file_name().to_string_lossy().into_owned();
            n.strip_suffix(".tar.gz").map(str::to_string)
        })
        .collect();
    names.sort();
    assert!(
        names.len() >= 4,
        "expected the four shared snapshots, found {names:?}"
    );
    names
}

/// Unpacks `NAME.tar.gz` into a temporary directory; returns it and the snapshot root.
pub fn unpack(name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let file = std::fs::File::open(shared_sysfs().join(format!("{name}.tar.gz"))).unwrap();
    tar::Archive::new(flate2::read::GzDecoder::new(file))
        .unpack(tmp.path())
        .unwrap();
    let root = tmp.path().join(name);
    (tmp, root)
}
