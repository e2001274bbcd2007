//! The QUIC endpoint (quinn 0.11 + rustls, ring provider), tuned for bulk transfer, and framed
//! streams on top of it.
//!
//! Only this module knows quinn. A migration uses one connection: the source opens one
//! bidirectional control stream, then [`Hello::data_streams`](crate::Hello) unidirectional data
//! streams.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Endpoint, EndpointConfig, TransportConfig, VarInt};
use tokio::io::AsyncReadExt;

use crate::error::TransportError;
use crate::frame::{
    Codec, EncodedFrame, Frame, HEADER_BYTES, PayloadBuf, decode_frame, decode_header, vec_payload,
};
use crate::gso_split::GsoSplitSocket;
use crate::identity::{Fingerprint, Identity, PinnedVerifier};

/// ALPN protocol id: refuses anything that is not Tern before the handshake completes.
pub const ALPN: &[u8] = b"tern/1";

/// UDP socket buffer size we ask for. Without it the receiver drops packets at the socket on
/// loopback (measured: 5k–11k lost packets per 2 GiB with the 208 KiB default). The kernel
/// caps it at `net.core.rmem_max`/`wmem_max`.
const SOCKET_BUFFER_BYTES: usize = 16 << 20;

/// Receive window of each stream. quinn aborts a connection when one stream's receive buffer
/// holds more than 1024 separate spans of out-of-order data ("too many gaps in stream
/// buffer"); on a lossy link a sender overshooting a full router queue loses about every
/// other packet, and with 16 MiB windows that limit was hit (measured: BBR on 100 Mbit/s,
/// 80 ms RTT, 0.1 % loss aborted mid-switchover). 1 MiB holds at most ~450 spans of
/// 1.2 KB packets. It also halved the source's memory and cost no speed on loopback
/// (2 GiB copy: 2.32–2.35 s against 2.35–2.57 s with 16 MiB). The price: one connection's
/// streams carry at most `streams × 1 MiB` per round trip (4 streams at 80 ms ≈ 420 Mbit/s).
const STREAM_WINDOW_BYTES: u64 = 1 << 20;

/// Packets the receiver may take before it must acknowledge (QUIC's ACK frequency
/// extension, which both ends of a Tern connection speak; without it a receiver acknowledges
/// every other packet). The receiver still acknowledges within its `max_ack_delay`, which
/// quinn keeps at or below the round-trip time, so loss detection and the congestion
/// controller keep their pace; a burst of 32 Ethernet-sized packets (46 KB) is far below any
/// congestion window that fills a link worth shaping. Measured on a 1 Gbit/s link (tbf, `tern-bench nbd
/// --idle --link tbf:1000`): acknowledgements received by the source 56–61 k → 17–22 k per
/// 2 GiB, the target's CPU 6.4 → 5.3 s, the source's 7.7 → 7.2 s, the same total time.
const ACK_ELICITING_THRESHOLD: u32 = 31;

/// The largest UDP payload a Tern endpoint sends or accepts; path MTU discovery (RFC 8899
/// probing, DF set, no ICMP needed) searches up to it from QUIC's safe 1200. quinn's default
/// stops at 1452 for Ethernet, but loopback (MTU 64 KiB) and the jumbo-frame networks storage
/// traffic often runs on carry much larger packets, and nearly all of the per-byte CPU of a
/// transfer is per packet (header protection, AEAD set-up, frame encoding, acknowledgement
/// tracking, stream reassembly). The bound is the largest IPv4 UDP payload; an IPv6 or
/// smaller path settles below it. Packets this large need the socket in `gso_split`: quinn batches
/// up to 10 packets per segmentation-offload send and the kernel refuses a batch over 64 KiB
/// (without the split, packets stopped at 6500 bytes). Measured on loopback, a 2 GiB copy
/// (`tern migrate --compress off`, AMD EPYC, 2 vCPUs, CPU of both ends): 1200 → 6500 bytes
/// took 1.10 M datagrams to 0.25 M and CPU 8.4 → 4.7 s; 6500 → 65507 (6 interleaved runs
/// each) took user CPU from a median of 2.75 s (2.29–2.85) to 2.13 s (1.78–2.24), and user
/// plus system from 3.9 s to 3.3 s. An Ethernet path settles at ~1452 as before, after a few
/// more lost probes, which quinn does not count as congestion.
pub const MAX_UDP_PAYLOAD_BYTES: u16 = 65_507;

/// Tuning for one connection.
#[derive(Clone, Copy, Debug)]
pub struct TransportTuning {
    /// Expected link bandwidth in bytes per second (for the window sizes).
    pub bandwidth_bytes_per_s: u64,
    /// Expected round-trip time.
    pub rtt: Duration,
    /// How long a silent peer is tolerated before the connection is declared dead.
    pub idle_timeout: Duration,
    /// The congestion controller of what this end sends.
    pub congestion: Congestion,
}

/// QUIC congestion control (quinn's controllers) for the data this end sends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Congestion {
    /// CUBIC (RFC 9438), quinn's default: fair to TCP, but reads every lost packet as
    /// congestion, so random loss on a long link starves it (measured: 0.1 % loss at 80 ms
    /// RTT held a 100 Mbit/s link to about 1 MiB/s).
    #[default]
    Cubic,
    /// BBR (quinn's implementation, marked experimental there): paces to the measured
    /// bottleneck rate and does not back off on random loss — for long or lossy links
    /// (measured: the same link at 10× CUBIC's rate). It retransmits more.
    Bbr,
}

impl std::str::FromStr for Congestion {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "cubic" => Ok(Congestion::Cubic),
            "bbr" => Ok(Congestion::Bbr),
            other => Err(format!("congestion control {other:?}: cubic or bbr")),
        }
    }
}

impl std::fmt::Display for Congestion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Congestion::Cubic => "cubic",
            Congestion::Bbr => "bbr",
        })
    }
}

impl Default for TransportTuning {
    fn default() -> Self {
        Self {
            // 10 Gbit/s × 10 ms, or 1 Gbit/s × 100 ms: windows of 2 × 12.5 MB ≥ the BDP of both.
            bandwidth_bytes_per_s: 1_250_000_000,
            rtt: Duration::from_millis(10),
            idle_timeout: Duration::from_secs(30),
            congestion: Congestion::Cubic,
        }
    }
}

impl TransportTuning {
    fn transport_config(&self) -> TransportConfig {
        let bdp = (self.bandwidth_bytes_per_s as f64 * self.rtt.as_secs_f64()) as u64;
        // The connection window is at least 2 × BDP so the sender never waits for window
        // updates. Each stream's is small (see `STREAM_WINDOW_BYTES`): several streams fill
        // the connection window together.
        let stream_window = STREAM_WINDOW_BYTES;
        let connection_window = (4 * bdp).clamp(64 << 20, 1 << 30);
        let mut config = TransportConfig::default();
        config
            .stream_receive_window(VarInt::from_u64(stream_window).expect("window fits a varint"))
            .receive_window(VarInt::from_u64(connection_window).expect("window fits a varint"))
            .send_window(connection_window)
            .max_concurrent_uni_streams(VarInt::from_u32(64))
            .max_concurrent_bidi_streams(VarInt::from_u32(4))
            .ack_frequency_config(Some({
                let mut ack = quinn::AckFrequencyConfig::default();
                ack.ack_eliciting_threshold(VarInt::from_u32(ACK_ELICITING_THRESHOLD));
                ack
            }))
            .mtu_discovery_config(Some({
                let mut mtu = quinn::MtuDiscoveryConfig::default();
                mtu.upper_bound(MAX_UDP_PAYLOAD_BYTES);
                mtu
            }))
            .keep_alive_interval(Some(self.idle_timeout / 4))
            .max_idle_timeout(Some(
                self.idle_timeout
                    .try_into()
                    .expect("idle timeout below 2^62 ms"),
            ));
        match self.congestion {
            Congestion::Cubic => {
                config.congestion_controller_factory(Arc::new(
                    quinn::congestion::CubicConfig::default(),
                ));
            }
            Congestion::Bbr => {
                config.congestion_controller_factory(Arc::new(
                    quinn::congestion::BbrConfig::default(),
                ));
            }
        }
        config
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn udp_socket(addr: SocketAddr) -> Result<std::net::UdpSocket, TransportError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
        .map_err(TransportError::Endpoint)?;
    if addr.is_ipv6() {
        // Dual-stack where the system allows it; ignoring failure keeps IPv6-only working.
        let _ = socket.set_only_v6(false);
    }
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER_BYTES);
    let recv = socket.recv_buffer_size().unwrap_or(0);
    if recv < SOCKET_BUFFER_BYTES / 2 {
        tracing::info!(
            recv_buffer_bytes = recv,
            wanted = SOCKET_BUFFER_BYTES,
            "UDP receive buffer capped by net.core.rmem_max; raise it for fast links"
        );
    }
    socket
        .bind(&addr.into())
        .map_err(TransportError::Endpoint)?;
    Ok(socket.into())
}

fn endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> Result<Endpoint, TransportError> {
    let socket = udp_socket(addr)?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| TransportError::Endpoint(std::io::Error::other("no async runtime")))?;
    let mut config = EndpointConfig::default();
    config
        .max_udp_payload_size(MAX_UDP_PAYLOAD_BYTES)
        .expect("1200 ≤ MAX_UDP_PAYLOAD_BYTES ≤ 65527");
    let socket = Arc::new(GsoSplitSocket::new(
        runtime
            .wrap_udp_socket(socket)
            .map_err(TransportError::Endpoint)?,
    ));
    Endpoint::new_with_abstract_socket(config, server, socket, runtime)
        .map_err(TransportError::Endpoint)
}

/// A listening target endpoint that accepts only the pinned source.
pub fn listen(
    addr: SocketAddr,
    identity: &Identity,
    peer: Fingerprint,
    tuning: &TransportTuning,
) -> Result<Endpoint, TransportError> {
    let provider = provider();
    let verifier = Arc::new(PinnedVerifier::new(peer, provider.clone()));
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.cert_chain(), identity.key())?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicServerConfig::try_from(tls)
        .map_err(|e| TransportError::BadIdentity(format!("QUIC TLS: {e}")))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(tuning.transport_config()));
    endpoint(addr, Some(server))
}

/// Connects to a target whose certificate has fingerprint `peer`, presenting `identity`.
pub async fn connect(
    target: SocketAddr,
    identity: &Identity,
    peer: Fingerprint,
    tuning: &TransportTuning,
) -> Result<(Endpoint, quinn::Connection), TransportError> {
    let client = client_config(identity, peer, tuning)?;
    let local: SocketAddr = if target.is_ipv6() {
        "[::]:0".parse().expect("valid address")
    } else {
        "0.0.0.0:0".parse().expect("valid address")
    };
    let endpoint = endpoint(local, None)?;
    let connection = endpoint.connect_with(client, target, "tern")?.await?;
    Ok((endpoint, connection))
}

/// Connects again from an existing endpoint (after a lost link), with a configuration
/// from [`client_config`].
pub async fn reconnect(
    endpoint: &Endpoint,
    target: SocketAddr,
    client: quinn::ClientConfig,
) -> Result<quinn::Connection, TransportError> {
    Ok(endpoint.connect_with(client, target, "tern")?.await?)
}

/// The client side of mutual TLS: presents `identity`, accepts only a server whose
/// certificate has fingerprint `peer`.
pub fn client_config(
    identity: &Identity,
    peer: Fingerprint,
    tuning: &TransportTuning,
) -> Result<quinn::ClientConfig, TransportError> {
    let provider = provider();
    let verifier = Arc::new(PinnedVerifier::new(peer, provider.clone()));
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(identity.cert_chain(), identity.key())?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls)
        .map_err(|e| TransportError::BadIdentity(format!("QUIC TLS: {e}")))?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(Arc::new(tuning.transport_config()));
    Ok(client)
}

/// Writes frames to a QUIC send stream.
#[derive(Debug)]
pub struct FrameWriter {
    stream: quinn::SendStream,
    bytes_written: u64,
}

impl FrameWriter {
    /// Wraps a send stream.
    pub fn new(stream: quinn::SendStream) -> Self {
        Self {
            stream,
            bytes_written: 0,
        }
    }

    /// Writes one frame (the payload is not copied).
    pub async fn send(&mut self, frame: EncodedFrame) -> Result<(), TransportError> {
        let len = frame.wire_len() as u64;
        let mut chunks = [Bytes::copy_from_slice(&frame.header), frame.payload];
        self.stream.write_all_chunks(&mut chunks).await?;
        self.bytes_written += len;
        Ok(())
    }

    /// Bytes written so far (headers and payloads).
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written
    }

    /// Finishes the stream: the peer reads a clean end after the last frame.
    pub fn finish(&mut self) {
        // Finishing an already-closed stream is harmless; the connection reports real errors.
        let _ = self.stream.finish();
    }
}

/// Reads and validates frames from a QUIC receive stream.
///
/// Payloads land in buffers of type `B` from the reader's allocator (see [`PayloadBuf`]).
#[derive(Debug)]
pub struct FrameReader<B = Vec<u8>> {
    stream: quinn::RecvStream,
    alloc: fn(usize) -> B,
}

impl FrameReader {
    /// Wraps a receive stream; payloads are read into `Vec`s.
    pub fn new(stream: quinn::RecvStream) -> Self {
        Self::with_buffers(stream, vec_payload)
    }
}

impl<B: PayloadBuf> FrameReader<B> {
    /// Wraps a receive stream; raw payloads are read, and compressed ones decompressed, into
    /// `alloc(len)`, which must return a buffer of exactly `len` bytes.
    pub fn with_buffers(stream: quinn::RecvStream, alloc: fn(usize) -> B) -> Self {
        Self { stream, alloc }
    }

    /// The next frame, `Ok(None)` at a clean end of stream (between frames). Every error is
    /// the peer's: the header is validated before the payload is read, so at most
    /// [`crate::FRAME_PAYLOAD_BYTES_MAX`] bytes are ever buffered.
    pub async fn next(&mut self) -> Result<Option<(Frame, usize)>, TransportError> {
        let mut header = [0u8; HEADER_BYTES];
        match self.stream.read_exact(&mut header).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
            Err(quinn::ReadExactError::FinishedEarly(_)) => return Err(TransportError::Closed),
            Err(e) => return Err(e.into()),
        }
        let header = decode_header(&header)?;
        let len = header.payload_len as usize;
        let payload = if header.codec == Codec::Raw {
            // Straight into the caller's buffer: the only copy of the bytes on this side.
            let mut buf = (self.alloc)(len);
            assert_eq!(buf.as_ref().len(), len, "allocator's length");
            match self.stream.read_exact(buf.as_mut()).await {
                Ok(()) => {}
                Err(quinn::ReadExactError::FinishedEarly(_)) => return Err(TransportError::Closed),
                Err(e) => return Err(e.into()),
            }
            Bytes::from_owner(buf)
        } else {
            // Compressed bytes are decompressed into the caller's buffer; this one only
            // holds them meanwhile. `take` bounds the read to this frame and `read_to_end`
            // fills spare capacity without zero-filling it first.
            let mut payload = Vec::with_capacity(len);
            let read = (&mut self.stream)
                .take(len as u64)
                .read_to_end(&mut payload)
                .await
                .map_err(|e| TransportError::Stream(e.to_string()))?;
            if read != len {
                return Err(TransportError::Closed);
            }
            Bytes::from(payload)
        };
        let wire = HEADER_BYTES + len;
        Ok(Some((decode_frame(&header, payload, self.alloc)?, wire)))
    }
}

#[cfg(test)]
mod tests {
    use super::{Congestion, MAX_UDP_PAYLOAD_BYTES, TransportTuning, connect, listen};
    use crate::identity::Identity;

    #[test]
    fn congestion_controllers_parse_print_and_refuse_others() {
        for c in [Congestion::Cubic, Congestion::Bbr] {
            assert_eq!(c.to_string().parse::<Congestion>(), Ok(c));
        }
        assert!("reno".parse::<Congestion>().is_err());
        assert_eq!(TransportTuning::default().congestion, Congestion::Cubic);
        // Both build a transport configuration.
        for congestion in [Congestion::Cubic, Congestion::Bbr] {
            let _ = TransportTuning {
                congestion,
                ..TransportTuning::default()
            }
            .transport_config();
        }
    }

    /// Loopback's MTU is 64 KiB: path MTU discovery must climb from 1200 to our bound while
    /// data flows (a real connection; the bytes sent are the budget, not a clock).
    #[test]
    fn mtu_discovery_reaches_the_bound_on_loopback() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let source = Identity::generate("source").unwrap();
            let target = Identity::generate("target").unwrap();
            let tuning = TransportTuning::default();
            let server = listen(
                "127.0.0.1:0".parse().unwrap(),
                &target,
                source.fingerprint(),
                &tuning,
            )
            .unwrap();
            let address = server.local_addr().unwrap();
            let sink = tokio::spawn(async move {
                let connection = server.accept().await.unwrap().await.unwrap();
                let mut stream = connection.accept_uni().await.unwrap();
                let received = stream.read_to_end(usize::MAX).await.unwrap().len();
                (received, connection)
            });
            let (_client, connection) = connect(address, &source, target.fingerprint(), &tuning)
                .await
                .unwrap();
            assert_eq!(connection.stats().path.current_mtu, 1200, "starts safe");
            let mut stream = connection.open_uni().await.unwrap();
            let block = vec![0x5a_u8; 64 << 10];
            let mut sent = 0usize;
            while connection.stats().path.current_mtu < MAX_UDP_PAYLOAD_BYTES && sent < 256 << 20 {
                stream.write_all(&block).await.unwrap();
                sent += block.len();
            }
            stream.finish().unwrap();
            let (received, _server_connection) = sink.await.unwrap();
            assert_eq!(received, sent);
            let stats = connection.stats();
            assert_eq!(
                stats.path.current_mtu, MAX_UDP_PAYLOAD_BYTES,
                "MTU after {sent} bytes"
            );
            assert_eq!(
                stats.path.lost_packets, 0,
                "no probe may be lost on loopback"
            );
        });
    }
}
