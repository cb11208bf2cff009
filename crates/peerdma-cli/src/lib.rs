//! The parts of the `peerdma` command that benchmarks share with it: the benchmark
//! runners behind `peerdma bench`, also run by `cargo bench -p peerdma-cli`, output, and
//! option parsing.

pub mod bench;
pub mod io;
pub mod opts;
