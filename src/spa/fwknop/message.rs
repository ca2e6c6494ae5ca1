//! The decrypted plaintext of an fwknop packet: its colon-separated
//! fields (random, user, timestamp, version, type, message, NAT target,
//! timeout, digest) parsed and checked, with fwknopd's limits. Owns nothing
//! cryptographic but the check of the inner digest against the text.

use std::net::Ipv4Addr;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD_NO_PAD;
use base64::Engine as _;

use super::{
    DigestType, LENIENT, MAX_NAT_FIELD_LEN, MSG_ACCESS, MSG_CLIENT_TIMEOUT_ACCESS, MSG_CLIENT_TIMEOUT_LOCAL_NAT_ACCESS,
    MSG_CLIENT_TIMEOUT_NAT_ACCESS, MSG_COMMAND, MSG_LOCAL_NAT_ACCESS, MSG_NAT_ACCESS,
};
use crate::secret::ct_eq;
use crate::spa::{NatAccess, Reject};
use crate::step::Proto;

#[derive(Debug, PartialEq, Eq)]
pub(super) struct Message {
    pub(super) user: String,
    pub(super) timestamp: u64,
    pub(super) access: Vec<(Proto, u16)>,
    pub(super) allow_ip: Option<Ipv4Addr>,
    pub(super) duration: Option<Duration>,
    pub(super) nat: Option<NatAccess>,
}

/// Parses `rand:user:timestamp:version:type:message[:…]:digest`.
pub(super) fn parse_plaintext(plaintext: &[u8]) -> Result<Message, Reject> {
    if !plaintext.iter().all(|b| (0x20..0x7f).contains(b)) {
        return Err(Reject::Malformed("plaintext is not printable ASCII"));
    }
    let plaintext = std::str::from_utf8(plaintext).expect("checked to be ASCII");
    let (encoded, digest) = plaintext.rsplit_once(':').ok_or(Reject::Malformed("no digest field"))?;
    verify_digest(encoded, digest)?;

    let fields: Vec<&str> = encoded.split(':').collect();
    let [rand, user, timestamp, version, msg_type, message, extra @ ..] = fields.as_slice() else {
        return Err(Reject::Malformed("fewer than 7 fields"));
    };
    if rand.len() != 16 {
        return Err(Reject::Malformed("random field is not 16 digits"));
    }
    let user = parse_user(user)?;
    let timestamp = parse_decimal(timestamp, 12).ok_or(Reject::Malformed("timestamp is not a number"))?;
    if version.is_empty() || version.len() > 8 {
        return Err(Reject::Malformed("bad version field"));
    }
    let msg_type = match msg_type.as_bytes() {
        [d @ b'0'..=b'9'] => d - b'0',
        _ => return Err(Reject::Malformed("message type is not one digit")),
    };
    // What follows the message: [nat_access] [server_auth] [client_timeout],
    // each present or absent by message type.
    let (nat, local, timeout) = match msg_type {
        MSG_COMMAND => return Err(Reject::Command),
        MSG_ACCESS => (false, false, false),
        MSG_CLIENT_TIMEOUT_ACCESS => (false, false, true),
        MSG_NAT_ACCESS => (true, false, false),
        MSG_CLIENT_TIMEOUT_NAT_ACCESS => (true, false, true),
        MSG_LOCAL_NAT_ACCESS => (true, true, false),
        MSG_CLIENT_TIMEOUT_LOCAL_NAT_ACCESS => (true, true, true),
        _ => return Err(Reject::Malformed("unknown message type")),
    };
    let expected = usize::from(nat) + usize::from(timeout);
    if extra.len() == expected + 1 {
        return Err(Reject::UnsupportedMode("server_auth field"));
    }
    if extra.len() != expected {
        return Err(Reject::Malformed("wrong number of fields for the message type"));
    }
    let nat = match nat {
        true => Some(parse_nat(extra[0], local)?),
        false => None,
    };
    let duration = match timeout {
        true => {
            let field = extra[extra.len() - 1];
            let secs = parse_decimal(field, 10).ok_or(Reject::Malformed("client timeout is not a number"))?;
            // fwknopd treats 0 as "not given".
            (secs > 0).then(|| Duration::from_secs(secs))
        }
        false => None,
    };
    let AccessMessage { allow_ip, access } = parse_access(message)?;
    Ok(Message {
        user,
        timestamp,
        access,
        allow_ip,
        duration,
        nat,
    })
}

/// The inner digest, its type guessed from its length as fwknopd does:
/// SHA-256 and SHA3-256 share a length, as do SHA-512 and SHA3-512, so
/// SHA-3 is tried when SHA-2 does not match. Compared as canonical base64
/// text, in constant time.
pub(super) fn verify_digest(encoded: &str, digest: &str) -> Result<DigestType, Reject> {
    let candidates: &[DigestType] = match digest.len() {
        22 => &[DigestType::Md5],
        27 => &[DigestType::Sha1],
        43 => &[DigestType::Sha256, DigestType::Sha3_256],
        64 => &[DigestType::Sha384],
        86 => &[DigestType::Sha512, DigestType::Sha3_512],
        _ => return Err(Reject::Malformed("digest field has no known length")),
    };
    for &kind in candidates {
        let mut expected = [0u8; 88];
        let n = STANDARD_NO_PAD
            .encode_slice(kind.hash(&[encoded.as_bytes()]).as_slice(), &mut expected)
            .expect("88 characters hold any digest");
        if ct_eq(&expected[..n], digest.as_bytes()) {
            return Ok(kind);
        }
    }
    Err(Reject::DigestMismatch)
}

pub(super) fn parse_user(field: &str) -> Result<String, Reject> {
    if field.is_empty() || field.len() > 64 {
        return Err(Reject::Malformed("username field is empty or too long"));
    }
    let raw = LENIENT
        .decode(field)
        .map_err(|_| Reject::Malformed("username is not valid base64"))?;
    let user = String::from_utf8(raw).map_err(|_| Reject::Malformed("username is not printable ASCII"))?;
    validate_user(&user).map_err(Reject::Malformed)?;
    Ok(user)
}

/// fwknop's username rule (`lib/fko_user.c`): printable ASCII without the
/// characters its formats use as separators.
pub(super) fn validate_user(user: &str) -> Result<(), &'static str> {
    if user.is_empty() {
        return Err("username is empty");
    }
    if !user
        .bytes()
        .all(|b| (0x20..0x7f).contains(&b) && !b"\"/\\[]:;|=,+*?<>".contains(&b))
    {
        return Err("username has a character fwknop forbids");
    }
    Ok(())
}

pub(super) fn parse_decimal(field: &str, max_digits: usize) -> Option<u64> {
    if field.is_empty() || field.len() > max_digits || !field.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    field.parse().ok()
}

pub(super) struct AccessMessage {
    /// `None` for `0.0.0.0`: use the packet's source.
    pub(super) allow_ip: Option<Ipv4Addr>,
    pub(super) access: Vec<(Proto, u16)>,
}

/// Parses the base64 access message `<IPv4>,<proto>/<port>[,...]`.
pub(super) fn parse_access(field: &str) -> Result<AccessMessage, Reject> {
    if field.is_empty() || field.len() > 256 {
        return Err(Reject::Malformed("access message field is empty or too long"));
    }
    let raw = LENIENT
        .decode(field)
        .map_err(|_| Reject::Malformed("access message is not valid base64"))?;
    let text = std::str::from_utf8(&raw).map_err(|_| Reject::Malformed("access message is not ASCII"))?;
    let mut parts = text.split(',');
    let ip: Ipv4Addr = parts
        .next()
        .and_then(|ip| ip.parse().ok())
        .ok_or(Reject::Malformed("access message does not start with an IPv4 address"))?;
    let mut access = Vec::new();
    let mut specs = 0;
    for spec in parts {
        specs += 1;
        let (proto, port) = spec
            .split_once('/')
            .ok_or(Reject::Malformed("access entry is not proto/port"))?;
        let port = parse_decimal(port, 5)
            .and_then(|p| u16::try_from(p).ok())
            .ok_or(Reject::Malformed("access entry has a bad port"))?;
        let proto = match proto.to_ascii_lowercase().as_str() {
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            "none" if port == 0 => continue,
            "icmp" => return Err(Reject::UnsupportedMode("icmp access")),
            _ => return Err(Reject::Malformed("access entry has an unknown protocol")),
        };
        if port == 0 {
            return Err(Reject::Malformed("access entry has port 0"));
        }
        access.push((proto, port));
    }
    if specs == 0 {
        return Err(Reject::Malformed("access message names no proto/port"));
    }
    Ok(AccessMessage {
        allow_ip: (!ip.is_unspecified()).then_some(ip),
        access,
    })
}

/// Parses the base64 NAT access field `<host-or-IPv4>,<port>`
/// (`lib/fko_message.c: validate_nat_access_msg`): one comma, a host
/// without `" /?"'\` or spaces, a port from 1 to 65535.
pub(super) fn parse_nat(field: &str, local: bool) -> Result<NatAccess, Reject> {
    if field.is_empty() || field.len() > MAX_NAT_FIELD_LEN {
        return Err(Reject::Malformed("NAT access field is empty or too long"));
    }
    let raw = LENIENT
        .decode(field)
        .map_err(|_| Reject::Malformed("NAT access field is not valid base64"))?;
    let text = std::str::from_utf8(&raw).map_err(|_| Reject::Malformed("NAT access is not ASCII"))?;
    let (host, port) = text
        .split_once(',')
        .ok_or(Reject::Malformed("NAT access is not host,port"))?;
    if host.is_empty() || !host.bytes().all(|b| b.is_ascii_graphic() && !b"\"/?'\\,".contains(&b)) {
        return Err(Reject::Malformed("NAT access host has a character fwknop forbids"));
    }
    let port = parse_decimal(port, 5)
        .and_then(|p| u16::try_from(p).ok())
        .filter(|&p| p != 0)
        .ok_or(Reject::Malformed("NAT access has a bad port"))?;
    Ok(NatAccess {
        host: host.to_ascii_lowercase(),
        port,
        local,
    })
}
