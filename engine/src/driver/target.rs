//! The target driver: accepts one migration on a QUIC endpoint and runs a
//! [`TargetMigration`] over real image files.
//!
//! While a migration runs, each image has a marker file next to it
//! (`IMAGE.tern-incomplete`, naming the session); it is removed only after the source
//! confirmed a verified copy and the image was flushed. An image with a marker must never
//! be used (invariant I4).
//!
//! Resumption: when a connection is lost (and [`TargetHooks::resume_window`] allows), the
//! driver first waits for every IO of the dead connection to complete, then keeps the
//! session's tables and waits for the source to come back. A restarted target recognises
//! its session from the marker instead (without the tables). Either way the images are kept
//! and the source resends what this target never confirmed durable.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tern_blockdev::{BlockDevice, IoBuf, IoOp, OpenOptions};
use tern_transport::Hello;
use tern_transport::quinn;
use tern_transport::{Control, ErrorCode, Frame, FrameReader, FrameWriter};
use tokio::sync::mpsc;

use crate::digest::{digest, zero_digest};
use crate::error::MigrationError;
use crate::target::{Kept, SessionTables, TargetEvent, TargetIo, TargetMigration};

/// How long a connected source may take to send its Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames buffered between the stream readers and the state machine.
const FRAME_QUEUE: usize = 16;
/// Reads in flight while computing digests.
const DIGEST_READS_IN_FLIGHT: usize = 8;

/// The outcome of a target run.
#[derive(Clone, Debug)]
pub struct TargetReport {
    /// The images, now complete.
    pub images: Vec<PathBuf>,
    /// Bytes written as data.
    pub bytes_written: u64,
    /// Time from the Hello to completion.
    pub duration: Duration,
}

/// The marker that says an image is not (yet) a complete copy.
pub fn incomplete_marker(image: &Path) -> PathBuf {
    let mut name = image.as_os_str().to_owned();
    name.push(".tern-incomplete");
    PathBuf::from(name)
}

/// The marker's text for a session: a restarted target reads the session id back.
fn marker_text(session_id: &[u8; 16]) -> String {
    let hex: String = session_id.iter().map(|b| format!("{b:02x}")).collect();
    format!("tern migration in progress\nsession {hex}\n")
}

/// Writes the marker and makes it durable before any byte of the image changes.
fn write_marker(image: &Path, session_id: &[u8; 16]) -> std::io::Result<()> {
    use std::io::Write;
    let marker = incomplete_marker(image);
    let mut file = std::fs::File::create(&marker)?;
    file.write_all(marker_text(session_id).as_bytes())?;
    file.sync_all()?;
    sync_parent(image)
}

fn sync_parent(image: &Path) -> std::io::Result<()> {
    let dir = image
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::File::open(dir)?.sync_all()
}

/// True when every image has a marker naming this session (a restarted target resuming).
fn markers_name_session(images: &[PathBuf], session_id: &[u8; 16]) -> bool {
    let text = marker_text(session_id);
    images.iter().all(|image| {
        std::fs::read_to_string(incomplete_marker(image)).is_ok_and(|found| found == text)
    })
}

enum Input {
    IoDone(u64),
    IoFailed {
        token: u64,
        disk: u32,
        message: String,
    },
    Digests {
        token: u64,
        digests: Vec<u128>,
    },
    Control(Control),
    ProtocolViolation(String),
    TransportFailed(String),
}

/// Runs once the images are durably marked complete (the migration committed), before the
/// source is told: whatever it opens (an NBD export) is ready by the time the source's
/// `commit` returns.
pub type OnComplete = Arc<dyn Fn() + Send + Sync>;

/// Runs once the source's handshake was accepted, with the images' sizes in order.
pub type OnAccepted = Arc<dyn Fn(&[u64]) + Send + Sync>;

/// Accepts connections on `endpoint` until one migration into `images` completes or fails.
///
/// Connections refused by TLS (a peer with another fingerprint) are logged and the endpoint
/// keeps listening; the refused peer never gets to send a frame.
pub async fn serve_one(
    endpoint: &quinn::Endpoint,
    images: &[PathBuf],
    open: &OpenOptions,
) -> Result<TargetReport, MigrationError> {
    serve_one_with(endpoint, images, open, TargetHooks::default()).await
}

/// Callbacks and policy of a target run (a daemon's NBD export follows the migration with
/// the callbacks).
#[derive(Clone, Default)]
pub struct TargetHooks {
    /// The source's handshake was accepted: the images exist, with these sizes.
    pub on_accepted: Option<OnAccepted>,
    /// The images are durably complete (see [`OnComplete`]).
    pub on_complete: Option<OnComplete>,
    /// After a lost link, wait this long for the source to resume the session before
    /// failing; `None` fails at once.
    pub resume_window: Option<Duration>,
}

impl std::fmt::Debug for TargetHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetHooks")
            .field("on_accepted", &self.on_accepted.is_some())
            .field("on_complete", &self.on_complete.is_some())
            .field("resume_window", &self.resume_window)
            .finish()
    }
}

/// [`serve_one`] with hooks (see [`TargetHooks`]).
pub async fn serve_one_with(
    endpoint: &quinn::Endpoint,
    images: &[PathBuf],
    open: &OpenOptions,
    hooks: TargetHooks,
) -> Result<TargetReport, MigrationError> {
    // The session of a lost link, and until when its source may come back.
    let mut kept: Option<(KeptSession, Instant, MigrationError)> = None;
    loop {
        let incoming = match &kept {
            Some((_, deadline, error)) => {
                match tokio::time::timeout_at((*deadline).into(), endpoint.accept()).await {
                    Ok(incoming) => incoming,
                    Err(_) => {
                        return Err(MigrationError::Transport(format!(
                            "{error}; the source did not resume within the resume window"
                        )));
                    }
                }
            }
            None => endpoint.accept().await,
        };
        let Some(incoming) = incoming else {
            return Err(MigrationError::Transport("endpoint closed".into()));
        };
        let remote = incoming.remote_address();
        let connection = match incoming.await {
            Ok(connection) => connection,
            Err(e) => {
                tracing::warn!(%remote, error = %e, "refused connection");
                continue;
            }
        };
        tracing::info!(%remote, "source connected");
        let previous = kept.take().map(|(session, _, _)| session);
        match run_connection(&connection, images, open, &hooks, previous).await {
            Ok(report) => return Ok(report),
            Err((error, Some(session))) if hooks.resume_window.is_some() => {
                let window = hooks.resume_window.expect("checked");
                tracing::warn!(
                    %error,
                    window_s = window.as_secs_f64(),
                    "link lost; keeping the session for the source to resume"
                );
                kept = Some((session, Instant::now() + window, error));
            }
            Err((error, _)) => return Err(error),
        }
    }
}

/// A session kept across a lost link.
struct KeptSession {
    session_id: [u8; 16],
    tables: SessionTables,
}

/// Runs one migration on an established connection.
pub async fn run_target(
    connection: &quinn::Connection,
    images: &[PathBuf],
    open: &OpenOptions,
) -> Result<TargetReport, MigrationError> {
    run_target_with(connection, images, open, TargetHooks::default()).await
}

/// [`run_target`] with hooks (see [`TargetHooks`]; the resume window needs
/// [`serve_one_with`], which can accept the next connection).
pub async fn run_target_with(
    connection: &quinn::Connection,
    images: &[PathBuf],
    open: &OpenOptions,
    hooks: TargetHooks,
) -> Result<TargetReport, MigrationError> {
    run_connection(connection, images, open, &hooks, None)
        .await
        .map_err(|(error, _)| error)
}

/// What the driver kept, for this Hello.
fn kept_for(hello: &Hello, images: &[PathBuf], previous: Option<KeptSession>) -> Kept {
    match previous {
        Some(session) if hello.resume && session.session_id == hello.session_id => {
            Kept::Session(session.tables)
        }
        _ if hello.resume && markers_name_session(images, &hello.session_id) => Kept::Images,
        _ => Kept::Nothing,
    }
}

/// Refuses a source whose allocated bytes cannot fit in the free space (plus what the
/// images already hold), before any byte is written.
fn check_space(images: &[PathBuf], hello: &Hello) -> Result<(), (u32, String)> {
    for (index, (image, disk)) in images.iter().zip(&hello.disks).enumerate() {
        let dir = image
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let Ok(free) = tern_blockdev::free_bytes(dir) else {
            continue; // unknown: the writes themselves will say
        };
        let held = std::fs::metadata(image).map_or(0, |m| {
            use std::os::unix::fs::MetadataExt;
            m.blocks() * 512
        });
        if free.saturating_add(held) < disk.allocated {
            return Err((
                index as u32,
                format!(
                    "{} cannot hold the source's {} allocated bytes: {} bytes free on its file system",
                    image.display(),
                    disk.allocated,
                    free
                ),
            ));
        }
    }
    Ok(())
}

/// Runs one connection. On failure, also returns the session tables when the failure was
/// the link's (so a resumed connection may continue them), after every IO of this
/// connection completed.
async fn run_connection(
    connection: &quinn::Connection,
    images: &[PathBuf],
    open: &OpenOptions,
    hooks: &TargetHooks,
    previous: Option<KeptSession>,
) -> Result<TargetReport, (MigrationError, Option<KeptSession>)> {
    let on_accepted = hooks.on_accepted.clone();
    let on_complete = hooks.on_complete.clone();
    let started = Instant::now();
    let transport = |e: &dyn std::fmt::Display| MigrationError::Transport(e.to_string());
    // Until the Hello names the kept session, failures hand it back untouched: a stray or
    // hostile connection must not cost the real source its resumption.
    let (mut control, control_reader, hello) = match read_hello(connection).await {
        Ok(opened) => opened,
        Err(error) => return Err((error, previous)),
    };
    let refuse = async |control: &mut FrameWriter, code, error: MigrationError| {
        let message = Control::Error {
            code,
            message: error.to_string(),
        };
        let _ = control.send(message.encode()).await;
        control.finish();
        close_with_error(connection, &error);
        error
    };
    if hello.disks.len() != images.len() {
        let error = MigrationError::Incompatible(format!(
            "source sends {} disks, target serves {} images",
            hello.disks.len(),
            images.len()
        ));
        let error = refuse(&mut control, ErrorCode::ImageMismatch, error).await;
        return Err((error, previous));
    }
    let kept = kept_for(&hello, images, previous);
    if matches!(kept, Kept::Nothing)
        && let Err((disk, message)) = check_space(images, &hello)
    {
        let error = refuse(
            &mut control,
            ErrorCode::Disk,
            MigrationError::Disk { disk, message },
        )
        .await;
        return Err((error, None));
    }
    let mut devices = Vec::new();
    for (index, (image, info)) in images.iter().zip(&hello.disks).enumerate() {
        if let Err(e) = write_marker(image, &hello.session_id) {
            let error = MigrationError::Disk {
                disk: index as u32,
                message: format!("cannot create {}: {e}", incomplete_marker(image).display()),
            };
            return Err((refuse(&mut control, ErrorCode::Disk, error).await, None));
        }
        let options = OpenOptions {
            create: Some(info.size),
            ..open.clone()
        };
        match BlockDevice::open(image, &options) {
            Ok(device) => {
                tracing::info!(image = %image.display(), backend = %device.kind(), direct = device.direct(), "target image open");
                devices.push(device);
            }
            Err(e) => {
                let error = MigrationError::Disk {
                    disk: index as u32,
                    message: e.to_string(),
                };
                return Err((
                    refuse(&mut control, ErrorCode::ImageMismatch, error).await,
                    None,
                ));
            }
        }
    }
    let sizes: Vec<u64> = devices.iter().map(BlockDevice::size).collect();
    let resuming = !matches!(kept, Kept::Nothing);
    let (mut machine, welcome) = match TargetMigration::accept(&hello, &sizes, kept) {
        Ok(accepted) => accepted,
        Err(error) => {
            return Err((
                refuse(&mut control, ErrorCode::Incompatible, error).await,
                None,
            ));
        }
    };
    if hello.resume {
        tracing::info!(resumed = resuming, "source resumes its session");
    }
    control
        .send(welcome.encode())
        .await
        .map_err(|e| (transport(&e), None))?;
    if let Some(hook) = &on_accepted {
        hook(&sizes);
    }

    let (input_tx, mut input_rx) = mpsc::unbounded_channel::<Input>();
    let (frame_tx, mut frame_rx) = mpsc::channel::<(u16, Option<Frame>)>(FRAME_QUEUE);
    // The last stream of a live migration carries mirrored guest writes: its frames get their
    // own queue, taken first, so a waiting guest write never queues behind bulk frames.
    let (priority_tx, mut priority_rx) = mpsc::channel::<(u16, Option<Frame>)>(FRAME_QUEUE);
    tokio::spawn(super::read_control(
        connection.clone(),
        control_reader,
        input_tx.clone(),
        Input::Control,
        Input::TransportFailed,
    ));
    tokio::spawn(accept_data_streams(
        connection.clone(),
        hello.data_streams,
        frame_tx,
        priority_tx,
        input_tx.clone(),
    ));

    let mut frames_open = true;
    let mut priority_open = true;
    let result = loop {
        while let Some(message) = machine.poll_transmit() {
            if let Control::MirrorAck { tokens } = &message {
                tracing::debug!(?tokens, "mirror acknowledgement sent");
            }
            if let Err(e) = control.send(message.encode()).await {
                machine.handle_transport_failed(e.to_string());
            }
        }
        while let Some(io) = machine.poll_io() {
            perform(&devices, images, io, &input_tx, &on_complete);
        }
        let mut finished = None;
        while let Some(event) = machine.poll_event() {
            finished = Some(match event {
                TargetEvent::Completed => Ok(()),
                TargetEvent::Failed(error) => Err(error),
            });
        }
        if let Some(result) = finished {
            break result;
        }
        tokio::select! {
            biased;
            frame = priority_rx.recv(), if priority_open && machine.can_accept_priority_frame() => match frame {
                Some((stream, Some(frame))) => machine.handle_frame(stream, frame),
                Some((stream, None)) => machine.handle_stream_finished(stream),
                None => priority_open = false,
            },
            input = input_rx.recv() => match input.expect("the driver holds a sender") {
                Input::IoDone(token) => machine.handle_io_done(token),
                Input::IoFailed { token, disk, message } => machine.handle_io_failed(token, disk, message),
                Input::Digests { token, digests } => machine.handle_digests_done(token, digests),
                Input::Control(message) => {
                tracing::debug!(?message, "control received");
                machine.handle_control(message)
            }
                Input::ProtocolViolation(message) => machine.handle_protocol_violation(message),
                Input::TransportFailed(message) => machine.handle_transport_failed(message),
            },
            frame = frame_rx.recv(), if frames_open && machine.can_accept_frame() => match frame {
                Some((stream, Some(frame))) => machine.handle_frame(stream, frame),
                Some((stream, None)) => machine.handle_stream_finished(stream),
                // Every data stream ended. That is normal once the source finished; if frames
                // are missing, the barrier never completes and the control stream or a
                // reader's error says why.
                None => frames_open = false,
            },
        }
    };
    while let Some(message) = machine.poll_transmit() {
        let _ = control.send(message.encode()).await;
    }
    control.finish();
    if let Err(error) = result {
        if matches!(error, MigrationError::Transport(_)) {
            // Our side of a lost link: a source that still hears us must not take this for
            // a verdict (it resumes).
            connection.close(CLOSE_LINK_LOST.into(), b"link lost");
        } else {
            close_with_error(connection, &error);
        }
        // Nothing this connection issued may still run once another connection of the
        // session writes: a late write would race a newer one of the same chunk (I3).
        drop(frame_rx);
        drop(priority_rx);
        while machine.io_in_flight() > 0 {
            match input_rx.recv().await.expect("the driver holds a sender") {
                Input::IoDone(token) => machine.handle_io_done(token),
                Input::IoFailed {
                    token,
                    disk,
                    message,
                } => machine.handle_io_failed(token, disk, message),
                Input::Digests { token, digests } => machine.handle_digests_done(token, digests),
                _ => {}
            }
        }
        let session = matches!(error, MigrationError::Transport(_)).then(|| KeptSession {
            session_id: hello.session_id,
            tables: machine.into_session(),
        });
        return Err((error, session));
    }
    // Let the source read CompleteDone before the connection goes away; it closes first.
    let _ = tokio::time::timeout(Duration::from_secs(5), connection.closed()).await;
    Ok(TargetReport {
        images: images.to_vec(),
        bytes_written: machine.bytes_written(),
        duration: started.elapsed(),
    })
}

/// Accepts the control stream and reads the source's Hello.
async fn read_hello(
    connection: &quinn::Connection,
) -> Result<(FrameWriter, FrameReader, Hello), MigrationError> {
    let transport = |e: &dyn std::fmt::Display| MigrationError::Transport(e.to_string());
    let (control_send, control_recv) = tokio::time::timeout(HELLO_TIMEOUT, connection.accept_bi())
        .await
        .map_err(|_| MigrationError::Protocol("no control stream within 10 s".into()))?
        .map_err(|e| transport(&e))?;
    let control = FrameWriter::new(control_send);
    let mut control_reader = FrameReader::new(control_recv);
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, control_reader.next()).await {
        Ok(Ok(Some((Frame::Control(body), _)))) => match Control::decode(&body) {
            Ok(Control::Hello(hello)) => hello,
            Ok(_) => {
                return Err(MigrationError::Protocol(
                    "first message is not Hello".into(),
                ));
            }
            Err(e) => return Err(MigrationError::Protocol(e.to_string())),
        },
        Ok(Ok(_)) => return Err(MigrationError::Protocol("expected a Hello frame".into())),
        Ok(Err(e)) => return Err(transport(&e)),
        Err(_) => return Err(MigrationError::Protocol("no Hello within 10 s".into())),
    };
    Ok((control, control_reader, hello))
}

/// Closes the connection with the error as the reason, so the source reports our words
/// even if the error frame on the control stream is lost with the connection.
pub(crate) fn close_with_error(connection: &quinn::Connection, error: &MigrationError) {
    let reason = error.to_string();
    let reason = &reason.as_bytes()[..reason.len().min(512)];
    connection.close(CLOSE_FAILED.into(), reason);
}

/// Application close code of a migration that failed (0 is a normal end): the peer's
/// verdict, never resumed.
pub const CLOSE_FAILED: u32 = 1;
/// Application close code of a side that lost its link and keeps the session: resumable.
pub const CLOSE_LINK_LOST: u32 = 2;

fn perform(
    devices: &[BlockDevice],
    images: &[PathBuf],
    io: TargetIo,
    tx: &mpsc::UnboundedSender<Input>,
    on_complete: &Option<OnComplete>,
) {
    let done = |token: u64, disk: u32| {
        let tx = tx.clone();
        Box::new(move |completion: tern_blockdev::Completion| {
            let input = match completion.result {
                Ok(_) => Input::IoDone(token),
                Err(e) => Input::IoFailed {
                    token,
                    disk,
                    message: e.to_string(),
                },
            };
            let _ = tx.send(input);
        })
    };
    match io {
        TargetIo::Write {
            token,
            disk,
            offset,
            data,
        } => {
            let device = &devices[disk as usize];
            // The transport read the payload into an aligned buffer (`read_frames`), so this
            // is no copy: O_DIRECT writes straight from it.
            let buf = IoBuf::from_bytes(data);
            device.submit(IoOp::Write { offset, buf }, done(token, disk));
        }
        TargetIo::WriteZeroes {
            token,
            disk,
            offset,
            len,
        } => devices[disk as usize].submit(IoOp::WriteZeroes { offset, len }, done(token, disk)),
        TargetIo::Flush { token, disk } => {
            devices[disk as usize].submit(IoOp::Flush, done(token, disk));
        }
        TargetIo::Digest {
            token,
            disk,
            block_bytes,
            block,
            block_count,
        } => {
            let device = devices[disk as usize].clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let input = match digest_blocks(&device, block_bytes, block, block_count).await {
                    Ok(digests) => Input::Digests { token, digests },
                    Err(message) => Input::IoFailed {
                        token,
                        disk,
                        message,
                    },
                };
                let _ = tx.send(input);
            });
        }
        TargetIo::MarkComplete { token } => {
            let images = images.to_vec();
            let tx = tx.clone();
            let on_complete = on_complete.clone();
            tokio::task::spawn_blocking(move || {
                let input = match mark_complete(&images) {
                    Ok(()) => {
                        if let Some(hook) = on_complete {
                            hook();
                        }
                        Input::IoDone(token)
                    }
                    Err(message) => Input::IoFailed {
                        token,
                        disk: 0,
                        message,
                    },
                };
                let _ = tx.send(input);
            });
        }
    }
}

/// Removes the incomplete markers and makes the removal durable.
fn mark_complete(images: &[PathBuf]) -> Result<(), String> {
    for image in images {
        let marker = incomplete_marker(image);
        std::fs::remove_file(&marker).map_err(|e| format!("remove {}: {e}", marker.display()))?;
        let dir = image
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| format!("sync {}: {e}", dir.display()))?;
    }
    Ok(())
}

/// Bytes read at once while digesting: whole spans of small blocks keep the disk streaming.
const DIGEST_READ_BYTES: u64 = 1 << 20;

/// Digests of `count` blocks from `block`, read back from the disk. Blocks without an
/// allocated byte are zeros and are not read.
async fn digest_blocks(
    device: &BlockDevice,
    block_bytes: u32,
    block: u64,
    count: u64,
) -> Result<Vec<u128>, String> {
    let extents = device.allocated_extents().map_err(|e| e.to_string())?;
    let size = device.size();
    let block_bytes = block_bytes as u64;
    let blocks_per_read = (DIGEST_READ_BYTES / block_bytes).max(1);
    let mut digests = vec![0u128; count as usize];
    let mut reads = tokio::task::JoinSet::new();
    let mut extent = 0;
    let mut first = 0;
    while first < count {
        let n = blocks_per_read.min(count - first);
        let start = (block + first) * block_bytes;
        let end = (start + n * block_bytes).min(size);
        while extent < extents.len() && extents[extent].end <= start {
            extent += 1;
        }
        let allocated = extents.get(extent).is_some_and(|e| e.start < end);
        if !allocated {
            for i in 0..n {
                let block_start = start + i * block_bytes;
                let len = (block_start + block_bytes).min(size) - block_start;
                digests[(first + i) as usize] = zero_digest(len as usize);
            }
            first += n;
            continue;
        }
        if reads.len() >= DIGEST_READS_IN_FLIGHT
            && let Some(done) = reads.join_next().await
        {
            let (index, span): (u64, Vec<u128>) = done.map_err(|e| e.to_string())??;
            digests[index as usize..index as usize + span.len()].copy_from_slice(&span);
        }
        let device = device.clone();
        let index = first;
        reads.spawn(async move {
            let buf: IoBuf = device
                .read(start, (end - start) as usize)
                .await
                .map_err(|e| e.to_string())?;
            let span: Vec<u128> = buf.chunks(block_bytes as usize).map(digest).collect();
            Ok::<_, String>((index, span))
        });
        first += n;
    }
    while let Some(done) = reads.join_next().await {
        let (index, span) = done.map_err(|e| e.to_string())??;
        digests[index as usize..index as usize + span.len()].copy_from_slice(&span);
    }
    Ok(digests)
}

/// Accepts the announced data streams; each gets a reader task tagged with its index (the
/// order in which the source opened them: QUIC hands out stream ids in order).
async fn accept_data_streams(
    connection: quinn::Connection,
    streams: u16,
    frames: mpsc::Sender<(u16, Option<Frame>)>,
    priority: mpsc::Sender<(u16, Option<Frame>)>,
    failed: mpsc::UnboundedSender<Input>,
) {
    let mut priority = Some(priority);
    for index in 0..streams {
        let stream = match connection.accept_uni().await {
            Ok(stream) => stream,
            Err(e) => {
                let _ = failed.send(Input::TransportFailed(e.to_string()));
                return;
            }
        };
        let frames = if index + 1 == streams {
            priority.take().expect("one last stream")
        } else {
            frames.clone()
        };
        let failed = failed.clone();
        tokio::spawn(async move {
            let mut reader = FrameReader::with_buffers(stream, IoBuf::for_overwrite);
            loop {
                match reader.next().await {
                    Ok(Some((frame, _))) => {
                        if frames.send((index, Some(frame))).await.is_err() {
                            return;
                        }
                    }
                    // The source finished the stream: after its last frame, in order.
                    Ok(None) => {
                        let _ = frames.send((index, None)).await;
                        return;
                    }
                    Err(e) => {
                        let message = format!("data stream {index}: {e}");
                        let input = match e {
                            tern_transport::TransportError::Decode(_) => {
                                Input::ProtocolViolation(message)
                            }
                            _ => Input::TransportFailed(message),
                        };
                        let _ = failed.send(input);
                        return;
                    }
                }
            }
        });
    }
}
