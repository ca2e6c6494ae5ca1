//! The admin endpoint through the real binary: exact metric deltas after
//! real knocks and connections, probes across the lifecycle, the grants
//! API (list, revoke), who may revoke, and TLS with client certificates
//! and certificate reload. HTTP goes through `curl`.

#![allow(
    clippy::unwrap_used,
    clippy::disallowed_methods,
    unreachable_pub,
    reason = "test and bench code: a panic is the failure report, and real time is what is measured"
)]

mod common;

use common::*;
use nix::sys::signal::Signal;
use std::io::ErrorKind;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

const ADMIN: &str = "\n[admin]\nlisten = \"127.0.0.1:0\"\n";

fn knock_seq(p: &[u16]) -> [u16; 3] {
    [p[2], p[6], p[4]]
}

fn knock(gw: &Gateway, seq: [u16; 3], source: &str) {
    knock_and_wait(gw, "echo", &seq, source);
}

/// An echo service with a knock sequence and an admin endpoint on a free
/// loopback port; `admin_extra` is added to the `[admin]` section.
fn start(admin_extra: &str, files: &[(&str, &[u8])]) -> (Gateway, [u16; 3]) {
    let upstream = echo_server("127.0.0.1:0");
    let admin_extra = admin_extra.to_owned();
    let mut builder = Gateway::builder().on_free_ports(8, move |p| {
        format!("{}{ADMIN}{admin_extra}\n", echo_config(upstream, &knock_seq(p), ""))
    });
    for (name, content) in files {
        builder = builder.file(name, content);
    }
    let (gw, p) = builder.start_on_ports();
    (gw, knock_seq(&p))
}

fn assert_reset(source: &str, to: std::net::SocketAddr) {
    let err = match connect_from(source, to) {
        Ok(mut s) => std::io::Read::read(&mut s, &mut [0u8; 16]).expect_err("a refused connection delivered data"),
        Err(e) => e,
    };
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
}

/// The value of a metric in a scrape, 0 when absent.
fn value(scrape: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(scrape, name, labels).unwrap_or(0.0)
}

#[test]
fn the_scrape_counts_knocks_grants_connections_and_bytes_exactly() {
    let (gw, seq) = start("", &[]);
    let echo = gw.addr("echo");
    let before = gw.scrape();
    let svc = ("service", "echo");

    knock(&gw, seq, "127.0.0.1");
    for _ in 0..2 {
        let mut s = connect_from("127.0.0.1", echo).unwrap();
        echo_once(&mut s, b"ping").unwrap();
    }
    gw.wait_for_nth(2, |l| msg(l) == "connection closed");
    for _ in 0..3 {
        assert_reset("127.0.0.2", echo);
    }
    gw.wait_for_nth(3, |l| msg(l) == "connection refused: no grant");
    let after = gw.scrape();

    let delta = |name: &str, labels: &[(&str, &str)]| value(&after, name, labels) - value(&before, name, labels);
    assert_eq!(delta("portcullis_knocks_total", &[svc, ("result", "advanced")]), 3.0);
    assert_eq!(delta("portcullis_knocks_total", &[svc]), 3.0, "no other knock results");
    assert_eq!(delta("portcullis_grants_total", &[svc, ("method", "knock")]), 1.0);
    assert_eq!(value(&after, "portcullis_grants_active", &[svc]), 1.0);
    assert_eq!(
        delta("portcullis_connections_total", &[svc, ("decision", "allowed")]),
        2.0
    );
    assert_eq!(
        delta("portcullis_connections_total", &[svc, ("decision", "refused")]),
        3.0
    );
    assert_eq!(delta("portcullis_connections_total", &[svc]), 5.0);
    assert_eq!(value(&after, "portcullis_connections_active", &[svc]), 0.0);
    // "ping" four bytes each way, twice.
    assert_eq!(
        delta("portcullis_proxied_bytes_total", &[svc, ("direction", "upstream")]),
        8.0
    );
    assert_eq!(
        delta("portcullis_proxied_bytes_total", &[svc, ("direction", "downstream")]),
        8.0
    );
    assert_eq!(delta("portcullis_upstream_connect_duration_seconds_count", &[svc]), 2.0);
    assert_eq!(delta("portcullis_connection_duration_seconds_count", &[svc]), 2.0);
    assert_eq!(
        delta("portcullis_connection_duration_seconds_bucket", &[svc, ("le", "+Inf")]),
        2.0
    );
    assert_eq!(delta("portcullis_upstream_connect_errors_total", &[svc]), 0.0);
    assert_eq!(
        value(
            &after,
            "portcullis_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    for name in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    ] {
        assert!(value(&after, name, &[]) > 0.0, "{name} missing or zero:\n{after}");
    }

    let (ok, out) = promtool(&["check", "metrics"], Some(&after));
    assert!(ok, "promtool check metrics:\n{out}\n{after}");
}

#[test]
fn probes_answer_ready_when_serving_and_draining_after_sigterm() {
    let (mut gw, seq) = start("", &[]);
    let health = gw.http("GET", "/healthz", &[]);
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
    let ready = gw.http("GET", "/readyz", &[]);
    assert_eq!((ready.status, ready.body.as_str()), (200, "ready\n"));
    assert_eq!(gw.http("HEAD", "/readyz", &["-I"]).status, 200);

    // A connection in flight keeps the process draining while we look.
    knock(&gw, seq, "127.0.0.1");
    let mut s = connect_from("127.0.0.1", gw.addr("echo")).unwrap();
    echo_once(&mut s, b"held").unwrap();
    gw.signal(Signal::SIGTERM);
    gw.wait_for(|l| msg(l) == "listeners closed, draining connections");
    let draining = gw.http("GET", "/readyz", &[]);
    assert_eq!((draining.status, draining.body.as_str()), (503, "draining\n"));
    assert_eq!(gw.http("GET", "/healthz", &[]).status, 200, "alive while draining");
    assert_eq!(gw.http("GET", "/metrics", &[]).status, 200, "scrapable while draining");
    drop(s);
    assert!(gw.wait_exit().success());
}

#[test]
fn the_grants_api_lists_a_grant_and_revoking_it_refuses_new_connections_only() {
    let (gw, seq) = start("", &[]);
    let echo = gw.addr("echo");
    let empty = gw.http("GET", "/v1/grants", &[]);
    assert_eq!((empty.status, empty.body.as_str()), (200, "[]"));

    knock(&gw, seq, "127.0.0.1");
    let listed = gw.http("GET", "/v1/grants", &[]);
    assert_eq!(listed.status, 200);
    let grants: serde_json::Value = serde_json::from_str(&listed.body).unwrap();
    let grants = grants.as_array().unwrap();
    assert_eq!(grants.len(), 1, "{grants:?}");
    let g = &grants[0];
    assert_eq!(g["service"], "echo");
    assert_eq!(g["source"], "127.0.0.1");
    assert_eq!(g["method"], "knock");
    assert!(g["user"].is_null());
    let left = g["expires_in_ms"].as_u64().unwrap();
    assert!(left > 0 && left <= 10_000, "expires_in_ms = {left}");

    let mut established = connect_from("127.0.0.1", echo).unwrap();
    echo_once(&mut established, b"before").unwrap();

    let revoked = gw.http("DELETE", "/v1/grants/echo/127.0.0.1", &[]);
    assert_eq!(revoked.status, 204, "{}", revoked.body);
    gw.wait_for(|l| msg(l) == "grant revoked" && l["source"] == "127.0.0.1");
    assert_reset("127.0.0.1", echo);
    echo_once(&mut established, b"after").unwrap();

    assert_eq!(gw.http("DELETE", "/v1/grants/echo/127.0.0.1", &[]).status, 404);
    assert_eq!(gw.http("DELETE", "/v1/grants/echo/not-an-ip", &[]).status, 400);
    assert_eq!(gw.http("GET", "/v1/grants", &[]).body, "[]");
    assert_eq!(
        value(&gw.scrape(), "portcullis_grants_active", &[("service", "echo")]),
        0.0
    );
    assert_eq!(gw.http("POST", "/v1/grants", &[]).status, 400, "a grant needs a body");
    assert_eq!(gw.http("PUT", "/v1/grants", &[]).status, 405);
    assert_eq!(gw.http("GET", "/v1/grants/echo/127.0.0.1", &[]).status, 405);
    assert_eq!(gw.http("GET", "/nowhere", &[]).status, 404);
}

#[test]
fn revoking_needs_the_token_when_loopback_is_not_trusted() {
    let token = "t0k3n-for-the-admin-api-0123456789";
    let file = format!("{token}\n");
    let (gw, seq) = start(
        "allow_loopback_mutations = false\ntoken_file = \"admin.token\"",
        &[("admin.token", file.as_bytes())],
    );
    knock(&gw, seq, "127.0.0.1");
    let path = "/v1/grants/echo/127.0.0.1";
    assert_eq!(gw.http("DELETE", path, &[]).status, 403);
    let wrong = format!("Authorization: Bearer {token}x");
    assert_eq!(gw.http("DELETE", path, &["-H", &wrong]).status, 403);
    let basic = "Authorization: Basic dXNlcjpwYXNz";
    assert_eq!(gw.http("DELETE", path, &["-H", basic]).status, 403);
    let listed = gw.http("GET", "/v1/grants", &[]);
    assert_eq!(listed.status, 200, "reads need no token");
    assert!(
        listed.body.contains("127.0.0.1"),
        "the refused revocations changed nothing"
    );

    let right = format!("Authorization: Bearer {token}");
    assert_eq!(gw.http("DELETE", path, &["-H", &right]).status, 204);
    assert!(!gw.log_text().contains(token), "the token was logged");
}

/// The echo service with a trap port (`p[7]`) beside its sequence, and an
/// admin endpoint with `admin_extra`.
fn start_with_trap(admin_extra: &str, files: &[(&str, &[u8])]) -> (Gateway, [u16; 3], u16) {
    let upstream = echo_server("127.0.0.1:0");
    let admin_extra = admin_extra.to_owned();
    let mut builder = Gateway::builder().on_free_ports(8, move |p| {
        let config = echo_config(upstream, &knock_seq(p), "").replace(
            ", step_timeout",
            &format!(", trap_ports = [\"{}/udp\"], step_timeout", p[7]),
        );
        format!("{config}{ADMIN}{admin_extra}\n")
    });
    for (name, content) in files {
        builder = builder.file(name, content);
    }
    let (gw, p) = builder.start_on_ports();
    (gw, knock_seq(&p), p[7])
}

/// Scrapes until `name{labels}` reaches `want` (counters move after the
/// packet that moves them is read, so there is no log line to wait for).
fn wait_metric(gw: &Gateway, name: &str, labels: &[(&str, &str)], want: f64) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let got = value(&gw.scrape(), name, labels);
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "{name}{labels:?} is {got}, not {want}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

#[test]
fn the_lockout_api_lists_a_trapped_source_and_clearing_it_lets_it_knock_again() {
    let (gw, seq, trap) = start_with_trap("", &[]);
    let scrape = gw.scrape();
    assert_eq!(value(&scrape, "portcullis_lockouts_active", &[]), 0.0);
    assert_eq!(
        metric(&scrape, "portcullis_lockouts_total", &[("reason", "trap")]),
        Some(0.0)
    );
    assert_eq!(gw.http("GET", "/v1/lockouts", &[]).body, "[]");

    knock_udp(&[trap], "127.0.0.9");
    gw.wait_for(|l| msg(l) == "source locked out: it hit a trap port" && l["source"] == "127.0.0.9");
    let listed = gw.http("GET", "/v1/lockouts", &[]);
    assert_eq!(listed.status, 200);
    let lockouts = json(&listed.body);
    let lockouts = lockouts.as_array().unwrap();
    assert_eq!(lockouts.len(), 1, "{lockouts:?}");
    assert_eq!(lockouts[0]["source"], "127.0.0.9");
    assert_eq!(lockouts[0]["reason"], "trap");
    let left = lockouts[0]["expires_in_ms"].as_u64().unwrap();
    assert!(left > 0, "{lockouts:?}");
    assert!(lockouts[0]["since"].as_str().unwrap().ends_with('Z'));
    let scrape = gw.scrape();
    assert_eq!(value(&scrape, "portcullis_lockouts_active", &[]), 1.0);
    assert_eq!(value(&scrape, "portcullis_lockouts_total", &[("reason", "trap")]), 1.0);

    // Locked out, the right sequence is ignored.
    let refusals = [("listener", "knock"), ("reason", "locked_out")];
    let before = value(&gw.scrape(), "portcullis_source_refusals_total", &refusals);
    knock_udp(&seq, "127.0.0.9");
    wait_metric(&gw, "portcullis_source_refusals_total", &refusals, before + 3.0);
    assert_eq!(gw.http("GET", "/v1/grants", &[]).body, "[]");

    let cleared = gw.http("DELETE", "/v1/lockouts/127.0.0.9", &[]);
    assert_eq!(cleared.status, 204, "{}", cleared.body);
    let audit = gw.wait_for(|l| msg(l) == "lockout cleared" && l["source"] == "127.0.0.9");
    assert_eq!(audit["target"], "portcullis::audit", "{audit}");
    assert_eq!(audit["reason"], "trap");
    let by = audit["by"].as_str().unwrap();
    assert!(by.starts_with("loopback 127.0.0.1:"), "by = {by}");
    assert_eq!(gw.http("DELETE", "/v1/lockouts/127.0.0.9", &[]).status, 404);
    assert_eq!(gw.http("DELETE", "/v1/lockouts/nowhere", &[]).status, 400);
    assert_eq!(gw.http("GET", "/v1/lockouts", &[]).body, "[]");
    assert_eq!(value(&gw.scrape(), "portcullis_lockouts_active", &[]), 0.0);

    knock(&gw, seq, "127.0.0.9");
    assert!(echo_works("127.0.0.9", gw.addr("echo")));
}

#[test]
fn a_manual_grant_admits_its_source_and_the_audit_log_says_who_gave_and_revoked_it() {
    let token = "t0k3n-for-the-admin-api-0123456789";
    let file = format!("{token}\n");
    let (gw, _, _) = start_with_trap("token_file = \"admin.token\"", &[("admin.token", file.as_bytes())]);
    let echo = gw.addr("echo");
    let bearer = format!("Authorization: Bearer {token}");
    let body = r#"{"service": "echo", "source": "127.0.0.3", "duration": "2m"}"#;
    let post = |auth: &[&str], body: &str| {
        let mut args = vec!["-H", "Content-Type: application/json", "--data-raw", body];
        args.extend_from_slice(auth);
        gw.http("POST", "/v1/grants", &args)
    };
    assert_eq!(post(&[], body).status, 403, "a configured token is required");
    assert!(!echo_works("127.0.0.3", echo));
    let unknown = r#"{"service": "nope", "source": "127.0.0.3", "duration": "2m"}"#;
    assert_eq!(post(&["-H", &bearer], unknown).status, 404);
    let long = r#"{"service": "echo", "source": "127.0.0.3", "duration": "2d"}"#;
    let refused = post(&["-H", &bearer], long);
    assert_eq!(refused.status, 400);
    assert!(refused.body.contains("24h"), "{}", refused.body);

    let given = post(&["-H", &bearer], body);
    assert_eq!(given.status, 201, "{}", given.body);
    let g = json(&given.body);
    assert_eq!(
        (g["service"].as_str(), g["method"].as_str(), g["by"].as_str()),
        (Some("echo"), Some("manual"), Some("token"))
    );
    let audit = gw.wait_for(|l| msg(l) == "grant" && l["source"] == "127.0.0.3");
    assert_eq!(audit["target"], "portcullis::audit");
    assert_eq!(audit["method"], "manual");
    assert_eq!(audit["by"], "token");
    assert!(echo_works("127.0.0.3", echo), "the manual grant admits its source");
    assert!(!echo_works("127.0.0.4", echo), "and only it");
    let listed = json(&gw.http("GET", "/v1/grants", &[]).body);
    assert_eq!(listed[0]["method"], "manual", "{listed}");
    assert_eq!(listed[0]["by"], "token", "{listed}");
    let left = listed[0]["expires_in_ms"].as_u64().unwrap();
    assert!(left > 60_000 && left <= 120_000, "expires_in_ms = {left}");
    assert_eq!(
        value(
            &gw.scrape(),
            "portcullis_grants_total",
            &[("service", "echo"), ("method", "manual")]
        ),
        1.0
    );

    let revoked = gw.http("DELETE", "/v1/grants/echo/127.0.0.3", &["-H", &bearer]);
    assert_eq!(revoked.status, 204, "{}", revoked.body);
    let audit = gw.wait_for(|l| msg(l) == "grant revoked" && l["source"] == "127.0.0.3");
    assert_eq!(audit["target"], "portcullis::audit");
    assert_eq!(audit["by"], "token", "{audit}");
    assert_reset("127.0.0.3", echo);
    assert!(!gw.log_text().contains(token), "the token was logged");
}

/// A test PKI made with the `openssl` command in `dir`.
struct Pki<'a> {
    dir: &'a Path,
}

impl Pki<'_> {
    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(self.dir)
            .output()
            .expect("openssl (scripts/install-test-deps installs it)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A self-signed CA `{name}.pem` with key `{name}.key`.
    fn ca(&self, name: &str) {
        self.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
        ]);
    }

    /// A leaf `{name}.pem` / `{name}.key` signed by `ca`, for a server on
    /// 127.0.0.1 (`serverAuth`) or a client (`clientAuth`).
    fn leaf(&self, name: &str, ca: &str, usage: &str) {
        let ext = format!("{name}.ext");
        std::fs::write(
            self.dir.join(&ext),
            format!(
                "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage={usage}\nsubjectAltName=IP:127.0.0.1\n"
            ),
        )
        .unwrap();
        self.openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
        ]);
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext,
            "-out",
            &format!("{name}.pem"),
        ]);
    }

    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.dir.join(name)).unwrap()
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_str().unwrap().to_string()
    }
}

/// Replaces `path` at once (write beside, then rename), as a deploy tool
/// or a Kubernetes secret update does.
fn replace(path: &Path, content: &[u8]) {
    let tmp = path.with_extension("new");
    write_private(&tmp, content);
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn admin_over_tls_verifies_client_certificates_and_reloads_its_certificate() {
    let scratch = tempfile::tempdir().unwrap();
    let pki = Pki { dir: scratch.path() };
    pki.ca("ca");
    pki.leaf("server", "ca", "serverAuth");
    pki.leaf("client", "ca", "clientAuth");
    pki.ca("rogue-ca");
    pki.leaf("rogue", "rogue-ca", "clientAuth");
    let (server_pem, server_key, ca_pem) = (pki.read("server.pem"), pki.read("server.key"), pki.read("ca.pem"));
    let (gw, seq) = start(
        "allow_loopback_mutations = false\ntls_cert = \"server.pem\"\ntls_key = \"server.key\"\nclient_ca = \"clients.pem\"",
        &[
            ("server.pem", &server_pem),
            ("server.key", &server_key),
            ("clients.pem", &ca_pem),
        ],
    );
    let line = gw.wait_for(|l| msg(l) == "listening" && l["kind"] == "admin");
    assert_eq!(line["tls"], true);
    let base = format!("https://{}", gw.admin.unwrap());
    let ca = pki.path("ca.pem");
    let https = |method: &str, path: &str, extra: &[&str]| {
        let mut args = vec!["-X", method, "--cacert", &ca];
        args.extend_from_slice(extra);
        curl(&args, &format!("{base}{path}"))
    };

    let health = https("GET", "/healthz", &[]);
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
    assert_eq!(https("GET", "/metrics", &[]).status, 200);
    let plain = gw.http("GET", "/healthz", &[]);
    assert_eq!(plain.status, 0, "plain HTTP was answered: {}", plain.body);

    knock(&gw, seq, "127.0.0.1");
    let path = "/v1/grants/echo/127.0.0.1";
    assert_eq!(https("DELETE", path, &[]).status, 403, "no client certificate");
    let (rogue_cert, rogue_key) = (pki.path("rogue.pem"), pki.path("rogue.key"));
    let rogue = https("DELETE", path, &["--cert", &rogue_cert, "--key", &rogue_key]);
    assert_eq!(
        rogue.status, 0,
        "a certificate from another CA was accepted: {}",
        rogue.body
    );
    let (client_cert, client_key) = (pki.path("client.pem"), pki.path("client.key"));
    let client = ["--cert", client_cert.as_str(), "--key", client_key.as_str()];
    assert_eq!(https("DELETE", path, &client).status, 204);
    let audit = gw.wait_for(|l| msg(l) == "grant revoked" && l["source"] == "127.0.0.1");
    assert_eq!(audit["by"], "client-cert CN=client", "{audit}");
    assert_eq!(https("DELETE", path, &client).status, 404);

    // A broken certificate file keeps the old certificate in use.
    let server_path = gw.dir.path().join("server.pem");
    replace(&server_path, b"-----BEGIN CERTIFICATE-----\nnot base64\n");
    assert_eq!(https("GET", "/healthz", &[]).status, 200);
    let warned = gw.wait_for(|l| msg(l).starts_with("cannot reload the admin tls files"));
    assert_eq!(warned["level"], "WARN");

    // A new certificate from a new CA is picked up by new connections.
    pki.ca("ca2");
    pki.leaf("server2", "ca2", "serverAuth");
    replace(&gw.dir.path().join("server.key"), &pki.read("server2.key"));
    replace(&server_path, &pki.read("server2.pem"));
    let ca2 = pki.path("ca2.pem");
    let deadline = Instant::now() + PATIENCE;
    loop {
        let r = curl(&["--cacert", &ca2], &format!("{base}/healthz"));
        if r.status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate was never served: {}",
            r.body
        );
    }
    gw.wait_for(|l| msg(l) == "admin tls certificate reloaded");
    assert_eq!(
        https("GET", "/healthz", &[]).status,
        0,
        "the old certificate is still served"
    );
}
