//! The `peerdma` command: `run` runs the main job on an emulated host, `topo` reports
//! the PCIe peer-to-peer picture of a machine, `bench` measures against the kernel;
//! `completions` and `man` print a shell completion script and the manual page.

mod check;
mod fuzz;
mod html;
mod run;
mod topo;

use peerdma_cli::bench;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

/// PCIe peer-to-peer DMA, pinning and device memory, modelled on the Linux kernel.
#[derive(Parser)]
#[command(
    name = "peerdma",
    version,
    about,
    long_about = None,
    after_help = "Exit status:\n  0  success\n  1  the command failed (an error, a job or scenario that did not verify)\n  2  a usage error or an invalid scenario"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a scenario on an emulated host: the built-in one by default (an RDMA NIC
    /// reaching memory a GPU moves, each registration style), a scenario FILE, or a job:
    /// `rdma`, `p2pmem` or `hmm`.
    Run(run::RunArgs),
    /// Run seeded random scenarios with fault injection and invariant checks; a failing
    /// seed is minimised into a scenario file.
    Fuzz(fuzz::FuzzArgs),
    /// Show which PCIe functions can DMA to each other, how, and why.
    Topo(topo::TopoArgs),
    /// Is this machine ready for peer-to-peer DMA, and if not, why: the kernel's config
    /// and IOMMU, p2p memory providers, each GPU/NVMe/NIC pair's verdict with the fix,
    /// and each GPU's closest NIC and drive. Exit status 0 when every GPU-NVMe/NIC pair
    /// (or every --pair) can do P2P, 1 when some cannot or it cannot be told.
    Check(check::CheckArgs),
    /// Run a benchmark and print it beside its baseline, measured in the same run.
    Bench(bench::BenchArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), e.g. `peerdma man > peerdma.1`.
    Man,
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
        Command::Fuzz(args) => fuzz::run(&args),
        Command::Topo(args) => topo::run(&args),
        Command::Check(args) => match check::run(&args) {
            // Some pair cannot do P2P: status 1, after the report is out.
            Ok(false) => match peerdma_cli::io::finish() {
                Ok(()) => return ExitCode::FAILURE,
                Err(e) => Err(e),
            },
            other => other.map(|_| ()),
        },
        Command::Bench(args) => bench::run(&args),
        Command::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "peerdma", &mut out);
            peerdma_cli::outp!("{}", String::from_utf8_lossy(&out));
            Ok(())
        }
        Command::Man => {
            let mut out = Vec::new();
            clap_mangen::Man::new(Cli::command())
                .render(&mut out)
                .map(|()| peerdma_cli::outp!("{}", String::from_utf8_lossy(&out)))
                .map_err(anyhow::Error::from)
        }
    };
    // Output that could not be written (a full disk) fails the command; a closed pipe
    // does not.
    let result = result.and_then(|()| peerdma_cli::io::finish());
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<peerdma_cli::Invalid>().is_some() => {
            eprint!("{e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("peerdma: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
