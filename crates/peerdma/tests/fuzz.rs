//! The fuzzer: a bounded campaign on fixed seeds (every invariant checked after every
//! step), determinism of a seed, and minimisation that keeps a failure's kind and the
//! model's expectations consistent. `PEERDMA_FUZZ_SEEDS=A..B` and `PEERDMA_FUZZ_OPS`
//! run a longer campaign.

use std::collections::BTreeSet;

use peerdma::scenario::fuzz::{
    campaign, generate, generate_skipping, minimise_skips, parse_seeds, run_seed,
};
use peerdma::scenario::{compile_text, lang::NoIncludes, Vocabulary};

fn env_range() -> (u64, u64) {
    std::env::var("PEERDMA_FUZZ_SEEDS")
        .ok()
        .and_then(|v| parse_seeds(&v).ok())
        .unwrap_or((0, 40))
}

#[test]
fn a_bounded_campaign_finds_no_invariant_failure() {
    let (a, b) = env_range();
    let ops = std::env::var("PEERDMA_FUZZ_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(150);
    let c = campaign(a, b, ops, true, &mut |_| {});
    for f in &c.failures {
        eprintln!(
            "seed {} failed: {:?}\n{}",
            f.seed,
            f.mismatch,
            f.scenario.as_deref().unwrap_or("")
        );
    }
    assert!(c.failures.is_empty(), "{} seeds failed", c.failures.len());
    assert!(
        c.ops >= (b - a) as usize * ops / 2,
        "every seed ran its operations and their checks: {} lines",
        c.ops
    );
}

#[test]
fn a_seed_replays_byte_for_byte() {
    for seed in [0, 7, 123_456] {
        let a = generate(seed, 200);
        assert_eq!(a, generate(seed, 200), "seed {seed}");
        assert_ne!(a, generate(seed + 1, 200), "seeds differ");
        // The same scenario runs to the same steps, values and verdict.
        let vocab = Vocabulary::standard();
        let run = || {
            let r = compile_text("f.scn", &a, &NoIncludes, &vocab)
                .unwrap()
                .run()
                .unwrap();
            let steps: Vec<String> = r
                .steps
                .iter()
                .filter(|s| s.group.is_none())
                .map(|s| format!("{} {} {:?}", s.line, s.result, s.values))
                .collect();
            (steps, r.passed, r.checks_passed)
        };
        assert_eq!(run(), run(), "seed {seed}");
    }
}

#[test]
fn generated_scenarios_exercise_the_fault_injections() {
    // Over a few seeds the swarm reaches every kind of injected fault.
    let text: String = (0..60).map(|s| generate(s, 300)).collect();
    for needle in [
        "remove dm",
        "parallel race",
        ": exit",
        "violations=",
        "dmirror.migrate_to_dev",
        "gpu.evict",
        "flags=longterm",
        "dma.write",
        ": madvise",
        "mmap shared",
        "= fork",
        "expect error",
        "nvme.write n0",
        "nvme.read n0",
        "  remove dm",
        "gpu.prefetch g",
    ] {
        assert!(text.contains(needle), "no `{needle}` in 60 seeds");
    }
}

#[test]
fn minimising_drops_what_the_failure_does_not_need() {
    // A failure that needs operations 3 and 17 of 40: the rest is dropped.
    let skip = minimise_skips(40, |s| !s.contains(&3) && !s.contains(&17));
    let kept: BTreeSet<usize> = (0..40).filter(|i| !skip.contains(i)).collect();
    assert_eq!(kept, [3, 17].into_iter().collect());
    // Skipping keeps the rest of the scenario drawn from the same stream.
    let full = generate(5, 30);
    let none = generate_skipping(5, 30, &BTreeSet::new());
    assert_eq!(full, none);
    let fewer = generate_skipping(5, 30, &(10..30).collect());
    assert!(fewer.lines().count() < full.lines().count());
    let vocab = Vocabulary::standard();
    let r = compile_text("f.scn", &fewer, &NoIncludes, &vocab)
        .unwrap()
        .run()
        .unwrap();
    assert!(
        r.passed,
        "a scenario with operations dropped is still consistent:\n{}",
        r.text()
    );
}

#[test]
fn a_passing_seed_reports_its_lines_and_no_scenario() {
    let r = run_seed(3, 100, true, &Vocabulary::standard());
    assert!(r.mismatch.is_none() && r.leaks.is_none(), "{r:?}");
    assert!(r.ops > 50, "{} lines", r.ops);
    assert!(r.scenario.is_none());
}
