//! Descriptor exhaustion through the real binary: under a descriptor limit
//! of 256 (soft and hard, `prlimit`), a flood of unauthorised
//! connect-and-close to a blackholed port locks no granted user out and
//! leaves `/healthz` answering; one service at its connection cap leaves
//! another's users theirs; `check` refuses caps that cannot fit the limit.

#![allow(
    clippy::unwrap_used,
    clippy::disallowed_methods,
    unreachable_pub,
    reason = "test code: a panic is the failure report, and real time is what is measured"
)]

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The limit the issue names: what many containers and shells start with
/// after a `ulimit -n 256`.
const LIMIT: u64 = 256;

/// `GET path` on the admin endpoint with its own socket and a deadline of
/// `within`; the status, and how long the answer took.
fn get(admin: SocketAddr, path: &str, within: Duration) -> (u16, Duration) {
    let started = Instant::now();
    let Ok(mut s) = TcpStream::connect_timeout(&admin, within) else {
        return (0, started.elapsed());
    };
    s.set_read_timeout(Some(within)).unwrap();
    s.set_write_timeout(Some(within)).unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return (0, started.elapsed());
    }
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|t| t.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, started.elapsed())
}

/// `GET /metrics` over the same one-second deadline.
fn scrape(admin: SocketAddr) -> String {
    let mut s = TcpStream::connect(admin).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer
}

fn blackhole_config(upstream: SocketAddr, p: &[u16]) -> String {
    format!(
        r#"
[gateway]
blackhole_hold = "30s"
[admin]
listen = "127.0.0.1:0"
[service.hole]
listen = "127.0.0.1:0"
upstream = "{upstream}"
unauthorized = "blackhole"
open_for = "120s"
knock = {{ sequence = ["{}/udp", "{}/udp", "{}/udp"] }}
"#,
        p[0], p[2], p[1]
    )
}

#[test]
fn a_connect_and_close_flood_under_256_descriptors_locks_out_no_granted_user() {
    let upstream = echo_server("127.0.0.1:0");
    let (gw, p) = Gateway::builder()
        .nofile(LIMIT, LIMIT)
        .on_free_ports(3, |p| blackhole_config(upstream, p))
        .start_on_ports();
    let svc = gw.addr("hole");
    let admin = gw.admin.unwrap();
    let budget = gw.wait_for(|l| msg(l) == "descriptor budget");
    assert_eq!(budget["limit"], LIMIT);
    assert!(budget["needed"].as_u64().unwrap() <= LIMIT, "{budget}");
    knock_and_wait(&gw, "hole", &[p[0], p[2], p[1]], "127.0.0.2");
    assert!(echo_works("127.0.0.2", svc));

    // Eight flooders on their own sources, 500 connect-and-close each: the
    // attacker holds no socket once its connect returns.
    const FLOODERS: usize = 8;
    const EACH: usize = 500;
    let done = Arc::new(AtomicBool::new(false));
    let connected = Arc::new(AtomicUsize::new(0));
    let flooders: Vec<_> = (0..FLOODERS)
        .map(|i| {
            let connected = connected.clone();
            std::thread::spawn(move || {
                let source = format!("127.0.1.{}", i + 1);
                for _ in 0..EACH {
                    if connect_from(&source, svc).is_ok() {
                        connected.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();

    // Meanwhile the granted source connects and gets data through, and
    // /healthz answers within a second, again and again.
    let (mut probes, mut slowest_health, mut slowest_echo, mut most_fds) = (0, Duration::ZERO, Duration::ZERO, 0.0f64);
    let watcher = {
        let done = done.clone();
        std::thread::spawn(move || {
            for f in flooders {
                f.join().unwrap();
            }
            done.store(true, Ordering::Relaxed);
        })
    };
    let flood_started = Instant::now();
    while !done.load(Ordering::Relaxed) || probes < 10 {
        let started = Instant::now();
        let mut s = connect_from("127.0.0.2", svc).expect("the granted source connects");
        echo_once(&mut s, b"still here").expect("the granted source gets data through");
        slowest_echo = slowest_echo.max(started.elapsed());
        let (status, took) = get(admin, "/healthz", Duration::from_secs(1));
        assert_eq!(status, 200, "/healthz within 1 s during the flood (took {took:?})");
        slowest_health = slowest_health.max(took);
        let fds = metric(&scrape(admin), "process_open_fds", &[]).unwrap_or(0.0);
        most_fds = most_fds.max(fds);
        probes += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    let flood_took = flood_started.elapsed();
    watcher.join().unwrap();

    let scraped = scrape(admin);
    let decided = |d: &str| {
        metric(
            &scraped,
            "portcullis_connections_total",
            &[("service", "hole"), ("decision", d)],
        )
        .unwrap_or(0.0)
    };
    let (blackholed, full, limited) = (
        decided("blackholed"),
        decided("blackhole_full"),
        decided("connection_limit"),
    );
    let shed = metric(&scraped, "portcullis_accept_shed_total", &[]).unwrap_or(0.0);
    let max_fds = metric(&scraped, "process_max_fds", &[]).unwrap_or(0.0);
    eprintln!(
        "flood: {} of {} connects in {flood_took:?}; blackholed {blackholed}, blackhole_full {full}, connection_limit {limited}, shed {shed}; \
         {probes} probes, slowest echo {slowest_echo:?}, slowest /healthz {slowest_health:?}; open fds at most {most_fds} of {max_fds}",
        connected.load(Ordering::Relaxed),
        FLOODERS * EACH
    );
    assert_eq!(max_fds, LIMIT as f64, "the limit the test set");
    assert!(
        most_fds < LIMIT as f64,
        "open descriptors stayed under the limit: {most_fds}"
    );
    assert_eq!(limited, 0.0, "no granted connection was turned away");
    assert_eq!(shed, 0.0, "the caps kept the process off its limit: nothing was shed");
    // Each flood connection closes at once, and its blackhole ends with
    // it: far more were held than fit at once under the limit, in a flood
    // shorter than the 30 s hold.
    assert!(
        blackholed > LIMIT as f64 && flood_took < Duration::from_secs(30),
        "blackholed {blackholed} (refused as full {full}) in {flood_took:?}"
    );
    assert!(
        gw.count(|l| msg(l) == "blackholed connection closed by its peer") > 0,
        "blackholes end when their peer closes"
    );
}

#[test]
fn the_soft_descriptor_limit_is_raised_to_the_hard_one() {
    let upstream = echo_server("127.0.0.1:0");
    let (gw, _) = Gateway::builder()
        .nofile(LIMIT, 2048)
        .on_free_ports(3, |p| blackhole_config(upstream, p))
        .start_on_ports();
    let budget = gw.wait_for(|l| msg(l) == "descriptor budget");
    assert_eq!(budget["limit"], 2048, "{budget}");
    let scraped = scrape(gw.admin.unwrap());
    assert_eq!(metric(&scraped, "process_max_fds", &[]), Some(2048.0));
}

fn two_services(upstream: SocketAddr, p: &[u16]) -> String {
    format!(
        "[gateway]\nmax_connections = 4\n[admin]\nlisten = \"127.0.0.1:0\"\n{}{}",
        knock_service("a", upstream, &[p[0], p[2], p[1]]).replace("open_for", "unauthorized = \"refuse\"\nopen_for"),
        knock_service("b", upstream, &[p[3], p[5], p[4]]).replace("open_for", "unauthorized = \"refuse\"\nopen_for"),
    )
}

#[test]
fn one_service_at_its_connection_cap_leaves_another_its_share() {
    let upstream = echo_server("127.0.0.1:0");
    let (gw, p) = Gateway::builder()
        .on_free_ports(6, |p| two_services(upstream, p))
        .start_on_ports();
    knock_and_wait(&gw, "a", &[p[0], p[2], p[1]], "127.0.0.2");
    knock_and_wait(&gw, "b", &[p[3], p[5], p[4]], "127.0.0.3");
    let (a, b) = (gw.addr("a"), gw.addr("b"));
    // a's users fill a's share of the four: two each.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = connect_from("127.0.0.2", a).unwrap();
        echo_once(&mut s, b"a").unwrap();
        held.push(s);
    }
    // A third to a is reset: a is at its cap...
    // (The reset may reach the client while connect() is returning.)
    let third = connect_from("127.0.0.2", a).and_then(|mut s| echo_once(&mut s, b"a3"));
    assert!(third.is_err(), "a third connection to a is turned away");
    gw.wait_for(|l| msg(l) == "connection refused: at max_connections" && l["service"] == "a");
    // ...and b's users have theirs, twice over at once.
    let mut b_held = Vec::new();
    for _ in 0..2 {
        let mut s = connect_from("127.0.0.3", b).unwrap();
        echo_once(&mut s, b"b").expect("b's users are served while a is at its cap");
        b_held.push(s);
    }
    let scraped = gw.scrape();
    let decided = |svc: &str, d: &str| {
        metric(
            &scraped,
            "portcullis_connections_total",
            &[("service", svc), ("decision", d)],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(decided("a", "connection_limit"), 1.0);
    assert_eq!(decided("b", "connection_limit"), 0.0);
    assert_eq!(decided("b", "allowed"), 2.0);
    // A connection of a that ends gives its place back.
    drop(held.pop());
    let deadline = Instant::now() + PATIENCE;
    loop {
        // Until the place is back the connection is reset, which may
        // reach the client while connect() is still returning.
        let served = connect_from("127.0.0.2", a).and_then(|mut s| echo_once(&mut s, b"again"));
        if served.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "a's place never came back");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn check_under(limit: u64, config: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, config).unwrap();
    let out = std::process::Command::new("prlimit")
        .arg(format!("--nofile={limit}:{limit}"))
        .arg("--")
        .arg(BIN)
        .arg("check")
        .arg("-c")
        .arg(&path)
        .output()
        .expect("run prlimit");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const CAPS_SET: &str = r#"
[gateway]
max_connections = 100
max_blackholed = 1024
[admin]
listen = "127.0.0.1:0"
[service.hole]
listen = "127.0.0.1:0"
upstream = "127.0.0.1:1"
unauthorized = "blackhole"
knock = { sequence = ["9000/udp", "7000/udp", "8000/udp"] }
"#;

#[test]
fn check_reports_caps_that_cannot_fit_the_descriptor_limit() {
    let (code, _, stderr) = check_under(LIMIT, CAPS_SET);
    assert_eq!(code, 1, "{stderr}");
    for key in ["gateway.max_connections", "gateway.max_blackholed"] {
        assert!(stderr.contains(key), "{key} missing: {stderr}");
    }
    assert!(stderr.contains("limit of 256"), "{stderr}");
    // The same caps fit a larger limit, and check says what they cost.
    let (code, stdout, stderr) = check_under(4096, CAPS_SET);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("descriptors: limit 4096"), "{stdout}");
    // Caps left out are derived from the limit, and named.
    let derived = CAPS_SET.replace("max_connections = 100\nmax_blackholed = 1024\n", "");
    let (code, stdout, stderr) = check_under(LIMIT, &derived);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("descriptors: limit 256"), "{stdout}");
    assert!(
        stdout.contains("gateway.max_blackholed: ") && stdout.contains("(derived from the descriptor limit)"),
        "{stdout}"
    );
}

#[test]
fn serve_refuses_caps_that_cannot_fit_the_descriptor_limit() {
    let log = Gateway::builder()
        .nofile(LIMIT, LIMIT)
        .config(CAPS_SET)
        .try_start()
        .err()
        .expect("the gateway refuses to start");
    assert!(log.contains("gateway.max_blackholed"), "{log}");
}
