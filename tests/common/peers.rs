//! The real peers tests talk to: echo upstreams, clients bound to distinct
//! 127.x.y.z sources, curl, psql and promtool.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::ip;

/// A TCP server on `addr` (port 0 allowed) that runs `handler` on each
/// connection in a thread of its own; returns its address.
pub fn tcp_server(addr: &str, handler: impl Fn(TcpStream) + Send + Sync + 'static) -> SocketAddr {
    let listener = TcpListener::bind(addr).expect("bind a test server");
    let local = listener.local_addr().unwrap();
    let handler = std::sync::Arc::new(handler);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let handler = handler.clone();
            std::thread::spawn(move || handler(stream));
        }
    });
    local
}

/// Echoes what `stream` sends until it ends.
pub fn echo_back(stream: &mut TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
}

/// A TCP echo server on `addr` (port 0 allowed); returns its address.
pub fn echo_server(addr: &str) -> SocketAddr {
    tcp_server(addr, |mut stream| echo_back(&mut stream))
}

/// Connects to `to` from `source` (any port).
pub fn connect_from(source: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let domain = socket2::Domain::for_address(to);
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::new(ip(source), 0).into())?;
    socket.connect_timeout(&to.into(), Duration::from_secs(5))?;
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    Ok(stream)
}

/// One round trip through an echo upstream.
pub fn echo_once(stream: &mut TcpStream, payload: &[u8]) -> std::io::Result<()> {
    stream.write_all(payload)?;
    let mut got = vec![0u8; payload.len()];
    stream.read_exact(&mut got)?;
    assert_eq!(got, payload, "echo returned other bytes");
    Ok(())
}

/// Whether `source` can open a connection to `to` and get an echo back.
pub fn echo_works(source: &str, to: SocketAddr) -> bool {
    match connect_from(source, to) {
        Ok(mut s) => echo_once(&mut s, b"ping").is_ok(),
        Err(_) => false,
    }
}

/// Sends one UDP datagram from `source` to `to`.
pub fn udp_from(source: &str, to: SocketAddr, payload: &[u8]) {
    let socket = UdpSocket::bind(SocketAddr::new(ip(source), 0)).expect("bind udp");
    socket.send_to(payload, to).expect("send udp");
}

/// An HTTP answer: status 0 when there was none (refused, TLS failure).
#[derive(Debug)]
pub struct Http {
    pub status: u16,
    pub body: String,
}

/// Runs `curl -sS ARGS URL` and returns the answer.
pub fn curl(args: &[&str], url: &str) -> Http {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"])
        .args(args)
        .arg(url)
        .output()
        .expect("curl (apt-get install curl; scripts/install-test-deps does it)");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    let status = code.trim().parse().unwrap_or(0);
    let body = if status == 0 {
        String::from_utf8_lossy(&out.stderr).into_owned()
    } else {
        body.to_string()
    };
    Http { status, body }
}

/// Runs `promtool` with `args` and `stdin`; returns (success, output).
pub fn promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; scripts/install-test-deps installs it)");
    {
        let mut input = child.stdin.take().expect("stdin piped");
        if let Some(text) = stdin {
            input.write_all(text.as_bytes()).expect("write to promtool");
        }
    }
    let out = child.wait_with_output().expect("promtool output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Where the PostgreSQL the tests front listens.
pub fn pg_upstream() -> String {
    std::env::var("PORTCULLIS_TEST_PG").unwrap_or_else(|_| "127.0.0.1:5432".to_string())
}

/// Runs `sql` with `psql` as `postgres` through 127.0.0.1:`port`; its
/// trimmed output, or its error text.
pub fn psql(port: u16, sql: &str) -> Result<String, String> {
    let out = Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-tAc",
            sql,
        ])
        .env("PGCONNECT_TIMEOUT", "5")
        .output()
        .expect("psql (apt-get install postgresql-client; scripts/install-test-deps does it)");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}
