//! The one verdict both packet hooks enforce (DESIGN.md, "Verdict for traffic to a managed
//! port"): [`decide`] is the first-match-wins rule that userspace's verdict mirrors (the
//! differential test holds the two to each other); [`enforce`] applies it, with its
//! counting, reservations, deny events and the hand-off of counts between the two hooks.

use core::ffi::c_void;

use aya_ebpf::{bindings::BPF_NOEXIST, btf_maps::lpm_trie::Key, helpers::bpf_ktime_get_ns};
use portgate_common::{
    AddrKey, AllowKey, CounterKey, Counters, FlowKey, GateConfig, HOST_NETNS, HandoffKey, Policy,
    PortKey, config_flags, defaults, hook, netns_key, policy_flags, proto, reason, stat, status,
};

use crate::{
    atomic, events,
    maps::{ALLOW, CONFIG, COUNTERS, GRANTS, HANDOFF, POLICY, bump_stat, socket_state},
    parse::PacketInfo,
    reservations::{self, Reservation},
};

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
    /// The port refused (0 when a packet's ports could not be read).
    pub port: u16,
}

/// What became of the handshake of a packet that would complete one, as the socket
/// tables show it at that moment.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Handshake {
    /// Another packet of the handshake completed it: the connection is established, and
    /// the packet is that connection's.
    Established,
    /// A request socket stands for it: a handshake the kernel is in the middle of.
    InProgress,
    /// Neither: no handshake the kernel knows of (a stray ACK, such as a teardown's last
    /// one reaching the listener after the connection is gone, or a SYN-cookie ACK).
    Unknown,
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

/// What to do with a packet whose ports could not be read ([`Parsed::Unreadable`]): fail
/// closed. XDP passes it on only when `cgroup_skb` will judge the reassembled packet;
/// otherwise it is dropped and counted ([`stat::UNPARSABLE`]). Nothing is dropped while
/// the gate has no managed range.
///
/// [`Parsed::Unreadable`]: crate::parse::Parsed::Unreadable
#[inline(always)]
pub fn unreadable(hook_code: u8) -> Result<(), Refusal> {
    let Some(config) = CONFIG.get(0) else {
        return Ok(());
    };
    if config.max_port == 0
        || (hook_code == hook::XDP && config.flags & config_flags::SKB_ATTACHED != 0)
    {
        return Ok(());
    }
    bump_stat(stat::UNPARSABLE);
    // No port, so no per-port drop reason: the gate-wide statistic counts it.
    Err(Refusal { reason: 0, port: 0 })
}

/// Enforces the verdict on a parsed packet seen by `hook_code` ([`hook::XDP`] or
/// [`hook::SKB`]) with `bytes` on the wire: counts it, [`decide`]s, reports a drop as a deny
/// event and tells the other hook what XDP counted. A packet outside the managed range is
/// `Ok`, unless it is for a port of another namespace than the host's that is allocated
/// there (a container's port 80): the range is the host's, and every namespace's
/// allocations are managed wherever they are.
///
/// Both hooks judge every packet they see. The hand-off only keeps `cgroup_skb` from
/// counting again a packet XDP passed and counted (its packets, bytes and acceptance);
/// drops are counted by the hook that drops.
///
/// `handshake` is asked, only for a packet that would end a handshake and is about to be
/// refused or to take a reservation, what became of its handshake ([`Handshake`]).
///
/// `socket` is the full socket a `cgroup_skb` packet is delivered to when it is not a
/// listening one (null otherwise, and for XDP): the established-flow fast path
/// ([`decide_established`]) keeps in its storage the policy generation it was last judged under.
#[inline(always)]
pub fn enforce(
    info: &PacketInfo,
    hook_code: u8,
    bytes: u64,
    socket: *mut c_void,
    handshake: impl FnOnce() -> Handshake,
) -> Result<(), Refusal> {
    let Some(config) = CONFIG.get(0) else {
        return Ok(());
    };
    let in_range = config.manages(info.dport);
    let netns = netns_key(info.netns, config);
    if !in_range && netns == HOST_NETNS {
        return Ok(());
    }
    let mut clock = Clock(0);
    let seen = PortKey::new(netns, info.dport, info.proto);
    // SAFETY: the value is copied out at once; userspace replaces whole records.
    let policy = unsafe { POLICY.get(seen) }.copied();
    // Another namespace's port outside the range is managed only while allocated.
    if !in_range && policy.is_none() {
        return Ok(());
    }
    // Everything is kept under the allocation's own key, whichever hook sees the port.
    let home = policy.map_or(seen, |policy| policy.home);
    let counted_by_xdp = hook_code == hook::SKB
        && config.flags & config_flags::XDP_ATTACHED != 0
        && handoff_take(info, &home, clock.now());
    let counters = counter_row(&home, hook_code);
    if let Some(row) = counters
        && !counted_by_xdp
    {
        // SAFETY: a per-CPU row; packet hooks run in softirq context, one at a time per CPU.
        unsafe {
            (*row).packets += 1;
            (*row).bytes += bytes;
        }
    }
    let policy = policy.as_ref();
    // Two separate paths, so that the verifier does not walk the whole of `decide` once
    // with a socket and once without.
    let verdict = if established_tcp(info) {
        decide_established(info, policy, socket)
    } else {
        decide(config, info, policy, &home, &mut clock, handshake)
    };
    match verdict {
        Verdict::Pass => {}
        Verdict::Accept => {
            if let Some(row) = counters
                && !counted_by_xdp
            {
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
            let refusal = Refusal {
                reason: code,
                port: info.dport,
            };
            events::emit_packet(config, info, &home, refusal, hook_code, clock.now());
            return Err(refusal);
        }
    }
    if hook_code == hook::XDP && config.flags & config_flags::SKB_ATTACHED != 0 {
        handoff_put(info, &home, clock.now());
    }
    Ok(())
}

/// [`decide`] for a segment of an established TCP connection ([`established_tcp`]), where
/// only the allowlist applies, with the established-flow fast path: a connection whose
/// socket storage says it was last judged under the port's current policy generation
/// passes without a trie lookup, for nothing that applies to established traffic can have
/// changed since. A connection that passes the allowlist is remembered so (its storage
/// made if need be); a policy written meanwhile has another generation, so its next packet
/// is judged whole again. Ports without an allowlist need none of it.
///
/// `socket` is the connection's full socket, null when the hook has none (XDP).
#[inline(always)]
fn decide_established(info: &PacketInfo, policy: Option<&Policy>, socket: *mut c_void) -> Verdict {
    let Some(policy) = policy else {
        return Verdict::Pass;
    };
    if policy.flags & policy_flags::ALLOWLIST == 0 {
        return Verdict::Pass;
    }
    let mut state = if socket.is_null() {
        core::ptr::null_mut()
    } else {
        socket_state(socket, false)
    };
    // SAFETY: the helper returned this socket's storage (checked for null).
    if !state.is_null() && unsafe { (*state).generation } == policy.generation {
        return Verdict::Pass;
    }
    if !source_allowed(info, policy) {
        return Verdict::Drop(reason::NOT_ALLOWED);
    }
    if state.is_null() && !socket.is_null() {
        state = socket_state(socket, true);
    }
    if !state.is_null() {
        // SAFETY: as above.
        unsafe { (*state).generation = policy.generation };
    }
    Verdict::Pass
}

/// A TCP segment of an established connection: neither opening nor completing a handshake.
#[inline(always)]
fn established_tcp(info: &PacketInfo) -> bool {
    info.proto == proto::TCP && !info.new_connection() && !info.completes_handshake()
}

/// First match wins: unallocated, draining, not allowed, auth required, connection limit.
///
/// A new connection is judged at its SYN (or UDP datagram) and again at the packet that
/// completes its handshake ([`PacketInfo::completes_handshake`]), where a limited port
/// also needs a live reservation, or a slot free at that moment. Such a packet without a
/// reservation takes one only for a handshake the kernel is in the middle of: a stray ACK
/// would hold a slot for a connection that never comes. Without one it passes while the
/// port has room (a SYN-cookie ACK: `sock_ops` takes a slot for its connection) and is
/// refused when the port is full.
///
/// `policy` is the record of the port the packet is for, as the hook sees it (`None`: not
/// allocated); `home` is the allocation's key ([`Policy::home`]).
#[inline(always)]
fn decide<F: FnOnce() -> Handshake>(
    config: &GateConfig,
    info: &PacketInfo,
    policy: Option<&Policy>,
    home: &PortKey,
    clock: &mut Clock,
    handshake_state: F,
) -> Verdict {
    let handshake = info.completes_handshake();
    let new_connection = info.new_connection() || handshake;
    // Asked at most once, and only of a packet completing a handshake.
    let mut lookup = Some(handshake_state);
    let mut state = || {
        if handshake {
            lookup.take().map_or(Handshake::Unknown, |look| look())
        } else {
            Handshake::Unknown
        }
    };
    // A packet of a handshake another packet completed meanwhile is established traffic.
    let mut refuse = |code: u8| {
        if state() == Handshake::Established {
            Verdict::Pass
        } else {
            Verdict::Drop(code)
        }
    };
    let Some(policy) = policy else {
        return if new_connection {
            refuse(reason::UNALLOCATED)
        } else {
            Verdict::Pass
        };
    };
    if new_connection && policy.status != status::ACTIVE {
        return refuse(reason::DRAINING);
    }
    if policy.flags & policy_flags::ALLOWLIST != 0 && !source_allowed(info, policy) {
        return Verdict::Drop(reason::NOT_ALLOWED);
    }
    if !new_connection {
        return Verdict::Pass;
    }
    let now = clock.now();
    if policy.flags & policy_flags::REQUIRE_AUTH != 0 && !granted(info, home, now) {
        return refuse(reason::AUTH_REQUIRED);
    }
    if info.proto == proto::UDP {
        return Verdict::Accept;
    }
    if policy.max_connections == 0 {
        // An unlimited port takes no reservation: `sock_ops` counts what is established.
        return if handshake {
            Verdict::Pass
        } else {
            Verdict::Accept
        };
    }
    let flow = flow_key(info, home);
    if handshake && !reservations::confirm(config, &flow, policy, now) {
        match state() {
            Handshake::Established => return Verdict::Pass,
            Handshake::InProgress => {}
            Handshake::Unknown => {
                return if reservations::has_room(home, policy) {
                    Verdict::Pass
                } else {
                    Verdict::Drop(reason::CONN_LIMIT)
                };
            }
        }
    } else if handshake {
        return Verdict::Pass;
    }
    match reservations::reserve(config, &flow, policy, now) {
        Reservation::Made => Verdict::Accept,
        Reservation::Held => Verdict::Pass,
        Reservation::Refused => Verdict::Drop(reason::CONN_LIMIT),
    }
}

#[inline(always)]
fn flow_key(info: &PacketInfo, home: &PortKey) -> FlowKey {
    FlowKey {
        home: *home,
        saddr: info.saddr,
        sport: info.sport,
        family: info.family,
        _pad: [0; 5],
    }
}

/// Whether the port's allowlist in force (in its own trie, the generation its record
/// names) holds a prefix of the packet's source. A port whose record says it has one but
/// whose trie is missing admits nobody.
#[inline(always)]
fn source_allowed(info: &PacketInfo, policy: &Policy) -> bool {
    let address_bits = if info.family == portgate_common::family::V4 {
        32
    } else {
        128
    };
    let key = Key::new(
        AllowKey::PREFIX_BITS + address_bits,
        AllowKey {
            generation: u8::from(policy.flags & policy_flags::ALLOW_GENERATION != 0),
            family: info.family,
            _pad: [0; 2],
            addr: info.saddr,
        },
    );
    let trie = policy.allowlist;
    // SAFETY: only the presence of an entry is read.
    unsafe { ALLOW.get_value(&trie, &key) }.is_some()
}

#[inline(always)]
fn granted(info: &PacketInfo, home: &PortKey, now: u64) -> bool {
    let key = AddrKey {
        netns: home.netns,
        port: home.port,
        proto: home.proto,
        family: info.family,
        _pad: [0; 4],
        addr: info.saddr,
    };
    // SAFETY: the value is copied out at once.
    match unsafe { GRANTS.get(key) } {
        Some(expires) => now < *expires,
        None => false,
    }
}

/// The counters row of (port, hook) on this CPU, created on first use.
#[inline(always)]
fn counter_row(port: &PortKey, hook_code: u8) -> Option<*mut Counters> {
    let key = CounterKey {
        port: *port,
        hook: hook_code,
        _pad: [0; 7],
    };
    if let Some(row) = COUNTERS.get_ptr_mut(key) {
        return Some(row);
    }
    // Another CPU may create the row first; either way the lookup below finds it.
    let _unused = COUNTERS.insert(key, Counters::default(), u64::from(BPF_NOEXIST));
    COUNTERS.get_ptr_mut(key)
}

/// Adds one bind denial to the bind hook's row of `port`. Atomic: `bind()` runs in
/// process context, where another program can run on the same CPU before this one ends.
#[inline(always)]
pub fn count_bind_denied(port: &PortKey) {
    if let Some(row) = counter_row(port, hook::BIND) {
        // SAFETY: the pointer is into this CPU's row of the map's value.
        atomic::fetch_add(unsafe { &raw mut (*row).bind_denied }, 1);
    }
}

/// The hand-off key: every header field XDP read that a published port's DNAT leaves
/// alone, and the allocation in place of the destination, so it names exactly the packet
/// XDP counted, before DNAT as after it.
#[inline(always)]
fn handoff_key(info: &PacketInfo, home: &PortKey) -> HandoffKey {
    HandoffKey {
        home: *home,
        saddr: info.saddr,
        l4_word: info.l4_word,
        sport: info.sport,
        family: info.family,
        tcp_flags: info.tcp_flags,
    }
}

/// Remembers a packet XDP passed and counted, for `cgroup_skb` not to count again.
#[inline(always)]
fn handoff_put(info: &PacketInfo, home: &PortKey, now: u64) {
    let _unused = HANDOFF.insert(handoff_key(info, home), now, 0);
}

/// Whether XDP already passed and counted this packet; forgets it if so.
#[inline(always)]
fn handoff_take(info: &PacketInfo, home: &PortKey, now: u64) -> bool {
    let key = handoff_key(info, home);
    // SAFETY: the value is copied out at once.
    let Some(passed_at) = (unsafe { HANDOFF.get(key) }).copied() else {
        return false;
    };
    HANDOFF.remove(key).is_ok() && now.wrapping_sub(passed_at) < defaults::HANDOFF_WINDOW_NS
}
