//! Fuzz targets per importer: real inputs — the shared machines' `lspci -tv` and
//! `-tvnn` text and every preset as TOML — mutated the ways real inputs go wrong
//! (a line lost, repeated or moved, a cut, a changed digit or character, a blank or
//! CRLF line), then imported. Two properties for every mutant:
//! - the importer returns a topology or a typed error, and never panics;
//! - whatever it accepts, its TOML (`topo --toml`) reads back to the same functions and
//!   host bridges: the round trip the importers promise.
//!
//! The sysfs importer gets the same two properties on the shared snapshots, with one
//! attribute file of one function deleted, cut short, or overwritten with random bytes.
//!
//! `PEERDMA_IMPORTER_FUZZ_CASES` sets the mutants per target (128 by default, as CI runs;
//! the figures in the issue notes come from runs of 3000).

mod common;

use std::fs;

use peerdma::fabric::import::{file, lspci, sysfs};
use peerdma::fabric::{preset, Topology, PRESETS};
use proptest::prelude::*;

fn cases() -> u32 {
    std::env::var("PEERDMA_IMPORTER_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(128)
}

fn lspci_samples() -> &'static [String] {
    static S: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    S.get_or_init(|| {
        common::snapshot_names()
            .iter()
            .flat_map(|n| ["tv", "tvnn"].map(|f| format!("{n}.lspci-{f}.txt")))
            .map(|f| fs::read_to_string(common::shared_sysfs().join(f)).unwrap())
            // lspci -vvv text, alone, without root, and after its tree.
            .chain(
                [
                    "server.lspci-vvvnn.txt",
                    "server.lspci-vvv-user.txt",
                    "vm-virtio.lspci-vvvnn.txt",
                    "vm-virtio.lspci-vvvnn-user.txt",
                ]
                .map(|f| {
                    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/lspci");
                    fs::read_to_string(dir.join(f)).unwrap()
                }),
            )
            .collect()
    })
}

fn toml_samples() -> &'static [String] {
    static S: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    S.get_or_init(|| {
        PRESETS
            .iter()
            .map(|p| file::to_toml(&preset(p.0).unwrap()))
            .collect()
    })
}

/// One way an input goes wrong, applied at positions drawn from `at`.
#[derive(Clone, Debug)]
enum Mutation {
    DropLine(usize),
    RepeatLine(usize),
    MoveLine(usize, usize),
    Cut(usize),
    Digit(usize, u8),
    Char(usize, char),
    BlankLine(usize),
    Crlf,
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<usize>().prop_map(Mutation::DropLine),
        any::<usize>().prop_map(Mutation::RepeatLine),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::MoveLine(a, b)),
        any::<usize>().prop_map(Mutation::Cut),
        (any::<usize>(), 0u8..16).prop_map(|(a, d)| Mutation::Digit(a, d)),
        (
            any::<usize>(),
            prop::sample::select(vec![
                '-', '+', '\\', '|', '[', ']', ':', '.', '=', '"', ' ', '#', 'z'
            ])
        )
            .prop_map(|(a, c)| Mutation::Char(a, c)),
        any::<usize>().prop_map(Mutation::BlankLine),
        Just(Mutation::Crlf),
    ]
}

fn apply(text: &str, ms: &[Mutation]) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let mut out;
    for m in ms {
        let n = lines.len().max(1);
        match *m {
            Mutation::DropLine(i) if !lines.is_empty() => {
                lines.remove(i % n);
            }
            Mutation::RepeatLine(i) if !lines.is_empty() => {
                let l = lines[i % n].clone();
                lines.insert(i % n, l);
            }
            Mutation::MoveLine(a, b) if !lines.is_empty() => {
                let l = lines.remove(a % n);
                let b = b % lines.len().max(1);
                lines.insert(b.min(lines.len()), l);
            }
            Mutation::BlankLine(i) => lines.insert(i % (lines.len() + 1), String::new()),
            Mutation::Cut(at) => {
                out = lines.join("\n");
                let mut at = at % (out.len() + 1);
                while !out.is_char_boundary(at) {
                    at -= 1;
                }
                out.truncate(at);
                lines = out.lines().map(str::to_string).collect();
            }
            Mutation::Digit(at, _) | Mutation::Char(at, _) if !lines.is_empty() => {
                let l = &mut lines[at % n];
                let idx: Vec<usize> = l
                    .char_indices()
                    .filter(|(_, c)| matches!(m, Mutation::Char(..)) || c.is_ascii_hexdigit())
                    .map(|(i, _)| i)
                    .collect();
                if let Some(&i) = idx.get(at % idx.len().max(1)) {
                    let c = l[i..].chars().next().unwrap_or(' ');
                    let new = match *m {
                        Mutation::Char(_, c) => c,
                        Mutation::Digit(_, d) => char::from_digit(u32::from(d), 16).unwrap_or('0'),
                        _ => c,
                    };
                    l.replace_range(i..i + c.len_utf8(), &new.to_string());
                }
            }
            Mutation::Crlf => {
                return lines.join("\r\n");
            }
            _ => {}
        }
    }
    lines.join("\n")
}

/// Whatever an importer accepted reads back from its TOML to the same machine.
fn round_trips(what: &str, t: &Topology, mutant: &str) -> Result<(), TestCaseError> {
    let toml = file::to_toml(t);
    match file::parse("round trip", &toml) {
        Ok(back) => {
            if let Some((a, b)) = t
                .functions()
                .iter()
                .zip(back.functions())
                .find(|(a, b)| a != b)
            {
                return Err(TestCaseError::fail(format!(
                    "{what}: its TOML reads back different:\n  imported  {a:?}\n  read back {b:?}"
                )));
            }
            prop_assert_eq!(t.functions(), back.functions(), "{}: {}", what, mutant);
            prop_assert_eq!(t.host_bridges(), back.host_bridges(), "{}: {}", what, mutant);
            Ok(())
        }
        Err(e) => Err(TestCaseError::fail(format!(
            "{what}: accepted, but its TOML does not read back: {e}\n--- input\n{mutant}\n--- toml\n{toml}"
        ))),
    }
}

/// One mutant of one sample through one text importer.
fn text_mutant(
    what: &str,
    samples: &[String],
    parse: fn(&str, &str) -> Result<Topology, peerdma::fabric::FabricError>,
    pick: prop::sample::Index,
    ms: &[Mutation],
) -> Result<(), TestCaseError> {
    let text = apply(&samples[pick.index(samples.len())], ms);
    match parse("mutant", &text) {
        Ok(t) => round_trips(what, &t, &text),
        Err(_) => Ok(()),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mutated_lspci_text_is_refused_or_round_trips(
        pick in any::<prop::sample::Index>(),
        ms in prop::collection::vec(mutation(), 1..4),
    ) {
        text_mutant("lspci", lspci_samples(), lspci::parse, pick, &ms)?;
    }

    #[test]
    fn mutated_topology_toml_is_refused_or_round_trips(
        pick in any::<prop::sample::Index>(),
        ms in prop::collection::vec(mutation(), 1..4),
    ) {
        text_mutant("toml", toml_samples(), file::parse, pick, &ms)?;
    }
}

/// How an attribute file of a snapshot goes wrong.
#[derive(Clone, Debug)]
enum FileMutation {
    Delete,
    Cut(usize),
    Flip(usize, u8),
    Random(Vec<u8>),
}

fn file_mutation() -> impl Strategy<Value = FileMutation> {
    prop_oneof![
        Just(FileMutation::Delete),
        any::<usize>().prop_map(FileMutation::Cut),
        (any::<usize>(), any::<u8>()).prop_map(|(a, b)| FileMutation::Flip(a, b)),
        prop::collection::vec(any::<u8>(), 0..80).prop_map(FileMutation::Random),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn a_mutated_sysfs_attribute_is_refused_or_round_trips(
        snap in any::<prop::sample::Index>(),
        dev in any::<prop::sample::Index>(),
        attr in any::<prop::sample::Index>(),
        m in file_mutation(),
    ) {
        // Each snapshot is unpacked once; the mutated file is put back after the case.
        static SNAPS: std::sync::OnceLock<Vec<(tempfile::TempDir, std::path::PathBuf)>> =
            std::sync::OnceLock::new();
        let snaps = SNAPS.get_or_init(|| {
            common::snapshot_names().iter().map(|n| common::unpack(n)).collect()
        });
        let root = &snaps[snap.index(snaps.len())].1;
        let mut devs: Vec<_> = fs::read_dir(root.join("sys/bus/pci/devices"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        devs.sort();
        let dir = fs::canonicalize(&devs[dev.index(devs.len())]).unwrap();
        let path = dir.join(sysfs::ATTRIBUTES[attr.index(sysfs::ATTRIBUTES.len())]);
        let old = fs::read(&path).ok();
        match (&m, &old) {
            (FileMutation::Delete, Some(_)) => fs::remove_file(&path).unwrap(),
            (FileMutation::Cut(at), Some(b)) => fs::write(&path, &b[..at % (b.len() + 1)]).unwrap(),
            (FileMutation::Flip(at, x), Some(b)) if !b.is_empty() => {
                let mut b = b.clone();
                let i = at % b.len();
                b[i] ^= x | 1;
                fs::write(&path, b).unwrap();
            }
            (FileMutation::Random(bytes), _) => fs::write(&path, bytes).unwrap(),
            _ => return Ok(()),
        }
        let read = sysfs::read(root);
        match &old {
            Some(b) => fs::write(&path, b).unwrap(),
            None => {
                let _ = fs::remove_file(&path);
            }
        }
        if let Ok(t) = read {
            round_trips("sysfs", &t, &format!("{} {m:?}", path.display()))?;
        }
    }
}
