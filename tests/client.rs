//! The client half through the real binary: profiles in a temporary HOME,
//! `open`, `exec`, `connect` (as ssh's ProxyCommand, to a real sshd),
//! `forward`, `.fwknoprc` stanzas, `spa -T`, failing TCP steps, and the
//! order of mixed UDP/TCP knock sequences.

#![allow(
    clippy::unwrap_used,
    clippy::disallowed_methods,
    unreachable_pub,
    reason = "test and bench code: a panic is the failure report, and real time is what is measured"
)]

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A temporary HOME holding `~/.config/portcullis/client.toml`.
struct Home {
    dir: tempfile::TempDir,
}

impl Home {
    fn new() -> Home {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join(".config/portcullis")).unwrap();
        Home { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn profiles(&self, text: &str) {
        std::fs::write(self.path().join(".config/portcullis/client.toml"), text).unwrap();
    }

    /// Writes `name` under HOME with `mode`.
    fn file(&self, name: &str, text: &[u8], mode: u32) -> PathBuf {
        let path = self.path().join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    /// The binary with this HOME and no other profile settings.
    fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env("HOME", self.path())
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("PORTCULLIS_PROFILES");
        cmd
    }

    fn run(&self, args: &[&str]) -> (i32, String, String) {
        let out = self.cmd(args).output().expect("run portcullis");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

/// Every client error is exactly one `error: ...` line.
fn one_error_line(stderr: &str) {
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "stderr is not one line: {stderr:?}");
    assert!(lines[0].starts_with("error: "), "{stderr:?}");
}

fn pg_reachable() -> String {
    let upstream = pg_upstream();
    assert!(
        std::net::TcpStream::connect(&upstream).is_ok(),
        "PostgreSQL is not reachable at {upstream}: these tests front a real database"
    );
    upstream
}

/// A gateway in front of `upstream` with a UDP knock sequence; returns it
/// and the sequence.
fn knock_gateway(upstream: &str, open_for: &str) -> (Gateway, [u16; 3]) {
    let (gw, p) = Gateway::builder()
        .on_free_ports(10, |p| {
            format!(
                r#"
[service.db]
listen = "127.0.0.1:0"
upstream = "{upstream}"
unauthorized = "refuse"
open_for = "{open_for}"
knock = {{ sequence = ["{}/udp", "{}/udp", "{}/udp"] }}
"#,
                p[3], p[7], p[5]
            )
        })
        .start_on_ports();
    (gw, [p[3], p[7], p[5]])
}

fn knock_profile(name: &str, seq: &[u16], connect: std::net::SocketAddr, open_for: &str) -> String {
    let steps: Vec<String> = seq.iter().map(|p| format!("\"{p}/udp\"")).collect();
    format!(
        "[profile.{name}]\nhost = \"127.0.0.1\"\nknock = [{}]\nconnect = \"{connect}\"\nopen_for = \"{open_for}\"\n",
        steps.join(", ")
    )
}

#[test]
fn open_a_profile_then_psql_runs_select_1() {
    let upstream = pg_reachable();
    let (gw, seq) = knock_gateway(&upstream, "30s");
    let port = gw.addr("db").port();
    let home = Home::new();
    home.profiles(&knock_profile("db", &seq, gw.addr("db"), "30s"));
    assert!(psql(port, "select 1").is_err(), "psql got through before the open");

    let (code, _, err) = home.run(&["open", "db"]);
    assert_eq!(code, 0, "{err}");
    gw.wait_grant("db", "127.0.0.1");
    assert_eq!(psql(port, "select 1").as_deref(), Ok("1"));
}

#[test]
fn exec_opens_runs_psql_and_passes_its_exit_status_on() {
    let upstream = pg_reachable();
    let (gw, seq) = knock_gateway(&upstream, "30s");
    let port = gw.addr("db").port().to_string();
    let home = Home::new();
    home.profiles(&knock_profile("db", &seq, gw.addr("db"), "30s"));
    let psql_args = |sql: &'static str| -> Vec<String> {
        [
            "exec",
            "db",
            "--",
            "psql",
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-tAc",
            sql,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let args = psql_args("select 1");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, out, err) = home.run(&args);
    assert_eq!((code, out.trim()), (0, "1"), "{err}");
    gw.wait_grant("db", "127.0.0.1");

    // psql's own failure status (1: the query failed) comes back.
    let args = psql_args("select * from no_such_table");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, _, err) = home.run(&args);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no_such_table"), "{err}");

    let (code, _, _) = home.run(&["exec", "db", "--", "sh", "-c", "exit 7"]);
    assert_eq!(code, 7);
    let (code, _, err) = home.run(&["exec", "db", "--", "/nonexistent/command"]);
    assert_eq!(code, 127);
    one_error_line(&err);
    let not_executable = home.file("not-executable", b"#!/bin/sh\n", 0o644);
    let (code, _, err) = home.run(&["exec", "db", "--", not_executable.to_str().unwrap()]);
    assert_eq!(code, 126);
    one_error_line(&err);
}

/// `portcullis forward` on port 0; returns the process and its address.
fn start_forward(home: &Home, name: &str) -> (Child, u16) {
    let mut child = home
        .cmd(&["forward", name, "--listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn forward");
    let mut line = String::new();
    BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .strip_prefix("forwarding ")
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("forward did not say where it listens: {line:?}"));
    let port = addr.parse::<std::net::SocketAddr>().unwrap().port();
    (child, port)
}

#[test]
fn forward_opens_again_once_the_grant_window_has_passed() {
    let upstream = pg_reachable();
    let (gw, seq) = knock_gateway(&upstream, "2s");
    let home = Home::new();
    home.profiles(&knock_profile("db", &seq, gw.addr("db"), "2s"));
    let (mut forward, port) = start_forward(&home, "db");

    assert_eq!(psql(port, "select 1").as_deref(), Ok("1"));
    gw.wait_grant("db", "127.0.0.1");
    gw.wait_for(|l| msg(l) == "grant expired" && l["source"] == "127.0.0.1");
    assert!(
        psql(gw.addr("db").port(), "select 1").is_err(),
        "the grant did not expire"
    );

    assert_eq!(psql(port, "select 2").as_deref(), Ok("2"));
    assert_eq!(gw.count(|l| msg(l) == "grant" && l["source"] == "127.0.0.1"), 2);
    let _ = forward.kill();
    let _ = forward.wait();
}

fn is_root() -> bool {
    let out = Command::new("id").arg("-u").output().expect("id");
    String::from_utf8_lossy(&out.stdout).trim() == "0"
}

/// A real sshd on a free port with its own host key, config and
/// authorized key, in `dir`.
struct Sshd {
    child: Child,
    port: u16,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ssh_keygen(path: &Path) {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .output()
        .expect("ssh-keygen (openssh-client; scripts/install-test-deps installs it)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

fn start_sshd(dir: &Path) -> Sshd {
    ssh_keygen(&dir.join("host_key"));
    ssh_keygen(&dir.join("id"));
    std::fs::copy(dir.join("id.pub"), dir.join("authorized_keys")).unwrap();
    // sshd's privilege separation directory.
    std::fs::create_dir_all("/run/sshd").unwrap();
    let port = free_ports(1)[0];
    let config = format!(
        "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\n\
         PidFile {d}/sshd.pid\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n\
         UsePAM no\nStrictModes no\n",
        d = dir.display()
    );
    std::fs::write(dir.join("sshd_config"), config).unwrap();
    let child = Command::new("/usr/sbin/sshd")
        .args(["-D", "-e", "-f"])
        .arg(dir.join("sshd_config"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("sshd (openssh-server; scripts/install-test-deps installs it)");
    let mut sshd = Sshd { child, port };
    let deadline = std::time::Instant::now() + PATIENCE;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = sshd.child.try_wait().unwrap() {
            panic!("sshd exited with {status}");
        }
        assert!(std::time::Instant::now() < deadline, "sshd did not listen");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    sshd
}

#[test]
fn ssh_through_connect_as_proxy_command_runs_a_command() {
    if !is_root() {
        println!("skipped: sshd must start as root to log a user in; run as root (CI does)");
        return;
    }
    let home = Home::new();
    let sshd = start_sshd(home.path());
    let (gw, seq) = knock_gateway(&format!("127.0.0.1:{}", sshd.port), "30s");
    let guarded = gw.addr("db");
    home.profiles(&knock_profile("box", &seq, guarded, "30s"));
    let proxy = format!("{BIN} connect box %h %p");
    let out = Command::new("ssh")
        .env("HOME", home.path())
        .args([
            "-F",
            "/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
        ])
        .args(["-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"])
        .arg("-o")
        .arg(format!("ProxyCommand={proxy}"))
        .arg("-i")
        .arg(home.path().join("id"))
        .args([
            "-p",
            &guarded.port().to_string(),
            "root@127.0.0.1",
            "echo through-the-gate",
        ])
        .output()
        .expect("ssh (openssh-client; scripts/install-test-deps installs it)");
    assert!(
        out.status.success(),
        "ssh failed: {}\ngateway log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        gw.log_text()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "through-the-gate");
    gw.wait_grant("db", "127.0.0.1");
}

/// `fwknop --key-gen` output (KEY_BASE64 and HMAC_KEY_BASE64 lines).
fn fwknop_keys(home: &Path) -> (String, String) {
    let out = Command::new("fwknop")
        .arg("--key-gen")
        .env("HOME", home)
        .output()
        .expect("the stock fwknop client (scripts/install-test-deps installs it)");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("{name} missing from {text}"))
            .trim()
            .to_string()
    };
    (value("KEY_BASE64"), value("HMAC_KEY_BASE64"))
}

fn spa_gateway(upstream: std::net::SocketAddr, key_file: &Path, admin: bool) -> (Gateway, u16) {
    let (gw, p) = Gateway::builder()
        .on_free_ports(1, |p| {
            format!(
                r#"{}
[spa]
listen = "127.0.0.1:{}"

[service.echo]
listen = "127.0.0.1:0"
upstream = "{upstream}"
unauthorized = "refuse"
open_for = "30s"
spa_users = ["fw"]

[user.fw]
key_file = "{}"
"#,
                if admin {
                    "[admin]\nlisten = \"127.0.0.1:0\"\n"
                } else {
                    ""
                },
                p[0],
                key_file.display()
            )
        })
        .start_on_ports();
    (gw, p[0])
}

#[test]
fn a_fwknoprc_stanza_opens_the_service_with_dash_n() {
    let home = Home::new();
    let (key, hmac) = fwknop_keys(home.path());
    let server_key = home.file(
        "fw.key",
        format!("KEY_BASE64: {key}\nHMAC_KEY_BASE64: {hmac}\n").as_bytes(),
        0o600,
    );
    let upstream = echo_server("127.0.0.1:0");
    let (gw, spa_port) = spa_gateway(upstream, &server_key, false);
    let echo = gw.addr("echo");
    let rc = format!(
        "[default]\nSPA_SERVER_PROTO udp\nUSE_HMAC Y\nHMAC_DIGEST_TYPE SHA256\n\n\
         [gw]\nSPA_SERVER 127.0.0.1\nSPA_SERVER_PORT {spa_port}\nACCESS tcp/{}\nALLOW_IP source\nSPOOF_USER fw\n\
         KEY_BASE64 {key}\nHMAC_KEY_BASE64 {hmac}\n",
        echo.port()
    );
    let rc_path = home.file(".fwknoprc", rc.as_bytes(), 0o644);

    // Keys in a file others can read are refused, as ssh refuses them.
    let (code, _, err) = home.run(&["spa", "-n", "gw"]);
    assert_eq!(code, 3, "{err}");
    one_error_line(&err);
    assert!(err.contains("readable by others"), "{err}");
    assert!(!echo_works("127.0.0.1", echo));

    std::fs::set_permissions(&rc_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, _, err) = home.run(&["spa", "-n", "gw"]);
    assert_eq!(code, 0, "{err}");
    let grant = gw.wait_grant("echo", "127.0.0.1");
    assert_eq!(grant["user"], "fw");
    assert!(echo_works("127.0.0.1", echo));
}

#[test]
fn an_unsupported_fwknoprc_setting_is_a_clear_error() {
    let home = Home::new();
    home.file(
        ".fwknoprc",
        b"[gw]\nSPA_SERVER 127.0.0.1\nACCESS tcp/22\nSPA_SERVER_PROTO http\nKEY_BASE64 x\n",
        0o600,
    );
    let (code, _, err) = home.run(&["open", "gw"]);
    assert_eq!(code, 3);
    one_error_line(&err);
    assert!(err.contains("SPA_SERVER_PROTO") && err.contains("http"), "{err}");
}

#[test]
fn a_profile_key_file_others_can_read_is_refused() {
    let home = Home::new();
    let (code, key, _) = home.run(&["keygen"]);
    assert_eq!(code, 0);
    home.file("alice.key", key.as_bytes(), 0o640);
    home.profiles(
        "[profile.db-spa]\nhost = \"127.0.0.1\"\nspa = { port = 9, access = [\"tcp/5432\"], key_file = \"~/alice.key\" }\n",
    );
    let (code, _, err) = home.run(&["open", "db-spa"]);
    assert_eq!(code, 3, "{err}");
    one_error_line(&err);
    assert!(err.contains("alice.key") && err.contains("chmod 600"), "{err}");
    let (code, _, err) = home.run(&["open", "nonesuch"]);
    assert_eq!(code, 3);
    one_error_line(&err);
}

#[test]
fn spa_test_mode_prints_the_packet_and_sends_nothing() {
    let home = Home::new();
    let (key, hmac) = fwknop_keys(home.path());
    let key_text = format!("KEY_BASE64: {key}\nHMAC_KEY_BASE64: {hmac}\n");
    let server_key = home.file("fw.key", key_text.as_bytes(), 0o600);
    let upstream = echo_server("127.0.0.1:0");
    let (gw, spa_port) = spa_gateway(upstream, &server_key, true);
    let echo = gw.addr("echo");
    let port = spa_port.to_string();
    let access = format!("tcp/{},udp/53", echo.port());
    let base = [
        "spa",
        "-D",
        "127.0.0.1",
        "-p",
        &port,
        "-A",
        &access,
        "--fwknop",
        "-u",
        "fw",
    ];

    // The key comes from stdin.
    let mut args = base.to_vec();
    args.extend(["--key-file", "-", "-T"]);
    let mut child = home
        .cmd(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), key_text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for want in [
        "user:      fw",
        &format!("tcp/{}", echo.port()),
        "udp/53",
        "allow-ip:",
        "timestamp:",
        "not sent",
    ] {
        assert!(stdout.contains(want), "{want:?} missing from {stdout}");
    }
    assert!(
        !stdout.contains(&key) && !stdout.contains(&hmac),
        "key material printed"
    );

    // A packet sent after it is the first the gateway counts: the -T one
    // never arrived (datagrams to one socket are read in order).
    let key_path = server_key.to_str().unwrap();
    let only_echo = format!("tcp/{}", echo.port());
    let mut args = base.to_vec();
    args[6] = &only_echo;
    args.extend(["--key-file", key_path, "-v"]);
    let (code, out, err) = home.run(&args);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("sent to 127.0.0.1:") && !out.contains(&key), "{out}");
    gw.wait_grant("echo", "127.0.0.1");
    let scrape = gw.scrape();
    assert_eq!(
        metric(&scrape, "portcullis_spa_packets_total", &[]),
        Some(1.0),
        "{scrape}"
    );
}

#[test]
fn a_failing_tcp_step_exits_non_zero_and_verbose_prints_each_step() {
    let closed = free_ports(2);
    let home = Home::new();
    let udp = format!("{}/udp", closed[0]);
    let tcp = format!("{}/tcp", closed[1]);
    let (code, out, err) = home.run(&["knock", "-v", "127.0.0.1", &udp, &tcp]);
    assert_eq!(code, 1, "{out}{err}");
    one_error_line(&err);
    assert!(err.contains(&closed[1].to_string()), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[0].contains(&udp) && lines[0].ends_with("sent"), "{out}");
    assert!(lines[1].contains(&tcp) && lines[1].contains("failed"), "{out}");

    // Usage errors: one line, exit 2.
    let (code, _, err) = home.run(&["knock", "127.0.0.1", "7000/icmp"]);
    assert_eq!(code, 2);
    one_error_line(&err);
    let (code, _, err) = home.run(&["knock", "--no-such-flag"]);
    assert_eq!(code, 2);
    one_error_line(&err);
}

#[test]
fn keygen_writes_a_private_file_and_keeps_an_existing_one() {
    let home = Home::new();
    let path = home.path().join("new.key");
    let p = path.to_str().unwrap();
    let (code, out, err) = home.run(&["keygen", "-o", p]);
    assert_eq!(code, 0, "{err}");
    assert!(out.is_empty(), "the key went to stdout too");
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let first = std::fs::read_to_string(&path).unwrap();
    assert!(first.contains("PORTCULLIS_KEY_BASE64"));

    let (code, _, err) = home.run(&["keygen", "-o", p]);
    assert_eq!(code, 1);
    one_error_line(&err);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), first);

    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, _, err) = home.run(&["keygen", "-o", p, "--force", "--kind", "fwknop"]);
    assert_eq!(code, 0, "{err}");
    assert_ne!(std::fs::read_to_string(&path).unwrap(), first);
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
}

/// UDP then TCP then UDP then TCP: each change of protocol used to race
/// (the TCP step reached the gate first one time in five on loopback).
#[test]
fn mixed_udp_and_tcp_sequences_arrive_in_order_200_of_200() {
    let upstream = echo_server("127.0.0.1:0");
    let (gw, p) = Gateway::builder()
        .on_free_ports(10, |p| {
            format!(
                r#"
[service.echo]
listen = "127.0.0.1:0"
upstream = "{upstream}"
open_for = "30s"
knock = {{ sequence = ["{}/udp", "{}/tcp", "{}/udp", "{}/tcp"], step_timeout = "5s", sequence_timeout = "15s" }}
"#,
                p[3], p[7], p[5], p[8]
            )
        })
        .start_on_ports();
    let steps = [
        format!("{}/udp", p[3]),
        format!("{}/tcp", p[7]),
        format!("{}/udp", p[5]),
        format!("{}/tcp", p[8]),
    ];
    let mut failed = Vec::new();
    for i in 0..200u16 {
        let source = format!("127.13.{}.{}", i / 200, i % 200 + 1);
        let mut args = vec!["127.0.0.1", "-b", &source];
        args.extend(steps.iter().map(String::as_str));
        portcullis_knock(&args);
        let result = gw.wait_knock("echo", &source, p[8]);
        if result != "advanced" {
            failed.push(format!("{source}: last step {result}"));
        }
    }
    assert!(failed.is_empty(), "{} of 200 out of order: {failed:?}", failed.len());
    gw.wait_for_nth(200, |l| msg(l) == "grant");
}

#[test]
fn knock_and_spa_take_profiles_by_name_from_xdg_or_a_named_file() {
    let home = Home::new();
    let (code, key, _) = home.run(&["keygen"]);
    assert_eq!(code, 0);
    let key_path = home.file("alice.key", key.as_bytes(), 0o600);
    let upstream = echo_server("127.0.0.1:0");
    let (gw, p) = Gateway::builder()
        .files(&[("alice.key", key.as_bytes())])
        .on_free_ports(10, |p| {
            format!(
                r#"
[spa]
listen = "127.0.0.1:{}"

[service.echo]
listen = "127.0.0.1:0"
upstream = "{upstream}"
unauthorized = "refuse"
open_for = "30s"
knock = {{ sequence = ["{}/udp", "{}/tcp", "{}/udp"] }}
spa_users = ["alice"]

[user.alice]
key_file = "alice.key"
"#,
                p[0], p[3], p[7], p[5]
            )
        })
        .start_on_ports();
    let echo = gw.addr("echo");

    // A knock profile under $XDG_CONFIG_HOME, with bind and -d in bare ms.
    let xdg = home.path().join("xdg");
    std::fs::create_dir_all(xdg.join("portcullis")).unwrap();
    std::fs::write(
        xdg.join("portcullis/client.toml"),
        format!(
            "[profile.k]\nhost = \"127.0.0.1\"\nbind = \"127.0.0.21\"\nknock = [\"{}/udp\", \"{}/tcp\", \"{}/udp\"]\n",
            p[3], p[7], p[5]
        ),
    )
    .unwrap();
    let out = home
        .cmd(&["knock", "-n", "k", "-d", "5", "-v"])
        .env("XDG_CONFIG_HOME", &xdg)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 3);
    gw.wait_grant("echo", "127.0.0.21");
    assert!(echo_works("127.0.0.21", echo));

    // A native SPA profile in a file named by --profiles, then by
    // PORTCULLIS_PROFILES.
    let file = home.file(
        "elsewhere.toml",
        format!(
            "[profile.s]\nhost = \"127.0.0.1\"\nbind = \"127.0.0.22\"\n\
             spa = {{ port = {}, access = \"tcp/{}\", key_file = \"{}\" }}\n\
             [profile.t]\nhost = \"127.0.0.1\"\nbind = \"127.0.0.23\"\n\
             spa = {{ port = {}, access = [\"tcp/{}\"], key_file = \"alice.key\", allow_ip = \"127.0.0.24\" }}\n",
            p[0],
            echo.port(),
            key_path.display(),
            p[0],
            echo.port()
        )
        .as_bytes(),
        0o644,
    );
    let f = file.to_str().unwrap();
    let (code, _, err) = home.run(&["spa", "-n", "s", "--profiles", f]);
    assert_eq!(code, 0, "{err}");
    gw.wait_grant("echo", "127.0.0.22");
    let out = home
        .cmd(&["open", "t"])
        .env("PORTCULLIS_PROFILES", &file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    gw.wait_grant("echo", "127.0.0.24");
    assert!(echo_works("127.0.0.24", echo));

    // A knock profile is not an SPA profile.
    let (code, _, err) = home.run(&["spa", "-n", "k"]);
    assert_eq!(code, 3);
    one_error_line(&err);
}

#[test]
fn close_ends_the_grant_new_connections_are_refused_and_the_open_one_lives_on() {
    use std::io::{Read, Write};
    let home = Home::new();
    let (code, key, _) = home.run(&["keygen"]);
    assert_eq!(code, 0);
    let key_path = home.file("alice.key", key.as_bytes(), 0o600);
    let upstream = echo_server("127.0.0.1:0");
    let (gw, p) = Gateway::builder()
        .files(&[("alice.key", key.as_bytes())])
        .on_free_ports(1, |p| {
            format!(
                "[spa]\nlisten = \"127.0.0.1:{}\"\n\n[service.echo]\nlisten = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\n\
                 unauthorized = \"refuse\"\nopen_for = \"1h\"\nspa_users = [\"alice\"]\n\n[user.alice]\nkey_file = \"alice.key\"\n",
                p[0]
            )
        })
        .start_on_ports();
    let echo = gw.addr("echo");
    home.profiles(&format!(
        "[profile.db]\nhost = \"127.0.0.1\"\nbind = \"127.0.0.31\"\n\
         spa = {{ port = {}, access = [\"tcp/{}\"], key_file = \"{}\" }}\n\
         [profile.k]\nhost = \"127.0.0.1\"\nknock = [\"1/udp\", \"3/udp\", \"2/udp\"]\n",
        p[0],
        echo.port(),
        key_path.display()
    ));
    let (code, _, err) = home.run(&["open", "db"]);
    assert_eq!(code, 0, "{err}");
    gw.wait_grant("echo", "127.0.0.31");
    let mut open = connect_from("127.0.0.31", echo).unwrap();
    open.set_read_timeout(Some(PATIENCE)).unwrap();
    let roundtrip = |s: &mut std::net::TcpStream| {
        s.write_all(b"ping").unwrap();
        let mut back = [0u8; 4];
        s.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"ping");
    };
    roundtrip(&mut open);

    let (code, _, err) = home.run(&["close", "db"]);
    assert_eq!(code, 0, "{err}");
    gw.wait_for(|l| msg(l) == "spa close accepted" && l["grantee"] == "127.0.0.31");
    gw.wait_for(|l| msg(l) == "grant revoked" && l["source"] == "127.0.0.31" && l["service"] == "echo");
    assert!(
        !echo_works("127.0.0.31", echo),
        "a new connection got through after close"
    );
    roundtrip(&mut open);

    // A close naming another address than its source is refused: one
    // user must not end another's grant.
    let (code, _, err) = home.run(&["open", "db"]);
    assert_eq!(code, 0, "{err}");
    gw.wait_for_nth(2, |l| msg(l) == "grant" && l["source"] == "127.0.0.31");
    let (code, _, err) = home.run(&["spa", "-n", "db", "--close", "-a", "127.0.0.32"]);
    assert_eq!(code, 0, "{err}");
    let refused = gw.wait_for(|l| msg(l) == "spa packet rejected" && l["source"] == "127.0.0.31");
    assert_eq!(refused["reason"], "source_mismatch", "{refused}");
    assert!(echo_works("127.0.0.31", echo), "the refused close ended the grant");

    // A knock profile has no way to close.
    let (code, _, err) = home.run(&["close", "k"]);
    assert_ne!(code, 0);
    one_error_line(&err);
    assert!(err.contains("only an spa profile can close"), "{err}");
}
