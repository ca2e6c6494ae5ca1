//! Three replicas share one gate through one Redis (`[state] backend =
//! "redis"`): knock steps spread over the replicas, a rotating sequence
//! knocked on one, an SPA packet replayed to another replica, a revocation
//! on one replica, and Redis going away and coming back. Each test runs its
//! own `redis-server` on a free port.

#![allow(
    clippy::unwrap_used,
    clippy::disallowed_methods,
    unreachable_pub,
    reason = "test code: a panic is the failure report, and real time is what is measured"
)]

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const NAMES: [&str; 3] = ["a", "b", "c"];

/// The replica `i`'s address: 127.0.0.11, .12, .13.
fn replica_ip(i: usize) -> String {
    format!("127.0.0.{}", 11 + i)
}

/// Ports shared by every replica (each on its own address): three knock
/// steps, the guarded service, the SPA port, and a second service behind a
/// rotating sequence with its pool of 16 ports.
struct Ports {
    steps: [u16; 3],
    service: u16,
    spa: u16,
    rotating: u16,
    pool: [u16; 2],
}

fn replica_config(i: usize, state: &str, ports: &Ports, upstream: SocketAddr, key: &Path) -> String {
    let ip = replica_ip(i);
    let [s1, s2, s3] = ports.steps;
    format!(
        r#"
[admin]
listen = "{ip}:0"

[state]
backend = "redis"
{state}
replica = "{name}"

[spa]
listen = "{ip}:{spa}"
max_age = "30s"

[service.echo]
listen = "{ip}:{service}"
upstream = "{upstream}"
protocol = "tcp"
unauthorized = "refuse"
open_for = "60s"
knock = {{ sequence = ["{s1}/udp", "{s3}/udp", "{s2}/udp"] }}
spa_users = ["fw"]

[service.db]
listen = "{ip}:{rotating}"
upstream = "{upstream}"
protocol = "tcp"
unauthorized = "refuse"
open_for = "60s"
knock = {{ totp = {{ key_file = "{totp}", steps = 4, ports = "{first}-{last}/udp", period = "1h" }} }}

[user.fw]
key_file = "{key}"
"#,
        name = NAMES[i],
        spa = ports.spa,
        service = ports.service,
        key = key.display(),
        rotating = ports.rotating,
        first = ports.pool[0],
        last = ports.pool[1],
        totp = key.with_file_name("db.totp").display(),
    )
}

struct Cluster {
    redis: Redis,
    /// How the replicas reach Redis (`url = ...` or the sentinels).
    state: String,
    gws: Vec<Gateway>,
    ports: Ports,
    upstream: SocketAddr,
    keys: tempfile::TempDir,
    /// Each replica's state directory, kept across a restart.
    states: Vec<tempfile::TempDir>,
}

impl Cluster {
    fn start() -> Cluster {
        let redis = Redis::start();
        let state = format!("url = \"{}\"", redis.url());
        Cluster::start_with(redis, state)
    }

    fn start_with(redis: Redis, state: String) -> Cluster {
        // An established deployment: its marker is old, so SPA is not held
        // back as after a loss of data.
        assert_eq!(redis.cli(&["SET", "portcullis:marker", "0"]), "OK");
        let p = free_ports(22);
        let ports = Ports {
            steps: [p[0], p[1], p[2]],
            service: p[3],
            spa: p[4],
            rotating: p[5],
            pool: [p[6], p[21]],
        };
        let keys = tempfile::tempdir().unwrap();
        let out = Command::new("fwknop")
            .args(["--key-gen"])
            .env("HOME", keys.path())
            .output()
            .expect("fwknop");
        assert!(out.status.success());
        write_private(&keys.path().join("fw.key"), &out.stdout);
        let totp = keys.path().join("db.totp");
        let (code, _, err) = run_bin(&["keygen", "--kind", "totp", "-o", totp.to_str().unwrap()], &[]);
        assert_eq!(code, 0, "{err}");
        let upstream = echo_server("127.0.0.1:0");
        let states: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        let mut cluster = Cluster {
            redis,
            state,
            gws: Vec::new(),
            ports,
            upstream,
            keys,
            states,
        };
        for i in 0..3 {
            let gw = cluster.launch(i);
            cluster.gws.push(gw);
        }
        for gw in &cluster.gws {
            gw.wait_for(|l| msg(l) == "state store synced");
        }
        cluster
    }

    fn launch(&self, i: usize) -> Gateway {
        Gateway::builder()
            .config(&replica_config(
                i,
                &self.state,
                &self.ports,
                self.upstream,
                &self.keys.path().join("fw.key"),
            ))
            .state_dir(self.states[i].path())
            .start()
    }

    fn service(&self, i: usize) -> SocketAddr {
        SocketAddr::new(ip(&replica_ip(i)), self.ports.service)
    }

    /// The service behind the rotating sequence, on replica `i`.
    fn rotating(&self, i: usize) -> SocketAddr {
        SocketAddr::new(ip(&replica_ip(i)), self.ports.rotating)
    }

    /// `portcullis knock --totp` from `source` to replica `i`: this
    /// period's rotating sequence.
    fn knock_rotating(&self, i: usize, source: &str) {
        let pool = format!("{}-{}/udp", self.ports.pool[0], self.ports.pool[1]);
        let key = self.keys.path().join("db.totp");
        portcullis_knock_totp(&key, &pool, "1h", source, &replica_ip(i), &[]);
    }

    /// The stock client's knock of step `step` (0-based) to replica `i`;
    /// waits until that replica's gate has it (it is in the stream then).
    fn knock(&self, i: usize, step: usize) {
        let order = [self.ports.steps[0], self.ports.steps[2], self.ports.steps[1]];
        let port = order[step];
        stock_knock(&["-u", &replica_ip(i), &port.to_string()]);
        let n = self.gws[i].count(|l| msg(l) == "knock" && l["source"] == "127.0.0.1");
        self.gws[i].wait_for_nth(n.max(1), |l| msg(l) == "knock" && l["source"] == "127.0.0.1");
    }

    fn knock_sequence_spread(&self) {
        for (step, replica) in [0, 1, 2].into_iter().enumerate() {
            self.knock(replica, step);
        }
    }

    /// The stock `fwknop` client's packet for the echo service to replica
    /// `i`, from 127.0.0.1; saved to `save` when given.
    fn fwknop(&self, i: usize, save: Option<&Path>) {
        let file = self.keys.path().join("fw.key");
        let key = |name: &str| {
            std::fs::read_to_string(&file)
                .unwrap()
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name}: ")).map(|v| v.trim().to_string()))
                .unwrap()
        };
        let mut cmd = Command::new("fwknop");
        cmd.args(["-A", &format!("tcp/{}", self.ports.service), "-a", "127.0.0.1"])
            .args(["-D", &replica_ip(i), "-p", &self.ports.spa.to_string(), "--use-hmac"])
            .args(["--key-base64-rijndael", &key("KEY_BASE64")])
            .args(["--key-base64-hmac", &key("HMAC_KEY_BASE64")])
            .args(["--no-rc-file", "--no-save-args"])
            .env("HOME", self.keys.path());
        if let Some(path) = save {
            cmd.arg("--save-packet").arg(path);
        }
        let out = cmd.output().expect("fwknop");
        assert!(out.status.success(), "fwknop: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// The grants replica `i` lists.
    fn grants(&self, i: usize) -> Vec<serde_json::Value> {
        let r = self.gws[i].http("GET", "/v1/grants", &[]);
        assert_eq!(r.status, 200, "{}", r.body);
        serde_json::from_str(&r.body).unwrap()
    }

    /// Polls replica `i`'s grants until `pred` holds of them.
    fn wait_grants(&self, i: usize, pred: impl Fn(&[serde_json::Value]) -> bool) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let grants = self.grants(i);
            if pred(&grants) {
                return grants;
            }
            assert!(Instant::now() < deadline, "replica {i}: grants stayed {grants:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Knocks `seq` from `source` at replica `at`; every replica then
    /// admits the source (`when` names the moment, for the failure).
    fn knock_opens_everywhere(&self, at: usize, seq: &[u16], source: &str, when: &str) {
        knock_udp_to(&replica_ip(at), seq, source);
        for i in 0..3 {
            self.gws[i].wait_grant("echo", source);
            assert!(echo_works(source, self.service(i)), "replica {i}: no grant {when}");
        }
    }

    /// Restarts replica `i` and waits for its resync from the stream.
    fn restart(&mut self, i: usize) {
        drop(self.gws.remove(i));
        let gw = self.launch(i);
        gw.wait_for(|l| msg(l) == "state store synced");
        self.gws.insert(i, gw);
    }
}

fn has(grants: &[serde_json::Value], source: &str) -> bool {
    grants.iter().any(|g| g["source"] == source)
}

#[test]
fn knock_steps_on_three_replicas_open_every_replica_and_a_revoke_on_one_closes_all() {
    let c = Cluster::start();
    for i in 0..3 {
        assert!(
            !echo_works("127.0.0.1", c.service(i)),
            "replica {i} open before any knock"
        );
    }
    c.knock_sequence_spread();
    for i in 0..3 {
        c.gws[i].wait_grant("echo", "127.0.0.1");
        assert!(
            echo_works("127.0.0.1", c.service(i)),
            "replica {i} refused the source that knocked"
        );
        assert!(
            !echo_works("127.0.0.2", c.service(i)),
            "replica {i} admitted another source"
        );
        let grants = c.grants(i);
        assert_eq!(grants.len(), 1, "{grants:?}");
        assert_eq!(grants[0]["replica"], "c", "the last step was taken on c: {grants:?}");
    }

    let revoked = c.gws[1].http("DELETE", "/v1/grants/echo/127.0.0.1", &[]);
    assert_eq!(revoked.status, 204, "{}", revoked.body);
    for i in [0, 2] {
        c.wait_grants(i, |g| !has(g, "127.0.0.1"));
        assert!(
            !echo_works("127.0.0.1", c.service(i)),
            "replica {i} still admits a revoked source"
        );
    }
}

#[test]
fn an_spa_packet_accepted_by_one_replica_is_a_replay_at_another() {
    let c = Cluster::start();
    let saved = c.keys.path().join("packet.txt");
    c.fwknop(0, Some(&saved));
    c.gws[0].wait_for(|l| msg(l) == "spa accepted");
    for i in 0..3 {
        c.gws[i].wait_grant("echo", "127.0.0.1");
    }

    let packet = std::fs::read_to_string(&saved).unwrap();
    udp_from(
        "127.0.0.5",
        SocketAddr::new(ip(&replica_ip(1)), c.ports.spa),
        packet.trim().as_bytes(),
    );
    c.gws[1].wait_for(|l| msg(l) == "spa packet rejected" && l["source"] == "127.0.0.5" && l["reason"] == "replay");
    assert_eq!(c.gws[1].count(|l| msg(l) == "spa accepted"), 0);
    assert_eq!(
        metric(
            &c.gws[1].scrape(),
            "portcullis_spa_packets_total",
            &[("result", "replay")]
        ),
        Some(1.0)
    );
}

#[test]
fn without_redis_new_knocks_are_refused_while_grants_and_transfers_go_on_and_all_resumes_after() {
    let mut c = Cluster::start();
    c.knock_sequence_spread();
    for i in 0..3 {
        c.gws[i].wait_grant("echo", "127.0.0.1");
    }
    let mut transfer = connect_from("127.0.0.1", c.service(0)).unwrap();
    echo_once(&mut transfer, b"before").unwrap();

    c.redis.kill();
    for gw in &c.gws {
        gw.wait_for(|l| msg(l).starts_with("state store down"));
        assert_eq!(metric(&gw.scrape(), "portcullis_state_store_up", &[]), Some(0.0));
        assert!(gw.http("GET", "/readyz", &[]).status == 200, "not ready without redis");
    }
    // A new source's knocks are refused and counted.
    let order = [c.ports.steps[0], c.ports.steps[2], c.ports.steps[1]];
    let steps: Vec<String> = order.iter().map(|p| format!("{p}/udp")).collect();
    let mut args = vec![replica_ip(0), "-b".into(), "127.0.0.7".into()];
    args.extend(steps);
    portcullis_knock(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let deadline = Instant::now() + PATIENCE;
    while metric(
        &c.gws[0].scrape(),
        "portcullis_state_store_refused_total",
        &[("input", "knock")],
    ) != Some(3.0)
    {
        assert!(Instant::now() < deadline, "knocks not counted: {}", c.gws[0].scrape());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!echo_works("127.0.0.7", c.service(0)), "a knock without redis opened");
    // So is an SPA packet: a replica alone cannot tell a replay.
    c.fwknop(1, None);
    c.gws[1].wait_for(|l| msg(l) == "spa packet rejected" && l["reason"] == "state_store_down");
    assert_eq!(c.gws[1].count(|l| msg(l) == "spa accepted"), 0);
    // And an operator's break-glass grant, with the reason.
    let body = r#"{"service": "echo", "source": "127.0.0.9", "duration": "2m"}"#;
    let manual = c.gws[2].http(
        "POST",
        "/v1/grants",
        &["-H", "Content-Type: application/json", "--data-raw", body],
    );
    assert_eq!(manual.status, 503, "{}", manual.body);
    assert!(manual.body.contains("state store is unavailable"), "{}", manual.body);
    assert!(
        !echo_works("127.0.0.9", c.service(2)),
        "a manual grant without redis opened"
    );
    // The grant mirrored before still admits, everywhere.
    for i in 0..3 {
        assert!(
            echo_works("127.0.0.1", c.service(i)),
            "replica {i} dropped a grant without redis"
        );
    }
    // The transfer through A goes on byte-exact.
    let payload: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
    transfer.write_all(&payload).unwrap();
    let mut back = vec![0; payload.len()];
    transfer.read_exact(&mut back).unwrap();
    assert!(back == payload, "the transfer changed bytes");

    // Redis comes back (empty): a new knock opens again, no restart.
    c.redis.restart();
    for gw in &c.gws {
        gw.wait_for(|l| msg(l) == "state store up" && l.get("replica").is_some());
        let deadline = Instant::now() + PATIENCE;
        while metric(&gw.scrape(), "portcullis_state_store_up", &[]) != Some(1.0) {
            assert!(Instant::now() < deadline, "store not up again");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // It came back empty: SPA waits until every packet it may have
    // recorded is stale, so no replay window opens.
    c.fwknop(0, None);
    c.gws[0].wait_for(|l| msg(l) == "spa packet rejected" && l["reason"] == "replay_window");
    assert_eq!(c.gws[0].count(|l| msg(l) == "spa accepted"), 0);

    c.knock_opens_everywhere(2, &order, "127.0.0.8", "after redis came back");

    // A replica restarted while grants exist admits their sources after its resync.
    c.restart(1);
    c.wait_grants(1, |g| has(g, "127.0.0.8"));
    assert!(
        echo_works("127.0.0.8", c.service(1)),
        "the restarted replica refused a granted source"
    );
}

#[test]
fn a_rotating_sequence_knocked_on_one_replica_opens_every_replica_once_even_after_a_restart() {
    let mut c = Cluster::start();
    let source = "127.0.0.21";
    c.knock_rotating(0, source);
    for i in 0..3 {
        c.gws[i].wait_grant("db", source);
        assert!(
            echo_works(source, c.rotating(i)),
            "replica {i}: the rotating sequence did not open"
        );
    }
    // The period's sequence is spent, on every replica: sent again from
    // another source, to another replica, it opens nothing (its ports are
    // traps now, so the rest of the steps are ignored).
    let late = "127.0.0.22";
    c.knock_rotating(1, late);
    for i in 0..3 {
        c.gws[i].wait_for_nth(4, |l| {
            (msg(l) == "knock" || msg(l) == "knock ignored") && l["source"] == late
        });
    }
    for i in 0..3 {
        assert!(!echo_works(late, c.rotating(i)), "replica {i}: a spent sequence opened");
    }
    // A replica restarted later judges the same knocks as it did the
    // first time, at the time the stream gave them: the grant is there
    // after its resync, and the spent sequence still opens nothing.
    c.restart(2);
    c.wait_grants(2, |g| g.iter().any(|x| x["service"] == "db" && x["source"] == source));
    assert!(
        echo_works(source, c.rotating(2)),
        "the restarted replica lost the rotating grant"
    );
    assert!(
        !echo_works(late, c.rotating(2)),
        "the restarted replica let a spent sequence open"
    );
}

/// `portcullis knock` to `host` from `source`.
fn knock_udp_to(host: &str, seq: &[u16], source: &str) {
    let steps: Vec<String> = seq.iter().map(|p| format!("{p}/udp")).collect();
    let mut args = vec![host, "-b", source];
    args.extend(steps.iter().map(String::as_str));
    portcullis_knock(&args);
}

#[test]
fn a_sentinel_failover_loses_no_grant_and_new_grants_resume_after_it() {
    let primary = Redis::start();
    let replica = Redis::start_args(&["--replicaof", "127.0.0.1", &primary.port.to_string()]);
    let sentinel = Redis::start_args(&[
        "--sentinel",
        &format!("sentinel monitor mymaster 127.0.0.1 {} 1", primary.port),
        "sentinel down-after-milliseconds mymaster 500",
        "sentinel failover-timeout mymaster 3000",
    ]);
    let wait = |what: &str, f: &dyn Fn() -> bool| {
        let deadline = Instant::now() + PATIENCE * 2;
        while !f() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let master_port = || {
        sentinel
            .cli(&["SENTINEL", "get-master-addr-by-name", "mymaster"])
            .lines()
            .nth(1)
            .map(str::to_string)
    };
    wait("the sentinel names the primary", &|| {
        master_port() == Some(primary.port.to_string())
    });
    let state = format!(
        "sentinels = [\"127.0.0.1:{}\"]\nmaster_name = \"mymaster\"",
        sentinel.port
    );
    let mut c = Cluster::start_with(primary, state);
    c.knock_sequence_spread();
    for i in 0..3 {
        c.gws[i].wait_grant("echo", "127.0.0.1");
    }
    let len = c.redis.cli(&["XLEN", "portcullis:inputs"]);
    wait("the replica has every input", &|| {
        replica.cli(&["XLEN", "portcullis:inputs"]) == len
    });

    // The primary dies; the sentinel promotes the replica.
    c.redis.kill();
    wait("the sentinel promotes the replica", &|| {
        master_port() == Some(replica.port.to_string())
    });
    for i in 0..3 {
        assert!(
            echo_works("127.0.0.1", c.service(i)),
            "replica {i} lost a grant in the failover"
        );
    }
    // New grants resume on the new primary, without restarting anything.
    let order = [c.ports.steps[0], c.ports.steps[2], c.ports.steps[1]];
    for gw in &c.gws {
        // Up at start, then again on the new primary.
        gw.wait_for_nth(2, |l| msg(l) == "state store up");
    }
    c.knock_opens_everywhere(0, &order, "127.0.0.9", "after the failover");
    // A replica started now finds both grants on the new primary.
    c.restart(2);
    c.wait_grants(2, |g| has(g, "127.0.0.1") && has(g, "127.0.0.9"));
    drop(replica);
}
