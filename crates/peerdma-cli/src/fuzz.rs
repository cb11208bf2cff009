//! `peerdma fuzz`: seeded random scenarios with a model of every page, fault injection
//! and invariant checks after every step (docs/fuzz.md). A failing seed is minimised
//! and written out as a scenario file that `peerdma run` replays.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use peerdma::scenario::fuzz;
use peerdma_cli::opts::count;

/// What to fuzz.
#[derive(Args)]
pub struct FuzzArgs {
    /// Seeds to run, `A..B` (B excluded) or one seed.
    #[arg(long, default_value = "0..100", value_parser = seeds)]
    seeds: (u64, u64),
    /// Operations per seed.
    #[arg(long, default_value = "500", value_parser = count(1, 1_000_000))]
    ops: u64,
    /// Do not minimise failing seeds (faster when many fail).
    #[arg(long)]
    no_minimise: bool,
    /// Write each failing seed's minimised scenario here as fuzz-SEED.scn.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print the summary as JSON (`peerdma-fuzz/1`).
    #[arg(long)]
    json: bool,
    /// Also write the summary, with each failing seed's minimised scenario, as a
    /// self-contained HTML page to FILE.
    #[arg(long, value_name = "FILE.html")]
    report: Option<PathBuf>,
    /// Print seed SEED's scenario and exit (what a campaign runs for it).
    #[arg(long)]
    print: Option<u64>,
}

fn seeds(s: &str) -> Result<(u64, u64), String> {
    fuzz::parse_seeds(s)
}

pub fn run(args: &FuzzArgs) -> Result<()> {
    if let Some(seed) = args.print {
        peerdma_cli::outp!("{}", fuzz::generate(seed, args.ops as usize));
        return Ok(());
    }
    let (a, b) = args.seeds;
    let bar = if args.json || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(b - a).with_style(
            ProgressStyle::with_template("{msg:>8} [{bar:40}] {pos}/{len} seeds ({per_sec})")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        )
    };
    bar.set_message("fuzzing");
    let c = fuzz::campaign(a, b, args.ops as usize, !args.no_minimise, &mut |n| {
        bar.set_position(n)
    });
    bar.finish_and_clear();
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        for f in &c.failures {
            if let Some(text) = &f.scenario {
                let p = dir.join(format!("fuzz-{}.scn", f.seed));
                std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
            }
        }
    }
    if let Some(p) = &args.report {
        std::fs::write(p, crate::html::fuzz(&c))
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if args.json {
        peerdma_cli::outln!("{}", serde_json::to_string_pretty(&c)?);
    } else {
        peerdma_cli::outln!(
            "seeds {}..{}: {} operations in {:.2} s ({:.0} operations/s, every check on), {} failed",
            c.first_seed,
            c.end_seed,
            c.ops,
            c.seconds,
            c.ops_per_second,
            c.failures.len()
        );
        for f in &c.failures {
            peerdma_cli::outln!("seed {} FAILED", f.seed);
            if let Some(m) = &f.mismatch {
                peerdma_cli::outln!(
                    "  at line {}: {}\n  expected: {}\n  got:      {}",
                    m.line,
                    m.step,
                    m.expected,
                    m.got
                );
            }
            if let Some(l) = &f.leaks {
                peerdma_cli::outln!("  leaked:\n{l}");
            }
            peerdma_cli::outln!(
                "  replay: peerdma fuzz --seeds {} --ops {}{}",
                f.seed,
                args.ops,
                match &args.out {
                    Some(d) => format!(
                        "   or: peerdma run {}",
                        d.join(format!("fuzz-{}.scn", f.seed)).display()
                    ),
                    None => " --out DIR (to write the minimised scenario)".into(),
                }
            );
        }
    }
    if !c.failures.is_empty() {
        bail!("{} of {} seeds failed", c.failures.len(), b - a);
    }
    Ok(())
}
