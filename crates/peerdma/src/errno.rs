//! The kernel's error numbers, in one table. Every layer's error type maps each of its
//! variants to one of these with `errno()`, so a caller (a scenario, the CLI, a test
//! mirroring a kernel selftest) can compare against the number the kernel would return
//! without knowing which layer refused. Values are Linux's (include/uapi/asm-generic/
//! errno-base.h and errno.h).

use std::fmt;

/// A Linux error number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[repr(i32)]
pub enum Errno {
    /// Operation not permitted.
    EPERM = 1,
    /// No such entry.
    ENOENT = 2,
    /// I/O error.
    EIO = 5,
    /// No such device or address.
    ENXIO = 6,
    /// Bad file descriptor.
    EBADF = 9,
    /// Try again.
    EAGAIN = 11,
    /// Out of memory.
    ENOMEM = 12,
    /// Permission denied.
    EACCES = 13,
    /// Bad address.
    EFAULT = 14,
    /// Device or resource busy.
    EBUSY = 16,
    /// No such device.
    ENODEV = 19,
    /// Invalid argument.
    EINVAL = 22,
    /// Inappropriate ioctl for the file.
    ENOTTY = 25,
    /// Result out of range.
    ERANGE = 34,
    /// Value too large for the type.
    EOVERFLOW = 75,
    /// Operation not supported.
    EOPNOTSUPP = 95,
    /// Timed out.
    ETIMEDOUT = 110,
    /// Remote I/O error: will not succeed if retried (an unreachable peer).
    EREMOTEIO = 121,
}

impl Errno {
    /// Every error number this project returns, by value.
    pub const ALL: &'static [Errno] = &[
        Errno::EPERM,
        Errno::ENOENT,
        Errno::EIO,
        Errno::ENXIO,
        Errno::EBADF,
        Errno::EAGAIN,
        Errno::ENOMEM,
        Errno::EACCES,
        Errno::EFAULT,
        Errno::EBUSY,
        Errno::ENODEV,
        Errno::EINVAL,
        Errno::ENOTTY,
        Errno::ERANGE,
        Errno::EOVERFLOW,
        Errno::EOPNOTSUPP,
        Errno::ETIMEDOUT,
        Errno::EREMOTEIO,
    ];

    /// The number.
    pub fn code(self) -> i32 {
        self as i32
    }

    /// The symbolic name, as `strerrorname_np` gives it.
    pub fn name(self) -> &'static str {
        match self {
            Errno::EPERM => "EPERM",
            Errno::ENOENT => "ENOENT",
            Errno::EIO => "EIO",
            Errno::ENXIO => "ENXIO",
            Errno::EBADF => "EBADF",
            Errno::EAGAIN => "EAGAIN",
            Errno::ENOMEM => "ENOMEM",
            Errno::EACCES => "EACCES",
            Errno::EFAULT => "EFAULT",
            Errno::EBUSY => "EBUSY",
            Errno::ENODEV => "ENODEV",
            Errno::EINVAL => "EINVAL",
            Errno::ENOTTY => "ENOTTY",
            Errno::ERANGE => "ERANGE",
            Errno::EOVERFLOW => "EOVERFLOW",
            Errno::EOPNOTSUPP => "EOPNOTSUPP",
            Errno::ETIMEDOUT => "ETIMEDOUT",
            Errno::EREMOTEIO => "EREMOTEIO",
        }
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Lets `err.errno() == 14` read as the kernel's C does.
impl PartialEq<i32> for Errno {
    fn eq(&self, other: &i32) -> bool {
        self.code() == *other
    }
}

impl From<Errno> for i32 {
    fn from(e: Errno) -> i32 {
        e.code()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_linuxs() {
        // A few from errno-base.h and errno.h, checked against libc.
        for (e, n) in [
            (Errno::EFAULT, libc_efault()),
            (Errno::EBUSY, 16),
            (Errno::EREMOTEIO, 121),
            (Errno::EAGAIN, 11),
        ] {
            assert_eq!(e.code(), n, "{e}");
            assert!(e == n);
        }
        assert_eq!(Errno::ENODEV.to_string(), "ENODEV");
    }

    fn libc_efault() -> i32 {
        rustix::io::Errno::FAULT.raw_os_error()
    }
}
