//! The specification's API, in the specification's names: one thin facade over the
//! manager's operations, kept in this one place so that a reader never has to guess which
//! of two methods is the real one. Inside portgate, call the operations.

use std::{net::IpAddr, ops::RangeInclusive, sync::Arc};

use super::{
    Actor, PortAllocator, PortManager, PortSecurity, bound_for,
    error::{PortError, Result},
};
use crate::{
    config::PortConfig,
    host::sockets::ProcfsSockets,
    model::{
        Allocation, AllocationRequest, PortAccessControl, PortId, PortMetrics, PortState,
        PortStatus, now_millis,
    },
    store::{MemoryStore, StoredState},
};

impl PortManager {
    /// A manager over `config`'s range with an in-memory store and no kernel gate (the
    /// userspace verdict only), reading this host's live sockets.
    pub fn new(config: PortConfig) -> Result<Self> {
        Self::open(
            config,
            Arc::new(MemoryStore::default()),
            StoredState::default(),
            None,
            Arc::new(ProcfsSockets),
        )
        .map(|(manager, _)| manager)
    }

    /// Any free port (or the one asked for) for `owner`, allocated by the manager itself.
    pub async fn allocate_port(&self, owner: impl Into<AllocationRequest>) -> Result<u16> {
        Ok(self.allocate(owner.into(), Actor::Admin).await?.id.port)
    }

    /// The port goes Draining (established connections continue), then Closed, then
    /// Available after quarantine.
    pub async fn release_port(&self, port: impl Into<PortId>) -> Result<()> {
        self.release(port.into(), Actor::Admin).await.map(drop)
    }

    /// Replaces a port's access control.
    pub async fn set_access_control(
        &self,
        port: impl Into<PortId>,
        access: PortAccessControl,
    ) -> Result<Allocation> {
        let id = port.into();
        PortSecurity::check_access_control(id.protocol, &access)?;
        self.change(id, Actor::Admin, |allocator, _, _| {
            allocator.set_access(id, access)
        })
        .await
    }

    /// `Ok` when a new connection from `addr` would get in now, otherwise why not (the
    /// kernel's verdict, with its live connection count when the gate is there).
    pub async fn validate_connection(&self, port: impl Into<PortId>, addr: IpAddr) -> Result<()> {
        self.refusal(port.into(), addr)
            .await
            .map_or(Ok(()), |(_, err)| Err(err))
    }

    /// A port's counters (zero without the gate).
    pub async fn get_metrics(&self, port: impl Into<PortId>) -> Result<PortMetrics> {
        let id = port.into();
        let state = self.state.lock().await;
        let Some(gate) = state.gate.as_ref() else {
            return Ok(PortMetrics::default());
        };
        let counters = gate.counters(id).map_err(PortError::counters)?;
        Ok(counters.metrics(state.connections(id)))
    }

    /// A port's state, with its live connections.
    pub async fn get_state(&self, port: impl Into<PortId>) -> PortState {
        let id = port.into();
        let state = self.state.lock().await;
        let mut port_state = state.allocator.get_state(id);
        port_state.connections = state.connections(id);
        port_state
    }
}

impl PortAllocator {
    /// An allocator over `range` with the other settings at their defaults.
    pub fn new(range: RangeInclusive<u16>) -> Result<Self> {
        Self::from_config(PortConfig {
            min_port: *range.start(),
            max_port: *range.end(),
            ..PortConfig::default()
        })
    }

    /// Allocates a port now, skipping ports that have a live socket on this host.
    pub fn allocate(&mut self, request: impl Into<AllocationRequest>) -> Result<Allocation> {
        let request = request.into();
        let bound = bound_for(&ProcfsSockets, self.range(), &request)?;
        self.claim(request, now_millis(), &bound)
    }

    /// Moves a port to `status` now (see [`PortAllocator::set_status_at`]).
    pub fn set_status(&mut self, port: impl Into<PortId>, status: PortStatus) -> Result<()> {
        self.set_status_at(port.into(), status, now_millis())
    }

    /// A port's state (`connections` is filled in by the manager).
    #[must_use]
    pub fn get_state(&self, port: impl Into<PortId>) -> PortState {
        let id = port.into();
        let held = self.allocation(id);
        PortState {
            port: id,
            status: held.map_or(PortStatus::Available, |held| held.status),
            allocated_at: held.map(|held| held.timeline.allocated_at),
            owner: held.map(|held| held.owner.name.clone()),
            connections: 0,
        }
    }
}

impl PortSecurity {
    /// Access control for every port, none set yet.
    #[must_use]
    pub fn new() -> Self {
        Self::managing(1, u16::MAX)
    }

    /// Sets a port's access control (an Active port when it had no policy).
    pub fn set_access_control(&mut self, port: impl Into<PortId>, access: PortAccessControl) {
        let id = port.into();
        let mut policy = self.policy(id).cloned().unwrap_or_default();
        policy.access = access;
        self.set_policy(id, Some(policy));
    }

    /// `Ok` when a new connection from `addr` would get in, otherwise the error saying why
    /// (the kernel's drop reason), counting no open connections.
    pub fn validate_connection(&self, port: impl Into<PortId>, addr: IpAddr) -> Result<()> {
        self.refusal(port.into(), addr, 0)
            .map_or(Ok(()), |(_, err)| Err(err))
    }
}

impl Default for PortSecurity {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    #[tokio::test]
    async fn the_manager_api_allocates_validates_and_releases() {
        let manager = PortManager::new(PortConfig {
            min_port: 40_000,
            max_port: 40_099,
            quarantine: std::time::Duration::ZERO,
            ..PortConfig::default()
        })
        .unwrap();
        let port = manager.allocate_port("web").await.unwrap();
        assert!((40_000..=40_099).contains(&port));
        assert_eq!(manager.get_state(port).await.status, PortStatus::Active);
        let ip = |text: &str| -> IpAddr { text.parse().unwrap() };
        manager
            .validate_connection(port, ip("10.0.0.1"))
            .await
            .unwrap();
        manager
            .set_access_control(
                port,
                PortAccessControl {
                    allowed_ips: ["10.0.0.0/24".parse().unwrap()].into_iter().collect(),
                    max_connections: 1,
                    require_authentication: false,
                },
            )
            .await
            .unwrap();
        manager
            .validate_connection(port, ip("10.0.0.7"))
            .await
            .unwrap();
        let err = manager
            .validate_connection(port, ip("10.0.1.7"))
            .await
            .unwrap_err();
        assert!(matches!(err, PortError::AccessDenied(_)), "{err}");
        assert_eq!(manager.get_metrics(port).await.unwrap().accepted, 0);
        manager.release_port(port).await.unwrap();
        let err = manager
            .validate_connection(port, ip("10.0.0.7"))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("draining"), "{err}");
        // No connections and no quarantine: the next tick frees it.
        manager.tick().await.unwrap();
        assert_eq!(manager.get_state(port).await.status, PortStatus::Available);
        let err = manager
            .validate_connection(port, ip("10.0.0.7"))
            .await
            .unwrap_err();
        assert!(matches!(err, PortError::NotAllocated(_)), "{err}");
    }

    #[test]
    fn the_allocator_api_allocates_and_moves_a_port_through_its_lifecycle() {
        let mut allocator = PortAllocator::new(20_000..=20_009).unwrap();
        let held = allocator.allocate("svc").unwrap();
        let port = held.id.port;
        assert_eq!(allocator.get_state(port).owner.as_deref(), Some("svc"));
        allocator.set_status(port, PortStatus::Draining).unwrap();
        assert_eq!(allocator.get_state(port).status, PortStatus::Draining);
        allocator.set_status(port, PortStatus::Available).unwrap();
        assert_eq!(allocator.get_state(port).status, PortStatus::Available);
    }

    #[test]
    fn the_allocator_api_skips_a_port_bound_by_a_real_socket() {
        // A real listener, seen through procfs.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut allocator = PortAllocator::new(port..=port).unwrap();
        let err = allocator
            .allocate(AllocationRequest {
                port: Some(port),
                ..AllocationRequest::new("a")
            })
            .unwrap_err();
        assert!(err.to_string().contains("already bound"), "{err}");
        let err = allocator.allocate("a").unwrap_err();
        assert!(matches!(err, PortError::RangeExhausted { .. }), "{err}");
    }

    #[test]
    fn the_security_api_validates_against_the_access_control() {
        let mut security = PortSecurity::new();
        let id = PortId::from(20_000);
        security.set_access_control(
            id,
            PortAccessControl {
                allowed_ips: ["192.0.2.0/24".parse().unwrap()].into_iter().collect(),
                ..PortAccessControl::default()
            },
        );
        security
            .validate_connection(id, "192.0.2.9".parse().unwrap())
            .unwrap();
        let err = security
            .validate_connection(id, "198.51.100.9".parse().unwrap())
            .unwrap_err();
        assert!(matches!(err, PortError::AccessDenied(_)), "{err}");
    }
}
