//! The SPA replay cache every replica shares: one key per accepted
//! packet's digest, set with `SET NX PX`, so that of two replicas that
//! receive the same packet at once exactly one grants it.
//!
//! The recorder's thread asks this before it writes its own replay log
//! (the shared answer comes first; the local log still catches a packet
//! this replica saw before Redis lost it). It runs on that thread with a
//! blocking connection: the SPA sensors never wait on it.

use std::sync::Arc;
use std::time::Duration;

use super::Link;

/// How long one round trip to Redis may take before the packet is refused.
const TIMEOUT: Duration = Duration::from_secs(1);

/// What the shared cache says of one digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shared {
    /// Recorded now: no replica has seen it.
    First,
    /// Another packet with this digest was recorded before.
    Replay,
    /// Redis could not be asked: refuse (`state_store_down`).
    Down,
    /// Redis lost its digests lately: refuse (`replay_window`).
    Hold,
}

/// The recorder thread's connection to the shared replay cache.
pub struct SharedReplay {
    link: Arc<Link>,
    con: Option<redis::Connection>,
}

impl std::fmt::Debug for SharedReplay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedReplay")
            .field("connected", &self.con.is_some())
            .finish_non_exhaustive()
    }
}

impl SharedReplay {
    pub(super) fn new(link: Arc<Link>) -> Self {
        Self { link, con: None }
    }

    /// Records each `(digest, packet timestamp)` of `entries` that no
    /// replica recorded before, kept until `timestamp + keep` (unix
    /// seconds, as the local log keeps it), and says which were new.
    pub fn record(&mut self, entries: &[([u8; 32], u64)], now_unix: u64, keep: Duration) -> Vec<Shared> {
        if !self.link.is_up() {
            return vec![Shared::Down; entries.len()];
        }
        if self.link.wall_ms() < self.link.spa_hold_until() {
            return vec![Shared::Hold; entries.len()];
        }
        match self.try_record(entries, now_unix, keep) {
            Ok(set) => set
                .into_iter()
                .map(|s| if s.is_some() { Shared::First } else { Shared::Replay })
                .collect(),
            Err(e) => {
                self.con = None;
                tracing::warn!(error = %e, "state store: the spa replay check failed: packets refused as state_store_down");
                vec![Shared::Down; entries.len()]
            }
        }
    }

    fn try_record(
        &mut self,
        entries: &[([u8; 32], u64)],
        now_unix: u64,
        keep: Duration,
    ) -> redis::RedisResult<Vec<Option<String>>> {
        if self.con.is_none() {
            let con = self.link.thread_client()?.get_connection_with_timeout(TIMEOUT)?;
            con.set_read_timeout(Some(TIMEOUT))?;
            con.set_write_timeout(Some(TIMEOUT))?;
            self.con = Some(con);
        }
        let con = self.con.as_mut().expect("connected just above");
        let mut pipe = redis::pipe();
        for (digest, timestamp) in entries {
            let until = timestamp.saturating_add(keep.as_secs());
            let ms = until.saturating_sub(now_unix).saturating_mul(1000).max(1000);
            pipe.cmd("SET")
                .arg(format!("{}{}", self.link.keys.spa, hex(digest)))
                .arg(1)
                .arg("NX")
                .arg("PX")
                .arg(ms);
        }
        pipe.query(con)
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}
