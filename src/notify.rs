//! The service manager's readiness protocol (`sd_notify(3)`): when the
//! process was started with `NOTIFY_SOCKET` (systemd's `Type=notify`), it
//! tells the manager `READY=1` once every listener is bound, `RELOADING=1`
//! and `READY=1` around a reload, and `STOPPING=1` when it starts to drain.
//!
//! The protocol is one datagram per state change on a Unix socket named by
//! the variable (a path, or an abstract name written `@name`). Without the
//! variable every call does nothing, so the binary behaves the same under a
//! terminal, a container runtime or Kubernetes. A failed send is logged once
//! per call and never stops the gateway: the manager then times the start
//! out, which says more than a gateway that refuses to run would.
//!
//! This module owns the protocol and nothing else; the server decides when.

use std::ffi::OsString;
use std::future::Future;
use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The variable a service manager sets to the socket it listens on.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Every listener is bound and the gateway serves.
pub fn ready() {
    send("READY=1");
}

/// The gateway starts draining: listeners close, connections finish.
pub fn stopping() {
    send("STOPPING=1");
}

/// Runs a reload between `RELOADING=1` and `READY=1`, so `systemctl reload`
/// (and the unit's state) covers the reload itself; the gateway serves
/// again afterwards whether or not the new config was taken.
pub async fn reloading<T>(reload: impl Future<Output = T>) -> T {
    send("RELOADING=1");
    let out = reload.await;
    send("READY=1");
    out
}

fn send(state: &str) {
    let Some(target) = std::env::var_os(NOTIFY_SOCKET) else {
        return;
    };
    if let Err(e) = send_to(&target, state) {
        tracing::warn!(error = %e, socket = ?target, state, "cannot notify the service manager");
    }
}

/// Sends one state datagram to the socket `target` names.
fn send_to(target: &OsString, state: &str) -> io::Result<()> {
    let addr = address(target)?;
    let socket = UnixDatagram::unbound()?;
    socket.send_to_addr(state.as_bytes(), &addr)?;
    Ok(())
}

/// `@name` is an abstract socket, anything starting with `/` a path.
fn address(target: &OsString) -> io::Result<SocketAddr> {
    use std::os::unix::ffi::OsStrExt as _;
    let bytes = target.as_bytes();
    match bytes.first() {
        Some(b'/') => SocketAddr::from_pathname(target),
        Some(b'@') => {
            use std::os::linux::net::SocketAddrExt as _;
            SocketAddr::from_abstract_name(&bytes[1..])
        }
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "NOTIFY_SOCKET is neither an absolute path nor an abstract name",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_socket_receives_the_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        send_to(&path.clone().into_os_string(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }

    #[test]
    fn an_abstract_socket_receives_the_state() {
        use std::os::linux::net::SocketAddrExt as _;
        let name = format!("portcullis-notify-test-{}", std::process::id());
        let server = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
        send_to(&OsString::from(format!("@{name}")), "STOPPING=1").unwrap();
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
    }

    #[test]
    fn a_relative_name_is_refused() {
        let err = address(&OsString::from("notify.sock")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
