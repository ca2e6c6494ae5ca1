//! Every metric name, in one place, with the helpers that record them.
//!
//! Names follow Prometheus conventions (`portcullis_` prefix, base units,
//! `_total` for counters). Label values come from enums in the code, never
//! from peer input; service names come from the operator's config.
//! Without an installed recorder these calls cost next to nothing.

use crate::gate::{ExpiryCause, KnockResult, Method};

pub const KNOCKS_TOTAL: &str = "portcullis_knocks_total";
pub const KNOCKS_DROPPED_TOTAL: &str = "portcullis_knocks_dropped_total";
pub const KNOCK_ATTEMPTS_EXPIRED_TOTAL: &str = "portcullis_knock_attempts_expired_total";
pub const GRANTS_TOTAL: &str = "portcullis_grants_total";
pub const GRANTS_EXPIRED_TOTAL: &str = "portcullis_grants_expired_total";
pub const CONNECTIONS_TOTAL: &str = "portcullis_connections_total";
pub const CONNECTIONS_ACTIVE: &str = "portcullis_connections_active";
pub const UPSTREAM_CONNECT_ERRORS_TOTAL: &str = "portcullis_upstream_connect_errors_total";
pub const ACCEPT_ERRORS_TOTAL: &str = "portcullis_accept_errors_total";

/// What happened to a guarded connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    AllowedAudit,
    Refused,
    Blackholed,
    /// Refused because the blackhole was full.
    Overflow,
}

impl Decision {
    pub fn as_label(self) -> &'static str {
        match self {
            Decision::Allowed => "allowed",
            Decision::AllowedAudit => "allowed_audit",
            Decision::Refused => "refused",
            Decision::Blackholed => "blackholed",
            Decision::Overflow => "blackhole_full",
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

pub fn connection(service: &str, decision: Decision) {
    metrics::counter!(CONNECTIONS_TOTAL, "service" => service.to_owned(), "decision" => decision.as_label())
        .increment(1);
}

pub fn connections_active(service: &str, delta: f64) {
    metrics::gauge!(CONNECTIONS_ACTIVE, "service" => service.to_owned()).increment(delta);
}

pub fn upstream_error(service: &str) {
    metrics::counter!(UPSTREAM_CONNECT_ERRORS_TOTAL, "service" => service.to_owned()).increment(1);
}

pub fn accept_error(listener: &'static str) {
    metrics::counter!(ACCEPT_ERRORS_TOTAL, "listener" => listener).increment(1);
}
