//! The fwknop decoder on arbitrary bytes, with the key sets of the shared
//! test vectors (so the seeds in `fuzz/corpus/fwknop` decode), and a round
//! trip: fields drawn from the input, encoded, must decode to the same
//! request.
//!
//! One key set has no HMAC key (the library still decodes such packets,
//! though the config refuses such keys): with it, mutated packets get past
//! the MAC to the decryption and the plaintext parser.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};
use std::sync::LazyLock;
use std::time::Duration;

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use portcullis::secret::Secret;
use portcullis::spa::fwknop::{self, FwknopKeys, PacketNonce};
use portcullis::spa::{Fields, Format, Window};
use portcullis::step::Proto;

/// fwknop keys from their base64 text, as in a key file.
fn b64_keys(enc: &str, hmac: &str) -> FwknopKeys {
    let text = format!("KEY_BASE64: {enc}\nHMAC_KEY_BASE64: {hmac}\n");
    let keys = portcullis::spa::keyfile::parse(&text).expect("valid test keys");
    keys.fwknop.expect("fwknop keys")
}

/// Vector V1 of the shared format notes, the Debian client's `P*` packets,
/// and the passphrase keys of V2 (with HMAC) and V3 (without).
static KEYS: LazyLock<Vec<(&'static str, FwknopKeys)>> = LazyLock::new(|| {
    let pass = |enc: &[u8], hmac: Option<&[u8]>| {
        FwknopKeys::new(Secret::from_slice(enc), hmac.map(Secret::from_slice)).expect("valid test keys")
    };
    vec![
        (
            "v1",
            b64_keys(
                "/aHf6KslhzpS7UHqFU0uI9CvoMnrTSjPSQyIk8AulYo=",
                "Jb/BWB0Xsh9rnrolhuwipR7YUT9wArIOv96BLUmTS0943ehbYmdpoGx8cDWUwrmO0p04Mtk4lDP4sNfexZJROg==",
            ),
        ),
        (
            "p",
            b64_keys(
                "GWn6QLFeR8Ce1tYl//zGRC5rYV2w9dJMz0yUcBOtTAc=",
                "Wd73/Nyj3iMdI92SoJoZB/deL1Ktsy7lAfmx9cRlA+yicTgdjehaf+BUQN77RLO+7WfZG8wr/Mx5J8gk3Saj6g==",
            ),
        ),
        ("v2", pass(b"mysecretpass", Some(b"myhmackey1234567"))),
        ("v3", pass(b"mysecretpass", None)),
    ]
});

fn window(now_unix: u64) -> Window {
    Window {
        now_unix,
        max_age: Duration::from_secs(100 * 365 * 24 * 3600),
    }
}

fn fields(u: &mut Unstructured) -> Result<Fields> {
    // The decoder reads at most 12 digits (as fwknopd does), while the
    // encoder writes any u64: beyond 12 digits a packet does not round-trip
    // (found by this target; the year 33658 is far off).
    let timestamp = u.int_in_range(0..=999_999_999_999u64)?;
    let count = u.int_in_range(1..=8usize)?;
    let mut access = Vec::with_capacity(count);
    for _ in 0..count {
        let proto = if u.arbitrary()? { Proto::Tcp } else { Proto::Udp };
        access.push((proto, u.int_in_range(1..=u16::MAX)?));
    }
    let allow_ip = match u.arbitrary::<Option<u32>>()? {
        Some(ip) if ip != 0 => Some(IpAddr::V4(Ipv4Addr::from(ip))),
        _ => None,
    };
    let duration = match u.arbitrary::<Option<u16>>()? {
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
    let keys: &[(&str, FwknopKeys)] = &KEYS;
    let _ = portcullis::spa::detect(data);
    let _ = fwknop::decode_any(data, keys.iter().map(|(name, k)| (*name, k)), window(1_795_547_920));
    for (_, k) in keys {
        let _ = fwknop::decode(data, k, window(1_561_109_909));
    }

    let mut u = Unstructured::new(data);
    let (Ok(fields), Ok(salt), Ok(rand16), Ok(which)) = (
        fields(&mut u),
        u.arbitrary::<[u8; 8]>(),
        u.arbitrary::<u64>(),
        u.choose_index(keys.len()),
    ) else {
        return;
    };
    let (_, k) = &keys[which];
    let nonce = PacketNonce {
        salt,
        rand16: rand16 % 10_000_000_000_000_000,
    };
    let Ok(wire) = fwknop::encode("fuzz", &fields, k, nonce) else {
        return;
    };
    assert_eq!(portcullis::spa::detect(wire.as_bytes()), Some(Format::Fwknop));
    let request = fwknop::decode(wire.as_bytes(), k, window(fields.timestamp)).expect("a fresh packet decodes");
    assert_eq!(request.user, "fuzz");
    assert_eq!(request.timestamp, fields.timestamp);
    assert_eq!(request.access, fields.access);
    assert_eq!(request.allow_ip, fields.allow_ip);
    assert_eq!(request.duration, fields.duration);
});
