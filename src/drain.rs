//! The lifecycle every listener and connection shares: when to stop
//! accepting, when to cut what is still open, which tasks are in flight,
//! and the signals that start a shutdown or a reload.
//!
//! It owns no sockets and knows nothing of TCP or UDP: the proxy, the UDP
//! services and the server depend on it, not on each other.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Stop, cut and the task tracker, shared by everything that serves.
#[derive(Debug, Clone, Default)]
pub struct Lifecycle {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Stops accept loops, sensors and blackholes; ends UDP sessions.
    stop: CancellationToken,
    /// Cuts proxied connections when the shutdown grace runs out.
    cut: CancellationToken,
    tracker: TaskTracker,
    /// Proxied connections in flight.
    active: AtomicUsize,
}

impl Lifecycle {
    pub fn new() -> Self {
        Self::default()
    }

    /// Cancelled when shutdown begins.
    pub fn stop(&self) -> &CancellationToken {
        &self.inner.stop
    }

    /// Cancelled when the grace period is over.
    pub fn cut(&self) -> &CancellationToken {
        &self.inner.cut
    }

    /// Where connection and session tasks run, so that a drain can wait
    /// for them whatever happened to the loop that spawned them.
    pub fn tracker(&self) -> &TaskTracker {
        &self.inner.tracker
    }

    /// Proxied connections in flight now.
    pub fn active(&self) -> usize {
        self.inner.active.load(Ordering::Relaxed)
    }

    /// Counts one proxied connection until the guard is dropped.
    pub fn in_flight(&self) -> InFlight {
        self.inner.active.fetch_add(1, Ordering::Relaxed);
        InFlight {
            inner: self.inner.clone(),
        }
    }

    /// Stops every listener, then waits up to `grace` for the tasks in
    /// flight. True when they all ended; otherwise [`Lifecycle::cut_rest`]
    /// ends them.
    pub async fn drained_within(&self, grace: std::time::Duration) -> bool {
        self.inner.stop.cancel();
        self.inner.tracker.close();
        tokio::time::timeout(grace, self.inner.tracker.wait()).await.is_ok()
    }

    /// Cuts every proxied connection still open and waits for their tasks.
    pub async fn cut_rest(&self) {
        self.inner.cut.cancel();
        self.inner.tracker.close();
        self.inner.tracker.wait().await;
    }
}

/// One proxied connection in flight (see [`Lifecycle::in_flight`]).
#[derive(Debug)]
pub struct InFlight {
    inner: Arc<Inner>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.inner.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// SIGTERM and SIGINT, watched from the moment [`shutdown_signals`]
/// returns (so a signal that arrives before [`Signals::next`] is first
/// polled is not lost to the default action). The first starts a drain; a
/// second, while it runs, is the operator saying "now".
/// (SIGHUP means reload: see [`hangups`].)
#[derive(Debug)]
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

/// Exit status of a process a second signal ends mid-drain: 128 + SIGINT,
/// as a shell reports an interrupted command.
pub const EXIT_INTERRUPTED: u8 = 130;

impl Signals {
    /// The next SIGTERM or SIGINT, logged; its name.
    pub async fn next(&mut self) -> &'static str {
        let name = tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "signal received");
        name
    }
}

/// Starts watching SIGTERM and SIGINT (see [`Signals`]).
pub fn shutdown_signals() -> anyhow::Result<Signals> {
    use tokio::signal::unix::{signal, SignalKind};
    Ok(Signals {
        term: signal(SignalKind::terminate()).context("cannot watch SIGTERM")?,
        int: signal(SignalKind::interrupt()).context("cannot watch SIGINT")?,
    })
}

/// A stream of SIGHUPs, each a request to reload the config.
pub fn hangups() -> anyhow::Result<tokio::signal::unix::Signal> {
    use tokio::signal::unix::{signal, SignalKind};
    signal(SignalKind::hangup()).context("cannot watch SIGHUP")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn in_flight_guards_count_until_dropped() {
        let life = Lifecycle::new();
        let a = life.in_flight();
        let b = life.in_flight();
        assert_eq!(life.active(), 2);
        drop(a);
        assert_eq!(life.active(), 1);
        drop(b);
        assert_eq!(life.active(), 0);
    }

    #[tokio::test]
    async fn drain_cuts_what_outlives_the_grace() {
        let life = Lifecycle::new();
        let task = life.clone();
        life.tracker().spawn(async move {
            let _conn = task.in_flight();
            task.cut().cancelled().await;
        });
        let quick = life.clone();
        life.tracker().spawn(async move {
            quick.stop().cancelled().await;
        });
        tokio::task::yield_now().await;
        assert!(!life.drained_within(Duration::from_millis(50)).await);
        assert_eq!(life.active(), 1, "the straggler is still in flight");
        life.cut_rest().await;
        assert!(life.cut().is_cancelled());
        assert_eq!(life.active(), 0);
    }

    #[tokio::test]
    async fn drain_without_stragglers_cuts_nothing() {
        let life = Lifecycle::new();
        let task = life.clone();
        life.tracker().spawn(async move { task.stop().cancelled().await });
        assert!(life.drained_within(Duration::from_secs(5)).await);
        assert!(!life.cut().is_cancelled());
    }
}
