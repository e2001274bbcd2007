//! The source driver: runs a [`SourceMigration`] over real disks and a QUIC connection.
//!
//! It only moves bytes: reads what the machine asks for, encodes and writes the frames it
//! yields, and feeds back completions and control messages. Compression runs in the
//! per-stream writer tasks, so several frames compress in parallel.
//!
//! With [`SourceOptions::reconnect`], a lost link is not the end: the driver drops the
//! connection, reconnects with bounded backoff, and the machine resumes the session (see
//! [`SourceMigration::handle_transport_failed`]). Inputs carry the number of the link they
//! came from, so nothing from a dead connection reaches the machine after it moved on.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tern_blockdev::{BlockDevice, IoOp};
use tern_transport::quinn;
use tern_transport::{Compression, Control, Encoder, FrameReader, FrameWriter};
use tokio::sync::{mpsc, watch};

use crate::bitmap::DirtyBitmap;
use crate::compression::{CompressionMode, CompressionPolicy, WriterTime};
use crate::digest::ReadBlock;
use crate::error::MigrationError;
use crate::source::{
    SourceConfig, SourceDisk, SourceEvent, SourceMigration, SourceProgress, Transmit,
};
use crate::throttle::Throttle;
use crate::tracked::{MirrorJob, MirrorSwitch};

/// zstd level for data frames: level 1 gives most of the ratio at ~0.4 GB/s per core.
const ZSTD_LEVEL: i32 = 1;
/// Frames queued per data-stream writer: enough to keep the stream busy while the next
/// frame is compressed, small enough to bound memory (I6).
const WRITER_QUEUE_FRAMES: usize = 4;

/// How to run the source.
#[derive(Clone, Debug)]
pub struct SourceOptions {
    /// The state machine's tunables.
    pub config: SourceConfig,
    /// When to compress.
    pub compression: CompressionMode,
    /// Cap on the bytes per second the copy puts on the wire (all data streams together);
    /// `None` for no cap.
    pub rate_limit_bytes_per_s: Option<u64>,
    /// A cap shared with other migrations (a daemon's total bandwidth), applied on top of
    /// `rate_limit_bytes_per_s`; `None` for none.
    pub shared_rate_limit: Option<Arc<Throttle>>,
    /// How to get a new connection after a lost link; `None` fails the migration instead.
    pub reconnect: Option<Reconnect>,
}

/// A future that opens a new connection to the target.
pub type ConnectFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<quinn::Connection, String>> + Send>>;

/// How the source driver reconnects after a lost link.
#[derive(Clone)]
pub struct Reconnect {
    /// Opens a new connection to the same target (same address, same identities).
    pub connect: Arc<dyn Fn() -> ConnectFuture + Send + Sync>,
    /// Give up (and fail the migration) once the link has been down this long.
    pub give_up_after: Duration,
}

impl Reconnect {
    /// Reconnects from `endpoint` to `target` with the same identities and tuning, giving up
    /// after `give_up_after`.
    pub fn to(
        endpoint: quinn::Endpoint,
        target: std::net::SocketAddr,
        identity: &tern_transport::Identity,
        peer: tern_transport::Fingerprint,
        tuning: &tern_transport::TransportTuning,
        give_up_after: Duration,
    ) -> Result<Self, MigrationError> {
        let client = tern_transport::client_config(identity, peer, tuning)
            .map_err(|e| MigrationError::Transport(e.to_string()))?;
        Ok(Self {
            connect: Arc::new(move || {
                let endpoint = endpoint.clone();
                let client = client.clone();
                Box::pin(async move {
                    tern_transport::reconnect(&endpoint, target, client)
                        .await
                        .map_err(|e| e.to_string())
                })
            }),
            give_up_after,
        })
    }
}

impl std::fmt::Debug for Reconnect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reconnect")
            .field("give_up_after", &self.give_up_after)
            .finish_non_exhaustive()
    }
}

/// First wait between reconnection attempts; it doubles up to [`RECONNECT_BACKOFF_MAX`].
const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest wait between reconnection attempts.
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// One connection attempt may take this long (handshake included).
const CONNECT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the driver hands each event of the machine, on its own thread, as it happens: a
/// channel, or a function. The embedding API records a switchover's outcome in a function,
/// which wakes the VMM's waiting thread without a task hop in between (measured: a hop
/// through a forwarding task cost ~0.1 ms of a ~1 ms storage downtime).
pub struct EventSink(Box<dyn FnMut(SourceEvent) + Send>);

impl EventSink {
    /// A sink that calls `f` with every event. `f` runs on the migration's thread while the
    /// VM may be paused: it must not block.
    pub fn new(f: impl FnMut(SourceEvent) + Send + 'static) -> Self {
        Self(Box::new(f))
    }

    fn emit(&mut self, event: SourceEvent) {
        (self.0)(event)
    }
}

impl From<mpsc::UnboundedSender<SourceEvent>> for EventSink {
    /// Sends every event to the channel (events after the receiver is gone are dropped).
    fn from(tx: mpsc::UnboundedSender<SourceEvent>) -> Self {
        Self::new(move |event| {
            let _ = tx.send(event);
        })
    }
}

impl std::fmt::Debug for EventSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventSink")
    }
}

/// What a live migration adds to a copy: the dirty bitmaps guest writes mark, commands from
/// the embedding VMM, and a sink for the machine's events.
#[derive(Debug)]
pub struct LiveHooks {
    /// One bitmap per disk, in disk order, with the chunk size as granularity.
    pub bitmaps: Vec<Arc<DirtyBitmap>>,
    /// Commands from the VMM or the operator.
    pub commands: mpsc::UnboundedReceiver<Command>,
    /// Every event of the machine, as it happens.
    pub events: EventSink,
    /// One write throttle per disk (in disk order), set by `ModeChanged` events and lifted
    /// when the migration ends.
    pub throttles: Vec<Arc<Throttle>>,
    /// One active-mode switch per disk (in disk order): the driver connects them, turns them
    /// on when the machine starts mirroring, and disconnects them when the migration ends.
    pub mirrors: Vec<Arc<MirrorSwitch>>,
    /// Per disk (in disk order), a handle of the same disk that the bulk pass reads instead:
    /// an O_DIRECT one under a guest that writes through the page cache
    /// ([`crate::TrackedDisk::with_bulk_reads_from`]); `None` reads the disk itself.
    pub bulk_devices: Vec<Option<BlockDevice>>,
}

/// A command to a running live migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// The VM is paused and its IO drained: do the final pass, flush and verify.
    Switchover,
    /// Give up; the source stays authoritative.
    Cancel,
    /// After `SwitchedOver`: make the target authoritative.
    Commit,
    /// Before commit: abandon; the target's image stays marked incomplete.
    Rollback,
}

/// The outcome of a source run.
#[derive(Clone, Debug)]
pub struct SourceReport {
    /// Counters and verification result.
    pub summary: crate::source::SourceSummary,
    /// UDP bytes the connection sent (QUIC and TLS overhead included).
    pub bytes_wire: u64,
    /// Frames sent compressed.
    pub frames_compressed: u64,
    /// Wall-clock time from the first frame to the target's confirmation.
    pub duration: Duration,
    /// Live: storage downtime, from the switchover command to the handoff (final pass durable
    /// on the target and verified).
    pub downtime: Option<Duration>,
}

enum Input {
    ReadDone {
        token: u64,
        block: ReadBlock,
    },
    ReadFailed {
        token: u64,
        message: String,
    },
    /// A control message from link number `.0`.
    Control(u64, Control),
    /// Link number `.0` failed.
    TransportFailed(u64, String),
    /// A new connection after a lost link.
    Reconnected(quinn::Connection),
    /// Reconnecting took too long.
    ReconnectFailed(String),
}

/// One connection's streams and writer tasks.
struct Link {
    number: u64,
    connection: quinn::Connection,
    control: FrameWriter,
    data_tx: Vec<mpsc::Sender<Transmit>>,
    writers: Vec<tokio::task::JoinHandle<()>>,
}

/// What every link's writers share.
struct WriterShared {
    compression: CompressionMode,
    frames_compressed: Arc<std::sync::atomic::AtomicU64>,
    rate_limit: Arc<Throttle>,
    shared_rate_limit: Option<Arc<Throttle>>,
}

impl Link {
    /// Opens the control stream and the machine's data streams on `connection`.
    async fn open(
        number: u64,
        connection: quinn::Connection,
        machine: &SourceMigration,
        shared: &WriterShared,
        input_tx: &mpsc::UnboundedSender<Input>,
    ) -> Result<Link, String> {
        let (control_send, control_recv) = connection.open_bi().await.map_err(|e| e.to_string())?;
        tokio::spawn(super::read_control(
            connection.clone(),
            FrameReader::new(control_recv),
            input_tx.clone(),
            move |message| Input::Control(number, message),
            move |error| Input::TransportFailed(number, error),
        ));
        let mut data_tx = Vec::new();
        let mut writers = Vec::new();
        // One policy for all writers of the connection: they share the link and the CPUs,
        // so only their total rate tells whether compressing pays (a writer measuring its
        // own rate wins a larger share of a shared bottleneck by compressing even where
        // that makes the whole migration slower).
        let policy = Arc::new(std::sync::Mutex::new(CompressionPolicy::new(
            shared.compression,
        )));
        for index in 0..machine.data_streams() {
            let stream = connection.open_uni().await.map_err(|e| e.to_string())?;
            if machine.mirror_stream() == Some(index) {
                // Mirrored guest writes go first: quinn sends higher-priority streams' data
                // before others'.
                let _ = stream.set_priority(1);
            }
            let (tx, rx) = mpsc::channel(WRITER_QUEUE_FRAMES);
            data_tx.push(tx);
            writers.push(tokio::spawn(write_data(
                FrameWriter::new(stream),
                rx,
                policy.clone(),
                machine.mirror_stream() != Some(index),
                input_tx.clone(),
                number,
                shared.frames_compressed.clone(),
                shared.rate_limit.clone(),
                shared.shared_rate_limit.clone(),
            )));
        }
        Ok(Link {
            number,
            connection,
            control: FrameWriter::new(control_send),
            data_tx,
            writers,
        })
    }

    /// Drops a dead link: its writers stop, the connection closes.
    fn abandon(self, reason: &str) -> u64 {
        for writer in &self.writers {
            writer.abort();
        }
        self.connection
            .close(super::target::CLOSE_FAILED.into(), reason.as_bytes());
        self.connection.stats().udp_tx.bytes
    }
}

/// Tries to connect until it works or `give_up_after` has passed since `down_since`.
async fn reconnect(
    reconnect: Reconnect,
    down_since: Instant,
    input_tx: mpsc::UnboundedSender<Input>,
) {
    let mut backoff = RECONNECT_BACKOFF_MIN;
    let mut last_error = String::from("no attempt made");
    while down_since.elapsed() < reconnect.give_up_after {
        match tokio::time::timeout(CONNECT_ATTEMPT_TIMEOUT, (reconnect.connect)()).await {
            Ok(Ok(connection)) => {
                let _ = input_tx.send(Input::Reconnected(connection));
                return;
            }
            Ok(Err(e)) => last_error = e,
            Err(_) => last_error = "connection attempt timed out".into(),
        }
        tracing::debug!(error = %last_error, "reconnect attempt failed");
        let left = reconnect.give_up_after.saturating_sub(down_since.elapsed());
        tokio::time::sleep(backoff.min(left)).await;
        backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
    }
    let _ = input_tx.send(Input::ReconnectFailed(format!(
        "down for {:.1} s; last attempt: {last_error}",
        down_since.elapsed().as_secs_f64()
    )));
}

/// Runs a migration of `disks` (with their identities) over `connection`.
///
/// Returns once the target confirmed a complete, verified copy, or with the first error; in
/// every case the source disks are unchanged (they are only read).
pub async fn run_source(
    connection: &quinn::Connection,
    disks: Vec<(BlockDevice, String)>,
    options: SourceOptions,
    progress: Option<watch::Sender<SourceProgress>>,
    live: Option<LiveHooks>,
) -> Result<SourceReport, MigrationError> {
    let started = Instant::now();
    let chunk_bytes = u64::from(options.config.chunk_bytes);
    let (mirror_tx, mut mirror_rx) = mpsc::unbounded_channel::<MirrorJob>();
    let bulk_devices = live
        .as_ref()
        .map(|hooks| hooks.bulk_devices.clone())
        .unwrap_or_default();
    let (bitmaps, mut commands, mut events, throttles, mirrors) = match live {
        Some(hooks) => {
            assert_eq!(hooks.bitmaps.len(), disks.len(), "one bitmap per disk");
            for bitmap in &hooks.bitmaps {
                assert_eq!(bitmap.granularity(), options.config.chunk_bytes);
                // Marks from before the bulk pass are covered by it: drop them. Writes that
                // complete from now on are marked and re-sent (I2).
                bitmap.harvest();
            }
            for (disk, switch) in hooks.mirrors.iter().enumerate() {
                switch.connect(disk as u32, mirror_tx.clone());
            }
            (
                hooks.bitmaps,
                Some(hooks.commands),
                Some(hooks.events),
                hooks.throttles,
                hooks.mirrors,
            )
        }
        None => (Vec::new(), None, None, Vec::new(), Vec::new()),
    };
    drop(mirror_tx);
    // Guest writes waiting for their mirror: machine token → job, and when it was handed
    // over (for the debug log's latency: a guest waits on each).
    let mut mirror_jobs: std::collections::HashMap<u64, (MirrorJob, Instant)> = Default::default();
    let mut next_mirror = 1u64;
    let mut switchover_started: Option<Instant> = None;
    let mut downtime = None;
    let mut source_disks = Vec::with_capacity(disks.len());
    for (index, (disk, identity)) in disks.iter().enumerate() {
        let allocated = disk.allocated_extents().map_err(|e| MigrationError::Disk {
            disk: index as u32,
            message: e.to_string(),
        })?;
        source_disks.push(SourceDisk {
            size: disk.size(),
            identity: identity.clone(),
            allocated,
        });
    }
    let devices: Vec<BlockDevice> = disks.into_iter().map(|(disk, _)| disk).collect();
    let (input_tx, mut input_rx) = mpsc::unbounded_channel::<Input>();
    // One bucket shared by all data streams, so the cap holds for the connection.
    let rate_limit = Arc::new(Throttle::new());
    rate_limit.set_rate(options.rate_limit_bytes_per_s.unwrap_or(0));
    let shared = WriterShared {
        compression: options.compression,
        frames_compressed: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        rate_limit,
        shared_rate_limit: options.shared_rate_limit.clone(),
    };
    let mut config = options.config;
    config.resumable = options.reconnect.is_some();
    let mut machine = SourceMigration::new(config, source_disks);
    let mut link = Some(
        Link::open(0, connection.clone(), &machine, &shared, &input_tx)
            .await
            .map_err(MigrationError::Transport)?,
    );
    let mut links_opened = 1u64;
    // While the link is down: since when, and the task trying to reconnect.
    let mut link_down_since: Option<Instant> = None;
    let mut reconnecting: Option<tokio::task::JoinHandle<()>> = None;
    // UDP bytes sent by links that are gone.
    let mut bytes_wire_closed = 0u64;

    // Frames whose stream writer's queue was full (at most one per stream, a mirror frame
    // first): they go out as soon as there is room, and meanwhile only control messages and
    // mirror frames are taken from the machine, so a guest waiting on a mirror never waits
    // for a bulk stream to drain.
    let mut blocked: Vec<Transmit> = Vec::new();
    let mirror_stream = machine.mirror_stream();

    let result = loop {
        while let Some(transmit) = if blocked.is_empty() {
            machine.poll_transmit()
        } else {
            let mirror_full = blocked.iter().any(|t| t.stream() == mirror_stream);
            machine.poll_priority_transmit(!mirror_full)
        } {
            let Some(current) = link.as_mut() else {
                // Only a failure's error frame is produced without a link; nobody hears it.
                // (A data frame here would count as sent on the next link: never.)
                debug_assert!(
                    matches!(transmit, Transmit::Control(Control::Error { .. })),
                    "{transmit:?} produced while disconnected"
                );
                continue;
            };
            match transmit {
                Transmit::Control(message) => {
                    if let Control::MirrorRequest { token, .. } = &message {
                        tracing::debug!(token, "mirror request sent");
                    }
                    if let Err(e) = current.control.send(message.encode()).await {
                        let message = super::describe_failure(&current.connection, &e);
                        link_failed(&mut machine, &current.connection, message);
                    }
                }
                data @ (Transmit::Data { stream, .. } | Transmit::Zero { stream, .. }) => {
                    match current.data_tx[stream as usize].try_send(data) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Full(data)) => {
                            assert!(
                                blocked.iter().all(|t| t.stream() != data.stream()),
                                "a second blocked frame for one stream would be sent out of order"
                            );
                            if data.stream() == mirror_stream {
                                blocked.insert(0, data);
                            } else {
                                blocked.push(data);
                            }
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => {
                            let message = "data stream writer stopped".to_string();
                            link_failed(&mut machine, &current.connection, message);
                        }
                    }
                }
            }
        }
        submit_reads(
            &mut machine,
            &devices,
            &bulk_devices,
            &bitmaps,
            chunk_bytes,
            &input_tx,
        );
        if machine.has_deferred_work() {
            // quinn's connection task sends what the loop above queued (the final barrier)
            // only when it runs: let it, before the machine computes.
            tokio::task::yield_now().await;
        }
        machine.handle_time(Instant::now());
        if machine.wants_dirty_count(Instant::now()) {
            let dirty = bitmaps.iter().map(|bitmap| bitmap.dirty_bytes()).sum();
            machine.handle_dirty_count(Instant::now(), dirty);
        }
        if machine.wants_dirty(Instant::now()) {
            let dirty = bitmaps
                .iter()
                .enumerate()
                .map(|(disk, bitmap)| (disk as u32, bitmap.harvest()))
                .collect();
            machine.handle_dirty(Instant::now(), dirty);
            continue;
        }
        let mut finished = None;
        while let Some(event) = machine.poll_event() {
            if let Some(events) = &mut events {
                events.emit(event.clone());
            }
            match event {
                SourceEvent::Completed(summary) => finished = Some(Ok(summary)),
                SourceEvent::Failed(error) => finished = Some(Err(error)),
                SourceEvent::Connected => tracing::info!("target accepted the handshake"),
                SourceEvent::LinkDown { ref message } => {
                    let reconnect = options
                        .reconnect
                        .clone()
                        .expect("only a resumable machine loses its link");
                    tracing::warn!(
                        error = %message,
                        give_up_after_s = reconnect.give_up_after.as_secs_f64(),
                        "link lost; guest writes are tracked while reconnecting"
                    );
                    if let Some(dead) = link.take() {
                        bytes_wire_closed += dead.abandon("link lost");
                    }
                    // They belonged to the dead link; the machine requeues what it carried.
                    blocked.clear();
                    let since = Instant::now();
                    link_down_since = Some(since);
                    reconnecting = Some(tokio::spawn(self::reconnect(
                        reconnect,
                        since,
                        input_tx.clone(),
                    )));
                }
                SourceEvent::Resumed {
                    from_start,
                    bytes_requeued,
                } => {
                    if from_start {
                        tracing::warn!("target lost the session: copying again from the start");
                    } else {
                        tracing::info!(bytes_requeued, "resumed on a new connection");
                    }
                }
                SourceEvent::BulkDone => tracing::info!("bulk pass sent"),
                SourceEvent::Flushed => tracing::debug!("target flushed"),
                SourceEvent::ModeChanged {
                    mirroring,
                    throttle_bytes_per_s,
                    ref reason,
                    dirty_bytes,
                    dirty_rate,
                    transfer_rate,
                } => {
                    for switch in &mirrors {
                        switch.set_active(mirroring);
                    }
                    tracing::warn!(
                        mirroring,
                        throttle_mib_s = throttle_bytes_per_s as f64 / (1 << 20) as f64,
                        dirty_bytes,
                        dirty_mib_s = dirty_rate / (1 << 20) as f64,
                        transfer_mib_s = transfer_rate / (1 << 20) as f64,
                        "mode changed: {reason}"
                    );
                    for throttle in &throttles {
                        throttle.set_rate(throttle_bytes_per_s);
                    }
                }
                SourceEvent::SwitchedOver { verified } => {
                    downtime = switchover_started.map(|at| at.elapsed());
                    tracing::info!(
                        verified,
                        downtime_ms = downtime.unwrap_or_default().as_secs_f64() * 1e3,
                        "switched over; waiting for commit"
                    );
                }
                SourceEvent::Converged {
                    dirty_bytes,
                    predicted_final_sync,
                    transfer_rate,
                } => tracing::info!(
                    dirty_bytes,
                    predicted_final_sync_ms = predicted_final_sync.as_secs_f64() * 1e3,
                    transfer_mib_s = transfer_rate / (1 << 20) as f64,
                    "converged"
                ),
                SourceEvent::NotConverging {
                    dirty_bytes,
                    dirty_rate,
                    transfer_rate,
                } => tracing::warn!(
                    dirty_bytes,
                    dirty_mib_s = dirty_rate / (1 << 20) as f64,
                    transfer_mib_s = transfer_rate / (1 << 20) as f64,
                    "not converging: the guest dirties data as fast as it is sent"
                ),
            }
        }
        while let Some((token, mirrored)) = machine.poll_mirrored() {
            if let Some((job, started)) = mirror_jobs.remove(&token) {
                tracing::debug!(
                    token,
                    us = started.elapsed().as_micros() as u64,
                    mirrored,
                    "mirror finished"
                );
                job.finish(mirrored);
            }
        }
        if let Some(progress) = &progress {
            progress.send_replace(machine.progress());
        }
        if let Some(result) = finished {
            break result;
        }
        let deadline = machine.poll_timeout();
        let input = tokio::select! {
            input = input_rx.recv() => input.expect("the driver holds a sender"),
            command = async { commands.as_mut().expect("guarded").recv().await }, if commands.is_some() => {
                match command {
                    Some(Command::Switchover) => {
                        tracing::debug!("switchover: final pass");
                        switchover_started = Some(Instant::now());
                        machine.start_switchover();
                    }
                    Some(Command::Cancel) => machine.cancel(),
                    Some(Command::Commit) => machine.commit(),
                    Some(Command::Rollback) => machine.rollback(),
                    // The handle was dropped: nobody can switch over any more.
                    None => commands = None,
                }
                continue;
            }
            Some(job) = mirror_rx.recv() => {
                let token = next_mirror;
                next_mirror += 1;
                tracing::debug!(token, "mirror started");
                machine.handle_mirror(token, job.disk, job.range.clone());
                mirror_jobs.insert(token, (job, Instant::now()));
                continue;
            }
            () = sleep_until(deadline), if deadline.is_some() => continue,
            permit = async {
                let stream = blocked[0].stream().expect("only data frames block");
                link.as_ref().expect("guarded").data_tx[stream as usize].reserve().await
            }, if !blocked.is_empty() && link.is_some() => {
                let frame = blocked.remove(0);
                match permit {
                    Ok(permit) => permit.send(frame),
                    Err(_) => {
                        let current = link.as_ref().expect("guarded");
                        link_failed(&mut machine, &current.connection, "data stream writer stopped".into());
                    }
                }
                continue;
            }
        };
        match handle_input(&mut machine, input, &link) {
            Some(Input::Reconnected(connection)) => {
                let number = links_opened;
                links_opened += 1;
                match Link::open(number, connection, &machine, &shared, &input_tx).await {
                    Ok(new) => {
                        tracing::info!(link = number, "reconnected; resuming the session");
                        link = Some(new);
                        link_down_since = None;
                        machine.handle_reconnected();
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "new connection failed at once; retrying");
                        let reconnect = options.reconnect.clone().expect("resumable");
                        let since = link_down_since.unwrap_or_else(Instant::now);
                        reconnecting = Some(tokio::spawn(self::reconnect(
                            reconnect,
                            since,
                            input_tx.clone(),
                        )));
                    }
                }
            }
            Some(Input::ReconnectFailed(message)) => machine.give_up(message),
            _ => {}
        }
    };
    // However it ended, the guest is no longer slowed down for the migration's sake, and
    // its writes are tracked in the bitmap again; writes still waiting for a mirror are
    // marked dirty and completed (I2).
    for throttle in &throttles {
        throttle.set_rate(0);
    }
    for switch in &mirrors {
        switch.disconnect();
    }
    mirror_rx.close();
    while let Ok(job) = mirror_rx.try_recv() {
        job.finish(false);
    }
    for (_, (job, _)) in mirror_jobs.drain() {
        job.finish(false);
    }
    if let Some(task) = reconnecting {
        // Ended (failed, cancelled) while reconnecting: stop trying.
        task.abort();
    }
    let Some(Link {
        connection: last_connection,
        mut control,
        data_tx,
        writers,
        ..
    }) = link
    else {
        return Err(result.expect_err("a migration completes only over a link"));
    };
    // Flush a pending error frame to the target before closing.
    while let Some(Transmit::Control(message)) = machine.poll_transmit() {
        let _ = control.send(message.encode()).await;
    }
    drop(data_tx);
    for writer in writers {
        let _ = writer.await;
    }
    control.finish();
    if let Err(error) = &result {
        super::target::close_with_error(&last_connection, error);
    }
    let summary = result?;
    let stats = last_connection.stats();
    let bytes_wire = bytes_wire_closed + stats.udp_tx.bytes;
    tracing::info!(
        udp_datagrams = stats.udp_tx.datagrams,
        udp_transmits = stats.udp_tx.ios,
        lost_packets = stats.path.lost_packets,
        lost_bytes = stats.path.lost_bytes,
        congestion_events = stats.path.congestion_events,
        rtt_us = stats.path.rtt.as_micros() as u64,
        cwnd = stats.path.cwnd,
        mtu = stats.path.current_mtu,
        acks_received = stats.frame_rx.acks,
        "connection statistics of the last link"
    );
    // The target waits for us to close (it has sent its last word); after a reconnect the
    // caller only knows the first connection, so close the last one here.
    last_connection.close(0u32.into(), b"done");
    Ok(SourceReport {
        summary,
        bytes_wire,
        frames_compressed: shared
            .frames_compressed
            .load(std::sync::atomic::Ordering::Relaxed),
        duration: started.elapsed(),
        downtime,
    })
}

/// Feeds an input to the machine; inputs of links other than the current one are dropped
/// (they come from a connection the machine already gave up). Reconnection inputs are the
/// driver's own business and are handed back.
fn handle_input(machine: &mut SourceMigration, input: Input, link: &Option<Link>) -> Option<Input> {
    let current = link.as_ref().map(|l| l.number);
    match input {
        Input::ReadDone { token, block } => machine.handle_read_done(token, block),
        Input::ReadFailed { token, message } => machine.handle_read_failed(token, message),
        Input::Control(number, message) if Some(number) == current => {
            tracing::debug!(?message, "control received");
            machine.handle_control(message)
        }
        Input::TransportFailed(number, message) if Some(number) == current => {
            let connection = &link.as_ref().expect("current link").connection;
            link_failed(machine, connection, message);
        }
        Input::Control(..) | Input::TransportFailed(..) => {}
        other @ (Input::Reconnected(_) | Input::ReconnectFailed(_)) => return Some(other),
    }
    None
}

/// A stream of the current link failed: if the target closed the connection on purpose
/// (a refusal, a disk error on its side), that is final; anything else is a lost link.
fn link_failed(machine: &mut SourceMigration, connection: &quinn::Connection, message: String) {
    match connection.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(close))
            if close.error_code == super::target::CLOSE_FAILED.into() =>
        {
            machine.handle_peer_closed(String::from_utf8_lossy(&close.reason).into_owned());
        }
        _ => machine.handle_transport_failed(message),
    }
}

/// Submits the reads the machine asked for; their completions come back as inputs.
fn submit_reads(
    machine: &mut SourceMigration,
    devices: &[BlockDevice],
    bulk_devices: &[Option<BlockDevice>],
    bitmaps: &[Arc<DirtyBitmap>],
    chunk_bytes: u64,
    input_tx: &mpsc::UnboundedSender<Input>,
) {
    while let Some(read) = machine.poll_io() {
        let disk = read.disk as usize;
        // A bulk read past the page cache, unless the guest wrote into the range since the
        // copy began: those bytes are in the cache, and an O_DIRECT read would first wait
        // for the kernel to write them back (measured with an unpaced QD8 guest: its p99
        // write latency rose from 48 to 75 ms when every bulk read went O_DIRECT).
        let guest_wrote = || {
            bitmaps.get(disk).is_some_and(|bitmap| {
                let first = read.offset / chunk_bytes;
                let end = (read.offset + u64::from(read.len)).div_ceil(chunk_bytes);
                (first..end).any(|chunk| bitmap.is_dirty(chunk))
            })
        };
        let device = match bulk_devices.get(disk) {
            Some(Some(bulk)) if read.bulk && !guest_wrote() => bulk,
            _ => &devices[disk],
        };
        // The read overwrites the whole buffer or fails (and a failed read's buffer is
        // dropped unread), so it need not be zeroed first.
        let buf = device.alloc_read_buf(read.len as usize);
        let tx = input_tx.clone();
        let token = read.token;
        device.submit(
            IoOp::Read {
                offset: read.offset,
                buf,
            },
            Box::new(move |completion| {
                let input = match (completion.result, completion.op) {
                    // Examined here, on the I/O thread, while the bytes are fresh in its
                    // cache: the migration's thread runs QUIC and TLS and is the copy's
                    // bottleneck on fast links (measured: see ReadBlock).
                    (Ok(_), IoOp::Read { buf, .. }) => Input::ReadDone {
                        token,
                        block: ReadBlock::new(Bytes::from_owner(buf), chunk_bytes),
                    },
                    (Err(e), _) => Input::ReadFailed {
                        token,
                        message: e.to_string(),
                    },
                    (Ok(_), _) => unreachable!("a read completes as a read"),
                };
                // The receiver is gone only when the driver already returned.
                let _ = tx.send(input);
            }),
        );
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

#[allow(clippy::too_many_arguments)]
async fn write_data(
    mut writer: FrameWriter,
    mut rx: mpsc::Receiver<Transmit>,
    policy: Arc<std::sync::Mutex<CompressionPolicy>>,
    bulk: bool,
    failed: mpsc::UnboundedSender<Input>,
    link: u64,
    frames_compressed: Arc<std::sync::atomic::AtomicU64>,
    rate_limit: Arc<Throttle>,
    shared_rate_limit: Option<Arc<Throttle>>,
) {
    let mut encoder = Encoder::new();
    loop {
        let asked = Instant::now();
        let Some(transmit) = rx.recv().await else {
            break;
        };
        let got = Instant::now();
        let raw_bytes = transmit.data_bytes() as u64;
        let compress = raw_bytes > 0
            && policy
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .compress_next();
        let compression = if compress {
            Compression::Zstd(ZSTD_LEVEL)
        } else {
            Compression::Off
        };
        let frame = transmit
            .encode(&mut encoder, compression)
            .expect("control goes on the control stream");
        if frame.is_compressed() {
            frames_compressed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        // The operator's bandwidth cap: wait for the frame's bytes (a timer, not a lock).
        let now = Instant::now();
        let bytes = frame.wire_len() as u64;
        let wire_bytes = bytes;
        let mut wait = rate_limit.reserve(bytes, now);
        if let Some(shared) = &shared_rate_limit {
            wait = wait.max(shared.reserve(bytes, now));
        }
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        if let Err(e) = writer.send(frame).await {
            let _ = failed.send(Input::TransportFailed(link, e.to_string()));
            return;
        }
        if raw_bytes > 0 {
            let now = Instant::now();
            // Only the bulk writers' waits tell whether the link is the limit: the mirror
            // writer waits whenever the guest does not write.
            let time = bulk.then(|| WriterTime {
                waiting: got - asked,
                busy: now - got,
            });
            policy
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .record(raw_bytes, wire_bytes, now, time);
        }
    }
    writer.finish();
}
