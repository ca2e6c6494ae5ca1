//! The `[state]` section: the directory where what must outlive the
//! process is kept (the SPA replay log, [`crate::store::replay`]).
//!
//! Validation only checks the path's shape; whether the directory can be
//! created and written is found out when `serve` opens the log (a start-up
//! error naming `state.dir`), since `portcullis check` often runs as
//! another user than the service.

use std::path::PathBuf;

use super::raw::RawState;
use super::Validator;

/// Where state is kept when `[state]` names no directory: the system
/// path (systemd's `StateDirectory=portcullis`). Unprivileged runs and
/// containers set `state.dir` (or `PORTCULLIS__STATE__DIR`).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/portcullis";

/// The validated `[state]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    /// Where the replay log lives, resolved from the config's directory.
    pub dir: PathBuf,
}

impl Default for State {
    fn default() -> Self {
        Self {
            dir: PathBuf::from(DEFAULT_STATE_DIR),
        }
    }
}

impl Validator {
    pub(super) fn state(&mut self, raw: &RawState) -> State {
        match raw.dir.as_deref().map(str::trim) {
            None => State::default(),
            Some("") => {
                self.problem(
                    "state.dir",
                    format!("empty: name a directory this process may write (the default is {DEFAULT_STATE_DIR})"),
                );
                State::default()
            }
            Some(dir) => State {
                dir: self.base.join(dir),
            },
        }
    }
}
