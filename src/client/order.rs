//! Keeping a knock sequence in order at the gateway.
//!
//! The gateway reads all its UDP knock sockets in one task and sorts each
//! batch by kernel receive timestamps, so UDP steps keep their order
//! however close together they are sent. A TCP step is seen by a separate
//! accept task, so a UDP step followed by a TCP step (or the reverse) is
//! ordered only by which task runs first: on loopback, where the handshake
//! takes microseconds, the TCP step used to win one time in five.
//!
//! Nothing tells a client when the gateway has read a packet (it answers
//! no one), so the order is kept in two ways:
//!
//! - **Gateway on this host** (loopback or a local address): the kernel
//!   shows how much each socket holds (`/proc/net/udp` receive queue, or a
//!   listener's accept queue in `/proc/net/tcp`). Before the next step the
//!   client waits until every socket bound to the step's port is empty:
//!   the gateway has read the datagram or accepted the connection, and its
//!   sensor hands a knock to the gate in the same synchronous pass. A short
//!   settle covers the few instructions in between.
//! - **Gateway elsewhere**: queues cannot be seen, so the client leaves a
//!   gap around TCP steps. A UDP step followed by a TCP step also gets the
//!   network's own help: the datagram leaves before the SYN and the gateway
//!   accepts only after the final ACK, a round trip later.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use crate::clock::{Clock as _, SystemClock};
use crate::step::Proto;

/// Gap around a TCP step when the gateway's queues cannot be seen. The
/// gateway's tasks wake within microseconds when idle; this leaves room for
/// a busy host.
pub const REMOTE_GAP: Duration = Duration::from_millis(10);

/// Pause after the gateway's queue is seen empty, before the next step:
/// the sensor reads and forwards in one pass, so this only covers a thread
/// preempted in between.
pub const LOCAL_SETTLE: Duration = Duration::from_millis(5);

/// Longest wait for a local gateway to read one step. A gateway that is
/// stopped or wedged must not hang the client.
pub const LOCAL_PATIENCE: Duration = Duration::from_secs(2);

const POLL: Duration = Duration::from_micros(200);

/// Whether `ip` belongs to this host (so its sockets are visible here).
pub fn is_local(ip: IpAddr) -> bool {
    ip.is_loopback() || std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// What [`wait_read`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Sockets bound to the step were seen empty.
    Empty,
    /// No socket of this host is bound to the step (a remote gateway, or a
    /// sensor that observes without binding).
    NoSocket,
    /// Still not empty after [`LOCAL_PATIENCE`].
    Timeout,
}

/// Waits until every local socket bound to `target` for `proto` has an
/// empty receive queue (UDP) or accept queue (TCP listener).
pub async fn wait_read(target: SocketAddr, proto: Proto) -> Drained {
    let clock = SystemClock;
    let deadline = clock.now() + LOCAL_PATIENCE;
    let mut seen = false;
    loop {
        match queued(target, proto) {
            None if !seen => return Drained::NoSocket,
            None | Some(0) => return Drained::Empty,
            Some(_) => seen = true,
        }
        if clock.now() >= deadline {
            return Drained::Timeout;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Bytes (UDP) or connections (TCP listener) queued on the sockets bound
/// to `target`; `None` when no socket is bound to it.
fn queued(target: SocketAddr, proto: Proto) -> Option<u64> {
    let tables: &[&str] = match proto {
        Proto::Udp => &["/proc/net/udp", "/proc/net/udp6"],
        Proto::Tcp => &["/proc/net/tcp", "/proc/net/tcp6"],
    };
    let mut total = None;
    for table in tables {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for entry in text.lines().skip(1).filter_map(parse_line) {
            if proto == Proto::Tcp && entry.state != TCP_LISTEN {
                continue;
            }
            if entry.local.port() == target.port() && covers(entry.local.ip(), target.ip()) {
                *total.get_or_insert(0) += entry.rx_queue;
            }
        }
    }
    total
}

const TCP_LISTEN: u8 = 0x0A;

/// Whether a socket bound to `bound` receives what is sent to `to`.
fn covers(bound: IpAddr, to: IpAddr) -> bool {
    let canon = |ip: IpAddr| ip.to_canonical();
    bound.is_unspecified() || canon(bound) == canon(to)
}

#[derive(Debug, PartialEq, Eq)]
struct Entry {
    local: SocketAddr,
    state: u8,
    rx_queue: u64,
}

/// One line of `/proc/net/{udp,tcp}{,6}`:
/// `sl local_address rem_address st tx_queue:rx_queue ...`, addresses in
/// hex, each 32-bit word as the kernel holds it in memory.
fn parse_line(line: &str) -> Option<Entry> {
    let mut fields = line.split_whitespace();
    let _slot = fields.next()?;
    let local = parse_addr(fields.next()?)?;
    let _remote = fields.next()?;
    let state = u8::from_str_radix(fields.next()?, 16).ok()?;
    let (_, rx) = fields.next()?.split_once(':')?;
    let rx_queue = u64::from_str_radix(rx, 16).ok()?;
    Some(Entry { local, state, rx_queue })
}

fn parse_addr(text: &str) -> Option<SocketAddr> {
    let (addr, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        let hex = addr.get(i * 8..i * 8 + 8)?;
        Some(u32::from_str_radix(hex, 16).ok()?.to_ne_bytes())
    };
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_lines_parse() {
        // Captured on x86_64: 127.0.0.1:7000 with 768 bytes queued, and a
        // listener on [::]:22 with 1 connection waiting.
        let v4 = "  12: 0100007F:1B58 00000000:0000 07 00000000:00000300 00:00000000 00000000     0        0 1 2 0000000000000000 0";
        let v6 = "   0: 00000000000000000000000000000000:0016 00000000000000000000000000000000:0000 0A 00000000:00000001 00:00000000 00000000     0        0 1 1";
        if cfg!(target_endian = "little") {
            assert_eq!(
                parse_line(v4),
                Some(Entry {
                    local: "127.0.0.1:7000".parse().unwrap(),
                    state: 7,
                    rx_queue: 0x300
                })
            );
        }
        assert_eq!(
            parse_line(v6),
            Some(Entry {
                local: "[::]:22".parse().unwrap(),
                state: TCP_LISTEN,
                rx_queue: 1
            })
        );
        assert_eq!(
            parse_line("  sl  local_address rem_address   st tx_queue rx_queue"),
            None
        );
    }

    #[test]
    fn wildcard_and_mapped_addresses_cover() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(covers(ip("0.0.0.0"), ip("127.0.0.1")));
        assert!(covers(ip("::"), ip("127.0.0.1")));
        assert!(covers(ip("::ffff:127.0.0.1"), ip("127.0.0.1")));
        assert!(!covers(ip("127.0.0.2"), ip("127.0.0.1")));
    }

    #[tokio::test]
    async fn a_read_datagram_is_seen_drained() {
        let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = server.local_addr().unwrap();
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client.send_to(b"x", to).unwrap();
        assert!(queued(to, Proto::Udp).unwrap() > 0);
        let mut buf = [0u8; 8];
        server.recv_from(&mut buf).unwrap();
        assert_eq!(wait_read(to, Proto::Udp).await, Drained::Empty);
        let unbound = SocketAddr::from(([127, 0, 0, 1], 1));
        assert_eq!(wait_read(unbound, Proto::Udp).await, Drained::NoSocket);
    }
}
