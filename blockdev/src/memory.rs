//! An in-memory device with fault injection, for tests of the engine and drivers.
//!
//! Requests run on one worker thread (the same [`WorkerPool`] as the sync backend), so
//! callbacks run off the submitting thread exactly as with real disks, and requests
//! execute in submission order. Faults follow the FoundationDB/TigerBeetle rule: they
//! are explicit, armed per test through [`MemoryFaults`], and tagged "injected fault" so
//! logs tell them apart from real errors.

use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::device::{Backend, IoOp, Request};
use crate::error::{BlockError, BlockErrorKind, INJECTED_TAG, OpKind};
use crate::sync::{Executor, WorkerPool};

/// Granularity of [`crate::BlockDevice::allocated_extents`] on memory devices.
const EXTENT_BLOCK_BYTES: usize = 4096;

#[derive(Default)]
struct FaultState {
    /// Per op kind: fail the next `count` ops of that kind with this error kind.
    next: [Option<(BlockErrorKind, u32)>; OpKind::ALL.len()],
    /// Reads and writes overlapping any of these ranges fail.
    ranges: Vec<(Range<u64>, BlockErrorKind)>,
}

struct MemoryShared {
    data: Mutex<Vec<u8>>,
    faults: Mutex<FaultState>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread must not turn every later access into a second panic.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl MemoryShared {
    /// The injected error for `op`, if a fault is armed for it; consumes one `fail_next`.
    fn injected_fault(&self, op: &IoOp) -> Option<BlockError> {
        let mut faults = lock(&self.faults);
        let slot = &mut faults.next[op.kind().index()];
        if let Some((kind, count)) = slot {
            let kind = *kind;
            *count -= 1;
            if *count == 0 {
                *slot = None;
            }
            return Some(op.error(kind).with_message(INJECTED_TAG));
        }
        if matches!(op, IoOp::Read { .. } | IoOp::Write { .. }) {
            let start = op.offset();
            let end = start + op.len();
            let hit = faults
                .ranges
                .iter()
                .find(|(range, _)| range.start < end && start < range.end);
            if let Some((range, kind)) = hit {
                return Some(
                    op.error(*kind)
                        .with_message(format!("{INJECTED_TAG} (range {range:?})")),
                );
            }
        }
        None
    }
}

impl Executor for MemoryShared {
    fn execute(&self, op: &mut IoOp) -> Result<usize, BlockError> {
        if let Some(error) = self.injected_fault(op) {
            return Err(error);
        }
        // `BlockDevice::submit` has checked the range against the size, which equals
        // `data.len()`, so these conversions and slices are in bounds.
        let start = op.offset() as usize;
        let end = start + op.len() as usize;
        let mut data = lock(&self.data);
        match op {
            IoOp::Read { buf, .. } => buf.copy_from_slice(&data[start..end]),
            IoOp::Write { buf, .. } => data[start..end].copy_from_slice(buf),
            IoOp::Flush => {}
            IoOp::Discard { .. } | IoOp::WriteZeroes { .. } => data[start..end].fill(0),
        }
        Ok(end - start)
    }
}

/// The memory backend: a worker thread over shared bytes.
pub(crate) struct MemoryBackend {
    pool: WorkerPool,
    shared: Arc<MemoryShared>,
}

impl MemoryBackend {
    /// A zeroed device of `size` bytes.
    ///
    /// Test-only by nature: a size that does not fit in memory aborts like any allocation.
    pub(crate) fn new(size: u64) -> (MemoryBackend, MemoryFaults) {
        let bytes = usize::try_from(size).unwrap_or(usize::MAX);
        let shared = Arc::new(MemoryShared {
            data: Mutex::new(vec![0; bytes]),
            faults: Mutex::new(FaultState::default()),
        });
        let pool = match WorkerPool::new("tern-blockdev-memory", 1, Arc::clone(&shared)) {
            Ok(pool) => pool,
            // Failing to start one thread means the process is out of resources; a test
            // device has no sensible way to continue.
            Err(error) => panic!("cannot start the memory device thread: {error}"),
        };
        let faults = MemoryFaults {
            shared: Arc::clone(&shared),
        };
        (MemoryBackend { pool, shared }, faults)
    }
}

impl Backend for MemoryBackend {
    fn submit(&self, request: Request) {
        self.pool.submit(request);
    }

    fn allocated_extents(&self) -> Result<Vec<Range<u64>>, BlockError> {
        let data = lock(&self.shared.data);
        let mut extents: Vec<Range<u64>> = Vec::new();
        for (index, block) in data.chunks(EXTENT_BLOCK_BYTES).enumerate() {
            if block.iter().all(|&byte| byte == 0) {
                continue;
            }
            let start = (index * EXTENT_BLOCK_BYTES) as u64;
            let end = start + block.len() as u64;
            match extents.last_mut() {
                Some(last) if last.end == start => last.end = end,
                _ => extents.push(start..end),
            }
        }
        Ok(extents)
    }
}

/// Handle to inject faults into a memory device and to inspect its bytes.
///
/// Cloning shares the device; the handle stays usable after the device is dropped.
#[derive(Clone)]
pub struct MemoryFaults {
    shared: Arc<MemoryShared>,
}

impl std::fmt::Debug for MemoryFaults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryFaults").finish_non_exhaustive()
    }
}

impl MemoryFaults {
    /// Makes the next `count` ops of kind `op` fail with `kind` (replacing any earlier
    /// `fail_next` for that op kind; `count == 0` disarms it).
    pub fn fail_next(&self, op: OpKind, kind: BlockErrorKind, count: u32) {
        lock(&self.shared.faults).next[op.index()] = (count > 0).then_some((kind, count));
    }

    /// Makes every read or write overlapping `range` fail with `kind` until [`clear`].
    ///
    /// [`clear`]: MemoryFaults::clear
    pub fn fail_range(&self, range: Range<u64>, kind: BlockErrorKind) {
        lock(&self.shared.faults).ranges.push((range, kind));
    }

    /// Disarms every fault.
    pub fn clear(&self) {
        *lock(&self.shared.faults) = FaultState::default();
    }

    /// A copy of the device's current bytes.
    pub fn contents(&self) -> Vec<u8> {
        lock(&self.shared.data).clone()
    }
}
