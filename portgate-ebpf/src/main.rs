//! portgate's kernel programs: the thin entry points, each handing its context to the
//! module of its hook.
//!
//! - `portgate_xdp` (per interface, `xdp.rs`) and `portgate_skb` (`cgroup_skb/ingress`,
//!   `skb.rs`) parse a packet and enforce the one verdict in [`verdict`];
//! - `portgate_bind4`/`portgate_bind6` (`cgroup/bind4`, `cgroup/bind6`, `bind.rs`) enforce
//!   bind ownership;
//! - `portgate_sockops` (`sock_ops.rs`) counts established passive TCP connections per port.
//!
//! A refusal is reported to the daemon's log through `diag.rs` when it asks for that.
//!
//! Ports outside the configured managed range are never touched. Userspace loads the
//! programs by these function names.
#![no_std]
#![no_main]
#![feature(asm_experimental_arch)]
#![expect(
    clippy::inline_always,
    reason = "the verifier follows pointer types through one inlined function per program"
)]
#![expect(
    missing_docs,
    reason = "aya's program macros emit the entry-point symbols without the docs written here"
)]
#![expect(
    clippy::needless_pass_by_value,
    reason = "aya's program macros hand each entry point its context by value"
)]

mod atomic;
mod bind;
mod diag;
mod events;
mod maps;
mod parse;
mod reservations;
mod skb;
mod slots;
mod sock_ops;
mod verdict;
mod xdp;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{cgroup_skb, cgroup_sock_addr, sock_ops, xdp},
    programs::{SkBuffContext, SockAddrContext, SockOpsContext, XdpContext},
};
use portgate_common::{family, hook};

/// XDP verdict for packets arriving on an interface.
#[xdp]
pub fn portgate_xdp(ctx: XdpContext) -> u32 {
    match xdp::try_xdp(&ctx) {
        Ok(()) => xdp_action::XDP_PASS,
        Err(refusal) => {
            diag::packet_dropped(&ctx, hook::XDP, refusal);
            xdp_action::XDP_DROP
        }
    }
}

/// `cgroup_skb/ingress` verdict for packets delivered to sockets in the cgroup tree: 1
/// delivers the packet, 0 drops it.
#[cgroup_skb]
pub fn portgate_skb(ctx: SkBuffContext) -> i32 {
    match skb::try_skb(&ctx) {
        Ok(()) => 1,
        Err(refusal) => {
            diag::packet_dropped(&ctx, hook::SKB, refusal);
            0
        }
    }
}

/// `cgroup_skb/ingress` as `portgate_skb`, for kernels before 6.15: the packet's namespace
/// comes from its socket's storage (userspace loads this one when the other is refused).
#[cgroup_skb]
pub fn portgate_skb_sk(ctx: SkBuffContext) -> i32 {
    match skb::try_skb_socket_netns(&ctx) {
        Ok(()) => 1,
        Err(refusal) => {
            diag::packet_dropped(&ctx, hook::SKB, refusal);
            0
        }
    }
}

/// `cgroup/bind4`: only the owner cgroup (or a descendant) binds a managed port; 0 makes
/// `bind()` fail with EPERM.
#[cgroup_sock_addr(bind4)]
pub fn portgate_bind4(ctx: SockAddrContext) -> i32 {
    if bind::try_bind(&ctx, family::V4).is_ok() {
        1
    } else {
        diag::bind_refused(&ctx);
        0
    }
}

/// `cgroup/bind6`: as `portgate_bind4`.
#[cgroup_sock_addr(bind6)]
pub fn portgate_bind6(ctx: SockAddrContext) -> i32 {
    if bind::try_bind(&ctx, family::V6).is_ok() {
        1
    } else {
        diag::bind_refused(&ctx);
        0
    }
}

/// Counts established passive TCP connections on managed ports, once each. It never refuses
/// anything, so there is nothing to map: 1 is what a `sock_ops` program returns when all is
/// well.
#[sock_ops]
pub fn portgate_sockops(ctx: SockOpsContext) -> u32 {
    sock_ops::count_connections(&ctx);
    1
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// The license the kernel checks for GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
