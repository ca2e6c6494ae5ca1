//! Knock sensors: they own the knock sockets, turn what arrives into
//! [`Knock`]s for the gate, and do nothing else. Nothing is ever sent back
//! to a knock sender. [`raw`] watches the knock and SPA ports through raw
//! sockets instead of binding them.
//!
//! UDP knock sockets are read by one task, in passes until every socket is
//! empty; each batch is put back in arrival order by the kernel's receive
//! timestamps before it reaches the gate. Separate tasks per socket would
//! race each other, and the stock `knock` client sends its steps
//! back-to-back, microseconds apart.

use std::future::poll_fn;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::task::Poll;

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, SockaddrLike, SockaddrStorage};
use nix::sys::time::TimeSpec;
use tokio::io::Interest;
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::driver::DriverHandle;
use crate::gate::Knock;
use crate::guard::SourceGuard;
use crate::metrics::{self, ListenerKind};
use crate::net;
use crate::step::Step;

pub mod raw;
pub mod recorder;
pub mod spa;
pub mod spa_stream;

/// Where knocks go: the gate driver, behind the per-source guard.
#[derive(Debug, Clone)]
pub struct Intake {
    pub driver: DriverHandle,
    pub guard: Arc<SourceGuard>,
    pub clock: Arc<dyn Clock>,
}

impl Intake {
    /// Passes a knock to the gate unless the guard refuses its source or
    /// the gate's queue is full (both counted). The gate is never waited on.
    fn forward(&self, knock: Knock) {
        if let Err(r) = self.guard.admit(knock.source, self.clock.now()) {
            metrics::source_refused("knock", r.as_label());
            tracing::debug!(source = %knock.source, step = %knock.step, reason = r.as_label(), "knock ignored");
            return;
        }
        if self.driver.knock(knock).is_err() {
            metrics::knock_dropped();
            tracing::debug!(source = %knock.source, step = %knock.step, "gate busy: knock dropped");
        }
    }
}

/// Most datagrams read before a batch is handed on, so a flood cannot
/// grow a batch without bound.
const MAX_BATCH: usize = 1024;

/// Reads every UDP knock socket until `cancel`; forwards knocks in arrival
/// order. A full channel drops the knock (counted): the gate is never
/// waited on.
pub async fn run_udp(
    sockets: Vec<(Arc<UdpSocket>, Step)>,
    intake: Intake,
    cancel: CancellationToken,
) -> Vec<(Arc<UdpSocket>, Step)> {
    let mut batch: Vec<(TimeSpec, Knock)> = Vec::with_capacity(64);
    let mut buf = [0u8; 64];
    let mut cmsg = nix::cmsg_space!(TimeSpec);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return sockets,
            _ = readable(&sockets) => {}
        }
        loop {
            let before = batch.len();
            for (socket, step) in &sockets {
                while batch.len() < MAX_BATCH {
                    match socket.try_io(Interest::READABLE, || recv_stamped(socket, &mut buf, &mut cmsg)) {
                        Ok((source, at)) => batch.push((
                            at,
                            Knock {
                                source: source.to_canonical(),
                                step: *step,
                            },
                        )),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            tracing::debug!(step = %step, error = %e, "knock socket read failed");
                            break;
                        }
                    }
                }
            }
            if batch.len() == before || batch.len() >= MAX_BATCH {
                break;
            }
        }
        batch.sort_by_key(|(at, _)| *at);
        for (_, knock) in batch.drain(..) {
            intake.forward(knock);
        }
    }
}

/// Accepts on a TCP knock listener: each completed handshake is a knock,
/// and the connection is reset at once without a byte sent.
pub async fn run_tcp(listener: TcpListener, step: Step, intake: Intake, cancel: CancellationToken) -> TcpListener {
    net::accept_loop(&listener, ListenerKind::Knock, &cancel, |stream, peer| {
        net::reset(stream);
        intake.forward(Knock {
            source: peer.ip().to_canonical(),
            step,
        });
    })
    .await;
    listener
}

/// Resolves when any socket is readable.
async fn readable(sockets: &[(Arc<UdpSocket>, Step)]) {
    poll_fn(|cx| {
        let mut ready = false;
        for (socket, _) in sockets {
            // Polling every socket registers the waker with each of them.
            if socket.poll_recv_ready(cx).is_ready() {
                ready = true;
            }
        }
        if ready {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await
}

/// One datagram's source and kernel receive time; the payload is ignored
/// (and truncated into `buf`).
#[allow(clippy::ptr_arg, reason = "nix's recvmsg takes the control buffer as a Vec")]
fn recv_stamped(socket: &UdpSocket, buf: &mut [u8], cmsg: &mut Vec<u8>) -> io::Result<(IpAddr, TimeSpec)> {
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<SockaddrStorage>(socket.as_raw_fd(), &mut iov, Some(cmsg), MsgFlags::empty())?;
    let mut at = TimeSpec::new(0, 0);
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            if let ControlMessageOwned::ScmTimestampns(ts) = c {
                at = ts;
            }
        }
    }
    let source = msg
        .address
        .and_then(|a| to_std(&a))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "datagram without a source address"))?;
    Ok((source.ip(), at))
}

fn to_std(addr: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = addr.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::new(v4.ip(), v4.port())));
    }
    let v6 = addr.as_sockaddr_in6()?;
    debug_assert!(addr.len() > 0);
    Some(SocketAddr::V6(SocketAddrV6::new(
        v6.ip(),
        v6.port(),
        v6.flowinfo(),
        v6.scope_id(),
    )))
}
