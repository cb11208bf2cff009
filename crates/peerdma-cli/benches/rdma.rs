//! The RDMA NIC's benchmarks against their baselines measured in the same run (see
//! `peerdma bench rdma`). `PEERDMA_BENCH_BYTES` shrinks the size.

fn main() -> anyhow::Result<()> {
    let bytes = std::env::var("PEERDMA_BENCH_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1u64 << 30);
    let figures = peerdma_cli::bench::rdma::run(bytes, 3)?;
    peerdma_cli::bench::rdma::print(&figures);
    Ok(())
}
