//! The specification's `PortSecurity`: each port's access control, and
//! `validate_connection`, which answers with the same verdict the kernel gives (it runs
//! [`crate::verdict`] over a mirror of the kernel's policy map).

use std::net::IpAddr;

use super::{
    error::{PortError, Result},
    state::{PortAccessControl, PortId},
};
use crate::{
    host,
    policy::{DropReason, PortPolicy},
    verdict::{self, Decision, GateModel, GateView, Packet},
};

/// The most prefixes one port's allowlist may hold (the kernel trie holds 1,048,576 in all).
pub const MAX_ALLOWED_IPS: usize = 10_000;

/// The most grants one port may hold at once (the kernel map holds 131,072 in all).
pub const MAX_GRANTS_PER_PORT: usize = 1024;

/// The longest a grant may last: grants stand for a recent authentication.
pub const MAX_GRANT_TTL: std::time::Duration = std::time::Duration::from_hours(24);

/// Access control of every allocated port, and the verdict over it.
#[derive(Clone, Debug)]
pub struct PortSecurity {
    model: GateModel,
}

impl Default for PortSecurity {
    fn default() -> Self {
        Self::new()
    }
}

impl PortSecurity {
    /// No port has access control yet; every port counts as managed until
    /// [`PortSecurity::with_range`] says otherwise.
    #[must_use]
    pub fn new() -> Self {
        Self::with_range(1, u16::MAX)
    }

    /// Access control for the managed range `min..=max`.
    #[must_use]
    pub fn with_range(min: u16, max: u16) -> Self {
        Self {
            model: GateModel::new(min, max),
        }
    }

    /// Checks an access control before it is applied: at most [`MAX_ALLOWED_IPS`] prefixes.
    pub fn check_access_control(access: &PortAccessControl) -> Result<()> {
        if access.allowed_ips.len() > MAX_ALLOWED_IPS {
            return Err(PortError::PolicyViolation(format!(
                "an allowlist of {} prefixes is too long: at most {MAX_ALLOWED_IPS} per port; merge prefixes into wider ones",
                access.allowed_ips.len()
            )));
        }
        Ok(())
    }

    /// Sets a port's access control (an Active port when it had none).
    pub fn set_access_control(&mut self, port: impl Into<PortId>, access: PortAccessControl) {
        let id = port.into();
        let mut policy = self.policy(id).cloned().unwrap_or_default();
        policy.allow = access.allowed_ips;
        policy.max_connections = access.max_connections;
        policy.require_authentication = access.require_authentication;
        self.model.set_policy(id.port, id.protocol, policy);
    }

    /// Sets a port's whole kernel policy (status, access control, owner cgroup).
    pub fn set_policy(&mut self, id: PortId, policy: PortPolicy) {
        self.model.set_policy(id.port, id.protocol, policy);
    }

    /// Removes a port's access control: it is unallocated again.
    pub fn remove_access_control(&mut self, port: impl Into<PortId>) {
        let id = port.into();
        self.model.remove_policy(id.port, id.protocol);
    }

    /// The kernel policy of a port.
    #[must_use]
    pub fn policy(&self, id: PortId) -> Option<&PortPolicy> {
        self.model.policy(id.port, id.protocol)
    }

    /// Records an authentication grant for `source` until `expires_ns` (`CLOCK_MONOTONIC`).
    pub fn add_grant(&mut self, id: PortId, source: IpAddr, expires_ns: u64) {
        self.model
            .add_grant(id.port, id.protocol, source, expires_ns);
    }

    /// How many grants a port holds (expired ones until they are swept).
    #[must_use]
    pub fn grant_count(&self, id: PortId) -> usize {
        self.model.grant_count(id.port, id.protocol)
    }

    /// Forgets a grant (expired, or withdrawn).
    pub fn remove_grant(&mut self, id: PortId, source: IpAddr) {
        self.model.remove_grant(id.port, id.protocol, source);
    }

    /// Whether a new connection from `addr` to `port` would be let in, given `connections`
    /// open now: the verdict of the kernel programs.
    #[must_use]
    pub fn decide(&self, port: impl Into<PortId>, addr: IpAddr, connections: u64) -> Decision {
        let id = port.into();
        let view = WithSlots {
            model: &self.model,
            port: id.port,
            slots: connections,
        };
        let packet = match id.protocol {
            crate::policy::Protocol::Tcp => Packet::tcp(addr, id.port, true, false),
            crate::policy::Protocol::Udp => Packet::udp(addr, id.port),
        };
        verdict::evaluate(&view, &packet, host::kernel::monotonic_now_ns())
    }

    /// The specification's `validate_connection`: `Ok` when a new connection from `addr`
    /// would get in, otherwise the error saying why (the kernel's drop reason).
    pub fn validate_connection(&self, port: impl Into<PortId>, addr: IpAddr) -> Result<()> {
        self.validate_with(port.into(), addr, 0)
    }

    /// `validate_connection` given the connections the port holds now.
    pub fn validate_with(&self, id: PortId, addr: IpAddr, connections: u64) -> Result<()> {
        self.refusal(id, addr, connections)
            .map_or(Ok(()), |(_, err)| Err(err))
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
        match self.decide(id, addr, connections) {
            Decision::Drop(reason) => {
                let max = self.policy(id).map_or(0, |policy| policy.max_connections);
                Some((reason, PortError::connection_refused(id, addr, reason, max)))
            }
            Decision::Untouched | Decision::Pass | Decision::Accept => None,
        }
    }
}

/// The model with the live connection count of one port (the kernel's slot counter).
struct WithSlots<'a> {
    model: &'a GateModel,
    port: u16,
    slots: u64,
}

impl GateView for WithSlots<'_> {
    fn managed_range(&self) -> Option<(u16, u16)> {
        self.model.managed_range()
    }

    fn policy(&self, port: u16, protocol: crate::policy::Protocol) -> Option<&PortPolicy> {
        self.model.policy(port, protocol)
    }

    fn grant_expiry(
        &self,
        port: u16,
        protocol: crate::policy::Protocol,
        source: IpAddr,
    ) -> Option<u64> {
        self.model.grant_expiry(port, protocol, source)
    }

    fn slots(&self, port: u16) -> u64 {
        if port == self.port {
            self.slots
        } else {
            self.model.slots(port)
        }
    }
}
