//! What the command reads and writes, made safe for pipes, full disks and endless
//! inputs: text inputs are read up to [`INPUT_LIMIT`] and refused past it; every line of
//! output goes through [`out`], which never panics — a closed pipe (`| head`) ends the
//! output quietly, as other Unix tools do, and any other write error (a full disk) is
//! kept and reported once by [`finish`] as the command's error.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Mutex;

use anyhow::{bail, Context, Result};

/// The largest topology or lspci text read (a real machine's is well under 1 MiB).
pub const INPUT_LIMIT: u64 = 64 << 20;

/// Reads at most [`INPUT_LIMIT`] bytes of UTF-8 text from `r`, naming `what` in errors.
pub fn read_bounded(r: impl Read, what: &str) -> Result<String> {
    let mut bytes = Vec::new();
    r.take(INPUT_LIMIT + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading {what}"))?;
    if bytes.len() as u64 > INPUT_LIMIT {
        bail!(
            "{what} is larger than {} MiB: not a topology or lspci text",
            INPUT_LIMIT >> 20
        );
    }
    String::from_utf8(bytes).with_context(|| format!("{what} is not UTF-8 text"))
}

/// Reads the file at `path` with [`read_bounded`].
pub fn read_file(path: &Path) -> Result<String> {
    let what = path.display().to_string();
    let f = std::fs::File::open(path).with_context(|| format!("opening {what}"))?;
    read_bounded(f, &what)
}

/// The first output error other than a closed pipe, and whether output has stopped.
static FAILED: Mutex<Option<Option<std::io::Error>>> = Mutex::new(None);

/// Writes `args` to stdout unless output has stopped; a failed write stops it.
pub fn out(args: std::fmt::Arguments<'_>) {
    let mut failed = FAILED.lock().unwrap_or_else(|p| p.into_inner());
    if failed.is_some() {
        return;
    }
    let mut o = std::io::stdout().lock();
    if let Err(e) = o.write_fmt(args) {
        *failed = Some((e.kind() != std::io::ErrorKind::BrokenPipe).then_some(e));
    }
}

/// Flushes stdout; the error a write met, if any (a closed pipe is none).
pub fn finish() -> Result<()> {
    let mut failed = FAILED.lock().unwrap_or_else(|p| p.into_inner());
    if failed.is_none() {
        if let Err(e) = std::io::stdout().lock().flush() {
            *failed = Some((e.kind() != std::io::ErrorKind::BrokenPipe).then_some(e));
        }
    }
    match failed.take().flatten() {
        Some(e) => Err(anyhow::Error::new(e).context("writing the output")),
        None => Ok(()),
    }
}

/// `println!` through [`out`].
#[macro_export]
macro_rules! outln {
    () => { $crate::io::out(format_args!("\n")) };
    ($($t:tt)*) => { $crate::io::out(format_args!("{}\n", format_args!($($t)*))) };
}

/// `print!` through [`out`].
#[macro_export]
macro_rules! outp {
    ($($t:tt)*) => { $crate::io::out(format_args!($($t)*)) };
}
