//! The proxy's data path through the real binary: bulk both ways at once,
//! half-closes each way, the switch from copying to `splice(2)` in the
//! middle of a stream, errors, and many short connections, each checked
//! byte for byte.
//!
//! Streams are checked as they arrive against the sender's pattern at the
//! same offset (a checksum that also says where bytes went wrong), so no
//! test holds 64 MiB in memory.

#![allow(
    clippy::unwrap_used,
    clippy::disallowed_methods,
    unreachable_pub,
    reason = "test and bench code: a panic is the failure report, and real time is what is measured"
)]

mod common;

use common::*;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

const ADMIN: &str = "\n[admin]\nlisten = \"127.0.0.1:0\"\n";

/// The direction's splice threshold in the gateway (`SPLICE_AFTER`).
const SPLICE_AFTER: u64 = 16 * 1024;

fn knock_seq(p: &[u16]) -> [u16; 3] {
    [p[3], p[7], p[5]]
}

/// A gateway guarding `upstream` as service `echo`, with an admin endpoint
/// and a grant long enough for the slowest test, already knocked open for
/// 127.0.0.1.
fn start(upstream: SocketAddr) -> Gateway {
    let (gw, p) = Gateway::builder()
        .on_free_ports(10, |p| {
            format!("{}{ADMIN}", echo_config(upstream, &knock_seq(p), ""))
                .replace("open_for = \"10s\"", "open_for = \"10m\"")
        })
        .start_on_ports();
    knock_and_wait(&gw, "echo", &knock_seq(&p), "127.0.0.1");
    gw
}

fn connect(gw: &Gateway) -> TcpStream {
    let s = connect_from("127.0.0.1", gw.addr("echo")).expect("connect through the gateway");
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s
}

/// An endless byte stream: a pseudo-random block whose length (1 MiB + 7)
/// is neither a power of two nor a multiple of any buffer or pipe size, so
/// a lost, repeated or reordered chunk shows up at once.
#[derive(Clone)]
struct Pattern(Arc<Vec<u8>>);

impl Pattern {
    fn new(seed: u64) -> Pattern {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let block = (0..(1 << 20) + 7)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        Pattern(Arc::new(block))
    }

    /// The stream's bytes from `offset`, as many as fit in one block.
    fn at(&self, offset: u64) -> &[u8] {
        &self.0[(offset % self.0.len() as u64) as usize..]
    }

    /// Writes the first `len` bytes of the stream.
    fn send(&self, w: &mut impl Write, len: u64) -> std::io::Result<()> {
        let mut sent = 0u64;
        while sent < len {
            let chunk = self.at(sent);
            let n = chunk.len().min((len - sent) as usize);
            w.write_all(&chunk[..n])?;
            sent += n as u64;
        }
        Ok(())
    }

    /// Reads to the end of the stream, checking every byte against the
    /// pattern; returns how many bytes came. Panics at the first wrong one.
    fn receive(&self, r: &mut impl Read, what: &str) -> u64 {
        let mut buf = vec![0u8; 256 * 1024];
        let mut offset = 0u64;
        loop {
            let n = match r.read(&mut buf) {
                Ok(0) => return offset,
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => panic!("{what}: read failed after {offset} bytes: {e}"),
            };
            let mut checked = 0;
            while checked < n {
                let want = self.at(offset);
                let m = want.len().min(n - checked);
                if buf[checked..checked + m] != want[..m] {
                    let bad = (0..m).find(|i| buf[checked + i] != want[*i]).unwrap();
                    panic!("{what}: wrong byte at offset {}", offset + bad as u64);
                }
                checked += m;
                offset += m as u64;
            }
        }
    }
}

/// The `connection closed` line of the `n`-th connection to close.
fn closed(gw: &Gateway, n: usize) -> serde_json::Value {
    gw.wait_for_nth(n, |l| msg(l) == "connection closed")
}

fn field(line: &serde_json::Value, name: &str) -> u64 {
    line[name].as_u64().unwrap_or_else(|| panic!("no {name} in {line}"))
}

#[test]
fn sixty_four_mib_each_way_at_once_arrive_exact_and_are_spliced() {
    const LEN: u64 = 64 << 20;
    let (to_client, to_upstream) = (Pattern::new(1), Pattern::new(2));
    let (report, reports) = mpsc::channel();
    let (a, b) = (to_client.clone(), to_upstream.clone());
    let addr = tcp_server("127.0.0.1:0", move |mut s| {
        let mut w = s.try_clone().unwrap();
        let a = a.clone();
        let writer = std::thread::spawn(move || {
            a.send(&mut w, LEN).unwrap();
            w.shutdown(Shutdown::Write).unwrap();
        });
        let got = b.receive(&mut s, "upstream");
        writer.join().unwrap();
        report.send(got).unwrap();
    });
    let gw = start(addr);

    let mut s = connect(&gw);
    let mut w = s.try_clone().unwrap();
    let b = to_upstream.clone();
    let writer = std::thread::spawn(move || {
        b.send(&mut w, LEN).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    });
    assert_eq!(to_client.receive(&mut s, "client"), LEN);
    writer.join().unwrap();
    assert_eq!(reports.recv_timeout(PATIENCE).unwrap(), LEN);

    let line = closed(&gw, 1);
    assert_eq!((field(&line, "bytes_up"), field(&line, "bytes_down")), (LEN, LEN));
    // Bulk both ways: almost everything went through pipes (each burst
    // starts with one small copy).
    for dir in ["spliced_up", "spliced_down"] {
        assert!(field(&line, dir) >= LEN / 10 * 9, "{dir}: {line}");
    }
    let scrape = gw.scrape();
    for dir in ["upstream", "downstream"] {
        let bytes = metric(
            &scrape,
            "portcullis_proxied_bytes_total",
            &[("service", "echo"), ("direction", dir)],
        );
        assert_eq!(bytes, Some(LEN as f64), "{dir}");
    }
}

#[test]
fn a_client_half_close_still_gets_the_whole_reply() {
    // The upstream reads the request to its end, then answers (enough to
    // splice) and closes.
    let reply = Pattern::new(3);
    let r = reply.clone();
    let addr = tcp_server("127.0.0.1:0", move |mut s| {
        let mut request = Vec::new();
        s.read_to_end(&mut request).unwrap();
        assert_eq!(request, b"GET everything");
        r.send(&mut s, 3 << 20).unwrap();
    });
    let gw = start(addr);

    let mut s = connect(&gw);
    s.write_all(b"GET everything").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(reply.receive(&mut s, "client"), 3 << 20);
    let line = closed(&gw, 1);
    assert_eq!(field(&line, "bytes_up"), 14);
    assert!(field(&line, "spliced_down") > 0, "{line}");
}

#[test]
fn an_upstream_half_close_still_carries_what_the_client_sends() {
    // The upstream greets, ends its side, then reads the client's upload.
    let (greeting, upload) = (Pattern::new(4), Pattern::new(5));
    let (report, reports) = mpsc::channel();
    let (g, u) = (greeting.clone(), upload.clone());
    let addr = tcp_server("127.0.0.1:0", move |mut s| {
        g.send(&mut s, 200_000).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        report.send(u.receive(&mut s, "upstream")).unwrap();
    });
    let gw = start(addr);

    let mut s = connect(&gw);
    assert_eq!(greeting.receive(&mut s, "client"), 200_000);
    // The client's side is still open: upload after the upstream's FIN.
    upload.send(&mut s, 2 << 20).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(reports.recv_timeout(PATIENCE).unwrap(), 2 << 20);
    let mut rest = [0u8; 1];
    assert_eq!(
        s.read(&mut rest).unwrap(),
        0,
        "the gateway did not close after both ends"
    );
    let line = closed(&gw, 1);
    assert_eq!(
        (field(&line, "bytes_up"), field(&line, "bytes_down")),
        (2 << 20, 200_000)
    );
}

#[test]
fn a_stream_that_starts_small_switches_to_splice_midway_and_stays_exact() {
    let gw = start(echo_server("127.0.0.1:0"));
    let mut s = connect(&gw);

    // Interactive first: 100 round trips of 100 bytes, below the threshold
    // (and each too small to splice anyway).
    for i in 0..100u8 {
        echo_once(&mut s, &[i; 100]).unwrap();
    }
    // Counted as the bytes flow, not when the connection ends. The upstream
    // count is complete: each echo left the gateway only after its request
    // was counted; the last echo back to the client may still be counting.
    let scrape = gw.scrape();
    let bytes = |dir| {
        metric(
            &scrape,
            "portcullis_proxied_bytes_total",
            &[("service", "echo"), ("direction", dir)],
        )
    };
    assert_eq!(bytes("upstream"), Some(10_000.0));
    assert!(bytes("downstream").unwrap() >= 9_900.0);

    // Then bulk through the same connection: it crosses the threshold and
    // turns to splice in the middle of the stream.
    const BULK: u64 = 32 << 20;
    let pattern = Pattern::new(6);
    let (mut w, p) = (s.try_clone().unwrap(), pattern.clone());
    let writer = std::thread::spawn(move || {
        p.send(&mut w, BULK).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    });
    assert_eq!(pattern.receive(&mut s, "client"), BULK);
    writer.join().unwrap();

    let line = closed(&gw, 1);
    let total = 10_000 + BULK;
    assert_eq!((field(&line, "bytes_up"), field(&line, "bytes_down")), (total, total));
    for (bytes, spliced) in [("bytes_up", "spliced_up"), ("bytes_down", "spliced_down")] {
        let copied = field(&line, bytes) - field(&line, spliced);
        assert!(field(&line, spliced) > 0, "{spliced}: never spliced: {line}");
        assert!(
            copied >= SPLICE_AFTER,
            "{spliced}: spliced before the threshold: {line}"
        );
    }
}

#[test]
fn five_hundred_short_connections_each_get_exactly_their_own_bytes() {
    const THREADS: usize = 10;
    const EACH: usize = 50;
    let gw = Arc::new(start(echo_server("127.0.0.1:0")));
    let pattern = Pattern::new(7);
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (gw, pattern) = (gw.clone(), pattern.clone());
            std::thread::spawn(move || {
                for c in 0..EACH {
                    let id = (t * EACH + c) as u64;
                    // Mostly small, every tenth past the splice threshold.
                    let len = if id % 10 == 9 {
                        100_000 + id as usize * 97
                    } else {
                        1 + (id as usize * 7919) % 20_000
                    };
                    let mut payload = id.to_be_bytes().to_vec();
                    let start = (id as usize * 7919) % (pattern.0.len() - len);
                    payload.extend_from_slice(&pattern.0[start..start + len]);
                    let mut s = connect(&gw);
                    let mut w = s.try_clone().unwrap();
                    let sent = payload.clone();
                    let writer = std::thread::spawn(move || {
                        w.write_all(&sent).unwrap();
                        w.shutdown(Shutdown::Write).unwrap();
                    });
                    let mut got = Vec::new();
                    s.read_to_end(&mut got).unwrap();
                    writer.join().unwrap();
                    assert!(got == payload, "connection {id} got other bytes");
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let last = closed(&gw, THREADS * EACH);
    assert_eq!(last["service"], "echo");
}

#[test]
fn an_upstream_reset_ends_the_client_connection() {
    let addr = tcp_server("127.0.0.1:0", |mut s| {
        let mut hello = [0u8; 5];
        s.read_exact(&mut hello).unwrap();
        s.write_all(b"bye").unwrap();
        socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO)).unwrap();
    });
    let gw = start(addr);
    let mut s = connect(&gw);
    s.write_all(b"hello").unwrap();
    // What the upstream sent before it reset may or may not make it; then
    // the connection ends, one way or the other, promptly.
    let mut got = Vec::new();
    match s.read_to_end(&mut got) {
        Ok(_) => {}
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}"),
    }
    assert!(b"bye".starts_with(&got), "{got:?}");
    gw.wait_for(|l| msg(l) == "connection ended with an error" || msg(l) == "connection closed");
}

#[test]
fn a_client_reset_ends_the_upstream_connection() {
    let (report, reports) = mpsc::channel();
    let addr = tcp_server("127.0.0.1:0", move |mut s| {
        let mut got = Vec::new();
        let end = s.read_to_end(&mut got).map(|_| ());
        report.send((got, end.map_err(|e| e.kind()))).unwrap();
    });
    let gw = start(addr);
    let mut s = connect(&gw);
    s.write_all(b"half a request").unwrap();
    // Wait until the upstream side exists, then abort.
    gw.wait_for(|l| msg(l) == "connection allowed");
    socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO)).unwrap();
    drop(s);
    let (got, end) = reports
        .recv_timeout(PATIENCE)
        .expect("the upstream connection was not ended");
    assert!(b"half a request".starts_with(&got), "{got:?}");
    assert!(matches!(end, Ok(()) | Err(ErrorKind::ConnectionReset)), "{end:?}");
    gw.wait_for(|l| msg(l) == "connection ended with an error" || msg(l) == "connection closed");
}
