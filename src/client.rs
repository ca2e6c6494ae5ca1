//! The client half: `knock` sends a knock sequence, `spa` one Single
//! Packet Authorization packet, `open` either of them from a profile, and
//! `exec`, `connect` and `forward` open and then reach the service.
//!
//! - [`knock`](mod@knock): knock sequences, kept in order at the gateway ([`order`]).
//! - [`spa`]: building, describing and sending SPA packets.
//! - [`profile`]: named profiles from `client.toml`, then [`fwknoprc`] stanzas.
//! - [`session`]: open a profile, then run a command, relay stdio, or
//!   forward a local listener.
//!
//! Every failure is a [`Failure`] with one [`Exit`] code, printed by the
//! binary as one `error: ...` line.

use std::fmt;

pub mod command;
pub mod fwknoprc;
pub mod knock;
pub mod order;
pub mod profile;
pub mod session;
pub mod spa;

pub use knock::{knock, KnockPlan};
pub use spa::{build_spa, send_spa, SpaPlan};

/// The client's exit codes, one set for every command (also in README and
/// `--help`). `exec` exits with its command's own status instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// 1: sending failed, a TCP knock step's handshake failed, or the
    /// service could not be reached after opening.
    Failed = 1,
    /// 2: the command line is wrong (bad flag, step, access or address).
    Usage = 2,
    /// 3: a profile, profile file or key file cannot be used.
    Profile = 3,
    /// 126: `exec` found its command but may not run it.
    NotExecutable = 126,
    /// 127: `exec` could not find its command.
    NoCommand = 127,
}

impl Exit {
    pub fn code(self) -> u8 {
        self as u8
    }
}

/// A client failure: what to print and how to exit.
#[derive(Debug)]
pub struct Failure {
    pub exit: Exit,
    pub error: anyhow::Error,
}

impl Failure {
    pub fn new(exit: Exit, error: impl Into<anyhow::Error>) -> Self {
        Self {
            exit,
            error: error.into(),
        }
    }

    pub fn usage(error: impl Into<anyhow::Error>) -> Self {
        Self::new(Exit::Usage, error)
    }

    pub fn profile(error: impl Into<anyhow::Error>) -> Self {
        Self::new(Exit::Profile, error)
    }

    pub fn failed(error: impl Into<anyhow::Error>) -> Self {
        Self::new(Exit::Failed, error)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // One line: anyhow's alternate form joins the causes with ": ".
        let text = format!("{:#}", self.error);
        f.write_str(&text.replace('\n', " "))
    }
}

/// Result of a client command: the exit code on success (0, or the
/// status `exec` passes on).
pub type Outcome = Result<u8, Failure>;
