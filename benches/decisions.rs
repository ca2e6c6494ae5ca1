//! Micro-benchmarks of the decision path: the grant lookup every guarded
//! connection pays for, and one knock through the gate.
//!
//! `cargo bench --bench decisions`. Targets: grant lookup under 50 ns (with
//! 10k and 1M grants held); a knock step fast enough for 200k knock
//! datagrams per second on one core.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use portcullis::gate::{Gate, GateLimits, Grant, Knock, KnockRule, Method, ServiceRule};
use portcullis::step::{Proto, Step};
use portcullis::store::{GrantStore, MemoryStore};

fn source(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))
}

fn grant_lookup(c: &mut Criterion) {
    let now = Instant::now();
    for n in [10_000u32, 1_000_000] {
        let store = MemoryStore::new();
        for i in 0..n {
            store.insert(&Grant {
                service: "pg".into(),
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
            gate.knock(
                Knock {
                    source: source((i / 3) % 50_000),
                    step,
                },
                now,
                &mut events,
            );
            events.clear();
        })
    });
}

criterion_group!(benches, grant_lookup, knock_step);
criterion_main!(benches);
