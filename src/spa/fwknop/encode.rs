//! Building packets the way the stock client does: the plaintext fields,
//! the inner digest, encryption in the keys' mode and the HMAC tag.
//! Used by `portcullis spa`, the benchmarks and the tests.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};

use base64::engine::general_purpose::STANDARD_NO_PAD;
use base64::Engine as _;

use super::crypto::{self, evp_bytes_to_key};
use super::message::validate_user;
use super::{
    DigestType, FwknopKeys, MAX_MESSAGE_LEN, MAX_USER_LEN, MAX_WIRE_LEN, MSG_ACCESS, MSG_CLIENT_TIMEOUT_ACCESS,
    MSG_CLIENT_TIMEOUT_LOCAL_NAT_ACCESS, MSG_CLIENT_TIMEOUT_NAT_ACCESS, MSG_LOCAL_NAT_ACCESS, MSG_NAT_ACCESS,
    PROTOCOL_VERSION, SALTED, SALTED_B64,
};
use crate::spa::{EncodeError, Fields, NatAccess};

/// The per-packet randomness of the stock client: the KDF salt and the
/// 16-digit random field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketNonce {
    pub salt: [u8; 8],
    /// Written as 16 decimal digits (taken modulo 10^16).
    pub rand16: u64,
}

impl PacketNonce {
    pub fn random(rng: &mut impl rand::CryptoRng) -> Self {
        let mut salt = [0u8; 8];
        rng.fill_bytes(&mut salt);
        Self {
            salt,
            rand16: rng.next_u64() % RAND16_MODULUS,
        }
    }
}

const RAND16_MODULUS: u64 = 10_000_000_000_000_000;

/// What the stock client can add to a packet beyond [`Fields`]: the inner
/// digest type (`-m`) and a NAT access request (`-N`, `--nat-local`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Extras {
    pub digest: DigestType,
    pub nat: Option<NatAccess>,
}

/// Builds the wire string the stock client would send for `user` and
/// `fields` with SHA-256 inner digest, encrypted in `keys`' mode and, when
/// `keys` has one, tagged with their HMAC. Message type 1, or 3 when
/// `fields.duration` is set.
pub fn encode(user: &str, fields: &Fields, keys: &FwknopKeys, nonce: PacketNonce) -> Result<String, EncodeError> {
    encode_with(user, fields, keys, &Extras::default(), nonce)
}

/// [`encode`] with another inner digest, or a NAT access request (message
/// type 2, 4, 5 or 6).
pub fn encode_with(
    user: &str,
    fields: &Fields,
    keys: &FwknopKeys,
    extras: &Extras,
    nonce: PacketNonce,
) -> Result<String, EncodeError> {
    if user.len() > MAX_USER_LEN {
        return Err(EncodeError::User("is longer than 48 bytes, which fwknopd refuses"));
    }
    validate_user(user).map_err(|_| EncodeError::User("must be printable ASCII without \"/\\[]:;|=,+*?<>"))?;
    if fields.close {
        return Err(EncodeError::CloseFwknop);
    }
    let ip = match fields.allow_ip {
        None => Ipv4Addr::UNSPECIFIED,
        Some(IpAddr::V4(ip)) => ip,
        Some(IpAddr::V6(_)) => return Err(EncodeError::Ipv6AllowIp),
    };
    if fields.access.is_empty() {
        return Err(EncodeError::NoAccess);
    }
    let mut message = ip.to_string();
    for &(proto, port) in &fields.access {
        if port == 0 {
            return Err(EncodeError::PortZero);
        }
        write!(message, ",{proto}/{port}").expect("writing to a String cannot fail");
    }
    if message.len() > MAX_MESSAGE_LEN {
        return Err(EncodeError::TooManyPorts {
            max: MAX_MESSAGE_LEN / ",tcp/65535".len(),
        });
    }
    let timeout = match fields.duration {
        None => None,
        Some(d) if d.subsec_nanos() == 0 && (1..=u64::from(u32::MAX)).contains(&d.as_secs()) => Some(d.as_secs()),
        Some(_) => {
            return Err(EncodeError::Duration {
                max_secs: u64::from(u32::MAX),
            })
        }
    };
    let msg_type = match (&extras.nat, timeout.is_some()) {
        (None, false) => MSG_ACCESS,
        (None, true) => MSG_CLIENT_TIMEOUT_ACCESS,
        (Some(n), false) if n.local => MSG_LOCAL_NAT_ACCESS,
        (Some(n), true) if n.local => MSG_CLIENT_TIMEOUT_LOCAL_NAT_ACCESS,
        (Some(_), false) => MSG_NAT_ACCESS,
        (Some(_), true) => MSG_CLIENT_TIMEOUT_NAT_ACCESS,
    };

    let mut plaintext = format!(
        "{:016}:{}:{}:{PROTOCOL_VERSION}:{msg_type}:{}",
        nonce.rand16 % RAND16_MODULUS,
        STANDARD_NO_PAD.encode(user),
        fields.timestamp,
        STANDARD_NO_PAD.encode(&message),
    );
    if let Some(nat) = &extras.nat {
        write!(
            plaintext,
            ":{}",
            STANDARD_NO_PAD.encode(format!("{},{}", nat.host, nat.port))
        )
        .expect("writing to a String cannot fail");
    }
    if let Some(secs) = timeout {
        write!(plaintext, ":{secs}").expect("writing to a String cannot fail");
    }
    let digest = STANDARD_NO_PAD.encode(extras.digest.hash(&[plaintext.as_bytes()]).as_slice());
    plaintext.push(':');
    plaintext.push_str(&digest);
    seal(&plaintext, keys, nonce)
}

/// Encrypts a complete plaintext (digest included) and tags it.
pub(super) fn seal(plaintext: &str, keys: &FwknopKeys, nonce: PacketNonce) -> Result<String, EncodeError> {
    let (key, iv) = evp_bytes_to_key(keys.enc(), &nonce.salt);
    let mut raw = Vec::with_capacity(16 + plaintext.len() + 16);
    raw.extend_from_slice(SALTED);
    raw.extend_from_slice(&nonce.salt);
    raw.extend_from_slice(&crypto::encrypt(keys.mode, &key, &iv, plaintext.as_bytes()));
    let ct_b64 = STANDARD_NO_PAD.encode(&raw);
    let body = ct_b64
        .strip_prefix(SALTED_B64)
        .expect("base64 of Salted__ always starts with U2FsdGVkX1");
    let mut wire = body.to_string();
    if let Some(mac) = &keys.mac {
        wire.push_str(&STANDARD_NO_PAD.encode(mac.tag(SALTED_B64.as_bytes(), body.as_bytes()).as_slice()));
    }
    if wire.len() > MAX_WIRE_LEN {
        return Err(EncodeError::TooLarge {
            len: wire.len(),
            max: MAX_WIRE_LEN,
        });
    }
    Ok(wire)
}

/// [`encode`] with fresh randomness.
pub fn encode_random(
    user: &str,
    fields: &Fields,
    keys: &FwknopKeys,
    rng: &mut impl rand::CryptoRng,
) -> Result<String, EncodeError> {
    encode(user, fields, keys, PacketNonce::random(rng))
}

/// [`encode_with`] with fresh randomness.
pub fn encode_random_with(
    user: &str,
    fields: &Fields,
    keys: &FwknopKeys,
    extras: &Extras,
    rng: &mut impl rand::CryptoRng,
) -> Result<String, EncodeError> {
    encode_with(user, fields, keys, extras, PacketNonce::random(rng))
}
