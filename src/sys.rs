//! The one module allowed `unsafe`: thin wrappers over the system calls the
//! proxy's data path needs and that std, tokio and nix (with the features
//! we enable) do not offer: `pipe2`, the pipe size `fcntl`s, `splice(2)`,
//! `FIONREAD` and a plain `read(2)` on a pipe; and `recvmmsg(2)` /
//! `sendmmsg(2)`, which move a batch of datagrams per system call for the
//! UDP services; and the registration of the raw sensor's sockets with
//! tokio's reactor.
//!
//! Each wrapper is safe to call: it takes borrowed descriptors and slices,
//! returns `io::Result`, and owns nothing beyond the descriptors it hands
//! back. Policy (when to splice, pooling, readiness) lives in `proxy`.
//! Everything here is Linux only; other systems get no pipes and the proxy
//! copies in userspace, and their UDP batches hold one datagram.

#![allow(unsafe_code)]

#[cfg(target_os = "linux")]
pub(crate) use linux::*;
#[cfg(not(target_os = "linux"))]
pub(crate) use portable::*;

/// Most datagrams one batched receive or send moves.
pub(crate) const BATCH: usize = 32;

/// Room for one datagram of a batch: the largest UDP payload (65527 bytes
/// over IPv6) fits, so nothing is ever truncated. The slots are allocated
/// zeroed and untouched, so the kernel backs only the pages datagrams
/// actually fill: small datagrams cost a page per slot, not 64 KiB.
pub(crate) const SLOT: usize = 64 * 1024;

/// Registers an owned socket with tokio's reactor (the raw sensor's
/// sockets, which tokio has no type for).
pub(crate) fn async_socket(socket: socket2::Socket) -> std::io::Result<tokio::io::unix::AsyncFd<socket2::Socket>> {
    // SAFETY: the AsyncFd takes `socket` by value, so the descriptor stays
    // open, and refers to the same socket, until the AsyncFd is dropped;
    // socket2's `as_raw_fd` always returns that one descriptor.
    unsafe { tokio::io::unix::AsyncFd::register(socket) }.map_err(|e| e.into_parts().1)
}

#[cfg(not(target_os = "linux"))]
mod portable {
    use std::io;
    use std::mem::MaybeUninit;
    use std::net::SocketAddr;
    use std::os::fd::BorrowedFd;

    /// A batch of one datagram (no `recvmmsg(2)` here).
    pub(crate) struct RecvBatch {
        buf: Box<[u8]>,
        len: usize,
        from: Option<SocketAddr>,
        count: usize,
    }

    impl RecvBatch {
        pub(crate) fn new() -> Self {
            Self {
                buf: vec![0u8; super::SLOT].into_boxed_slice(),
                len: 0,
                from: None,
                count: 0,
            }
        }

        pub(crate) fn recv(&mut self, fd: BorrowedFd<'_>) -> io::Result<usize> {
            self.count = 0;
            let sock = socket2::SockRef::from(&fd);
            // SAFETY: u8 and MaybeUninit<u8> have the same layout, and the
            // buffer is initialised already; recv_from only writes to it.
            let buf = unsafe { &mut *(&mut self.buf[..] as *mut [u8] as *mut [MaybeUninit<u8>]) };
            let (len, from) = sock.recv_from(buf)?;
            self.len = len;
            self.from = from.as_socket();
            self.count = 1;
            Ok(1)
        }

        pub(crate) fn len(&self) -> usize {
            self.count
        }

        pub(crate) fn payload(&self, _i: usize) -> &[u8] {
            &self.buf[..self.len]
        }

        pub(crate) fn source(&self, _i: usize) -> Option<SocketAddr> {
            self.from
        }
    }

    pub(crate) fn send_many<'a>(
        fd: BorrowedFd<'_>,
        payloads: impl Iterator<Item = &'a [u8]>,
        to: Option<SocketAddr>,
        _gso: bool,
    ) -> io::Result<usize> {
        let sock = socket2::SockRef::from(&fd);
        let mut sent = 0;
        for p in payloads {
            let r = match to {
                Some(to) => sock.send_to(p, &to.into()),
                None => sock.send(p),
            };
            match r {
                Ok(_) => sent += 1,
                Err(e) if sent == 0 => return Err(e),
                Err(_) => break,
            }
        }
        Ok(sent)
    }

    pub(crate) fn gso_unsupported(_e: &io::Error) -> bool {
        false
    }

    pub(crate) fn unlisten(_fd: BorrowedFd<'_>) -> io::Result<()> {
        Err(io::Error::new(io::ErrorKind::Unsupported, "closed mode needs Linux"))
    }

    pub(crate) fn trim_heap() -> bool {
        false
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use std::io;
    use std::net::SocketAddr;
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
    pub(crate) fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
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
    pub(crate) fn set_pipe_size(fd: BorrowedFd<'_>, bytes: usize) -> io::Result<usize> {
        let want = libc::c_int::try_from(bytes).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: F_SETPIPE_SZ takes an int argument and touches no memory
        // of ours; `fd` is a live descriptor for the duration of the call.
        let got = check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, want) })?;
        Ok(got as usize)
    }

    /// How many bytes the pipe of `fd` holds at most.
    pub(crate) fn pipe_size(fd: BorrowedFd<'_>) -> io::Result<usize> {
        // SAFETY: F_GETPIPE_SZ takes no argument and touches no memory of
        // ours; `fd` is a live descriptor for the duration of the call.
        let got = check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETPIPE_SZ) })?;
        Ok(got as usize)
    }

    /// Bytes waiting to be read from `fd` (a pipe or a socket): for tests
    /// that check a pooled pipe is empty.
    #[cfg(test)]
    pub(crate) fn pending(fd: BorrowedFd<'_>) -> io::Result<usize> {
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
    pub(crate) fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
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
    pub(crate) fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
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
    pub(crate) fn write(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: the kernel reads at most `buf.len()` bytes from `buf`,
        // which is valid for the duration of the call.
        let n = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Hands the allocator's free memory back to the kernel (glibc keeps
    /// what a burst of connections freed, in every arena, until asked).
    /// Returns whether any was released; a no-op elsewhere than glibc.
    /// Makes a listening TCP socket stop listening and keeps its bound
    /// port: `connect(2)` with `AF_UNSPEC` disconnects it (connections
    /// waiting in the backlog are reset).
    pub(crate) fn unlisten(fd: BorrowedFd<'_>) -> io::Result<()> {
        let addr = libc::sockaddr {
            sa_family: libc::AF_UNSPEC as libc::sa_family_t,
            sa_data: [0; 14],
        };
        let len = std::mem::size_of::<libc::sockaddr>() as libc::socklen_t;
        // SAFETY: `fd` is a live descriptor for the call's duration; the
        // address is a valid `sockaddr` of the length given.
        let r = unsafe { libc::connect(fd.as_raw_fd(), &addr, len) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub(crate) fn trim_heap() -> bool {
        #[cfg(target_env = "gnu")]
        {
            // SAFETY: malloc_trim takes a plain integer (the padding to keep
            // at the top of the heap) and is safe to call from any thread.
            unsafe { libc::malloc_trim(0) == 1 }
        }
        #[cfg(not(target_env = "gnu"))]
        {
            false
        }
    }

    /// Up to [`BATCH`](super::BATCH) received datagrams, with their
    /// senders, filled by one `recvmmsg(2)`. Allocated once per receiving
    /// loop (or thread) and reused, so receiving allocates nothing.
    pub(crate) struct RecvBatch {
        bufs: Box<[u8]>,
        addrs: Box<[libc::sockaddr_storage]>,
        lens: [usize; super::BATCH],
        count: usize,
    }

    impl Default for RecvBatch {
        fn default() -> Self {
            Self::new()
        }
    }

    impl RecvBatch {
        pub(crate) fn new() -> Self {
            // SAFETY: sockaddr_storage is plain old data; all zeroes is a
            // valid (AF_UNSPEC) value.
            let empty: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
            Self {
                bufs: vec![0u8; super::BATCH * super::SLOT].into_boxed_slice(),
                addrs: vec![empty; super::BATCH].into_boxed_slice(),
                lens: [0; super::BATCH],
                count: 0,
            }
        }

        /// Receives what `fd` (a non-blocking datagram socket) has queued,
        /// up to a batch, without waiting: `Ok(n)` with `n >= 1`, or
        /// `WouldBlock` when nothing is queued.
        pub(crate) fn recv(&mut self, fd: BorrowedFd<'_>) -> io::Result<usize> {
            const N: usize = super::BATCH;
            self.count = 0;
            // SAFETY: iovec and mmsghdr are plain old data, for which all
            // zeroes is valid; every field that matters is set below.
            let mut iovs: [libc::iovec; N] = unsafe { std::mem::zeroed() };
            let mut hdrs: [libc::mmsghdr; N] = unsafe { std::mem::zeroed() };
            let base = self.bufs.as_mut_ptr();
            for i in 0..N {
                // SAFETY: slot i lies within `bufs`, which holds N slots.
                iovs[i].iov_base = unsafe { base.add(i * super::SLOT) }.cast();
                iovs[i].iov_len = super::SLOT;
                let h = &mut hdrs[i].msg_hdr;
                h.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
                h.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
                h.msg_iov = &mut iovs[i];
                h.msg_iovlen = 1;
            }
            // SAFETY: `hdrs` holds N headers whose name, iovec and buffer
            // pointers all point into `self.addrs`, `iovs` and `self.bufs`,
            // which are alive, exclusively borrowed and large enough for the
            // lengths given; no control buffers; a null timeout.
            let n = unsafe {
                libc::recvmmsg(
                    fd.as_raw_fd(),
                    hdrs.as_mut_ptr(),
                    N as libc::c_uint,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let n = n as usize;
            for (i, h) in hdrs.iter().enumerate().take(n) {
                self.lens[i] = h.msg_len as usize;
                if h.msg_hdr.msg_namelen == 0 {
                    // A connected socket may leave the name empty.
                    self.addrs[i].ss_family = libc::AF_UNSPEC as libc::sa_family_t;
                }
            }
            self.count = n;
            Ok(n)
        }

        /// Datagrams in the batch.
        pub(crate) fn len(&self) -> usize {
            self.count
        }

        /// The payload of datagram `i` (`i < len()`).
        pub(crate) fn payload(&self, i: usize) -> &[u8] {
            assert!(i < self.count, "datagram {i} of a batch of {}", self.count);
            let start = i * super::SLOT;
            &self.bufs[start..start + self.lens[i]]
        }

        /// Who sent datagram `i`; None for an address family other than
        /// IPv4 and IPv6.
        pub(crate) fn source(&self, i: usize) -> Option<SocketAddr> {
            assert!(i < self.count, "datagram {i} of a batch of {}", self.count);
            let a = &self.addrs[i];
            match a.ss_family as libc::c_int {
                libc::AF_INET => {
                    // SAFETY: the family says the storage holds a
                    // sockaddr_in, which it is large and aligned enough for.
                    let v4 = unsafe { &*(a as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
                    let ip = std::net::Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr));
                    Some(SocketAddr::from((ip, u16::from_be(v4.sin_port))))
                }
                libc::AF_INET6 => {
                    // SAFETY: as above, for sockaddr_in6.
                    let v6 = unsafe { &*(a as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
                    let ip = std::net::Ipv6Addr::from(v6.sin6_addr.s6_addr);
                    Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                        ip,
                        u16::from_be(v6.sin6_port),
                        v6.sin6_flowinfo,
                        v6.sin6_scope_id,
                    )))
                }
                _ => None,
            }
        }
    }

    /// Most segments one UDP GSO send carries (the kernel's
    /// `UDP_MAX_SEGMENTS` is 64 or more).
    const GSO_MAX_SEGMENTS: usize = 64;
    /// Most payload bytes one UDP GSO send carries: what one datagram
    /// could hold over IPv4.
    const GSO_MAX_BYTES: usize = 65_507;
    /// Largest datagram sent with GSO: a GSO segment may not be fragmented,
    /// so it must fit the path's MTU, which we do not know; 1232 bytes fit
    /// IPv6's minimum MTU of 1280 (and IPv4 paths alike). Larger datagrams
    /// go one per message and may be fragmented as usual.
    const GSO_MAX_SEGMENT: usize = 1232;

    /// A control message buffer for one `UDP_SEGMENT` option, aligned as
    /// `cmsghdr` requires.
    #[derive(Clone, Copy)]
    #[repr(C, align(8))]
    struct SegmentCmsg([u8; 32]);

    /// Sends up to [`BATCH`](super::BATCH) of `payloads` as datagrams with
    /// one `sendmmsg(2)` on `fd` (non-blocking), each to `to` or, when None,
    /// to the socket's peer. With `gso`, each run of equal-sized payloads
    /// (the last of a run may be shorter) goes as one UDP GSO message: the
    /// kernel carries it through its stack once and cuts it into the same
    /// datagrams at the receiver or the device, which is what makes small
    /// datagrams cheap. Returns how many payloads went: fewer than given
    /// when the kernel stopped at an error, which the next call would
    /// report; the error itself when the first could not go. A kernel or
    /// route without UDP GSO fails a GSO message (`EIO`, `EINVAL`,
    /// `ENOPROTOOPT` or `EOPNOTSUPP`): when that message is the first, the
    /// error comes back as [`gso_unsupported`]; send without GSO then.
    pub(crate) fn send_many<'a>(
        fd: BorrowedFd<'_>,
        payloads: impl Iterator<Item = &'a [u8]>,
        to: Option<SocketAddr>,
        gso: bool,
    ) -> io::Result<usize> {
        const N: usize = super::BATCH;
        let to = to.map(socket2::SockAddr::from);
        // SAFETY: plain old data, all zeroes valid; set below.
        let mut iovs: [libc::iovec; N] = unsafe { std::mem::zeroed() };
        let mut hdrs: [libc::mmsghdr; N] = unsafe { std::mem::zeroed() };
        let mut cmsgs = [SegmentCmsg([0; 32]); N];
        // Payloads in each message, to turn sent messages into payloads.
        let mut members = [0usize; N];
        let mut n = 0;
        for p in payloads.take(N) {
            iovs[n].iov_base = p.as_ptr().cast_mut().cast();
            iovs[n].iov_len = p.len();
            n += 1;
        }
        let mut messages = 0;
        let mut i = 0;
        while i < n {
            let segment = iovs[i].iov_len;
            let mut end = i + 1;
            if gso && segment > 0 && segment <= GSO_MAX_SEGMENT {
                let mut total = segment;
                while end < n && end - i < GSO_MAX_SEGMENTS && total + iovs[end].iov_len <= GSO_MAX_BYTES {
                    let len = iovs[end].iov_len;
                    if len == segment {
                        total += len;
                        end += 1;
                    } else {
                        if len < segment && len > 0 {
                            // A shorter datagram may close the run.
                            end += 1;
                        }
                        break;
                    }
                }
            }
            let h = &mut hdrs[messages].msg_hdr;
            if let Some(to) = &to {
                h.msg_name = to.as_ptr().cast_mut().cast();
                h.msg_namelen = to.len();
            }
            h.msg_iov = &mut iovs[i];
            h.msg_iovlen = end - i;
            if end - i > 1 {
                let buf = &mut cmsgs[messages];
                // SAFETY: CMSG_SPACE is arithmetic.
                let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<u16>() as libc::c_uint) } as usize;
                debug_assert!(space <= buf.0.len());
                h.msg_control = buf.0.as_mut_ptr().cast();
                h.msg_controllen = space;
                // SAFETY: the header's control buffer is `buf`, aligned for
                // cmsghdr and `space` bytes long, room for one cmsghdr and
                // a u16, so CMSG_FIRSTHDR is non-null and points into it,
                // and CMSG_DATA leaves room for the u16 written.
                unsafe {
                    let c = libc::CMSG_FIRSTHDR(h);
                    (*c).cmsg_level = libc::SOL_UDP;
                    (*c).cmsg_type = libc::UDP_SEGMENT;
                    (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as libc::c_uint) as usize;
                    std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), segment as u16);
                }
            }
            members[messages] = end - i;
            messages += 1;
            i = end;
        }
        if messages == 0 {
            return Ok(0);
        }
        // SAFETY: the first `messages` headers point at iovecs in `iovs`
        // (which point at the caller's payloads), at control buffers in
        // `cmsgs` and at `to`; all alive for the call, and the kernel only
        // reads through them (the pointers' mutable types notwithstanding).
        let sent = unsafe {
            libc::sendmmsg(
                fd.as_raw_fd(),
                hdrs.as_mut_ptr(),
                messages as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if sent < 0 {
            let e = io::Error::last_os_error();
            let refused = matches!(
                e.raw_os_error(),
                Some(libc::EIO | libc::EINVAL | libc::ENOPROTOOPT | libc::EOPNOTSUPP)
            );
            // Only the first message's failure is reported, so only when
            // that message carried the segment option is GSO to blame.
            if refused && members[0] > 1 {
                return Err(io::Error::new(io::ErrorKind::Unsupported, e));
            }
            Err(e)
        } else {
            Ok(members[..sent as usize].iter().sum())
        }
    }

    /// Whether `e`, from [`send_many`], says the kernel or route refused
    /// UDP GSO (for a message that used it).
    pub(crate) fn gso_unsupported(e: &io::Error) -> bool {
        e.kind() == io::ErrorKind::Unsupported
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

        fn udp(addr: &str) -> std::net::UdpSocket {
            let s = std::net::UdpSocket::bind(addr).unwrap();
            s.set_nonblocking(true).unwrap();
            s
        }

        #[test]
        fn a_batch_receives_what_is_queued_with_senders_and_sizes() {
            let server = udp("127.0.0.1:0");
            let a = udp("127.0.0.1:0");
            let b = udp("127.0.0.2:0");
            let mut batch = RecvBatch::new();
            let err = batch.recv(server.as_fd()).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "nothing queued");
            let to = server.local_addr().unwrap();
            a.send_to(b"one", to).unwrap();
            b.send_to(&[7u8; 65_507], to).unwrap();
            a.send_to(b"", to).unwrap();
            assert_eq!(batch.recv(server.as_fd()).unwrap(), 3);
            assert_eq!(batch.len(), 3);
            assert_eq!(
                (batch.payload(0), batch.source(0)),
                (&b"one"[..], Some(a.local_addr().unwrap()))
            );
            assert_eq!(batch.payload(1).len(), 65_507, "the largest datagram is not truncated");
            assert!(batch.payload(1).iter().all(|&x| x == 7));
            assert_eq!(batch.source(1), Some(b.local_addr().unwrap()));
            assert_eq!(batch.payload(2), b"", "an empty datagram is one too");
            assert!(batch.recv(server.as_fd()).is_err(), "drained");
        }

        #[test]
        fn a_batch_holds_at_most_batch_datagrams_and_keeps_the_rest_queued() {
            let server = udp("127.0.0.1:0");
            let client = udp("127.0.0.1:0");
            let to = server.local_addr().unwrap();
            for i in 0..(crate::sys::BATCH + 5) as u32 {
                client.send_to(&i.to_be_bytes(), to).unwrap();
            }
            let mut batch = RecvBatch::new();
            assert_eq!(batch.recv(server.as_fd()).unwrap(), crate::sys::BATCH);
            assert_eq!(batch.payload(0), 0u32.to_be_bytes());
            assert_eq!(batch.recv(server.as_fd()).unwrap(), 5);
            assert_eq!(batch.payload(0), (crate::sys::BATCH as u32).to_be_bytes(), "in order");
        }

        #[test]
        fn send_many_sends_a_batch_to_an_address_or_the_peer() {
            let server = udp("[::1]:0");
            let client = udp("[::1]:0");
            let to = server.local_addr().unwrap();
            let payloads: [&[u8]; 3] = [b"a", b"bb", b"ccc"];
            assert_eq!(
                send_many(client.as_fd(), payloads.iter().copied(), Some(to), false).unwrap(),
                3
            );
            client.connect(to).unwrap();
            assert_eq!(
                send_many(client.as_fd(), [&b"dddd"[..]].into_iter(), None, false).unwrap(),
                1
            );
            assert_eq!(send_many(client.as_fd(), std::iter::empty(), None, false).unwrap(), 0);
            let mut batch = RecvBatch::new();
            assert_eq!(batch.recv(server.as_fd()).unwrap(), 4);
            let got: Vec<&[u8]> = (0..4).map(|i| batch.payload(i)).collect();
            assert_eq!(got, [&b"a"[..], b"bb", b"ccc", b"dddd"]);
            assert_eq!(batch.source(3), Some(client.local_addr().unwrap()), "IPv6 senders too");
        }

        /// With GSO, runs of equal sizes travel as one message each, and the
        /// receiver still gets every datagram as it was, in order.
        #[test]
        fn send_many_with_gso_delivers_the_same_datagrams() {
            for (server, client) in [("127.0.0.1:0", "127.0.0.1:0"), ("[::1]:0", "[::1]:0")] {
                let server = udp(server);
                let client = udp(client);
                let to = server.local_addr().unwrap();
                let owned: Vec<Vec<u8>> = [
                    vec![1u8; 64],
                    vec![2; 64],
                    vec![3; 64],
                    vec![4; 10],
                    vec![5; 100],
                    vec![6; 100],
                    vec![],
                    vec![7; 3],
                    vec![8; 1400],
                    vec![9; 1400],
                ]
                .into_iter()
                .chain((0..20u8).map(|i| vec![i; 32]))
                .collect();
                let payloads: Vec<&[u8]> = owned.iter().map(|v| &v[..]).collect();
                let sent = match send_many(client.as_fd(), payloads.iter().copied(), Some(to), true) {
                    Ok(n) => n,
                    Err(e) if gso_unsupported(&e) => {
                        eprintln!("no UDP GSO here ({e}); checking the plain path only");
                        send_many(client.as_fd(), payloads.iter().copied(), Some(to), false).unwrap()
                    }
                    Err(e) => panic!("send_many: {e}"),
                };
                assert_eq!(sent, payloads.len());
                let mut got: Vec<Vec<u8>> = Vec::new();
                let mut batch = RecvBatch::new();
                while got.len() < payloads.len() {
                    let n = batch.recv(server.as_fd()).expect("all datagrams are queued");
                    got.extend((0..n).map(|i| batch.payload(i).to_vec()));
                }
                assert_eq!(got, owned);
            }
        }
    }
}
