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
//! The forwarding path does not allocate: one receive buffer per direction
//! and thread, non-blocking sends (a full socket buffer drops the datagram,
//! as the network would).

mod kernel;

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::{Service, Unauthorized};
use crate::metrics;
use crate::proxy::Shared;

/// Largest UDP payload (65535 - 8 byte UDP header - 20 byte IPv4 header).
pub const MAX_DATAGRAM: usize = 65_507;

thread_local! {
    /// Receive buffer for upstream replies, shared by every session task
    /// that runs on this thread (a reply is sent before the next await).
    static REPLY_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0u8; MAX_DATAGRAM + 1]);
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
/// `shared.stop`); hands the socket back so a reload can keep it. Sessions
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
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    let upstream_datagrams = metrics::udp_datagrams(&service.name, metrics::Direction::Upstream);
    loop {
        let received = tokio::select! {
            _ = stop.cancelled() => {
                // Stopped with the loop, so that after a reload the next
                // keeper is the only one to attach filters to this socket.
                let _ = keeper.await;
                return socket;
            }
            r = socket.recv_from(&mut buf) => r,
        };
        let (len, client) = match received {
            Ok(r) => r,
            Err(e) => {
                // On an unconnected socket these are ICMP echoes of earlier
                // sends; nothing to do but go on.
                tracing::debug!(service = %service.name, error = %e, "udp receive failed");
                continue;
            }
        };
        let now = shared.clock.now();
        let session = match sessions.lookup(client) {
            Some(s) => s,
            None => match open(&socket, client, &service, &shared, &sessions, now).await {
                Some(s) => s,
                None => continue,
            },
        };
        session.last.store(sessions.millis(now), Ordering::Relaxed);
        match send_now(&session.upstream, &buf[..len], None) {
            Ok(_) => upstream_datagrams.increment(1),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => metrics::udp_dropped(&service.name, "buffer_full"),
            Err(e) => tracing::debug!(service = %service.name, %client, error = %e, "udp send upstream failed"),
        }
    }
}

/// Opens a session for `client` if its source may have one.
async fn open(
    socket: &Arc<UdpSocket>,
    client: SocketAddr,
    service: &Arc<Service>,
    shared: &Arc<Shared>,
    sessions: &Arc<Sessions>,
    now: Instant,
) -> Option<Arc<Session>> {
    let source = client.ip().to_canonical();
    if !shared.store.allows(&service.name, source, now) {
        if service.unauthorized != Unauthorized::Allow {
            metrics::udp_dropped(&service.name, "no_grant");
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
            metrics::udp_dropped(&service.name, "session_limit");
            tracing::debug!(service = %service.name, %client, "udp session refused: service at max_sessions");
            return None;
        }
        if t.per_source.get(&source).copied().unwrap_or(0) >= limits.max_sessions_per_source {
            metrics::udp_dropped(&service.name, "source_session_limit");
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
    shared.tracker.spawn(async move {
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
            _ = shared.stop.cancelled() => return SessionEnd::Shutdown,
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
                match relay_one(socket, client, session) {
                    Ok(true) => {
                        session.last.store(sessions.millis(shared.clock.now()), Ordering::Relaxed);
                        downstream_datagrams.increment(1);
                    }
                    Ok(false) => {}
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

/// Moves one datagram from the upstream to the client. Ok(false) when
/// there was nothing to read after all.
fn relay_one(socket: &UdpSocket, client: SocketAddr, session: &Session) -> io::Result<bool> {
    REPLY_BUF.with(|buf| {
        let mut buf = buf.borrow_mut();
        let len = match session.upstream.try_recv(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        };
        match send_now(socket, &buf[..len], Some(client)) {
            Ok(_) => Ok(true),
            // A full send buffer drops the reply, as the network would.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => {
                tracing::debug!(%client, error = %e, "udp send to client failed");
                Ok(false)
            }
        }
    })
}

/// Sends at once, straight to the socket: tokio's `try_send` reports
/// WouldBlock until the reactor has seen the socket writable, which a new
/// session's socket has not yet; a real full buffer still reports it.
fn send_now(socket: &UdpSocket, payload: &[u8], to: Option<SocketAddr>) -> io::Result<usize> {
    let sock = socket2::SockRef::from(socket);
    match to {
        Some(to) => sock.send_to(payload, &to.into()),
        None => sock.send(payload),
    }
}
