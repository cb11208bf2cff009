//! The GPU model: `device NAME gpu [vram=]`, and GPU work on the calling process's
//! unified memory through its context (opened on first use): `gpu.placement`,
//! `gpu.prefetch`, `gpu.fill`, `gpu.read`, `gpu.write`, `gpu.copy`, `gpu.add`, and
//! `gpu.evict` (all of VRAM back to system RAM).

use crate::addr::{Bdf, VirtAddr};
use crate::drivers::gpu::{Gpu, GpuContext, GpuSpec, Location, Placement};
use crate::fabric::{DeviceClass, Topology};
use crate::scenario::lang::Diag;
use crate::scenario::run::{Failure, Outcome, Runtime, StepResult};
use crate::scenario::steps::{
    buffer, pci_dev, per_proc, range_args, read_outcome, Data, DATA_PARAMS,
};
use crate::scenario::vocab::{
    ActorUse, Args, Compile, Dev, ModelDef, Param, StepDef, StepFn, SymKind, Ty, Vocabulary,
};
use crate::sync::Arc;

fn spec(topo: &Topology, a: &Args, bdf: Bdf) -> crate::host::DeviceSpec {
    let stated = topo
        .functions()
        .iter()
        .find(|f| f.bdf == bdf)
        .and_then(|f| f.memory);
    GpuSpec {
        bdf,
        vram_bytes: a
            .get("vram")
            .map(|_| a.num("vram", 0))
            .or(stated)
            .unwrap_or(64 << 20),
    }
    .into()
}

fn attach(host: &crate::host::Host, _: &Args, bdf: Option<Bdf>) -> Result<Dev, String> {
    pci_dev::<Gpu>(host, bdf, Gpu::dma, |g| {
        let s = g.stats();
        let (_, used, _) = g.vram_bytes();
        vec![
            s.faults,
            s.migrated_to_vram,
            s.remote_mapped,
            s.migrated_to_ram,
            s.evicted,
            s.vram_full,
            s.bo_evicted,
            s.bo_restored,
            s.ce_bytes,
            used,
        ]
    })
}

fn context(rt: &Runtime, dev: &str, proc: &str) -> Result<Arc<GpuContext>, Failure> {
    let g: Arc<Gpu> = rt.dev(dev)?;
    let mm = rt.proc(proc)?.mm.clone();
    per_proc(rt, dev, proc, || Ok(g.open(&mm)))
}

const DEV: Param = Param::req("dev", Ty::Ref(SymKind::Device("gpu")), "the GPU");
const AT: Param = Param::req("at", Ty::Place, "REGION or REGION+OFFSET");
const LEN: Param = Param::req("len", Ty::Size, "bytes");

/// What a GPU range step does, given its context, address and length.
type RangeOp = fn(&GpuContext, VirtAddr, u64, &Args, u64) -> StepResult;

fn range_step(cx: &mut Compile<'_>, op: RangeOp) -> Result<StepFn, Diag> {
    let ((p, at, len), dev) = (range_args(cx), cx.args.name("dev"));
    let args = cx.args.clone();
    Ok(Box::new(move |rt| {
        let ctx = context(rt, &dev, &p)?;
        let va = rt.at(&at, len)?;
        op(&ctx, va, len, &args, at.1)
    }))
}

fn gpu_err(e: crate::drivers::gpu::GpuError) -> Failure {
    crate::fail!(e)
}

/// Adds the model and its words.
pub fn register(v: &mut Vocabulary) {
    v.model(ModelDef {
        name: "gpu",
        help: "a GPU with VRAM as device-private memory (HMM), a copy engine and buffer objects",
        class: Some(DeviceClass::Gpu),
        params: const {
            &[Param::opt(
                "vram",
                Ty::Size,
                "VRAM bytes (default: what the machine states, else 64M)",
            )]
        },
        counters: &[
            "faults",
            "migrated_to_vram",
            "remote_mapped",
            "migrated_to_ram",
            "evicted",
            "vram_full",
            "bo_evicted",
            "bo_restored",
            "ce_bytes",
            "vram_used",
        ],
        spec: Some(spec),
        attach,
        check: None,
    });
    v.step(StepDef {
        verb: "gpu.placement",
        help: "where GPU touches put the range's pages: migrate (into VRAM on first touch) or remote (stay in RAM)",
        actor: ActorUse::Required,
        binds: None,
        params: const { &[DEV, AT, LEN, Param::req("to", Ty::Word(&["migrate", "remote"]), "the placement")] },
        outputs: &[],
        data: false,
        compile: |cx| {
            range_step(cx, |ctx, va, len, a, _| {
                let p = if a.word("to", "migrate") == "remote" {
                    Placement::Remote
                } else {
                    Placement::MigrateOnTouch
                };
                ctx.set_placement(va, len, p).map_err(gpu_err)?;
                Ok(Outcome::default())
            })
        },
    });
    v.step(StepDef {
        verb: "gpu.prefetch",
        help: "moves the range's pages to VRAM or back to RAM now (cudaMemPrefetchAsync)",
        actor: ActorUse::Required,
        binds: None,
        params: const {
            &[
                DEV,
                AT,
                LEN,
                Param::req("to", Ty::Word(&["vram", "ram"]), "where to"),
            ]
        },
        outputs: &["pages"],
        data: false,
        compile: |cx| {
            range_step(cx, |ctx, va, len, a, _| {
                let to = if a.word("to", "vram") == "ram" {
                    Location::Ram
                } else {
                    Location::Vram
                };
                let n = ctx.prefetch(va, len, to).map_err(gpu_err)?;
                Ok(Outcome::values(vec![n]))
            })
        },
    });
    v.step(StepDef {
        verb: "gpu.fill",
        help: "a GPU kernel writes one byte over the range",
        actor: ActorUse::Required,
        binds: None,
        params: const { &[DEV, AT, LEN, Param::req("byte", Ty::Byte, "the byte")] },
        outputs: &[],
        data: false,
        compile: |cx| {
            range_step(cx, |ctx, va, len, a, _| {
                ctx.fill(va, len, a.num("byte", 0) as u8).map_err(gpu_err)?;
                Ok(Outcome::default())
            })
        },
    });
    v.step(StepDef {
        verb: "gpu.read",
        help: "a GPU kernel loads the range",
        actor: ActorUse::Required,
        binds: None,
        params: const { &[DEV, AT, LEN] },
        outputs: &[],
        data: true,
        compile: |cx| {
            range_step(cx, |ctx, va, len, _, base| {
                let mut buf = buffer(len)?;
                ctx.load(va, &mut buf).map_err(gpu_err)?;
                read_outcome(vec![], buf, base)
            })
        },
    });
    v.step(StepDef {
        verb: "gpu.write",
        help: "a GPU kernel stores pattern= or fill= over the range",
        actor: ActorUse::Required,
        binds: None,
        params: const { &[DEV, AT, LEN, DATA_PARAMS[0], DATA_PARAMS[1]] },
        outputs: &[],
        data: false,
        compile: |cx| {
            let data = Data::from_call(cx)?;
            let ((p, at, len), dev) = (range_args(cx), cx.args.name("dev"));
            Ok(Box::new(move |rt| {
                let ctx = context(rt, &dev, &p)?;
                let va = rt.at(&at, len)?;
                ctx.store(va, &data.bytes(at.1, len)?).map_err(gpu_err)?;
                Ok(Outcome::default())
            }))
        },
    });
    v.step(StepDef {
        verb: "gpu.add",
        help: "a GPU kernel adds k to every 32-bit word of the range",
        actor: ActorUse::Required,
        binds: None,
        params: const { &[DEV, AT, LEN, Param::req("k", Ty::Count, "the addend")] },
        outputs: &[],
        data: false,
        compile: |cx| {
            range_step(cx, |ctx, va, len, a, _| {
                ctx.add_u32(va, len, a.num("k", 0) as u32)
                    .map_err(gpu_err)?;
                Ok(Outcome::default())
            })
        },
    });
    v.step(StepDef {
        verb: "gpu.copy",
        help: "a GPU kernel copies LEN bytes from src to dst within the process",
        actor: ActorUse::Required,
        binds: None,
        params: const {
            &[
                DEV,
                Param::req("dst", Ty::Place, "where to"),
                Param::req("src", Ty::Place, "where from"),
                LEN,
            ]
        },
        outputs: &[],
        data: false,
        compile: |cx| {
            let (p, dev, dst, src, len) = (
                cx.actor.clone().unwrap_or_default(),
                cx.args.name("dev"),
                cx.args.place("dst"),
                cx.args.place("src"),
                cx.args.num("len", 0),
            );
            Ok(Box::new(move |rt| {
                let ctx = context(rt, &dev, &p)?;
                let (d, s) = (rt.at(&dst, len)?, rt.at(&src, len)?);
                ctx.copy(d, s, len).map_err(gpu_err)?;
                Ok(Outcome::default())
            }))
        },
    });
    register_bo(v);
    v.step(StepDef {
        verb: "gpu.evict",
        help: "moves every VRAM page back to system RAM (migrate_device_range), as VRAM pressure or removal do",
        actor: ActorUse::None,
        binds: None,
        params: const { &[DEV] },
        outputs: &["moved", "refused"],
        data: false,
        compile: |cx| {
            let dev = cx.args.name("dev");
            Ok(Box::new(move |rt| {
                let g: Arc<Gpu> = rt.dev(&dev)?;
                let e = g.evict().map_err(|e| crate::fail!(e))?;
                Ok(Outcome::values(vec![e.moved, e.refused.len() as u64]))
            }))
        },
    });
}

/// A buffer object; dropping it frees the BO (EBUSY while a dma-buf of it lives, in
/// which case the teardown order — newest handle first — has already closed those).
struct Bo {
    gpu: Arc<Gpu>,
    h: crate::drivers::gpu::BoHandle,
}

impl Clone for Bo {
    fn clone(&self) -> Self {
        Bo {
            gpu: self.gpu.clone(),
            h: self.h,
        }
    }
}

/// The handle's owner: only the table's entry frees the BO.
struct BoOwner(Bo);

impl Drop for BoOwner {
    fn drop(&mut self) {
        let _ = self.0.gpu.bo_free(self.0.h);
    }
}

fn bo_of(rt: &Runtime, name: &str) -> Result<Bo, Failure> {
    rt.with_handle::<BoOwner, _>(name, |b| b.0.clone())
}

const BO: Param = Param::req("bo", Ty::Ref(SymKind::Handle("bo")), "the buffer object");

/// Adds the buffer-object and dma-buf words.
pub fn register_bo(v: &mut Vocabulary) {
    v.step(StepDef {
        verb: "gpu.bo_alloc",
        help: "allocates a buffer object in VRAM (a driver's GEM create)",
        actor: ActorUse::None,
        binds: Some(SymKind::Handle("bo")),
        params: &[DEV, LEN],
        outputs: &[],
        data: false,
        compile: |cx| {
            let (dev, len, name) = (
                cx.args.name("dev"),
                cx.args.num("len", 0),
                cx.bind.clone().unwrap_or_default(),
            );
            Ok(Box::new(move |rt| {
                let gpu: Arc<Gpu> = rt.dev(&dev)?;
                let h = gpu.bo_alloc(len).map_err(gpu_err)?;
                rt.put(&name, BoOwner(Bo { gpu, h }));
                Ok(Outcome::default())
            }))
        },
    });
    v.step(StepDef {
        verb: "gpu.bo_write",
        help: "the GPU writes pattern= or fill= into the buffer object (offsets from its start)",
        actor: ActorUse::None,
        binds: None,
        params: const {
            &[
                BO,
                LEN,
                Param::opt("offset", Ty::Size, "bytes into the BO (default 0)"),
                DATA_PARAMS[0],
                DATA_PARAMS[1],
            ]
        },
        outputs: &[],
        data: false,
        compile: |cx| {
            let data = Data::from_call(cx)?;
            let (bo, len, off) = (
                cx.args.name("bo"),
                cx.args.num("len", 0),
                cx.args.num("offset", 0),
            );
            Ok(Box::new(move |rt| {
                let b = bo_of(rt, &bo)?;
                b.gpu
                    .bo_write(b.h, off, &data.bytes(off, len)?)
                    .map_err(gpu_err)?;
                Ok(Outcome::default())
            }))
        },
    });
    v.step(StepDef {
        verb: "gpu.bo_read",
        help: "the GPU reads the buffer object, wherever it lives now",
        actor: ActorUse::None,
        binds: None,
        params: const {
            &[
                BO,
                LEN,
                Param::opt("offset", Ty::Size, "bytes into the BO (default 0)"),
            ]
        },
        outputs: &[],
        data: true,
        compile: |cx| {
            let (bo, len, off) = (
                cx.args.name("bo"),
                cx.args.num("len", 0),
                cx.args.num("offset", 0),
            );
            Ok(Box::new(move |rt| {
                let b = bo_of(rt, &bo)?;
                let mut buf = buffer(len)?;
                b.gpu.bo_read(b.h, off, &mut buf).map_err(gpu_err)?;
                read_outcome(vec![], buf, off)
            }))
        },
    });
    v.step(StepDef {
        verb: "gpu.bo_evict",
        help: "moves the buffer object to system RAM (TTM eviction): importers hear move_notify, waits for their fences; EBUSY while pinned",
        actor: ActorUse::None,
        binds: None,
        params: &[BO],
        outputs: &["moved"],
        data: false,
        compile: |cx| {
            let bo = cx.args.name("bo");
            Ok(Box::new(move |rt| {
                let b = bo_of(rt, &bo)?;
                let moved = b.gpu.bo_evict(b.h).map_err(gpu_err)?;
                Ok(Outcome::values(vec![u64::from(moved)]))
            }))
        },
    });
    v.step(StepDef {
        verb: "gpu.bo_validate",
        help: "brings the buffer object back into VRAM, as the GPU does before using it (ttm_bo_validate)",
        actor: ActorUse::None,
        binds: None,
        params: &[BO],
        outputs: &["in_vram"],
        data: false,
        compile: |cx| {
            let bo = cx.args.name("bo");
            Ok(Box::new(move |rt| {
                let b = bo_of(rt, &bo)?;
                let d = b.gpu.bo_validate(b.h).map_err(gpu_err)?;
                Ok(Outcome::values(vec![u64::from(
                    d == crate::drivers::gpu::BoDomain::Vram,
                )]))
            }))
        },
    });
    v.step(StepDef {
        verb: "gpu.bo_export",
        help: "exports the buffer object as a dma-buf into the process's descriptor table; p2p=move (amdgpu: a peer that cannot reach VRAM gets it moved to RAM) or refuse (xe: EOPNOTSUPP)",
        actor: ActorUse::Required,
        binds: Some(SymKind::Handle("dmabuf")),
        params: const {
            &[
                BO,
                Param::opt("p2p", Ty::Word(&["move", "refuse"]), "when a peer cannot reach VRAM (default move)"),
            ]
        },
        outputs: &["fd"],
        data: false,
        compile: |cx| {
            let (p, bo, name) = (
                cx.actor.clone().unwrap_or_default(),
                cx.args.name("bo"),
                cx.bind.clone().unwrap_or_default(),
            );
            let policy = if cx.args.word("p2p", "move") == "refuse" {
                crate::drivers::gpu::P2pPolicy::Refuse
            } else {
                crate::drivers::gpu::P2pPolicy::MoveToRam
            };
            Ok(Box::new(move |rt| {
                let b = bo_of(rt, &bo)?;
                let buf = b.gpu.bo_export(b.h, policy).map_err(gpu_err)?;
                let files = rt.proc(&p)?.files.clone();
                let fd = files.export_fd(&buf);
                rt.put(&name, DmaBufFdOwner { fd, files });
                Ok(Outcome::values(vec![fd as u64]))
            }))
        },
    });
}

/// A dma-buf descriptor installed in a process's table; releasing the handle closes
/// the fd there.
struct DmaBufFdOwner {
    fd: i32,
    files: Arc<crate::dmabuf::FdTable>,
}

impl Drop for DmaBufFdOwner {
    fn drop(&mut self) {
        // EBADF once the process exited (exit closed it): nothing left to do.
        let _ = self.files.close(self.fd);
    }
}

/// The fd of descriptor handle `name` (valid in the process that exported it and in
/// its children).
pub(crate) fn dmabuf_fd(rt: &Runtime, name: &str) -> Result<i32, Failure> {
    rt.with_handle::<DmaBufFdOwner, _>(name, |d| d.fd)
}
