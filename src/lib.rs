//! portcullis: a userspace TCP/UDP gateway that hides services behind port
//! knocking, with no firewall changes and no privileges.
//!
//! The modules follow the data flow:
//!
//! ```text
//!  knock ports ──► sensor ──Knock──► gate (sans-IO) ──Grant──► store
//!                                                              │
//!  guarded port ──accept──► proxy ── store.allows(service, source)?
//!                             │ yes: connect upstream, splice both ways
//!                             │ no:  refuse / blackhole / allow (audit)
//! ```
//!
//! - [`step`]: knock steps and protocols, parsed from every common spelling.
//! - [`gate`]: knock progress, grants and expiries; pure logic, time passed in.
//! - [`store`]: where grants live for the connection path ([`store::GrantStore`]).
//! - [`sensor`]: knock and SPA listeners; they own sockets and nothing else.
//! - [`guard`]: per-source rate limits and lockouts in front of the sensors.
//! - [`spa`]: SPA packet codecs (native and fwknop) and key files; pure, time passed in.
//! - [`proxy`]: guarded TCP listeners, the unauthorised modes, and the splice.
//!   Its data path ([`proxy::relay`]) copies small flows through lazy
//!   buffers and splices bulk ones through pooled pipes ([`proxy::pipes`]).
//! - `sys`: the only `unsafe` code: `splice(2)` and pipe system calls.
//! - [`udp`]: guarded UDP services, their per-client session table and kernel filter.
//! - [`filter`]: classic BPF socket filters that admit a set of sources; pure.
//! - [`reload`]: SIGHUP and config-directory changes into validated reloads.
//! - [`server`]: binds every socket, drives the gate, shuts down gracefully.
//! - [`notify`]: tells a service manager (systemd `Type=notify`) when it is ready, reloading, stopping.
//! - [`config`]: file and environment into validated runtime types.
//! - [`client`]: the `knock` command.
//! - [`clock`]: the only place that reads the clock.
//! - [`secret`]: key bytes that are redacted and zeroized; constant-time MAC comparison.
//! - [`metrics`]: every metric name, the Prometheus recorder and process metrics.
//! - [`admin`]: `/metrics`, health probes and the grants API, on a thread of its own.

#![deny(unsafe_code)]
#![warn(missing_debug_implementations)]

pub mod admin;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod filter;
pub mod gate;
pub mod guard;
pub mod logging;
pub mod metrics;
pub mod net;
pub mod notify;
pub mod proxy;
pub mod reload;
pub mod secret;
pub mod sensor;
pub mod server;
pub mod spa;
pub mod step;
pub mod store;
mod sys;
pub mod udp;
