//! The `peerdma` command. `topo` reports the PCIe peer-to-peer picture of a machine;
//! later subcommands run emulated hosts and benchmarks.

mod topo;

use peerdma_cli::bench;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// PCIe peer-to-peer DMA, pinning and device memory, modelled on the Linux kernel.
#[derive(Parser)]
#[command(name = "peerdma", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show which PCIe functions can DMA to each other, how, and why.
    Topo(topo::TopoArgs),
    /// Run a benchmark and print it beside its baseline, measured in the same run.
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Topo(args) => topo::run(&args),
        Command::Bench(args) => bench::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("peerdma: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
