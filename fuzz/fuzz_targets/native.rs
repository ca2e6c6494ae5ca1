//! The native SPA decoder on arbitrary bytes, and a round trip: fields
//! drawn from the input, encoded, must decode to the same request.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::LazyLock;
use std::time::Duration;

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use portcullis::secret::Secret;
use portcullis::spa::native::{self, NativeKey, MAX_ACCESS, NONCE_LEN};
use portcullis::spa::{Fields, Format, Window};
use portcullis::step::Proto;

/// The native key of `tests/fixtures/config/valid/alice.key`, which the
/// seed packets in `fuzz/corpus/native` were made with.
static KEY: LazyLock<NativeKey> = LazyLock::new(|| {
    let text = include_str!("../../tests/fixtures/config/valid/alice.key");
    let keys = portcullis::spa::keyfile::parse(text).expect("the fixture key parses");
    keys.native.expect("the fixture holds a native key")
});

/// Wide enough that the seeds' timestamps pass, so mutations reach the
/// checks after the window.
fn window(now_unix: u64) -> Window {
    Window {
        now_unix,
        max_age: Duration::from_secs(100 * 365 * 24 * 3600),
    }
}

fn fields(u: &mut Unstructured) -> Result<Fields> {
    let timestamp = u.arbitrary()?;
    let count = u.int_in_range(0..=MAX_ACCESS)?;
    let mut access = Vec::with_capacity(count);
    for _ in 0..count {
        let proto = if u.arbitrary()? { Proto::Tcp } else { Proto::Udp };
        access.push((proto, u.int_in_range(1..=u16::MAX)?));
    }
    let allow_ip = match u.int_in_range(0..=2u8)? {
        0 => None,
        1 => Some(IpAddr::V4(Ipv4Addr::from(u.arbitrary::<u32>()?))),
        _ => Some(IpAddr::V6(Ipv6Addr::from(u.arbitrary::<u128>()?))),
    };
    let duration = match u.arbitrary::<Option<u32>>()? {
        Some(secs) => Some(Duration::from_secs(u64::from(secs.max(1)))),
        None => None,
    };
    Ok(Fields {
        timestamp,
        access,
        allow_ip,
        duration,
        close: false,
    })
}

fuzz_target!(|data: &[u8]| {
    let key: &NativeKey = &KEY;
    let lookup = |id| (id == key.id()).then_some(("alice", key));
    let _ = portcullis::spa::detect(data);
    let _ = native::decode(data, window(1_795_547_920), lookup);
    // A key that matches no packet: the lookup fails early.
    let _ = native::decode(data, window(0), |_| None);

    let mut u = Unstructured::new(data);
    let (Ok(fields), Ok(nonce)) = (fields(&mut u), u.arbitrary::<[u8; NONCE_LEN]>()) else {
        return;
    };
    let Ok(packet) = native::encode(key, &fields, nonce) else {
        return;
    };
    assert_eq!(portcullis::spa::detect(&packet), Some(Format::Native));
    let request = native::decode(&packet, window(fields.timestamp), lookup).expect("a fresh packet decodes");
    assert_eq!(request.user, "alice");
    assert_eq!(request.timestamp, fields.timestamp);
    assert_eq!(request.access, fields.access);
    assert_eq!(request.allow_ip, fields.allow_ip);
    assert_eq!(request.duration, fields.duration);
    // Another key never opens it.
    let other = NativeKey::new(Secret::from_slice(&[7; 32])).expect("32 bytes");
    assert!(native::decode(&packet, window(fields.timestamp), |_| Some(("mallory", &other))).is_err());
});
