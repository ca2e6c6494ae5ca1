//! Binds every socket, then runs until shutdown, then drains.
//!
//! [`bind`] opens every socket of a config (the same binding a reload uses:
//! [`handover`]); [`Bound::run`] starts the admin endpoint, the gate
//! driver and the data plane (`runtime`), swaps in each reloaded config,
//! and on SIGTERM stops the listeners, drains connections within the grace
//! period and cuts what is left. If a core task dies (the driver, a
//! sensor, an accept loop), `/healthz` fails and `run` returns an error so
//! the process exits non-zero and its supervisor restarts it.

pub mod handover;
mod runtime;
mod traps;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, Readiness};
use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::drain::Lifecycle;
use crate::driver::{Driver, DriverHandle, Effects, InputLog, LocalLog};
use crate::gate::Gate;
use crate::guard::SourceGuard;
use crate::metrics::{self, ReloadResult};
use crate::sensor::recorder::Recorder;
use crate::spa::desk::unix_secs;
use crate::store::{GrantStore, MemoryStore};
use crate::{proxy, sensor, udp};
use anyhow::Context as _;
use handover::{Endpoint, Socket};
pub use runtime::ReloadSummary;

/// Every socket, bound and not yet served.
#[derive(Debug)]
pub struct Bound {
    config: Config,
    sockets: HashMap<Endpoint, Socket>,
    admin: Option<admin::Listener>,
    readiness: Readiness,
    /// Whether the raw sensor watches the knock and SPA ports.
    raw: bool,
    /// The SPA replay log's writer under `state.dir`, when the config has SPA.
    replay: Option<Recorder>,
}

/// Binds every guarded listener, knock endpoint and the SPA and admin
/// ports of `config`, and opens the SPA replay log under `state.dir`.
/// Errors name the config key whose address could not be bound, or
/// `state.dir`.
pub fn bind(mut config: Config) -> anyhow::Result<Bound> {
    // Before any socket, so it is there when the first accept runs short.
    crate::net::keep_reserve().context("the reserve descriptor")?;
    let raw = sensor::raw::resolve(config.gateway.sensor).context("gateway.sensor")?;
    traps::pick(&mut config, None, traps::avoided(raw))?;
    if raw {
        sensor::raw::fixed_ports(&config)?;
    }
    let wanted = handover::endpoints(&config, raw);
    let plan = handover::plan(&[], &wanted.iter().map(|(e, _)| e.clone()).collect::<Vec<_>>());
    let sockets = handover::bind_all(&plan.bind, &wanted)?;
    let admin = config.admin.as_ref().map(admin::bind).transpose()?;
    let replay = runtime::open_replay(&config, unix_secs(&SystemClock))?;
    Ok(Bound {
        config,
        sockets,
        admin,
        readiness: Readiness::new(),
        raw,
        replay,
    })
}

impl Bound {
    /// The real address of each guarded listener (port 0 resolved).
    pub fn guarded_addrs(&self) -> Vec<(Arc<str>, SocketAddr)> {
        runtime::guarded_addrs(&self.config, &self.sockets)
    }

    /// The real address of the admin listener, if there is one.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|a| a.local_addr().ok())
    }

    /// The readiness latch `run` sets: ready once serving, draining once
    /// shutdown begins.
    pub fn readiness(&self) -> Readiness {
        self.readiness.clone()
    }

    /// Serves until `shutdown` is cancelled, then drains. Each config that
    /// arrives on `reloads` (already validated) is swapped in.
    pub async fn run(self, shutdown: CancellationToken, reloads: mpsc::Receiver<Config>) -> anyhow::Result<()> {
        let store: Arc<dyn GrantStore> = match crate::replicate::Replication::process(&self.config)? {
            Some(shared) => shared.store(),
            None => Arc::new(MemoryStore::new()),
        };
        self.run_with(store, Arc::new(SystemClock), shutdown, reloads).await
    }

    /// [`Bound::run`] with a chosen store and clock.
    pub async fn run_with(
        self,
        store: Arc<dyn GrantStore>,
        clock: Arc<dyn Clock>,
        shutdown: CancellationToken,
        mut reloads: mpsc::Receiver<Config>,
    ) -> anyhow::Result<()> {
        let Bound {
            config,
            sockets,
            admin,
            readiness,
            raw,
            replay,
        } = self;
        let life = Lifecycle::new();
        let (failures_tx, mut failures) = mpsc::unbounded_channel();
        if let Some(recorder) = &replay {
            runtime::watch_recorder(recorder, &failures_tx);
        }
        let (driver, requests) = DriverHandle::channel();
        let guard = Arc::new(SourceGuard::new(config.limits));
        // Started first, so probes are answered (503) while the rest starts.
        let admin = match admin {
            Some(listener) => {
                let addr = listener.local_addr()?;
                tracing::info!(kind = "admin", %addr, tls = listener.is_tls(), "listening");
                let context = admin::Context {
                    store: store.clone(),
                    clock: clock.clone(),
                    driver: driver.clone(),
                    guard: guard.clone(),
                    readiness: readiness.clone(),
                };
                Some(admin::spawn(listener, context)?)
            }
            None => None,
        };
        let effects = Effects {
            store: store.clone(),
            clock: clock.clone(),
            guard: guard.clone(),
        };
        let rules = runtime::rules(&config);
        // Several replicas share one gate through Redis: the same inputs
        // in the same order for every replica's gate.
        let log: Box<dyn InputLog> = match crate::replicate::Replication::process(&config)? {
            Some(shared) => Box::new(shared.log(&rules)),
            None => Box::new(LocalLog::default()),
        };
        let gate = Gate::new(rules, runtime::gate_limits(&config));
        let gate_driver = Driver::new(gate, log, requests, effects)
            .with_totp(runtime::totp_rules(&config), config.gateway.max_knock_attempts);
        let driver_stop = life.stop().clone();
        let driver_task = runtime::supervise(
            "gate driver".into(),
            driver_stop.clone(),
            failures_tx.clone(),
            gate_driver.run(driver_stop),
        );
        let proxy = Arc::new(proxy::Shared::new(
            store.clone(),
            clock.clone(),
            config.gateway.clone(),
            life.clone(),
            config.limits.ipv6_prefix,
        ));
        let udp = Arc::new(udp::Shared {
            store: store.clone(),
            clock: clock.clone(),
            life: life.clone(),
        });
        tokio::spawn(trim_heap(life.clone()));
        let grace = config.gateway.shutdown_grace;
        let mut runtime = runtime::Runtime::new(runtime::Parts {
            config,
            proxy,
            udp,
            driver,
            guard,
            clock,
            failures: failures_tx,
            raw,
            replay,
        });
        runtime.start(sockets).await?;
        readiness.set_ready();
        tracing::info!("ready");
        crate::notify::ready();

        let mut failed = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(what) = failures.recv() => {
                    tracing::error!(task = %what, "a core task died: shutting down so that a supervisor restarts the process");
                    readiness.set_failed();
                    failed = Some(what);
                    break;
                }
                Some(new) = reloads.recv() => match crate::notify::reloading(runtime.reload(new)).await {
                    Ok(summary) => {
                        metrics::config_reload(ReloadResult::Success);
                        tracing::info!(
                            added = summary.added,
                            removed = summary.removed,
                            changed = summary.changed,
                            "config reloaded"
                        );
                    }
                    Err(e) => {
                        metrics::config_reload(ReloadResult::Failure);
                        tracing::error!(error = %format!("{e:#}"), "config reload failed: the running config is unchanged");
                    }
                },
            }
        }

        readiness.set_draining();
        crate::notify::stopping();
        tracing::info!("shutting down");
        life.stop().cancel();
        runtime.stop_all().await;
        let _ = driver_task.await;
        tracing::info!(
            in_flight = life.active(),
            grace_s = grace.as_secs_f64(),
            "listeners closed, draining connections"
        );
        if !life.drained_within(grace).await {
            tracing::warn!(
                cut = life.active(),
                "grace period over: cutting the connections still open"
            );
            life.cut_rest().await;
        }
        // The admin endpoint answers (readyz: 503) until the drain is over.
        if let Some(admin) = admin {
            admin.stop().await;
        }
        tracing::info!("stopped");
        match failed {
            Some(what) => Err(anyhow::anyhow!("a core task died: {what}")),
            None => Ok(()),
        }
    }
}

/// How often [`trim_heap`] looks at the connection count.
const TRIM_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// When to give freed memory back after connections close: once the count
/// has fallen by at least `min_drop` and to half its peak or less since the
/// last trim. Trimming walks the heap, so it waits for a real drop, not
/// every close.
#[derive(Debug)]
struct TrimPolicy {
    peak: usize,
    min_drop: usize,
}

impl TrimPolicy {
    fn new(min_drop: usize) -> Self {
        Self { peak: 0, min_drop }
    }

    /// Sees the current count; true when it is time to trim.
    fn observe(&mut self, active: usize) -> bool {
        self.peak = self.peak.max(active);
        if self.peak - active >= self.min_drop && active <= self.peak / 2 {
            self.peak = active;
            return true;
        }
        false
    }
}

/// Gives the allocator's free memory back to the kernel after a burst of
/// connections has closed, so RSS follows the load down.
async fn trim_heap(life: Lifecycle) {
    let mut policy = TrimPolicy::new(256);
    let mut every = tokio::time::interval(TRIM_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = life.stop().cancelled() => return,
            _ = every.tick() => {}
        }
        if policy.observe(life.active()) {
            let released = crate::sys::trim_heap();
            tracing::debug!(released, "heap trimmed after connections closed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::TrimPolicy;

    #[test]
    fn the_heap_is_trimmed_after_a_large_drop_only() {
        let mut p = TrimPolicy::new(256);
        // Growing and small dips: nothing to give back.
        for active in [0, 100, 1_000, 900, 1_000, 600] {
            assert!(!p.observe(active), "at {active}");
        }
        // Down to half the peak, and by more than the minimum: trim once.
        assert!(p.observe(500));
        assert!(!p.observe(400), "the peak restarts from the trim");
        assert!(!p.observe(300));
        assert!(p.observe(0), "a further drop of 500 from 500");
        // A small load never trims, however far it falls.
        let mut small = TrimPolicy::new(256);
        for active in [200, 0, 200, 0] {
            assert!(!small.observe(active));
        }
    }
}
