//! Whether each upstream's host name resolves now: a warning, never an
//! error (DNS may come up after the gateway, and upstreams are resolved
//! again at every connect). `check` reports the names that do not;
//! `serve` logs them at start-up.

use std::net::{SocketAddr, ToSocketAddrs as _};
use std::sync::mpsc;
use std::time::Duration;

use super::{Problem, Service};

/// How long `check` and start-up wait for all the names together.
pub const DNS_TIMEOUT: Duration = Duration::from_secs(2);

/// One warning per upstream whose host name did not resolve within
/// `timeout` (all are looked up at once), keyed `service.NAME.upstream`.
/// Literal addresses are not looked up.
pub fn unresolvable(services: &[Service], timeout: Duration) -> Vec<Problem> {
    let names: Vec<(String, String)> = services
        .iter()
        .filter(|s| s.upstream.parse::<SocketAddr>().is_err())
        .map(|s| (format!("service.{}.upstream", s.name), s.upstream.to_string()))
        .collect();
    if names.is_empty() {
        return Vec::new();
    }
    let (tx, rx) = mpsc::channel();
    for (i, (_, upstream)) in names.iter().enumerate() {
        let (tx, upstream) = (tx.clone(), upstream.clone());
        // getaddrinfo cannot be cancelled: a lookup past the timeout ends
        // on its own thread, and is reported as slow.
        std::thread::spawn(move || {
            let found = upstream.to_socket_addrs().map(|a| a.count());
            let _ = tx.send(Some((i, found)));
        });
    }
    std::thread::spawn(move || {
        std::thread::sleep(timeout);
        let _ = tx.send(None);
    });
    let mut answers: Vec<Option<std::io::Result<usize>>> = names.iter().map(|_| None).collect();
    let mut pending = names.len();
    while pending > 0 {
        match rx.recv() {
            Ok(Some((i, found))) => {
                answers[i] = Some(found);
                pending -= 1;
            }
            Ok(None) | Err(_) => break,
        }
    }
    names
        .into_iter()
        .zip(answers)
        .filter_map(|((path, upstream), answer)| {
            let why = match answer {
                Some(Ok(n)) if n > 0 => return None,
                Some(Ok(_)) => "it has no addresses".to_owned(),
                Some(Err(e)) => e.to_string(),
                None => format!("no answer within {}s", timeout.as_secs_f64()),
            };
            Some(Problem {
                path,
                message: format!("{upstream:?} does not resolve now ({why}); connections will fail until it does"),
            })
        })
        .collect()
}
