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
//! queue (room knocks cannot take), then goes with that room to the
//! [`Recorder`], which writes its replay digest to disk (fsync'd) and only
//! then queues its grants: it cannot be lost in between, and the sensor
//! waits on neither the driver nor the disk. Only authenticated, fresh
//! packets get that far, so a flood of forgeries costs no disk write.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::sync::Arc;

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use super::recorder::{Pending, Recorder};
use crate::clock::Clock;
use crate::driver::DriverHandle;
use crate::metrics;
use crate::spa::desk::{unix_secs, Accepted, Refusal, SpaDesk};
use crate::spa::{self, Format, Reject};

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
    /// Writes accepted packets' digests, then grants them; one shared by
    /// every SPA sensor.
    pub recorder: Recorder,
    pub clock: Arc<dyn Clock>,
    pub refusals: RefusalLog,
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
            Ok(accepted) => match self.grant(accepted, source, now_unix, driver) {
                Ok(()) => return,
                Err(r) => r,
            },
            Err(r) => r,
        };
        let skew = match refusal {
            Refusal::Packet(Reject::Stale { skew_secs, .. }) => Some(skew_secs),
            _ => None,
        };
        self.refusals
            .refused(spa::detect(packet), refusal, source, skew, counters);
    }

    /// Reserves room for the grants and hands the packet to the recorder,
    /// which records the digest and then queues the grants.
    fn grant(&self, accepted: Accepted, source: IpAddr, now_unix: u64, driver: &DriverHandle) -> Result<(), Refusal> {
        let Ok(room) = driver.reserve_grants(accepted.grants.len()) else {
            return Err(Refusal::Busy);
        };
        self.recorder.submit(Pending {
            accepted,
            source,
            now_unix,
            keep: self.desk.keep(),
            room,
        })
    }
}

/// Rejected SPA packets logged per second at most; the rest are counted.
const LOG_RATE: std::num::NonZeroU32 = std::num::NonZeroU32::new(20).expect("20 is not zero");

/// At most one summary of junk datagrams per this long.
pub const JUNK_REPORT_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// How refused packets are counted and logged, under a rate limit.
///
/// Junk (datagrams of no SPA format, malformed or oversized ones) is what
/// any scanner or stray sender puts on a UDP port: it is counted, logged
/// at debug under the same rate limit, and summarised in one info line per [`JUNK_REPORT_EVERY`] at
/// most, never a warning each.
#[derive(Debug)]
pub struct RefusalLog {
    /// Limits how many rejections are logged per second; the rest are
    /// only counted.
    limit: governor::DefaultDirectRateLimiter,
    /// One junk summary per [`JUNK_REPORT_EVERY`].
    junk_report: governor::DefaultDirectRateLimiter,
    /// Junk datagrams since the last summary.
    junk: std::sync::atomic::AtomicU64,
}

impl Default for RefusalLog {
    fn default() -> Self {
        Self::new()
    }
}

impl RefusalLog {
    pub fn new() -> Self {
        let every = governor::Quota::with_period(JUNK_REPORT_EVERY).expect("the report period is not zero");
        Self {
            limit: governor::RateLimiter::direct(governor::Quota::per_second(LOG_RATE)),
            junk_report: governor::RateLimiter::direct(every),
            junk: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub(super) fn refused(
        &self,
        format: Option<Format>,
        refusal: Refusal,
        source: IpAddr,
        skew: Option<i64>,
        counters: &mut Counters,
    ) {
        counters.count(format.map_or("unknown", Format::as_label), refusal.as_label());
        if is_junk(format, refusal) {
            return self.junk(source, refusal);
        }
        if self.limit.check().is_err() {
            return;
        }
        if refusal == Refusal::Busy {
            return tracing::warn!(%source, "gate busy: spa packet not taken (it may be sent again)");
        }
        tracing::warn!(
            %source,
            reason = refusal.as_label(),
            format = format.map_or("unknown", Format::as_label),
            skew_s = skew,
            detail = refusal.detail(),
            "spa packet rejected"
        );
    }

    fn junk(&self, source: IpAddr, refusal: Refusal) {
        use std::sync::atomic::Ordering;
        self.junk.fetch_add(1, Ordering::Relaxed);
        // Under the same limit as warnings (one clock read a packet, as
        // any refusal): a flood at debug level is not a flood of lines.
        if self.limit.check().is_err() {
            return;
        }
        tracing::debug!(%source, reason = refusal.as_label(), "malformed spa packet");
        if self.junk_report.check().is_ok() {
            let count = self.junk.swap(0, Ordering::Relaxed);
            tracing::info!(
                count,
                window_s = JUNK_REPORT_EVERY.as_secs_f64(),
                "{count} malformed spa packet(s) since the last report (at most one per {}s; counted in portcullis_spa_packets_total)",
                JUNK_REPORT_EVERY.as_secs()
            );
        }
    }
}

/// A datagram no SPA client sent: no format, or not shaped like its format.
/// A well-formed packet with a bad MAC or a stale time stays a warning:
/// that is a client with the wrong key or clock, or someone trying.
fn is_junk(format: Option<Format>, refusal: Refusal) -> bool {
    format.is_none() || matches!(refusal, Refusal::Packet(Reject::Malformed(_) | Reject::TooLarge { .. }))
}

/// The `portcullis_spa_packets_total` series by (format, result) label,
/// looked up once each: a flood counts every packet.
#[derive(Debug, Default)]
pub struct Counters(HashMap<(&'static str, &'static str), ::metrics::Counter>);

impl Counters {
    pub(super) fn count(&mut self, format: &'static str, result: &'static str) {
        self.0
            .entry((format, result))
            .or_insert_with(|| metrics::spa_packet_counter(format, result))
            .increment(1);
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
