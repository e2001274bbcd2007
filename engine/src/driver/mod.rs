//! Thin async drivers (tokio) that connect the sans-IO state machines to disks and QUIC.
//!
//! They decide nothing about what to copy: they perform the machines' IO and transmissions,
//! feed completions back, and run CPU work (compression, hashing) off the machine's task.

pub mod source;
pub mod target;

pub use source::{Command, LiveHooks, SourceOptions, SourceReport, run_source};
pub use target::{TargetReport, incomplete_marker, run_target, serve_one};

/// Describes a stream failure: when the peer closed the connection, its close reason (which
/// carries the peer's error message) says more than "connection lost".
pub(crate) fn describe_failure(
    connection: &tern_transport::quinn::Connection,
    error: &dyn std::fmt::Display,
) -> String {
    match connection.close_reason() {
        Some(tern_transport::quinn::ConnectionError::ApplicationClosed(close)) => {
            format!(
                "peer closed the connection: {}",
                String::from_utf8_lossy(&close.reason)
            )
        }
        Some(reason) => format!("{error} ({reason})"),
        None => error.to_string(),
    }
}
