//! The comparison benchmark: direct connections, portcullis and HAProxy,
//! measured in turn, repetition by repetition, in one window on loopback.
//!
//! `scripts/bench` installs the peers, builds the release binary and runs
//! this with `cargo bench --bench compare -- [--quick] [--reps N]`. It
//! builds nothing itself: it runs `target/release/portcullis` (or
//! `PORTCULLIS_BIN`) as a child process on configs written to a temporary
//! directory, opens its gates with real knocks and SPA packets, and reads
//! its CPU time and memory from `/proc`. `benches/README.md` explains every
//! row and the targets.
//!
//! Everything stays on 127.0.0.0/8. Every loop is bounded in count and in
//! time, and a watchdog ends the run (and its children) if it overstays.
//!
//! `--quick` (or `PORTCULLIS_BENCH_QUICK=1`): one repetition of tiny sizes
//! of every measurement, as a smoke test. Either mode exits non-zero only
//! on errors or gross regressions, never on missing a target.

#![allow(
    clippy::unwrap_used,
    clippy::disallowed_methods,
    unreachable_pub,
    reason = "test and bench code: a panic is the failure report, and real time is what is measured"
)]

#[path = "compare/load.rs"]
mod load;
#[path = "compare/procs.rs"]
mod procs;
#[path = "compare/raw.rs"]
mod raw;
#[path = "compare/replicas.rs"]
mod replicas;
#[path = "compare/report.rs"]
mod report;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Result};
use portcullis::spa::keyfile::{self, KeyFile};
use portcullis::spa::native::{self, NativeKey};
use portcullis::spa::Fields;
use portcullis::step::Proto;

use load::{HoldServer, UdpSink};
use procs::{Amount, CpuMeter, Haproxy, IperfServer, Portcullis};
use report::{fmt, percentile, Row, Series, Summary, Verdict, DIRECT, HAPROXY, NAMES, PORTCULLIS, SPLICE, TARGETS};

/// Clients of the connection-rate and refusal tests.
const CLIENTS: usize = 50;
/// Bytes each connection pushes toward the stalled upstream in the "data
/// in flight" memory test: the kernel's socket buffers take them all.
const IN_FLIGHT_BYTES: usize = 64 * 1024;
/// Bytes each connection pushes in the "stalled" memory test: more than
/// the proxy's send buffer toward the upstream holds with 1460-byte
/// segments (about 270 KiB), so the proxy is left holding what it read.
const STALLED_BYTES: usize = 512 * 1024;
/// Quiet between the last close and the "after close" reading.
const AFTER_CLOSE_QUIET: Duration = Duration::from_secs(1);
/// Longest wait for the proxy's RSS to settle.
const MEMORY_SETTLE: Duration = Duration::from_secs(5);
/// Size of the datagrams of the UDP forwarding test.
const DATAGRAM_LEN: usize = 64;
/// The source that knocks for the throughput tests.
const KNOCKER: Ipv4Addr = Ipv4Addr::LOCALHOST;
/// A source that never knocks.
const STRANGER: Ipv4Addr = Ipv4Addr::new(127, 9, 0, 1);

struct Opts {
    quick: bool,
    reps: usize,
    /// Sections to run (`--only udp,conn`); empty runs them all.
    only: Vec<String>,
}

/// The sections `--only` may name.
const SECTIONS: [&str; 12] = [
    "exact", "bulk", "conn", "latency", "udp", "refusals", "opens", "flood", "spaflood", "memory", "raw", "replicas",
];

impl Opts {
    fn wants(&self, section: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == section)
    }
}

impl Opts {
    fn parse() -> Opts {
        let mut quick = std::env::var("PORTCULLIS_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
        let mut reps = None;
        let mut only = Vec::new();
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--quick" => quick = true,
                "--reps" => reps = args.next().and_then(|n| n.parse::<usize>().ok()),
                "--only" => {
                    for section in args.next().unwrap_or_default().split(',') {
                        if SECTIONS.contains(&section) {
                            only.push(section.to_string());
                        } else {
                            eprintln!("bench: unknown section {section:?} (known: {})", SECTIONS.join(", "));
                        }
                    }
                }
                // `cargo bench` passes --bench; filters mean nothing here.
                "--bench" => {}
                other => eprintln!("bench: ignoring argument {other:?} (known: --quick, --reps N, --only SECTIONS)"),
            }
        }
        Opts {
            quick,
            reps: reps.unwrap_or(if quick { 1 } else { 5 }).max(1),
            only,
        }
    }
}

/// How much each measurement does.
struct Sizes {
    bulk: Amount,
    conn_time: Duration,
    conn_max: u64,
    latency_warmup: usize,
    latency_n: usize,
    memory_counts: Vec<usize>,
    opens: usize,
    udp_time: Duration,
    udp_max: u64,
    refusal_time: Duration,
    knock_flood: u64,
    spa_flood_time: Duration,
    exact_bytes: u64,
    /// Samples of each timed row of the replicas section.
    replica_samples: usize,
}

impl Sizes {
    fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                bulk: Amount::Bytes(32 << 20),
                conn_time: Duration::from_millis(300),
                conn_max: 20_000,
                latency_warmup: 100,
                latency_n: 1_000,
                memory_counts: vec![200],
                opens: 5,
                udp_time: Duration::from_millis(200),
                udp_max: 200_000,
                refusal_time: Duration::from_millis(200),
                knock_flood: 20_000,
                spa_flood_time: Duration::from_secs(1),
                exact_bytes: 8 << 20,
                replica_samples: 30,
            }
        } else {
            Sizes {
                bulk: Amount::Seconds(4),
                conn_time: Duration::from_secs(2),
                conn_max: 2_000_000,
                latency_warmup: 1_000,
                latency_n: 20_000,
                memory_counts: vec![1_000, 10_000],
                opens: 200,
                udp_time: Duration::from_secs(2),
                udp_max: 20_000_000,
                refusal_time: Duration::from_secs(1),
                knock_flood: 1_000_000,
                spa_flood_time: Duration::from_secs(10),
                exact_bytes: 256 << 20,
                replica_samples: 200,
            }
        }
    }
}

/// Where the run happens and with what.
struct Env {
    bin: PathBuf,
    haproxy: Option<String>,
    iperf3: Option<String>,
    date: String,
    kernel: String,
    commit: String,
    cpus: String,
}

impl Env {
    fn discover() -> Result<Env> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let bin = match std::env::var_os("PORTCULLIS_BIN") {
            Some(p) => PathBuf::from(p),
            None => root.join("target/release/portcullis"),
        };
        if !bin.is_file() {
            bail!(
                "{} is missing: build it with `cargo build --release` (scripts/bench does) or set PORTCULLIS_BIN",
                bin.display()
            );
        }
        let version = |program: &str, args: &[&str]| {
            procs::installed(program)
                .then(|| procs::command_line(program, args))
                .flatten()
        };
        let git = |args: &[&str]| {
            Command::new("git")
                .args(args)
                .current_dir(root)
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        };
        let mut commit = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
        if git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty()) {
            commit.push_str(" + uncommitted changes");
        }
        let model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|t| {
                t.lines().find_map(|l| {
                    l.strip_prefix("model name")
                        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
                })
            })
            .unwrap_or_else(|| "unknown CPU".into());
        let n = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        Ok(Env {
            bin,
            haproxy: version("haproxy", &["-v"]),
            iperf3: version("iperf3", &["--version"]),
            date: procs::command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default(),
            kernel: procs::command_line("uname", &["-r"]).unwrap_or_default(),
            commit,
            cpus: format!("{n} × {model}"),
        })
    }
}

/// Descriptors the memory test needs in this process: a client and an
/// upstream socket per connection, plus slack.
fn raise_nofile(want: u64) -> Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft >= want {
        return Ok(soft);
    }
    // Raising the hard limit needs privilege; without it, take what there is.
    if hard < want && setrlimit(Resource::RLIMIT_NOFILE, want, want).is_ok() {
        return Ok(want);
    }
    let new = want.min(hard);
    setrlimit(Resource::RLIMIT_NOFILE, new, hard)?;
    Ok(new)
}

/// One proxy (or none, for direct) and the addresses that reach each
/// upstream through it.
struct Target {
    col: usize,
    bulk: Option<SocketAddr>,
    rr: SocketAddr,
    echo: SocketAddr,
    /// The proxy process, whose CPU time is measured.
    pid: Option<u32>,
}

/// Keeps a memory test's proxy running.
enum MemoryProxy {
    Portcullis(Portcullis),
    Haproxy(Haproxy),
}

impl MemoryProxy {
    fn pid(&self) -> u32 {
        match self {
            MemoryProxy::Portcullis(p) => p.pid(),
            MemoryProxy::Haproxy(h) => h.pid(),
        }
    }
}

/// The proxy's RSS through one count of the memory test.
#[derive(Debug, Clone, Copy)]
struct Memory {
    col: usize,
    count: usize,
    base_kib: u64,
    idle_kib: u64,
    /// After [`IN_FLIGHT_BYTES`] per connection toward the stalled upstream.
    in_flight_kib: u64,
    /// In a fresh proxy (its baseline, its RSS, bytes written): after
    /// [`STALLED_BYTES`] per connection, when every kernel buffer on the
    /// way is full and the proxy holds what it read.
    stalled: Option<(u64, u64, u64)>,
    after_kib: u64,
    /// After opening and closing as many connections once more.
    again_kib: Option<u64>,
    /// Bytes the clients managed to write, in all.
    written_bytes: u64,
}

/// The SPA flood: valid packets timed while forged ones pour in.
#[derive(Debug, Clone)]
struct SpaFlood {
    /// Forged packets sent, and over how long.
    sent: u64,
    wall: Duration,
    /// Whether sources were forged per packet (raw socket) or taken from
    /// a fixed set of bound sockets.
    forged: bool,
    /// SPA packets the gateway counted during the flood.
    processed: f64,
    cpu_s: f64,
    /// Send to grant of each valid packet granted, µs, sorted.
    latency_us: Vec<u64>,
    valid_sent: usize,
}

#[derive(Debug, Clone, Copy)]
struct Flood {
    sent: u64,
    processed: f64,
    dropped: f64,
    cpu_s: f64,
    wall: Duration,
}

#[derive(Default)]
struct Results {
    /// Gbit/s, with 1 and with 4 streams.
    bulk: [Series; 2],
    /// Proxy CPU-seconds per GB moved, with 1 and with 4 streams.
    cpu_per_gb: [Series; 2],
    conn_rate: Series,
    /// Proxy CPU µs per connection.
    cpu_per_conn: Series,
    /// p50, p99, p99.9 in µs.
    latency: [Series; 3],
    udp: Series,
    /// Share of the datagrams sent that arrived.
    udp_delivered: Series,
    refusals: Series,
    cpu_per_refusal: Series,
    knock_open_us: Vec<u64>,
    /// Knock-to-open of a `closed` service, its port not listening before.
    closed_open_us: Vec<u64>,
    spa_open_us: Vec<u64>,
    flood: Option<Flood>,
    spa_flood: Option<SpaFlood>,
    memory: Vec<Memory>,
    exact: Option<String>,
    /// The raw sensor on vs off.
    raw: raw::RawResults,
    /// Three replicas sharing one gate through Redis.
    replicas: replicas::ReplicaResults,
}

struct Bench {
    opts: Opts,
    sizes: Sizes,
    env: Env,
    rt: tokio::runtime::Runtime,
    dir: tempfile::TempDir,
    nofile: u64,
    r: Results,
    errors: Vec<String>,
}

fn main() -> ExitCode {
    // `cargo bench` passes --bench. Anything else is a test runner looking
    // at every target (cargo test --all-targets, or nextest's --list): this
    // binary has no tests to list or run, and must not start a benchmark.
    if !std::env::args().any(|a| a == "--bench") {
        return ExitCode::SUCCESS;
    }
    let opts = Opts::parse();
    let limit = if opts.quick {
        Duration::from_secs(300)
    } else {
        Duration::from_secs(2400)
    };
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        eprintln!("bench: still running after {limit:?}; ending it and its children");
        procs::kill_all_children();
        std::process::exit(3);
    });
    let begin = Instant::now();
    let mut bench = match Bench::new(opts) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("bench: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    bench.run();
    let elapsed = begin.elapsed();
    let (table, failures) = bench.report(elapsed);
    println!("\n{table}");
    let name = if bench.opts.quick {
        "bench-report-quick.md"
    } else {
        "bench-report.md"
    };
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target").join(name);
    match std::fs::write(&out, &table) {
        Ok(()) => eprintln!("bench: table written to {}", out.display()),
        Err(e) => eprintln!("bench: cannot write {}: {e}", out.display()),
    }
    eprintln!("bench: took {:.0}s", elapsed.as_secs_f64());
    if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        for f in &failures {
            eprintln!("bench: FAILED: {f}");
        }
        ExitCode::FAILURE
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `127.a.b.c` for the `i`-th of a family `a` of sources.
fn source(family: u8, i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, family, (i / 250) as u8, (i % 250 + 1) as u8))
}

fn note(msg: impl AsRef<str>) {
    eprintln!("bench: {}", msg.as_ref());
}

impl Bench {
    fn new(opts: Opts) -> Result<Bench> {
        let env = Env::discover()?;
        let mut sizes = Sizes::new(opts.quick);
        let biggest = sizes.memory_counts.iter().copied().max().unwrap_or(0) as u64;
        let nofile = raise_nofile(2 * biggest + 4096)?;
        // This process holds a client and an upstream socket per idle
        // connection, and so does the proxy, which inherits the limit: a
        // container's hard limit may allow fewer than asked for. The
        // proxy's descriptor budget also keeps room for its listeners, the
        // runtime and the splice pool (under 1000 in all here).
        let fit = (nofile.saturating_sub(1000) / 2) as usize;
        for count in &mut sizes.memory_counts {
            if *count > fit {
                note(format!(
                    "RLIMIT_NOFILE is {nofile}: measuring {fit} idle connections instead of {count}"
                ));
                *count = fit;
            }
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        Ok(Bench {
            opts,
            sizes,
            env,
            rt,
            dir: tempfile::tempdir()?,
            nofile,
            r: Results::default(),
            errors: Vec::new(),
        })
    }

    fn fail(&mut self, what: &str, e: anyhow::Error) {
        note(format!("{what}: ERROR {e:#}"));
        self.errors.push(format!("{what}: {e:#}"));
    }

    fn run(&mut self) {
        note(format!(
            "{} mode, {} repetition(s); binary {}",
            if self.opts.quick { "quick" } else { "full" },
            self.opts.reps,
            self.env.bin.display()
        ));
        if let Err(e) = self.main_phase() {
            self.fail("setup", e);
        }
        if self.opts.wants("raw") {
            if let Err(e) = self.raw_sensor() {
                self.fail("raw sensor", e);
            }
        }
        if self.opts.wants("replicas") {
            if let Err(e) = self.replicas() {
                self.fail("replicas", e);
            }
        }
        if self.opts.wants("flood") {
            if let Err(e) = self.knock_flood() {
                self.fail("knock flood", e);
            }
        }
        if self.opts.wants("spaflood") {
            if let Err(e) = self.spa_flood() {
                self.fail("spa flood", e);
            }
        }
        for col in [PORTCULLIS, HAPROXY] {
            if !self.opts.wants("memory") {
                break;
            }
            if col == HAPROXY && self.env.haproxy.is_none() {
                continue;
            }
            if let Err(e) = self.memory(col) {
                self.fail(&format!("memory ({})", NAMES[col]), e);
            }
        }
    }

    /// Starts portcullis on `config(knock ports)`, picking new ports if
    /// another process took one meanwhile. Returns the gateway and its knock
    /// sequence in order.
    fn start_gateway(
        &self,
        name: &str,
        files: &[(&str, &[u8])],
        config: impl Fn(&[SocketAddr; 3]) -> String,
    ) -> Result<(Portcullis, [SocketAddr; 3])> {
        let mut last = None;
        for _ in 0..5 {
            let p = procs::free_ports(3)?;
            // Neither ascending nor descending, as `check` insists.
            let seq = [p[0], p[2], p[1]].map(|port| SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
            match Portcullis::start(&self.env.bin, self.dir.path(), name, &config(&seq), files) {
                Ok(gw) => return Ok((gw, seq)),
                Err(e) if format!("{e:#}").contains("listen") => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("no free ports")))
    }

    /// Knocks with the real client, `portcullis knock`, from [`KNOCKER`].
    fn knock(&self, seq: &[SocketAddr; 3]) -> Result<()> {
        let mut cmd = Command::new(&self.env.bin);
        cmd.args(["knock", "127.0.0.1", "-b", &KNOCKER.to_string()])
            .args(seq.iter().map(|s| format!("{}/udp", s.port())));
        let out = procs::run_bounded("portcullis knock", &mut cmd, Duration::from_secs(10))?;
        if !out.status.success() {
            bail!("portcullis knock: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    fn main_phase(&mut self) -> Result<()> {
        let handle = self.rt.handle().clone();
        let rr = load::spawn_rr_server(&handle)?;
        let echo = load::spawn_echo_server(&handle)?;
        let sink = UdpSink::start()?;
        let iperf = match self.env.iperf3 {
            Some(_) => Some(IperfServer::start()?),
            None => None,
        };
        let key = NativeKey::generate(&mut rand::rng());
        let key_text = keyfile::render(&KeyFile {
            native: Some(key.clone()),
            fwknop: None,
        });

        let bulk_upstream = iperf.as_ref().map_or(echo, |i| i.addr);
        let (gw, seq) = self.start_gateway("main", &[("bench.key", key_text.as_bytes())], |seq| {
            let knock = format!(
                "knock = {{ sequence = [{}] }}",
                seq.iter()
                    .map(|s| format!("\"{}/udp\"", s.port()))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let tcp = |name: &str, upstream: SocketAddr, extra: &str| {
                format!(
                    "[service.{name}]\nlisten = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\nprotocol = \"tcp\"\n\
                     unauthorized = \"refuse\"\nopen_for = \"1h\"\n{knock}\n{extra}\n"
                )
            };
            format!(
                "[admin]\nlisten = \"127.0.0.1:0\"\n\n\
                 [spa]\nlisten = \"127.0.0.1:0\"\nmax_age = \"120s\"\n\n[user.bench]\nkey_file = \"bench.key\"\n\n\
                 {}\n{}\n{}\n\
                 [service.udp]\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\nprotocol = \"udp\"\n\
                 unauthorized = \"refuse\"\nopen_for = \"1h\"\n{knock}\n",
                tcp("bulk", bulk_upstream, ""),
                tcp("rr", rr, ""),
                tcp("echo", echo, "spa_users = [\"bench\"]"),
                sink.addr,
            )
        })?;
        self.knock(&seq)?;
        for service in ["bulk", "rr", "echo", "udp"] {
            gw.wait_grant(service, &KNOCKER.to_string())?;
        }
        note(format!("portcullis pid {} ready, gates open for {KNOCKER}", gw.pid()));

        let mut haproxies = Vec::new();
        let mut targets = vec![
            Target {
                col: DIRECT,
                bulk: iperf.as_ref().map(|i| i.addr),
                rr,
                echo,
                pid: None,
            },
            Target {
                col: PORTCULLIS,
                bulk: iperf.as_ref().map(|_| gw.service("bulk")).transpose()?,
                rr: gw.service("rr")?,
                echo: gw.service("echo")?,
                pid: Some(gw.pid()),
            },
        ];
        if self.env.haproxy.is_some() {
            for (col, splice) in [(HAPROXY, false), (SPLICE, true)] {
                let p = procs::free_ports(3)?;
                let name = if splice { "haproxy-splice" } else { "haproxy" };
                let h = Haproxy::start(
                    self.dir.path(),
                    name,
                    splice,
                    &[(p[0], bulk_upstream), (p[1], rr), (p[2], echo)],
                    self.nofile,
                )?;
                let at = |port: u16| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
                targets.push(Target {
                    col,
                    bulk: iperf.as_ref().map(|_| at(p[0])),
                    rr: at(p[1]),
                    echo: at(p[2]),
                    pid: Some(h.pid()),
                });
                haproxies.push(h);
            }
        }

        if self.opts.wants("exact") {
            self.exact(gw.service("echo")?);
        }
        if iperf.is_some() && self.opts.wants("bulk") {
            self.bulk(&targets);
        }
        if self.opts.wants("conn") {
            self.conn_rate(&targets);
        }
        if self.opts.wants("latency") {
            self.latency(&targets);
        }
        if self.opts.wants("udp") {
            self.udp(&sink, gw.service("udp")?);
        }
        if self.opts.wants("refusals") {
            self.refusals(&gw);
        }
        if self.opts.wants("opens") {
            self.opens(&gw, &seq, &key);
            if let Err(e) = self.closed_opens(echo) {
                self.fail("knock to open, closed mode", e);
            }
        }
        Ok(())
    }

    /// Byte-exact transfers through portcullis: one connection, then four
    /// at once, each half-closed at the end.
    fn exact(&mut self, target: SocketAddr) {
        let bytes = self.sizes.exact_bytes;
        let run = self.rt.block_on(async {
            load::echo_exact(target, bytes, 1).await?;
            let mut set = tokio::task::JoinSet::new();
            for seed in 2..6 {
                set.spawn(load::echo_exact(target, bytes / 4, seed));
            }
            while let Some(r) = set.join_next().await {
                r??;
            }
            Ok::<(), anyhow::Error>(())
        });
        match run {
            Ok(()) => {
                self.r.exact = Some(format!("{} MiB, 1 and 4 connections", (2 * bytes) >> 20));
                note("byte-exact transfers: ok");
            }
            Err(e) => self.fail("byte-exact transfer through portcullis", e),
        }
    }

    fn bulk(&mut self, targets: &[Target]) {
        for (i, streams) in [1u32, 4].into_iter().enumerate() {
            for rep in 0..self.opts.reps {
                for t in targets {
                    let Some(addr) = t.bulk else { continue };
                    let what = format!("bulk, {streams} stream(s), {}", NAMES[t.col]);
                    let run = || -> Result<(f64, Option<f64>)> {
                        let meter = t.pid.map(CpuMeter::start).transpose()?;
                        let tr = procs::iperf_client(addr, streams, self.sizes.bulk)?;
                        let cpu = meter.map(|m| m.seconds()).transpose()?;
                        Ok((tr.gbit_per_s, cpu.map(|c| c / (tr.bytes as f64 / 1e9))))
                    };
                    match run() {
                        Ok((gbit, cpu_per_gb)) => {
                            note(format!("{what}: {} Gbit/s", fmt(gbit)));
                            self.r.bulk[i].push(rep, t.col, gbit);
                            if let Some(c) = cpu_per_gb {
                                self.r.cpu_per_gb[i].push(rep, t.col, c);
                            }
                        }
                        Err(e) => self.fail(&what, e),
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    fn conn_rate(&mut self, targets: &[Target]) {
        for rep in 0..self.opts.reps {
            for t in targets {
                let what = format!("connection rate, {}", NAMES[t.col]);
                let run = || -> Result<(f64, Option<f64>)> {
                    let meter = t.pid.map(CpuMeter::start).transpose()?;
                    let rate = self.rt.block_on(load::connection_rate(
                        t.rr,
                        CLIENTS,
                        self.sizes.conn_time,
                        self.sizes.conn_max,
                    ));
                    let cpu = meter.map(|m| m.seconds()).transpose()?;
                    rate.check(&what)?;
                    Ok((rate.per_second(), cpu.map(|c| c * 1e6 / rate.ok as f64)))
                };
                match run() {
                    Ok((rate, cpu_us)) => {
                        note(format!("{what}: {} conn/s", fmt(rate)));
                        self.r.conn_rate.push(rep, t.col, rate);
                        if let Some(c) = cpu_us {
                            self.r.cpu_per_conn.push(rep, t.col, c);
                        }
                    }
                    Err(e) => self.fail(&what, e),
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }

    fn latency(&mut self, targets: &[Target]) {
        for rep in 0..self.opts.reps {
            for t in targets {
                let what = format!("latency, {}", NAMES[t.col]);
                match load::ping_pong(t.echo, self.sizes.latency_warmup, self.sizes.latency_n) {
                    Ok(mut ns) => {
                        ns.sort_unstable();
                        let us = |p: f64| percentile(&ns, p) as f64 / 1000.0;
                        note(format!("{what}: p50 {} µs, p99 {} µs", fmt(us(50.0)), fmt(us(99.0))));
                        for (s, p) in [50.0, 99.0, 99.9].into_iter().enumerate() {
                            self.r.latency[s].push(rep, t.col, us(p));
                        }
                    }
                    Err(e) => self.fail(&what, e),
                }
            }
        }
    }

    fn udp(&mut self, sink: &UdpSink, through: SocketAddr) {
        for rep in 0..self.opts.reps {
            for (col, target) in [(DIRECT, sink.addr), (PORTCULLIS, through)] {
                let what = format!("udp forwarding, {}", NAMES[col]);
                let run = || -> Result<(f64, f64)> {
                    let before = sink.count();
                    let (sent, elapsed) =
                        load::udp_blast(target, DATAGRAM_LEN, self.sizes.udp_time, self.sizes.udp_max)?;
                    // Let the last datagrams drain through.
                    std::thread::sleep(Duration::from_millis(200));
                    let got = sink.count() - before;
                    if got == 0 {
                        bail!("none of {sent} datagrams arrived");
                    }
                    Ok((got as f64 / elapsed.as_secs_f64(), got as f64 / sent.max(1) as f64))
                };
                match run() {
                    Ok((rate, delivered)) => {
                        note(format!("{what}: {} datagrams/s", fmt(rate)));
                        self.r.udp.push(rep, col, rate);
                        self.r.udp_delivered.push(rep, col, delivered);
                    }
                    Err(e) => self.fail(&what, e),
                }
            }
        }
    }

    fn refusals(&mut self, gw: &Portcullis) {
        for rep in 0..self.opts.reps {
            let run = || -> Result<(f64, f64)> {
                let target = gw.service("echo")?;
                let meter = CpuMeter::start(gw.pid())?;
                let rate = self.rt.block_on(load::refusal_rate(
                    target,
                    IpAddr::V4(STRANGER),
                    CLIENTS,
                    self.sizes.refusal_time,
                    self.sizes.conn_max,
                ));
                let cpu = meter.seconds()?;
                rate.check("refusals")?;
                Ok((rate.per_second(), cpu * 1e6 / rate.ok as f64))
            };
            match run() {
                Ok((rate, cpu_us)) => {
                    note(format!("refusals: {} conn/s", fmt(rate)));
                    self.r.refusals.push(rep, PORTCULLIS, rate);
                    self.r.cpu_per_refusal.push(rep, PORTCULLIS, cpu_us);
                }
                Err(e) => self.fail("refusals", e),
            }
        }
    }

    /// Knock-to-open and SPA-to-open: a fresh source each time sends its
    /// packets, then connects until it is let through.
    fn opens(&mut self, gw: &Portcullis, seq: &[SocketAddr; 3], key: &NativeKey) {
        let run = |i: usize, spa: bool| -> Result<u64> {
            let target = gw.service("echo")?;
            let elapsed = if spa {
                let spa_addr = gw.spa.ok_or_else(|| anyhow!("the gateway logged no SPA listener"))?;
                let fields = Fields {
                    timestamp: unix_now(),
                    access: vec![(Proto::Tcp, target.port())],
                    allow_ip: None,
                    duration: None,
                    close: false,
                };
                let packet = native::encode_random(key, &fields, &mut rand::rng())?;
                load::time_to_open(source(4, i), target, |s: &UdpSocket| {
                    s.send_to(&packet, spa_addr)?;
                    Ok(())
                })?
            } else {
                load::time_to_open(source(3, i), target, |s: &UdpSocket| {
                    for step in seq {
                        s.send_to(&[0], step)?;
                    }
                    Ok(())
                })?
            };
            Ok(elapsed.as_micros() as u64)
        };
        let mut errors = Vec::new();
        for i in 0..self.sizes.opens {
            for spa in [false, true] {
                match run(i, spa) {
                    Ok(us) if spa => self.r.spa_open_us.push(us),
                    Ok(us) => self.r.knock_open_us.push(us),
                    Err(e) => errors.push(e),
                }
            }
        }
        note(format!(
            "knock to open: {} samples, SPA to open: {} samples",
            self.r.knock_open_us.len(),
            self.r.spa_open_us.len()
        ));
        if let Some(e) = errors.into_iter().next() {
            let spa_lines = gw.log_lines(|l| l.to_string().contains("spa"));
            let tail = &spa_lines[spa_lines.len().saturating_sub(3)..];
            self.fail("knock/SPA to open", e.context(format!("SPA log: {}", tail.join(" "))));
        }
    }

    /// Knock-to-open of a service in `closed` mode, whose port starts to
    /// listen only when the grant is given: a fresh source each time
    /// knocks and connects until let through; then the grant is revoked
    /// and the port is seen to reset SYNs again before the next sample.
    fn closed_opens(&mut self, echo: SocketAddr) -> Result<()> {
        let (gw, seq) = self.start_gateway("closed", &[], |seq| {
            format!(
                "[admin]\nlisten = \"127.0.0.1:0\"\n\n\
                 [service.closed]\nlisten = \"127.0.0.1:0\"\nupstream = \"{echo}\"\nprotocol = \"tcp\"\n\
                 unauthorized = \"closed\"\nopen_for = \"1h\"\nknock = {{ sequence = [{}] }}\n",
                seq.iter()
                    .map(|s| format!("\"{}/udp\"", s.port()))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
        let admin = gw
            .admin
            .ok_or_else(|| anyhow!("the gateway logged no admin listener"))?;
        let target = gw.service("closed")?;
        let stranger = source(7, 250 * 200);
        let wait_closed = || -> Result<()> {
            let begin = Instant::now();
            while !load::refused_at_syn(stranger, target) {
                if begin.elapsed() > Duration::from_secs(2) {
                    bail!("the closed service still listens 2s after its last grant ended");
                }
            }
            Ok(())
        };
        wait_closed()?;
        for i in 0..self.sizes.opens {
            let from = source(7, i);
            let elapsed = load::time_to_open(from, target, |s: &UdpSocket| {
                for step in &seq {
                    s.send_to(&[0], step)?;
                }
                Ok(())
            })
            .map_err(|e| {
                // Whether the door opened but nothing accepts, or it never
                // opened, and what the gateway said about it.
                let listening = !load::refused_at_syn(stranger, target);
                let said = gw.log_lines(|l| matches!(l["level"].as_str(), Some("WARN" | "ERROR")));
                e.context(format!(
                    "sample {i}: the port {} now; the gateway's warnings: {said:?}",
                    if listening { "listens" } else { "refuses SYNs" }
                ))
            })?;
            self.r.closed_open_us.push(elapsed.as_micros() as u64);
            load::http_delete(admin, &format!("/v1/grants/closed/{from}"))?;
            wait_closed()?;
        }
        note(format!(
            "knock to open, closed mode: {} samples",
            self.r.closed_open_us.len()
        ));
        Ok(())
    }

    /// Knock datagrams the gateway processes per CPU-second: a flood of
    /// first steps from 250 sources, with the per-source limits lifted.
    fn knock_flood(&mut self) -> Result<()> {
        let (gw, seq) = self.start_gateway("flood", &[], |seq| {
            format!(
                "[admin]\nlisten = \"127.0.0.1:0\"\n\n[limits]\nper_source_rate = 100000000\n\
                 per_source_burst = 100000000\nlockout_after = 100000000\n\n\
                 [service.flood]\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:9\"\n\
                 knock = {{ sequence = [{}] }}\n",
                seq.iter()
                    .map(|s| format!("\"{}/udp\"", s.port()))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
        let admin = gw
            .admin
            .ok_or_else(|| anyhow!("the gateway logged no admin listener"))?;
        let counted = || -> Result<(f64, f64)> {
            let scrape = load::http_get(admin, "/metrics")?;
            Ok((
                load::metric_sum(&scrape, "portcullis_knocks_total"),
                load::metric_sum(&scrape, "portcullis_knocks_dropped_total"),
            ))
        };
        let (before, dropped_before) = counted()?;
        let sources: Vec<IpAddr> = (0..250).map(|i| source(6, i)).collect();
        let meter = CpuMeter::start(gw.pid())?;
        let begin = Instant::now();
        let sent = load::knock_flood(seq[0], &sources, self.sizes.knock_flood)?;
        // Until the count stops moving, every datagram the socket kept is
        // being processed; the flood lasted until its last change. Scrapes
        // are sparse, as each costs the gateway a little CPU.
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = counted()?;
        let mut changed = Instant::now();
        while changed.elapsed() < Duration::from_millis(500) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            let now = counted()?;
            if now != last {
                last = now;
                changed = Instant::now();
            }
        }
        let cpu_s = meter.seconds()?;
        let (after, dropped_after) = last;
        let flood = Flood {
            sent,
            processed: after - before,
            dropped: dropped_after - dropped_before,
            cpu_s,
            wall: changed.duration_since(begin),
        };
        if flood.processed <= 0.0 {
            bail!("the gateway processed none of {sent} knocks");
        }
        note(format!(
            "knock flood: {} of {sent} processed, {} CPU-s",
            fmt(flood.processed),
            fmt(cpu_s)
        ));
        self.r.flood = Some(flood);
        Ok(())
    }

    /// Valid SPA packets under a flood of forged ones: each valid packet,
    /// from a source of its own every 20 ms, is timed from its send to the
    /// gateway's stamp on its grant audit line, while 25,000 forged
    /// packets/s (3 of 4 carrying the real key id with a broken tag, so
    /// each is decrypted; the rest junk) arrive from a new source each.
    fn spa_flood(&mut self) -> Result<()> {
        const RATE: f64 = 25_000.0;
        let key = NativeKey::generate(&mut rand::rng());
        let key_text = keyfile::render(&KeyFile {
            native: Some(key.clone()),
            fwknop: None,
        });
        let (gw, _) = self.start_gateway("spaflood", &[("bench.key", key_text.as_bytes())], |_| {
            "[admin]\nlisten = \"127.0.0.1:0\"\n\n[spa]\nlisten = \"127.0.0.1:0\"\n\n\
             [user.bench]\nkey_file = \"bench.key\"\n\n\
             [service.echo]\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:9\"\nopen_for = \"1h\"\n\
             spa_users = [\"bench\"]\n"
                .to_string()
        })?;
        let admin = gw
            .admin
            .ok_or_else(|| anyhow!("the gateway logged no admin listener"))?;
        let spa = match gw.spa {
            Some(SocketAddr::V4(a)) => a,
            _ => bail!("the gateway logged no IPv4 SPA listener"),
        };
        let port = gw.service("echo")?.port();
        let packet = |key: &NativeKey| -> Result<Vec<u8>> {
            let fields = Fields {
                timestamp: unix_now(),
                access: vec![(Proto::Tcp, port)],
                allow_ip: None,
                duration: None,
                close: false,
            };
            Ok(native::encode_random(key, &fields, &mut rand::rng())?)
        };
        let mut forged: Vec<Vec<u8>> = (0..6)
            .map(|i| {
                let mut p = packet(&key)?;
                let at = p.len() - 1 - i;
                p[at] ^= 0x5a;
                Ok(p)
            })
            .collect::<Result<_>>()?;
        forged.extend([
            vec![0u8; 64],
            b"QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFB".to_vec(),
        ]);
        let fallback: Vec<IpAddr> = (0..250).map(|i| source(7, i)).collect();
        let mut forger = load::Forger::new(&fallback)?;
        let raw = forger.is_raw();
        let counted = || -> Result<f64> {
            Ok(load::metric_sum(
                &load::http_get(admin, "/metrics")?,
                "portcullis_spa_packets_total",
            ))
        };
        let before = counted()?;
        let meter = CpuMeter::start(gw.pid())?;
        let time = self.sizes.spa_flood_time;
        let flood = std::thread::spawn(move || {
            let begin = Instant::now();
            let mut sent = 0u64;
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
            while begin.elapsed() < time {
                let due = (begin.elapsed().as_secs_f64() * RATE) as u64;
                if sent >= due {
                    std::thread::sleep(Duration::from_micros(200));
                    continue;
                }
                while sent < due {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let src = Ipv4Addr::new(127, 100 + (x % 100) as u8, (x >> 8) as u8, (x >> 16) as u8 | 1);
                    forger.send(sent, src, spa, &forged[(sent % forged.len() as u64) as usize]);
                    sent += 1;
                }
            }
            (sent, begin.elapsed())
        });
        let mut sent_at = Vec::new();
        let begin = Instant::now();
        let mut i = 0;
        while begin.elapsed() + Duration::from_millis(100) < time {
            let from = source(8, i);
            let socket = UdpSocket::bind(SocketAddr::new(from, 0))?;
            let p = packet(&key)?;
            sent_at.push((from.to_string(), SystemTime::now()));
            socket.send_to(&p, spa)?;
            i += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
        let (sent, wall) = flood.join().map_err(|_| anyhow!("the flood thread panicked"))?;
        let mut latency_us = Vec::new();
        for (from, at) in &sent_at {
            let Ok(line) = gw.wait_for("grant", Duration::from_secs(2), |l| {
                l["message"] == "grant" && l["source"] == from.as_str()
            }) else {
                continue;
            };
            let stamp = line["timestamp"]
                .as_str()
                .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
                .ok_or_else(|| anyhow!("a grant line without a timestamp"))?;
            latency_us.push(stamp.duration_since(*at).unwrap_or_default().as_micros() as u64);
        }
        let cpu_s = meter.seconds()?;
        let processed = counted()? - before;
        latency_us.sort_unstable();
        note(format!(
            "spa flood: {sent} forged in {:.1} s ({}), {} of {} valid granted, p99 {} µs",
            wall.as_secs_f64(),
            if raw { "forged sources" } else { "250 bound sources" },
            latency_us.len(),
            sent_at.len(),
            percentile(&latency_us, 99.0)
        ));
        self.r.spa_flood = Some(SpaFlood {
            sent,
            wall,
            forged: raw,
            processed,
            cpu_s,
            latency_us,
            valid_sent: sent_at.len(),
        });
        Ok(())
    }

    /// A fresh proxy in front of `hold` for the memory test: its pid, its
    /// address, and the handle that keeps it running.
    fn memory_proxy(&self, col: usize, hold: &HoldServer, name: &str) -> Result<(SocketAddr, MemoryProxy)> {
        if col == PORTCULLIS {
            let (gw, seq) = self.start_gateway(name, &[], |seq| {
                format!(
                    // As many connections as the test holds, and the rest of
                    // the descriptor budget left to them (no blackholing).
                    "[gateway]\nmax_connections = {}\nmax_blackholed = 1\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
                     [service.hold]\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\nopen_for = \"1h\"\n\
                     knock = {{ sequence = [{}] }}\n",
                    self.sizes.memory_counts.iter().copied().max().unwrap_or(1000).max(1),
                    hold.addr,
                    seq.iter()
                        .map(|s| format!("\"{}/udp\"", s.port()))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?;
            self.knock(&seq)?;
            gw.wait_grant("hold", &KNOCKER.to_string())?;
            Ok((gw.service("hold")?, MemoryProxy::Portcullis(gw)))
        } else {
            let port = procs::free_ports(1)?[0];
            let h = Haproxy::start(self.dir.path(), name, false, &[(port, hold.addr)], self.nofile)?;
            Ok((SocketAddr::from((Ipv4Addr::LOCALHOST, port)), MemoryProxy::Haproxy(h)))
        }
    }

    /// Opens and closes a few connections (the first ones allocate
    /// per-thread state that is not per connection); returns the settled
    /// RSS after.
    fn memory_baseline(
        &self,
        pid: u32,
        addr: SocketAddr,
        hold: &HoldServer,
        errors: &mut Vec<anyhow::Error>,
    ) -> Result<u64> {
        let warm = self.rt.block_on(load::open_idle(addr, 64, 64))?;
        hold.release();
        {
            let _enter = self.rt.enter();
            drop(warm);
        }
        if let Err(e) = hold.wait_open_at_most(0, Duration::from_secs(20)) {
            errors.push(e.context("after the warm-up connections closed"));
        }
        procs::settled_rss_kib(pid, MEMORY_SETTLE)
    }

    /// Memory per proxied connection, from the proxy's RSS: idle, with data
    /// in flight, after closing and after a second cycle, for each count;
    /// then, in a fresh proxy, with a stalled upstream.
    fn memory(&mut self, col: usize) -> Result<()> {
        let handle = self.rt.handle().clone();
        let hold = HoldServer::start(&handle)?;
        let counts = self.sizes.memory_counts.clone();
        let (smallest, largest) = (counts[0], counts[counts.len() - 1]);
        if 2 * largest as u64 + 256 > self.nofile {
            bail!(
                "RLIMIT_NOFILE is {}; {largest} connections need {}",
                self.nofile,
                2 * largest + 256
            );
        }
        // A proxy that does not pass a close on leaves its upstream
        // connections open: an error, but the numbers are still taken.
        let mut close_errors = Vec::new();
        let (addr, proxy) = self.memory_proxy(col, &hold, &format!("memory-{col}"))?;
        let pid = proxy.pid();
        let base = self.memory_baseline(pid, addr, &hold, &mut close_errors)?;
        for &count in &counts {
            let streams = self.rt.block_on(load::open_idle(addr, count, 256))?;
            let idle = procs::settled_rss_kib(pid, MEMORY_SETTLE)?;
            let _enter = self.rt.enter();
            let written = load::fill(&streams, IN_FLIGHT_BYTES);
            let in_flight = procs::settled_rss_kib(pid, MEMORY_SETTLE)?;
            hold.release();
            drop(streams);
            if let Err(e) = hold.wait_open_at_most(0, Duration::from_secs(30)) {
                close_errors.push(e.context(format!("after {count} connections closed")));
            }
            // A second of quiet before "after close", for either proxy: what
            // it gives back once the load has gone is the point, not how fast.
            std::thread::sleep(AFTER_CLOSE_QUIET);
            let after = procs::settled_rss_kib(pid, MEMORY_SETTLE)?;
            // Leak check: the same again. Memory an allocator keeps for
            // reuse is reused; memory leaked per connection grows again.
            let again = if count == largest {
                let streams = self.rt.block_on(load::open_idle(addr, count, 256))?;
                hold.release();
                drop(streams);
                if let Err(e) = hold.wait_open_at_most(0, Duration::from_secs(30)) {
                    close_errors.push(e.context(format!("after {count} connections closed again")));
                }
                std::thread::sleep(AFTER_CLOSE_QUIET);
                Some(procs::settled_rss_kib(pid, MEMORY_SETTLE)?)
            } else {
                None
            };
            note(format!(
                "memory, {}, {count} connections: base {base} KiB, idle {idle} KiB, in flight {in_flight} KiB, \
                 after close {after} KiB, after a second cycle {again:?} KiB",
                NAMES[col]
            ));
            self.r.memory.push(Memory {
                col,
                count,
                base_kib: base,
                idle_kib: idle,
                in_flight_kib: in_flight,
                stalled: None,
                after_kib: after,
                again_kib: again,
                written_bytes: written,
            });
        }
        drop(proxy);

        // A stalled upstream, in a proxy of its own: what it holds then
        // would otherwise stay in the allocator and hide in (or inflate)
        // the other counts. Only the smallest count: each connection needs
        // hundreds of KiB of kernel buffers.
        let (addr, proxy) = self.memory_proxy(col, &hold, &format!("memory-stalled-{col}"))?;
        let pid = proxy.pid();
        let base = self.memory_baseline(pid, addr, &hold, &mut close_errors)?;
        let streams = self.rt.block_on(load::open_idle(addr, smallest, 256))?;
        let _enter = self.rt.enter();
        let written = load::fill(&streams, STALLED_BYTES);
        let stalled = procs::settled_rss_kib(pid, MEMORY_SETTLE)?;
        hold.release();
        drop(streams);
        if let Err(e) = hold.wait_open_at_most(0, Duration::from_secs(30)) {
            close_errors.push(e.context(format!("after {smallest} stalled connections closed")));
        }
        drop(proxy);
        note(format!(
            "memory, {}, {smallest} stalled connections: base {base} KiB, stalled {stalled} KiB ({} KiB written per connection)",
            NAMES[col],
            written / smallest as u64 / 1024
        ));
        if let Some(m) = self.r.memory.iter_mut().find(|m| m.col == col && m.count == smallest) {
            m.stalled = Some((base, stalled, written));
        }
        match close_errors.into_iter().next() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The Markdown report and the list of failures (errors and gross
    /// regressions).
    fn report(&self, elapsed: Duration) -> (String, Vec<String>) {
        let r = &self.r;
        let mut failures = self.errors.clone();
        let hap = self.env.haproxy.is_some();
        let absent_all: [&str; TARGETS] = if hap {
            ["", "", "", ""]
        } else {
            ["", "", "not installed", "not installed"]
        };
        let proxies_only: [&str; TARGETS] = ["", absent_all[1], absent_all[2], absent_all[3]];
        let pct = |s: Option<Summary>| s.map(|s| format!("{:.0}%", s.median * 100.0));
        let times = |s: Option<Summary>| s.map(|s| format!("{:.2}×", s.median));
        let med = |s: Option<Summary>| s.map(|s| s.median);
        let mut rows = Vec::new();

        for (i, streams) in [1, 4].into_iter().enumerate() {
            let s = &r.bulk[i];
            let of_direct = s.ratio(PORTCULLIS, DIRECT);
            let vs_h = s.ratio(PORTCULLIS, HAPROXY);
            let vs_s = s.ratio(PORTCULLIS, SPLICE);
            let floor = if streams == 1 { 0.55 } else { 0.70 };
            // Each part says whether it misses its share of the target.
            let miss = |v: Option<f64>, floor: f64| if v.is_some_and(|v| v < floor) { " ✗" } else { "" };
            let mut rel = vec![];
            if let Some(p) = pct(of_direct) {
                rel.push(format!("{p} of direct{}", miss(med(of_direct), floor)));
            }
            if let Some(x) = times(vs_h) {
                rel.push(format!("{x} HAProxy{}", miss(med(vs_h), 1.8)));
            }
            if let Some(x) = times(vs_s) {
                rel.push(format!("{x} splice{}", miss(med(vs_s), 1.0)));
            }
            rows.push(Row {
                what: format!(
                    "Bulk throughput, {streams} stream{} (Gbit/s)",
                    if streams == 1 { "" } else { "s" }
                ),
                cells: s.cells(&absent_all),
                relative: rel.join(", "),
                target: format!("≥{:.0}% of direct, ≥1.8× HAProxy, ≥1.0× splice", floor * 100.0),
                verdict: Verdict::all(&[
                    med(of_direct).map(|v| v >= floor),
                    med(vs_h).map(|v| v >= 1.8),
                    med(vs_s).map(|v| v >= 1.0),
                ]),
            });
            if let Some(v) = med(of_direct) {
                if v < 0.10 {
                    failures.push(format!(
                        "gross regression: bulk with {streams} stream(s) at {:.0}% of direct (floor 10%)",
                        v * 100.0
                    ));
                }
            }
        }
        for (i, streams) in [1, 4].into_iter().enumerate() {
            let s = &r.cpu_per_gb[i];
            rows.push(Row {
                what: format!(
                    "Proxy CPU per GB, {streams} stream{} (CPU-s/GB)",
                    if streams == 1 { "" } else { "s" }
                ),
                cells: s.cells(&proxies_only),
                relative: times(s.ratio(PORTCULLIS, HAPROXY))
                    .map(|x| format!("{x} HAProxy's"))
                    .unwrap_or_default(),
                target: "≤0.2".into(),
                verdict: Verdict::from(med(s.summary(PORTCULLIS)).map(|v| v <= 0.2)),
            });
        }

        let s = &r.conn_rate;
        let mut rel = vec![];
        if let Some(p) = pct(s.ratio(PORTCULLIS, DIRECT)) {
            rel.push(format!("{p} of direct"));
        }
        if let Some(x) = times(s.ratio(PORTCULLIS, HAPROXY)) {
            rel.push(format!("{x} HAProxy"));
        }
        if let Some(x) = times(s.ratio(PORTCULLIS, SPLICE)) {
            rel.push(format!("{x} splice"));
        }
        rows.push(Row {
            what: format!("Connection rate, {CLIENTS} clients (conn/s)"),
            cells: s.cells(&absent_all),
            relative: rel.join(", "),
            target: "≥1.0× HAProxy".into(),
            verdict: Verdict::from(med(s.ratio(PORTCULLIS, HAPROXY)).map(|v| v >= 1.0)),
        });
        if let Some(v) = med(s.ratio(PORTCULLIS, DIRECT)) {
            if v < 0.05 {
                failures.push(format!(
                    "gross regression: connection rate at {:.1}% of direct (floor 5%)",
                    v * 100.0
                ));
            }
        }
        let s = &r.cpu_per_conn;
        rows.push(Row {
            what: "Proxy CPU per connection (µs)".into(),
            cells: s.cells(&proxies_only),
            relative: times(s.ratio(PORTCULLIS, HAPROXY))
                .map(|x| format!("{x} HAProxy's"))
                .unwrap_or_default(),
            target: "≤100 µs".into(),
            verdict: Verdict::from(med(s.summary(PORTCULLIS)).map(|v| v <= 100.0)),
        });

        for (i, (label, limit)) in [("p50", Some(30.0)), ("p99", Some(50.0)), ("p99.9", None)]
            .into_iter()
            .enumerate()
        {
            let s = &r.latency[i];
            let added = s.diff(PORTCULLIS, DIRECT);
            rows.push(Row {
                what: format!("Round trip, 1 byte, 1 connection, {label} (µs)"),
                cells: s.cells(&absent_all),
                relative: added.map(|a| format!("{:+.1} µs", a.median)).unwrap_or_default(),
                target: limit.map(|l| format!("≤ +{l:.0} µs")).unwrap_or_default(),
                verdict: Verdict::from(limit.and_then(|l| med(added).map(|a| a <= l))),
            });
            if i == 0 {
                if let Some(a) = med(added) {
                    if a > 2000.0 {
                        failures.push(format!(
                            "gross regression: portcullis adds {a:.0} µs to a round trip (ceiling 2 ms)"
                        ));
                    }
                }
            }
        }

        self.memory_rows(&mut rows, &mut failures);

        let opens = [
            ("Knock to open, 3 UDP knocks, p50 / p99 (µs)", &r.knock_open_us),
            (
                "Knock to open, closed mode (port not listening before), p50 / p99 (µs)",
                &r.closed_open_us,
            ),
            ("SPA to open, native packet, p50 / p99 (µs)", &r.spa_open_us),
        ];
        for (what, samples) in opens {
            rows.push(report::latency_row(what, samples, 1000, "", &mut failures));
        }

        let s = &r.udp;
        let of_direct = s.ratio(PORTCULLIS, DIRECT);
        let delivered = r.udp_delivered.summary(PORTCULLIS);
        rows.push(Row {
            what: format!("UDP forwarding, {DATAGRAM_LEN}-byte datagrams (datagrams/s)"),
            cells: s.cells(&["", "", "no UDP", "no UDP"]),
            relative: pct(of_direct)
                .map(|p| {
                    format!(
                        "{p} of direct ({} of sent delivered)",
                        pct(delivered).unwrap_or_default()
                    )
                })
                .unwrap_or_default(),
            target: "≥50% of direct".into(),
            verdict: Verdict::from(med(of_direct).map(|v| v >= 0.5)),
        });
        if let Some(v) = med(of_direct) {
            if v < 0.05 {
                failures.push(format!(
                    "gross regression: UDP forwarding at {:.1}% of direct (floor 5%)",
                    v * 100.0
                ));
            }
        }

        let s = &r.refusals;
        let mut cells: [String; TARGETS] = Default::default();
        cells[PORTCULLIS] = s.summary(PORTCULLIS).map(|s| s.show()).unwrap_or_default();
        rows.push(Row {
            what: "Refusals, source without a grant (conn/s)".into(),
            cells,
            relative: r
                .cpu_per_refusal
                .summary(PORTCULLIS)
                .map(|c| format!("{} µs proxy CPU each", fmt(c.median)))
                .unwrap_or_default(),
            target: String::new(),
            verdict: Verdict::Unjudged,
        });

        let mut cells: [String; TARGETS] = Default::default();
        let mut relative = String::new();
        let mut verdict = Verdict::Unjudged;
        if let Some(f) = r.flood {
            let per_s = f.processed / f.wall.as_secs_f64().max(1e-3);
            cells[PORTCULLIS] = fmt(per_s);
            let lost = (f.sent as f64 - f.processed - f.dropped).max(0.0);
            relative = format!(
                "{} of {} sent processed in {:.2} s ({} dropped at the full gate queue, {} by the socket); {} processed per CPU-second",
                fmt(f.processed.round()),
                fmt(f.sent as f64),
                f.wall.as_secs_f64(),
                fmt(f.dropped.round()),
                fmt(lost.round()),
                fmt((f.processed / f.cpu_s.max(1e-3)).round()),
            );
            verdict = Verdict::from(Some(per_s >= 200_000.0));
        }
        rows.push(Row {
            what: "Knock flood from 250 sources, processed (knocks/s)".into(),
            cells,
            relative,
            target: "≥200,000/s".into(),
            verdict,
        });

        let mut cells: [String; TARGETS] = Default::default();
        let mut relative = String::new();
        let mut verdict = Verdict::Unjudged;
        if let Some(f) = &r.spa_flood {
            let ms = |p: f64| percentile(&f.latency_us, p) as f64 / 1000.0;
            cells[PORTCULLIS] = format!("{:.1} / {:.1}", ms(50.0), ms(99.0));
            let within = f.latency_us.iter().filter(|&&us| us <= 100_000).count();
            relative = format!(
                "{} forged packets/s for {:.1} s ({}); {within} of {} valid packets granted within 100 ms; {} SPA packets/s absorbed, {} per CPU-second",
                fmt((f.sent as f64 / f.wall.as_secs_f64().max(1e-3)).round()),
                f.wall.as_secs_f64(),
                if f.forged { "a new forged source each" } else { "from 250 bound sources: not root" },
                f.valid_sent,
                fmt((f.processed / f.wall.as_secs_f64().max(1e-3)).round()),
                fmt((f.processed / f.cpu_s.max(1e-3)).round()),
            );
            verdict = Verdict::from(Some(f.valid_sent > 0 && within * 100 >= f.valid_sent * 99));
        }
        rows.push(Row {
            what: "SPA flood: valid SPA to grant, p50 / p99 (ms)".into(),
            cells,
            relative,
            target: "≥99% within 100 ms".into(),
            verdict,
        });

        let mut cells: [String; TARGETS] = Default::default();
        cells[PORTCULLIS] = match &r.exact {
            Some(_) => "byte-exact".into(),
            None => "FAILED or not run".into(),
        };
        rows.push(Row {
            what: "Echo through portcullis, then half-close".into(),
            cells,
            relative: r.exact.clone().unwrap_or_default(),
            target: "byte-exact, EOF passed on".into(),
            verdict: Verdict::from(Some(r.exact.is_some())),
        });

        let mode = if self.opts.quick {
            "quick (smoke test: tiny sizes; the numbers mean little)"
        } else {
            "full"
        };
        let mut header = vec![
            format!("date: {} · kernel: {} · commit: {}", self.env.date, self.env.kernel, self.env.commit),
            format!("machine: {} · mode: {mode} · took {:.0} s", self.env.cpus, elapsed.as_secs_f64()),
            format!(
                "{} repetition(s), targets measured in turn within each; cells are median (min–max) over repetitions, ratios are medians of per-repetition ratios",
                self.opts.reps
            ),
            format!(
                "peers: {} · {} · everything on loopback",
                self.env.haproxy.as_deref().unwrap_or("HAProxy not installed"),
                self.env.iperf3.as_deref().unwrap_or("iperf3 not installed")
            ),
        ];
        if self.env.iperf3.is_none() {
            header.push("bulk rows are empty: iperf3 is not installed (scripts/bench installs it)".into());
        }
        let mut notes = vec![
            format!(
                "Bulk: iperf3 -J, {} per run, client to server. CPU per GB: the proxy's utime+stime from /proc/PID/stat over the run, per GB received.",
                match self.sizes.bulk {
                    Amount::Seconds(s) => format!("{s} s"),
                    Amount::Bytes(b) => format!("{} MiB", b >> 20),
                }
            ),
            format!(
                "Connection rate: {CLIENTS} clients in closed loops of connect, {}-byte request, {}-byte response, server close, for {:.1} s per run.",
                load::REQUEST_LEN,
                load::REQUEST_LEN,
                self.sizes.conn_time.as_secs_f64()
            ),
            format!(
                "Round trip: {} ping-pongs of 1 byte per run on one connection with TCP_NODELAY, after {} unmeasured.",
                self.sizes.latency_n, self.sizes.latency_warmup
            ),
            format!(
                "Memory: the proxy's VmRSS over its baseline after warm-up, per connection, measured once per count. Clients and upstream use 1460-byte segments (TCP_MAXSEG), as on Ethernet, and the upstream reads nothing after the first byte. Idle: each connection carried one 1-byte round trip. In flight: each client then wrote {} KiB, which the kernel's socket buffers absorb. Stalled (smallest count only, in a fresh proxy): {} KiB each, more than the proxy's send buffer holds, so the proxy is left holding what it read. After close: read once the upstream has seen every connection close, after a second of quiet. Second cycle: as many connections opened and closed again; growth there would be a leak, while memory kept from the first cycle and reused is the allocator's.",
                IN_FLIGHT_BYTES >> 10,
                STALLED_BYTES >> 10
            ),
        ];
        for m in &r.memory {
            let mut line = format!(
                "Memory, {} × {}: baseline {} KiB, idle {} KiB, in flight {} KiB ({} KiB written per connection), after close {} KiB",
                NAMES[m.col],
                m.count,
                m.base_kib,
                m.idle_kib,
                m.in_flight_kib,
                m.written_bytes / m.count.max(1) as u64 / 1024,
                m.after_kib,
            );
            if let Some(again) = m.again_kib {
                line.push_str(&format!(", after a second cycle {again} KiB"));
            }
            if let Some((base, rss, written)) = m.stalled {
                line.push_str(&format!(
                    "; stalled, in a fresh proxy: baseline {base} KiB, {rss} KiB with {} KiB written per connection",
                    written / m.count.max(1) as u64 / 1024
                ));
            }
            line.push('.');
            notes.push(line);
        }
        notes.push(format!(
            "Knock/SPA to open: {} fresh sources each; timed from the first packet sent to the first connection that carries a byte through (a refused attempt retried after a 20 µs pause, so the client does not take the CPU the gateway needs). Closed mode: a gateway of its own whose service does not listen before each knock (the grant is revoked after each sample and the port seen to reset a SYN again).",
            self.sizes.opens
        ));
        if self.opts.wants("replicas") {
            notes.push(format!(
                "Replicas: 3 gateways (127.0.0.11-13) with `[state] backend = \"redis\"` on one redis-server of the run's own (no persistence), and a memory-backed gateway with the same services (127.0.0.14). Propagation: a manual grant through a's admin API (`POST /v1/grants`), from a's 201 until b, then c, let the source through; knock to open as above, knocking on a. {} fresh sources each. Connection rate: through a and through the memory-backed gateway in turn, as the connection-rate row.",
                self.sizes.replica_samples
            ));
        }
        for e in &self.errors {
            notes.push(format!("ERROR: {e}"));
        }
        if self.opts.wants("raw") {
            rows.extend(self.raw_rows());
        }
        if self.opts.wants("replicas") {
            self.replica_rows(&mut rows, &mut failures);
        }
        let title = "portcullis benchmark: direct vs portcullis vs HAProxy";
        (report::render(title, &header, &rows, &notes), failures)
    }

    fn memory_rows(&self, rows: &mut Vec<Row>, failures: &mut Vec<String>) {
        let mems = &self.r.memory;
        let label = |n: usize| {
            if n % 1000 == 0 {
                format!("{}k", n / 1000)
            } else {
                fmt(n as f64)
            }
        };
        // `f` gives the baseline and the RSS of one state.
        let mut per_row = |what: String, count: usize, limit: f64, f: &dyn Fn(&Memory) -> Option<(u64, u64)>| {
            let at = |col: usize| mems.iter().find(|m| m.col == col && m.count == count);
            let value = |col: usize| {
                at(col).and_then(|m| f(m).map(|(base, kib)| kib.saturating_sub(base) as f64 / m.count as f64))
            };
            let mut cells: [String; TARGETS] = Default::default();
            for col in [PORTCULLIS, HAPROXY] {
                if let Some(v) = value(col) {
                    cells[col] = fmt(v);
                }
            }
            let p = value(PORTCULLIS);
            if let Some(v) = p {
                if v > 1024.0 {
                    failures.push(format!(
                        "gross regression: {v:.0} KiB per connection, {what} (ceiling 1 MiB)"
                    ));
                }
            }
            rows.push(Row {
                what: format!("Memory per connection, {what} (KiB)"),
                cells,
                relative: match (p, value(HAPROXY)) {
                    (Some(a), Some(b)) if b > 0.0 => format!("{:.2}× HAProxy's", a / b),
                    _ => String::new(),
                },
                target: format!("≤{limit:.0} KiB"),
                verdict: Verdict::from(p.map(|v| v <= limit)),
            });
        };
        for &count in &self.sizes.memory_counts {
            let l = label(count);
            per_row(format!("{l} idle"), count, 3.0, &|m| Some((m.base_kib, m.idle_kib)));
            per_row(
                format!("{l} with {} KiB in flight", IN_FLIGHT_BYTES >> 10),
                count,
                20.0,
                &|m| Some((m.base_kib, m.in_flight_kib)),
            );
            if mems.iter().any(|m| m.count == count && m.stalled.is_some()) {
                per_row(
                    format!("{l} with a stalled upstream, buffers full"),
                    count,
                    20.0,
                    &|m| m.stalled.map(|(base, rss, _)| (base, rss)),
                );
            }
        }
        let Some(&largest) = self.sizes.memory_counts.iter().max() else {
            return;
        };
        let at = |col: usize| mems.iter().find(|m| m.col == col && m.count == largest);
        // The target is for 10k connections; when the descriptor limit
        // allowed somewhat fewer, the growth is scaled up to 10k.
        let scaled = largest != 10_000 && largest >= 5_000;
        let shown = if scaled { 10_000 } else { largest };
        let rss_mib = |m: &Memory| {
            let grown = m.idle_kib.saturating_sub(m.base_kib) as f64 * shown as f64 / largest as f64;
            (m.base_kib as f64 + grown) / 1024.0
        };
        let mut cells: [String; TARGETS] = Default::default();
        for col in [PORTCULLIS, HAPROXY] {
            if let Some(m) = at(col) {
                cells[col] = fmt(rss_mib(m));
            }
        }
        rows.push(Row {
            what: format!("RSS with {} idle connections (MiB)", label(shown)),
            cells,
            relative: if scaled {
                format!("scaled from {} (RLIMIT_NOFILE)", label(largest))
            } else {
                String::new()
            },
            target: if shown == 10_000 {
                "<50 MiB".into()
            } else {
                String::new()
            },
            verdict: Verdict::from(at(PORTCULLIS).filter(|_| shown == 10_000).map(|m| rss_mib(m) < 50.0)),
        });
        let label = label(largest);
        // Back near the baseline: within 2 MiB, or within a tenth of what
        // the connections took at their peak.
        let near = |m: &Memory, kib: u64| {
            let left = kib as i64 - m.base_kib as i64;
            let peak = m.in_flight_kib.max(m.idle_kib).saturating_sub(m.base_kib) as i64;
            left <= 2048 || left * 10 <= peak
        };
        let mut cells: [String; TARGETS] = Default::default();
        for col in [PORTCULLIS, HAPROXY] {
            if let Some(m) = at(col) {
                cells[col] = format!("{:+}", m.after_kib as i64 - m.base_kib as i64);
            }
        }
        rows.push(Row {
            what: format!("RSS after closing the {label}, over baseline (KiB)"),
            cells,
            relative: String::new(),
            target: "≤ +2 MiB or ≤10% of the peak".into(),
            verdict: Verdict::from(at(PORTCULLIS).map(|m| near(m, m.after_kib))),
        });
        // Leak check: a second cycle must not add what the first kept.
        let mut cells: [String; TARGETS] = Default::default();
        for col in [PORTCULLIS, HAPROXY] {
            if let Some((m, again)) = at(col).and_then(|m| Some((m, m.again_kib?))) {
                cells[col] = format!("{:+}", again as i64 - m.after_kib as i64);
            }
        }
        rows.push(Row {
            what: format!("RSS growth from a second cycle of {label} (KiB)"),
            cells,
            relative: String::new(),
            target: "≤ +2 MiB or ≤10% of the peak (no leak)".into(),
            verdict: Verdict::from(at(PORTCULLIS).and_then(|m| {
                let again = m.again_kib?;
                let grown = again as i64 - m.after_kib as i64;
                let peak = m.idle_kib.saturating_sub(m.base_kib) as i64;
                Some(grown <= 2048 || grown * 10 <= peak)
            })),
        });
    }
}
