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
