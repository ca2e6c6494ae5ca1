//! Single Packet Authorization through the real binary: the stock Debian
//! `fwknop` client, our own `portcullis spa`, replays, wrong keys, NAT
//! allow-IPs, IPv6 and a garbage flood.

#![allow(
    clippy::unwrap_used,
    clippy::disallowed_methods,
    unreachable_pub,
    reason = "test and bench code: a panic is the failure report, and real time is what is measured"
)]

mod common;

use common::*;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs `fwknop --key-gen` with a private HOME and writes its output to
/// `dir/name`, as a user would with `fwknop --key-gen > name`.
fn fwknop_keygen(dir: &Path, name: &str) -> PathBuf {
    let out = Command::new("fwknop")
        .arg("--key-gen")
        .env("HOME", dir)
        .output()
        .expect("the stock fwknop client (apt-get install fwknop-client; scripts/install-test-deps does it)");
    assert!(
        out.status.success(),
        "fwknop --key-gen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = dir.join(name);
    write_private(&path, &out.stdout);
    path
}

fn key_value(file: &Path, name: &str) -> String {
    let text = std::fs::read_to_string(file).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .unwrap_or_else(|| panic!("{name} missing from {}", file.display()))
        .trim()
        .to_string()
}

/// Keys for two users made before the gateway starts: `fw` by the stock
/// client, `alice` by `portcullis keygen`, plus `mallory` (fwknop keys) who
/// exists but may open nothing.
struct Keys {
    dir: tempfile::TempDir,
}

impl Keys {
    fn new() -> Keys {
        let dir = tempfile::tempdir().unwrap();
        fwknop_keygen(dir.path(), "fw.key");
        fwknop_keygen(dir.path(), "mallory.key");
        // Keys no configured user holds.
        fwknop_keygen(dir.path(), "stranger.key");
        let (code, out, err) = run_bin(&["keygen"], &[]);
        assert_eq!(code, 0, "{err}");
        write_private(&dir.path().join("alice.key"), out);
        Keys { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_string()
    }
}

fn config(keys: &Keys, upstream: &str, listen_ip: &str, p: &[u16]) -> String {
    format!(
        r#"
[spa]
listen = "{listen_ip}:{}"
max_age = "120s"

[service.pg]
listen = "{listen_ip}:0"
upstream = "{upstream}"
protocol = "tcp"
unauthorized = "refuse"
open_for = "2s"
spa_users = ["alice", "fw"]

[service.other]
listen = "{listen_ip}:0"
upstream = "{upstream}"
spa_users = ["mallory"]

[user.alice]
key_file = "{}"

[user.fw]
key_file = "{}"

[user.mallory]
key_file = "{}"
"#,
        p[0],
        keys.path("alice.key"),
        keys.path("fw.key"),
        keys.path("mallory.key"),
    )
}

struct Setup {
    gw: Gateway,
    keys: Keys,
    spa: SocketAddr,
}

fn start(upstream: &str, listen_ip: &str) -> Setup {
    let keys = Keys::new();
    let (gw, p) = Gateway::builder()
        .on_free_ports(1, |p| config(&keys, upstream, listen_ip, p))
        .start_on_ports();
    let spa = SocketAddr::new(ip(listen_ip.trim_matches(['[', ']'])), p[0]);
    Setup { gw, keys, spa }
}

/// Sends with the stock client from 127.0.0.1.
fn fwknop_send(s: &Setup, key: &str, access: &str, allow: &str, save: Option<&Path>) {
    let file = s.keys.dir.path().join(key);
    let mut cmd = Command::new("fwknop");
    cmd.args([
        "-A",
        access,
        "-a",
        allow,
        "-D",
        "127.0.0.1",
        "-p",
        &s.spa.port().to_string(),
        "--use-hmac",
    ])
    .args(["--key-base64-rijndael", &key_value(&file, "KEY_BASE64")])
    .args(["--key-base64-hmac", &key_value(&file, "HMAC_KEY_BASE64")])
    .args(["--no-rc-file", "--no-save-args"])
    .env("HOME", s.keys.dir.path());
    if let Some(path) = save {
        cmd.arg("--save-packet").arg(path);
    }
    let out = cmd.output().expect("fwknop");
    assert!(out.status.success(), "fwknop: {}", String::from_utf8_lossy(&out.stderr));
}

fn pg_port(s: &Setup) -> String {
    format!("tcp/{}", s.gw.addr("pg").port())
}

/// Runs `portcullis spa` against the gateway's SPA port for pg with
/// `key`, plus `extra` arguments; asserts it succeeded.
fn portcullis_spa(s: &Setup, key: &str, extra: &[&str]) {
    let host = s.spa.ip().to_string();
    let port = s.spa.port().to_string();
    let key = s.keys.path(key);
    let access = pg_port(s);
    let mut args = vec!["spa", "-D", &host, "-p", &port, "-A", &access, "--key-file", &key];
    args.extend_from_slice(extra);
    let (code, _, err) = run_bin(&args, &[]);
    assert_eq!(code, 0, "portcullis {args:?}: {err}");
}

fn rejected(gw: &Gateway, source: &str, reason: &str) {
    gw.wait_for(|l| msg(l) == "spa packet rejected" && l["source"] == source && l["reason"] == reason);
}

#[test]
fn stock_fwknop_opens_the_service_for_its_source_and_psql_runs() {
    let s = start(&pg_upstream(), "127.0.0.1");
    let port = s.gw.addr("pg").port();
    assert!(psql(port, "select 1").is_err(), "psql got through before SPA");
    fwknop_send(&s, "fw.key", &pg_port(&s), "127.0.0.1", None);
    let grant = s.gw.wait_grant("pg", "127.0.0.1");
    assert_eq!(grant["method"], "spa");
    assert_eq!(grant["user"], "fw");
    assert_eq!(psql(port, "select 1").as_deref(), Ok("1"));
    assert!(
        !echo_or_connect_works("127.0.0.2", s.gw.addr("pg")),
        "another source got in"
    );
}

/// Whether a TCP connection from `source` survives long enough to send a
/// byte and not be reset (the upstream here is PostgreSQL or an echo).
fn echo_or_connect_works(source: &str, to: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = connect_from(source, to) else {
        return false;
    };
    s.set_read_timeout(Some(std::time::Duration::from_millis(500))).unwrap();
    if s.write_all(b"\0").is_err() {
        return false;
    }
    let mut b = [0u8; 1];
    !matches!(s.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset)
}

#[test]
fn a_replayed_fwknop_packet_opens_nothing() {
    let upstream = echo_server("127.0.0.1:0");
    let s = start(&upstream.to_string(), "127.0.0.1");
    let saved = s.keys.dir.path().join("packet.txt");
    fwknop_send(&s, "fw.key", &pg_port(&s), "127.0.0.1", Some(&saved));
    s.gw.wait_grant("pg", "127.0.0.1");
    s.gw.wait_for(|l| msg(l) == "grant expired" && l["source"] == "127.0.0.1");
    assert!(!echo_works("127.0.0.1", s.gw.addr("pg")));

    let packet = std::fs::read_to_string(&saved).unwrap();
    udp_from("127.0.0.1", s.spa, packet.trim().as_bytes());
    rejected(&s.gw, "127.0.0.1", "replay");
    assert!(
        !echo_works("127.0.0.1", s.gw.addr("pg")),
        "the replay opened the service"
    );
    assert_eq!(s.gw.count(|l| msg(l) == "grant"), 1);
}

#[test]
fn a_wrong_hmac_key_or_a_service_not_permitted_opens_nothing() {
    let upstream = echo_server("127.0.0.1:0");
    let s = start(&upstream.to_string(), "127.0.0.1");
    // fw's encryption key with an HMAC key no user holds: the MAC check
    // fails for every user.
    let mixed = s.keys.dir.path().join("mixed.key");
    std::fs::write(
        &mixed,
        format!(
            "KEY_BASE64: {}\nHMAC_KEY_BASE64: {}\n",
            key_value(&s.keys.dir.path().join("fw.key"), "KEY_BASE64"),
            key_value(&s.keys.dir.path().join("stranger.key"), "HMAC_KEY_BASE64")
        ),
    )
    .unwrap();
    fwknop_send(&s, "mixed.key", &pg_port(&s), "127.0.0.1", None);
    rejected(&s.gw, "127.0.0.1", "bad_mac");

    // mallory is a user, but not one of pg's.
    fwknop_send(&s, "mallory.key", &pg_port(&s), "127.0.0.1", None);
    rejected(&s.gw, "127.0.0.1", "not_permitted");

    // A port nothing listens on.
    fwknop_send(&s, "fw.key", "tcp/1", "127.0.0.1", None);
    rejected(&s.gw, "127.0.0.1", "unknown_service");

    assert!(!echo_works("127.0.0.1", s.gw.addr("pg")));
    assert_eq!(s.gw.count(|l| msg(l) == "grant"), 0);
}

#[test]
fn an_allow_ip_grants_that_address_and_not_the_sender() {
    let upstream = echo_server("127.0.0.1:0");
    let s = start(&upstream.to_string(), "127.0.0.1");
    fwknop_send(&s, "fw.key", &pg_port(&s), "127.0.0.9", None);
    let accepted = s.gw.wait_for(|l| msg(l) == "spa accepted");
    assert_eq!(accepted["source"], "127.0.0.1");
    assert_eq!(accepted["grantee"], "127.0.0.9");
    s.gw.wait_grant("pg", "127.0.0.9");
    assert!(echo_works("127.0.0.9", s.gw.addr("pg")));
    assert!(!echo_works("127.0.0.1", s.gw.addr("pg")), "the sender was granted too");
}

#[test]
fn native_spa_opens_and_its_replay_opens_nothing() {
    let upstream = echo_server("127.0.0.1:0");
    let s = start(&upstream.to_string(), "127.0.0.1");
    let saved = s.keys.dir.path().join("native.bin");
    portcullis_spa(
        &s,
        "alice.key",
        &["-b", "127.0.0.3", "--save-packet", saved.to_str().unwrap()],
    );
    let grant = s.gw.wait_grant("pg", "127.0.0.3");
    assert_eq!(grant["user"], "alice");
    assert!(echo_works("127.0.0.3", s.gw.addr("pg")));
    assert!(!echo_works("127.0.0.4", s.gw.addr("pg")));

    s.gw.wait_for(|l| msg(l) == "grant expired" && l["source"] == "127.0.0.3");
    udp_from("127.0.0.3", s.spa, &std::fs::read(&saved).unwrap());
    rejected(&s.gw, "127.0.0.3", "replay");
    assert!(!echo_works("127.0.0.3", s.gw.addr("pg")));
}

#[test]
fn native_spa_over_ipv6() {
    let upstream = echo_server("[::1]:0");
    let s = start(&upstream.to_string(), "[::1]");
    portcullis_spa(&s, "alice.key", &[]);
    s.gw.wait_grant("pg", "::1");
    assert!(echo_works("::1", s.gw.addr("pg")));
}

#[test]
fn portcullis_spa_in_fwknop_format_is_accepted() {
    let upstream = echo_server("127.0.0.1:0");
    let s = start(&upstream.to_string(), "127.0.0.1");
    portcullis_spa(&s, "fw.key", &["--fwknop", "-b", "127.0.0.6"]);
    let accepted = s.gw.wait_for(|l| msg(l) == "spa accepted");
    assert_eq!(accepted["format"], "fwknop");
    s.gw.wait_grant("pg", "127.0.0.6");
    assert!(echo_works("127.0.0.6", s.gw.addr("pg")));
}

#[test]
fn a_garbage_flood_does_not_stop_a_valid_packet_sent_during_it() {
    let upstream = echo_server("127.0.0.1:0");
    let s = start(&upstream.to_string(), "127.0.0.1");
    let spa = s.spa;
    // Garbage from 200 other sources, as a spoofed flood would look,
    // before, during and after the valid packet.
    let flood = std::thread::spawn(move || {
        let sockets: Vec<std::net::UdpSocket> = (1..=200u8)
            .map(|i| std::net::UdpSocket::bind(SocketAddr::from(([127, 0, 1, i], 0))).unwrap())
            .collect();
        let mut junk = vec![0u8; 1400];
        for i in 0..20_000u32 {
            // Bursts of 200 datagrams at full speed, a millisecond apart: a
            // flood of about 100k datagrams per second.
            if i % 200 == 0 {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            junk[..4].copy_from_slice(&i.to_le_bytes());
            let len = 1 + (i as usize * 7919) % junk.len();
            let socket = &sockets[i as usize % sockets.len()];
            let _ = socket.send_to(&junk[..len], spa);
            if i % 7 == 0 {
                let b64 = format!("{i:0>200}");
                let _ = socket.send_to(b64.as_bytes(), spa);
            }
        }
    });
    fwknop_send(&s, "fw.key", &pg_port(&s), "127.0.0.9", None);
    flood.join().unwrap();
    s.gw.wait_grant("pg", "127.0.0.9");
    assert!(echo_works("127.0.0.9", s.gw.addr("pg")));
    // The flooding sources were rejected, and not locked out: a lockout
    // of forgeable sources would let a forger lock real users out.
    assert!(s.gw.count(|l| msg(l) == "spa packet rejected" || msg(l) == "malformed spa packet") > 0);
    assert_eq!(s.gw.count(|l| msg(l).starts_with("source locked out")), 0);
}
