//! A `redis-server` of a test's own, on a free port, for the Redis state
//! backend (`[state] backend = "redis"`).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_ports, PATIENCE};

/// A `redis-server` of the test's own, without persistence.
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
    /// Extra arguments; for a sentinel, `--sentinel` and its config lines.
    args: Vec<String>,
}

impl Redis {
    pub fn start() -> Redis {
        Redis::start_args(&[])
    }

    /// A server started with `args` added (`--replicaof`, `--sentinel`).
    pub fn start_args(args: &[&str]) -> Redis {
        let dir = tempfile::tempdir().unwrap();
        let port = free_ports(1)[0];
        let mut redis = Redis {
            child: None,
            port,
            dir,
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        redis.restart();
        redis
    }

    /// Starts the server (again, empty: no persistence) and waits until it
    /// answers.
    pub fn restart(&mut self) {
        let mut cmd = Command::new("redis-server");
        if self.args.first().is_some_and(|a| a == "--sentinel") {
            let conf = self.dir.path().join("sentinel.conf");
            std::fs::write(&conf, self.args[1..].join("\n") + "\n").unwrap();
            cmd.arg(&conf).arg("--sentinel");
        }
        let child = cmd
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(if self.args.first().is_some_and(|a| a == "--sentinel") {
                &[][..]
            } else {
                &self.args[..]
            })
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (apt-get install redis-server; scripts/install-test-deps does it)");
        self.child = Some(child);
        let deadline = Instant::now() + PATIENCE;
        while self.cli(&["PING"]) != "PONG" {
            assert!(Instant::now() < deadline, "redis-server did not answer");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}
