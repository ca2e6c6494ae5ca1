//! What a scanner sees of a guarded TCP service in `closed` and `dark`
//! mode, through the real binary and nmap: a `closed` service without an
//! active grant answers like a port nothing uses (SYN and connect scans),
//! before a grant and after it expires; no other process takes its port;
//! an established connection outlives the grant; `dark` drops the SYNs of
//! sources without a grant (`filtered`) and, run without CAP_NET_ADMIN,
//! falls back to `closed` with a warning and says so in `/metrics`; a
//! reload switches a service between `refuse` and `closed` on the same
//! port.
//!
//! Needs root (CI runs as root) and nmap; the unprivileged case drops
//! privileges with `setpriv`. Sources are 127.78.x.y, which no other test
//! uses (the raw sensor tests, which see every packet, use 127.77.0.x).

#![allow(
    clippy::unwrap_used,
    clippy::disallowed_methods,
    unreachable_pub,
    reason = "test code: a panic is the failure report"
)]

mod common;

use common::*;
use std::collections::HashMap;
use std::io::{ErrorKind, Read};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Port roles within the block of free ports the config is built on.
const SERVICE: usize = 0;
/// The knock sequence: neither ascending nor descending.
const SEQ: [usize; 3] = [1, 3, 2];
/// A port nothing uses, scanned beside the service for comparison.
const UNUSED: usize = 4;
const PORTS: u16 = 5;

/// One service `pg` on a fixed port in front of `upstream`.
fn config(p: &[u16], upstream: SocketAddr, mode: &str, open_for: &str) -> String {
    let steps: Vec<String> = SEQ.iter().map(|i| format!("\"{}/udp\"", p[*i])).collect();
    format!(
        r#"
[admin]
listen = "127.0.0.1:0"

[service.pg]
listen = "127.0.0.1:{}"
upstream = "{upstream}"
unauthorized = "{mode}"
open_for = "{open_for}"
knock = {{ sequence = [{}], step_timeout = "5s", sequence_timeout = "15s" }}
"#,
        p[SERVICE],
        steps.join(", ")
    )
}

fn start(mode: &str, open_for: &str) -> (Gateway, Vec<u16>) {
    let upstream = echo_server("127.0.0.1:0");
    Gateway::builder()
        .on_free_ports(PORTS, |p| config(p, upstream, mode, open_for))
        .start_on_ports()
}

fn seq(p: &[u16]) -> [u16; 3] {
    SEQ.map(|i| p[i])
}

/// Asserts that `scan` reports the service's port exactly as the unused
/// one, and `closed`.
fn looks_unused(scan: &HashMap<u16, (String, String)>, p: &[u16], when: &str) {
    let unused = &scan[&p[UNUSED]];
    assert_eq!(unused.0, "closed", "an unused port ({when}): {scan:?}");
    assert_eq!(
        &scan[&p[SERVICE]], unused,
        "the service, {when}, unlike an unused port: {scan:?}"
    );
}

fn wait_expired(gw: &Gateway, source: &str) {
    gw.wait_for(|l| msg(l) == "grant expired" && l["service"] == "pg" && l["source"] == source);
}

/// Whether a connection from `source` is answered at SYN with a reset, as
/// by a port nothing uses.
fn reset_at_syn(source: &str, to: SocketAddr) -> bool {
    matches!(connect_from(source, to), Err(e) if e.kind() == ErrorKind::ConnectionRefused)
}

/// Whether `source` completes a handshake and is then reset or closed
/// without a byte (`refuse`).
fn accepted_then_refused(source: &str, to: SocketAddr) -> bool {
    let mut stream = match connect_from(source, to) {
        Ok(stream) => stream,
        // On loopback the reset can land before connect() returns.
        Err(e) => return e.kind() == ErrorKind::ConnectionReset,
    };
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() == ErrorKind::ConnectionReset,
    }
}

#[test]
fn a_closed_service_answers_scans_like_an_unused_port_before_and_after_a_grant() {
    if !is_root() {
        eprintln!("skipped: nmap's SYN scan from chosen sources needs root");
        return;
    }
    let (gw, p) = start("closed", "2s");
    let addr = gw.addr("pg");
    assert_eq!(addr.port(), p[SERVICE]);
    let ports = [p[SERVICE], p[UNUSED]];
    looks_unused(&nmap("-sS", "127.78.0.1", &ports), &p, "before any grant");
    looks_unused(&nmap_connect(&ports), &p, "before any grant, connect scan");

    let granted = "127.78.0.2";
    assert!(reset_at_syn(granted, addr), "answered before the knock");
    knock_and_wait(&gw, "pg", &seq(&p), granted);
    // The first connect after the grant line: the port listens already.
    let mut kept = connect_from(granted, addr).expect("the granted source connects at once");
    echo_once(&mut kept, b"while the grant lasts").unwrap();
    assert!(echo_works(granted, addr));

    wait_expired(&gw, granted);
    looks_unused(&nmap("-sS", "127.78.0.1", &ports), &p, "after the grant expired");
    looks_unused(&nmap_connect(&ports), &p, "after the grant expired, connect scan");
    assert!(reset_at_syn(granted, addr), "new connections after the grant expired");
    // The connection opened during the grant lives on.
    echo_once(&mut kept, b"after the grant expired").unwrap();
}

#[test]
fn no_other_process_takes_the_port_of_a_closed_service() {
    let (gw, p) = start("closed", "2s");
    let addr = gw.addr("pg");
    let try_bind = |when: &str| {
        for ip in ["127.0.0.1", "0.0.0.0"] {
            let to: SocketAddr = format!("{ip}:{}", addr.port()).parse().unwrap();
            for (reuse_addr, reuse_port) in [(false, false), (true, false), (false, true), (true, true)] {
                let other = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
                other.set_reuse_address(reuse_addr).unwrap();
                other.set_reuse_port(reuse_port).unwrap();
                let bound = other.bind(&to.into());
                let listened = bound.as_ref().ok().map(|()| other.listen(16));
                assert!(
                    bound.is_err(),
                    "{when}: bound {to} (SO_REUSEADDR {reuse_addr}, SO_REUSEPORT {reuse_port}), listen: {listened:?}"
                );
            }
        }
        // The kernel still answers like an unused port, not another listener.
        assert!(reset_at_syn("127.78.1.1", addr), "{when}: someone else listens");
    };
    try_bind("before any grant");

    let granted = "127.78.1.2";
    knock_and_wait(&gw, "pg", &seq(&p), granted);
    let mut kept = connect_from(granted, addr).unwrap();
    echo_once(&mut kept, b"x").unwrap();
    wait_expired(&gw, granted);
    try_bind("after a grant, with a connection open");
    drop(kept);
    try_bind("after a grant, all connections closed");
}

#[test]
fn a_closed_service_stops_listening_when_its_last_grant_is_revoked() {
    let (gw, p) = start("closed", "30s");
    let addr = gw.addr("pg");
    let stranger = "127.78.5.1";
    let (a, b) = ("127.78.5.2", "127.78.5.3");
    knock_and_wait(&gw, "pg", &seq(&p), a);
    knock_and_wait(&gw, "pg", &seq(&p), b);
    assert!(echo_works(a, addr) && echo_works(b, addr));
    let revoke = |source: &str| {
        let r = gw.http("DELETE", &format!("/v1/grants/pg/{source}"), &[]);
        assert!(
            (200..300).contains(&r.status),
            "revoke {source}: {} {}",
            r.status,
            r.body
        );
    };
    // One grant left: the port still listens for it, and refuses others
    // after the handshake.
    revoke(a);
    assert!(echo_works(b, addr), "the remaining grant lost the port");
    assert!(accepted_then_refused(a, addr), "a revoked source got through");
    // The last one: a reset at SYN, as on an unused port.
    revoke(b);
    assert!(
        reset_at_syn(stranger, addr),
        "still listening after the last grant was revoked"
    );
    assert!(reset_at_syn(b, addr));

    // Revoked and granted again at once, many times over: every new grant
    // is let through. The knock (three datagrams from one socket) follows
    // the revoke as fast as a client can send it, and the client connects
    // while the driver opens the port, so the accept loop often sees the
    // close and the reopen together. (It
    // once kept a registration that had seen the socket stop listening and
    // spun on it, accepting nothing; the bench's closed-mode row caught it
    // about once in thirty samples.) That takes a gateway preempted
    // between the close and the reopen, as on a busy host: two threads per
    // core spinning while the rounds run make it so (the test runs alone:
    // .config/nextest.toml).
    let _spinning = Spinners::on_every_core();
    for i in 0..400 {
        let source = format!("127.78.{}.{}", 6 + i / 200, i % 200 + 1);
        let knocker = std::net::UdpSocket::bind((ip(&source), 0)).unwrap();
        for step in seq(&p) {
            knocker.send_to(&[0], ("127.0.0.1", step)).unwrap();
        }
        let begin = std::time::Instant::now();
        loop {
            match connect_from(&source, addr) {
                Ok(mut s) => {
                    s.set_read_timeout(Some(std::time::Duration::from_secs(2))).unwrap();
                    echo_once(&mut s, b"ping")
                        .unwrap_or_else(|e| panic!("round {i}: let in, then nothing came back: {e}"));
                    break;
                }
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => assert!(
                    begin.elapsed() < std::time::Duration::from_secs(5),
                    "round {i}: the new grant was not let through within 5 s"
                ),
                Err(e) => panic!("round {i}: {e}"),
            }
        }
        revoke(&source);
        let begin = std::time::Instant::now();
        while !reset_at_syn(stranger, addr) {
            assert!(
                begin.elapsed() < std::time::Duration::from_secs(5),
                "round {i}: still listening 5 s after the revoke"
            );
        }
    }
}

/// Two threads spinning per core until dropped.
struct Spinners(Arc<AtomicBool>);

impl Spinners {
    fn on_every_core() -> Self {
        let busy = Arc::new(AtomicBool::new(true));
        for _ in 0..2 * std::thread::available_parallelism().map_or(2, |n| n.get()) {
            let busy = busy.clone();
            std::thread::spawn(move || {
                while busy.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            });
        }
        Self(busy)
    }
}

impl Drop for Spinners {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

#[test]
fn a_dark_service_drops_syns_of_sources_without_a_grant() {
    if !is_root() {
        eprintln!("skipped: dark mode needs CAP_NET_ADMIN and nmap's SYN scan root");
        return;
    }
    let (gw, p) = start("dark", "30s");
    let addr = gw.addr("pg");
    let scrape = gw.scrape();
    let mode = |m: &str| {
        metric(
            &scrape,
            "portcullis_unauthorized_mode",
            &[("service", "pg"), ("mode", m)],
        )
    };
    assert_eq!(mode("dark"), Some(1.0), "{scrape}");
    assert_eq!(mode("closed"), Some(0.0), "{scrape}");

    let ports = [p[SERVICE], p[UNUSED]];
    let scan = nmap("-sS", "127.78.2.1", &ports);
    assert_eq!(scan[&p[SERVICE]].0, "filtered", "{scan:?}");
    assert_eq!(scan[&p[SERVICE]].1, "no-response", "{scan:?}");
    assert_eq!(scan[&p[UNUSED]].0, "closed", "{scan:?}");

    let granted = "127.78.2.2";
    knock_and_wait(&gw, "pg", &seq(&p), granted);
    assert!(echo_works(granted, addr), "the granted source was not let in");
    // A grant for one source admits no other.
    let scan = nmap("-sS", "127.78.2.1", &ports);
    assert_eq!(scan[&p[SERVICE]].0, "filtered", "while a grant is active: {scan:?}");
    let scan = nmap("-sS", granted, &ports);
    assert_eq!(scan[&p[SERVICE]].0, "open", "from the granted source: {scan:?}");
}

#[test]
fn dark_without_cap_net_admin_runs_as_closed_and_says_so() {
    if !is_root() {
        eprintln!("skipped: dropping privileges and nmap's SYN scan need root");
        return;
    }
    let upstream = echo_server("127.0.0.1:0");
    let (gw, p) = Gateway::builder()
        .unprivileged()
        .on_free_ports(PORTS, |p| config(p, upstream, "dark", "30s"))
        .start_on_ports();
    let addr = gw.addr("pg");
    let warned = |l: &serde_json::Value| {
        l["level"] == "WARN" && msg(l).starts_with("dark mode needs CAP_NET_ADMIN") && l["service"] == "pg"
    };
    gw.wait_for(warned);
    assert_eq!(gw.count(warned), 1, "one warning: {}", gw.log_text());
    let scrape = gw.scrape();
    let mode = |m: &str| {
        metric(
            &scrape,
            "portcullis_unauthorized_mode",
            &[("service", "pg"), ("mode", m)],
        )
    };
    assert_eq!(mode("closed"), Some(1.0), "{scrape}");
    assert_eq!(mode("dark"), Some(0.0), "{scrape}");

    looks_unused(
        &nmap("-sS", "127.78.3.1", &[p[SERVICE], p[UNUSED]]),
        &p,
        "dark without CAP_NET_ADMIN",
    );
    let granted = "127.78.3.2";
    knock_and_wait(&gw, "pg", &seq(&p), granted);
    assert!(echo_works(granted, addr), "the granted source was not let in");
}

#[test]
fn a_reload_switches_a_service_between_refuse_and_closed_on_the_same_port() {
    let (gw, p) = start("refuse", "2s");
    let addr = gw.addr("pg");
    let stranger = "127.78.4.1";
    let reload = |from: &str, to: &str| {
        let text = std::fs::read_to_string(&gw.config_path).unwrap();
        let (old, new) = (format!("unauthorized = \"{from}\""), format!("unauthorized = \"{to}\""));
        assert!(text.contains(&old), "{text}");
        let reloaded = |l: &serde_json::Value| msg(l) == "config reloaded";
        let mut n = gw.count(reloaded);
        std::fs::write(&gw.config_path, text.replace(&old, &new)).unwrap();
        gw.signal(nix::sys::signal::Signal::SIGHUP);
        // The file watcher may reload too: wait for the reload that read
        // the new text.
        loop {
            n += 1;
            gw.wait_for_nth(n, reloaded);
            let lines = gw.lines();
            let listening = lines
                .iter()
                .rfind(|l| msg(l) == "listening" && l["service"] == "pg")
                .unwrap();
            assert_eq!(listening["addr"], addr.to_string(), "the port moved");
            if listening["unauthorized"] == to {
                break;
            }
        }
    };

    // refuse: a handshake, then a reset.
    assert!(accepted_then_refused(stranger, addr), "refuse did not accept and reset");
    let a = "127.78.4.2";
    knock_and_wait(&gw, "pg", &seq(&p), a);
    assert!(echo_works(a, addr));

    // To closed while a grant is active: the port keeps listening for it.
    reload("refuse", "closed");
    assert!(echo_works(a, addr), "the grant did not survive the switch to closed");
    wait_expired(&gw, a);
    assert!(reset_at_syn(stranger, addr), "closed with no grant: no reset at SYN");
    let b = "127.78.4.3";
    knock_and_wait(&gw, "pg", &seq(&p), b);
    assert!(echo_works(b, addr), "closed: the knock did not open");
    wait_expired(&gw, b);
    assert!(reset_at_syn(stranger, addr));

    // Back to refuse with no grant: the port listens again.
    reload("closed", "refuse");
    assert!(accepted_then_refused(stranger, addr), "refuse after closed");
    let c = "127.78.4.4";
    knock_and_wait(&gw, "pg", &seq(&p), c);
    assert!(echo_works(c, addr), "refuse after closed: the knock did not open");
}

#[test]
#[ignore = "check does not yet say that dark runs as closed without CAP_NET_ADMIN (issue 17 item 2)"]
fn check_says_dark_runs_as_closed_without_cap_net_admin() {
    if !is_root() {
        eprintln!("skipped: dropping privileges needs root");
        return;
    }
    let upstream = echo_server("127.0.0.1:0");
    let p = free_ports(PORTS);
    let (lines, code) = run_unprivileged(&config(&p, upstream, "dark", "30s"), &["check", "-c"]);
    assert_eq!(code, Some(0), "{lines:?}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("service.pg.unauthorized") && l.contains("closed") && l.contains("CAP_NET_ADMIN")),
        "check names the mode in effect here: {lines:?}"
    );
}
