//! The control socket: a Unix socket, mode 0600, that only this user (or root) may use.
//! Each connection gets the greeting, then runs commands one at a time while events stream
//! in between.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

use super::wire::{self, CtlError, ErrorClass};
use crate::jobs::Jobs;

/// Longest accepted command line; longer ones get an error and the connection closes.
const MAX_LINE: usize = 64 << 10;
/// Lines (events and replies) queued for one client at most.
const EVENTS_QUEUED_MAX: usize = 1024;

/// A bound control socket.
pub(crate) struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    owner: u32,
}

impl ControlServer {
    /// Binds `path` with mode 0600 (replacing a stale socket nobody listens on).
    pub(crate) async fn bind(path: &Path) -> anyhow::Result<Self> {
        if path.exists() {
            if UnixStream::connect(path).await.is_ok() {
                anyhow::bail!("{} is in use by a running daemon", path.display());
            }
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        // The socket file belongs to the daemon's effective user: that is who may connect
        // (and root). The peer check below closes the short window before the chmod.
        let owner = std::fs::metadata(path)?.uid();
        Ok(Self {
            listener,
            path: path.to_owned(),
            owner,
        })
    }

    /// Serves connections until the task is dropped.
    pub(crate) async fn run(self, jobs: Arc<Jobs>) {
        let own_uid = self.owner;
        loop {
            let (stream, _) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "control accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            match stream.peer_cred() {
                Ok(cred) if cred.uid() == own_uid || cred.uid() == 0 => {}
                Ok(cred) => {
                    tracing::warn!(
                        uid = cred.uid(),
                        "control connection from another user refused"
                    );
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "control connection without peer credentials refused");
                    continue;
                }
            }
            let jobs = jobs.clone();
            tokio::spawn(async move {
                if let Err(e) = serve(stream, jobs).await {
                    tracing::debug!(error = %e, "control connection closed");
                }
            });
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn serve(stream: UnixStream, jobs: Arc<Jobs>) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    // Bounded: a client that never reads loses events (and is told so), it does not make the
    // daemon buffer them without limit.
    let (out_tx, mut out_rx) = mpsc::channel::<String>(EVENTS_QUEUED_MAX);
    let mut events = jobs.subscribe();
    let writer = tokio::spawn(async move {
        while let Some(line) = out_rx.recv().await {
            if write.write_all(line.as_bytes()).await.is_err()
                || write.write_all(b"\n").await.is_err()
            {
                break;
            }
        }
    });
    let _ = out_tx.send(wire::greeting()).await;
    let event_tx = out_tx.clone();
    let forwarder = tokio::spawn(async move {
        let mut lost = 0u64;
        loop {
            let line = match events.recv().await {
                Ok(line) => line,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    lost += n;
                    continue;
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            };
            if lost > 0 {
                let notice = wire::event("events-lost", serde_json::json!({ "count": lost }));
                if event_tx.try_send(notice).is_ok() {
                    lost = 0;
                }
            }
            match event_tx.try_send(line) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => lost += 1,
                Err(mpsc::error::TrySendError::Closed(_)) => break,
            }
        }
    });
    let mut reader = BufReader::new(read);
    let mut line = Vec::new();
    let result = loop {
        line.clear();
        let n = (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            break Ok(());
        }
        if line.len() > MAX_LINE {
            let error = CtlError::new(ErrorClass::GenericError, "command line over 64 KiB");
            let _ = out_tx.send(wire::reply(Err(error), None)).await;
            break Ok(());
        }
        let text = String::from_utf8_lossy(&line);
        if text.trim().is_empty() {
            continue;
        }
        let reply = match serde_json::from_str::<wire::Request>(&text) {
            Ok(request) => {
                let result = jobs.execute(&request.execute, &request.arguments).await;
                wire::reply(result, request.id)
            }
            Err(e) => wire::reply(
                Err(CtlError::new(
                    ErrorClass::GenericError,
                    format!(
                        "not a command: {e} (expected {{\"execute\": \"...\", \"arguments\": {{...}}}})"
                    ),
                )),
                None,
            ),
        };
        let _ = out_tx.send(reply).await;
    };
    forwarder.abort();
    drop(out_tx);
    let _ = writer.await;
    result
}
