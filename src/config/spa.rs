//! The `[spa]` section, `[user.NAME]` tables, services' `spa_users`, and
//! the `[limits]` on knock and SPA packets per source.
//!
//! Validation loads every user's keys (from a file, relative to the config's
//! directory, or from an environment variable), so `portcullis check`
//! reports an unreadable or malformed key with its key path. Key material
//! is never echoed in an error.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

use super::raw::{RawLimits, RawSpa, RawUser};
use super::{Service, Validator};
use crate::spa::fwknop::FwknopKeys;
use crate::spa::keyfile;
use crate::spa::native::NativeKey;
use crate::step::{Proto, Step};

/// Where the SPA listener binds when `[spa]` names no address (fwknop's port).
pub const DEFAULT_SPA_LISTEN: &str = "0.0.0.0:62201";

/// The widest SPA timestamp window: packets stay replayable (and their
/// digests must be kept) for as long as it is.
pub const MAX_SPA_AGE: Duration = Duration::from_secs(24 * 3600);

/// The validated `[spa]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spa {
    pub listen: SocketAddr,
    /// How far a packet's timestamp may be from our clock, either way.
    pub max_age: Duration,
}

/// A user who may send SPA packets.
#[derive(Clone)]
pub struct User {
    pub name: Arc<str>,
    pub native: Option<NativeKey>,
    pub fwknop: Option<FwknopKeys>,
    /// Where this user's packets may come from; empty means anywhere.
    pub allow_from: Vec<IpNet>,
    /// Refuse packets whose allow-IP differs from their source address.
    pub require_source_match: bool,
}

impl std::fmt::Debug for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("User")
            .field("name", &self.name)
            .field("native", &self.native.as_ref().map(|k| k.id()))
            .field("fwknop", &self.fwknop.is_some())
            .field("allow_from", &self.allow_from)
            .field("require_source_match", &self.require_source_match)
            .finish()
    }
}

impl PartialEq for User {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
            && self.native.as_ref().map(|k| k.id()) == other.native.as_ref().map(|k| k.id())
            && self.fwknop == other.fwknop
            && self.allow_from == other.allow_from
            && self.require_source_match == other.require_source_match
    }
}

impl Eq for User {}

impl User {
    /// Whether a packet from `source` may come from this user.
    pub fn may_send_from(&self, source: IpAddr) -> bool {
        self.allow_from.is_empty() || self.allow_from.iter().any(|net| net.contains(&source))
    }
}

/// Per-source limits on knock and SPA packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Sustained packets per second one source may send to knock and SPA
    /// ports; more are ignored.
    pub per_source_rate: u32,
    /// Packets one source may send in a burst.
    pub per_source_burst: u32,
    /// Bad packets (wrong knock steps, trap ports, rejected SPA packets)
    /// after which a source is ignored for `lockout_for`.
    pub lockout_after: u32,
    pub lockout_for: Duration,
    /// Sources tracked at once by the rate limiter and the lockout table;
    /// sources are spoofable, so the memory must be bounded.
    pub max_tracked_sources: usize,
    /// Leading bits of an IPv6 source that rate limits and lockouts key
    /// on (grants stay per address): whoever holds a /64 holds all of it.
    pub ipv6_prefix: u8,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            per_source_rate: 20,
            per_source_burst: 40,
            lockout_after: 10,
            lockout_for: Duration::from_secs(300),
            max_tracked_sources: 100_000,
            ipv6_prefix: 64,
        }
    }
}

fn small(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl Validator {
    pub(super) fn limits(&mut self, raw: &RawLimits) -> Limits {
        let d = Limits::default();
        Limits {
            per_source_rate: small(self.count(
                "limits.per_source_rate",
                raw.per_source_rate.as_ref(),
                d.per_source_rate as usize,
            )),
            per_source_burst: small(self.count(
                "limits.per_source_burst",
                raw.per_source_burst.as_ref(),
                d.per_source_burst as usize,
            )),
            lockout_after: small(self.count(
                "limits.lockout_after",
                raw.lockout_after.as_ref(),
                d.lockout_after as usize,
            )),
            lockout_for: self.duration("limits.lockout_for", raw.lockout_for.as_ref(), d.lockout_for),
            max_tracked_sources: self.count(
                "limits.max_tracked_sources",
                raw.max_tracked_sources.as_ref(),
                d.max_tracked_sources,
            ),
            ipv6_prefix: self.ipv6_prefix(raw.ipv6_prefix.as_ref(), d.ipv6_prefix),
        }
    }

    fn ipv6_prefix(&mut self, raw: Option<&super::raw::RawCount>, default: u8) -> u8 {
        let bits = self.count("limits.ipv6_prefix", raw, usize::from(default));
        match u8::try_from(bits) {
            Ok(b) if b <= 128 => b,
            _ => {
                self.problem(
                    "limits.ipv6_prefix",
                    format!("{bits} is not a prefix length: 1 to 128 (64 keys on a /64)"),
                );
                default
            }
        }
    }

    pub(super) fn spa(&mut self, raw: &RawSpa) -> Option<Spa> {
        let text = raw.listen.as_deref().unwrap_or(DEFAULT_SPA_LISTEN);
        let listen = match text.trim().parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.problem(
                    "spa.listen",
                    format!("{text:?} is not IP:PORT (e.g. \"{DEFAULT_SPA_LISTEN}\")"),
                );
                None
            }
        };
        let max_age = self.duration_at_most(
            "spa.max_age",
            raw.max_age.as_ref(),
            crate::spa::DEFAULT_MAX_AGE,
            MAX_SPA_AGE,
        );
        Some(Spa {
            listen: listen?,
            max_age,
        })
    }

    pub(super) fn user(&mut self, name: &str, raw: &RawUser) -> Option<User> {
        let base = format!("user.{name}");
        let before = self.problems.len();
        let text = match (&raw.key_file, &raw.key_env) {
            (Some(_), Some(_)) => {
                self.problem(&base, "set key_file or key_env, not both");
                None
            }
            (None, None) => {
                self.problem(
                    &base,
                    "no key: set key_file (a file from `portcullis keygen` or `fwknop --key-gen`) or key_env",
                );
                None
            }
            (Some(file), None) => {
                let path = self.base.join(file);
                match std::fs::read_to_string(&path) {
                    Ok(t) => Some((format!("{base}.key_file"), t)),
                    Err(e) => {
                        self.problem(
                            format!("{base}.key_file"),
                            format!("cannot read {}: {e}", path.display()),
                        );
                        None
                    }
                }
            }
            (None, Some(var)) => match std::env::var(var) {
                Ok(t) => Some((format!("{base}.key_env"), t)),
                Err(_) => {
                    self.problem(
                        format!("{base}.key_env"),
                        format!("environment variable {var} is not set"),
                    );
                    None
                }
            },
        };
        let keys = text.and_then(|(path, text)| match keyfile::parse(&text) {
            Ok(k) => {
                if k.fwknop.as_ref().is_some_and(|f| f.hmac().is_none()) {
                    self.problem(
                        &path,
                        "fwknop keys without HMAC_KEY_BASE64 are refused: packets would be accepted without \
                         authentication (make keys with `fwknop --key-gen` and send with --use-hmac)",
                    );
                    return None;
                }
                if k.native.is_none() && k.fwknop.is_none() {
                    self.problem(&path, "holds no key");
                    return None;
                }
                Some(k)
            }
            Err(e) => {
                self.problem(&path, e.to_string());
                None
            }
        });
        let mut allow_from = Vec::new();
        for (i, text) in raw.allow_from.iter().enumerate() {
            let parsed = text
                .trim()
                .parse::<IpNet>()
                .or_else(|_| text.trim().parse::<IpAddr>().map(IpNet::from));
            match parsed {
                Ok(net) => allow_from.push(net.trunc()),
                Err(_) => self.problem(
                    format!("{base}.allow_from[{i}]"),
                    format!("{text:?} is not an address or CIDR block (e.g. \"203.0.113.0/24\")"),
                ),
            }
        }
        if self.problems.len() > before {
            return None;
        }
        let keys = keys?;
        Some(User {
            name: name.into(),
            native: keys.native,
            fwknop: keys.fwknop,
            allow_from,
            require_source_match: raw.require_source_match.unwrap_or(false),
        })
    }

    /// Every `spa_users` entry names a user, and SPA users need `[spa]`.
    pub(super) fn spa_users(&mut self, services: &[Service], users: &[User], spa: Option<&Spa>, user_names: &[&str]) {
        for s in services {
            for (i, u) in s.spa_users.iter().enumerate() {
                if !user_names.contains(&&**u) {
                    self.problem(
                        format!("service.{}.spa_users[{i}]", s.name),
                        format!("no user {u:?}: add a [user.{u}] table with its key_file"),
                    );
                }
            }
            if !s.spa_users.is_empty() && spa.is_none() {
                self.problem(
                    format!("service.{}.spa_users", s.name),
                    "SPA users need an [spa] section with the listen address",
                );
            }
        }
        let mut ids = std::collections::HashMap::new();
        for u in users {
            if let Some(k) = &u.native {
                if let Some(other) = ids.insert(k.id(), u.name.clone()) {
                    self.problem(
                        format!("user.{}.key_file", u.name),
                        format!("the same native key as user {other}: each user needs a key of their own"),
                    );
                }
            }
        }
    }

    /// The SPA port must not be a guarded listener's or a UDP knock step's.
    pub(super) fn spa_endpoint(&mut self, spa: &Spa, services: &[Service]) {
        let ours = Step {
            proto: Proto::Udp,
            addr: spa.listen,
        };
        self.own_endpoint("spa.listen", ours, services);
    }
}
