//! Socket set-up shared by sensors and the proxy.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{Domain, SockRef, Socket, Type};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// Listen backlog for guarded and knock listeners.
const BACKLOG: i32 = 1024;

/// Binds a TCP listener with `SO_REUSEADDR`, so a restart is not blocked
/// by connections in TIME_WAIT.
pub fn bind_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// Binds a UDP socket that records the kernel's receive timestamp of each
/// datagram (`SO_TIMESTAMPNS`), so datagrams read from several sockets can
/// be put back in arrival order.
pub fn bind_udp_timestamped(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, None)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    let std: std::net::UdpSocket = socket.into();
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
