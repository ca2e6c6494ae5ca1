//! `dark` mode: a classic BPF filter on a guarded TCP listener admits only
//! the sources holding a grant of the service, so the kernel drops every
//! other SYN and a scanner sees no answer at all (`filtered`), as behind a
//! firewall's DROP.
//!
//! Since Linux commit 5d39580f68e6 ("tcp: restrict SO_ATTACH_FILTER to priv
//! users") attaching a filter to a TCP socket needs CAP_NET_ADMIN. Without
//! it [`Dark::attach`] fails and the service runs in `closed` mode instead
//! (said once at start-up, and in the mode metric). Accepted connections
//! keep the program they were accepted under, which admits their source,
//! so a later rebuild never touches an established connection.

use std::collections::BTreeSet;
use std::io;
use std::net::IpAddr;
use std::os::fd::AsFd;
use std::sync::Arc;

use socket2::{SockRef, Socket};
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::filter::{self, Family};
use crate::store::GrantStore;

/// The filter keeper of one `dark` service.
#[derive(Debug)]
pub struct Dark {
    service: Arc<str>,
    /// The listener's socket (a duplicate descriptor of it).
    socket: Socket,
    family: Family,
    store: Arc<dyn GrantStore>,
    clock: Arc<dyn Clock>,
}

impl Dark {
    /// Attaches the filter for the grants held now. An error (EPERM
    /// without CAP_NET_ADMIN) means the kernel will not take it.
    pub fn attach(
        service: Arc<str>,
        listener: &std::net::TcpListener,
        store: Arc<dyn GrantStore>,
        clock: Arc<dyn Clock>,
    ) -> io::Result<Self> {
        let family = Family::of(&listener.local_addr()?);
        let socket = Socket::from(listener.as_fd().try_clone_to_owned()?);
        let dark = Self {
            service,
            socket,
            family,
            store,
            clock,
        };
        dark.rebuild()?;
        Ok(dark)
    }

    /// Keeps the filter in step with the grants until `stop`. A grant is
    /// admitted as soon as the store has it (the store is told after the
    /// gate grants; a SYN that beats the rebuild is dropped and the client
    /// retransmits it within a second).
    pub async fn keep(self, stop: CancellationToken) {
        let mut changes = self.store.changes();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                changed = changes.changed() => if changed.is_err() { return },
            }
            if let Err(e) = self.rebuild() {
                tracing::error!(service = %self.service, error = %e, "dark mode: cannot update the kernel filter");
            }
        }
    }

    fn rebuild(&self) -> io::Result<()> {
        let now = self.clock.now();
        let sources: BTreeSet<IpAddr> = self
            .store
            .snapshot()
            .into_iter()
            .filter(|g| g.service == self.service && g.expires_at > now)
            .map(|g| g.source.to_canonical())
            .collect();
        let program = match filter::admit(self.family, &sources) {
            Ok(p) => p,
            Err(e) => {
                // Too many sources for one program: admit everyone and let
                // userspace refuse (as in `refuse` mode) until they fit.
                tracing::warn!(service = %self.service, error = %e, "dark mode: too many granted sources for a kernel filter; refusing in userspace meanwhile");
                filter::ACCEPT_ALL.to_vec()
            }
        };
        let program: Vec<_> = program.iter().map(|i| i.sock_filter()).collect();
        SockRef::from(&self.socket).attach_filter(&program)
    }
}

/// Whether this process holds CAP_NET_ADMIN in its effective set (read
/// from `/proc/self/status`), which `dark` needs. For `check`: serving
/// finds out by attaching.
pub fn has_net_admin() -> bool {
    const CAP_NET_ADMIN: u32 = 12;
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_NET_ADMIN) != 0)
}

/// Takes any filter off a listener that is not (or no longer) dark.
pub fn detach(listener: &std::net::TcpListener) {
    // ENOENT when there is none: nothing to do.
    let _ = SockRef::from(listener).detach_filter();
}
