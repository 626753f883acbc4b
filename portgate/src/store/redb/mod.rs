//! The embedded store: a redb database.
//!
//! One writer thread owns every write. It takes whatever submissions are queued, applies them
//! in submission order in one transaction and commits once, so concurrent submitters share one
//! fsync (group commit). Reads run beside it on their own snapshots.
//!
//! The file is checked for damage when opened (every page's checksum): a damaged store is
//! refused with what to do, never trusted. While the store is open, the writer looks every
//! second (and before each commit) whether the file is still at its path: a file deleted
//! under the daemon (`rm -rf` of the state directory) would take every later commit with it
//! when the process ends, so the writer puts a copy of the open file back at its path and
//! goes on writing there; a path that now names another file (a backup put in its place)
//! fails every later commit, so that the daemon stops and its restart reads that file.

use std::{
    fmt,
    fs::File,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError, RwLock, mpsc},
    thread,
    time::Duration,
};

use prometheus_client::metrics::histogram::Histogram;
use redb::{
    Database, DatabaseError, ReadableDatabase, ReadableTable, ReadableTableMetadata, StorageError,
    TableDefinition, WriteTransaction,
};
use serde::Serialize;
use tokio::sync::oneshot;

use super::{Change, Commit, HostChanges, Store, StoreError, StoredState};
use crate::model::{Allocation, ClientKey, GrantIssued, NetnsId, PortId, Protocol};

/// Allocations of the host's namespace by (port, IP protocol number), which sorts as
/// [`PortId`] does. Values are the JSON of an [`Allocation`], kept as bytes so that a damaged
/// record is reported as [`StoreError::Corrupt`] rather than failing redb's own UTF-8
/// decoding.
const ALLOCATIONS: TableDefinition<(u16, u8), &[u8]> = TableDefinition::new("allocations");
/// Allocations of other namespaces by (netns cookie, port, IP protocol number), which sorts
/// as [`PortId`] does and after every host allocation (the host's cookie is 0). Two
/// containers may both hold port 80: only the cookie tells their records apart.
const NETNS_ALLOCATIONS: TableDefinition<(u64, u16, u8), &[u8]> =
    TableDefinition::new("netns_allocations");
/// Single records by name, JSON as bytes.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// Client keys for the knock, by name (since schema version 3).
const KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("keys");
/// Who issued each live grant, by `netns/port/proto/addr` (since schema version 3).
const GRANTS: TableDefinition<&str, &[u8]> = TableDefinition::new("grants");
/// The [`META`] record of the layout version.
const SCHEMA_VERSION_KEY: &str = "schema_version";
/// The [`META`] record of the [`HostChanges`].
const HOST_CHANGES_KEY: &str = "host_changes";
/// The layout this code reads and writes; a change to the tables or records that older code
/// would misread needs a new version. Version 2 added [`NETNS_ALLOCATIONS`]: a portgate of
/// version 1 would not see those allocations and could hand out the host ports they
/// publish. A version 1 store is upgraded in place when opened (the table is created).
const SCHEMA_VERSION: u32 = 3;
/// The older layouts this code upgrades: version 1 lacks [`NETNS_ALLOCATIONS`] and
/// [`KEYS`], version 2 lacks [`KEYS`]. Each missing table is created empty.
const SCHEMA_VERSION_1: u32 = 1;
/// See [`SCHEMA_VERSION_1`].
const SCHEMA_VERSION_2: u32 = 2;
/// Most submissions in one transaction, so that one commit's latency stays bounded.
const MAX_BATCH: usize = 4096;
/// Name of the writer thread (shown by `top -H` and in panics).
const WRITER_THREAD: &str = "portgate-store";
/// How often the writer looks whether its file is still at its path when no submission
/// wakes it sooner.
const FILE_CHECK_PERIOD: Duration = Duration::from_secs(1);
/// What to do about a damaged store file, said with every error that finds one.
const DAMAGED_ADVICE: &str = "the file is damaged: restore it from a backup (the kernel keeps \
     enforcing the ports it held meanwhile), or move it aside and run `portgate uninstall` \
     before starting afresh with an empty store";

/// What the writer has committed since the store was opened: fewer batches than submissions
/// means submissions shared transactions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommitStats {
    /// Transactions committed, one fsync each.
    pub batches: u64,
    /// Submissions those transactions held.
    pub submissions: u64,
    /// Changes those submissions held.
    pub changes: u64,
}

/// A queued [`Store::submit`]: its changes and who to tell when they are durable.
struct Submission {
    changes: Vec<Change>,
    done: oneshot::Sender<Result<(), StoreError>>,
}

/// The durable [`Store`]: one redb file, written by one thread with group commit.
///
/// Dropping it (or [`RedbStore::shutdown`]) writes everything already submitted first.
pub struct RedbStore {
    shared: Arc<Shared>,
    /// The writer's queue; `None` once shut down.
    submissions: RwLock<Option<mpsc::Sender<Submission>>>,
    writer: Mutex<Option<thread::JoinHandle<()>>>,
}

/// What the writer thread and the readers share.
struct Shared {
    path: PathBuf,
    /// The database; the writer replaces it when it puts a deleted file back.
    database: RwLock<Arc<Database>>,
    stats: Mutex<CommitStats>,
    /// How long each transaction took to write and sync, failed ones included.
    commit_latency: Histogram,
    /// What became of the file while the store was open (deleted and put back, replaced),
    /// for [`Store::describe`]; `None` while nothing has.
    file_note: Mutex<Option<String>>,
}

impl Shared {
    fn database(&self) -> Arc<Database> {
        Arc::clone(&self.database.read().unwrap_or_else(PoisonError::into_inner))
    }

    fn note(&self, note: String) {
        *self
            .file_note
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(note);
    }
}

impl RedbStore {
    /// Opens the database at `path`, creating it (and its directory) when missing, and starts
    /// its writer thread.
    ///
    /// Fails when another process has the database open, or when it was written by a portgate
    /// with another schema version.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let open_failed = |message: String| StoreError::Open {
            path: path.to_owned(),
            message,
        };
        if let Some(parent) = path
            .parent()
            .filter(|parent| !parent.as_os_str().is_empty())
        {
            std::fs::create_dir_all(parent).map_err(|error| {
                open_failed(format!(
                    "creating the directory {}: {error}",
                    parent.display()
                ))
            })?;
        }
        // The store holds client keys' secrets: root's alone, from its first byte on.
        let file = restrict_to_owner(path)
            .map_err(|error| open_failed(format!("making {} private: {error}", path.display())))?;
        let database = open_database(path).map_err(open_failed)?;
        prepare(&database).map_err(open_failed)?;

        let shared = Arc::new(Shared {
            path: path.to_owned(),
            database: RwLock::new(Arc::new(database)),
            stats: Mutex::new(CommitStats::default()),
            commit_latency: super::commit_histogram(),
            file_note: Mutex::new(None),
        });
        let (sender, receiver) = mpsc::channel();
        let writer = thread::Builder::new()
            .name(WRITER_THREAD.to_owned())
            .spawn({
                let shared = Arc::clone(&shared);
                move || write_loop(&shared, file, &receiver)
            })
            .map_err(|error| open_failed(format!("starting the writer thread: {error}")))?;
        Ok(Self {
            shared,
            submissions: RwLock::new(Some(sender)),
            writer: Mutex::new(Some(writer)),
        })
    }

    /// The database file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// What the writer has committed so far.
    #[must_use]
    pub fn commit_stats(&self) -> CommitStats {
        *self
            .shared
            .stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes everything already submitted, then stops the writer; later submissions resolve
    /// to [`StoreError::Closed`]. Reads keep working. Called by `drop`; calling it twice is
    /// harmless.
    pub fn shutdown(&self) {
        // The writer ends once its only sender is gone and the queue it left is written.
        drop(
            self.submissions
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
        let writer = self
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(writer) = writer {
            // A writer that panicked dropped its queue, so its submitters were told `Closed`.
            let _ = writer.join();
        }
    }

    fn allocation_count(&self) -> Result<u64, StoreError> {
        let transaction = self
            .shared
            .database()
            .begin_read()
            .map_err(failed("reading"))?;
        let host = transaction
            .open_table(ALLOCATIONS)
            .map_err(failed("reading"))?;
        let others = transaction
            .open_table(NETNS_ALLOCATIONS)
            .map_err(failed("reading"))?;
        Ok(host.len().map_err(failed("reading"))? + others.len().map_err(failed("reading"))?)
    }
}

impl Drop for RedbStore {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.shared.path)
            .field("commit_stats", &self.commit_stats())
            .finish_non_exhaustive()
    }
}

impl Store for RedbStore {
    fn load(&self) -> Result<StoredState, StoreError> {
        let transaction = self
            .shared
            .database()
            .begin_read()
            .map_err(failed("reading"))?;

        let host = transaction
            .open_table(ALLOCATIONS)
            .map_err(failed("reading"))?;
        let mut allocations = host
            .iter()
            .map_err(failed("reading"))?
            .map(|entry| {
                let (key, value) = entry.map_err(failed("reading"))?;
                let (port, protocol) = key.value();
                decode_allocation((0, port, protocol), value.value())
            })
            .collect::<Result<Vec<_>, _>>()?;
        let others = transaction
            .open_table(NETNS_ALLOCATIONS)
            .map_err(failed("reading"))?;
        for entry in others.iter().map_err(failed("reading"))? {
            let (key, value) = entry.map_err(failed("reading"))?;
            allocations.push(decode_allocation(key.value(), value.value())?);
        }

        let meta = transaction.open_table(META).map_err(failed("reading"))?;
        let host_changes = match meta.get(HOST_CHANGES_KEY).map_err(failed("reading"))? {
            Some(value) => {
                serde_json::from_slice(value.value()).map_err(|error| StoreError::Corrupt {
                    key: HOST_CHANGES_KEY.to_owned(),
                    message: error.to_string(),
                })?
            }
            None => HostChanges::default(),
        };

        let keys: Vec<ClientKey> = read_records(&transaction, KEYS, "key")?;
        let grants: Vec<GrantIssued> = read_records(&transaction, GRANTS, "grant")?;

        Ok(StoredState {
            allocations,
            host: host_changes,
            keys,
            grants,
        })
    }

    fn submit(&self, changes: Vec<Change>) -> Commit {
        let (done, commit) = Commit::channel();
        let submissions = self
            .submissions
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        // When the store is shut down, or its writer is gone, the submission is dropped here
        // with its sender, and the commit resolves to `Closed`.
        if let Some(sender) = submissions.as_ref() {
            let _ = sender.send(Submission { changes, done });
        }
        commit
    }

    fn commit_latency(&self) -> Option<Histogram> {
        Some(self.shared.commit_latency.clone())
    }

    fn describe(&self) -> String {
        // The count is a header field, not a scan; a failed read just leaves it out.
        let mut line = match self.allocation_count() {
            Ok(count) => format!("redb at {} ({count} allocations)", self.path().display()),
            Err(_) => format!("redb at {}", self.path().display()),
        };
        if let Some(note) = self
            .shared
            .file_note
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
        {
            line.push_str("; ");
            line.push_str(note);
        }
        line
    }
}

/// Opens (or creates) the database at `path`, checking every page of an existing one, so
/// that a file damaged outside redb is refused with what to do rather than trusted (redb
/// may panic on one it trusts).
fn open_database(path: &Path) -> Result<Database, String> {
    Database::builder()
        .set_check_integrity_on_open(true)
        .create(path)
        .map_err(|error| match error {
            DatabaseError::DatabaseAlreadyOpen => {
                "another process has it open; stop the other portgate daemon first".to_owned()
            }
            DatabaseError::Storage(StorageError::Corrupted(why)) => {
                format!("{why}: {DAMAGED_ADVICE}")
            }
            // What redb says of a file that is not one of its databases (damaged header).
            DatabaseError::Storage(StorageError::Io(io)) if is_damage(&io) => {
                format!("{io}: {DAMAGED_ADVICE}")
            }
            other => other.to_string(),
        })
}

/// Whether an I/O error of an open says the file's contents are wrong (a bad header, or
/// a file cut shorter than its header), rather than that it could not be read.
fn is_damage(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
    )
}

/// Creates the tables of a new database, or checks the schema version of an existing one
/// (upgrading versions 1 and 2, which lack tables, in the same transaction).
fn prepare(database: &Database) -> Result<(), String> {
    let transaction = database
        .begin_write()
        .map_err(|error| format!("preparing the tables: {error}"))?;
    {
        let create_failed = |error: redb::TableError| format!("creating the tables: {error}");
        transaction.open_table(ALLOCATIONS).map_err(create_failed)?;
        transaction
            .open_table(NETNS_ALLOCATIONS)
            .map_err(create_failed)?;
        transaction.open_table(KEYS).map_err(create_failed)?;
        transaction.open_table(GRANTS).map_err(create_failed)?;
        let mut meta = transaction.open_table(META).map_err(create_failed)?;
        let found = meta
            .get(SCHEMA_VERSION_KEY)
            .map_err(|error| format!("reading the schema version: {error}"))?
            .map(|value| serde_json::from_slice::<u32>(value.value()));
        match found {
            None | Some(Ok(SCHEMA_VERSION_1 | SCHEMA_VERSION_2)) => {
                let version = encode(&SCHEMA_VERSION)
                    .map_err(|error| format!("encoding the schema version: {error}"))?;
                meta.insert(SCHEMA_VERSION_KEY, version.as_slice())
                    .map_err(|error| format!("writing the schema version: {error}"))?;
            }
            Some(Ok(SCHEMA_VERSION)) => {}
            Some(Ok(version)) => {
                return Err(format!(
                    "it has schema version {version} and this portgate reads only version \
                     {SCHEMA_VERSION} (and upgrades {SCHEMA_VERSION_1} and {SCHEMA_VERSION_2}); \
                     run the portgate \
                     release that wrote it"
                ));
            }
            Some(Err(error)) => return Err(format!("its schema version is corrupt: {error}")),
        }
    }
    transaction
        .commit()
        .map_err(|error| format!("creating the tables: {error}"))
}

/// The writer thread: commits queued submissions in batches until every sender is gone and
/// the queue is empty. `file` is the store's file as opened: before each batch, and every
/// [`FILE_CHECK_PERIOD`] without one, the writer checks that the path still names it
/// ([`file::keep_at_path`]).
fn write_loop(shared: &Shared, mut file: File, submissions: &mpsc::Receiver<Submission>) {
    loop {
        let first = match submissions.recv_timeout(FILE_CHECK_PERIOD) {
            Ok(first) => Some(first),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        let at_path = file::keep_at_path(shared, &mut file);
        let Some(first) = first else {
            if let Err(error) = at_path {
                log::error!("{error}");
            }
            continue;
        };
        let mut batch = vec![first];
        batch.extend(submissions.try_iter().take(MAX_BATCH - 1));

        let outcome = at_path.and_then(|()| {
            let started = std::time::Instant::now();
            let written = write_batch(&shared.database(), &batch);
            shared
                .commit_latency
                .observe(started.elapsed().as_secs_f64());
            written
        });
        if outcome.is_ok() {
            let mut stats = shared.stats.lock().unwrap_or_else(PoisonError::into_inner);
            stats.batches += 1;
            stats.submissions += batch.len() as u64;
            stats.changes += batch
                .iter()
                .map(|submission| submission.changes.len() as u64)
                .sum::<u64>();
        }
        for submission in batch {
            // A submitter that stopped waiting has nobody to tell.
            let _ = submission.done.send(outcome.clone());
        }
    }
}

/// Applies `batch` in order in one transaction and commits it; on any failure nothing of it
/// is kept.
fn write_batch(database: &Database, batch: &[Submission]) -> Result<(), StoreError> {
    // The default durability is immediate: `commit` returns once the batch is fsynced.
    let transaction = database
        .begin_write()
        .map_err(failed("starting a write to"))?;
    let changes = batch.iter().flat_map(|submission| &submission.changes);
    match apply(&transaction, changes) {
        Ok(()) => transaction.commit().map_err(failed("committing to")),
        Err(error) => {
            // The change's own error is the one to report; a failed abort adds nothing.
            let _ = transaction.abort();
            Err(error)
        }
    }
}

fn apply<'a>(
    transaction: &WriteTransaction,
    changes: impl Iterator<Item = &'a Change>,
) -> Result<(), StoreError> {
    let mut host = transaction
        .open_table(ALLOCATIONS)
        .map_err(failed("writing to"))?;
    let mut others = transaction
        .open_table(NETNS_ALLOCATIONS)
        .map_err(failed("writing to"))?;
    let mut meta = transaction.open_table(META).map_err(failed("writing to"))?;
    let mut keys = transaction.open_table(KEYS).map_err(failed("writing to"))?;
    let mut grants = transaction
        .open_table(GRANTS)
        .map_err(failed("writing to"))?;
    for change in changes {
        match change {
            Change::Put(allocation) => {
                let id = allocation.id;
                let value = encode(allocation).map_err(failed("encoding an allocation for"))?;
                let written = if id.netns.is_host() {
                    host.insert(host_key(id), value.as_slice()).map(drop)
                } else {
                    others.insert(key(id), value.as_slice()).map(drop)
                };
                written.map_err(failed_on("writing to", id))?;
            }
            Change::Delete(id) => {
                let removed = if id.netns.is_host() {
                    host.remove(host_key(*id)).map(drop)
                } else {
                    others.remove(key(*id)).map(drop)
                };
                removed.map_err(failed_on("writing to", *id))?;
            }
            Change::SetHostChanges(host) => {
                let value = encode(host).map_err(failed("encoding the host changes for"))?;
                meta.insert(HOST_CHANGES_KEY, value.as_slice())
                    .map_err(failed_on("writing to", HOST_CHANGES_KEY))?;
            }
            Change::PutKey(key) => {
                let value = encode(key).map_err(failed("encoding a client key for"))?;
                keys.insert(key.name.as_str(), value.as_slice())
                    .map_err(failed_on("writing to", &key.name))?;
            }
            Change::PutGrant(grant) => {
                let name = grant_key(grant.id, grant.addr);
                let value = encode(grant).map_err(failed("encoding a grant for"))?;
                grants
                    .insert(name.as_str(), value.as_slice())
                    .map_err(failed_on("writing to", &name))?;
            }
            Change::DeleteGrant(id, addr) => {
                let name = grant_key(*id, *addr);
                grants
                    .remove(name.as_str())
                    .map_err(failed_on("writing to", &name))?;
            }
            Change::DeleteKey(name) => {
                keys.remove(name.as_str())
                    .map_err(failed_on("writing to", name))?;
            }
        }
    }
    Ok(())
}

/// The [`GRANTS`] key of a grant.
fn grant_key(id: PortId, addr: std::net::IpAddr) -> String {
    format!("{}/{}/{}/{addr}", id.netns.0, id.port, id.protocol)
}

/// The [`ALLOCATIONS`] key of a port of the host's namespace.
fn host_key(id: PortId) -> (u16, u8) {
    (id.port, id.protocol.number())
}

/// The [`NETNS_ALLOCATIONS`] key of a port of another namespace.
fn key(id: PortId) -> (u64, u16, u8) {
    (id.netns.0, id.port, id.protocol.number())
}

/// The allocation stored under `(netns cookie, port, protocol_number)` (the host's records
/// under cookie 0), checked against its key.
fn decode_allocation(
    (netns, port, protocol_number): (u64, u16, u8),
    value: &[u8],
) -> Result<Allocation, StoreError> {
    let Some(protocol) = Protocol::from_number(protocol_number) else {
        return Err(StoreError::Corrupt {
            key: format!("{port}/protocol {protocol_number}"),
            message: "not a managed protocol".to_owned(),
        });
    };
    let id = PortId {
        netns: NetnsId(netns),
        ..PortId::new(port, protocol)
    };
    let corrupt = |message: String| StoreError::Corrupt {
        key: id.to_string(),
        message,
    };
    let allocation: Allocation =
        serde_json::from_slice(value).map_err(|error| corrupt(error.to_string()))?;
    if allocation.id != id {
        return Err(corrupt(format!("the record is for {}", allocation.id)));
    }
    Ok(allocation)
}

fn encode(record: &impl Serialize) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(record)
}

/// Turns a redb error into a [`StoreError::Transaction`] saying what was being done.
fn failed<E: fmt::Display>(op: &'static str) -> impl FnOnce(E) -> StoreError {
    move |error| StoreError::Transaction {
        op,
        message: error.to_string(),
    }
}

/// [`failed`], naming the record.
fn failed_on<E: fmt::Display>(
    op: &'static str,
    record: impl fmt::Display,
) -> impl FnOnce(E) -> StoreError {
    move |error| StoreError::Transaction {
        op,
        message: format!("{record}: {error}"),
    }
}

/// Every record of a table of JSON records by name (`what` names one in errors).
fn read_records<T: serde::de::DeserializeOwned>(
    transaction: &redb::ReadTransaction,
    table: TableDefinition<&str, &[u8]>,
    what: &str,
) -> Result<Vec<T>, StoreError> {
    transaction
        .open_table(table)
        .map_err(failed("reading"))?
        .iter()
        .map_err(failed("reading"))?
        .map(|entry| {
            let (name, value) = entry.map_err(failed("reading"))?;
            serde_json::from_slice(value.value()).map_err(|error| StoreError::Corrupt {
                key: format!("{what} {}", name.value()),
                message: error.to_string(),
            })
        })
        .collect()
}

/// Creates `path` if it is missing, readable and writable by its owner only, and makes an
/// existing one so; returns it open (for reading: the writer's copy if it is deleted).
fn restrict_to_owner(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::PermissionsExt as _;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(file)
}

mod file;
#[cfg(test)]
mod tests;
