//! Helpers for Tern's end-to-end tests: finding the `tern` binary, running it, free ports.
//!
//! The tests themselves live in `tests/tests/`; they start real `tern` processes that talk
//! QUIC on loopback and write real files.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

/// Path of the `tern` binary, built once per test process with the test's own profile so a
/// stale binary is never tested (`cargo` returns at once when it is up to date).
/// `TERN_BIN` overrides it.
pub fn tern_bin() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| match std::env::var_os("TERN_BIN") {
        Some(path) => PathBuf::from(path),
        None => build("tern", "tern"),
    })
    .clone()
}

/// Path of the `tern-bench` binary (next to `tern`, which it drives), built like
/// [`tern_bin`].
pub fn tern_bench_bin() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        tern_bin();
        build("tern-bench", "tern-bench")
    })
    .clone()
}

/// Builds `bin` of `package` with the test's own profile; returns its path.
fn build(package: &str, bin: &str) -> PathBuf {
    // target/<profile>/deps/<test binary> → target/<profile>/<bin>
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary sits in target/<profile>/deps");
    let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cargo.args(["build", "--quiet", "-p", package, "--bin", bin]);
    // `cargo test` sets CARGO_* variables for the test process; some build scripts track
    // such variables, so passing them on would make this build and the next `cargo test`
    // rebuild each other's dependencies every time.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_") && key != "CARGO_HOME" && key != "CARGO_TARGET_DIR" {
            cargo.env_remove(key.as_ref());
        }
    }
    if dir.ends_with("release") {
        cargo.arg("--release");
    }
    let status = cargo.status().expect("run cargo build");
    assert!(status.success(), "cargo build -p {package} failed");
    dir.join(bin)
}

/// A `tern` command with logs quiet unless `RUST_LOG` asks otherwise.
pub fn tern() -> Command {
    let mut command = Command::new(tern_bin());
    command.stdin(Stdio::null());
    command
}

/// Runs `tern ARGS` to completion.
pub fn run(args: &[&str]) -> Output {
    tern().args(args).output().expect("spawn tern")
}

/// A UDP port that was free a moment ago on 127.0.0.1.
pub fn free_udp_addr() -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
    socket.local_addr().expect("local addr")
}

/// A key pair made with `tern keygen`; returns its directory and fingerprint.
pub fn keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let out = dir.join(name);
    let output = run(&["keygen", "--out", out.to_str().unwrap()]);
    assert!(output.status.success(), "keygen: {output:?}");
    let fingerprint = String::from_utf8(output.stdout).unwrap().trim().to_string();
    assert!(fingerprint.starts_with("sha256:"), "{fingerprint}");
    (out, fingerprint)
}

/// A child process killed when dropped, so a failing test leaves nothing running.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // A child spawned with `in_own_group` leads a process group: kill all of it. For
        // other children there is no such group and this does nothing. (fio's forked job
        // processes start groups of their own: the tests run fio with `--thread`.)
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.0.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Makes `command` start its own process group, so [`KillOnDrop`] kills its children too.
pub fn in_own_group(command: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    command.process_group(0)
}

/// Starts `tern serve` and waits until it listens (its log says so on stderr).
pub fn spawn_serve(
    listen: SocketAddr,
    images: &[&Path],
    identity: &Path,
    peer: &str,
) -> KillOnDrop {
    let images: Vec<String> = images.iter().map(|p| p.display().to_string()).collect();
    spawn_serve_with(listen, &images, identity, peer, &[])
}

/// Starts `tern serve` with `images` given as `PATH` or `NAME=PATH` and `extra` flags.
pub fn spawn_serve_with(
    listen: SocketAddr,
    images: &[String],
    identity: &Path,
    peer: &str,
    extra: &[&str],
) -> KillOnDrop {
    let mut command = tern();
    command
        .args(["serve", "--listen", &listen.to_string(), "--identity"])
        .arg(identity)
        .args(["--peer", peer, "--log", "info"])
        .args(extra);
    for image in images {
        command.arg("--image").arg(image);
    }
    spawn_until(command, "waiting for the source").0
}

/// Spawns `command` and waits until a line of its stderr contains `ready`; returns the
/// child and the lines up to that one. stderr keeps being drained (and echoed to the
/// test's stderr, shown when a test fails) so the child never blocks on a full pipe.
pub fn spawn_until(mut command: Command, ready: &str) -> (KillOnDrop, Vec<String>) {
    use std::io::{BufRead, BufReader};
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tern");
    let stderr = child.stderr.take().expect("piped stderr");
    let mut lines = BufReader::new(stderr).lines();
    let mut seen = Vec::new();
    loop {
        match lines.next() {
            Some(Ok(line)) => {
                let done = line.contains(ready);
                seen.push(line);
                if done {
                    break;
                }
            }
            other => panic!(
                "{command:?} ended before {ready:?}: {other:?}\n{}",
                seen.join("\n")
            ),
        }
    }
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            eprintln!("{line}");
        }
    });
    (KillOnDrop(child), seen)
}

/// Bytes allocated on disk for a file.
pub fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("stat").blocks() * 512
}

/// A child whose stderr lines arrive on a channel (and are echoed to the test's stderr).
pub struct Logged {
    /// The process; killed when dropped.
    pub child: KillOnDrop,
    lines: std::sync::mpsc::Receiver<String>,
    /// Every line seen so far by [`Logged::wait_line`].
    pub seen: Vec<String>,
}

impl Logged {
    /// Spawns `command` with stderr piped into the channel.
    pub fn spawn(mut command: Command) -> Self {
        use std::io::{BufRead, BufReader};
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("{line}");
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Self {
            child: KillOnDrop(child),
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a stderr line containing `pattern`; panics with the log after `timeout`
    /// or if the process ends first.
    pub fn wait_line(&mut self, pattern: &str, timeout: std::time::Duration) -> String {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(pattern) {
                        return line;
                    }
                }
                Err(e) => panic!(
                    "no line with {pattern:?} ({e}); log:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Waits for the process to exit; returns its status, stdout and the rest of its log.
    pub fn finish(mut self) -> (std::process::ExitStatus, String, Vec<String>) {
        use std::io::Read;
        let mut stdout = String::new();
        if let Some(mut out) = self.child.0.stdout.take() {
            let _ = out.read_to_string(&mut stdout);
        }
        let status = self.child.0.wait().expect("wait");
        self.seen.extend(self.lines.iter());
        (status, stdout, self.seen)
    }
}

/// The value of `key=VALUE` in a tracing log line.
pub fn log_field(line: &str, key: &str) -> Option<String> {
    let start = line.find(&format!("{key}="))? + key.len() + 1;
    let rest = &line[start..];
    let end = rest.find(' ').unwrap_or(rest.len());
    Some(rest[..end].trim_matches('"').to_string())
}
