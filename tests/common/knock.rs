//! Knock clients: ours (`portcullis knock`) and the stock one, and the
//! shared helper that knocks and waits for the grant.

use std::net::SocketAddr;
use std::process::Command;

use super::{Gateway, BIN};

/// Runs `portcullis knock` with `args`; asserts success.
pub fn portcullis_knock(args: &[&str]) {
    let out = Command::new(BIN).arg("knock").args(args).output().expect("run knock");
    assert!(
        out.status.success(),
        "portcullis knock {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `portcullis knock --totp KEY --ports POOL --steps 4 --period PERIOD -b
/// SOURCE -v HOST EXTRA...`: this period's rotating sequence (or another's,
/// with a time offset in `extra`); asserts success and returns what it
/// printed.
pub fn portcullis_knock_totp(
    key: &std::path::Path,
    pool: &str,
    period: &str,
    source: &str,
    host: &str,
    extra: &[&str],
) -> String {
    let key = key.to_str().expect("a UTF-8 key path");
    let mut args = vec![
        "--totp", key, "--ports", pool, "--steps", "4", "--period", period, "-b", source, "-v", host,
    ];
    args.extend_from_slice(extra);
    let out = Command::new(BIN).arg("knock").args(&args).output().expect("run knock");
    assert!(
        out.status.success(),
        "portcullis knock {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs the stock knock client (Debian's knockd package) with `args`.
pub fn stock_knock(args: &[&str]) {
    let out = Command::new("knock")
        .args(args)
        .output()
        .expect("the stock knock client (apt-get install knockd; scripts/install-test-deps does it)");
    assert!(
        out.status.success(),
        "knock {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Sends `seq` as UDP knocks to 127.0.0.1 from `source` with `portcullis
/// knock`, without waiting for the gate.
pub fn knock_udp(seq: &[u16], source: &str) {
    let steps: Vec<String> = seq.iter().map(|p| format!("{p}/udp")).collect();
    let mut args = vec!["127.0.0.1", "-b", source];
    args.extend(steps.iter().map(String::as_str));
    portcullis_knock(&args);
}

/// [`knock_udp`], then waits for `service`'s grant to `source`.
pub fn knock_and_wait(gw: &Gateway, service: &str, seq: &[u16], source: &str) {
    knock_udp(seq, source);
    gw.wait_grant(service, source);
}

/// A `[service.NAME]` table guarding 127.0.0.1:0 in front of `upstream`
/// with a UDP knock sequence over `seq` (used in the order given).
pub fn knock_service(name: &str, upstream: SocketAddr, seq: &[u16]) -> String {
    let steps: Vec<String> = seq.iter().map(|p| format!("\"{p}/udp\"")).collect();
    format!(
        "\n[service.{name}]\nlisten = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\nopen_for = \"30s\"\nknock = {{ sequence = [{}] }}\n",
        steps.join(", ")
    )
}
