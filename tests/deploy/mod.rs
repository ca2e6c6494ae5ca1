//! Shared by the deployment tests: lays a shipped config out in a
//! directory with the secrets it names made fresh (keys from
//! `portcullis keygen`, a random admin token), as an operator would
//! before the first start, and runs `portcullis check` on it.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use serde_json::Value;

use super::common::{run_bin, BIN};

/// Writes `config` as `dir/name` and every file it names under `dir`:
/// `user.*.key_file` from `portcullis keygen`, `admin.token_file` and
/// `state.password_file` random.
pub fn lay_out(dir: &Path, name: &str, config: &str) -> PathBuf {
    let parsed: toml::Table = toml::from_str(config).unwrap_or_else(|e| panic!("{name}: not TOML: {e}"));
    let mut secrets: Vec<(String, Vec<u8>)> = Vec::new();
    if let Some(users) = parsed.get("user").and_then(|u| u.as_table()) {
        for (user, t) in users {
            if let Some(f) = t.get("key_file").and_then(|f| f.as_str()) {
                let (code, key, err) = run_bin(&["keygen"], &[]);
                assert_eq!(code, 0, "keygen for {user}: {err}");
                secrets.push((f.to_string(), key.into_bytes()));
            }
        }
    }
    if let Some(f) = parsed
        .get("admin")
        .and_then(|a| a.get("token_file"))
        .and_then(|f| f.as_str())
    {
        secrets.push((f.to_string(), random_token().into_bytes()));
    }
    if let Some(f) = parsed
        .get("state")
        .and_then(|a| a.get("password_file"))
        .and_then(|f| f.as_str())
    {
        secrets.push((f.to_string(), random_token().into_bytes()));
    }
    for (rel, content) in secrets {
        assert!(!rel.starts_with('/'), "{name}: {rel} must be relative to the config");
        let path = dir.join(&rel);
        std::fs::create_dir_all(path.parent().expect("a file has a parent")).unwrap();
        super::common::write_private(&path, content);
    }
    let path = dir.join(name);
    std::fs::write(&path, config).unwrap();
    path
}

/// 64 hex characters from the kernel's random source.
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut bytes).unwrap();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `portcullis check` on `path`: Ok(stdout) or Err(the whole output).
pub fn check(path: &Path) -> Result<String, String> {
    let (code, out, err) = run_bin(&["check", "-c", path.to_str().expect("utf-8 path")], &[]);
    if code == 0 {
        Ok(out)
    } else {
        Err(format!("{BIN} check {}: exit {code}\n{out}{err}", path.display()))
    }
}

/// The container image's filesystem under `work/ctx/rootfs`: a stripped
/// copy of the built binary laid out by `deploy/container/rootfs.sh`, the
/// script the Containerfile's build stage runs.
pub fn image_rootfs(work: &Path) -> PathBuf {
    let stripped = work.join("portcullis");
    let out = std::process::Command::new("strip")
        .arg("-o")
        .arg(&stripped)
        .arg(BIN)
        .output()
        .expect("strip (binutils)");
    assert!(out.status.success(), "strip: {}", String::from_utf8_lossy(&out.stderr));
    let rootfs = work.join("ctx/rootfs");
    let out = std::process::Command::new("sh")
        .arg(super::common::repo_path("deploy/container/rootfs.sh"))
        .arg(&stripped)
        .arg(&rootfs)
        .output()
        .expect("sh");
    assert!(
        out.status.success(),
        "rootfs.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    rootfs
}

/// A command that runs the image's binary as uid/gid 65532 with
/// no-new-privileges, chrooted into `rootfs` mounted read-only in a mount
/// namespace of its own, with each (host dir, path in the image) of
/// `mounts` bound over it (read-only unless the path is the state dir).
/// `prefix` runs first (e.g. `ip netns exec NAME`).
pub fn chroot_command(
    prefix: &[&str],
    rootfs: &Path,
    mounts: &[(&Path, &str)],
    args: &[&str],
) -> std::process::Command {
    let r = rootfs.display();
    let mut script = format!("set -e; mount --bind {r} {r}; mount -o remount,bind,ro {r}; ");
    for (host, inside) in mounts {
        script += &format!("mount --bind {} {r}{inside}; ", host.display());
        if *inside != "/var/lib/portcullis" {
            script += &format!("mount -o remount,bind,ro {r}{inside}; ");
        }
    }
    let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
    script += &format!(
        "cd {r}/var/lib/portcullis; exec setpriv --no-new-privs chroot --userspec={UID}:{UID} --groups={UID} {r} /usr/local/bin/portcullis {}",
        quoted.join(" ")
    );
    let mut all: Vec<&str> = prefix.to_vec();
    all.extend(["unshare", "--mount", "--propagation", "private", "sh", "-c"]);
    let mut c = std::process::Command::new(all[0]);
    c.args(&all[1..]).arg(script);
    c
}

/// The image's user.
pub const UID: u32 = 65532;

/// Lines read so far, and whether the stream has ended.
type Lines = Arc<(Mutex<(Vec<String>, bool)>, Condvar)>;

/// A child whose stderr lines are kept for waiting on.
pub struct Logged {
    pub child: Child,
    lines: Lines,
}

impl Logged {
    pub fn spawn(mut cmd: Command) -> Logged {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let stderr = child.stderr.take().expect("piped");
        let lines: Lines = Arc::default();
        let writer = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                writer.0.lock().unwrap().0.push(line);
                writer.1.notify_all();
            }
            writer.0.lock().unwrap().1 = true;
            writer.1.notify_all();
        });
        Logged { child, lines }
    }

    pub fn text(&self) -> String {
        self.lines.0.lock().unwrap().0.join("\n")
    }

    /// Waits for the `n`th JSON line matching `pred`.
    pub fn wait_nth(&self, n: usize, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + super::common::PATIENCE;
        let mut guard = self.lines.0.lock().unwrap();
        loop {
            let hits: Vec<Value> = guard
                .0
                .iter()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter(|v| pred(v))
                .collect();
            if hits.len() >= n {
                return hits[n - 1].clone();
            }
            let now = Instant::now();
            if guard.1 || now >= deadline {
                let text = guard.0.join("\n");
                drop(guard);
                panic!("{what}: not seen; log:\n{text}");
            }
            guard = self.lines.1.wait_timeout(guard, deadline - now).unwrap().0;
        }
    }

    pub fn wait_msg(&self, n: usize, message: &str) -> Value {
        self.wait_nth(n, message, |v| super::common::msg(v) == message)
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
