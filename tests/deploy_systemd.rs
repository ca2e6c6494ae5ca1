//! The systemd unit in `deploy/systemd/`: `systemd-analyze verify` accepts
//! it (and its low-port drop-in) without a warning, the offline security
//! review rates it at most "OK", and the binary speaks `Type=notify`:
//! `READY=1` only once every listener answers, `RELOADING=1` + `READY=1`
//! around a SIGHUP reload, `STOPPING=1` on SIGTERM.
//!
//! No systemd runs here as PID 1, so the sandbox itself is not exercised;
//! the notify protocol is, against a datagram socket the test reads.

mod common;

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

/// The unit (and optionally its drop-in) copied into a fresh directory,
/// with the binary path pointing at the built binary.
fn unit_copy(with_drop_in: bool) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(repo_path(UNIT)).unwrap();
    assert!(text.contains(INSTALLED_BIN), "the unit no longer runs {INSTALLED_BIN}");
    let unit = dir.path().join("portcullis.service");
    std::fs::write(&unit, text.replace(INSTALLED_BIN, BIN)).unwrap();
    if with_drop_in {
        let d = dir.path().join("portcullis.service.d");
        std::fs::create_dir(&d).unwrap();
        std::fs::copy(repo_path(DROP_IN), d.join("low-port.conf")).unwrap();
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
    for with_drop_in in [false, true] {
        let (_dir, unit) = unit_copy(with_drop_in);
        let (ok, out, err) = analyze(&["verify"], &unit);
        assert!(ok, "verify failed (drop-in: {with_drop_in}):\n{out}{err}");
        // Unknown keys and bad values are warnings with exit 0: none allowed.
        assert!(
            err.trim().is_empty() && out.trim().is_empty(),
            "verify warned (drop-in: {with_drop_in}):\n{out}{err}"
        );
    }
}

#[test]
fn the_offline_security_review_rates_the_unit_at_most_ok() {
    for with_drop_in in [false, true] {
        let (_dir, unit) = unit_copy(with_drop_in);
        let (_, out, err) = analyze(&["security", "--offline=true", "--no-pager"], &unit);
        let line = out
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .unwrap_or_else(|| panic!("no rating in:\n{out}{err}"));
        let after = line.rsplit_once(": ").expect("rating after a colon").1;
        let mut words = after.split_whitespace();
        let score: f64 = words.next().unwrap().parse().unwrap();
        let rating = words.next().unwrap();
        eprintln!("drop-in {with_drop_in}: exposure {score} {rating}");
        assert!(
            rating == "SAFE" || rating == "OK",
            "rated {rating} ({score}), drop-in: {with_drop_in}:\n{out}"
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
    // The drain must fit inside the stop timeout: proxy.toml's grace is 10s.
    assert!(unit.contains("TimeoutStopSec=30s"));
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
    let gw = Gateway::start_with_env(
        &echo_config(upstream, &[p[0], p[2], p[1]], ""),
        &[("NOTIFY_SOCKET", "relative")],
    );
    gw.wait_for(|l| msg(l) == "cannot notify the service manager");
    assert!(!echo_works("127.0.0.1", gw.addr("echo")), "refuse mode still refuses");
}
