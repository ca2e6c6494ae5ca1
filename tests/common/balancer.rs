//! A real load balancer in front of the gateway: HAProxy in TCP mode,
//! started on free ports with a generated config, speaking the PROXY
//! protocol towards its servers (`send-proxy`, `send-proxy-v2`).

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use super::{free_ports, PATIENCE};

/// A running HAProxy; killed on drop.
pub struct Haproxy {
    child: Child,
    _dir: tempfile::TempDir,
    /// The client-facing address of each route, in the order given.
    pub fronts: Vec<SocketAddr>,
}

impl Haproxy {
    /// One frontend per route on 127.0.0.1 (clients reach it from any
    /// 127.x source), forwarding to `server` with the given server options
    /// (e.g. `"send-proxy-v2"`).
    pub fn start(routes: &[(SocketAddr, &str)]) -> Haproxy {
        let ports = free_ports(routes.len() as u16);
        let mut cfg = String::from(
            "global\n    maxconn 256\n\ndefaults\n    mode tcp\n    timeout connect 5s\n    \
             timeout client 30s\n    timeout server 30s\n",
        );
        for (i, ((server, options), port)) in routes.iter().zip(&ports).enumerate() {
            cfg.push_str(&format!(
                "\nlisten l{i}\n    bind 127.0.0.1:{port}\n    server s{i} {server} {options}\n"
            ));
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, &cfg).expect("write haproxy.cfg");
        let log = std::fs::File::create(dir.path().join("haproxy.log")).expect("haproxy log");
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("haproxy (apt-get install haproxy; scripts/install-test-deps does it)");
        let mut h = Haproxy {
            child,
            fronts: ports.iter().map(|p| SocketAddr::from(([127, 0, 0, 1], *p))).collect(),
            _dir: dir,
        };
        for port in ports {
            h.wait_listening(port);
        }
        h
    }

    /// Waits until HAProxy listens on `port` (read from /proc/net/tcp, so
    /// no probe connection reaches the gateway behind it).
    fn wait_listening(&mut self, port: u16) {
        let deadline = Instant::now() + PATIENCE;
        let want = format!("0100007F:{port:04X}");
        loop {
            let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
            let listening = table.lines().skip(1).any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 3 && f[1] == want && f[3] == "0A"
            });
            if listening {
                return;
            }
            if let Some(status) = self.child.try_wait().expect("wait on haproxy") {
                let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
                panic!("haproxy exited ({status}):\n{log}");
            }
            assert!(Instant::now() < deadline, "haproxy does not listen on {port}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    fn log_path(&self) -> std::path::PathBuf {
        Path::new(self._dir.path()).join("haproxy.log")
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
