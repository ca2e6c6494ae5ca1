//! Binds every socket, then runs: sensors feed the gate driver, the driver
//! applies the gate's decisions to the store, guarded listeners consult the
//! store. A reload swaps in a new config without closing what stays: a
//! listener whose address is unchanged keeps its socket (connections
//! waiting in its backlog are not refused), grants and established
//! connections survive. Shutdown stops the listeners, drains connections
//! within the grace period, and cuts what is left.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, Readiness};
use crate::clock::{Clock, SystemClock};
use crate::config::{Config, Service};
use crate::gate::{Event, Gate, GateLimits, Input, KnockResult, Method, ServiceRule};
use crate::guard::{SourceGuard, StrikeOutcome};
use crate::metrics::{self, ReloadResult};
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

/// Where audit lines (grants, expiries, revocations) are logged.
pub const AUDIT_TARGET: &str = "portcullis::audit";

/// Every socket, bound and not yet served.
#[derive(Debug)]
pub struct Bound {
    config: Config,
    sockets: Sockets,
    admin: Option<admin::Listener>,
    readiness: Readiness,
}

/// The data-plane sockets of one config.
#[derive(Debug, Default)]
struct Sockets {
    guarded: Vec<(Arc<Service>, Guarded)>,
    udp_knocks: Vec<(UdpSocket, Step)>,
    tcp_knocks: Vec<(TcpListener, Step)>,
    spa: Option<UdpSocket>,
}

/// A guarded service's socket.
#[derive(Debug)]
enum Guarded {
    Tcp(TcpListener),
    Udp(Arc<UdpSocket>),
}

impl Guarded {
    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match self {
            Guarded::Tcp(l) => l.local_addr(),
            Guarded::Udp(s) => s.local_addr(),
        }
    }
}

/// Sockets of the running config that a new config may take over.
#[derive(Debug, Default)]
struct Reusable {
    /// With the service each was bound for.
    guarded: Vec<(Arc<Service>, Guarded)>,
    udp_knocks: HashMap<Step, UdpSocket>,
    tcp_knocks: HashMap<Step, TcpListener>,
    spa: Option<(SocketAddr, UdpSocket)>,
}

impl Reusable {
    /// Adds `other`'s sockets after this one's (which are taken first).
    fn absorb(&mut self, other: Reusable) {
        self.guarded.extend(other.guarded);
        for (step, s) in other.udp_knocks {
            self.udp_knocks.entry(step).or_insert(s);
        }
        for (step, l) in other.tcp_knocks {
            self.tcp_knocks.entry(step).or_insert(l);
        }
        if self.spa.is_none() {
            self.spa = other.spa;
        }
    }

    /// The socket of a running service with the same name, protocol and
    /// listen address, or of any running service on the same fixed address.
    fn take_guarded(&mut self, service: &Service) -> Option<Guarded> {
        let same = |old: &Service| old.protocol == service.protocol && old.listen == service.listen;
        let pos = self
            .guarded
            .iter()
            .position(|(old, _)| same(old) && old.name == service.name)
            .or_else(|| {
                (service.listen.port() != 0)
                    .then(|| self.guarded.iter().position(|(old, _)| same(old)))
                    .flatten()
            })?;
        Some(self.guarded.swap_remove(pos).1)
    }
}

/// Binds every guarded listener and knock endpoint of `config`. Errors name
/// the config key whose address could not be bound.
pub fn bind(config: Config) -> anyhow::Result<Bound> {
    let sockets = bind_sockets(&config, &mut Reusable::default())?;
    let admin = config.admin.as_ref().map(admin::bind).transpose()?;
    Ok(Bound {
        config,
        sockets,
        admin,
        readiness: Readiness::new(),
    })
}

/// Binds what `config` needs, taking what it can from `reuse`. On error,
/// sockets taken from `reuse` are lost with the new ones, so a caller that
/// must keep running puts everything back only after success (see
/// [`Runtime::reload`], which stops nothing before this succeeds).
fn bind_sockets(config: &Config, reuse: &mut Reusable) -> anyhow::Result<Sockets> {
    let mut sockets = Sockets::default();
    for service in &config.services {
        let listener = match reuse.take_guarded(service) {
            Some(g) => g,
            None => {
                let what = || format!("cannot listen on service.{}.listen ({})", service.name, service.listen);
                match service.protocol {
                    Proto::Tcp => Guarded::Tcp(net::bind_tcp(service.listen).with_context(what)?),
                    Proto::Udp => Guarded::Udp(Arc::new(net::bind_udp(service.listen).with_context(what)?)),
                }
            }
        };
        sockets.guarded.push((Arc::new(service.clone()), listener));
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
    for (step, path) in endpoints {
        let what = || format!("cannot listen on {step} from {path}");
        match step.proto {
            Proto::Udp => {
                let socket = match reuse.udp_knocks.remove(&step) {
                    Some(s) => s,
                    None => net::bind_udp_timestamped(step.addr).with_context(what)?,
                };
                sockets.udp_knocks.push((socket, step));
            }
            Proto::Tcp => {
                let listener = match reuse.tcp_knocks.remove(&step) {
                    Some(l) => l,
                    None => net::bind_tcp(step.addr).with_context(what)?,
                };
                sockets.tcp_knocks.push((listener, step));
            }
        }
    }
    if let Some(spa) = &config.spa {
        let socket = match reuse.spa.take() {
            Some((addr, socket)) if addr == spa.listen => socket,
            other => {
                reuse.spa = other;
                net::bind_udp_sensor(spa.listen)
                    .with_context(|| format!("cannot listen on spa.listen ({})", spa.listen))?
            }
        };
        sockets.spa = Some(socket);
    }
    Ok(sockets)
}

impl Bound {
    /// The real address of each guarded listener (port 0 resolved).
    pub fn guarded_addrs(&self) -> Vec<(Arc<str>, SocketAddr)> {
        self.sockets
            .guarded
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

    /// Serves until `shutdown` is cancelled, then drains. Each config that
    /// arrives on `reloads` (already validated) is swapped in.
    pub async fn run(self, shutdown: CancellationToken, reloads: mpsc::Receiver<Config>) -> anyhow::Result<()> {
        self.run_with(Arc::new(MemoryStore::new()), Arc::new(SystemClock), shutdown, reloads)
            .await
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
        } = self;
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
        let guard = Arc::new(SourceGuard::new(config.limits));
        let gate = Gate::new(rules(&config), gate_limits(&config));
        let driver = tokio::spawn(drive_gate(
            gate,
            rx,
            store.clone(),
            clock.clone(),
            guard.clone(),
            shared.stop.clone(),
        ));
        tokio::spawn(trim_heap(shared.clone()));
        let mut runtime = Runtime {
            started_unix: sensor::spa::unix_secs(&*clock),
            config,
            shared: shared.clone(),
            tx,
            guard,
            store,
            clock,
            services: HashMap::new(),
            udp_sessions: HashMap::new(),
            sensors: Vec::new(),
            sensors_stop: CancellationToken::new(),
        };
        runtime.start(sockets)?;
        readiness.set_ready();
        tracing::info!("ready");
        crate::notify::ready();

        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
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
        let grace = shared.gateway.shutdown_grace;
        tracing::info!("shutting down");
        shared.stop.cancel();
        shared.tracker.close();
        runtime.stop_all().await;
        let _ = driver.await;
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

fn rules(config: &Config) -> Vec<ServiceRule> {
    config
        .services
        .iter()
        .map(|s| ServiceRule {
            name: s.name.clone(),
            open_for: s.open_for,
            knock: s.knock.clone(),
        })
        .collect()
}

fn gate_limits(config: &Config) -> GateLimits {
    GateLimits {
        max_attempts: config.gateway.max_knock_attempts,
    }
}

/// A running guarded service.
#[derive(Debug)]
struct ServiceTask {
    service: Arc<Service>,
    stop: CancellationToken,
    handle: JoinHandle<Guarded>,
}

/// A running sensor; each hands its sockets back when stopped.
#[derive(Debug)]
enum SensorTask {
    UdpKnocks(JoinHandle<Vec<(UdpSocket, Step)>>),
    TcpKnock(Step, JoinHandle<TcpListener>),
    Spa(SocketAddr, JoinHandle<UdpSocket>),
}

/// What a reload changed, for its log line.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReloadSummary {
    pub added: usize,
    pub removed: usize,
    pub changed: usize,
}

/// The running data plane of one config.
#[derive(Debug)]
struct Runtime {
    config: Config,
    shared: Arc<Shared>,
    tx: mpsc::Sender<Input>,
    guard: Arc<SourceGuard>,
    store: Arc<dyn GrantStore>,
    clock: Arc<dyn Clock>,
    started_unix: u64,
    services: HashMap<Arc<str>, ServiceTask>,
    /// UDP services' session tables by service name, kept across reloads
    /// so established flows survive them.
    udp_sessions: HashMap<Arc<str>, Arc<udp::Sessions>>,
    /// Every sensor task, stopped together by `sensors_stop`.
    sensors: Vec<SensorTask>,
    sensors_stop: CancellationToken,
}

impl Runtime {
    /// Starts serving `sockets` for `self.config`, logging each listener.
    fn start(&mut self, sockets: Sockets) -> anyhow::Result<()> {
        let Sockets {
            guarded,
            udp_knocks,
            tcp_knocks,
            spa,
        } = sockets;
        self.sensors_stop = self.shared.stop.child_token();
        let sensors_stop = self.sensors_stop.clone();
        let intake = sensor::Intake {
            tx: self.tx.clone(),
            guard: self.guard.clone(),
            clock: self.clock.clone(),
        };
        let mut bound = Vec::with_capacity(guarded.len());
        for (service, listener) in guarded {
            let addr = listener.local_addr()?;
            bound.push((service.name.clone(), addr));
            tracing::info!(kind = "guarded", service = %service.name, protocol = service.protocol.as_str(), %addr, upstream = %service.upstream, unauthorized = service.unauthorized.as_str(), "listening");
            self.spawn_service(service, listener);
        }
        if let Some(socket) = spa {
            let addr = socket.local_addr()?;
            tracing::info!(kind = "spa", %addr, users = self.config.users.len(), "listening");
            let spa_sensor = sensor::spa::SpaSensor {
                desk: sensor::spa::SpaDesk::new(&self.config, &bound, self.started_unix),
                guard: self.guard.clone(),
                store: self.store.clone(),
                clock: self.clock.clone(),
                log_limit: governor::RateLimiter::direct(governor::Quota::per_second(SPA_LOG_RATE)),
            };
            let run = sensor::spa::run(socket, spa_sensor, self.tx.clone(), sensors_stop.clone());
            // Keyed by the configured address, as a reloaded config names it
            // (port 0 included), not by the port the kernel chose.
            let configured = self.config.spa.as_ref().map_or(addr, |s| s.listen);
            self.sensors.push(SensorTask::Spa(configured, tokio::spawn(run)));
        }
        for (listener, step) in tcp_knocks {
            tracing::info!(kind = "knock", step = %Step { proto: step.proto, addr: listener.local_addr()? }, "listening");
            let run = sensor::run_tcp(listener, step, intake.clone(), sensors_stop.clone());
            self.sensors.push(SensorTask::TcpKnock(step, tokio::spawn(run)));
        }
        for (socket, step) in &udp_knocks {
            tracing::info!(kind = "knock", step = %Step { proto: step.proto, addr: socket.local_addr()? }, "listening");
        }
        if !udp_knocks.is_empty() {
            let run = sensor::run_udp(udp_knocks, intake, sensors_stop.clone());
            self.sensors.push(SensorTask::UdpKnocks(tokio::spawn(run)));
        }
        Ok(())
    }

    fn spawn_service(&mut self, service: Arc<Service>, listener: Guarded) {
        let stop = self.shared.stop.child_token();
        let shared = self.shared.clone();
        let handle = match listener {
            Guarded::Tcp(l) => {
                let run = proxy::serve(l, service.clone(), shared, stop.clone());
                tokio::spawn(async move { Guarded::Tcp(run.await) })
            }
            Guarded::Udp(s) => {
                let epoch = self.clock.now();
                let sessions = self
                    .udp_sessions
                    .entry(service.name.clone())
                    .or_insert_with(|| udp::Sessions::new(epoch))
                    .clone();
                let run = udp::serve(s, sessions, service.clone(), shared, stop.clone());
                tokio::spawn(async move { Guarded::Udp(run.await) })
            }
        };
        self.services
            .insert(service.name.clone(), ServiceTask { service, stop, handle });
    }

    /// Swaps in `new`. Every address the new config adds is bound before
    /// anything stops, so a failure leaves the running config untouched.
    /// Then every listener pauses (its socket stays open: connections wait
    /// in the backlog) and restarts under the new config; grants of
    /// services that remain, and every established connection, survive.
    async fn reload(&mut self, new: Config) -> anyhow::Result<ReloadSummary> {
        for (section, same) in [
            ("gateway", new.gateway == self.config.gateway),
            ("admin", new.admin == self.config.admin),
            ("limits", new.limits == self.config.limits),
        ] {
            if !same {
                tracing::warn!(section, "changes to this section take effect at the next restart");
            }
        }
        let summary = summarize(&self.config, &new);
        let mut reuse = self.prebind(&new)?;
        reuse.absorb(self.stop_all().await);
        let sockets = bind_sockets(&new, &mut reuse)?;
        self.tx
            .send(Input::Reconfigure {
                services: rules(&new),
                limits: gate_limits(&new),
            })
            .await
            .context("the gate has stopped")?;
        // Sessions of services that are gone (or no longer UDP) end on
        // their own when idle; the table is no longer needed for new ones.
        self.udp_sessions
            .retain(|name, _| new.services.iter().any(|s| s.name == *name && s.protocol == Proto::Udp));
        self.config = new;
        self.start(sockets)?;
        Ok(summary)
    }

    /// Binds the addresses `new` has and the running config does not.
    fn prebind(&self, new: &Config) -> anyhow::Result<Reusable> {
        let mut staged = Reusable::default();
        for s in &new.services {
            let reusable = self.services.values().any(|t| {
                let old = &t.service;
                old.protocol == s.protocol && old.listen == s.listen && (old.name == s.name || s.listen.port() != 0)
            });
            if !reusable {
                let what = || format!("cannot listen on service.{}.listen ({})", s.name, s.listen);
                let g = match s.protocol {
                    Proto::Tcp => Guarded::Tcp(net::bind_tcp(s.listen).with_context(what)?),
                    Proto::Udp => Guarded::Udp(Arc::new(net::bind_udp(s.listen).with_context(what)?)),
                };
                staged.guarded.push((Arc::new(s.clone()), g));
            }
        }
        let running = steps(&self.config);
        for step in steps(new) {
            if running.contains(&step) {
                continue;
            }
            let what = || format!("cannot listen on knock step {step}");
            match step.proto {
                Proto::Udp => {
                    staged
                        .udp_knocks
                        .insert(step, net::bind_udp_timestamped(step.addr).with_context(what)?);
                }
                Proto::Tcp => {
                    staged
                        .tcp_knocks
                        .insert(step, net::bind_tcp(step.addr).with_context(what)?);
                }
            }
        }
        if let Some(spa) = &new.spa {
            if self.config.spa.as_ref().map(|s| s.listen) != Some(spa.listen) {
                let socket = net::bind_udp_sensor(spa.listen)
                    .with_context(|| format!("cannot listen on spa.listen ({})", spa.listen))?;
                staged.spa = Some((spa.listen, socket));
            }
        }
        Ok(staged)
    }

    /// Stops every listener and sensor and takes their sockets back.
    async fn stop_all(&mut self) -> Reusable {
        let mut reuse = Reusable::default();
        self.sensors_stop.cancel();
        for (_, task) in self.services.drain() {
            task.stop.cancel();
            match task.handle.await {
                Ok(g) => reuse.guarded.push((task.service, g)),
                Err(e) => tracing::error!(service = %task.service.name, error = %e, "listener task failed"),
            }
        }
        for sensor in self.sensors.drain(..) {
            match sensor {
                SensorTask::UdpKnocks(h) => {
                    if let Ok(sockets) = h.await {
                        reuse.udp_knocks.extend(sockets.into_iter().map(|(s, step)| (step, s)));
                    }
                }
                SensorTask::TcpKnock(step, h) => {
                    if let Ok(l) = h.await {
                        reuse.tcp_knocks.insert(step, l);
                    }
                }
                SensorTask::Spa(addr, h) => {
                    if let Ok(s) = h.await {
                        reuse.spa = Some((addr, s));
                    }
                }
            }
        }
        reuse
    }
}

/// Every knock and trap endpoint of a config.
fn steps(config: &Config) -> std::collections::BTreeSet<Step> {
    config
        .services
        .iter()
        .filter_map(|s| s.knock.as_ref())
        .flat_map(|k| k.sequence.iter().chain(&k.trap).copied())
        .collect()
}

fn summarize(old: &Config, new: &Config) -> ReloadSummary {
    let mut summary = ReloadSummary::default();
    for s in &new.services {
        match old.services.iter().find(|o| o.name == s.name) {
            None => summary.added += 1,
            Some(o) if o != s => summary.changed += 1,
            Some(_) => {}
        }
    }
    summary.removed = old
        .services
        .iter()
        .filter(|o| !new.services.iter().any(|s| s.name == o.name))
        .count();
    summary
}

/// Feeds knocks and deadlines to the gate and applies what it decides.
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
async fn trim_heap(shared: Arc<Shared>) {
    let mut policy = TrimPolicy::new(256);
    let mut every = tokio::time::interval(TRIM_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shared.stop.cancelled() => return,
            _ = every.tick() => {}
        }
        if policy.observe(shared.active.load(Ordering::Relaxed)) {
            let released = crate::sys::trim_heap();
            tracing::debug!(released, "heap trimmed after connections closed");
        }
    }
}

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
                target: AUDIT_TARGET,
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
                tracing::info!(target: AUDIT_TARGET, service = %grant.service, source = %grant.source, method = grant.method.as_label(), "grant expired");
            }
        }
        Event::Revoked(grant) => {
            if store.revoke(&grant.service, grant.source).is_some() {
                metrics::grants_active(&grant.service, -1.0);
            }
            tracing::info!(target: AUDIT_TARGET, service = %grant.service, source = %grant.source, method = grant.method.as_label(), "grant revoked");
        }
    }
}

fn round_ms(d: std::time::Duration) -> std::time::Duration {
    std::time::Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Resolves on SIGTERM or SIGINT. (SIGHUP means reload: see `reload`.)
pub async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    tokio::select! {
        _ = term.recv() => tracing::info!(signal = "SIGTERM", "signal received"),
        _ = int.recv() => tracing::info!(signal = "SIGINT", "signal received"),
    }
    Ok(())
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
