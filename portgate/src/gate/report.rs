//! Every managed port's live kernel state as [`PortReport`]s: what `portgate maps` prints.

use std::collections::{BTreeMap, BTreeSet};

use portgate_common::{Policy, policy_flags};

use super::{Gate, GateError, GrantRecord, PortCounters};
use crate::{
    host,
    model::{Allowlist, GrantView, PortAccessControl, PortId, PortReport, PortStatus},
};

impl GrantRecord {
    /// The grant as shown at `now` (`CLOCK_MONOTONIC` ns).
    #[must_use]
    pub fn view(&self, now: u64) -> GrantView {
        GrantView {
            addr: self.addr,
            expires_in_ms: self.expires_ns.saturating_sub(now) / 1_000_000,
        }
    }
}

impl Gate {
    /// Reports for every port with a policy or with counters, in port order.
    pub fn reports(&self) -> Result<Vec<PortReport>, GateError> {
        let policies = self.policies()?;
        let mut allowlists = self.allowlists()?;
        let counters = self.all_counters()?;
        let mut grants: BTreeMap<PortId, Vec<GrantView>> = BTreeMap::new();
        let now = host::kernel::monotonic_now_ns();
        for grant in self.grants()? {
            grants.entry(grant.id).or_default().push(grant.view(now));
        }
        let slots = self.all_slots()?;
        let ids: BTreeSet<PortId> = policies
            .keys()
            .chain(counters.keys())
            .chain(allowlists.keys())
            .copied()
            .collect();
        Ok(ids
            .into_iter()
            .map(|id| {
                report_of(
                    id,
                    policies.get(&id),
                    allowlists.remove(&id).unwrap_or_default(),
                    grants.remove(&id).unwrap_or_default(),
                    &counters.get(&id).copied().unwrap_or_default(),
                    slots.get(&id).map_or(0, |slots| slots.established),
                )
            })
            .collect())
    }

    /// The report of one port, reading only its own entries: its policy record, counters,
    /// slots and grants (the grants map is read whole, in batches). The allowlist is the
    /// caller's: the trie cannot be read one port at a time. `None` when the port has
    /// neither a policy nor counters.
    pub fn report(&self, id: PortId, allow: Allowlist) -> Result<Option<PortReport>, GateError> {
        let policy = self.policy(id)?;
        let counters = self.counters(id)?;
        if policy.is_none() && counters == PortCounters::default() {
            return Ok(None);
        }
        let now = host::kernel::monotonic_now_ns();
        let grants = self
            .grants()?
            .into_iter()
            .filter(|grant| grant.id == id)
            .map(|grant| grant.view(now))
            .collect();
        let active = self.slots(id)?.established;
        Ok(Some(report_of(
            id,
            policy.as_ref(),
            allow,
            grants,
            &counters,
            active,
        )))
    }
}

fn report_of(
    id: PortId,
    policy: Option<&Policy>,
    allow: Allowlist,
    grants: Vec<GrantView>,
    counters: &PortCounters,
    active: u64,
) -> PortReport {
    PortReport {
        id,
        published: policy
            .map(|policy| policy.published_port)
            .filter(|port| *port != 0),
        status: policy
            .and_then(|policy| PortStatus::from_code(policy.status))
            .unwrap_or(PortStatus::Available),
        access: PortAccessControl {
            allowed_ips: allow,
            max_connections: policy.map_or(0, |policy| policy.max_connections),
            require_authentication: policy
                .is_some_and(|policy| policy.flags & policy_flags::REQUIRE_AUTH != 0),
        },
        owner_cgroup: policy
            .filter(|policy| policy.flags & policy_flags::OWNER != 0)
            .map(|policy| policy.owner_cgroup),
        grants,
        counters: counters.metrics(active),
    }
}
