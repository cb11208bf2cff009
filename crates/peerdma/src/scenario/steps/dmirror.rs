//! The HMM test device (lib/test_hmm.c's dmirror): `device NAME dmirror
//! [memory=private|coherent]`, and its commands, each on the calling process's mirror
//! (opened on first use): `dmirror.read`, `dmirror.write`, `dmirror.migrate_to_dev`,
//! `dmirror.migrate_to_sys`, `dmirror.exclusive`, `dmirror.check_exclusive`.

use crate::addr::{Bdf, PAGE_SIZE};
use crate::drivers::dmirror::{Counts, Dmirror, DmirrorDevice, DmirrorError, DmirrorMemory};
use crate::scenario::run::{Failure, Outcome, Runtime, StepResult, REMOVE_TIMEOUT};
use crate::scenario::steps::{buffer, per_proc, Data, DATA_PARAMS};
use crate::scenario::vocab::{
    ActorUse, Args, Dev, ModelDef, Param, StepDef, SymKind, Ty, Vocabulary,
};
use crate::sync::Arc;

fn attach(host: &crate::host::Host, a: &Args, _: Option<Bdf>) -> Result<Dev, String> {
    let memory = match a.word("memory", "private") {
        "coherent" => DmirrorMemory::Coherent,
        _ => DmirrorMemory::Private,
    };
    let chunk = a.num("chunk", 2 << 20);
    if chunk == 0 || !chunk.is_multiple_of(PAGE_SIZE) {
        return Err(format!("chunk {chunk:#x} is not a whole number of pages"));
    }
    let d = DmirrorDevice::new(host.phys(), memory, chunk);
    if let Some(max) = a.get("max_chunks").map(|_| a.num("max_chunks", 0)) {
        d.set_max_chunks(max as usize);
    }
    let (c, r) = (d.clone(), d.clone());
    Ok(Dev {
        bdf: None,
        dma: None,
        obj: d,
        counters: Box::new(move || vec![c.chunks().len() as u64]),
        remove: Box::new(move |_| r.release(REMOVE_TIMEOUT).map_err(|e| fail(&e))),
    })
}

fn fail(e: &DmirrorError) -> Failure {
    Failure::new(e.errno, e)
}

fn mirror(rt: &Runtime, dev: &str, proc: &str) -> Result<Arc<Dmirror>, Failure> {
    let d: Arc<DmirrorDevice> = rt.dev(dev)?;
    let mm = rt.proc(proc)?.mm.clone();
    per_proc(rt, dev, proc, || Ok(d.open(&mm)))
}

type Cmd = fn(
    &Dmirror,
    crate::addr::VirtAddr,
    u64,
    &mut [u8],
    Option<Data>,
    u64,
) -> Result<Counts, DmirrorError>;

/// Adds the model and its words.
pub fn register(v: &mut Vocabulary) {
    v.model(ModelDef {
        name: "dmirror",
        help: "lib/test_hmm.c's device: mirrors a process with hmm_range_fault, migrates to its own device memory",
        class: None,
        params: const { &[
            Param::opt("memory", Ty::Word(&["private", "coherent"]), "device-private or device-coherent memory (default private)"),
            Param::opt("chunk", Ty::Size, "bytes per device memory chunk (default 2M)"),
            Param::opt("max_chunks", Ty::Count, "at most this many chunks (device memory exhaustion)"),
        ] },
        counters: &["chunks"],
        spec: None,
        attach,
        check: None,
    });
    let cmds: [(&'static str, &'static str, bool, bool); 6] = [
        (
            "dmirror.read",
            "HMM_DMIRROR_READ: the device reads the range through its mirror, faulting what it lacks",
            true,
            false,
        ),
        (
            "dmirror.write",
            "HMM_DMIRROR_WRITE: the device writes pattern= or fill= through its mirror, faulting for write",
            false,
            true,
        ),
        (
            "dmirror.migrate_to_dev",
            "HMM_DMIRROR_MIGRATE_TO_DEV: moves the range into device memory, then reads it (ENOENT when a page did not move)",
            true,
            false,
        ),
        (
            "dmirror.migrate_to_sys",
            "HMM_DMIRROR_MIGRATE_TO_SYS: moves this device's pages of the range back to system RAM",
            false,
            false,
        ),
        (
            "dmirror.exclusive",
            "HMM_DMIRROR_EXCLUSIVE: takes the range for exclusive device access (make_device_exclusive)",
            true,
            false,
        ),
        (
            "dmirror.check_exclusive",
            "HMM_DMIRROR_CHECK_EXCLUSIVE: EPERM unless every page is still held exclusively",
            false,
            false,
        ),
    ];
    for (verb, help, reads, writes) in cmds {
        let params: &'static [Param] = if writes {
            const {
                &[
                    Param::req("dev", Ty::Ref(SymKind::Device("dmirror")), "the device"),
                    Param::req("at", Ty::Place, "REGION or REGION+OFFSET, page aligned"),
                    Param::req("len", Ty::Size, "bytes, whole pages"),
                    DATA_PARAMS[0],
                    DATA_PARAMS[1],
                ]
            }
        } else {
            const {
                &[
                    Param::req("dev", Ty::Ref(SymKind::Device("dmirror")), "the device"),
                    Param::req("at", Ty::Place, "REGION or REGION+OFFSET, page aligned"),
                    Param::req("len", Ty::Size, "bytes, whole pages"),
                ]
            }
        };
        v.step(StepDef {
            verb,
            help,
            actor: ActorUse::Required,
            binds: None,
            params,
            outputs: &["pages", "faults"],
            data: reads,
            compile: match (reads, writes) {
                (true, _) => compile_cmd::<true, false>,
                (_, true) => compile_cmd::<false, true>,
                _ => compile_cmd::<false, false>,
            },
        });
    }
}

fn cmd_of(verb: &str) -> Option<Cmd> {
    Some(match verb {
        "dmirror.read" => |m, va, n, out, _, _| m.read(va, n, out),
        "dmirror.write" => |m, va, n, _, d, base| {
            let bytes = match d {
                Some(d) => d.bytes(base, n * PAGE_SIZE).map_err(|f| DmirrorError {
                    cmd: "WRITE",
                    errno: f.errno.unwrap_or(crate::errno::Errno::ENOMEM),
                    why: f.message,
                })?,
                None => Vec::new(),
            };
            m.write(va, n, &bytes)
        },
        "dmirror.migrate_to_dev" => |m, va, n, out, _, _| m.migrate_to_dev(va, n, out),
        "dmirror.migrate_to_sys" => |m, va, n, _, _, _| m.migrate_to_sys(va, n),
        "dmirror.exclusive" => |m, va, n, out, _, _| m.exclusive(va, n, out),
        "dmirror.check_exclusive" => |m, va, n, _, _, _| m.check_exclusive(va, n),
        _ => return None,
    })
}

fn compile_cmd<const READS: bool, const WRITES: bool>(
    cx: &mut crate::scenario::vocab::Compile<'_>,
) -> Result<crate::scenario::vocab::StepFn, crate::scenario::lang::Diag> {
    let data = if WRITES {
        Some(Data::from_call(cx)?)
    } else {
        None
    };
    let cmd =
        cmd_of(&cx.verb.text).ok_or_else(|| cx.err("dev", "unknown dmirror command", None))?;
    let ((p, at, len), dev) = (crate::scenario::steps::range_args(cx), cx.args.name("dev"));
    if !len.is_multiple_of(PAGE_SIZE) || len == 0 {
        return Err(cx.err("len", "dmirror commands move whole pages", None));
    }
    Ok(Box::new(move |rt| -> StepResult {
        let m = mirror(rt, &dev, &p)?;
        let va = rt.at(&at, len)?;
        let mut out = if READS { buffer(len)? } else { Vec::new() };
        let c = cmd(&m, va, len / PAGE_SIZE, &mut out, data, at.1).map_err(|e| fail(&e))?;
        Ok(Outcome {
            values: vec![c.cpages, c.faults],
            data: READS.then_some((out, at.1)),
        })
    }))
}
