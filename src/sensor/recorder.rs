//! The replay recorder: the one thread that writes the SPA replay log, so
//! that no SPA sensor ever waits on the disk.
//!
//! A sensor hands each accepted packet (with the room its grants hold in
//! the driver's queue) to [`Recorder::submit`], which never waits. The
//! thread takes every packet queued, writes their digests with one write
//! and one fsync (group commit: a burst of packets shares one disk
//! flush), and only then queues the grants of those seen for the first
//! time. A replay, or a packet whose digest could not be written, is
//! refused and counted: no grant is ever given without its record on disk.
//!
//! One recorder per process, shared by every SPA sensor (the socket
//! sensor and the raw sensor) and kept across reloads.

use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::path::Path;
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::spa::{Counters, RefusalLog};
use crate::driver::Reserved;
use crate::gate::Method;
use crate::replicate::replay::{Shared, SharedReplay};
use crate::spa::desk::{Accepted, Refusal};
use crate::store::replay::{Entry, ReplayLog, Sighting};

/// Accepted packets waiting for the disk; past it a packet is refused as
/// `busy` (not recorded, so it may be sent again). Only authenticated,
/// fresh packets get here.
const QUEUE: usize = 1024;

/// Most packets written with one fsync.
const MAX_BATCH: usize = 256;

/// The handle sensors submit accepted packets to.
#[derive(Debug, Clone)]
pub struct Recorder {
    tx: SyncSender<Pending>,
    log: Arc<ReplayLog>,
    /// Turns true if the writer thread dies of a panic.
    panicked: watch::Receiver<bool>,
}

/// An accepted packet on its way to the replay log, and then to its grants.
#[derive(Debug)]
pub struct Pending {
    pub accepted: Accepted,
    /// Where the packet came from (for the log lines).
    pub source: IpAddr,
    /// The wall-clock second it was verified in.
    pub now_unix: u64,
    /// How long past its timestamp its digest is kept.
    pub keep: Duration,
    /// Room for its grants in the driver's queue, reserved beforehand.
    pub room: Reserved,
}

impl Recorder {
    /// Starts the writer thread over `log`.
    pub fn start(log: ReplayLog) -> io::Result<Self> {
        Self::start_shared(log, None)
    }

    /// [`Recorder::start`], asking the replay cache every replica shares
    /// (`backend = "redis"`) first: a packet is granted only if neither
    /// that cache nor this replica's log has seen it.
    pub fn start_shared(log: ReplayLog, shared: Option<SharedReplay>) -> io::Result<Self> {
        let log = Arc::new(log);
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let writer = log.clone();
        let (panic_tx, panicked) = watch::channel(false);
        std::thread::Builder::new().name("replay log".into()).spawn(move || {
            let _watch = PanicWatch(panic_tx);
            run(&writer, shared, &rx);
        })?;
        Ok(Self { tx, log, panicked })
    }

    /// Resolves if the writer thread dies of a panic: from then on every
    /// SPA packet is refused, so the process is no longer healthy. Never
    /// resolves when the thread ends because every handle is gone.
    pub fn died(&self) -> impl Future<Output = ()> + Send + 'static {
        died(self.panicked.clone())
    }

    /// The directory the log lives in.
    pub fn dir(&self) -> &Path {
        self.log.dir()
    }

    /// Hands an accepted packet to the writer; never waits. A refusal
    /// here drops the packet (and its room) unrecorded.
    pub fn submit(&self, pending: Pending) -> Result<(), Refusal> {
        self.tx.try_send(pending).map_err(|e| match e {
            TrySendError::Full(_) => Refusal::Busy,
            // The writer is gone: nothing can be recorded, so nothing is
            // granted.
            TrySendError::Disconnected(_) => Refusal::ReplayLogFailed,
        })
    }
}

/// Says so on its channel when the thread it lives on unwinds.
struct PanicWatch(watch::Sender<bool>);

impl Drop for PanicWatch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = self.0.send(true);
        }
    }
}

/// Resolves once `panicked` turns true; never if its thread ends well.
async fn died(mut panicked: watch::Receiver<bool>) {
    loop {
        if *panicked.borrow_and_update() {
            return;
        }
        if panicked.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// The writer thread: until every sensor's handle is gone.
fn run(log: &ReplayLog, mut shared: Option<SharedReplay>, rx: &Receiver<Pending>) {
    let mut counters = Counters::default();
    let refusals = RefusalLog::new();
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let entries: Vec<Entry> = batch
            .iter()
            .map(|p| (p.accepted.digest, p.accepted.timestamp))
            .collect();
        let now_unix = batch.iter().map(|p| p.now_unix).max().unwrap_or_default();
        let keep = batch.iter().map(|p| p.keep).max().unwrap_or_default();
        // The shared cache first: only what no replica has seen goes on.
        let verdicts = match shared.as_mut() {
            Some(s) => s.record(&entries, now_unix, keep),
            None => vec![Shared::First; entries.len()],
        };
        let fresh: Vec<Entry> = entries
            .iter()
            .zip(&verdicts)
            .filter(|(_, v)| **v == Shared::First)
            .map(|(e, _)| *e)
            .collect();
        let (local, written) = log.record(&fresh, now_unix, keep);
        let mut local = local.into_iter();
        let sightings: Vec<Result<Sighting, Refusal>> = verdicts
            .iter()
            .map(|v| match v {
                Shared::First => Ok(local.next().unwrap_or(Sighting::Unrecorded)),
                Shared::Replay => Ok(Sighting::Replay),
                Shared::Down => Err(Refusal::StateStoreDown),
                Shared::Hold => Err(Refusal::ReplayWindow),
            })
            .collect();
        if let Err(e) = written {
            tracing::error!(
                error = %e,
                dir = %log.dir().display(),
                "state.dir: cannot write the replay log: spa packets refused until it can"
            );
        }
        for (pending, sighting) in batch.into_iter().zip(sightings) {
            let format = pending.accepted.format;
            match sighting {
                Err(refusal) => refusals.refused(Some(format), refusal, pending.source, None, &mut counters),
                Ok(Sighting::First) => grant(pending, &mut counters),
                Ok(Sighting::Replay) => {
                    refusals.refused(Some(format), Refusal::Replay, pending.source, None, &mut counters)
                }
                Ok(Sighting::Unrecorded) => refusals.refused(
                    Some(format),
                    Refusal::ReplayLogFailed,
                    pending.source,
                    None,
                    &mut counters,
                ),
            }
        }
    }
}

/// Queues the grants of a packet whose digest is on disk (or, for a close
/// request, the ends of them).
fn grant(pending: Pending, counters: &mut Counters) {
    let Pending {
        accepted,
        source,
        mut room,
        ..
    } = pending;
    counters.count(accepted.format.as_label(), "accepted");
    let services: Vec<&str> = accepted.grants.iter().map(|(s, _)| &**s).collect();
    if accepted.close {
        tracing::info!(
            user = %accepted.user,
            %source,
            grantee = %accepted.grantee,
            services = ?services,
            "spa close accepted"
        );
        for (service, _) in accepted.grants {
            let queued = room.revoke(service, accepted.grantee);
            debug_assert!(queued, "room was reserved for every service");
        }
        return;
    }
    tracing::info!(
        user = %accepted.user,
        %source,
        grantee = %accepted.grantee,
        format = accepted.format.as_label(),
        services = ?services,
        "spa accepted"
    );
    for (service, duration) in accepted.grants {
        let method = Method::Spa {
            user: accepted.user.clone(),
        };
        let queued = room.authorize(service, accepted.grantee, method, duration);
        debug_assert!(queued, "room was reserved for every grant");
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods, reason = "deadlines for a thread's answers")]
mod tests {
    use super::*;
    use crate::driver::{DriverHandle, Request};
    use crate::gate::Input;
    use crate::spa::Format;

    const NOW: u64 = 1_800_000_000;
    const KEEP: Duration = Duration::from_secs(180);

    fn pending(driver: &DriverHandle, digest: u8, source: [u8; 4]) -> Pending {
        Pending {
            accepted: Accepted {
                user: "alice".into(),
                format: Format::Native,
                grantee: IpAddr::from(source),
                grants: vec![("pg".into(), Duration::from_secs(30))],
                digest: [digest; 32],
                timestamp: NOW,
                close: false,
            },
            source: IpAddr::from(source),
            now_unix: NOW,
            keep: KEEP,
            room: driver.reserve_grants(1).unwrap(),
        }
    }

    /// The grantee of the next request the driver would see, if one comes.
    fn next_grantee(requests: &mut tokio::sync::mpsc::Receiver<Request>) -> Option<IpAddr> {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            match requests.try_recv() {
                Ok(Request::Input(Input::Authorize { source, .. })) => return Some(source),
                Ok(other) => panic!("unexpected {other:?}"),
                Err(tokio::sync::mpsc::error::TryRecvError::Empty) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return None,
            }
        }
    }

    #[test]
    fn a_grant_is_queued_only_after_its_digest_is_on_disk_and_only_once() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = ReplayLog::open(dir.path(), NOW, KEEP).unwrap();
        let recorder = Recorder::start(log).unwrap();
        let (driver, mut requests) = DriverHandle::channel();
        recorder.submit(pending(&driver, 1, [10, 0, 0, 1])).unwrap();
        assert_eq!(next_grantee(&mut requests), Some(IpAddr::from([10, 0, 0, 1])));
        // The same packet from elsewhere: a replay, no grant. A fresh one
        // after it is granted, so the replay was decided, not still queued.
        recorder.submit(pending(&driver, 1, [10, 0, 0, 2])).unwrap();
        recorder.submit(pending(&driver, 2, [10, 0, 0, 3])).unwrap();
        assert_eq!(next_grantee(&mut requests), Some(IpAddr::from([10, 0, 0, 3])));
        // The thread lets the log go once every handle is gone.
        drop(recorder);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let loaded = loop {
            match ReplayLog::open(dir.path(), NOW, KEEP) {
                Ok((_, loaded)) => break loaded,
                Err(e) if std::time::Instant::now() < deadline => {
                    assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "{e}");
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(loaded.live, 2);
    }

    #[tokio::test]
    async fn a_writer_that_panics_is_reported_and_one_that_ends_well_is_not() {
        let spawn = |fail: bool| {
            let (tx, rx) = watch::channel(false);
            let thread = std::thread::spawn(move || {
                let _watch = PanicWatch(tx);
                assert!(!fail, "the writer fails");
            });
            (thread, rx)
        };
        let (thread, rx) = spawn(true);
        assert!(thread.join().is_err());
        tokio::time::timeout(Duration::from_secs(5), died(rx)).await.unwrap();

        let (thread, rx) = spawn(false);
        thread.join().unwrap();
        let waited = tokio::time::timeout(Duration::from_millis(50), died(rx)).await;
        assert!(waited.is_err(), "a thread that returned was reported as dead");
    }

    #[test]
    fn a_packet_whose_digest_cannot_be_written_is_never_granted() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = ReplayLog::open(dir.path(), NOW, KEEP).unwrap();
        log.fail_writes();
        let recorder = Recorder::start(log).unwrap();
        let (driver, mut requests) = DriverHandle::channel();
        recorder.submit(pending(&driver, 1, [10, 0, 0, 1])).unwrap();
        drop(recorder);
        drop(driver);
        assert_eq!(next_grantee(&mut requests), None);
    }
}
