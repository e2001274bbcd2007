//! Startup probe: can this process use io_uring with the opcodes the backend needs?
//!
//! io_uring is often unavailable even on new kernels: Docker ≥ 25 and containerd ≥ 2.0
//! block its syscalls with seccomp (`EPERM`), the `kernel.io_uring_disabled` sysctl turns
//! it off, and old kernels lack some opcodes. The probe follows Cloud Hypervisor: set up a
//! tiny ring, ask the kernel which opcodes it supports, and check ours.

use io_uring::{IoUring, Probe, opcode};

use crate::error::{BlockError, BlockErrorKind};

/// Opcodes the io_uring backend submits, with names for the error message.
const REQUIRED_OPCODES: [(u8, &str); 7] = [
    (opcode::Read::CODE, "READ"),
    (opcode::Write::CODE, "WRITE"),
    (opcode::ReadFixed::CODE, "READ_FIXED"),
    (opcode::WriteFixed::CODE, "WRITE_FIXED"),
    (opcode::Fsync::CODE, "FSYNC"),
    (opcode::Fallocate::CODE, "FALLOCATE"),
    (opcode::PollAdd::CODE, "POLL_ADD"),
];

/// Checks that io_uring can be set up here and supports every opcode the backend uses.
///
/// The error has kind [`BlockErrorKind::UringUnavailable`] and a message naming the cause,
/// so callers can log why they fell back. It is cheap (one small ring), so it is run for
/// every device rather than cached: a sandbox may change between opens.
pub fn probe_uring() -> Result<(), BlockError> {
    let ring = IoUring::new(2).map_err(|error| {
        let hint = match error.raw_os_error() {
            Some(libc::EPERM) => {
                " (blocked: seccomp, as in Docker >= 25 or containerd >= 2.0, or the \
                 kernel.io_uring_disabled sysctl)"
            }
            Some(libc::ENOSYS) => " (kernel built without io_uring)",
            Some(libc::ENOMEM) => " (RLIMIT_MEMLOCK too low for the ring)",
            _ => "",
        };
        unavailable(format!("io_uring_setup failed: {error}{hint}"), Some(error))
    })?;
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|error| {
            unavailable(
                format!("io_uring opcode probe failed (kernel older than 5.6?): {error}"),
                Some(error),
            )
        })?;
    let missing: Vec<&str> = REQUIRED_OPCODES
        .iter()
        .filter(|(code, _)| !probe.is_supported(*code))
        .map(|(_, name)| *name)
        .collect();
    if !missing.is_empty() {
        return Err(unavailable(
            format!("kernel lacks io_uring opcodes {}", missing.join(", ")),
            None,
        ));
    }
    Ok(())
}

/// A [`BlockErrorKind::UringUnavailable`] error with `message` as the reason.
pub(crate) fn unavailable(message: String, source: Option<std::io::Error>) -> BlockError {
    let mut error =
        BlockError::new(BlockErrorKind::UringUnavailable, None, 0).with_message(message);
    error.source = source;
    error
}
