//! Why a migration failed.

use thiserror::Error;

/// A migration failure. The source stays authoritative whatever the variant (invariant I4).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum MigrationError {
    /// The peer broke the protocol (bad frame, range outside the disk, unexpected message).
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The peers cannot work together (version, features, disk count or size).
    #[error("incompatible peer: {0}")]
    Incompatible(String),
    /// A disk operation failed on this side.
    #[error("disk {disk}: {message}")]
    Disk {
        /// Disk index.
        disk: u32,
        /// What failed, with the OS error.
        message: String,
    },
    /// The peer reported an error and gave up.
    #[error("peer failed: {0}")]
    Peer(String),
    /// The target's bytes differ from the source's after the copy.
    #[error("verification failed: disk {disk} differs in bytes {start}..{end}")]
    VerifyMismatch {
        /// Disk index.
        disk: u32,
        /// First differing byte (start of the differing digest block).
        start: u64,
        /// End of the differing digest block.
        end: u64,
    },
    /// The connection failed.
    #[error("transport: {0}")]
    Transport(String),
    /// Cancelled by the operator or the embedding VMM.
    #[error("cancelled")]
    Cancelled,
    /// Rolled back by the VMM before commit: the source stays authoritative.
    #[error("rolled back before commit; the source stays authoritative")]
    RolledBack,
}
