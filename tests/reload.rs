//! Hot reload through the real binary: a stream keeps flowing while the
//! config is reloaded three times (by SIGHUP and by a file change), one of
//! them invalid.

#![allow(
    clippy::unwrap_used,
    clippy::disallowed_methods,
    unreachable_pub,
    reason = "test and bench code: a panic is the failure report, and real time is what is measured"
)]

mod common;

use common::*;
use nix::sys::signal::Signal;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::os::unix::fs::symlink;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn knock(seq: [u16; 3], source: &str) {
    knock_udp(&seq, source);
}

fn fnv(hash: &mut u64, bytes: &[u8]) {
    for b in bytes {
        *hash ^= u64::from(*b);
        *hash = hash.wrapping_mul(0x100_0000_01b3);
    }
}

#[test]
fn a_stream_survives_three_reloads_and_each_valid_one_takes_effect() {
    let upstream = echo_server("127.0.0.1:0");
    let (mut gw, p) = Gateway::builder()
        .on_free_ports(10, |p| knock_service("echo", upstream, &[p[3], p[7], p[5]]))
        .start_on_ports();
    let a = [p[3], p[7], p[5]];
    let b = [p[2], p[8], p[4]];
    let c = [p[5], p[3], p[7]];
    let write_config = |text: &str| {
        // Written aside and renamed, as editors and Kubernetes do.
        let tmp = gw.dir.path().join("proxy.toml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &gw.config_path).unwrap();
    };

    knock(a, "127.0.0.1");
    gw.wait_grant("echo", "127.0.0.1");
    let stream = connect_from("127.0.0.1", gw.addr("echo")).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let mut w = stream.try_clone().unwrap();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut hash = 0xcbf2_9ce4_8422_2325u64;
            let mut sent = 0u64;
            let mut chunk = vec![0u8; 64 * 1024];
            while !stop.load(Ordering::Relaxed) {
                for (i, b) in chunk.iter_mut().enumerate() {
                    *b = (sent as usize + i) as u8 ^ 0x5a;
                }
                w.write_all(&chunk).unwrap();
                fnv(&mut hash, &chunk);
                sent += chunk.len() as u64;
            }
            w.shutdown(Shutdown::Write).unwrap();
            (sent, hash)
        })
    };
    let reader = {
        let mut r = stream.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut hash = 0xcbf2_9ce4_8422_2325u64;
            let mut got = 0u64;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = r.read(&mut buf).expect("the stream broke during a reload");
                if n == 0 {
                    break;
                }
                fnv(&mut hash, &buf[..n]);
                got += n as u64;
            }
            (got, hash)
        })
    };

    // 1. SIGHUP after adding a service: it is served.
    let two = knock_service("echo", upstream, &a) + &knock_service("two", upstream, &b);
    write_config(&two);
    gw.signal(Signal::SIGHUP);
    gw.wait_for(|l| msg(l) == "config reloaded");
    gw.wait_for(|l| msg(l) == "listening" && l["service"] == "two");
    let two_addr = {
        let line = gw.wait_for(|l| msg(l) == "listening" && l["service"] == "two");
        line["addr"].as_str().unwrap().parse().unwrap()
    };
    knock(b, "127.0.0.2");
    gw.wait_grant("two", "127.0.0.2");
    assert!(echo_works("127.0.0.2", two_addr));

    // 2. An invalid config: reported with its key path, nothing changes.
    write_config(&knock_service("echo", upstream, &[p[1], p[2], p[3]]));
    gw.signal(Signal::SIGHUP);
    let failed = gw.wait_for(|l| msg(l) == "config reload failed: the running config is unchanged");
    assert!(
        failed["problems"]
            .as_str()
            .unwrap_or_default()
            .contains("service.echo.knock.sequence"),
        "{failed}"
    );
    knock(a, "127.0.0.3");
    gw.wait_grant("echo", "127.0.0.3");
    assert!(
        echo_works("127.0.0.2", two_addr),
        "the invalid reload touched a running service"
    );

    // 3. A file change alone (no signal): a new sequence, service two gone.
    write_config(&knock_service("echo", upstream, &c));
    gw.wait_for_nth(2, |l| msg(l) == "config reloaded");
    gw.wait_for(|l| msg(l) == "grant revoked" && l["service"] == "two");
    assert!(
        connect_from("127.0.0.2", two_addr).is_err(),
        "a removed service still accepts"
    );
    knock(a, "127.0.0.4");
    // Under the new sequence, the old one's last port is the first step.
    gw.wait_knock("echo", "127.0.0.4", a[2]);
    knock(c, "127.0.0.5");
    gw.wait_grant("echo", "127.0.0.5");
    assert!(echo_works("127.0.0.5", gw.addr("echo")));
    assert_eq!(gw.count(|l| msg(l) == "grant" && l["source"] == "127.0.0.4"), 0);

    // The stream ran through all of it, byte for byte.
    stop.store(true, Ordering::Relaxed);
    let (sent, sent_hash) = writer.join().unwrap();
    let (got, got_hash) = reader.join().unwrap();
    assert!(sent > 0);
    assert_eq!((got, got_hash), (sent, sent_hash), "the stream lost or changed bytes");
    assert_eq!(gw.count(|l| msg(l) == "config reloaded"), 2);
    gw.signal(Signal::SIGTERM);
    assert!(gw.wait_exit().success());
}

#[test]
fn a_reload_that_changes_nothing_keeps_every_port() {
    let upstream = echo_server("127.0.0.1:0");
    let (gw, p) = Gateway::builder()
        .on_free_ports(10, |p| {
            format!(
                "[spa]\nlisten = \"127.0.0.1:0\"\n{}",
                knock_service("echo", upstream, &[p[3], p[7], p[5]])
            )
        })
        .start_on_ports();
    let first = |kind: &str| gw.wait_for(|l| msg(l) == "listening" && l["kind"] == kind)["addr"].clone();
    let (spa, echo) = (first("spa"), first("guarded"));
    // A comment added to the config triggers a reload that finds the
    // same config.
    let text = std::fs::read_to_string(&gw.config_path).unwrap();
    replace(&gw.config_path, text + "\n# a comment\n");
    gw.wait_for(|l| msg(l) == "config reloaded");
    let second = |kind: &str| gw.wait_for_nth(2, |l| msg(l) == "listening" && l["kind"] == kind)["addr"].clone();
    assert_eq!(second("spa"), spa, "the SPA port moved");
    assert_eq!(second("guarded"), echo, "the guarded port moved");
    knock(p_seq(&p), "127.0.0.1");
    gw.wait_grant("echo", "127.0.0.1");
    assert!(echo_works("127.0.0.1", gw.addr("echo")));
}

/// Replaces `path` by a file holding `content`, mode 0600, written aside
/// and renamed as editors do, so that no look sees it half written.
fn replace(path: &Path, content: impl AsRef<[u8]>) {
    let tmp = path.with_extension("tmp");
    write_private(&tmp, content);
    std::fs::rename(&tmp, path).unwrap();
}

/// A new native key file's text.
fn new_key() -> String {
    let (code, out, err) = run_bin(&["keygen"], &[]);
    assert_eq!(code, 0, "{err}");
    out
}

/// An echo service opened by SPA for the users named, with a key file each.
fn spa_config(upstream: SocketAddr, users: &[(&str, &str)]) -> String {
    let names: Vec<String> = users.iter().map(|(u, _)| format!("{u:?}")).collect();
    let mut text = format!(
        "[spa]\nlisten = \"127.0.0.1:0\"\n\n[service.echo]\nlisten = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\nspa_users = [{}]\n",
        names.join(", ")
    );
    for (user, file) in users {
        text.push_str(&format!("\n[user.{user}]\nkey_file = \"{file}\"\n"));
    }
    text
}

/// Sends an SPA packet for `echo` with the key in `key_file` and waits for
/// its grant to `source`: the key is the one the gateway holds.
fn open_with(gw: &Gateway, key_file: &Path, source: &str) {
    let spa = gw.wait_for(|l| msg(l) == "listening" && l["kind"] == "spa")["addr"]
        .as_str()
        .unwrap()
        .parse::<SocketAddr>()
        .unwrap();
    let (port, access) = (spa.port().to_string(), format!("tcp/{}", gw.addr("echo").port()));
    let key = key_file.to_str().unwrap();
    let args = [
        "spa",
        "-D",
        "127.0.0.1",
        "-p",
        &port,
        "-A",
        &access,
        "--key-file",
        key,
        "-b",
        source,
        "-a",
        "source",
    ];
    let (code, _, err) = run_bin(&args, &[]);
    assert_eq!(code, 0, "portcullis {args:?}: {err}");
    gw.wait_grant("echo", source);
}

fn reloads(gw: &Gateway) -> usize {
    gw.count(|l| msg(l) == "reloading config")
}

/// `portcullis serve -c proxy.toml 2> up.err` beside the config: the log
/// is written to (and a 1 MB file appears) all through a 5 s window, in
/// which no reload may start; the config itself still reloads after.
#[test]
fn a_log_file_written_beside_the_config_for_five_seconds_reloads_nothing() {
    let upstream = echo_server("127.0.0.1:0");
    let gw = Gateway::builder()
        .on_free_ports(3, |p| knock_service("echo", upstream, &[p[0], p[2], p[1]]))
        .start();
    gw.wait_for(|l| msg(l) == "watching for changes");
    let mut log = std::fs::File::create(gw.dir.path().join("up.err")).unwrap();
    let end = Instant::now() + Duration::from_secs(5);
    let mut n = 0u32;
    while Instant::now() < end {
        writeln!(log, "2026-12-01T09:00:00Z INFO reloading config line={n}").unwrap();
        if n % 100 == 0 {
            std::fs::write(gw.dir.path().join(format!("up.err.{n}")), vec![b'x'; 1 << 20]).unwrap();
        }
        n += 1;
        // Pacing the writer, not waiting for the gateway.
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(reloads(&gw), 0, "a file nobody named reloaded:\n{}", gw.log_text());
    let text = std::fs::read_to_string(&gw.config_path).unwrap();
    replace(&gw.config_path, text + "\n# edited\n");
    let line = gw.wait_for(|l| msg(l) == "reloading config");
    assert_eq!(line["trigger"], "file change");
    gw.wait_for(|l| msg(l) == "config reloaded");
}

/// A key file the config names is watched; so is one a reloaded config
/// names for the first time (in a subdirectory).
#[test]
fn a_key_file_change_reloads_and_a_newly_named_key_file_is_watched() {
    let upstream = echo_server("127.0.0.1:0");
    let gw = Gateway::builder()
        .config(&spa_config(upstream, &[("alice", "alice.key")]))
        .file("alice.key", new_key())
        .start();
    gw.wait_for(|l| msg(l) == "watching for changes");
    let alice = gw.dir.path().join("alice.key");
    replace(&alice, new_key());
    let line = gw.wait_for(|l| msg(l) == "reloading config");
    assert_eq!(line["trigger"], "file change");
    gw.wait_for(|l| msg(l) == "config reloaded");
    open_with(&gw, &alice, "127.0.0.2");

    std::fs::create_dir(gw.dir.path().join("keys")).unwrap();
    let bob = gw.dir.path().join("keys/bob.key");
    write_private(&bob, new_key());
    replace(
        &gw.config_path,
        spa_config(upstream, &[("alice", "alice.key"), ("bob", "keys/bob.key")]),
    );
    gw.wait_for_nth(2, |l| msg(l) == "config reloaded");
    replace(&bob, new_key());
    gw.wait_for_nth(3, |l| msg(l) == "config reloaded");
    open_with(&gw, &bob, "127.0.0.3");
    assert_eq!(reloads(&gw), 3, "{}", gw.log_text());
}

/// A Kubernetes Secret mounted in a subdirectory: `alice.key` links to
/// `..data/alice.key`, `..data` to a timestamped directory; an update
/// renames a new `..data` over the old one, then removes the old directory.
#[test]
fn a_secret_style_link_swap_in_a_subdirectory_reloads() {
    let upstream = echo_server("127.0.0.1:0");
    let gw = Gateway::builder()
        .config(&spa_config(upstream, &[("alice", "secrets/alice.key")]))
        .prepare(|dir| {
            let secrets = dir.join("secrets");
            std::fs::create_dir_all(secrets.join("..2026_12_01_09_00_00.1")).unwrap();
            write_private(&secrets.join("..2026_12_01_09_00_00.1/alice.key"), new_key());
            symlink("..2026_12_01_09_00_00.1", secrets.join("..data")).unwrap();
            symlink("..data/alice.key", secrets.join("alice.key")).unwrap();
        })
        .start();
    gw.wait_for(|l| msg(l) == "watching for changes");
    let secrets = gw.dir.path().join("secrets");
    let v2 = secrets.join("..2026_12_01_09_05_00.2");
    std::fs::create_dir(&v2).unwrap();
    write_private(&v2.join("alice.key"), new_key());
    symlink("..2026_12_01_09_05_00.2", secrets.join("..data_tmp")).unwrap();
    std::fs::rename(secrets.join("..data_tmp"), secrets.join("..data")).unwrap();
    std::fs::remove_dir_all(secrets.join("..2026_12_01_09_00_00.1")).unwrap();
    let line = gw.wait_for(|l| msg(l) == "reloading config");
    assert_eq!(line["trigger"], "file change");
    gw.wait_for(|l| msg(l) == "config reloaded");
    open_with(&gw, &secrets.join("alice.key"), "127.0.0.4");
}

fn p_seq(p: &[u16]) -> [u16; 3] {
    [p[3], p[7], p[5]]
}

/// A SIGHUP sent as soon as the gateway has said anything (its first
/// `listening` line, before `ready`), as a config manager that starts the
/// gateway and then reloads it might, is a reload, not the default action
/// that ends the process.
#[test]
fn a_sighup_during_start_up_reloads_and_the_gateway_keeps_running() {
    use std::io::BufRead;
    let upstream = echo_server("127.0.0.1:0");
    let p = free_ports(3);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, knock_service("echo", upstream, &[p[1], p[0], p[2]])).unwrap();
    let mut child = std::process::Command::new(BIN)
        .args(["--log-format", "json", "serve", "-c"])
        .arg(&path)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut next = || -> serde_json::Value {
        let line = lines.next().expect("the gateway ended").unwrap();
        serde_json::from_str(&line).unwrap()
    };
    while msg(&next()) != "listening" {}
    nix::sys::signal::kill(pid, Signal::SIGHUP).unwrap();
    while msg(&next()) != "config reloaded" {}
    assert!(child.try_wait().unwrap().is_none(), "the gateway ended on a SIGHUP");
    knock([p[1], p[0], p[2]], "127.0.0.4");
    let mut granted = false;
    while !granted {
        let line = next();
        granted = msg(&line) == "grant" && line["source"] == "127.0.0.4";
    }
    nix::sys::signal::kill(pid, Signal::SIGTERM).unwrap();
    assert!(child.wait().unwrap().success());
}
