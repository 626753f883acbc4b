//! Durable state: the allocations and the client keys, behind a small trait so that a distributed backend can be
//! added later. The embedded default is [`RedbStore`].
//!
//! Changes are submitted in order and become durable in that order; a [`Commit`] resolves
//! once its changes (and every change submitted before them) are on disk. Concurrent
//! submissions may share one transaction and one fsync (group commit).

mod memory;
mod redb;

use serde::{Deserialize, Serialize};

pub use self::{
    memory::MemoryStore,
    redb::{CommitStats, RedbStore},
};
use crate::model::{Allocation, ClientKey, GrantIssued, NetnsId, PortId};

/// What portgate changed on the host and must undo on uninstall.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostChanges {
    /// Port ranges (inclusive) that portgate added to `net.ipv4.ip_local_reserved_ports`.
    pub reserved_ports_added: Vec<(u16, u16)>,
    /// Ports that portgate added to other namespaces' `net.ipv4.ip_local_reserved_ports`
    /// for their allocations, in order. Absent in records written before namespaces had
    /// ports of their own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub netns_reserved_ports: Vec<NetnsReservedPort>,
}

/// A port that portgate added to the reserved ports of a namespace other than the host's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NetnsReservedPort {
    /// The namespace's cookie.
    pub netns: NetnsId,
    /// The namespace's nsfs inode, to find it again by (with the cookie).
    pub inode: u64,
    /// The port reserved there (for TCP and UDP alike: the sysctl is one list).
    pub port: u16,
}

/// Everything the store holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoredState {
    /// Every allocation, by (port, protocol) order.
    pub allocations: Vec<Allocation>,
    /// What to undo on uninstall.
    pub host: HostChanges,
    /// The client keys for the knock, by name.
    pub keys: Vec<ClientKey>,
    /// Who issued each live grant.
    pub grants: Vec<GrantIssued>,
}

/// One change to the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Writes (inserts or replaces) an allocation.
    Put(Allocation),
    /// Deletes the allocation of a port (nothing when there is none).
    Delete(PortId),
    /// Replaces the record of host changes.
    SetHostChanges(HostChanges),
    /// Writes (inserts or replaces) a client key.
    PutKey(ClientKey),
    /// Deletes a client key by name (nothing when there is none).
    DeleteKey(String),
    /// Writes (inserts or replaces) who issued a grant.
    PutGrant(GrantIssued),
    /// Deletes the record of a grant (nothing when there is none).
    DeleteGrant(PortId, std::net::IpAddr),
}

/// A store failure.
///
/// `Clone` because one failed transaction fails every submission it held, and each is told.
#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened or created.
    #[error("opening the store at {path}: {message}")]
    Open {
        /// The database file.
        path: std::path::PathBuf,
        /// The cause.
        message: String,
    },
    /// A read or write transaction failed.
    #[error("{op} the store: {message}")]
    Transaction {
        /// What was being done.
        op: &'static str,
        /// The cause.
        message: String,
    },
    /// A stored record could not be decoded.
    #[error("a stored record is corrupt ({key}): {message}")]
    Corrupt {
        /// The record's key.
        key: String,
        /// The cause.
        message: String,
    },
    /// The store was shut down before the change was written.
    #[error("the store is shut down")]
    Closed,
}

/// The durable store of allocations.
pub trait Store: Send + Sync + 'static {
    /// Reads everything.
    fn load(&self) -> Result<StoredState, StoreError>;
    /// Queues `changes` to be written as one unit, after everything submitted before.
    /// Returns at once; the [`Commit`] says when (and whether) they are durable.
    fn submit(&self, changes: Vec<Change>) -> Commit;
    /// One line saying what and where the store is (for `portgate status`).
    fn describe(&self) -> String;
    /// The times its commits take, when it measures them (the metrics show them).
    fn commit_latency(&self) -> Option<prometheus_client::metrics::histogram::Histogram> {
        None
    }
}

/// The histogram of commit times a store fills: buckets from 100 us to about 3.3 s.
#[must_use]
pub fn commit_histogram() -> prometheus_client::metrics::histogram::Histogram {
    prometheus_client::metrics::histogram::Histogram::new(
        prometheus_client::metrics::histogram::exponential_buckets(0.000_1, 2.0, 16),
    )
}

/// The outcome of a submission: resolves once its changes are durable.
#[derive(Debug)]
pub struct Commit(tokio::sync::oneshot::Receiver<Result<(), StoreError>>);

impl Commit {
    /// A commit and the sender its store resolves it with.
    #[must_use]
    pub fn channel() -> (tokio::sync::oneshot::Sender<Result<(), StoreError>>, Self) {
        let (sender, receiver) = tokio::sync::oneshot::channel();
        (sender, Self(receiver))
    }

    /// Waits until the changes are durable.
    pub async fn wait(self) -> Result<(), StoreError> {
        self.0.await.unwrap_or(Err(StoreError::Closed))
    }

    /// Waits, blocking the thread (not for async contexts).
    pub fn wait_blocking(self) -> Result<(), StoreError> {
        self.0.blocking_recv().unwrap_or(Err(StoreError::Closed))
    }
}

/// Host changes of both kinds, for the stores' round-trip tests.
#[cfg(test)]
pub(crate) fn sample_host_changes() -> HostChanges {
    HostChanges {
        reserved_ports_added: vec![(20000, 20999), (30000, 30000)],
        netns_reserved_ports: vec![NetnsReservedPort {
            netns: NetnsId(7),
            inode: 4_026_532_000,
            port: 80,
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::Allocation;
    use crate::model::{PortStatus, Protocol, sample_allocation};

    /// Records as portgate has always written them (store schema 1): a change to the model's
    /// types must not change a byte of them.
    const RECORD: &str = r#"{"id":{"port":20001,"protocol":"tcp"},"owner":{"name":"service-20001","uid":1000,"cgroup":{"path":"/sys/fs/cgroup/service.slice","cgroup":{"id":4242,"level":1}}},"access":{"allowed_ips":["10.0.0.0/8","2001:db8::/32"],"max_connections":16,"require_authentication":true},"status":"active","allocated_at":1700000000000,"ttl":"1h","lease_expires_at":1700003600000,"draining_since":null,"closed_at":null}"#;
    const CLOSED_RECORD: &str = r#"{"id":{"port":20001,"protocol":"tcp"},"owner":{"name":"service-20001","uid":1000,"cgroup":null},"access":{"allowed_ips":["10.0.0.0/8","2001:db8::/32"],"max_connections":16,"require_authentication":true},"status":"closed","allocated_at":1700000000000,"ttl":null,"lease_expires_at":null,"draining_since":5,"closed_at":6}"#;

    #[test]
    fn host_changes_of_schema_1_load_and_keep_their_bytes() {
        let old = r#"{"reserved_ports_added":[[20000,29999]]}"#;
        let loaded: super::HostChanges = serde_json::from_str(old).unwrap();
        assert_eq!(loaded.reserved_ports_added, [(20000, 29999)]);
        assert!(loaded.netns_reserved_ports.is_empty());
        assert_eq!(serde_json::to_string(&loaded).unwrap(), old);
    }

    #[test]
    fn records_keep_schema_1s_bytes() {
        let sample = sample_allocation(20001, Protocol::Tcp);
        assert_eq!(serde_json::to_string(&sample).unwrap(), RECORD);
        let closed: Allocation = serde_json::from_str(CLOSED_RECORD).unwrap();
        assert_eq!(closed.status, PortStatus::Closed);
        assert_eq!(closed.timeline.closed_at, Some(6));
        assert_eq!(serde_json::to_string(&closed).unwrap(), CLOSED_RECORD);
    }
}
