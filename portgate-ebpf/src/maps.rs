//! The maps, declared once; names, types and capacities come from portgate-common.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{HashOfMaps, LpmTrie, SkStorage},
    macros::{btf_map, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use portgate_common::{
    AddrKey, AllowKey, ConnSlots, CounterKey, Counters, EventRate, FlowKey, GateConfig, HandoffKey,
    PendingSyn, Policy, PortKey, SocketState, capacity,
};

/// Per-port policy.
#[map(name = "PG_POLICY")]
pub static POLICY: HashMap<PortKey, Policy> = HashMap::with_max_entries(capacity::POLICIES, 0);

/// One port's allowlist: longest-prefix match on (family, address).
pub type PortAllowlist = LpmTrie<AllowKey, u32, { capacity::ALLOW_PREFIXES as usize }>;

/// Allowlists by trie number ([`portgate_common::Policy::allowlist`]): each port's
/// prefixes in a trie of its own, so that other ports' prefixes cost a lookup nothing.
/// Userspace makes the tries; this declaration is their template.
#[btf_map(name = "PG_ALLOW")]
pub static ALLOW: HashOfMaps<
    u32,
    PortAllowlist,
    { capacity::POLICIES as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashOfMaps::new();

/// Authentication grants: expiry in `CLOCK_MONOTONIC` ns.
#[map(name = "PG_GRANTS")]
pub static GRANTS: HashMap<AddrKey, u64> = HashMap::with_max_entries(capacity::GRANTS, 0);

/// Per-CPU counters per (port, proto, hook); rows appear on first use.
#[map(name = "PG_COUNTERS")]
pub static COUNTERS: PerCpuHashMap<CounterKey, Counters> =
    PerCpuHashMap::with_max_entries(capacity::COUNTERS, BPF_F_NO_PREALLOC);

/// TCP connection slots per port; userspace makes each row with the port's policy.
#[map(name = "PG_SLOTS")]
pub static SLOTS: HashMap<PortKey, ConnSlots> = HashMap::with_max_entries(capacity::SLOTS, 0);

/// Reservations: handshakes on limited ports holding a slot, not yet established.
#[map(name = "PG_PENDING")]
pub static PENDING: HashMap<FlowKey, PendingSyn> =
    HashMap::with_max_entries(capacity::PENDING, BPF_F_NO_PREALLOC);

/// Deny events for userspace.
#[map(name = "PG_EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(capacity::EVENTS_BYTES, 0);

/// Per-(port, proto) deny-event rate limiter.
#[map(name = "PG_EVRATE")]
pub static EVENT_RATE: HashMap<PortKey, EventRate> =
    HashMap::with_max_entries(capacity::EVENT_RATE, BPF_F_NO_PREALLOC);

/// The gate's configuration at index 0.
#[map(name = "PG_CONFIG")]
pub static CONFIG: Array<GateConfig> = Array::with_max_entries(1, 0);

/// Per-CPU gate-wide statistics.
#[map(name = "PG_STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(capacity::STATS, 0);

/// Packets XDP passed and counted, so `cgroup_skb` does not count them again.
#[map(name = "PG_HANDOFF")]
pub static HANDOFF: LruHashMap<HandoffKey, u64> =
    LruHashMap::with_max_entries(capacity::HANDOFF, 0);

/// The namespace each XDP interface carries traffic for, by ifindex (absent: the host's).
#[map(name = "PG_XDP_NETNS")]
pub static XDP_NETNS: HashMap<u32, u64> = HashMap::with_max_entries(capacity::XDP_NETNS, 0);

/// The gate's state of each socket on a managed port: the slot a connection holds, the
/// policy generation it was judged under, and (for the `cgroup_skb` fallback of kernels
/// older than 6.15) its namespace. Freed by the kernel with its socket.
#[btf_map(name = "PG_SOCKETS")]
pub static SOCKETS: SkStorage<SocketState> = SkStorage::new();

/// The storage of `sk` in [`SOCKETS`]; made (all zero: no slot, not judged, the host's
/// namespace) when `create` and absent. Null when absent and not made, or when the kernel
/// could not make it. `sk` is a full socket pointer the kernel handed the program.
#[inline(always)]
pub fn socket_state(sk: *mut core::ffi::c_void, create: bool) -> *mut SocketState {
    let map: *mut core::ffi::c_void = (&raw const SOCKETS).cast_mut().cast();
    let flags = if create {
        u64::from(aya_ebpf::bindings::BPF_SK_STORAGE_GET_F_CREATE)
    } else {
        0
    };
    // SAFETY: the map is the socket storage map's definition (the loader turns its address
    // into the map), `sk` a socket the kernel handed the program; a null value makes the
    // storage zeroed.
    unsafe {
        aya_ebpf::helpers::generated::bpf_sk_storage_get(map, sk, core::ptr::null_mut(), flags)
            .cast::<SocketState>()
    }
}

/// Adds one to the per-CPU statistic `index`. Atomic: programs running in process
/// context (`sock_ops`, bind) can be preempted by another on the same CPU.
#[inline(always)]
pub fn bump_stat(index: u32) {
    if let Some(value) = STATS.get_ptr_mut(index) {
        crate::atomic::fetch_add(value, 1);
    }
}
