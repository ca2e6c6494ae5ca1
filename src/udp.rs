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
//! Most of them never get here: [`kernel`] keeps a socket filter on the
//! service's socket that passes only the sources with a grant or a session,
//! so the kernel drops the rest. The check here stays the authority.
//!
//! The forwarding path does not allocate and moves datagrams in batches:
//! one `recvmmsg(2)` takes up to [`sys::BATCH`] queued datagrams, and each
//! run of them from one client goes upstream with one `sendmmsg(2)`, equal
//! sizes as one UDP GSO message (one trip through the kernel's stack for
//! the lot); replies likewise. Sends never wait: a full socket buffer drops the
//! datagram, as the network would.

mod kernel;

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
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

#[derive(Debug)]
struct Session {
    upstream: UdpSocket,
    /// Milliseconds since the service's epoch at the last datagram.
    last: AtomicU64,
}

#[derive(Debug, Default)]
struct Table {
    sessions: HashMap<SocketAddr, Arc<Session>>,
    per_source: HashMap<IpAddr, usize>,
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
    let mut batch = sys::RecvBatch::new();
    let upstream_datagrams = metrics::udp_datagrams(&service.name, metrics::Direction::Upstream);
    let buffer_full = metrics::udp_dropped_counter(&service.name, "buffer_full");
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
                None => match open(&socket, client, run.len() as u64, &service, &shared, &sessions, now).await {
                    Some(s) => s,
                    None => continue,
                },
            };
            session.last.store(sessions.millis(now), Ordering::Relaxed);
            let (sent, dropped) = forward(&session.upstream, &batch, run, &service.name, client);
            upstream_datagrams.increment(sent);
            buffer_full.increment(dropped);
        }
    }
}

/// Sends datagrams `run` of `batch` to the session's upstream, in as few
/// calls as the kernel allows. Returns (sent, dropped for a full buffer);
/// a datagram the kernel refused for another reason (a pending ICMP error,
/// say) is logged and neither.
fn forward(
    upstream: &UdpSocket,
    batch: &sys::RecvBatch,
    run: Range<usize>,
    service: &str,
    client: SocketAddr,
) -> (u64, u64) {
    let (mut next, mut sent) = (run.start, 0u64);
    while next < run.end {
        let gso = GSO.load(Ordering::Relaxed);
        match sys::send_many(upstream.as_fd(), (next..run.end).map(|k| batch.payload(k)), None, gso) {
            Ok(n) => {
                sent += n as u64;
                next += n.max(1);
            }
            Err(e) if gso && sys::gso_unsupported(&e) => no_gso(&e),
            // A full send buffer drops the rest, as the network would.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return (sent, (run.end - next) as u64),
            Err(e) => {
                tracing::debug!(service, %client, error = %e, "udp send upstream failed");
                next += 1;
            }
        }
    }
    (sent, 0)
}

/// Opens a session for `client` if its source may have one; otherwise its
/// `datagrams` waiting in the batch are dropped and counted.
async fn open(
    socket: &Arc<UdpSocket>,
    client: SocketAddr,
    datagrams: u64,
    service: &Arc<Service>,
    shared: &Arc<Shared>,
    sessions: &Arc<Sessions>,
    now: Instant,
) -> Option<Arc<Session>> {
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
        let t = sessions.table.lock().expect("session table lock");
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
    }
    let upstream = match connect_upstream(&service.upstream).await {
        Ok(u) => u,
        Err(e) => {
            metrics::upstream_error(&service.name);
            tracing::warn!(service = %service.name, upstream = %service.upstream, %client, error = %e, "upstream connect failed");
            return None;
        }
    };
    let session = Arc::new(Session {
        upstream,
        last: AtomicU64::new(sessions.millis(now)),
    });
    sessions.insert(client, session.clone());
    metrics::udp_session_opened(&service.name);
    tracing::debug!(service = %service.name, %client, "udp session opened");
    let task = (
        socket.clone(),
        session.clone(),
        service.clone(),
        sessions.clone(),
        shared.clone(),
    );
    shared.life.tracker().spawn(async move {
        let (socket, session, service, sessions, shared) = task;
        let end = replies(&socket, client, &session, &service, &sessions, &shared).await;
        sessions.remove(client);
        metrics::udp_session_closed(&service.name, end.as_label());
        tracing::debug!(service = %service.name, %client, reason = end.as_label(), "udp session ended");
    });
    Some(session)
}

async fn connect_upstream(upstream: &str) -> io::Result<UdpSocket> {
    let target = match upstream.parse::<SocketAddr>() {
        Ok(a) => a,
        Err(_) => tokio::net::lookup_host(upstream)
            .await?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "upstream name has no address"))?,
    };
    let local: SocketAddr = if target.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(target).await?;
    Ok(socket)
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
    let idle = service.udp.idle_timeout;
    let downstream_datagrams = metrics::udp_datagrams(&service.name, metrics::Direction::Downstream);
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
            ready = session.upstream.ready(Interest::READABLE | Interest::ERROR) => {
                match ready {
                    Err(e) => {
                        tracing::debug!(service = %service.name, %client, error = %e, "upstream socket failed");
                        return SessionEnd::UpstreamError;
                    }
                    Ok(r) if r.is_error() => {
                        let error = session.upstream.take_error().ok().flatten();
                        tracing::debug!(service = %service.name, %client, error = ?error, "upstream error");
                        return SessionEnd::UpstreamError;
                    }
                    Ok(_) => {}
                }
                match relay_batch(socket, client, session) {
                    Ok(0) => {}
                    Ok(n) => {
                        session.last.store(sessions.millis(shared.clock.now()), Ordering::Relaxed);
                        downstream_datagrams.increment(n);
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
/// Returns how many datagrams went; replies the client's side had no room
/// for are dropped, as the network would.
fn relay_batch(socket: &UdpSocket, client: SocketAddr, session: &Session) -> io::Result<u64> {
    REPLY_BATCH.with(|batch| {
        let mut batch = batch.borrow_mut();
        let count = match session
            .upstream
            .try_io(Interest::READABLE, || batch.recv(session.upstream.as_fd()))
        {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
            Err(e) => return Err(e),
        };
        let mut next = 0;
        let mut sent = 0;
        while next < count {
            let gso = GSO.load(Ordering::Relaxed);
            match sys::send_many(
                socket.as_fd(),
                (next..count).map(|k| batch.payload(k)),
                Some(client),
                gso,
            ) {
                Ok(n) => {
                    sent += n as u64;
                    next += n.max(1);
                }
                Err(e) if gso && sys::gso_unsupported(&e) => no_gso(&e),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::debug!(%client, error = %e, "udp send to client failed");
                    next += 1;
                }
            }
        }
        Ok(sent)
    })
}
