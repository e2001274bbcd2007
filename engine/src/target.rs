//! The target side of a migration as a sans-IO state machine.
//!
//! [`TargetMigration`] validates every frame (invariant I5), orders writes of the same chunk
//! (I3), answers barriers with flushes and digest requests with digests. It does no IO; a
//! driver (see `driver::target`) performs its outputs. Call order, repeated until
//! `poll_event` yields [`TargetEvent::Completed`] or [`TargetEvent::Failed`]:
//!
//! 1. `poll_transmit` until `None` — send each control message;
//! 2. `poll_io` until `None` — perform each [`TargetIo`];
//! 3. `poll_event` until `None`;
//! 4. wait for one input: a frame (`handle_frame`, only while `can_accept_frame`), a control
//!    message (`handle_control`), or an IO completion (`handle_io_done` / `handle_io_failed`).
//!
//! Per-chunk order (I3): every chunk remembers the generation of the last write issued for it,
//! and at most one write per chunk is in flight. A frame touching a chunk with a write in
//! flight waits; when it runs, only chunks whose stored generation is older are written. So
//! however frames are reordered, duplicated or delayed, each chunk ends with the bytes of the
//! newest generation the source sent.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;
use tern_transport::control::{
    DIGESTS_PER_MESSAGE, FEATURES_REQUIRED, FEATURES_SUPPORTED, MIRROR_PENDING_MAX,
    MIRROR_RANGES_MAX,
};
use tern_transport::{Control, ErrorCode, Frame, Hello, MirrorRange, PROTOCOL_VERSION, Welcome};

use crate::digest::{digest, summary, zero_digest};
use crate::error::MigrationError;
use crate::source::message_name;

/// Frames received but not yet written (in flight or waiting) above which the driver stops
/// reading the data streams; QUIC flow control then slows the source (I6).
pub const FRAMES_PENDING_MAX: usize = 64;
/// Data bytes of received frames not yet written above which the driver stops reading the
/// bulk data streams, while the source mirrors guest writes (see [`BYTES_PENDING_MAX`]): a
/// mirrored write queues behind at most this much. Frames carry up to 1 MiB, so 64 of them
/// queued up to 64 MiB of writes ahead of a mirrored guest write (measured, active mode during
/// the bulk pass: mirrors took 10–20 ms, the guest got 9 MiB/s at QD8). With 4, 2 and 1 MiB
/// (unpaced QD8 guest, `tern-bench nbd`, `bench/tools/mirror_latency.py`, AMD EPYC with a
/// Firecracker disk, 2–4 runs each): a mirror during the bulk pass took a median 21–31,
/// 12–14 and 7–11 ms (the target's part 7.5–10, 3–3.5 and 1.5–2 ms), and 1400–1500, 2300 and
/// 2800–4100 guest writes were mirrored during it; the whole migration took 9.7–11.1 s with
/// 4 MiB and 10.9–11.7 s with 1 MiB (carrying twice the guest's writes). One bulk write of
/// 1 MiB in flight still writes this disk at its speed (fio, O_DIRECT, QD1: 1146 MiB/s).
pub const BYTES_PENDING_MIRRORING: u64 = 1 << 20;
/// The same bound while nobody waits for a mirrored write: deeper queues keep a fast disk
/// busier while the source's reads compete for it (2 GiB copy on loopback, 6 interleaved
/// runs: median 2.13 s with 4 MiB, 2.0 s with 16 MiB; `qemu-img convert -m 8` keeps up to
/// 16 MiB in flight too).
pub const BYTES_PENDING_MAX: u64 = 16 << 20;
/// After a mirror request, the smaller bound holds until this many more data bytes were
/// accepted without another one (the source mirrors for a while once it starts).
const MIRRORING_HOLDS_BYTES: u64 = 64 << 20;

/// Digest summary requests that may wait for barriers at once (a source sends one per disk
/// behind its final barrier).
const SUMMARIES_WAITING_MAX: usize = 1024;
/// Barriers a source may have outstanding at once (checkpoints plus a pass barrier).
pub const BARRIERS_PENDING_MAX: usize = 16;

/// IO the driver must perform for the target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetIo {
    /// Write `data` at `offset`.
    Write {
        /// Echoed in the completion.
        token: u64,
        /// Disk index.
        disk: u32,
        /// Byte offset.
        offset: u64,
        /// The bytes.
        data: Bytes,
    },
    /// Make `len` bytes at `offset` read as zeros, keeping them sparse.
    WriteZeroes {
        /// Echoed in the completion.
        token: u64,
        /// Disk index.
        disk: u32,
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
    },
    /// fdatasync the disk.
    Flush {
        /// Echoed in the completion.
        token: u64,
        /// Disk index.
        disk: u32,
    },
    /// Compute digests of `block_count` blocks of `block_bytes` from `block` (the last block
    /// clipped to the disk's end); complete with `handle_digests_done`.
    Digest {
        /// Echoed in the completion.
        token: u64,
        /// Disk index.
        disk: u32,
        /// Block size.
        block_bytes: u32,
        /// First block.
        block: u64,
        /// Number of blocks.
        block_count: u64,
    },
    /// The copy is complete: durably mark the images complete, then `handle_io_done`.
    MarkComplete {
        /// Echoed in the completion.
        token: u64,
    },
}

/// What a target kept of a session when a source asks to resume it.
#[derive(Debug, Default)]
pub enum Kept {
    /// Nothing: the images were created afresh; a resuming source must start over.
    #[default]
    Nothing,
    /// The images, marked incomplete for this session, but not the digests of what was
    /// written (the target process restarted): the source verifies by reading back.
    Images,
    /// The images and the tables of the previous connection (the target lived through a
    /// lost link).
    Session(SessionTables),
}

/// Per-chunk tables of a session, carried from one connection to the next.
#[derive(Debug)]
pub struct SessionTables {
    chunk_bytes: u64,
    /// Per disk: the digest of the last write of each chunk.
    disks: Vec<Vec<u128>>,
}

/// What the target reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetEvent {
    /// The source finished; the images are complete.
    Completed,
    /// Failed; the images are incomplete and must not be used.
    Failed(MigrationError),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Running,
    Done,
    Failed,
}

#[derive(Debug)]
struct DiskState {
    size: u64,
    /// Generation of the last write issued per chunk; 0 = never written.
    generation: Vec<u64>,
    /// A write of this chunk is in flight.
    busy: Vec<bool>,
    /// xxh3-128 of the bytes last handed to the disk for each chunk; 0 = never written.
    digest: Vec<u128>,
}

/// A validated frame waiting for its chunks to be free.
#[derive(Debug)]
struct PendingFrame {
    disk: u32,
    chunk: u64,
    chunk_count: u32,
    generation: u64,
    /// `None` for zero ranges.
    data: Option<Bytes>,
    /// Arrival sequence number (see [`TargetMigration::outstanding`]).
    seq: u64,
}

impl PendingFrame {
    fn data_bytes(&self) -> u64 {
        self.data.as_ref().map_or(0, |d| d.len() as u64)
    }
}

#[derive(Debug)]
enum InFlight {
    Write {
        disk: u32,
        chunks: std::ops::Range<u64>,
        /// The frame this write belongs to.
        seq: u64,
        /// Data bytes (0 for zeroes).
        bytes: u64,
    },
    Flush,
    Digest {
        disk: u32,
        block: u64,
        end: u64,
        block_bytes: u32,
    },
    MarkComplete,
}

/// The target of a migration. See the module documentation for the call order.
#[derive(Debug)]
pub struct TargetMigration {
    phase: Phase,
    chunk_bytes: u64,
    disks: Vec<DiskState>,
    frames_received: Vec<u64>,
    /// Data streams the source finished.
    streams_finished: Vec<bool>,
    /// Barriers in arrival order; the front one is being served. Each is (id, frame counts
    /// per stream, and once those counts arrived, the sequence number of the last frame then
    /// received: the barrier covers every frame up to it).
    barriers: VecDeque<(u64, Vec<u64>, Option<u64>)>,
    /// Digest summary requests waiting for a barrier: (barrier id, disk, and the summary once
    /// computed), in arrival order. A summary is computed as soon as its barrier's flush is
    /// issued — every frame the barrier covers is written by then, so the table is final for
    /// them — and sent once the flush completes: the flush (~0.1–0.2 ms) hides the
    /// computation (~0.08 ms for 2 GiB), which otherwise delayed the final `BarrierDone`.
    summaries_waiting: VecDeque<(u64, u32, Option<u128>)>,
    flushes_pending: usize,
    /// Sequence number of the last frame received (frames are numbered from 1 on arrival).
    last_seq: u64,
    /// Frames received but not yet on the disk: arrival sequence → writes still in flight
    /// (0 while deferred). A barrier is durable-ready once no frame at or below its sequence
    /// is left here — frames that arrive after it never hold it up, so a source that keeps
    /// sending cannot starve a barrier.
    outstanding: std::collections::BTreeMap<u64, usize>,
    deferred: VecDeque<PendingFrame>,
    in_flight: HashMap<u64, InFlight>,
    writes_in_flight: usize,
    /// Data bytes of writes in flight and of deferred frames (see `BYTES_PENDING_MAX`).
    bytes_pending: u64,
    /// Data bytes of frames accepted so far.
    bytes_accepted: u64,
    /// `bytes_accepted` up to which the source is taken to be mirroring (the last mirror
    /// request's plus [`MIRRORING_HOLDS_BYTES`]).
    mirroring_until: Option<u64>,
    next_token: u64,
    io: VecDeque<TargetIo>,
    transmit: VecDeque<Control>,
    events: VecDeque<TargetEvent>,
    bytes_written: u64,
    /// Mirror requests not yet satisfied: token → the chunks and generations they wait for.
    mirror_pending: Vec<(u64, Vec<MirrorRange>)>,
}

impl TargetMigration {
    /// Checks the source's handshake against the target's disks (their sizes, in order) and
    /// returns the machine and the answer to send. An incompatible hello gives the error to
    /// send back.
    ///
    /// `kept`: what the driver kept of session `hello.session_id` from an earlier connection
    /// (see [`Kept`]). A resuming source that hears `resumed: true` resends only what this
    /// target never confirmed durable — every barrier this target answered was preceded by a
    /// flush, so what it confirmed survives even its own crash.
    pub fn accept(
        hello: &Hello,
        disk_sizes: &[u64],
        kept: Kept,
    ) -> Result<(Self, Control), MigrationError> {
        if hello.version != PROTOCOL_VERSION {
            return Err(MigrationError::Incompatible(format!(
                "source speaks protocol version {}, this target {}",
                hello.version, PROTOCOL_VERSION
            )));
        }
        if hello.features & FEATURES_REQUIRED != FEATURES_REQUIRED {
            return Err(MigrationError::Incompatible(format!(
                "source lacks required features {:#x}",
                FEATURES_REQUIRED & !hello.features
            )));
        }
        if !hello.chunk_bytes.is_power_of_two() || !(4096..=1 << 20).contains(&hello.chunk_bytes) {
            return Err(MigrationError::Incompatible(format!(
                "chunk size {} is not a power of two between 4 KiB and 1 MiB",
                hello.chunk_bytes
            )));
        }
        if hello.data_streams == 0 || hello.data_streams > 64 {
            return Err(MigrationError::Incompatible(format!(
                "{} data streams (1 to 64 allowed)",
                hello.data_streams
            )));
        }
        if hello.disks.len() != disk_sizes.len() {
            return Err(MigrationError::Incompatible(format!(
                "source sends {} disks, target has {}",
                hello.disks.len(),
                disk_sizes.len()
            )));
        }
        for (i, (disk, size)) in hello.disks.iter().zip(disk_sizes).enumerate() {
            if disk.size != *size {
                return Err(MigrationError::Incompatible(format!(
                    "disk {i}: source is {} bytes, target image is {size} bytes",
                    disk.size
                )));
            }
        }
        let chunk_bytes = hello.chunk_bytes as u64;
        let mut disks: Vec<DiskState> = disk_sizes
            .iter()
            .map(|size| {
                let chunks = size.div_ceil(chunk_bytes) as usize;
                DiskState {
                    size: *size,
                    generation: vec![0; chunks],
                    busy: vec![false; chunks],
                    digest: vec![0; chunks],
                }
            })
            .collect();
        let (holds_session, digests_kept) = match kept {
            Kept::Nothing => (false, false),
            Kept::Images => (true, false),
            Kept::Session(session) => {
                let fits = session.chunk_bytes == chunk_bytes
                    && session.disks.len() == disks.len()
                    && session
                        .disks
                        .iter()
                        .zip(&disks)
                        .all(|(kept, disk)| kept.len() == disk.generation.len());
                if fits {
                    // Digests carry over; generations start again from 0: every write of the
                    // earlier connection completed before this one was accepted, and every
                    // frame on a new connection comes from a read issued after the source
                    // lost the old one — newer bytes, whatever its generation (a restarted
                    // source counts from 1 again).
                    for (disk, digest) in disks.iter_mut().zip(session.disks) {
                        disk.digest = digest;
                    }
                }
                (true, fits)
            }
        };
        let machine = Self {
            phase: Phase::Running,
            chunk_bytes,
            disks,
            frames_received: vec![0; hello.data_streams as usize],
            streams_finished: vec![false; hello.data_streams as usize],
            barriers: VecDeque::new(),
            summaries_waiting: VecDeque::new(),
            flushes_pending: 0,
            last_seq: 0,
            outstanding: Default::default(),
            deferred: VecDeque::new(),
            in_flight: HashMap::new(),
            writes_in_flight: 0,
            bytes_pending: 0,
            bytes_accepted: 0,
            mirroring_until: None,
            next_token: 1,
            io: VecDeque::new(),
            transmit: VecDeque::new(),
            events: VecDeque::new(),
            bytes_written: 0,
            mirror_pending: Vec::new(),
        };
        let welcome = Control::Welcome(Welcome {
            version: PROTOCOL_VERSION,
            features: FEATURES_SUPPORTED & hello.features,
            resumed: hello.resume && holds_session,
            digests_kept: hello.resume && digests_kept,
        });
        Ok((machine, welcome))
    }

    /// What a later connection of the same session may continue from, once this machine
    /// finished (failed on a lost link) and none of its IO is in flight any more.
    pub fn into_session(self) -> SessionTables {
        assert!(
            self.in_flight.is_empty(),
            "a session is kept only once its IO completed"
        );
        SessionTables {
            chunk_bytes: self.chunk_bytes,
            disks: self.disks.into_iter().map(|d| d.digest).collect(),
        }
    }

    /// IO issued and not yet completed: a driver drains it before a new connection of the
    /// session may write (so writes of one chunk never race across connections, I3).
    pub fn io_in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// True while the driver may hand over another frame (I6: bounded pending writes).
    pub fn can_accept_frame(&self) -> bool {
        self.writes_in_flight + self.deferred.len() < FRAMES_PENDING_MAX
            && self.bytes_pending < self.bytes_pending_max()
    }

    /// The bound on unwritten data bytes now: [`BYTES_PENDING_MIRRORING`] while the source
    /// mirrors guest writes, else [`BYTES_PENDING_MAX`].
    pub fn bytes_pending_max(&self) -> u64 {
        match self.mirroring_until {
            Some(until) if self.bytes_accepted < until => BYTES_PENDING_MIRRORING,
            _ => BYTES_PENDING_MAX,
        }
    }

    /// Like [`TargetMigration::can_accept_frame`] for the priority (mirror) stream, with a
    /// little headroom so a mirrored write is taken even while bulk frames fill the window.
    pub fn can_accept_priority_frame(&self) -> bool {
        self.writes_in_flight + self.deferred.len() < FRAMES_PENDING_MAX + 16
    }

    /// Data bytes of frames accepted and not yet on the disk (writes in flight and deferred
    /// frames).
    pub fn bytes_pending(&self) -> u64 {
        self.bytes_pending
    }

    /// Bytes written to the disks so far (data, not zero ranges).
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written
    }

    /// True once completed or failed.
    pub fn is_finished(&self) -> bool {
        self.phase != Phase::Running
    }

    /// The next control message to send.
    pub fn poll_transmit(&mut self) -> Option<Control> {
        self.transmit.pop_front()
    }

    /// The next IO to perform.
    ///
    /// Once it returns `None` the driver has issued every IO, and the machine computes what
    /// can run while one of them does (the digest summaries behind a flush).
    pub fn poll_io(&mut self) -> Option<TargetIo> {
        let io = self.io.pop_front();
        if io.is_none() {
            self.compute_ready_summaries();
        }
        io
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<TargetEvent> {
        self.events.pop_front()
    }

    /// A decoded frame from data stream `stream`.
    pub fn handle_frame(&mut self, stream: u16, frame: Frame) {
        if self.is_finished() {
            return;
        }
        let Some(received) = self.frames_received.get_mut(stream as usize) else {
            return self.protocol_error(format!("frame on unannounced data stream {stream}"));
        };
        *received += 1;
        let seq = self.last_seq + 1;
        let pending = match frame {
            Frame::Data {
                disk,
                chunk,
                chunk_count,
                generation,
                data,
            } => PendingFrame {
                disk,
                chunk,
                chunk_count,
                generation,
                data: Some(data),
                seq,
            },
            Frame::Zero {
                disk,
                chunk,
                chunk_count,
                generation,
            } => PendingFrame {
                disk,
                chunk,
                chunk_count,
                generation,
                data: None,
                seq,
            },
            Frame::Control(_) => {
                return self.protocol_error("control frame on a data stream".into());
            }
        };
        if let Err(message) = self.validate(&pending) {
            return self.protocol_error(message);
        }
        self.last_seq = seq;
        self.outstanding.insert(seq, 0);
        self.bytes_accepted += pending.data_bytes();
        if self.frame_blocked(&pending) {
            self.bytes_pending += pending.data_bytes();
            self.deferred.push_back(pending);
        } else {
            self.start_frame(pending);
        }
        self.check_barrier();
    }

    /// The source finished data stream `stream`: no frame follows on it. A barrier that
    /// waits for more frames of a finished stream can never complete — a protocol error,
    /// not a wait.
    pub fn handle_stream_finished(&mut self, stream: u16) {
        if self.is_finished() {
            return;
        }
        let Some(finished) = self.streams_finished.get_mut(stream as usize) else {
            return self.protocol_error(format!("end of unannounced data stream {stream}"));
        };
        *finished = true;
        self.check_barrier();
    }

    /// A control message from the source.
    pub fn handle_control(&mut self, message: Control) {
        if self.is_finished() {
            return;
        }
        match message {
            Control::Barrier { id, frames } => {
                if frames.len() != self.frames_received.len() {
                    return self.protocol_error("malformed barrier".into());
                }
                if self.barriers.len() >= BARRIERS_PENDING_MAX {
                    return self.protocol_error("too many barriers waiting".into());
                }
                self.barriers.push_back((id, frames, None));
                self.check_barrier();
            }
            Control::DigestRequest {
                disk,
                block_bytes,
                block,
                block_count,
                read_back,
            } => {
                let Some(state) = self.disks.get(disk as usize) else {
                    return self.protocol_error(format!("digest request for unknown disk {disk}"));
                };
                let blocks = if block_bytes == 0 {
                    0
                } else {
                    state.size.div_ceil(block_bytes as u64)
                };
                if block_bytes == 0
                    || !(block_bytes as u64).is_multiple_of(self.chunk_bytes)
                    || block_bytes > 64 << 20
                    || block
                        .checked_add(block_count)
                        .is_none_or(|end| end > blocks)
                {
                    return self.protocol_error("digest request out of range".into());
                }
                if block_count == 0 {
                    return;
                }
                if !read_back {
                    if block_bytes as u64 != self.chunk_bytes {
                        return self.protocol_error("written digests are per chunk".into());
                    }
                    // Digests of what was written are in memory: answer at once.
                    let table = &self.disks[disk as usize].digest;
                    for start in (block..block + block_count).step_by(DIGESTS_PER_MESSAGE) {
                        let end = (start + DIGESTS_PER_MESSAGE as u64).min(block + block_count);
                        self.transmit.push_back(Control::Digests {
                            disk,
                            block: start,
                            digests: table[start as usize..end as usize].to_vec(),
                        });
                    }
                    return;
                }
                // One batch per message, issued in order; the next batch starts when this one
                // completes (see `handle_digests_done`).
                self.start_digest(disk, block_bytes, block, block + block_count);
            }
            Control::DigestSummaryRequest { disk } => {
                if self.disks.get(disk as usize).is_none() {
                    return self.protocol_error(format!("digest summary for unknown disk {disk}"));
                }
                // Answered once the barriers before it are done (FEATURE_ORDERED_SUMMARY): the
                // summary then covers every frame those barriers cover.
                match self.barriers.back() {
                    Some(&(barrier, _, _)) => {
                        if self.summaries_waiting.len() >= SUMMARIES_WAITING_MAX {
                            return self.protocol_error("too many digest summaries waiting".into());
                        }
                        self.summaries_waiting.push_back((barrier, disk, None));
                    }
                    None => self.answer_summary(disk),
                }
            }
            Control::Complete => {
                if self.writes_in_flight > 0 || !self.deferred.is_empty() {
                    return self.protocol_error("complete with writes outstanding".into());
                }
                let token = self.token();
                self.in_flight.insert(token, InFlight::MarkComplete);
                self.io.push_back(TargetIo::MarkComplete { token });
            }
            Control::MirrorRequest { token, ranges } => {
                if ranges.is_empty() || ranges.len() > MIRROR_RANGES_MAX {
                    return self.protocol_error("mirror request with no or too many ranges".into());
                }
                if self.mirror_pending.len() >= MIRROR_PENDING_MAX {
                    return self.protocol_error("too many mirror requests waiting".into());
                }
                for range in &ranges {
                    let chunks = self
                        .disks
                        .get(range.disk as usize)
                        .map(|d| d.generation.len() as u64);
                    let in_range = chunks.is_some_and(|chunks| {
                        range.chunk_count > 0
                            && range
                                .chunk
                                .checked_add(range.chunk_count as u64)
                                .is_some_and(|end| end <= chunks)
                    });
                    if !in_range || range.generation == 0 {
                        return self.protocol_error("mirror request out of range".into());
                    }
                }
                self.mirror_pending.push((token, ranges));
                self.mirroring_until = Some(self.bytes_accepted + MIRRORING_HOLDS_BYTES);
                self.check_mirrors();
            }
            Control::Error { code, message } => {
                self.fail(MigrationError::Peer(format!("{code:?}: {message}")), false);
            }
            other => self.protocol_error(format!("unexpected {}", message_name(&other))),
        }
    }

    /// An IO other than a digest completed.
    pub fn handle_io_done(&mut self, token: u64) {
        let Some(op) = self.in_flight.remove(&token) else {
            panic!("completion for unknown token {token}");
        };
        if self.is_finished() {
            return;
        }
        match op {
            InFlight::Write {
                disk,
                chunks,
                seq,
                bytes,
            } => {
                self.writes_in_flight -= 1;
                self.bytes_pending -= bytes;
                debug_assert!(
                    self.writes_in_flight > 0
                        || !self.deferred.is_empty()
                        || self.bytes_pending == 0,
                    "bytes pending with nothing pending"
                );
                self.write_finished(seq);
                let state = &mut self.disks[disk as usize];
                for chunk in chunks {
                    debug_assert!(state.busy[chunk as usize]);
                    state.busy[chunk as usize] = false;
                }
                self.run_deferred();
                self.check_mirrors();
                self.check_barrier();
            }
            InFlight::Flush => {
                self.flushes_pending -= 1;
                if self.flushes_pending == 0 {
                    let (id, _, _) = self
                        .barriers
                        .pop_front()
                        .expect("a flush belongs to a barrier");
                    self.transmit.push_back(Control::BarrierDone { id });
                    while let Some(&(barrier, disk, computed)) = self.summaries_waiting.front() {
                        if barrier != id {
                            break;
                        }
                        self.summaries_waiting.pop_front();
                        let digest = computed.unwrap_or_else(|| self.summary(disk));
                        self.transmit
                            .push_back(Control::DigestSummary { disk, digest });
                    }
                    self.check_barrier();
                }
            }
            InFlight::MarkComplete => {
                self.phase = Phase::Done;
                self.transmit.push_back(Control::CompleteDone);
                self.events.push_back(TargetEvent::Completed);
            }
            InFlight::Digest { .. } => panic!("digest completions go to handle_digests_done"),
        }
    }

    /// A digest IO completed with one digest per block.
    pub fn handle_digests_done(&mut self, token: u64, digests: Vec<u128>) {
        let Some(InFlight::Digest {
            disk,
            block,
            end,
            block_bytes,
        }) = self.in_flight.remove(&token)
        else {
            panic!("digest completion for unknown token {token}");
        };
        if self.is_finished() {
            return;
        }
        assert!(!digests.is_empty());
        let next = block + digests.len() as u64;
        assert!(next <= end);
        self.transmit.push_back(Control::Digests {
            disk,
            block,
            digests,
        });
        if next < end {
            self.start_digest(disk, block_bytes, next, end);
        }
    }

    /// An IO failed: the migration fails and the source is told.
    pub fn handle_io_failed(&mut self, token: u64, disk: u32, message: String) {
        self.in_flight.remove(&token);
        self.fail(MigrationError::Disk { disk, message }, true);
    }

    /// A data stream carried bytes that do not decode (bad CRC, malformed header, …): the
    /// source is told and the migration fails.
    pub fn handle_protocol_violation(&mut self, message: String) {
        self.protocol_error(message);
    }

    /// The connection failed underneath.
    pub fn handle_transport_failed(&mut self, message: String) {
        self.fail(MigrationError::Transport(message), false);
    }

    fn token(&mut self) -> u64 {
        let token = self.next_token;
        self.next_token += 1;
        token
    }

    fn start_digest(&mut self, disk: u32, block_bytes: u32, block: u64, end: u64) {
        let count = (end - block).min(DIGESTS_PER_MESSAGE as u64);
        let token = self.token();
        self.in_flight.insert(
            token,
            InFlight::Digest {
                disk,
                block,
                end,
                block_bytes,
            },
        );
        self.io.push_back(TargetIo::Digest {
            token,
            disk,
            block_bytes,
            block,
            block_count: count,
        });
    }

    /// I5: the frame's range lies inside its disk and its length matches the range.
    fn validate(&self, frame: &PendingFrame) -> Result<(), String> {
        let Some(disk) = self.disks.get(frame.disk as usize) else {
            return Err(format!("frame for unknown disk {}", frame.disk));
        };
        if frame.generation == 0 {
            return Err("frame with generation 0".into());
        }
        let chunks = disk.generation.len() as u64;
        let end_chunk = frame.chunk.checked_add(frame.chunk_count as u64);
        if frame.chunk_count == 0 || end_chunk.is_none_or(|end| end > chunks) {
            return Err(format!(
                "chunks {}+{} outside disk {} ({} chunks)",
                frame.chunk, frame.chunk_count, frame.disk, chunks
            ));
        }
        if let Some(data) = &frame.data {
            let start = frame.chunk * self.chunk_bytes;
            let end = ((frame.chunk + frame.chunk_count as u64) * self.chunk_bytes).min(disk.size);
            if data.len() as u64 != end - start {
                return Err(format!(
                    "data frame for bytes {start}..{end} carries {} bytes",
                    data.len()
                ));
            }
        }
        Ok(())
    }

    fn frame_blocked(&self, frame: &PendingFrame) -> bool {
        let disk = &self.disks[frame.disk as usize];
        let range = frame.chunk as usize..(frame.chunk + frame.chunk_count as u64) as usize;
        disk.busy[range].iter().any(|busy| *busy)
    }

    /// Issues the writes of a frame whose chunks are all free: one per run of chunks whose
    /// stored generation is older than the frame's.
    fn start_frame(&mut self, frame: PendingFrame) {
        let chunk_bytes = self.chunk_bytes;
        let mut writes = 0;
        let end = frame.chunk + frame.chunk_count as u64;
        let mut chunk = frame.chunk;
        while chunk < end {
            let newer = |c: u64, disks: &[DiskState]| {
                disks[frame.disk as usize].generation[c as usize] < frame.generation
            };
            if !newer(chunk, &self.disks) {
                chunk += 1;
                continue;
            }
            let run_start = chunk;
            while chunk < end && newer(chunk, &self.disks) {
                chunk += 1;
            }
            let disk = &mut self.disks[frame.disk as usize];
            let offset = run_start * chunk_bytes;
            let byte_end = (chunk * chunk_bytes).min(disk.size);
            let frame_start = frame.chunk * chunk_bytes;
            for c in run_start..chunk {
                debug_assert!(!disk.busy[c as usize]);
                disk.generation[c as usize] = frame.generation;
                disk.busy[c as usize] = true;
                let start = c * chunk_bytes;
                let end = (start + chunk_bytes).min(disk.size);
                disk.digest[c as usize] = match &frame.data {
                    Some(data) => {
                        digest(&data[(start - frame_start) as usize..(end - frame_start) as usize])
                    }
                    None => zero_digest((end - start) as usize),
                };
            }
            let token = self.token();
            self.in_flight.insert(
                token,
                InFlight::Write {
                    disk: frame.disk,
                    chunks: run_start..chunk,
                    seq: frame.seq,
                    bytes: if frame.data.is_some() {
                        byte_end - offset
                    } else {
                        0
                    },
                },
            );
            self.writes_in_flight += 1;
            writes += 1;
            match &frame.data {
                Some(data) => {
                    let slice = data
                        .slice((offset - frame_start) as usize..(byte_end - frame_start) as usize);
                    self.bytes_written += slice.len() as u64;
                    self.bytes_pending += slice.len() as u64;
                    self.io.push_back(TargetIo::Write {
                        token,
                        disk: frame.disk,
                        offset,
                        data: slice,
                    });
                }
                None => self.io.push_back(TargetIo::WriteZeroes {
                    token,
                    disk: frame.disk,
                    offset,
                    len: byte_end - offset,
                }),
            }
        }
        if writes == 0 {
            // Every chunk already holds a newer generation: nothing to wait for.
            self.outstanding.remove(&frame.seq);
        } else {
            *self
                .outstanding
                .get_mut(&frame.seq)
                .expect("a started frame is outstanding") = writes;
        }
    }

    /// One write of frame `seq` completed.
    fn write_finished(&mut self, seq: u64) {
        let left = self
            .outstanding
            .get_mut(&seq)
            .expect("a write's frame is outstanding");
        debug_assert!(*left > 0);
        *left -= 1;
        if *left == 0 {
            self.outstanding.remove(&seq);
        }
    }

    /// Acknowledges the mirror requests whose chunks all hold a completed write of at least
    /// the requested generation (a newer one carries the mirrored bytes too: it was read
    /// later at the source).
    fn check_mirrors(&mut self) {
        if self.mirror_pending.is_empty() {
            return;
        }
        let disks = &self.disks;
        let written = |range: &MirrorRange| {
            let disk = &disks[range.disk as usize];
            (range.chunk..range.chunk + range.chunk_count as u64)
                .all(|c| disk.generation[c as usize] >= range.generation && !disk.busy[c as usize])
        };
        let mut tokens = Vec::new();
        self.mirror_pending.retain(|(token, ranges)| {
            let done = ranges.iter().all(written);
            if done {
                tokens.push(*token);
            }
            !done
        });
        if !tokens.is_empty() {
            self.transmit.push_back(Control::MirrorAck { tokens });
        }
    }

    /// Starts deferred frames whose chunks became free, oldest first. A frame may be started
    /// only if no older deferred frame overlaps it, so writes of a chunk keep arrival order.
    fn run_deferred(&mut self) {
        let mut index = 0;
        while index < self.deferred.len() {
            let frame = &self.deferred[index];
            let overlaps_older = self.deferred.iter().take(index).any(|older| {
                older.disk == frame.disk
                    && older.chunk < frame.chunk + frame.chunk_count as u64
                    && frame.chunk < older.chunk + older.chunk_count as u64
            });
            if overlaps_older || self.frame_blocked(frame) {
                index += 1;
                continue;
            }
            let frame = self.deferred.remove(index).expect("index in bounds");
            self.bytes_pending -= frame.data_bytes();
            self.start_frame(frame);
        }
    }

    /// Sends the summary of `disk`'s table of written digests (`disk` was checked).
    fn answer_summary(&mut self, disk: u32) {
        let digest = self.summary(disk);
        self.transmit
            .push_back(Control::DigestSummary { disk, digest });
    }

    /// The summary of `disk`'s table of written digests (`disk` was checked).
    fn summary(&self, disk: u32) -> u128 {
        summary(self.disks[disk as usize].digest.iter().copied())
    }

    /// Computes the summaries that wait for the front barrier once its flush is issued (see
    /// `summaries_waiting`; called when the driver took every IO, the flush included).
    fn compute_ready_summaries(&mut self) {
        if self.flushes_pending == 0 || !self.io.is_empty() {
            return;
        }
        let Some(&(front, _, _)) = self.barriers.front() else {
            return;
        };
        for index in 0..self.summaries_waiting.len() {
            let (barrier, disk, computed) = self.summaries_waiting[index];
            if barrier != front {
                break;
            }
            if computed.is_none() {
                self.summaries_waiting[index].2 = Some(self.summary(disk));
            }
        }
    }

    /// Serves the front barrier: once every frame it counts arrived, it covers the frames
    /// received so far; once those are all on the disk, the disks are flushed.
    fn check_barrier(&mut self) {
        if self.flushes_pending > 0 {
            return;
        }
        let last_seq = self.last_seq;
        let Some((_, frames, covers)) = self.barriers.front_mut() else {
            return;
        };
        if covers.is_none() {
            let mut waiting = false;
            let mut impossible = None;
            for ((received, wanted), finished) in self
                .frames_received
                .iter()
                .zip(frames.iter())
                .zip(&self.streams_finished)
            {
                if received < wanted {
                    waiting = true;
                    if *finished {
                        impossible = Some(format!(
                            "barrier waits for {wanted} frames of a stream that ended after {received}"
                        ));
                    }
                }
            }
            if let Some(message) = impossible {
                return self.protocol_error(message);
            }
            if waiting {
                return;
            }
            *covers = Some(last_seq);
        }
        let covers = covers.expect("set above");
        if self
            .outstanding
            .first_key_value()
            .is_some_and(|(&seq, _)| seq <= covers)
        {
            return;
        }
        for disk in 0..self.disks.len() as u32 {
            let token = self.token();
            self.in_flight.insert(token, InFlight::Flush);
            self.flushes_pending += 1;
            self.io.push_back(TargetIo::Flush { token, disk });
        }
    }

    fn protocol_error(&mut self, message: String) {
        self.fail(MigrationError::Protocol(message), true);
    }

    fn fail(&mut self, error: MigrationError, tell_peer: bool) {
        if self.is_finished() {
            return;
        }
        self.phase = Phase::Failed;
        // IO never handed to the driver will never complete: forget it, so that
        // `io_in_flight` counts only what really runs.
        for io in self.io.drain(..) {
            let token = match io {
                TargetIo::Write { token, .. }
                | TargetIo::WriteZeroes { token, .. }
                | TargetIo::Flush { token, .. }
                | TargetIo::Digest { token, .. }
                | TargetIo::MarkComplete { token } => token,
            };
            self.in_flight.remove(&token);
        }
        self.deferred.clear();
        self.bytes_pending = 0;
        self.transmit.clear();
        if tell_peer {
            let code = match &error {
                MigrationError::Disk { .. } => ErrorCode::Disk,
                MigrationError::Incompatible(_) => ErrorCode::Incompatible,
                _ => ErrorCode::Protocol,
            };
            self.transmit.push_back(Control::Error {
                code,
                message: error.to_string(),
            });
        }
        self.events.push_back(TargetEvent::Failed(error));
    }
}
