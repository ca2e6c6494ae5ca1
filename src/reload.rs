//! Where reloads come from: SIGHUP, or a change in the config file or a
//! file it names (`watched`: key files, the admin token and TLS files,
//! wherever they are, Kubernetes' `..data` link swaps included).
//!
//! Why a `stat` of those few files every [`WATCH_INTERVAL`] rather than
//! inotify (the `notify` crate): a watch on a file is lost when Kubernetes
//! replaces the directory it is in, so inotify would need a watch on each
//! directory, events filtered to the named files and `..data`, and the
//! watches rebuilt after each swap and each reload; it sees nothing on some
//! mounts (NFS, FUSE, some overlay set-ups). A look at a handful of files a
//! second is a few system calls, costs nothing measurable while idle, does
//! not depend on the filesystem, and follows whatever link chain a mount
//! uses. A file nobody named, such as a log written beside the config,
//! is never looked at. The list is taken again from each config read.
//!
//! A config that fails validation is reported with every problem and
//! never reaches the server: the running config stays.

mod watched;

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::clock::{Clock as _, SystemClock};
use crate::config::{self, Config};
use crate::metrics::{self, ReloadResult};
pub use watched::{named_files, Watched};

/// How often the watched files are looked at.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// Watches for SIGHUP from the moment it returns, so that a reload asked
/// for right after start-up (before the watch task first runs) is not
/// taken by the default action, which ends the process.
pub fn hangups() -> Option<tokio::signal::unix::Signal> {
    match crate::drain::hangups() {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "reloads follow file changes only");
            None
        }
    }
}

/// What the config and the files it names look like when the gateway
/// reads its config at start: taken before anything is bound, so a change
/// made right after start-up (before the watch task first runs) is seen
/// as one.
#[derive(Debug)]
pub struct Baseline(Watched);

/// The [`Baseline`] of the config at `path`, now.
pub fn baseline(path: &Path) -> Baseline {
    Baseline(Watched::new(
        files_of(path, config::load(path).ok().as_ref()),
        SystemClock.wall(),
    ))
}

/// Sends each new valid config from `path` on `tx` until `stop`, on each
/// SIGHUP seen by `hup` (from [`hangups`]) and each change of the config
/// file or a file it names since `baseline`.
pub async fn watch(
    path: PathBuf,
    baseline: Baseline,
    mut hup: Option<tokio::signal::unix::Signal>,
    tx: mpsc::Sender<Config>,
    stop: CancellationToken,
) {
    let clock = SystemClock;
    let Baseline(mut watched) = baseline;
    tracing::debug!(files = ?watched.paths(), "watching for changes");
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let trigger = tokio::select! {
            _ = stop.cancelled() => return,
            _ = async { match hup.as_mut() { Some(h) => { h.recv().await; } None => std::future::pending().await } } => {
                // What changed before the signal is read now, not again
                // at the next tick.
                watched.changed(clock.wall());
                "SIGHUP"
            }
            _ = tick.tick() => {
                if !watched.changed(clock.wall()) {
                    continue;
                }
                "file change"
            }
        };
        tracing::info!(trigger, path = %path.display(), "reloading config");
        let raw = config::load(&path);
        if let Ok(raw) = &raw {
            // Taken from an invalid config too: the key file it is
            // waiting for may appear next.
            watched.replace(files_of(&path, Some(raw)), clock.wall());
            tracing::debug!(files = ?watched.paths(), "watching for changes");
        }
        match raw.and_then(|raw| config::from_raw(&raw, &path)) {
            Ok(c) => {
                c.log_warnings();
                if tx.send(c).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                metrics::config_reload(ReloadResult::Failure);
                tracing::error!(
                    problems = %e.to_json(),
                    "config reload failed: the running config is unchanged"
                );
            }
        }
    }
}

/// The files to watch: those `raw` names, or the config alone when it
/// cannot be read.
fn files_of(path: &Path, raw: Option<&config::raw::RawConfig>) -> Vec<PathBuf> {
    match raw {
        Some(raw) => named_files(path, raw),
        None => vec![path.to_path_buf()],
    }
}
