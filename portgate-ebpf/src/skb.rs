//! The `cgroup_skb/ingress` hook: reads a packet delivered to a socket in the cgroup tree
//! (its data starts at the L3 header), then hands it to the verdict.

use core::mem::size_of;

use aya_ebpf::{helpers::bpf_sk_fullsock, programs::SkBuffContext};
use portgate_common::hook;

use crate::{
    parse::{Parsed, Reader, parse_l3},
    verdict::{self, Refusal},
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

/// `BPF_TCP_LISTEN`, the state of a listening socket in `struct bpf_sock`.
const TCP_LISTEN: u32 = 10;

/// `Err` says why the packet is dropped. One the verdict does not apply to (not IP, neither
/// TCP nor UDP, outside the managed range) is `Ok`; one whose ports cannot be read (after
/// reassembly, as this hook sees packets) is dropped by [`verdict::unreadable`].
#[inline(always)]
pub fn try_skb(ctx: &SkBuffContext) -> Result<(), Refusal> {
    // `protocol` holds the ethertype in network byte order.
    #[expect(clippy::cast_possible_truncation, reason = "an ethertype is 16 bits")]
    let ethertype = u16::from_be(ctx.skb.protocol() as u16);
    match parse_l3(&SkbReader::new(ctx), ethertype, 0) {
        Parsed::Packet(mut info) => {
            info.to_listener = to_listener(ctx);
            verdict::enforce(&info, hook::SKB, u64::from(ctx.len()))
        }
        Parsed::Other => Ok(()),
        Parsed::Unreadable => verdict::unreadable(hook::SKB),
    }
}

/// Whether the socket the packet is delivered to is listening: the packet then belongs
/// to a handshake, not to an established connection.
#[inline(always)]
fn to_listener(ctx: &SkBuffContext) -> bool {
    // SAFETY: the context pointer is the kernel's, valid for the program's run; the
    // volatile read keeps a fixed offset from it, as the verifier requires.
    let sk = unsafe { core::ptr::read_volatile(&raw const (*ctx.skb.skb).__bindgen_anon_2.sk) };
    if sk.is_null() {
        return false;
    }
    // SAFETY: `sk` is the kernel's socket pointer of this skb, checked above.
    let full = unsafe { bpf_sk_fullsock(sk) };
    if full.is_null() {
        return false;
    }
    // SAFETY: `full` is a full socket, checked above.
    unsafe { (*full).state == TCP_LISTEN }
}
