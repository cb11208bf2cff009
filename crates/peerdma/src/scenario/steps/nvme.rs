//! The NVMe model: `device NAME nvme [capacity=] [cmb=]`, and `nvme.read` /
//! `nvme.write`, which map a process buffer with get_user_dma_sg (as a passthrough
//! command does) and run one command with a PRP list or an SGL.

use crate::addr::Bdf;
use crate::dma::Direction;
use crate::drivers::nvme::{CmbRegs, DataPointer, Nvme, NvmeConfig, NvmeSpec};
use crate::fabric::{DeviceClass, Topology};
use crate::gup::{get_user_dma_sg, UserSg};
use crate::scenario::run::{Failure, Outcome};
use crate::scenario::steps::{pci_dev, proc_at};
use crate::scenario::vocab::{
    ActorUse, Args, Dev, ModelDef, Param, StepDef, SymKind, Ty, Vocabulary,
};
use crate::sync::Arc;

fn spec(topo: &Topology, a: &Args, bdf: Bdf) -> crate::host::DeviceSpec {
    let cmb = match a.get("cmb") {
        Some(_) => {
            let n = a.num("cmb", 0);
            (n > 0).then(|| CmbRegs::whole(2, n, 0))
        }
        None => topo
            .functions()
            .iter()
            .find(|f| f.bdf == bdf)
            .and_then(|f| {
                f.bars
                    .iter()
                    .find(|b| b.index == 2 && b.prefetchable && b.size >= 2 << 20)
            })
            .map(|b| CmbRegs::whole(2, b.size & !((1 << 20) - 1), 0)),
    };
    NvmeSpec {
        bdf,
        config: NvmeConfig {
            capacity: a.num("capacity", 16 << 20),
            lba_size: if a.word("lba", "4096") == "512" {
                512
            } else {
                4096
            },
            cmb,
            ..NvmeConfig::default()
        },
    }
    .into()
}

fn attach(host: &crate::host::Host, _: &Args, bdf: Option<Bdf>) -> Result<Dev, String> {
    pci_dev::<Nvme>(host, bdf, Nvme::dma, |n| {
        let (rd, wr) = n.bytes_moved();
        vec![rd, wr]
    })
}

fn check(a: &Args) -> Result<(), (&'static str, String)> {
    let cmb = a.num("cmb", 0);
    if !cmb.is_multiple_of(2 << 20) {
        // nvme_map_cmb registers a CMB only when its size is 2 MiB aligned, and a
        // CMBSZ.SZ of 0 would make pci_p2pdma_add_resource take the whole BAR.
        return Err((
            "cmb",
            format!("a controller memory buffer of {cmb} bytes is never registered: the kernel takes one only in multiples of 2 MiB (0 for none)"),
        ));
    }
    Ok(())
}

/// Adds the model and its words.
pub fn register(v: &mut Vocabulary) {
    v.model(ModelDef {
        name: "nvme",
        help: "an NVMe controller with one namespace; a CMB from BAR 2 becomes p2p memory",
        class: Some(DeviceClass::Nvme),
        params: const { &[
            Param::opt("capacity", Ty::Size, "namespace bytes (default 16M)"),
            Param::opt("lba", Ty::Word(&["512", "4096"]), "block size (default 4096)"),
            Param::opt("cmb", Ty::Size, "CMB bytes from BAR 2, a multiple of 2M (0: none; default: all of a prefetchable BAR 2 of 2M or more)"),
        ] },
        counters: &["bytes_read", "bytes_written"],
        spec: Some(spec),
        attach,
        check: Some(check),
    });
    for (verb, help, write) in [
        (
            "nvme.read",
            "a Read command: the drive writes LEN bytes from block lba= into the buffer (by DMA)",
            false,
        ),
        (
            "nvme.write",
            "a Write command: the drive reads LEN bytes from the buffer (by DMA) into block lba=",
            true,
        ),
    ] {
        v.step(StepDef {
            verb,
            help,
            actor: ActorUse::Required,
            binds: None,
            params: const {
                &[
                    Param::req("dev", Ty::Ref(SymKind::Device("nvme")), "the drive"),
                    Param::req("at", Ty::Place, "the buffer: REGION or REGION+OFFSET"),
                    Param::req("len", Ty::Size, "bytes, a whole number of blocks"),
                    Param::opt("lba", Ty::Count, "the first block (default 0)"),
                    Param::opt(
                        "dptr",
                        Ty::Word(&["auto", "prp", "sgl"]),
                        "the data pointer (default: PRPs where the segments allow)",
                    ),
                ]
            },
            outputs: &["segments"],
            data: false,
            compile: if write {
                compile_io::<true>
            } else {
                compile_io::<false>
            },
        });
    }
}

fn compile_io<const WRITE: bool>(
    cx: &mut crate::scenario::vocab::Compile<'_>,
) -> Result<crate::scenario::vocab::StepFn, crate::scenario::lang::Diag> {
    let ((p, at, len), dev) = (crate::scenario::steps::range_args(cx), cx.args.name("dev"));
    let (lba, dptr) = (cx.args.num("lba", 0), cx.args.word("dptr", "auto"));
    Ok(Box::new(move |rt| {
        let nvme: Arc<Nvme> = rt.dev(&dev)?;
        let bs = u64::from(nvme.lba_size());
        if len == 0 || !len.is_multiple_of(bs) {
            return Err(Failure::new(
                crate::errno::Errno::EINVAL,
                format!("{len:#x} bytes is not a whole number of {bs}-byte blocks"),
            ));
        }
        let (mm, va) = proc_at(rt, &p, &at, len)?;
        let dir = if WRITE {
            Direction::ToDevice
        } else {
            Direction::FromDevice
        };
        let sg = get_user_dma_sg(&mm, nvme.dma(), UserSg::new(va, len, dir))
            .map_err(|e| crate::fail!(e))?;
        let segs = sg.segments();
        let ptr = match dptr {
            "sgl" => DataPointer::Sgl(segs.iter().map(|s| (s.addr, s.len)).collect()),
            "prp" => match DataPointer::for_segments(&segs) {
                p @ DataPointer::Prp(_) => p,
                DataPointer::Sgl(_) => {
                    return Err(Failure::new(
                        crate::errno::Errno::EINVAL,
                        "the buffer's segments cannot be described by PRPs",
                    ))
                }
            },
            _ => DataPointer::for_segments(&segs),
        };
        let r = if WRITE {
            nvme.write(lba, len / bs, &ptr)
        } else {
            nvme.read(lba, len / bs, &ptr)
        };
        r.map_err(|e| crate::fail!(e))?;
        Ok(Outcome::values(vec![segs.len() as u64]))
    }))
}
