//! Binds every socket, then runs: sensors feed the gate driver, the driver
//! applies the gate's decisions to the store, guarded listeners consult the
//! store. Shutdown stops the listeners, drains connections within the grace
//! period, and cuts what is left.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, Readiness};
use crate::clock::{Clock, SystemClock};
use crate::config::{Config, Service};
use crate::gate::{Event, Gate, GateLimits, Input, KnockResult, Method, ServiceRule};
use crate::guard::{SourceGuard, StrikeOutcome};
use crate::metrics;
use crate::net;
use crate::proxy::{self, Shared};
use crate::sensor;
use crate::step::{Proto, Step};
use crate::store::{GrantStore, MemoryStore};
use crate::udp;

/// Inputs queued between the sensors and the gate; past it knocks are dropped.
const GATE_QUEUE: usize = 4096;

/// Rejected SPA packets logged per second at most; the rest are counted.
const SPA_LOG_RATE: std::num::NonZeroU32 = std::num::NonZeroU32::new(20).expect("20 is not zero");

/// Every socket, bound and not yet served.
#[derive(Debug)]
pub struct Bound {
    config: Config,
    guarded: Vec<(Arc<Service>, Guarded)>,
    udp_knocks: Vec<(UdpSocket, Step)>,
    tcp_knocks: Vec<(TcpListener, Step)>,
    spa: Option<UdpSocket>,
    admin: Option<admin::Listener>,
    readiness: Readiness,
}

/// A guarded service's socket.
#[derive(Debug)]
enum Guarded {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

impl Guarded {
    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match self {
            Guarded::Tcp(l) => l.local_addr(),
            Guarded::Udp(s) => s.local_addr(),
        }
    }
}

/// Binds every guarded listener and knock endpoint of `config`. Errors name
/// the config key whose address could not be bound.
pub fn bind(config: Config) -> anyhow::Result<Bound> {
    let mut guarded = Vec::new();
    for service in &config.services {
        let what = || format!("cannot listen on service.{}.listen ({})", service.name, service.listen);
        let listener = match service.protocol {
            Proto::Tcp => Guarded::Tcp(net::bind_tcp(service.listen).with_context(what)?),
            Proto::Udp => Guarded::Udp(net::bind_udp(service.listen).with_context(what)?),
        };
        guarded.push((Arc::new(service.clone()), listener));
    }
    let mut endpoints: BTreeMap<Step, String> = BTreeMap::new();
    for service in &config.services {
        if let Some(rule) = &service.knock {
            for step in &rule.sequence {
                endpoints
                    .entry(*step)
                    .or_insert_with(|| format!("service.{}.knock.sequence", service.name));
            }
            for step in &rule.trap {
                endpoints
                    .entry(*step)
                    .or_insert_with(|| format!("service.{}.knock.trap_ports", service.name));
            }
        }
    }
    let mut udp_knocks = Vec::new();
    let mut tcp_knocks = Vec::new();
    for (step, path) in endpoints {
        let what = || format!("cannot listen on {step} from {path}");
        match step.proto {
            Proto::Udp => udp_knocks.push((net::bind_udp_timestamped(step.addr).with_context(what)?, step)),
            Proto::Tcp => tcp_knocks.push((net::bind_tcp(step.addr).with_context(what)?, step)),
        }
    }
    let spa = match &config.spa {
        Some(s) => Some(
            net::bind_udp_sensor(s.listen).with_context(|| format!("cannot listen on spa.listen ({})", s.listen))?,
        ),
        None => None,
    };
    let admin = config.admin.as_ref().map(admin::bind).transpose()?;
    Ok(Bound {
        config,
        guarded,
        udp_knocks,
        tcp_knocks,
        spa,
        admin,
        readiness: Readiness::new(),
    })
}

impl Bound {
    /// The real address of each guarded listener (port 0 resolved).
    pub fn guarded_addrs(&self) -> Vec<(Arc<str>, SocketAddr)> {
        self.guarded
            .iter()
            .filter_map(|(s, l)| l.local_addr().ok().map(|a| (s.name.clone(), a)))
            .collect()
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

    /// Serves until `shutdown` is cancelled, then drains.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        self.run_with(Arc::new(MemoryStore::new()), Arc::new(SystemClock), shutdown)
            .await
    }

    /// [`Bound::run`] with a chosen store and clock.
    pub async fn run_with(
        self,
        store: Arc<dyn GrantStore>,
        clock: Arc<dyn Clock>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let Bound {
            config,
            guarded,
            udp_knocks,
            tcp_knocks,
            spa,
            admin,
            readiness,
        } = self;
        let started_unix = sensor::spa::unix_secs(&*clock);
        let bound_addrs: Vec<(Arc<str>, SocketAddr)> = guarded
            .iter()
            .filter_map(|(s, l)| l.local_addr().ok().map(|a| (s.name.clone(), a)))
            .collect();
        let guard = Arc::new(SourceGuard::new(config.limits));
        let shared = Arc::new(Shared::new(store.clone(), clock.clone(), config.gateway.clone()));
        let (tx, rx) = mpsc::channel(GATE_QUEUE);
        // Started first, so probes are answered (503) while the rest starts.
        let admin = match admin {
            Some(listener) => {
                let addr = listener.local_addr()?;
                tracing::info!(kind = "admin", %addr, tls = listener.is_tls(), "listening");
                let context = admin::Context {
                    store: store.clone(),
                    clock: clock.clone(),
                    gate: tx.clone(),
                    readiness: readiness.clone(),
                };
                Some(admin::spawn(listener, context)?)
            }
            None => None,
        };
        let mut tasks = tokio::task::JoinSet::new();

        let rules = config
            .services
            .iter()
            .map(|s| ServiceRule {
                name: s.name.clone(),
                open_for: s.open_for,
                knock: s.knock.clone(),
            })
            .collect();
        let gate = Gate::new(
            rules,
            GateLimits {
                max_attempts: config.gateway.max_knock_attempts,
            },
        );
        let intake = sensor::Intake {
            tx: tx.clone(),
            guard: guard.clone(),
            clock: clock.clone(),
        };
        if let Some(socket) = spa {
            tracing::info!(kind = "spa", addr = %socket.local_addr()?, users = config.users.len(), "listening");
            let spa_sensor = sensor::spa::SpaSensor {
                desk: sensor::spa::SpaDesk::new(&config, &bound_addrs, started_unix),
                guard: guard.clone(),
                store: store.clone(),
                clock: clock.clone(),
                log_limit: governor::RateLimiter::direct(governor::Quota::per_second(SPA_LOG_RATE)),
            };
            tasks.spawn(sensor::spa::run(socket, spa_sensor, tx.clone(), shared.stop.clone()));
        }
        tasks.spawn(drive_gate(gate, rx, store, clock, guard, shared.stop.clone()));

        for (service, listener) in guarded {
            let addr = listener.local_addr()?;
            tracing::info!(kind = "guarded", service = %service.name, protocol = service.protocol.as_str(), %addr, upstream = %service.upstream, unauthorized = service.unauthorized.as_str(), "listening");
            match listener {
                Guarded::Tcp(l) => tasks.spawn(proxy::serve(l, service, shared.clone())),
                Guarded::Udp(s) => tasks.spawn(udp::serve(s, service, shared.clone())),
            };
        }
        for (listener, step) in tcp_knocks {
            let step = Step {
                proto: step.proto,
                addr: listener.local_addr()?,
            };
            tracing::info!(kind = "knock", %step, "listening");
            tasks.spawn(sensor::run_tcp(listener, step, intake.clone(), shared.stop.clone()));
        }
        for (socket, step) in &udp_knocks {
            tracing::info!(kind = "knock", step = %Step { proto: step.proto, addr: socket.local_addr()? }, "listening");
        }
        if !udp_knocks.is_empty() {
            tasks.spawn(sensor::run_udp(udp_knocks, intake.clone(), shared.stop.clone()));
        }
        drop(intake);
        drop(tx);
        readiness.set_ready();
        tracing::info!("ready");

        shutdown.cancelled().await;
        readiness.set_draining();
        let grace = shared.gateway.shutdown_grace;
        tracing::info!("shutting down");
        shared.stop.cancel();
        shared.tracker.close();
        while tasks.join_next().await.is_some() {}
        tracing::info!(
            in_flight = shared.active.load(Ordering::Relaxed),
            grace = %humantime::format_duration(grace),
            "listeners closed, draining connections"
        );
        if tokio::time::timeout(grace, shared.tracker.wait()).await.is_err() {
            let cut = shared.active.load(Ordering::Relaxed);
            tracing::warn!(cut, "grace period over: cutting the connections still open");
            shared.cut.cancel();
            shared.tracker.wait().await;
        }
        // The admin endpoint answers (readyz: 503) until the drain is over.
        if let Some(admin) = admin {
            admin.stop().await;
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// Feeds knocks and deadlines to the gate and applies what it decides.
async fn drive_gate(
    mut gate: Gate,
    mut rx: mpsc::Receiver<Input>,
    store: Arc<dyn GrantStore>,
    clock: Arc<dyn Clock>,
    guard: Arc<SourceGuard>,
    stop: CancellationToken,
) {
    let mut events = Vec::new();
    loop {
        let deadline = gate.next_deadline();
        tokio::select! {
            _ = stop.cancelled() => return,
            input = rx.recv() => match input {
                Some(input) => {
                    let knocker = match &input {
                        Input::Knock(k) => Some(k.source),
                        _ => None,
                    };
                    gate.handle(input, clock.now(), &mut events);
                    if let Some(source) = knocker {
                        strike_if_bad(&events, source, &guard, &*clock);
                    }
                }
                None => return,
            },
            _ = sleep_until(deadline), if deadline.is_some() => gate.handle_timeout(clock.now(), &mut events),
        }
        for event in events.drain(..) {
            apply(event, &*store, &*clock);
        }
    }
}

/// A knock that moved no service forward and reset or missed at least one
/// counts against its source (sweeps and guessing end in a lockout).
fn strike_if_bad(events: &[Event], source: IpAddr, guard: &SourceGuard, clock: &dyn Clock) {
    let mut bad = false;
    for e in events {
        if let Event::Knock { result, source: s, .. } = e {
            if *s != source {
                continue;
            }
            match result {
                KnockResult::Advanced { .. } | KnockResult::Repeated { .. } => return,
                KnockResult::Reset(_) | KnockResult::Ignored => bad = true,
            }
        }
    }
    if bad && guard.strike(source, clock.now()) == StrikeOutcome::LockedOut {
        metrics::lockout();
        tracing::warn!(%source, "source locked out after repeated wrong knocks");
    }
}

async fn sleep_until(deadline: Option<std::time::Instant>) {
    if let Some(d) = deadline {
        tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await;
    }
}

fn apply(event: Event, store: &dyn GrantStore, clock: &dyn Clock) {
    match event {
        Event::Knock {
            service,
            source,
            step,
            result,
        } => {
            metrics::knock(&service, result);
            tracing::debug!(%service, %source, %step, result = result.as_label(), "knock");
        }
        Event::AttemptExpired { service, source, cause } => {
            metrics::attempt_expired(&service, cause);
            tracing::debug!(%service, %source, cause = cause.as_label(), "knock attempt ended");
        }
        Event::Granted(grant) => {
            // The store mirrors the gate, which ends an expired grant
            // before granting again: a grant already held is being renewed.
            if !store.holds(&grant.service, grant.source) {
                metrics::grants_active(&grant.service, 1.0);
            }
            store.insert(&grant);
            metrics::grant(&grant.service, &grant.method);
            let open_for = grant.expires_at.saturating_duration_since(clock.now());
            let user = match &grant.method {
                Method::Spa { user } => Some(user.to_string()),
                Method::Knock => None,
            };
            tracing::info!(
                service = %grant.service,
                source = %grant.source,
                method = grant.method.as_label(),
                user,
                open_for = %humantime::format_duration(round_ms(open_for)),
                "grant"
            );
        }
        Event::GrantExpired(grant) => {
            if store
                .remove_expired(&grant.service, grant.source, clock.now())
                .is_some()
            {
                metrics::grant_expired(&grant.service);
                metrics::grants_active(&grant.service, -1.0);
                tracing::info!(service = %grant.service, source = %grant.source, method = grant.method.as_label(), "grant expired");
            }
        }
        Event::Revoked(grant) => {
            if store.revoke(&grant.service, grant.source).is_some() {
                metrics::grants_active(&grant.service, -1.0);
            }
            tracing::info!(service = %grant.service, source = %grant.source, method = grant.method.as_label(), "grant revoked");
        }
    }
}

fn round_ms(d: std::time::Duration) -> std::time::Duration {
    std::time::Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Resolves on SIGTERM or SIGINT. SIGHUP is logged and otherwise ignored,
/// so it cannot kill the process.
pub async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let mut hup = signal(SignalKind::hangup()).context("cannot watch SIGHUP")?;
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!(signal = "SIGTERM", "signal received"); return Ok(()) }
            _ = int.recv() => { tracing::info!(signal = "SIGINT", "signal received"); return Ok(()) }
            _ = hup.recv() => tracing::warn!(signal = "SIGHUP", "config reload is not available in this version; the running config is unchanged"),
        }
    }
}
