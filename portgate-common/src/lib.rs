//! Types and constants shared by portgate's kernel programs and its userspace.
//!
//! Everything a map holds is declared here once, `#[repr(C)]` with explicit padding and no
//! `bool`, `enum` or `Option` inside, so both sides agree on every byte. With the `user`
//! feature the types implement [`aya::Pod`] for userspace.
#![no_std]
#![expect(
    clippy::pub_underscore_fields,
    reason = "explicit `_pad` fields, so the Pod types have no implicit padding"
)]

/// Names of the maps, as the kernel object declares them and as they are pinned.
///
/// Kernel object names hold at most 15 bytes.
pub mod map_names {
    /// Per-port policy: [`crate::Policy`] keyed by [`crate::PortKey`].
    pub const POLICY: &str = "PG_POLICY";
    /// Allowlists: a hash of maps keyed by trie number ([`crate::Policy::allowlist`]), each
    /// value an LPM trie of one port's prefixes keyed by [`crate::AllowKey`] with a prefix
    /// length. Userspace makes the tries ahead of need, in batches, and hands each port one.
    pub const ALLOW: &str = "PG_ALLOW";
    /// Authentication grants: expiry (`CLOCK_MONOTONIC` ns) keyed by [`crate::AddrKey`].
    pub const GRANTS: &str = "PG_GRANTS";
    /// Per-CPU [`crate::Counters`] keyed by [`crate::CounterKey`].
    pub const COUNTERS: &str = "PG_COUNTERS";
    /// TCP connection slots per port: [`crate::ConnSlots`] keyed by [`crate::PortKey`].
    pub const SLOTS: &str = "PG_SLOTS";
    /// SYNs admitted whose handshake has not completed: [`crate::PendingSyn`] keyed by
    /// [`crate::FlowKey`].
    pub const PENDING: &str = "PG_PENDING";
    /// Socket-local storage: the [`crate::SocketState`] of sockets on managed ports (the
    /// slot a connection holds, the policy generation it was judged under, its namespace).
    /// The kernel frees each socket's value with the socket.
    pub const SOCKETS: &str = "PG_SOCKETS";
    /// Deny events: ring buffer of [`crate::DenyEvent`].
    pub const EVENTS: &str = "PG_EVENTS";
    /// Per-port deny-event rate limiter: [`crate::EventRate`] keyed by [`crate::PortKey`].
    pub const EVENT_RATE: &str = "PG_EVRATE";
    /// The gate's configuration: one [`crate::GateConfig`] at index 0.
    pub const CONFIG: &str = "PG_CONFIG";
    /// Per-CPU gate-wide statistics: `u64` indexed by the [`crate::stat`] constants.
    pub const STATS: &str = "PG_STATS";
    /// Packets XDP passed, for `cgroup_skb` to skip: LRU map keyed by [`crate::HandoffKey`].
    pub const HANDOFF: &str = "PG_HANDOFF";
    /// The namespace each XDP interface carries traffic for: netns cookie keyed by ifindex.
    pub const XDP_NETNS: &str = "PG_XDP_NETNS";
    /// The programs' diagnostic lines: aya-log's ring buffer, declared (and named) by
    /// aya-log-ebpf. Pinned with the others so that a restarted daemon reads the lines of
    /// the programs it adopted.
    pub const KERNEL_LOG: &str = "AYA_LOGS";

    /// Every map, in the order userspace pins, adopts and removes them.
    pub const ALL: [&str; 14] = [
        POLICY, ALLOW, GRANTS, COUNTERS, SLOTS, PENDING, SOCKETS, EVENTS, EVENT_RATE, CONFIG,
        STATS, HANDOFF, XDP_NETNS, KERNEL_LOG,
    ];
}

/// Names of the kernel programs (their function names in the object).
pub mod program_names {
    /// XDP verdict, attached per interface.
    pub const XDP: &str = "portgate_xdp";
    /// `cgroup_skb/ingress` verdict, attached to a cgroup: finds each packet's namespace
    /// with `bpf_get_netns_cookie` (Linux 6.15 and later).
    pub const SKB: &str = "portgate_skb";
    /// The same verdict for older kernels, whose `cgroup_skb` cannot call
    /// `bpf_get_netns_cookie`: reads the namespace the bind and `sock_ops` programs
    /// recorded in the socket's storage ([`crate::SocketState::netns`]).
    pub const SKB_SOCKET_NETNS: &str = "portgate_skb_sk";
    /// `cgroup/bind4` bind ownership.
    pub const BIND4: &str = "portgate_bind4";
    /// `cgroup/bind6` bind ownership.
    pub const BIND6: &str = "portgate_bind6";
    /// `sock_ops` active-connection counting.
    pub const SOCK_OPS: &str = "portgate_sockops";
}

/// Capacities of the maps.
pub mod capacity {
    /// Policy records: every port in both protocols of the host's namespace, once more
    /// for other namespaces' ports and the host sides of published ports.
    pub const POLICIES: u32 = 65_536 * 2 * 2;
    /// Allowlist prefixes over all ports: room for 10,000 ports with 100 prefixes each.
    /// Also each port's trie's own capacity; userspace keeps the sum within it. The tries
    /// are not preallocated: memory follows the prefixes actually stored.
    pub const ALLOW_PREFIXES: u32 = 1 << 20;
    /// Unexpired authentication grants over all ports.
    pub const GRANTS: u32 = 131_072;
    /// Counter rows: every port, both protocols, every hook.
    pub const COUNTERS: u32 = 65_536 * 2 * super::hook::COUNT as u32;
    /// Slot rows: one per TCP policy record, and the sweep clock's.
    pub const SLOTS: u32 = 65_536 * 2 + 1;
    /// Handshakes in flight over all ports.
    pub const PENDING: u32 = 65_536;
    /// Handshakes in flight on one port: one port's SYNs cannot take more than this share
    /// of [`PENDING`], so a flood at one port leaves room for the others.
    pub const PENDING_PER_PORT: u32 = 4_096;
    /// Ring buffer size in bytes (a power of two, a multiple of the page size).
    pub const EVENTS_BYTES: u32 = 1 << 20;
    /// The diagnostic lines' ring buffer in bytes: aya-log-ebpf 0.2.0 declares it this
    /// size (the pin's layout check notices if another version changes it).
    pub const KERNEL_LOG_BYTES: u32 = 1 << 17;
    /// Rate-limiter rows: every port in both protocols.
    pub const EVENT_RATE: u32 = 65_536 * 2;
    /// Interfaces with XDP attached.
    pub const XDP_NETNS: u32 = 1_024;
    /// Packets remembered between XDP and `cgroup_skb` (an LRU map).
    pub const HANDOFF: u32 = 16_384;
    /// Length of the per-CPU statistics array.
    pub const STATS: u32 = super::stat::COUNT;
}

/// IP protocol numbers of the managed protocols.
pub mod proto {
    /// `IPPROTO_TCP`.
    pub const TCP: u8 = 6;
    /// `IPPROTO_UDP`.
    pub const UDP: u8 = 17;
}

/// Address families as stored in keys (not `AF_*`: these are the IP versions).
pub mod family {
    /// IPv4: the address fills the first 4 bytes of a 16-byte field, the rest is zero.
    pub const V4: u8 = 4;
    /// IPv6.
    pub const V6: u8 = 6;
}

/// Port status codes in [`Policy::status`]; an absent policy means Available.
pub mod status {
    /// Allocated and taking new connections.
    pub const ACTIVE: u32 = 1;
    /// Released or expired: established connections continue, new ones are refused.
    pub const DRAINING: u32 = 2;
    /// No new connections; waiting for quarantine to end.
    pub const CLOSED: u32 = 3;
}

/// Bits of [`Policy::flags`].
pub mod policy_flags {
    /// The port has a non-empty allowlist: sources outside it are dropped.
    pub const ALLOWLIST: u32 = 1 << 0;
    /// New connections need an unexpired grant for their source.
    pub const REQUIRE_AUTH: u32 = 1 << 1;
    /// Only the owner cgroup (or a descendant) may bind the port.
    pub const OWNER: u32 = 1 << 2;
    /// The allowlist in force is the one stored under generation 1 of [`crate::AllowKey`]
    /// in the port's trie (clear: generation 0). A new allowlist is written under the other
    /// generation, then one write of the record switches to it, so no packet ever sees half
    /// of a change, nor the new list with the old record.
    pub const ALLOW_GENERATION: u32 = 1 << 3;
}

/// Drop and deny reasons. The numeric codes are stable: they appear in events, metrics and
/// the JSON output.
pub mod reason {
    /// The port is managed but not allocated.
    pub const UNALLOCATED: u8 = 1;
    /// The port is Draining or Closed.
    pub const DRAINING: u8 = 2;
    /// The source is not in the port's allowlist.
    pub const NOT_ALLOWED: u8 = 3;
    /// The port requires authentication and the source holds no unexpired grant.
    pub const AUTH_REQUIRED: u8 = 4;
    /// The port already holds `max_connections`.
    pub const CONN_LIMIT: u8 = 5;
    /// A `bind()` by a cgroup that does not own the port (events only).
    pub const BIND_DENIED: u8 = 6;

    /// Number of packet drop reasons: the length of [`crate::Counters::dropped`].
    pub const DROP_COUNT: usize = 5;

    /// The name of a reason as the spec and the JSON output spell it.
    #[must_use]
    pub const fn name(code: u8) -> &'static str {
        match code {
            UNALLOCATED => "unallocated",
            DRAINING => "draining",
            NOT_ALLOWED => "not_allowed",
            AUTH_REQUIRED => "auth_required",
            CONN_LIMIT => "conn_limit",
            BIND_DENIED => "bind_denied",
            _ => "unknown",
        }
    }

    /// Index of a packet drop reason in [`crate::Counters::dropped`].
    #[must_use]
    pub const fn drop_index(code: u8) -> usize {
        (code as usize).wrapping_sub(1)
    }
}

/// Hooks that keep their own counter rows.
pub mod hook {
    /// The XDP program.
    pub const XDP: u8 = 0;
    /// The `cgroup_skb/ingress` program.
    pub const SKB: u8 = 1;
    /// The `cgroup/bind4` and `cgroup/bind6` programs.
    pub const BIND: u8 = 2;
    /// Number of hooks.
    pub const COUNT: u8 = 3;

    /// The hook's name in output.
    #[must_use]
    pub const fn name(code: u8) -> &'static str {
        match code {
            XDP => "xdp",
            SKB => "cgroup_skb",
            BIND => "bind",
            _ => "unknown",
        }
    }
}

/// Indexes of the per-CPU [`map_names::STATS`] array.
pub mod stat {
    /// Deny events lost because the ring buffer was full.
    pub const EVENTS_LOST_FULL: u32 = 0;
    /// Deny events suppressed by the per-port rate limit.
    pub const EVENTS_RATE_LIMITED: u32 = 1;
    /// Handshakes refused (counted `conn_limit` on their port) because the
    /// pending-handshake map was full.
    pub const PENDING_FULL: u32 = 2;
    /// Established connections that could not be tracked: the kernel could not make their
    /// socket storage (out of memory). They hold no slot and are not counted as active.
    pub const SOCKETS_FULL: u32 = 3;
    /// Sweeps of expired handshake reservations.
    pub const PENDING_SWEEPS: u32 = 4;
    /// TCP or UDP packets dropped because their ports could not be read (truncated
    /// headers, too many IPv6 extension headers, fragments `cgroup_skb` would not see).
    pub const UNPARSABLE: u32 = 5;
    /// Connections on a limited port that were established without a live reservation
    /// (only possible if their handshake bypassed `cgroup_skb`); they are not counted.
    pub const UNRESERVED: u32 = 6;
    /// Handshakes refused (counted `conn_limit` on their port) because their port already
    /// had [`crate::capacity::PENDING_PER_PORT`] in flight.
    pub const PENDING_PORT_FULL: u32 = 7;
    /// Length of the array.
    pub const COUNT: u32 = 8;
}

/// Defaults the gate runs with unless userspace configures otherwise.
pub mod defaults {
    /// A SYN reservation whose handshake has not completed after this long is released.
    pub const PENDING_TTL_NS: u64 = 5_000_000_000;
    /// Deny events per second per (port, proto) before the rest are only counted.
    pub const EVENTS_PER_SEC: u32 = 100;
    /// A full port's expired reservations are swept at most this often.
    pub const SWEEP_INTERVAL_NS: u64 = 100_000_000;
    /// The XDP-to-`cgroup_skb` hand-off is trusted for this long.
    pub const HANDOFF_WINDOW_NS: u64 = 10_000_000;
}

/// Bits of [`GateConfig::flags`].
pub mod config_flags {
    /// `cgroup_skb` is attached: XDP remembers what it passed so the packet is judged once.
    pub const SKB_ATTACHED: u32 = 1 << 0;
    /// XDP is attached somewhere: `cgroup_skb` looks for what XDP already judged.
    pub const XDP_ATTACHED: u32 = 1 << 1;
    /// The `cgroup_skb` fallback that reads a socket's namespace from its storage is
    /// attached: the bind and `sock_ops` programs record it in [`crate::SocketState::netns`]
    /// (otherwise the bind program spares listening sockets that storage).
    pub const SOCKET_NETNS: u32 = 1 << 2;
    /// The daemon reads the programs' diagnostic lines ([`crate::map_names::KERNEL_LOG`]):
    /// a refusal is written there as a line.
    pub const KERNEL_LOG: u32 = 1 << 3;
}

/// The network namespace of the host's own ports in every key: the namespace the gate was
/// installed for ([`GateConfig::host_netns`]). Any other namespace is keyed by its netns
/// cookie, which the kernel never gives to two namespaces while it runs and never makes 0.
pub const HOST_NETNS: u64 = 0;

/// A port's identity, (network namespace, protocol, port): the key of the policy,
/// rate-limit and slot maps, and the start of every other per-port key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortKey {
    /// The namespace's netns cookie, or [`HOST_NETNS`].
    pub netns: u64,
    /// Port number, host byte order.
    pub port: u16,
    /// [`proto::TCP`] or [`proto::UDP`].
    pub proto: u8,
    /// Always zero, so this type has no implicit padding.
    pub _pad: [u8; 5],
}

impl PortKey {
    /// The key of `port` in `proto` in the namespace `netns`.
    #[must_use]
    pub const fn new(netns: u64, port: u16, proto: u8) -> Self {
        Self {
            netns,
            port,
            proto,
            _pad: [0; 5],
        }
    }
}

/// The namespace key of a netns cookie: [`HOST_NETNS`] for the host's, the cookie otherwise.
#[must_use]
#[inline]
pub const fn netns_key(cookie: u64, config: &GateConfig) -> u64 {
    if cookie == config.host_netns {
        HOST_NETNS
    } else {
        cookie
    }
}

/// A port's policy, written by userspace, read by every hook.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// Which allocation of the port this is: connection slots counted under another epoch
    /// (an earlier owner's) do not count against this one (see [`ConnSlots`]).
    pub epoch: u32,
    /// One of the [`status`] codes.
    pub status: u32,
    /// [`policy_flags`] bits.
    pub flags: u32,
    /// Most TCP connections established at once; 0 means unlimited.
    pub max_connections: u32,
    /// Level of `owner_cgroup` in the cgroup2 hierarchy (the root is level 0).
    pub owner_level: u32,
    /// The host port this allocation is published on (a record of its own keyed there
    /// points [`Policy::home`] here); 0 when not published. Read by userspace only, to find
    /// that record again.
    pub published_port: u16,
    /// Always zero, so this type has no implicit padding.
    pub _pad: u16,
    /// Changes with every write of the record (never 0). An established connection
    /// remembers the generation it was last judged under ([`SocketState::generation`]);
    /// while the port's is the same, its packets pass without another allowlist lookup.
    pub generation: u32,
    /// The number of the port's trie in [`map_names::ALLOW`] (0: none), where its
    /// allowlist is.
    pub allowlist: u32,
    /// cgroup id (the cgroup directory's inode number) of the owner; 0 when no owner.
    pub owner_cgroup: u64,
    /// The allocation this record belongs to: where its allowlist, grants, counters, slots
    /// and reservations are kept. The record's own key, except for the host side of a
    /// published port (host port -> DNAT -> container port), whose record is a copy of the
    /// container port's pointing home to it, so that whichever hook sees a connection
    /// judges and counts it as the one allocation it is.
    pub home: PortKey,
}

/// An address in the context of a port: the key of the grants map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AddrKey {
    /// The port's namespace, as in [`PortKey::netns`].
    pub netns: u64,
    /// Port number, host byte order.
    pub port: u16,
    /// [`proto::TCP`] or [`proto::UDP`].
    pub proto: u8,
    /// [`family::V4`] or [`family::V6`].
    pub family: u8,
    /// Always zero, so this type has no implicit padding.
    pub _pad: [u8; 4],
    /// The address in network byte order; IPv4 in the first 4 bytes, the rest zero.
    pub addr: [u8; 16],
}

/// Key data of an allowlist prefix in a port's trie ([`map_names::ALLOW`]).
///
/// The first 32 bits (generation, family, padding) are always matched, so the prefix
/// length of a CIDR `a/n` is `32 + n`. Each port's trie holds two generations of its
/// allowlist; [`policy_flags::ALLOW_GENERATION`] of its record says which one is in force.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AllowKey {
    /// 0 or 1: which of the port's two allowlists this prefix belongs to.
    pub generation: u8,
    /// [`family::V4`] or [`family::V6`].
    pub family: u8,
    /// Always zero, so this type has no implicit padding.
    pub _pad: [u8; 2],
    /// The address in network byte order; IPv4 in the first 4 bytes, the rest zero.
    pub addr: [u8; 16],
}

impl AllowKey {
    /// Bits before the address in an LPM key.
    pub const PREFIX_BITS: u32 = 32;
}

/// Key of the per-CPU counters map: one row per (port, hook).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CounterKey {
    /// The port ([`Policy::home`] for an allocated one).
    pub port: PortKey,
    /// One of the [`hook`] codes.
    pub hook: u8,
    /// Always zero, so this type has no implicit padding.
    pub _pad: [u8; 7],
}

/// Counters of one (port, proto, hook) on one CPU; userspace sums the CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Packets to the port this hook judged.
    pub packets: u64,
    /// Bytes of those packets.
    pub bytes: u64,
    /// New connections (TCP SYN, UDP datagram) passed.
    pub accepted: u64,
    /// Drops by reason, indexed by [`reason::drop_index`].
    pub dropped: [u64; reason::DROP_COUNT],
    /// Refused `bind()` calls.
    pub bind_denied: u64,
}

/// TCP connection slots of one port. Updated by the kernel with atomic instructions only.
///
/// `slots` and `established` are each a [`slot_word`]: the [`Policy::epoch`] they count for
/// in the high 32 bits, the count in the low 32. The first change under a new epoch starts
/// the count again from zero, and a connection of an earlier epoch that closes leaves it
/// alone, so one allocation's connections never count against the next.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnSlots {
    /// Established connections plus handshakes holding a reservation: what
    /// `max_connections` bounds.
    pub slots: u64,
    /// Established connections counted by `sock_ops`: the port's active connections.
    pub established: u64,
    /// The row of [`PortKey::default`] only (port 0 is never managed): when expired
    /// reservations were last swept, gate-wide (`CLOCK_MONOTONIC` ns).
    pub last_sweep_ns: u64,
}

/// The epoch-and-count words of [`ConnSlots`].
pub mod slot_word {
    /// The word of `count` under `epoch`.
    #[must_use]
    #[inline]
    pub const fn pack(epoch: u32, count: u32) -> u64 {
        ((epoch as u64) << 32) | count as u64
    }

    /// The epoch a word counts for.
    #[must_use]
    #[inline]
    pub const fn epoch(word: u64) -> u32 {
        (word >> 32) as u32
    }

    /// The count of a word.
    #[must_use]
    #[inline]
    #[expect(clippy::cast_possible_truncation, reason = "the low 32 bits")]
    pub const fn count(word: u64) -> u32 {
        word as u32
    }

    /// The count of a word if it counts for `epoch`, else 0 (nothing counted yet).
    #[must_use]
    #[inline]
    pub const fn count_for(word: u64, epoch: u32) -> u32 {
        if self::epoch(word) == epoch {
            count(word)
        } else {
            0
        }
    }
}

/// A TCP connection to an allocated port: the client's address and port, and the port's
/// [`Policy::home`]. The destination address is left out on purpose: XDP sees a published
/// port's connection before DNAT and the container's hooks after it, and both must name
/// the same reservation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// The allocation ([`Policy::home`]).
    pub home: PortKey,
    /// Remote (source) address, as in [`AddrKey::addr`].
    pub saddr: [u8; 16],
    /// Remote port, host byte order.
    pub sport: u16,
    /// [`family::V4`] or [`family::V6`].
    pub family: u8,
    /// Always zero, so this type has no implicit padding.
    pub _pad: [u8; 5],
}

/// A reservation: a handshake on a limited port that took a slot and has not completed yet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingSyn {
    /// When the reservation was made or last confirmed (`CLOCK_MONOTONIC` ns), or
    /// [`PendingSyn::CLAIMED`] once a sweep or the established connection has taken it
    /// (changed by compare-and-exchange only, so exactly one of them does).
    pub created_ns: u64,
    /// The [`Policy::epoch`] whose slot it holds.
    pub epoch: u32,
    /// The [`Policy::generation`] the handshake was last judged under: the connection's
    /// [`SocketState::generation`] once established.
    pub generation: u32,
}

impl PendingSyn {
    /// `created_ns` of a reservation that is being given back or turned into a connection.
    pub const CLAIMED: u64 = u64::MAX;
}

/// What the gate keeps in a socket's local storage ([`map_names::SOCKETS`]), freed by the
/// kernel with the socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketState {
    /// The allocation the connection belongs to ([`Policy::home`]).
    pub home: PortKey,
    /// The slot the connection holds, as a [`slot_word`] (its epoch and a count of 1), or 0
    /// when it holds none. Changed by compare-and-exchange only, so the slot is given back
    /// exactly once.
    pub slot: u64,
    /// The namespace key ([`PortKey::netns`]) of the socket, for the `cgroup_skb` fallback
    /// of kernels that cannot ask a packet's namespace
    /// ([`program_names::SKB_SOCKET_NETNS`]). Written only while that fallback is attached.
    pub netns: u64,
    /// The [`Policy::generation`] the connection was last judged under, or
    /// [`SocketState::UNJUDGED`].
    pub generation: u32,
    /// Always zero, so this type has no implicit padding.
    pub _pad: u32,
}

impl SocketState {
    /// [`SocketState::generation`] of a connection not judged yet (no record has it).
    pub const UNJUDGED: u32 = 0;
}

/// A deny event, read from the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DenyEvent {
    /// `CLOCK_MONOTONIC` ns.
    pub time_ns: u64,
    /// For bind denials, the calling task's cgroup id; 0 otherwise.
    pub cgroup_id: u64,
    /// The port's namespace, as in [`PortKey::netns`] ([`Policy::home`]'s for an
    /// allocated port).
    pub netns: u64,
    /// Source address of the packet (for bind denials, the address bound), as in
    /// [`AddrKey::addr`].
    pub addr: [u8; 16],
    /// For bind denials, the calling task's tgid; 0 otherwise.
    pub pid: u32,
    /// Destination (or bound) port, host byte order.
    pub port: u16,
    /// [`proto::TCP`] or [`proto::UDP`].
    pub proto: u8,
    /// [`family::V4`] or [`family::V6`].
    pub family: u8,
    /// One of the [`reason`] codes.
    pub reason: u8,
    /// One of the [`hook`] codes.
    pub hook: u8,
    /// Always zero, so this type has no implicit padding.
    pub _pad: [u8; 6],
}

/// Per-port deny-event rate limiter state (a one-second window).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventRate {
    /// Start of the current window (`CLOCK_MONOTONIC` ns).
    pub window_start_ns: u64,
    /// Events emitted in the current window.
    pub count: u64,
}

/// The gate's configuration, index 0 of the config array.
///
/// A zero `max_port` means nothing is configured: every packet passes untouched.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GateConfig {
    /// Lowest managed port.
    pub min_port: u16,
    /// Highest managed port.
    pub max_port: u16,
    /// Deny events per second per (port, proto); 0 disables events.
    pub events_per_sec: u32,
    /// [`config_flags`] bits.
    pub flags: u32,
    /// Always zero, so this type has no implicit padding.
    pub _pad: u32,
    /// A SYN reservation whose handshake has not completed after this long is released.
    pub pending_ttl_ns: u64,
    /// The netns cookie of the host's namespace: its ports are keyed [`HOST_NETNS`].
    pub host_netns: u64,
}

impl GateConfig {
    /// Whether `port` is in the managed range.
    #[must_use]
    #[inline]
    pub const fn manages(&self, port: u16) -> bool {
        self.max_port != 0 && port >= self.min_port && port <= self.max_port
    }
}

/// A packet XDP passed and counted, remembered so that `cgroup_skb` does not count it
/// again. `cgroup_skb` still judges every packet it sees: the hand-off only keeps the
/// counters from counting one packet twice, so a forged entry can hide a packet from the
/// counters but never lets one through.
///
/// Key of the [`map_names::HANDOFF`] LRU map; the value is the time XDP passed it
/// (`CLOCK_MONOTONIC` ns).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct HandoffKey {
    /// The port the packet is for: its [`Policy::home`], the same before and after a
    /// published port's DNAT (the port itself when it has no policy).
    pub home: PortKey,
    /// Source address, as in [`AddrKey::addr`].
    pub saddr: [u8; 16],
    /// TCP sequence number, or UDP length and checksum, of the packet.
    pub l4_word: u32,
    /// Source port, host byte order.
    pub sport: u16,
    /// [`family::V4`] or [`family::V6`].
    pub family: u8,
    /// The TCP flags byte of the segment (0 for UDP).
    pub tcp_flags: u8,
}

#[cfg(feature = "user")]
mod pod {
    use super::{
        AddrKey, AllowKey, ConnSlots, CounterKey, Counters, DenyEvent, EventRate, FlowKey,
        GateConfig, HandoffKey, PendingSyn, Policy, PortKey, SocketState,
    };

    // SAFETY: each type is `#[repr(C)]`, `Copy`, made only of integers and integer arrays,
    // with explicit padding fields, so every bit pattern is valid and none is uninitialised.
    unsafe impl aya::Pod for PortKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Policy {}
    // SAFETY: as above.
    unsafe impl aya::Pod for AddrKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for AllowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CounterKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Counters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ConnSlots {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PendingSyn {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SocketState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for DenyEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for EventRate {}
    // SAFETY: as above.
    unsafe impl aya::Pod for GateConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for HandoffKey {}
}

#[cfg(test)]
mod tests;
