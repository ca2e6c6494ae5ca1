//! Guarded UDP services: a session table keyed by client address.
//!
//! A datagram from a client with no session opens one if the client's
//! source address holds a grant (or the service is in audit mode): a
//! connected upstream socket of its own, so the upstream's replies go back
//! to exactly that client, from the service's listen address. A session
//! lives while datagrams flow either way and ends after `idle_timeout` of
//! silence, even after the grant has closed (as conntrack keeps an
//! established flow), when the upstream answers with an ICMP error, or at
//! shutdown. Datagrams from sources without a grant are dropped and
//! counted; nothing is sent back, whatever `unauthorized` says.
//!
//! Most of them never get here: `kernel` keeps a socket filter on the
//! service's socket that passes only the sources with a grant or a session,
//! so the kernel drops the rest. The check here stays the authority.
//!
//! The forwarding path does not allocate and moves datagrams in batches:
//! one `recvmmsg(2)` takes up to `sys::BATCH` (32) queued datagrams, and each
//! run of them from one client goes upstream with one `sendmmsg(2)`, equal
//! sizes as one UDP GSO message (one trip through the kernel's stack for
//! the lot); replies likewise. Sends never wait: a full socket buffer drops the
//! datagram, as the network would (counted, either way).
//!
//! The receive loop never waits on a new session: the session's own task
//! resolves the upstream (once per start, again after a failure: see
//! [`Upstream`]) and sets up its socket, while the loop holds the
//! session's first datagrams (up to `MAX_PENDING`) and goes on serving
//! every other client.

mod kernel;
mod opens;

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::config::{Service, Unauthorized};
use crate::drain::Lifecycle;
use crate::metrics;
use crate::store::GrantStore;
use crate::sys;

/// Whether sends use UDP GSO (one trip through the kernel's stack per run
/// of equal-sized datagrams). Turned off for good, process-wide, the first
/// time the kernel refuses it.
static GSO: AtomicBool = AtomicBool::new(true);

fn no_gso(e: &io::Error) {
    if GSO.swap(false, Ordering::Relaxed) {
        tracing::warn!(error = %e, "UDP GSO refused by the kernel; sending one datagram per message from now on");
    }
}

/// What every UDP service shares.
#[derive(Debug)]
pub struct Shared {
    pub store: Arc<dyn GrantStore>,
    pub clock: Arc<dyn Clock>,
    pub life: Lifecycle,
}

thread_local! {
    /// Receive batch for upstream replies, shared by every session task
    /// that runs on this thread (a batch is sent on before the next await).
    static REPLY_BATCH: RefCell<sys::RecvBatch> = RefCell::new(sys::RecvBatch::new());
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    Idle,
    UpstreamError,
    Shutdown,
}

impl SessionEnd {
    pub fn as_label(self) -> &'static str {
        match self {
            SessionEnd::Idle => "idle",
            SessionEnd::UpstreamError => "upstream_error",
            SessionEnd::Shutdown => "shutdown",
        }
    }
}

/// Datagrams a new session holds while its upstream socket is being set
/// up; past it they are dropped and counted.
const MAX_PENDING: usize = 64;

#[derive(Debug)]
struct Session {
    /// Set once by the session's task, off the receive loop, when the
    /// upstream is resolved and the socket connected.
    upstream: OnceLock<UdpSocket>,
    /// Datagrams that arrived before `upstream` was set; the task sends
    /// them on (under this lock, so none is left behind).
    pending: Mutex<Vec<Box<[u8]>>>,
    /// Milliseconds since the service's epoch at the last datagram.
    last: AtomicU64,
}

/// Where a service's upstream is, resolved off the receive loop: once per
/// start (a reload restarts the loop), and again after a failure, so a
/// name follows DNS changes without a lookup per session.
#[derive(Debug)]
pub struct Upstream {
    name: Arc<str>,
    resolved: Mutex<Option<SocketAddr>>,
    /// Tests hold each look-up until given a permit, to play a slow DNS.
    #[cfg(test)]
    lookups: Option<Arc<tokio::sync::Semaphore>>,
}

impl Upstream {
    pub fn new(name: Arc<str>) -> Self {
        let resolved = Mutex::new(name.parse().ok());
        Self {
            name,
            resolved,
            #[cfg(test)]
            lookups: None,
        }
    }

    /// The address, looked up when not known.
    async fn address(&self) -> io::Result<SocketAddr> {
        if let Some(addr) = *self.resolved.lock().expect("upstream lock") {
            return Ok(addr);
        }
        #[cfg(test)]
        if let Some(lookups) = &self.lookups {
            lookups.acquire().await.expect("never closed").forget();
        }
        let addr = tokio::net::lookup_host(&*self.name)
            .await?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "upstream name has no address"))?;
        *self.resolved.lock().expect("upstream lock") = Some(addr);
        Ok(addr)
    }

    /// Forgets a looked-up address after a failure (a literal stays).
    fn forget(&self) {
        *self.resolved.lock().expect("upstream lock") = self.name.parse().ok();
    }
}

#[derive(Debug, Default)]
struct Table {
    sessions: HashMap<SocketAddr, Arc<Session>>,
    per_source: HashMap<IpAddr, usize>,
    /// How fast each source has been opening sessions.
    opens: opens::OpenRate,
}

/// A service's session table, shared by its receive loop and its session
/// tasks, and kept across reloads so established flows survive them.
#[derive(Debug)]
pub struct Sessions {
    table: Mutex<Table>,
    epoch: Instant,
    /// Told when a source gains its first session or loses its last.
    sources_changed: watch::Sender<()>,
}

impl Sessions {
    /// An empty table; `epoch` anchors the sessions' activity clocks.
    pub fn new(epoch: Instant) -> Arc<Self> {
        Arc::new(Self {
            table: Mutex::new(Table::default()),
            epoch,
            sources_changed: watch::channel(()).0,
        })
    }

    /// The source addresses with at least one session.
    fn sources(&self) -> Vec<IpAddr> {
        let t = self.table.lock().expect("session table lock");
        t.per_source.keys().copied().collect()
    }

    /// Sees a change whenever [`Sessions::sources`] may have changed.
    fn changes(&self) -> watch::Receiver<()> {
        self.sources_changed.subscribe()
    }

    /// Sessions open now.
    pub fn len(&self) -> usize {
        self.table.lock().expect("session table lock").sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lookup(&self, client: SocketAddr) -> Option<Arc<Session>> {
        self.table
            .lock()
            .expect("session table lock")
            .sessions
            .get(&client)
            .cloned()
    }

    fn millis(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    fn remove(&self, client: SocketAddr) {
        let mut last = false;
        {
            let mut t = self.table.lock().expect("session table lock");
            if t.sessions.remove(&client).is_some() {
                let source = client.ip().to_canonical();
                if let Some(n) = t.per_source.get_mut(&source) {
                    *n -= 1;
                    if *n == 0 {
                        t.per_source.remove(&source);
                        last = true;
                    }
                }
            }
        }
        if last {
            self.sources_changed.send_replace(());
        }
    }

    fn insert(&self, client: SocketAddr, session: Arc<Session>) {
        let first = {
            let mut t = self.table.lock().expect("session table lock");
            t.sessions.insert(client, session);
            let n = t.per_source.entry(client.ip().to_canonical()).or_default();
            *n += 1;
            *n == 1
        };
        if first {
            self.sources_changed.send_replace(());
        }
    }
}

/// Serves a guarded UDP service on `socket` until `stop` (a child of
/// the lifecycle's stop); hands the socket back so a reload can keep it. Sessions
/// live in `sessions` and end on their own or at shutdown. The socket's
/// kernel filter is kept current meanwhile.
pub async fn serve(
    socket: Arc<UdpSocket>,
    sessions: Arc<Sessions>,
    service: Arc<Service>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) -> Arc<UdpSocket> {
    let keeper = tokio::spawn(kernel::keep(
        socket.clone(),
        service.clone(),
        sessions.clone(),
        shared.clone(),
        stop.clone(),
    ));
    let upstream = Arc::new(Upstream::new(service.upstream.clone()));
    receive(socket, sessions, service, shared, stop, keeper, upstream).await
}

/// The receive loop of [`serve`].
async fn receive(
    socket: Arc<UdpSocket>,
    sessions: Arc<Sessions>,
    service: Arc<Service>,
    shared: Arc<Shared>,
    stop: CancellationToken,
    keeper: tokio::task::JoinHandle<()>,
    upstream: Arc<Upstream>,
) -> Arc<UdpSocket> {
    let mut batch = sys::RecvBatch::new();
    let upstream_datagrams = metrics::udp_datagrams(&service.name, metrics::Direction::Upstream);
    let buffer_full = metrics::udp_dropped_counter(&service.name, "buffer_full");
    let pending_full = metrics::udp_dropped_counter(&service.name, "pending_full");
    loop {
        let received = tokio::select! {
            _ = stop.cancelled() => {
                // Stopped with the loop, so that after a reload the next
                // keeper is the only one to attach filters to this socket.
                let _ = keeper.await;
                return socket;
            }
            r = socket.async_io(Interest::READABLE, || batch.recv(socket.as_fd())) => r,
        };
        let count = match received {
            Ok(_) => batch.len(),
            Err(e) => {
                // On an unconnected socket these are ICMP echoes of earlier
                // sends; nothing to do but go on.
                tracing::debug!(service = %service.name, error = %e, "udp receive failed");
                continue;
            }
        };
        let now = shared.clock.now();
        // Consecutive datagrams from one client go upstream in one call.
        let mut i = 0;
        while i < count {
            let Some(client) = batch.source(i) else {
                i += 1;
                continue;
            };
            let end = (i + 1..count)
                .find(|&j| batch.source(j) != Some(client))
                .unwrap_or(count);
            let run = i..end;
            i = end;
            let session = match sessions.lookup(client) {
                Some(s) => s,
                None => {
                    let opening = Opening {
                        socket: &socket,
                        upstream: &upstream,
                        service: &service,
                        shared: &shared,
                        sessions: &sessions,
                    };
                    match opening.open(client, run.len() as u64, now) {
                        Some(s) => s,
                        None => continue,
                    }
                }
            };
            session.last.store(sessions.millis(now), Ordering::Relaxed);
            let send = |up: &UdpSocket, run: Range<usize>| {
                let (sent, dropped) = send_all(up, run, |k| batch.payload(k), None, &service.name, client);
                upstream_datagrams.increment(sent);
                buffer_full.increment(dropped);
            };
            match session.upstream.get() {
                Some(up) => send(up, run),
                None => pending_full.increment(session.hold(&batch, run, send)),
            }
        }
    }
}

impl Session {
    fn new(now_millis: u64) -> Self {
        Self {
            upstream: OnceLock::new(),
            pending: Mutex::new(Vec::new()),
            last: AtomicU64::new(now_millis),
        }
    }

    /// Keeps datagrams `run` of `batch` until the upstream socket is ready,
    /// or sends them with `send` if it became ready meanwhile. Returns how
    /// many were dropped because too many were waiting.
    fn hold(&self, batch: &sys::RecvBatch, run: Range<usize>, send: impl FnOnce(&UdpSocket, Range<usize>)) -> u64 {
        let mut pending = self.pending.lock().expect("pending lock");
        if let Some(up) = self.upstream.get() {
            drop(pending);
            send(up, run);
            return 0;
        }
        let mut dropped = 0;
        for k in run {
            if pending.len() < MAX_PENDING {
                pending.push(batch.payload(k).into());
            } else {
                dropped += 1;
            }
        }
        dropped
    }
}

/// Sends payloads `range` (each `payload(k)`) from `from` to `to`, or to
/// its connected peer, in as few calls as the kernel allows: the one send
/// routine of both directions. Returns (sent, dropped for a full buffer);
/// a datagram the kernel refused for another reason (a pending ICMP error,
/// say) is logged and neither.
fn send_all<'a>(
    from: &UdpSocket,
    range: Range<usize>,
    payload: impl Fn(usize) -> &'a [u8],
    to: Option<SocketAddr>,
    service: &str,
    client: SocketAddr,
) -> (u64, u64) {
    let (mut next, mut sent) = (range.start, 0u64);
    while next < range.end {
        let gso = GSO.load(Ordering::Relaxed);
        match sys::send_many(from.as_fd(), (next..range.end).map(&payload), to, gso) {
            Ok(n) => {
                sent += n as u64;
                next += n.max(1);
            }
            Err(e) if gso && sys::gso_unsupported(&e) => no_gso(&e),
            // A full send buffer drops the rest, as the network would.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return (sent, (range.end - next) as u64),
            Err(e) => {
                tracing::debug!(service, %client, error = %e, "udp send failed");
                next += 1;
            }
        }
    }
    (sent, 0)
}

/// What opening a session needs from the receive loop.
struct Opening<'a> {
    socket: &'a Arc<UdpSocket>,
    upstream: &'a Arc<Upstream>,
    service: &'a Arc<Service>,
    shared: &'a Arc<Shared>,
    sessions: &'a Arc<Sessions>,
}

impl Opening<'_> {
    /// Opens a session for `client` if its source may have one; otherwise
    /// its `datagrams` waiting in the batch are dropped and counted. The
    /// session's upstream is resolved and its socket set up by the
    /// session's own task: the receive loop never waits for either.
    fn open(&self, client: SocketAddr, datagrams: u64, now: Instant) -> Option<Arc<Session>> {
        let Opening {
            socket,
            upstream,
            service,
            shared,
            sessions,
        } = *self;
        let source = client.ip().to_canonical();
        if !shared.store.allows(&service.name, source, now) {
            if service.unauthorized != Unauthorized::Allow {
                metrics::udp_dropped_counter(&service.name, "no_grant").increment(datagrams);
                tracing::debug!(service = %service.name, %client, "udp datagram dropped: no grant");
                return None;
            }
            tracing::info!(
                service = %service.name,
                %source,
                "audit: udp session allowed that would have been denied (no grant)"
            );
        }
        {
            let mut t = sessions.table.lock().expect("session table lock");
            let limits = service.udp;
            if t.sessions.len() >= limits.max_sessions {
                metrics::udp_dropped_counter(&service.name, "session_limit").increment(datagrams);
                tracing::debug!(service = %service.name, %client, "udp session refused: service at max_sessions");
                return None;
            }
            if t.per_source.get(&source).copied().unwrap_or(0) >= limits.max_sessions_per_source {
                metrics::udp_dropped_counter(&service.name, "source_session_limit").increment(datagrams);
                tracing::debug!(service = %service.name, %client, "udp session refused: source at max_sessions_per_source");
                return None;
            }
            if !t
                .opens
                .allow(source, now, limits.session_open_rate, limits.max_sessions_per_source)
            {
                metrics::udp_dropped_counter(&service.name, "source_session_rate").increment(datagrams);
                tracing::debug!(service = %service.name, %client, "udp session refused: source over session_open_rate");
                return None;
            }
        }
        let session = Arc::new(Session::new(sessions.millis(now)));
        sessions.insert(client, session.clone());
        let task = (
            socket.clone(),
            upstream.clone(),
            session.clone(),
            service.clone(),
            sessions.clone(),
            shared.clone(),
        );
        shared.life.tracker().spawn(async move {
            let (socket, upstream, session, service, sessions, shared) = task;
            let end = match connect(&upstream, &session, &service, client).await {
                Ok(()) => {
                    metrics::udp_session_opened(&service.name);
                    tracing::debug!(service = %service.name, %client, "udp session opened");
                    let end = replies(&socket, client, &session, &service, &sessions, &shared).await;
                    metrics::udp_session_closed(&service.name, end.as_label());
                    Some(end)
                }
                Err(e) => {
                    upstream.forget();
                    metrics::upstream_error(&service.name);
                    tracing::warn!(service = %service.name, upstream = %service.upstream, %client, error = %e, "upstream connect failed");
                    None
                }
            };
            sessions.remove(client);
            let lost = session.pending.lock().expect("pending lock").len();
            metrics::udp_dropped_counter(&service.name, "no_upstream").increment(lost as u64);
            if let Some(end) = end {
                tracing::debug!(service = %service.name, %client, reason = end.as_label(), "udp session ended");
            }
        });
        Some(session)
    }
}

/// Resolves the upstream, connects the session's socket, and sends on
/// what arrived meanwhile.
async fn connect(upstream: &Upstream, session: &Session, service: &Service, client: SocketAddr) -> io::Result<()> {
    let target = upstream.address().await?;
    let local: SocketAddr = if target.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(target).await?;
    // What waited goes first, and the socket is published only then
    // (under the lock the receive loop takes when it finds none), so the
    // upstream sees the client's datagrams in order.
    let mut pending = session.pending.lock().expect("pending lock");
    let held = std::mem::take(&mut *pending);
    let (sent, dropped) = send_all(&socket, 0..held.len(), |k| &held[k], None, &service.name, client);
    let _ = session.upstream.set(socket);
    drop(pending);
    metrics::udp_datagrams(&service.name, metrics::Direction::Upstream).increment(sent);
    metrics::udp_dropped_counter(&service.name, "buffer_full").increment(dropped);
    Ok(())
}

/// Relays the upstream's replies to `client` until the session ends.
async fn replies(
    socket: &UdpSocket,
    client: SocketAddr,
    session: &Session,
    service: &Service,
    sessions: &Sessions,
    shared: &Shared,
) -> SessionEnd {
    let Some(upstream) = session.upstream.get() else {
        return SessionEnd::UpstreamError;
    };
    let idle = service.udp.idle_timeout;
    let downstream_datagrams = metrics::udp_datagrams(&service.name, metrics::Direction::Downstream);
    let reply_buffer_full = metrics::udp_dropped_counter(&service.name, "reply_buffer_full");
    loop {
        let last = Duration::from_millis(session.last.load(Ordering::Relaxed));
        let deadline = sessions.epoch + last + idle;
        tokio::select! {
            _ = shared.life.stop().cancelled() => return SessionEnd::Shutdown,
            _ = tokio::time::sleep_until(deadline.into()) => {
                // Traffic towards the upstream may have moved the deadline.
                let last = Duration::from_millis(session.last.load(Ordering::Relaxed));
                if shared.clock.now() >= sessions.epoch + last + idle {
                    return SessionEnd::Idle;
                }
            }
            // ERROR too: an ICMP error on a connected socket is only EPOLLERR.
            ready = upstream.ready(Interest::READABLE | Interest::ERROR) => {
                match ready {
                    Err(e) => {
                        tracing::debug!(service = %service.name, %client, error = %e, "upstream socket failed");
                        return SessionEnd::UpstreamError;
                    }
                    Ok(r) if r.is_error() => {
                        let error = upstream.take_error().ok().flatten();
                        tracing::debug!(service = %service.name, %client, error = ?error, "upstream error");
                        return SessionEnd::UpstreamError;
                    }
                    Ok(_) => {}
                }
                match relay_batch(socket, client, upstream, &service.name) {
                    Ok((0, 0)) => {}
                    Ok((sent, dropped)) => {
                        session.last.store(sessions.millis(shared.clock.now()), Ordering::Relaxed);
                        downstream_datagrams.increment(sent);
                        reply_buffer_full.increment(dropped);
                    }
                    Err(e) => {
                        // A connected socket reports the upstream's ICMP
                        // errors (port unreachable) here: the flow is over.
                        tracing::debug!(service = %service.name, %client, error = %e, "upstream error");
                        return SessionEnd::UpstreamError;
                    }
                }
            }
        }
    }
}

/// Moves what the upstream has queued, a batch at a time, to the client.
/// Returns (sent, dropped): replies the client's side had no room for are
/// dropped, as the network would, and counted.
fn relay_batch(socket: &UdpSocket, client: SocketAddr, upstream: &UdpSocket, service: &str) -> io::Result<(u64, u64)> {
    REPLY_BATCH.with(|batch| {
        let mut batch = batch.borrow_mut();
        let count = match upstream.try_io(Interest::READABLE, || batch.recv(upstream.as_fd())) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok((0, 0)),
            Err(e) => return Err(e),
        };
        Ok(send_all(
            socket,
            0..count,
            |k| batch.payload(k),
            Some(client),
            service,
            client,
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;
    use crate::gate::{Grant, Method};
    use crate::store::MemoryStore;

    async fn recv_text(socket: &UdpSocket) -> String {
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), socket.recv(&mut buf))
            .await
            .expect("a reply within 5 s")
            .unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[tokio::test]
    async fn a_new_session_waiting_on_dns_does_not_hold_up_other_clients() {
        // The upstream echoes every datagram.
        let echo = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 64];
            while let Ok((n, from)) = echo.recv_from(&mut buf).await {
                let _ = echo.send_to(&buf[..n], from).await;
            }
        });
        let raw: crate::config::raw::RawConfig = toml::from_str(&format!(
            "[service.dns]\nlisten = \"127.0.0.1:0\"\nupstream = \"{echo_addr}\"\nprotocol = \"udp\"\nknock = {{ sequence = [\"9000/udp\", \"7000/udp\", \"8000/udp\"] }}\n"
        ))
        .unwrap();
        let config = crate::config::validate(&raw).unwrap();
        let service = Arc::new(config.services[0].clone());
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let store = Arc::new(MemoryStore::new());
        store.insert(&Grant {
            service: service.name.clone(),
            source: "127.0.0.1".parse().unwrap(),
            method: Method::Knock,
            expires_at: clock.now() + Duration::from_secs(60),
        });
        let shared = Arc::new(Shared {
            store,
            clock: clock.clone(),
            life: Lifecycle::new(),
        });
        let gateway = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let gateway_addr = gateway.local_addr().unwrap();
        let sessions = Sessions::new(clock.now());
        // Every look-up of the upstream waits for a permit: a slow DNS.
        let mut upstream = Upstream::new(service.upstream.clone());
        let lookups = Arc::new(tokio::sync::Semaphore::new(0));
        upstream.lookups = Some(lookups.clone());
        *upstream.resolved.lock().unwrap() = None;
        let upstream = Arc::new(upstream);
        let stop = CancellationToken::new();
        let keeper = tokio::spawn(async {});
        let serving = tokio::spawn(receive(
            gateway,
            sessions.clone(),
            service,
            shared,
            stop.clone(),
            keeper,
            upstream.clone(),
        ));

        // b's session opens once its look-up is let through.
        let b = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        b.connect(gateway_addr).await.unwrap();
        lookups.add_permits(1);
        b.send(b"b1").await.unwrap();
        assert_eq!(recv_text(&b).await, "b1");

        // The next look-up never completes until allowed: a's session waits.
        *upstream.resolved.lock().unwrap() = None;
        let a = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        a.connect(gateway_addr).await.unwrap();
        a.send(b"a1").await.unwrap();
        a.send(b"a2").await.unwrap();
        // Meanwhile b is served as before: the loop did not wait for a.
        for text in ["b2", "b3"] {
            b.send(text.as_bytes()).await.unwrap();
            assert_eq!(recv_text(&b).await, text);
        }
        assert_eq!(sessions.len(), 2, "a's session exists, waiting for its upstream");
        // The look-up answers: what a sent was held, and goes in order.
        lookups.add_permits(1);
        assert_eq!(recv_text(&a).await, "a1");
        assert_eq!(recv_text(&a).await, "a2");
        a.send(b"a3").await.unwrap();
        assert_eq!(recv_text(&a).await, "a3");
        stop.cancel();
        serving.await.unwrap();
    }
}
