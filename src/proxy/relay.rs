//! The data path of a proxied connection: bytes both ways between the
//! client and the upstream, until both directions end or one fails.
//!
//! Each direction runs in bursts. A burst starts when its source turns
//! readable and ends when the source would block (the direction goes idle),
//! at the end of the stream, or on an error; whatever a burst holds (a
//! buffer, a pipe) is released when it ends, so an idle connection holds
//! neither. A burst starts by copying through a [`SMALL_BUFFER`]. Once the
//! direction has carried [`SPLICE_AFTER`] bytes, a read that fills that
//! buffer (more is waiting: this burst is bulk) moves the rest of the burst
//! to `splice(2)` through a pipe from the pool (socket -> pipe -> socket,
//! no copy through userspace), or, when no pipe can be had or `splice`
//! does not work here, to a [`LARGE_BUFFER`]. Small messages on a
//! long-lived connection thus keep the cheaper copy, and only bulk bursts
//! take a pipe.
//!
//! A burst reads only once the previous read has been delivered, so a
//! failure never strands bytes that were already read: a read error ends
//! the connection with nothing pending, and the end of a stream is passed
//! on (`shutdown(Write)`) only after everything before it. Bytes are
//! counted as they are delivered, once per chunk.
//!
//! Idleness costs the data path nothing: [`idle`] watches the meters'
//! byte counts (which the path keeps anyway) from a timer of its own that
//! wakes a few times per idle timeout, instead of every chunk re-arming a
//! deadline.
//!
//! Readiness: every read and write goes through tokio's `try_*`/`try_io`,
//! which clear the socket's readiness on `EAGAIN`, and a pipe is only
//! filled when empty, so an `EAGAIN` from splicing in always means the
//! socket, never the pipe, is not ready.

use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use socket2::SockRef;
use tokio::net::TcpStream;

use super::pipes::Pipes;

/// The buffer of a direction that has not proven to be bulk: an idle
/// connection holds none, a busy one at most this much per direction.
pub const SMALL_BUFFER: usize = 8 * 1024;

/// The buffer of a bulk direction that cannot splice (the pipe pool is
/// exhausted, or `splice` does not work here). It stays small: a burst
/// holds it while the destination is not reading, and with 1,000
/// connections to a stalled upstream and the pool exhausted, 64 KiB here
/// came to 58 KiB of RSS per connection (benches/compare, memory rows).
pub const LARGE_BUFFER: usize = 16 * 1024;

/// Bytes a direction carries through its small buffer before its bulk
/// bursts splice, so that short connections never touch a pipe. Measured
/// through the release binary on loopback (gateway CPU per connection
/// downloading 64 KiB / 256 KiB / 1 MiB): 122 / 154 / 325 us with 16 KiB,
/// about the same with 0, but 172 / 216 / 435 us with 64 KiB and 164 / 360
/// / 1285 us never splicing. Small messages cost the same with every
/// value, since bursts that do not fill [`SMALL_BUFFER`] are never spliced.
pub const SPLICE_AFTER: u64 = 16 * 1024;

/// Counts the bytes one direction delivers, as it delivers them.
#[derive(Debug)]
pub struct Meter {
    counter: metrics::Counter,
    bytes: AtomicU64,
    spliced: AtomicU64,
    buffered: AtomicUsize,
}

impl Meter {
    /// A meter that adds to `counter` too (e.g. a Prometheus counter).
    pub fn new(counter: metrics::Counter) -> Self {
        Self {
            counter,
            bytes: AtomicU64::new(0),
            spliced: AtomicU64::new(0),
            buffered: AtomicUsize::new(0),
        }
    }

    /// Bytes delivered so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Of [`Meter::bytes`], those moved with `splice(2)`.
    pub fn spliced(&self) -> u64 {
        self.spliced.load(Ordering::Relaxed)
    }

    /// Userspace buffer the direction holds now, in bytes.
    pub fn buffered(&self) -> usize {
        self.buffered.load(Ordering::Relaxed)
    }

    fn delivered(&self, n: usize, spliced: bool) {
        let n = n as u64;
        self.bytes.fetch_add(n, Ordering::Relaxed);
        if spliced {
            self.spliced.fetch_add(n, Ordering::Relaxed);
        }
        self.counter.increment(n);
    }

    /// Allocates a buffer of `size` bytes, accounted until it is dropped.
    fn buffer(&self, size: usize) -> Buffer<'_> {
        self.buffered.fetch_add(size, Ordering::Relaxed);
        Buffer {
            bytes: Vec::with_capacity(size),
            size,
            meter: self,
        }
    }
}

struct Buffer<'a> {
    bytes: Vec<u8>,
    size: usize,
    meter: &'a Meter,
}

impl Drop for Buffer<'_> {
    fn drop(&mut self) {
        self.meter.buffered.fetch_sub(self.size, Ordering::Relaxed);
    }
}

/// Moves bytes both ways until both directions have ended (each end of
/// stream passed on as a half-close) or one fails; the caller closes both
/// sockets then. `up` counts what goes from the client to the upstream.
pub async fn relay(
    client: &TcpStream,
    upstream: &TcpStream,
    pipes: &Pipes,
    up: &Meter,
    down: &Meter,
) -> io::Result<()> {
    tokio::try_join!(
        one_way(client, upstream, pipes, up),
        one_way(upstream, client, pipes, down)
    )?;
    Ok(())
}

/// Checks of the byte counts per idle timeout: a connection is closed
/// after `limit` to `limit * (1 + 1 / IDLE_CHECKS)` without a byte.
pub const IDLE_CHECKS: u32 = 4;

/// Returns once neither `up` nor `down` has delivered a byte for `limit`
/// (to a quarter more; see [`IDLE_CHECKS`]); without a limit, never.
pub async fn idle(limit: Option<Duration>, up: &Meter, down: &Meter) {
    let Some(limit) = limit else {
        return std::future::pending().await;
    };
    let every = limit / IDLE_CHECKS;
    let moved = || up.bytes().wrapping_add(down.bytes());
    let mut seen = moved();
    let mut quiet = 0;
    while quiet < IDLE_CHECKS {
        tokio::time::sleep(every).await;
        let now = moved();
        if now == seen {
            quiet += 1;
        } else {
            (seen, quiet) = (now, 0);
        }
    }
}

/// How a burst ended.
#[derive(Debug, PartialEq, Eq)]
enum Burst {
    /// The source would block; everything read was delivered.
    Idle,
    /// The source ended; everything read was delivered.
    End,
    /// Everything read so far was delivered, more is waiting, and it should
    /// move another way: the burst proved bulk, or splicing turned out not
    /// to work.
    Bulk,
}

async fn one_way(from: &TcpStream, to: &TcpStream, pipes: &Pipes, meter: &Meter) -> io::Result<()> {
    loop {
        from.readable().await?;
        // Bursts are boxed: their state (several hundred bytes of nested
        // futures) then exists only while data moves, not while idle.
        let mut burst = Box::pin(copy(from, to, meter, SMALL_BUFFER, Some(SPLICE_AFTER))).await?;
        if burst == Burst::Bulk {
            burst = match pipes.lease() {
                Some(pipe) => Box::pin(spliced::burst(from, to, pipe, pipes, meter)).await?,
                None => Box::pin(copy(from, to, meter, LARGE_BUFFER, None)).await?,
            };
        }
        if burst == Burst::End {
            return SockRef::from(to).shutdown(std::net::Shutdown::Write);
        }
    }
}

/// A burst through a userspace buffer of `size` bytes. With `bulk_after`,
/// it ends as [`Burst::Bulk`] at a read that fills the buffer once the
/// direction has delivered that many bytes.
async fn copy(
    from: &TcpStream,
    to: &TcpStream,
    meter: &Meter,
    size: usize,
    bulk_after: Option<u64>,
) -> io::Result<Burst> {
    let mut buf = meter.buffer(size);
    loop {
        // Bounded bursts: a source that never runs dry must not keep the
        // worker thread from the other tasks.
        tokio::task::coop::consume_budget().await;
        buf.bytes.clear();
        let n = match from.try_read_buf(&mut buf.bytes) {
            Ok(0) => return Ok(Burst::End),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Burst::Idle),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        write_all(to, &buf.bytes, meter).await?;
        if n == buf.bytes.capacity() && bulk_after.is_some_and(|at| meter.bytes() >= at) {
            return Ok(Burst::Bulk);
        }
    }
}

async fn write_all(to: &TcpStream, mut data: &[u8], meter: &Meter) -> io::Result<()> {
    while !data.is_empty() {
        match to.try_write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                meter.delivered(n, false);
                data = &data[n..];
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => to.writable().await?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(target_os = "linux")]
mod spliced {
    use std::io;
    use std::os::fd::AsFd;

    use tokio::io::Interest;
    use tokio::net::TcpStream;

    use super::{write_all, Burst, Meter, LARGE_BUFFER};
    use crate::proxy::pipes::{Lease, Pipes};
    use crate::sys;

    /// Whether a `splice` error means it does not work with these files
    /// (rather than that this connection failed).
    fn unsupported(e: &io::Error) -> bool {
        matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP))
    }

    fn give_up(pipes: &Pipes, e: &io::Error) {
        if !pipes.is_disabled() {
            pipes.disable();
            tracing::warn!(error = %e, "splice(2) does not work here; copying in userspace");
        }
    }

    /// A burst through `pipe`: fill it from the socket only when it is
    /// empty, then drain it into the destination.
    pub(super) async fn burst(
        from: &TcpStream,
        to: &TcpStream,
        mut pipe: Lease<'_>,
        pipes: &Pipes,
        meter: &Meter,
    ) -> io::Result<Burst> {
        loop {
            tokio::task::coop::consume_budget().await;
            let filled = from.try_io(Interest::READABLE, || {
                sys::splice(from.as_fd(), pipe.write_end(), pipe.capacity())
            });
            match filled {
                Ok(0) => return Ok(Burst::End),
                Ok(n) => pipe.filled(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Burst::Idle),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if unsupported(&e) => {
                    give_up(pipes, &e);
                    return Ok(Burst::Bulk);
                }
                Err(e) => return Err(e),
            }
            while pipe.held() > 0 {
                let drained = to.try_io(Interest::WRITABLE, || {
                    sys::splice(pipe.read_end(), to.as_fd(), pipe.held())
                });
                match drained {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => {
                        pipe.drained(n);
                        meter.delivered(n, true);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => to.writable().await?,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if unsupported(&e) => {
                        give_up(pipes, &e);
                        flush_by_hand(to, &mut pipe, meter).await?;
                        return Ok(Burst::Bulk);
                    }
                    Err(e) => return Err(e),
                }
            }
        }
    }

    /// Delivers what `pipe` holds by reading it into userspace.
    pub(super) async fn flush_by_hand(to: &TcpStream, pipe: &mut Lease<'_>, meter: &Meter) -> io::Result<()> {
        let mut buf = meter.buffer(LARGE_BUFFER);
        buf.bytes.resize(LARGE_BUFFER, 0);
        while pipe.held() > 0 {
            let want = pipe.held().min(LARGE_BUFFER);
            // The pipe holds bytes, so this read neither blocks nor ends.
            let n = sys::read(pipe.read_end(), &mut buf.bytes[..want])?;
            if n == 0 {
                return Err(io::Error::other("a pipe said to hold bytes was empty"));
            }
            pipe.drained(n);
            write_all(to, &buf.bytes[..n], meter).await?;
        }
        Ok(())
    }
}

#[cfg(not(target_os = "linux"))]
mod spliced {
    use std::io;

    use tokio::net::TcpStream;

    use super::{Burst, Meter};
    use crate::proxy::pipes::{Lease, Pipes};

    /// Never called: off Linux the pool lends no pipes.
    pub(super) async fn burst(
        _from: &TcpStream,
        _to: &TcpStream,
        _pipe: Lease<'_>,
        pipes: &Pipes,
        _meter: &Meter,
    ) -> io::Result<Burst> {
        pipes.disable();
        Ok(Burst::Bulk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::task::JoinHandle;

    /// Both ends of a loopback TCP connection.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(listener.local_addr().unwrap()), listener.accept());
        (a.unwrap(), b.unwrap().0)
    }

    /// `len` bytes that differ with `seed` and with their position.
    fn pattern(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    struct Relay {
        /// The client's end, and the upstream's.
        client: TcpStream,
        upstream: TcpStream,
        up: Arc<Meter>,
        down: Arc<Meter>,
        /// The upstream counter of `up`, as a metrics recorder would see it.
        up_counter: Arc<AtomicU64>,
        task: JoinHandle<io::Result<()>>,
    }

    /// A relay between two fresh connections, run in a task of its own
    /// that closes both of its sockets when the relay ends.
    async fn start(pipes: &Pipes) -> Relay {
        let (client, near_client) = pair().await;
        let (near_upstream, upstream) = pair().await;
        let up_counter = Arc::new(AtomicU64::new(0));
        let up = Arc::new(Meter::new(metrics::Counter::from_arc(up_counter.clone())));
        let down = Arc::new(Meter::new(metrics::Counter::noop()));
        let (pipes, m_up, m_down) = (pipes.clone(), up.clone(), down.clone());
        let task = tokio::spawn(async move { relay(&near_client, &near_upstream, &pipes, &m_up, &m_down).await });
        Relay {
            client,
            upstream,
            up,
            down,
            up_counter,
            task,
        }
    }

    /// Writes `data`, then ends the stream; reads the other way to its end.
    async fn send_and_receive(stream: TcpStream, data: Vec<u8>) -> Vec<u8> {
        let (mut r, mut w) = stream.into_split();
        let writer = tokio::spawn(async move {
            w.write_all(&data).await.unwrap();
            w.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        got
    }

    /// Every pipe is back in the pool and empty.
    fn assert_pipes_back_and_empty(pipes: &Pipes) {
        assert_eq!(pipes.idle(), pipes.live(), "a pipe was not given back");
        let leases: Vec<_> = (0..pipes.live())
            .map(|_| pipes.lease().expect("a pooled pipe"))
            .collect();
        for lease in &leases {
            assert_eq!(
                crate::sys::pending(lease.read_end()).unwrap(),
                0,
                "a pooled pipe holds bytes"
            );
        }
    }

    #[tokio::test]
    async fn a_small_exchange_copies_without_a_pipe_and_idles_without_a_buffer() {
        let pipes = Pipes::new(4, super::super::pipes::PIPE_SIZE);
        let mut r = start(&pipes).await;
        r.client.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        r.upstream.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        r.upstream.write_all(b"pong!").await.unwrap();
        let mut got = [0u8; 5];
        r.client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"pong!");

        // Counted as they flowed, before the connection ends.
        assert_eq!((r.up.bytes(), r.down.bytes()), (4, 5));
        assert_eq!(r.up_counter.load(Ordering::Relaxed), 4);
        // Idle: each direction went back to waiting with nothing held.
        assert_eq!((r.up.buffered(), r.down.buffered()), (0, 0));
        assert_eq!(pipes.live(), 0, "a small exchange took a pipe");

        drop(r.client);
        let mut rest = Vec::new();
        r.upstream.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        drop(r.upstream);
        r.task.await.unwrap().unwrap();
        assert_eq!((r.up.spliced(), r.down.spliced()), (0, 0));
    }

    #[tokio::test]
    async fn a_bulk_direction_switches_to_splice_after_the_threshold_and_stays_exact() {
        let pipes = Pipes::new(4, super::super::pipes::PIPE_SIZE);
        let r = start(&pipes).await;
        let data = pattern(1, 8 << 20);
        let (got, back) = tokio::join!(
            send_and_receive(r.upstream, Vec::new()),
            send_and_receive(r.client, data.clone())
        );
        assert!(got == data, "bytes changed on the way");
        assert!(back.is_empty());
        r.task.await.unwrap().unwrap();

        assert_eq!(r.up.bytes(), data.len() as u64);
        assert_eq!(r.up_counter.load(Ordering::Relaxed), data.len() as u64);
        let copied = r.up.bytes() - r.up.spliced();
        assert!(r.up.spliced() > 0, "never spliced");
        assert!(copied >= SPLICE_AFTER, "spliced before the threshold: copied {copied}");
        assert!(pipes.live() >= 1);
        assert_pipes_back_and_empty(&pipes);
    }

    #[tokio::test]
    async fn after_a_bulk_transfer_small_messages_are_copied_not_spliced() {
        let pipes = Pipes::new(4, super::super::pipes::PIPE_SIZE);
        let mut r = start(&pipes).await;
        let bulk = pattern(10, 1 << 20);
        let (sent, mut got) = (bulk.clone(), vec![0u8; bulk.len()]);
        let (w, rd) = tokio::join!(r.client.write_all(&sent), r.upstream.read_exact(&mut got));
        w.unwrap();
        rd.unwrap();
        assert!(got == bulk);
        let spliced = r.up.spliced();
        assert!(spliced > 0, "the bulk transfer was not spliced");

        for i in 0..50u8 {
            r.client.write_all(&[i; 100]).await.unwrap();
            let mut msg = [0u8; 100];
            r.upstream.read_exact(&mut msg).await.unwrap();
            assert_eq!(msg, [i; 100]);
        }
        assert_eq!(r.up.spliced(), spliced, "a small message was spliced");
        assert_eq!(r.up.bytes(), bulk.len() as u64 + 5000);
    }

    #[tokio::test]
    async fn both_ways_at_once_with_one_pipe_splice_one_way_and_copy_the_other() {
        let pipes = Pipes::new(1, super::super::pipes::PIPE_SIZE);
        let r = start(&pipes).await;
        let (a, b) = (pattern(2, 6 << 20), pattern(3, 5 << 20));
        let (got_by_upstream, got_by_client) = tokio::join!(
            send_and_receive(r.upstream, b.clone()),
            send_and_receive(r.client, a.clone())
        );
        assert!(got_by_upstream == a, "upstream got other bytes");
        assert!(got_by_client == b, "client got other bytes");
        r.task.await.unwrap().unwrap();
        assert_eq!((r.up.bytes(), r.down.bytes()), (a.len() as u64, b.len() as u64));
        assert!(r.up.spliced() + r.down.spliced() > 0, "the one pipe was never used");
        assert!(pipes.live() <= 1);
        assert_pipes_back_and_empty(&pipes);
    }

    #[tokio::test]
    async fn without_pipes_bulk_copies_through_userspace_exactly() {
        let pipes = Pipes::none();
        let r = start(&pipes).await;
        let (a, b) = (pattern(4, 3 << 20), pattern(5, 3 << 20));
        let (got_by_upstream, got_by_client) = tokio::join!(
            send_and_receive(r.upstream, b.clone()),
            send_and_receive(r.client, a.clone())
        );
        assert!(got_by_upstream == a && got_by_client == b, "bytes changed on the way");
        r.task.await.unwrap().unwrap();
        assert_eq!((r.up.spliced(), r.down.spliced()), (0, 0));
    }

    #[tokio::test]
    async fn a_client_half_close_reaches_the_upstream_and_the_reply_still_flows() {
        let pipes = Pipes::new(4, super::super::pipes::PIPE_SIZE);
        let mut r = start(&pipes).await;
        r.client.write_all(b"request").await.unwrap();
        r.client.shutdown().await.unwrap();
        let mut request = Vec::new();
        r.upstream.read_to_end(&mut request).await.unwrap();
        assert_eq!(request, b"request");

        // Large enough to splice: the reply crosses the threshold.
        let reply = pattern(6, 2 << 20);
        let (mut ur, mut uw) = r.upstream.into_split();
        let reply_sent = reply.clone();
        let writer = tokio::spawn(async move {
            uw.write_all(&reply_sent).await.unwrap();
            uw.shutdown().await.unwrap();
            uw
        });
        let mut got = Vec::new();
        r.client.read_to_end(&mut got).await.unwrap();
        assert!(got == reply, "the reply changed on the way");
        let _uw = writer.await.unwrap();
        r.task.await.unwrap().unwrap();
        assert!(r.down.spliced() > 0);
        assert_eq!(ur.read(&mut [0u8; 1]).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn an_upstream_half_close_reaches_the_client_and_the_client_still_sends() {
        let pipes = Pipes::new(4, super::super::pipes::PIPE_SIZE);
        let mut r = start(&pipes).await;
        let greeting = pattern(7, 300_000);
        r.upstream.write_all(&greeting).await.unwrap();
        r.upstream.shutdown().await.unwrap();
        let mut got = Vec::new();
        r.client.read_to_end(&mut got).await.unwrap();
        assert!(got == greeting, "the greeting changed on the way");

        let upload = pattern(8, 1 << 20);
        r.client.write_all(&upload).await.unwrap();
        r.client.shutdown().await.unwrap();
        let mut got = Vec::new();
        r.upstream.read_to_end(&mut got).await.unwrap();
        assert!(got == upload, "the upload changed on the way");
        r.task.await.unwrap().unwrap();
        assert_pipes_back_and_empty(&pipes);
    }

    #[tokio::test]
    async fn an_error_one_way_ends_the_connection_both_ways() {
        let pipes = Pipes::new(4, super::super::pipes::PIPE_SIZE);
        let mut r = start(&pipes).await;
        r.client.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        r.upstream.read_exact(&mut got).await.unwrap();
        // The upstream aborts: a reset instead of a FIN.
        SockRef::from(&r.upstream)
            .set_linger(Some(std::time::Duration::ZERO))
            .unwrap();
        drop(r.upstream);
        let ended = r.task.await.unwrap();
        assert!(ended.is_err(), "a reset passed for an orderly end");
        // The relay closed the client's connection too.
        let n = r.client.read(&mut [0u8; 16]).await.unwrap();
        assert_eq!(n, 0);
    }

    #[tokio::test]
    async fn a_pipe_is_flushed_by_hand_when_splice_cannot_write() {
        let pipes = Pipes::new(1, super::super::pipes::PIPE_SIZE);
        let (mut peer, near) = pair().await;
        let meter = Meter::new(metrics::Counter::noop());
        let mut lease = pipes.lease().expect("a pipe");
        let data = pattern(9, 100_000);
        let n = crate::sys::write(lease.write_end(), &data).unwrap();
        assert_eq!(n, data.len());
        lease.filled(n);
        spliced::flush_by_hand(&near, &mut lease, &meter).await.unwrap();
        assert_eq!(lease.held(), 0);
        drop(lease);
        assert_eq!(pipes.idle(), 1, "an emptied pipe goes back to the pool");
        drop(near);
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.unwrap();
        assert!(got == data);
        assert_eq!(meter.bytes(), data.len() as u64);
        assert_eq!(meter.buffered(), 0);
    }

    #[tokio::test]
    async fn idleness_ends_only_with_a_limit_and_only_after_it() {
        let (up, down) = (
            Meter::new(metrics::Counter::noop()),
            Meter::new(metrics::Counter::noop()),
        );
        let never = tokio::time::timeout(std::time::Duration::from_millis(300), idle(None, &up, &down)).await;
        assert!(never.is_err(), "no limit, yet idle");
        let limit = std::time::Duration::from_millis(200);
        let timer = tokio::time::Instant::now();
        tokio::time::timeout(std::time::Duration::from_secs(15), idle(Some(limit), &up, &down))
            .await
            .expect("silent meters never went idle");
        assert!(timer.elapsed() >= limit, "idle after {:?}", timer.elapsed());
    }

    #[tokio::test]
    async fn an_idle_connection_costs_little_memory() {
        let (a, b) = pair().await;
        let pipes = Pipes::none();
        let meter = Meter::new(metrics::Counter::noop());
        let future = relay(&a, &b, &pipes, &meter, &meter);
        // An idle relay is its future and nothing else: buffers and pipes
        // come and go with bursts (checked above), and the bursts' own
        // state is boxed. 592 bytes on x86_64 with tokio 1.54.
        let size = std::mem::size_of_val(&future);
        assert!(size <= 768, "the relay's future takes {size} bytes");
    }
}
