//! Inputs and outputs a user can trust (issue 13, first part): a save is all or
//! nothing and never mixes with what a directory held; a closed pipe ends the output
//! quietly and a full disk is one error line and exit 1, never a panic; an endless
//! input is refused at a bound instead of read until memory runs out.

use std::io::Read;
use std::process::{Command, Output, Stdio};

fn peerdma(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_peerdma"))
        .args(args)
        .output()
        .expect("run peerdma")
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs peerdma with stdout a pipe that the reader closes after `keep` bytes.
fn into_closed_pipe(args: &[&str], keep: usize) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_peerdma"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run peerdma");
    let mut out = child.stdout.take().unwrap();
    let mut first = vec![0u8; keep];
    out.read_exact(&mut first).unwrap();
    drop(out); // `| head -c keep`
    child.wait_with_output().unwrap()
}

#[test]
fn a_closed_pipe_ends_every_output_quietly() {
    // Closed before the command writes anything (`| true`), and closed part way
    // through an output larger than a pipe holds (`| head -c 16`).
    let all = "gpu,nic,nvme,storage,bridge,other";
    let cases: [(&[&str], usize); 8] = [
        (&["topo", "--preset", "dgx"], 0),
        (&["topo", "--preset", "dgx", "--json"], 0),
        (&["topo", "--preset", "dgx", "--toml"], 0),
        (
            &[
                "topo",
                "--preset",
                "workstation",
                "--explain",
                "0000:03:00.0",
                "0000:05:00.0",
            ],
            0,
        ),
        (&["run"], 0),
        (&["run", "rdma", "--messages", "2"], 0),
        (&["topo", "--preset", "dgx", "--class", all, "--json"], 16),
        (&["topo", "--preset", "dgx", "--class", all], 16),
    ];
    for (args, keep) in cases {
        let o = into_closed_pipe(args, keep);
        assert!(o.status.success(), "{args:?}: {:?} {}", o.status, err(&o));
        assert_eq!(err(&o), "", "{args:?}");
    }
}

#[test]
fn a_full_disk_is_one_error_and_exit_1() {
    if !std::path::Path::new("/dev/full").exists() {
        return;
    }
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_peerdma"))
        .args(["topo", "--preset", "dgx"])
        .stdout(full)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let e = err(&o);
    assert!(!e.contains("panicked"), "{e}");
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(e.starts_with("peerdma: error: writing the output"), "{e}");
    assert!(e.contains("No space left on device"), "{e}");
}

#[test]
fn an_endless_input_is_refused_at_the_bound() {
    if !std::path::Path::new("/dev/zero").exists() {
        return;
    }
    for args in [
        &["topo", "--file", "/dev/zero"][..],
        &["topo", "--lspci", "/dev/zero"],
        &["run", "rdma", "--topology", "/dev/zero"],
    ] {
        let o = peerdma(args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        assert!(
            err(&o).contains("larger than 64 MiB"),
            "{args:?}: {}",
            err(&o)
        );
    }
}

#[test]
fn a_save_is_all_or_nothing_and_never_mixes_with_other_files() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("snap");
    let d_s = d.to_str().unwrap();
    let functions = |dir: &str| {
        let o = peerdma(&["topo", "--sysfs", dir, "--json"]);
        assert!(o.status.success(), "{}", err(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["devices"].as_array().map_or(0, Vec::len)
    };
    assert!(peerdma(&["topo", "--preset", "q35", "--save", d_s])
        .status
        .success());
    let q35 = functions(d_s);
    // A second save into the same directory is refused and leaves it as it was.
    let o = peerdma(&["topo", "--preset", "dgx", "--save", d_s]);
    assert_eq!(o.status.code(), Some(1));
    assert!(err(&o).contains("is not empty"), "{}", err(&o));
    assert_eq!(functions(d_s), q35, "the first snapshot is untouched");
    // --force replaces it whole.
    assert!(
        peerdma(&["topo", "--preset", "dgx", "--save", d_s, "--force"])
            .status
            .success()
    );
    let dgx = functions(d_s);
    assert!(dgx > q35);
    // A directory holding anything else is refused, and keeps its files.
    let other = tmp.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("notes.txt"), "mine").unwrap();
    let o = peerdma(&["topo", "--preset", "q35", "--save", other.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(std::fs::read_dir(&other).unwrap().count(), 1);
    // No temporary directories are left beside the targets.
    let left: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
    // --force without --save is a usage error.
    assert_eq!(
        peerdma(&["topo", "--preset", "q35", "--force"])
            .status
            .code(),
        Some(2)
    );
}

#[test]
fn a_missing_topology_file_is_named_as_a_file_not_a_preset() {
    let o = peerdma(&["run", "rdma", "--topology", "/nonexistent/machine.toml"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        err(&o).trim(),
        "peerdma: error: topology file /nonexistent/machine.toml does not exist"
    );
    // A bare name is still a preset.
    let o = peerdma(&["run", "rdma", "--topology", "nope"]);
    assert!(err(&o).contains("no preset `nope`"), "{}", err(&o));
}

#[test]
fn an_unknown_cpu_leaves_cpu_supports_p2pdma_unknown() {
    // lspci text says nothing about the CPU: the kernel's cpu_supports_p2pdma() cannot
    // be answered, so the JSON says null, not false. A preset states its CPU.
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("tree.txt");
    std::fs::write(&f, "-[0000:00]-+-00.0  Intel Corporation Device\n           \\-01.0  NVIDIA Corporation Device\n").unwrap();
    let json = |args: &[&str]| -> serde_json::Value {
        let o = peerdma(args);
        assert!(o.status.success(), "{}", err(&o));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let v = json(&["topo", "--lspci", f.to_str().unwrap(), "--json"]);
    assert!(v["cpu_vendor"].is_null());
    assert!(
        v["cpu_supports_p2pdma"].is_null(),
        "{}",
        v["cpu_supports_p2pdma"]
    );
    let v = json(&["topo", "--preset", "workstation", "--json"]);
    assert_eq!(v["cpu_supports_p2pdma"], serde_json::Value::Bool(false));
}
