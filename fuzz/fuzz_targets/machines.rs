//! Fuzzes the migration state machines with hostile peer input: arbitrary control messages
//! and frames (postcard / frame bytes from the fuzzer) fed to a `TargetMigration` and a
//! `SourceMigration` in any order, with their IO completed as asked. They must answer with an
//! error (and stop), never panic, and never issue IO outside the disk.
//!
//! Run: `cargo fuzz run machines --sanitizer none -- -max_total_time=600`.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tern_engine::source::{LiveConfig, SourceDisk};
use tern_engine::target::Kept;
use tern_engine::{SourceConfig, SourceMigration, TargetIo, TargetMigration, Transmit};
use tern_transport::{Control, DiskInfo, Frame, Hello, PROTOCOL_VERSION};

const DISK: u64 = 1 << 20;
const CHUNK: u32 = 4096;

fn hello() -> Hello {
    Hello {
        version: PROTOCOL_VERSION,
        features: tern_transport::control::FEATURES_SUPPORTED,
        session_id: [3; 16],
        chunk_bytes: CHUNK,
        data_streams: 2,
        disks: vec![DiskInfo {
            size: DISK,
            identity: "fuzz".into(),
            allocated: DISK,
        }],
        resume: false,
    }
}

/// Splits the input into messages: a length byte, then that many bytes.
fn pieces(mut data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while let Some((&len, rest)) = data.split_first() {
        let len = (len as usize).min(rest.len());
        out.push(&rest[..len]);
        data = &rest[len..];
    }
    out
}

fn check_io(io: &TargetIo) {
    match io {
        TargetIo::Write { offset, data, .. } => {
            assert!(offset + data.len() as u64 <= DISK, "write outside the disk")
        }
        TargetIo::WriteZeroes { offset, len, .. } => {
            assert!(offset + len <= DISK, "zeroing outside the disk")
        }
        _ => {}
    }
}

fn token(io: &TargetIo) -> u64 {
    match io {
        TargetIo::Write { token, .. }
        | TargetIo::WriteZeroes { token, .. }
        | TargetIo::Flush { token, .. }
        | TargetIo::MarkComplete { token }
        | TargetIo::Digest { token, .. } => *token,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, data)) = data.split_first() else {
        return;
    };
    if selector & 1 == 0 {
        // The target, facing a hostile source.
        let (mut target, _) =
            TargetMigration::accept(&hello(), &[DISK], Kept::Nothing).expect("our hello is valid");
        for piece in pieces(data) {
            if target.is_finished() {
                break;
            }
            let Some((&kind, body)) = piece.split_first() else {
                continue;
            };
            match kind % 3 {
                0 => {
                    if let Ok(control) = Control::decode(body) {
                        target.handle_control(control);
                    }
                }
                1 => {
                    // A frame as the decoder would hand it over (CRC and codec already
                    // checked), with hostile fields: any disk, range, generation, length.
                    if body.len() >= 8 && target.can_accept_frame() {
                        let disk = u32::from(body[0] % 3);
                        let chunk = u64::from(u16::from_le_bytes([body[1], body[2]]));
                        let chunk_count = u32::from(body[3]);
                        let generation = u64::from(body[4]);
                        let stream = u16::from(body[5] % 3);
                        let frame = if body[6] & 1 == 0 {
                            Frame::Zero {
                                disk,
                                chunk,
                                chunk_count,
                                generation,
                            }
                        } else {
                            let mut len = chunk_count as usize * CHUNK as usize;
                            if body[6] & 2 != 0 {
                                len = len.saturating_sub(usize::from(body[7]));
                            }
                            Frame::Data {
                                disk,
                                chunk,
                                chunk_count,
                                generation,
                                data: Bytes::from(vec![body[7]; len.min(1 << 20)]),
                            }
                        };
                        target.handle_frame(stream, frame);
                    }
                }
                _ => {
                    // Complete the IO asked for so far.
                    while let Some(io) = target.poll_io() {
                        check_io(&io);
                        match io {
                            TargetIo::Digest {
                                token, block_count, ..
                            } => target.handle_digests_done(token, vec![0; block_count as usize]),
                            other => target.handle_io_done(token(&other)),
                        }
                    }
                }
            }
            while target.poll_transmit().is_some() {}
            while target.poll_event().is_some() {}
        }
    } else {
        // The source, facing a hostile target.
        let config = SourceConfig {
            chunk_bytes: CHUNK,
            data_streams: 2,
            session_id: [3; 16],
            live: (selector & 2 != 0).then(LiveConfig::default),
            resumable: selector & 4 != 0,
            ..SourceConfig::default()
        };
        let mut source = SourceMigration::new(
            config,
            vec![SourceDisk {
                size: DISK,
                identity: "fuzz".into(),
                allocated: vec![0..DISK / 2],
            }],
        );
        let mut reads = Vec::new();
        for piece in pieces(data) {
            if source.is_finished() {
                break;
            }
            while let Some(transmit) = source.poll_transmit() {
                if let Transmit::Data { data, .. } = transmit {
                    assert!(data.len() <= 1 << 20);
                }
            }
            while let Some(read) = source.poll_io() {
                assert!(
                    read.offset + read.len as u64 <= DISK,
                    "read outside the disk"
                );
                reads.push(read);
            }
            while source.poll_event().is_some() {}
            let Some((&kind, body)) = piece.split_first() else {
                continue;
            };
            match kind % 4 {
                0 | 1 => {
                    if let Ok(control) = Control::decode(body) {
                        source.handle_control(control);
                    }
                }
                2 => {
                    if let Some(read) = reads.pop() {
                        source.handle_read_done(
                            read.token,
                            Bytes::from(vec![kind; read.len as usize]),
                        );
                    }
                }
                _ => {
                    if source.progress().phase == "disconnected" {
                        source.handle_reconnected();
                    } else {
                        source.handle_transport_failed("fuzzed cut".into());
                    }
                }
            }
        }
    }
});
