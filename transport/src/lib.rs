//! Tern's wire protocol and QUIC transport.
//!
//! - [`frame`]: the fixed 48-byte frame header and data/zero/control frames as pure
//!   `encode`/`decode` functions (zerocopy header, crc32fast, zstd payloads).
//! - [`control`]: control messages in postcard, carried in control frames.
//! - [`identity`]: keys, self-signed certificates and SHA-256 fingerprint pinning.
//! - [`quic`]: the quinn endpoint with mutual TLS, tuned for bulk data, and framed streams.
//!
//! The byte layout and the message sequence are in `docs/protocol.md`.
#![forbid(unsafe_code)]

pub mod control;
pub mod error;
pub mod frame;
mod gso_split;
pub mod identity;
pub mod quic;

pub use control::{Control, DiskInfo, ErrorCode, Hello, MirrorRange, Welcome};
pub use error::{DecodeError, TransportError};
pub use frame::{
    Codec, Compression, EncodedFrame, Encoder, FRAME_PAYLOAD_BYTES_MAX, FRAME_RAW_BYTES_MAX, Frame,
    FrameKind, HEADER_BYTES, PROTOCOL_VERSION, PayloadBuf, ValidHeader, decode, decode_frame,
    decode_header, encode_header, encode_zero, vec_payload,
};
pub use identity::{Fingerprint, Identity};
pub use quic::{
    Congestion, FrameReader, FrameWriter, TransportTuning, client_config, connect, listen,
    reconnect,
};
pub use quinn;
