//! Thin async drivers (tokio) that connect the sans-IO state machines to disks and QUIC.
//!
//! They decide nothing about what to copy: they perform the machines' IO and transmissions,
//! feed completions back, and run CPU work (compression, hashing) off the machine's task.

pub mod source;
pub mod target;

pub use source::{
    Command, EventSink, LiveHooks, Reconnect, SourceOptions, SourceReport, run_source,
};
pub use target::{
    OnAccepted, OnComplete, TargetHooks, TargetReport, incomplete_marker, run_target,
    run_target_with, serve_one, serve_one_with,
};

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

/// Reads control messages from the peer's control stream into the driver's input channel,
/// until the stream ends or fails; the last input is then a failure (`failed`).
pub(crate) async fn read_control<I>(
    connection: tern_transport::quinn::Connection,
    mut reader: tern_transport::FrameReader,
    tx: tokio::sync::mpsc::UnboundedSender<I>,
    message: impl Fn(tern_transport::Control) -> I,
    failed: impl Fn(String) -> I,
) {
    use tern_transport::{Control, Frame};
    loop {
        let (input, stop) = match reader.next().await {
            Ok(Some((Frame::Control(body), _))) => match Control::decode(&body) {
                Ok(control) => (message(control), false),
                Err(e) => (failed(format!("bad control message: {e}")), true),
            },
            Ok(Some(_)) => (failed("data frame on the control stream".into()), true),
            Ok(None) => (failed("peer closed the control stream".into()), true),
            Err(e) => (failed(describe_failure(&connection, &e)), true),
        };
        if tx.send(input).is_err() || stop {
            return;
        }
    }
}
