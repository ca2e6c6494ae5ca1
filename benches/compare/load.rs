//! The peers the comparison talks through a proxy: small upstream servers
//! (tokio) and the clients that load them. Everything binds to loopback,
//! and every loop is bounded in count and in time.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream as StdTcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::timeout;

/// Size of the connection-rate test's request and of its response.
pub const REQUEST_LEN: usize = 40;

/// Longest any single network operation of a client may take.
const OP_TIMEOUT: Duration = Duration::from_secs(5);

/// Segment size the memory test's peers use, as on Ethernet: loopback's
/// 64 KiB segments would let the proxy's kernel send buffers grow to
/// several MiB per connection, far from what a real network allows.
pub const ETHERNET_MSS: u32 = 1460;

fn bind_listener(rt: &Handle, recv_buffer: Option<usize>, mss: Option<u32>) -> Result<TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    // Both are inherited by accepted sockets; set before listen() so the
    // window scale and the advertised segment size match.
    if let Some(size) = recv_buffer {
        socket.set_recv_buffer_size(size)?;
    }
    if let Some(mss) = mss {
        socket.set_mss(mss)?;
    }
    socket.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
    socket.listen(4096)?;
    socket.set_nonblocking(true)?;
    let _guard = rt.enter();
    Ok(TcpListener::from_std(socket.into())?)
}

/// Accepts forever, running `serve` on each connection; accept errors
/// (descriptor exhaustion) back off instead of ending the server.
fn spawn_server<F, Fut>(rt: &Handle, listener: TcpListener, serve: F)
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    rt.spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(serve(stream));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    });
}

/// Request/response server for the connection-rate test: reads a
/// [`REQUEST_LEN`]-byte request, answers as many bytes and closes first,
/// as an HTTP/1.0 server does. The server closing first leaves TIME_WAIT on
/// the server's side, so the clients' ephemeral ports never run out.
pub fn spawn_rr_server(rt: &Handle) -> Result<SocketAddr> {
    let listener = bind_listener(rt, None, None)?;
    let addr = listener.local_addr()?;
    spawn_server(rt, listener, |mut stream| async move {
        let mut req = [0u8; REQUEST_LEN];
        let Ok(Ok(_)) = timeout(OP_TIMEOUT, stream.read_exact(&mut req)).await else {
            return;
        };
        let _ = stream.write_all(&req).await;
    });
    Ok(addr)
}

/// Echo server: every byte read is written back; EOF is answered with EOF.
pub fn spawn_echo_server(rt: &Handle) -> Result<SocketAddr> {
    let listener = bind_listener(rt, None, None)?;
    let addr = listener.local_addr()?;
    spawn_server(rt, listener, |mut stream| async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if stream.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = stream.shutdown().await;
    });
    Ok(addr)
}

/// Upstream for the memory test: answers one byte with one byte, then
/// reads nothing until [`HoldServer::release`], so data sent afterwards
/// stays in flight. Its small receive buffer and [`ETHERNET_MSS`] keep that
/// data on the proxy's side. After release it reads to EOF.
pub struct HoldServer {
    pub addr: SocketAddr,
    open: Arc<AtomicUsize>,
    epoch: watch::Sender<u64>,
}

impl HoldServer {
    pub fn start(rt: &Handle) -> Result<HoldServer> {
        let listener = bind_listener(rt, Some(4096), Some(ETHERNET_MSS))?;
        let addr = listener.local_addr()?;
        let open = Arc::new(AtomicUsize::new(0));
        let (epoch, rx) = watch::channel(0u64);
        let counter = open.clone();
        spawn_server(rt, listener, move |mut stream| {
            let mut rx = rx.clone();
            let open = counter.clone();
            async move {
                open.fetch_add(1, Ordering::SeqCst);
                let born = *rx.borrow();
                let mut one = [0u8; 1];
                if stream.read_exact(&mut one).await.is_ok() && stream.write_all(&one).await.is_ok() {
                    let _ = rx.wait_for(|e| *e > born).await;
                    let mut sink = vec![0u8; 16 * 1024];
                    while let Ok(n) = stream.read(&mut sink).await {
                        if n == 0 {
                            break;
                        }
                    }
                }
                open.fetch_sub(1, Ordering::SeqCst);
            }
        });
        Ok(HoldServer { addr, open, epoch })
    }

    /// Connections the server holds open.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Lets every held connection read to EOF.
    pub fn release(&self) {
        self.epoch.send_modify(|e| *e += 1);
    }

    /// Waits until the server holds at most `n` connections.
    pub fn wait_open_at_most(&self, n: usize, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        while self.open() > n {
            if Instant::now() >= deadline {
                bail!("the upstream still holds {} connections after {limit:?}", self.open());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

/// Completed and failed operations over a measured time.
#[derive(Debug, Clone)]
pub struct Rate {
    pub ok: u64,
    pub failed: u64,
    pub elapsed: Duration,
    /// What went wrong first, when something did.
    pub first_error: Option<String>,
}

impl Rate {
    pub fn per_second(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }

    /// Fails when more than 1% of the operations (and more than 10) failed.
    pub fn check(&self, what: &str) -> Result<()> {
        if self.ok == 0 || (self.failed > 10 && self.failed * 100 > self.ok + self.failed) {
            bail!(
                "{what}: {} of {} operations failed (first: {})",
                self.failed,
                self.ok + self.failed,
                self.first_error.as_deref().unwrap_or("none")
            );
        }
        Ok(())
    }
}

/// Runs `clients` loops of `op` until `duration` has passed or `max` ops
/// were started.
async fn closed_loop<F, Fut>(clients: usize, duration: Duration, max: u64, op: F) -> Rate
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = std::result::Result<(), String>> + Send,
{
    let op = Arc::new(op);
    let started = Arc::new(AtomicU64::new(0));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None));
    let begin = Instant::now();
    let deadline = begin + duration;
    let mut set = JoinSet::new();
    for _ in 0..clients {
        let (op, started, ok, failed, first_error) = (
            op.clone(),
            started.clone(),
            ok.clone(),
            failed.clone(),
            first_error.clone(),
        );
        set.spawn(async move {
            while Instant::now() < deadline && started.fetch_add(1, Ordering::Relaxed) < max {
                match op().await {
                    Ok(()) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut first) = first_error.lock() {
                            first.get_or_insert(e);
                        }
                    }
                }
            }
        });
    }
    while set.join_next().await.is_some() {}
    let first_error = first_error.lock().ok().and_then(|mut f| f.take());
    Rate {
        ok: ok.load(Ordering::Relaxed),
        failed: failed.load(Ordering::Relaxed),
        elapsed: begin.elapsed(),
        first_error,
    }
}

/// Runs `once` under [`OP_TIMEOUT`], naming what failed.
async fn bounded<Fut>(once: Fut) -> std::result::Result<(), String>
where
    Fut: std::future::Future<Output = std::io::Result<std::result::Result<(), String>>>,
{
    match timeout(OP_TIMEOUT, once).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {OP_TIMEOUT:?}")),
    }
}

/// Connection rate: each of `clients` loops connect, send a 40-byte
/// request, read the 40-byte response and the server's EOF, close.
pub async fn connection_rate(target: SocketAddr, clients: usize, duration: Duration, max: u64) -> Rate {
    closed_loop(clients, duration, max, move || {
        bounded(async move {
            let mut s = TcpStream::connect(target).await?;
            s.set_nodelay(true)?;
            let req = [0x5a; REQUEST_LEN];
            s.write_all(&req).await?;
            let mut resp = [0u8; REQUEST_LEN];
            s.read_exact(&mut resp).await?;
            let mut rest = [0u8; 1];
            let n = s.read(&mut rest).await?;
            Ok(if resp != req {
                Err("the response differs from the request".to_string())
            } else if n != 0 {
                Err("bytes after the response".to_string())
            } else {
                Ok(())
            })
        })
    })
    .await
}

/// Refusal rate: `clients` loops connect from `source` (which holds no
/// grant) and count the gateway's reset or EOF. A byte coming back would
/// mean the connection was let through: a failure.
pub async fn refusal_rate(target: SocketAddr, source: IpAddr, clients: usize, duration: Duration, max: u64) -> Rate {
    closed_loop(clients, duration, max, move || {
        bounded(async move {
            let socket = TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(source, 0))?;
            let mut s = match socket.connect(target).await {
                Ok(s) => s,
                // The reset can beat the end of connect().
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return Ok(Ok(())),
                Err(e) => return Err(e),
            };
            let mut b = [0u8; 1];
            Ok(match s.read(&mut b).await {
                Ok(0) => Ok(()),
                Ok(_) => Err("a refused source got bytes back".to_string()),
                Err(e) if e.kind() == ErrorKind::ConnectionReset => Ok(()),
                Err(e) => Err(e.to_string()),
            })
        })
    })
    .await
}

/// Round-trip times (ns) of `n` 1-byte ping-pongs on one connection, after
/// `warmup` unmeasured ones. Blocking, on the calling thread.
pub fn ping_pong(target: SocketAddr, warmup: usize, n: usize) -> Result<Vec<u64>> {
    let mut s = StdTcpStream::connect_timeout(&target, OP_TIMEOUT)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(OP_TIMEOUT))?;
    let mut samples = Vec::with_capacity(n);
    let mut b = [0u8; 1];
    for i in 0..warmup + n {
        let t = Instant::now();
        s.write_all(&[i as u8])?;
        s.read_exact(&mut b)?;
        let rtt = t.elapsed();
        if b[0] != i as u8 {
            bail!("ping-pong: echo returned another byte");
        }
        if i >= warmup {
            samples.push(rtt.as_nanos() as u64);
        }
    }
    Ok(samples)
}

/// Opens `n` proxied connections with [`ETHERNET_MSS`] and completes one
/// 1-byte round trip on each, so each is established end to end; at most
/// `parallel` at once.
pub async fn open_idle(target: SocketAddr, n: usize, parallel: usize) -> Result<Vec<TcpStream>> {
    let permits = Arc::new(Semaphore::new(parallel));
    let mut set = JoinSet::new();
    for _ in 0..n {
        let permit = permits.clone().acquire_owned().await?;
        set.spawn(async move {
            let _permit = permit;
            let once = async {
                let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
                socket.set_mss(ETHERNET_MSS)?;
                socket.set_nonblocking(true)?;
                let mut s = TcpSocket::from_std_stream(socket.into()).connect(target).await?;
                s.set_nodelay(true)?;
                s.write_all(&[1]).await?;
                let mut b = [0u8; 1];
                s.read_exact(&mut b).await?;
                Ok::<TcpStream, std::io::Error>(s)
            };
            timeout(Duration::from_secs(10), once)
                .await
                .map_err(|_| anyhow!("timed out"))?
                .map_err(anyhow::Error::from)
        });
    }
    let mut streams = Vec::with_capacity(n);
    let mut first_error = None;
    while let Some(joined) = set.join_next().await {
        match joined? {
            Ok(s) => streams.push(s),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_error {
        bail!("{} of {n} idle connections failed: {e:#}", n - streams.len());
    }
    Ok(streams)
}

/// Writes up to `per_stream` bytes into each stream without waiting:
/// whatever the kernel and the proxy accept. Returns the bytes written.
pub fn fill(streams: &[TcpStream], per_stream: usize) -> u64 {
    let buf = vec![0x33u8; per_stream];
    let mut total = 0u64;
    for s in streams {
        let mut off = 0;
        while off < per_stream {
            match s.try_write(&buf[off..]) {
                Ok(0) | Err(_) => break,
                Ok(n) => off += n,
            }
        }
        total += off as u64;
    }
    total
}

/// A deterministic byte stream (xorshift64), so a receiver can check every
/// byte without keeping what was sent.
struct Pattern {
    state: u64,
    word: [u8; 8],
    used: usize,
}

impl Pattern {
    fn new(seed: u64) -> Pattern {
        Pattern {
            state: seed | 1,
            word: [0; 8],
            used: 8,
        }
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            if self.used == 8 {
                self.state ^= self.state << 13;
                self.state ^= self.state >> 7;
                self.state ^= self.state << 17;
                self.word = self.state.to_le_bytes();
                self.used = 0;
            }
            *b = self.word[self.used];
            self.used += 1;
        }
    }
}

/// Sends `bytes` of a pattern through `target` to an echo server, then
/// half-closes; checks that exactly those bytes come back, then EOF.
pub async fn echo_exact(target: SocketAddr, bytes: u64, seed: u64) -> Result<()> {
    let stream = TcpStream::connect(target).await.context("connect")?;
    let (mut rd, mut wr) = stream.into_split();
    let writer = tokio::spawn(async move {
        let mut pattern = Pattern::new(seed);
        let mut buf = vec![0u8; 64 * 1024];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            pattern.fill(&mut buf[..n]);
            wr.write_all(&buf[..n]).await?;
            left -= n as u64;
        }
        wr.shutdown().await?;
        Ok::<_, std::io::Error>(wr)
    });
    let check = async {
        let mut pattern = Pattern::new(seed);
        let mut buf = vec![0u8; 64 * 1024];
        let mut want = vec![0u8; 64 * 1024];
        let mut got = 0u64;
        loop {
            let n = rd.read(&mut buf).await.context("read")?;
            if n == 0 {
                break;
            }
            if got + n as u64 > bytes {
                bail!("more bytes came back than were sent");
            }
            pattern.fill(&mut want[..n]);
            if buf[..n] != want[..n] {
                bail!("the bytes at offset {got}.. differ from those sent");
            }
            got += n as u64;
        }
        if got != bytes {
            bail!("{got} of {bytes} bytes came back before EOF");
        }
        Ok(())
    };
    let limit = Duration::from_secs(60);
    timeout(limit, check)
        .await
        .map_err(|_| anyhow!("no EOF within {limit:?}"))??;
    timeout(limit, writer)
        .await
        .map_err(|_| anyhow!("the writer did not finish"))??
        .context("write")?;
    Ok(())
}

/// A UDP server that counts the datagrams it receives.
pub struct UdpSink {
    pub addr: SocketAddr,
    count: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl UdpSink {
    pub fn start() -> Result<UdpSink> {
        let socket = UdpSocket::bind("127.0.0.1:0")?;
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        let addr = socket.local_addr()?;
        let count = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (count.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !s.load(Ordering::Relaxed) {
                if socket.recv(&mut buf).is_ok() {
                    c.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        Ok(UdpSink { addr, count, stop })
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

impl Drop for UdpSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Sends `len`-byte datagrams to `target` from one socket as fast as it
/// can for `duration` (at most `max`); returns (sent, elapsed).
pub fn udp_blast(target: SocketAddr, len: usize, duration: Duration, max: u64) -> Result<(u64, Duration)> {
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    socket.connect(target)?;
    let payload = vec![0x42u8; len];
    let begin = Instant::now();
    let mut sent = 0u64;
    while sent < max {
        // The clock is read every 256 datagrams, not every one.
        if sent % 256 == 0 && begin.elapsed() >= duration {
            break;
        }
        if socket.send(&payload).is_ok() {
            sent += 1;
        }
    }
    Ok((sent, begin.elapsed()))
}

/// Sends `total` one-byte datagrams to `step`, rotating over `sources`
/// (addresses in 127.0.0.0/8). Returns the datagrams sent.
pub fn knock_flood(step: SocketAddr, sources: &[IpAddr], total: u64) -> Result<u64> {
    let sockets: Vec<UdpSocket> = sources
        .iter()
        .map(|ip| UdpSocket::bind(SocketAddr::new(*ip, 0)))
        .collect::<std::io::Result<_>>()?;
    let mut sent = 0u64;
    for i in 0..total {
        if sockets[(i % sockets.len() as u64) as usize].send_to(&[0], step).is_ok() {
            sent += 1;
        }
    }
    Ok(sent)
}

/// One connection from `source` to an echo `target` that carries a byte
/// there and back (a refused one does not).
pub fn echo_through(source: IpAddr, target: SocketAddr) -> bool {
    let attempt = || -> std::io::Result<bool> {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        socket.bind(&SocketAddr::new(source, 0).into())?;
        socket.connect_timeout(&target.into(), Duration::from_secs(1))?;
        let mut s: StdTcpStream = socket.into();
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(1)))?;
        s.write_all(&[0x77])?;
        let mut b = [0u8; 1];
        Ok(s.read(&mut b)? == 1 && b[0] == 0x77)
    };
    attempt().unwrap_or(false)
}

/// Pause between two attempts of [`time_to_open`].
const RETRY_PAUSE: Duration = Duration::from_micros(20);

/// Time from the start of `send` (the knock or SPA packet leaving
/// `source`) to the first connection from `source` that is let through to
/// the echo `target`, retrying [`RETRY_PAUSE`] after each refusal; bounded
/// by 2 s and 100k attempts.
///
/// The pause is what keeps the client from measuring itself: a refusal at
/// SYN (`closed` mode) costs the kernel a few microseconds, and a client
/// that retried at once kept a core busy in connect(2) while the gateway's
/// threads waited for it, one sample in twenty waiting for a scheduler
/// tick (4 ms at HZ=250) between two knock datagrams. The thread's timer
/// slack is set to 1 µs so the pause stays near 20 µs, which bounds what
/// it adds to a sample.
pub fn time_to_open(
    source: IpAddr,
    target: SocketAddr,
    send: impl FnOnce(&UdpSocket) -> Result<()>,
) -> Result<Duration> {
    // SAFETY: prctl(PR_SET_TIMERSLACK) takes an integer and touches only
    // the calling thread's timer slack.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong) };
    let socket = UdpSocket::bind(SocketAddr::new(source, 0))?;
    let begin = Instant::now();
    send(&socket)?;
    for _ in 0..100_000 {
        if echo_through(source, target) {
            return Ok(begin.elapsed());
        }
        if begin.elapsed() > Duration::from_secs(2) {
            break;
        }
        std::thread::sleep(RETRY_PAUSE);
    }
    bail!("{source} was not let through within 2s of its packets")
}

/// One HTTP/1.0 request (no chunked encoding) to the admin endpoint; the
/// body of a 2xx answer, an error naming the status line otherwise.
fn http(addr: SocketAddr, method: &str, path: &str, json: Option<&str>) -> Result<String> {
    let mut s = StdTcpStream::connect_timeout(&addr, OP_TIMEOUT)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(OP_TIMEOUT))?;
    let mut request = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n");
    if let Some(body) = json {
        request += &format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
    } else {
        request += "\r\n";
    }
    s.write_all(request.as_bytes())?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.lines().next().unwrap_or("");
    if !status
        .split_whitespace()
        .nth(1)
        .is_some_and(|code| code.starts_with('2'))
    {
        bail!(
            "{method} {path}: {}",
            if status.is_empty() { "no HTTP answer" } else { status }
        );
    }
    Ok(body.to_string())
}

/// `GET path`; returns the body.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    http(addr, "GET", path, None)
}

/// `DELETE path`; fails unless the answer is 2xx.
pub fn http_delete(addr: SocketAddr, path: &str) -> Result<()> {
    http(addr, "DELETE", path, None).map(drop)
}

/// `POST path` with a JSON `body`; fails unless the answer is 2xx.
pub fn http_post(addr: SocketAddr, path: &str, body: &str) -> Result<()> {
    http(addr, "POST", path, Some(body)).map(drop)
}

/// Whether a connection from `source` to `target` is refused at SYN (a
/// reset, as from a port nothing listens on).
pub fn refused_at_syn(source: IpAddr, target: SocketAddr) -> bool {
    let attempt = || -> std::io::Result<()> {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        socket.bind(&SocketAddr::new(source, 0).into())?;
        socket.connect_timeout(&target.into(), Duration::from_secs(1))
    };
    matches!(attempt(), Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
}

/// The sum of every sample of metric `name` in a Prometheus scrape.
pub fn metric_sum(scrape: &str, name: &str) -> f64 {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let series_name = series.split('{').next()?;
            (series_name == name).then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// Sends datagrams with a chosen IPv4 source: whole packets on a raw
/// socket (`IP_HDRINCL`, root only), or, without the privilege, from
/// sockets bound to a fixed set of loopback sources.
pub enum Forger {
    Raw(socket2::Socket, Vec<u8>),
    Bound(Vec<UdpSocket>),
}

impl Forger {
    /// A raw forger, or one bound to `fallback` sources.
    pub fn new(fallback: &[IpAddr]) -> Result<Forger> {
        let raw = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::RAW,
            Some(socket2::Protocol::from(libc::IPPROTO_RAW)),
        )
        .and_then(|s| s.set_header_included_v4(true).map(|()| s));
        match raw {
            Ok(s) => {
                let _ = s.set_send_buffer_size(4 << 20);
                Ok(Forger::Raw(s, Vec::with_capacity(1500)))
            }
            Err(_) => Ok(Forger::Bound(
                fallback
                    .iter()
                    .map(|ip| UdpSocket::bind(SocketAddr::new(*ip, 0)))
                    .collect::<std::io::Result<_>>()?,
            )),
        }
    }

    pub fn is_raw(&self) -> bool {
        matches!(self, Forger::Raw(..))
    }

    /// One datagram to `to`, "from" `source` (raw) or from the `n`-th
    /// bound socket; send failures are the flood's loss, not an error.
    pub fn send(&mut self, n: u64, source: std::net::Ipv4Addr, to: std::net::SocketAddrV4, payload: &[u8]) {
        match self {
            Forger::Raw(socket, b) => {
                let total = (28 + payload.len()) as u16;
                b.clear();
                b.extend_from_slice(&[0x45, 0]);
                b.extend_from_slice(&total.to_be_bytes());
                b.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
                b.extend_from_slice(&source.octets());
                b.extend_from_slice(&to.ip().octets());
                let mut sum: u32 = b.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], c[1]]))).sum();
                while sum > 0xffff {
                    sum = (sum & 0xffff) + (sum >> 16);
                }
                b[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
                b.extend_from_slice(&40_000u16.to_be_bytes());
                b.extend_from_slice(&to.port().to_be_bytes());
                b.extend_from_slice(&(total - 20).to_be_bytes());
                b.extend_from_slice(&[0, 0]);
                b.extend_from_slice(payload);
                let _ = socket.send_to(b, &SocketAddr::V4(to).into());
            }
            Forger::Bound(sockets) => {
                let _ = sockets[(n % sockets.len() as u64) as usize].send_to(payload, to);
            }
        }
    }
}
