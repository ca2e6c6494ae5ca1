//! The systemd unit in `deploy/systemd/`: `systemd-analyze verify` accepts
//! it (and its low-port drop-in) without a warning, the offline security
//! review rates it at most "OK", and the binary speaks `Type=notify`:
//! `READY=1` only once every listener answers, `RELOADING=1` + `READY=1`
//! around a SIGHUP reload, `STOPPING=1` on SIGTERM.
//!
//! No systemd runs here as PID 1, so the sandbox itself is not exercised;
//! the notify protocol is, against a datagram socket the test reads, and
//! the system call filter is held against every call the gateway makes
//! under strace through a knock, TCP and UDP traffic, a reload and a drain.

#![allow(
    clippy::unwrap_used,
    clippy::disallowed_methods,
    unreachable_pub,
    reason = "test code: a panic is the failure report, and real time is what is waited on"
)]

mod common;
mod deploy;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

const UNIT: &str = "deploy/systemd/portcullis.service";
const DROP_IN: &str = "deploy/systemd/portcullis.service.d/low-port.conf";
/// Where the unit expects the binary; the copies under test point at the
/// one cargo built instead (verify checks that ExecStart is executable).
const INSTALLED_BIN: &str = "/usr/local/bin/portcullis";

const CREDENTIALS: &str = "deploy/systemd/credentials.conf";

/// The drop-in sets the tests check: none, the low-port one, and both
/// shipped drop-ins together.
const DROP_IN_SETS: [&[&str]; 3] = [&[], &[DROP_IN], &[DROP_IN, CREDENTIALS]];

/// The unit and `drop_ins` copied into a fresh directory, with the binary
/// path pointing at the built binary.
fn unit_copy(drop_ins: &[&str]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(repo_path(UNIT)).unwrap();
    assert!(text.contains(INSTALLED_BIN), "the unit no longer runs {INSTALLED_BIN}");
    let unit = dir.path().join("portcullis.service");
    std::fs::write(&unit, text.replace(INSTALLED_BIN, BIN)).unwrap();
    let d = dir.path().join("portcullis.service.d");
    std::fs::create_dir(&d).unwrap();
    for drop_in in drop_ins {
        let name = Path::new(drop_in).file_name().unwrap();
        std::fs::copy(repo_path(drop_in), d.join(name)).unwrap();
    }
    (dir, unit)
}

fn analyze(args: &[&str], unit: &Path) -> (bool, String, String) {
    let out = Command::new("systemd-analyze")
        .args(args)
        .arg(unit)
        .output()
        .expect("systemd-analyze (Debian's systemd package; scripts/install-test-deps installs it)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn systemd_analyze_verify_accepts_the_unit_and_its_drop_in_without_a_warning() {
    for drop_ins in DROP_IN_SETS {
        let (_dir, unit) = unit_copy(drop_ins);
        let (ok, out, err) = analyze(&["verify"], &unit);
        assert!(ok, "verify failed (drop-ins: {drop_ins:?}):\n{out}{err}");
        // Unknown keys and bad values are warnings with exit 0: none allowed.
        assert!(
            err.trim().is_empty() && out.trim().is_empty(),
            "verify warned (drop-ins: {drop_ins:?}):\n{out}{err}"
        );
    }
}

#[test]
fn the_offline_security_review_rates_the_unit_at_most_ok() {
    for drop_ins in DROP_IN_SETS {
        let (_dir, unit) = unit_copy(drop_ins);
        let (_, out, err) = analyze(&["security", "--offline=true", "--no-pager"], &unit);
        let line = out
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .unwrap_or_else(|| panic!("no rating in:\n{out}{err}"));
        let after = line.rsplit_once(": ").expect("rating after a colon").1;
        let mut words = after.split_whitespace();
        let score: f64 = words.next().unwrap().parse().unwrap();
        let rating = words.next().unwrap();
        eprintln!("drop-ins {drop_ins:?}: exposure {score} {rating}");
        assert!(
            rating == "SAFE" || rating == "OK",
            "rated {rating} ({score}), drop-ins: {drop_ins:?}:\n{out}"
        );
    }
}

#[test]
fn the_unit_keeps_its_promises() {
    let unit = std::fs::read_to_string(repo_path(UNIT)).unwrap();
    for line in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "DynamicUser=yes",
        "StateDirectory=portcullis",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "CapabilityBoundingSet=",
        "SystemCallFilter=@system-service",
    ] {
        assert!(unit.lines().any(|l| l == line), "the unit lacks {line:?}");
    }
    assert!(unit.lines().any(|l| l.starts_with("LimitNOFILE=")));
    assert!(unit.lines().any(|l| l.starts_with("RestrictAddressFamilies=")));
    let drop_in = std::fs::read_to_string(repo_path(DROP_IN)).unwrap();
    assert!(drop_in.contains("CapabilityBoundingSet=CAP_NET_BIND_SERVICE"));
    // The drain must end before systemd's SIGKILL, for every shipped config.
    let stop = unit
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .map(|v| humantime::parse_duration(v).unwrap())
        .expect("TimeoutStopSec");
    let mut configs: Vec<PathBuf> = std::fs::read_dir(repo_path("deploy/examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    configs.push(repo_path("proxy.toml"));
    for c in configs {
        let raw: toml::Table = toml::from_str(&std::fs::read_to_string(&c).unwrap()).unwrap();
        let grace = raw
            .get("gateway")
            .and_then(|g| g.get("shutdown_grace"))
            .and_then(|g| g.as_str())
            .map_or(std::time::Duration::from_secs(10), |g| {
                humantime::parse_duration(g).unwrap()
            });
        assert!(
            grace < stop,
            "{}: shutdown_grace {grace:?} does not end before TimeoutStopSec {stop:?}",
            c.display()
        );
    }
}

/// The gateway under test, killed if an assertion fails first.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One datagram from the notify socket, or a panic naming `what`.
fn next_state(socket: &UnixDatagram, what: &str) -> String {
    let mut buf = [0u8; 4096];
    let n = socket
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no {what} from the gateway: {e}"));
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn ready_comes_after_every_listener_answers_then_reloading_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&sock_path).unwrap();
    socket.set_read_timeout(Some(PATIENCE)).unwrap();
    let upstream = echo_server("127.0.0.1:0");
    // Fixed ports, so the test can probe them the moment READY=1 arrives
    // without reading the log first.
    let p = free_ports(5);
    let config = format!(
        r#"
[gateway]
shutdown_grace = "2s"

[admin]
listen = "127.0.0.1:{}"

[service.echo]
listen = "127.0.0.1:{}"
upstream = "{upstream}"
unauthorized = "refuse"
knock = {{ sequence = ["{}/udp", "{}/udp", "{}/udp"] }}
"#,
        p[0], p[1], p[2], p[4], p[3]
    );
    let config_path = dir.path().join("proxy.toml");
    std::fs::write(&config_path, &config).unwrap();
    let mut child = KillOnDrop(
        Command::new(BIN)
            .args(["--log-format", "json", "serve", "-c"])
            .arg(&config_path)
            .env("NOTIFY_SOCKET", &sock_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = nix::unistd::Pid::from_raw(child.0.id() as i32);

    assert_eq!(next_state(&socket, "READY=1"), "READY=1");
    // Nothing waits here: whatever READY=1 promised must already hold.
    let guarded = std::net::TcpStream::connect(("127.0.0.1", p[1]));
    assert!(guarded.is_ok(), "guarded port not accepting at READY=1: {guarded:?}");
    let ready = curl(&[], &format!("http://127.0.0.1:{}/readyz", p[0]));
    assert_eq!(ready.status, 200, "/readyz at READY=1: {ready:?}");

    nix::sys::signal::kill(pid, Signal::SIGHUP).unwrap();
    assert_eq!(next_state(&socket, "RELOADING=1"), "RELOADING=1");
    assert_eq!(next_state(&socket, "READY=1 after the reload"), "READY=1");

    nix::sys::signal::kill(pid, Signal::SIGTERM).unwrap();
    assert_eq!(next_state(&socket, "STOPPING=1"), "STOPPING=1");
    let deadline = std::time::Instant::now() + PATIENCE;
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "the gateway did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "exit after SIGTERM: {status}");
}

#[test]
fn a_bad_notify_socket_only_warns() {
    let upstream = echo_server("127.0.0.1:0");
    let p = free_ports(3);
    let gw = Gateway::builder()
        .config(&echo_config(upstream, &[p[0], p[2], p[1]], ""))
        .env("NOTIFY_SOCKET", "relative")
        .start();
    gw.wait_for(|l| msg(l) == "cannot notify the service manager");
    assert!(!echo_works("127.0.0.1", gw.addr("echo")), "refuse mode still refuses");
}

/// Every system call name in the groups systemd knows, group by group.
fn syscall_groups() -> std::collections::HashMap<String, Vec<String>> {
    let out = Command::new("systemd-analyze").arg("syscall-filter").output().unwrap();
    let mut groups = std::collections::HashMap::new();
    let mut current: Option<String> = None;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let word = line.split_whitespace().next().unwrap_or("");
        if word.is_empty() || word.starts_with('#') {
            continue;
        }
        if !line.starts_with(' ') {
            current = word.starts_with('@').then(|| word.to_string());
            if let Some(g) = &current {
                groups.insert(g.clone(), Vec::new());
            }
        } else if let Some(g) = &current {
            groups.get_mut(g).expect("inserted above").push(word.to_string());
        }
    }
    groups
}

fn expand(
    groups: &std::collections::HashMap<String, Vec<String>>,
    item: &str,
    out: &mut std::collections::BTreeSet<String>,
) {
    match groups.get(item) {
        Some(members) => members.iter().for_each(|m| expand(groups, m, out)),
        None if item.starts_with('@') => panic!("unknown system call group {item}"),
        None => {
            out.insert(item.to_string());
        }
    }
}

/// The calls the unit's SystemCallFilter= lines allow: the first allow
/// list, minus every `~` deny list after it.
fn unit_allows() -> std::collections::BTreeSet<String> {
    let groups = syscall_groups();
    let unit = std::fs::read_to_string(repo_path(UNIT)).unwrap();
    let mut allowed = std::collections::BTreeSet::new();
    let mut denied = std::collections::BTreeSet::new();
    for value in unit.lines().filter_map(|l| l.strip_prefix("SystemCallFilter=")) {
        match value.strip_prefix('~') {
            Some(deny) => deny.split_whitespace().for_each(|i| expand(&groups, i, &mut denied)),
            None => value.split_whitespace().for_each(|i| expand(&groups, i, &mut allowed)),
        }
    }
    assert!(!allowed.is_empty(), "the unit has no SystemCallFilter allow list");
    &allowed - &denied
}

#[test]
fn every_system_call_the_gateway_makes_is_inside_the_units_filter() {
    let allowed = unit_allows();
    let work = tempfile::tempdir().unwrap();
    // The trace lives outside the config directory, which the gateway
    // watches.
    let conf = work.path().join("etc");
    std::fs::create_dir(&conf).unwrap();
    let trace = work.path().join("trace");
    let tcp_up = echo_server("127.0.0.1:0");
    let udp_up = {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = socket.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            while let Ok((n, from)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(&buf[..n], from);
            }
        });
        addr
    };
    let p = free_ports(8);
    let config = format!(
        r#"
[gateway]
shutdown_grace = "2s"

[admin]
listen = "127.0.0.1:{}"

[service.echo]
listen = "127.0.0.1:0"
upstream = "{tcp_up}"
unauthorized = "refuse"
knock = {{ sequence = ["{}/udp", "{}/udp", "{}/udp"] }}

[service.dgram]
listen = "127.0.0.1:0"
upstream = "{udp_up}"
protocol = "udp"
unauthorized = "refuse"
knock = {{ sequence = ["{}/udp", "{}/udp", "{}/udp"] }}
"#,
        p[0], p[1], p[3], p[2], p[4], p[6], p[5]
    );
    let config_path = conf.join("proxy.toml");
    std::fs::write(&config_path, config).unwrap();
    let mut cmd = Command::new("strace");
    cmd.args(["-f", "-qq", "-o"])
        .arg(&trace)
        .arg(BIN)
        .args(["--log-format", "json", "serve", "-c"])
        .arg(&config_path)
        .env("RUST_LOG", "portcullis=debug");
    let gw = deploy::Logged::spawn(cmd);
    gw.wait_msg(1, "ready");
    let addr_of = |service: &str| -> std::net::SocketAddr {
        let line = gw.wait_nth(1, service, |v| msg(v) == "listening" && v["service"] == service);
        line["addr"].as_str().unwrap().parse().unwrap()
    };
    let (tcp, udp) = (addr_of("echo"), addr_of("dgram"));

    let steps = |a: u16, b: u16, c: u16| [a, b, c].map(|x| format!("{x}/udp"));
    let tcp_steps = steps(p[1], p[3], p[2]);
    portcullis_knock(&["127.0.0.1", &tcp_steps[0], &tcp_steps[1], &tcp_steps[2]]);
    gw.wait_nth(1, "tcp grant", |v| msg(v) == "grant" && v["service"] == "echo");
    // Small and bulk transfers, so both the buffered and the splice paths run.
    let mut s = connect_from("127.0.0.1", tcp).unwrap();
    echo_once(&mut s, b"hello").unwrap();
    echo_once(&mut s, &vec![7u8; 4 << 20]).unwrap();
    drop(s);
    let udp_steps = steps(p[4], p[6], p[5]);
    portcullis_knock(&["127.0.0.1", &udp_steps[0], &udp_steps[1], &udp_steps[2]]);
    gw.wait_nth(1, "udp grant", |v| msg(v) == "grant" && v["service"] == "dgram");
    let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    client.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let deadline = std::time::Instant::now() + PATIENCE;
    let mut buf = [0u8; 64];
    // The kernel filter follows the grant a moment later: resend until
    // the reply comes.
    loop {
        client.send_to(b"ping", udp).unwrap();
        if let Ok((n, _)) = client.recv_from(&mut buf) {
            assert_eq!(&buf[..n], b"ping");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no UDP reply:\n{}", gw.text());
    }
    assert_eq!(curl(&[], &format!("http://127.0.0.1:{}/metrics", p[0])).status, 200);
    let gateway_pid = gateway_under(gw.child.id());
    nix::sys::signal::kill(gateway_pid, Signal::SIGHUP).unwrap();
    gw.wait_msg(1, "config reloaded");
    nix::sys::signal::kill(gateway_pid, Signal::SIGTERM).unwrap();
    gw.wait_msg(1, "stopped");
    let mut gw = gw;
    let status = gw.child.wait().unwrap();
    assert!(status.success(), "strace or the gateway failed: {status}");

    let text = std::fs::read_to_string(&trace).unwrap();
    let mut used = std::collections::BTreeSet::new();
    for line in text.lines() {
        // "PID name(args..." or "PID <... name resumed>..."
        let rest = line.split_once(' ').map_or("", |(_, r)| r.trim_start());
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() && rest[name.len()..].starts_with('(') {
            used.insert(name);
        }
    }
    assert!(
        used.contains("accept4") && used.contains("splice"),
        "the trace misses the data path: {used:?}"
    );
    // execve is strace starting the binary; it is allowed anyway.
    let outside: Vec<_> = used.iter().filter(|c| !allowed.contains(*c)).collect();
    eprintln!(
        "{} distinct system calls, all inside the filter: {}",
        used.len(),
        outside.is_empty()
    );
    assert!(
        outside.is_empty(),
        "system calls outside the unit's SystemCallFilter (the service would get EPERM): {outside:?}"
    );
}

/// The gateway: strace's child.
fn gateway_under(strace: u32) -> nix::unistd::Pid {
    let children = std::fs::read_to_string(format!("/proc/{strace}/task/{strace}/children")).unwrap();
    let pid: i32 = children
        .split_whitespace()
        .next()
        .expect("strace has started the gateway")
        .parse()
        .unwrap();
    nix::unistd::Pid::from_raw(pid)
}

#[test]
fn the_credentials_drop_in_feeds_the_postgres_example_its_key() {
    // What systemd does at start: copy each LoadCredential= source into
    // the credentials directory (%d) under its id, then set Environment=.
    let drop_in = std::fs::read_to_string(repo_path(CREDENTIALS)).unwrap();
    let creds = tempfile::tempdir().unwrap();
    let mut env: Vec<(String, String)> = Vec::new();
    for line in drop_in.lines() {
        if let Some(v) = line.strip_prefix("LoadCredential=") {
            let (id, source) = v.split_once(':').expect("ID:PATH");
            assert!(source.starts_with("/etc/portcullis/"), "{source}");
            let (code, key, err) = run_bin(&["keygen"], &[]);
            assert_eq!(code, 0, "{err}");
            write_private(&creds.path().join(id), key);
        }
        if let Some(v) = line.strip_prefix("Environment=") {
            let (k, v) = v.split_once('=').expect("KEY=VALUE");
            env.push((k.to_string(), v.replace("%d", creds.path().to_str().unwrap())));
        }
    }
    assert!(!env.is_empty(), "the drop-in sets no key path");
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let example = repo_path("deploy/examples/postgres.toml");
    let (code, out, err) = run_bin(&["check", "-c", example.to_str().unwrap()], &env_refs);
    assert_eq!(code, 0, "check with the credentials: {out}{err}");
    // Without them the example's relative key_file is not there.
    let (code, _, err) = run_bin(&["check", "-c", example.to_str().unwrap()], &[]);
    assert_ne!(code, 0, "the example passed without its key: {err}");
}
