//! portcullis: a userspace TCP/UDP gateway that hides services behind port
//! knocking and Single Packet Authorization, with no firewall changes and
//! no privileges.
//!
//! The modules follow the data flow, always downward:
//!
//! ```text
//!  knock ports ─┐
//!  SPA port ────┴─► sensor ──inputs──► driver ──► gate (sans-IO)
//!                                        │  ▲        │ events
//!                       replication seam ┘  └────────┘
//!                                        ▼
//!                                      store (grants, SPA replay cache)
//!                                        ▲
//!  guarded port ──accept──► proxy / udp ── store.allows(service, source)?
//!                             │ yes: connect upstream, splice both ways
//!                             │ no:  refuse / blackhole / allow (audit)
//! ```
//!
//! - [`sensor`]: knock and SPA listeners (bound sockets, or the raw sensor's
//!   raw sockets); they own sockets and nothing else. [`sensor::recorder`]
//!   is the thread that writes accepted SPA packets to the replay log
//!   before their grants are queued.
//! - [`driver`]: the only code that talks to the gate; applies its events to
//!   the store, audit log, metrics and lockouts; the replication seam.
//! - [`replicate`]: `[state] backend = "redis"`: the input log through a
//!   Redis Stream that lets several replicas run one gate, and the SPA
//!   replay cache they share ([`replicate::replay`]).
//! - [`gate`]: knock progress, grants and expiries; pure logic, time passed in.
//! - [`store`]: where grants live for the connection path ([`store::GrantStore`]),
//!   the SPA replay log on disk under `state.dir` ([`store::replay`]), and
//!   the replicas' local mirror ([`store::mirror`]).
//! - [`guard`]: per-source rate limits and lockouts in front of the sensors.
//! - [`spa`]: SPA packet codecs (native and fwknop) and key files, pure and
//!   config-free; [`spa::desk`] is the policy that decides on a packet.
//! - [`proxy`]: guarded TCP listeners, the unauthorised modes, the static
//!   allow/deny lists, and the splice. PROXY protocol headers from load
//!   balancers are parsed and written by [`proxy::header`]. Its data path
//!   ([`proxy::relay`]) copies small flows through lazy
//!   buffers and splices bulk ones through pooled pipes ([`proxy::pipes`]).
//!   Per-source connection counts live in [`proxy::sources`]; each proxied
//!   connection's end is an [`proxy::access`] line.
//! - [`udp`]: guarded UDP services, their per-client session table and kernel filter.
//! - [`filter`]: classic BPF socket filters that admit a set of sources; pure.
//! - [`server`]: binds every socket ([`server::handover`]: the plan of what a
//!   reload keeps, binds and closes), runs, reloads and drains.
//! - [`door`]: the listening switch of a `closed` TCP service.
//! - [`drain`]: the lifecycle: stop, cut, task tracker, in-flight count, signals.
//! - [`net`]: socket set-up and the one accept loop every listener runs
//!   (it takes no permit, and sheds with a reserve descriptor on EMFILE).
//! - [`reload`]: SIGHUP and changes of the config and the files it names into validated reloads.
//! - [`notify`]: tells a service manager (systemd `Type=notify`) when it is ready, reloading, stopping.
//! - [`config`]: file and environment into validated runtime types;
//!   [`config::budget`] fits every cap to the descriptor limit.
//! - [`admin`]: `/metrics`, health probes and the grants and lockouts API, on a thread of its own.
//! - [`metrics`]: every metric name, the Prometheus recorder and process metrics.
//! - [`client`]: the client commands (knock, spa, keygen, profiles, open, exec, connect, forward).
//! - [`import`]: `portcullis import`: knockd and fwknopd configs into a `proxy.toml`.
//! - [`clock`]: the only place that reads the clock.
//! - [`secret`]: key bytes that are redacted and zeroized; constant-time MAC comparison.
//! - [`version`]: the build's version, git commit and profile (from `build.rs`).
//! - [`step`]: knock steps and protocols, parsed from every common spelling.
//! - [`totp`]: rotating knock sequences derived from a shared secret per period.
//! - `sys`: the only `unsafe` code: `splice(2)`, pipes and batched UDP calls.
//!
//! Layers, lowest first: `clock`, `step`, `secret`, `filter`, `sys`, the SPA
//! codecs, `gate`, `store` → `config` → `guard`, `metrics`, `drain`, `net` →
//! `spa::desk`, `driver`, `replicate`, `sensor`, `proxy`, `udp`, `admin` → `server`.
//! Imports only run down this list.

#![deny(unsafe_code)]
#![warn(missing_debug_implementations)]

pub mod admin;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod door;
pub mod drain;
pub mod driver;
pub mod filter;
pub mod gate;
pub mod guard;
pub mod import;
pub mod logging;
pub mod metrics;
pub mod net;
pub mod notify;
pub mod proxy;
pub mod reload;
pub mod replicate;
pub mod secret;
pub mod sensor;
pub mod server;
pub mod spa;
pub mod step;
pub mod store;
mod sys;
pub mod totp;
pub mod udp;
pub mod version;
