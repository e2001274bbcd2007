//! A user-space link emulator: a UDP proxy that delays, jitters, drops, duplicates and
//! reorders datagrams, limits their rate, and cuts the link on demand.
//!
//! The kernel's `netem` qdisc is missing on the reference machines, and `tbf` only limits
//! rate; this proxy sits between a QUIC client and its server (both on loopback) and gives
//! each direction its own [`Impairment`]. Everything random comes from one seed, so a run
//! can be repeated. The fault tests drive [`UdpProxy::cut`] / [`UdpProxy::restore`] and
//! wait on [`UdpProxy::wait_forwarded`]; the benchmark harness uses it for WAN cases.
//!
//! Threads, not async: two receivers (one per direction) put datagrams on one timeline
//! (a heap ordered by delivery time), and one sender delivers them when due.
//!
//! [`TcpProxy`] is the TCP side, for peers that speak NBD over TCP (QEMU's mirror): a byte
//! stream cannot lose or reorder bytes, so it takes the delay, jitter (without reordering)
//! and rate of an [`Impairment`], and a cut stalls the stream until it is restored, as a
//! pulled cable stalls TCP.

use std::collections::BinaryHeap;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// What happens to the datagrams of one direction.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Impairment {
    /// One-way delay added to every datagram.
    pub delay: Duration,
    /// Each datagram's delay varies uniformly by up to this much either way (so datagrams
    /// overtake each other when it exceeds their spacing).
    pub jitter: Duration,
    /// Probability that a datagram is dropped.
    pub loss: f64,
    /// Probability that a datagram is delivered twice.
    pub duplicate: f64,
    /// Probability that a datagram is held back by an extra `delay + 1 ms`, so later ones
    /// overtake it.
    pub reorder: f64,
    /// Link rate in bytes per second (`None`: unlimited). Datagrams queue behind each other;
    /// past `queue` of waiting time the tail is dropped, as a router's buffer would.
    pub rate_bytes_per_s: Option<u64>,
    /// Longest queueing delay before tail drop, with a rate (default 50 ms when zero).
    pub queue: Duration,
    /// IP MTU of the emulated path (`None`: no limit). A datagram whose IP packet would be
    /// larger is dropped, as a router drops a packet with don't-fragment set (QUIC sets it),
    /// so path MTU discovery finds the limit as it would on a real link. Without it, the
    /// proxy's loopback sockets pass 64 KiB datagrams, and a loss rate per datagram then
    /// costs far fewer bytes than on a real network.
    pub mtu: Option<usize>,
}

/// Ethernet's MTU: what a WAN path carries.
pub const ETHERNET_MTU: usize = 1500;

impl Impairment {
    /// No impairment at all.
    pub fn none() -> Self {
        Self::default()
    }
}

/// Counters of a proxy run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Datagrams received from the client (`.0`) and from upstream (`.1`).
    pub received: (u64, u64),
    /// Datagrams delivered (both directions).
    pub delivered: u64,
    /// Bytes delivered (both directions).
    pub delivered_bytes: u64,
    /// Datagrams dropped by loss, a full queue or a cut.
    pub dropped: u64,
    /// Datagrams dropped because the link was cut.
    pub dropped_by_cut: u64,
    /// Extra copies delivered.
    pub duplicated: u64,
    /// Datagrams held back to be overtaken.
    pub reordered: u64,
}

#[derive(PartialEq, Eq)]
struct Scheduled {
    at: Instant,
    seq: u64,
    /// True: client → upstream.
    forward: bool,
    data: Vec<u8>,
}

impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // A max-heap: the earliest delivery first.
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

struct Timeline {
    heap: BinaryHeap<Scheduled>,
    seq: u64,
    rng: StdRng,
    /// Per direction (forward, backward): when the emulated link is free again.
    free_at: [Instant; 2],
    stats: ProxyStats,
    client: Option<SocketAddr>,
}

struct Shared {
    timeline: Mutex<Timeline>,
    /// Wakes the sender (new datagram) and waiters (bytes delivered).
    changed: Condvar,
    cut: AtomicBool,
    stop: AtomicBool,
    impairments: [Impairment; 2],
}

/// A running proxy; stops when dropped.
pub struct UdpProxy {
    local: SocketAddr,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for UdpProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpProxy")
            .field("local", &self.local)
            .field("stats", &self.stats())
            .finish()
    }
}

/// How long a receiver blocks before it looks at the stop flag.
const POLL: Duration = Duration::from_millis(50);

impl UdpProxy {
    /// Listens on `listen` (port 0 for any) and forwards to `upstream`: datagrams from the
    /// client get `forward`, the replies `backward`. The client is whoever sent last.
    pub fn start(
        listen: SocketAddr,
        upstream: SocketAddr,
        forward: Impairment,
        backward: Impairment,
        seed: u64,
    ) -> io::Result<Self> {
        let front = UdpSocket::bind(listen)?;
        let back = UdpSocket::bind(SocketAddr::new(listen.ip(), 0))?;
        back.connect(upstream)?;
        front.set_read_timeout(Some(POLL))?;
        back.set_read_timeout(Some(POLL))?;
        let local = front.local_addr()?;
        let now = Instant::now();
        let shared = Arc::new(Shared {
            timeline: Mutex::new(Timeline {
                heap: BinaryHeap::new(),
                seq: 0,
                rng: StdRng::seed_from_u64(seed),
                free_at: [now, now],
                stats: ProxyStats::default(),
                client: None,
            }),
            changed: Condvar::new(),
            cut: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            impairments: [forward, backward],
        });
        let front = Arc::new(front);
        let back = Arc::new(back);
        let mut threads = Vec::new();
        for forward in [true, false] {
            let socket = if forward { front.clone() } else { back.clone() };
            let shared = shared.clone();
            threads.push(std::thread::spawn(move || {
                receive(&socket, &shared, forward)
            }));
        }
        {
            let shared = shared.clone();
            threads.push(std::thread::spawn(move || deliver(&front, &back, &shared)));
        }
        Ok(Self {
            local,
            shared,
            threads,
        })
    }

    /// The address clients send to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Cuts the link: every datagram, either way, is dropped until [`UdpProxy::restore`].
    pub fn cut(&self) {
        self.shared.cut.store(true, Ordering::SeqCst);
    }

    /// Ends a cut.
    pub fn restore(&self) {
        self.shared.cut.store(false, Ordering::SeqCst);
    }

    /// Blocks until at least `bytes` were delivered (both directions) since the start, or
    /// `timeout` passed; true if reached.
    pub fn wait_forwarded(&self, bytes: u64, timeout: Duration) -> bool {
        self.wait_for(timeout, |stats| stats.delivered_bytes >= bytes)
    }

    /// Blocks until the counters satisfy `done` (checked at every change) or `timeout`
    /// passed; true if satisfied.
    pub fn wait_for(&self, timeout: Duration, done: impl Fn(&ProxyStats) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut timeline = self
            .shared
            .timeline
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        while !done(&timeline.stats) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            timeline = self
                .shared
                .changed
                .wait_timeout(timeline, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// The counters so far.
    pub fn stats(&self) -> ProxyStats {
        self.shared
            .timeline
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .stats
    }
}

impl Drop for UdpProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.changed.notify_all();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Receives one direction's datagrams and puts them on the timeline.
fn receive(socket: &UdpSocket, shared: &Shared, forward: bool) {
    let mut buf = vec![0u8; 65536];
    let direction = usize::from(!forward);
    while !shared.stop.load(Ordering::SeqCst) {
        let (len, from) = match socket.recv_from(&mut buf) {
            Ok(received) => received,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            // ICMP port unreachable from a peer that is not up (yet): keep going.
            Err(_) => continue,
        };
        let now = Instant::now();
        let impairment = &shared.impairments[direction];
        let mut timeline = shared.timeline.lock().unwrap_or_else(|e| e.into_inner());
        if forward {
            timeline.client = Some(from);
            timeline.stats.received.0 += 1;
        } else {
            timeline.stats.received.1 += 1;
        }
        shared.changed.notify_all();
        if shared.cut.load(Ordering::SeqCst) {
            timeline.stats.dropped += 1;
            timeline.stats.dropped_by_cut += 1;
            continue;
        }
        // IP and UDP headers: 20 + 8 bytes over IPv4, 40 + 8 over IPv6.
        let headers = if from.is_ipv4() { 28 } else { 48 };
        if impairment.mtu.is_some_and(|mtu| len + headers > mtu) {
            timeline.stats.dropped += 1;
            continue;
        }
        if impairment.loss > 0.0 && timeline.rng.random_bool(impairment.loss.min(1.0)) {
            timeline.stats.dropped += 1;
            continue;
        }
        let mut depart = now;
        if let Some(rate) = impairment.rate_bytes_per_s.filter(|r| *r > 0) {
            let start = timeline.free_at[direction].max(now);
            let queue = if impairment.queue.is_zero() {
                Duration::from_millis(50)
            } else {
                impairment.queue
            };
            if start - now > queue {
                timeline.stats.dropped += 1;
                continue;
            }
            depart = start + Duration::from_secs_f64(len as f64 / rate as f64);
            timeline.free_at[direction] = depart;
        }
        let mut copies = 1;
        if impairment.duplicate > 0.0 && timeline.rng.random_bool(impairment.duplicate.min(1.0)) {
            copies = 2;
            timeline.stats.duplicated += 1;
        }
        for _ in 0..copies {
            let mut at = depart + impairment.delay;
            if !impairment.jitter.is_zero() {
                let jitter = impairment.jitter.as_secs_f64();
                let offset = timeline.rng.random_range(-jitter..=jitter);
                at = if offset >= 0.0 {
                    at + Duration::from_secs_f64(offset)
                } else {
                    at.checked_sub(Duration::from_secs_f64(-offset))
                        .unwrap_or(at)
                        .max(now)
                };
            }
            if impairment.reorder > 0.0 && timeline.rng.random_bool(impairment.reorder.min(1.0)) {
                at += impairment.delay + Duration::from_millis(1);
                timeline.stats.reordered += 1;
            }
            timeline.seq += 1;
            let seq = timeline.seq;
            timeline.heap.push(Scheduled {
                at,
                seq,
                forward,
                data: buf[..len].to_vec(),
            });
        }
        drop(timeline);
        shared.changed.notify_all();
    }
}

/// Sends each datagram when it is due.
fn deliver(front: &UdpSocket, back: &UdpSocket, shared: &Shared) {
    let mut timeline = shared.timeline.lock().unwrap_or_else(|e| e.into_inner());
    while !shared.stop.load(Ordering::SeqCst) {
        let now = Instant::now();
        let wait = match timeline.heap.peek() {
            Some(next) if next.at <= now => None,
            Some(next) => Some(next.at - now),
            None => Some(POLL),
        };
        if let Some(wait) = wait {
            timeline = shared
                .changed
                .wait_timeout(timeline, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            continue;
        }
        let item = timeline.heap.pop().expect("peeked");
        if shared.cut.load(Ordering::SeqCst) {
            // In flight on a cut link: lost too.
            timeline.stats.dropped += 1;
            timeline.stats.dropped_by_cut += 1;
            continue;
        }
        let client = timeline.client;
        drop(timeline);
        let sent = if item.forward {
            back.send(&item.data)
        } else {
            match client {
                Some(client) => front.send_to(&item.data, client),
                None => Ok(0),
            }
        };
        timeline = shared.timeline.lock().unwrap_or_else(|e| e.into_inner());
        if sent.is_ok() {
            timeline.stats.delivered += 1;
            timeline.stats.delivered_bytes += item.data.len() as u64;
            shared.changed.notify_all();
        }
    }
}

/// A TCP proxy: each client connection gets its own upstream connection; the bytes of each
/// direction are delayed and rate-limited as [`Impairment`] says. Stops when dropped (open
/// connections end with it).
pub struct TcpProxy {
    local: SocketAddr,
    stop: Arc<AtomicBool>,
    cut: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for TcpProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpProxy")
            .field("local", &self.local)
            .finish()
    }
}

impl TcpProxy {
    /// Listens on `listen` and forwards each connection to `upstream`.
    pub fn start(
        listen: SocketAddr,
        upstream: SocketAddr,
        forward: Impairment,
        backward: Impairment,
    ) -> io::Result<Self> {
        let listener = std::net::TcpListener::bind(listen)?;
        listener.set_nonblocking(true)?;
        let local = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let cut = Arc::new(AtomicBool::new(false));
        let thread = {
            let (stop, cut) = (stop.clone(), cut.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((client, _)) => {
                            let Ok(server) = std::net::TcpStream::connect(upstream) else {
                                continue;
                            };
                            let _ = client.set_nodelay(true);
                            let _ = server.set_nodelay(true);
                            for (from, to, impairment) in [
                                (client.try_clone(), server.try_clone(), forward.clone()),
                                (server.try_clone(), client.try_clone(), backward.clone()),
                            ] {
                                let (Ok(from), Ok(to)) = (from, to) else {
                                    continue;
                                };
                                let (stop, cut) = (stop.clone(), cut.clone());
                                std::thread::spawn(move || {
                                    pump(from, to, &impairment, &stop, &cut)
                                });
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            std::thread::sleep(POLL / 5);
                        }
                        Err(_) => return,
                    }
                }
            })
        };
        Ok(Self {
            local,
            stop,
            cut,
            thread: Some(thread),
        })
    }

    /// The address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Stalls every stream until [`TcpProxy::restore`].
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }

    /// Ends a cut.
    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Copies one direction of a TCP connection: each chunk read is delivered at
/// `arrival + delay ± jitter` (never before the previous chunk) and paced to the rate. A
/// reader thread timestamps chunks; this thread sends them when due.
fn pump(
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    impairment: &Impairment,
    stop: &Arc<AtomicBool>,
    cut: &Arc<AtomicBool>,
) {
    use std::io::{Read, Write};
    let (tx, rx) = std::sync::mpsc::sync_channel::<(Instant, Vec<u8>)>(256);
    let reader_stop = stop.clone();
    let reader = std::thread::spawn(move || {
        let _ = from.set_read_timeout(Some(POLL));
        let mut buf = vec![0u8; 64 << 10];
        while !reader_stop.load(Ordering::SeqCst) {
            match from.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    if tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return,
            }
        }
    });
    let mut rng = StdRng::seed_from_u64(0x7c9);
    let mut last_due = Instant::now();
    let mut link_free = Instant::now();
    while let Ok((arrived, data)) = rx.recv() {
        let mut due = arrived + impairment.delay;
        if !impairment.jitter.is_zero() {
            let jitter = impairment.jitter.as_secs_f64();
            let offset = rng.random_range(-jitter..=jitter);
            due = if offset >= 0.0 {
                due + Duration::from_secs_f64(offset)
            } else {
                due.checked_sub(Duration::from_secs_f64(-offset))
                    .unwrap_or(due)
            };
        }
        // A stream keeps its order: never before the chunk ahead of it.
        due = due.max(last_due);
        if let Some(rate) = impairment.rate_bytes_per_s.filter(|r| *r > 0) {
            let start = link_free.max(due);
            link_free = start + Duration::from_secs_f64(data.len() as f64 / rate as f64);
            due = link_free;
        }
        last_due = due;
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        while cut.load(Ordering::SeqCst) && !stop.load(Ordering::SeqCst) {
            std::thread::sleep(POLL / 5);
        }
        if to.write_all(&data).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
    let _ = reader.join();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn echo_server() -> (SocketAddr, JoinHandle<()>) {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let addr = socket.local_addr().unwrap();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((len, from)) = socket.recv_from(&mut buf) {
                if &buf[..len] == b"quit" {
                    return;
                }
                socket.send_to(&buf[..len], from).unwrap();
            }
        });
        (addr, thread)
    }

    fn client() -> UdpSocket {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        socket
    }

    #[test]
    fn forwards_both_ways_and_delays() {
        let (server, thread) = echo_server();
        let delay = Impairment {
            delay: Duration::from_millis(20),
            ..Impairment::none()
        };
        let proxy = UdpProxy::start(
            "127.0.0.1:0".parse().unwrap(),
            server,
            delay.clone(),
            delay,
            1,
        )
        .unwrap();
        let socket = client();
        let started = Instant::now();
        socket.send_to(b"ping", proxy.local_addr()).unwrap();
        let mut buf = [0u8; 16];
        let (len, _) = socket.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"ping");
        assert!(
            started.elapsed() >= Duration::from_millis(40),
            "both delays applied"
        );
        // The proxy counts a datagram after sending it: wait for the count, not a time.
        assert!(proxy.wait_for(Duration::from_secs(5), |s| s.delivered == 2));
        socket.send_to(b"quit", proxy.local_addr()).unwrap();
        thread.join().unwrap();
    }

    #[test]
    fn a_cut_drops_everything_until_restored() {
        let (server, thread) = echo_server();
        let proxy = UdpProxy::start(
            "127.0.0.1:0".parse().unwrap(),
            server,
            Impairment::none(),
            Impairment::none(),
            2,
        )
        .unwrap();
        let socket = client();
        proxy.cut();
        socket.send_to(b"lost", proxy.local_addr()).unwrap();
        let mut buf = [0u8; 16];
        assert!(socket.recv_from(&mut buf).is_err(), "nothing crosses a cut");
        assert!(proxy.wait_for(Duration::from_secs(5), |s| s.dropped_by_cut == 1));
        proxy.restore();
        socket.send_to(b"back", proxy.local_addr()).unwrap();
        let (len, _) = socket.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"back");
        assert!(proxy.wait_forwarded(8, Duration::from_secs(1)));
        socket.send_to(b"quit", proxy.local_addr()).unwrap();
        thread.join().unwrap();
    }

    #[test]
    fn datagrams_larger_than_the_mtu_are_dropped() {
        let (server, thread) = echo_server();
        let ethernet = Impairment {
            mtu: Some(ETHERNET_MTU),
            ..Impairment::none()
        };
        let proxy = UdpProxy::start(
            "127.0.0.1:0".parse().unwrap(),
            server,
            ethernet.clone(),
            ethernet,
            3,
        )
        .unwrap();
        let socket = client();
        // 1473 bytes of UDP payload + 28 bytes of headers exceed 1500.
        socket.send_to(&[7u8; 1473], proxy.local_addr()).unwrap();
        assert!(proxy.wait_for(Duration::from_secs(5), |s| s.dropped == 1));
        socket.send_to(&[8u8; 1472], proxy.local_addr()).unwrap();
        let mut buf = [0u8; 2048];
        let (len, _) = socket.recv_from(&mut buf).unwrap();
        assert_eq!(
            &buf[..len],
            &[8u8; 1472][..],
            "the largest datagram that fits"
        );
        socket.send_to(b"quit", proxy.local_addr()).unwrap();
        thread.join().unwrap();
    }

    #[test]
    fn the_tcp_proxy_delays_and_paces_a_stream_and_keeps_its_bytes() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let upstream = listener.local_addr().unwrap();
        let echo = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut buf = vec![0u8; 1 << 20];
            let mut total = 0;
            while total < 2 << 20 {
                let n = stream.read(&mut buf).unwrap();
                stream.write_all(&buf[..n]).unwrap();
                total += n;
            }
        });
        let pace = Impairment {
            delay: Duration::from_millis(10),
            rate_bytes_per_s: Some(16 << 20),
            ..Impairment::none()
        };
        let proxy = TcpProxy::start(
            "127.0.0.1:0".parse().unwrap(),
            upstream,
            pace,
            Impairment::none(),
        )
        .unwrap();
        let mut client = std::net::TcpStream::connect(proxy.local_addr()).unwrap();
        let data: Vec<u8> = (0..2 << 20).map(|i: u32| (i % 251) as u8).collect();
        let started = Instant::now();
        let writer = {
            let mut client = client.try_clone().unwrap();
            let data = data.clone();
            std::thread::spawn(move || client.write_all(&data).unwrap())
        };
        let mut back = vec![0u8; data.len()];
        client.read_exact(&mut back).unwrap();
        writer.join().unwrap();
        echo.join().unwrap();
        assert_eq!(back, data, "a stream keeps its bytes and their order");
        // 2 MiB at 16 MiB/s: at least 125 ms, plus the delay.
        assert!(
            started.elapsed() >= Duration::from_millis(130),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn loss_and_duplication_follow_their_probabilities() {
        let (server, thread) = echo_server();
        let forward = Impairment {
            loss: 0.3,
            duplicate: 0.2,
            ..Impairment::none()
        };
        let proxy = UdpProxy::start(
            "127.0.0.1:0".parse().unwrap(),
            server,
            forward,
            Impairment::none(),
            3,
        )
        .unwrap();
        let socket = client();
        for i in 0..1000u32 {
            socket
                .send_to(&i.to_le_bytes(), proxy.local_addr())
                .unwrap();
            // One at a time: a burst could overflow the socket buffer before the proxy
            // reads, and the kernel's drops would count as nobody's.
            assert!(proxy.wait_for(Duration::from_secs(5), |s| s.received.0 > u64::from(i)));
        }
        let stats = proxy.stats();
        assert!((200..400).contains(&stats.dropped), "{stats:?}");
        assert!((100..300).contains(&stats.duplicated), "{stats:?}");
        socket.send_to(b"quit", proxy.local_addr()).unwrap();
        thread.join().unwrap();
    }
}
