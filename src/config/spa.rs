//! The `[spa]` section, `[user.NAME]` tables, services' `spa_users`,
//! `max_open_for` and `nat_name`, and the `[limits]` on knock and SPA
//! packets per source.
//!
//! Validation loads every user's keys (from a file, relative to the config's
//! directory, or from an environment variable), so `portcullis check`
//! reports an unreadable or malformed key with its key path. Key material
//! is never echoed in an error.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use sha2::{Digest as _, Sha256};
use zeroize::Zeroizing;

use super::raw::{RawLimits, RawRequireUsername, RawService, RawSpa, RawUser};
use super::{Service, Validator};
use crate::secret::read_private;
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
    /// A TCP listener for `fwknop -P tcp`: one packet per connection.
    pub tcp_listen: Option<SocketAddr>,
    /// A TCP listener for `fwknop -P http`: the packet in a request line.
    pub http_listen: Option<SocketAddr>,
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
    /// Where the keys came from, for messages.
    pub key_source: KeySource,
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

/// Where a user's keys were read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// `key_file`, resolved from the config's directory.
    File(PathBuf),
    /// `key_env`: the variable's name.
    Env(String),
}

impl KeySource {
    /// The setting in `[user.NAME]` that names this source.
    pub fn setting(&self) -> &'static str {
        match self {
            KeySource::File(_) => "key_file",
            KeySource::Env(_) => "key_env",
        }
    }
}

impl std::fmt::Display for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySource::File(path) => write!(f, "{}", path.display()),
            KeySource::Env(var) => write!(f, "environment variable {var}"),
        }
    }
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
            && self.key_source == other.key_source
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

/// Shortest fwknop key accepted. fwknop takes passphrases of any length,
/// and a short one falls to a dictionary; `fwknop --key-gen` makes 32- and
/// 64-byte keys.
pub const MIN_FWKNOP_KEY_LEN: usize = 16;

/// Reads a key file (see [`crate::secret::read_private`]) as text; the
/// text is wiped when dropped. Also returns a warning to log, if any.
pub(super) fn read_key_file(path: &Path) -> Result<(Zeroizing<String>, Option<String>), String> {
    let file = read_private(path).map_err(|e| e.to_string())?;
    let text = std::str::from_utf8(&file.bytes).map_err(|_| format!("{} is not UTF-8 text", path.display()))?;
    Ok((Zeroizing::new(text.to_string()), file.warning))
}

/// Why fwknop keys are too short to use, if they are.
fn short_fwknop_key(keys: &FwknopKeys) -> Option<String> {
    let short = [("encryption key", Some(keys.enc())), ("HMAC key", keys.hmac())]
        .into_iter()
        .find_map(|(what, key)| key.filter(|k| k.len() < MIN_FWKNOP_KEY_LEN).map(|k| (what, k.len())))?;
    Some(format!(
        "the fwknop {} is {} bytes; keys need at least {MIN_FWKNOP_KEY_LEN}: make new ones with `fwknop --key-gen` \
         (or `portcullis keygen --kind fwknop`)",
        short.0, short.1
    ))
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
        let stream = |v: &mut Self, key: &str, raw: &Option<String>| match raw.as_deref().map(str::trim) {
            None => Ok(None),
            Some(text) => text.parse::<SocketAddr>().map(Some).map_err(|_| {
                v.problem(
                    format!("spa.{key}"),
                    format!(
                        "{text:?} is not IP:PORT (e.g. \"0.0.0.0:{}\")",
                        crate::spa::fwknop::DEFAULT_PORT
                    ),
                );
            }),
        };
        let tcp_listen = stream(self, "tcp_listen", &raw.tcp_listen);
        let http_listen = stream(self, "http_listen", &raw.http_listen);
        if let (Ok(Some(tcp)), Ok(Some(http))) = (&tcp_listen, &http_listen) {
            if tcp == http && tcp.port() != 0 {
                self.problem(
                    "spa.http_listen",
                    format!("{http} is also spa.tcp_listen: give each its own port"),
                );
            }
        }
        Some(Spa {
            listen: listen?,
            max_age,
            tcp_listen: tcp_listen.ok()?,
            http_listen: http_listen.ok()?,
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
                let key = format!("{base}.key_file");
                let path = self.base.join(file);
                match read_key_file(&path) {
                    Ok((text, warning)) => {
                        if let Some(w) = warning {
                            self.warning(key.clone(), w.to_string());
                        }
                        Some((key, KeySource::File(path), text))
                    }
                    Err(e) => {
                        self.problem(key, e);
                        None
                    }
                }
            }
            (None, Some(var)) => match std::env::var(var) {
                Ok(t) => Some((
                    format!("{base}.key_env"),
                    KeySource::Env(var.clone()),
                    Zeroizing::new(t),
                )),
                Err(_) => {
                    self.problem(
                        format!("{base}.key_env"),
                        format!("environment variable {var} is not set"),
                    );
                    None
                }
            },
        };
        let keys = text.and_then(|(path, source, text)| match keyfile::parse(&text) {
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
                if let Some(short) = k.fwknop.as_ref().and_then(short_fwknop_key) {
                    self.problem(&path, short);
                    return None;
                }
                Some((k, source))
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
        let (keys, key_source) = keys?;
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
            key_source,
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
                if let Some(other) = ids.insert(k.id(), u) {
                    self.problem(
                        format!("user.{}.{}", u.name, u.key_source.setting()),
                        format!(
                            "the same native key as user {} ({} and {}): each user needs a key of their own \
                             (`portcullis keygen`)",
                            other.name, other.key_source, u.key_source
                        ),
                    );
                }
            }
        }
        // fwknop packets go to the first user whose HMAC key verifies them,
        // so a key two users share would hand one's packets to the other.
        // Keys are matched by a digest that lives only for this check.
        let mut seen = std::collections::HashMap::new();
        for u in users {
            let Some(keys) = &u.fwknop else { continue };
            let kinds = [("HMAC key", keys.hmac()), ("encryption key", Some(keys.enc()))];
            for (which, key) in kinds.into_iter().filter_map(|(w, k)| Some((w, k?))) {
                let digest: [u8; 32] = Sha256::new()
                    .chain_update(which)
                    .chain_update(key.expose())
                    .finalize()
                    .into();
                if let Some(other) = seen.insert(digest, u) {
                    self.problem(
                        format!("user.{}.{}", u.name, u.key_source.setting()),
                        format!(
                            "the same fwknop {which} as user {} ({} and {}): each user needs keys of their own \
                             (`fwknop --key-gen` or `portcullis keygen --kind fwknop`)",
                            other.name, other.key_source, u.key_source
                        ),
                    );
                    break;
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
        for (key, addr) in [("spa.tcp_listen", spa.tcp_listen), ("spa.http_listen", spa.http_listen)] {
            if let Some(addr) = addr {
                self.own_endpoint(
                    key,
                    Step {
                        proto: Proto::Tcp,
                        addr,
                    },
                    services,
                );
            }
        }
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

    use std::os::unix::fs::PermissionsExt as _;
    use std::path::Path;

    use crate::config::{load_with_env, validate_in, Config, ConfigError};

    const FW_ENC: &str = "GWn6QLFeR8Ce1tYl//zGRC5rYV2w9dJMz0yUcBOtTAc=";
    const FW_HMAC: &str = "Wd73/Nyj3iMdI92SoJoZB/deL1Ktsy7lAfmx9cRlA+yicTgdjehaf+BUQN77RLO+7WfZG8wr/Mx5J8gk3Saj6g==";
    const OTHER_ENC: &str = "Zm9yIHRlc3RzIG9ubHk6IGd1YXJkcyBub3RoaW5nISE=";
    const OTHER_HMAC: &str = "dGVzdCBmaXh0dXJlIGhtYWMga2V5OiBndWFyZHMgbm90aGluZywgdXNlZCBvbmx5IGJ5IHRoZSBjb25maWcgdGVzdHMgaW4gdGhpcyByZXBvISE=";

    fn key(dir: &Path, name: &str, text: &str, mode: u32) {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// A config whose service lets in `users`, each with `NAME.key`.
    fn load(dir: &Path, users: &[&str]) -> Result<Config, ConfigError> {
        let mut text = String::from("[spa]\nlisten = \"127.0.0.1:0\"\n");
        let list: Vec<String> = users.iter().map(|u| format!("{u:?}")).collect();
        text.push_str(&format!(
            "[service.pg]\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:1\"\nspa_users = [{}]\n",
            list.join(", ")
        ));
        for u in users {
            text.push_str(&format!("[user.{u}]\nkey_file = \"{u}.key\"\n"));
        }
        let path = dir.join("proxy.toml");
        std::fs::write(&path, text).unwrap();
        validate_in(&load_with_env(&path, Default::default())?, dir)
    }

    fn problems(err: ConfigError) -> Vec<(String, String)> {
        err.problems.into_iter().map(|p| (p.path, p.message)).collect()
    }

    #[test]
    fn a_key_file_other_users_can_access_is_refused_and_a_group_one_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!("KEY_BASE64: {FW_ENC}\nHMAC_KEY_BASE64: {FW_HMAC}\n");
        let path = dir.path().join("fw.key");
        for mode in [0o644, 0o604, 0o602, 0o666] {
            key(dir.path(), "fw.key", &text, mode);
            let err = load(dir.path(), &["fw"]).unwrap_err();
            let got = problems(err);
            assert_eq!(got.len(), 1, "{got:?}");
            assert_eq!(got[0].0, "user.fw.key_file");
            assert!(got[0].1.starts_with(&format!("{} is ", path.display())), "{}", got[0].1);
            assert!(
                got[0].1.ends_with(&format!("run `chmod 600 {}`", path.display())),
                "{}",
                got[0].1
            );
            assert!(!got[0].1.contains("GWn6"), "key material in {}", got[0].1);
        }
        for mode in [0o600, 0o400, 0o640, 0o660] {
            key(dir.path(), "fw.key", &text, mode);
            let config = load(dir.path(), &["fw"]).unwrap();
            assert_eq!(config.users[0].key_source, super::KeySource::File(path.clone()));
        }
    }

    #[test]
    fn short_fwknop_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (
                format!("KEY: x\nHMAC_KEY_BASE64: {FW_HMAC}\n"),
                "encryption key is 1 bytes",
            ),
            (
                format!("KEY: fifteen-bytes!!\nHMAC_KEY_BASE64: {FW_HMAC}\n"),
                "encryption key is 15 bytes",
            ),
            (
                format!("KEY_BASE64: {FW_ENC}\nHMAC_KEY: short\n"),
                "HMAC key is 5 bytes",
            ),
            (
                format!("KEY_BASE64: c2hvcnQ=\nHMAC_KEY_BASE64: {FW_HMAC}\n"),
                "encryption key is 5 bytes",
            ),
        ];
        for (text, want) in cases {
            key(dir.path(), "fw.key", &text, 0o600);
            let got = problems(load(dir.path(), &["fw"]).unwrap_err());
            assert_eq!(got.len(), 1, "{got:?}");
            assert_eq!(got[0].0, "user.fw.key_file");
            assert!(got[0].1.contains(want), "{text}: {}", got[0].1);
            assert!(got[0].1.contains("at least 16"), "{}", got[0].1);
        }
        key(
            dir.path(),
            "fw.key",
            "KEY: sixteen-bytes-ok\nHMAC_KEY: sixteen-bytes-ok2\n",
            0o600,
        );
        load(dir.path(), &["fw"]).expect("16-byte passphrases pass");
    }

    #[test]
    fn users_sharing_fwknop_keys_are_refused_naming_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let mine = format!("KEY_BASE64: {FW_ENC}\nHMAC_KEY_BASE64: {FW_HMAC}\n");
        let cases = [
            (mine.clone(), "HMAC key"),
            (
                format!("KEY_BASE64: {OTHER_ENC}\nHMAC_KEY_BASE64: {FW_HMAC}\n"),
                "HMAC key",
            ),
            (
                format!("KEY_BASE64: {FW_ENC}\nHMAC_KEY_BASE64: {OTHER_HMAC}\n"),
                "encryption key",
            ),
        ];
        for (theirs, which) in cases {
            key(dir.path(), "alice.key", &mine, 0o600);
            key(dir.path(), "bob.key", &theirs, 0o600);
            let got = problems(load(dir.path(), &["alice", "bob"]).unwrap_err());
            assert_eq!(got.len(), 1, "{got:?}");
            assert_eq!(got[0].0, "user.bob.key_file");
            let (a, b) = (dir.path().join("alice.key"), dir.path().join("bob.key"));
            let want = format!(
                "the same fwknop {which} as user alice ({} and {})",
                a.display(),
                b.display()
            );
            assert!(got[0].1.starts_with(&want), "{}", got[0].1);
        }
        key(
            dir.path(),
            "bob.key",
            &format!("KEY_BASE64: {OTHER_ENC}\nHMAC_KEY_BASE64: {OTHER_HMAC}\n"),
            0o600,
        );
        assert_eq!(load(dir.path(), &["alice", "bob"]).unwrap().users.len(), 2);
    }

    #[test]
    fn users_sharing_a_native_key_are_refused_naming_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let text = "PORTCULLIS_KEY_BASE64: AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n";
        key(dir.path(), "alice.key", text, 0o600);
        key(dir.path(), "bob.key", text, 0o600);
        let got = problems(load(dir.path(), &["alice", "bob"]).unwrap_err());
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].0, "user.bob.key_file");
        assert!(
            got[0].1.contains(&format!(
                "{} and {}",
                dir.path().join("alice.key").display(),
                dir.path().join("bob.key").display()
            )),
            "{}",
            got[0].1
        );
    }
}
