//! Fleet mode in the manager (issue #14, in progress): the host's ports are the fleet's,
//! shared through etcd ([`crate::fleet`]).
//!
//! etcd decides and every node follows: a change is written to etcd first (a claim that
//! creates the port's key only if it is absent, a change or release that compares the
//! key's revision), then taken through the node's own path (allocator, kernel, local
//! store) as [`PortManager::apply_fleet`] takes every change the watch brings, this node's
//! own included (the second time, nothing differs and nothing is written). While etcd does
//! not answer, changes fail with a clear error and the kernel goes on enforcing what it
//! was given; the local store keeps it across a restart.
//!
//! Lifecycle steps (lease expiry, drained to closed, freed after quarantine) of a fleet
//! port are taken by the node that wrote its record last, through etcd.
//!
//! A node's death frees nothing by itself: its ports keep their last state until an
//! administrator runs the repair pass ([`PortManager::repair_fleet_node`]), which checks
//! twice that the node is gone before taking its ports over and releasing them.
//!
//! Not yet here: owners by cgroup are refused in fleet mode (a cgroup is one host's).

use std::{
    collections::BTreeMap,
    sync::{
        Mutex as SyncMutex,
        atomic::{AtomicBool, AtomicI64, Ordering},
    },
};

use super::{Actor, PortError, PortManager, Result, Transition, quota};
use crate::{
    fleet::{Fleet, FleetError, FleetEvent, FleetRecord, Held, NodeInfo, Snapshot},
    model::{Allocation, AllocationRequest, PortId, UnixMillis, now_millis},
};

/// How many ports an allocation tries in etcd before giving up, when others keep
/// claiming the ones it picks.
const CLAIM_ATTEMPTS: usize = 16;

/// This node's link to its fleet.
#[derive(Debug)]
pub struct FleetLink {
    fleet: Fleet,
    /// The revision of each fleet port's key as this node last applied it, and the node
    /// that wrote it (which takes its lifecycle steps); a released port keeps its
    /// release's revision with no node, so that an older change the watch brings late is
    /// not applied over it.
    revisions: SyncMutex<BTreeMap<PortId, (i64, Option<String>)>>,
    /// The etcd revision this node has applied everything up to.
    applied: AtomicI64,
    /// The latest etcd revision this node has heard of.
    latest: AtomicI64,
    /// Whether etcd answered the last request.
    reachable: AtomicBool,
    /// Whether a list of the fleet has been applied since the daemon started.
    synced: AtomicBool,
    /// Claims sent and not answered yet, and claims that got no answer in time (their
    /// callers were told they failed), by port: the token, and whether it failed. If etcd
    /// took a failed one after all, this node releases it.
    in_doubt: SyncMutex<BTreeMap<PortId, (u64, bool)>>,
}

/// Where a node stands in its fleet, for `status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetStatus {
    /// This node's name.
    pub node: String,
    /// The etcd revision applied.
    pub applied: i64,
    /// How many revisions behind the latest it heard of.
    pub behind: i64,
    /// Whether etcd answered the last request.
    pub reachable: bool,
    /// Whether a list of the fleet has been applied since the daemon started (until then
    /// the node enforces what its local store held).
    pub synced: bool,
}

impl FleetLink {
    /// A link through `fleet`, with nothing applied yet.
    #[must_use]
    pub fn new(fleet: Fleet) -> Self {
        Self {
            fleet,
            revisions: SyncMutex::new(BTreeMap::new()),
            applied: AtomicI64::new(0),
            latest: AtomicI64::new(0),
            reachable: AtomicBool::new(false),
            synced: AtomicBool::new(false),
            in_doubt: SyncMutex::new(BTreeMap::new()),
        }
    }

    /// The fleet.
    #[must_use]
    pub const fn fleet(&self) -> &Fleet {
        &self.fleet
    }

    /// The record this node writes for `allocation`.
    fn record(&self, allocation: &Allocation) -> FleetRecord {
        FleetRecord {
            node: self.fleet.node().to_owned(),
            allocation: allocation.clone(),
            claim: None,
        }
    }

    /// Notes an answer from etcd, or its failure.
    fn heard<T>(&self, answer: &std::result::Result<T, FleetError>) {
        let reachable = !matches!(answer, Err(FleetError::Unreachable(_)));
        self.reachable.store(reachable, Ordering::Relaxed);
    }

    fn revisions(&self) -> std::sync::MutexGuard<'_, BTreeMap<PortId, (i64, Option<String>)>> {
        self.revisions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The revision of `id`'s record as applied here, while it is allocated.
    fn revision_of(&self, id: PortId) -> Option<i64> {
        self.revisions()
            .get(&id)
            .filter(|(_, node)| node.is_some())
            .map(|(revision, _)| *revision)
    }

    /// The last revision of `id` applied here, a release's included.
    fn applied_of(&self, id: PortId) -> Option<i64> {
        self.revisions().get(&id).map(|(revision, _)| *revision)
    }

    fn in_doubt(&self) -> std::sync::MutexGuard<'_, BTreeMap<PortId, (u64, bool)>> {
        self.in_doubt
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether this node wrote `id`'s record last (and so takes its lifecycle steps).
    fn written_here(&self, id: PortId) -> bool {
        self.revisions()
            .get(&id)
            .is_some_and(|(_, node)| node.as_deref() == Some(self.fleet.node()))
    }

    /// Notes that `id` is at `revision`, written by `node` (`None`: released).
    fn note(&self, id: PortId, revision: i64, node: Option<&str>) {
        let mut revisions = self.revisions();
        if revisions
            .get(&id)
            .is_none_or(|(known, _)| *known <= revision)
        {
            revisions.insert(id, (revision, node.map(str::to_owned)));
        }
        drop(revisions);
        self.latest.fetch_max(revision, Ordering::Relaxed);
    }
}

impl From<FleetError> for PortError {
    fn from(error: FleetError) -> Self {
        match error {
            FleetError::Taken { id, node } => Self::PortUnavailable {
                id,
                why: format!("node {node} holds it for the fleet"),
            },
            FleetError::Changed(id) => Self::PolicyViolation(format!(
                "{id} changed in the fleet while this change was made: look at it again and retry"
            )),
            other => Self::state(format!("the fleet: {other}"), None),
        }
    }
}

impl PortManager {
    /// Joins the fleet: from now on the host's ports are allocated and changed through it.
    /// Call once, before serving, then [`PortManager::sync_fleet`] with a first list.
    pub fn join_fleet(&self, link: FleetLink) -> Result<()> {
        self.fleet.set(link).map_err(|_| {
            PortError::configuration("the manager joined a fleet already".to_owned(), None)
        })
    }

    /// Says the node is in fleet mode: changes to the host's ports are refused until
    /// [`PortManager::join_fleet`].
    pub fn expect_fleet(&self) {
        self.fleet_expected.store(true, Ordering::Release);
    }

    /// The fleet link in fleet mode (`None` outside it); an error while the node is in
    /// fleet mode but has not reached etcd yet.
    pub(super) fn fleet_mode(&self) -> Result<Option<&FleetLink>> {
        match self.fleet.get() {
            Some(link) => Ok(Some(link)),
            None if self.fleet_expected.load(Ordering::Acquire) => Err(PortError::state(
                "the fleet: etcd has not been reached since the daemon started, so fleet changes are refused; enforcement goes on from the local store".to_owned(),
                None,
            )),
            None => Ok(None),
        }
    }

    /// The fleet link, in fleet mode.
    #[must_use]
    pub fn fleet_link(&self) -> Option<&FleetLink> {
        self.fleet.get()
    }

    /// Where this node stands in its fleet, in fleet mode.
    #[must_use]
    pub fn fleet_status(&self) -> Option<FleetStatus> {
        let link = self.fleet.get()?;
        let applied = link.applied.load(Ordering::Relaxed);
        Some(FleetStatus {
            node: link.fleet.node().to_owned(),
            applied,
            behind: (link.latest.load(Ordering::Relaxed) - applied).max(0),
            reachable: link.reachable.load(Ordering::Relaxed),
            synced: link.synced.load(Ordering::Relaxed),
        })
    }

    /// Makes this node's host ports equal to `snapshot` (a list of the fleet): each listed
    /// allocation applied, each host allocation not listed removed.
    pub async fn sync_fleet(&self, snapshot: Snapshot) -> Result<()> {
        let Some(link) = self.fleet.get() else {
            return Ok(());
        };
        let listed: BTreeMap<PortId, Held> = snapshot
            .held
            .into_iter()
            .map(|held| (held.record.allocation.id, held))
            .collect();
        let gone: Vec<PortId> = {
            let state = self.state.lock().await;
            state
                .allocator
                .allocations()
                .filter(|held| held.id.netns.is_host() && !listed.contains_key(&held.id))
                .map(|held| held.id)
                .collect()
        };
        // A record this node cannot apply (its kernel refused it) is logged and skipped:
        // the others are applied, the node follows the watch, and the next list (or a
        // change to that record) tries it again.
        let mut skipped = 0;
        for (id, record, revision) in gone
            .into_iter()
            .map(|id| (id, None, snapshot.revision))
            .chain(
                listed
                    .into_iter()
                    .map(|(id, held)| (id, Some(held.record), held.revision)),
            )
        {
            if let Err(err) = self.apply_fleet_record(id, record, revision).await {
                self.monitor.record_error(super::ErrorSource::Fleet);
                log::error!(
                    "the fleet's record of {id} is not applied here: {}",
                    crate::text::Chain(&err)
                );
                skipped += 1;
            }
        }
        if skipped > 0 {
            log::error!(
                "{skipped} of the fleet's records could not be applied here: this node does not enforce them"
            );
        }
        link.applied.fetch_max(snapshot.revision, Ordering::Relaxed);
        link.latest.fetch_max(snapshot.revision, Ordering::Relaxed);
        link.reachable.store(true, Ordering::Relaxed);
        link.synced.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Takes a watch's changes, in order.
    pub async fn apply_fleet(&self, events: Vec<FleetEvent>) -> Result<()> {
        let Some(link) = self.fleet.get() else {
            return Ok(());
        };
        for event in events {
            let revision = match event {
                FleetEvent::Put(held) => {
                    let Held { record, revision } = *held;
                    let id = record.allocation.id;
                    self.apply_fleet_record(id, Some(record), revision).await?;
                    revision
                }
                FleetEvent::Deleted(id, revision) => {
                    self.apply_fleet_record(id, None, revision).await?;
                    revision
                }
            };
            link.applied.fetch_max(revision, Ordering::Relaxed);
        }
        link.reachable.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Makes `id`'s allocation `record`'s here, as etcd holds it at `revision` (`None`:
    /// released), unless this node applied a later revision of it already.
    async fn apply_fleet_record(
        &self,
        id: PortId,
        record: Option<FleetRecord>,
        revision: i64,
    ) -> Result<()> {
        let Some(link) = self.fleet.get() else {
            return Ok(());
        };
        let mut record = record;
        let mut revision = revision;
        if let Some(token) = record.as_ref().and_then(|record| record.claim)
            && record
                .as_ref()
                .is_some_and(|record| record.node == link.fleet.node())
            && link.in_doubt().get(&id) == Some(&(token, true))
        {
            // A claim its caller was told had failed: etcd took it after all. Released.
            let released = link.fleet.release(id, revision).await;
            link.heard(&released);
            let Ok(deleted) = released else {
                return Ok(()); // Tried again at the next list.
            };
            link.in_doubt().remove(&id);
            log::info!(
                "released {id}: etcd took its claim after this node had answered that it failed"
            );
            record = None;
            revision = deleted;
        }
        let node = record.as_ref().map(|record| record.node.clone());
        let record = record.map(|record| record.allocation);
        // Checked, applied and noted under the state lock: applies of one port (a watch's,
        // a list's, this node's own writes) take effect in revision order, never older
        // over newer.
        let pending = {
            let mut state = self.state.lock().await;
            if link.applied_of(id).is_some_and(|known| known > revision) {
                return Ok(());
            }
            let before = state.allocator.allocation(id).cloned();
            if before == record {
                link.note(id, revision, node.as_deref());
                return Ok(());
            }
            state.allocator.set(id, record.clone());
            let pending = self.apply(&mut state, vec![(id, before)])?;
            link.note(id, revision, node.as_deref());
            pending
        };
        self.settle(pending, format!("the fleet's change to {id}"))
            .await
    }

    /// [`PortManager::allocate`] in fleet mode: the port is picked here, claimed in etcd
    /// (another if a node claimed it first), then applied.
    pub(super) async fn allocate_in_fleet(
        &self,
        link: &FleetLink,
        request: AllocationRequest,
        actor: Actor,
    ) -> Result<Allocation> {
        if request.netns.is_some() || request.publish.is_some() {
            return Err(PortError::InvalidPortRequest(
                "in fleet mode a port is the fleet's, on every host: a port in a container's network namespace, or published, is not (yet) taken".to_owned(),
            ));
        }
        if request.owner.cgroup.is_some() {
            refuse_owner_cgroup(Some(link))?;
        }
        let bound = self.bound_ports(&request).await?;
        let mut last = None;
        for _ in 0..CLAIM_ATTEMPTS {
            // Picked as a local allocation would be, then taken back out: etcd decides.
            let picked = {
                let mut state = self.state.lock().await;
                self.refuse_after_store_failure()?;
                quota::check_new_port(&state.allocator, &self.config, actor, &request)?;
                let picked = state
                    .allocator
                    .claim(request.clone(), now_millis(), &bound)?;
                state.allocator.remove(picked.id);
                picked
            };
            let token = rand::random::<u64>();
            // Noted before it is sent: its answer may come after a watch brought it back.
            link.in_doubt().insert(picked.id, (token, false));
            let claimed = link.fleet.claim(&picked, token).await;
            link.heard(&claimed);
            if matches!(claimed, Err(FleetError::Unreachable(_))) {
                link.in_doubt().insert(picked.id, (token, true));
                // Brought here by the watch meanwhile: given back now if etcd answers, else
                // when a list or the watch brings it again.
                if let Some(revision) = link
                    .revision_of(picked.id)
                    .filter(|_| link.written_here(picked.id))
                {
                    let _given_back = self.write_fleet(link, picked.id, None, revision).await;
                }
            } else {
                link.in_doubt().remove(&picked.id);
            }
            match claimed {
                Ok(revision) => {
                    let record = FleetRecord {
                        claim: Some(token),
                        ..link.record(&picked)
                    };
                    if let Err(err) = self
                        .apply_fleet_record(picked.id, Some(record), revision)
                        .await
                    {
                        // Not enforceable here: given back to the fleet, and the error told.
                        let _given_back = self.write_fleet(link, picked.id, None, revision).await;
                        return Err(err);
                    }
                    self.monitor.record_allocation();
                    return Ok(picked);
                }
                // Someone else's: the watch will bring it here; pick again.
                Err(FleetError::Taken { .. }) if request.port.is_none() => {
                    last = Some(picked.id);
                }
                Err(other) => return Err(other.into()),
            }
        }
        Err(PortError::state(
            format!(
                "the fleet: {CLAIM_ATTEMPTS} ports picked here were claimed by other nodes first (the last {}): this node is behind its fleet; retry",
                last.map_or_else(String::new, |id| id.to_string())
            ),
            None,
        ))
    }

    /// A change to a fleet port: `step` runs on the allocator as it would locally, the
    /// result is written to etcd against the revision this node applied, then applied.
    pub(super) async fn change_in_fleet(
        &self,
        link: &FleetLink,
        id: PortId,
        actor: Actor,
        step: impl FnOnce(&mut super::PortAllocator, &Allocation, UnixMillis) -> Result<()>,
    ) -> Result<Allocation> {
        let (after, revision) = {
            let mut state = self.state.lock().await;
            let before = self.changeable(&state, id, actor)?;
            let revision = link.revision_of(id).ok_or_else(|| {
                PortError::state(
                    format!("{id} has no fleet revision here yet: retry once the node caught up"),
                    None,
                )
            })?;
            step(&mut state.allocator, &before, now_millis())?;
            let after = state.allocator.allocation(id).cloned();
            // Taken back: etcd decides, then the change is applied.
            state.allocator.set(id, Some(before));
            (after, revision)
        };
        let Some(after) = after else {
            self.write_fleet(link, id, None, revision).await?;
            return Err(PortError::NotAllocated(id));
        };
        self.write_fleet(link, id, Some(&after), revision).await?;
        Ok(after)
    }

    /// Writes `id`'s record as `after` (`None`: released) to etcd against `revision`, then
    /// applies it here.
    async fn write_fleet(
        &self,
        link: &FleetLink,
        id: PortId,
        after: Option<&Allocation>,
        revision: i64,
    ) -> Result<()> {
        if let Some(after) = after {
            let written = link.fleet.update(after, revision).await;
            link.heard(&written);
            let revision = written?;
            self.apply_fleet_record(id, Some(link.record(after)), revision)
                .await
        } else {
            let released = link.fleet.release(id, revision).await;
            link.heard(&released);
            self.apply_fleet_record(id, None, released?).await
        }
    }

    /// The lifecycle steps due now for the fleet ports this node wrote last (lease expiry,
    /// drained to closed, freed after quarantine), each written to etcd, then applied.
    /// The other nodes' ports are theirs to step.
    pub(super) async fn fleet_lifecycle_steps(&self, link: &FleetLink) -> Result<Vec<Transition>> {
        // Worked out by the allocator's own tick, then put back: etcd decides, and the
        // steps come back through the watch (and write_fleet's apply).
        let (ticked, afters) = {
            let mut state = self.state.lock().await;
            let super::State {
                allocator, gate, ..
            } = &mut *state;
            let ticked = allocator.tick(now_millis(), |id| {
                super::slots_in(gate.as_ref(), id).established
            });
            let afters: Vec<(PortId, Option<Allocation>)> = ticked
                .before
                .iter()
                .map(|before| (before.id, allocator.allocation(before.id).cloned()))
                .collect();
            for before in &ticked.before {
                allocator.set(before.id, Some(before.clone()));
            }
            (ticked, afters)
        };
        let mut taken = Vec::new();
        for (id, after) in afters {
            let Some(revision) = link.revision_of(id).filter(|_| link.written_here(id)) else {
                continue;
            };
            if let Err(err) = self.write_fleet(link, id, after.as_ref(), revision).await {
                self.monitor.record_error(super::ErrorSource::Fleet);
                log::warn!("the lifecycle step of fleet port {id} is tried again later: {err}");
                continue;
            }
            for step in ticked.steps.iter().filter(|step| step.id() == id) {
                if let Transition::LeaseExpired(_) = step {
                    self.monitor.record_lease_expiry();
                }
                taken.push(*step);
            }
        }
        Ok(taken)
    }

    /// The nodes of the fleet whose liveness keys are there now.
    pub async fn fleet_nodes(&self) -> Result<Vec<NodeInfo>> {
        let link = self.fleet_mode()?.ok_or_else(not_in_fleet)?;
        let nodes = link.fleet.nodes().await;
        link.heard(&nodes);
        Ok(nodes?)
    }

    /// The repair pass for a node that died (administrators only): once `node`'s liveness
    /// key has been gone at two looks `confirm_after` apart, this node takes over the
    /// ports it wrote last and releases them (each drains, closes and is freed after
    /// quarantine, by this node's lifecycle steps). Returns those ports.
    pub async fn repair_fleet_node(
        &self,
        node: &str,
        confirm_after: std::time::Duration,
        actor: Actor,
    ) -> Result<Vec<PortId>> {
        if actor != Actor::Admin {
            return Err(PortError::AccessDenied(
                "only an administrator may repair the fleet".to_owned(),
            ));
        }
        let link = self.fleet_mode()?.ok_or_else(not_in_fleet)?;
        if node == link.fleet.node() {
            return Err(PortError::InvalidPortRequest(format!(
                "{node} is this node: repair a dead node from another one"
            )));
        }
        for look in 0..2 {
            if look > 0 {
                tokio::time::sleep(confirm_after).await;
            }
            if self
                .fleet_nodes()
                .await?
                .iter()
                .any(|alive| alive.node == node)
            {
                return Err(PortError::PolicyViolation(format!(
                    "node {node} is alive (its liveness key is there): only a dead node's ports are repaired"
                )));
            }
        }
        let ports: Vec<PortId> = link
            .revisions()
            .iter()
            .filter(|(_, (_, writer))| writer.as_deref() == Some(node))
            .map(|(id, _)| *id)
            .collect();
        for &id in &ports {
            self.change_in_fleet(link, id, Actor::Admin, |allocator, held, now| {
                if held.status == crate::model::PortStatus::Active {
                    allocator.set_status_at(id, crate::model::PortStatus::Draining, now)?;
                }
                Ok(())
            })
            .await?;
            log::info!("fleet repair: took over {id} from dead node {node} and released it");
        }
        Ok(ports)
    }
}

/// Refuses an owner cgroup for a fleet port (`link` is the fleet's, when the port is one).
pub(super) fn refuse_owner_cgroup(link: Option<&FleetLink>) -> Result<()> {
    match link {
        Some(_) => Err(PortError::InvalidPortRequest(
            "in fleet mode an owner cgroup (--cgroup, --pid, --container) is not taken yet: a cgroup is one host's".to_owned(),
        )),
        None => Ok(()),
    }
}

fn not_in_fleet() -> PortError {
    PortError::InvalidPortRequest(
        "this daemon is not in fleet mode (no [cluster] section)".to_owned(),
    )
}
