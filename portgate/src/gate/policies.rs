//! A port's policy record and allowlist in the maps, changed so that every packet sees
//! either the whole old policy or the whole new one. Each port's allowlist lives in a trie
//! of its own in the allowlists map, so a lookup walks that port's prefixes only.
//!
//! A port's trie is made when the port first has an allowlist and removed with its
//! policy, not swapped at every change: an update of a map of maps waits for an RCU grace
//! period (the kernel makes sure no program still reads the inner map it replaced), about
//! 10-20 ms here, which a change of the record and of the trie's entries does not.

use std::collections::{BTreeMap, BTreeSet};

use aya::maps::{HashMap, HashOfMaps, MapData, MapError, lpm_trie::Key, lpm_trie::LpmTrie};
use ipnet::IpNet;
use portgate_common::{AllowKey, ConnSlots, Policy, PortKey, SocketState, capacity, map_names};

use super::{
    Gate, GateError,
    keys::{
        allow_key, allowlist_generation, policy_record, port_key, port_of, prefix_of,
        published_key, published_record,
    },
    maps::absent_is_none,
};
use crate::model::{Allowlist, PortId, PortPolicy, Protocol};

/// One port's trie, as userspace makes and reads it.
type Trie = LpmTrie<MapData, AllowKey, u32>;

/// What a handle knows of the allowlists and record generations it writes: read from the
/// maps at the first change, and from then on this handle is taken to be the maps' only
/// writer (the daemon is), so a change costs what it writes, not the maps' size.
#[derive(Debug, Default)]
pub(super) struct Written {
    /// What the handle knows of each port's allowlist.
    allowlists: BTreeMap<PortId, KnownAllowlist>,
    /// Prefixes over all tries (both generations), kept within
    /// [`capacity::ALLOW_PREFIXES`].
    prefixes: usize,
    /// The last [`Policy::generation`] written.
    generation: u32,
}

impl Written {
    /// A generation no record holds now (wrapping past `u32::MAX`, never
    /// [`SocketState::UNJUDGED`]).
    fn next_generation(&mut self) -> u32 {
        self.generation = self.generation.wrapping_add(1);
        if self.generation == SocketState::UNJUDGED {
            self.generation += 1;
        }
        self.generation
    }
}

/// What a handle knows of one port's allowlist in its trie.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct KnownAllowlist {
    /// The generation in force: the one the port's record names (0 for a port the first
    /// walk found without a record).
    generation: u8,
    /// The prefixes under each generation. The unused one is empty, except after a failed
    /// removal or for a port without a record; a change clears it before writing it.
    prefixes: [BTreeSet<IpNet>; 2],
}

impl Gate {
    /// A port of the host's namespace must be in the managed range; another namespace's
    /// may be any port but 0 (the range is the host's).
    pub(super) fn check_managed(&self, id: PortId) -> Result<(), GateError> {
        let config = self.config()?;
        if config.manages(id.port) || (!id.netns.is_host() && id.port != 0) {
            Ok(())
        } else {
            Err(GateError::PortOutsideRange {
                port: id.port,
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
    ///
    /// A policy [`published`](PortPolicy::published) on a host port is written there too,
    /// as a record pointing home to `id`: XDP sees the host port before DNAT, the
    /// container's hooks see `id` after it, and both judge and count the one allocation.
    ///
    /// Every write gives the record a new [`Policy::generation`], so that established
    /// connections are judged whole again at their next packet.
    pub fn set_policy(&mut self, id: PortId, policy: &PortPolicy) -> Result<(), GateError> {
        self.check_managed(id)?;
        if let Some(port) = policy.published {
            self.check_managed(PortId::new(port, id.protocol))?;
        }
        if policy.status.code().is_none() {
            return self.remove_policy(id);
        }
        if id.protocol == Protocol::Tcp {
            self.make_slot_row(port_key(id))?;
        }
        let wanted: BTreeSet<IpNet> = policy.access.allowed_ips.iter().copied().collect();
        let mut known = self.take_known(id)?;
        let generation = self.written.as_mut().map_or(1, Written::next_generation);
        let records = [0, 1].map(|allowlist| policy_record(id, policy, allowlist, generation));
        let result = match records {
            [Some(zero), Some(one)] => self.switch_policy(id, [zero, one], wanted, &mut known),
            _ => Ok(()),
        };
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
        let held = self.written.as_ref().map_or(0, |written| written.prefixes);
        if held + wanted.len() > capacity::ALLOW_PREFIXES as usize {
            return Err(GateError::MapFull {
                map: map_names::ALLOW,
                capacity: capacity::ALLOW_PREFIXES,
            });
        }
        // From here until they are taken out again, any of them may be in the trie.
        self.count_prefixes(wanted.len(), 0);
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
            let removed = prefixes.len();
            prefixes.clear();
            self.count_prefixes(0, removed);
        }
        Ok(())
    }

    /// Keeps the gate-wide count of prefixes in the tries.
    fn count_prefixes(&mut self, added: usize, removed: usize) {
        if let Some(written) = self.written.as_mut() {
            written.prefixes = (written.prefixes + added).saturating_sub(removed);
        }
    }

    /// What this handle knows of a port's allowlist, taken out of its cache until
    /// [`Self::put_known`] puts it back. The trie is walked once, at the first change, and
    /// from then on this handle is taken to be the maps' only writer (the daemon is), so a
    /// change costs what it writes, not the trie's size.
    fn take_known(&mut self, id: PortId) -> Result<KnownAllowlist, GateError> {
        if self.written.is_none() {
            let written = self.walk_allowlists()?;
            self.written = Some(written);
        }
        Ok(self
            .written
            .as_mut()
            .and_then(|written| written.allowlists.remove(&id))
            .unwrap_or_default())
    }

    fn put_known(&mut self, id: PortId, known: KnownAllowlist) {
        if let Some(written) = self.written.as_mut()
            && known != KnownAllowlist::default()
        {
            written.allowlists.insert(id, known);
        }
    }

    /// The first walk: every port's prefixes of both generations, and the generation its
    /// record puts in force. An allocated port's entries of the unused generation (left by
    /// a change cut short) are removed, so that no later switch can bring them in force.
    /// A port without a record keeps what it has (generation 0 counts as in force for it).
    /// Also finds the highest record generation, for the next write to go past it.
    fn walk_allowlists(&mut self) -> Result<Written, GateError> {
        let policies = self.policies()?;
        let mut generation = 0;
        self.each_record(|_, _, record| generation = generation.max(record.generation))?;
        let mut cache: BTreeMap<PortId, KnownAllowlist> = self
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
            known.generation = allowlist_generation(&record);
            let unused = known.generation ^ 1;
            self.clear_generation(id, known, unused)?;
        }
        cache.retain(|_, known| *known != KnownAllowlist::default());
        let prefixes = cache
            .values()
            .map(|known| known.prefixes.iter().map(BTreeSet::len).sum::<usize>())
            .sum();
        Ok(Written {
            allowlists: cache,
            prefixes,
            generation,
        })
    }

    /// Writes the record of `id`, then the record of its host side when it is published
    /// (a host port it was published on before is freed).
    fn write_policy(&mut self, id: PortId, record: &Policy) -> Result<(), GateError> {
        let mut policies: HashMap<&mut MapData, PortKey, Policy> =
            open_map!(mut self, HashMap, map_names::POLICY, capacity::POLICIES);
        let failed =
            |doing| move |err| GateError::map(doing, map_names::POLICY, capacity::POLICIES, err);
        let previous = absent_is_none(policies.get(&port_key(id), 0)).map_err(failed("reading"))?;
        policies
            .insert(port_key(id), record, 0)
            .map_err(failed("writing"))?;
        if record.published_port != 0 {
            policies
                .insert(
                    published_key(id, record.published_port),
                    published_record(record),
                    0,
                )
                .map_err(failed("writing"))?;
        }
        if let Some(previous) = previous
            && previous.published_port != 0
            && previous.published_port != record.published_port
        {
            absent_is_none(policies.remove(&published_key(id, previous.published_port)))
                .map_err(failed("removing"))?;
        }
        Ok(())
    }

    /// Makes the connection-slot row of a TCP port (or of the sweep clock) unless it
    /// exists: the kernel only updates rows in place.
    pub(super) fn make_slot_row(&mut self, key: PortKey) -> Result<(), GateError> {
        let mut slots: HashMap<&mut MapData, PortKey, ConnSlots> =
            open_map!(mut self, HashMap, map_names::SLOTS, capacity::SLOTS);
        match slots.insert(
            key,
            ConnSlots::default(),
            u64::from(aya_obj::generated::BPF_NOEXIST),
        ) {
            Ok(()) => Ok(()),
            Err(MapError::SyscallError(err))
                if err.io_error.raw_os_error() == Some(libc::EEXIST) =>
            {
                Ok(())
            }
            Err(err) => Err(GateError::map(
                "writing",
                map_names::SLOTS,
                capacity::SLOTS,
                err,
            )),
        }
    }

    /// Adds `prefixes` under `generation`; on an error, those added stay (the caller removes
    /// them).
    fn insert_prefixes(
        &mut self,
        id: PortId,
        generation: u8,
        prefixes: &BTreeSet<IpNet>,
    ) -> Result<(), GateError> {
        self.each_prefix(id, generation, prefixes, ADDING, |trie, key| {
            trie.insert(key, 1, 0)
        })
    }

    /// Removes `prefixes` under `generation`; absent ones are not an error.
    fn remove_prefixes(
        &mut self,
        id: PortId,
        generation: u8,
        prefixes: &BTreeSet<IpNet>,
    ) -> Result<(), GateError> {
        self.each_prefix(
            id,
            generation,
            prefixes,
            "removing a prefix",
            |trie, key| absent_is_none(trie.remove(key)).map(drop),
        )
    }

    /// Applies `change` to the trie key of each of `prefixes` under `generation` in the
    /// port's trie, stopping at the first error (`doing` names the step in it). Adding
    /// makes the trie if the port has none; removing from a port without one is done.
    fn each_prefix(
        &mut self,
        id: PortId,
        generation: u8,
        prefixes: &BTreeSet<IpNet>,
        doing: &'static str,
        change: impl Fn(&mut Trie, &Key<AllowKey>) -> Result<(), MapError>,
    ) -> Result<(), GateError> {
        let adding = doing == ADDING;
        let Some(mut trie) = self.port_trie(id, adding)? else {
            return Ok(());
        };
        for prefix in prefixes {
            let (bits, data) = allow_key(generation, *prefix);
            change(&mut trie, &Key::new(bits, data)).map_err(|err| {
                GateError::map(doing, map_names::ALLOW, capacity::ALLOW_PREFIXES, err)
            })?;
        }
        Ok(())
    }

    /// The trie of port `id`; made (empty) and put in the allowlists map when it has none
    /// and `make`.
    fn port_trie(&mut self, id: PortId, make: bool) -> Result<Option<Trie>, GateError> {
        let mut tries: HashOfMaps<&mut MapData, PortKey, Trie> =
            open_map!(mut self, HashOfMaps, map_names::ALLOW, capacity::POLICIES);
        let failed =
            |doing| move |err| GateError::map(doing, map_names::ALLOW, capacity::POLICIES, err);
        if let Some(trie) =
            absent_is_none(tries.get(&port_key(id), 0)).map_err(failed("reading"))?
        {
            return Ok(Some(trie));
        }
        if !make {
            return Ok(None);
        }
        let trie = Trie::create(
            capacity::ALLOW_PREFIXES,
            aya_obj::generated::BPF_F_NO_PREALLOC,
        )
        .map_err(failed("making a trie for"))?;
        tries
            .insert(port_key(id), &trie, 0)
            .map_err(failed("writing"))?;
        Ok(Some(trie))
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
            let failed = |doing| {
                move |err| GateError::map(doing, map_names::POLICY, capacity::POLICIES, err)
            };
            let record =
                absent_is_none(policies.get(&port_key(id), 0)).map_err(failed("reading"))?;
            // The host side first: it points home to the record.
            if let Some(record) = record
                && record.published_port != 0
            {
                absent_is_none(policies.remove(&published_key(id, record.published_port)))
                    .map_err(failed("removing"))?;
            }
            absent_is_none(policies.remove(&port_key(id))).map_err(failed("removing"))?;
        }
        if id.protocol == Protocol::Tcp {
            let mut slots: HashMap<&mut MapData, PortKey, ConnSlots> =
                open_map!(mut self, HashMap, map_names::SLOTS, capacity::SLOTS);
            absent_is_none(slots.remove(&port_key(id))).map_err(|err| {
                GateError::map("removing", map_names::SLOTS, capacity::SLOTS, err)
            })?;
        }
        self.clear_generation(id, known, 0)?;
        self.clear_generation(id, known, 1)?;
        // A port without a trie is not an error, and costs no wait.
        let mut tries: HashOfMaps<&mut MapData, PortKey, Trie> =
            open_map!(mut self, HashOfMaps, map_names::ALLOW, capacity::POLICIES);
        absent_is_none(tries.remove(&port_key(id)))
            .map(drop)
            .map_err(|err| GateError::map("removing", map_names::ALLOW, capacity::POLICIES, err))
    }

    /// The policy record of a port, if allocated.
    pub fn policy(&self, id: PortId) -> Result<Option<Policy>, GateError> {
        let policies: HashMap<&MapData, PortKey, Policy> =
            open_map!(self, HashMap, map_names::POLICY, capacity::POLICIES);
        absent_is_none(policies.get(&port_key(id), 0))
            .map_err(|err| GateError::map("reading", map_names::POLICY, capacity::POLICIES, err))
    }

    /// Every allocation's policy record, by port (the host sides of published ports are
    /// [`Gate::published`]'s).
    pub fn policies(&self) -> Result<BTreeMap<PortId, Policy>, GateError> {
        let mut out = BTreeMap::new();
        self.each_record(|id, key, policy| {
            if policy.home == *key {
                out.insert(id, policy);
            }
        })?;
        Ok(out)
    }

    /// The host sides of published ports: each host port, with the allocation it points
    /// home to.
    pub fn published(&self) -> Result<BTreeMap<PortId, PortId>, GateError> {
        let mut out = BTreeMap::new();
        self.each_record(|id, key, policy| {
            if policy.home != *key
                && let Some(home) = port_of(&policy.home)
            {
                out.insert(id, home);
            }
        })?;
        Ok(out)
    }

    /// Calls `each` with every policy record of a managed protocol, in one batch read.
    fn each_record(&self, mut each: impl FnMut(PortId, &PortKey, Policy)) -> Result<(), GateError> {
        self.batch_read::<PortKey, Policy>(
            map_names::POLICY,
            capacity::POLICIES,
            false,
            None,
            |key, policy| {
                if let (Some(id), Some(policy)) = (port_of(&key), policy.next()) {
                    each(id, &key, policy);
                }
                true
            },
        )
    }

    /// Removes the record of a host side of a published port whose allocation is gone
    /// (reconciliation's clean-up; [`Gate::remove_policy`] removes it with its allocation).
    pub fn remove_published(&mut self, host_side: PortId) -> Result<(), GateError> {
        let mut policies: HashMap<&mut MapData, PortKey, Policy> =
            open_map!(mut self, HashMap, map_names::POLICY, capacity::POLICIES);
        absent_is_none(policies.remove(&port_key(host_side)))
            .map(drop)
            .map_err(|err| GateError::map("removing", map_names::POLICY, capacity::POLICIES, err))
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
                let prefixes = match policies.get(&id).map(allowlist_generation) {
                    Some(0) => zero,
                    Some(_) => one,
                    None => zero.into_iter().chain(one).collect(),
                };
                (!prefixes.is_empty()).then(|| (id, prefixes.into_iter().collect()))
            })
            .collect())
    }

    /// Every prefix in the tries, by port and generation.
    fn stored_allowlists(&self) -> Result<BTreeMap<PortId, [BTreeSet<IpNet>; 2]>, GateError> {
        let tries: HashOfMaps<&MapData, PortKey, Trie> =
            open_map!(self, HashOfMaps, map_names::ALLOW, capacity::POLICIES);
        let failed =
            |doing| move |err| GateError::map(doing, map_names::ALLOW, capacity::POLICIES, err);
        let mut found: BTreeMap<PortId, [BTreeSet<IpNet>; 2]> = BTreeMap::new();
        for key in tries.keys() {
            let key = key.map_err(failed("listing"))?;
            let Some(id) = port_of(&key) else {
                continue;
            };
            // A trie removed since its key was listed is not an error.
            let Some(trie) = absent_is_none(tries.get(&key, 0)).map_err(failed("reading"))? else {
                continue;
            };
            let prefixes = found.entry(id).or_default();
            for entry in trie.keys() {
                let entry = entry.map_err(failed("listing a trie of"))?;
                if let Some((generation, prefix)) = prefix_of(entry.prefix_len(), &entry.data()) {
                    prefixes[generation].insert(prefix);
                }
            }
        }
        Ok(found)
    }
}

/// `doing` of [`Gate::each_prefix`] when it adds prefixes (and may make the port's trie).
const ADDING: &str = "adding a prefix";
