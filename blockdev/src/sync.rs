//! The portable backend: a few threads doing blocking `pread`/`pwrite`/`fdatasync`/
//! `fallocate`, fed by a bounded queue.
//!
//! It is always available (no io_uring, no special privileges), which makes it the
//! fallback where io_uring is blocked and the backend CI exercises everywhere. The same
//! [`WorkerPool`] also runs the memory backend, so both share the queueing, shutdown and
//! callback rules.

use std::ops::Range;
use std::sync::Arc;
use std::thread::{self, JoinHandle, ThreadId};

use crate::device::{Backend, IoOp, Request};
use crate::error::{BlockError, BlockErrorKind};
use crate::file::FileTarget;
use crate::queue::{BoundedQueue, mark_io_thread};

/// Worker threads per file device: enough to keep a few requests in flight on a disk
/// without the thread count of a pread-per-request design.
const SYNC_WORKERS: usize = 4;

/// Requests that may wait for a worker before `submit` blocks (backpressure).
pub(crate) const QUEUE_CAPACITY: usize = 128;

/// Something that performs one op with blocking calls.
pub(crate) trait Executor: Send + Sync + 'static {
    fn execute(&self, op: &mut IoOp) -> Result<usize, BlockError>;
}

impl Executor for FileTarget {
    fn execute(&self, op: &mut IoOp) -> Result<usize, BlockError> {
        FileTarget::execute(self, op)
    }
}

/// Threads draining one bounded queue of requests through an [`Executor`].
///
/// Dropping the pool closes the queue; workers finish every queued request (running its
/// callback) before exiting, and the drop waits for them unless it runs on a worker
/// itself (a callback dropping the last device handle), where waiting would deadlock.
pub(crate) struct WorkerPool {
    queue: Arc<BoundedQueue<Request>>,
    workers: Vec<JoinHandle<()>>,
    worker_ids: Vec<ThreadId>,
}

impl WorkerPool {
    pub(crate) fn new<E: Executor>(
        name: &str,
        threads: usize,
        executor: Arc<E>,
    ) -> Result<WorkerPool, BlockError> {
        let queue = Arc::new(BoundedQueue::new(QUEUE_CAPACITY));
        let mut pool = WorkerPool {
            queue: Arc::clone(&queue),
            workers: Vec::with_capacity(threads),
            worker_ids: Vec::with_capacity(threads),
        };
        for index in 0..threads {
            let queue = Arc::clone(&queue);
            let executor = Arc::clone(&executor);
            let spawned = thread::Builder::new()
                .name(format!("{name}-{index}"))
                .spawn(move || worker(&queue, &*executor));
            match spawned {
                Ok(handle) => {
                    pool.worker_ids.push(handle.thread().id());
                    pool.workers.push(handle);
                }
                // Dropping `pool` stops the workers already started.
                Err(error) => return Err(BlockError::from_io(None, 0, error)),
            }
        }
        Ok(pool)
    }

    /// Queues `request`, completing it with `Closed` if the pool is shutting down.
    pub(crate) fn submit(&self, request: Request) {
        if let Err(request) = self.queue.push(request) {
            let error = request.op.error(BlockErrorKind::Closed);
            request.finish(Err(error));
        }
    }
}

fn worker<E: Executor + ?Sized>(queue: &BoundedQueue<Request>, executor: &E) {
    mark_io_thread();
    while let Some(mut request) = queue.pop_blocking() {
        let result = match request.rejected.take() {
            Some(error) => Err(error),
            None => executor.execute(&mut request.op),
        };
        request.finish(result);
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        self.queue.close();
        let current = thread::current().id();
        if self.worker_ids.contains(&current) {
            // Detach: the workers exit on their own once the queue is drained.
            return;
        }
        for handle in self.workers.drain(..) {
            if handle.join().is_err() {
                tracing::error!("a block-device worker thread panicked");
            }
        }
    }
}

/// The sync backend for one file or block device.
pub(crate) struct SyncBackend {
    pool: WorkerPool,
    target: Arc<FileTarget>,
}

impl SyncBackend {
    pub(crate) fn new(target: Arc<FileTarget>) -> Result<SyncBackend, BlockError> {
        let pool = WorkerPool::new("tern-blockdev-sync", SYNC_WORKERS, Arc::clone(&target))
            .map_err(|error| error.with_path(Some(target.path())))?;
        Ok(SyncBackend { pool, target })
    }
}

impl Backend for SyncBackend {
    fn submit(&self, request: Request) {
        self.pool.submit(request);
    }

    fn allocated_extents(&self) -> Result<Vec<Range<u64>>, BlockError> {
        self.target.allocated_extents()
    }
}
