//! The PROXY protocol (HAProxy's, v1 text and v2 binary): the header a load
//! balancer puts in front of a connection to name the real client, parsed
//! on the way in and written on the way out. Pure functions over bytes;
//! the parsing itself is the `ppp` crate's, this module decides what a
//! result means for the gateway.
//!
//! ```
//! use portcullis::proxy::header::{parse, Parsed};
//!
//! let bytes = b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 5432\r\nhello";
//! let Parsed::Complete { source, len } = parse(bytes) else { panic!() };
//! assert_eq!(source, Some("203.0.113.7:51000".parse().unwrap()));
//! assert_eq!(&bytes[len..], b"hello");
//! ```

use std::net::{IpAddr, SocketAddr};

use ppp::v2;
use ppp::{HeaderResult, PartialResult};

use crate::config::ProxyVersion;

/// The v2 signature, the first 12 bytes of a binary header.
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
/// What a text header starts with.
const V1_PREFIX: &[u8] = b"PROXY ";
/// Longest legal v1 header, CRLF included.
const V1_MAX: usize = 107;
/// Longest v2 header: 16 fixed bytes and a 16-bit length.
pub const MAX_LEN: usize = 16 + u16::MAX as usize;

/// What the bytes read so far make of a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// A whole header of `len` bytes. `source` is the client it names, or
    /// `None` when it names none (v2 `LOCAL`, a balancer's health check;
    /// v1 `UNKNOWN`; an address family other than IP): the connection is
    /// then the peer's own.
    Complete { source: Option<SocketAddr>, len: usize },
    /// A header's beginning: more bytes may complete it.
    Incomplete,
    /// Not a PROXY header, and no more bytes will make it one.
    Invalid(&'static str),
}

/// Parses the start of a connection's bytes; never panics.
pub fn parse(bytes: &[u8]) -> Parsed {
    let seen = |prefix: &[u8]| {
        let n = bytes.len().min(prefix.len());
        bytes[..n] == prefix[..n]
    };
    let v1 = seen(V1_PREFIX);
    if !v1 && !seen(V2_SIGNATURE) {
        return Parsed::Invalid("not a PROXY protocol header");
    }
    if bytes.len() < V1_PREFIX.len().min(V2_SIGNATURE.len()) || (!v1 && bytes.len() < 16) {
        return Parsed::Incomplete;
    }
    // A text header is judged once its line is whole: the parser takes
    // some of its prefixes (a port cut short) for errors.
    let bytes = if v1 {
        match bytes.windows(2).take(V1_MAX - 1).position(|w| w == b"\r\n") {
            Some(end) => &bytes[..end + 2],
            None if bytes.len() >= V1_MAX => return Parsed::Invalid("v1 header longer than 107 bytes"),
            None => return Parsed::Incomplete,
        }
    } else {
        bytes
    };
    let result = HeaderResult::parse(bytes);
    if result.is_incomplete() {
        return if v1 {
            Parsed::Invalid("malformed v1 header")
        } else {
            Parsed::Incomplete
        };
    }
    match result {
        HeaderResult::V1(Ok(h)) => {
            let len = h.header.len();
            let source = match h.addresses {
                ppp::v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                ppp::v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                ppp::v1::Addresses::Unknown => None,
            };
            Parsed::Complete { source, len }
        }
        HeaderResult::V2(Ok(h)) => {
            let len = h.len();
            let source = match (h.command, h.addresses) {
                (v2::Command::Local, _) => None,
                (v2::Command::Proxy, v2::Addresses::IPv4(a)) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                (v2::Command::Proxy, v2::Addresses::IPv6(a)) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                (v2::Command::Proxy, v2::Addresses::Unspecified | v2::Addresses::Unix(_)) => None,
            };
            Parsed::Complete { source, len }
        }
        HeaderResult::V1(Err(_)) => Parsed::Invalid("malformed v1 header"),
        HeaderResult::V2(Err(_)) => Parsed::Invalid("malformed v2 header"),
    }
}

/// The header that tells an upstream a connection is `client`'s, made to
/// `local` (the gateway's address it reached). Both are put in one family
/// (v4-mapped when they differ), as the protocol requires.
pub fn encode(version: ProxyVersion, client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let (client, local) = same_family(client, local);
    match version {
        ProxyVersion::V1 => {
            let addresses = match (client, local) {
                (SocketAddr::V4(c), SocketAddr::V4(l)) => {
                    ppp::v1::Addresses::new_tcp4(*c.ip(), *l.ip(), c.port(), l.port())
                }
                (c, l) => ppp::v1::Addresses::new_tcp6(v6(c.ip()), v6(l.ip()), c.port(), l.port()),
            };
            addresses.to_string().into_bytes()
        }
        ProxyVersion::V2 => {
            // The fixed part and the addresses: no TLVs.
            let mut out = Vec::with_capacity(16 + 36);
            out.extend_from_slice(V2_SIGNATURE);
            out.push(0x21); // version 2, PROXY
            match (client, local) {
                (SocketAddr::V4(c), SocketAddr::V4(l)) => {
                    out.push(0x11); // TCP over IPv4
                    out.extend_from_slice(&12u16.to_be_bytes());
                    out.extend_from_slice(&c.ip().octets());
                    out.extend_from_slice(&l.ip().octets());
                }
                (c, l) => {
                    out.push(0x21); // TCP over IPv6
                    out.extend_from_slice(&36u16.to_be_bytes());
                    out.extend_from_slice(&v6(c.ip()).octets());
                    out.extend_from_slice(&v6(l.ip()).octets());
                }
            }
            out.extend_from_slice(&client.port().to_be_bytes());
            out.extend_from_slice(&local.port().to_be_bytes());
            out
        }
    }
}

fn same_family(a: SocketAddr, b: SocketAddr) -> (SocketAddr, SocketAddr) {
    let canon = |s: SocketAddr| SocketAddr::new(s.ip().to_canonical(), s.port());
    (canon(a), canon(b))
}

fn v6(ip: IpAddr) -> std::net::Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn v2_header(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend_from_slice(&(body.len() as u16).to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    #[test]
    fn known_good_headers_name_their_source_and_length() {
        let v4 = v2_header(1, 0x11, &[203, 0, 113, 7, 10, 0, 0, 1, 0xc7, 0x38, 0x15, 0x38]);
        let local = v2_header(0, 0x00, &[]);
        let with_tlv = v2_header(1, 0x11, &[1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 0, 2, 0x04, 0, 1, 42]);
        let cases: Vec<(Vec<u8>, Option<&str>, usize)> = vec![
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 100 200\r\n".to_vec(),
                Some("1.2.3.4:100"),
                36,
            ),
            (b"PROXY TCP6 ::1 ::2 1 2\r\nGET /".to_vec(), Some("[::1]:1"), 24),
            (b"PROXY UNKNOWN\r\n".to_vec(), None, 15),
            (v4.clone(), Some("203.0.113.7:51000"), 28),
            (local.clone(), None, 16),
            (with_tlv.clone(), Some("1.2.3.4:1"), 32),
        ];
        for (bytes, source, len) in cases {
            assert_eq!(
                parse(&bytes),
                Parsed::Complete {
                    source: source.map(addr),
                    len
                },
                "{bytes:?}"
            );
        }
    }

    #[test]
    fn every_prefix_of_a_header_is_incomplete() {
        let v1 = b"PROXY TCP4 1.2.3.4 5.6.7.8 100 200\r\n".to_vec();
        let v2 = v2_header(1, 0x11, &[1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 0, 2]);
        for h in [v1, v2] {
            for n in 0..h.len() {
                assert_eq!(parse(&h[..n]), Parsed::Incomplete, "{:?}", &h[..n]);
            }
        }
    }

    #[test]
    fn known_bad_headers_are_invalid_at_once() {
        let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 120]].concat();
        let bad: Vec<Vec<u8>> = vec![
            b"GET / HTTP/1.1\r\n".to_vec(),
            b"\x16\x03\x01".to_vec(),
            b"SSH-2.0-OpenSSH\r\n".to_vec(),
            b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n".to_vec(),
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n".to_vec(),
            long,
            v2_header(0xf, 0x11, &[0; 12]),
            // IPv4 addresses in a body too short for them.
            v2_header(1, 0x11, &[1, 2, 3]),
        ];
        for bytes in bad {
            assert!(
                matches!(parse(&bytes), Parsed::Invalid(_)),
                "{bytes:?}: {:?}",
                parse(&bytes)
            );
        }
    }

    #[test]
    fn encoded_headers_parse_back_to_the_client() {
        let cases = [
            ("198.51.100.4:40000", "127.0.0.1:5432"),
            ("[2001:db8::1]:40000", "[::1]:5432"),
            // Mixed families come out as IPv6.
            ("198.51.100.4:40000", "[::1]:5432"),
        ];
        for version in [ProxyVersion::V1, ProxyVersion::V2] {
            for (client, local) in cases {
                let bytes = encode(version, addr(client), addr(local));
                let Parsed::Complete { source, len } = parse(&bytes) else {
                    panic!("{version:?} {client}: {bytes:?}");
                };
                assert_eq!(len, bytes.len());
                let source = source.unwrap();
                assert_eq!(source.ip().to_canonical(), addr(client).ip(), "{version:?}");
                assert_eq!(source.port(), 40000);
            }
        }
        assert_eq!(
            encode(ProxyVersion::V1, addr("1.2.3.4:5"), addr("6.7.8.9:10")),
            b"PROXY TCP4 1.2.3.4 6.7.8.9 5 10\r\n"
        );
    }
}
