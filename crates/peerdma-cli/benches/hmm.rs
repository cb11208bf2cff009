//! The HMM benchmarks against baselines measured in the same run (see `peerdma bench
//! hmm`): hmm_range_fault snapshot of 1 GiB vs io_uring buffer registration, and
//! migration of 1 GiB to device-private memory and back vs memcpy.
//! `PEERDMA_BENCH_BYTES` shrinks the size.

fn main() -> anyhow::Result<()> {
    let bytes = std::env::var("PEERDMA_BENCH_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1u64 << 30);
    let figures = peerdma_cli::bench::hmm::run(bytes, 5)?;
    peerdma_cli::bench::hmm::print(&figures);
    Ok(())
}
