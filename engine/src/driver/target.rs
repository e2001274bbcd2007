//! The target driver: accepts one migration on a QUIC endpoint and runs a
//! [`TargetMigration`] over real image files.
//!
//! While a migration runs, each image has a marker file next to it
//! (`IMAGE.tern-incomplete`); it is removed only after the source confirmed a verified copy
//! and the image was flushed. An image with a marker must never be used (invariant I4).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tern_blockdev::{BlockDevice, IoBuf, IoOp, OpenOptions};
use tern_transport::quinn;
use tern_transport::{Control, ErrorCode, Frame, FrameReader, FrameWriter};
use tokio::sync::mpsc;

use crate::digest::{digest, zero_digest};
use crate::error::MigrationError;
use crate::target::{TargetEvent, TargetIo, TargetMigration};

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

/// Callbacks of a target run (a daemon's NBD export follows the migration with them).
#[derive(Clone, Default)]
pub struct TargetHooks {
    /// The source's handshake was accepted: the images exist, with these sizes.
    pub on_accepted: Option<OnAccepted>,
    /// The images are durably complete (see [`OnComplete`]).
    pub on_complete: Option<OnComplete>,
}

impl std::fmt::Debug for TargetHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetHooks")
            .field("on_accepted", &self.on_accepted.is_some())
            .field("on_complete", &self.on_complete.is_some())
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
    loop {
        let Some(incoming) = endpoint.accept().await else {
            return Err(MigrationError::Transport("endpoint closed".into()));
        };
        let remote = incoming.remote_address();
        match incoming.await {
            Ok(connection) => {
                tracing::info!(%remote, "source connected");
                return run_target_with(&connection, images, open, hooks).await;
            }
            Err(e) => tracing::warn!(%remote, error = %e, "refused connection"),
        }
    }
}

/// Runs one migration on an established connection.
pub async fn run_target(
    connection: &quinn::Connection,
    images: &[PathBuf],
    open: &OpenOptions,
) -> Result<TargetReport, MigrationError> {
    run_target_with(connection, images, open, TargetHooks::default()).await
}

/// [`run_target`] with hooks (see [`TargetHooks`]).
pub async fn run_target_with(
    connection: &quinn::Connection,
    images: &[PathBuf],
    open: &OpenOptions,
    hooks: TargetHooks,
) -> Result<TargetReport, MigrationError> {
    let TargetHooks {
        on_accepted,
        on_complete,
    } = hooks;
    let started = Instant::now();
    let transport = |e: &dyn std::fmt::Display| MigrationError::Transport(e.to_string());
    let (control_send, control_recv) = tokio::time::timeout(HELLO_TIMEOUT, connection.accept_bi())
        .await
        .map_err(|_| MigrationError::Protocol("no control stream within 10 s".into()))?
        .map_err(|e| transport(&e))?;
    let mut control = FrameWriter::new(control_send);
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
    let refuse = async |control: &mut FrameWriter, code, error: MigrationError| {
        let message = Control::Error {
            code,
            message: error.to_string(),
        };
        let _ = control.send(message.encode()).await;
        control.finish();
        close_with_error(connection, &error);
        Err(error)
    };
    if hello.disks.len() != images.len() {
        let error = MigrationError::Incompatible(format!(
            "source sends {} disks, target serves {} images",
            hello.disks.len(),
            images.len()
        ));
        return refuse(&mut control, ErrorCode::ImageMismatch, error).await;
    }
    let mut devices = Vec::new();
    for (index, (image, info)) in images.iter().zip(&hello.disks).enumerate() {
        let marker = incomplete_marker(image);
        if let Err(e) = std::fs::write(&marker, b"tern migration in progress\n") {
            let error = MigrationError::Disk {
                disk: index as u32,
                message: format!("cannot create {}: {e}", marker.display()),
            };
            return refuse(&mut control, ErrorCode::Disk, error).await;
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
                return refuse(&mut control, ErrorCode::ImageMismatch, error).await;
            }
        }
    }
    let sizes: Vec<u64> = devices.iter().map(BlockDevice::size).collect();
    let (mut machine, welcome) = match TargetMigration::accept(&hello, &sizes) {
        Ok(accepted) => accepted,
        Err(error) => return refuse(&mut control, ErrorCode::Incompatible, error).await,
    };
    control
        .send(welcome.encode())
        .await
        .map_err(|e| transport(&e))?;
    if let Some(hook) = &on_accepted {
        hook(&sizes);
    }

    let (input_tx, mut input_rx) = mpsc::unbounded_channel::<Input>();
    let (frame_tx, mut frame_rx) = mpsc::channel::<(u16, Frame)>(FRAME_QUEUE);
    // The last stream of a live migration carries mirrored guest writes: its frames get their
    // own queue, taken first, so a waiting guest write never queues behind bulk frames.
    let (priority_tx, mut priority_rx) = mpsc::channel::<(u16, Frame)>(FRAME_QUEUE);
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
                Some((stream, frame)) => machine.handle_frame(stream, frame),
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
                Some((stream, frame)) => machine.handle_frame(stream, frame),
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
    if let Err(error) = &result {
        close_with_error(connection, error);
    }
    result?;
    // Let the source read CompleteDone before the connection goes away; it closes first.
    let _ = tokio::time::timeout(Duration::from_secs(5), connection.closed()).await;
    Ok(TargetReport {
        images: images.to_vec(),
        bytes_written: machine.bytes_written(),
        duration: started.elapsed(),
    })
}

/// Closes the connection with the error as the reason, so the source reports our words
/// even if the error frame on the control stream is lost with the connection.
pub(crate) fn close_with_error(connection: &quinn::Connection, error: &MigrationError) {
    let reason = error.to_string();
    let reason = &reason.as_bytes()[..reason.len().min(512)];
    connection.close(CLOSE_FAILED.into(), reason);
}

/// Application close code of a migration that failed (0 is a normal end).
pub const CLOSE_FAILED: u32 = 1;

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
            // One copy into an aligned buffer: O_DIRECT needs it, and the frame's bytes live
            // in a buffer the transport allocated.
            let buf = IoBuf::from_slice(&data);
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
    frames: mpsc::Sender<(u16, Frame)>,
    priority: mpsc::Sender<(u16, Frame)>,
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
            let mut reader = FrameReader::new(stream);
            loop {
                match reader.next().await {
                    Ok(Some((frame, _))) => {
                        if frames.send((index, frame)).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => return,
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
