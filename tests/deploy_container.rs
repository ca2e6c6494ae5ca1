//! The container image in `deploy/container/`: its runtime stage, built
//! with buildah (vfs storage, chroot isolation, no daemon) from the
//! host-built binary laid out by the same `rootfs.sh` the Containerfile's
//! build stage runs, then run: `check` on the shipped config and `serve`
//! answering `/healthz`, as uid/gid 65532 with no capabilities, once under
//! `buildah run` and once from the image's filesystem mounted read-only
//! under `chroot` with no-new-privileges.
//!
//! Where buildah cannot build or run here, the same filesystem layout runs
//! under `chroot` alone, and the test prints why.

#![allow(
    clippy::unwrap_used,
    clippy::disallowed_methods,
    unreachable_pub,
    reason = "test code: a panic is the failure report, and real time is what is waited on"
)]

mod common;
mod deploy;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use deploy::UID;

const CONTAINERFILE: &str = "deploy/container/Containerfile";
const SHIPPED_CONFIG: &str = "deploy/container/proxy.toml";
const IMAGE: &str = "localhost/portcullis:test";

/// The Containerfile's runtime stage, reading the rootfs from the build
/// context instead of the build stage.
fn runtime_stage() -> String {
    let text = std::fs::read_to_string(repo_path(CONTAINERFILE)).unwrap();
    let start = text
        .find("FROM scratch AS runtime")
        .expect("the runtime stage starts FROM scratch");
    let stage = &text[start..];
    let copy = "COPY --from=build /rootfs/ /";
    assert!(
        stage.contains(copy),
        "the runtime stage no longer copies /rootfs from the build stage"
    );
    stage.replace(copy, "COPY rootfs/ /")
}

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("{cmd:?}: {}\n{text}", out.status))
    }
}

/// The image's filesystem with the shipped config where the Containerfile
/// puts it, and the runtime stage beside it.
fn lay_out_rootfs(work: &Path) -> PathBuf {
    let rootfs = deploy::image_rootfs(work);
    std::fs::copy(repo_path(SHIPPED_CONFIG), rootfs.join("etc/portcullis/proxy.toml")).unwrap();
    std::fs::write(work.join("ctx/Containerfile"), runtime_stage()).unwrap();
    rootfs
}

fn assert_minimal(rootfs: &Path) {
    for shell in ["bin/sh", "bin/bash", "usr/bin/sh", "bin/busybox"] {
        assert!(!rootfs.join(shell).exists(), "the image has a shell: /{shell}");
    }
    let sections = run(Command::new("readelf")
        .arg("-S")
        .arg(rootfs.join("usr/local/bin/portcullis")))
    .unwrap();
    assert!(
        !sections.contains(".symtab") && !sections.contains(".debug_info"),
        "the image's binary is not stripped"
    );
    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap();
    assert!(passwd.contains(&format!(":{UID}:{UID}:")), "{passwd}");
}

struct Buildah {
    args: Vec<String>,
}

impl Buildah {
    fn new(work: &Path) -> Buildah {
        Buildah {
            args: vec![
                "--root".into(),
                work.join("storage").display().to_string(),
                "--runroot".into(),
                work.join("run").display().to_string(),
                "--storage-driver".into(),
                "vfs".into(),
            ],
        }
    }

    fn cmd(&self) -> Command {
        // PORTCULLIS_TEST_BUILDAH picks another buildah (a missing one
        // exercises the chroot fallback).
        let program = std::env::var("PORTCULLIS_TEST_BUILDAH").unwrap_or_else(|_| "buildah".into());
        let mut c = Command::new(program);
        c.args(&self.args);
        c
    }
}

/// A writable state directory owned by the image's user, as a volume.
fn state_dir(work: &Path) -> PathBuf {
    let state = work.join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::os::unix::fs::chown(&state, Some(UID), Some(UID)).unwrap();
    state
}

/// The ids and capabilities of `pid`, from /proc.
fn credentials(pid: i32) -> (String, String, String, String) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    (field("Uid:"), field("Gid:"), field("CapEff:"), field("CapPrm:"))
}

fn parent(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    after.split_whitespace().nth(1)?.parse().ok()
}

/// The descendants of `root` running the image's binary.
fn gateway_pids(root: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe")) else {
            continue;
        };
        if !exe.ends_with("usr/local/bin/portcullis") {
            continue;
        }
        let mut p = Some(pid);
        while let Some(q) = p {
            if q == root {
                out.push(pid);
                break;
            }
            p = parent(q).filter(|&x| x > 1);
        }
    }
    out
}

/// A runner (buildah, or the chroot) that is killed with its gateway if
/// the test fails before stopping it.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        for pid in gateway_pids(self.0.id() as i32) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `path` opened for appending, so stdout and stderr interleave whole.
fn log_file(path: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap()
}

/// Waits until `/healthz` on `port` answers, or the child exits.
fn wait_healthz(child: &mut Child, port: u16, log: &Path) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let h = curl(&["--max-time", "1"], &format!("http://127.0.0.1:{port}/healthz"));
        if h.status == 200 {
            assert_eq!(h.body.trim(), "ok");
            return;
        }
        let exited = child.try_wait().unwrap();
        assert!(
            exited.is_none() && Instant::now() < deadline,
            "no /healthz (exit: {exited:?}); log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Asserts every gateway process under `child` runs as the image's user
/// without capabilities, then stops it with SIGTERM and waits.
fn assert_unprivileged_then_stop(mut running: Running, log: &Path, read_only_root: bool) {
    let child = &mut running.0;
    let pids = gateway_pids(child.id() as i32);
    assert!(!pids.is_empty(), "no gateway process under the runner");
    for &pid in &pids {
        let (uid, gid, eff, prm) = credentials(pid);
        let want = format!("{UID}\t{UID}\t{UID}\t{UID}");
        assert_eq!(uid, want, "uid of {pid}");
        assert_eq!(gid, want, "gid of {pid}");
        assert_eq!(eff, "0000000000000000", "effective capabilities of {pid}");
        assert_eq!(prm, "0000000000000000", "permitted capabilities of {pid}");
        if read_only_root {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
            assert!(status.contains("NoNewPrivs:\t1"), "no-new-privileges unset for {pid}");
            // mountinfo: ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS ...
            let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
            let root = mounts
                .lines()
                .rev()
                .map(|l| l.split(' ').collect::<Vec<_>>())
                .find(|f| f.len() > 5 && f[4] == "/")
                .unwrap_or_else(|| panic!("no / in the mountinfo of {pid}"));
            assert!(
                root[5].split(',').any(|o| o == "ro"),
                "/ is writable for {pid}: {root:?}"
            );
        }
    }
    for &pid in &pids {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
    }
    let deadline = Instant::now() + PATIENCE;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "the gateway did not stop; log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = std::fs::read_to_string(log).unwrap_or_default();
    assert!(text.contains("shutting down"), "no drain on SIGTERM; log:\n{text}");
}

/// Env overrides that keep the shipped config off fixed TCP ports (the
/// knock steps stay: a client must know them).
fn serve_env(admin_port: u16) -> Vec<(String, String)> {
    vec![
        ("PORTCULLIS__ADMIN__LISTEN".into(), format!("127.0.0.1:{admin_port}")),
        ("PORTCULLIS__SERVICE__POSTGRES__LISTEN".into(), "127.0.0.1:0".into()),
    ]
}

/// `rootfs` read-only, the state volume writable, the binary under
/// `chroot` as the image's user with no-new-privileges.
fn chroot_command(rootfs: &Path, state: &Path, args: &str) -> Command {
    let args: Vec<&str> = args.split(' ').collect();
    deploy::chroot_command(&[], rootfs, &[(state, "/var/lib/portcullis")], &args)
}

fn chroot_run(rootfs: &Path, work: &Path, why: &str) {
    eprintln!("running the image's filesystem under chroot: {why}");
    let state = state_dir(work);
    // The root is read-only: a write outside the state volume must fail.
    let check = run(&mut chroot_command(
        rootfs,
        &state,
        "check -c /etc/portcullis/proxy.toml",
    ))
    .unwrap_or_else(|e| panic!("check in the chroot: {e}"));
    assert!(check.contains("ok"), "{check}");
    let admin = free_ports(1)[0];
    let log = work.join("chroot-serve.log");
    let mut cmd = chroot_command(rootfs, &state, "serve");
    cmd.envs(serve_env(admin))
        .env("PORTCULLIS_CONFIG", "/etc/portcullis/proxy.toml")
        .env("PORTCULLIS_LOG_FORMAT", "json")
        .stdin(Stdio::null())
        .stdout(log_file(&log))
        .stderr(log_file(&log));
    let mut child = Running(cmd.spawn().unwrap());
    wait_healthz(&mut child.0, admin, &log);
    assert_unprivileged_then_stop(child, &log, true);
}

#[test]
fn the_runtime_image_checks_and_serves_as_65532_without_capabilities() {
    let started = Instant::now();
    let work = tempfile::tempdir().unwrap();
    let rootfs = lay_out_rootfs(work.path());
    assert_minimal(&rootfs);

    let buildah = Buildah::new(work.path());
    let built = run(buildah
        .cmd()
        .args(["bud", "--isolation", "chroot", "-t", IMAGE, "-f"])
        .arg(work.path().join("ctx/Containerfile"))
        .arg(work.path().join("ctx")));
    let built = match built {
        Ok(_) => true,
        Err(e) => {
            chroot_run(&rootfs, work.path(), &format!("buildah cannot build here: {e}"));
            false
        }
    };
    if built {
        let inspect = run(buildah.cmd().args(["inspect", "--type", "image", IMAGE])).unwrap();
        let v: serde_json::Value = serde_json::from_str(&inspect).unwrap();
        let config = &v["OCIv1"]["config"];
        assert_eq!(config["User"], format!("{UID}:{UID}"), "{config}");
        assert!(config["Volumes"].get("/var/lib/portcullis").is_some(), "{config}");
        assert_eq!(config["Entrypoint"][0], "/usr/local/bin/portcullis", "{config}");
        let ctr = run(buildah.cmd().args(["from", IMAGE])).unwrap().trim().to_string();
        let state = state_dir(work.path());
        let volume = format!("{}:/var/lib/portcullis", state.display());
        let mut check = buildah.cmd();
        check.args([
            "run",
            "--isolation",
            "chroot",
            "--cap-drop",
            "ALL",
            "-v",
            &volume,
            &ctr,
            "--",
        ]);
        check.args(["/usr/local/bin/portcullis", "check", "-c", "/etc/portcullis/proxy.toml"]);
        match run(&mut check) {
            Ok(out) => {
                assert!(out.contains("ok"), "{out}");
                let admin = free_ports(1)[0];
                let log = work.path().join("buildah-serve.log");
                let mut serve = buildah.cmd();
                serve.args(["run", "--isolation", "chroot", "--cap-drop", "ALL", "-v", &volume]);
                for (k, v) in serve_env(admin) {
                    serve.args(["-e", &format!("{k}={v}")]);
                }
                serve.args([&ctr, "--", "/usr/local/bin/portcullis", "serve"]);
                serve.stdin(Stdio::null()).stdout(log_file(&log)).stderr(log_file(&log));
                let mut child = Running(serve.spawn().unwrap());
                wait_healthz(&mut child.0, admin, &log);
                assert_unprivileged_then_stop(child, &log, false);
            }
            Err(e) => eprintln!("buildah cannot run containers here ({e}); the chroot run below stands in"),
        }
        // buildah run has no read-only root: the image's own filesystem,
        // mounted by buildah, runs read-only under chroot.
        let mounted = PathBuf::from(run(buildah.cmd().args(["mount", &ctr])).unwrap().trim());
        chroot_run(&mounted, work.path(), "the image's filesystem with a read-only root");
        let _ = run(buildah.cmd().args(["umount", &ctr]));
        let _ = run(buildah.cmd().args(["rm", &ctr]));
    }
    let _ = run(buildah.cmd().args(["rmi", "--all", "--force"]));
    eprintln!("image test took {:?}", started.elapsed());
}

#[test]
fn the_build_stage_names_what_the_repository_has() {
    // The build stage cannot run here (its base image is on a registry this
    // machine does not reach); what it names must at least exist.
    let text = std::fs::read_to_string(repo_path(CONTAINERFILE)).unwrap();
    let build = &text[..text.find("FROM scratch AS runtime").unwrap()];
    assert!(
        build.contains("--profile dist"),
        "the image does not ship the dist binary"
    );
    let cargo: toml::Table = toml::from_str(&std::fs::read_to_string(repo_path("Cargo.toml")).unwrap()).unwrap();
    let dist = &cargo["profile"]["dist"];
    assert_eq!(dist["inherits"].as_str(), Some("release"));
    assert_eq!(dist["strip"].as_bool(), Some(true));
    for path in ["deploy/container/rootfs.sh", SHIPPED_CONFIG] {
        assert!(build.contains(path), "the build stage does not use {path}");
        assert!(repo_path(path).is_file(), "{path} is missing");
    }
    // cargo build --locked needs the lock file in the context.
    assert!(build.contains("--locked") && repo_path("Cargo.lock").is_file());
    assert!(build.contains("target/dist/portcullis"));
    let ignore = std::fs::read_to_string(repo_path("deploy/container/Containerfile.dockerignore")).unwrap();
    assert!(
        ignore.lines().any(|l| l == "target/"),
        "target/ would be sent as build context"
    );
}
