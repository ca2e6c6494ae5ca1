//! Where reloads come from: SIGHUP, or a change in the config file's
//! directory. Kubernetes swaps a ConfigMap by renaming a directory, which a
//! watch on the file itself misses, so the whole directory (its regular
//! files, following links) is fingerprinted on a short interval.
//!
//! A config that fails validation is reported with every problem and
//! never reaches the server: the running config stays.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{self, Config};
use crate::metrics::{self, ReloadResult};

/// How often the config directory is checked for changes.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// Files in the directory past which the rest are not looked at.
const MAX_FILES: usize = 256;
/// Larger files count by size and modification time only.
const MAX_HASHED_LEN: u64 = 1 << 20;

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

/// Sends each new valid config from `path` on `tx` until `stop`, on each
/// SIGHUP seen by `hup` (from [`hangups`]) and each change in the
/// config's directory.
pub async fn watch(
    path: PathBuf,
    mut hup: Option<tokio::signal::unix::Signal>,
    tx: mpsc::Sender<Config>,
    stop: CancellationToken,
) {
    let dir = config::base_dir(&path);
    let dir = if dir.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        dir
    };
    let mut last = fingerprint(&dir);
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let trigger = tokio::select! {
            _ = stop.cancelled() => return,
            _ = async { match hup.as_mut() { Some(h) => { h.recv().await; } None => std::future::pending().await } } => "SIGHUP",
            _ = tick.tick() => {
                let now = fingerprint(&dir);
                if now == last {
                    continue;
                }
                last = now;
                "file change"
            }
        };
        tracing::info!(trigger, path = %path.display(), "reloading config");
        match config::from_file(&path) {
            Ok(c) => {
                if tx.send(c).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                metrics::config_reload(ReloadResult::Failure);
                let problems: Vec<String> = e.problems.iter().map(ToString::to_string).collect();
                tracing::error!(
                    problems = ?problems,
                    "config reload failed: the running config is unchanged"
                );
            }
        }
    }
}

/// A hash of the directory's regular files: names, sizes and contents.
fn fingerprint(dir: &Path) -> u64 {
    let mut h = DefaultHasher::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut files: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    files.sort();
    for file in files.into_iter().take(MAX_FILES) {
        // `metadata` follows links, as a ConfigMap's files are links.
        let Ok(meta) = std::fs::metadata(&file) else { continue };
        if !meta.is_file() {
            continue;
        }
        file.hash(&mut h);
        meta.len().hash(&mut h);
        if meta.len() <= MAX_HASHED_LEN {
            if let Ok(bytes) = std::fs::read(&file) {
                bytes.hash(&mut h);
            }
        } else {
            meta.modified().ok().hash(&mut h);
        }
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fingerprint_follows_contents_and_names_in_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("proxy.toml"), "a").unwrap();
        let a = fingerprint(dir.path());
        assert_eq!(a, fingerprint(dir.path()));
        std::fs::write(dir.path().join("proxy.toml"), "b").unwrap();
        let b = fingerprint(dir.path());
        assert_ne!(a, b);
        std::fs::write(dir.path().join("alice.key"), "k").unwrap();
        assert_ne!(b, fingerprint(dir.path()));
    }

    #[test]
    fn a_swapped_link_counts_as_a_change() {
        // The Kubernetes layout: proxy.toml -> ..data/proxy.toml, and
        // ..data -> a timestamped directory that an update replaces.
        let dir = tempfile::tempdir().unwrap();
        let v1 = dir.path().join("v1");
        let v2 = dir.path().join("v2");
        std::fs::create_dir(&v1).unwrap();
        std::fs::create_dir(&v2).unwrap();
        std::fs::write(v1.join("proxy.toml"), "one").unwrap();
        std::fs::write(v2.join("proxy.toml"), "two").unwrap();
        std::os::unix::fs::symlink(&v1, dir.path().join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/proxy.toml", dir.path().join("proxy.toml")).unwrap();
        let before = fingerprint(dir.path());
        let tmp = dir.path().join("..data_tmp");
        std::os::unix::fs::symlink(&v2, &tmp).unwrap();
        std::fs::rename(&tmp, dir.path().join("..data")).unwrap();
        assert_ne!(before, fingerprint(dir.path()));
    }
}
