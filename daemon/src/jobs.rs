//! The migrations a `tern export` daemon runs: what each one is doing, the commands that move
//! it along, and the events it reports.
//!
//! States of one migration (`phase` in `query-status`):
//!
//! ```text
//! migrating ──converged──▶ converged ──switchover──▶ switching-over ──▶ switched-over
//!     │  ▲                                              │                 │      │
//!     │  └─not-converging (background; auto escalates)  │ error           commit  rollback
//!     ▼                                                 ▼                 ▼      ▼
//!  failed / cancelled                                 failed          committed  rolled-back
//! ```
//!
//! The source stays authoritative in every state but `committed` (invariant I4). A
//! switchover holds the NBD exports of the migration's disks (new requests wait, admitted
//! ones finish and are marked dirty), then runs the engine's final pass; after `commit` the
//! held and later requests fail with `ESHUTDOWN` and a message naming the target; after a
//! failure or `rollback` they are released to the source as if nothing happened.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tern_engine::compression::CompressionMode;
use tern_engine::source::LiveMode;
use tern_engine::throttle::Throttle;
use tern_engine::{
    Handoff, Migration, MigrationConfig, MigrationError, ProgressHandle, SourceEvent, TrackedDisk,
    VerifyMode,
};
use tern_nbd::{Access, Export, proto::errno};
use tern_transport::{Fingerprint, Identity};
use tokio::sync::broadcast;

use crate::control::wire::{Args, CtlError, ErrorClass, event};

/// One disk the daemon serves.
pub(crate) struct Disk {
    pub(crate) name: String,
    /// The image file (its session record lives next to it).
    pub(crate) path: PathBuf,
    pub(crate) tracked: TrackedDisk,
    pub(crate) export: Arc<Export>,
}

/// Daemon-wide settings for migrations.
pub(crate) struct Limits {
    /// Migrations running at once.
    pub(crate) max_migrations: usize,
    /// Bandwidth shared by all migrations (bytes/s; 0 = none).
    pub(crate) bandwidth: Arc<Throttle>,
    /// Identity used when `migrate` names none.
    pub(crate) identity: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Migrating,
    Converged,
    SwitchingOver,
    SwitchedOver,
    Committing,
    /// The commit was sent but its confirmation never came: the target may or may not be
    /// authoritative. The exports stay held (no split brain) until an operator decides.
    CommitInDoubt,
    Committed,
    Failed,
    RolledBack,
    Cancelled,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Migrating => "migrating",
            Phase::Converged => "converged",
            Phase::SwitchingOver => "switching-over",
            Phase::SwitchedOver => "switched-over",
            Phase::Committing => "committing",
            Phase::CommitInDoubt => "commit-in-doubt",
            Phase::Committed => "committed",
            Phase::Failed => "failed",
            Phase::RolledBack => "rolled-back",
            Phase::Cancelled => "cancelled",
        }
    }

    /// Whether the migration still holds its disks.
    fn active(self) -> bool {
        !matches!(
            self,
            Phase::Failed | Phase::RolledBack | Phase::Cancelled | Phase::Committed
        )
    }
}

/// The engine object a migration is in; `Busy` while a blocking call owns it.
enum Engine {
    Running(Migration),
    Handoff(Handoff),
    Busy,
    Done,
}

struct Job {
    id: String,
    disks: Vec<usize>,
    target: SocketAddr,
    mode: LiveMode,
    phase: Phase,
    engine: Engine,
    progress: ProgressHandle,
    started: Instant,
    /// (time, bytes done) at the previous rate sample.
    last_sample: (Instant, u64),
    transfer_rate: f64,
    throttle_bytes_per_s: u64,
    mirroring: bool,
    predicted_final_sync: Option<Duration>,
    downtime: Option<Duration>,
    verified: Option<bool>,
    error: Option<String>,
}

/// The daemon's migrations and event bus.
pub(crate) struct Jobs {
    disks: Vec<Disk>,
    limits: Limits,
    jobs: Mutex<BTreeMap<String, Job>>,
    events: broadcast::Sender<String>,
    next_id: std::sync::atomic::AtomicU64,
    errors_total: std::sync::atomic::AtomicU64,
}

type CtlResult = Result<Value, CtlError>;

impl Jobs {
    pub(crate) fn new(disks: Vec<Disk>, limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            disks,
            limits,
            jobs: Mutex::new(BTreeMap::new()),
            events: broadcast::channel(1024).0,
            next_id: std::sync::atomic::AtomicU64::new(1),
            errors_total: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Event lines, for a control connection.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<String> {
        self.events.subscribe()
    }

    fn emit(&self, name: &str, data: Value) {
        tracing::info!(event = name, %data, "migration event");
        let _ = self.events.send(event(name, data));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Job>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs one control command.
    pub(crate) async fn execute(
        self: &Arc<Self>,
        command: &str,
        arguments: &serde_json::Map<String, Value>,
    ) -> CtlResult {
        match command {
            "query-status" => {
                Args::new(arguments, &[])?;
                Ok(self.status())
            }
            "migrate" => self.migrate(arguments),
            "switchover" => self.switchover(arguments).await,
            "commit" => {
                let args = Args::new(arguments, &["migration"])?;
                self.commit(args.string("migration")?).await
            }
            "rollback" | "cancel" => {
                let args = Args::new(arguments, &["migration", "force"])?;
                let force = args.parse::<bool>("force")?.unwrap_or(false);
                self.abandon(args.string("migration")?, command == "cancel", force)
                    .await
            }
            "set-bandwidth" => {
                let args = Args::new(arguments, &["bytes-per-second"])?;
                let rate: u64 = args
                    .parse("bytes-per-second")?
                    .ok_or_else(|| CtlError::param("missing argument \"bytes-per-second\""))?;
                self.limits.bandwidth.set_rate(rate);
                Ok(json!({}))
            }
            other => Err(CtlError::new(
                ErrorClass::CommandNotFound,
                format!(
                    "unknown command {other:?}; commands: query-status, migrate, switchover, \
                     commit, rollback, cancel, set-bandwidth"
                ),
            )),
        }
    }

    fn migrate(self: &Arc<Self>, arguments: &serde_json::Map<String, Value>) -> CtlResult {
        let args = Args::new(
            arguments,
            &[
                "target",
                "peer",
                "identity",
                "mode",
                "max-downtime-ms",
                "rate-limit",
                "compress",
                "verify",
                "disks",
                "migration",
                "idle-timeout-ms",
                "reconnect-window-ms",
                "congestion",
            ],
        )?;
        let target: SocketAddr = args.parse("target")?.ok_or_else(|| {
            CtlError::param("missing argument \"target\" (HOST:PORT of tern serve)")
        })?;
        let peer: Fingerprint = args.parse("peer")?.ok_or_else(|| {
            CtlError::param("missing argument \"peer\" (the target's fingerprint)")
        })?;
        let identity_dir = match args.string("identity")? {
            Some(dir) => PathBuf::from(dir),
            None => self.limits.identity.clone().ok_or_else(|| {
                CtlError::param("missing argument \"identity\" and the daemon has no --identity")
            })?,
        };
        let identity = Identity::load(&identity_dir)
            .map_err(|e| CtlError::param(format!("identity {}: {e}", identity_dir.display())))?;
        let mut config = MigrationConfig::new(target, identity, peer);
        if let Some(mode) = args.parse::<LiveMode>("mode")? {
            config.mode = mode;
        }
        if let Some(ms) = args.parse::<u64>("max-downtime-ms")? {
            config.max_downtime = Duration::from_millis(ms);
        }
        // A number (bytes per second) or a string with a unit ("200M").
        let rate = match arguments.get("rate-limit") {
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => args.string("rate-limit")?,
        };
        if let Some(rate) = rate {
            let bytes = crate::size::parse_size(&rate)
                .map_err(|e| CtlError::param(format!("rate-limit: {e}")))?;
            config.rate_limit_bytes_per_s = Some(bytes);
        }
        if let Some(compression) = args.parse::<CompressionMode>("compress")? {
            config.compression = compression;
        }
        if let Some(verify) = args.parse::<VerifyMode>("verify")? {
            config.verify = verify;
        }
        if let Some(ms) = args.parse::<u64>("idle-timeout-ms")? {
            config.tuning.idle_timeout = Duration::from_millis(ms.max(100));
        }
        if let Some(congestion) = args.parse::<tern_transport::Congestion>("congestion")? {
            config.tuning.congestion = congestion;
        }
        if let Some(ms) = args.parse::<u64>("reconnect-window-ms")? {
            config.reconnect_window = (ms > 0).then(|| Duration::from_millis(ms));
        }
        config.shared_rate_limit = Some(self.limits.bandwidth.clone());

        let mut jobs = self.lock();
        let busy: Vec<usize> = jobs
            .values()
            .filter(|j| j.phase.active())
            .flat_map(|j| j.disks.iter().copied())
            .collect();
        let running = jobs.values().filter(|j| j.phase.active()).count();
        if running >= self.limits.max_migrations {
            return Err(CtlError::state(format!(
                "{running} migrations are running, the limit is {} (--max-migrations)",
                self.limits.max_migrations
            )));
        }
        let disks: Vec<usize> = match args.strings("disks")? {
            Some(names) => names
                .iter()
                .map(|name| {
                    self.disks
                        .iter()
                        .position(|d| &d.name == name)
                        .ok_or_else(|| CtlError::param(format!("no disk named {name:?}")))
                })
                .collect::<Result<_, _>>()?,
            None => (0..self.disks.len())
                .filter(|i| !busy.contains(i))
                .collect(),
        };
        if disks.is_empty() {
            return Err(CtlError::state("every disk is already being migrated"));
        }
        if let Some(i) = disks.iter().find(|i| busy.contains(i)) {
            return Err(CtlError::state(format!(
                "disk {:?} is already being migrated",
                self.disks[*i].name
            )));
        }
        if let Some(i) = disks
            .iter()
            .find(|i| matches!(self.disks[**i].export.access(), Access::Refused { .. }))
        {
            return Err(CtlError::state(format!(
                "disk {:?} was already migrated away (committed)",
                self.disks[*i].name
            )));
        }
        let id = match args.string("migration")? {
            Some(id) if jobs.get(&id).is_some_and(|j| j.phase.active()) => {
                return Err(CtlError::state(format!("migration {id:?} is running")));
            }
            Some(id) => id,
            None => format!(
                "m{}",
                self.next_id
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ),
        };
        config.identities = disks.iter().map(|i| self.disks[*i].name.clone()).collect();
        // A daemon restarted after a crash resumes the session its predecessor recorded.
        let paths: Vec<PathBuf> = disks.iter().map(|i| self.disks[*i].path.clone()).collect();
        let (session_id, restarted) =
            crate::session::begin(&paths, &target.to_string(), &peer.to_string())
                .map_err(|e| CtlError::new(ErrorClass::GenericError, format!("{e:#}")))?;
        config.session_id = Some(session_id);
        config.restarted = restarted;
        let mode = config.mode;
        let tracked = disks
            .iter()
            .map(|i| self.disks[*i].tracked.clone())
            .collect();
        let mut migration = Migration::start(tracked, config)
            .map_err(|e| CtlError::new(ErrorClass::MigrationFailed, e.to_string()))?;
        let events = migration.take_events();
        let progress = migration.progress_handle();
        let now = Instant::now();
        jobs.insert(
            id.clone(),
            Job {
                id: id.clone(),
                disks: disks.clone(),
                target,
                mode,
                phase: Phase::Migrating,
                engine: Engine::Running(migration),
                progress,
                started: now,
                last_sample: (now, 0),
                transfer_rate: 0.0,
                throttle_bytes_per_s: 0,
                mirroring: false,
                predicted_final_sync: None,
                downtime: None,
                verified: None,
                error: None,
            },
        );
        drop(jobs);
        let names: Vec<&str> = disks.iter().map(|i| self.disks[*i].name.as_str()).collect();
        self.emit(
            "started",
            json!({ "migration": id, "target": target.to_string(), "disks": names }),
        );
        let pump = self.clone();
        let pump_id = id.clone();
        std::thread::Builder::new()
            .name("tern-events".into())
            .spawn(move || {
                for engine_event in events {
                    pump.on_engine_event(&pump_id, engine_event);
                }
            })
            .map_err(|e| CtlError::new(ErrorClass::GenericError, format!("spawn: {e}")))?;
        Ok(json!({ "migration": id }))
    }

    fn on_engine_event(&self, id: &str, engine_event: SourceEvent) {
        let mut jobs = self.lock();
        let Some(job) = jobs.get_mut(id) else { return };
        let (name, data) = match engine_event {
            SourceEvent::Connected => ("connected", json!({})),
            SourceEvent::BulkDone => ("bulk-done", json!({})),
            SourceEvent::Converged {
                dirty_bytes,
                predicted_final_sync,
                transfer_rate,
            } => {
                if job.phase == Phase::Migrating {
                    job.phase = Phase::Converged;
                }
                job.predicted_final_sync = Some(predicted_final_sync);
                (
                    "converged",
                    json!({
                        "dirty-bytes": dirty_bytes,
                        "predicted-final-sync-ms": predicted_final_sync.as_secs_f64() * 1e3,
                        "transfer-rate": transfer_rate,
                    }),
                )
            }
            SourceEvent::NotConverging {
                dirty_bytes,
                dirty_rate,
                transfer_rate,
            } => (
                "not-converging",
                json!({ "dirty-bytes": dirty_bytes, "dirty-rate": dirty_rate, "transfer-rate": transfer_rate }),
            ),
            SourceEvent::ModeChanged {
                mirroring,
                throttle_bytes_per_s,
                reason,
                dirty_bytes,
                dirty_rate,
                transfer_rate,
            } => {
                job.throttle_bytes_per_s = throttle_bytes_per_s;
                job.mirroring = mirroring;
                (
                    "mode-changed",
                    json!({
                        "mirroring": mirroring,
                        "throttle-bytes-per-second": throttle_bytes_per_s,
                        "reason": reason,
                        "dirty-bytes": dirty_bytes,
                        "dirty-rate": dirty_rate,
                        "transfer-rate": transfer_rate,
                    }),
                )
            }
            // The engine passes events on only after the switchover's outcome (the VM is
            // paused meanwhile): the switchover command reports the flush, before its
            // outcome, so clients see the two in order.
            SourceEvent::Flushed => return,
            SourceEvent::LinkDown { message } => ("link-down", json!({ "error": message })),
            SourceEvent::Resumed {
                from_start,
                bytes_requeued,
            } => (
                "resumed",
                json!({ "from-start": from_start, "bytes-requeued": bytes_requeued }),
            ),
            // Reported by the switchover command, with its downtime.
            SourceEvent::SwitchedOver { .. } => return,
            SourceEvent::Completed(_) => return, // reported by commit
            // A rollback or cancel ends the engine with these; the command reports it.
            SourceEvent::Failed(MigrationError::RolledBack | MigrationError::Cancelled) => return,
            SourceEvent::Failed(error) => {
                drop(jobs);
                self.mark_failed(id, error.to_string());
                return;
            }
        };
        let mut data = data;
        data["migration"] = json!(job.id);
        drop(jobs);
        self.emit(name, data);
    }

    /// The image paths of disks (by index).
    fn paths_of(&self, disks: &[usize]) -> Vec<PathBuf> {
        disks.iter().map(|i| self.disks[*i].path.clone()).collect()
    }

    /// Moves an active migration to `failed` and reports it, once.
    fn mark_failed(&self, id: &str, error: String) {
        {
            let mut jobs = self.lock();
            let Some(job) = jobs.get_mut(id) else { return };
            if !job.phase.active() || job.phase == Phase::CommitInDoubt {
                return; // already ended, or in doubt (reported by commit)
            }
            if job.phase == Phase::SwitchedOver {
                // Failed after the handoff, before commit: the source stays authoritative
                // and the held IO goes on against it.
                for export in self.exports_of(&job.disks) {
                    export.release();
                }
            }
            job.phase = Phase::Failed;
            job.error = Some(error.clone());
        }
        self.errors_total
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.emit(
            "failed",
            json!({ "migration": id, "error": error, "source-authoritative": true }),
        );
    }

    /// Picks the migration a command is about: the named one, or the only active one.
    fn pick(jobs: &BTreeMap<String, Job>, id: Option<String>) -> Result<String, CtlError> {
        match id {
            Some(id) if jobs.contains_key(&id) => Ok(id),
            Some(id) => Err(CtlError::param(format!("no migration named {id:?}"))),
            None => {
                let active: Vec<&String> = jobs
                    .iter()
                    .filter(|(_, j)| j.phase.active())
                    .map(|(k, _)| k)
                    .collect();
                match active.as_slice() {
                    [one] => Ok((*one).clone()),
                    [] => Err(CtlError::state("no migration is running")),
                    _ => Err(CtlError::param(
                        "several migrations are running: name one with \"migration\"",
                    )),
                }
            }
        }
    }

    fn exports_of(&self, disks: &[usize]) -> Vec<Arc<Export>> {
        disks
            .iter()
            .map(|i| self.disks[*i].export.clone())
            .collect()
    }

    async fn switchover(self: &Arc<Self>, arguments: &serde_json::Map<String, Value>) -> CtlResult {
        let args = Args::new(arguments, &["migration", "commit", "timeout-ms"])?;
        let commit = args.parse::<bool>("commit")?.unwrap_or(false);
        let timeout = args.parse::<u64>("timeout-ms")?.map(Duration::from_millis);
        let (id, migration, exports) = {
            let mut jobs = self.lock();
            let id = Self::pick(&jobs, args.string("migration")?)?;
            let job = jobs.get_mut(&id).expect("picked");
            if !matches!(job.phase, Phase::Migrating | Phase::Converged) {
                return Err(CtlError::state(format!(
                    "migration {id} is {}",
                    job.phase.name()
                )));
            }
            let Engine::Running(migration) = std::mem::replace(&mut job.engine, Engine::Busy)
            else {
                return Err(CtlError::state(format!("migration {id} is busy")));
            };
            job.phase = Phase::SwitchingOver;
            (id, migration, self.exports_of(&job.disks))
        };
        let started = Instant::now();
        // Quiesce: new NBD requests wait, admitted ones complete (and are marked dirty).
        for export in &exports {
            export.hold().await;
        }
        let quiesced = started.elapsed();
        let mut task = tokio::spawn(migration.switchover_async());
        let joined = match timeout {
            None => task.await,
            Some(limit) => match tokio::time::timeout(limit, &mut task).await {
                Ok(joined) => joined,
                Err(_) => {
                    // A VM is paused meanwhile: give up rather than wait for the transport's
                    // idle timeout. Nothing was committed, so the source stays authoritative
                    // and its IO resumes; the engine's result is dropped when it comes (a
                    // handoff dropped uncommitted rolls back).
                    tokio::spawn(async move {
                        let _ = task.await;
                    });
                    for export in &exports {
                        export.release();
                    }
                    if let Some(job) = self.lock().get_mut(&id) {
                        job.engine = Engine::Done;
                    }
                    let desc = format!(
                        "switchover did not finish within {} ms; the source stays authoritative and IO resumed on it",
                        limit.as_millis()
                    );
                    self.mark_failed(&id, desc.clone());
                    return Err(CtlError::new(ErrorClass::MigrationFailed, desc));
                }
            },
        };
        let result = joined.map_err(|e| {
            CtlError::new(ErrorClass::GenericError, format!("switchover task: {e}"))
        })?;
        let downtime = started.elapsed();
        match result {
            Ok(handoff) => {
                let verified = handoff.verified;
                {
                    let mut jobs = self.lock();
                    let job = jobs.get_mut(&id).expect("jobs are never removed");
                    job.engine = Engine::Handoff(handoff);
                    job.phase = Phase::SwitchedOver;
                    job.downtime = Some(downtime);
                    job.verified = Some(verified);
                }
                let data = json!({
                    "migration": id,
                    "downtime-ms": downtime.as_secs_f64() * 1e3,
                    "quiesce-ms": quiesced.as_secs_f64() * 1e3,
                    "verified": verified,
                });
                // A verified handoff implies the target flushed (see `on_engine_event`).
                self.emit("target-flushed", json!({ "migration": id }));
                self.emit("switched-over", data.clone());
                if commit {
                    return self.commit(Some(id)).await;
                }
                Ok(data)
            }
            Err(error) => {
                for export in &exports {
                    export.release();
                }
                if let Some(job) = self.lock().get_mut(&id) {
                    job.engine = Engine::Done;
                }
                self.mark_failed(&id, error.to_string());
                Err(CtlError::new(
                    ErrorClass::MigrationFailed,
                    format!(
                        "switchover failed, the source stays authoritative and IO resumed on it: {error}"
                    ),
                ))
            }
        }
    }

    async fn commit(self: &Arc<Self>, id: Option<String>) -> CtlResult {
        let (id, handoff, exports, target) = {
            let mut jobs = self.lock();
            let id = Self::pick(&jobs, id)?;
            let job = jobs.get_mut(&id).expect("picked");
            if job.phase != Phase::SwitchedOver {
                return Err(CtlError::state(format!(
                    "migration {id} is {}; commit follows a successful switchover",
                    job.phase.name()
                )));
            }
            let Engine::Handoff(handoff) = std::mem::replace(&mut job.engine, Engine::Busy) else {
                return Err(CtlError::state(format!("migration {id} is busy")));
            };
            job.phase = Phase::Committing;
            (id, handoff, self.exports_of(&job.disks), job.target)
        };
        let result = tokio::task::spawn_blocking(move || handoff.commit())
            .await
            .map_err(|e| CtlError::new(ErrorClass::GenericError, format!("commit task: {e}")))?;
        let mut jobs = self.lock();
        let job = jobs.get_mut(&id).expect("jobs are never removed");
        job.engine = Engine::Done;
        match result {
            Ok(report) => {
                let message = format!(
                    "tern: this disk was migrated to {target} and is served there now; \
                     reconnect to the target's NBD export"
                );
                for export in &exports {
                    export.refuse(errno::ESHUTDOWN, message.clone());
                }
                job.phase = Phase::Committed;
                crate::session::end(&self.paths_of(&job.disks));
                let progress = &report.summary.progress;
                let data = json!({
                    "migration": id,
                    "verified": report.summary.verified,
                    "bytes-total": progress.bytes_total,
                    "bytes-data": progress.bytes_data,
                    "bytes-resent": progress.bytes_resent,
                    "bytes-wire": report.bytes_wire,
                    "passes": progress.passes,
                    "total-time-s": job.started.elapsed().as_secs_f64(),
                    "downtime-ms": job.downtime.map(|d| d.as_secs_f64() * 1e3),
                });
                drop(jobs);
                self.emit("completed", data.clone());
                Ok(data)
            }
            Err(error) => {
                // The commit was sent but not confirmed: the target may have committed (and
                // opened its export) or not. Resuming IO here could make two authoritative
                // copies, so the exports stay held until an operator checks the target — an
                // image without `IMAGE.tern-incomplete` there means it committed — and then
                // runs `rollback force=true` (target did not commit) or stops this daemon.
                job.phase = Phase::CommitInDoubt;
                job.error = Some(error.to_string());
                drop(jobs);
                self.errors_total
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let desc = format!(
                    "commit outcome unknown ({error}); the source exports stay held: check the \
                     target (no IMAGE.tern-incomplete = committed), then `rollback force=true` \
                     if it did not commit"
                );
                self.emit(
                    "failed",
                    json!({ "migration": id, "error": desc, "source-authoritative": null }),
                );
                let _ = exports;
                Err(CtlError::new(ErrorClass::MigrationFailed, desc))
            }
        }
    }

    /// `rollback` and `cancel`: abandon a migration before commit; the source stays
    /// authoritative and held IO resumes on it.
    async fn abandon(self: &Arc<Self>, id: Option<String>, cancel: bool, force: bool) -> CtlResult {
        let (id, engine, exports) = {
            let mut jobs = self.lock();
            let id = Self::pick(&jobs, id)?;
            let job = jobs.get_mut(&id).expect("picked");
            match job.phase {
                Phase::Migrating | Phase::Converged | Phase::SwitchedOver | Phase::Failed => {}
                Phase::CommitInDoubt if force => {}
                Phase::CommitInDoubt => {
                    return Err(CtlError::state(format!(
                        "migration {id}'s commit is in doubt: check the target, then use \
                         force=true if it did not commit"
                    )));
                }
                other => {
                    return Err(CtlError::state(format!(
                        "migration {id} is {}",
                        other.name()
                    )));
                }
            }
            let engine = std::mem::replace(&mut job.engine, Engine::Busy);
            (id, engine, self.exports_of(&job.disks))
        };
        let engine_result = tokio::task::spawn_blocking(move || match engine {
            Engine::Handoff(handoff) => handoff.rollback().map(|_| ()),
            // Dropping a running migration rolls it back and joins its thread.
            Engine::Running(migration) => {
                drop(migration);
                Ok(())
            }
            Engine::Busy | Engine::Done => Ok(()),
        })
        .await;
        // Whatever the engine said (a dead connection cannot roll back cleanly), nothing
        // was committed: the source is authoritative and its IO goes on.
        for export in &exports {
            export.release();
        }
        let note = match engine_result {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(e) => Some(format!("rollback task: {e}")),
        };
        let phase = if cancel {
            Phase::Cancelled
        } else {
            Phase::RolledBack
        };
        {
            let mut jobs = self.lock();
            let job = jobs.get_mut(&id).expect("jobs are never removed");
            job.engine = Engine::Done;
            if job.phase != Phase::Failed {
                job.phase = phase;
            }
            // Abandoned on purpose: a later migration starts afresh.
            crate::session::end(&self.paths_of(&job.disks));
        }
        self.emit(
            phase.name(),
            json!({ "migration": id, "source-authoritative": true, "note": note }),
        );
        Ok(json!({ "migration": id, "note": note }))
    }

    /// Samples rates and emits a `progress` event per active migration; called every second.
    pub(crate) fn tick(&self) {
        let mut lines = Vec::new();
        {
            let mut jobs = self.lock();
            let now = Instant::now();
            for job in jobs.values_mut() {
                if !matches!(job.phase, Phase::Migrating | Phase::Converged) {
                    continue;
                }
                let progress = job.progress.get();
                let (then, before) = job.last_sample;
                let seconds = now.duration_since(then).as_secs_f64();
                if seconds > 0.0 {
                    let rate = progress.bytes_done.saturating_sub(before) as f64 / seconds;
                    // Smooth a little; the first sample takes the rate as it is.
                    job.transfer_rate = if job.transfer_rate == 0.0 {
                        rate
                    } else {
                        0.5 * job.transfer_rate + 0.5 * rate
                    };
                }
                job.last_sample = (now, progress.bytes_done);
                lines.push(job_status(job, &self.disks));
            }
        }
        for data in lines {
            let _ = self.events.send(event("progress", data));
        }
    }

    /// The `query-status` reply.
    pub(crate) fn status(&self) -> Value {
        let jobs = self.lock();
        let disks: Vec<Value> = self
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let migration = jobs
                    .values()
                    .find(|j| j.phase.active() && j.disks.contains(&i))
                    .map(|j| j.id.clone());
                json!({
                    "name": d.name,
                    "size": d.tracked.size(),
                    "access": access_name(&d.export.access()),
                    "in-flight": d.export.in_flight(),
                    "held-requests": d.export.waiting(),
                    "dirty-bytes": d.tracked.bitmap().dirty_bytes(),
                    "migration": migration,
                })
            })
            .collect();
        let migrations: Vec<Value> = jobs.values().map(|j| job_status(j, &self.disks)).collect();
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "disks": disks,
            "migrations": migrations,
            "errors-total": self.errors_total.load(std::sync::atomic::Ordering::Relaxed),
            "bandwidth-limit": self.limits.bandwidth.rate(),
            "max-migrations": self.limits.max_migrations,
        })
    }

    /// Cancels every active migration (daemon shutdown): the sources stay authoritative.
    pub(crate) async fn cancel_all(self: &Arc<Self>) {
        let ids: Vec<String> = self
            .lock()
            .iter()
            .filter(|(_, j)| j.phase.active())
            .map(|(k, _)| k.clone())
            .collect();
        for id in ids {
            if let Err(e) = self.abandon(Some(id.clone()), true, false).await {
                tracing::warn!(migration = %id, error = %e.desc, "cancel at shutdown");
            }
        }
    }
}

fn access_name(access: &Access) -> &'static str {
    match access {
        Access::Open => "open",
        Access::Held => "held",
        Access::Refused { .. } => "refused",
    }
}

fn job_status(job: &Job, disks: &[Disk]) -> Value {
    let progress = job.progress.get();
    let remaining = progress.bytes_total.saturating_sub(progress.bytes_done) + progress.dirty_bytes;
    let eta = (job.transfer_rate > 0.0).then(|| remaining as f64 / job.transfer_rate);
    json!({
        "migration": job.id,
        "phase": job.phase.name(),
        "engine-phase": progress.phase,
        "mode": match job.mode {
            LiveMode::Auto => "auto",
            LiveMode::Background => "background",
            LiveMode::Active => "active",
        },
        "mirroring": job.mirroring,
        "target": job.target.to_string(),
        "disks": job.disks.iter().map(|i| disks[*i].name.clone()).collect::<Vec<_>>(),
        "bytes-total": progress.bytes_total,
        "bytes-done": progress.bytes_done,
        "bytes-data": progress.bytes_data,
        "bytes-zero": progress.bytes_zero,
        "bytes-resent": progress.bytes_resent,
        "dirty-bytes": progress.dirty_bytes,
        "passes": progress.passes,
        "transfer-rate": job.transfer_rate,
        "eta-s": eta,
        "throttle-bytes-per-second": job.throttle_bytes_per_s,
        "predicted-final-sync-ms": job.predicted_final_sync.map(|d| d.as_secs_f64() * 1e3),
        "downtime-ms": job.downtime.map(|d| d.as_secs_f64() * 1e3),
        "verified": job.verified,
        "error": job.error,
        "elapsed-s": job.started.elapsed().as_secs_f64(),
    })
}
