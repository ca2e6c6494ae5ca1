//! The config as written: serde structs the `config` crate fills from the
//! file, then from `PORTCULLIS__SECTION__KEY` environment variables.
//!
//! Fields a user may get wrong are kept as text here so that validation can
//! report every problem at once with its key path, instead of serde
//! stopping at the first.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub gateway: RawGateway,
    pub admin: Option<RawAdmin>,
    #[serde(default)]
    pub limits: RawLimits,
    pub spa: Option<RawSpa>,
    #[serde(default)]
    pub state: RawState,
    #[serde(default)]
    pub service: BTreeMap<String, RawService>,
    #[serde(default)]
    pub user: BTreeMap<String, RawUser>,
    /// The `PORTCULLIS__*` variables that were laid over the file, so that
    /// problems with what they set name them.
    #[serde(skip)]
    pub env: Vec<super::EnvOverride>,
}

/// Per-source limits on knock and SPA packets.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub per_source_rate: Option<RawCount>,
    pub per_source_burst: Option<RawCount>,
    pub lockout_after: Option<RawCount>,
    pub lockout_for: Option<String>,
    pub max_tracked_sources: Option<RawCount>,
    pub ipv6_prefix: Option<RawCount>,
}

/// Where state that outlives the process is kept.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawState {
    pub dir: Option<String>,
    /// `memory` (the default) or `redis`.
    pub backend: Option<String>,
    /// `redis://HOST:PORT/DB` or `rediss://...`, with no password in it.
    pub url: Option<String>,
    pub username: Option<String>,
    pub password_file: Option<String>,
    pub password_env: Option<String>,
    /// This replica's name (the default is the host name).
    pub replica: Option<String>,
    /// The prefix of every key this gateway writes.
    pub key_prefix: Option<String>,
    /// Redis Sentinel addresses (`host:port`), instead of `url`.
    #[serde(default)]
    pub sentinels: Vec<String>,
    /// The Sentinel master name, with `sentinels`.
    pub master_name: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawSpa {
    pub listen: Option<String>,
    pub max_age: Option<String>,
    pub tcp_listen: Option<String>,
    pub http_listen: Option<String>,
}

/// A user who may send SPA packets. Keys come from a file or an
/// environment variable, never from the config itself.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawUser {
    pub key_file: Option<String>,
    pub key_env: Option<String>,
    #[serde(default)]
    pub allow_from: Vec<String>,
    pub require_source_match: Option<bool>,
    /// fwknopd's `REQUIRE_SOURCE_ADDRESS`: refuse packets that ask for
    /// "the packet's source" (`fwknop -s`, allow-IP 0.0.0.0).
    pub require_source_address: Option<bool>,
    /// fwknopd's `REQUIRE_USERNAME`: `true` (the packet's username must be
    /// this user's name) or the name it must be.
    pub require_username: Option<RawRequireUsername>,
    /// fwknopd's `ACCESS_EXPIRE`: a date (`2027-01-31`, or fwknopd's
    /// `01/31/2027`) or an RFC 3339 time, UTC, from which packets are refused.
    pub expires: Option<String>,
    /// fwknopd's `HMAC_DIGEST_TYPE`; overrides the key file's.
    pub hmac_digest: Option<String>,
    /// fwknopd's `ENCRYPTION_MODE`; overrides the key file's.
    pub encryption_mode: Option<String>,
}

/// `require_username = true` or `require_username = "name"`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum RawRequireUsername {
    Flag(bool),
    Name(String),
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawGateway {
    pub shutdown_grace: Option<String>,
    pub connect_timeout: Option<String>,
    pub max_connections: Option<RawCount>,
    pub blackhole_hold: Option<String>,
    pub max_blackholed: Option<RawCount>,
    pub max_knock_attempts: Option<RawCount>,
    /// How knocks and SPA packets are observed: socket, raw or auto.
    pub sensor: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Option<String>,
    pub tls_cert: Option<String>,
    pub tls_key: Option<String>,
    pub client_ca: Option<String>,
    /// A path: the token itself never passes through the config.
    pub token_file: Option<String>,
    pub allow_loopback_mutations: Option<bool>,
    pub require_token_for_reads: Option<bool>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawService {
    pub listen: Option<String>,
    pub upstream: Option<String>,
    pub protocol: Option<String>,
    pub unauthorized: Option<String>,
    pub open_for: Option<String>,
    /// UDP: a session's; TCP: a proxied connection's (none by default).
    pub idle_timeout: Option<String>,
    /// TCP keepalive idle time on both sockets, or "off" (TCP).
    pub keepalive: Option<String>,
    /// Proxied connections of one source at once (TCP).
    pub max_connections_per_source: Option<RawCount>,
    pub max_sessions: Option<RawCount>,
    pub max_sessions_per_source: Option<RawCount>,
    /// Sessions one source may open per second (UDP).
    pub session_open_rate: Option<RawCount>,
    /// Proxied connections of this service at once (TCP).
    pub max_connections: Option<RawCount>,
    pub knock: Option<RawKnock>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub spa_users: Vec<String>,
    /// Longest grant an SPA packet may ask for (fwknop `-f`); defaults to
    /// `open_for`. fwknopd's `MAX_FW_TIMEOUT`.
    pub max_open_for: Option<String>,
    /// The host name fwknop NAT requests (`-N NAME,PORT`) use for this
    /// service, instead of its upstream's host.
    pub nat_name: Option<String>,
    /// Peers (CIDR blocks) whose connections open with a PROXY header (TCP).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub accept_proxy_protocol: Vec<String>,
    /// "v1" or "v2": the PROXY header upstream connections open with (TCP).
    pub send_proxy_protocol: Option<String>,
    /// Sources (CIDR blocks) admitted without a grant (TCP).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_always: Vec<String>,
    /// Sources (CIDR blocks) refused even with a grant (TCP).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_always: Vec<String>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawKnock {
    #[serde(default)]
    pub sequence: Vec<RawStep>,
    #[serde(default)]
    pub trap_ports: RawTraps,
    /// Whether a trap hit locks the source out (default true).
    pub trap_lockout: Option<bool>,
    pub step_timeout: Option<String>,
    pub sequence_timeout: Option<String>,
    /// A rotating sequence instead of `sequence`.
    pub totp: Option<RawTotp>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawTotp {
    pub key_file: Option<String>,
    pub steps: Option<i64>,
    pub ports: Option<String>,
    pub period: Option<String>,
}

/// Trap ports: a list of steps, or `{ count = N }` to have N free ports
/// near the steps picked at start-up.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(
    untagged,
    expecting = "a list of steps, or { count = N } to have N free ports picked"
)]
pub enum RawTraps {
    List(Vec<RawStep>),
    Pick(RawTrapPick),
}

impl Default for RawTraps {
    fn default() -> Self {
        Self::List(Vec::new())
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawTrapPick {
    pub count: i64,
}

/// A step as a string (`"7000/udp"`) or a bare port number (TCP).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum RawStep {
    Port(i64),
    Text(String),
}

/// A count as a TOML integer, or as text (environment variables are text).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum RawCount {
    Int(i64),
    Text(String),
}
