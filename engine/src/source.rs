//! The source side of a migration as a sans-IO state machine.
//!
//! [`SourceMigration`] decides what to read, what to send and when the copy is done; it does
//! no IO, spawns nothing and never reads a clock. A driver (see `driver::source`) feeds it
//! inputs and performs its outputs, in this order, until [`SourceMigration::poll_event`]
//! yields [`SourceEvent::Completed`] or [`SourceEvent::Failed`]:
//!
//! 1. `poll_transmit` until `None` — send each [`Transmit`] (control frames on the control
//!    stream, data and zero frames on the data stream they name, in the order given);
//! 2. `poll_io` until `None` — submit each read;
//! 3. `poll_event` until `None`;
//! 4. wait for one input: `handle_read_done` / `handle_read_failed` for a read, or
//!    `handle_control` for a message from the target; then go to 1.
//!
//! Phases: `Handshake` (Hello sent) → `Bulk` (every chunk read and sent once) → `Flush`
//! (a barrier makes everything durable on the target) → `Verify` (digests compared) →
//! `Complete` → `Done`; any failure goes to `Failed`.
//!
//! Invariants (checked with `assert!`):
//! - copy reads in flight ≤ `reads_in_flight_max`, mirror reads in flight ≤
//!   `mirror_reads_in_flight_max`,
//!   and queued transmit bytes stay near `transmit_queue_bytes_max` (I6);
//! - every chunk of every disk is sent exactly once in the bulk pass, as data or as zeros;
//! - generations are strictly increasing across all frames (I3 relies on it at the target).

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tern_transport::control::{FEATURES_REQUIRED, FEATURES_SUPPORTED};
use tern_transport::{
    Compression, Control, DiskInfo, EncodedFrame, Encoder, ErrorCode, Hello, PROTOCOL_VERSION,
    encode_zero,
};

use crate::digest::{ReadBlock, summary, zero_digest};

/// Checkpoint barriers a resumable source keeps in flight at once.
const CHECKPOINTS_IN_FLIGHT: usize = 4;

/// A live pass is hopeless when the guest dirtied data at this fraction of the rate the pass
/// sent it, or faster (and much more is dirty than the downtime budget allows).
const HOPELESS_DIRTY_RATIO: f64 = 0.9;

/// `Auto`, during the bulk pass: how often the driver counts the bytes the guest dirtied
/// (see [`SourceMigration::wants_dirty_count`]).
const DIRTY_COUNT_INTERVAL: Duration = Duration::from_millis(250);
/// `Auto`, during the bulk pass: no verdict before the pass sent this much (or an eighth of
/// the disks, if less) and ran [`LiveConfig::bulk_verdict_after`]: the first frames go out
/// before the link's rate is known.
const DIRTY_COUNT_MIN_BYTES: u64 = 64 << 20;

/// Bytes per bulk read (the "block" of the bulk cursor): large reads keep the disk streaming,
/// and a block is split into frames per run of zero and non-zero chunks.
pub const BULK_READ_BYTES: u32 = 1 << 20;
use crate::error::MigrationError;

/// Tunables of the source.
#[derive(Clone, Debug)]
pub struct SourceConfig {
    /// Bytes per chunk: the unit of chunk indexes on the wire (power of two, 4 KiB–1 MiB).
    pub chunk_bytes: u32,
    /// Unidirectional data streams.
    pub data_streams: u16,
    /// Copy reads (bulk pass, dirty re-sends) submitted but not completed, at most. Few
    /// and large: the transmit queue, not the disk queue, is what keeps the link busy, and
    /// every read in flight is one more request ahead of the guest's own IO (and, where both
    /// ends share a disk, of the target's writes). Measured with a 2 GiB loopback copy on a
    /// virtual disk both ends share: with 4 KiB-page buffers, 16 reads of 1 MiB in flight
    /// took a median 8.31 s (7.19–8.84, 5 interleaved rounds), 8 took 7.72 s, 4 took 7.28 s
    /// (7.06–7.54); with huge-page buffers 16 took 4.60 s and 4 took 4.28 s (4 pairs).
    pub reads_in_flight_max: usize,
    /// Mirror reads (of guest writes a guest waits for) submitted but not completed, at most:
    /// a window of their own, as deep as a guest's queue, so a mirrored write never waits
    /// for another's read to finish.
    pub mirror_reads_in_flight_max: usize,
    /// Bytes waiting in the transmit queue above which no new read is submitted.
    pub transmit_queue_bytes_max: usize,
    /// How the copy is verified after the final flush.
    pub verify: VerifyMode,
    /// Random id of this migration.
    pub session_id: [u8; 16],
    /// Live migration: after the bulk pass, re-send what the guest dirtied until switchover.
    /// `None` copies a disk that nobody writes.
    pub live: Option<LiveConfig>,
    /// The driver can reconnect: a lost link during the copy or a live pass is survived
    /// (see [`SourceMigration::handle_transport_failed`]) instead of failing the migration.
    pub resumable: bool,
    /// This source process restarted and continues session `session_id` (the operator ran
    /// the migration again after a crash): the target may hold any part of the copy. The
    /// machine reads its disks locally, compares each chunk's digest with the target's, and
    /// sends only the chunks that differ — or everything, if the target lost the session.
    pub restarted: bool,
    /// Resumable migrations: at most this many data bytes handed out and not yet confirmed
    /// durable (the bulk pass and the live passes wait above it), so what a lost link costs
    /// is bounded whatever the load on the target: this plus the transmit queue and the reads
    /// in flight.
    pub unconfirmed_bytes_max: u64,
    /// Resumable migrations: a checkpoint barrier after this many bytes handed out, so
    /// the frames the target has not confirmed durable — resent after a lost link — stay
    /// about this many plus what is in flight.
    pub checkpoint_bytes: u64,
}

/// Settings of a live migration.
#[derive(Clone, Debug)]
pub struct LiveConfig {
    /// Storage downtime budget: converged once the predicted final sync fits in it.
    pub max_downtime: Duration,
    /// How long to wait before harvesting again after a harvest found nothing dirty.
    pub harvest_interval: Duration,
    /// Harvests in a row whose dirty set does not shrink before `NotConverging` is reported
    /// (`Background`) or the mode escalates (`Auto`).
    pub stalled_harvests_max: u32,
    /// What to do when the dirty set stops shrinking.
    pub mode: LiveMode,
    /// `Auto`: how long the bulk pass runs before the machine judges whether the guest
    /// dirties data as fast as it is copied (and mirrors its writes at once).
    pub bulk_verdict_after: Duration,
}

/// How a live migration reacts to a guest that dirties data as fast as it can be sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LiveMode {
    /// Only re-send passes; report `NotConverging` with the numbers and keep going.
    Background,
    /// Escalate: first mirror guest writes synchronously (active mode), then, if the dirty
    /// set still does not shrink, throttle the guest's writes to a quarter of the measured
    /// transfer rate, halving the limit each time it stalls again. Every change is a
    /// `ModeChanged` event.
    Auto,
    /// Mirror every guest write from the start: a write completes only once it is also on
    /// the target (see [`SourceMigration::handle_mirror`]); re-send passes cover the rest.
    Active,
}

impl std::str::FromStr for LiveMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "background" => Ok(Self::Background),
            "auto" => Ok(Self::Auto),
            "active" => Ok(Self::Active),
            other => Err(format!(
                "mode must be auto, active or background, not {other:?}"
            )),
        }
    }
}

impl Default for LiveConfig {
    fn default() -> Self {
        Self {
            max_downtime: Duration::from_millis(50),
            harvest_interval: Duration::from_millis(5),
            stalled_harvests_max: 2,
            mode: LiveMode::Auto,
            bulk_verdict_after: Duration::from_millis(200),
        }
    }
}

impl Default for SourceConfig {
    fn default() -> Self {
        Self {
            chunk_bytes: 64 << 10,
            data_streams: 4,
            reads_in_flight_max: 4,
            mirror_reads_in_flight_max: 16,
            transmit_queue_bytes_max: 16 << 20,
            verify: VerifyMode::Written,
            session_id: [0; 16],
            live: None,
            resumable: false,
            restarted: false,
            checkpoint_bytes: 16 << 20,
            unconfirmed_bytes_max: 64 << 20,
        }
    }
}

/// How the two sides check the copy. Either way both sides compare one xxh3-128 digest per
/// chunk of the whole disk; they differ in where the target's digests come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VerifyMode {
    /// No comparison (`verified` is false).
    Off,
    /// The target digests each chunk from the exact buffer it handed to the disk, at the time
    /// it issued the write; the comparison then costs no IO. It proves that every chunk the
    /// target wrote last is the source's (network, codec, ordering of generations), and relies
    /// on the disk's acknowledgement and fdatasync for what reached the medium.
    Written,
    /// The target reads its whole image back after the final flush and digests what it reads:
    /// the disk is checked too, at the cost of reading every allocated byte again.
    ReadBack,
}

impl std::fmt::Display for VerifyMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Off => "off",
            Self::Written => "written",
            Self::ReadBack => "read-back",
        })
    }
}

impl std::str::FromStr for VerifyMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "off" => Ok(Self::Off),
            "written" => Ok(Self::Written),
            "read-back" => Ok(Self::ReadBack),
            other => Err(format!(
                "verify must be written, read-back or off, not {other:?}"
            )),
        }
    }
}

/// What the source knows about one disk at the start.
#[derive(Clone, Debug)]
pub struct SourceDisk {
    /// Size in bytes.
    pub size: u64,
    /// Identity sent to the target (image name or path).
    pub identity: String,
    /// Byte ranges that may hold data (SEEK_DATA/SEEK_HOLE); the rest reads as zeros and is
    /// sent as zero-range frames without being read. Sorted, non-overlapping.
    pub allocated: Vec<Range<u64>>,
}

/// A read the driver must perform.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadRequest {
    /// Echoed back in `handle_read_done`.
    pub token: u64,
    /// Disk index.
    pub disk: u32,
    /// Byte offset.
    pub offset: u64,
    /// Byte length (never past the disk's end).
    pub len: u32,
    /// A read of the bulk pass: the first of these bytes, likely not in any cache. Re-reads
    /// of dirty chunks and mirror reads are not: those bytes were just written.
    pub bulk: bool,
}

/// Something to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transmit {
    /// A control message on the control stream.
    Control(Control),
    /// Disk bytes on data stream `stream`.
    Data {
        /// Data stream index.
        stream: u16,
        /// Disk index.
        disk: u32,
        /// First chunk.
        chunk: u64,
        /// Chunks covered.
        chunk_count: u32,
        /// Send sequence (I3).
        generation: u64,
        /// The bytes (`chunk_count` chunks, clipped to the disk's end).
        data: Bytes,
        /// CRC32 of `data`, computed where it was read ([`ReadBlock`]).
        crc32: u32,
    },
    /// A zero range on data stream `stream`.
    Zero {
        /// Data stream index.
        stream: u16,
        /// Disk index.
        disk: u32,
        /// First chunk.
        chunk: u64,
        /// Chunks covered.
        chunk_count: u32,
        /// Send sequence (I3).
        generation: u64,
    },
}

impl Transmit {
    /// The data stream a frame goes on; `None` for a control message.
    pub fn stream(&self) -> Option<u16> {
        match self {
            Transmit::Control(_) => None,
            Transmit::Data { stream, .. } | Transmit::Zero { stream, .. } => Some(*stream),
        }
    }

    /// Disk bytes the frame carries (0 for zero ranges and control messages).
    pub fn data_bytes(&self) -> usize {
        match self {
            Transmit::Data { data, .. } => data.len(),
            _ => 0,
        }
    }

    fn queued_bytes(&self) -> usize {
        self.data_bytes()
    }

    /// The frame of a data or zero-range transmit, a data payload compressed with
    /// `compression` where that saves enough; `None` for a control message (those go on the
    /// control stream, encoded with [`Control::encode`]).
    pub fn encode(self, encoder: &mut Encoder, compression: Compression) -> Option<EncodedFrame> {
        match self {
            Transmit::Control(_) => None,
            Transmit::Data {
                disk,
                chunk,
                chunk_count,
                generation,
                data,
                crc32,
                ..
            } => Some(encoder.data(
                disk,
                chunk,
                chunk_count,
                generation,
                data,
                crc32,
                compression,
            )),
            Transmit::Zero {
                disk,
                chunk,
                chunk_count,
                generation,
                ..
            } => Some(encode_zero(disk, chunk, chunk_count, generation)),
        }
    }
}

/// Counters of the copy so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceProgress {
    /// Total bytes of all disks.
    pub bytes_total: u64,
    /// Bytes covered by frames handed to the driver (data and zero ranges).
    pub bytes_done: u64,
    /// Bytes sent as data (before compression).
    pub bytes_data: u64,
    /// Bytes sent as zero ranges (never travel).
    pub bytes_zero: u64,
    /// Bytes read from disk.
    pub bytes_read: u64,
    /// Bytes re-sent by live passes because the guest wrote them again.
    pub bytes_resent: u64,
    /// Dirty bytes at the last harvest (live).
    pub dirty_bytes: u64,
    /// Harvests so far (live).
    pub passes: u64,
    /// Times the link was lost and the migration resumed on a new connection.
    pub reconnects: u64,
    /// Bytes queued again after lost links because the target had not confirmed them
    /// durable (a restart from zero counts the whole disk).
    pub bytes_requeued: u64,
    /// Digest summaries that differed from the target's, so that the per-chunk digests were
    /// fetched to find the differing chunks (0 unless the target's bytes differ).
    pub summary_mismatches: u64,
    /// Name of the current phase.
    pub phase: &'static str,
}

/// The outcome of a finished migration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceSummary {
    /// Counters at the end.
    pub progress: SourceProgress,
    /// True when every digest block of every disk matched.
    pub verified: bool,
}

/// What the state machine reports.
#[derive(Clone, Debug, PartialEq)]
pub enum SourceEvent {
    /// The target accepted the handshake.
    Connected,
    /// The bulk pass has handed every frame to the driver.
    BulkDone,
    /// Live: the remaining dirty data is predicted to sync within the downtime budget.
    Converged {
        /// Dirty bytes at the last harvest.
        dirty_bytes: u64,
        /// Predicted duration of the final sync.
        predicted_final_sync: Duration,
        /// Measured transfer rate, bytes per second.
        transfer_rate: f64,
    },
    /// Live: the dirty set has stopped shrinking; without a change of mode the migration
    /// will not converge.
    NotConverging {
        /// Dirty bytes at the last harvest.
        dirty_bytes: u64,
        /// Bytes the guest dirtied per second over the last pass.
        dirty_rate: f64,
        /// Bytes sent per second over the last pass.
        transfer_rate: f64,
    },
    /// Live, `Auto`: the engine changed how it treats guest writes.
    ModeChanged {
        /// Whether guest writes are now mirrored synchronously (active mode).
        mirroring: bool,
        /// Guest write limit now in force, bytes per second (0 = none).
        throttle_bytes_per_s: u64,
        /// Why, in words.
        reason: String,
        /// Dirty bytes at the harvest that decided.
        dirty_bytes: u64,
        /// Bytes the guest dirtied per second over the last pass.
        dirty_rate: f64,
        /// Bytes sent per second over the last pass.
        transfer_rate: f64,
    },
    /// The link was lost; the machine waits for `handle_reconnected` (or `give_up`).
    /// Guest writes keep being tracked meanwhile.
    LinkDown {
        /// What failed.
        message: String,
    },
    /// A new connection continues the session.
    Resumed {
        /// The target had lost the session: the copy started again from the beginning.
        from_start: bool,
        /// Bytes queued again because the target had not confirmed them durable.
        bytes_requeued: u64,
    },
    /// The target confirmed that everything is durable.
    Flushed,
    /// Live: the final pass is durable on the target and verified; the VM may resume on the
    /// target once the VMM commits. Until `commit`, the source stays authoritative.
    SwitchedOver {
        /// Whether digests were compared.
        verified: bool,
    },
    /// Finished: the target holds a verified copy.
    Completed(SourceSummary),
    /// Failed; the source is still authoritative. Send nothing more.
    Failed(MigrationError),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Handshake,
    Bulk,
    Iterating,
    FinalPass,
    Flush {
        barrier: u64,
    },
    Verify,
    HandedOff,
    Complete,
    Done,
    Failed,
    /// The link is lost; `resume_phase` says where to continue.
    Disconnected,
    /// A restarted source compares its digests with the target's (see
    /// [`SourceConfig::restarted`]).
    Diff,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Handshake => "handshake",
            Phase::Bulk => "bulk",
            Phase::Iterating => "iterating",
            Phase::FinalPass => "final-pass",
            Phase::Flush { .. } => "flush",
            Phase::Verify => "verify",
            Phase::HandedOff => "switched-over",
            Phase::Complete => "complete",
            Phase::Done => "done",
            Phase::Failed => "failed",
            Phase::Disconnected => "disconnected",
            Phase::Diff => "diff",
        }
    }
}

/// Measurements of the current live pass.
#[derive(Clone, Debug, Default)]
struct PassStats {
    /// When the pass started (the previous harvest).
    started: Option<Instant>,
    /// Bytes read and sent in this pass.
    bytes_sent: u64,
    /// Dirty bytes at the previous harvest.
    last_dirty_bytes: u64,
    /// The smallest dirty set of any harvest since the last escalation (0: none yet).
    best_dirty_bytes: u64,
    /// The final pass's harvest happened.
    final_harvested: bool,
}

/// Per-disk state: the bulk cursor and the per-chunk digests of what was sent.
#[derive(Debug)]
struct DiskState {
    size: u64,
    identity: String,
    allocated: Vec<Range<u64>>,
    /// Bytes in `allocated`.
    allocated_bytes: u64,
    /// Index into `allocated` of the first extent that may intersect `next_block`.
    extent: usize,
    /// Next digest block the bulk pass has not planned yet.
    next_block: u64,
    chunk_bytes: u64,
    /// Digest of each chunk as last sent; `None` until its read completed.
    digests: Vec<Option<u128>>,
    /// Generation of the read each digest came from: reads of one chunk may complete out of
    /// order (a mirror read racing a pass), and the newest generation is what the target
    /// keeps (I3), so only a newer read replaces a digest.
    digest_generations: Vec<u64>,
    /// Chunks whose target digest has arrived and matched.
    verified_chunks: u64,
    /// Bulk blocks not yet planned that received a mirrored write: the bulk pass must read
    /// them even if the extent map (taken at the start) calls them holes, or its zero range
    /// — newer than the mirror — would overwrite the write at the target.
    written_ahead: std::collections::BTreeSet<u64>,
    /// The summary of `digests`, computed ahead while the target flushes; any change to
    /// `digests` clears it.
    summary: Option<u128>,
}

impl DiskState {
    /// The summary of the digest table, as the target computes it for its own.
    fn digest_summary(&self) -> u128 {
        summary(
            self.digests
                .iter()
                .map(|d| d.expect("every chunk was digested in bulk")),
        )
    }

    fn blocks(&self) -> u64 {
        self.size.div_ceil(BULK_READ_BYTES as u64)
    }

    fn chunks(&self) -> u64 {
        self.size.div_ceil(self.chunk_bytes)
    }

    fn chunk_range(&self, chunk: u64) -> Range<u64> {
        let start = chunk * self.chunk_bytes;
        start..(start + self.chunk_bytes).min(self.size)
    }

    /// Records the digests of the chunks in `data`, which starts at byte `offset` and was
    /// read with `generation`.
    fn record_digests(&mut self, offset: u64, digests: &[u128], generation: u64) {
        debug_assert_eq!(offset % self.chunk_bytes, 0);
        self.summary = None;
        let first = offset / self.chunk_bytes;
        for (i, digest) in digests.iter().enumerate() {
            let index = first as usize + i;
            if self.digest_generations[index] <= generation {
                self.digest_generations[index] = generation;
                self.digests[index] = Some(*digest);
            }
        }
    }

    /// Records zero digests for the chunks of a byte range sent as zeros.
    fn record_zero_digests(&mut self, range: Range<u64>) {
        self.summary = None;
        let first = range.start / self.chunk_bytes;
        let end = range.end.div_ceil(self.chunk_bytes);
        for chunk in first..end {
            let r = self.chunk_range(chunk);
            self.digests[chunk as usize] = Some(zero_digest((r.end - r.start) as usize));
        }
    }

    fn block_range(&self, block: u64) -> Range<u64> {
        let start = block * BULK_READ_BYTES as u64;
        start..(start + BULK_READ_BYTES as u64).min(self.size)
    }

    fn block_allocated(&mut self, block: u64) -> bool {
        let range = self.block_range(block);
        while self.extent < self.allocated.len() && self.allocated[self.extent].end <= range.start {
            self.extent += 1;
        }
        self.allocated
            .get(self.extent)
            .is_some_and(|extent| extent.start < range.end)
    }

    /// The first block at or after `block` that holds allocated bytes.
    fn next_allocated_block(&mut self, block: u64) -> u64 {
        if self.block_allocated(block) {
            return block;
        }
        match self.allocated.get(self.extent) {
            Some(extent) => (extent.start / BULK_READ_BYTES as u64).max(block),
            None => self.blocks(),
        }
    }
}

/// The source of a migration. See the module documentation for the call order.
#[derive(Debug)]
pub struct SourceMigration {
    config: SourceConfig,
    phase: Phase,
    disks: Vec<DiskState>,
    /// Next generation to assign; starts at 1 so that 0 means "never written" at the target.
    next_generation: u64,
    next_token: u64,
    next_barrier: u64,
    /// Reads in flight: token → (disk, byte range, generation, read by the bulk pass). The
    /// generation is taken when the read is issued: a read issued later returns data at least
    /// as new, so issue order is the order the target must apply (I3), whatever order reads
    /// complete in.
    reads: HashMap<u64, (u32, Range<u64>, u64, bool)>,
    /// Reads issued before a restart from zero: their data is dropped (the new bulk pass
    /// reads it again).
    stale_reads: std::collections::HashSet<u64>,
    /// Reads in flight when the link was lost: their data is never sent with their old
    /// generation — a zero range resent on the new link has a newer one and would win over
    /// it at the target (I3) — so they are read again instead.
    reads_from_lost_link: std::collections::HashSet<u64>,
    /// Dirty byte ranges harvested but not yet read (live passes).
    dirty_queue: VecDeque<(u32, Range<u64>)>,
    /// A harvest is due at this time (live, nothing pending).
    harvest_at: Option<Instant>,
    /// `Auto`, bulk pass: the next count of dirty bytes is due at this time.
    dirty_count_at: Option<Instant>,
    /// Convergence measurements (live).
    pass: PassStats,
    converged: bool,
    stalled_harvests: u32,
    /// A harvest is wanted as soon as the driver can do one (no timer involved).
    harvest_now: bool,
    /// `Auto`: the guest write limit in force (0 = none).
    throttle_bytes_per_s: u64,
    /// Live: the barrier that ends the current pass, until the target confirms it.
    pass_barrier: Option<u64>,
    /// Index of the disk the bulk pass is planning.
    bulk_disk: usize,
    transmit: VecDeque<Transmit>,
    transmit_bytes: usize,
    /// Frames handed to the driver per data stream (barrier counts).
    frames_sent: Vec<u64>,
    io: VecDeque<ReadRequest>,
    events: VecDeque<SourceEvent>,
    progress: SourceProgress,
    /// The target understands mirror requests.
    mirror_supported: bool,
    /// The target answers digest summary requests only after the barriers before them.
    ordered_summary: bool,
    /// The summary requests went out behind the final barrier.
    summaries_requested: bool,
    /// Active mode is on: the driver routes guest writes to `handle_mirror`.
    mirroring: bool,
    /// Mirror reads not yet issued: (mirror token, disk, byte range), ahead of other reads.
    mirror_queue: VecDeque<(u64, u32, Range<u64>)>,
    /// Mirrors in progress: token → reads still to complete and the ranges sent so far; once
    /// every read is sent, the token waits here for the target's `MirrorAck`.
    mirrors: HashMap<u64, MirrorState>,
    /// Read token → mirror token, for reads issued on behalf of a mirror.
    mirror_reads: HashMap<u64, u64>,
    /// Finished mirrors for the driver: (token, reached the target).
    mirrored: VecDeque<(u64, bool)>,
    /// Switchover was asked for before the bulk pass ended.
    switchover_pending: bool,
    /// `BulkDone` was reported (a resumed offline copy passes the end of bulk again).
    bulk_done_reported: bool,
    /// Resumable: frames handed out on this connection that no answered barrier covers, in
    /// the order handed out; the front one is number `unconfirmed_base`. They are all the
    /// target may not hold durably — what a lost link makes the source send again.
    unconfirmed: VecDeque<Sent>,
    unconfirmed_base: u64,
    /// Data and zero frames handed out on this connection.
    handed_out: u64,
    /// Data bytes handed out on this connection.
    handed_out_bytes: u64,
    /// Data bytes handed out before the latest answered barrier: durable on the target.
    /// `handed_out_bytes - confirmed_bytes` is what is still on its way (in the driver's and
    /// the transport's buffers, on the link, or not yet flushed), and a switchover must wait
    /// for it as for the dirty data, so the convergence prediction counts it.
    confirmed_bytes: u64,
    /// Barriers handed out and not yet answered: (id, frames handed out before it, data
    /// bytes handed out before it).
    barrier_marks: VecDeque<(u64, u64, u64)>,
    /// Checkpoint barriers in flight (pipelined, at most `CHECKPOINTS_IN_FLIGHT`).
    checkpoints: VecDeque<u64>,
    /// Copy (not mirror) data bytes of the frames in `unconfirmed`.
    unconfirmed_bytes: u64,
    /// Bytes handed out since the last checkpoint.
    since_checkpoint: u64,
    /// Disconnected, or handshaking again after a lost link: the phase to continue in.
    resume_phase: Option<Phase>,
    /// Chunk runs to send again as zeros when the link is back: (disk, chunks).
    zeros_to_resend: Vec<(u32, Range<u64>)>,
    /// Bytes requeued since the link went down (reported by `Resumed`).
    requeued_now: u64,
    /// A restarted source: the bulk pass only digests the local disks (nothing is sent),
    /// then the target's digests decide what goes (phase `Diff`).
    diffing: bool,
    /// The target reported at the resume whether it kept its written digests.
    target_digests_kept: bool,
    /// The barrier that makes the target's current content durable before the comparison
    /// is trusted (what it wrote for an earlier process may not have been flushed yet).
    diff_barrier: Option<u64>,
}

/// A frame handed to the driver and not yet confirmed durable by the target.
#[derive(Debug)]
struct Sent {
    disk: u32,
    chunk: u64,
    chunk_count: u32,
    generation: u64,
    zero: bool,
    /// Data bytes counted against `unconfirmed_bytes_max` (0 for zero ranges and for
    /// mirrored writes, which the guest's queue bounds and which must never wait for the
    /// copy).
    bytes: u64,
}

impl Sent {
    fn of(transmit: &Transmit) -> Option<Self> {
        match *transmit {
            Transmit::Data {
                disk,
                chunk,
                chunk_count,
                generation,
                ref data,
                ..
            } => Some(Sent {
                disk,
                chunk,
                chunk_count,
                generation,
                zero: false,
                bytes: data.len() as u64,
            }),
            Transmit::Zero {
                disk,
                chunk,
                chunk_count,
                generation,
                ..
            } => Some(Sent {
                disk,
                chunk,
                chunk_count,
                generation,
                zero: true,
                bytes: 0,
            }),
            Transmit::Control(_) => None,
        }
    }
}

/// One mirrored guest write on its way to the target.
#[derive(Debug, Default)]
struct MirrorState {
    reads_left: usize,
    ranges: Vec<tern_transport::MirrorRange>,
}

impl SourceMigration {
    /// Starts a migration of `disks`: queues the handshake.
    pub fn new(config: SourceConfig, disks: Vec<SourceDisk>) -> Self {
        assert!(config.chunk_bytes.is_power_of_two());
        assert!((4096..=BULK_READ_BYTES).contains(&config.chunk_bytes));
        assert!(
            config.data_streams > 0
                && config.reads_in_flight_max > 0
                && config.mirror_reads_in_flight_max > 0
        );
        let bytes_total = disks.iter().map(|d| d.size).sum();
        let disks: Vec<DiskState> = disks
            .into_iter()
            .map(|disk| {
                debug_assert!(disk.allocated.windows(2).all(|w| w[0].end <= w[1].start));
                let chunks = disk.size.div_ceil(config.chunk_bytes as u64) as usize;
                DiskState {
                    size: disk.size,
                    identity: disk.identity,
                    allocated_bytes: disk.allocated.iter().map(|r| r.end - r.start).sum(),
                    allocated: disk.allocated,
                    extent: 0,
                    next_block: 0,
                    chunk_bytes: config.chunk_bytes as u64,
                    digests: vec![None; chunks],
                    summary: None,
                    digest_generations: vec![0; chunks],
                    verified_chunks: 0,
                    written_ahead: Default::default(),
                }
            })
            .collect();
        // A live migration adds one stream for mirrored writes, so a guest waiting on its
        // write never waits behind bulk data buffered on a shared stream.
        let streams = (config.data_streams + u16::from(config.live.is_some())) as usize;
        let mut migration = Self {
            config,
            phase: Phase::Handshake,
            disks,
            next_generation: 1,
            next_token: 1,
            next_barrier: 1,
            reads: HashMap::new(),
            stale_reads: Default::default(),
            reads_from_lost_link: Default::default(),
            dirty_queue: VecDeque::new(),
            harvest_at: None,
            dirty_count_at: None,
            pass: PassStats::default(),
            converged: false,
            stalled_harvests: 0,
            harvest_now: false,
            throttle_bytes_per_s: 0,
            pass_barrier: None,
            bulk_disk: 0,
            transmit: VecDeque::new(),
            transmit_bytes: 0,
            frames_sent: vec![0; streams],
            io: VecDeque::new(),
            events: VecDeque::new(),
            mirror_supported: false,
            ordered_summary: false,
            summaries_requested: false,
            mirroring: false,
            mirror_queue: VecDeque::new(),
            mirrors: HashMap::new(),
            mirror_reads: HashMap::new(),
            mirrored: VecDeque::new(),
            switchover_pending: false,
            bulk_done_reported: false,
            unconfirmed: VecDeque::new(),
            unconfirmed_base: 0,
            handed_out: 0,
            handed_out_bytes: 0,
            confirmed_bytes: 0,
            barrier_marks: VecDeque::new(),
            checkpoints: VecDeque::new(),
            unconfirmed_bytes: 0,
            since_checkpoint: 0,
            resume_phase: None,
            zeros_to_resend: Vec::new(),
            requeued_now: 0,
            diffing: false,
            target_digests_kept: false,
            diff_barrier: None,
            progress: SourceProgress {
                bytes_total,
                phase: Phase::Handshake.name(),
                ..Default::default()
            },
        };
        let restarted = migration.config.restarted;
        if restarted {
            // As if the link had been lost before this process started.
            migration.resume_phase = Some(Phase::Bulk);
        }
        let hello = migration.hello(restarted);
        migration.push_transmit(Transmit::Control(hello));
        migration
    }

    fn hello(&self, resume: bool) -> Control {
        Control::Hello(Hello {
            version: PROTOCOL_VERSION,
            features: FEATURES_SUPPORTED,
            session_id: self.config.session_id,
            chunk_bytes: self.config.chunk_bytes,
            data_streams: self.frames_sent.len() as u16,
            disks: self
                .disks
                .iter()
                .map(|d| DiskInfo {
                    size: d.size,
                    identity: d.identity.clone(),
                    allocated: d.allocated_bytes,
                })
                .collect(),
            resume,
        })
    }

    /// Counters so far.
    pub fn progress(&self) -> SourceProgress {
        SourceProgress {
            phase: self.phase.name(),
            ..self.progress.clone()
        }
    }

    /// True once the migration completed or failed.
    pub fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Done | Phase::Failed)
    }

    /// The next frame to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.poll_transmit_if(|_| true)
    }

    /// Like [`SourceMigration::poll_transmit`], but only a control message or (with
    /// `mirror_has_room`) a frame of the mirror stream: what a driver can still send while a
    /// frame waits for room in a full data stream. Mirror frames go first in the queue, so a
    /// mirrored guest write never waits for a bulk stream to drain.
    pub fn poll_priority_transmit(&mut self, mirror_has_room: bool) -> Option<Transmit> {
        let mirror = self.mirror_stream();
        self.poll_transmit_if(|transmit| match transmit.stream() {
            None => true,
            Some(stream) => mirror_has_room && Some(stream) == mirror,
        })
    }

    fn poll_transmit_if(&mut self, eligible: impl Fn(&Transmit) -> bool) -> Option<Transmit> {
        // Planning happens here, not in `poll_io`: planning a hole queues frames, and the
        // driver drains transmits before reads, so nothing planned is left unsent.
        self.plan_mirrors();
        self.plan_bulk();
        self.plan_dirty();
        if !eligible(self.transmit.front()?) {
            return None;
        }
        let mut transmit = self.transmit.pop_front()?;
        self.transmit_bytes -= transmit.queued_bytes();
        if let Transmit::Control(Control::Barrier { frames, .. }) = &mut transmit {
            // Mirror frames may have jumped ahead of frames the barrier was queued behind:
            // count what was really handed out before it, which is exactly what it follows.
            frames.clone_from(&self.frames_sent);
        }
        match &transmit {
            Transmit::Data { stream, .. } | Transmit::Zero { stream, .. } => {
                let mirror = self.mirror_stream() == Some(*stream);
                self.frames_sent[*stream as usize] += 1;
                self.handed_out += 1;
                self.handed_out_bytes += transmit.queued_bytes() as u64;
                self.since_checkpoint += (transmit.queued_bytes() as u64).max(4096);
                if self.config.resumable
                    && let Some(mut sent) = Sent::of(&transmit)
                {
                    if mirror {
                        sent.bytes = 0;
                    }
                    self.unconfirmed_bytes += sent.bytes;
                    self.unconfirmed.push_back(sent);
                }
                self.maybe_checkpoint(false);
            }
            Transmit::Control(Control::Barrier { id, .. }) => {
                self.barrier_marks
                    .push_back((*id, self.handed_out, self.handed_out_bytes));
            }
            Transmit::Control(_) => {}
        }
        Some(transmit)
    }

    /// The next read to submit.
    pub fn poll_io(&mut self) -> Option<ReadRequest> {
        self.io.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<SourceEvent> {
        self.events.pop_front()
    }

    /// A message from the target.
    pub fn handle_control(&mut self, message: Control) {
        // Disconnected: whatever still arrives came over the dead link, and what it answers
        // (barriers, mirrors) was already written off and requeued.
        if self.is_finished() || self.phase == Phase::Disconnected {
            return;
        }
        if let Control::BarrierDone { id } = message {
            // Everything handed out before the barrier is durable on the target.
            let Some(position) = self.barrier_marks.iter().position(|(b, _, _)| *b == id) else {
                return self.protocol_error_from_target(format!("answer to unknown barrier {id}"));
            };
            let (_, upto, bytes_upto) = self.barrier_marks[position];
            self.barrier_marks.drain(..=position);
            self.confirmed_bytes = self.confirmed_bytes.max(bytes_upto);
            debug_assert!(self.confirmed_bytes <= self.handed_out_bytes);
            let confirmed =
                (upto.saturating_sub(self.unconfirmed_base) as usize).min(self.unconfirmed.len());
            let bytes: u64 = self.unconfirmed.drain(..confirmed).map(|s| s.bytes).sum();
            self.unconfirmed_bytes -= bytes;
            self.unconfirmed_base = self.unconfirmed_base.max(upto);
            if let Some(at) = self.checkpoints.iter().position(|c| *c == id) {
                self.checkpoints.remove(at);
                return;
            }
        }
        match (self.phase, message) {
            (_, Control::Error { code, message }) => {
                self.fail(MigrationError::Peer(format!("{code:?}: {message}")), false);
            }
            (Phase::Handshake, Control::Welcome(welcome)) => {
                if welcome.version != PROTOCOL_VERSION {
                    return self.fail(
                        MigrationError::Incompatible(format!(
                            "target speaks protocol version {}",
                            welcome.version
                        )),
                        true,
                    );
                }
                if welcome.features & FEATURES_REQUIRED != FEATURES_REQUIRED {
                    return self.fail(
                        MigrationError::Incompatible(format!(
                            "target lacks required features {:#x}",
                            FEATURES_REQUIRED & !welcome.features
                        )),
                        true,
                    );
                }
                self.mirror_supported =
                    welcome.features & tern_transport::control::FEATURE_MIRROR != 0;
                self.ordered_summary =
                    welcome.features & tern_transport::control::FEATURE_ORDERED_SUMMARY != 0;
                if let Some(resume_to) = self.resume_phase.take() {
                    // A target that lost the mirror feature (another build) gets none.
                    self.mirroring &= self.mirror_supported;
                    return self.resume(resume_to, &welcome);
                }
                self.set_phase(Phase::Bulk);
                self.events.push_back(SourceEvent::Connected);
                let active = self
                    .config
                    .live
                    .as_ref()
                    .is_some_and(|live| live.mode == LiveMode::Active);
                if active && self.mirror_supported {
                    self.mirroring = true;
                    self.events.push_back(SourceEvent::ModeChanged {
                        mirroring: true,
                        throttle_bytes_per_s: 0,
                        reason: "active mode: guest writes complete once they are on the target"
                            .into(),
                        dirty_bytes: 0,
                        dirty_rate: 0.0,
                        transfer_rate: 0.0,
                    });
                }
                self.maybe_finish_bulk();
            }
            (_, Control::MirrorAck { tokens }) => {
                for token in tokens {
                    let waiting = self.mirrors.get(&token).is_some_and(|m| m.reads_left == 0);
                    if !waiting {
                        return self.protocol_error_from_target(format!(
                            "acknowledgement of unknown mirror request {token}"
                        ));
                    }
                    self.mirrors.remove(&token);
                    self.mirrored.push_back((token, true));
                }
            }
            (Phase::Iterating | Phase::FinalPass, Control::BarrierDone { id })
                if self.pass_barrier == Some(id) =>
            {
                // The pass is on the target's disk: its rate is measured end to end, and the
                // target's cache never holds more than one pass (short final flush).
                self.pass_barrier = None;
                if self.phase == Phase::Iterating {
                    self.harvest_now = true;
                }
                self.maybe_finish_pass();
            }
            (Phase::Diff, Control::BarrierDone { id }) if self.diff_barrier == Some(id) => {
                self.diff_barrier = None;
                self.maybe_finish_diff();
            }
            (Phase::Flush { barrier }, Control::BarrierDone { id }) if id == barrier => {
                self.events.push_back(SourceEvent::Flushed);
                if self.config.verify != VerifyMode::Off {
                    self.set_phase(Phase::Verify);
                    // Already asked, right behind the barrier (see `send_barrier`).
                    let asked = std::mem::take(&mut self.summaries_requested);
                    for disk in 0..self.disks.len() {
                        let chunks = self.disks[disk].chunks();
                        if chunks == 0 {
                            continue;
                        }
                        let request = if self.config.verify == VerifyMode::Written {
                            if asked {
                                continue;
                            }
                            // One round trip for the whole table; per chunk only on mismatch.
                            Control::DigestSummaryRequest { disk: disk as u32 }
                        } else {
                            self.digest_request(disk as u32)
                        };
                        self.push_transmit(Transmit::Control(request));
                    }
                    self.maybe_finish_verify();
                } else {
                    self.hand_off();
                }
            }
            (
                Phase::Verify,
                Control::Digests {
                    disk,
                    block,
                    digests,
                },
            ) => self.handle_digests(disk, block, &digests),
            (
                Phase::Diff,
                Control::Digests {
                    disk,
                    block,
                    digests,
                },
            ) => self.handle_diff(disk, block, &digests),
            (Phase::Verify, Control::DigestSummary { disk, digest }) => {
                let Some(state) = self.disks.get_mut(disk as usize) else {
                    return self.fail(
                        MigrationError::Protocol(format!("digest summary for unknown disk {disk}")),
                        true,
                    );
                };
                let ours = state
                    .summary
                    .take()
                    .unwrap_or_else(|| state.digest_summary());
                if ours == digest {
                    state.verified_chunks = state.chunks();
                    self.maybe_finish_verify();
                } else {
                    // Find and name the differing chunks.
                    self.progress.summary_mismatches += 1;
                    let request = self.digest_request(disk);
                    self.push_transmit(Transmit::Control(request));
                }
            }
            (Phase::Complete, Control::CompleteDone) => {
                self.set_phase(Phase::Done);
                let verified = self.config.verify != VerifyMode::Off;
                self.events.push_back(SourceEvent::Completed(SourceSummary {
                    progress: self.progress(),
                    verified,
                }));
            }
            (phase, message) => self.fail(
                MigrationError::Protocol(format!(
                    "unexpected {} in phase {}",
                    message_name(&message),
                    phase.name()
                )),
                true,
            ),
        }
    }

    /// A read completed with `data` (exactly the requested length).
    ///
    /// `block` holds the bytes with their per-chunk facts ([`ReadBlock::new`] with this
    /// migration's chunk size), computed by the driver wherever suits it.
    pub fn handle_read_done(&mut self, token: u64, block: ReadBlock) {
        let Some((disk, range, generation, bulk_read)) = self.reads.remove(&token) else {
            panic!("read completion for unknown token {token}");
        };
        let mirror = self.mirror_reads.remove(&token);
        if self.stale_reads.remove(&token) || self.is_finished() {
            return;
        }
        if self.reads_from_lost_link.remove(&token) || self.resume_phase.is_some() {
            // Issued before the link was lost: these bytes go on the new connection, read
            // again then (with a generation newer than anything resent).
            self.requeue_read(disk, range, bulk_read);
            return;
        }
        let state = &mut self.disks[disk as usize];
        let len = block.data().len() as u64;
        assert_eq!(
            len,
            range.end - range.start,
            "short read reached the engine"
        );
        assert_eq!(
            block.chunk_bytes(),
            u64::from(self.config.chunk_bytes),
            "read block examined with another chunk size"
        );
        debug_assert_eq!(
            block,
            ReadBlock::new(block.data().clone(), block.chunk_bytes())
        );
        state.record_digests(range.start, block.digests(), generation);
        self.progress.bytes_read += len;
        self.pass.bytes_sent += len;
        if !bulk_read {
            self.progress.bytes_resent += range.end - range.start;
        }
        self.send_block(
            disk,
            range.start,
            &block,
            generation,
            mirror.is_none(),
            bulk_read,
        );
        if let Some(mirror) = mirror {
            self.mirror_read_sent(mirror, disk, range, generation);
        }
        self.maybe_finish_bulk();
        self.maybe_finish_pass();
    }

    /// A read failed. The migration fails; the source disk is untouched by the copy.
    pub fn handle_read_failed(&mut self, token: u64, message: String) {
        let Some((disk, _, _, _)) = self.reads.remove(&token) else {
            panic!("read failure for unknown token {token}");
        };
        self.fail(MigrationError::Disk { disk, message }, true);
    }

    /// The connection or a stream failed underneath.
    ///
    /// A resumable migration (see [`SourceConfig::resumable`]) that loses its link during
    /// the bulk pass or a live pass — or, copying a disk nobody writes, during the flush or
    /// the verification — reports [`SourceEvent::LinkDown`] and waits for
    /// [`SourceMigration::handle_reconnected`]: every frame the target has not confirmed
    /// durable is queued again (data frames are read again; zero frames are resent only for
    /// chunks no newer read covers), and guest writes keep being tracked. A live migration
    /// that loses its link during the switchover fails instead: the guest is paused, and
    /// the source staying authoritative is the answer that loses nothing.
    pub fn handle_transport_failed(&mut self, message: String) {
        let resume_to = match self.phase {
            Phase::Disconnected => return,
            Phase::Handshake => self.resume_phase,
            Phase::Bulk | Phase::Iterating => Some(self.phase),
            // Nothing was sent yet: the comparison starts again on the new link.
            Phase::Diff => Some(Phase::Bulk),
            Phase::Flush { .. } | Phase::Verify if self.config.live.is_none() => Some(Phase::Bulk),
            _ => None,
        };
        match resume_to {
            Some(phase) if self.config.resumable => self.link_lost(phase, message),
            _ => self.fail(MigrationError::Transport(message), false),
        }
    }

    /// The target closed the connection on purpose (its close reason says why): that is its
    /// verdict, not a lost link, and is never resumed.
    pub fn handle_peer_closed(&mut self, message: String) {
        self.fail(MigrationError::Peer(message), false);
    }

    /// Enters `Disconnected`: requeues everything the target has not confirmed durable.
    fn link_lost(&mut self, resume_to: Phase, message: String) {
        self.reads_from_lost_link.extend(self.reads.keys().copied());
        let queued = std::mem::take(&mut self.transmit);
        let unconfirmed = std::mem::take(&mut self.unconfirmed);
        for sent in unconfirmed
            .into_iter()
            .chain(queued.iter().filter_map(Sent::of))
        {
            self.requeue_sent(sent);
        }
        self.transmit_bytes = 0;
        self.unconfirmed_base = 0;
        self.handed_out = 0;
        self.handed_out_bytes = 0;
        self.confirmed_bytes = 0;
        self.barrier_marks.clear();
        self.checkpoints.clear();
        self.unconfirmed_bytes = 0;
        self.since_checkpoint = 0;
        self.frames_sent.iter_mut().for_each(|f| *f = 0);
        self.pass_barrier = None;
        self.diff_barrier = None;
        self.harvest_now = false;
        self.harvest_at = None;
        // Guest writes waiting for their mirror complete now and are tracked as dirty.
        self.abandon_mirrors();
        for disk in &mut self.disks {
            disk.verified_chunks = 0;
        }
        self.resume_phase = Some(resume_to);
        self.set_phase(Phase::Disconnected);
        self.events.push_back(SourceEvent::LinkDown { message });
    }

    /// A frame the target may not hold durably goes again: data is read again (the read
    /// returns the newest bytes, with a new generation); a zero range is sent again only
    /// for chunks no newer read covers — a newer frame of such a chunk (a mirrored write,
    /// say) may already be durable on the target, and zeros with a new generation would
    /// overwrite it. A chunk no newer read covers has had no write since that was sent, or
    /// the write is still tracked and goes later, with a newer generation (I2, I3).
    fn requeue_sent(&mut self, sent: Sent) {
        let state = &self.disks[sent.disk as usize];
        let end_chunk = sent.chunk + sent.chunk_count as u64;
        if !sent.zero {
            let range = state.chunk_range(sent.chunk).start
                ..(end_chunk * state.chunk_bytes).min(state.size);
            return self.requeue_read(sent.disk, range, false);
        }
        let mut chunk = sent.chunk;
        while chunk < end_chunk {
            let resend = |c: u64| state.digest_generations[c as usize] <= sent.generation;
            if !resend(chunk) {
                chunk += 1;
                continue;
            }
            let start = chunk;
            while chunk < end_chunk && resend(chunk) {
                chunk += 1;
            }
            self.zeros_to_resend.push((sent.disk, start..chunk));
        }
    }

    /// Queues `range` to be read and sent again. A bulk read that never went out counts
    /// as done for the bulk pass: the requeued read covers it.
    fn requeue_read(&mut self, disk: u32, mut range: Range<u64>, bulk_read: bool) {
        let bytes = range.end - range.start;
        self.progress.bytes_requeued += bytes;
        self.requeued_now += bytes;
        if bulk_read {
            self.progress.bytes_done += bytes;
        }
        // Reads of at most one bulk block, aligned like the bulk pass.
        let block = BULK_READ_BYTES as u64;
        while range.start < range.end {
            let read_end = range.end.min((range.start / block + 1) * block);
            self.dirty_queue.push_back((disk, range.start..read_end));
            range.start = read_end;
        }
    }

    /// The driver has a new connection (its data streams open): the machine sends its
    /// Hello again, asking the target to resume the session.
    pub fn handle_reconnected(&mut self) {
        assert_eq!(
            self.phase,
            Phase::Disconnected,
            "reconnected while not disconnected"
        );
        self.set_phase(Phase::Handshake);
        let hello = self.hello(true);
        self.push_transmit(Transmit::Control(hello));
    }

    /// The driver stops trying to reconnect: the migration fails; the source stays
    /// authoritative.
    pub fn give_up(&mut self, message: String) {
        if self.resume_phase.is_some() {
            self.fail(
                MigrationError::Transport(format!("link lost and not restored: {message}")),
                false,
            );
        }
    }

    /// True between `LinkDown` and the target's answer on a new connection.
    pub fn is_disconnected(&self) -> bool {
        self.resume_phase.is_some()
    }

    /// The target answered a resuming Hello.
    fn resume(&mut self, resume_to: Phase, welcome: &tern_transport::Welcome) {
        self.target_digests_kept = welcome.digests_kept;
        if welcome.resumed && !welcome.digests_kept && self.config.verify == VerifyMode::Written {
            // The target restarted: its table of written digests is gone.
            self.config.verify = VerifyMode::ReadBack;
        }
        if self.config.restarted && !self.bulk_done_reported && welcome.resumed {
            // A restarted source (or one whose link went down while it compared): digest
            // the local disks, then ask the target for its digests.
            self.events.push_back(SourceEvent::Connected);
            self.reset_bulk();
            self.diffing = true;
            self.set_phase(Phase::Bulk);
            self.maybe_finish_bulk();
            return;
        }
        self.progress.reconnects += 1;
        if !welcome.resumed {
            self.restart_from_zero();
        } else {
            self.set_phase(resume_to);
            for (disk, chunks) in std::mem::take(&mut self.zeros_to_resend) {
                let state = &mut self.disks[disk as usize];
                let range = state.chunk_range(chunks.start).start
                    ..(chunks.end * state.chunk_bytes).min(state.size);
                state.record_zero_digests(range.clone());
                self.send_zero_range(disk, range, false);
            }
        }
        self.events.push_back(SourceEvent::Resumed {
            from_start: !welcome.resumed,
            bytes_requeued: std::mem::take(&mut self.requeued_now),
        });
        if self.phase == Phase::Iterating {
            self.harvest_now = true;
            if std::mem::take(&mut self.switchover_pending) {
                self.start_switchover();
            }
        }
        self.maybe_finish_bulk();
    }

    /// The target lost the session: copy everything again. Guest writes from now on are
    /// tracked as before; the new bulk pass covers all earlier ones.
    fn restart_from_zero(&mut self) {
        for disk in &mut self.disks {
            // The extent map is from the start of the migration: guest writes since then may
            // have filled holes, and their dirty marks were spent on the lost copy. Read
            // everything (all-zero chunks still travel as zero ranges).
            disk.allocated = std::iter::once(0..disk.size).collect();
        }
        self.reset_bulk();
        self.diffing = false;
        self.progress.bytes_requeued += self.progress.bytes_total;
        self.requeued_now = self.progress.bytes_total;
        self.set_phase(Phase::Bulk);
    }

    /// Puts the bulk pass back at the start of every disk, forgetting what was sent.
    fn reset_bulk(&mut self) {
        for disk in &mut self.disks {
            disk.next_block = 0;
            disk.extent = 0;
            disk.digests.fill(None);
            disk.summary = None;
            disk.digest_generations.fill(0);
            disk.verified_chunks = 0;
            disk.written_ahead.clear();
        }
        self.stale_reads.extend(self.reads.keys().copied());
        self.reads_from_lost_link.clear();
        self.bulk_disk = 0;
        self.dirty_queue.clear();
        self.zeros_to_resend.clear();
        self.progress.bytes_done = 0;
        self.pass = PassStats::default();
        self.converged = false;
        self.stalled_harvests = 0;
        self.bulk_done_reported = false;
    }

    /// Resumable: queues a checkpoint barrier once `checkpoint_bytes` were handed out since
    /// the last one (or, `now`, once anything was), unless enough are in flight already.
    /// Their answers tell a resumable source what a lost link would cost, and a live one how
    /// much is still on its way (its convergence prediction counts that). A live source that
    /// is not resumable sends only the `now` one, for the tail of an idle migration.
    fn maybe_checkpoint(&mut self, now: bool) {
        let due = if now {
            self.since_checkpoint > 0
        } else {
            self.since_checkpoint >= self.config.checkpoint_bytes
        };
        // Live but not resumable: only the tail (`now`), when nothing is dirty; the passes'
        // own barriers confirm the rest, and a flush every 16 MiB slows a guest that shares
        // the target's disk (measured with `tern demo`: 23 MiB/s of 32, p99 24 ms).
        let allowed = self.config.resumable || (now && self.config.live.is_some());
        if !allowed
            || !due
            || self.checkpoints.len() >= CHECKPOINTS_IN_FLIGHT
            || !matches!(self.phase, Phase::Bulk | Phase::Iterating)
        {
            return;
        }
        let id = self.next_barrier;
        self.next_barrier += 1;
        self.checkpoints.push_back(id);
        self.since_checkpoint = 0;
        // Next out; its frame counts are filled in when it is handed out.
        self.transmit
            .push_front(Transmit::Control(Control::Barrier {
                id,
                frames: Vec::new(),
            }));
    }

    /// Resumable, bulk pass or live pass: too much handed out is not yet confirmed durable.
    /// Planning waits (a checkpoint covering everything handed out is on its way), so a lost
    /// link never costs more than `unconfirmed_bytes_max` plus the queues. The final pass
    /// does not wait: its own barrier confirms it.
    fn durability_window_full(&mut self) -> bool {
        let full = self.config.resumable
            && matches!(self.phase, Phase::Bulk | Phase::Iterating)
            && self.unconfirmed_bytes >= self.config.unconfirmed_bytes_max;
        if full {
            self.maybe_checkpoint(true);
        }
        full
    }

    fn set_phase(&mut self, phase: Phase) {
        self.phase = phase;
        self.progress.phase = phase.name();
    }

    fn fail(&mut self, error: MigrationError, tell_peer: bool) {
        if self.is_finished() {
            return;
        }
        self.set_phase(Phase::Failed);
        self.resume_phase = None;
        self.io.clear();
        self.transmit.clear();
        self.transmit_bytes = 0;
        self.mirroring = false;
        self.abandon_mirrors();
        if tell_peer {
            let code = match &error {
                MigrationError::Protocol(_) => ErrorCode::Protocol,
                MigrationError::Incompatible(_) => ErrorCode::Incompatible,
                MigrationError::Disk { .. } => ErrorCode::Disk,
                MigrationError::VerifyMismatch { .. } => ErrorCode::VerifyFailed,
                MigrationError::Cancelled | MigrationError::RolledBack => ErrorCode::Cancelled,
                _ => ErrorCode::Internal,
            };
            self.transmit.push_back(Transmit::Control(Control::Error {
                code,
                message: error.to_string(),
            }));
        }
        self.events.push_back(SourceEvent::Failed(error));
    }

    /// Cancels the migration: tells the target and fails.
    pub fn cancel(&mut self) {
        self.fail(MigrationError::Cancelled, true);
    }

    /// Data streams the driver must open (the Hello announces them), in order.
    pub fn data_streams(&self) -> u16 {
        self.frames_sent.len() as u16
    }

    /// The stream reserved for mirrored writes (live migrations: the last one); the driver
    /// gives it priority.
    pub fn mirror_stream(&self) -> Option<u16> {
        self.config
            .live
            .is_some()
            .then_some(self.config.data_streams)
    }

    /// True while guest writes should be mirrored (active mode is on): the driver then hands
    /// each completed guest write to [`SourceMigration::handle_mirror`] instead of marking
    /// it dirty.
    pub fn is_mirroring(&self) -> bool {
        self.mirroring
    }

    /// Active mode: the guest's write (or discard, or write-zeroes) of `range` on `disk`
    /// completed on the source; the guest must not learn so before it is on the target.
    /// The machine reads the chunks covering the range (the read is issued after the write
    /// completed, so it returns the written bytes or newer ones), sends them with fresh
    /// generations, and asks the target to acknowledge once its disk holds them — ordered
    /// with every other write of those chunks by generation (I3). The outcome comes from
    /// [`SourceMigration::poll_mirrored`]: `true` once the target acknowledged; `false` if
    /// the write could not be mirrored (not mirroring, the migration ended or failed), in
    /// which case the caller marks the range dirty, as for any unmirrored write (I2).
    ///
    /// "On the target" means the target's write of those bytes (or of newer bytes) completed:
    /// a read of the target image would return them. They become durable at the next barrier
    /// — at the latest the switchover's flush, before the target can become authoritative.
    pub fn handle_mirror(&mut self, token: u64, disk: u32, range: Range<u64>) {
        let valid = self
            .disks
            .get(disk as usize)
            .is_some_and(|d| range.start < range.end && range.end <= d.size);
        // The target holds at most MIRROR_PENDING_MAX requests; past that (a guest with an
        // enormous queue) a write is tracked the passive way instead.
        let room = self.mirrors.len() < tern_transport::control::MIRROR_PENDING_MAX;
        // One range per bulk block read; a write wider than a request may carry (a large
        // discard, say) is tracked the passive way.
        let blocks = self.disks.get(disk as usize).map_or(0, |_| {
            range.end.div_ceil(BULK_READ_BYTES as u64) - range.start / BULK_READ_BYTES as u64
        });
        let room = room && blocks <= tern_transport::control::MIRROR_RANGES_MAX as u64;
        // While a restarted source compares digests nothing is sent, mirrors included.
        if !self.mirroring
            || self.diffing
            || !valid
            || !room
            || !matches!(
                self.phase,
                Phase::Bulk | Phase::Iterating | Phase::FinalPass
            )
        {
            self.mirrored.push_back((token, false));
            return;
        }
        let chunk_bytes = self.config.chunk_bytes as u64;
        let state = &mut self.disks[disk as usize];
        let size = state.size;
        if self.phase == Phase::Bulk {
            let block = BULK_READ_BYTES as u64;
            for b in range.start / block..range.end.div_ceil(block) {
                if b >= state.next_block {
                    state.written_ahead.insert(b);
                }
            }
        }
        let mut start = range.start / chunk_bytes * chunk_bytes;
        let end = (range.end.div_ceil(chunk_bytes) * chunk_bytes).min(size);
        let mut reads = 0;
        while start < end {
            let block = BULK_READ_BYTES as u64;
            let read_end = end.min((start / block + 1) * block);
            self.mirror_queue.push_back((token, disk, start..read_end));
            reads += 1;
            start = read_end;
        }
        let previous = self.mirrors.insert(
            token,
            MirrorState {
                reads_left: reads,
                ranges: Vec::with_capacity(reads),
            },
        );
        assert!(previous.is_none(), "mirror token {token} reused");
    }

    /// The next finished mirror: (token, whether the target holds the write).
    pub fn poll_mirrored(&mut self) -> Option<(u64, bool)> {
        self.mirrored.pop_front()
    }

    /// Issues mirror reads ahead of pass and bulk reads (a guest is waiting on each).
    fn plan_mirrors(&mut self) {
        // Mirror reads have a window of their own, so a guest never waits for bulk reads.
        while self.mirror_reads.len() < self.config.mirror_reads_in_flight_max
            && self.transmit_bytes < 2 * self.config.transmit_queue_bytes_max
        {
            let Some((mirror, disk, range)) = self.mirror_queue.pop_front() else {
                break;
            };
            let token = self.next_token;
            self.next_token += 1;
            let generation = self.next_generation();
            self.reads
                .insert(token, (disk, range.clone(), generation, false));
            self.mirror_reads.insert(token, mirror);
            self.io.push_back(ReadRequest {
                token,
                disk,
                offset: range.start,
                len: (range.end - range.start) as u32,
                bulk: false,
            });
        }
    }

    /// A mirror's read was queued for sending; once all of them are, ask for the ack.
    fn mirror_read_sent(&mut self, mirror: u64, disk: u32, range: Range<u64>, generation: u64) {
        let chunk_bytes = self.config.chunk_bytes as u64;
        let Some(state) = self.mirrors.get_mut(&mirror) else {
            return;
        };
        state.ranges.push(tern_transport::MirrorRange {
            disk,
            chunk: range.start / chunk_bytes,
            chunk_count: (range.end - range.start).div_ceil(chunk_bytes) as u32,
            generation,
        });
        state.reads_left -= 1;
        if state.reads_left == 0 {
            // Ahead of queued bulk frames, like the mirror's own frames: the guest waits.
            let ranges = state.ranges.clone();
            let request = Transmit::Control(Control::MirrorRequest {
                token: mirror,
                ranges,
            });
            self.transmit_bytes += request.queued_bytes();
            self.transmit.push_front(request);
        }
    }

    /// Every mirror not yet acknowledged ends unmirrored (the caller marks it dirty).
    fn abandon_mirrors(&mut self) {
        self.mirror_queue.clear();
        // `mirror_reads` keeps the reads in flight until they complete, so the read windows
        // stay counted right; their mirrors are gone, so their data is not sent for them.
        let mut tokens: Vec<u64> = self.mirrors.drain().map(|(token, _)| token).collect();
        tokens.sort_unstable();
        self.mirrored.extend(tokens.into_iter().map(|t| (t, false)));
    }

    fn protocol_error_from_target(&mut self, message: String) {
        self.fail(MigrationError::Protocol(message), true);
    }

    fn push_transmit(&mut self, transmit: Transmit) {
        self.transmit_bytes += transmit.queued_bytes();
        self.transmit.push_back(transmit);
    }

    fn next_generation(&mut self) -> u64 {
        let generation = self.next_generation;
        self.next_generation += 1;
        generation
    }

    /// The data stream a frame starting at `chunk` goes on: fixed per digest block, so that
    /// frames of one block are ordered by the stream as well as by their generation.
    fn stream_for(&self, disk: u32, byte: u64) -> u16 {
        let block = byte / BULK_READ_BYTES as u64;
        ((block + disk as u64) % self.config.data_streams as u64) as u16
    }

    /// Plans bulk work until the read window or the transmit queue is full.
    fn plan_bulk(&mut self) {
        if self.phase != Phase::Bulk || self.durability_window_full() {
            return;
        }
        while self.copy_reads_in_flight() < self.config.reads_in_flight_max
            && self.transmit_bytes < self.config.transmit_queue_bytes_max
            && self.bulk_disk < self.disks.len()
        {
            let disk_index = self.bulk_disk;
            let disk = &mut self.disks[disk_index];
            let block = disk.next_block;
            if block >= disk.blocks() {
                self.bulk_disk += 1;
                continue;
            }
            let mut next = disk.next_allocated_block(block);
            if let Some(&written) = disk.written_ahead.range(block..).next() {
                next = next.min(written);
            }
            if next > block {
                // A run of blocks with no allocated byte: zero ranges, never read.
                disk.next_block = next;
                let start = block * BULK_READ_BYTES as u64;
                let end = (next * BULK_READ_BYTES as u64).min(disk.size);
                disk.record_zero_digests(start..end);
                self.send_zero_range(disk_index as u32, start..end, true);
                continue;
            }
            disk.next_block += 1;
            let range = disk.block_range(block);
            let token = self.next_token;
            self.next_token += 1;
            let generation = self.next_generation();
            self.reads
                .insert(token, (disk_index as u32, range.clone(), generation, true));
            self.io.push_back(ReadRequest {
                token,
                disk: disk_index as u32,
                offset: range.start,
                len: (range.end - range.start) as u32,
                bulk: true,
            });
        }
        assert!(self.copy_reads_in_flight() <= self.config.reads_in_flight_max);
        assert!(self.mirror_reads.len() <= self.config.mirror_reads_in_flight_max);
        // A pass that needed no read (all holes) finishes here, not in a read completion.
        self.maybe_finish_bulk();
    }

    /// Plans reads of harvested dirty ranges (and, after a lost link, of requeued frames),
    /// within the same bounds as the bulk pass.
    fn plan_dirty(&mut self) {
        if !matches!(
            self.phase,
            Phase::Bulk | Phase::Iterating | Phase::FinalPass
        ) || self.durability_window_full()
        {
            return;
        }
        while self.copy_reads_in_flight() < self.config.reads_in_flight_max
            && self.transmit_bytes < self.config.transmit_queue_bytes_max
        {
            let Some((disk, range)) = self.dirty_queue.pop_front() else {
                break;
            };
            let token = self.next_token;
            self.next_token += 1;
            let generation = self.next_generation();
            self.reads
                .insert(token, (disk, range.clone(), generation, false));
            self.io.push_back(ReadRequest {
                token,
                disk,
                offset: range.start,
                len: (range.end - range.start) as u32,
                bulk: false,
            });
        }
    }

    /// Live, nothing pending and the last harvest empty: when to harvest next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.harvest_at
            .filter(|_| matches!(self.phase, Phase::Iterating | Phase::FinalPass))
    }

    /// The driver's clock, once per turn of its loop. Live, the first call during the bulk
    /// pass starts that pass's clock, so the first harvest after it already knows how fast
    /// the guest dirtied data against how fast the pass sent it (and a hopeless case acts
    /// at once instead of after a wasted pass).
    ///
    /// It is also where the machine does work that can wait for what was queued to be on its
    /// way (see [`SourceMigration::has_deferred_work`]): once the final barrier is out, the
    /// summaries of this side's digest tables (final by then) are computed while the target
    /// flushes, not after its answer arrives (measured: ~0.4 ms of a 1.7 ms downtime).
    pub fn handle_time(&mut self, now: Instant) {
        if self.pass.started.is_none() && self.phase == Phase::Bulk && self.config.live.is_some() {
            self.pass.started = Some(now);
        }
        if self.has_deferred_work() {
            for disk in &mut self.disks {
                if disk.summary.is_none() {
                    disk.summary = Some(disk.digest_summary());
                }
            }
        }
    }

    /// Converged, the VMM switches over next: the summaries of the digest tables are
    /// computed now, while the guest runs, and kept unless a digest changes before the
    /// switchover (any change drops them). An idle disk then computes nothing while paused
    /// (measured, 64 GiB sparse disk: the source's summary of 2^20 chunks took 4.2 ms of a
    /// 4.4 ms downtime, longer than the target's flush).
    fn summarize_ahead(&mut self) {
        if self.config.verify != VerifyMode::Written {
            return;
        }
        for disk in &mut self.disks {
            if disk.summary.is_none() && disk.digests.iter().all(Option::is_some) {
                disk.summary = Some(disk.digest_summary());
            }
        }
    }

    /// True when the next [`SourceMigration::handle_time`] will compute (for ~0.1 ms) what
    /// only matters once the peer answers. A driver lets its transport send what was queued
    /// first: a control message handed to a QUIC stream is only on the wire once the
    /// connection's task has run (measured: the final barrier left 0.17 ms late when the
    /// summaries were computed first).
    pub fn has_deferred_work(&self) -> bool {
        matches!(self.phase, Phase::Flush { .. })
            && self.summaries_requested
            && self.transmit.is_empty()
            && self.disks.iter().any(|disk| disk.summary.is_none())
    }

    /// `Auto`, during the bulk pass, while writes are not mirrored yet: true when the driver
    /// should count the dirty bytes in its bitmaps (without harvesting: the count of what
    /// the guest dirtied since the migration began) and call
    /// [`SourceMigration::handle_dirty_count`].
    ///
    /// Why: a guest that dirties the disk as fast as the bulk pass copies it makes every
    /// later pass hopeless, and waiting for the first harvest to find out costs a whole pass
    /// over a disk the guest also slowed down (measured: 2 GiB, unpaced QD8 guest: bulk
    /// 5.8 s, then everything dirty again).
    pub fn wants_dirty_count(&self, now: Instant) -> bool {
        self.phase == Phase::Bulk
            && !self.mirroring
            && self.mirror_supported
            && self
                .config
                .live
                .as_ref()
                .is_some_and(|live| live.mode == LiveMode::Auto)
            && self.pass.started.is_some_and(|started| {
                let first = self
                    .config
                    .live
                    .as_ref()
                    .map_or(Duration::ZERO, |live| live.bulk_verdict_after);
                now >= self.dirty_count_at.unwrap_or(started + first)
            })
    }

    /// `Auto`, bulk pass: the guest dirtied `dirty_bytes` (all disks, whole blocks) since the
    /// migration began, counted at `now`. If it dirties data at least
    /// `HOPELESS_DIRTY_RATIO` times as fast as the pass copies it, with far more dirty than
    /// the downtime budget allows (the rule the passes use), guest writes are mirrored from
    /// now on instead of after the first pass.
    pub fn handle_dirty_count(&mut self, now: Instant, dirty_bytes: u64) {
        if !self.wants_dirty_count(now) {
            return;
        }
        self.dirty_count_at = Some(now + DIRTY_COUNT_INTERVAL);
        let (Some(started), Some(live)) = (self.pass.started, self.config.live.as_ref()) else {
            return;
        };
        let elapsed = now.saturating_duration_since(started);
        let total: u64 = self.disks.iter().map(|d| d.size).sum();
        let min_bytes = DIRTY_COUNT_MIN_BYTES.min(total / 8);
        if elapsed < live.bulk_verdict_after || self.pass.bytes_sent < min_bytes {
            return;
        }
        let seconds = elapsed.as_secs_f64();
        let transfer_rate = self.pass.bytes_sent as f64 / seconds;
        let dirty_rate = dirty_bytes as f64 / seconds;
        let predicted = Duration::from_secs_f64(dirty_bytes as f64 / transfer_rate.max(1.0));
        if dirty_bytes > 0
            && dirty_rate >= transfer_rate * HOPELESS_DIRTY_RATIO
            && predicted > live.max_downtime * 4
        {
            self.start_mirroring(
                "during the bulk pass the guest dirtied data as fast as it was copied: \
                 guest writes are now mirrored (active mode)"
                    .into(),
                dirty_bytes,
                dirty_rate,
                transfer_rate,
            );
        }
    }

    /// Turns active mode on (the first step of `Auto`'s escalation).
    fn start_mirroring(
        &mut self,
        reason: String,
        dirty_bytes: u64,
        dirty_rate: f64,
        transfer_rate: f64,
    ) {
        debug_assert!(self.mirror_supported && !self.mirroring);
        self.mirroring = true;
        self.stalled_harvests = 0;
        self.pass.best_dirty_bytes = 0;
        self.events.push_back(SourceEvent::ModeChanged {
            mirroring: true,
            throttle_bytes_per_s: 0,
            reason,
            dirty_bytes,
            dirty_rate,
            transfer_rate,
        });
    }

    /// True when the driver should harvest the dirty bitmaps now and call `handle_dirty`.
    pub fn wants_dirty(&self, now: Instant) -> bool {
        matches!(self.phase, Phase::Iterating | Phase::FinalPass)
            && (self.harvest_now || self.harvest_at.is_some_and(|at| now >= at))
    }

    /// Live: the dirty chunk runs harvested from each disk's bitmap at `now` (chunk indexes;
    /// the bitmap's granularity is the chunk size). Harvesting cleared their bits before these
    /// chunks are read, so a write racing the read marks them again (invariant I2).
    pub fn handle_dirty(&mut self, now: Instant, dirty: Vec<(u32, Vec<Range<u64>>)>) {
        if !matches!(self.phase, Phase::Iterating | Phase::FinalPass) {
            return;
        }
        let live = self
            .config
            .live
            .clone()
            .expect("dirty harvests only in live migrations");
        self.harvest_now = false;
        self.harvest_at = None;
        let mut dirty_bytes = 0;
        for (disk, runs) in dirty {
            let Some(state) = self.disks.get(disk as usize) else {
                continue;
            };
            let chunk_bytes = state.chunk_bytes;
            let size = state.size;
            for run in runs {
                let mut start = (run.start * chunk_bytes).min(size);
                let end = (run.end * chunk_bytes).min(size);
                dirty_bytes += end - start;
                // Reads of at most one bulk block, aligned like the bulk pass, so that frames
                // of one block keep going on one stream.
                while start < end {
                    let block = BULK_READ_BYTES as u64;
                    let read_end = end.min((start / block + 1) * block);
                    self.dirty_queue.push_back((disk, start..read_end));
                    start = read_end;
                }
            }
        }
        self.progress.dirty_bytes = dirty_bytes;
        self.progress.passes += 1;
        // What a switchover would wait for besides the dirty data: frames queued or handed
        // out that the target has not confirmed durable. With nothing dirty, a checkpoint
        // has the target confirm the tail, so an idle migration converges once it is there.
        let pending_bytes =
            self.transmit_bytes as u64 + self.handed_out_bytes - self.confirmed_bytes;
        if dirty_bytes == 0 && pending_bytes > 0 {
            self.maybe_checkpoint(true);
        }
        // Convergence: bytes sent since the previous harvest over the time that took.
        if let Some(started) = self.pass.started.replace(now) {
            let seconds = now
                .saturating_duration_since(started)
                .as_secs_f64()
                .max(1e-6);
            let transfer_rate = self.pass.bytes_sent as f64 / seconds;
            let dirty_rate = dirty_bytes as f64 / seconds;
            // Nothing sent and nothing dirty: an idle guest, converged once nothing is
            // pending either.
            if self.phase == Phase::Iterating && (self.pass.bytes_sent > 0 || dirty_bytes == 0) {
                let to_sync = dirty_bytes + pending_bytes;
                // The final sync drains at the rate the target takes the data, but a pass's
                // rate counts what was handed to the transport, whose buffers absorb a few
                // MiB at once: a pass that ends before they fill (a small disk, the start of
                // a slow link) looks far faster than the link. Only what has left the
                // buffers counts: at most the pass's bytes less those still unconfirmed.
                // Measured before: a 4 MiB disk on a 100 Mbit/s link "converged" at
                // 308 MiB/s with 4 MiB in flight, and its switchover took 0.4-1 s against a
                // 50 ms budget.
                let delivery_rate =
                    self.pass.bytes_sent.saturating_sub(pending_bytes) as f64 / seconds;
                let predicted = if to_sync == 0 {
                    Duration::ZERO
                } else {
                    Duration::from_secs_f64(to_sync as f64 / delivery_rate.max(1.0))
                };
                if predicted <= live.max_downtime && !self.converged {
                    self.converged = true;
                    self.events.push_back(SourceEvent::Converged {
                        dirty_bytes,
                        predicted_final_sync: predicted,
                        transfer_rate,
                    });
                    self.summarize_ahead();
                }
                // Stalled: no harvest has improved on the smallest dirty set seen by 10 %.
                let improved = (dirty_bytes as f64) < self.pass.best_dirty_bytes as f64 * 0.9;
                if improved || self.pass.best_dirty_bytes == 0 {
                    self.pass.best_dirty_bytes = dirty_bytes;
                }
                // Hopeless: the guest dirtied data at least as fast as the pass sent it, and
                // far more is dirty than the budget allows, so more passes cannot converge:
                // act now instead of after `stalled_harvests_max` passes (measured: a QD8
                // guest re-dirtying a 2 GiB disk cost two 4.7 s passes before mirroring).
                // Only the guest's data counts: with nothing dirty (an idle guest whose tail
                // waits for its checkpoint) or nothing sent in the pass there is no rate to
                // compare (measured: an idle 2 GiB migration escalated 7 times, throttling
                // the guest to 1 MiB/s, and a WAN one thousands of times).
                let hopeless = dirty_bytes > 0
                    && self.pass.bytes_sent > 0
                    && dirty_rate >= transfer_rate * HOPELESS_DIRTY_RATIO
                    && Duration::from_secs_f64(dirty_bytes as f64 / transfer_rate)
                        > live.max_downtime * 4;
                if (dirty_bytes > 0 && !improved) || (hopeless && !self.converged) {
                    self.stalled_harvests += 1;
                    if hopeless {
                        self.stalled_harvests =
                            self.stalled_harvests.max(live.stalled_harvests_max);
                    }
                    if self.stalled_harvests == live.stalled_harvests_max && !self.converged {
                        match live.mode {
                            LiveMode::Background => {
                                self.events.push_back(SourceEvent::NotConverging {
                                    dirty_bytes,
                                    dirty_rate,
                                    transfer_rate,
                                });
                            }
                            LiveMode::Auto | LiveMode::Active => {
                                self.escalate(dirty_bytes, dirty_rate, transfer_rate);
                            }
                        }
                    }
                } else {
                    self.stalled_harvests = 0;
                }
            }
        }
        self.pass.bytes_sent = 0;
        self.pass.last_dirty_bytes = dirty_bytes;
        if self.phase == Phase::FinalPass {
            self.pass.final_harvested = true;
        }
        if self.dirty_queue.is_empty() && self.phase == Phase::Iterating {
            // Nothing dirty: look again after a short while instead of spinning.
            self.harvest_at = Some(now + live.harvest_interval);
        }
        self.maybe_finish_pass();
    }

    fn digest_request(&self, disk: u32) -> Control {
        Control::DigestRequest {
            disk,
            block_bytes: self.config.chunk_bytes,
            block: 0,
            block_count: self.disks[disk as usize].chunks(),
            read_back: self.config.verify == VerifyMode::ReadBack,
        }
    }

    /// `Auto`: limits guest writes to a quarter of the measured transfer rate, or halves the
    /// limit in force; the dirty set then shrinks by most of each pass.
    fn escalate(&mut self, dirty_bytes: u64, dirty_rate: f64, transfer_rate: f64) {
        /// Below this a guest is practically stopped; the limit does not go lower.
        const THROTTLE_MIN: u64 = 1 << 20;
        if !self.mirroring && self.mirror_supported {
            // First step: mirror writes, so new writes stop adding to the dirty set and the
            // passes only have the backlog left to send.
            let reason = format!(
                "dirty set stopped shrinking for {} harvests: guest writes are now mirrored (active mode)",
                live_stalled(self)
            );
            self.start_mirroring(reason, dirty_bytes, dirty_rate, transfer_rate);
            return;
        }
        let limit = if self.throttle_bytes_per_s == 0 {
            (transfer_rate / 4.0) as u64
        } else {
            self.throttle_bytes_per_s / 2
        }
        .max(THROTTLE_MIN);
        let reason = if self.throttle_bytes_per_s == 0 {
            format!(
                "dirty set stopped shrinking for {} harvests: guest writes limited to a quarter of the transfer rate",
                self.stalled_harvests
            )
        } else {
            "dirty set still not shrinking: guest write limit halved".to_string()
        };
        self.throttle_bytes_per_s = limit;
        self.stalled_harvests = 0;
        self.pass.best_dirty_bytes = 0;
        self.events.push_back(SourceEvent::ModeChanged {
            mirroring: self.mirroring,
            throttle_bytes_per_s: limit,
            reason,
            dirty_bytes,
            dirty_rate,
            transfer_rate,
        });
    }

    /// True once the live migration reported `Converged`.
    pub fn is_converged(&self) -> bool {
        self.converged
    }

    /// Live: the VM is paused and its in-flight IO drained, so no write marks the bitmaps any
    /// more. The machine asks for one last harvest, sends it, then flushes and verifies.
    pub fn start_switchover(&mut self) {
        if matches!(
            self.phase,
            Phase::Handshake | Phase::Bulk | Phase::Disconnected
        ) && self.config.live.is_some()
        {
            // Too early (or the link is down): the final pass starts as soon as the bulk
            // pass is done and the link is up.
            self.switchover_pending = true;
            return;
        }
        if self.phase != Phase::Iterating {
            return;
        }
        self.set_phase(Phase::FinalPass);
        self.pass.final_harvested = false;
        self.harvest_now = true;
        self.harvest_at = None;
    }

    /// A live pass is finished when nothing is queued or being read; in the final pass the
    /// target then has every byte and only the barrier is left.
    fn maybe_finish_pass(&mut self) {
        // The final pass also waits for mirrors (the guest is paused, so they end); a live
        // pass does not, or a busy guest in active mode would starve the passes.
        let mirrors_busy = !self.mirror_queue.is_empty() || !self.mirror_reads.is_empty();
        if self.copy_reads_in_flight() > 0
            || !self.dirty_queue.is_empty()
            || !self.io.is_empty()
            || (self.phase == Phase::FinalPass && mirrors_busy)
        {
            return;
        }
        match self.phase {
            Phase::Iterating
                if self.harvest_at.is_none()
                    && !self.harvest_now
                    && self.pass_barrier.is_none() =>
            {
                // The pass is sent. Harvest again once the target confirms it is durable, so
                // the transfer rate counts what was still queued in the transport.
                self.pass_barrier = Some(self.queue_barrier());
            }
            Phase::FinalPass
                if self.pass.final_harvested
                    && !self.harvest_now
                    && self.pass_barrier.is_none() =>
            {
                self.send_barrier();
            }
            _ => {}
        }
    }

    /// Queues a zero-range frame (several if the range exceeds a frame's chunk count);
    /// `bulk`: the bulk pass's first sending of the range (counted as done).
    fn send_zero_range(&mut self, disk: u32, range: Range<u64>, bulk: bool) {
        if self.diffing {
            if bulk {
                self.progress.bytes_done += range.end - range.start;
            }
            return;
        }
        let chunk_bytes = self.config.chunk_bytes as u64;
        debug_assert_eq!(range.start % chunk_bytes, 0);
        let mut chunk = range.start / chunk_bytes;
        let end_chunk = range.end.div_ceil(chunk_bytes);
        while chunk < end_chunk {
            let count = (end_chunk - chunk).min(u32::MAX as u64) as u32;
            let generation = self.next_generation();
            let stream = self.stream_for(disk, chunk * chunk_bytes);
            self.push_transmit(Transmit::Zero {
                stream,
                disk,
                chunk,
                chunk_count: count,
                generation,
            });
            chunk += count as u64;
        }
        self.progress.bytes_zero += range.end - range.start;
        if bulk {
            self.progress.bytes_done += range.end - range.start;
        }
    }

    /// Splits a block read into runs of zero and non-zero chunks and queues their frames.
    /// Frames of mirror reads (`bulk` false) go to the front of the queue: a guest waits on
    /// them. Jumping the queue is safe — the target orders writes of a chunk by generation
    /// (I3), and a barrier only needs at least the frames it counts. Only the bulk pass's
    /// own reads (`bulk_read`) advance its progress.
    fn send_block(
        &mut self,
        disk: u32,
        offset: u64,
        block: &ReadBlock,
        generation: u64,
        bulk: bool,
        bulk_read: bool,
    ) {
        if self.diffing {
            // Digests only (recorded by the caller): the target's decide what to send.
            if bulk_read {
                self.progress.bytes_done += block.data().len() as u64;
            }
            return;
        }
        let chunk_bytes = u64::from(self.config.chunk_bytes);
        debug_assert_eq!(offset % chunk_bytes, 0);
        let first_chunk = offset / chunk_bytes;
        for run in block.runs() {
            let chunk = first_chunk + run.chunks.start as u64;
            let count = run.chunks.len() as u32;
            let stream = match self.mirror_stream() {
                Some(mirror) if !bulk => mirror,
                _ => self.stream_for(disk, offset),
            };
            let data = block.run_bytes(run);
            let bytes = data.len() as u64;
            let frame = match run.crc32 {
                None => {
                    self.progress.bytes_zero += bytes;
                    Transmit::Zero {
                        stream,
                        disk,
                        chunk,
                        chunk_count: count,
                        generation,
                    }
                }
                Some(crc32) => {
                    self.progress.bytes_data += bytes;
                    Transmit::Data {
                        stream,
                        disk,
                        chunk,
                        chunk_count: count,
                        generation,
                        data,
                        crc32,
                    }
                }
            };
            if bulk || self.phase == Phase::Iterating && !self.mirroring {
                self.push_transmit(frame);
            } else {
                self.transmit_bytes += frame.queued_bytes();
                self.transmit.push_front(frame);
            }
            if bulk_read {
                self.progress.bytes_done += bytes;
            }
        }
    }

    /// Reads in flight for the copy itself (bulk or pass), not for mirrors: a guest that
    /// keeps writing in active mode keeps a mirror read in flight most of the time, and the
    /// bulk pass and the live passes must still end.
    fn copy_reads_in_flight(&self) -> usize {
        self.reads.len() - self.mirror_reads.len()
    }

    fn maybe_finish_bulk(&mut self) {
        if self.phase != Phase::Bulk
            || self.copy_reads_in_flight() > 0
            || !self.io.is_empty()
            || !self.dirty_queue.is_empty()
            || self.disks.iter().any(|d| d.next_block < d.blocks())
        {
            return;
        }
        // Every block was planned; check it also had to be: the bulk cursor covered each disk.
        for disk in &self.disks {
            assert!(disk.next_block >= disk.blocks());
            debug_assert!(disk.digests.iter().all(Option::is_some));
        }
        assert_eq!(self.progress.bytes_done, self.progress.bytes_total);
        if self.diffing {
            // Every local digest is known: ask for the target's, and have it flush, so that
            // what compares equal is also durable.
            self.set_phase(Phase::Diff);
            self.diff_barrier = Some(self.queue_barrier());
            let read_back = !self.target_digests_kept || self.config.verify == VerifyMode::ReadBack;
            for disk in 0..self.disks.len() {
                self.disks[disk].verified_chunks = 0;
                if self.disks[disk].chunks() == 0 {
                    continue;
                }
                let mut request = self.digest_request(disk as u32);
                if let Control::DigestRequest { read_back: r, .. } = &mut request {
                    *r = read_back;
                }
                self.push_transmit(Transmit::Control(request));
            }
            return self.maybe_finish_diff();
        }
        if !std::mem::replace(&mut self.bulk_done_reported, true) {
            self.events.push_back(SourceEvent::BulkDone);
        }
        if self.config.live.is_some() {
            // What the guest wrote during the bulk pass is the first live pass: harvest as
            // soon as the driver can.
            self.set_phase(Phase::Iterating);
            if std::mem::take(&mut self.switchover_pending) {
                self.start_switchover();
            }
            self.harvest_now = true;
            return;
        }
        self.send_barrier();
    }

    /// The final barrier. A target that answers digest summaries in order behind barriers
    /// (`FEATURE_ORDERED_SUMMARY`) gets the summary requests right behind it: the summaries
    /// then arrive just after `BarrierDone`, a round trip sooner (measured on loopback:
    /// ~0.3 ms of a 1.6 ms downtime).
    fn send_barrier(&mut self) {
        let barrier = self.queue_barrier();
        self.set_phase(Phase::Flush { barrier });
        self.summaries_requested =
            self.ordered_summary && self.config.verify == VerifyMode::Written;
        if self.summaries_requested {
            for disk in 0..self.disks.len() {
                if self.disks[disk].chunks() > 0 {
                    let request = Control::DigestSummaryRequest { disk: disk as u32 };
                    self.push_transmit(Transmit::Control(request));
                }
            }
        }
    }

    /// Queues a barrier behind every frame queued so far and returns its id.
    fn queue_barrier(&mut self) -> u64 {
        let barrier = self.next_barrier;
        self.next_barrier += 1;
        // The barrier goes behind every frame still queued: its counts are the frames already
        // handed to the driver plus those queued ahead of it.
        let mut frames = self.frames_sent.clone();
        for transmit in &self.transmit {
            if let Transmit::Data { stream, .. } | Transmit::Zero { stream, .. } = transmit {
                frames[*stream as usize] += 1;
            }
        }
        self.push_transmit(Transmit::Control(Control::Barrier {
            id: barrier,
            frames,
        }));
        barrier
    }

    fn handle_digests(&mut self, disk: u32, block: u64, digests: &[u128]) {
        let Some(state) = self.disks.get_mut(disk as usize) else {
            return self.fail(
                MigrationError::Protocol(format!("digests for unknown disk {disk}")),
                true,
            );
        };
        let end = block.checked_add(digests.len() as u64);
        if block != state.verified_chunks || end.is_none_or(|end| end > state.chunks()) {
            return self.fail(
                MigrationError::Protocol(format!(
                    "digests for chunks {block}.. out of order or past the disk"
                )),
                true,
            );
        }
        for (i, target) in digests.iter().enumerate() {
            let b = block + i as u64;
            let source = state.digests[b as usize].expect("every chunk was digested in bulk");
            if source != *target {
                let range = state.chunk_range(b);
                return self.fail(
                    MigrationError::VerifyMismatch {
                        disk,
                        start: range.start,
                        end: range.end,
                    },
                    true,
                );
            }
        }
        state.verified_chunks += digests.len() as u64;
        self.maybe_finish_verify();
    }

    /// A restarted source: the target's digests of chunks `block..`; the chunks that differ
    /// from ours are queued to be read and sent.
    fn handle_diff(&mut self, disk: u32, block: u64, digests: &[u128]) {
        let Some(state) = self.disks.get(disk as usize) else {
            return self.protocol_error_from_target(format!("digests for unknown disk {disk}"));
        };
        let end = block.checked_add(digests.len() as u64);
        if block != state.verified_chunks || end.is_none_or(|end| end > state.chunks()) {
            return self.protocol_error_from_target(format!(
                "digests for chunks {block}.. out of order or past the disk"
            ));
        }
        let mut differing: Vec<Range<u64>> = Vec::new();
        for (i, target) in digests.iter().enumerate() {
            let chunk = block + i as u64;
            let ours = state.digests[chunk as usize].expect("the local pass digested every chunk");
            if ours != *target {
                let range = state.chunk_range(chunk);
                match differing.last_mut() {
                    Some(last) if last.end == range.start => last.end = range.end,
                    _ => differing.push(range),
                }
            }
        }
        self.disks[disk as usize].verified_chunks += digests.len() as u64;
        for range in differing {
            self.requeue_read(disk, range, false);
        }
        self.maybe_finish_diff();
    }

    /// Once every disk's target digests arrived, the copy goes on with what differs.
    fn maybe_finish_diff(&mut self) {
        if self.phase != Phase::Diff
            || self.diff_barrier.is_some()
            || self.disks.iter().any(|d| d.verified_chunks < d.chunks())
        {
            return;
        }
        for disk in &mut self.disks {
            disk.verified_chunks = 0;
        }
        self.diffing = false;
        self.events.push_back(SourceEvent::Resumed {
            from_start: false,
            bytes_requeued: std::mem::take(&mut self.requeued_now),
        });
        // The local pass was the bulk pass: what differs is in `dirty_queue`.
        self.set_phase(Phase::Bulk);
        let active = self
            .config
            .live
            .as_ref()
            .is_some_and(|live| live.mode == LiveMode::Active);
        if active && self.mirror_supported && !self.mirroring {
            self.mirroring = true;
            self.events.push_back(SourceEvent::ModeChanged {
                mirroring: true,
                throttle_bytes_per_s: 0,
                reason: "active mode: guest writes complete once they are on the target".into(),
                dirty_bytes: 0,
                dirty_rate: 0.0,
                transfer_rate: 0.0,
            });
        }
        self.maybe_finish_bulk();
    }

    fn maybe_finish_verify(&mut self) {
        let complete = self
            .disks
            .iter()
            .all(|disk| disk.verified_chunks == disk.chunks());
        if self.phase == Phase::Verify && complete {
            self.hand_off();
        }
    }

    /// The target holds a durable, verified copy. A plain copy completes at once; a live
    /// migration waits for the VMM's `commit` (or `rollback`): until then the source stays
    /// authoritative (I4).
    fn hand_off(&mut self) {
        if self.config.live.is_some() {
            self.set_phase(Phase::HandedOff);
            self.events.push_back(SourceEvent::SwitchedOver {
                verified: self.config.verify != VerifyMode::Off,
            });
        } else {
            self.set_phase(Phase::Complete);
            self.push_transmit(Transmit::Control(Control::Complete));
        }
    }

    /// Live, after `SwitchedOver`: make the target authoritative. Once the target confirms,
    /// `Completed` follows; the source may then be released.
    pub fn commit(&mut self) {
        if self.phase != Phase::HandedOff {
            return;
        }
        self.set_phase(Phase::Complete);
        self.push_transmit(Transmit::Control(Control::Complete));
    }

    /// Abandons the migration before commit: the target is told and keeps its image marked
    /// incomplete; the source stays authoritative and the guest may resume on it.
    pub fn rollback(&mut self) {
        if matches!(self.phase, Phase::Complete | Phase::Done | Phase::Failed) {
            return;
        }
        self.fail(MigrationError::RolledBack, true);
    }
}

fn live_stalled(machine: &SourceMigration) -> u32 {
    machine
        .config
        .live
        .as_ref()
        .map_or(0, |live| live.stalled_harvests_max)
}

/// A short name of a control message, for errors.
pub(crate) fn message_name(message: &Control) -> &'static str {
    match message {
        Control::Hello(_) => "Hello",
        Control::Welcome(_) => "Welcome",
        Control::Barrier { .. } => "Barrier",
        Control::BarrierDone { .. } => "BarrierDone",
        Control::DigestRequest { .. } => "DigestRequest",
        Control::Digests { .. } => "Digests",
        Control::Complete => "Complete",
        Control::CompleteDone => "CompleteDone",
        Control::Error { .. } => "Error",
        Control::DigestSummaryRequest { .. } => "DigestSummaryRequest",
        Control::DigestSummary { .. } => "DigestSummary",
        Control::MirrorRequest { .. } => "MirrorRequest",
        Control::MirrorAck { .. } => "MirrorAck",
    }
}
