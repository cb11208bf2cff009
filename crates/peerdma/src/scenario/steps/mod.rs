//! The words scenarios use, one module per layer or device model. Each module's
//! `register` adds its operations (and its device model) to a [`Vocabulary`]; a new
//! device model is a new module here and one line in [`register`].

use crate::scenario::run::{Failure, Outcome, Runtime, StepResult};
use crate::scenario::vocab::{Compile, Param, Ty, Vocabulary};
use crate::sync::Arc;

pub mod dmirror;
pub mod gpu;
pub mod gup;
pub mod mm;
pub mod nvme;
pub mod rnic;

/// Adds every layer's and device model's words.
pub fn register(v: &mut Vocabulary) {
    mm::register(v);
    gup::register(v);
    nvme::register(v);
    dmirror::register(v);
    gpu::register(v);
    rnic::register(v);
}

/// `pattern=` and `fill=`: the data a writing step writes (one of them, [`Data`]).
pub(crate) const DATA_PARAMS: [Param; 2] = [
    Param::opt("pattern", Ty::Seed, "write the pattern of this seed"),
    Param::opt("fill", Ty::Byte, "write this byte everywhere"),
];

/// The data of a write: `pattern=SEED` bytes at region offset `base`, or `fill=BYTE`.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Data {
    Pattern(u64),
    Fill(u8),
}

impl Data {
    /// From a call's `pattern=` / `fill=`: exactly one must be given.
    pub(crate) fn from_call(cx: &Compile<'_>) -> Result<Data, crate::scenario::lang::Diag> {
        match (cx.args.get("pattern"), cx.args.get("fill")) {
            (Some(_), Some(_)) => Err(cx.err("fill", "give pattern= or fill=, not both", None)),
            (Some(_), None) => Ok(Data::Pattern(cx.args.num("pattern", 0))),
            (None, Some(_)) => Ok(Data::Fill(cx.args.num("fill", 0) as u8)),
            (None, None) => Err(cx.err(
                "len",
                format!(
                    "`{}` needs the data: pattern=SEED or fill=BYTE",
                    cx.verb.text
                ),
                None,
            )),
        }
    }

    /// `len` bytes of it at region offset `base`.
    pub(crate) fn bytes(self, base: u64, len: u64) -> Result<Vec<u8>, Failure> {
        let mut v = buffer(len)?;
        match self {
            Data::Pattern(seed) => crate::scenario::run::pattern_fill(seed, base, &mut v),
            Data::Fill(b) => v.fill(b),
        }
        Ok(v)
    }
}

/// A zeroed buffer of `len` bytes, refused (ENOMEM) past 1 GiB: a scenario's reads and
/// writes go through memory of the process running it.
pub(crate) fn buffer(len: u64) -> Result<Vec<u8>, Failure> {
    if len > 1 << 30 {
        return Err(Failure::new(
            crate::errno::Errno::ENOMEM,
            format!("a {len:#x}-byte buffer is more than a scenario step may move (1 GiB)"),
        ));
    }
    Ok(vec![0; len as usize])
}

/// A per-(device, process) object (a mirror, a GPU context, a verbs context), opened
/// on first use and kept until the scenario ends.
pub(crate) fn per_proc<T: Send + Sync + 'static>(
    rt: &Runtime,
    dev: &str,
    proc: &str,
    open: impl FnOnce() -> Result<T, Failure>,
) -> Result<Arc<T>, Failure> {
    rt.get_or(&format!("{dev}@{proc}"), || open().map(Arc::new))
}

/// An outcome with bytes read at region offset `base`.
pub(crate) fn read_outcome(values: Vec<u64>, data: Vec<u8>, base: u64) -> StepResult {
    Ok(Outcome {
        values,
        data: Some((data, base)),
    })
}

/// The device a PCI model bound at `bdf`, with its DMA handle, its counters read by
/// `counters`, and hot removal through the model's own `Device::remove`.
pub(crate) fn pci_dev<T: crate::drivers::Device>(
    host: &crate::host::Host,
    bdf: Option<crate::addr::Bdf>,
    dma: fn(&T) -> &crate::dma::DmaDevice,
    counters: fn(&T) -> Vec<u64>,
) -> Result<crate::scenario::vocab::Dev, String> {
    let bdf = bdf.ok_or("the model binds to a PCI function")?;
    let d: Arc<T> = host
        .device(bdf)
        .ok_or_else(|| format!("no such device model bound at {bdf}"))?;
    let (c, r) = (d.clone(), d.clone());
    let p2p = host.p2p().clone();
    Ok(crate::scenario::vocab::Dev {
        bdf: Some(bdf),
        dma: Some(dma(&d).clone()),
        obj: d,
        counters: Box::new(move || counters(&c)),
        remove: Box::new(move |_| {
            crate::drivers::Device::remove(&*r, &p2p, Some(crate::scenario::run::REMOVE_TIMEOUT))
                .map_err(|e| crate::fail!(e))
        }),
    })
}

/// The address space of process `p` and the address of place `at` (checked against its
/// region) for a `P: op AT LEN` step.
pub(crate) fn proc_at(
    rt: &Runtime,
    p: &str,
    at: &(String, u64),
    len: u64,
) -> Result<(Arc<crate::mm::Mm>, crate::addr::VirtAddr), Failure> {
    let va = rt.at(at, len)?;
    Ok((rt.proc(p)?.mm.clone(), va))
}

/// The process, place and length of a `P: op AT LEN ...` call.
pub(crate) fn range_args(cx: &Compile<'_>) -> (String, (String, u64), u64) {
    (
        cx.actor.clone().unwrap_or_default(),
        cx.args.place("at"),
        cx.args.num("len", 0),
    )
}
