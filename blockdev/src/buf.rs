//! Page-aligned I/O buffers and the pool of buffers registered with io_uring.
//!
//! O_DIRECT needs buffers aligned to the device's DIO memory alignment; 4096 bytes covers
//! every device we expect (`statx` reports 512 or 4096), so every [`IoBuf`] is 4096-aligned.
//! A buffer owns its memory until dropped, and is only ever lent to the kernel by a backend
//! that also owns the buffer for the whole time the kernel may touch it.

use std::alloc::{self, Layout};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::huge;

/// Alignment of every [`IoBuf`], in bytes.
pub(crate) const BUF_ALIGN: usize = 4096;

/// An owned, 4096-byte-aligned byte buffer for block I/O.
///
/// It derefs to `[u8]` of length [`IoBuf::len`]. Buffers from [`crate::BlockDevice::alloc_buf`]
/// may live in memory registered with io_uring (so the kernel can skip pinning pages on
/// each request); they go back to that pool when dropped.
pub struct IoBuf {
    /// Start of the allocation (heap) or of the pool slot; always `BUF_ALIGN`-aligned.
    ptr: NonNull<u8>,
    /// Bytes visible through `Deref`; never more than `capacity`.
    len: usize,
    /// Bytes owned at `ptr`.
    capacity: usize,
    /// Where the memory came from, and so how to give it back.
    owner: Owner,
}

enum Owner {
    /// Allocated with `alloc_zeroed(Layout(capacity, BUF_ALIGN))`.
    Heap,
    /// A huge-page slot (see [`crate::huge`]); `capacity` is the whole slot.
    Slot,
    /// Slot `index` of a registered pool; the `Arc` keeps the pool memory alive.
    Pool { pool: Arc<BufPool>, index: u16 },
    /// Aligned bytes that a `Bytes` keeps alive (see [`IoBuf::from_bytes`]); never written
    /// through: the first mutable access moves the buffer to a heap copy.
    Shared {
        /// Held for its memory only.
        _bytes: Bytes,
    },
}

// SAFETY: an IoBuf uniquely owns its memory (heap allocation or a pool slot that the pool
// hands to one buffer at a time), like a `Vec<u8>`, so moving it to another thread is sound.
unsafe impl Send for IoBuf {}
// SAFETY: shared access only yields `&[u8]`; mutation needs `&mut IoBuf`, as with `Vec<u8>`.
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// A heap buffer of `len` zero bytes.
    pub fn new_zeroed(len: usize) -> IoBuf {
        Self::heap(len, true)
    }

    /// A heap buffer of `len` bytes for a read or a copy that overwrites all of them: a
    /// reused allocation is not zeroed first, so until then it may hold bytes of an earlier
    /// buffer of this process (never uninitialised memory). See
    /// [`crate::BlockDevice::alloc_read_buf`].
    pub fn for_overwrite(len: usize) -> IoBuf {
        Self::heap(len, false)
    }

    fn heap(len: usize, zero: bool) -> IoBuf {
        // Round up so the allocation is never zero-sized (not allowed by `alloc`) and so a
        // whole number of pages is owned, which O_DIRECT reads may fill.
        let capacity = len.max(1).next_multiple_of(BUF_ALIGN);
        if let Some((ptr, fresh)) = take_slot_for(capacity) {
            if zero && !fresh {
                // SAFETY: the slot has `SLOT_BYTES >= len` bytes and is ours alone.
                unsafe { ptr.as_ptr().write_bytes(0, len) };
            }
            return IoBuf {
                ptr,
                len,
                capacity: huge::SLOT_BYTES,
                owner: Owner::Slot,
            };
        }
        if let Some(ptr) = heap_cache::take(capacity) {
            if zero {
                // SAFETY: the cached allocation has `capacity >= len` bytes and is owned by
                // nobody else once taken from the cache.
                unsafe { ptr.as_ptr().write_bytes(0, len) };
            }
            return IoBuf {
                ptr,
                len,
                capacity,
                owner: Owner::Heap,
            };
        }
        let layout = heap_layout(capacity);
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        IoBuf {
            ptr,
            len,
            capacity,
            owner: Owner::Heap,
        }
    }

    /// A heap buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> IoBuf {
        let len = data.len();
        let capacity = len.max(1).next_multiple_of(BUF_ALIGN);
        let (ptr, capacity, owner) = match take_slot_for(capacity) {
            Some((ptr, _)) => (ptr, huge::SLOT_BYTES, Owner::Slot),
            None => (Self::heap_for_copy(len, capacity), capacity, Owner::Heap),
        };
        // SAFETY: `ptr` owns `capacity >= len` bytes that nothing else references, and `data`
        // cannot overlap a fresh or cached allocation. Copying (instead of zeroing, then
        // copying) saves a pass over the buffer on the target's write path.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), ptr.as_ptr(), len) };
        IoBuf {
            ptr,
            len,
            capacity,
            owner,
        }
    }

    /// A heap allocation of `capacity` bytes whose first `len` bytes the caller overwrites.
    fn heap_for_copy(len: usize, capacity: usize) -> NonNull<u8> {
        match heap_cache::take(capacity) {
            Some(ptr) => ptr,
            None => {
                let layout = heap_layout(capacity);
                // SAFETY: the layout has a non-zero size. The bytes past `len` stay
                // uninitialised until zeroed below; the first `len` are copied over.
                let raw = unsafe { alloc::alloc(layout) };
                let Some(ptr) = NonNull::new(raw) else {
                    alloc::handle_alloc_error(layout)
                };
                // SAFETY: `capacity >= len` bytes are allocated at `ptr`. The tail is zeroed
                // so that every byte an O_DIRECT read may fill is initialised.
                unsafe { ptr.as_ptr().add(len).write_bytes(0, capacity - len) };
                ptr
            }
        }
    }

    /// A buffer of the bytes of `bytes`, without a copy when they start at an address aligned
    /// for O_DIRECT: the target writes frame payloads that the transport read into aligned
    /// buffers this way. Such a buffer is for writing from; a read into it (any mutable
    /// access) first moves it to a heap copy. Unaligned bytes are copied at once.
    pub fn from_bytes(bytes: Bytes) -> IoBuf {
        if !(bytes.as_ptr() as usize).is_multiple_of(BUF_ALIGN) || bytes.is_empty() {
            return Self::from_slice(&bytes);
        }
        let len = bytes.len();
        // The pointer is only ever read through (see `DerefMut`).
        let ptr = NonNull::new(bytes.as_ptr().cast_mut()).expect("non-empty Bytes is non-null");
        IoBuf {
            ptr,
            len,
            capacity: len,
            owner: Owner::Shared { _bytes: bytes },
        }
    }

    /// Number of bytes in the buffer.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Shortens the buffer to `len` bytes; does nothing if `len` is not shorter.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// The registered-buffer index and pool identity, if this buffer lives in a pool.
    pub(crate) fn pool_slot(&self) -> Option<(&Arc<BufPool>, u16)> {
        match &self.owner {
            Owner::Heap | Owner::Slot | Owner::Shared { .. } => None,
            Owner::Pool { pool, index } => Some((pool, *index)),
        }
    }
}

/// A huge-page slot for a buffer of `capacity` bytes, if it is large enough to want one
/// (see [`crate::huge`]), with whether it is fresh (zeroed).
fn take_slot_for(capacity: usize) -> Option<(NonNull<u8>, bool)> {
    if capacity <= huge::SLOT_MIN_BYTES || capacity > huge::SLOT_BYTES {
        return None;
    }
    huge::take_slot()
}

fn heap_layout(capacity: usize) -> Layout {
    match Layout::from_size_align(capacity, BUF_ALIGN) {
        Ok(layout) => layout,
        // Only reachable for sizes near isize::MAX, which no allocator could satisfy anyway.
        Err(_) => alloc::handle_alloc_error(Layout::new::<u8>()),
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        match &self.owner {
            Owner::Heap => {
                if heap_cache::give(self.ptr, self.capacity) {
                    return;
                }
                // SAFETY: `ptr` came from `alloc_zeroed` with exactly this layout and is
                // freed only here, once.
                unsafe { alloc::dealloc(self.ptr.as_ptr(), heap_layout(self.capacity)) }
            }
            // SAFETY: the slot came from `take_slot` and this buffer was its only user.
            Owner::Slot => unsafe { huge::give_slot(self.ptr) },
            Owner::Pool { pool, index } => pool.release(*index),
            Owner::Shared { .. } => {}
        }
    }
}

impl Deref for IoBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `capacity >= len` initialised bytes (zeroed at
        // allocation or hand-out), owned by this buffer, and aliased only through `&self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        if matches!(self.owner, Owner::Shared { .. }) {
            // Shared bytes are never written: copy them to memory of our own first.
            *self = IoBuf::from_slice(self);
        }
        // SAFETY: as in `deref`, and `&mut self` guarantees exclusive access; the memory is
        // the buffer's own (heap or pool slot), never shared bytes.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

/// Lets a filled buffer become `bytes::Bytes::from_owner(buf)` without a copy.
impl AsRef<[u8]> for IoBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

/// Lets the transport read a frame's payload straight into a buffer.
impl AsMut<[u8]> for IoBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        self
    }
}

impl fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoBuf")
            .field("len", &self.len)
            .field("capacity", &self.capacity)
            .field("pool_index", &self.pool_slot().map(|(_, index)| index))
            .finish()
    }
}

/// A small process-wide cache of freed heap buffers.
///
/// A migration allocates and frees a buffer per read; fresh allocations of large sizes come
/// from `mmap`, so every one costs page faults and the kernel's page clearing (measured with
/// 1 MiB buffers, before those moved to [`crate::huge`]'s slots: ~9 % of the source's CPU in
/// a copy). Reusing recently freed buffers keeps their pages mapped. Buffers are zeroed again when handed out, so no data crosses between users, except
/// to buffers for overwriting ([`IoBuf::for_overwrite`]), which a read or a copy fills whole
/// before anyone looks.
mod heap_cache {
    use std::ptr::NonNull;
    use std::sync::Mutex;

    /// Buffers kept at most (bounded memory: 32 × 1 MiB).
    const ENTRIES_MAX: usize = 32;
    /// Larger buffers are not cached.
    const CAPACITY_MAX: usize = 1 << 20;

    struct Entry {
        ptr: NonNull<u8>,
        capacity: usize,
    }

    // SAFETY: an entry is an allocation owned by the cache alone; it is handed to exactly one
    // new owner by `take`.
    unsafe impl Send for Entry {}

    static CACHE: Mutex<Vec<Entry>> = Mutex::new(Vec::new());

    /// An allocation of exactly `capacity` bytes, if one is cached.
    pub(super) fn take(capacity: usize) -> Option<NonNull<u8>> {
        let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
        let index = cache.iter().position(|e| e.capacity == capacity)?;
        Some(cache.swap_remove(index).ptr)
    }

    /// Keeps a freed allocation; false when the caller must free it itself.
    pub(super) fn give(ptr: NonNull<u8>, capacity: usize) -> bool {
        if capacity > CAPACITY_MAX {
            return false;
        }
        let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= ENTRIES_MAX {
            return false;
        }
        cache.push(Entry { ptr, capacity });
        true
    }
}

/// A fixed set of equal-sized, aligned slots carved out of one allocation, registered with
/// an io_uring so `ReadFixed`/`WriteFixed` can use them.
///
/// The pool is shared (`Arc`) by the ring thread and by every buffer handed out, so its
/// memory outlives both the ring (which unregisters on close) and the last buffer.
pub(crate) struct BufPool {
    base: NonNull<u8>,
    /// Bytes mapped at `base` (the slots, rounded up to whole huge pages).
    mapped_bytes: usize,
    slot_bytes: usize,
    slots: usize,
    free: Mutex<Vec<u16>>,
}

// SAFETY: the pool memory is only reached through `IoBuf`s, each owning one slot
// exclusively; the free list is behind a mutex.
unsafe impl Send for BufPool {}
// SAFETY: see `Send`; `&BufPool` only allows taking and returning slots under the mutex.
unsafe impl Sync for BufPool {}

impl BufPool {
    /// Allocates `slots` zeroed slots of `slot_bytes` (a multiple of `BUF_ALIGN`).
    pub(crate) fn new(slots: u16, slot_bytes: usize) -> Option<Arc<BufPool>> {
        if slots == 0 || slot_bytes == 0 || !slot_bytes.is_multiple_of(BUF_ALIGN) {
            return None;
        }
        let total = slot_bytes
            .checked_mul(usize::from(slots))?
            .checked_next_multiple_of(huge::REGION_BYTES)?;
        // In huge pages, like every large buffer (see `crate::huge`).
        let base = huge::map(total)?;
        Some(Arc::new(BufPool {
            base,
            mapped_bytes: total,
            slot_bytes,
            slots: usize::from(slots),
            // Reversed so slot 0 is handed out first, which keeps tests readable.
            free: Mutex::new((0..slots).rev().collect()),
        }))
    }

    /// One `iovec` per slot, in index order, for `register_buffers`.
    pub(crate) fn iovecs(&self) -> Vec<libc::iovec> {
        (0..self.slots)
            .map(|index| libc::iovec {
                iov_base: self.slot_ptr(index).as_ptr().cast(),
                iov_len: self.slot_bytes,
            })
            .collect()
    }

    fn slot_ptr(&self, index: usize) -> NonNull<u8> {
        debug_assert!(index < self.slots);
        // SAFETY: `index < slots`, so the offset stays inside the single allocation.
        unsafe { self.base.add(index * self.slot_bytes) }
    }

    /// Hands out a slot as a buffer of `len` bytes, zeroed if `zero` (otherwise holding
    /// whatever its last user left: only for reads that overwrite it all), or `None` if
    /// `len` does not fit a slot or every slot is in use.
    pub(crate) fn take(self: &Arc<BufPool>, len: usize, zero: bool) -> Option<IoBuf> {
        if len > self.slot_bytes {
            return None;
        }
        let index = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop()?;
        let ptr = self.slot_ptr(usize::from(index));
        // Zero on hand-out so a pooled buffer reads like `IoBuf::new_zeroed`, and so no
        // data from a previous request (possibly another VM's) leaks to the caller.
        if zero {
            // SAFETY: the slot is `slot_bytes >= len` bytes inside the pool allocation, and
            // was just removed from the free list, so nothing else references it.
            unsafe { ptr.as_ptr().write_bytes(0, len) };
        }
        Some(IoBuf {
            ptr,
            len,
            capacity: self.slot_bytes,
            owner: Owner::Pool {
                pool: Arc::clone(self),
                index,
            },
        })
    }

    fn release(&self, index: u16) {
        self.free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(index);
    }
}

impl Drop for BufPool {
    fn drop(&mut self) {
        // SAFETY: `base` came from `huge::map(mapped_bytes)`. Every `IoBuf` holds an `Arc`
        // to the pool, so none is left pointing into it.
        unsafe { huge::unmap(self.base, self.mapped_bytes) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_zeroed_and_truncatable() {
        for len in [0, 1, 4095, 4096, 4097, 1 << 20] {
            let mut buf = IoBuf::new_zeroed(len);
            assert_eq!(buf.len(), len);
            assert_eq!(buf.as_ptr() as usize % BUF_ALIGN, 0);
            assert!(buf.iter().all(|&b| b == 0));
            buf.truncate(len / 2);
            assert_eq!(buf.len(), len / 2);
        }
        let buf = IoBuf::from_slice(b"abc");
        assert_eq!(&buf[..], b"abc");
    }

    #[test]
    fn aligned_bytes_become_a_buffer_without_a_copy_and_are_never_written() {
        let mut filled = IoBuf::for_overwrite(8192);
        filled.fill(5);
        let bytes = Bytes::from_owner(filled);
        let mut buf = IoBuf::from_bytes(bytes.clone());
        assert_eq!(buf.as_ptr(), bytes.as_ptr(), "aligned bytes are not copied");
        assert_eq!(&buf[..], &bytes[..]);
        assert!(buf.pool_slot().is_none());
        // A mutable access (a read into it) moves it to its own memory first.
        buf[0] = 9;
        assert_ne!(buf.as_ptr(), bytes.as_ptr());
        assert_eq!(buf.as_ptr() as usize % BUF_ALIGN, 0);
        assert_eq!((buf[0], buf[1], bytes[0]), (9, 5, 5));
        // A slice at an aligned offset is still shared; an unaligned one is copied.
        let slice = IoBuf::from_bytes(bytes.slice(4096..));
        assert_eq!(slice.as_ptr(), bytes[4096..].as_ptr());
        let unaligned = IoBuf::from_bytes(bytes.slice(1..100));
        assert_eq!(unaligned.as_ptr() as usize % BUF_ALIGN, 0);
        assert_eq!(&unaligned[..], &bytes[1..100]);
        assert!(IoBuf::from_bytes(Bytes::new()).is_empty());
    }

    #[test]
    fn pool_hands_out_each_slot_once_and_takes_it_back_on_drop() {
        let pool = BufPool::new(2, BUF_ALIGN).expect("pool");
        let mut first = pool.take(10, true).expect("slot");
        first.fill(7);
        let second = pool.take(BUF_ALIGN, true).expect("slot");
        assert!(pool.take(1, true).is_none(), "pool should be exhausted");
        assert!(
            pool.take(BUF_ALIGN + 1, true).is_none(),
            "too large for a slot"
        );
        drop(first);
        let again = pool.take(10, true).expect("slot returned");
        assert!(again.iter().all(|&b| b == 0), "reused slot must be zeroed");
        assert_ne!(
            again.pool_slot().map(|s| s.1),
            second.pool_slot().map(|s| s.1)
        );
        // A slot taken for a read keeps its last bytes (the read overwrites them all);
        // zeroing is skipped, nothing else changes.
        let mut again = again;
        again.fill(9);
        drop(again);
        let read = pool.take(10, false).expect("slot returned");
        assert_eq!(read.len(), 10);
        assert!(read.iter().all(|&b| b == 9), "a read slot is not zeroed");
    }
}
