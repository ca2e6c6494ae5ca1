//! Knock rules: steps in every spelling, sequences that a sweep cannot
//! walk, and endpoints that collide neither with each other nor with a
//! guarded port.

use std::net::IpAddr;
use std::time::Duration;

use super::raw::{RawKnock, RawStep, RawTotp, RawTraps};
use super::{Service, Validator};
use crate::gate::KnockRule;
use crate::step::{Proto, Step, StepSpec};
use crate::totp;

impl Validator {
    /// A rotating sequence (`knock = { totp = { ... } }`) at `path`.
    pub(super) fn totp(
        &mut self,
        path: &str,
        raw: &RawKnock,
        totp: &RawTotp,
        service: (&str, IpAddr, Duration),
    ) -> Option<totp::Rule> {
        let before = self.problems.len();
        let (name, ip, open_for) = service;
        let list_given = !raw.sequence.is_empty() || !matches!(&raw.trap_ports, RawTraps::List(l) if l.is_empty());
        if list_given {
            self.problem(
                path,
                "set totp or sequence/trap_ports, not both (every pool port that is not a step is a trap)",
            );
        }
        let secret = match &totp.key_file {
            None => {
                self.problem(
                    format!("{path}.totp.key_file"),
                    "required: a file from `portcullis keygen --kind totp`",
                );
                None
            }
            Some(file) => {
                let key = format!("{path}.totp.key_file");
                match super::spa::read_key_file(&self.base.join(file)) {
                    Ok((text, warning)) => {
                        if let Some(w) = warning {
                            self.warning(key.clone(), w.to_string());
                        }
                        match totp::parse_key(&text) {
                            Ok(secret) => Some(secret),
                            Err(e) => {
                                self.problem(key, e);
                                None
                            }
                        }
                    }
                    Err(e) => {
                        self.problem(key, e);
                        None
                    }
                }
            }
        };
        let steps = match totp.steps {
            None => Some(4),
            Some(n) if (3..=16).contains(&n) => usize::try_from(n).ok(),
            Some(n) => {
                self.problem(format!("{path}.totp.steps"), format!("{n} is not 3-16"));
                None
            }
        };
        let pool = match &totp.ports {
            None => {
                self.problem(
                    format!("{path}.totp.ports"),
                    "required: a port range, e.g. \"40000-40063/udp\"",
                );
                None
            }
            Some(text) => match totp::parse_pool(text) {
                Ok((proto, ports)) => {
                    let need = 2 * steps.unwrap_or(4);
                    if ports.len() < need || ports.len() > totp::MAX_POOL {
                        self.problem(
                            format!("{path}.totp.ports"),
                            format!(
                                "{} port(s): use {need} to {} (at least twice the steps)",
                                ports.len(),
                                totp::MAX_POOL
                            ),
                        );
                        None
                    } else {
                        Some(
                            ports
                                .into_iter()
                                .map(|port| Step {
                                    proto,
                                    addr: std::net::SocketAddr::new(ip, port),
                                })
                                .collect::<Vec<_>>(),
                        )
                    }
                }
                Err(e) => {
                    self.problem(format!("{path}.totp.ports"), e);
                    None
                }
            },
        };
        let period = self.duration(
            &format!("{path}.totp.period"),
            totp.period.as_ref(),
            Duration::from_secs(30),
        );
        if period < Duration::from_secs(5) || period.subsec_nanos() != 0 {
            self.problem(format!("{path}.totp.period"), "use whole seconds, at least 5s");
        }
        let (step_timeout, sequence_timeout) = self.knock_timeouts(path, raw);
        if self.problems.len() > before {
            return None;
        }
        Some(totp::Rule {
            service: name.into(),
            secret: std::sync::Arc::new(secret?),
            pool: pool?,
            steps: steps?,
            period,
            open_for,
            step_timeout,
            sequence_timeout,
            trap_lockout: raw.trap_lockout.unwrap_or(true),
        })
    }

    /// `step_timeout` and `sequence_timeout` of the knock rule at `path`.
    fn knock_timeouts(&mut self, path: &str, raw: &RawKnock) -> (Duration, Duration) {
        let step = self.duration(
            &format!("{path}.step_timeout"),
            raw.step_timeout.as_ref(),
            Duration::from_secs(5),
        );
        let sequence = self.duration(
            &format!("{path}.sequence_timeout"),
            raw.sequence_timeout.as_ref(),
            Duration::from_secs(15),
        );
        (step, sequence)
    }

    pub(super) fn steps(&mut self, path: &str, raw: &[RawStep], ip: IpAddr) -> Option<Vec<Step>> {
        let mut ok = true;
        let mut steps = Vec::new();
        for (i, r) in raw.iter().enumerate() {
            let parsed = match r {
                RawStep::Port(p) => u16::try_from(*p)
                    .ok()
                    .filter(|p| *p != 0)
                    .map(|port| StepSpec {
                        proto: Proto::Tcp,
                        ip: None,
                        port,
                    })
                    .ok_or_else(|| format!("{p} is not a port (1-65535)")),
                RawStep::Text(t) => t.parse::<StepSpec>().map_err(|e| e.to_string()),
            };
            match parsed {
                Ok(spec) => steps.push(spec.at(ip)),
                Err(e) => {
                    self.problem(format!("{path}[{i}]"), e);
                    ok = false;
                }
            }
        }
        ok.then_some(steps)
    }

    /// The knock rule at `path`, and how many trap ports are to be picked
    /// for it at start-up (`trap_ports = { count = N }`; 0 for a list).
    pub(super) fn knock(&mut self, path: &str, raw: &RawKnock, ip: IpAddr) -> Option<(KnockRule, usize)> {
        let before = self.problems.len();
        let sequence = self.steps(&format!("{path}.sequence"), &raw.sequence, ip);
        let (trap, pick) = match &raw.trap_ports {
            RawTraps::List(list) => (self.steps(&format!("{path}.trap_ports"), list, ip), 0),
            RawTraps::Pick(p) => match usize::try_from(p.count)
                .ok()
                .filter(|n| (1..=MAX_PICKED_TRAPS).contains(n))
            {
                Some(n) => (Some(Vec::new()), n),
                None => {
                    self.problem(
                        format!("{path}.trap_ports.count"),
                        format!(
                            "{} is not a number of trap ports to pick (1-{MAX_PICKED_TRAPS})",
                            p.count
                        ),
                    );
                    (None, 0)
                }
            },
        };
        let (step_timeout, sequence_timeout) = self.knock_timeouts(path, raw);
        if let Some(seq) = &sequence {
            self.sequence_rules(&format!("{path}.sequence"), seq);
            if let Some(trap) = &trap {
                for (i, t) in trap.iter().enumerate() {
                    if seq.contains(t) {
                        self.problem(
                            format!("{path}.trap_ports[{i}]"),
                            format!("{t} is also a step of the sequence: a trap port must be another port"),
                        );
                    }
                }
            }
        }
        if self.problems.len() > before {
            return None;
        }
        let rule = KnockRule {
            sequence: sequence?,
            trap: trap?,
            trap_lockout: raw.trap_lockout.unwrap_or(true),
            step_timeout,
            sequence_timeout,
        };
        Some((rule, pick))
    }

    fn sequence_rules(&mut self, path: &str, seq: &[Step]) {
        if seq.len() < 3 {
            self.problem(
                path,
                format!("{} step(s) are too easy to guess: use at least 3, in an order that is neither ascending nor descending", seq.len()),
            );
            return;
        }
        let distinct = distinct_steps(seq);
        if distinct < 3 {
            self.problem(
                path,
                format!(
                    "{distinct} distinct port(s) are too easy to guess (a random scan opens A, B, A about once in 2 passes): use at least 3 different ports"
                ),
            );
            return;
        }
        for (i, pair) in seq.windows(2).enumerate() {
            if pair[0] == pair[1] {
                self.problem(
                    format!("{path}[{}]", i + 1),
                    format!("{} repeats the step before it: a repeat is tolerated as a retransmission, so it adds nothing; use another port", pair[1]),
                );
            }
        }
        let ports: Vec<u16> = seq.iter().map(|s| s.addr.port()).collect();
        let ascending = ports.windows(2).all(|w| w[0] <= w[1]);
        let descending = ports.windows(2).all(|w| w[0] >= w[1]);
        if ascending || descending {
            let list = ports.iter().map(u16::to_string).collect::<Vec<_>>().join(", ");
            let mut suggestion = ports.clone();
            suggestion.sort_unstable();
            suggestion.swap(1, 2);
            let suggestion = suggestion.iter().map(u16::to_string).collect::<Vec<_>>().join(", ");
            self.problem(
                path,
                format!(
                    "ports {} ({list}): a sequential port scan walks them in order and opens the service; reorder them, e.g. {suggestion}",
                    if ascending { "ascend" } else { "descend" }
                ),
            );
        }
    }

    /// A listener of the gateway's own at `key` (admin, SPA) must not take
    /// a guarded listener's or a knock step's address.
    pub(super) fn own_endpoint(&mut self, key: &str, ours: Step, services: &[Service]) {
        for s in services {
            let guarded = Step {
                proto: s.protocol,
                addr: s.listen,
            };
            let steps = s
                .knock
                .iter()
                .flat_map(|k| k.sequence.iter().chain(&k.trap))
                .map(|st| (*st, format!("service.{}.knock", s.name)));
            for (other, path) in std::iter::once((guarded, format!("service.{}.listen", s.name))).chain(steps) {
                if collides(&ours, &other) {
                    self.problem(key, format!("{} is also used by {path}", ours.addr));
                    return;
                }
            }
        }
    }

    /// Guarded listeners and knock endpoints must not collide.
    pub(super) fn endpoints(&mut self, services: &[Service]) {
        let mut taken: Vec<(Step, String, bool)> = Vec::new();
        for s in services {
            let guarded = Step {
                proto: s.protocol,
                addr: s.listen,
            };
            let path = format!("service.{}.listen", s.name);
            for (other, other_path, _) in &taken {
                if collides(&guarded, other) {
                    self.problem(&path, format!("{} is also used by {other_path}", s.listen));
                }
            }
            taken.push((guarded, path, false));
        }
        for s in services {
            let steps: Vec<(&Step, &str)> = match (&s.knock, &s.totp) {
                (Some(k), _) => k
                    .sequence
                    .iter()
                    .map(|st| (st, "sequence"))
                    .chain(k.trap.iter().map(|st| (st, "trap_ports")))
                    .collect(),
                (None, Some(t)) => t.pool.iter().map(|st| (st, "totp.ports")).collect(),
                (None, None) => continue,
            };
            for (step, list) in steps {
                let path = format!("service.{}.knock.{list}", s.name);
                let mut clash = None;
                for (other, other_path, is_knock) in &taken {
                    // Knock endpoints may be shared between services; a
                    // guarded listener or an overlapping address may not.
                    // A rotating sequence's pool is its own: every port of
                    // it is a step or a trap of that service alone.
                    let shared = *is_knock && step == other && list != "totp.ports";
                    if collides(step, other) && !shared {
                        clash = Some(other_path.clone());
                    }
                }
                match clash {
                    Some(other) => self.problem(&path, format!("{step} is also used by {other}")),
                    None => taken.push((*step, path, list != "totp.ports")),
                }
            }
        }
    }
}

fn collides(a: &Step, b: &Step) -> bool {
    // Port 0 asks the kernel for a free port, which never collides.
    a.proto == b.proto
        && a.addr.port() != 0
        && a.addr.port() == b.addr.port()
        && (a.addr.ip() == b.addr.ip() || covers(a.addr.ip(), b.addr.ip()) || covers(b.addr.ip(), a.addr.ip()))
}

/// Whether a wildcard bind on `wild` takes the port for `other` too: an
/// IPv4 wildcard covers IPv4 addresses, a dual-stack IPv6 one covers all.
fn covers(wild: IpAddr, other: IpAddr) -> bool {
    wild.is_unspecified() && (wild.is_ipv6() || other.is_ipv4())
}

fn distinct_steps(seq: &[Step]) -> usize {
    let mut seen: Vec<&Step> = Vec::with_capacity(seq.len());
    for s in seq {
        if !seen.contains(&s) {
            seen.push(s);
        }
    }
    seen.len()
}

/// Most trap ports `trap_ports = { count = N }` may ask for.
pub(super) const MAX_PICKED_TRAPS: usize = 256;

/// The chance above which `check` warns that a random-order scan may open
/// a sequence.
pub const RANDOM_PASS_WARN: f64 = 1e-4;

/// The chance that one random-order pass over a service's knock ports (its
/// `steps` distinct steps and `traps` trap ports, each hit once, in a
/// random order, as a scanner that randomises ports does) opens the
/// service. With traps that lock out, every step must come before any
/// trap and in order: `1 / ((T+1)(T+2)...(T+S))`; with traps that only
/// reset, no trap may fall between the first step and the last:
/// `1 / ((T+2)...(T+S))`.
///
/// ```
/// use portcullis::config::random_pass_chance;
/// assert_eq!(random_pass_chance(3, 0, true), 1.0 / 6.0);
/// assert_eq!(random_pass_chance(3, 2, true), 1.0 / 60.0);
/// assert_eq!(random_pass_chance(3, 2, false), 1.0 / 20.0);
/// ```
pub fn random_pass_chance(steps: usize, traps: usize, trap_lockout: bool) -> f64 {
    let first = if trap_lockout { traps + 1 } else { traps + 2 };
    let mut odds = 1.0f64;
    for k in first..=traps + steps {
        odds *= k as f64;
    }
    1.0 / odds
}

/// One line of `check`'s report on a knock sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct SequenceReport {
    /// `service.NAME.knock`.
    pub path: String,
    pub steps: usize,
    pub traps: usize,
    pub chance: f64,
    /// Trap ports to add to get below [`RANDOM_PASS_WARN`], when above it:
    /// with the steps as they are, and with one step more.
    pub add_traps: Option<(usize, usize)>,
}

/// How likely one random-order scan is to open each knock sequence of
/// `services` (socket sensor; the raw sensor makes every other port reset
/// an attempt, which is far stricter).
pub fn sequence_report(services: &[Service]) -> Vec<SequenceReport> {
    services
        .iter()
        .filter_map(|s| {
            let k = s.knock.as_ref()?;
            let steps = distinct_steps(&k.sequence);
            // Picked traps are not picked yet when `check` runs.
            let traps = k.trap.len().max(s.pick_traps);
            let chance = random_pass_chance(steps, traps, k.trap_lockout);
            let needed = |steps: usize| {
                (0..)
                    .find(|more| random_pass_chance(steps, traps + more, k.trap_lockout) <= RANDOM_PASS_WARN)
                    .unwrap_or(usize::MAX)
            };
            let add_traps = (chance > RANDOM_PASS_WARN).then(|| (needed(steps), needed(steps + 1)));
            Some(SequenceReport {
                path: format!("service.{}.knock", s.name),
                steps,
                traps,
                chance,
                add_traps,
            })
        })
        .collect()
}
