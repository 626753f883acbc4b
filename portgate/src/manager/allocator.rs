//! The specification's `PortAllocator`: which ports are free, who holds the others, and the
//! lifecycle timers (lease, drain, quarantine).
//!
//! It keeps state in memory only; the [`PortManager`](super::PortManager) makes each change
//! durable and pushes it to the kernel.

use std::{
    collections::{BTreeMap, BTreeSet},
    ops::RangeInclusive,
    sync::Arc,
    time::Duration,
};

use rand::Rng as _;

use super::{
    error::{PortError, Result},
    state::{
        Allocation, Owner, PortAccessControl, PortId, PortState, PortStatus, Protocol, UnixMillis,
        add_duration, now_millis,
    },
};
use crate::{
    config::PortConfig,
    host::sockets::{ProcfsSockets, SocketTable},
};

/// The live sockets an allocation of `request` in `range` must avoid.
pub fn bound_for(
    sockets: &dyn SocketTable,
    range: RangeInclusive<u16>,
    request: &AllocationRequest,
) -> Result<BTreeSet<u16>> {
    match request.port {
        Some(port) if range.contains(&port) => sockets.bound_ports(request.protocol, port..=port),
        Some(_) => Ok(BTreeSet::new()),
        None => sockets.bound_ports(request.protocol, range),
    }
    .map_err(|err| PortError::ResourceMonitoring(err.to_string()))
}

/// What an allocation asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllocationRequest {
    /// Who will hold the port.
    pub owner: Owner,
    /// A specific port, or `None` for any free one.
    pub port: Option<u16>,
    /// The protocol.
    pub protocol: Protocol,
    /// The access control to start with.
    pub access: PortAccessControl,
    /// A lease length; `None` holds the port until it is released.
    pub ttl: Option<Duration>,
}

impl AllocationRequest {
    /// Any free TCP port for `owner`, no policy, no lease.
    #[must_use]
    pub fn new(owner: &str) -> Self {
        Self {
            owner: Owner {
                name: owner.to_owned(),
                uid: None,
                cgroup: None,
            },
            port: None,
            protocol: Protocol::Tcp,
            access: PortAccessControl::default(),
            ttl: None,
        }
    }
}

impl From<&str> for AllocationRequest {
    fn from(owner: &str) -> Self {
        Self::new(owner)
    }
}

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

/// Hands out ports from the managed range and keeps their lifecycle.
pub struct PortAllocator {
    config: PortConfig,
    reserved: BTreeSet<u16>,
    allocations: BTreeMap<PortId, Allocation>,
    /// Per protocol (index [`protocol_index`]): ports neither reserved nor allocated.
    free: [BTreeSet<u16>; 2],
    sockets: Arc<dyn SocketTable>,
}

const fn protocol_index(protocol: Protocol) -> usize {
    match protocol {
        Protocol::Tcp => 0,
        Protocol::Udp => 1,
    }
}

impl PortAllocator {
    /// The specification's constructor: an allocator over `range` with the other settings
    /// at their defaults, checking live sockets in procfs.
    pub fn new(range: RangeInclusive<u16>) -> Result<Self> {
        Self::with_config(PortConfig {
            min_port: *range.start(),
            max_port: *range.end(),
            ..PortConfig::default()
        })
    }

    /// An allocator over `config` (validated), checking live sockets in procfs.
    pub fn with_config(config: PortConfig) -> Result<Self> {
        Self::with_sockets(config, Arc::new(ProcfsSockets))
    }

    /// An allocator that asks `sockets` which ports are bound.
    pub fn with_sockets(config: PortConfig, sockets: Arc<dyn SocketTable>) -> Result<Self> {
        config
            .validate()
            .map_err(|err| PortError::Configuration(err.to_string()))?;
        let reserved: BTreeSet<u16> = config.reserved_ports.iter().copied().collect();
        let unreserved: BTreeSet<u16> = (config.min_port..=config.max_port)
            .filter(|port| !reserved.contains(port))
            .collect();
        Ok(Self {
            reserved,
            allocations: BTreeMap::new(),
            free: [unreserved.clone(), unreserved],
            sockets,
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

    /// Allocates a port: the requested one, or a free one found by up to `max_retries`
    /// random probes, then by a scan of the free ports from a random start. A port with a
    /// live socket is never handed out. The allocation is Active from now.
    pub fn allocate(&mut self, request: impl Into<AllocationRequest>) -> Result<Allocation> {
        self.allocate_at(request, now_millis())
    }

    /// [`PortAllocator::allocate`] at time `now`.
    pub fn allocate_at(
        &mut self,
        request: impl Into<AllocationRequest>,
        now: UnixMillis,
    ) -> Result<Allocation> {
        let request = request.into();
        let bound = self.bound_for(&request)?;
        self.allocate_with(request, now, &bound)
    }

    /// The live sockets an allocation of `request` must avoid: of its port when it names
    /// one, else of the whole range. Taken apart from [`PortAllocator::allocate_with`] so
    /// that a caller can read the socket tables (milliseconds) without holding a lock.
    pub fn bound_for(&self, request: &AllocationRequest) -> Result<BTreeSet<u16>> {
        bound_for(self.sockets.as_ref(), self.range(), request)
    }

    /// [`PortAllocator::allocate`], given the ports that have a live socket.
    pub fn allocate_with(
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
        let id = PortId::new(port, protocol);
        let allocation = Allocation {
            id,
            owner: request.owner,
            access: request.access,
            status: PortStatus::Active,
            allocated_at: now,
            ttl: request.ttl,
            lease_expires_at: request.ttl.map(|ttl| add_duration(now, ttl)),
            draining_since: None,
            closed_at: None,
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

    /// Puts back an allocation read from the store (at start-up). A record outside the
    /// range or on a reserved port is refused: the configuration changed under it.
    pub fn restore(&mut self, allocation: Allocation) -> Result<()> {
        self.check_port(allocation.id.port)?;
        if self.reserved.contains(&allocation.id.port) {
            return Err(PortError::Configuration(format!(
                "port {} is allocated to {} but is now in [ports] reserved_ports: release it first or take it out of reserved_ports",
                allocation.id, allocation.owner.name
            )));
        }
        self.insert(allocation);
        Ok(())
    }

    /// Forgets an allocation at once (an allocation that could not be made durable).
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

    /// Every allocation, in (port, protocol) order.
    pub fn allocations(&self) -> impl Iterator<Item = &Allocation> {
        self.allocations.values()
    }

    /// The specification's state of a port (`connections` is filled in by the manager).
    #[must_use]
    pub fn get_state(&self, port: impl Into<PortId>) -> PortState {
        let id = port.into();
        self.allocations.get(&id).map_or(
            PortState {
                port: id,
                status: PortStatus::Available,
                allocated_at: None,
                owner: None,
                connections: 0,
            },
            |held| PortState {
                port: id,
                status: held.status,
                allocated_at: Some(held.allocated_at),
                owner: Some(held.owner.name.clone()),
                connections: 0,
            },
        )
    }

    /// Moves a port to `status` now (`at`), keeping the lifecycle's order: Available frees
    /// it at once; Draining and Closed start their timers; Active is only for a port that
    /// is Active already (a closed port is not reopened: allocate it again).
    pub fn set_status(&mut self, port: impl Into<PortId>, status: PortStatus) -> Result<()> {
        self.set_status_at(port, status, now_millis())
    }

    /// [`PortAllocator::set_status`] at time `at`.
    pub fn set_status_at(
        &mut self,
        port: impl Into<PortId>,
        status: PortStatus,
        at: UnixMillis,
    ) -> Result<()> {
        let id = port.into();
        if status == PortStatus::Available {
            self.remove(id).ok_or(PortError::NotAllocated(id))?;
            return Ok(());
        }
        let held = self
            .allocations
            .get_mut(&id)
            .ok_or(PortError::NotAllocated(id))?;
        match (held.status, status) {
            (from, to) if from == to => {}
            (PortStatus::Active, PortStatus::Draining) => {
                held.status = PortStatus::Draining;
                held.draining_since = Some(at);
            }
            (PortStatus::Active | PortStatus::Draining, PortStatus::Closed) => {
                held.status = PortStatus::Closed;
                held.draining_since.get_or_insert(at);
                held.closed_at = Some(at);
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
    pub fn renew(
        &mut self,
        id: PortId,
        ttl: Option<Duration>,
        now: UnixMillis,
    ) -> Result<&Allocation> {
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
        let Some(ttl) = ttl.or(held.ttl) else {
            return Err(PortError::InvalidPortRequest(format!(
                "port {id} has no lease to renew: give --ttl to start one"
            )));
        };
        if ttl.is_zero() {
            return Err(PortError::InvalidPortRequest(
                "a lease TTL of 0 would expire at once: give a positive --ttl".to_owned(),
            ));
        }
        held.ttl = Some(ttl);
        held.lease_expires_at = Some(add_duration(now, ttl));
        Ok(held)
    }

    /// Changes the access control kept with an allocation.
    pub fn set_access(&mut self, id: PortId, access: PortAccessControl) -> Result<&Allocation> {
        let held = self
            .allocations
            .get_mut(&id)
            .ok_or(PortError::NotAllocated(id))?;
        held.access = access;
        Ok(held)
    }

    /// Takes every lifecycle step due at `now`: expired leases go Draining; Draining ports
    /// with no connections (`connections` says how many a port holds) or past the drain
    /// timeout go Closed; Closed ports past quarantine become Available. A port can take
    /// several steps in one call (with no connections and no quarantine it is freed at once).
    pub fn tick(
        &mut self,
        now: UnixMillis,
        connections: impl Fn(PortId) -> u64,
    ) -> Vec<Transition> {
        let mut steps = Vec::new();
        let mut freed = Vec::new();
        for held in self.allocations.values_mut() {
            if held.status == PortStatus::Active
                && held.lease_expires_at.is_some_and(|expiry| now >= expiry)
            {
                held.status = PortStatus::Draining;
                held.draining_since = Some(now);
                steps.push(Transition::LeaseExpired(held.id));
            }
            if held.status == PortStatus::Draining {
                let since = held.draining_since.unwrap_or(now);
                if connections(held.id) == 0 || now >= add_duration(since, self.config.timeout) {
                    held.status = PortStatus::Closed;
                    held.closed_at = Some(now);
                    steps.push(Transition::Closed(held.id));
                }
            }
            if held.status == PortStatus::Closed
                && now >= add_duration(held.closed_at.unwrap_or(now), self.config.quarantine)
            {
                freed.push(held.id);
                steps.push(Transition::Freed(held.id));
            }
        }
        for id in freed {
            self.remove(id);
        }
        steps
    }

    /// When the next timed step is due (lease expiry, drain timeout, end of quarantine);
    /// `None` when nothing is timed. Draining ports also close when their connections end,
    /// which the caller learns by polling.
    #[must_use]
    pub fn next_deadline(&self) -> Option<UnixMillis> {
        self.allocations
            .values()
            .filter_map(|held| match held.status {
                PortStatus::Active => held.lease_expires_at,
                PortStatus::Draining => held
                    .draining_since
                    .map(|since| add_duration(since, self.config.timeout)),
                PortStatus::Closed => held
                    .closed_at
                    .map(|closed| add_duration(closed, self.config.quarantine)),
                PortStatus::Available => None,
            })
            .min()
    }

    /// Whether any port is Draining (its connections must be watched).
    #[must_use]
    pub fn any_draining(&self) -> bool {
        self.allocations
            .values()
            .any(|held| held.status == PortStatus::Draining)
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeSet,
        net::TcpListener,
        sync::{Arc, Mutex},
        time::Duration,
    };

    use super::{AllocationRequest, PortAllocator, Transition};
    use crate::{
        config::PortConfig,
        host::{
            HostError,
            sockets::{Listener, SocketTable},
        },
        manager::{
            error::PortError,
            state::{PortId, PortStatus, Protocol},
        },
    };

    /// Sockets the test says are bound.
    #[derive(Clone, Default)]
    struct FakeSockets(Arc<Mutex<BTreeSet<u16>>>);

    impl SocketTable for FakeSockets {
        fn bound_ports(
            &self,
            _protocol: Protocol,
            range: std::ops::RangeInclusive<u16>,
        ) -> Result<BTreeSet<u16>, HostError> {
            Ok(self
                .0
                .lock()
                .unwrap()
                .iter()
                .copied()
                .filter(|port| range.contains(port))
                .collect())
        }

        fn listeners(
            &self,
            _protocol: Protocol,
            _range: std::ops::RangeInclusive<u16>,
        ) -> Result<Vec<Listener>, HostError> {
            Ok(Vec::new())
        }
    }

    fn config(min: u16, max: u16) -> PortConfig {
        PortConfig {
            min_port: min,
            max_port: max,
            timeout: Duration::from_secs(30),
            quarantine: Duration::from_secs(10),
            ..PortConfig::default()
        }
    }

    fn allocator(config: PortConfig) -> (PortAllocator, FakeSockets) {
        let sockets = FakeSockets::default();
        let allocator = PortAllocator::with_sockets(config, Arc::new(sockets.clone())).unwrap();
        (allocator, sockets)
    }

    fn request(owner: &str, port: Option<u16>) -> AllocationRequest {
        AllocationRequest {
            port,
            ..AllocationRequest::new(owner)
        }
    }

    #[test]
    fn a_specific_port_is_handed_out_once() {
        let (mut allocator, _) = allocator(config(20_000, 20_009));
        let held = allocator
            .allocate_at(request("a", Some(20_005)), 1_000)
            .unwrap();
        assert_eq!(held.id, PortId::new(20_005, Protocol::Tcp));
        assert_eq!(held.status, PortStatus::Active);
        let err = allocator
            .allocate_at(request("b", Some(20_005)), 1_000)
            .unwrap_err();
        assert!(matches!(err, PortError::PortUnavailable { .. }), "{err}");
        assert!(err.to_string().contains("held by a"), "{err}");
        // The same number for UDP is another port.
        let udp = AllocationRequest {
            protocol: Protocol::Udp,
            ..request("b", Some(20_005))
        };
        assert_eq!(
            allocator.allocate_at(udp, 1_000).unwrap().id.protocol,
            Protocol::Udp
        );
    }

    #[test]
    fn out_of_range_and_reserved_ports_are_refused() {
        let (mut allocator, _) = allocator(PortConfig {
            reserved_ports: vec![20_003],
            ..config(20_000, 20_009)
        });
        let err = allocator
            .allocate_at(request("a", Some(19_999)), 0)
            .unwrap_err();
        assert!(matches!(err, PortError::InvalidPortRequest(_)), "{err}");
        assert!(
            err.to_string()
                .contains("outside the managed range 20000-20009")
        );
        let err = allocator
            .allocate_at(request("a", Some(20_003)), 0)
            .unwrap_err();
        assert!(err.to_string().contains("reserved"), "{err}");
        // Random allocation never lands on the reserved port.
        let ports: BTreeSet<u16> = (0..9)
            .map(|_| {
                allocator
                    .allocate_at(request("a", None), 0)
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
        let (mut allocator, _) = allocator(config(20_000, 20_003));
        for _ in 0..4 {
            allocator.allocate_at(request("a", None), 0).unwrap();
        }
        let err = allocator.allocate_at(request("a", None), 0).unwrap_err();
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
        let (mut allocator, _) = allocator(PortConfig {
            max_retries: 4,
            ..config(20_000, 29_999)
        });
        for _ in 0..9_900 {
            allocator.allocate_at(request("bulk", None), 0).unwrap();
        }
        assert_eq!(allocator.free_count(Protocol::Tcp), 100);
        // With 1% free, 4 probes mostly miss: the scan must find every remaining port.
        let mut last = BTreeSet::new();
        for _ in 0..100 {
            last.insert(
                allocator
                    .allocate_at(request("tail", None), 0)
                    .unwrap()
                    .id
                    .port,
            );
        }
        assert_eq!(last.len(), 100);
        assert!(matches!(
            allocator.allocate_at(request("x", None), 0),
            Err(PortError::RangeExhausted { .. })
        ));
    }

    #[test]
    fn a_bound_port_is_skipped() {
        let (mut allocator, sockets) = allocator(config(20_000, 20_002));
        sockets.0.lock().unwrap().extend([20_000, 20_002]);
        let err = allocator
            .allocate_at(request("a", Some(20_000)), 0)
            .unwrap_err();
        assert!(err.to_string().contains("already bound"), "{err}");
        for _ in 0..3 {
            // Only 20001 is neither allocated nor bound.
            let held = allocator.allocate_at(request("a", None), 0);
            if let Ok(held) = held {
                assert_eq!(held.id.port, 20_001);
            } else {
                assert!(matches!(held, Err(PortError::RangeExhausted { .. })));
            }
        }
    }

    #[test]
    fn a_port_bound_by_a_real_socket_is_skipped() {
        // A real listener, seen through procfs.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut allocator = PortAllocator::with_config(config(port, port)).unwrap();
        let err = allocator
            .allocate_at(request("a", Some(port)), 0)
            .unwrap_err();
        assert!(err.to_string().contains("already bound"), "{err}");
        let err = allocator.allocate_at(request("a", None), 0).unwrap_err();
        assert!(matches!(err, PortError::RangeExhausted { .. }), "{err}");
    }

    #[test]
    fn leases_expire_into_draining_and_renew_pushes_them_out() {
        let (mut allocator, _) = allocator(config(20_000, 20_009));
        let held = allocator
            .allocate_at(
                AllocationRequest {
                    ttl: Some(Duration::from_secs(5)),
                    ..request("a", Some(20_001))
                },
                1_000,
            )
            .unwrap();
        assert_eq!(held.lease_expires_at, Some(6_000));
        assert_eq!(allocator.next_deadline(), Some(6_000));
        allocator.renew(held.id, None, 4_000).unwrap();
        assert_eq!(
            allocator.allocation(held.id).unwrap().lease_expires_at,
            Some(9_000)
        );
        assert!(allocator.tick(8_999, |_| 1).is_empty());
        // Expired with a connection open: Draining, not yet Closed.
        assert_eq!(
            allocator.tick(9_000, |_| 1),
            vec![Transition::LeaseExpired(held.id)]
        );
        assert_eq!(allocator.get_state(held.id).status, PortStatus::Draining);
        let err = allocator.renew(held.id, None, 9_001).unwrap_err();
        assert!(err.to_string().contains("cannot be renewed"), "{err}");
        // A port without a lease has nothing to renew.
        let plain = allocator.allocate_at(request("b", None), 0).unwrap();
        assert!(allocator.renew(plain.id, None, 0).is_err());
        assert!(
            allocator
                .renew(plain.id, Some(Duration::from_secs(1)), 0)
                .is_ok()
        );
    }

    #[test]
    fn the_lifecycle_runs_active_draining_closed_quarantine_available() {
        let (mut allocator, _) = allocator(config(20_000, 20_000));
        let id = allocator.allocate_at(request("a", None), 0).unwrap().id;
        allocator
            .set_status_at(id, PortStatus::Draining, 1_000)
            .unwrap();
        // One connection open: stays Draining until the drain timeout (30 s).
        assert!(allocator.tick(2_000, |_| 1).is_empty());
        assert_eq!(allocator.tick(31_000, |_| 1), vec![Transition::Closed(id)]);
        assert_eq!(allocator.get_state(id).status, PortStatus::Closed);
        // Quarantine (10 s): not free yet, and not allocatable.
        assert!(allocator.tick(40_999, |_| 0).is_empty());
        assert!(allocator.allocate_at(request("b", None), 40_999).is_err());
        let err = allocator
            .allocate_at(request("b", Some(20_000)), 40_999)
            .unwrap_err();
        assert!(err.to_string().contains("quarantine"), "{err}");
        assert_eq!(allocator.tick(41_000, |_| 0), vec![Transition::Freed(id)]);
        assert_eq!(allocator.get_state(id).status, PortStatus::Available);
        let again = allocator.allocate_at(request("b", None), 41_000).unwrap();
        assert_eq!(again.id, id);
        assert_eq!(again.owner.name, "b");
    }

    #[test]
    fn draining_closes_when_the_last_connection_ends() {
        let (mut allocator, _) = allocator(PortConfig {
            quarantine: Duration::ZERO,
            ..config(20_000, 20_000)
        });
        let id = allocator.allocate_at(request("a", None), 0).unwrap().id;
        allocator
            .set_status_at(id, PortStatus::Draining, 0)
            .unwrap();
        assert!(allocator.tick(100, |_| 2).is_empty());
        // No connections and no quarantine: closed and freed in one step.
        assert_eq!(
            allocator.tick(200, |_| 0),
            vec![Transition::Closed(id), Transition::Freed(id)]
        );
        assert_eq!(allocator.free_count(Protocol::Tcp), 1);
    }

    #[test]
    fn a_closed_port_is_not_reopened() {
        let (mut allocator, _) = allocator(config(20_000, 20_000));
        let id = allocator.allocate_at(request("a", None), 0).unwrap().id;
        allocator.set_status_at(id, PortStatus::Closed, 0).unwrap();
        let err = allocator
            .set_status_at(id, PortStatus::Active, 1)
            .unwrap_err();
        assert!(err.to_string().contains("cannot go active"), "{err}");
    }

    #[test]
    fn requests_are_checked() {
        let (mut allocator, _) = allocator(config(20_000, 20_009));
        let err = allocator.allocate_at(request(" ", None), 0).unwrap_err();
        assert!(err.to_string().contains("owner name is empty"), "{err}");
        let err = allocator
            .allocate_at(
                AllocationRequest {
                    ttl: Some(Duration::ZERO),
                    ..request("a", None)
                },
                0,
            )
            .unwrap_err();
        assert!(err.to_string().contains("TTL of 0"), "{err}");
        assert_eq!(allocator.free_count(Protocol::Tcp), 10);
    }

    #[test]
    fn the_specification_shapes_work_as_written() {
        let mut allocator = PortAllocator::new(20_000..=20_009).unwrap();
        let held = allocator.allocate("svc").unwrap();
        assert_eq!(
            allocator.get_state(held.id.port).owner.as_deref(),
            Some("svc")
        );
        allocator
            .set_status(held.id.port, PortStatus::Draining)
            .unwrap();
        assert_eq!(
            allocator.get_state(held.id.port).status,
            PortStatus::Draining
        );
        allocator
            .set_status(held.id.port, PortStatus::Available)
            .unwrap();
        assert_eq!(
            allocator.get_state(held.id.port).status,
            PortStatus::Available
        );
    }
}
