//! The redb store's own tests: round trips, reopening, group commit, damaged records and
//! schema versions.

use super::*;
use crate::model::sample_allocation;

fn database_path(dir: &tempfile::TempDir) -> PathBuf {
    // A missing subdirectory, so `open` has to create it.
    dir.path().join("state").join("portgate.redb")
}

fn commit(store: &RedbStore, changes: Vec<Change>) {
    store.submit(changes).wait_blocking().unwrap();
}

#[test]
fn put_delete_load_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(&database_path(&dir)).unwrap();
    assert_eq!(store.load().unwrap(), StoredState::default());

    let first = sample_allocation(20001, Protocol::Tcp);
    let kept = sample_allocation(20001, Protocol::Udp);
    let deleted = sample_allocation(20002, Protocol::Tcp);
    // A lower port written later: load must still give key order.
    let low = sample_allocation(900, Protocol::Tcp);
    commit(
        &store,
        vec![
            Change::Put(kept.clone()),
            Change::Put(deleted.clone()),
            Change::Put(first.clone()),
        ],
    );
    commit(
        &store,
        vec![Change::Put(low.clone()), Change::Delete(deleted.id)],
    );

    let state = store.load().unwrap();
    assert_eq!(state.allocations, vec![low, first, kept]);
    assert_eq!(state.host, HostChanges::default());
    assert_eq!(
        store.describe(),
        format!("redb at {} (3 allocations)", store.path().display())
    );
}

#[test]
fn host_changes_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(&database_path(&dir)).unwrap();
    let host = crate::store::sample_host_changes();
    commit(&store, vec![Change::SetHostChanges(host.clone())]);
    assert_eq!(store.load().unwrap().host, host);
}

/// A client key named `name` with a secret of its own.
fn sample_key(name: &str) -> crate::model::ClientKey {
    crate::model::ClientKey {
        name: name.to_owned(),
        secret: [name.len().try_into().unwrap_or(0); crate::model::CLIENT_KEY_BYTES],
        ports: vec![crate::model::PortId::new(20001, Protocol::Tcp)],
        max_ttl: std::time::Duration::from_mins(5),
        any_source: name == "carol",
        created_at: 1_800_000_000_000,
        last_knock: 1_800_000_100,
    }
}

/// Who issued a grant: a key.
fn sample_grant() -> crate::model::GrantIssued {
    crate::model::GrantIssued {
        id: crate::model::PortId::new(20001, Protocol::Tcp),
        addr: "192.0.2.7".parse().unwrap(),
        issuer: crate::model::Issuer::Key("alice".to_owned()),
        expires_at: 1_800_000_060_000,
    }
}

#[test]
fn reopen_sees_every_committed_change() {
    let dir = tempfile::tempdir().unwrap();
    let path = database_path(&dir);
    let host = HostChanges {
        reserved_ports_added: vec![(20000, 20999)],
        ..HostChanges::default()
    };
    let expected = {
        let store = RedbStore::open(&path).unwrap();
        commit(
            &store,
            vec![
                Change::Put(sample_allocation(20001, Protocol::Tcp)),
                Change::Put(sample_allocation(20002, Protocol::Udp)),
                Change::SetHostChanges(host.clone()),
                Change::PutKey(sample_key("alice")),
                Change::PutKey(sample_key("bob")),
                Change::PutKey(sample_key("carol")),
                Change::DeleteKey("bob".to_owned()),
                Change::PutGrant(sample_grant()),
                Change::PutGrant(crate::model::GrantIssued {
                    addr: "192.0.2.99".parse().unwrap(),
                    ..sample_grant()
                }),
                Change::DeleteGrant(
                    crate::model::PortId::new(20001, Protocol::Tcp),
                    "192.0.2.99".parse().unwrap(),
                ),
            ],
        );
        // Not waited for: dropping the store must still write it.
        let _ = store.submit(vec![Change::Put(sample_allocation(20003, Protocol::Tcp))]);
        StoredState {
            allocations: vec![
                sample_allocation(20001, Protocol::Tcp),
                sample_allocation(20002, Protocol::Udp),
                sample_allocation(20003, Protocol::Tcp),
            ],
            host,
            keys: vec![sample_key("alice"), sample_key("carol")],
            grants: vec![sample_grant()],
        }
    };

    let reopened = RedbStore::open(&path).unwrap();
    assert_eq!(reopened.load().unwrap(), expected);
}

#[test]
fn concurrent_submitters_share_commits() {
    const THREADS: u16 = 8;
    const SUBMITS: u16 = 200;

    let dir = tempfile::tempdir().unwrap();
    let path = database_path(&dir);
    let store = RedbStore::open(&path).unwrap();
    thread::scope(|scope| {
        for thread in 0..THREADS {
            let store = &store;
            scope.spawn(move || {
                for i in 0..SUBMITS {
                    let allocation = sample_allocation(10000 + thread * SUBMITS + i, Protocol::Tcp);
                    commit(store, vec![Change::Put(allocation)]);
                }
            });
        }
    });

    let total = u64::from(THREADS * SUBMITS);
    let stats = store.commit_stats();
    assert_eq!(stats.submissions, total);
    assert_eq!(stats.changes, total);
    assert!(
        stats.batches < stats.submissions,
        "no submissions shared a commit: {stats:?}"
    );

    drop(store);
    let allocations = RedbStore::open(&path).unwrap().load().unwrap().allocations;
    let ports: Vec<u16> = allocations
        .iter()
        .map(|allocation| allocation.id.port)
        .collect();
    let expected: Vec<u16> = (10000..10000 + THREADS * SUBMITS).collect();
    assert_eq!(ports, expected);
}

/// Makes a store at `path`, then writes `value` under `key` in `table` with redb
/// itself, as a damaged or foreign file would hold it.
fn write_behind_the_store<K: redb::Key + 'static>(
    path: &Path,
    table: TableDefinition<K, &'static [u8]>,
    key: K::SelfType<'_>,
    value: &[u8],
) {
    drop(RedbStore::open(path).unwrap());
    let database = Database::create(path).unwrap();
    let transaction = database.begin_write().unwrap();
    transaction
        .open_table(table)
        .unwrap()
        .insert(key, value)
        .unwrap();
    transaction.commit().unwrap();
}

#[test]
fn corrupt_record_names_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = database_path(&dir);
    write_behind_the_store(
        &path,
        ALLOCATIONS,
        (20001, Protocol::Tcp.number()),
        &[0xff, 0x00, 0x7b],
    );

    let store = RedbStore::open(&path).unwrap();
    match store.load() {
        Err(StoreError::Corrupt { key, .. }) => assert_eq!(key, "20001/tcp"),
        other => panic!("expected Corrupt for 20001/tcp, got {other:?}"),
    }
}

#[test]
fn record_under_another_key_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let path = database_path(&dir);
    let misplaced = encode(&sample_allocation(20002, Protocol::Tcp)).unwrap();
    write_behind_the_store(
        &path,
        ALLOCATIONS,
        (20001, Protocol::Tcp.number()),
        &misplaced,
    );

    let store = RedbStore::open(&path).unwrap();
    match store.load() {
        Err(StoreError::Corrupt { key, message }) => {
            assert_eq!(key, "20001/tcp");
            assert!(message.contains("20002/tcp"), "{message}");
        }
        other => panic!("expected Corrupt for 20001/tcp, got {other:?}"),
    }
}

#[test]
fn submission_order_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = database_path(&dir);
    let allocation = sample_allocation(20001, Protocol::Tcp);
    {
        let store = RedbStore::open(&path).unwrap();
        let put = store.submit(vec![Change::Put(allocation.clone())]);
        let delete = store.submit(vec![Change::Delete(allocation.id)]);
        put.wait_blocking().unwrap();
        delete.wait_blocking().unwrap();
    }
    let reopened = RedbStore::open(&path).unwrap();
    assert!(reopened.load().unwrap().allocations.is_empty());
}

#[test]
fn submit_after_shutdown_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(&database_path(&dir)).unwrap();
    let before = store.submit(vec![Change::Put(sample_allocation(20001, Protocol::Tcp))]);
    store.shutdown();
    before.wait_blocking().unwrap();
    let after = store.submit(vec![Change::Delete(PortId::new(20001, Protocol::Tcp))]);
    assert!(matches!(after.wait_blocking(), Err(StoreError::Closed)));
    // Reads still work, and the refused delete left the record alone.
    assert_eq!(store.load().unwrap().allocations.len(), 1);
}

#[test]
fn second_open_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = database_path(&dir);
    let _store = RedbStore::open(&path).unwrap();
    let error = RedbStore::open(&path).unwrap_err();
    assert!(
        error.to_string().contains("another process has it open"),
        "{error}"
    );
}

#[test]
fn newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = database_path(&dir);
    write_behind_the_store(&path, META, SCHEMA_VERSION_KEY, b"4");
    let error = RedbStore::open(&path).unwrap_err();
    assert!(error.to_string().contains("schema version 4"), "{error}");
}

/// `sample_allocation` in the namespace with cookie `netns`.
fn in_netns(netns: u64, port: u16) -> Allocation {
    let mut allocation = sample_allocation(port, Protocol::Tcp);
    allocation.id.netns = NetnsId(netns);
    allocation
}

#[test]
fn the_same_port_of_two_namespaces_is_two_records() {
    let dir = tempfile::tempdir().unwrap();
    let path = database_path(&dir);
    let host = sample_allocation(20080, Protocol::Tcp);
    let (first, second) = (in_netns(7, 80), in_netns(9, 80));
    {
        let store = RedbStore::open(&path).unwrap();
        commit(
            &store,
            vec![
                Change::Put(second.clone()),
                Change::Put(first.clone()),
                Change::Put(in_netns(9, 443)),
                Change::Put(host.clone()),
            ],
        );
        commit(&store, vec![Change::Delete(in_netns(9, 443).id)]);
        assert_eq!(
            store.describe(),
            format!("redb at {} (3 allocations)", store.path().display())
        );
    }
    let reopened = RedbStore::open(&path).unwrap();
    // PortId order: the host's namespace (cookie 0) first.
    assert_eq!(reopened.load().unwrap().allocations, [host, first, second]);
}

#[test]
fn a_schema_1_store_is_upgraded_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = database_path(&dir);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    {
        // What portgate wrote before version 2: no netns table.
        let database = Database::create(&path).unwrap();
        let transaction = database.begin_write().unwrap();
        transaction
            .open_table(ALLOCATIONS)
            .unwrap()
            .insert(
                host_key(sample_allocation(20001, Protocol::Tcp).id),
                encode(&sample_allocation(20001, Protocol::Tcp))
                    .unwrap()
                    .as_slice(),
            )
            .unwrap();
        transaction
            .open_table(META)
            .unwrap()
            .insert(SCHEMA_VERSION_KEY, b"1".as_slice())
            .unwrap();
        transaction.commit().unwrap();
    }
    let store = RedbStore::open(&path).unwrap();
    assert_eq!(
        store.load().unwrap().allocations,
        [sample_allocation(20001, Protocol::Tcp)]
    );
    commit(&store, vec![Change::Put(in_netns(7, 80))]);
    drop(store);
    let database = Database::create(&path).unwrap();
    let transaction = database.begin_read().unwrap();
    let version = transaction
        .open_table(META)
        .unwrap()
        .get(SCHEMA_VERSION_KEY)
        .unwrap()
        .map(|value| value.value().to_vec());
    assert_eq!(version.as_deref(), Some(b"3".as_slice()));
}

#[test]
fn the_store_file_is_its_owners_alone_new_or_found_open_to_others() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let path = database_path(&dir);
    let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    drop(RedbStore::open(&path).unwrap());
    assert_eq!(mode(&path), 0o600, "made private");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let store = RedbStore::open(&path).unwrap();
    assert_eq!(
        mode(&path),
        0o600,
        "an existing store open to others is made private"
    );
    assert_eq!(
        store.load().unwrap(),
        StoredState::default(),
        "and still opens"
    );
}

#[test]
fn a_file_deleted_under_the_store_is_put_back_with_everything() {
    let dir = tempfile::tempdir().unwrap();
    let path = database_path(&dir);
    let store = RedbStore::open(&path).unwrap();
    commit(
        &store,
        vec![Change::Put(sample_allocation(20001, Protocol::Tcp))],
    );
    std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    // The next commit finds the file gone first, puts it back and is written there.
    commit(
        &store,
        vec![Change::Put(sample_allocation(20002, Protocol::Tcp))],
    );
    assert!(path.exists(), "put back");
    assert!(
        store
            .describe()
            .contains("was deleted while the daemon ran and was put back"),
        "{}",
        store.describe()
    );
    let (before, after) = (store.load().unwrap(), {
        // What a process that never saw the old file reads.
        drop(store);
        RedbStore::open(&path).unwrap().load().unwrap()
    });
    assert_eq!(before.allocations.len(), 2);
    assert_eq!(after, before);
}

#[test]
fn a_file_deleted_under_an_idle_store_is_put_back_within_a_period() {
    let dir = tempfile::tempdir().unwrap();
    let path = database_path(&dir);
    let store = RedbStore::open(&path).unwrap();
    commit(
        &store,
        vec![Change::Put(sample_allocation(20001, Protocol::Tcp))],
    );
    std::fs::remove_file(&path).unwrap();
    let deadline = std::time::Instant::now() + 5 * FILE_CHECK_PERIOD;
    while !path.exists() {
        assert!(std::time::Instant::now() < deadline, "not put back");
        thread::sleep(Duration::from_millis(20));
    }
    drop(store);
    let reopened = RedbStore::open(&path).unwrap();
    assert_eq!(reopened.load().unwrap().allocations.len(), 1);
}

#[test]
fn a_file_replaced_under_the_store_fails_every_later_commit() {
    let dir = tempfile::tempdir().unwrap();
    let path = database_path(&dir);
    let store = RedbStore::open(&path).unwrap();
    commit(
        &store,
        vec![Change::Put(sample_allocation(20001, Protocol::Tcp))],
    );
    // A backup put in its place (a rename over it).
    let other = dir.path().join("backup.redb");
    drop(RedbStore::open(&other).unwrap());
    std::fs::rename(&other, &path).unwrap();
    for port in [20002, 20003] {
        let refused = store
            .submit(vec![Change::Put(sample_allocation(port, Protocol::Tcp))])
            .wait_blocking()
            .unwrap_err();
        assert!(
            refused.to_string().contains("another file took its place"),
            "{refused}"
        );
    }
    assert!(store.describe().contains("now names another file"));
    drop(store);
    assert!(
        RedbStore::open(&path)
            .unwrap()
            .load()
            .unwrap()
            .allocations
            .is_empty(),
        "the file put in its place was left alone"
    );
}

#[test]
fn a_damaged_file_is_refused_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let path = database_path(&dir);
    drop(RedbStore::open(&path).unwrap());
    let good = std::fs::read(&path).unwrap();
    for damaged in [
        good[..100].to_vec(),
        good[..good.len() / 2].to_vec(),
        [b"not redb".as_slice(), &good[8..]].concat(),
    ] {
        std::fs::write(&path, &damaged).unwrap();
        let refused = RedbStore::open(&path).unwrap_err().to_string();
        assert!(refused.contains(&path.display().to_string()), "{refused}");
        assert!(refused.contains("restore it from a backup"), "{refused}");
    }
}
