//! The SPA desk: every decision on one SPA packet, synchronous and free of
//! sockets. Decoding (native by key id, fwknop by trying each user's
//! keys), the user's source restrictions, the requested services and
//! permissions, and the replay log ([`ReplayLog`], on disk, so a restart
//! forgets no accepted packet and needs no start-up fence).
//!
//! Deciding ([`SpaDesk::verify`]) and remembering are two steps: a
//! packet's replay digest is recorded only once the gate driver has room
//! for its grants, so an accepted packet is never lost between the two
//! (and a packet refused for want of room may be sent again). The SPA
//! sensors leave the recording to [`crate::sensor::recorder`], which
//! batches the disk writes; [`SpaDesk::remember`] is the same for one
//! packet. No grant is given without its digest on disk: a digest that
//! cannot be written refuses the packet.
//!
//! The codecs beside it ([`native`], [`fwknop`], [`super::keyfile`]) know
//! nothing of the config; the desk is the policy built on top of them from
//! the validated `[spa]` section, the users and the services.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use crate::clock::Clock;
use crate::config::{Service, Spa, User};
use crate::spa::native::{self, KeyId};
use crate::spa::{self, fwknop, Format, Reject, Window};
use crate::step::Proto;
use crate::store::replay::{self, ReplayLog};

/// Why an SPA packet was not honoured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The codec refused it (malformed, bad MAC, stale...).
    Packet(Reject),
    /// Authentic, but seen before (in this run or an earlier one).
    Replay,
    /// Authentic and allowed, but its digest could not be written to the
    /// replay log: refused, since a grant without a record could be
    /// replayed after a restart. Not recorded, so it may be sent again.
    ReplayLogFailed,
    /// The user may not send from this address (`allow_from`).
    SourceNotAllowed,
    /// The packet's allow-IP is not its source (`require_source_match`).
    SourceMismatch,
    /// The packet names no service.
    NoAccess,
    /// No service listens on a requested protocol and port (the first
    /// such pair).
    UnknownService(Proto, u16),
    /// The user is not in the requested service's `spa_users`.
    NotPermitted,
    /// The user's `expires` has passed.
    Expired,
    /// The packet's username is not the user's `require_username`.
    UsernameMismatch,
    /// The packet names no allow-IP (`fwknop -s`) and the user has
    /// `require_source_address`.
    SourceAddressRequired,
    /// A NAT request names an internal `host:port` that no SPA service's
    /// upstream (or `nat_name`) is.
    NatUnknownTarget,
    /// A NAT request's `host:port` names more than one service.
    NatAmbiguousTarget,
    /// A NAT request names a service the user is not permitted to open.
    NatNotPermitted,
    /// The per-source guard refused the packet before it was read.
    Guard(crate::guard::Refusal),
    /// Authentic and allowed, but the gate driver had no room for its
    /// grants; not remembered, so the same packet may be sent again.
    Busy,
    /// The shared state store (`backend = "redis"`) is unreachable: a
    /// replica alone cannot tell a replay. Not remembered.
    StateStoreDown,
    /// The shared state store lost its replay digests (first use, a
    /// restart without persistence, a failover to a lagging replica): held
    /// back until every packet it may have seen is stale. Not remembered.
    ReplayWindow,
}

impl Refusal {
    pub fn as_label(self) -> &'static str {
        match self {
            Refusal::Packet(r) => r.as_label(),
            Refusal::Replay => "replay",
            Refusal::ReplayLogFailed => "replay_log_failed",
            Refusal::SourceNotAllowed => "source_not_allowed",
            Refusal::SourceMismatch => "source_mismatch",
            Refusal::NoAccess => "no_access",
            Refusal::UnknownService(..) => "unknown_service",
            Refusal::NotPermitted => "not_permitted",
            Refusal::Expired => "expired",
            Refusal::UsernameMismatch => "username_mismatch",
            Refusal::SourceAddressRequired => "source_address_required",
            Refusal::NatUnknownTarget => "nat_unknown_target",
            Refusal::NatAmbiguousTarget => "nat_ambiguous_target",
            Refusal::NatNotPermitted => "nat_not_permitted",
            Refusal::Guard(g) => g.as_label(),
            Refusal::Busy => "busy",
            Refusal::StateStoreDown => "state_store_down",
            Refusal::ReplayWindow => "replay_window",
        }
    }

    /// What the log line adds to the label: never secret, never
    /// unauthenticated peer text.
    pub fn detail(self) -> Option<String> {
        match self {
            Refusal::Packet(r) => Some(r.to_string()),
            Refusal::UnknownService(proto, port) => Some(format!("no spa service on {proto}/{port}")),
            _ => None,
        }
    }
}

/// An honoured request: who, for whom, and what it opens for how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub user: Arc<str>,
    pub format: Format,
    /// The address the grants go to: the packet's allow-IP, or its source.
    pub grantee: IpAddr,
    pub grants: Vec<(Arc<str>, Duration)>,
    /// A close request: the grants named end now instead of being given.
    pub close: bool,
    /// The packet's replay digest, for [`SpaDesk::remember`].
    pub digest: [u8; 32],
    /// The packet's own timestamp (unix seconds): its digest is kept
    /// until this has left the window.
    pub timestamp: u64,
}

#[derive(Debug)]
struct Door {
    service: Arc<str>,
    proto: Proto,
    port: u16,
    users: Vec<Arc<str>>,
    open_for: Duration,
    max_open_for: Duration,
    /// The upstream's host (lowercased, no brackets) and port, and the
    /// service's `nat_name`: what fwknop NAT requests name.
    nat_host: Arc<str>,
    nat_port: Option<u16>,
    nat_name: Option<Arc<str>>,
}

impl Door {
    /// Whether a NAT request for `nat` names this door. `--nat-local`
    /// names a port on the gateway host: a service whose upstream is on
    /// loopback.
    fn is_nat_target(&self, nat: &spa::NatAccess) -> bool {
        if self.nat_port != Some(nat.port) {
            return false;
        }
        if nat.local {
            let host = &*self.nat_host;
            return host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
        }
        *self.nat_host == *nat.host || self.nat_name.as_deref() == Some(nat.host.as_str())
    }
}

/// Everything needed to decide on a packet.
#[derive(Debug)]
pub struct SpaDesk {
    users: Vec<User>,
    native_ids: HashMap<KeyId, usize>,
    doors: Vec<Door>,
    max_age: Duration,
}

impl SpaDesk {
    /// Builds the desk from the validated `[spa]` section, users and
    /// services. `bound` holds each service's real listen address (port 0
    /// resolved): a request names the port clients connect to.
    pub fn new(spa: Option<&Spa>, users: &[User], services: &[Service], bound: &[(Arc<str>, SocketAddr)]) -> Self {
        let users = users.to_vec();
        let native_ids = users
            .iter()
            .enumerate()
            .filter_map(|(i, u)| u.native.as_ref().map(|k| (k.id(), i)))
            .collect();
        let doors = services
            .iter()
            .filter(|s| !s.spa_users.is_empty())
            .map(|s| Door {
                service: s.name.clone(),
                proto: s.protocol,
                port: bound
                    .iter()
                    .find(|(name, _)| *name == s.name)
                    .map_or(s.listen.port(), |(_, addr)| addr.port()),
                users: s.spa_users.clone(),
                open_for: s.open_for,
                max_open_for: s.spa.max_open_for,
                nat_host: s
                    .upstream
                    .rsplit_once(':')
                    .map_or("", |(h, _)| h.trim_matches(['[', ']']))
                    .to_ascii_lowercase()
                    .into(),
                nat_port: s.upstream.rsplit_once(':').and_then(|(_, p)| p.parse().ok()),
                nat_name: s.spa.nat_name.clone(),
            })
            .collect();
        Self {
            users,
            native_ids,
            doors,
            max_age: spa.map_or(spa::DEFAULT_MAX_AGE, |s| s.max_age),
        }
    }

    /// Decides on one packet from `source`; the packet is not remembered
    /// as seen until [`SpaDesk::remember`].
    pub fn verify(&self, packet: &[u8], source: IpAddr, now_unix: u64) -> Result<Accepted, Refusal> {
        let window = Window::new(now_unix, self.max_age);
        let (user, request) = match spa::detect(packet) {
            Some(Format::Native) => {
                let mut found = None;
                let request = native::decode(packet, window, |id| {
                    let i = *self.native_ids.get(&id)?;
                    found = Some(i);
                    let u = &self.users[i];
                    Some((&*u.name, u.native.as_ref()?))
                })
                .map_err(Refusal::Packet)?;
                let i = found.ok_or(Refusal::Packet(Reject::UnknownUser))?;
                (&self.users[i], request)
            }
            Some(Format::Fwknop) => {
                let candidates = self.users.iter().filter_map(|u| u.fwknop.as_ref().map(|k| (u, k)));
                fwknop::decode_any(packet, candidates, window).map_err(Refusal::Packet)?
            }
            None => {
                return Err(Refusal::Packet(Reject::Malformed(
                    "neither a native nor an fwknop packet",
                )))
            }
        };
        if !user.may_send_from(source) {
            return Err(Refusal::SourceNotAllowed);
        }
        if user.expires_unix.is_some_and(|t| now_unix >= t) {
            return Err(Refusal::Expired);
        }
        let named = request.format == Format::Fwknop;
        if named && user.require_username.as_ref().is_some_and(|u| **u != *request.user) {
            return Err(Refusal::UsernameMismatch);
        }
        if user.require_source_address && request.allow_ip.is_none() {
            return Err(Refusal::SourceAddressRequired);
        }
        let grantee = request.allow_ip.map_or(source, |ip| ip.to_canonical());
        // A close request ends the sender's own grant only: naming another
        // address would let one user end another's.
        if (user.require_source_match || request.close) && grantee != source {
            return Err(Refusal::SourceMismatch);
        }
        if request.access.is_empty() {
            return Err(Refusal::NoAccess);
        }
        let grant = |door: &Door| {
            let duration = request.duration.map_or(door.open_for, |d| d.min(door.max_open_for));
            (door.service.clone(), duration)
        };
        let mut grants = Vec::with_capacity(request.access.len());
        if let Some(nat) = &request.nat {
            // The internal host:port names the service; the requested
            // protocols must be its protocol (the port is the sender's
            // view of the gateway, which a userspace gateway cannot remap).
            let mut targets = self
                .doors
                .iter()
                .filter(|d| d.is_nat_target(nat) && request.access.iter().all(|(p, _)| *p == d.proto));
            let door = targets.next().ok_or(Refusal::NatUnknownTarget)?;
            if targets.next().is_some() {
                return Err(Refusal::NatAmbiguousTarget);
            }
            if !door.users.contains(&user.name) {
                return Err(Refusal::NatNotPermitted);
            }
            grants.push(grant(door));
        }
        // Like fwknopd, one refused entry refuses the whole request.
        for (proto, port) in request.access.iter().filter(|_| request.nat.is_none()) {
            let door = self
                .doors
                .iter()
                .find(|d| d.proto == *proto && d.port == *port)
                .ok_or(Refusal::UnknownService(*proto, *port))?;
            if !door.users.contains(&user.name) {
                return Err(Refusal::NotPermitted);
            }
            grants.push(grant(door));
        }
        Ok(Accepted {
            user: user.name.clone(),
            format: request.format,
            grantee,
            grants,
            close: request.close,
            digest: request.digest,
            timestamp: request.timestamp,
        })
    }

    /// Records an accepted packet's replay digest durably; refuses a
    /// packet seen before, and one whose digest cannot be written. Called
    /// once its grants have room in the driver's queue. Waits on the disk
    /// (an fsync), so not for the async runtime's threads.
    pub fn remember(&self, accepted: &Accepted, now_unix: u64, log: &ReplayLog) -> Result<(), Refusal> {
        match log.first_sighting(&accepted.digest, accepted.timestamp, now_unix, self.keep()) {
            Ok(true) => Ok(()),
            Ok(false) => Err(Refusal::Replay),
            Err(e) => {
                tracing::error!(
                    error = %e,
                    dir = %log.dir().display(),
                    "state.dir: cannot write the replay log: spa packet refused"
                );
                Err(Refusal::ReplayLogFailed)
            }
        }
    }

    /// How long past its own timestamp a digest is kept: the window in
    /// which the packet could still be accepted, plus a margin for the
    /// wall clock stepping back.
    pub fn keep(&self) -> Duration {
        self.max_age + replay::MARGIN
    }
}

/// Unix seconds of a wall-clock reading (0 before the epoch).
pub fn unix_secs(clock: &dyn Clock) -> u64 {
    clock.wall().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spa::keyfile::{self, KeyKind};
    use crate::spa::Fields;

    const NOW: u64 = 1_800_000_000;

    struct Fixture {
        desk: SpaDesk,
        alice: native::NativeKey,
        log: ReplayLog,
        _dir: tempfile::TempDir,
    }

    /// alice may open pg (5432) from 10.0.0.0/8 only and must send from the
    /// address she asks for; bob may open pg from anywhere.
    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = rand::rng();
        let alice = keyfile::generate(KeyKind::Native, &mut rng);
        let bob = keyfile::generate(KeyKind::Native, &mut rng);
        std::fs::write(dir.path().join("alice.key"), &*keyfile::render(&alice)).unwrap();
        std::fs::write(dir.path().join("bob.key"), &*keyfile::render(&bob)).unwrap();
        for key in ["alice.key", "bob.key"] {
            let private = <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600);
            std::fs::set_permissions(dir.path().join(key), private).unwrap();
        }
        let raw: crate::config::raw::RawConfig = toml::from_str(
            r#"
[spa]
listen = "127.0.0.1:0"
[service.pg]
listen = "127.0.0.1:5432"
upstream = "127.0.0.1:1"
open_for = "30s"
spa_users = ["alice", "bob"]
[service.other]
listen = "127.0.0.1:6000"
upstream = "127.0.0.1:1"
spa_users = ["bob"]
[user.alice]
key_file = "alice.key"
allow_from = ["10.0.0.0/8"]
require_source_match = true
[user.bob]
key_file = "bob.key"
"#,
        )
        .unwrap();
        let config = crate::config::validate_in(&raw, dir.path()).unwrap();
        let desk = SpaDesk::new(config.spa.as_ref(), &config.users, &config.services, &[]);
        let (log, _) = ReplayLog::open(&dir.path().join("state"), NOW, desk.keep()).unwrap();
        Fixture {
            desk,
            alice: alice.native.unwrap(),
            log,
            _dir: dir,
        }
    }

    fn packet(key: &native::NativeKey, timestamp: u64, port: u16, allow_ip: Option<IpAddr>, n: u8) -> Vec<u8> {
        let fields = Fields {
            timestamp,
            access: vec![(Proto::Tcp, port)],
            allow_ip,
            duration: Some(Duration::from_secs(3600)),
            close: false,
        };
        native::encode(key, &fields, [n; 12]).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn decisions_follow_the_users_rules() {
        let f = fixture();
        let verify = |p: &[u8], src: &str| {
            let ok = f.desk.verify(p, ip(src), NOW)?;
            f.desk.remember(&ok, NOW, &f.log).map(|()| ok)
        };
        let ok = verify(&packet(&f.alice, NOW, 5432, None, 1), "10.1.2.3").unwrap();
        assert_eq!(&*ok.user, "alice");
        assert_eq!(ok.grantee, ip("10.1.2.3"));
        // The requested hour is capped at the service's open_for.
        assert_eq!(ok.grants, vec![(Arc::from("pg"), Duration::from_secs(30))]);

        let cases: Vec<(Vec<u8>, &str, Refusal)> = vec![
            (
                packet(&f.alice, NOW, 5432, None, 2),
                "192.0.2.1",
                Refusal::SourceNotAllowed,
            ),
            (
                packet(&f.alice, NOW, 5432, Some(ip("10.9.9.9")), 3),
                "10.1.2.3",
                Refusal::SourceMismatch,
            ),
            (packet(&f.alice, NOW, 6000, None, 4), "10.1.2.3", Refusal::NotPermitted),
            (
                packet(&f.alice, NOW, 7777, None, 5),
                "10.1.2.3",
                Refusal::UnknownService(Proto::Tcp, 7777),
            ),
            (
                packet(&f.alice, NOW - 500, 5432, None, 7),
                "10.1.2.3",
                Refusal::Packet(Reject::Stale {
                    skew_secs: -500,
                    max_age_secs: 120,
                }),
            ),
            (packet(&f.alice, NOW, 5432, None, 1), "10.1.2.3", Refusal::Replay),
            (
                vec![0u8; 64],
                "10.1.2.3",
                Refusal::Packet(Reject::Malformed("neither a native nor an fwknop packet")),
            ),
        ];
        for (p, src, want) in cases {
            assert_eq!(verify(&p, src), Err(want), "{want:?}");
        }
    }

    #[test]
    fn a_refused_packet_is_not_remembered_as_seen() {
        let f = fixture();
        let p = packet(&f.alice, NOW, 5432, None, 9);
        assert_eq!(f.desk.verify(&p, ip("192.0.2.1"), NOW), Err(Refusal::SourceNotAllowed));
        let ok = f.desk.verify(&p, ip("10.0.0.1"), NOW).unwrap();
        assert_eq!(f.desk.remember(&ok, NOW, &f.log), Ok(()));
    }

    #[test]
    fn a_packet_is_seen_only_once_remembered() {
        let f = fixture();
        let p = packet(&f.alice, NOW, 5432, None, 10);
        // Verified twice (the first time there was no room for its
        // grants), remembered once: accepted, then a replay.
        let first = f.desk.verify(&p, ip("10.0.0.1"), NOW).unwrap();
        let again = f.desk.verify(&p, ip("10.0.0.1"), NOW).unwrap();
        assert_eq!(first.digest, again.digest);
        assert_eq!(f.desk.remember(&again, NOW, &f.log), Ok(()));
        assert_eq!(f.desk.remember(&first, NOW, &f.log), Err(Refusal::Replay));
    }

    #[test]
    fn a_packet_stamped_ahead_is_a_replay_after_restarts_until_its_window_has_passed() {
        let f = fixture();
        let state = f._dir.path().join("state");
        // A sender 90 s ahead; max_age is 120 s.
        let stamped = NOW + 90;
        let p = packet(&f.alice, stamped, 5432, None, 11);
        let ok = f.desk.verify(&p, ip("10.0.0.1"), NOW).unwrap();
        assert_eq!(ok.timestamp, stamped);
        assert_eq!(f.desk.remember(&ok, NOW, &f.log), Ok(()));
        drop(f.log);
        // Restarts: right after, and in the window's last second (packet
        // 120 s behind), the packet is still valid and still a replay.
        for now in [NOW + 1, stamped + 120] {
            let (log, _) = ReplayLog::open(&state, now, f.desk.keep()).unwrap();
            let again = f.desk.verify(&p, ip("10.9.9.9"), now).unwrap();
            assert_eq!(
                f.desk.remember(&again, now, &log),
                Err(Refusal::Replay),
                "at NOW+{}",
                now - NOW
            );
        }
        // One second later the timestamp check refuses it on its own.
        assert!(matches!(
            f.desk.verify(&p, ip("10.0.0.1"), stamped + 121),
            Err(Refusal::Packet(Reject::Stale { .. }))
        ));
    }

    #[test]
    fn a_sender_two_seconds_behind_is_accepted_right_after_a_start() {
        let f = fixture();
        // The log was opened at NOW, as a process starting at NOW does.
        let p = packet(&f.alice, NOW - 2, 5432, None, 12);
        let ok = f.desk.verify(&p, ip("10.0.0.1"), NOW).unwrap();
        assert_eq!(f.desk.remember(&ok, NOW, &f.log), Ok(()));
    }

    #[test]
    fn a_digest_that_cannot_be_written_refuses_the_packet() {
        let f = fixture();
        f.log.fail_writes();
        let p = packet(&f.alice, NOW, 5432, None, 13);
        let ok = f.desk.verify(&p, ip("10.0.0.1"), NOW).unwrap();
        assert_eq!(f.desk.remember(&ok, NOW, &f.log), Err(Refusal::ReplayLogFailed));
        assert_eq!(f.desk.remember(&ok, NOW, &f.log), Err(Refusal::ReplayLogFailed));
        assert!(f.log.is_empty(), "a digest not on disk was recorded");
    }
}
