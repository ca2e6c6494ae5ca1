//! The child processes the comparison runs (portcullis, HAProxy, iperf3)
//! and what it reads about them from `/proc`. Every wait is bounded; every
//! child is killed when its handle drops, and the watchdog can end them all.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

/// Longest wait for a child to start listening or log a line.
pub const PATIENCE: Duration = Duration::from_secs(15);

/// PIDs of running children, so the watchdog can end them before exiting.
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// Kills every child still running (the watchdog's last act).
pub fn kill_all_children() {
    let pids = CHILDREN.lock().map(|c| c.clone()).unwrap_or_default();
    for pid in pids {
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    }
}

/// A child process that is killed when dropped.
pub struct Proc {
    child: Child,
    name: String,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> Result<Proc> {
        let child = cmd.spawn().with_context(|| format!("cannot start {name}"))?;
        if let Ok(mut c) = CHILDREN.lock() {
            c.push(child.id());
        }
        Ok(Proc {
            child,
            name: name.to_string(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails when the process has exited.
    pub fn check_running(&mut self) -> Result<()> {
        match self.child.try_wait()? {
            Some(status) => bail!("{} exited ({status})", self.name),
            None => Ok(()),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let pid = self.child.id();
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Ok(mut c) = CHILDREN.lock() {
            c.retain(|p| *p != pid);
        }
    }
}

/// Runs `cmd` to completion, killing it after `timeout`.
pub fn run_bounded(what: &str, cmd: &mut Command, timeout: Duration) -> Result<Output> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut proc = Proc::spawn(what, cmd)?;
    let stdout = proc.child.stdout.take().expect("stdout is piped");
    let stderr = proc.child.stderr.take().expect("stderr is piped");
    let out_reader = std::thread::spawn(move || read_all(stdout));
    let err_reader = std::thread::spawn(move || read_all(stderr));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = proc.child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            bail!("{what} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Ok(Output {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    })
}

fn read_all(mut r: impl Read) -> Vec<u8> {
    let mut v = Vec::new();
    let _ = r.read_to_end(&mut v);
    v
}

/// The first line a command prints, or `None` when it cannot run.
pub fn command_line(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).stdin(Stdio::null()).output().ok()?;
    let text = if out.stdout.is_empty() { out.stderr } else { out.stdout };
    let text = String::from_utf8_lossy(&text);
    text.lines()
        .next()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
}

/// Whether `program` is on PATH.
pub fn installed(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false)
}

// ---------------------------------------------------------------- /proc

/// Clock ticks per second of `/proc/PID/stat` times.
pub fn clock_ticks() -> f64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as f64,
        _ => 100.0,
    }
}

/// User plus system CPU time of the whole process (every thread), in ticks.
pub fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("read /proc/{pid}/stat"))?;
    // The command name may hold spaces and parentheses; the fields after
    // the last ')' start with field 3 (state): utime is 14, stime is 15.
    let rest = stat.rsplit_once(')').ok_or_else(|| anyhow!("odd /proc/{pid}/stat"))?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> Result<u64> {
        fields
            .get(n - 3)
            .ok_or_else(|| anyhow!("short /proc/{pid}/stat"))?
            .parse::<u64>()
            .context("parse /proc/PID/stat")
    };
    Ok(field(14)? + field(15)?)
}

/// CPU seconds a process spends from `start` until [`CpuMeter::seconds`].
#[derive(Clone, Copy)]
pub struct CpuMeter {
    pid: u32,
    start: u64,
}

impl CpuMeter {
    pub fn start(pid: u32) -> Result<CpuMeter> {
        Ok(CpuMeter {
            pid,
            start: cpu_ticks(pid)?,
        })
    }

    pub fn seconds(&self) -> Result<f64> {
        Ok(cpu_ticks(self.pid)?.saturating_sub(self.start) as f64 / clock_ticks())
    }
}

/// Resident set size in KiB (`VmRSS` of `/proc/PID/status`).
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("read /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS in /proc/{pid}/status"))
}

/// RSS once it stops moving: two readings 150 ms apart within 64 KiB of
/// each other, or the last reading after `limit`.
pub fn settled_rss_kib(pid: u32, limit: Duration) -> Result<u64> {
    let deadline = Instant::now() + limit;
    let mut last = rss_kib(pid)?;
    loop {
        std::thread::sleep(Duration::from_millis(150));
        let now = rss_kib(pid)?;
        if now.abs_diff(last) <= 64 || Instant::now() >= deadline {
            return Ok(now);
        }
        last = now;
    }
}

/// Whether something listens on TCP `addr` (an IPv4 address), from
/// `/proc/net/tcp`, which does not disturb the listener the way a probe
/// connection would (iperf3 counts one as a failed test).
fn tcp_listening(addr: SocketAddr) -> bool {
    let SocketAddr::V4(v4) = addr else { return false };
    let want = format!("{:08X}:{:04X}", u32::from_le_bytes(v4.ip().octets()), v4.port());
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    table.lines().skip(1).any(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        f.len() > 3 && f[1] == want && f[3] == "0A"
    })
}

/// Waits until `proc` listens on every address in `addrs`.
pub fn wait_listening(proc: &mut Proc, addrs: &[SocketAddr], log: Option<&Path>) -> Result<()> {
    let deadline = Instant::now() + PATIENCE;
    while !addrs.iter().all(|a| tcp_listening(*a)) {
        if let Err(e) = proc.check_running() {
            bail!("{e}: {}", log.map(file_tail).unwrap_or_default());
        }
        if Instant::now() >= deadline {
            bail!("{} did not listen on {addrs:?} within {PATIENCE:?}", proc.name);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn file_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// `n` ports, each free for TCP and UDP on 127.0.0.1 when checked. Below
/// the ephemeral range, so outgoing connections do not take them meanwhile.
pub fn free_ports(n: u16) -> Result<Vec<u16>> {
    let mut seed = u64::from(std::process::id())
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
    for _ in 0..1000 {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let base = 20_000 + ((seed >> 33) % 12_000) as u16;
        let ports: Vec<u16> = (base..base + n).collect();
        if ports.iter().all(|p| port_free(*p)) {
            return Ok(ports);
        }
    }
    bail!("no block of {n} free ports")
}

fn port_free(port: u16) -> bool {
    let a = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpListener::bind(a).is_ok() && UdpSocket::bind(a).is_ok()
}

// ---------------------------------------------------------------- portcullis

#[derive(Default)]
struct Log {
    lines: Vec<Value>,
    raw: Vec<String>,
    closed: bool,
}

/// A running `portcullis serve`, with its JSON log and real addresses.
pub struct Portcullis {
    proc: Proc,
    log: Arc<(Mutex<Log>, Condvar)>,
    /// Real address of each guarded service.
    pub services: HashMap<String, SocketAddr>,
    pub spa: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
}

impl Portcullis {
    /// Writes `config` and `files` (name, content) to a directory of their
    /// own under `dir`, runs the gateway on it and waits for its `ready`
    /// line. The directory is the gateway's alone: it reloads when the
    /// directory of its config changes.
    pub fn start(bin: &Path, dir: &Path, name: &str, config: &str, files: &[(&str, &[u8])]) -> Result<Portcullis> {
        let home = dir.join(name);
        std::fs::create_dir_all(&home)?;
        for (file, content) in files {
            // Key files: the gateway refuses ones other users can read.
            std::fs::write(home.join(file), content)?;
            let private = <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600);
            std::fs::set_permissions(home.join(file), private)?;
        }
        let path: PathBuf = home.join("proxy.toml");
        std::fs::write(&path, config)?;
        let mut cmd = Command::new(bin);
        // The replay log beside the config, unless the caller chose where
        // (PORTCULLIS__STATE__DIR=/dev/shm/x measures without the fsync).
        if std::env::var_os("PORTCULLIS__STATE__DIR").is_none() {
            cmd.env("PORTCULLIS__STATE__DIR", home.join("state"));
        }
        cmd.args(["--log-format", "json", "--log-level", "info", "serve", "-c"])
            .arg(&path)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut proc = Proc::spawn(&format!("portcullis ({name})"), &mut cmd)?;
        let stderr = proc.child.stderr.take().expect("stderr is piped");
        let log: Arc<(Mutex<Log>, Condvar)> = Arc::default();
        let reader = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let (lock, cond) = &*reader;
                let Ok(mut log) = lock.lock() else { break };
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    log.lines.push(v);
                }
                log.raw.push(line);
                cond.notify_all();
            }
            let (lock, cond) = &*reader;
            if let Ok(mut log) = lock.lock() {
                log.closed = true;
            }
            cond.notify_all();
        });
        let mut gw = Portcullis {
            proc,
            log,
            services: HashMap::new(),
            spa: None,
            admin: None,
        };
        gw.wait_for("ready", PATIENCE, |l| msg(l) == "ready")?;
        for line in gw.lines() {
            if msg(&line) != "listening" {
                continue;
            }
            let addr = || -> Result<SocketAddr> {
                line["addr"]
                    .as_str()
                    .ok_or_else(|| anyhow!("listening line without addr"))?
                    .parse()
                    .context("listening addr")
            };
            match line["kind"].as_str() {
                Some("guarded") => {
                    let name = line["service"].as_str().unwrap_or_default().to_string();
                    gw.services.insert(name, addr()?);
                }
                Some("spa") => gw.spa = Some(addr()?),
                Some("admin") => gw.admin = Some(addr()?),
                _ => {}
            }
        }
        Ok(gw)
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn service(&self, name: &str) -> Result<SocketAddr> {
        self.services
            .get(name)
            .copied()
            .ok_or_else(|| anyhow!("the gateway logged no listener for service {name}"))
    }

    fn lines(&self) -> Vec<Value> {
        self.log.0.lock().map(|l| l.lines.clone()).unwrap_or_default()
    }

    /// Waits for a log line matching `pred`.
    pub fn wait_for(&self, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        let (lock, cond) = &*self.log;
        let mut log = lock.lock().map_err(|_| anyhow!("log lock poisoned"))?;
        loop {
            if let Some(v) = log.lines.iter().find(|l| pred(l)) {
                return Ok(v.clone());
            }
            let now = Instant::now();
            if log.closed || now >= deadline {
                let tail = log.raw[log.raw.len().saturating_sub(20)..].join("\n");
                bail!(
                    "portcullis: no {what} log line ({}); log:\n{tail}",
                    if log.closed { "process ended" } else { "timed out" }
                );
            }
            log = cond
                .wait_timeout(log, deadline - now)
                .map_err(|_| anyhow!("log lock poisoned"))?
                .0;
        }
    }

    /// The log lines matching `pred`, as JSON text, for error messages.
    pub fn log_lines(&self, pred: impl Fn(&Value) -> bool) -> Vec<String> {
        self.lines().iter().filter(|l| pred(l)).map(|l| l.to_string()).collect()
    }

    pub fn wait_grant(&self, service: &str, source: &str) -> Result<()> {
        self.wait_for(&format!("grant of {service} to {source}"), PATIENCE, |l| {
            msg(l) == "grant" && l["service"] == service && l["source"] == source
        })
        .map(|_| ())
    }
}

fn msg(line: &Value) -> &str {
    line["message"].as_str().unwrap_or("")
}

// ---------------------------------------------------------------- HAProxy

/// A running HAProxy in TCP mode: each frontend port forwards to one
/// upstream.
pub struct Haproxy {
    proc: Proc,
}

impl Haproxy {
    /// `splice`: force splice(2) both ways (`option splice-auto`,
    /// `splice-request`, `splice-response`); otherwise HAProxy's defaults.
    /// `nofile`: the descriptor limit it inherits, which bounds `maxconn`:
    /// HAProxy refuses to start when it cannot raise the limit to two
    /// descriptors per connection, plus two per pipe with splicing (whose
    /// default `maxpipes` is `maxconn / 4`).
    pub fn start(dir: &Path, name: &str, splice: bool, routes: &[(u16, SocketAddr)], nofile: u64) -> Result<Haproxy> {
        let per_conn = if splice { 2.5 } else { 2.0 };
        let maxconn = ((nofile.saturating_sub(200) as f64 / per_conn) as u64).clamp(100, 40_000);
        let mut cfg = format!(
            "global\n    maxconn {maxconn}\n\ndefaults\n    mode tcp\n    timeout connect 5s\n    \
             timeout client 1h\n    timeout server 1h\n",
        );
        if splice {
            cfg.push_str("    option splice-auto\n    option splice-request\n    option splice-response\n");
        }
        for (i, (port, upstream)) in routes.iter().enumerate() {
            cfg.push_str(&format!(
                "\nlisten l{i}\n    bind 127.0.0.1:{port}\n    server s{i} {upstream}\n"
            ));
        }
        let home = dir.join(name);
        std::fs::create_dir_all(&home)?;
        let path = home.join("haproxy.cfg");
        std::fs::write(&path, cfg)?;
        let log = home.join("haproxy.log");
        let mut cmd = Command::new("haproxy");
        cmd.arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log)?);
        let mut proc = Proc::spawn(&format!("haproxy ({name})"), &mut cmd)?;
        let addrs: Vec<SocketAddr> = routes
            .iter()
            .map(|(p, _)| SocketAddr::from((Ipv4Addr::LOCALHOST, *p)))
            .collect();
        wait_listening(&mut proc, &addrs, Some(&log))?;
        Ok(Haproxy { proc })
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }
}

// ---------------------------------------------------------------- iperf3

/// A running `iperf3 -s` on 127.0.0.1.
pub struct IperfServer {
    _proc: Proc,
    pub addr: SocketAddr,
}

impl IperfServer {
    pub fn start() -> Result<IperfServer> {
        let port = free_ports(1)?[0];
        let mut cmd = Command::new("iperf3");
        cmd.args(["-s", "-B", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut proc = Proc::spawn("iperf3 server", &mut cmd)?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        wait_listening(&mut proc, &[addr], None)?;
        Ok(IperfServer { _proc: proc, addr })
    }
}

/// How much an iperf3 client sends.
#[derive(Clone, Copy)]
pub enum Amount {
    Seconds(u32),
    Bytes(u64),
}

/// What one iperf3 client run moved.
pub struct Transfer {
    /// Bytes the server received.
    pub bytes: u64,
    pub gbit_per_s: f64,
}

/// Runs `iperf3 -c` against `target` with `streams` parallel streams.
pub fn iperf_client(target: SocketAddr, streams: u32, amount: Amount) -> Result<Transfer> {
    let mut cmd = Command::new("iperf3");
    cmd.args(["-c", &target.ip().to_string(), "-p", &target.port().to_string()])
        .args(["-P", &streams.to_string(), "-J"]);
    let limit = match amount {
        Amount::Seconds(s) => {
            cmd.args(["-t", &s.to_string()]);
            Duration::from_secs(u64::from(s) + 20)
        }
        Amount::Bytes(b) => {
            cmd.args(["-n", &b.to_string()]);
            Duration::from_secs(60)
        }
    };
    let out = run_bounded("iperf3 client", &mut cmd, limit)?;
    let json: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "iperf3 printed no JSON ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    if let Some(err) = json["error"].as_str() {
        bail!("iperf3: {err}");
    }
    let sum = &json["end"]["sum_received"];
    let bytes = sum["bytes"]
        .as_u64()
        .ok_or_else(|| anyhow!("iperf3 JSON has no end.sum_received.bytes"))?;
    let bps = sum["bits_per_second"]
        .as_f64()
        .ok_or_else(|| anyhow!("iperf3 JSON has no end.sum_received.bits_per_second"))?;
    if bytes == 0 {
        bail!("iperf3 moved no bytes");
    }
    Ok(Transfer {
        bytes,
        gbit_per_s: bps / 1e9,
    })
}
