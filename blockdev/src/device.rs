//! The public device handle, its request types, and backend selection.
//!
//! [`BlockDevice`] is a cheap-to-clone handle around one backend. Its core is
//! [`BlockDevice::submit`]: hand over an [`IoOp`] (with its buffer) and a callback, and the
//! callback later receives a [`Completion`] with the buffer back. The async and `_blocking`
//! methods are thin wrappers over `submit`, so every caller, with or without a runtime,
//! goes through the same range checks and backends.

use std::fmt;
use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use crate::buf::IoBuf;
use crate::error::{BlockError, BlockErrorKind, OpKind};
use crate::file::FileTarget;
use crate::memory::{MemoryBackend, MemoryFaults};
use crate::probe;
use crate::queue::on_io_thread;
use crate::sync::SyncBackend;
use crate::uring::UringBackend;

/// One request to a device. The buffer travels with the request and comes back in the
/// [`Completion`], so the backend can own it for as long as the kernel might touch it.
#[derive(Debug)]
pub enum IoOp {
    /// Read `buf.len()` bytes at `offset` into `buf`.
    Read {
        /// Byte offset on the device.
        offset: u64,
        /// Destination; its length is the read length.
        buf: IoBuf,
    },
    /// Write all of `buf` at `offset`.
    Write {
        /// Byte offset on the device.
        offset: u64,
        /// Data to write.
        buf: IoBuf,
    },
    /// Make completed writes durable (`fdatasync`). Writes still in flight when the flush
    /// is submitted are not covered: wait for their completions first.
    Flush,
    /// Deallocate `len` bytes at `offset` (punch a hole); the range reads as zeros after.
    Discard {
        /// Byte offset on the device.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Make `len` bytes at `offset` read as zeros, keeping files sparse where possible.
    WriteZeroes {
        /// Byte offset on the device.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
}

impl IoOp {
    /// The kind of this operation.
    pub fn kind(&self) -> OpKind {
        match self {
            IoOp::Read { .. } => OpKind::Read,
            IoOp::Write { .. } => OpKind::Write,
            IoOp::Flush => OpKind::Flush,
            IoOp::Discard { .. } => OpKind::Discard,
            IoOp::WriteZeroes { .. } => OpKind::WriteZeroes,
        }
    }

    /// Start offset (0 for flush).
    pub fn offset(&self) -> u64 {
        match self {
            IoOp::Read { offset, .. }
            | IoOp::Write { offset, .. }
            | IoOp::Discard { offset, .. }
            | IoOp::WriteZeroes { offset, .. } => *offset,
            IoOp::Flush => 0,
        }
    }

    /// Number of bytes the operation covers (0 for flush).
    pub fn len(&self) -> u64 {
        match self {
            IoOp::Read { buf, .. } | IoOp::Write { buf, .. } => buf.len() as u64,
            IoOp::Discard { len, .. } | IoOp::WriteZeroes { len, .. } => *len,
            IoOp::Flush => 0,
        }
    }

    /// Whether the operation covers no bytes (always true for flush).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// An error of `kind` describing this operation.
    pub(crate) fn error(&self, kind: BlockErrorKind) -> BlockError {
        BlockError::new(kind, Some(self.kind()), self.offset())
    }
}

/// The outcome of one [`IoOp`], with the op (and its buffer) handed back.
#[derive(Debug)]
pub struct Completion {
    /// The submitted operation; for reads, the buffer now holds the data.
    pub op: IoOp,
    /// Bytes read or written (the full length; short transfers are retried internally),
    /// or why the operation failed.
    pub result: Result<usize, BlockError>,
}

/// Called once per submitted op, on one of the device's I/O threads. It should be quick
/// and must not call the `_blocking` methods (they would wait on the thread running it).
pub type Callback = Box<dyn FnOnce(Completion) + Send + 'static>;

/// Runs a callback, keeping the I/O thread alive if it panics: a panicking callback is a
/// bug in the caller, and killing the thread would hang every other request.
pub(crate) fn complete(done: Callback, completion: Completion) {
    if catch_unwind(AssertUnwindSafe(move || done(completion))).is_err() {
        tracing::error!("a block-device completion callback panicked; continuing");
    }
}

/// Which backend a device runs on.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// One io_uring per device on a dedicated thread.
    Uring,
    /// A pool of threads doing blocking `pread`/`pwrite`.
    Sync,
    /// An in-memory device for tests.
    Memory,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Uring => "io_uring",
            BackendKind::Sync => "sync",
            BackendKind::Memory => "memory",
        })
    }
}

/// How to choose the I/O backend for a file or block device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IoChoice {
    /// io_uring if the probe succeeds, else the sync pool (with a warning saying why).
    #[default]
    Auto,
    /// io_uring or an error: for operators who would rather fail than run slower.
    Uring,
    /// The sync thread pool, e.g. where io_uring is blocked or suspected of a bug.
    Sync,
}

/// Name of the environment variable read by [`IoChoice::from_env`].
pub const IO_CHOICE_ENV: &str = "TERN_IO";

impl IoChoice {
    /// Reads `TERN_IO`: `uring`, `sync`, or `auto`/empty/unset for [`IoChoice::Auto`].
    /// Anything else is an error rather than a silent default, so a typo is noticed.
    pub fn from_env() -> Result<IoChoice, BlockError> {
        match std::env::var(IO_CHOICE_ENV) {
            Ok(value) => value.parse(),
            Err(std::env::VarError::NotPresent) => Ok(IoChoice::Auto),
            Err(std::env::VarError::NotUnicode(_)) => {
                Err(BlockError::new(BlockErrorKind::InvalidArgument, None, 0)
                    .with_message(format!("{IO_CHOICE_ENV} is not valid UTF-8")))
            }
        }
    }
}

impl FromStr for IoChoice {
    type Err = BlockError;

    fn from_str(value: &str) -> Result<IoChoice, BlockError> {
        match value.trim() {
            "" | "auto" => Ok(IoChoice::Auto),
            "uring" | "io_uring" => Ok(IoChoice::Uring),
            "sync" => Ok(IoChoice::Sync),
            other => Err(
                BlockError::new(BlockErrorKind::InvalidArgument, None, 0).with_message(format!(
                    "{IO_CHOICE_ENV}={other:?}: expected \"uring\", \"sync\" or \"auto\""
                )),
            ),
        }
    }
}

/// How to open a file or block device.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// Backend choice; defaults to `TERN_IO` (or `Auto`).
    pub io: IoChoice,
    /// Try O_DIRECT (bypassing the page cache, so migrating a disk does not evict the
    /// host's cache); silently buffered where the file system refuses it. Default true.
    pub direct: bool,
    /// Open read-only; writes, discards and zeroing fail with `PermissionDenied`.
    pub read_only: bool,
    /// Create the file with this size if it is missing; if it exists, its size must equal
    /// this (else `SizeMismatch`), so a migration never writes into the wrong-sized disk.
    pub create: Option<u64>,
}

impl Default for OpenOptions {
    fn default() -> OpenOptions {
        let io = IoChoice::from_env().unwrap_or_else(|error| {
            tracing::warn!("{error}; using auto");
            IoChoice::Auto
        });
        OpenOptions {
            io,
            direct: true,
            read_only: false,
            create: None,
        }
    }
}

/// O_DIRECT alignment requirements reported by `statx(STATX_DIOALIGN)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DioAlignment {
    /// Required alignment of buffer addresses, in bytes.
    pub memory: u32,
    /// Required alignment of file offsets and lengths, in bytes.
    pub offset: u32,
}

/// What one backend implements; [`BlockDevice`] adds range checks and the convenience API.
pub(crate) trait Backend: Send + Sync {
    /// Queues `request`; its callback runs exactly once, on an I/O thread.
    fn submit(&self, request: Request);

    /// A buffer suited to this backend (registered with io_uring when possible).
    fn alloc_buf(&self, len: usize) -> IoBuf {
        IoBuf::new_zeroed(len)
    }

    /// Like `alloc_buf`, for a read that overwrites the whole buffer (not zeroed first).
    fn alloc_read_buf(&self, len: usize) -> IoBuf {
        IoBuf::for_overwrite(len)
    }

    /// Byte ranges that may hold data, sorted and merged.
    fn allocated_extents(&self) -> Result<Vec<Range<u64>>, BlockError>;
}

/// A request as queued to a backend.
pub(crate) struct Request {
    pub(crate) op: IoOp,
    pub(crate) done: Callback,
    /// Set when the request failed validation: the backend completes it with this error
    /// without touching the disk. Routing it through the backend keeps the promise that
    /// callbacks run on an I/O thread, never inside `submit`.
    pub(crate) rejected: Option<BlockError>,
}

impl Request {
    /// Runs the callback with `result`.
    pub(crate) fn finish(self, result: Result<usize, BlockError>) {
        complete(
            self.done,
            Completion {
                op: self.op,
                result,
            },
        );
    }
}

struct Inner {
    backend: Box<dyn Backend>,
    kind: BackendKind,
    size: u64,
    path: Option<PathBuf>,
    direct: bool,
    dio_alignment: Option<DioAlignment>,
    read_only: bool,
}

/// A disk (regular file, block device, or memory) that accepts concurrent requests.
///
/// Cloning is cheap and shares the device. When the last clone is dropped, the device
/// stops taking requests, finishes every request already submitted (running their
/// callbacks), then closes its files.
#[derive(Clone)]
pub struct BlockDevice {
    inner: Arc<Inner>,
}

impl fmt::Debug for BlockDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockDevice")
            .field("kind", &self.inner.kind)
            .field("size", &self.inner.size)
            .field("path", &self.inner.path)
            .field("direct", &self.inner.direct)
            .finish()
    }
}

impl BlockDevice {
    /// Opens a regular file or block device and starts its backend.
    pub fn open(path: &Path, options: &OpenOptions) -> Result<BlockDevice, BlockError> {
        let target = Arc::new(FileTarget::open(path, options)?);
        let (backend, kind): (Box<dyn Backend>, BackendKind) = match options.io {
            IoChoice::Sync => (
                Box::new(SyncBackend::new(Arc::clone(&target))?),
                BackendKind::Sync,
            ),
            IoChoice::Uring => {
                let backend = probe::probe_uring()
                    .and_then(|()| UringBackend::new(Arc::clone(&target)))
                    .map_err(|error| uring_unavailable(error, path))?;
                (Box::new(backend), BackendKind::Uring)
            }
            IoChoice::Auto => {
                match probe::probe_uring().and_then(|()| UringBackend::new(Arc::clone(&target))) {
                    Ok(backend) => (Box::new(backend), BackendKind::Uring),
                    Err(error) => {
                        let reason = error.message.as_deref().unwrap_or("setup failed");
                        tracing::warn!(
                            path = %path.display(),
                            "io_uring unavailable ({reason}): falling back to the sync \
                             thread-pool backend"
                        );
                        (
                            Box::new(SyncBackend::new(Arc::clone(&target))?),
                            BackendKind::Sync,
                        )
                    }
                }
            }
        };
        tracing::info!(
            path = %path.display(),
            backend = %kind,
            direct = target.is_direct(),
            size = target.size(),
            "opened block device"
        );
        Ok(BlockDevice {
            inner: Arc::new(Inner {
                backend,
                kind,
                size: target.size(),
                path: Some(path.to_path_buf()),
                direct: target.is_direct(),
                dio_alignment: target.dio_alignment(),
                read_only: options.read_only,
            }),
        })
    }

    /// An in-memory device of `size` zero bytes, and the handle that injects faults into
    /// it and inspects its contents.
    pub fn memory(size: u64) -> (BlockDevice, MemoryFaults) {
        let (backend, faults) = MemoryBackend::new(size);
        let device = BlockDevice {
            inner: Arc::new(Inner {
                backend: Box::new(backend),
                kind: BackendKind::Memory,
                size,
                path: None,
                direct: false,
                dio_alignment: None,
                read_only: false,
            }),
        };
        (device, faults)
    }

    /// Size in bytes, fixed at open.
    pub fn size(&self) -> u64 {
        self.inner.size
    }

    /// The backend in use.
    pub fn kind(&self) -> BackendKind {
        self.inner.kind
    }

    /// The path opened, or `None` for memory devices.
    pub fn path(&self) -> Option<&Path> {
        self.inner.path.as_deref()
    }

    /// Whether aligned requests bypass the page cache (O_DIRECT).
    pub fn direct(&self) -> bool {
        self.inner.direct
    }

    /// The file system's O_DIRECT alignment, if it reported one.
    pub fn dio_alignment(&self) -> Option<DioAlignment> {
        self.inner.dio_alignment
    }

    /// A zeroed buffer of `len` bytes, from the registered pool when one is free (cheaper
    /// for io_uring), otherwise from the heap.
    pub fn alloc_buf(&self, len: usize) -> IoBuf {
        self.inner.backend.alloc_buf(len)
    }

    /// A buffer of `len` bytes for an [`IoOp::Read`] of exactly `len` bytes, which every
    /// backend either fills whole (short transfers are resumed) or fails. It is not zeroed
    /// first (zeroing cost ~7 % of a copying source's CPU): until the read completes it may
    /// hold bytes of an earlier buffer of this process, so drop the buffer of a failed read
    /// unread. Anything else wants [`BlockDevice::alloc_buf`].
    pub fn alloc_read_buf(&self, len: usize) -> IoBuf {
        self.inner.backend.alloc_read_buf(len)
    }

    /// Submits `op`; `done` runs once, on an I/O thread, with the op handed back.
    ///
    /// May block briefly while the device's queue is full (backpressure). Requests in
    /// flight together may complete in any order. A range outside the device fails with
    /// [`BlockErrorKind::OutOfRange`] without touching the disk.
    pub fn submit(&self, op: IoOp, done: Callback) {
        let rejected = self.validate(&op).err();
        self.inner.backend.submit(Request { op, done, rejected });
    }

    fn validate(&self, op: &IoOp) -> Result<(), BlockError> {
        let in_range = op
            .offset()
            .checked_add(op.len())
            .is_some_and(|end| end <= self.inner.size);
        let result = if !in_range {
            Err(op.error(BlockErrorKind::OutOfRange).with_message(format!(
                "{} bytes do not fit in a device of {} bytes",
                op.len(),
                self.inner.size
            )))
        } else if self.inner.read_only && !matches!(op, IoOp::Read { .. } | IoOp::Flush) {
            Err(op
                .error(BlockErrorKind::PermissionDenied)
                .with_message("device is open read-only"))
        } else {
            Ok(())
        };
        result.map_err(|error| error.with_path(self.path()))
    }

    async fn run(&self, op: IoOp) -> Completion {
        let closed = op.error(BlockErrorKind::Closed).with_path(self.path());
        let (sender, receiver) = tokio::sync::oneshot::channel();
        self.submit(
            op,
            Box::new(move |completion| {
                // The receiver is gone only if the caller stopped awaiting; nothing to do.
                let _ = sender.send(completion);
            }),
        );
        match receiver.await {
            Ok(completion) => completion,
            // Backends always run the callback; this only guards against a bug there.
            Err(_) => Completion {
                op: IoOp::Flush,
                result: Err(closed),
            },
        }
    }

    fn run_blocking(&self, op: IoOp) -> Completion {
        if on_io_thread() {
            // The completion would have to be produced by the very thread that waits.
            return Completion {
                result: Err(op
                    .error(BlockErrorKind::InvalidArgument)
                    .with_path(self.path())
                    .with_message("a _blocking call from an I/O thread would deadlock")),
                op,
            };
        }
        let closed = op.error(BlockErrorKind::Closed).with_path(self.path());
        let (sender, receiver) = std::sync::mpsc::sync_channel(1);
        self.submit(
            op,
            Box::new(move |completion| {
                let _ = sender.send(completion);
            }),
        );
        receiver.recv().unwrap_or(Completion {
            op: IoOp::Flush,
            result: Err(closed),
        })
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: usize) -> Result<IoBuf, BlockError> {
        let buf = self.alloc_buf(len);
        into_buf(self.run(IoOp::Read { offset, buf }).await)
    }

    /// Writes `buf` at `offset`, returning the buffer for reuse.
    pub async fn write(&self, offset: u64, buf: IoBuf) -> Result<IoBuf, BlockError> {
        into_buf(self.run(IoOp::Write { offset, buf }).await)
    }

    /// Makes completed writes durable.
    pub async fn flush(&self) -> Result<(), BlockError> {
        self.run(IoOp::Flush).await.result.map(drop)
    }

    /// Deallocates a range; it reads as zeros afterwards.
    pub async fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.run(IoOp::Discard { offset, len })
            .await
            .result
            .map(drop)
    }

    /// Makes a range read as zeros, keeping files sparse where possible.
    pub async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.run(IoOp::WriteZeroes { offset, len })
            .await
            .result
            .map(drop)
    }

    /// [`BlockDevice::read`] for callers without a runtime.
    pub fn read_blocking(&self, offset: u64, len: usize) -> Result<IoBuf, BlockError> {
        let buf = self.alloc_buf(len);
        into_buf(self.run_blocking(IoOp::Read { offset, buf }))
    }

    /// [`BlockDevice::write`] for callers without a runtime.
    pub fn write_blocking(&self, offset: u64, buf: IoBuf) -> Result<IoBuf, BlockError> {
        into_buf(self.run_blocking(IoOp::Write { offset, buf }))
    }

    /// [`BlockDevice::flush`] for callers without a runtime.
    pub fn flush_blocking(&self) -> Result<(), BlockError> {
        self.run_blocking(IoOp::Flush).result.map(drop)
    }

    /// [`BlockDevice::discard`] for callers without a runtime.
    pub fn discard_blocking(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.run_blocking(IoOp::Discard { offset, len })
            .result
            .map(drop)
    }

    /// [`BlockDevice::write_zeroes`] for callers without a runtime.
    pub fn write_zeroes_blocking(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.run_blocking(IoOp::WriteZeroes { offset, len })
            .result
            .map(drop)
    }

    /// Byte ranges that may hold data, sorted and merged, so a migration can skip holes.
    ///
    /// Files use `SEEK_DATA`/`SEEK_HOLE`; where that is unsupported (block devices, some
    /// file systems) the whole device is reported. Memory devices report the 4 KiB blocks
    /// holding non-zero bytes.
    pub fn allocated_extents(&self) -> Result<Vec<Range<u64>>, BlockError> {
        self.inner
            .backend
            .allocated_extents()
            .map_err(|error| error.with_path(self.path()))
    }
}

fn into_buf(completion: Completion) -> Result<IoBuf, BlockError> {
    let Completion { op, result } = completion;
    result?;
    match op {
        IoOp::Read { buf, .. } | IoOp::Write { buf, .. } => Ok(buf),
        // Backends hand back the op they were given; any other shape is our bug, reported
        // as an error rather than a panic.
        other => Err(other
            .error(BlockErrorKind::Io)
            .with_message("backend returned a different operation")),
    }
}

/// Turns a probe or ring-setup failure into the error for an explicit `IoChoice::Uring`,
/// naming the way out.
fn uring_unavailable(mut error: BlockError, path: &Path) -> BlockError {
    let reason = error
        .message
        .take()
        .unwrap_or_else(|| "setup failed".to_owned());
    error.kind = BlockErrorKind::UringUnavailable;
    error.message = Some(format!(
        "{reason}; set {IO_CHOICE_ENV}=sync (IoChoice::Sync) to use the thread-pool backend"
    ));
    error.with_path(Some(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expect: Option<IoChoice>) {
        assert_eq!(input.parse::<IoChoice>().ok(), expect, "input {input:?}");
    }

    #[test]
    fn io_choice_parses_known_values_and_rejects_others() {
        check("", Some(IoChoice::Auto));
        check("auto", Some(IoChoice::Auto));
        check("uring", Some(IoChoice::Uring));
        check("sync", Some(IoChoice::Sync));
        check("threads", None);
        check("URING", None);
    }

    #[test]
    fn backend_kind_display() {
        assert_eq!(BackendKind::Uring.to_string(), "io_uring");
        assert_eq!(BackendKind::Sync.to_string(), "sync");
        assert_eq!(BackendKind::Memory.to_string(), "memory");
    }
}
