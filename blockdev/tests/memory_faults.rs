//! Fault injection on the memory device: injected errors carry the right kind, errno and
//! tag, fire exactly as often as armed, and leave the data alone.

use tern_blockdev::{BlockDevice, BlockErrorKind, IoBuf, OpKind};

#[test]
fn injected_eio_on_write_is_an_io_error_and_fires_count_times() {
    let (device, faults) = BlockDevice::memory(8192);
    faults.fail_next(OpKind::Write, BlockErrorKind::Io, 2);
    for _ in 0..2 {
        let error = device
            .write_blocking(0, IoBuf::from_slice(&[1; 10]))
            .expect_err("injected");
        assert_eq!(error.kind, BlockErrorKind::Io);
        assert_eq!(error.errno(), Some(libc::EIO));
        assert!(error.is_injected(), "{error}");
        assert_eq!(error.op, Some(OpKind::Write));
        assert!(error.to_string().contains("injected fault"), "{error}");
    }
    assert!(
        faults.contents().iter().all(|&b| b == 0),
        "failed writes wrote nothing"
    );
    device
        .write_blocking(0, IoBuf::from_slice(&[1; 10]))
        .expect("third write succeeds");
    assert_eq!(&faults.contents()[..10], &[1; 10]);
}

#[test]
fn injected_enospc_is_no_space() {
    let (device, faults) = BlockDevice::memory(8192);
    faults.fail_next(OpKind::Write, BlockErrorKind::NoSpace, 1);
    let error = device
        .write_blocking(4096, IoBuf::from_slice(&[2; 4096]))
        .expect_err("injected");
    assert_eq!(error.kind, BlockErrorKind::NoSpace);
    assert_eq!(error.errno(), Some(libc::ENOSPC));
    assert_eq!(
        error.to_string(),
        "write at offset 4096: no space left on device: injected fault"
    );
    // Reads are unaffected by a write fault.
    device.read_blocking(0, 10).expect("read");
}

#[test]
fn fault_kinds_are_independent_per_op_kind() {
    let (device, faults) = BlockDevice::memory(4096);
    faults.fail_next(OpKind::Flush, BlockErrorKind::Io, 1);
    faults.fail_next(OpKind::Discard, BlockErrorKind::Unsupported, 1);
    device.read_blocking(0, 1).expect("read");
    assert_eq!(
        device.flush_blocking().expect_err("flush").kind,
        BlockErrorKind::Io
    );
    assert_eq!(
        device.discard_blocking(0, 1).expect_err("discard").kind,
        BlockErrorKind::Unsupported
    );
    device.flush_blocking().expect("second flush");
    device
        .write_zeroes_blocking(0, 1)
        .expect("zeroes never armed");
}

#[test]
fn range_faults_hit_overlapping_reads_and_writes_until_cleared() {
    let (device, faults) = BlockDevice::memory(16384);
    faults.fail_range(4096..8192, BlockErrorKind::Io);
    let check = |offset: u64, len: usize, fails: bool| {
        let read = device.read_blocking(offset, len);
        let write = device.write_blocking(offset, IoBuf::new_zeroed(len));
        assert_eq!(read.is_err(), fails, "read {offset}+{len}");
        assert_eq!(write.is_err(), fails, "write {offset}+{len}");
        if let Err(error) = read {
            assert_eq!(error.kind, BlockErrorKind::Io);
            assert!(error.is_injected());
        }
    };
    check(0, 4096, false);
    check(4095, 2, true);
    check(8191, 1, true);
    check(8192, 4096, false);
    faults.clear();
    check(4096, 4096, false);
}

#[test]
fn out_of_range_is_checked_before_faults() {
    let (device, faults) = BlockDevice::memory(10);
    faults.fail_next(OpKind::Read, BlockErrorKind::Io, 1);
    let error = device.read_blocking(5, 6).expect_err("out of range");
    assert_eq!(error.kind, BlockErrorKind::OutOfRange);
    let error = device
        .read_blocking(0, 1)
        .expect_err("the armed fault is still there");
    assert_eq!(error.kind, BlockErrorKind::Io);
}

#[test]
fn memory_extents_track_nonzero_blocks() {
    let (device, _faults) = BlockDevice::memory(5 * 4096 + 10);
    assert!(device.allocated_extents().expect("extents").is_empty());
    device
        .write_blocking(4096 + 5, IoBuf::from_slice(&[9; 4096]))
        .expect("write");
    device
        .write_blocking(5 * 4096 + 9, IoBuf::from_slice(&[1]))
        .expect("write tail");
    assert_eq!(
        device.allocated_extents().expect("extents"),
        vec![4096..3 * 4096, 5 * 4096..5 * 4096 + 10]
    );
    device.discard_blocking(4096, 2 * 4096).expect("discard");
    assert_eq!(
        device.allocated_extents().expect("extents"),
        vec![5 * 4096..5 * 4096 + 10]
    );
}
