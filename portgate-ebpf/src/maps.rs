//! The maps, declared once; names, types and capacities come from portgate-common.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::SkStorage,
    macros::{btf_map, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use portgate_common::{
    AddrKey, AllowKey, ConnSlots, CountedSocket, CounterKey, Counters, EventRate, FlowKey,
    GateConfig, HandoffKey, PendingSyn, Policy, PortKey, capacity,
};

/// Per-port policy.
#[map(name = "PG_POLICY")]
pub static POLICY: HashMap<PortKey, Policy> = HashMap::with_max_entries(capacity::POLICIES, 0);

/// Allowlist prefixes, longest-prefix match on (port, proto, family, generation, address).
#[map(name = "PG_ALLOW")]
pub static ALLOW: LpmTrie<AllowKey, u32> =
    LpmTrie::with_max_entries(capacity::ALLOW_PREFIXES, BPF_F_NO_PREALLOC);

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

/// Established passive sockets holding a slot, by socket cookie.
#[map(name = "PG_SOCKETS")]
pub static SOCKETS: HashMap<u64, CountedSocket> =
    HashMap::with_max_entries(capacity::SOCKETS, BPF_F_NO_PREALLOC);

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

/// The namespace key of sockets of other namespaces than the host's (absent: the host's),
/// written at bind and when a passive connection is established, read by the `cgroup_skb`
/// fallback of kernels older than 6.15.
#[btf_map(name = "PG_SOCK_NETNS")]
pub static SOCKET_NETNS: SkStorage<u64> = SkStorage::new();

/// The storage of `sk` in [`SOCKET_NETNS`], made (holding `initial`) when `create` and
/// absent. `sk` is a full socket pointer the kernel handed the program.
#[inline(always)]
pub fn socket_netns(
    sk: *mut core::ffi::c_void,
    initial: Option<&mut u64>,
    create: bool,
) -> *mut u64 {
    let map: *mut core::ffi::c_void = (&raw const SOCKET_NETNS).cast_mut().cast();
    let flags = if create {
        u64::from(aya_ebpf::bindings::BPF_SK_STORAGE_GET_F_CREATE)
    } else {
        0
    };
    let value = initial.map_or(core::ptr::null_mut(), core::ptr::from_mut);
    // SAFETY: the map is the socket storage map's definition (the loader turns its address
    // into the map), `sk` a socket the kernel handed the program, `value` null or on the
    // caller's stack for the call.
    unsafe {
        aya_ebpf::helpers::generated::bpf_sk_storage_get(map, sk, value.cast(), flags).cast::<u64>()
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
