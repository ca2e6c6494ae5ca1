//! The local mirror of the grants several replicas share
//! (`backend = "redis"`, [`crate::replicate`]): a [`MemoryStore`] that also
//! remembers which replica gave each grant, for `/v1/grants`.
//!
//! Every replica runs the same gate over the same inputs, so the mirror
//! holds what every other replica holds; what it adds is the origin of the
//! input being applied, which the input log sets in `origin` just before
//! the driver feeds it.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use dashmap::DashMap;
use tokio::sync::watch;

use super::{GrantStore, MemoryStore};
use crate::gate::Grant;

/// A [`MemoryStore`] with the replica that gave each grant.
#[derive(Debug)]
pub struct MirrorStore {
    grants: MemoryStore,
    /// The replica whose input is being applied now.
    origin: Arc<Mutex<Arc<str>>>,
    given_by: DashMap<(Arc<str>, IpAddr), Arc<str>>,
}

impl MirrorStore {
    /// A mirror that takes each grant's replica from `origin` when given.
    pub fn new(origin: Arc<Mutex<Arc<str>>>) -> Self {
        Self {
            grants: MemoryStore::new(),
            origin,
            given_by: DashMap::new(),
        }
    }

    fn forget(&self, removed: Option<Grant>) -> Option<Grant> {
        if let Some(g) = &removed {
            self.given_by.remove(&(g.service.clone(), g.source));
        }
        removed
    }
}

impl GrantStore for MirrorStore {
    fn insert(&self, grant: &Grant) {
        let origin = self.origin.lock().expect("origin lock is never poisoned").clone();
        self.given_by.insert((grant.service.clone(), grant.source), origin);
        self.grants.insert(grant);
    }

    fn allows(&self, service: &str, source: IpAddr, now: Instant) -> bool {
        self.grants.allows(service, source, now)
    }

    fn remove_expired(&self, service: &str, source: IpAddr, now: Instant) -> Option<Grant> {
        self.forget(self.grants.remove_expired(service, source, now))
    }

    fn revoke(&self, service: &str, source: IpAddr) -> Option<Grant> {
        self.forget(self.grants.revoke(service, source))
    }

    fn snapshot(&self) -> Vec<Grant> {
        self.grants.snapshot()
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.grants.changes()
    }

    fn given_by(&self, service: &str, source: IpAddr) -> Option<Arc<str>> {
        self.given_by.get(&(Arc::from(service), source)).map(|r| r.clone())
    }

    fn holds(&self, service: &str, source: IpAddr) -> bool {
        self.grants.holds(service, source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock};
    use crate::gate::Method;
    use std::time::Duration;

    #[test]
    fn each_grant_names_the_replica_whose_input_gave_it_until_it_ends() {
        let clock = ManualClock::new();
        let origin = Arc::new(Mutex::new(Arc::<str>::from("a")));
        let store = MirrorStore::new(origin.clone());
        let grant = |source: [u8; 4]| Grant {
            service: "pg".into(),
            source: IpAddr::from(source),
            method: Method::Knock,
            expires_at: clock.now() + Duration::from_secs(5),
        };
        store.insert(&grant([10, 0, 0, 1]));
        *origin.lock().unwrap() = "b".into();
        store.insert(&grant([10, 0, 0, 2]));
        assert_eq!(store.given_by("pg", IpAddr::from([10, 0, 0, 1])).as_deref(), Some("a"));
        assert_eq!(store.given_by("pg", IpAddr::from([10, 0, 0, 2])).as_deref(), Some("b"));
        assert!(store.allows("pg", IpAddr::from([10, 0, 0, 1]), clock.now()));
        store.revoke("pg", IpAddr::from([10, 0, 0, 1]));
        assert_eq!(store.given_by("pg", IpAddr::from([10, 0, 0, 1])), None);
    }
}
