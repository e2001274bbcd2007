//! Disk backends for Tern: the part of the migration engine that touches disks.
//!
//! A [`BlockDevice`] is a regular file, a block device, or (for tests) memory. Its core is
//! completion-shaped: [`BlockDevice::submit`] takes an owned [`IoOp`] (with its [`IoBuf`])
//! and a [`Callback`] that later receives a [`Completion`] with the buffer handed back.
//! Async (`read`, `write`, ...) and `*_blocking` wrappers sit on top, so the engine's
//! driver can run on any runtime, and an embedding VMM with its own event loop can use
//! the callbacks directly.
//!
//! Backends, chosen at open by [`IoChoice`] (or `TERN_IO=uring|sync|auto`):
//! - **io_uring** (`uring`): one ring on a dedicated thread per device, queue depth 64,
//!   a small pool of registered buffers, and an eventfd to pick up new requests while
//!   others are in flight. Preferred: same throughput as a pread pool at far less CPU.
//! - **sync** (`sync`): four threads doing `pread`/`pwrite`/`fdatasync`/`fallocate`.
//!   Always available; used where io_uring is blocked (Docker ≥ 25 seccomp, the
//!   `io_uring_disabled` sysctl) after the startup probe (`probe`) says so.
//! - **memory** (`memory`): a `Vec<u8>` with [`MemoryFaults`] for fault injection.
//!
//! Files are opened with O_DIRECT where the file system supports it; requests that do not
//! meet the `statx` DIO alignment go through a second, buffered descriptor (`file`).
//!
//! We use the `io-uring` crate directly rather than tokio-uring: tokio-uring is
//! unmaintained, needs its own current-thread runtime, and panics when io_uring is blocked,
//! whereas a plain ring on our own thread works under any runtime (or none) and lets us
//! fall back cleanly.
//!
//! `unsafe` code lives only in this crate, in five modules: `buf` (aligned allocation and
//! the registered pool), `huge` (huge-page mappings), `file` (`statx`, `ioctl`,
//! `fallocate`, `lseek`), `uring` (SQE buffer lifetimes, eventfd) and `heap` (malloc's
//! thresholds, [`tune_allocator`]). Each block states its invariant in a `SAFETY:` comment.

mod buf;
mod device;
mod error;
mod file;
mod heap;
mod huge;
mod memory;
mod probe;
mod queue;
mod sync;
mod uring;

pub use buf::IoBuf;
pub use device::{
    BackendKind, BlockDevice, Callback, Completion, DioAlignment, IO_CHOICE_ENV, IoChoice, IoOp,
    OpenOptions,
};
pub use error::{BlockError, BlockErrorKind, OpKind};
pub use file::free_bytes;
pub use heap::{MMAP_THRESHOLD_BYTES, TRIM_THRESHOLD_BYTES, tune_allocator};
pub use memory::MemoryFaults;
pub use probe::probe_uring;
