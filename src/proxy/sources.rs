//! How many proxied connections each source holds, per service
//! (`max_connections_per_source`): a map of counts and a guard per
//! connection that gives its place back when dropped.
//!
//! Taking a place is a non-waiting lookup under one shard's lock, so it
//! runs in the accept loop's decision; an entry lives only while its
//! source has a connection, so a flood of distinct sources leaves nothing
//! behind once its connections close. The map owns no policy: the caller
//! passes the cap (the service's setting at the time of the connection).
//! An IPv6 source counts by its `limits.ipv6_prefix`, as the knock and SPA
//! limits count it: one host's /64 is one source.

use std::net::IpAddr;
use std::sync::Arc;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;

use crate::guard::source_key;

type Key = (Arc<str>, IpAddr);

/// The connections each (service, source) holds now.
#[derive(Debug, Clone)]
pub struct SourceConnections {
    inner: Arc<DashMap<Key, usize, foldhash::fast::RandomState>>,
    ipv6_prefix: u8,
}

impl SourceConnections {
    /// An empty map that counts IPv6 sources by their first `ipv6_prefix`
    /// bits.
    pub fn new(ipv6_prefix: u8) -> Self {
        Self {
            inner: Arc::default(),
            ipv6_prefix,
        }
    }

    /// A place for one more connection of `source` to `service`, or
    /// `None` when it already holds `cap`.
    pub fn try_take(&self, service: &Arc<str>, source: IpAddr, cap: usize) -> Option<SourceGuard> {
        let key = (service.clone(), source_key(source, self.ipv6_prefix));
        match self.inner.entry(key.clone()) {
            Entry::Occupied(mut held) => {
                if *held.get() >= cap {
                    return None;
                }
                *held.get_mut() += 1;
            }
            Entry::Vacant(free) => {
                if cap == 0 {
                    return None;
                }
                free.insert(1);
            }
        }
        Some(SourceGuard { map: self.clone(), key })
    }

    /// Connections `source` holds to `service` now.
    pub fn held(&self, service: &str, source: IpAddr) -> usize {
        self.inner
            .get(&(Arc::from(service), source_key(source, self.ipv6_prefix)))
            .map_or(0, |n| *n)
    }

    /// Sources that hold a connection now, over every service.
    pub fn sources(&self) -> usize {
        self.inner.len()
    }
}

/// One connection's place in [`SourceConnections`], given back on drop.
#[derive(Debug)]
pub struct SourceGuard {
    map: SourceConnections,
    key: Key,
}

impl Drop for SourceGuard {
    fn drop(&mut self) {
        // Under the shard's lock: a connection taken meanwhile either sees
        // the count before this decrement or finds the entry gone.
        if let Entry::Occupied(mut held) = self.map.inner.entry(self.key.clone()) {
            *held.get_mut() = held.get().saturating_sub(1);
            if *held.get() == 0 {
                held.remove();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_source_gets_its_cap_and_no_more_and_others_are_apart() {
        let map = SourceConnections::new(64);
        let svc: Arc<str> = "db".into();
        let a = ip("10.0.0.1");
        let held: Vec<_> = (0..3)
            .map(|_| map.try_take(&svc, a, 3).expect("under the cap"))
            .collect();
        assert!(map.try_take(&svc, a, 3).is_none(), "a fourth past a cap of 3");
        assert_eq!(map.held("db", a), 3);
        // Another source, and the same source on another service, count apart.
        assert!(map.try_take(&svc, ip("10.0.0.2"), 3).is_some());
        let other: Arc<str> = "web".into();
        let _web = map.try_take(&other, a, 1).expect("another service's count");
        drop(held);
        assert_eq!(map.held("db", a), 0);
        assert!(map.try_take(&svc, a, 3).is_some(), "places come back");
    }

    #[test]
    fn an_ipv6_source_counts_by_its_prefix() {
        let map = SourceConnections::new(64);
        let svc: Arc<str> = "db".into();
        let _a = map.try_take(&svc, ip("2001:db8:1:2::1"), 2).unwrap();
        let _b = map.try_take(&svc, ip("2001:db8:1:2:ffff::9"), 2).unwrap();
        assert!(
            map.try_take(&svc, ip("2001:db8:1:2::3"), 2).is_none(),
            "a third address of the same /64 past a cap of 2"
        );
        assert_eq!(map.held("db", ip("2001:db8:1:2::77")), 2);
        assert!(
            map.try_take(&svc, ip("2001:db8:1:3::1"), 2).is_some(),
            "another /64 is another source"
        );
        // A mapped IPv4 address is that address; IPv4 counts exactly.
        let _c = map.try_take(&svc, ip("::ffff:10.0.0.1"), 1).unwrap();
        assert!(map.try_take(&svc, ip("10.0.0.1"), 1).is_none());
        assert!(map.try_take(&svc, ip("10.0.0.2"), 1).is_some());
        // With a /128 every address is its own.
        let exact = SourceConnections::new(128);
        let _d = exact.try_take(&svc, ip("2001:db8::1"), 1).unwrap();
        assert!(exact.try_take(&svc, ip("2001:db8::2"), 1).is_some());
    }

    #[test]
    fn an_entry_lives_only_while_its_source_holds_a_connection() {
        let map = SourceConnections::new(64);
        let svc: Arc<str> = "db".into();
        let guards: Vec<_> = (1..=100u8)
            .map(|i| map.try_take(&svc, ip(&format!("10.0.1.{i}")), 2).unwrap())
            .collect();
        assert_eq!(map.sources(), 100);
        drop(guards);
        assert_eq!(map.sources(), 0, "entries at zero were kept");
        assert!(
            map.try_take(&svc, ip("10.0.0.9"), 0).is_none(),
            "a cap of 0 admits none"
        );
        assert_eq!(map.sources(), 0);
    }

    #[test]
    fn places_taken_and_given_back_from_many_threads_balance() {
        let map = SourceConnections::new(64);
        let svc: Arc<str> = "db".into();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for i in 0..2_000u32 {
                        let source = ip(&format!("10.0.0.{}", i % 3));
                        let guard = map.try_take(&svc, source, 8);
                        assert!(map.held("db", source) <= 8);
                        drop(guard);
                    }
                });
            }
        });
        assert_eq!(map.sources(), 0);
    }
}
