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
        Allocation, AllocationRequest, PortId, PortStatus, Protocol, Timeline, UnixMillis,
        add_duration,
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
}

impl std::fmt::Display for Transition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::LeaseExpired(id) => write!(f, "{id} lease expired: draining"),
            Self::Closed(id) => write!(f, "{id} closed: quarantine"),
            Self::Freed(id) => write!(f, "{id} available"),
        }
    }
}

impl Transition {
    /// The port it happened to.
    #[must_use]
    pub const fn id(self) -> PortId {
        match self {
            Self::LeaseExpired(id) | Self::Closed(id) | Self::Freed(id) => id,
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

/// Hands out ports from the managed range and keeps their lifecycle.
pub struct PortAllocator {
    config: PortConfig,
    reserved: BTreeSet<u16>,
    allocations: BTreeMap<PortId, Allocation>,
    /// Per protocol (index [`protocol_index`]): ports neither reserved nor allocated.
    free: [BTreeSet<u16>; 2],
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
    pub fn claim(
        &mut self,
        request: AllocationRequest,
        now: UnixMillis,
        bound: &BTreeSet<u16>,
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
        let port = match request.port {
            Some(port) => self.check_requested(PortId::new(port, protocol), bound)?,
            None => self.find_free(protocol, bound)?,
        };
        let allocation = Allocation {
            id: PortId::new(port, protocol),
            owner: request.owner,
            access: request.access,
            status: PortStatus::Active,
            timeline: Timeline::starting(now, request.ttl),
        };
        self.insert(allocation.clone());
        Ok(allocation)
    }

    fn check_requested(&self, id: PortId, bound: &BTreeSet<u16>) -> Result<u16> {
        self.check_port(id.port)?;
        let unavailable = |why: String| PortError::PortUnavailable { id, why };
        if self.reserved.contains(&id.port) {
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

    fn find_free(&self, protocol: Protocol, bound: &BTreeSet<u16>) -> Result<u16> {
        let free = &self.free[protocol_index(protocol)];
        let exhausted = || PortError::RangeExhausted {
            protocol,
            min: self.config.min_port,
            max: self.config.max_port,
        };
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
        self.free[protocol_index(allocation.id.protocol)].remove(&allocation.id.port);
        self.allocations.insert(allocation.id, allocation);
    }

    /// Takes in an allocation read from the store (at start-up). A record outside the range
    /// or on a reserved port is refused: the configuration changed under it.
    pub fn load(&mut self, allocation: Allocation) -> Result<()> {
        self.check_port(allocation.id.port)?;
        if self.reserved.contains(&allocation.id.port) {
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
        self.free[protocol_index(id.protocol)].insert(id.port);
        Some(removed)
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

    /// Renews the lease of an Active port for `ttl` (or its own TTL) from `now`.
    pub fn renew(&mut self, id: PortId, ttl: Option<Duration>, now: UnixMillis) -> Result<()> {
        let held = self
            .allocations
            .get_mut(&id)
            .ok_or(PortError::NotAllocated(id))?;
        if held.status != PortStatus::Active {
            return Err(PortError::PolicyViolation(format!(
                "port {id} is {} and its lease cannot be renewed: allocate a port again",
                held.status
            )));
        }
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
mod tests {
    use std::{collections::BTreeSet, time::Duration};

    use super::{PortAllocator, Transition};
    use crate::{
        config::PortConfig,
        manager::error::PortError,
        model::{AllocationRequest, PortId, PortStatus, Protocol},
    };

    /// No port has a live socket.
    const NOTHING_BOUND: BTreeSet<u16> = BTreeSet::new();

    fn config(min: u16, max: u16) -> PortConfig {
        PortConfig {
            min_port: min,
            max_port: max,
            timeout: Duration::from_secs(30),
            quarantine: Duration::from_secs(10),
            ..PortConfig::default()
        }
    }

    fn allocator(config: PortConfig) -> PortAllocator {
        PortAllocator::from_config(config).unwrap()
    }

    fn status_of(allocator: &PortAllocator, id: PortId) -> PortStatus {
        allocator
            .allocation(id)
            .map_or(PortStatus::Available, |held| held.status)
    }

    fn request(owner: &str, port: Option<u16>) -> AllocationRequest {
        AllocationRequest {
            port,
            ..AllocationRequest::new(owner)
        }
    }

    #[test]
    fn a_specific_port_is_handed_out_once() {
        let mut allocator = allocator(config(20_000, 20_009));
        let held = allocator
            .claim(request("a", Some(20_005)), 1_000, &NOTHING_BOUND)
            .unwrap();
        assert_eq!(held.id, PortId::new(20_005, Protocol::Tcp));
        assert_eq!(held.status, PortStatus::Active);
        let err = allocator
            .claim(request("b", Some(20_005)), 1_000, &NOTHING_BOUND)
            .unwrap_err();
        assert!(matches!(err, PortError::PortUnavailable { .. }), "{err}");
        assert!(err.to_string().contains("held by a"), "{err}");
        // The same number for UDP is another port.
        let udp = AllocationRequest {
            protocol: Protocol::Udp,
            ..request("b", Some(20_005))
        };
        assert_eq!(
            allocator
                .claim(udp, 1_000, &NOTHING_BOUND)
                .unwrap()
                .id
                .protocol,
            Protocol::Udp
        );
    }

    #[test]
    fn out_of_range_and_reserved_ports_are_refused() {
        let mut allocator = allocator(PortConfig {
            reserved_ports: vec![20_003],
            ..config(20_000, 20_009)
        });
        let err = allocator
            .claim(request("a", Some(19_999)), 0, &NOTHING_BOUND)
            .unwrap_err();
        assert!(matches!(err, PortError::InvalidPortRequest(_)), "{err}");
        assert!(
            err.to_string()
                .contains("outside the managed range 20000-20009")
        );
        let err = allocator
            .claim(request("a", Some(20_003)), 0, &NOTHING_BOUND)
            .unwrap_err();
        assert!(err.to_string().contains("reserved"), "{err}");
        // Random allocation never lands on the reserved port.
        let ports: BTreeSet<u16> = (0..9)
            .map(|_| {
                allocator
                    .claim(request("a", None), 0, &NOTHING_BOUND)
                    .unwrap()
                    .id
                    .port
            })
            .collect();
        assert_eq!(ports.len(), 9);
        assert!(!ports.contains(&20_003));
    }

    #[test]
    fn an_exhausted_range_is_a_clear_error() {
        let mut allocator = allocator(config(20_000, 20_003));
        for _ in 0..4 {
            allocator
                .claim(request("a", None), 0, &NOTHING_BOUND)
                .unwrap();
        }
        let err = allocator
            .claim(request("a", None), 0, &NOTHING_BOUND)
            .unwrap_err();
        assert!(matches!(err, PortError::RangeExhausted { .. }), "{err}");
        assert!(
            err.to_string().contains("no free tcp port in 20000-20003"),
            "{err}"
        );
        assert_eq!(allocator.free_count(Protocol::Tcp), 0);
        assert_eq!(allocator.free_count(Protocol::Udp), 4);
    }

    #[test]
    fn random_probes_then_a_scan_find_the_last_free_ports_at_99_percent() {
        let mut allocator = allocator(PortConfig {
            max_retries: 4,
            ..config(20_000, 29_999)
        });
        for _ in 0..9_900 {
            allocator
                .claim(request("bulk", None), 0, &NOTHING_BOUND)
                .unwrap();
        }
        assert_eq!(allocator.free_count(Protocol::Tcp), 100);
        // With 1% free, 4 probes mostly miss: the scan must find every remaining port.
        let mut last = BTreeSet::new();
        for _ in 0..100 {
            last.insert(
                allocator
                    .claim(request("tail", None), 0, &NOTHING_BOUND)
                    .unwrap()
                    .id
                    .port,
            );
        }
        assert_eq!(last.len(), 100);
        assert!(matches!(
            allocator.claim(request("x", None), 0, &NOTHING_BOUND),
            Err(PortError::RangeExhausted { .. })
        ));
    }

    #[test]
    fn a_bound_port_is_skipped() {
        let mut allocator = allocator(config(20_000, 20_002));
        let bound = BTreeSet::from([20_000, 20_002]);
        let err = allocator
            .claim(request("a", Some(20_000)), 0, &bound)
            .unwrap_err();
        assert!(err.to_string().contains("already bound"), "{err}");
        for _ in 0..3 {
            // Only 20001 is neither allocated nor bound.
            let held = allocator.claim(request("a", None), 0, &bound);
            if let Ok(held) = held {
                assert_eq!(held.id.port, 20_001);
            } else {
                assert!(matches!(held, Err(PortError::RangeExhausted { .. })));
            }
        }
    }

    #[test]
    fn leases_expire_into_draining_and_renew_pushes_them_out() {
        let mut allocator = allocator(config(20_000, 20_009));
        let held = allocator
            .claim(
                AllocationRequest {
                    ttl: Some(Duration::from_secs(5)),
                    ..request("a", Some(20_001))
                },
                1_000,
                &NOTHING_BOUND,
            )
            .unwrap();
        assert_eq!(held.timeline.lease_expires_at, Some(6_000));
        allocator.renew(held.id, None, 4_000).unwrap();
        assert_eq!(
            allocator
                .allocation(held.id)
                .unwrap()
                .timeline
                .lease_expires_at,
            Some(9_000)
        );
        assert!(allocator.tick(8_999, |_| 1).steps.is_empty());
        let renewed = allocator.allocation(held.id).unwrap().clone();
        // Expired with a connection open: Draining, not yet Closed.
        let ticked = allocator.tick(9_000, |_| 1);
        assert_eq!(ticked.steps, vec![Transition::LeaseExpired(held.id)]);
        assert_eq!(ticked.before, vec![renewed], "what it was before the tick");
        assert_eq!(status_of(&allocator, held.id), PortStatus::Draining);
        let err = allocator.renew(held.id, None, 9_001).unwrap_err();
        assert!(err.to_string().contains("cannot be renewed"), "{err}");
        // A port without a lease has nothing to renew.
        let plain = allocator
            .claim(request("b", None), 0, &NOTHING_BOUND)
            .unwrap();
        assert!(allocator.renew(plain.id, None, 0).is_err());
        assert!(
            allocator
                .renew(plain.id, Some(Duration::from_secs(1)), 0)
                .is_ok()
        );
    }

    #[test]
    fn the_lifecycle_runs_active_draining_closed_quarantine_available() {
        let mut allocator = allocator(config(20_000, 20_000));
        let id = allocator
            .claim(request("a", None), 0, &NOTHING_BOUND)
            .unwrap()
            .id;
        allocator
            .set_status_at(id, PortStatus::Draining, 1_000)
            .unwrap();
        // One connection open: stays Draining until the drain timeout (30 s).
        assert!(allocator.tick(2_000, |_| 1).steps.is_empty());
        assert_eq!(
            allocator.tick(31_000, |_| 1).steps,
            vec![Transition::Closed(id)]
        );
        assert_eq!(status_of(&allocator, id), PortStatus::Closed);
        // Quarantine (10 s): not free yet, and not allocatable.
        assert!(allocator.tick(40_999, |_| 0).steps.is_empty());
        assert!(
            allocator
                .claim(request("b", None), 40_999, &NOTHING_BOUND)
                .is_err()
        );
        let err = allocator
            .claim(request("b", Some(20_000)), 40_999, &NOTHING_BOUND)
            .unwrap_err();
        assert!(err.to_string().contains("quarantine"), "{err}");
        assert_eq!(
            allocator.tick(41_000, |_| 0).steps,
            vec![Transition::Freed(id)]
        );
        assert_eq!(status_of(&allocator, id), PortStatus::Available);
        let again = allocator
            .claim(request("b", None), 41_000, &NOTHING_BOUND)
            .unwrap();
        assert_eq!(again.id, id);
        assert_eq!(again.owner.name, "b");
    }

    #[test]
    fn draining_closes_when_the_last_connection_ends() {
        let mut allocator = allocator(PortConfig {
            quarantine: Duration::ZERO,
            ..config(20_000, 20_000)
        });
        let id = allocator
            .claim(request("a", None), 0, &NOTHING_BOUND)
            .unwrap()
            .id;
        allocator
            .set_status_at(id, PortStatus::Draining, 0)
            .unwrap();
        assert!(allocator.tick(100, |_| 2).steps.is_empty());
        // No connections and no quarantine: closed and freed in one step.
        assert_eq!(
            allocator.tick(200, |_| 0).steps,
            vec![Transition::Closed(id), Transition::Freed(id)]
        );
        assert_eq!(allocator.free_count(Protocol::Tcp), 1);
    }

    #[test]
    fn a_closed_port_is_not_reopened() {
        let mut allocator = allocator(config(20_000, 20_000));
        let id = allocator
            .claim(request("a", None), 0, &NOTHING_BOUND)
            .unwrap()
            .id;
        allocator.set_status_at(id, PortStatus::Closed, 0).unwrap();
        let err = allocator
            .set_status_at(id, PortStatus::Active, 1)
            .unwrap_err();
        assert!(err.to_string().contains("cannot go active"), "{err}");
    }

    #[test]
    fn requests_are_checked() {
        let mut allocator = allocator(config(20_000, 20_009));
        let err = allocator
            .claim(request(" ", None), 0, &NOTHING_BOUND)
            .unwrap_err();
        assert!(err.to_string().contains("owner name is empty"), "{err}");
        let err = allocator
            .claim(
                AllocationRequest {
                    ttl: Some(Duration::ZERO),
                    ..request("a", None)
                },
                0,
                &NOTHING_BOUND,
            )
            .unwrap_err();
        assert!(err.to_string().contains("TTL of 0"), "{err}");
        assert_eq!(allocator.free_count(Protocol::Tcp), 10);
    }
}
