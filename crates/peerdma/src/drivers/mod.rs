//! Device models that move real bytes, reaching the subsystem only through the calls a
//! driver would use: DMA mappings, the DMA engine, p2p memory providers.

pub mod nvme;
