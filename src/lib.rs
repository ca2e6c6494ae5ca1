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
//! - [`sensor`]: knock listeners; they own sockets and nothing else.
//! - [`proxy`]: guarded listeners, the unauthorised modes, and the splice.
//! - [`server`]: binds every socket, drives the gate, shuts down gracefully.
//! - [`config`]: file and environment into validated runtime types.
//! - [`client`]: the `knock` command.
//! - [`clock`]: the only place that reads the clock.
//! - [`metrics`]: every metric name.

#![deny(unsafe_code)]
#![warn(missing_debug_implementations)]

pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod gate;
pub mod logging;
pub mod metrics;
pub mod net;
pub mod proxy;
pub mod sensor;
pub mod server;
pub mod step;
pub mod store;
