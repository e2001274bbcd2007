//! One conformance suite, run against every backend: io_uring and sync (each with and
//! without O_DIRECT) on temporary files, and the memory device. Plus a model-based
//! property test comparing random write/discard sequences with a `Vec<u8>`.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::mpsc;

use proptest::prelude::*;
use tempfile::TempDir;
use tern_blockdev::{
    BackendKind, BlockDevice, BlockErrorKind, Completion, IoBuf, IoChoice, IoOp, MemoryFaults,
    OpenOptions,
};

const MIB: u64 = 1 << 20;

/// A device under test plus what the suite needs to inspect it from outside.
struct Fixture {
    device: BlockDevice,
    path: Option<PathBuf>,
    memory: Option<MemoryFaults>,
    _dir: Option<TempDir>,
}

impl Fixture {
    /// The device's bytes, read around the device (file system or memory snapshot).
    fn contents(&self) -> Vec<u8> {
        match (&self.path, &self.memory) {
            (Some(path), _) => std::fs::read(path).expect("read image"),
            (None, Some(memory)) => memory.contents(),
            (None, None) => unreachable!("fixture has neither path nor memory"),
        }
    }

    /// Bytes allocated on disk, for file-backed fixtures.
    fn allocated_bytes(&self) -> Option<u64> {
        let path = self.path.as_ref()?;
        Some(std::fs::metadata(path).expect("stat").blocks() * 512)
    }
}

fn file_fixture(size: u64, io: IoChoice, direct: bool) -> Option<Fixture> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk.img");
    let options = OpenOptions {
        io,
        direct,
        read_only: false,
        create: Some(size),
    };
    match BlockDevice::open(&path, &options) {
        Ok(device) => {
            let expected = match io {
                IoChoice::Uring => BackendKind::Uring,
                _ => BackendKind::Sync,
            };
            assert_eq!(device.kind(), expected);
            assert_eq!(device.size(), size);
            // O_DIRECT is used exactly when asked for and the file system reports an
            // alignment (ext4, xfs; not tmpfs on older kernels).
            assert_eq!(device.direct(), direct && device.dio_alignment().is_some());
            Some(Fixture {
                device,
                path: Some(path),
                memory: None,
                _dir: Some(dir),
            })
        }
        Err(error) if error.kind == BlockErrorKind::UringUnavailable => {
            eprintln!("skipping io_uring test: {error}");
            None
        }
        Err(error) => panic!("open failed: {error}"),
    }
}

fn memory_fixture(size: u64) -> Option<Fixture> {
    let (device, memory) = BlockDevice::memory(size);
    assert_eq!(device.kind(), BackendKind::Memory);
    Some(Fixture {
        device,
        path: None,
        memory: Some(memory),
        _dir: None,
    })
}

/// Deterministic, position-dependent bytes, so misplaced data is detected.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    (0..len as u64)
        .map(|i| (i.wrapping_mul(31).wrapping_add(seed.wrapping_mul(7)) % 251 + 1) as u8)
        .collect()
}

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
        .block_on(future)
}

/// Submits `op` and waits for its completion through a plain channel.
fn submit_and_wait(device: &BlockDevice, op: IoOp) -> Completion {
    let (sender, receiver) = mpsc::channel();
    device.submit(
        op,
        Box::new(move |completion| sender.send(completion).expect("send")),
    );
    receiver.recv().expect("completion")
}

mod suite {
    use super::*;

    pub(super) fn write_then_read_patterns(fixture: Fixture) {
        let device = &fixture.device;
        let mut model = vec![0u8; device.size() as usize];
        let writes: [(u64, usize); 5] = [
            (0, 4096),
            (MIB, MIB as usize),
            (5000, 3),
            (12345, 100_000),
            (device.size() - 4096, 4096),
        ];
        for (seed, &(offset, len)) in writes.iter().enumerate() {
            let data = pattern(len, seed as u64);
            let returned = device
                .write_blocking(offset, IoBuf::from_slice(&data))
                .expect("write");
            assert_eq!(&returned[..], &data[..], "write hands the buffer back");
            model[offset as usize..offset as usize + len].copy_from_slice(&data);
        }
        for &(offset, len) in &writes {
            let blocking = device.read_blocking(offset, len).expect("read");
            assert_eq!(
                &blocking[..],
                &model[offset as usize..offset as usize + len]
            );
            let asynchronous = block_on(device.read(offset, len)).expect("async read");
            assert_eq!(&asynchronous[..], &blocking[..]);
        }
        device.flush_blocking().expect("flush");
        assert!(
            fixture.contents() == model,
            "device bytes differ from model"
        );
    }

    pub(super) fn unaligned_tail_of_odd_sized_image(fixture: Fixture) {
        let device = &fixture.device;
        let size = device.size() as usize;
        assert_eq!(size as u64, MIB + 1);
        let data = pattern(size, 9);
        block_on(device.write(0, IoBuf::from_slice(&data))).expect("write whole image");
        let read = block_on(device.read(0, size)).expect("read whole image");
        assert!(read[..] == data[..], "whole-image read differs");
        device
            .write_blocking(MIB, IoBuf::from_slice(&[0xAB]))
            .expect("write last byte");
        assert_eq!(
            &device.read_blocking(MIB, 1).expect("read last byte")[..],
            &[0xAB]
        );
        let tail = device.read_blocking(MIB - 4096, 4097).expect("read tail");
        assert_eq!(&tail[..4096], &data[size - 4097..size - 1]);
        assert_eq!(tail[4096], 0xAB);
        let contents = fixture.contents();
        assert_eq!(contents.len(), size, "file must not grow");
        assert_eq!(contents[size - 1], 0xAB);
    }

    pub(super) fn one_byte_device(fixture: Fixture) {
        let device = &fixture.device;
        assert_eq!(device.size(), 1);
        assert_eq!(&device.read_blocking(0, 1).expect("read")[..], &[0]);
        device
            .write_blocking(0, IoBuf::from_slice(&[7]))
            .expect("write");
        assert_eq!(&block_on(device.read(0, 1)).expect("read")[..], &[7]);
        let error = device.read_blocking(0, 2).expect_err("past the end");
        assert_eq!(error.kind, BlockErrorKind::OutOfRange);
        assert_eq!(fixture.contents(), vec![7]);
    }

    pub(super) fn flush_succeeds(fixture: Fixture) {
        let device = &fixture.device;
        device
            .write_blocking(0, IoBuf::from_slice(&pattern(8192, 1)))
            .expect("write");
        device.flush_blocking().expect("blocking flush");
        block_on(device.flush()).expect("async flush");
        let completion = submit_and_wait(device, IoOp::Flush);
        assert!(matches!(completion.op, IoOp::Flush));
        assert_eq!(completion.result.expect("flush"), 0);
    }

    pub(super) fn discard_and_write_zeroes_read_back_zeros(fixture: Fixture) {
        let device = &fixture.device;
        let data = pattern(3 * MIB as usize, 3);
        device
            .write_blocking(0, IoBuf::from_slice(&data))
            .expect("write");
        device.flush_blocking().expect("flush");
        let allocated_before = fixture.allocated_bytes();

        device.discard_blocking(0, MIB).expect("discard");
        block_on(device.write_zeroes(MIB, MIB)).expect("write zeroes");
        // Unaligned ranges must zero exactly their bytes.
        block_on(device.discard(2 * MIB + 100, 5000)).expect("unaligned discard");
        device
            .write_zeroes_blocking(2 * MIB + 9000, 3)
            .expect("unaligned write zeroes");

        let mut model = data.clone();
        model[..2 * MIB as usize].fill(0);
        model[2 * MIB as usize + 100..2 * MIB as usize + 5100].fill(0);
        model[2 * MIB as usize + 9000..2 * MIB as usize + 9003].fill(0);
        let read = device.read_blocking(0, 3 * MIB as usize).expect("read");
        assert!(read[..] == model[..], "zeroed ranges differ from model");
        assert!(fixture.contents()[..3 * MIB as usize] == model[..]);

        if let (Some(before), Some(after)) = (allocated_before, fixture.allocated_bytes()) {
            assert!(
                after + MIB <= before,
                "discard and write-zeroes should deallocate: {before} -> {after} bytes"
            );
        }
    }

    pub(super) fn out_of_range_fails_and_changes_nothing(fixture: Fixture) {
        let device = &fixture.device;
        let size = device.size();
        device
            .write_blocking(0, IoBuf::from_slice(&pattern(size as usize, 4)))
            .expect("fill");
        let before = fixture.contents();
        let check = |result: Result<(), tern_blockdev::BlockError>, what: &str| {
            let error = result.expect_err(what);
            assert_eq!(error.kind, BlockErrorKind::OutOfRange, "{what}: {error}");
        };
        check(device.read_blocking(size - 1, 2).map(drop), "read past end");
        check(device.read_blocking(size, 1).map(drop), "read at end");
        check(
            device
                .write_blocking(size - 10, IoBuf::from_slice(&[1; 11]))
                .map(drop),
            "write past end",
        );
        check(
            device
                .write_blocking(u64::MAX - 1, IoBuf::from_slice(&[1; 4]))
                .map(drop),
            "write with overflowing end",
        );
        check(device.discard_blocking(size - 1, 2), "discard past end");
        check(
            block_on(device.write_zeroes(u64::MAX, u64::MAX)),
            "zeroes with overflowing end",
        );
        let completion = submit_and_wait(
            device,
            IoOp::Write {
                offset: size,
                buf: IoBuf::from_slice(&[1]),
            },
        );
        assert_eq!(
            completion.result.expect_err("submit past end").kind,
            BlockErrorKind::OutOfRange
        );
        assert!(matches!(completion.op, IoOp::Write { offset, .. } if offset == size));
        assert!(
            fixture.contents() == before,
            "out-of-range ops changed the device"
        );
    }

    pub(super) fn many_concurrent_ops_complete(fixture: Fixture) {
        const OPS: usize = 64;
        const LEN: usize = 16 * 1024;
        let device = &fixture.device;
        let (sender, receiver) = mpsc::channel();
        for index in 0..OPS {
            let sender = sender.clone();
            let buf = IoBuf::from_slice(&pattern(LEN, index as u64));
            device.submit(
                IoOp::Write {
                    offset: (index * LEN) as u64,
                    buf,
                },
                Box::new(move |completion| sender.send(completion).expect("send")),
            );
        }
        let mut seen = [false; OPS];
        for _ in 0..OPS {
            let completion = receiver.recv().expect("write completion");
            assert_eq!(completion.result.expect("write"), LEN);
            let IoOp::Write { offset, .. } = completion.op else {
                panic!("unexpected op {:?}", completion.op);
            };
            seen[offset as usize / LEN] = true;
        }
        assert!(seen.iter().all(|&s| s), "every write completes once");

        for index in 0..OPS {
            let sender = sender.clone();
            device.submit(
                IoOp::Read {
                    offset: (index * LEN) as u64,
                    buf: device.alloc_buf(LEN),
                },
                Box::new(move |completion| sender.send(completion).expect("send")),
            );
        }
        for _ in 0..OPS {
            let completion = receiver.recv().expect("read completion");
            assert_eq!(completion.result.expect("read"), LEN);
            let IoOp::Read { offset, buf } = completion.op else {
                panic!("unexpected op");
            };
            assert!(buf[..] == pattern(LEN, offset / LEN as u64)[..]);
        }
    }

    pub(super) fn alloc_buf_writes_and_reads(fixture: Fixture) {
        let device = &fixture.device;
        // More buffers than any registered pool holds, so both pooled and heap buffers
        // are exercised, held at the same time.
        let mut bufs: Vec<IoBuf> = (0..8).map(|_| device.alloc_buf(MIB as usize)).collect();
        for (index, buf) in bufs.iter_mut().enumerate() {
            assert_eq!(buf.len(), MIB as usize);
            assert!(buf.iter().all(|&b| b == 0), "alloc_buf is zeroed");
            buf.copy_from_slice(&pattern(MIB as usize, index as u64));
        }
        let (sender, receiver) = mpsc::channel();
        for (index, buf) in bufs.into_iter().enumerate() {
            let sender = sender.clone();
            device.submit(
                IoOp::Write {
                    offset: index as u64 * MIB,
                    buf,
                },
                Box::new(move |completion| sender.send(completion).expect("send")),
            );
        }
        for _ in 0..8 {
            receiver.recv().expect("completion").result.expect("write");
        }
        for index in 0..8u64 {
            let read = device
                .read_blocking(index * MIB, MIB as usize)
                .expect("read");
            assert!(
                read[..] == pattern(MIB as usize, index)[..],
                "chunk {index}"
            );
        }
        // Read buffers are not zeroed (they may come back holding an earlier buffer's
        // bytes), and a successful read overwrites every byte: read the chunks in a
        // different order into recycled buffers, several rounds.
        for round in 0..3u64 {
            for index in (0..8u64).rev() {
                let chunk = (index + round) % 8;
                let buf = device.alloc_read_buf(MIB as usize);
                assert_eq!(buf.len(), MIB as usize);
                let done = submit_and_wait(
                    device,
                    IoOp::Read {
                        offset: chunk * MIB,
                        buf,
                    },
                );
                done.result.expect("read into a read buffer");
                let IoOp::Read { buf, .. } = done.op else {
                    panic!("unexpected op");
                };
                assert!(
                    buf[..] == pattern(MIB as usize, chunk)[..],
                    "chunk {chunk}, round {round}"
                );
            }
        }

        let mut small = device.alloc_buf(100);
        small.copy_from_slice(&pattern(100, 77));
        let back = block_on(device.write(3, small)).expect("small pooled write");
        assert_eq!(back.len(), 100);
        assert_eq!(&device.read_blocking(3, 100).expect("read")[..], &back[..]);
    }

    pub(super) fn allocated_extents_of_sparse_device(fixture: Fixture) {
        let device = &fixture.device;
        let written = [MIB..MIB + 4096, 5 * MIB..5 * MIB + 8192];
        for range in &written {
            device
                .write_blocking(
                    range.start,
                    IoBuf::from_slice(&pattern((range.end - range.start) as usize, 5)),
                )
                .expect("write");
        }
        device.flush_blocking().expect("flush");
        let extents = device.allocated_extents().expect("extents");
        for pair in extents.windows(2) {
            assert!(
                pair[0].end < pair[1].start,
                "sorted and merged: {extents:?}"
            );
        }
        for range in &written {
            assert!(
                extents
                    .iter()
                    .any(|e| e.start <= range.start && range.end <= e.end),
                "{range:?} not covered by {extents:?}"
            );
        }
        let total: u64 = extents.iter().map(|e| e.end - e.start).sum();
        assert!(
            total < device.size(),
            "sparse device reported fully allocated: {extents:?}"
        );
    }

    pub(super) fn zero_length_ops_succeed(fixture: Fixture) {
        let device = &fixture.device;
        assert!(device.read_blocking(0, 0).expect("empty read").is_empty());
        device
            .write_blocking(device.size(), IoBuf::new_zeroed(0))
            .expect("empty write at end");
        device.discard_blocking(0, 0).expect("empty discard");
        device.write_zeroes_blocking(1, 0).expect("empty zeroes");
    }

    pub(super) fn callbacks_may_submit_and_drop_the_device(fixture: Fixture) {
        let Fixture {
            device,
            path: _path,
            memory: _memory,
            _dir,
        } = fixture;
        let (sender, receiver) = mpsc::channel();
        let chained = device.clone();
        device.submit(
            IoOp::Write {
                offset: 0,
                buf: IoBuf::from_slice(b"chain"),
            },
            Box::new(move |completion| {
                completion.result.expect("write");
                // A blocking call here would wait on this very thread: refused, not hung.
                let refused = chained
                    .flush_blocking()
                    .expect_err("blocking from callback");
                assert_eq!(refused.kind, BlockErrorKind::InvalidArgument);
                let buf = chained.alloc_buf(5);
                let last = chained.clone();
                chained.submit(
                    IoOp::Read { offset: 0, buf },
                    Box::new(move |completion| {
                        // Drops what may be the last handle, on the I/O thread.
                        drop(last);
                        sender.send(completion).expect("send");
                    }),
                );
            }),
        );
        drop(device);
        let completion = receiver.recv().expect("chained read completes");
        assert_eq!(completion.result.expect("read"), 5);
        let IoOp::Read { buf, .. } = completion.op else {
            panic!("unexpected op");
        };
        assert_eq!(&buf[..], b"chain");
    }

    pub(super) fn drop_finishes_submitted_ops(fixture: Fixture) {
        const OPS: usize = 32;
        let (sender, receiver) = mpsc::channel();
        for index in 0..OPS {
            let sender = sender.clone();
            fixture.device.submit(
                IoOp::Write {
                    offset: (index * 4096) as u64,
                    buf: IoBuf::from_slice(&pattern(4096, index as u64)),
                },
                Box::new(move |completion| sender.send(completion.result).expect("send")),
            );
        }
        drop(sender);
        let Fixture {
            device,
            path,
            memory,
            _dir,
        } = fixture;
        drop(device);
        let results: Vec<_> = receiver.iter().collect();
        assert_eq!(
            results.len(),
            OPS,
            "every callback ran before the drop returned"
        );
        assert!(results.iter().all(Result::is_ok));
        let contents = match (&path, &memory) {
            (Some(path), _) => std::fs::read(path).expect("read"),
            (_, Some(memory)) => memory.contents(),
            _ => unreachable!(),
        };
        for index in 0..OPS {
            assert!(contents[index * 4096..(index + 1) * 4096] == pattern(4096, index as u64)[..]);
        }
    }
}

/// Instantiates the suite for one backend; `$make` builds a fixture of a given size or
/// returns `None` (after printing why) when the backend is unavailable here.
macro_rules! conformance {
    ($name:ident, $make:expr) => {
        mod $name {
            use super::*;

            fn make(size: u64) -> Option<Fixture> {
                let make: fn(u64) -> Option<Fixture> = $make;
                make(size)
            }

            #[test]
            fn write_then_read_patterns() {
                if let Some(fixture) = make(4 * MIB) {
                    suite::write_then_read_patterns(fixture);
                }
            }

            #[test]
            fn unaligned_tail_of_odd_sized_image() {
                if let Some(fixture) = make(MIB + 1) {
                    suite::unaligned_tail_of_odd_sized_image(fixture);
                }
            }

            #[test]
            fn one_byte_device() {
                if let Some(fixture) = make(1) {
                    suite::one_byte_device(fixture);
                }
            }

            #[test]
            fn flush_succeeds() {
                if let Some(fixture) = make(MIB) {
                    suite::flush_succeeds(fixture);
                }
            }

            #[test]
            fn discard_and_write_zeroes_read_back_zeros() {
                if let Some(fixture) = make(4 * MIB) {
                    suite::discard_and_write_zeroes_read_back_zeros(fixture);
                }
            }

            #[test]
            fn out_of_range_fails_and_changes_nothing() {
                if let Some(fixture) = make(64 * 1024 + 7) {
                    suite::out_of_range_fails_and_changes_nothing(fixture);
                }
            }

            #[test]
            fn many_concurrent_ops_complete() {
                if let Some(fixture) = make(MIB) {
                    suite::many_concurrent_ops_complete(fixture);
                }
            }

            #[test]
            fn alloc_buf_writes_and_reads() {
                if let Some(fixture) = make(8 * MIB) {
                    suite::alloc_buf_writes_and_reads(fixture);
                }
            }

            #[test]
            fn allocated_extents_of_sparse_device() {
                if let Some(fixture) = make(8 * MIB) {
                    suite::allocated_extents_of_sparse_device(fixture);
                }
            }

            #[test]
            fn zero_length_ops_succeed() {
                if let Some(fixture) = make(4096) {
                    suite::zero_length_ops_succeed(fixture);
                }
            }

            #[test]
            fn callbacks_may_submit_and_drop_the_device() {
                if let Some(fixture) = make(MIB) {
                    suite::callbacks_may_submit_and_drop_the_device(fixture);
                }
            }

            #[test]
            fn drop_finishes_submitted_ops() {
                if let Some(fixture) = make(MIB) {
                    suite::drop_finishes_submitted_ops(fixture);
                }
            }
        }
    };
}

conformance!(uring_direct, |size| file_fixture(
    size,
    IoChoice::Uring,
    true
));
conformance!(uring_buffered, |size| file_fixture(
    size,
    IoChoice::Uring,
    false
));
conformance!(sync_direct, |size| file_fixture(size, IoChoice::Sync, true));
conformance!(sync_buffered, |size| file_fixture(
    size,
    IoChoice::Sync,
    false
));
conformance!(memory, memory_fixture);

/// One step of the model-based property test.
#[derive(Clone, Debug)]
enum Step {
    Write { offset: u64, len: usize, seed: u64 },
    Discard { offset: u64, len: u64 },
    WriteZeroes { offset: u64, len: u64 },
    Flush,
}

/// Deliberately odd-sized, so both aligned (direct) and tail (buffered) paths are hit.
const MODEL_SIZE: u64 = 64 * 1024 + 3;

fn step_strategy() -> impl Strategy<Value = Step> {
    // Offsets near 4 KiB boundaries are the interesting ones for O_DIRECT routing.
    let offset = prop_oneof![
        0..MODEL_SIZE,
        (0..16u64).prop_map(|block| block * 4096),
        Just(MODEL_SIZE - 1),
    ];
    let len = prop_oneof![1..10_000usize, (1..4usize).prop_map(|blocks| blocks * 4096)];
    prop_oneof![
        4 => (offset.clone(), len.clone(), any::<u64>())
            .prop_map(|(offset, len, seed)| Step::Write { offset, len, seed }),
        2 => (offset.clone(), len.clone())
            .prop_map(|(offset, len)| Step::Discard { offset, len: len as u64 }),
        2 => (offset, len).prop_map(|(offset, len)| Step::WriteZeroes { offset, len: len as u64 }),
        1 => Just(Step::Flush),
    ]
}

/// Applies `steps` to the device and to a `Vec<u8>` model; out-of-range steps must fail
/// with `OutOfRange` and leave both unchanged. Then the whole device must equal the model.
fn run_model(device: &BlockDevice, steps: &[Step]) -> Result<(), TestCaseError> {
    let size = device.size();
    let mut model = vec![0u8; size as usize];
    let fits = |offset: u64, len: u64| offset.checked_add(len).is_some_and(|end| end <= size);
    for step in steps {
        let (result, range) = match *step {
            Step::Write { offset, len, seed } => {
                let data = pattern(len, seed);
                let result = device
                    .write_blocking(offset, IoBuf::from_slice(&data))
                    .map(drop);
                if fits(offset, len as u64) {
                    model[offset as usize..offset as usize + len].copy_from_slice(&data);
                }
                (result, Some((offset, len as u64)))
            }
            Step::Discard { offset, len } => {
                let result = device.discard_blocking(offset, len);
                if fits(offset, len) {
                    model[offset as usize..(offset + len) as usize].fill(0);
                }
                (result, Some((offset, len)))
            }
            Step::WriteZeroes { offset, len } => {
                let result = device.write_zeroes_blocking(offset, len);
                if fits(offset, len) {
                    model[offset as usize..(offset + len) as usize].fill(0);
                }
                (result, Some((offset, len)))
            }
            Step::Flush => (device.flush_blocking(), None),
        };
        match (range, result) {
            (Some((offset, len)), Err(error)) if !fits(offset, len) => {
                prop_assert_eq!(error.kind, BlockErrorKind::OutOfRange);
            }
            (Some((offset, len)), Ok(())) => prop_assert!(fits(offset, len)),
            (_, result) => prop_assert!(result.is_ok(), "{:?} failed: {:?}", step, result),
        }
    }
    let read = device.read_blocking(0, size as usize).expect("read all");
    prop_assert!(read[..] == model[..], "device differs from model");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn memory_device_matches_model(steps in prop::collection::vec(step_strategy(), 1..24)) {
        let (device, _) = BlockDevice::memory(MODEL_SIZE);
        run_model(&device, &steps)?;
    }

    #[test]
    fn sync_file_device_matches_model(steps in prop::collection::vec(step_strategy(), 1..24)) {
        let fixture = file_fixture(MODEL_SIZE, IoChoice::Sync, true).expect("sync is always available");
        run_model(&fixture.device, &steps)?;
        prop_assert!(fixture.contents() == fixture.device.read_blocking(0, MODEL_SIZE as usize).expect("read")[..]);
    }

    #[test]
    fn uring_file_device_matches_model(steps in prop::collection::vec(step_strategy(), 1..24)) {
        // Skips (with the message printed by the fixture) where io_uring is unavailable.
        if let Some(fixture) = file_fixture(MODEL_SIZE, IoChoice::Uring, true) {
            run_model(&fixture.device, &steps)?;
        }
    }
}
