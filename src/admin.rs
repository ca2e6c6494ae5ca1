//! The admin endpoint: `GET /metrics` (Prometheus text), `GET /healthz`,
//! `GET /readyz`, and a small JSON API over the grants (`GET /v1/grants`,
//! `POST /v1/grants` for an operator's break-glass grant, `DELETE
//! /v1/grants/{service}/{source}`) and the lockouts (`GET /v1/lockouts`,
//! `DELETE /v1/lockouts/{source}`), over HTTP/1 with optional TLS and
//! client certificates ([`tls`]).
//!
//! # Why it runs on a thread of its own
//!
//! The data plane runs on the multi-threaded runtime, whose workers can all
//! be busy at once: copying bytes, accepting a connection flood, reading a
//! knock flood. A probe or a scrape queued behind that work answers late
//! exactly when the operator needs it, and a kubelet whose liveness probe
//! times out restarts a gateway that was only busy. So the endpoint gets
//! one dedicated OS thread running a current-thread runtime: the kernel
//! schedules it independently of the data plane's workers, one thread is
//! plenty for a few requests a second, and what it does (TLS handshakes,
//! rendering a scrape) takes no worker time from proxied connections. It
//! shares with the data plane only state that is lock-free or locked
//! briefly without awaiting: the grant store, the [`Readiness`] latch, the
//! metrics recorder, and the gate's input channel.
//!
//! # Who may change and read things
//!
//! The mutating endpoints (granting, revoking, clearing a lockout) are
//! allowed with the
//! configured bearer token (`Authorization: Bearer ...`, compared in
//! constant time), or over TLS with a client certificate verified against
//! `client_ca`. A configured token is required everywhere, loopback
//! included; only when no token is configured does a loopback-bound
//! listener trust whoever reaches it (unless `allow_loopback_mutations =
//! false`). Anything else gets 403. Reads (`/metrics`, `/v1/grants`,
//! `/v1/lockouts`) are open unless `require_token_for_reads = true`, which
//! asks them for the same credentials (401 without); the probes are always
//! open.
//!
//! Every change is audited (target `portcullis::audit`) with who made it,
//! `by`: `token`, `client-cert CN=...` (the verified certificate's subject,
//! or its fingerprint), or `loopback ADDR:PORT` (the peer of a trusted
//! loopback listener). Never the token itself.
//!
//! A listener bound to loopback answers only requests whose `Host` is
//! `localhost` (or under `.localhost`) or a loopback address: a web page
//! in a local browser could otherwise reach it through a DNS name rebound
//! to 127.0.0.1 (403).
//!
//! # Probes under load
//!
//! A connection must send its first byte within 2 s and its headers
//! within 5 s (which also ends idle keep-alive connections); one peer
//! address holds at most 16 of the 64 connections. Past those, 16 more
//! connections are
//! accepted that answer only `/healthz` and `/readyz` (503 otherwise, and
//! closed after one request). When even those are taken, a new connection
//! takes the place of the oldest one that has sent nothing yet, so idle
//! connections cannot make a liveness probe fail however many there are.
//!
//! This module does not decide anything about grants or lockouts: a
//! revocation, a manual grant or an unlock is a request handed to the gate
//! driver, which answers once it is applied.

mod api;
pub mod tls;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use socket2::{Domain, Socket, Type};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::Clock;
use crate::config::Admin;
use crate::driver::DriverHandle;
use crate::guard::SourceGuard;
use crate::metrics::{self, ListenerKind};
use crate::net;
use crate::store::GrantStore;

/// Admin connections served at once for any request.
const MAX_CONNECTIONS: usize = 64;
/// Connections one peer address may hold of [`MAX_CONNECTIONS`].
const MAX_PER_PEER: usize = 16;
/// Connections past the others that answer only the probes.
const PROBE_RESERVE: usize = 16;
const BACKLOG: i32 = 128;
/// Longest a new connection may stay silent.
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a client may take to send a request's headers, or leave a
/// keep-alive connection idle between requests.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the metrics recorder's housekeeping runs.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);
/// Largest request body read (a manual grant's JSON is far smaller).
const MAX_BODY: usize = 4096;
/// Longest a client may take to send a request's body.
const BODY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long requests in flight may finish once the endpoint stops.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Where the server is in its life, as `/readyz` reports it: ready once
/// every listener is bound and serving, not ready again once draining.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    phase: Arc<AtomicU8>,
    /// Set for good when a core task died: `/healthz` fails from then on.
    failed: Arc<std::sync::atomic::AtomicBool>,
}

/// See [`Readiness`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Starting,
    Ready,
    Draining,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Ready => "ready",
            Phase::Draining => "draining",
        }
    }
}

impl Readiness {
    /// A new latch, starting.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every listener is serving. Does nothing once draining.
    pub fn set_ready(&self) {
        let _ = self.phase.compare_exchange(
            Phase::Starting as u8,
            Phase::Ready as u8,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
    }

    /// Shutdown has begun; this phase is final.
    pub fn set_draining(&self) {
        self.phase.store(Phase::Draining as u8, Ordering::SeqCst);
    }

    /// A core task died: the process is about to exit, and `/healthz`
    /// says so meanwhile.
    pub fn set_failed(&self) {
        self.failed.store(true, Ordering::SeqCst);
    }

    /// False once [`Readiness::set_failed`] was called.
    pub fn is_healthy(&self) -> bool {
        !self.failed.load(Ordering::SeqCst)
    }

    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::SeqCst) {
            0 => Phase::Starting,
            1 => Phase::Ready,
            _ => Phase::Draining,
        }
    }
}

/// What the endpoint reads and where it sends revocations.
#[derive(Debug, Clone)]
pub struct Context {
    pub store: Arc<dyn GrantStore>,
    pub clock: Arc<dyn Clock>,
    /// The gate driver, which applies revocations, manual grants and
    /// unlocks.
    pub driver: DriverHandle,
    /// The per-source lockouts, read by `GET /v1/lockouts`.
    pub guard: Arc<SourceGuard>,
    pub readiness: Readiness,
}

/// The admin listener, bound and not yet served.
#[derive(Debug)]
pub struct Listener {
    // A std socket: the endpoint's own runtime registers it, on its thread.
    socket: std::net::TcpListener,
    config: Admin,
    tls: Option<tls::Reloading>,
}

/// Binds the admin listener of `config` and loads its TLS files. Errors
/// name the config key at fault.
pub fn bind(config: &Admin) -> anyhow::Result<Listener> {
    let tls = match &config.tls {
        Some(files) => Some(tls::Reloading::new(files.clone())?),
        None => None,
    };
    let socket =
        bind_socket(config.listen).with_context(|| format!("cannot listen on admin.listen ({})", config.listen))?;
    Ok(Listener {
        socket,
        config: config.clone(),
        tls,
    })
}

fn bind_socket(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

impl Listener {
    /// The real address (port 0 resolved).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Whether the endpoint speaks TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }
}

/// The running endpoint.
#[derive(Debug)]
pub struct Handle {
    stop: CancellationToken,
    done: oneshot::Receiver<()>,
}

impl Handle {
    /// Stops accepting, lets requests in flight finish (briefly), and
    /// waits for the thread to end.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.done.await;
    }
}

/// Starts serving `listener` on a thread of its own (see the module doc).
pub fn spawn(listener: Listener, context: Context) -> anyhow::Result<Handle> {
    let stop = CancellationToken::new();
    let (done_tx, done) = oneshot::channel();
    let thread_stop = stop.clone();
    std::thread::Builder::new()
        .name("portcullis-admin".into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => runtime.block_on(serve(listener, context, thread_stop)),
                Err(e) => tracing::error!(error = %e, "cannot start the admin endpoint's runtime"),
            }
            let _ = done_tx.send(());
        })
        .context("cannot start the admin endpoint's thread")?;
    Ok(Handle { stop, done })
}

/// What every admin connection shares.
#[derive(Debug)]
struct Shared {
    context: Context,
    auth: api::Auth,
    tls: Option<tls::Reloading>,
    stop: CancellationToken,
    admission: Admission,
}

async fn serve(listener: Listener, context: Context, stop: CancellationToken) {
    let Listener { socket, config, tls } = listener;
    let local = match socket.local_addr() {
        Ok(a) => a,
        Err(e) => return tracing::error!(error = %e, "admin listener has no address"),
    };
    let listener = match TcpListener::from_std(socket) {
        Ok(l) => l,
        Err(e) => return tracing::error!(error = %e, "cannot serve the admin listener"),
    };
    let shared = Arc::new(Shared {
        context,
        auth: api::Auth::new(&config, local),
        tls,
        stop: stop.clone(),
        admission: Admission::new(),
    });
    let tracker = TaskTracker::new();
    tracker.spawn(upkeep(stop.clone()));
    net::accept_loop(&listener, ListenerKind::Admin, &stop, |stream, peer| {
        let Some(entry) = shared.admission.enter(peer.ip()) else {
            return tracing::debug!(%peer, "admin connection closed: every place is taken");
        };
        tracker.spawn(connection(stream, peer, entry, shared.clone()));
    })
    .await;
    drop(listener);
    tracker.close();
    if tokio::time::timeout(STOP_GRACE, tracker.wait()).await.is_err() {
        tracing::debug!("admin requests still in flight at exit");
    }
}

async fn upkeep(stop: CancellationToken) {
    let mut every = tokio::time::interval(UPKEEP_EVERY);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = every.tick() => metrics::upkeep(),
        }
    }
}

/// Who gets an admin connection (see "Probes under load" in the module
/// doc).
#[derive(Debug)]
struct Admission {
    general: Arc<Semaphore>,
    reserve: Arc<Semaphore>,
    peers: PeerCounts,
    /// Connections waiting for a silent one to be evicted.
    waiting: Arc<Semaphore>,
    /// Admitted connections that have not sent a byte yet, oldest first.
    silent: Mutex<BTreeMap<u64, CancellationToken>>,
    next_id: AtomicU64,
}

/// Connections held per peer address.
type PeerCounts = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// A connection's place, given back when it ends.
#[derive(Debug)]
struct Slot {
    _permit: OwnedSemaphorePermit,
    probes_only: bool,
    peer: Option<(IpAddr, PeerCounts)>,
}

/// How a connection got in: with a place, or waiting for an evicted one's.
#[derive(Debug)]
enum Entry {
    Admitted(Slot),
    Waiting(OwnedSemaphorePermit),
}

/// Connections that may wait at once for an evicted one's place.
const MAX_WAITING: usize = 16;
/// How long such a connection waits.
const EVICTION_WAIT: Duration = Duration::from_millis(500);

impl Admission {
    fn new() -> Self {
        Self {
            general: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            reserve: Arc::new(Semaphore::new(PROBE_RESERVE)),
            peers: Arc::default(),
            waiting: Arc::new(Semaphore::new(MAX_WAITING)),
            silent: Mutex::default(),
            next_id: AtomicU64::new(0),
        }
    }

    /// A place for a connection from `peer`, or the right to wait for one,
    /// decided without waiting (in the accept loop, so a flood holds no
    /// more descriptors than the places and waiters): `None` when both are
    /// taken. When every place is taken, the oldest connection that has
    /// sent nothing yet is closed, and this one may wait for its place: a
    /// silent connection is the one kind no client needs.
    fn enter(&self, peer: IpAddr) -> Option<Entry> {
        if let Some(slot) = self.admit_now(peer) {
            return Some(Entry::Admitted(slot));
        }
        let waiting = self.waiting.clone().try_acquire_owned().ok()?;
        let oldest = self.lock_silent().pop_first();
        oldest?.1.cancel();
        Some(Entry::Waiting(waiting))
    }

    /// The place of an [`Entry`]: at once, or once an evicted connection
    /// has given one back (within [`EVICTION_WAIT`]).
    async fn admit(&self, peer: IpAddr, entry: Entry) -> Option<Slot> {
        let _waiting = match entry {
            Entry::Admitted(slot) => return Some(slot),
            Entry::Waiting(permit) => permit,
        };
        let wait = async {
            loop {
                if let Some(slot) = self.admit_now(peer) {
                    return slot;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(EVICTION_WAIT, wait).await.ok()
    }

    fn admit_now(&self, peer: IpAddr) -> Option<Slot> {
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        let held = peers.get(&peer).copied().unwrap_or(0);
        if held < MAX_PER_PEER {
            if let Ok(permit) = self.general.clone().try_acquire_owned() {
                peers.insert(peer, held + 1);
                return Some(Slot {
                    _permit: permit,
                    probes_only: false,
                    peer: Some((peer, self.peers.clone())),
                });
            }
        }
        let permit = self.reserve.clone().try_acquire_owned().ok()?;
        Some(Slot {
            _permit: permit,
            probes_only: true,
            peer: None,
        })
    }

    fn lock_silent(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, CancellationToken>> {
        self.silent.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a connection as silent until the guard is dropped; the
    /// token is cancelled if it is evicted meanwhile.
    fn silent(&self) -> (Silent<'_>, CancellationToken) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let token = CancellationToken::new();
        self.lock_silent().insert(id, token.clone());
        (Silent { admission: self, id }, token)
    }
}

/// A connection on the silent list (see [`Admission::silent`]).
struct Silent<'a> {
    admission: &'a Admission,
    id: u64,
}

impl Drop for Silent<'_> {
    fn drop(&mut self) {
        self.admission.lock_silent().remove(&self.id);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some((peer, peers)) = &self.peer {
            let mut peers = peers.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(n) = peers.get_mut(peer) {
                *n -= 1;
                if *n == 0 {
                    peers.remove(peer);
                }
            }
        }
    }
}

/// One admin connection: the TLS handshake (if any) happens here, in the
/// connection's task, never in the accept loop.
async fn connection(stream: TcpStream, peer: SocketAddr, entry: Entry, shared: Arc<Shared>) {
    let Some(slot) = shared.admission.admit(peer.ip(), entry).await else {
        return tracing::debug!(%peer, "admin connection closed: every place is taken");
    };
    let _ = stream.set_nodelay(true);
    {
        let (_silent, evicted) = shared.admission.silent();
        let mut first = [0u8; 1];
        tokio::select! {
            r = tokio::time::timeout(FIRST_BYTE_TIMEOUT, stream.peek(&mut first)) => match r {
                Ok(Ok(n)) if n > 0 => {}
                Ok(_) => return,
                Err(_) => return tracing::debug!(%peer, "admin connection closed: nothing sent"),
            },
            _ = evicted.cancelled() => return tracing::debug!(%peer, "admin connection closed: silent, and its place was needed"),
        }
    }
    let probes_only = slot.probes_only;
    let Some(tls) = &shared.tls else {
        let conn = api::Conn {
            peer,
            client_verified: false,
            client: None,
            probes_only,
        };
        return http(stream, conn, shared.clone()).await;
    };
    let acceptor = TlsAcceptor::from(tls.current());
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(s)) => s,
        // A scanner or a client with the wrong CA is not our error.
        Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "admin tls handshake failed"),
        Err(_) => return tracing::debug!(%peer, "admin tls handshake timed out"),
    };
    // The verifier rejects a certificate it cannot verify during the
    // handshake, so a certificate that is present here was verified.
    let client = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|leaf| Arc::<str>::from(tls::client_identity(leaf)));
    let conn = api::Conn {
        peer,
        client_verified: client.is_some(),
        client,
        probes_only,
    };
    http(stream, conn, shared.clone()).await
}

async fn http<S>(stream: S, conn: api::Conn, shared: Arc<Shared>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let stop = shared.stop.clone();
    let (peer, probes_only) = (conn.peer, conn.probes_only);
    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let shared = shared.clone();
        let conn = conn.clone();
        async move {
            let (parts, body) = req.into_parts();
            let response = match read_body(body).await {
                Ok(body) => {
                    let req = hyper::Request::from_parts(parts, body);
                    api::handle(&req, &shared.context, &shared.auth, &conn).await
                }
                Err(response) => response,
            };
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(!probes_only);
    let served = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(served);
    let result = tokio::select! {
        r = served.as_mut() => r,
        _ = stop.cancelled() => {
            served.as_mut().graceful_shutdown();
            served.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "admin connection ended with an error");
    }
}

/// A request's body, at most [`MAX_BODY`] bytes within [`BODY_TIMEOUT`];
/// else the response that says why not.
async fn read_body(
    body: hyper::body::Incoming,
) -> Result<hyper::body::Bytes, hyper::Response<http_body_util::Full<hyper::body::Bytes>>> {
    use http_body_util::BodyExt as _;
    let limited = http_body_util::Limited::new(body, MAX_BODY);
    match tokio::time::timeout(BODY_TIMEOUT, limited.collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(api::text(
            hyper::StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is over {MAX_BODY} bytes\n"),
        )),
        Ok(Err(_)) => Err(api::text(
            hyper::StatusCode::BAD_REQUEST,
            "the body could not be read\n",
        )),
        Err(_) => Err(api::text(
            hyper::StatusCode::REQUEST_TIMEOUT,
            "the body was not sent in time\n",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_descriptor_budget_counts_every_admin_connection() {
        let most = MAX_CONNECTIONS + PROBE_RESERVE + MAX_WAITING;
        assert!(most as u64 <= crate::config::budget::ADMIN);
    }

    #[test]
    fn readiness_goes_ready_then_draining_and_never_back() {
        let r = Readiness::new();
        assert_eq!(r.phase(), Phase::Starting);
        r.set_ready();
        assert_eq!(r.clone().phase(), Phase::Ready);
        r.set_draining();
        r.set_ready();
        assert_eq!(r.phase(), Phase::Draining);
    }
}
