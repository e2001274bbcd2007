//! An export: a named disk behind the NBD server, and the gate that decides whether its IO
//! may proceed now.
//!
//! The gate is what lets a switchover quiesce the clients without their cooperation:
//! [`Export::hold`] stops new requests (they wait, unanswered) and returns once every request
//! already admitted has completed — for a tracked source disk, that means its writes are on
//! the disk *and* marked dirty, so the final pass sees them. Afterwards the export is either
//! released (rollback: held requests go on against the source) or refused (commit: held and
//! later requests fail with a message telling the client where the disk went).
//!
//! Invariant: no request is admitted while the export is held or refused, and `hold` does not
//! return while an admitted request is still running (checked by `assert!` on the counter).

use std::sync::{Arc, Mutex};

use tern_blockdev::{BlockDevice, Callback, IoBuf, IoOp};
use tokio::sync::watch;

/// What an export reads and writes: a block device, or a disk that tracks its writes.
pub trait Backend: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// A buffer suited to this backend's IO (aligned for O_DIRECT).
    fn alloc_buf(&self, len: usize) -> IoBuf;
    /// Submits `op`; `done` runs once it completed.
    fn submit(&self, op: IoOp, done: Callback);
    /// How long a write of `bytes` must wait before it is submitted (a throttled guest);
    /// the server sleeps that long on its runtime. Zero by default.
    fn reserve_write(&self, bytes: u64) -> std::time::Duration {
        let _ = bytes;
        std::time::Duration::ZERO
    }
}

impl Backend for BlockDevice {
    fn size(&self) -> u64 {
        BlockDevice::size(self)
    }
    fn alloc_buf(&self, len: usize) -> IoBuf {
        BlockDevice::alloc_buf(self, len)
    }
    fn submit(&self, op: IoOp, done: Callback) {
        BlockDevice::submit(self, op, done)
    }
}

/// Whether requests may proceed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Access {
    /// Requests run.
    Open,
    /// New requests wait; the ones admitted before finish.
    Held,
    /// Every request fails with `errno` (an NBD error number) and `message` (sent in a
    /// structured error reply when the client negotiated structured replies).
    Refused {
        /// NBD error number.
        errno: u32,
        /// Why, and what the client should do.
        message: String,
    },
}

#[derive(Debug)]
struct Inner {
    access: Access,
    size: Option<u64>,
    backend: Option<Arc<dyn Backend>>,
    in_flight: usize,
    waiting: usize,
}

impl std::fmt::Debug for dyn Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Backend({} bytes)", self.size())
    }
}

/// A named disk served over NBD.
#[derive(Debug)]
pub struct Export {
    name: String,
    description: String,
    read_only: bool,
    inner: Mutex<Inner>,
    /// Bumped on every change of `inner`, so waiters can sleep on it.
    changed: watch::Sender<u64>,
}

/// A request admitted through the gate; dropping it (after the IO completed) lets a
/// pending `hold` finish.
#[derive(Debug)]
pub struct Pass {
    export: Arc<Export>,
    backend: Arc<dyn Backend>,
}

impl Pass {
    /// The backend to do the admitted request's IO on.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        self.export.update(|inner| {
            assert!(inner.in_flight > 0, "a pass outlived its count");
            inner.in_flight -= 1;
        });
    }
}

/// Counts a request waiting at the gate for as long as it waits (also when the wait is
/// cancelled because the client went away). Its drop runs after `enter` released the lock.
struct WaitCount<'a>(&'a Export);

impl Drop for WaitCount<'_> {
    fn drop(&mut self) {
        self.0.lock().waiting -= 1;
    }
}

/// A request the gate turned away.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// NBD error number.
    pub errno: u32,
    /// Why.
    pub message: String,
}

impl Export {
    /// An export of `backend`, open for IO.
    pub fn new(name: impl Into<String>, backend: Arc<dyn Backend>, read_only: bool) -> Arc<Self> {
        let size = backend.size();
        Arc::new(Self {
            name: name.into(),
            description: String::new(),
            read_only,
            inner: Mutex::new(Inner {
                access: Access::Open,
                size: Some(size),
                backend: Some(backend),
                in_flight: 0,
                waiting: 0,
            }),
            changed: watch::Sender::new(0),
        })
    }

    /// An export whose disk is not ready yet (a migration target before commit): clients
    /// can connect once the size is known (`size`, or later [`Export::set_size`]); IO is
    /// refused with `EPERM` and `message` until [`Export::attach`].
    pub fn pending(
        name: impl Into<String>,
        size: Option<u64>,
        message: impl Into<String>,
    ) -> Arc<Self> {
        Arc::new(Self {
            name: name.into(),
            description: String::new(),
            read_only: false,
            inner: Mutex::new(Inner {
                access: Access::Refused {
                    errno: crate::proto::errno::EPERM,
                    message: message.into(),
                },
                size,
                backend: None,
                in_flight: 0,
                waiting: 0,
            }),
            changed: watch::Sender::new(0),
        })
    }

    /// The export's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A description for `NBD_INFO_DESCRIPTION`.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The current access.
    pub fn access(&self) -> Access {
        self.lock().access.clone()
    }

    /// The backend, once attached (for a throttle reservation before admission).
    pub fn backend(&self) -> Option<Arc<dyn Backend>> {
        self.lock().backend.clone()
    }

    /// Requests admitted and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.lock().in_flight
    }

    /// Requests waiting at the gate (the export is held).
    pub fn waiting(&self) -> usize {
        self.lock().waiting
    }

    /// The size, waiting until it is known (a pending export learns it from the migration).
    pub async fn size(&self) -> u64 {
        let mut changes = self.changed.subscribe();
        loop {
            if let Some(size) = self.lock().size {
                return size;
            }
            // The sender lives as long as `self`, so this only fails if it was dropped.
            if changes.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Sets the size of a pending export (clients waiting in negotiation go on).
    pub fn set_size(&self, size: u64) {
        self.update(|inner| inner.size = Some(size));
    }

    /// Gives a pending export its disk and opens it for IO.
    pub fn attach(&self, backend: Arc<dyn Backend>) {
        self.update(|inner| {
            inner.size = Some(backend.size());
            inner.backend = Some(backend);
            inner.access = Access::Open;
        });
    }

    /// Admits one request, waiting while the export is held.
    pub async fn enter(self: &Arc<Self>) -> Result<Pass, Refusal> {
        let mut changes = self.changed.subscribe();
        let mut waiting: Option<WaitCount<'_>> = None;
        loop {
            {
                let mut inner = self.lock();
                match (&inner.access, &inner.backend) {
                    (Access::Open, Some(backend)) => {
                        let backend = backend.clone();
                        inner.in_flight += 1;
                        return Ok(Pass {
                            export: self.clone(),
                            backend,
                        });
                    }
                    (Access::Refused { errno, message }, _) => {
                        return Err(Refusal {
                            errno: *errno,
                            message: message.clone(),
                        });
                    }
                    (Access::Open, None) | (Access::Held, _) => {
                        if waiting.is_none() {
                            inner.waiting += 1;
                            waiting = Some(WaitCount(self));
                        }
                    }
                }
            }
            if changes.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Stops admitting requests and waits until the admitted ones completed.
    pub async fn hold(&self) {
        let mut changes = self.changed.subscribe();
        self.update(|inner| {
            if inner.access == Access::Open {
                inner.access = Access::Held;
            }
        });
        loop {
            if self.lock().in_flight == 0 {
                return;
            }
            if changes.changed().await.is_err() {
                return;
            }
        }
    }

    /// Admits requests again (held requests go on).
    pub fn release(&self) {
        self.update(|inner| inner.access = Access::Open);
    }

    /// Refuses every request from now on, held ones included.
    pub fn refuse(&self, errno: u32, message: impl Into<String>) {
        let message = message.into();
        self.update(|inner| inner.access = Access::Refused { errno, message });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock would be a bug in this file; the state stays valid.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, change: impl FnOnce(&mut Inner)) {
        change(&mut self.lock());
        self.changed
            .send_modify(|version| *version = version.wrapping_add(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn memory_export() -> Arc<Export> {
        let (device, _faults) = BlockDevice::memory(1 << 20);
        Export::new("disk", Arc::new(device), false)
    }

    #[tokio::test]
    async fn hold_waits_for_admitted_requests_and_blocks_new_ones() {
        let export = memory_export();
        let pass = export.enter().await.unwrap();
        let holder = tokio::spawn({
            let export = export.clone();
            async move { export.hold().await }
        });
        // The holder cannot finish while the pass lives; a new request waits.
        let waiter = tokio::spawn({
            let export = export.clone();
            async move { export.enter().await.map(|_| ()) }
        });
        tokio::task::yield_now().await;
        assert!(!holder.is_finished());
        assert_eq!(export.access(), Access::Held);
        assert_eq!(export.waiting(), 1);
        drop(pass);
        holder.await.unwrap();
        assert!(!waiter.is_finished());
        assert_eq!(export.in_flight(), 0);
        export.refuse(crate::proto::errno::ESHUTDOWN, "moved");
        let refused = waiter.await.unwrap().unwrap_err();
        assert_eq!(refused.errno, crate::proto::errno::ESHUTDOWN);
        assert_eq!(refused.message, "moved");
    }

    #[tokio::test]
    async fn release_lets_held_requests_go_on() {
        let export = memory_export();
        export.hold().await;
        let waiter = tokio::spawn({
            let export = export.clone();
            async move { export.enter().await.map(|_| ()) }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        export.release();
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("released")
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn a_pending_export_learns_its_size_and_opens_on_attach() {
        let export = Export::pending("disk", None, "not committed");
        let sizer = tokio::spawn({
            let export = export.clone();
            async move { export.size().await }
        });
        assert_eq!(
            export.enter().await.unwrap_err().errno,
            crate::proto::errno::EPERM
        );
        export.set_size(4096);
        assert_eq!(sizer.await.unwrap(), 4096);
        let (device, _faults) = BlockDevice::memory(8192);
        export.attach(Arc::new(device));
        assert_eq!(export.size().await, 8192);
        assert!(export.enter().await.is_ok());
    }
}
