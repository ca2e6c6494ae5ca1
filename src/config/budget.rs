//! The descriptor budget: what a config's caps cost in file descriptors,
//! fitted to the process's limit (`RLIMIT_NOFILE`, which `serve` and
//! `check` first raise from the soft to the hard limit).
//!
//! Every cap that holds descriptors is counted: two per proxied connection
//! (client and upstream), one per blackholed connection, one per UDP
//! session (its upstream socket), two per pooled pipe, one per listener,
//! one per connection whose PROXY header is being read,
//! the admin endpoint's connections, and a fixed allowance for the runtime
//! (stdio, epoll, signals, the replay cache, `/proc` reads, the reserve
//! descriptor the accept loop sheds with). A cap the config sets must fit,
//! or the config is refused with the cap's key path; a cap it leaves out
//! is derived from what is left (never above its default). So a gateway
//! under a low limit refuses connections past its caps instead of failing
//! `accept()` for everyone, the admin endpoint included.
//!
//! Also here: the validation of the per-service caps (`max_connections`,
//! the UDP session settings), which the budget is made of.

use super::raw::{RawConfig, RawService};
use super::{Config, ConfigError, Gateway, Problem, Service, UdpSessions, Validator};
use crate::step::Proto;

/// Descriptors the runtime holds whatever the config: stdio, epoll and its
/// eventfd, the signal pipe, the replay cache and state files, the `/proc`
/// files the process metrics read, DNS look-ups, the reserve descriptor,
/// and room for connections between `accept()` and their decision.
/// Measured at rest with one service: 17 open (`process_open_fds`).
pub const RUNTIME: u64 = 48;

/// Descriptors the admin endpoint may hold: its connection cap, the probe
/// reserve and the connections waiting for an eviction (see `admin`).
pub const ADMIN: u64 = 96;

/// Descriptors the raw sensor holds instead of knock listeners.
pub const RAW_SENSOR: u64 = 4;

/// Most pipes the splice pool ever holds at once (two descriptors each).
pub const MAX_PIPES: u64 = 256;

/// Share of the descriptor limit the pipe pool may use: a bulk transfer can
/// always fall back to a userspace copy, a connection without a descriptor
/// is refused.
pub const PIPE_SHARE_DIVISOR: u64 = 16;

/// The pipes the splice pool may hold under a descriptor limit of `limit`.
pub fn pipes(limit: u64) -> u64 {
    MAX_PIPES.min(limit / PIPE_SHARE_DIVISOR / 2)
}

/// Limits above this are taken as this (`RLIM_INFINITY` where a system
/// reports one): far beyond any cap's default, and the budget's products
/// stay far from overflowing.
const MAX_LIMIT: u64 = 1 << 40;

/// What a config's caps cost, and the limit they were fitted to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptors {
    /// The soft `RLIMIT_NOFILE` the caps were fitted to.
    pub limit: u64,
    /// Runtime, listeners and the admin endpoint.
    pub fixed: u64,
    /// The splice pool (two per pipe).
    pub pipes: u64,
    /// Proxied connections (two each, `gateway.max_connections`).
    pub connections: u64,
    /// Blackholed connections (`gateway.max_blackholed`).
    pub blackholed: u64,
    /// UDP sessions, over every UDP service.
    pub udp_sessions: u64,
    /// Key paths whose value was derived from the limit, lowest first.
    pub derived: Vec<String>,
}

impl Descriptors {
    /// Everything the caps may hold at once.
    pub fn needed(&self) -> u64 {
        self.fixed + self.pipes + self.connections + self.blackholed + self.udp_sessions
    }
}

/// The process's soft descriptor limit now (1024 when it cannot be read).
pub fn descriptor_limit() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| soft)
        .unwrap_or(1024)
}

/// Raises the soft descriptor limit to the hard one; returns (soft, hard)
/// as they are afterwards. Nothing to undo: the limit is the process's own.
pub fn raise_descriptor_limit() -> std::io::Result<(u64, u64)> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(getrlimit(Resource::RLIMIT_NOFILE)?)
}

/// Descriptors a config's listeners hold (an upper bound: knock ports
/// shared by services are counted once per service).
fn listeners(config: &Config) -> u64 {
    let raw = config.gateway.sensor == super::Sensor::Raw;
    let mut n = config.services.len() as u64;
    if raw {
        n += RAW_SENSOR;
    } else {
        for s in &config.services {
            if let Some(k) = &s.knock {
                n += (k.sequence.len() + k.trap.len().max(s.pick_traps)) as u64;
            }
            if let Some(t) = &s.totp {
                n += t.pool.len() as u64;
            }
        }
    }
    // SPA over TCP or HTTP: the listener and the connections being read.
    let streams = config
        .spa
        .iter()
        .flat_map(|spa| [spa.tcp_listen, spa.http_listen])
        .flatten()
        .count() as u64;
    let per_stream = 1 + crate::sensor::spa_stream::MAX_OPEN as u64;
    // Connections from balancers while their PROXY header is read.
    if config
        .services
        .iter()
        .any(|s| !s.sources.accept_proxy_protocol.is_empty())
    {
        n += crate::proxy::MAX_AWAITING_HEADER as u64;
    }
    n + u64::from(config.spa.is_some()) + streams * per_stream + u64::from(config.admin.is_some())
}

/// One cap the budget derives when the config leaves it out.
struct Derived<'a> {
    path: String,
    /// Share of what is left, relative to the others'.
    weight: u64,
    /// Descriptors per unit of the cap.
    cost: u64,
    default: usize,
    value: &'a mut usize,
}

/// Checks `config`'s caps against a descriptor limit of `limit` and derives
/// those `raw` leaves out; records the result in `config.descriptors`.
/// A config whose set caps cannot fit, or that leaves no room for one it
/// does not set, is refused with those caps' key paths.
pub fn fit(raw: &RawConfig, config: &mut Config, limit: u64) -> Result<(), ConfigError> {
    let fixed = RUNTIME + listeners(config) + if config.admin.is_some() { ADMIN } else { 0 };
    let pipes = 2 * pipes(limit);
    let defaults = Gateway::default();
    let mut explicit: Vec<(String, u64)> = Vec::new();
    let mut derived: Vec<Derived<'_>> = Vec::new();
    let gateway = &mut config.gateway;
    if raw.gateway.max_connections.is_some() {
        explicit.push((
            "gateway.max_connections".into(),
            (gateway.max_connections as u64).saturating_mul(2),
        ));
    } else {
        derived.push(Derived {
            path: "gateway.max_connections".into(),
            weight: 2,
            cost: 2,
            default: defaults.max_connections,
            value: &mut gateway.max_connections,
        });
    }
    if raw.gateway.max_blackholed.is_some() {
        explicit.push(("gateway.max_blackholed".into(), gateway.max_blackholed as u64));
    } else {
        derived.push(Derived {
            path: "gateway.max_blackholed".into(),
            weight: 1,
            cost: 1,
            default: defaults.max_blackholed,
            value: &mut gateway.max_blackholed,
        });
    }
    for s in config.services.iter_mut().filter(|s| s.protocol == Proto::Udp) {
        let path = format!("service.{}.max_sessions", s.name);
        if raw.service.get(&*s.name).is_some_and(|r| r.max_sessions.is_some()) {
            explicit.push((path, s.udp.max_sessions as u64));
        } else {
            derived.push(Derived {
                path,
                weight: 1,
                cost: 1,
                default: UdpSessions::default().max_sessions,
                value: &mut s.udp.max_sessions,
            });
        }
    }
    let set = explicit.iter().fold(0u64, |sum, (_, n)| sum.saturating_add(*n));
    // Far past any real limit, and no product below overflows.
    let room = limit.min(MAX_LIMIT).saturating_sub(fixed + pipes);
    let mut problems = Vec::new();
    if set > room {
        for (path, n) in &explicit {
            problems.push(Problem {
                path: path.clone(),
                message: format!(
                    "needs {n} descriptors, and the caps set need {set} in all where a limit of {limit} leaves {room} \
                     ({fixed} for listeners, the runtime and the admin endpoint, {pipes} for the splice pool): \
                     lower it, or raise the limit (ulimit -n, LimitNOFILE=)"
                ),
            });
        }
        return Err(ConfigError { problems });
    }
    // Caps whose share would pass their default take the default, and
    // what they leave is shared again among the others.
    let mut left = room - set;
    let mut pending = derived;
    loop {
        let weights: u64 = pending.iter().map(|d| d.weight).sum::<u64>().max(1);
        let fits = |d: &Derived<'_>| left * d.weight / weights / d.cost >= d.default as u64;
        if !pending.iter().any(fits) {
            break;
        }
        let (full, rest): (Vec<_>, Vec<_>) = pending.into_iter().partition(|d| fits(d));
        for d in full {
            left -= d.default as u64 * d.cost;
            *d.value = d.default;
        }
        pending = rest;
    }
    let weights: u64 = pending.iter().map(|d| d.weight).sum::<u64>().max(1);
    let mut paths = Vec::new();
    for d in pending {
        let share = left * d.weight / weights / d.cost;
        let n = usize::try_from(share).unwrap_or(usize::MAX).min(d.default);
        if n == 0 {
            problems.push(Problem {
                path: d.path.clone(),
                message: format!(
                    "a descriptor limit of {limit} leaves no room for it once {fixed} go to listeners, the runtime \
                     and the admin endpoint, {pipes} to the splice pool and {set} to the caps set: raise the limit \
                     (ulimit -n, LimitNOFILE=) or lower the caps set"
                ),
            });
            continue;
        }
        paths.push(d.path.clone());
        *d.value = n;
    }
    paths.sort();
    if !problems.is_empty() {
        return Err(ConfigError { problems });
    }
    share_connections(raw, &config.gateway, &mut config.services);
    config.descriptors = Some(Descriptors {
        limit,
        fixed,
        pipes,
        connections: (config.gateway.max_connections as u64).saturating_mul(2),
        blackholed: config.gateway.max_blackholed as u64,
        udp_sessions: config
            .services
            .iter()
            .filter(|s| s.protocol == Proto::Udp)
            .map(|s| s.udp.max_sessions as u64)
            .sum(),
        derived: paths,
    });
    Ok(())
}

/// Gives each TCP service that sets no `max_connections` an equal share of
/// `gateway.max_connections` (at least one), so a service at its cap never
/// holds the others' share.
pub(super) fn share_connections(raw: &RawConfig, gateway: &Gateway, services: &mut [Service]) {
    let tcp = services.iter().filter(|s| s.protocol == Proto::Tcp).count();
    let share = (gateway.max_connections / tcp.max(1)).max(1);
    for s in services.iter_mut().filter(|s| s.protocol == Proto::Tcp) {
        if raw.service.get(&*s.name).is_none_or(|r| r.max_connections.is_none()) {
            s.max_connections = share;
        }
    }
}

impl Validator {
    /// A TCP service's own connection cap, when set (else a placeholder
    /// that [`share_connections`] replaces).
    pub(super) fn service_connections(&mut self, base: &str, raw: &RawService, protocol: Proto) -> usize {
        if protocol == Proto::Udp {
            if raw.max_connections.is_some() {
                self.problem(
                    format!("{base}.max_connections"),
                    "applies to tcp services only: a udp service has max_sessions",
                );
            }
            return 1;
        }
        self.count(&format!("{base}.max_connections"), raw.max_connections.as_ref(), 1)
    }

    pub(super) fn udp_sessions(&mut self, base: &str, raw: &RawService, protocol: Proto) -> UdpSessions {
        let d = UdpSessions::default();
        if protocol == Proto::Tcp {
            for (key, set) in [
                ("max_sessions", raw.max_sessions.is_some()),
                ("max_sessions_per_source", raw.max_sessions_per_source.is_some()),
                ("session_open_rate", raw.session_open_rate.is_some()),
            ] {
                if set {
                    self.problem(
                        format!("{base}.{key}"),
                        "applies to udp services only: remove it or set protocol = \"udp\"",
                    );
                }
            }
            return d;
        }
        let rate = self.count(
            &format!("{base}.session_open_rate"),
            raw.session_open_rate.as_ref(),
            d.session_open_rate as usize,
        );
        UdpSessions {
            idle_timeout: self.duration(
                &format!("{base}.idle_timeout"),
                raw.idle_timeout.as_ref(),
                d.idle_timeout,
            ),
            max_sessions: self.count(
                &format!("{base}.max_sessions"),
                raw.max_sessions.as_ref(),
                d.max_sessions,
            ),
            max_sessions_per_source: self.count(
                &format!("{base}.max_sessions_per_source"),
                raw.max_sessions_per_source.as_ref(),
                d.max_sessions_per_source,
            ),
            session_open_rate: u32::try_from(rate).unwrap_or(u32::MAX),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> (RawConfig, Config) {
        let raw: RawConfig = toml::from_str(text).unwrap();
        let config = super::super::validate(&raw).unwrap();
        (raw, config)
    }

    const TWO: &str = r#"
[admin]
listen = "127.0.0.1:0"
[service.a]
listen = "127.0.0.1:1"
upstream = "127.0.0.1:2"
unauthorized = "blackhole"
knock = { sequence = ["9000/udp", "7000/udp", "8000/udp"] }
[service.b]
listen = "127.0.0.1:3"
upstream = "127.0.0.1:4"
knock = { sequence = ["9001/udp", "7001/udp", "8001/udp"] }
[service.u]
listen = "127.0.0.1:5"
upstream = "127.0.0.1:6"
protocol = "udp"
knock = { sequence = ["9002/udp", "7002/udp", "8002/udp"] }
"#;

    #[test]
    fn a_high_limit_keeps_every_default() {
        let (raw, mut c) = config(TWO);
        fit(&raw, &mut c, 1 << 20).unwrap();
        assert_eq!(c.gateway.max_connections, 10_000);
        assert_eq!(c.gateway.max_blackholed, 1_024);
        assert_eq!(c.services[2].udp.max_sessions, 10_000);
        let d = c.descriptors.unwrap();
        assert!(d.derived.is_empty(), "{:?}", d.derived);
        assert_eq!(d.pipes, 2 * MAX_PIPES);
        assert!(d.needed() <= 1 << 20);
    }

    #[test]
    fn a_low_limit_scales_the_defaults_down_to_fit() {
        let (raw, mut c) = config(TWO);
        fit(&raw, &mut c, 256).unwrap();
        let d = c.descriptors.clone().unwrap();
        // 3 services, 9 knock ports, the admin listener: 13 listeners.
        assert_eq!(d.fixed, RUNTIME + 13 + ADMIN);
        assert_eq!(d.pipes, 2 * (256 / 16 / 2));
        assert!(d.needed() <= 256, "{d:?}");
        let left = 256 - d.fixed - d.pipes;
        // Weights 2 (connections), 1 (blackholed), 1 (the UDP service).
        assert_eq!(c.gateway.max_connections as u64, left * 2 / 4 / 2);
        assert_eq!(c.gateway.max_blackholed as u64, left / 4);
        assert_eq!(c.services[2].udp.max_sessions as u64, left / 4);
        assert_eq!(
            d.derived,
            [
                "gateway.max_blackholed",
                "gateway.max_connections",
                "service.u.max_sessions"
            ]
        );
        // Each TCP service has half of the connections.
        assert_eq!(c.services[0].max_connections, c.gateway.max_connections / 2);
        assert_eq!(c.services[1].max_connections, c.gateway.max_connections / 2);
    }

    #[test]
    fn caps_set_come_first_and_the_rest_share_what_is_left() {
        let text = format!("[gateway]\nmax_blackholed = 20\n{TWO}");
        let (raw, mut c) = config(&text);
        fit(&raw, &mut c, 256).unwrap();
        let d = c.descriptors.clone().unwrap();
        assert_eq!(c.gateway.max_blackholed, 20);
        let left = 256 - d.fixed - d.pipes - 20;
        assert_eq!(c.gateway.max_connections as u64, left * 2 / 3 / 2);
        assert!(d.needed() <= 256);
    }

    #[test]
    fn what_a_cap_at_its_default_leaves_goes_to_the_others() {
        let (raw, mut c) = config(TWO);
        fit(&raw, &mut c, 20_000).unwrap();
        let d = c.descriptors.clone().unwrap();
        assert_eq!(c.gateway.max_blackholed, 1_024, "its share passes its default");
        let left = 20_000 - d.fixed - d.pipes - 1_024;
        assert_eq!(c.gateway.max_connections as u64, left * 2 / 3 / 2);
        assert_eq!(c.services[2].udp.max_sessions as u64, left / 3);
        assert_eq!(d.derived, ["gateway.max_connections", "service.u.max_sessions"]);
        assert!(d.needed() <= 20_000 && d.needed() > 19_990, "{d:?}");
    }

    #[test]
    fn caps_set_that_cannot_fit_are_named() {
        let text = format!("[gateway]\nmax_blackholed = 1024\nmax_connections = 10\n{TWO}");
        let (raw, mut c) = config(&text);
        let err = fit(&raw, &mut c, 256).unwrap_err();
        let paths: Vec<_> = err.problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(paths, ["gateway.max_connections", "gateway.max_blackholed"]);
        assert!(err.problems[1].message.contains("limit of 256"), "{err}");
        // The same caps fit a larger limit.
        let (raw, mut c) = config(&text);
        fit(&raw, &mut c, 4096).unwrap();
    }

    #[test]
    fn a_limit_too_low_for_anything_names_the_derived_caps() {
        let (raw, mut c) = config(TWO);
        let err = fit(&raw, &mut c, 128).unwrap_err();
        assert!(
            err.problems.iter().any(|p| p.path == "gateway.max_connections"),
            "{err}"
        );
    }

    #[test]
    fn a_service_cap_set_is_kept_and_the_others_share_the_global_cap() {
        let text = TWO.replace("[service.b]\n", "[service.b]\nmax_connections = 3\n");
        let (raw, c) = config(&format!("[gateway]\nmax_connections = 100\n{text}"));
        assert_eq!(c.services[0].max_connections, 50);
        assert_eq!(c.services[1].max_connections, 3);
        let _ = raw;
    }

    #[test]
    fn an_unlimited_limit_and_absurd_caps_do_not_overflow() {
        let (raw, mut c) = config(TWO);
        fit(&raw, &mut c, u64::MAX).unwrap();
        assert_eq!(c.gateway.max_connections, 10_000);
        let (raw, mut c) = config(&format!("[gateway]\nmax_connections = \"{}\"\n{TWO}", usize::MAX));
        let err = fit(&raw, &mut c, u64::MAX).unwrap_err();
        assert_eq!(err.problems[0].path, "gateway.max_connections");
    }

    #[test]
    fn the_pipe_pool_takes_a_sixteenth_of_the_limit() {
        assert_eq!(pipes(256), 8);
        assert_eq!(pipes(1024), 32);
        assert_eq!(pipes(1 << 20), MAX_PIPES);
    }
}
