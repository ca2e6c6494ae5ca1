//! Single Packet Authorization codecs: one datagram in, a verified
//! [`Request`] or a precise [`Reject`] reason out.
//!
//! Two wire formats share these types: our own [`native`] format
//! (AES-256-GCM under a per-user key) and the stock client's
//! [`fwknop`] format (AES-256 in fwknop's modes + an HMAC). [`keyfile`] reads and
//! writes the key files both use.
//!
//! The codecs are pure: no sockets, no clock reads (the time arrives in a
//! [`Window`]), no logging, and nothing of the config. The policy on top of
//! them (users' permissions, what a request may open, the replay cache)
//! is the [`desk`]'s; sockets belong to the sensors.

pub mod desk;
pub mod fwknop;
pub mod keyfile;
pub mod native;

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::step::Proto;

/// Largest datagram either decoder looks at; fwknopd's limit too.
pub const MAX_PACKET_LEN: usize = 1500;

/// How far a packet's timestamp may be from the server clock, either way,
/// when the config says nothing (fwknopd's `MAX_SPA_PACKET_AGE`).
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(120);

/// Which wire format a packet used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    Native,
    Fwknop,
}

impl Format {
    /// Stable label for logs and metrics.
    pub fn as_label(self) -> &'static str {
        match self {
            Format::Native => "native",
            Format::Fwknop => "fwknop",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_label())
    }
}

/// Which decoder a packet is meant for, from its first byte alone, so one
/// UDP port can carry both formats.
///
/// Native packets start with [`native::MAGIC`], which is not a base64
/// character; fwknop packets are base64 text. This is a routing hint, not a
/// check: the decoder still verifies everything.
pub fn detect(packet: &[u8]) -> Option<Format> {
    match packet.first() {
        Some(&native::MAGIC) => Some(Format::Native),
        Some(b) if b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/' => Some(Format::Fwknop),
        _ => None,
    }
}

/// Why a packet was not accepted.
///
/// Precise enough to log (with the source address, under a rate limit) and
/// small enough to count: [`Reject::as_label`] is the metrics label. Details
/// are fixed strings or numbers, never peer bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    /// Not shaped like a packet of the format: too short, bad framing or
    /// characters, or fields that do not parse.
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    #[error("packet of {len} bytes is over the {max} byte limit")]
    TooLarge { len: usize, max: usize },
    /// The packet keeps the `Salted__` prefix (base64 `U2FsdGVkX1`) that fwknop
    /// clients strip; fwknopd refuses such packets so one packet cannot be
    /// sent twice under two spellings.
    #[error("packet starts with U2FsdGVkX1, the prefix fwknop clients strip")]
    OpensslPrefix,
    /// The authentication tag does not match: a forgery, corruption, or a
    /// key that is not the sender's.
    #[error("authentication tag does not match")]
    BadMac,
    /// The tag matched (or there is none) but the ciphertext does not
    /// decrypt to a plausible message: usually a wrong encryption key.
    #[error("decryption failed: {0}")]
    Decrypt(&'static str),
    /// Authentic, but asks for something we do not do (icmp access, a
    /// server_auth field, a newer format version).
    #[error("unsupported: {0}")]
    UnsupportedMode(&'static str),
    /// Authentic, but a command message (fwknop `-C`): commands are never
    /// run.
    #[error("command message (fwknop -C): commands are never run")]
    Command,
    /// A GPG-encrypted fwknop packet (`fwknop -g`) that a user's HMAC key
    /// vouches for: only Rijndael mode is supported.
    #[error("GPG-encrypted packet (fwknop -g): only Rijndael keys are supported")]
    Gpg,
    /// Decrypted, but the inner message digest does not match the message
    /// (under any digest type of its length).
    #[error("inner message digest does not match")]
    DigestMismatch,
    /// No configured key matches the packet's key id.
    #[error("no key matches the packet's key id")]
    UnknownUser,
    /// The timestamp is outside the window; `skew_secs` is packet minus
    /// server clock, positive when the sender's clock is ahead.
    #[error("timestamp is {skew_secs}s off the server clock (window is ±{max_age_secs}s)")]
    Stale { skew_secs: i64, max_age_secs: u64 },
}

impl Reject {
    /// Stable snake_case label for metrics; one per variant.
    pub fn as_label(self) -> &'static str {
        match self {
            Reject::Malformed(_) => "malformed",
            Reject::TooLarge { .. } => "too_large",
            Reject::OpensslPrefix => "openssl_prefix",
            Reject::BadMac => "bad_mac",
            Reject::Decrypt(_) => "decrypt",
            Reject::UnsupportedMode(_) => "unsupported_mode",
            Reject::Command => "command",
            Reject::Gpg => "gpg",
            Reject::DigestMismatch => "digest_mismatch",
            Reject::UnknownUser => "unknown_user",
            Reject::Stale { .. } => "stale",
        }
    }
}

/// An authenticated, fresh access request.
///
/// Authentication says who sent it; whether that user may open these ports
/// is for the caller to decide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub format: Format,
    /// fwknop: the username field inside the packet (the sender chooses it;
    /// the key that verified the packet is what identifies the user).
    /// Native: the user name the key-id lookup returned.
    pub user: String,
    /// Unix seconds, as the sender's clock read them.
    pub timestamp: u64,
    /// Requested protocol and port pairs, in packet order. Empty when the
    /// sender named none (fwknop `none/0`, or a native packet with no
    /// entries): the server decides what that means.
    pub access: Vec<(Proto, u16)>,
    /// The address to admit; `None` means the packet's source address
    /// (fwknop sends `0.0.0.0` for that).
    pub allow_ip: Option<IpAddr>,
    /// How long the sender asks the grant to last (fwknop client timeout,
    /// message type 3); the server caps it.
    pub duration: Option<Duration>,
    /// fwknop NAT access (message types 2, 4, 5, 6): the internal
    /// `host:port` the sender wants to reach. `None` for plain access.
    /// A close request: the grants `access` names end now (native only).
    pub close: bool,
    pub nat: Option<NatAccess>,
    /// Replay-cache key: SHA-256 over a per-format label and the decoded,
    /// authenticated content. fwknop: the decrypted plaintext, so every
    /// base64 spelling of one ciphertext (fwknop's decoder ignores unused
    /// trailing bits) maps to one key. Native: the whole packet, which the
    /// AEAD tag already pins byte for byte. Equal digests mean the same
    /// request was seen before.
    pub digest: [u8; 32],
}

/// A NAT access request (fwknop `-N host,port`, or `--nat-local`): the
/// internal address the sender wants to reach through the gateway.
/// Authenticated, but the sender's words: the server decides which
/// service, if any, that names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatAccess {
    /// An IPv4 address or a host name as sent, lowercased.
    pub host: String,
    pub port: u16,
    /// `--nat-local`: the gateway host itself (`host` is whatever the
    /// client called the gateway).
    pub local: bool,
}

/// What a client asks for: the input of both encoders.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Fields {
    /// Unix seconds; the client reads its clock, the encoder does not.
    pub timestamp: u64,
    pub access: Vec<(Proto, u16)>,
    /// `None`: admit whatever source address the packet arrives from.
    pub allow_ip: Option<IpAddr>,
    /// Requested grant length, whole seconds, at least one.
    pub duration: Option<Duration>,
    /// Ask for the grants `access` names to end now instead (native
    /// format only): `portcullis close`.
    pub close: bool,
}

/// Why a packet could not be built. Raised on the client side, so messages
/// say what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("user name {0}")]
    User(&'static str),
    #[error("the fwknop format carries IPv4 allow addresses only; use the native format for IPv6")]
    Ipv6AllowIp,
    #[error("no port requested: the fwknop format needs at least one proto/port")]
    NoAccess,
    #[error("port 0 cannot be requested")]
    PortZero,
    #[error("too many ports: at most {max} fit in one packet")]
    TooManyPorts { max: usize },
    #[error("duration must be between 1s and {max_secs}s in whole seconds")]
    Duration { max_secs: u64 },
    #[error("packet would be {len} bytes, over the {max} byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("the fwknop format has no close request: close with a native key")]
    CloseFwknop,
}

/// A key that cannot be used as given. Never carries key bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("{what} is {len} bytes; it must be {expected}")]
    Length {
        what: &'static str,
        len: usize,
        expected: &'static str,
    },
    #[error("the fwknop encryption and HMAC keys are identical (fwknop refuses that too); generate a new pair")]
    SameKeys,
}

/// The server's clock reading and how far a packet's timestamp may stray
/// from it in either direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub now_unix: u64,
    /// Compared in whole seconds.
    pub max_age: Duration,
}

impl Window {
    pub fn new(now_unix: u64, max_age: Duration) -> Self {
        Self { now_unix, max_age }
    }

    /// [`check_age`] against this window.
    pub fn check(self, timestamp: u64) -> Result<(), Reject> {
        check_age(timestamp, self.now_unix, self.max_age)
    }
}

/// Rejects a timestamp more than `max_age` (whole seconds) from `now_unix`,
/// in the past or in the future: a packet from the future could otherwise
/// be replayed once its time comes, after the replay cache forgot it.
pub fn check_age(timestamp: u64, now_unix: u64, max_age: Duration) -> Result<(), Reject> {
    let max_age_secs = max_age.as_secs();
    if timestamp.abs_diff(now_unix) > max_age_secs {
        return Err(Reject::Stale {
            skew_secs: skew_secs(timestamp, now_unix),
            max_age_secs,
        });
    }
    Ok(())
}

/// Packet time minus server time in seconds, saturating: positive when the
/// sender's clock is ahead. For logging clock skew.
pub fn skew_secs(timestamp: u64, now_unix: u64) -> i64 {
    let skew = i128::from(timestamp) - i128::from(now_unix);
    i64::try_from(skew).unwrap_or(if skew < 0 { i64::MIN } else { i64::MAX })
}

/// SHA-256 over a per-format label and `content`; the label keeps the two
/// formats' replay keys apart even if their bytes ever coincided.
fn replay_digest(label: &[u8], content: &[u8]) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(label);
    hash.update(content);
    hash.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn age_window_is_inclusive_and_two_sided() {
        let max = Duration::from_secs(120);
        assert_eq!(check_age(1000, 1000, max), Ok(()));
        assert_eq!(check_age(880, 1000, max), Ok(()));
        assert_eq!(check_age(1120, 1000, max), Ok(()));
        assert_eq!(
            check_age(879, 1000, max),
            Err(Reject::Stale {
                skew_secs: -121,
                max_age_secs: 120
            })
        );
        assert_eq!(
            check_age(1121, 1000, max),
            Err(Reject::Stale {
                skew_secs: 121,
                max_age_secs: 120
            })
        );
        assert_eq!(
            Window::new(1000, max).check(5000).map_err(Reject::as_label),
            Err("stale")
        );
    }

    #[test]
    fn skew_saturates() {
        assert_eq!(skew_secs(10, 4), 6);
        assert_eq!(skew_secs(4, 10), -6);
        assert_eq!(skew_secs(u64::MAX, 0), i64::MAX);
        assert_eq!(skew_secs(0, u64::MAX), i64::MIN);
        assert!(check_age(u64::MAX, 0, Duration::MAX).is_ok());
    }

    #[test]
    fn labels_are_stable_snake_case() {
        let all = [
            Reject::Malformed("x"),
            Reject::TooLarge { len: 2, max: 1 },
            Reject::OpensslPrefix,
            Reject::BadMac,
            Reject::Decrypt("x"),
            Reject::UnsupportedMode("x"),
            Reject::Command,
            Reject::Gpg,
            Reject::DigestMismatch,
            Reject::UnknownUser,
            Reject::Stale {
                skew_secs: 1,
                max_age_secs: 0,
            },
        ];
        let labels: Vec<_> = all.iter().map(|r| r.as_label()).collect();
        assert_eq!(
            labels,
            [
                "malformed",
                "too_large",
                "openssl_prefix",
                "bad_mac",
                "decrypt",
                "unsupported_mode",
                "command",
                "gpg",
                "digest_mismatch",
                "unknown_user",
                "stale"
            ]
        );
        assert_eq!(Format::Native.as_label(), "native");
        assert_eq!(Format::Fwknop.to_string(), "fwknop");
    }

    #[test]
    fn detect_routes_by_first_byte() {
        assert_eq!(detect(&[native::MAGIC, 1]), Some(Format::Native));
        assert_eq!(detect(b"9/NpftNg"), Some(Format::Fwknop));
        assert_eq!(detect(b"+abc"), Some(Format::Fwknop));
        assert_eq!(detect(b""), None);
        assert_eq!(detect(b"\0abc"), None);
        assert_eq!(
            detect(b"GET / HTTP/1.1"),
            Some(Format::Fwknop),
            "a hint only; the decoder rejects it"
        );
    }
}
