//! Socket set-up shared by sensors, the proxy and the admin endpoint, and
//! the one accept loop every TCP listener runs.

use std::io;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::Duration;

use socket2::{Domain, SockRef, Socket, Type};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;

use crate::metrics::{self, ListenerKind};

/// Pause after a failed `accept()` (e.g. out of file descriptors), so the
/// loop does not spin while the condition lasts.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Accept failures logged per second per listener at most; all are counted.
const ACCEPT_WARN_RATE: NonZeroU32 = NonZeroU32::new(1).expect("1 is not zero");

/// Accepts on `listener` until `stop`, handing each connection to
/// `accepted`, which must not wait: it spawns. No permit is taken before
/// an accept, so an idle loop holds nothing; callers cap connections after
/// the accept, where they know whose connection it is.
///
/// A failed accept is counted under `kind`, logged under a rate limit, and
/// followed by [`ACCEPT_BACKOFF`]; the loop goes on. When it failed for
/// want of a descriptor (EMFILE, ENFILE), the connection waiting is shed
/// first with the reserve descriptor ([`keep_reserve`]): closed to make
/// room, the pending connection accepted and closed at once, the reserve
/// opened again, so the backlog drains instead of filling with clients
/// that wait for nothing.
pub async fn accept_loop(
    listener: &TcpListener,
    kind: ListenerKind,
    stop: &CancellationToken,
    mut accepted: impl FnMut(TcpStream, SocketAddr),
) {
    let warn_limit = governor::RateLimiter::direct(governor::Quota::per_second(ACCEPT_WARN_RATE));
    loop {
        // `poll_accept` rather than `accept()`: both retry inside one poll
        // while the socket is readable and accept(2) says EAGAIN, but only
        // `poll_accept` spends the task's budget doing it, so it yields
        // after a bounded number of tries. A socket that stopped listening
        // (a `closed` service's door) leaves its registration readable for
        // good; were it listening again by the next poll, `accept()` would
        // spin in that poll forever and starve every task queued behind it.
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            r = std::future::poll_fn(|cx| listener.poll_accept(cx)) => r,
        };
        match result {
            Ok((stream, peer)) => accepted(stream, peer),
            Err(e) => {
                metrics::accept_error(kind);
                let out_of_descriptors = matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
                if warn_limit.check().is_ok() {
                    let addr = listener.local_addr().ok();
                    tracing::warn!(listener = kind.as_label(), addr = ?addr, error = %e, "accept failed");
                }
                if out_of_descriptors && shed(listener) {
                    metrics::accept_shed(kind);
                    continue;
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// The descriptor kept in reserve for [`shed`]: an unbound UDP socket,
/// which needs no file system (a `FROM scratch` image has no `/dev/null`)
/// and takes no port.
static RESERVE: Mutex<Option<Socket>> = Mutex::new(None);

fn reserve_descriptor() -> io::Result<Socket> {
    Socket::new(Domain::IPV4, Type::DGRAM, None)
}

/// Opens the reserve descriptor, once per process (`serve` does it before
/// binding); counted in the descriptor budget's runtime allowance.
pub fn keep_reserve() -> io::Result<()> {
    let mut reserve = RESERVE.lock().unwrap_or_else(|e| e.into_inner());
    if reserve.is_none() {
        *reserve = Some(reserve_descriptor()?);
    }
    Ok(())
}

/// Accepts one pending connection on `listener` with the reserve's
/// descriptor and closes it at once; true if one was shed. False without a
/// reserve (another loop is using it, or none was kept).
fn shed(listener: &TcpListener) -> bool {
    let mut reserve = RESERVE.lock().unwrap_or_else(|e| e.into_inner());
    if reserve.take().is_none() {
        return false;
    }
    // The listener is non-blocking: nothing pending is WouldBlock.
    let shed = SockRef::from(listener).accept().is_ok();
    *reserve = reserve_descriptor().ok();
    shed
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

/// Binds a guarded TCP socket without listening: the port is taken, and
/// answers a SYN with a reset until [`listen`] is called on it. Bound with
/// `SO_REUSEADDR` (a restart is not blocked by connections in TIME_WAIT),
/// which is then cleared, so no other socket can bind the port while this
/// one does not listen (Linux lets two non-listening sockets that both set
/// it share a port).
///
/// The port is always bound explicitly, even for port 0 (a probe socket
/// picks it first): Linux keeps only an explicitly bound port when a
/// `closed` service stops listening, and gives an automatic one back.
pub fn bind_tcp_unlistened(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let reusable = || -> io::Result<Socket> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        Ok(socket)
    };
    let socket = reusable()?;
    let _ = socket.set_nodelay(true);
    socket.set_nonblocking(true)?;
    if addr.port() == 0 {
        // Two sockets that set SO_REUSEADDR and do not listen may share a
        // port: the probe holds it until the real socket has it too.
        let probe = reusable()?;
        probe.bind(&addr.into())?;
        let picked = probe.local_addr()?.as_socket().ok_or(io::ErrorKind::InvalidData)?;
        socket.bind(&picked.into())?;
    } else {
        socket.bind(&addr.into())?;
    }
    socket.set_reuse_address(false)?;
    Ok(socket.into())
}

/// Starts listening on a socket bound by [`bind_tcp_unlistened`] (again
/// after it stopped; listening twice only sets the backlog).
pub fn listen(socket: &SockRef<'_>) -> io::Result<()> {
    socket.listen(BACKLOG)
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
    async fn the_accept_loop_hands_on_connections_and_stops() {
        let listener = bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let task = {
            let stop = stop.clone();
            tokio::spawn(async move {
                accept_loop(&listener, ListenerKind::Guarded, &stop, |s, peer| {
                    tx.send((s, peer)).unwrap();
                })
                .await;
            })
        };
        let a = TcpStream::connect(addr).await.unwrap();
        let (_s, peer) = rx.recv().await.unwrap();
        assert_eq!(peer, a.local_addr().unwrap());
        let _b = TcpStream::connect(addr).await.unwrap();
        let _ = rx.recv().await.unwrap();
        stop.cancel();
        task.await.unwrap();
    }

    #[test]
    fn the_reserve_sheds_a_pending_connection_and_is_kept_again() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            keep_reserve().unwrap();
            let listener = bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
            let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            assert!(shed(&listener), "a pending connection is shed");
            // The client sees its connection closed.
            use std::io::Read as _;
            client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = [0u8; 1];
            assert!(matches!(client.read(&mut buf), Ok(0) | Err(_)));
            assert!(RESERVE.lock().unwrap().is_some(), "the reserve is open again");
            assert!(!shed(&listener), "nothing pending: nothing shed");
        });
    }

    /// Set in the child process [`out_of_descriptors_the_loop_sheds_the_pending_connection`]
    /// runs itself in: lowering the descriptor limit is for a whole process.
    const SHED_CHILD: &str = "PORTCULLIS_TEST_SHED_CHILD";

    #[test]
    fn out_of_descriptors_the_loop_sheds_the_pending_connection() {
        let name = "net::tests::out_of_descriptors_the_loop_sheds_the_pending_connection";
        if std::env::var_os(SHED_CHILD).is_none() {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", name, "--nocapture", "--test-threads", "1"])
                .env(SHED_CHILD, "1")
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success() && text.contains("1 passed"), "{text}");
            return;
        }
        // The child: the runtime and the listener first, then the limit
        // lowered and the table filled, so the next accept gets EMFILE.
        use nix::sys::resource::{getrlimit, setrlimit, Resource};
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        keep_reserve().unwrap();
        let listener = runtime.block_on(async { bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap() });
        let addr = listener.local_addr().unwrap();
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        setrlimit(Resource::RLIMIT_NOFILE, 256, hard).unwrap();
        let mut filler = Vec::new();
        while let Ok(f) = std::fs::File::open("/dev/null") {
            filler.push(f);
        }
        drop(filler.pop());
        let client = std::net::TcpStream::connect(addr).unwrap();
        assert!(std::fs::File::open("/dev/null").is_err(), "the table is full");
        let stop = CancellationToken::new();
        let accepted = std::cell::Cell::new(0);
        let closed = runtime.block_on(async {
            let client = tokio::task::spawn_blocking(move || {
                use std::io::Read as _;
                let mut client = client;
                client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut buf = [0u8; 1];
                // Closed (FIN or reset), not timed out.
                match client.read(&mut buf) {
                    Ok(n) => n == 0,
                    Err(e) => !matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut),
                }
            });
            tokio::select! {
                _ = accept_loop(&listener, ListenerKind::Guarded, &stop, |_, _| accepted.set(accepted.get() + 1)) => false,
                closed = client => closed.unwrap(),
            }
        });
        assert!(closed, "the pending connection was accepted and closed");
        assert_eq!(accepted.get(), 0, "and never handed on");
        assert!(RESERVE.lock().unwrap().is_some(), "the reserve is kept again");
        drop(filler);
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
