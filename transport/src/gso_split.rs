//! A UDP socket for quinn that splits a segmentation-offload batch the kernel would refuse.
//!
//! quinn hands the socket up to 10 packets of one size at once (one `sendmsg` with
//! `UDP_SEGMENT`, "GSO"). The kernel takes such a batch only while it fits one UDP datagram:
//! at most [`GSO_BATCH_BYTES_MAX`] bytes. With Ethernet-sized packets that always holds, but
//! with the large packets that loopback and jumbo-frame networks carry it does not (10 × 8972
//! bytes), and quinn-udp answers the kernel's refusal by turning segmentation offload off for
//! good and dropping the batch, which path MTU discovery reads as a black hole. Splitting the
//! batch here lets Tern's packets grow to what the path carries: nearly all of a transfer's
//! CPU is per packet, not per byte (see [`MAX_UDP_PAYLOAD_BYTES`](crate::quic::MAX_UDP_PAYLOAD_BYTES)).

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

/// The most payload bytes one `sendmsg` with segmentation offload may carry: the whole batch
/// must fit one IPv4 datagram (65535 bytes less the 20-byte IP and 8-byte UDP headers; IPv6
/// allows 20 more, which this bound leaves unused).
pub(crate) const GSO_BATCH_BYTES_MAX: usize = 65_507;

/// Wraps quinn's own socket; only [`AsyncUdpSocket::try_send`] differs.
pub(crate) struct GsoSplitSocket {
    inner: Arc<dyn AsyncUdpSocket>,
}

impl GsoSplitSocket {
    /// Wraps `inner` (from [`quinn::Runtime::wrap_udp_socket`]).
    pub(crate) fn new(inner: Arc<dyn AsyncUdpSocket>) -> Self {
        Self { inner }
    }
}

impl fmt::Debug for GsoSplitSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GsoSplitSocket")
            .field("inner", &self.inner)
            .finish()
    }
}

/// How many bytes of `transmit` go in each `sendmsg`, when it must be split: a whole number of
/// segments, at most [`GSO_BATCH_BYTES_MAX`]. `None` when the batch fits as it is.
fn split_step(transmit: &Transmit) -> Option<(usize, usize)> {
    let segment = transmit.segment_size.filter(|&s| s > 0)?;
    (transmit.contents.len() > GSO_BATCH_BYTES_MAX)
        .then(|| (segment, (GSO_BATCH_BYTES_MAX / segment).max(1) * segment))
}

/// The parts a batch is sent in (see [`split_step`]).
fn parts<'a>(
    transmit: &Transmit<'a>,
    segment: usize,
    step: usize,
) -> impl Iterator<Item = Transmit<'a>> + 'a {
    let (destination, ecn, src_ip) = (transmit.destination, transmit.ecn, transmit.src_ip);
    transmit
        .contents
        .chunks(step)
        .map(move |contents| Transmit {
            destination,
            ecn,
            contents,
            // A part of one segment is an ordinary datagram.
            segment_size: Some(segment).filter(|&s| contents.len() > s),
            src_ip,
        })
}

impl AsyncUdpSocket for GsoSplitSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    /// Sends the batch in parts that fit. Should the socket fill after the first part, the
    /// error goes to quinn, which retries the whole batch later: the peer then receives the
    /// packets sent already twice and discards the copies by packet number, which costs a
    /// little bandwidth but, unlike a dropped rest, no congestion response.
    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let Some((segment, step)) = split_step(transmit) else {
            return self.inner.try_send(transmit);
        };
        for part in parts(transmit, segment, step) {
            self.inner.try_send(&part)?;
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transmit(contents: &[u8], segment_size: Option<usize>) -> Transmit<'_> {
        Transmit {
            destination: "127.0.0.1:9".parse().unwrap(),
            ecn: None,
            contents,
            segment_size,
            src_ip: None,
        }
    }

    fn shapes(t: &Transmit) -> Vec<(usize, Option<usize>)> {
        match split_step(t) {
            None => vec![(t.contents.len(), t.segment_size)],
            Some((segment, step)) => parts(t, segment, step)
                .map(|p| (p.contents.len(), p.segment_size))
                .collect(),
        }
    }

    #[test]
    fn a_batch_that_fits_is_sent_as_it_is() {
        let data = vec![0u8; 10 * 6500];
        assert_eq!(split_step(&transmit(&data, Some(6500))), None);
        let one = vec![0u8; 1200];
        assert_eq!(split_step(&transmit(&one, None)), None);
        let big = vec![0u8; 65_527];
        assert_eq!(split_step(&transmit(&big, None)), None, "one datagram");
    }

    #[test]
    fn a_batch_too_large_is_split_at_segment_boundaries() {
        // 10 packets of 8972 bytes (jumbo frames): 7 fit one send, 3 the next.
        let data: Vec<u8> = (0..10 * 8972).map(|i| i as u8).collect();
        let t = transmit(&data, Some(8972));
        assert_eq!(
            shapes(&t),
            vec![(7 * 8972, Some(8972)), (3 * 8972, Some(8972))]
        );
        let (segment, step) = split_step(&t).unwrap();
        let joined: Vec<u8> = parts(&t, segment, step)
            .flat_map(|p| p.contents.to_vec())
            .collect();
        assert_eq!(joined, data, "the parts are the batch, in order");
        // A short last packet stays with the full ones before it, or goes alone without GSO.
        let data = vec![0u8; 3 * 30_000 + 100];
        assert_eq!(
            shapes(&transmit(&data, Some(30_000))),
            vec![(60_000, Some(30_000)), (30_100, Some(30_000))]
        );
        let data = vec![0u8; 2 * 40_000 + 5];
        assert_eq!(
            shapes(&transmit(&data, Some(40_000))),
            vec![(40_000, None), (40_000, None), (5, None)]
        );
    }
}
