//! Helpers for the RDMA and dma-buf tests: a machine with NICs and a GPU bound, and one
//! side of a connection (a process with a verbs context, PD, CQ and QP).

use peerdma::addr::{Bdf, PAGE_SIZE};
use peerdma::drivers::gpu::GpuSpec;
use peerdma::drivers::rnic::{Access, Context, Cq, Pd, Qp, QpState, Rnic, RnicCaps, RnicSpec};
use peerdma::host::{DeviceSpec, Host, HostConfig, Process};
use peerdma::sync::Arc;

/// Local write, remote read and write.
pub const RW: Access =
    Access(Access::LOCAL_WRITE.0 | Access::REMOTE_WRITE.0 | Access::REMOTE_READ.0);

/// A BDF from a "dddd:bb:dd.f" literal.
pub fn bdf(s: &str) -> Bdf {
    s.parse().unwrap()
}

/// `preset` booted with `ram` bytes of RAM and the IOMMU as asked, an RDMA NIC at each
/// of `nics`, a GPU of `vram_pages` at `gpu`, and — with `nvme` — an NVMe controller
/// (with its CMB) on every NVMe endpoint the NICs do not take. Leak-checked on drop.
pub fn machine(
    preset: &str,
    ram: u64,
    iommu: bool,
    nics: &[&str],
    (gpu, vram_pages): (&str, u64),
    nvme: bool,
) -> super::Checked {
    let topo = peerdma::fabric::preset(preset).unwrap();
    let taken: Vec<Bdf> = nics.iter().map(|n| bdf(n)).collect();
    let mut specs: Vec<DeviceSpec> = taken
        .iter()
        .map(|&b| {
            RnicSpec {
                bdf: b,
                caps: RnicCaps::default(),
            }
            .into()
        })
        .collect();
    specs.push(
        GpuSpec {
            bdf: bdf(gpu),
            vram_bytes: vram_pages * PAGE_SIZE,
        }
        .into(),
    );
    if nvme {
        specs.extend(
            Host::nvme_specs(&topo, 1 << 20)
                .into_iter()
                .filter(|s| !taken.contains(&s.bdf())),
        );
    }
    super::Checked(
        Host::build(
            topo,
            &HostConfig {
                ram_bytes: ram,
                iommu: Some(iommu),
            },
            &specs,
        )
        .unwrap(),
    )
}

/// One side of a connection: a process, its verbs context, PD, CQ and QP.
pub struct Side {
    pub p: Process,
    pub ctx: Arc<Context>,
    pub pd: Pd,
    pub cq: Arc<Cq>,
    pub qp: Arc<Qp>,
}

/// A new process on `h` with a verbs context on the NIC at `nic`, a PD, and a QP (in
/// RESET) on one CQ.
pub fn side(h: &Host, nic: &str) -> Side {
    let p = h.spawn();
    let ctx = h
        .device::<Rnic>(bdf(nic))
        .unwrap()
        .open(&p, p.files())
        .unwrap();
    let pd = ctx.alloc_pd().unwrap();
    let cq = ctx.create_cq().unwrap();
    let qp = ctx.create_qp(pd, &cq, &cq).unwrap();
    Side { p, ctx, pd, cq, qp }
}

/// Connects two QPs to each other and brings both to RTS.
pub fn connect(a: &Arc<Qp>, b: &Arc<Qp>) {
    for (x, y) in [(a, b), (b, a)] {
        x.modify(QpState::Init, None).unwrap();
        x.modify(QpState::Rtr, Some(y)).unwrap();
        x.modify(QpState::Rts, None).unwrap();
    }
}
