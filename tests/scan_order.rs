//! Knock sequences against a scanner that randomises port order (socket
//! sensor): trap ports lock a source out, `check` refuses sequences with
//! fewer than three distinct ports and reports the chance that one
//! random-order pass opens each sequence.
#![allow(
    clippy::unwrap_used,
    clippy::disallowed_methods,
    unreachable_pub,
    reason = "test and bench code: a panic is the failure report, and real time is what is measured"
)]

mod common;

use std::net::{SocketAddr, UdpSocket};

use common::*;

/// The shipped `proxy.toml` on free ports: its knock steps and traps
/// (7301..=7312) become `ports[1..=12]`, its guarded port `ports[0]`, its
/// admin port `ports[13]`; the upstream is an echo server.
fn shipped_config(ports: &[u16], upstream: SocketAddr) -> String {
    let mut text = std::fs::read_to_string(repo_path("proxy.toml")).unwrap();
    for i in (1..=12).rev() {
        text = text.replace(&format!("\"{}/udp\"", 7300 + i), &format!("\"{}/udp\"", ports[i]));
    }
    text.replace("127.0.0.1:15432", &format!("127.0.0.1:{}", ports[0]))
        .replace("127.0.0.1:9464", &format!("127.0.0.1:{}", ports[13]))
        .replace("127.0.0.1:5432", &upstream.to_string())
}

/// The shipped sequence and traps, as indices into the free ports.
const STEPS: [usize; 4] = [1, 5, 2, 4];
const TRAPS: [usize; 8] = [3, 6, 7, 8, 9, 10, 11, 12];

/// A small deterministic generator (SplitMix64), so every run tries the
/// same passes and a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            items.swap(i, j);
        }
    }
}

/// Whether one pass in `order` opens the service under the gate's rules:
/// every step before any trap (a trap locks out), in sequence order.
fn opens(order: &[usize]) -> bool {
    let Some(first_trap) = order.iter().position(|p| TRAPS.contains(p)) else {
        return order.iter().filter(|p| STEPS.contains(p)).eq(STEPS.iter());
    };
    order[..first_trap]
        .iter()
        .filter(|p| STEPS.contains(p))
        .eq(STEPS.iter())
}

/// Sends one datagram from `source` to each port of `order`, then waits
/// until the gateway has dealt with every one (a knock, or a knock the
/// guard ignored once the source was locked out).
fn pass(gw: &Gateway, source: &str, ports: &[u16], order: &[usize]) {
    let seen = |l: &serde_json::Value| l["source"] == source && (msg(l) == "knock" || msg(l) == "knock ignored");
    let before = gw.count(seen);
    let socket = UdpSocket::bind((ip(source), 0)).unwrap();
    for i in order {
        socket.send_to(b"", ("127.0.0.1", ports[*i])).unwrap();
    }
    gw.wait_for_nth(before + order.len(), seen);
}

#[test]
fn random_order_passes_over_the_shipped_sequence_open_nothing() {
    let upstream = echo_server("127.0.0.1:0");
    let (gw, ports) = Gateway::builder()
        .on_free_ports(16, move |p| shipped_config(p, upstream))
        .start_on_ports();
    let guarded = gw.addr("postgres");
    let mut rng = Rng(0x5ca1_ab1e);
    let passes = 300;
    let mut predicted = 0;
    for n in 0..passes {
        // A fresh source for each pass, as a scan of many hosts would be.
        let source = format!("127.31.{}.{}", n / 200 + 1, n % 200 + 1);
        let mut order: Vec<usize> = STEPS.iter().chain(&TRAPS).copied().collect();
        rng.shuffle(&mut order);
        pass(&gw, &source, &ports, &order);
        let expected = opens(&order);
        predicted += usize::from(expected);
        let granted = gw.count(|l| msg(l) == "grant" && l["source"] == source.as_str()) > 0;
        assert_eq!(granted, expected, "pass {n} in order {order:?}");
        assert_eq!(echo_works(&source, guarded), expected, "pass {n}");
    }
    // One pass opens it with a chance of 1 in 11880: 300 passes open it
    // about 0.025 times on average, and this seed's passes not once.
    assert_eq!(predicted, 0, "the seed's passes include an opening order");
}

#[test]
fn a_source_that_hits_a_trap_stays_denied_after_the_right_sequence() {
    let upstream = echo_server("127.0.0.1:0");
    let (gw, ports) = Gateway::builder()
        .on_free_ports(16, move |p| shipped_config(p, upstream))
        .start_on_ports();
    let guarded = gw.addr("postgres");
    // Two steps, then a trap: locked out.
    pass(&gw, "127.32.0.1", &ports, &[STEPS[0], STEPS[1], TRAPS[3]]);
    gw.wait_for(|l| msg(l) == "source locked out: it hit a trap port" && l["source"] == "127.32.0.1");
    // The whole sequence now opens nothing.
    pass(&gw, "127.32.0.1", &ports, &STEPS);
    assert_eq!(gw.count(|l| msg(l) == "grant" && l["source"] == "127.32.0.1"), 0);
    assert!(!echo_works("127.32.0.1", guarded));
    // Another source with the same sequence gets in: the lockout is the
    // trapped source's alone.
    pass(&gw, "127.32.0.2", &ports, &STEPS);
    gw.wait_grant("postgres", "127.32.0.2");
    assert!(echo_works("127.32.0.2", guarded));
}

#[test]
fn check_refuses_two_distinct_ports_and_warns_with_the_chance_of_a_weak_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let aba = write(
        "aba.toml",
        "[service.echo]\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:1\"\nknock = { sequence = [\"9000/udp\", \"7000/udp\", \"9000/udp\"] }\n",
    );
    let (code, _, err) = run_bin(&["check", "-c", aba.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("service.echo.knock.sequence"), "{err}");
    assert!(err.contains("2 distinct port(s)"), "{err}");

    let weak = write(
        "weak.toml",
        "[service.echo]\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:1\"\nknock = { sequence = [\"9000/udp\", \"7000/udp\", \"8000/udp\"] }\n",
    );
    let (code, out, err) = run_bin(&["check", "-c", weak.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "a warning, not an error: {err}");
    assert!(
        out.contains("service.echo.knock: one random-order scan of its 3 step(s) and 0 trap port(s) opens it with a chance of 1 in 6"),
        "{out}"
    );
    assert!(
        err.contains(
            "warning: service.echo.knock: above 1 in 10000: add 20 trap port(s), or one step and 8 trap port(s)"
        ),
        "{err}"
    );

    let (code, out, err) = run_bin(&["check", "-c", repo_path("proxy.toml").to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("opens it with a chance of 1 in 11880"), "{out}");
    assert!(
        !err.contains("warning"),
        "the shipped sequence passes the warning: {err}"
    );
}

/// The traps named in the gateway's `trap ports picked` line.
fn picked(gw: &Gateway) -> Vec<u16> {
    let line = gw.wait_for(|l| msg(l) == "trap ports picked" && l["service"] == "echo");
    line["traps"]
        .as_str()
        .unwrap()
        .split(", ")
        .map(|t| t.trim_end_matches("/udp").rsplit(':').next().unwrap().parse().unwrap())
        .collect()
}

#[test]
fn picked_traps_are_free_ports_near_the_steps_that_lock_out_and_survive_a_reload() {
    let upstream = echo_server("127.0.0.1:0");
    let config = move |p: &[u16]| {
        format!(
            "[service.echo]\nlisten = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\n\
             knock = {{ sequence = [\"{}/udp\", \"{}/udp\", \"{}/udp\"], trap_ports = {{ count = 8 }} }}\n",
            p[1], p[0], p[2]
        )
    };
    let (gw, p) = Gateway::builder().on_free_ports(3, config).start_on_ports();
    let steps = [p[1], p[0], p[2]];
    let traps = picked(&gw);
    assert_eq!(traps.len(), 8, "{traps:?}");
    for t in &traps {
        assert!(!steps.contains(t), "trap {t} is a step");
        assert!(
            steps.iter().any(|s| s.abs_diff(*t) <= 4096),
            "trap {t} is far from every step"
        );
        assert_eq!(traps.iter().filter(|o| *o == t).count(), 1, "trap {t} picked twice");
        // Bound by the gateway: nothing else can take it.
        assert!(UdpSocket::bind(("127.0.0.1", *t)).is_err(), "trap {t} is not held");
    }
    let send = |source: &str, ports: &[u16]| {
        let seen = |l: &serde_json::Value| l["source"] == source && (msg(l) == "knock" || msg(l) == "knock ignored");
        let before = gw.count(seen);
        let socket = UdpSocket::bind((ip(source), 0)).unwrap();
        for port in ports {
            socket.send_to(b"", ("127.0.0.1", *port)).unwrap();
        }
        gw.wait_for_nth(before + ports.len(), seen);
    };
    // A picked trap locks out like a listed one.
    send("127.33.0.1", &[steps[0], traps[5]]);
    gw.wait_for(|l| msg(l) == "source locked out: it hit a trap port" && l["source"] == "127.33.0.1");
    send("127.33.0.1", &steps);
    assert_eq!(gw.count(|l| msg(l) == "grant" && l["source"] == "127.33.0.1"), 0);
    send("127.33.0.2", &steps);
    gw.wait_grant("echo", "127.33.0.2");

    // A reload of the same sequence keeps the same traps (no new pick).
    gw.signal(nix::sys::signal::Signal::SIGHUP);
    gw.wait_for(|l| msg(l) == "config reloaded");
    assert_eq!(gw.count(|l| msg(l) == "trap ports picked"), 1);
    send("127.33.0.3", &[traps[7]]);
    gw.wait_for(|l| msg(l) == "source locked out: it hit a trap port" && l["source"] == "127.33.0.3");

    // `check` counts them in the chance it prints (1/(9*10*11)).
    let (code, out, err) = run_bin(&["check", "-c", gw.config_path.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("service.echo.knock: one random-order scan of its 3 step(s) and 8 trap port(s) opens it with a chance of 1 in 990"),
        "{out}"
    );
}

#[test]
fn a_count_of_trap_ports_out_of_range_names_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(
        &path,
        "[service.echo]\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:1\"\n\
         knock = { sequence = [\"9000/udp\", \"7000/udp\", \"8000/udp\"], trap_ports = { count = 0 } }\n",
    )
    .unwrap();
    let (code, _, err) = run_bin(&["check", "-c", path.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("service.echo.knock.trap_ports.count"), "{err}");
}
