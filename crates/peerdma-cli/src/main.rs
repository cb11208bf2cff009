//! The `peerdma` command: `run` runs the main job on an emulated host, `topo` reports
//! the PCIe peer-to-peer picture of a machine, `bench` measures against the kernel.

mod run;
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
    /// Run the main job on an emulated host (the built-in p2pmem-test copy by default).
    Run(run::RunArgs),
    /// Show which PCIe functions can DMA to each other, how, and why.
    Topo(topo::TopoArgs),
    /// Run a benchmark and print it beside its baseline, measured in the same run.
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    // Logs are off unless PEERDMA_LOG asks (e.g. PEERDMA_LOG=debug, or
    // PEERDMA_LOG=peerdma::dma=debug), and go to stderr.
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("PEERDMA_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run::run(&args),
        Command::Topo(args) => topo::run(&args),
        Command::Bench(args) => bench::run(&args),
    };
    // Output that could not be written (a full disk) fails the command; a closed pipe
    // does not.
    let result = result.and_then(|()| peerdma_cli::io::finish());
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("peerdma: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
