//! Thin async drivers (tokio) that connect the sans-IO state machines to disks and QUIC.
//!
//! They decide nothing about what to copy: they perform the machines' IO and transmissions,
//! feed completions back, and run CPU work (compression, hashing) off the machine's task.

pub mod source;
pub mod target;

pub use source::{SourceOptions, SourceReport, run_source};
pub use target::{TargetReport, incomplete_marker, run_target, serve_one};
