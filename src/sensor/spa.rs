//! The SPA sensor: reads the SPA port, has each datagram decided by the
//! [`SpaDesk`], and hands accepted requests to the gate driver as
//! authorizations. Nothing is ever sent back, whatever the packet.
//!
//! # Authenticated first
//!
//! Every datagram is verified before anything about its source is
//! consulted, and no lockout applies to SPA: source addresses are
//! spoofable, so a forged packet "from" a real user must cost that user
//! nothing. The codecs' own cheap checks (size, framing, key id) come
//! before any MAC. A refused packet is counted, and logged under a global
//! rate; the per-source guard is not consulted at all.
//!
//! An accepted packet first reserves room for its grants in the driver's
//! queue (room knocks cannot take), then has its replay digest written to
//! the replay log (fsync'd), then its grants are queued in that room: it
//! cannot be lost in between, and the sensor never waits on the driver.
//!
//! The write waits on the disk, so it runs in `block_in_place`: the other
//! tasks of this worker thread (guarded connections) move to another
//! worker meanwhile. Only authenticated, fresh packets get that far, so
//! a flood of forgeries or replays costs no disk write at all.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::sync::Arc;

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::driver::DriverHandle;
use crate::gate::Method;
use crate::metrics;
use crate::spa::desk::{unix_secs, Accepted, Refusal, SpaDesk};
use crate::spa::{self, Format, Reject};
use crate::store::replay::ReplayLog;

/// Receive buffer asked for on the SPA socket: about 200 ms of a
/// 20,000 packets/s flood, so a valid packet arriving in one is queued
/// rather than dropped while the sensor catches up.
const RECEIVE_BUFFER: usize = 4 << 20;

/// Most datagrams read in one pass before the task looks at cancellation.
const MAX_BATCH: usize = 256;

/// Everything the SPA sensor task holds.
#[derive(Debug)]
pub struct SpaSensor {
    pub desk: SpaDesk,
    /// Every accepted packet's digest; one log shared by every SPA sensor.
    pub replay: Arc<ReplayLog>,
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
    enlarge_receive_buffer(&socket);
    let mut buf = vec![0u8; spa::MAX_PACKET_LEN + 1];
    let mut counters = Counters::default();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return socket,
            r = socket.readable() => if let Err(e) = r {
                tracing::debug!(error = %e, "spa socket not readable");
                continue;
            },
        }
        for _ in 0..MAX_BATCH {
            let (len, from) = match socket.try_recv_from(&mut buf) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::debug!(error = %e, "spa receive failed");
                    continue;
                }
            };
            sensor.decide(&buf[..len], from.ip().to_canonical(), &driver, &mut counters);
        }
    }
}

impl SpaSensor {
    /// Decides one SPA datagram from `source` and hands an accepted
    /// request's grants to `driver`: the socket sensor and the raw sensor
    /// alike come here.
    pub fn decide(&self, packet: &[u8], source: IpAddr, driver: &DriverHandle, counters: &mut Counters) {
        let now_unix = unix_secs(&*self.clock);
        let refusal = match self.desk.verify(packet, source, now_unix) {
            Ok(accepted) => match self.grant(accepted, source, now_unix, driver, counters) {
                Ok(()) => return,
                Err(r) => r,
            },
            Err(r) => r,
        };
        let skew = match refusal {
            Refusal::Packet(Reject::Stale { skew_secs, .. }) => Some(skew_secs),
            _ => None,
        };
        self.refused(spa::detect(packet), refusal, source, skew, counters);
    }

    /// Reserves room for the grants, records the digest, queues the grants.
    fn grant(
        &self,
        accepted: Accepted,
        source: IpAddr,
        now_unix: u64,
        driver: &DriverHandle,
        counters: &mut Counters,
    ) -> Result<(), Refusal> {
        let Ok(mut room) = driver.reserve_grants(accepted.grants.len()) else {
            return Err(Refusal::Busy);
        };
        off_reactor(|| self.desk.remember(&accepted, now_unix, &self.replay))?;
        counters.count(accepted.format.as_label(), "accepted");
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
            let queued = room.authorize(service, accepted.grantee, method, duration);
            debug_assert!(queued, "room was reserved for every grant");
        }
        Ok(())
    }

    fn refused(
        &self,
        format: Option<Format>,
        refusal: Refusal,
        source: IpAddr,
        skew: Option<i64>,
        counters: &mut Counters,
    ) {
        counters.count(format.map_or("unknown", Format::as_label), refusal.as_label());
        if self.log_limit.check().is_err() {
            return;
        }
        if refusal == Refusal::Busy {
            return tracing::warn!(%source, "gate busy: spa packet not taken (it may be sent again)");
        }
        tracing::warn!(
            %source,
            reason = refusal.as_label(),
            format = format.map_or("unknown", Format::as_label),
            skew_secs = skew,
            detail = refusal.detail(),
            "spa packet rejected"
        );
    }
}

/// The `portcullis_spa_packets_total` series by (format, result) label,
/// looked up once each: a flood counts every packet.
#[derive(Debug, Default)]
pub struct Counters(HashMap<(&'static str, &'static str), ::metrics::Counter>);

impl Counters {
    fn count(&mut self, format: &'static str, result: &'static str) {
        self.0
            .entry((format, result))
            .or_insert_with(|| metrics::spa_packet_counter(format, result))
            .increment(1);
    }
}

/// Runs `f`, which waits on the disk, without holding up the tasks queued
/// on this worker thread: on a multi-thread runtime they are handed to
/// another worker meanwhile. Elsewhere (a current-thread runtime, no
/// runtime) it just runs.
fn off_reactor<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Asks for [`RECEIVE_BUFFER`]: forced past `net.core.rmem_max` where the
/// process may (CAP_NET_ADMIN), else as much as the kernel allows.
fn enlarge_receive_buffer(socket: &UdpSocket) {
    use nix::sys::socket::{getsockopt, setsockopt, sockopt};
    if getsockopt(socket, sockopt::RcvBuf).is_ok_and(|size| size >= RECEIVE_BUFFER) {
        return;
    }
    if setsockopt(socket, sockopt::RcvBufForce, &RECEIVE_BUFFER).is_err() {
        let _ = setsockopt(socket, sockopt::RcvBuf, &RECEIVE_BUFFER);
    }
}
