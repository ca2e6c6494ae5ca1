//! What a TCP service knows about its sources beyond grants: the load
//! balancers whose connections open with a PROXY protocol header (and
//! whether to send one upstream), and the static lists that admit or
//! refuse a source whatever its grants.
//!
//! Validation only: the proxy reads the header and applies the lists.

use std::net::IpAddr;

use ipnet::IpNet;

use super::raw::RawService;
use super::{Unauthorized, Validator};
use crate::step::Proto;

/// A PROXY protocol version (`send_proxy_protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyVersion {
    /// The text header (`PROXY TCP4 ...\r\n`).
    V1,
    /// The binary header.
    V2,
}

impl ProxyVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyVersion::V1 => "v1",
            ProxyVersion::V2 => "v2",
        }
    }
}

/// A service's PROXY protocol settings and static source lists; all empty
/// by default.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SourceRules {
    /// Peers (load balancers) whose connections must start with a PROXY
    /// header naming the real source; other peers are their own source.
    pub accept_proxy_protocol: Vec<IpNet>,
    /// The header to open each upstream connection with, if any.
    pub send_proxy_protocol: Option<ProxyVersion>,
    /// Sources admitted without a grant.
    pub allow_always: Vec<IpNet>,
    /// Sources refused even with a grant (this list wins over the others).
    pub deny_always: Vec<IpNet>,
}

impl SourceRules {
    /// Whether a connection from `peer` must open with a PROXY header.
    pub fn expects_header(&self, peer: IpAddr) -> bool {
        contains(&self.accept_proxy_protocol, peer)
    }

    pub fn always_allowed(&self, source: IpAddr) -> bool {
        contains(&self.allow_always, source)
    }

    pub fn always_denied(&self, source: IpAddr) -> bool {
        contains(&self.deny_always, source)
    }
}

fn contains(nets: &[IpNet], addr: IpAddr) -> bool {
    let addr = addr.to_canonical();
    nets.iter().any(|n| n.contains(&addr))
}

/// Parses an address or CIDR block (`"10.0.0.0/8"`, `"::1"`).
fn cidr(text: &str) -> Option<IpNet> {
    let text = text.trim();
    text.parse::<IpNet>()
        .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
        .ok()
        .map(|n| n.trunc())
}

impl Validator {
    pub(super) fn source_rules(
        &mut self,
        base: &str,
        raw: &RawService,
        protocol: Proto,
        mode: Unauthorized,
    ) -> SourceRules {
        let mut lists = [
            ("accept_proxy_protocol", &raw.accept_proxy_protocol, Vec::new()),
            ("allow_always", &raw.allow_always, Vec::new()),
            ("deny_always", &raw.deny_always, Vec::new()),
        ];
        for (key, texts, nets) in &mut lists {
            if protocol == Proto::Udp && !texts.is_empty() {
                self.problem(format!("{base}.{key}"), "TCP services only: remove it");
                continue;
            }
            for (i, text) in texts.iter().enumerate() {
                match cidr(text) {
                    Some(net) => nets.push(net),
                    None => self.problem(
                        format!("{base}.{key}[{i}]"),
                        format!("{text:?} is not an address or CIDR block (e.g. \"10.0.0.0/8\" or \"fd00::/8\")"),
                    ),
                }
            }
        }
        let [(_, _, accept), (_, _, allow), (_, _, deny)] = lists;
        let send = match raw.send_proxy_protocol.as_deref().map(str::trim) {
            None => None,
            Some(_) if protocol == Proto::Udp => {
                self.problem(format!("{base}.send_proxy_protocol"), "TCP services only: remove it");
                None
            }
            Some("v1") => Some(ProxyVersion::V1),
            Some("v2") => Some(ProxyVersion::V2),
            Some(other) => {
                self.problem(
                    format!("{base}.send_proxy_protocol"),
                    format!("{other:?} is not a PROXY protocol version: use \"v1\" or \"v2\" (or leave it out)"),
                );
                None
            }
        };
        // The kernel decides before any byte is read in these modes, on the
        // address it sees: a header's source, or a source listed here that
        // holds no grant, never reaches userspace.
        if mode == Unauthorized::Dark && !accept.is_empty() {
            self.problem(
                format!("{base}.accept_proxy_protocol"),
                "dark mode's kernel filter sees the balancer's address, never the header's: use unauthorized = \"closed\", \"refuse\" or \"blackhole\" behind a balancer",
            );
        }
        if matches!(mode, Unauthorized::Closed | Unauthorized::Dark) && !allow.is_empty() {
            self.problem(
                format!("{base}.allow_always"),
                format!(
                    "a {} service is unreachable to a source without a grant (the kernel answers for it), so it cannot admit one: use unauthorized = \"refuse\" or \"blackhole\"",
                    mode.as_str()
                ),
            );
        }
        SourceRules {
            accept_proxy_protocol: accept,
            send_proxy_protocol: send,
            allow_always: allow,
            deny_always: deny,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(accept: &[&str], allow: &[&str], deny: &[&str]) -> SourceRules {
        let nets = |l: &[&str]| l.iter().map(|t| cidr(t).unwrap()).collect();
        SourceRules {
            accept_proxy_protocol: nets(accept),
            send_proxy_protocol: None,
            allow_always: nets(allow),
            deny_always: nets(deny),
        }
    }

    #[test]
    fn lists_match_by_prefix_in_both_families_and_v4_mapped_sources_count_as_v4() {
        let r = rules(&["10.0.0.0/8", "fd00::/8"], &["127.0.0.5"], &["192.168.1.7/32"]);
        for (addr, want) in [
            ("10.1.2.3", true),
            ("11.0.0.1", false),
            ("fd12::1", true),
            ("fe80::1", false),
            ("::ffff:10.9.9.9", true),
        ] {
            assert_eq!(r.expects_header(addr.parse().unwrap()), want, "{addr}");
        }
        assert!(r.always_allowed("127.0.0.5".parse().unwrap()));
        assert!(!r.always_allowed("127.0.0.6".parse().unwrap()));
        assert!(r.always_denied("192.168.1.7".parse().unwrap()));
    }

    #[test]
    fn host_bits_are_dropped_and_bare_addresses_are_single_hosts() {
        assert_eq!(cidr(" 10.1.2.3/8 "), Some("10.0.0.0/8".parse().unwrap()));
        assert_eq!(cidr("::1"), Some("::1/128".parse().unwrap()));
        for bad in ["10.0.0.0/33", "ten", "", "10.0.0.0/"] {
            assert_eq!(cidr(bad), None, "{bad:?}");
        }
    }
}
