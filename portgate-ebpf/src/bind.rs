//! The `cgroup/bind4` and `cgroup/bind6` hooks: only the owner cgroup (or a descendant)
//! binds a managed port; every refusal is counted and reported as a deny event.

use aya_ebpf::{
    helpers::{bpf_get_current_ancestor_cgroup_id, bpf_get_netns_cookie, bpf_ktime_get_ns},
    programs::SockAddrContext,
};
use portgate_common::{
    HOST_NETNS, PortKey, config_flags, family, netns_key, policy_flags, proto, reason,
};

use crate::{
    events,
    maps::{CONFIG, POLICY, SOCKETS},
    verdict::{self, Refusal},
};

/// `Err` when the bind is refused ([`reason::BIND_DENIED`]). A bind the rule does not apply
/// to (port 0, outside the managed range and not allocated in another namespace, neither
/// TCP nor UDP) is `Ok`.
#[inline(always)]
pub fn try_bind(ctx: &SockAddrContext, family_code: u8) -> Result<(), Refusal> {
    // SAFETY: the context pointer is the kernel's, valid for the program's run.
    let sock_addr = unsafe { &*ctx.sock_addr };
    #[expect(
        clippy::cast_possible_truncation,
        reason = "the port is the low 16 bits"
    )]
    let port = u16::from_be(sock_addr.user_port as u16);
    if port == 0 {
        return Ok(());
    }
    let Some(config) = CONFIG.get(0) else {
        return Ok(());
    };
    // SAFETY: the context is the kernel's; the helper reads the socket's namespace.
    let netns = netns_key(
        unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) },
        config,
    );
    if netns != HOST_NETNS && config.flags & config_flags::SOCKET_NETNS != 0 {
        // For the `cgroup_skb` fallback, which cannot ask the packet's namespace.
        // SAFETY: the context is the kernel's; no initial value makes the storage zeroed.
        let stored = unsafe { SOCKETS.get_or_insert_ptr_mut(ctx, None) };
        if !stored.is_null() {
            // SAFETY: the helper returned this socket's storage.
            unsafe { (*stored).netns = netns };
        }
    }
    let in_range = config.manages(port);
    if !in_range && netns == HOST_NETNS {
        return Ok(());
    }
    let proto_code = match sock_addr.protocol {
        6 => proto::TCP,
        17 => proto::UDP,
        _ => return Ok(()),
    };
    let key = PortKey::new(netns, port, proto_code);
    // SAFETY: the value is copied out at once.
    let policy = unsafe { POLICY.get(key) }.copied();
    let allowed = match policy {
        // Another namespace's port outside the range is managed only while allocated.
        None => !in_range,
        Some(policy) if policy.flags & policy_flags::OWNER == 0 => true,
        Some(policy) => {
            #[expect(clippy::cast_possible_wrap, reason = "cgroup levels are small")]
            let level = policy.owner_level as i32;
            // SAFETY: the helper has no preconditions.
            unsafe { bpf_get_current_ancestor_cgroup_id(level) == policy.owner_cgroup }
        }
    };
    if allowed {
        return Ok(());
    }
    verdict::count_bind_denied(&key);
    let mut addr = [0u8; 16];
    if family_code == family::V4 {
        addr[..4].copy_from_slice(&sock_addr.user_ip4.to_ne_bytes());
    } else {
        for (i, word) in sock_addr.user_ip6.iter().enumerate() {
            addr[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
        }
    }
    // SAFETY: the helper has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    events::emit_bind(config, &key, family_code, addr, now);
    Err(Refusal {
        reason: reason::BIND_DENIED,
        port,
    })
}
