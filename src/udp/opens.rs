//! How fast each source may open UDP sessions: a token bucket per source
//! address (GCRA: one instant per source), `burst` sessions at once and
//! `rate` per second after that. Each session costs a descriptor and a
//! socket set-up, and one granted address can forge any number of source
//! ports, so churn is bounded as well as the count. Pure: time passed in.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Sources tracked before the table is first swept of those whose bucket
/// is full again (they are indistinguishable from sources never seen).
const SWEEP_AT: usize = 1024;

#[derive(Debug)]
pub(super) struct OpenRate {
    /// When each source's bucket is full again (GCRA's theoretical arrival
    /// time); a source at or past it may open `burst` sessions at once.
    full_at: HashMap<IpAddr, Instant>,
    /// The size at which the table is swept next: twice what a sweep
    /// left, so sweeping costs O(1) per session opened.
    sweep_at: usize,
}

impl Default for OpenRate {
    fn default() -> Self {
        Self {
            full_at: HashMap::new(),
            sweep_at: SWEEP_AT,
        }
    }
}

impl OpenRate {
    /// Whether `source` may open a session at `now`, counting it if so.
    pub(super) fn allow(&mut self, source: IpAddr, now: Instant, rate: u32, burst: usize) -> bool {
        let interval = Duration::from_secs(1) / rate.max(1);
        let window = interval.saturating_mul(u32::try_from(burst.max(1)).unwrap_or(u32::MAX));
        if self.full_at.len() >= self.sweep_at {
            self.full_at.retain(|_, full_at| *full_at > now);
            self.sweep_at = (2 * self.full_at.len()).max(SWEEP_AT);
        }
        let full_at = self.full_at.get(&source).copied().unwrap_or(now).max(now);
        let next = full_at + interval;
        if next.saturating_duration_since(now) > window {
            return false;
        }
        self.full_at.insert(source, next);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock as _, ManualClock};

    #[test]
    fn a_source_opens_its_burst_then_at_the_rate() {
        let mut r = OpenRate::default();
        let t0 = ManualClock::new().now();
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let opened = (0..100).filter(|_| r.allow(a, t0, 8, 32)).count();
        assert_eq!(opened, 32, "the burst");
        assert!(r.allow(b, t0, 8, 32), "another source has its own bucket");
        assert!(!r.allow(a, t0 + Duration::from_millis(100), 8, 32));
        assert!(r.allow(a, t0 + Duration::from_millis(125), 8, 32), "one per 1/8 s");
        assert!(!r.allow(a, t0 + Duration::from_millis(130), 8, 32));
        // A second later, eight more.
        let later = t0 + Duration::from_millis(1_125);
        assert_eq!((0..100).filter(|_| r.allow(a, later, 8, 32)).count(), 8);
    }

    #[test]
    fn sources_whose_bucket_is_full_again_are_swept() {
        let mut r = OpenRate::default();
        let t0 = ManualClock::new().now();
        for i in 0..SWEEP_AT as u32 {
            assert!(r.allow(IpAddr::from(i.to_be_bytes()), t0, 8, 32));
        }
        assert_eq!(r.full_at.len(), SWEEP_AT);
        assert!(r.allow("10.0.0.1".parse().unwrap(), t0 + Duration::from_secs(1), 8, 32));
        assert_eq!(r.full_at.len(), 1);
    }
}
