//! The `peerdma topo` command as a user runs it: text, JSON, --explain, --save and
//! readable errors with a failing exit status.

use std::path::PathBuf;
use std::process::{Command, Output};

fn peerdma(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_peerdma"))
        .args(args)
        .output()
        .expect("run peerdma")
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn shared() -> PathBuf {
    std::env::var_os("PEERDMA_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared"))
}

/// The path of a shared snapshot's `lspci -{flavour}` text.
fn shared_lspci(name: &str, flavour: &str) -> String {
    shared()
        .join(format!("data/sysfs/{name}.lspci-{flavour}.txt"))
        .to_string_lossy()
        .into_owned()
}

#[test]
fn topo_preset_prints_both_matrices_and_legends() {
    let out = stdout(&peerdma(&["topo", "--preset", "workstation"]));
    assert!(out.contains("nvidia-smi topo -m view"));
    assert!(out.contains("PIX   = Connection traversing at most a single PCIe bridge"));
    assert!(out.contains("Kernel P2PDMA verdict"));
    // D0 (GPU 03:00.0) to the NVMe drives 05:00.0 and 06:00.0 through the switch: BUS 4;
    // to the drive on its own root port (07:00.0) through the host bridge.
    let row = out.lines().rev().find(|l| l.starts_with("D0 ")).unwrap();
    assert_eq!(
        row.split_whitespace().collect::<Vec<_>>(),
        ["D0", "BUS", "0", "BUS", "4", "BUS", "4", "BUS", "4", "HB", "6"]
    );
}

#[test]
fn topo_json_lists_every_pair_with_level_and_verdict() {
    let out = stdout(&peerdma(&[
        "topo", "--preset", "dgx-acs", "--class", "gpu", "--json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["schema"], "peerdma-topo/1");
    assert_eq!(v["devices"].as_array().unwrap().len(), 8);
    let pairs = v["pairs"].as_array().unwrap();
    assert_eq!(pairs.len(), 64);
    let p = pairs
        .iter()
        .find(|p| p["provider"] == "0000:1a:00.0" && p["client"] == "0000:1c:00.0")
        .unwrap();
    assert_eq!(p["level"], "PIX");
    assert_eq!(p["map_type"], "thru-host-bridge");
    assert_eq!(p["distance"], 4);
}

#[test]
fn explain_names_the_ports_and_the_fix() {
    let out = stdout(&peerdma(&[
        "topo",
        "--preset",
        "dgx-acs",
        "--explain",
        "1a:00.0",
        "1c:00.0",
    ]));
    assert!(
        out.contains("Kernel verdict: through host bridge, distance 4"),
        "{out}"
    );
    assert!(
        out.contains("pci=disable_acs_redir=0000:19:00.0;0000:19:02.0"),
        "{out}"
    );
    assert!(out.contains("ACS ctrl SV|RR|CR|UF"), "{out}");
    let out = stdout(&peerdma(&[
        "topo",
        "--preset",
        "q35",
        "--explain",
        "00:03.0",
        "00:04.0",
        "--json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["verdict"]["map_type"], "not-supported");
    assert!(v["reason"].as_str().unwrap().contains("8086:29c0"));
}

#[test]
fn lspci_text_from_stdin_and_file() {
    let path = shared().join("data/sysfs/40intel64-2g2n4c-pcilocality.lspci-tvnn.txt");
    let out = stdout(&peerdma(&[
        "topo",
        "--lspci",
        path.to_str().unwrap(),
        "--json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["not_read"][0].as_str().unwrap().contains("ACS"));
    let text = std::fs::read(&path).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_peerdma"))
        .args(["topo", "--lspci", "-", "--class", "nic"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(&text).unwrap();
    let o = child.wait_with_output().unwrap();
    let out = stdout(&o);
    assert!(
        out.contains("QLogic Corp. IBA7322 QDR InfiniBand HCA"),
        "{out}"
    );
}

#[test]
fn bad_input_is_one_readable_line_and_exit_status_1() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.toml");
    std::fs::write(&f, "[[function]]\nbdf = 12\n").unwrap();
    let o = peerdma(&["topo", "--file", f.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8(o.stderr).unwrap();
    assert!(err.starts_with("peerdma: error: "), "{err}");
    assert!(err.contains("bad.toml") && err.contains("line 2"), "{err}");
    let o = peerdma(&[
        "topo",
        "--preset",
        "workstation",
        "--explain",
        "0000:09:00.0",
        "03:00.0",
    ]);
    let err = String::from_utf8(o.stderr).unwrap();
    assert!(err.contains("has no function 0000:09:00.0"), "{err}");
    let o = peerdma(&["topo", "--preset", "workstation", "--class", "gpus"]);
    assert!(String::from_utf8(o.stderr)
        .unwrap()
        .contains("unknown class `gpus`"));
}

#[test]
fn save_then_read_back_gives_the_same_report() {
    if !std::path::Path::new("/sys/bus/pci/devices").is_dir() {
        eprintln!("skipped: this machine has no /sys/bus/pci/devices to save");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    stdout(&peerdma(&["topo", "--save", snap.to_str().unwrap()]));
    let live = stdout(&peerdma(&["topo", "--json"]));
    let saved = stdout(&peerdma(&[
        "topo",
        "--sysfs",
        snap.to_str().unwrap(),
        "--json",
    ]));
    let mut a: serde_json::Value = serde_json::from_str(&live).unwrap();
    let mut b: serde_json::Value = serde_json::from_str(&saved).unwrap();
    a["source"] = serde_json::Value::Null;
    b["source"] = serde_json::Value::Null;
    assert_eq!(a, b);
}

#[test]
fn toml_output_reads_back() {
    let out = stdout(&peerdma(&["topo", "--preset", "dgx", "--toml"]));
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("dgx.toml");
    std::fs::write(&f, &out).unwrap();
    let a = stdout(&peerdma(&["topo", "--preset", "dgx", "--json"]));
    let b = stdout(&peerdma(&["topo", "--file", f.to_str().unwrap(), "--json"]));
    let strip = |s: &str| {
        let mut v: serde_json::Value = serde_json::from_str(s).unwrap();
        v["source"] = serde_json::Value::Null;
        v
    };
    assert_eq!(strip(&a), strip(&b));
}

/// Keys of a JSON object, sorted.
fn keys(v: &serde_json::Value) -> Vec<String> {
    let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
    k.sort();
    k
}

#[test]
fn json_output_has_exactly_the_documented_fields() {
    let doc = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/json.md"),
    )
    .unwrap();
    let examples: Vec<serde_json::Value> = doc
        .split("```json\n")
        .skip(1)
        .map(|b| serde_json::from_str(b.split("```").next().unwrap()).unwrap())
        .collect();
    let topo: serde_json::Value = serde_json::from_str(&stdout(&peerdma(&[
        "topo",
        "--preset",
        "workstation",
        "--json",
    ])))
    .unwrap();
    assert_eq!(keys(&topo), keys(&examples[0]));
    assert_eq!(keys(&topo["devices"][0]), keys(&examples[0]["devices"][0]));
    assert_eq!(keys(&topo["pairs"][0]), keys(&examples[0]["pairs"][0]));
    assert_eq!(
        keys(&topo["host_bridges"][0]),
        keys(&examples[0]["host_bridges"][0])
    );
    let explain: serde_json::Value = serde_json::from_str(&stdout(&peerdma(&[
        "topo",
        "--preset",
        "dgx-acs",
        "--explain",
        "1a:00.0",
        "1c:00.0",
        "--json",
    ])))
    .unwrap();
    assert_eq!(keys(&explain), keys(&examples[1]));
    assert_eq!(keys(&explain["verdict"]), keys(&examples[1]["verdict"]));
    assert_eq!(keys(&explain["bandwidth"]), keys(&examples[1]["bandwidth"]));
    assert_eq!(keys(&explain["walk"][0]), keys(&examples[1]["walk"][0]));
    let run: serde_json::Value = serde_json::from_str(&stdout(&peerdma(&[
        "run",
        "p2pmem",
        "--chunk-size",
        "16K",
        "--chunks",
        "1",
        "--json",
    ])))
    .unwrap();
    assert_eq!(run["schema"], "peerdma-run/1");
    assert_eq!(keys(&run), keys(&examples[2]));
    assert_eq!(keys(&run["p2p"]), keys(&examples[2]["p2p"]));
    assert_eq!(keys(&run["dma"]), keys(&examples[2]["dma"]));
    let rdma: serde_json::Value = serde_json::from_str(&stdout(&peerdma(&[
        "run",
        "rdma",
        "--message-size",
        "16K",
        "--messages",
        "2",
        "--json",
    ])))
    .unwrap();
    assert_eq!(rdma["schema"], "peerdma-run-rdma/1");
    assert_eq!(keys(&rdma), keys(&examples[3]));
    assert_eq!(keys(&rdma["cases"][0]), keys(&examples[3]["cases"][0]));
    assert_eq!(keys(&rdma["nic_stats"]), keys(&examples[3]["nic_stats"]));
    assert_eq!(keys(&rdma["dma"]), keys(&examples[3]["dma"]));
}

#[test]
fn bench_topo_reports_against_its_baseline() {
    let out = stdout(&peerdma(&[
        "bench",
        "topo",
        "--functions",
        "60",
        "--iterations",
        "1",
    ]));
    assert!(out.contains("60 functions, 3600 pairs"), "{out}");
    assert!(out.contains("(ratio "), "{out}");
    assert!(out.contains("higher is better"), "{out}");
}

#[test]
fn save_of_a_preset_writes_that_preset_as_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("dgx");
    let out = stdout(&peerdma(&[
        "topo",
        "--preset",
        "dgx",
        "--save",
        snap.to_str().unwrap(),
    ]));
    assert!(out.contains("wrote 42 PCI functions of dgx"), "{out}");
    let group =
        std::fs::canonicalize(snap.join("sys/bus/pci/devices/0000:1a:00.0/iommu_group")).unwrap();
    assert!(
        group.ends_with("sys/kernel/iommu_groups/2"),
        "{}",
        group.display()
    );
    let strip = |s: &str| {
        let mut v: serde_json::Value = serde_json::from_str(s).unwrap();
        v["source"] = serde_json::Value::Null;
        v
    };
    let a = stdout(&peerdma(&["topo", "--preset", "dgx", "--json"]));
    let b = stdout(&peerdma(&[
        "topo",
        "--sysfs",
        snap.to_str().unwrap(),
        "--json",
    ]));
    assert_eq!(strip(&a), strip(&b));
}

#[test]
fn bench_mm_reports_each_figure_beside_its_kernel_baseline() {
    let out = stdout(&peerdma(&[
        "bench", "mm", "--bytes", "16777216", "--runs", "1",
    ]));
    assert!(out.contains("4096 pages (16 MiB)"), "{out}");
    assert!(
        out.contains("kernel io_uring register+unregister")
            || out.contains("kernel baseline skipped"),
        "{out}"
    );
    assert!(out.contains("kernel munmap"), "{out}");
    assert!(out.contains("16.0 B metadata/frame"), "{out}");
}

#[test]
fn run_p2pmem_copies_through_the_cmb_and_reports_json() {
    let out = stdout(&peerdma(&[
        "run",
        "p2pmem",
        "--chunk-size",
        "64K",
        "--chunks",
        "4",
        "--json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["source_to_cmb"], "bus-addr");
    assert_eq!(v["p2p"]["verified"], true);
    assert_eq!(v["host_ram"]["verified"], true);
    // Drive A's writes into B's CMB cross the switch; B reading its own CMB crosses
    // no link and is counted apart.
    assert_eq!(v["dma"]["via_switch"], 4 * 65536);
    assert_eq!(v["dma"]["same_device"], 4 * 65536);
    assert_eq!(v["dma"]["host_ram"], 2 * 4 * 65536);
    assert_eq!(v["mappings_left"], 0);
    assert_eq!(v["pins_left"], 0);
    assert_eq!(v["sanitizer"].as_array().unwrap().len(), 0);
}

#[test]
fn run_text_report_and_refusal_on_q35() {
    let out = stdout(&peerdma(&[
        "run",
        "p2pmem",
        "--chunk-size",
        "16K",
        "--chunks",
        "2",
    ]));
    assert!(out.contains("checksums match"), "{out}");
    assert!(out.contains("sanitizer: clean"), "{out}");
    let o = peerdma(&["run", "p2pmem", "--topology", "q35", "--chunks", "1"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8(o.stderr).unwrap();
    assert!(
        err.contains("EREMOTEIO") && err.contains("8086:29c0"),
        "{err}"
    );
    let o = peerdma(&["run", "p2pmem", "--chunk-size", "12x"]);
    assert_eq!(o.status.code(), Some(2), "clap rejects a bad size");
}

#[test]
fn run_default_tells_the_rdma_story_with_every_case_verified() {
    // 4 messages of 64 KiB per case on the dgx: the NIC under the GPU's switch takes
    // the writes; case 3 writes half into VRAM by bus address (2 x 64 KiB through the
    // switch, 128 KiB), the BO is evicted, the rest lands in system RAM.
    let out = stdout(&peerdma(&[
        "run",
        "rdma",
        "--message-size",
        "64K",
        "--messages",
        "4",
        "--json",
    ]));
    // docs/json.md's promise: `schema` first, then `iommu`, then the report's fields.
    assert!(
        out.starts_with("{\n  \"schema\": \"peerdma-run-rdma/1\",\n  \"iommu\": true,\n  \"gpu\""),
        "{}",
        &out[..120]
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v["gpu"].as_str(), v["nic"].as_str()),
        (Some("0000:1a:00.0"), Some("0000:1b:00.0"))
    );
    let cases = v["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 5);
    for c in cases {
        assert_eq!(c["verified"], true, "{c}");
        assert_eq!(c["bytes"].as_u64().unwrap() % 65536, 0, "{c}");
    }
    assert!(
        cases[2]["events"]
            .to_string()
            .contains("0.1 MiB into VRAM through the switch"),
        "{}",
        cases[2]
    );
    assert!(
        cases[3]["events"][0].as_str().unwrap().contains("EBUSY"),
        "{}",
        cases[3]
    );
    assert_eq!(v["nic_stats"]["dmabuf_move_notifies"], 1);
    assert_eq!(v["nic_stats"]["pinned_pages"], 0);
    assert_eq!(v["quiescent"], true);
    assert_eq!(v["sanitizer"].as_array().unwrap().len(), 0);
    // Text, and on q35 (no peer-to-peer): the BO goes to system RAM, still verified.
    let out = stdout(&peerdma(&[
        "run",
        "rdma",
        "--topology",
        "q35",
        "--vram",
        "64M",
        "--messages",
        "2",
        "--message-size",
        "16K",
    ]));
    assert!(out.starts_with("RDMA job on q35 (IOMMU off):"), "{out}");
    assert!(out.contains("not on the P2PDMA allowlist"), "{out}");
    assert!(
        out.contains("moved the BO to system RAM at the first map"),
        "{out}"
    );
    assert!(out.contains("sanitizer: clean"), "{out}");
    assert!(!out.contains("NOT VERIFIED"), "{out}");
    let o = peerdma(&["run", "rdma", "--topology", "workstation"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8(o.stderr)
        .unwrap()
        .contains("no network-class function"));
}

#[test]
fn run_hmm_mirrors_a_buffer_into_a_gpu_under_vram_pressure() {
    // 8 MiB of process memory (2048 pages), 4 MiB of VRAM (1024), 3 passes evicting
    // in between: pass 1 migrates 1024 in 16 faults of 64 pages and maps 1024
    // remotely, a fault each (VRAM full); each eviction returns 1024, which the next
    // pass migrates in again in 16 faults; the CPU brings the last 1024 back.
    let out = stdout(&peerdma(&[
        "run",
        "hmm",
        "--buffer-size",
        "8M",
        "--vram",
        "4M",
        "--json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["schema"], "peerdma-run-hmm/1");
    assert_eq!(v["gpu"], "0000:03:00.0");
    assert_eq!(v["verified"], true);
    assert_eq!(v["gpu_checksum"], v["cpu_checksum"]);
    let s = &v["gpu_stats"];
    assert_eq!(s["faults"], 1024 + 3 * 16);
    assert_eq!(s["migrated_to_vram"], 3 * 1024);
    assert_eq!(s["remote_mapped"], 1024);
    assert_eq!(s["vram_full"], 1024);
    assert_eq!(s["evicted"], 2 * 1024);
    assert_eq!(s["migrated_to_ram"], 1024);
    assert_eq!(v["quiescent"], true);
    assert_eq!(v["frames_left"], 0);
    let text = stdout(&peerdma(&[
        "run",
        "hmm",
        "--buffer-size",
        "1M",
        "--passes",
        "1",
    ]));
    assert!(text.contains("every u32 verified"), "{text}");
    assert!(text.contains("nothing left"), "{text}");
    // Unknown jobs and machines without a GPU are refused with the reason.
    let o = peerdma(&["run", "nosuch"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8(o.stderr)
        .unwrap()
        .contains("neither a built-in job"));
}

#[test]
fn bench_gpu_reports_unified_memory_the_copy_engine_and_bo_eviction_against_memcpy() {
    let out = stdout(&peerdma(&[
        "bench", "gpu", "--bytes", "4194304", "--runs", "1",
    ]));
    assert!(out.contains("1024 pages (4 MiB)"), "{out}");
    for line in [
        "GPU first touch, migrate into VRAM",
        "GPU first touch, remote access",
        "GPU read, all pages mapped",
        "copy engine, 1 MiB blocks over 4 MiB",
        "VRAM to VRAM",
        "VRAM to system RAM",
        "VRAM to a peer's BAR",
        "BO eviction of 4 MiB",
        "to system RAM",
        "back into VRAM",
    ] {
        assert!(out.contains(line), "{out}");
    }
    assert_eq!(out.matches("x memcpy").count(), 8, "{out}");
}

#[test]
fn bench_dma_reports_against_memcpy_and_the_kernel() {
    let out = stdout(&peerdma(&[
        "bench",
        "dma",
        "--transfer",
        "65536",
        "--bytes",
        "4194304",
        "--runs",
        "1",
    ]));
    assert!(out.contains("memcpy baseline"), "{out}");
    assert!(out.contains("scattered frames"), "{out}");
    assert!(out.contains("get_user_dma_sg 4 MiB"), "{out}");
}

#[test]
fn numeric_options_are_checked_when_parsed_and_name_the_range() {
    // Each was accepted and then failed deep inside (or silently did nothing).
    for (args, option, range) in [
        (
            &["run", "p2pmem", "--chunks", "0"][..],
            "--chunks",
            "1..=4096",
        ),
        (
            &["run", "p2pmem", "--chunk-size", "18446744073709551615"][..],
            "--chunk-size",
            "4K..=256M",
        ),
        (&["bench", "mm", "--bytes", "0"][..], "--bytes", "1M..=64G"),
        (
            &["bench", "topo", "--functions", "0"][..],
            "--functions",
            "2..=100000",
        ),
        (&["bench", "mm", "--runs", "0"][..], "--runs", "1..=1000"),
        (
            &["run", "rdma", "--messages", "0"][..],
            "--messages",
            "1..=4096",
        ),
        (
            &["run", "rdma", "--message-size", "1T"][..],
            "--message-size",
            "4K..=1G",
        ),
    ] {
        let o = peerdma(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8(o.stderr).unwrap();
        assert!(
            err.contains(option) && err.contains(range),
            "{args:?}: {err}"
        );
    }
    // One size parser everywhere: suffixes work for the benchmarks too.
    let out = stdout(&peerdma(&["bench", "mm", "--bytes", "16M", "--runs", "1"]));
    assert!(out.contains("4096 pages (16 MiB)"), "{out}");
}

#[test]
fn help_states_exit_codes_and_completions_and_man_page_are_generated() {
    let help = stdout(&peerdma(&["--help"]));
    for line in [
        "Exit status:",
        "  0  success",
        "  1  the command failed",
        "  2  a usage error",
    ] {
        assert!(help.contains(line), "{help}");
    }
    let bash = stdout(&peerdma(&["completions", "bash"]));
    assert!(
        bash.contains("_peerdma()") && bash.contains("--message-size"),
        "bash completion"
    );
    let zsh = stdout(&peerdma(&["completions", "zsh"]));
    assert!(
        zsh.starts_with("#compdef peerdma"),
        "{}",
        &zsh[..40.min(zsh.len())]
    );
    let man = stdout(&peerdma(&["man"]));
    assert!(
        man.contains(".TH peerdma 1") && man.contains("completions"),
        "man page"
    );
    assert_eq!(peerdma(&["completions", "nosh"]).status.code(), Some(2));
}

#[test]
fn ids_lspci_text_does_not_give_are_unknown_not_ffff() {
    // `lspci -tv` without -nn names devices but gives no ids: say unknown (null in
    // JSON), never the 0xffff the importer holds, and keep the TOML readable.
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("tv.txt");
    std::fs::write(
        &text,
        "-[0000:00]-+-00.0  Intel Corporation Device\n           \\-02.0-[02]----00.0  Samsung Electronics Co Ltd NVMe SSD Controller\n",
    )
    .unwrap();
    let t = text.to_str().unwrap();
    let out = stdout(&peerdma(&["topo", "--lspci", t]));
    assert!(out.contains("00.0 = id unknown"), "{out}");
    assert!(!out.to_lowercase().contains("ffff"), "{out}");
    let json: serde_json::Value =
        serde_json::from_str(&stdout(&peerdma(&["topo", "--lspci", t, "--json"]))).unwrap();
    assert_eq!(json["devices"][0]["id"], serde_json::Value::Null);
    assert_eq!(json["host_bridges"][0]["id"], serde_json::Value::Null);
    let toml = stdout(&peerdma(&["topo", "--lspci", t, "--toml"]));
    assert!(!toml.contains("ffff"), "{toml}");
    let f = dir.path().join("t.toml");
    std::fs::write(&f, toml).unwrap();
    let back = stdout(&peerdma(&["topo", "--file", f.to_str().unwrap()]));
    assert!(back.contains("00.0 = id unknown"), "{back}");
}

#[test]
fn an_unknown_acs_reason_fits_the_source() {
    // lspci -tv text carries no ACS; its TOML write-back does not state it either.
    // Neither may tell the user to run peerdma as root, which would change nothing; the
    // lspci text's hint is the `lspci -vvv` text that carries it.
    let text = shared_lspci("32em64t-2n8c-dax-nvme-mic-dimms", "tv");
    let lspci = stdout(&peerdma(&[
        "topo",
        "--lspci",
        &text,
        "--explain",
        "02:00.0",
        "02:00.3",
    ]));
    assert!(
        lspci.contains("`lspci -tv` text carries no ACS state"),
        "{lspci}"
    );
    assert!(
        !lspci.contains("run as root") && !lspci.contains("sudo peerdma"),
        "{lspci}"
    );
    assert!(lspci.contains("`sudo lspci -vvv` text"), "{lspci}");
    assert!(!lspci.contains("Illegal Vendor ID"), "{lspci}");
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("t.toml");
    std::fs::write(&f, stdout(&peerdma(&["topo", "--lspci", &text, "--toml"]))).unwrap();
    let file = stdout(&peerdma(&[
        "topo",
        "--file",
        f.to_str().unwrap(),
        "--explain",
        "02:00.0",
        "02:00.3",
    ]));
    assert!(
        file.contains("the topology file does not give its `[function.acs]` state"),
        "{file}"
    );
    assert!(
        !file.contains("run as root") && !file.contains("sudo"),
        "{file}"
    );
}

#[test]
fn save_keeps_a_host_bridges_numa_node_that_only_the_bridge_states() {
    // A topology file may give the node on the host bridge alone; a sysfs snapshot
    // has it on each function (the kernel's inheritance), so the save writes it there.
    let dir = tempfile::tempdir().unwrap();
    let toml = stdout(&peerdma(&["topo", "--preset", "workstation", "--toml"]));
    let mut section = String::new();
    let mut out = Vec::new();
    for line in toml.lines() {
        if line.starts_with('[') {
            section = line.to_string();
        }
        if line.starts_with("numa_node") {
            if section.starts_with("[[function") {
                continue;
            }
            out.push("numa_node = 1".to_string());
            continue;
        }
        out.push(line.to_string());
    }
    let f = dir.path().join("w.toml");
    std::fs::write(&f, out.join("\n")).unwrap();
    let snap = dir.path().join("snap");
    stdout(&peerdma(&[
        "topo",
        "--file",
        f.to_str().unwrap(),
        "--save",
        snap.to_str().unwrap(),
    ]));
    let back = stdout(&peerdma(&["topo", "--sysfs", snap.to_str().unwrap()]));
    assert!(back.contains("Host bridge 0000:00: NUMA 1"), "{back}");
}

#[test]
fn repeated_or_conflicting_topo_options_are_refused_not_dropped() {
    for args in [
        &[
            "topo",
            "--preset",
            "q35",
            "--explain",
            "00:01.0",
            "00:02.0",
            "--explain",
            "00:03.0",
            "00:04.0",
        ][..],
        &[
            "topo",
            "--preset",
            "q35",
            "--save",
            "/nonexistent/x",
            "--explain",
            "00:01.0",
            "00:02.0",
        ][..],
        &[
            "topo",
            "--preset",
            "q35",
            "--save",
            "/nonexistent/x",
            "--json",
        ][..],
    ] {
        let o = peerdma(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8(o.stderr).unwrap();
        assert!(
            err.contains("cannot be used multiple times") || err.contains("cannot be used with"),
            "{args:?}: {err}"
        );
    }
}

fn scenario_file(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

#[test]
fn run_scenario_file_reports_each_step_and_exits_by_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let good = scenario_file(
        &dir,
        "good.scn",
        "machine preset=q35 ram=32M\nprocess a\na: m = mmap anon 16K\na: write m 16K pattern=3\na: read m 16K expect pattern=3\n",
    );
    let o = peerdma(&["run", &good]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let text = stdout(&o);
    assert!(
        text.contains("passed: 1 checks, 4 steps; nothing leaked"),
        "{text}"
    );
    let o = peerdma(&["run", &good, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["schema"], "peerdma-scenario/1");
    assert_eq!(v["passed"], true);
    assert_eq!(v["steps"].as_array().map(Vec::len), Some(4));
    assert_eq!(v["steps"][3]["line"], 5);

    // An expectation that does not hold: exit 1, the step and the difference.
    let failing = scenario_file(
        &dir,
        "fail.scn",
        "machine preset=q35 ram=32M\nprocess a\na: m = mmap anon 16K\na: write m 16K fill=7\na: read m 4K expect fill=8\na: read m 4K\n",
    );
    let o = peerdma(&["run", &failing]);
    assert_eq!(o.status.code(), Some(1));
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(text.contains("FAILED at"), "{text}");
    assert!(text.contains("fail.scn:5:21"), "{text}");
    assert!(text.contains("expected: every byte 0x8"), "{text}");
    assert!(
        !text.contains("     6  ok"),
        "nothing ran after the failure: {text}"
    );

    // An invalid scenario: exit 2, file:line:column and the caret, nothing run.
    let bad = scenario_file(
        &dir,
        "bad.scn",
        "machine preset=q35\nprocess a\na: m = mmap anon 16K prot=rx\n",
    );
    let o = peerdma(&["run", &bad]);
    assert_eq!(o.status.code(), Some(2));
    assert!(o.stdout.is_empty());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("bad.scn:3:27"), "{err}");
    assert!(err.contains("^^"), "{err}");
    assert!(err.contains("did you mean"), "{err}");

    // Neither a job nor a file.
    let o = peerdma(&["run", "no-such-thing"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("neither a built-in job"));
}

#[test]
fn shipped_scenarios_run_from_the_repository() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scenarios");
    let o = peerdma(&["run", &root.join("refused.scn").display().to_string()]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    assert!(stdout(&o).contains("EREMOTEIO"));
}

#[test]
fn fuzz_runs_seed_ranges_and_prints_a_seed_scenario() {
    let o = peerdma(&["fuzz", "--seeds", "0..3", "--ops", "60", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["schema"], "peerdma-fuzz/1");
    assert_eq!(
        (v["first_seed"].as_u64(), v["end_seed"].as_u64()),
        (Some(0), Some(3))
    );
    assert!(v["ops"].as_u64().unwrap_or(0) >= 90, "{v}");
    assert_eq!(v["failures"].as_array().map(Vec::len), Some(0));
    // --print shows the scenario a seed runs, which `peerdma run` replays as it is.
    let text = stdout(&peerdma(&["fuzz", "--print", "2", "--ops", "60"]));
    assert!(
        text.starts_with("# peerdma fuzz: seed 2, 60 operations"),
        "{text}"
    );
    let dir = tempfile::tempdir().unwrap();
    let f = scenario_file(&dir, "seed2.scn", &text);
    let o = peerdma(&["run", &f]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    // The HTML summary.
    let page = dir.path().join("fuzz.html");
    let o = peerdma(&[
        "fuzz",
        "--seeds",
        "0..2",
        "--ops",
        "30",
        "--report",
        &page.display().to_string(),
    ]);
    assert!(o.status.success());
    let page = std::fs::read_to_string(page).unwrap();
    assert!(
        page.contains("peerdma fuzz, seeds 0..2") && page.contains("0 of 2 seeds failed"),
        "{page}"
    );
    // A bad range is a usage error.
    assert_eq!(peerdma(&["fuzz", "--seeds", "5..2"]).status.code(), Some(2));
}

/// Renders an SVG file to pixels with resvg (the renderer a viewer would use), so the
/// picture is known to open; returns the pixmap.
fn render_svg(path: &std::path::Path) -> resvg::tiny_skia::Pixmap {
    let data = std::fs::read(path).unwrap();
    let mut opt = resvg::usvg::Options::default();
    opt.fontdb_mut().load_system_fonts();
    // Text draws where the machine has fonts (DejaVu on Debian); the checks below do not
    // depend on it.
    opt.fontdb_mut().set_serif_family("DejaVu Serif");
    let tree = resvg::usvg::Tree::from_data(&data, &opt)
        .unwrap_or_else(|e| panic!("{} does not parse as SVG: {e}", path.display()));
    let size = tree.size().to_int_size();
    assert!(size.width() > 100 && size.height() > 100, "{size:?}");
    let mut pixmap = resvg::tiny_skia::Pixmap::new(size.width(), size.height()).unwrap();
    resvg::render(
        &tree,
        resvg::tiny_skia::Transform::default(),
        &mut pixmap.as_mut(),
    );
    if let Ok(dir) = std::env::var("PEERDMA_KEEP_PNG") {
        pixmap
            .save_png(
                std::path::Path::new(&dir).join(path.with_extension("png").file_name().unwrap()),
            )
            .unwrap();
    }
    pixmap
}

/// Pixels of `pixmap` close to the colour (r, g, b).
fn pixels_of(pixmap: &resvg::tiny_skia::Pixmap, (r, g, b): (u8, u8, u8)) -> usize {
    pixmap
        .pixels()
        .iter()
        .filter(|p| {
            let c = p.demultiply();
            c.alpha() > 200
                && c.red().abs_diff(r) < 40
                && c.green().abs_diff(g) < 40
                && c.blue().abs_diff(b) < 40
        })
        .count()
}

#[test]
fn topo_svg_draws_the_tree_and_the_verdict_path_in_its_colour() {
    let dir = tempfile::tempdir().unwrap();
    // Bus address through the switch: green; through the host bridge: orange; q35's
    // drives, not supported: red.
    for (preset, a, b, colour, rgb) in [
        ("workstation", "05:00.0", "06:00.0", "green", (0, 128, 0)),
        ("workstation", "05:00.0", "07:00.0", "orange", (255, 165, 0)),
        ("q35", "00:03.0", "00:04.0", "red", (255, 0, 0)),
    ] {
        let path = dir.path().join(format!("{preset}-{colour}.svg"));
        let o = peerdma(&[
            "topo",
            "--preset",
            preset,
            "--svg",
            &path.display().to_string(),
            "--explain",
            a,
            b,
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let svg = std::fs::read_to_string(&path).unwrap();
        // Every function of the machine is drawn, by BDF.
        let dot = stdout(&peerdma(&["topo", "--preset", preset, "--dot"]));
        let n = dot.matches(" -> ").count();
        assert!(n >= 5, "{dot}");
        assert!(
            svg.contains(&format!("0000:{a}")),
            "{preset}: {a} is labelled"
        );
        let pixmap = render_svg(&path);
        assert!(
            pixels_of(&pixmap, rgb) > 50,
            "{preset} {a}->{b}: the path is drawn in {colour}"
        );
        // The other verdict colours are absent.
        for (other, orgb) in [
            ("green", (0, 128, 0)),
            ("orange", (255, 165, 0)),
            ("red", (255, 0, 0)),
        ] {
            if other != colour {
                assert!(
                    pixels_of(&pixmap, orgb) < 5,
                    "{preset}: no {other} on a {colour} path"
                );
            }
        }
    }
    // Without a pair, nothing is coloured as a path.
    let dot = stdout(&peerdma(&["topo", "--preset", "dgx", "--dot"]));
    assert!(!dot.contains("penwidth"), "{dot}");
    assert!(dot.starts_with("digraph pcie {"));
}

#[test]
fn run_report_is_one_html_page_whose_pictures_render() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scenarios");
    let html = dir.path().join("p2p.html");
    let o = peerdma(&[
        "run",
        &root.join("p2pmem-copy.scn").display().to_string(),
        "--report",
        &html.display().to_string(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.starts_with("<!doctype html>"));
    assert!(!page.contains("http://") || page.matches("http://").all(|_| true));
    assert!(
        !page.contains("<script"),
        "self-contained, nothing to fetch or run"
    );
    assert!(page.contains("passed"));
    // Every step is listed with its text.
    for step in [
        "app: nvme.read src cmb 1M lba=0",
        "app: read check 1M expect pattern=42",
    ] {
        assert!(page.contains(step), "{step}");
    }
    // Three pictures: the tree, DMA by path, the timeline; each renders.
    let svgs: Vec<&str> = page
        .split("<svg")
        .skip(1)
        .map(|s| s.split("</svg>").next().unwrap())
        .collect();
    assert_eq!(svgs.len(), 3);
    for (i, body) in svgs.iter().enumerate() {
        let f = dir.path().join(format!("report-{i}.svg"));
        std::fs::write(&f, format!("<svg{body}</svg>")).unwrap();
        let px = render_svg(&f);
        let inked = px
            .pixels()
            .iter()
            .filter(|p| p.demultiply().red() < 200)
            .count();
        assert!(inked > 500, "picture {i} draws something");
    }
    // The drives that moved data through the switch are drawn green on the tree.
    let tree = dir.path().join("report-0.svg");
    assert!(pixels_of(&render_svg(&tree), (0, 128, 0)) > 50);
    assert!(
        svgs[0].contains("src: "),
        "the source drive is labelled with what it moved"
    );
    // The bytes chart has the switch bar.
    assert!(svgs[1].contains("switch"));
}

#[test]
fn run_without_arguments_tells_the_thread_as_the_built_in_scenario() {
    let o = peerdma(&["run", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["schema"], "peerdma-scenario/1");
    assert_eq!(v["machine"], "dgx");
    assert_eq!(v["passed"], true);
    assert!(v["checks_passed"].as_u64().unwrap_or(0) >= 15, "{v}");
    // All three registration styles ran: pinned, on-demand, dma-buf.
    let ops: Vec<String> = v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["text"].as_str().unwrap_or("").to_string())
        .collect();
    for needle in [
        "= rnic.reg_mr nic buf 256K expect",
        "on_demand",
        "rnic.reg_dmabuf_mr",
        "gpu.bo_evict bo expect moved=1",
    ] {
        assert!(ops.iter().any(|t| t.contains(needle)), "{needle}");
    }
    // The jobs' options need a job: alone they are a usage error, not ignored.
    let o = peerdma(&["run", "--message-size", "64K"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("JOB"));
}

/// `--lspci` takes the tree and the `-vvv` text of one machine as two files: the
/// verdicts lose their `?`, and an error in the second file names that file and its own
/// line. Three files, or stdin twice, are a usage error.
#[test]
fn lspci_tree_and_vvv_text_as_two_files() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../peerdma/tests/lspci");
    let tree = dir.join("server.lspci-tvnn.txt");
    let vvv = dir.join("server.lspci-vvvnn.txt");
    let (tree, vvv) = (tree.to_str().unwrap(), vvv.to_str().unwrap());
    let only_tree = stdout(&peerdma(&["topo", "--lspci", tree]));
    assert!(
        only_tree.contains("HB 4?") || only_tree.contains("BUS 4?"),
        "{only_tree}"
    );
    let both = stdout(&peerdma(&["topo", "--lspci", tree, vvv]));
    // The legend of `?` is printed only when some verdict is uncertain.
    assert!(only_tree.contains("= uncertain"), "{only_tree}");
    assert!(!both.contains("= uncertain"), "{both}");
    assert!(both.contains("8.0 GT/s x8 (max 8.0 GT/s x16)"), "{both}");
    let json: serde_json::Value =
        serde_json::from_str(&stdout(&peerdma(&["topo", "--lspci", tree, vvv, "--json"]))).unwrap();
    let pair = json["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["provider"] == "0000:03:00.0" && p["client"] == "0000:04:00.0")
        .unwrap();
    assert_eq!(pair["map_type"], "thru-host-bridge");
    assert_eq!(pair["uncertain"], false);

    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad-vvv.txt");
    let text = std::fs::read_to_string(vvv).unwrap();
    std::fs::write(&bad, text.replacen("NUMA node: 0", "NUMA node: zero", 1)).unwrap();
    let o = peerdma(&["topo", "--lspci", tree, bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8(o.stderr).unwrap();
    assert!(
        err.contains(&format!(
            "{}, line 6, column 2: `NUMA node:` is not a number",
            bad.display()
        )),
        "{err}"
    );
    let o = peerdma(&["topo", "--lspci", tree, vvv, tree]);
    assert_eq!(o.status.code(), Some(2));
    let o = peerdma(&["topo", "--lspci", "-", "-"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8(o.stderr)
        .unwrap()
        .contains("standard input"));
}
