//! Classic BPF socket filters: one that admits a set of source addresses,
//! and the raw sensor's, which passes only what the sensor needs
//! ([`raw_sensor`]).
//!
//! [`admit`] builds the program a guarded listener attaches with
//! `SO_ATTACH_FILTER` so that the kernel drops datagrams from every other
//! source before they reach userspace. It is pure: attaching, and keeping
//! the program in step with the grants, belong to the listener's owner
//! (see `udp::kernel`). The program reads the source address from the IP
//! header through the kernel's negative offsets (`SKF_NET_OFF`), so it does
//! not depend on the transport header in front of it.
//!
//! An IPv6 listener may be dual-stack: IPv4 datagrams reach it with
//! v4-mapped addresses in userspace, but the filter sees the packet as it
//! arrived, an IPv4 header. The program branches on the version nibble and
//! compares an IPv4 header's source against the IPv4 sources. (An IPv6
//! header never carries a v4-mapped source: the kernel drops such packets
//! on input.)
//!
//! A conditional jump reaches at most 255 instructions ahead, so the
//! comparisons come in chunks, each followed by its own `ret accept`.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Most instructions the kernel takes in one classic program (`BPF_MAXINSNS`).
pub const MAX_INSNS: usize = 4096;

/// Offset of the network header in absolute loads (`SKF_NET_OFF`).
const NET_OFF: i32 = -0x10_0000;

// Opcodes (linux/bpf_common.h, linux/filter.h), checked against libc's in
// the tests.
/// `BPF_LD | BPF_W | BPF_ABS`: A = the 32-bit word at k.
const LD_W_ABS: u16 = 0x20;
/// `BPF_LD | BPF_B | BPF_ABS`: A = the byte at k.
const LD_B_ABS: u16 = 0x30;
/// `BPF_LD | BPF_W | BPF_MEM`: A = M[k].
const LD_W_MEM: u16 = 0x60;
/// `BPF_ST`: M[k] = A.
const ST: u16 = 0x02;
/// `BPF_ALU | BPF_AND | BPF_K`: A &= k.
const ALU_AND_K: u16 = 0x54;
/// `BPF_JMP | BPF_JA`: skip k instructions.
const JMP_JA: u16 = 0x05;
/// `BPF_JMP | BPF_JEQ | BPF_K`: skip jt if A == k, else jf.
const JMP_JEQ_K: u16 = 0x15;
/// `BPF_RET | BPF_K`: return k (bytes of the packet to keep).
const RET_K: u16 = 0x06;
/// `BPF_LDX | BPF_B | BPF_MSH`: X = 4 * (the byte at k & 0xf), an IPv4
/// header's length.
const LDX_MSH: u16 = 0xb1;
/// `BPF_LDX | BPF_W | BPF_IMM`: X = k.
const LDX_IMM: u16 = 0x01;
/// `BPF_LD | BPF_H | BPF_IND`: A = the 16-bit word at X + k.
const LD_H_IND: u16 = 0x48;
/// `BPF_LD | BPF_B | BPF_IND`: A = the byte at X + k.
const LD_B_IND: u16 = 0x50;
/// `BPF_JMP | BPF_JGT | BPF_K`: skip jt if A > k, else jf.
const JMP_JGT_K: u16 = 0x25;
/// `BPF_JMP | BPF_JGE | BPF_K`: skip jt if A >= k, else jf.
const JMP_JGE_K: u16 = 0x35;

/// Offset of the kernel's ancillary data in absolute loads (`SKF_AD_OFF`).
const AD_OFF: i32 = -0x1000;
/// The packet type (`SKF_AD_PKTTYPE`): `PACKET_HOST` and the others.
const AD_PKTTYPE: i32 = 4;
/// A packet addressed to this host (`PACKET_HOST`), not a broadcast or a
/// multicast one.
const PACKET_HOST: u32 = 0;

/// Return value that keeps the whole packet.
pub const ACCEPT: u32 = u32::MAX;
/// Return value that drops the packet.
pub const DROP: u32 = 0;

/// IPv4 header: source address at 12.
const V4_SOURCE: i32 = 12;
/// IPv6 header: source address at 8..24, four words.
const V6_SOURCE: i32 = 8;

/// IPv4 comparisons per chunk: one `jeq` each, the first of which must
/// reach the chunk's `ret` 255 instructions on.
const V4_PER_CHUNK: usize = 256;
/// IPv6 comparisons per chunk: eight instructions each (four loads and
/// four `jeq`), the last of the first reaching the `ret` 248 on.
const V6_PER_CHUNK: usize = 32;
/// Instructions per IPv6 comparison.
const V6_TEST: usize = 8;

/// One classic BPF instruction (`struct sock_filter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

impl Insn {
    const fn new(code: u16, k: u32) -> Self {
        Self { code, jt: 0, jf: 0, k }
    }

    /// The instruction as `SO_ATTACH_FILTER` takes it.
    pub fn sock_filter(self) -> nix::libc::sock_filter {
        nix::libc::sock_filter {
            code: self.code,
            jt: self.jt,
            jf: self.jf,
            k: self.k,
        }
    }
}

/// The program that passes everything: what a listener attaches when its
/// sources do not fit, so that userspace filters alone.
pub const ACCEPT_ALL: [Insn; 1] = [Insn::new(RET_K, ACCEPT)];

/// The program that drops everything.
pub const DROP_ALL: [Insn; 1] = [Insn::new(RET_K, DROP)];

/// The address family of the listener the program is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Sees only IPv4 headers.
    V4,
    /// Sees IPv6 headers, and IPv4 ones too when dual-stack.
    V6,
}

impl Family {
    pub fn of(addr: &std::net::SocketAddr) -> Self {
        if addr.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }
}

/// The sources do not fit in one program.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{sources} sources need {needed} filter instructions, more than the kernel's {MAX_INSNS}")]
pub struct TooLarge {
    pub sources: usize,
    pub needed: usize,
}

/// The program for a `family` listener that accepts packets from `sources`
/// and drops the rest. v4-mapped IPv6 sources count as IPv4; IPv6 sources
/// are left out of an IPv4 listener's program, which never sees them.
pub fn admit(family: Family, sources: &BTreeSet<IpAddr>) -> Result<Vec<Insn>, TooLarge> {
    let mut v4 = BTreeSet::new();
    let mut v6 = BTreeSet::new();
    for source in sources {
        match source.to_canonical() {
            IpAddr::V4(a) => v4.insert(a),
            IpAddr::V6(a) => family == Family::V6 && v6.insert(a),
        };
    }
    let needed = length(family, v4.len(), v6.len());
    if needed > MAX_INSNS {
        return Err(TooLarge {
            sources: sources.len(),
            needed,
        });
    }
    let mut asm = Asm::default();
    match family {
        Family::V4 if v4.is_empty() => asm.ret(DROP),
        Family::V4 => v4_part(&mut asm, &v4),
        Family::V6 if v4.is_empty() && v6.is_empty() => asm.ret(DROP),
        Family::V6 => {
            let (is_v4, not_v4, v4_label) = (asm.label(), asm.label(), asm.label());
            asm.emit(LD_B_ABS, net(0));
            asm.emit(ALU_AND_K, 0xf0);
            asm.jeq(0x40, is_v4, not_v4);
            asm.bind(is_v4);
            asm.ja(v4_label);
            asm.bind(not_v4);
            v6_part(&mut asm, &v6);
            asm.bind(v4_label);
            v4_part(&mut asm, &v4);
        }
    }
    let program = asm.finish();
    debug_assert_eq!(program.len(), needed, "length() disagrees with the program");
    Ok(program)
}

/// Instructions [`admit`] emits for `v4` IPv4 and `v6` IPv6 sources.
fn length(family: Family, v4: usize, v6: usize) -> usize {
    let v4_part = if v4 == 0 {
        1
    } else {
        1 + v4 + v4.div_ceil(V4_PER_CHUNK) + 1
    };
    let v6_part = if v6 == 0 {
        1
    } else {
        8 + V6_TEST * v6 + v6.div_ceil(V6_PER_CHUNK) + 1
    };
    match family {
        Family::V4 => v4_part,
        Family::V6 if v4 == 0 && v6 == 0 => 1,
        Family::V6 => 4 + v6_part + v4_part,
    }
}

/// The IPv4 branch: accepts an IPv4 header whose source is in `sources`.
fn v4_part(asm: &mut Asm, sources: &BTreeSet<Ipv4Addr>) {
    if sources.is_empty() {
        return asm.ret(DROP);
    }
    asm.emit(LD_W_ABS, net(V4_SOURCE));
    let words: Vec<u32> = sources.iter().map(|a| u32::from(*a)).collect();
    chunked(asm, &words, V4_PER_CHUNK, |asm, word, accept, miss| {
        asm.jeq(*word, accept, miss);
    });
    asm.ret(DROP);
}

/// The IPv6 branch: accepts an IPv6 header whose source is in `sources`.
fn v6_part(asm: &mut Asm, sources: &BTreeSet<Ipv6Addr>) {
    if sources.is_empty() {
        return asm.ret(DROP);
    }
    // The four words once into scratch memory, M[i] = word i.
    for i in 0..4u32 {
        asm.emit(LD_W_ABS, net(V6_SOURCE + 4 * i as i32));
        asm.emit(ST, i);
    }
    let addrs: Vec<[u32; 4]> = sources.iter().map(words).collect();
    chunked(asm, &addrs, V6_PER_CHUNK, |asm, w, accept, miss| {
        // The last word first: it is the one that differs most between
        // the hosts of one network, so most misses are seen at once.
        for i in (1..4).rev() {
            let next = asm.label();
            asm.emit(LD_W_MEM, i as u32);
            asm.jeq(w[i], next, miss);
            asm.bind(next);
        }
        asm.emit(LD_W_MEM, 0);
        asm.jeq(w[0], accept, miss);
    });
    asm.ret(DROP);
}

fn words(a: &Ipv6Addr) -> [u32; 4] {
    let o = a.octets();
    std::array::from_fn(|i| u32::from_be_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]))
}

/// Emits `test` for each item, `per_chunk` at a time, each chunk followed
/// by the `ret accept` its tests jump to; a test that misses goes on to
/// the next, the chunk's last past that `ret`.
fn chunked<T>(asm: &mut Asm, items: &[T], per_chunk: usize, test: impl Fn(&mut Asm, &T, Label, Label)) {
    chunked_ret(asm, items, per_chunk, ACCEPT, test);
}

/// [`chunked`], each chunk's `ret` returning `hit`.
fn chunked_ret<T>(asm: &mut Asm, items: &[T], per_chunk: usize, hit: u32, test: impl Fn(&mut Asm, &T, Label, Label)) {
    for chunk in items.chunks(per_chunk) {
        let accept = asm.label();
        for (i, item) in chunk.iter().enumerate() {
            let miss = asm.label();
            test(asm, item, accept, miss);
            if i + 1 == chunk.len() {
                asm.bind(accept);
                asm.ret(hit);
            }
            asm.bind(miss);
        }
    }
}

/// Where a raw socket's packets start when its filter runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawHeader {
    /// At the IPv4 header (an `AF_INET` raw socket).
    Ipv4,
    /// At the transport header (an `AF_INET6` raw socket: the kernel has
    /// pulled the IPv6 header and its extension headers off).
    Transport,
}

/// The transport protocol of a raw socket's packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawProto {
    /// Only SYNs without ACK pass: new connection attempts.
    Tcp,
    Udp,
}

/// What the raw sensor's program passes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawWatch {
    /// Destination ports the sensor watches (knock steps, traps, SPA).
    pub ports: BTreeSet<u16>,
    /// Other destination ports that pass too (for resets), when wanted.
    pub others: Option<OtherPorts>,
}

/// The other ports the raw sensor sees: every port outside the local
/// ephemeral range (where replies to this host's own connections land),
/// except `except` (the guarded services and their upstreams, whose
/// traffic is the proxy's), and only in packets addressed to this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtherPorts {
    pub ephemeral: std::ops::RangeInclusive<u16>,
    pub except: BTreeSet<u16>,
}

/// Port comparisons per chunk: one `jeq` each, as for IPv4 sources.
const PORTS_PER_CHUNK: usize = 256;

/// The program of one raw socket of the sensor: TCP SYNs without ACK (for
/// [`RawProto::Tcp`]) or UDP datagrams whose destination port is watched,
/// or is one of the other ports; everything else (the proxied traffic
/// above all) is dropped in the kernel and never copied to userspace.
pub fn raw_sensor(header: RawHeader, proto: RawProto, watch: &RawWatch) -> Result<Vec<Insn>, TooLarge> {
    let except = watch.others.as_ref().map_or(0, |o| o.except.len());
    let needed = raw_length(proto, watch.ports.len(), watch.others.is_some(), except);
    if needed > MAX_INSNS {
        return Err(TooLarge {
            sources: watch.ports.len() + except,
            needed,
        });
    }
    let mut asm = Asm::default();
    // X = where the transport header starts.
    match header {
        RawHeader::Ipv4 => asm.emit(LDX_MSH, 0),
        RawHeader::Transport => asm.emit(LDX_IMM, 0),
    }
    // Every miss below drops at a `ret` right after its test, so no
    // branch has to reach past the port lists.
    if proto == RawProto::Tcp {
        // Flags at 13: SYN (0x02) set, ACK (0x10) clear.
        let (syn, not) = (asm.label(), asm.label());
        asm.emit(LD_B_IND, 13);
        asm.emit(ALU_AND_K, 0x12);
        asm.jeq(0x02, syn, not);
        asm.bind(not);
        asm.ret(DROP);
        asm.bind(syn);
    }
    // The destination port, at 2.
    asm.emit(LD_H_IND, 2);
    let ports: Vec<u16> = watch.ports.iter().copied().collect();
    chunked(&mut asm, &ports, PORTS_PER_CHUNK, |asm, port, hit, miss| {
        asm.jeq(u32::from(*port), hit, miss);
    });
    if let Some(others) = &watch.others {
        let (inside, ephemeral, outside) = (asm.label(), asm.label(), asm.label());
        asm.jump(JMP_JGE_K, u32::from(*others.ephemeral.start()), inside, outside);
        asm.bind(inside);
        asm.jump(JMP_JGT_K, u32::from(*others.ephemeral.end()), outside, ephemeral);
        asm.bind(ephemeral);
        asm.ret(DROP);
        asm.bind(outside);
        let except: Vec<u16> = others.except.iter().copied().collect();
        chunked_ret(&mut asm, &except, PORTS_PER_CHUNK, DROP, |asm, port, hit, miss| {
            asm.jeq(u32::from(*port), hit, miss);
        });
        // Addressed to this host, not broadcast or multicast.
        let (host, not) = (asm.label(), asm.label());
        asm.emit(LD_W_ABS, (AD_OFF + AD_PKTTYPE) as u32);
        asm.jeq(PACKET_HOST, host, not);
        asm.bind(host);
        asm.ret(ACCEPT);
        asm.bind(not);
    }
    asm.ret(DROP);
    let program = asm.finish();
    debug_assert_eq!(program.len(), needed, "raw_length() disagrees with the program");
    Ok(program)
}

/// Instructions [`raw_sensor`] emits.
fn raw_length(proto: RawProto, ports: usize, others: bool, except: usize) -> usize {
    let tcp = if proto == RawProto::Tcp { 4 } else { 0 };
    let list = |n: usize| n + n.div_ceil(PORTS_PER_CHUNK);
    let others = if others { 3 + list(except) + 3 } else { 0 };
    1 + tcp + 1 + list(ports) + others + 1
}

/// `k` of an absolute load at `offset` into the network header.
fn net(offset: i32) -> u32 {
    (NET_OFF + offset) as u32
}

/// A forward jump target, placed once the code before it is emitted.
#[derive(Debug, Clone, Copy)]
struct Label(usize);

/// A tiny assembler: jumps name labels and are resolved at the end.
#[derive(Debug, Default)]
struct Asm {
    insns: Vec<Insn>,
    /// Where each label was bound.
    labels: Vec<Option<usize>>,
    /// (instruction, true target, false target) of each conditional jump;
    /// for `ja`, the false target is unused.
    jumps: Vec<(usize, Label, Label)>,
}

impl Asm {
    fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }

    fn bind(&mut self, label: Label) {
        self.labels[label.0] = Some(self.insns.len());
    }

    fn emit(&mut self, code: u16, k: u32) {
        self.insns.push(Insn::new(code, k));
    }

    fn ret(&mut self, k: u32) {
        self.emit(RET_K, k);
    }

    fn jeq(&mut self, k: u32, yes: Label, no: Label) {
        self.jump(JMP_JEQ_K, k, yes, no);
    }

    fn jump(&mut self, code: u16, k: u32, yes: Label, no: Label) {
        self.jumps.push((self.insns.len(), yes, no));
        self.emit(code, k);
    }

    fn ja(&mut self, to: Label) {
        self.jumps.push((self.insns.len(), to, to));
        self.emit(JMP_JA, 0);
    }

    fn finish(mut self) -> Vec<Insn> {
        for (at, yes, no) in std::mem::take(&mut self.jumps) {
            let offset = |label: Label| {
                let target = self.labels[label.0].expect("every label is bound");
                target.checked_sub(at + 1).expect("jumps only go forward")
            };
            let insn = &mut self.insns[at];
            if insn.code == JMP_JA {
                insn.k = u32::try_from(offset(yes)).expect("a program is shorter than 2^32");
            } else {
                let short = |o: usize| u8::try_from(o).expect("chunks keep every branch within 255");
                insn.jt = short(offset(yes));
                insn.jf = short(offset(no));
            }
        }
        self.insns
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Runs `program` the way the kernel does, on a packet whose network
    /// header is `header`. Supports the opcodes [`admit`] emits; any other
    /// opcode, or a load outside the header, ends the program with 0 (the
    /// kernel's answer to a failed load).
    fn run(program: &[Insn], header: &[u8]) -> u32 {
        let mut a: u32 = 0;
        let mut mem = [0u32; 16];
        let mut pc = 0;
        let load = |k: u32, size: usize| -> Option<u32> {
            let off = (k as i32).checked_sub(NET_OFF)?;
            let off = usize::try_from(off).ok()?;
            let bytes = header.get(off..off + size)?;
            Some(bytes.iter().fold(0u32, |acc, b| acc << 8 | u32::from(*b)))
        };
        loop {
            let insn = program[pc];
            pc += 1;
            match insn.code {
                LD_W_ABS => match load(insn.k, 4) {
                    Some(v) => a = v,
                    None => return 0,
                },
                LD_B_ABS => match load(insn.k, 1) {
                    Some(v) => a = v,
                    None => return 0,
                },
                LD_W_MEM => a = mem[insn.k as usize],
                ST => mem[insn.k as usize] = a,
                ALU_AND_K => a &= insn.k,
                JMP_JA => pc += insn.k as usize,
                JMP_JEQ_K => pc += usize::from(if a == insn.k { insn.jt } else { insn.jf }),
                RET_K => return insn.k,
                other => panic!("unexpected opcode {other:#x}"),
            }
        }
    }

    /// What the kernel's checker (`bpf_check_classic`) asks of a program
    /// that matters here: a length it takes, every jump inside it, a `ret`
    /// at the end, and scratch memory written before it is read on every
    /// path (checked by walking each path).
    fn check(program: &[Insn]) {
        assert!(
            !program.is_empty() && program.len() <= MAX_INSNS,
            "{} instructions",
            program.len()
        );
        assert_eq!(program.last().unwrap().code, RET_K, "the last instruction must return");
        for (pc, insn) in program.iter().enumerate() {
            let ends = match insn.code {
                JMP_JA => vec![pc + 1 + insn.k as usize],
                JMP_JEQ_K => vec![pc + 1 + insn.jt as usize, pc + 1 + insn.jf as usize],
                _ => vec![],
            };
            for end in ends {
                assert!(end < program.len(), "jump at {pc} lands outside the program");
            }
            if matches!(insn.code, LD_W_MEM | ST) {
                assert!(insn.k < 16, "scratch slot {} at {pc}", insn.k);
            }
        }
        // Memory: every slot read is written earlier on the straight path
        // the program takes (its only backward-free dependency).
        let mut written = [false; 16];
        for insn in program {
            match insn.code {
                ST => written[insn.k as usize] = true,
                LD_W_MEM => assert!(written[insn.k as usize], "slot {} read before written", insn.k),
                _ => {}
            }
        }
    }

    fn v4_header(source: Ipv4Addr) -> Vec<u8> {
        let mut h = vec![0u8; 20];
        h[0] = 0x45;
        h[9] = 17;
        h[12..16].copy_from_slice(&source.octets());
        h[16..20].copy_from_slice(&[127, 0, 0, 1]);
        h
    }

    fn v6_header(source: Ipv6Addr) -> Vec<u8> {
        let mut h = vec![0u8; 40];
        h[0] = 0x60;
        h[6] = 17;
        h[8..24].copy_from_slice(&source.octets());
        h[24..40].copy_from_slice(&Ipv6Addr::LOCALHOST.octets());
        h
    }

    /// The network header the filter sees for a packet from `source`
    /// (an IPv4 header for an IPv4 source, dual-stack listener or not).
    fn header(source: IpAddr) -> Vec<u8> {
        match source {
            IpAddr::V4(a) => v4_header(a),
            IpAddr::V6(a) => v6_header(a),
        }
    }

    fn set(sources: &[&str]) -> BTreeSet<IpAddr> {
        sources.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn accepts(program: &[Insn], source: &str) -> bool {
        match run(program, &header(source.parse().unwrap())) {
            ACCEPT => true,
            DROP => false,
            other => panic!("returned {other:#x}"),
        }
    }

    #[test]
    fn an_ipv4_listener_admits_exactly_its_sources() {
        let p = admit(Family::V4, &set(&["127.0.0.1", "10.1.2.3", "::1"])).unwrap();
        check(&p);
        for (source, admitted) in [
            ("127.0.0.1", true),
            ("10.1.2.3", true),
            ("127.0.0.2", false),
            ("10.1.2.4", false),
            ("3.2.1.10", false),
            ("0.0.0.0", false),
            ("255.255.255.255", false),
        ] {
            assert_eq!(accepts(&p, source), admitted, "{source}");
        }
    }

    #[test]
    fn an_ipv6_listener_admits_its_ipv6_sources_and_on_dual_stack_its_ipv4_ones() {
        let p = admit(
            Family::V6,
            &set(&["::1", "2001:db8::7", "127.0.0.3", "::ffff:10.0.0.9"]),
        )
        .unwrap();
        check(&p);
        for (source, admitted) in [
            ("::1", true),
            ("2001:db8::7", true),
            // v4-mapped traffic on a dual-stack socket: an IPv4 header.
            ("127.0.0.3", true),
            ("10.0.0.9", true),
            ("127.0.0.4", false),
            ("::2", false),
            ("2001:db8::1:7", false),
            ("2001:db9::7", false),
            ("fe80::1", false),
            // Each word must match, not just the last.
            ("1::1", false),
            ("0:0:1::1", false),
            ("0:0:0:0:1::1", false),
        ] {
            assert_eq!(accepts(&p, source), admitted, "{source}");
        }
    }

    #[test]
    fn an_ipv4_source_is_compared_only_against_an_ipv4_header() {
        // 127.0.0.3 admitted; an IPv6 header whose last word equals it,
        // and an IPv4 header whose source is the last word of ::1, drop.
        let p = admit(Family::V6, &set(&["127.0.0.3", "::1"])).unwrap();
        assert!(!accepts(&p, "::7f00:3"));
        assert!(!accepts(&p, "0.0.0.1"));
    }

    #[test]
    fn no_sources_drop_everything_in_one_instruction() {
        for family in [Family::V4, Family::V6] {
            let p = admit(family, &BTreeSet::new()).unwrap();
            assert_eq!(p, [Insn::new(RET_K, DROP)]);
        }
        // An IPv4 listener cannot see IPv6 sources.
        let p = admit(Family::V4, &set(&["::1"])).unwrap();
        assert_eq!(p, [Insn::new(RET_K, DROP)]);
    }

    #[test]
    fn an_ipv6_listener_with_only_one_family_of_sources_drops_the_other() {
        let p = admit(Family::V6, &set(&["::1"])).unwrap();
        assert!(accepts(&p, "::1"));
        assert!(!accepts(&p, "127.0.0.1"));
        let p = admit(Family::V6, &set(&["127.0.0.1"])).unwrap();
        assert!(accepts(&p, "127.0.0.1"));
        assert!(!accepts(&p, "::1"));
    }

    #[test]
    fn a_truncated_header_drops() {
        let p = admit(Family::V6, &set(&["::1", "127.0.0.1"])).unwrap();
        assert_eq!(run(&p, &v6_header(Ipv6Addr::LOCALHOST)[..20]), DROP);
        assert_eq!(run(&p, &v4_header(Ipv4Addr::LOCALHOST)[..14]), DROP);
        assert_eq!(run(&p, &[]), DROP);
    }

    fn many_v4(n: u32) -> BTreeSet<IpAddr> {
        (0..n)
            .map(|i| IpAddr::from(Ipv4Addr::from(0x0a00_0000 + i * 3)))
            .collect()
    }

    fn many_v6(n: u32) -> BTreeSet<IpAddr> {
        (0..n)
            .map(|i| {
                IpAddr::from(Ipv6Addr::new(
                    0x2001,
                    0xdb8,
                    0,
                    (i >> 8) as u16,
                    0,
                    0,
                    0,
                    (i * 5) as u16,
                ))
            })
            .collect()
    }

    #[test]
    fn long_lists_span_chunks_and_every_branch_stays_in_reach() {
        for (v4, v6) in [(257, 0), (1000, 0), (0, 33), (100, 200), (3000, 100)] {
            let mut sources = many_v4(v4);
            sources.extend(many_v6(v6));
            for family in [Family::V4, Family::V6] {
                let p = admit(family, &sources).unwrap();
                check(&p);
                for s in &sources {
                    let expect = family == Family::V6 || s.is_ipv4();
                    assert_eq!(run(&p, &header(*s)) == ACCEPT, expect, "{s} with {v4}+{v6}");
                }
                assert!(!accepts(&p, "10.0.0.1"));
                assert!(!accepts(&p, "2001:db8::1"));
            }
        }
    }

    #[test]
    fn the_largest_programs_fit_and_one_more_source_does_not() {
        // IPv4 listener: 1 + n + ceil(n/256) + 1 <= 4096.
        let fits = 4078;
        assert_eq!(admit(Family::V4, &many_v4(fits)).unwrap().len(), MAX_INSNS);
        let err = admit(Family::V4, &many_v4(fits + 1)).unwrap_err();
        assert_eq!(err.sources, fits as usize + 1);
        assert!(err.needed > MAX_INSNS);
        // IPv6 sources take eight instructions each.
        let mut n = 0;
        while admit(Family::V6, &many_v6(n + 1)).is_ok() {
            n += 1;
        }
        assert!((500..=MAX_INSNS as u32 / 8).contains(&n), "{n} IPv6 sources fit");
        check(&admit(Family::V6, &many_v6(n)).unwrap());
    }

    #[test]
    fn the_accept_all_program_accepts() {
        check(&ACCEPT_ALL);
        assert_eq!(run(&ACCEPT_ALL, &v4_header(Ipv4Addr::LOCALHOST)), ACCEPT);
    }

    #[test]
    fn opcodes_match_the_kernel_headers() {
        use nix::libc;
        let c = |x: u32| u16::try_from(x).unwrap();
        assert_eq!(LD_W_ABS, c(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS));
        assert_eq!(LD_B_ABS, c(libc::BPF_LD | libc::BPF_B | libc::BPF_ABS));
        assert_eq!(LD_W_MEM, c(libc::BPF_LD | libc::BPF_W | libc::BPF_MEM));
        assert_eq!(ST, c(libc::BPF_ST));
        assert_eq!(ALU_AND_K, c(libc::BPF_ALU | libc::BPF_AND | libc::BPF_K));
        assert_eq!(JMP_JA, c(libc::BPF_JMP | libc::BPF_JA));
        assert_eq!(JMP_JEQ_K, c(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K));
        assert_eq!(RET_K, c(libc::BPF_RET | libc::BPF_K));
        assert_eq!(MAX_INSNS, libc::BPF_MAXINSNS as usize);
        assert_eq!(NET_OFF, libc::SKF_NET_OFF);
    }

    /// Runs a raw sensor program the way the kernel does on a packet whose
    /// data starts at `data`, of type `pkttype`. Supports the opcodes
    /// [`raw_sensor`] emits; a load outside the packet ends with 0.
    fn run_raw(program: &[Insn], data: &[u8], pkttype: u32) -> u32 {
        let (mut a, mut x, mut pc) = (0u32, 0u32, 0usize);
        let load = |off: u32, size: usize| -> Option<u32> {
            let off = usize::try_from(off).ok()?;
            let bytes = data.get(off..off.checked_add(size)?)?;
            Some(bytes.iter().fold(0u32, |acc, b| acc << 8 | u32::from(*b)))
        };
        loop {
            let insn = program[pc];
            pc += 1;
            match insn.code {
                LDX_MSH => match load(insn.k, 1) {
                    Some(v) => x = 4 * (v & 0xf),
                    None => return 0,
                },
                LDX_IMM => x = insn.k,
                LD_B_IND => match load(x + insn.k, 1) {
                    Some(v) => a = v,
                    None => return 0,
                },
                LD_H_IND => match load(x + insn.k, 2) {
                    Some(v) => a = v,
                    None => return 0,
                },
                LD_W_ABS if insn.k == (AD_OFF + AD_PKTTYPE) as u32 => a = pkttype,
                ALU_AND_K => a &= insn.k,
                JMP_JEQ_K => pc += usize::from(if a == insn.k { insn.jt } else { insn.jf }),
                JMP_JGT_K => pc += usize::from(if a > insn.k { insn.jt } else { insn.jf }),
                JMP_JGE_K => pc += usize::from(if a >= insn.k { insn.jt } else { insn.jf }),
                RET_K => return insn.k,
                other => panic!("unexpected opcode {other:#x}"),
            }
        }
    }

    /// A transport header to `port` with TCP `flags` (UDP ignores them).
    fn transport(port: u16, flags: u8) -> Vec<u8> {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&40_000u16.to_be_bytes());
        t[2..4].copy_from_slice(&port.to_be_bytes());
        t[13] = flags;
        t
    }

    /// An IPv4 packet (with `options` words of IP options) around `t`.
    fn v4_packet(options: usize, t: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 20 + 4 * options];
        p[0] = 0x40 | (5 + options as u8);
        p.extend_from_slice(t);
        p
    }

    const SYN: u8 = 0x02;
    const SYN_ACK: u8 = 0x12;
    const ACK: u8 = 0x10;
    const BROADCAST: u32 = 1;

    fn watch(ports: &[u16], others: Option<&[u16]>) -> RawWatch {
        RawWatch {
            ports: ports.iter().copied().collect(),
            others: others.map(|except| OtherPorts {
                ephemeral: 32768..=60999,
                except: except.iter().copied().collect(),
            }),
        }
    }

    #[test]
    fn the_raw_sensor_program_passes_syns_and_datagrams_to_watched_ports() {
        let w = watch(&[7000, 7001, 62201], None);
        for header in [RawHeader::Ipv4, RawHeader::Transport] {
            let wrap = |t: Vec<u8>, options: usize| match header {
                RawHeader::Ipv4 => v4_packet(options, &t),
                RawHeader::Transport => t,
            };
            let tcp = raw_sensor(header, RawProto::Tcp, &w).unwrap();
            let udp = raw_sensor(header, RawProto::Udp, &w).unwrap();
            check(&tcp);
            check(&udp);
            // (program, packet, pkttype, passes, name)
            type Case<'a> = (&'a [Insn], Vec<u8>, u32, bool, &'a str);
            let cases: Vec<Case> = vec![
                (
                    &tcp,
                    wrap(transport(7000, SYN), 0),
                    PACKET_HOST,
                    true,
                    "a syn to a step",
                ),
                (&tcp, wrap(transport(7001, SYN), 3), PACKET_HOST, true, "ip options"),
                (&tcp, wrap(transport(7000, SYN_ACK), 0), PACKET_HOST, false, "a syn-ack"),
                (&tcp, wrap(transport(7000, ACK), 0), PACKET_HOST, false, "data"),
                (&tcp, wrap(transport(7000, 0x18), 0), PACKET_HOST, false, "psh-ack"),
                (&tcp, wrap(transport(7002, SYN), 0), PACKET_HOST, false, "another port"),
                (&tcp, wrap(transport(40000, SYN), 0), PACKET_HOST, false, "ephemeral"),
                (&udp, wrap(transport(62201, 0), 0), PACKET_HOST, true, "spa"),
                (&udp, wrap(transport(7001, 0), 0), BROADCAST, true, "a broadcast knock"),
                (&udp, wrap(transport(5432, 0), 0), PACKET_HOST, false, "a service"),
                (
                    &udp,
                    wrap(transport(7000, 0)[..3].to_vec(), 0),
                    PACKET_HOST,
                    false,
                    "truncated",
                ),
            ];
            for (program, packet, pkttype, passes, name) in cases {
                assert_eq!(
                    run_raw(program, &packet, pkttype) == ACCEPT,
                    passes,
                    "{name} ({header:?})"
                );
            }
        }
    }

    #[test]
    fn other_ports_pass_outside_the_ephemeral_range_except_the_proxys() {
        let w = watch(&[7000], Some(&[5432, 15432]));
        let p = raw_sensor(RawHeader::Ipv4, RawProto::Tcp, &w).unwrap();
        check(&p);
        for (port, flags, pkttype, passes) in [
            (7000, SYN, PACKET_HOST, true),
            (22, SYN, PACKET_HOST, true),
            (1, SYN, PACKET_HOST, true),
            (32767, SYN, PACKET_HOST, true),
            (32768, SYN, PACKET_HOST, false),
            (60999, SYN, PACKET_HOST, false),
            (61000, SYN, PACKET_HOST, true),
            (65535, SYN, PACKET_HOST, true),
            (5432, SYN, PACKET_HOST, false),
            (15432, SYN, PACKET_HOST, false),
            (22, ACK, PACKET_HOST, false),
            (22, SYN, BROADCAST, false),
            (7000, SYN, BROADCAST, true),
        ] {
            let packet = v4_packet(0, &transport(port, flags));
            assert_eq!(
                run_raw(&p, &packet, pkttype) == ACCEPT,
                passes,
                "port {port} flags {flags:#x} type {pkttype}"
            );
        }
    }

    #[test]
    fn long_port_lists_keep_every_branch_in_reach() {
        let ports: Vec<u16> = (1000..1700).collect();
        let except: Vec<u16> = (2000..2600).collect();
        let w = watch(&ports, Some(&except));
        for proto in [RawProto::Tcp, RawProto::Udp] {
            let p = raw_sensor(RawHeader::Transport, proto, &w).unwrap();
            check(&p);
            for port in [1000, 1255, 1256, 1699, 1800, 2000, 2599, 2600] {
                let passes = !(2000..2600).contains(&port);
                assert_eq!(
                    run_raw(&p, &transport(port, SYN), PACKET_HOST) == ACCEPT,
                    passes,
                    "{port}"
                );
            }
        }
        let too_many = watch(&(1..5000).collect::<Vec<u16>>(), None);
        assert!(raw_sensor(RawHeader::Ipv4, RawProto::Udp, &too_many).is_err());
    }

    #[test]
    fn raw_opcodes_match_the_kernel_headers() {
        use nix::libc;
        let c = |x: u32| u16::try_from(x).unwrap();
        assert_eq!(LDX_MSH, c(libc::BPF_LDX | libc::BPF_B | libc::BPF_MSH));
        assert_eq!(LDX_IMM, c(libc::BPF_LDX | libc::BPF_W | libc::BPF_IMM));
        assert_eq!(LD_H_IND, c(libc::BPF_LD | libc::BPF_H | libc::BPF_IND));
        assert_eq!(LD_B_IND, c(libc::BPF_LD | libc::BPF_B | libc::BPF_IND));
        assert_eq!(JMP_JGT_K, c(libc::BPF_JMP | libc::BPF_JGT | libc::BPF_K));
        assert_eq!(JMP_JGE_K, c(libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K));
        assert_eq!(AD_OFF, libc::SKF_AD_OFF);
        assert_eq!(AD_PKTTYPE, libc::SKF_AD_PKTTYPE);
        assert_eq!(PACKET_HOST, u32::from(libc::PACKET_HOST));
    }

    fn any_source() -> impl Strategy<Value = IpAddr> {
        // Few distinct values per word, so that probes often share words
        // with admitted sources.
        prop_oneof![
            (0u8..4, 0u8..4).prop_map(|(a, b)| IpAddr::from([10, a, 0, b])),
            (0u16..3, 0u16..3, 0u16..3).prop_map(|(a, b, c)| IpAddr::from(Ipv6Addr::new(a, 0, 0, b, 0, 0, 0, c))),
        ]
    }

    proptest! {
        #[test]
        fn accepts_exactly_the_admitted_sources(
            sources in proptest::collection::btree_set(any_source(), 0..40),
            probes in proptest::collection::vec(any_source(), 1..20),
            v6 in any::<bool>(),
        ) {
            let family = if v6 { Family::V6 } else { Family::V4 };
            let p = admit(family, &sources).unwrap();
            check(&p);
            for probe in probes.iter().chain(&sources) {
                let reachable = family == Family::V6 || probe.is_ipv4();
                let expect = reachable && sources.contains(probe);
                prop_assert_eq!(run(&p, &header(*probe)) == ACCEPT, expect, "{}", probe);
            }
        }
    }
}
