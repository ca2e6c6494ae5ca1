//! What unauthorised and authorised guarded connections get: refuse,
//! blackhole (bounded), allow (audit), upstream failures, and shutdown.

#![allow(
    clippy::unwrap_used,
    clippy::disallowed_methods,
    unreachable_pub,
    reason = "test and bench code: a panic is the failure report, and real time is what is measured"
)]

mod common;

use common::*;
use nix::sys::signal::Signal;
use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, TcpListener};

fn knock_seq(p: &[u16]) -> [u16; 3] {
    [p[3], p[7], p[5]]
}

fn knock(gw: &Gateway, seq: [u16; 3], source: &str) {
    knock_and_wait(gw, "echo", &seq, source);
}

fn start(mode: &str, extra_gateway: &str) -> (Gateway, [u16; 3]) {
    let upstream = echo_server("127.0.0.1:0");
    let (gw, p) = Gateway::builder()
        .on_free_ports(10, |p| {
            format!(
                "[gateway]\n{extra_gateway}\n{}",
                echo_config(upstream, &knock_seq(p), "")
                    .replace("unauthorized = \"refuse\"", &format!("unauthorized = \"{mode}\""))
            )
        })
        .start_on_ports();
    (gw, knock_seq(&p))
}

/// Asserts that a connection from `source` is reset (during or right after
/// the handshake) without a byte of data.
fn assert_reset(source: &str, to: SocketAddr) {
    let err = match connect_from(source, to) {
        Ok(mut s) => read_end(&mut s).expect_err("a refused connection delivered data or a FIN"),
        Err(e) => e,
    };
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
}

/// Reads until the peer ends the connection; returns how it ended.
fn read_end(stream: &mut std::net::TcpStream) -> std::io::Result<usize> {
    let mut buf = [0u8; 64];
    stream.read(&mut buf)
}

#[test]
fn refuse_resets_at_once() {
    let (gw, seq) = start("refuse", "");
    assert_reset("127.0.0.1", gw.addr("echo"));
    gw.wait_for(|l| msg(l) == "connection refused: no grant");
    knock(&gw, seq, "127.0.0.1");
    assert!(echo_works("127.0.0.1", gw.addr("echo")));
}

#[test]
fn blackhole_holds_silently_then_closes_and_is_bounded() {
    let (gw, seq) = start("blackhole", "blackhole_hold = \"1s\"\nmax_blackholed = 1");
    let echo = gw.addr("echo");
    let mut held = connect_from("127.0.0.1", echo).unwrap();
    held.set_read_timeout(Some(std::time::Duration::from_millis(300)))
        .unwrap();
    std::io::Write::write_all(&mut held, b"hello?").unwrap();
    gw.wait_for(|l| msg(l) == "connection blackholed: no grant");
    let silent = read_end(&mut held).expect_err("a blackholed connection answered");
    assert!(
        matches!(silent.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "{silent}"
    );

    // The cap is one: the next unauthorised connection is reset instead.
    assert_reset("127.0.0.2", echo);
    gw.wait_for(|l| msg(l) == "connection refused: no grant, blackhole full");

    // The hold is bounded: the held connection is closed without a byte
    // (with a reset, since what the client sent was never read).
    held.set_read_timeout(Some(PATIENCE)).unwrap();
    match read_end(&mut held) {
        Ok(0) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("the blackhole ended with {other:?}"),
    }

    knock(&gw, seq, "127.0.0.1");
    assert!(echo_works("127.0.0.1", echo));
}

#[test]
fn allow_passes_and_logs_what_would_have_been_denied() {
    let (gw, _) = start("allow", "");
    assert!(echo_works("127.0.0.6", gw.addr("echo")));
    let line = gw.wait_for(|l| msg(l).starts_with("audit:"));
    assert_eq!(line["source"], "127.0.0.6");
    assert_eq!(line["service"], "echo");
}

#[test]
fn unreachable_upstream_closes_the_client_promptly_and_harms_nothing_else() {
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let good = echo_server("127.0.0.1:0");
    let (gw, p) = Gateway::builder()
        .on_free_ports(10, |p| {
            knock_service("echo", closed, &[p[3], p[7], p[5]]) + &knock_service("good", good, &[p[3], p[8], p[5]])
        })
        .start_on_ports();
    knock(&gw, knock_seq(&p), "127.0.0.1");
    // The client is reset as soon as the upstream connect fails, which can
    // be before the handshake is even reported to it.
    if let Ok(mut s) = connect_from("127.0.0.1", gw.addr("echo")) {
        assert!(
            read_end(&mut s).map(|n| n == 0).unwrap_or(true),
            "data from a dead upstream"
        );
    }
    let line = gw.wait_for(|l| msg(l) == "upstream connect failed");
    assert_eq!(line["service"], "echo");
    assert_eq!(line["upstream"], closed.to_string());
    assert_eq!(line["level"], "WARN");

    knock_and_wait(&gw, "good", &[p[3], p[8], p[5]], "127.0.0.1");
    assert!(echo_works("127.0.0.1", gw.addr("good")));
}

#[test]
fn sigterm_lets_a_transfer_in_flight_finish_then_exits_zero() {
    let (mut gw, seq) = start("refuse", "shutdown_grace = \"10s\"");
    let echo = gw.addr("echo");
    knock(&gw, seq, "127.0.0.1");
    let mut s = connect_from("127.0.0.1", echo).unwrap();
    echo_once(&mut s, b"before").unwrap();

    gw.signal(Signal::SIGTERM);
    let draining = gw.wait_for(|l| msg(l) == "listeners closed, draining connections");
    assert_eq!(draining["in_flight"], 1);
    let refused = connect_from("127.0.0.1", echo).expect_err("a new connection was accepted while draining");
    assert_eq!(refused.kind(), ErrorKind::ConnectionRefused, "{refused}");

    // A megabyte each way through the connection that was in flight.
    let payload: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let writer = {
        let mut w = s.try_clone().unwrap();
        let payload = payload.clone();
        std::thread::spawn(move || std::io::Write::write_all(&mut w, &payload).unwrap())
    };
    let mut got = vec![0u8; payload.len()];
    s.read_exact(&mut got).unwrap();
    writer.join().unwrap();
    assert!(got == payload, "bytes changed in flight");
    drop(s);

    assert!(gw.wait_exit().success());
    gw.wait_for(|l| msg(l) == "stopped");
    assert_eq!(gw.count(|l| msg(l).starts_with("grace period over")), 0);
}

#[test]
fn sigterm_cuts_what_outlives_the_grace_period() {
    let (mut gw, seq) = start("refuse", "shutdown_grace = \"300ms\"");
    knock(&gw, seq, "127.0.0.1");
    let mut s = connect_from("127.0.0.1", gw.addr("echo")).unwrap();
    echo_once(&mut s, b"idle after this").unwrap();
    gw.signal(Signal::SIGINT);
    assert!(gw.wait_exit().success());
    let cut = gw.wait_for(|l| msg(l) == "grace period over: cutting the connections still open");
    assert_eq!(cut["cut"], 1);
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    assert!(
        read_end(&mut s).map(|n| n == 0).unwrap_or(true),
        "the cut connection still delivered data"
    );
}

#[test]
fn dead_listener_address_is_a_clear_start_error() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr: SocketAddr = taken.local_addr().unwrap();
    let config = echo_config(addr, &[40_123, 40_127, 40_125], "")
        .replace("listen = \"127.0.0.1:0\"", &format!("listen = \"{addr}\""));
    let err = Gateway::builder()
        .config(&config)
        .try_start()
        .err()
        .expect("started on a taken port");
    assert!(err.contains("cannot listen on service.echo.listen"), "{err}");
}
