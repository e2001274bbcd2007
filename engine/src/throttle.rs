//! Guest write throttling: the last resort of `auto` mode when the guest dirties data faster
//! than the link can move it.
//!
//! A token bucket shared by a disk's `TrackedDisk` clones. The engine sets the rate from its
//! measurements (a `ModeChanged` event says when and why); writes then wait in the calling
//! thread — the VMM's IO thread — before they are submitted, as QEMU's throttle groups hold
//! requests. A rate of 0 means unthrottled and costs one atomic load per write.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How many seconds of the rate a burst may use at once.
const BURST_SECONDS: f64 = 0.01;

/// A write-rate limit shared by the users of one disk.
#[derive(Debug, Default)]
pub struct Throttle {
    /// Bytes per second; 0 = unlimited.
    rate: AtomicU64,
    bucket: Mutex<Bucket>,
}

#[derive(Debug, Default)]
struct Bucket {
    /// Bytes that may be written now (negative: owed).
    tokens: f64,
    refilled: Option<Instant>,
}

impl Throttle {
    /// An unlimited throttle.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the limit in bytes per second; 0 lifts it.
    pub fn set_rate(&self, bytes_per_s: u64) {
        self.rate.store(bytes_per_s, Ordering::Relaxed);
    }

    /// The current limit (0 = unlimited).
    pub fn rate(&self) -> u64 {
        self.rate.load(Ordering::Relaxed)
    }

    /// How long a write of `bytes` must wait now; takes its tokens. Pure bookkeeping, so it
    /// is testable without sleeping.
    pub fn reserve(&self, bytes: u64, now: Instant) -> Duration {
        let rate = self.rate();
        if rate == 0 {
            return Duration::ZERO;
        }
        let rate = rate as f64;
        let mut bucket = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        let burst = rate * BURST_SECONDS;
        let elapsed = bucket
            .refilled
            .map_or(0.0, |at| now.saturating_duration_since(at).as_secs_f64());
        bucket.tokens = (bucket.tokens + elapsed * rate).min(burst);
        bucket.refilled = Some(now);
        bucket.tokens -= bytes as f64;
        if bucket.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-bucket.tokens / rate)
        }
    }

    /// Waits (sleeping the calling thread) until `bytes` may be written.
    pub fn acquire(&self, bytes: u64) {
        let wait = self.reserve(bytes, Instant::now());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_never_waits() {
        let throttle = Throttle::new();
        assert_eq!(throttle.reserve(1 << 30, Instant::now()), Duration::ZERO);
    }

    #[test]
    fn a_limit_spaces_writes_to_the_rate() {
        let throttle = Throttle::new();
        throttle.set_rate(1 << 20); // 1 MiB/s
        let start = Instant::now();
        let mut waited = Duration::ZERO;
        // 64 writes of 64 KiB at the same instant: 4 MiB must take ~4 s minus the burst.
        for _ in 0..64 {
            waited = throttle.reserve(64 << 10, start);
        }
        let expected = 4.0 - BURST_SECONDS;
        assert!((waited.as_secs_f64() - expected).abs() < 0.1, "{waited:?}");
        // After that time has passed the bucket is even again.
        let later = start + Duration::from_secs(5);
        assert_eq!(throttle.reserve(1024, later), Duration::ZERO);
        throttle.set_rate(0);
        assert_eq!(throttle.reserve(1 << 30, later), Duration::ZERO);
    }
}
