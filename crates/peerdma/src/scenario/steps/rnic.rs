//! The RDMA NIC model: `device NAME rnic [odp=yes|no]`, memory registration
//! (`rnic.reg_mr`, pinned or on-demand), and one-sided RDMA between two processes'
//! MRs through a pair of connected RC QPs (`rnic.write`, `rnic.read`). Each process
//! gets a verbs context, a PD and a CQ per NIC on first use; a QP pair per pair of
//! processes.

use crate::addr::Bdf;
use crate::drivers::rnic::{
    Access, Context, Cq, Mr, Pd, Qp, QpState, Rnic, RnicCaps, RnicSpec, SendOp, SendWr, Sge,
    WcStatus,
};
use crate::errno::Errno;
use crate::fabric::{DeviceClass, Topology};
use crate::scenario::run::{Failure, Outcome, Runtime};
use crate::scenario::steps::{pci_dev, per_proc};
use crate::scenario::vocab::{
    ActorUse, Args, Dev, ModelDef, Param, StepDef, SymKind, Ty, Vocabulary,
};
use crate::sync::Arc;

fn spec(_: &Topology, a: &Args, bdf: Bdf) -> crate::host::DeviceSpec {
    let odp = a.bool("odp", true);
    RnicSpec {
        bdf,
        caps: RnicCaps {
            odp,
            implicit_odp: odp,
            ..RnicCaps::default()
        },
    }
    .into()
}

fn attach(host: &crate::host::Host, _: &Args, bdf: Option<Bdf>) -> Result<Dev, String> {
    pci_dev::<Rnic>(host, bdf, Rnic::dma, |n| {
        let s = n.stats();
        vec![
            s.mrs,
            s.pinned_pages,
            s.odp_faults,
            s.odp_pages_faulted,
            s.odp_invalidations,
        ]
    })
}

/// One process's verbs objects on one NIC.
struct Verbs {
    ctx: Arc<Context>,
    pd: Pd,
    cq: Arc<Cq>,
}

fn verbs(rt: &Runtime, dev: &str, proc: &str) -> Result<Arc<Verbs>, Failure> {
    let nic: Arc<Rnic> = rt.dev(dev)?;
    let p = rt.proc(proc)?;
    per_proc(rt, dev, proc, || {
        let ctx = nic.open(&p.mm, &p.files).map_err(|e| crate::fail!(e))?;
        let pd = ctx.alloc_pd().map_err(|e| crate::fail!(e))?;
        let cq = ctx.create_cq().map_err(|e| crate::fail!(e))?;
        Ok(Verbs { ctx, pd, cq })
    })
}

/// A registered MR; dropping it deregisters.
struct MrHandle {
    ctx: Arc<Context>,
    mr: Arc<Mr>,
}

impl Drop for MrHandle {
    fn drop(&mut self) {
        // After the context closed (its process exited) the MR is gone already.
        let _ = self.ctx.dereg_mr(&self.mr);
    }
}

const ACCESS: &[&str] = &[
    "local_write",
    "remote_write",
    "remote_read",
    "remote_atomic",
    "on_demand",
];

fn access(names: &[&str]) -> Access {
    names.iter().fold(Access(0), |a, n| {
        a | match *n {
            "local_write" => Access::LOCAL_WRITE,
            "remote_write" => Access::REMOTE_WRITE,
            "remote_read" => Access::REMOTE_READ,
            "remote_atomic" => Access::REMOTE_ATOMIC,
            _ => Access::ON_DEMAND,
        }
    })
}

/// A call's `access=`, local write and remote read and write when absent.
fn access_arg(cx: &crate::scenario::vocab::Compile<'_>) -> Access {
    match cx.args.get("access") {
        Some(_) => access(&cx.args.flags("access")),
        None => access(&ACCESS[..3]),
    }
}

/// Adds the model and its words.
pub fn register(v: &mut Vocabulary) {
    v.model(ModelDef {
        name: "rnic",
        help: "an RDMA NIC (RC QPs, pinned and on-demand MRs, dma-buf MRs)",
        class: Some(DeviceClass::Nic),
        params: const {
            &[Param::opt(
                "odp",
                Ty::Bool,
                "on-demand paging support (default yes)",
            )]
        },
        counters: &[
            "mrs",
            "pinned_pages",
            "odp_faults",
            "odp_pages_faulted",
            "odp_invalidations",
        ],
        spec: Some(spec),
        attach,
        check: None,
    });
    v.step(StepDef {
        verb: "rnic.reg_mr",
        help: "ibv_reg_mr(): pins the range (LONGTERM) or, with on_demand, registers it for ODP",
        actor: ActorUse::Required,
        binds: Some(SymKind::Handle("mr")),
        params: const {
            &[
                Param::req("dev", Ty::Ref(SymKind::Device("rnic")), "the NIC"),
                Param::req("at", Ty::Place, "REGION or REGION+OFFSET"),
                Param::req("len", Ty::Size, "bytes"),
                Param::opt(
                    "access",
                    Ty::Flags(ACCESS),
                    "IBV_ACCESS_ flags (default local_write,remote_write,remote_read)",
                ),
            ]
        },
        outputs: &["mapped_pages"],
        data: false,
        compile: |cx| {
            let (p, dev, at, len) = (
                cx.actor.clone().unwrap_or_default(),
                cx.args.name("dev"),
                cx.args.place("at"),
                cx.args.num("len", 0),
            );
            let acc = access_arg(cx);
            let name = cx.bind.clone().unwrap_or_default();
            Ok(Box::new(move |rt| {
                let v = verbs(rt, &dev, &p)?;
                let va = rt.at(&at, len)?;
                let mr = v
                    .ctx
                    .reg_mr(v.pd, va, len, va.0, acc)
                    .map_err(|e| crate::fail!(e))?;
                let n = mr.mapped_pages();
                rt.put(
                    &name,
                    Arc::new(MrHandle {
                        ctx: v.ctx.clone(),
                        mr,
                    }),
                );
                Ok(Outcome::values(vec![n]))
            }))
        },
    });
    v.step(StepDef {
        verb: "rnic.reg_dmabuf_mr",
        help: "ibv_reg_dmabuf_mr(): an MR over a dma-buf descriptor of this process; a dynamic importer (move_notify drops the mapping, the next access maps again) or, with pinned=yes, one that pins the buffer",
        actor: ActorUse::Required,
        binds: Some(SymKind::Handle("mr")),
        params: const {
            &[
                Param::req("dev", Ty::Ref(SymKind::Device("rnic")), "the NIC"),
                Param::req("dmabuf", Ty::Ref(SymKind::Handle("dmabuf")), "the descriptor"),
                Param::req("len", Ty::Size, "bytes"),
                Param::opt("offset", Ty::Size, "bytes into the buffer (default 0)"),
                Param::opt("pinned", Ty::Bool, "pin the buffer instead (default no)"),
                Param::opt("access", Ty::Flags(ACCESS), "IBV_ACCESS_ flags (default local_write,remote_write,remote_read)"),
            ]
        },
        outputs: &[],
        data: false,
        compile: |cx| {
            let (p, dev, dmabuf, len, off) = (
                cx.actor.clone().unwrap_or_default(),
                cx.args.name("dev"),
                cx.args.name("dmabuf"),
                cx.args.num("len", 0),
                cx.args.num("offset", 0),
            );
            let pinned = cx.args.bool("pinned", false);
            let acc = access_arg(cx);
            let name = cx.bind.clone().unwrap_or_default();
            Ok(Box::new(move |rt| {
                let v = verbs(rt, &dev, &p)?;
                let fd = crate::scenario::steps::gpu::dmabuf_fd(rt, &dmabuf)?;
                // The MR's I/O addresses start at 0 over the buffer.
                let mr = if pinned {
                    v.ctx.reg_dmabuf_mr_pinned(v.pd, off, len, 0, fd, acc)
                } else {
                    v.ctx.reg_dmabuf_mr(v.pd, off, len, 0, fd, acc)
                }
                .map_err(|e| crate::fail!(e))?;
                rt.put(&name, Arc::new(MrHandle { ctx: v.ctx.clone(), mr }));
                Ok(Outcome::default())
            }))
        },
    });
    for (verb, help, write) in [
        (
            "rnic.write",
            "an RDMA WRITE of LEN bytes from this process's MR to the peer's MR",
            true,
        ),
        (
            "rnic.read",
            "an RDMA READ of LEN bytes from the peer's MR into this process's MR",
            false,
        ),
    ] {
        v.step(StepDef {
            verb,
            help,
            actor: ActorUse::Required,
            binds: None,
            params: const {
                &[
                    Param::req(
                        "dev",
                        Ty::Ref(SymKind::Device("rnic")),
                        "the NIC both processes use",
                    ),
                    Param::req("local", Ty::Ref(SymKind::Handle("mr")), "this process's MR"),
                    Param::req(
                        "peer",
                        Ty::Ref(SymKind::Process),
                        "the process owning the remote MR",
                    ),
                    Param::req("remote", Ty::Ref(SymKind::Handle("mr")), "the peer's MR"),
                    Param::req("len", Ty::Size, "bytes"),
                    Param::opt("offset", Ty::Size, "bytes into both MRs (default 0)"),
                ]
            },
            outputs: &["bytes"],
            data: false,
            compile: if write {
                compile_rdma::<true>
            } else {
                compile_rdma::<false>
            },
        });
    }
}

fn compile_rdma<const WRITE: bool>(
    cx: &mut crate::scenario::vocab::Compile<'_>,
) -> Result<crate::scenario::vocab::StepFn, crate::scenario::lang::Diag> {
    let (p, dev, local, peer, remote) = (
        cx.actor.clone().unwrap_or_default(),
        cx.args.name("dev"),
        cx.args.name("local"),
        cx.args.name("peer"),
        cx.args.name("remote"),
    );
    let (len, off) = (cx.args.num("len", 0), cx.args.num("offset", 0));
    if len > u64::from(u32::MAX) {
        return Err(cx.err("len", "one RDMA request moves at most 4 GiB", None));
    }
    Ok(Box::new(move |rt| {
        let a = verbs(rt, &dev, &p)?;
        let b = verbs(rt, &dev, &peer)?;
        let qps = rt.get_or(&format!("{dev}@{p}->{peer}"), || {
            let qa = a
                .ctx
                .create_qp(a.pd, &a.cq, &a.cq)
                .map_err(|e| crate::fail!(e))?;
            let qb = b
                .ctx
                .create_qp(b.pd, &b.cq, &b.cq)
                .map_err(|e| crate::fail!(e))?;
            for (x, y) in [(&qa, &qb), (&qb, &qa)] {
                x.modify(QpState::Init, None).map_err(|e| crate::fail!(e))?;
                x.modify(QpState::Rtr, Some(y))
                    .map_err(|e| crate::fail!(e))?;
                x.modify(QpState::Rts, None).map_err(|e| crate::fail!(e))?;
            }
            Ok::<(Arc<Qp>, Arc<Qp>), Failure>((qa, qb))
        })?;
        let l: Arc<MrHandle> = rt.get(&local)?;
        let r: Arc<MrHandle> = rt.get(&remote)?;
        let (remote_addr, rkey) = (r.mr.iova() + off, r.mr.rkey());
        let op = if WRITE {
            SendOp::Write { remote_addr, rkey }
        } else {
            SendOp::Read { remote_addr, rkey }
        };
        qps.0
            .post_send(SendWr {
                wr_id: 1,
                op,
                sg: vec![Sge {
                    addr: l.mr.iova() + off,
                    len: len as u32,
                    lkey: l.mr.lkey(),
                }],
                signaled: true,
            })
            .map_err(|e| crate::fail!(e))?;
        let wc = a.cq.poll(16);
        match wc.iter().find(|w| w.wr_id == 1) {
            Some(w) if w.status == WcStatus::Success => {
                Ok(Outcome::values(vec![u64::from(w.byte_len)]))
            }
            Some(w) => Err(Failure::new(
                Errno::EIO,
                format!("completion {:?}", w.status),
            )),
            None => Err(Failure::msg("no completion")),
        }
    }))
}
