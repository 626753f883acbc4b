//! Start-up: what the store holds becomes what the allocator, the userspace mirror and the
//! kernel hold. Whatever the kernel has that no stored allocation explains goes.

use std::{
    collections::BTreeSet,
    sync::{Arc, atomic::AtomicBool},
    time::Instant,
};

use serde::{Deserialize, Serialize};

use super::{
    PortAllocator, PortManager, PortMonitor, PortSecurity, State,
    error::{PortError, Result},
};
use crate::{
    config::PortConfig,
    gate::Gate,
    host::sockets::{Listener, SocketTable},
    model::{Allocation, PortId, Protocol},
    store::{Store, StoredState},
};

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

/// Checks that every allocation in `stored` fits `config` (range, reserved ports), before
/// anything is written to the kernel.
pub fn validate_stored(config: &PortConfig, stored: &StoredState) -> Result<()> {
    load(
        &mut PortAllocator::from_config(config.clone())?,
        stored.allocations.iter().cloned(),
    )
}

/// Puts stored allocations into `allocator`, refusing one the configuration no longer
/// allows.
fn load(
    allocator: &mut PortAllocator,
    allocations: impl IntoIterator<Item = Allocation>,
) -> Result<()> {
    for allocation in allocations {
        allocator.load(allocation).map_err(|err| {
            PortError::configuration(
                "the store holds an allocation the configuration no longer allows; start with the old [ports] range and release it first",
                Some(Box::new(err)),
            )
        })?;
    }
    Ok(())
}

impl PortManager {
    /// A manager over `config`'s range holding what `store` held (`stored`, as loaded from
    /// it), driving `gate` when given: the kernel maps are made equal to the store (policies,
    /// allowlists and grants the store does not explain are removed). `sockets` is where it
    /// reads the host's live sockets.
    pub fn open(
        config: PortConfig,
        store: Arc<dyn Store>,
        stored: StoredState,
        mut gate: Option<Gate>,
        sockets: Arc<dyn SocketTable>,
    ) -> Result<(Self, StartReport)> {
        let mut allocator = PortAllocator::from_config(config.clone())?;
        let mut security = PortSecurity::managing(config.min_port, config.max_port);
        let mut report = StartReport {
            restored: stored.allocations.len(),
            ..StartReport::default()
        };
        load(&mut allocator, stored.allocations)?;
        for held in allocator.allocations() {
            security.set_policy(held.id, held.policy());
        }
        if let Some(gate) = gate.as_mut() {
            report.stale_policies_removed = make_kernel_equal(gate, &allocator, &mut security)?;
        }
        for protocol in Protocol::ALL {
            let listeners = sockets
                .listeners(protocol, allocator.range())
                .map_err(|err| PortError::host("reading the listeners", err))?
                .into_iter()
                .filter(|listener| {
                    allocator
                        .allocation(PortId::new(listener.port, protocol))
                        .is_none()
                });
            report.unexplained_listeners.extend(listeners);
        }
        let monitor = PortMonitor::new();
        if let Some(commits) = store.commit_latency() {
            monitor.watch_commits(commits);
        }
        let manager = Self {
            state: tokio::sync::Mutex::new(State {
                allocator,
                security,
                gate,
                gone: super::Gone::default(),
                clock: super::clock::WallClock::default(),
            }),
            monitor,
            store,
            sockets,
            config,
            host_changes: tokio::sync::Mutex::new(stored.host),
            store_failed: AtomicBool::new(false),
            last_grant_sweep: std::sync::Mutex::new(Instant::now()),
            last_owner_check: std::sync::Mutex::new(
                Instant::now()
                    .checked_sub(super::OWNER_CHECK_PERIOD)
                    .unwrap_or_else(Instant::now),
            ),
            keys: tokio::sync::Mutex::new(super::keys::KeyRing::new(
                stored.keys,
                stored.grants,
                super::keys::DEFAULT_KNOCK_WINDOW,
            )),
            fleet: std::sync::OnceLock::new(),
            fleet_expected: std::sync::atomic::AtomicBool::new(false),
        };
        Ok((manager, report))
    }
}

/// Removes from the kernel what no allocation explains (policies, allowlists and grants of
/// an allocation whose commit never finished, or whose namespace is gone), mirrors the grants that stay (they live in
/// the kernel only), and writes every allocation's policy. Returns how many ports went.
fn make_kernel_equal(
    gate: &mut Gate,
    allocator: &PortAllocator,
    security: &mut PortSecurity,
) -> Result<usize> {
    let grants = gate.grants()?;
    let in_kernel = |id: PortId| {
        allocator
            .allocation(id)
            .and_then(Allocation::policy)
            .is_some()
    };
    let mut stale: BTreeSet<PortId> = gate.policies()?.into_keys().collect();
    stale.extend(gate.allowlists()?.into_keys());
    stale.extend(grants.iter().map(|grant| grant.id));
    stale.retain(|id| !in_kernel(*id));
    for id in &stale {
        gate.remove_policy(*id)?;
    }
    // Host sides of published ports whose allocation no longer publishes there.
    let mut stale_published = 0;
    for (host_side, home) in gate.published()? {
        let published = allocator
            .allocation(home)
            .and_then(Allocation::policy)
            .and_then(|policy| policy.published);
        if published != Some(host_side.port) || host_side.protocol != home.protocol {
            gate.remove_published(host_side)?;
            stale_published += 1;
        }
    }
    for grant in grants {
        if in_kernel(grant.id) {
            security.add_grant(grant.id, grant.addr, grant.expires_ns);
        }
    }
    for held in allocator.allocations() {
        if let Some(policy) = held.policy() {
            gate.set_policy(held.id, &policy)?;
        }
    }
    Ok(stale.len() + stale_published)
}
