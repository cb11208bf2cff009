//! The DMA benchmarks (see `peerdma bench dma`): device writes of 1 MiB through mapped
//! memory, contiguous and scattered, against memcpy of the same bytes; and
//! get_user_dma_sg of 1 GiB against the kernel's io_uring buffer registration, both
//! measured in the same run. `PEERDMA_BENCH_BYTES` shrinks the get_user_dma_sg size.

fn main() -> anyhow::Result<()> {
    let bytes = std::env::var("PEERDMA_BENCH_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1u64 << 30);
    let figures = peerdma_cli::bench::dma::run(1 << 20, bytes, 7)?;
    peerdma_cli::bench::dma::print(&figures);
    Ok(())
}
