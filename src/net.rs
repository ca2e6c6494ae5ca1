//! Socket set-up shared by sensors and the proxy.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{Domain, SockRef, Socket, Type};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

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
