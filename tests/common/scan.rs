//! What a scanner sees: nmap from a chosen source, and the gateway run
//! without privileges (`setpriv`), for the stealth tests.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

use super::BIN;

/// `setpriv` arguments that run a command as `nobody` with no capability
/// at all (none inherited, none in the bounding set).
pub const UNPRIVILEGED: [&str; 7] = [
    "--reuid",
    "65534",
    "--regid",
    "65534",
    "--clear-groups",
    "--inh-caps=-all",
    "--bounding-set=-all",
];

/// Whether this process runs as root, from the kernel's own account.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:").map(|r| r.split_whitespace().nth(1) == Some("0")))
        })
        .unwrap_or(false)
}

/// Makes `dir` and `file` readable by `nobody`.
pub fn readable_by_all(dir: &Path, file: &Path) {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o644)).unwrap();
}

/// The state and reason nmap reports for each port, scanning 127.0.0.1
/// from `source` with `scan` (`-sU`, `-sS`: raw probes from that source
/// over `lo`).
pub fn nmap(scan: &str, source: &str, ports: &[u16]) -> HashMap<u16, (String, String)> {
    nmap_with(&[scan, "-S", source, "-e", "lo"], ports)
}

/// [`nmap`] with a connect scan (`-sT`): the kernel picks the source
/// (127.0.0.1), as nmap does not bind a connect scan to `-S` on loopback.
pub fn nmap_connect(ports: &[u16]) -> HashMap<u16, (String, String)> {
    nmap_with(&["-sT"], ports)
}

fn nmap_with(args: &[&str], ports: &[u16]) -> HashMap<u16, (String, String)> {
    let list: Vec<String> = ports.iter().map(u16::to_string).collect();
    // In port order (-r), so a scan of knock steps is the same every run:
    // nmap's default random order would now and then walk a sequence.
    let out = Command::new("nmap")
        .args(args)
        .args(["-Pn", "-n", "-r", "--reason", "-p", &list.join(",")])
        .arg("127.0.0.1")
        .output()
        .expect("nmap (scripts/install-test-deps installs it)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "nmap: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut states = HashMap::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let (Some(port), Some(state), Some(_service)) = (words.next(), words.next(), words.next()) else {
            continue;
        };
        let Some(port) = port.split('/').next().and_then(|p| p.parse::<u16>().ok()) else {
            continue;
        };
        // "closed  unknown  port-unreach ttl 64": the reason without the TTL.
        let reason = words.next().unwrap_or("").to_string();
        states.insert(port, (state.to_string(), reason));
    }
    assert_eq!(states.len(), ports.len(), "nmap output: {text}");
    states
}

/// The lines of a gateway run as `nobody` without capabilities, until
/// `ready` or its exit; the process is killed then.
pub fn run_unprivileged(config: &str, args: &[&str]) -> (Vec<String>, Option<i32>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, config).unwrap();
    readable_by_all(dir.path(), &path);
    // A state dir nobody may write to, as an operator would give one.
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut child = Command::new("setpriv")
        .args(UNPRIVILEGED)
        .arg("--")
        .arg(BIN)
        .args(args)
        .arg(&path)
        .env(super::STATE_DIR_ENV, &state)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("setpriv (util-linux)");
    let stdout = child.stdout.take().unwrap();
    let printed = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<String>>()
    });
    let mut lines = Vec::new();
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let Ok(line) = line else { break };
        let ready = line.contains("\"message\":\"ready\"");
        lines.push(line);
        if ready {
            let _ = child.kill();
            break;
        }
    }
    let status = child.wait().unwrap();
    lines.extend(printed.join().unwrap());
    (lines, status.code())
}
