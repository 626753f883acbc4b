//! An in-memory store (tests, and managers that need no durability).

use std::{
    collections::BTreeMap,
    sync::{Mutex, PoisonError},
};

use super::{Change, Commit, HostChanges, Store, StoreError, StoredState};
use crate::model::{Allocation, ClientKey, GrantIssued, PortId};

/// A [`Store`] that keeps everything in memory: submissions apply and resolve at once, and
/// nothing survives the process.
#[derive(Debug, Default)]
pub struct MemoryStore {
    contents: Mutex<Contents>,
}

/// What a [`MemoryStore`] holds.
#[derive(Debug, Default)]
struct Contents {
    allocations: BTreeMap<PortId, Allocation>,
    host: HostChanges,
    keys: BTreeMap<String, ClientKey>,
    grants: BTreeMap<(PortId, std::net::IpAddr), GrantIssued>,
}

impl MemoryStore {
    /// An empty store.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// A store holding `state`, as if it had been loaded from disk.
    #[must_use]
    pub fn with_state(state: StoredState) -> Self {
        let allocations = state
            .allocations
            .into_iter()
            .map(|allocation| (allocation.id, allocation))
            .collect();
        Self {
            contents: Mutex::new(Contents {
                allocations,
                host: state.host,
                keys: state
                    .keys
                    .into_iter()
                    .map(|key| (key.name.clone(), key))
                    .collect(),
                grants: state
                    .grants
                    .into_iter()
                    .map(|grant| ((grant.id, grant.addr), grant))
                    .collect(),
            }),
        }
    }

    fn contents(&self) -> std::sync::MutexGuard<'_, Contents> {
        // Applying changes cannot panic half-way, so a poisoned lock still guards whole records.
        self.contents.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Store for MemoryStore {
    fn load(&self) -> Result<StoredState, StoreError> {
        let contents = self.contents();
        Ok(StoredState {
            allocations: contents.allocations.values().cloned().collect(),
            host: contents.host.clone(),
            keys: contents.keys.values().cloned().collect(),
            grants: contents.grants.values().cloned().collect(),
        })
    }

    fn submit(&self, changes: Vec<Change>) -> Commit {
        let mut contents = self.contents();
        for change in changes {
            match change {
                Change::Put(allocation) => {
                    contents.allocations.insert(allocation.id, allocation);
                }
                Change::Delete(id) => {
                    contents.allocations.remove(&id);
                }
                Change::SetHostChanges(host) => contents.host = host,
                Change::PutKey(key) => {
                    contents.keys.insert(key.name.clone(), key);
                }
                Change::DeleteKey(name) => {
                    contents.keys.remove(&name);
                }
                Change::PutGrant(grant) => {
                    contents.grants.insert((grant.id, grant.addr), grant);
                }
                Change::DeleteGrant(id, addr) => {
                    contents.grants.remove(&(id, addr));
                }
            }
        }
        let (done, commit) = Commit::channel();
        // The receiver is `commit`, alive until returned, so the send cannot fail.
        let _ = done.send(Ok(()));
        commit
    }

    fn describe(&self) -> String {
        format!(
            "in memory ({} allocations; nothing survives a restart)",
            self.contents().allocations.len()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Protocol, sample_allocation};

    #[test]
    fn put_delete_load_round_trip() {
        let store = MemoryStore::new();
        let kept = sample_allocation(20001, Protocol::Udp);
        let deleted = sample_allocation(20002, Protocol::Tcp);
        let first = sample_allocation(20001, Protocol::Tcp);
        store
            .submit(vec![
                Change::Put(kept.clone()),
                Change::Put(deleted.clone()),
                Change::Put(first.clone()),
            ])
            .wait_blocking()
            .unwrap();
        store
            .submit(vec![Change::Delete(deleted.id)])
            .wait_blocking()
            .unwrap();

        let state = store.load().unwrap();
        // (port, protocol) order: tcp before udp on the same port.
        assert_eq!(state.allocations, vec![first, kept]);
        assert_eq!(state.host, HostChanges::default());
    }

    #[test]
    fn host_changes_round_trip() {
        let store = MemoryStore::new();
        let host = super::super::sample_host_changes();
        store
            .submit(vec![Change::SetHostChanges(host.clone())])
            .wait_blocking()
            .unwrap();
        assert_eq!(store.load().unwrap().host, host);
    }

    #[test]
    fn submission_order_is_kept() {
        let store = MemoryStore::new();
        let allocation = sample_allocation(20001, Protocol::Tcp);
        let put = store.submit(vec![Change::Put(allocation.clone())]);
        let delete = store.submit(vec![Change::Delete(allocation.id)]);
        put.wait_blocking().unwrap();
        delete.wait_blocking().unwrap();
        assert!(store.load().unwrap().allocations.is_empty());
    }

    #[test]
    fn with_state_loads_back() {
        let state = StoredState {
            allocations: vec![
                sample_allocation(20001, Protocol::Tcp),
                sample_allocation(20003, Protocol::Tcp),
            ],
            host: HostChanges {
                reserved_ports_added: vec![(20000, 20999)],
                ..HostChanges::default()
            },
            keys: Vec::new(),
            grants: Vec::new(),
        };
        let store = MemoryStore::with_state(state.clone());
        assert_eq!(store.load().unwrap(), state);
        assert_eq!(
            store.describe(),
            "in memory (2 allocations; nothing survives a restart)"
        );
    }
}
