//! Knock steps: a transport protocol and a port (optionally an address).
//!
//! One parser serves the config file and the `knock` client, and accepts
//! every spelling users bring from other tools: our `7000/udp`, the stock
//! knock client's `7000:udp`, fwknop's `udp/7000`, and a bare `7000`
//! meaning TCP. An address may precede the port: `127.0.0.1:7000/udp`,
//! `[::1]:7000/udp`.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

/// Transport protocol of a knock step or a guarded service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// Stable lowercase name, also used as a metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Proto {
    type Err = StepError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            _ => Err(StepError::Proto(s.to_string())),
        }
    }
}

/// Why a step could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StepError {
    #[error("unknown protocol {0:?}: use tcp or udp")]
    Proto(String),
    #[error("{0:?} is not a port, ADDR:PORT or [IPv6]:PORT (write steps as 7000/udp, 7000:udp or udp/7000)")]
    Port(String),
    #[error("port 0 cannot be a knock step")]
    Zero,
}

/// A step as written: a port with an optional address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StepSpec {
    pub proto: Proto,
    pub ip: Option<IpAddr>,
    pub port: u16,
}

impl StepSpec {
    /// The endpoint this step listens on, taking the address from
    /// `default_ip` when the step names none.
    pub fn at(self, default_ip: IpAddr) -> Step {
        Step {
            proto: self.proto,
            addr: SocketAddr::new(self.ip.unwrap_or(default_ip), self.port),
        }
    }
}

impl FromStr for StepSpec {
    type Err = StepError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (proto, rest) = split_proto(s)?;
        let (ip, port) = match rest.parse::<u16>() {
            Ok(port) => (None, port),
            Err(_) => match rest.parse::<SocketAddr>() {
                Ok(addr) => (Some(addr.ip()), addr.port()),
                Err(_) => return Err(StepError::Port(rest.to_string())),
            },
        };
        if port == 0 {
            return Err(StepError::Zero);
        }
        Ok(StepSpec { proto, ip, port })
    }
}

fn split_proto(s: &str) -> Result<(Proto, &str), StepError> {
    let lower = s.to_ascii_lowercase();
    for proto in [Proto::Tcp, Proto::Udp] {
        let name = proto.as_str();
        if lower.ends_with(&format!("/{name}")) || lower.ends_with(&format!(":{name}")) {
            return Ok((proto, &s[..s.len() - name.len() - 1]));
        }
        if lower.starts_with(&format!("{name}/")) {
            return Ok((proto, &s[name.len() + 1..]));
        }
    }
    if let Some((_, suffix)) = s.rsplit_once('/') {
        return Err(StepError::Proto(suffix.to_string()));
    }
    Ok((Proto::Tcp, s))
}

impl fmt::Display for StepSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip {
            Some(ip) => write!(f, "{}/{}", SocketAddr::new(ip, self.port), self.proto),
            None => write!(f, "{}/{}", self.port, self.proto),
        }
    }
}

/// A knock endpoint: where a sensor listens and what the gate matches on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Step {
    pub proto: Proto,
    pub addr: SocketAddr,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.proto)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling_parses() {
        let udp = |port| StepSpec {
            proto: Proto::Udp,
            ip: None,
            port,
        };
        let cases: &[(&str, StepSpec)] = &[
            ("7000/udp", udp(7000)),
            ("7000:udp", udp(7000)),
            ("udp/7000", udp(7000)),
            ("UDP/7000", udp(7000)),
            (
                "7000",
                StepSpec {
                    proto: Proto::Tcp,
                    ip: None,
                    port: 7000,
                },
            ),
            (
                "7000/tcp",
                StepSpec {
                    proto: Proto::Tcp,
                    ip: None,
                    port: 7000,
                },
            ),
            (
                "127.0.0.2:7000/udp",
                StepSpec {
                    proto: Proto::Udp,
                    ip: Some("127.0.0.2".parse().unwrap()),
                    port: 7000,
                },
            ),
            (
                "[::1]:7000:udp",
                StepSpec {
                    proto: Proto::Udp,
                    ip: Some("::1".parse().unwrap()),
                    port: 7000,
                },
            ),
        ];
        for (text, want) in cases {
            assert_eq!(text.parse::<StepSpec>().as_ref(), Ok(want), "{text}");
        }
    }

    #[test]
    fn bad_steps_are_rejected() {
        for bad in ["", "7000/icmp", "x/7000", "70000/udp", "0/udp", "host:7000/udp"] {
            assert!(bad.parse::<StepSpec>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn display_round_trips() {
        for text in ["7000/udp", "127.0.0.2:7000/tcp", "[::1]:9/udp"] {
            let spec: StepSpec = text.parse().unwrap();
            assert_eq!(spec.to_string(), text);
        }
    }
}
