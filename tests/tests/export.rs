//! `tern export` and `tern serve --export-nbd` with real NBD clients (`fio`, `qemu-io`,
//! `qemu-img`), driven through the control API the way a script would (`tern ctl`).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::{Value, json};
use tern_tests::{KillOnDrop, free_udp_addr, keygen, run, spawn_serve_with, spawn_until, tern};

struct Setup {
    dir: tempfile::TempDir,
    src_id: PathBuf,
    src_fp: String,
    dst_id: PathBuf,
    dst_fp: String,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (src_id, src_fp) = keygen(dir.path(), "src-id");
        let (dst_id, dst_fp) = keygen(dir.path(), "dst-id");
        Self {
            dir,
            src_id,
            src_fp,
            dst_id,
            dst_fp,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn image(&self, name: &str, size: &str, seed: u64) -> PathBuf {
        let path = self.path(name);
        let output = run(&[
            "gen-image",
            "--out",
            path.to_str().unwrap(),
            "--size",
            size,
            "--seed",
            &seed.to_string(),
        ]);
        assert!(output.status.success(), "gen-image: {output:?}");
        path
    }

    /// `tern export` of `images` (NAME=PATH) on a Unix NBD socket; returns the child and
    /// the metrics address.
    fn export(&self, images: &[(&str, &Path)]) -> (KillOnDrop, String) {
        self.export_with(images, &[])
    }

    fn export_with(&self, images: &[(&str, &Path)], extra: &[&str]) -> (KillOnDrop, String) {
        let mut command = tern();
        command.arg("export").args(extra);
        command
            .args(["--log", "info", "--nbd"])
            .arg(format!("unix:{}", self.path("src.nbd").display()))
            .arg("--control")
            .arg(self.path("ctl.sock"))
            .arg("--identity")
            .arg(&self.src_id)
            .args(["--metrics", "127.0.0.1:0"]);
        for (name, path) in images {
            command
                .arg("--image")
                .arg(format!("{name}={}", path.display()));
        }
        let (child, lines) = spawn_until(command, "serving");
        let metrics = lines
            .iter()
            .find_map(|l| l.split("metrics=").nth(1))
            .expect("metrics address logged")
            .trim()
            .to_owned();
        (child, metrics)
    }

    fn serve(&self, listen: std::net::SocketAddr, images: &[(&str, &Path)]) -> KillOnDrop {
        self.serve_on(listen, images, "dst.nbd")
    }

    fn serve_on(
        &self,
        listen: std::net::SocketAddr,
        images: &[(&str, &Path)],
        nbd: &str,
    ) -> KillOnDrop {
        let images: Vec<String> = images
            .iter()
            .map(|(n, p)| format!("{n}={}", p.display()))
            .collect();
        let nbd = format!("unix:{}", self.path(nbd).display());
        spawn_serve_with(
            listen,
            &images,
            &self.dst_id,
            &self.src_fp,
            &["--export-nbd", &nbd],
        )
    }

    fn src_uri(&self, name: &str) -> String {
        format!(
            "nbd+unix:///{name}?socket={}",
            self.path("src.nbd").display()
        )
    }

    fn dst_uri(&self, name: &str) -> String {
        format!(
            "nbd+unix:///{name}?socket={}",
            self.path("dst.nbd").display()
        )
    }

    fn ctl(&self, args: &[&str]) -> Value {
        let output = tern()
            .arg("ctl")
            .arg(self.path("ctl.sock"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "tern ctl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let text = String::from_utf8_lossy(&output.stdout);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("ctl output {text:?}: {e}"))
    }
}

fn qemu_io(uri: &str, commands: &[&str]) -> Output {
    let mut command = Command::new("qemu-io");
    command.args(["-f", "raw"]);
    for c in commands {
        command.args(["-c", c]);
    }
    command
        .arg(uri)
        .output()
        .expect("qemu-io (apt-get install qemu-utils)")
}

fn qemu_io_ok(uri: &str, commands: &[&str]) {
    let output = qemu_io(uri, commands);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && !stdout.contains("failed") && !stdout.contains("verification"),
        "qemu-io {commands:?}: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A guest: fio random 4–64 KiB writes at QD8 over NBD for `runtime` seconds at `rate`, as
/// threads in its own process group, so killing it leaves nothing behind.
fn fio_guest(uri: &str, runtime: &str, rate: &str) -> KillOnDrop {
    KillOnDrop(
        tern_tests::in_own_group(&mut Command::new("fio"))
            .args([
                "--name=guest",
                "--thread",
                "--ioengine=nbd",
                "--rw=randwrite",
            ])
            .args([
                "--bsrange=4k-64k",
                "--iodepth=8",
                "--size=64M",
                "--time_based",
            ])
            .arg(format!("--runtime={runtime}"))
            .arg(format!("--rate={rate}"))
            .arg(format!("--uri={uri}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("fio (apt-get install fio)"),
    )
}

fn compare(a: &str, b: &str) -> Output {
    Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", a, b])
        .output()
        .expect("qemu-img")
}

fn scrape(addr: &str) -> String {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text
}

#[test]
fn fio_writes_through_the_export_during_a_live_migration_and_both_disks_arrive_equal() {
    let s = Setup::new();
    let a = s.image("a.img", "64M", 1);
    let b = s.image("b.img", "32M", 2);
    let listen = free_udp_addr();
    let (a_dst, b_dst) = (s.path("a-dst.img"), s.path("b-dst.img"));
    // A destination VMM connects before the migration: its image exists with the right size
    // (b's does not, and its clients would wait for the size until the migration says it).
    std::fs::File::create(&a_dst)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let serve = s.serve(listen, &[("a", &a_dst), ("b", &b_dst)]);
    let (_export, metrics) = s.export(&[("a", &a), ("b", &b)]);

    // Before commit the target's export accepts the handshake but refuses IO.
    let refused = qemu_io(&s.dst_uri("a"), &["read 0 4k"]);
    assert!(
        String::from_utf8_lossy(&refused.stdout).contains("Operation not permitted"),
        "{refused:?}"
    );

    // A guest: fio random 4k–64k writes at QD8 on disk a for 4 s, qemu-io patterns on b.
    let fio_out = s.path("fio.json");
    let mut fio = KillOnDrop(
        tern_tests::in_own_group(&mut Command::new("fio"))
            .args([
                "--name=guest",
                "--ioengine=nbd",
                "--rw=randwrite",
                "--bsrange=4k-64k",
            ])
            .args([
                "--iodepth=8",
                "--size=64M",
                "--time_based",
                "--runtime=4",
                "--output-format=json",
            ])
            .arg(format!("--uri={}", s.src_uri("a")))
            .arg(format!("--output={}", fio_out.display()))
            .stdout(Stdio::null())
            .spawn()
            .expect("fio (apt-get install fio)"),
    );
    let started = s.ctl(&[
        "migrate",
        &format!("target={listen}"),
        &format!("peer={}", s.dst_fp),
    ]);
    assert_eq!(started["migration"], "m1", "{started}");
    qemu_io_ok(
        &s.src_uri("b"),
        &["write -P 0x5c 1m 300k", "write -z 5m 1m"],
    );
    s.ctl(&["wait", "converged", "--timeout", "120"]);
    let text = scrape(&metrics);
    assert!(
        text.contains("tern_migration_bytes_total{migration=\"m1\"} 100663296"),
        "{text}"
    );

    // The guest stops (fio's run ends), then switchover + commit.
    assert!(fio.0.wait().unwrap().success(), "fio failed");
    let report: Value = serde_json::from_slice(&std::fs::read(&fio_out).unwrap()).unwrap();
    let written = report["jobs"][0]["write"]["io_bytes"].as_u64().unwrap();
    assert!(written > 0, "fio wrote nothing");
    let done = s.ctl(&["switchover", "commit=true"]);
    assert_eq!(done["verified"], true, "{done}");
    assert!(done["downtime-ms"].as_f64().unwrap() > 0.0, "{done}");
    eprintln!(
        "fio wrote {} MiB during the migration; commit report {done}",
        written >> 20
    );

    // Target == source, through the target's export and on disk.
    for (name, src, dst) in [("a", &a, &a_dst), ("b", &b, &b_dst)] {
        let through_nbd = compare(src.to_str().unwrap(), &s.dst_uri(name));
        assert!(through_nbd.status.success(), "{name}: {through_nbd:?}");
        let files = compare(src.to_str().unwrap(), dst.to_str().unwrap());
        assert!(files.status.success(), "{name}: {files:?}");
    }
    qemu_io_ok(
        &s.dst_uri("b"),
        &["read -P 0x5c 1m 300k", "read -P 0 5m 1m"],
    );
    // The source export now refuses IO: the disk lives on the target.
    let after = qemu_io(&s.src_uri("a"), &["read 0 4k"]);
    assert!(
        !after.status.success() || String::from_utf8_lossy(&after.stdout).contains("failed"),
        "{after:?}"
    );
    let status = tern()
        .args(["status", "--once"])
        .arg(s.path("ctl.sock"))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("committed"),
        "{status:?}"
    );
    drop(serve);
}

#[test]
fn rollback_after_switchover_releases_held_io_to_the_source_and_the_target_never_serves() {
    let s = Setup::new();
    let a = s.image("a.img", "16M", 3);
    let listen = free_udp_addr();
    let a_dst = s.path("a-dst.img");
    let mut serve = s.serve(listen, &[("a", &a_dst)]);
    let (_export, _) = s.export(&[("a", &a)]);
    s.ctl(&[
        "migrate",
        &format!("target={listen}"),
        &format!("peer={}", s.dst_fp),
        "mode=background",
    ]);
    s.ctl(&["wait", "converged", "--timeout", "60"]);
    let switched = s.ctl(&["switchover"]);
    assert_eq!(switched["verified"], true, "{switched}");

    // A write sent now is held at the gate, not answered...
    let held = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x99 0 64k"])
        .arg(s.src_uri("a"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    loop {
        let status = s.ctl(&["query-status"]);
        if status["disks"][0]["held-requests"] == 1 {
            break;
        }
        assert!(status["disks"][0]["access"] == "held", "{status}");
    }
    // ...until the rollback releases it to the source.
    s.ctl(&["rollback"]);
    let output = held.wait_with_output().unwrap();
    assert!(output.status.success(), "{output:?}");
    qemu_io_ok(&s.src_uri("a"), &["read -P 0x99 0 64k"]);
    let status = s.ctl(&["query-status"]);
    assert_eq!(status["migrations"][0]["phase"], "rolled-back", "{status}");
    // The target gives up, never serving the incomplete image.
    let exit = serve.0.wait().unwrap();
    assert!(!exit.success());
    assert!(s.path("a-dst.img.tern-incomplete").exists());
}

/// A raw control connection, as any JSON-lines client would open it.
struct Control {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Control {
    fn connect(path: &Path) -> Self {
        let stream = UnixStream::connect(path).unwrap();
        let mut control = Self {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        };
        let greeting = control.line();
        assert!(greeting["tern"]["protocol"].is_number(), "{greeting}");
        control
    }

    fn line(&mut self) -> Value {
        let mut line = String::new();
        assert!(
            self.reader.read_line(&mut line).unwrap() > 0,
            "connection closed"
        );
        serde_json::from_str(&line).unwrap()
    }

    /// Sends raw text and returns the next non-event line.
    fn send(&mut self, text: &str) -> Value {
        self.writer.write_all(text.as_bytes()).unwrap();
        self.writer.write_all(b"\n").unwrap();
        loop {
            let line = self.line();
            if line.get("event").is_none() {
                return line;
            }
        }
    }
}

#[test]
fn the_control_api_answers_bad_commands_with_json_errors_and_keeps_the_connection() {
    use std::os::unix::fs::PermissionsExt;
    let s = Setup::new();
    let a = s.image("a.img", "4M", 4);
    let (_export, _) = s.export(&[("a", &a)]);
    let mode = std::fs::metadata(s.path("ctl.sock"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let mut control = Control::connect(&s.path("ctl.sock"));
    let cases = [
        ("this is not json", "GenericError"),
        (r#"{"execute": "make-coffee"}"#, "CommandNotFound"),
        (r#"{"execute": "commit"}"#, "WrongState"),
        (r#"{"execute": "switchover"}"#, "WrongState"),
        (
            r#"{"execute": "migrate", "arguments": {"peer": "sha256:00"}}"#,
            "InvalidParameter",
        ),
        (
            r#"{"execute": "migrate", "arguments": {"target": "127.0.0.1:1", "bogus": 1}}"#,
            "InvalidParameter",
        ),
        (
            r#"{"execute": "migrate", "arguments": {"target": "nowhere", "peer": "x"}}"#,
            "InvalidParameter",
        ),
        (
            r#"{"execute": "migrate", "arguments": {"target": "127.0.0.1:1", "peer": "x", "disks": ["zz"]}}"#,
            "InvalidParameter",
        ),
        (
            r#"{"execute": "query-status", "arguments": {"x": 1}}"#,
            "InvalidParameter",
        ),
        (r#"{"execute": 5}"#, "GenericError"),
    ];
    for (text, class) in cases {
        let reply = control.send(text);
        assert_eq!(reply["error"]["class"], class, "{text} → {reply}");
        assert!(
            reply["error"]["desc"]
                .as_str()
                .is_some_and(|d| !d.is_empty()),
            "{reply}"
        );
    }
    let reply = control.send(&json!({"execute": "query-status", "id": "q1"}).to_string());
    assert_eq!(reply["id"], "q1");
    assert_eq!(reply["return"]["disks"][0]["name"], "a", "{reply}");
    // The CLI reports a daemon error as a failure with the daemon's words.
    let output = tern()
        .arg("ctl")
        .arg(s.path("ctl.sock"))
        .arg("commit")
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("WrongState"),
        "{output:?}"
    );
}

#[test]
fn one_daemon_runs_two_migrations_at_once_within_its_limit_and_tern_migrate_drives_a_third() {
    let s = Setup::new();
    let imgs: Vec<PathBuf> = (0..3)
        .map(|i| s.image(&format!("{i}.img"), "8M", 10 + i))
        .collect();
    let dsts: Vec<PathBuf> = (0..3).map(|i| s.path(&format!("{i}-dst.img"))).collect();
    let listens: Vec<_> = (0..3).map(|_| free_udp_addr()).collect();
    let _serves: Vec<KillOnDrop> = (0..3)
        .map(|i| s.serve_on(listens[i], &[("d", &dsts[i])], &format!("dst{i}.nbd")))
        .collect();
    let names = ["a", "b", "c"];
    let images: Vec<(&str, &Path)> = names
        .iter()
        .copied()
        .zip(imgs.iter().map(PathBuf::as_path))
        .collect();
    let (_export, _) = s.export_with(&images, &["--max-migrations", "2", "--bandwidth", "1G"]);
    let peer = format!("peer={}", s.dst_fp);
    for (i, disk) in ["a", "b"].iter().enumerate() {
        s.ctl(&[
            "migrate",
            &format!("target={}", listens[i]),
            &peer,
            &format!("disks={disk}"),
        ]);
    }
    // Both hold their disks until switchover; a third is over the limit.
    let status = s.ctl(&["query-status"]);
    assert_eq!(status["disks"][0]["migration"], "m1", "{status}");
    assert_eq!(status["disks"][1]["migration"], "m2", "{status}");
    let refused = tern()
        .arg("ctl")
        .arg(s.path("ctl.sock"))
        .args([
            "migrate",
            &format!("target={}", listens[2]),
            &peer,
            "disks=c",
        ])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("limit is 2"),
        "{refused:?}"
    );
    qemu_io_ok(&s.src_uri("b"), &["write -P 0x3b 2m 1m"]);
    for id in ["m2", "m1"] {
        let done = s.ctl(&["switchover", &format!("migration={id}"), "commit=true"]);
        assert_eq!(done["verified"], true, "{done}");
    }
    // The third disk through `tern migrate --control`, which switches over by itself.
    let output = tern()
        .args(["migrate", "--json", "--control"])
        .arg(s.path("ctl.sock"))
        .args([
            "--to",
            &listens[2].to_string(),
            "--peer",
            &s.dst_fp,
            "--disk",
            "c",
        ])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["verified"], true, "{report}");
    for i in 0..3 {
        let files = compare(imgs[i].to_str().unwrap(), dsts[i].to_str().unwrap());
        assert!(files.status.success(), "disk {i}: {files:?}");
    }
}

/// A live migration whose link is cut mid-bulk (past the idle timeout) while fio keeps
/// writing: the daemon reports `link-down`, reconnects, resumes, converges and commits, and
/// the target equals the source.
#[test]
fn a_live_migration_survives_a_link_cut_while_fio_writes() {
    use tern_bench::netem::{Impairment, UdpProxy};
    let s = Setup::new();
    let a = s.image("a.img", "64M", 5);
    let a_dst = s.path("a-dst.img");
    let listen = free_udp_addr();
    let images = [format!("a={}", a_dst.display())];
    let _serve = spawn_serve_with(
        listen,
        &images,
        &s.dst_id,
        &s.src_fp,
        &["--idle-timeout-s", "1", "--resume-window-s", "60"],
    );
    let proxy = UdpProxy::start(
        "127.0.0.1:0".parse().unwrap(),
        listen,
        Impairment::none(),
        Impairment::none(),
        9,
    )
    .unwrap();
    let (_export, _) = s.export(&[("a", &a)]);
    let mut fio = fio_guest(&s.src_uri("a"), "6", "16m");
    s.ctl(&[
        "migrate",
        &format!("target={}", proxy.local_addr()),
        &format!("peer={}", s.dst_fp),
        "rate-limit=32M",
        "idle-timeout-ms=1000",
    ]);
    assert!(proxy.wait_forwarded(16 << 20, std::time::Duration::from_secs(60)));
    proxy.cut();
    let down = s.ctl(&["wait", "link-down", "--timeout", "30"]);
    eprintln!("link down: {down}");
    proxy.restore();
    s.ctl(&["wait", "converged", "--timeout", "120"]);
    assert!(fio.0.wait().unwrap().success(), "fio failed");
    let done = s.ctl(&["switchover", "commit=true"]);
    assert_eq!(done["verified"], true, "{done}");
    let files = compare(a.to_str().unwrap(), a_dst.to_str().unwrap());
    assert!(files.status.success(), "{files:?}");
    assert!(proxy.stats().dropped_by_cut > 0, "the cut dropped nothing");
}

/// The source daemon is killed (SIGKILL) mid-migration while fio writes through it; the
/// guest's connection dies with it. Restarted on the same image, the daemon is asked to
/// migrate again: it resumes the recorded session, compares digests with the target, sends
/// what differs, converges and commits, and the target equals the source.
#[test]
fn a_source_daemon_killed_mid_migration_resumes_its_session_after_a_restart() {
    use tern_bench::netem::{Impairment, UdpProxy};
    let s = Setup::new();
    let a = s.image("a.img", "64M", 8);
    let a_dst = s.path("a-dst.img");
    let listen = free_udp_addr();
    let images = [format!("a={}", a_dst.display())];
    let mut command = tern();
    command
        .args(["serve", "--listen", &listen.to_string(), "--identity"])
        .arg(&s.dst_id)
        .args(["--peer", &s.src_fp, "--log", "info"])
        .args(["--idle-timeout-s", "1", "--resume-window-s", "60"])
        .arg("--image")
        .arg(&images[0]);
    let mut serve = tern_tests::Logged::spawn(command);
    serve.wait_line("waiting for the source", std::time::Duration::from_secs(60));
    let proxy = UdpProxy::start(
        "127.0.0.1:0".parse().unwrap(),
        listen,
        Impairment::none(),
        Impairment::none(),
        10,
    )
    .unwrap();
    let (mut export, _) = s.export(&[("a", &a)]);
    let fio = fio_guest(&s.src_uri("a"), "30", "8m");
    let migrate = [
        "migrate".to_string(),
        format!("target={}", proxy.local_addr()),
        format!("peer={}", s.dst_fp),
        "rate-limit=32M".into(),
        "idle-timeout-ms=1000".into(),
    ];
    let migrate: Vec<&str> = migrate.iter().map(String::as_str).collect();
    s.ctl(&migrate);
    assert!(proxy.wait_forwarded(24 << 20, std::time::Duration::from_secs(60)));
    export.0.kill().expect("SIGKILL the source daemon");
    let _ = export.0.wait();
    // The guest loses its disk with the daemon (fio's NBD engine may hang on the dead
    // socket rather than exit, so it goes too).
    drop(fio);
    serve.wait_line("keeping the session", std::time::Duration::from_secs(60));

    // Restarted on the same image: a guest writes again, the operator migrates again.
    let (_export, _) = s.export(&[("a", &a)]);
    qemu_io_ok(&s.src_uri("a"), &["write -P 0x3c 3m 200k"]);
    s.ctl(&migrate);
    s.ctl(&["wait", "converged", "--timeout", "120"]);
    let done = s.ctl(&["switchover", "commit=true"]);
    assert_eq!(done["verified"], true, "{done}");
    eprintln!("after a source restart: {done}");
    let (status, _, log) = serve.finish();
    assert!(status.success(), "serve failed:\n{}", log.join("\n"));
    let files = compare(a.to_str().unwrap(), a_dst.to_str().unwrap());
    assert!(files.status.success(), "{files:?}");
    assert!(
        (done["bytes-data"].as_u64().unwrap()) < 64 << 20,
        "the restarted daemon copied everything again: {done}"
    );
}
