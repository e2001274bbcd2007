//! `tern-bench proxy`: the link emulator (`tern_bench::netem`) as a command, to put a WAN
//! between two hosts' processes by hand — Tern's QUIC (`--udp`) or QEMU's NBD (`--tcp`).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use tern_bench::netem::{Impairment, TcpProxy, UdpProxy};

/// Arguments of `tern-bench proxy`.
#[derive(clap::Args, Debug)]
pub(crate) struct ProxyArgs {
    /// Where clients connect (send).
    #[arg(long)]
    listen: SocketAddr,
    /// Where the proxy forwards to.
    #[arg(long)]
    to: SocketAddr,
    /// Proxy TCP instead of UDP (loss, duplication and reordering do not apply to a stream).
    #[arg(long)]
    tcp: bool,
    /// One-way delay in milliseconds, each direction (RTT = twice this).
    #[arg(long, default_value_t = 0.0)]
    delay_ms: f64,
    /// Delay variation in milliseconds, either way.
    #[arg(long, default_value_t = 0.0)]
    jitter_ms: f64,
    /// Fraction of datagrams dropped (0.001 = 0.1 %), each direction.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Fraction of datagrams delivered twice.
    #[arg(long, default_value_t = 0.0)]
    duplicate: f64,
    /// Fraction of datagrams held back to be overtaken.
    #[arg(long, default_value_t = 0.0)]
    reorder: f64,
    /// Link rate in Mbit/s, each direction (0: unlimited).
    #[arg(long, default_value_t = 0.0)]
    rate_mbit: f64,
    /// IP MTU of the emulated path, UDP only: larger datagrams are dropped, as with
    /// don't-fragment set (0: no limit).
    #[arg(long, default_value_t = tern_bench::netem::ETHERNET_MTU)]
    mtu: usize,
    /// Seed of every random choice.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

pub(crate) fn run(args: &ProxyArgs) -> anyhow::Result<()> {
    let impairment = Impairment {
        delay: Duration::from_secs_f64(args.delay_ms / 1e3),
        jitter: Duration::from_secs_f64(args.jitter_ms / 1e3),
        loss: args.loss,
        duplicate: args.duplicate,
        reorder: args.reorder,
        rate_bytes_per_s: (args.rate_mbit > 0.0).then(|| (args.rate_mbit * 1e6 / 8.0) as u64),
        queue: Duration::ZERO,
        mtu: (args.mtu > 0).then_some(args.mtu),
    };
    eprintln!(
        "tern-bench proxy: {} → {} with {impairment:?}",
        args.listen, args.to
    );
    if args.tcp {
        let _proxy = TcpProxy::start(args.listen, args.to, impairment.clone(), impairment)
            .context("start the TCP proxy")?;
        eprintln!("proxying TCP; Ctrl-C stops");
        loop {
            std::thread::park();
        }
    }
    let proxy = UdpProxy::start(
        args.listen,
        args.to,
        impairment.clone(),
        impairment,
        args.seed,
    )
    .context("start the UDP proxy")?;
    eprintln!("proxying UDP; Ctrl-C stops");
    loop {
        // Report the counters every 10 s (waiting on the counters, with a timeout).
        let before = proxy.stats();
        proxy.wait_for(Duration::from_secs(10), |_| false);
        let now = proxy.stats();
        if now != before {
            eprintln!("{now:?}");
        }
    }
}
