//! The compression policy: compress when the link is the bottleneck, not when the CPU is.
//!
//! Each data-stream writer reports, per frame, how long compressing took and how long it then
//! waited for the stream to accept the bytes. Waiting means the link (or the peer) is slower
//! than we produce: compression buys throughput. Not waiting while spending time compressing
//! means the CPU limits us: compression costs throughput. The policy is pure so tests can
//! drive it with made-up timings.

use std::time::Duration;

/// The operator's choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompressionMode {
    /// Never compress.
    Off,
    /// Always compress (zstd level 1; still raw per frame when it saves < 10 %).
    Zstd,
    /// Decide from measurements.
    Auto,
}

impl std::str::FromStr for CompressionMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "off" => Ok(Self::Off),
            "zstd" => Ok(Self::Zstd),
            "auto" => Ok(Self::Auto),
            other => Err(format!(
                "compression must be auto, zstd or off, not {other:?}"
            )),
        }
    }
}

/// Frames per decision window in `Auto`.
const WINDOW_FRAMES: u32 = 64;
/// In `Auto`, after deciding "off", compress one window again after this many windows to
/// notice when the link becomes the bottleneck.
const PROBE_EVERY_WINDOWS: u32 = 16;

/// Per-writer compression decision.
#[derive(Clone, Debug)]
pub struct CompressionPolicy {
    mode: CompressionMode,
    compressing: bool,
    frames: u32,
    windows_off: u32,
    compress_time: Duration,
    send_wait: Duration,
}

impl CompressionPolicy {
    /// A policy in `mode`. `Auto` starts by compressing and measuring.
    pub fn new(mode: CompressionMode) -> Self {
        Self {
            mode,
            compressing: mode != CompressionMode::Off,
            frames: 0,
            windows_off: 0,
            compress_time: Duration::ZERO,
            send_wait: Duration::ZERO,
        }
    }

    /// Whether to compress the next frame.
    pub fn compress_next(&self) -> bool {
        self.compressing
    }

    /// Records one frame: time spent compressing it (zero if not compressed) and time the
    /// stream took to accept it.
    pub fn record(&mut self, compress_time: Duration, send_wait: Duration) {
        if self.mode != CompressionMode::Auto {
            return;
        }
        self.frames += 1;
        self.compress_time += compress_time;
        self.send_wait += send_wait;
        if self.frames < WINDOW_FRAMES {
            return;
        }
        if self.compressing {
            // The link made us wait at least as long as compression took: it is the
            // bottleneck, keep compressing. Otherwise the CPU is: stop.
            self.compressing = self.send_wait >= self.compress_time;
            self.windows_off = 0;
        } else {
            self.windows_off += 1;
            if self.windows_off >= PROBE_EVERY_WINDOWS {
                self.compressing = true;
            }
        }
        self.frames = 0;
        self.compress_time = Duration::ZERO;
        self.send_wait = Duration::ZERO;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(policy: &mut CompressionPolicy, compress_ms: u64, wait_ms: u64) {
        for _ in 0..WINDOW_FRAMES {
            let compress = if policy.compress_next() {
                compress_ms
            } else {
                0
            };
            policy.record(
                Duration::from_millis(compress),
                Duration::from_millis(wait_ms),
            );
        }
    }

    #[test]
    fn auto_keeps_compressing_when_the_link_is_the_bottleneck() {
        let mut policy = CompressionPolicy::new(CompressionMode::Auto);
        window(&mut policy, 2, 5);
        assert!(policy.compress_next());
    }

    #[test]
    fn auto_stops_when_the_cpu_is_the_bottleneck_and_probes_later() {
        let mut policy = CompressionPolicy::new(CompressionMode::Auto);
        window(&mut policy, 2, 0);
        assert!(!policy.compress_next());
        for _ in 0..PROBE_EVERY_WINDOWS - 1 {
            window(&mut policy, 2, 0);
            assert!(!policy.compress_next());
        }
        window(&mut policy, 2, 0);
        assert!(policy.compress_next(), "probes again after a while");
    }

    #[test]
    fn fixed_modes_never_change() {
        let mut on = CompressionPolicy::new(CompressionMode::Zstd);
        let mut off = CompressionPolicy::new(CompressionMode::Off);
        window(&mut on, 5, 0);
        window(&mut off, 0, 50);
        assert!(on.compress_next());
        assert!(!off.compress_next());
    }
}
