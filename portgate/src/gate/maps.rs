//! Reading and writing the gate's maps: policies, allowlists, grants, counters.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use aya::maps::{
    Array, HashMap, MapData, MapError, PerCpuArray, PerCpuHashMap, lpm_trie::Key, lpm_trie::LpmTrie,
};
use ipnet::IpNet;
use portgate_common::{
    AddrKey, AllowKey, ConnSlots, CounterKey, Counters, Policy, PortKey, capacity, hook, map_names,
    reason, stat,
};
use serde::Serialize;

use super::{
    AllowlistCache, Gate, GateError,
    keys::{addr_from_bytes, addr_key, allow_key, generation_of, policy_record, port_key, port_of},
};
use crate::model::{Allowlist, DropReason, PortId, PortMetrics, PortPolicy, Protocol};

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

/// What a handle knows of one port's allowlist in the trie.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct KnownAllowlist {
    /// The generation in force: the one the port's record names (0 for a port the first
    /// walk found without a record).
    generation: u8,
    /// The prefixes under each generation. The unused one is empty, except after a failed
    /// removal or for a port without a record; a change clears it before writing it.
    prefixes: [BTreeSet<IpNet>; 2],
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
    /// SYNs refused because the pending-handshake map was full.
    pub pending_full: u64,
    /// Established connections not tracked because the socket map was full.
    pub sockets_full: u64,
    /// Sweeps of expired handshake reservations.
    pub pending_sweeps: u64,
}

macro_rules! open_map {
    ($gate:expr, $kind:ident, $name:expr, $capacity:expr) => {
        $kind::try_from($gate.map($name)?)
            .map_err(|err| GateError::map("opening", $name, $capacity, err))?
    };
    (mut $gate:expr, $kind:ident, $name:expr, $capacity:expr) => {
        $kind::try_from($gate.map_mut($name)?)
            .map_err(|err| GateError::map("opening", $name, $capacity, err))?
    };
}

impl Gate {
    fn check_managed(&self, port: u16) -> Result<(), GateError> {
        let config = self.config()?;
        if config.manages(port) {
            Ok(())
        } else {
            Err(GateError::PortOutsideRange {
                port,
                min: config.min_port,
                max: config.max_port,
            })
        }
    }

    /// Writes the policy of a port. Every packet is judged by either the whole old policy or
    /// the whole new one, never by a mix: the record and the allowlist it enforces change
    /// together, in one write of the record.
    ///
    /// Each port has two generations of its allowlist in the trie and its record names the
    /// one in force. An unchanged allowlist costs one write of the record. A changed one is
    /// written whole under the unused generation, then the record switches to it, then the
    /// old generation's prefixes are removed: the change costs the new list plus the old,
    /// and needs room in the trie for both while it runs.
    ///
    /// On an error before the switch nothing changes (prefixes this call added are taken
    /// out again). An error removing the old prefixes after the switch is returned with the
    /// new policy in force; what is left of them sits in the unused generation, which the
    /// port's next change clears before writing it.
    pub fn set_policy(&mut self, id: PortId, policy: &PortPolicy) -> Result<(), GateError> {
        self.check_managed(id.port)?;
        let (Some(zero), Some(one)) = (policy_record(policy, 0), policy_record(policy, 1)) else {
            return self.remove_policy(id);
        };
        let wanted = policy.access.allowed_ips.iter().copied().collect();
        let mut known = self.take_known(id)?;
        let result = self.switch_policy(id, [zero, one], wanted, &mut known);
        self.put_known(id, known);
        result
    }

    /// Puts in force `records[g]` (the policy's record naming generation `g`) with `wanted`
    /// as its allowlist. `known` follows the trie at every step, failed ones included.
    fn switch_policy(
        &mut self,
        id: PortId,
        records: [Policy; 2],
        wanted: BTreeSet<IpNet>,
        known: &mut KnownAllowlist,
    ) -> Result<(), GateError> {
        let in_force = known.generation;
        let spare = in_force ^ 1;
        // Leftovers under the unused generation would come in force with it.
        self.clear_generation(id, known, spare)?;
        if wanted == known.prefixes[usize::from(in_force)] {
            return self.write_policy(id, &records[usize::from(in_force)]);
        }
        // From here until they are taken out again, any of them may be in the trie.
        known.prefixes[usize::from(spare)] = wanted;
        let switched = self
            .insert_prefixes(id, spare, &known.prefixes[usize::from(spare)])
            .and_then(|()| self.write_policy(id, &records[usize::from(spare)]));
        if let Err(err) = switched {
            self.clear_generation(id, known, spare)?;
            return Err(err);
        }
        known.generation = spare;
        self.clear_generation(id, known, in_force)
    }

    /// Removes a port's prefixes of `generation`, as `known` lists them, and forgets them.
    fn clear_generation(
        &mut self,
        id: PortId,
        known: &mut KnownAllowlist,
        generation: u8,
    ) -> Result<(), GateError> {
        let prefixes = &mut known.prefixes[usize::from(generation)];
        if !prefixes.is_empty() {
            self.remove_prefixes(id, generation, prefixes)?;
            prefixes.clear();
        }
        Ok(())
    }

    /// What this handle knows of a port's allowlist, taken out of its cache until
    /// [`Self::put_known`] puts it back. The trie is walked once, at the first change, and
    /// from then on this handle is taken to be the maps' only writer (the daemon is), so a
    /// change costs what it writes, not the trie's size.
    fn take_known(&mut self, id: PortId) -> Result<KnownAllowlist, GateError> {
        let cache = match self.allow_cache.take() {
            Some(cache) => cache,
            None => self.walk_allowlists()?,
        };
        let cache = self.allow_cache.insert(cache);
        Ok(cache.remove(&id).unwrap_or_default())
    }

    fn put_known(&mut self, id: PortId, known: KnownAllowlist) {
        if let Some(cache) = self.allow_cache.as_mut()
            && known != KnownAllowlist::default()
        {
            cache.insert(id, known);
        }
    }

    /// The first walk: every port's prefixes of both generations, and the generation its
    /// record puts in force. An allocated port's entries of the unused generation (left by
    /// a change cut short) are removed, so that no later switch can bring them in force.
    /// A port without a record keeps what it has (generation 0 counts as in force for it).
    fn walk_allowlists(&mut self) -> Result<AllowlistCache, GateError> {
        let policies = self.policies()?;
        let mut cache: AllowlistCache = self
            .stored_allowlists()?
            .into_iter()
            .map(|(id, prefixes)| {
                let known = KnownAllowlist {
                    generation: 0,
                    prefixes,
                };
                (id, known)
            })
            .collect();
        for (id, record) in policies {
            let known = cache.entry(id).or_default();
            known.generation = generation_of(&record);
            let unused = known.generation ^ 1;
            self.clear_generation(id, known, unused)?;
        }
        cache.retain(|_, known| *known != KnownAllowlist::default());
        Ok(cache)
    }

    fn write_policy(&mut self, id: PortId, record: &Policy) -> Result<(), GateError> {
        let mut policies: HashMap<&mut MapData, PortKey, Policy> =
            open_map!(mut self, HashMap, map_names::POLICY, capacity::POLICIES);
        policies
            .insert(port_key(id), record, 0)
            .map_err(|err| GateError::map("writing", map_names::POLICY, capacity::POLICIES, err))
    }

    /// Adds `prefixes` under `generation`; on an error, those added stay (the caller removes
    /// them).
    fn insert_prefixes(
        &mut self,
        id: PortId,
        generation: u8,
        prefixes: &BTreeSet<IpNet>,
    ) -> Result<(), GateError> {
        let mut trie: LpmTrie<&mut MapData, AllowKey, u32> =
            open_map!(mut self, LpmTrie, map_names::ALLOW, capacity::ALLOW_PREFIXES);
        for prefix in prefixes {
            let (bits, data) = allow_key(id, generation, *prefix);
            trie.insert(&Key::new(bits, data), 1, 0).map_err(|err| {
                GateError::map(
                    "adding a prefix",
                    map_names::ALLOW,
                    capacity::ALLOW_PREFIXES,
                    err,
                )
            })?;
        }
        Ok(())
    }

    /// Removes `prefixes` under `generation`; absent ones are not an error.
    fn remove_prefixes(
        &mut self,
        id: PortId,
        generation: u8,
        prefixes: &BTreeSet<IpNet>,
    ) -> Result<(), GateError> {
        let mut trie: LpmTrie<&mut MapData, AllowKey, u32> =
            open_map!(mut self, LpmTrie, map_names::ALLOW, capacity::ALLOW_PREFIXES);
        for prefix in prefixes {
            let (bits, data) = allow_key(id, generation, *prefix);
            absent_is_none(trie.remove(&Key::new(bits, data))).map_err(|err| {
                GateError::map(
                    "removing a prefix",
                    map_names::ALLOW,
                    capacity::ALLOW_PREFIXES,
                    err,
                )
            })?;
        }
        Ok(())
    }

    /// Removes the policy of a port: it becomes unallocated, then its allowlist (both
    /// generations) and grants go.
    pub fn remove_policy(&mut self, id: PortId) -> Result<(), GateError> {
        let mut known = self.take_known(id)?;
        let result = self.remove_record_and_allowlist(id, &mut known);
        self.put_known(id, known);
        result?;
        for grant in self.grants()? {
            if grant.id == id {
                self.remove_grant(id, grant.addr)?;
            }
        }
        Ok(())
    }

    fn remove_record_and_allowlist(
        &mut self,
        id: PortId,
        known: &mut KnownAllowlist,
    ) -> Result<(), GateError> {
        {
            let mut policies: HashMap<&mut MapData, PortKey, Policy> =
                open_map!(mut self, HashMap, map_names::POLICY, capacity::POLICIES);
            absent_is_none(policies.remove(&port_key(id))).map_err(|err| {
                GateError::map("removing", map_names::POLICY, capacity::POLICIES, err)
            })?;
        }
        self.clear_generation(id, known, 0)?;
        self.clear_generation(id, known, 1)
    }

    /// The policy record of a port, if allocated.
    pub fn policy(&self, id: PortId) -> Result<Option<Policy>, GateError> {
        let policies: HashMap<&MapData, PortKey, Policy> =
            open_map!(self, HashMap, map_names::POLICY, capacity::POLICIES);
        absent_is_none(policies.get(&port_key(id), 0))
            .map_err(|err| GateError::map("reading", map_names::POLICY, capacity::POLICIES, err))
    }

    /// Every policy record, by port.
    pub fn policies(&self) -> Result<BTreeMap<PortId, Policy>, GateError> {
        let mut out = BTreeMap::new();
        self.batch_read::<PortKey, Policy>(
            map_names::POLICY,
            capacity::POLICIES,
            false,
            None,
            |key, policy| {
                if let (Some(id), Some(policy)) = (port_of(key.port, key.proto), policy.next()) {
                    out.insert(id, policy);
                }
                true
            },
        )?;
        Ok(out)
    }

    /// Every allowlist in force, by port, each sorted: the generation its record names.
    /// A port without a record shows every prefix it has (of a change cut short, for
    /// reconciliation to remove). Walks the whole trie.
    pub fn allowlists(&self) -> Result<BTreeMap<PortId, Allowlist>, GateError> {
        let policies = self.policies()?;
        Ok(self
            .stored_allowlists()?
            .into_iter()
            .filter_map(|(id, [zero, one])| {
                let prefixes = match policies.get(&id).map(generation_of) {
                    Some(0) => zero,
                    Some(_) => one,
                    None => zero.into_iter().chain(one).collect(),
                };
                (!prefixes.is_empty()).then(|| (id, prefixes.into_iter().collect()))
            })
            .collect())
    }

    /// Every prefix in the trie, by port and generation.
    fn stored_allowlists(&self) -> Result<BTreeMap<PortId, [BTreeSet<IpNet>; 2]>, GateError> {
        let trie: LpmTrie<&MapData, AllowKey, u32> =
            open_map!(self, LpmTrie, map_names::ALLOW, capacity::ALLOW_PREFIXES);
        let mut found: BTreeMap<PortId, [BTreeSet<IpNet>; 2]> = BTreeMap::new();
        for key in trie.keys() {
            let key = key.map_err(|err| {
                GateError::map("listing", map_names::ALLOW, capacity::ALLOW_PREFIXES, err)
            })?;
            let data = key.data();
            let (Some(id), Some(generation)) = (
                port_of(data.port, data.proto),
                (data.generation < 2).then_some(usize::from(data.generation)),
            ) else {
                continue;
            };
            let addr = addr_from_bytes(data.family, data.addr);
            let bits = key.prefix_len().saturating_sub(AllowKey::PREFIX_BITS);
            if let Ok(prefix) = IpNet::new(addr, u8::try_from(bits).unwrap_or(u8::MAX)) {
                found.entry(id).or_default()[generation].insert(prefix);
            }
        }
        Ok(found)
    }

    /// Grants `addr` access to a port until `expires_ns` (`CLOCK_MONOTONIC`).
    pub fn add_grant(
        &mut self,
        id: PortId,
        addr: IpAddr,
        expires_ns: u64,
    ) -> Result<(), GateError> {
        self.check_managed(id.port)?;
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
                if let (Some(id), Some(expires_ns)) = (port_of(key.port, key.proto), expires.next())
                {
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
                    port_of(key.port, key.proto),
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

    /// Connection slots of every TCP port in `ports`, in one pass over the slots map.
    pub fn all_slots(
        &self,
        ports: std::ops::RangeInclusive<u16>,
    ) -> Result<BTreeMap<PortId, ConnSlots>, GateError> {
        let mut out = BTreeMap::new();
        self.batch_read::<u32, ConnSlots>(
            map_names::SLOTS,
            capacity::SLOTS,
            false,
            // An array's batch token is the index before the first one read.
            u32::from(*ports.start()).checked_sub(1),
            |index, slots| {
                let Ok(port) = u16::try_from(index) else {
                    return false;
                };
                if let Some(slots) = slots.next() {
                    out.insert(PortId::new(port, Protocol::Tcp), slots);
                }
                port < *ports.end()
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
                port: id.port,
                proto: id.protocol.number(),
                hook: hook_code,
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

    /// Connection slots of a port: `established` is its active connections. UDP has none.
    pub fn slots(&self, id: PortId) -> Result<ConnSlots, GateError> {
        if id.protocol != Protocol::Tcp {
            return Ok(ConnSlots::default());
        }
        let slots: Array<&MapData, ConnSlots> =
            open_map!(self, Array, map_names::SLOTS, capacity::SLOTS);
        slots
            .get(&u32::from(id.port), 0)
            .map_err(|err| GateError::map("reading", map_names::SLOTS, capacity::SLOTS, err))
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
        })
    }
}

/// A map operation's result with an absent key as `None` rather than an error (aya reports
/// a failed lookup as `KeyNotFound` and a failed delete as the syscall's `ENOENT`).
fn absent_is_none<T>(result: Result<T, MapError>) -> Result<Option<T>, MapError> {
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
    fn batch_read<K: aya::Pod, V: aya::Pod>(
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
