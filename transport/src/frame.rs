//! Frames: the unit of everything Tern sends, as pure `encode`/`decode`.
//!
//! Every frame is a fixed 48-byte little-endian [`FrameHeader`] followed by `payload_len` bytes.
//! Data and zero-range frames travel on the data streams, control frames (postcard-encoded
//! [`crate::Control`] messages) on the control stream; one header format means one parser to
//! validate and fuzz. `docs/protocol.md` has the byte layout and the sequence of a migration.
//!
//! Invariant I5 (validate before write) starts here: [`decode_header`] rejects a wrong magic,
//! an unknown version or kind, and lengths over the limits *before* the caller reads the payload,
//! and [`decode_frame`] checks the codec, the decompressed size and the CRC before any byte is
//! handed to the engine. The engine then checks that the range lies inside the disk.

use bytes::Bytes;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::error::DecodeError;

/// `"TRN1"` read as a little-endian u32: the first four bytes of every frame.
pub const MAGIC: u32 = u32::from_le_bytes(*b"TRN1");
/// The wire protocol version this build speaks. Version 0 is invalid by convention.
/// Version 2 added resumption (`Hello::resume`, `Welcome::resumed`) and `DiskInfo::allocated`.
pub const PROTOCOL_VERSION: u16 = 2;
/// Size of [`FrameHeader`] on the wire.
pub const HEADER_BYTES: usize = 48;
/// The largest uncompressed payload of one data frame (and of one control message).
///
/// Chosen as the bulk read size: large enough that the 48-byte header and per-frame work are
/// noise, small enough that a retransmitted or superseded frame wastes little.
pub const FRAME_RAW_BYTES_MAX: u32 = 1 << 20;
/// The largest payload a frame may carry on the wire: a raw 1 MiB chunk, or a zstd frame,
/// whose worst case (incompressible input) is slightly larger than its input.
pub const FRAME_PAYLOAD_BYTES_MAX: u32 = FRAME_RAW_BYTES_MAX + (64 << 10);

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// Disk bytes for `chunk_count` chunks starting at `chunk`.
    Data = 1,
    /// `chunk_count` chunks starting at `chunk` read as zeros; no payload.
    Zero = 2,
    /// A postcard-encoded [`crate::Control`] message.
    Control = 3,
}

impl FrameKind {
    fn from_u8(value: u8) -> Option<Self> {
        match value {
            1 => Some(Self::Data),
            2 => Some(Self::Zero),
            3 => Some(Self::Control),
            _ => None,
        }
    }
}

/// How a payload is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Codec {
    /// The payload is the bytes themselves.
    Raw = 0,
    /// The payload is one zstd frame of the bytes.
    Zstd = 1,
}

impl Codec {
    fn from_u8(value: u8) -> Option<Self> {
        match value {
            0 => Some(Self::Raw),
            1 => Some(Self::Zstd),
            _ => None,
        }
    }
}

/// The fixed header in front of every frame (48 bytes, little-endian, no padding).
///
/// | offset | field | meaning |
/// | --- | --- | --- |
/// | 0 | magic | [`MAGIC`] |
/// | 4 | version | [`PROTOCOL_VERSION`] |
/// | 6 | kind | [`FrameKind`] |
/// | 7 | codec | [`Codec`] |
/// | 8 | disk | index of the disk in the handshake |
/// | 12 | chunk_count | chunks covered (Data, Zero); 0 for Control |
/// | 16 | chunk | first chunk index (in units of the handshake's chunk size) |
/// | 24 | generation | the source's send sequence; larger is newer (invariant I3) |
/// | 32 | raw_len | bytes after decoding (Data, Control); 0 for Zero |
/// | 36 | payload_len | bytes that follow the header |
/// | 40 | crc32 | CRC-32 (IEEE, crc32fast) of the decoded bytes |
/// | 44 | reserved | must be 0 |
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct FrameHeader {
    magic: U32,
    version: U16,
    kind: u8,
    codec: u8,
    disk: U32,
    chunk_count: U32,
    chunk: U64,
    generation: U64,
    raw_len: U32,
    payload_len: U32,
    crc32: U32,
    reserved: U32,
}

const _: () = assert!(size_of::<FrameHeader>() == HEADER_BYTES);

/// A header that passed [`decode_header`]: its fields are known to be in range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ValidHeader {
    /// What the frame carries.
    pub kind: FrameKind,
    /// How the payload is encoded.
    pub codec: Codec,
    /// Disk index.
    pub disk: u32,
    /// First chunk.
    pub chunk: u64,
    /// Number of chunks.
    pub chunk_count: u32,
    /// Send sequence of the source.
    pub generation: u64,
    /// Decoded payload length.
    pub raw_len: u32,
    /// Bytes following the header.
    pub payload_len: u32,
    /// CRC-32 of the decoded payload.
    pub crc32: u32,
}

/// A fully decoded and checked frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Bytes for a chunk range; `data.len()` is the range's length clipped to the disk.
    Data {
        /// Disk index.
        disk: u32,
        /// First chunk.
        chunk: u64,
        /// Number of chunks.
        chunk_count: u32,
        /// Send sequence.
        generation: u64,
        /// Decoded, CRC-checked bytes.
        data: Bytes,
    },
    /// A chunk range that reads as zeros.
    Zero {
        /// Disk index.
        disk: u32,
        /// First chunk.
        chunk: u64,
        /// Number of chunks.
        chunk_count: u32,
        /// Send sequence.
        generation: u64,
    },
    /// Postcard bytes of a control message (CRC-checked).
    Control(Bytes),
}

/// An encoded frame, ready to be written: header then payload.
#[derive(Clone, Debug)]
pub struct EncodedFrame {
    /// The 48 header bytes.
    pub header: [u8; HEADER_BYTES],
    /// The payload (possibly compressed).
    pub payload: Bytes,
}

impl EncodedFrame {
    /// Bytes this frame occupies on the stream.
    pub fn wire_len(&self) -> usize {
        HEADER_BYTES + self.payload.len()
    }

    /// True when the payload is compressed.
    pub fn is_compressed(&self) -> bool {
        self.header[7] == Codec::Zstd as u8
    }
}

/// Per-frame encoding choices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Never compress.
    Off,
    /// zstd at this level, sent raw when it saves less than [`COMPRESSION_SAVING_MIN_PERCENT`].
    Zstd(i32),
}

/// A compressed payload must be at least this much smaller than the input to be sent
/// compressed; otherwise the receiver's decompression is wasted work.
pub const COMPRESSION_SAVING_MIN_PERCENT: usize = 10;

/// Serializes a header; the inverse of [`decode_header`].
pub fn encode_header(fields: &ValidHeader) -> [u8; HEADER_BYTES] {
    let header = FrameHeader {
        magic: U32::new(MAGIC),
        version: U16::new(PROTOCOL_VERSION),
        kind: fields.kind as u8,
        codec: fields.codec as u8,
        disk: U32::new(fields.disk),
        chunk_count: U32::new(fields.chunk_count),
        chunk: U64::new(fields.chunk),
        generation: U64::new(fields.generation),
        raw_len: U32::new(fields.raw_len),
        payload_len: U32::new(fields.payload_len),
        crc32: U32::new(fields.crc32),
        reserved: U32::new(0),
    };
    let mut out = [0u8; HEADER_BYTES];
    out.copy_from_slice(header.as_bytes());
    out
}

/// Bytes of the sample that decides whether a large payload is worth compressing.
const SAMPLE_BYTES: usize = 16 << 10;

/// A reusable encoder: keeps one zstd compression context so that per-frame compression does
/// not allocate a context each time.
pub struct Encoder {
    compressor: Option<zstd::bulk::Compressor<'static>>,
    level: i32,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("level", &self.level)
            .finish()
    }
}

impl Default for Encoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Encoder {
    /// An encoder with no compression context yet (made on first use).
    pub fn new() -> Self {
        Self {
            compressor: None,
            level: 1,
        }
    }

    /// Encodes a data frame. `data` must be non-empty and at most [`FRAME_RAW_BYTES_MAX`];
    /// `crc32` is its CRC32, computed by the caller where the bytes were read, so that it
    /// covers them from the disk on (checked in debug builds).
    ///
    /// With [`Compression::Zstd`] the payload is compressed and sent compressed only when that
    /// saves at least [`COMPRESSION_SAVING_MIN_PERCENT`]. Returns the frame and whether it was
    /// compressed.
    #[allow(clippy::too_many_arguments)] // the header's fields, as `ValidHeader` names them
    pub fn data(
        &mut self,
        disk: u32,
        chunk: u64,
        chunk_count: u32,
        generation: u64,
        data: Bytes,
        crc32: u32,
        compression: Compression,
    ) -> EncodedFrame {
        assert!(!data.is_empty() && data.len() <= FRAME_RAW_BYTES_MAX as usize);
        assert!(chunk_count > 0);
        debug_assert_eq!(crc32, crc32fast::hash(&data), "CRC32 of another payload");
        let crc = crc32;
        let raw_len = data.len() as u32;
        if let Compression::Zstd(level) = compression
            && let Some(compressed) = self.compress(&data, level)
        {
            let len = compressed.len() as u32;
            return EncodedFrame {
                header: encode_header(&ValidHeader {
                    kind: FrameKind::Data,
                    codec: Codec::Zstd,
                    disk,
                    chunk,
                    chunk_count,
                    generation,
                    raw_len,
                    payload_len: len,
                    crc32: crc,
                }),
                payload: Bytes::from(compressed),
            };
        }
        EncodedFrame {
            header: encode_header(&ValidHeader {
                kind: FrameKind::Data,
                codec: Codec::Raw,
                disk,
                chunk,
                chunk_count,
                generation,
                raw_len,
                payload_len: raw_len,
                crc32: crc,
            }),
            payload: data,
        }
    }

    fn compress(&mut self, data: &[u8], level: i32) -> Option<Vec<u8>> {
        if self.compressor.is_none() || self.level != level {
            self.compressor = zstd::bulk::Compressor::new(level).ok();
            self.level = level;
        }
        let compressor = self.compressor.as_mut()?;
        // Random-looking data (encrypted or already compressed guest files) does not compress;
        // trying costs ~1 ms per MiB. A sample from the middle decides for large payloads at
        // ~2 % of that cost.
        if data.len() >= 4 * SAMPLE_BYTES {
            let middle = data.len() / 2;
            let sample = &data[middle - SAMPLE_BYTES / 2..middle + SAMPLE_BYTES / 2];
            let limit = SAMPLE_BYTES - SAMPLE_BYTES * COMPRESSION_SAVING_MIN_PERCENT / 100;
            let mut out = Vec::with_capacity(limit);
            match compressor.compress_to_buffer(sample, &mut out) {
                Ok(n) if n < limit => {}
                _ => return None,
            }
        }
        let limit = data.len() - data.len() * COMPRESSION_SAVING_MIN_PERCENT / 100;
        let mut out = Vec::with_capacity(limit);
        // A destination buffer smaller than the input makes zstd stop early with an error
        // when the data does not compress well enough, which is exactly the case we send raw.
        match compressor.compress_to_buffer(data, &mut out) {
            Ok(n) if n < limit => Some(out),
            _ => None,
        }
    }
}

/// Encodes a zero-range frame: `chunk_count` chunks from `chunk` read as zeros.
pub fn encode_zero(disk: u32, chunk: u64, chunk_count: u32, generation: u64) -> EncodedFrame {
    assert!(chunk_count > 0);
    EncodedFrame {
        header: encode_header(&ValidHeader {
            kind: FrameKind::Zero,
            codec: Codec::Raw,
            disk,
            chunk,
            chunk_count,
            generation,
            raw_len: 0,
            payload_len: 0,
            crc32: 0,
        }),
        payload: Bytes::new(),
    }
}

/// Encodes a control frame around already-serialized postcard bytes.
pub fn encode_control(body: Bytes) -> Result<EncodedFrame, DecodeError> {
    if body.len() > FRAME_RAW_BYTES_MAX as usize {
        return Err(DecodeError::TooLarge {
            len: body.len() as u64,
            limit: FRAME_RAW_BYTES_MAX as u64,
        });
    }
    let len = body.len() as u32;
    Ok(EncodedFrame {
        header: encode_header(&ValidHeader {
            kind: FrameKind::Control,
            codec: Codec::Raw,
            disk: 0,
            chunk: 0,
            chunk_count: 0,
            generation: 0,
            raw_len: len,
            payload_len: len,
            crc32: crc32fast::hash(&body),
        }),
        payload: body,
    })
}

/// Parses and checks a frame header. Call before reading the payload: a header that passes
/// bounds `payload_len` by [`FRAME_PAYLOAD_BYTES_MAX`], so the reader allocates at most that.
pub fn decode_header(bytes: &[u8]) -> Result<ValidHeader, DecodeError> {
    let Ok((header, _)) = FrameHeader::read_from_prefix(bytes) else {
        return Err(DecodeError::Truncated {
            needed: HEADER_BYTES,
            got: bytes.len(),
        });
    };
    if header.magic.get() != MAGIC {
        return Err(DecodeError::BadMagic(header.magic.get()));
    }
    let version = header.version.get();
    if version != PROTOCOL_VERSION {
        return Err(DecodeError::UnsupportedVersion(version));
    }
    let kind = FrameKind::from_u8(header.kind).ok_or(DecodeError::UnknownKind(header.kind))?;
    let codec = Codec::from_u8(header.codec).ok_or(DecodeError::UnknownCodec(header.codec))?;
    if header.reserved.get() != 0 {
        return Err(DecodeError::Malformed("reserved header field is not zero"));
    }
    let raw_len = header.raw_len.get();
    let payload_len = header.payload_len.get();
    let chunk_count = header.chunk_count.get();
    if payload_len > FRAME_PAYLOAD_BYTES_MAX {
        return Err(DecodeError::TooLarge {
            len: payload_len as u64,
            limit: FRAME_PAYLOAD_BYTES_MAX as u64,
        });
    }
    if raw_len > FRAME_RAW_BYTES_MAX {
        return Err(DecodeError::TooLarge {
            len: raw_len as u64,
            limit: FRAME_RAW_BYTES_MAX as u64,
        });
    }
    match kind {
        FrameKind::Data => {
            if chunk_count == 0 || raw_len == 0 {
                return Err(DecodeError::Malformed("data frame covers no bytes"));
            }
            if codec == Codec::Raw && payload_len != raw_len {
                return Err(DecodeError::Malformed(
                    "raw data frame: payload length differs from raw length",
                ));
            }
        }
        FrameKind::Zero => {
            if chunk_count == 0 || raw_len != 0 || payload_len != 0 || codec != Codec::Raw {
                return Err(DecodeError::Malformed(
                    "zero frame must cover chunks and carry no payload",
                ));
            }
        }
        FrameKind::Control => {
            if codec != Codec::Raw || payload_len != raw_len || chunk_count != 0 {
                return Err(DecodeError::Malformed("control frame must be raw"));
            }
        }
    }
    if header.chunk.get().checked_add(chunk_count as u64).is_none() {
        return Err(DecodeError::Malformed("chunk range overflows"));
    }
    Ok(ValidHeader {
        kind,
        codec,
        disk: header.disk.get(),
        chunk: header.chunk.get(),
        chunk_count,
        generation: header.generation.get(),
        raw_len,
        payload_len,
        crc32: header.crc32.get(),
    })
}

/// Decodes a frame's payload: decompresses (never beyond `raw_len`, itself bounded by
/// [`FRAME_RAW_BYTES_MAX`]), and checks length and CRC.
///
/// A compressed payload is decompressed into `alloc(raw_len)` (a buffer of exactly that
/// length, which it overwrites).
pub fn decode_frame<B: PayloadBuf>(
    header: &ValidHeader,
    payload: Bytes,
    alloc: impl FnOnce(usize) -> B,
) -> Result<Frame, DecodeError> {
    if payload.len() != header.payload_len as usize {
        return Err(DecodeError::Truncated {
            needed: header.payload_len as usize,
            got: payload.len(),
        });
    }
    let data = match header.codec {
        Codec::Raw => payload,
        Codec::Zstd => {
            let mut out = alloc(header.raw_len as usize);
            assert_eq!(
                out.as_ref().len(),
                header.raw_len as usize,
                "allocator's length"
            );
            // zstd's bulk decompressor refuses to write past the buffer's end, which is what
            // bounds a decompression bomb to `raw_len` bytes.
            let n = zstd::bulk::Decompressor::new()
                .and_then(|mut d| d.decompress_to_buffer(&payload, out.as_mut()))
                .map_err(|e| DecodeError::Decompress(e.to_string()))?;
            if n != header.raw_len as usize {
                return Err(DecodeError::Malformed(
                    "decompressed size differs from raw length",
                ));
            }
            Bytes::from_owner(out)
        }
    };
    if header.kind != FrameKind::Zero {
        let crc = crc32fast::hash(&data);
        if crc != header.crc32 {
            return Err(DecodeError::BadCrc {
                expected: header.crc32,
                actual: crc,
            });
        }
    }
    Ok(match header.kind {
        FrameKind::Data => Frame::Data {
            disk: header.disk,
            chunk: header.chunk,
            chunk_count: header.chunk_count,
            generation: header.generation,
            data,
        },
        FrameKind::Zero => Frame::Zero {
            disk: header.disk,
            chunk: header.chunk,
            chunk_count: header.chunk_count,
            generation: header.generation,
        },
        FrameKind::Control => Frame::Control(data),
    })
}

/// A buffer a frame's payload is read or decompressed into. The target's data streams use
/// buffers its disk can write with O_DIRECT, so a payload's bytes are copied once, out of
/// QUIC's packets; everything else uses `Vec<u8>`.
pub trait PayloadBuf: AsRef<[u8]> + AsMut<[u8]> + Send + 'static {}

impl<T: AsRef<[u8]> + AsMut<[u8]> + Send + 'static> PayloadBuf for T {}

/// A zeroed `Vec<u8>` of `len` bytes: the payload buffer of [`decode`] and of
/// [`crate::FrameReader::new`].
pub fn vec_payload(len: usize) -> Vec<u8> {
    vec![0; len]
}

/// Decodes one whole frame from a byte slice (header and payload); used by tests and the
/// fuzz target. Returns the frame and the number of bytes consumed.
pub fn decode(bytes: &[u8]) -> Result<(Frame, usize), DecodeError> {
    let header = decode_header(bytes)?;
    let end = HEADER_BYTES + header.payload_len as usize;
    if bytes.len() < end {
        return Err(DecodeError::Truncated {
            needed: end,
            got: bytes.len(),
        });
    }
    let frame = decode_frame(
        &header,
        Bytes::copy_from_slice(&bytes[HEADER_BYTES..end]),
        vec_payload,
    )?;
    Ok((frame, end))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn concat(frame: &EncodedFrame) -> Vec<u8> {
        let mut out = frame.header.to_vec();
        out.extend_from_slice(&frame.payload);
        out
    }

    fn text(len: usize) -> Vec<u8> {
        b"the quick brown fox jumps over the lazy dog\n"
            .iter()
            .copied()
            .cycle()
            .take(len)
            .collect()
    }

    #[test]
    fn data_frame_round_trips_raw_and_compressed() {
        let mut encoder = Encoder::new();
        for compression in [Compression::Off, Compression::Zstd(1)] {
            let data = Bytes::from(text(65536));
            let crc = crc32fast::hash(&data);
            let frame = encoder.data(2, 7, 1, 99, data.clone(), crc, compression);
            let (decoded, used) = decode(&concat(&frame)).unwrap();
            assert_eq!(used, frame.wire_len());
            assert_eq!(
                decoded,
                Frame::Data {
                    disk: 2,
                    chunk: 7,
                    chunk_count: 1,
                    generation: 99,
                    data
                }
            );
            if compression != Compression::Off {
                assert!(frame.payload.len() < 65536 / 4, "text compresses");
            }
        }
    }

    #[test]
    fn incompressible_data_is_sent_raw() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let data: Vec<u8> = (0..65536)
            .map(|_| {
                // xorshift64*: enough entropy that zstd cannot shrink it by 10 %.
                state ^= state >> 12;
                state ^= state << 25;
                state ^= state >> 27;
                (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
            })
            .collect();
        let crc = crc32fast::hash(&data);
        let frame = Encoder::new().data(0, 0, 1, 1, Bytes::from(data), crc, Compression::Zstd(1));
        let header = decode_header(&frame.header).unwrap();
        assert_eq!(header.codec, Codec::Raw);
    }

    #[test]
    fn bad_crc_is_rejected() {
        let data = text(100);
        let crc = crc32fast::hash(&data);
        let frame = Encoder::new().data(0, 0, 1, 1, Bytes::from(data), crc, Compression::Off);
        let mut bytes = concat(&frame);
        bytes[HEADER_BYTES + 3] ^= 1;
        assert!(matches!(decode(&bytes), Err(DecodeError::BadCrc { .. })));
    }

    #[test]
    fn unknown_version_is_rejected() {
        let mut bytes = concat(&encode_zero(0, 0, 1, 1));
        bytes[4] = 9;
        assert_eq!(decode(&bytes), Err(DecodeError::UnsupportedVersion(9)));
    }

    #[test]
    fn truncated_header_is_rejected() {
        let bytes = concat(&encode_zero(0, 0, 1, 1));
        assert!(matches!(
            decode(&bytes[..20]),
            Err(DecodeError::Truncated { needed: 48, .. })
        ));
    }

    #[test]
    fn oversized_frame_is_rejected_before_reading_the_payload() {
        let mut header = FrameHeader::read_from_bytes(&encode_zero(0, 0, 1, 1).header).unwrap();
        header.kind = FrameKind::Data as u8;
        header.payload_len = U32::new(FRAME_PAYLOAD_BYTES_MAX + 1);
        header.raw_len = U32::new(FRAME_PAYLOAD_BYTES_MAX + 1);
        assert!(matches!(
            decode_header(header.as_bytes()),
            Err(DecodeError::TooLarge { .. })
        ));
    }

    #[test]
    fn decompression_beyond_raw_len_is_rejected() {
        // A zstd frame of 1 MiB of zeros, announced as 1000 bytes.
        let payload = zstd::bulk::compress(&vec![0u8; 1 << 20], 1).unwrap();
        let bytes_header = encode_header(&ValidHeader {
            kind: FrameKind::Data,
            codec: Codec::Zstd,
            disk: 0,
            chunk: 0,
            chunk_count: 1,
            generation: 1,
            raw_len: 1000,
            payload_len: payload.len() as u32,
            crc32: 0,
        });
        let header = decode_header(&bytes_header).unwrap();
        assert!(matches!(
            decode_frame(&header, Bytes::from(payload), vec_payload),
            Err(DecodeError::Decompress(_))
        ));
    }

    #[test]
    fn chunk_range_overflow_is_rejected() {
        let mut header = FrameHeader::read_from_bytes(&encode_zero(0, 0, 1, 1).header).unwrap();
        header.chunk = U64::new(u64::MAX);
        assert!(matches!(
            decode_header(header.as_bytes()),
            Err(DecodeError::Malformed(_))
        ));
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn data_round_trips(
            disk in any::<u32>(), chunk in 0u64..1 << 40, count in 1u32..64,
            generation in any::<u64>(), data in proptest::collection::vec(any::<u8>(), 1..5000),
            zstd in any::<bool>(),
        ) {
            let compression = if zstd { Compression::Zstd(1) } else { Compression::Off };
            let crc = crc32fast::hash(&data);
            let frame = Encoder::new().data(disk, chunk, count, generation, Bytes::from(data.clone()), crc, compression);
            let (decoded, _) = decode(&concat(&frame)).unwrap();
            prop_assert_eq!(decoded, Frame::Data { disk, chunk, chunk_count: count, generation, data: Bytes::from(data) });
        }

        #[test]
        fn single_bit_flips_never_pass_as_a_different_frame(flip in 0usize..(48 + 64) * 8) {
            let data = text(64);
            let crc = crc32fast::hash(&data);
            let frame = Encoder::new().data(1, 5, 1, 3, Bytes::from(data), crc, Compression::Off);
            let mut bytes = concat(&frame);
            bytes[flip / 8] ^= 1 << (flip % 8);
            if let Ok((Frame::Data { data, .. }, _)) = decode(&bytes) {
                // A flip in disk/chunk/generation passes the parser (the engine checks ranges),
                // but the bytes themselves can never change undetected.
                prop_assert_eq!(data, Bytes::from(text(64)));
            }
        }
    }
}
