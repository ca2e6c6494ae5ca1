//! Knock sequences through the real binary, with the stock `knock` client
//! and our own, from distinct 127.x.y.z sources.

#![allow(
    clippy::unwrap_used,
    clippy::disallowed_methods,
    unreachable_pub,
    reason = "test and bench code: a panic is the failure report, and real time is what is measured"
)]

mod common;

use common::*;
use std::net::SocketAddr;

/// The sequence within a block of free ports: neither ascending nor
/// descending, so a sweep of the block walks it out of order.
fn seq(ports: &[u16]) -> [u16; 3] {
    [ports[3], ports[7], ports[5]]
}

fn start_echo(extra: &str) -> (Gateway, [u16; 3]) {
    let upstream = echo_server("127.0.0.1:0");
    let (gw, ports) = Gateway::builder()
        .on_free_ports(10, |p| echo_config(upstream, &seq(p), extra))
        .start_on_ports();
    (gw, seq(&ports))
}

#[test]
fn stock_knock_client_opens_for_its_source_only() {
    let (gw, [a, b, c]) = start_echo("");
    let echo = gw.addr("echo");
    assert!(!echo_works("127.0.0.1", echo), "open before any knock");

    stock_knock(&["-u", "127.0.0.1", &a.to_string(), &b.to_string(), &c.to_string()]);
    gw.wait_grant("echo", "127.0.0.1");
    assert!(echo_works("127.0.0.1", echo), "closed for the source that knocked");
    assert!(!echo_works("127.0.0.2", echo), "open for a source that did not knock");
    let grant = gw.lines().into_iter().find(|l| msg(l) == "grant").unwrap();
    assert_eq!(grant["method"], "knock");
    assert_eq!(grant["level"], "INFO");
}

#[test]
fn stock_knock_client_port_colon_proto_syntax() {
    let (gw, [a, b, c]) = start_echo("");
    stock_knock(&[
        "127.0.0.1",
        &format!("{a}:udp"),
        &format!("{b}:udp"),
        &format!("{c}:udp"),
    ]);
    gw.wait_grant("echo", "127.0.0.1");
    assert!(echo_works("127.0.0.1", gw.addr("echo")));
}

#[test]
fn portcullis_knock_with_udp_steps_in_every_spelling() {
    let (gw, [a, b, c]) = start_echo("");
    let echo = gw.addr("echo");
    portcullis_knock(&[
        "127.0.0.1",
        &format!("{a}/udp"),
        &format!("{b}:udp"),
        &format!("udp/{c}"),
        "-b",
        "127.0.0.3",
    ]);
    gw.wait_grant("echo", "127.0.0.3");
    assert!(echo_works("127.0.0.3", echo));
    assert!(!echo_works("127.0.0.4", echo));
}

#[test]
fn portcullis_knock_with_tcp_steps_opens() {
    let upstream = echo_server("127.0.0.1:0");
    let (gw, ports) = Gateway::builder()
        .on_free_ports(10, |p| {
            let [a, b, c] = seq(p);
            format!(
                r#"
[service.echo]
listen = "127.0.0.1:0"
upstream = "{upstream}"
open_for = "10s"
knock = {{ sequence = ["{a}/tcp", "{b}/tcp", "{c}/tcp"] }}
"#
            )
        })
        .start_on_ports();
    let [a, b, c] = seq(&ports);
    let echo = gw.addr("echo");
    assert!(!echo_works("127.0.0.5", echo));
    // Bare ports are TCP.
    portcullis_knock(&[
        "127.0.0.1",
        &a.to_string(),
        &b.to_string(),
        &format!("{c}/tcp"),
        "-b",
        "127.0.0.5",
    ]);
    gw.wait_grant("echo", "127.0.0.5");
    assert!(echo_works("127.0.0.5", echo));
}

#[test]
fn wrong_order_leaves_it_closed() {
    let (gw, [a, b, c]) = start_echo("");
    let mut sorted = [a, b, c];
    sorted.sort_unstable();
    let steps: Vec<String> = sorted.iter().map(|p| format!("{p}/udp")).collect();
    let mut args = vec!["127.0.0.1"];
    args.extend(steps.iter().map(String::as_str));
    portcullis_knock(&args);
    // The gate has processed the last knock when it logs it.
    gw.wait_knock("echo", "127.0.0.1", sorted[2]);
    assert!(!echo_works("127.0.0.1", gw.addr("echo")));
    assert_eq!(gw.count(|l| msg(l) == "grant"), 0);
}

#[test]
fn a_late_step_leaves_it_closed() {
    let upstream = echo_server("127.0.0.1:0");
    let (gw, ports) = Gateway::builder()
        .on_free_ports(10, |p| {
            echo_config(upstream, &seq(p), "").replace("step_timeout = \"5s\"", "step_timeout = \"300ms\"")
        })
        .start_on_ports();
    let [a, b, c] = seq(&ports);
    portcullis_knock(&["127.0.0.1", &format!("{a}/udp"), &format!("{b}/udp")]);
    // The gate's own deadline ends the attempt; no packet is needed for it.
    let ended = gw.wait_for(|l| msg(l) == "knock attempt ended" && l["source"] == "127.0.0.1");
    assert_eq!(ended["cause"], "step_timeout");
    portcullis_knock(&["127.0.0.1", &format!("{c}/udp")]);
    assert_eq!(gw.wait_knock("echo", "127.0.0.1", c), "ignored");
    assert!(!echo_works("127.0.0.1", gw.addr("echo")));
}

#[test]
fn an_expired_grant_leaves_it_closed_and_established_connections_survive() {
    let upstream = echo_server("127.0.0.1:0");
    let (gw, ports) = Gateway::builder()
        .on_free_ports(10, |p| {
            echo_config(upstream, &seq(p), "").replace("open_for = \"10s\"", "open_for = \"2s\"")
        })
        .start_on_ports();
    let [a, b, c] = seq(&ports);
    let echo = gw.addr("echo");
    portcullis_knock(&[
        "127.0.0.1",
        &format!("{a}/udp"),
        &format!("{b}/udp"),
        &format!("{c}/udp"),
    ]);
    gw.wait_grant("echo", "127.0.0.1");
    let mut established = connect_from("127.0.0.1", echo).unwrap();
    echo_once(&mut established, b"during the grant").unwrap();

    gw.wait_for(|l| msg(l) == "grant expired" && l["source"] == "127.0.0.1");
    assert!(
        !echo_works("127.0.0.1", echo),
        "a new connection after the grant expired was let in"
    );
    echo_once(&mut established, b"after the grant").expect("the established connection was cut");
}

#[test]
fn an_ascending_sweep_opens_nothing() {
    let (gw, [a, b, c]) = start_echo("");
    let lo = a.min(b).min(c) - 3;
    let hi = a.max(b).max(c) + 2;
    let sweep: Vec<String> = (lo..=hi).map(|p| format!("{p}/udp")).collect();
    let mut args = vec!["127.0.0.1", "-b", "127.0.0.7"];
    args.extend(sweep.iter().map(String::as_str));
    portcullis_knock(&args);
    // A TCP sweep of the same range too (connect scans).
    for p in lo..=hi {
        let _ = connect_from("127.0.0.7", SocketAddr::from(([127, 0, 0, 1], p)));
    }
    let last = a.max(b).max(c);
    gw.wait_knock("echo", "127.0.0.7", last);
    assert!(!echo_works("127.0.0.7", gw.addr("echo")));
    assert_eq!(gw.count(|l| msg(l) == "grant"), 0);
}

#[test]
fn trap_ports_reset_progress() {
    let upstream = echo_server("127.0.0.1:0");
    let (gw, ports) = Gateway::builder()
        .on_free_ports(10, |p| {
            echo_config(upstream, &seq(p), "").replace(
                "step_timeout",
                // Traps that only reset (trap_lockout = false): the
                // default, a lockout, is tested in tests/scan_order.rs.
                &format!("trap_ports = [\"{}/udp\"], trap_lockout = false, step_timeout", p[4]),
            )
        })
        .start_on_ports();
    let [a, b, c] = seq(&ports);
    let trap = ports[4];
    portcullis_knock(&[
        "127.0.0.1",
        &format!("{a}/udp"),
        &format!("{b}/udp"),
        &format!("{trap}/udp"),
        &format!("{c}/udp"),
    ]);
    assert_eq!(gw.wait_knock("echo", "127.0.0.1", trap), "reset_trap");
    assert_eq!(gw.wait_knock("echo", "127.0.0.1", c), "ignored");
    assert!(!echo_works("127.0.0.1", gw.addr("echo")));
}

#[test]
fn garbage_at_knock_ports_stalls_nothing() {
    let (gw, [a, b, c]) = start_echo("");
    // Odd sizes from another source, out of sequence order, before a real
    // sequence.
    let big = vec![0xffu8; 60_000];
    for port in [b, c, a] {
        let to = SocketAddr::from(([127, 0, 0, 1], port));
        udp_from("127.0.0.9", to, &big);
        udp_from("127.0.0.9", to, b"");
        udp_from("127.0.0.9", to, b"\x00\x01garbage");
    }
    stock_knock(&["-u", "127.0.0.1", &a.to_string(), &b.to_string(), &c.to_string()]);
    gw.wait_grant("echo", "127.0.0.1");
    assert!(echo_works("127.0.0.1", gw.addr("echo")));
    assert!(!echo_works("127.0.0.9", gw.addr("echo")));
}

#[test]
fn two_services_share_knock_ports_and_grant_separately() {
    let up1 = echo_server("127.0.0.1:0");
    let up2 = echo_server("127.0.0.1:0");
    let (gw, p) = Gateway::builder()
        .on_free_ports(10, |p| {
            knock_service("one", up1, &[p[3], p[7], p[5]]) + &knock_service("two", up2, &[p[3], p[8], p[5]])
        })
        .start_on_ports();
    knock_and_wait(&gw, "two", &[p[3], p[8], p[5]], "127.0.0.1");
    assert!(echo_works("127.0.0.1", gw.addr("two")));
    assert!(
        !echo_works("127.0.0.1", gw.addr("one")),
        "a grant opened another service"
    );
}

#[test]
fn ipv6_knock_and_connection() {
    let upstream = echo_server("[::1]:0");
    let (gw, p) = Gateway::builder()
        .on_free_ports(10, |p| {
            echo_config(upstream, &seq(p), "").replace("listen = \"127.0.0.1:0\"", "listen = \"[::1]:0\"")
        })
        .start_on_ports();
    let [a, b, c] = seq(&p);
    let echo = gw.addr("echo");
    assert!(echo.is_ipv6());
    assert!(!echo_works("::1", echo));
    portcullis_knock(&["::1", &format!("{a}/udp"), &format!("{b}/udp"), &format!("{c}/udp")]);
    gw.wait_grant("echo", "::1");
    assert!(echo_works("::1", echo));
}
