//! A network namespace of a test's own, for addresses loopback does not
//! have: created with `ip netns add`, deleted on drop.

use std::process::Command;

/// See the module doc.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// A namespace named `prefix-PID`, its loopback up. Needs root.
    pub fn new(prefix: &str) -> Netns {
        let ns = Netns {
            name: format!("{prefix}-{}", std::process::id()),
        };
        let _ = Command::new("ip").args(["netns", "del", &ns.name]).output();
        run_ip(&["netns", "add", &ns.name]);
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NAME ARGS`; asserts success.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run_ip(&all);
    }

    /// Moves the calling thread into the namespace; threads it spawns
    /// afterwards start there too.
    pub fn enter(&self) {
        enter(&self.name);
    }

    /// Runs `f` on a thread inside the namespace and returns its result.
    pub fn within<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let name = self.name.clone();
        std::thread::spawn(move || {
            enter(&name);
            f()
        })
        .join()
        .expect("a thread inside the namespace panicked")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

fn enter(name: &str) {
    let file = std::fs::File::open(format!("/var/run/netns/{name}")).expect("the namespace's file");
    nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
}

/// `ip ARGS` (iproute2); asserts success.
pub fn run_ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {} (network namespaces need root)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}
