//! The one module allowed `unsafe`: thin wrappers over the system calls the
//! proxy's data path needs and that std, tokio and nix (with the features
//! we enable) do not offer: `pipe2`, the pipe size `fcntl`s, `splice(2)`,
//! `FIONREAD` and a plain `read(2)` on a pipe.
//!
//! Each wrapper is safe to call: it takes borrowed descriptors and slices,
//! returns `io::Result`, and owns nothing beyond the descriptors it hands
//! back. Policy (when to splice, pooling, readiness) lives in `proxy`.
//! Everything here is Linux only; other systems get no pipes and the proxy
//! copies in userspace.

#![allow(unsafe_code)]

#[cfg(target_os = "linux")]
pub use linux::*;

#[cfg(target_os = "linux")]
mod linux {
    use std::io;
    use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

    /// Turns a `-1` return into the thread's `errno`.
    fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    }

    /// Both ends of a new pipe, non-blocking and close-on-exec: (read, write).
    pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
        let mut fds: [libc::c_int; 2] = [-1, -1];
        // SAFETY: `fds` is a writable array of two c_ints, which is what
        // pipe2 writes to; the flags are valid for pipe2.
        check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) })?;
        // SAFETY: pipe2 succeeded, so both descriptors are open, and nothing
        // else owns them: they were created just now for us alone.
        Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
    }

    /// Asks the kernel to make the pipe of `fd` hold `bytes`; returns what
    /// it holds now. Fails (EPERM) above `/proc/sys/fs/pipe-max-size` or
    /// when the user is over its pipe-page allowance.
    pub fn set_pipe_size(fd: BorrowedFd<'_>, bytes: usize) -> io::Result<usize> {
        let want = libc::c_int::try_from(bytes).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: F_SETPIPE_SZ takes an int argument and touches no memory
        // of ours; `fd` is a live descriptor for the duration of the call.
        let got = check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, want) })?;
        Ok(got as usize)
    }

    /// How many bytes the pipe of `fd` holds at most.
    pub fn pipe_size(fd: BorrowedFd<'_>) -> io::Result<usize> {
        // SAFETY: F_GETPIPE_SZ takes no argument and touches no memory of
        // ours; `fd` is a live descriptor for the duration of the call.
        let got = check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETPIPE_SZ) })?;
        Ok(got as usize)
    }

    /// Bytes waiting to be read from `fd` (a pipe or a socket): for tests
    /// that check a pooled pipe is empty.
    #[cfg(test)]
    pub fn pending(fd: BorrowedFd<'_>) -> io::Result<usize> {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int through the pointer, which points
        // to `n`, alive and writable for the duration of the call.
        check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n as *mut libc::c_int) })?;
        Ok(n as usize)
    }

    /// Moves up to `len` bytes from `from` to `to`, one of which must be a
    /// pipe, without copying them through userspace. Never blocks on the
    /// pipe (`SPLICE_F_NONBLOCK`); the socket side must be non-blocking
    /// itself. `Ok(0)` from a socket is its end of stream.
    pub fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
        // SAFETY: null offsets mean "the file position", which is what
        // pipes and sockets require; splice reads no memory of ours, and
        // both descriptors are live for the duration of the call.
        let n = unsafe {
            libc::splice(
                from.as_raw_fd(),
                std::ptr::null_mut(),
                to.as_raw_fd(),
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// `read(2)` into `buf`: for emptying a pipe by hand.
    pub fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`,
        // which is valid and exclusively borrowed for the call.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// `write(2)` from `buf`: for filling a pipe in tests.
    #[cfg(test)]
    pub fn write(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: the kernel reads at most `buf.len()` bytes from `buf`,
        // which is valid for the duration of the call.
        let n = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use std::os::fd::AsFd;

        #[test]
        fn a_pipe_carries_bytes_and_reports_what_it_holds() {
            let (r, w) = pipe().unwrap();
            assert_eq!(pending(r.as_fd()).unwrap(), 0);
            assert_eq!(write(w.as_fd(), b"hello").unwrap(), 5);
            assert_eq!(pending(r.as_fd()).unwrap(), 5);
            let mut buf = [0u8; 16];
            assert_eq!(read(r.as_fd(), &mut buf).unwrap(), 5);
            assert_eq!(&buf[..5], b"hello");
            let err = read(r.as_fd(), &mut buf).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "the pipe is non-blocking");
        }

        #[test]
        fn pipe_size_can_be_asked_for() {
            let (r, _w) = pipe().unwrap();
            let before = pipe_size(r.as_fd()).unwrap();
            assert!(before >= 4096);
            // Best effort, as in the pool: a user over its allowance may be refused.
            if let Ok(got) = set_pipe_size(r.as_fd(), 256 * 1024) {
                assert!(got >= 256 * 1024);
                assert_eq!(pipe_size(r.as_fd()).unwrap(), got);
            }
        }

        #[test]
        fn splice_moves_between_pipes_and_does_not_block() {
            let (r1, w1) = pipe().unwrap();
            let (r2, w2) = pipe().unwrap();
            let err = splice(r1.as_fd(), w2.as_fd(), 1024).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "empty source");
            write(w1.as_fd(), b"abc").unwrap();
            assert_eq!(splice(r1.as_fd(), w2.as_fd(), 1024).unwrap(), 3);
            let mut buf = [0u8; 8];
            assert_eq!(read(r2.as_fd(), &mut buf).unwrap(), 3);
            assert_eq!(&buf[..3], b"abc");
            drop(w1);
            assert_eq!(splice(r1.as_fd(), w2.as_fd(), 1024).unwrap(), 0, "end of stream");
        }
    }
}
