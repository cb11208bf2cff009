//! `peerdma topo`: load a topology from one source, then print the devices, the
//! `nvidia-smi topo -m` matrix, the kernel's verdict matrix, or one pair explained.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use peerdma::fabric::import::{file, lspci, sysfs};
use peerdma::fabric::{preset, DeviceClass, FnId, PortKind, Topology};

mod explain;
pub(crate) mod picture;
mod report;

use explain::{explain, print_explain};
use report::{print_report, Report};

/// Where a machine's topology comes from: this machine when none is given.
#[derive(Args)]
pub struct SourceArgs {
    /// Read a sysfs snapshot rooted at DIR (holding sys/ and proc/) instead of this machine.
    #[arg(long, value_name = "DIR", group = "source")]
    pub sysfs: Option<PathBuf>,
    /// Read lspci text from FILE, or `-` for stdin: `lspci -tv` (the tree), `sudo lspci
    /// -vvv` (ACS, links, NUMA, BARs; the tree rebuilt from bus numbers), or both of one
    /// machine, in one file or as two FILEs. Add `-nn` to either for the IDs.
    #[arg(long, value_name = "FILE|-", num_args = 1..=2, action = clap::ArgAction::Set, group = "source")]
    pub lspci: Option<Vec<String>>,
    /// Read a TOML topology file (docs/topology.md).
    #[arg(long, value_name = "TOPO.toml", group = "source")]
    pub file: Option<PathBuf>,
    /// Use a built-in machine: workstation, dgx, dgx-acs, q35.
    #[arg(long, value_name = "NAME", group = "source")]
    pub preset: Option<String>,
}

impl SourceArgs {
    /// Whether no source is given: the machine this runs on.
    pub fn is_live(&self) -> bool {
        self.sysfs.is_none() && self.lspci.is_none() && self.file.is_none() && self.preset.is_none()
    }
}

/// Where the topology comes from and what to show of it.
#[derive(Args)]
pub struct TopoArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// Print JSON (docs/json.md) instead of text.
    #[arg(long)]
    json: bool,
    /// Only these device classes in the matrices: gpu, nic, nvme, storage, bridge, other.
    /// Default: gpu, nic, nvme, storage.
    #[arg(long, value_delimiter = ',', value_name = "CLASS,...")]
    class: Vec<String>,
    /// Explain the path and verdict between two functions (provider, then client).
    #[arg(long, num_args = 2, value_names = ["A", "B"], action = clap::ArgAction::Set)]
    explain: Option<Vec<String>>,
    /// Write a sysfs snapshot to DIR (readable with --sysfs DIR): of this machine, or of
    /// the topology another source option names. All or nothing; DIR must not exist or
    /// be empty.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["explain", "json", "toml", "class"])]
    save: Option<PathBuf>,
    /// With --save: replace a DIR that holds something, whole.
    #[arg(long, requires = "save")]
    force: bool,
    /// Print the PCIe tree as Graphviz DOT; with --explain A B, the pair's path is drawn
    /// in the verdict's colour.
    #[arg(long, conflicts_with_all = ["json", "toml", "save"])]
    dot: bool,
    /// Write the PCIe tree as an SVG picture to FILE; with --explain A B, the pair's path
    /// is drawn in the verdict's colour (green: bus address, orange: through the host
    /// bridge, red: not supported).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["json", "toml", "save"])]
    svg: Option<std::path::PathBuf>,
    /// Print the topology as a TOML file (docs/topology.md) instead of the report.
    #[arg(long, conflicts_with_all = ["json", "explain"])]
    toml: bool,
}

pub fn run(args: &TopoArgs) -> Result<()> {
    let live = args.source.is_live();
    if let (Some(dir), true) = (&args.save, live) {
        let n = sysfs::save_into(dir, args.force, |tmp| {
            sysfs::save(std::path::Path::new("/"), tmp)
        })
        .context("saving a sysfs snapshot of this machine")?;
        peerdma_cli::outln!(
            "saved {n} PCI functions to {} (read it back with --sysfs {0})",
            dir.display()
        );
        return Ok(());
    }
    let topo = load(&args.source)?;
    if let Some(dir) = &args.save {
        let n = sysfs::save_into(dir, args.force, |tmp| sysfs::write_snapshot(&topo, tmp))
            .context("writing a sysfs snapshot")?;
        peerdma_cli::outln!(
            "wrote {n} PCI functions of {} to {} (read it back with --sysfs {1})",
            topo.source(),
            dir.display()
        );
        return Ok(());
    }
    if args.toml {
        peerdma_cli::outp!("{}", file::to_toml(&topo));
        return Ok(());
    }
    if args.dot || args.svg.is_some() {
        let pair = match &args.explain {
            Some(p) => Some((topo.find(&p[0])?, topo.find(&p[1])?)),
            None => None,
        };
        let dot = picture::dot(&topo, pair);
        if args.dot {
            peerdma_cli::outp!("{dot}");
        }
        if let Some(path) = &args.svg {
            let svg = picture::svg(&dot)?;
            std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))?;
            if !args.dot {
                peerdma_cli::outln!(
                    "wrote the PCIe tree of {} to {}",
                    topo.source(),
                    path.display()
                );
            }
        }
        return Ok(());
    }
    if let Some(pair) = &args.explain {
        let a = topo.find(&pair[0])?;
        let b = topo.find(&pair[1])?;
        let e = explain(&topo, a, b);
        if args.json {
            peerdma_cli::outln!("{}", serde_json::to_string_pretty(&e)?);
        } else {
            print_explain(&topo, &e);
        }
        return Ok(());
    }
    let classes = parse_classes(&args.class)?;
    let ids = select(&topo, &classes);
    let report = Report::new(&topo, &ids);
    if args.json {
        peerdma_cli::outln!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&topo, &report, &classes);
    }
    Ok(())
}

/// Reads the machine a source names.
pub fn load(args: &SourceArgs) -> Result<Topology> {
    Ok(if let Some(dir) = &args.sysfs {
        sysfs::read(dir)?
    } else if let Some(srcs) = &args.lspci {
        if srcs.iter().filter(|s| *s == "-").count() > 1 {
            return Err(peerdma_cli::Invalid(
                "error: --lspci reads standard input (`-`) once at most".to_string(),
            )
            .into());
        }
        let mut text = String::new();
        // Where each file's lines end in the joined text.
        let mut starts: Vec<(usize, &str)> = Vec::new();
        for src in srcs {
            let part = if src == "-" {
                if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                    // Waiting silently on a terminal looks like a hang: say what it waits for.
                    eprintln!(
                        "peerdma: reading lspci text (`lspci -tv`, `lspci -vvv`) from standard input (paste it, then Ctrl-D)"
                    );
                }
                peerdma_cli::io::read_bounded(std::io::stdin().lock(), "lspci text from stdin")?
            } else {
                peerdma_cli::io::read_file(std::path::Path::new(src))?
            };
            text.push_str(&part);
            if !part.ends_with('\n') {
                text.push('\n');
            }
            starts.push((text.lines().count(), src.as_str()));
        }
        // An error's line is placed back in the file it came from.
        lspci::parse(&srcs.join(" + "), &text).map_err(|e| match e {
            peerdma::fabric::FabricError::Lspci {
                line,
                column,
                reason,
                ..
            } if srcs.len() > 1 => {
                let i = starts.iter().position(|(end, _)| line <= *end).unwrap_or(0);
                let before = if i == 0 { 0 } else { starts[i - 1].0 };
                peerdma::fabric::FabricError::Lspci {
                    source_name: starts.get(i).map_or(srcs[0].clone(), |s| s.1.to_string()),
                    line: line - before,
                    column,
                    reason,
                }
            }
            e => e,
        })?
    } else if let Some(path) = &args.file {
        let text = peerdma_cli::io::read_file(path)?;
        file::parse(&path.display().to_string(), &text)?
    } else if let Some(name) = &args.preset {
        preset(name)?
    } else {
        peerdma::fabric::read_live().context(
            "reading this machine's PCI devices from /sys (use --preset, --file, --lspci or --sysfs elsewhere)",
        )?
    })
}

fn parse_classes(names: &[String]) -> Result<Vec<DeviceClass>> {
    if names.is_empty() {
        return Ok(vec![
            DeviceClass::Gpu,
            DeviceClass::Nic,
            DeviceClass::Nvme,
            DeviceClass::Storage,
        ]);
    }
    names
        .iter()
        .map(|n| {
            DeviceClass::parse(n).with_context(|| {
                let known: Vec<&str> = DeviceClass::NAMES.iter().map(|(n, _)| *n).collect();
                format!("unknown class `{n}`; the classes are {}", known.join(", "))
            })
        })
        .collect()
}

/// Functions shown in the matrices: endpoints of the chosen classes (bridges only when
/// `bridge` is asked for).
fn select(topo: &Topology, classes: &[DeviceClass]) -> Vec<FnId> {
    topo.ids()
        .filter(|&id| {
            let f = topo.function(id);
            let c = f.device_class();
            classes.contains(&c) && (f.kind == PortKind::Endpoint || c == DeviceClass::Bridge)
        })
        .collect()
}
