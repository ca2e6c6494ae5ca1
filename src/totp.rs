//! Rotating knock sequences (RFC 6238's shape): each period's sequence is
//! derived by HMAC-SHA256 from a per-service secret and the period's
//! number, as `steps` distinct ports of a pool. The gateway accepts the
//! current period's sequence and the previous one's; a period whose
//! sequence has opened the service once is spent, so a captured sequence
//! cannot be replayed, from any source. Every pool port that is not a step
//! of a live sequence is a trap.
//!
//! Sans-IO, like the gate: [`Tracker::knock`] is told the monotonic instant
//! and the wall-clock second, and reads no clock; the driver applies what
//! it says (a grant through the gate, a lockout through the guard).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::secret::Secret;
use crate::step::{Proto, Step};

/// The key-file line holding the shared secret.
pub const KEY_LINE: &str = "TOTP_KEY_BASE64";
/// Length of the secrets `portcullis keygen --kind totp` makes.
pub const KEY_LEN: usize = 32;
/// Shortest secret accepted.
pub const MIN_KEY_LEN: usize = 16;
/// Most ports in a pool (each is listened on with the socket sensor).
pub const MAX_POOL: usize = 1024;
const LABEL: &[u8] = b"portcullis totp v1\0";

/// The shared secret of a rotating sequence, from its key file text.
pub fn parse_key(text: &str) -> Result<Secret, String> {
    let mut found = None;
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.split_once(':') {
            Some((name, value)) if name.trim() == KEY_LINE => {
                let bytes = STANDARD
                    .decode(value.trim())
                    .map_err(|_| format!("line {}: {KEY_LINE} is not base64", i + 1))?;
                found = Some(Secret::new(bytes));
            }
            // Settings a client may keep beside the key.
            Some((name, _)) if ["TOTP_PORTS", "TOTP_STEPS", "TOTP_PERIOD"].contains(&name.trim()) => {}
            _ => return Err(format!("line {}: expected {KEY_LINE}: VALUE", i + 1)),
        }
    }
    let key = found.ok_or_else(|| format!("no {KEY_LINE} line (make one with `portcullis keygen --kind totp`)"))?;
    if key.len() < MIN_KEY_LEN {
        return Err(format!(
            "{KEY_LINE} is {} bytes; at least {MIN_KEY_LEN} are needed",
            key.len()
        ));
    }
    Ok(key)
}

/// The settings a client may keep beside the secret (`TOTP_PORTS`,
/// `TOTP_STEPS`, `TOTP_PERIOD` lines), so `knock --totp FILE HOST` needs no
/// more; the gateway takes them from its config instead.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KeySettings {
    pub ports: Option<String>,
    pub steps: Option<usize>,
    pub period: Option<String>,
}

/// The [`KeySettings`] of a key file's text (unreadable values are
/// errors).
pub fn key_settings(text: &str) -> Result<KeySettings, String> {
    let mut out = KeySettings::default();
    for (i, line) in text.lines().enumerate() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim().to_string();
        match name.trim() {
            "TOTP_PORTS" => out.ports = Some(value),
            "TOTP_PERIOD" => out.period = Some(value),
            "TOTP_STEPS" => {
                out.steps = Some(
                    value
                        .parse()
                        .map_err(|_| format!("line {}: TOTP_STEPS is not a number", i + 1))?,
                );
            }
            _ => {}
        }
    }
    Ok(out)
}

/// A fresh secret's key-file text.
pub fn render_key(rng: &mut impl rand::CryptoRng) -> zeroize::Zeroizing<String> {
    let key = Secret::generate(KEY_LEN, rng);
    zeroize::Zeroizing::new(format!("{KEY_LINE}: {}\n", STANDARD.encode(key.expose())))
}

/// Parses a pool, `40000-40063/udp` (a bare range is TCP, as a bare step
/// is): its ports in order.
pub fn parse_pool(text: &str) -> Result<(Proto, Vec<u16>), String> {
    let (range, proto) = match text.trim().rsplit_once('/') {
        Some((r, "udp")) => (r, Proto::Udp),
        Some((r, "tcp")) => (r, Proto::Tcp),
        Some((_, other)) => return Err(format!("{other:?} is not udp or tcp")),
        None => (text.trim(), Proto::Tcp),
    };
    let (lo, hi) = range
        .split_once('-')
        .ok_or_else(|| format!("{text:?} is not FIRST-LAST/PROTO (e.g. \"40000-40063/udp\")"))?;
    let port = |s: &str| s.trim().parse::<u16>().ok().filter(|p| *p != 0);
    let (Some(lo), Some(hi)) = (port(lo), port(hi)) else {
        return Err(format!("{text:?}: ports are 1-65535"));
    };
    if lo > hi {
        return Err(format!("{text:?}: the first port is above the last"));
    }
    Ok((proto, (lo..=hi).collect()))
}

/// The sequence of period `counter`: `steps` distinct indices into a pool
/// of `pool` ports, from HMAC-SHA256(secret, label || counter).
pub fn sequence(secret: &[u8], counter: u64, pool: usize, steps: usize) -> Vec<usize> {
    debug_assert!(steps <= pool);
    let mut out = Vec::with_capacity(steps);
    for block in 0u32.. {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret).expect("HMAC takes a key of any length");
        mac.update(LABEL);
        mac.update(&counter.to_be_bytes());
        mac.update(&block.to_be_bytes());
        let bytes = mac.finalize().into_bytes();
        for pair in bytes.chunks_exact(4) {
            let v = u32::from_be_bytes([pair[0], pair[1], pair[2], pair[3]]);
            let idx = (v as usize) % pool;
            if !out.contains(&idx) {
                out.push(idx);
                if out.len() == steps {
                    return out;
                }
            }
        }
    }
    out
}

/// The period number of wall-clock second `unix`.
pub fn counter(unix: u64, period: Duration) -> u64 {
    unix / period.as_secs().max(1)
}

/// One service's rotating sequence.
#[derive(Clone)]
pub struct Rule {
    pub service: Arc<str>,
    pub secret: Arc<Secret>,
    /// The pool's steps, in port order.
    pub pool: Vec<Step>,
    pub steps: usize,
    pub period: Duration,
    pub open_for: Duration,
    pub step_timeout: Duration,
    pub sequence_timeout: Duration,
    pub trap_lockout: bool,
}

impl std::fmt::Debug for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rule")
            .field("service", &self.service)
            .field("pool", &self.pool.len())
            .field("steps", &self.steps)
            .field("period", &self.period)
            .finish_non_exhaustive()
    }
}

impl PartialEq for Rule {
    fn eq(&self, other: &Self) -> bool {
        self.service == other.service
            && crate::secret::ct_eq(self.secret.expose(), other.secret.expose())
            && self.pool == other.pool
            && (self.steps, self.period, self.open_for) == (other.steps, other.period, other.open_for)
            && (self.step_timeout, self.sequence_timeout, self.trap_lockout)
                == (other.step_timeout, other.sequence_timeout, other.trap_lockout)
    }
}

impl Eq for Rule {}

impl Rule {
    /// The steps of period `counter`.
    pub fn steps_of(&self, counter: u64) -> Vec<Step> {
        sequence(self.secret.expose(), counter, self.pool.len(), self.steps)
            .into_iter()
            .map(|i| self.pool[i])
            .collect()
    }

    /// The chance that one random-order pass over the pool (every pool
    /// port once, traps locking out) opens the service in one period: two
    /// sequences are live, each `1/((T+1)...(T+S))` with T = pool - steps.
    pub fn random_pass_chance(&self) -> f64 {
        let traps = self.pool.len() - self.steps;
        2.0 * crate::config::random_pass_chance(self.steps, traps, true)
    }

    /// Ordered sequences of `steps` distinct pool ports.
    pub fn sequence_space(&self) -> f64 {
        let n = self.pool.len();
        (0..self.steps).map(|i| (n - i) as f64).product()
    }
}

/// What one knock did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Step `step` of `of` of a live sequence.
    Advanced { step: usize, of: usize },
    /// The last step: period `counter`'s sequence opened the service.
    Opened { counter: u64 },
    /// The step just taken, again; ignored.
    Repeated,
    /// A step of a live sequence out of place: the attempt starts over.
    Reset,
    /// A pool port that is no step of a live sequence.
    Trap,
    /// No room for another attempt.
    TableFull,
}

impl Outcome {
    /// The gate's result of the same meaning, for logs and metrics (one
    /// `portcullis_knocks_total` for every kind of sequence).
    pub fn as_knock_result(self, of: usize) -> crate::gate::KnockResult {
        use crate::gate::{KnockResult, ResetCause};
        match self {
            Outcome::Advanced { step, of } => KnockResult::Advanced { step, of },
            Outcome::Opened { .. } => KnockResult::Advanced { step: of, of },
            Outcome::Repeated => KnockResult::Repeated { step: 0 },
            Outcome::Reset => KnockResult::Reset(ResetCause::WrongStep),
            Outcome::Trap => KnockResult::Reset(ResetCause::Trap),
            Outcome::TableFull => KnockResult::TableFull,
        }
    }
}

#[derive(Debug, Clone)]
struct Attempt {
    taken: Vec<Step>,
    started: Instant,
    last: Instant,
}

/// Attempts in progress and spent periods of every rotating sequence.
#[derive(Debug, Default)]
pub struct Tracker {
    rules: Vec<Rule>,
    by_step: HashMap<Step, Vec<usize>>,
    attempts: HashMap<(usize, IpAddr), Attempt>,
    /// Per rule, the periods whose sequence opened (only the live two are
    /// kept).
    spent: Vec<Vec<u64>>,
    max_attempts: usize,
}

impl Tracker {
    pub fn new(rules: Vec<Rule>, max_attempts: usize) -> Self {
        let mut t = Self {
            max_attempts,
            ..Self::default()
        };
        t.reconfigure(rules);
        t
    }

    /// New rules; what a rule that stays unchanged had (attempts, spent
    /// periods) is kept.
    pub fn reconfigure(&mut self, rules: Vec<Rule>) {
        let mut spent = Vec::with_capacity(rules.len());
        let mut attempts = HashMap::new();
        for (new, rule) in rules.iter().enumerate() {
            let old = self.rules.iter().position(|r| r == rule);
            spent.push(old.map(|o| self.spent[o].clone()).unwrap_or_default());
            if let Some(o) = old {
                for ((idx, source), a) in &self.attempts {
                    if *idx == o {
                        attempts.insert((new, *source), a.clone());
                    }
                }
            }
        }
        let mut by_step: HashMap<Step, Vec<usize>> = HashMap::new();
        for (i, r) in rules.iter().enumerate() {
            for step in &r.pool {
                by_step.entry(*step).or_default().push(i);
            }
        }
        self.rules = rules;
        self.by_step = by_step;
        self.attempts = attempts;
        self.spent = spent;
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Whether `step` is a pool port of some rotating sequence.
    pub fn watches(&self, step: &Step) -> bool {
        self.by_step.contains_key(step)
    }

    /// Feeds a knock on `step` from `source` at `now` (wall-clock second
    /// `unix`): for each rule whose pool holds it, its index and outcome.
    pub fn knock(&mut self, step: Step, source: IpAddr, now: Instant, unix: u64) -> Vec<(usize, Outcome)> {
        let Some(rules) = self.by_step.get(&step).cloned() else {
            return Vec::new();
        };
        rules
            .into_iter()
            .map(|idx| (idx, self.knock_rule(idx, step, source, now, unix)))
            .collect()
    }

    fn knock_rule(&mut self, idx: usize, step: Step, source: IpAddr, now: Instant, unix: u64) -> Outcome {
        let rule = &self.rules[idx];
        let current = counter(unix, rule.period);
        self.spent[idx].retain(|c| *c + 1 >= current);
        let live: Vec<(u64, Vec<Step>)> = [Some(current), current.checked_sub(1)]
            .into_iter()
            .flatten()
            .filter(|c| !self.spent[idx].contains(c))
            .map(|c| (c, rule.steps_of(c)))
            .collect();
        let key = (idx, source);
        let fresh = |a: &Attempt| {
            now.saturating_duration_since(a.last) <= rule.step_timeout
                && now.saturating_duration_since(a.started) <= rule.sequence_timeout
        };
        let attempt = self.attempts.get(&key).filter(|a| fresh(a)).cloned();
        let mut taken = attempt.as_ref().map(|a| a.taken.clone()).unwrap_or_default();
        taken.push(step);
        if let Some((c, _)) = live
            .iter()
            .find(|(_, seq)| seq.len() == taken.len() && seq.starts_with(&taken))
        {
            let c = *c;
            self.attempts.remove(&key);
            self.spent[idx].push(c);
            return Outcome::Opened { counter: c };
        }
        if live.iter().any(|(_, seq)| seq.starts_with(&taken)) {
            let started = attempt.as_ref().map_or(now, |a| a.started);
            return self.set(key, taken, started, now);
        }
        if attempt.as_ref().and_then(|a| a.taken.last()) == Some(&step) {
            return Outcome::Repeated;
        }
        self.attempts.remove(&key);
        if live.iter().any(|(_, seq)| seq.first() == Some(&step)) {
            return self.set(key, vec![step], now, now);
        }
        if live.iter().any(|(_, seq)| seq.contains(&step)) {
            return Outcome::Reset;
        }
        Outcome::Trap
    }

    fn set(&mut self, key: (usize, IpAddr), taken: Vec<Step>, started: Instant, now: Instant) -> Outcome {
        let of = self.rules[key.0].steps;
        if !self.attempts.contains_key(&key) && self.attempts.len() >= self.max_attempts {
            // Expired attempts make room before a new one is refused.
            let rules = &self.rules;
            self.attempts.retain(|(i, _), a| {
                let r = &rules[*i];
                now.saturating_duration_since(a.last) <= r.step_timeout
                    && now.saturating_duration_since(a.started) <= r.sequence_timeout
            });
            if self.attempts.len() >= self.max_attempts {
                return Outcome::TableFull;
            }
        }
        let step = taken.len();
        self.attempts.insert(
            key,
            Attempt {
                taken,
                started,
                last: now,
            },
        );
        Outcome::Advanced { step, of }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock};
    use std::net::SocketAddr;

    const PERIOD: u64 = 30;
    const T0: u64 = 1_800_000_000;

    fn rule() -> Rule {
        let pool = (40000..40016)
            .map(|p| Step {
                proto: Proto::Udp,
                addr: SocketAddr::from(([127, 0, 0, 1], p)),
            })
            .collect();
        Rule {
            service: "db".into(),
            secret: Arc::new(Secret::from_slice(&[7; 32])),
            pool,
            steps: 4,
            period: Duration::from_secs(PERIOD),
            open_for: Duration::from_secs(30),
            step_timeout: Duration::from_secs(5),
            sequence_timeout: Duration::from_secs(15),
            trap_lockout: true,
        }
    }

    fn src(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    fn send(t: &mut Tracker, clock: &ManualClock, unix: u64, from: IpAddr, steps: &[Step]) -> Vec<Outcome> {
        steps
            .iter()
            .map(|s| {
                clock.advance(Duration::from_millis(10));
                let out = t.knock(*s, from, clock.now(), unix);
                assert_eq!(out.len(), 1);
                out[0].1
            })
            .collect()
    }

    #[test]
    fn a_sequence_is_steps_distinct_pool_ports_and_changes_with_the_period() {
        let r = rule();
        let a = r.steps_of(counter(T0, r.period));
        assert_eq!(a.len(), 4);
        for (i, s) in a.iter().enumerate() {
            assert!(r.pool.contains(s));
            assert!(!a[..i].contains(s), "{a:?} repeats a port");
        }
        assert_eq!(a, r.steps_of(counter(T0 + PERIOD - 1 - T0 % PERIOD, r.period)));
        assert_ne!(a, r.steps_of(counter(T0, r.period) + 1));
        assert_ne!(sequence(&[8; 32], 1, 16, 4), sequence(&[7; 32], 1, 16, 4));
    }

    #[test]
    fn the_current_and_previous_period_open_once_each_and_older_ones_never() {
        let r = rule();
        let c = counter(T0, r.period);
        let clock = ManualClock::new();
        let mut t = Tracker::new(vec![r.clone()], 100);
        let now_seq = r.steps_of(c);
        let got = send(&mut t, &clock, T0, src(1), &now_seq);
        assert_eq!(got.last(), Some(&Outcome::Opened { counter: c }), "{got:?}");
        // Spent: the same sequence from anyone else opens nothing.
        let again = send(&mut t, &clock, T0, src(2), &now_seq);
        assert!(!again.iter().any(|o| matches!(o, Outcome::Opened { .. })), "{again:?}");
        // The previous period's is still live, once.
        let prev = r.steps_of(c - 1);
        let got = send(&mut t, &clock, T0, src(3), &prev);
        assert_eq!(got.last(), Some(&Outcome::Opened { counter: c - 1 }), "{got:?}");
        // Two periods ago: never.
        let old = r.steps_of(c - 2);
        let got = send(&mut t, &clock, T0, src(4), &old);
        assert!(!got.iter().any(|o| matches!(o, Outcome::Opened { .. })), "{got:?}");
    }

    #[test]
    fn a_pool_port_off_every_live_sequence_is_a_trap_and_repeats_are_ignored() {
        let r = rule();
        let c = counter(T0, r.period);
        let live: Vec<Step> = r.steps_of(c).into_iter().chain(r.steps_of(c - 1)).collect();
        let trap = *r.pool.iter().find(|p| !live.contains(p)).expect("16 ports, 8 steps");
        let clock = ManualClock::new();
        let mut t = Tracker::new(vec![r.clone()], 100);
        let seq = r.steps_of(c);
        assert_eq!(
            send(&mut t, &clock, T0, src(1), &[seq[0], seq[0], trap]),
            [Outcome::Advanced { step: 1, of: 4 }, Outcome::Repeated, Outcome::Trap]
        );
    }

    #[test]
    fn a_slow_step_starts_over_and_a_full_table_refuses_new_attempts() {
        let r = rule();
        let c = counter(T0, r.period);
        let seq = r.steps_of(c);
        let clock = ManualClock::new();
        let mut t = Tracker::new(vec![r.clone()], 1);
        send(&mut t, &clock, T0, src(1), &seq[..2]);
        assert_eq!(send(&mut t, &clock, T0, src(2), &seq[..1]), [Outcome::TableFull]);
        clock.advance(Duration::from_secs(6));
        // src 1's attempt timed out: the room it held goes to src 2, and
        // src 1 starts over.
        assert_eq!(
            send(&mut t, &clock, T0, src(2), &seq[..1]),
            [Outcome::Advanced { step: 1, of: 4 }]
        );
        let late = send(&mut t, &clock, T0, src(1), &seq[2..3]);
        assert_ne!(late, [Outcome::Advanced { step: 3, of: 4 }]);
    }

    #[test]
    fn pools_and_keys_parse_with_clear_errors() {
        assert_eq!(
            parse_pool("40000-40003/udp"),
            Ok((Proto::Udp, vec![40000, 40001, 40002, 40003]))
        );
        assert_eq!(parse_pool("5-6").map(|p| p.0), Ok(Proto::Tcp));
        assert!(parse_pool("6-5/udp").is_err());
        assert!(parse_pool("0-5/udp").is_err());
        assert!(parse_pool("1-5/icmp").is_err());
        let text = render_key(&mut rand::rng());
        assert_eq!(parse_key(&text).map(|k| k.len()), Ok(KEY_LEN));
        assert!(parse_key("TOTP_KEY_BASE64: AAAA\n").is_err(), "3 bytes");
        assert!(parse_key("KEY_BASE64: AAAA\n").is_err());
    }
}
