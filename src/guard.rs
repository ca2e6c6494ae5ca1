//! Per-source limits in front of the knock sensors, and the per-source
//! rate that bounds what failed SPA packets may cost: a rate limit (a
//! token bucket per source) and a lockout after repeated wrong knocks.
//!
//! SPA packets never meet the lockout: a packet is verified first, and one
//! whose MAC verifies is honoured whatever its source did before, so a
//! forged packet costs a real user nothing (see `sensor::spa`).
//!
//! # Spoofed sources
//!
//! Sources are spoofable, so both tables are bounded by
//! `max_tracked_sources` and never scanned. Each is a hash map over a slab
//! of entries threaded on a few recency lists: a lookup, an insertion and
//! an eviction are O(1), and a full table makes room for a new source by
//! evicting the least recently seen entry of the lowest list that has one.
//! A source seen once sits on the lowest list; one seen again moves up; a
//! locked-out source sits on the highest. A flood of forged sources, each
//! seen once, therefore only churns the lowest list: sources the table
//! already counts keep being counted, and a locked-out source is evicted
//! only once every entry below it is gone. The upper lists have quotas
//! (half the table for sources seen again, a quarter for lockouts; past
//! it their least recent entry moves down a list, still counted), so a
//! forger who pays for many repeat or locked-out sources cannot leave new
//! sources without room to be counted in.
//!
//! # IPv6
//!
//! Anyone holding an IPv6 prefix holds every address in it, so both tables
//! key an IPv6 source by its first `ipv6_prefix` bits (a /64 by default).
//! Grants stay per address: only limits and lockouts are per prefix.

use std::collections::hash_map::{Entry, HashMap, RandomState};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

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
    /// When and why the last lockout began (kept while `locked_until`
    /// is in the future; stale otherwise).
    locked_at: Instant,
    why: LockReason,
}

/// Why a source was locked out: the `reason` label of
/// `portcullis_lockouts_total`, and what `GET /v1/lockouts` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockReason {
    /// It hit a trap port (one hit is enough).
    Trap,
    /// `lockout_after` wrong knocks within `lockout_for`.
    Strikes,
}

impl LockReason {
    pub const ALL: [LockReason; 2] = [LockReason::Trap, LockReason::Strikes];

    pub fn as_label(self) -> &'static str {
        match self {
            LockReason::Trap => "trap",
            LockReason::Strikes => "strikes",
        }
    }
}

/// One source locked out now, as [`SourceGuard::lockouts`] lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lockout {
    /// The key the source is filed under: the address, or its IPv6 prefix
    /// (see "IPv6" in the module doc).
    pub source: IpAddr,
    pub why: LockReason,
    pub since: Instant,
    pub until: Instant,
}

/// A token bucket in its GCRA form: the time at which the bucket is full
/// again ("theoretical arrival time").
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tat: Instant,
}

/// What one source is, for counting it: an IPv4 address itself, an IPv6
/// address its first `ipv6_prefix` bits (a host is given a /64, so it
/// could otherwise count as billions of sources).
pub fn source_key(source: IpAddr, ipv6_prefix: u8) -> IpAddr {
    match source.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u32::from(ipv6_prefix.min(128));
            let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
        }
        v4 => v4,
    }
}

/// The shared per-source guard.
#[derive(Debug)]
pub struct SourceGuard {
    rates: Mutex<Table<Bucket>>,
    strikes: Mutex<Table<Strikes>>,
    limits: Limits,
    /// Time one packet takes from a bucket.
    emission: Duration,
    /// How far ahead of now a bucket's `tat` may run: the burst.
    tolerance: Duration,
}

/// What kind of bad packet a strike counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StrikeKind {
    /// A knock that moved no service forward.
    Knock,
}

/// What [`SourceGuard::strike`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StrikeOutcome {
    Counted,
    /// This strike locked the source out.
    LockedOut,
}

/// Recency lists of the tables, lowest evicted first.
const SEEN_ONCE: usize = 0;
const SEEN_AGAIN: usize = 1;
const LOCKED: usize = 2;

impl SourceGuard {
    pub fn new(limits: Limits) -> Self {
        let rate = limits.per_source_rate.max(1);
        let burst = limits.per_source_burst.max(1);
        let emission = Duration::from_secs(1) / rate;
        Self {
            rates: Mutex::new(Table::new(limits.max_tracked_sources)),
            strikes: Mutex::new(Table::new(limits.max_tracked_sources)),
            limits,
            emission,
            tolerance: emission.saturating_mul(burst - 1),
        }
    }

    /// The key both tables file `source` under: the address, or its
    /// `ipv6_prefix` for IPv6.
    pub fn key(&self, source: IpAddr) -> IpAddr {
        source_key(source, self.limits.ipv6_prefix)
    }

    /// Whether a knock from `source` may be looked at now: not locked out,
    /// and within its rate.
    pub fn admit(&self, source: IpAddr, now: Instant) -> Result<(), Refusal> {
        let key = self.key(source);
        if self.is_locked_out(key, now) {
            return Err(Refusal::LockedOut);
        }
        if self.within_rate(key, now) {
            Ok(())
        } else {
            Err(Refusal::RateLimited)
        }
    }

    /// Takes a packet from `source`'s bucket; false when it is empty. The
    /// lockout is not consulted.
    pub fn within_rate(&self, source: IpAddr, now: Instant) -> bool {
        let key = self.key(source);
        let mut rates = self.rates.lock().unwrap_or_else(PoisonError::into_inner);
        let (slot, fresh) = rates.get_or_insert(key, Bucket { tat: now });
        if !fresh {
            rates.touch(key, SEEN_AGAIN);
        }
        let bucket = rates.value_mut(slot);
        let tat = bucket.tat.max(now);
        if tat.saturating_duration_since(now) > self.tolerance {
            return false;
        }
        bucket.tat = crate::clock::later(tat, self.emission);
        true
    }

    /// Whether `source` is locked out now (nothing is counted).
    pub fn locked_out(&self, source: IpAddr, now: Instant) -> bool {
        self.is_locked_out(self.key(source), now)
    }

    fn is_locked_out(&self, key: IpAddr, now: Instant) -> bool {
        let strikes = self.strikes.lock().unwrap_or_else(PoisonError::into_inner);
        strikes
            .peek(key)
            .is_some_and(|s| s.locked_until.is_some_and(|until| until > now))
    }

    /// Counts a bad packet from `source`; enough of them within
    /// `lockout_for` lock it out for `lockout_for`.
    pub fn strike(&self, source: IpAddr, now: Instant) -> StrikeOutcome {
        let key = self.key(source);
        let window = self.limits.lockout_for;
        let mut strikes = self.strikes.lock().unwrap_or_else(PoisonError::into_inner);
        let fresh = Strikes {
            count: 0,
            since: now,
            locked_until: None,
            locked_at: now,
            why: LockReason::Strikes,
        };
        let (slot, _) = strikes.get_or_insert(key, fresh);
        let s = strikes.value_mut(slot);
        if now.saturating_duration_since(s.since) >= window {
            *s = Strikes {
                locked_until: s.locked_until,
                locked_at: s.locked_at,
                why: s.why,
                ..fresh
            };
        }
        s.count += 1;
        if s.count >= self.limits.lockout_after && s.locked_until.is_none_or(|u| u <= now) {
            s.locked_until = Some(crate::clock::later(now, window));
            s.locked_at = now;
            s.why = LockReason::Strikes;
            // A new run of strikes starts when the lockout ends.
            s.since = crate::clock::later(now, window);
            s.count = 0;
            strikes.touch(key, LOCKED);
            return StrikeOutcome::LockedOut;
        }
        let list = if s.locked_until.is_some_and(|u| u > now) {
            LOCKED
        } else if s.count > 1 {
            SEEN_AGAIN
        } else {
            SEEN_ONCE
        };
        strikes.touch(key, list);
        StrikeOutcome::Counted
    }

    /// Locks `source` out for `lockout_for` at once (a trap port was hit),
    /// and counts and logs it.
    pub fn lock_out(&self, source: IpAddr, now: Instant) {
        let key = self.key(source);
        let until = crate::clock::later(now, self.limits.lockout_for);
        let already = {
            let mut strikes = self.strikes.lock().unwrap_or_else(PoisonError::into_inner);
            let fresh = Strikes {
                count: 0,
                since: until,
                locked_until: None,
                locked_at: now,
                why: LockReason::Trap,
            };
            let (slot, _) = strikes.get_or_insert(key, fresh);
            let s = strikes.value_mut(slot);
            let already = s.locked_until.is_some_and(|u| u > now);
            *s = Strikes {
                count: 0,
                since: until,
                locked_until: Some(until),
                locked_at: if already { s.locked_at } else { now },
                why: if already { s.why } else { LockReason::Trap },
            };
            strikes.touch(key, LOCKED);
            already
        };
        if !already {
            crate::metrics::lockout(LockReason::Trap);
            tracing::warn!(%source, "source locked out: it hit a trap port");
        }
    }

    /// The one strike path: counts a bad packet of `kind` from `source`,
    /// and counts and logs the lockout it may cause.
    pub fn strike_and_report(&self, source: IpAddr, now: Instant, kind: StrikeKind) -> StrikeOutcome {
        let outcome = self.strike(source, now);
        if outcome == StrikeOutcome::LockedOut {
            crate::metrics::lockout(LockReason::Strikes);
            match kind {
                StrikeKind::Knock => tracing::warn!(%source, "source locked out after repeated wrong knocks"),
            }
        }
        outcome
    }

    /// Every source locked out at `now`, oldest lockout first. A scan of
    /// the table (at most `max_tracked_sources` entries, under its lock
    /// but never across an await): for the admin endpoint, not the packet
    /// path.
    pub fn lockouts(&self, now: Instant) -> Vec<Lockout> {
        let strikes = self.strikes.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out: Vec<Lockout> = strikes
            .entries()
            .filter_map(|(source, s)| {
                let until = s.locked_until.filter(|&u| u > now)?;
                Some(Lockout {
                    source,
                    why: s.why,
                    since: s.locked_at,
                    until,
                })
            })
            .collect();
        out.sort_by_key(|l| (l.since, l.source));
        out
    }

    /// How many sources are locked out at `now` (a scan, as [`SourceGuard::lockouts`]).
    pub fn lockouts_active(&self, now: Instant) -> usize {
        let strikes = self.strikes.lock().unwrap_or_else(PoisonError::into_inner);
        strikes
            .entries()
            .filter(|(_, s)| s.locked_until.is_some_and(|u| u > now))
            .count()
    }

    /// Ends `source`'s lockout (and forgets its strikes); the lockout
    /// that ended, `None` when it was not locked out.
    pub fn clear_lockout(&self, source: IpAddr, now: Instant) -> Option<Lockout> {
        let key = self.key(source);
        let mut strikes = self.strikes.lock().unwrap_or_else(PoisonError::into_inner);
        let s = strikes.get_mut(key)?;
        let until = s.locked_until.filter(|&u| u > now)?;
        let ended = Lockout {
            source: key,
            why: s.why,
            since: s.locked_at,
            until,
        };
        s.count = 0;
        s.since = now;
        s.locked_until = None;
        strikes.touch(key, SEEN_AGAIN);
        Some(ended)
    }
}

/// Marks the end of a list.
const NIL: u32 = u32::MAX;

/// A bounded map from source keys to values with O(1) lookup, insertion
/// and eviction (see the module doc).
#[derive(Debug)]
struct Table<V> {
    index: HashMap<IpAddr, u32, RandomState>,
    slots: Vec<Slot<V>>,
    lists: [List; 3],
    /// Most entries each list may hold before its least recent entry is
    /// moved down a list: whatever the lists above hold, a quarter of the
    /// table is left for sources seen once.
    quotas: [usize; 3],
    cap: usize,
}

#[derive(Debug, Clone, Copy)]
struct List {
    /// Least recent entry.
    head: u32,
    /// Most recent entry.
    tail: u32,
    len: usize,
}

const EMPTY: List = List {
    head: NIL,
    tail: NIL,
    len: 0,
};

#[derive(Debug)]
struct Slot<V> {
    key: IpAddr,
    value: V,
    list: usize,
    prev: u32,
    next: u32,
}

impl<V> Table<V> {
    fn new(cap: usize) -> Self {
        // Slots are addressed by u32; no sane config tracks more.
        let cap = cap.clamp(1, NIL as usize - 1);
        Self {
            index: HashMap::default(),
            slots: Vec::new(),
            lists: [EMPTY; 3],
            quotas: [cap, (cap / 2).max(1), (cap / 4).max(1)],
            cap,
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.index.len()
    }

    /// Every entry, in no order (every slot holds one: an evicted
    /// entry's slot is reused at once).
    fn entries(&self) -> impl Iterator<Item = (IpAddr, &V)> {
        self.slots.iter().map(|slot| (slot.key, &slot.value))
    }

    fn get_mut(&mut self, key: IpAddr) -> Option<&mut V> {
        let &i = self.index.get(&key)?;
        Some(&mut self.slots[i as usize].value)
    }

    fn peek(&self, key: IpAddr) -> Option<&V> {
        self.index.get(&key).map(|&i| &self.slots[i as usize].value)
    }

    fn value_mut(&mut self, slot: u32) -> &mut V {
        &mut self.slots[slot as usize].value
    }

    /// The slot of `key`, inserted with `value` on the lowest list (making
    /// room by evicting) when it was not held; true when it was inserted.
    fn get_or_insert(&mut self, key: IpAddr, value: V) -> (u32, bool) {
        let len = self.slots.len();
        let full = self.index.len() >= self.cap;
        let victim = if full { self.evictable() } else { None };
        let i = match self.index.entry(key) {
            Entry::Occupied(e) => return (*e.get(), false),
            Entry::Vacant(e) => {
                let i = match victim {
                    Some(v) => v,
                    None => u32::try_from(len).expect("the table's capacity fits in u32"),
                };
                e.insert(i);
                i
            }
        };
        if let Some(v) = victim {
            self.unlink(v);
            let old = self.slots[v as usize].key;
            self.index.remove(&old);
            let slot = &mut self.slots[v as usize];
            slot.key = key;
            slot.value = value;
        } else {
            self.slots.push(Slot {
                key,
                value,
                list: SEEN_ONCE,
                prev: NIL,
                next: NIL,
            });
        }
        self.push(i, SEEN_ONCE);
        (i, true)
    }

    /// Makes `key` the most recent entry of `list`.
    fn touch(&mut self, key: IpAddr, list: usize) {
        if let Some(&i) = self.index.get(&key) {
            self.unlink(i);
            self.push(i, list);
        }
    }

    /// The least recent entry of the lowest list that has one.
    fn evictable(&self) -> Option<u32> {
        self.lists.iter().map(|l| l.head).find(|&head| head != NIL)
    }

    fn unlink(&mut self, i: u32) {
        let Slot { list, prev, next, .. } = self.slots[i as usize];
        match prev {
            NIL => self.lists[list].head = next,
            p => self.slots[p as usize].next = next,
        }
        match next {
            NIL => self.lists[list].tail = prev,
            n => self.slots[n as usize].prev = prev,
        }
        self.lists[list].len -= 1;
    }

    /// Links `i` as the most recent entry of `list`; past its quota, a
    /// list hands its least recent entry down (at most one move per list,
    /// as each push adds one entry).
    fn push(&mut self, i: u32, list: usize) {
        self.push_only(i, list);
        let mut at = list;
        while at > 0 && self.lists[at].len > self.quotas[at] {
            let head = self.lists[at].head;
            self.unlink(head);
            at -= 1;
            self.push_only(head, at);
        }
    }

    /// Links `i` as the most recent entry of `list`, quotas aside.
    fn push_only(&mut self, i: u32, list: usize) {
        let tail = self.lists[list].tail;
        {
            let slot = &mut self.slots[i as usize];
            slot.list = list;
            slot.prev = tail;
            slot.next = NIL;
        }
        match tail {
            NIL => self.lists[list].head = i,
            t => self.slots[t as usize].next = i,
        }
        self.lists[list].tail = i;
        self.lists[list].len += 1;
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
            ipv6_prefix: 64,
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
    fn the_rate_limit_applies_per_source_and_refills() {
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
        clock.advance(Duration::from_secs(1));
        assert!(guard.admit(a, clock.now()).is_ok(), "a second refills one packet");
        assert_eq!(guard.admit(a, clock.now()), Err(Refusal::RateLimited));
    }

    #[test]
    fn tables_stay_bounded_under_spoofed_sources() {
        let clock = ManualClock::new();
        let guard = SourceGuard::new(limits());
        for i in 0..100u8 {
            let _ = guard.admit(IpAddr::from([10, 0, 0, i]), clock.now());
            let _ = guard.strike(IpAddr::from([10, 0, 0, i]), clock.now());
        }
        assert_eq!(guard.rates.lock().unwrap().len(), 4);
        assert_eq!(guard.strikes.lock().unwrap().len(), 4);
    }

    #[test]
    fn a_full_table_keeps_counting_what_it_holds_and_keeps_lockouts() {
        let clock = ManualClock::new();
        let guard = SourceGuard::new(limits());
        let locked = IpAddr::from([127, 0, 0, 9]);
        let guessing = IpAddr::from([127, 0, 0, 8]);
        for _ in 0..3 {
            guard.strike(locked, clock.now());
        }
        guard.strike(guessing, clock.now());
        guard.strike(guessing, clock.now());
        // A flood of forged sources, each seen once, far past the capacity.
        for i in 0..10_000u32 {
            let [_, a, b, c] = i.to_be_bytes();
            guard.strike(IpAddr::from([10, a, b, c]), clock.now());
            let _ = guard.admit(IpAddr::from([10, a, b, c]), clock.now());
        }
        assert_eq!(guard.admit(locked, clock.now()), Err(Refusal::LockedOut));
        assert_eq!(
            guard.strike(guessing, clock.now()),
            StrikeOutcome::LockedOut,
            "its two earlier strikes were still counted"
        );
        // A fresh source is still counted and locked out.
        let fresh = IpAddr::from([127, 0, 0, 7]);
        for _ in 0..2 {
            guard.strike(fresh, clock.now());
            guard.strike(IpAddr::from([10, 9, 9, 9]), clock.now());
        }
        assert_eq!(guard.strike(fresh, clock.now()), StrikeOutcome::LockedOut);
        assert_eq!(guard.admit(fresh, clock.now()), Err(Refusal::LockedOut));
    }

    #[test]
    fn lockouts_are_evicted_last_and_oldest_first() {
        let clock = ManualClock::new();
        let guard = SourceGuard::new(limits());
        let lock = |i: u8| {
            for _ in 0..3 {
                guard.strike(IpAddr::from([127, 0, 1, i]), clock.now());
            }
        };
        for i in 0..5 {
            lock(i);
        }
        assert_eq!(guard.admit(IpAddr::from([127, 0, 1, 0]), clock.now()), Ok(()));
        for i in 1..5 {
            assert_eq!(
                guard.admit(IpAddr::from([127, 0, 1, i]), clock.now()),
                Err(Refusal::LockedOut)
            );
        }
    }

    #[test]
    fn ipv6_sources_are_limited_per_prefix_and_ipv4_per_address() {
        let clock = ManualClock::new();
        let guard = SourceGuard::new(limits());
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        for _ in 0..3 {
            guard.strike(a, clock.now());
        }
        assert_eq!(guard.admit(b, clock.now()), Err(Refusal::LockedOut), "same /64");
        assert_eq!(guard.admit(other, clock.now()), Ok(()), "another /64");
        assert_eq!(guard.key(a), "2001:db8:1:2::".parse::<IpAddr>().unwrap());
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(guard.key(mapped), IpAddr::from([10, 0, 0, 1]));

        let whole = SourceGuard::new(Limits {
            ipv6_prefix: 128,
            ..limits()
        });
        assert_eq!(whole.key(a), a);
        for _ in 0..3 {
            whole.strike(a, clock.now());
        }
        assert_eq!(whole.admit(b, clock.now()), Ok(()));
    }

    #[test]
    fn lockouts_are_listed_with_why_and_cleared_one_by_one() {
        let clock = ManualClock::new();
        let guard = SourceGuard::new(limits());
        let trapped = IpAddr::from([127, 0, 0, 9]);
        let guessing = IpAddr::from([127, 0, 0, 8]);
        let t0 = clock.now();
        guard.lock_out(trapped, t0);
        clock.advance(Duration::from_secs(1));
        for _ in 0..3 {
            guard.strike(guessing, clock.now());
        }
        guard.strike(IpAddr::from([127, 0, 0, 7]), clock.now());
        let now = clock.now();
        let listed = guard.lockouts(now);
        assert_eq!(
            listed,
            vec![
                Lockout {
                    source: trapped,
                    why: LockReason::Trap,
                    since: t0,
                    until: t0 + Duration::from_secs(60),
                },
                Lockout {
                    source: guessing,
                    why: LockReason::Strikes,
                    since: now,
                    until: now + Duration::from_secs(60),
                },
            ]
        );
        assert_eq!(guard.lockouts_active(now), 2);
        assert_eq!(guard.clear_lockout(trapped, now).map(|l| l.why), Some(LockReason::Trap));
        assert_eq!(guard.clear_lockout(trapped, now), None, "cleared already");
        assert_eq!(guard.admit(trapped, now), Ok(()));
        assert_eq!(guard.admit(guessing, now), Err(Refusal::LockedOut));
        // Its strikes were forgotten with it: one more is not a lockout.
        assert_eq!(guard.strike(trapped, now), StrikeOutcome::Counted);
        clock.advance(Duration::from_secs(60));
        assert!(guard.lockouts(clock.now()).is_empty(), "both ended");
    }

    #[test]
    fn the_table_reuses_evicted_slots_and_keeps_its_lists_linked() {
        let mut t: Table<u32> = Table::new(3);
        let k = |i: u8| IpAddr::from([10, 0, 0, i]);
        for i in 0..3 {
            t.get_or_insert(k(i), u32::from(i));
        }
        t.touch(k(0), SEEN_AGAIN);
        // Evicts 1 (least recent of the lowest list), then 2, then 3.
        t.get_or_insert(k(3), 3);
        assert!(t.peek(k(1)).is_none());
        t.get_or_insert(k(4), 4);
        assert!(t.peek(k(2)).is_none());
        t.get_or_insert(k(5), 5);
        assert!(t.peek(k(3)).is_none());
        assert_eq!(t.peek(k(0)), Some(&0));
        assert_eq!(t.slots.len(), 3);
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn upper_lists_over_their_quota_hand_entries_down() {
        let mut t: Table<u32> = Table::new(8);
        let k = |i: u8| IpAddr::from([10, 0, 0, i]);
        for i in 0..8 {
            t.get_or_insert(k(i), u32::from(i));
            t.touch(k(i), LOCKED);
        }
        // A quarter locked, a half above that, the rest seen once.
        assert_eq!(t.lists.map(|l| l.len), [2, 4, 2]);
        let at = |t: &Table<u32>, i: u8| t.slots[t.index[&k(i)] as usize].list;
        assert_eq!((at(&t, 7), at(&t, 6)), (LOCKED, LOCKED));
        assert_eq!((at(&t, 0), at(&t, 1)), (SEEN_ONCE, SEEN_ONCE));
        // A new source evicts the oldest of those, never a recent lockout.
        t.get_or_insert(k(8), 8);
        assert!(t.peek(k(0)).is_none());
        assert_eq!(t.peek(k(7)), Some(&7));
        assert_eq!(t.lists.map(|l| l.len), [2, 4, 2]);
    }
}
