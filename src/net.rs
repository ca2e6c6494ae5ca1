//! Socket set-up shared by sensors, the proxy and the admin endpoint, and
//! the one accept loop every TCP listener runs.

use std::io;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, SockRef, Socket, Type};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::metrics::{self, ListenerKind};

/// Pause after a failed `accept()` (e.g. out of file descriptors), so the
/// loop does not spin while the condition lasts.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Accept failures logged per second per listener at most; all are counted.
const ACCEPT_WARN_RATE: NonZeroU32 = NonZeroU32::new(1).expect("1 is not zero");

/// Accepts on `listener` until `stop`, handing each connection to
/// `accepted` with its permit (when `permits` is given, one is taken before
/// each accept, so connections past the cap wait in the kernel's backlog
/// instead of in memory). `accepted` must not wait: it spawns. A failed
/// accept is counted under `kind`, logged under a rate limit, and followed
/// by [`ACCEPT_BACKOFF`]; the loop goes on. Returns when `stop` is
/// cancelled or the semaphore is closed.
pub async fn accept_loop(
    listener: &TcpListener,
    kind: ListenerKind,
    permits: Option<&Arc<Semaphore>>,
    stop: &CancellationToken,
    mut accepted: impl FnMut(TcpStream, SocketAddr, Option<OwnedSemaphorePermit>),
) {
    let warn_limit = governor::RateLimiter::direct(governor::Quota::per_second(ACCEPT_WARN_RATE));
    loop {
        let permit = match permits {
            Some(permits) => tokio::select! {
                _ = stop.cancelled() => return,
                p = permits.clone().acquire_owned() => match p {
                    Ok(p) => Some(p),
                    Err(_) => return,
                },
            },
            None => None,
        };
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => r,
        };
        match result {
            Ok((stream, peer)) => accepted(stream, peer, permit),
            Err(e) => {
                metrics::accept_error(kind);
                if warn_limit.check().is_ok() {
                    let addr = listener.local_addr().ok();
                    tracing::warn!(listener = kind.as_label(), addr = ?addr, error = %e, "accept failed");
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// Listen backlog for guarded and knock listeners.
const BACKLOG: i32 = 1024;

/// Binds a TCP listener with `SO_REUSEADDR`, so a restart is not blocked
/// by connections in TIME_WAIT, and `TCP_NODELAY`, which Linux hands on to
/// every accepted socket: one system call per connection saved.
pub fn bind_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    // Best effort: without it, accepted sockets are set one by one.
    let _ = socket.set_nodelay(true);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// Binds a plain UDP socket.
pub fn bind_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, None)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// Receive buffer asked for on sensor sockets (knock and SPA ports). Under a
/// flood, a deeper queue is what lets a valid packet wait its turn instead
/// of being dropped by the kernel; the kernel caps it at `rmem_max`.
const SENSOR_RCVBUF: usize = 4 << 20;

/// Binds a UDP socket for a sensor: a plain UDP socket with a deep receive
/// buffer (best effort).
pub fn bind_udp_sensor(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, None)?;
    // Best effort: a smaller buffer only makes floods drop sooner.
    let _ = socket.set_recv_buffer_size(SENSOR_RCVBUF);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// Binds a UDP socket that records the kernel's receive timestamp of each
/// datagram (`SO_TIMESTAMPNS`), so datagrams read from several sockets can
/// be put back in arrival order.
pub fn bind_udp_timestamped(addr: SocketAddr) -> io::Result<UdpSocket> {
    let std = bind_udp_sensor(addr)?.into_std()?;
    nix::sys::socket::setsockopt(&std, nix::sys::socket::sockopt::ReceiveTimestampns, &true)
        .map_err(io::Error::from)?;
    UdpSocket::from_std(std)
}

/// Closes a TCP connection with a reset (`SO_LINGER` 0) instead of a FIN.
pub fn reset(stream: TcpStream) {
    // Failing to set linger only turns the reset into an orderly close.
    let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_accept_loop_hands_on_connections_with_permits_and_stops() {
        let listener = bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let permits = Arc::new(Semaphore::new(1));
        let stop = CancellationToken::new();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let task = {
            let (permits, stop) = (permits.clone(), stop.clone());
            tokio::spawn(async move {
                accept_loop(&listener, ListenerKind::Guarded, Some(&permits), &stop, |s, peer, p| {
                    tx.send((s, peer, p)).unwrap();
                })
                .await;
            })
        };
        let _a = TcpStream::connect(addr).await.unwrap();
        let (_s, _, permit) = rx.recv().await.unwrap();
        assert!(permit.is_some());
        assert_eq!(permits.available_permits(), 0, "the connection holds the only permit");
        // A second connection waits in the backlog until the permit is back.
        let _b = TcpStream::connect(addr).await.unwrap();
        tokio::task::yield_now().await;
        assert!(rx.try_recv().is_err());
        drop(permit);
        let (_s, _, permit) = rx.recv().await.unwrap();
        assert!(permit.is_some());
        stop.cancel();
        task.await.unwrap();
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn accepted_connections_inherit_nodelay_from_the_listener() {
        let listener = bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(
            accepted.nodelay().unwrap(),
            "the proxy relies on this instead of a setsockopt per connection"
        );
    }
}
