//! The bytes behind a region: one sparse anonymous mapping of the host process, made
//! with `MAP_NORESERVE` so that a terabyte of emulated device memory costs nothing until
//! its frames are touched.
//!
//! This is the one file of the crate with `unsafe`: it owns the mapping and every
//! access to it. The mapping is never handed out as a Rust reference: every access is a
//! bounds-checked raw copy (`ptr::copy_nonoverlapping`, memcpy's speed) into or out of
//! a caller's buffer, so no `&[u8]` into it ever exists for the compiler to assume
//! stable. Two threads copying the same bytes at once is a race this layer does not
//! prevent, as memory hardware does not: the DMA rules above it (pins, in-flight
//! tracking, the sanitizer) are what keep a correct program free of such races. No
//! access ever leaves the mapping, which every method checks first.

use std::ptr::NonNull;

use crate::mem::MemError;

/// An anonymous private mapping of `len` bytes.
///
/// # Invariants
/// `ptr` is the start of a live mapping of exactly `len` bytes, readable and writable,
/// owned by this value and unmapped on drop.
pub struct Backing {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; all access goes through
// bounds-checked raw copies, so sharing the pointer between threads is no more than
// sharing memory with a device.
unsafe impl Send for Backing {}
// SAFETY: as for Send; `&Backing` only offers those checked copies.
unsafe impl Sync for Backing {}

impl Backing {
    /// Maps `len` bytes (a multiple of the page size) without reserving swap.
    pub fn new(len: usize) -> Result<Self, MemError> {
        use rustix::mm::{mmap_anonymous, MapFlags, ProtFlags};
        // SAFETY: a fresh anonymous mapping at an address the kernel chooses cannot
        // alias any existing Rust object.
        let ptr = unsafe {
            mmap_anonymous(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE | MapFlags::NORESERVE,
            )
        }
        .map_err(|e| MemError::Backing {
            len: len as u64,
            reason: e.to_string(),
        })?;
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or(MemError::Backing {
            len: len as u64,
            reason: "mmap returned null".to_string(),
        })?;
        Ok(Backing { ptr, len })
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never: regions have at least one frame).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, off: usize, n: usize) {
        assert!(
            off.checked_add(n).is_some_and(|end| end <= self.len),
            "backing access {off:#x}+{n:#x} outside {:#x} bytes",
            self.len
        );
    }

    /// Copies `dst.len()` bytes from offset `off`.
    pub fn read(&self, off: usize, dst: &mut [u8]) {
        self.check(off, dst.len());
        // SAFETY: `check` keeps [off, off + len) inside the mapping (invariant), and
        // `dst` is a distinct Rust buffer.
        unsafe { raw_copy(self.ptr.as_ptr().add(off), dst.as_mut_ptr(), dst.len()) }
    }

    /// Copies `src` to offset `off`.
    pub fn write(&self, off: usize, src: &[u8]) {
        self.check(off, src.len());
        // SAFETY: as in `read`, with the roles of the buffers swapped.
        unsafe { raw_copy(src.as_ptr(), self.ptr.as_ptr().add(off), src.len()) }
    }

    /// Copies `n` bytes inside the mapping from `src` to `dst` (ranges must not overlap).
    pub fn copy_within(&self, src: usize, dst: usize, n: usize) {
        self.check(src, n);
        self.check(dst, n);
        assert!(src + n <= dst || dst + n <= src, "overlapping frame copy");
        // SAFETY: both ranges are inside the mapping and do not overlap.
        unsafe { raw_copy(self.ptr.as_ptr().add(src), self.ptr.as_ptr().add(dst), n) }
    }

    /// Copies `n` bytes from this mapping at `src` to `other` at `dst`.
    pub fn copy_to(&self, src: usize, other: &Backing, dst: usize, n: usize) {
        self.check(src, n);
        other.check(dst, n);
        // SAFETY: both ranges are inside their mappings; two mappings never overlap.
        unsafe { raw_copy(self.ptr.as_ptr().add(src), other.ptr.as_ptr().add(dst), n) }
    }

    /// Copies `n` bytes as a DMA copy engine does: a large run is written around the
    /// CPU caches (non-temporal stores), so it neither reads the destination first nor
    /// evicts what the CPU is working on; a small one is an ordinary copy. `other` may
    /// be this mapping, with ranges that do not overlap.
    pub fn engine_copy_to(&self, src: usize, other: &Backing, dst: usize, n: usize) {
        self.check(src, n);
        other.check(dst, n);
        if std::ptr::eq(self, other) {
            assert!(src + n <= dst || dst + n <= src, "overlapping frame copy");
        }
        // SAFETY: both ranges are inside their mappings (checked) and do not overlap
        // (two mappings never do; within one, asserted).
        unsafe { stream_copy(self.ptr.as_ptr().add(src), other.ptr.as_ptr().add(dst), n) }
    }

    /// Zeroes `n` bytes at `off`.
    pub fn zero(&self, off: usize, n: usize) {
        self.check(off, n);
        // SAFETY: `check` keeps [off, off + n) inside the mapping (invariant).
        unsafe { self.ptr.as_ptr().add(off).write_bytes(0, n) }
    }

    /// Returns the backing pages of `[off, off + n)` to the host (`MADV_DONTNEED`): they
    /// read as zeros afterwards and cost no memory until written again.
    pub fn discard(&self, off: usize, n: usize) {
        self.check(off, n);
        // SAFETY: the range is inside the mapping; DONTNEED on a private anonymous
        // mapping only replaces its contents with zeros, which no Rust reference observes
        // because none is ever handed out.
        let _ = unsafe {
            rustix::mm::madvise(
                self.ptr.as_ptr().add(off).cast(),
                n,
                rustix::mm::Advice::LinuxDontNeed,
            )
        };
    }
}

/// Copies `n` bytes.
///
/// # Safety
/// `src` must be valid for `n` byte reads and `dst` for `n` byte writes, and the two
/// ranges must not overlap.
unsafe fn raw_copy(src: *const u8, dst: *mut u8, n: usize) {
    // SAFETY: the caller's contract is exactly copy_nonoverlapping's.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, n) }
}

/// Runs at least this long are copied with non-temporal stores (a 2 MiB migration step
/// is; a single 4 KiB page is not).
const STREAM_MIN: usize = 256 << 10;

/// `raw_copy` with non-temporal stores for long runs whose destination is 16-byte
/// aligned (frames are page aligned), on x86_64; an ordinary copy otherwise.
///
/// # Safety
/// As [`raw_copy`].
unsafe fn stream_copy(src: *const u8, dst: *mut u8, n: usize) {
    #[cfg(target_arch = "x86_64")]
    if n >= STREAM_MIN && (dst as usize).is_multiple_of(16) {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};
        let blocks = n / 64;
        for b in 0..blocks {
            // SAFETY: 64 * blocks <= n bytes lie inside both ranges (the caller's
            // contract); `dst + 64 * b` is 16-byte aligned because `dst` is; loads are
            // unaligned loads. SSE2 is part of the x86_64 baseline.
            unsafe {
                let s = src.add(b * 64).cast::<__m128i>();
                let d = dst.add(b * 64).cast::<__m128i>();
                let (x0, x1) = (_mm_loadu_si128(s), _mm_loadu_si128(s.add(1)));
                let (x2, x3) = (_mm_loadu_si128(s.add(2)), _mm_loadu_si128(s.add(3)));
                _mm_stream_si128(d, x0);
                _mm_stream_si128(d.add(1), x1);
                _mm_stream_si128(d.add(2), x2);
                _mm_stream_si128(d.add(3), x3);
            }
        }
        // SAFETY: the tail lies inside both ranges; the fence orders the streamed
        // stores before anything this thread does next (publishing the new page).
        unsafe {
            raw_copy(src.add(blocks * 64), dst.add(blocks * 64), n - blocks * 64);
            _mm_sfence();
        }
        return;
    }
    // SAFETY: the caller's contract.
    unsafe { raw_copy(src, dst, n) }
}

impl Drop for Backing {
    fn drop(&mut self) {
        // SAFETY: the mapping is owned by this value (invariant) and no reference into
        // it outlives `&self`.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_engine_copy_moves_every_byte_long_or_short_aligned_or_not() {
        // Long runs take the non-temporal path (16-byte aligned destination), the rest
        // the ordinary one; either way every byte arrives and nothing past the run is
        // touched.
        let a = Backing::new(4 << 20).unwrap();
        let b = Backing::new(4 << 20).unwrap();
        let data: Vec<u8> = (0..(STREAM_MIN as u32 * 2 + 77))
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        for (src, dst, n) in [
            (0, 4096, data.len()),
            (3, 8192, STREAM_MIN + 5),
            (0, 5, STREAM_MIN),
            (64, 0, 4096),
        ] {
            a.write(src, &data[..n]);
            b.write(dst + n, &[0xee]);
            a.engine_copy_to(src, &b, dst, n);
            let mut out = vec![0u8; n + 1];
            b.read(dst, &mut out);
            assert!(out[..n] == data[..n], "copy of {n} bytes to {dst}");
            assert_eq!(out[n], 0xee, "the byte after the run is untouched");
        }
        // Within one mapping too.
        a.write(3, &data[..STREAM_MIN + 5]);
        a.engine_copy_to(3, &a, 2 << 20, STREAM_MIN + 5);
        let mut out = vec![0u8; STREAM_MIN + 5];
        a.read(2 << 20, &mut out);
        assert!(out == data[..STREAM_MIN + 5], "copy within one mapping");
    }

    #[test]
    fn copies_at_any_alignment_round_trip() {
        let b = Backing::new(1 << 16).unwrap();
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 3) as u8).collect();
        for off in [0usize, 1, 7, 8, 4093] {
            b.write(off, &data);
            let mut out = vec![0u8; data.len()];
            b.read(off, &mut out);
            assert_eq!(out, data, "offset {off}");
        }
        b.copy_within(4093, 9000, 1000);
        let mut out = vec![0u8; 1000];
        b.read(9000, &mut out);
        assert_eq!(out, data);
        b.zero(9001, 998);
        b.read(9000, &mut out);
        assert_eq!(
            (out[0], out[1], out[998], out[999]),
            (data[0], 0, 0, data[999])
        );
        b.discard(0, 1 << 16);
        b.read(9000, &mut out);
        assert!(out.iter().all(|&x| x == 0), "discarded pages read as zeros");
    }

    #[test]
    #[should_panic(expected = "outside")]
    fn access_past_the_end_is_refused() {
        let b = Backing::new(4096).unwrap();
        b.write(4090, &[0u8; 8]);
    }

    #[test]
    fn a_terabyte_costs_nothing_until_touched() {
        let b = Backing::new(1 << 40).unwrap();
        b.write((1 << 40) - 8, &[1, 2, 3, 4, 5, 6, 7, 8]);
        let mut out = [0u8; 8];
        b.read((1 << 40) - 8, &mut out);
        assert_eq!(out, [1, 2, 3, 4, 5, 6, 7, 8]);
    }
}
