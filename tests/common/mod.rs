//! Test harness: runs the real `portcullis` binary on free ports, reads its
//! JSON log, and offers the peers the tests need (echo upstreams, clients
//! bound to distinct 127.x.y.z sources, the knock clients).
//!
//! Synchronisation is by log lines: `ready` after every listener is bound,
//! `knock` for each knock the gate processed, `grant` / `grant expired`.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_portcullis");

/// Longest wait for anything the gateway should do promptly.
pub const PATIENCE: Duration = Duration::from_secs(15);

pub fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

/// `n` consecutive ports, each free for both TCP and UDP on 127.0.0.1 and
/// ::1 when checked. Below the ephemeral range, so outgoing connections do
/// not take them meanwhile.
pub fn free_ports(n: u16) -> Vec<u16> {
    let mut seed = std::process::id() as u64 ^ Instant::now().elapsed().as_nanos() as u64;
    let clock = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    seed ^= clock;
    for _ in 0..1000 {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let base = 20_000 + ((seed >> 33) % 12_000) as u16;
        let ports: Vec<u16> = (base..base + n).collect();
        if ports.iter().all(|p| port_free(*p)) {
            return ports;
        }
    }
    panic!("no block of {n} free ports");
}

fn port_free(port: u16) -> bool {
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let v6 = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port));
    TcpListener::bind(v4).is_ok()
        && UdpSocket::bind(v4).is_ok()
        && TcpListener::bind(v6).is_ok()
        && UdpSocket::bind(v6).is_ok()
}

#[derive(Default)]
struct Log {
    lines: Vec<Value>,
    raw: Vec<String>,
    closed: bool,
}

/// A running gateway.
pub struct Gateway {
    child: Child,
    log: Arc<(Mutex<Log>, Condvar)>,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    /// Real address of each guarded service.
    pub services: HashMap<String, SocketAddr>,
    /// Real address of the admin endpoint, when the config has one.
    pub admin: Option<SocketAddr>,
}

impl Gateway {
    /// Writes `config` and runs `portcullis serve` on it, waiting for `ready`.
    /// Panics with the process's log if it exits first.
    pub fn start(config: &str) -> Gateway {
        Self::start_with_env(config, &[])
    }

    pub fn start_with_env(config: &str, env: &[(&str, &str)]) -> Gateway {
        match Self::try_start(config, env) {
            Ok(gw) => gw,
            Err(log) => panic!("gateway did not become ready; log:\n{log}"),
        }
    }

    /// Picks `n` consecutive free ports, builds the config from them and
    /// starts; picks again if another process took a port meanwhile.
    pub fn start_on_free_ports(n: u16, config: impl Fn(&[u16]) -> String) -> (Gateway, Vec<u16>) {
        Self::start_on_free_ports_with_files(n, &[], config)
    }

    /// [`Gateway::start_on_free_ports`], with `files` (name, content)
    /// written beside the config first.
    pub fn start_on_free_ports_with_files(
        n: u16,
        files: &[(&str, &[u8])],
        config: impl Fn(&[u16]) -> String,
    ) -> (Gateway, Vec<u16>) {
        let mut last = String::new();
        for _ in 0..5 {
            let ports = free_ports(n);
            match Self::try_start_with_files(&config(&ports), &[], files) {
                Ok(gw) => return (gw, ports),
                Err(log) if log.contains("cannot listen") => last = log,
                Err(log) => panic!("gateway did not become ready; log:\n{log}"),
            }
        }
        panic!("gateway could not bind free ports five times; last log:\n{last}");
    }

    /// Starts, or returns the log of a process that exited before `ready`.
    pub fn try_start(config: &str, env: &[(&str, &str)]) -> Result<Gateway, String> {
        Self::try_start_with_files(config, env, &[])
    }

    /// [`Gateway::try_start`], with `files` (name, content) written beside
    /// the config first.
    pub fn try_start_with_files(
        config: &str,
        env: &[(&str, &str)],
        files: &[(&str, &[u8])],
    ) -> Result<Gateway, String> {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("proxy.toml");
        std::fs::write(&config_path, config).expect("write config");
        for (name, content) in files {
            write_private(&dir.path().join(name), content);
        }
        let mut cmd = Command::new(BIN);
        cmd.args(["--log-format", "json", "serve", "-c"])
            .arg(&config_path)
            .env("RUST_LOG", "portcullis=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn portcullis");
        let stderr = child.stderr.take().expect("stderr piped");
        let log: Arc<(Mutex<Log>, Condvar)> = Arc::default();
        let reader_log = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let (lock, cond) = &*reader_log;
                let mut log = lock.lock().unwrap();
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    log.lines.push(v);
                }
                log.raw.push(line);
                cond.notify_all();
            }
            let (lock, cond) = &*reader_log;
            lock.lock().unwrap().closed = true;
            cond.notify_all();
        });
        let mut gw = Gateway {
            child,
            log,
            dir,
            config_path,
            services: HashMap::new(),
            admin: None,
        };
        {
            let (lock, cond) = &*gw.log;
            let deadline = Instant::now() + PATIENCE;
            let mut log = lock.lock().unwrap();
            while !log.lines.iter().any(|l| msg(l) == "ready") {
                let now = Instant::now();
                if log.closed || now >= deadline {
                    return Err(log.raw.join("\n"));
                }
                log = cond.wait_timeout(log, deadline - now).unwrap().0;
            }
        }
        for line in gw.lines() {
            if msg(&line) == "listening" && line["kind"] == "guarded" {
                let name = line["service"].as_str().unwrap().to_string();
                let addr = line["addr"].as_str().unwrap().parse().unwrap();
                gw.services.insert(name, addr);
            }
            if msg(&line) == "listening" && line["kind"] == "admin" {
                gw.admin = Some(line["addr"].as_str().unwrap().parse().unwrap());
            }
        }
        Ok(gw)
    }

    /// The admin endpoint's base URL over plain HTTP.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin.expect("the config has no [admin] section"))
    }

    /// A request to the admin endpoint over plain HTTP: `curl` with
    /// `args` before the URL.
    pub fn http(&self, method: &str, path: &str, args: &[&str]) -> Http {
        let url = format!("{}{path}", self.admin_url());
        let mut all = vec!["-X", method];
        all.extend_from_slice(args);
        curl(&all, &url)
    }

    /// `GET /metrics`; asserts it answers 200.
    pub fn scrape(&self) -> String {
        let r = self.http("GET", "/metrics", &[]);
        assert_eq!(r.status, 200, "scrape failed: {}", r.body);
        r.body
    }

    pub fn addr(&self, service: &str) -> SocketAddr {
        *self
            .services
            .get(service)
            .unwrap_or_else(|| panic!("no service {service}"))
    }

    /// Every JSON log line so far.
    pub fn lines(&self) -> Vec<Value> {
        self.log.0.lock().unwrap().lines.clone()
    }

    /// The whole log as text, for failure messages.
    pub fn log_text(&self) -> String {
        self.log.0.lock().unwrap().raw.join("\n")
    }

    /// Waits until a log line matches; returns it. Panics after [`PATIENCE`]
    /// or when the process's log ends first.
    pub fn wait_for(&self, pred: impl Fn(&Value) -> bool) -> Value {
        self.wait_for_nth(1, pred)
    }

    /// Waits until `n` log lines match; returns the n-th.
    pub fn wait_for_nth(&self, n: usize, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + PATIENCE;
        let (lock, cond) = &*self.log;
        let mut log = lock.lock().unwrap();
        loop {
            if let Some(v) = log.lines.iter().filter(|l| pred(l)).nth(n - 1) {
                return v.clone();
            }
            let now = Instant::now();
            if log.closed || now >= deadline {
                let text = log.raw.join("\n");
                drop(log);
                panic!(
                    "log line not seen ({}); log so far:\n{text}",
                    if now >= deadline { "timed out" } else { "process ended" }
                );
            }
            log = cond.wait_timeout(log, deadline - now).unwrap().0;
        }
    }

    /// Waits for the gate's `knock` line for `source` on `port` for
    /// `service`; returns its result label.
    pub fn wait_knock(&self, service: &str, source: &str, port: u16) -> String {
        self.wait_knock_nth(1, service, source, port)
    }

    pub fn wait_knock_nth(&self, n: usize, service: &str, source: &str, port: u16) -> String {
        let line = self.wait_for_nth(n, |l| {
            msg(l) == "knock" && l["service"] == service && l["source"] == source && step_port(l) == Some(port)
        });
        line["result"].as_str().unwrap().to_string()
    }

    /// Waits for the grant of `service` to `source`.
    pub fn wait_grant(&self, service: &str, source: &str) -> Value {
        self.wait_for(|l| msg(l) == "grant" && l["service"] == service && l["source"] == source)
    }

    pub fn count(&self, pred: impl Fn(&Value) -> bool) -> usize {
        self.lines().iter().filter(|l| pred(l)).count()
    }

    /// Sends `sig` to the process.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig).expect("kill");
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "gateway did not exit; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn msg(line: &Value) -> &str {
    line["message"].as_str().unwrap_or("")
}

fn step_port(line: &Value) -> Option<u16> {
    let step = line["step"].as_str()?;
    let addr = step.rsplit_once('/')?.0;
    addr.parse::<SocketAddr>().ok().map(|a| a.port())
}

/// A TCP echo server on `addr` (port 0 allowed); returns its address.
pub fn echo_server(addr: &str) -> SocketAddr {
    let listener = TcpListener::bind(addr).expect("bind echo");
    let local = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 16 * 1024];
                loop {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if stream.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
            });
        }
    });
    local
}

/// Connects to `to` from `source` (any port).
pub fn connect_from(source: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let domain = socket2::Domain::for_address(to);
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::new(ip(source), 0).into())?;
    socket.connect_timeout(&to.into(), Duration::from_secs(5))?;
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    Ok(stream)
}

/// One round trip through an echo upstream.
pub fn echo_once(stream: &mut TcpStream, payload: &[u8]) -> std::io::Result<()> {
    stream.write_all(payload)?;
    let mut got = vec![0u8; payload.len()];
    stream.read_exact(&mut got)?;
    assert_eq!(got, payload, "echo returned other bytes");
    Ok(())
}

/// Whether `source` can open a connection to `to` and get an echo back.
pub fn echo_works(source: &str, to: SocketAddr) -> bool {
    match connect_from(source, to) {
        Ok(mut s) => echo_once(&mut s, b"ping").is_ok(),
        Err(_) => false,
    }
}

/// Sends one UDP datagram from `source` to `to`.
pub fn udp_from(source: &str, to: SocketAddr, payload: &[u8]) {
    let socket = UdpSocket::bind(SocketAddr::new(ip(source), 0)).expect("bind udp");
    socket.send_to(payload, to).expect("send udp");
}

/// Runs `portcullis knock` with `args`; asserts success.
pub fn portcullis_knock(args: &[&str]) {
    let out = Command::new(BIN).arg("knock").args(args).output().expect("run knock");
    assert!(
        out.status.success(),
        "portcullis knock {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs the stock knock client (Debian's knockd package) with `args`.
pub fn stock_knock(args: &[&str]) {
    let out = Command::new("knock")
        .args(args)
        .output()
        .expect("the stock knock client (apt-get install knockd; scripts/install-test-deps does it)");
    assert!(
        out.status.success(),
        "knock {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The standard test service: an echo upstream guarded on 127.0.0.1:0 with
/// a UDP knock sequence over the given ports (used in the order given).
pub fn echo_config(upstream: SocketAddr, seq: &[u16], extra: &str) -> String {
    let steps: Vec<String> = seq.iter().map(|p| format!("\"{p}/udp\"")).collect();
    format!(
        r#"
[service.echo]
listen = "127.0.0.1:0"
upstream = "{upstream}"
protocol = "tcp"
unauthorized = "refuse"
open_for = "10s"
knock = {{ sequence = [{}], step_timeout = "5s", sequence_timeout = "15s" }}
{extra}
"#,
        steps.join(", ")
    )
}

/// Runs the binary with `args` and returns (exit code, stdout, stderr).
pub fn run_bin(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run portcullis");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Writes `content` to `path` readable by its owner only, as the gateway
/// demands of key and token files (ssh's rule).
pub fn write_private(path: &Path, content: impl AsRef<[u8]>) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, content).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .unwrap_or_else(|e| panic!("chmod 600 {}: {e}", path.display()));
}

/// A copy of `tests/fixtures/config/{kind}` in a temporary directory with
/// the file modes the fixtures mean: git checks files out 0644, which the
/// gateway refuses for key and token files. Every file becomes 0600, except
/// those whose names say otherwise: `world-readable*` 0644 and
/// `group-readable*` 0640.
pub fn fixture_dir(kind: &str) -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let from = repo_path(&format!("tests/fixtures/config/{kind}"));
    for entry in std::fs::read_dir(&from).unwrap_or_else(|e| panic!("{}: {e}", from.display())) {
        let entry = entry.expect("fixture entry");
        let name = entry.file_name();
        let to = dir.path().join(&name);
        write_private(&to, std::fs::read(entry.path()).expect("read fixture"));
        let name = name.to_string_lossy();
        let mode = if name.starts_with("world-readable") {
            0o644
        } else if name.starts_with("group-readable") {
            0o640
        } else {
            continue;
        };
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode)).expect("chmod fixture");
    }
    dir
}

/// An HTTP answer: status 0 when there was none (refused, TLS failure).
#[derive(Debug)]
pub struct Http {
    pub status: u16,
    pub body: String,
}

/// Runs `curl -sS ARGS URL` and returns the answer.
pub fn curl(args: &[&str], url: &str) -> Http {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"])
        .args(args)
        .arg(url)
        .output()
        .expect("curl (apt-get install curl; scripts/install-test-deps does it)");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    let status = code.trim().parse().unwrap_or(0);
    let body = if status == 0 {
        String::from_utf8_lossy(&out.stderr).into_owned()
    } else {
        body.to_string()
    };
    Http { status, body }
}

/// The sum of the samples of `name` whose labels include `labels`, in a
/// Prometheus text scrape; `None` when there is no such sample.
pub fn metric(scrape: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut sum = None;
    for line in scrape.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (series_name, series_labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if series_name != name {
            continue;
        }
        let pairs: Vec<(&str, &str)> = series_labels
            .split(',')
            .filter_map(|p| p.split_once('='))
            .map(|(k, v)| (k.trim(), v.trim().trim_matches('"')))
            .collect();
        if labels.iter().all(|want| pairs.contains(want)) {
            *sum.get_or_insert(0.0) += value.parse::<f64>().expect("sample value");
        }
    }
    sum
}

/// Runs `promtool` with `args` and `stdin`; returns (success, output).
pub fn promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; scripts/install-test-deps installs it)");
    {
        let mut input = child.stdin.take().expect("stdin piped");
        if let Some(text) = stdin {
            input.write_all(text.as_bytes()).expect("write to promtool");
        }
    }
    let out = child.wait_with_output().expect("promtool output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Where the PostgreSQL the tests front listens.
pub fn pg_upstream() -> String {
    std::env::var("PORTCULLIS_TEST_PG").unwrap_or_else(|_| "127.0.0.1:5432".to_string())
}

/// Runs `sql` with `psql` as `postgres` through 127.0.0.1:`port`; its
/// trimmed output, or its error text.
pub fn psql(port: u16, sql: &str) -> Result<String, String> {
    let out = Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-tAc",
            sql,
        ])
        .env("PGCONNECT_TIMEOUT", "5")
        .output()
        .expect("psql (apt-get install postgresql-client; scripts/install-test-deps does it)");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Sends `seq` as UDP knocks to 127.0.0.1 from `source` with `portcullis
/// knock`, without waiting for the gate.
pub fn knock_udp(seq: &[u16], source: &str) {
    let steps: Vec<String> = seq.iter().map(|p| format!("{p}/udp")).collect();
    let mut args = vec!["127.0.0.1", "-b", source];
    args.extend(steps.iter().map(String::as_str));
    portcullis_knock(&args);
}

/// [`knock_udp`], then waits for `service`'s grant to `source`.
pub fn knock_and_wait(gw: &Gateway, service: &str, seq: &[u16], source: &str) {
    knock_udp(seq, source);
    gw.wait_grant(service, source);
}

/// A `[service.NAME]` table guarding 127.0.0.1:0 in front of `upstream`
/// with a UDP knock sequence over `seq` (used in the order given).
pub fn knock_service(name: &str, upstream: SocketAddr, seq: &[u16]) -> String {
    let steps: Vec<String> = seq.iter().map(|p| format!("\"{p}/udp\"")).collect();
    format!(
        "\n[service.{name}]\nlisten = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\nopen_for = \"30s\"\nknock = {{ sequence = [{}] }}\n",
        steps.join(", ")
    )
}
