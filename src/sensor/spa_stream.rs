//! SPA over a stream, each opt-in because each is a listener a scanner
//! can see: `[spa] tcp_listen` takes one packet per connection as
//! `fwknop -P tcp` sends it (the packet, then the client closes), and
//! `[spa] http_listen` takes it from the request line `fwknop -P http`
//! sends (`GET /<packet> HTTP/1.0`, base64 made URL-safe with `-` for `+`
//! and `_` for `/`).
//!
//! As for datagrams, the packet is decided by [`SpaSensor::decide`] and
//! nothing is ever sent back: the connection is closed once the packet
//! has been read (or the read limit or deadline reached). Reads are
//! bounded in size and time, and at most [`MAX_OPEN`] connections (and
//! [`MAX_OPEN_PER_SOURCE`] from one address) are read at once; past that a
//! connection is closed at once. The source is the connection's peer,
//! which, unlike a datagram's, cannot be forged without the handshake.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::spa::{Counters, SpaSensor};
use crate::driver::DriverHandle;
use crate::metrics::ListenerKind;
use crate::{net, spa};

/// Longest a connection may take to deliver its packet.
pub const READ_DEADLINE: Duration = Duration::from_secs(2);
/// Connections read at once, all sources together.
pub const MAX_OPEN: usize = 64;
/// Connections read at once from one source address.
pub const MAX_OPEN_PER_SOURCE: usize = 4;
/// Most bytes read of an HTTP request: the request line with a packet of
/// the largest size, and the client's few headers.
const MAX_HTTP_LEN: usize = spa::MAX_PACKET_LEN + 1024;

/// Accepts on `listener` until `stop`, deciding one packet per connection
/// (`http`: from the request line). Hands the listener back.
pub async fn run(
    listener: TcpListener,
    http: bool,
    sensor: SpaSensor,
    driver: DriverHandle,
    stop: CancellationToken,
) -> TcpListener {
    let sensor = Arc::new(sensor);
    let open = Arc::new(Semaphore::new(MAX_OPEN));
    let per_source: Arc<Mutex<HashMap<IpAddr, usize>>> = Arc::default();
    net::accept_loop(&listener, ListenerKind::Spa, &stop, |stream, peer| {
        let source = peer.ip().to_canonical();
        let Ok(permit) = open.clone().try_acquire_owned() else {
            return;
        };
        let Some(slot) = SourceSlot::take(&per_source, source) else {
            return;
        };
        let (sensor, driver) = (sensor.clone(), driver.clone());
        tokio::spawn(async move {
            let _held = (permit, slot);
            let deadline = tokio::time::Instant::now() + READ_DEADLINE;
            // What came in time is decided, even from a client that never
            // closed; nothing at all is no packet.
            if let Some(packet) = read(stream, http, deadline).await {
                sensor.decide(&packet, source, &driver, &mut Counters::default());
            }
        });
    })
    .await;
    listener
}

/// Reads one packet from `stream`: the bytes up to the client's close or
/// `deadline` (at most one more than a packet may have, so an oversized
/// one is refused as such), or with `http` the packet of the request line.
/// `None` when the peer sent nothing.
async fn read(mut stream: TcpStream, http: bool, deadline: tokio::time::Instant) -> Option<Vec<u8>> {
    let limit = if http { MAX_HTTP_LEN } else { spa::MAX_PACKET_LEN + 1 };
    let mut buf = Vec::with_capacity(1024);
    loop {
        if buf.len() >= limit {
            break;
        }
        let mut chunk = [0u8; 2048];
        let want = (limit - buf.len()).min(chunk.len());
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk[..want])).await {
            Ok(Ok(0) | Err(_)) | Err(_) => break,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
        if http && buf.windows(2).any(|w| w == b"\r\n") {
            // The request line is complete: the rest is headers.
            break;
        }
    }
    if buf.is_empty() {
        return None;
    }
    Some(if http { from_request_line(&buf) } else { buf })
}

/// The packet of `GET /<packet> HTTP/1.x`, its URL-safe base64 turned
/// back into standard base64. Anything else is handed on as it came, to
/// be refused as malformed.
pub fn from_request_line(request: &[u8]) -> Vec<u8> {
    let line = request.split(|b| *b == b'\r' || *b == b'\n').next().unwrap_or_default();
    let packet = line
        .strip_prefix(b"GET /")
        .and_then(|rest| rest.split(|b| *b == b' ').next())
        .filter(|_| line.ends_with(b" HTTP/1.0") || line.ends_with(b" HTTP/1.1"));
    match packet {
        Some(packet) => packet
            .iter()
            .map(|b| match b {
                b'-' => b'+',
                b'_' => b'/',
                b => *b,
            })
            .collect(),
        None => line.to_vec(),
    }
}

/// One of a source's [`MAX_OPEN_PER_SOURCE`] connections, given back on
/// drop.
struct SourceSlot {
    table: Arc<Mutex<HashMap<IpAddr, usize>>>,
    source: IpAddr,
}

impl SourceSlot {
    fn take(table: &Arc<Mutex<HashMap<IpAddr, usize>>>, source: IpAddr) -> Option<Self> {
        let mut open = table.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(source).or_insert(0);
        if *count >= MAX_OPEN_PER_SOURCE {
            return None;
        }
        *count += 1;
        Some(Self {
            table: table.clone(),
            source,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut open = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_line_of_fwknop_dash_p_http_gives_the_standard_base64_packet() {
        let request = b"GET /9zPU-bg_T6 HTTP/1.0\r\nUser-Agent: Fwknop/2.6.10\r\nAccept: */*\r\n\r\n";
        assert_eq!(from_request_line(request), b"9zPU+bg/T6");
        assert_eq!(from_request_line(b"GET /ab-c HTTP/1.1\r\n"), b"ab+c");
    }

    #[test]
    fn anything_else_is_handed_on_as_it_came() {
        assert_eq!(from_request_line(b"POST /abc HTTP/1.0\r\n"), b"POST /abc HTTP/1.0");
        assert_eq!(from_request_line(b"GET /abc\r\n"), b"GET /abc");
        assert_eq!(from_request_line(b"\r\n"), b"");
    }

    #[test]
    fn a_source_has_at_most_its_share_of_connections_and_gets_them_back() {
        let table = Arc::default();
        let a: IpAddr = [192, 0, 2, 1].into();
        let b: IpAddr = [192, 0, 2, 2].into();
        let held: Vec<SourceSlot> = (0..MAX_OPEN_PER_SOURCE)
            .map(|_| SourceSlot::take(&table, a).expect("within the share"))
            .collect();
        assert!(SourceSlot::take(&table, a).is_none());
        assert!(SourceSlot::take(&table, b).is_some());
        drop(held);
        assert!(SourceSlot::take(&table, a).is_some());
        assert!(
            table.lock().expect("lock").get(&a).is_none(),
            "a given-back slot leaves no entry"
        );
    }
}
