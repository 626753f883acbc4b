//! The specification's port manager: [`PortManager`] = [`PortAllocator`] + [`PortSecurity`]
//! + [`PortMonitor`] + a durable [`Store`], driving the kernel [`Gate`] when it has one.
//!
//! Every change follows one path: it is made in memory, pushed to the kernel maps, then
//! submitted to the store; it is acknowledged (the call returns) only once the store says it
//! is durable. A change the kernel or the store refuses is undone in memory and in the kernel,
//! so nothing is half-applied. Without a gate (no privileges, unit tests) the same verdict
//! runs in userspace ([`PortSecurity::validate_connection`]).

pub mod allocator;
pub mod error;
pub mod monitor;
pub mod security;
pub mod state;

use std::{
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

pub use self::{
    allocator::{AllocationRequest, PortAllocator, Transition},
    error::{ErrorCategory, PortError, Result},
    monitor::{PortMetrics, PortMonitor, PortsSnapshot},
    security::{MAX_ALLOWED_IPS, PortSecurity},
    state::{
        Allocation, Owner, OwnerCgroupRef, PortAccessControl, PortId, PortState, PortStatus,
        Protocol, UnixMillis, now_millis,
    },
};
use crate::{
    config::PortConfig,
    gate::Gate,
    host::{
        self,
        sockets::{Listener, ProcfsSockets, SocketTable},
    },
    policy::Allowlist,
    report::{self, PortReport},
    store::{Change, MemoryStore, Store},
};

/// Who is asking: the manager checks that users change only what they allocated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Actor {
    /// root, a member of the admin group, or the daemon itself: may do everything.
    Admin,
    /// Any other local user (by uid): may allocate, and change or release its own ports.
    User(u32),
}

impl Actor {
    /// The uid recorded as an allocation's maker.
    #[must_use]
    pub const fn uid(self) -> Option<u32> {
        match self {
            Self::Admin => None,
            Self::User(uid) => Some(uid),
        }
    }
}

/// A change to a port's access control; what is `None` stays as it is.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AccessChange {
    /// Prefixes to add to the allowlist.
    pub allow: Vec<IpNet>,
    /// Prefixes to take out of the allowlist.
    pub remove: Vec<IpNet>,
    /// A new connection limit (0 is unlimited). `max_conns` is accepted too, as in an
    /// allocation request.
    #[serde(alias = "max_conns")]
    pub max_connections: Option<u32>,
    /// Whether new connections need a grant. `require_auth` is accepted too.
    #[serde(alias = "require_auth")]
    pub require_authentication: Option<bool>,
}

/// What was found at start-up.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartReport {
    /// Allocations read from the store.
    pub restored: usize,
    /// Kernel policies that no allocation explained, removed.
    pub stale_policies_removed: usize,
    /// Listeners on managed ports that no allocation explains.
    pub unexplained_listeners: Vec<Listener>,
}

/// The parts a change touches, under one lock so that memory, kernel and the order of
/// store submissions agree.
struct Parts {
    port_allocator: PortAllocator,
    security: PortSecurity,
    gate: Option<Gate>,
}

/// How often expired authentication grants are swept out of the kernel map.
pub const GRANT_SWEEP_PERIOD: Duration = Duration::from_secs(10);

/// The port manager.
pub struct PortManager {
    parts: Mutex<Parts>,
    monitor: PortMonitor,
    store: Arc<dyn Store>,
    sockets: Arc<dyn SocketTable>,
    config: PortConfig,
    /// Set when the store refused a change: memory and kernel may then hold what the
    /// store does not, so every later change is refused until a restart reconciles them.
    store_failed: AtomicBool,
    last_grant_sweep: std::sync::Mutex<Instant>,
}

impl PortManager {
    /// The specification's constructor: a manager over `config`'s range with an in-memory
    /// store and no kernel gate (userspace verdict only).
    pub fn new(config: PortConfig) -> Result<Self> {
        Self::open(
            config,
            Arc::new(MemoryStore::default()),
            None,
            Box::new(ProcfsSockets),
        )
        .map(|(manager, _)| manager)
    }

    /// A manager over `config`'s range, with what `store` holds, driving `gate` when given:
    /// the kernel maps are made equal to the store (policies the store does not explain
    /// are removed).
    pub fn open(
        config: PortConfig,
        store: Arc<dyn Store>,
        mut gate: Option<Gate>,
        sockets: Box<dyn SocketTable>,
    ) -> Result<(Self, StartReport)> {
        let sockets: Arc<dyn SocketTable> = Arc::from(sockets);
        let mut port_allocator = PortAllocator::with_sockets(config.clone(), Arc::clone(&sockets))?;
        let mut security = PortSecurity::with_range(config.min_port, config.max_port);
        let stored = store
            .load()
            .map_err(|err| PortError::StateTracking(err.to_string()))?;
        let mut report = StartReport {
            restored: stored.allocations.len(),
            ..StartReport::default()
        };
        for allocation in &stored.allocations {
            security.set_policy(allocation.id, allocation.policy());
        }
        restore_stored(&mut port_allocator, stored.allocations)?;
        if let Some(gate) = gate.as_mut() {
            // Anything in the kernel that no stored allocation explains goes: policies,
            // allowlists and grants of an allocation whose commit never finished.
            let grants = gate.grants()?;
            let mut stale: std::collections::BTreeSet<(u16, Protocol)> =
                gate.policies()?.into_keys().collect();
            stale.extend(gate.allowlists()?.into_keys());
            stale.extend(grants.iter().map(|grant| (grant.port, grant.protocol)));
            for (port, protocol) in stale {
                if port_allocator
                    .allocation(PortId::new(port, protocol))
                    .is_none()
                {
                    gate.remove_policy(port, protocol)?;
                    report.stale_policies_removed += 1;
                }
            }
            // Grants live in the kernel only; the mirror must know those that stayed (of
            // allocated ports) for `check`.
            for grant in grants {
                let id = PortId::new(grant.port, grant.protocol);
                if port_allocator.allocation(id).is_some() {
                    security.add_grant(id, grant.addr, grant.expires_ns);
                }
            }
            for allocation in port_allocator.allocations() {
                gate.set_policy(
                    allocation.id.port,
                    allocation.id.protocol,
                    &allocation.policy(),
                )?;
            }
        }
        for protocol in Protocol::ALL {
            let listeners = sockets
                .listeners(protocol, port_allocator.range())
                .map_err(|err| PortError::ResourceMonitoring(err.to_string()))?;
            report
                .unexplained_listeners
                .extend(listeners.into_iter().filter(|listener| {
                    port_allocator
                        .allocation(PortId::new(listener.port, protocol))
                        .is_none()
                }));
        }
        let manager = Self {
            parts: Mutex::new(Parts {
                port_allocator,
                security,
                gate,
            }),
            monitor: PortMonitor::new(),
            store,
            sockets,
            config,
            store_failed: AtomicBool::new(false),
            last_grant_sweep: std::sync::Mutex::new(Instant::now()),
        };
        Ok((manager, report))
    }

    /// The configuration.
    #[must_use]
    pub const fn config(&self) -> &PortConfig {
        &self.config
    }

    /// The monitor (metrics and events).
    #[must_use]
    pub const fn monitor(&self) -> &PortMonitor {
        &self.monitor
    }

    /// The store.
    #[must_use]
    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    /// The specification's `allocate_port`: any free port (or the one asked for) for
    /// `owner`, made by the manager itself.
    pub async fn allocate_port(&self, owner: impl Into<AllocationRequest>) -> Result<u16> {
        Ok(self.allocate(owner.into(), Actor::Admin).await?.id.port)
    }

    /// Allocates a port for `actor` (recorded as its maker).
    pub async fn allocate(
        &self,
        mut request: AllocationRequest,
        actor: Actor,
    ) -> Result<Allocation> {
        PortSecurity::check_access_control(&request.access)?;
        self.check_store()?;
        request.owner.uid = actor.uid();
        // The socket tables take milliseconds to read: not under the lock, and not on an
        // async worker (a snapshot still fresh is taken as it is, without a thread hop).
        let range = self.config.min_port..=self.config.max_port;
        let fresh = match request.port {
            None => self.sockets.fresh(request.protocol, range.clone()),
            Some(_) => None,
        };
        let bound = if let Some(bound) = fresh {
            bound
        } else {
            let sockets = Arc::clone(&self.sockets);
            let probe = request.clone();
            tokio::task::spawn_blocking(move || {
                allocator::bound_for(sockets.as_ref(), range, &probe)
            })
            .await
            .map_err(|err| {
                PortError::ResourceMonitoring(format!("reading the socket tables: {err}"))
            })??
        };
        let commit = {
            let mut parts = self.parts.lock().await;
            // Again under the lock: a request queued behind a failed commit must not pass.
            self.check_store()?;
            if let (Actor::User(uid), max) = (actor, self.config.max_ports_per_user)
                && max > 0
            {
                let held = parts
                    .port_allocator
                    .allocations()
                    .filter(|held| held.owner.uid == Some(uid))
                    .count();
                if held >= usize::try_from(max).unwrap_or(usize::MAX) {
                    return Err(PortError::PolicyViolation(format!(
                        "uid {uid} holds {held} ports (draining and quarantined ones count), the most one user may ([ports] max_ports_per_user = {max}): release some and let them drain and pass quarantine"
                    )));
                }
            }
            if let Actor::User(uid) = actor {
                check_prefix_budget(
                    &parts.port_allocator,
                    uid,
                    None,
                    request.access.allowed_ips.len(),
                )?;
            }
            let allocation = parts
                .port_allocator
                .allocate_with(request, now_millis(), &bound)?;
            let id = allocation.id;
            if let Err(err) = push(&mut parts, id, Some(&allocation)) {
                parts.port_allocator.remove(id);
                let _undone = push(&mut parts, id, None);
                return Err(err);
            }
            let commit = self.store.submit(vec![Change::Put(allocation.clone())]);
            (allocation, commit)
        };
        let (allocation, commit) = commit;
        if let Err(err) = commit.wait().await {
            self.undo(allocation.id, &allocation, None).await;
            return Err(PortError::StateTracking(format!(
                "the allocation of {} was not saved ({err}); nothing was allocated. {STORE_ADVICE}",
                allocation.id
            )));
        }
        self.monitor.record_allocation();
        Ok(allocation)
    }

    /// The specification's `release_port`: the port goes Draining (established connections
    /// continue), then Closed, then Available after quarantine.
    pub async fn release_port(&self, port: impl Into<PortId>) -> Result<()> {
        self.release(port.into(), Actor::Admin).await.map(|_| ())
    }

    /// Releases a port for `actor`.
    pub async fn release(&self, id: PortId, actor: Actor) -> Result<Allocation> {
        self.change(id, actor, |allocator, now| {
            let status = allocator.allocation(id).map(|held| held.status);
            if status == Some(PortStatus::Active) {
                allocator.set_status_at(id, PortStatus::Draining, now)?;
            }
            Ok(())
        })
        .await
    }

    /// Drains a port: no new connections, established ones continue; it is then closed and
    /// freed as after a release.
    pub async fn drain(&self, id: PortId, actor: Actor) -> Result<Allocation> {
        self.release(id, actor).await
    }

    /// Renews a port's lease for `ttl` (or the TTL it was given).
    pub async fn renew(
        &self,
        id: PortId,
        ttl: Option<Duration>,
        actor: Actor,
    ) -> Result<Allocation> {
        self.change(id, actor, |allocator, now| {
            allocator.renew(id, ttl, now).map(|_| ())
        })
        .await
    }

    /// Changes a port's access control.
    pub async fn set_access(
        &self,
        id: PortId,
        change: AccessChange,
        actor: Actor,
    ) -> Result<Allocation> {
        // Everything that does not need the allocation is done before the lock is taken;
        // under it, the merge is one pass over the allowlist.
        let removed: Allowlist = change.remove.iter().copied().collect();
        let added: Allowlist = change.allow.iter().copied().collect();
        self.change(id, actor, |allocator, _| {
            let held = allocator
                .allocation(id)
                .ok_or(PortError::NotAllocated(id))?;
            if let Some(absent) = removed
                .iter()
                .find(|prefix| !held.access.allowed_ips.contains(prefix))
            {
                return Err(PortError::InvalidPortRequest(format!(
                    "{absent} is not in the allowlist of {id}: see `portgate show {}`",
                    id.port
                )));
            }
            let mut access = held.access.clone();
            access
                .allowed_ips
                .retain(|prefix| !removed.contains(prefix));
            access.allowed_ips.extend(added.iter().copied());
            if let Some(max) = change.max_connections {
                access.max_connections = max;
            }
            if let Some(required) = change.require_authentication {
                access.require_authentication = required;
            }
            PortSecurity::check_access_control(&access)?;
            if let Actor::User(uid) = actor {
                check_prefix_budget(allocator, uid, Some(id), access.allowed_ips.len())?;
            }
            allocator.set_access(id, access).map(|_| ())
        })
        .await
    }

    /// The specification's `PortSecurity::set_access_control` through the manager: replaces
    /// a port's access control.
    pub async fn set_access_control(
        &self,
        port: impl Into<PortId>,
        access: PortAccessControl,
    ) -> Result<Allocation> {
        let id = port.into();
        PortSecurity::check_access_control(&access)?;
        self.change(id, Actor::Admin, |allocator, _| {
            allocator.set_access(id, access).map(|_| ())
        })
        .await
    }

    /// Grants `addr` on a port that requires authentication, for `ttl`. Grants live in the
    /// kernel (and its userspace mirror) only: they are short-lived by design and are not
    /// kept in the store.
    pub async fn grant(&self, id: PortId, addr: IpAddr, ttl: Duration, actor: Actor) -> Result<()> {
        if ttl.is_zero() || ttl > security::MAX_GRANT_TTL {
            return Err(PortError::InvalidPortRequest(format!(
                "a grant of {} is out of bounds: give a --ttl above 0 and at most {}",
                humantime::format_duration(ttl),
                humantime::format_duration(security::MAX_GRANT_TTL)
            )));
        }
        self.check_store()?;
        let mut parts = self.parts.lock().await;
        self.check_store()?;
        let held = parts
            .port_allocator
            .allocation(id)
            .ok_or(PortError::NotAllocated(id))?;
        authorize(held, actor)?;
        if parts.security.grant_count(id) >= security::MAX_GRANTS_PER_PORT {
            return Err(PortError::PolicyViolation(format!(
                "{id} holds {} grants, the most a port may: wait for some to expire (expired grants are swept every {}s)",
                security::MAX_GRANTS_PER_PORT,
                GRANT_SWEEP_PERIOD.as_secs()
            )));
        }
        let expires_ns = host::kernel::monotonic_now_ns()
            .saturating_add(u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX));
        if let Some(gate) = parts.gate.as_mut() {
            gate.add_grant(id.port, id.protocol, addr, expires_ns)?;
        }
        parts.security.add_grant(id, addr, expires_ns);
        Ok(())
    }

    /// The specification's `validate_connection`: `Ok` when a new connection from `addr`
    /// would get in now, otherwise why not (the kernel's verdict, with its live connection
    /// count when the gate is there).
    pub async fn validate_connection(&self, port: impl Into<PortId>, addr: IpAddr) -> Result<()> {
        self.refusal(port, addr)
            .await
            .map_or(Ok(()), |(_, err)| Err(err))
    }

    /// Why a new connection from `addr` would be refused now (the kernel's drop reason and
    /// the error saying it), `None` when it gets in.
    pub async fn refusal(
        &self,
        port: impl Into<PortId>,
        addr: IpAddr,
    ) -> Option<(crate::policy::DropReason, PortError)> {
        let id = port.into();
        let parts = self.parts.lock().await;
        let connections = slots(parts.gate.as_ref(), id);
        parts.security.refusal(id, addr, connections)
    }

    /// The specification's `get_metrics`: a port's counters (zero without the gate).
    pub async fn get_metrics(&self, port: impl Into<PortId>) -> Result<PortMetrics> {
        let id = port.into();
        let parts = self.parts.lock().await;
        metrics_of(parts.gate.as_ref(), id)
    }

    /// The specification's `get_state`, with live connections.
    pub async fn get_state(&self, port: impl Into<PortId>) -> PortState {
        let id = port.into();
        let parts = self.parts.lock().await;
        let mut state = parts.port_allocator.get_state(id);
        state.connections = connections(parts.gate.as_ref(), id);
        state
    }

    /// The allocation of a port.
    pub async fn allocation(&self, id: PortId) -> Option<Allocation> {
        self.parts
            .lock()
            .await
            .port_allocator
            .allocation(id)
            .cloned()
    }

    /// Every allocation with its live connections.
    pub async fn allocations(&self) -> Vec<(Allocation, u64)> {
        let parts = self.parts.lock().await;
        let established = self.all_established(parts.gate.as_ref());
        parts
            .port_allocator
            .allocations()
            .map(|held| (held.clone(), established.get(held.id)))
            .collect()
    }

    /// Established connections of every TCP port in the range, in one read of the slots
    /// map (none without the gate, or when it cannot be read).
    fn all_established(&self, gate: Option<&Gate>) -> Established {
        let range = self.config.min_port..=self.config.max_port;
        Established(
            gate.and_then(|gate| gate.all_slots(range).ok())
                .unwrap_or_default(),
        )
    }

    /// Counters and policy of every port (what `portgate maps` shows), from the kernel;
    /// without the gate, the allocations with zero counters.
    pub async fn reports(&self) -> Result<Vec<PortReport>> {
        let parts = self.parts.lock().await;
        if let Some(gate) = parts.gate.as_ref() {
            return report::port_reports(gate)
                .map_err(|err| PortError::MetricCollection(err.to_string()));
        }
        Ok(parts
            .port_allocator
            .allocations()
            .map(uncounted_report)
            .collect())
    }

    /// One port's report (`GET /v1/stats?port=`), without walking every map: the kernel's
    /// policy record, counters, active connections and grants of that port, with the
    /// allowlist as the manager wrote it (reading one port's prefixes back from the trie
    /// would walk the whole trie). `None` when the port has neither a policy nor counters.
    pub async fn report(&self, id: PortId) -> Result<Option<PortReport>> {
        let parts = self.parts.lock().await;
        let held = parts.port_allocator.allocation(id);
        let Some(gate) = parts.gate.as_ref() else {
            return Ok(held.map(uncounted_report));
        };
        let allow = held.map(|held| held.access.allowed_ips.iter().copied().collect());
        report::port_report(gate, id.port, id.protocol, allow.unwrap_or_default())
            .map_err(|err| PortError::MetricCollection(err.to_string()))
    }

    /// Ports that can be allocated now, per protocol (live sockets not counted).
    pub async fn free_ports(&self) -> Vec<(Protocol, u64)> {
        let parts = self.parts.lock().await;
        Protocol::ALL
            .iter()
            .map(|&protocol| {
                let free = parts.port_allocator.free_count(protocol);
                (protocol, u64::try_from(free).unwrap_or(u64::MAX))
            })
            .collect()
    }

    /// The kernel attachments (link pin names), empty without the gate.
    pub async fn attachments(&self) -> Result<Vec<String>> {
        let parts = self.parts.lock().await;
        match parts.gate.as_ref() {
            Some(gate) => Ok(gate.attachments()?),
            None => Ok(Vec::new()),
        }
    }

    /// Whether the manager drives the kernel gate.
    pub async fn has_gate(&self) -> bool {
        self.parts.lock().await.gate.is_some()
    }

    /// The Prometheus text exposition.
    pub async fn metrics_text(&self) -> Result<String> {
        let snapshot = {
            let parts = self.parts.lock().await;
            let mut snapshot = PortsSnapshot::default();
            let mut counted = match parts.gate.as_ref() {
                Some(gate) => gate
                    .all_counters()
                    .map_err(|err| PortError::MetricCollection(err.to_string()))?,
                None => std::collections::BTreeMap::new(),
            };
            let established = self.all_established(parts.gate.as_ref());
            for held in parts.port_allocator.allocations() {
                let counters = counted
                    .remove(&(held.id.port, held.id.protocol))
                    .unwrap_or_default();
                let active = established.get(held.id);
                snapshot
                    .ports
                    .push((held.id, held.status, PortMetrics::new(&counters, active)));
            }
            // Ports without an allocation that were knocked on (scans): one total per
            // protocol, not a series per port a scanner tried.
            let mut unallocated = [0_u64; 2];
            for ((_, protocol), counters) in counted {
                let slot = usize::from(protocol == Protocol::Udp);
                unallocated[slot] += counters
                    .total
                    .dropped_for(portgate_common::reason::UNALLOCATED);
            }
            snapshot.unallocated_drops = vec![
                (Protocol::Tcp, unallocated[0]),
                (Protocol::Udp, unallocated[1]),
            ];
            for protocol in Protocol::ALL {
                let free = parts.port_allocator.free_count(protocol);
                snapshot
                    .free
                    .push((protocol, u64::try_from(free).unwrap_or(u64::MAX)));
            }
            if let Some(gate) = parts.gate.as_ref() {
                let stats = gate
                    .stats()
                    .map_err(|err| PortError::MetricCollection(err.to_string()))?;
                snapshot.events_lost_full = stats.events_lost_full;
                snapshot.events_rate_limited = stats.events_rate_limited;
            }
            snapshot
        };
        self.monitor
            .encode(snapshot)
            .map_err(|err| PortError::MetricCollection(err.to_string()))
    }

    /// Takes every lifecycle step due now (lease expiry, drain end, quarantine end), in
    /// memory, kernel and store; returns them once they are durable.
    pub async fn tick(&self) -> Result<Vec<Transition>> {
        let sweep_due = {
            let mut last = self
                .last_grant_sweep
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let due = last.elapsed() >= GRANT_SWEEP_PERIOD;
            if due {
                *last = Instant::now();
            }
            due
        };
        if sweep_due && let Err(err) = self.sweep_grants().await {
            log::error!("sweeping expired grants: {err}");
        }
        let (steps, commit) = {
            let mut parts = self.parts.lock().await;
            let Parts {
                port_allocator,
                gate,
                ..
            } = &mut *parts;
            let gate_ref = gate.as_ref();
            let steps = port_allocator.tick(now_millis(), |id| connections(gate_ref, id));
            if steps.is_empty() {
                return Ok(steps);
            }
            let mut changes = Vec::with_capacity(steps.len());
            let mut touched: Vec<PortId> = steps.iter().map(|step| step.id()).collect();
            touched.dedup();
            for id in touched {
                let record = parts.port_allocator.allocation(id).cloned();
                if let Err(err) = push(&mut parts, id, record.as_ref()) {
                    log::error!("lifecycle step of {id} not applied to the kernel: {err}");
                }
                changes.push(record.map_or(Change::Delete(id), Change::Put));
            }
            (steps, self.store.submit(changes))
        };
        for step in &steps {
            if let Transition::LeaseExpired(_) = step {
                self.monitor.record_lease_expiry();
            }
        }
        if let Err(err) = commit.wait().await {
            self.store_failed.store(true, Ordering::Release);
            return Err(PortError::StateTracking(format!(
                "saving lifecycle steps: {err}. {STORE_ADVICE}"
            )));
        }
        Ok(steps)
    }

    /// Removes expired authentication grants from the kernel map (and the mirror), so that
    /// grants given over time do not fill it. Returns how many went.
    pub async fn sweep_grants(&self) -> Result<usize> {
        let mut parts = self.parts.lock().await;
        let Parts { security, gate, .. } = &mut *parts;
        let Some(gate) = gate.as_mut() else {
            return Ok(0);
        };
        let now = host::kernel::monotonic_now_ns();
        let mut removed = 0;
        for grant in gate.grants()? {
            if grant.expires_ns <= now {
                gate.remove_grant(grant.port, grant.protocol, grant.addr)?;
                security.remove_grant(PortId::new(grant.port, grant.protocol), grant.addr);
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Runs `step` on the allocator for an allocation `actor` may change, then applies the
    /// result to the kernel and the store; undone if either refuses it.
    async fn change(
        &self,
        id: PortId,
        actor: Actor,
        step: impl FnOnce(&mut PortAllocator, UnixMillis) -> Result<()>,
    ) -> Result<Allocation> {
        self.check_store()?;
        let (before, after, commit) = {
            let mut parts = self.parts.lock().await;
            self.check_store()?;
            let before = parts
                .port_allocator
                .allocation(id)
                .cloned()
                .ok_or(PortError::NotAllocated(id))?;
            authorize(&before, actor)?;
            step(&mut parts.port_allocator, now_millis())?;
            let after = parts
                .port_allocator
                .allocation(id)
                .cloned()
                .ok_or(PortError::NotAllocated(id))?;
            if after == before {
                return Ok(after);
            }
            if let Err(err) = push(&mut parts, id, Some(&after)) {
                restore(&mut parts, id, Some(&before));
                return Err(err);
            }
            let commit = self.store.submit(vec![Change::Put(after.clone())]);
            (before, after, commit)
        };
        if let Err(err) = commit.wait().await {
            self.undo(id, &after, Some(before)).await;
            return Err(PortError::StateTracking(format!(
                "the change to {id} was not saved ({err}); it was undone. {STORE_ADVICE}"
            )));
        }
        Ok(after)
    }

    /// Whether the store refused a change: memory and kernel may hold what the store does
    /// not, and only a restart (which makes the kernel equal to the store) puts that right.
    /// The daemon stops with an error when it sees this.
    #[must_use]
    pub fn store_failed(&self) -> bool {
        self.store_failed.load(Ordering::Acquire)
    }

    /// Refuses changes once the store has failed (see `store_failed`).
    fn check_store(&self) -> Result<()> {
        if self.store_failed.load(Ordering::Acquire) {
            return Err(PortError::StateTracking(format!(
                "an earlier change could not be saved, so no change is taken until the daemon restarts. {STORE_ADVICE}"
            )));
        }
        Ok(())
    }

    /// Puts `previous` back for `id` if the allocator still holds `expected` (a change the
    /// store did not take), and refuses every later change: another change may have been
    /// made on top of this one, which only a restart (kernel made equal to the store) undoes.
    async fn undo(&self, id: PortId, expected: &Allocation, previous: Option<Allocation>) {
        self.store_failed.store(true, Ordering::Release);
        let mut parts = self.parts.lock().await;
        if parts.port_allocator.allocation(id) == Some(expected) {
            restore(&mut parts, id, previous.as_ref());
        }
    }
}

/// Checks that every allocation in `stored` fits `config` (range, reserved ports), before
/// anything is written to the kernel.
pub fn check_stored(config: &PortConfig, stored: &crate::store::StoredState) -> Result<()> {
    let mut port_allocator = PortAllocator::with_sockets(config.clone(), Arc::new(ProcfsSockets))?;
    restore_stored(&mut port_allocator, stored.allocations.iter().cloned())
}

/// Puts stored allocations back into `allocator`, refusing one the configuration no longer
/// allows.
fn restore_stored(
    allocator: &mut PortAllocator,
    allocations: impl IntoIterator<Item = Allocation>,
) -> Result<()> {
    for allocation in allocations {
        allocator.restore(allocation).map_err(|err| {
            PortError::Configuration(format!(
                "the store holds an allocation the configuration no longer allows ({err}); start with the old [ports] range and release it first"
            ))
        })?;
    }
    Ok(())
}

/// The most allowlist prefixes one user may hold over all its ports (the kernel trie holds
/// 1,048,576 in all): one tenant cannot fill it for everyone.
pub const MAX_PREFIXES_PER_USER: usize = MAX_ALLOWED_IPS;

/// Refuses a change that would give `uid` more than [`MAX_PREFIXES_PER_USER`] prefixes,
/// counting `wanted` for port `changing` (or a new port) instead of what it holds now.
fn check_prefix_budget(
    allocator: &PortAllocator,
    uid: u32,
    changing: Option<PortId>,
    wanted: usize,
) -> Result<()> {
    let others: usize = allocator
        .allocations()
        .filter(|held| held.owner.uid == Some(uid) && Some(held.id) != changing)
        .map(|held| held.access.allowed_ips.len())
        .sum();
    if others + wanted > MAX_PREFIXES_PER_USER {
        return Err(PortError::PolicyViolation(format!(
            "uid {uid} would hold {} allowlist prefixes over its ports, the most one user may is {MAX_PREFIXES_PER_USER}: merge prefixes into wider ones or release ports",
            others + wanted
        )));
    }
    Ok(())
}

/// What to do when the store refuses a change.
const STORE_ADVICE: &str = "Check free space and permissions of the state directory and the daemon's log, then restart the daemon (it makes the kernel maps equal to the store)";

/// May `actor` change `held`?
fn authorize(held: &Allocation, actor: Actor) -> Result<()> {
    match actor {
        Actor::Admin => Ok(()),
        Actor::User(uid) if held.owner.uid == Some(uid) => Ok(()),
        Actor::User(uid) => Err(PortError::AccessDenied(format!(
            "uid {uid} did not allocate {} (owner {}): only its maker, root or the admin group may change it",
            held.id, held.owner.name
        ))),
    }
}

/// Makes the userspace mirror and the kernel agree with `record` (`None`: unallocated).
fn push(parts: &mut Parts, id: PortId, record: Option<&Allocation>) -> Result<()> {
    if let Some(held) = record {
        let policy = held.policy();
        if let Some(gate) = parts.gate.as_mut() {
            gate.set_policy(id.port, id.protocol, &policy)?;
        }
        parts.security.set_policy(id, policy);
    } else {
        if let Some(gate) = parts.gate.as_mut() {
            gate.remove_policy(id.port, id.protocol)?;
        }
        parts.security.remove_access_control(id);
    }
    Ok(())
}

/// Sets the allocator, the mirror and the kernel back to `record` for `id`.
fn restore(parts: &mut Parts, id: PortId, record: Option<&Allocation>) {
    parts.port_allocator.remove(id);
    if let Some(held) = record {
        // It was held before, so it fits the range.
        let _restored = parts.port_allocator.restore(held.clone());
    }
    if let Err(err) = push(parts, id, record) {
        log::error!("undoing a change to {id} in the kernel failed: {err}");
    }
}

/// Connection slots a TCP port holds (established plus handshakes), 0 without the gate.
fn slots(gate: Option<&Gate>, id: PortId) -> u64 {
    match (gate, id.protocol) {
        (Some(gate), Protocol::Tcp) => gate.slots(id.port).map_or(0, |slots| slots.slots),
        _ => 0,
    }
}

/// An allocation's report without the kernel: its policy, zero counters.
fn uncounted_report(held: &Allocation) -> PortReport {
    PortReport {
        port: held.id.port,
        proto: held.id.protocol,
        status: held.status,
        allow: held.access.allowed_ips.iter().copied().collect(),
        max_connections: held.access.max_connections,
        require_auth: held.access.require_authentication,
        owner_cgroup: held.owner.cgroup.as_ref().map(|owner| owner.cgroup.id),
        grants: Vec::new(),
        counters: PortMetrics::default(),
    }
}

/// Established connections per TCP port, as one read of the slots map found them.
struct Established(std::collections::BTreeMap<u16, portgate_common::ConnSlots>);

impl Established {
    /// Established connections of `id` (0 for UDP, or when unknown).
    fn get(&self, id: PortId) -> u64 {
        match id.protocol {
            Protocol::Tcp => self.0.get(&id.port).map_or(0, |slots| slots.established),
            Protocol::Udp => 0,
        }
    }
}

/// Established connections of a TCP port, 0 without the gate.
fn connections(gate: Option<&Gate>, id: PortId) -> u64 {
    match (gate, id.protocol) {
        (Some(gate), Protocol::Tcp) => gate.slots(id.port).map_or(0, |slots| slots.established),
        _ => 0,
    }
}

fn metrics_of(gate: Option<&Gate>, id: PortId) -> Result<PortMetrics> {
    let Some(gate) = gate else {
        return Ok(PortMetrics::default());
    };
    let counters = gate
        .counters(id.port, id.protocol)
        .map_err(|err| PortError::MetricCollection(err.to_string()))?;
    Ok(PortMetrics::new(&counters, connections(Some(gate), id)))
}

#[cfg(test)]
mod tests {
    use std::{net::IpAddr, sync::Arc, time::Duration};

    use super::{
        AccessChange, Actor, AllocationRequest, PortAccessControl, PortError, PortId, PortManager,
        PortStatus, Protocol,
    };
    use crate::{
        config::PortConfig,
        host::sockets::ProcfsSockets,
        store::{Change, Commit, MemoryStore, Store, StoreError, StoredState},
    };

    fn config() -> PortConfig {
        PortConfig {
            min_port: 40_000,
            max_port: 40_099,
            quarantine: Duration::ZERO,
            ..PortConfig::default()
        }
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[tokio::test]
    async fn the_specification_api_allocates_validates_and_releases() {
        let manager = PortManager::new(config()).unwrap();
        let port = manager.allocate_port("web").await.unwrap();
        assert!((40_000..=40_099).contains(&port));
        assert_eq!(manager.get_state(port).await.status, PortStatus::Active);
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

    #[tokio::test]
    async fn authentication_is_needed_until_a_grant() {
        let manager = PortManager::new(config()).unwrap();
        let held = manager
            .allocate(
                AllocationRequest {
                    access: PortAccessControl {
                        require_authentication: true,
                        ..PortAccessControl::default()
                    },
                    ..AllocationRequest::new("db")
                },
                Actor::User(1000),
            )
            .await
            .unwrap();
        let err = manager
            .validate_connection(held.id, ip("192.0.2.1"))
            .await
            .unwrap_err();
        assert!(
            matches!(err, PortError::AuthenticationFailed { .. }),
            "{err}"
        );
        // Another user may not grant on it; its maker may.
        let err = manager
            .grant(
                held.id,
                ip("192.0.2.1"),
                Duration::from_mins(1),
                Actor::User(1001),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, PortError::AccessDenied(_)), "{err}");
        manager
            .grant(
                held.id,
                ip("192.0.2.1"),
                Duration::from_mins(1),
                Actor::User(1000),
            )
            .await
            .unwrap();
        manager
            .validate_connection(held.id, ip("192.0.2.1"))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn users_change_only_their_own_allocations() {
        let manager = PortManager::new(config()).unwrap();
        let held = manager
            .allocate(AllocationRequest::new("mine"), Actor::User(1000))
            .await
            .unwrap();
        assert_eq!(held.owner.uid, Some(1000));
        let err = manager
            .release(held.id, Actor::User(1001))
            .await
            .unwrap_err();
        assert!(matches!(err, PortError::AccessDenied(_)), "{err}");
        assert_eq!(err.http_status(), 403);
        let change = AccessChange {
            max_connections: Some(3),
            ..AccessChange::default()
        };
        assert!(
            manager
                .set_access(held.id, change.clone(), Actor::User(1001))
                .await
                .is_err()
        );
        let changed = manager
            .set_access(held.id, change, Actor::User(1000))
            .await
            .unwrap();
        assert_eq!(changed.access.max_connections, 3);
        manager.release(held.id, Actor::Admin).await.unwrap();
    }

    #[tokio::test]
    async fn access_changes_add_and_remove_prefixes_and_refuse_oversized_allowlists() {
        let manager = PortManager::new(config()).unwrap();
        let held = manager
            .allocate(AllocationRequest::new("a"), Actor::Admin)
            .await
            .unwrap();
        let changed = manager
            .set_access(
                held.id,
                AccessChange {
                    allow: vec![
                        "10.0.0.9/8".parse().unwrap(),
                        "2001:db8::/32".parse().unwrap(),
                    ],
                    ..AccessChange::default()
                },
                Actor::Admin,
            )
            .await
            .unwrap();
        assert_eq!(changed.access.allowed_ips.len(), 2);
        assert_eq!(
            changed
                .access
                .allowed_ips
                .iter()
                .next()
                .unwrap()
                .to_string(),
            "10.0.0.0/8"
        );
        let changed = manager
            .set_access(
                held.id,
                AccessChange {
                    remove: vec!["10.0.0.0/8".parse().unwrap()],
                    ..AccessChange::default()
                },
                Actor::Admin,
            )
            .await
            .unwrap();
        assert_eq!(changed.access.allowed_ips.len(), 1);
        let err = manager
            .set_access(
                held.id,
                AccessChange {
                    remove: vec!["10.0.0.0/8".parse().unwrap()],
                    ..AccessChange::default()
                },
                Actor::Admin,
            )
            .await
            .unwrap_err();
        assert!(err.to_string().contains("is not in the allowlist"), "{err}");
        let huge: Vec<ipnet::IpNet> = (0..=super::MAX_ALLOWED_IPS)
            .map(|n| {
                let n = u32::try_from(n).unwrap();
                ipnet::IpNet::V4(
                    ipnet::Ipv4Net::new(std::net::Ipv4Addr::from(0x0a00_0000 | n), 32).unwrap(),
                )
            })
            .collect();
        let err = manager
            .set_access(
                held.id,
                AccessChange {
                    allow: huge,
                    ..AccessChange::default()
                },
                Actor::Admin,
            )
            .await
            .unwrap_err();
        assert!(matches!(err, PortError::PolicyViolation(_)), "{err}");
        assert_eq!(
            manager
                .allocation(held.id)
                .await
                .unwrap()
                .access
                .allowed_ips
                .len(),
            1
        );
    }

    /// A store whose disk is gone.
    struct BrokenStore;

    impl Store for BrokenStore {
        fn load(&self) -> Result<StoredState, StoreError> {
            Ok(StoredState::default())
        }

        fn submit(&self, _changes: Vec<Change>) -> Commit {
            let (sender, commit) = Commit::channel();
            let _sent = sender.send(Err(StoreError::Transaction {
                op: "committing",
                message: "no space left on device".to_owned(),
            }));
            commit
        }

        fn describe(&self) -> String {
            "broken".to_owned()
        }
    }

    #[tokio::test]
    async fn a_change_the_store_refuses_is_undone() {
        let (manager, _) = PortManager::open(
            config(),
            Arc::new(BrokenStore),
            None,
            Box::new(ProcfsSockets),
        )
        .unwrap();
        let err = manager
            .allocate(
                AllocationRequest {
                    port: Some(40_010),
                    ..AllocationRequest::new("a")
                },
                Actor::Admin,
            )
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not saved"), "{err}");
        let id = PortId::new(40_010, Protocol::Tcp);
        assert_eq!(manager.get_state(id).await.status, PortStatus::Available);
        assert!(matches!(
            manager.validate_connection(id, ip("10.0.0.1")).await,
            Err(PortError::NotAllocated(_))
        ));
        assert_eq!(manager.free_ports().await[0].1, 100);
        // Memory and kernel may now differ from the store: nothing more is taken.
        let err = manager
            .allocate(AllocationRequest::new("b"), Actor::Admin)
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("until the daemon restarts"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_user_holds_at_most_max_ports_per_user() {
        let manager = PortManager::new(PortConfig {
            max_ports_per_user: 2,
            ..config()
        })
        .unwrap();
        for _ in 0..2 {
            manager
                .allocate(AllocationRequest::new("a"), Actor::User(1000))
                .await
                .unwrap();
        }
        let err = manager
            .allocate(AllocationRequest::new("a"), Actor::User(1000))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("max_ports_per_user = 2"), "{err}");
        // Other users and admins are not held to it.
        manager
            .allocate(AllocationRequest::new("b"), Actor::User(1001))
            .await
            .unwrap();
        manager
            .allocate(AllocationRequest::new("admin"), Actor::Admin)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_manager_reopened_on_the_same_store_has_every_acknowledged_allocation() {
        let store = Arc::new(MemoryStore::default());
        let (manager, _) =
            PortManager::open(config(), store.clone(), None, Box::new(ProcfsSockets)).unwrap();
        let mut ports = Vec::new();
        for n in 0..10 {
            ports.push(
                manager
                    .allocate_port(format!("o{n}").as_str())
                    .await
                    .unwrap(),
            );
        }
        manager.release_port(ports[0]).await.unwrap();
        drop(manager);
        let (again, report) =
            PortManager::open(config(), store, None, Box::new(ProcfsSockets)).unwrap();
        assert_eq!(report.restored, 10);
        assert_eq!(again.get_state(ports[0]).await.status, PortStatus::Draining);
        for port in &ports[1..] {
            assert_eq!(again.get_state(*port).await.status, PortStatus::Active);
        }
        assert_eq!(again.free_ports().await[0].1, 90);
    }

    #[tokio::test]
    async fn grants_and_prefixes_are_bounded_per_port_and_per_user() {
        let manager = PortManager::new(config()).unwrap();
        let user = Actor::User(1000);
        let prefixes = |count: u32, base: u32| -> Vec<ipnet::IpNet> {
            (0..count)
                .map(|n| {
                    ipnet::IpNet::V4(
                        ipnet::Ipv4Net::new(std::net::Ipv4Addr::from(base + n), 32).unwrap(),
                    )
                })
                .collect()
        };
        let first = manager
            .allocate(
                AllocationRequest {
                    access: PortAccessControl {
                        allowed_ips: prefixes(6_000, 0x0a00_0000).into_iter().collect(),
                        ..PortAccessControl::default()
                    },
                    ..AllocationRequest::new("a")
                },
                user,
            )
            .await
            .unwrap();
        // 6,000 + 6,000 is over one user's budget of 10,000 prefixes, on a new port...
        let err = manager
            .allocate(
                AllocationRequest {
                    access: PortAccessControl {
                        allowed_ips: prefixes(6_000, 0x0b00_0000).into_iter().collect(),
                        ..PortAccessControl::default()
                    },
                    ..AllocationRequest::new("b")
                },
                user,
            )
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("allowlist prefixes over its ports"),
            "{err}"
        );
        // ...and by adding to another port; an admin is not held to it.
        let second = manager
            .allocate(AllocationRequest::new("c"), user)
            .await
            .unwrap();
        let change = AccessChange {
            allow: prefixes(4_001, 0x0c00_0000),
            ..AccessChange::default()
        };
        assert!(
            manager
                .set_access(second.id, change.clone(), user)
                .await
                .is_err()
        );
        manager
            .set_access(second.id, change, Actor::Admin)
            .await
            .unwrap();
        // Grants: at most a day, at most MAX_GRANTS_PER_PORT per port.
        let err = manager
            .grant(first.id, ip("10.0.0.1"), Duration::from_hours(25), user)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("out of bounds"), "{err}");
        for n in 0..super::security::MAX_GRANTS_PER_PORT {
            let addr = IpAddr::from(std::net::Ipv4Addr::from(
                0xc000_0200 + u32::try_from(n).unwrap(),
            ));
            manager
                .grant(first.id, addr, Duration::from_mins(1), user)
                .await
                .unwrap();
        }
        let err = manager
            .grant(first.id, ip("198.51.100.1"), Duration::from_mins(1), user)
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("grants, the most a port may"),
            "{err}"
        );
    }

    #[test]
    fn an_access_change_takes_the_names_of_an_allocation_request_too() {
        let short: AccessChange =
            serde_json::from_str(r#"{"max_conns": 3, "require_auth": true}"#).unwrap();
        let long: AccessChange =
            serde_json::from_str(r#"{"max_connections": 3, "require_authentication": true}"#)
                .unwrap();
        assert_eq!(short, long);
        assert_eq!(short.max_connections, Some(3));
    }
}
