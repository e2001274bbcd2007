//! A hostile or broken source, holding a valid certificate, sends bad frames to a real target
//! over real QUIC: each is refused with a clear error, the image keeps its size, nothing is
//! written, and the image stays marked incomplete (invariants I4, I5).

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use tern_blockdev::OpenOptions;
use tern_engine::MigrationError;
use tern_engine::driver::{incomplete_marker, serve_one};
use tern_transport::control::FEATURES_SUPPORTED;
use tern_transport::{
    Codec, Compression, Control, DiskInfo, EncodedFrame, Encoder, FrameKind, FrameWriter, Hello,
    Identity, PROTOCOL_VERSION, TransportTuning, ValidHeader, connect, encode_header, encode_zero,
    listen,
};

const DISK_BYTES: u64 = 4 << 20;
const CHUNK_BYTES: u32 = 64 << 10;

/// Runs a target, connects as the source, sends the Hello, then `bad` on a data stream, and
/// returns the target's error.
async fn target_error_after(dir: &Path, bad: Vec<u8>) -> MigrationError {
    let source = Identity::generate("source").unwrap();
    let target = Identity::generate("target").unwrap();
    let endpoint = listen(
        "127.0.0.1:0".parse().unwrap(),
        &target,
        source.fingerprint(),
        &TransportTuning::default(),
    )
    .unwrap();
    let address = endpoint.local_addr().unwrap();
    let image = dir.join("target.img");
    let images = vec![image.clone()];
    let server =
        tokio::spawn(async move { serve_one(&endpoint, &images, &OpenOptions::default()).await });

    let (_client, connection) = connect(
        address,
        &source,
        target.fingerprint(),
        &TransportTuning::default(),
    )
    .await
    .unwrap();
    let (control_send, _control_recv) = connection.open_bi().await.unwrap();
    let mut control = FrameWriter::new(control_send);
    control.send(hello([1; 16]).encode()).await.unwrap();
    let mut data = connection.open_uni().await.unwrap();
    // The target may close the connection while we write; that is its answer, not an error.
    let _ = data.write_all(&bad).await;
    let _ = data.finish();

    let result = tokio::time::timeout(Duration::from_secs(20), server)
        .await
        .expect("the target answers bad input within 20 s")
        .unwrap();
    let error = result.expect_err("the target accepted a bad frame");
    // Nothing reached the disk, the size is the announced one, and the image is unusable.
    assert_eq!(std::fs::metadata(&image).unwrap().len(), DISK_BYTES);
    assert_eq!(tern_tests::allocated_bytes(&image), 0, "bytes were written");
    assert!(
        incomplete_marker(&image).exists(),
        "the image lost its incomplete marker"
    );
    error
}

/// A well-formed Hello for one disk of `DISK_BYTES`, one data stream.
fn hello(session_id: [u8; 16]) -> Control {
    Control::Hello(Hello {
        version: PROTOCOL_VERSION,
        features: FEATURES_SUPPORTED,
        session_id,
        chunk_bytes: CHUNK_BYTES,
        data_streams: 1,
        disks: vec![DiskInfo {
            size: DISK_BYTES,
            identity: "hostile".into(),
            allocated: DISK_BYTES,
        }],
        resume: false,
    })
}

fn header(fields: ValidHeader, payload: Bytes) -> EncodedFrame {
    EncodedFrame {
        header: encode_header(&fields),
        payload,
    }
}

fn data_fields(raw_len: u32, payload_len: u32, crc32: u32) -> ValidHeader {
    ValidHeader {
        kind: FrameKind::Data,
        codec: Codec::Raw,
        disk: 0,
        chunk: 0,
        chunk_count: 1,
        generation: 1,
        raw_len,
        payload_len,
        crc32,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn bytes_of(frame: &EncodedFrame) -> Vec<u8> {
    let mut bytes = frame.header.to_vec();
    bytes.extend_from_slice(&frame.payload);
    bytes
}

fn check(name: &str, bad: EncodedFrame, expect: &str) {
    check_bytes(name, bytes_of(&bad), expect);
}

fn check_bytes(name: &str, bad: Vec<u8>, expect: &str) {
    let dir = tempfile::tempdir().unwrap();
    let error = runtime().block_on(target_error_after(dir.path(), bad));
    let text = error.to_string();
    assert!(
        text.contains(expect),
        "{name}: expected an error mentioning {expect:?}, got {text:?}"
    );
}

#[test]
fn a_bad_crc_is_refused() {
    let mut frame = Encoder::new().data(
        0,
        0,
        1,
        1,
        Bytes::from(vec![5u8; CHUNK_BYTES as usize]),
        crc32fast::hash(&vec![5u8; CHUNK_BYTES as usize]),
        Compression::Off,
    );
    let mut payload = frame.payload.to_vec();
    payload[100] ^= 0xff;
    frame.payload = Bytes::from(payload);
    check("bad crc", frame, "CRC mismatch");
}

#[test]
fn a_range_past_the_end_of_the_disk_is_refused() {
    let chunks = DISK_BYTES / CHUNK_BYTES as u64;
    check(
        "zero range past the end",
        encode_zero(0, chunks - 1, 2, 1),
        "outside disk",
    );
    let frame = Encoder::new().data(
        0,
        chunks,
        1,
        1,
        Bytes::from(vec![1u8; CHUNK_BYTES as usize]),
        crc32fast::hash(&vec![1u8; CHUNK_BYTES as usize]),
        Compression::Off,
    );
    check("data past the end", frame, "outside disk");
}

#[test]
fn a_wrong_length_for_the_range_is_refused() {
    // One chunk announced, half a chunk of bytes.
    let frame = Encoder::new().data(
        0,
        0,
        1,
        1,
        Bytes::from(vec![1u8; CHUNK_BYTES as usize / 2]),
        crc32fast::hash(&vec![1u8; CHUNK_BYTES as usize / 2]),
        Compression::Off,
    );
    check("short data", frame, "carries");
}

#[test]
fn an_unknown_version_is_refused() {
    let mut frame = encode_zero(0, 0, 1, 1);
    frame.header[4] = 99;
    check("version", frame, "unsupported protocol version 99");
}

#[test]
fn a_truncated_header_is_refused() {
    // 20 bytes of a header, then the stream ends.
    let header = bytes_of(&encode_zero(0, 0, 1, 1));
    check_bytes("truncated header", header[..20].to_vec(), "stream closed");
}

#[test]
fn a_truncated_payload_is_refused() {
    // The header promises 4096 bytes, the stream ends after 10.
    let mut bytes = header(data_fields(4096, 4096, 0), Bytes::new())
        .header
        .to_vec();
    bytes.extend_from_slice(&[0u8; 10]);
    check_bytes("truncated payload", bytes, "stream closed");
}

#[test]
fn an_oversized_frame_is_refused_before_its_payload_is_read() {
    let frame = header(
        data_fields(1 << 20, tern_transport::FRAME_PAYLOAD_BYTES_MAX + 1, 0),
        Bytes::new(),
    );
    check("oversized", frame, "frame too large");
}

#[test]
fn a_decompression_bomb_is_refused() {
    // 1 MiB of zeros compresses to a few hundred bytes; the header claims 4 KiB.
    let bomb = zstd_frame_of_zeros(1 << 20);
    let mut fields = data_fields(4096, bomb.len() as u32, 0);
    fields.codec = Codec::Zstd;
    check("bomb", header(fields, Bytes::from(bomb)), "decompress");
}

fn zstd_frame_of_zeros(len: usize) -> Vec<u8> {
    // Encode through our own encoder (zstd level 1) and strip the header.
    let frame = Encoder::new().data(
        0,
        0,
        16,
        1,
        Bytes::from(vec![0u8; len]),
        crc32fast::hash(&vec![0u8; len]),
        Compression::Zstd(1),
    );
    assert!(frame.is_compressed());
    frame.payload.to_vec()
}

/// Seeded mutations of valid frames (fields flipped, set to extremes, truncated, extended,
/// sometimes with a fixed-up CRC so they pass the checksum and reach the range checks), each
/// over its own real connection to a real target: the target never panics, never writes
/// outside the image, and always ends the connection (with an error, or — for a mutation
/// that is still a valid frame — after answering a barrier).
#[test]
fn fuzzed_frames_over_real_connections_never_write_outside_the_image() {
    use rand::{Rng, SeedableRng};
    const INPUTS: usize = 1000;
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("target.img");
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x7e57);
    let mut encoder = Encoder::new();
    let valid: Vec<Vec<u8>> = vec![
        bytes_of(&encoder.data(
            0,
            3,
            1,
            5,
            Bytes::from(vec![7u8; CHUNK_BYTES as usize]),
            crc32fast::hash(&vec![7u8; CHUNK_BYTES as usize]),
            Compression::Off,
        )),
        bytes_of(&encoder.data(
            0,
            1,
            2,
            6,
            Bytes::from(vec![0x41u8; 2 * CHUNK_BYTES as usize]),
            crc32fast::hash(&vec![0x41u8; 2 * CHUNK_BYTES as usize]),
            Compression::Zstd(1),
        )),
        bytes_of(&encode_zero(0, 10, 4, 7)),
        bytes_of(&Control::BarrierDone { id: 1 }.encode()),
    ];
    let mut seen = std::collections::HashSet::new();
    let mut inputs = Vec::new();
    while inputs.len() < INPUTS {
        let mut bytes = valid[rng.random_range(0..valid.len())].clone();
        for _ in 0..rng.random_range(1..4) {
            match rng.random_range(0..6) {
                // A random byte of the header.
                0 => {
                    let at = rng.random_range(0..48.min(bytes.len()));
                    bytes[at] = rng.random();
                }
                // A header field set to an extreme: disk, chunk_count, chunk, generation,
                // raw_len, payload_len.
                1 if bytes.len() >= 48 => {
                    let (at, len) = [(8, 4), (12, 4), (16, 8), (24, 8), (32, 4), (36, 4)]
                        [rng.random_range(0..6)];
                    let value: u64 =
                        [0, 1, u64::MAX, u64::MAX / 2, DISK_BYTES / 4096][rng.random_range(0..5)];
                    bytes[at..at + len].copy_from_slice(&value.to_le_bytes()[..len]);
                }
                // Truncated.
                2 => {
                    let keep = rng.random_range(0..bytes.len());
                    bytes.truncate(keep);
                }
                // Garbage appended.
                3 => {
                    let extra = rng.random_range(1..4096);
                    bytes.extend((0..extra).map(|_| rng.random::<u8>()));
                }
                // A payload byte flipped.
                4 if bytes.len() > 48 => {
                    let at = rng.random_range(48..bytes.len());
                    bytes[at] ^= 1 << rng.random_range(0..8);
                }
                // The CRC fixed up for a raw payload, so the frame passes the checksum.
                _ if bytes.len() >= 48 => {
                    let crc = crc32fast::hash(&bytes[48..]);
                    bytes[40..44].copy_from_slice(&crc.to_le_bytes());
                }
                _ => {}
            }
        }
        if seen.insert(bytes.clone()) {
            inputs.push(bytes);
        }
    }

    let outcomes = runtime().block_on(async {
        let source = Identity::generate("source").unwrap();
        let target = Identity::generate("target").unwrap();
        let endpoint = listen(
            "127.0.0.1:0".parse().unwrap(),
            &target,
            source.fingerprint(),
            &TransportTuning::default(),
        )
        .unwrap();
        let address = endpoint.local_addr().unwrap();
        let mut client: Option<tern_transport::quinn::Endpoint> = None;
        let client_config = tern_transport::client_config(
            &source,
            target.fingerprint(),
            &TransportTuning::default(),
        )
        .unwrap();
        let mut refused = 0usize;
        let mut accepted = 0usize;
        for bad in &inputs {
            let images = vec![image.clone()];
            let endpoint = endpoint.clone();
            let server = tokio::spawn(async move {
                serve_one(&endpoint, &images, &OpenOptions::default()).await
            });
            let connection = match &client {
                Some(client) => tern_transport::reconnect(client, address, client_config.clone())
                    .await
                    .unwrap(),
                None => {
                    let (endpoint, connection) = connect(
                        address,
                        &source,
                        target.fingerprint(),
                        &TransportTuning::default(),
                    )
                    .await
                    .unwrap();
                    client = Some(endpoint);
                    connection
                }
            };
            let (control_send, control_recv) = connection.open_bi().await.unwrap();
            let mut control = FrameWriter::new(control_send);
            control.send(hello([2; 16]).encode()).await.unwrap();
            let mut data = connection.open_uni().await.unwrap();
            let _ = data.write_all(bad).await;
            let _ = data.finish();
            // If the bytes were still one valid frame, the barrier after it is answered; if
            // not, the target closes the connection. Either way the reader sees it.
            let _ = control
                .send(
                    Control::Barrier {
                        id: 1,
                        frames: vec![1],
                    }
                    .encode(),
                )
                .await;
            let mut reader = tern_transport::FrameReader::new(control_recv);
            let answered = loop {
                let next = tokio::time::timeout(Duration::from_secs(20), reader.next())
                    .await
                    .unwrap_or_else(|_| {
                        panic!(
                            "the target neither answered nor refused {:02x?}",
                            &bad[..bad.len().min(64)]
                        )
                    });
                match next {
                    Ok(Some((tern_transport::Frame::Control(body), _))) => {
                        match Control::decode(&body) {
                            Ok(Control::BarrierDone { .. }) => break true,
                            Ok(Control::Welcome(_)) => continue,
                            _ => break false,
                        }
                    }
                    _ => break false,
                }
            };
            connection.close(0u32.into(), b"next");
            let result = tokio::time::timeout(Duration::from_secs(20), server)
                .await
                .expect("the target ends the connection")
                .expect("the target never panics");
            assert!(result.is_err(), "an unfinished migration cannot succeed");
            if answered {
                accepted += 1;
            } else {
                refused += 1;
            }
            // Nothing outside the image, ever.
            assert_eq!(std::fs::metadata(&image).unwrap().len(), DISK_BYTES);
            assert!(incomplete_marker(&image).exists());
        }
        (refused, accepted)
    });
    eprintln!(
        "{INPUTS} distinct fuzzed frames over real connections: {} refused, {} still valid; no crash, nothing written outside the image",
        outcomes.0, outcomes.1
    );
    assert!(outcomes.0 > INPUTS / 2, "most mutations must be refused");
}
