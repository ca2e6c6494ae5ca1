//! Generated trap ports (`trap_ports = { count = N }`): picked at start-up
//! among ports nothing on the host uses, near the steps and of the steps'
//! protocols, so that a scanner cannot tell them from the steps by where
//! they are; kept across reloads while the sequence and the count stay.
//!
//! Owns only the choice. Binding the picked ports (socket sensor) or
//! watching them (raw sensor) is the same as for listed traps.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::ops::RangeInclusive;

use anyhow::bail;

use crate::config::Config;
use crate::step::{Proto, Step};

/// How far from a step a picked trap may be.
const MAX_DISTANCE: u16 = 4096;

/// Fills in `knock.trap` of every service of `config` that asks for
/// picked traps: with the ones `previous` picked for it when its sequence
/// and count are unchanged, or else with fresh free ports. Ports in
/// `avoid` are not picked: the raw sensor passes the local ephemeral
/// range, where replies to this host's own connections arrive and would
/// be taken for trap hits. Fails, naming the key, when too few free ports
/// are near the steps.
pub(crate) fn pick(config: &mut Config, previous: Option<&Config>, avoid: RangeInclusive<u16>) -> anyhow::Result<()> {
    let mut taken = used_by(config);
    for i in 0..config.services.len() {
        let service = &config.services[i];
        let count = service.pick_traps;
        let Some(knock) = service.knock.as_ref().filter(|_| count > 0) else {
            continue;
        };
        let kept = previous
            .and_then(|p| p.services.iter().find(|s| s.name == service.name))
            .filter(|old| old.pick_traps == count)
            .and_then(|old| old.knock.as_ref())
            .filter(|old| old.sequence == knock.sequence && old.trap.len() == count)
            .map(|old| old.trap.clone());
        let traps = match kept {
            Some(traps) => traps,
            None => {
                let traps = fresh(&knock.sequence, count, &taken, &avoid, is_free);
                if traps.len() < count {
                    let outside = if avoid.is_empty() {
                        String::new()
                    } else {
                        format!(" outside {}-{}", avoid.start(), avoid.end())
                    };
                    bail!(
                        "service.{}.knock.trap_ports.count: only {} of {count} free ports found within {MAX_DISTANCE} of the steps{outside}; ask for fewer or list them",
                        service.name,
                        traps.len(),
                    );
                }
                let ports: Vec<String> = traps.iter().map(ToString::to_string).collect();
                tracing::info!(service = %service.name, traps = %ports.join(", "), "trap ports picked");
                traps
            }
        };
        taken.extend(traps.iter().map(|t| (t.proto, t.addr.port())));
        if let Some(knock) = config.services[i].knock.as_mut() {
            knock.trap = traps;
        }
    }
    Ok(())
}

/// The ports picked traps must avoid: the ephemeral range with the raw
/// sensor, none with the socket sensor (whose traps are bound sockets that
/// nothing else can take or be answered on).
pub(crate) fn avoided(raw: bool) -> RangeInclusive<u16> {
    if raw {
        crate::sensor::raw::ephemeral_range()
    } else {
        #[allow(clippy::reversed_empty_ranges, reason = "the empty range: nothing is avoided")]
        let none = 1..=0;
        none
    }
}

/// Ports the config itself names, per protocol (any address).
fn used_by(config: &Config) -> HashSet<(Proto, u16)> {
    let mut taken = HashSet::new();
    for s in &config.services {
        taken.insert((s.protocol, s.listen.port()));
        for step in s.knock.iter().flat_map(|k| k.sequence.iter().chain(&k.trap)) {
            taken.insert((step.proto, step.addr.port()));
        }
    }
    if let Some(spa) = &config.spa {
        taken.insert((Proto::Udp, spa.listen.port()));
    }
    if let Some(admin) = &config.admin {
        taken.insert((Proto::Tcp, admin.listen.port()));
    }
    taken.remove(&(Proto::Tcp, 0));
    taken.remove(&(Proto::Udp, 0));
    taken
}

/// Up to `count` ports near the steps, taking the steps in turn (so the
/// traps mix protocols as the steps do) and moving outwards, that are
/// neither `taken`, nor in `avoid`, nor refused by `free`.
fn fresh(
    steps: &[Step],
    count: usize,
    taken: &HashSet<(Proto, u16)>,
    avoid: &RangeInclusive<u16>,
    free: impl Fn(Proto, SocketAddr) -> bool,
) -> Vec<Step> {
    let mut picked: Vec<Step> = Vec::with_capacity(count);
    'outer: for distance in 1..=MAX_DISTANCE {
        for step in steps {
            for port in [
                step.addr.port().checked_add(distance),
                step.addr.port().checked_sub(distance),
            ] {
                let Some(port) = port.filter(|p| *p != 0 && !avoid.contains(p)) else {
                    continue;
                };
                let candidate = Step {
                    proto: step.proto,
                    addr: SocketAddr::new(step.addr.ip(), port),
                };
                if taken.contains(&(step.proto, port))
                    || picked.contains(&candidate)
                    || !free(step.proto, candidate.addr)
                {
                    continue;
                }
                picked.push(candidate);
                if picked.len() == count {
                    break 'outer;
                }
            }
        }
    }
    picked
}

/// Whether a socket of `proto` can be bound at `addr` now.
fn is_free(proto: Proto, addr: SocketAddr) -> bool {
    match proto {
        Proto::Udp => std::net::UdpSocket::bind(addr).is_ok(),
        // Bound and dropped without listening: nothing is ever accepted.
        Proto::Tcp => socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)
            .and_then(|s| {
                if addr.ip().is_ipv6() {
                    s.set_only_v6(false)?;
                }
                s.bind(&addr.into())
            })
            .is_ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(proto: Proto, port: u16) -> Step {
        Step {
            proto,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    #[test]
    fn picks_near_each_step_in_turn_skipping_taken_ephemeral_and_busy_ports() {
        let steps = [step(Proto::Udp, 7000), step(Proto::Tcp, 7100), step(Proto::Udp, 7200)];
        let taken: HashSet<_> = [(Proto::Udp, 7001), (Proto::Tcp, 7101)].into();
        let busy = |proto: Proto, addr: SocketAddr| !(proto == Proto::Udp && addr.port() == 7199);
        let traps = fresh(&steps, 6, &taken, &(7201..=7299), busy);
        let got: Vec<(Proto, u16)> = traps.iter().map(|t| (t.proto, t.addr.port())).collect();
        assert_eq!(
            got,
            [
                (Proto::Udp, 6999),
                (Proto::Tcp, 7099),
                (Proto::Udp, 7002),
                (Proto::Udp, 6998),
                (Proto::Tcp, 7102),
                (Proto::Tcp, 7098),
            ]
        );
    }

    #[test]
    fn stops_short_when_the_ports_near_the_steps_run_out() {
        let steps = [step(Proto::Udp, 1), step(Proto::Udp, 65535)];
        let traps = fresh(&steps, 10, &HashSet::new(), &(2..=65534), |_, _| true);
        assert!(traps.is_empty(), "{traps:?}");
    }

    #[test]
    fn a_port_bound_by_another_socket_is_not_free() {
        let held = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let addr = held.local_addr().expect("addr");
        assert!(!is_free(Proto::Udp, addr));
        drop(held);
        assert!(is_free(Proto::Udp, addr));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        assert!(!is_free(Proto::Tcp, listener.local_addr().expect("addr")));
    }
}
