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
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

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
    // Another file appearing beside the config triggers a reload that
    // finds the same config.
    std::fs::write(gw.dir.path().join("unrelated.txt"), "x").unwrap();
    gw.wait_for(|l| msg(l) == "config reloaded");
    let second = |kind: &str| gw.wait_for_nth(2, |l| msg(l) == "listening" && l["kind"] == kind)["addr"].clone();
    assert_eq!(second("spa"), spa, "the SPA port moved");
    assert_eq!(second("guarded"), echo, "the guarded port moved");
    knock(p_seq(&p), "127.0.0.1");
    gw.wait_grant("echo", "127.0.0.1");
    assert!(echo_works("127.0.0.1", gw.addr("echo")));
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
