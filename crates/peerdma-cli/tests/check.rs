//! `peerdma check` as a user and a provisioning script run it: exit statuses, `--quiet`,
//! `--json` against docs/json.md, bad input, this machine as root and as an
//! unprivileged user, and the preset outputs docs/check.md shows.

use std::path::PathBuf;
use std::process::{Command, Output};

fn peerdma(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_peerdma"))
        .args(args)
        .output()
        .expect("run peerdma")
}

fn text(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn docs() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs")
}

#[test]
fn exit_status_says_whether_every_gpu_pair_can_do_p2p() {
    let ws = peerdma(&["check", "--preset", "workstation"]);
    assert_eq!(ws.status.code(), Some(0), "{}", text(&ws));
    assert!(text(&ws).contains("Result: 6 of 6 GPU-NVMe/NIC pair(s) can do P2P\n"));
    let q35 = peerdma(&["check", "--preset", "q35"]);
    assert_eq!(q35.status.code(), Some(1));
    assert!(text(&q35).contains("CNS (chipset)"));
    assert!(
        text(&q35).ends_with("Result: 0 of 3 GPU-NVMe/NIC pair(s) can do P2P (exit status 1)\n")
    );
    // A requested pair decides alone: two NVMe drives below one switch of q35? None;
    // the workstation's GPU and its switch's drive.
    let one = peerdma(&[
        "check",
        "--preset",
        "workstation",
        "--pair",
        "03:00.0",
        "07:00.0",
    ]);
    assert_eq!(one.status.code(), Some(0));
    assert!(text(&one).contains("Result: 1 of 1 requested pair(s) can do P2P"));
    // Usage errors: a --pair with one BDF, --json with --quiet.
    assert_eq!(
        peerdma(&["check", "--preset", "q35", "--pair", "00:01.0"])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(
        peerdma(&["check", "--preset", "q35", "--json", "--quiet"])
            .status
            .code(),
        Some(2)
    );
}

#[test]
fn bad_input_is_one_line_and_status_1() {
    let o = peerdma(&["check", "--preset", "q35", "--pair", "00:01.0", "09:00.0"]);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8(o.stderr).unwrap();
    assert!(e.contains("has no function 0000:09:00.0"), "{e}");
    let o = peerdma(&["check", "--sysfs", "/nonexistent-snapshot"]);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8(o.stderr).unwrap();
    assert!(
        e.starts_with("peerdma: error: ") && e.contains("/nonexistent-snapshot"),
        "{e}"
    );
    assert_eq!(e.lines().count(), 1, "{e}");
}

#[test]
fn quiet_prints_only_problems() {
    let o = peerdma(&["check", "--preset", "workstation", "--quiet"]);
    assert_eq!(
        text(&o),
        "\nResult: 6 of 6 GPU-NVMe/NIC pair(s) can do P2P\n"
    );
    let o = text(&peerdma(&["check", "--preset", "dgx-acs", "--quiet"]));
    assert!(!o.contains("Kernel") && !o.contains("providers"));
    // Only the pairs with ACS redirect on their way, each with the boot option.
    let pairs: Vec<&str> = o.lines().filter(|l| l.starts_with("  gpu-")).collect();
    assert!(!pairs.is_empty());
    assert!(o.matches("pci=disable_acs_redir=").count() >= pairs.len());
}

#[test]
fn json_has_exactly_the_documented_fields() {
    let doc = std::fs::read_to_string(docs().join("json.md")).unwrap();
    let block = doc
        .split("## `peerdma-check/1`")
        .nth(1)
        .and_then(|s| s.split("```json\n").nth(1))
        .and_then(|s| s.split("```").next())
        .expect("docs/json.md documents peerdma-check/1");
    let example: serde_json::Value = serde_json::from_str(block).unwrap();
    let o = peerdma(&["check", "--preset", "workstation", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let keys = |v: &serde_json::Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(v["schema"], "peerdma-check/1");
    assert_eq!(keys(&v), keys(&example));
    for part in ["kernel", "providers", "pairs", "affinity"] {
        let (a, b) = match (&v[part], &example[part]) {
            (serde_json::Value::Array(a), serde_json::Value::Array(b)) => (&a[0], &b[0]),
            (a, b) => (a, b),
        };
        assert_eq!(keys(a), keys(b), "{part}");
    }
    assert_eq!(
        keys(&v["kernel"]["config"][0]),
        keys(&example["kernel"]["config"][0])
    );
    assert_eq!(
        keys(&v["affinity"][0]["nvme"][0]),
        keys(&example["affinity"][0]["nvme"][0])
    );
    // The text's first line of JSON is the schema, as for the other reports.
    assert!(text(&o).starts_with("{\n  \"schema\": \"peerdma-check/1\""));
}

/// This machine, as whoever runs the tests and, when that is root, as `nobody` too:
/// the release is this kernel's, and what an unprivileged user cannot read is said.
#[test]
fn live_machine_as_root_and_as_a_user() {
    if !std::path::Path::new("/sys/bus/pci/devices").is_dir() {
        eprintln!("skipped: no /sys/bus/pci/devices");
        return;
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let o = peerdma(&["check", "--json"]);
    assert!(matches!(o.status.code(), Some(0 | 1)), "{o:?}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["kernel"]["release"], release.trim());
    let root = rustix::process::geteuid().is_root();
    if !root {
        return;
    }
    // Run a copy of the binary as nobody (the build directory may not be theirs).
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("peerdma");
    std::fs::copy(env!("CARGO_BIN_EXE_peerdma"), &bin).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let Ok(o) = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&bin)
        .args(["check", "--json"])
        .output()
    else {
        eprintln!("skipped the unprivileged run: no setpriv");
        return;
    };
    assert!(matches!(o.status.code(), Some(0 | 1)), "{o:?}");
    let user: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(user["kernel"]["release"], release.trim());
    // Without root, config space stops at 64 bytes: ACS is not read, and that is said
    // whenever root could read it.
    let root_acs_unknown = peerdma::fabric::read_live().unwrap().gaps().acs_unknown;
    let functions = std::fs::read_dir("/sys/bus/pci/devices").unwrap().count();
    if root_acs_unknown < functions {
        let not_read = user["not_read"].to_string();
        assert!(not_read.contains("ACS of"), "{not_read}");
    }
}

/// docs/check.md shows `peerdma check` on the presets; each block is the command's
/// output now (PEERDMA_WRITE_DOCS=1 rewrites them).
#[test]
fn docs_show_the_current_output() {
    let path = docs().join("check.md");
    let doc = std::fs::read_to_string(&path).unwrap();
    let mut out = String::new();
    let mut rest = doc.as_str();
    let mut stale = Vec::new();
    while let Some(at) = rest.find("<!-- generated: ") {
        out.push_str(&rest[..at]);
        let line_end = rest[at..].find(" -->\n").unwrap() + at;
        let cmd = &rest[at + "<!-- generated: ".len()..line_end];
        let end = rest[line_end..].find("<!-- end -->").unwrap() + line_end;
        let args: Vec<&str> = cmd.split_whitespace().skip(1).collect();
        let o = peerdma(&args);
        let block = format!(
            "<!-- generated: {cmd} -->\n```text\n$ {cmd}\n{}```\n(exit status {})\n",
            text(&o),
            o.status.code().unwrap_or(-1)
        );
        if rest[at..end] != block {
            stale.push(cmd.to_string());
        }
        out.push_str(&block);
        rest = &rest[end..];
    }
    out.push_str(rest);
    if std::env::var_os("PEERDMA_WRITE_DOCS").is_some() {
        std::fs::write(&path, out).unwrap();
        return;
    }
    assert!(
        stale.is_empty(),
        "docs/check.md is out of date for {stale:?}: run PEERDMA_WRITE_DOCS=1 cargo test -p peerdma-cli --test check"
    );
}
