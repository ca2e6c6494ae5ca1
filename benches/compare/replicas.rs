//! The `replicas` section: three gateways on 127.0.0.11, .12 and .13 that
//! share one gate through a Redis of the section's own (`[state] backend =
//! "redis"`), and one gateway with the memory backend on 127.0.0.14 beside
//! them with the same services, as the baseline of the connection rate.
//!
//! - grant propagation: a manual grant through replica a's admin API
//!   (`POST /v1/grants`), from its answer until replicas b and c both let
//!   the source through;
//! - knock to open with the Redis backend: three knock datagrams to
//!   replica a, then connections to a (and, from another fresh source, to
//!   c) until one carries a byte;
//! - the connection rate through replica a against the memory-backed
//!   gateway, in turn within each repetition.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use super::load;
use super::procs::{self, Portcullis, Proc, PATIENCE};
use super::report::{fmt, latency_row, percentile, Row, Series, Summary, Verdict, TARGETS};
use super::{note, source, Bench, CLIENTS, KNOCKER, PORTCULLIS};

/// Columns of the connection-rate series: memory backend, Redis backend.
const MEMORY: usize = 0;
const REDIS: usize = 1;
const BACKENDS: [&str; 2] = ["memory", "redis"];

/// Replica names, in address order (127.0.0.11, .12, .13).
const REPLICAS: [&str; 3] = ["a", "b", "c"];

/// Source families (`127.F.x.y`) of the section's fresh sources.
const FAMILY_KNOCK: u8 = 10;
const FAMILY_KNOCK_CROSS: u8 = 11;
const FAMILY_GRANT: u8 = 12;

/// What the section measured.
#[derive(Default)]
pub struct ReplicaResults {
    /// From replica a's answer to a manual grant until b and c admit, µs.
    pub propagation_us: Vec<u64>,
    /// How long replica a took to answer `POST /v1/grants` (its grant went
    /// through the stream and back), µs.
    pub grant_post_us: Vec<u64>,
    /// Knock on a, connect to a, µs.
    pub knock_open_us: Vec<u64>,
    /// Knock on a, connect to c, µs.
    pub knock_open_cross_us: Vec<u64>,
    /// conn/s per backend.
    pub conn_rate: Series,
    /// Why the section did not run, when it did not.
    pub skipped: Option<String>,
}

/// A `redis-server` of the section's own, without persistence.
struct RedisServer {
    _proc: Proc,
    port: u16,
}

impl RedisServer {
    fn start(dir: &Path) -> Result<RedisServer> {
        let port = procs::free_ports(1)?[0];
        let home = dir.join("redis");
        std::fs::create_dir_all(&home)?;
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(&home)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut proc = Proc::spawn("redis-server", &mut cmd)?;
        let redis = |proc: Proc| RedisServer { _proc: proc, port };
        let deadline = Instant::now() + PATIENCE;
        loop {
            proc.check_running()?;
            if cli(port, &["PING"]).is_ok_and(|r| r == "PONG") {
                return Ok(redis(proc));
            }
            if Instant::now() >= deadline {
                bail!("redis-server on port {port} did not answer PING within {PATIENCE:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn cli(&self, args: &[&str]) -> Result<String> {
        cli(self.port, args)
    }
}

/// `redis-cli -p PORT ARGS`, its answer trimmed.
fn cli(port: u16, args: &[&str]) -> Result<String> {
    let mut cmd = Command::new("redis-cli");
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string()]).args(args);
    let out = procs::run_bounded("redis-cli", &mut cmd, Duration::from_secs(5))?;
    if !out.status.success() {
        bail!("redis-cli {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Gateway `i`'s address: 127.0.0.11 to .13 for the replicas, .14 for the
/// memory-backed baseline.
fn gateway_ip(i: usize) -> IpAddr {
    IpAddr::from([127, 0, 0, 11 + i as u8])
}

/// Ports every gateway uses, each on its own address: three knock steps
/// (in sequence order), the echo and the request/response services.
#[derive(Clone, Copy)]
struct Ports {
    steps: [u16; 3],
    echo: u16,
    rr: u16,
}

fn config(i: usize, redis: Option<u16>, ports: Ports, echo: SocketAddr, rr: SocketAddr) -> String {
    let ip = gateway_ip(i);
    let state = match redis {
        Some(port) => format!(
            "[state]\nbackend = \"redis\"\nurl = \"redis://127.0.0.1:{port}\"\nreplica = \"{}\"\n\n",
            REPLICAS[i]
        ),
        None => String::new(),
    };
    let knock = format!(
        "knock = {{ sequence = [{}] }}",
        ports
            .steps
            .iter()
            .map(|p| format!("\"{p}/udp\""))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let service = |name: &str, port: u16, upstream: SocketAddr| {
        format!(
            "[service.{name}]\nlisten = \"{ip}:{port}\"\nupstream = \"{upstream}\"\nprotocol = \"tcp\"\n\
             unauthorized = \"refuse\"\nopen_for = \"1h\"\n{knock}\n\n"
        )
    };
    format!(
        "[admin]\nlisten = \"{ip}:0\"\n\n{state}{}{}",
        service("echo", ports.echo, echo),
        service("rr", ports.rr, rr)
    )
}

/// The three replicas (a, b, c) and the memory-backed gateway.
struct Cluster {
    replicas: Vec<Portcullis>,
    memory: Portcullis,
    ports: Ports,
}

impl Cluster {
    fn admin(gw: &Portcullis) -> Result<SocketAddr> {
        gw.admin.ok_or_else(|| anyhow!("the gateway logged no admin listener"))
    }

    fn at(i: usize, port: u16) -> SocketAddr {
        SocketAddr::new(gateway_ip(i), port)
    }
}

/// A manual grant of `service` to `source` through the admin API at `admin`.
fn grant(admin: SocketAddr, service: &str, source: IpAddr) -> Result<()> {
    load::http_post(
        admin,
        "/v1/grants",
        &format!("{{\"service\": \"{service}\", \"source\": \"{source}\", \"duration\": \"1h\"}}"),
    )
}

/// Connects from `source` to `target` until a byte comes back; bounded by 2 s.
fn wait_admitted(source: IpAddr, target: SocketAddr) -> Result<()> {
    let begin = Instant::now();
    while !load::echo_through(source, target) {
        if begin.elapsed() > Duration::from_secs(2) {
            bail!("{target} did not admit {source} within 2s of its grant");
        }
    }
    Ok(())
}

impl Bench {
    /// Runs the section.
    pub(super) fn replicas(&mut self) -> Result<()> {
        if !procs::installed("redis-server") || !procs::installed("redis-cli") {
            self.r.replicas.skipped = Some("redis-server is not installed".into());
            note("replicas: skipped, redis-server is not installed (scripts/bench installs it)");
            return Ok(());
        }
        let handle = self.rt.handle().clone();
        let echo = load::spawn_echo_server(&handle)?;
        let rr = load::spawn_rr_server(&handle)?;
        let redis = RedisServer::start(self.dir.path())?;
        // An established deployment: an old marker, so SPA and knocks are
        // not held back as after a loss of Redis's data.
        let ok = redis.cli(&["SET", "portcullis:marker", "0"])?;
        if ok != "OK" {
            bail!("redis-cli SET portcullis:marker 0 answered {ok:?}");
        }
        let cluster = self.start_cluster(redis.port, echo, rr)?;
        note(format!(
            "replicas: 3 replicas on Redis port {} and a memory-backed gateway ready",
            redis.port
        ));
        self.replica_propagation(&cluster)?;
        self.replica_opens(&cluster)?;
        self.replica_conn_rate(&cluster)?;
        Ok(())
    }

    /// Starts the replicas and the memory-backed gateway on the same
    /// ports (each on its own address), picking new ports when one is taken.
    fn start_cluster(&self, redis: u16, echo: SocketAddr, rr: SocketAddr) -> Result<Cluster> {
        let mut last = None;
        for attempt in 0..5 {
            let p = procs::free_ports(5)?;
            // Neither ascending nor descending, as `check` insists.
            let ports = Ports {
                steps: [p[0], p[2], p[1]],
                echo: p[3],
                rr: p[4],
            };
            let start = |i: usize, redis: Option<u16>| {
                let name = match redis {
                    Some(_) => format!("replica-{}-{attempt}", REPLICAS[i]),
                    None => format!("replica-memory-{attempt}"),
                };
                Portcullis::start(
                    &self.env.bin,
                    self.dir.path(),
                    &name,
                    &config(i, redis, ports, echo, rr),
                    &[],
                )
            };
            let all = || -> Result<Cluster> {
                let replicas = (0..3).map(|i| start(i, Some(redis))).collect::<Result<Vec<_>>>()?;
                for gw in &replicas {
                    gw.wait_for("state store synced", PATIENCE, |l| {
                        l["message"].as_str() == Some("state store synced")
                    })?;
                }
                let memory = start(3, None)?;
                Ok(Cluster {
                    replicas,
                    memory,
                    ports,
                })
            };
            match all() {
                Ok(c) => return Ok(c),
                Err(e) if format!("{e:#}").contains("listen") => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("no free ports")))
    }

    /// A manual grant through a's admin API, timed from its answer until
    /// b and c both let the source through.
    fn replica_propagation(&mut self, c: &Cluster) -> Result<()> {
        let admin = Cluster::admin(&c.replicas[0])?;
        for i in 0..self.sizes.replica_samples {
            let from = source(FAMILY_GRANT, i);
            let posted = Instant::now();
            grant(admin, "echo", from).with_context(|| format!("grant through replica a to {from}"))?;
            let given = Instant::now();
            for r in [1, 2] {
                wait_admitted(from, Cluster::at(r, c.ports.echo))
                    .with_context(|| format!("replica {}", REPLICAS[r]))?;
            }
            self.r.replicas.propagation_us.push(given.elapsed().as_micros() as u64);
            self.r
                .replicas
                .grant_post_us
                .push(given.duration_since(posted).as_micros() as u64);
        }
        note(format!(
            "replicas: grant propagation, {} samples",
            self.r.replicas.propagation_us.len()
        ));
        Ok(())
    }

    /// Knock on a, then connect to a; and from another fresh source, knock
    /// on a and connect to c.
    fn replica_opens(&mut self, c: &Cluster) -> Result<()> {
        let steps = c.ports.steps.map(|p| Cluster::at(0, p));
        let knock = |s: &UdpSocket| -> Result<()> {
            for step in &steps {
                s.send_to(&[0], step)?;
            }
            Ok(())
        };
        for i in 0..self.sizes.replica_samples {
            for (family, at) in [(FAMILY_KNOCK, 0), (FAMILY_KNOCK_CROSS, 2)] {
                let from = source(family, i);
                let elapsed = load::time_to_open(from, Cluster::at(at, c.ports.echo), knock)
                    .with_context(|| format!("knock on replica a, connect to replica {}", REPLICAS[at]))?;
                let samples = if at == 0 {
                    &mut self.r.replicas.knock_open_us
                } else {
                    &mut self.r.replicas.knock_open_cross_us
                };
                samples.push(elapsed.as_micros() as u64);
            }
        }
        note(format!(
            "replicas: knock to open, {} + {} samples",
            self.r.replicas.knock_open_us.len(),
            self.r.replicas.knock_open_cross_us.len()
        ));
        Ok(())
    }

    /// The connection rate through replica a and through the memory-backed
    /// gateway, in turn within each repetition.
    fn replica_conn_rate(&mut self, c: &Cluster) -> Result<()> {
        let knocker = IpAddr::V4(KNOCKER);
        let gateways = [(MEMORY, &c.memory, 3), (REDIS, &c.replicas[0], 0)];
        for (_, gw, _) in gateways {
            grant(Cluster::admin(gw)?, "rr", knocker)?;
        }
        for rep in 0..self.opts.reps {
            for (col, _, at) in gateways {
                let what = format!("connection rate, {} backend", BACKENDS[col]);
                let rate = self.rt.block_on(load::connection_rate(
                    Cluster::at(at, c.ports.rr),
                    CLIENTS,
                    self.sizes.conn_time,
                    self.sizes.conn_max,
                ));
                match rate.check(&what) {
                    Ok(()) => {
                        note(format!("{what}: {} conn/s", fmt(rate.per_second())));
                        self.r.replicas.conn_rate.push(rep, col, rate.per_second());
                    }
                    Err(e) => self.fail(&what, e),
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        Ok(())
    }

    /// The section's rows, in the portcullis column; failures for gross
    /// regressions (a p99 over 1 s).
    pub(super) fn replica_rows(&self, rows: &mut Vec<Row>, failures: &mut Vec<String>) {
        let r = &self.r.replicas;
        if let Some(why) = &r.skipped {
            let mut cells: [String; TARGETS] = Default::default();
            cells[PORTCULLIS] = format!("skipped: {why}");
            rows.push(Row {
                what: "Replicas sharing one gate through Redis".into(),
                cells,
                relative: String::new(),
                target: String::new(),
                verdict: Verdict::Unjudged,
            });
            return;
        }
        let mut post = r.grant_post_us.clone();
        post.sort_unstable();
        let timed = [
            (
                "Grant propagation across 3 replicas: grant through a's admin API until b and c admit, p50 / p99 (µs)",
                &r.propagation_us,
                10_000,
                if post.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; a answered the POST in {} / {} µs",
                        percentile(&post, 50.0),
                        percentile(&post, 99.0)
                    )
                },
            ),
            (
                "Knock to open, Redis backend, knock and connect on replica a, p50 / p99 (µs)",
                &r.knock_open_us,
                2_000,
                String::new(),
            ),
            (
                "Knock to open, Redis backend, knock on a, connect to c, p50 / p99 (µs)",
                &r.knock_open_cross_us,
                2_000,
                String::new(),
            ),
        ];
        for (what, samples, limit, extra) in timed {
            rows.push(latency_row(what, samples, limit, &extra, failures));
        }
        let s = &r.conn_rate;
        let ratio = s.ratio(REDIS, MEMORY);
        let mut cells: [String; TARGETS] = Default::default();
        cells[PORTCULLIS] = s.summary(REDIS).map(|x| x.show()).unwrap_or_default();
        rows.push(Row {
            what: format!("Connection rate, Redis backend, {CLIENTS} clients (conn/s)"),
            cells,
            relative: ratio
                .map(|q: Summary| {
                    format!(
                        "{:.2}× memory backend ({})",
                        q.median,
                        s.summary(MEMORY).map(|x| x.show()).unwrap_or_default()
                    )
                })
                .unwrap_or_default(),
            target: "≥0.97× memory backend".into(),
            verdict: Verdict::from(ratio.map(|q| q.median >= 0.97)),
        });
    }
}
