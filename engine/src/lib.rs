//! Tern's migration engine.
//!
//! - [`source`] and [`target`]: the migration protocol as deterministic sans-IO state
//!   machines (no sockets, no disks, no clock), driven by tests directly and by [`driver`] in
//!   production.
//! - [`driver`]: thin async drivers that connect the state machines to `tern-blockdev` disks
//!   and `tern-transport` QUIC streams.
//! - [`api`]: the embedding API a VMM calls: `Migration::start`, `wait_converged`,
//!   `switchover` → `Handoff`, `commit` / `rollback`; no async runtime needed by the caller.
//! - [`bitmap`]: the wait-free dirty bitmap guest writes mark and the copier harvests.
//! - [`tracked`]: `TrackedDisk`, the device guest IO goes through so writes are tracked.
//! - [`throttle`]: the guest write limit `auto` mode applies as a last resort.
//! - [`digest`]: block digests for verification.
//! - [`compression`]: when to compress, decided from measured CPU and link behaviour.
//!
//! Invariants I1–I6 are listed in `ARCHITECTURE.md`; each is asserted where it is enforced.
#![forbid(unsafe_code)]

pub mod api;
pub mod bitmap;
pub mod compression;
pub mod digest;
pub mod driver;
pub mod error;
pub mod source;
pub mod target;
pub mod throttle;
pub mod tracked;

pub use api::{Handoff, Migration, MigrationConfig, ProgressHandle};
pub use error::MigrationError;
pub use source::{
    SourceConfig, SourceDisk, SourceEvent, SourceMigration, SourceProgress, SourceSummary,
    Transmit, VerifyMode,
};
pub use target::{TargetEvent, TargetIo, TargetMigration};
pub use tracked::TrackedDisk;
