//! The specification's `PortAllocator`: which ports are free, who holds the others, and the
//! lifecycle timers (lease, drain, quarantine).
//!
//! It keeps state in memory only, and reads nothing from the host: the
//! [`PortManager`](super::PortManager) tells it which ports have a live socket, makes each
//! change durable and pushes it to the kernel.

use std::{
    collections::{BTreeMap, BTreeSet},
    ops::RangeInclusive,
    time::Duration,
};

use rand::Rng as _;

use super::error::{PortError, Result};
use crate::{
    config::PortConfig,
    model::{
        Allocation, AllocationRequest, HostPort, NetnsId, PortId, PortStatus, Protocol, Timeline,
        UnixMillis, add_duration,
    },
};

/// A lifecycle step taken by [`PortAllocator::tick`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// The lease ran out: Active went Draining.
    LeaseExpired(PortId),
    /// Draining went Closed (no connections left, or the drain timeout passed).
    Closed(PortId),
    /// Quarantine passed: the port is Available again.
    Freed(PortId),
    /// The owner cgroup was removed (`[ports] on_owner_exit = "drain"`): Active went
    /// Draining.
    OwnerGone(PortId),
    /// The port's network namespace is gone: it went Closed (its connections went with the
    /// namespace) and left the kernel; it is freed after quarantine.
    NetnsGone(PortId),
}

impl std::fmt::Display for Transition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::LeaseExpired(id) => write!(f, "{id} lease expired: draining"),
            Self::Closed(id) => write!(f, "{id} closed: quarantine"),
            Self::Freed(id) => write!(f, "{id} available"),
            Self::OwnerGone(id) => write!(f, "{id} owner cgroup removed: draining"),
            Self::NetnsGone(id) => write!(
                f,
                "{id} network namespace gone: closed, kernel entries removed, quarantine"
            ),
        }
    }
}

impl Transition {
    /// The port it happened to.
    #[must_use]
    pub const fn id(self) -> PortId {
        match self {
            Self::LeaseExpired(id)
            | Self::Closed(id)
            | Self::Freed(id)
            | Self::OwnerGone(id)
            | Self::NetnsGone(id) => id,
        }
    }
}

/// What one [`PortAllocator::tick`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ticked {
    /// The steps taken, in order; a port may take several.
    pub steps: Vec<Transition>,
    /// The allocations of the ports that moved, as they were before the tick.
    pub before: Vec<Allocation>,
}

/// What the manager found gone on the host, for [`PortAllocator::take_gone`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Gone {
    /// Owner cgroups, by id (never reused while the system runs), that no longer exist.
    pub cgroups: BTreeSet<u64>,
    /// Network namespaces, by cookie, that no longer exist.
    pub netns: BTreeSet<NetnsId>,
}

impl Gone {
    /// Whether the owner cgroup of `held` is gone.
    #[must_use]
    pub fn owns(&self, held: &Allocation) -> bool {
        held.owner
            .cgroup
            .as_ref()
            .is_some_and(|owner| self.cgroups.contains(&owner.id))
    }
}

/// Ports with a live socket, which an allocation must avoid.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Bound {
    /// In the allocation's namespace.
    pub netns: BTreeSet<u16>,
    /// In the host's namespace, for the host port of a published port (for an allocation
    /// in the host's namespace, the same ports as `netns`).
    pub host: BTreeSet<u16>,
}

/// Hands out ports and keeps their lifecycle. The managed range is the host's: its ports
/// are handed out from it, and so are the host ports of published ports. A port of
/// another namespace (a container's) may be any port; one not named is taken from the
/// range too.
pub struct PortAllocator {
    config: PortConfig,
    reserved: BTreeSet<u16>,
    allocations: BTreeMap<PortId, Allocation>,
    /// Per protocol (index [`protocol_index`]): host ports neither reserved, allocated nor
    /// published.
    free: [BTreeSet<u16>; 2],
    /// Host ports published for an allocation, with it.
    published: BTreeMap<PortId, PortId>,
}

const fn protocol_index(protocol: Protocol) -> usize {
    match protocol {
        Protocol::Tcp => 0,
        Protocol::Udp => 1,
    }
}

impl PortAllocator {
    /// An allocator over `config` (validated), holding nothing yet.
    pub fn from_config(config: PortConfig) -> Result<Self> {
        config.validate().map_err(|err| {
            PortError::configuration("the [ports] section is not valid", Some(Box::new(err)))
        })?;
        let reserved: BTreeSet<u16> = config.reserved_ports.iter().copied().collect();
        let unreserved: BTreeSet<u16> = (config.min_port..=config.max_port)
            .filter(|port| !reserved.contains(port))
            .collect();
        Ok(Self {
            reserved,
            allocations: BTreeMap::new(),
            free: [unreserved.clone(), unreserved],
            published: BTreeMap::new(),
            config,
        })
    }

    /// The configuration.
    #[must_use]
    pub const fn config(&self) -> &PortConfig {
        &self.config
    }

    /// The managed range.
    #[must_use]
    pub const fn range(&self) -> RangeInclusive<u16> {
        self.config.min_port..=self.config.max_port
    }

    /// Ports of `protocol` that can be handed out now (not counting live sockets).
    #[must_use]
    pub fn free_count(&self, protocol: Protocol) -> usize {
        self.free[protocol_index(protocol)].len()
    }

    /// Checks that `port` may be named in a request.
    pub fn check_port(&self, port: u16) -> Result<()> {
        if !self.range().contains(&port) {
            return Err(PortError::InvalidPortRequest(format!(
                "port {port} is outside the managed range {}-{}: pick a port in it or leave --port out",
                self.config.min_port, self.config.max_port
            )));
        }
        Ok(())
    }

    /// Claims a port for `request` at `now`: the one it names, or a free one found by up to
    /// `max_retries` random probes, then by a scan of the free ports from a random start.
    /// A port in `bound` (it has a live socket) is never handed out. The allocation is
    /// Active from `now`.
    ///
    /// A request in another namespace may name any port; a published one also takes a
    /// host port (the one it names, or a free one) that nothing else is handed.
    pub fn claim(
        &mut self,
        request: AllocationRequest,
        now: UnixMillis,
        bound: &Bound,
    ) -> Result<Allocation> {
        if request.owner.name.trim().is_empty() {
            return Err(PortError::InvalidPortRequest(
                "the owner name is empty: give --owner NAME".to_owned(),
            ));
        }
        if request.ttl == Some(Duration::ZERO) {
            return Err(PortError::InvalidPortRequest(
                "a lease TTL of 0 would expire at once: give a positive --ttl or none".to_owned(),
            ));
        }
        let protocol = request.protocol;
        let (netns, netns_info) = match request.netns {
            Some(found) => (found.id, Some(found.info)),
            None => (NetnsId::HOST, None),
        };
        let port = match request.port {
            Some(port) => self.check_requested(
                PortId {
                    netns,
                    ..PortId::new(port, protocol)
                },
                &bound.netns,
            )?,
            None => self.find_free(netns, protocol, &bound.netns)?,
        };
        let id = PortId {
            netns,
            ..PortId::new(port, protocol)
        };
        let published = match request.publish {
            None => None,
            Some(_) if netns.is_host() => {
                return Err(PortError::InvalidPortRequest(
                    "only a port of a container's namespace is published: name it with --container, --pid or --netns".to_owned(),
                ));
            }
            Some(HostPort::Port(host)) => Some(
                self.check_requested(PortId::new(host, protocol), &bound.host)
                    .map_err(|err| match err {
                        PortError::PortUnavailable { why, .. } => PortError::PortUnavailable {
                            id: PortId::new(host, protocol),
                            why: format!("the host port cannot be published: {why}"),
                        },
                        other => other,
                    })?,
            ),
            Some(HostPort::Auto) => Some(self.find_free(NetnsId::HOST, protocol, &bound.host)?),
        };
        let allocation = Allocation {
            id,
            netns: netns_info,
            published,
            owner: request.owner,
            access: request.access,
            status: PortStatus::Active,
            timeline: Timeline::starting(now, request.ttl),
        };
        self.insert(allocation.clone());
        Ok(allocation)
    }

    fn check_requested(&self, id: PortId, bound: &BTreeSet<u16>) -> Result<u16> {
        let unavailable = |why: String| PortError::PortUnavailable { id, why };
        if id.netns.is_host() {
            self.check_port(id.port)?;
        } else if id.port == 0 {
            return Err(PortError::InvalidPortRequest(
                "port 0 cannot be allocated: name a port from 1 to 65535".to_owned(),
            ));
        }
        if let Some(home) = self.published.get(&id) {
            return Err(unavailable(format!("it is published for {home}")));
        }
        if id.netns.is_host() && self.reserved.contains(&id.port) {
            return Err(unavailable(
                "it is reserved ([ports] reserved_ports)".to_owned(),
            ));
        }
        if let Some(held) = self.allocations.get(&id) {
            return Err(unavailable(match held.status {
                PortStatus::Closed => "it is in quarantine after its last release".to_owned(),
                status => format!("it is {status}, held by {}", held.owner.name),
            }));
        }
        if bound.contains(&id.port) {
            return Err(unavailable(
                "a socket is already bound to it (see `ss -lntup`)".to_owned(),
            ));
        }
        Ok(id.port)
    }

    fn find_free(&self, netns: NetnsId, protocol: Protocol, bound: &BTreeSet<u16>) -> Result<u16> {
        let exhausted = || PortError::RangeExhausted {
            protocol,
            min: self.config.min_port,
            max: self.config.max_port,
        };
        if !netns.is_host() {
            // Another namespace has the whole range to itself, less what it holds there.
            let mut rng = rand::rng();
            let start = rng.random_range(self.range());
            return (start..=self.config.max_port)
                .chain(self.config.min_port..start)
                .find(|&port| {
                    !bound.contains(&port)
                        && !self.allocations.contains_key(&PortId {
                            netns,
                            ..PortId::new(port, protocol)
                        })
                })
                .ok_or_else(exhausted);
        }
        let free = &self.free[protocol_index(protocol)];
        if free.is_empty() {
            return Err(exhausted());
        }
        let mut rng = rand::rng();
        for _ in 0..self.config.max_retries {
            let port = rng.random_range(self.range());
            if free.contains(&port) && !bound.contains(&port) {
                return Ok(port);
            }
        }
        let start = rng.random_range(self.range());
        free.range(start..)
            .chain(free.range(..start))
            .copied()
            .find(|port| !bound.contains(port))
            .ok_or_else(exhausted)
    }

    fn insert(&mut self, allocation: Allocation) {
        let free = &mut self.free[protocol_index(allocation.id.protocol)];
        if allocation.id.netns.is_host() {
            free.remove(&allocation.id.port);
        }
        if let Some(host) = allocation.published {
            free.remove(&host);
            self.published
                .insert(PortId::new(host, allocation.id.protocol), allocation.id);
        }
        self.allocations.insert(allocation.id, allocation);
    }

    /// Takes in an allocation read from the store (at start-up). A record of the host's
    /// namespace outside the range or on a reserved port is refused, and so is a host port
    /// published there: the configuration changed under it.
    pub fn load(&mut self, allocation: Allocation) -> Result<()> {
        let host_ports = allocation
            .id
            .netns
            .is_host()
            .then_some(allocation.id.port)
            .into_iter()
            .chain(allocation.published);
        for port in host_ports {
            self.check_port(port)?;
        }
        if allocation.id.netns.is_host() && self.reserved.contains(&allocation.id.port) {
            return Err(PortError::configuration(
                format!(
                    "port {} is allocated to {} but is now in [ports] reserved_ports: release it first or take it out of reserved_ports",
                    allocation.id, allocation.owner.name
                ),
                None,
            ));
        }
        self.insert(allocation);
        Ok(())
    }

    /// Makes `record` the allocation of `id` (`None`: none), without the checks of a new
    /// allocation: how a change is undone, back to what the allocator held before.
    pub fn set(&mut self, id: PortId, record: Option<Allocation>) {
        self.remove(id);
        if let Some(held) = record {
            self.insert(held);
        }
    }

    /// Forgets an allocation at once; the port is free again.
    pub fn remove(&mut self, id: PortId) -> Option<Allocation> {
        let removed = self.allocations.remove(&id)?;
        let free = &mut self.free[protocol_index(id.protocol)];
        if id.netns.is_host() {
            free.insert(id.port);
        }
        if let Some(host) = removed.published {
            free.insert(host);
            self.published.remove(&PortId::new(host, id.protocol));
        }
        Some(removed)
    }

    /// The allocation a host port is published for, if any.
    #[must_use]
    pub fn published_for(&self, host_side: PortId) -> Option<PortId> {
        self.published.get(&host_side).copied()
    }

    /// The allocation of a port.
    #[must_use]
    pub fn allocation(&self, id: PortId) -> Option<&Allocation> {
        self.allocations.get(&id)
    }

    /// Every allocation, in port order.
    pub fn allocations(&self) -> impl Iterator<Item = &Allocation> {
        self.allocations.values()
    }

    /// Moves a port to `status` at `at`, keeping the lifecycle's order: Available frees it at
    /// once; Draining and Closed start their timers; Active is only for a port that is
    /// Active already (a closed port is not reopened: allocate it again).
    pub fn set_status_at(&mut self, id: PortId, status: PortStatus, at: UnixMillis) -> Result<()> {
        if status == PortStatus::Available {
            self.remove(id).ok_or(PortError::NotAllocated(id))?;
            return Ok(());
        }
        let held = self
            .allocations
            .get_mut(&id)
            .ok_or(PortError::NotAllocated(id))?;
        let timeline = &mut held.timeline;
        match (held.status, status) {
            (from, to) if from == to => {}
            (PortStatus::Active, PortStatus::Draining) => {
                held.status = PortStatus::Draining;
                timeline.draining_since = Some(at);
            }
            (PortStatus::Active | PortStatus::Draining, PortStatus::Closed) => {
                held.status = PortStatus::Closed;
                timeline.draining_since.get_or_insert(at);
                timeline.closed_at = Some(at);
            }
            (from, to) => {
                return Err(PortError::PolicyViolation(format!(
                    "port {id} is {from} and cannot go {to}: allocate it again once it is available"
                )));
            }
        }
        Ok(())
    }

    /// The allocation of `id` if it is Active; otherwise an error saying that it `cannot`.
    fn active_mut(&mut self, id: PortId, cannot: &str) -> Result<&mut Allocation> {
        let held = self
            .allocations
            .get_mut(&id)
            .ok_or(PortError::NotAllocated(id))?;
        if held.status != PortStatus::Active {
            return Err(PortError::PolicyViolation(format!(
                "port {id} is {} and {cannot}: allocate a port again",
                held.status
            )));
        }
        Ok(held)
    }

    /// Renews the lease of an Active port for `ttl` (or its own TTL) from `now`.
    pub fn renew(&mut self, id: PortId, ttl: Option<Duration>, now: UnixMillis) -> Result<()> {
        let held = self.active_mut(id, "its lease cannot be renewed")?;
        let Some(ttl) = ttl.or(held.timeline.ttl) else {
            return Err(PortError::InvalidPortRequest(format!(
                "port {id} has no lease to renew: give --ttl to start one"
            )));
        };
        if ttl.is_zero() {
            return Err(PortError::InvalidPortRequest(
                "a lease TTL of 0 would expire at once: give a positive --ttl".to_owned(),
            ));
        }
        held.timeline.ttl = Some(ttl);
        held.timeline.lease_expires_at = Some(add_duration(now, ttl));
        Ok(())
    }

    /// Changes the owner cgroup of an Active allocation.
    pub fn set_owner(&mut self, id: PortId, cgroup: crate::model::OwnerCgroup) -> Result<()> {
        let held = self.active_mut(id, "keeps its owner")?;
        held.owner.cgroup = Some(cgroup);
        Ok(())
    }

    /// Changes the access control kept with an allocation.
    pub fn set_access(
        &mut self,
        id: PortId,
        access: crate::model::PortAccessControl,
    ) -> Result<()> {
        let held = self
            .allocations
            .get_mut(&id)
            .ok_or(PortError::NotAllocated(id))?;
        held.access = access;
        Ok(())
    }

    /// Takes the steps that owners found `gone` call for at `now`. A port whose namespace is
    /// gone goes Closed, whatever its status (its sockets and connections went with the
    /// namespace), and is marked so ([`Timeline::netns_gone_at`]), which takes it out of
    /// the kernel; quarantine then frees it as any closed port. With `drain`, an Active
    /// port whose owner cgroup is gone goes Draining, as when its lease runs out.
    pub fn take_gone(&mut self, gone: &Gone, drain: bool, now: UnixMillis) -> Ticked {
        let mut ticked = Ticked::default();
        for held in self.allocations.values_mut() {
            let netns_gone =
                gone.netns.contains(&held.id.netns) && held.timeline.netns_gone_at.is_none();
            let owner_gone = drain && held.status == PortStatus::Active && gone.owns(held);
            if !(netns_gone || owner_gone) {
                continue;
            }
            ticked.before.push(held.clone());
            let timeline = &mut held.timeline;
            if netns_gone {
                if held.status != PortStatus::Closed {
                    held.status = PortStatus::Closed;
                    timeline.draining_since.get_or_insert(now);
                    timeline.closed_at = Some(now);
                }
                timeline.netns_gone_at = Some(now);
                ticked.steps.push(Transition::NetnsGone(held.id));
            } else {
                held.status = PortStatus::Draining;
                timeline.draining_since = Some(now);
                ticked.steps.push(Transition::OwnerGone(held.id));
            }
        }
        ticked
    }

    /// Takes every lifecycle step due at `now`: expired leases go Draining; Draining ports
    /// with no connections (`connections` says how many a port holds) or past the drain
    /// timeout go Closed; Closed ports past quarantine become Available. A port can take
    /// several steps in one call (with no connections and no quarantine it is freed at once).
    pub fn tick(&mut self, now: UnixMillis, connections: impl Fn(PortId) -> u64) -> Ticked {
        let mut ticked = Ticked::default();
        let (timeout, quarantine) = (self.config.timeout, self.config.quarantine);
        for held in self.allocations.values_mut() {
            // Worked out on copies, so that only a port that moves is cloned.
            let (mut status, mut timeline) = (held.status, held.timeline);
            let taken = ticked.steps.len();
            if status == PortStatus::Active
                && timeline
                    .lease_expires_at
                    .is_some_and(|expiry| now >= expiry)
            {
                status = PortStatus::Draining;
                timeline.draining_since = Some(now);
                ticked.steps.push(Transition::LeaseExpired(held.id));
            }
            if status == PortStatus::Draining {
                let since = timeline.draining_since.unwrap_or(now);
                if connections(held.id) == 0 || now >= add_duration(since, timeout) {
                    status = PortStatus::Closed;
                    timeline.closed_at = Some(now);
                    ticked.steps.push(Transition::Closed(held.id));
                }
            }
            if status == PortStatus::Closed
                && now >= add_duration(timeline.closed_at.unwrap_or(now), quarantine)
            {
                ticked.steps.push(Transition::Freed(held.id));
            }
            if ticked.steps.len() > taken {
                ticked.before.push(held.clone());
                held.status = status;
                held.timeline = timeline;
            }
        }
        for step in &ticked.steps {
            if let Transition::Freed(id) = step {
                self.remove(*id);
            }
        }
        ticked
    }
}

#[cfg(test)]
mod tests;
