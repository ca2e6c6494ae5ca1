//! The SPA replay log across restarts, through the real binary and the
//! stock `fwknop` client: a packet accepted once is refused ever after,
//! whatever its timestamp and whoever resends it, and the state directory
//! is where a restart finds what was accepted before it (so no start-up
//! fence refuses an honest client whose clock is a little behind).

#![allow(
    clippy::unwrap_used,
    clippy::disallowed_methods,
    unreachable_pub,
    reason = "test code: a panic is the failure report"
)]

mod common;

use common::*;
use nix::sys::signal::Signal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The stock client's keys for user `fw`, made before the gateway starts
/// and kept across its restarts.
struct Keys {
    dir: tempfile::TempDir,
}

impl Keys {
    fn new() -> Keys {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("fwknop")
            .arg("--key-gen")
            .env("HOME", dir.path())
            .output()
            .expect("the stock fwknop client (apt-get install fwknop-client; scripts/install-test-deps does it)");
        assert!(
            out.status.success(),
            "fwknop --key-gen: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        write_private(&dir.path().join("fw.key"), &out.stdout);
        Keys { dir }
    }

    fn file(&self) -> PathBuf {
        self.dir.path().join("fw.key")
    }

    fn value(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.file()).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("{name} missing from the key file"))
            .trim()
            .to_string()
    }
}

/// SPA on `p[0]`, service pg on `p[1]` (fixed, so that a packet names the
/// same port after a restart), an admin endpoint for the metrics, and
/// `extra` appended.
fn config(keys: &Keys, upstream: SocketAddr, p: &[u16], extra: &str) -> String {
    format!(
        r#"
[admin]
listen = "127.0.0.1:0"

[spa]
listen = "127.0.0.1:{spa}"
max_age = "120s"

[service.pg]
listen = "127.0.0.1:{pg}"
upstream = "{upstream}"
unauthorized = "refuse"
open_for = "30s"
spa_users = ["fw"]

[user.fw]
key_file = "{key}"
{extra}"#,
        spa = p[0],
        pg = p[1],
        key = keys.file().display(),
    )
}

/// Sends one packet with the stock client from 127.0.0.1 asking for pg
/// for the packet's source (`-s`: whoever sends it), plus `args`.
fn fwknop(keys: &Keys, p: &[u16], args: &[&str]) {
    let out = Command::new("fwknop")
        .args([
            "-A",
            &format!("tcp/{}", p[1]),
            "-s",
            "-D",
            "127.0.0.1",
            "-p",
            &p[0].to_string(),
        ])
        .args(["--use-hmac", "--key-base64-rijndael", &keys.value("KEY_BASE64")])
        .args(["--key-base64-hmac", &keys.value("HMAC_KEY_BASE64")])
        .args(["--no-rc-file", "--no-save-args"])
        .args(args)
        .env("HOME", keys.dir.path())
        .output()
        .expect("fwknop");
    assert!(
        out.status.success(),
        "fwknop {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn spa_addr(p: &[u16]) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], p[0]))
}

fn rejected_nth(gw: &Gateway, n: usize, reason: &str) -> serde_json::Value {
    gw.wait_for_nth(n, |l| msg(l) == "spa packet rejected" && l["reason"] == reason)
}

/// Stops `gw` as a supervisor would (SIGTERM) and waits for it to exit.
fn stop(mut gw: Gateway) {
    gw.signal(Signal::SIGTERM);
    assert!(gw.wait_exit().success());
}

fn replays_counted(gw: &Gateway) -> f64 {
    metric(
        &gw.scrape(),
        "portcullis_spa_packets_total",
        &[("format", "fwknop"), ("result", "replay")],
    )
    .unwrap_or(0.0)
}

#[test]
fn a_future_stamped_packet_is_refused_after_a_restart_from_any_source() {
    let upstream = echo_server("127.0.0.1:0");
    let keys = Keys::new();
    let state = tempfile::tempdir().unwrap();
    let (gw, p) = Gateway::builder()
        .on_free_ports(2, |p| config(&keys, upstream, p, ""))
        .state_dir(state.path())
        .start_on_ports();
    let text = config(&keys, upstream, &p, "");

    // A client whose clock runs 90 s ahead: inside the 120 s window, and
    // stamped after any restart that follows within 90 s.
    let saved = keys.dir.path().join("packet.txt");
    fwknop(
        &keys,
        &p,
        &["--time-offset-plus", "90s", "--save-packet", saved.to_str().unwrap()],
    );
    gw.wait_grant("pg", "127.0.0.1");
    assert!(echo_works("127.0.0.1", gw.addr("pg")));
    let packet = std::fs::read_to_string(&saved).unwrap();
    let packet = packet.trim().as_bytes();

    // Replayed in the same run, from another source: refused.
    udp_from("127.0.0.5", spa_addr(&p), packet);
    let line = rejected_nth(&gw, 1, "replay");
    assert_eq!(line["source"], "127.0.0.5");
    assert!(!echo_works("127.0.0.5", gw.addr("pg")));
    stop(gw);

    // The same gateway (same state directory) restarted.
    let gw = Gateway::builder().config(&text).state_dir(state.path()).start();
    let loaded = gw.wait_for(|l| msg(l) == "replay log loaded");
    assert_eq!(loaded["live"], 1, "{loaded}");
    udp_from("127.0.0.7", spa_addr(&p), packet);
    let line = rejected_nth(&gw, 1, "replay");
    assert_eq!(line["source"], "127.0.0.7");
    udp_from("127.0.0.1", spa_addr(&p), packet);
    rejected_nth(&gw, 2, "replay");
    assert_eq!(replays_counted(&gw), 2.0);
    assert_eq!(gw.count(|l| msg(l) == "spa accepted"), 0);
    assert_eq!(gw.count(|l| msg(l) == "grant"), 0, "the replay was granted");
    assert!(!echo_works("127.0.0.7", gw.addr("pg")), "the replayer got in");
    assert!(!echo_works("127.0.0.1", gw.addr("pg")), "the first sender got in again");
}

#[test]
fn a_client_two_seconds_behind_is_accepted_right_after_a_restart() {
    let upstream = echo_server("127.0.0.1:0");
    let keys = Keys::new();
    let state = tempfile::tempdir().unwrap();
    let (gw, p) = Gateway::builder()
        .on_free_ports(2, |p| config(&keys, upstream, p, ""))
        .state_dir(state.path())
        .start_on_ports();
    let text = config(&keys, upstream, &p, "");
    fwknop(&keys, &p, &[]);
    gw.wait_grant("pg", "127.0.0.1");
    stop(gw);

    let gw = Gateway::builder().config(&text).state_dir(state.path()).start();
    // Stamped 2 s before now, so before this process started (it became
    // ready well within 2 s): what the old start-up fence refused.
    fwknop(&keys, &p, &["--time-offset-minus", "2s"]);
    gw.wait_grant("pg", "127.0.0.1");
    assert!(echo_works("127.0.0.1", gw.addr("pg")));
    assert_eq!(gw.count(|l| msg(l) == "spa packet rejected"), 0);
}

#[test]
fn a_second_gateway_on_the_same_state_directory_does_not_start() {
    let upstream = echo_server("127.0.0.1:0");
    let keys = Keys::new();
    let state = tempfile::tempdir().unwrap();
    let _first = Gateway::builder()
        .on_free_ports(2, |p| config(&keys, upstream, p, ""))
        .state_dir(state.path())
        .start();
    let log = Gateway::builder()
        .on_free_ports(2, |p| config(&keys, upstream, p, ""))
        .state_dir(state.path())
        .try_start()
        .err()
        .expect("a second gateway shared the replay log");
    assert!(log.contains("state.dir") && log.contains("in use"), "{log}");
}

#[test]
fn an_unwritable_state_directory_stops_start_up_naming_state_dir() {
    if !is_root() {
        eprintln!("skipped: dropping privileges needs root");
        return;
    }
    let upstream = echo_server("127.0.0.1:0");
    // The key must be readable by the unprivileged process, and private.
    let keys = Keys::new();
    std::fs::set_permissions(keys.dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(keys.file(), Some(65534), Some(65534)).unwrap();
    // Root's, mode 0700: nobody may create the state directory in it.
    let root_only = tempfile::tempdir().unwrap();
    let log = Gateway::builder()
        .on_free_ports(2, |p| config(&keys, upstream, p, ""))
        .state_dir(&root_only.path().join("state"))
        .unprivileged()
        .try_start()
        .err()
        .expect("started without a writable state directory");
    assert!(log.contains("state.dir"), "the error names the key: {log}");
    assert!(log.contains("Permission denied"), "{log}");
    assert!(!log.contains("\"ready\""), "{log}");
}

#[test]
fn a_reload_that_moves_the_state_directory_is_refused_and_the_old_log_kept() {
    let upstream = echo_server("127.0.0.1:0");
    let keys = Keys::new();
    let state = tempfile::tempdir().unwrap();
    let (old_dir, new_dir) = (state.path().join("old"), state.path().join("new"));
    let section = |dir: &Path| format!("\n[state]\ndir = \"{}\"\n", dir.display());
    let (gw, p) = Gateway::builder()
        .on_free_ports(2, |p| config(&keys, upstream, p, &section(&old_dir)))
        .start_on_ports();
    let loaded = gw.wait_for(|l| msg(l) == "replay log loaded");
    assert_eq!(loaded["dir"], old_dir.to_str().unwrap());

    std::fs::write(&gw.config_path, config(&keys, upstream, &p, &section(&new_dir))).unwrap();
    let failed = gw.wait_for(|l| msg(l) == "config reload failed: the running config is unchanged");
    let error = failed["error"].as_str().unwrap();
    assert!(
        error.contains("state.dir") && error.contains("needs a restart"),
        "{error}"
    );

    // Still served, and recorded in the old directory.
    let before = std::fs::metadata(old_dir.join("replay.log")).unwrap().len();
    fwknop(&keys, &p, &[]);
    gw.wait_grant("pg", "127.0.0.1");
    assert!(std::fs::metadata(old_dir.join("replay.log")).unwrap().len() > before);
    assert!(!new_dir.exists());
}

/// Makes paths immutable (`chattr +i`) until dropped: writes through
/// descriptors already open fail, as on a failed disk. Needs root and a
/// file system with attributes (ext4, xfs, btrfs).
struct Immutable(Vec<PathBuf>);

impl Immutable {
    fn set(paths: &[&Path]) -> Option<Immutable> {
        let mut set = Immutable(Vec::new());
        for path in paths {
            let ok = Command::new("chattr")
                .arg("+i")
                .arg(path)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                return None;
            }
            set.0.push(path.to_path_buf());
        }
        Some(set)
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = Command::new("chattr").arg("-i").arg(path).status();
        }
    }
}

#[test]
fn a_packet_whose_digest_cannot_be_written_is_refused_and_may_be_sent_again() {
    let upstream = echo_server("127.0.0.1:0");
    let keys = Keys::new();
    let state = tempfile::tempdir().unwrap();
    let (gw, p) = Gateway::builder()
        .on_free_ports(2, |p| config(&keys, upstream, p, ""))
        .state_dir(state.path())
        .start_on_ports();
    let log = state.path().join("replay.log");
    let Some(frozen) = Immutable::set(&[&log, state.path()]) else {
        eprintln!("skipped: chattr +i needs root and a file system with attributes");
        return;
    };
    let saved = keys.dir.path().join("packet.txt");
    fwknop(&keys, &p, &["--save-packet", saved.to_str().unwrap()]);
    rejected_nth(&gw, 1, "replay_log_failed");
    let error = gw.wait_for(|l| msg(l).starts_with("state.dir: cannot write the replay log"));
    assert!(
        error["dir"].as_str().unwrap().ends_with(state.path().to_str().unwrap()),
        "{error}"
    );
    let failed = metric(
        &gw.scrape(),
        "portcullis_spa_packets_total",
        &[("result", "replay_log_failed")],
    );
    assert_eq!(failed, Some(1.0));
    assert_eq!(gw.count(|l| msg(l) == "grant"), 0, "granted without a record");
    assert!(!echo_works("127.0.0.1", gw.addr("pg")));

    // The disk is back: the same packet, never recorded, is honoured once.
    drop(frozen);
    let packet = std::fs::read_to_string(&saved).unwrap();
    udp_from("127.0.0.1", spa_addr(&p), packet.trim().as_bytes());
    gw.wait_grant("pg", "127.0.0.1");
    udp_from("127.0.0.1", spa_addr(&p), packet.trim().as_bytes());
    rejected_nth(&gw, 1, "replay");
}
