//! The static lists through the real binary: `allow_always` admits a
//! listed source with no knock (refuse and blackhole modes), `deny_always`
//! refuses a granted one and wins over `allow_always`, both judge the
//! source a PROXY header names, and each decision has its counter.

#![allow(
    clippy::unwrap_used,
    clippy::disallowed_methods,
    unreachable_pub,
    reason = "test and bench code: a panic is the failure report, and real time is what is measured"
)]

mod common;

use common::*;
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;

fn knock_seq(p: &[u16]) -> [u16; 3] {
    [p[3], p[7], p[5]]
}

fn start(mode: &str, lists: &str) -> (Gateway, [u16; 3]) {
    let upstream = echo_server("127.0.0.1:0");
    let (gw, p) = Gateway::builder()
        .on_free_ports(10, |p| {
            format!(
                "[admin]\nlisten = \"127.0.0.1:0\"\n{}",
                echo_config(upstream, &knock_seq(p), lists)
                    .replace("unauthorized = \"refuse\"", &format!("unauthorized = \"{mode}\""))
            )
        })
        .start_on_ports();
    (gw, knock_seq(&p))
}

/// Asserts that a connection from `source` is reset (during or right
/// after the handshake: the reset can beat the end of connect) without a
/// byte of data.
fn assert_reset(source: &str, to: SocketAddr) {
    let mut buf = [0u8; 16];
    let err = match connect_from(source, to) {
        Ok(mut s) => s
            .read(&mut buf)
            .expect_err("a refused connection delivered data or a FIN"),
        Err(e) => e,
    };
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
}

const LISTS: &str =
    "allow_always = [\"127.0.0.20/31\", \"127.0.0.30\"]\ndeny_always = [\"127.0.0.30/32\", \"127.0.0.31\"]";

#[test]
fn every_decision_series_starts_at_zero() {
    let (gw, _) = start("refuse", LISTS);
    for d in [
        "allowed_always",
        "denied_always",
        "proxy_header_invalid",
        "proxy_header_full",
    ] {
        assert_eq!(decisions(&gw, "echo", d), 0.0, "{d}");
    }
}

#[test]
fn allow_always_admits_a_listed_source_without_a_knock() {
    for mode in ["refuse", "blackhole"] {
        let (gw, _) = start(mode, LISTS);
        let to = gw.addr("echo");
        assert!(echo_works("127.0.0.20", to), "{mode}");
        assert!(echo_works("127.0.0.21", to), "{mode}: the whole /31");
        gw.wait_for(|l| msg(l) == "connection allowed: allow_always" && l["source"] == "127.0.0.21");
        if mode == "refuse" {
            assert_reset("127.0.0.22", to);
            assert_eq!(decisions(&gw, "echo", "refused"), 1.0);
        }
        assert_eq!(decisions(&gw, "echo", "allowed_always"), 2.0, "{mode}");
        assert_eq!(decisions(&gw, "echo", "allowed"), 0.0, "{mode}");
    }
}

#[test]
fn deny_always_refuses_a_granted_source_and_wins_over_allow_always() {
    let (gw, seq) = start("refuse", LISTS);
    let to = gw.addr("echo");
    knock_and_wait(&gw, "echo", &seq, "127.0.0.31");
    assert_reset("127.0.0.31", to);
    gw.wait_for(|l| msg(l) == "connection refused: deny_always" && l["source"] == "127.0.0.31");
    // Listed in both: denied.
    assert_reset("127.0.0.30", to);
    assert_eq!(decisions(&gw, "echo", "denied_always"), 2.0);
    assert_eq!(decisions(&gw, "echo", "allowed"), 0.0);
    assert_eq!(decisions(&gw, "echo", "allowed_always"), 0.0);
    // A granted source on no list is unaffected.
    knock_and_wait(&gw, "echo", &seq, "127.0.0.32");
    assert!(echo_works("127.0.0.32", to));
    assert_eq!(decisions(&gw, "echo", "allowed"), 1.0);
}

#[test]
fn deny_always_holds_in_audit_mode() {
    let (gw, _) = start("allow", LISTS);
    assert_reset("127.0.0.31", gw.addr("echo"));
    assert!(echo_works("127.0.0.40", gw.addr("echo")));
    assert_eq!(decisions(&gw, "echo", "denied_always"), 1.0);
    assert_eq!(decisions(&gw, "echo", "allowed_audit"), 1.0);
}

#[test]
fn the_lists_judge_the_source_a_proxy_header_names() {
    let (gw, _) = start("refuse", &format!("{LISTS}\naccept_proxy_protocol = [\"127.0.0.1\"]"));
    let to = gw.addr("echo");
    let mut s = connect_from("127.0.0.1", to).unwrap();
    s.write_all(b"PROXY TCP4 127.0.0.20 127.0.0.1 1000 2000\r\n").unwrap();
    echo_once(&mut s, b"listed").unwrap();
    let mut s = connect_from("127.0.0.1", to).unwrap();
    s.write_all(b"PROXY TCP4 127.0.0.31 127.0.0.1 1000 2000\r\n").unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(s.read(&mut buf).unwrap_err().kind(), ErrorKind::ConnectionReset);
    assert_eq!(decisions(&gw, "echo", "allowed_always"), 1.0);
    assert_eq!(decisions(&gw, "echo", "denied_always"), 1.0);
}

#[test]
fn check_refuses_lists_a_closed_or_dark_service_cannot_honour() {
    for (mode, extra, path) in [
        ("closed", "allow_always = [\"10.0.0.0/8\"]", "service.echo.allow_always"),
        ("dark", "allow_always = [\"10.0.0.0/8\"]", "service.echo.allow_always"),
        (
            "dark",
            "accept_proxy_protocol = [\"10.0.0.0/8\"]",
            "service.echo.accept_proxy_protocol",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("proxy.toml");
        let text = echo_config("127.0.0.1:1".parse().unwrap(), &[7003, 7001, 7002], extra)
            .replace("unauthorized = \"refuse\"", &format!("unauthorized = \"{mode}\""));
        std::fs::write(&file, text).unwrap();
        let (code, _, err) = run_bin(&["check", "-c", file.to_str().unwrap()], &[]);
        assert_eq!(code, 1, "{mode} {extra}: {err}");
        assert!(err.contains(path), "{mode} {extra}: {err}");
    }
    // deny_always asks nothing of the kernel: fine in every mode.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("proxy.toml");
    let text = echo_config(
        "127.0.0.1:1".parse().unwrap(),
        &[7003, 7001, 7002],
        "deny_always = [\"10.0.0.0/8\"]",
    )
    .replace("unauthorized = \"refuse\"", "unauthorized = \"closed\"");
    std::fs::write(&file, text).unwrap();
    let (code, out, err) = run_bin(&["check", "-c", file.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{out}{err}");
}
