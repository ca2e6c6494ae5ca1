//! The `[spa]` section, `[user.NAME]` tables, services' `spa_users`,
//! `max_open_for` and `nat_name`, and the `[limits]` on knock and SPA
//! packets per source.
//!
//! Validation loads every user's keys (from a file, relative to the config's
//! directory, or from an environment variable), so `portcullis check`
//! reports an unreadable or malformed key with its key path. Key material
//! is never echoed in an error.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

use super::raw::{RawLimits, RawRequireUsername, RawService, RawSpa, RawUser};
use super::{Service, Validator};
use crate::spa::fwknop::{DigestType, EncryptionMode, FwknopKeys};
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
    /// Refuse packets that name no allow-IP (fwknop `-s`, 0.0.0.0):
    /// fwknopd's `REQUIRE_SOURCE_ADDRESS`.
    pub require_source_address: bool,
    /// The username an fwknop packet must carry (fwknopd's
    /// `REQUIRE_USERNAME`); native packets name no user.
    pub require_username: Option<Arc<str>>,
    /// Unix second from which this user's packets are refused (fwknopd's
    /// `ACCESS_EXPIRE`).
    pub expires_unix: Option<u64>,
}

/// A service's SPA settings beyond `spa_users`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpa {
    /// The longest grant a packet may ask for (fwknop `-f`); at least
    /// `open_for`, which is what a packet that asks for nothing gets.
    pub max_open_for: Duration,
    /// The host name NAT requests may use for this service, lowercased.
    pub nat_name: Option<Arc<str>>,
}

impl std::fmt::Debug for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("User")
            .field("name", &self.name)
            .field("native", &self.native.as_ref().map(|k| k.id()))
            .field("fwknop", &self.fwknop.is_some())
            .field("allow_from", &self.allow_from)
            .field("require_source_match", &self.require_source_match)
            .field("require_source_address", &self.require_source_address)
            .field("require_username", &self.require_username)
            .field("expires_unix", &self.expires_unix)
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
            && self.require_source_address == other.require_source_address
            && self.require_username == other.require_username
            && self.expires_unix == other.expires_unix
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
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            per_source_rate: 20,
            per_source_burst: 40,
            lockout_after: 10,
            lockout_for: Duration::from_secs(300),
            max_tracked_sources: 100_000,
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
        let hmac_digest = self.fwknop_name::<DigestType>(&format!("{base}.hmac_digest"), raw.hmac_digest.as_ref());
        let mode = self.fwknop_name::<EncryptionMode>(&format!("{base}.encryption_mode"), raw.encryption_mode.as_ref());
        let expires_unix = raw.expires.as_ref().and_then(|text| match parse_expires(text) {
            Ok(t) => Some(t),
            Err(e) => {
                self.problem(format!("{base}.expires"), e);
                None
            }
        });
        let require_username = match &raw.require_username {
            None | Some(RawRequireUsername::Flag(false)) => None,
            Some(RawRequireUsername::Flag(true)) => Some(Arc::from(name)),
            // Environment variables arrive as text.
            Some(RawRequireUsername::Name(t)) if t.trim().eq_ignore_ascii_case("false") => None,
            Some(RawRequireUsername::Name(t)) if t.trim().eq_ignore_ascii_case("true") => Some(Arc::from(name)),
            Some(RawRequireUsername::Name(t)) if t.trim().is_empty() => {
                self.problem(format!("{base}.require_username"), "is empty: set true or a username");
                None
            }
            Some(RawRequireUsername::Name(t)) => Some(Arc::from(t.trim())),
        };
        if self.problems.len() > before {
            return None;
        }
        let keys = keys?;
        let fwknop = match keys.fwknop {
            Some(k) => {
                let (digest, mode) = (hmac_digest.unwrap_or(k.hmac_digest()), mode.unwrap_or(k.mode()));
                Some(k.with(digest, mode))
            }
            None if hmac_digest.is_some() || mode.is_some() => {
                let key = if hmac_digest.is_some() {
                    "hmac_digest"
                } else {
                    "encryption_mode"
                };
                self.problem(
                    format!("{base}.{key}"),
                    "applies to fwknop keys, and this user's key file holds none",
                );
                return None;
            }
            None => None,
        };
        Some(User {
            name: name.into(),
            native: keys.native,
            fwknop,
            allow_from,
            require_source_match: raw.require_source_match.unwrap_or(false),
            require_source_address: raw.require_source_address.unwrap_or(false),
            require_username,
            expires_unix,
        })
    }

    fn fwknop_name<T: std::str::FromStr<Err = crate::spa::fwknop::NameError>>(
        &mut self,
        path: &str,
        text: Option<&String>,
    ) -> Option<T> {
        match text?.parse() {
            Ok(v) => Some(v),
            Err(e) => {
                self.problem(path, e.to_string());
                None
            }
        }
    }

    /// A service's `max_open_for` and `nat_name`.
    pub(super) fn service_spa(&mut self, base: &str, raw: &RawService, open_for: Duration) -> Option<ServiceSpa> {
        let path = format!("{base}.max_open_for");
        let max_open_for = self.duration(&path, raw.max_open_for.as_ref(), open_for);
        if max_open_for < open_for {
            self.problem(
                &path,
                format!(
                    "is shorter than open_for ({}): raise it, or lower open_for",
                    humantime::format_duration(open_for)
                ),
            );
            return None;
        }
        let nat_name = match raw.nat_name.as_deref().map(str::trim) {
            None => None,
            Some(n) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)) => {
                Some(Arc::from(n.to_ascii_lowercase()))
            }
            Some(n) => {
                self.problem(
                    format!("{base}.nat_name"),
                    format!("{n:?} is not a host name (letters, digits, '-', '.', '_')"),
                );
                return None;
            }
        };
        Some(ServiceSpa { max_open_for, nat_name })
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

/// Parses `expires`: `2027-01-31` or `01/31/2027` (midnight UTC, fwknopd's
/// `ACCESS_EXPIRE` day), or an RFC 3339 time such as `2027-01-31T12:00:00Z`.
fn parse_expires(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let bad = || {
        format!(
            "{text:?} is not a date (\"2027-01-31\", \"01/31/2027\") or an RFC 3339 time (\"2027-01-31T12:00:00Z\")"
        )
    };
    let iso = match text.split('/').collect::<Vec<_>>().as_slice() {
        [m, d, y] if m.len() <= 2 && d.len() <= 2 && y.len() == 4 => {
            format!("{y}-{:0>2}-{:0>2}T00:00:00Z", m, d)
        }
        _ if text.len() == 10 => format!("{text}T00:00:00Z"),
        _ => text.to_string(),
    };
    let time = humantime::parse_rfc3339_weak(iso.trim_end_matches('Z')).map_err(|_| bad())?;
    time.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expires_spellings() {
        assert_eq!(parse_expires("2027-01-31"), Ok(1_801_353_600));
        assert_eq!(parse_expires("01/31/2027"), Ok(1_801_353_600));
        assert_eq!(parse_expires("1/31/2027"), Ok(1_801_353_600));
        assert_eq!(parse_expires("2027-01-31T12:00:00Z"), Ok(1_801_353_600 + 43_200));
        assert_eq!(parse_expires(" 2027-01-31 12:00:00 "), Ok(1_801_353_600 + 43_200));
        for bad in ["tomorrow", "2027-13-01", "31/01/2027", "", "2027-01-31T12:00:00+02:00"] {
            assert!(parse_expires(bad).is_err(), "{bad}");
        }
    }
}
