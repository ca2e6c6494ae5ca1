//! The SPA replay log: every accepted packet's digest, kept on disk under
//! `state.dir` so that a restart forgets nothing a replayer could use.
//!
//! A digest is written and fsync'd before its grant is given, and is kept
//! until the packet's own timestamp has left the acceptance window, in
//! wall-clock seconds (the clock and resolution the window is checked in),
//! plus [`MARGIN`]. A packet stamped ahead of the gateway's clock is thus
//! remembered until its time has come and gone, across any number of
//! restarts.
//!
//! The file (`replay.log`) is a header and fixed-size records (digest,
//! packet timestamp, checksum), appended one per accepted packet. A torn
//! last record (a crash mid-write) fails its checksum or is short, and is
//! ignored on load; nothing accepted is lost, since a packet is only
//! honoured once its record is on disk. When the file has grown to twice
//! the live entries it is compacted: the live entries are written to a
//! temporary file, which is fsync'd and renamed over the log, and the
//! directory is fsync'd. Loading always compacts, so every start begins
//! from a clean file.
//!
//! This module owns the file and the in-memory table; it does not decide
//! which packets are accepted (the SPA desk does) and reads no clock.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest, Sha256};

/// How long past the acceptance window a digest is kept: covers a wall
/// clock stepped back by up to this much after a digest was forgotten.
pub const MARGIN: Duration = Duration::from_secs(60);

/// The log's file name inside `state.dir`.
pub const FILE_NAME: &str = "replay.log";

/// The first bytes of a replay log (format version 1).
const MAGIC: &[u8; 8] = b"PCRPLAY1";
/// Digest, packet timestamp (u64 LE), checksum.
const RECORD_LEN: usize = 32 + 8 + CHECK_LEN;
/// The first bytes of SHA-256 over the digest and timestamp.
const CHECK_LEN: usize = 8;
/// Fewest records in the file before growth triggers a compaction (fewer
/// in unit tests, where each record costs a real fsync).
const COMPACT_MIN: usize = if cfg!(test) { 64 } else { 4096 };
/// Held by the running process, so two never share one log.
const LOCK_NAME: &str = "replay.lock";

/// The persisted replay log. One per process; shared by every SPA sensor.
#[derive(Debug)]
pub struct ReplayLog {
    dir: PathBuf,
    inner: Mutex<Inner>,
    /// Held (flock'd) for the life of the log.
    _lock: Flock<File>,
}

#[derive(Debug)]
struct Inner {
    /// The log, positioned at its end.
    file: File,
    /// Digest → the packet's own timestamp (unix seconds).
    seen: HashMap<[u8; 32], u64, foldhash::fast::RandomState>,
    /// Records in the file (live or not).
    records: usize,
    /// Records at which the file is next compacted.
    compact_at: usize,
    /// A write failed: the file's tail is unknown until rewritten.
    broken: bool,
}

/// What [`ReplayLog::record`] made of one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sighting {
    /// Never seen before, and now on disk: the packet may be honoured.
    First,
    /// Recorded before (or earlier in the same batch): a replay.
    Replay,
    /// Never seen before, but the write failed: refuse it (it may be sent
    /// again).
    Unrecorded,
}

/// What loading found besides the live entries.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Loaded {
    /// Entries still inside their window, kept.
    pub live: usize,
    /// Entries past their window, dropped.
    pub expired: usize,
    /// Records whose checksum failed (a torn last write, or damage).
    pub damaged: usize,
    /// Whether the file ended in a partial record (a torn write).
    pub torn_tail: bool,
}

impl ReplayLog {
    /// Opens (creating as needed, mode 0700) `dir` and the log in it,
    /// loads the entries still live at `now_unix` under `keep`, and
    /// rewrites the file with only those. Fails if another process holds
    /// the log.
    pub fn open(dir: &Path, now_unix: u64, keep: Duration) -> io::Result<(Self, Loaded)> {
        fs::DirBuilder::new().recursive(true).mode_private().create(dir)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode_private()
            .open(dir.join(LOCK_NAME))?;
        let lock = Flock::lock(lock, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| match errno {
            Errno::EWOULDBLOCK => io::Error::new(
                io::ErrorKind::WouldBlock,
                "the replay log is in use by another running portcullis",
            ),
            errno => io::Error::from(errno),
        })?;
        let path = dir.join(FILE_NAME);
        let mut bytes = Vec::new();
        match File::open(&path) {
            Ok(mut f) => {
                f.read_to_end(&mut bytes)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let (entries, mut loaded) = parse(&bytes)?;
        let mut seen = HashMap::default();
        for (digest, stamped) in entries {
            if is_live(stamped, now_unix, keep) {
                seen.insert(digest, stamped);
            } else {
                loaded.expired += 1;
            }
        }
        loaded.live = seen.len();
        let (file, records) = rewrite(dir, &seen)?;
        let log = Self {
            dir: dir.to_path_buf(),
            inner: Mutex::new(Inner {
                file,
                seen,
                records,
                compact_at: (2 * records).max(COMPACT_MIN),
                broken: false,
            }),
            _lock: lock,
        };
        Ok((log, loaded))
    }

    /// Records the digest of a packet stamped `stamped_unix`, durably,
    /// unless it was recorded before. `Ok(false)` is a replay; an error
    /// means the digest could not be made durable and the packet must be
    /// refused (it is not recorded, so it may be sent again).
    pub fn first_sighting(
        &self,
        digest: &[u8; 32],
        stamped_unix: u64,
        now_unix: u64,
        keep: Duration,
    ) -> io::Result<bool> {
        let (sightings, written) = self.record(&[(*digest, stamped_unix)], now_unix, keep);
        written?;
        Ok(sightings.first() == Some(&Sighting::First))
    }

    /// Records a batch of packets' digests with one write and one fsync
    /// (group commit): each is a [`Sighting`]; when the write failed, the
    /// error comes back beside them and every digest that would have been
    /// first is [`Sighting::Unrecorded`]. A digest twice in one batch is a
    /// replay the second time.
    pub fn record(&self, batch: &[Entry], now_unix: u64, keep: Duration) -> (Vec<Sighting>, io::Result<()>) {
        let mut inner = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // A digest covers the packet's timestamp, so a recorded one is a
        // replay whether or not it has expired (an expired one would be
        // refused as stale anyway).
        let mut fresh: Vec<usize> = Vec::with_capacity(batch.len());
        let mut sightings: Vec<Sighting> = Vec::with_capacity(batch.len());
        for (i, (digest, _)) in batch.iter().enumerate() {
            if inner.seen.contains_key(digest) || fresh.iter().any(|&j| batch[j].0 == *digest) {
                sightings.push(Sighting::Replay);
            } else {
                fresh.push(i);
                sightings.push(Sighting::First);
            }
        }
        if fresh.is_empty() {
            return (sightings, Ok(()));
        }
        if let Err(e) = inner.append(&self.dir, fresh.iter().map(|&i| &batch[i]), now_unix, keep) {
            for &i in &fresh {
                sightings[i] = Sighting::Unrecorded;
            }
            return (sightings, Err(e));
        }
        for &i in &fresh {
            let (digest, stamped) = batch[i];
            inner.seen.insert(digest, stamped);
        }
        inner.records += fresh.len();
        if inner.records >= inner.compact_at {
            // The records are already durable: a failed compaction leaves
            // the old file (or the new one) whole, and is retried on the
            // next packet.
            if let Err(e) = inner.compact(&self.dir, now_unix, keep) {
                inner.broken = true;
                tracing::warn!(error = %e, dir = %self.dir.display(), "replay log compaction failed");
            }
        }
        (sightings, Ok(()))
    }

    /// Digests held in memory (live, or expired since the last compaction).
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .seen
            .len()
    }

    /// Whether no digest is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The directory the log lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Inner {
    /// Appends `entries` and fsyncs, after rewriting a file whose tail a
    /// failed write left unknown. A failure leaves it unknown again.
    fn append<'a>(
        &mut self,
        dir: &Path,
        entries: impl Iterator<Item = &'a Entry>,
        now_unix: u64,
        keep: Duration,
    ) -> io::Result<()> {
        if self.broken {
            self.compact(dir, now_unix, keep)?;
        }
        let bytes: Vec<u8> = entries.flat_map(|(digest, stamped)| record(digest, *stamped)).collect();
        let written = self.file.write_all(&bytes).and_then(|()| self.file.sync_data());
        if written.is_err() {
            self.broken = true;
        }
        written
    }

    /// Drops expired entries and rewrites the file with the rest.
    fn compact(&mut self, dir: &Path, now_unix: u64, keep: Duration) -> io::Result<()> {
        self.seen.retain(|_, stamped| is_live(*stamped, now_unix, keep));
        let (file, records) = rewrite(dir, &self.seen)?;
        self.file = file;
        self.records = records;
        self.compact_at = (2 * records).max(COMPACT_MIN);
        self.broken = false;
        Ok(())
    }
}

/// Whether a packet stamped `stamped` may still be inside the window at
/// `now` (whole seconds, as the window compares them).
fn is_live(stamped: u64, now_unix: u64, keep: Duration) -> bool {
    now_unix <= stamped.saturating_add(keep.as_secs())
}

/// A digest and its packet's timestamp (unix seconds).
pub type Entry = ([u8; 32], u64);

fn record(digest: &[u8; 32], stamped_unix: u64) -> [u8; RECORD_LEN] {
    let mut r = [0u8; RECORD_LEN];
    r[..32].copy_from_slice(digest);
    r[32..40].copy_from_slice(&stamped_unix.to_le_bytes());
    let check = Sha256::digest(&r[..40]);
    r[40..].copy_from_slice(&check[..CHECK_LEN]);
    r
}

/// The entries of a log file's bytes; damaged records are skipped and
/// counted, a partial last record ignored.
fn parse(bytes: &[u8]) -> io::Result<(Vec<Entry>, Loaded)> {
    let mut loaded = Loaded::default();
    if bytes.is_empty() {
        return Ok((Vec::new(), loaded));
    }
    let body = bytes.strip_prefix(MAGIC).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{FILE_NAME} is not a portcullis replay log (version 1)"),
        )
    })?;
    let chunks = body.chunks_exact(RECORD_LEN);
    loaded.torn_tail = !chunks.remainder().is_empty();
    let mut entries = Vec::with_capacity(body.len() / RECORD_LEN);
    for chunk in chunks {
        let digest: [u8; 32] = chunk[..32].try_into().expect("a record holds 32 digest bytes");
        let stamped = u64::from_le_bytes(chunk[32..40].try_into().expect("a record holds 8 timestamp bytes"));
        if record(&digest, stamped)[40..] == chunk[40..] {
            entries.push((digest, stamped));
        } else {
            loaded.damaged += 1;
        }
    }
    Ok((entries, loaded))
}

/// Writes `seen` as a fresh log: temporary file, fsync, rename, fsync of
/// the directory. Returns the new log, positioned at its end.
fn rewrite(dir: &Path, seen: &HashMap<[u8; 32], u64, foldhash::fast::RandomState>) -> io::Result<(File, usize)> {
    let tmp = dir.join(format!("{FILE_NAME}.tmp"));
    let mut bytes = Vec::with_capacity(MAGIC.len() + seen.len() * RECORD_LEN);
    bytes.extend_from_slice(MAGIC);
    for (digest, stamped) in seen {
        bytes.extend_from_slice(&record(digest, *stamped));
    }
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode_private()
        .open(&tmp)?;
    file.write_all(&bytes)?;
    file.sync_all()?;
    fs::rename(&tmp, dir.join(FILE_NAME))?;
    File::open(dir)?.sync_all()?;
    Ok((file, seen.len()))
}

/// Mode 0600 files and 0700 directories: digests are not secret, but the
/// state directory is nobody else's business.
trait Private {
    fn mode_private(&mut self) -> &mut Self;
}

impl Private for fs::DirBuilder {
    fn mode_private(&mut self) -> &mut Self {
        std::os::unix::fs::DirBuilderExt::mode(self, 0o700)
    }
}

impl Private for OpenOptions {
    fn mode_private(&mut self) -> &mut Self {
        std::os::unix::fs::OpenOptionsExt::mode(self, 0o600)
    }
}

#[cfg(test)]
impl ReplayLog {
    /// Makes every write fail from now on, as a failed disk would: the
    /// file is swapped for a read-only handle (appends fail) and the
    /// directory removed (the rewrite that would heal it fails too).
    #[allow(clippy::unwrap_used, reason = "test helper")]
    pub(crate) fn fail_writes(&self) {
        let mut inner = self.inner.lock().unwrap();
        inner.file = File::open(self.dir.join(FILE_NAME)).unwrap();
        fs::remove_dir_all(&self.dir).unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::spa::desk::unix_secs;

    const KEEP: Duration = Duration::from_secs(180);

    fn digest(i: u32) -> [u8; 32] {
        let mut d = [0u8; 32];
        d[..4].copy_from_slice(&i.to_le_bytes());
        d
    }

    fn file_len(dir: &Path) -> u64 {
        fs::metadata(dir.join(FILE_NAME)).unwrap().len()
    }

    #[test]
    fn digests_survive_a_reopen_and_are_seen_once() {
        let dir = tempfile::tempdir().unwrap();
        let now = 1_800_000_000;
        {
            let (log, loaded) = ReplayLog::open(dir.path(), now, KEEP).unwrap();
            assert_eq!(loaded, Loaded::default());
            assert!(log.first_sighting(&digest(1), now, now, KEEP).unwrap());
            assert!(!log.first_sighting(&digest(1), now, now, KEEP).unwrap(), "a replay");
            assert!(log.first_sighting(&digest(2), now + 100, now, KEEP).unwrap());
        }
        let (log, loaded) = ReplayLog::open(dir.path(), now + 5, KEEP).unwrap();
        assert_eq!(loaded.live, 2);
        assert!(!log.first_sighting(&digest(1), now, now + 5, KEEP).unwrap());
        assert!(!log.first_sighting(&digest(2), now + 100, now + 5, KEEP).unwrap());
        assert!(log.first_sighting(&digest(3), now, now + 5, KEEP).unwrap());
    }

    #[test]
    fn a_batch_is_written_at_once_and_a_digest_twice_in_it_is_a_replay() {
        let dir = tempfile::tempdir().unwrap();
        let now = 1_800_000_000;
        let (log, _) = ReplayLog::open(dir.path(), now, KEEP).unwrap();
        assert!(log.first_sighting(&digest(1), now, now, KEEP).unwrap());
        let batch = [
            (digest(1), now),
            (digest(2), now),
            (digest(2), now),
            (digest(3), now + 5),
        ];
        let (sightings, written) = log.record(&batch, now, KEEP);
        written.unwrap();
        use Sighting::*;
        assert_eq!(sightings, [Replay, First, Replay, First]);
        assert_eq!(file_len(dir.path()), (MAGIC.len() + 3 * RECORD_LEN) as u64);
        drop(log);
        let (_, loaded) = ReplayLog::open(dir.path(), now, KEEP).unwrap();
        assert_eq!(loaded.live, 3);

        // A failed write: the new digests are unrecorded, the replay stays one.
        let (log, _) = ReplayLog::open(dir.path(), now, KEEP).unwrap();
        log.fail_writes();
        let (sightings, written) = log.record(&[(digest(1), now), (digest(4), now)], now, KEEP);
        assert!(written.is_err());
        assert_eq!(sightings, [Replay, Unrecorded]);
    }

    #[test]
    fn a_second_process_cannot_open_a_held_log() {
        let dir = tempfile::tempdir().unwrap();
        let _held = ReplayLog::open(dir.path(), 0, KEEP).unwrap();
        let err = ReplayLog::open(dir.path(), 0, KEEP).unwrap_err();
        assert!(err.to_string().contains("in use"), "{err}");
    }

    #[test]
    fn a_torn_last_record_is_ignored_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        let now = 1_800_000_000;
        {
            let (log, _) = ReplayLog::open(dir.path(), now, KEEP).unwrap();
            for i in 0..3 {
                assert!(log.first_sighting(&digest(i), now, now, KEEP).unwrap());
            }
        }
        // A crash halfway through a fourth record.
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(FILE_NAME))
            .unwrap();
        f.write_all(&record(&digest(3), now)[..20]).unwrap();
        drop(f);
        let (log, loaded) = ReplayLog::open(dir.path(), now, KEEP).unwrap();
        assert!(loaded.torn_tail);
        assert_eq!((loaded.live, loaded.damaged), (3, 0));
        // The file was rewritten whole: new records append cleanly.
        assert_eq!(file_len(dir.path()), (MAGIC.len() + 3 * RECORD_LEN) as u64);
        assert!(log.first_sighting(&digest(3), now, now, KEEP).unwrap());
        drop(log);

        // A whole-length record whose bytes did not all reach the disk.
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(FILE_NAME))
            .unwrap();
        let mut bad = record(&digest(4), now);
        bad[45] ^= 0xff;
        f.write_all(&bad).unwrap();
        drop(f);
        let (log, loaded) = ReplayLog::open(dir.path(), now, KEEP).unwrap();
        assert_eq!((loaded.live, loaded.damaged, loaded.torn_tail), (4, 1, false));
        assert!(!log.first_sighting(&digest(3), now, now, KEEP).unwrap());
    }

    #[test]
    fn a_file_that_is_not_a_replay_log_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(FILE_NAME), b"something else entirely").unwrap();
        let err = ReplayLog::open(dir.path(), 0, KEEP).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn the_file_is_compacted_to_the_live_entries_when_it_grows() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new();
        let (log, _) = ReplayLog::open(dir.path(), unix_secs(&clock), KEEP).unwrap();
        let n = 3 * COMPACT_MIN as u32;
        for i in 0..n {
            let now = unix_secs(&clock);
            assert!(log.first_sighting(&digest(i), now, now, KEEP).unwrap());
            clock.advance(Duration::from_secs(2));
        }
        // 384 s of packets, one every 2 s; only the last KEEP's worth live.
        let live = KEEP.as_secs() as usize / 2 + 1;
        // Compaction runs when the file doubles, so at most twice that.
        assert!(log.len() <= 2 * live, "{} digests held of {n}", log.len());
        let records = (file_len(dir.path()) as usize - MAGIC.len()) / RECORD_LEN;
        assert!(records <= 2 * live, "{records} records in the file of {n}");
        assert!(!dir.path().join(format!("{FILE_NAME}.tmp")).exists());
        // The newest packets are still remembered, in memory and on disk.
        let now = unix_secs(&clock);
        assert!(!log.first_sighting(&digest(n - 1), now, now, KEEP).unwrap());
        drop(log);
        let (log, _) = ReplayLog::open(dir.path(), now, KEEP).unwrap();
        assert!(!log.first_sighting(&digest(n - 1), now, now, KEEP).unwrap());
    }

    /// The cost of one accepted packet: a record appended and fsync'd.
    /// `PORTCULLIS_REPLAY_BENCH_DIR=/var/lib/x cargo test --lib -- --ignored
    /// --nocapture replay_write_cost` measures a chosen file system.
    #[test]
    #[ignore = "a measurement, not a check"]
    #[allow(clippy::disallowed_methods, reason = "real time is what is measured")]
    fn replay_write_cost() {
        let base = std::env::var_os("PORTCULLIS_REPLAY_BENCH_DIR").map_or_else(std::env::temp_dir, PathBuf::from);
        let dir = tempfile::tempdir_in(base).unwrap();
        let (log, _) = ReplayLog::open(dir.path(), 0, KEEP).unwrap();
        let mut took: Vec<Duration> = (0..500u32)
            .map(|i| {
                let start = std::time::Instant::now();
                assert!(log.first_sighting(&digest(i), 0, 0, KEEP).unwrap());
                start.elapsed()
            })
            .collect();
        took.sort();
        println!(
            "replay log write in {}: p50 {:?}, p99 {:?}, max {:?}",
            dir.path().display(),
            took[took.len() / 2],
            took[took.len() * 99 / 100],
            took[took.len() - 1]
        );
    }

    #[test]
    fn a_digest_is_kept_until_its_timestamp_leaves_the_window_by_wall_clock() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new();
        let start = unix_secs(&clock);
        // Stamped 90 s ahead of the gateway's clock.
        let stamped = start + 90;
        {
            let (log, _) = ReplayLog::open(dir.path(), start, KEEP).unwrap();
            assert!(log.first_sighting(&digest(1), stamped, start, KEEP).unwrap());
        }
        // Its last second inside the window plus the margin: still held.
        clock.advance(Duration::from_secs(90 + KEEP.as_secs()));
        let (log, loaded) = ReplayLog::open(dir.path(), unix_secs(&clock), KEEP).unwrap();
        assert_eq!(loaded.live, 1);
        assert!(!log
            .first_sighting(&digest(1), stamped, unix_secs(&clock), KEEP)
            .unwrap());
        drop(log);
        // One second later it is forgotten on the next load.
        clock.advance(Duration::from_secs(1));
        let (log, loaded) = ReplayLog::open(dir.path(), unix_secs(&clock), KEEP).unwrap();
        assert_eq!((loaded.live, loaded.expired), (0, 1));
        assert!(log.is_empty());
    }

    #[test]
    fn a_failed_write_refuses_and_the_log_heals_on_the_next_packet() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = ReplayLog::open(dir.path(), 0, KEEP).unwrap();
        // Swap the log's file for a read-only handle: the next append fails.
        {
            let mut inner = log.inner.lock().unwrap();
            inner.file = File::open(dir.path().join(FILE_NAME)).unwrap();
        }
        assert!(log.first_sighting(&digest(1), 0, 0, KEEP).is_err());
        assert!(log.is_empty(), "a digest not made durable is not recorded");
        assert!(log.first_sighting(&digest(1), 0, 0, KEEP).unwrap());
        drop(log);
        let (log, loaded) = ReplayLog::open(dir.path(), 0, KEEP).unwrap();
        assert_eq!(loaded.live, 1);
        assert!(!log.first_sighting(&digest(1), 0, 0, KEEP).unwrap());
    }
}
