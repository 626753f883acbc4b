//! The specification's port manager: [`PortManager`] = [`PortAllocator`] + [`PortSecurity`]
//! + [`PortMonitor`] + a durable [`Store`], driving the kernel [`Gate`] when it has one.
//!
//! Every change takes one path (`transaction`): it is made in memory, pushed to the kernel
//! maps, then submitted to the store, and acknowledged only once the store says it is
//! durable; what the kernel or the store refuses is undone, so nothing is half-applied.
//! Start-up (`reconcile`) makes the kernel equal to the store. `quota` says who may change
//! what and how much one user may hold; `reservations` keeps the kernel's reserved ports;
//! `owners` follows owner cgroups and namespaces that go away.
//! The specification's own names (`allocate_port`, `validate_connection`, ...) are one thin
//! facade over these operations, in `spec`. Without a gate (no privileges, unit tests) the
//! same verdict runs in userspace ([`PortSecurity`]).

pub mod allocator;
mod clock;
pub mod error;
pub mod fleet;
mod gate_watch;
pub mod health;
pub mod keys;
pub mod monitor;
mod owners;
mod published;
mod quota;
mod reconcile;
mod reservations;
pub mod security;
mod spec;
#[cfg(test)]
mod tests;
mod transaction;

use std::{
    collections::BTreeMap,
    net::IpAddr,
    ops::RangeInclusive,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::Mutex;

pub use self::{
    allocator::{Bound, Gone, PortAllocator, Ticked, Transition},
    error::{ErrorCategory, PortError, Result},
    gate_watch::{GATE_CHECK_PERIOD, GateCheck, GateWatch},
    health::{ErrorSource, ProcessStats},
    monitor::{PortMonitor, PortsSnapshot, gate_warnings},
    owners::OWNER_CHECK_PERIOD,
    quota::MAX_PREFIXES_PER_USER,
    reconcile::{StartReport, validate_stored},
    reservations::{GiveBackError, give_back_reserved_ports},
    security::{MAX_ALLOWED_IPS, MAX_GRANT_TTL, MAX_GRANTS_PER_PORT, PortSecurity},
};
use crate::{
    config::PortConfig,
    gate::Gate,
    host::{self, sockets::SocketTable},
    model::{
        AccessChange, Allocation, AllocationRequest, DropReason, HostPort, Issuer, PortId,
        PortReport, PortStatus, Protocol, UnixMillis,
    },
    store::{HostChanges, Store},
    text::Chain,
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

/// How often expired authentication grants are swept out of the kernel map.
pub const GRANT_SWEEP_PERIOD: Duration = Duration::from_secs(10);

/// What a change touches, under one lock so that memory, the kernel and the order of store
/// submissions agree.
struct State {
    allocator: PortAllocator,
    security: PortSecurity,
    gate: Option<Gate>,
    /// What the last look at owner cgroups and namespaces found gone.
    gone: Gone,
    /// The wall clock's last reading and what its steps moved (see [`clock`]).
    clock: clock::WallClock,
}

impl State {
    /// Established connections of a port (0 without the gate, or for UDP).
    fn connections(&self, id: PortId) -> u64 {
        self.slots_of(id).established
    }

    /// A port's connection slots in the kernel (zero without the gate, or when unreadable).
    fn slots_of(&self, id: PortId) -> portgate_common::ConnSlots {
        slots_in(self.gate.as_ref(), id)
    }

    /// Established connections of every allocated TCP port, in one read of the slots map
    /// (none without the gate, or when it cannot be read).
    fn all_connections(&self) -> Established {
        Established(
            self.gate
                .as_ref()
                .and_then(|gate| gate.all_slots().ok())
                .unwrap_or_default(),
        )
    }
}

/// A port's connection slots in `gate` (zero without it, or when unreadable).
fn slots_in(gate: Option<&Gate>, id: PortId) -> portgate_common::ConnSlots {
    gate.and_then(|gate| gate.slots(id).ok())
        .unwrap_or_default()
}

/// The connection slots of every TCP port, as one read of the slots map found them.
struct Established(BTreeMap<PortId, portgate_common::ConnSlots>);

impl Established {
    /// Established connections of `id` (0 for UDP, or when unknown).
    fn of(&self, id: PortId) -> u64 {
        self.0.get(&id).map_or(0, |slots| slots.established)
    }

    /// Handshakes holding a reservation, over every port: slots held but not established.
    fn in_flight(&self) -> u64 {
        self.0
            .values()
            .map(|slots| slots.slots.saturating_sub(slots.established))
            .sum()
    }
}

/// The port manager.
pub struct PortManager {
    state: Mutex<State>,
    monitor: PortMonitor,
    store: Arc<dyn Store>,
    sockets: Arc<dyn SocketTable>,
    config: PortConfig,
    /// What portgate changed on the host, as the store holds it; held while a change to
    /// the host and its record is made, so that such changes come one at a time.
    host_changes: Mutex<HostChanges>,
    /// Set when the store refused a change: memory and kernel may then hold what the
    /// store does not, so every later change is refused until a restart reconciles them.
    store_failed: AtomicBool,
    last_grant_sweep: std::sync::Mutex<Instant>,
    /// When owners were last looked at (at start, a period ago: the first tick looks).
    last_owner_check: std::sync::Mutex<Instant>,
    /// The client keys for the knock, and what checking knocks remembers. Never held
    /// while waiting for `state`'s lock.
    keys: Mutex<keys::KeyRing>,
    /// The fleet, in fleet mode (set once, when the follower first connects).
    fleet: std::sync::OnceLock<fleet::FleetLink>,
    /// Set in fleet mode from the start: changes are refused until `fleet` is set.
    fleet_expected: AtomicBool,
}

impl PortManager {
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

    /// The managed range.
    const fn range(&self) -> RangeInclusive<u16> {
        self.config.min_port..=self.config.max_port
    }

    /// Allocates a port for `actor` (recorded as its maker).
    pub async fn allocate(
        &self,
        mut request: AllocationRequest,
        actor: Actor,
    ) -> Result<Allocation> {
        security::PortSecurity::check_access_control(request.protocol, &request.access)?;
        self.refuse_after_store_failure()?;
        request.owner.uid = actor.uid();
        if let Some(link) = self.fleet_mode()? {
            return self.allocate_in_fleet(link, request, actor).await;
        }
        let bound = self.bound_ports(&request).await?;
        let netns_path = request.netns.as_ref().map(|netns| netns.path.clone());
        let (allocation, pending) = {
            let mut state = self.state.lock().await;
            // Again under the lock: a request queued behind a failed commit must not pass.
            self.refuse_after_store_failure()?;
            quota::check_new_port(&state.allocator, &self.config, actor, &request)?;
            let now = state.now();
            let allocation = state.allocator.claim(request, now, &bound)?;
            let pending = self.apply(&mut state, vec![(allocation.id, None)])?;
            (allocation, pending)
        };
        self.settle(pending, format!("the allocation of {}", allocation.id))
            .await?;
        if let Some(path) = netns_path
            && let Err(err) = self.reserve_in_netns(&allocation, &path).await
        {
            self.undo_allocation(allocation.id).await;
            return Err(err);
        }
        self.monitor.record_allocation();
        Ok(allocation)
    }

    /// The live sockets an allocation of `request` must avoid: of its port when it names
    /// one, else of the whole range. The socket tables take milliseconds to read: not under
    /// the lock, and not on an async worker (a snapshot still fresh is taken as it is,
    /// without a thread hop).
    async fn bound_ports(&self, request: &AllocationRequest) -> Result<Bound> {
        if request.port.is_none()
            && request.netns.is_none()
            && let Some(bound) = self.sockets.fresh(request.protocol, self.range())
        {
            return Ok(Bound {
                netns: bound.clone(),
                host: bound,
            });
        }
        let sockets = Arc::clone(&self.sockets);
        let (range, probe) = (self.range(), request.clone());
        tokio::task::spawn_blocking(move || bound_for(sockets.as_ref(), range, &probe))
            .await
            .map_err(|err| PortError::host("reading the socket tables", err))?
    }

    /// Releases a port for `actor` (`portgate release` and `portgate drain`): it goes
    /// Draining (established connections continue), then Closed, then Available after
    /// quarantine.
    pub async fn release(&self, id: PortId, actor: Actor) -> Result<Allocation> {
        self.change(id, actor, |allocator, held, now| {
            if held.status == PortStatus::Active {
                allocator.set_status_at(id, PortStatus::Draining, now)?;
            }
            Ok(())
        })
        .await
    }

    /// Renews a port's lease for `ttl` (or the TTL it was given).
    pub async fn renew(
        &self,
        id: PortId,
        ttl: Option<Duration>,
        actor: Actor,
    ) -> Result<Allocation> {
        self.change(id, actor, |allocator, _, now| allocator.renew(id, ttl, now))
            .await
    }

    /// Changes a port's access control.
    pub async fn set_access(
        &self,
        id: PortId,
        change: AccessChange,
        actor: Actor,
    ) -> Result<Allocation> {
        self.change(id, actor, |allocator, held, _| {
            let access = change.apply(&held.access).map_err(|absent| {
                PortError::InvalidPortRequest(format!(
                    "{absent} is not in the allowlist of {id}: see `portgate show {}`",
                    id.cli_args(None)
                ))
            })?;
            PortSecurity::check_access_control(id.protocol, &access)?;
            quota::check_prefix_budget(allocator, actor, Some(id), access.allowed_ips.len())?;
            allocator.set_access(id, access)
        })
        .await
    }

    /// Moves a port to a new owner cgroup (a container restarted into a new cgroup): from
    /// the change on, only the new owner (and its descendants) may bind it.
    pub async fn set_owner(
        &self,
        id: PortId,
        cgroup: crate::model::OwnerCgroup,
        actor: Actor,
    ) -> Result<Allocation> {
        fleet::refuse_owner_cgroup(self.fleet_mode()?.filter(|_| id.netns.is_host()))?;
        self.change(id, actor, |allocator, _, _| allocator.set_owner(id, cgroup))
            .await
    }

    /// Grants `addr` on a port that requires authentication, for `ttl`. Grants live in the
    /// kernel (and its userspace mirror); the store keeps only who issued each, until it
    /// expires. A grant the address already holds is replaced.
    pub async fn grant(&self, id: PortId, addr: IpAddr, ttl: Duration, actor: Actor) -> Result<()> {
        let issuer = match actor {
            Actor::Admin => Issuer::Administrator,
            Actor::User(uid) => Issuer::User(uid),
        };
        self.grant_issued(id, addr, ttl, actor, issuer).await?;
        Ok(())
    }

    /// [`PortManager::grant`], recording `issuer` as who issued it. A key's knock never
    /// changes a grant someone else issued (an administrator, a user, another key, or an
    /// issuer not known), nor shortens its own key's: that grant stands as it is and this
    /// returns `false`; `true` when the grant is this one. Who issued it is decided and
    /// recorded under the state lock, so that two grants of one address at once cannot
    /// leave the one in force recorded as the other's.
    async fn grant_issued(
        &self,
        id: PortId,
        addr: IpAddr,
        ttl: Duration,
        actor: Actor,
        issuer: Issuer,
    ) -> Result<bool> {
        quota::check_grant_ttl(ttl)?;
        self.refuse_after_store_failure()?;
        let mut state = self.state.lock().await;
        self.refuse_after_store_failure()?;
        let held = state
            .allocator
            .allocation(id)
            .ok_or(PortError::NotAllocated(id))?;
        quota::authorize(held, actor)?;
        let now = host::kernel::monotonic_now_ns();
        let expires_ns = now.saturating_add(u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX));
        let held_until = state
            .security
            .grants_of(id)
            .into_iter()
            .find(|(source, expires)| *source == addr && *expires > now)
            .map(|(_, expires)| expires);
        // The keys' lock inside the state's: nothing takes them the other way round.
        let mut ring = self.keys.lock().await;
        match held_until {
            Some(until) if matches!(issuer, Issuer::Key(_)) => {
                let same_key = ring.issued_by(id, addr) == Some(&issuer);
                if !same_key || until >= expires_ns {
                    return Ok(false);
                }
            }
            Some(_) => {}
            None => quota::check_grant_count(state.security.grant_count(id), id)?,
        }
        if let Some(gate) = state.gate.as_mut() {
            gate.add_grant(id, addr, expires_ns)?;
        }
        state.security.add_grant(id, addr, expires_ns);
        let commit = self.note_issuer(&mut ring, id, addr, issuer, ttl);
        drop((ring, state));
        // The grant stands either way; only who issued it would be lost at a restart.
        if let Err(err) = commit.wait().await {
            self.monitor.record_error(ErrorSource::Store);
            log::warn!("who issued the grant of {addr} on {id} was not saved: {err}");
        }
        Ok(true)
    }

    /// Why a new connection from `addr` would be refused now (the kernel's drop reason and
    /// the error saying it, with the port's live connection slots when the gate is there);
    /// `None` when it gets in.
    pub async fn refusal(&self, id: PortId, addr: IpAddr) -> Option<(DropReason, PortError)> {
        let state = self.state.lock().await;
        let slots = state.slots_of(id).slots;
        state.security.refusal(id, addr, slots)
    }

    /// The allocation of a port.
    pub async fn allocation(&self, id: PortId) -> Option<Allocation> {
        self.state.lock().await.allocator.allocation(id).cloned()
    }

    /// Every allocation with its live connections.
    pub async fn allocations(&self) -> Vec<(Allocation, u64)> {
        let state = self.state.lock().await;
        let connections = state.all_connections();
        state
            .allocator
            .allocations()
            .map(|held| (held.clone(), connections.of(held.id)))
            .collect()
    }

    /// Counters and policy of every port (what `portgate maps` shows), from the kernel;
    /// without the gate, the allocations with zero counters.
    pub async fn reports(&self) -> Result<Vec<PortReport>> {
        let state = self.state.lock().await;
        if let Some(gate) = state.gate.as_ref() {
            return gate.reports().map_err(PortError::counters);
        }
        Ok(state
            .allocator
            .allocations()
            .map(uncounted_report)
            .collect())
    }

    /// One port's report (`GET /v1/stats?port=`), without walking every map: the kernel's
    /// policy record, counters, active connections and grants of that port, with the
    /// allowlist as the manager wrote it (reading one port's prefixes back from the trie
    /// would walk the whole trie). `None` when the port has neither a policy nor counters.
    pub async fn report(&self, id: PortId) -> Result<Option<PortReport>> {
        let state = self.state.lock().await;
        let held = state.allocator.allocation(id);
        let Some(gate) = state.gate.as_ref() else {
            return Ok(held.map(uncounted_report));
        };
        let allow = held.map(|held| held.access.allowed_ips.clone());
        gate.report(id, allow.unwrap_or_default())
            .map_err(PortError::counters)
    }

    /// Ports that can be allocated now, per protocol (live sockets not counted).
    pub async fn free_ports(&self) -> Vec<(Protocol, u64)> {
        let state = self.state.lock().await;
        free_ports(&state.allocator)
    }

    /// The kernel attachments (link pin names), empty without the gate.
    pub async fn attachments(&self) -> Result<Vec<String>> {
        let state = self.state.lock().await;
        match state.gate.as_ref() {
            Some(gate) => Ok(gate.attachments()?),
            None => Ok(Vec::new()),
        }
    }

    /// Whether the manager drives the kernel gate.
    pub async fn has_gate(&self) -> bool {
        self.state.lock().await.gate.is_some()
    }

    /// Takes every lifecycle step due now (lease expiry, drain end, quarantine end), and
    /// every [`OWNER_CHECK_PERIOD`] those of owners that are gone
    /// ([`PortManager::check_owners`]), in memory, kernel and store; returns them once they
    /// are durable. A port whose step the kernel refuses stays as it was (its error is
    /// logged) and is tried again next time.
    pub async fn tick(&self) -> Result<Vec<Transition>> {
        if due(&self.last_grant_sweep, GRANT_SWEEP_PERIOD)
            && let Err(err) = self.sweep_grants().await
        {
            self.monitor.record_error(ErrorSource::Kernel);
            log::error!("sweeping expired grants: {}", Chain(&err));
        }
        let mut steps = Vec::new();
        if due(&self.last_owner_check, OWNER_CHECK_PERIOD) {
            match self.check_owners().await {
                Ok(taken) => steps = taken,
                // Looked at again next period; a store that failed stops the daemon.
                Err(err) => {
                    self.monitor.record_error(ErrorSource::Host);
                    log::error!("looking at owners: {}", Chain(&err));
                }
            }
        }
        match self.fleet_mode() {
            Ok(Some(link)) => steps.extend(self.fleet_lifecycle_steps(link).await?),
            Ok(None) => steps.extend(self.lifecycle_steps().await?),
            // Not joined yet: the fleet's ports keep their state until the node follows it.
            Err(_) => {}
        }
        Ok(steps)
    }

    /// The lifecycle steps due now, taken (see [`PortManager::tick`]).
    async fn lifecycle_steps(&self) -> Result<Vec<Transition>> {
        let (steps, pending) = {
            let mut state = self.state.lock().await;
            let ticked = state.lifecycle_tick();
            if ticked.before.is_empty() {
                return Ok(Vec::new());
            }
            self.apply_steps(&mut state, ticked, "the lifecycle step")
        };
        for step in &steps {
            if let Transition::LeaseExpired(_) = step {
                self.monitor.record_lease_expiry();
            }
        }
        self.settle(pending, "the lifecycle steps".to_owned())
            .await?;
        Ok(steps)
    }

    /// Removes expired authentication grants from the kernel map (and the mirror), so that
    /// grants given over time do not fill it. Returns how many went.
    pub async fn sweep_grants(&self) -> Result<usize> {
        let mut state = self.state.lock().await;
        let State { security, gate, .. } = &mut *state;
        let Some(gate) = gate.as_mut() else {
            return Ok(0);
        };
        let now = host::kernel::monotonic_now_ns();
        let mut removed = 0;
        for grant in gate.grants()? {
            if grant.expires_ns <= now {
                gate.remove_grant(grant.id, grant.addr)?;
                security.remove_grant(grant.id, grant.addr);
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Runs `step` on the allocator for an allocation `actor` may change (given as it is
    /// now), then takes the change through the kernel and the store.
    async fn change(
        &self,
        id: PortId,
        actor: Actor,
        step: impl FnOnce(&mut PortAllocator, &Allocation, UnixMillis) -> Result<()>,
    ) -> Result<Allocation> {
        self.refuse_after_store_failure()?;
        if let Some(link) = self.fleet_mode()?.filter(|_| id.netns.is_host()) {
            return self.change_in_fleet(link, id, actor, step).await;
        }
        let (after, pending) = {
            let mut state = self.state.lock().await;
            let now = state.now();
            let before = self.changeable(&state, id, actor)?;
            step(&mut state.allocator, &before, now)?;
            let after = state
                .allocator
                .allocation(id)
                .cloned()
                .ok_or(PortError::NotAllocated(id))?;
            let pending = self.apply(&mut state, vec![(id, Some(before))])?;
            (after, pending)
        };
        self.settle(pending, format!("the change to {id}")).await?;
        Ok(after)
    }

    /// The allocation of `id` as it is now, when `actor` may change it and changes are
    /// taken (called under the state lock, again after waiting for it).
    fn changeable(&self, state: &State, id: PortId, actor: Actor) -> Result<Allocation> {
        self.refuse_after_store_failure()?;
        let before = state
            .allocator
            .allocation(id)
            .cloned()
            .ok_or(PortError::NotAllocated(id))?;
        quota::authorize(&before, actor)?;
        Ok(before)
    }

    /// Whether the store refused a change: memory and kernel may hold what the store does
    /// not, and only a restart (which makes the kernel equal to the store) puts that right.
    /// The daemon stops with an error when it sees this.
    #[must_use]
    pub fn store_failed(&self) -> bool {
        self.store_failed.load(Ordering::Acquire)
    }

    /// Refuses changes once the store has failed (see [`PortManager::store_failed`]).
    fn refuse_after_store_failure(&self) -> Result<()> {
        if self.store_failed() {
            return Err(PortError::state(
                format!(
                    "an earlier change could not be saved, so no change is taken until the daemon restarts. {STORE_ADVICE}"
                ),
                None,
            ));
        }
        Ok(())
    }
}

/// The live sockets an allocation of `request` in `range` must avoid, each read in its
/// namespace: of its port when it names one (none when a host port is outside the range:
/// the allocator refuses it, nor for a port named in another namespace), else of the whole
/// range; and in the host's namespace, of the host port it publishes on.
fn bound_for(
    sockets: &dyn SocketTable,
    range: RangeInclusive<u16>,
    request: &AllocationRequest,
) -> Result<Bound> {
    let failed = |err| PortError::host("reading the socket tables", err);
    let ports = |named: Option<u16>, host: bool| match named {
        Some(port) if range.contains(&port) || !host => Some(port..=port),
        Some(_) => None,
        None => Some(range.clone()),
    };
    let read = |table: &dyn SocketTable, wanted: Option<RangeInclusive<u16>>| {
        wanted.map_or_else(
            || Ok(std::collections::BTreeSet::new()),
            |wanted| table.bound_ports(request.protocol, wanted),
        )
    };
    let Some(netns) = &request.netns else {
        let bound = read(sockets, ports(request.port, true)).map_err(failed)?;
        return Ok(Bound {
            netns: bound.clone(),
            host: bound,
        });
    };
    // A port named in a container's namespace is expected to be bound already: the
    // container starts its server before it can be named (by its id, a pid or its
    // namespace). Only a port picked for it avoids live sockets.
    let wanted = request.port.is_none().then(|| range.clone());
    let in_netns = host::netns::enter(&netns.path, || read(&host::sockets::ProcfsSockets, wanted))
        .map_err(|err| {
            PortError::host(format!("entering the namespace {}", netns.info.label), err)
        })?
        .map_err(failed)?;
    let host = match request.publish {
        None => std::collections::BTreeSet::new(),
        Some(HostPort::Port(port)) => read(sockets, ports(Some(port), true)).map_err(failed)?,
        Some(HostPort::Auto) => read(sockets, ports(None, true)).map_err(failed)?,
    };
    Ok(Bound {
        netns: in_netns,
        host,
    })
}

/// Whether `period` has passed since `last`; when so, `last` becomes now.
fn due(last: &std::sync::Mutex<Instant>, period: Duration) -> bool {
    let mut last = last
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let due = last.elapsed() >= period;
    if due {
        *last = Instant::now();
    }
    due
}

/// What to do when the store refuses a change.
const STORE_ADVICE: &str = "Check free space and permissions of the state directory and the daemon's log, then restart the daemon (it makes the kernel maps equal to the store)";

/// Ports of each protocol that can be allocated now (live sockets not counted).
fn free_ports(allocator: &PortAllocator) -> Vec<(Protocol, u64)> {
    Protocol::ALL
        .iter()
        .map(|&protocol| {
            let free = allocator.free_count(protocol);
            (protocol, u64::try_from(free).unwrap_or(u64::MAX))
        })
        .collect()
}

/// An allocation's report without the kernel: its policy, zero counters.
fn uncounted_report(held: &Allocation) -> PortReport {
    PortReport {
        id: held.id,
        published: held.published,
        status: held.status,
        access: held.access.clone(),
        owner_cgroup: held.owner.cgroup.as_ref().map(|owner| owner.id),
        grants: Vec::new(),
        counters: crate::model::PortMetrics::default(),
    }
}
