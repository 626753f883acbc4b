//! The specification's `PortSecurity`: each port's kernel policy as the manager last wrote
//! it, the grants it gave, and the verdict over them, which is the kernel programs' verdict
//! ([`crate::verdict`]) run in userspace.

use std::net::IpAddr;

use super::error::{PortError, Result};
use crate::{
    host,
    model::{DropReason, PortAccessControl, PortId, PortPolicy, Protocol},
    verdict::{self, GateModel, GateView, Packet, Verdict},
};

/// The most prefixes one port's allowlist may hold (the kernel trie holds 1,048,576 in all).
pub const MAX_ALLOWED_IPS: usize = 10_000;

/// The most grants one port may hold at once (the kernel map holds 131,072 in all).
pub const MAX_GRANTS_PER_PORT: usize = 1024;

/// The longest a grant may last: grants stand for a recent authentication.
pub const MAX_GRANT_TTL: std::time::Duration = std::time::Duration::from_hours(24);

/// A mirror of the kernel's policies and grants, and the verdict over it.
#[derive(Clone, Debug)]
pub struct PortSecurity {
    model: GateModel,
}

impl PortSecurity {
    /// No port has a policy yet; the ports `min..=max` are managed.
    #[must_use]
    pub fn managing(min: u16, max: u16) -> Self {
        Self {
            model: GateModel::new(min, max),
        }
    }

    /// Checks an access control for a port of `protocol` before it is applied: at most
    /// [`MAX_ALLOWED_IPS`] prefixes, and no `max_connections` on UDP, where the kernel has
    /// no connections to count (it would be accepted and silently ignored).
    pub fn check_access_control(protocol: Protocol, access: &PortAccessControl) -> Result<()> {
        if protocol == Protocol::Udp && access.max_connections != 0 {
            return Err(PortError::PolicyViolation(format!(
                "max_connections = {} on a UDP port: the limit counts TCP connections, and UDP has none; leave it 0 for UDP",
                access.max_connections
            )));
        }
        if access.allowed_ips.len() > MAX_ALLOWED_IPS {
            return Err(PortError::PolicyViolation(format!(
                "an allowlist of {} prefixes is too long: at most {MAX_ALLOWED_IPS} per port; merge prefixes into wider ones",
                access.allowed_ips.len()
            )));
        }
        Ok(())
    }

    /// Sets a port's whole kernel policy (status, access control, owner cgroup); `None`
    /// makes it unallocated, and its grants go.
    pub fn set_policy(&mut self, id: PortId, policy: Option<PortPolicy>) {
        match policy {
            Some(policy) => self.model.set_policy(id, policy),
            None => self.model.remove_policy(id),
        }
    }

    /// The kernel policy of a port.
    #[must_use]
    pub fn policy(&self, id: PortId) -> Option<&PortPolicy> {
        self.model.policy(id).map(|(_, policy)| policy)
    }

    /// Records an authentication grant for `source` until `expires_ns` (`CLOCK_MONOTONIC`).
    pub fn add_grant(&mut self, id: PortId, source: IpAddr, expires_ns: u64) {
        self.model.add_grant(id, source, expires_ns);
    }

    /// How many grants a port holds (expired ones until they are swept).
    #[must_use]
    pub fn grant_count(&self, id: PortId) -> usize {
        self.model.grant_count(id)
    }

    /// The grants of a port: each source with its expiry (`CLOCK_MONOTONIC` ns).
    #[must_use]
    pub fn grants_of(&self, id: PortId) -> Vec<(IpAddr, u64)> {
        self.model.grants_of(id)
    }

    /// Forgets a grant (expired, or withdrawn).
    pub fn remove_grant(&mut self, id: PortId, source: IpAddr) {
        self.model.remove_grant(id, source);
    }

    /// Why a new connection from `addr` would be refused, given `connections` open now:
    /// the kernel's drop reason and the error saying it; `None` when it gets in.
    #[must_use]
    pub fn refusal(
        &self,
        id: PortId,
        addr: IpAddr,
        connections: u64,
    ) -> Option<(DropReason, PortError)> {
        let view = WithSlots {
            model: &self.model,
            id,
            slots: connections,
        };
        let packet = Packet::new_connection(id, addr);
        match verdict::decide(&view, &packet, host::kernel::monotonic_now_ns()) {
            Verdict::Drop(reason) => {
                let max = self
                    .policy(id)
                    .map_or(0, |policy| policy.access.max_connections);
                Some((reason, PortError::connection_refused(id, addr, reason, max)))
            }
            Verdict::Untouched | Verdict::Pass | Verdict::Accept => None,
        }
    }
}

/// The model with the live connection count of one port (the kernel's slot counter).
struct WithSlots<'a> {
    model: &'a GateModel,
    id: PortId,
    slots: u64,
}

impl GateView for WithSlots<'_> {
    fn managed_range(&self) -> Option<(u16, u16)> {
        self.model.managed_range()
    }

    fn policy(&self, id: PortId) -> Option<(PortId, &PortPolicy)> {
        self.model.policy(id)
    }

    fn grant_expiry(&self, id: PortId, source: IpAddr) -> Option<u64> {
        self.model.grant_expiry(id, source)
    }

    fn slots(&self, id: PortId) -> u64 {
        if id == self.id {
            self.slots
        } else {
            self.model.slots(id)
        }
    }
}
