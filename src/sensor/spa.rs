//! The SPA sensor: reads the SPA port, has each datagram decided by the
//! [`SpaDesk`], and hands accepted requests to the gate driver as
//! authorizations. Nothing is ever sent back, whatever the packet.

use std::net::IpAddr;
use std::sync::Arc;

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::driver::DriverHandle;
use crate::gate::Method;
use crate::guard::{SourceGuard, StrikeKind};
use crate::metrics;
use crate::spa::desk::{unix_secs, Refusal, SpaDesk};
use crate::spa::{self, Format, Reject};
use crate::store::GrantStore;

/// Everything the SPA sensor task holds.
#[derive(Debug)]
pub struct SpaSensor {
    pub desk: SpaDesk,
    pub guard: Arc<SourceGuard>,
    pub store: Arc<dyn GrantStore>,
    pub clock: Arc<dyn Clock>,
    /// Limits how many rejections are logged per second; the rest are
    /// only counted.
    pub log_limit: governor::DefaultDirectRateLimiter,
}

/// Reads the SPA socket until `cancel`.
pub async fn run(
    socket: Arc<UdpSocket>,
    sensor: SpaSensor,
    driver: DriverHandle,
    cancel: CancellationToken,
) -> Arc<UdpSocket> {
    let mut buf = vec![0u8; spa::MAX_PACKET_LEN + 1];
    loop {
        let received = tokio::select! {
            _ = cancel.cancelled() => return socket,
            r = socket.recv_from(&mut buf) => r,
        };
        let (len, from) = match received {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "spa receive failed");
                continue;
            }
        };
        decide(&sensor, &driver, &buf[..len], from.ip().to_canonical());
    }
}

/// Decides one SPA datagram from `source` (the guard, then the
/// [`SpaDesk`]) and hands an accepted request's grants to `driver`. The
/// socket sensor and the raw sensor alike come here.
pub fn decide(sensor: &SpaSensor, driver: &DriverHandle, packet: &[u8], source: IpAddr) {
    let now = sensor.clock.now();
    if let Err(r) = sensor.guard.admit(source, now) {
        metrics::source_refused("spa", r.as_label());
        refused(sensor, None, Refusal::Guard(r), source, None);
        return;
    }
    let now_unix = unix_secs(&*sensor.clock);
    match sensor.desk.verify(packet, source, now_unix, now, &*sensor.store) {
        Ok(accepted) => {
            metrics::spa_packet(accepted.format.as_label(), "accepted");
            let services: Vec<&str> = accepted.grants.iter().map(|(s, _)| &**s).collect();
            tracing::info!(
                user = %accepted.user,
                %source,
                grantee = %accepted.grantee,
                format = accepted.format.as_label(),
                services = ?services,
                "spa accepted"
            );
            for (service, duration) in accepted.grants {
                let method = Method::Spa {
                    user: accepted.user.clone(),
                };
                if driver.authorize(service, accepted.grantee, method, duration).is_err() {
                    tracing::warn!(%source, "gate busy: spa grant dropped");
                }
            }
        }
        Err(refusal) => {
            sensor.guard.strike_and_report(source, now, StrikeKind::Spa);
            let skew = match refusal {
                Refusal::Packet(Reject::Stale { skew_secs, .. }) => Some(skew_secs),
                _ => None,
            };
            refused(sensor, spa::detect(packet), refusal, source, skew);
        }
    }
}

fn refused(sensor: &SpaSensor, format: Option<Format>, refusal: Refusal, source: IpAddr, skew: Option<i64>) {
    metrics::spa_packet(format.map_or("unknown", Format::as_label), refusal.as_label());
    if sensor.log_limit.check().is_err() {
        return;
    }
    match refusal {
        Refusal::Guard(_) => tracing::debug!(%source, reason = refusal.as_label(), "spa packet ignored"),
        _ => tracing::warn!(
            %source,
            reason = refusal.as_label(),
            format = format.map_or("unknown", Format::as_label),
            skew_secs = skew,
            detail = refusal.detail(),
            "spa packet rejected"
        ),
    }
}
