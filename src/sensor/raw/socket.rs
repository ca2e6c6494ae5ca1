//! The raw sensor's sockets: `AF_INET` and `AF_INET6` raw sockets for UDP
//! and TCP, opened with a filter that drops everything until the sensor
//! attaches its own, and read with the kernel's receive timestamps.

use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv6Addr};
use std::os::fd::AsRawFd;

use nix::sys::socket::{recvmsg, sockopt, ControlMessageOwned, MsgFlags, SockaddrStorage};
use nix::sys::time::TimeSpec;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::unix::AsyncFd;

use super::packet::{self, Seen};
use crate::filter::{self, Insn, RawHeader, RawProto};
use crate::step::Proto;

/// Receive buffer of each raw socket: room for bursts of knocks and SPA
/// packets, not for floods (those drop in the kernel).
const RCVBUF: usize = 1 << 20;

/// Why the raw sockets could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(
        "the raw sensor needs CAP_NET_RAW, which this process does not hold (grant it: `docker run --cap-add NET_RAW`, \
         Kubernetes `securityContext.capabilities.add: [NET_RAW]`, `setcap cap_net_raw+ep`; or set gateway.sensor = \"socket\")"
    )]
    NoCapability,
    #[error("cannot open a raw socket: {0}")]
    Io(#[from] io::Error),
}

/// One raw socket of the sensor.
#[derive(Debug)]
pub(crate) struct RawSocket {
    pub fd: AsyncFd<Socket>,
    pub header: RawHeader,
    pub proto: Proto,
}

/// Whether this process may open raw sockets (it holds CAP_NET_RAW in its
/// network namespace).
pub fn capable() -> Result<(), OpenError> {
    raw(Domain::IPV4, Protocol::UDP).map(drop)
}

fn raw(domain: Domain, protocol: Protocol) -> Result<Socket, OpenError> {
    Socket::new(domain, Type::RAW, Some(protocol)).map_err(|e| match e.raw_os_error() {
        Some(nix::libc::EPERM | nix::libc::EACCES) => OpenError::NoCapability,
        _ => OpenError::Io(e),
    })
}

/// Opens the sensor's sockets. IPv6 ones are left out when the host has
/// no IPv6.
pub(crate) fn open_all() -> Result<Vec<RawSocket>, OpenError> {
    let mut sockets = Vec::with_capacity(4);
    for (domain, header) in [(Domain::IPV4, RawHeader::Ipv4), (Domain::IPV6, RawHeader::Transport)] {
        for proto in [Proto::Udp, Proto::Tcp] {
            let protocol = match proto {
                Proto::Tcp => Protocol::TCP,
                Proto::Udp => Protocol::UDP,
            };
            let socket = match raw(domain, protocol) {
                Ok(s) => s,
                Err(OpenError::Io(e))
                    if domain == Domain::IPV6 && e.raw_os_error() == Some(nix::libc::EAFNOSUPPORT) =>
                {
                    tracing::debug!("no IPv6 on this host: the raw sensor watches IPv4 only");
                    break;
                }
                Err(e) => return Err(e),
            };
            sockets.push(prepare(socket, header, proto)?);
        }
    }
    Ok(sockets)
}

fn prepare(socket: Socket, header: RawHeader, proto: Proto) -> Result<RawSocket, OpenError> {
    // Nothing is wanted until the sensor says what: drop all, then empty
    // what was queued before the filter was on.
    attach(&socket, &filter::DROP_ALL)?;
    socket.set_nonblocking(true)?;
    let mut scratch = [0u8; 64];
    while nix::sys::socket::recv(socket.as_raw_fd(), &mut scratch, MsgFlags::MSG_DONTWAIT).is_ok() {}
    // Best effort: a smaller buffer only makes floods drop sooner.
    let _ = socket.set_recv_buffer_size(RCVBUF);
    nix::sys::socket::setsockopt(&socket, sockopt::ReceiveTimestampns, &true).map_err(io::Error::from)?;
    if header == RawHeader::Transport {
        // The IPv6 header is not part of what an IPv6 raw socket reads:
        // the destination comes as ancillary data.
        nix::sys::socket::setsockopt(&socket, sockopt::Ipv6RecvPacketInfo, &true).map_err(io::Error::from)?;
    }
    Ok(RawSocket {
        fd: crate::sys::async_socket(socket)?,
        header,
        proto,
    })
}

/// Attaches `program` to `socket`, replacing the one before atomically.
pub(crate) fn attach(socket: &Socket, program: &[Insn]) -> io::Result<()> {
    let program: Vec<_> = program.iter().map(|i| i.sock_filter()).collect();
    socket.attach_filter(&program)
}

impl RawSocket {
    /// The filter protocol of this socket.
    pub(crate) fn raw_proto(&self) -> RawProto {
        match self.proto {
            Proto::Tcp => RawProto::Tcp,
            Proto::Udp => RawProto::Udp,
        }
    }

    /// Reads one packet (non-blocking), with its kernel receive time;
    /// `Ok(None)` for one that does not parse.
    #[allow(clippy::ptr_arg, reason = "nix's recvmsg takes the control buffer as a Vec")]
    pub(crate) fn recv<'b>(&self, buf: &'b mut [u8], cmsg: &mut Vec<u8>) -> io::Result<Option<(TimeSpec, Seen<'b>)>> {
        let fd = self.fd.get_ref().as_raw_fd();
        let (len, at, source, dest) = {
            let mut iov = [IoSliceMut::new(buf)];
            let msg = recvmsg::<SockaddrStorage>(fd, &mut iov, Some(cmsg), MsgFlags::empty())?;
            let mut at = TimeSpec::new(0, 0);
            let mut dest = None;
            if let Ok(cmsgs) = msg.cmsgs() {
                for c in cmsgs {
                    match c {
                        ControlMessageOwned::ScmTimestampns(ts) => at = ts,
                        ControlMessageOwned::Ipv6PacketInfo(info) => {
                            dest = Some(IpAddr::from(Ipv6Addr::from(info.ipi6_addr.s6_addr)));
                        }
                        _ => {}
                    }
                }
            }
            let source = msg
                .address
                .and_then(|a| a.as_sockaddr_in6().map(|v6| IpAddr::from(v6.ip())));
            (msg.bytes, at, source, dest)
        };
        let packet = &buf[..len.min(buf.len())];
        let seen = match self.header {
            RawHeader::Ipv4 => packet::ipv4(packet, self.proto),
            RawHeader::Transport => match (source, dest) {
                (Some(source), Some(dest)) => packet::transport(packet, self.proto, source, dest),
                _ => None,
            },
        };
        Ok(seen.map(|s| (at, s)))
    }
}
