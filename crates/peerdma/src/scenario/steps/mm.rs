//! Processes and their memory: `process`, `fork`, `exit`, `file`, `mmap`, `munmap`,
//! `mprotect`, `madvise`, `read`, `write`, and the generic `release` and `remove`.

use crate::errno::Errno;
use crate::mm::{Prot, ShmObject};
use crate::scenario::run::{Failure, Outcome, RegionRef};
use crate::scenario::steps::{buffer, proc_at, range_args, read_outcome, Data, DATA_PARAMS};
use crate::scenario::vocab::{ActorUse, Param, StepDef, SymKind, Ty, Vocabulary};
use crate::sync::Arc;

const PROTS: &[&str] = &["rw", "r", "w", "none"];

fn prot(w: &str) -> Prot {
    match w {
        "rw" => Prot::RW,
        "r" => Prot::READ,
        "w" => Prot::WRITE,
        _ => Prot::NONE,
    }
}

/// One file-backed object, shared by every process that maps it.
#[derive(Clone)]
struct FileObj(Arc<ShmObject>);

/// Adds the words.
pub fn register(v: &mut Vocabulary) {
    v.step(StepDef {
        verb: "process",
        help: "starts a process with an empty address space",
        actor: ActorUse::None,
        binds: None,
        params: const { &[Param::req("name", Ty::New(SymKind::Process), "its name")] },
        outputs: &[],
        data: false,
        compile: |cx| {
            let name = cx.args.name("name");
            Ok(Box::new(move |rt| {
                rt.add_proc(&name, rt.host.spawn());
                Ok(Outcome::default())
            }))
        },
    });
    v.step(StepDef {
        verb: "fork",
        help: "fork(): the child gets a copy-on-write copy of the address space; pinned anonymous pages are copied at once (the parent keeps them)",
        actor: ActorUse::Required,
        binds: Some(SymKind::Process),
        params: const { &[] },
        outputs: &[],
        data: false,
        compile: |cx| {
            let (parent, child) = (cx.actor.clone().unwrap_or_default(), cx.bind.clone().unwrap_or_default());
            Ok(Box::new(move |rt| {
                let c = rt.proc(&parent)?.fork()?;
                rt.add_proc(&child, c);
                Ok(Outcome::default())
            }))
        },
    });
    v.step(StepDef {
        verb: "exit",
        help: "exit(): closes every descriptor and unmaps everything; pins others hold keep their pages",
        actor: ActorUse::Required,
        binds: None,
        params: const { &[] },
        outputs: &[],
        data: false,
        compile: |cx| {
            let p = cx.actor.clone().unwrap_or_default();
            cx.retire(&p, "exited");
            Ok(Box::new(move |rt| {
                if let Some(s) = rt.drop_proc(&p) {
                    s.exit();
                }
                Ok(Outcome::default())
            }))
        },
    });
    v.step(StepDef {
        verb: "file",
        help: "a file (or memfd) of LEN bytes, zeroed unless pattern= or fill= is given, that processes may mmap",
        actor: ActorUse::None,
        binds: Some(SymKind::Handle("file")),
        params: const { &[
            Param::req("len", Ty::Size, "its size"),
            DATA_PARAMS[0],
            DATA_PARAMS[1],
        ] },
        outputs: &[],
        data: false,
        compile: |cx| {
            let name = cx.bind.clone().unwrap_or_default();
            let len = cx.args.num("len", 0);
            let data = Data::from_call(cx).ok();
            Ok(Box::new(move |rt| {
                let obj = ShmObject::new(rt.host.phys(), len);
                if let Some(d) = data {
                    obj.pwrite(0, &d.bytes(0, len)?)
                        .map_err(|e| crate::fail!(e))?;
                }
                rt.put(&name, FileObj(obj));
                Ok(Outcome::default())
            }))
        },
    });
    v.step(StepDef {
        verb: "mmap",
        help: "mmap(): anon (private anonymous), shared (shared anonymous), file / shared_file (private / shared mapping of file=), p2pmem (the p2pmem allocate file of dev=), dmabuf (a dma-buf descriptor of this process, dmabuf=)",
        actor: ActorUse::Required,
        binds: Some(SymKind::Region),
        params: const { &[
            Param::req(
                "kind",
                Ty::Word(&["anon", "shared", "file", "shared_file", "p2pmem", "dmabuf"]),
                "what is mapped",
            ),
            Param::req("len", Ty::Size, "bytes"),
            Param::opt("prot", Ty::Word(PROTS), "protection (default rw)"),
            Param::opt("file", Ty::Ref(SymKind::Handle("file")), "the file, for file and shared_file"),
            Param::opt("pgoff", Ty::Count, "first page of the file"),
            Param::opt("dev", Ty::Ref(SymKind::Device("any")), "the device, for p2pmem"),
            Param::opt(
                "dmabuf",
                Ty::Ref(SymKind::Handle("dmabuf")),
                "the descriptor, for dmabuf",
            ),
        ] },
        outputs: &[],
        data: false,
        compile: |cx| {
            let kind = cx.args.word("kind", "anon");
            let needs_file = matches!(kind, "file" | "shared_file");
            if needs_file != cx.args.get("file").is_some() {
                return Err(cx.err(
                    if needs_file { "kind" } else { "file" },
                    if needs_file {
                        format!("mmap {kind} needs file=NAME")
                    } else {
                        format!("mmap {kind} maps no file")
                    },
                    None,
                ));
            }
            if (kind == "dmabuf") != cx.args.get("dmabuf").is_some() {
                return Err(cx.err(
                    if kind == "dmabuf" { "kind" } else { "dmabuf" },
                    "dmabuf= names the descriptor mmap dmabuf maps (and only that)",
                    None,
                ));
            }
            if (kind == "p2pmem") != cx.args.get("dev").is_some() {
                return Err(cx.err(
                    if kind == "p2pmem" { "kind" } else { "dev" },
                    "dev= names the device whose p2p memory mmap p2pmem maps (and only that)",
                    None,
                ));
            }
            let (p, region) = (cx.actor.clone().unwrap_or_default(), cx.bind.clone().unwrap_or_default());
            let (len, prot) = (cx.args.num("len", 0), prot(cx.args.word("prot", "rw")));
            let (file, pgoff, dev) = (cx.args.name("file"), cx.args.num("pgoff", 0), cx.args.name("dev"));
            let dmabuf = cx.args.name("dmabuf");
            Ok(Box::new(move |rt| {
                let mm = rt.proc(&p)?.mm.clone();
                let va = match kind {
                    "anon" => mm.mmap_anon(len, prot).map_err(|e| crate::fail!(e))?,
                    "shared" => {
                        let obj = ShmObject::new(rt.host.phys(), len);
                        mm.mmap_shared(&obj, 0, len, prot).map_err(|e| crate::fail!(e))?
                    }
                    "file" | "shared_file" => {
                        let FileObj(obj) = rt.get::<FileObj>(&file)?;
                        if kind == "file" {
                            mm.mmap_private_file(&obj, pgoff, len, prot)
                        } else {
                            mm.mmap_shared(&obj, pgoff, len, prot)
                        }
                        .map_err(|e| crate::fail!(e))?
                    }
                    "dmabuf" => {
                        let fd = crate::scenario::steps::gpu::dmabuf_fd(rt, &dmabuf)?;
                        let files = rt.proc(&p)?.files.clone();
                        let buf = files.dma_buf(fd).map_err(|e| crate::fail!(e))?;
                        buf.mmap(&mm, 0, len, prot).map_err(|e| crate::fail!(e))?
                    }
                    _ => {
                        let (bdf, _) = rt.dev_dma(&dev)?;
                        let provider = rt
                            .host
                            .p2p()
                            .providers()
                            .into_iter()
                            .find(|pr| Some(pr.dev()) == bdf)
                            .ok_or_else(|| {
                                Failure::new(Errno::ENODEV, format!("`{dev}` provides no p2p memory"))
                            })?;
                        provider
                            .mmap(&mm, len, true, 0, prot)
                            .map_err(|e| crate::fail!(e))?
                    }
                };
                rt.add_region(&region, RegionRef { va, len });
                Ok(Outcome::default())
            }))
        },
    });
    const RANGE: [Param; 2] = [
        Param::req("at", Ty::Place, "REGION or REGION+OFFSET"),
        Param::req("len", Ty::Size, "bytes"),
    ];
    // munmap, mprotect and madvise: a range of the process and one system call on it.
    let calls: [(&'static str, &'static str, &'static [Param]); 3] = [
        (
            "munmap",
            "munmap(): pinned pages stay allocated until unpinned; ODP and mirrors are invalidated",
            const { &[RANGE[0], RANGE[1]] },
        ),
        (
            "mprotect",
            "mprotect(): changes protection; write-protecting invalidates writable device mappings",
            const {
                &[
                    RANGE[0],
                    RANGE[1],
                    Param::req("prot", Ty::Word(PROTS), "new protection"),
                ]
            },
        ),
        (
            "madvise",
            "madvise(MADV_DONTNEED): drops the pages (anonymous memory reads as zero afterwards)",
            const {
                &[
                    RANGE[0],
                    RANGE[1],
                    Param::req("advice", Ty::Word(&["dontneed"]), "the advice"),
                ]
            },
        ),
    ];
    for (verb, help, params) in calls {
        v.step(StepDef {
            verb,
            help,
            actor: ActorUse::Required,
            binds: None,
            params,
            outputs: &[],
            data: false,
            compile: compile_range_call,
        });
    }
    v.step(StepDef {
        verb: "read",
        help: "the CPU reads LEN bytes (faulting pages in, bringing device-private pages home)",
        actor: ActorUse::Required,
        binds: None,
        params: const { &[RANGE[0], RANGE[1]] },
        outputs: &[],
        data: true,
        compile: |cx| {
            let (p, at, len) = range_args(cx);
            Ok(Box::new(move |rt| {
                let (mm, va) = proc_at(rt, &p, &at, len)?;
                let mut buf = buffer(len)?;
                mm.read(va, &mut buf).map_err(|e| crate::fail!(e))?;
                read_outcome(vec![], buf, at.1)
            }))
        },
    });
    v.step(StepDef {
        verb: "write",
        help: "the CPU writes LEN bytes of pattern= or fill= (breaking copy-on-write, invalidating device mappings)",
        actor: ActorUse::Required,
        binds: None,
        params: const { &[RANGE[0], RANGE[1], DATA_PARAMS[0], DATA_PARAMS[1]] },
        outputs: &[],
        data: false,
        compile: |cx| {
            let data = Data::from_call(cx)?;
            let (p, at, len) = range_args(cx);
            Ok(Box::new(move |rt| {
                let (mm, va) = proc_at(rt, &p, &at, len)?;
                let bytes = data.bytes(at.1, len)?;
                mm.write(va, &bytes).map_err(|e| crate::fail!(e))?;
                Ok(Outcome::default())
            }))
        },
    });
    v.step(StepDef {
        verb: "pages",
        help: "where the range's pages are now, from the page table (no fault): counts by kind",
        actor: ActorUse::Required,
        binds: None,
        params: const { &[RANGE[0], RANGE[1]] },
        outputs: &[
            "absent",
            "ram",
            "zero",
            "device_private",
            "device_coherent",
            "p2p",
            "writable",
        ],
        data: false,
        compile: |cx| {
            let (p, at, len) = range_args(cx);
            Ok(Box::new(move |rt| {
                use crate::mem::RegionKind;
                let (mm, va) = proc_at(rt, &p, &at, len)?;
                let mut c = [0u64; 7];
                let first = va.0 & !(crate::addr::PAGE_SIZE - 1);
                let mut a = first;
                while a < va.0 + len {
                    let pte = mm.pte(crate::addr::VirtAddr(a));
                    let kind = pte.pfn().and_then(|pfn| {
                        if crate::mem::is_zero_pfn(pfn) {
                            return Some(2);
                        }
                        Some(match rt.host.phys().region(pfn)?.kind() {
                            RegionKind::SystemRam => 1,
                            RegionKind::DevicePrivate { .. } => 3,
                            RegionKind::DeviceCoherent { .. } => 4,
                            RegionKind::P2p { .. } => 5,
                        })
                    });
                    c[kind.unwrap_or(0)] += 1;
                    if pte.writable() {
                        c[6] += 1;
                    }
                    a += crate::addr::PAGE_SIZE;
                }
                Ok(Outcome::values(c.to_vec()))
            }))
        },
    });
    v.step(StepDef {
        verb: "release",
        help: "drops a handle: unpins a pin, unmaps a DMA mapping, closes a file, deregisters",
        actor: ActorUse::None,
        binds: None,
        params: const {
            &[Param::req(
                "handle",
                Ty::Ref(SymKind::Handle("any")),
                "the handle",
            )]
        },
        outputs: &[],
        data: false,
        compile: |cx| {
            let h = cx.args.name("handle");
            cx.retire(&h, "released");
            Ok(Box::new(move |rt| {
                rt.release(&h)?;
                Ok(Outcome::default())
            }))
        },
    });
    v.step(StepDef {
        verb: "remove",
        help: "hot-removes a device: its p2p memory is revoked from every user, waiting for DMA in flight; later use is ENODEV",
        actor: ActorUse::None,
        binds: None,
        params: const { &[Param::req("dev", Ty::Ref(SymKind::Device("any")), "the device")] },
        outputs: &[],
        data: false,
        compile: |cx| {
            let d = cx.args.name("dev");
            cx.retire(&d, "removed");
            Ok(Box::new(move |rt| {
                rt.remove_dev(&d)?;
                Ok(Outcome::default())
            }))
        },
    });
}

/// munmap, mprotect or madvise on `P: VERB AT LEN ...`.
fn compile_range_call(
    cx: &mut crate::scenario::vocab::Compile<'_>,
) -> Result<crate::scenario::vocab::StepFn, crate::scenario::lang::Diag> {
    let (p, at, len) = range_args(cx);
    let pr = prot(cx.args.word("prot", "rw"));
    let verb = cx.verb.text.clone();
    Ok(Box::new(move |rt| {
        let (mm, va) = proc_at(rt, &p, &at, len)?;
        match verb.as_str() {
            "munmap" => mm.munmap(va, len),
            "mprotect" => mm.mprotect(va, len, pr),
            _ => mm.madvise_dontneed(va, len),
        }
        .map_err(|e| crate::fail!(e))?;
        Ok(Outcome::default())
    }))
}
