//! The `[state]` section: the directory where what must outlive the
//! process is kept (the SPA replay log, [`crate::store::replay`]), and the
//! backend that shares the gate between replicas (`backend = "redis"`,
//! [`crate::replicate`]).
//!
//! Validation only checks the path's shape; whether the directory can be
//! created and written is found out when `serve` opens the log (a start-up
//! error naming `state.dir`), since `portcullis check` often runs as
//! another user than the service. Likewise a Redis that cannot be reached
//! is no config error: the gateway starts, fails closed and reconnects.

use std::path::PathBuf;
use std::sync::Arc;

use super::raw::RawState;
use super::Validator;
use crate::secret::Secret;

/// Where state is kept when `[state]` names no directory: the system
/// path (systemd's `StateDirectory=portcullis`). Unprivileged runs and
/// containers set `state.dir` (or `PORTCULLIS__STATE__DIR`).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/portcullis";

/// The key prefix when `state.key_prefix` is not set.
pub(super) const DEFAULT_KEY_PREFIX: &str = "portcullis";

/// The validated `[state]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    /// Where the replay log lives, resolved from the config's directory.
    pub dir: PathBuf,
    /// Where the gate's inputs are shared, if anywhere.
    pub backend: Backend,
    /// This replica's name, as `/v1/grants` shows it.
    pub replica: Arc<str>,
}

/// Where grants, knock progress and the replay cache live.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Backend {
    /// In this process alone (the replay log on disk under `dir`).
    #[default]
    Memory,
    /// Shared by every replica through one Redis.
    Redis(Redis),
}

/// `backend = "redis"`: how to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redis {
    /// `redis://` or `rediss://` (TLS through rustls), without credentials;
    /// with `sentinel`, only its database number is used.
    pub url: String,
    /// The Sentinels to ask for the current primary, when set.
    pub sentinel: Option<Sentinel>,
    pub username: Option<String>,
    /// From `password_file` or `password_env`, never from the file itself.
    pub password: Option<Secret>,
    /// The prefix of every key written (`{prefix}:inputs`, ...).
    pub key_prefix: String,
}

/// Redis Sentinel: the primary is whichever the sentinels name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sentinel {
    /// `redis://HOST:PORT` of each sentinel.
    pub addrs: Vec<String>,
    pub master_name: String,
}

impl Default for State {
    fn default() -> Self {
        Self {
            dir: PathBuf::from(DEFAULT_STATE_DIR),
            backend: Backend::Memory,
            replica: default_replica(),
        }
    }
}

impl State {
    /// The Redis settings, with `backend = "redis"`.
    pub fn redis(&self) -> Option<&Redis> {
        match &self.backend {
            Backend::Redis(r) => Some(r),
            Backend::Memory => None,
        }
    }
}

/// The host name (a Kubernetes pod's name), or "portcullis".
fn default_replica() -> Arc<str> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "portcullis".to_string())
        .into()
}

impl Validator {
    pub(super) fn state(&mut self, raw: &RawState) -> State {
        let dir = match raw.dir.as_deref().map(str::trim) {
            None => PathBuf::from(DEFAULT_STATE_DIR),
            Some("") => {
                self.problem(
                    "state.dir",
                    format!("empty: name a directory this process may write (the default is {DEFAULT_STATE_DIR})"),
                );
                PathBuf::from(DEFAULT_STATE_DIR)
            }
            Some(dir) => self.base.join(dir),
        };
        let replica = match raw.replica.as_deref().map(str::trim) {
            None => default_replica(),
            Some(name) if valid_name(name) => name.into(),
            Some(_) => {
                self.problem(
                    "state.replica",
                    "use 1-64 letters, digits, '.', '-' or '_' (the default is the host name)",
                );
                default_replica()
            }
        };
        let backend = match raw.backend.as_deref().map(str::trim) {
            None | Some("memory") => {
                for (key, set) in [
                    ("url", raw.url.is_some()),
                    ("username", raw.username.is_some()),
                    ("password_file", raw.password_file.is_some()),
                    ("password_env", raw.password_env.is_some()),
                    ("key_prefix", raw.key_prefix.is_some()),
                    ("sentinels", !raw.sentinels.is_empty()),
                    ("master_name", raw.master_name.is_some()),
                ] {
                    if set {
                        self.problem(format!("state.{key}"), "only used with backend = \"redis\"");
                    }
                }
                Backend::Memory
            }
            Some("redis") => self.redis(raw).map_or(Backend::Memory, Backend::Redis),
            Some(other) => {
                self.problem("state.backend", format!("{other:?}: use \"memory\" or \"redis\""));
                Backend::Memory
            }
        };
        State { dir, backend, replica }
    }

    fn redis(&mut self, raw: &RawState) -> Option<Redis> {
        let before = self.problems.len();
        let sentinel = self.sentinel(raw);
        let url = match raw.url.as_deref().map(str::trim) {
            None | Some("") if !raw.sentinels.is_empty() => Some("redis://sentinel-primary/0".to_string()),
            None | Some("") => {
                self.problem(
                    "state.url",
                    "required with backend = \"redis\": e.g. \"redis://127.0.0.1:6379/0\"",
                );
                None
            }
            Some(text) => match redis::parse_redis_url(text) {
                Some(u) if u.scheme() != "redis" && u.scheme() != "rediss" => {
                    self.problem(
                        "state.url",
                        format!("scheme {:?}: use redis:// or rediss:// (TLS)", u.scheme()),
                    );
                    None
                }
                Some(u) if u.password().is_some() || !u.username().is_empty() => {
                    self.problem(
                        "state.url",
                        "holds credentials: put the user in state.username and the password in state.password_file or state.password_env",
                    );
                    None
                }
                Some(u) if u.host_str().is_none_or(str::is_empty) => {
                    self.problem("state.url", "names no host: e.g. \"redis://127.0.0.1:6379/0\"");
                    None
                }
                Some(u) => Some(u.to_string()),
                None => {
                    self.problem("state.url", format!("{text:?} is not a redis:// or rediss:// URL"));
                    None
                }
            },
        };
        let password = match (&raw.password_file, &raw.password_env) {
            (Some(_), Some(_)) => {
                self.problem("state.password_file", "set password_file or password_env, not both");
                None
            }
            (None, None) => None,
            (Some(file), None) => match super::spa::read_key_file(&self.base.join(file)) {
                Ok((text, warning)) => {
                    if let Some(w) = warning {
                        self.warning("state.password_file", w.to_string());
                    }
                    Some(Secret::from_slice(text.trim_end_matches(['\r', '\n']).as_bytes()))
                }
                Err(e) => {
                    self.problem("state.password_file", e);
                    None
                }
            },
            (None, Some(var)) => match std::env::var(var) {
                Ok(text) => Some(Secret::from_slice(text.as_bytes())),
                Err(_) => {
                    self.problem("state.password_env", format!("environment variable {var} is not set"));
                    None
                }
            },
        };
        let key_prefix = match raw.key_prefix.as_deref().map(str::trim) {
            None => DEFAULT_KEY_PREFIX.to_string(),
            Some(p) if valid_name(p) || p.contains(':') && p.split(':').all(valid_name) => p.to_string(),
            Some(_) => {
                self.problem("state.key_prefix", "use letters, digits, '.', '-', '_' or ':'");
                DEFAULT_KEY_PREFIX.to_string()
            }
        };
        if self.problems.len() > before {
            return None;
        }
        Some(Redis {
            url: url?,
            sentinel,
            username: raw.username.clone().filter(|u| !u.is_empty()),
            password,
            key_prefix,
        })
    }
}

impl Validator {
    fn sentinel(&mut self, raw: &RawState) -> Option<Sentinel> {
        if raw.sentinels.is_empty() {
            if raw.master_name.is_some() {
                self.problem("state.master_name", "only used with state.sentinels");
            }
            return None;
        }
        let mut addrs = Vec::new();
        for (i, a) in raw.sentinels.iter().enumerate() {
            let text = a.trim();
            let url = format!("redis://{text}");
            match redis::parse_redis_url(&url) {
                Some(u) if u.host_str().is_some_and(|h| !h.is_empty()) && u.port().is_some() && u.path().len() <= 1 => {
                    addrs.push(url);
                }
                _ => self.problem(
                    format!("state.sentinels[{i}]"),
                    format!("{text:?} is not HOST:PORT (e.g. \"127.0.0.1:26379\")"),
                ),
            }
        }
        let master_name = match raw.master_name.as_deref().map(str::trim) {
            Some(name) if valid_name(name) => name.to_string(),
            Some(_) => {
                self.problem("state.master_name", "use 1-64 letters, digits, '.', '-' or '_'");
                return None;
            }
            None => {
                self.problem(
                    "state.master_name",
                    "required with state.sentinels: the name the sentinels monitor, e.g. \"mymaster\"",
                );
                return None;
            }
        };
        (addrs.len() == raw.sentinels.len()).then_some(Sentinel { addrs, master_name })
    }
}

/// A replica name or key prefix: short and plain.
fn valid_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::raw::RawConfig;

    const ECHO: &str = r#"
[service.echo]
listen = "127.0.0.1:15000"
upstream = "127.0.0.1:15001"
knock = { sequence = ["17001/udp", "17003/udp", "17002/udp"] }
"#;

    fn state(section: &str) -> Result<State, Vec<String>> {
        let raw: RawConfig = toml::from_str(&format!("[state]\n{section}\n{ECHO}")).unwrap();
        crate::config::validate(&raw)
            .map(|c| c.state)
            .map_err(|e| e.problems.into_iter().map(|p| p.path).collect())
    }

    #[test]
    fn the_backend_is_memory_unless_redis_is_named_with_a_url() {
        assert_eq!(state("").unwrap().backend, Backend::Memory);
        assert_eq!(state("backend = \"memory\"").unwrap().backend, Backend::Memory);
        let s = state("backend = \"redis\"\nurl = \"redis://127.0.0.1:6379/0\"\nreplica = \"b\"").unwrap();
        let redis = s.redis().unwrap();
        assert_eq!(redis.url, "redis://127.0.0.1:6379/0");
        assert_eq!(redis.key_prefix, DEFAULT_KEY_PREFIX);
        assert_eq!(redis.password, None);
        assert_eq!(&*s.replica, "b");
        assert!(!state("").unwrap().replica.is_empty(), "the host name by default");
    }

    #[test]
    fn the_password_comes_from_the_environment_never_the_url() {
        // Named for this test alone, and never set.
        let var = "PORTCULLIS_TEST_STATE_REDIS_PASSWORD";
        let s = state(&format!(
            "backend = \"redis\"\nurl = \"rediss://db:6380/1\"\npassword_env = \"{var}\""
        ));
        assert_eq!(s.unwrap_err(), ["state.password_env"], "unset");
        for (section, path) in [
            ("backend = \"redis\"\nurl = \"redis://:pw@db:6379/0\"", "state.url"),
            ("backend = \"redis\"\nurl = \"redis://user:pw@db:6379/0\"", "state.url"),
            ("backend = \"redis\"\nurl = \"unix:///run/redis.sock\"", "state.url"),
            ("backend = \"redis\"\nurl = \"not a url\"", "state.url"),
            ("backend = \"redis\"", "state.url"),
            ("backend = \"zookeeper\"", "state.backend"),
            ("url = \"redis://db:6379/0\"", "state.url"),
            ("password_env = \"X\"", "state.password_env"),
            ("replica = \"\"", "state.replica"),
            (
                "backend = \"redis\"\nurl = \"redis://db/0\"\npassword_file = \"a\"\npassword_env = \"b\"",
                "state.password_file",
            ),
            (
                "backend = \"redis\"\nurl = \"redis://db/0\"\nkey_prefix = \"a b\"",
                "state.key_prefix",
            ),
        ] {
            let err = state(section).unwrap_err();
            assert!(err.iter().any(|p| p == path), "{section}: {err:?}");
        }
    }

    #[test]
    fn sentinels_need_a_master_name_and_host_port_addresses() {
        let s =
            state("backend = \"redis\"\nsentinels = [\"10.0.0.1:26379\", \"s2:26379\"]\nmaster_name = \"mymaster\"")
                .unwrap();
        let sentinel = s.redis().unwrap().sentinel.clone().unwrap();
        assert_eq!(sentinel.addrs, ["redis://10.0.0.1:26379", "redis://s2:26379"]);
        assert_eq!(sentinel.master_name, "mymaster");
        for (section, path) in [
            ("backend = \"redis\"\nsentinels = [\"s1:26379\"]", "state.master_name"),
            (
                "backend = \"redis\"\nsentinels = [\"s1\"]\nmaster_name = \"m\"",
                "state.sentinels[0]",
            ),
            (
                "backend = \"redis\"\nurl = \"redis://db/0\"\nmaster_name = \"m\"",
                "state.master_name",
            ),
            ("sentinels = [\"s1:26379\"]", "state.sentinels"),
        ] {
            let err = state(section).unwrap_err();
            assert!(err.iter().any(|p| p == path), "{section}: {err:?}");
        }
    }

    #[test]
    fn a_password_file_is_read_and_redacted() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("redis.password");
        std::fs::write(&file, "s3cret\n").unwrap();
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let s = state(&format!(
            "backend = \"redis\"\nurl = \"redis://db/0\"\npassword_file = \"{}\"",
            file.display()
        ))
        .unwrap();
        let pw = s.redis().unwrap().password.as_ref().unwrap();
        assert_eq!(pw.expose(), b"s3cret");
        assert!(!format!("{s:?}").contains("s3cret"));
    }
}
