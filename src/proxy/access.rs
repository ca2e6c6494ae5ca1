//! The access log: one line per proxied connection when it ends, under its
//! own target ([`ACCESS_TARGET`]) so it can be routed or filtered apart
//! from the operational log (`--log-level warn,portcullis::access=info`).
//!
//! Only connections that were let through get a line (at info): a refused
//! or blackholed connection costs an attacker nothing to make, so those
//! are counted by `portcullis_connections_total{decision}` and logged at
//! debug where they are decided, and a flood never becomes a log flood.
//! The fields are flat (the JSON format puts each at the top level of the
//! line's object); README's "Access log" section is their reference.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use crate::metrics::{Decision, Ended};

/// The tracing target of access lines.
pub const ACCESS_TARGET: &str = "portcullis::access";

/// What the access line of one proxied connection says.
pub struct Access<'a> {
    pub service: &'a str,
    pub upstream: &'a str,
    /// The client's address (the source and its port).
    pub client: SocketAddr,
    pub decision: Decision,
    /// From the start of the upstream connect to the end.
    pub lasted: Duration,
    /// Bytes delivered to the upstream, and back to the client.
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub end: Ended,
    /// What went wrong, for [`Ended::Error`] and
    /// [`Ended::UpstreamConnectFailed`].
    pub error: Option<&'a dyn fmt::Display>,
}

impl fmt::Debug for Access<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Access")
            .field("service", &self.service)
            .field("client", &self.client)
            .field("decision", &self.decision)
            .field("end", &self.end)
            .field("error", &self.error.map(ToString::to_string))
            .finish_non_exhaustive()
    }
}

impl Access<'_> {
    /// Writes the line.
    pub fn log(&self) {
        tracing::info!(
            target: ACCESS_TARGET,
            service = self.service,
            source = %self.client.ip(),
            source_port = self.client.port(),
            upstream = self.upstream,
            decision = self.decision.as_label(),
            duration_seconds = self.lasted.as_secs_f64(),
            bytes_up = self.bytes_up,
            bytes_down = self.bytes_down,
            end = self.end.as_label(),
            error = self.error.map(tracing::field::display),
            "access"
        );
    }
}
