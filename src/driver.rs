//! The gate driver: the one piece of code that talks to the [`Gate`].
//!
//! Sensors and the admin endpoint hold a [`DriverHandle`]; what they send
//! becomes gate inputs, which pass through an [`InputLog`] (the replication
//! seam) and then into the gate, in log order. The driver applies each
//! event the gate emits to the grant store, the audit log, metrics and the
//! per-source lockout strikes, and answers requests (a revocation, a
//! reconfiguration) once their effects are in the store. Data only flows
//! downward: sensor → driver → gate → store.
//!
//! One process uses [`LocalLog`], which hands inputs straight back. Several
//! replicas that must share one gate plug in a log that gives every input
//! one total order and a shared timestamp (a Redis Stream, say): every
//! replica then runs the same deterministic gate over the same inputs, and
//! the knock logic is never written twice.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::door::Door;
use crate::gate::{Event, Gate, GateLimits, Grant, Input, Knock, KnockResult, Method, ServiceRule};
use crate::guard::{Lockout, SourceGuard, StrikeKind};
use crate::metrics;
use crate::step::Step;
use crate::store::GrantStore;
use crate::totp;

/// Requests queued between the sensors and the driver; past it knocks are
/// refused at once (counted), never waited for.
pub const QUEUE: usize = 4096;

/// Room in the queue beyond [`QUEUE`] that knocks may not take: kept for
/// verified SPA grants, so a knock flood (forged sources pass any
/// per-source limit) cannot crowd out an authenticated request.
pub const RESERVED_FOR_GRANTS: usize = 512;

/// Where audit lines (grants, expiries, revocations) are logged.
pub const AUDIT_TARGET: &str = "portcullis::audit";

/// What may be asked of the driver.
#[derive(Debug)]
pub enum Request {
    /// A knock or a verified SPA authorization: fire and forget.
    Input(Input),
    /// Ends a grant early; answered with the grant that ended, once the
    /// store no longer admits it.
    Revoke {
        service: Arc<str>,
        source: IpAddr,
        reply: oneshot::Sender<Option<Grant>>,
    },
    /// The doors of the services in `closed` mode, replacing any before;
    /// each is opened or closed at once to match the grants held.
    Doors {
        doors: Vec<Arc<Door>>,
        reply: oneshot::Sender<()>,
    },
    /// An operator's break-glass grant ([`Method::Manual`]); answered with
    /// the grant once the store admits the source, `None` when the service
    /// is unknown.
    Grant {
        service: Arc<str>,
        source: IpAddr,
        by: Arc<str>,
        duration: Duration,
        reply: oneshot::Sender<Option<Grant>>,
    },
    /// [`Request::Revoke`] on an operator's request: the audit line says
    /// `by` whom.
    RevokeBy {
        service: Arc<str>,
        source: IpAddr,
        by: Arc<str>,
        reply: oneshot::Sender<Option<Grant>>,
    },
    /// Ends a source's lockout; answered with the lockout that ended, `None`
    /// when the source was not locked out.
    Unlock {
        source: IpAddr,
        by: Arc<str>,
        reply: oneshot::Sender<Option<Lockout>>,
    },
    /// A reloaded config's rules; answered once the gate has them.
    Reconfigure {
        services: Vec<ServiceRule>,
        /// Rotating sequences, judged by the driver (see [`totp`]).
        totp: Vec<totp::Rule>,
        limits: GateLimits,
        reply: oneshot::Sender<()>,
    },
}

/// Why the driver could not take a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DriverError {
    #[error("the gate is busy")]
    Busy,
    #[error("the gate has stopped")]
    Stopped,
    /// The driver runs but dropped the request unanswered: the replicated
    /// log refused it, as it refuses whatever would open while the state
    /// store is down.
    #[error("the state store is unavailable")]
    Refused,
}

/// How the rest of the process reaches the driver.
#[derive(Debug, Clone)]
pub struct DriverHandle {
    tx: mpsc::Sender<Request>,
}

impl DriverHandle {
    /// A handle and the receiving end of its queue, for a [`Driver`] (or a
    /// test that plays one).
    pub fn channel() -> (Self, mpsc::Receiver<Request>) {
        let (tx, rx) = mpsc::channel(QUEUE + RESERVED_FOR_GRANTS);
        (Self { tx }, rx)
    }

    /// Queues a knock; never waits, and never takes the room kept for
    /// grants ([`RESERVED_FOR_GRANTS`]).
    pub fn knock(&self, knock: Knock) -> Result<(), DriverError> {
        if self.tx.capacity() <= RESERVED_FOR_GRANTS && !self.tx.is_closed() {
            return Err(DriverError::Busy);
        }
        self.try_send(Request::Input(Input::Knock(knock)))
    }

    /// Reserves room for `n` authorizations, or fails at once: taken
    /// before a verified SPA packet's replay digest is recorded, so an
    /// accepted packet cannot be lost to a full queue afterwards.
    /// The room is owned, so it can travel with the packet to the thread
    /// that writes the replay log; dropped unused, it is given back.
    pub fn reserve_grants(&self, n: usize) -> Result<Reserved, DriverError> {
        let mut permits = Vec::with_capacity(n);
        for _ in 0..n {
            let permit = self.tx.clone().try_reserve_owned().map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => DriverError::Busy,
                mpsc::error::TrySendError::Closed(_) => DriverError::Stopped,
            })?;
            permits.push(permit);
        }
        Ok(Reserved(permits))
    }

    /// Queues a verified authorization; never waits.
    pub fn authorize(
        &self,
        service: Arc<str>,
        source: IpAddr,
        method: Method,
        duration: Duration,
    ) -> Result<(), DriverError> {
        self.try_send(Request::Input(Input::Authorize {
            service,
            source,
            method,
            duration,
        }))
    }

    fn try_send(&self, request: Request) -> Result<(), DriverError> {
        self.tx.try_send(request).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => DriverError::Busy,
            mpsc::error::TrySendError::Closed(_) => DriverError::Stopped,
        })
    }

    /// Revokes a grant and waits (at most `timeout` in all) until the store
    /// refuses the source. `Ok(None)` when there was no such grant.
    pub async fn revoke(
        &self,
        service: Arc<str>,
        source: IpAddr,
        timeout: Duration,
    ) -> Result<Option<Grant>, DriverError> {
        let (reply, answer) = oneshot::channel();
        let request = Request::Revoke { service, source, reply };
        self.ask(request, answer, timeout).await
    }

    /// An operator's grant of `service` to `source` for `duration`, asked
    /// `by` someone: waits (at most `timeout`) until the store admits the
    /// source. `Ok(None)` when the gate knows no such service.
    pub async fn grant(
        &self,
        service: Arc<str>,
        source: IpAddr,
        by: Arc<str>,
        duration: Duration,
        timeout: Duration,
    ) -> Result<Option<Grant>, DriverError> {
        let (reply, answer) = oneshot::channel();
        let request = Request::Grant {
            service,
            source,
            by,
            duration,
            reply,
        };
        self.ask(request, answer, timeout).await
    }

    /// [`DriverHandle::revoke`] on an operator's request, audited as `by`
    /// them.
    pub async fn revoke_by(
        &self,
        service: Arc<str>,
        source: IpAddr,
        by: Arc<str>,
        timeout: Duration,
    ) -> Result<Option<Grant>, DriverError> {
        let (reply, answer) = oneshot::channel();
        let request = Request::RevokeBy {
            service,
            source,
            by,
            reply,
        };
        self.ask(request, answer, timeout).await
    }

    /// Ends `source`'s lockout, asked `by` someone; waits (at most
    /// `timeout`) until it is applied. `Ok(None)` when it was not locked out.
    pub async fn unlock(
        &self,
        source: IpAddr,
        by: Arc<str>,
        timeout: Duration,
    ) -> Result<Option<Lockout>, DriverError> {
        let (reply, answer) = oneshot::channel();
        self.ask(Request::Unlock { source, by, reply }, answer, timeout).await
    }

    /// Sends `request` and waits for its answer, at most `timeout` in all.
    async fn ask<T>(
        &self,
        request: Request,
        answer: oneshot::Receiver<T>,
        timeout: Duration,
    ) -> Result<T, DriverError> {
        let asked = async {
            self.tx.send(request).await.map_err(|_| DriverError::Stopped)?;
            answer.await.map_err(|_| {
                if self.tx.is_closed() {
                    DriverError::Stopped
                } else {
                    DriverError::Refused
                }
            })
        };
        tokio::time::timeout(timeout, asked)
            .await
            .map_err(|_| DriverError::Busy)?
    }

    /// Installs the doors of the `closed` services and waits until each
    /// listens exactly when its service has a grant.
    pub async fn doors(&self, doors: Vec<Arc<Door>>) -> Result<(), DriverError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Request::Doors { doors, reply })
            .await
            .map_err(|_| DriverError::Stopped)?;
        answer.await.map_err(|_| DriverError::Stopped)
    }

    /// Hands the gate a reloaded config's rules and waits until it has them.
    pub async fn reconfigure(
        &self,
        services: Vec<ServiceRule>,
        totp: Vec<totp::Rule>,
        limits: GateLimits,
    ) -> Result<(), DriverError> {
        let (reply, answer) = oneshot::channel();
        let request = Request::Reconfigure {
            services,
            totp,
            limits,
            reply,
        };
        self.tx.send(request).await.map_err(|_| DriverError::Stopped)?;
        answer.await.map_err(|_| DriverError::Stopped)
    }
}

/// Room reserved in the driver's queue by [`DriverHandle::reserve_grants`].
#[derive(Debug)]
pub struct Reserved(Vec<mpsc::OwnedPermit<Request>>);

impl Reserved {
    /// Queues a verified authorization in reserved room; false when every
    /// reserved place was used already.
    pub fn authorize(&mut self, service: Arc<str>, source: IpAddr, method: Method, duration: Duration) -> bool {
        let Some(permit) = self.0.pop() else { return false };
        permit.send(Request::Input(Input::Authorize {
            service,
            source,
            method,
            duration,
        }));
        true
    }

    /// Queues the end of a grant (an authenticated close request) in
    /// reserved room, answering no one; false when every reserved place
    /// was used already.
    pub fn revoke(&mut self, service: Arc<str>, source: IpAddr) -> bool {
        let Some(permit) = self.0.pop() else { return false };
        let (reply, _) = oneshot::channel();
        permit.send(Request::Revoke { service, source, reply });
        true
    }
}

/// A gate input as the log carries it, with the local requester's reply.
#[derive(Debug)]
pub struct Entry {
    pub input: Input,
    pub reply: Reply,
    /// The input's gate time, when the log gives it one (a shared log's
    /// timestamp mapped to the local clock); else the time it is fed.
    pub at: Option<Instant>,
    /// The same moment as wall-clock unix seconds, as the shared log
    /// stamped it: what a rotating sequence's period is counted from, so
    /// every replica, and one that reads the log again after a restart,
    /// judges a knock in the same period.
    pub unix: Option<u64>,
}

impl Entry {
    /// An entry fed at the time it comes out of the log.
    pub fn new(input: Input, reply: Reply) -> Self {
        Self {
            input,
            reply,
            at: None,
            unix: None,
        }
    }

    /// The same entry with a gate time of its own.
    pub fn at(self, at: Instant) -> Self {
        Self { at: Some(at), ..self }
    }

    /// With the log's wall-clock stamp (unix seconds).
    pub fn stamped(self, unix: u64) -> Self {
        Self {
            unix: Some(unix),
            ..self
        }
    }
}

/// Who waits for an input's effects (local requests only).
#[derive(Debug)]
pub enum Reply {
    None,
    Revoked(oneshot::Sender<Option<Grant>>),
    Reconfigured(oneshot::Sender<()>),
    /// An operator's revocation: answered like [`Reply::Revoked`], and the
    /// audit line says `by` whom.
    RevokedBy {
        reply: oneshot::Sender<Option<Grant>>,
        by: Arc<str>,
    },
    /// An operator's grant, answered with the grant given.
    Granted(oneshot::Sender<Option<Grant>>),
    /// An unlock, answered with the lockout that ended.
    Unlocked(oneshot::Sender<Option<Lockout>>),
}

/// The replication seam: every gate input passes through a log, which
/// gives the inputs of every replica the one order in which each replica's
/// gate sees them. A log keeps a local entry's [`Reply`] with it (or by its
/// side) so that the requester is answered when that entry comes back.
pub trait InputLog: std::fmt::Debug + Send + 'static {
    /// Appends a local entry.
    fn append(&mut self, entry: Entry);
    /// The pools of the rotating sequences in effect (judged by the
    /// driver, not the gate): a shared log matches knocks on them to this
    /// replica's steps, as it does the gate's. Told before the
    /// reconfiguration that brings them is appended.
    fn rotating(&mut self, _pools: &[Step]) {}
    /// The next entry in log order; pending until there is one.
    fn next(&mut self) -> Pin<Box<dyn Future<Output = Entry> + Send + '_>>;
}

/// The log of a single process: entries come back in the order they went in.
#[derive(Debug, Default)]
pub struct LocalLog {
    queue: VecDeque<Entry>,
}

impl InputLog for LocalLog {
    fn append(&mut self, entry: Entry) {
        self.queue.push_back(entry);
    }

    fn next(&mut self) -> Pin<Box<dyn Future<Output = Entry> + Send + '_>> {
        Box::pin(async move {
            match self.queue.pop_front() {
                Some(entry) => entry,
                None => std::future::pending().await,
            }
        })
    }
}

/// What the driver acts on besides the gate.
#[derive(Debug, Clone)]
pub struct Effects {
    pub store: Arc<dyn GrantStore>,
    pub clock: Arc<dyn Clock>,
    pub guard: Arc<SourceGuard>,
}

/// The gate driver (see the module doc).
#[derive(Debug)]
pub struct Driver {
    gate: Gate,
    log: Box<dyn InputLog>,
    requests: mpsc::Receiver<Request>,
    effects: Effects,
    events: Vec<Event>,
    /// Grants held per service, as applied to the store.
    held: HashMap<Arc<str>, usize>,
    /// The doors of `closed` services, by service.
    doors: HashMap<Arc<str>, Arc<Door>>,
    /// Rotating sequences: their knocks are judged here, not by the gate.
    totp: totp::Tracker,
    /// Who asked for the entry being fed, for its audit lines (local
    /// operator requests only).
    requested_by: Option<Arc<str>>,
}

impl Driver {
    pub fn new(gate: Gate, log: Box<dyn InputLog>, requests: mpsc::Receiver<Request>, effects: Effects) -> Self {
        Self {
            gate,
            log,
            requests,
            effects,
            events: Vec::new(),
            held: HashMap::new(),
            doors: HashMap::new(),
            totp: totp::Tracker::default(),
            requested_by: None,
        }
    }

    /// Judges knocks on the pools of `rules` (rotating sequences), with
    /// room for `max_attempts` attempts in progress.
    pub fn with_totp(mut self, rules: Vec<totp::Rule>, max_attempts: usize) -> Self {
        self.log.rotating(&pools(&rules));
        self.totp = totp::Tracker::new(rules, max_attempts);
        self
    }

    /// Runs until `stop` is cancelled or every handle is gone.
    pub async fn run(mut self, stop: CancellationToken) {
        loop {
            let deadline = self.gate.next_deadline();
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                entry = self.log.next() => self.feed(entry),
                request = self.requests.recv() => match request {
                    Some(request) => self.take(request),
                    None => return,
                },
                _ = sleep_until(deadline), if deadline.is_some() => {
                    self.gate.handle_timeout(self.effects.clock.now(), &mut self.events);
                    self.apply_events();
                }
            }
        }
    }

    /// Feeds one entry to the gate, applies what it caused, then answers.
    fn feed(&mut self, entry: Entry) {
        let Entry { input, reply, at, unix } = entry;
        let knocker = match &input {
            Input::Knock(k) => Some(k.source),
            _ => None,
        };
        let revoked = match &input {
            Input::Revoke { service, source } => Some((service.clone(), *source)),
            _ => None,
        };
        let granted = match &input {
            Input::Authorize { service, source, .. } => Some((service.clone(), *source)),
            _ => None,
        };
        let now = at.unwrap_or_else(|| self.effects.clock.now());
        if let Input::Unlock { source, by } = &input {
            let ended = self.unlock(*source, by, now);
            if let Reply::Unlocked(tx) = reply {
                let _ = tx.send(ended);
            }
            return;
        }
        // Knocks queued before their source hit a trap arrive after the
        // lockout the trap caused: they must not walk the sequence on.
        if let Input::Knock(k) = &input {
            if self.effects.guard.locked_out(k.source, now) {
                metrics::source_refused("knock", crate::guard::Refusal::LockedOut.as_label());
                tracing::debug!(source = %k.source, step = %k.step, reason = "locked_out", "knock ignored");
                return;
            }
        }
        if let Input::Knock(k) = &input {
            if self.totp.watches(&k.step) {
                let unix = unix.unwrap_or_else(|| crate::spa::desk::unix_secs(&*self.effects.clock));
                self.totp_knock(k.source, k.step, now, unix);
                return;
            }
        }
        self.gate.handle(input, now, &mut self.events);
        if let Some(source) = knocker {
            if self.events.iter().any(|e| matches!(e, Event::Trapped { .. })) {
                self.effects.guard.lock_out(source, now);
            } else if is_bad_knock(&self.events, source) {
                self.effects.guard.strike_and_report(source, now, StrikeKind::Knock);
            }
        }
        let grant = revoked.and_then(|(service, source)| {
            self.events.iter().find_map(|e| match e {
                Event::Revoked(g) if g.service == service && g.source == source => Some(g.clone()),
                _ => None,
            })
        });
        let given = granted.and_then(|(service, source)| {
            self.events.iter().find_map(|e| match e {
                Event::Granted(g) if g.service == service && g.source == source => Some(g.clone()),
                _ => None,
            })
        });
        if let Reply::RevokedBy { by, .. } = &reply {
            self.requested_by = Some(by.clone());
        }
        self.apply_events();
        self.requested_by = None;
        match reply {
            Reply::None => {}
            Reply::Revoked(tx) | Reply::RevokedBy { reply: tx, .. } => {
                let _ = tx.send(grant);
            }
            Reply::Reconfigured(tx) => {
                let _ = tx.send(());
            }
            Reply::Granted(tx) => {
                let _ = tx.send(given);
            }
            Reply::Unlocked(tx) => {
                let _ = tx.send(None);
            }
        }
    }

    /// Ends `source`'s lockout and audits it; the lockout that ended.
    fn unlock(&mut self, source: IpAddr, by: &Arc<str>, now: Instant) -> Option<Lockout> {
        let ended = self.effects.guard.clear_lockout(source, now)?;
        let left = ended.until.saturating_duration_since(now);
        tracing::info!(
            target: AUDIT_TARGET,
            source = %ended.source,
            reason = ended.why.as_label(),
            left_s = round_ms(left).as_secs_f64(),
            by = %by,
            "lockout cleared"
        );
        Some(ended)
    }

    /// A knock on a rotating sequence's pool: an opened sequence is a
    /// grant through the gate; a trap locks out, a wrong step strikes.
    fn totp_knock(&mut self, source: IpAddr, step: crate::step::Step, now: std::time::Instant, unix: u64) {
        for (idx, outcome) in self.totp.knock(step, source, now, unix) {
            let rule = &self.totp.rules()[idx];
            let (service, open_for, lockout) = (rule.service.clone(), rule.open_for, rule.trap_lockout);
            let result = outcome.as_knock_result(rule.steps);
            metrics::knock(&service, result);
            tracing::debug!(%service, %source, %step, result = result.as_label(), "knock");
            match outcome {
                totp::Outcome::Opened { .. } => {
                    let input = Input::Authorize {
                        service,
                        source,
                        method: Method::Knock,
                        duration: open_for,
                    };
                    self.gate.handle(input, now, &mut self.events);
                    self.apply_events();
                }
                totp::Outcome::Trap if lockout => self.effects.guard.lock_out(source, now),
                totp::Outcome::Trap | totp::Outcome::Reset => {
                    self.effects.guard.strike_and_report(source, now, StrikeKind::Knock);
                }
                _ => {}
            }
        }
    }

    fn apply_events(&mut self) {
        let mut events = std::mem::take(&mut self.events);
        for event in events.drain(..) {
            self.apply(event);
        }
        self.events = events;
    }

    /// Applies one gate event to the store, metrics, the audit log and the
    /// doors of `closed` services.
    fn apply(&mut self, event: Event) {
        let (store, clock) = (&*self.effects.store, &*self.effects.clock);
        match event {
            Event::Granted(grant) => {
                // The store mirrors the gate, which ends an expired grant
                // before granting again: a grant already held is renewed.
                if !store.holds(&grant.service, grant.source) {
                    metrics::grants_active(&grant.service, 1.0);
                    let held = self.held.entry(grant.service.clone()).or_default();
                    *held += 1;
                    // Listening before the grant is visible: the granted
                    // source's first connect never meets a closed port.
                    if *held == 1 {
                        if let Some(door) = self.doors.get(&grant.service) {
                            door.open();
                        }
                    }
                }
                store.insert(&grant);
                audit_grant(&grant, clock);
            }
            Event::GrantExpired(grant) => {
                if store
                    .remove_expired(&grant.service, grant.source, clock.now())
                    .is_some()
                {
                    metrics::grant_expired(&grant.service);
                    self.ended(&grant.service);
                    tracing::info!(target: AUDIT_TARGET, service = %grant.service, source = %grant.source, method = grant.method.as_label(), "grant expired");
                }
            }
            Event::Revoked(grant) => {
                if store.revoke(&grant.service, grant.source).is_some() {
                    self.ended(&grant.service);
                }
                let by = self.requested_by.as_deref();
                tracing::info!(target: AUDIT_TARGET, service = %grant.service, source = %grant.source, method = grant.method.as_label(), by, "grant revoked");
            }
            other => apply_progress(other),
        }
    }

    /// One grant of `service` ended; the last one closes its door.
    fn ended(&mut self, service: &Arc<str>) {
        metrics::grants_active(service, -1.0);
        let held = self.held.entry(service.clone()).or_default();
        *held = held.saturating_sub(1);
        if *held == 0 {
            self.held.remove(service);
            if let Some(door) = self.doors.get(service) {
                door.close();
            }
        }
    }

    /// Takes the doors of a (re)started config and sets each to match the
    /// grants its service holds.
    fn install(&mut self, doors: Vec<Arc<Door>>) {
        self.doors = doors.into_iter().map(|d| (d.service().clone(), d)).collect();
        for (service, door) in &self.doors {
            if self.held.get(service).copied().unwrap_or(0) > 0 {
                door.open();
            } else {
                door.close();
            }
        }
    }
}

impl Driver {
    /// Gate inputs go to the log; doors are this process's own business.
    fn take(&mut self, request: Request) {
        let entry = match request {
            Request::Doors { doors, reply } => {
                self.install(doors);
                let _ = reply.send(());
                return;
            }
            Request::Input(input) => Entry::new(input, Reply::None),
            Request::Revoke { service, source, reply } => {
                Entry::new(Input::Revoke { service, source }, Reply::Revoked(reply))
            }
            Request::RevokeBy {
                service,
                source,
                by,
                reply,
            } => Entry::new(Input::Revoke { service, source }, Reply::RevokedBy { reply, by }),
            Request::Grant {
                service,
                source,
                by,
                duration,
                reply,
            } => Entry::new(
                Input::Authorize {
                    service,
                    source,
                    method: Method::Manual { by },
                    duration,
                },
                Reply::Granted(reply),
            ),
            Request::Unlock { source, by, reply } => Entry::new(Input::Unlock { source, by }, Reply::Unlocked(reply)),
            Request::Reconfigure {
                services,
                totp,
                limits,
                reply,
            } => {
                self.log.rotating(&pools(&totp));
                self.totp.reconfigure(totp);
                Entry::new(Input::Reconfigure { services, limits }, Reply::Reconfigured(reply))
            }
        };
        self.log.append(entry);
    }
}

/// Every pool step of `rules`.
pub fn pools(rules: &[totp::Rule]) -> Vec<Step> {
    rules.iter().flat_map(|r| r.pool.iter().copied()).collect()
}

/// A knock that moved no service forward and reset or missed at least one
/// counts against its source (sweeps and guessing end in a lockout).
fn is_bad_knock(events: &[Event], source: IpAddr) -> bool {
    let mut bad = false;
    for e in events {
        if let Event::Knock { result, source: s, .. } = e {
            if *s != source {
                continue;
            }
            match result {
                KnockResult::Advanced { .. } | KnockResult::Repeated { .. } => return false,
                KnockResult::Reset(_) | KnockResult::Ignored => bad = true,
                // Not the source's doing (a flood filled the table).
                KnockResult::TableFull => {}
            }
        }
    }
    bad
}

async fn sleep_until(deadline: Option<Instant>) {
    if let Some(d) = deadline {
        tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await;
    }
}

/// Counts and logs a knock's progress or an attempt's end.
fn apply_progress(event: Event) {
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
        Event::Trapped { service, source } => {
            tracing::debug!(%service, %source, "trap port hit");
        }
        Event::Granted(_) | Event::GrantExpired(_) | Event::Revoked(_) => {}
    }
}

/// Counts and logs a grant given.
fn audit_grant(grant: &Grant, clock: &dyn Clock) {
    metrics::grant(&grant.service, &grant.method);
    let open_for = grant.expires_at.saturating_duration_since(clock.now());
    let (user, by) = match &grant.method {
        Method::Spa { user } => (Some(user.to_string()), None),
        Method::Manual { by } => (None, Some(by.to_string())),
        Method::Knock => (None, None),
    };
    tracing::info!(
        target: AUDIT_TARGET,
        service = %grant.service,
        source = %grant.source,
        method = grant.method.as_label(),
        user,
        by,
        open_for_s = round_ms(open_for).as_secs_f64(),
        "grant"
    );
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::config::Limits;
    use crate::gate::KnockRule;
    use crate::guard::Refusal;
    use crate::step::{Proto, Step};
    use crate::store::MemoryStore;

    const OPEN: Duration = Duration::from_secs(30);

    fn udp(port: u16) -> Step {
        Step {
            proto: Proto::Udp,
            addr: ([127, 0, 0, 1], port).into(),
        }
    }

    fn rules() -> Vec<ServiceRule> {
        vec![ServiceRule {
            name: "pg".into(),
            open_for: OPEN,
            knock: Some(KnockRule {
                sequence: vec![udp(7001), udp(7003), udp(7002)],
                trap: vec![udp(7009)],
                trap_lockout: true,
                step_timeout: Duration::from_secs(5),
                sequence_timeout: Duration::from_secs(15),
            }),
        }]
    }

    struct Fixture {
        handle: DriverHandle,
        store: Arc<MemoryStore>,
        clock: ManualClock,
        guard: Arc<SourceGuard>,
        stop: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    fn start() -> Fixture {
        let clock = ManualClock::new();
        let store = Arc::new(MemoryStore::new());
        let guard = Arc::new(SourceGuard::new(Limits {
            per_source_rate: 1000,
            per_source_burst: 1000,
            lockout_after: 2,
            lockout_for: Duration::from_secs(60),
            max_tracked_sources: 16,
            ipv6_prefix: 64,
        }));
        let (handle, rx) = DriverHandle::channel();
        let effects = Effects {
            store: store.clone(),
            clock: Arc::new(clock.clone()),
            guard: guard.clone(),
        };
        let driver = Driver::new(
            Gate::new(rules(), GateLimits::default()),
            Box::new(LocalLog::default()),
            rx,
            effects,
        );
        let stop = CancellationToken::new();
        let task = tokio::spawn(driver.run(stop.clone()));
        Fixture {
            handle,
            store,
            clock,
            guard,
            stop,
            task,
        }
    }

    fn knock(source: &str, port: u16) -> Knock {
        Knock {
            source: source.parse().unwrap(),
            step: udp(port),
        }
    }

    /// A request answered by the driver: everything queued before it has
    /// been applied (the queue and the log keep order).
    async fn settle(f: &Fixture) {
        f.handle
            .reconfigure(rules(), Vec::new(), GateLimits::default())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_completed_sequence_reaches_the_store() {
        let f = start();
        for port in [7001, 7003, 7002] {
            f.handle.knock(knock("10.0.0.1", port)).unwrap();
        }
        settle(&f).await;
        let now = f.clock.now();
        assert!(f.store.allows("pg", "10.0.0.1".parse().unwrap(), now));
        assert!(!f.store.allows("pg", "10.0.0.2".parse().unwrap(), now));
        f.stop.cancel();
        f.task.await.unwrap();
    }

    #[tokio::test]
    async fn a_revocation_is_answered_after_the_store_refuses_the_source() {
        let f = start();
        let source: IpAddr = "10.0.0.1".parse().unwrap();
        f.handle.authorize("pg".into(), source, Method::Knock, OPEN).unwrap();
        let revoked = f
            .handle
            .revoke("pg".into(), source, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(revoked.map(|g| g.source), Some(source));
        assert!(
            !f.store.allows("pg", source, f.clock.now()),
            "refused by the time the answer came"
        );
        let again = f
            .handle
            .revoke("pg".into(), source, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(again, None, "nothing left to revoke");
    }

    #[tokio::test]
    async fn wrong_knocks_strike_their_source_and_good_ones_do_not() {
        let f = start();
        let now = f.clock.now();
        // Two wrong knocks (the trap, then a step out of order) lock out.
        f.handle.knock(knock("10.0.0.5", 7009)).unwrap();
        f.handle.knock(knock("10.0.0.5", 7002)).unwrap();
        // A real sequence from another source strikes nothing.
        for port in [7001, 7003, 7002] {
            f.handle.knock(knock("10.0.0.6", port)).unwrap();
        }
        settle(&f).await;
        assert_eq!(f.guard.admit("10.0.0.5".parse().unwrap(), now), Err(Refusal::LockedOut));
        assert_eq!(f.guard.admit("10.0.0.6".parse().unwrap(), now), Ok(()));
    }

    #[tokio::test]
    async fn a_reload_that_drops_a_service_revokes_its_grants() {
        let f = start();
        let source: IpAddr = "10.0.0.1".parse().unwrap();
        f.handle.authorize("pg".into(), source, Method::Knock, OPEN).unwrap();
        settle(&f).await;
        assert!(f.store.allows("pg", source, f.clock.now()));
        f.handle
            .reconfigure(Vec::new(), Vec::new(), GateLimits::default())
            .await
            .unwrap();
        assert!(!f.store.allows("pg", source, f.clock.now()));
    }

    #[tokio::test]
    async fn a_grant_ends_at_its_deadline() {
        let f = start();
        let source: IpAddr = "10.0.0.1".parse().unwrap();
        f.handle
            .authorize("pg".into(), source, Method::Knock, Duration::from_millis(20))
            .unwrap();
        settle(&f).await;
        assert!(f.store.holds("pg", source));
        // The driver sleeps until the gate's deadline on the real timer;
        // the manual clock is moved past it so the gate sees it expired.
        let mut changes = f.store.changes();
        f.clock.advance(Duration::from_millis(25));
        let expired = async {
            while f.store.holds("pg", source) {
                changes.changed().await.unwrap();
            }
        };
        tokio::time::timeout(Duration::from_secs(5), expired)
            .await
            .expect("the grant expires at its deadline");
    }

    #[tokio::test]
    async fn a_manual_grant_and_an_unlock_are_answered_once_applied() {
        let f = start();
        let source: IpAddr = "10.0.0.1".parse().unwrap();
        let t = Duration::from_secs(5);
        let grant = f
            .handle
            .grant("pg".into(), source, "token".into(), OPEN, t)
            .await
            .unwrap();
        let grant = grant.expect("a known service");
        assert_eq!(grant.method, Method::Manual { by: "token".into() });
        assert!(f.store.allows("pg", source, f.clock.now()));
        assert_eq!(
            f.handle
                .grant("nope".into(), source, "token".into(), OPEN, t)
                .await
                .unwrap(),
            None
        );

        f.handle.knock(knock("10.0.0.5", 7009)).unwrap();
        settle(&f).await;
        let locked: IpAddr = "10.0.0.5".parse().unwrap();
        assert!(f.guard.locked_out(locked, f.clock.now()));
        let ended = f.handle.unlock(locked, "token".into(), t).await.unwrap();
        assert_eq!(ended.map(|l| l.why), Some(crate::guard::LockReason::Trap));
        assert!(!f.guard.locked_out(locked, f.clock.now()));
        assert_eq!(f.handle.unlock(locked, "token".into(), t).await.unwrap(), None);
    }

    #[test]
    fn knocks_cannot_take_the_room_kept_for_grants() {
        let (handle, _requests) = DriverHandle::channel();
        let mut queued = 0;
        while handle.knock(knock("10.0.0.1", 7001)).is_ok() {
            queued += 1;
        }
        assert_eq!(queued, QUEUE);
        let mut room = handle.reserve_grants(2).unwrap();
        assert!(room.authorize("pg".into(), "10.0.0.2".parse().unwrap(), Method::Knock, OPEN));
        assert!(room.authorize("pg".into(), "10.0.0.3".parse().unwrap(), Method::Knock, OPEN));
        assert!(!room.authorize("pg".into(), "10.0.0.4".parse().unwrap(), Method::Knock, OPEN));
        drop(room);
        assert!(handle.reserve_grants(RESERVED_FOR_GRANTS - 2).is_ok());
        assert_eq!(
            handle.reserve_grants(RESERVED_FOR_GRANTS - 1).err(),
            Some(DriverError::Busy)
        );
    }

    #[tokio::test]
    async fn a_stopped_driver_refuses_requests() {
        let f = start();
        f.stop.cancel();
        f.task.await.unwrap();
        assert_eq!(f.handle.knock(knock("10.0.0.1", 7001)), Err(DriverError::Stopped));
        assert_eq!(
            f.handle
                .revoke("pg".into(), "10.0.0.1".parse().unwrap(), Duration::from_secs(1))
                .await,
            Err(DriverError::Stopped)
        );
    }

    /// A log that stamps every entry with one wall-clock time, as a shared
    /// log stamps them with the time it took them.
    #[derive(Debug)]
    struct StampedLog {
        queue: VecDeque<Entry>,
        unix: u64,
    }

    impl InputLog for StampedLog {
        fn append(&mut self, entry: Entry) {
            self.queue.push_back(entry.stamped(self.unix));
        }

        fn next(&mut self) -> Pin<Box<dyn Future<Output = Entry> + Send + '_>> {
            Box::pin(async move {
                match self.queue.pop_front() {
                    Some(entry) => entry,
                    None => std::future::pending().await,
                }
            })
        }
    }

    #[tokio::test]
    async fn a_rotating_sequence_is_judged_at_the_time_the_log_stamped_its_knocks() {
        // Long before the clock's now (a replica reading the log again
        // after a restart, say): a different period.
        const STAMP: u64 = 1_700_000_000;
        let rule = totp::Rule {
            service: "db".into(),
            secret: Arc::new(crate::secret::Secret::from_slice(&[7; 32])),
            pool: (40000..40016).map(udp).collect(),
            steps: 4,
            period: Duration::from_secs(30),
            open_for: OPEN,
            step_timeout: Duration::from_secs(5),
            sequence_timeout: Duration::from_secs(15),
            trap_lockout: false,
        };
        let sequence = rule.steps_of(totp::counter(STAMP, rule.period));
        let service = ServiceRule {
            name: "db".into(),
            open_for: OPEN,
            knock: None,
        };
        let opens = |log: Box<dyn InputLog>| {
            let rule = rule.clone();
            let service = service.clone();
            let sequence = sequence.clone();
            async move {
                let clock = ManualClock::new();
                let store = Arc::new(MemoryStore::new());
                let (handle, rx) = DriverHandle::channel();
                let effects = Effects {
                    store: store.clone(),
                    clock: Arc::new(clock.clone()),
                    guard: Arc::new(SourceGuard::new(Limits::default())),
                };
                let driver = Driver::new(
                    Gate::new(vec![service.clone()], GateLimits::default()),
                    log,
                    rx,
                    effects,
                )
                .with_totp(vec![rule.clone()], 16);
                let stop = CancellationToken::new();
                let task = tokio::spawn(driver.run(stop.clone()));
                for step in sequence {
                    handle
                        .knock(Knock {
                            source: "10.0.0.1".parse().unwrap(),
                            step,
                        })
                        .unwrap();
                }
                handle
                    .reconfigure(vec![service], vec![rule], GateLimits::default())
                    .await
                    .unwrap();
                let opened = store.allows("db", "10.0.0.1".parse().unwrap(), clock.now());
                stop.cancel();
                task.await.unwrap();
                opened
            }
        };
        assert!(
            opens(Box::new(StampedLog {
                queue: VecDeque::new(),
                unix: STAMP
            }))
            .await,
            "the stamped period's sequence did not open"
        );
        // Judged by the clock instead, the same knocks are an old period's.
        assert!(!opens(Box::<LocalLog>::default()).await);
    }
}
