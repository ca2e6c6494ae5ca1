//! Connection management of TCP services through the real binary: the
//! access log line of each proxied connection, `idle_timeout`,
//! `max_connections_per_source` and TCP keepalive on both sockets.
//!
//! Services run in audit mode (`unauthorized = "allow"`), so every source
//! gets in without a knock; the tests are about what happens after that.

#![allow(
    clippy::unwrap_used,
    clippy::disallowed_methods,
    unreachable_pub,
    reason = "test and bench code: a panic is the failure report, and real time is what is measured"
)]

mod common;

use common::*;
use serde_json::Value;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

const ADMIN: &str = "[admin]\nlisten = \"127.0.0.1:0\"\n";

/// A TCP service in audit mode guarding `upstream`, with `extra` keys.
fn service(name: &str, upstream: SocketAddr, extra: &str) -> String {
    format!(
        "[service.{name}]\nlisten = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\nunauthorized = \"allow\"\n{extra}\n"
    )
}

/// Whether `line` is an access line.
fn is_access(line: &Value) -> bool {
    line["target"] == "portcullis::access" && msg(line) == "access"
}

fn u64_field(line: &Value, name: &str) -> u64 {
    line[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no integer {name} in {line}"))
}

/// Reads until the peer ends the stream, by a FIN or a reset; the bytes
/// read. Panics when neither comes within `PATIENCE`.
fn read_until_closed(s: &mut TcpStream) -> usize {
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut buf = [0u8; 4096];
    let mut total = 0;
    loop {
        match s.read(&mut buf) {
            Ok(0) => return total,
            Ok(n) => total += n,
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted) => return total,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("the connection was not closed: {e}"),
        }
    }
}

#[test]
fn each_proxied_connection_ends_with_one_access_line_of_flat_fields_and_exact_byte_counts() {
    const UP: usize = 300_007; // enough to splice, and no buffer's multiple
    const DOWN: usize = 70_001;
    // The upstream reads the whole request, answers DOWN bytes and closes.
    let addr = tcp_server("127.0.0.1:0", |mut s| {
        let mut request = Vec::new();
        s.read_to_end(&mut request).unwrap();
        assert_eq!(request.len(), UP);
        s.write_all(&vec![7u8; DOWN]).unwrap();
    });
    // Port 1 on loopback refuses: an upstream that is down.
    let down = "127.0.0.1:1".parse().unwrap();
    let gw = Gateway::builder()
        .config(&format!(
            "{ADMIN}{}{}",
            service("web", addr, ""),
            service("down", down, "")
        ))
        .start();

    let mut s = connect_from("127.0.0.2", gw.addr("web")).unwrap();
    let client_port = s.local_addr().unwrap().port();
    s.write_all(&vec![1u8; UP]).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_until_closed(&mut s), DOWN);

    let line = gw.wait_for(|l| is_access(l) && l["service"] == "web");
    assert_eq!(u64_field(&line, "bytes_up"), UP as u64, "{line}");
    assert_eq!(u64_field(&line, "bytes_down"), DOWN as u64, "{line}");
    assert_eq!(line["end"], "closed", "{line}");
    assert_eq!(line["decision"], "allowed_audit", "{line}");
    assert_eq!(line["source"], "127.0.0.2", "{line}");
    assert_eq!(u64_field(&line, "source_port"), client_port as u64, "{line}");
    assert_eq!(line["upstream"], addr.to_string(), "{line}");
    assert_eq!(line["level"], "INFO", "{line}");
    let took = line["duration_seconds"]
        .as_f64()
        .unwrap_or_else(|| panic!("no float duration: {line}"));
    assert!(
        line["duration_seconds"].is_f64() && (0.0..60.0).contains(&took),
        "{line}"
    );
    assert!(line.get("error").is_none(), "an orderly close has no error: {line}");

    // An upstream that refuses: the client is reset, and the line says so.
    let mut s = connect_from("127.0.0.3", gw.addr("down")).unwrap();
    assert_eq!(read_until_closed(&mut s), 0);
    let line = gw.wait_for(|l| is_access(l) && l["service"] == "down");
    assert_eq!(line["end"], "upstream_connect_failed", "{line}");
    assert!(line["error"].as_str().is_some_and(|e| !e.is_empty()), "{line}");
    assert_eq!((u64_field(&line, "bytes_up"), u64_field(&line, "bytes_down")), (0, 0));

    let scrape = gw.scrape();
    let ended = |svc: &str, end: &str| {
        metric(
            &scrape,
            "portcullis_connections_ended_total",
            &[("service", svc), ("end", end)],
        )
    };
    assert_eq!(ended("web", "closed"), Some(1.0));
    assert_eq!(ended("down", "upstream_connect_failed"), Some(1.0));
    assert_eq!(
        ended("web", "idle_timeout"),
        Some(0.0),
        "every end's series starts at zero"
    );
    assert_eq!(gw.count(is_access), 2, "one line per connection");
}

#[test]
fn a_refused_connection_gets_no_access_line() {
    let echo = echo_server("127.0.0.1:0");
    let gw = Gateway::builder()
        .on_free_ports(3, |p| {
            format!(
                "[service.shut]\nlisten = \"127.0.0.1:0\"\nupstream = \"{echo}\"\nunauthorized = \"refuse\"\n\
                 knock = {{ sequence = [\"{}/udp\", \"{}/udp\", \"{}/udp\"] }}\n{}",
                p[0],
                p[2],
                p[1],
                service("open", echo, "")
            )
        })
        .start();
    for _ in 0..5 {
        assert!(!echo_works("127.0.0.2", gw.addr("shut")));
    }
    gw.wait_for_nth(5, |l| msg(l) == "connection refused: no grant");
    assert!(echo_works("127.0.0.2", gw.addr("open")));
    gw.wait_for(|l| is_access(l) && l["service"] == "open");
    assert_eq!(gw.count(|l| is_access(l) && l["service"] == "shut"), 0);
}

#[test]
fn idle_timeout_closes_a_silent_connection_both_ways_and_spares_an_active_one() {
    const IDLE: Duration = Duration::from_secs(2);
    // The upstream echoes, and reports when the gateway ends its side.
    let (ended, ends) = mpsc::channel();
    let addr = tcp_server("127.0.0.1:0", move |mut s| {
        let mut buf = [0u8; 1024];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = ended.send(s.peer_addr().unwrap());
    });
    let gw = Gateway::builder()
        .config(&format!("{ADMIN}{}", service("quiet", addr, "idle_timeout = \"2s\"")))
        .start();
    let svc = gw.addr("quiet");

    let mut silent = connect_from("127.0.0.2", svc).unwrap();
    echo_once(&mut silent, b"hello").unwrap();
    let last_byte = Instant::now();
    // Waits for the gateway to end the silent one, from now on.
    let silent_ended = std::thread::spawn(move || {
        assert_eq!(read_until_closed(&mut silent), 0);
        Instant::now()
    });
    let mut active = connect_from("127.0.0.3", svc).unwrap();

    // The active one talks every 200 ms for well past the idle timeout
    // (up to 1.25 times it), and stays open throughout.
    let talking = Instant::now();
    while talking.elapsed() < IDLE * 3 {
        echo_once(&mut active, b"tick").expect("an active connection was cut");
        std::thread::sleep(Duration::from_millis(200));
    }

    // The silent one was closed by the gateway, both ways, no sooner than
    // the timeout after its last byte (the gateway's last byte went out
    // just before the client's read of it: a little slack).
    let closed_at = silent_ended.join().unwrap();
    let silence = closed_at.duration_since(last_byte);
    assert!(
        silence >= IDLE - Duration::from_millis(100),
        "closed after {silence:?} of silence"
    );
    ends.recv_timeout(PATIENCE).expect("the upstream saw its side end");
    let line = gw.wait_for(|l| is_access(l) && l["end"] == "idle_timeout");
    assert_eq!(line["source"], "127.0.0.2", "{line}");
    assert_eq!((u64_field(&line, "bytes_up"), u64_field(&line, "bytes_down")), (5, 5));
    assert!(
        line["duration_seconds"].as_f64().unwrap() >= IDLE.as_secs_f64(),
        "{line}"
    );
    // Only the silent one's upstream connection ended.
    assert!(
        ends.try_recv().is_err(),
        "the active connection's upstream was closed too"
    );

    echo_once(&mut active, b"still here").expect("the active connection is still open");
    let scrape = gw.scrape();
    let ended = |end: &str| {
        metric(
            &scrape,
            "portcullis_connections_ended_total",
            &[("service", "quiet"), ("end", end)],
        )
    };
    assert_eq!(ended("idle_timeout"), Some(1.0));
    assert_eq!(
        metric(&scrape, "portcullis_connections_active", &[("service", "quiet")]),
        Some(1.0)
    );
}

#[test]
fn max_connections_per_source_resets_the_extra_connection_and_leaves_other_sources_in() {
    let echo = echo_server("127.0.0.1:0");
    let gw = Gateway::builder()
        .config(&format!(
            "{ADMIN}{}",
            service("capped", echo, "max_connections_per_source = 2")
        ))
        .start();
    let svc = gw.addr("capped");
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = connect_from("127.0.0.2", svc).unwrap();
        echo_once(&mut s, b"in").unwrap();
        held.push(s);
    }
    // Reset: on loopback the reset can land before connect() returns.
    let third = connect_from("127.0.0.2", svc).and_then(|mut s| echo_once(&mut s, b"third"));
    assert!(third.is_err(), "a third connection of one source got through");
    gw.wait_for(|l| msg(l) == "connection refused: at max_connections_per_source" && l["source"] == "127.0.0.2");
    // Another source has its own count.
    let mut others = Vec::new();
    for _ in 0..2 {
        let mut s = connect_from("127.0.0.3", svc).unwrap();
        echo_once(&mut s, b"other").expect("another source is let in");
        others.push(s);
    }
    let scrape = gw.scrape();
    let decided = |d: &str| {
        metric(
            &scrape,
            "portcullis_connections_total",
            &[("service", "capped"), ("decision", d)],
        )
    };
    assert_eq!(decided("source_limit"), Some(1.0));
    assert_eq!(decided("allowed_audit"), Some(4.0));
    assert_eq!(decided("connection_limit"), Some(0.0));

    // A connection that ends gives its source's place back.
    drop(held.pop());
    let deadline = Instant::now() + PATIENCE;
    loop {
        if connect_from("127.0.0.2", svc)
            .and_then(|mut s| echo_once(&mut s, b"again"))
            .is_ok()
        {
            break;
        }
        assert!(Instant::now() < deadline, "the source's place never came back");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The attack on a per-source cap over IPv6: a host holds a whole /64 and
/// takes a new address for each connection. In a network namespace of the
/// test's own, with addresses of 2001:db8:7::/48 on its loopback, the
/// gateway, its upstream and the client run there; the client's third
/// connection from a third address of its /64 is reset, and another /64
/// is another source.
#[test]
fn an_ipv6_host_cannot_pass_its_cap_by_taking_new_addresses_in_its_prefix() {
    if !is_root() {
        eprintln!("skipped: a network namespace needs root");
        return;
    }
    let ns = Netns::new("pc-v6cap");
    let [gateway, upstream, a1, a2, a3, b1] = [
        "2001:db8:7::1",
        "2001:db8:7::2",
        "2001:db8:7:1::1",
        "2001:db8:7:1:ffff::2",
        "2001:db8:7:1::3",
        "2001:db8:7:2::1",
    ];
    for addr in [gateway, upstream, a1, a2, a3, b1] {
        ns.ip(&["-6", "addr", "add", &format!("{addr}/128"), "dev", "lo", "nodad"]);
    }
    let echo = ns.within(move || echo_server(&format!("[{upstream}]:0")));
    let gw = Gateway::builder()
        .netns(&ns.name)
        .config(&format!(
            "{ADMIN}[service.capped]\nlisten = \"[{gateway}]:0\"\nupstream = \"{echo}\"\nunauthorized = \"allow\"\n\
             max_connections_per_source = 2\n"
        ))
        .start();
    let svc = gw.addr("capped");
    let outcome = ns.within(move || {
        let through = |source: &str| -> Option<TcpStream> {
            let mut s = connect_from(source, svc).map_err(|e| eprintln!("{source}: {e}")).ok()?;
            echo_once(&mut s, b"in").map_err(|e| eprintln!("{source}: {e}")).ok()?;
            Some(s)
        };
        let first = through(a1);
        let second = through(a2);
        let third = through(a3);
        let elsewhere = through(b1);
        [first.is_some(), second.is_some(), third.is_some(), elsewhere.is_some()]
    });
    assert_eq!(
        outcome,
        [true, true, false, true],
        "first and second address of a /64 in, a third address of it refused, another /64 in"
    );
    let refused = gw.wait_for(|l| msg(l) == "connection refused: at max_connections_per_source");
    assert_eq!(refused["source"], a3, "{refused}");
}

/// `ss`'s established TCP sockets matching `filter`, one line each, with
/// their timers (`-o`).
fn sockets(filter: &str) -> Vec<String> {
    let out = Command::new("ss")
        .args(["-tnoH", "state", "established", filter])
        .output()
        .expect("ss (iproute2; scripts/install-test-deps installs it)");
    assert!(out.status.success(), "ss: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// [`sockets`] once `ready` holds of them (a socket shows its keepalive
/// timer only while no other timer, such as a retransmission's, is
/// pending), or as they are after `PATIENCE`.
fn sockets_once(filter: &str, ready: impl Fn(&[String]) -> bool) -> Vec<String> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let found = sockets(filter);
        if ready(&found) || Instant::now() >= deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn has_keepalive(line: &str) -> bool {
    line.contains("timer:(keepalive")
}

/// The keepalive timer's time left, in whole seconds, of an `ss -o` line.
fn keepalive_left(line: &str) -> Option<u64> {
    let timer = line.split("timer:(keepalive,").nth(1)?;
    let left = timer.split(',').next()?;
    // "29sec", "1min29sec" or "29.5sec" depending on iproute2's version.
    let (mins, secs) = match left.split_once("min") {
        Some((m, s)) => (m.parse::<u64>().ok()?, s),
        None => (0, left),
    };
    let secs: f64 = secs
        .trim_end_matches("sec")
        .trim_end_matches("ms")
        .parse()
        .unwrap_or(0.0);
    Some(mins * 60 + secs as u64)
}

#[test]
fn keepalive_is_on_both_the_client_and_the_upstream_socket_with_the_configured_idle_time() {
    let echo = echo_server("127.0.0.1:0");
    let gw = Gateway::builder()
        .config(&format!(
            "{}{}",
            service("kept", echo, "keepalive = \"30s\""),
            service("bare", echo, "keepalive = \"off\"")
        ))
        .start();
    let (kept, bare) = (gw.addr("kept"), gw.addr("bare"));
    let mut a = connect_from("127.0.0.2", kept).unwrap();
    echo_once(&mut a, b"a").unwrap();
    let mut b = connect_from("127.0.0.3", bare).unwrap();
    echo_once(&mut b, b"b").unwrap();

    // The gateway's accepted socket: its local end is the service's port.
    let accepted = sockets_once(&format!("( sport = :{} )", kept.port()), |l| {
        l.len() == 1 && has_keepalive(&l[0])
    });
    assert_eq!(accepted.len(), 1, "{accepted:?}");
    // The gateway's upstream socket: towards the echo server, from the
    // port the echo server sees as a's upstream peer. Both services share
    // the echo server, so tell them apart by the keepalive timer itself
    // and count: exactly one of the two upstream sockets has one.
    let upstream_side = sockets_once(&format!("( dport = :{} )", echo.port()), |l| {
        l.len() == 2 && l.iter().filter(|l| has_keepalive(l)).count() == 1
    });
    assert_eq!(upstream_side.len(), 2, "{upstream_side:?}");
    for line in accepted
        .iter()
        .chain(upstream_side.iter().filter(|l| l.contains("keepalive")))
    {
        let left = keepalive_left(line).unwrap_or_else(|| panic!("no keepalive timer: {line}"));
        assert!(left <= 30, "the idle time is not the configured 30s: {line}");
    }
    assert_eq!(
        upstream_side.iter().filter(|l| l.contains("timer:(keepalive")).count(),
        1,
        "keepalive on the kept service's upstream socket, and off on the bare one's: {upstream_side:?}"
    );
    // keepalive = "off": the bare service's accepted socket has no timer,
    // and neither have the test's own sockets (the check can fail).
    let bare_accepted = sockets(&format!("( sport = :{} )", bare.port()));
    assert_eq!(bare_accepted.len(), 1, "{bare_accepted:?}");
    assert!(!bare_accepted[0].contains("keepalive"), "{bare_accepted:?}");
    let ours = sockets(&format!("( dport = :{} )", kept.port()));
    assert!(ours.iter().all(|l| !l.contains("keepalive")), "{ours:?}");

    // The client side takes its keepalive from the listener, which a
    // reload keeps: swapping the settings applies to new connections.
    drop((a, b));
    let swapped = format!(
        "{}{}",
        service("kept", echo, "keepalive = \"off\""),
        service("bare", echo, "keepalive = \"20s\"")
    );
    std::fs::write(&gw.config_path, swapped).unwrap();
    gw.signal(nix::sys::signal::Signal::SIGHUP);
    gw.wait_for(|l| msg(l) == "config reloaded");
    let mut a = connect_from("127.0.0.4", kept).unwrap();
    echo_once(&mut a, b"a").unwrap();
    let mut b = connect_from("127.0.0.5", bare).unwrap();
    echo_once(&mut b, b"b").unwrap();
    let now_bare = sockets_once(&format!("( sport = :{} and dst 127.0.0.4 )", kept.port()), |l| {
        l.len() == 1
    });
    assert_eq!(now_bare.len(), 1, "{now_bare:?}");
    assert!(
        !has_keepalive(&now_bare[0]),
        "keepalive still on after the reload turned it off: {now_bare:?}"
    );
    let now_kept = sockets_once(&format!("( sport = :{} and dst 127.0.0.5 )", bare.port()), |l| {
        l.len() == 1 && has_keepalive(&l[0])
    });
    assert_eq!(now_kept.len(), 1, "{now_kept:?}");
    let left =
        keepalive_left(&now_kept[0]).unwrap_or_else(|| panic!("no keepalive timer after the reload: {now_kept:?}"));
    assert!(left <= 20, "the idle time is not the reloaded 20s: {now_kept:?}");
}

#[test]
fn keepalive_is_on_by_default() {
    let echo = echo_server("127.0.0.1:0");
    let gw = Gateway::builder().config(&service("plain", echo, "")).start();
    let mut a = connect_from("127.0.0.2", gw.addr("plain")).unwrap();
    echo_once(&mut a, b"a").unwrap();
    let accepted = sockets_once(&format!("( sport = :{} )", gw.addr("plain").port()), |l| {
        l.len() == 1 && has_keepalive(&l[0])
    });
    assert_eq!(accepted.len(), 1, "{accepted:?}");
    let left = keepalive_left(&accepted[0]).unwrap_or_else(|| panic!("no keepalive timer: {accepted:?}"));
    assert!((1..=60).contains(&left), "{accepted:?}");
}
