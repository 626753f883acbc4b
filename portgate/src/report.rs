//! A view of every managed port's live kernel state: what `portgate maps` prints.

use std::collections::BTreeSet;

use ipnet::IpNet;
use portgate_common::{policy_flags, reason};
use serde::{Deserialize, Serialize};

use crate::{
    gate::{Gate, GateError, PortCounters},
    host,
    policy::{PortStatus, Protocol},
};

/// Drops by reason, with the spec's names as keys.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropCounts {
    /// No allocation.
    pub unallocated: u64,
    /// Draining or Closed.
    pub draining: u64,
    /// Source not in the allowlist.
    pub not_allowed: u64,
    /// No unexpired grant.
    pub auth_required: u64,
    /// At `max_connections`.
    pub conn_limit: u64,
}

impl DropCounts {
    /// The count of one reason.
    #[must_use]
    pub const fn get(&self, reason: crate::policy::DropReason) -> u64 {
        use crate::policy::DropReason;
        match reason {
            DropReason::Unallocated => self.unallocated,
            DropReason::Draining => self.draining,
            DropReason::NotAllowed => self.not_allowed,
            DropReason::AuthRequired => self.auth_required,
            DropReason::ConnLimit => self.conn_limit,
        }
    }
}

/// A grant as shown to a person.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantView {
    /// Source address granted.
    pub addr: std::net::IpAddr,
    /// Milliseconds until it expires; 0 when expired.
    pub expires_in_ms: u64,
}

impl GrantView {
    /// The view of `grant` at `now` (`CLOCK_MONOTONIC` ns).
    fn of(grant: &crate::gate::GrantRecord, now: u64) -> Self {
        Self {
            addr: grant.addr,
            expires_in_ms: grant.expires_ns.saturating_sub(now) / 1_000_000,
        }
    }
}

/// One (port, protocol): policy, allowlist, grants, counters and active connections.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortReport {
    /// Port.
    pub port: u16,
    /// Protocol.
    pub proto: Protocol,
    /// Status; `available` for a managed port without policy that still has counters.
    pub status: PortStatus,
    /// Allowlist prefixes; empty allows every source.
    pub allow: Vec<IpNet>,
    /// Connection limit; 0 is unlimited.
    pub max_connections: u32,
    /// Whether new connections need a grant.
    pub require_auth: bool,
    /// Owner cgroup id; `None` when anyone may bind.
    pub owner_cgroup: Option<u64>,
    /// Unexpired and expired grants.
    pub grants: Vec<GrantView>,
    /// Counters and active connections (flattened: the keys are `accepted`, `active`,
    /// `dropped`, `bind_denied`, `packets`, `bytes`).
    #[serde(flatten)]
    pub counters: PortMetrics,
}

/// One port's counters, as the kernel counts them over every hook.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMetrics {
    /// New connections let in.
    pub accepted: u64,
    /// Established TCP connections now.
    pub active: u64,
    /// Drops by reason.
    pub dropped: DropCounts,
    /// Refused binds.
    pub bind_denied: u64,
    /// Packets judged.
    pub packets: u64,
    /// Bytes judged.
    pub bytes: u64,
}

impl PortMetrics {
    /// The totals of a port's per-hook counters, with `active` connections.
    #[must_use]
    pub fn new(counters: &PortCounters, active: u64) -> Self {
        let total = counters.total;
        Self {
            accepted: total.accepted,
            active,
            dropped: DropCounts {
                unallocated: total.dropped_for(reason::UNALLOCATED),
                draining: total.dropped_for(reason::DRAINING),
                not_allowed: total.dropped_for(reason::NOT_ALLOWED),
                auth_required: total.dropped_for(reason::AUTH_REQUIRED),
                conn_limit: total.dropped_for(reason::CONN_LIMIT),
            },
            bind_denied: total.bind_denied,
            packets: total.packets,
            bytes: total.bytes,
        }
    }
}

/// Reports for every (port, protocol) with a policy or with counters, in port order.
pub fn port_reports(gate: &Gate) -> Result<Vec<PortReport>, GateError> {
    let policies = gate.policies()?;
    let mut allowlists = gate.allowlists()?;
    let counters = gate.all_counters()?;
    let mut grants: std::collections::BTreeMap<(u16, Protocol), Vec<GrantView>> =
        std::collections::BTreeMap::new();
    let now = host::kernel::monotonic_now_ns();
    for grant in gate.grants()? {
        grants
            .entry((grant.port, grant.protocol))
            .or_default()
            .push(GrantView::of(&grant, now));
    }
    let config = gate.config()?;
    let slots = gate.all_slots(config.min_port..=config.max_port)?;
    let keys: BTreeSet<(u16, Protocol)> = policies
        .keys()
        .chain(counters.keys())
        .chain(allowlists.keys())
        .copied()
        .collect();
    let mut out = Vec::with_capacity(keys.len());
    for (port, proto) in keys {
        let port_counters: PortCounters = counters.get(&(port, proto)).copied().unwrap_or_default();
        let active = match proto {
            Protocol::Tcp => slots.get(&port).map_or(0, |slots| slots.established),
            Protocol::Udp => 0,
        };
        out.push(report_of(
            (port, proto),
            policies.get(&(port, proto)),
            allowlists.remove(&(port, proto)).unwrap_or_default(),
            grants.remove(&(port, proto)).unwrap_or_default(),
            &port_counters,
            active,
        ));
    }
    Ok(out)
}

/// The report of one (port, protocol), reading only its own entries: its policy record,
/// counters, slots and grants (the grants map is read whole, in batches). The allowlist is
/// the caller's: the trie cannot be read one port at a time. `None` when the port has
/// neither a policy nor counters.
pub fn port_report(
    gate: &Gate,
    port: u16,
    proto: Protocol,
    allow: Vec<IpNet>,
) -> Result<Option<PortReport>, GateError> {
    let policy = gate.policy(port, proto)?;
    let counters = gate.counters(port, proto)?;
    if policy.is_none() && counters == PortCounters::default() {
        return Ok(None);
    }
    let now = host::kernel::monotonic_now_ns();
    let grants = gate
        .grants()?
        .into_iter()
        .filter(|grant| grant.port == port && grant.protocol == proto)
        .map(|grant| GrantView::of(&grant, now))
        .collect();
    let active = match proto {
        Protocol::Tcp => gate.slots(port)?.established,
        Protocol::Udp => 0,
    };
    Ok(Some(report_of(
        (port, proto),
        policy.as_ref(),
        allow,
        grants,
        &counters,
        active,
    )))
}

fn report_of(
    (port, proto): (u16, Protocol),
    policy: Option<&portgate_common::Policy>,
    allow: Vec<IpNet>,
    grants: Vec<GrantView>,
    counters: &PortCounters,
    active: u64,
) -> PortReport {
    PortReport {
        port,
        proto,
        status: policy
            .and_then(|policy| PortStatus::from_code(policy.status))
            .unwrap_or(PortStatus::Available),
        allow,
        max_connections: policy.map_or(0, |policy| policy.max_connections),
        require_auth: policy.is_some_and(|policy| policy.flags & policy_flags::REQUIRE_AUTH != 0),
        owner_cgroup: policy
            .filter(|policy| policy.flags & policy_flags::OWNER != 0)
            .map(|policy| policy.owner_cgroup),
        grants,
        counters: PortMetrics::new(counters, active),
    }
}
