//! The memory-core benchmarks against the kernel's own primitives, measured in the same
//! run (see `peerdma bench mm`): pin+unpin of 1 GiB vs io_uring buffer registration,
//! munmap of 1 GiB with a notifier vs the kernel's munmap, and metadata and resident
//! memory of a 1 TiB device region. `PEERDMA_BENCH_BYTES` shrinks the size.

fn main() -> anyhow::Result<()> {
    let bytes = std::env::var("PEERDMA_BENCH_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1u64 << 30);
    let figures = peerdma_cli::bench::mm::run(bytes, 7)?;
    peerdma_cli::bench::mm::print(&figures);
    Ok(())
}
