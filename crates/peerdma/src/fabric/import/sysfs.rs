//! Reading the PCI tree from sysfs, live or from a snapshot directory laid out like
//! `/` (the way hwloc's `HWLOC_FSROOT` points its reader elsewhere), and writing such a
//! snapshot of the running machine.
//!
//! Parents come from the device directories under `sys/devices/pci*` (what the kernel
//! linked), bus ranges and port types from `config`, ACS from the extended
//! configuration space when it was readable (root reads 4096 bytes, anyone else 64),
//! and the CPU from `proc/cpuinfo`. Nothing here guesses silently: what could not be
//! read is recorded in [`Gaps`].

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Component, Path, PathBuf};

use crate::addr::{Bdf, BusAddr, BusId, PhysAddr};
use crate::fabric::error::FabricError;
use crate::fabric::import::config;
use crate::fabric::model::{
    config_from_kallsyms, parse_config, validate, Bar, ConfigState, Function, FunctionSpec, Gaps,
    HostBridge, HostInfo, KernelFacts, Link, LinkSpeed, NvmeCmb, P2pmem, PortKind, Topology,
    Upstream,
};

/// The attribute files the reader uses; `--save` copies exactly these.
pub const ATTRIBUTES: [&str; 14] = [
    "vendor",
    "device",
    "class",
    "subsystem_vendor",
    "subsystem_device",
    "config",
    "resource",
    "numa_node",
    "mem_info_vram_total",
    "current_link_speed",
    "current_link_width",
    "max_link_speed",
    "max_link_width",
    "local_cpulist",
];

const IORESOURCE_IO: u64 = 0x100;
const IORESOURCE_MEM: u64 = 0x200;
const IORESOURCE_PREFETCH: u64 = 0x2000;
const IORESOURCE_MEM_64: u64 = 0x0010_0000;
const IORESOURCE_DISABLED: u64 = 0x1000_0000;
const IORESOURCE_UNSET: u64 = 0x2000_0000;

/// Reads the PCI topology of the machine whose filesystem root is `root` (`/` for the
/// running machine).
pub fn read(root: &Path) -> Result<Topology, FabricError> {
    let devices = root.join("sys/bus/pci/devices");
    let entries = fs::read_dir(&devices).map_err(|e| FabricError::io(&devices, e))?;
    let sys_devices = canonical(&root.join("sys/devices"))?;
    let mut names: Vec<String> = Vec::new();
    for e in entries {
        let e = e.map_err(|e| FabricError::io(&devices, e))?;
        names.push(e.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    let mut specs = Vec::with_capacity(names.len());
    let mut roots: BTreeMap<BusId, Vec<Option<u32>>> = BTreeMap::new();
    let mut short_config = 0usize;
    let mut any_numa_file = false;
    let mut any_group = false;
    let mut dirs: BTreeMap<Bdf, PathBuf> = BTreeMap::new();
    let mut dropped: Vec<String> = Vec::new();
    for name in &names {
        let link = devices.join(name);
        let bdf: Bdf = name.parse().map_err(|e| {
            FabricError::sysfs(&link, format!("entry name is not a PCI address: {e}"))
        })?;
        let is_link = fs::symlink_metadata(&link).is_ok_and(|m| m.file_type().is_symlink());
        if !is_link {
            return Err(FabricError::sysfs(
                &link,
                "is a plain directory, not a link into sys/devices: the snapshot lost the \
                 device tree (which bridge each function sits below) and with it the config \
                 space; copy sysfs keeping symlinks (`peerdma topo --save DIR` does)",
            ));
        }
        let dir = canonical(&link)?;
        let rel = dir.strip_prefix(&sys_devices).map_err(|_| {
            FabricError::sysfs(
                &link,
                format!("links to {}, outside sys/devices", dir.display()),
            )
        })?;
        let (host, parent) = placement(&link, rel, bdf)?;
        dirs.insert(bdf, dir.clone());
        let mut spec = read_function(&dir, bdf)?;
        if spec.function.acs == crate::fabric::model::Acs::Unknown {
            short_config += 1;
        }
        dropped.extend(validate::drop_impossible(&mut spec.function));
        any_numa_file |= dir.join("numa_node").exists();
        if let Ok(target) = fs::read_link(dir.join("iommu_group")) {
            let group = target
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| {
                    FabricError::sysfs(dir.join("iommu_group"), "does not link to a numbered group")
                })?;
            spec.function.iommu_group = Some(group);
            any_group = true;
        }
        spec.parent = parent;
        let numas = roots.entry(host).or_default();
        if parent.is_none() {
            numas.push(spec.function.numa_node);
        }
        specs.push(spec);
    }
    // A bridge can be missing from sys/bus/pci/devices while its directory, and the
    // functions below it, are in sys/devices (seen on real servers): recover it from
    // there, as pciutils and hwloc, which walk sys/devices, see it. Its parent may be
    // missing too, so until nothing more is found.
    let mut recovered = Vec::new();
    loop {
        let missing: Vec<(Bdf, PathBuf)> = specs
            .iter()
            .filter_map(|sp| {
                let p = sp.parent?;
                if dirs.contains_key(&p) {
                    return None;
                }
                let child = dirs.get(&sp.function.bdf)?;
                let dir = child.parent()?.to_path_buf();
                (dir.file_name()?.to_str()?.parse::<Bdf>().ok()? == p).then_some((p, dir))
            })
            .collect();
        if missing.is_empty() {
            break;
        }
        for (bdf, dir) in missing {
            if dirs.contains_key(&bdf) {
                continue;
            }
            let rel = dir
                .strip_prefix(&sys_devices)
                .map_err(|_| FabricError::sysfs(&dir, "a parent bridge outside sys/devices"))?;
            let (host, parent) = placement(&dir, rel, bdf)?;
            let mut spec = read_function(&dir, bdf)?;
            if spec.function.acs == crate::fabric::model::Acs::Unknown {
                short_config += 1;
            }
            dropped.extend(validate::drop_impossible(&mut spec.function));
            spec.parent = parent;
            let numas = roots.entry(host).or_default();
            if parent.is_none() {
                numas.push(spec.function.numa_node);
            }
            dirs.insert(bdf, dir);
            specs.push(spec);
            recovered.push(bdf.to_string());
        }
    }
    // Host bridges that have no function on their root bus still exist as pciDDDD:BB.
    if let Ok(rd) = fs::read_dir(&sys_devices) {
        for e in rd.flatten() {
            if let Some(id) = e.file_name().to_str().and_then(host_bridge_name) {
                roots.entry(id).or_default();
            }
        }
    }
    let host_bridges = roots
        .into_iter()
        .map(|(root, numas)| HostBridge {
            root,
            numa_node: numas.into_iter().flatten().next(),
        })
        .collect();
    let mut host = read_host(root, any_group)?;
    let (kernel, kernel_unread) = read_kernel(root);
    host.kernel = kernel;
    let mut gaps = Gaps {
        kernel_unread,
        numa_unknown: !any_numa_file,
        cpu_unknown: host.cpu_vendor.is_none(),
        acs_hint: if root == Path::new("/") {
            "only root can read past 64 bytes of config space: run as root (sudo peerdma topo)"
        } else {
            "this snapshot's config files stop at 64 bytes: take it as root to include ACS"
        },
        ..Gaps::default()
    };
    if short_config > 0 {
        gaps.notes.push(format!(
            "ACS could not be read for {short_config} of {} functions: their config space stops \
             before the extended capabilities ({})",
            specs.len(),
            gaps.acs_hint
        ));
    }
    if !recovered.is_empty() {
        gaps.notes.push(format!(
            "recovered from sys/devices, with no entry in sys/bus/pci/devices: {}",
            recovered.join(", ")
        ));
    }
    gaps.notes.extend(dropped);
    if host.iommu.is_none() {
        gaps.notes
            .push("IOMMU state unknown: no sys/kernel/iommu_groups".to_string());
    }
    Topology::build(
        if root == Path::new("/") {
            "this machine (/sys)".to_string()
        } else {
            format!("sysfs {}", root.display())
        },
        host,
        host_bridges,
        specs,
        gaps,
    )
}

fn canonical(p: &Path) -> Result<PathBuf, FabricError> {
    fs::canonicalize(p).map_err(|e| FabricError::io(p, e))
}

fn host_bridge_name(s: &str) -> Option<BusId> {
    s.strip_prefix("pci").and_then(|r| r.parse().ok())
}

/// From `pci0000:00/0000:00:1c.0/0000:04:00.0`, the root bus and the parent bridge.
fn placement(link: &Path, rel: &Path, bdf: Bdf) -> Result<(BusId, Option<Bdf>), FabricError> {
    let mut host = None;
    let mut parent = None;
    let mut last = None;
    for c in rel.components() {
        let Component::Normal(c) = c else { continue };
        let s = c.to_string_lossy();
        if let Some(h) = host_bridge_name(&s) {
            // A nested root bus (VMD) starts a new tree below it.
            host = Some(h);
            parent = None;
            last = None;
        } else if let Ok(b) = s.parse::<Bdf>() {
            parent = last;
            last = Some(b);
        }
    }
    let host = host.ok_or_else(|| {
        FabricError::sysfs(link, "device path has no pciDDDD:BB host bridge directory")
    })?;
    if last != Some(bdf) {
        return Err(FabricError::sysfs(
            link,
            format!(
                "links to {}, which is not the directory of {bdf}",
                rel.display()
            ),
        ));
    }
    Ok((host, parent))
}

fn attr(dir: &Path, name: &str) -> Result<Option<String>, FabricError> {
    let p = dir.join(name);
    match fs::read(&p) {
        Ok(bytes) => String::from_utf8(bytes)
            .map(|s| Some(s.trim().to_string()))
            .map_err(|_| FabricError::sysfs(&p, "is not text")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(FabricError::io(p, e)),
    }
}

fn hex_attr(dir: &Path, name: &str, max: u64) -> Result<Option<u64>, FabricError> {
    let Some(text) = attr(dir, name)? else {
        return Ok(None);
    };
    crate::addr::parse_hex_u64(&text)
        .filter(|v| *v <= max)
        .map(Some)
        .ok_or_else(|| {
            FabricError::sysfs(
                dir.join(name),
                format!("`{text}` is not a hex value up to {max:#x}"),
            )
        })
}

fn read_function(dir: &Path, bdf: Bdf) -> Result<FunctionSpec, FabricError> {
    let need = |name: &str, max| -> Result<u64, FabricError> {
        hex_attr(dir, name, max)?.ok_or_else(|| FabricError::sysfs(dir.join(name), "missing"))
    };
    let vendor = need("vendor", 0xffff)? as u16;
    let device = need("device", 0xffff)? as u16;
    let class = need("class", 0xff_ffff)? as u32;
    let subsystem = match (
        hex_attr(dir, "subsystem_vendor", 0xffff)?,
        hex_attr(dir, "subsystem_device", 0xffff)?,
    ) {
        (Some(v), Some(d)) => Some((v as u16, d as u16)),
        _ => None,
    };
    let cfg_path = dir.join("config");
    let cfg = match fs::read(&cfg_path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(FabricError::io(cfg_path, e)),
    };
    let facts = config::decode(&cfg);
    let bars = match attr(dir, "resource")? {
        Some(text) => parse_resource(&dir.join("resource"), &text)?,
        None => Vec::new(),
    };
    let numa_node = match attr(dir, "numa_node")? {
        None => None,
        Some(t) => {
            let v: i64 = t.parse().map_err(|_| {
                FabricError::sysfs(dir.join("numa_node"), format!("`{t}` is not a number"))
            })?;
            u32::try_from(v).ok()
        }
    };
    // amdgpu publishes its VRAM size here; other drivers say nothing.
    let memory = match attr(dir, "mem_info_vram_total")? {
        None => None,
        Some(t) => Some(t.parse::<u64>().map_err(|_| {
            FabricError::sysfs(
                dir.join("mem_info_vram_total"),
                format!("`{t}` is not a number of bytes"),
            )
        })?),
    };
    let link = read_link(dir)?;
    let is_bridge = facts.is_bridge_header || Function::class_is_pci_bridge(class);
    let (kind, kind_known) = match facts.pcie_kind {
        Some(k) if k.is_bridge() == is_bridge && k != PortKind::Endpoint => (k, true),
        Some(PortKind::Endpoint) if !is_bridge && class >> 8 != 0x0600 => {
            (PortKind::Endpoint, true)
        }
        _ => (PortKind::Endpoint, false),
    };
    Ok(FunctionSpec {
        function: Function {
            bdf,
            vendor,
            device,
            subsystem,
            class,
            name: String::new(),
            kind,
            buses: facts.buses,
            bars,
            link,
            acs: facts.acs,
            iommu_group: None,
            numa_node,
            memory: memory.filter(|b| *b > 0),
            p2pmem: read_p2pmem(dir)?,
            nvme_cmb: read_nvme_cmb(dir)?,
            upstream: Upstream::HostBridge(0),
        },
        parent: None,
        kind_known,
    })
}

/// `p2pmem/size`, `available` and `published` of a function whose memory the kernel
/// registered (pci_p2pdma_add_resource creates the group).
fn read_p2pmem(dir: &Path) -> Result<Option<P2pmem>, FabricError> {
    let p = dir.join("p2pmem");
    if !p.is_dir() {
        return Ok(None);
    }
    let num = |name: &str| -> Result<u64, FabricError> {
        let t = attr(&p, name)?.ok_or_else(|| FabricError::sysfs(p.join(name), "missing"))?;
        t.parse()
            .map_err(|_| FabricError::sysfs(p.join(name), format!("`{t}` is not a number")))
    };
    Ok(Some(P2pmem {
        size: num("size")?,
        available: num("available")?,
        published: num("published")? != 0,
    }))
}

/// The nvme driver's `cmb` attribute of the controller below the function
/// (`nvme/nvmeN/cmb`: `cmbloc : 0x...` and `cmbsz  : 0x...`), shown only when CMBSZ is
/// not zero.
fn read_nvme_cmb(dir: &Path) -> Result<Option<NvmeCmb>, FabricError> {
    let Ok(rd) = fs::read_dir(dir.join("nvme")) else {
        return Ok(None);
    };
    let mut ctrls: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
    ctrls.sort();
    for c in ctrls {
        let Some(text) = attr(&c, "cmb")? else {
            continue;
        };
        let field = |key: &str| {
            text.lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.trim() == key)
                .and_then(|(_, v)| crate::addr::parse_hex_u64(v))
                .and_then(|v| u32::try_from(v).ok())
        };
        return match (field("cmbloc"), field("cmbsz")) {
            (Some(cmbloc), Some(cmbsz)) => Ok(Some(NvmeCmb { cmbloc, cmbsz })),
            _ => Err(FabricError::sysfs(
                c.join("cmb"),
                format!(
                    "`{}` is not `cmbloc : 0x..` and `cmbsz : 0x..`",
                    text.trim()
                ),
            )),
        };
    }
    Ok(None)
}

fn read_link(dir: &Path) -> Result<Option<Link>, FabricError> {
    let speed = |name: &str| -> Result<Option<LinkSpeed>, FabricError> {
        Ok(attr(dir, name)?.and_then(|t| LinkSpeed::parse(&t)))
    };
    let width = |name: &str| -> Result<Option<u8>, FabricError> {
        match attr(dir, name)? {
            None => Ok(None),
            Some(t) => t.parse::<u8>().map(|w| (w > 0).then_some(w)).map_err(|_| {
                FabricError::sysfs(dir.join(name), format!("`{t}` is not a lane count"))
            }),
        }
    };
    Ok(
        match (
            speed("current_link_speed")?,
            width("current_link_width")?,
            speed("max_link_speed")?,
            width("max_link_width")?,
        ) {
            (Some(speed), Some(width), max_speed, max_width) => Some(Link {
                speed,
                width,
                max_speed: max_speed.unwrap_or(speed),
                max_width: max_width.unwrap_or(width),
            }),
            _ => None,
        },
    )
}

/// Parses the `resource` attribute: one `start end flags` line per resource; the first
/// six are BARs 0-5.
fn parse_resource(path: &Path, text: &str) -> Result<Vec<Bar>, FabricError> {
    let mut bars = Vec::new();
    for (i, line) in text.lines().enumerate().take(6) {
        let nums: Vec<u64> = line
            .split_whitespace()
            .map(crate::addr::parse_hex_u64)
            .collect::<Option<Vec<_>>>()
            .filter(|v| v.len() == 3)
            .ok_or_else(|| {
                FabricError::sysfs(
                    path,
                    format!("line {}: `{line}` is not `start end flags` in hex", i + 1),
                )
            })?;
        let (start, end, flags) = (nums[0], nums[1], nums[2]);
        // Empty, the upper half of a 64-bit BAR, or one the kernel could not place
        // (UNSET: it has a size but no address) or turned off: no window.
        if (start == 0 && end == 0)
            || flags & (IORESOURCE_IO | IORESOURCE_MEM) == 0
            || flags & (IORESOURCE_UNSET | IORESOURCE_DISABLED) != 0
        {
            continue;
        }
        if end < start {
            return Err(FabricError::sysfs(
                path,
                format!("line {}: end {end:#x} below start {start:#x}", i + 1),
            ));
        }
        bars.push(Bar {
            index: i as u8,
            cpu: PhysAddr(start),
            bus: BusAddr(start),
            size: end - start + 1,
            is_64bit: flags & IORESOURCE_MEM_64 != 0,
            prefetchable: flags & IORESOURCE_PREFETCH != 0,
            io: flags & IORESOURCE_IO != 0,
        });
    }
    Ok(bars)
}

fn read_host(root: &Path, any_group: bool) -> Result<HostInfo, FabricError> {
    let mut host = HostInfo::default();
    let cpuinfo = root.join("proc/cpuinfo");
    if let Some(text) = attr(&root.join("proc"), "cpuinfo")? {
        for line in text.lines() {
            if line.trim().is_empty() {
                break; // the first processor is enough, as the kernel uses cpu_data(0)
            }
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            match k.trim() {
                "vendor_id" => host.cpu_vendor = Some(v.trim().to_string()),
                "cpu family" => {
                    host.cpu_family = Some(v.trim().parse().map_err(|_| {
                        FabricError::sysfs(
                            &cpuinfo,
                            format!("cpu family `{}` is not a number", v.trim()),
                        )
                    })?)
                }
                _ => {}
            }
        }
    }
    let groups = root.join("sys/kernel/iommu_groups");
    host.iommu = match fs::read_dir(&groups) {
        Ok(mut rd) => Some(rd.next().is_some()),
        Err(_) if any_group => Some(true),
        Err(_) => None,
    };
    Ok(host)
}

/// The first line of the config a snapshot keeps, before where it was read.
const SAVED_CONFIG_HEADER: &str = "# The options peer DMA needs, as read from ";

/// The most of a kernel file read: a config is some 300 KiB, kallsyms tens of MiB.
const KERNEL_FILE_MAX: u64 = 64 << 20;

/// A small text file under `root`, or why it could not be read (`None` when absent).
fn kernel_file(root: &Path, rel: &str) -> Result<Option<String>, String> {
    use std::io::Read;
    let path = root.join(rel);
    let file = match fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("/{rel}: {e}")),
    };
    let mut bytes = Vec::new();
    let reader: Box<dyn Read> = if rel.ends_with(".gz") {
        Box::new(flate2::read::GzDecoder::new(file))
    } else {
        Box::new(file)
    };
    reader
        .take(KERNEL_FILE_MAX)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("/{rel}: {e}"))?;
    Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
}

/// The kernel's release, the config options peer DMA needs (from /boot/config-<release>,
/// else /proc/config.gz, else the symbols of /proc/kallsyms), the command line and the
/// IOMMU groups' domain types. Nothing here is fatal: what cannot be read is said in
/// `unread`.
fn read_kernel(root: &Path) -> (KernelFacts, Vec<String>) {
    let mut k = KernelFacts::default();
    let mut unread = Vec::new();
    let mut note = |r: Result<Option<String>, String>| match r {
        Ok(t) => t,
        Err(why) => {
            unread.push(why);
            None
        }
    };
    let r = kernel_file(root, "proc/sys/kernel/osrelease");
    k.release = note(r)
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty());
    let boot = k.release.as_ref().map(|r| format!("boot/config-{r}"));
    let mut sources: Vec<String> = boot.into_iter().collect();
    sources.push("proc/config.gz".into());
    for rel in &sources {
        let r = kernel_file(root, rel);
        if let Some(text) = note(r) {
            k.config = parse_config(&text);
            // A snapshot's config names where it was read on its machine.
            k.config_source = Some(
                text.lines()
                    .next()
                    .and_then(|l| l.strip_prefix(SAVED_CONFIG_HEADER))
                    .map_or(format!("/{rel}"), |s| s.trim_end_matches('.').to_string()),
            );
            break;
        }
    }
    if k.config.is_empty() {
        let r = kernel_file(root, "proc/kallsyms");
        if let Some(text) = note(r) {
            match config_from_kallsyms(&text) {
                Some(c) => {
                    k.config = c;
                    k.config_source = Some("/proc/kallsyms".into());
                }
                None => {
                    note(Err("/proc/kallsyms: not a full symbol table".to_string()));
                }
            }
        }
    }
    if k.config.is_empty() {
        note(Err(
            "the kernel config: no /boot/config-<release>, /proc/config.gz or readable \
             /proc/kallsyms (CONFIG_IKCONFIG_PROC or root would tell)"
                .to_string(),
        ));
    }
    let r = kernel_file(root, "proc/cmdline");
    k.cmdline = note(r).map(|t| t.trim().to_string());
    if let Ok(rd) = fs::read_dir(root.join("sys/kernel/iommu_groups")) {
        for e in rd.flatten() {
            let Some(g) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if let Ok(t) = fs::read_to_string(e.path().join("type")) {
                k.iommu_groups.insert(g, t.trim().to_string());
            }
        }
    }
    (k, unread)
}

/// Writes what [`read_kernel`] reads, so a snapshot keeps the kernel facts: the
/// release, the config lines that matter, the command line and the groups' types.
fn write_kernel(k: &KernelFacts, to: &Path) -> Result<(), FabricError> {
    let write = |rel: &str, text: &str| -> Result<(), FabricError> {
        let path = to.join(rel);
        if let Some(dir) = path.parent() {
            mkdir(dir)?;
        }
        fs::write(&path, text).map_err(|e| FabricError::io(&path, e))
    };
    if let Some(r) = &k.release {
        write("proc/sys/kernel/osrelease", &format!("{r}\n"))?;
        if !k.config.is_empty() {
            let mut text = format!(
                "{SAVED_CONFIG_HEADER}{}.\n",
                k.config_source.as_deref().unwrap_or("an unknown source")
            );
            for (name, state) in &k.config {
                text.push_str(&match state {
                    ConfigState::Off => format!("# {name} is not set\n"),
                    s => format!("{name}={s}\n"),
                });
            }
            write(&format!("boot/config-{r}"), &text)?;
        }
    }
    if let Some(c) = &k.cmdline {
        write("proc/cmdline", &format!("{c}\n"))?;
    }
    for (g, t) in &k.iommu_groups {
        write(
            &format!("sys/kernel/iommu_groups/{g}/type"),
            &format!("{t}\n"),
        )?;
    }
    Ok(())
}

/// Writes a snapshot into the directory `to` all or nothing: `write` fills a fresh
/// directory beside it, which then takes `to`'s place by rename, so a failure leaves
/// `to` as it was and no reader ever sees half a snapshot. A `to` that exists must be
/// an empty directory, or, with `force`, a directory that is replaced whole (never
/// merged with what it held). Returns what `write` returned.
pub fn save_into(
    to: &Path,
    force: bool,
    write: impl FnOnce(&Path) -> Result<usize, FabricError>,
) -> Result<usize, FabricError> {
    let refuse = |reason: String| FabricError::Sysfs {
        path: to.to_path_buf(),
        reason,
    };
    let existing = match fs::symlink_metadata(to) {
        Ok(m) if !m.is_dir() => return Err(refuse("exists and is not a directory".into())),
        Ok(_) => {
            let empty = fs::read_dir(to)
                .map_err(|e| FabricError::io(to, e))?
                .next()
                .is_none();
            if !empty && !force {
                return Err(refuse(
                    "is not empty: a snapshot is never mixed with other files (--force \
                     replaces the directory whole)"
                        .into(),
                ));
            }
            true
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(FabricError::io(to, e)),
    };
    let name = to
        .file_name()
        .ok_or_else(|| refuse("names no directory".into()))?
        .to_string_lossy()
        .into_owned();
    let parent = match to.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => Path::new(".").to_path_buf(),
    };
    let tmp = parent.join(format!(".{name}.peerdma-{}.tmp", std::process::id()));
    let old = parent.join(format!(".{name}.peerdma-{}.old", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    let written = fs::create_dir(&tmp)
        .map_err(|e| FabricError::io(&tmp, e))
        .and_then(|()| write(&tmp));
    let n = match written {
        Ok(n) => n,
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    if existing {
        if let Err(e) = fs::rename(to, &old) {
            let _ = fs::remove_dir_all(&tmp);
            return Err(FabricError::io(to, e));
        }
    }
    if let Err(e) = fs::rename(&tmp, to) {
        // Put the old directory back; the new snapshot is dropped.
        if existing {
            let _ = fs::rename(&old, to);
        }
        let _ = fs::remove_dir_all(&tmp);
        return Err(FabricError::io(to, e));
    }
    if existing {
        let _ = fs::remove_dir_all(&old);
    }
    Ok(n)
}

/// Writes a snapshot of the machine at `from` (normally `/`) into `to`, with exactly
/// the files [`read`] uses, so `read(to)` gives the same topology.
pub fn save(from: &Path, to: &Path) -> Result<usize, FabricError> {
    let devices = from.join("sys/bus/pci/devices");
    let sys_devices = canonical(&from.join("sys/devices"))?;
    let out_bus = to.join("sys/bus/pci/devices");
    mkdir(&out_bus)?;
    let mut groups = BTreeSet::new();
    let mut count = 0;
    let rd = fs::read_dir(&devices).map_err(|e| FabricError::io(&devices, e))?;
    for e in rd {
        let e = e.map_err(|e| FabricError::io(&devices, e))?;
        let name = e.file_name();
        let dir = canonical(&e.path())?;
        let rel = dir
            .strip_prefix(&sys_devices)
            .map_err(|_| FabricError::sysfs(e.path(), "links outside sys/devices"))?
            .to_path_buf();
        let out_dir = to.join("sys/devices").join(&rel);
        mkdir(&out_dir)?;
        for a in ATTRIBUTES {
            let src = dir.join(a);
            match fs::read(&src) {
                Ok(bytes) => fs::write(out_dir.join(a), bytes)
                    .map_err(|e| FabricError::io(out_dir.join(a), e))?,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                // Some attributes (config beyond what we may read) fail for non-root.
                Err(err) if err.kind() == std::io::ErrorKind::PermissionDenied => {}
                Err(err) => return Err(FabricError::io(src, err)),
            }
        }
        let mut extra: Vec<String> = ["size", "available", "published"]
            .iter()
            .map(|a| format!("p2pmem/{a}"))
            .collect();
        if let Ok(rd) = fs::read_dir(dir.join("nvme")) {
            extra.extend(
                rd.flatten()
                    .map(|e| format!("nvme/{}/cmb", e.file_name().to_string_lossy())),
            );
        }
        for a in extra {
            if let Ok(bytes) = fs::read(dir.join(&a)) {
                let out = out_dir.join(&a);
                if let Some(d) = out.parent() {
                    mkdir(d)?;
                }
                fs::write(&out, bytes).map_err(|e| FabricError::io(&out, e))?;
            }
        }
        let group = fs::read_link(dir.join("iommu_group"))
            .ok()
            .and_then(|t| t.file_name().map(|g| g.to_string_lossy().into_owned()));
        link_device(to, &rel, &name.to_string_lossy(), group.as_deref())?;
        groups.extend(group);
        count += 1;
    }
    // Root buses with no function of their own still name a host bridge.
    if let Ok(rd) = fs::read_dir(&sys_devices) {
        for e in rd.flatten() {
            if e.file_name().to_str().and_then(host_bridge_name).is_some() {
                mkdir(&to.join("sys/devices").join(e.file_name()))?;
            }
        }
    }
    let from_groups = from.join("sys/kernel/iommu_groups");
    if from_groups.is_dir() {
        for g in &groups {
            mkdir(&to.join("sys/kernel/iommu_groups").join(g))?;
        }
        mkdir(&to.join("sys/kernel/iommu_groups"))?;
    }
    write_kernel(&read_kernel(from).0, to)?;
    let cpuinfo = from.join("proc/cpuinfo");
    if let Ok(text) = fs::read_to_string(&cpuinfo) {
        // The first processor's block is all the reader uses.
        let first: String = text
            .lines()
            .take_while(|l| !l.trim().is_empty())
            .map(|l| format!("{l}\n"))
            .collect();
        mkdir(&to.join("proc"))?;
        fs::write(to.join("proc/cpuinfo"), first)
            .map_err(|e| FabricError::io(to.join("proc/cpuinfo"), e))?;
    }
    Ok(count)
}

/// Writes `topo` as a sysfs snapshot under `to`, the layout [`read`] expects, with
/// config-space images that carry each function's bus range, port type and ACS state.
/// Reading it back gives the same functions (kinds the images cannot state are
/// re-inferred from the tree, as for any snapshot).
pub fn write_snapshot(topo: &Topology, to: &Path) -> Result<usize, FabricError> {
    let out_bus = to.join("sys/bus/pci/devices");
    mkdir(&out_bus)?;
    for h in topo.host_bridges() {
        mkdir(&to.join(format!("sys/devices/pci{}", h.root)))?;
    }
    let mut groups = BTreeSet::new();
    for id in topo.ids() {
        let f = topo.function(id);
        let mut rel = PathBuf::new();
        for p in topo.upstream_path(id).iter().rev() {
            rel.push(topo.function(*p).bdf.to_string());
        }
        let root = topo.host_bridges()[topo.host_bridge_of(id)].root;
        let rel = PathBuf::from(format!("pci{root}")).join(rel);
        let dir = to.join("sys/devices").join(&rel);
        mkdir(&dir)?;
        let write = |name: &str, bytes: &[u8]| {
            fs::write(dir.join(name), bytes).map_err(|e| FabricError::io(dir.join(name), e))
        };
        write("vendor", format!("{:#06x}\n", f.vendor).as_bytes())?;
        write("device", format!("{:#06x}\n", f.device).as_bytes())?;
        write("class", format!("{:#08x}\n", f.class).as_bytes())?;
        if let Some((v, d)) = f.subsystem {
            write("subsystem_vendor", format!("{v:#06x}\n").as_bytes())?;
            write("subsystem_device", format!("{d:#06x}\n").as_bytes())?;
        }
        let pcie = (f.kind != PortKind::HostBridge).then_some(f.kind);
        write(
            "config",
            &config::encode(f.vendor, f.device, f.class, f.buses, pcie, f.acs),
        )?;
        let mut resource = String::new();
        for i in 0..6u8 {
            match f.bars.iter().find(|b| b.index == i) {
                Some(b) => {
                    let mut flags = if b.io { IORESOURCE_IO } else { IORESOURCE_MEM };
                    if b.prefetchable {
                        flags |= IORESOURCE_PREFETCH;
                    }
                    if b.is_64bit {
                        flags |= IORESOURCE_MEM_64;
                    }
                    let end = b.cpu.raw() + b.size.saturating_sub(1);
                    resource += &format!("{:#018x} {end:#018x} {flags:#018x}\n", b.cpu.raw());
                }
                None => resource += &format!("{0:#018x} {0:#018x} {0:#018x}\n", 0),
            }
        }
        write("resource", resource.as_bytes())?;
        // As the kernel does, a function inherits its host bridge's node: a host
        // bridge's node that only the bridge states survives the round trip.
        let numa = topo
            .numa_node(id)
            .map_or("-1".to_string(), |n| n.to_string());
        write("numa_node", format!("{numa}\n").as_bytes())?;
        if let Some(m) = f.memory {
            write("mem_info_vram_total", format!("{m}\n").as_bytes())?;
        }
        if let Some(l) = f.link {
            write(
                "current_link_speed",
                format!("{} PCIe\n", l.speed).as_bytes(),
            )?;
            write("current_link_width", format!("{}\n", l.width).as_bytes())?;
            write(
                "max_link_speed",
                format!("{} PCIe\n", l.max_speed).as_bytes(),
            )?;
            write("max_link_width", format!("{}\n", l.max_width).as_bytes())?;
        }
        if let Some(p) = f.p2pmem {
            mkdir(&dir.join("p2pmem"))?;
            write("p2pmem/size", format!("{}\n", p.size).as_bytes())?;
            write("p2pmem/available", format!("{}\n", p.available).as_bytes())?;
            write(
                "p2pmem/published",
                format!("{}\n", u8::from(p.published)).as_bytes(),
            )?;
        }
        if let Some(c) = f.nvme_cmb {
            mkdir(&dir.join("nvme/nvme0"))?;
            write(
                "nvme/nvme0/cmb",
                format!("cmbloc : {:#010x}\ncmbsz  : {:#010x}\n", c.cmbloc, c.cmbsz).as_bytes(),
            )?;
        }
        let group = f.iommu_group.map(|g| g.to_string());
        link_device(to, &rel, &f.bdf.to_string(), group.as_deref())?;
        groups.extend(group);
    }
    if topo.host().iommu.is_some() || !groups.is_empty() {
        mkdir(&to.join("sys/kernel/iommu_groups"))?;
        for g in groups {
            mkdir(&to.join(format!("sys/kernel/iommu_groups/{g}")))?;
        }
    }
    let host = topo.host();
    write_kernel(&host.kernel, to)?;
    if host.cpu_vendor.is_some() || host.cpu_family.is_some() {
        let mut cpuinfo = String::from("processor\t: 0\n");
        if let Some(v) = &host.cpu_vendor {
            cpuinfo += &format!("vendor_id\t: {v}\n");
        }
        if let Some(f) = host.cpu_family {
            cpuinfo += &format!("cpu family\t: {f}\n");
        }
        mkdir(&to.join("proc"))?;
        fs::write(to.join("proc/cpuinfo"), cpuinfo)
            .map_err(|e| FabricError::io(to.join("proc/cpuinfo"), e))?;
    }
    Ok(topo.functions().len())
}

/// Links a device directory `sys/devices/<rel>` of the snapshot at `to` into
/// `sys/bus/pci/devices/<name>` and, when it has one, to its IOMMU group.
fn link_device(to: &Path, rel: &Path, name: &str, group: Option<&str>) -> Result<(), FabricError> {
    if let Some(g) = group {
        // From sys/devices/<rel> back up to sys/.
        let up = "../".repeat(rel.components().count() + 1);
        symlink(
            &format!("{up}kernel/iommu_groups/{g}"),
            &to.join("sys/devices").join(rel).join("iommu_group"),
        )?;
    }
    symlink(
        &format!("../../../devices/{}", rel.display()),
        &to.join("sys/bus/pci/devices").join(name),
    )
}

fn mkdir(p: &Path) -> Result<(), FabricError> {
    fs::create_dir_all(p).map_err(|e| FabricError::io(p, e))
}

fn symlink(target: &str, link: &Path) -> Result<(), FabricError> {
    std::os::unix::fs::symlink(target, link).map_err(|e| FabricError::io(link, e))
}
