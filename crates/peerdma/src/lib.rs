//! peerdma: the memory subsystem that lets PCIe devices DMA into each other's memory and
//! into process memory a GPU may move, modelled on Linux's PCI P2PDMA, HMM, RDMA ODP and
//! dma-buf. See DESIGN.md for the layers; each module here is one of them.
//!
//! Layers present so far: [`addr`] (address newtypes), [`errno`] (the kernel's error
//! numbers, which every layer's error maps to), [`sync`] (std or shuttle primitives), [`fabric`] (the PCIe tree and the kernel's peer-to-peer rules),
//! [`mem`] (frames with real bytes), [`notifier`] (interval notifiers), [`mm`]
//! (address spaces), [`iommu`], [`dma`] (mapping, the engine, the sanitizer),
//! [`p2pmem`] (p2p memory providers), [`gup`] (pinning, `get_user_dma_sg`),
//! [`drivers`] (device models) and [`host`] (emulated machines and the main job).

#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod addr;
pub mod check;
pub mod dma;
pub mod dmabuf;
pub mod drivers;
pub mod errno;
pub mod fabric;
pub mod gup;
pub mod hmm;
pub mod host;
pub mod iommu;
pub mod mem;
pub mod mm;
pub mod notifier;
pub mod p2pmem;
pub mod scenario;
pub mod sync;
