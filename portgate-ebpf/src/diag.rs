//! Diagnostic lines through aya-log, for a person following what the gate does (the
//! daemon's `kernel_log` key). Off unless [`config_flags::KERNEL_LOG`] is set: a program
//! then pays one branch on a path that already refused something, and nothing on a pass.
//!
//! Called from the entry points only, after the verdict is decided, so that the log's
//! formatting stays out of the verdict's verifier state. The lines carry the reason's
//! numeric code ([`portgate_common::reason`]) rather than its name: copying a string of a
//! length known only at run time into the ring is what the verifier would refuse.

use aya_ebpf::{EbpfContext, helpers::bpf_get_current_pid_tgid, programs::SockAddrContext};
use aya_log_ebpf::info;
use portgate_common::{config_flags, hook};

use crate::{maps::CONFIG, verdict::Refusal};

/// The `log` target of every line, as the daemon's logger filters it.
const TARGET: &str = "portgate::kernel";

/// Whether the daemon asked for the lines.
#[inline(always)]
fn enabled() -> bool {
    CONFIG
        .get(0)
        .is_some_and(|config| config.flags & config_flags::KERNEL_LOG != 0)
}

/// A packet `hook_code` ([`hook::XDP`] or [`hook::SKB`]) dropped, and why.
#[inline(always)]
pub fn packet_dropped<C: EbpfContext>(ctx: &C, hook_code: u8, refusal: Refusal) {
    let (reason_code, port) = (refusal.reason, refusal.port);
    if !enabled() {
        return;
    }
    // `hook_code` is a constant where this is inlined: one of the two lines is left.
    if hook_code == hook::XDP {
        info!(
            ctx,
            target: TARGET,
            "portgate: XDP dropped a packet to port {}: reason {}",
            port,
            reason_code
        );
    } else {
        info!(
            ctx,
            target: TARGET,
            "portgate: cgroup_skb dropped a packet to port {}: reason {}",
            port,
            reason_code
        );
    }
}

/// A `bind()` refused because the caller's cgroup does not own the port.
#[inline(always)]
pub fn bind_refused(ctx: &SockAddrContext) {
    if !enabled() {
        return;
    }
    // SAFETY: the context pointer is the kernel's, valid for the program's run.
    #[expect(
        clippy::cast_possible_truncation,
        reason = "the port is the low 16 bits"
    )]
    let port = u16::from_be(unsafe { (*ctx.sock_addr).user_port } as u16);
    // The process id is the high 32 bits.
    let pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    info!(
        ctx,
        target: TARGET,
        "portgate: refused a bind of port {} by pid {}: its cgroup does not own the port",
        port,
        pid
    );
}
