//! The files a reload depends on, and whether any of them changed: the
//! config file and every file it names (user and TOTP key files, the admin
//! token and TLS files), resolved from the config's directory as
//! validation resolves them. Nothing else in any directory is looked at,
//! so a log file written beside the config is not a change.
//!
//! Each look is a `stat` per file, following links: the resolved target's
//! path, device, inode, size, modification and change times. Contents are
//! hashed only when that changed, so an idle gateway costs a few system
//! calls a second however large its directory is, and a file rewritten with
//! the same bytes (a `touch`, an editor's save without edits) is no change.
//!
//! A `stat` is not trusted while the file's change time is within
//! [`RACY`] of the look (git's "racily clean" rule): on a filesystem with
//! coarse timestamps a rewrite of the same size in the same tick leaves the
//! `stat` as it was, so such a file is hashed at every look until it ages.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::config::{self, raw::RawConfig};

/// Larger files count by their `stat` alone (key and config files are
/// a few hundred bytes).
const MAX_HASHED_LEN: u64 = 1 << 20;

/// How long after its last change a file's `stat` is not trusted to show
/// the next one: above any filesystem's timestamp granularity (FAT: 2 s).
const RACY: Duration = Duration::from_secs(3);

/// Every file `raw` (loaded from `config`) names, and `config` itself.
pub fn named_files(config: &Path, raw: &RawConfig) -> Vec<PathBuf> {
    let base = config::base_dir(config);
    let mut files = vec![config.to_path_buf()];
    if let Some(a) = &raw.admin {
        // config/admin.rs trims these; config/spa.rs and knock.rs do not.
        let named = [&a.tls_cert, &a.tls_key, &a.client_ca, &a.token_file];
        files.extend(named.into_iter().flatten().map(|f| base.join(f.trim())));
    }
    files.extend(
        raw.user
            .values()
            .filter_map(|u| u.key_file.as_ref())
            .map(|f| base.join(f)),
    );
    files.extend(
        raw.service
            .values()
            .filter_map(|s| s.knock.as_ref()?.totp.as_ref()?.key_file.as_ref())
            .map(|f| base.join(f)),
    );
    files.sort();
    files.dedup();
    files
}

/// What `stat` says of a file once every link on its way is followed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stat {
    /// The resolved path: a Kubernetes update renames a new `..data` link
    /// over the old one, which changes this even where nothing else would.
    target: PathBuf,
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    /// Changes where `cp -p` or `tar` keep the modification time.
    ctime: (i64, i64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Missing,
    Present { stat: Stat, digest: Option<u64> },
}

fn stat(path: &Path) -> Option<Stat> {
    let target = std::fs::canonicalize(path).ok()?;
    let m = std::fs::metadata(&target).ok()?;
    Some(Stat {
        target,
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
    })
}

fn digest(stat: &Stat) -> Option<u64> {
    if stat.len > MAX_HASHED_LEN {
        return None;
    }
    let bytes = std::fs::read(&stat.target).ok()?;
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    Some(h.finish())
}

/// Whether `stat` was taken so soon after the file changed that a change
/// in the same timestamp tick would not show in it.
fn racy(stat: &Stat, now: SystemTime) -> bool {
    let secs = u64::try_from(stat.ctime.0).unwrap_or(0);
    let nanos = u32::try_from(stat.ctime.1).unwrap_or(0);
    let changed = SystemTime::UNIX_EPOCH + Duration::new(secs, nanos);
    now.duration_since(changed).map_or(true, |age| age < RACY)
}

/// Looks at `path` again at `now`: what is there, and whether that differs
/// in content (or presence) from `before`.
fn look(path: &Path, before: Option<&Seen>, now: SystemTime) -> (Seen, bool) {
    let Some(stat) = stat(path) else {
        return (Seen::Missing, before != Some(&Seen::Missing));
    };
    match before {
        // Unhashed (large) files count by their stat alone, racy or not.
        Some(Seen::Present { stat: old, digest: d }) if *old == stat && (d.is_none() || !racy(&stat, now)) => {
            (Seen::Present { stat, digest: *d }, false)
        }
        Some(Seen::Present { digest: Some(old), .. }) => {
            let now = digest(&stat);
            let changed = now != Some(*old);
            (Seen::Present { stat, digest: now }, changed)
        }
        _ => {
            let digest = digest(&stat);
            (Seen::Present { stat, digest }, true)
        }
    }
}

/// The watched files and what was last seen of each.
#[derive(Debug, Default)]
pub struct Watched {
    files: Vec<(PathBuf, Seen)>,
}

impl Watched {
    /// Watches `files` from their state at `now`.
    pub fn new(files: Vec<PathBuf>, now: SystemTime) -> Watched {
        let mut w = Watched::default();
        w.replace(files, now);
        w
    }

    /// Looks at every file again at `now`: whether any changed since the
    /// last look.
    pub fn changed(&mut self, now: SystemTime) -> bool {
        let mut any = false;
        for (path, seen) in &mut self.files {
            let (state, changed) = look(path, Some(seen), now);
            *seen = state;
            any |= changed;
        }
        any
    }

    /// Watches `files` from now on (after a reload: the files the new
    /// config names), keeping what was last seen of those already watched
    /// so that a change since that look is still noticed.
    pub fn replace(&mut self, files: Vec<PathBuf>, now: SystemTime) {
        let old = std::mem::take(&mut self.files);
        self.files = files
            .into_iter()
            .map(|path| {
                let seen = match old.iter().find(|(p, _)| *p == path) {
                    Some((_, seen)) => seen.clone(),
                    None => look(&path, None, now).0,
                };
                (path, seen)
            })
            .collect();
    }

    /// The watched paths, as the config names them.
    pub fn paths(&self) -> Vec<&Path> {
        self.files.iter().map(|(p, _)| p.as_path()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Clock as _;
    use std::os::unix::fs::symlink;

    fn now() -> SystemTime {
        crate::clock::SystemClock.wall()
    }

    fn raw(text: &str) -> RawConfig {
        config::load_str(text, "test", Default::default()).unwrap()
    }

    #[test]
    fn the_named_files_are_the_config_keys_token_and_tls_resolved_from_its_directory() {
        let text = r#"
[admin]
token_file = " admin.token "
tls_cert = "tls/cert.pem"
tls_key = "/abs/key.pem"
[user.alice]
key_file = "secrets/alice.key"
[user.bob]
key_env = "BOB_KEY"
[service.a]
knock = { totp = { key_file = "a.totp" } }
[service.b]
knock = { sequence = ["1/udp"] }
"#;
        let files = named_files(Path::new("/etc/pc/proxy.toml"), &raw(text));
        let want: Vec<PathBuf> = [
            "/abs/key.pem",
            "/etc/pc/a.totp",
            "/etc/pc/admin.token",
            "/etc/pc/proxy.toml",
            "/etc/pc/secrets/alice.key",
            "/etc/pc/tls/cert.pem",
        ]
        .iter()
        .map(PathBuf::from)
        .collect();
        assert_eq!(files, want);
    }

    #[test]
    fn only_a_content_change_of_a_watched_file_counts() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("proxy.toml");
        let key = dir.path().join("alice.key");
        std::fs::write(&config, "a").unwrap();
        std::fs::write(&key, "k1").unwrap();
        let mut w = Watched::new(vec![config.clone(), key.clone()], now());
        assert!(!w.changed(now()));
        std::fs::write(dir.path().join("up.err"), "a log line").unwrap();
        assert!(!w.changed(now()), "a file nobody named counts");
        // Rewritten with the same bytes: a new stat, the same content.
        let tmp = dir.path().join("proxy.toml.tmp");
        std::fs::write(&tmp, "a").unwrap();
        std::fs::rename(&tmp, &config).unwrap();
        assert!(!w.changed(now()), "the same bytes count");
        std::fs::write(&key, "k2").unwrap();
        assert!(w.changed(now()));
        assert!(!w.changed(now()), "a change counts once");
    }

    #[test]
    fn a_file_that_goes_or_appears_counts() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("alice.key");
        let mut w = Watched::new(vec![key.clone()], now());
        assert!(!w.changed(now()));
        std::fs::write(&key, "k").unwrap();
        assert!(w.changed(now()));
        std::fs::remove_file(&key).unwrap();
        assert!(w.changed(now()));
        assert!(!w.changed(now()));
    }

    #[test]
    fn a_secret_style_link_swap_in_a_subdirectory_counts() {
        // The kubelet's layout: alice.key -> ..data/alice.key, and ..data
        // -> a timestamped directory that an update replaces.
        let dir = tempfile::tempdir().unwrap();
        let secrets = dir.path().join("secrets");
        for (v, key) in [("..v1", "one"), ("..v2", "two")] {
            std::fs::create_dir_all(secrets.join(v)).unwrap();
            std::fs::write(secrets.join(v).join("alice.key"), key).unwrap();
        }
        symlink("..v1", secrets.join("..data")).unwrap();
        symlink("..data/alice.key", secrets.join("alice.key")).unwrap();
        let mut w = Watched::new(vec![secrets.join("alice.key")], now());
        assert!(!w.changed(now()));
        symlink("..v2", secrets.join("..data_tmp")).unwrap();
        std::fs::rename(secrets.join("..data_tmp"), secrets.join("..data")).unwrap();
        assert!(w.changed(now()));
        assert!(!w.changed(now()));
    }

    #[test]
    fn replacing_the_list_keeps_what_was_seen_and_watches_new_files() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, "1").unwrap();
        std::fs::write(&b, "1").unwrap();
        let mut w = Watched::new(vec![a.clone()], now());
        // Changed after the last look and before the list was replaced.
        std::fs::write(&a, "2").unwrap();
        w.replace(vec![a.clone(), b.clone()], now());
        assert!(w.changed(now()), "a change before the replacement was lost");
        std::fs::write(&b, "2").unwrap();
        assert!(w.changed(now()), "the new file is not watched");
        w.replace(vec![b.clone()], now());
        std::fs::write(&a, "3").unwrap();
        assert!(!w.changed(now()), "a file no longer named is still watched");
        assert_eq!(w.paths(), vec![b.as_path()]);
    }

    #[test]
    fn a_stat_is_trusted_only_once_the_file_has_aged() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        std::fs::write(&a, "1").unwrap();
        let fresh = stat(&a).unwrap();
        assert!(racy(&fresh, now()));
        assert!(!racy(&fresh, now() + RACY + Duration::from_secs(1)));
        // An aged stat that is unchanged is not hashed again: a content
        // change it does not show (a coarse timestamp) goes unseen, which
        // is why a fresh one is not trusted.
        let later = now() + RACY + Duration::from_secs(1);
        let before = Seen::Present {
            stat: fresh.clone(),
            digest: Some(0),
        };
        assert!(!look(&a, Some(&before), later).1);
        assert!(look(&a, Some(&before), now()).1, "a fresh stat was trusted");
    }
}
