//! Owners that come and go. A port whose owner cgroup is removed goes Draining (or stays
//! Active, as `[ports] on_owner_exit` says) and is counted among those whose owner is gone;
//! a port whose network namespace is gone (its container was removed) goes Closed at once,
//! its kernel entries are removed, and quarantine frees it; the ports portgate reserved in
//! that namespace are forgotten, and those no allocation holds any more are given back.
//!
//! The tick looks every [`OWNER_CHECK_PERIOD`]: one `stat(2)` per owner cgroup, and, only
//! while some allocation or reserved port is in another namespace than the host's, one
//! pass over `/run/netns` and `/proc` for all of them. The host is read off the manager's
//! lock and off the async workers.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    time::Duration,
};

use super::{PortManager, Result, Transition, allocator::Gone, error::PortError};
use crate::{config::OwnerExit, host};

/// How often owner cgroups and namespaces are looked at: a port whose owner went is
/// drained, or closed, at most this long (and a lifecycle period) later.
pub const OWNER_CHECK_PERIOD: Duration = Duration::from_secs(1);

/// A namespace as it is found again: (inode, cookie), as [`host::netns::find_all`] takes it.
pub(super) type NetnsKey = (u64, u64);

/// What one look at the host found.
struct Found {
    /// Owner cgroups (by id) that are gone.
    cgroups_gone: BTreeSet<u64>,
    /// The namespaces looked for.
    checked: BTreeSet<NetnsKey>,
    /// Those that still exist, with a path that opens each.
    alive: BTreeMap<NetnsKey, PathBuf>,
}

impl PortManager {
    /// Looks at every owner cgroup and every namespace other than the host's that an
    /// allocation (or a reserved port) is in, and takes the steps their end calls for, in
    /// memory, kernel and store, as [`PortManager::tick`] takes lifecycle steps; returns
    /// them once they are durable. The tick calls it every [`OWNER_CHECK_PERIOD`].
    pub async fn check_owners(&self) -> Result<Vec<Transition>> {
        let (cgroups, mut namespaces) = {
            let state = self.state.lock().await;
            let mut cgroups = BTreeSet::new();
            let mut namespaces = BTreeSet::new();
            // In fleet mode the host's ports are the fleet's, with no owner cgroup: a cgroup
            // is one host's, and one host's look must not change them.
            let fleet = self
                .fleet_expected
                .load(std::sync::atomic::Ordering::Acquire);
            for held in state.allocator.allocations() {
                if fleet && held.id.netns.is_host() {
                    continue;
                }
                if let Some(owner) = &held.owner.cgroup {
                    cgroups.insert((owner.path.clone(), owner.id));
                }
                if let Some(info) = held.netns.as_ref()
                    && held.timeline.netns_gone_at.is_none()
                {
                    namespaces.insert((info.inode, held.id.netns.0));
                }
            }
            (cgroups, namespaces)
        };
        namespaces.extend(self.reserved_netns().await);
        if cgroups.is_empty() && namespaces.is_empty() {
            // Nothing to look at (and nothing gone to count).
            self.state.lock().await.gone = Gone::default();
            return Ok(Vec::new());
        }
        let found = tokio::task::spawn_blocking(move || look(&cgroups, namespaces))
            .await
            .map_err(|err| PortError::host("looking for owner cgroups and namespaces", err))?;
        let gone = Gone {
            cgroups: found.cgroups_gone,
            netns: found
                .checked
                .iter()
                .filter(|key| !found.alive.contains_key(key))
                .map(|&(_, cookie)| crate::model::NetnsId(cookie))
                .collect(),
        };
        let steps = self.take_gone(gone).await?;
        self.keep_netns_reservations(&found.checked, &found.alive)
            .await?;
        Ok(steps)
    }

    /// Takes the steps `gone` calls for (see [`super::PortAllocator::take_gone`]) and keeps
    /// it, to count the ports whose owner is gone.
    async fn take_gone(&self, gone: Gone) -> Result<Vec<Transition>> {
        let drain = self.config.on_owner_exit == OwnerExit::Drain;
        let (steps, pending) = {
            let mut state = self.state.lock().await;
            let now = state.now();
            let ticked = state.allocator.take_gone(&gone, drain, now);
            state.gone = gone;
            if ticked.steps.is_empty() {
                return Ok(Vec::new());
            }
            self.apply_steps(&mut state, ticked, "the end of the owner")
        };
        self.settle(pending, "the steps of owners that are gone".to_owned())
            .await?;
        Ok(steps)
    }

    /// Allocated ports whose owner cgroup was gone at the last look (whatever
    /// `[ports] on_owner_exit` did with them).
    pub async fn owner_gone(&self) -> u64 {
        self.state.lock().await.owner_gone()
    }
}

impl super::State {
    /// Allocated ports whose owner cgroup was gone at the last look.
    pub(super) fn owner_gone(&self) -> u64 {
        let count = self
            .allocator
            .allocations()
            .filter(|held| self.gone.owns(held))
            .count();
        u64::try_from(count).unwrap_or(u64::MAX)
    }
}

/// Looks at the owner `cgroups` (path, id) and the `namespaces`.
fn look(cgroups: &BTreeSet<(PathBuf, u64)>, namespaces: BTreeSet<NetnsKey>) -> Found {
    let cgroups_gone = cgroups
        .iter()
        .filter(|(path, id)| host::cgroups::is_gone(path, *id) == Some(true))
        .map(|(_, id)| *id)
        .collect();
    let alive = host::netns::find_all(&namespaces);
    Found {
        cgroups_gone,
        checked: namespaces,
        alive,
    }
}
