//! Keeps a guarded UDP service's kernel socket filter in step with who may
//! send to it: the sources holding a grant for the service, and the sources
//! of its open sessions (a session outlives its grant, so its datagrams
//! must keep passing).
//!
//! The filter is a first line, never the authority: the receive loop still
//! checks against the store every datagram that would open a session, so a
//! filter that lags behind a revocation lets through only what userspace
//! then refuses. A source is added at once when its grant or session
//! appears (a datagram that beats the rebuild is dropped, as one sent just
//! before the grant would be); a source that leaves is taken out after
//! [`SETTLE`], so a wave of expiries rebuilds once. When the kernel refuses
//! the filter, or the sources do not fit in one program, userspace filters
//! alone, and `/metrics` says so.

use std::collections::BTreeSet;
use std::fmt;
use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::SockRef;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use super::Sessions;
use super::Shared;
use crate::config::{Service, Unauthorized};
use crate::filter::{self, Family, Insn};
use crate::metrics::{self, FilterFallback};
use crate::store::GrantStore;

/// Shortest time between two rebuilds that add sources: a burst of grants
/// rebuilds at its start and then once per gap, not once per grant.
/// (Other rebuilds do not hold back the next growth.)
const MIN_GAP: Duration = Duration::from_millis(10);

/// How long a rebuild that only removes sources waits for more removals.
/// Meanwhile the kernel passes the leaving sources and userspace drops them.
const SETTLE: Duration = Duration::from_millis(500);

/// Sources named in a log line at most; past that, only counted.
const LISTED: usize = 16;

/// Keeps `socket`'s filter current until `stop`. Returns at once, with no
/// filter on the socket, in audit mode (which must see every datagram),
/// and for good when the kernel refuses the filter. Leaves the filter on
/// the socket when stopped: a reload hands the socket to the next keeper,
/// which replaces it.
pub(super) async fn keep(
    socket: Arc<UdpSocket>,
    service: Arc<Service>,
    sessions: Arc<Sessions>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let name = &*service.name;
    if service.unauthorized == Unauthorized::Allow {
        // A filter of the config before a reload may still be attached.
        detach(&socket);
        metrics::udp_kernel_filter(name, false);
        tracing::debug!(service = name, "udp kernel filter off: audit mode sees every datagram");
        return;
    }
    let family = match socket.local_addr() {
        Ok(addr) => Family::of(&addr),
        Err(e) => return refused(&socket, name, &e),
    };
    // Subscribed before the first look, so no change slips in between.
    let mut grants = shared.store.changes();
    let mut session_sources = sessions.changes();
    let mut pacer = Pacer::default();
    let now = shared.clock.now();
    let Some(mut attached) = attach(
        &socket,
        name,
        family,
        wanted(&service, &*shared.store, &sessions, now),
        None,
    ) else {
        return;
    };
    loop {
        let due = pacer.due();
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = grants.changed() => {
                if changed.is_err() {
                    // The store is gone, so no grant can change any more:
                    // rather than keep a filter that can no longer follow,
                    // leave everything to userspace.
                    detach(&socket);
                    metrics::udp_kernel_filter(name, false);
                    return;
                }
            }
            // The sender lives in `sessions`, which this task holds.
            _ = session_sources.changed() => {}
            _ = sleep_until(due), if due.is_some() => {}
        }
        let now = shared.clock.now();
        let wanted = wanted(&service, &*shared.store, &sessions, now);
        let change = change(&attached, &wanted);
        pacer.note(change, now);
        if pacer.ready(now) {
            match attach(&socket, name, family, wanted, Some(&attached)) {
                Some(next) => attached = next,
                None => return,
            }
            pacer.rebuilt(change, now);
        }
    }
}

async fn sleep_until(due: Option<Instant>) {
    if let Some(due) = due {
        tokio::time::sleep_until(due.into()).await;
    }
}

/// The sources the filter must pass at `now`: those with an unexpired
/// grant for the service and those with an open session.
fn wanted(service: &Service, store: &dyn GrantStore, sessions: &Sessions, now: Instant) -> BTreeSet<IpAddr> {
    let mut sources: BTreeSet<IpAddr> = store
        .snapshot()
        .into_iter()
        .filter(|g| g.service == service.name && g.expires_at > now)
        .map(|g| g.source.to_canonical())
        .collect();
    sources.extend(sessions.sources());
    sources
}

/// What the kernel holds for the socket, as far as the keeper knows.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Attached {
    /// A program that passes exactly these sources.
    Admits(BTreeSet<IpAddr>),
    /// The accept-all program: these sources did not fit.
    Overflow(BTreeSet<IpAddr>),
}

/// How the sources wanted differ from those the kernel passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    None,
    /// A source must be added: until then its datagrams are dropped.
    Grows,
    /// Sources may be taken out, or an overflowing set may fit again:
    /// no hurry, userspace refuses what the kernel passes meanwhile.
    Shrinks,
}

fn change(attached: &Attached, wanted: &BTreeSet<IpAddr>) -> Change {
    match attached {
        Attached::Admits(set) | Attached::Overflow(set) if set == wanted => Change::None,
        Attached::Admits(set) if wanted.is_subset(set) => Change::Shrinks,
        Attached::Admits(_) => Change::Grows,
        // Everything passes already.
        Attached::Overflow(_) => Change::Shrinks,
    }
}

/// When to rebuild: at once when a source must be added, but at most once
/// per [`MIN_GAP`]; [`SETTLE`] after the first change when sources only
/// leave. Time is passed in.
#[derive(Debug, Default)]
struct Pacer {
    /// The last rebuild that added sources.
    last_growth: Option<Instant>,
    due: Option<Instant>,
}

impl Pacer {
    fn note(&mut self, change: Change, now: Instant) {
        let at = match change {
            Change::None => {
                self.due = None;
                return;
            }
            Change::Grows => self.last_growth.map_or(now, |last| now.max(last + MIN_GAP)),
            Change::Shrinks => now + SETTLE,
        };
        self.due = Some(self.due.map_or(at, |due| due.min(at)));
    }

    fn due(&self) -> Option<Instant> {
        self.due
    }

    fn ready(&self, now: Instant) -> bool {
        self.due.is_some_and(|due| due <= now)
    }

    /// A rebuild done at `now` for `change`.
    fn rebuilt(&mut self, change: Change, now: Instant) {
        if change == Change::Grows {
            self.last_growth = Some(now);
        }
        self.due = None;
    }
}

/// Attaches the program that passes `wanted` (the kernel swaps programs
/// atomically). `None` when the kernel refused it: filtering is left to
/// userspace for good.
fn attach(
    socket: &UdpSocket,
    service: &str,
    family: Family,
    wanted: BTreeSet<IpAddr>,
    before: Option<&Attached>,
) -> Option<Attached> {
    let program = match filter::admit(family, &wanted) {
        Ok(program) => program,
        Err(e) => return Some(overflow(socket, service, wanted, before, &e)),
    };
    match attach_program(socket, &program) {
        Ok(()) => {}
        // The program is beyond the socket's option memory
        // (net.core.optmem_max): too many sources, as above.
        Err(e) if e.raw_os_error() == Some(nix::libc::ENOMEM) => {
            return Some(overflow(socket, service, wanted, before, &e));
        }
        Err(e) => {
            refused(socket, service, &e);
            return None;
        }
    }
    metrics::udp_kernel_filter(service, true);
    match before {
        Some(Attached::Admits(old)) => tracing::debug!(
            service,
            sources = wanted.len(),
            added = wanted.difference(old).count(),
            removed = old.difference(&wanted).count(),
            admits = %Listing(&wanted),
            instructions = program.len(),
            "udp kernel filter updated"
        ),
        _ => tracing::info!(
            service,
            sources = wanted.len(),
            admits = %Listing(&wanted),
            instructions = program.len(),
            "udp kernel filter attached"
        ),
    }
    Some(Attached::Admits(wanted))
}

/// Passes everything to userspace while `wanted` does not fit; counted and
/// logged when it starts.
fn overflow(
    socket: &UdpSocket,
    service: &str,
    wanted: BTreeSet<IpAddr>,
    before: Option<&Attached>,
    error: &dyn fmt::Display,
) -> Attached {
    if attach_program(socket, &filter::ACCEPT_ALL).is_err() {
        detach(socket);
    }
    metrics::udp_kernel_filter(service, false);
    if !matches!(before, Some(Attached::Overflow(_))) {
        metrics::udp_kernel_filter_fallback(service, FilterFallback::TooManySources);
        tracing::warn!(
            service,
            sources = wanted.len(),
            error = %error,
            "udp kernel filter overflow: too many sources for a socket filter, filtering in userspace until they fit"
        );
    }
    Attached::Overflow(wanted)
}

/// The kernel refused the filter: userspace filters alone from now on.
fn refused(socket: &UdpSocket, service: &str, error: &io::Error) {
    detach(socket);
    metrics::udp_kernel_filter(service, false);
    metrics::udp_kernel_filter_fallback(service, FilterFallback::AttachFailed);
    tracing::warn!(service, error = %error, "udp kernel filter unavailable: filtering in userspace");
}

fn attach_program(socket: &UdpSocket, program: &[Insn]) -> io::Result<()> {
    let program: Vec<_> = program.iter().map(|i| i.sock_filter()).collect();
    SockRef::from(socket).attach_filter(&program)
}

fn detach(socket: &UdpSocket) {
    // ENOENT when there is no filter: nothing to do.
    let _ = SockRef::from(socket).detach_filter();
}

/// The first few sources of a set, for a log line.
struct Listing<'a>(&'a BTreeSet<IpAddr>);

impl fmt::Display for Listing<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, source) in self.0.iter().take(LISTED).enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{source}")?;
        }
        if self.0.len() > LISTED {
            write!(f, ", … ({} in all)", self.0.len())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::MAX_INSNS;

    fn set(sources: &[&str]) -> BTreeSet<IpAddr> {
        sources.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn a_new_source_is_a_growth_and_a_leaving_one_a_shrink() {
        let attached = Attached::Admits(set(&["127.0.0.1", "::1"]));
        assert_eq!(change(&attached, &set(&["127.0.0.1", "::1"])), Change::None);
        assert_eq!(change(&attached, &set(&["127.0.0.1"])), Change::Shrinks);
        assert_eq!(change(&attached, &set(&[])), Change::Shrinks);
        assert_eq!(
            change(&attached, &set(&["127.0.0.1", "::1", "127.0.0.2"])),
            Change::Grows
        );
        // One in, one out: the new one must not wait.
        assert_eq!(change(&attached, &set(&["127.0.0.1", "127.0.0.2"])), Change::Grows);
    }

    #[test]
    fn an_overflow_is_retried_without_hurry_when_the_sources_change() {
        let attached = Attached::Overflow(set(&["127.0.0.1", "127.0.0.2"]));
        assert_eq!(change(&attached, &set(&["127.0.0.1", "127.0.0.2"])), Change::None);
        assert_eq!(change(&attached, &set(&["127.0.0.1"])), Change::Shrinks);
        assert_eq!(
            change(&attached, &set(&["127.0.0.1", "127.0.0.2", "::1"])),
            Change::Shrinks
        );
    }

    #[test]
    fn a_growth_rebuilds_at_once_then_at_most_once_per_gap() {
        let t0 = crate::clock::Clock::now(&crate::clock::ManualClock::new());
        let mut p = Pacer::default();
        p.note(Change::Grows, t0);
        assert!(p.ready(t0), "the first grant after a quiet spell waits for nothing");
        p.rebuilt(Change::Grows, t0);
        // A burst: every grant within the gap waits for its end, together.
        for ms in [1, 3, 7] {
            let now = t0 + Duration::from_millis(ms);
            p.note(Change::Grows, now);
            assert!(!p.ready(now));
            assert_eq!(p.due(), Some(t0 + MIN_GAP));
        }
        assert!(p.ready(t0 + MIN_GAP));
        p.rebuilt(Change::Grows, t0 + MIN_GAP);
        // After a quiet spell, at once again.
        let later = t0 + Duration::from_secs(1);
        p.note(Change::Grows, later);
        assert!(p.ready(later));
    }

    #[test]
    fn a_shrink_waits_to_settle_from_its_first_change() {
        let t0 = crate::clock::Clock::now(&crate::clock::ManualClock::new());
        let mut p = Pacer::default();
        p.rebuilt(Change::Grows, t0);
        let first = t0 + Duration::from_secs(5);
        p.note(Change::Shrinks, first);
        p.note(Change::Shrinks, first + SETTLE / 2);
        assert_eq!(p.due(), Some(first + SETTLE), "later removals do not push it back");
        assert!(!p.ready(first + SETTLE / 2));
        assert!(p.ready(first + SETTLE));
        // A growth right after a shrink's rebuild does not wait for a gap.
        p.rebuilt(Change::Shrinks, first + SETTLE);
        p.note(Change::Grows, first + SETTLE);
        assert!(p.ready(first + SETTLE));
    }

    #[test]
    fn a_growth_does_not_wait_behind_a_shrink_and_no_change_cancels() {
        let t0 = crate::clock::Clock::now(&crate::clock::ManualClock::new());
        let mut p = Pacer::default();
        p.rebuilt(Change::Grows, t0);
        let now = t0 + Duration::from_secs(1);
        p.note(Change::Shrinks, now);
        p.note(Change::Grows, now);
        assert!(p.ready(now));
        // A source that left and came back before the rebuild: nothing to do.
        let mut p = Pacer::default();
        p.note(Change::Shrinks, now);
        p.note(Change::None, now);
        assert_eq!(p.due(), None);
    }

    #[test]
    fn a_listing_names_the_first_sources_and_counts_the_rest() {
        assert_eq!(Listing(&set(&[])).to_string(), "");
        assert_eq!(Listing(&set(&["::1", "127.0.0.2"])).to_string(), "127.0.0.2, ::1");
        let many: BTreeSet<IpAddr> = (1..=20u8).map(|i| IpAddr::from([10, 0, 0, i])).collect();
        let text = Listing(&many).to_string();
        assert!(text.starts_with("10.0.0.1, 10.0.0.2, "), "{text}");
        assert!(text.ends_with("10.0.0.16, … (20 in all)"), "{text}");
    }

    /// Past the size of one program everything passes (the accept-all
    /// program), and once the sources fit again only they do.
    #[tokio::test]
    async fn too_many_sources_pass_everything_until_they_fit_again() {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let to = socket.local_addr().unwrap();
        let many: BTreeSet<IpAddr> = (0..5000u32)
            .map(|i| IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i)))
            .collect();
        let state = attach(&socket, "t", Family::V4, many.clone(), None).unwrap();
        assert_eq!(state, Attached::Overflow(many));
        let stranger = std::net::UdpSocket::bind("127.0.0.2:0").unwrap();
        stranger.send_to(b"1", to).unwrap();
        let mut buf = [0u8; 8];
        let (_, from) = socket.recv_from(&mut buf).await.unwrap();
        assert_eq!(from, stranger.local_addr().unwrap());

        let state = attach(&socket, "t", Family::V4, set(&["127.0.0.3"]), Some(&state)).unwrap();
        assert_eq!(state, Attached::Admits(set(&["127.0.0.3"])));
        let friend = std::net::UdpSocket::bind("127.0.0.3:0").unwrap();
        stranger.send_to(b"2", to).unwrap();
        friend.send_to(b"3", to).unwrap();
        let (n, from) = socket.recv_from(&mut buf).await.unwrap();
        assert_eq!((&buf[..n], from), (&b"3"[..], friend.local_addr().unwrap()));
        let extra = socket.try_recv_from(&mut buf);
        assert!(extra.is_err(), "the stranger got through: {extra:?}");
    }

    /// The kernel's checker takes the programs the builder makes, up to
    /// the largest, on sockets of both families. (A kernel whose
    /// net.core.optmem_max is below a large program's size answers
    /// ENOMEM, which the keeper treats as too many sources.)
    #[tokio::test]
    async fn the_kernel_takes_our_programs() {
        let mut cases: Vec<(&str, BTreeSet<IpAddr>)> = vec![
            ("127.0.0.1:0", set(&[])),
            ("127.0.0.1:0", set(&["127.0.0.1", "10.0.0.1"])),
            ("[::1]:0", set(&["::1", "127.0.0.1"])),
            ("[::1]:0", set(&["::1"])),
        ];
        let v4_max: BTreeSet<IpAddr> = (0..4078u32)
            .map(|i| IpAddr::from(std::net::Ipv4Addr::from(i)))
            .collect();
        let v6_max: BTreeSet<IpAddr> = (0..508u16)
            .map(|i| IpAddr::from(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, i)))
            .collect();
        cases.push(("127.0.0.1:0", v4_max));
        cases.push(("[::1]:0", v6_max));
        for (addr, sources) in cases {
            let socket = UdpSocket::bind(addr).await.unwrap();
            let family = Family::of(&socket.local_addr().unwrap());
            let program = filter::admit(family, &sources).unwrap();
            assert!(program.len() <= MAX_INSNS);
            match attach_program(&socket, &program) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(nix::libc::ENOMEM) && program.len() > 1000 => {}
                Err(e) => panic!("{addr} with {} sources: {e}", sources.len()),
            }
            // Replacing one program with another, and going back to none.
            attach_program(&socket, &filter::ACCEPT_ALL).unwrap();
            SockRef::from(&socket).detach_filter().unwrap();
        }
    }
}
