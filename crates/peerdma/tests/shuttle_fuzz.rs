//! The fuzzer's races under shuttle's scheduler (`--features shuttle`): scenarios drawn
//! with every racing kind at the highest weight (a CPU write racing a migration or an
//! eviction, an invalidation racing a device fault, a process exiting while a device
//! writes into its pinned pages, hot removal racing a device access), each run under
//! `PEERDMA_SHUTTLE_FUZZ_ITERS` PCT schedules (20 by default) drawn from the seed. Every
//! check of the fuzzer holds in every schedule: the data, the errors, the sanitizer, the
//! frame books after every step, and quiescence at the end.
//!
//! The same seed, operation count and number of schedules explore the same
//! interleavings, so a failure replays with the command it prints; a deadlock is
//! reported by shuttle with its schedule. `PEERDMA_FUZZ_SEEDS=A..B` and
//! `PEERDMA_FUZZ_OPS=N` widen the campaign.

#![cfg(feature = "shuttle")]

use peerdma::scenario::fuzz::{generate_mix, parse_seeds, run_seed_with, run_text_shuttle, Mix};

#[test]
fn every_race_the_fuzzer_found_stays_fixed_in_every_explored_schedule() {
    // tests/scenarios/races/: each a minimised failure, with the bug in its header.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios/races");
    let schedules = env("PEERDMA_SHUTTLE_FUZZ_ITERS", 20).max(50);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for seed in 0..4 {
            let r = run_text_shuttle(&text, schedules, seed).unwrap();
            assert!(
                r.passed,
                "{} (scheduler seed {seed}): {:?} {:?}",
                path.display(),
                r.mismatch,
                r.leaks
            );
        }
        n += 1;
    }
    assert!(n >= 1, "the regressions are there");
}

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn seeds() -> (u64, u64) {
    std::env::var("PEERDMA_FUZZ_SEEDS")
        .ok()
        .and_then(|v| parse_seeds(&v).ok())
        .unwrap_or((0, 6))
}

#[test]
fn every_race_holds_its_invariants_in_every_explored_schedule() {
    let (a, b) = seeds();
    let ops = env("PEERDMA_FUZZ_OPS", 60);
    let schedules = env("PEERDMA_SHUTTLE_FUZZ_ITERS", 20);
    let mut groups = 0;
    for seed in a..b {
        let text = generate_mix(seed, ops, Mix::Races);
        groups += text.matches("parallel ").count();
        let exec = |t: &str| run_text_shuttle(t, schedules, seed);
        let r = run_seed_with(seed, ops, Mix::Races, true, &exec);
        assert!(
            r.mismatch.is_none() && r.leaks.is_none(),
            "seed {seed} failed under shuttle: {:?} {:?}\nreplay: PEERDMA_FUZZ_SEEDS={seed}..{} \
             PEERDMA_FUZZ_OPS={ops} PEERDMA_SHUTTLE_FUZZ_ITERS={schedules} cargo test --release -p \
             peerdma --features shuttle --test shuttle_fuzz\nminimised scenario:\n{}",
            r.mismatch,
            r.leaks,
            seed + 1,
            r.scenario.unwrap_or_default()
        );
        assert!(r.ops > 0, "seed {seed} ran nothing");
    }
    assert!(
        groups >= (b - a) as usize,
        "the race mix draws parallel groups: {groups} over {} seeds",
        b - a
    );
}

#[test]
fn a_schedule_seed_replays_the_same_run() {
    // Two runs of one scenario under the same scheduler seed see the same steps,
    // results and values, parallel groups included.
    // The first race-mix seed whose 40 operations draw a parallel group.
    let text = (0..64)
        .map(|seed| generate_mix(seed, 40, Mix::Races))
        .find(|t| t.contains("parallel "))
        .expect("a race-mix seed below 64 with a parallel group");
    let run = || {
        let r = run_text_shuttle(&text, 3, 99).unwrap();
        let steps: Vec<String> = r
            .steps
            .iter()
            .map(|s| format!("{} {} {:?}", s.line, s.result, s.values))
            .collect();
        (steps, r.passed)
    };
    let first = run();
    assert!(first.1, "the scenario passes");
    assert_eq!(first, run());
}
