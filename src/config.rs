//! Configuration in two stages: [`raw`] structs filled from the file and the
//! environment, then [`validate`] into runtime types with every problem
//! reported at once, each with its key path and what to change.
//!
//! Layering: the TOML file, then `PORTCULLIS__SECTION__KEY` environment
//! variables (`PORTCULLIS__SERVICE__ECHO__OPEN_FOR=5s` changes one field of
//! one service), then command-line flags.

mod admin;
pub mod budget;
mod effective;
mod knock;
pub use effective::effective;
mod origin;
pub use origin::EnvOverride;
pub mod resolve;
pub use knock::{random_pass_chance, sequence_report, SequenceReport, RANDOM_PASS_WARN};
pub mod pem;
pub mod raw;
mod sources;
pub use sources::{ProxyVersion, SourceRules};
mod spa;
mod state;
mod tcp;

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::gate::KnockRule;
use crate::step::Proto;
pub use admin::{Admin, AdminTls, DEFAULT_ADMIN_LISTEN};
use raw::{RawConfig, RawCount, RawGateway, RawService};
pub use spa::{KeySource, Limits, ServiceSpa, Spa, User, DEFAULT_SPA_LISTEN, MAX_SPA_AGE, MIN_FWKNOP_KEY_LEN};
pub use state::{Backend, Redis, Sentinel, State, DEFAULT_STATE_DIR};
pub use tcp::{TcpConnections, KEEPALIVE_PROBES};

/// Prefix of environment overrides; sections and keys are joined by `__`.
pub const ENV_PREFIX: &str = "PORTCULLIS";
const ENV_SEPARATOR: &str = "__";

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub gateway: Gateway,
    /// The admin endpoint, when the config has an `[admin]` section.
    pub admin: Option<Admin>,
    /// Per-source limits on knock and SPA packets.
    pub limits: Limits,
    /// The SPA listener, when the config has an `[spa]` section.
    pub spa: Option<Spa>,
    /// Where state that outlives the process is kept.
    pub state: State,
    pub services: Vec<Service>,
    pub users: Vec<User>,
    /// What the caps cost in descriptors, once [`budget::fit`] has checked
    /// them against a limit ([`from_file`] does).
    pub descriptors: Option<budget::Descriptors>,
    /// What validation warned about (a key file other users may read):
    /// logged by `serve` at start and reload, printed by `check`.
    pub warnings: Vec<Problem>,
}

impl Config {
    /// Logs [`Config::warnings`], one line each.
    pub fn log_warnings(&self) {
        for w in &self.warnings {
            tracing::warn!("{w}");
        }
    }
}

/// Process-wide limits and timings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gateway {
    /// How long in-flight connections may run on after SIGTERM.
    pub shutdown_grace: Duration,
    /// How long an upstream connect may take.
    pub connect_timeout: Duration,
    /// Most proxied connections at once, over every service (each also has
    /// its own cap, [`Service::max_connections`]).
    pub max_connections: usize,
    /// How long a blackholed connection is held before it is closed.
    pub blackhole_hold: Duration,
    /// Most blackholed connections at once; past it, new ones are refused.
    pub max_blackholed: usize,
    /// Most knock attempts in progress at once.
    pub max_knock_attempts: usize,
    /// How knock steps and the SPA port are observed.
    pub sensor: Sensor,
}

/// How knock steps and the SPA port are observed (`gateway.sensor`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sensor {
    /// Bound sockets: needs nothing, but the ports answer unlike unused ones.
    #[default]
    Socket,
    /// Raw sockets (CAP_NET_RAW): nothing is bound, the ports answer like
    /// unused ones, and other ports a knocking source touches reset it.
    Raw,
    /// Raw when CAP_NET_RAW is held, else socket (with a warning).
    Auto,
}

impl Sensor {
    pub fn as_str(self) -> &'static str {
        match self {
            Sensor::Socket => "socket",
            Sensor::Raw => "raw",
            Sensor::Auto => "auto",
        }
    }
}

impl Default for Gateway {
    fn default() -> Self {
        Self {
            shutdown_grace: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            max_connections: 10_000,
            blackhole_hold: Duration::from_secs(30),
            max_blackholed: 1_024,
            max_knock_attempts: 65_536,
            sensor: Sensor::Socket,
        }
    }
}

/// What an unauthorised guarded connection gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unauthorized {
    /// TCP: while no grant of the service is active, bound but not
    /// listening (a SYN gets a reset, as on an unused port); while one
    /// is, as `Refuse`. The default.
    Closed,
    /// TCP: a kernel filter on the listener drops SYNs from sources
    /// without a grant (no answer at all). Needs CAP_NET_ADMIN; without
    /// it the service runs as `Closed`.
    Dark,
    /// Accept, then reset at once.
    Refuse,
    /// Accept and hold silently until `blackhole_hold` runs out.
    Blackhole,
    /// Audit mode: pass, and log that it would have been denied.
    Allow,
}

impl Unauthorized {
    pub const ALL: [Unauthorized; 5] = [
        Unauthorized::Closed,
        Unauthorized::Dark,
        Unauthorized::Refuse,
        Unauthorized::Blackhole,
        Unauthorized::Allow,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Unauthorized::Closed => "closed",
            Unauthorized::Dark => "dark",
            Unauthorized::Refuse => "refuse",
            Unauthorized::Blackhole => "blackhole",
            Unauthorized::Allow => "allow",
        }
    }
}

/// One guarded service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: Arc<str>,
    pub listen: SocketAddr,
    /// `host:port`; resolved at connect time so DNS names follow changes.
    pub upstream: Arc<str>,
    pub protocol: Proto,
    pub unauthorized: Unauthorized,
    pub open_for: Duration,
    pub knock: Option<KnockRule>,
    /// Trap ports to pick for `knock` when the gateway binds
    /// (`trap_ports = { count = N }`); 0 when they are listed. Once picked
    /// they are in `knock.trap`.
    pub pick_traps: usize,
    /// A rotating knock sequence (`knock = { totp = { ... } }`), instead of
    /// `knock`.
    pub totp: Option<crate::totp::Rule>,
    /// Users whose SPA packets may open this service.
    pub spa_users: Vec<Arc<str>>,
    pub spa: ServiceSpa,
    /// Most proxied connections of this service at once (TCP); by default
    /// an equal share of `gateway.max_connections`, so one service at its
    /// cap leaves the others theirs.
    pub max_connections: usize,
    /// Connection settings; used by TCP services only.
    pub tcp: TcpConnections,
    /// Session settings; used by UDP services only.
    pub udp: UdpSessions,
    /// PROXY protocol in and out, and the static allow/deny lists (TCP).
    pub sources: SourceRules,
}

/// How a UDP service keeps its per-client sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpSessions {
    /// A session ends after this long without a datagram either way.
    pub idle_timeout: Duration,
    /// Most sessions of the service at once; past it new ones are refused.
    pub max_sessions: usize,
    /// Most sessions of one source address at once.
    pub max_sessions_per_source: usize,
    /// Sessions one source address may open per second, after a burst of
    /// `max_sessions_per_source`.
    pub session_open_rate: u32,
}

impl Default for UdpSessions {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(60),
            max_sessions: 10_000,
            // Each session holds a descriptor (its upstream socket), and a
            // granted address can forge any number of source ports.
            max_sessions_per_source: 32,
            session_open_rate: 8,
        }
    }
}

/// One thing wrong with a config, at a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in a config.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(f, "{n} problem{} in the config", if n == 1 { "" } else { "s" })?;
        for p in &self.problems {
            write!(f, "\n  {p}")?;
        }
        Ok(())
    }
}

impl ConfigError {
    /// The problems as a JSON array of `{"key": ..., "message": ...}`: the
    /// `problems` field of the log line that reports an invalid config, at
    /// start-up and at reload alike, and `check --format json`'s errors.
    pub fn to_json(&self) -> serde_json::Value {
        problems_json(&self.problems)
    }

    fn one(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            problems: vec![Problem {
                path: path.into(),
                message: message.into(),
            }],
        }
    }
}

/// `problems` as a JSON array of `{"key": ..., "message": ...}` (`key` is
/// the key path, empty for the file as a whole).
pub fn problems_json(problems: &[Problem]) -> serde_json::Value {
    problems
        .iter()
        .map(|p| serde_json::json!({ "key": p.path, "message": p.message }))
        .collect()
}

/// Reads the file at `path` and overlays the process environment.
pub fn load(path: &Path) -> Result<RawConfig, ConfigError> {
    load_with_env(path, std::env::vars().collect())
}

/// Reads the file at `path` and overlays `env` (only `PORTCULLIS__*` keys
/// are used).
pub fn load_with_env(path: &Path, env: HashMap<String, String>) -> Result<RawConfig, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::one("", format!("cannot read {}: {e}", path.display())))?;
    load_str(&text, &path.display().to_string(), env)
}

/// [`load_with_env`] on TOML text already read; `origin` names it in
/// errors. Pure: reads no file (validation does, for the files the config
/// names).
pub fn load_str(text: &str, origin: &str, env: HashMap<String, String>) -> Result<RawConfig, ConfigError> {
    let overrides = origin::env_overrides(&env);
    // Keys the environment overrides are matched lowercase, so names in the
    // file must be too; checked in validation with a clear message.
    let built = ::config::Config::builder()
        .add_source(::config::File::from_str(text, ::config::FileFormat::Toml))
        .add_source(
            ::config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator(ENV_SEPARATOR)
                .separator(ENV_SEPARATOR)
                .source(Some(env.into_iter().collect())),
        )
        .build()
        .map_err(|e| ConfigError::one("", format!("{origin}: {e}")))?;
    let mut raw: RawConfig = serde_path_to_error::deserialize(built).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        let mut err = ConfigError::one(path, origin::suggest(&e.into_inner().to_string()));
        origin::attribute(&mut err.problems, &overrides);
        err
    })?;
    raw.env = overrides;
    Ok(raw)
}

/// Loads and validates the config at `path` with the process environment,
/// and fits its caps to the process's descriptor limit ([`budget::fit`]).
pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
    from_raw(&load(path)?, path)
}

/// [`from_file`] on a config already loaded from `path`.
pub fn from_raw(raw: &RawConfig, path: &Path) -> Result<Config, ConfigError> {
    let mut config = validate_in(raw, &base_dir(path))?;
    budget::fit(raw, &mut config, budget::descriptor_limit()).map_err(|mut e| {
        origin::attribute(&mut e.problems, &raw.env);
        e
    })?;
    Ok(config)
}

/// Turns a raw config into runtime types, or reports every problem.
pub fn validate(raw: &RawConfig) -> Result<Config, ConfigError> {
    validate_in(raw, Path::new(""))
}

/// [`validate`], resolving relative paths in the config (TLS files, token
/// files) from `base` (see [`base_dir`]) and reading the files they name.
pub fn validate_in(raw: &RawConfig, base: &Path) -> Result<Config, ConfigError> {
    let mut v = Validator {
        base: base.to_path_buf(),
        ..Validator::default()
    };
    let gateway = v.gateway(&raw.gateway);
    let admin = raw.admin.as_ref().and_then(|a| v.admin(a));
    let limits = v.limits(&raw.limits);
    let spa = raw.spa.as_ref().and_then(|s| v.spa(s));
    let state = v.state(&raw.state);
    let mut users = Vec::new();
    for (name, u) in &raw.user {
        if let Some(u) = v.user(name, u) {
            users.push(u);
        }
    }
    let mut services = Vec::new();
    for (name, svc) in &raw.service {
        if let Some(s) = v.service(name, svc) {
            services.push(s);
        }
    }
    if raw.service.is_empty() {
        v.problem(
            "service",
            "no services: add a [service.NAME] table with listen, upstream and knock",
        );
    }
    budget::share_connections(raw, &gateway, &mut services);
    v.endpoints(&services);
    if let Some(a) = &admin {
        v.admin_endpoint(a, &services);
    }
    let user_names: Vec<&str> = raw.user.keys().map(String::as_str).collect();
    v.spa_users(&services, &users, spa.as_ref(), &user_names);
    if let Some(s) = &spa {
        v.spa_endpoint(s, &services);
        if gateway.sensor == Sensor::Raw && s.listen.port() == 0 {
            v.problem(
                "spa.listen",
                "the raw sensor watches a fixed port, and port 0 names none: give the SPA port",
            );
        }
    }
    if v.problems.is_empty() {
        Ok(Config {
            gateway,
            admin,
            limits,
            spa,
            state,
            services,
            users,
            descriptors: None,
            warnings: v.warnings,
        })
    } else {
        let mut problems = v.problems;
        origin::attribute(&mut problems, &raw.env);
        Err(ConfigError { problems })
    }
}

/// The longest duration any setting takes: longer ones are typos or jokes,
/// and would overflow the gate's clock arithmetic.
pub const MAX_DURATION: Duration = Duration::from_secs(31_557_600); // humantime's "1year"

/// Parses a human duration such as `30s`, `500ms` or `1m 30s`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|_| format!("{text:?} is not a duration: write it like \"30s\", \"500ms\" or \"2m\""))
}

#[derive(Default)]
struct Validator {
    problems: Vec<Problem>,
    warnings: Vec<Problem>,
    /// Where relative paths are resolved from.
    base: PathBuf,
}

impl Validator {
    fn problem(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            path: path.into(),
            message: message.into(),
        });
    }

    /// Something that works but should not be so: kept in the config for
    /// whoever loaded it to report ([`Config::log_warnings`], `check`).
    fn warning(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.warnings.push(Problem {
            path: path.into(),
            message: message.into(),
        });
    }

    fn duration(&mut self, path: &str, value: Option<&String>, default: Duration) -> Duration {
        self.duration_at_most(path, value, default, MAX_DURATION)
    }

    /// A duration longer than zero and at most `max` (named in the error
    /// the way it was configured, e.g. "1year").
    fn duration_at_most(&mut self, path: &str, value: Option<&String>, default: Duration, max: Duration) -> Duration {
        let Some(text) = value else { return default };
        match parse_duration(text) {
            Ok(d) if d.is_zero() => {
                self.problem(path, "must be longer than zero");
                default
            }
            Ok(d) if d > max => {
                self.problem(
                    path,
                    format!("{text:?} is too long: at most {}", humantime::format_duration(max)),
                );
                default
            }
            Ok(d) => d,
            Err(e) => {
                self.problem(path, e);
                default
            }
        }
    }

    fn count(&mut self, path: &str, value: Option<&RawCount>, default: usize) -> usize {
        let parsed = match value {
            None => return default,
            Some(RawCount::Int(n)) => usize::try_from(*n).map_err(|_| format!("{n} is not a count")),
            Some(RawCount::Text(t)) => t
                .trim()
                .parse::<usize>()
                .map_err(|_| format!("{t:?} is not a whole number")),
        };
        match parsed {
            Ok(0) => {
                self.problem(path, "must be at least 1");
                default
            }
            Ok(n) => n,
            Err(e) => {
                self.problem(path, e);
                default
            }
        }
    }

    fn gateway(&mut self, raw: &RawGateway) -> Gateway {
        let d = Gateway::default();
        Gateway {
            shutdown_grace: self.duration("gateway.shutdown_grace", raw.shutdown_grace.as_ref(), d.shutdown_grace),
            connect_timeout: self.duration(
                "gateway.connect_timeout",
                raw.connect_timeout.as_ref(),
                d.connect_timeout,
            ),
            max_connections: self.count(
                "gateway.max_connections",
                raw.max_connections.as_ref(),
                d.max_connections,
            ),
            blackhole_hold: self.duration("gateway.blackhole_hold", raw.blackhole_hold.as_ref(), d.blackhole_hold),
            max_blackholed: self.count("gateway.max_blackholed", raw.max_blackholed.as_ref(), d.max_blackholed),
            max_knock_attempts: self.count(
                "gateway.max_knock_attempts",
                raw.max_knock_attempts.as_ref(),
                d.max_knock_attempts,
            ),
            sensor: self.sensor(raw.sensor.as_deref(), d.sensor),
        }
    }

    fn sensor(&mut self, raw: Option<&str>, default: Sensor) -> Sensor {
        match raw.map(str::trim) {
            None => default,
            Some("socket") => Sensor::Socket,
            Some("raw") => Sensor::Raw,
            Some("auto") => Sensor::Auto,
            Some(other) => {
                self.problem("gateway.sensor", format!("{other:?} is not socket, raw or auto"));
                default
            }
        }
    }

    fn service(&mut self, name: &str, raw: &RawService) -> Option<Service> {
        let base = format!("service.{name}");
        let before = self.problems.len();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        {
            self.problem(
                &base,
                "service names are lowercase letters, digits, '-' and '_' (environment overrides match keys in lowercase)",
            );
        }
        let listen = match raw.listen.as_deref() {
            None => {
                self.problem(
                    format!("{base}.listen"),
                    "missing: the address to guard, e.g. \"0.0.0.0:5432\"",
                );
                None
            }
            Some(text) => match text.trim().parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    self.problem(
                        format!("{base}.listen"),
                        format!("{text:?} is not IP:PORT (e.g. \"0.0.0.0:5432\" or \"[::]:5432\")"),
                    );
                    None
                }
            },
        };
        let upstream = match raw.upstream.as_deref() {
            None => {
                self.problem(
                    format!("{base}.upstream"),
                    "missing: where to send granted connections, e.g. \"127.0.0.1:15432\"",
                );
                None
            }
            Some(text) => match check_upstream(text.trim()) {
                Ok(()) => Some(Arc::<str>::from(text.trim())),
                Err(e) => {
                    self.problem(format!("{base}.upstream"), e);
                    None
                }
            },
        };
        let protocol = match raw.protocol.as_deref().map(str::trim) {
            None | Some("tcp") => Proto::Tcp,
            Some("udp") => Proto::Udp,
            Some(other) => {
                self.problem(
                    format!("{base}.protocol"),
                    format!("{other:?} is not a protocol: use \"tcp\" or \"udp\""),
                );
                Proto::Tcp
            }
        };
        let udp = self.udp_sessions(&base, raw, protocol);
        let tcp = self.tcp_connections(&base, raw, protocol);
        let max_connections = self.service_connections(&base, raw, protocol);
        let unauthorized = match raw.unauthorized.as_deref().map(str::trim) {
            None | Some("closed") => Unauthorized::Closed,
            Some("dark") => Unauthorized::Dark,
            Some("refuse") => Unauthorized::Refuse,
            Some("blackhole") => Unauthorized::Blackhole,
            Some("allow") => Unauthorized::Allow,
            Some(other) => {
                self.problem(
                    format!("{base}.unauthorized"),
                    format!(
                        "{other:?} is not a mode: use \"closed\", \"dark\", \"refuse\", \"blackhole\" or \"allow\""
                    ),
                );
                Unauthorized::Closed
            }
        };
        let open_for = self.duration(
            &format!("{base}.open_for"),
            raw.open_for.as_ref(),
            Duration::from_secs(30),
        );
        let mut totp = None;
        let (knock, pick_traps) = match (&raw.knock, listen) {
            (Some(k), Some(listen)) if k.totp.is_some() => {
                let t = k.totp.as_ref().expect("matched is_some");
                totp = self.totp(&format!("{base}.knock"), k, t, (name, listen.ip(), open_for));
                (None, 0)
            }
            (Some(k), Some(listen)) => match self.knock(&format!("{base}.knock"), k, listen.ip()) {
                Some((rule, pick)) => (Some(rule), pick),
                None => (None, 0),
            },
            (Some(_), None) => (None, 0),
            (None, _) if unauthorized == Unauthorized::Allow || !raw.spa_users.is_empty() => (None, 0),
            (None, _) => {
                self.problem(
                    &base,
                    "no way in: add knock = { sequence = [...] } or spa_users = [...] (or set unauthorized = \"allow\" to audit)",
                );
                (None, 0)
            }
        };
        let spa = self.service_spa(&base, raw, open_for);
        let sources = self.source_rules(&base, raw, protocol, unauthorized);
        if self.problems.len() > before {
            return None;
        }
        Some(Service {
            name: name.into(),
            listen: listen?,
            upstream: upstream?,
            protocol,
            unauthorized,
            open_for,
            knock,
            pick_traps,
            totp,
            spa_users: raw.spa_users.iter().map(|u| Arc::from(u.trim())).collect(),
            spa: spa?,
            max_connections,
            tcp,
            udp,
            sources,
        })
    }
}

fn check_upstream(text: &str) -> Result<(), String> {
    if text.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    match text.rsplit_once(':') {
        Some((host, port))
            if !host.is_empty()
                && !host.contains(['/', ' ', '[', ']'])
                && port.parse::<u16>().is_ok_and(|p| p != 0) =>
        {
            Ok(())
        }
        _ => Err(format!(
            "{text:?} is not HOST:PORT (e.g. \"127.0.0.1:5432\" or \"db.internal:5432\")"
        )),
    }
}

/// The effective config as TOML, for `portcullis config`.
pub fn render(raw: &RawConfig) -> String {
    toml::to_string_pretty(raw).unwrap_or_else(|e| format!("# cannot render the config: {e}\n"))
}

/// Where relative paths in a config file are resolved from.
pub fn base_dir(path: &Path) -> PathBuf {
    path.parent().map(Path::to_path_buf).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::step::Step;
    use std::io::Write;
    use std::net::IpAddr;

    const ECHO: &str = r#"
[service.echo]
listen = "127.0.0.1:15000"
upstream = "127.0.0.1:15001"
protocol = "tcp"
unauthorized = "refuse"
open_for = "10s"
knock = { sequence = ["17001/udp", "17003/udp", "17002/udp"], step_timeout = "5s", sequence_timeout = "15s" }
"#;

    fn load_str(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        validate(&load_with_env(f.path(), env)?)
    }

    fn paths(err: ConfigError) -> Vec<String> {
        err.problems.into_iter().map(|p| p.path).collect()
    }

    #[test]
    fn the_sensor_is_socket_unless_the_config_says_raw_or_auto() {
        assert_eq!(load_str(ECHO, &[]).unwrap().gateway.sensor, Sensor::Socket);
        for (text, want) in [
            ("raw", Sensor::Raw),
            ("auto", Sensor::Auto),
            (" socket ", Sensor::Socket),
        ] {
            let c = load_str(ECHO, &[("PORTCULLIS__GATEWAY__SENSOR", text)]).unwrap();
            assert_eq!(c.gateway.sensor, want, "{text:?}");
        }
        let err = load_str(ECHO, &[("PORTCULLIS__GATEWAY__SENSOR", "pcap")]).unwrap_err();
        assert_eq!(paths(err), vec!["gateway.sensor"]);
    }

    #[test]
    fn the_issue_config_is_accepted_as_written() {
        let c = load_str(ECHO, &[]).unwrap();
        let s = &c.services[0];
        assert_eq!(&*s.name, "echo");
        assert_eq!(s.listen, "127.0.0.1:15000".parse().unwrap());
        assert_eq!(&*s.upstream, "127.0.0.1:15001");
        assert_eq!(s.open_for, Duration::from_secs(10));
        let k = s.knock.as_ref().unwrap();
        let ports: Vec<u16> = k.sequence.iter().map(|s| s.addr.port()).collect();
        assert_eq!(ports, vec![17001, 17003, 17002]);
        assert!(k
            .sequence
            .iter()
            .all(|s| s.proto == Proto::Udp && s.addr.ip() == s.addr.ip()));
        assert_eq!(k.sequence[0].addr.ip(), "127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(k.step_timeout, Duration::from_secs(5));
        assert_eq!(k.sequence_timeout, Duration::from_secs(15));
    }

    #[test]
    fn environment_overrides_one_field_of_one_service() {
        let c = load_str(
            ECHO,
            &[
                ("PORTCULLIS__SERVICE__ECHO__OPEN_FOR", "5s"),
                ("PORTCULLIS__SERVICE__ECHO__KNOCK__STEP_TIMEOUT", "2s"),
                ("PORTCULLIS__GATEWAY__MAX_CONNECTIONS", "7"),
                ("UNRELATED", "x"),
            ],
        )
        .unwrap();
        assert_eq!(c.services[0].open_for, Duration::from_secs(5));
        assert_eq!(
            c.services[0].knock.as_ref().unwrap().step_timeout,
            Duration::from_secs(2)
        );
        assert_eq!(c.services[0].upstream.as_ref(), "127.0.0.1:15001");
        assert_eq!(c.gateway.max_connections, 7);
    }

    #[test]
    fn absurd_durations_are_refused_with_their_key_path() {
        let err = load_str(
            r#"
[gateway]
blackhole_hold = "2years"
[spa]
listen = "127.0.0.1:0"
max_age = "25h"
[service.a]
listen = "127.0.0.1:1"
upstream = "127.0.0.1:2"
open_for = "400000000000y"
knock = { sequence = ["9000/udp", "7000/udp", "8000/udp"], step_timeout = "366days" }
"#,
            &[],
        )
        .unwrap_err();
        let got = paths(err.clone());
        for want in [
            "gateway.blackhole_hold",
            "spa.max_age",
            "service.a.open_for",
            "service.a.knock.step_timeout",
        ] {
            assert!(got.iter().any(|p| p == want), "{want} missing from {err}");
        }
        assert!(err.to_string().contains("too long: at most 1year"), "{err}");
        // The longest allowed value passes.
        let ok = load_str(
            "[service.a]\nlisten = \"127.0.0.1:1\"\nupstream = \"127.0.0.1:2\"\nopen_for = \"365days\"\nknock = { sequence = [\"9000/udp\", \"7000/udp\", \"8000/udp\"] }\n",
            &[],
        );
        assert!(ok.is_ok(), "{:?}", ok.err());
    }

    #[test]
    fn every_problem_is_reported_with_its_key_path() {
        let err = load_str(
            r#"
[gateway]
shutdown_grace = "soon"

[service.a]
listen = "nowhere"
upstream = "127.0.0.1"
unauthorized = "maybe"
open_for = "0s"
knock = { sequence = ["7000/udp", "8000/udp", "9000/udp"] }

[service.b]
listen = "127.0.0.1:1"
upstream = "127.0.0.1:2"
knock = { sequence = ["7000/udp", "7000/udp"], step_timeout = "x" }

[service.c]
listen = "127.0.0.1:3"
upstream = "127.0.0.1:4"
knock = { sequence = ["9/udp", "7/udp", "7/udp", "8/icmp"], trap_ports = [9] }
"#,
            &[],
        )
        .unwrap_err();
        let got = paths(err.clone());
        for want in [
            "gateway.shutdown_grace",
            "service.a.listen",
            "service.a.upstream",
            "service.a.unauthorized",
            "service.a.open_for",
            "service.b.knock.sequence",
            "service.b.knock.step_timeout",
            "service.c.knock.sequence[3]",
        ] {
            assert!(got.iter().any(|p| p == want), "{want} missing from {err}");
        }
    }

    #[test]
    fn monotonic_short_and_repeating_sequences_are_rejected() {
        let cases = [
            (r#"["7000/udp", "8000/udp", "9000/udp"]"#, "ascend"),
            (r#"["9000/udp", "8000/udp", "7000/udp"]"#, "descend"),
            (r#"["7000/udp", "9000/udp"]"#, "at least 3"),
            (r#"["7000/udp", "9000/udp", "9000/udp", "8000/udp"]"#, "repeats"),
        ];
        for (seq, needle) in cases {
            let text = format!(
                "[service.s]\nlisten = \"127.0.0.1:1\"\nupstream = \"127.0.0.1:2\"\nknock = {{ sequence = {seq} }}\n"
            );
            let err = load_str(&text, &[]).unwrap_err();
            assert!(
                err.problems
                    .iter()
                    .any(|p| p.path.starts_with("service.s.knock.sequence") && p.message.contains(needle)),
                "{seq}: {err}"
            );
        }
    }

    #[test]
    fn trap_ports_in_the_sequence_are_rejected() {
        let err = load_str(
            "[service.s]\nlisten = \"127.0.0.1:1\"\nupstream = \"127.0.0.1:2\"\nknock = { sequence = [\"5/udp\", \"7/udp\", \"6/udp\"], trap_ports = [\"7/udp\", \"8/udp\"] }\n",
            &[],
        )
        .unwrap_err();
        assert_eq!(paths(err), vec!["service.s.knock.trap_ports[0]"]);
    }

    #[test]
    fn colliding_endpoints_are_rejected_and_shared_knock_ports_are_not() {
        let ok = load_str(
            r#"
[service.a]
listen = "127.0.0.1:1"
upstream = "127.0.0.1:2"
knock = { sequence = ["5/udp", "7/udp", "6/udp"] }
[service.b]
listen = "127.0.0.1:3"
upstream = "127.0.0.1:4"
knock = { sequence = ["5/udp", "8/udp", "6/udp"] }
"#,
            &[],
        );
        assert!(ok.is_ok(), "{ok:?}");
        let err = load_str(
            r#"
[service.a]
listen = "0.0.0.0:1"
upstream = "127.0.0.1:2"
knock = { sequence = ["5/udp", "7/udp", "6/udp"] }
[service.b]
listen = "127.0.0.1:1"
upstream = "127.0.0.1:4"
knock = { sequence = ["5/udp", "1/tcp", "6/udp"] }
"#,
            &[],
        )
        .unwrap_err();
        let got = paths(err);
        assert!(got.contains(&"service.b.listen".to_string()), "{got:?}");
        assert!(got.contains(&"service.b.knock.sequence".to_string()), "{got:?}");
    }

    #[test]
    fn the_state_dir_has_a_system_default_and_is_set_by_file_or_environment() {
        assert_eq!(load_str(ECHO, &[]).unwrap().state.dir, Path::new(DEFAULT_STATE_DIR));
        let file = format!("[state]\ndir = \"/srv/portcullis\"\n{ECHO}");
        assert_eq!(load_str(&file, &[]).unwrap().state.dir, Path::new("/srv/portcullis"));
        let env = [("PORTCULLIS__STATE__DIR", "/tmp/pc-state")];
        assert_eq!(load_str(&file, &env).unwrap().state.dir, Path::new("/tmp/pc-state"));
        // Relative to the config file's directory, like every other path.
        let raw: RawConfig = toml::from_str(&format!("[state]\ndir = \"state\"\n{ECHO}")).unwrap();
        let c = validate_in(&raw, Path::new("/etc/portcullis")).unwrap();
        assert_eq!(c.state.dir, Path::new("/etc/portcullis/state"));
        let err = load_str(&format!("[state]\ndir = \" \"\n{ECHO}"), &[]).unwrap_err();
        assert_eq!(paths(err), ["state.dir"]);
    }

    #[test]
    fn unknown_keys_are_named_with_their_path() {
        let err = load_str(&format!("{ECHO}\nbogus = 1\n"), &[]).unwrap_err();
        assert_eq!(err.problems[0].path, "service.echo.bogus");
        assert!(err.problems[0].message.contains("bogus"), "{err}");
    }

    #[test]
    fn steps_take_the_service_address_unless_they_name_one() {
        let c = load_str(
            "[service.s]\nlisten = \"[::1]:1\"\nupstream = \"[::1]:2\"\nknock = { sequence = [\"5/udp\", \"127.0.0.9:7/udp\", 6] }\n",
            &[],
        )
        .unwrap();
        let seq = &c.services[0].knock.as_ref().unwrap().sequence;
        assert_eq!(seq[0].addr, "[::1]:5".parse().unwrap());
        assert_eq!(seq[1].addr, "127.0.0.9:7".parse().unwrap());
        assert_eq!(
            seq[2],
            Step {
                proto: Proto::Tcp,
                addr: "[::1]:6".parse().unwrap()
            }
        );
    }
}
