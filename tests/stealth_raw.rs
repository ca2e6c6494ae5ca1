//! The raw sensor (`gateway.sensor = "raw"`) through the real binary: what
//! nmap sees of the knock, trap and SPA ports (the same as of a port
//! nothing uses), the stock `knock` (UDP and TCP steps) and `fwknop`
//! clients opening the service, other ports resetting an attempt, and the
//! capability: `raw` without CAP_NET_RAW does not start, `auto` falls back.
//!
//! Needs root (CI runs as root) and nmap; the unprivileged cases drop
//! privileges with `setpriv`.
//!
//! A raw sensor sees every packet on the host, other tests' too: a source
//! with a knock in progress that sends anything to another port resets
//! it. So each test knocks from 127.77.0.x sources no other test uses; the
//! stock clients cannot choose theirs (127.0.0.1), and their steps follow
//! each other within a millisecond.

#![allow(
    clippy::unwrap_used,
    clippy::disallowed_methods,
    unreachable_pub,
    reason = "test and bench code: a panic is the failure report, and real time is what is measured"
)]

mod common;

use common::*;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

/// Port roles within the block of free ports the config is built on.
const SPA: usize = 0;
/// The UDP sequence of `echo`: neither ascending nor descending.
const UDP_SEQ: [usize; 3] = [1, 3, 2];
const TRAP: usize = 4;
/// A port nothing uses, scanned beside ours for comparison.
const UNUSED: usize = 5;
/// The TCP sequence of `tcp`, for the stock client's TCP knocks.
const TCP_SEQ: [usize; 3] = [6, 8, 7];
/// Another unused port, touched between two steps.
const OTHER: usize = 9;
const PORTS: u16 = 10;

/// Runs `fwknop --key-gen` with a private HOME into `dir/name`.
fn fwknop_keygen(dir: &Path, name: &str) {
    let out = Command::new("fwknop")
        .arg("--key-gen")
        .env("HOME", dir)
        .output()
        .expect("the stock fwknop client (scripts/install-test-deps installs it)");
    assert!(
        out.status.success(),
        "fwknop --key-gen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    write_private(&dir.join(name), &out.stdout);
}

fn key_value(file: &Path, name: &str) -> String {
    let text = std::fs::read_to_string(file).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .unwrap_or_else(|| panic!("{name} missing from {}", file.display()))
        .trim()
        .to_string()
}

fn config(sensor: &str, p: &[u16], upstream: SocketAddr, key: Option<&Path>) -> String {
    let udp: Vec<String> = UDP_SEQ.iter().map(|i| format!("\"{}/udp\"", p[*i])).collect();
    let tcp: Vec<String> = TCP_SEQ.iter().map(|i| format!("\"{}/tcp\"", p[*i])).collect();
    let spa = match key {
        Some(key) => format!(
            "[spa]\nlisten = \"127.0.0.1:{}\"\nmax_age = \"120s\"\n\n[user.fw]\nkey_file = \"{}\"\n",
            p[SPA],
            key.display()
        ),
        None => String::new(),
    };
    let users = if key.is_some() { "spa_users = [\"fw\"]" } else { "" };
    format!(
        r#"
[gateway]
sensor = "{sensor}"

{spa}
[service.echo]
listen = "127.0.0.1:0"
upstream = "{upstream}"
unauthorized = "refuse"
open_for = "30s"
knock = {{ sequence = [{}], trap_ports = ["{}/udp"], step_timeout = "5s", sequence_timeout = "15s" }}
{users}

[service.tcp]
listen = "127.0.0.1:0"
upstream = "{upstream}"
unauthorized = "refuse"
open_for = "30s"
knock = {{ sequence = [{}], step_timeout = "5s", sequence_timeout = "15s" }}
"#,
        udp.join(", "),
        p[TRAP],
        tcp.join(", "),
    )
}

struct Setup {
    gw: Gateway,
    p: Vec<u16>,
    keys: tempfile::TempDir,
}

fn start() -> Setup {
    let keys = tempfile::tempdir().unwrap();
    fwknop_keygen(keys.path(), "fw.key");
    let key = keys.path().join("fw.key");
    let upstream = echo_server("127.0.0.1:0");
    let (gw, p) = Gateway::builder()
        .on_free_ports(PORTS, |p| config("raw", p, upstream, Some(&key)))
        .start_on_ports();
    Setup { gw, p, keys }
}

#[test]
fn nmap_sees_knock_trap_and_spa_ports_as_it_sees_an_unused_port() {
    if !is_root() {
        eprintln!("skipped: the raw sensor and nmap's scans need root");
        return;
    }
    let s = start();
    let p = &s.p;
    let udp: Vec<u16> = [SPA, UDP_SEQ[0], UDP_SEQ[1], UDP_SEQ[2], TRAP, UNUSED]
        .iter()
        .map(|i| p[*i])
        .collect();
    let states = nmap("-sU", "127.77.0.61", &udp);
    let unused = states[&p[UNUSED]].clone();
    assert_eq!(unused.0, "closed", "an unused port: {unused:?}");
    for port in &udp {
        assert_eq!(states[port], unused, "udp {port}: {states:?}");
    }
    let tcp: Vec<u16> = [TCP_SEQ[0], TCP_SEQ[1], TCP_SEQ[2], UNUSED]
        .iter()
        .map(|i| p[*i])
        .collect();
    let states = nmap("-sS", "127.77.0.62", &tcp);
    let unused = states[&p[UNUSED]].clone();
    assert_eq!(unused.0, "closed", "an unused port: {unused:?}");
    for port in &tcp {
        assert_eq!(states[port], unused, "tcp {port}: {states:?}");
    }
    // The sensor saw the probes all the same: as knocks, or, once the scan
    // had hit a trap port and locked its source out, as knocks ignored.
    for (source, port) in [("127.77.0.61", p[UDP_SEQ[0]]), ("127.77.0.62", p[TCP_SEQ[0]])] {
        let step = format!(":{port}/");
        s.gw.wait_for(|l| {
            l["source"] == source
                && (msg(l) == "knock" || msg(l) == "knock ignored")
                && l["step"].as_str().is_some_and(|st| st.contains(&step))
        });
    }
}

#[test]
fn the_stock_clients_open_the_service_udp_tcp_and_fwknop() {
    if !is_root() {
        eprintln!("skipped: the raw sensor needs root");
        return;
    }
    let s = start();
    let p = &s.p;
    let echo = s.gw.addr("echo");
    let tcp = s.gw.addr("tcp");
    assert!(!echo_works("127.0.0.1", echo), "open before any knock");

    // The stock knock client's UDP knocks.
    let udp: Vec<String> = UDP_SEQ.iter().map(|i| p[*i].to_string()).collect();
    let mut args = vec!["-u", "127.0.0.1"];
    args.extend(udp.iter().map(String::as_str));
    stock_knock(&args);
    s.gw.wait_grant("echo", "127.0.0.1");
    assert!(
        echo_works("127.0.0.1", echo),
        "closed after the stock client's udp knocks"
    );

    // Its TCP knocks: a SYN each, which the kernel answers with RST.
    assert!(
        !echo_works("127.0.0.1", tcp),
        "the tcp service is open before its knock"
    );
    let steps: Vec<String> = TCP_SEQ.iter().map(|i| p[*i].to_string()).collect();
    let mut args = vec!["127.0.0.1"];
    args.extend(steps.iter().map(String::as_str));
    stock_knock(&args);
    s.gw.wait_grant("tcp", "127.0.0.1");
    assert!(
        echo_works("127.0.0.1", tcp),
        "closed after the stock client's tcp knocks"
    );
    for i in TCP_SEQ {
        assert_eq!(s.gw.wait_knock("tcp", "127.0.0.1", p[i]), "advanced");
    }

    // fwknop opens echo for 127.0.0.1 again (a grant renewed), over the
    // SPA port that is not bound.
    let file = s.keys.path().join("fw.key");
    let out = Command::new("fwknop")
        .args([
            "-A",
            &format!("tcp/{}", echo.port()),
            "-a",
            "127.0.0.1",
            "-D",
            "127.0.0.1",
        ])
        .args(["-p", &p[SPA].to_string(), "--use-hmac"])
        .args(["--key-base64-rijndael", &key_value(&file, "KEY_BASE64")])
        .args(["--key-base64-hmac", &key_value(&file, "HMAC_KEY_BASE64")])
        .args(["--no-rc-file", "--no-save-args"])
        .env("HOME", s.keys.path())
        .output()
        .expect("fwknop");
    assert!(out.status.success(), "fwknop: {}", String::from_utf8_lossy(&out.stderr));
    let accepted = s.gw.wait_for(|l| msg(l) == "spa accepted");
    assert_eq!(accepted["format"], "fwknop");
    assert_eq!(accepted["source"], "127.0.0.1");
    s.gw.wait_for(|l| msg(l) == "grant" && l["service"] == "echo" && l["method"] == "spa");
    assert!(echo_works("127.0.0.1", echo));
}

#[test]
fn other_ports_between_two_steps_reset_the_attempt_and_a_trap_ends_it() {
    if !is_root() {
        eprintln!("skipped: the raw sensor needs root");
        return;
    }
    let s = start();
    let p = &s.p;
    let echo = s.gw.addr("echo");
    let [a, b, c] = UDP_SEQ.map(|i| p[i]);
    let ended = |source: &'static str| {
        move |l: &serde_json::Value| {
            msg(l) == "knock attempt ended" && l["source"] == source && l["cause"] == "other_port"
        }
    };

    // A datagram to another port between two steps.
    let source = "127.77.0.71";
    knock_udp(&[a, b], source);
    assert_eq!(s.gw.wait_knock("echo", source, b), "advanced");
    udp_from(source, SocketAddr::from(([127, 0, 0, 1], p[OTHER])), b"x");
    s.gw.wait_for(ended(source));
    knock_udp(&[c], source);
    assert_eq!(s.gw.wait_knock("echo", source, c), "ignored");
    assert!(
        !echo_works(source, echo),
        "a scan between the steps walked the sequence"
    );

    // A SYN scan (nmap) of other ports between two steps.
    let source = "127.77.0.72";
    knock_udp(&[a], source);
    assert_eq!(s.gw.wait_knock("echo", source, a), "advanced");
    nmap("-sS", source, &[p[OTHER], p[UNUSED]]);
    s.gw.wait_for(ended(source));
    knock_udp(&[b, c], source);
    assert_eq!(s.gw.wait_knock("echo", source, c), "ignored");
    assert!(!echo_works(source, echo));

    // Other ports are no strike: the same source opens with a fresh
    // sequence at once.
    knock_and_wait(&s.gw, "echo", &[a, b, c], source);
    assert!(echo_works(source, echo));

    // A trap port ends the attempt and locks the source out: the right
    // sequence then opens nothing for it.
    let source = "127.77.0.73";
    knock_udp(&[a, b], source);
    assert_eq!(s.gw.wait_knock("echo", source, b), "advanced");
    knock_udp(&[p[TRAP]], source);
    assert_eq!(s.gw.wait_knock("echo", source, p[TRAP]), "reset_trap");
    s.gw.wait_for(|l| msg(l) == "source locked out: it hit a trap port" && l["source"] == source);
    knock_udp(&[a, b, c], source);
    s.gw.wait_for(|l| {
        msg(l) == "knock ignored"
            && l["source"] == source
            && l["step"].as_str().is_some_and(|st| st.contains(&format!(":{c}/")))
    });
    assert!(!echo_works(source, echo));
}

#[test]
fn raw_without_cap_net_raw_does_not_start_and_auto_falls_back_with_a_warning() {
    if !is_root() {
        eprintln!("skipped: dropping privileges needs root");
        return;
    }
    let upstream = echo_server("127.0.0.1:0");
    let p = free_ports(PORTS);
    let serve = ["--log-format", "json", "serve", "-c"];

    let (lines, code) = run_unprivileged(&config("raw", &p, upstream, None), &serve);
    let text = lines.join("\n");
    assert_ne!(code, Some(0), "raw started without CAP_NET_RAW: {text}");
    assert!(text.contains("CAP_NET_RAW"), "the error names the capability: {text}");
    assert!(text.contains("gateway.sensor"), "the error names the key: {text}");
    assert!(!text.contains("\"ready\""), "{text}");

    let (lines, code) = run_unprivileged(&config("auto", &p, upstream, None), &serve);
    let text = lines.join("\n");
    let warnings: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("\"WARN\"") && l.contains("falling back to the socket sensor"))
        .collect();
    assert_eq!(warnings.len(), 1, "one warning: {text}");
    assert!(text.contains("\"message\":\"ready\""), "auto did not start: {text}");
    assert!(!text.contains("raw sensor watching"), "{text}");
    assert_ne!(code, Some(1), "{text}");

    // check tells which sensor this environment gets.
    let (lines, code) = run_unprivileged(&config("auto", &p, upstream, None), &["check", "-c"]);
    assert_eq!(code, Some(0), "{lines:?}");
    assert!(
        lines
            .iter()
            .any(|l| l == "gateway.sensor: auto: socket here (CAP_NET_RAW is not held)"),
        "{lines:?}"
    );
    let (lines, _) = run_unprivileged(&config("raw", &p, upstream, None), &["check", "-c"]);
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("gateway.sensor: raw, which cannot start here") && l.contains("CAP_NET_RAW")),
        "{lines:?}"
    );
    let (code, out, err) = run_bin(&["check", "-c", repo_path("proxy.toml").to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("gateway.sensor: socket"), "{out}");
}

#[test]
fn a_reload_watches_the_new_sequence_with_the_same_raw_sockets() {
    if !is_root() {
        eprintln!("skipped: the raw sensor needs root");
        return;
    }
    let s = start();
    let p = &s.p;
    let echo = s.gw.addr("echo");
    // The old sequence opens (which also gives the process the moment it
    // needs to start watching for SIGHUP after `ready`).
    knock_and_wait(&s.gw, "echo", &UDP_SEQ.map(|i| p[i]), "127.77.0.80");
    // The new sequence takes two unused ports and an old step; the other
    // old steps become other ports.
    let new = [p[OTHER], p[UDP_SEQ[2]], p[UNUSED]];
    let quoted = |ports: &[u16]| {
        ports
            .iter()
            .map(|p| format!("\"{p}/udp\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let old = quoted(&UDP_SEQ.map(|i| p[i]));
    let text = std::fs::read_to_string(&s.gw.config_path).unwrap();
    assert!(text.contains(&old), "{text}");
    std::fs::write(&s.gw.config_path, text.replace(&old, &quoted(&new))).unwrap();
    s.gw.signal(nix::sys::signal::Signal::SIGHUP);
    s.gw.wait_for(|l| msg(l) == "config reloaded");
    s.gw.wait_for_nth(2, |l| {
        msg(l) == "raw sensor watching: knock and spa ports are not bound"
    });
    let source = "127.77.0.81";
    knock_and_wait(&s.gw, "echo", &new, source);
    assert!(echo_works(source, echo));
    // The ports are still unbound: nmap sees them as before.
    let states = nmap("-sU", "127.77.0.82", &[p[OTHER], p[UNUSED]]);
    assert!(states.values().all(|(state, _)| state == "closed"), "{states:?}");
}

#[test]
fn over_ipv6_the_ports_look_unused_and_a_knock_opens() {
    if !is_root() {
        eprintln!("skipped: the raw sensor needs root");
        return;
    }
    if std::net::UdpSocket::bind("[::1]:0").is_err() {
        eprintln!("skipped: no IPv6 loopback");
        return;
    }
    let upstream = echo_server("[::1]:0");
    let (gw, p) = Gateway::builder()
        .on_free_ports(PORTS, |p| {
            let steps: Vec<String> = UDP_SEQ.iter().map(|i| format!("\"{}/udp\"", p[*i])).collect();
            format!(
                "[gateway]\nsensor = \"raw\"\n\n[service.echo]\nlisten = \"[::1]:0\"\nupstream = \"{upstream}\"\n\
                 unauthorized = \"refuse\"\nknock = {{ sequence = [{}] }}\n",
                steps.join(", ")
            )
        })
        .start_on_ports();
    let echo = gw.addr("echo");
    let list: Vec<String> = [UDP_SEQ[0], UDP_SEQ[1], UDP_SEQ[2], UNUSED]
        .iter()
        .map(|i| p[*i].to_string())
        .collect();
    // In port order (-r): nmap's default random order walks the three steps
    // in sequence once in twelve scans, and the scan would open the service.
    let out = Command::new("nmap")
        .args(["-6", "-sU", "-Pn", "-n", "-r", "-p", &list.join(","), "::1"])
        .output()
        .expect("nmap");
    let text = String::from_utf8_lossy(&out.stdout);
    let closed = text
        .lines()
        .filter(|l| l.contains("/udp") && l.contains(" closed "))
        .count();
    assert_eq!(closed, list.len(), "every port closed, as the unused one: {text}");

    assert!(!echo_works("::1", echo), "open before any knock");
    let steps: Vec<String> = UDP_SEQ.iter().map(|i| format!("{}/udp", p[*i])).collect();
    let mut args = vec!["::1", "-b", "::1"];
    args.extend(steps.iter().map(String::as_str));
    portcullis_knock(&args);
    gw.wait_grant("echo", "::1");
    assert!(echo_works("::1", echo), "closed after an IPv6 knock");
}
