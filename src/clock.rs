//! The only place that reads the clock.
//!
//! The gate and the stores take `now` as an argument; the I/O layers get it
//! from a [`Clock`]. Production uses [`SystemClock`]; unit tests step a
//! [`ManualClock`] so timeouts are tested without sleeping.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// `at + by`, saturating instead of panicking when the sum is past what an
/// `Instant` holds (a century out stands in for "never"). Validation caps
/// configured durations far below that; this keeps a bad value from
/// panicking the gate anyway.
pub fn later(at: Instant, by: Duration) -> Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    at.checked_add(by).or_else(|| at.checked_add(CENTURY)).unwrap_or(at)
}

/// A source of monotonic and wall-clock time.
pub trait Clock: std::fmt::Debug + Send + Sync + 'static {
    /// Monotonic time, for deadlines and expiry.
    fn now(&self) -> Instant;
    /// Wall-clock time, for protocol timestamps.
    fn wall(&self) -> SystemTime;
}

/// The real clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

#[allow(
    clippy::disallowed_methods,
    reason = "the one place that reads the real clock; everything else goes through Clock"
)]
impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn wall(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that only moves when told to.
#[derive(Debug, Clone)]
pub struct ManualClock {
    inner: Arc<Mutex<(Instant, SystemTime)>>,
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl ManualClock {
    /// Starts at the current real time; only [`ManualClock::advance`] moves it.
    #[allow(clippy::disallowed_methods, reason = "the starting point of a manual clock")]
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Mutex::new((Instant::now(), SystemTime::now()))),
        }
    }

    /// Moves both clocks forward by `by`.
    pub fn advance(&self, by: Duration) {
        let mut t = self.inner.lock().expect("manual clock lock is never poisoned");
        t.0 += by;
        t.1 += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.inner.lock().expect("manual clock lock is never poisoned").0
    }

    fn wall(&self) -> SystemTime {
        self.inner.lock().expect("manual clock lock is never poisoned").1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_saturates_instead_of_panicking() {
        let now = ManualClock::new().now();
        assert_eq!(later(now, Duration::from_secs(5)), now + Duration::from_secs(5));
        let far = later(now, Duration::MAX);
        assert!(
            far > now + Duration::from_secs(365 * 24 * 3600),
            "an overflow lands far out, not now"
        );
    }
}
