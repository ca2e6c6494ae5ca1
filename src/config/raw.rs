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
    #[serde(default)]
    pub service: BTreeMap<String, RawService>,
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
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawService {
    pub listen: Option<String>,
    pub upstream: Option<String>,
    pub protocol: Option<String>,
    pub unauthorized: Option<String>,
    pub open_for: Option<String>,
    pub knock: Option<RawKnock>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawKnock {
    #[serde(default)]
    pub sequence: Vec<RawStep>,
    #[serde(default)]
    pub trap_ports: Vec<RawStep>,
    pub step_timeout: Option<String>,
    pub sequence_timeout: Option<String>,
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
