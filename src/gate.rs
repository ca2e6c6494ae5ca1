//! The gate: knock-sequence progress and grant decisions, with no I/O.
//!
//! Sensors turn packets into [`Knock`]s; the gate matches them against each
//! service's sequence per (service, source), and emits [`Event`]s: progress,
//! resets, grants, and expiries. It never reads the clock: every call takes
//! `now`, and [`Gate::next_deadline`] tells the driver when to call
//! [`Gate::handle_timeout`]. Timeouts are therefore enforced by the gate's
//! own deadlines, not by the arrival of the next packet.
//!
//! Its front door is [`Gate::handle`], [`Gate::handle_timeout`] and
//! [`Gate::next_deadline`]; the rest is private. Instants are added with
//! saturating arithmetic ([`later`]), so no configured duration can panic it.
//!
//! The gate does not own sockets, the grant store or logging: the driver
//! (`crate::driver`) feeds it and acts on its events.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::clock::later;
use crate::step::Step;

/// The knock rule of one service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnockRule {
    /// Steps in order; validated to hold at least three, non-monotonic.
    pub sequence: Vec<Step>,
    /// Endpoints that end the source's attempt and, with `trap_lockout`,
    /// lock the source out.
    pub trap: Vec<Step>,
    /// Whether a trap hit locks its source out (the default), not only
    /// resets it: a random-order scan then has one pass at the sequence.
    pub trap_lockout: bool,
    /// Longest gap between two consecutive steps.
    pub step_timeout: Duration,
    /// Longest time from the first step to the last.
    pub sequence_timeout: Duration,
}

/// What the gate needs to know about a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRule {
    pub name: Arc<str>,
    /// How long a grant admits new connections.
    pub open_for: Duration,
    pub knock: Option<KnockRule>,
}

/// How a grant was obtained.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Method {
    Knock,
    Spa {
        user: Arc<str>,
    },
    /// An operator's break-glass grant through the admin API; `by` says
    /// who asked (never a secret: see `admin`).
    Manual {
        by: Arc<str>,
    },
}

impl Method {
    /// The label of every kind of method.
    pub const LABELS: [&'static str; 3] = ["knock", "spa", "manual"];

    /// Stable label for logs and metrics.
    pub fn as_label(&self) -> &'static str {
        match self {
            Method::Knock => "knock",
            Method::Spa { .. } => "spa",
            Method::Manual { .. } => "manual",
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_label())
    }
}

/// Permission for one source address to open new connections to one
/// service until `expires_at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub service: Arc<str>,
    pub source: IpAddr,
    pub method: Method,
    pub expires_at: Instant,
}

/// A packet or connection seen on a knock endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Knock {
    pub source: IpAddr,
    pub step: Step,
}

/// What the gate is fed, besides the passing of time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    Knock(Knock),
    /// A verified authorization (SPA) or an operator's grant.
    Authorize {
        service: Arc<str>,
        source: IpAddr,
        method: Method,
        duration: Duration,
    },
    /// Ends a grant early: no new connections from that source.
    Revoke {
        service: Arc<str>,
        source: IpAddr,
    },
    /// A reloaded config: new rules and limits (grants of services that remain are kept).
    Reconfigure {
        services: Vec<ServiceRule>,
        limits: GateLimits,
    },
    /// Ends a source's lockout (an operator's request, `by` whom). The
    /// lockouts are the driver's business, not the gate's, which ignores
    /// this input; it is one so that a replicated log carries it in order
    /// with the knocks that caused the lockout.
    Unlock {
        source: IpAddr,
        by: Arc<str>,
    },
}

/// What one knock did to one service's attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KnockResult {
    /// Step `step` of `of` (1-based) was taken.
    Advanced { step: usize, of: usize },
    /// An exact repeat of the step just taken; tolerated and ignored.
    Repeated { step: usize },
    /// Progress was discarded.
    Reset(ResetCause),
    /// Not the next step and there was no progress to reset.
    Ignored,
    /// A first step, refused because the attempt table is full.
    TableFull,
}

impl KnockResult {
    /// One of each kind of result (labels depend on the kind alone).
    pub const ALL: [KnockResult; 6] = [
        KnockResult::Advanced { step: 1, of: 1 },
        KnockResult::Repeated { step: 1 },
        KnockResult::Reset(ResetCause::WrongStep),
        KnockResult::Reset(ResetCause::Trap),
        KnockResult::Ignored,
        KnockResult::TableFull,
    ];

    /// Stable label for logs and metrics.
    pub fn as_label(&self) -> &'static str {
        match self {
            KnockResult::Advanced { .. } => "advanced",
            KnockResult::Repeated { .. } => "repeated",
            KnockResult::Reset(ResetCause::WrongStep) => "reset_wrong_step",
            KnockResult::Reset(ResetCause::Trap) => "reset_trap",
            KnockResult::Ignored => "ignored",
            KnockResult::TableFull => "table_full",
        }
    }
}

/// Why progress was reset by a knock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetCause {
    WrongStep,
    Trap,
}

/// Why an attempt ended without a knock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpiryCause {
    StepTimeout,
    SequenceTimeout,
    /// A reload changed or removed the service's knock rule.
    Reconfigured,
    /// The source touched a port no service uses (the raw sensor sees
    /// them): a scan between two steps ends the attempt.
    OtherPort,
}

impl ExpiryCause {
    pub const ALL: [ExpiryCause; 4] = [
        ExpiryCause::StepTimeout,
        ExpiryCause::SequenceTimeout,
        ExpiryCause::Reconfigured,
        ExpiryCause::OtherPort,
    ];

    pub fn as_label(self) -> &'static str {
        match self {
            ExpiryCause::StepTimeout => "step_timeout",
            ExpiryCause::SequenceTimeout => "sequence_timeout",
            ExpiryCause::Reconfigured => "reconfigured",
            ExpiryCause::OtherPort => "other_port",
        }
    }
}

/// Everything the gate decides, in the order it decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Knock {
        service: Arc<str>,
        source: IpAddr,
        step: Step,
        result: KnockResult,
    },
    AttemptExpired {
        service: Arc<str>,
        source: IpAddr,
        cause: ExpiryCause,
    },
    /// A trap of a service whose traps lock out was hit: the source is to
    /// be locked out.
    Trapped {
        service: Arc<str>,
        source: IpAddr,
    },
    Granted(Grant),
    GrantExpired(Grant),
    Revoked(Grant),
}

/// Bounds on the gate's memory, since knock sources are spoofable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GateLimits {
    /// Most knock attempts in progress at once, over all services.
    pub max_attempts: usize,
}

impl Default for GateLimits {
    fn default() -> Self {
        Self { max_attempts: 65_536 }
    }
}

type Key = (usize, IpAddr);

/// Which services (by index) use each endpoint, and how.
type StepIndex = HashMap<Step, Vec<(usize, Role)>>;

#[derive(Debug, Clone, Copy)]
struct Attempt {
    /// Steps taken so far (at least 1).
    taken: usize,
    started: Instant,
    deadline: Instant,
    cause: ExpiryCause,
}

/// Where a step appears in a service's rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Sequence,
    Trap,
}

/// The sans-IO knock and grant state machine.
#[derive(Debug)]
pub struct Gate {
    services: Vec<ServiceRule>,
    by_name: HashMap<Arc<str>, usize>,
    by_step: StepIndex,
    attempts: HashMap<Key, Attempt>,
    attempt_deadlines: BTreeSet<(Instant, Key)>,
    grants: HashMap<Key, Grant>,
    grant_deadlines: BTreeSet<(Instant, Key)>,
    limits: GateLimits,
}

impl Gate {
    pub fn new(services: Vec<ServiceRule>, limits: GateLimits) -> Self {
        let (by_name, by_step) = Self::index(&services);
        Self {
            services,
            by_name,
            by_step,
            attempts: HashMap::new(),
            attempt_deadlines: BTreeSet::new(),
            grants: HashMap::new(),
            grant_deadlines: BTreeSet::new(),
            limits,
        }
    }

    /// Takes new rules, keeping what still applies: grants of services that
    /// still exist (their windows unchanged), and attempts in progress on
    /// services whose knock rule is unchanged. Grants of removed services
    /// are revoked (emitted as [`Event::Revoked`]); other attempts end.
    fn reconfigure(&mut self, services: Vec<ServiceRule>, limits: GateLimits, out: &mut Vec<Event>) {
        let (by_name, by_step) = Self::index(&services);
        let new_idx = |old: usize| by_name.get(&self.services[old].name).copied();
        let mut grants = HashMap::new();
        let mut grant_deadlines = BTreeSet::new();
        for ((idx, source), grant) in std::mem::take(&mut self.grants) {
            match new_idx(idx) {
                Some(n) => {
                    grant_deadlines.insert((grant.expires_at, (n, source)));
                    grants.insert((n, source), grant);
                }
                None => out.push(Event::Revoked(grant)),
            }
        }
        let mut attempts = HashMap::new();
        let mut attempt_deadlines = BTreeSet::new();
        for ((idx, source), attempt) in std::mem::take(&mut self.attempts) {
            let kept = new_idx(idx).filter(|n| services[*n].knock == self.services[idx].knock);
            match kept {
                Some(n) => {
                    attempt_deadlines.insert((attempt.deadline, (n, source)));
                    attempts.insert((n, source), attempt);
                }
                None => out.push(Event::AttemptExpired {
                    service: self.services[idx].name.clone(),
                    source,
                    cause: ExpiryCause::Reconfigured,
                }),
            }
        }
        *self = Self {
            services,
            by_name,
            by_step,
            attempts,
            attempt_deadlines,
            grants,
            grant_deadlines,
            limits,
        };
    }

    fn index(services: &[ServiceRule]) -> (HashMap<Arc<str>, usize>, StepIndex) {
        let mut by_step: StepIndex = HashMap::new();
        let mut by_name = HashMap::new();
        for (idx, svc) in services.iter().enumerate() {
            by_name.insert(svc.name.clone(), idx);
            if let Some(rule) = &svc.knock {
                let mut seen = Vec::new();
                for step in &rule.sequence {
                    if !seen.contains(step) {
                        seen.push(*step);
                        by_step.entry(*step).or_default().push((idx, Role::Sequence));
                    }
                }
                for step in &rule.trap {
                    if !seen.contains(step) {
                        seen.push(*step);
                        by_step.entry(*step).or_default().push((idx, Role::Trap));
                    }
                }
            }
        }
        (by_name, by_step)
    }

    /// Number of knock attempts in progress.
    #[cfg(test)]
    fn attempts_in_progress(&self) -> usize {
        self.attempts.len()
    }

    /// The earliest moment at which [`Gate::handle_timeout`] has work.
    pub fn next_deadline(&self) -> Option<Instant> {
        let a = self.attempt_deadlines.first().map(|(t, _)| *t);
        let g = self.grant_deadlines.first().map(|(t, _)| *t);
        match (a, g) {
            (Some(a), Some(g)) => Some(a.min(g)),
            (a, g) => a.or(g),
        }
    }

    /// Ends every attempt and grant whose deadline is at or before `now`.
    pub fn handle_timeout(&mut self, now: Instant, out: &mut Vec<Event>) {
        while let Some(&(deadline, key)) = self.attempt_deadlines.first() {
            if deadline > now {
                break;
            }
            self.attempt_deadlines.pop_first();
            if let Some(attempt) = self.attempts.remove(&key) {
                out.push(Event::AttemptExpired {
                    service: self.services[key.0].name.clone(),
                    source: key.1,
                    cause: attempt.cause,
                });
            }
        }
        while let Some(&(deadline, key)) = self.grant_deadlines.first() {
            if deadline > now {
                break;
            }
            self.grant_deadlines.pop_first();
            if let Some(grant) = self.grants.remove(&key) {
                out.push(Event::GrantExpired(grant));
            }
        }
    }

    /// Feeds one input; appends what it caused to `out`.
    pub fn handle(&mut self, input: Input, now: Instant, out: &mut Vec<Event>) {
        match input {
            Input::Knock(k) => self.knock(k, now, out),
            Input::Authorize {
                service,
                source,
                method,
                duration,
            } => {
                self.authorize(&service, source, method, duration, now, out);
            }
            Input::Revoke { service, source } => {
                self.handle_timeout(now, out);
                if let Some(grant) = self.revoke(&service, source) {
                    out.push(Event::Revoked(grant));
                }
            }
            Input::Reconfigure { services, limits } => {
                self.handle_timeout(now, out);
                self.reconfigure(services, limits, out);
            }
            Input::Unlock { .. } => {}
        }
    }

    /// Feeds one knock; appends what it caused to `out`.
    fn knock(&mut self, knock: Knock, now: Instant, out: &mut Vec<Event>) {
        self.handle_timeout(now, out);
        let Some(targets) = self.by_step.get(&knock.step) else {
            self.other_port(knock.source, out);
            return;
        };
        // The list is small (services sharing one endpoint); cloning it
        // releases the borrow of `by_step` for the mutations below.
        let targets: Vec<(usize, Role)> = targets.clone();
        for (idx, role) in targets {
            let result = match role {
                Role::Trap => self.trap(idx, knock.source),
                Role::Sequence => self.advance(idx, knock, now),
            };
            out.push(Event::Knock {
                service: self.services[idx].name.clone(),
                source: knock.source,
                step: knock.step,
                result,
            });
            let locks_out = self.services[idx].knock.as_ref().is_some_and(|k| k.trap_lockout);
            if role == Role::Trap && locks_out {
                out.push(Event::Trapped {
                    service: self.services[idx].name.clone(),
                    source: knock.source,
                });
            }
            if let KnockResult::Advanced { step, of } = result {
                if step == of {
                    self.remove_attempt((idx, knock.source));
                    let open_for = self.services[idx].open_for;
                    self.grant(idx, knock.source, Method::Knock, later(now, open_for), out);
                }
            }
        }
    }

    /// Grants `service` to `source` for `duration` (for SPA, or an operator).
    /// Returns false when the service is unknown.
    fn authorize(
        &mut self,
        service: &str,
        source: IpAddr,
        method: Method,
        duration: Duration,
        now: Instant,
        out: &mut Vec<Event>,
    ) -> bool {
        self.handle_timeout(now, out);
        let Some(&idx) = self.by_name.get(service) else {
            return false;
        };
        self.grant(idx, source, method, later(now, duration), out);
        true
    }

    /// Ends a grant early. Returns the grant that was revoked.
    fn revoke(&mut self, service: &str, source: IpAddr) -> Option<Grant> {
        let idx = *self.by_name.get(service)?;
        let grant = self.grants.remove(&(idx, source))?;
        self.grant_deadlines.remove(&(grant.expires_at, (idx, source)));
        Some(grant)
    }

    /// A knock on an endpoint no service uses (only the raw sensor sends
    /// them: it sees every port): every attempt of the source ends, so no
    /// scan order can walk a sequence. It is no wrong step and no trap, so
    /// it counts no strike: a user who talks to other services of the host
    /// between two steps just starts over.
    fn other_port(&mut self, source: IpAddr, out: &mut Vec<Event>) {
        for idx in 0..self.services.len() {
            if self.remove_attempt((idx, source)).is_some() {
                out.push(Event::AttemptExpired {
                    service: self.services[idx].name.clone(),
                    source,
                    cause: ExpiryCause::OtherPort,
                });
            }
        }
    }

    /// A trap hit ends any attempt of the source, and is reported as a
    /// trap hit even without one: the driver locks the source out either way.
    fn trap(&mut self, idx: usize, source: IpAddr) -> KnockResult {
        self.remove_attempt((idx, source));
        KnockResult::Reset(ResetCause::Trap)
    }

    fn advance(&mut self, idx: usize, knock: Knock, now: Instant) -> KnockResult {
        let rule = self.services[idx]
            .knock
            .as_ref()
            .expect("only services with a knock rule are indexed by step");
        let (of, step_timeout, sequence_timeout) = (rule.sequence.len(), rule.step_timeout, rule.sequence_timeout);
        let first = rule.sequence[0] == knock.step;
        let key = (idx, knock.source);
        if let Some(attempt) = self.attempts.get(&key).copied() {
            if rule.sequence.get(attempt.taken) == Some(&knock.step) {
                let taken = attempt.taken + 1;
                self.set_attempt(key, taken, attempt.started, now, step_timeout, sequence_timeout);
                return KnockResult::Advanced { step: taken, of };
            }
            if rule.sequence[attempt.taken - 1] == knock.step {
                return KnockResult::Repeated { step: attempt.taken };
            }
            self.remove_attempt(key);
            if !first {
                return KnockResult::Reset(ResetCause::WrongStep);
            }
            // A wrong step that is also the first step starts over, so a
            // user who retries at once is not punished twice.
        } else if !first {
            return KnockResult::Ignored;
        }
        // Full: a new attempt is refused rather than evicting one in
        // progress (a spoofed flood must not cost a real user theirs).
        if self.attempts.len() >= self.limits.max_attempts {
            return KnockResult::TableFull;
        }
        self.set_attempt(key, 1, now, now, step_timeout, sequence_timeout);
        KnockResult::Advanced { step: 1, of }
    }

    fn set_attempt(
        &mut self,
        key: Key,
        taken: usize,
        started: Instant,
        now: Instant,
        step_timeout: Duration,
        sequence_timeout: Duration,
    ) {
        let step_end = later(now, step_timeout);
        let sequence_end = later(started, sequence_timeout);
        let (deadline, cause) = if sequence_end <= step_end {
            (sequence_end, ExpiryCause::SequenceTimeout)
        } else {
            (step_end, ExpiryCause::StepTimeout)
        };
        if let Some(old) = self.attempts.insert(
            key,
            Attempt {
                taken,
                started,
                deadline,
                cause,
            },
        ) {
            self.attempt_deadlines.remove(&(old.deadline, key));
        }
        self.attempt_deadlines.insert((deadline, key));
    }

    fn remove_attempt(&mut self, key: Key) -> Option<Attempt> {
        let attempt = self.attempts.remove(&key)?;
        self.attempt_deadlines.remove(&(attempt.deadline, key));
        Some(attempt)
    }

    fn grant(&mut self, idx: usize, source: IpAddr, method: Method, expires_at: Instant, out: &mut Vec<Event>) {
        let key = (idx, source);
        // A new grant never shortens one already running.
        let expires_at = match self.grants.get(&key) {
            Some(old) => {
                self.grant_deadlines.remove(&(old.expires_at, key));
                old.expires_at.max(expires_at)
            }
            None => expires_at,
        };
        let grant = Grant {
            service: self.services[idx].name.clone(),
            source,
            method,
            expires_at,
        };
        self.grant_deadlines.insert((expires_at, key));
        self.grants.insert(key, grant.clone());
        out.push(Event::Granted(grant));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock};
    use crate::step::Proto;
    use std::net::SocketAddr;

    const STEP: Duration = Duration::from_secs(5);
    const SEQ: Duration = Duration::from_secs(15);
    const OPEN: Duration = Duration::from_secs(10);

    fn udp(port: u16) -> Step {
        Step {
            proto: Proto::Udp,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    fn rule(name: &str, ports: &[u16], trap: &[u16]) -> ServiceRule {
        ServiceRule {
            name: name.into(),
            open_for: OPEN,
            knock: Some(KnockRule {
                sequence: ports.iter().map(|p| udp(*p)).collect(),
                trap: trap.iter().map(|p| udp(*p)).collect(),
                trap_lockout: true,
                step_timeout: STEP,
                sequence_timeout: SEQ,
            }),
        }
    }

    fn src(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    /// One row of a knock script: wait, then knock from a source on a port.
    enum Op {
        Wait(Duration),
        Knock(u8, u16),
        /// Fire due timeouts, as the driver does when the deadline passes.
        Tick,
    }
    use Op::*;

    struct Harness {
        gate: Gate,
        clock: ManualClock,
        events: Vec<Event>,
    }

    impl Harness {
        fn new(services: Vec<ServiceRule>) -> Self {
            Self {
                gate: Gate::new(services, GateLimits::default()),
                clock: ManualClock::new(),
                events: Vec::new(),
            }
        }

        fn run(&mut self, ops: &[Op]) {
            for op in ops {
                match op {
                    Wait(d) => self.clock.advance(*d),
                    Knock(source, port) => self.gate.knock(
                        super::Knock {
                            source: src(*source),
                            step: udp(*port),
                        },
                        self.clock.now(),
                        &mut self.events,
                    ),
                    Tick => self.gate.handle_timeout(self.clock.now(), &mut self.events),
                }
            }
        }

        fn granted(&self) -> Vec<(String, u8)> {
            self.events
                .iter()
                .filter_map(|e| match e {
                    Event::Granted(g) => Some((g.service.to_string(), last_octet(g.source))),
                    _ => None,
                })
                .collect()
        }

        fn results(&self) -> Vec<KnockResult> {
            self.events
                .iter()
                .filter_map(|e| match e {
                    Event::Knock { result, .. } => Some(*result),
                    _ => None,
                })
                .collect()
        }
    }

    fn last_octet(ip: IpAddr) -> u8 {
        match ip {
            IpAddr::V4(v4) => v4.octets()[3],
            IpAddr::V6(_) => 0,
        }
    }

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn knock_sequences_table() {
        // (name, script, sources granted "echo")
        let table: Vec<(&str, Vec<Op>, Vec<u8>)> = vec![
            ("in order", vec![Knock(1, 1), Knock(1, 3), Knock(1, 2)], vec![1]),
            ("wrong order", vec![Knock(1, 1), Knock(1, 2), Knock(1, 3)], vec![]),
            (
                "wrong step resets, then a fresh start succeeds",
                vec![Knock(1, 1), Knock(1, 2), Knock(1, 1), Knock(1, 3), Knock(1, 2)],
                vec![1],
            ),
            (
                "a restart discards the steps taken before it",
                vec![Knock(1, 1), Knock(1, 3), Knock(1, 1), Knock(1, 2)],
                vec![],
            ),
            (
                "duplicate of the step just taken is tolerated",
                vec![Knock(1, 1), Knock(1, 1), Knock(1, 3), Knock(1, 3), Knock(1, 2)],
                vec![1],
            ),
            (
                "a step late by the step timeout fails",
                vec![Knock(1, 1), Knock(1, 3), Wait(STEP), Knock(1, 2)],
                vec![],
            ),
            (
                "a step just inside the step timeout succeeds",
                vec![Knock(1, 1), Knock(1, 3), Wait(STEP - MS(1)), Knock(1, 2)],
                vec![1],
            ),
            (
                "a repeat does not extend the step deadline",
                vec![
                    Knock(1, 1),
                    Wait(MS(3_000)),
                    Knock(1, 1),
                    Wait(MS(2_000)),
                    Knock(1, 3),
                    Knock(1, 2),
                ],
                vec![],
            ),
            (
                "two sources interleaving do not affect each other",
                vec![
                    Knock(1, 1),
                    Knock(2, 1),
                    Knock(1, 3),
                    Knock(2, 2),
                    Knock(1, 2),
                    Knock(2, 3),
                ],
                vec![1],
            ),
            (
                "two sources interleaving both succeed",
                vec![
                    Knock(1, 1),
                    Knock(2, 1),
                    Knock(2, 3),
                    Knock(1, 3),
                    Knock(2, 2),
                    Knock(1, 2),
                ],
                vec![2, 1],
            ),
            (
                "a trap port resets",
                vec![Knock(1, 1), Knock(1, 3), Knock(1, 7), Knock(1, 2)],
                vec![],
            ),
            (
                "an ascending sweep opens nothing",
                (0..10).map(|p| Knock(1, p)).collect(),
                vec![],
            ),
            (
                "a descending sweep opens nothing",
                (0..10).rev().map(|p| Knock(1, p)).collect(),
                vec![],
            ),
        ];
        for (name, script, want) in table {
            let mut h = Harness::new(vec![rule("echo", &[1, 3, 2], &[7])]);
            h.run(&script);
            let got: Vec<u8> = h.granted().into_iter().map(|(_, s)| s).collect();
            assert_eq!(got, want, "case: {name}");
        }
    }

    #[test]
    fn results_name_what_happened() {
        let mut h = Harness::new(vec![rule("echo", &[1, 3, 2], &[7])]);
        h.run(&[
            Knock(1, 3),
            Knock(1, 1),
            Knock(1, 1),
            Knock(1, 2),
            Knock(1, 1),
            Knock(1, 7),
        ]);
        assert_eq!(
            h.results(),
            vec![
                KnockResult::Ignored,
                KnockResult::Advanced { step: 1, of: 3 },
                KnockResult::Repeated { step: 1 },
                KnockResult::Reset(ResetCause::WrongStep),
                KnockResult::Advanced { step: 1, of: 3 },
                KnockResult::Reset(ResetCause::Trap),
            ]
        );
    }

    #[test]
    fn step_timeout_fires_from_the_deadline_alone() {
        let mut h = Harness::new(vec![rule("echo", &[1, 3, 2], &[])]);
        h.run(&[Knock(1, 1)]);
        assert_eq!(h.gate.next_deadline(), Some(h.clock.now() + STEP));
        h.run(&[Wait(STEP - MS(1)), Tick]);
        assert_eq!(h.gate.attempts_in_progress(), 1);
        h.run(&[Wait(MS(1)), Tick]);
        assert_eq!(h.gate.attempts_in_progress(), 0);
        assert!(h.events.contains(&Event::AttemptExpired {
            service: "echo".into(),
            source: src(1),
            cause: ExpiryCause::StepTimeout,
        }));
        assert_eq!(h.gate.next_deadline(), None);
    }

    #[test]
    fn sequence_timeout_fires_although_each_step_is_in_time() {
        // Steps 4 s apart fit a 5 s step timeout, but not an 8 s sequence.
        let mut r = rule("echo", &[1, 3, 2], &[]);
        r.knock.as_mut().unwrap().sequence_timeout = MS(8_000);
        let mut h = Harness::new(vec![r.clone()]);
        h.run(&[Knock(1, 1), Wait(MS(4_000)), Knock(1, 3)]);
        assert_eq!(h.gate.next_deadline(), Some(h.clock.now() + MS(4_000)));
        h.run(&[Wait(MS(3_999)), Tick]);
        assert_eq!(h.gate.attempts_in_progress(), 1);
        h.run(&[Wait(MS(1)), Tick, Knock(1, 2)]);
        assert!(h.events.contains(&Event::AttemptExpired {
            service: "echo".into(),
            source: src(1),
            cause: ExpiryCause::SequenceTimeout,
        }));
        assert_eq!(h.granted(), vec![]);

        // The same pace one millisecond faster opens.
        let mut h = Harness::new(vec![r]);
        h.run(&[Knock(1, 1), Wait(MS(4_000)), Knock(1, 3), Wait(MS(3_999)), Knock(1, 2)]);
        assert_eq!(h.granted(), vec![("echo".to_string(), 1)]);
    }

    #[test]
    fn grant_expires_after_open_for() {
        let mut h = Harness::new(vec![rule("echo", &[1, 3, 2], &[])]);
        h.run(&[Knock(1, 1), Knock(1, 3), Knock(1, 2)]);
        let granted_at = h.clock.now();
        let Some(Event::Granted(grant)) = h.events.iter().find(|e| matches!(e, Event::Granted(_))).cloned() else {
            panic!("no grant in {:?}", h.events);
        };
        assert_eq!(grant.expires_at, granted_at + OPEN);
        assert_eq!(grant.method, Method::Knock);
        assert_eq!(h.gate.next_deadline(), Some(granted_at + OPEN));
        h.run(&[Wait(OPEN - MS(1)), Tick]);
        assert!(!h.events.iter().any(|e| matches!(e, Event::GrantExpired(_))));
        h.run(&[Wait(MS(1)), Tick]);
        assert_eq!(h.events.last(), Some(&Event::GrantExpired(grant)));
        assert_eq!(h.gate.next_deadline(), None);
    }

    #[test]
    fn a_second_grant_extends_and_never_shortens() {
        let mut h = Harness::new(vec![rule("echo", &[1, 3, 2], &[])]);
        let t0 = h.clock.now();
        let mut out = Vec::new();
        assert!(h.gate.authorize("echo", src(1), Method::Knock, OPEN, t0, &mut out));
        h.clock.advance(MS(500));
        assert!(h
            .gate
            .authorize("echo", src(1), Method::Knock, MS(100), h.clock.now(), &mut out));
        assert_eq!(h.gate.next_deadline(), Some(t0 + OPEN));
        assert!(!h.gate.authorize("nope", src(1), Method::Knock, OPEN, t0, &mut out));
    }

    #[test]
    fn revoke_removes_the_grant_and_its_timer() {
        let mut h = Harness::new(vec![rule("echo", &[1, 3, 2], &[])]);
        h.run(&[Knock(1, 1), Knock(1, 3), Knock(1, 2)]);
        assert!(h.gate.revoke("echo", src(1)).is_some());
        assert_eq!(h.gate.next_deadline(), None);
        assert!(h.gate.revoke("echo", src(1)).is_none());
    }

    #[test]
    fn revoke_input_emits_the_revoked_grant() {
        let mut h = Harness::new(vec![rule("echo", &[1, 3, 2], &[])]);
        h.run(&[Knock(1, 1), Knock(1, 3), Knock(1, 2)]);
        let revoke = Input::Revoke {
            service: "echo".into(),
            source: src(1),
        };
        h.gate.handle(revoke, h.clock.now(), &mut h.events);
        assert!(matches!(h.events.last(), Some(Event::Revoked(g)) if g.source == src(1)));
        assert_eq!(h.gate.next_deadline(), None);
    }

    #[test]
    fn reconfigure_keeps_grants_and_unchanged_attempts_and_revokes_removed_services() {
        let mut h = Harness::new(vec![
            rule("a", &[1, 3, 2], &[]),
            rule("b", &[4, 6, 5], &[]),
            rule("c", &[7, 9, 8], &[]),
        ]);
        // a granted; b and c halfway; c also granted to another source.
        h.run(&[
            Knock(1, 1),
            Knock(1, 3),
            Knock(1, 2),
            Knock(1, 4),
            Knock(1, 7),
            Knock(1, 9),
        ]);
        let a_expiry = h.events.iter().find_map(|e| match e {
            Event::Granted(g) if &*g.service == "a" => Some(g.expires_at),
            _ => None,
        });
        assert!(a_expiry.is_some());
        let now = h.clock.now();
        h.gate.authorize("c", src(2), Method::Knock, OPEN, now, &mut h.events);
        h.events.clear();
        // b unchanged (listed first now), a unchanged, c removed; d takes
        // c's sequence.
        h.gate.reconfigure(
            vec![
                rule("b", &[4, 6, 5], &[]),
                rule("a", &[1, 3, 2], &[]),
                rule("d", &[7, 9, 8], &[]),
            ],
            GateLimits::default(),
            &mut h.events,
        );
        assert!(h
            .events
            .iter()
            .any(|e| matches!(e, Event::Revoked(g) if &*g.service == "c")));
        assert!(h.events.contains(&Event::AttemptExpired {
            service: "c".into(),
            source: src(1),
            cause: ExpiryCause::Reconfigured,
        }));
        assert_eq!(h.gate.attempts_in_progress(), 1, "b's attempt should survive");
        // b's attempt goes on where it was.
        h.events.clear();
        h.run(&[Knock(1, 6), Knock(1, 5)]);
        assert_eq!(h.granted(), vec![("b".to_string(), 1)]);
        // a's grant keeps its timer.
        assert_eq!(h.gate.revoke("a", src(1)).map(|g| g.expires_at), a_expiry);
    }

    #[test]
    fn two_services_sharing_a_port() {
        // Both start on port 1; they diverge after it.
        let mut h = Harness::new(vec![rule("a", &[1, 3, 2], &[]), rule("b", &[1, 4, 2], &[])]);
        h.run(&[Knock(1, 1), Knock(1, 4), Knock(1, 2)]);
        assert_eq!(h.granted(), vec![("b".to_string(), 1)]);

        let mut h = Harness::new(vec![rule("a", &[1, 3, 2], &[]), rule("b", &[1, 4, 2], &[])]);
        h.run(&[Knock(1, 1), Knock(1, 3), Knock(1, 2)]);
        assert_eq!(h.granted(), vec![("a".to_string(), 1)]);

        // The same sequence on two services opens both.
        let mut h = Harness::new(vec![rule("a", &[1, 3, 2], &[]), rule("b", &[1, 3, 2], &[])]);
        h.run(&[Knock(1, 1), Knock(1, 3), Knock(1, 2)]);
        assert_eq!(h.granted(), vec![("a".to_string(), 1), ("b".to_string(), 1)]);
    }

    #[test]
    fn a_port_trapping_one_service_can_be_a_step_of_another() {
        let mut h = Harness::new(vec![rule("a", &[1, 3, 2], &[4]), rule("b", &[4, 1, 5], &[])]);
        h.run(&[Knock(1, 1), Knock(1, 4), Knock(1, 3), Knock(1, 2)]);
        assert_eq!(h.granted(), vec![]);
    }

    #[test]
    fn attempts_are_bounded_and_new_ones_are_refused_when_full() {
        let mut gate = Gate::new(vec![rule("echo", &[1, 3, 2], &[])], GateLimits { max_attempts: 2 });
        let clock = ManualClock::new();
        let mut out = Vec::new();
        for s in 1..=3 {
            gate.knock(
                super::Knock {
                    source: src(s),
                    step: udp(1),
                },
                clock.now(),
                &mut out,
            );
            clock.advance(MS(1));
        }
        assert_eq!(gate.attempts_in_progress(), 2);
        assert!(
            !out.iter().any(|e| matches!(e, Event::AttemptExpired { .. })),
            "no attempt in progress is evicted"
        );
        assert!(out.contains(&Event::Knock {
            service: "echo".into(),
            source: src(3),
            step: udp(1),
            result: KnockResult::TableFull,
        }));
        // The first two go on to complete.
        for step in [3, 2] {
            gate.knock(
                super::Knock {
                    source: src(1),
                    step: udp(step),
                },
                clock.now(),
                &mut out,
            );
        }
        assert!(out.iter().any(|e| matches!(e, Event::Granted(g) if g.source == src(1))));
    }

    #[test]
    fn unknown_endpoints_do_nothing() {
        let mut h = Harness::new(vec![rule("echo", &[1, 3, 2], &[])]);
        h.run(&[Knock(1, 99)]);
        assert!(h.events.is_empty());
    }

    #[test]
    fn another_port_ends_the_attempts_of_its_source_only() {
        // (name, script, sources granted "a", attempts ended by another port)
        let table: Vec<(&str, Vec<Op>, Vec<u8>, usize)> = vec![
            (
                "another port between two steps resets",
                vec![Knock(1, 1), Knock(1, 3), Knock(1, 99), Knock(1, 2)],
                vec![],
                1,
            ),
            (
                "a fresh start after it opens",
                vec![Knock(1, 1), Knock(1, 99), Knock(1, 1), Knock(1, 3), Knock(1, 2)],
                vec![1],
                1,
            ),
            (
                "another source's port does not touch the attempt",
                vec![Knock(1, 1), Knock(1, 3), Knock(2, 99), Knock(1, 2)],
                vec![1],
                0,
            ),
            (
                "without an attempt it does nothing",
                vec![Knock(1, 99), Knock(1, 1), Wait(MS(10)), Knock(1, 3), Knock(1, 2)],
                vec![1],
                0,
            ),
            (
                "it ends the attempts on every service",
                vec![Knock(1, 1), Knock(1, 4), Knock(1, 99), Knock(1, 3), Knock(1, 2)],
                vec![],
                2,
            ),
        ];
        for (name, script, want, ended) in table {
            let mut h = Harness::new(vec![rule("a", &[1, 3, 2], &[7]), rule("b", &[4, 6, 5], &[])]);
            h.run(&script);
            let got: Vec<u8> = h
                .granted()
                .into_iter()
                .filter(|(s, _)| s == "a")
                .map(|(_, s)| s)
                .collect();
            assert_eq!(got, want, "case: {name}");
            let other = h
                .events
                .iter()
                .filter(|e| {
                    matches!(
                        e,
                        Event::AttemptExpired {
                            cause: ExpiryCause::OtherPort,
                            ..
                        }
                    )
                })
                .count();
            assert_eq!(other, ended, "case: {name}");
            // No knock result for another port: nothing a strike could count.
            assert!(
                !h.events
                    .iter()
                    .any(|e| matches!(e, Event::Knock { step, .. } if step.addr.port() == 99)),
                "case: {name}"
            );
        }
    }
}
