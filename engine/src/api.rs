//! The embedding API: what a VMM calls to move its disks while the guest runs.
//!
//! ```text
//! let disk = TrackedDisk::new(device, chunk)            // the VMM's block backend does IO through it
//! let migration = Migration::start(vec![disk], config)?  // connects, bulk pass, live passes
//! migration.wait_converged(timeout)?                     // now start the memory pre-copy
//! // pause vCPUs, drain in-flight disk IO
//! let handoff = migration.switchover()?                  // final pass, flush, verify
//! handoff.commit()? | handoff.rollback()?                // target authoritative | source stays
//! ```
//!
//! The VMM needs no async runtime: the engine runs its own thread (with a one-thread tokio
//! runtime inside), marking dirty is a plain wait-free call from the VMM's IO threads, and
//! every call here blocks the calling thread only. Events arrive on a `std` channel.

use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tern_transport::{Fingerprint, Identity, TransportTuning, connect};
use tokio::sync::{mpsc, watch};

use crate::compression::CompressionMode;
use crate::driver::{
    Command, EventSink, LiveHooks, Reconnect, SourceOptions, SourceReport, run_source,
};
use crate::error::MigrationError;
use crate::source::{LiveConfig, LiveMode, SourceConfig, SourceEvent, SourceProgress, VerifyMode};
use crate::throttle::Throttle;
use crate::tracked::TrackedDisk;

/// How to migrate.
#[derive(Clone, Debug)]
pub struct MigrationConfig {
    /// The target's address (`tern serve --listen`).
    pub target: SocketAddr,
    /// This host's identity.
    pub identity: Identity,
    /// The target's certificate fingerprint.
    pub peer: Fingerprint,
    /// Storage downtime budget (default 50 ms).
    pub max_downtime: Duration,
    /// Compression policy (default `Auto`).
    pub compression: CompressionMode,
    /// Verification at switchover (default `Written`).
    pub verify: VerifyMode,
    /// Reaction to a guest that writes faster than the link (default `Auto`).
    pub mode: LiveMode,
    /// Cap on the copy's bandwidth on the wire, bytes per second (default none).
    pub rate_limit_bytes_per_s: Option<u64>,
    /// Chunk size; must equal the `TrackedDisk`s' granularity (default 64 KiB).
    pub chunk_bytes: u32,
    /// Names of the disks sent to the target, in order (default `disk0`, `disk1`, …).
    pub identities: Vec<String>,
    /// A bandwidth cap shared with other migrations (a daemon-wide limit; default none).
    pub shared_rate_limit: Option<Arc<Throttle>>,
    /// After a lost link, keep reconnecting this long before failing (default 60 s);
    /// `None` fails at once.
    pub reconnect_window: Option<Duration>,
    /// QUIC tuning (idle timeout: how long a silent link takes to count as lost).
    pub tuning: TransportTuning,
    /// The session's id (default: a new one). With `restarted`, the id of the session a
    /// crashed source process was running.
    pub session_id: Option<[u8; 16]>,
    /// This process restarted after a crash and continues `session_id` (see
    /// [`SourceConfig::restarted`]).
    pub restarted: bool,
}

impl MigrationConfig {
    /// Defaults for everything but the peer.
    pub fn new(target: SocketAddr, identity: Identity, peer: Fingerprint) -> Self {
        Self {
            target,
            identity,
            peer,
            max_downtime: Duration::from_millis(50),
            compression: CompressionMode::Auto,
            verify: VerifyMode::Written,
            mode: LiveMode::Auto,
            rate_limit_bytes_per_s: None,
            chunk_bytes: crate::bitmap::GRANULARITY_DEFAULT,
            identities: Vec::new(),
            shared_rate_limit: None,
            reconnect_window: Some(Duration::from_secs(60)),
            tuning: TransportTuning::default(),
            session_id: None,
            restarted: false,
        }
    }
}

/// Where the migration is, as the blocking calls see it.
#[derive(Clone, Debug, Default)]
struct State {
    converged: Option<SourceEvent>,
    switched_over: Option<SourceEvent>,
    failed: Option<MigrationError>,
    /// The engine's result, set as soon as it is known — before the connection is closed
    /// and drained, so `commit` does not wait for QUIC's close handshake.
    outcome: Option<Result<SourceReport, MigrationError>>,
    finished: bool,
    /// A switchover was asked for: until its outcome, events wait (see `EventForwarder`).
    switching: bool,
}

/// The state and its change signals: a condvar for the blocking calls, a `Notify` for
/// [`Migration::switchover_async`].
#[derive(Debug, Default)]
struct SharedState {
    state: Mutex<State>,
    changed: Condvar,
    changed_async: tokio::sync::Notify,
}

impl SharedState {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn notify(&self) {
        self.changed.notify_all();
        self.changed_async.notify_waiters();
    }
}

type Shared = Arc<SharedState>;

/// A running live migration of one VM's disks (all of them converge, switch over and commit
/// or roll back together).
#[derive(Debug)]
pub struct Migration {
    commands: mpsc::UnboundedSender<Command>,
    events: std::sync::mpsc::Receiver<SourceEvent>,
    progress: watch::Receiver<SourceProgress>,
    shared: Shared,
    thread: Option<JoinHandle<Result<SourceReport, MigrationError>>>,
}

/// A migration after a successful switchover: the target holds a verified, durable copy,
/// and the source is still authoritative until `commit`.
#[derive(Debug)]
pub struct Handoff {
    migration: Migration,
    /// Storage downtime: from `switchover` to this handoff.
    pub downtime: Duration,
    /// Whether digests of the copy were compared and matched (false with `VerifyMode::Off`).
    pub verified: bool,
}

impl Migration {
    /// Starts migrating `disks` (in order) to the target. Returns once the engine's thread
    /// runs; connection errors arrive as a `Failed` event and from the blocking calls.
    pub fn start(disks: Vec<TrackedDisk>, config: MigrationConfig) -> Result<Self, MigrationError> {
        if disks.is_empty() {
            return Err(MigrationError::Incompatible("no disks to migrate".into()));
        }
        for disk in &disks {
            if disk.bitmap().granularity() != config.chunk_bytes {
                return Err(MigrationError::Incompatible(format!(
                    "disk tracked at {} bytes, migration chunk is {}",
                    disk.bitmap().granularity(),
                    config.chunk_bytes
                )));
            }
        }
        let (command_tx, command_rx) = mpsc::unbounded_channel();
        let (user_tx, user_rx) = std::sync::mpsc::channel();
        let bytes_total = disks.iter().map(TrackedDisk::size).sum();
        let (progress_tx, progress_rx) = watch::channel(SourceProgress {
            bytes_total,
            ..Default::default()
        });
        let shared: Shared = Arc::default();
        let mut session_id = [0u8; 16];
        // The session id only needs to differ between migrations; the clock is enough.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        session_id.copy_from_slice(&nanos.to_le_bytes());
        let session_id = config.session_id.unwrap_or(session_id);
        let options = SourceOptions {
            config: SourceConfig {
                chunk_bytes: config.chunk_bytes,
                verify: config.verify,
                session_id,
                restarted: config.restarted,
                live: Some(LiveConfig {
                    max_downtime: config.max_downtime,
                    mode: config.mode,
                    ..LiveConfig::default()
                }),
                ..SourceConfig::default()
            },
            compression: config.compression,
            rate_limit_bytes_per_s: config.rate_limit_bytes_per_s,
            shared_rate_limit: config.shared_rate_limit.clone(),
            reconnect: None,
        };
        let hooks = LiveHooks {
            bitmaps: disks.iter().map(|d| d.bitmap().clone()).collect(),
            throttles: disks.iter().map(|d| d.throttle().clone()).collect(),
            mirrors: disks.iter().map(|d| d.mirror().clone()).collect(),
            bulk_devices: disks.iter().map(|d| d.bulk_device().cloned()).collect(),
            commands: command_rx,
            // Recorded on the migration's thread as they happen: a switchover's outcome wakes
            // the waiting VMM thread directly (see `EventSink`).
            events: EventSink::new({
                let mut forwarder = EventForwarder {
                    shared: shared.clone(),
                    user_tx: user_tx.clone(),
                    held: Vec::new(),
                };
                move |event| forwarder.forward(event)
            }),
        };
        let devices: Vec<_> = disks
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let name = config
                    .identities
                    .get(i)
                    .cloned()
                    .unwrap_or_else(|| format!("disk{i}"));
                (d.device().clone(), name)
            })
            .collect();
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("tern-migration".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| MigrationError::Transport(format!("runtime: {e}")))?;
                let outcome_shared = thread_shared.clone();
                let result = runtime.block_on(async move {
                    let tuning = config.tuning;
                    let (endpoint, connection) =
                        connect(config.target, &config.identity, config.peer, &tuning)
                            .await
                            .map_err(|e| MigrationError::Transport(e.to_string()))?;
                    let mut options = options;
                    if let Some(window) = config.reconnect_window {
                        options.reconnect = Some(Reconnect::to(
                            endpoint.clone(),
                            config.target,
                            &config.identity,
                            config.peer,
                            &tuning,
                            window,
                        )?);
                    }
                    let result = run_source(
                        &connection,
                        devices,
                        options,
                        Some(progress_tx),
                        Some(hooks),
                    )
                    .await;
                    outcome_shared.lock().outcome = Some(result.clone());
                    outcome_shared.notify();
                    connection.close(0u32.into(), b"done");
                    let _ =
                        tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
                    // The event stream ends (for the VMM's reader) after the outcome is set.
                    drop(user_tx);
                    result
                });
                {
                    let mut state = thread_shared.lock();
                    if let Err(error) = &result {
                        state.failed.get_or_insert(error.clone());
                    }
                    state.finished = true;
                }
                thread_shared.notify();
                result
            })
            .map_err(|e| MigrationError::Transport(format!("spawn the migration thread: {e}")))?;
        Ok(Self {
            commands: command_tx,
            events: user_rx,
            progress: progress_rx,
            shared,
            thread: Some(thread),
        })
    }

    /// Every engine event, in order (progress is in [`Migration::progress`]).
    pub fn events(&self) -> &std::sync::mpsc::Receiver<SourceEvent> {
        &self.events
    }

    /// Counters now.
    pub fn progress(&self) -> SourceProgress {
        self.progress.borrow().clone()
    }

    /// A cloneable view of the counters for a status thread; it stays valid through
    /// switchover and commit (showing the last counters once the migration ended).
    pub fn progress_handle(&self) -> ProgressHandle {
        ProgressHandle(self.progress.clone())
    }

    /// Takes the event stream, for a thread that forwards it (a daemon's event bus);
    /// [`Migration::events`] yields nothing afterwards.
    pub fn take_events(&mut self) -> std::sync::mpsc::Receiver<SourceEvent> {
        let (_closed, empty) = std::sync::mpsc::channel();
        std::mem::replace(&mut self.events, empty)
    }

    /// Blocks until storage converged (returns the `Converged` event), reported that it
    /// cannot converge (returns `NotConverging`, so the VMM can decide), failed, or `timeout`
    /// passed (`None`).
    pub fn wait_converged(&self, timeout: Duration) -> Result<Option<SourceEvent>, MigrationError> {
        let (condvar, state) = (&self.shared.changed, self.shared.lock());
        let (state, _) = condvar
            .wait_timeout_while(state, timeout, |s| {
                s.converged.is_none() && s.failed.is_none() && !s.finished
            })
            .unwrap_or_else(|e| e.into_inner());
        if let Some(error) = &state.failed {
            return Err(error.clone());
        }
        Ok(state.converged.clone())
    }

    /// Call with the VM paused and its disk IO drained: final pass, target flush, digest
    /// comparison. Returns the handoff, or the error that keeps the source authoritative.
    pub fn switchover(self) -> Result<Handoff, MigrationError> {
        let started = std::time::Instant::now();
        self.shared.lock().switching = true;
        let _ = self.commands.send(Command::Switchover);
        let (condvar, state) = (&self.shared.changed, self.shared.lock());
        let state = condvar
            .wait_while(state, |s| switchover_outcome(s).is_none())
            .unwrap_or_else(|e| e.into_inner());
        let outcome = switchover_outcome(&state).expect("waited for it");
        drop(state);
        self.handoff(outcome, started)
    }

    /// [`Migration::switchover`] for a caller inside an async runtime (the daemon): the same
    /// steps and result, awaited instead of blocking a thread, so the paused VM does not also
    /// wait for two hops through a blocking thread pool.
    pub async fn switchover_async(self) -> Result<Handoff, MigrationError> {
        let started = std::time::Instant::now();
        self.shared.lock().switching = true;
        let _ = self.commands.send(Command::Switchover);
        let outcome = loop {
            // Registered before the state is looked at, so no change is missed in between.
            let mut changed = std::pin::pin!(self.shared.changed_async.notified());
            changed.as_mut().enable();
            if let Some(outcome) = switchover_outcome(&self.shared.lock()) {
                break outcome;
            }
            changed.await;
        };
        self.handoff(outcome, started)
    }

    fn handoff(
        self,
        outcome: Result<bool, MigrationError>,
        started: std::time::Instant,
    ) -> Result<Handoff, MigrationError> {
        let verified = outcome?;
        Ok(Handoff {
            migration: self,
            downtime: started.elapsed(),
            verified,
        })
    }
}

/// How a switchover ended (whether it verified), `None` while it runs.
fn switchover_outcome(state: &State) -> Option<Result<bool, MigrationError>> {
    if let Some(error) = &state.failed {
        return Some(Err(error.clone()));
    }
    match state.switched_over {
        Some(SourceEvent::SwitchedOver { verified }) => Some(Ok(verified)),
        _ if state.finished => Some(Err(MigrationError::Protocol(
            "migration ended without a switchover".into(),
        ))),
        _ => None,
    }
}

/// A cloneable view of a migration's counters.
#[derive(Clone, Debug)]
pub struct ProgressHandle(watch::Receiver<SourceProgress>);

impl ProgressHandle {
    /// Counters now.
    pub fn get(&self) -> SourceProgress {
        self.0.borrow().clone()
    }
}

impl Handoff {
    /// Makes the target authoritative and waits for its confirmation. Afterwards the source
    /// disks may be released.
    pub fn commit(mut self) -> Result<SourceReport, MigrationError> {
        let _ = self.migration.commands.send(Command::Commit);
        self.migration.join()
    }

    /// Abandons the migration: the target keeps its image marked incomplete and the VM
    /// resumes on the source.
    pub fn rollback(mut self) -> Result<(), MigrationError> {
        let _ = self.migration.commands.send(Command::Rollback);
        match self.migration.join() {
            Err(MigrationError::RolledBack) => Ok(()),
            Err(other) => Err(other),
            Ok(_) => Err(MigrationError::Protocol(
                "committed despite rollback".into(),
            )),
        }
    }
}

impl Migration {
    /// Waits for the engine's result. The thread then only closes the connection and drains
    /// it (bounded by 2 s); it is left to finish that on its own, so the caller (a VMM in its
    /// downtime, after `commit`) does not wait for QUIC's close handshake.
    fn join(&mut self) -> Result<SourceReport, MigrationError> {
        let thread = self.thread.take().expect("joined once");
        let (condvar, state) = (&self.shared.changed, self.shared.lock());
        let state = condvar
            .wait_while(state, |s| s.outcome.is_none() && !s.finished)
            .unwrap_or_else(|e| e.into_inner());
        if let Some(outcome) = state.outcome.clone() {
            return outcome;
        }
        drop(state);
        thread.join().unwrap_or_else(|_| {
            Err(MigrationError::Transport(
                "migration thread panicked".into(),
            ))
        })
    }
}

impl Drop for Migration {
    /// Dropping a migration before commit rolls it back: the source stays authoritative.
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = self.commands.send(Command::Rollback);
            let _ = self.commands.send(Command::Cancel);
            let _ = thread.join();
        }
    }
}

/// Records each event in the shared state and passes it on to the VMM's event stream, on the
/// migration's thread.
///
/// From a switchover request to its outcome the VM is paused, and waking the VMM's event
/// reader then costs the paused VM time: on a busy host the woken thread preempts the
/// migration's (measured on 2 cores: the `Flushed` event's wake-up delayed the handling of
/// the verification answer that had already arrived by ~70 µs of a ~0.7 ms downtime). So
/// events wait until the outcome is recorded — which wakes the caller of `switchover`
/// first — and then follow in their order.
struct EventForwarder {
    shared: Shared,
    user_tx: std::sync::mpsc::Sender<SourceEvent>,
    held: Vec<SourceEvent>,
}

impl EventForwarder {
    fn forward(&mut self, event: SourceEvent) {
        update(&self.shared, &event);
        if switchover_pending(&self.shared.lock()) {
            self.held.push(event);
            return;
        }
        self.release();
        let _ = self.user_tx.send(event);
    }

    fn release(&mut self) {
        for event in self.held.drain(..) {
            let _ = self.user_tx.send(event);
        }
    }
}

impl Drop for EventForwarder {
    /// The engine ended: nothing waits any more.
    fn drop(&mut self) {
        self.release();
    }
}

/// A switchover was asked for and has no outcome yet.
fn switchover_pending(state: &State) -> bool {
    state.switching && switchover_outcome(state).is_none()
}

fn update(shared: &Shared, event: &SourceEvent) {
    {
        let mut state = shared.lock();
        match event {
            SourceEvent::Converged { .. } | SourceEvent::NotConverging { .. } => {
                state.converged.get_or_insert(event.clone());
            }
            SourceEvent::SwitchedOver { .. } => state.switched_over = Some(event.clone()),
            SourceEvent::Failed(error) => state.failed = Some(error.clone()),
            _ => return,
        }
    }
    shared.notify();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forwarder() -> (
        EventForwarder,
        Shared,
        std::sync::mpsc::Receiver<SourceEvent>,
    ) {
        let shared: Shared = Arc::default();
        let (user_tx, user_rx) = std::sync::mpsc::channel();
        let forwarder = EventForwarder {
            shared: shared.clone(),
            user_tx,
            held: Vec::new(),
        };
        (forwarder, shared, user_rx)
    }

    #[test]
    fn events_wait_from_a_switchover_request_to_its_outcome_then_follow_in_order() {
        let (mut forwarder, shared, events) = forwarder();
        forwarder.forward(SourceEvent::Connected);
        assert!(matches!(events.try_recv(), Ok(SourceEvent::Connected)));
        shared.lock().switching = true;
        forwarder.forward(SourceEvent::Flushed);
        assert!(events.try_recv().is_err(), "woke the reader while paused");
        forwarder.forward(SourceEvent::SwitchedOver { verified: true });
        assert!(matches!(switchover_outcome(&shared.lock()), Some(Ok(true))));
        let after: Vec<_> = events.try_iter().collect();
        assert!(
            matches!(
                after[..],
                [
                    SourceEvent::Flushed,
                    SourceEvent::SwitchedOver { verified: true }
                ]
            ),
            "{after:?}"
        );
    }

    #[test]
    fn held_events_are_delivered_when_the_engine_ends() {
        let (mut forwarder, shared, events) = forwarder();
        shared.lock().switching = true;
        forwarder.forward(SourceEvent::Flushed);
        assert!(events.try_recv().is_err());
        drop(forwarder);
        assert!(matches!(events.try_recv(), Ok(SourceEvent::Flushed)));
    }
}
