//! A bounded pool of kernel pipes for `splice(2)`.
//!
//! A bulk direction of a proxied connection borrows a pipe while it has
//! data to move and gives it back when it goes idle, so pipes follow the
//! traffic, not the connections: an idle connection holds none. A pipe
//! comes back to the pool only when it is empty; one that still holds bytes
//! (after an error) is closed, so stale data can never reach another
//! connection. The pool owns pipes and nothing else: when to splice is
//! decided in [`super::relay`].

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::config::budget;

/// The capacity asked for each pipe (best effort: the kernel caps it at
/// `/proc/sys/fs/pipe-max-size`, and refuses an unprivileged user over its
/// pipe allowance, who keeps the default 64 KiB). A splice moves at most
/// this much. Measured with iperf3 through the release binary on loopback,
/// gateway CPU per GB: 0.26-0.38 s with 64 KiB pipes, 0.22-0.33 s with
/// 256 KiB, 0.19-0.25 s with 1 MiB; 256 KiB lets four times as many pipes
/// as 1 MiB fit in the allowance.
pub const PIPE_SIZE: usize = 256 * 1024;

/// Most pipes the pool ever holds at once (leased and idle): each costs two
/// descriptors. Pipes are leased per burst, not per connection, so this
/// many serve far more concurrent bulk connections.
pub const MAX_PIPES: usize = budget::MAX_PIPES as usize;

/// Share of the user's pipe allowance (`/proc/sys/fs/pipe-user-pages-soft`,
/// counted over all of the user's processes) the pool may fill. Past the
/// allowance, the kernel gives every new pipe of the user, in any process,
/// two pages only.
const PIPE_ALLOWANCE_DIVISOR: usize = 2;

/// A pipe smaller than this is not worth splicing through: a userspace copy
/// with a buffer this large moves more per system call.
const MIN_USEFUL_PIPE: usize = 64 * 1024;

/// The pool: a cheap handle, cloned into every place that leases pipes.
#[derive(Debug, Clone)]
pub struct Pipes {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    idle: Mutex<Vec<Pipe>>,
    /// Pipes in existence: leased plus idle.
    live: AtomicUsize,
    /// Cap on `live`. Lowered to what the system allowed when creating a
    /// pipe fails, so a process at its limits does not retry on every burst.
    max: AtomicUsize,
    size: usize,
    /// Set once `splice(2)` turns out not to work here.
    disabled: AtomicBool,
}

/// A kernel pipe: both ends and the capacity the kernel granted.
#[derive(Debug)]
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

/// A pipe lent to one direction of one connection. Tracks how many bytes it
/// holds; on drop it goes back to the pool if empty and is closed if not.
#[derive(Debug)]
pub struct Lease<'a> {
    pipe: Option<Pipe>,
    held: usize,
    pool: &'a Inner,
}

impl Pipes {
    /// A pool of at most `max` pipes of `size` bytes each (best effort).
    pub fn new(max: usize, size: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                idle: Mutex::new(Vec::new()),
                live: AtomicUsize::new(0),
                max: AtomicUsize::new(max),
                size,
                disabled: AtomicBool::new(!cfg!(target_os = "linux")),
            }),
        }
    }

    /// The pool for this process: at most [`MAX_PIPES`] of [`PIPE_SIZE`],
    /// fewer when the descriptor limit (its share in the descriptor budget,
    /// [`budget::pipes`]) or the user's pipe allowance is low.
    pub fn for_process() -> Self {
        let by_fds = usize::try_from(budget::pipes(budget::descriptor_limit())).unwrap_or(usize::MAX);
        Self::new(by_fds.min(by_allowance(PIPE_SIZE)), PIPE_SIZE)
    }

    /// A pool that never lends a pipe: every direction copies in userspace.
    pub fn none() -> Self {
        let pipes = Self::new(0, PIPE_SIZE);
        pipes.disable();
        pipes
    }

    /// An empty pipe, from the pool or new; `None` when the pool is at its
    /// cap, the system refuses a new pipe, or splicing is disabled.
    pub fn lease(&self) -> Option<Lease<'_>> {
        let inner = &*self.inner;
        if inner.disabled.load(Ordering::Relaxed) {
            return None;
        }
        let idle = inner.idle.lock().expect("the pipe pool's lock is never poisoned").pop();
        let pipe = match idle {
            Some(pipe) => pipe,
            None => inner.create()?,
        };
        Some(Lease {
            pipe: Some(pipe),
            held: 0,
            pool: inner,
        })
    }

    /// Stops lending pipes, for good: `splice(2)` does not work here.
    pub fn disable(&self) {
        self.inner.disabled.store(true, Ordering::Relaxed);
        let idle = std::mem::take(&mut *self.inner.idle.lock().expect("the pipe pool's lock is never poisoned"));
        self.inner.live.fetch_sub(idle.len(), Ordering::Relaxed);
    }

    pub fn is_disabled(&self) -> bool {
        self.inner.disabled.load(Ordering::Relaxed)
    }

    /// Pipes in existence (leased and idle).
    pub fn live(&self) -> usize {
        self.inner.live.load(Ordering::Relaxed)
    }

    /// Pipes waiting in the pool.
    pub fn idle(&self) -> usize {
        self.inner
            .idle
            .lock()
            .expect("the pipe pool's lock is never poisoned")
            .len()
    }
}

/// How many pipes of `size` bytes fit in our share of the user's pipe
/// allowance; unbounded when there is none or it cannot be read.
fn by_allowance(size: usize) -> usize {
    let pages = std::fs::read_to_string("/proc/sys/fs/pipe-user-pages-soft")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .filter(|&pages| pages > 0);
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|p| usize::try_from(p).ok())
        .unwrap_or(4096);
    match pages {
        Some(pages) => pages.saturating_mul(page) / PIPE_ALLOWANCE_DIVISOR / size.max(1),
        None => usize::MAX,
    }
}

impl Inner {
    fn create(&self) -> Option<Pipe> {
        let max = self.max.load(Ordering::Relaxed);
        if self
            .live
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < max).then_some(n + 1))
            .is_err()
        {
            return None;
        }
        match Pipe::new(self.size) {
            Ok(pipe) => Some(pipe),
            Err(e) => {
                let live = self.live.fetch_sub(1, Ordering::Relaxed) - 1;
                self.max.store(live, Ordering::Relaxed);
                tracing::warn!(error = %e, pipes = live, "cannot have another pipe; bulk transfers beyond these copy in userspace");
                None
            }
        }
    }

    fn give_back(&self, pipe: Pipe) {
        if !self.disabled.load(Ordering::Relaxed) {
            let mut idle = self.idle.lock().expect("the pipe pool's lock is never poisoned");
            // Below the cap, so the pool never keeps more than it may lend.
            if idle.len() < self.max.load(Ordering::Relaxed) {
                idle.push(pipe);
                return;
            }
        }
        self.live.fetch_sub(1, Ordering::Relaxed);
        drop(pipe);
    }
}

impl Pipe {
    #[cfg(target_os = "linux")]
    fn new(size: usize) -> std::io::Result<Pipe> {
        use crate::sys;
        let (read, write) = sys::pipe()?;
        // Best effort: a smaller pipe still works, with more system calls.
        let capacity = match sys::set_pipe_size(write.as_fd(), size) {
            Ok(n) => n,
            Err(_) => sys::pipe_size(write.as_fd())?,
        };
        if capacity < MIN_USEFUL_PIPE {
            // The user is over its pipe allowance: the kernel hands out
            // tiny pipes, slower than a userspace copy.
            return Err(std::io::Error::other(format!(
                "the kernel granted a pipe of {capacity} bytes"
            )));
        }
        Ok(Pipe { read, write, capacity })
    }

    #[cfg(not(target_os = "linux"))]
    fn new(_size: usize) -> std::io::Result<Pipe> {
        Err(std::io::ErrorKind::Unsupported.into())
    }
}

impl Lease<'_> {
    fn pipe(&self) -> &Pipe {
        self.pipe.as_ref().expect("a lease holds its pipe until dropped")
    }

    pub fn read_end(&self) -> BorrowedFd<'_> {
        self.pipe().read.as_fd()
    }

    pub fn write_end(&self) -> BorrowedFd<'_> {
        self.pipe().write.as_fd()
    }

    /// Bytes the pipe holds at most.
    pub fn capacity(&self) -> usize {
        self.pipe().capacity
    }

    /// Bytes in the pipe, as recorded with [`Lease::filled`] and [`Lease::drained`].
    pub fn held(&self) -> usize {
        self.held
    }

    /// Records `n` bytes written into the pipe.
    pub fn filled(&mut self, n: usize) {
        self.held += n;
    }

    /// Records `n` bytes taken out of the pipe.
    pub fn drained(&mut self, n: usize) {
        debug_assert!(n <= self.held, "drained more than the pipe held");
        self.held -= n;
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let Some(pipe) = self.pipe.take() else { return };
        if self.held == 0 {
            self.pool.give_back(pipe);
        } else {
            // Bytes of this connection must never reach another one.
            self.pool.live.fetch_sub(1, Ordering::Relaxed);
            drop(pipe);
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use crate::sys;
    use std::os::fd::AsRawFd;

    #[test]
    fn an_empty_pipe_goes_back_to_the_pool_and_is_reused() {
        let pipes = Pipes::new(4, PIPE_SIZE);
        let fd = {
            let lease = pipes.lease().expect("a pipe");
            assert!(lease.capacity() >= MIN_USEFUL_PIPE);
            assert_eq!(pipes.live(), 1);
            assert_eq!(pipes.idle(), 0);
            lease.read_end().as_raw_fd()
        };
        assert_eq!((pipes.live(), pipes.idle()), (1, 1));
        let again = pipes.lease().expect("a pipe");
        assert_eq!(again.read_end().as_raw_fd(), fd, "the pooled pipe was not reused");
        assert_eq!((pipes.live(), pipes.idle()), (1, 0));
    }

    #[test]
    fn a_pipe_that_holds_bytes_is_closed_not_pooled() {
        let pipes = Pipes::new(4, PIPE_SIZE);
        let mut lease = pipes.lease().expect("a pipe");
        let n = sys::write(lease.write_end(), b"left behind").unwrap();
        lease.filled(n);
        drop(lease);
        assert_eq!((pipes.live(), pipes.idle()), (0, 0));
        // Whatever comes next is empty.
        let lease = pipes.lease().expect("a pipe");
        assert_eq!(sys::pending(lease.read_end()).unwrap(), 0);
    }

    #[test]
    fn a_drained_pipe_is_pooled_empty() {
        let pipes = Pipes::new(4, PIPE_SIZE);
        let mut lease = pipes.lease().expect("a pipe");
        let n = sys::write(lease.write_end(), b"passing through").unwrap();
        lease.filled(n);
        let mut buf = [0u8; 64];
        let m = sys::read(lease.read_end(), &mut buf).unwrap();
        lease.drained(m);
        assert_eq!(lease.held(), 0);
        drop(lease);
        assert_eq!((pipes.live(), pipes.idle()), (1, 1));
        let lease = pipes.lease().expect("a pipe");
        assert_eq!(sys::pending(lease.read_end()).unwrap(), 0);
    }

    #[test]
    fn the_pool_is_bounded_and_lends_again_once_a_pipe_is_back() {
        let pipes = Pipes::new(2, PIPE_SIZE);
        let a = pipes.lease().expect("first");
        let b = pipes.lease().expect("second");
        assert!(pipes.lease().is_none(), "a third pipe beyond the cap");
        assert_eq!(pipes.live(), 2);
        drop(a);
        let c = pipes.lease().expect("a pipe once one is back");
        drop((b, c));
        assert_eq!((pipes.live(), pipes.idle()), (2, 2));
    }

    #[test]
    fn a_disabled_pool_lends_nothing_and_drops_its_pipes() {
        let pipes = Pipes::new(4, PIPE_SIZE);
        let lease = pipes.lease().expect("a pipe");
        drop(lease);
        assert_eq!(pipes.idle(), 1);
        pipes.disable();
        assert!(pipes.lease().is_none());
        assert_eq!((pipes.live(), pipes.idle()), (0, 0));
        assert!(Pipes::none().lease().is_none());
    }

    #[test]
    fn the_process_pool_fits_the_descriptor_limit_and_the_pipe_allowance() {
        let pipes = Pipes::for_process();
        let max = pipes.inner.max.load(Ordering::Relaxed);
        assert!(max <= MAX_PIPES);
        let (soft, _) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
        assert!((max as u64) * 2 <= soft / budget::PIPE_SHARE_DIVISOR);
        if let Ok(pages) = std::fs::read_to_string("/proc/sys/fs/pipe-user-pages-soft") {
            let pages: usize = pages.trim().parse().unwrap();
            if pages > 0 {
                assert!(
                    max * PIPE_SIZE <= pages * 4096 / 2,
                    "{max} pipes overfill the allowance"
                );
            }
        }
    }
}
