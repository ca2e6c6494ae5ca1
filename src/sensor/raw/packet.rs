//! What a raw socket's packet says: its source, its destination and, for
//! a UDP datagram, its payload. Pure functions over `&[u8]` that never
//! panic; anything malformed is `None`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use crate::step::Proto;

/// One packet the raw sensor saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Seen<'a> {
    pub source: IpAddr,
    pub dest: SocketAddr,
    pub proto: Proto,
    /// A UDP datagram's payload; empty for a TCP SYN.
    pub payload: &'a [u8],
}

/// TCP flags: SYN and ACK.
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

/// An `AF_INET` raw socket's packet: an IPv4 header, then `proto`'s.
pub(crate) fn ipv4(packet: &[u8], proto: Proto) -> Option<Seen<'_>> {
    let first = *packet.first()?;
    if first >> 4 != 4 {
        return None;
    }
    let header_len = usize::from(first & 0x0f) * 4;
    if header_len < 20 || packet.len() < header_len {
        return None;
    }
    let wanted = match proto {
        Proto::Tcp => 6,
        Proto::Udp => 17,
    };
    if packet[9] != wanted {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
    let end = total.clamp(header_len, packet.len());
    let source = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
    let dest = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
    transport(&packet[header_len..end], proto, source.into(), dest.into())
}

/// A transport header and what follows (an `AF_INET6` raw socket's packet;
/// the addresses come beside it).
pub(crate) fn transport(segment: &[u8], proto: Proto, source: IpAddr, dest: IpAddr) -> Option<Seen<'_>> {
    let port = u16::from_be_bytes([*segment.get(2)?, *segment.get(3)?]);
    let payload = match proto {
        Proto::Tcp => {
            let flags = *segment.get(13)?;
            if flags & (SYN | ACK) != SYN {
                return None;
            }
            &segment[..0]
        }
        Proto::Udp => {
            if segment.len() < 8 {
                return None;
            }
            let len = usize::from(u16::from_be_bytes([segment[4], segment[5]]));
            &segment[8..len.clamp(8, segment.len())]
        }
    };
    Some(Seen {
        source: source.to_canonical(),
        dest: SocketAddr::new(dest.to_canonical(), port),
        proto,
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(proto: u8, segment: &[u8], options: usize) -> Vec<u8> {
        let header_len = 20 + 4 * options;
        let mut p = vec![0u8; header_len];
        p[0] = 0x40 | (header_len / 4) as u8;
        let total = (header_len + segment.len()) as u16;
        p[2..4].copy_from_slice(&total.to_be_bytes());
        p[9] = proto;
        p[12..16].copy_from_slice(&[10, 0, 0, 7]);
        p[16..20].copy_from_slice(&[127, 0, 0, 1]);
        p.extend_from_slice(segment);
        p
    }

    fn udp(port: u16, payload: &[u8]) -> Vec<u8> {
        let mut s = vec![0u8; 8];
        s[0..2].copy_from_slice(&40_001u16.to_be_bytes());
        s[2..4].copy_from_slice(&port.to_be_bytes());
        s[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        s.extend_from_slice(payload);
        s
    }

    fn tcp(port: u16, flags: u8) -> Vec<u8> {
        let mut s = vec![0u8; 20];
        s[2..4].copy_from_slice(&port.to_be_bytes());
        s[12] = 0x50;
        s[13] = flags;
        s
    }

    #[test]
    fn known_good_packets() {
        let p = v4(17, &udp(62201, b"spa bytes"), 0);
        let seen = ipv4(&p, Proto::Udp).unwrap();
        assert_eq!(seen.source, IpAddr::from([10, 0, 0, 7]));
        assert_eq!(seen.dest, "127.0.0.1:62201".parse().unwrap());
        assert_eq!(seen.payload, b"spa bytes");

        let p = v4(6, &tcp(7000, SYN), 2);
        let seen = ipv4(&p, Proto::Tcp).unwrap();
        assert_eq!(seen.dest.port(), 7000);
        assert!(seen.payload.is_empty());

        let six: IpAddr = "2001:db8::1".parse().unwrap();
        let segment = udp(7001, b"x");
        let seen = transport(&segment, Proto::Udp, six, "::1".parse().unwrap()).unwrap();
        assert_eq!((seen.source, seen.dest.port(), seen.payload), (six, 7001, &b"x"[..]));
    }

    #[test]
    fn trailing_bytes_past_the_lengths_are_not_payload() {
        let mut p = v4(17, &udp(7000, b"abc"), 0);
        p.extend_from_slice(b"link padding");
        assert_eq!(ipv4(&p, Proto::Udp).unwrap().payload, b"abc");
    }

    #[test]
    fn known_bad_packets() {
        let good = v4(17, &udp(7000, b""), 0);
        let cases: Vec<(&str, Vec<u8>, Proto)> = vec![
            ("empty", vec![], Proto::Udp),
            ("ipv6 version", vec![0x60; 48], Proto::Udp),
            ("short header length", [&[0x44u8][..], &good[1..]].concat(), Proto::Udp),
            ("header past the end", good[..19].to_vec(), Proto::Udp),
            ("no ports", good[..21].to_vec(), Proto::Udp),
            ("udp header cut", good[..26].to_vec(), Proto::Udp),
            ("another protocol", v4(1, &udp(7000, b""), 0), Proto::Udp),
            ("tcp on a udp socket", v4(6, &tcp(7000, SYN), 0), Proto::Udp),
            ("syn-ack", v4(6, &tcp(7000, SYN | ACK), 0), Proto::Tcp),
            ("ack", v4(6, &tcp(7000, ACK), 0), Proto::Tcp),
            ("rst", v4(6, &tcp(7000, 0x04), 0), Proto::Tcp),
            ("tcp cut before its flags", v4(6, &tcp(7000, SYN)[..13], 0), Proto::Tcp),
        ];
        for (name, packet, proto) in cases {
            assert_eq!(ipv4(&packet, proto), None, "{name}");
        }
    }

    #[test]
    fn any_bytes_parse_or_not_without_panicking() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for len in 0..200 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                    (seed >> 56) as u8
                })
                .collect();
            for proto in [Proto::Tcp, Proto::Udp] {
                let _ = ipv4(&bytes, proto);
                let _ = transport(&bytes, proto, IpAddr::from([1, 2, 3, 4]), IpAddr::from([5, 6, 7, 8]));
            }
        }
    }
}
