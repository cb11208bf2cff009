//! Pinning and DMA mappings of process memory: `pin` (pin_user_pages), `gup`
//! (get_user_pages), `dma_sg` (get_user_dma_sg for a device), and a device's DMA
//! through a mapping (`dma.read`, `dma.write`).

use crate::addr::PAGE_SIZE;
use crate::dma::Direction;
use crate::gup::{get_user_dma_sg, get_user_pages, pin_user_pages, FollFlags, UserSg};
use crate::scenario::run::Outcome;
use crate::scenario::steps::{buffer, proc_at, range_args, read_outcome, Data};
use crate::scenario::vocab::{ActorUse, Param, StepDef, SymKind, Ty, Vocabulary};

const FLAGS: &[&str] = &["write", "longterm", "p2pdma"];

fn foll(names: &[&str]) -> FollFlags {
    names.iter().fold(FollFlags::NONE, |f, n| {
        f | match *n {
            "write" => FollFlags::WRITE,
            "longterm" => FollFlags::LONGTERM,
            _ => FollFlags::PCI_P2PDMA,
        }
    })
}

fn pages(off: u64, len: u64) -> usize {
    ((off % PAGE_SIZE + len).div_ceil(PAGE_SIZE)) as usize
}

/// A `dma_sg` mapping and the region offset its first byte maps, so data a device
/// reads or writes through it lines up with the region's `pattern=` bytes.
struct DmaHandle {
    sg: crate::gup::UserDmaSg,
    base: u64,
}

/// Adds the words.
pub fn register(v: &mut Vocabulary) {
    const RANGE: [Param; 2] = [
        Param::req("at", Ty::Place, "REGION or REGION+OFFSET"),
        Param::req("len", Ty::Size, "bytes"),
    ];
    const FLAGS_P: Param = Param::opt(
        "flags",
        Ty::Flags(FLAGS),
        "FOLL_ flags: write, longterm, p2pdma",
    );
    v.step(StepDef {
        verb: "pin",
        help: "pin_user_pages(): pins the pages under LEN bytes; may pin fewer than asked (the rest unmapped)",
        actor: ActorUse::Required,
        binds: Some(SymKind::Handle("pin")),
        params: const { &[RANGE[0], RANGE[1], FLAGS_P] },
        outputs: &["pages", "requested"],
        data: false,
        compile: |cx| {
            let (p, at, len) = range_args(cx);
            let (gup, name) = (foll(&cx.args.flags("flags")), cx.bind.clone().unwrap_or_default());
            Ok(Box::new(move |rt| {
                let (mm, va) = proc_at(rt, &p, &at, len)?;
                let n = pages(va.0, len);
                let pinned = pin_user_pages(&mm, va, n, gup).map_err(|e| crate::fail!(e))?;
                let got = pinned.len() as u64;
                rt.put(&name, pinned);
                Ok(Outcome::values(vec![got, n as u64]))
            }))
        },
    });
    v.step(StepDef {
        verb: "gup",
        help: "get_user_pages(): takes page references (not pins); longterm is refused (EINVAL)",
        actor: ActorUse::Required,
        binds: Some(SymKind::Handle("pages")),
        params: const { &[RANGE[0], RANGE[1], FLAGS_P] },
        outputs: &["pages", "requested"],
        data: false,
        compile: |cx| {
            let (p, at, len) = range_args(cx);
            let (gup, name) = (
                foll(&cx.args.flags("flags")),
                cx.bind.clone().unwrap_or_default(),
            );
            Ok(Box::new(move |rt| {
                let (mm, va) = proc_at(rt, &p, &at, len)?;
                let n = pages(va.0, len);
                let got = get_user_pages(&mm, va, n, gup).map_err(|e| crate::fail!(e))?;
                let k = got.pages().len() as u64;
                rt.put(&name, got);
                Ok(Outcome::values(vec![k, n as u64]))
            }))
        },
    });
    v.step(StepDef {
        verb: "dma_sg",
        help: "get_user_dma_sg(): pins and maps LEN bytes for DEV (p2p memory by bus address where the fabric allows)",
        actor: ActorUse::Required,
        binds: Some(SymKind::Handle("dma")),
        params: const { &[
            Param::req("dev", Ty::Ref(SymKind::Device("any")), "the device that will DMA"),
            RANGE[0],
            RANGE[1],
            Param::opt(
                "dir",
                Ty::Word(&["to_device", "from_device", "bidirectional"]),
                "which way data moves (default bidirectional)",
            ),
            FLAGS_P,
        ] },
        outputs: &["segments", "bytes", "pages"],
        data: false,
        compile: |cx| {
            let (p, at, len) = range_args(cx);
            let (gup, name, dev) = (
                foll(&cx.args.flags("flags")),
                cx.bind.clone().unwrap_or_default(),
                cx.args.name("dev"),
            );
            let dir = match cx.args.word("dir", "bidirectional") {
                "to_device" => Direction::ToDevice,
                "from_device" => Direction::FromDevice,
                _ => Direction::Bidirectional,
            };
            Ok(Box::new(move |rt| {
                let (mm, va) = proc_at(rt, &p, &at, len)?;
                let (_, dma) = rt.dev_dma(&dev)?;
                let sg = get_user_dma_sg(&mm, &dma, UserSg::new(va, len, dir).flags(gup))
                    .map_err(|e| crate::fail!(e))?;
                let vals = vec![sg.segments().len() as u64, sg.len(), sg.pinned().len() as u64];
                rt.put(&name, crate::sync::Arc::new(DmaHandle { sg, base: at.1 }));
                Ok(Outcome::values(vals))
            }))
        },
    });
    const HANDLE: Param = Param::req(
        "handle",
        Ty::Ref(SymKind::Handle("dma")),
        "a dma_sg mapping",
    );
    const OFF: Param = Param::opt("offset", Ty::Size, "bytes into the mapping (default 0)");
    v.step(StepDef {
        verb: "dma.read",
        help: "the mapped device reads LEN bytes through the mapping (DMA to the device)",
        actor: ActorUse::None,
        binds: None,
        params: const { &[HANDLE, Param::req("len", Ty::Size, "bytes"), OFF] },
        outputs: &[],
        data: true,
        compile: |cx| {
            let (h, len, off) = (
                cx.args.name("handle"),
                cx.args.num("len", 0),
                cx.args.num("offset", 0),
            );
            Ok(Box::new(move |rt| {
                let mut buf = buffer(len)?;
                let d = rt.get::<crate::sync::Arc<DmaHandle>>(&h)?;
                d.sg.mapping()
                    .dma_read(off, &mut buf)
                    .map_err(|e| crate::fail!(e))?;
                read_outcome(vec![], buf, d.base + off)
            }))
        },
    });
    v.step(StepDef {
        verb: "dma.write",
        help: "the mapped device writes LEN bytes of pattern= or fill= through the mapping",
        actor: ActorUse::None,
        binds: None,
        params: const {
            &[
                HANDLE,
                Param::req("len", Ty::Size, "bytes"),
                OFF,
                Param::opt(
                    "pattern",
                    Ty::Seed,
                    "the pattern's seed (at the region offsets the mapping covers)",
                ),
                Param::opt("fill", Ty::Byte, "one byte everywhere"),
            ]
        },
        outputs: &[],
        data: false,
        compile: |cx| {
            let data = Data::from_call(cx)?;
            let (h, len, off) = (
                cx.args.name("handle"),
                cx.args.num("len", 0),
                cx.args.num("offset", 0),
            );
            Ok(Box::new(move |rt| {
                let d = rt.get::<crate::sync::Arc<DmaHandle>>(&h)?;
                let bytes = data.bytes(d.base + off, len)?;
                d.sg.mapping()
                    .dma_write(off, &bytes)
                    .map_err(|e| crate::fail!(e))?;
                Ok(Outcome::default())
            }))
        },
    });
}
