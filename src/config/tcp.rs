//! How a TCP service manages its proxied connections: the idle timeout,
//! TCP keepalive on both sockets, and the cap on one source's connections
//! (`idle_timeout`, `keepalive`, `max_connections_per_source`).

use std::time::Duration;

use super::raw::RawService;
use super::Validator;
use crate::step::Proto;

/// Longest keepalive idle time: Linux takes `TCP_KEEPIDLE` in whole
/// seconds, at most 32767.
pub(super) const MAX_KEEPALIVE: Duration = Duration::from_secs(32_767);

/// Probes sent before a silent peer is given up: with probes every sixth
/// of the idle time, a vanished peer is detected about twice the idle time
/// after its last packet.
pub const KEEPALIVE_PROBES: u32 = 6;

/// A TCP service's connection settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpConnections {
    /// A connection that carries no byte either way for this long is
    /// closed both ways; `None`: never.
    pub idle_timeout: Option<Duration>,
    /// TCP keepalive idle time on the client and the upstream socket;
    /// `None`: off.
    pub keepalive: Option<Duration>,
    /// Most proxied connections of one source address at once; `None`: no
    /// cap but the service's.
    pub max_connections_per_source: Option<usize>,
}

impl Default for TcpConnections {
    fn default() -> Self {
        Self {
            // A transparent proxy does not cut a live peer that is merely
            // quiet (a psql session, an ssh shell): the operator opts in.
            // Peers that vanished are keepalive's job, on by default.
            idle_timeout: None,
            // Behind NAT a mapping is commonly dropped after a few minutes
            // of silence; a probe a minute keeps it and finds dead peers.
            keepalive: Some(Duration::from_secs(60)),
            // A grant is one address's, and offices share one behind NAT.
            max_connections_per_source: None,
        }
    }
}

impl TcpConnections {
    /// Time between keepalive probes once `idle` has passed.
    pub fn keepalive_interval(idle: Duration) -> Duration {
        (idle / KEEPALIVE_PROBES).max(Duration::from_secs(1))
    }
}

impl Validator {
    pub(super) fn tcp_connections(&mut self, base: &str, raw: &RawService, protocol: Proto) -> TcpConnections {
        let d = TcpConnections::default();
        if protocol == Proto::Udp {
            for (key, set) in [
                ("keepalive", raw.keepalive.is_some()),
                ("max_connections_per_source", raw.max_connections_per_source.is_some()),
            ] {
                if set {
                    self.problem(
                        format!("{base}.{key}"),
                        "applies to tcp services only: remove it or set protocol = \"tcp\"",
                    );
                }
            }
            return d;
        }
        let idle_timeout = raw.idle_timeout.as_ref().map(|_| {
            self.duration(
                &format!("{base}.idle_timeout"),
                raw.idle_timeout.as_ref(),
                Duration::ZERO,
            )
        });
        let keepalive = match raw.keepalive.as_deref().map(str::trim) {
            None => d.keepalive,
            Some("off") => None,
            Some(_) => {
                let path = format!("{base}.keepalive");
                let idle = self.duration_at_most(&path, raw.keepalive.as_ref(), Duration::ZERO, MAX_KEEPALIVE);
                if !idle.is_zero() && idle < Duration::from_secs(1) {
                    self.problem(
                        &path,
                        "must be at least 1s (TCP keepalive counts whole seconds), or \"off\"",
                    );
                }
                Some(idle)
            }
        };
        let max_connections_per_source = raw.max_connections_per_source.as_ref().map(|_| {
            self.count(
                &format!("{base}.max_connections_per_source"),
                raw.max_connections_per_source.as_ref(),
                1,
            )
        });
        TcpConnections {
            idle_timeout,
            keepalive,
            max_connections_per_source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validate(extra: &str) -> Result<TcpConnections, Vec<(String, String)>> {
        let text = format!(
            "[service.s]\nlisten = \"127.0.0.1:1\"\nupstream = \"127.0.0.1:2\"\nunauthorized = \"allow\"\n{extra}\n"
        );
        let raw: super::super::raw::RawConfig = toml::from_str(&text).unwrap();
        super::super::validate(&raw)
            .map(|c| c.services[0].tcp)
            .map_err(|e| e.problems.into_iter().map(|p| (p.path, p.message)).collect())
    }

    #[test]
    fn defaults_keep_quiet_connections_and_probe_them_every_minute() {
        let t = validate("").unwrap();
        assert_eq!(t, TcpConnections::default());
        assert_eq!(t.idle_timeout, None);
        assert_eq!(t.keepalive, Some(Duration::from_secs(60)));
        assert_eq!(t.max_connections_per_source, None);
        assert_eq!(
            TcpConnections::keepalive_interval(Duration::from_secs(60)),
            Duration::from_secs(10)
        );
        assert_eq!(
            TcpConnections::keepalive_interval(Duration::from_secs(2)),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn each_setting_is_read_and_keepalive_can_be_turned_off() {
        let t = validate("idle_timeout = \"5m\"\nkeepalive = \"30s\"\nmax_connections_per_source = 4").unwrap();
        assert_eq!(t.idle_timeout, Some(Duration::from_secs(300)));
        assert_eq!(t.keepalive, Some(Duration::from_secs(30)));
        assert_eq!(t.max_connections_per_source, Some(4));
        assert_eq!(validate("keepalive = \"off\"").unwrap().keepalive, None);
    }

    #[test]
    fn bad_values_are_refused_with_their_key_path() {
        for (extra, path, needle) in [
            ("idle_timeout = \"0s\"", "service.s.idle_timeout", "longer than zero"),
            ("idle_timeout = \"soon\"", "service.s.idle_timeout", "not a duration"),
            ("keepalive = \"500ms\"", "service.s.keepalive", "at least 1s"),
            ("keepalive = \"10h\"", "service.s.keepalive", "too long"),
            ("keepalive = \"on\"", "service.s.keepalive", "not a duration"),
            (
                "max_connections_per_source = 0",
                "service.s.max_connections_per_source",
                "at least 1",
            ),
            (
                "max_connections_per_source = -3",
                "service.s.max_connections_per_source",
                "not a count",
            ),
        ] {
            let problems = validate(extra).unwrap_err();
            assert!(
                problems.iter().any(|(p, m)| p == path && m.contains(needle)),
                "{extra}: {problems:?}"
            );
        }
    }

    #[test]
    fn the_tcp_settings_are_refused_on_a_udp_service() {
        let problems = validate("protocol = \"udp\"\nkeepalive = \"30s\"\nmax_connections_per_source = 2").unwrap_err();
        let paths: Vec<&str> = problems.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            ["service.s.keepalive", "service.s.max_connections_per_source"],
            "{problems:?}"
        );
    }
}
