//! `check`, `config` and `serve` on every shipped config and on every
//! invalid fixture: each invalid file names, in its first line, the key
//! path its error must mention. Fixtures are checked from a copy with the
//! file modes they mean (see [`fixture_dir`]).

#![allow(
    clippy::unwrap_used,
    clippy::disallowed_methods,
    unreachable_pub,
    reason = "test and bench code: a panic is the failure report, and real time is what is measured"
)]

mod common;

use common::*;
use std::path::{Path, PathBuf};

/// The fixture directory's copy (keep it alive) and its config files.
fn fixtures(kind: &str) -> (tempfile::TempDir, Vec<PathBuf>) {
    let dir = fixture_dir(kind);
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    (dir, files)
}

/// The refusal of a file other users can read; only the fixtures about
/// file modes may show it, so no other fixture fails for that reason.
const OPEN_TO_OTHERS: &str = "other users (mode";

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
    let (_dir, mut files) = fixtures("valid");
    files.push(repo_path("proxy.toml"));
    for f in files {
        let (code, out, err) = run_bin(&["check", "-c", f.to_str().unwrap()], &[]);
        assert_eq!(code, 0, "{}: {out}{err}", f.display());
        assert!(out.contains("ok"), "{out}");
    }
}

#[test]
fn every_invalid_config_is_rejected_by_check_with_its_key_path() {
    let (_dir, files) = fixtures("invalid");
    for f in files {
        let want = expected_error(&f);
        let (code, _, err) = run_bin(&["check", "-c", f.to_str().unwrap()], &[]);
        assert_eq!(code, 1, "{}: check accepted it: {err}", f.display());
        assert!(
            err.contains(&want),
            "{}: error does not mention {want:?}:\n{err}",
            f.display()
        );
        let about_modes = f
            .file_name()
            .is_some_and(|n| n.to_string_lossy().contains("world-readable"));
        assert!(
            about_modes || !err.contains(OPEN_TO_OTHERS),
            "{}: refused for a file mode, not for what it tests:\n{err}",
            f.display()
        );
    }
}

#[test]
fn every_invalid_config_stops_serve_with_its_key_path() {
    let (_dir, files) = fixtures("invalid");
    for f in files {
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
    let ports = free_ports(16);
    let mut text = std::fs::read_to_string(repo_path("proxy.toml")).unwrap();
    let p = |i: usize| ports[i].to_string();
    // Knock steps and traps 7301..=7312 to ports 1..=12, in order.
    for i in (1..=12).rev() {
        text = text.replace(&format!("\"{}/udp\"", 7300 + i), &format!("\"{}/udp\"", p(i)));
    }
    let text = text
        .replace("127.0.0.1:15432", &format!("127.0.0.1:{}", p(0)))
        .replace("127.0.0.1:9464", &format!("127.0.0.1:{}", p(13)));
    let mut gw = Gateway::builder().config(&text).start();
    assert_eq!(gw.addr("postgres").port(), ports[0]);
    assert_eq!(gw.admin.map(|a| a.port()), Some(ports[13]));
    assert_eq!(gw.http("GET", "/readyz", &[]).status, 200);
    gw.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(gw.wait_exit().success());
}

#[test]
fn key_material_never_appears_in_check_or_config_output() {
    let secrets = [
        "Zm9yIHRlc3RzIG9ubHk6IGd1YXJkcyBub3RoaW5nISE",
        "dGVzdCBmaXh0dXJlIGhtYWMga2V5",
        "pa55w",
    ];
    let (valid, invalid) = (fixture_dir("valid"), fixture_dir("invalid"));
    let files = [
        valid.path().join("issue-spa.toml"),
        invalid.path().join("spa-inline-secret.toml"),
        invalid.path().join("spa-key-without-hmac.toml"),
        invalid.path().join("spa-world-readable-key.toml"),
        invalid.path().join("spa-short-passphrase.toml"),
        invalid.path().join("spa-shared-fwknop-keys.toml"),
    ];
    for path in files {
        let f = path.file_name().unwrap().to_string_lossy();
        for cmd in ["check", "config"] {
            let (_, out, err) = run_bin(&[cmd, "-c", path.to_str().unwrap()], &[]);
            for s in secrets {
                assert!(!out.contains(s) && !err.contains(s), "{cmd} {f} printed key material");
            }
        }
    }
}

/// `check` and `serve` on `name` in a copy of the invalid fixtures:
/// both refuse it with `want` in the error.
fn refused_by_check_and_serve(name: &str, want: &dyn Fn(&Path) -> String) {
    let dir = fixture_dir("invalid");
    let config = dir.path().join(name);
    let want = want(dir.path());
    let (code, _, err) = run_bin(&["check", "-c", config.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "check accepted {name}: {err}");
    assert!(err.contains(&want), "check: {want:?} missing from:\n{err}");
    let (code, _, err) = run_bin(&["serve", "-c", config.to_str().unwrap()], &[]);
    assert_eq!(code, 64, "serve did not stop on {name}: {err}");
    assert!(err.contains(&want), "serve: {want:?} missing from:\n{err}");
}

#[test]
fn a_world_readable_key_file_fails_check_naming_the_file_and_the_fix() {
    refused_by_check_and_serve("spa-world-readable-key.toml", &|dir| {
        let key = dir.join("world-readable.key");
        format!(
            "user.fw.key_file: {} is readable by other users (mode 0644): run `chmod 600 {}`",
            key.display(),
            key.display()
        )
    });
    refused_by_check_and_serve("admin-world-readable-token.toml", &|dir| {
        let token = dir.join("world-readable.token");
        format!(
            "admin.token_file: {} is readable by other users (mode 0644): run `chmod 600 {}`",
            token.display(),
            token.display()
        )
    });
}

#[test]
fn a_group_readable_key_file_passes_check_with_a_warning() {
    let dir = fixture_dir("valid");
    let config = dir.path().join("spa-group-readable-key.toml");
    let (code, out, err) = run_bin(&["check", "-c", config.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{out}{err}");
    let key = dir.path().join("group-readable.key");
    let want = format!(
        "warning: user.fw.key_file: {} is readable by its group (mode 0640): unless the group is meant to have it, run `chmod 600 {}`",
        key.display(),
        key.display()
    );
    assert!(err.contains(&want), "{want:?} missing from:\n{err}");
    // The same fixtures at 0600: no warning at all.
    let (code, _, err) = run_bin(
        &["check", "-c", dir.path().join("issue-spa.toml").to_str().unwrap()],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("warning") && !err.contains("WARN"), "{err}");
}

#[test]
fn a_short_passphrase_is_refused() {
    refused_by_check_and_serve("spa-short-passphrase.toml", &|_| {
        "user.fw.key_file: the fwknop encryption key is 5 bytes; keys need at least 16".to_string()
    });
}

#[test]
fn two_users_with_the_same_fwknop_keys_are_refused_naming_both_files() {
    refused_by_check_and_serve("spa-shared-fwknop-keys.toml", &|dir| {
        format!(
            "user.fw2.key_file: the same fwknop HMAC key as user fw ({} and {})",
            dir.join("fw.key").display(),
            dir.join("fw-copy.key").display()
        )
    });
}

#[test]
fn version_names_the_commit_and_the_profile() {
    let (code, out, err) = run_bin(&["--version"], &[]);
    assert_eq!(code, 0, "{err}");
    let profile = if cfg!(debug_assertions) { "debug" } else { "release" };
    assert!(
        out.starts_with(&format!("portcullis {} (commit ", env!("CARGO_PKG_VERSION")))
            && out.trim_end().ends_with(&format!(", {profile})")),
        "{out}"
    );
    // Built from this checkout: its HEAD, not "unknown".
    let head = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output();
    if let Some(head) = head.ok().filter(|o| o.status.success()) {
        let head = String::from_utf8_lossy(&head.stdout).trim().to_owned();
        assert!(out.contains(&format!("(commit {head}")), "{out} is not HEAD {head}");
    }
}

#[test]
fn completions_are_valid_scripts_that_know_the_subcommands() {
    let (code, bash, err) = run_bin(&["completions", "bash"], &[]);
    assert_eq!(code, 0, "{err}");
    for sub in ["serve", "check", "config", "completions", "man", "knock", "spa"] {
        assert!(bash.contains(sub), "bash completion lacks {sub}");
    }
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("portcullis.bash");
    std::fs::write(&script, &bash).unwrap();
    let check = std::process::Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "bash -n: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        let (code, out, err) = run_bin(&["completions", shell], &[]);
        assert_eq!(code, 0, "{shell}: {err}");
        assert!(out.contains("serve"), "{shell}: {out}");
    }
    let (code, _, err) = run_bin(&["completions", "tcsh"], &[]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn man_prints_a_manual_page_that_renders() {
    let (code, roff, err) = run_bin(&["man"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(roff.contains("\n.TH portcullis 1"), "not a manual page:\n{roff}");
    assert!(roff.contains("completions") && roff.contains("serve"), "{roff}");
    let groff = std::process::Command::new("groff")
        .args(["-man", "-Tutf8"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    // groff is optional: without it the .TH header is the check.
    if let Ok(mut groff) = groff {
        use std::io::Write as _;
        groff.stdin.take().unwrap().write_all(roff.as_bytes()).unwrap();
        let out = groff.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "groff: {}", String::from_utf8_lossy(&out.stderr));
        assert!(text.contains("portcullis"), "{text}");
    }
}

#[test]
fn an_environment_override_error_names_the_variable_and_the_key() {
    let file = repo_path("tests/fixtures/config/valid/issue-echo.toml");
    for cmd in ["check", "serve"] {
        let (code, _, err) = run_bin(
            &[cmd, "-c", file.to_str().unwrap()],
            &[("PORTCULLIS__SERVICE__ECHO__OPEN_FOR", "abc")],
        );
        assert_ne!(code, 0, "{cmd}: {err}");
        assert!(
            err.contains("service.echo.open_for") && err.contains("PORTCULLIS__SERVICE__ECHO__OPEN_FOR"),
            "{cmd}: {err}"
        );
    }
    // A key the file has too: the value refused is the environment's.
    let (_, _, err) = run_bin(
        &["check", "-c", file.to_str().unwrap()],
        &[("PORTCULLIS__SERVICE__ECHO__PROTOCOL", "sctp")],
    );
    assert!(err.contains("PORTCULLIS__SERVICE__ECHO__PROTOCOL"), "{err}");
}

#[test]
fn an_unknown_key_close_to_a_known_one_gets_a_suggestion() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    let text = std::fs::read_to_string(repo_path("tests/fixtures/config/valid/issue-echo.toml")).unwrap();
    std::fs::write(&path, text.replace("open_for", "open_fro")).unwrap();
    let (code, _, err) = run_bin(&["check", "-c", path.to_str().unwrap()], &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains("service.echo.open_fro") && err.contains("did you mean `open_for`?"),
        "{err}"
    );
    assert!(
        !err.contains("PORTCULLIS__"),
        "a file key blamed on the environment: {err}"
    );
    // From the environment: the suggestion, and the variable.
    let file = repo_path("tests/fixtures/config/valid/issue-echo.toml");
    let (code, _, err) = run_bin(
        &["check", "-c", file.to_str().unwrap()],
        &[("PORTCULLIS__GATEWAY__MAX_CONECTIONS", "5")],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("gateway.max_conections")
            && err.contains("did you mean `max_connections`?")
            && err.contains("PORTCULLIS__GATEWAY__MAX_CONECTIONS"),
        "{err}"
    );
    // Nothing close: no guess.
    std::fs::write(&path, text.replace("open_for", "colour")).unwrap();
    let (_, _, err) = run_bin(&["check", "-c", path.to_str().unwrap()], &[]);
    assert!(
        err.contains("unknown field `colour`") && !err.contains("did you mean"),
        "{err}"
    );
}

#[test]
fn config_fills_in_every_default_and_keeps_types() {
    let file = repo_path("tests/fixtures/config/valid/issue-echo.toml");
    let env = [("PORTCULLIS__GATEWAY__MAX_CONNECTIONS", "77")];
    let (code, out, err) = run_bin(&["config", "-c", file.to_str().unwrap()], &env);
    assert_eq!(code, 0, "{err}");
    let parsed: toml::Value = toml::from_str(&out).expect("config prints TOML");
    let g = &parsed["gateway"];
    assert_eq!(g["max_connections"].as_integer(), Some(77), "{out}");
    assert_eq!(g["connect_timeout"].as_str(), Some("5s"), "{out}");
    assert_eq!(g["shutdown_grace"].as_str(), Some("10s"), "{out}");
    assert_eq!(g["sensor"].as_str(), Some("socket"), "{out}");
    assert_eq!(parsed["limits"]["lockout_after"].as_integer(), Some(10), "{out}");
    let echo = &parsed["service"]["echo"];
    assert_eq!(echo["max_connections"].as_integer(), Some(77), "{out}");
    assert_eq!(echo["knock"]["trap_lockout"].as_bool(), Some(true), "{out}");
    // What it prints is a config that means the same.
    let dir = tempfile::tempdir().unwrap();
    let again = dir.path().join("effective.toml");
    std::fs::write(&again, &out).unwrap();
    let (code, out2, err) = run_bin(&["config", "-c", again.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out2, out);
    // And as JSON, with the same types.
    let (code, out, err) = run_bin(&["config", "--format", "json", "-c", file.to_str().unwrap()], &env);
    assert_eq!(code, 0, "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).expect("config prints JSON");
    assert_eq!(json["gateway"]["max_connections"], 77, "{out}");
    assert_eq!(json["gateway"]["connect_timeout"], "5s", "{out}");
}

#[test]
fn check_json_lists_errors_and_warnings_with_their_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    let text = std::fs::read_to_string(repo_path("tests/fixtures/config/valid/issue-echo.toml")).unwrap();
    std::fs::write(&path, text.replace("127.0.0.1:15001", "db.example.invalid:5432")).unwrap();
    let (code, out, err) = run_bin(&["check", "--format", "json", "-c", path.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "an unresolvable upstream is not an error: {out}{err}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("one JSON object");
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["errors"], serde_json::json!([]), "{report}");
    let warnings = report["warnings"].as_array().unwrap();
    let dns = warnings
        .iter()
        .find(|w| w["key"] == "service.echo.upstream")
        .unwrap_or_else(|| panic!("no upstream warning: {report}"));
    assert!(dns["message"].as_str().unwrap().contains("db.example.invalid"), "{dns}");
    // The text form says the same on stderr.
    let (code, _, err) = run_bin(&["check", "-c", path.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("warning: service.echo.upstream: \"db.example.invalid:5432\" does not resolve"),
        "{err}"
    );
    // What validation itself warns about is listed too, once: a token
    // file its group may read.
    let token = dir.path().join("admin.token");
    std::fs::write(&token, "t0k3n-for-the-admin-api-0123456789\n").unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o640)).unwrap();
    let with_token = format!("[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"admin.token\"\n\n{text}");
    std::fs::write(&path, &with_token).unwrap();
    let (code, out, err) = run_bin(&["check", "--format", "json", "-c", path.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "a group-readable token is not an error: {out}{err}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("one JSON object");
    let token_warning = report["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["key"] == "admin.token_file")
        .unwrap_or_else(|| panic!("no token file warning: {report}"));
    assert!(
        token_warning["message"].as_str().unwrap().contains("chmod 600"),
        "{token_warning}"
    );
    let (code, _, err) = run_bin(&["check", "-c", path.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(err.matches("admin.token_file").count(), 1, "said once: {err}");
    // An invalid config: ok false, each error with its key, exit 1.
    std::fs::write(&path, text.replace("\"10s\"", "\"soon\"")).unwrap();
    let (code, out, _) = run_bin(&["check", "--format", "json", "-c", path.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{out}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("one JSON object");
    assert_eq!(report["ok"], false, "{report}");
    assert_eq!(report["errors"][0]["key"], "service.echo.open_for", "{report}");
}

#[test]
fn serve_logs_what_check_warns_about() {
    let echo = echo_server("127.0.0.1:0");
    let config = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"admin.token\"\n\n\
         [service.echo]\nlisten = \"127.0.0.1:0\"\nupstream = \"{echo}\"\nunauthorized = \"allow\"\n"
    );
    let gw = Gateway::builder()
        .config(&config)
        .file("admin.token", "t0k3n-for-the-admin-api-0123456789\n")
        .prepare(|dir| {
            let readable = <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o640);
            std::fs::set_permissions(dir.join("admin.token"), readable).unwrap();
        })
        .start();
    let line = gw.wait_for(|l| l["level"] == "WARN" && msg(l).starts_with("admin.token_file: "));
    assert!(msg(&line).contains("chmod 600"), "{line}");
    assert_eq!(gw.count(|l| msg(l).starts_with("admin.token_file: ")), 1, "logged once");
}
