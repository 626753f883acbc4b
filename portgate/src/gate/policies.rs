//! A port's policy record in the maps, written with its allowlist (see
//! [`super::allowlists`]) so that every packet sees either the whole old policy or the
//! whole new one.

use std::collections::{BTreeMap, BTreeSet};

use aya::maps::{HashMap, MapData, MapError};
use ipnet::IpNet;
use portgate_common::{ConnSlots, Policy, PortKey, capacity, map_names};

use super::{
    Gate, GateError,
    keys::{policy_record, port_key, port_of, published_key, published_record},
    maps::absent_is_none,
};
use crate::model::{PortId, PortPolicy, Protocol};

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
    /// Each port has two generations of its allowlist in its trie and its record names the
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
        let generation = self.next_generation();
        let result = (|| {
            if !wanted.is_empty() {
                self.give_trie(&mut known)?;
            }
            let trie = known.trie;
            self.switch_allowlist(&mut known, wanted, |gate, allowlist| {
                match policy_record(id, policy, allowlist, generation) {
                    Some(mut record) => {
                        record.allowlist = trie;
                        gate.write_policy(id, &record)
                    }
                    None => Ok(()),
                }
            })
        })();
        self.put_known(id, known);
        result
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

    /// Removes the policy of a port: it becomes unallocated, then its allowlist and grants
    /// go. Its trie, emptied, goes back to the pool.
    pub fn remove_policy(&mut self, id: PortId) -> Result<(), GateError> {
        let mut known = self.take_known(id)?;
        let result = self.remove_record(id).and_then(|()| {
            self.clear_generation(&mut known, 0)?;
            self.clear_generation(&mut known, 1)?;
            self.take_back_trie(&mut known);
            Ok(())
        });
        self.put_known(id, known);
        result?;
        for grant in self.grants()? {
            if grant.id == id {
                self.remove_grant(id, grant.addr)?;
            }
        }
        Ok(())
    }

    /// Removes the record of a port (the host side of a published one first) and its slot
    /// row.
    fn remove_record(&mut self, id: PortId) -> Result<(), GateError> {
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
        Ok(())
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
    pub(super) fn each_record(
        &self,
        mut each: impl FnMut(PortId, &PortKey, Policy),
    ) -> Result<(), GateError> {
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
}
