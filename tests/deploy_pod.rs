//! The sidecar pod of `deploy/kubernetes/sidecar`, simulated with network
//! namespaces: one namespace is the pod, with its own PostgreSQL (initdb
//! into a temporary directory, listening on 127.0.0.1 inside it) and
//! portcullis from the image's filesystem, started with the manifest's
//! arguments and environment as uid 65532 without capabilities, its config
//! directory laid out like a projected ConfigMap/Secret mount (`..data`).
//! A second namespace, joined by a veth pair, is the client: psql fails,
//! it knocks, psql works through the pod's address. A config update (the
//! `..data` swap the kubelet does) is applied live, and SIGTERM drains a
//! query in flight within the grace period.
//!
//! Needs root (network and mount namespaces), as CI has. The addresses
//! exist only inside the two namespaces the test makes and removes.

#![allow(
    clippy::unwrap_used,
    clippy::disallowed_methods,
    unreachable_pub,
    reason = "test code: a panic is the failure report, and real time is what is waited on"
)]

mod common;
mod deploy;

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use deploy::Logged;
use serde_json::Value;

const POD_ADDR: &str = "10.213.0.1";
const CLIENT_ADDR: &str = "10.213.0.2";
/// PostgreSQL's port inside the pod (the manifest's `port=`).
const PG_PORT: u16 = 5433;

/// Two network namespaces joined by a veth pair, removed on drop.
struct Namespaces {
    pod: String,
    client: String,
}

impl Namespaces {
    fn new() -> Namespaces {
        let id = std::process::id();
        let ns = Namespaces {
            pod: format!("pc-pod-{id}"),
            client: format!("pc-cli-{id}"),
        };
        let (veth_pod, veth_cli) = (format!("pcp{id}"), format!("pcc{id}"));
        run_ip(&["netns", "add", &ns.pod]);
        run_ip(&["netns", "add", &ns.client]);
        run_ip(&["link", "add", &veth_pod, "type", "veth", "peer", "name", &veth_cli]);
        run_ip(&["link", "set", &veth_pod, "netns", &ns.pod]);
        run_ip(&["link", "set", &veth_cli, "netns", &ns.client]);
        for (name, veth, addr) in [(&ns.pod, &veth_pod, POD_ADDR), (&ns.client, &veth_cli, CLIENT_ADDR)] {
            run_ip(&["-n", name, "addr", "add", &format!("{addr}/30"), "dev", veth]);
            run_ip(&["-n", name, "link", "set", veth, "up"]);
            run_ip(&["-n", name, "link", "set", "lo", "up"]);
        }
        ns
    }

    fn exec(&self, ns: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]);
        c
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in [&self.pod, &self.client] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// The sidecar overlay's StatefulSet pod spec, rendered.
fn rendered_pod() -> (Value, String) {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(repo_path("deploy/kubernetes/sidecar"))
        .output()
        .expect("kubectl");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let mut spec = Value::Null;
    let mut config = String::new();
    use serde::Deserialize as _;
    for d in serde_yaml::Deserializer::from_str(&text) {
        let v = serde_json::to_value(serde_yaml::Value::deserialize(d).unwrap()).unwrap();
        if v["kind"] == "StatefulSet" {
            spec = v["spec"]["template"]["spec"].clone();
        }
        if v["kind"] == "ConfigMap" {
            if let Some(c) = v["data"]["proxy.toml"].as_str() {
                config = c.to_string();
            }
        }
    }
    assert!(
        !spec.is_null() && !config.is_empty(),
        "no StatefulSet or ConfigMap rendered"
    );
    (spec, config)
}

/// The kubelet's layout of a projected volume: the files live in a
/// timestamped directory, `..data` links to it, and each name at the top
/// links through `..data`. An update writes a new directory and renames
/// a new `..data` link over the old one.
struct ConfigMount {
    dir: PathBuf,
    version: u32,
}

impl ConfigMount {
    fn new(dir: PathBuf, files: &Path) -> ConfigMount {
        std::fs::create_dir_all(&dir).unwrap();
        let mut m = ConfigMount { dir, version: 0 };
        m.update(files);
        m
    }

    /// Swaps in the files of `files` as the kubelet does.
    fn update(&mut self, files: &Path) {
        self.version += 1;
        let name = format!("..2026_12_01_00_00_0{}.{}", self.version, std::process::id());
        let data = self.dir.join(&name);
        std::fs::create_dir(&data).unwrap();
        for e in std::fs::read_dir(files).unwrap() {
            let e = e.unwrap();
            let copied = data.join(e.file_name());
            std::fs::copy(e.path(), &copied).unwrap();
            keep_private(&copied);
            let top = self.dir.join(e.file_name());
            if !top.exists() {
                symlink(Path::new("..data").join(e.file_name()), top).unwrap();
            }
        }
        let tmp = self.dir.join("..data_tmp");
        symlink(&name, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
    }
}

fn postgres_bin(name: &str) -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL's server binaries under /usr/lib/postgresql (Debian's postgresql package)")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin").join(name)))
        .filter(|p| p.exists())
        .collect();
    found.sort();
    found
        .pop()
        .unwrap_or_else(|| panic!("no {name} under /usr/lib/postgresql"))
}

/// Runs `cmd` to completion: (success, stdout+stderr).
fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn psql_from(ns: &Namespaces, sql: &str) -> Command {
    let mut c = ns.exec(&ns.client);
    c.args(["psql", "-h", POD_ADDR, "-p", "5432", "-U", "postgres", "-d", "postgres"])
        .args(["-X", "-A", "-t", "-c", sql])
        .env("PGCONNECT_TIMEOUT", "5");
    c
}

fn knock_from(ns: &Namespaces, steps: &[&str]) {
    let mut c = ns.exec(&ns.client);
    c.arg(BIN).args(["knock", POD_ADDR]).args(steps);
    let (ok, out) = run(&mut c);
    assert!(ok, "knock: {out}");
}

/// The knock steps of the postgres service in `config`.
fn steps_of(config: &str) -> Vec<String> {
    let raw: toml::Table = toml::from_str(config).unwrap();
    raw["service"]["postgres"]["knock"]["sequence"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn the_sidecar_pod_guards_postgres_reloads_live_and_drains_on_sigterm() {
    let started = Instant::now();
    let (spec, config) = rendered_pod();
    let gw = spec["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "portcullis")
        .unwrap()
        .clone();
    let args: Vec<String> = gw["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    let grace = Duration::from_secs(spec["terminationGracePeriodSeconds"].as_u64().unwrap());

    let work = tempfile::tempdir().unwrap();
    std::fs::set_permissions(work.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let ns = Namespaces::new();

    // PostgreSQL in the pod, on loopback only, as the manifest runs it.
    let pgdata = work.path().join("pgdata");
    std::fs::create_dir(&pgdata).unwrap();
    run(Command::new("chown").arg("postgres:postgres").arg(&pgdata));
    let as_postgres = |bin: &Path| {
        let mut c = ns.exec(&ns.pod);
        c.args(["setpriv", "--reuid", "postgres", "--regid", "postgres", "--init-groups"])
            .arg(bin);
        c
    };
    let (ok, out) = run(as_postgres(&postgres_bin("initdb")).arg("-D").arg(&pgdata).args([
        "-A",
        "trust",
        "-U",
        "postgres",
        "--no-sync",
    ]));
    assert!(ok, "initdb: {out}");
    let pg_args: Vec<String> = spec["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    assert!(pg_args.iter().any(|a| a == &format!("port={PG_PORT}")), "{pg_args:?}");
    let mut postgres = as_postgres(&postgres_bin("postgres"));
    postgres
        .arg("-D")
        .arg(&pgdata)
        .args(&pg_args)
        .args(["-c", &format!("unix_socket_directories={}", pgdata.display())]);
    let pg = Logged::spawn(postgres);
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (ok, _) =
            run(ns
                .exec(&ns.pod)
                .arg(postgres_bin("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &PG_PORT.to_string()]));
        if ok {
            break;
        }
        assert!(Instant::now() < deadline, "PostgreSQL did not start:\n{}", pg.text());
        std::thread::sleep(Duration::from_millis(100));
    }

    // The config directory as the kubelet lays out the projected volume.
    let v1 = work.path().join("v1");
    std::fs::create_dir(&v1).unwrap();
    deploy::lay_out(&v1, "proxy.toml", &config);
    let etc = work.path().join("etc-portcullis");
    let mut mount = ConfigMount::new(etc.clone(), &v1);
    let state = work.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::os::unix::fs::chown(&state, Some(deploy::UID), Some(deploy::UID)).unwrap();
    let rootfs = deploy::image_rootfs(work.path());

    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let prefix = ["ip", "netns", "exec", ns.pod.as_str()];
    let mut cmd = deploy::chroot_command(
        &prefix,
        &rootfs,
        &[(&etc, "/etc/portcullis"), (&state, "/var/lib/portcullis")],
        &arg_refs,
    );
    for e in gw["env"].as_array().into_iter().flatten() {
        cmd.env(e["name"].as_str().unwrap(), e["value"].as_str().unwrap());
    }
    cmd.env("RUST_LOG", "portcullis=debug");
    let gateway = Logged::spawn(cmd);
    gateway.wait_msg(1, "ready");
    let pid = gateway.child.id() as i32;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.contains("Uid:\t65532\t65532\t65532\t65532"), "{status}");
    assert!(status.contains("CapEff:\t0000000000000000"), "{status}");
    assert!(status.contains("CapPrm:\t0000000000000000"), "{status}");

    // Closed to a client without a grant; PostgreSQL itself is not
    // reachable from outside the pod at all.
    let (ok, out) = run(&mut psql_from(&ns, "select 1"));
    assert!(!ok, "psql got through before a knock: {out}");
    let mut direct = ns.exec(&ns.client);
    direct.args([
        "psql",
        "-h",
        POD_ADDR,
        "-p",
        &PG_PORT.to_string(),
        "-U",
        "postgres",
        "-c",
        "select 1",
    ]);
    let (ok, out) = run(&mut direct);
    assert!(!ok, "PostgreSQL answered on the pod's address: {out}");

    let steps = steps_of(&config);
    let step_refs: Vec<&str> = steps.iter().map(String::as_str).collect();
    knock_from(&ns, &step_refs);
    gateway.wait_nth(1, "grant", |v| msg(v) == "grant" && v["source"] == CLIENT_ADDR);
    let (ok, out) = run(&mut psql_from(&ns, "select 40 + 2"));
    assert!(ok && out.trim() == "42", "psql after the knock: {out}");

    // A ConfigMap update: a new sequence, swapped in under ..data.
    let new_steps = ["7304/udp", "7301/udp", "7303/udp"];
    let old_line = format!("sequence = [{}]", quote(&step_refs));
    let new_line = format!("sequence = [{}]", quote(&new_steps));
    assert!(config.contains(&old_line), "the sequence is not written as {old_line}");
    let updated = config.replace(&old_line, &new_line).replace(
        "trap_ports = [\"7303/udp\", \"7304/udp\"]",
        "trap_ports = [\"7302/udp\", \"7305/udp\"]",
    );
    let v2 = work.path().join("v2");
    std::fs::create_dir(&v2).unwrap();
    for e in std::fs::read_dir(&v1).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), v2.join(e.file_name())).unwrap();
        keep_private(&v2.join(e.file_name()));
    }
    std::fs::write(v2.join("proxy.toml"), &updated).unwrap();
    mount.update(&v2);
    gateway.wait_msg(1, "config reloaded");
    // Revoke the grant (loopback admin, with the mounted token), then the
    // new sequence opens it again.
    let token = std::fs::read_to_string(v1.join("admin.token")).unwrap();
    let (ok, out) = run(ns.exec(&ns.pod).args([
        "curl",
        "-sS",
        "-f",
        "-X",
        "DELETE",
        "-H",
        &format!("Authorization: Bearer {}", token.trim()),
        &format!("http://127.0.0.1:9464/v1/grants/postgres/{CLIENT_ADDR}"),
    ]));
    assert!(ok, "revoke: {out}");
    let (ok, out) = run(&mut psql_from(&ns, "select 1"));
    assert!(!ok, "psql got through after the revoke: {out}");
    knock_from(&ns, &new_steps);
    gateway.wait_nth(2, "second grant", |v| msg(v) == "grant" && v["source"] == CLIENT_ADDR);

    // SIGTERM with a query in flight: it finishes, the gateway exits 0
    // within the pod's grace period.
    let in_flight = psql_from(&ns, "select pg_sleep(2), 'drained'")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    gateway.wait_nth(2, "the query's connection", |v| {
        msg(v) == "connection allowed" && v["source"] == CLIENT_ADDR
    });
    let term = Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM).unwrap();
    gateway.wait_msg(1, "shutting down");
    // The readiness probe fails while draining, so the Service stops
    // sending new clients; the query in flight goes on.
    let (_, probe) = run(ns.exec(&ns.pod).args([
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "http://127.0.0.1:9464/readyz",
    ]));
    assert_eq!(probe.trim(), "503", "/readyz while draining");
    let out = in_flight.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("drained"),
        "the query in flight was cut: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut gateway = gateway;
    let exit = loop {
        if let Some(s) = gateway.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            term.elapsed() < grace,
            "no exit within the grace period:\n{}",
            gateway.text()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "exit {exit}:\n{}", gateway.text());
    eprintln!(
        "drained and exited {:?} after SIGTERM (grace {grace:?}); whole test {:?}",
        term.elapsed(),
        started.elapsed()
    );
    // PostgreSQL's fast shutdown, as the kubelet's SIGTERM would do.
    let mut pg = pg;
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pg.child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    );
    let _ = pg.child.wait();
}

fn quote(steps: &[&str]) -> String {
    steps.iter().map(|s| format!("\"{s}\"")).collect::<Vec<_>>().join(", ")
}

/// A volume's files as the manifest's `defaultMode: 0440` and `fsGroup`
/// lay them out: owner root, group the pod's, read-only, nothing for
/// others (the gateway refuses keys others can read).
fn keep_private(path: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    std::os::unix::fs::chown(path, None, Some(deploy::UID)).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o440)).unwrap();
}
