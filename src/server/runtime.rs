//! The running data plane of one config: a task per guarded service, the
//! knock and SPA sensors, and the reload that hands their sockets to the
//! next config (see [`super::handover`]).
//!
//! Each task is supervised: one that panics, or returns while nobody
//! stopped it, is reported as a failure of a core task.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::handover::{self, Endpoint, Socket};
use crate::clock::Clock;
use crate::config::{Config, Service, Unauthorized};
use crate::door::Door;
use crate::driver::DriverHandle;
use crate::gate::{GateLimits, ServiceRule};
use crate::guard::SourceGuard;
use crate::proxy::dark::{self, Dark};
use crate::sensor::recorder::Recorder;
use crate::spa::desk::{unix_secs, SpaDesk};
use crate::step::{Proto, Step};
use crate::store::replay::{self, ReplayLog};
use crate::{metrics, proxy, sensor, udp};

/// Where failures of core tasks are reported.
pub(super) type Failures = mpsc::UnboundedSender<String>;

/// Runs `fut` as a core task named `what`. A panic, or a return before
/// `stop` was cancelled, is reported on `failures`; the task's output (a
/// listener's sockets) comes back through the handle when it ends well.
pub(super) fn supervise<T: Send + 'static>(
    what: String,
    stop: CancellationToken,
    failures: Failures,
    fut: impl Future<Output = T> + Send + 'static,
) -> JoinHandle<Option<T>> {
    let inner = tokio::spawn(fut);
    tokio::spawn(async move {
        match inner.await {
            Ok(out) => {
                if !stop.is_cancelled() {
                    let _ = failures.send(format!("{what} ended on its own"));
                }
                Some(out)
            }
            Err(e) => {
                let _ = failures.send(format!("{what}: {e}"));
                None
            }
        }
    })
}

/// The gate's rules for `config`.
pub(super) fn rules(config: &Config) -> Vec<ServiceRule> {
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

/// The rotating sequences of `config`.
pub(super) fn totp_rules(config: &Config) -> Vec<crate::totp::Rule> {
    config.services.iter().filter_map(|s| s.totp.clone()).collect()
}

pub(super) fn gate_limits(config: &Config) -> GateLimits {
    GateLimits {
        max_attempts: config.gateway.max_knock_attempts,
    }
}

/// The real address of each guarded listener among `sockets`.
pub(super) fn guarded_addrs(config: &Config, sockets: &HashMap<Endpoint, Socket>) -> Vec<(Arc<str>, SocketAddr)> {
    config
        .services
        .iter()
        .filter_map(|s| {
            let addr = sockets.get(&handover::guarded(s))?.local_addr().ok()?;
            Some((s.name.clone(), addr))
        })
        .collect()
}

/// Makes a guarded listener listen (again, after a `closed` spell).
fn listen(service: &str, listener: &std::net::TcpListener) {
    if let Err(e) = crate::net::listen(&socket2::SockRef::from(listener)) {
        tracing::error!(service, error = %e, "cannot listen");
    }
}

/// Opens the replay log under `state.dir` when `config` has SPA (a config
/// without it needs no state, so a knock-only gateway writes nothing).
/// The error names `state.dir`: nothing is served without the log.
pub(super) fn open_replay(config: &Config, now_unix: u64) -> anyhow::Result<Option<Recorder>> {
    let Some(spa) = &config.spa else {
        return Ok(None);
    };
    let dir = &config.state.dir;
    let (log, loaded) = ReplayLog::open(dir, now_unix, spa.max_age + replay::MARGIN).with_context(|| {
        format!(
            "state.dir: cannot open the spa replay log in {}: set state.dir (or PORTCULLIS__STATE__DIR) to a directory this user may write",
            dir.display()
        )
    })?;
    if loaded.damaged > 0 {
        tracing::warn!(dir = %dir.display(), damaged = loaded.damaged, "replay log records failed their checksum and were dropped");
    }
    tracing::info!(
        dir = %dir.display(),
        live = loaded.live,
        expired = loaded.expired,
        torn_tail = loaded.torn_tail,
        "replay log loaded"
    );
    let shared = crate::replicate::Replication::process(config)?.map(|r| r.replay());
    let recorder = Recorder::start_shared(log, shared).context("cannot start the replay log's writer thread")?;
    Ok(Some(recorder))
}

/// Reports the death of `recorder`'s writer thread as a failed core task:
/// without it every SPA packet is refused, so `/healthz` must fail and
/// the process exit for its supervisor to restart it.
pub(super) fn watch_recorder(recorder: &Recorder, failures: &Failures) {
    let died = recorder.died();
    let failures = failures.clone();
    tokio::spawn(async move {
        died.await;
        let _ = failures.send("the replay log's writer thread panicked".into());
    });
}

/// What a reload changed, for its log line.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReloadSummary {
    pub added: usize,
    pub removed: usize,
    pub changed: usize,
}

/// Whether a reload leaves `[gateway]` as it is, caps derived from the
/// descriptor limit aside: they move a little with every listener a
/// reload adds or removes, and the running ones stay until a restart.
fn same_gateway(old: &Config, new: &Config) -> bool {
    let derived = |c: &Config, path: &str| {
        c.descriptors
            .as_ref()
            .is_some_and(|d| d.derived.iter().any(|p| p == path))
    };
    let mut gateway = new.gateway.clone();
    if derived(old, "gateway.max_connections") && derived(new, "gateway.max_connections") {
        gateway.max_connections = old.gateway.max_connections;
    }
    if derived(old, "gateway.max_blackholed") && derived(new, "gateway.max_blackholed") {
        gateway.max_blackholed = old.gateway.max_blackholed;
    }
    gateway == old.gateway
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

/// A running task and the sockets it hands back when stopped.
type Sockets = Vec<(Endpoint, Socket)>;

#[derive(Debug)]
struct Task {
    stop: CancellationToken,
    handle: JoinHandle<Option<Sockets>>,
}

/// What the runtime is built from.
#[derive(Debug)]
pub(super) struct Parts {
    pub config: Config,
    pub proxy: Arc<proxy::Shared>,
    pub udp: Arc<udp::Shared>,
    pub driver: DriverHandle,
    pub guard: Arc<SourceGuard>,
    pub clock: Arc<dyn Clock>,
    pub failures: Failures,
    /// Whether the raw sensor watches the knock and SPA ports (chosen at
    /// start, kept across reloads).
    pub raw: bool,
    /// The SPA replay log's writer, once a config has SPA (see [`open_replay`]).
    pub replay: Option<Recorder>,
}

/// The running data plane of one config.
#[derive(Debug)]
pub(super) struct Runtime {
    parts: Parts,
    tasks: Vec<Task>,
    /// The endpoints the running tasks serve.
    running: Vec<Endpoint>,
    /// UDP services' session tables by service name, kept across reloads
    /// so established flows survive them.
    udp_sessions: HashMap<Arc<str>, Arc<udp::Sessions>>,
}

impl Runtime {
    pub(super) fn new(parts: Parts) -> Self {
        Self {
            parts,
            tasks: Vec::new(),
            running: Vec::new(),
            udp_sessions: HashMap::new(),
        }
    }

    fn config(&self) -> &Config {
        &self.parts.config
    }

    /// Starts serving `sockets` (one per endpoint of the config), logging
    /// each listener.
    pub(super) async fn start(&mut self, mut sockets: HashMap<Endpoint, Socket>) -> anyhow::Result<()> {
        self.running = sockets.keys().cloned().collect();
        let bound = guarded_addrs(self.config(), &sockets);
        let services: Vec<Service> = self.config().services.clone();
        let mut doors = Vec::new();
        for service in services {
            let endpoint = handover::guarded(&service);
            let socket = sockets
                .remove(&endpoint)
                .ok_or_else(|| anyhow::anyhow!("no socket was bound for service.{}", service.name))?;
            let addr = socket.local_addr()?;
            tracing::info!(kind = "guarded", service = %service.name, protocol = service.protocol.as_str(), %addr, upstream = %service.upstream, unauthorized = service.unauthorized.as_str(), "listening");
            self.spawn_service(Arc::new(service), endpoint, socket, &mut doors);
        }
        // Before `ready`: a door of a service with grants opens now.
        self.parts
            .driver
            .doors(doors)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let intake = sensor::Intake {
            driver: self.parts.driver.clone(),
            guard: self.parts.guard.clone(),
            clock: self.parts.clock.clone(),
        };
        let mut udp_knocks = Vec::new();
        let mut tcp_knocks = Vec::new();
        let mut spa = None;
        let mut spa_streams = Vec::new();
        let mut raw = None;
        for (endpoint, socket) in sockets {
            match (endpoint, socket) {
                (Endpoint::Knock(step), Socket::Udp(s)) => udp_knocks.push((s, step)),
                (Endpoint::Knock(step), Socket::Tcp(l)) => tcp_knocks.push((l, step)),
                (Endpoint::Spa(configured), Socket::Udp(s)) => spa = Some((configured, s)),
                (Endpoint::SpaStream { addr, http }, Socket::Tcp(l)) => spa_streams.push((addr, http, l)),
                (Endpoint::Raw, Socket::Raw(r)) => raw = Some(r),
                (endpoint, _) => anyhow::bail!("a socket of the wrong kind for {endpoint:?}"),
            }
        }
        if let Some(sockets) = raw {
            let plan = sensor::raw::Plan::new(self.config(), sensor::raw::ephemeral_range());
            sensor::raw::watch(&sockets, &plan).context("the raw sensor's filter was refused")?;
            let spa_sensor = self
                .config()
                .spa
                .is_some()
                .then(|| self.spa_sensor(&bound))
                .transpose()?;
            let intake = intake.clone();
            self.spawn("raw sensor".into(), move |stop| async move {
                let sockets = sensor::raw::run(sockets, plan, intake, spa_sensor, stop).await;
                vec![(Endpoint::Raw, Socket::Raw(sockets))]
            });
        }
        if let Some((configured, socket)) = spa {
            let addr = socket.local_addr()?;
            tracing::info!(kind = "spa", %addr, users = self.config().users.len(), "listening");
            let spa_sensor = self.spa_sensor(&bound)?;
            let driver = self.parts.driver.clone();
            // Keyed by the configured address, as a reloaded config names it
            // (port 0 included), not by the port the kernel chose.
            self.spawn("spa sensor".into(), move |stop| async move {
                let socket = sensor::spa::run(socket, spa_sensor, driver, stop).await;
                vec![(Endpoint::Spa(configured), Socket::Udp(socket))]
            });
        }
        for (configured, http, listener) in spa_streams {
            let transport = if http { "http" } else { "tcp" };
            tracing::info!(kind = "spa", transport, addr = %listener.local_addr()?, "listening");
            let spa_sensor = self.spa_sensor(&bound)?;
            let driver = self.parts.driver.clone();
            self.spawn(format!("spa {transport} sensor"), move |stop| async move {
                let listener = sensor::spa_stream::run(listener, http, spa_sensor, driver, stop).await;
                vec![(Endpoint::SpaStream { addr: configured, http }, Socket::Tcp(listener))]
            });
        }
        tcp_knocks.sort_by_key(|(_, step)| *step);
        for (listener, step) in tcp_knocks {
            tracing::info!(kind = "knock", step = %Step { proto: step.proto, addr: listener.local_addr()? }, "listening");
            let intake = intake.clone();
            self.spawn(format!("knock sensor {step}"), move |stop| async move {
                let listener = sensor::run_tcp(listener, step, intake, stop).await;
                vec![(Endpoint::Knock(step), Socket::Tcp(listener))]
            });
        }
        udp_knocks.sort_by_key(|(_, step)| *step);
        for (socket, step) in &udp_knocks {
            tracing::info!(kind = "knock", step = %Step { proto: step.proto, addr: socket.local_addr()? }, "listening");
        }
        if !udp_knocks.is_empty() {
            self.spawn("udp knock sensor".into(), move |stop| async move {
                let sockets = sensor::run_udp(udp_knocks, intake, stop).await;
                sockets
                    .into_iter()
                    .map(|(s, step)| (Endpoint::Knock(step), Socket::Udp(s)))
                    .collect()
            });
        }
        Ok(())
    }

    /// The SPA sensor's desk and limits for the running config.
    fn spa_sensor(&self, bound: &[(Arc<str>, SocketAddr)]) -> anyhow::Result<sensor::spa::SpaSensor> {
        let config = self.config();
        let recorder = self
            .parts
            .replay
            .clone()
            .ok_or_else(|| anyhow::anyhow!("no replay log is open for the spa sensor"))?;
        Ok(sensor::spa::SpaSensor {
            desk: SpaDesk::new(config.spa.as_ref(), &config.users, &config.services, bound),
            recorder,
            clock: self.parts.clock.clone(),
            refusals: sensor::spa::RefusalLog::new(),
        })
    }

    /// Spawns a supervised task that runs until its stop token (a child of
    /// the lifecycle's stop) is cancelled and hands its sockets back.
    fn spawn<F, Fut>(&mut self, what: String, run: F)
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = Sockets> + Send + 'static,
    {
        let stop = self.parts.proxy.life.stop().child_token();
        let handle = supervise(what, stop.clone(), self.parts.failures.clone(), run(stop.clone()));
        self.tasks.push(Task { stop, handle });
    }

    fn spawn_service(&mut self, service: Arc<Service>, endpoint: Endpoint, socket: Socket, doors: &mut Vec<Arc<Door>>) {
        let what = format!("service {}", service.name);
        match socket {
            Socket::Guarded(listener) => {
                proxy::keepalive_on_listener(&listener, &service);
                let (mode, door, dark) = self.unauthorized_mode(&service, &listener);
                metrics::unauthorized_mode(&service.name, mode);
                doors.extend(door.clone());
                let shared = self.parts.proxy.clone();
                self.spawn(what, move |stop| async move {
                    let keeper = dark.map(|d| tokio::spawn(d.keep(stop.clone())));
                    let listener = proxy::serve(listener, service, shared, stop, door).await;
                    if let Some(keeper) = keeper {
                        let _ = keeper.await;
                    }
                    listener.map(|l| (endpoint, Socket::Guarded(l))).into_iter().collect()
                });
            }
            Socket::Tcp(_) => {
                tracing::error!(service = %service.name, "a knock listener was handed to a guarded service");
            }
            Socket::Udp(socket) => {
                let epoch = self.parts.clock.now();
                let sessions = self
                    .udp_sessions
                    .entry(service.name.clone())
                    .or_insert_with(|| udp::Sessions::new(epoch))
                    .clone();
                let shared = self.parts.udp.clone();
                self.spawn(what, move |stop| async move {
                    let socket = udp::serve(socket, sessions, service, shared, stop).await;
                    vec![(endpoint, Socket::Udp(socket))]
                });
            }
            // Only Endpoint::Raw binds raw sockets; never a service's.
            Socket::Raw(_) => {
                let _ = self
                    .parts
                    .failures
                    .send(format!("{what}: handed the raw sensor's sockets"));
            }
        }
    }

    /// Sets up a guarded TCP listener for its unauthorised mode and returns
    /// the mode in effect: `closed` gets a door (not listening until a
    /// grant); `dark` a kernel filter, or, where the kernel refuses one
    /// (no CAP_NET_ADMIN), a door as `closed`; every other mode listens.
    fn unauthorized_mode(
        &self,
        service: &Service,
        listener: &std::net::TcpListener,
    ) -> (Unauthorized, Option<Arc<Door>>, Option<Dark>) {
        let name = &service.name;
        let closed = || match Door::new(name.clone(), listener) {
            Ok(door) => (Unauthorized::Closed, Some(door), None),
            Err(e) => {
                tracing::error!(service = %name, error = %e, "closed mode unavailable: refusing in userspace");
                listen(name, listener);
                (Unauthorized::Refuse, None, None)
            }
        };
        match service.unauthorized {
            Unauthorized::Closed => {
                dark::detach(listener);
                closed()
            }
            Unauthorized::Dark => {
                let store = self.parts.proxy.store.clone();
                match Dark::attach(name.clone(), listener, store, self.parts.clock.clone()) {
                    Ok(keeper) => {
                        listen(name, listener);
                        (Unauthorized::Dark, None, Some(keeper))
                    }
                    Err(e) => {
                        tracing::warn!(
                            service = %name,
                            error = %e,
                            "dark mode needs CAP_NET_ADMIN to filter a TCP listener (Linux 5d39580f68e6): running as closed"
                        );
                        closed()
                    }
                }
            }
            mode => {
                dark::detach(listener);
                listen(name, listener);
                (mode, None, None)
            }
        }
    }

    /// Swaps in `new`. Every address the new config adds is bound before
    /// anything stops, so a failure leaves the running config untouched.
    /// Then every listener pauses (its socket stays open: connections wait
    /// in the backlog) and restarts under the new config; grants of
    /// services that remain, and every established connection, survive.
    pub(super) async fn reload(&mut self, mut new: Config) -> anyhow::Result<ReloadSummary> {
        for (section, same) in [
            ("gateway", same_gateway(self.config(), &new)),
            ("admin", new.admin == self.config().admin),
            ("limits", new.limits == self.config().limits),
            // The state store's link is made once per process.
            ("state", new.state == self.config().state),
        ] {
            if !same {
                tracing::warn!(section, "changes to this section take effect at the next restart");
            }
        }
        super::traps::pick(&mut new, Some(self.config()), super::traps::avoided(self.parts.raw))?;
        if self.parts.raw {
            sensor::raw::fixed_ports(&new)?;
        }
        let replay = self.reload_replay(&new)?;
        let summary = summarize(self.config(), &new);
        let wanted = handover::endpoints(&new, self.parts.raw);
        let wanted_endpoints: Vec<Endpoint> = wanted.iter().map(|(e, _)| e.clone()).collect();
        let plan = handover::plan(&self.running, &wanted_endpoints);
        let fresh = handover::bind_all(&plan.bind, &wanted)?;
        let old = self.stop_all().await;
        let sockets = handover::assemble(&plan, old, fresh, &wanted)?;
        self.parts
            .driver
            .reconfigure(rules(&new), totp_rules(&new), gate_limits(&new))
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        // Sessions of services that are gone (or no longer UDP) end on
        // their own when idle; the table is no longer needed for new ones.
        self.udp_sessions
            .retain(|name, _| new.services.iter().any(|s| s.name == *name && s.protocol == Proto::Udp));
        // Every series the new config implies, from zero: a service added
        // or changed (it gained a knock, it became UDP), SPA turned on.
        // Counts already made are kept.
        metrics::zero_config(&new);
        metrics::zero_services(&new.services);
        self.parts.config = new;
        self.parts.replay = replay;
        self.start(sockets).await?;
        Ok(summary)
    }

    /// The replay log under `new`: the one open, or (the first config with
    /// SPA) a new one. The log cannot move while open: a reload that
    /// changes `state.dir` is refused and the running config kept.
    fn reload_replay(&self, new: &Config) -> anyhow::Result<Option<Recorder>> {
        match &self.parts.replay {
            Some(recorder) if recorder.dir() != new.state.dir => anyhow::bail!(
                "state.dir: changing the state directory ({} to {}) needs a restart",
                recorder.dir().display(),
                new.state.dir.display()
            ),
            Some(recorder) => Ok(Some(recorder.clone())),
            None => {
                let opened = open_replay(new, unix_secs(&*self.parts.clock))?;
                if let Some(recorder) = &opened {
                    watch_recorder(recorder, &self.parts.failures);
                }
                Ok(opened)
            }
        }
    }

    /// Stops every listener and sensor and takes their sockets back.
    pub(super) async fn stop_all(&mut self) -> HashMap<Endpoint, Socket> {
        for task in &self.tasks {
            task.stop.cancel();
        }
        let mut sockets = HashMap::new();
        for task in self.tasks.drain(..) {
            if let Ok(Some(handed_back)) = task.handle.await {
                sockets.extend(handed_back);
            }
        }
        self.running.clear();
        sockets
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fitted(text: &str, limit: u64) -> Config {
        let raw: crate::config::raw::RawConfig = toml::from_str(text).unwrap();
        let mut config = crate::config::validate(&raw).unwrap();
        crate::config::budget::fit(&raw, &mut config, limit).unwrap();
        config
    }

    #[test]
    fn derived_caps_that_move_with_the_listeners_are_no_gateway_change() {
        let one = "[service.a]\nlisten = \"127.0.0.1:1\"\nupstream = \"127.0.0.1:2\"\nknock = { sequence = [\"9000/udp\", \"7000/udp\", \"8000/udp\"] }\n";
        let two = format!("{one}[service.b]\nlisten = \"127.0.0.1:3\"\nupstream = \"127.0.0.1:4\"\nknock = {{ sequence = [\"9001/udp\", \"7001/udp\", \"8001/udp\"] }}\n");
        let (old, new) = (fitted(one, 512), fitted(&two, 512));
        assert_ne!(old.gateway.max_connections, new.gateway.max_connections);
        assert!(same_gateway(&old, &new));
        // A cap the config sets is a change.
        let set = fitted(&format!("[gateway]\nmax_connections = 10\n{two}"), 512);
        assert!(!same_gateway(&old, &set));
        let mut grace = new.clone();
        grace.gateway.shutdown_grace = std::time::Duration::from_secs(1);
        assert!(!same_gateway(&old, &grace));
    }

    #[tokio::test]
    async fn a_core_task_that_panics_or_ends_on_its_own_is_reported() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let panics = supervise("panicky".into(), stop.clone(), tx.clone(), async {
            panic!("boom");
        });
        assert_eq!(panics.await.unwrap(), None);
        assert!(rx.recv().await.unwrap().starts_with("panicky: "));

        let quits = supervise("quitter".into(), stop.clone(), tx.clone(), async { 7 });
        assert_eq!(quits.await.unwrap(), Some(7));
        assert_eq!(rx.recv().await.unwrap(), "quitter ended on its own");

        // Stopped on purpose: no failure.
        let stopped = supervise("listener".into(), stop.clone(), tx, {
            let stop = stop.clone();
            async move { stop.cancelled().await }
        });
        stop.cancel();
        assert_eq!(stopped.await.unwrap(), Some(()));
        assert!(rx.try_recv().is_err());
    }
}
