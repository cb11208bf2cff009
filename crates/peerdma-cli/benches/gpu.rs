//! The GPU model's unified-memory benchmarks against memcpy measured in the same run
//! (see `peerdma bench gpu`). `PEERDMA_BENCH_BYTES` shrinks the size.

fn main() -> anyhow::Result<()> {
    let bytes = std::env::var("PEERDMA_BENCH_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1u64 << 30);
    let figures = peerdma_cli::bench::gpu::run(bytes, 5)?;
    peerdma_cli::bench::gpu::print(&figures);
    Ok(())
}
