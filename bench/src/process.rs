//! Child processes: spawning, waiting with bounds, port selection and cleanup.
//!
//! Every long-lived child (a server) lives in a [`Guard`], which terminates and reaps it when
//! dropped, so an error anywhere in a scenario leaves nothing running.

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// How often a waiting loop looks at a child again.
const POLL: Duration = Duration::from_millis(1);

/// A free TCP port on 127.0.0.1 (bound, then released).
pub(crate) fn free_tcp_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("bind a TCP port")?;
    Ok(listener.local_addr()?.port())
}

/// A free UDP port on 127.0.0.1 (bound, then released).
pub(crate) fn free_udp_port() -> anyhow::Result<u16> {
    let socket = UdpSocket::bind("127.0.0.1:0").context("bind a UDP port")?;
    Ok(socket.local_addr()?.port())
}

/// Polls `addr` until it accepts a TCP connection, for at most `timeout`; fails early if the
/// server in `guard` exits.
pub(crate) fn wait_for_tcp(
    addr: SocketAddr,
    guard: &mut Guard,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            return Ok(());
        }
        if let Some(status) = guard.child.try_wait()? {
            bail!("{} exited with {status} before listening", guard.name);
        }
        if Instant::now() >= deadline {
            bail!("{} did not listen on {addr} within {timeout:?}", guard.name);
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Drains a pipe into a string on a thread (so the child never blocks on a full pipe).
pub(crate) fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> JoinHandle<String> {
    thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut pipe) = pipe {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            text = String::from_utf8_lossy(&bytes).into_owned();
        }
        text
    })
}

/// What a finished command left behind.
#[derive(Debug)]
pub(crate) struct Finished {
    /// Exit status.
    pub(crate) status: ExitStatus,
    /// Everything it printed on stdout.
    pub(crate) stdout: String,
    /// Everything it printed on stderr.
    pub(crate) stderr: String,
    /// Wall-clock time from just before the spawn to the observed exit.
    pub(crate) elapsed: Duration,
}

impl Finished {
    /// Fails with the command's stderr unless it exited 0.
    pub(crate) fn check(self, what: &str) -> anyhow::Result<Self> {
        if !self.status.success() {
            bail!(
                "{what} failed with {}: {}",
                self.status,
                self.stderr.trim_end()
            );
        }
        Ok(self)
    }
}

/// Runs `cmd` to completion (stdout and stderr captured), timing it wall-clock; kills it
/// after `timeout`.
pub(crate) fn run_timed(
    name: &str,
    cmd: &mut Command,
    timeout: Duration,
) -> anyhow::Result<Finished> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let child = cmd.spawn().with_context(|| format!("spawn {name}"))?;
    let mut guard = Guard::new(name, child);
    let stdout = drain(guard.child.stdout.take());
    let stderr = drain(guard.child.stderr.take());
    let status = guard.wait_timeout(timeout)?;
    let elapsed = start.elapsed();
    let status = status.with_context(|| format!("{name} did not finish within {timeout:?}"))?;
    Ok(Finished {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
        elapsed,
    })
}

/// A running child that is terminated (SIGTERM, then SIGKILL) and reaped when dropped.
pub(crate) struct Guard {
    name: String,
    child: Child,
    done: bool,
}

impl Guard {
    /// Takes ownership of `child`.
    pub(crate) fn new(name: &str, child: Child) -> Self {
        Self {
            name: name.to_owned(),
            child,
            done: false,
        }
    }

    /// Spawns `cmd` with stdin from /dev/null and stdout discarded; stderr as `stderr` says.
    pub(crate) fn spawn(name: &str, cmd: &mut Command, stderr: Stdio) -> anyhow::Result<Self> {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("spawn {name}"))?;
        Ok(Self::new(name, child))
    }

    /// The child, e.g. to take its pipes.
    pub(crate) fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// The child's CPU time and peak memory so far (read before stopping it).
    pub(crate) fn usage(&self) -> anyhow::Result<crate::measure::Usage> {
        crate::measure::usage(self.child.id()).with_context(|| format!("usage of {}", self.name))
    }

    /// Waits for the child to exit, at most `timeout`; `None` if it is still running.
    pub(crate) fn wait_timeout(&mut self, timeout: Duration) -> anyhow::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                self.done = true;
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(POLL);
        }
    }

    /// Sends SIGINT (a graceful stop for programs such as fio, which then write their logs
    /// and results) and waits up to `grace`; `None` if the child is still running then.
    pub(crate) fn interrupt(&mut self, grace: Duration) -> anyhow::Result<Option<ExitStatus>> {
        if self.done {
            return self.wait_timeout(Duration::ZERO);
        }
        // std has no SIGINT either; as in `stop`.
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        self.wait_timeout(grace)
    }

    /// Asks the child to stop (SIGTERM), waits up to `grace`, then kills it; returns how it
    /// ended.
    pub(crate) fn stop(&mut self, grace: Duration) -> anyhow::Result<ExitStatus> {
        if !self.done {
            // std has no SIGTERM; `kill` does it without an extra dependency.
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .stderr(Stdio::null())
                .status();
            if let Some(status) = self.wait_timeout(grace)? {
                return Ok(status);
            }
            eprintln!("tern-bench: {} ignored SIGTERM; killing it", self.name);
        }
        let _ = self.child.kill();
        let status = self.child.wait()?;
        self.done = true;
        Ok(status)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.stop(Duration::from_secs(2));
        }
    }
}

/// Stderr lines of a child, read on a thread and handed over through a channel; the last
/// lines are kept for error messages.
pub(crate) struct LineWatcher {
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl LineWatcher {
    /// Starts reading `pipe` line by line.
    pub(crate) fn new<R: Read + Send + 'static>(pipe: R) -> Self {
        Self::copying(pipe, None)
    }

    /// Like [`LineWatcher::new`], also appending every line to the file `copy` (created).
    pub(crate) fn copying<R: Read + Send + 'static>(pipe: R, copy: Option<PathBuf>) -> Self {
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut copy = copy.and_then(|path| std::fs::File::create(path).ok());
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                if let Some(file) = &mut copy {
                    use std::io::Write;
                    let _ = writeln!(file, "{line}");
                }
                // The copy goes on after the watcher is dropped: the log stays whole.
                let _ = tx.send(line);
            }
        });
        Self {
            lines: rx,
            seen: Vec::new(),
        }
    }

    /// Waits for a line containing `needle`, at most `timeout`.
    pub(crate) fn wait_for(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = line.contains(needle);
                    self.keep(line);
                    if found {
                        return Ok(());
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    bail!("no {needle:?} within {timeout:?}; stderr: {}", self.tail())
                }
                Err(RecvTimeoutError::Disconnected) => {
                    bail!("stderr closed before {needle:?}: {}", self.tail())
                }
            }
        }
    }

    /// Collects whatever has arrived so far without waiting.
    pub(crate) fn collect(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            self.keep(line);
        }
    }

    /// The last few lines seen, joined.
    pub(crate) fn tail(&self) -> String {
        let from = self.seen.len().saturating_sub(10);
        self.seen[from..].join("\n")
    }

    fn keep(&mut self, line: String) {
        self.seen.push(line);
        if self.seen.len() > 100 {
            self.seen.drain(..50);
        }
    }
}

/// Writes back dirty pages and drops the page cache; `false` when that is not permitted.
pub(crate) fn drop_caches() -> bool {
    let _ = Command::new("sync").status();
    std::fs::write("/proc/sys/vm/drop_caches", b"3\n").is_ok()
}

/// Whether `a` and `b` hold the same bytes (`qemu-img compare`, sparse-aware).
pub(crate) fn images_equal(a: &Path, b: &Path) -> anyhow::Result<bool> {
    let done = run_timed(
        "qemu-img compare",
        Command::new("qemu-img")
            .args(["compare", "-q", "-f", "raw", "-F", "raw"])
            .arg(a)
            .arg(b),
        Duration::from_secs(3600),
    )?;
    match done.status.code() {
        Some(0) => Ok(true),
        Some(1) => Ok(false),
        _ => bail!(
            "qemu-img compare failed with {}: {}",
            done.status,
            done.stderr.trim_end()
        ),
    }
}
