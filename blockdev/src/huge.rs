//! Memory for large I/O buffers, in 2 MiB-aligned mappings advised for transparent huge
//! pages.
//!
//! Why: an O_DIRECT request is a list of physically contiguous segments, and a buffer in
//! 4 KiB pages from the allocator is one segment per page. A virtio-blk disk typically takes
//! at most 254 segments per request (`/sys/block/*/queue/max_segments`), so the kernel
//! splits every 1 MiB read or write into a request of 1016 KiB and one of 8 KiB, and the
//! device (or the VMM behind it) pays per request and per segment. A buffer inside a huge
//! page is one segment. Measured with a 2 GiB copy on loopback onto a Firecracker virtio
//! disk (AMD EPYC, 2 vCPUs): read requests of 640 KiB → 1370 KiB on average (the block layer
//! can merge whole requests again), the copy 6.6–7.6 s → 4.2–4.5 s in three interleaved
//! pairs.
//!
//! Where the kernel has transparent huge pages off (`never`), or none is free when a page is
//! first touched, the memory is ordinary pages and everything works as before.
//!
//! Large buffers come in fixed [`SLOT_BYTES`] slots, two per 2 MiB region (a huge page
//! needs a whole aligned 2 MiB inside one mapping). Freed slots are kept for reuse, up to
//! [`FREE_SLOTS_MAX`]; beyond that a slot is unmapped (the kernel splits the huge page; the
//! other slot keeps its memory).

use std::ptr::NonNull;
use std::sync::Mutex;

/// A huge page on x86-64 and on arm64 with 4 KiB pages, and the alignment of every mapping.
pub(crate) const REGION_BYTES: usize = 2 << 20;

/// Size of a slot: the largest buffer the engine reads or writes in one request.
pub(crate) const SLOT_BYTES: usize = 1 << 20;

/// Buffers larger than this (and at most [`SLOT_BYTES`]) take a slot; smaller ones are
/// cheaper on the heap, and a request of at most 128 pages never needs splitting.
pub(crate) const SLOT_MIN_BYTES: usize = 512 << 10;

/// Freed slots kept for reuse (bounded memory: 32 MiB), so a migration does not map and
/// fault in fresh memory for every read.
const FREE_SLOTS_MAX: usize = 32;

/// A free slot: memory owned by the free list alone.
struct FreeSlot(NonNull<u8>);

// SAFETY: a free slot is referenced by nobody but the list; it moves to exactly one new
// owner in `take_slot`.
unsafe impl Send for FreeSlot {}

static FREE: Mutex<Vec<FreeSlot>> = Mutex::new(Vec::new());

/// Maps `bytes` (a multiple of [`REGION_BYTES`]) of zeroed, read-write anonymous memory at a
/// [`REGION_BYTES`]-aligned address and advises huge pages for it; `None` if the system is
/// out of address space or memory.
pub(crate) fn map(bytes: usize) -> Option<NonNull<u8>> {
    assert!(bytes > 0 && bytes.is_multiple_of(REGION_BYTES));
    // Over-map by one region, then unmap the unaligned head and the tail.
    let span = bytes.checked_add(REGION_BYTES)?;
    // SAFETY: an anonymous private mapping at an address of the kernel's choice touches no
    // existing memory.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            span,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return None;
    }
    let start = raw as usize;
    let aligned = start.next_multiple_of(REGION_BYTES);
    let head = aligned - start;
    let tail = span - head - bytes;
    // SAFETY: both ranges lie inside the mapping just made and outside [aligned, +bytes).
    unsafe {
        if head > 0 {
            libc::munmap(raw, head);
        }
        if tail > 0 {
            libc::munmap((aligned + bytes) as *mut libc::c_void, tail);
        }
    }
    // SAFETY: [aligned, +bytes) is our mapping. Failure (THP compiled out, or an old kernel)
    // only means ordinary pages.
    let advised =
        unsafe { libc::madvise(aligned as *mut libc::c_void, bytes, libc::MADV_HUGEPAGE) };
    if advised != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "madvise(MADV_HUGEPAGE) refused: I/O buffers use ordinary pages"
        );
    }
    NonNull::new(aligned as *mut u8)
}

/// Unmaps memory from [`map`] (all of it, or any page-aligned part).
///
/// # Safety
/// `[ptr, ptr + bytes)` must be mapped by [`map`] and referenced by nobody any more.
pub(crate) unsafe fn unmap(ptr: NonNull<u8>, bytes: usize) {
    // SAFETY: the caller guarantees the range is ours and unused.
    let result = unsafe { libc::munmap(ptr.as_ptr().cast(), bytes) };
    debug_assert_eq!(result, 0, "munmap of our own mapping failed");
}

/// A [`SLOT_BYTES`] slot, and whether it is fresh (all zeros); `None` when out of memory.
/// A reused slot holds the bytes of its last user in this process.
pub(crate) fn take_slot() -> Option<(NonNull<u8>, bool)> {
    let mut free = FREE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(FreeSlot(ptr)) = free.pop() {
        return Some((ptr, false));
    }
    let region = map(REGION_BYTES)?;
    // SAFETY: the region holds two slots; the second starts SLOT_BYTES in.
    let second = unsafe { region.add(SLOT_BYTES) };
    // Both slots are fresh; the second waits in the free list (which was empty, so it fits),
    // and is handed out as a reused slot: zeroed by callers that need zeros, like any other.
    free.push(FreeSlot(second));
    Some((region, true))
}

/// Gives back a slot from [`take_slot`].
///
/// # Safety
/// `ptr` must come from [`take_slot`] and be referenced by nobody any more.
pub(crate) unsafe fn give_slot(ptr: NonNull<u8>) {
    let mut free = FREE.lock().unwrap_or_else(|e| e.into_inner());
    if free.len() < FREE_SLOTS_MAX {
        free.push(FreeSlot(ptr));
        return;
    }
    drop(free);
    // SAFETY: the slot is ours and unused (the caller's promise).
    unsafe { unmap(ptr, SLOT_BYTES) };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `THPeligible` flag of the mapping holding `addr`, from `/proc/self/smaps`.
    fn thp_eligible(addr: usize) -> Option<bool> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ')
                && let Some((start, end)) = range.split_once('-')
                && let (Ok(start), Ok(end)) = (
                    usize::from_str_radix(start, 16),
                    usize::from_str_radix(end, 16),
                )
            {
                inside = (start..end).contains(&addr);
                continue;
            }
            if inside && let Some(value) = line.strip_prefix("THPeligible:") {
                return Some(value.trim() == "1");
            }
        }
        None
    }

    #[test]
    fn mappings_are_aligned_zeroed_and_advised_for_huge_pages() {
        let region = map(2 * REGION_BYTES).expect("map");
        assert_eq!(region.as_ptr() as usize % REGION_BYTES, 0);
        // SAFETY: the mapping is 4 MiB long and ours.
        let bytes = unsafe { std::slice::from_raw_parts_mut(region.as_ptr(), 2 * REGION_BYTES) };
        assert!(bytes.iter().all(|&b| b == 0));
        bytes.fill(1);
        let setting = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .unwrap_or_default();
        if setting.contains("[never]") || setting.is_empty() {
            eprintln!(
                "skipped the huge-page check: transparent huge pages are off here ({setting:?})"
            );
        } else {
            assert_eq!(
                thp_eligible(region.as_ptr() as usize),
                Some(true),
                "the mapping is eligible for huge pages (THP setting {setting:?})"
            );
        }
        // SAFETY: the whole mapping is ours and nothing references it any more.
        unsafe { unmap(region, 2 * REGION_BYTES) };
    }

    #[test]
    fn slots_are_aligned_reused_and_bounded() {
        let slots: Vec<_> = (0..FREE_SLOTS_MAX + 8)
            .map(|_| take_slot().expect("slot"))
            .collect();
        for (ptr, _) in &slots {
            assert_eq!(ptr.as_ptr() as usize % SLOT_BYTES, 0);
        }
        let mut distinct: Vec<_> = slots.iter().map(|(p, _)| p.as_ptr() as usize).collect();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), slots.len(), "no slot handed out twice");
        for (ptr, _) in slots {
            // SAFETY: every slot came from take_slot and is dropped here.
            unsafe { give_slot(ptr) };
        }
        let kept = FREE.lock().unwrap().len();
        assert!(kept <= FREE_SLOTS_MAX, "{kept} free slots kept");
    }
}
