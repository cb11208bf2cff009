//! Scenario files as tests. The stories under `scenarios/` and the kernel selftests
//! ported under `tests/scenarios/` (cow.c, gup_longterm.c, hmm-tests.c) must pass with
//! every check holding and nothing leaked; every file under `tests/scenarios/bad/` must
//! be refused before it runs, at the line and column its first line names; every file
//! under `tests/scenarios/fail/` must run and fail at the check its first line names.
//! The minimised races under `tests/scenarios/races/` and the other bugs the fuzzer
//! found, under `tests/scenarios/found/`, must pass too.
//! The parser is fuzzed with arbitrary text: it never panics, and every refusal points
//! inside the text.

use std::path::{Path, PathBuf};

use peerdma::scenario::lang::{self, NoIncludes};
use peerdma::scenario::{load, Vocabulary};
use proptest::prelude::*;

fn dir(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn files(rel: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir(rel))
        .unwrap_or_else(|e| panic!("{rel}: {e}"))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "scn"))
        .collect();
    v.sort();
    v
}

/// The first line's `# KEY: LINE:COL TEXT`.
fn header(p: &Path, key: &str) -> (u32, u32, String) {
    let text = std::fs::read_to_string(p).unwrap();
    let first = text.lines().next().unwrap_or("");
    let rest = first
        .strip_prefix(&format!("# {key}: "))
        .unwrap_or_else(|| {
            panic!(
                "{}: first line must be `# {key}: LINE:COL TEXT`",
                p.display()
            )
        });
    let (pos, want) = rest.split_once(' ').unwrap_or((rest, ""));
    let (l, c) = pos.split_once(':').unwrap();
    (l.parse().unwrap(), c.parse().unwrap_or(0), want.to_string())
}

#[test]
fn every_story_and_ported_selftest_passes() {
    let vocab = Vocabulary::standard();
    let mut all = files("tests/scenarios");
    all.extend(files("../../scenarios"));
    // The races the fuzzer found (also explored under shuttle by tests/shuttle_fuzz.rs).
    all.extend(files("tests/scenarios/races"));
    // Other bugs the fuzzer found, minimised.
    all.extend(files("tests/scenarios/found"));
    assert!(all.len() >= 9, "scenario files went missing: {all:?}");
    for p in all {
        let plan = load(&p, &vocab).unwrap_or_else(|d| panic!("{}", d.render()));
        let report = plan.run().unwrap();
        assert!(report.passed, "{}:\n{}", p.display(), report.text());
        assert!(
            report.checks_passed >= 5,
            "{}: a scenario that checks almost nothing proves almost nothing",
            p.display()
        );
        assert!(
            report.violations.is_empty(),
            "{}: {:?}",
            p.display(),
            report.violations
        );
    }
}

#[test]
fn every_bad_scenario_is_refused_where_it_is_wrong() {
    let vocab = Vocabulary::standard();
    let bad = files("tests/scenarios/bad");
    assert!(bad.len() >= 25);
    for p in bad {
        let (line, col, want) = header(&p, "error");
        let d = match load(&p, &vocab) {
            Ok(_) => panic!("{}: accepted", p.display()),
            Err(d) => d,
        };
        let rendered = d.render();
        assert_eq!(d.line, line, "{}: {rendered}", p.display());
        if col > 0 {
            assert_eq!(d.col, col, "{}: {rendered}", p.display());
        }
        assert!(
            d.message.contains(&want),
            "{}: wanted `{want}` in:\n{rendered}",
            p.display()
        );
        assert!(
            rendered.contains(&format!(":{}:{}", d.line, d.col)),
            "{rendered}"
        );
        assert!(
            rendered.contains('^'),
            "the caret under the text: {rendered}"
        );
    }
}

#[test]
fn every_failing_scenario_fails_at_its_check() {
    let vocab = Vocabulary::standard();
    for p in files("tests/scenarios/fail") {
        let (line, col, want) = header(&p, "fails-at");
        let report = load(&p, &vocab)
            .unwrap_or_else(|d| panic!("{}", d.render()))
            .run()
            .unwrap();
        assert!(!report.passed, "{}: passed", p.display());
        let m = report.mismatch.as_ref().expect("a mismatch");
        assert_eq!((m.line, m.col), (line, col), "{}: {m:?}", p.display());
        assert!(
            m.expected.contains(&want) || m.got.contains(&want),
            "{}: wanted `{want}` in {m:?}",
            p.display()
        );
        // Stopped at the failing step: nothing after it ran.
        assert!(
            report.steps.iter().all(|s| s.line <= line),
            "{}",
            p.display()
        );
    }
}

#[test]
fn the_teardown_releases_what_the_scenario_still_holds() {
    // A pin left held at the end is released by the teardown (every handle drops
    // after every process exits), so the leak check finds the host clean.
    let text = "machine preset=q35 ram=32M\nprocess a\na: m = mmap anon 8K\na: p = pin m 8K flags=write\nexpect pinned=2\n";
    let report =
        peerdma::scenario::compile_text("t.scn", text, &NoIncludes, &Vocabulary::standard())
            .unwrap()
            .run()
            .unwrap();
    assert!(report.passed, "{}", report.text());
    assert_eq!(report.leaks, None, "the teardown released the pin");
}

#[test]
fn the_vocabulary_reference_in_docs_is_current() {
    let doc = std::fs::read_to_string(dir("../../docs/scenario.md")).unwrap();
    let reference = Vocabulary::standard().reference();
    let begin = "<!-- vocabulary: generated by Vocabulary::reference() -->\n";
    let end = "<!-- end vocabulary -->";
    let start = doc
        .find(begin)
        .expect("docs/scenario.md has the vocabulary markers")
        + begin.len();
    let stop = doc[start..].find(end).expect("end marker") + start;
    assert_eq!(
        doc[start..stop].trim(),
        reference.trim(),
        "docs/scenario.md's vocabulary differs from the code: regenerate it with \
         `PEERDMA_WRITE_DOCS=1 cargo test -p peerdma --test scenarios`"
    );
}

#[test]
fn write_docs_when_asked() {
    if std::env::var_os("PEERDMA_WRITE_DOCS").is_none() {
        return;
    }
    let path = dir("../../docs/scenario.md");
    let doc = std::fs::read_to_string(&path).unwrap();
    let begin = "<!-- vocabulary: generated by Vocabulary::reference() -->\n";
    let end = "<!-- end vocabulary -->";
    let start = doc.find(begin).unwrap() + begin.len();
    let stop = doc[start..].find(end).unwrap() + start;
    let new = format!(
        "{}\n{}\n{}",
        &doc[..start],
        Vocabulary::standard().reference().trim(),
        &doc[stop..]
    );
    std::fs::write(path, new).unwrap();
}

/// Words the fuzzer builds lines from: the grammar's own punctuation and keywords, and
/// real verbs, so most inputs get past the tokens into the checks; plus short random
/// words over the characters that matter to the grammar.
const TOKENS: &[&str] = &[
    "a:",
    "=",
    "m",
    "expect",
    "parallel",
    "{",
    "}",
    "\"",
    "#",
    "process",
    "machine",
    "device",
    "mmap",
    "read",
    "pin",
    "anon",
    "4K",
    "EFAULT",
    "pinned>=1",
    "preset=q35",
    "flags=write,longterm",
    "include",
    "release",
    "m+4K",
    "\n",
    "\n",
    "\n",
];
const CHARS: &[char] = &[
    'a', 'z', '0', '9', '_', '.', '+', ':', '=', '<', '>', '!', ',', '"', '{', '}', '#', 'é', ' ',
    '\t', 'K', 'x',
];

/// Text from (selector, noise) pairs: cheap to generate, so 10^5 cases run in seconds.
fn text() -> impl Strategy<Value = String> {
    prop::collection::vec(any::<(u8, u32)>(), 0..48).prop_map(|v| {
        let mut out = String::new();
        for (sel, noise) in v {
            let sel = sel as usize;
            if sel < TOKENS.len() * 6 {
                out.push_str(TOKENS[sel % TOKENS.len()]);
            } else {
                let n = 1 + (noise % 6) as usize;
                for k in 0..n {
                    out.push(CHARS[((noise >> (k * 5)) as usize) % CHARS.len()]);
                }
            }
            if noise % 3 != 0 {
                out.push(' ');
            }
        }
        out
    })
}

fn cases() -> u32 {
    std::env::var("PEERDMA_PARSER_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    /// Arbitrary text never panics the parser, and a refusal points at a real line and
    /// column of the text.
    #[test]
    fn the_parser_never_panics_and_errors_point_inside(t in text()) {
        match lang::parse("fuzz.scn", &t, &NoIncludes) {
            Ok(p) => {
                for s in &p.stmts {
                    prop_assert!(s.span.line as usize <= t.lines().count());
                }
            }
            Err(d) => {
                let line = t.lines().nth(d.line.saturating_sub(1) as usize).unwrap_or("");
                prop_assert!(d.line >= 1 && d.line as usize <= t.lines().count().max(1), "{d:?}");
                prop_assert!(d.col >= 1 && d.col as usize <= line.chars().count() + 1, "{d:?}");
                let _ = d.render();
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases() / 20, failure_persistence: None, ..ProptestConfig::default() })]

    /// The whole check (names, arguments, expectations) never panics either.
    #[test]
    fn checking_never_panics(t in text()) {
        let vocab = Vocabulary::standard();
        let _ = peerdma::scenario::compile_text("fuzz.scn", &format!("machine preset=q35\n{t}"), &NoIncludes, &vocab)
            .map_err(|d| d.render());
    }
}

#[test]
fn the_scenarios_in_the_readme_and_docs_run_and_pass() {
    let mut found = 0;
    for doc in ["README.md", "docs/scenario.md"] {
        let text = std::fs::read_to_string(dir("../..").join(doc)).unwrap();
        for block in text.split("```text\n").skip(1) {
            let block = block.split("```").next().unwrap_or("");
            if !block.starts_with("machine ") || block.contains("include ") {
                continue;
            }
            found += 1;
            let plan =
                peerdma::scenario::compile_text(doc, block, &NoIncludes, &Vocabulary::standard());
            match plan {
                Ok(plan) => {
                    let r = plan.run().unwrap();
                    assert!(r.passed, "{doc}:\n{}", r.text());
                }
                Err(d) => panic!("{doc}: {}", d.render()),
            }
        }
    }
    assert!(found >= 1, "the README shows a runnable scenario");
}
