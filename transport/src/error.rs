//! Errors of the wire protocol and the QUIC transport.

use thiserror::Error;

/// Why bytes from a peer were rejected. Every variant is a peer's fault (or corruption on the
/// way), never ours; the receiver answers with an error frame and drops the connection.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer bytes than the structure needs.
    #[error("truncated frame: needed {needed} bytes, got {got}")]
    Truncated {
        /// Bytes needed.
        needed: usize,
        /// Bytes present.
        got: usize,
    },
    /// The frame does not start with Tern's magic number.
    #[error("not a Tern frame (magic {0:#010x})")]
    BadMagic(u32),
    /// The peer speaks a protocol version we do not.
    #[error("unsupported protocol version {0} (this build speaks {v})", v = crate::PROTOCOL_VERSION)]
    UnsupportedVersion(u16),
    /// Unknown frame kind.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// Unknown payload codec.
    #[error("unknown codec {0}")]
    UnknownCodec(u8),
    /// A length over its limit.
    #[error("frame too large: {len} bytes, limit {limit}")]
    TooLarge {
        /// The announced length.
        len: u64,
        /// The limit.
        limit: u64,
    },
    /// The decoded bytes do not match the CRC in the header.
    #[error("CRC mismatch: header says {expected:#010x}, payload has {actual:#010x}")]
    BadCrc {
        /// CRC from the header.
        expected: u32,
        /// CRC of the decoded bytes.
        actual: u32,
    },
    /// zstd refused the payload (corrupt, or larger than announced).
    #[error("cannot decompress payload: {0}")]
    Decompress(String),
    /// A field combination the protocol forbids.
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
    /// A control message that postcard cannot decode.
    #[error("malformed control message: {0}")]
    Control(String),
}

/// Errors of the QUIC transport and of identities.
#[derive(Debug, Error)]
pub enum TransportError {
    /// Reading or writing identity files.
    #[error("{what} {path}: {source}")]
    Identity {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A certificate or key that cannot be used.
    #[error("bad identity: {0}")]
    BadIdentity(String),
    /// TLS configuration failed.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// Setting up the UDP socket or endpoint failed.
    #[error("endpoint: {0}")]
    Endpoint(#[source] std::io::Error),
    /// The connection could not be established.
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The connection failed or was closed.
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Writing to a stream failed.
    #[error("stream write: {0}")]
    Write(#[from] quinn::WriteError),
    /// Reading from a stream failed.
    #[error("stream read: {0}")]
    Read(#[from] quinn::ReadExactError),
    /// The peer sent bytes that do not decode.
    #[error("protocol: {0}")]
    Decode(#[from] DecodeError),
    /// Reading a frame's payload failed.
    #[error("stream read: {0}")]
    Stream(String),
    /// The stream ended where a frame was expected.
    #[error("stream closed by peer")]
    Closed,
}
