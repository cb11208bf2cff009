//! The fabric layer's errors. Each names the source (file, sysfs path, preset), the place
//! in it (line, attribute, BDF) and what is wrong, so a bad snapshot or topology file is
//! fixed from the message alone.

use std::path::PathBuf;

use crate::addr::{Bdf, BdfParseError, BusId};

/// Everything the fabric layer can refuse.
#[derive(Debug, thiserror::Error)]
pub enum FabricError {
    /// Two functions claim one address.
    #[error("{source_name}: function {bdf} is listed twice")]
    DuplicateFunction {
        /// Where the topology came from.
        source_name: String,
        /// The repeated address.
        bdf: Bdf,
    },
    /// Two host bridges claim one root bus.
    #[error("{source_name}: host bridge {root} is listed twice")]
    DuplicateHostBridge {
        /// Where the topology came from.
        source_name: String,
        /// The repeated root bus.
        root: BusId,
    },
    /// A function's parent does not exist.
    #[error("{source_name}: function {bdf} has no parent: {parent}")]
    MissingParent {
        /// Where the topology came from.
        source_name: String,
        /// The orphan.
        bdf: Bdf,
        /// What is missing, as a sentence ("there is no 0000:00:01.0").
        parent: String,
    },
    /// A bridge's bus numbers contradict its place in the tree or another bridge's.
    #[error("{source_name}: bridge {bdf}: {why}")]
    BusRanges {
        /// Where the topology came from.
        source_name: String,
        /// The bridge at fault.
        bdf: Bdf,
        /// What contradicts what.
        why: String,
    },
    /// A function has bus numbers, which only bridges have, but is no bridge.
    #[error("{source_name}: function {bdf} has bus numbers, but its class {class:#08x} and kind ({kind}) say it is no bridge")]
    BusesOnNonBridge {
        /// Where the topology came from.
        source_name: String,
        /// The function.
        bdf: Bdf,
        /// Its class code.
        class: u32,
        /// Its kind.
        kind: crate::fabric::PortKind,
    },
    /// A function describes itself in a way no function can be: a BAR, link, ACS or
    /// kind that contradicts the PCIe rules or the function's class.
    #[error("{source_name}: function {bdf}: {what}")]
    Invalid {
        /// Where the topology came from.
        source_name: String,
        /// The function.
        bdf: Bdf,
        /// What is wrong, as a sentence.
        what: String,
    },
    /// The source describes no function at all (an empty file, or one cut off before
    /// its first function).
    #[error("{source_name}: describes no PCI function{hint}")]
    Empty {
        /// Where the topology came from.
        source_name: String,
        /// What may have gone wrong, with a leading separator, or empty.
        hint: String,
    },
    /// A function's parent is not a bridge.
    #[error("{source_name}: function {bdf} sits below {parent}, which is not a bridge")]
    ParentNotBridge {
        /// Where the topology came from.
        source_name: String,
        /// The child.
        bdf: Bdf,
        /// Its claimed parent.
        parent: Bdf,
    },
    /// Following parents from a function loops.
    #[error("{source_name}: the bridges above {bdf} form a loop")]
    Cycle {
        /// Where the topology came from.
        source_name: String,
        /// A function on the loop.
        bdf: Bdf,
    },
    /// A BDF given by a user does not parse.
    #[error(transparent)]
    BadBdf(#[from] BdfParseError),
    /// A BDF given by a user is not in the topology.
    #[error("{source_name} has no function {bdf}")]
    NoSuchFunction {
        /// Where the topology came from.
        source_name: String,
        /// The missing address.
        bdf: Bdf,
    },
    /// A file or sysfs attribute could not be read or written.
    #[error("{}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A sysfs attribute holds something the reader does not understand.
    #[error("{}: {reason}", path.display())]
    Sysfs {
        /// The attribute or directory.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// `lspci -tv` text that does not parse.
    #[error("{source_name}, line {line}, column {column}: {reason}")]
    Lspci {
        /// The file name or `-` for stdin.
        source_name: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What was expected.
        reason: String,
    },
    /// A topology file that does not parse or does not describe a tree.
    #[error("{source_name}: {reason}")]
    Topology {
        /// The file name.
        source_name: String,
        /// The TOML parser's message (with line and column) or the rule broken.
        reason: String,
    },
    /// An unknown preset name.
    #[error("no preset `{name}`; the presets are: {known}")]
    UnknownPreset {
        /// What was asked for.
        name: String,
        /// The names that exist.
        known: String,
    },
}

impl FabricError {
    /// The kernel's error number: ENODEV for a function that is not there, EIO for a
    /// file that could not be read, EINVAL for input that makes no sense.
    pub fn errno(&self) -> crate::errno::Errno {
        use crate::errno::Errno;
        match self {
            FabricError::NoSuchFunction { .. } => Errno::ENODEV,
            FabricError::Io { .. } => Errno::EIO,
            _ => Errno::EINVAL,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        FabricError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn sysfs(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        FabricError::Sysfs {
            path: path.into(),
            reason: reason.into(),
        }
    }
}
