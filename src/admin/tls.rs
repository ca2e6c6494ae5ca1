//! TLS for the admin endpoint: the server certificate and key from PEM
//! files, optional client-certificate verification against a CA, and
//! reloading when the files change.
//!
//! The files are checked (one `stat` each) whenever a connection arrives;
//! when any changed, they are read again. A new set that does not load
//! (a half-written file, a key that does not match its certificate) keeps
//! the previous certificate serving and is logged once, with why.

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustls::ServerConfig;

use crate::config::pem::{load, TlsError};
use crate::config::AdminTls;

/// What the files looked like when last read: modification time and size
/// of each, `None` where the file could not be examined.
type Stamp = Vec<Option<(SystemTime, u64)>>;

fn stamp(files: &AdminTls) -> Stamp {
    std::iter::once(&files.cert)
        .chain([&files.key])
        .chain(files.client_ca.as_ref())
        .map(|p| {
            // `metadata` follows symlinks, so a Kubernetes secret volume's
            // swapped `..data` link counts as a change.
            let m = std::fs::metadata(p).ok()?;
            Some((m.modified().ok()?, m.len()))
        })
        .collect()
}

/// The current TLS config, reread when its files change.
#[derive(Debug)]
pub struct Reloading {
    files: AdminTls,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// The files as they were when `config` was built.
    loaded: Stamp,
    config: Arc<ServerConfig>,
    /// The files as they were when they last failed to load, so a bad set
    /// is logged once rather than on every connection.
    failed: Option<Stamp>,
}

impl Reloading {
    /// Loads the files once; fails if they are unusable now.
    pub fn new(files: AdminTls) -> Result<Self, TlsError> {
        let loaded = stamp(&files);
        let config = load(&files)?;
        Ok(Self {
            files,
            state: Mutex::new(State {
                loaded,
                config,
                failed: None,
            }),
        })
    }

    /// The config to use for a new connection.
    pub fn current(&self) -> Arc<ServerConfig> {
        let now = stamp(&self.files);
        let mut state = self.state.lock().expect("the tls state lock is never poisoned");
        if now == state.loaded || state.failed.as_ref() == Some(&now) {
            return state.config.clone();
        }
        match load(&self.files) {
            Ok(config) => {
                tracing::info!(cert = %self.files.cert.display(), "admin tls certificate reloaded");
                state.config = config;
                state.loaded = now;
                state.failed = None;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot reload the admin tls files; the previous certificate stays in use");
                state.failed = Some(now);
            }
        }
        state.config.clone()
    }
}
