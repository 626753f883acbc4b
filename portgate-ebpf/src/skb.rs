//! The `cgroup_skb/ingress` hook: reads a packet delivered to a socket in the cgroup tree
//! (its data starts at the L3 header), then hands it to the verdict.

use core::{ffi::c_void, mem::size_of};

use aya_ebpf::{
    bindings::{
        BPF_F_CURRENT_NETNS, BPF_TCP_LISTEN, BPF_TCP_NEW_SYN_RECV, bpf_sock_tuple,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 as TupleV4,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 as TupleV6,
    },
    helpers::{bpf_get_netns_cookie, bpf_sk_fullsock, bpf_sk_release, bpf_skc_lookup_tcp},
    programs::SkBuffContext,
};
use portgate_common::{family, hook};

use crate::{
    parse::{PacketInfo, Parsed, Reader, parse_l3},
    verdict::{self, Handshake, Refusal},
};

/// Reads the linear part of an skb directly, and what lies beyond it (a non-linear skb)
/// through `bpf_skb_load_bytes`.
struct SkbReader<'a> {
    ctx: &'a SkBuffContext,
    start: usize,
    end: usize,
}

impl<'a> SkbReader<'a> {
    #[inline(always)]
    fn new(ctx: &'a SkBuffContext) -> Self {
        // SAFETY: the context pointer is the kernel's, valid for the program's run; the
        // volatile reads keep fixed offsets from it, as the verifier requires.
        let (start, end) = unsafe {
            (
                core::ptr::read_volatile(&raw const (*ctx.skb.skb).data),
                core::ptr::read_volatile(&raw const (*ctx.skb.skb).data_end),
            )
        };
        Self {
            ctx,
            start: start as usize,
            end: end as usize,
        }
    }
}

impl Reader for SkbReader<'_> {
    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> Option<T> {
        if self.start + offset + size_of::<T>() <= self.end {
            // SAFETY: the range was checked against the linear data's end just above.
            return Some(unsafe { ((self.start + offset) as *const T).read_unaligned() });
        }
        self.ctx.load::<T>(offset).ok()
    }
}

/// `Err` says why the packet is dropped. One the verdict does not apply to (not IP, neither
/// TCP nor UDP, outside the managed range) is `Ok`; one whose ports cannot be read (after
/// reassembly, as this hook sees packets) is dropped by [`verdict::unreadable`].
#[inline(always)]
pub fn try_skb(ctx: &SkBuffContext) -> Result<(), Refusal> {
    judge(ctx, netns)
}

/// [`try_skb`] for kernels whose `cgroup_skb` cannot call `bpf_get_netns_cookie` (before
/// 6.15): the packet's namespace is the one the bind or `sock_ops` program recorded for
/// its socket, the host's when none did (a socket of the host, or one bound before the
/// gate was attached).
#[inline(always)]
pub fn try_skb_socket_netns(ctx: &SkBuffContext) -> Result<(), Refusal> {
    judge(ctx, recorded_netns)
}

/// Parses the packet and enforces the verdict, the packet's namespace found by `netns`.
#[inline(always)]
fn judge(ctx: &SkBuffContext, netns: impl FnOnce(&SkBuffContext) -> u64) -> Result<(), Refusal> {
    // `protocol` holds the ethertype in network byte order.
    #[expect(clippy::cast_possible_truncation, reason = "an ethertype is 16 bits")]
    let ethertype = u16::from_be(ctx.skb.protocol() as u16);
    match parse_l3(&SkbReader::new(ctx), ethertype, 0) {
        Parsed::Packet(mut info) => {
            let (socket, listening) = delivered_to(ctx);
            info.to_listener = listening;
            info.netns = netns(ctx);
            let connection = if listening {
                core::ptr::null_mut()
            } else {
                socket
            };
            verdict::enforce(&info, hook::SKB, u64::from(ctx.len()), connection, || {
                handshake_state(ctx, &info)
            })
        }
        Parsed::Other => Ok(()),
        Parsed::Unreadable => verdict::unreadable(hook::SKB),
    }
}

/// The netns cookie of the namespace the packet is delivered in (the verdict turns the
/// host's into [`portgate_common::HOST_NETNS`]). The helper takes an skb in `cgroup_skb`
/// since Linux 6.15.
#[inline(always)]
fn netns(ctx: &SkBuffContext) -> u64 {
    // SAFETY: the context pointer is the kernel's, valid for the program's run.
    unsafe { bpf_get_netns_cookie(ctx.skb.skb.cast()) }
}

/// The namespace recorded in the storage of the packet's socket, the host's without one.
#[inline(always)]
fn recorded_netns(ctx: &SkBuffContext) -> u64 {
    let (socket, _) = delivered_to(ctx);
    if socket.is_null() {
        return portgate_common::HOST_NETNS;
    }
    let stored = crate::maps::socket_state(socket, false);
    if stored.is_null() {
        portgate_common::HOST_NETNS
    } else {
        // SAFETY: the helper returned this socket's storage.
        unsafe { (*stored).netns }
    }
}

/// The full socket the packet is delivered to (null when there is none), and whether it is
/// listening: the packet then belongs to a handshake, not to an established connection.
#[inline(always)]
fn delivered_to(ctx: &SkBuffContext) -> (*mut c_void, bool) {
    // SAFETY: the context pointer is the kernel's, valid for the program's run; the
    // volatile read keeps a fixed offset from it, as the verifier requires.
    let sk = unsafe { core::ptr::read_volatile(&raw const (*ctx.skb.skb).__bindgen_anon_2.sk) };
    if sk.is_null() {
        return (core::ptr::null_mut(), false);
    }
    // SAFETY: `sk` is the kernel's socket pointer of this skb, checked above.
    let full = unsafe { bpf_sk_fullsock(sk) };
    if full.is_null() {
        return (core::ptr::null_mut(), false);
    }
    // SAFETY: `full` is a full socket, checked above.
    let listening = unsafe { (*full).state == BPF_TCP_LISTEN };
    (full.cast(), listening)
}

/// What became of the handshake of a packet that reached the listening socket: another
/// packet of the same handshake, on another CPU, may have completed it since this one was
/// looked up (the packet then belongs to that connection), a request socket may stand for
/// it, or the kernel may know of none.
#[inline(always)]
fn handshake_state(ctx: &SkBuffContext, info: &PacketInfo) -> Handshake {
    // SAFETY: all-zero is a valid tuple (plain integers).
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let size = if info.family == family::V4 {
        tuple.__bindgen_anon_1.ipv4 = TupleV4 {
            saddr: u32::from_ne_bytes([info.saddr[0], info.saddr[1], info.saddr[2], info.saddr[3]]),
            daddr: u32::from_ne_bytes([info.daddr[0], info.daddr[1], info.daddr[2], info.daddr[3]]),
            sport: info.sport.to_be(),
            dport: info.dport.to_be(),
        };
        size_of::<TupleV4>()
    } else {
        let word = |bytes: &[u8; 16], i: usize| {
            u32::from_ne_bytes([
                bytes[i * 4],
                bytes[i * 4 + 1],
                bytes[i * 4 + 2],
                bytes[i * 4 + 3],
            ])
        };
        tuple.__bindgen_anon_1.ipv6 = TupleV6 {
            saddr: [
                word(&info.saddr, 0),
                word(&info.saddr, 1),
                word(&info.saddr, 2),
                word(&info.saddr, 3),
            ],
            daddr: [
                word(&info.daddr, 0),
                word(&info.daddr, 1),
                word(&info.daddr, 2),
                word(&info.daddr, 3),
            ],
            sport: info.sport.to_be(),
            dport: info.dport.to_be(),
        };
        size_of::<TupleV6>()
    };
    #[expect(clippy::cast_possible_truncation, reason = "a tuple is 12 or 36 bytes")]
    // SAFETY: the context is the kernel's skb, the tuple lives on this stack for the call.
    let found = unsafe {
        bpf_skc_lookup_tcp(
            ctx.skb.skb.cast(),
            &raw mut tuple,
            size as u32,
            i64::from(BPF_F_CURRENT_NETNS).cast_unsigned(),
            0,
        )
    };
    if found.is_null() {
        return Handshake::Unknown;
    }
    // SAFETY: a socket the helper returned (a reference, released just below).
    let state = unsafe { (*found).state };
    // SAFETY: releases the reference the lookup took.
    unsafe { bpf_sk_release(found.cast()) };
    match state {
        BPF_TCP_LISTEN => Handshake::Unknown,
        BPF_TCP_NEW_SYN_RECV => Handshake::InProgress,
        _ => Handshake::Established,
    }
}
