//! The parts of the `peerdma` command that benchmarks share with it: the benchmark
//! runners behind `peerdma bench`, also run by `cargo bench -p peerdma-cli`, output, and
//! option parsing.

pub mod bench;
pub mod io;
pub mod opts;

/// A scenario or input that is wrong as written: the command prints the rendered
/// message as it is and exits with status 2, as for a usage error.
#[derive(Debug)]
pub struct Invalid(pub String);

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Invalid {}
