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
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::config::{Gateway, Service, Unauthorized};
use crate::drain::Lifecycle;
use crate::metrics::{Decision, ListenerKind, ServiceMetrics};
use crate::net;
use crate::store::GrantStore;
use pipes::Pipes;
use relay::Meter;

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
    pub life: Lifecycle,
    /// Pipes for splicing bulk transfers.
    pub pipes: Pipes,
}

impl Shared {
    pub fn new(store: Arc<dyn GrantStore>, clock: Arc<dyn Clock>, gateway: Gateway, life: Lifecycle) -> Self {
        Self {
            connections: Arc::new(Semaphore::new(gateway.max_connections)),
            blackholes: Arc::new(Semaphore::new(gateway.max_blackholed)),
            store,
            clock,
            gateway,
            life,
            pipes: Pipes::for_process(),
        }
    }
}

/// Accepts guarded connections for `service` until `stop` (a child of the
/// lifecycle's stop, so a reload can stop one service); hands the listener
/// back so a reload can keep the socket open. Connections accepted run on
/// in the lifecycle's tracker whatever happens to this loop.
pub async fn serve(
    listener: TcpListener,
    service: Arc<Service>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) -> TcpListener {
    let meters = Arc::new(ServiceMetrics::new(&service.name));
    // Waiting for a permit before accepting leaves excess connections in
    // the kernel's backlog instead of in our memory.
    net::accept_loop(
        &listener,
        ListenerKind::Guarded,
        Some(&shared.connections),
        &stop,
        |stream, peer, permit| {
            let Some(permit) = permit else { return };
            let task = (service.clone(), shared.clone(), meters.clone());
            shared.life.tracker().spawn(async move {
                let (service, shared, meters) = task;
                handle(stream, peer, &service, &shared, &meters, permit).await
            });
        },
    )
    .await;
    listener
}

async fn handle(
    stream: TcpStream,
    peer: SocketAddr,
    service: &Service,
    shared: &Shared,
    meters: &ServiceMetrics,
    permit: OwnedSemaphorePermit,
) {
    let source = peer.ip().to_canonical();
    if shared.store.allows(&service.name, source, shared.clock.now()) {
        meters.connection(Decision::Allowed);
        tracing::debug!(service = %service.name, %source, "connection allowed");
        return splice(stream, source, service, shared, meters, permit).await;
    }
    match service.unauthorized {
        Unauthorized::Refuse => {
            meters.connection(Decision::Refused);
            tracing::debug!(service = %service.name, %source, "connection refused: no grant");
            net::reset(stream);
        }
        Unauthorized::Blackhole => {
            drop(permit);
            let Ok(_hole) = shared.blackholes.clone().try_acquire_owned() else {
                meters.connection(Decision::Overflow);
                tracing::debug!(service = %service.name, %source, "connection refused: no grant, blackhole full");
                return net::reset(stream);
            };
            meters.connection(Decision::Blackholed);
            tracing::debug!(service = %service.name, %source, "connection blackholed: no grant");
            tokio::select! {
                _ = tokio::time::sleep(shared.gateway.blackhole_hold) => {}
                _ = shared.life.stop().cancelled() => {}
            }
            drop(stream);
        }
        Unauthorized::Allow => {
            meters.connection(Decision::AllowedAudit);
            tracing::info!(
                service = %service.name,
                %source,
                "audit: connection allowed that would have been denied (no grant)"
            );
            splice(stream, source, service, shared, meters, permit).await;
        }
    }
}

async fn splice(
    client: TcpStream,
    source: IpAddr,
    service: &Service,
    shared: &Shared,
    meters: &ServiceMetrics,
    _permit: OwnedSemaphorePermit,
) {
    let started = shared.clock.now();
    let connect = tokio::time::timeout(shared.gateway.connect_timeout, TcpStream::connect(&*service.upstream));
    let upstream = match connect.await {
        Ok(Ok(s)) => {
            let took = shared.clock.now().saturating_duration_since(started);
            meters.upstream_connect_duration.record(took.as_secs_f64());
            s
        }
        Ok(Err(e)) => {
            meters.upstream_errors.increment(1);
            tracing::warn!(service = %service.name, upstream = %service.upstream, %source, error = %e, "upstream connect failed");
            return net::reset(client);
        }
        Err(_) => {
            meters.upstream_errors.increment(1);
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
    // Linux hands the listener's TCP_NODELAY (net::bind_tcp) to the client
    // socket; elsewhere it is set here.
    #[cfg(not(target_os = "linux"))]
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let in_flight = shared.life.in_flight();
    meters.active.increment(1.0);
    let up = Meter::new(meters.bytes_upstream.clone());
    let down = Meter::new(meters.bytes_downstream.clone());
    let result = tokio::select! {
        r = relay::relay(&client, &upstream, &shared.pipes, &up, &down) => Some(r),
        _ = shared.life.cut().cancelled() => None,
    };
    drop(in_flight);
    meters.active.decrement(1.0);
    let lasted = shared.clock.now().saturating_duration_since(started);
    meters.connection_duration.record(lasted.as_secs_f64());
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
