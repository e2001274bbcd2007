//! The io_uring backend: one ring on one dedicated thread per device.
//!
//! Callers push [`Request`]s onto a bounded queue and write to an eventfd. The ring thread
//! keeps a `PollAdd` on that eventfd armed at all times, so a new request wakes it even
//! while other requests are in flight, and it moves requests from the queue into the ring
//! while fewer than [`MAX_IN_FLIGHT`] are outstanding.
//!
//! # Buffer ownership (the reason this module has `unsafe`)
//!
//! An SQE carries raw pointers into a request's [`IoBuf`]. From the moment the SQE is
//! pushed until its CQE is reaped, the request (and so the buffer) lives in the ring
//! thread's `slots` table, which nothing else can reach; the heap memory does not move
//! when the `Request` value moves. Only after the CQE does the request leave the table,
//! either to be resubmitted (short transfer) or handed back through its callback.
//! Shutdown closes the queue and the thread keeps reaping until `slots` is empty. If the
//! ring fails fatally, or the thread unwinds, with requests still in flight, their buffers
//! are leaked rather than freed, because the kernel may still write into them.
//!
//! # Registered buffers
//!
//! At start the thread registers a small pool of 1 MiB buffers (sized under
//! `RLIMIT_MEMLOCK`, which is 8 MiB for unprivileged users by default). Buffers handed
//! out by `alloc_buf` from that pool use `ReadFixed`/`WriteFixed`, which saves the kernel
//! from pinning pages per request. If registration fails, every request uses plain
//! `Read`/`Write` and the failure is logged at debug level.

use std::io;
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::thread::{self, JoinHandle, ThreadId};

use io_uring::{IoUring, opcode, squeue, types};

use crate::buf::{BufPool, IoBuf};
use crate::device::{Backend, IoOp, Request};
use crate::error::{BlockError, BlockErrorKind};
use crate::file::{FileTarget, PUNCH_HOLE_MODE, RETRY_LIMIT, ZERO_RANGE_MODE, zeroing_falls_back};
use crate::probe::unavailable;
use crate::queue::{BoundedQueue, Pop, mark_io_thread};
use crate::sync::QUEUE_CAPACITY;

/// Submission queue entries. The completion queue gets twice as many (kernel default), so
/// with at most `MAX_IN_FLIGHT + 1` requests outstanding neither queue can overflow.
const RING_ENTRIES: u32 = 128;

/// Requests in the kernel at once (the device queue depth).
pub(crate) const MAX_IN_FLIGHT: usize = 64;

/// `user_data` of the eventfd poll; request slots use their index, always smaller.
const WAKE_TOKEN: u64 = u64::MAX;

/// Size of each registered buffer: the engine's typical chunk size.
const POOL_SLOT_BYTES: usize = 1 << 20;

/// Upper bound on registered buffers per device, so one device cannot use up the whole
/// memlock allowance of a user that opens several.
const POOL_SLOTS_MAX: u64 = 4;

/// The io_uring backend handle held by [`crate::BlockDevice`].
pub(crate) struct UringBackend {
    queue: Arc<BoundedQueue<Request>>,
    wake: Arc<OwnedFd>,
    pool: Option<Arc<BufPool>>,
    target: Arc<FileTarget>,
    thread: Option<JoinHandle<()>>,
    thread_id: ThreadId,
}

impl UringBackend {
    pub(crate) fn new(target: Arc<FileTarget>) -> Result<UringBackend, BlockError> {
        let ring = IoUring::builder()
            .build(RING_ENTRIES)
            .map_err(|error| unavailable(format!("io_uring_setup failed: {error}"), Some(error)))?;
        let wake = Arc::new(new_eventfd().map_err(|error| BlockError::from_io(None, 0, error))?);
        let pool = register_pool(&ring);
        let queue = Arc::new(BoundedQueue::new(QUEUE_CAPACITY));
        let ring_thread = RingThread {
            ring,
            slots: (0..MAX_IN_FLIGHT).map(|_| None).collect(),
            free: (0..MAX_IN_FLIGHT).rev().collect(),
            in_flight: 0,
            pool: pool.clone(),
            queue: Arc::clone(&queue),
            wake: Arc::clone(&wake),
            target: Arc::clone(&target),
            wake_armed: false,
            closed: false,
            completions: Vec::with_capacity(2 * RING_ENTRIES as usize),
        };
        let thread = thread::Builder::new()
            .name("tern-blockdev-uring".to_owned())
            .spawn(move || ring_thread.run())
            .map_err(|error| BlockError::from_io(None, 0, error))?;
        Ok(UringBackend {
            queue,
            wake,
            pool,
            target,
            thread_id: thread.thread().id(),
            thread: Some(thread),
        })
    }
}

impl Backend for UringBackend {
    fn submit(&self, request: Request) {
        match self.queue.push(request) {
            Ok(()) => signal(&self.wake),
            Err(request) => {
                let error = request.op.error(BlockErrorKind::Closed);
                request.finish(Err(error));
            }
        }
    }

    fn alloc_buf(&self, len: usize) -> IoBuf {
        self.pool
            .as_ref()
            .and_then(|pool| pool.take(len, true))
            .unwrap_or_else(|| IoBuf::new_zeroed(len))
    }

    fn alloc_read_buf(&self, len: usize) -> IoBuf {
        self.pool
            .as_ref()
            .and_then(|pool| pool.take(len, false))
            .unwrap_or_else(|| IoBuf::for_overwrite(len))
    }

    fn allocated_extents(&self) -> Result<Vec<Range<u64>>, BlockError> {
        self.target.allocated_extents()
    }
}

impl Drop for UringBackend {
    fn drop(&mut self) {
        self.queue.close();
        signal(&self.wake);
        if thread::current().id() == self.thread_id {
            // Dropped from a callback on the ring thread: it exits by itself once drained.
            return;
        }
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the io_uring thread panicked");
        }
    }
}

/// A request in the kernel, with its progress.
struct InFlight {
    request: Request,
    /// Bytes already transferred (reads and writes).
    done: usize,
    /// Zeroing strategy in use: 0 punch hole, 1 zero range (discard and write-zeroes).
    stage: u8,
    /// `EINTR`/`EAGAIN` resubmissions so far.
    retries: u32,
}

/// State owned by the ring thread. Field order matters: `ring` is dropped before the
/// buffers it may reference (`slots`, `pool`).
struct RingThread {
    ring: IoUring,
    /// Requests whose SQE is in the kernel, indexed by `user_data`.
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    in_flight: usize,
    pool: Option<Arc<BufPool>>,
    queue: Arc<BoundedQueue<Request>>,
    wake: Arc<OwnedFd>,
    target: Arc<FileTarget>,
    wake_armed: bool,
    /// Set once the queue is closed and empty: no more requests will arrive.
    closed: bool,
    /// Reused buffer for reaped `(user_data, result)` pairs.
    completions: Vec<(u64, i32)>,
}

impl RingThread {
    fn run(mut self) {
        mark_io_thread();
        loop {
            self.intake();
            if self.closed && self.in_flight == 0 {
                break;
            }
            if !self.closed && !self.wake_armed {
                let entry =
                    opcode::PollAdd::new(types::Fd(self.wake.as_raw_fd()), libc::POLLIN as u32)
                        .build()
                        .user_data(WAKE_TOKEN);
                self.push(&entry);
                self.wake_armed = true;
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(error)
                    if matches!(
                        error.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    ) => {}
                Err(error) => {
                    self.abandon(&error);
                    return;
                }
            }
            self.reap();
        }
        // Every CQE has been reaped: no buffer is referenced by the kernel any more. The
        // wake poll may still be armed, but it references only the eventfd.
    }

    /// Moves queued requests into the ring while there is room.
    fn intake(&mut self) {
        while self.in_flight < MAX_IN_FLIGHT {
            match self.queue.try_pop() {
                Pop::Item(request) => self.start(request),
                Pop::Empty => break,
                Pop::Closed => {
                    self.closed = true;
                    break;
                }
            }
        }
    }

    fn start(&mut self, mut request: Request) {
        if let Some(error) = request.rejected.take() {
            request.finish(Err(error));
            return;
        }
        if request.op.is_empty() && !matches!(request.op, IoOp::Flush) {
            request.finish(Ok(0));
            return;
        }
        let Some(slot) = self.free.pop() else {
            // Unreachable while `in_flight < MAX_IN_FLIGHT`; fail the request, not the thread.
            let error = request
                .op
                .error(BlockErrorKind::Io)
                .with_message("no free ring slot");
            request.finish(Err(error));
            return;
        };
        self.slots[slot] = Some(InFlight {
            request,
            done: 0,
            stage: 0,
            retries: 0,
        });
        self.in_flight += 1;
        self.submit_slot(slot);
    }

    /// Pushes the SQE for the next step of the request in `slot`.
    fn submit_slot(&mut self, slot: usize) {
        let Some(flight) = self.slots[slot].as_mut() else {
            return;
        };
        let entry = build_entry(flight, &self.target, self.pool.as_ref()).user_data(slot as u64);
        self.push(&entry);
    }

    fn push(&mut self, entry: &squeue::Entry) {
        for _ in 0..2 {
            // SAFETY: every pointer in `entry` refers either to the eventfd (kept open by
            // `self.wake` until the ring is dropped) or to the buffer of a request held in
            // `self.slots` until its CQE is reaped (see the module docs).
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return;
            }
            // The queue cannot be full with at most MAX_IN_FLIGHT + 1 entries in a ring of
            // RING_ENTRIES, but if it is, hand what is queued to the kernel and retry.
            if let Err(error) = self.ring.submit() {
                tracing::warn!(%error, "io_uring submit failed while the queue was full");
            }
        }
        tracing::error!("io_uring submission queue stayed full");
    }

    fn reap(&mut self) {
        let mut completions = std::mem::take(&mut self.completions);
        completions.extend(
            self.ring
                .completion()
                .map(|cqe| (cqe.user_data(), cqe.result())),
        );
        for &(token, result) in &completions {
            if token == WAKE_TOKEN {
                self.wake_armed = false;
                drain_eventfd(&self.wake);
                if result < 0 {
                    tracing::debug!(
                        errno = -result,
                        "eventfd poll ended with an error; re-arming"
                    );
                }
            } else {
                self.on_completion(token as usize, result);
            }
        }
        completions.clear();
        self.completions = completions;
    }

    fn on_completion(&mut self, slot: usize, result: i32) {
        let Some(flight) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
            tracing::error!(slot, "io_uring completion for an empty slot");
            return;
        };
        let kind = flight.request.op.kind();
        if (result == -libc::EINTR || result == -libc::EAGAIN) && flight.retries < RETRY_LIMIT {
            flight.retries += 1;
            self.submit_slot(slot);
            return;
        }
        let outcome = match &flight.request.op {
            IoOp::Read { offset, buf } | IoOp::Write { offset, buf } => {
                let at = offset + flight.done as u64;
                let total = buf.len();
                if result < 0 {
                    Some(Err(BlockError::from_errno(Some(kind), at, -result)))
                } else if result == 0 {
                    Some(Err(BlockError::new(BlockErrorKind::Io, Some(kind), at)
                        .with_message("no progress (did the file shrink?)")))
                } else {
                    flight.done += result as usize;
                    // Short transfer: resubmit the rest.
                    (flight.done >= total).then_some(Ok(total))
                }
            }
            IoOp::Flush => Some(if result < 0 {
                Err(BlockError::from_errno(Some(kind), 0, -result))
            } else {
                Ok(0)
            }),
            IoOp::Discard { offset, len } | IoOp::WriteZeroes { offset, len } => {
                let (offset, len) = (*offset, *len);
                let done = usize::try_from(len).unwrap_or(usize::MAX);
                if result >= 0 {
                    Some(Ok(done))
                } else if zeroing_falls_back(-result) && flight.stage == 0 {
                    flight.stage = 1;
                    None
                } else if zeroing_falls_back(-result) {
                    // Neither hole punching nor ZERO_RANGE: write zeros here. This blocks
                    // the ring thread, but only on file systems that lack both, where it is
                    // the only correct option.
                    Some(
                        self.target
                            .write_zeroes_by_writing(kind, offset, len)
                            .map(|()| done),
                    )
                } else {
                    Some(Err(BlockError::from_errno(Some(kind), offset, -result)))
                }
            }
        };
        match outcome {
            Some(result) => self.finish(slot, result),
            None => self.submit_slot(slot),
        }
    }

    fn finish(&mut self, slot: usize, result: Result<usize, BlockError>) {
        let Some(flight) = self.slots[slot].take() else {
            return;
        };
        self.free.push(slot);
        self.in_flight -= 1;
        let result = result.map_err(|error| error.with_path(Some(self.target.path())));
        flight.request.finish(result);
    }

    /// Gives up after an unrecoverable `io_uring_enter` error: fails every request, leaking
    /// the buffers of those the kernel may still be using.
    fn abandon(&mut self, error: &io::Error) {
        tracing::error!(%error, "io_uring failed; failing all requests on this device");
        self.queue.close();
        for slot in 0..self.slots.len() {
            if let Some(mut flight) = self.slots[slot].take() {
                leak_buffer(&mut flight.request.op);
                self.in_flight -= 1;
                let failure = flight
                    .request
                    .op
                    .error(BlockErrorKind::Io)
                    .with_message(format!("io_uring failed: {error}"));
                flight.request.finish(Err(failure));
            }
        }
        while let Pop::Item(request) = self.queue.try_pop() {
            let failure = request.op.error(BlockErrorKind::Closed);
            request.finish(Err(failure));
        }
    }
}

impl Drop for RingThread {
    fn drop(&mut self) {
        if self.in_flight > 0 {
            // Only reachable by unwinding out of `run`: the kernel may still write into
            // these buffers, so leak them (and their callbacks) rather than free them.
            let slots = std::mem::take(&mut self.slots);
            std::mem::forget(slots);
        }
    }
}

/// Replaces the op's buffer with an empty one and leaks the original.
fn leak_buffer(op: &mut IoOp) {
    if let IoOp::Read { buf, .. } | IoOp::Write { buf, .. } = op {
        std::mem::forget(std::mem::replace(buf, IoBuf::new_zeroed(0)));
    }
}

/// The SQE for the next step of `flight` (without `user_data`).
fn build_entry(
    flight: &mut InFlight,
    target: &FileTarget,
    pool: Option<&Arc<BufPool>>,
) -> squeue::Entry {
    let done = flight.done;
    match &mut flight.request.op {
        IoOp::Read { offset, buf } => {
            let at = *offset + done as u64;
            let fixed = fixed_index(buf, pool);
            let rest = &mut buf[done..];
            let (file, len) = target.plan(at, rest.len(), rest.as_ptr() as usize);
            let fd = types::Fd(file.as_raw_fd());
            // `plan` caps `len` at MAX_IO_BYTES, which fits in u32.
            let len = len as u32;
            match fixed {
                Some(index) => opcode::ReadFixed::new(fd, rest.as_mut_ptr(), len, index)
                    .offset(at)
                    .build(),
                None => opcode::Read::new(fd, rest.as_mut_ptr(), len)
                    .offset(at)
                    .build(),
            }
        }
        IoOp::Write { offset, buf } => {
            let at = *offset + done as u64;
            let fixed = fixed_index(buf, pool);
            let rest = &buf[done..];
            let (file, len) = target.plan(at, rest.len(), rest.as_ptr() as usize);
            let fd = types::Fd(file.as_raw_fd());
            let len = len as u32;
            match fixed {
                Some(index) => opcode::WriteFixed::new(fd, rest.as_ptr(), len, index)
                    .offset(at)
                    .build(),
                None => opcode::Write::new(fd, rest.as_ptr(), len)
                    .offset(at)
                    .build(),
            }
        }
        IoOp::Flush => opcode::Fsync::new(types::Fd(target.buffered().as_raw_fd()))
            .flags(types::FsyncFlags::DATASYNC)
            .build(),
        IoOp::Discard { offset, len } | IoOp::WriteZeroes { offset, len } => {
            let mode = if flight.stage == 0 {
                PUNCH_HOLE_MODE
            } else {
                ZERO_RANGE_MODE
            };
            opcode::Fallocate::new(types::Fd(target.buffered().as_raw_fd()), *len)
                .offset(*offset)
                .mode(mode)
                .build()
        }
    }
}

/// The registered-buffer index to use for `buf`, if it lives in this ring's pool. A
/// buffer from another device's pool has an index that means nothing to this ring.
fn fixed_index(buf: &IoBuf, pool: Option<&Arc<BufPool>>) -> Option<u16> {
    let (buf_pool, index) = buf.pool_slot()?;
    pool.filter(|own| Arc::ptr_eq(own, buf_pool)).map(|_| index)
}

/// Registers as many 1 MiB buffers as half of `RLIMIT_MEMLOCK` allows (at most
/// `POOL_SLOTS_MAX`); `None` if that is zero or registration fails.
fn register_pool(ring: &IoUring) -> Option<Arc<BufPool>> {
    let slots = pool_slots_under_memlock();
    if slots == 0 {
        tracing::debug!(
            "RLIMIT_MEMLOCK too low for registered buffers; using plain reads and writes"
        );
        return None;
    }
    let pool = BufPool::new(slots, POOL_SLOT_BYTES)?;
    let iovecs = pool.iovecs();
    // SAFETY: the iovecs describe the pool's allocation, which stays alive as long as the
    // ring: the ring thread holds an `Arc` to the pool in a field dropped after the ring.
    match unsafe { ring.submitter().register_buffers(&iovecs) } {
        Ok(()) => Some(pool),
        Err(error) => {
            tracing::debug!(%error, slots, "registering io_uring buffers failed; using plain reads and writes");
            None
        }
    }
}

fn pool_slots_under_memlock() -> u16 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` through the pointer, which points at `limit`.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) };
    if rc != 0 {
        return 0;
    }
    let budget = if limit.rlim_cur == libc::RLIM_INFINITY {
        u64::MAX
    } else {
        limit.rlim_cur / 2
    };
    (budget / POOL_SLOT_BYTES as u64).min(POOL_SLOTS_MAX) as u16
}

fn new_eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes no pointers.
    let fd: RawFd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by eventfd, is valid, and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Wakes the ring thread. A failed write can only mean the counter is saturated, in
/// which case the thread is already due to wake.
fn signal(wake: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from `one`, which is a live u64, to an open eventfd.
    let _ = unsafe { libc::write(wake.as_raw_fd(), (&raw const one).cast(), 8) };
}

/// Resets the eventfd counter so the next poll waits for a new signal.
fn drain_eventfd(wake: &OwnedFd) {
    let mut value: u64 = 0;
    // SAFETY: reads at most 8 bytes into `value`, a live u64, from an open eventfd; the
    // fd is non-blocking, so an empty counter returns EAGAIN instead of blocking.
    let _ = unsafe { libc::read(wake.as_raw_fd(), (&raw mut value).cast(), 8) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{IoChoice, OpenOptions};

    #[test]
    fn alloc_buf_uses_the_registered_pool_when_registration_succeeded() {
        if let Err(error) = crate::probe::probe_uring() {
            eprintln!("skipping: {error}");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let options = OpenOptions {
            io: IoChoice::Uring,
            direct: true,
            read_only: false,
            create: Some(1 << 20),
        };
        let target = Arc::new(FileTarget::open(&dir.path().join("p.img"), &options).expect("open"));
        let backend = UringBackend::new(target).expect("ring");
        let small = backend.alloc_buf(4096);
        let too_big = backend.alloc_buf(POOL_SLOT_BYTES + 1);
        assert_eq!(small.pool_slot().is_some(), backend.pool.is_some());
        assert!(too_big.pool_slot().is_none());
        if backend.pool.is_none() {
            eprintln!("buffer registration failed here (RLIMIT_MEMLOCK?); heap buffers used");
        }
    }
}
