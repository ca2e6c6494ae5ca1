//! Where grants live so the connection path can check them.
//!
//! The gate decides; the store remembers, behind [`GrantStore`], so that a
//! shared backend can replace the embedded [`MemoryStore`] without touching
//! the proxy. Lookups are synchronous and local: a backend shared between
//! replicas keeps a local mirror so the connection path never waits on the
//! network.
//!
//! The SPA replay log lives beside it ([`replay`]): on disk under
//! `state.dir`, so that a restart forgets no accepted packet.

pub mod mirror;
pub mod replay;

use std::net::IpAddr;
use std::time::Instant;

use dashmap::DashMap;
use smallvec::SmallVec;
use tokio::sync::watch;

use crate::gate::Grant;

/// Grant storage as the proxy and the gate driver see it.
pub trait GrantStore: std::fmt::Debug + Send + Sync + 'static {
    /// Records a grant, replacing any for the same service and source.
    fn insert(&self, grant: &Grant);

    /// Whether `source` may open a new connection to `service` at `now`.
    fn allows(&self, service: &str, source: IpAddr, now: Instant) -> bool;

    /// Removes the grant for `service` and `source` if it has expired by
    /// `now` (a newer grant that replaced it stays).
    fn remove_expired(&self, service: &str, source: IpAddr, now: Instant) -> Option<Grant>;

    /// Removes the grant for `service` and `source` whatever its expiry.
    fn revoke(&self, service: &str, source: IpAddr) -> Option<Grant>;

    /// Every grant still held (expired ones not yet removed included).
    fn snapshot(&self) -> Vec<Grant>;

    /// Sees a new value after each change to the grants held (one given,
    /// expired or revoked), so that whatever keeps a copy derived from them
    /// (a UDP service's kernel filter) knows when to look again. Changes
    /// close together may be seen as one.
    fn changes(&self) -> watch::Receiver<u64>;

    /// The replica that gave the grant for `service` and `source`, when
    /// several share one gate (`backend = "redis"`).
    fn given_by(&self, _service: &str, _source: IpAddr) -> Option<std::sync::Arc<str>> {
        None
    }

    /// Whether a grant for `service` and `source` is held, expired or not.
    fn holds(&self, service: &str, source: IpAddr) -> bool {
        self.snapshot()
            .iter()
            .any(|g| &*g.service == service && g.source == source)
    }
}

/// One source's grants, almost always one: kept in the map's own slot, so
/// a lookup touches the table and nothing behind it.
type Grants = SmallVec<[Grant; 1]>;

/// Map hasher: seeded per map, and an order of magnitude cheaper than
/// SipHash on a 17-byte key. Flooding does not apply: only authenticated
/// sources (a completed knock or SPA) are ever inserted; lookups of anything else cannot lengthen a probe.
type Hasher = foldhash::fast::RandomState;

/// The embedded store: a concurrent map keyed by source address, holding
/// that source's grants.
#[derive(Debug)]
pub struct MemoryStore {
    by_source: DashMap<IpAddr, Grants, Hasher>,
    /// Bumped after each change to `by_source`.
    generation: watch::Sender<u64>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self {
            by_source: DashMap::default(),
            generation: watch::channel(0).0,
        }
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }
}

impl GrantStore for MemoryStore {
    fn insert(&self, grant: &Grant) {
        {
            let mut grants = self.by_source.entry(grant.source).or_default();
            match grants.iter_mut().find(|g| g.service == grant.service) {
                Some(old) => *old = grant.clone(),
                None => grants.push(grant.clone()),
            }
        }
        self.bump();
    }

    fn allows(&self, service: &str, source: IpAddr, now: Instant) -> bool {
        self.by_source
            .get(&source)
            .is_some_and(|grants| grants.iter().any(|g| &*g.service == service && g.expires_at > now))
    }

    fn remove_expired(&self, service: &str, source: IpAddr, now: Instant) -> Option<Grant> {
        self.remove_where(source, |g| &*g.service == service && g.expires_at <= now)
    }

    fn revoke(&self, service: &str, source: IpAddr) -> Option<Grant> {
        self.remove_where(source, |g| &*g.service == service)
    }

    fn snapshot(&self) -> Vec<Grant> {
        self.by_source.iter().flat_map(|e| e.value().clone()).collect()
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    fn holds(&self, service: &str, source: IpAddr) -> bool {
        self.by_source
            .get(&source)
            .is_some_and(|grants| grants.iter().any(|g| &*g.service == service))
    }
}

impl MemoryStore {
    fn remove_where(&self, source: IpAddr, pred: impl Fn(&Grant) -> bool) -> Option<Grant> {
        let mut removed = None;
        self.by_source.remove_if_mut(&source, |_, grants| {
            if let Some(pos) = grants.iter().position(&pred) {
                removed = Some(grants.swap_remove(pos));
            }
            grants.is_empty()
        });
        if removed.is_some() {
            self.bump();
        }
        removed
    }

    /// Tells [`GrantStore::changes`] watchers, outside any map guard.
    fn bump(&self) {
        self.generation.send_modify(|g| *g = g.wrapping_add(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock};
    use crate::gate::Method;
    use std::time::Duration;

    fn grant(service: &str, source: [u8; 4], expires_at: Instant) -> Grant {
        Grant {
            service: service.into(),
            source: IpAddr::from(source),
            method: Method::Knock,
            expires_at,
        }
    }

    #[test]
    fn a_grant_admits_one_source_to_one_service_until_it_expires() {
        let clock = ManualClock::new();
        let store = MemoryStore::new();
        let a = IpAddr::from([127, 0, 0, 1]);
        let b = IpAddr::from([127, 0, 0, 2]);
        store.insert(&grant("echo", [127, 0, 0, 1], clock.now() + Duration::from_secs(10)));
        assert!(store.allows("echo", a, clock.now()));
        assert!(!store.allows("echo", b, clock.now()));
        assert!(!store.allows("other", a, clock.now()));
        clock.advance(Duration::from_millis(9_999));
        assert!(store.allows("echo", a, clock.now()));
        clock.advance(Duration::from_millis(1));
        assert!(
            !store.allows("echo", a, clock.now()),
            "expired grants deny before removal"
        );
        assert!(store.remove_expired("echo", a, clock.now()).is_some());
        assert!(store.snapshot().is_empty());
    }

    #[test]
    fn remove_expired_keeps_a_newer_grant() {
        let clock = ManualClock::new();
        let store = MemoryStore::new();
        let a = IpAddr::from([127, 0, 0, 1]);
        store.insert(&grant("echo", [127, 0, 0, 1], clock.now() + Duration::from_secs(1)));
        store.insert(&grant("echo", [127, 0, 0, 1], clock.now() + Duration::from_secs(5)));
        clock.advance(Duration::from_secs(2));
        assert!(store.remove_expired("echo", a, clock.now()).is_none());
        assert!(store.allows("echo", a, clock.now()));
        assert_eq!(store.snapshot().len(), 1);
    }

    #[test]
    fn holds_counts_a_grant_until_it_is_removed_even_once_expired() {
        let clock = ManualClock::new();
        let store = MemoryStore::new();
        let a = IpAddr::from([127, 0, 0, 1]);
        assert!(!store.holds("echo", a));
        store.insert(&grant("echo", [127, 0, 0, 1], clock.now() + Duration::from_secs(1)));
        clock.advance(Duration::from_secs(2));
        assert!(store.holds("echo", a));
        assert!(!store.holds("pg", a));
        store.remove_expired("echo", a, clock.now());
        assert!(!store.holds("echo", a));
    }

    #[test]
    fn every_change_to_the_grants_is_seen_by_watchers() {
        let clock = ManualClock::new();
        let store = MemoryStore::new();
        let mut changes = store.changes();
        let a = IpAddr::from([127, 0, 0, 1]);
        assert!(!changes.has_changed().unwrap());
        store.insert(&grant("echo", [127, 0, 0, 1], clock.now() + Duration::from_secs(1)));
        assert!(changes.has_changed().unwrap(), "a grant given");
        changes.mark_unchanged();
        assert!(store.remove_expired("echo", a, clock.now()).is_none());
        assert!(store.revoke("pg", a).is_none());
        assert!(!changes.has_changed().unwrap(), "nothing removed, nothing to see");
        clock.advance(Duration::from_secs(1));
        assert!(store.remove_expired("echo", a, clock.now()).is_some());
        assert!(changes.has_changed().unwrap(), "a grant expired");
        changes.mark_unchanged();
        store.insert(&grant("echo", [127, 0, 0, 1], clock.now() + Duration::from_secs(1)));
        changes.mark_unchanged();
        assert!(store.revoke("echo", a).is_some());
        assert!(changes.has_changed().unwrap(), "a grant revoked");
    }

    #[test]
    fn revoke_takes_one_service_and_leaves_the_others() {
        let clock = ManualClock::new();
        let store = MemoryStore::new();
        let a = IpAddr::from([127, 0, 0, 1]);
        let later = clock.now() + Duration::from_secs(5);
        store.insert(&grant("echo", [127, 0, 0, 1], later));
        store.insert(&grant("pg", [127, 0, 0, 1], later));
        assert!(store.revoke("echo", a).is_some());
        assert!(!store.allows("echo", a, clock.now()));
        assert!(store.allows("pg", a, clock.now()));
    }
}
