//! `portcullis import` through the real binary, on the configs Debian's
//! knockd and fwknop-server packages ship (the installed files, and the
//! copies in tests/fixtures/import in case the packages change): the
//! output either passes `check`, or fails it only on key paths that the
//! import's `# TODO` comments name. Then the imported configs are served,
//! and the stock `knock` and `fwknop` clients open them.

#![allow(
    clippy::unwrap_used,
    clippy::disallowed_methods,
    unreachable_pub,
    reason = "test and bench code: a panic is the failure report, and real time is what is measured"
)]

mod common;

use common::*;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The installed file, if the package is installed, and the fixture copy.
fn shipped(installed: &str, fixture: &str) -> Vec<PathBuf> {
    let mut v = Vec::new();
    if Path::new(installed).is_file() {
        v.push(PathBuf::from(installed));
    } else {
        eprintln!("{installed} is not installed (scripts/install-test-deps): testing the fixture only");
    }
    v.push(repo_path(&format!("tests/fixtures/import/{fixture}")));
    v
}

/// The config's comments, with wrapped lines joined.
fn comments(toml: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in toml.lines() {
        if let Some(more) = line.strip_prefix("#   ") {
            if let Some(last) = out.last_mut() {
                last.push(' ');
                last.push_str(more.trim());
                continue;
            }
        }
        if let Some(c) = line.strip_prefix("# ") {
            out.push(c.to_string());
        }
    }
    out
}

/// Key paths the import's TODO comments name.
fn todo_paths(toml: &str) -> Vec<String> {
    comments(toml)
        .iter()
        .filter_map(|c| Some(c.strip_prefix("TODO ")?.split_once(": ")?.0.to_string()))
        .collect()
}

/// `check`'s exit code, and the key paths of its problems and warnings.
fn check(config: &Path) -> (i32, Vec<String>, String) {
    let (code, out, err) = run_bin(&["check", "-c", config.to_str().unwrap()], &[]);
    let mut paths = Vec::new();
    for line in err.lines() {
        let rest = line.strip_prefix("warning: ").or_else(|| line.strip_prefix("  "));
        if let Some((path, _)) = rest.and_then(|r| r.split_once(": ")) {
            paths.push(path.to_string());
        }
    }
    (code, paths, format!("{out}{err}"))
}

/// Whether a comment on `named` speaks for `path` (it or a key inside it).
fn covers(named: &str, path: &str) -> bool {
    path.strip_prefix(named)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.') || rest.starts_with('['))
}

fn assert_only_named_problems(config: &Path, toml: &str) -> (i32, Vec<String>) {
    let (code, problems, text) = check(config);
    let named = todo_paths(toml);
    for p in &problems {
        assert!(
            named.iter().any(|n| covers(n, p)),
            "check reports {p}, which no TODO comment names (TODOs: {named:?}):\n{text}\n{toml}"
        );
    }
    assert!(
        code == 0 || !problems.is_empty(),
        "check failed without a key path:\n{text}"
    );
    (code, problems)
}

fn import(args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["import"];
    all.extend_from_slice(args);
    run_bin(&all, &[])
}

/// The import with each suggested `# knock = ...` line taking the place
/// of the knock above it.
fn apply_suggestions(toml: &str) -> String {
    let lines: Vec<&str> = toml.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].starts_with("knock = ") && lines.get(i + 1).is_some_and(|n| n.starts_with("# knock = ")) {
            out.push(&lines[i + 1][2..]);
            i += 2;
            continue;
        }
        out.push(lines[i]);
        i += 1;
    }
    out.join("\n") + "\n"
}

#[test]
fn debian_knockd_conf_imports_to_a_config_whose_only_problems_its_comments_name() {
    for source in shipped("/etc/knockd.conf", "knockd.conf") {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("knockd.conf");
        std::fs::copy(&source, &file).unwrap();
        let (code, toml, err) = import(&["knockd", file.to_str().unwrap()]);
        assert_eq!(code, 0, "{}: {err}", source.display());
        let config = dir.path().join("proxy.toml");
        std::fs::write(&config, &toml).unwrap();
        let (code, problems) = assert_only_named_problems(&config, &toml);

        // What Debian's file holds: openSSH's 7000,8000,9000 ascends, which
        // check refuses; closeSSH only deletes the rule; openHTTPS passes
        // the rules but a random-order scan opens it 1 time in 24.
        let text = std::fs::read_to_string(&source).unwrap();
        if text.contains("7000,8000,9000") {
            assert_eq!(code, 1, "{toml}");
            assert!(
                problems.contains(&"service.openssh.knock.sequence".to_string()),
                "{problems:?}"
            );
            let c = comments(&toml);
            let refused = c
                .iter()
                .find(|c| c.starts_with("TODO service.openssh.knock.sequence: "))
                .unwrap();
            assert!(refused.contains("7000/tcp\", \"9000/tcp\", \"8000/tcp"), "{refused}");
            assert!(refused.contains("20 trap port(s)"), "{refused}");
            assert!(!toml.contains("[service.closessh]"), "{toml}");
            assert!(
                c.iter()
                    .any(|c| c.starts_with("NOTE [closeSSH]") && c.contains("not carried over")),
                "{toml}"
            );
            assert!(c
                .iter()
                .any(|c| c.starts_with("TODO service.openhttps.knock: ") && c.contains("1 in 24")));
            assert!(toml.contains("listen = \"0.0.0.0:22\""), "{toml}");
            assert!(toml.contains("listen = \"0.0.0.0:443\""), "{toml}");
        }
        // Every command is listed as not carried over.
        let c = comments(&toml).join("\n");
        for line in text.lines() {
            let Some((key, cmd)) = line.split_once('=') else {
                continue;
            };
            if key.trim().ends_with("command") {
                let cmd = cmd.split_whitespace().collect::<Vec<_>>().join(" ");
                assert!(c.contains(&cmd), "command {cmd:?} not listed:\n{toml}");
            }
        }

        // The suggested knocks pass check, with no warning about them.
        std::fs::write(&config, apply_suggestions(&toml)).unwrap();
        let (code, problems, out) = check(&config);
        assert_eq!(code, 0, "{out}");
        assert!(problems.is_empty(), "{out}");
        assert!(out.contains("1 in 10626"), "{out}");
    }
}

/// The fresh key file the fwknopd import wrote: its path and text.
fn key_file(keys: &Path, name: &str) -> (PathBuf, String) {
    let path = keys.join(name);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{}", path.display());
    let text = std::fs::read_to_string(&path).unwrap();
    (path, text)
}

fn key_value(text: &str, name: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .unwrap_or_else(|| panic!("{name} missing"))
        .trim()
        .to_string()
}

#[test]
fn debian_access_conf_imports_with_fresh_keys_that_check_accepts() {
    let access = shipped("/etc/fwknop/access.conf", "access.conf");
    let daemon = shipped("/etc/fwknop/fwknopd.conf", "fwknopd.conf");
    for (access, daemon) in access.iter().zip(&daemon) {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("fwknop");
        std::fs::create_dir(&etc).unwrap();
        std::fs::copy(access, etc.join("access.conf")).unwrap();
        std::fs::copy(daemon, etc.join("fwknopd.conf")).unwrap();
        let keys = dir.path().join("keys");

        // Keys are never printed: without -o the import refuses.
        let (code, out, err) = import(&["fwknopd", etc.to_str().unwrap()]);
        assert_eq!(code, 1, "{out}{err}");
        assert!(err.contains("-o DIR"), "{err}");
        assert!(out.is_empty(), "{out}");

        let (code, toml, err) = import(&["fwknopd", etc.to_str().unwrap(), "-o", keys.to_str().unwrap()]);
        assert_eq!(code, 0, "{err}");
        let config = dir.path().join("proxy.toml");
        std::fs::write(&config, &toml).unwrap();
        let (code, _) = assert_only_named_problems(&config, &toml);
        assert_eq!(code, 0, "{toml}");

        let (path, text) = key_file(&keys, "user1.key");
        for name in ["KEY_BASE64", "HMAC_KEY_BASE64"] {
            let v = key_value(&text, name);
            assert_ne!(v, "__CHANGEME__");
            assert!(!toml.contains(&v) && !err.contains(&v), "{name} printed");
        }
        assert!(toml.contains(&format!("key_file = \"{}\"", path.display())), "{toml}");
        let c = comments(&toml);
        assert!(
            c.iter()
                .any(|c| c.starts_with("TODO user.user1.key_file: ") && c.contains("__CHANGEME__")),
            "{toml}"
        );
        assert!(c
            .iter()
            .any(|c| c.starts_with("TODO service.ssh.listen: ") && c.contains("OPEN_PORTS")));
        assert!(toml.contains("listen = \"0.0.0.0:62201\""), "{toml}");

        // Key files are not overwritten without --force; the file path
        // (access.conf itself) imports as the directory does.
        let (code, _, err) = import(&[
            "fwknopd",
            etc.join("access.conf").to_str().unwrap(),
            "-o",
            keys.to_str().unwrap(),
        ]);
        assert_eq!(code, 1);
        assert!(err.contains("exists"), "{err}");
        assert_eq!(key_file(&keys, "user1.key").1, text, "overwritten");
        let (code, _, err) = import(&[
            "fwknopd",
            etc.join("access.conf").to_str().unwrap(),
            "-o",
            keys.to_str().unwrap(),
            "--force",
        ]);
        assert_eq!(code, 0, "{err}");
        assert_ne!(key_file(&keys, "user1.key").1, text, "--force makes fresh keys");
    }
}

#[test]
fn an_imported_knockd_config_opens_to_the_stock_knock_client() {
    let upstream = echo_server("127.0.0.1:0");
    let dir = tempfile::tempdir().unwrap();
    let knockd = dir.path().join("knockd.conf");
    let (gw, ports) = Gateway::builder()
        .on_free_ports(4, |p| {
            // A UDP, a TCP and a UDP step, as knockd's syntax has them.
            let conf = format!(
                "[options]\n\tUseSyslog\n\n[openEcho]\n\tsequence    = {}:udp,{},{}:udp\n\tseq_timeout = 10\n\
                 \tstart_command = /sbin/iptables -A INPUT -s %IP% -p tcp --dport {} -j ACCEPT\n\
                 \tcmd_timeout = 20\n\
                 \tstop_command = /sbin/iptables -D INPUT -s %IP% -p tcp --dport {} -j ACCEPT\n\ttcpflags = syn\n",
                p[1], p[3], p[2], p[0], p[0]
            );
            std::fs::write(&knockd, conf).unwrap();
            let (code, toml, err) = import(&["knockd", knockd.to_str().unwrap()]);
            assert_eq!(code, 0, "{err}");
            assert!(toml.contains("open_for = \"20s\""), "{toml}");
            assert!(toml.contains("step_timeout = \"10s\""), "{toml}");
            toml
        })
        .envs(&[
            // The service moved off the public address, as the TODO asks;
            // bound sockets, as a raw sensor sees other tests' packets.
            ("PORTCULLIS__SERVICE__OPENECHO__LISTEN", "127.0.0.1:0"),
            ("PORTCULLIS__SERVICE__OPENECHO__UPSTREAM", &upstream.to_string()),
            ("PORTCULLIS__GATEWAY__SENSOR", "socket"),
        ])
        .start_on_ports();
    let addr = gw.addr("openecho");
    assert!(!echo_works("127.0.0.1", addr), "open before the knock");
    // -d: the stock client neither completes TCP handshakes nor waits for
    // the gateway, so a gap keeps its UDP and TCP steps in order under load.
    stock_knock(&[
        "-d",
        "200",
        "127.0.0.1",
        &format!("{}:udp", ports[1]),
        &ports[3].to_string(),
        &format!("{}:udp", ports[2]),
    ]);
    gw.wait_grant("openecho", "127.0.0.1");
    assert!(echo_works("127.0.0.1", addr), "no way in after the knock");
}

#[test]
fn an_imported_access_conf_opens_to_the_stock_fwknop_client_with_the_fresh_keys() {
    let upstream = echo_server("127.0.0.1:0");
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let access = repo_path("tests/fixtures/import/access.conf");
    let (code, toml, err) = import(&["fwknopd", access.to_str().unwrap(), "-o", keys.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let gw = Gateway::builder()
        .config(&toml)
        .envs(&[
            ("PORTCULLIS__SERVICE__SSH__LISTEN", "127.0.0.1:0"),
            ("PORTCULLIS__SERVICE__SSH__UPSTREAM", &upstream.to_string()),
            ("PORTCULLIS__SPA__LISTEN", "127.0.0.1:0"),
        ])
        .start();
    let spa = gw
        .lines()
        .into_iter()
        .find(|l| msg(l) == "listening" && l["kind"] == "spa")
        .map(|l| l["addr"].as_str().unwrap().parse::<std::net::SocketAddr>().unwrap())
        .expect("the spa listener's line");
    let addr = gw.addr("ssh");
    assert!(!echo_works("127.0.0.2", addr), "open before the packet");
    let (_, text) = key_file(&keys, "user1.key");
    let out = Command::new("fwknop")
        .args(["-D", "127.0.0.1", "-p", &spa.port().to_string()])
        .args(["-A", &format!("tcp/{}", addr.port()), "-a", "127.0.0.2"])
        .args(["--key-base64-rijndael", &key_value(&text, "KEY_BASE64")])
        .args(["--key-base64-hmac", &key_value(&text, "HMAC_KEY_BASE64")])
        .args(["--use-hmac", "--no-rc-file", "--no-save-args"])
        .env("HOME", dir.path())
        .output()
        .expect("the stock fwknop client (scripts/install-test-deps installs it)");
    assert!(out.status.success(), "fwknop: {}", String::from_utf8_lossy(&out.stderr));
    gw.wait_grant("ssh", "127.0.0.2");
    assert!(echo_works("127.0.0.2", addr), "no way in after the packet");
}

#[test]
fn debian_knockd_conf_with_its_suggested_knock_opens_to_the_stock_knock_client() {
    let source = shipped("/etc/knockd.conf", "knockd.conf").remove(0);
    let (code, toml, err) = import(&["knockd", source.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let toml = apply_suggestions(&toml);
    let suggested = toml
        .lines()
        .skip_while(|l| *l != "[service.openssh]")
        .find(|l| l.starts_with("knock = "))
        .unwrap()
        .to_string();
    // Debian's 7000,8000,9000 as check suggests it: 7000, 9000, 8000.
    assert!(
        suggested.contains("sequence = [\"7000/tcp\", \"9000/tcp\", \"8000/tcp\"]"),
        "{suggested}"
    );
    // Only openssh is knocked here. openhttps's steps (12345, 54321, ...)
    // lie in the ephemeral range, where any outgoing connection of the
    // machine may hold one: it is left out so the test does not depend on it.
    let mut table: toml::Table = toml::from_str(&toml).unwrap();
    table["service"].as_table_mut().unwrap().remove("openhttps");
    let toml = toml::to_string(&table).unwrap();
    let upstream = echo_server("127.0.0.1:0");
    let gw = Gateway::builder()
        .config(&toml)
        .envs(&[
            ("PORTCULLIS__SERVICE__OPENSSH__LISTEN", "127.0.0.1:0"),
            ("PORTCULLIS__SERVICE__OPENSSH__UPSTREAM", &upstream.to_string()),
            ("PORTCULLIS__GATEWAY__SENSOR", "socket"),
        ])
        .try_start()
        .unwrap_or_else(|log| {
            panic!("the imported config did not start (are Debian's knock ports 6996-9004 free?):\n{log}")
        });
    let addr = gw.addr("openssh");
    assert!(!echo_works("127.0.0.1", addr), "open before the knock");
    stock_knock(&["-d", "200", "127.0.0.1", "7000", "9000", "8000"]);
    gw.wait_grant("openssh", "127.0.0.1");
    assert!(echo_works("127.0.0.1", addr), "no way in after the knock");
}
