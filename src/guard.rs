//! Per-source limits in front of the knock and SPA sensors: a rate limit
//! (`governor`) and a lockout after repeated bad packets.
//!
//! Sources are spoofable, so both tables are bounded: past
//! `max_tracked_sources`, stale entries are purged, and if the table is
//! still full a new source is refused by the rate limiter (fail closed)
//! while the lockout table stops recording new sources (a spoofed flood
//! cannot evict a locked-out attacker).

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Instant;

use dashmap::DashMap;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::config::Limits;

/// Why a packet was ignored before it was looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    RateLimited,
    LockedOut,
}

impl Refusal {
    pub fn as_label(self) -> &'static str {
        match self {
            Refusal::RateLimited => "rate_limited",
            Refusal::LockedOut => "locked_out",
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Strikes {
    count: u32,
    /// When the first strike of the current run was counted.
    since: Instant,
    locked_until: Option<Instant>,
}

/// The shared per-source guard.
#[derive(Debug)]
pub struct SourceGuard {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    strikes: DashMap<IpAddr, Strikes>,
    limits: Limits,
}

/// What kind of bad packet a strike counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StrikeKind {
    /// A knock that moved no service forward.
    Knock,
    /// An SPA packet that was refused.
    Spa,
}

/// What [`SourceGuard::strike`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StrikeOutcome {
    Counted,
    /// This strike locked the source out.
    LockedOut,
    /// The table was full; not recorded.
    Untracked,
}

impl SourceGuard {
    pub fn new(limits: Limits) -> Self {
        let rate = NonZeroU32::new(limits.per_source_rate).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(limits.per_source_burst).unwrap_or(NonZeroU32::MIN);
        Self {
            limiter: RateLimiter::dashmap(Quota::per_second(rate).allow_burst(burst)),
            strikes: DashMap::new(),
            limits,
        }
    }

    /// Whether a packet from `source` may be looked at now.
    pub fn admit(&self, source: IpAddr, now: Instant) -> Result<(), Refusal> {
        if let Some(s) = self.strikes.get(&source) {
            if s.locked_until.is_some_and(|until| until > now) {
                return Err(Refusal::LockedOut);
            }
        }
        if self.limiter.len() >= self.limits.max_tracked_sources {
            self.limiter.retain_recent();
            if self.limiter.len() >= self.limits.max_tracked_sources {
                return Err(Refusal::RateLimited);
            }
        }
        self.limiter.check_key(&source).map_err(|_| Refusal::RateLimited)
    }

    /// Counts a bad packet from `source`; enough of them within
    /// `lockout_for` lock it out for `lockout_for`.
    pub fn strike(&self, source: IpAddr, now: Instant) -> StrikeOutcome {
        let window = self.limits.lockout_for;
        if !self.strikes.contains_key(&source) && self.strikes.len() >= self.limits.max_tracked_sources {
            self.strikes.retain(|_, s| {
                s.locked_until.is_some_and(|u| u > now) || now.saturating_duration_since(s.since) < window
            });
            if self.strikes.len() >= self.limits.max_tracked_sources {
                return StrikeOutcome::Untracked;
            }
        }
        let mut entry = self.strikes.entry(source).or_insert(Strikes {
            count: 0,
            since: now,
            locked_until: None,
        });
        let s = entry.value_mut();
        if now.saturating_duration_since(s.since) >= window {
            *s = Strikes {
                count: 0,
                since: now,
                locked_until: None,
            };
        }
        s.count += 1;
        if s.count >= self.limits.lockout_after && s.locked_until.is_none_or(|u| u <= now) {
            s.locked_until = Some(crate::clock::later(now, window));
            // A new run of strikes starts when the lockout ends.
            s.since = crate::clock::later(now, window);
            s.count = 0;
            return StrikeOutcome::LockedOut;
        }
        StrikeOutcome::Counted
    }

    /// Locks `source` out for `lockout_for` at once (a trap port was hit),
    /// and counts and logs it. A source the full table cannot record is
    /// refused by the rate limiter instead (see the module doc).
    pub fn lock_out(&self, source: IpAddr, now: Instant) {
        let until = crate::clock::later(now, self.limits.lockout_for);
        if !self.strikes.contains_key(&source) && self.strikes.len() >= self.limits.max_tracked_sources {
            self.strikes.retain(|_, s| s.locked_until.is_some_and(|u| u > now));
            if self.strikes.len() >= self.limits.max_tracked_sources {
                return;
            }
        }
        let mut entry = self.strikes.entry(source).or_insert(Strikes {
            count: 0,
            since: until,
            locked_until: None,
        });
        let s = entry.value_mut();
        let already = s.locked_until.is_some_and(|u| u > now);
        *s = Strikes {
            count: 0,
            since: until,
            locked_until: Some(until),
        };
        if !already {
            crate::metrics::lockout();
            tracing::warn!(%source, "source locked out: it hit a trap port");
        }
    }

    /// The one strike path: counts a bad packet of `kind` from `source`,
    /// and counts and logs the lockout it may cause.
    pub fn strike_and_report(&self, source: IpAddr, now: Instant, kind: StrikeKind) -> StrikeOutcome {
        let outcome = self.strike(source, now);
        if outcome == StrikeOutcome::LockedOut {
            crate::metrics::lockout();
            match kind {
                StrikeKind::Knock => tracing::warn!(%source, "source locked out after repeated wrong knocks"),
                StrikeKind::Spa => tracing::warn!(%source, "source locked out after repeated bad spa packets"),
            }
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock};
    use std::time::Duration;

    fn limits() -> Limits {
        Limits {
            per_source_rate: 1000,
            per_source_burst: 1000,
            lockout_after: 3,
            lockout_for: Duration::from_secs(60),
            max_tracked_sources: 4,
        }
    }

    #[test]
    fn repeated_bad_packets_lock_a_source_out_for_a_while() {
        let clock = ManualClock::new();
        let guard = SourceGuard::new(limits());
        let bad = IpAddr::from([127, 0, 0, 9]);
        let good = IpAddr::from([127, 0, 0, 1]);
        assert_eq!(guard.strike(bad, clock.now()), StrikeOutcome::Counted);
        assert_eq!(guard.strike(bad, clock.now()), StrikeOutcome::Counted);
        assert!(guard.admit(bad, clock.now()).is_ok());
        assert_eq!(guard.strike(bad, clock.now()), StrikeOutcome::LockedOut);
        assert_eq!(guard.admit(bad, clock.now()), Err(Refusal::LockedOut));
        assert!(
            guard.admit(good, clock.now()).is_ok(),
            "one source's lockout touched another"
        );
        clock.advance(Duration::from_secs(59));
        assert_eq!(guard.admit(bad, clock.now()), Err(Refusal::LockedOut));
        clock.advance(Duration::from_secs(1));
        assert!(guard.admit(bad, clock.now()).is_ok());
    }

    #[test]
    fn strikes_spread_beyond_the_window_do_not_add_up() {
        let clock = ManualClock::new();
        let guard = SourceGuard::new(limits());
        let src = IpAddr::from([127, 0, 0, 9]);
        for _ in 0..5 {
            assert_eq!(guard.strike(src, clock.now()), StrikeOutcome::Counted);
            clock.advance(Duration::from_secs(31));
            assert_eq!(guard.strike(src, clock.now()), StrikeOutcome::Counted);
            clock.advance(Duration::from_secs(31));
        }
        assert!(guard.admit(src, clock.now()).is_ok());
    }

    #[test]
    fn the_rate_limit_applies_per_source() {
        let clock = ManualClock::new();
        let guard = SourceGuard::new(Limits {
            per_source_rate: 1,
            per_source_burst: 2,
            ..limits()
        });
        let a = IpAddr::from([127, 0, 0, 1]);
        let b = IpAddr::from([127, 0, 0, 2]);
        assert!(guard.admit(a, clock.now()).is_ok());
        assert!(guard.admit(a, clock.now()).is_ok());
        assert_eq!(guard.admit(a, clock.now()), Err(Refusal::RateLimited));
        assert!(guard.admit(b, clock.now()).is_ok());
    }

    #[test]
    fn tables_stay_bounded_under_spoofed_sources() {
        let clock = ManualClock::new();
        let guard = SourceGuard::new(limits());
        for i in 0..100u8 {
            let _ = guard.admit(IpAddr::from([10, 0, 0, i]), clock.now());
            let _ = guard.strike(IpAddr::from([10, 0, 0, i]), clock.now());
        }
        assert!(guard.limiter.len() <= 4);
        assert!(guard.strikes.len() <= 4);
    }
}
