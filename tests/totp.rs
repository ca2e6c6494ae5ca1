//! Rotating knock sequences through the real binary: the secret from
//! `portcullis keygen --kind totp`, the sequence from `portcullis knock
//! --totp`; a sequence opens once per period, the previous period's still
//! opens, older ones never; `check` reports the sequence space.
#![allow(
    clippy::unwrap_used,
    clippy::disallowed_methods,
    unreachable_pub,
    reason = "test and bench code: a panic is the failure report, and real time is what is measured"
)]

mod common;

use std::net::UdpSocket;

use common::*;

/// The steps `portcullis knock --totp ... -v` printed, as ports.
fn printed_ports(out: &str) -> Vec<u16> {
    out.lines()
        .map(|l| {
            // "step 1/4: 127.0.0.1:40012/udp sent"
            let target = l.split_whitespace().nth(2).unwrap();
            target
                .rsplit_once(':')
                .unwrap()
                .1
                .trim_end_matches("/udp")
                .parse()
                .unwrap()
        })
        .collect()
}

#[test]
fn a_rotating_sequence_opens_once_per_period_and_never_from_two_periods_ago() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("db.totp");
    let (code, _, err) = run_bin(&["keygen", "--kind", "totp", "-o", key.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    let text = std::fs::read(&key).unwrap();
    let upstream = echo_server("127.0.0.1:0");
    let (gw, p) = Gateway::builder()
        .file("db.totp", &text)
        .on_free_ports(16, |p| {
            format!(
                "[service.db]\nlisten = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\nunauthorized = \"refuse\"\n\
                 knock = {{ totp = {{ key_file = \"db.totp\", steps = 4, ports = \"{}-{}/udp\", period = \"1h\" }} }}\n",
                p[0], p[15]
            )
        })
        .start_on_ports();
    let pool = format!("{}-{}/udp", p[0], p[15]);
    let knock = |source: &str, extra: &[&str]| -> Vec<u16> {
        printed_ports(&portcullis_knock_totp(&key, &pool, "1h", source, "127.0.0.1", extra))
    };
    let handled = |source: &str, n: usize| {
        gw.wait_for_nth(n, |l| {
            l["source"] == source && (msg(l) == "knock" || msg(l) == "knock ignored")
        });
    };
    let granted = |source: &str| gw.count(|l| msg(l) == "grant" && l["source"] == source) > 0;

    // This period's sequence, from the client: opens.
    let now = knock("127.0.0.41", &[]);
    assert_eq!(now.len(), 4);
    gw.wait_grant("db", "127.0.0.41");
    assert!(echo_works("127.0.0.41", gw.addr("db")));

    // The same sequence again from another source: spent, opens nothing.
    let socket = UdpSocket::bind("127.0.0.42:0").unwrap();
    for port in &now {
        socket.send_to(b"", ("127.0.0.1", *port)).unwrap();
    }
    handled("127.0.0.42", now.len());
    assert!(!granted("127.0.0.42"));
    assert!(!echo_works("127.0.0.42", gw.addr("db")));

    // Two periods ago: never.
    let old = knock("127.0.0.43", &["--time-offset-minus", "2h"]);
    handled("127.0.0.43", old.len());
    assert!(!granted("127.0.0.43"));

    // The previous period is still live (a client whose clock is behind).
    let prev = knock("127.0.0.44", &["--time-offset-minus", "1h"]);
    assert_ne!(prev, now);
    gw.wait_grant("db", "127.0.0.44");

    // `check` reports the space and the chance (16*15*14*13 = 43680).
    let (code, out, err) = run_bin(&["check", "-c", gw.config_path.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("service.db.knock.totp: 4 step(s) from 16 ports every 3600s: 43680 possible sequences"),
        "{out}"
    );
}

#[test]
fn a_totp_key_file_others_can_read_or_a_small_pool_is_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("db.totp");
    let (code, _, _) = run_bin(&["keygen", "--kind", "totp", "-o", key.to_str().unwrap()], &[]);
    assert_eq!(code, 0);
    let config = dir.path().join("proxy.toml");
    let write = |ports: &str| {
        std::fs::write(
            &config,
            format!(
                "[service.db]\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:1\"\n\
                 knock = {{ totp = {{ key_file = \"db.totp\", ports = \"{ports}\" }} }}\n"
            ),
        )
        .unwrap();
    };
    write("40000-40005/udp");
    let (code, _, err) = run_bin(&["check", "-c", config.to_str().unwrap()], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("service.db.knock.totp.ports"), "{err}");
    write("40000-40015/udp");
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let (code, _, err) = run_bin(&["check", "-c", config.to_str().unwrap()], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("service.db.knock.totp.key_file"), "{err}");
}

#[test]
fn a_totp_profile_opens_with_portcullis_open() {
    let home = tempfile::tempdir().unwrap();
    let conf = home.path().join(".config/portcullis");
    std::fs::create_dir_all(&conf).unwrap();
    let key = conf.join("db.totp");
    let (code, _, err) = run_bin(&["keygen", "--kind", "totp", "-o", key.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    let upstream = echo_server("127.0.0.1:0");
    let (gw, p) = Gateway::builder()
        .file("db.totp", std::fs::read(&key).unwrap())
        .on_free_ports(12, |p| {
            format!(
                "[service.db]\nlisten = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\nunauthorized = \"refuse\"\n\
                 knock = {{ totp = {{ key_file = \"db.totp\", steps = 3, ports = \"{}-{}/udp\", period = \"1h\" }} }}\n",
                p[0], p[11]
            )
        })
        .start_on_ports();
    std::fs::write(
        conf.join("client.toml"),
        format!(
            "[profile.db]\nhost = \"127.0.0.1\"\nbind = \"127.0.0.51\"\n\
             totp = {{ key_file = \"~/.config/portcullis/db.totp\", steps = 3, ports = \"{}-{}/udp\", period = \"1h\" }}\n",
            p[0], p[11]
        ),
    )
    .unwrap();
    let home_env = home.path().to_str().unwrap();
    let xdg = home.path().join(".config");
    let env = [("HOME", home_env), ("XDG_CONFIG_HOME", xdg.to_str().unwrap())];
    let (code, _, err) = run_bin(&["open", "db"], &env);
    assert_eq!(code, 0, "{err}");
    gw.wait_grant("db", "127.0.0.51");
    assert!(echo_works("127.0.0.51", gw.addr("db")));
}

#[test]
fn knock_totp_takes_its_settings_from_the_key_file_when_no_flag_gives_them() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("db.totp");
    let (code, _, err) = run_bin(&["keygen", "--kind", "totp", "-o", key.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    let upstream = echo_server("127.0.0.1:0");
    let p = free_ports(10);
    let pool = format!("{}-{}/udp", p[0], p[9]);
    // The gateway reads the same file: it ignores the client's lines.
    let mut text = std::fs::read_to_string(&key).unwrap();
    text.push_str(&format!("TOTP_PORTS: {pool}\nTOTP_STEPS: 3\nTOTP_PERIOD: 1h\n"));
    write_private(&key, &text);
    let gw = Gateway::builder()
        .file("db.totp", &text)
        .config(&format!(
            "[service.db]\nlisten = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\nunauthorized = \"refuse\"\n\
             knock = {{ totp = {{ key_file = \"db.totp\", steps = 3, ports = \"{pool}\", period = \"1h\" }} }}\n"
        ))
        .start();
    let (code, _, err) = run_bin(
        &[
            "knock",
            "--totp",
            key.to_str().unwrap(),
            "-b",
            "127.0.0.61",
            "127.0.0.1",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    gw.wait_grant("db", "127.0.0.61");
}
