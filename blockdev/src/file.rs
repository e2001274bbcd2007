//! Opening files and block devices, and the blocking I/O primitives on them.
//!
//! A [`FileTarget`] holds up to two descriptors for the same file: an O_DIRECT one used for
//! requests that meet the `statx(STATX_DIOALIGN)` alignment, and a buffered one for the
//! rest (for example the last, partial block of a 1 MiB + 1 byte image). Routing unaligned
//! requests to the buffered descriptor is what lets O_DIRECT be on by default without
//! ever padding a request, so a direct write can never extend the file. Both backends use
//! [`FileTarget::plan`] so they agree on which descriptor serves which bytes.
//!
//! The page cache stays coherent across the two descriptors: the kernel writes back and
//! invalidates cached pages around every O_DIRECT request, and `fdatasync` on either
//! descriptor flushes the whole inode.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::device::{DioAlignment, IoOp, OpenOptions};
use crate::error::{BlockError, BlockErrorKind, OpKind};

/// Largest single read or write handed to the kernel. Linux caps one `pread` at
/// `0x7ffff000` bytes and io_uring lengths are `u32`; 1 GiB is under both and is a multiple
/// of every DIO alignment, so splitting there keeps the pieces aligned.
pub(crate) const MAX_IO_BYTES: usize = 1 << 30;

/// How often an interrupted (`EINTR`/`EAGAIN`) syscall is retried before giving up.
pub(crate) const RETRY_LIMIT: u32 = 16;

/// Chunk size used when zeroing by writing, for file systems that cannot punch holes.
const ZERO_CHUNK_BYTES: usize = 1 << 20;

/// `fallocate` mode that deallocates and reads back as zeros, without changing the size.
pub(crate) const PUNCH_HOLE_MODE: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;

/// `fallocate` mode that zeroes (possibly as unwritten extents) without changing the size.
pub(crate) const ZERO_RANGE_MODE: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;

/// `_IOR(0x12, 114, u64)`: size of a block device in bytes (not exported by `libc`).
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// Whether an errno from `fallocate` means "try the next zeroing strategy" rather than a
/// real failure. `EINVAL` is included because block devices reject ranges that are not
/// sector-aligned, and the write fallback handles those.
pub(crate) fn zeroing_falls_back(errno: i32) -> bool {
    matches!(
        errno,
        libc::EOPNOTSUPP | libc::ENOSYS | libc::ENOTTY | libc::EINVAL
    )
}

/// An open file or block device.
pub(crate) struct FileTarget {
    path: PathBuf,
    buffered: File,
    /// O_DIRECT descriptor, present only when the open succeeded and `statx` reported an
    /// alignment the buffers can meet.
    direct: Option<File>,
    alignment: Option<DioAlignment>,
    block_device: bool,
    size: u64,
}

impl FileTarget {
    pub(crate) fn open(path: &Path, options: &OpenOptions) -> Result<FileTarget, BlockError> {
        let open_error =
            |error: io::Error| BlockError::from_io(None, 0, error).with_path(Some(path));
        if options.read_only && options.create.is_some() {
            return Err(BlockError::new(BlockErrorKind::InvalidArgument, None, 0)
                .with_path(Some(path))
                .with_message("create needs write access, but read_only is set"));
        }
        let mut std_options = std::fs::OpenOptions::new();
        std_options.read(true).write(!options.read_only);
        let buffered = match options.create {
            Some(size) => match std_options.clone().create_new(true).open(path) {
                Ok(file) => {
                    file.set_len(size).map_err(open_error)?;
                    file
                }
                Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {
                    std_options.open(path).map_err(open_error)?
                }
                Err(error) => return Err(open_error(error)),
            },
            None => std_options.open(path).map_err(open_error)?,
        };
        let metadata = buffered.metadata().map_err(open_error)?;
        let block_device = metadata.file_type().is_block_device();
        let size = if block_device {
            block_device_size(&buffered).map_err(open_error)?
        } else if metadata.is_file() {
            metadata.len()
        } else {
            return Err(BlockError::new(BlockErrorKind::InvalidArgument, None, 0)
                .with_path(Some(path))
                .with_message("not a regular file or block device"));
        };
        if let Some(expected) = options.create
            && size != expected
        {
            return Err(BlockError::new(BlockErrorKind::SizeMismatch, None, 0)
                .with_path(Some(path))
                .with_message(format!(
                    "existing file is {size} bytes, expected {expected}"
                )));
        }
        let alignment = dio_alignment(&buffered);
        let direct = if options.direct {
            open_direct(path, &std_options, alignment)
        } else {
            None
        };
        Ok(FileTarget {
            path: path.to_path_buf(),
            buffered,
            direct,
            alignment,
            block_device,
            size,
        })
    }

    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    pub(crate) fn dio_alignment(&self) -> Option<DioAlignment> {
        self.alignment
    }

    /// The buffered descriptor, used for flush, fallocate and unaligned transfers.
    pub(crate) fn buffered(&self) -> &File {
        &self.buffered
    }

    /// Which descriptor serves the next piece of a transfer of `remaining` bytes at
    /// `offset` from memory `address`, and how long that piece is (never zero when
    /// `remaining` is not).
    ///
    /// The aligned prefix goes to the O_DIRECT descriptor; whatever is left (or everything,
    /// if the start is unaligned) goes to the buffered one.
    pub(crate) fn plan(&self, offset: u64, remaining: usize, address: usize) -> (&File, usize) {
        let remaining = remaining.min(MAX_IO_BYTES);
        if let (Some(direct), Some(alignment)) = (&self.direct, self.alignment) {
            let offset_align = alignment.offset as usize;
            let aligned_len = remaining / offset_align * offset_align;
            if offset.is_multiple_of(u64::from(alignment.offset))
                && address.is_multiple_of(alignment.memory as usize)
                && aligned_len > 0
            {
                return (direct, aligned_len);
            }
        }
        (&self.buffered, remaining)
    }

    /// Performs `op` with blocking syscalls; returns the bytes transferred.
    pub(crate) fn execute(&self, op: &mut IoOp) -> Result<usize, BlockError> {
        let kind = op.kind();
        let result = match op {
            IoOp::Read { offset, buf } => self.transfer(kind, *offset, buf, |file, piece, at| {
                file.read_at(piece, at)
            }),
            IoOp::Write { offset, buf } => self.transfer(kind, *offset, buf, |file, piece, at| {
                file.write_at(piece, at)
            }),
            IoOp::Flush => self
                .buffered
                .sync_data()
                .map(|()| 0)
                .map_err(|error| BlockError::from_io(Some(kind), 0, error)),
            IoOp::Discard { offset, len } | IoOp::WriteZeroes { offset, len } => self
                .zero_range(kind, *offset, *len)
                .map(|()| usize::try_from(*len).unwrap_or(usize::MAX)),
        };
        result.map_err(|error| error.with_path(Some(&self.path)))
    }

    /// Reads or writes all of `buf` at `offset` in pieces chosen by [`FileTarget::plan`],
    /// retrying short transfers and interruptions.
    fn transfer(
        &self,
        kind: OpKind,
        offset: u64,
        buf: &mut [u8],
        mut syscall: impl FnMut(&File, &mut [u8], u64) -> io::Result<usize>,
    ) -> Result<usize, BlockError> {
        let mut done = 0;
        let mut retries = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            let rest = &mut buf[done..];
            let (file, piece_len) = self.plan(at, rest.len(), rest.as_ptr() as usize);
            match syscall(file, &mut rest[..piece_len], at) {
                Ok(0) => {
                    return Err(BlockError::new(BlockErrorKind::Io, Some(kind), at)
                        .with_message("no progress (did the file shrink?)"));
                }
                Ok(count) => done += count,
                Err(error)
                    if matches!(
                        error.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                    ) && retries < RETRY_LIMIT =>
                {
                    retries += 1;
                }
                Err(error) => return Err(BlockError::from_io(Some(kind), at, error)),
            }
        }
        Ok(done)
    }

    /// Makes `len` bytes at `offset` read as zeros: punch a hole (keeps files sparse, and
    /// on block devices is a discard that guarantees zeros), else `ZERO_RANGE`, else write
    /// zeros.
    pub(crate) fn zero_range(&self, kind: OpKind, offset: u64, len: u64) -> Result<(), BlockError> {
        if len == 0 {
            return Ok(());
        }
        for mode in [PUNCH_HOLE_MODE, ZERO_RANGE_MODE] {
            match fallocate(&self.buffered, mode, offset, len) {
                Ok(()) => return Ok(()),
                Err(error) if error.raw_os_error().is_some_and(zeroing_falls_back) => {}
                Err(error) => return Err(BlockError::from_io(Some(kind), offset, error)),
            }
        }
        self.write_zeroes_by_writing(kind, offset, len)
    }

    /// The last resort of [`FileTarget::zero_range`]: write zero bytes, 1 MiB at a time,
    /// through the buffered descriptor (so no alignment is needed).
    pub(crate) fn write_zeroes_by_writing(
        &self,
        kind: OpKind,
        offset: u64,
        len: u64,
    ) -> Result<(), BlockError> {
        let zeros = vec![0u8; ZERO_CHUNK_BYTES];
        let mut done = 0u64;
        while done < len {
            let piece = (len - done).min(ZERO_CHUNK_BYTES as u64) as usize;
            self.buffered
                .write_all_at(&zeros[..piece], offset + done)
                .map_err(|error| BlockError::from_io(Some(kind), offset + done, error))?;
            done += piece as u64;
        }
        Ok(())
    }

    /// Data ranges from `SEEK_DATA`/`SEEK_HOLE`, or the whole device where those are not
    /// supported.
    pub(crate) fn allocated_extents(&self) -> Result<Vec<Range<u64>>, BlockError> {
        let whole = if self.size == 0 {
            Vec::new()
        } else {
            std::iter::once(0..self.size).collect()
        };
        if self.block_device {
            return Ok(whole);
        }
        let mut extents: Vec<Range<u64>> = Vec::new();
        let mut position = 0u64;
        while position < self.size {
            let data = match seek(&self.buffered, position, libc::SEEK_DATA) {
                Ok(data) => data,
                // ENXIO: no data at or after `position`.
                Err(error) if error.raw_os_error() == Some(libc::ENXIO) => break,
                Err(error) if error.raw_os_error().is_some_and(zeroing_falls_back) => {
                    return Ok(whole);
                }
                Err(error) => return Err(BlockError::from_io(None, position, error)),
            };
            if data >= self.size {
                break;
            }
            let hole = seek(&self.buffered, data, libc::SEEK_HOLE)
                .map_err(|error| BlockError::from_io(None, data, error))?;
            let end = hole.min(self.size);
            if end <= data {
                // The file changed under us; stop rather than loop.
                break;
            }
            match extents.last_mut() {
                Some(last) if last.end >= data => last.end = last.end.max(end),
                _ => extents.push(data..end),
            }
            position = end;
        }
        Ok(extents)
    }
}

/// Opens `path` again with O_DIRECT, if the file system allows it and reported an
/// alignment that 4096-aligned buffers satisfy; otherwise logs why at debug level.
fn open_direct(
    path: &Path,
    options: &std::fs::OpenOptions,
    alignment: Option<DioAlignment>,
) -> Option<File> {
    let Some(alignment) = alignment else {
        tracing::debug!(path = %path.display(), "file system reports no O_DIRECT alignment; using buffered I/O");
        return None;
    };
    if alignment.memory as usize > crate::buf::BUF_ALIGN
        || !alignment.memory.is_power_of_two()
        || !alignment.offset.is_power_of_two()
    {
        tracing::debug!(path = %path.display(), ?alignment, "O_DIRECT alignment not supported by our buffers; using buffered I/O");
        return None;
    }
    let mut options = options.clone();
    options.custom_flags(libc::O_DIRECT);
    match options.open(path) {
        Ok(file) => Some(file),
        Err(error) => {
            tracing::debug!(path = %path.display(), %error, "O_DIRECT refused; using buffered I/O");
            None
        }
    }
}

/// The O_DIRECT alignment from `statx(STATX_DIOALIGN)`, or `None` when the kernel or file
/// system does not report one (which also means O_DIRECT is not supported there).
fn dio_alignment(file: &File) -> Option<DioAlignment> {
    // SAFETY: `statx` is plain old data, for which all-zero bytes are a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is open for the duration of the call, the path is a NUL-terminated
    // empty string (with AT_EMPTY_PATH, meaning the fd itself), and `stx` is a valid,
    // writable `statx` buffer.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return None;
    }
    if stx.stx_dio_mem_align == 0 || stx.stx_dio_offset_align == 0 {
        return None;
    }
    Some(DioAlignment {
        memory: stx.stx_dio_mem_align,
        offset: stx.stx_dio_offset_align,
    })
}

/// Bytes an unprivileged writer may still allocate on the file system holding `path`
/// (`statvfs`: available blocks × fragment size).
pub fn free_bytes(path: &std::path::Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `statvfs` is plain old data, for which all-zero bytes are a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and outlives the call; `st` is a valid, writable
    // `statvfs` buffer.
    let rc = unsafe { libc::statvfs(path.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at `size`.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

pub(crate) fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EFBIG));
    };
    // SAFETY: fallocate only reads its integer arguments; the fd is open.
    let rc = unsafe { libc::fallocate64(file.as_raw_fd(), mode, offset, len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn seek(file: &File, offset: u64, whence: i32) -> io::Result<u64> {
    let offset = i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: lseek only reads its integer arguments; the fd is open. It moves the file
    // position, which nothing else relies on (all transfers are positional).
    let result = unsafe { libc::lseek64(file.as_raw_fd(), offset, whence) };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(result as u64)
}
