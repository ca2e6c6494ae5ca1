//! Log set-up through the real binary: levels in either spelling, an
//! unknown level refused at start-up, start-up errors on stderr whatever
//! the level, no colour codes off a terminal, and a version line.

#![allow(
    clippy::unwrap_used,
    clippy::disallowed_methods,
    unreachable_pub,
    reason = "test and bench code: a panic is the failure report, and real time is what is measured"
)]

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Command, Stdio};

/// A valid config in a new directory: one knock-guarded echo service
/// listening on `listen`.
fn config(listen: &str) -> (tempfile::TempDir, String) {
    let upstream = echo_server("127.0.0.1:0");
    let p = free_ports(3);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    let text = knock_service("echo", upstream, &[p[0], p[2], p[1]]).replace("127.0.0.1:0", listen);
    std::fs::write(&path, text).unwrap();
    (dir, path.to_str().unwrap().to_owned())
}

/// `serve` until its `ready` line, then SIGTERM; returns all of stderr
/// (read through a pipe) and whether it exited 0.
fn serve_until_ready(args: &[&str], env: &[(&str, &str)]) -> (String, bool) {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env_remove("RUST_LOG").env_remove("NO_COLOR");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut text = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        text.push_str(&line);
        text.push('\n');
        if line.contains("ready") {
            break;
        }
    }
    assert!(text.contains("ready"), "no ready line:\n{text}");
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    for line in lines {
        text.push_str(&line.unwrap());
        text.push('\n');
    }
    (text, child.wait().unwrap().success())
}

#[test]
fn human_logs_through_a_pipe_carry_no_escape_codes_and_start_with_the_version() {
    let (_dir, path) = config("127.0.0.1:0");
    let (text, ok) = serve_until_ready(&["serve", "-c", &path], &[]);
    assert!(ok, "{text}");
    assert!(!text.contains('\x1b'), "escape codes in a pipe:\n{text:?}");
    let first = text.lines().next().unwrap();
    assert!(
        first.contains("starting portcullis") && first.contains(env!("CARGO_PKG_VERSION")),
        "the first line is not the version line:\n{text}"
    );
}

/// Colour on a terminal (a pseudo-terminal from `script`), and not there
/// with `NO_COLOR`.
#[test]
fn colour_only_on_a_terminal_and_never_with_no_color() {
    let run = |no_color: bool| {
        let mut cmd = Command::new("script");
        cmd.args([
            "-qec",
            &format!("{BIN} --log-level warning serve -c /nonexistent.toml"),
            "/dev/null",
        ])
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR");
        if no_color {
            cmd.env("NO_COLOR", "1");
        }
        let out = cmd.stdin(Stdio::null()).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let tty = run(false);
    assert!(tty.contains("nonexistent.toml"), "{tty}");
    assert!(tty.contains('\x1b'), "no colour on a terminal: {tty:?}");
    let plain = run(true);
    assert!(plain.contains("nonexistent.toml"), "{plain}");
    assert!(!plain.contains('\x1b'), "colour despite NO_COLOR: {plain:?}");
}

#[test]
fn log_level_warning_is_warn() {
    let (_dir, path) = config("127.0.0.1:0");
    let (text, ok) = serve_until_ready(&["--log-level", "info", "serve", "-c", &path], &[]);
    assert!(ok && text.contains("ready"), "{text}");
    // At warn, info lines (ready included) are gone, and errors remain.
    let (code, _, err) = run_bin(&["--log-level", "warning", "serve", "-c", "/nonexistent.toml"], &[]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("ERROR") && err.contains("/nonexistent.toml"), "{err}");
    assert!(!err.contains("INFO"), "info lines at warn: {err}");
    // The environment variable takes the same spelling.
    let (code, _, err) = run_bin(
        &["serve", "-c", "/nonexistent.toml"],
        &[("PORTCULLIS_LOG_LEVEL", "WARNING,portcullis::audit=info")],
    );
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("ERROR") && !err.contains("INFO"), "{err}");
}

#[test]
fn an_unknown_log_level_is_an_error_on_stderr() {
    for level in ["nonsense", "verbose"] {
        let (code, out, err) = run_bin(&["--log-level", level, "serve", "-c", "/nonexistent.toml"], &[]);
        assert_eq!(code, 2, "{level}: {err}");
        assert!(out.is_empty(), "{out}");
        assert!(
            err.contains(&format!("{level:?} is not a log level")) && err.contains("--log-level"),
            "{level}: {err}"
        );
    }
}

/// A port in use ends start-up with a message on stderr at every level,
/// `off` included.
#[test]
fn a_port_in_use_is_reported_at_any_level() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let (_dir, path) = config(&taken.local_addr().unwrap().to_string());
    for level in ["warning", "error", "off"] {
        let (code, _, err) = run_bin(&["--log-level", level, "serve", "-c", &path], &[("NO_COLOR", "")]);
        assert_eq!(code, 1, "{level}: {err}");
        assert!(
            err.contains("cannot listen on service.echo.listen") && err.contains("in use"),
            "{level}: not said: {err:?}"
        );
    }
}

/// The commit `--version` names: the one the JSON start-up line carries
/// too. A build from a git checkout names a hash, never "unknown".
fn version_commit() -> String {
    let (code, out, err) = run_bin(&["--version"], &[]);
    assert_eq!(code, 0, "{err}");
    let commit = out
        .split("(commit ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .unwrap_or_else(|| panic!("no commit in {out:?}"));
    commit.to_owned()
}

#[test]
fn the_start_up_line_and_build_info_name_the_version_commit_and_profile() {
    let upstream = echo_server("127.0.0.1:0");
    let gw = Gateway::builder()
        .on_free_ports(3, |p| {
            knock_service("echo", upstream, &[p[0], p[2], p[1]]) + "\n[admin]\nlisten = \"127.0.0.1:0\"\n"
        })
        .start();
    let line = gw.wait_for(|l| msg(l) == "starting portcullis");
    let commit = version_commit();
    assert_eq!(line["version"], env!("CARGO_PKG_VERSION"), "{line}");
    assert_eq!(line["commit"], commit.as_str(), "{line}");
    assert_eq!(
        line["profile"],
        if cfg!(debug_assertions) { "debug" } else { "release" }
    );
    let scrape = gw.scrape();
    let labels = [
        ("version", env!("CARGO_PKG_VERSION")),
        ("commit", commit.as_str()),
        ("profile", line["profile"].as_str().unwrap()),
    ];
    assert_eq!(metric(&scrape, "portcullis_build_info", &labels), Some(1.0), "{scrape}");
}

/// A second SIGINT while connections drain ends the process at once, with
/// 130 and a line saying so, instead of waiting out the grace.
#[test]
fn a_second_sigint_during_the_drain_exits_at_once() {
    use nix::sys::signal::Signal;
    use std::os::unix::process::ExitStatusExt as _;
    let upstream = echo_server("127.0.0.1:0");
    let (mut gw, p) = Gateway::builder()
        .on_free_ports(3, |p| {
            format!(
                "[gateway]\nshutdown_grace = \"1h\"\n{}",
                knock_service("echo", upstream, &[p[0], p[2], p[1]])
            )
        })
        .start_on_ports();
    knock_and_wait(&gw, "echo", &[p[0], p[2], p[1]], "127.0.0.1");
    let mut held = connect_from("127.0.0.1", gw.addr("echo")).unwrap();
    echo_once(&mut held, b"held open").unwrap();
    gw.signal(Signal::SIGINT);
    let draining = gw.wait_for(|l| msg(l) == "listeners closed, draining connections");
    assert_eq!(draining["in_flight"], 1, "{draining}");
    assert_eq!(
        draining["grace_s"], 3600.0,
        "durations are logged in seconds: {draining}"
    );
    gw.signal(Signal::SIGINT);
    // wait_exit gives up long before the hour of grace.
    let status = gw.wait_exit();
    assert_eq!(status.code(), Some(130), "{status:?} (signal {:?})", status.signal());
    let line = gw.wait_for(|l| msg(l).starts_with("second signal during the drain"));
    assert_eq!(line["signal"], "SIGINT", "{line}");
    assert_eq!(gw.count(|l| msg(l) == "stopped"), 0, "it waited for the drain");
    drop(held);
}

/// Start-up config errors in the JSON format: one line whose `problems`
/// is the list of {key, message} a failed reload logs.
#[test]
fn json_start_up_config_errors_are_a_list_of_keys_and_messages() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(
        &path,
        "[gateway]\nshutdown_grace = \"soon\"\n[service.a]\nlisten = \"nowhere\"\nupstream = \"127.0.0.1:2\"\nknock = { sequence = [\"7000/udp\", \"9000/udp\", \"8000/udp\"] }\n",
    )
    .unwrap();
    let (code, _, err) = run_bin(
        &["--log-format", "json", "serve", "-c", path.to_str().unwrap()],
        &[("PORTCULLIS__SERVICE__A__OPEN_FOR", "abc")],
    );
    assert_eq!(code, 64, "{err}");
    let line: serde_json::Value = err
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .find(|l: &serde_json::Value| l["level"] == "ERROR")
        .unwrap_or_else(|| panic!("no JSON error line:\n{err}"));
    assert_eq!(line["config"], path.to_str().unwrap(), "{line}");
    let problems: Vec<serde_json::Value> =
        serde_json::from_str(line["problems"].as_str().expect("problems is JSON text")).unwrap();
    let keys: Vec<&str> = problems.iter().map(|p| p["key"].as_str().unwrap()).collect();
    assert_eq!(
        keys,
        ["gateway.shutdown_grace", "service.a.listen", "service.a.open_for"],
        "{line}"
    );
    assert!(problems
        .iter()
        .all(|p| p["message"].as_str().is_some_and(|m| !m.is_empty())));
    let env = problems[2]["message"].as_str().unwrap();
    assert!(env.contains("PORTCULLIS__SERVICE__A__OPEN_FOR"), "{env}");
}

/// Junk at the SPA port, as any scanner sends: counted, a debug line
/// each and one info summary, never a warning per datagram.
#[test]
fn a_burst_of_junk_spa_datagrams_is_counted_and_summarised_without_warnings() {
    let dir = tempfile::tempdir().unwrap();
    let (code, key, err) = run_bin(&["keygen"], &[]);
    assert_eq!(code, 0, "{err}");
    let key_path = dir.path().join("alice.key");
    write_private(&key_path, key);
    let upstream = echo_server("127.0.0.1:0");
    let (gw, p) = Gateway::builder()
        .on_free_ports(1, |p| {
            format!(
                // One source, so no per-source limit may drop what it sends.
                "[limits]\nper_source_rate = 100000\nper_source_burst = 100000\nlockout_after = 100000\n\
                 [spa]\nlisten = \"127.0.0.1:{}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
                 [service.pg]\nlisten = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\nspa_users = [\"alice\"]\n\
                 [user.alice]\nkey_file = \"{}\"\n",
                p[0],
                key_path.display()
            )
        })
        .start_on_ports();
    const BURST: usize = 200;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..BURST {
        // Bytes of no SPA format, then some too short to be fwknop's.
        let junk: Vec<u8> = if i % 2 == 0 {
            vec![0xff; 1 + i % 64]
        } else {
            b"GET /".to_vec()
        };
        socket.send_to(&junk, ("127.0.0.1", p[0])).unwrap();
    }
    // Every datagram is counted (the metric is the readiness signal).
    let counted = || {
        let scrape = gw.scrape();
        metric(&scrape, "portcullis_spa_packets_total", &[("result", "malformed")]).unwrap_or(0.0)
            + metric(&scrape, "portcullis_spa_packets_total", &[("format", "unknown")]).unwrap_or(0.0)
            - metric(
                &scrape,
                "portcullis_spa_packets_total",
                &[("format", "unknown"), ("result", "malformed")],
            )
            .unwrap_or(0.0)
    };
    let deadline = std::time::Instant::now() + PATIENCE;
    while counted() < BURST as f64 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let summary = gw.wait_for(|l| msg(l).contains("malformed spa packet(s) since the last report"));
    assert_eq!(summary["level"], "INFO", "{summary}");
    // Debug lines too, but under the rate limit: not one per datagram.
    let debug = gw.count(|l| msg(l) == "malformed spa packet");
    assert!((1..BURST).contains(&debug), "{debug} debug lines for {BURST} datagrams");
    assert_eq!(
        gw.count(|l| l["level"] == "WARN"),
        0,
        "warnings for junk:\n{}",
        gw.log_text()
    );
    let scrape = gw.scrape();
    let counted = counted();
    assert_eq!(counted, BURST as f64, "{scrape}");
}

/// An upstream whose name does not resolve is a start-up warning, not a
/// refusal: DNS may come up after the gateway.
#[test]
fn an_unresolvable_upstream_is_a_warning_at_start_up() {
    let gw = Gateway::builder()
        .on_free_ports(3, |p| {
            knock_service("echo", "127.0.0.1:9".parse().unwrap(), &[p[0], p[2], p[1]])
                .replace("127.0.0.1:9", "nothing-here.invalid:5432")
        })
        .start();
    let line = gw.wait_for(|l| l["key"] == "service.echo.upstream");
    assert_eq!(line["level"], "WARN", "{line}");
    assert!(msg(&line).contains("nothing-here.invalid:5432"), "{line}");
}
