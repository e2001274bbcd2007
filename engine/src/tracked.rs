//! `TrackedDisk`: the block device a VMM (or the demo's guest) does its IO through, so that
//! every write is tracked in the dirty bitmap.
//!
//! A write, discard or write-zeroes marks its blocks *after* the backend completed it, and
//! before the caller learns that it completed (invariant I2). A failed write marks too: it may
//! have changed some bytes before failing. Reads and flushes pass through.
//!
//! In active mode (a migration turned its [`MirrorSwitch`] on) a completed write is not
//! marked but handed to the migration as a [`MirrorJob`]; the caller learns of the
//! completion only once the migration reports the write on the target — or, if it cannot
//! (the migration ended or failed), once the blocks were marked dirty after all.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use tern_blockdev::{BlockDevice, BlockError, Callback, Completion, IoBuf, IoOp};

use crate::bitmap::DirtyBitmap;
use crate::throttle::Throttle;

/// A block device whose writes are tracked. Cheap to clone; clones share the bitmap.
#[derive(Clone, Debug)]
pub struct TrackedDisk {
    device: BlockDevice,
    /// What the bulk pass reads instead of `device` (see `with_bulk_reads_from`).
    bulk_device: Option<BlockDevice>,
    bitmap: Arc<DirtyBitmap>,
    throttle: Arc<Throttle>,
    mirror: Arc<MirrorSwitch>,
}

/// A completed guest write that must reach the target before the guest learns of it.
/// Finish it with [`MirrorJob::finish`]; dropping it unfinished counts as "not mirrored"
/// (the blocks are marked dirty, then the guest's completion runs).
pub struct MirrorJob {
    /// The disk's index in the migration.
    pub disk: u32,
    /// The bytes the write covered.
    pub range: Range<u64>,
    done: Option<Box<dyn FnOnce(bool) + Send>>,
}

impl std::fmt::Debug for MirrorJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MirrorJob")
            .field("disk", &self.disk)
            .field("range", &self.range)
            .finish()
    }
}

impl MirrorJob {
    /// Completes the guest's write: `mirrored` says whether the target holds it; if not,
    /// its blocks are marked dirty first (I2).
    pub fn finish(mut self, mirrored: bool) {
        if let Some(done) = self.done.take() {
            done(mirrored);
        }
    }
}

impl Drop for MirrorJob {
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            done(false);
        }
    }
}

/// Connects a tracked disk to a migration that may mirror its writes (active mode).
#[derive(Debug, Default)]
pub struct MirrorSwitch {
    inner: Mutex<Option<MirrorLink>>,
}

#[derive(Debug)]
struct MirrorLink {
    disk: u32,
    jobs: tokio::sync::mpsc::UnboundedSender<MirrorJob>,
    active: bool,
}

impl MirrorSwitch {
    /// A migration takes the disk as its disk `disk`; writes go to `jobs` while active.
    pub fn connect(&self, disk: u32, jobs: tokio::sync::mpsc::UnboundedSender<MirrorJob>) {
        *self.lock() = Some(MirrorLink {
            disk,
            jobs,
            active: false,
        });
    }

    /// Turns mirroring on or off (writes completing after this call follow it).
    pub fn set_active(&self, active: bool) {
        if let Some(link) = self.lock().as_mut() {
            link.active = active;
        }
    }

    /// The migration ended: writes are marked dirty again.
    pub fn disconnect(&self) {
        *self.lock() = None;
    }

    /// Whether writes are being mirrored now.
    pub fn is_active(&self) -> bool {
        self.lock().as_ref().is_some_and(|link| link.active)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<MirrorLink>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands a completed write to the migration if mirroring is on; gives `done` back if not.
    fn route(
        &self,
        range: Range<u64>,
        done: Box<dyn FnOnce(bool) + Send>,
    ) -> Option<Box<dyn FnOnce(bool) + Send>> {
        let guard = self.lock();
        let Some(link) = guard.as_ref().filter(|link| link.active) else {
            return Some(done);
        };
        let job = MirrorJob {
            disk: link.disk,
            range,
            done: Some(done),
        };
        // A closed channel drops the job, which finishes it unmirrored.
        let _ = link.jobs.send(job);
        None
    }
}

impl TrackedDisk {
    /// Tracks writes to `device` at `granularity` bytes per bit (the migration's chunk size),
    /// or `None` if the granularity is not a power of two between 4 KiB and 1 MiB.
    pub fn new(device: BlockDevice, granularity: u32) -> Option<Self> {
        let bitmap = Arc::new(DirtyBitmap::new(device.size(), granularity)?);
        Some(Self {
            device,
            bulk_device: None,
            bitmap,
            throttle: Arc::new(Throttle::new()),
            mirror: Arc::default(),
        })
    }

    /// Has a migration's bulk pass read `direct`, an O_DIRECT handle of the same disk,
    /// instead of the device the guest writes through its page cache: the bulk pass reads
    /// each byte once, and through the page cache that costs a copy per byte and evicts
    /// the host's cache for data nobody reads again. Linux writes dirty cached pages of a
    /// range back before an O_DIRECT read of it, so the read sees every completed write
    /// (writes racing it are marked dirty and sent again, as always). Re-reads of dirty
    /// chunks and mirror reads keep using the page cache, where those bytes are. Panics if
    /// the sizes differ.
    pub fn with_bulk_reads_from(mut self, direct: BlockDevice) -> Self {
        assert_eq!(direct.size(), self.device.size(), "another disk");
        self.bulk_device = Some(direct);
        self
    }

    /// The device underneath (the migration reads it).
    pub fn device(&self) -> &BlockDevice {
        &self.device
    }

    /// The handle the bulk pass reads, if not [`TrackedDisk::device`].
    pub fn bulk_device(&self) -> Option<&BlockDevice> {
        self.bulk_device.as_ref()
    }

    /// The dirty bitmap (the migration harvests it).
    pub fn bitmap(&self) -> &Arc<DirtyBitmap> {
        &self.bitmap
    }

    /// The write throttle (unlimited unless a migration in `auto` mode had to slow the guest).
    pub fn throttle(&self) -> &Arc<Throttle> {
        &self.throttle
    }

    /// The active-mode switch (a migration connects and turns it on).
    pub fn mirror(&self) -> &Arc<MirrorSwitch> {
        &self.mirror
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.device.size()
    }

    /// Submits `op`; writes mark the bitmap once the backend completed them, then `done` runs.
    /// A throttled write first waits for its tokens here, blocking the calling thread; async
    /// callers use [`TrackedDisk::reserve_write`] and [`TrackedDisk::submit_reserved`].
    pub fn submit(&self, op: IoOp, done: Callback) {
        if let IoOp::Write { buf, .. } = &op {
            // Throttled writes wait here, in the caller's thread, before the disk.
            self.throttle.acquire(buf.len() as u64);
        }
        self.submit_reserved(op, done);
    }

    /// Reserves throttle tokens for a write of `bytes` and returns how long the caller must
    /// wait before submitting it with [`TrackedDisk::submit_reserved`] (zero when the guest
    /// is not throttled). Lets an async server sleep on its runtime instead of a thread.
    pub fn reserve_write(&self, bytes: u64) -> std::time::Duration {
        self.throttle.reserve(bytes, std::time::Instant::now())
    }

    /// Like [`TrackedDisk::submit`], for a write whose throttle wait the caller already
    /// served (see [`TrackedDisk::reserve_write`]).
    pub fn submit_reserved(&self, op: IoOp, done: Callback) {
        let mark = match &op {
            IoOp::Write { offset, buf } => Some((*offset, buf.len() as u64)),
            IoOp::Discard { offset, len } | IoOp::WriteZeroes { offset, len } => {
                Some((*offset, *len))
            }
            IoOp::Read { .. } | IoOp::Flush => None,
        };
        match mark {
            None => self.device.submit(op, done),
            Some((offset, len)) => {
                let bitmap = self.bitmap.clone();
                let mirror = self.mirror.clone();
                self.device.submit(
                    op,
                    Box::new(move |completion: Completion| {
                        if completion.result.is_ok() {
                            let finish = Box::new(move |mirrored: bool| {
                                if !mirrored {
                                    bitmap.mark(offset, len);
                                }
                                done(completion);
                            });
                            if let Some(finish) = mirror.route(offset..offset + len, finish) {
                                finish(false);
                            }
                            return;
                        }
                        bitmap.mark(offset, len);
                        done(completion);
                    }),
                );
            }
        }
    }

    /// Writes `buf` at `offset` and waits; the blocks are marked before this returns.
    pub fn write_blocking(&self, offset: u64, buf: IoBuf) -> Result<IoBuf, BlockError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.submit(
            IoOp::Write { offset, buf },
            Box::new(move |completion| {
                let _ = tx.send(completion);
            }),
        );
        let completion = rx.recv().expect("the backend completes every request");
        let IoOp::Write { buf, .. } = completion.op else {
            unreachable!("a write completes as a write")
        };
        completion.result.map(|_| buf)
    }

    /// Reads `len` bytes at `offset` and waits.
    pub fn read_blocking(&self, offset: u64, len: usize) -> Result<IoBuf, BlockError> {
        self.device.read_blocking(offset, len)
    }

    /// Flushes (fdatasync) and waits.
    pub fn flush_blocking(&self) -> Result<(), BlockError> {
        self.device.flush_blocking()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_mark_their_blocks_after_completing_and_reads_do_not() {
        let (device, _faults) = BlockDevice::memory(1 << 20);
        let disk = TrackedDisk::new(device, 4096).unwrap();
        disk.write_blocking(4096 + 10, IoBuf::from_slice(&[1; 5000]))
            .unwrap();
        disk.read_blocking(0, 1 << 20).unwrap();
        assert_eq!(disk.bitmap().harvest(), vec![1..3]);
        let read = disk.read_blocking(4096 + 10, 5000).unwrap();
        assert!(read.iter().all(|b| *b == 1));
    }

    #[test]
    fn in_active_mode_a_write_completes_only_when_its_mirror_finishes() {
        let (device, _faults) = BlockDevice::memory(1 << 20);
        let disk = TrackedDisk::new(device, 4096).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        disk.mirror().connect(3, tx);
        disk.mirror().set_active(true);
        let writer = {
            let disk = disk.clone();
            std::thread::spawn(move || disk.write_blocking(8192, IoBuf::from_slice(&[7; 100])))
        };
        // The write is on the source disk and waits for its mirror.
        let job = rx.blocking_recv().expect("a mirror job");
        assert_eq!((job.disk, job.range.clone()), (3, 8192..8292));
        assert!(!writer.is_finished());
        job.finish(true);
        writer.join().unwrap().unwrap();
        // Mirrored: not dirty.
        assert!(disk.bitmap().harvest().is_empty());

        // Not mirrored (or dropped by a migration that ended): marked dirty, then completed.
        let writer = {
            let disk = disk.clone();
            std::thread::spawn(move || disk.write_blocking(0, IoBuf::from_slice(&[1; 10])))
        };
        drop(rx.blocking_recv().expect("a mirror job"));
        writer.join().unwrap().unwrap();
        assert_eq!(disk.bitmap().harvest(), vec![0..1]);

        // Disconnected: back to marking.
        disk.mirror().disconnect();
        disk.write_blocking(4096, IoBuf::from_slice(&[2; 10]))
            .unwrap();
        assert_eq!(disk.bitmap().harvest(), vec![1..2]);
    }

    /// What `with_bulk_reads_from` relies on: an O_DIRECT read of a range sees a completed
    /// write that is still only in the page cache (the kernel writes the range back first).
    #[test]
    fn an_o_direct_bulk_read_sees_writes_still_in_the_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::write(&path, vec![1u8; 1 << 20]).unwrap();
        let open = |direct| {
            BlockDevice::open(
                &path,
                &tern_blockdev::OpenOptions {
                    direct,
                    ..Default::default()
                },
            )
            .unwrap()
        };
        let cached = open(false);
        let bulk = open(true);
        if !bulk.direct() {
            // Not a failure of ours: say why nothing was checked.
            eprintln!("skipped: {} refuses O_DIRECT", dir.path().display());
            return;
        }
        let disk = TrackedDisk::new(cached, 4096)
            .unwrap()
            .with_bulk_reads_from(bulk.clone());
        disk.write_blocking(65536, IoBuf::from_slice(&[7u8; 8192]))
            .unwrap();
        let read = bulk.read_blocking(0, 1 << 20).unwrap();
        assert_eq!(&read[65536..65536 + 8192], &[7u8; 8192][..]);
        assert!(read[..65536].iter().all(|&b| b == 1));
        assert_eq!(disk.bulk_device().map(BlockDevice::size), Some(1 << 20));
    }

    #[test]
    fn a_failed_write_still_marks() {
        let (device, faults) = BlockDevice::memory(1 << 20);
        faults.fail_next(
            tern_blockdev::OpKind::Write,
            tern_blockdev::BlockErrorKind::Io,
            1,
        );
        let disk = TrackedDisk::new(device, 4096).unwrap();
        assert!(disk.write_blocking(0, IoBuf::from_slice(&[1; 10])).is_err());
        assert_eq!(disk.bitmap().harvest(), vec![0..1]);
    }
}
