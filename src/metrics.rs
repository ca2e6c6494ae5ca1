//! Every metric name, in one place, with the helpers that record them.
//!
//! Names follow Prometheus conventions (`portcullis_` prefix, base units,
//! `_total` for counters). Label values come from enums in the code, never
//! from peer input; service names come from the operator's config.
//! Without an installed recorder these calls cost next to nothing.

mod process;

use std::sync::OnceLock;

use anyhow::Context as _;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::config::Config;
use crate::config::Service;
use crate::gate::{ExpiryCause, KnockResult, Method};
use crate::guard::{LockReason, Refusal};
use crate::spa::Format;
use crate::step::Proto;

pub const KNOCKS_TOTAL: &str = "portcullis_knocks_total";
pub const KNOCKS_DROPPED_TOTAL: &str = "portcullis_knocks_dropped_total";
pub const KNOCK_ATTEMPTS_EXPIRED_TOTAL: &str = "portcullis_knock_attempts_expired_total";
pub const GRANTS_TOTAL: &str = "portcullis_grants_total";
pub const GRANTS_EXPIRED_TOTAL: &str = "portcullis_grants_expired_total";
pub const CONNECTIONS_TOTAL: &str = "portcullis_connections_total";
pub const CONNECTIONS_ACTIVE: &str = "portcullis_connections_active";
pub const CONNECTIONS_ENDED_TOTAL: &str = "portcullis_connections_ended_total";
pub const UPSTREAM_CONNECT_ERRORS_TOTAL: &str = "portcullis_upstream_connect_errors_total";
pub const ACCEPT_ERRORS_TOTAL: &str = "portcullis_accept_errors_total";
pub const ACCEPT_SHED_TOTAL: &str = "portcullis_accept_shed_total";

/// What happened to a guarded connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    AllowedAudit,
    Refused,
    Blackholed,
    /// Refused because the blackhole was full.
    Overflow,
    /// Granted, but reset: the service or the gateway was at its
    /// `max_connections`.
    ConnectionLimit,
    /// Admitted without a grant: the source is in `allow_always`.
    AllowedAlways,
    /// Refused whatever its grants: the source is in `deny_always`.
    DeniedAlways,
    /// Reset: a peer in `accept_proxy_protocol` sent no valid PROXY header
    /// in time (garbage, a close, or silence).
    ProxyHeaderInvalid,
    /// Reset: too many PROXY protocol connections were still sending
    /// their header.
    ProxyHeaderFull,
    /// Granted, but reset: the source held `max_connections_per_source`.
    SourceLimit,
}

impl Decision {
    pub const ALL: [Decision; 11] = [
        Decision::Allowed,
        Decision::AllowedAudit,
        Decision::Refused,
        Decision::Blackholed,
        Decision::Overflow,
        Decision::ConnectionLimit,
        Decision::AllowedAlways,
        Decision::DeniedAlways,
        Decision::ProxyHeaderInvalid,
        Decision::ProxyHeaderFull,
        Decision::SourceLimit,
    ];

    /// Where this decision sits in [`Decision::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn as_label(self) -> &'static str {
        match self {
            Decision::Allowed => "allowed",
            Decision::AllowedAudit => "allowed_audit",
            Decision::Refused => "refused",
            Decision::Blackholed => "blackholed",
            Decision::Overflow => "blackhole_full",
            Decision::ConnectionLimit => "connection_limit",
            Decision::AllowedAlways => "allowed_always",
            Decision::DeniedAlways => "denied_always",
            Decision::ProxyHeaderInvalid => "proxy_header_invalid",
            Decision::ProxyHeaderFull => "proxy_header_full",
            Decision::SourceLimit => "source_limit",
        }
    }
}

/// How a proxied connection ended (the access log's `end`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Both directions ended in order (each side's FIN passed on).
    Closed,
    /// A socket error ended it (a reset, mostly: normal life for a proxy).
    Error,
    /// No byte either way for the service's `idle_timeout`.
    IdleTimeout,
    /// Still open when the shutdown grace ran out.
    Shutdown,
    /// The upstream refused, failed or timed out the connect.
    UpstreamConnectFailed,
}

impl Ended {
    pub const ALL: [Ended; 5] = [
        Ended::Closed,
        Ended::Error,
        Ended::IdleTimeout,
        Ended::Shutdown,
        Ended::UpstreamConnectFailed,
    ];

    pub fn as_label(self) -> &'static str {
        match self {
            Ended::Closed => "closed",
            Ended::Error => "error",
            Ended::IdleTimeout => "idle_timeout",
            Ended::Shutdown => "shutdown",
            Ended::UpstreamConnectFailed => "upstream_connect_failed",
        }
    }
}

pub fn knock(service: &str, result: KnockResult) {
    metrics::counter!(KNOCKS_TOTAL, "service" => service.to_owned(), "result" => result.as_label()).increment(1);
}

pub fn knock_dropped() {
    metrics::counter!(KNOCKS_DROPPED_TOTAL).increment(1);
}

pub fn attempt_expired(service: &str, cause: ExpiryCause) {
    metrics::counter!(KNOCK_ATTEMPTS_EXPIRED_TOTAL, "service" => service.to_owned(), "cause" => cause.as_label())
        .increment(1);
}

pub fn grant(service: &str, method: &Method) {
    metrics::counter!(GRANTS_TOTAL, "service" => service.to_owned(), "method" => method.as_label()).increment(1);
}

pub fn grant_expired(service: &str) {
    metrics::counter!(GRANTS_EXPIRED_TOTAL, "service" => service.to_owned()).increment(1);
}

pub fn upstream_error(service: &str) {
    metrics::counter!(UPSTREAM_CONNECT_ERRORS_TOTAL, "service" => service.to_owned()).increment(1);
}

pub fn accept_error(listener: ListenerKind) {
    metrics::counter!(ACCEPT_ERRORS_TOTAL, "listener" => listener.as_label()).increment(1);
}

/// A connection accepted and closed at once because the process was out of
/// descriptors (with the reserve descriptor, see `net::accept_loop`).
pub fn accept_shed(listener: ListenerKind) {
    metrics::counter!(ACCEPT_SHED_TOTAL, "listener" => listener.as_label()).increment(1);
}

pub const UDP_DATAGRAMS_TOTAL: &str = "portcullis_udp_datagrams_total";
pub const UDP_DATAGRAMS_DROPPED_TOTAL: &str = "portcullis_udp_datagrams_dropped_total";
pub const UDP_SESSIONS_TOTAL: &str = "portcullis_udp_sessions_total";
pub const UDP_SESSIONS_ENDED_TOTAL: &str = "portcullis_udp_sessions_ended_total";
pub const UDP_SESSIONS_ACTIVE: &str = "portcullis_udp_sessions_active";

/// Which way a datagram or byte moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the client towards the upstream.
    Upstream,
    /// From the upstream back to the client.
    Downstream,
}

impl Direction {
    pub const ALL: [Direction; 2] = [Direction::Upstream, Direction::Downstream];

    pub fn as_label(self) -> &'static str {
        match self {
            Direction::Upstream => "upstream",
            Direction::Downstream => "downstream",
        }
    }
}

/// The datagram counter of one service and direction: taken once, outside
/// the per-datagram path, so relaying a datagram does not build a label set.
pub fn udp_datagrams(service: &str, direction: Direction) -> metrics::Counter {
    metrics::counter!(UDP_DATAGRAMS_TOTAL, "service" => service.to_owned(), "direction" => direction.as_label())
}

/// Datagrams of `service` dropped for `reason`, one of a fixed set of
/// labels chosen in `udp`; taken once by a loop that counts many.
pub fn udp_dropped_counter(service: &str, reason: &'static str) -> metrics::Counter {
    metrics::counter!(UDP_DATAGRAMS_DROPPED_TOTAL, "service" => service.to_owned(), "reason" => reason)
}

/// Every `reason` label `udp` counts in [`UDP_DATAGRAMS_DROPPED_TOTAL`]
/// (a unit test reads `udp.rs` to keep this list whole).
pub const UDP_DROP_REASONS: [&str; 8] = [
    "no_grant",
    "session_limit",
    "source_session_limit",
    "source_session_rate",
    "buffer_full",
    "pending_full",
    "reply_buffer_full",
    "no_upstream",
];

/// Every `reason` label of [`UDP_SESSIONS_ENDED_TOTAL`]: the labels of
/// `udp::SessionEnd`.
pub const UDP_SESSION_END_REASONS: [&str; 3] = ["idle", "upstream_error", "shutdown"];

pub fn udp_session_opened(service: &str) {
    metrics::counter!(UDP_SESSIONS_TOTAL, "service" => service.to_owned()).increment(1);
    metrics::gauge!(UDP_SESSIONS_ACTIVE, "service" => service.to_owned()).increment(1.0);
}

pub fn udp_session_closed(service: &str, reason: &'static str) {
    metrics::counter!(UDP_SESSIONS_ENDED_TOTAL, "service" => service.to_owned(), "reason" => reason).increment(1);
    metrics::gauge!(UDP_SESSIONS_ACTIVE, "service" => service.to_owned()).decrement(1.0);
}

pub const UNAUTHORIZED_MODE: &str = "portcullis_unauthorized_mode";

/// The unauthorised mode in effect for a TCP service (1 for it, 0 for the
/// others): `dark` runs as `closed` where the kernel refuses its filter.
pub fn unauthorized_mode(service: &str, effective: crate::config::Unauthorized) {
    for mode in crate::config::Unauthorized::ALL {
        let value = if mode == effective { 1.0 } else { 0.0 };
        metrics::gauge!(UNAUTHORIZED_MODE, "service" => service.to_owned(), "mode" => mode.as_str()).set(value);
    }
}

pub const UDP_KERNEL_FILTER: &str = "portcullis_udp_kernel_filter";
pub const UDP_KERNEL_FILTER_FALLBACKS_TOTAL: &str = "portcullis_udp_kernel_filter_fallbacks_total";

/// Why a UDP service's kernel filter gave way to userspace filtering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterFallback {
    /// More sources than one socket filter holds: everything passes to
    /// userspace until they fit again.
    TooManySources,
    /// The kernel refused the filter: userspace alone until the next start.
    AttachFailed,
}

impl FilterFallback {
    pub const ALL: [FilterFallback; 2] = [FilterFallback::TooManySources, FilterFallback::AttachFailed];

    pub fn as_label(self) -> &'static str {
        match self {
            FilterFallback::TooManySources => "too_many_sources",
            FilterFallback::AttachFailed => "attach_failed",
        }
    }
}

/// Whether `service`'s kernel filter is what drops datagrams from sources
/// without a grant (else userspace does it alone).
pub fn udp_kernel_filter(service: &str, in_kernel: bool) {
    metrics::gauge!(UDP_KERNEL_FILTER, "service" => service.to_owned()).set(if in_kernel { 1.0 } else { 0.0 });
}

pub fn udp_kernel_filter_fallback(service: &str, why: FilterFallback) {
    metrics::counter!(UDP_KERNEL_FILTER_FALLBACKS_TOTAL, "service" => service.to_owned(), "reason" => why.as_label())
        .increment(1);
}

// Operations: the admin endpoint's scrape, process health, and the timings
// and volumes of proxied connections.

pub const BUILD_INFO: &str = "portcullis_build_info";
pub const GRANTS_ACTIVE: &str = "portcullis_grants_active";
pub const CONNECTION_DURATION_SECONDS: &str = "portcullis_connection_duration_seconds";
pub const UPSTREAM_CONNECT_DURATION_SECONDS: &str = "portcullis_upstream_connect_duration_seconds";
pub const PROXIED_BYTES_TOTAL: &str = "portcullis_proxied_bytes_total";
pub const CONFIG_RELOADS_TOTAL: &str = "portcullis_config_reloads_total";

// The standard process metrics every Prometheus client library exports,
// under their standard names so stock dashboards and alerts find them.
pub const PROCESS_CPU_SECONDS_TOTAL: &str = "process_cpu_seconds_total";
pub const PROCESS_RESIDENT_MEMORY_BYTES: &str = "process_resident_memory_bytes";
pub const PROCESS_VIRTUAL_MEMORY_BYTES: &str = "process_virtual_memory_bytes";
pub const PROCESS_OPEN_FDS: &str = "process_open_fds";
pub const PROCESS_MAX_FDS: &str = "process_max_fds";
pub const PROCESS_START_TIME_SECONDS: &str = "process_start_time_seconds";
pub const PROCESS_THREADS: &str = "process_threads";

/// Buckets of [`CONNECTION_DURATION_SECONDS`]: from a quick query to a
/// session held open for an hour.
pub const CONNECTION_DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

/// Buckets of [`UPSTREAM_CONNECT_DURATION_SECONDS`]: from a local socket
/// (tens of microseconds) to the default connect timeout.
pub const UPSTREAM_CONNECT_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// The kinds of TCP listener, the label of [`ACCEPT_ERRORS_TOTAL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    Guarded,
    Knock,
    Admin,
    /// An SPA listener over TCP or HTTP.
    Spa,
}

impl ListenerKind {
    pub const ALL: [ListenerKind; 4] = [
        ListenerKind::Guarded,
        ListenerKind::Knock,
        ListenerKind::Admin,
        ListenerKind::Spa,
    ];

    pub fn as_label(self) -> &'static str {
        match self {
            ListenerKind::Guarded => "guarded",
            ListenerKind::Knock => "knock",
            ListenerKind::Admin => "admin",
            ListenerKind::Spa => "spa",
        }
    }
}

/// How a config reload ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadResult {
    Success,
    /// The new config was rejected; the old one keeps running.
    Failure,
}

impl ReloadResult {
    pub const ALL: [ReloadResult; 2] = [ReloadResult::Success, ReloadResult::Failure];

    pub fn as_label(self) -> &'static str {
        match self {
            ReloadResult::Success => "success",
            ReloadResult::Failure => "failure",
        }
    }
}

/// The per-connection metrics of one guarded TCP service, looked up once
/// when its accept loop starts: a connection then touches only atomics,
/// with no label set built and no registry searched on the accept path.
#[derive(Debug, Clone)]
pub struct ServiceMetrics {
    /// Indexed by [`Decision::index`].
    decisions: [metrics::Counter; Decision::ALL.len()],
    /// Indexed by [`Ended`]'s place in [`Ended::ALL`].
    ended: [metrics::Counter; Ended::ALL.len()],
    pub active: metrics::Gauge,
    pub upstream_errors: metrics::Counter,
    pub upstream_connect_duration: metrics::Histogram,
    pub connection_duration: metrics::Histogram,
    pub bytes_upstream: metrics::Counter,
    pub bytes_downstream: metrics::Counter,
}

impl ServiceMetrics {
    pub fn new(service: &str) -> Self {
        let s = || service.to_owned();
        Self {
            decisions: Decision::ALL
                .map(|d| metrics::counter!(CONNECTIONS_TOTAL, "service" => s(), "decision" => d.as_label())),
            ended: Ended::ALL
                .map(|e| metrics::counter!(CONNECTIONS_ENDED_TOTAL, "service" => s(), "end" => e.as_label())),
            active: metrics::gauge!(CONNECTIONS_ACTIVE, "service" => s()),
            upstream_errors: metrics::counter!(UPSTREAM_CONNECT_ERRORS_TOTAL, "service" => s()),
            upstream_connect_duration: metrics::histogram!(UPSTREAM_CONNECT_DURATION_SECONDS, "service" => s()),
            connection_duration: metrics::histogram!(CONNECTION_DURATION_SECONDS, "service" => s()),
            bytes_upstream: proxied_bytes_counter(service, Direction::Upstream),
            bytes_downstream: proxied_bytes_counter(service, Direction::Downstream),
        }
    }

    /// Counts one guarded connection and what was decided for it.
    pub fn connection(&self, decision: Decision) {
        self.decisions[decision.index()].increment(1);
    }

    /// Counts one proxied connection's end.
    pub fn ended(&self, end: Ended) {
        self.ended[end as usize].increment(1);
    }
}

/// One more (`delta` 1.0) or one fewer (-1.0) grant held for `service`.
pub fn grants_active(service: &str, delta: f64) {
    metrics::gauge!(GRANTS_ACTIVE, "service" => service.to_owned()).increment(delta);
}

/// The counter of bytes proxied for `service` in `direction`: taken once
/// per connection, then incremented as bytes flow (an atomic add).
pub fn proxied_bytes_counter(service: &str, direction: Direction) -> metrics::Counter {
    metrics::counter!(PROXIED_BYTES_TOTAL, "service" => service.to_owned(), "direction" => direction.as_label())
}

pub fn config_reload(result: ReloadResult) {
    metrics::counter!(CONFIG_RELOADS_TOTAL, "result" => result.as_label()).increment(1);
}

/// The Prometheus recorder, once [`install`] has run.
static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (once: `serve` calls it,
/// the other commands record nothing), describes every metric, and sets
/// every series the config implies to zero, so that `rate()` and alerts
/// see a series from the start instead of from its first event.
pub fn install(config: &Config) -> anyhow::Result<()> {
    let mut builder = PrometheusBuilder::new();
    for (name, buckets) in [
        (CONNECTION_DURATION_SECONDS, CONNECTION_DURATION_BUCKETS),
        (UPSTREAM_CONNECT_DURATION_SECONDS, UPSTREAM_CONNECT_BUCKETS),
    ] {
        builder = builder
            .set_buckets_for_metric(Matcher::Full(name.to_owned()), buckets)
            .with_context(|| format!("histogram buckets of {name}"))?;
    }
    let handle = builder
        .install_recorder()
        .context("cannot install the metrics recorder")?;
    PROMETHEUS
        .set(handle)
        .map_err(|_| anyhow::anyhow!("the metrics recorder is already installed"))?;
    describe();
    metrics::gauge!(
        BUILD_INFO,
        "version" => crate::version::VERSION,
        "commit" => crate::version::COMMIT,
        "profile" => crate::version::PROFILE
    )
    .set(1.0);
    zero(config);
    Ok(())
}

/// The scrape: every metric in the Prometheus text format, process
/// metrics included. `None` when no recorder is installed.
pub fn render() -> Option<String> {
    let handle = PROMETHEUS.get()?;
    let mut text = handle.render();
    process::render(&mut text);
    Some(text)
}

/// Housekeeping the recorder needs now and then (the admin endpoint runs
/// it); without it, histogram samples recorded between scrapes pile up.
pub fn upkeep() {
    if let Some(handle) = PROMETHEUS.get() {
        handle.run_upkeep();
    }
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(
        BUILD_INFO,
        "Always 1; the version, commit and profile labels name the running build."
    );
    describe_counter!(KNOCKS_TOTAL, "Knocks the gate processed, by service and result.");
    describe_counter!(
        KNOCKS_DROPPED_TOTAL,
        "Knocks dropped because the gate's queue was full."
    );
    describe_counter!(
        KNOCK_ATTEMPTS_EXPIRED_TOTAL,
        "Knock attempts that ended unfinished, by cause."
    );
    describe_counter!(GRANTS_TOTAL, "Grants given, by service and method.");
    describe_counter!(GRANTS_EXPIRED_TOTAL, "Grants that ran out.");
    describe_gauge!(GRANTS_ACTIVE, "Grants currently held, by service.");
    describe_counter!(
        CONNECTIONS_TOTAL,
        "Guarded connections accepted, by service and decision."
    );
    describe_gauge!(CONNECTIONS_ACTIVE, "Proxied connections open now.");
    describe_counter!(
        CONNECTIONS_ENDED_TOTAL,
        "Proxied connections ended, by service and how they ended (the access log's end)."
    );
    describe_counter!(
        UPSTREAM_CONNECT_ERRORS_TOTAL,
        "Upstream connects that failed or timed out."
    );
    describe_counter!(ACCEPT_ERRORS_TOTAL, "Failed accept() calls, by kind of listener.");
    describe_counter!(
        ACCEPT_SHED_TOTAL,
        "Connections accepted and closed at once for want of a descriptor (the reserve descriptor), by kind of listener."
    );
    describe_histogram!(
        CONNECTION_DURATION_SECONDS,
        Unit::Seconds,
        "How long proxied connections lasted, from the upstream connect to close."
    );
    describe_histogram!(
        UPSTREAM_CONNECT_DURATION_SECONDS,
        Unit::Seconds,
        "How long successful upstream connects took."
    );
    describe_counter!(
        PROXIED_BYTES_TOTAL,
        Unit::Bytes,
        "Bytes proxied, by service and direction (upstream: from clients), counted as they move."
    );
    describe_counter!(CONFIG_RELOADS_TOTAL, "Config reloads, by result.");
    describe_counter!(UDP_DATAGRAMS_TOTAL, "UDP datagrams relayed, by service and direction.");
    describe_counter!(
        UDP_DATAGRAMS_DROPPED_TOTAL,
        "UDP datagrams dropped, by service and reason."
    );
    describe_counter!(UDP_SESSIONS_TOTAL, "UDP sessions opened.");
    describe_counter!(UDP_SESSIONS_ENDED_TOTAL, "UDP sessions ended, by reason.");
    describe_gauge!(UDP_SESSIONS_ACTIVE, "UDP sessions open now.");
    describe_gauge!(
        UDP_KERNEL_FILTER,
        "1 while a UDP service's kernel socket filter drops datagrams from sources without a grant; 0 while userspace alone does (audit mode, filter refused, too many sources)."
    );
    describe_counter!(
        UDP_KERNEL_FILTER_FALLBACKS_TOTAL,
        "Times a UDP service's kernel filter gave way to userspace filtering, by reason."
    );
    describe_counter!(
        SPA_PACKETS_TOTAL,
        "SPA packets, by format and result (accepted or why refused)."
    );
    describe_counter!(
        SOURCE_REFUSALS_TOTAL,
        "Knock and SPA packets ignored by the per-source guard, by listener and reason."
    );
    describe_counter!(
        LOCKOUTS_TOTAL,
        "Sources locked out, by reason (trap: a trap port was hit; strikes: repeated wrong knocks)."
    );
    describe_gauge!(LOCKOUTS_ACTIVE, "Sources locked out now (computed when scraped).");
    describe_gauge!(
        STATE_STORE_UP,
        "1 while the shared state store (state.backend = \"redis\") answers, 0 while it does not (new knocks and SPA packets are refused)."
    );
    describe_counter!(
        STATE_STORE_REFUSED_TOTAL,
        "Knocks and authorizations refused because the shared state store was down, by input."
    );
    describe_gauge!(
        UNAUTHORIZED_MODE,
        "1 for the unauthorised mode in effect for a TCP service (dark falls back to closed without CAP_NET_ADMIN), 0 for the others."
    );
}

/// Sets every series whose labels the config determines to zero.
fn zero(config: &Config) {
    metrics::counter!(KNOCKS_DROPPED_TOTAL).absolute(0);
    for listener in ListenerKind::ALL {
        metrics::counter!(ACCEPT_ERRORS_TOTAL, "listener" => listener.as_label()).absolute(0);
        metrics::counter!(ACCEPT_SHED_TOTAL, "listener" => listener.as_label()).absolute(0);
    }
    for result in ReloadResult::ALL {
        metrics::counter!(CONFIG_RELOADS_TOTAL, "result" => result.as_label()).absolute(0);
    }
    zero_config(config);
    // At start only: a reload must not report a live store as down.
    if config.state.redis().is_some() {
        metrics::gauge!(STATE_STORE_UP).set(0.0);
        for input in STATE_STORE_INPUTS {
            metrics::counter!(STATE_STORE_REFUSED_TOTAL, "input" => input).absolute(0);
        }
    }
    zero_services(&config.services);
}

/// Sets to zero the series of the features `config` turns on (SPA,
/// knocking, lockouts), beyond those of each service: at start, and after
/// a reload that may turn one on. Counts already made are kept.
pub fn zero_config(config: &Config) {
    if PROMETHEUS.get().is_none() {
        return;
    }
    let knocks = config.services.iter().any(|s| s.knock.is_some());
    if knocks {
        for reason in [Refusal::RateLimited, Refusal::LockedOut] {
            metrics::counter!(SOURCE_REFUSALS_TOTAL, "listener" => "knock", "reason" => reason.as_label()).increment(0);
        }
    }
    for why in LockReason::ALL {
        metrics::counter!(LOCKOUTS_TOTAL, "reason" => why.as_label()).increment(0);
    }
    metrics::gauge!(LOCKOUTS_ACTIVE).increment(0.0);
    if config.spa.is_some() {
        for format in [Format::Native, Format::Fwknop] {
            for result in SPA_RESULTS {
                spa_packet_counter(format.as_label(), result).increment(0);
            }
        }
        // A packet of no known format fails before it is decoded.
        for result in SPA_UNDECODED_RESULTS {
            spa_packet_counter("unknown", result).increment(0);
        }
    }
}

/// Sets every series of `services` to zero: at start, and after each
/// reload for every service of the new config (a service that already
/// has series keeps its counts: registering adds nothing to a count).
pub fn zero_services(services: &[Service]) {
    if PROMETHEUS.get().is_none() {
        return;
    }
    for service in services {
        let s = || service.name.to_string();
        let counter = |c: metrics::Counter| {
            // Registering is what makes a series appear; adding 0 keeps
            // any count an earlier run of this service left.
            c.increment(0);
        };
        if service.knock.is_some() {
            for r in KnockResult::ALL {
                counter(metrics::counter!(KNOCKS_TOTAL, "service" => s(), "result" => r.as_label()));
            }
            for c in ExpiryCause::ALL {
                counter(metrics::counter!(KNOCK_ATTEMPTS_EXPIRED_TOTAL, "service" => s(), "cause" => c.as_label()));
            }
        }
        for m in Method::LABELS {
            counter(metrics::counter!(GRANTS_TOTAL, "service" => s(), "method" => m));
        }
        counter(metrics::counter!(GRANTS_EXPIRED_TOTAL, "service" => s()));
        metrics::gauge!(GRANTS_ACTIVE, "service" => s()).increment(0.0);
        counter(metrics::counter!(UPSTREAM_CONNECT_ERRORS_TOTAL, "service" => s()));
        if service.protocol == Proto::Tcp {
            for d in Decision::ALL {
                counter(metrics::counter!(CONNECTIONS_TOTAL, "service" => s(), "decision" => d.as_label()));
            }
            for e in Ended::ALL {
                counter(metrics::counter!(CONNECTIONS_ENDED_TOTAL, "service" => s(), "end" => e.as_label()));
            }
            metrics::gauge!(CONNECTIONS_ACTIVE, "service" => s()).increment(0.0);
            for d in Direction::ALL {
                counter(metrics::counter!(PROXIED_BYTES_TOTAL, "service" => s(), "direction" => d.as_label()));
            }
            // Registering a histogram makes it render with empty buckets.
            let _ = metrics::histogram!(CONNECTION_DURATION_SECONDS, "service" => s());
            let _ = metrics::histogram!(UPSTREAM_CONNECT_DURATION_SECONDS, "service" => s());
        }
        if service.protocol == Proto::Udp {
            counter(metrics::counter!(UDP_SESSIONS_TOTAL, "service" => s()));
            metrics::gauge!(UDP_SESSIONS_ACTIVE, "service" => s()).increment(0.0);
            for r in UDP_SESSION_END_REASONS {
                counter(metrics::counter!(UDP_SESSIONS_ENDED_TOTAL, "service" => s(), "reason" => r));
            }
            for d in Direction::ALL {
                counter(udp_datagrams(&service.name, d));
            }
            for r in UDP_DROP_REASONS {
                counter(udp_dropped_counter(&service.name, r));
            }
            metrics::gauge!(UDP_KERNEL_FILTER, "service" => s()).increment(0.0);
            for f in FilterFallback::ALL {
                counter(
                    metrics::counter!(UDP_KERNEL_FILTER_FALLBACKS_TOTAL, "service" => s(), "reason" => f.as_label()),
                );
            }
        }
    }
}

pub const SPA_PACKETS_TOTAL: &str = "portcullis_spa_packets_total";
pub const SOURCE_REFUSALS_TOTAL: &str = "portcullis_source_refusals_total";
pub const LOCKOUTS_TOTAL: &str = "portcullis_lockouts_total";
pub const LOCKOUTS_ACTIVE: &str = "portcullis_lockouts_active";

/// Every `result` of [`SPA_PACKETS_TOTAL`]: "accepted", or the label of a
/// `spa::desk::Refusal` (a unit test keeps the two in step). The lockout
/// is not among them: SPA packets never meet it.
pub const SPA_RESULTS: [&str; 29] = [
    "accepted",
    // The codecs' `spa::Reject`.
    "malformed",
    "too_large",
    "openssl_prefix",
    "bad_mac",
    "decrypt",
    "unsupported_mode",
    "command",
    "gpg",
    "digest_mismatch",
    "unknown_user",
    "stale",
    // The desk's policy.
    "replay",
    "replay_log_failed",
    "source_not_allowed",
    "source_mismatch",
    "no_access",
    "unknown_service",
    "not_permitted",
    "expired",
    "username_mismatch",
    "source_address_required",
    "nat_unknown_target",
    "nat_ambiguous_target",
    "nat_not_permitted",
    "rate_limited",
    "busy",
    // The shared state store (`backend = "redis"`).
    "state_store_down",
    "replay_window",
];

/// The results a packet of no known format (`format="unknown"`) can have.
pub const SPA_UNDECODED_RESULTS: [&str; 3] = ["malformed", "too_large", "rate_limited"];

pub const STATE_STORE_UP: &str = "portcullis_state_store_up";
pub const STATE_STORE_REFUSED_TOTAL: &str = "portcullis_state_store_refused_total";

/// The inputs [`state_store_refused`] counts.
pub const STATE_STORE_INPUTS: [&str; 2] = ["knock", "authorize"];

/// Whether the shared state store (`backend = "redis"`) answers.
pub fn state_store_up(up: bool) {
    metrics::gauge!(STATE_STORE_UP).set(if up { 1.0 } else { 0.0 });
}

/// A knock or authorization refused because the state store is down;
/// `input` is one of [`STATE_STORE_INPUTS`].
pub fn state_store_refused(input: &'static str) {
    metrics::counter!(STATE_STORE_REFUSED_TOTAL, "input" => input).increment(1);
}

/// `format` and `result` are fixed labels from `spa::Format` and
/// `spa::desk::Refusal` (or "accepted").
pub fn spa_packet(format: &'static str, result: &'static str) {
    metrics::counter!(SPA_PACKETS_TOTAL, "format" => format, "result" => result).increment(1);
}

/// The series [`spa_packet`] counts in, for a caller that keeps it.
pub fn spa_packet_counter(format: &'static str, result: &'static str) -> metrics::Counter {
    metrics::counter!(SPA_PACKETS_TOTAL, "format" => format, "result" => result)
}

/// A knock or SPA packet ignored by the per-source guard; `listener` is
/// "knock" or "spa", `reason` a `guard::Refusal` label.
pub fn source_refused(listener: &'static str, reason: &'static str) {
    metrics::counter!(SOURCE_REFUSALS_TOTAL, "listener" => listener, "reason" => reason).increment(1);
}

pub fn lockout(why: LockReason) {
    metrics::counter!(LOCKOUTS_TOTAL, "reason" => why.as_label()).increment(1);
}

/// How many sources are locked out now (set when scraped).
pub fn lockouts_active(n: usize) {
    metrics::gauge!(LOCKOUTS_ACTIVE).set(n as f64);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_decision_has_its_own_counter_slot() {
        for (i, d) in Decision::ALL.into_iter().enumerate() {
            assert_eq!(d.index(), i, "{d:?}");
        }
        let labels: std::collections::HashSet<_> = Decision::ALL.map(Decision::as_label).into_iter().collect();
        assert_eq!(labels.len(), Decision::ALL.len());
        for (i, e) in Ended::ALL.into_iter().enumerate() {
            assert_eq!(e as usize, i, "{e:?}");
        }
    }

    #[test]
    fn every_spa_result_label_is_zeroed() {
        use crate::spa::desk::Refusal as Desk;
        use crate::spa::Reject;
        use crate::step::Proto;
        // One of each variant; the match below fails to compile when a
        // variant is added, so this list cannot fall behind.
        let all = [
            Desk::Packet(Reject::Malformed("")),
            Desk::Packet(Reject::TooLarge { len: 0, max: 0 }),
            Desk::Packet(Reject::OpensslPrefix),
            Desk::Packet(Reject::BadMac),
            Desk::Packet(Reject::Decrypt("")),
            Desk::Packet(Reject::UnsupportedMode("")),
            Desk::Packet(Reject::Command),
            Desk::Packet(Reject::Gpg),
            Desk::Packet(Reject::DigestMismatch),
            Desk::Packet(Reject::UnknownUser),
            Desk::Packet(Reject::Stale {
                skew_secs: 0,
                max_age_secs: 0,
            }),
            Desk::Replay,
            Desk::ReplayLogFailed,
            Desk::SourceNotAllowed,
            Desk::SourceMismatch,
            Desk::NoAccess,
            Desk::UnknownService(Proto::Udp, 0),
            Desk::NotPermitted,
            Desk::Expired,
            Desk::UsernameMismatch,
            Desk::SourceAddressRequired,
            Desk::NatUnknownTarget,
            Desk::NatAmbiguousTarget,
            Desk::NatNotPermitted,
            Desk::Guard(Refusal::RateLimited),
            Desk::Busy,
            Desk::StateStoreDown,
            Desk::ReplayWindow,
        ];
        for r in all {
            match r {
                Desk::Packet(p) => match p {
                    Reject::Malformed(_)
                    | Reject::TooLarge { .. }
                    | Reject::OpensslPrefix
                    | Reject::BadMac
                    | Reject::Decrypt(_)
                    | Reject::UnsupportedMode(_)
                    | Reject::Command
                    | Reject::Gpg
                    | Reject::DigestMismatch
                    | Reject::UnknownUser
                    | Reject::Stale { .. } => {}
                },
                Desk::Replay
                | Desk::ReplayLogFailed
                | Desk::SourceNotAllowed
                | Desk::SourceMismatch
                | Desk::NoAccess
                | Desk::UnknownService(..)
                | Desk::NotPermitted
                | Desk::Expired
                | Desk::UsernameMismatch
                | Desk::SourceAddressRequired
                | Desk::NatUnknownTarget
                | Desk::NatAmbiguousTarget
                | Desk::NatNotPermitted
                | Desk::Guard(_)
                | Desk::Busy
                | Desk::StateStoreDown
                | Desk::ReplayWindow => {}
            }
            assert!(SPA_RESULTS.contains(&r.as_label()), "{r:?} is not zeroed");
        }
        assert_eq!(SPA_RESULTS.len(), all.len() + 1, "accepted, and one per refusal");
        for r in SPA_UNDECODED_RESULTS {
            assert!(SPA_RESULTS.contains(&r), "{r}");
        }
    }

    #[test]
    fn every_udp_label_is_zeroed() {
        // udp.rs names its drop reasons where it counts them.
        let source = include_str!("udp.rs");
        let mut seen = 0;
        for (at, _) in source.match_indices("udp_dropped_counter(&service.name, \"") {
            let rest = &source[at + "udp_dropped_counter(&service.name, \"".len()..];
            let reason = &rest[..rest.find('"').unwrap()];
            assert!(UDP_DROP_REASONS.contains(&reason), "{reason} is not zeroed");
            seen += 1;
        }
        assert!(
            seen >= UDP_DROP_REASONS.len(),
            "found only {seen} drop reasons in udp.rs"
        );
        use crate::udp::SessionEnd;
        for end in [SessionEnd::Idle, SessionEnd::UpstreamError, SessionEnd::Shutdown] {
            match end {
                SessionEnd::Idle | SessionEnd::UpstreamError | SessionEnd::Shutdown => {}
            }
            assert!(UDP_SESSION_END_REASONS.contains(&end.as_label()), "{end:?}");
        }
    }
}
