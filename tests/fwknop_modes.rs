//! Every non-default option of the stock Debian `fwknop` 2.6.10 client
//! that fwknopd grants, through the real binary: each HMAC digest type,
//! each inner digest (`-m`), each encryption mode (`-M`), NAT access to a
//! service's upstream (`-N`, `--nat-local`), `-f` up to `max_open_for`;
//! and each refusal with its own reason in the log line and in /metrics,
//! GPG packets (`-g`) included.
//!
//! One gateway serves every case of a test: users differ by key file,
//! grants by allow-IP (`-a 127.0.N.M`), so each case finds its own log line.

#![allow(
    clippy::unwrap_used,
    clippy::disallowed_methods,
    unreachable_pub,
    reason = "test and bench code: a panic is the failure report, and real time is what is measured"
)]

mod common;

use common::*;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

const HMAC_DIGESTS: [&str; 7] = ["md5", "sha1", "sha256", "sha384", "sha512", "sha3_256", "sha3_512"];
const MODES: [&str; 5] = ["cbc", "ctr", "cfb", "ofb", "ecb"];

/// `fwknop --key-gen` output for `digest`, with a private HOME. The
/// client makes keys for the SHA-2 types only (for the others its default
/// HMAC key length fails its own check), so the rest borrow those.
fn keygen(dir: &Path, digest: &str) -> String {
    let digest = match digest {
        "md5" | "sha1" | "sha3_256" => "sha256",
        "sha3_512" => "sha512",
        other => other,
    };
    let out = Command::new("fwknop")
        .args(["--key-gen", "--hmac-digest-type", digest])
        .env("HOME", dir)
        .output()
        .expect("the stock fwknop client (scripts/install-test-deps installs it)");
    assert!(
        out.status.success(),
        "fwknop --key-gen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn key_value(text: &str, name: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .unwrap_or_else(|| panic!("{name} missing"))
        .trim()
        .to_string()
}

/// The users of both tests: name, HMAC digest type, mode, whether the key
/// file (rather than the config) names them, and extra config lines.
struct UserSpec {
    name: String,
    digest: &'static str,
    mode: &'static str,
    in_key_file: bool,
    extra: &'static str,
}

fn users() -> Vec<UserSpec> {
    let mut users = Vec::new();
    let spec = |name: String, digest, mode, in_key_file, extra| UserSpec {
        name,
        digest,
        mode,
        in_key_file,
        extra,
    };
    for (i, d) in HMAC_DIGESTS.into_iter().enumerate() {
        users.push(spec(format!("h_{d}"), d, "cbc", i % 2 == 0, ""));
    }
    for (i, m) in MODES.into_iter().enumerate() {
        users.push(spec(format!("m_{m}"), "sha256", m, i % 2 == 1, ""));
    }
    users.push(spec("fw".into(), "sha256", "cbc", false, ""));
    users.push(spec("old".into(), "sha256", "cbc", false, "expires = \"2020-01-01\""));
    users.push(spec(
        "named".into(),
        "sha256",
        "cbc",
        false,
        "require_username = \"carol\"",
    ));
    users.push(spec(
        "strict".into(),
        "sha256",
        "cbc",
        false,
        "require_source_address = true",
    ));
    users.push(spec("other".into(), "sha256", "cbc", false, ""));
    users
}

struct Setup {
    gw: Gateway,
    keys: tempfile::TempDir,
    spa: SocketAddr,
    /// `spa.tcp_listen` and `spa.http_listen`.
    tcp: SocketAddr,
    http: SocketAddr,
    /// The upstreams: main, nat, the twins' shared one, locked.
    up: [SocketAddr; 4],
}

fn start() -> Setup {
    let keys = tempfile::tempdir().unwrap();
    let mut user_tables = String::new();
    // Everyone but `other` may open main.
    let names: Vec<String> = users()
        .iter()
        .filter(|u| u.name != "other")
        .map(|u| format!("{:?}", u.name))
        .collect();
    for u in users() {
        let mut text = keygen(keys.path(), u.digest);
        let mut table = String::new();
        if u.in_key_file {
            text.push_str(&format!("HMAC_DIGEST_TYPE {}\nENCRYPTION_MODE {}\n", u.digest, u.mode));
        } else {
            if u.digest != "sha256" {
                table.push_str(&format!("hmac_digest = \"{}\"\n", u.digest));
            }
            if u.mode != "cbc" {
                table.push_str(&format!("encryption_mode = \"{}\"\n", u.mode));
            }
        }
        let path = keys.path().join(format!("{}.key", u.name));
        write_private(&path, text);
        user_tables.push_str(&format!(
            "[user.{}]\nkey_file = {:?}\n{table}{}\n\n",
            u.name,
            path.to_str().unwrap(),
            u.extra
        ));
    }
    let up = [
        echo_server("127.0.0.1:0"),
        echo_server("127.0.0.1:0"),
        echo_server("127.0.0.1:0"),
        echo_server("127.0.0.1:0"),
    ];
    let (gw, p) = Gateway::builder()
        .on_free_ports(3, |p| {
            format!(
                r#"
[admin]
listen = "127.0.0.1:0"

[limits]
per_source_rate = 100000
per_source_burst = 100000
lockout_after = 100000

[spa]
listen = "127.0.0.1:{spa}"
tcp_listen = "127.0.0.1:{tcp}"
http_listen = "127.0.0.1:{http}"

[service.main]
listen = "127.0.0.1:0"
upstream = "{main}"
unauthorized = "refuse"
open_for = "30s"
max_open_for = "10m"
spa_users = [{names}]

[service.nat]
listen = "127.0.0.1:0"
upstream = "{nat}"
unauthorized = "refuse"
nat_name = "db.internal"
spa_users = ["fw"]

[service.twin_a]
listen = "127.0.0.1:0"
upstream = "{twin}"
spa_users = ["fw"]

[service.twin_b]
listen = "127.0.0.1:0"
upstream = "{twin}"
spa_users = ["fw"]

[service.locked]
listen = "127.0.0.1:0"
upstream = "{locked}"
spa_users = ["other"]

{user_tables}
"#,
                spa = p[0],
                tcp = p[1],
                http = p[2],
                main = up[0],
                names = names.join(", "),
                nat = up[1],
                twin = up[2],
                locked = up[3],
            )
        })
        .start_on_ports();
    let at = |port| SocketAddr::new(ip("127.0.0.1"), port);
    Setup {
        gw,
        keys,
        spa: at(p[0]),
        tcp: at(p[1]),
        http: at(p[2]),
        up,
    }
}

impl Setup {
    /// Sends with the stock client from 127.0.0.1 with `user`'s keys;
    /// `args` hold everything else (-A, -a, -M, ...).
    fn send(&self, user: &str, args: &[&str]) {
        self.send_to(self.spa.port(), user, args);
    }

    /// [`Setup::send`] to another port (with `-P tcp` or `-P http`).
    fn send_to(&self, port: u16, user: &str, args: &[&str]) {
        let text = std::fs::read_to_string(self.keys.path().join(format!("{user}.key"))).unwrap();
        let out = Command::new("fwknop")
            .args(["-D", "127.0.0.1", "-p", &port.to_string()])
            .args(["--key-base64-rijndael", &key_value(&text, "KEY_BASE64")])
            .args(["--key-base64-hmac", &key_value(&text, "HMAC_KEY_BASE64")])
            .args(["--no-rc-file", "--no-save-args"])
            .args(args)
            .env("HOME", self.keys.path())
            .output()
            .expect("fwknop");
        assert!(
            out.status.success(),
            "fwknop {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn main_access(&self) -> String {
        format!("tcp/{}", self.gw.addr("main").port())
    }

    /// Waits for the acceptance of a packet whose allow-IP is `grantee`
    /// (the sensor's line; the gate's `grant` line follows).
    fn accepted(&self, grantee: &str) -> Value {
        self.gw
            .wait_for(|l| msg(l) == "spa accepted" && l["grantee"] == grantee)
    }

    /// Waits for the `nth` refusal with `reason`; returns its log line.
    fn rejected(&self, nth: usize, reason: &str) -> Value {
        self.gw
            .wait_for_nth(nth, |l| msg(l) == "spa packet rejected" && l["reason"] == reason)
    }
}

/// Sends a GPG-encrypted packet (`fwknop -g`) to a key made for the
/// occasion, tagged with `user`'s HMAC key.
fn gpg_send(s: &Setup, user: &str, args: &[&str]) {
    let home = s.keys.path().join("gnupg");
    std::fs::create_dir(&home).unwrap();
    std::fs::set_permissions(&home, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let out = Command::new("gpg")
        .args([
            "--batch",
            "--passphrase",
            "",
            "--quick-gen-key",
            "gw@example.invalid",
            "rsa2048",
            "encrypt",
            "never",
        ])
        .env("GNUPGHOME", &home)
        .output()
        .expect("gpg (scripts/install-test-deps installs gnupg)");
    assert!(out.status.success(), "gpg: {}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(s.keys.path().join(format!("{user}.key"))).unwrap();
    let out = Command::new("fwknop")
        .args(["-D", "127.0.0.1", "-p", &s.spa.port().to_string()])
        .args([
            "--gpg-encryption",
            "--gpg-recipient-key",
            "gw@example.invalid",
            "--gpg-home-dir",
        ])
        .arg(&home)
        .args(["--key-base64-hmac", &key_value(&text, "HMAC_KEY_BASE64")])
        .args(["--no-rc-file", "--no-save-args"])
        .args(args)
        .env("HOME", s.keys.path())
        .output()
        .expect("fwknop");
    assert!(
        out.status.success(),
        "fwknop -g: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // gpg started an agent for the key; it must not outlive the test.
    let _ = Command::new("gpgconf")
        .args(["--kill", "gpg-agent"])
        .env("GNUPGHOME", &home)
        .status();
}

/// A grant line's `open_for_s` in whole seconds, rounded up: the gate logs
/// what is left when it applies the grant.
fn open_for_secs(grant: &Value) -> u64 {
    let secs = grant["open_for_s"].as_f64().expect("open_for_s");
    secs.ceil() as u64
}

#[test]
fn every_digest_mode_nat_and_timeout_the_stock_client_sends_is_granted() {
    let s = start();
    let access = s.main_access();
    let mut n = 0;
    let mut next_ip = || {
        n += 1;
        format!("127.0.1.{n}")
    };

    for d in HMAC_DIGESTS {
        let grantee = next_ip();
        s.send(
            &format!("h_{d}"),
            &["-A", &access, "-a", &grantee, "--hmac-digest-type", d],
        );
        assert_eq!(s.accepted(&grantee)["user"], format!("h_{d}"), "HMAC {d}");
        s.gw.wait_grant("main", &grantee);
        assert!(echo_works(&grantee, s.gw.addr("main")), "HMAC {d}: no way in");
    }
    for m in ["md5", "sha1", "sha256", "sha384", "sha512", "sha3_256", "sha3_512"] {
        let grantee = next_ip();
        s.send("fw", &["-A", &access, "-a", &grantee, "-m", m]);
        assert_eq!(s.accepted(&grantee)["user"], "fw", "digest {m}");
    }
    for m in MODES {
        let grantee = next_ip();
        s.send(&format!("m_{m}"), &["-A", &access, "-a", &grantee, "-M", m]);
        assert_eq!(s.accepted(&grantee)["user"], format!("m_{m}"), "mode {m}");
        s.gw.wait_grant("main", &grantee);
        assert!(echo_works(&grantee, s.gw.addr("main")), "mode {m}: no way in");
    }
    // A long packet: SHA-512 HMAC and SHA3-512 digest.
    let grantee = next_ip();
    s.send(
        "h_sha512",
        &[
            "-A",
            &access,
            "-a",
            &grantee,
            "--hmac-digest-type",
            "sha512",
            "-m",
            "sha3_512",
        ],
    );
    s.accepted(&grantee);

    // NAT: the internal host:port names the service by its upstream, or
    // by its nat_name; the grant goes to the allow-IP.
    let nat_access = format!("tcp/{}", s.gw.addr("nat").port());
    let up = s.up[1];
    for target in [format!("127.0.0.1,{}", up.port()), format!("DB.internal:{}", up.port())] {
        let grantee = next_ip();
        s.send("fw", &["-A", &nat_access, "-a", &grantee, "-N", &target]);
        let line = s.accepted(&grantee);
        assert_eq!(line["services"], r#"["nat"]"#, "-N {target}");
        s.gw.wait_grant("nat", &grantee);
        assert!(echo_works(&grantee, s.gw.addr("nat")), "-N {target}: no way in");
        assert!(!echo_works(&grantee, s.gw.addr("main")), "-N {target} opened main");
    }
    // --nat-local: the service whose upstream is this host's port.
    let grantee = next_ip();
    s.send(
        "fw",
        &["-A", &format!("tcp/{}", up.port()), "-a", &grantee, "--nat-local"],
    );
    assert_eq!(s.accepted(&grantee)["services"], r#"["nat"]"#);

    // -f: more than open_for, up to max_open_for; beyond it, capped.
    for (asked, granted) in [("300", 300), ("900", 600), ("10", 10)] {
        let grantee = next_ip();
        s.send("fw", &["-A", &access, "-a", &grantee, "-f", asked]);
        let grant = s.gw.wait_grant("main", &grantee);
        assert_eq!(open_for_secs(&grant), granted, "-f {asked}");
    }
    // With a NAT request too (message type 4); nat sets no max_open_for,
    // so its open_for (30s) is the most a packet gets.
    let grantee = next_ip();
    s.send(
        "fw",
        &[
            "-A",
            &nat_access,
            "-a",
            &grantee,
            "-N",
            &format!("127.0.0.1,{}", up.port()),
            "-f",
            "45",
        ],
    );
    assert_eq!(open_for_secs(&s.gw.wait_grant("nat", &grantee)), 30);

    // require_username: the packet's username decides.
    let grantee = next_ip();
    s.send("named", &["-A", &access, "-a", &grantee, "-U", "carol"]);
    s.accepted(&grantee);
}

#[test]
fn each_refusal_has_its_own_reason_in_the_log_and_the_metrics() {
    let s = start();
    let access = s.main_access();
    let a = ["-a", "127.0.2.1"];
    let with = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["-A", &access, a[0], a[1]].iter().map(|x| x.to_string()).collect();
        v.extend(extra.iter().map(|x| x.to_string()));
        v
    };
    let send = |user: &str, args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        s.send(user, &args);
    };

    // (user, client arguments, reason, text the log line's detail holds)
    let up = s.up;
    let nat = |target: String| with(&["-N", &target]);
    let cases: Vec<(&str, Vec<String>, &str, Option<&str>)> = vec![
        (
            "fw",
            vec!["-C".into(), "uname -a".into(), a[0].into(), a[1].into()],
            "command",
            Some("command"),
        ),
        ("m_ctr", with(&["-M", "cbc"]), "decrypt", Some("mode ctr")),
        ("h_sha512", with(&["--hmac-digest-type", "sha256"]), "bad_mac", None),
        (
            "fw",
            vec!["-A".into(), "tcp/1".into(), a[0].into(), a[1].into()],
            "unknown_service",
            Some("tcp/1"),
        ),
        ("old", with(&[]), "expired", None),
        ("named", with(&["-U", "mallory"]), "username_mismatch", None),
        (
            "strict",
            vec!["-A".into(), access.clone(), "-s".into()],
            "source_address_required",
            None,
        ),
        ("fw", nat("10.9.9.9,22".into()), "nat_unknown_target", None),
        (
            "fw",
            nat(format!("127.0.0.1,{}", up[2].port())),
            "nat_ambiguous_target",
            None,
        ),
        (
            "fw",
            nat(format!("127.0.0.1,{}", up[3].port())),
            "nat_not_permitted",
            None,
        ),
        ("other", with(&[]), "not_permitted", None),
    ];
    for (user, args, reason, detail) in &cases {
        send(user, args.clone());
        let line = s.rejected(1, reason);
        if let Some(want) = detail {
            let got = line["detail"].as_str().unwrap_or_default();
            assert!(got.contains(want), "{reason}: detail {got:?} lacks {want:?}");
        }
    }
    // GPG (`fwknop -g`) with fw's HMAC key: recognised, refused.
    gpg_send(&s, "fw", &["-A", &access, "-a", "127.0.2.1"]);
    let line = s.rejected(1, "gpg");
    assert!(line["detail"].as_str().unwrap_or_default().contains("GPG"), "{line}");

    // None of them opened anything.
    assert!(!echo_works("127.0.2.1", s.gw.addr("main")));

    let scrape = s.gw.scrape();
    let reasons = cases.iter().map(|(_, _, reason, _)| reason).chain([&"gpg"]);
    for reason in reasons {
        let n = metric(
            &scrape,
            "portcullis_spa_packets_total",
            &[("format", "fwknop"), ("result", reason)],
        );
        assert_eq!(n, Some(1.0), "{reason} in /metrics");
    }
}

#[test]
fn packets_over_tcp_and_http_are_granted_and_nothing_is_sent_back() {
    use std::io::{Read, Write};
    let s = start();
    let access = s.main_access();
    // An idle connection per slot from one source holds nothing up for
    // another source.
    let idle: Vec<std::net::TcpStream> = (0..4).map(|_| connect_from("127.0.8.1", s.tcp).unwrap()).collect();
    s.send_to(s.tcp.port(), "fw", &["-A", &access, "-a", "127.0.8.2", "-P", "tcp"]);
    s.accepted("127.0.8.2");
    s.gw.wait_grant("main", "127.0.8.2");
    assert!(echo_works("127.0.8.2", s.gw.addr("main")));
    s.send_to(s.http.port(), "fw", &["-A", &access, "-a", "127.0.8.3", "-P", "http"]);
    s.accepted("127.0.8.3");
    s.gw.wait_grant("main", "127.0.8.3");
    drop(idle);

    // Garbage over either: refused as malformed (junk is a debug line and a
    // summary, not a warning each), and not a byte comes back.
    for (n, (addr, garbage)) in [
        (
            s.tcp,
            &b"not a packet at all, but long enough to be looked at by the decoder."[..],
        ),
        (s.http, &b"GET /not-a-packet HTTP/1.0\r\nHost: x\r\n\r\n"[..]),
    ]
    .into_iter()
    .enumerate()
    {
        let mut c = connect_from("127.0.8.4", addr).unwrap();
        c.write_all(garbage).unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        c.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut back = Vec::new();
        let _ = c.read_to_end(&mut back);
        assert!(back.is_empty(), "{addr} answered {back:?}");
        let line = s.gw.wait_for_nth(n + 1, |l| {
            msg(l) == "malformed spa packet" && l["source"] == "127.0.8.4"
        });
        assert_eq!(line["reason"], "malformed", "{line}");
    }
}
