//! The C allocator's policy for a process that streams a disk through memory.
//!
//! Why: a migration allocates and frees the same sizes thousands of times a second — quinn
//! copies every received datagram (up to 64 KiB) into a fresh allocation, frames and
//! compression scratch come and go per chunk. glibc's malloc gives the top of its heap
//! back to the kernel whenever more than 128 KiB of it is free (`M_TRIM_THRESHOLD`) and
//! serves requests over a moving threshold with fresh `mmap`s, so each burst of traffic
//! faults in and zeroes new pages that the previous burst had just returned. Measured on a
//! 2 GiB loopback copy (`tern serve` + `tern migrate`, AMD EPYC, 2 vCPUs, 4 interleaved
//! runs): the target's system time 0.76–1.43 s with glibc's defaults, 0.48–0.59 s with the
//! thresholds below, user time unchanged, peak RSS unchanged (51–57 MiB).
//!
//! Keeping up to [`TRIM_THRESHOLD_BYTES`] of freed heap does not raise the peak: it is memory
//! the process had in use a moment before. This changes process-wide state, so a library
//! never does it behind its embedder's back: the `tern` binary calls [`tune_allocator`] at
//! start, and an embedding VMM may call it (or set `GLIBC_TUNABLES` itself).

/// Freed memory at the top of a heap that malloc keeps instead of returning it.
pub const TRIM_THRESHOLD_BYTES: usize = 64 << 20;

/// Requests up to this size come from the heap (and are reused) rather than from a fresh
/// mapping each time.
pub const MMAP_THRESHOLD_BYTES: usize = 4 << 20;

/// Sets glibc malloc's trim and mmap thresholds for streaming (see the module
/// documentation). Returns whether the allocator took them: `false` on other C libraries
/// (where this does nothing) or if glibc refused.
pub fn tune_allocator() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let set = |param, bytes: usize| {
            let value = libc::c_int::try_from(bytes).expect("threshold fits in a C int");
            // SAFETY: mallopt only updates malloc's tunables under its own lock; any value is
            // valid input (glibc rejects out-of-range ones by returning 0).
            unsafe { libc::mallopt(param, value) == 1 }
        };
        set(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
            & set(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn glibc_takes_the_thresholds() {
        assert!(tune_allocator());
        // Allocations work as before afterwards, small and large.
        let small = vec![7u8; 64 << 10];
        let large = vec![9u8; 8 << 20];
        assert_eq!(
            small[..].iter().map(|&b| b as usize).sum::<usize>(),
            7 * (64 << 10)
        );
        assert_eq!(large[large.len() - 1], 9);
    }
}
