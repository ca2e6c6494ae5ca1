//! Test harness: runs the real `portcullis` binary on free ports, reads its
//! JSON log, and offers the peers the tests need (echo upstreams, clients
//! bound to distinct 127.x.y.z sources, the knock clients).
//!
//! Synchronisation is by log lines: `ready` after every listener is bound,
//! `knock` for each knock the gate processed, `grant` / `grant expired`.

#![allow(dead_code)]

mod balancer;
mod knock;
mod metrics;
mod netns;
mod peers;
mod redis;
mod scan;

#[allow(unused_imports)]
pub use balancer::*;
#[allow(unused_imports)]
pub use knock::*;
#[allow(unused_imports)]
pub use metrics::*;
#[allow(unused_imports)]
pub use netns::*;
#[allow(unused_imports)]
pub use peers::*;
#[allow(unused_imports)]
pub use redis::*;
#[allow(unused_imports)]
pub use scan::*;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
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

/// The environment variable that sets `state.dir`.
pub const STATE_DIR_ENV: &str = "PORTCULLIS__STATE__DIR";

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
    /// The free ports the config was built from (see [`Builder::on_free_ports`]).
    pub ports: Vec<u16>,
}

/// Builds a config's text from the free ports picked for it.
type ConfigFn<'a> = Box<dyn Fn(&[u16]) -> String + 'a>;

/// Prepares the config's directory before start (see [`Builder::prepare`]).
type PrepareFn<'a> = Box<dyn Fn(&Path) + 'a>;

/// The config, environment and files of a gateway to start.
#[derive(Default)]
pub struct Builder<'a> {
    config: Option<String>,
    on_ports: Option<(u16, ConfigFn<'a>)>,
    env: Vec<(String, String)>,
    files: Vec<(String, Vec<u8>)>,
    unprivileged: bool,
    nofile: Option<(u64, u64)>,
    prepare: Option<PrepareFn<'a>>,
    netns: Option<String>,
}

impl<'a> Builder<'a> {
    /// The config's text.
    pub fn config(mut self, text: &str) -> Self {
        self.config = Some(text.to_owned());
        self
    }

    /// A config built from `n` consecutive free ports (knock steps need
    /// fixed ones); picked again if another process took one meanwhile.
    pub fn on_free_ports(mut self, n: u16, config: impl Fn(&[u16]) -> String + 'a) -> Self {
        self.on_ports = Some((n, Box::new(config)));
        self
    }

    /// An environment variable for the process.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Environment variables for the process.
    pub fn envs(mut self, vars: &[(&str, &str)]) -> Self {
        for (k, v) in vars {
            self = self.env(k, v);
        }
        self
    }

    /// Files (name, content) written beside the config.
    pub fn files(mut self, files: &[(&str, &[u8])]) -> Self {
        for (name, content) in files {
            self = self.file(name, content);
        }
        self
    }

    /// A file written beside the config.
    pub fn file(mut self, name: &str, content: impl AsRef<[u8]>) -> Self {
        self.files.push((name.to_owned(), content.as_ref().to_vec()));
        self
    }

    /// Keeps the gateway's state (the SPA replay log) in `dir`, which
    /// outlives the gateway: a restart with the same `dir` is a restart of
    /// the same gateway. Without it each gateway gets a fresh directory.
    pub fn state_dir(self, dir: &Path) -> Self {
        self.env(STATE_DIR_ENV, dir.to_str().expect("a UTF-8 state dir"))
    }

    /// Runs `prepare` on the config's directory after the files are
    /// written and before the gateway starts (links, subdirectories).
    pub fn prepare(mut self, prepare: impl Fn(&Path) + 'a) -> Self {
        self.prepare = Some(Box::new(prepare));
        self
    }

    /// Runs the process as `nobody` without capabilities (see
    /// [`scan::UNPRIVILEGED`]); needs root. Files stay readable by root only.
    /// Runs the gateway in the named network namespace (`ip netns exec`).
    pub fn netns(mut self, name: &str) -> Self {
        self.netns = Some(name.to_owned());
        self
    }

    pub fn unprivileged(mut self) -> Self {
        self.unprivileged = true;
        self
    }

    /// Runs the process under descriptor limits `soft` and `hard`
    /// (`prlimit`); the gateway raises its soft limit to the hard one.
    pub fn nofile(mut self, soft: u64, hard: u64) -> Self {
        self.nofile = Some((soft, hard));
        self
    }

    /// Starts and waits for `ready`; panics with the log if it exits first.
    pub fn start(self) -> Gateway {
        match self.try_start() {
            Ok(gw) => gw,
            Err(log) => panic!("gateway did not become ready; log:\n{log}"),
        }
    }

    /// [`Builder::start`], with the ports the config was built from.
    pub fn start_on_ports(self) -> (Gateway, Vec<u16>) {
        let gw = self.start();
        let ports = gw.ports.clone();
        (gw, ports)
    }

    /// Starts, or returns the log of a process that exited before `ready`.
    pub fn try_start(self) -> Result<Gateway, String> {
        let Some((n, config)) = &self.on_ports else {
            let text = self.config.as_deref().expect("a config or on_free_ports");
            return Gateway::launch(text, &self, self.unprivileged, self.nofile);
        };
        let mut last = String::new();
        for _ in 0..5 {
            let ports = free_ports(*n);
            match Gateway::launch(&config(&ports), &self, self.unprivileged, self.nofile) {
                Ok(mut gw) => {
                    gw.ports = ports;
                    return Ok(gw);
                }
                Err(log) if log.contains("cannot listen") => last = log,
                Err(log) => return Err(log),
            }
        }
        Err(format!("could not bind free ports five times; last log:\n{last}"))
    }
}

impl Gateway {
    /// How a test starts a gateway: `Gateway::builder().config(..)
    /// .env(..).file(..).start()`.
    pub fn builder<'a>() -> Builder<'a> {
        Builder::default()
    }

    /// Writes `config` and `files` (name, content) into a new directory and
    /// runs `portcullis serve` on it, waiting for `ready`; the log of a
    /// process that exited before that is the error.
    fn launch(
        config: &str,
        builder: &Builder<'_>,
        unprivileged: bool,
        nofile: Option<(u64, u64)>,
    ) -> Result<Gateway, String> {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cmd_env: Vec<(String, String)> = Vec::new();
        let config_path = dir.path().join("proxy.toml");
        std::fs::write(&config_path, config).expect("write config");
        for (name, content) in &builder.files {
            write_private(&dir.path().join(name), content);
        }

        // Never the system default (/var/lib/portcullis): tests run side by
        // side, and one gateway's replay log is locked against the others.
        // A config with its own [state] section keeps it.
        if !builder.env.iter().any(|(k, _)| k == STATE_DIR_ENV) && !config.contains("[state]") {
            let state = dir.path().join("state");
            std::fs::create_dir(&state).expect("state dir");
            if unprivileged {
                std::fs::set_permissions(&state, std::os::unix::fs::PermissionsExt::from_mode(0o777))
                    .expect("state dir writable by nobody");
            }
            cmd_env.push((
                STATE_DIR_ENV.to_owned(),
                state.to_str().expect("a UTF-8 tempdir").to_owned(),
            ));
        }
        if let Some(prepare) = &builder.prepare {
            prepare(dir.path());
        }
        let mut argv: Vec<String> = Vec::new();
        if let Some(ns) = &builder.netns {
            argv.extend(["ip".into(), "netns".into(), "exec".into(), ns.clone()]);
        }
        if let Some((soft, hard)) = nofile {
            argv.extend(["prlimit".into(), format!("--nofile={soft}:{hard}"), "--".into()]);
        }
        if unprivileged {
            readable_by_all(dir.path(), &config_path);
            argv.push("setpriv".into());
            argv.extend(UNPRIVILEGED.iter().map(|a| a.to_string()));
            argv.push("--".into());
        }
        argv.push(BIN.into());
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        cmd.args(["--log-format", "json", "serve", "-c"])
            .arg(&config_path)
            .env("RUST_LOG", "portcullis=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in builder.env.iter().chain(&cmd_env) {
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
            ports: Vec::new(),
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
    /// Whether the process is still running (it has not exited).
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("wait on portcullis").is_none()
    }

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
