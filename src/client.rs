//! The client commands: `knock` sends a knock sequence, `spa` one Single
//! Packet Authorization packet.
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
use crate::spa::keyfile::KeyFile;
use crate::spa::{fwknop, native, Fields};
use crate::step::{Proto, StepSpec};

/// Pause after a TCP step unless `-d` says otherwise. The gateway learns
/// of a TCP knock when it accepts the connection, and accepts on several
/// listeners are not ordered the way UDP datagrams are (by kernel receive
/// timestamps); a short gap keeps back-to-back TCP steps in order.
pub const TCP_STEP_GAP: Duration = Duration::from_millis(10);

/// How long a TCP knock waits for the handshake.
pub const TCP_KNOCK_TIMEOUT: Duration = Duration::from_secs(3);

/// A knock sequence to send.
#[derive(Debug, Clone)]
pub struct KnockPlan {
    pub host: String,
    pub steps: Vec<StepSpec>,
    /// Pause between steps; `None` means [`TCP_STEP_GAP`] after a TCP
    /// step and none after a UDP step.
    pub delay: Option<Duration>,
    /// Local address to send from.
    pub bind: Option<IpAddr>,
}

/// Sends every step in order. A TCP step whose handshake fails is reported
/// and the sequence goes on (the port may be watched without a listener).
pub async fn knock(plan: &KnockPlan) -> anyhow::Result<Vec<SocketAddr>> {
    let host = resolve(&plan.host, plan.bind).await?;
    let mut sent = Vec::with_capacity(plan.steps.len());
    for (i, step) in plan.steps.iter().enumerate() {
        if i > 0 {
            let gap = plan.delay.unwrap_or(match plan.steps[i - 1].proto {
                Proto::Tcp => TCP_STEP_GAP,
                Proto::Udp => Duration::ZERO,
            });
            if !gap.is_zero() {
                tokio::time::sleep(gap).await;
            }
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

/// One SPA packet to send.
#[derive(Debug)]
pub struct SpaPlan {
    pub host: String,
    pub port: u16,
    pub fields: Fields,
    pub keys: KeyFile,
    /// Send the fwknop format, with this user name.
    pub fwknop_user: Option<String>,
    pub bind: Option<IpAddr>,
}

/// Builds the packet `plan` describes (timestamped `now_unix`).
pub fn build_spa(plan: &SpaPlan) -> anyhow::Result<Vec<u8>> {
    let mut rng = rand::rng();
    match &plan.fwknop_user {
        Some(user) => {
            let keys = plan
                .keys
                .fwknop
                .as_ref()
                .context("the key file has no fwknop keys (KEY_BASE64 and HMAC_KEY_BASE64)")?;
            if keys.hmac().is_none() {
                bail!("the key file has no HMAC_KEY_BASE64: the gateway refuses packets without HMAC");
            }
            Ok(fwknop::encode_random(user, &plan.fields, keys, &mut rng)?.into_bytes())
        }
        None => {
            let key = plan
                .keys
                .native
                .as_ref()
                .context("the key file has no native key (PORTCULLIS_KEY_BASE64); use --fwknop for fwknop keys")?;
            Ok(native::encode_random(key, &plan.fields, &mut rng)?)
        }
    }
}

/// Sends `packet` to the plan's gateway; returns where it went.
pub async fn send_spa(plan: &SpaPlan, packet: &[u8]) -> anyhow::Result<SocketAddr> {
    let host = resolve(&plan.host, plan.bind).await?;
    let target = SocketAddr::new(host, plan.port);
    let socket = UdpSocket::bind(local(target, plan.bind)).await?;
    socket
        .send_to(packet, target)
        .await
        .with_context(|| format!("sending to {target}"))?;
    Ok(target)
}
