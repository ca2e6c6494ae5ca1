//! The raw sensor (`gateway.sensor = "raw"`): sees knocks and SPA packets
//! through raw sockets instead of bound ones, so the knock, trap and SPA
//! ports stay unused: the kernel answers them as it answers any unused
//! port (UDP: ICMP port unreachable; TCP: RST) and a scanner cannot tell
//! them apart. The stock `knock` client's TCP steps are seen by their SYN,
//! so they work over any round trip.
//!
//! `AF_INET`/`AF_INET6` raw sockets, not `AF_PACKET`: the kernel hands them
//! only packets it delivers to this host (after the firewall's input
//! rules, never forwarded traffic), at the IP layer whatever the link
//! (loopback, tunnels, veth), once, already reassembled. One socket per
//! family and protocol, each with a classic BPF filter
//! ([`filter::raw_sensor`]) that passes UDP datagrams and TCP SYNs without
//! ACK to the watched ports, and (for resets) to ports outside the local
//! ephemeral range and not the proxy's own; so proxied traffic is never
//! copied to userspace. Filters on raw sockets need no CAP_NET_ADMIN.
//!
//! A datagram or SYN from a source that knocked recently, to any other
//! port, goes to the gate as a knock on an endpoint no service uses, which
//! ends that source's attempts (see `Gate`): a scan between two steps
//! starts the sequence over. Only trap ports count against the source.
//! SPA datagrams are decided exactly as the socket SPA sensor decides them
//! ([`super::spa::SpaSensor::decide`]). Packets from all sockets are put in kernel
//! receive order (`SO_TIMESTAMPNS`) before they reach the gate.
//!
//! This module owns the raw sockets and nothing else; it never sends.

mod packet;
mod socket;

use std::collections::{BTreeSet, HashMap};
use std::future::poll_fn;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::task::Poll;
use std::time::{Duration, Instant};

use nix::sys::time::TimeSpec;
use tokio_util::sync::CancellationToken;

pub use socket::{capable, OpenError};

use super::spa::{self, SpaSensor};
use super::Intake;
use crate::config::{Config, Sensor};
use crate::filter::{self, OtherPorts, RawWatch};
use crate::gate::Knock;
use crate::metrics;
use crate::step::{Proto, Step};

/// Where the kernel keeps the local ephemeral port range.
const EPHEMERAL_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";
/// Linux's default range, when the file cannot be read.
const DEFAULT_EPHEMERAL: RangeInclusive<u16> = 32768..=60999;
/// Most packets read before a batch is handed on.
const MAX_BATCH: usize = 1024;
/// Read buffer: the largest SPA packet behind the largest IPv4 header.
const BUF: usize = 4096;
/// Most sources remembered as knocking recently; past it every other-port
/// packet goes to the gate (which ignores those without an attempt).
const MAX_RECENT: usize = 65_536;

/// Which sensor `wanted` comes to in this process: true for the raw one.
/// `raw` without CAP_NET_RAW is an error naming it; `auto` then falls back
/// to the socket sensor with one warning.
pub fn resolve(wanted: Sensor) -> Result<bool, OpenError> {
    match wanted {
        Sensor::Socket => Ok(false),
        Sensor::Raw => capable().map(|()| true),
        Sensor::Auto => match capable() {
            Ok(()) => {
                tracing::info!("gateway.sensor = \"auto\": CAP_NET_RAW is held, using the raw sensor");
                Ok(true)
            }
            Err(e) => {
                tracing::warn!(
                    reason = %e,
                    "gateway.sensor = \"auto\": the raw sensor cannot be used, falling back to the socket sensor (knock and SPA ports are bound and answer unlike unused ports)"
                );
                Ok(false)
            }
        },
    }
}

/// What `check` says about `wanted` here (another host may differ).
pub fn describe(wanted: Sensor) -> String {
    match (wanted, capable()) {
        (Sensor::Socket, _) => "socket (knock and SPA ports are bound)".to_owned(),
        (Sensor::Raw, Ok(())) => "raw (CAP_NET_RAW is held here)".to_owned(),
        (Sensor::Raw, Err(e)) => format!("raw, which cannot start here: {e}"),
        (Sensor::Auto, Ok(())) => "auto: raw here (CAP_NET_RAW is held)".to_owned(),
        (Sensor::Auto, Err(_)) => "auto: socket here (CAP_NET_RAW is not held)".to_owned(),
    }
}

/// The raw sensor watches fixed ports: an SPA port of 0 (which a bound
/// socket turns into some free port) names none.
pub fn fixed_ports(config: &Config) -> anyhow::Result<()> {
    match &config.spa {
        Some(spa) if spa.listen.port() == 0 => {
            anyhow::bail!("spa.listen: the raw sensor watches a fixed port, and port 0 names none: give the SPA port")
        }
        _ => Ok(()),
    }
}

/// The local ephemeral port range, where replies to this host's own
/// connections arrive (never a reset).
pub fn ephemeral_range() -> RangeInclusive<u16> {
    let Ok(text) = std::fs::read_to_string(EPHEMERAL_RANGE) else {
        return DEFAULT_EPHEMERAL;
    };
    let mut parts = text.split_whitespace().map(str::parse::<u16>);
    match (parts.next(), parts.next()) {
        (Some(Ok(lo)), Some(Ok(hi))) if lo <= hi => lo..=hi,
        _ => DEFAULT_EPHEMERAL,
    }
}

/// What the raw sensor watches, from a config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Knock steps and trap ports, as configured.
    steps: Vec<Step>,
    /// The SPA port, as configured.
    spa: Option<SocketAddr>,
    /// Other ports, for resets (when some service has a knock rule).
    others: Option<OtherPorts>,
    /// How long a source that knocked may still have an attempt in
    /// progress: the longest sequence timeout.
    window: Duration,
}

impl Plan {
    pub fn new(config: &Config, ephemeral: RangeInclusive<u16>) -> Self {
        let mut steps = BTreeSet::new();
        let mut window = Duration::ZERO;
        for rule in config.services.iter().filter_map(|s| s.knock.as_ref()) {
            steps.extend(rule.sequence.iter().chain(&rule.trap).copied());
            window = window.max(rule.sequence_timeout);
        }
        for rule in config.services.iter().filter_map(|s| s.totp.as_ref()) {
            steps.extend(rule.pool.iter().copied());
            window = window.max(rule.sequence_timeout);
        }
        // The proxy's own UDP ports (a service's datagrams, and what it
        // sends to a local upstream) are never copied to userspace.
        let mut except = BTreeSet::new();
        for s in config.services.iter().filter(|s| s.protocol == Proto::Udp) {
            except.insert(s.listen.port());
            if let Some(port) = s.upstream.rsplit(':').next().and_then(|p| p.parse().ok()) {
                except.insert(port);
            }
        }
        let others = (!steps.is_empty()).then_some(OtherPorts { ephemeral, except });
        Self {
            steps: steps.into_iter().collect(),
            spa: config.spa.as_ref().map(|s| s.listen),
            others,
            window,
        }
    }

    /// What the filter of a `proto` socket passes.
    fn watch(&self, proto: Proto) -> RawWatch {
        let mut ports: BTreeSet<u16> = self
            .steps
            .iter()
            .filter(|s| s.proto == proto)
            .map(|s| s.addr.port())
            .collect();
        if proto == Proto::Udp {
            ports.extend(self.spa.map(|a| a.port()));
        }
        RawWatch {
            ports,
            others: self.others.clone(),
        }
    }

    /// What a packet to `dest` is.
    fn classify(&self, proto: Proto, dest: SocketAddr) -> Seen {
        if proto == Proto::Udp && self.spa.is_some_and(|spa| serves(spa, dest)) {
            return Seen::Spa;
        }
        // An address-specific step first, as the kernel prefers the more
        // specific of two bound sockets.
        let mut best = None;
        for step in self.steps.iter().filter(|s| s.proto == proto && serves(s.addr, dest)) {
            if step.addr.ip() == dest.ip() {
                return Seen::Knock(*step);
            }
            best.get_or_insert(*step);
        }
        match best {
            Some(step) => Seen::Knock(step),
            None => Seen::Other(Step { proto, addr: dest }),
        }
    }
}

/// Whether a socket bound to `bound` would receive a packet to `dest`.
fn serves(bound: SocketAddr, dest: SocketAddr) -> bool {
    if bound.port() != dest.port() {
        return false;
    }
    match bound.ip().to_canonical() {
        ip if ip == dest.ip() => true,
        IpAddr::V4(v4) => v4.is_unspecified() && dest.is_ipv4(),
        // A dual-stack wildcard: IPv6 and IPv4 alike.
        IpAddr::V6(v6) => v6.is_unspecified(),
    }
}

/// What a packet is to the sensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Knock(Step),
    Spa,
    /// Another port: ends the attempts of a source that has one.
    Other(Step),
}

/// One packet of a batch.
#[derive(Debug)]
struct Packet {
    at: TimeSpec,
    source: IpAddr,
    seen: Seen,
    /// An SPA datagram's payload.
    payload: Vec<u8>,
}

/// The raw sensor's sockets (IPv4, and IPv6 where the host has it) and
/// what it remembers across reloads: who knocked recently.
#[derive(Debug)]
pub struct RawSockets {
    sockets: Vec<socket::RawSocket>,
    recent: Recent,
}

/// Opens the raw sensor's sockets; nothing passes their filters until
/// [`watch`] says what to watch.
pub fn open() -> Result<RawSockets, OpenError> {
    Ok(RawSockets {
        sockets: socket::open_all()?,
        recent: Recent::new(Duration::ZERO),
    })
}

/// The sources that knocked within the window, so that other-port packets
/// of everyone else stop here and the gate is not asked about them.
#[derive(Debug)]
struct Recent {
    window: Duration,
    until: HashMap<IpAddr, Instant>,
    /// The table was full at the last purge: every source is treated as
    /// recent until the next one.
    overflow: bool,
    /// When a full table may next be purged (a purge walks it all).
    next_purge: Option<Instant>,
}

/// Shortest time between two purges of a full table.
const PURGE_EVERY: Duration = Duration::from_secs(1);

impl Recent {
    fn new(window: Duration) -> Self {
        Self {
            window,
            until: HashMap::new(),
            overflow: false,
            next_purge: None,
        }
    }

    /// Drops the entries that ran out, at most once per [`PURGE_EVERY`].
    fn purge(&mut self, now: Instant) {
        if self.next_purge.is_some_and(|at| now < at) {
            return;
        }
        self.until.retain(|_, until| *until > now);
        self.overflow = self.until.len() >= MAX_RECENT;
        self.next_purge = Some(crate::clock::later(now, PURGE_EVERY));
    }

    fn knocked(&mut self, source: IpAddr, now: Instant) {
        if self.until.len() >= MAX_RECENT && !self.until.contains_key(&source) {
            self.purge(now);
            if self.until.len() >= MAX_RECENT {
                self.overflow = true;
                return;
            }
        }
        self.until.insert(source, crate::clock::later(now, self.window));
    }

    fn may_have_attempt(&mut self, source: IpAddr, now: Instant) -> bool {
        if self.overflow {
            self.purge(now);
            if self.overflow {
                return true;
            }
        }
        self.until.get(&source).is_some_and(|until| *until > now)
    }
}

/// Attaches each socket's filter for `plan`, before the sensor runs (so
/// that nothing sent after `ready` is missed). The kernel swaps a filter
/// atomically: a reload that narrows or widens it loses no packet, and
/// what arrived meanwhile waits in the socket for the next task.
pub fn watch(sockets: &RawSockets, plan: &Plan) -> io::Result<()> {
    for s in &sockets.sockets {
        let program = filter::raw_sensor(s.header, s.raw_proto(), &plan.watch(s.proto))
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        socket::attach(s.fd.get_ref(), &program)?;
        tracing::debug!(header = ?s.header, protocol = s.proto.as_str(), instructions = program.len(), "raw sensor filter attached");
    }
    for step in &plan.steps {
        tracing::info!(kind = "knock", %step, sensor = "raw", "watching");
    }
    if let Some(addr) = plan.spa {
        tracing::info!(kind = "spa", %addr, sensor = "raw", "watching");
    }
    tracing::info!(
        sockets = sockets.sockets.len(),
        resets = plan.others.is_some(),
        "raw sensor watching: knock and spa ports are not bound"
    );
    Ok(())
}

/// Reads the sockets (filtered by [`watch`]) until `cancel`; knocks go to
/// `intake`, SPA datagrams to `spa` when there is an SPA port. Returns the
/// sockets, for the next config.
pub async fn run(
    mut sockets: RawSockets,
    plan: Plan,
    intake: Intake,
    spa: Option<SpaSensor>,
    cancel: CancellationToken,
) -> RawSockets {
    // Who knocked before a reload still may have an attempt in progress.
    sockets.recent.window = plan.window;
    let mut batch: Vec<Packet> = Vec::with_capacity(64);
    let mut counters = spa::Counters::default();
    let mut buf = vec![0u8; BUF];
    let mut cmsg = nix::cmsg_space!(TimeSpec, nix::libc::in6_pktinfo);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return sockets,
            _ = readable(&sockets) => {}
        }
        loop {
            let before = batch.len();
            for s in &sockets.sockets {
                while batch.len() < MAX_BATCH {
                    match s.recv(&mut buf, &mut cmsg) {
                        Ok(Some((at, p))) => {
                            let seen = plan.classify(p.proto, p.dest);
                            let payload = if seen == Seen::Spa {
                                p.payload.to_vec()
                            } else {
                                Vec::new()
                            };
                            batch.push(Packet {
                                at,
                                source: p.source,
                                seen,
                                payload,
                            });
                        }
                        Ok(None) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            tracing::debug!(error = %e, "raw sensor read failed");
                            break;
                        }
                    }
                }
            }
            if batch.len() == before || batch.len() >= MAX_BATCH {
                break;
            }
        }
        batch.sort_by_key(|p| p.at);
        for p in batch.drain(..) {
            dispatch(p, &intake, spa.as_ref(), &mut sockets.recent, &mut counters);
        }
    }
}

fn dispatch(p: Packet, intake: &Intake, spa: Option<&SpaSensor>, recent: &mut Recent, counters: &mut spa::Counters) {
    let now = intake.clock.now();
    match p.seen {
        Seen::Knock(step) => {
            recent.knocked(p.source, now);
            intake.forward(Knock { source: p.source, step });
        }
        Seen::Spa => {
            if let Some(sensor) = spa {
                sensor.decide(&p.payload, p.source, &intake.driver, counters);
            }
        }
        Seen::Other(step) => {
            if !recent.may_have_attempt(p.source, now) {
                return;
            }
            // Not through the guard: it can only end attempts, and must
            // not spend the source's knock budget.
            tracing::debug!(source = %p.source, %step, "another port touched during a knock");
            if intake.driver.knock(Knock { source: p.source, step }).is_err() {
                metrics::knock_dropped();
            }
        }
    }
}

/// Resolves when any socket is readable; its readiness is cleared first,
/// so a packet that arrives while the batch is read wakes the next pass.
async fn readable(sockets: &RawSockets) {
    poll_fn(|cx| {
        let mut ready = false;
        for s in &sockets.sockets {
            // Polling every socket registers the waker with each of them.
            if let Poll::Ready(r) = s.fd.poll_read_ready(cx) {
                if let Ok(mut guard) = r {
                    guard.clear_ready();
                }
                ready = true;
            }
        }
        if ready {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(s: &str) -> Step {
        s.parse::<crate::step::StepSpec>()
            .unwrap()
            .at(IpAddr::from([0, 0, 0, 0]))
    }

    fn plan(steps: &[&str], spa: Option<&str>) -> Plan {
        Plan {
            steps: steps.iter().map(|s| step(s)).collect(),
            spa: spa.map(|s| s.parse().unwrap()),
            others: None,
            window: Duration::from_secs(15),
        }
    }

    #[test]
    fn packets_are_knocks_spa_or_other_ports() {
        let p = plan(
            &["7000/udp", "127.0.0.1:7000/udp", "7001/tcp", "[::]:7002/udp"],
            Some("0.0.0.0:62201"),
        );
        let at = |s: &str| s.parse::<SocketAddr>().unwrap();
        let cases = [
            (Proto::Udp, "127.0.0.1:7000", Seen::Knock(step("127.0.0.1:7000/udp"))),
            (Proto::Udp, "10.0.0.1:7000", Seen::Knock(step("7000/udp"))),
            (
                Proto::Udp,
                "[::1]:7000",
                Seen::Other(Step {
                    proto: Proto::Udp,
                    addr: at("[::1]:7000"),
                }),
            ),
            (Proto::Tcp, "10.0.0.1:7001", Seen::Knock(step("7001/tcp"))),
            (
                Proto::Udp,
                "10.0.0.1:7001",
                Seen::Other(Step {
                    proto: Proto::Udp,
                    addr: at("10.0.0.1:7001"),
                }),
            ),
            (Proto::Udp, "10.0.0.1:7002", Seen::Knock(step("[::]:7002/udp"))),
            (Proto::Udp, "[::1]:7002", Seen::Knock(step("[::]:7002/udp"))),
            (Proto::Udp, "127.0.0.1:62201", Seen::Spa),
            (
                Proto::Udp,
                "[::1]:62201",
                Seen::Other(Step {
                    proto: Proto::Udp,
                    addr: at("[::1]:62201"),
                }),
            ),
            (
                Proto::Tcp,
                "127.0.0.1:62201",
                Seen::Other(Step {
                    proto: Proto::Tcp,
                    addr: at("127.0.0.1:62201"),
                }),
            ),
        ];
        for (proto, dest, want) in cases {
            assert_eq!(p.classify(proto, at(dest)), want, "{proto} {dest}");
        }
    }

    #[test]
    fn the_filters_watch_each_protocols_ports() {
        let p = plan(&["7000/udp", "7001/tcp", "7003/udp"], Some("0.0.0.0:62201"));
        assert_eq!(p.watch(Proto::Udp).ports, BTreeSet::from([7000, 7003, 62201]));
        assert_eq!(p.watch(Proto::Tcp).ports, BTreeSet::from([7001]));
    }

    #[test]
    fn only_sources_that_knocked_recently_reach_the_gate_with_other_ports() {
        let clock = crate::clock::ManualClock::new();
        use crate::clock::Clock;
        let mut r = Recent::new(Duration::from_secs(15));
        let (a, b) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]));
        r.knocked(a, clock.now());
        assert!(r.may_have_attempt(a, clock.now()));
        assert!(!r.may_have_attempt(b, clock.now()));
        clock.advance(Duration::from_secs(15));
        assert!(!r.may_have_attempt(a, clock.now()), "the window is over");
    }

    #[test]
    fn a_full_table_treats_everyone_as_recent_until_it_empties() {
        use crate::clock::Clock;
        let clock = crate::clock::ManualClock::new();
        let window = Duration::from_secs(15);
        let mut r = Recent::new(window);
        let many = |i: usize| IpAddr::from(std::net::Ipv6Addr::from(i as u128 + 1));
        for i in 0..MAX_RECENT {
            r.knocked(many(i), clock.now());
        }
        let stranger = IpAddr::from([10, 9, 9, 9]);
        assert!(!r.may_have_attempt(stranger, clock.now()));
        // One more while all are live: the table stays bounded, and
        // nobody's other-port packets stop here any more.
        r.knocked(IpAddr::from([10, 0, 0, 1]), clock.now());
        assert_eq!(r.until.len(), MAX_RECENT);
        assert!(r.may_have_attempt(stranger, clock.now()));
        // Once the window is over the next purge empties it.
        clock.advance(window + PURGE_EVERY);
        assert!(!r.may_have_attempt(stranger, clock.now()));
        assert!(r.until.is_empty());
        r.knocked(stranger, clock.now());
        assert!(r.may_have_attempt(stranger, clock.now()));
    }

    #[test]
    fn the_ephemeral_range_is_read() {
        let r = ephemeral_range();
        assert!(r.start() <= r.end());
    }

    #[tokio::test]
    async fn a_raw_socket_sees_a_datagram_to_an_unused_port_through_its_filter() {
        if capable().is_err() {
            eprintln!("skipped: no CAP_NET_RAW");
            return;
        }
        let sockets = open().unwrap();
        let unused = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = unused.local_addr().unwrap().port();
        drop(unused);
        let mut p = plan(&[], Some(&format!("0.0.0.0:{port}")));
        p.steps.push(step("[::]:9/tcp"));
        watch(&sockets, &p).unwrap();
        let sender = std::net::UdpSocket::bind("127.0.0.3:0").unwrap();
        sender.send_to(b"spa?", ("127.0.0.1", port)).unwrap();
        let v4 = sockets
            .sockets
            .iter()
            .find(|s| s.header == filter::RawHeader::Ipv4 && s.proto == Proto::Udp)
            .unwrap();
        let mut buf = vec![0u8; BUF];
        let mut cmsg = nix::cmsg_space!(TimeSpec, nix::libc::in6_pktinfo);
        let wait = std::time::Duration::from_secs(5);
        let (at, source, payload) = tokio::time::timeout(wait, async {
            loop {
                v4.fd.readable().await.unwrap().clear_ready();
                if let Ok(Some((at, seen))) = v4.recv(&mut buf, &mut cmsg) {
                    if seen.dest.port() == port {
                        break (at, seen.source, seen.payload.to_vec());
                    }
                }
            }
        })
        .await
        .expect("the datagram passes the filter");
        assert!(at.tv_sec() > 0, "kernel receive time");
        assert_eq!(source, IpAddr::from([127, 0, 0, 3]));
        assert_eq!(payload, b"spa?");
        if let Some(v6) = sockets
            .sockets
            .iter()
            .find(|s| s.header == filter::RawHeader::Transport && s.proto == Proto::Udp)
        {
            if let Ok(sender) = std::net::UdpSocket::bind("[::1]:0") {
                sender.send_to(b"six", ("::1", port)).unwrap();
                tokio::time::timeout(wait, async {
                    loop {
                        v6.fd.readable().await.unwrap().clear_ready();
                        if let Ok(Some((_, seen))) = v6.recv(&mut buf, &mut cmsg) {
                            assert_eq!(seen.source, "::1".parse::<IpAddr>().unwrap());
                            assert_eq!(seen.dest, SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)));
                            assert_eq!(seen.payload, b"six");
                            break;
                        }
                    }
                })
                .await
                .expect("the IPv6 datagram passes the filter (at its transport header)");
            }
        }
    }
}
