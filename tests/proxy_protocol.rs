//! PROXY protocol in and out, through the real binary: HAProxy in front
//! (`send-proxy-v2`, `send-proxy`) with grants keyed on the header's
//! source, headers written by hand (v1 with data in the same segment, v2
//! LOCAL, garbage, silence), peers outside `accept_proxy_protocol` judged
//! by their own address, and `send_proxy_protocol` towards an upstream
//! that parses the header.

#![allow(
    clippy::unwrap_used,
    clippy::disallowed_methods,
    unreachable_pub,
    reason = "test and bench code: a panic is the failure report, and real time is what is measured"
)]

mod common;

use common::*;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};

/// The balancer's address as the gateway sees it: HAProxy connects from
/// 127.0.0.1, and so do the tests that write a header themselves.
const BALANCER: &str = "127.0.0.1";

fn knock_seq(p: &[u16]) -> [u16; 3] {
    [p[3], p[7], p[5]]
}

/// A gateway guarding an echo upstream in `refuse` mode that expects a
/// PROXY header from 127.0.0.1, with `extra` added to the service.
fn start(upstream: SocketAddr, extra: &str) -> (Gateway, [u16; 3]) {
    let (gw, p) = Gateway::builder()
        .on_free_ports(10, |p| {
            format!(
                "[admin]\nlisten = \"127.0.0.1:0\"\n{}",
                echo_config(
                    upstream,
                    &knock_seq(p),
                    &format!("accept_proxy_protocol = [\"{BALANCER}/32\", \"fd00::/8\"]\n{extra}"),
                )
            )
        })
        .start_on_ports();
    (gw, knock_seq(&p))
}

/// Whether the gateway ended the connection without a byte (a reset, or
/// HAProxy closing its side after the gateway reset it).
fn refused(stream: &mut TcpStream) -> bool {
    let _ = stream.write_all(b"ping");
    let mut buf = [0u8; 16];
    match stream.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe),
    }
}

#[test]
fn haproxy_in_front_grants_and_refuses_by_the_headers_source() {
    let upstream = echo_server("127.0.0.1:0");
    let (gw, seq) = start(upstream, "");
    let lb = Haproxy::start(&[(gw.addr("echo"), "send-proxy-v2"), (gw.addr("echo"), "send-proxy")]);
    knock_and_wait(&gw, "echo", &seq, "127.0.0.7");
    for front in &lb.fronts {
        assert!(echo_works("127.0.0.7", *front), "granted 127.0.0.7 through {front}");
        let mut other = connect_from("127.0.0.8", *front).unwrap();
        assert!(refused(&mut other), "127.0.0.8 has no grant: refused through {front}");
    }
    // Logged under the header's source, never the balancer's.
    gw.wait_for(|l| msg(l) == "connection allowed" && l["source"] == "127.0.0.7");
    gw.wait_for(|l| msg(l) == "connection refused: no grant" && l["source"] == "127.0.0.8");
    assert_eq!(
        gw.count(|l| msg(l).starts_with("connection") && l["source"] == BALANCER),
        0,
        "{}",
        gw.log_text()
    );
    assert_eq!(decisions(&gw, "echo", "allowed"), 2.0);
    // At least one per frontend (HAProxy may retry a server that reset).
    assert!(decisions(&gw, "echo", "refused") >= 2.0);
    assert_eq!(decisions(&gw, "echo", "proxy_header_invalid"), 0.0);
}

#[test]
fn a_v1_header_with_data_in_the_same_segment_loses_no_byte() {
    let upstream = echo_server("127.0.0.1:0");
    let (gw, seq) = start(upstream, "");
    knock_and_wait(&gw, "echo", &seq, "127.0.0.7");
    let mut s = connect_from(BALANCER, gw.addr("echo")).unwrap();
    s.write_all(b"PROXY TCP4 127.0.0.7 127.0.0.1 40000 5432\r\nfirst bytes")
        .unwrap();
    let mut got = [0u8; 11];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"first bytes");
    echo_once(&mut s, b"and more").unwrap();

    // The same header naming a source without a grant is refused.
    let mut s = connect_from(BALANCER, gw.addr("echo")).unwrap();
    s.write_all(b"PROXY TCP4 127.0.0.8 127.0.0.1 40000 5432\r\n").unwrap();
    assert!(refused(&mut s));
    gw.wait_for(|l| msg(l) == "connection refused: no grant" && l["source"] == "127.0.0.8");
}

#[test]
fn garbage_or_silence_from_a_balancer_is_reset_and_counted() {
    let upstream = echo_server("127.0.0.1:0");
    let (gw, _) = start(upstream, "");
    for garbage in [
        &b"GET / HTTP/1.0\r\n\r\n"[..],
        b"PROXY TCP4 1.2.3.4 nowhere 1 2\r\n",
        b"\x16\x03\x01\x02\x00",
    ] {
        let mut s = connect_from(BALANCER, gw.addr("echo")).unwrap();
        s.write_all(garbage).unwrap();
        let mut buf = [0u8; 16];
        let err = s.read(&mut buf).expect_err("answered garbage");
        assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{garbage:?}");
    }
    gw.wait_for_nth(3, |l| msg(l) == "connection reset: no valid PROXY header");
    assert_eq!(decisions(&gw, "echo", "proxy_header_invalid"), 3.0);
    // A balancer that says nothing is reset when its time is up.
    let mut silent = connect_from(BALANCER, gw.addr("echo")).unwrap();
    silent.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut buf = [0u8; 16];
    let err = silent.read(&mut buf).expect_err("answered silence");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset);
    gw.wait_for(|l| msg(l) == "connection reset: no valid PROXY header" && l["reason"] == "timed out");
    assert_eq!(decisions(&gw, "echo", "proxy_header_invalid"), 4.0);
    assert_eq!(decisions(&gw, "echo", "refused"), 0.0);
}

#[test]
fn a_v2_local_header_is_the_balancers_own_connection() {
    let upstream = echo_server("127.0.0.1:0");
    let (gw, seq) = start(upstream, "");
    let local = b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00";
    let mut s = connect_from(BALANCER, gw.addr("echo")).unwrap();
    s.write_all(local).unwrap();
    assert!(refused(&mut s), "the balancer holds no grant");
    gw.wait_for(|l| msg(l) == "connection refused: no grant" && l["source"] == BALANCER);
    knock_and_wait(&gw, "echo", &seq, BALANCER);
    let mut s = connect_from(BALANCER, gw.addr("echo")).unwrap();
    s.write_all(local).unwrap();
    echo_once(&mut s, b"health check").unwrap();
}

#[test]
fn a_peer_outside_accept_proxy_protocol_is_its_own_source() {
    let upstream = echo_server("127.0.0.1:0");
    let (gw, seq) = start(upstream, "");
    knock_and_wait(&gw, "echo", &seq, "127.0.0.7");
    // No header expected, and one sent is just data.
    assert!(echo_works("127.0.0.7", gw.addr("echo")));
    let mut s = connect_from("127.0.0.7", gw.addr("echo")).unwrap();
    echo_once(&mut s, b"PROXY TCP4 127.0.0.9 127.0.0.1 1 2\r\n").unwrap();
    // A header cannot lend a direct peer someone else's grant.
    // The reset may beat the end of connect, or the write: refused either way.
    if let Ok(mut s) = connect_from("127.0.0.8", gw.addr("echo")) {
        let _ = s.write_all(b"PROXY TCP4 127.0.0.7 127.0.0.1 1 2\r\n");
        assert!(refused(&mut s));
    }
    gw.wait_for(|l| msg(l) == "connection refused: no grant" && l["source"] == "127.0.0.8");
    assert_eq!(decisions(&gw, "echo", "proxy_header_invalid"), 0.0);
}

/// An upstream that parses the PROXY header it is sent (with `ppp`,
/// independently of the gateway's code), answers one line naming the
/// source and destination, then echoes.
fn header_upstream() -> SocketAddr {
    tcp_server("127.0.0.1:0", |mut stream| {
        let mut bytes = Vec::new();
        let mut buf = [0u8; 4096];
        let (line, len) = loop {
            let Ok(n) = stream.read(&mut buf) else { return };
            if n == 0 {
                return;
            }
            bytes.extend_from_slice(&buf[..n]);
            use ppp::PartialResult as _;
            let header = ppp::HeaderResult::parse(&bytes);
            if header.is_incomplete() {
                continue;
            }
            break match header {
                ppp::HeaderResult::V1(Ok(h)) => match h.addresses {
                    ppp::v1::Addresses::Tcp4(a) => (
                        format!(
                            "v1 {}:{} {}:{}\n",
                            a.source_address, a.source_port, a.destination_address, a.destination_port
                        ),
                        h.header.len(),
                    ),
                    other => (format!("v1 {other:?}\n"), h.header.len()),
                },
                ppp::HeaderResult::V2(Ok(h)) => match h.addresses {
                    ppp::v2::Addresses::IPv4(a) => (
                        format!(
                            "v2 {}:{} {}:{}\n",
                            a.source_address, a.source_port, a.destination_address, a.destination_port
                        ),
                        h.len(),
                    ),
                    other => (format!("v2 {other:?}\n"), h.len()),
                },
                _ => ("no header\n".to_string(), 0),
            };
        };
        if stream.write_all(line.as_bytes()).is_err() || stream.write_all(&bytes[len..]).is_err() {
            return;
        }
        echo_back(&mut stream);
    })
}

/// Connects from `source` to `to`, sends `first` and returns the line the
/// header upstream answers.
fn header_line(source: &str, to: SocketAddr, first: &[u8]) -> (String, BufReader<TcpStream>) {
    let mut s = connect_from(source, to).unwrap();
    s.write_all(first).unwrap();
    let mut reader = BufReader::new(s);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    (line, reader)
}

#[test]
fn send_proxy_protocol_names_the_client_to_the_upstream() {
    let upstream = header_upstream();
    for version in ["v1", "v2"] {
        let gw = Gateway::builder()
            .on_free_ports(10, |p| {
                echo_config(
                    upstream,
                    &knock_seq(p),
                    &format!("send_proxy_protocol = \"{version}\"\nallow_always = [\"127.0.0.11\"]"),
                )
            })
            .start();
        let to = gw.addr("echo");
        let mut s = connect_from("127.0.0.11", to).unwrap();
        let local_port = s.local_addr().unwrap().port();
        s.write_all(b"hello").unwrap();
        let mut reader = BufReader::new(s);
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert_eq!(line, format!("{version} 127.0.0.11:{local_port} {to}\n"));
        let mut echoed = [0u8; 5];
        reader.read_exact(&mut echoed).unwrap();
        assert_eq!(&echoed, b"hello", "the client's bytes follow the header");
    }
}

#[test]
fn the_real_client_passes_through_the_gateway_from_a_balancer_to_the_upstream() {
    let upstream = header_upstream();
    let (gw, seq) = start(upstream, "send_proxy_protocol = \"v1\"");
    let lb = Haproxy::start(&[(gw.addr("echo"), "send-proxy-v2")]);
    knock_and_wait(&gw, "echo", &seq, "127.0.0.7");
    let (line, _keep) = header_line("127.0.0.7", lb.fronts[0], b"x");
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields[0], "v1", "{line}");
    assert!(fields[1].starts_with("127.0.0.7:"), "the client, not HAProxy: {line}");
    assert_eq!(fields[2], gw.addr("echo").to_string(), "{line}");
}

/// Most connections awaiting their header at once (`proxy::MAX_AWAITING_HEADER`).
const MAX_AWAITING_HEADER: usize = 256;

#[test]
fn a_flood_of_silent_balancer_connections_is_capped_and_harms_no_one_else() {
    let upstream = echo_server("127.0.0.1:0");
    let (gw, seq) = start(upstream, "");
    knock_and_wait(&gw, "echo", &seq, "127.0.0.7");
    let to = gw.addr("echo");
    // Connections accepted in order: the first MAX hold every permit
    // (each for 5 s), the next ones find none. Those are reset at once,
    // and on loopback the reset can land before connect() returns.
    let silent: Vec<TcpStream> = (0..MAX_AWAITING_HEADER + 4)
        .filter_map(|_| match connect_from(BALANCER, to) {
            Ok(s) => Some(s),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => None,
            Err(e) => panic!("connect: {e}"),
        })
        .collect();
    assert!(silent.len() >= MAX_AWAITING_HEADER, "{} connected", silent.len());
    gw.wait_for_nth(4, |l| msg(l) == "connection reset: too many PROXY headers awaited");
    assert_eq!(decisions(&gw, "echo", "proxy_header_full"), 4.0);
    // A direct client does not queue behind them.
    assert!(echo_works("127.0.0.7", to));
    // Once their time is up they are reset, and a balancer gets in again.
    gw.wait_for_nth(MAX_AWAITING_HEADER, |l| {
        msg(l) == "connection reset: no valid PROXY header" && l["reason"] == "timed out"
    });
    drop(silent);
    let mut s = connect_from(BALANCER, to).unwrap();
    s.write_all(b"PROXY TCP4 127.0.0.7 127.0.0.1 40000 5432\r\n").unwrap();
    echo_once(&mut s, b"after the flood").unwrap();
    assert_eq!(
        decisions(&gw, "echo", "proxy_header_invalid"),
        MAX_AWAITING_HEADER as f64
    );
}
