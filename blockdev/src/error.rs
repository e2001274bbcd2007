//! Typed errors for every block-device operation.
//!
//! Disk errors are operating errors, not bugs: they travel back to the caller as a
//! [`BlockError`] with enough context (operation, offset, path) to be logged on their own,
//! and a [`BlockErrorKind`] that the engine can match on without parsing strings.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// The kind of operation an error or a fault-injection rule refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpKind {
    /// A read of a byte range.
    Read,
    /// A write of a byte range.
    Write,
    /// A `fdatasync` of the whole device.
    Flush,
    /// Deallocating a byte range.
    Discard,
    /// Making a byte range read as zeros.
    WriteZeroes,
}

impl OpKind {
    /// Every kind, in declaration order; used to size per-kind tables.
    pub(crate) const ALL: [OpKind; 5] = [
        OpKind::Read,
        OpKind::Write,
        OpKind::Flush,
        OpKind::Discard,
        OpKind::WriteZeroes,
    ];

    /// Position of this kind in [`OpKind::ALL`].
    pub(crate) fn index(self) -> usize {
        self as usize
    }

    fn as_str(self) -> &'static str {
        match self {
            OpKind::Read => "read",
            OpKind::Write => "write",
            OpKind::Flush => "flush",
            OpKind::Discard => "discard",
            OpKind::WriteZeroes => "write-zeroes",
        }
    }
}

impl fmt::Display for OpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What went wrong, coarse enough to decide on a reaction (retry, fail the migration,
/// tell the operator to free space).
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlockErrorKind {
    /// The byte range does not fit inside the device; nothing was read or written.
    OutOfRange,
    /// The file system or device is full (`ENOSPC`, `EDQUOT`).
    NoSpace,
    /// An I/O error (`EIO`) or any errno without a more specific kind.
    Io,
    /// The device or file system does not support the operation.
    Unsupported,
    /// An existing file's size differs from the size asked for at open.
    SizeMismatch,
    /// The path does not exist.
    NotFound,
    /// The caller may not perform the operation (`EACCES`, `EPERM`, `EROFS`, read-only device).
    PermissionDenied,
    /// io_uring was asked for explicitly but cannot be used here.
    UringUnavailable,
    /// The device's I/O thread has stopped and cannot take the request.
    Closed,
    /// An argument was malformed (bad `TERN_IO` value, not a file or block device, `EINVAL`).
    InvalidArgument,
}

impl BlockErrorKind {
    /// Maps an errno to the kind the engine cares about.
    pub(crate) fn from_errno(errno: i32) -> BlockErrorKind {
        match errno {
            libc::ENOSPC | libc::EDQUOT => BlockErrorKind::NoSpace,
            libc::ENOENT => BlockErrorKind::NotFound,
            libc::EACCES | libc::EPERM | libc::EROFS => BlockErrorKind::PermissionDenied,
            libc::EOPNOTSUPP | libc::ENOTTY | libc::ENOSYS => BlockErrorKind::Unsupported,
            libc::EINVAL => BlockErrorKind::InvalidArgument,
            _ => BlockErrorKind::Io,
        }
    }

    /// The errno an injected or synthesised error of this kind stands for, so a VMM can
    /// report something sensible to its guest even when no syscall failed.
    fn errno(self) -> Option<i32> {
        match self {
            BlockErrorKind::OutOfRange | BlockErrorKind::InvalidArgument => Some(libc::EINVAL),
            BlockErrorKind::NoSpace => Some(libc::ENOSPC),
            BlockErrorKind::Io => Some(libc::EIO),
            BlockErrorKind::Unsupported => Some(libc::EOPNOTSUPP),
            BlockErrorKind::NotFound => Some(libc::ENOENT),
            BlockErrorKind::PermissionDenied => Some(libc::EPERM),
            BlockErrorKind::SizeMismatch | BlockErrorKind::UringUnavailable => None,
            BlockErrorKind::Closed => Some(libc::ESHUTDOWN),
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            BlockErrorKind::OutOfRange => "range is outside the device",
            BlockErrorKind::NoSpace => "no space left on device",
            BlockErrorKind::Io => "I/O error",
            BlockErrorKind::Unsupported => "operation not supported",
            BlockErrorKind::SizeMismatch => "size mismatch",
            BlockErrorKind::NotFound => "not found",
            BlockErrorKind::PermissionDenied => "permission denied",
            BlockErrorKind::UringUnavailable => "io_uring unavailable",
            BlockErrorKind::Closed => "device closed",
            BlockErrorKind::InvalidArgument => "invalid argument",
        }
    }
}

impl fmt::Display for BlockErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error from opening or operating on a block device.
///
/// `Display` reads like `write at offset 4096 of /x/y.img: no space left on device`; the
/// underlying `io::Error`, when there is one, is the [`std::error::Error::source`].
#[derive(Debug, thiserror::Error)]
pub struct BlockError {
    /// What went wrong.
    pub kind: BlockErrorKind,
    /// The operation that failed; `None` while opening or probing.
    pub op: Option<OpKind>,
    /// Byte offset of the failed operation (0 for flush and open).
    pub offset: u64,
    /// The device's path; `None` for memory devices.
    pub path: Option<PathBuf>,
    /// Extra detail (for example "injected fault" or why io_uring is unavailable).
    pub message: Option<String>,
    /// The OS error behind this one, if any.
    #[source]
    pub source: Option<io::Error>,
}

impl BlockError {
    /// An error of `kind` for `op` at `offset`, without path or detail.
    pub(crate) fn new(kind: BlockErrorKind, op: Option<OpKind>, offset: u64) -> BlockError {
        BlockError {
            kind,
            op,
            offset,
            path: None,
            message: None,
            source: None,
        }
    }

    /// Wraps an OS error, choosing the kind from its errno.
    pub(crate) fn from_io(op: Option<OpKind>, offset: u64, error: io::Error) -> BlockError {
        let kind = match error.raw_os_error() {
            Some(errno) => BlockErrorKind::from_errno(errno),
            None if error.kind() == io::ErrorKind::UnexpectedEof => BlockErrorKind::Io,
            None if error.kind() == io::ErrorKind::NotFound => BlockErrorKind::NotFound,
            None if error.kind() == io::ErrorKind::PermissionDenied => {
                BlockErrorKind::PermissionDenied
            }
            None => BlockErrorKind::Io,
        };
        BlockError {
            source: Some(error),
            ..BlockError::new(kind, op, offset)
        }
    }

    /// Wraps a negative errno as returned in an io_uring completion.
    pub(crate) fn from_errno(op: Option<OpKind>, offset: u64, errno: i32) -> BlockError {
        BlockError::from_io(op, offset, io::Error::from_raw_os_error(errno))
    }

    /// Adds a detail message.
    pub(crate) fn with_message(mut self, message: impl Into<String>) -> BlockError {
        self.message = Some(message.into());
        self
    }

    /// Adds the device path unless one is already set.
    pub(crate) fn with_path(mut self, path: Option<&std::path::Path>) -> BlockError {
        if self.path.is_none() {
            self.path = path.map(std::path::Path::to_path_buf);
        }
        self
    }

    /// The errno this error corresponds to: the OS error when there was one, otherwise the
    /// conventional errno for the kind (`EIO` for injected I/O errors, `ENOSPC` for no space).
    pub fn errno(&self) -> Option<i32> {
        self.source
            .as_ref()
            .and_then(io::Error::raw_os_error)
            .or_else(|| self.kind.errno())
    }

    /// Whether this error was produced by fault injection rather than by the OS; logs use
    /// this to tell test faults from real ones.
    pub fn is_injected(&self) -> bool {
        self.message
            .as_deref()
            .is_some_and(|message| message.starts_with(INJECTED_TAG))
    }

    fn describe(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.op {
            Some(op) => write!(f, "{op} at offset {}", self.offset)?,
            None => f.write_str("open")?,
        }
        if let Some(path) = &self.path {
            write!(f, " of {}", path.display())?;
        }
        write!(f, ": {}", self.kind)?;
        // Name the errno for the catch-all kind, because "I/O error" alone hides whether it
        // was EIO or something rarer like EBADF.
        if self.kind == BlockErrorKind::Io
            && let Some(errno) = self.source.as_ref().and_then(io::Error::raw_os_error)
        {
            write!(f, " (errno {errno})")?;
        }
        if let Some(message) = &self.message {
            write!(f, ": {message}")?;
        }
        Ok(())
    }
}

impl fmt::Display for BlockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.describe(f)
    }
}

/// Prefix of the message of every injected error.
pub(crate) const INJECTED_TAG: &str = "injected fault";

#[cfg(test)]
mod tests {
    use super::*;

    fn check(error: BlockError, expect: &str) {
        assert_eq!(error.to_string(), expect);
    }

    #[test]
    fn display_names_operation_offset_path_and_kind() {
        check(
            BlockError::from_errno(Some(OpKind::Write), 4096, libc::ENOSPC)
                .with_path(Some("/x/y.img".as_ref())),
            "write at offset 4096 of /x/y.img: no space left on device",
        );
        check(
            BlockError::from_errno(Some(OpKind::Read), 0, libc::EIO),
            "read at offset 0: I/O error (errno 5)",
        );
        check(
            BlockError::new(BlockErrorKind::SizeMismatch, None, 0)
                .with_path(Some("/d".as_ref()))
                .with_message("file is 1 bytes, expected 2"),
            "open of /d: size mismatch: file is 1 bytes, expected 2",
        );
    }

    #[test]
    fn errno_prefers_os_error_then_kind() {
        assert_eq!(
            BlockError::from_errno(None, 0, libc::EBADF).errno(),
            Some(libc::EBADF)
        );
        assert_eq!(
            BlockError::new(BlockErrorKind::NoSpace, None, 0).errno(),
            Some(libc::ENOSPC)
        );
    }

    #[test]
    fn errno_maps_to_kind() {
        assert_eq!(
            BlockErrorKind::from_errno(libc::EDQUOT),
            BlockErrorKind::NoSpace
        );
        assert_eq!(
            BlockErrorKind::from_errno(libc::EROFS),
            BlockErrorKind::PermissionDenied
        );
        assert_eq!(BlockErrorKind::from_errno(libc::EBADF), BlockErrorKind::Io);
    }
}
