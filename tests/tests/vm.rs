//! A real QEMU VM (TCG, busybox guest) migrates with its disk: storage through `tern export` →
//! `tern serve --export-nbd`, memory through QEMU, switched over together by `tern
//! vm-migrate`. The guest writes sequence-numbered records and prints an ACK after each
//! completed write; afterwards every acknowledged record must be on the target disk.
//!
//! Needs qemu-system-x86_64 (QEMU 10), busybox-static, cpio and a Debian cloud kernel:
//! `scripts/vm-deps.sh` installs them (README's test command and CI run it).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tern_tests::{KillOnDrop, free_udp_addr, keygen, spawn_serve_with, spawn_until, tern};

const DISK: u64 = 64 << 20;
const BLOCK: u64 = 4096;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn kernel() -> PathBuf {
    let dir = std::env::var_os("TERN_VM_DIR")
        .map_or_else(|| PathBuf::from("/var/cache/tern-vm"), PathBuf::from);
    let boot = dir.join("kernel/boot");
    let found = std::fs::read_dir(&boot).ok().and_then(|entries| {
        entries.filter_map(Result::ok).map(|e| e.path()).find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
    });
    let qemu = Command::new("qemu-system-x86_64").arg("--version").output();
    match (found, qemu) {
        (Some(kernel), Ok(out)) if out.status.success() => kernel,
        _ => panic!(
            "this test needs QEMU 10 and a guest kernel in {}: run scripts/vm-deps.sh \
             (README's test command does)",
            boot.display()
        ),
    }
}

struct Vm {
    dir: tempfile::TempDir,
    src_img: PathBuf,
    dst_img: PathBuf,
    listen: std::net::SocketAddr,
    dst_fp: String,
    serve: KillOnDrop,
    _export: KillOnDrop,
    _src_qemu: KillOnDrop,
    dst_qemu: KillOnDrop,
}

impl Vm {
    /// Daemons, images and two QEMUs: the source running the guest on `tern export`, the
    /// destination waiting (`-incoming defer`) with its disk on the target's export.
    fn start() -> Vm {
        let kernel = kernel();
        let dir = tempfile::tempdir().unwrap();
        let p = |name: &str| dir.path().join(name);
        let initrd = p("initrd.cpio.gz");
        let built = Command::new(repo().join("scripts/vm-initramfs.sh"))
            .arg(&initrd)
            .status()
            .unwrap();
        assert!(built.success(), "vm-initramfs.sh failed");
        // Random content, so a record that did not arrive cannot match by accident; the
        // target starts all zeros (sparse) with the right size, as a destination VMM needs.
        let mut content = vec![0u8; DISK as usize];
        rand::fill(&mut content[..]);
        let src_img = p("src.img");
        std::fs::write(&src_img, &content).unwrap();
        let dst_img = p("dst.img");
        std::fs::File::create(&dst_img)
            .unwrap()
            .set_len(DISK)
            .unwrap();
        let (src_id, src_fp) = keygen(dir.path(), "src-id");
        let (dst_id, dst_fp) = keygen(dir.path(), "dst-id");
        let listen = free_udp_addr();
        let serve = spawn_serve_with(
            listen,
            &[format!("disk={}", dst_img.display())],
            &dst_id,
            &src_fp,
            &["--export-nbd", &format!("unix:{}", p("dst.nbd").display())],
        );
        let mut export = tern();
        export
            .args(["export", "--log", "info", "--nbd"])
            .arg(format!("unix:{}", p("src.nbd").display()))
            .arg("--control")
            .arg(p("ctl.sock"))
            .arg("--identity")
            .arg(&src_id)
            .arg("--image")
            .arg(format!("disk={}", src_img.display()));
        let (export, _) = spawn_until(export, "serving");
        let qemu = |side: &str, incoming: bool| {
            let mut command = Command::new("qemu-system-x86_64");
            command
                .args([
                    "-accel", "tcg", "-machine", "pc", "-m", "256", "-smp", "1", "-display", "none",
                ])
                .args(["-no-reboot", "-net", "none", "-nodefaults", "-kernel"])
                .arg(&kernel)
                .arg("-initrd")
                .arg(&initrd)
                .args(["-append", "console=ttyS0 panic=-1 quiet", "-serial"])
                .arg(format!("file:{}", p(&format!("{side}.serial")).display()))
                .arg("-drive")
                .arg(format!(
                    "file=nbd+unix:///disk?socket={},format=raw,if=virtio,cache=none",
                    p(&format!("{side}.nbd")).display()
                ))
                .arg("-qmp")
                .arg(format!(
                    "unix:{},server=on,wait=off",
                    p(&format!("{side}.qmp")).display()
                ))
                .stdout(Stdio::null());
            if incoming {
                command.args(["-incoming", "defer"]);
            }
            KillOnDrop(command.spawn().expect("qemu-system-x86_64"))
        };
        let src_qemu = qemu("src", false);
        let dst_qemu = qemu("dst", true);
        let vm = Vm {
            dir,
            src_img,
            dst_img,
            listen,
            dst_fp,
            serve,
            _export: export,
            _src_qemu: src_qemu,
            dst_qemu,
        };
        vm.wait_acks("src", 50, Duration::from_secs(60));
        vm
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The guest's acknowledged records in a serial log, in order.
    fn acks(&self, side: &str) -> Vec<(u64, u64)> {
        let text =
            std::fs::read_to_string(self.path(&format!("{side}.serial"))).unwrap_or_default();
        // Only complete lines: the VM may be stopped in the middle of printing one.
        let complete = &text[..text.rfind('\n').map_or(0, |end| end + 1)];
        complete
            .lines()
            .filter_map(|line| {
                let mut words = line.split_whitespace();
                (words.next() == Some("ACK")).then_some(())?;
                Some((words.next()?.parse().ok()?, words.next()?.parse().ok()?))
            })
            .collect()
    }

    /// Waits (polling the serial log) until `side` acknowledged `count` records.
    fn wait_acks(&self, side: &str, count: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.acks(side).len() < count {
            assert!(
                Instant::now() < deadline,
                "{side}: fewer than {count} ACKs in {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn vm_migrate(&self, exec_before_memory: Option<&str>) -> std::process::Output {
        let mut command = tern();
        command
            .args(["vm-migrate", "--json", "--source-qmp"])
            .arg(self.path("src.qmp"))
            .arg("--dest-qmp")
            .arg(self.path("dst.qmp"))
            .arg("--control")
            .arg(self.path("ctl.sock"))
            .args(["--to", &self.listen.to_string(), "--peer", &self.dst_fp])
            .args([
                "--memory-uri",
                &format!("tcp:127.0.0.1:{}", free_tcp_port()),
            ]);
        if let Some(cmd) = exec_before_memory {
            command.args(["--exec-before-memory", cmd]);
        }
        command.output().unwrap()
    }
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Acknowledged records whose block on `disk` holds an older record (or none): lost writes.
fn missing(disk: &Path, acks: &[(u64, u64)]) -> usize {
    let data = std::fs::read(disk).unwrap();
    let mut latest: HashMap<u64, u64> = HashMap::new();
    for &(seq, block) in acks {
        let entry = latest.entry(block).or_default();
        *entry = (*entry).max(seq);
    }
    latest
        .iter()
        .filter(|&(&block, &seq)| {
            let start = (block * BLOCK) as usize;
            let record = &data[start..start + 40];
            let on_disk = std::str::from_utf8(record)
                .ok()
                .and_then(|r| r.strip_prefix("VMRECIPE SEQ "))
                .and_then(|r| r.get(..10))
                .and_then(|n| n.parse::<u64>().ok());
            on_disk.is_none_or(|found| found < seq)
        })
        .count()
}

fn qmp(path: &Path, command: &str) -> Value {
    let stream = UnixStream::connect(path).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    for request in ["qmp_capabilities", command] {
        writeln!(writer, "{{\"execute\": \"{request}\"}}").unwrap();
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            let value: Value = serde_json::from_str(&line).unwrap();
            if let Some(result) = value.get("return") {
                if request == command {
                    return result.clone();
                }
                break;
            }
        }
    }
    unreachable!()
}

#[test]
fn a_qemu_vm_migrates_with_its_disk_and_no_acknowledged_write_is_lost() {
    let mut vm = Vm::start();
    // The negative control: the target disk as it was when memory migration started, i.e.
    // without Tern's syncing during the RAM copy and its final sync in the pause.
    let snapshot = vm.path("snapshot.img");
    let hook = format!(
        "cp --sparse=always {} {}",
        vm.dst_img.display(),
        snapshot.display()
    );
    let output = vm.vm_migrate(Some(&hook));
    assert!(
        output.status.success(),
        "vm-migrate: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let figures: Value = serde_json::from_slice(&output.stdout).unwrap();
    eprintln!("figures: {figures}");
    assert_eq!(figures["verified"], true, "{figures}");
    assert_eq!(figures["destination"], "running", "{figures}");

    // The guest carries on at the destination without a gap in its sequence.
    let src_acks = vm.acks("src");
    vm.wait_acks("dst", 30, Duration::from_secs(60));
    let _ = qmp(&vm.path("dst.qmp"), "stop");
    vm.dst_qemu.0.kill().unwrap();
    vm.dst_qemu.0.wait().unwrap();
    vm.serve.0.kill().unwrap();
    vm.serve.0.wait().unwrap();
    let dst_acks = vm.acks("dst");
    let src_last = src_acks.last().unwrap().0;
    let dst_first = dst_acks.first().unwrap().0;
    assert_eq!(
        dst_first,
        src_last + 1,
        "sequence gap: source ended at {src_last}, destination began at {dst_first}"
    );

    // Every acknowledged record is on the target disk...
    let all: Vec<(u64, u64)> = src_acks.iter().chain(&dst_acks).copied().collect();
    assert_eq!(
        missing(&vm.dst_img, &all),
        0,
        "acknowledged writes lost on the target"
    );
    // ...and the check can fail: without Tern's sync after memory migration started, writes
    // the guest saw acknowledged are missing.
    let lost_without_sync = missing(&snapshot, &src_acks);
    assert!(
        lost_without_sync > 0,
        "negative control found nothing missing"
    );
    eprintln!(
        "{} records acknowledged on the source, {} on the destination; without the final sync {lost_without_sync} would be lost",
        src_acks.len(),
        dst_acks.len()
    );
}

#[test]
fn a_vm_migration_that_fails_midway_leaves_the_vm_running_on_its_source_disk() {
    let vm = Vm::start();
    // The target host dies just before memory migration starts.
    let hook = format!("kill -9 {}", vm.serve.0.id());
    let output = vm.vm_migrate(Some(&hook));
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("runs on at the source"), "{stderr}");
    // The source VM runs on and keeps writing.
    let status = qmp(&vm.path("src.qmp"), "query-status");
    assert_eq!(status["status"], "running", "{status}");
    let before = vm.acks("src").len();
    vm.wait_acks("src", before + 30, Duration::from_secs(60));
    let _ = qmp(&vm.path("src.qmp"), "stop");
    // Every record it saw acknowledged is on its own disk.
    assert_eq!(missing(&vm.src_img, &vm.acks("src")), 0);
    let status = tern()
        .arg("ctl")
        .arg(vm.path("ctl.sock"))
        .arg("query-status")
        .output()
        .unwrap();
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["disks"][0]["access"], "open", "{status}");
    assert!(
        matches!(
            status["migrations"][0]["phase"].as_str(),
            Some("failed" | "cancelled")
        ),
        "{status}"
    );
}
