//! The `knock` command: sends a knock sequence.
//!
//! UDP steps send one datagram each. TCP steps complete the handshake and
//! then reset the connection: a listener only sees a knock once the
//! handshake completes, which over a real network takes a round trip that
//! clients closing right after `connect()` never wait for.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, Context as _};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpSocket, UdpSocket};

use crate::net;
use crate::step::{Proto, StepSpec};

/// How long a TCP knock waits for the handshake.
pub const TCP_KNOCK_TIMEOUT: Duration = Duration::from_secs(3);

/// A knock sequence to send.
#[derive(Debug, Clone)]
pub struct KnockPlan {
    pub host: String,
    pub steps: Vec<StepSpec>,
    pub delay: Duration,
    /// Local address to send from.
    pub bind: Option<IpAddr>,
}

/// Sends every step in order. A TCP step whose handshake fails is reported
/// and the sequence goes on (the port may be watched without a listener).
pub async fn knock(plan: &KnockPlan) -> anyhow::Result<Vec<SocketAddr>> {
    let host = resolve(&plan.host, plan.bind).await?;
    let mut sent = Vec::with_capacity(plan.steps.len());
    for (i, step) in plan.steps.iter().enumerate() {
        if i > 0 && !plan.delay.is_zero() {
            tokio::time::sleep(plan.delay).await;
        }
        let target = SocketAddr::new(step.ip.unwrap_or(host), step.port);
        match step.proto {
            Proto::Udp => send_udp(target, plan.bind)
                .await
                .with_context(|| format!("udp knock to {target}"))?,
            Proto::Tcp => {
                if let Err(e) = knock_tcp(target, plan.bind).await {
                    tracing::warn!(%target, error = %e, "tcp knock did not complete its handshake");
                }
            }
        }
        sent.push(target);
    }
    Ok(sent)
}

async fn resolve(host: &str, bind: Option<IpAddr>) -> anyhow::Result<IpAddr> {
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

fn local(target: SocketAddr, bind: Option<IpAddr>) -> SocketAddr {
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
    let socket = Socket::new(Domain::for_address(target), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    if bind.is_some() {
        socket.bind(&local(target, bind).into())?;
    }
    let socket = TcpSocket::from_std_stream(socket.into());
    let stream = tokio::time::timeout(TCP_KNOCK_TIMEOUT, socket.connect(target))
        .await
        .context("timed out")??;
    net::reset(stream);
    Ok(())
}
