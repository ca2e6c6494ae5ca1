//! Knock sequences: each UDP step is one datagram; each TCP step completes
//! the handshake and then resets the connection. A listener only sees a
//! knock once the handshake completes, which over a real network takes a
//! round trip that clients closing right after `connect()` never wait for.
//! Steps are spaced so they reach the gateway's gate in order ([`order`]).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, Context as _};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpSocket, UdpSocket};

use super::order::{self, Drained};
use crate::net;
use crate::step::{Proto, StepSpec};

/// How long a TCP knock waits for the handshake.
pub const TCP_KNOCK_TIMEOUT: Duration = Duration::from_secs(3);

/// A knock sequence to send.
#[derive(Debug, Clone)]
pub struct KnockPlan {
    pub host: String,
    pub steps: Vec<StepSpec>,
    /// A fixed pause between steps (`-d`), in place of the automatic gap
    /// around TCP steps; the wait for a local gateway to read each step
    /// still applies.
    pub delay: Option<Duration>,
    /// Local address to send from.
    pub bind: Option<IpAddr>,
}

/// One step as sent.
#[derive(Debug)]
pub struct Sent {
    pub target: SocketAddr,
    pub proto: Proto,
    /// A TCP step whose handshake failed, and why.
    pub failed: Option<String>,
}

/// Sends every step in order; `on_step` sees each as soon as it is sent.
/// A TCP step whose handshake fails is reported in its [`Sent`] and the
/// sequence goes on (the port may be watched without a listener); the
/// caller decides the exit status.
pub async fn knock(plan: &KnockPlan, mut on_step: impl FnMut(usize, &Sent)) -> anyhow::Result<Vec<Sent>> {
    let host = resolve(&plan.host, plan.bind).await?;
    let mut sent = Vec::with_capacity(plan.steps.len());
    for (i, step) in plan.steps.iter().enumerate() {
        let target = SocketAddr::new(step.ip.unwrap_or(host), step.port);
        let failed = match step.proto {
            Proto::Udp => {
                send_udp(target, plan.bind)
                    .await
                    .with_context(|| format!("udp knock to {target}"))?;
                None
            }
            Proto::Tcp => knock_tcp(target, plan.bind).await.err().map(|e| format!("{e:#}")),
        };
        let this = Sent {
            target,
            proto: step.proto,
            failed,
        };
        on_step(i, &this);
        sent.push(this);

        let next = plan.steps.get(i + 1);
        let around_tcp = step.proto == Proto::Tcp || next.is_some_and(|n| n.proto == Proto::Tcp);
        // After the last step too, so whatever follows (a connection to the
        // service) comes after the gateway has the whole sequence.
        let mut ordered = false;
        if (around_tcp || next.is_none())
            && order::is_local(target.ip())
            && order::wait_read(target, step.proto).await == Drained::Empty
        {
            tokio::time::sleep(order::LOCAL_SETTLE).await;
            ordered = true;
        }
        if next.is_some() {
            let gap = match plan.delay {
                Some(d) => d,
                None if around_tcp && !ordered => order::REMOTE_GAP,
                None => Duration::ZERO,
            };
            if !gap.is_zero() {
                tokio::time::sleep(gap).await;
            }
        }
    }
    Ok(sent)
}

/// The gateway's address: `host` as an address, or its first resolved
/// address of the bind address's family.
pub async fn resolve(host: &str, bind: Option<IpAddr>) -> anyhow::Result<IpAddr> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(ip);
    }
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, 0))
        .await
        .with_context(|| format!("cannot resolve {host}"))?
        .collect();
    let wanted = |a: &&SocketAddr| bind.is_none_or(|b| b.is_ipv4() == a.is_ipv4());
    match addrs.iter().find(wanted) {
        Some(a) => Ok(a.ip()),
        None => bail!("{host} has no address of the family of the bind address"),
    }
}

/// The local address to send to `target` from.
pub fn local(target: SocketAddr, bind: Option<IpAddr>) -> SocketAddr {
    match bind {
        Some(ip) => SocketAddr::new(ip, 0),
        None if target.is_ipv4() => SocketAddr::from(([0, 0, 0, 0], 0)),
        None => SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0)),
    }
}

async fn send_udp(target: SocketAddr, bind: Option<IpAddr>) -> anyhow::Result<()> {
    let socket = UdpSocket::bind(local(target, bind)).await?;
    socket.send_to(&[0u8], target).await?;
    Ok(())
}

async fn knock_tcp(target: SocketAddr, bind: Option<IpAddr>) -> anyhow::Result<()> {
    match connect_tcp(target, bind, TCP_KNOCK_TIMEOUT).await {
        Ok(stream) => {
            net::reset(stream);
            Ok(())
        }
        // The gateway accepts a knock and resets it at once; on loopback
        // that can happen before this side has looked at its socket. A
        // reset (not a refusal) means the handshake completed.
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionReset) =>
        {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// A TCP connection to `target` from `bind` (any port), within `timeout`.
pub async fn connect_tcp(
    target: SocketAddr,
    bind: Option<IpAddr>,
    timeout: Duration,
) -> anyhow::Result<tokio::net::TcpStream> {
    let socket = Socket::new(Domain::for_address(target), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    if bind.is_some() {
        socket
            .bind(&local(target, bind).into())
            .with_context(|| format!("cannot bind {}", local(target, bind)))?;
    }
    let socket = TcpSocket::from_std_stream(socket.into());
    let stream = tokio::time::timeout(timeout, socket.connect(target))
        .await
        .context("timed out")??;
    Ok(stream)
}
