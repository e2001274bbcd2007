//! The compression policy: compress when that moves more disk bytes per second, not less.
//!
//! Whether compression pays depends on which is scarcer, link or CPU, and neither is known in
//! advance: on a WAN link it multiplies throughput by the compression ratio, on loopback or a
//! fast LAN it halves it because zstd becomes the bottleneck. Timings taken inside a process
//! cannot tell the two apart reliably (a busy CPU also makes sends slow), so `Auto` measures
//! the outcome instead: the data-stream writers of a connection share one policy, which alternates windows with and without
//! compression, keeps the raw-bytes-per-second of each, uses the faster, and re-measures the
//! other one every so often. The policy is pure (time is passed in) so tests drive it with
//! made-up rates.

use std::time::{Duration, Instant};

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

impl std::fmt::Display for CompressionMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Off => "off",
            Self::Zstd => "zstd",
            Self::Auto => "auto",
        })
    }
}

/// Frames per measurement window in `Auto` (all writers together: 16 MiB of 64 KiB
/// chunks, enough to average over the content's mix).
const WINDOW_FRAMES: u32 = 256;
/// In `Auto`, windows spent in the faster mode before the other is measured again.
const PROBE_EVERY_WINDOWS: u32 = 16;
/// The other mode must be this much faster to switch: measurements are noisy.
const SWITCH_MARGIN: f64 = 1.10;

/// The compression decision of one connection's writers.
#[derive(Clone, Debug)]
pub struct CompressionPolicy {
    mode: CompressionMode,
    compressing: bool,
    frames: u32,
    bytes: u64,
    window_start: Option<Instant>,
    /// Raw bytes per second measured without (index 0) and with (index 1) compression.
    rates: [Option<f64>; 2],
    windows_since_probe: u32,
}

impl CompressionPolicy {
    /// A policy in `mode`. `Auto` starts compressing, then measures both ways.
    pub fn new(mode: CompressionMode) -> Self {
        Self {
            mode,
            compressing: mode != CompressionMode::Off,
            frames: 0,
            bytes: 0,
            window_start: None,
            rates: [None, None],
            windows_since_probe: 0,
        }
    }

    /// Whether to compress the next frame.
    pub fn compress_next(&self) -> bool {
        self.compressing
    }

    /// Records that a frame of `raw_bytes` was handed to the stream at `now`.
    pub fn record(&mut self, raw_bytes: u64, now: Instant) {
        if self.mode != CompressionMode::Auto {
            return;
        }
        let start = *self.window_start.get_or_insert(now);
        self.frames += 1;
        self.bytes += raw_bytes;
        if self.frames < WINDOW_FRAMES {
            return;
        }
        let seconds = now
            .saturating_duration_since(start)
            .max(Duration::from_micros(1));
        self.rates[self.compressing as usize] = Some(self.bytes as f64 / seconds.as_secs_f64());
        self.frames = 0;
        self.bytes = 0;
        self.window_start = Some(now);
        self.decide();
    }

    /// Compresses only while that is measurably faster: a tie (the bottleneck is neither
    /// the link nor this writer's CPU, e.g. the target) goes to not compressing, which
    /// costs both ends less CPU.
    fn decide(&mut self) {
        match (self.rates[0], self.rates[1]) {
            (Some(off), Some(on)) => {
                let compress = on > off * SWITCH_MARGIN;
                if compress != self.compressing {
                    self.switch();
                } else {
                    self.windows_since_probe += 1;
                    if self.windows_since_probe >= PROBE_EVERY_WINDOWS {
                        // Conditions change (the link fills, another migration starts):
                        // measure the other way again.
                        self.switch();
                    }
                }
            }
            // Not measured both ways yet: try the other.
            _ => self.switch(),
        }
    }

    fn switch(&mut self) {
        self.compressing = !self.compressing;
        self.windows_since_probe = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `windows` windows where a frame of 1 MiB takes `off` or `on` seconds to send.
    fn run(policy: &mut CompressionPolicy, now: &mut Instant, windows: u32, off: f64, on: f64) {
        for _ in 0..windows * WINDOW_FRAMES {
            let per_frame = if policy.compress_next() { on } else { off };
            *now += Duration::from_secs_f64(per_frame);
            policy.record(1 << 20, *now);
        }
    }

    #[test]
    fn auto_compresses_when_that_is_faster() {
        // A slow link: compressed frames go 2.5× faster.
        let mut policy = CompressionPolicy::new(CompressionMode::Auto);
        let mut now = Instant::now();
        run(&mut policy, &mut now, 4, 0.010, 0.004);
        assert!(policy.compress_next());
    }

    #[test]
    fn auto_stops_compressing_when_the_cpu_is_the_bottleneck_and_probes_again() {
        // Loopback: compression halves the rate.
        let mut policy = CompressionPolicy::new(CompressionMode::Auto);
        let mut now = Instant::now();
        run(&mut policy, &mut now, 3, 0.001, 0.002);
        assert!(!policy.compress_next());
        // It stays off for a while, then measures compression again...
        let mut probed = false;
        for _ in 0..PROBE_EVERY_WINDOWS + 1 {
            run(&mut policy, &mut now, 1, 0.001, 0.002);
            probed |= policy.compress_next();
        }
        assert!(probed, "never re-measured compression");
        // ...and the link got slow meanwhile: compression wins and stays.
        run(&mut policy, &mut now, 4, 0.010, 0.004);
        assert!(policy.compress_next());
    }

    #[test]
    fn auto_does_not_compress_when_it_gains_nothing() {
        // The bottleneck is elsewhere: both ways equally fast.
        let mut policy = CompressionPolicy::new(CompressionMode::Auto);
        let mut now = Instant::now();
        run(&mut policy, &mut now, 3, 0.002, 0.002);
        assert!(!policy.compress_next());
        // Barely faster (within the noise margin) is not enough either.
        run(
            &mut policy,
            &mut now,
            2 * PROBE_EVERY_WINDOWS,
            0.002,
            0.00198,
        );
        let mut compressing = 0;
        for _ in 0..PROBE_EVERY_WINDOWS {
            run(&mut policy, &mut now, 1, 0.002, 0.00198);
            compressing += u32::from(policy.compress_next());
        }
        assert!(
            compressing <= 1,
            "compressed {compressing} windows of {PROBE_EVERY_WINDOWS}"
        );
    }

    #[test]
    fn fixed_modes_never_change() {
        let mut on = CompressionPolicy::new(CompressionMode::Zstd);
        let mut off = CompressionPolicy::new(CompressionMode::Off);
        let mut now = Instant::now();
        run(&mut on, &mut now, 4, 0.001, 0.010);
        run(&mut off, &mut now, 4, 0.010, 0.001);
        assert!(on.compress_next());
        assert!(!off.compress_next());
    }
}
