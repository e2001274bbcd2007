//! Control messages: postcard-encoded, carried in [`crate::FrameKind::Control`] frames on the
//! control stream.
//!
//! postcard's format is specified and stable since 1.0 but not self-describing, so evolution is
//! ours to manage: variants are never reordered or removed, new messages are appended as new
//! variants and only sent when the peer announced the matching feature bit in the handshake.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::DecodeError;
use crate::frame::{EncodedFrame, encode_control};

/// Feature bit: the sender accepts zstd payloads.
pub const FEATURE_ZSTD: u64 = 1 << 0;
/// Feature bit: the sender understands zero-range frames.
pub const FEATURE_ZERO_RANGES: u64 = 1 << 1;
/// Feature bit: the sender understands `MirrorRequest` / `MirrorAck` (active mirroring).
pub const FEATURE_MIRROR: u64 = 1 << 2;
/// Feature bit: the sender (a target) answers a `DigestSummaryRequest` only once every
/// barrier received before it is done, so a source may send the request right behind its
/// final barrier (one round trip less of downtime).
pub const FEATURE_ORDERED_SUMMARY: u64 = 1 << 3;
/// Features this build supports.
pub const FEATURES_SUPPORTED: u64 =
    FEATURE_ZSTD | FEATURE_ZERO_RANGES | FEATURE_MIRROR | FEATURE_ORDERED_SUMMARY;
/// Features a peer must support for this build to talk to it.
pub const FEATURES_REQUIRED: u64 = FEATURE_ZERO_RANGES;

/// One disk in the handshake.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    /// Size in bytes.
    pub size: u64,
    /// An identity of the image the source copies (a name chosen by the operator or the path),
    /// so a target can refuse to overwrite the wrong image.
    pub identity: String,
    /// Bytes the source holds allocated (an upper bound of the data that will be written),
    /// so a target whose file system cannot hold them refuses before any data flows.
    pub allocated: u64,
}

/// The source's first message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Protocol version (also in every frame header).
    pub version: u16,
    /// Feature bits the source supports.
    pub features: u64,
    /// Random id of this migration; frames of another session are never applied.
    pub session_id: [u8; 16],
    /// Bytes per chunk, a power of two (the unit of chunk indexes and dirty tracking).
    pub chunk_bytes: u32,
    /// Number of unidirectional data streams the source will open.
    pub data_streams: u16,
    /// The disks, in index order.
    pub disks: Vec<DiskInfo>,
    /// This connection continues the session `session_id` after a lost link: a target that
    /// still holds the session's images keeps them and answers `resumed: true`.
    pub resume: bool,
}

/// The target's answer to [`Hello`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// Protocol version.
    pub version: u16,
    /// Feature bits both sides support.
    pub features: u64,
    /// The target holds the images of the session being resumed (see [`Hello::resume`]): the
    /// source resends only what the target never confirmed durable. `false` on a resume
    /// means the target lost the session; the source starts the copy again from the start.
    pub resumed: bool,
    /// On a resumed session: the target still has the digests of everything written in the
    /// session (it kept them in memory across the lost link). `false` after a target restart:
    /// the source then verifies by reading the target back instead.
    pub digests_kept: bool,
}

/// Why a peer gave up. Sent in [`Control::Error`] before closing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// A frame or message did not decode or broke a rule.
    Protocol,
    /// Versions or required features do not match.
    Incompatible,
    /// The target's image has the wrong size or identity.
    ImageMismatch,
    /// A disk operation failed.
    Disk,
    /// Verification found different bytes.
    VerifyFailed,
    /// The operator cancelled.
    Cancelled,
    /// Anything else.
    Internal,
}

/// Every control message. Append only; never reorder.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Control {
    /// Source → target: first message.
    Hello(Hello),
    /// Target → source: accepted.
    Welcome(Welcome),
    /// Source → target: once the target has applied `frames[i]` frames from data stream `i`,
    /// and all their writes completed, flush every disk and answer [`Control::BarrierDone`].
    Barrier {
        /// Barrier id, echoed back.
        id: u64,
        /// Frames the source sent on each data stream before this barrier.
        frames: Vec<u64>,
    },
    /// Target → source: everything before barrier `id` is durable (written and fdatasync'ed).
    BarrierDone {
        /// The barrier's id.
        id: u64,
    },
    /// Source → target: send digests of `block_count` blocks of `block_bytes` from `block`.
    DigestRequest {
        /// Disk index.
        disk: u32,
        /// Block size of the digests (a multiple of the chunk size).
        block_bytes: u32,
        /// First block.
        block: u64,
        /// Number of blocks.
        block_count: u64,
        /// Read the blocks back from disk (true), or answer with the digests of what the
        /// target wrote, which needs `block_bytes` equal to the chunk size (false).
        read_back: bool,
    },
    /// Target → source: xxh3-128 digests of consecutive blocks (the last one clipped to the
    /// disk's end).
    Digests {
        /// Disk index.
        disk: u32,
        /// First block.
        block: u64,
        /// One digest per block.
        digests: Vec<u128>,
    },
    /// Source → target: the copy is complete and verified; the target may mark its image
    /// complete.
    Complete,
    /// Target → source: the image is marked complete and durable.
    CompleteDone,
    /// Either side: giving up, with a reason. The connection closes after it.
    Error {
        /// Category.
        code: ErrorCode,
        /// Human-readable reason.
        message: String,
    },
    /// Source → target: one digest over the whole per-chunk table of what the target wrote
    /// to `disk` (xxh3-128 of the little-endian chunk digests, in chunk order). A match
    /// verifies every chunk in one round trip; on a mismatch the source asks per chunk.
    DigestSummaryRequest {
        /// Disk index.
        disk: u32,
    },
    /// Target → source: the answer to `DigestSummaryRequest`.
    DigestSummary {
        /// Disk index.
        disk: u32,
        /// The summary digest.
        digest: u128,
    },
    /// Source → target (active mirroring): answer `MirrorAck { token }` once every chunk in
    /// `ranges` holds data of at least the given generation on the target's disk (the write
    /// completed; durable at the next barrier). The frames travel on the data streams; this
    /// request may arrive before or after them.
    MirrorRequest {
        /// Echoed in the acknowledgement.
        token: u64,
        /// The chunks and the generation each must have reached.
        ranges: Vec<MirrorRange>,
    },
    /// Target → source: the chunks of these `MirrorRequest`s are written.
    MirrorAck {
        /// The requests' tokens.
        tokens: Vec<u64>,
    },
}

/// Chunks `chunk..chunk + chunk_count` of `disk`, sent with `generation`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorRange {
    /// Disk index.
    pub disk: u32,
    /// First chunk.
    pub chunk: u64,
    /// Number of chunks.
    pub chunk_count: u32,
    /// The generation of the frame(s) that carried them.
    pub generation: u64,
}

/// Ranges per `MirrorRequest` at most (a 32 MiB write at 4 KiB chunks fits with room).
pub const MIRROR_RANGES_MAX: usize = 64;
/// Mirror requests a target keeps waiting at most; more is a protocol violation.
pub const MIRROR_PENDING_MAX: usize = 4096;

impl Control {
    /// Serializes into a control frame.
    pub fn encode(&self) -> EncodedFrame {
        let body = postcard::to_stdvec(self).expect("postcard serialization of owned data");
        encode_control(Bytes::from(body)).expect("control messages stay below the frame limit")
    }

    /// Parses the body of a control frame.
    pub fn decode(body: &[u8]) -> Result<Self, DecodeError> {
        postcard::from_bytes(body).map_err(|e| DecodeError::Control(e.to_string()))
    }
}

/// Digests per [`Control::Digests`] message: 16 bytes each, so a message stays near 64 KiB.
pub const DIGESTS_PER_MESSAGE: usize = 4096;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{Frame, decode};

    #[test]
    fn hello_round_trips_through_a_frame() {
        let hello = Control::Hello(Hello {
            version: 1,
            features: FEATURES_SUPPORTED,
            session_id: [7; 16],
            chunk_bytes: 65536,
            data_streams: 4,
            disks: vec![DiskInfo {
                size: 1 << 30,
                identity: "vm1-root".into(),
                allocated: 1 << 29,
            }],
            resume: true,
        });
        let frame = hello.encode();
        let mut bytes = frame.header.to_vec();
        bytes.extend_from_slice(&frame.payload);
        let (Frame::Control(body), _) = decode(&bytes).unwrap() else {
            panic!("not a control frame")
        };
        assert_eq!(Control::decode(&body).unwrap(), hello);
    }

    #[test]
    fn full_digest_message_fits_in_a_frame() {
        let message = Control::Digests {
            disk: 0,
            block: u64::MAX,
            digests: vec![u128::MAX; DIGESTS_PER_MESSAGE],
        };
        assert!(message.encode().payload.len() <= crate::FRAME_RAW_BYTES_MAX as usize);
    }

    #[test]
    fn garbage_is_a_control_error() {
        assert!(matches!(
            Control::decode(&[0xff, 0xff, 0xff]),
            Err(DecodeError::Control(_))
        ));
    }
}
