//! Guarded listeners: accept, ask the store whether the source holds a
//! grant, then splice to the upstream or apply the service's unauthorised
//! mode (refuse, blackhole, or allow in audit mode).
//!
//! The accept loop decides at once (a local lookup and non-waiting
//! permits) and spawns what it keeps; the upstream connect and the copy
//! run in the spawned task. A granted connection takes a permit of its
//! service's cap and one of the gateway's, after the accept (an idle loop
//! holds none); past either cap it is reset. A
//! blackholed connection is held with a small receive buffer and closed
//! as soon as its peer closes, so a flood of connect-and-close holds no
//! descriptors for the hold time. How the bytes
//! move is [`relay`]'s business; the pipes it splices through come from
//! [`pipes`].
//!
//! A connection from a peer in `accept_proxy_protocol` (a load balancer)
//! is the exception to deciding in the loop: its source is in the PROXY
//! header ([`header`]), which takes a read, so it is spawned at once under
//! a permit of a small cap of its own ([`MAX_AWAITING_HEADER`]), given
//! [`HEADER_TIMEOUT`] to send it, and then decided like any other on the
//! header's source. The static lists (`allow_always`, `deny_always`) are
//! part of the decision.
//!
//! A granted connection also takes a place among its source's
//! ([`sources`], `max_connections_per_source`), and when it ends it
//! writes its [`access`] line.

pub mod access;
pub mod dark;
pub mod header;
pub mod pipes;
pub mod relay;
pub mod sources;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use socket2::SockRef;
use tokio::io::{AsyncWriteExt as _, Interest};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::config::{Gateway, Service, TcpConnections, Unauthorized, KEEPALIVE_PROBES};
use crate::door::Door;
use crate::drain::Lifecycle;
use crate::metrics::{Decision, Ended, ListenerKind, ServiceMetrics};
use crate::net;
use crate::store::GrantStore;
use access::Access;
use pipes::Pipes;
use relay::Meter;
use sources::{SourceConnections, SourceGuard};

/// What every guarded listener shares.
#[derive(Debug)]
pub struct Shared {
    pub store: Arc<dyn GrantStore>,
    pub clock: Arc<dyn Clock>,
    pub gateway: Gateway,
    /// Permits for proxied connections, over every service.
    pub connections: Arc<Semaphore>,
    /// Each service's own permits, by name, with the cap they were made
    /// for: kept across reloads that keep the cap.
    services: Mutex<HashMap<Arc<str>, ServicePermits>>,
    /// Permits for blackholed connections.
    pub blackholes: Arc<Semaphore>,
    /// Proxied connections of each source, by service: kept across
    /// reloads like the permits.
    pub sources: SourceConnections,
    /// Permits for connections whose PROXY header is still being read.
    headers: Arc<Semaphore>,
    pub life: Lifecycle,
    /// Pipes for splicing bulk transfers.
    pub pipes: Pipes,
}

impl Shared {
    /// `ipv6_prefix` is `limits.ipv6_prefix`: how much of an IPv6 address
    /// is one source for `max_connections_per_source`.
    pub fn new(
        store: Arc<dyn GrantStore>,
        clock: Arc<dyn Clock>,
        gateway: Gateway,
        life: Lifecycle,
        ipv6_prefix: u8,
    ) -> Self {
        Self {
            connections: Arc::new(Semaphore::new(gateway.max_connections)),
            blackholes: Arc::new(Semaphore::new(gateway.max_blackholed)),
            headers: Arc::new(Semaphore::new(MAX_AWAITING_HEADER)),
            services: Mutex::default(),
            sources: SourceConnections::new(ipv6_prefix),
            store,
            clock,
            gateway,
            life,
            pipes: Pipes::for_process(),
        }
    }

    /// The permits of `service`'s own cap: the same ones as before a
    /// reload unless the cap changed.
    fn service_permits(&self, service: &Service) -> Arc<Semaphore> {
        let mut services = self.services.lock().expect("the permit map's lock is never poisoned");
        let entry = services.entry(service.name.clone()).or_insert_with(|| {
            (
                service.max_connections,
                Arc::new(Semaphore::new(service.max_connections)),
            )
        });
        if entry.0 != service.max_connections {
            *entry = (
                service.max_connections,
                Arc::new(Semaphore::new(service.max_connections)),
            );
        }
        entry.1.clone()
    }

    /// A place among `source`'s connections to `service` (under its
    /// `max_connections_per_source`), a permit of `permits` (the
    /// service's own) and one of the gateway; else the decision that
    /// refuses the connection.
    fn permits(&self, service: &Service, permits: &Arc<Semaphore>, source: IpAddr) -> Result<Permits, Decision> {
        let per_source = match service.tcp.max_connections_per_source {
            Some(cap) => Some(
                self.sources
                    .try_take(&service.name, source, cap)
                    .ok_or(Decision::SourceLimit)?,
            ),
            None => None,
        };
        let own = permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| Decision::ConnectionLimit)?;
        let global = self
            .connections
            .clone()
            .try_acquire_owned()
            .map_err(|_| Decision::ConnectionLimit)?;
        Ok(Permits {
            _service: own,
            _gateway: global,
            _source: per_source,
        })
    }
}

/// Most connections, over every service, that may be waiting for their
/// PROXY header at once; past it new ones from balancers are reset. Each
/// holds a descriptor for at most [`HEADER_TIMEOUT`], so a flood of silent
/// connections from a balancer's address costs this many descriptors and
/// no more (counted in the descriptor budget).
pub const MAX_AWAITING_HEADER: usize = 256;

/// How long a peer in `accept_proxy_protocol` has to send its header: a
/// balancer sends it with its first segment, so this only bounds the
/// silent and the slow.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Bytes asked for per read of a PROXY header: a v1 header and a v2 one
/// with the usual TLVs fit in one.
const HEADER_READ: usize = 1024;

/// A service's cap and the permits made for it.
type ServicePermits = (usize, Arc<Semaphore>);

/// A proxied connection's place under its service's cap and the gateway's.
#[derive(Debug)]
struct Permits {
    _service: OwnedSemaphorePermit,
    _gateway: OwnedSemaphorePermit,
    /// With `max_connections_per_source`.
    _source: Option<SourceGuard>,
}

/// Accepts guarded connections for `service` until `stop` (a child of the
/// lifecycle's stop, so a reload can stop one service); hands the listener
/// back (if it still has it) so a reload can keep the socket open. Connections accepted run on
/// in the lifecycle's tracker whatever happens to this loop. With a `door`
/// (`closed` mode) it accepts only while the door is open.
pub async fn serve(
    listener: std::net::TcpListener,
    service: Arc<Service>,
    shared: Arc<Shared>,
    stop: CancellationToken,
    door: Option<Arc<Door>>,
) -> Option<std::net::TcpListener> {
    let meters = Arc::new(ServiceMetrics::new(&service.name));
    let permits = shared.service_permits(&service);
    // A socket that does not listen reports a hang-up, and tokio keeps a
    // hang-up for the life of a registration: accepting through one made
    // while it did not listen would spin. So the socket is registered only
    // while it listens: for the whole run (the mode listens from the
    // start), or afresh for each spell a closed service's door is open.
    let Some(door) = door else {
        let listening = match TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(service = %service.name, error = %e, "cannot accept: the next config binds the port anew");
                return None;
            }
        };
        accept_all(&listening, &service, &shared, &meters, &permits, &stop).await;
        return listening.into_std().ok();
    };
    let closed = listener;
    let mut open = door.watch();
    // The door is looked at first on every poll (`biased`): a registration
    // that saw the socket stop listening reports it readable for good, so
    // it must never be polled again once its spell has ended (the door
    // says so before the socket stops listening).
    loop {
        let number = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            changed = open.wait_for(|s| s.open) => match changed {
                Ok(spell) => spell.number,
                Err(_) => break,
            },
        };
        // This spell ends when the door closes, or when it has closed and
        // opened again since (both may arrive as one change).
        let ended = |s: &crate::door::Spell| !s.open || s.number != number;
        match closed.try_clone().and_then(TcpListener::from_std) {
            Ok(listening) => {
                tokio::select! {
                    biased;
                    changed = open.wait_for(ended) => if changed.is_err() { break },
                    _ = accept_all(&listening, &service, &shared, &meters, &permits, &stop) => break,
                }
            }
            Err(e) => {
                tracing::error!(service = %service.name, error = %e, "closed service: cannot accept");
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => break,
                    changed = open.wait_for(ended) => if changed.is_err() { break },
                }
            }
        }
    }
    Some(closed)
}

/// Accepts until `stop`. Each connection is decided in the loop (the grant
/// check is a local map lookup, the caps are `try_acquire`s): refused ones
/// are closed there and then, and the others spawned with their permits,
/// so a flood never holds more descriptors than the caps, however far it
/// outpaces the tasks. The upstream connect and the copy run in the task.
/// A connection that must first send a PROXY header is spawned under a
/// permit of [`MAX_AWAITING_HEADER`] and decided in its task once read.
async fn accept_all(
    listener: &TcpListener,
    service: &Arc<Service>,
    shared: &Arc<Shared>,
    meters: &Arc<ServiceMetrics>,
    permits: &Arc<Semaphore>,
    stop: &CancellationToken,
) {
    net::accept_loop(listener, ListenerKind::Guarded, stop, |stream, peer| {
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        if service.sources.expects_header(peer.ip()) {
            let Ok(waiting) = shared.headers.clone().try_acquire_owned() else {
                meters.connection(Decision::ProxyHeaderFull);
                tracing::debug!(service = %service.name, %peer, "connection reset: too many PROXY headers awaited");
                net::reset(stream);
                return;
            };
            let task = (service.clone(), shared.clone(), meters.clone(), permits.clone());
            shared.life.tracker().spawn(async move {
                let (service, shared, meters, permits) = task;
                let origin = match read_header(&stream, peer, &shared).await {
                    Ok(origin) => origin,
                    Err(why) => {
                        meters.connection(Decision::ProxyHeaderInvalid);
                        tracing::debug!(service = %service.name, %peer, reason = why, "connection reset: no valid PROXY header");
                        return net::reset(stream);
                    }
                };
                drop(waiting);
                if let Some(kept) = decide(stream, origin, &service, &shared, &meters, &permits) {
                    run(kept, &service, &shared, &meters).await;
                }
            });
            return;
        }
        let Some(kept) = decide(stream, Origin::direct(peer), service, shared, meters, permits) else {
            return;
        };
        let task = (service.clone(), shared.clone(), meters.clone());
        shared.life.tracker().spawn(async move {
            let (service, shared, meters) = task;
            run(kept, &service, &shared, &meters).await
        });
    })
    .await;
}

/// Runs what a connection kept after its decision, to its end.
async fn run(kept: Kept, service: &Service, shared: &Shared, meters: &ServiceMetrics) {
    match kept {
        Kept::Splice(stream, origin, decision, permits) => {
            splice(stream, origin, decision, service, shared, meters, permits).await
        }
        Kept::Blackhole(stream, source, _hole) => {
            if hold(&stream, shared).await {
                tracing::debug!(service = %service.name, %source, "blackholed connection closed by its peer");
            }
        }
    }
}

/// Where a connection comes from, once any PROXY header is read.
#[derive(Debug)]
struct Origin {
    /// The real client: the header's source, else the peer. Its address
    /// is the source the decision, the lists and the logs use.
    client: SocketAddr,
    /// The client's first bytes, read along with the header: owed to the
    /// upstream before anything else.
    early: Vec<u8>,
}

impl Origin {
    /// A connection that is its peer's own (no header expected).
    fn direct(peer: SocketAddr) -> Self {
        Self {
            client: peer,
            early: Vec::new(),
        }
    }

    fn source(&self) -> IpAddr {
        self.client.ip()
    }
}

/// Reads the PROXY header a connection from `peer` must open with, within
/// [`HEADER_TIMEOUT`]; the error says why there is none. A header that
/// names no client (a balancer's `LOCAL` health check) leaves the
/// connection the peer's own.
async fn read_header(stream: &TcpStream, peer: SocketAddr, shared: &Shared) -> Result<Origin, &'static str> {
    let read = async {
        let mut bytes = Vec::with_capacity(HEADER_READ);
        let mut chunk = [0u8; HEADER_READ];
        loop {
            stream.readable().await.map_err(|_| "read failed")?;
            let n = match stream.try_read(&mut chunk) {
                Ok(0) => return Err("closed before a whole header"),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(_) => return Err("read failed"),
            };
            bytes.extend_from_slice(&chunk[..n]);
            match header::parse(&bytes) {
                header::Parsed::Complete { source, len } => {
                    let client = source.map_or(peer, |s| SocketAddr::new(s.ip().to_canonical(), s.port()));
                    bytes.drain(..len);
                    return Ok(Origin { client, early: bytes });
                }
                header::Parsed::Invalid(why) => return Err(why),
                header::Parsed::Incomplete if bytes.len() >= header::MAX_LEN => return Err("header too long"),
                header::Parsed::Incomplete => {}
            }
        }
    };
    let origin = tokio::select! {
        r = tokio::time::timeout(HEADER_TIMEOUT, read) => r.map_err(|_| "timed out")??,
        _ = shared.life.stop().cancelled() => return Err("shutdown"),
    };
    if origin.client != peer {
        tracing::debug!(%peer, source = %origin.client, "PROXY header read");
    }
    Ok(origin)
}

/// A connection that outlives its decision, with the permits it holds.
enum Kept {
    /// With the client and how it got in.
    Splice(TcpStream, Origin, Decision, Permits),
    Blackhole(TcpStream, IpAddr, OwnedSemaphorePermit),
}

/// Decides what a connection from `origin` gets, without waiting: `None`
/// when it was refused (and closed), else what it keeps. `deny_always`
/// comes first, then a grant, then `allow_always`, then the mode.
fn decide(
    stream: TcpStream,
    origin: Origin,
    service: &Service,
    shared: &Shared,
    meters: &ServiceMetrics,
    permits: &Arc<Semaphore>,
) -> Option<Kept> {
    let source = origin.source();
    if service.sources.always_denied(source) {
        meters.connection(Decision::DeniedAlways);
        tracing::debug!(service = %service.name, %source, "connection refused: deny_always");
        net::reset(stream);
        return None;
    }
    let allowed = shared.store.allows(&service.name, source, shared.clock.now());
    let always = !allowed && service.sources.always_allowed(source);
    if allowed || always || service.unauthorized == Unauthorized::Allow {
        let permits = match shared.permits(service, permits, source) {
            Ok(p) => p,
            Err(refused) => {
                meters.connection(refused);
                let cap = match refused {
                    Decision::SourceLimit => "max_connections_per_source",
                    _ => "max_connections",
                };
                tracing::debug!(service = %service.name, %source, "connection refused: at {cap}");
                net::reset(stream);
                return None;
            }
        };
        let decision = if allowed {
            tracing::debug!(service = %service.name, %source, "connection allowed");
            Decision::Allowed
        } else if always {
            tracing::debug!(service = %service.name, %source, "connection allowed: allow_always");
            Decision::AllowedAlways
        } else {
            tracing::info!(
                service = %service.name,
                %source,
                "audit: connection allowed that would have been denied (no grant)"
            );
            Decision::AllowedAudit
        };
        meters.connection(decision);
        return Some(Kept::Splice(stream, origin, decision, permits));
    }
    match service.unauthorized {
        // Listening at all means a grant of the service is active (closed)
        // or the kernel filter let a granted source through (dark) that
        // has just lost its grant: refused either way (allow never gets
        // here: it passes every connection above).
        Unauthorized::Closed | Unauthorized::Dark | Unauthorized::Refuse | Unauthorized::Allow => {
            meters.connection(Decision::Refused);
            tracing::debug!(service = %service.name, %source, "connection refused: no grant");
            net::reset(stream);
            None
        }
        Unauthorized::Blackhole => {
            let Ok(hole) = shared.blackholes.clone().try_acquire_owned() else {
                meters.connection(Decision::Overflow);
                tracing::debug!(service = %service.name, %source, "connection refused: no grant, blackhole full");
                net::reset(stream);
                return None;
            };
            meters.connection(Decision::Blackholed);
            tracing::debug!(service = %service.name, %source, "connection blackholed: no grant");
            Some(Kept::Blackhole(stream, source, hole))
        }
    }
}

/// Receive buffer asked for on a blackholed connection (the kernel doubles
/// it and keeps a floor of a couple of KiB): what a sender can park in our
/// memory before its window shuts.
const BLACKHOLE_RCVBUF: usize = 1024;

/// How often what a blackholed peer sends is read and thrown away: slowly,
/// so its window stays shut as a tarpit's does, while a close queued
/// behind the bytes is still seen.
const BLACKHOLE_DRAIN_EVERY: Duration = Duration::from_secs(1);

/// Holds a blackholed connection silently until `blackhole_hold` runs out,
/// shutdown, or its peer closes or resets it; true in the last case.
async fn hold(stream: &TcpStream, shared: &Shared) -> bool {
    // Best effort: a larger buffer only lets a sender park more bytes.
    let _ = SockRef::from(stream).set_recv_buffer_size(BLACKHOLE_RCVBUF);
    let deadline = tokio::time::sleep(shared.gateway.blackhole_hold);
    tokio::pin!(deadline);
    let mut buf = [0u8; 512];
    loop {
        tokio::select! {
            _ = &mut deadline => return false,
            _ = shared.life.stop().cancelled() => return false,
            ready = stream.ready(Interest::READABLE) => match ready {
                Ok(r) if r.is_read_closed() || r.is_error() => return true,
                Ok(_) => {}
                Err(_) => return true,
            },
        }
        match stream.try_read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(_) => return true,
        }
        tokio::select! {
            _ = &mut deadline => return false,
            _ = shared.life.stop().cancelled() => return false,
            _ = tokio::time::sleep(BLACKHOLE_DRAIN_EVERY) => {}
        }
    }
}

/// Connects to the upstream and relays until the connection ends, the
/// service's `idle_timeout` passes without a byte, or shutdown cuts it;
/// then writes the access line.
async fn splice(
    client: TcpStream,
    origin: Origin,
    decision: Decision,
    service: &Service,
    shared: &Shared,
    meters: &ServiceMetrics,
    _permits: Permits,
) {
    let source = origin.source();
    let started = shared.clock.now();
    // The client's bytes that came with its PROXY header go upstream
    // before the relay starts, outside its meters.
    let early = origin.early.len() as u64;
    let access = |end: Ended, error: Option<&dyn std::fmt::Display>, bytes: (u64, u64)| {
        meters.ended(end);
        Access {
            service: &service.name,
            upstream: &service.upstream,
            client: origin.client,
            decision,
            lasted: shared.clock.now().saturating_duration_since(started),
            bytes_up: bytes.0,
            bytes_down: bytes.1,
            end,
            error,
        }
        .log();
    };
    let connect = tokio::time::timeout(shared.gateway.connect_timeout, TcpStream::connect(&*service.upstream));
    let mut upstream = match connect.await {
        Ok(Ok(s)) => {
            let took = shared.clock.now().saturating_duration_since(started);
            meters.upstream_connect_duration.record(took.as_secs_f64());
            s
        }
        Ok(Err(e)) => {
            meters.upstream_errors.increment(1);
            tracing::warn!(service = %service.name, upstream = %service.upstream, %source, error = %e, "upstream connect failed");
            access(Ended::UpstreamConnectFailed, Some(&e), (0, 0));
            return net::reset(client);
        }
        Err(_) => {
            meters.upstream_errors.increment(1);
            tracing::warn!(
                service = %service.name,
                upstream = %service.upstream,
                %source,
                timeout_s = shared.gateway.connect_timeout.as_secs_f64(),
                "upstream connect timed out"
            );
            let error = format!(
                "timed out after {}",
                humantime::format_duration(shared.gateway.connect_timeout)
            );
            access(Ended::UpstreamConnectFailed, Some(&error), (0, 0));
            return net::reset(client);
        }
    };
    if let Err(e) = preamble(&mut upstream, &client, &origin, service, meters).await {
        tracing::debug!(service = %service.name, %source, error = %e, "upstream closed before the first bytes");
        access(Ended::Error, Some(&e), (0, 0));
        return net::reset(client);
    }
    // Linux hands the listener's TCP_NODELAY (net::bind_tcp) to the client
    // socket; elsewhere it is set here.
    #[cfg(not(target_os = "linux"))]
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    // The client socket has its keepalive from the listener
    // ([`keepalive_on_listener`]).
    if let Some(idle) = service.tcp.keepalive {
        keepalive(&SockRef::from(&upstream), idle);
    }
    let in_flight = shared.life.in_flight();
    meters.active.increment(1.0);
    let up = Meter::new(meters.bytes_upstream.clone());
    let down = Meter::new(meters.bytes_downstream.clone());
    let result = tokio::select! {
        r = relay::relay(&client, &upstream, &shared.pipes, &up, &down) => Some(r),
        _ = relay::idle(service.tcp.idle_timeout, &up, &down) => None,
        _ = shared.life.cut().cancelled() => None,
    };
    drop(in_flight);
    meters.active.decrement(1.0);
    let lasted = shared.clock.now().saturating_duration_since(started);
    meters.connection_duration.record(lasted.as_secs_f64());
    let (bytes_up, bytes_down) = (up.bytes(), down.bytes());
    let (spliced_up, spliced_down) = (up.spliced(), down.spliced());
    let bytes = (bytes_up + early, bytes_down);
    match result {
        Some(Ok(())) => {
            tracing::debug!(
                service = %service.name,
                %source,
                bytes_up,
                bytes_down,
                spliced_up,
                spliced_down,
                "connection closed"
            );
            access(Ended::Closed, None, bytes);
        }
        // A peer hanging up mid-stream is normal life for a proxy.
        Some(Err(e)) => {
            tracing::debug!(
                service = %service.name,
                %source,
                bytes_up,
                bytes_down,
                error = %e,
                "connection ended with an error"
            );
            access(Ended::Error, Some(&e), bytes);
        }
        None if shared.life.cut().is_cancelled() => {
            tracing::debug!(service = %service.name, %source, bytes_up, bytes_down, "connection cut at shutdown");
            access(Ended::Shutdown, None, bytes);
        }
        None => access(Ended::IdleTimeout, None, bytes),
    }
}

/// TCP keepalive on a socket of a proxied connection: probes after `idle`
/// of silence, every sixth of it, and the connection fails after
/// [`KEEPALIVE_PROBES`] unanswered ones, so a peer that vanished (behind
/// NAT, without a FIN or a reset) ends the connection about twice `idle`
/// after its last packet. Best effort: a socket that refuses still works.
fn keepalive(socket: &SockRef<'_>, idle: Duration) {
    let probes = socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval(TcpConnections::keepalive_interval(idle))
        .with_retries(KEEPALIVE_PROBES);
    if let Err(e) = socket.set_tcp_keepalive(&probes) {
        tracing::debug!(error = %e, "cannot set TCP keepalive");
    }
}

/// Sets `service`'s keepalive on its listener, or turns it off there (a
/// reload hands over the socket with the last config's): Linux gives every
/// accepted socket the listener's `SO_KEEPALIVE` and its idle, interval
/// and count, so the client side of a connection costs no system call for
/// it. A listener does not probe anything itself. Set before the service's
/// accept loop starts, so the reload that sets it is done when it says so
/// (a connection already in the backlog keeps what it was given).
pub fn keepalive_on_listener(listener: &std::net::TcpListener, service: &Service) {
    let socket = SockRef::from(listener);
    match service.tcp.keepalive {
        Some(idle) => keepalive(&socket, idle),
        None => {
            if let Err(e) = socket.set_keepalive(false) {
                tracing::debug!(service = %service.name, error = %e, "cannot turn TCP keepalive off");
            }
        }
    }
}

/// Sends the upstream what it is owed before the relay starts: the PROXY
/// header naming the client (`send_proxy_protocol`), then the client's
/// bytes that came with its own header, in one write.
async fn preamble(
    upstream: &mut TcpStream,
    client: &TcpStream,
    origin: &Origin,
    service: &Service,
    meters: &ServiceMetrics,
) -> io::Result<()> {
    let mut first = match service.sources.send_proxy_protocol {
        Some(version) => header::encode(version, origin.client, client.local_addr()?),
        None => Vec::new(),
    };
    if first.is_empty() && origin.early.is_empty() {
        return Ok(());
    }
    first.extend_from_slice(&origin.early);
    upstream.write_all(&first).await?;
    meters.bytes_upstream.increment(origin.early.len() as u64);
    Ok(())
}
