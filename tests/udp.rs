//! Guarded UDP services through the real binary: a UDP echo upstream,
//! sources on distinct 127.x.y.z addresses, and a real DNS server and
//! client (dnsmasq and dig). Where the kernel filter drops a datagram is
//! read from the listener's `drops` counter in /proc/net/udp{,6}.

#![allow(
    clippy::unwrap_used,
    clippy::disallowed_methods,
    unreachable_pub,
    reason = "test and bench code: a panic is the failure report, and real time is what is measured"
)]

mod common;

use common::*;
use serde_json::Value;
use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A UDP echo server on `addr`; returns its address.
fn udp_echo(addr: &str) -> SocketAddr {
    let socket = UdpSocket::bind(addr).expect("bind udp echo");
    let local = socket.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(&buf[..n], from);
        }
    });
    local
}

fn udp_config(upstream: SocketAddr, p: &[u16], extra: &str) -> String {
    format!(
        r#"
[service.dns]
listen = "{}:0"
upstream = "{upstream}"
protocol = "udp"
unauthorized = "refuse"
open_for = "10s"
idle_timeout = "60s"
knock = {{ sequence = ["{}/udp", "{}/udp", "{}/udp"], step_timeout = "5s", sequence_timeout = "15s" }}
{extra}
"#,
        if upstream.is_ipv6() { "[::1]" } else { "127.0.0.1" },
        p[3],
        p[7],
        p[5]
    )
}

/// Knocks from `source` and waits until its datagrams pass: the grant is
/// in the store, and the kernel filter, which follows the store a moment
/// later, admits the source.
fn knock(gw: &Gateway, p: &[u16], host: &str, source: &str) {
    portcullis_knock(&[
        host,
        "-u",
        "-b",
        source,
        &p[3].to_string(),
        &p[7].to_string(),
        &p[5].to_string(),
    ]);
    gw.wait_grant("dns", source);
    gw.wait_for(|l| filter_admits(l, source) || msg(l) == FILTER_UNAVAILABLE);
}

const FILTER_UNAVAILABLE: &str = "udp kernel filter unavailable: filtering in userspace";

/// The sources a filter log line says the kernel passes.
fn admits(line: &Value) -> Vec<&str> {
    line["admits"]
        .as_str()
        .unwrap_or_default()
        .split(", ")
        .filter(|s| !s.is_empty())
        .collect()
}

fn filter_admits(line: &Value, source: &str) -> bool {
    matches!(msg(line), "udp kernel filter attached" | "udp kernel filter updated") && admits(line).contains(&source)
}

/// Waits for the first filter of the run to be attached.
fn wait_filter_attached(gw: &Gateway) -> Value {
    gw.wait_for(|l| msg(l) == "udp kernel filter attached" || msg(l) == FILTER_UNAVAILABLE)
}

/// The kernel's count of datagrams dropped on the UDP socket bound to
/// `addr`, socket filter drops included: the `drops` column of
/// /proc/net/udp or /proc/net/udp6, whose addresses are the raw 32-bit
/// words in hex.
fn kernel_drops(addr: SocketAddr) -> u64 {
    let hex = |octets: &[u8]| -> String {
        octets
            .chunks(4)
            .map(|w| format!("{:08X}", u32::from_ne_bytes(w.try_into().unwrap())))
            .collect()
    };
    let (path, local) = match addr {
        SocketAddr::V4(a) => ("/proc/net/udp", format!("{}:{:04X}", hex(&a.ip().octets()), a.port())),
        SocketAddr::V6(a) => ("/proc/net/udp6", format!("{}:{:04X}", hex(&a.ip().octets()), a.port())),
    };
    let text = std::fs::read_to_string(path).unwrap();
    for line in text.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(1) == Some(&local.as_str()) {
            return fields.last().unwrap().parse().unwrap();
        }
    }
    panic!("no udp socket bound to {addr} in {path}:\n{text}");
}

/// Polls `done` until it holds; panics with `what` after [`PATIENCE`].
fn poll(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !done() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A client socket on `source`, with a short read timeout for asserting
/// that nothing came back after the gateway logged the drop.
fn client(source: &str) -> UdpSocket {
    let s = UdpSocket::bind(SocketAddr::new(ip(source), 0)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

fn round_trip(s: &UdpSocket, to: SocketAddr, payload: &[u8]) -> Vec<u8> {
    s.send_to(payload, to).unwrap();
    let mut buf = vec![0u8; 65_536];
    let (n, from) = s.recv_from(&mut buf).expect("no reply");
    assert_eq!(from, to, "reply from another address than the service's");
    buf.truncate(n);
    buf
}

/// Where a datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dropped {
    /// By the kernel filter: userspace never saw it.
    InKernel,
    /// By the grant check in userspace.
    InUserspace,
    /// Either (the filter may still be catching up with a removal).
    Anywhere,
}

/// Sends from `s` and asserts the gateway dropped it where `at` says:
/// waits until the listener's kernel drop count or this client's "no
/// grant" lines go up, then checks that nothing came back.
fn assert_dropped(gw: &Gateway, s: &UdpSocket, to: SocketAddr, at: Dropped) {
    let me = s.local_addr().unwrap().to_string();
    let userspace = || gw.count(|l| msg(l) == "udp datagram dropped: no grant" && l["client"] == me.as_str());
    let (kernel_before, user_before) = (kernel_drops(to), userspace());
    s.send_to(b"anyone?", to).unwrap();
    poll(&format!("a datagram from {me} to be dropped"), || {
        kernel_drops(to) > kernel_before || userspace() > user_before
    });
    // Once dropped in one place it cannot show up in the other.
    match at {
        Dropped::InKernel => assert_eq!(
            userspace(),
            user_before,
            "userspace saw a datagram from {me} that the kernel filter should have dropped"
        ),
        Dropped::InUserspace => assert_eq!(
            kernel_drops(to),
            kernel_before,
            "the kernel dropped a datagram from {me} that it should have passed"
        ),
        Dropped::Anywhere => {}
    }
    s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut buf = [0u8; 64];
    let got = s.recv_from(&mut buf);
    assert!(got.is_err(), "a reply reached a source without a grant: {got:?}");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
}

#[test]
fn replies_only_after_a_knock_and_only_to_the_knocking_source() {
    let upstream = udp_echo("127.0.0.1:0");
    let (gw, p) = Gateway::builder()
        .on_free_ports(10, |p| udp_config(upstream, p, ""))
        .start_on_ports();
    let svc = gw.addr("dns");
    let a = client("127.0.0.1");
    assert_dropped(&gw, &a, svc, Dropped::Anywhere);

    knock(&gw, &p, "127.0.0.1", "127.0.0.1");
    assert_eq!(round_trip(&a, svc, b"hello"), b"hello");

    let other = client("127.0.0.2");
    assert_dropped(&gw, &other, svc, Dropped::Anywhere);
}

/// A gateway in front of an echo upstream, a knock from 127.0.0.3, and two
/// client sockets on that address: (gateway, service address, x, y).
fn two_clients_after_a_knock() -> (Gateway, SocketAddr, UdpSocket, UdpSocket) {
    let upstream = udp_echo("127.0.0.1:0");
    let (gw, p) = Gateway::builder()
        .on_free_ports(10, |p| udp_config(upstream, p, ""))
        .start_on_ports();
    let svc = gw.addr("dns");
    knock(&gw, &p, "127.0.0.1", "127.0.0.3");
    (gw, svc, client("127.0.0.3"), client("127.0.0.3"))
}

#[test]
fn two_clients_on_one_address_each_get_only_their_own_replies() {
    let (_gw, svc, x, y) = two_clients_after_a_knock();
    x.send_to(b"from x", svc).unwrap();
    y.send_to(b"from y", svc).unwrap();
    let mut buf = [0u8; 64];
    let (n, _) = x.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"from x");
    let (n, _) = y.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"from y");
    for _ in 0..20 {
        assert_eq!(round_trip(&x, svc, b"x again"), b"x again");
        assert_eq!(round_trip(&y, svc, b"y again"), b"y again");
    }
}

/// Bursts larger than one receive batch, from two clients interleaved,
/// arrive complete, in order, and each client gets only its own replies.
#[test]
fn interleaved_bursts_larger_than_a_batch_arrive_complete_and_in_order() {
    let (_gw, svc, x, y) = two_clients_after_a_knock();
    // Sessions first, so the burst meets open sessions.
    assert_eq!(round_trip(&x, svc, b"x"), b"x");
    assert_eq!(round_trip(&y, svc, b"y"), b"y");
    const EACH: u32 = 40;
    for i in 0..EACH {
        x.send_to(format!("x{i}").as_bytes(), svc).unwrap();
        y.send_to(format!("y{i}").as_bytes(), svc).unwrap();
        if i % 3 == 0 {
            x.send_to(format!("x{i}+").as_bytes(), svc).unwrap();
        }
    }
    let mut buf = [0u8; 64];
    let mut expect_x = Vec::new();
    for i in 0..EACH {
        expect_x.push(format!("x{i}"));
        if i % 3 == 0 {
            expect_x.push(format!("x{i}+"));
        }
    }
    let got_x: Vec<String> = (0..expect_x.len())
        .map(|_| {
            let (n, from) = x.recv_from(&mut buf).expect("a reply for x");
            assert_eq!(from, svc, "replies come from the service address");
            String::from_utf8_lossy(&buf[..n]).into_owned()
        })
        .collect();
    assert_eq!(got_x, expect_x);
    let got_y: Vec<String> = (0..EACH)
        .map(|_| {
            let (n, _) = y.recv_from(&mut buf).expect("a reply for y");
            String::from_utf8_lossy(&buf[..n]).into_owned()
        })
        .collect();
    assert_eq!(got_y, (0..EACH).map(|i| format!("y{i}")).collect::<Vec<_>>());
}

#[test]
fn a_session_outlives_its_grant_while_active_and_ends_when_idle() {
    let upstream = udp_echo("127.0.0.1:0");
    let (gw, p) = Gateway::builder()
        .on_free_ports(10, |p| {
            udp_config(upstream, p, "")
                .replace("open_for = \"10s\"", "open_for = \"2s\"")
                .replace("idle_timeout = \"60s\"", "idle_timeout = \"1s\"")
        })
        .start_on_ports();
    let svc = gw.addr("dns");
    knock(&gw, &p, "127.0.0.1", "127.0.0.4");
    let c = client("127.0.0.4");
    assert_eq!(round_trip(&c, svc, b"first"), b"first");
    // Keep the session busy (a datagram every 200 ms, well inside the idle
    // timeout) until the grant has expired, then a little longer.
    let mut after_expiry = 0;
    while after_expiry < 5 {
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            round_trip(&c, svc, b"still here"),
            b"still here",
            "an active session was cut"
        );
        if gw.count(|l| msg(l) == "grant expired" && l["source"] == "127.0.0.4") > 0 {
            after_expiry += 1;
        }
    }
    // Silence ends the session...
    let ended = gw.wait_for(|l| msg(l) == "udp session ended");
    assert_eq!(ended["reason"], "idle");
    // ...and without a grant no new one opens.
    assert_dropped(&gw, &c, svc, Dropped::Anywhere);
}

#[test]
fn a_60000_byte_datagram_round_trips_intact() {
    let upstream = udp_echo("127.0.0.1:0");
    let (gw, p) = Gateway::builder()
        .on_free_ports(10, |p| udp_config(upstream, p, ""))
        .start_on_ports();
    knock(&gw, &p, "127.0.0.1", "127.0.0.1");
    let payload: Vec<u8> = (0..60_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let c = client("127.0.0.1");
    assert!(round_trip(&c, gw.addr("dns"), &payload) == payload);
}

#[test]
fn an_upstream_icmp_error_ends_the_session() {
    let closed = UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let (gw, p) = Gateway::builder()
        .on_free_ports(10, |p| udp_config(closed, p, ""))
        .start_on_ports();
    knock(&gw, &p, "127.0.0.1", "127.0.0.1");
    let c = client("127.0.0.1");
    c.send_to(b"is anyone there", gw.addr("dns")).unwrap();
    let ended = gw.wait_for(|l| msg(l) == "udp session ended");
    assert_eq!(ended["reason"], "upstream_error");
}

#[test]
fn sessions_per_source_are_capped() {
    let upstream = udp_echo("127.0.0.1:0");
    let (gw, p) = Gateway::builder()
        .on_free_ports(10, |p| udp_config(upstream, p, "max_sessions_per_source = 2"))
        .start_on_ports();
    let svc = gw.addr("dns");
    knock(&gw, &p, "127.0.0.1", "127.0.0.1");
    let (a, b, c) = (client("127.0.0.1"), client("127.0.0.1"), client("127.0.0.1"));
    assert_eq!(round_trip(&a, svc, b"a"), b"a");
    assert_eq!(round_trip(&b, svc, b"b"), b"b");
    c.send_to(b"c", svc).unwrap();
    gw.wait_for(|l| msg(l) == "udp session refused: source at max_sessions_per_source");
    assert_eq!(round_trip(&a, svc, b"a still"), b"a still");
}

#[test]
fn ipv6_udp_service() {
    let upstream = udp_echo("[::1]:0");
    let (gw, p) = Gateway::builder()
        .on_free_ports(10, |p| udp_config(upstream, p, ""))
        .start_on_ports();
    let svc = gw.addr("dns");
    assert!(svc.is_ipv6());
    let c = client("::1");
    wait_filter_attached(&gw);
    assert_dropped(&gw, &c, svc, Dropped::InKernel);
    knock(&gw, &p, "::1", "::1");
    assert_eq!(round_trip(&c, svc, b"over v6"), b"over v6");
}

const ADMIN: &str = "\n[admin]\nlisten = \"127.0.0.1:0\"\n";

#[test]
fn the_kernel_drops_datagrams_from_sources_without_a_grant() {
    let upstream = udp_echo("127.0.0.1:0");
    let (gw, p) = Gateway::builder()
        .on_free_ports(10, |p| udp_config(upstream, p, "") + ADMIN)
        .start_on_ports();
    let svc = gw.addr("dns");
    let attached = wait_filter_attached(&gw);
    assert_eq!(msg(&attached), "udp kernel filter attached", "{attached}");
    assert_eq!(attached["sources"], 0);
    let scrape = gw.scrape();
    assert_eq!(
        metric(&scrape, "portcullis_udp_kernel_filter", &[("service", "dns")]),
        Some(1.0)
    );

    // Before any knock, the kernel drops every datagram.
    let a = client("127.0.0.1");
    let stranger = client("127.0.0.2");
    assert_dropped(&gw, &a, svc, Dropped::InKernel);
    assert_dropped(&gw, &stranger, svc, Dropped::InKernel);

    // After one, the knocking source passes and the others still do not.
    knock(&gw, &p, "127.0.0.1", "127.0.0.1");
    assert_eq!(round_trip(&a, svc, b"hello"), b"hello");
    assert_dropped(&gw, &stranger, svc, Dropped::InKernel);
    let b = client("127.0.0.1");
    assert_eq!(round_trip(&b, svc, b"same source"), b"same source");

    let scrape = gw.scrape();
    let no_grant = [("service", "dns"), ("reason", "no_grant")];
    assert_eq!(
        metric(&scrape, "portcullis_udp_datagrams_dropped_total", &no_grant).unwrap_or(0.0),
        0.0,
        "userspace saw datagrams the kernel should have dropped"
    );
    assert_eq!(
        metric(&scrape, "portcullis_udp_kernel_filter", &[("service", "dns")]),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &scrape,
            "portcullis_udp_kernel_filter_fallbacks_total",
            &[("service", "dns")]
        ),
        Some(0.0)
    );
}

#[test]
fn a_session_keeps_passing_the_kernel_filter_after_its_grant_expires() {
    let upstream = udp_echo("127.0.0.1:0");
    let (gw, p) = Gateway::builder()
        .on_free_ports(10, |p| {
            udp_config(upstream, p, "").replace("open_for = \"10s\"", "open_for = \"1s\"")
        })
        .start_on_ports();
    let svc = gw.addr("dns");
    // A opens a session; B knocks after A, so its grant expires after A's,
    // and never sends.
    knock(&gw, &p, "127.0.0.1", "127.0.0.4");
    let a = client("127.0.0.4");
    assert_eq!(round_trip(&a, svc, b"first"), b"first");
    knock(&gw, &p, "127.0.0.1", "127.0.0.9");
    gw.wait_for(|l| msg(l) == "grant expired" && l["source"] == "127.0.0.4");
    gw.wait_for(|l| msg(l) == "grant expired" && l["source"] == "127.0.0.9");
    // The rebuild that takes B out comes after A's grant is gone too: the
    // session alone keeps A in.
    let update = gw.wait_for(|l| {
        msg(l) == "udp kernel filter updated" && l["removed"].as_u64() > Some(0) && admits(l) == ["127.0.0.4"]
    });
    assert_eq!(update["sources"], 1, "{update}");

    assert_eq!(round_trip(&a, svc, b"still here"), b"still here");
    let b = client("127.0.0.9");
    assert_dropped(&gw, &b, svc, Dropped::InKernel);
    // The filter passes A's address, not only its session: another client
    // on it gets through the kernel, and userspace, the authority, refuses
    // it a session.
    let a2 = client("127.0.0.4");
    assert_dropped(&gw, &a2, svc, Dropped::InUserspace);
}

#[test]
fn a_dual_stack_listener_filters_ipv4_and_ipv6_sources_in_the_kernel() {
    let upstream = udp_echo("127.0.0.1:0");
    let (gw, p) = Gateway::builder()
        .on_free_ports(10, |p| {
            udp_config(upstream, p, "").replace("listen = \"127.0.0.1:0\"", "listen = \"[::]:0\"")
        })
        .start_on_ports();
    let listener = gw.addr("dns");
    assert!(listener.ip().is_unspecified() && listener.is_ipv6(), "{listener}");
    let v4 = SocketAddr::from(([127, 0, 0, 1], listener.port()));
    let v6 = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, listener.port()));
    wait_filter_attached(&gw);
    // IPv4 datagrams reach the IPv6 socket v4-mapped; the filter sees
    // their IPv4 header and counts the drop on the IPv6 socket.
    let drop_on = |s: &UdpSocket, to: SocketAddr| {
        let before = kernel_drops(listener);
        s.send_to(b"anyone?", to).unwrap();
        poll("a kernel drop on the dual-stack socket", || {
            kernel_drops(listener) > before
        });
    };
    let stranger4 = client("127.0.0.8");
    let stranger6 = client("::1");
    drop_on(&stranger4, v4);
    drop_on(&stranger6, v6);

    knock(&gw, &p, "127.0.0.1", "127.0.0.7");
    let c = client("127.0.0.7");
    assert_eq!(round_trip(&c, v4, b"mapped"), b"mapped");
    drop_on(&stranger4, v4);
    drop_on(&stranger6, v6);
    assert_eq!(
        gw.count(|l| msg(l) == "udp datagram dropped: no grant"),
        0,
        "userspace saw datagrams the kernel should have dropped"
    );
}

#[test]
fn audit_mode_attaches_no_filter_even_after_a_reload_from_another_mode() {
    let upstream = udp_echo("127.0.0.1:0");
    let config = |p: &[u16]| udp_config(upstream, p, "") + ADMIN;
    let (gw, p) = Gateway::builder().on_free_ports(10, config).start_on_ports();
    let svc = gw.addr("dns");
    wait_filter_attached(&gw);
    let c = client("127.0.0.2");
    assert_dropped(&gw, &c, svc, Dropped::InKernel);

    // The same socket is kept across the reload; its filter must go.
    let audit = config(&p).replace("unauthorized = \"refuse\"", "unauthorized = \"allow\"");
    std::fs::write(&gw.config_path, audit).unwrap();
    gw.signal(nix::sys::signal::Signal::SIGHUP);
    gw.wait_for(|l| msg(l) == "udp kernel filter off: audit mode sees every datagram");
    assert_eq!(round_trip(&c, svc, b"audited"), b"audited");
    gw.wait_for(|l| msg(l) == "audit: udp session allowed that would have been denied (no grant)");
    let scrape = gw.scrape();
    assert_eq!(
        metric(&scrape, "portcullis_udp_kernel_filter", &[("service", "dns")]),
        Some(0.0)
    );
}

struct Dnsmasq(Child);

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// dnsmasq answering `portcullis.test` with 10.1.2.3 on a free port.
fn dnsmasq() -> (Dnsmasq, SocketAddr) {
    let port = free_ports(1)[0];
    let child = Command::new("dnsmasq")
        .args([
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
            "--except-interface=nonexistent0",
            &format!("--port={port}"),
            "--address=/portcullis.test/10.1.2.3",
            "--log-facility=-",
            "--log-queries",
            "--pid-file=",
            "--user=root",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("dnsmasq (apt-get install dnsmasq-base; scripts/install-test-deps does it)");
    let mut child = Dnsmasq(child);
    // dnsmasq logs "started" once it has bound its sockets.
    let stderr = child.0.stderr.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
    loop {
        match lines.next() {
            Some(Ok(line)) if line.contains("started") => break,
            Some(Ok(_)) => continue,
            _ => panic!("dnsmasq exited before it started"),
        }
    }
    std::thread::spawn(move || for _ in lines {});
    (child, SocketAddr::from(([127, 0, 0, 1], port)))
}

fn dig(server: SocketAddr, source: &str) -> Result<String, String> {
    let out = Command::new("dig")
        .args([
            &format!("@{}", server.ip()),
            "-p",
            &server.port().to_string(),
            "-b",
            source,
            "+short",
            "+tries=1",
            "+timeout=1",
            "portcullis.test",
        ])
        .output()
        .expect("dig (apt-get install dnsutils; scripts/install-test-deps does it)");
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if out.status.success() && !text.is_empty() && !text.contains("timed out") {
        Ok(text)
    } else {
        Err(format!("{text}{}", String::from_utf8_lossy(&out.stderr)))
    }
}

#[test]
fn dig_resolves_through_the_gateway_to_dnsmasq_only_after_a_knock() {
    let (_dns, server) = dnsmasq();
    assert_eq!(
        dig(server, "127.0.0.1").as_deref(),
        Ok("10.1.2.3"),
        "dnsmasq itself does not answer"
    );
    let (gw, p) = Gateway::builder()
        .on_free_ports(10, |p| udp_config(server, p, ""))
        .start_on_ports();
    let svc = gw.addr("dns");
    assert!(dig(svc, "127.0.0.5").is_err(), "dig got an answer before any knock");
    knock(&gw, &p, "127.0.0.1", "127.0.0.5");
    assert_eq!(dig(svc, "127.0.0.5").as_deref(), Ok("10.1.2.3"));
    assert!(dig(svc, "127.0.0.6").is_err(), "another source got an answer");
}

/// Waits until `done` holds of a scrape; returns that scrape.
fn scrape_until(gw: &Gateway, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let scraped = gw.scrape();
        if done(&scraped) {
            return scraped;
        }
        assert!(Instant::now() < deadline, "metrics never got there:\n{scraped}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn dropped(scraped: &str, reason: &str) -> f64 {
    metric(
        scraped,
        "portcullis_udp_datagrams_dropped_total",
        &[("service", "dns"), ("reason", reason)],
    )
    .unwrap_or(0.0)
}

fn opened(scraped: &str) -> f64 {
    metric(scraped, "portcullis_udp_sessions_total", &[("service", "dns")]).unwrap_or(0.0)
}

#[test]
fn forged_source_ports_of_one_granted_address_open_at_most_32_sessions() {
    let upstream = udp_echo("127.0.0.1:0");
    let (gw, p) = Gateway::builder()
        .on_free_ports(10, |p| udp_config(upstream, p, ADMIN))
        .start_on_ports();
    let svc = gw.addr("dns");
    knock(&gw, &p, "127.0.0.1", "127.0.0.2");
    // 256 datagrams from 256 source ports of the one granted address: each
    // would be a session with a socket of its own.
    let forged: Vec<UdpSocket> = (0..256).map(|_| client("127.0.0.2")).collect();
    for s in &forged {
        s.send_to(b"forged", svc).unwrap();
    }
    let scraped = scrape_until(&gw, |s| opened(s) + dropped(s, "source_session_limit") >= 256.0);
    assert_eq!(opened(&scraped), 32.0, "the default max_sessions_per_source");
    assert_eq!(dropped(&scraped, "source_session_limit"), 224.0);
    assert_eq!(
        metric(&scraped, "portcullis_udp_sessions_active", &[("service", "dns")]),
        Some(32.0)
    );
    // Another granted address still opens its own.
    knock(&gw, &p, "127.0.0.1", "127.0.0.3");
    assert_eq!(round_trip(&client("127.0.0.3"), svc, b"mine"), b"mine");
}

#[test]
fn a_source_opens_sessions_no_faster_than_session_open_rate() {
    // Nothing listens upstream: each session ends at the upstream's ICMP
    // error, so the per-source count never binds and only the rate does.
    let upstream = UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let extra = format!("max_sessions_per_source = 4\nsession_open_rate = 2\n{ADMIN}");
    let (gw, p) = Gateway::builder()
        .on_free_ports(10, |p| udp_config(upstream, p, &extra))
        .start_on_ports();
    let svc = gw.addr("dns");
    knock(&gw, &p, "127.0.0.1", "127.0.0.2");
    let started = Instant::now();
    let mut sent = 0.0;
    while started.elapsed() < Duration::from_secs(1) {
        client("127.0.0.2").send_to(b"churn", svc).unwrap();
        sent += 1.0;
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = started.elapsed().as_secs_f64();
    let scraped = scrape_until(&gw, |s| {
        opened(s) + dropped(s, "source_session_rate") + dropped(s, "source_session_limit") >= sent
    });
    let (n, limited) = (opened(&scraped), dropped(&scraped, "source_session_rate"));
    eprintln!("{sent} datagrams from new ports in {took:.2} s: {n} sessions opened, {limited} refused for the rate");
    assert!(n >= 4.0, "the burst opens: {n}");
    assert!(
        n <= 4.0 + 2.0 * (took + 1.0),
        "{n} sessions in {took:.2} s at 2/s after a burst of 4"
    );
    assert!(limited > 0.0, "the rate refused some");
}
