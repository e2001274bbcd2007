//! The link between the source host and the target host of a live case.
//!
//! - `loopback`: both hosts are this machine's loopback; Tern's QUIC and QEMU's NBD (TCP) go
//!   straight to the target.
//! - `tbf:MBIT`: the target runs in its own network namespace behind a veth pair whose two
//!   ends are shaped with the kernel's `tbf` qdisc (the kernel has no `netem`, but `tbf`
//!   works), so both systems see a real rate-limited link with a 1500-byte MTU.
//! - `wan:MBIT:RTT_MS:LOSS`: the user-space link emulator of [`crate::netem`] on loopback,
//!   a UDP proxy for Tern (rate, delay, loss) and a TCP proxy for QEMU (rate and delay; a
//!   byte stream cannot lose bytes, so QEMU's link has no loss — that favours QEMU).
//!
//! Every link counts the bytes it carried, both directions, headers included, from the
//! kernel's interface counters, the same way for every system.

use std::fmt;
use std::fs;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use tern_bench::netem::{ETHERNET_MTU, Impairment, TcpProxy, UdpProxy};

/// The network namespace of the target host with a shaped link.
const NAMESPACE: &str = "tern-bench-target";
/// The veth end in this (the source's) namespace.
const SOURCE_IF: &str = "tbsrc";
/// The veth end in the target's namespace.
const TARGET_IF: &str = "tbdst";
/// The source's address on the veth link.
const SOURCE_IP: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 1);
/// The target's address on the veth link.
const TARGET_IP: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 2);
/// The emulated WAN's proxies draw their random choices from this seed.
const WAN_SEED: u64 = 1;

/// What a case's link is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub(crate) enum LinkSpec {
    /// Loopback, unshaped.
    Loopback,
    /// A veth pair to a network namespace, both ends shaped with `tbf` to this rate.
    Shaped {
        /// Rate, Mbit/s.
        rate_mbit: f64,
    },
    /// The user-space emulator: rate, round-trip time and (UDP only) loss.
    Wan {
        /// Rate each way, Mbit/s.
        rate_mbit: f64,
        /// Round-trip time added, ms (half each way).
        rtt_ms: f64,
        /// Probability that a datagram is lost, each way.
        loss: f64,
    },
}

impl FromStr for LinkSpec {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> anyhow::Result<Self> {
        let fields: Vec<&str> = text.split(':').collect();
        let number = |at: usize, what: &str| -> anyhow::Result<f64> {
            let value: f64 = fields[at]
                .parse()
                .with_context(|| format!("link {text:?}: {what} {:?}", fields[at]))?;
            if !value.is_finite() || value < 0.0 {
                bail!("link {text:?}: {what} must be a number ≥ 0");
            }
            Ok(value)
        };
        let spec = match (fields[0], fields.len()) {
            ("loopback", 1) => Self::Loopback,
            ("tbf", 2) => Self::Shaped {
                rate_mbit: number(1, "rate (Mbit/s)")?,
            },
            ("wan", 4) => Self::Wan {
                rate_mbit: number(1, "rate (Mbit/s)")?,
                rtt_ms: number(2, "round-trip time (ms)")?,
                loss: number(3, "loss probability")?,
            },
            _ => bail!("link {text:?}: expected `loopback`, `tbf:MBIT` or `wan:MBIT:RTT_MS:LOSS`"),
        };
        match spec {
            Self::Shaped { rate_mbit } | Self::Wan { rate_mbit, .. } if rate_mbit <= 0.0 => {
                bail!("link {text:?}: the rate must be above 0")
            }
            Self::Wan { loss, .. } if loss >= 1.0 => {
                bail!("link {text:?}: the loss probability must be below 1")
            }
            spec => Ok(spec),
        }
    }
}

impl TryFrom<String> for LinkSpec {
    type Error = anyhow::Error;

    fn try_from(text: String) -> anyhow::Result<Self> {
        text.parse()
    }
}

impl From<LinkSpec> for String {
    fn from(spec: LinkSpec) -> Self {
        spec.to_string()
    }
}

impl fmt::Display for LinkSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Loopback => write!(f, "loopback"),
            Self::Shaped { rate_mbit } => write!(f, "tbf:{rate_mbit}"),
            Self::Wan {
                rate_mbit,
                rtt_ms,
                loss,
            } => write!(f, "wan:{rate_mbit}:{rtt_ms}:{loss}"),
        }
    }
}

impl LinkSpec {
    /// A description for reports.
    pub(crate) fn describe(&self) -> String {
        match self {
            Self::Loopback => "loopback".to_owned(),
            Self::Shaped { rate_mbit } => {
                format!("{rate_mbit} Mbit/s (tbf on a veth pair to a network namespace)")
            }
            Self::Wan {
                rate_mbit,
                rtt_ms,
                loss,
            } => format!(
                "{rate_mbit} Mbit/s, {rtt_ms} ms RTT, {}% loss (user-space emulator; QEMU's TCP link has no loss)",
                loss * 100.0
            ),
        }
    }

    /// The one-way impairment of the emulated link (`None` for the others).
    fn impairment(&self) -> Option<Impairment> {
        match *self {
            Self::Wan {
                rate_mbit,
                rtt_ms,
                loss,
            } => Some(Impairment {
                delay: Duration::from_secs_f64(rtt_ms / 2e3),
                loss,
                rate_bytes_per_s: Some((rate_mbit * 1e6 / 8.0) as u64),
                // A router buffer of one round trip (at least 50 ms).
                queue: Duration::from_secs_f64((rtt_ms / 1e3).max(0.05)),
                mtu: Some(ETHERNET_MTU),
                ..Impairment::none()
            }),
            _ => None,
        }
    }
}

/// A link, set up: the namespace exists while this lives.
pub(crate) struct Link {
    /// What it is.
    spec: LinkSpec,
}

impl Link {
    /// Sets the link up (for `tbf`: the namespace, the veth pair and the qdiscs).
    pub(crate) fn up(spec: &LinkSpec) -> anyhow::Result<Self> {
        if let LinkSpec::Shaped { rate_mbit } = *spec {
            // A namespace left behind by a killed run goes first, and so does a veth of
            // the same name in this namespace (whose peer lives elsewhere).
            let _ = ip(&["netns", "del", NAMESPACE]);
            let _ = ip(&["link", "del", SOURCE_IF]);
            let rate = format!("{}kbit", (rate_mbit * 1e3).round() as u64);
            // The bucket holds 2 ms of the rate, at least two 64 KiB GSO segments; the queue
            // holds 20 ms before tail drop.
            let burst = ((rate_mbit * 1e6 / 8.0 * 0.002) as u64).max(128 * 1024);
            let tbf = |dev: &str| -> Vec<String> {
                [
                    "qdisc", "add", "dev", dev, "root", "tbf", "rate", &rate, "burst",
                ]
                .iter()
                .map(|s| (*s).to_owned())
                .chain([burst.to_string(), "latency".to_owned(), "20ms".to_owned()])
                .collect()
            };
            let steps: Vec<Vec<String>> = vec![
                strings(&["netns", "add", NAMESPACE]),
                strings(&[
                    "link", "add", SOURCE_IF, "type", "veth", "peer", "name", TARGET_IF, "netns",
                    NAMESPACE,
                ]),
                strings(&["addr", "add", &format!("{SOURCE_IP}/24"), "dev", SOURCE_IF]),
                strings(&["link", "set", SOURCE_IF, "up"]),
                strings(&[
                    "-n",
                    NAMESPACE,
                    "addr",
                    "add",
                    &format!("{TARGET_IP}/24"),
                    "dev",
                    TARGET_IF,
                ]),
                strings(&["-n", NAMESPACE, "link", "set", TARGET_IF, "up"]),
                strings(&["-n", NAMESPACE, "link", "set", "lo", "up"]),
            ];
            for step in steps {
                let args: Vec<&str> = step.iter().map(String::as_str).collect();
                ip(&args).context("set up the shaped link (needs root and iproute2)")?;
            }
            tc(&[], &tbf(SOURCE_IF))?;
            tc(&["-n", NAMESPACE], &tbf(TARGET_IF))?;
        }
        Ok(Self { spec: spec.clone() })
    }

    /// The target host's address.
    pub(crate) fn target_ip(&self) -> IpAddr {
        match self.spec {
            LinkSpec::Shaped { .. } => IpAddr::V4(TARGET_IP),
            _ => IpAddr::V4(Ipv4Addr::LOCALHOST),
        }
    }

    /// `program` as a command run on the target host.
    pub(crate) fn on_target(&self, program: &std::path::Path) -> Command {
        match self.spec {
            LinkSpec::Shaped { .. } => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", NAMESPACE]).arg(program);
                cmd
            }
            _ => Command::new(program),
        }
    }

    /// Where the source sends UDP (Tern's QUIC) for the target's `target`: the target
    /// itself, or a proxy that lives as long as the returned guard.
    pub(crate) fn route_udp(&self, target: SocketAddr) -> anyhow::Result<Route> {
        match self.spec.impairment() {
            None => Ok(Route {
                addr: target,
                _udp: None,
                _tcp: None,
            }),
            Some(impairment) => {
                let proxy = UdpProxy::start(
                    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
                    target,
                    impairment.clone(),
                    impairment,
                    WAN_SEED,
                )
                .context("start the UDP link emulator")?;
                Ok(Route {
                    addr: proxy.local_addr(),
                    _udp: Some(proxy),
                    _tcp: None,
                })
            }
        }
    }

    /// Where the source connects over TCP (QEMU's NBD) for the target's `target`.
    pub(crate) fn route_tcp(&self, target: SocketAddr) -> anyhow::Result<Route> {
        match self.spec.impairment() {
            None => Ok(Route {
                addr: target,
                _udp: None,
                _tcp: None,
            }),
            Some(impairment) => {
                let tcp = Impairment {
                    loss: 0.0,
                    ..impairment
                };
                let proxy = TcpProxy::start(
                    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
                    target,
                    tcp.clone(),
                    tcp,
                )
                .context("start the TCP link emulator")?;
                Ok(Route {
                    addr: proxy.local_addr(),
                    _udp: None,
                    _tcp: Some(proxy),
                })
            }
        }
    }

    /// Bytes the link carried so far, both directions, headers included (a counter: take
    /// the difference over a run). Through the emulator every byte crosses loopback twice
    /// (source → proxy → target), so loopback's count is halved.
    pub(crate) fn bytes(&self) -> anyhow::Result<u64> {
        let counter = |dev: &str, what: &str| -> anyhow::Result<u64> {
            let path = format!("/sys/class/net/{dev}/statistics/{what}");
            fs::read_to_string(&path)
                .with_context(|| format!("read {path}"))?
                .trim()
                .parse()
                .with_context(|| format!("parse {path}"))
        };
        Ok(match self.spec {
            // Loopback delivers what it sends: tx counts every byte once.
            LinkSpec::Loopback => counter("lo", "tx_bytes")?,
            LinkSpec::Shaped { .. } => {
                counter(SOURCE_IF, "tx_bytes")? + counter(SOURCE_IF, "rx_bytes")?
            }
            LinkSpec::Wan { .. } => counter("lo", "tx_bytes")? / 2,
        })
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        if matches!(self.spec, LinkSpec::Shaped { .. }) {
            // Deleting the namespace deletes its veth end, and with it the pair.
            let _ = ip(&["netns", "del", NAMESPACE]);
        }
    }
}

/// An address to reach the target at, and the proxy behind it, if any.
pub(crate) struct Route {
    /// Where to connect.
    pub(crate) addr: SocketAddr,
    /// The emulator behind the address, kept alive as long as the route.
    _udp: Option<UdpProxy>,
    /// Same, for TCP.
    _tcp: Option<TcpProxy>,
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| (*s).to_owned()).collect()
}

/// Runs `ip ARGS`; fails with its stderr.
fn ip(args: &[&str]) -> anyhow::Result<()> {
    run("ip", &strings(args))
}

/// Runs `tc PREFIX ARGS`.
fn tc(prefix: &[&str], args: &[String]) -> anyhow::Result<()> {
    let mut all = strings(prefix);
    all.extend(args.iter().cloned());
    run("tc", &all)
}

fn run(program: &str, args: &[String]) -> anyhow::Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("run {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::LinkSpec;

    #[test]
    fn link_specs_parse_print_and_refuse_nonsense() {
        for (text, spec) in [
            ("loopback", LinkSpec::Loopback),
            ("tbf:1000", LinkSpec::Shaped { rate_mbit: 1000.0 }),
            (
                "wan:100:80:0.001",
                LinkSpec::Wan {
                    rate_mbit: 100.0,
                    rtt_ms: 80.0,
                    loss: 0.001,
                },
            ),
        ] {
            let parsed: LinkSpec = text.parse().unwrap();
            assert_eq!(parsed, spec);
            assert_eq!(parsed.to_string(), text);
        }
        for bad in [
            "",
            "lan",
            "tbf",
            "tbf:0",
            "tbf:x",
            "wan:100:80",
            "wan:100:80:1",
            "wan:-1:80:0",
            "loopback:1",
        ] {
            assert!(bad.parse::<LinkSpec>().is_err(), "{bad:?} parsed");
        }
    }
}
