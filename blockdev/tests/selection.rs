//! Backend selection and opening: `Auto` picks io_uring where it works, `TERN_IO` and
//! `IoChoice::Sync` force the thread pool, and a seccomp filter blocking io_uring (as
//! Docker ≥ 25 does) makes `Auto` fall back while `Uring` fails with a clear error.
//!
//! The seccomp and environment tests re-run this test binary as a child process (see
//! `child_entry`), because a seccomp filter cannot be removed and environment variables
//! are process-global.

use std::path::Path;
use std::process::Command;

use tern_blockdev::{
    BackendKind, BlockDevice, BlockErrorKind, IoBuf, IoChoice, OpenOptions, probe_uring,
};

/// Environment variable telling `child_entry` which scenario to run.
const CHILD_MARKER: &str = "TERN_BLOCKDEV_TEST_CHILD";

fn options(io: IoChoice) -> OpenOptions {
    OpenOptions {
        io,
        direct: true,
        read_only: false,
        create: Some(1 << 20),
    }
}

fn roundtrip(device: &BlockDevice) {
    device
        .write_blocking(4096, IoBuf::from_slice(b"tern"))
        .expect("write");
    assert_eq!(&device.read_blocking(4096, 4).expect("read")[..], b"tern");
}

#[test]
fn auto_picks_io_uring_when_the_probe_succeeds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let device =
        BlockDevice::open(&dir.path().join("a.img"), &options(IoChoice::Auto)).expect("open");
    match probe_uring() {
        Ok(()) => assert_eq!(device.kind(), BackendKind::Uring),
        Err(error) => {
            eprintln!("io_uring unavailable here ({error}); Auto must pick sync");
            assert_eq!(device.kind(), BackendKind::Sync);
        }
    }
    roundtrip(&device);
}

#[test]
fn sync_choice_gives_the_sync_backend() {
    let dir = tempfile::tempdir().expect("tempdir");
    let choice: IoChoice = "sync".parse().expect("parse");
    let device = BlockDevice::open(&dir.path().join("s.img"), &options(choice)).expect("open");
    assert_eq!(device.kind(), BackendKind::Sync);
    roundtrip(&device);
}

#[test]
fn tern_io_env_selects_the_default_backend() {
    let check = |value: &str, expect: &str| {
        let output = run_child("env", &[("TERN_IO", value)]);
        assert!(
            output.contains(&format!("child-env-kind={expect}")),
            "TERN_IO={value}: {output}"
        );
    };
    check("sync", "sync");
    check("bogus", "invalid");
    match probe_uring() {
        Ok(()) => {
            check("uring", "io_uring");
            check("", "io_uring");
        }
        Err(error) => eprintln!("skipping TERN_IO=uring check: {error}"),
    }
}

#[test]
fn seccomp_blocked_io_uring_falls_back_to_sync() {
    if !cfg!(target_arch = "x86_64") {
        eprintln!("skipping: the seccomp filter in this test is written for x86_64");
        return;
    }
    let output = run_child("seccomp", &[]);
    assert!(output.contains("child-seccomp-ok"), "{output}");
}

#[test]
fn create_checks_the_size_of_an_existing_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("c.img");
    let device = BlockDevice::open(&path, &options(IoChoice::Sync)).expect("create");
    assert_eq!(device.size(), 1 << 20);
    drop(device);
    assert_eq!(std::fs::metadata(&path).expect("stat").len(), 1 << 20);
    BlockDevice::open(&path, &options(IoChoice::Sync)).expect("reopen with same size");
    let mut other_size = options(IoChoice::Sync);
    other_size.create = Some(4096);
    let error = BlockDevice::open(&path, &other_size).expect_err("size mismatch");
    assert_eq!(error.kind, BlockErrorKind::SizeMismatch);
    assert!(error.to_string().contains("c.img"), "{error}");
}

#[test]
fn open_errors_are_typed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut no_create = options(IoChoice::Sync);
    no_create.create = None;
    let error = BlockDevice::open(&dir.path().join("missing"), &no_create).expect_err("missing");
    assert_eq!(error.kind, BlockErrorKind::NotFound);
    let error = BlockDevice::open(dir.path(), &no_create).expect_err("directory");
    assert!(
        matches!(
            error.kind,
            BlockErrorKind::InvalidArgument | BlockErrorKind::Io
        ),
        "{error}"
    );
}

#[test]
fn read_only_devices_refuse_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("r.img");
    std::fs::write(&path, vec![5u8; 8192]).expect("write image");
    let read_only = OpenOptions {
        io: IoChoice::Auto,
        direct: true,
        read_only: true,
        create: None,
    };
    let device = BlockDevice::open(&path, &read_only).expect("open");
    assert_eq!(&device.read_blocking(0, 3).expect("read")[..], &[5, 5, 5]);
    let error = device
        .write_blocking(0, IoBuf::from_slice(&[1]))
        .expect_err("write");
    assert_eq!(error.kind, BlockErrorKind::PermissionDenied);
    assert_eq!(
        device.discard_blocking(0, 1).expect_err("discard").kind,
        BlockErrorKind::PermissionDenied
    );
    device.flush_blocking().expect("flush is allowed");
}

#[test]
fn direct_io_is_used_where_the_file_system_reports_alignment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let device =
        BlockDevice::open(&dir.path().join("d.img"), &options(IoChoice::Sync)).expect("open");
    match device.dio_alignment() {
        Some(alignment) => {
            assert!(device.direct());
            assert!(alignment.offset.is_power_of_two() && alignment.memory.is_power_of_two());
        }
        None => {
            eprintln!("file system reports no DIO alignment; buffered I/O expected");
            assert!(!device.direct());
        }
    }
}

/// Runs `child_entry` in a fresh copy of this test binary with `scenario`, returning its
/// stdout and stderr; fails if the child fails.
fn run_child(scenario: &str, env: &[(&str, &str)]) -> String {
    let exe = std::env::current_exe().expect("current exe");
    let mut command = Command::new(exe);
    command
        .args([
            "--exact",
            "child_entry",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_MARKER, scenario)
        .env_remove("TERN_IO");
    for (key, value) in env {
        command.env(key, value);
    }
    let output = command.output().expect("spawn child");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "child failed: {text}");
    text
}

/// Not a test by itself: the child half of the tests above, selected by `CHILD_MARKER`.
#[test]
#[ignore = "helper run in a child process by the selection tests"]
fn child_entry() {
    let Ok(scenario) = std::env::var(CHILD_MARKER) else {
        eprintln!("{CHILD_MARKER} unset: nothing to do outside a child process");
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    match scenario.as_str() {
        "env" => child_env(dir.path()),
        "seccomp" => child_seccomp(dir.path()),
        other => panic!("unknown child scenario {other}"),
    }
}

fn child_env(dir: &Path) {
    if let Err(error) = IoChoice::from_env() {
        assert_eq!(error.kind, BlockErrorKind::InvalidArgument);
        println!("child-env-kind=invalid");
        return;
    }
    let options = OpenOptions {
        create: Some(4096),
        ..OpenOptions::default()
    };
    let device = BlockDevice::open(&dir.join("e.img"), &options).expect("open");
    println!("child-env-kind={}", device.kind());
}

#[cfg(target_arch = "x86_64")]
fn child_seccomp(dir: &Path) {
    install_io_uring_filter();
    let error = probe_uring().expect_err("io_uring must be blocked by the filter");
    assert_eq!(error.kind, BlockErrorKind::UringUnavailable);
    assert_eq!(error.errno(), Some(libc::EPERM), "{error}");

    let auto = BlockDevice::open(&dir.join("auto.img"), &options(IoChoice::Auto))
        .expect("Auto falls back");
    assert_eq!(auto.kind(), BackendKind::Sync);
    roundtrip(&auto);

    let error = BlockDevice::open(&dir.join("uring.img"), &options(IoChoice::Uring))
        .expect_err("forced io_uring must fail");
    assert_eq!(error.kind, BlockErrorKind::UringUnavailable);
    let message = error.to_string();
    assert!(message.contains("TERN_IO=sync"), "{message}");
    assert!(message.contains("io_uring_setup"), "{message}");
    println!("child-seccomp-ok: {message}");
}

#[cfg(not(target_arch = "x86_64"))]
fn child_seccomp(_dir: &Path) {
    unreachable!("the parent skips this scenario off x86_64");
}

/// Installs a seccomp filter that makes `io_uring_setup`, `io_uring_enter` and
/// `io_uring_register` (x86_64 syscalls 425-427) fail with EPERM, like Docker's default
/// profile, and allows everything else.
#[cfg(target_arch = "x86_64")]
fn install_io_uring_filter() {
    const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
    const ARCH_OFFSET: u32 = 4; // offsetof(struct seccomp_data, arch)
    const NR_OFFSET: u32 = 0; // offsetof(struct seccomp_data, nr)
    let statement = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let jump = |code: u32, k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let allow = libc::SECCOMP_RET_ALLOW;
    let eperm = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
    let mut filter = [
        /* 0 */ statement(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, ARCH_OFFSET),
        /* 1 */
        jump(
            libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
            AUDIT_ARCH_X86_64,
            1,
            0,
        ),
        /* 2 */ statement(libc::BPF_RET | libc::BPF_K, allow),
        /* 3 */ statement(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, NR_OFFSET),
        /* 4 */ jump(libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K, 425, 0, 2),
        /* 5 */ jump(libc::BPF_JMP | libc::BPF_JGT | libc::BPF_K, 427, 1, 0),
        /* 6 */ statement(libc::BPF_RET | libc::BPF_K, eperm),
        /* 7 */ statement(libc::BPF_RET | libc::BPF_K, allow),
    ];
    let program = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_mut_ptr(),
    };
    // SAFETY: PR_SET_NO_NEW_PRIVS takes only integer arguments.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    assert_eq!(
        rc,
        0,
        "PR_SET_NO_NEW_PRIVS: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: `program` points at `filter`, a valid BPF program of `len` instructions that
    // outlives the call (the kernel copies it).
    let rc = unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &program as *const libc::sock_fprog,
        )
    };
    assert_eq!(rc, 0, "PR_SET_SECCOMP: {}", std::io::Error::last_os_error());
}
