//! The XDP hook: reads the Ethernet header (and one VLAN tag) of a frame arriving on an
//! interface, then hands the packet to the verdict.

use core::mem::size_of;

use aya_ebpf::{helpers::generated::bpf_xdp_get_buff_len, programs::XdpContext};
use portgate_common::{HOST_NETNS, hook};

use crate::{
    maps::XDP_NETNS,
    parse::{Parsed, Reader, parse_l3},
    verdict::{self, Refusal},
};

const ETH_HLEN: usize = 14;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;

/// Bounds-checked reads from an XDP frame.
struct XdpReader {
    start: usize,
    end: usize,
}

impl Reader for XdpReader {
    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> Option<T> {
        if self.start + offset + size_of::<T>() > self.end {
            return None;
        }
        // SAFETY: the range was checked against the frame's end just above.
        Some(unsafe { ((self.start + offset) as *const T).read_unaligned() })
    }
}

/// `Err` says why the frame is dropped. One the verdict does not apply to (not IP, neither
/// TCP nor UDP, outside the managed range) is `Ok`; one whose ports cannot be read goes to
/// [`verdict::unreadable`].
#[inline(always)]
pub fn try_xdp(ctx: &XdpContext) -> Result<(), Refusal> {
    let reader = XdpReader {
        start: ctx.data(),
        end: ctx.data_end(),
    };
    let Some(mut ethertype) = reader.read::<[u8; 2]>(12).map(u16::from_be_bytes) else {
        return Ok(());
    };
    let mut l3_offset = ETH_HLEN;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        let Some(inner) = reader.read::<[u8; 2]>(16).map(u16::from_be_bytes) else {
            return Ok(());
        };
        ethertype = inner;
        l3_offset += 4;
    }
    match parse_l3(&reader, ethertype, l3_offset) {
        Parsed::Packet(mut info) => {
            // XDP has no socket to ask: userspace says which namespace each interface's
            // traffic is for (the host's unless it says otherwise).
            // SAFETY: the context pointer is the kernel's, valid for the program's run.
            let ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
            // SAFETY: the value is copied out at once.
            info.netns = unsafe { XDP_NETNS.get(ifindex) }
                .copied()
                .unwrap_or(HOST_NETNS);
            // SAFETY: the context pointer is the kernel's, valid for the program's run.
            let bytes = unsafe { bpf_xdp_get_buff_len(ctx.ctx) };
            // XDP sees no socket: no packet of its is taken for the end of a handshake.
            verdict::enforce(&info, hook::XDP, bytes, core::ptr::null_mut(), || {
                verdict::Handshake::Unknown
            })
        }
        Parsed::Other => Ok(()),
        Parsed::Unreadable => verdict::unreadable(hook::XDP),
    }
}
