//! The QEMU peer of the live cases: the same guest (fio over NBD, same pattern, rate and
//! queue depth) writes through a source `qemu-storage-daemon`'s NBD export while
//! `blockdev-mirror` (sync=full) copies the disk to a second `qemu-storage-daemon` exporting
//! the target over NBD (TCP, optionally TLS with x509 credentials on both ends), driven by
//! the harness over QMP.
//!
//! Per run: both daemons started (the target on the target host of the case's link), fio
//! writes for the baseline window ("before"), `blockdev-add` of an NBD client node for the
//! target, `blockdev-mirror` (t0), event `BLOCK_JOB_READY` (t1; "during" = t0 → t1;
//! `query-block-jobs` every 200 ms meanwhile gives the course), the guest writes 2 s more
//! and is stopped with SIGINT (a VMM pausing the VM), then `block-job-complete`; storage
//! downtime is from that command to event `BLOCK_JOB_COMPLETED`, total time from
//! `blockdev-mirror` to that event. Then both daemons stop and `qemu-img compare` checks the
//! target. This is the method of `../shared/README.md` ("The QEMU peer"), with fio in place
//! of `qemu-io`.

use std::fs;
use std::io::{BufRead, BufReader, Write as _};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::case::System;
use crate::measure::CoursePoint;
use crate::nbd::{
    Bench, CONVERGE_TIMEOUT_S, COURSE_INTERVAL, DAEMON_EXIT_TIMEOUT, DISK, READY_TIMEOUT, Run,
    now_unix_ms,
};
use crate::process::{self, Guard, LineWatcher, run_timed};

/// Bound on one QMP command's reply.
const QMP_TIMEOUT: Duration = Duration::from_secs(60);
/// The job's id.
const JOB: &str = "m";
/// The name the target's TLS certificate is issued to (and the client checks).
const TLS_HOSTNAME: &str = "localhost";

/// A QMP connection: commands are answered in order; events are kept with their arrival
/// time until asked for.
struct Qmp {
    /// Commands go here.
    writer: UnixStream,
    /// Every JSON message from the daemon with its arrival time, from a reader thread.
    lines: Receiver<(Value, Instant)>,
    /// Events received and not yet asked for.
    events: Vec<(Value, Instant)>,
}

impl Qmp {
    /// Connects to the monitor socket at `path` (retrying while the daemon starts, failing
    /// early if it exits), reads the greeting and negotiates capabilities.
    fn connect(path: &Path, daemon: &mut Guard, log: &mut LineWatcher) -> anyhow::Result<Self> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(stream) => break stream,
                Err(e) => {
                    if let Some(status) = daemon.wait_timeout(Duration::ZERO)? {
                        log.collect();
                        bail!(
                            "qemu-storage-daemon exited with {status} before its QMP socket {} was up: {}",
                            path.display(),
                            log.tail()
                        );
                    }
                    if Instant::now() >= deadline {
                        return Err(e).with_context(|| {
                            format!("connect to QMP {} within {READY_TIMEOUT:?}", path.display())
                        });
                    }
                    thread::sleep(Duration::from_millis(10));
                }
            }
        };
        let reader = stream.try_clone().context("clone the QMP socket")?;
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(reader).lines() {
                let Ok(line) = line else { break };
                let at = Instant::now();
                let Ok(value) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if tx.send((value, at)).is_err() {
                    break;
                }
            }
        });
        let mut qmp = Self {
            writer: stream,
            lines: rx,
            events: Vec::new(),
        };
        let (greeting, _) = qmp.next(READY_TIMEOUT).context("QMP greeting")?;
        if greeting.get("QMP").is_none() {
            bail!("unexpected QMP greeting {greeting}");
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    /// The next message, at most `timeout` from now.
    fn next(&mut self, timeout: Duration) -> anyhow::Result<(Value, Instant)> {
        match self.lines.recv_timeout(timeout) {
            Ok(message) => Ok(message),
            Err(RecvTimeoutError::Timeout) => bail!("no QMP message within {timeout:?}"),
            Err(RecvTimeoutError::Disconnected) => bail!("the QMP connection closed"),
        }
    }

    /// Sends a command and waits for its reply; events meanwhile are kept. Returns the
    /// `return` value and the time the reply arrived.
    fn execute(&mut self, command: &str, arguments: Value) -> anyhow::Result<(Value, Instant)> {
        let message = json!({"execute": command, "arguments": arguments});
        writeln!(self.writer, "{message}").with_context(|| format!("send QMP {command}"))?;
        let deadline = Instant::now() + QMP_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (value, at) = self
                .next(left)
                .with_context(|| format!("reply to QMP {command}"))?;
            if let Some(result) = value.get("return") {
                return Ok((result.clone(), at));
            }
            if let Some(error) = value.get("error") {
                bail!("QMP {command} failed: {error}");
            }
            if value.get("event").is_some() {
                self.events.push((value, at));
            }
        }
    }

    /// Waits for the event `name` (also among those kept), at most `timeout`; fails on
    /// `BLOCK_JOB_ERROR` or on a `BLOCK_JOB_COMPLETED`/`BLOCK_JOB_CANCELLED` that is not
    /// awaited. Returns the event and its arrival time.
    fn wait_event(&mut self, name: &str, timeout: Duration) -> anyhow::Result<(Value, Instant)> {
        self.poll_event(name, timeout)?
            .with_context(|| format!("no QMP event {name} within {timeout:?}"))
    }

    /// Like [`Qmp::wait_event`], but `None` when `timeout` passes without the event.
    fn poll_event(
        &mut self,
        name: &str,
        timeout: Duration,
    ) -> anyhow::Result<Option<(Value, Instant)>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(at) = self.events.iter().position(|(e, _)| e["event"] == name) {
                return Ok(Some(self.events.remove(at)));
            }
            if let Some((bad, _)) = self.events.iter().find(|(e, _)| {
                matches!(
                    e["event"].as_str(),
                    Some("BLOCK_JOB_ERROR" | "BLOCK_JOB_COMPLETED" | "BLOCK_JOB_CANCELLED")
                )
            }) {
                bail!("waiting for {name}, got {bad}");
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((value, at)) => {
                    if value.get("event").is_some() {
                        self.events.push((value, at));
                    }
                }
                Err(RecvTimeoutError::Timeout) => return Ok(None),
                Err(RecvTimeoutError::Disconnected) => {
                    bail!("the QMP connection closed while waiting for {name}")
                }
            }
        }
    }
}

/// Where a storage daemon's NBD server listens, and with which TLS credentials.
struct NbdServer<'a> {
    /// QEMU's `addr.*` options of `--nbd-server`.
    addr: String,
    /// A directory with `ca-cert.pem`, `server-cert.pem` and `server-key.pem`.
    tls: Option<&'a Path>,
}

/// `qemu-storage-daemon` serving `image` as node `node` over NBD at `nbd`, with its monitor
/// at `qmp`; `client_tls` adds x509 client credentials (`tls0`) for an NBD client node.
fn storage_daemon(
    mut cmd: Command,
    image: &Path,
    node: &str,
    direct: bool,
    nbd: &NbdServer<'_>,
    client_tls: Option<&Path>,
    qmp: &Path,
) -> Command {
    for (dir, endpoint) in [(nbd.tls, "server"), (client_tls, "client")] {
        if let Some(dir) = dir {
            cmd.arg("--object").arg(format!(
                "tls-creds-x509,id=tls0,dir={},endpoint={endpoint}",
                dir.display()
            ));
        }
    }
    cmd.arg("--blockdev")
        .arg(format!(
            "driver=file,node-name={node}-file,filename={},cache.direct={}",
            image.display(),
            if direct { "on" } else { "off" }
        ))
        .arg("--blockdev")
        .arg(format!("driver=raw,node-name={node},file={node}-file"))
        .arg("--nbd-server")
        .arg(format!(
            "{}{}",
            nbd.addr,
            if nbd.tls.is_some() {
                ",tls-creds=tls0"
            } else {
                ""
            }
        ))
        .arg("--export")
        .arg(format!(
            "type=nbd,id=exp0,node-name={node},name={DISK},writable=on"
        ))
        .arg("--chardev")
        .arg(format!(
            "socket,id=qmp,path={},server=on,wait=off",
            qmp.display()
        ))
        .arg("--monitor")
        .arg("chardev=qmp");
    cmd
}

/// Makes a CA and, signed by it, a server and a client certificate for QEMU's NBD TLS
/// (`DIR/server/` and `DIR/client/`, the file names QEMU's `tls-creds-x509` expects; EC
/// P-256 keys; the server's issued to `localhost`). Returns `dir`.
pub(crate) fn make_tls_credentials(dir: &Path) -> anyhow::Result<PathBuf> {
    let server = dir.join("server");
    let client = dir.join("client");
    for d in [&server, &client] {
        fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
    }
    let openssl = |args: &[&str]| -> anyhow::Result<()> {
        run_timed(
            "openssl",
            Command::new("openssl").current_dir(dir).args(args),
            Duration::from_secs(30),
        )?
        .check(&format!("openssl {}", args.join(" ")))?;
        Ok(())
    };
    let key = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509", "-days", "30", "-subj", "/CN=tern-bench CA"];
    ca.extend(key);
    ca.extend(["-keyout", "ca-key.pem", "-out", "ca-cert.pem"]);
    openssl(&ca)?;
    for (name, usage, san) in [
        ("server", "serverAuth", "DNS:localhost,IP:127.0.0.1"),
        ("client", "clientAuth", "DNS:tern-bench-client"),
    ] {
        let ext = format!("{name}.ext");
        fs::write(
            dir.join(&ext),
            format!(
                "subjectAltName={san}\nextendedKeyUsage={usage}\nkeyUsage=digitalSignature,keyEncipherment\n"
            ),
        )?;
        let csr = format!("{name}.csr");
        let key_file = format!("{name}/{name}-key.pem");
        let cn = format!("/CN={}", if name == "server" { TLS_HOSTNAME } else { name });
        let mut req = vec!["req", "-subj", &cn];
        req.extend(key);
        req.extend(["-keyout", &key_file, "-out", &csr]);
        openssl(&req)?;
        let cert = format!("{name}/{name}-cert.pem");
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca-cert.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-days",
            "30",
            "-extfile",
            &ext,
            "-out",
            &cert,
        ])?;
        fs::copy(dir.join("ca-cert.pem"), dir.join(name).join("ca-cert.pem"))?;
    }
    Ok(dir.to_owned())
}

/// A started `qemu-storage-daemon` and its QMP connection.
struct Daemon {
    /// The process.
    guard: Guard,
    /// Its stderr.
    log: LineWatcher,
    /// Its monitor, capabilities negotiated.
    qmp: Qmp,
}

impl Daemon {
    /// Spawns `cmd` and connects to its monitor at `qmp` (which is up only once the daemon
    /// has processed its options, so its NBD export listens too).
    fn start(name: &str, mut cmd: Command, qmp: &Path) -> anyhow::Result<Self> {
        let mut guard = Guard::spawn(name, &mut cmd, Stdio::piped())?;
        let mut log = LineWatcher::new(
            guard
                .child_mut()
                .stderr
                .take()
                .with_context(|| format!("{name} stderr"))?,
        );
        let qmp = Qmp::connect(qmp, &mut guard, &mut log).with_context(|| name.to_owned())?;
        Ok(Self { guard, log, qmp })
    }
}

/// The job's progress: `(offset, len)`.
fn job_progress(qmp: &mut Qmp) -> anyhow::Result<Option<(u64, u64)>> {
    let (jobs, _) = qmp.execute("query-block-jobs", json!({}))?;
    Ok(jobs
        .as_array()
        .and_then(|jobs| jobs.iter().find(|j| j["device"] == JOB))
        .and_then(|job| Some((job["offset"].as_u64()?, job["len"].as_u64()?))))
}

/// One run of QEMU's mirror (`system`) on the image of repetition `rep`; returns it and the
/// image size.
pub(crate) fn run_one(bench: &Bench<'_>, rep: u32, system: System) -> anyhow::Result<(Run, u64)> {
    let System::Qemu { tls, .. } = system else {
        bail!("{system} is not a QEMU system");
    };
    let copy_mode = system.copy_mode().unwrap_or("background");
    let case = bench.case;
    let dir = bench.dir();
    bench.clean()?;
    let source = dir.join("src.img");
    let target = dir.join("dst.img");
    let size_bytes = bench.gen_image(rep)?;
    fs::File::create(&target)
        .and_then(|f| f.set_len(size_bytes))
        .with_context(|| format!("create {}", target.display()))?;
    let caches_dropped = process::drop_caches();
    let tls_dir = match (tls, &bench.env.qemu_tls) {
        (false, _) => None,
        (true, Some(dir)) => Some(dir.as_path()),
        (true, None) => bail!("{system}: no TLS credentials were made"),
    };

    let dst_addr = SocketAddr::new(bench.link.target_ip(), process::free_tcp_port()?);
    let server_tls = tls_dir.map(|d| d.join("server"));
    let client_tls = tls_dir.map(|d| d.join("client"));
    let mut dst = Daemon::start(
        "qemu-storage-daemon (target)",
        storage_daemon(
            bench.link.on_target(Path::new("qemu-storage-daemon")),
            &target,
            "dst",
            case.qemu_target_cache == "none",
            &NbdServer {
                addr: format!(
                    "addr.type=inet,addr.host={},addr.port={}",
                    dst_addr.ip(),
                    dst_addr.port()
                ),
                tls: server_tls.as_deref(),
            },
            None,
            &dir.join("dst.qmp"),
        ),
        &dir.join("dst.qmp"),
    )?;
    // The source's export is for the guest on this host: a Unix socket, as Tern's.
    let mut src = Daemon::start(
        "qemu-storage-daemon (source)",
        storage_daemon(
            Command::new("qemu-storage-daemon"),
            &source,
            "src",
            case.cache == "none",
            &NbdServer {
                addr: format!("addr.type=unix,addr.path={}", dir.join("src.nbd").display()),
                tls: None,
            },
            client_tls.as_deref(),
            &dir.join("src.qmp"),
        ),
        &dir.join("src.qmp"),
    )?;
    let route = bench.link.route_tcp(dst_addr)?;
    let mut guest = bench.start_guest(size_bytes)?;
    let link_before = bench.link.bytes()?;

    let steps = (|| -> anyhow::Result<Steps> {
        let qmp = &mut src.qmp;
        let mut server = json!({
            "driver": "nbd",
            "node-name": "tgt",
            "server": {
                "type": "inet",
                "host": route.addr.ip().to_string(),
                "port": route.addr.port().to_string(),
            },
            "export": DISK,
        });
        if tls {
            server["tls-creds"] = json!("tls0");
            server["tls-hostname"] = json!(TLS_HOSTNAME);
        }
        qmp.execute("blockdev-add", server)?;
        let t0_ms = now_unix_ms();
        let t0 = Instant::now();
        qmp.execute(
            "blockdev-mirror",
            json!({
                "job-id": JOB,
                "device": "src",
                "target": "tgt",
                "sync": "full",
                "copy-mode": copy_mode,
            }),
        )?;
        let deadline = t0 + Duration::from_secs(CONVERGE_TIMEOUT_S);
        let mut course = Vec::new();
        let ready_at = loop {
            if let Some((_, at)) = qmp.poll_event("BLOCK_JOB_READY", COURSE_INTERVAL)? {
                break at;
            }
            if Instant::now() >= deadline {
                bail!("no BLOCK_JOB_READY within {CONVERGE_TIMEOUT_S} s");
            }
            if let Some((offset, len)) = job_progress(qmp)? {
                course.push(CoursePoint {
                    t_s: t0.elapsed().as_secs_f64(),
                    remaining_bytes: len.saturating_sub(offset),
                    done_bytes: offset,
                });
            }
        };
        let converge_s = ready_at.duration_since(t0).as_secs_f64();
        if let Some(guest) = guest.take() {
            guest.pause()?;
        }
        let processed = job_progress(qmp)?.map_or(0, |(offset, _)| offset);
        let complete = Instant::now();
        qmp.execute("block-job-complete", json!({"device": JOB}))?;
        let (done, done_at) = qmp.wait_event("BLOCK_JOB_COMPLETED", QMP_TIMEOUT)?;
        if let Some(error) = done["data"].get("error") {
            bail!("the mirror job failed: {error}");
        }
        // The final offset: what the job processed, dirtied areas again included.
        let processed = done["data"]["offset"].as_u64().unwrap_or(processed);
        Ok(Steps {
            t0_ms,
            t1_ms: t0_ms + converge_s * 1e3,
            converge_s,
            total_s: done_at.duration_since(t0).as_secs_f64(),
            downtime_ms: done_at.duration_since(complete).as_secs_f64() * 1e3,
            processed,
            course,
        })
    })();
    let steps = match steps {
        Ok(steps) => steps,
        Err(e) => {
            src.log.collect();
            dst.log.collect();
            let fio_tail = guest
                .as_mut()
                .map(|g| {
                    g.log.collect();
                    g.log.tail()
                })
                .unwrap_or_default();
            return Err(e.context(format!(
                "QEMU ({system}) repetition {rep} failed\n--- source daemon:\n{}\n--- target daemon:\n{}\n--- fio:\n{fio_tail}",
                src.log.tail(),
                dst.log.tail(),
            )));
        }
    };
    let link_bytes = bench.link.bytes()?.saturating_sub(link_before);
    let source_usage = src.guard.usage()?;
    let target_usage = dst.guard.usage()?;

    // Daemons down (they flush), then the independent check.
    drop(src.qmp);
    src.guard.stop(DAEMON_EXIT_TIMEOUT)?;
    drop(dst.qmp);
    dst.guard.stop(DAEMON_EXIT_TIMEOUT)?;
    drop(route);
    let target_equal = process::images_equal(&source, &target)?;
    if !target_equal {
        bail!(
            "QEMU ({system}) repetition {rep}: qemu-img compare says {} differs from {} (kept for inspection)",
            target.display(),
            source.display()
        );
    }
    let mut run = Run {
        system,
        rep,
        caches_dropped,
        total_s: steps.total_s,
        converge_s: steps.converge_s,
        downtime_ms: steps.downtime_ms,
        equal: target_equal,
        link_bytes,
        bytes_again: steps.processed.saturating_sub(size_bytes),
        source: source_usage,
        target: target_usage,
        course: steps.course,
        before: None,
        during: None,
        during_vs_intended: None,
        during_latency_us: Vec::new(),
        timeline_mib_s: Vec::new(),
        migrate_at_s: None,
        fio_bytes_written: None,
        tern: None,
    };
    bench.add_guest(&mut run, steps.t0_ms, steps.t1_ms)?;
    bench.keep_logs(&format!("{system}-rep-{rep}"))?;
    bench.clean()?;
    Ok((run, size_bytes))
}

/// The measured points of one QEMU run.
struct Steps {
    /// `blockdev-mirror` sent, Unix ms.
    t0_ms: f64,
    /// `BLOCK_JOB_READY` arrived, Unix ms.
    t1_ms: f64,
    /// `blockdev-mirror` → `BLOCK_JOB_READY`, s.
    converge_s: f64,
    /// `blockdev-mirror` → `BLOCK_JOB_COMPLETED`, s.
    total_s: f64,
    /// `block-job-complete` → `BLOCK_JOB_COMPLETED`, ms.
    downtime_ms: f64,
    /// The job's final offset: bytes processed, dirtied areas again included.
    processed: u64,
    /// `query-block-jobs` until READY.
    course: Vec<CoursePoint>,
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::process::Command;

    use super::{NbdServer, storage_daemon};

    fn args(cmd: &Command) -> Vec<String> {
        cmd.get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn storage_daemon_exports_the_raw_node_over_nbd_with_a_qmp_monitor() {
        let cmd = storage_daemon(
            Command::new("qemu-storage-daemon"),
            Path::new("/d/src.img"),
            "src",
            false,
            &NbdServer {
                addr: "addr.type=unix,addr.path=/d/src.nbd".to_owned(),
                tls: None,
            },
            None,
            Path::new("/d/src.qmp"),
        );
        assert_eq!(
            args(&cmd),
            [
                "--blockdev",
                "driver=file,node-name=src-file,filename=/d/src.img,cache.direct=off",
                "--blockdev",
                "driver=raw,node-name=src,file=src-file",
                "--nbd-server",
                "addr.type=unix,addr.path=/d/src.nbd",
                "--export",
                "type=nbd,id=exp0,node-name=src,name=disk,writable=on",
                "--chardev",
                "socket,id=qmp,path=/d/src.qmp,server=on,wait=off",
                "--monitor",
                "chardev=qmp",
            ]
        );
    }

    #[test]
    fn tls_credentials_go_to_the_server_or_the_client_node() {
        let server = storage_daemon(
            Command::new("qemu-storage-daemon"),
            Path::new("/d/dst.img"),
            "dst",
            true,
            &NbdServer {
                addr: "addr.type=inet,addr.host=10.231.0.2,addr.port=1234".to_owned(),
                tls: Some(Path::new("/t/server")),
            },
            None,
            Path::new("/d/dst.qmp"),
        );
        let server = args(&server);
        assert_eq!(
            server[..2],
            [
                "--object",
                "tls-creds-x509,id=tls0,dir=/t/server,endpoint=server"
            ]
        );
        assert!(server.contains(
            &"addr.type=inet,addr.host=10.231.0.2,addr.port=1234,tls-creds=tls0".to_owned()
        ));
        let client = storage_daemon(
            Command::new("qemu-storage-daemon"),
            Path::new("/d/src.img"),
            "src",
            false,
            &NbdServer {
                addr: "addr.type=unix,addr.path=/d/src.nbd".to_owned(),
                tls: None,
            },
            Some(Path::new("/t/client")),
            Path::new("/d/src.qmp"),
        );
        let client = args(&client);
        assert_eq!(
            client[..2],
            [
                "--object",
                "tls-creds-x509,id=tls0,dir=/t/client,endpoint=client"
            ]
        );
        assert!(client.contains(&"addr.type=unix,addr.path=/d/src.nbd".to_owned()));
    }
}
