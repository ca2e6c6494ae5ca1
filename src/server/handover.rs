//! Which sockets a config needs, and how a new config takes over the
//! running one's: a pure [`Plan`] (keep, bind, close) with one binding
//! function used at start and at reload alike.
//!
//! A socket is kept when the new config wants the same endpoint: a guarded
//! service with the same protocol and listen address (and the same name
//! when the port is 0, since "any port" of one service is not another's),
//! a knock step on the same address, or the SPA port at the same
//! configured address. Keeping a socket keeps the connections waiting in
//! its backlog.
//!
//! With the raw sensor, knock steps and the SPA port are not bound: one
//! [`Endpoint::Raw`] stands for the sensor's raw sockets instead.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::{TcpListener, UdpSocket};

use crate::config::{Config, Service};
use crate::net;
use crate::sensor::raw::{self, RawSockets};
use crate::step::{Proto, Step};

/// One socket a config needs, as the config names it (port 0 included).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Endpoint {
    Guarded {
        service: Arc<str>,
        proto: Proto,
        listen: SocketAddr,
    },
    Knock(Step),
    Spa(SocketAddr),
    /// A TCP listener for SPA packets over a stream: `fwknop -P tcp`, or
    /// with `http`, `fwknop -P http`.
    SpaStream {
        addr: SocketAddr,
        http: bool,
    },
    /// The raw sensor's sockets, which see every knock step and the SPA
    /// port without binding them.
    Raw,
}

impl Endpoint {
    /// Whether a socket bound for `self` can serve `wanted`.
    fn serves(&self, wanted: &Endpoint) -> bool {
        match (self, wanted) {
            (
                Endpoint::Guarded { service, proto, listen },
                Endpoint::Guarded {
                    service: s,
                    proto: p,
                    listen: l,
                },
            ) => proto == p && listen == l && (service == s || l.port() != 0),
            (a, b) => a == b,
        }
    }
}

/// A bound socket.
#[derive(Debug)]
pub enum Socket {
    /// A guarded TCP service's socket: bound, registered with the runtime
    /// only by the service task (which decides when it listens: see
    /// `door`), so it is kept as a std socket between tasks.
    Guarded(std::net::TcpListener),
    /// A TCP knock step's listener.
    Tcp(TcpListener),
    Udp(Arc<UdpSocket>),
    Raw(RawSockets),
}

impl Socket {
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match self {
            Socket::Guarded(l) => l.local_addr(),
            Socket::Tcp(l) => l.local_addr(),
            Socket::Udp(s) => s.local_addr(),
            Socket::Raw(_) => Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "the raw sensor has no address",
            )),
        }
    }
}

/// Every endpoint `config` needs, each with the config key it comes from
/// (for error messages). Steps shared by several services appear once.
/// With the `raw` sensor, knock steps and the SPA port are left to it.
pub fn endpoints(config: &Config, raw: bool) -> Vec<(Endpoint, String)> {
    let mut out = Vec::new();
    for s in &config.services {
        out.push((guarded(s), format!("service.{}.listen", s.name)));
    }
    // Opt-in, visible listeners: bound whichever sensor runs.
    if let Some(spa) = &config.spa {
        for (addr, http, key) in [
            (spa.tcp_listen, false, "spa.tcp_listen"),
            (spa.http_listen, true, "spa.http_listen"),
        ] {
            if let Some(addr) = addr {
                out.push((Endpoint::SpaStream { addr, http }, key.to_owned()));
            }
        }
    }
    if raw {
        out.push((Endpoint::Raw, "gateway.sensor".to_owned()));
        return out;
    }
    let mut steps: BTreeMap<Step, String> = BTreeMap::new();
    for s in &config.services {
        if let Some(rule) = &s.knock {
            for step in &rule.sequence {
                steps
                    .entry(*step)
                    .or_insert_with(|| format!("service.{}.knock.sequence", s.name));
            }
            for step in &rule.trap {
                steps
                    .entry(*step)
                    .or_insert_with(|| format!("service.{}.knock.trap_ports", s.name));
            }
        }
        for step in s.totp.iter().flat_map(|t| &t.pool) {
            steps
                .entry(*step)
                .or_insert_with(|| format!("service.{}.knock.totp.ports", s.name));
        }
    }
    out.extend(steps.into_iter().map(|(step, path)| (Endpoint::Knock(step), path)));
    if let Some(spa) = &config.spa {
        out.push((Endpoint::Spa(spa.listen), "spa.listen".to_owned()));
    }
    out
}

/// The endpoint of a guarded service.
pub fn guarded(service: &Service) -> Endpoint {
    Endpoint::Guarded {
        service: service.name.clone(),
        proto: service.protocol,
        listen: service.listen,
    }
}

/// How a new config takes over the running one's sockets.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Wanted endpoint, and the running endpoint whose socket it takes.
    pub keep: Vec<(Endpoint, Endpoint)>,
    /// Wanted endpoints that need a new socket.
    pub bind: Vec<Endpoint>,
    /// Running endpoints nothing takes over.
    pub close: Vec<Endpoint>,
}

/// Plans the handover from `running` to `wanted`. A running socket serves
/// at most one wanted endpoint; one with the same name is preferred.
pub fn plan(running: &[Endpoint], wanted: &[Endpoint]) -> Plan {
    let mut free: Vec<&Endpoint> = running.iter().collect();
    let mut plan = Plan::default();
    for w in wanted {
        let exact = free.iter().position(|r| *r == w);
        match exact.or_else(|| free.iter().position(|r| r.serves(w))) {
            Some(i) => plan.keep.push((w.clone(), free.swap_remove(i).clone())),
            None => plan.bind.push(w.clone()),
        }
    }
    plan.close = free.into_iter().cloned().collect();
    plan.close.sort();
    plan
}

/// Binds one endpoint the way its kind needs.
fn bind(endpoint: &Endpoint) -> std::io::Result<Socket> {
    Ok(match endpoint {
        Endpoint::Guarded {
            proto: Proto::Tcp,
            listen,
            ..
        } => Socket::Guarded(net::bind_tcp_unlistened(*listen)?),
        Endpoint::Guarded {
            proto: Proto::Udp,
            listen,
            ..
        } => Socket::Udp(Arc::new(net::bind_udp(*listen)?)),
        Endpoint::Knock(Step {
            proto: Proto::Tcp,
            addr,
        }) => Socket::Tcp(net::bind_tcp(*addr)?),
        Endpoint::Knock(Step {
            proto: Proto::Udp,
            addr,
        }) => Socket::Udp(Arc::new(net::bind_udp_timestamped(*addr)?)),
        Endpoint::Spa(addr) => Socket::Udp(Arc::new(net::bind_udp_sensor(*addr)?)),
        Endpoint::SpaStream { addr, .. } => Socket::Tcp(net::bind_tcp(*addr)?),
        Endpoint::Raw => Socket::Raw(raw::open().map_err(|e| match e {
            raw::OpenError::Io(e) => e,
            e => std::io::Error::new(std::io::ErrorKind::PermissionDenied, e),
        })?),
    })
}

/// Binds every endpoint in `which`, naming the config key of the first
/// that fails. Nothing is bound on error (what was bound is closed).
pub fn bind_all(which: &[Endpoint], paths: &[(Endpoint, String)]) -> anyhow::Result<HashMap<Endpoint, Socket>> {
    let mut bound = HashMap::with_capacity(which.len());
    for e in which {
        let socket = bind(e).with_context(|| {
            let path = paths
                .iter()
                .find(|(p, _)| p == e)
                .map_or("?", |(_, path)| path.as_str());
            match e {
                Endpoint::Guarded { listen, .. } => format!("cannot listen on {path} ({listen})"),
                Endpoint::Knock(step) => format!("cannot listen on {step} from {path}"),
                Endpoint::Spa(addr) | Endpoint::SpaStream { addr, .. } => format!("cannot listen on {path} ({addr})"),
                Endpoint::Raw => format!("cannot open the raw sensor ({path})"),
            }
        })?;
        bound.insert(e.clone(), socket);
    }
    Ok(bound)
}

/// Puts together the sockets of the wanted endpoints: those the plan keeps
/// come from `running`, the others from `fresh`. A kept socket that did not
/// come back (its task died) is bound again.
pub fn assemble(
    plan: &Plan,
    mut running: HashMap<Endpoint, Socket>,
    mut fresh: HashMap<Endpoint, Socket>,
    paths: &[(Endpoint, String)],
) -> anyhow::Result<HashMap<Endpoint, Socket>> {
    let mut out = HashMap::with_capacity(plan.keep.len() + plan.bind.len());
    for (wanted, old) in &plan.keep {
        let socket = match running.remove(old) {
            Some(s) => s,
            None => bind_all(std::slice::from_ref(wanted), paths)?
                .remove(wanted)
                .expect("bind_all binds what it is asked"),
        };
        out.insert(wanted.clone(), socket);
    }
    for wanted in &plan.bind {
        let socket = match fresh.remove(wanted) {
            Some(s) => s,
            None => bind_all(std::slice::from_ref(wanted), paths)?
                .remove(wanted)
                .expect("bind_all binds what it is asked"),
        };
        out.insert(wanted.clone(), socket);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(service: &str, listen: &str) -> Endpoint {
        Endpoint::Guarded {
            service: service.into(),
            proto: Proto::Tcp,
            listen: listen.parse().unwrap(),
        }
    }

    fn udp(service: &str, listen: &str) -> Endpoint {
        Endpoint::Guarded {
            service: service.into(),
            proto: Proto::Udp,
            listen: listen.parse().unwrap(),
        }
    }

    fn knock(port: u16, proto: Proto) -> Endpoint {
        Endpoint::Knock(Step {
            proto,
            addr: ([0, 0, 0, 0], port).into(),
        })
    }

    fn spa(addr: &str) -> Endpoint {
        Endpoint::Spa(addr.parse().unwrap())
    }

    #[test]
    fn handover_plans() {
        struct Case {
            name: &'static str,
            running: Vec<Endpoint>,
            wanted: Vec<Endpoint>,
            keep: Vec<(Endpoint, Endpoint)>,
            bind: Vec<Endpoint>,
            close: Vec<Endpoint>,
        }
        let cases = vec![
            Case {
                name: "start: everything is bound",
                running: vec![],
                wanted: vec![tcp("pg", "0.0.0.0:5432"), knock(7000, Proto::Udp), spa("0.0.0.0:62201")],
                keep: vec![],
                bind: vec![tcp("pg", "0.0.0.0:5432"), knock(7000, Proto::Udp), spa("0.0.0.0:62201")],
                close: vec![],
            },
            Case {
                name: "unchanged config keeps every socket",
                running: vec![tcp("pg", "0.0.0.0:5432"), knock(7000, Proto::Udp), spa("0.0.0.0:62201")],
                wanted: vec![tcp("pg", "0.0.0.0:5432"), knock(7000, Proto::Udp), spa("0.0.0.0:62201")],
                keep: vec![
                    (tcp("pg", "0.0.0.0:5432"), tcp("pg", "0.0.0.0:5432")),
                    (knock(7000, Proto::Udp), knock(7000, Proto::Udp)),
                    (spa("0.0.0.0:62201"), spa("0.0.0.0:62201")),
                ],
                bind: vec![],
                close: vec![],
            },
            Case {
                name: "a renamed service on a fixed port keeps its socket",
                running: vec![tcp("pg", "0.0.0.0:5432")],
                wanted: vec![tcp("postgres", "0.0.0.0:5432")],
                keep: vec![(tcp("postgres", "0.0.0.0:5432"), tcp("pg", "0.0.0.0:5432"))],
                bind: vec![],
                close: vec![],
            },
            Case {
                name: "port 0 is kept by the same service only",
                running: vec![tcp("a", "127.0.0.1:0")],
                wanted: vec![tcp("b", "127.0.0.1:0"), tcp("a", "127.0.0.1:0")],
                keep: vec![(tcp("a", "127.0.0.1:0"), tcp("a", "127.0.0.1:0"))],
                bind: vec![tcp("b", "127.0.0.1:0")],
                close: vec![],
            },
            Case {
                name: "a service that changes protocol gets a new socket",
                running: vec![tcp("dns", "0.0.0.0:53")],
                wanted: vec![udp("dns", "0.0.0.0:53")],
                keep: vec![],
                bind: vec![udp("dns", "0.0.0.0:53")],
                close: vec![tcp("dns", "0.0.0.0:53")],
            },
            Case {
                name: "a moved spa port and a removed step",
                running: vec![knock(7000, Proto::Udp), knock(7001, Proto::Tcp), spa("0.0.0.0:62201")],
                wanted: vec![knock(7000, Proto::Udp), spa("0.0.0.0:62202")],
                keep: vec![(knock(7000, Proto::Udp), knock(7000, Proto::Udp))],
                bind: vec![spa("0.0.0.0:62202")],
                close: vec![knock(7001, Proto::Tcp), spa("0.0.0.0:62201")],
            },
            Case {
                name: "one running socket serves one wanted endpoint, the same name first",
                running: vec![tcp("a", "0.0.0.0:80")],
                wanted: vec![tcp("b", "0.0.0.0:80"), tcp("a", "0.0.0.0:80")],
                keep: vec![(tcp("b", "0.0.0.0:80"), tcp("a", "0.0.0.0:80"))],
                bind: vec![tcp("a", "0.0.0.0:80")],
                close: vec![],
            },
            Case {
                name: "the raw sensor's sockets are kept across a reload",
                running: vec![tcp("pg", "0.0.0.0:5432"), Endpoint::Raw],
                wanted: vec![tcp("pg", "0.0.0.0:5432"), Endpoint::Raw],
                keep: vec![
                    (tcp("pg", "0.0.0.0:5432"), tcp("pg", "0.0.0.0:5432")),
                    (Endpoint::Raw, Endpoint::Raw),
                ],
                bind: vec![],
                close: vec![],
            },
            Case {
                name: "a knock step on another protocol is another socket",
                running: vec![knock(7000, Proto::Udp)],
                wanted: vec![knock(7000, Proto::Tcp)],
                keep: vec![],
                bind: vec![knock(7000, Proto::Tcp)],
                close: vec![knock(7000, Proto::Udp)],
            },
        ];
        for c in cases {
            let got = plan(&c.running, &c.wanted);
            assert_eq!(
                got,
                Plan {
                    keep: c.keep,
                    bind: c.bind,
                    close: c.close
                },
                "{}",
                c.name
            );
        }
    }

    #[test]
    fn with_the_raw_sensor_knock_steps_and_the_spa_port_are_not_bound() {
        let raw: crate::config::raw::RawConfig = toml::from_str(
            r#"
[spa]
listen = "0.0.0.0:62201"
[service.pg]
listen = "127.0.0.1:5432"
upstream = "127.0.0.1:15432"
knock = { sequence = ["7001/udp", "7003/tcp", "7002/udp"], trap_ports = ["7009/udp"] }
"#,
        )
        .unwrap();
        let config = crate::config::validate(&raw).unwrap();
        let socket: Vec<Endpoint> = endpoints(&config, false).into_iter().map(|(e, _)| e).collect();
        assert_eq!(socket.len(), 6, "{socket:?}");
        let raw: Vec<(Endpoint, String)> = endpoints(&config, true);
        assert_eq!(
            raw,
            vec![
                (tcp("pg", "127.0.0.1:5432"), "service.pg.listen".to_owned()),
                (Endpoint::Raw, "gateway.sensor".to_owned()),
            ]
        );
    }

    #[tokio::test]
    async fn assemble_takes_kept_sockets_and_binds_the_rest() {
        let a = tcp("a", "127.0.0.1:0");
        let b = udp("b", "127.0.0.1:0");
        let paths = vec![
            (a.clone(), "service.a.listen".to_owned()),
            (b.clone(), "service.b.listen".to_owned()),
        ];
        let running = bind_all(std::slice::from_ref(&a), &paths).unwrap();
        let kept_addr = running[&a].local_addr().unwrap();
        let p = plan(std::slice::from_ref(&a), &[a.clone(), b.clone()]);
        let fresh = bind_all(&p.bind, &paths).unwrap();
        let all = assemble(&p, running, fresh, &paths).unwrap();
        assert_eq!(
            all[&a].local_addr().unwrap(),
            kept_addr,
            "the running socket is the one kept"
        );
        assert!(matches!(all[&b], Socket::Udp(_)));
    }

    #[tokio::test]
    async fn a_bind_error_names_the_config_key() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        let e = tcp("pg", &addr);
        let err = bind_all(std::slice::from_ref(&e), &[(e.clone(), "service.pg.listen".into())]).unwrap_err();
        assert_eq!(format!("{err}"), format!("cannot listen on service.pg.listen ({addr})"));
    }
}
