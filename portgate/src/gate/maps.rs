//! Reading and writing the gate's maps: grants, counters, slots, statistics (policies and
//! allowlists are in `policies`).

use std::{collections::BTreeMap, net::IpAddr};

use aya::maps::{HashMap, HashOfMaps, MapData, MapError, PerCpuArray, PerCpuHashMap};
use portgate_common::{
    AddrKey, ConnSlots, CounterKey, Counters, EventRate, FlowKey, HandoffKey, PendingSyn, Policy,
    PortKey, capacity, hook, map_names, reason, slot_word, stat,
};
use serde::Serialize;

use super::{
    Gate, GateError,
    keys::{addr_from_bytes, addr_key, port_key, port_of},
};
use crate::model::{DropReason, PortId, PortMetrics, Protocol};

/// One hook's counters for a port, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HookCounters {
    /// Packets judged.
    pub packets: u64,
    /// Bytes of those packets.
    pub bytes: u64,
    /// New connections passed.
    pub accepted: u64,
    /// Drops by reason, indexed by [`portgate_common::reason::drop_index`].
    pub dropped: [u64; reason::DROP_COUNT],
    /// Refused binds.
    pub bind_denied: u64,
}

impl From<&Counters> for HookCounters {
    fn from(cpu: &Counters) -> Self {
        Self {
            packets: cpu.packets,
            bytes: cpu.bytes,
            accepted: cpu.accepted,
            dropped: cpu.dropped,
            bind_denied: cpu.bind_denied,
        }
    }
}

impl HookCounters {
    fn add(&mut self, other: &Self) {
        self.packets += other.packets;
        self.bytes += other.bytes;
        self.accepted += other.accepted;
        for (total, value) in self.dropped.iter_mut().zip(other.dropped) {
            *total += value;
        }
        self.bind_denied += other.bind_denied;
    }

    /// Drops for one reason code.
    #[must_use]
    pub fn dropped_for(&self, code: u8) -> u64 {
        self.dropped
            .get(reason::drop_index(code))
            .copied()
            .unwrap_or(0)
    }
}

/// A port's counters: per hook (indexed by [`portgate_common::hook`]) and their total.
///
/// Each packet is counted by one hook only (XDP hands what it passed to `cgroup_skb`), so
/// the total is the sum.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PortCounters {
    /// Per hook: XDP, `cgroup_skb`, bind.
    pub hooks: [HookCounters; hook::COUNT as usize],
    /// Sum of the hooks.
    pub total: HookCounters,
}

impl PortCounters {
    /// The specification's metrics of the port: the hooks' totals, with `active`
    /// connections.
    #[must_use]
    pub fn metrics(&self, active: u64) -> PortMetrics {
        let total = self.total;
        let mut metrics = PortMetrics {
            accepted: total.accepted,
            active,
            bind_denied: total.bind_denied,
            packets: total.packets,
            bytes: total.bytes,
            ..PortMetrics::default()
        };
        for reason in DropReason::ALL {
            *metrics.dropped.get_mut(reason) = total.dropped_for(reason.code());
        }
        metrics
    }

    /// Adds one CPU's counters of one hook.
    fn add_cpu(&mut self, hook_index: usize, cpu: &Counters) {
        let cpu = HookCounters::from(cpu);
        self.hooks[hook_index].add(&cpu);
        self.total.add(&cpu);
    }
}

/// An authentication grant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct GrantRecord {
    /// The port.
    pub id: PortId,
    /// Source address granted.
    pub addr: IpAddr,
    /// Expiry, `CLOCK_MONOTONIC` ns.
    pub expires_ns: u64,
}

/// Gate-wide statistics, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct GateStats {
    /// Deny events lost because the ring buffer was full.
    pub events_lost_full: u64,
    /// Deny events suppressed by the per-port rate limit.
    pub events_rate_limited: u64,
    /// Handshakes refused because the reservation map was full.
    pub pending_full: u64,
    /// Established connections not tracked because the socket map was full.
    pub sockets_full: u64,
    /// Sweeps of expired handshake reservations.
    pub pending_sweeps: u64,
    /// Handshakes refused because their port already had its share of reservations
    /// ([`capacity::PENDING_PER_PORT`]) in flight.
    pub pending_port_full: u64,
    /// TCP and UDP packets dropped because their ports could not be read.
    pub unparsable: u64,
    /// Connections on limited ports established without a live reservation (left
    /// uncounted; their handshake did not pass `cgroup_skb`).
    pub unreserved: u64,
}

impl Gate {
    /// Grants `addr` access to a port until `expires_ns` (`CLOCK_MONOTONIC`).
    pub fn add_grant(
        &mut self,
        id: PortId,
        addr: IpAddr,
        expires_ns: u64,
    ) -> Result<(), GateError> {
        self.check_managed(id)?;
        let mut grants: HashMap<&mut MapData, AddrKey, u64> =
            open_map!(mut self, HashMap, map_names::GRANTS, capacity::GRANTS);
        grants
            .insert(addr_key(id, addr), expires_ns, 0)
            .map_err(|err| GateError::map("writing", map_names::GRANTS, capacity::GRANTS, err))
    }

    /// Withdraws the grant of `addr` on a port, if any.
    pub fn remove_grant(&mut self, id: PortId, addr: IpAddr) -> Result<(), GateError> {
        let mut grants: HashMap<&mut MapData, AddrKey, u64> =
            open_map!(mut self, HashMap, map_names::GRANTS, capacity::GRANTS);
        absent_is_none(grants.remove(&addr_key(id, addr)))
            .map(drop)
            .map_err(|err| GateError::map("removing", map_names::GRANTS, capacity::GRANTS, err))
    }

    /// Every grant, expired or not.
    pub fn grants(&self) -> Result<Vec<GrantRecord>, GateError> {
        let mut out = Vec::new();
        self.batch_read::<AddrKey, u64>(
            map_names::GRANTS,
            capacity::GRANTS,
            false,
            None,
            |key, expires| {
                let port = PortKey::new(key.netns, key.port, key.proto);
                if let (Some(id), Some(expires_ns)) = (port_of(&port), expires.next()) {
                    out.push(GrantRecord {
                        id,
                        addr: addr_from_bytes(key.family, key.addr),
                        expires_ns,
                    });
                }
                true
            },
        )?;
        out.sort_by_key(|grant| (grant.id, grant.addr));
        Ok(out)
    }

    /// Counters of every port that has any.
    pub fn all_counters(&self) -> Result<BTreeMap<PortId, PortCounters>, GateError> {
        let mut out: BTreeMap<PortId, PortCounters> = BTreeMap::new();
        self.batch_read::<CounterKey, Counters>(
            map_names::COUNTERS,
            capacity::COUNTERS,
            true,
            None,
            |key, per_cpu| {
                if let (Some(id), Some(hook_index)) = (
                    port_of(&key.port),
                    (key.hook < hook::COUNT).then_some(usize::from(key.hook)),
                ) {
                    let port = out.entry(id).or_default();
                    for cpu in per_cpu {
                        port.add_cpu(hook_index, &cpu);
                    }
                }
                true
            },
        )?;
        Ok(out)
    }

    /// Connection slots of every allocated TCP port, in one pass over the slots map, as
    /// [`Gate::slots`] counts them.
    pub fn all_slots(&self) -> Result<BTreeMap<PortId, ConnSlots>, GateError> {
        let policies = self.policies()?;
        let mut out = BTreeMap::new();
        self.batch_read::<PortKey, ConnSlots>(
            map_names::SLOTS,
            capacity::SLOTS,
            false,
            None,
            |key, slots| {
                if let (Some(id), Some(slots)) = (port_of(&key), slots.next())
                    && let Some(policy) = policies.get(&id)
                {
                    out.insert(id, slots_of_epoch(&slots, Some(policy)));
                }
                true
            },
        )?;
        Ok(out)
    }

    /// Counters of one port; zero when it has none yet.
    pub fn counters(&self, id: PortId) -> Result<PortCounters, GateError> {
        let counters: PerCpuHashMap<&MapData, CounterKey, Counters> =
            open_map!(self, PerCpuHashMap, map_names::COUNTERS, capacity::COUNTERS);
        let mut out = PortCounters::default();
        for hook_code in 0..hook::COUNT {
            let key = CounterKey {
                port: port_key(id),
                hook: hook_code,
                _pad: [0; 7],
            };
            let per_cpu = absent_is_none(counters.get(&key, 0)).map_err(|err| {
                GateError::map("reading", map_names::COUNTERS, capacity::COUNTERS, err)
            })?;
            for cpu in per_cpu.iter().flat_map(|per_cpu| per_cpu.iter()) {
                out.add_cpu(usize::from(hook_code), cpu);
            }
        }
        Ok(out)
    }

    /// Connection slots of a port under its current allocation (the epoch of its policy
    /// record), as plain counts: `slots` held (established plus handshakes in flight) and
    /// `established`, its active connections. Connections left from an earlier
    /// allocation are not counted. UDP has none.
    pub fn slots(&self, id: PortId) -> Result<ConnSlots, GateError> {
        if id.protocol != Protocol::Tcp {
            return Ok(ConnSlots::default());
        }
        let policy = self.policy(id)?;
        let slots: HashMap<&MapData, PortKey, ConnSlots> =
            open_map!(self, HashMap, map_names::SLOTS, capacity::SLOTS);
        let row = absent_is_none(slots.get(&port_key(id), 0))
            .map_err(|err| GateError::map("reading", map_names::SLOTS, capacity::SLOTS, err))?
            .unwrap_or_default();
        Ok(slots_of_epoch(&row, policy.as_ref()))
    }

    /// Gate-wide statistics.
    pub fn stats(&self) -> Result<GateStats, GateError> {
        let stats: PerCpuArray<&MapData, u64> =
            open_map!(self, PerCpuArray, map_names::STATS, capacity::STATS);
        let read = |index: u32| -> Result<u64, GateError> {
            let values = stats
                .get(&index, 0)
                .map_err(|err| GateError::map("reading", map_names::STATS, capacity::STATS, err))?;
            Ok(values.iter().sum())
        };
        Ok(GateStats {
            events_lost_full: read(stat::EVENTS_LOST_FULL)?,
            events_rate_limited: read(stat::EVENTS_RATE_LIMITED)?,
            pending_full: read(stat::PENDING_FULL)?,
            sockets_full: read(stat::SOCKETS_FULL)?,
            pending_sweeps: read(stat::PENDING_SWEEPS)?,
            pending_port_full: read(stat::PENDING_PORT_FULL)?,
            unparsable: read(stat::UNPARSABLE)?,
            unreserved: read(stat::UNRESERVED)?,
        })
    }

    /// Reservations in flight (handshakes on limited ports holding a slot, expired ones
    /// not yet swept included), per port: one pass over the reservation map.
    pub fn reservations(&self) -> Result<BTreeMap<PortId, u64>, GateError> {
        let mut out = BTreeMap::new();
        self.batch_read::<FlowKey, PendingSyn>(
            map_names::PENDING,
            capacity::PENDING,
            false,
            None,
            |flow, _| {
                if let Some(id) = port_of(&flow.home) {
                    *out.entry(id).or_default() += 1;
                }
                true
            },
        )?;
        Ok(out)
    }
}

/// How full one kernel map is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct MapFill {
    /// The map's name ([`map_names`]), or [`ALLOW_PREFIXES`] for the prefixes in its tries.
    pub map: &'static str,
    /// Entries in it now.
    pub entries: u64,
    /// The most it holds.
    pub capacity: u64,
}

/// The [`MapFill::map`] of the allowlist prefixes over all tries of [`map_names::ALLOW`].
pub const ALLOW_PREFIXES: &str = "PG_ALLOW_PREFIXES";

impl Gate {
    /// How full each map with a bound on its entries is: the hash maps' entries counted in
    /// one batch read each (the cost of a pass over them, as a scrape's counters take),
    /// the allowlist tries by their keys, and the prefixes over all tries as this handle
    /// keeps them (left out until its first change has read them).
    pub fn map_fill(&self) -> Result<Vec<MapFill>, GateError> {
        let fill = |map, entries: u64, capacity: u32| MapFill {
            map,
            entries,
            capacity: u64::from(capacity),
        };
        let tries: HashOfMaps<&MapData, u32, super::allowlists::Trie> =
            open_map!(self, HashOfMaps, map_names::ALLOW, capacity::POLICIES);
        let tries = tries.keys().flatten().count() as u64;
        let mut out = vec![
            fill(
                map_names::POLICY,
                self.count::<PortKey, Policy>(map_names::POLICY, capacity::POLICIES, false)?,
                capacity::POLICIES,
            ),
            fill(map_names::ALLOW, tries, capacity::POLICIES),
        ];
        if let Some(prefixes) = self.allow_prefixes() {
            out.push(fill(
                ALLOW_PREFIXES,
                prefixes as u64,
                capacity::ALLOW_PREFIXES,
            ));
        }
        for (name, entries, capacity) in [
            (
                map_names::GRANTS,
                self.count::<AddrKey, u64>(map_names::GRANTS, capacity::GRANTS, false)?,
                capacity::GRANTS,
            ),
            (
                map_names::COUNTERS,
                self.count::<CounterKey, Counters>(map_names::COUNTERS, capacity::COUNTERS, true)?,
                capacity::COUNTERS,
            ),
            (
                map_names::SLOTS,
                self.count::<PortKey, ConnSlots>(map_names::SLOTS, capacity::SLOTS, false)?,
                capacity::SLOTS,
            ),
            (
                map_names::PENDING,
                self.count::<FlowKey, PendingSyn>(map_names::PENDING, capacity::PENDING, false)?,
                capacity::PENDING,
            ),
            (
                map_names::EVENT_RATE,
                self.count::<PortKey, EventRate>(
                    map_names::EVENT_RATE,
                    capacity::EVENT_RATE,
                    false,
                )?,
                capacity::EVENT_RATE,
            ),
            (
                map_names::HANDOFF,
                self.count::<HandoffKey, u64>(map_names::HANDOFF, capacity::HANDOFF, false)?,
                capacity::HANDOFF,
            ),
            (
                map_names::XDP_NETNS,
                self.count::<u32, u64>(map_names::XDP_NETNS, capacity::XDP_NETNS, false)?,
                capacity::XDP_NETNS,
            ),
        ] {
            out.push(fill(name, entries, capacity));
        }
        Ok(out)
    }

    /// The entries of a hash map, by one batch read of it.
    fn count<K: aya::Pod, V: aya::Pod>(
        &self,
        name: &'static str,
        capacity: u32,
        per_cpu: bool,
    ) -> Result<u64, GateError> {
        let mut entries = 0;
        self.batch_read::<K, V>(name, capacity, per_cpu, None, |_, _| {
            entries += 1;
            true
        })?;
        Ok(entries)
    }
}

/// A slot row's counts under the epoch of `policy` (none without a policy).
fn slots_of_epoch(row: &ConnSlots, policy: Option<&Policy>) -> ConnSlots {
    let count = |word: u64| {
        policy.map_or(0, |policy| {
            u64::from(slot_word::count_for(word, policy.epoch))
        })
    };
    ConnSlots {
        slots: count(row.slots),
        established: count(row.established),
        last_sweep_ns: row.last_sweep_ns,
    }
}

/// A map operation's result with an absent key as `None` rather than an error (aya reports
/// a failed lookup as `KeyNotFound` and a failed delete as the syscall's `ENOENT`).
pub(super) fn absent_is_none<T>(result: Result<T, MapError>) -> Result<Option<T>, MapError> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(MapError::SyscallError(err)) if err.io_error.raw_os_error() == Some(libc::ENOENT) => {
            Ok(None)
        }
        Err(err) => Err(err),
    }
}

impl Gate {
    /// Reads every entry of a hash or array map with batch lookups (see `batch`), calling
    /// `on_entry(key, values)` until it returns `false`; `values` holds one value, or one
    /// per possible CPU for a per-CPU map. `start` is a batch token: for an array, the index
    /// before the first one read.
    pub(super) fn batch_read<K: aya::Pod, V: aya::Pod>(
        &self,
        name: &'static str,
        capacity: u32,
        per_cpu: bool,
        start: Option<u32>,
        mut on_entry: impl FnMut(K, &mut dyn Iterator<Item = V>) -> bool,
    ) -> Result<(), GateError> {
        let failed = |err: std::io::Error| {
            GateError::map(
                "listing",
                name,
                capacity,
                aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                    call: "bpf_map_lookup_batch",
                    io_error: err,
                }),
            )
        };
        let fd = self.map_fd(name)?;
        // The kernel packs plain values at their size, and per-CPU copies each rounded up
        // to 8 bytes.
        let (stride, copies) = if per_cpu {
            let cpus = aya::util::nr_cpus().map_err(|(_, err)| failed(err))?;
            (std::mem::size_of::<V>().next_multiple_of(8), cpus)
        } else {
            (std::mem::size_of::<V>(), 1)
        };
        super::batch::lookup_all(
            fd,
            std::mem::size_of::<K>(),
            stride * copies,
            start,
            |key, values| {
                // SAFETY: the map's keys and values are these plain-data types and the
                // slices are exactly their sizes; unaligned reads.
                let key: K = unsafe { std::ptr::read_unaligned(key.as_ptr().cast()) };
                let mut values = values
                    .chunks_exact(stride)
                    // SAFETY: as above, one value (one CPU's copy).
                    .map(|value| unsafe { std::ptr::read_unaligned(value.as_ptr().cast::<V>()) });
                on_entry(key, &mut values)
            },
        )
        .map_err(failed)
    }
}
