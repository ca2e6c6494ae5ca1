//! Guarded listeners: accept, ask the store whether the source holds a
//! grant, then splice to the upstream or apply the service's unauthorised
//! mode (refuse, blackhole, or allow in audit mode).
//!
//! The accept loop only takes a permit and spawns; the grant check, the
//! upstream connect and the copy run in the spawned task. How the bytes
//! move is [`relay`]'s business; the pipes it splices through come from
//! [`pipes`].

pub mod pipes;
pub mod relay;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::Clock;
use crate::config::{Gateway, Service, Unauthorized};
use crate::metrics::{self, Decision, Direction};
use crate::net;
use crate::store::GrantStore;
use pipes::Pipes;
use relay::Meter;

/// Pause after a failed `accept()` (e.g. out of file descriptors), so the
/// loop does not spin while the condition lasts.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// What every guarded listener shares.
#[derive(Debug)]
pub struct Shared {
    pub store: Arc<dyn GrantStore>,
    pub clock: Arc<dyn Clock>,
    pub gateway: Gateway,
    /// Permits for proxied connections.
    pub connections: Arc<Semaphore>,
    /// Permits for blackholed connections.
    pub blackholes: Arc<Semaphore>,
    /// Proxied connections in flight.
    pub active: AtomicUsize,
    /// Stops accept loops and ends blackholes.
    pub stop: CancellationToken,
    /// Cuts proxied connections when the shutdown grace runs out.
    pub cut: CancellationToken,
    pub tracker: TaskTracker,
    /// Pipes for splicing bulk transfers.
    pub pipes: Pipes,
}

impl Shared {
    pub fn new(store: Arc<dyn GrantStore>, clock: Arc<dyn Clock>, gateway: Gateway) -> Self {
        Self {
            connections: Arc::new(Semaphore::new(gateway.max_connections)),
            blackholes: Arc::new(Semaphore::new(gateway.max_blackholed)),
            store,
            clock,
            gateway,
            active: AtomicUsize::new(0),
            stop: CancellationToken::new(),
            cut: CancellationToken::new(),
            tracker: TaskTracker::new(),
            pipes: Pipes::for_process(),
        }
    }
}

/// Accepts guarded connections for `service` until `stop` (a child of
/// `shared.stop`, so a reload can stop one service); hands the listener
/// back so a reload can keep the socket open. Connections accepted run on
/// in `shared.tracker` whatever happens to this loop.
pub async fn serve(
    listener: TcpListener,
    service: Arc<Service>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) -> TcpListener {
    loop {
        // Waiting for a permit before accepting leaves excess connections
        // in the kernel's backlog instead of in our memory.
        let permit = tokio::select! {
            _ = stop.cancelled() => return listener,
            p = shared.connections.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return listener,
            },
        };
        let accepted = tokio::select! {
            _ = stop.cancelled() => return listener,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                let service = service.clone();
                let task_shared = shared.clone();
                shared
                    .tracker
                    .spawn(async move { handle(stream, peer, service, task_shared, permit).await });
            }
            Err(e) => {
                metrics::accept_error("guarded");
                tracing::warn!(service = %service.name, error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

async fn handle(
    stream: TcpStream,
    peer: SocketAddr,
    service: Arc<Service>,
    shared: Arc<Shared>,
    permit: OwnedSemaphorePermit,
) {
    let source = peer.ip().to_canonical();
    if shared.store.allows(&service.name, source, shared.clock.now()) {
        metrics::connection(&service.name, Decision::Allowed);
        tracing::debug!(service = %service.name, %source, "connection allowed");
        return splice(stream, source, &service, &shared, permit).await;
    }
    match service.unauthorized {
        Unauthorized::Refuse => {
            metrics::connection(&service.name, Decision::Refused);
            tracing::debug!(service = %service.name, %source, "connection refused: no grant");
            net::reset(stream);
        }
        Unauthorized::Blackhole => {
            drop(permit);
            let Ok(_hole) = shared.blackholes.clone().try_acquire_owned() else {
                metrics::connection(&service.name, Decision::Overflow);
                tracing::debug!(service = %service.name, %source, "connection refused: no grant, blackhole full");
                return net::reset(stream);
            };
            metrics::connection(&service.name, Decision::Blackholed);
            tracing::debug!(service = %service.name, %source, "connection blackholed: no grant");
            tokio::select! {
                _ = tokio::time::sleep(shared.gateway.blackhole_hold) => {}
                _ = shared.stop.cancelled() => {}
            }
            drop(stream);
        }
        Unauthorized::Allow => {
            metrics::connection(&service.name, Decision::AllowedAudit);
            tracing::info!(
                service = %service.name,
                %source,
                "audit: connection allowed that would have been denied (no grant)"
            );
            splice(stream, source, &service, &shared, permit).await;
        }
    }
}

async fn splice(client: TcpStream, source: IpAddr, service: &Service, shared: &Shared, _permit: OwnedSemaphorePermit) {
    let started = shared.clock.now();
    let connect = tokio::time::timeout(shared.gateway.connect_timeout, TcpStream::connect(&*service.upstream));
    let upstream = match connect.await {
        Ok(Ok(s)) => {
            metrics::upstream_connect_duration(&service.name, shared.clock.now().saturating_duration_since(started));
            s
        }
        Ok(Err(e)) => {
            metrics::upstream_error(&service.name);
            tracing::warn!(service = %service.name, upstream = %service.upstream, %source, error = %e, "upstream connect failed");
            return net::reset(client);
        }
        Err(_) => {
            metrics::upstream_error(&service.name);
            tracing::warn!(
                service = %service.name,
                upstream = %service.upstream,
                %source,
                timeout = ?shared.gateway.connect_timeout,
                "upstream connect timed out"
            );
            return net::reset(client);
        }
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    shared.active.fetch_add(1, Ordering::Relaxed);
    metrics::connections_active(&service.name, 1.0);
    let meter = |direction| Meter::new(metrics::proxied_bytes_counter(&service.name, direction));
    let (up, down) = (meter(Direction::Upstream), meter(Direction::Downstream));
    let result = tokio::select! {
        r = relay::relay(&client, &upstream, &shared.pipes, &up, &down) => Some(r),
        _ = shared.cut.cancelled() => None,
    };
    shared.active.fetch_sub(1, Ordering::Relaxed);
    metrics::connections_active(&service.name, -1.0);
    metrics::connection_duration(&service.name, shared.clock.now().saturating_duration_since(started));
    let (bytes_up, bytes_down) = (up.bytes(), down.bytes());
    let (spliced_up, spliced_down) = (up.spliced(), down.spliced());
    match result {
        Some(Ok(())) => tracing::debug!(
            service = %service.name,
            %source,
            bytes_up,
            bytes_down,
            spliced_up,
            spliced_down,
            "connection closed"
        ),
        // A peer hanging up mid-stream is normal life for a proxy.
        Some(Err(e)) => tracing::debug!(
            service = %service.name,
            %source,
            bytes_up,
            bytes_down,
            error = %e,
            "connection ended with an error"
        ),
        None => tracing::debug!(service = %service.name, %source, bytes_up, bytes_down, "connection cut at shutdown"),
    }
}
