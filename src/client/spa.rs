//! SPA packets on the client side: build one from a plan, describe it
//! (never its keys), send it.

use std::net::{IpAddr, SocketAddr};

use anyhow::{bail, Context as _};
use tokio::net::UdpSocket;

use super::knock::{local, resolve};
use super::order::{self, Drained};
use crate::spa::keyfile::KeyFile;
use crate::spa::{fwknop, native, Fields};

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

/// Whether the plan's key file holds the keys its format needs.
pub fn check_keys(plan: &SpaPlan) -> anyhow::Result<()> {
    match &plan.fwknop_user {
        Some(_) => {
            let keys = plan
                .keys
                .fwknop
                .as_ref()
                .context("the key file has no fwknop keys (KEY_BASE64 and HMAC_KEY_BASE64)")?;
            if keys.hmac().is_none() {
                bail!("the key file has no HMAC_KEY_BASE64: the gateway refuses packets without HMAC");
            }
        }
        None => {
            if plan.keys.native.is_none() {
                bail!("the key file has no native key (PORTCULLIS_KEY_BASE64); use --fwknop for fwknop keys");
            }
        }
    }
    Ok(())
}

/// Builds the packet `plan` describes.
pub fn build_spa(plan: &SpaPlan) -> anyhow::Result<Vec<u8>> {
    check_keys(plan)?;
    let mut rng = rand::rng();
    match (&plan.fwknop_user, &plan.keys.fwknop, &plan.keys.native) {
        (Some(user), Some(keys), _) => Ok(fwknop::encode_random(user, &plan.fields, keys, &mut rng)?.into_bytes()),
        (None, _, Some(key)) => Ok(native::encode_random(key, &plan.fields, &mut rng)?),
        _ => bail!("the key file has no key for this format"),
    }
}

/// What `spa -v` and `spa -T` print: every field the packet carries,
/// and nothing of the keys.
pub fn describe(plan: &SpaPlan, packet_len: usize) -> String {
    let access: Vec<String> = plan
        .fields
        .access
        .iter()
        .map(|(p, port)| format!("{p}/{port}"))
        .collect();
    let user = match &plan.fwknop_user {
        Some(u) => format!("{u} (fwknop format)"),
        None => "identified by the key (native format)".to_string(),
    };
    let allow = plan
        .fields
        .allow_ip
        .map_or("the packet's source".to_string(), |ip| ip.to_string());
    let when = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(plan.fields.timestamp),
    );
    let host = match plan.host.parse::<IpAddr>() {
        Ok(ip) => SocketAddr::new(ip, plan.port).to_string(),
        Err(_) => format!("{}:{}", plan.host, plan.port),
    };
    let mut text = format!(
        "spa to {host}\n  user:      {user}\n  access:    {}\n  allow-ip:  {allow}\n  timestamp: {} ({when})\n",
        access.join(","),
        plan.fields.timestamp,
    );
    if let Some(d) = plan.fields.duration {
        text += &format!("  duration:  {}s\n", d.as_secs());
    }
    text += &format!("  size:      {packet_len} bytes\n");
    text
}

/// The packet as printable text: fwknop packets are base64 already,
/// native ones are encoded here.
pub fn printable(plan: &SpaPlan, packet: &[u8]) -> String {
    use base64::Engine as _;
    match plan.fwknop_user {
        Some(_) => String::from_utf8_lossy(packet).into_owned(),
        None => base64::engine::general_purpose::STANDARD.encode(packet),
    }
}

/// Sends `packet` to the plan's gateway; returns where it went. A gateway
/// on this host is given the time to read it, so a connection made right
/// after finds the grant.
pub async fn send_spa(plan: &SpaPlan, packet: &[u8]) -> anyhow::Result<SocketAddr> {
    let host = resolve(&plan.host, plan.bind).await?;
    let target = SocketAddr::new(host, plan.port);
    let socket = UdpSocket::bind(local(target, plan.bind)).await?;
    socket
        .send_to(packet, target)
        .await
        .with_context(|| format!("sending to {target}"))?;
    if order::is_local(host) && order::wait_read(target, crate::step::Proto::Udp).await == Drained::Empty {
        tokio::time::sleep(order::LOCAL_SETTLE).await;
    }
    Ok(target)
}

/// The address this host uses towards `host` (`allow_ip = "resolve"`):
/// the right grant address when nothing rewrites it on the way. No
/// outside service is asked.
pub async fn route_source(host: &str, port: u16, bind: Option<IpAddr>) -> anyhow::Result<IpAddr> {
    let ip = resolve(host, bind).await?;
    let target = SocketAddr::new(ip, port);
    let socket = UdpSocket::bind(local(target, bind)).await?;
    socket
        .connect(target)
        .await
        .with_context(|| format!("no route to {target}"))?;
    Ok(socket.local_addr()?.ip())
}
