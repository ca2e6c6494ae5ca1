//! Micro-benchmarks of the decision path: the grant lookup every guarded
//! connection pays for, one knock through the gate, and SPA packets
//! verified (accepted) or rejected for a bad tag, in both formats.
//!
//! `cargo bench --bench decisions`. Targets: grant lookup under 50 ns (with
//! 10k and 1M grants held); a knock step fast enough for 200k knock
//! datagrams per second on one core (under 5 µs); SPA accept under 2 µs;
//! bad-MAC reject under 0.5 µs (a forged packet must cost less than a real
//! one, so a flood of them is cheap to shed). `benches/README.md` has the
//! latest numbers.

#![allow(
    clippy::unwrap_used,
    clippy::disallowed_methods,
    unreachable_pub,
    reason = "test and bench code: a panic is the failure report, and real time is what is measured"
)]

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use portcullis::gate::{Gate, GateLimits, Grant, Input, Knock, KnockRule, Method, ServiceRule};
use portcullis::secret::Secret;
use portcullis::spa::fwknop::{self, FwknopKeys, PacketNonce};
use portcullis::spa::native::{self, NativeKey};
use portcullis::spa::{Fields, Reject, Window};
use portcullis::step::{Proto, Step};
use portcullis::store::{GrantStore, MemoryStore};

fn source(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))
}

fn grant_lookup(c: &mut Criterion) {
    let now = Instant::now();
    for n in [10_000u32, 1_000_000] {
        let store = MemoryStore::new();
        // As in the gate: every grant of a service shares its name.
        let service: std::sync::Arc<str> = "pg".into();
        for i in 0..n {
            store.insert(&Grant {
                service: service.clone(),
                source: source(i),
                method: Method::Knock,
                expires_at: now + Duration::from_secs(3600),
            });
        }
        let mut i = 0u32;
        c.bench_function(&format!("grant lookup, {n} grants, hit"), |b| {
            b.iter(|| {
                i = (i + 7919) % n;
                black_box(store.allows("pg", source(i), now))
            })
        });
        c.bench_function(&format!("grant lookup, {n} grants, miss"), |b| {
            b.iter(|| black_box(store.allows("pg", source(n + 1), now)))
        });
    }
}

fn udp(port: u16) -> Step {
    Step {
        proto: Proto::Udp,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
    }
}

fn knock_step(c: &mut Criterion) {
    let rule = ServiceRule {
        name: "pg".into(),
        open_for: Duration::from_secs(30),
        knock: Some(KnockRule {
            sequence: vec![udp(7001), udp(7003), udp(7002)],
            trap: vec![],
            trap_lockout: true,
            step_timeout: Duration::from_secs(5),
            sequence_timeout: Duration::from_secs(15),
        }),
    };
    let mut gate = Gate::new(vec![rule], GateLimits::default());
    let mut events = Vec::with_capacity(8);
    let now = Instant::now();
    let mut i = 0u32;
    // Each iteration is one knock from a rotating set of sources: a mix of
    // first steps, advances, completions and grants.
    c.bench_function("gate: one knock", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            let step = [udp(7001), udp(7003), udp(7002)][(i % 3) as usize];
            gate.handle(
                Input::Knock(Knock {
                    source: source((i / 3) % 50_000),
                    step,
                }),
                now,
                &mut events,
            );
            events.clear();
        })
    });
}

/// A fixed time inside every packet's window, so runs are repeatable.
const NOW_UNIX: u64 = 1_750_000_000;

fn spa_fields() -> Fields {
    Fields {
        timestamp: NOW_UNIX,
        access: vec![(Proto::Tcp, 5432)],
        allow_ip: None,
        duration: Some(Duration::from_secs(30)),
        close: false,
    }
}

fn window() -> Window {
    Window::new(NOW_UNIX, Duration::from_secs(120))
}

/// `packet` with one bit of the byte at `at` flipped.
fn flipped(packet: &[u8], at: usize) -> Vec<u8> {
    let mut bad = packet.to_vec();
    bad[at] ^= 0x01;
    bad
}

fn spa_native(c: &mut Criterion) {
    let key = NativeKey::new(Secret::from_slice(&[0x42; native::KEY_LEN])).expect("32-byte key");
    let user = "alice";
    let packet = native::encode(&key, &spa_fields(), [7; native::NONCE_LEN]).expect("encodable fields");
    // The last byte belongs to the tag: the key lookup succeeds, the tag
    // check fails, which is what a forgery under a known key id costs.
    let forged = flipped(&packet, packet.len() - 1);
    let lookup = |id: native::KeyId| (id == key.id()).then_some((user, &key));
    assert!(
        native::decode(&packet, window(), lookup).is_ok(),
        "the packet must verify"
    );
    assert_eq!(
        native::decode(&forged, window(), lookup).map(|_| ()),
        Err(Reject::BadMac),
        "the forgery must fail on its tag"
    );
    c.bench_function("spa native: accept", |b| {
        b.iter(|| black_box(native::decode(black_box(&packet), window(), lookup)))
    });
    c.bench_function("spa native: reject bad MAC", |b| {
        b.iter(|| black_box(native::decode(black_box(&forged), window(), lookup)))
    });
}

fn spa_fwknop(c: &mut Criterion) {
    let keys = FwknopKeys::new(Secret::from_slice(&[0x11; 32]), Some(Secret::from_slice(&[0x22; 64])))
        .expect("distinct keys of fwknop's lengths");
    let nonce = PacketNonce {
        salt: [3; 8],
        rand16: 1234567890123456,
    };
    let wire = fwknop::encode("alice", &spa_fields(), &keys, nonce).expect("encodable fields");
    let packet = wire.into_bytes();
    // Another base64 character at the front: the text still decodes, the
    // HMAC over it no longer matches.
    let mut forged = packet.clone();
    forged[0] = if forged[0] == b'A' { b'B' } else { b'A' };
    assert!(
        fwknop::decode(&packet, &keys, window()).is_ok(),
        "the packet must verify"
    );
    assert_eq!(
        fwknop::decode(&forged, &keys, window()).map(|_| ()),
        Err(Reject::BadMac),
        "the forgery must fail on its HMAC"
    );
    c.bench_function("spa fwknop: accept", |b| {
        b.iter(|| black_box(fwknop::decode(black_box(&packet), &keys, window())))
    });
    c.bench_function("spa fwknop: reject bad MAC", |b| {
        b.iter(|| black_box(fwknop::decode(black_box(&forged), &keys, window())))
    });
}

criterion_group!(benches, grant_lookup, knock_step, spa_native, spa_fwknop);
criterion_main!(benches);
