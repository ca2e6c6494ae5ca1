//! The listening switch of a guarded TCP service in `closed` mode.
//!
//! While no grant of the service is active, its socket stays bound (no
//! other process can take the port) but does not listen, so the kernel
//! answers a SYN with a reset, exactly as for a port nothing uses. The gate
//! driver opens the door (`listen(2)`) before it makes the service's first
//! grant visible, so the granted source's first connect never races it, and
//! closes it (`connect(AF_UNSPEC)`, which stops listening and keeps the
//! explicitly bound port; connections still in the backlog are reset, the
//! established ones are untouched) when the last grant ends.
//!
//! The door holds a duplicate of the listener's descriptor, so it switches
//! the very socket the service's accept loop owns; the accept loop only
//! accepts while the door is open. Each opening is a new [`Spell`]: a
//! close and a reopen in quick succession (a revoke, then a new grant) may
//! reach the accept loop as one change, and the spell number tells it the
//! socket stopped listening in between, so it registers the socket afresh
//! rather than accepting through a registration that saw the hang-up.

use std::io;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};

use socket2::Socket;
use tokio::sync::watch;

use crate::net;

/// See the module doc.
#[derive(Debug)]
pub struct Door {
    service: Arc<str>,
    /// The listener's socket (a duplicate descriptor of it).
    socket: Mutex<Socket>,
    open: watch::Sender<Spell>,
}

/// Whether the door is open, and how many times it has been opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spell {
    pub open: bool,
    pub number: u64,
}

impl Door {
    /// A door on `listener`, open or closed as the socket is now (a
    /// reload hands over a socket that may listen); the driver then sets
    /// it to match the service's grants.
    pub fn new(service: Arc<str>, listener: &impl AsFd) -> io::Result<Arc<Self>> {
        let socket = Socket::from(listener.as_fd().try_clone_to_owned()?);
        let listening = socket.is_listener()?;
        Ok(Arc::new(Self {
            service,
            socket: Mutex::new(socket),
            open: watch::channel(Spell {
                open: listening,
                number: 0,
            })
            .0,
        }))
    }

    pub fn service(&self) -> &Arc<str> {
        &self.service
    }

    /// Starts listening (if not already). On failure the door stays closed
    /// and connections keep being answered with a reset.
    pub fn open(&self) {
        let socket = self.socket.lock().expect("door lock");
        let was = *self.open.borrow();
        if was.open {
            return;
        }
        // SO_REUSEADDR while listening: connections accepted in an earlier
        // open spell still hold the port, and without it they would keep
        // the socket from listening again. Nobody can bind a port that is
        // listening anyway; it is cleared again when the door closes.
        let listened = socket
            .set_reuse_address(true)
            .and_then(|()| net::listen(&socket2::SockRef::from(&*socket)));
        match listened {
            Ok(()) => {
                self.open.send_replace(Spell {
                    open: true,
                    number: was.number + 1,
                });
                tracing::debug!(service = %self.service, "closed service: listening while a grant is active");
            }
            Err(e) => tracing::error!(service = %self.service, error = %e, "closed service: cannot listen"),
        }
    }

    /// Stops listening (if listening): the port answers like an unused one.
    pub fn close(&self) {
        let socket = self.socket.lock().expect("door lock");
        let was = *self.open.borrow();
        if !was.open {
            return;
        }
        // The accept loop is told first. It may not have stopped before the
        // socket leaves the listening state, or before the next open: then
        // the new spell number makes it register the socket afresh.
        self.open.send_replace(Spell { open: false, ..was });
        let stopped = crate::sys::unlisten(socket.as_fd()).and_then(|()| socket.set_reuse_address(false));
        match stopped {
            Ok(()) => tracing::debug!(service = %self.service, "closed service: no grant active, not listening"),
            Err(e) => tracing::error!(service = %self.service, error = %e, "closed service: cannot stop listening"),
        }
    }

    /// Whether the socket listens now.
    pub fn is_open(&self) -> bool {
        self.open.borrow().open
    }

    /// Sees the door open and close (a close and a reopen may arrive as one
    /// change, with a new spell number).
    pub fn watch(&self) -> watch::Receiver<Spell> {
        self.open.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn connects(addr: SocketAddr) -> bool {
        std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2)).is_ok()
    }

    #[test]
    fn a_closed_door_answers_like_an_unused_port_and_keeps_it() {
        let listener = net::bind_tcp_unlistened("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let door = Door::new("pg".into(), &listener).unwrap();
        assert!(!door.is_open());
        let refused = std::net::TcpStream::connect(addr).unwrap_err();
        assert_eq!(
            refused.kind(),
            io::ErrorKind::ConnectionRefused,
            "a reset, as an unused port"
        );
        // Nobody else can take the port meanwhile, with or without
        // SO_REUSEADDR / SO_REUSEPORT.
        for (reuse_addr, reuse_port) in [(false, false), (true, false), (true, true)] {
            let other = Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            other.set_reuse_address(reuse_addr).unwrap();
            other.set_reuse_port(reuse_port).unwrap();
            assert!(
                other.bind(&addr.into()).is_err(),
                "bound the port of a closed service (SO_REUSEADDR {reuse_addr}, SO_REUSEPORT {reuse_port})"
            );
        }
        door.open();
        assert!(door.is_open());
        assert!(connects(addr));
        let (_accepted, _) = listener.accept().unwrap();
        door.close();
        let refused = std::net::TcpStream::connect(addr).unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);
        // The established connection does not let another socket in.
        let other = Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        other.set_reuse_address(true).unwrap();
        assert!(other.bind(&addr.into()).is_err(), "bound the port of a closed service");
        // And it opens again on the same port, the connection still open.
        door.open();
        assert!(door.is_open());
        assert!(connects(addr));
    }

    #[test]
    fn a_close_and_reopen_seen_as_one_change_still_tell_a_new_spell() {
        let listener = net::bind_tcp_unlistened("127.0.0.1:0".parse().unwrap()).unwrap();
        let door = Door::new("pg".into(), &listener).unwrap();
        let mut seen = door.watch();
        door.open();
        let first = *seen.borrow_and_update();
        assert!(first.open);
        // A revoke and a new grant before the accept loop looks again.
        door.close();
        door.open();
        assert!(seen.has_changed().unwrap());
        let now = *seen.borrow_and_update();
        assert!(now.open);
        assert_ne!(
            now.number, first.number,
            "the loop would keep a registration that saw the hang-up"
        );
    }

    #[test]
    fn an_established_connection_outlives_the_door() {
        use std::io::{Read, Write};
        let listener = net::bind_tcp_unlistened("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let door = Door::new("pg".into(), &listener).unwrap();
        door.open();
        let mut client = std::net::TcpStream::connect(addr).unwrap();
        let (mut accepted, _) = listener.accept().unwrap();
        accepted.set_nonblocking(false).unwrap();
        door.close();
        client.write_all(b"still here").unwrap();
        let mut got = [0u8; 10];
        accepted.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"still here");
    }
}
