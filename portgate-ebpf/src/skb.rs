//! The `cgroup_skb/ingress` hook: reads a packet delivered to a socket in the cgroup tree
//! (its data starts at the L3 header), then hands it to the verdict.

use core::mem::size_of;

use aya_ebpf::programs::SkBuffContext;
use portgate_common::hook;

use crate::{
    parse::{ETH_P_IP, ETH_P_IPV6, Reader, parse_l3},
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

/// `Err` says why the packet is dropped. One the verdict does not apply to (not IP, not
/// parseable, outside the managed range) is `Ok`.
#[inline(always)]
pub fn try_skb(ctx: &SkBuffContext) -> Result<(), Refusal> {
    // `protocol` holds the ethertype in network byte order.
    #[expect(clippy::cast_possible_truncation, reason = "an ethertype is 16 bits")]
    let ethertype = u16::from_be(ctx.skb.protocol() as u16);
    if ethertype != ETH_P_IP && ethertype != ETH_P_IPV6 {
        return Ok(());
    }
    let Some(info) = parse_l3(&SkbReader::new(ctx), ethertype, 0) else {
        return Ok(());
    };
    verdict::enforce(&info, hook::SKB, u64::from(ctx.len()))
}
