//! The `sock_ops` hook: counts established passive TCP connections on managed ports, once
//! each, each holding the slot its reservation took, and gives it back when they close.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_TCP_CLOSE,
    },
    helpers::bpf_get_netns_cookie,
    programs::SockOpsContext,
};
use portgate_common::{
    FlowKey, HOST_NETNS, PortKey, SocketState, config_flags, family, netns_key, proto, slot_word,
    stat,
};

use crate::{
    atomic::{compare_exchange, load},
    maps::{CONFIG, POLICY, bump_stat, socket_state},
    reservations, slots,
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

/// Handles the two operations the gate asks for: a passive connection established, and a
/// counted one closing. Every other callback returns at the first comparison. Nothing here
/// refuses anything, so there is nothing to return.
#[inline(always)]
pub fn count_connections(ctx: &SockOpsContext) {
    match ctx.op() {
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => on_established(ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => on_close(ctx),
        _ => {}
    }
}

/// The socket of the callback: on the two callbacks handled here, a full socket (null
/// only if the kernel gave none).
#[inline(always)]
fn socket(ctx: &SockOpsContext) -> *mut c_void {
    // SAFETY: the context pointer is the kernel's; the volatile read keeps a fixed offset
    // from it, as the verifier requires.
    unsafe { core::ptr::read_volatile(&raw const (*ctx.ops).__bindgen_anon_2.sk) }.cast()
}

/// A passive connection was established. It holds a slot only through its reservation:
/// `cgroup_skb` let its handshake complete only with a live one (or a slot free at that
/// moment), and here the connection takes it for good, with the policy generation its
/// handshake was judged under. A connection on an unlimited port takes a slot now and is
/// judged whole at its first packet. One on a limited port without a reservation (its
/// handshake did not pass `cgroup_skb`) takes a slot only if one is free, else it is left
/// uncounted and [`stat::UNRESERVED`] says so.
///
/// What the connection holds is kept in its socket storage, freed with the socket.
#[inline(always)]
fn on_established(ctx: &SockOpsContext) {
    let Some(config) = CONFIG.get(0) else {
        return;
    };
    #[expect(clippy::cast_possible_truncation, reason = "a port is 16 bits")]
    let port = ctx.local_port() as u16;
    // SAFETY: the context pointer is the kernel's, valid for the program's run.
    let netns = netns_key(unsafe { bpf_get_netns_cookie(ctx.ops.cast()) }, config);
    let sk = socket(ctx);
    if sk.is_null() {
        return;
    }
    if netns != HOST_NETNS && config.flags & config_flags::SOCKET_NETNS != 0 {
        // For the `cgroup_skb` fallback: the connection's socket is not the listener that
        // the bind program marked.
        let state = socket_state(sk, true);
        if !state.is_null() {
            // SAFETY: the helper returned this socket's storage.
            unsafe { (*state).netns = netns };
        }
    }
    if !config.manages(port) && netns == HOST_NETNS {
        return;
    }
    // SAFETY: the value is copied out at once.
    let Some(policy) = (unsafe { POLICY.get(PortKey::new(netns, port, proto::TCP)) }).copied()
    else {
        return;
    };
    let home = policy.home;
    let Some(row) = slots::Row::of(&home) else {
        return;
    };
    let (epoch, generation) = if let Some(held) = reservations::claim(&flow_of(ctx, &home)) {
        held
    } else {
        if !row.take(policy.epoch, policy.max_connections) {
            bump_stat(stat::UNRESERVED);
            return;
        }
        (policy.epoch, SocketState::UNJUDGED)
    };
    let state = socket_state(sk, true);
    if state.is_null() {
        // Untracked: give the slot back so nothing drifts.
        bump_stat(stat::SOCKETS_FULL);
        row.give_back(epoch);
        return;
    }
    // SAFETY: the helper returned this socket's storage; nothing else writes it before
    // the state callback asked for below.
    unsafe {
        (*state).home = home;
        (*state).generation = generation;
        (*state).netns = netns;
        (*state).slot = slot_word::pack(epoch, 1);
    }
    row.establish(epoch);
    let _unused = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG).cast_signed());
}

/// A counted connection closed: the slot its storage holds is given back, once.
#[inline(always)]
fn on_close(ctx: &SockOpsContext) {
    let sk = socket(ctx);
    if sk.is_null() {
        return;
    }
    let state = socket_state(sk, false);
    if state.is_null() {
        return;
    }
    // SAFETY: the helper returned this socket's storage.
    let (slot_field, home) = unsafe { (&raw mut (*state).slot, (*state).home) };
    let held = load(slot_field);
    // Only the caller that clears the slot gives it back: exactly once.
    if held != 0
        && compare_exchange(slot_field, held, 0)
        && let Some(row) = slots::Row::of(&home)
    {
        row.close(slot_word::epoch(held));
    }
}

/// Reads one field of the `sock_ops` context. Volatile, so that the compiler keeps a
/// fixed offset from the context pointer (the verifier refuses computed context pointers).
macro_rules! ops_field {
    ($ctx:expr, $field:ident) => {
        // SAFETY: the context pointer is the kernel's, valid for the program's run.
        unsafe { core::ptr::read_volatile(&raw const (*$ctx.ops).$field) }
    };
    ($ctx:expr, $field:ident[$index:literal]) => {
        // SAFETY: as above.
        unsafe { core::ptr::read_volatile(&raw const (*$ctx.ops).$field[$index]) }
    };
}

/// The connection's flow as its SYN showed it to the allocation `home`; IPv4-mapped IPv6
/// peers of a dual-stack socket are IPv4, as their packets are.
#[inline(always)]
fn flow_of(ctx: &SockOpsContext, home: &PortKey) -> FlowKey {
    let socket_family = ops_field!(ctx, family);
    let remote_port = ops_field!(ctx, remote_port);
    let remote6 = [
        ops_field!(ctx, remote_ip6[0]),
        ops_field!(ctx, remote_ip6[1]),
        ops_field!(ctx, remote_ip6[2]),
        ops_field!(ctx, remote_ip6[3]),
    ];
    let remote4 = ops_field!(ctx, remote_ip4);
    let mut flow = FlowKey {
        home: *home,
        saddr: [0; 16],
        // The remote port is the network-order 16 bits of a network-order u32.
        #[expect(clippy::cast_possible_truncation, reason = "a port is 16 bits")]
        sport: u32::from_be(remote_port) as u16,
        family: family::V4,
        _pad: [0; 5],
    };
    let mapped = remote6[0] == 0 && remote6[1] == 0 && remote6[2] == 0xffffu32.to_be();
    if socket_family == AF_INET {
        flow.saddr[..4].copy_from_slice(&remote4.to_ne_bytes());
    } else if socket_family == AF_INET6 && mapped {
        flow.saddr[..4].copy_from_slice(&remote6[3].to_ne_bytes());
    } else {
        flow.family = family::V6;
        for (i, word) in remote6.iter().enumerate() {
            flow.saddr[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
        }
    }
    flow
}
