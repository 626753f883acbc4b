//! The one verdict both packet hooks enforce (DESIGN.md, "Verdict for traffic to a managed
//! port"): [`decide`] is the first-match-wins rule that userspace's verdict mirrors (the
//! differential test holds the two to each other); [`enforce`] applies it, with its
//! counting, connection slots, deny events and the hand-off between the two hooks.

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_ns, maps::lpm_trie::Key};
use portgate_common::{
    AddrKey, AllowKey, CounterKey, Counters, FlowKey, GateConfig, HandoffKey, PendingSyn, Policy,
    PortKey, config_flags, defaults, hook, policy_flags, proto, reason, stat, status,
};

use crate::{
    events,
    maps::{ALLOW, CONFIG, COUNTERS, GRANTS, HANDOFF, PENDING, POLICY, bump_stat},
    parse::PacketInfo,
    slots,
};

const EEXIST: i32 = 17;

/// `CLOCK_MONOTONIC` in nanoseconds, read at most once per packet, and only when a step
/// needs it (established traffic never does).
struct Clock(u64);

impl Clock {
    #[inline(always)]
    fn now(&mut self) -> u64 {
        if self.0 == 0 {
            // SAFETY: the helper has no preconditions.
            self.0 = unsafe { bpf_ktime_get_ns() };
        }
        self.0
    }
}

/// Why a packet or a bind was refused: the error of [`enforce`] and of the packet and bind
/// hooks' `try_*` functions.
#[derive(Clone, Copy)]
pub struct Refusal {
    /// One of the [`reason`] codes, as counted and reported in the deny event.
    pub reason: u8,
}

/// The verdict's answer.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Pass, not a new connection (or one already counted).
    Pass,
    /// Pass and count a new connection.
    Accept,
    /// Drop for a [`reason`] code.
    Drop(u8),
}

/// Enforces the verdict on a parsed packet seen by `hook_code` ([`hook::XDP`] or
/// [`hook::SKB`]) with `bytes` on the wire: counts it, [`decide`]s, reports a drop as a deny
/// event and tells the other hook what XDP passed. A packet the verdict does not apply to
/// (outside the managed range, or already passed by XDP) is `Ok`.
#[inline(always)]
pub fn enforce(info: &PacketInfo, hook_code: u8, bytes: u64) -> Result<(), Refusal> {
    let Some(config) = CONFIG.get(0) else {
        return Ok(());
    };
    if !config.manages(info.dport) {
        return Ok(());
    }
    let mut clock = Clock(0);
    if hook_code == hook::SKB
        && config.flags & config_flags::XDP_ATTACHED != 0
        && handoff_take(info, clock.now())
    {
        return Ok(());
    }
    let counters = counter_row(info.dport, info.proto, hook_code);
    if let Some(row) = counters {
        // SAFETY: a per-CPU row; only this CPU writes it while the program runs.
        unsafe {
            (*row).packets += 1;
            (*row).bytes += bytes;
        }
    }
    match decide(config, info, &mut clock) {
        Verdict::Pass => {}
        Verdict::Accept => {
            if let Some(row) = counters {
                // SAFETY: as above.
                unsafe { (*row).accepted += 1 };
            }
        }
        Verdict::Drop(code) => {
            if let Some(row) = counters {
                let index = reason::drop_index(code);
                if index < reason::DROP_COUNT {
                    // SAFETY: as above; the index is bounds-checked.
                    unsafe { (*row).dropped[index] += 1 };
                }
            }
            let refusal = Refusal { reason: code };
            events::emit_packet(config, info, refusal, hook_code, clock.now());
            return Err(refusal);
        }
    }
    if hook_code == hook::XDP && config.flags & config_flags::SKB_ATTACHED != 0 {
        handoff_put(info, clock.now());
    }
    Ok(())
}

/// First match wins: unallocated, draining, not allowed, auth required, connection limit.
#[inline(always)]
fn decide(config: &GateConfig, info: &PacketInfo, clock: &mut Clock) -> Verdict {
    let key = PortKey::new(info.dport, info.proto);
    let new_connection = info.new_connection();
    // SAFETY: the value is copied out at once; userspace replaces whole records.
    let Some(policy) = (unsafe { POLICY.get(key) }).copied() else {
        return if new_connection {
            Verdict::Drop(reason::UNALLOCATED)
        } else {
            Verdict::Pass
        };
    };
    if new_connection && policy.status != status::ACTIVE {
        return Verdict::Drop(reason::DRAINING);
    }
    if policy.flags & policy_flags::ALLOWLIST != 0 && !source_allowed(info, &policy) {
        return Verdict::Drop(reason::NOT_ALLOWED);
    }
    if !new_connection {
        return Verdict::Pass;
    }
    let now = clock.now();
    if policy.flags & policy_flags::REQUIRE_AUTH != 0 && !granted(info, now) {
        return Verdict::Drop(reason::AUTH_REQUIRED);
    }
    if info.proto == proto::UDP {
        return Verdict::Accept;
    }
    admit_syn(config, info, &policy, now)
}

#[inline(always)]
fn addr_key(info: &PacketInfo) -> AddrKey {
    AddrKey {
        port: info.dport,
        proto: info.proto,
        family: info.family,
        addr: info.saddr,
    }
}

/// Whether the source is in the allowlist `policy` has in force: the trie's entries of the
/// generation its record names, so a change of both (one record write) is seen whole.
#[inline(always)]
fn source_allowed(info: &PacketInfo, policy: &Policy) -> bool {
    let address_bits = if info.family == portgate_common::family::V4 {
        32
    } else {
        128
    };
    let generation = u8::from(policy.flags & policy_flags::ALLOW_GENERATION != 0);
    let key = Key::new(
        AllowKey::PREFIX_BITS + address_bits,
        AllowKey {
            port: info.dport,
            proto: info.proto,
            family: info.family,
            generation,
            addr: info.saddr,
            _pad: 0,
        },
    );
    ALLOW.get(&key).is_some()
}

#[inline(always)]
fn granted(info: &PacketInfo, now: u64) -> bool {
    // SAFETY: the value is copied out at once.
    match unsafe { GRANTS.get(addr_key(info)) } {
        Some(expires) => now < *expires,
        None => false,
    }
}

/// Admits a TCP SYN that passed every other rule: reserves a connection slot keyed by the
/// 4-tuple, so a retransmitted SYN (or the second hook) takes no second slot.
#[inline(always)]
fn admit_syn(config: &GateConfig, info: &PacketInfo, policy: &Policy, now: u64) -> Verdict {
    let flow = FlowKey {
        saddr: info.saddr,
        daddr: info.daddr,
        sport: info.sport,
        dport: info.dport,
        family: info.family,
        _pad: [0; 3],
    };
    if slots::is_full(info.dport, policy.max_connections) {
        // A retransmission of an admitted SYN holds its reservation already.
        // SAFETY: only whether the entry exists is used.
        if unsafe { PENDING.get(flow) }.is_some() {
            return Verdict::Pass;
        }
        if !slots::sweep_if_due(info.dport, config, now)
            || slots::is_full(info.dport, policy.max_connections)
        {
            return Verdict::Drop(reason::CONN_LIMIT);
        }
    }
    let pending = PendingSyn { created_ns: now };
    match PENDING.insert(flow, pending, u64::from(BPF_NOEXIST)) {
        Ok(()) => {}
        Err(err) if err == -EEXIST => return Verdict::Pass,
        Err(_) => {
            // The map is full: free what has expired and try once more.
            slots::sweep_expired(config, now);
            if PENDING
                .insert(flow, pending, u64::from(BPF_NOEXIST))
                .is_err()
            {
                bump_stat(stat::PENDING_FULL);
                // Without a reservation the limit cannot be guaranteed, so a limited port
                // refuses; an unlimited one admits and `sock_ops` counts the connection.
                return if policy.max_connections == 0 {
                    Verdict::Accept
                } else {
                    Verdict::Drop(reason::CONN_LIMIT)
                };
            }
        }
    }
    if slots::take(info.dport, policy.max_connections, config, now) {
        Verdict::Accept
    } else {
        // Nothing else holds this entry: it was inserted above.
        let _unused = PENDING.remove(flow);
        Verdict::Drop(reason::CONN_LIMIT)
    }
}

/// The counters row of (port, proto, hook) on this CPU, created on first use.
#[inline(always)]
fn counter_row(port: u16, proto_code: u8, hook_code: u8) -> Option<*mut Counters> {
    let key = CounterKey {
        port,
        proto: proto_code,
        hook: hook_code,
    };
    if let Some(row) = COUNTERS.get_ptr_mut(key) {
        return Some(row);
    }
    // Another CPU may create the row first; either way the lookup below finds it.
    let _unused = COUNTERS.insert(key, Counters::default(), u64::from(BPF_NOEXIST));
    COUNTERS.get_ptr_mut(key)
}

/// Adds one bind denial to the bind hook's row of (port, proto).
#[inline(always)]
pub fn count_bind_denied(port: u16, proto_code: u8) {
    if let Some(row) = counter_row(port, proto_code, hook::BIND) {
        // SAFETY: a per-CPU row; only this CPU writes it while the program runs.
        unsafe { (*row).bind_denied += 1 };
    }
}

#[inline(always)]
fn handoff_key(info: &PacketInfo) -> HandoffKey {
    HandoffKey {
        saddr: info.saddr,
        l4_word: info.l4_word,
        sport: info.sport,
        dport: info.dport,
        proto: info.proto,
        family: info.family,
        _pad: [0; 2],
    }
}

/// Remembers a packet XDP passed, for `cgroup_skb` to skip.
#[inline(always)]
fn handoff_put(info: &PacketInfo, now: u64) {
    let _unused = HANDOFF.insert(handoff_key(info), now, 0);
}

/// Whether XDP already passed (and counted) this packet; forgets it if so.
#[inline(always)]
fn handoff_take(info: &PacketInfo, now: u64) -> bool {
    let key = handoff_key(info);
    // SAFETY: the value is copied out at once.
    let Some(passed_at) = (unsafe { HANDOFF.get(key) }).copied() else {
        return false;
    };
    HANDOFF.remove(key).is_ok() && now.wrapping_sub(passed_at) < defaults::HANDOFF_WINDOW_NS
}
