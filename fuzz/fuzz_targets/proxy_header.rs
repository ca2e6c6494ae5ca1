//! PROXY protocol headers: parsing never panics, a whole header is never
//! longer than its input, and what the gateway writes parses back to the
//! client it names.
#![no_main]

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use libfuzzer_sys::fuzz_target;
use portcullis::config::ProxyVersion;
use portcullis::proxy::header::{encode, parse, Parsed};

fuzz_target!(|data: &[u8]| {
    if let Parsed::Complete { len, .. } = parse(data) {
        assert!(len <= data.len(), "a header longer than its bytes");
    }
    if data.len() >= 36 {
        let ip = |b: &[u8]| -> IpAddr {
            let octets: [u8; 16] = b.try_into().expect("16 bytes");
            Ipv6Addr::from(octets).to_canonical()
        };
        let client = SocketAddr::new(ip(&data[..16]), u16::from_be_bytes([data[32], data[33]]));
        let local = SocketAddr::new(ip(&data[16..32]), u16::from_be_bytes([data[34], data[35]]));
        for version in [ProxyVersion::V1, ProxyVersion::V2] {
            let bytes = encode(version, client, local);
            let Parsed::Complete { source: Some(source), len } = parse(&bytes) else {
                panic!("{version:?} header of {client} does not parse: {bytes:?}");
            };
            assert_eq!(len, bytes.len());
            assert_eq!(source.ip().to_canonical(), client.ip());
            assert_eq!(source.port(), client.port());
        }
    }
});
