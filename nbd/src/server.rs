//! The NBD server: listeners (TCP or Unix), the fixed-newstyle negotiation and the
//! transmission phase of one connection.
//!
//! Each connection has a reader (this task: parses requests, checks them, admits them through
//! the export's gate and submits the IO) and a writer task that sends replies in completion
//! order. Requests run concurrently, bounded per connection by a byte budget so a client
//! cannot make the server buffer more than [`CONNECTION_BUDGET`] bytes.
//!
//! Hostile input never takes the daemon down: a malformed option gets `NBD_REP_ERR_INVALID`,
//! an unknown option `NBD_REP_ERR_UNSUP`, a bad request the spec's error reply, and what cannot
//! be answered in step (bad magic, a write payload over 32 MiB, an oversized option) closes
//! that connection only.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tern_blockdev::{Completion, IoBuf, IoOp};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::export::{Export, Pass};
use crate::proto::{self, InfoRequest, Request, Verdict, cflag, cmd, errno, info, opt, rep, tflag};

/// Bytes of requests one connection may have in flight (reads and writes together).
pub const CONNECTION_BUDGET: usize = 64 << 20;
/// Time a client has for the whole negotiation.
pub const NEGOTIATION_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once per listener; more wait in the accept queue.
pub const MAX_CONNECTIONS: usize = 64;
/// Budget accounting unit.
const UNIT: usize = 4096;

/// Where to listen: `HOST:PORT` or `unix:PATH`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NbdAddr {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A Unix socket path.
    Unix(PathBuf),
}

impl std::str::FromStr for NbdAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.strip_prefix("unix:") {
            Some(path) if !path.is_empty() => Ok(NbdAddr::Unix(PathBuf::from(path))),
            Some(_) => Err("unix: needs a path".into()),
            None => s
                .parse()
                .map(NbdAddr::Tcp)
                .map_err(|e| format!("{s:?} is neither HOST:PORT nor unix:PATH ({e})")),
        }
    }
}

impl std::fmt::Display for NbdAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NbdAddr::Tcp(addr) => write!(f, "{addr}"),
            NbdAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

enum Socket {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

/// A bound NBD listener and the exports it serves.
pub struct NbdServer {
    socket: Socket,
    exports: Arc<[Arc<Export>]>,
}

impl std::fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdServer")
            .field("addr", &self.local_addr())
            .finish()
    }
}

impl NbdServer {
    /// Binds `addr`. A stale Unix socket file (nobody listening) is replaced; a live one is
    /// an error.
    pub async fn bind(addr: &NbdAddr, exports: Vec<Arc<Export>>) -> std::io::Result<Self> {
        let socket = match addr {
            NbdAddr::Tcp(addr) => Socket::Tcp(TcpListener::bind(addr).await?),
            NbdAddr::Unix(path) => {
                if path.exists() {
                    if tokio::net::UnixStream::connect(path).await.is_ok() {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::AddrInUse,
                            format!("{} is in use by a running server", path.display()),
                        ));
                    }
                    std::fs::remove_file(path)?;
                }
                Socket::Unix(UnixListener::bind(path)?, path.clone())
            }
        };
        Ok(Self {
            socket,
            exports: exports.into(),
        })
    }

    /// The bound address (with the port the system chose for `:0`).
    pub fn local_addr(&self) -> NbdAddr {
        match &self.socket {
            Socket::Tcp(listener) => listener
                .local_addr()
                .map(NbdAddr::Tcp)
                .unwrap_or(NbdAddr::Tcp(SocketAddr::from(([0, 0, 0, 0], 0)))),
            Socket::Unix(_, path) => NbdAddr::Unix(path.clone()),
        }
    }

    /// Accepts and serves connections until the task is dropped.
    pub async fn run(self) {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let exports = self.exports.clone();
            match &self.socket {
                Socket::Tcp(listener) => match listener.accept().await {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        tokio::spawn(async move {
                            serve_logged(stream, exports, peer.to_string()).await;
                            drop(slot);
                        });
                    }
                    Err(e) => accept_failed(e).await,
                },
                Socket::Unix(listener, path) => match listener.accept().await {
                    Ok((stream, _)) => {
                        let peer = format!("unix:{}", path.display());
                        tokio::spawn(async move {
                            serve_logged(stream, exports, peer).await;
                            drop(slot);
                        });
                    }
                    Err(e) => accept_failed(e).await,
                },
            }
        }
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        if let Socket::Unix(_, path) = &self.socket {
            let _ = std::fs::remove_file(path);
        }
    }
}

async fn accept_failed(error: std::io::Error) {
    // EMFILE and friends: back off instead of spinning.
    tracing::warn!(%error, "nbd accept failed");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

async fn serve_logged<S>(stream: S, exports: Arc<[Arc<Export>]>, peer: String)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tracing::debug!(%peer, "nbd client connected");
    match serve_connection(stream, &exports).await {
        Ok(()) => tracing::debug!(%peer, "nbd client disconnected"),
        Err(e) => tracing::info!(%peer, error = %e, "nbd connection closed"),
    }
}

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// The socket failed or the client went away mid-message.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// The client broke the protocol in a way that cannot be answered.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The negotiation took longer than [`NEGOTIATION_TIMEOUT`].
    #[error("negotiation timed out")]
    Timeout,
}

/// Serves one client on any byte stream: negotiation, then transmission until it
/// disconnects.
pub async fn serve_connection<S>(stream: S, exports: &[Arc<Export>]) -> Result<(), ConnectionError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    let session = tokio::time::timeout(
        NEGOTIATION_TIMEOUT,
        negotiate(&mut reader, &mut writer, exports),
    )
    .await
    .map_err(|_| ConnectionError::Timeout)??;
    match session {
        Some(session) => transmission(reader, writer, session).await,
        None => Ok(()),
    }
}

struct Session {
    export: Arc<Export>,
    structured: bool,
}

fn find<'a>(exports: &'a [Arc<Export>], name: &str) -> Option<&'a Arc<Export>> {
    // "" is the default export: the first one.
    if name.is_empty() {
        return exports.first();
    }
    exports.iter().find(|e| e.name() == name)
}

fn transmission_flags(export: &Export, structured: bool) -> u16 {
    let mut flags = tflag::HAS_FLAGS
        | tflag::SEND_FLUSH
        | tflag::SEND_FUA
        | tflag::SEND_TRIM
        | tflag::SEND_WRITE_ZEROES
        | tflag::CAN_MULTI_CONN;
    if structured {
        flags |= tflag::SEND_DF;
    }
    if export.read_only() {
        flags |= tflag::READ_ONLY;
    }
    flags
}

async fn negotiate<R, W>(
    reader: &mut R,
    writer: &mut W,
    exports: &[Arc<Export>],
) -> Result<Option<Session>, ConnectionError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&proto::INIT_MAGIC.to_be_bytes());
    hello.extend_from_slice(&proto::OPTS_MAGIC.to_be_bytes());
    hello.extend_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
    writer.write_all(&hello).await?;
    writer.flush().await?;
    let client_flags = reader.read_u32().await?;
    if client_flags & !(proto::CLIENT_FIXED_NEWSTYLE | proto::CLIENT_NO_ZEROES) != 0 {
        return Err(ConnectionError::Protocol(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    if client_flags & proto::CLIENT_FIXED_NEWSTYLE == 0 {
        return Err(ConnectionError::Protocol(
            "client does not speak fixed newstyle".into(),
        ));
    }
    let no_zeroes = client_flags & proto::CLIENT_NO_ZEROES != 0;
    let mut structured = false;
    loop {
        let magic = reader.read_u64().await?;
        if magic != proto::OPTS_MAGIC {
            return Err(ConnectionError::Protocol(format!(
                "bad option magic {magic:#x}"
            )));
        }
        let option = reader.read_u32().await?;
        let length = reader.read_u32().await?;
        if length > proto::MAX_OPTION {
            // Skipping gigabytes would let a client keep us busy; close instead.
            return Err(ConnectionError::Protocol(format!(
                "option {option} of {length} bytes is over the limit"
            )));
        }
        let mut data = vec![0u8; length as usize];
        reader.read_exact(&mut data).await?;
        let reply = |kind: u32, data: &[u8]| proto::option_reply(option, kind, data);
        match option {
            opt::EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data);
                let Some(export) = find(exports, &name) else {
                    // This option has no error reply: the spec says to close.
                    return Err(ConnectionError::Protocol(format!(
                        "no export named {name:?}"
                    )));
                };
                let size = export.size().await;
                let mut out = Vec::with_capacity(134);
                out.extend_from_slice(&size.to_be_bytes());
                out.extend_from_slice(&transmission_flags(export, structured).to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                writer.write_all(&out).await?;
                writer.flush().await?;
                return Ok(Some(Session {
                    export: export.clone(),
                    structured,
                }));
            }
            opt::ABORT => {
                writer.write_all(&reply(rep::ACK, &[])).await?;
                writer.flush().await?;
                return Ok(None);
            }
            opt::LIST if data.is_empty() => {
                for export in exports {
                    let mut entry = Vec::with_capacity(4 + export.name().len());
                    entry.extend_from_slice(&(export.name().len() as u32).to_be_bytes());
                    entry.extend_from_slice(export.name().as_bytes());
                    writer.write_all(&reply(rep::SERVER, &entry)).await?;
                }
                writer.write_all(&reply(rep::ACK, &[])).await?;
            }
            opt::STRUCTURED_REPLY if data.is_empty() => {
                structured = true;
                writer.write_all(&reply(rep::ACK, &[])).await?;
            }
            opt::LIST | opt::STRUCTURED_REPLY => {
                writer
                    .write_all(&reply(rep::ERR_INVALID, b"this option takes no data"))
                    .await?;
            }
            opt::STARTTLS => {
                let message = b"TLS is not offered on NBD; serve on a Unix socket or loopback";
                writer.write_all(&reply(rep::ERR_POLICY, message)).await?;
            }
            opt::INFO | opt::GO => {
                let Some(InfoRequest { name, requests }) = proto::parse_info_request(&data) else {
                    writer
                        .write_all(&reply(rep::ERR_INVALID, b"malformed INFO/GO request"))
                        .await?;
                    writer.flush().await?;
                    continue;
                };
                let Some(export) = find(exports, &name) else {
                    let message = format!("no export named {name:?}");
                    writer
                        .write_all(&reply(rep::ERR_UNKNOWN, message.as_bytes()))
                        .await?;
                    writer.flush().await?;
                    continue;
                };
                let size = export.size().await;
                let flags = transmission_flags(export, structured);
                writer
                    .write_all(&reply(rep::INFO, &proto::info_export(size, flags)))
                    .await?;
                for request in requests {
                    let payload = match request {
                        info::NAME => proto::info_string(info::NAME, export.name()),
                        info::DESCRIPTION if !export.description().is_empty() => {
                            proto::info_string(info::DESCRIPTION, export.description())
                        }
                        info::BLOCK_SIZE => {
                            proto::info_block_size(1, UNIT as u32, proto::MAX_REQUEST)
                        }
                        _ => continue,
                    };
                    writer.write_all(&reply(rep::INFO, &payload)).await?;
                }
                writer.write_all(&reply(rep::ACK, &[])).await?;
                if option == opt::GO {
                    writer.flush().await?;
                    return Ok(Some(Session {
                        export: export.clone(),
                        structured,
                    }));
                }
            }
            _ => {
                let message = format!("option {option} is not supported");
                writer
                    .write_all(&reply(rep::ERR_UNSUP, message.as_bytes()))
                    .await?;
            }
        }
        writer.flush().await?;
    }
}

/// A reply for the writer task, with the request's share of the connection's budget: it is
/// released only once the reply is written, so a client that does not read its socket
/// cannot make the server queue unbounded read data.
enum Reply {
    /// Bytes as they are.
    Bytes(Vec<u8>, Option<OwnedSemaphorePermit>),
    /// A read reply: headers, each followed by a range of `buf` (or nothing).
    Read {
        buf: IoBuf,
        pieces: Vec<(Vec<u8>, Option<std::ops::Range<usize>>)>,
        _permit: Option<OwnedSemaphorePermit>,
    },
}

async fn write_replies<W: AsyncWrite + Unpin>(
    writer: W,
    mut replies: mpsc::UnboundedReceiver<Reply>,
) -> std::io::Result<()> {
    let mut writer = BufWriter::with_capacity(256 << 10, writer);
    while let Some(reply) = replies.recv().await {
        match reply {
            Reply::Bytes(bytes, _permit) => writer.write_all(&bytes).await?,
            Reply::Read { buf, pieces, .. } => {
                for (header, range) in pieces {
                    writer.write_all(&header).await?;
                    if let Some(range) = range {
                        writer.write_all(&buf[range]).await?;
                    }
                }
            }
        }
        if replies.is_empty() {
            writer.flush().await?;
        }
    }
    writer.flush().await?;
    writer.shutdown().await
}

/// Everything a completing request needs to answer.
struct Responder {
    cookie: u64,
    structured: bool,
    replies: mpsc::UnboundedSender<Reply>,
    /// The request's budget share, handed to its reply.
    permit: std::sync::Mutex<Option<OwnedSemaphorePermit>>,
}

impl Responder {
    fn ok(&self) {
        let bytes = if self.structured {
            proto::structured_header(proto::reply::FLAG_DONE, proto::reply::NONE, self.cookie, 0)
                .to_vec()
        } else {
            proto::simple_reply(0, self.cookie).to_vec()
        };
        let _ = self.replies.send(Reply::Bytes(bytes, self.take_permit()));
    }

    fn take_permit(&self) -> Option<OwnedSemaphorePermit> {
        self.permit.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    fn error(&self, error: u32, message: &str) {
        let bytes = if self.structured {
            proto::structured_error(self.cookie, error, message)
        } else {
            proto::simple_reply(error, self.cookie).to_vec()
        };
        let _ = self.replies.send(Reply::Bytes(bytes, self.take_permit()));
    }

    fn read(&self, offset: u64, buf: IoBuf, fragment: bool) {
        let pieces = if !self.structured {
            vec![(
                proto::simple_reply(0, self.cookie).to_vec(),
                Some(0..buf.len()),
            )]
        } else if buf.is_empty() {
            let done = proto::reply::FLAG_DONE;
            vec![(
                proto::structured_header(done, proto::reply::NONE, self.cookie, 0).to_vec(),
                None,
            )]
        } else {
            let runs = if fragment {
                proto::sparse_runs(&buf)
            } else {
                vec![(0, buf.len(), false)]
            };
            let last = runs.len() - 1;
            runs.into_iter()
                .enumerate()
                .map(|(i, (start, len, hole))| {
                    let flags = if i == last {
                        proto::reply::FLAG_DONE
                    } else {
                        0
                    };
                    let at = offset + start as u64;
                    if hole {
                        let header = proto::structured_hole(flags, self.cookie, at, len as u32);
                        (header.to_vec(), None)
                    } else {
                        let header =
                            proto::structured_data_header(flags, self.cookie, at, len as u32);
                        (header.to_vec(), Some(start..start + len))
                    }
                })
                .collect()
        };
        let _ = self.replies.send(Reply::Read {
            buf,
            pieces,
            _permit: self.take_permit(),
        });
    }

    fn failed(&self, completion_error: &tern_blockdev::BlockError) {
        self.error(
            errno::from_host(completion_error.errno()),
            &completion_error.to_string(),
        );
    }
}

async fn transmission<R, W>(
    mut reader: R,
    writer: W,
    session: Session,
) -> Result<(), ConnectionError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let Session { export, structured } = session;
    let (reply_tx, reply_rx) = mpsc::unbounded_channel();
    let writer_task = tokio::spawn(write_replies(writer, reply_rx));
    let budget = Arc::new(Semaphore::new(CONNECTION_BUDGET / UNIT));
    let size = export.size().await;
    let result = loop {
        let mut header = [0u8; proto::REQUEST_LEN];
        match reader.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e.into()),
        }
        let request = match Request::parse(&header) {
            Ok(request) => request,
            Err(e) => break Err(ConnectionError::Protocol(e.to_string())),
        };
        let responder = Responder {
            cookie: request.cookie,
            structured,
            replies: reply_tx.clone(),
            permit: std::sync::Mutex::new(None),
        };
        match proto::check(&request, size, export.read_only(), structured) {
            Verdict::Disconnect(why) => break Err(ConnectionError::Protocol(why.into())),
            Verdict::Reject(error, why) => {
                if request.command == cmd::WRITE {
                    skip(&mut reader, request.length).await?;
                }
                tracing::debug!(?request, why, "nbd request refused");
                responder.error(error, why);
                continue;
            }
            Verdict::Accept => {}
        }
        if request.command == cmd::DISC {
            break Ok(());
        }
        // Reads and writes carry their length in memory; trim, write-zeroes and flush carry
        // nothing, whatever range they name.
        let units = match request.command {
            cmd::READ | cmd::WRITE => (request.length as usize).div_ceil(UNIT).max(1),
            _ => 1,
        };
        let Ok(permit) = budget.clone().acquire_many_owned(units as u32).await else {
            break Ok(());
        };
        // A write's payload is read before the gate: it is on the wire either way, and
        // the client is entitled to have it consumed even if the request is then refused.
        let payload = if request.command == cmd::WRITE {
            let mut buf = IoBuf::new_zeroed(request.length as usize);
            reader.read_exact(&mut buf).await?;
            Some(buf)
        } else {
            None
        };
        // A throttled guest waits before admission, so a switchover's hold never waits out
        // a throttle debt.
        if let Some(backend) = export.backend().filter(|_| request.command == cmd::WRITE) {
            let wait = backend.reserve_write(u64::from(request.length));
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
        let pass = match export.enter().await {
            Ok(pass) => pass,
            Err(refusal) => {
                responder.error(refusal.errno, &refusal.message);
                continue;
            }
        };
        submit(request, payload, pass, permit, responder);
    };
    drop(reply_tx);
    // Requests in flight complete and are answered before the connection closes.
    match writer_task.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "nbd reply writer stopped"),
        Err(e) => tracing::warn!(error = %e, "nbd reply writer panicked"),
    }
    result
}

async fn skip<R: AsyncRead + Unpin>(reader: &mut R, mut length: u32) -> std::io::Result<()> {
    let mut sink = vec![0u8; 64 << 10];
    while length > 0 {
        let take = sink.len().min(length as usize);
        reader.read_exact(&mut sink[..take]).await?;
        length -= take as u32;
    }
    Ok(())
}

/// Submits an admitted request; the completion answers it and then releases the pass (so a
/// pending `hold` sees the request finished only after its reply was queued and, for a
/// tracked disk, after its blocks were marked).
fn submit(
    request: Request,
    payload: Option<IoBuf>,
    pass: Pass,
    permit: OwnedSemaphorePermit,
    responder: Responder,
) {
    *responder.permit.lock().unwrap_or_else(|e| e.into_inner()) = Some(permit);
    let backend = pass.backend().clone();
    let fua = request.flags & cflag::FUA != 0;
    let offset = request.offset;
    let len = u64::from(request.length);
    let op = match request.command {
        cmd::READ => IoOp::Read {
            offset,
            buf: backend.alloc_buf(request.length as usize),
        },
        cmd::WRITE => IoOp::Write {
            offset,
            buf: payload.expect("a write carries its payload"),
        },
        cmd::TRIM => IoOp::Discard { offset, len },
        cmd::WRITE_ZEROES => IoOp::WriteZeroes { offset, len },
        cmd::FLUSH => IoOp::Flush,
        other => unreachable!("command {other} was accepted by check"),
    };
    let fragment = request.flags & cflag::DF == 0;
    backend.clone().submit(
        op,
        Box::new(move |completion: Completion| {
            if let Err(error) = &completion.result {
                responder.failed(error);
                drop(pass);
                return;
            }
            match completion.op {
                IoOp::Read { buf, .. } => responder.read(offset, buf, fragment),
                _ if fua => {
                    // Durable before the reply: flush once the write completed.
                    backend.submit(
                        IoOp::Flush,
                        Box::new(move |flushed: Completion| {
                            match &flushed.result {
                                Ok(_) => responder.ok(),
                                Err(error) => responder.failed(error),
                            }
                            drop(pass);
                        }),
                    );
                    return;
                }
                _ => responder.ok(),
            }
            drop(pass);
        }),
    );
}
