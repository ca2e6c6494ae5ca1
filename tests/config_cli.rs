//! `check`, `config` and `serve` on every shipped config and on every
//! invalid fixture: each invalid file names, in its first line, the key
//! path its error must mention.

#![allow(
    clippy::unwrap_used,
    clippy::disallowed_methods,
    unreachable_pub,
    reason = "test and bench code: a panic is the failure report, and real time is what is measured"
)]

mod common;

use common::*;
use std::path::PathBuf;

fn fixtures(kind: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo_path(&format!("tests/fixtures/config/{kind}")))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    files
}

fn expected_error(path: &PathBuf) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let first = text.lines().next().unwrap_or_default();
    first
        .strip_prefix("# error: ")
        .unwrap_or_else(|| panic!("{} must start with '# error: KEY.PATH'", path.display()))
        .to_string()
}

#[test]
fn every_shipped_and_valid_config_passes_check() {
    let mut files = fixtures("valid");
    files.push(repo_path("proxy.toml"));
    for f in files {
        let (code, out, err) = run_bin(&["check", "-c", f.to_str().unwrap()], &[]);
        assert_eq!(code, 0, "{}: {out}{err}", f.display());
        assert!(out.contains("ok"), "{out}");
    }
}

#[test]
fn every_invalid_config_is_rejected_by_check_with_its_key_path() {
    for f in fixtures("invalid") {
        let want = expected_error(&f);
        let (code, _, err) = run_bin(&["check", "-c", f.to_str().unwrap()], &[]);
        assert_eq!(code, 1, "{}: check accepted it: {err}", f.display());
        assert!(
            err.contains(&want),
            "{}: error does not mention {want:?}:\n{err}",
            f.display()
        );
    }
}

#[test]
fn every_invalid_config_stops_serve_with_its_key_path() {
    for f in fixtures("invalid") {
        let want = expected_error(&f);
        let (code, _, err) = run_bin(&["serve", "-c", f.to_str().unwrap()], &[]);
        assert_eq!(code, 64, "{}: serve did not stop with 64: {err}", f.display());
        assert!(
            err.contains(&want),
            "{}: error does not mention {want:?}:\n{err}",
            f.display()
        );
    }
}

#[test]
fn a_missing_file_is_a_clear_error() {
    let (code, _, err) = run_bin(&["check", "-c", "/nonexistent/proxy.toml"], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot read /nonexistent/proxy.toml"), "{err}");
}

#[test]
fn config_prints_the_effective_config_with_environment_overrides() {
    let file = repo_path("tests/fixtures/config/valid/issue-echo.toml");
    let (code, out, err) = run_bin(
        &["config", "-c", file.to_str().unwrap()],
        &[
            ("PORTCULLIS__SERVICE__ECHO__OPEN_FOR", "5s"),
            ("PORTCULLIS__SERVICE__ECHO__UPSTREAM", "10.1.2.3:5432"),
        ],
    );
    assert_eq!(code, 0, "{err}");
    let parsed: toml::Value = toml::from_str(&out).expect("config prints TOML");
    let echo = &parsed["service"]["echo"];
    assert_eq!(echo["open_for"].as_str(), Some("5s"));
    assert_eq!(echo["upstream"].as_str(), Some("10.1.2.3:5432"));
    assert_eq!(echo["listen"].as_str(), Some("127.0.0.1:15000"));
    assert_eq!(echo["knock"]["sequence"][1].as_str(), Some("17003/udp"));
}

#[test]
fn an_invalid_environment_override_is_reported_with_its_key_path() {
    let file = repo_path("tests/fixtures/config/valid/issue-echo.toml");
    let (code, _, err) = run_bin(
        &["check", "-c", file.to_str().unwrap()],
        &[("PORTCULLIS__SERVICE__ECHO__OPEN_FOR", "forever")],
    );
    assert_eq!(code, 1);
    assert!(err.contains("service.echo.open_for"), "{err}");
}

#[test]
fn the_example_config_serves_and_stops_on_sigterm() {
    // proxy.toml binds fixed ports; move them to free ones via the
    // environment, as an operator would.
    let ports = free_ports(8);
    let text = std::fs::read_to_string(repo_path("proxy.toml")).unwrap();
    let p = |i: usize| ports[i].to_string();
    let text = text
        .replace("127.0.0.1:15432", &format!("127.0.0.1:{}", p(0)))
        .replace("7301/udp", &format!("{}/udp", p(1)))
        .replace("7305/udp", &format!("{}/udp", p(5)))
        .replace("7302/udp", &format!("{}/udp", p(2)))
        .replace("7303/udp", &format!("{}/udp", p(3)))
        .replace("7304/udp", &format!("{}/udp", p(4)))
        .replace("127.0.0.1:9464", &format!("127.0.0.1:{}", p(6)));
    let mut gw = Gateway::builder().config(&text).start();
    assert_eq!(gw.addr("postgres").port(), ports[0]);
    assert_eq!(gw.admin.map(|a| a.port()), Some(ports[6]));
    assert_eq!(gw.http("GET", "/readyz", &[]).status, 200);
    gw.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(gw.wait_exit().success());
}

#[test]
fn key_material_never_appears_in_check_or_config_output() {
    let secrets = [
        "Zm9yIHRlc3RzIG9ubHk6IGd1YXJkcyBub3RoaW5nISE",
        "dGVzdCBmaXh0dXJlIGhtYWMga2V5",
    ];
    let files = [
        "tests/fixtures/config/valid/issue-spa.toml",
        "tests/fixtures/config/invalid/spa-inline-secret.toml",
        "tests/fixtures/config/invalid/spa-key-without-hmac.toml",
    ];
    for f in files {
        let path = repo_path(f);
        for cmd in ["check", "config"] {
            let (_, out, err) = run_bin(&[cmd, "-c", path.to_str().unwrap()], &[]);
            for s in secrets {
                assert!(!out.contains(s) && !err.contains(s), "{cmd} {f} printed key material");
            }
        }
    }
}
