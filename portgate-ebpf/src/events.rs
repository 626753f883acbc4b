//! Deny events into the ring buffer, rate-limited per port so that a flood cannot
//! starve userspace; what is not sent is counted.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_cgroup_id, bpf_get_current_pid_tgid},
};
use portgate_common::{DenyEvent, EventRate, GateConfig, PortKey, hook, reason, stat};

use crate::{
    maps::{EVENT_RATE, EVENTS, bump_stat},
    parse::PacketInfo,
    verdict::Refusal,
};

const WINDOW_NS: u64 = 1_000_000_000;

/// A packet was dropped by `hook_code` for `refusal`.
#[inline(always)]
pub fn emit_packet(
    config: &GateConfig,
    info: &PacketInfo,
    home: &PortKey,
    refusal: Refusal,
    hook_code: u8,
    now: u64,
) {
    emit(
        config,
        &DenyEvent {
            time_ns: now,
            cgroup_id: 0,
            netns: home.netns,
            addr: info.saddr,
            pid: 0,
            port: home.port,
            proto: home.proto,
            family: info.family,
            reason: refusal.reason,
            hook: hook_code,
            _pad: [0; 6],
        },
    );
}

/// The current task was refused `bind()` to `port` (at `addr` of `family_code`).
#[inline(always)]
pub fn emit_bind(config: &GateConfig, port: &PortKey, family_code: u8, addr: [u8; 16], now: u64) {
    // SAFETY: the helpers have no preconditions in a cgroup sock_addr program.
    let (cgroup_id, pid_tgid) =
        unsafe { (bpf_get_current_cgroup_id(), bpf_get_current_pid_tgid()) };
    emit(
        config,
        &DenyEvent {
            time_ns: now,
            cgroup_id,
            netns: port.netns,
            addr,
            // The upper half is the tgid: what user space calls the pid.
            pid: u32::try_from(pid_tgid >> 32).unwrap_or(0),
            port: port.port,
            proto: port.proto,
            family: family_code,
            reason: reason::BIND_DENIED,
            hook: hook::BIND,
            _pad: [0; 6],
        },
    );
}

#[inline(always)]
fn emit(config: &GateConfig, event: &DenyEvent) {
    if config.events_per_sec == 0 {
        return;
    }
    let key = PortKey::new(event.netns, event.port, event.proto);
    if !within_rate(config, key, event.time_ns) {
        bump_stat(stat::EVENTS_RATE_LIMITED);
        return;
    }
    if EVENTS.output::<DenyEvent>(event, 0).is_err() {
        bump_stat(stat::EVENTS_LOST_FULL);
    }
}

/// A one-second window per port. Updates race between CPUs; the limit is
/// approximate by a few events, which is all it needs to be.
#[inline(always)]
fn within_rate(config: &GateConfig, key: PortKey, now: u64) -> bool {
    if EVENT_RATE.get_ptr_mut(key).is_none() {
        let fresh = EventRate {
            window_start_ns: now,
            count: 0,
        };
        let _unused = EVENT_RATE.insert(key, fresh, u64::from(BPF_NOEXIST));
    }
    let Some(rate) = EVENT_RATE.get_ptr_mut(key) else {
        return false;
    };
    // SAFETY: `rate` points at this key's value; racing writers only skew the count.
    unsafe {
        if now.wrapping_sub((*rate).window_start_ns) >= WINDOW_NS {
            (*rate).window_start_ns = now;
            (*rate).count = 0;
        }
        if (*rate).count >= u64::from(config.events_per_sec) {
            return false;
        }
        (*rate).count += 1;
    }
    true
}
