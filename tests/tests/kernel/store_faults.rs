//! The store's faults under the real daemon: its state directory full (a small tmpfs),
//! read-only, or deleted; its file cut short, emptied or with bytes flipped before a start.
//! Each gives an error that names the store and says what to do; no acknowledged change is
//! lost (after the fault is mended, every change that got a 2xx is there, and the kernel
//! maps equal the store); the kernel keeps enforcing throughout, with or without the daemon;
//! and the daemon never starts over an empty or damaged store, which would free ports the
//! kernel still enforces.

use std::{
    collections::BTreeMap,
    fs,
    time::{Duration, Instant},
};

use portgate::{
    api::{AllocRequest, AllocationView},
    client::{Client, ClientError},
    model::PortId,
    paths::STORE_FILE,
};
use portgate_tests::{
    common::{
        CONNECT_WITHIN, EchoServer, LOCAL, OTHER_LOCAL, REFUSED_WITHIN, connect_from, eventually,
        listen_in, loopback, tmpfs::Tmpfs,
    },
    daemon::Daemon,
    require_privileges,
    stress::{report, size},
};

/// How long the daemon may take to stop after the store refused a change (it looks every
/// 200 ms), on a loaded machine.
const STOPS_WITHIN: Duration = Duration::from_secs(15);

/// Stops `daemon`, moves its state directory onto a new tmpfs of `size` bytes and starts it
/// again there.
fn onto_tmpfs(daemon: &mut Daemon, size: u64) -> Tmpfs {
    assert!(
        daemon.stop(),
        "the daemon stops on SIGTERM:\n{}",
        daemon.log()
    );
    let state = daemon.state_dir();
    let store = state.join(STORE_FILE);
    let kept = daemon.dir.path().join("moved.redb");
    fs::rename(&store, &kept).expect("move the store aside");
    let tmpfs = Tmpfs::mount(&state, size);
    fs::copy(&kept, &store).expect("copy the store onto the tmpfs");
    fs::remove_file(&kept).expect("remove the moved store");
    daemon.spawn();
    tmpfs
}

/// An allocation of the first free port for `owner`.
fn allocate(daemon: &Daemon, owner: &str) -> Result<AllocationView, ClientError> {
    let request = AllocRequest {
        owner: owner.to_owned(),
        ..AllocRequest::default()
    };
    daemon.api(|client| client.alloc(&request))
}

/// A port open to 127.0.0.1 only, with a server behind it: what "the kernel keeps
/// enforcing" is checked on.
struct Guarded {
    id: PortId,
    _server: EchoServer,
}

impl Guarded {
    fn new(daemon: &Daemon) -> Self {
        let request = AllocRequest {
            owner: "guarded".to_owned(),
            allow: vec!["127.0.0.1/32".parse().expect("a prefix")],
            ..AllocRequest::default()
        };
        let held = daemon
            .api(|client| client.alloc(&request))
            .expect("allocate the guarded port");
        let server = daemon
            .ns
            .run(|| EchoServer::serve(listen_in(&daemon.cgroup, loopback(held.id.port))));
        Self {
            id: held.id,
            _server: server,
        }
    }

    /// The allowed source gets in; another is refused.
    fn assert_enforced(&self, daemon: &Daemon, when: &str) {
        let addr = loopback(self.id.port);
        daemon
            .ns
            .run(|| connect_from(LOCAL, addr, CONNECT_WITHIN))
            .unwrap_or_else(|err| panic!("{when}: the allowed source was refused: {err}"));
        assert!(
            daemon
                .ns
                .run(|| connect_from(OTHER_LOCAL, addr, REFUSED_WITHIN))
                .is_err(),
            "{when}: a source outside the allowlist got in"
        );
    }
}

/// Every acknowledged allocation is held by its owner, and the kernel equals the store.
fn assert_kept(daemon: &Daemon, acknowledged: &BTreeMap<PortId, String>) {
    let held = daemon.assert_consistent();
    for (id, owner) in acknowledged {
        let view = held
            .get(id)
            .unwrap_or_else(|| panic!("the acknowledged allocation of {id} ({owner}) was lost"));
        assert_eq!(&view.owner, owner, "{id} changed hands");
    }
}

/// Each allocation's owner, status and times: what a restart must keep.
fn summary(held: &BTreeMap<PortId, AllocationView>) -> BTreeMap<PortId, String> {
    held.iter()
        .map(|(id, view)| {
            (
                *id,
                format!("{} {:?} {:?}", view.owner, view.status, view.timeline),
            )
        })
        .collect()
}

#[test]
fn a_full_state_directory_refuses_changes_clearly_and_loses_nothing() {
    if !require_privileges!() {
        return;
    }
    let mut daemon = Daemon::start(43_000, 43_999);
    let guarded = Guarded::new(&daemon);
    let mut acknowledged = BTreeMap::from([(guarded.id, "guarded".to_owned())]);
    let tmpfs = onto_tmpfs(&mut daemon, 2 << 20);
    let state = daemon.state_dir();

    // Fill the tmpfs to the last byte.
    let (filler_path, filler_bytes) = tmpfs.fill();

    // Changes go on while redb finds room in pages its file already has, then one is
    // refused: with a 500 that names the store and the cause, and undone.
    let mut refusal = None;
    let mut accepted_when_full = 0_u32;
    for n in 0..size(2_000, 5_000) {
        let owner = format!("full-{n}");
        match allocate(&daemon, &owner) {
            Ok(view) => {
                acknowledged.insert(view.id, owner);
                accepted_when_full += 1;
            }
            Err(err) => {
                refusal = Some(err);
                break;
            }
        }
    }
    let Some(ClientError::Daemon {
        status, message, ..
    }) = refusal
    else {
        panic!("no change was refused on a full state directory: {refusal:?}");
    };
    assert_eq!(status, 500, "{message}");
    for needed in [
        "was not saved and was undone",
        "the store",
        "No space left on device",
        "Check free space",
    ] {
        assert!(message.contains(needed), "{needed:?} not in: {message}");
    }

    // The daemon stops (a restart makes the kernel equal to the store), saying why; the
    // kernel enforces meanwhile.
    let exit = daemon
        .wait_exit(STOPS_WITHIN)
        .unwrap_or_else(|| panic!("the daemon did not stop:\n{}", daemon.log()));
    assert!(!exit.success());
    let log = daemon.log();
    assert!(
        log.contains(&format!(
            "the store at {} refused a change: check its disk space",
            state.join(STORE_FILE).display()
        )),
        "{log}"
    );
    guarded.assert_enforced(&daemon, "with the daemon stopped on a full disk");

    // Started again on the still-full disk: it reads and serves, and `status` says where
    // the store is; the next change is refused the same way, and the daemon stops again.
    daemon.spawn();
    let status = daemon.cli_ok(None, &["status"]);
    assert!(
        status.contains(&state.join(STORE_FILE).display().to_string()),
        "{status}"
    );
    assert_kept(&daemon, &acknowledged);
    let mut refused_again = false;
    for n in 0..100 {
        let owner = format!("again-{n}");
        match allocate(&daemon, &owner) {
            Ok(view) => {
                acknowledged.insert(view.id, owner);
            }
            Err(ClientError::Daemon { message, .. }) => {
                assert!(message.contains("No space left on device"), "{message}");
                refused_again = true;
                break;
            }
            Err(other) => panic!("{other}"),
        }
    }
    assert!(refused_again, "the full disk took 100 more allocations");
    assert!(daemon.wait_exit(STOPS_WITHIN).is_some());
    guarded.assert_enforced(&daemon, "after the second refusal");

    // Room again: every acknowledged change is there, and changes are taken.
    fs::remove_file(&filler_path).expect("remove the filler");
    daemon.spawn();
    assert_kept(&daemon, &acknowledged);
    let after = allocate(&daemon, "after").expect("an allocation once there is room");
    acknowledged.insert(after.id, "after".to_owned());
    daemon
        .api(|client| client.release(after.id))
        .expect("a release once there is room");
    guarded.assert_enforced(&daemon, "after the disk had room again");
    // The daemon stopped, its tmpfs unmounted, then its directory removed: removing a
    // directory with a mount in it fails and leaves it behind.
    let _stopped = daemon.stop();
    drop(tmpfs);
    drop(daemon);
    report(
        "store",
        "The state directory was a 2 MiB tmpfs filled to the last byte under the running daemon, then allocations were made until one failed; the daemon was started again on the full disk, then once the space was freed.",
        "Allocations that fit in the pages redb already had were acknowledged; the next was answered 500 naming the store and ENOSPC and undone, and the daemon stopped so that a restart reconciles; restarted on the full disk it served reads and refused the next change the same way; once space was freed every acknowledged allocation was there, the kernel maps equalled the store, and the allowlisted port refused other sources throughout.",
        &serde_json::json!({
            "filler_bytes": filler_bytes,
            "acknowledged_after_full": accepted_when_full,
            "acknowledged_total": acknowledged.len(),
        }),
    );
}

#[test]
fn a_read_only_state_directory_is_refused_at_start_and_the_kernel_keeps_enforcing() {
    if !require_privileges!() {
        return;
    }
    let mut daemon = Daemon::start(43_000, 43_099);
    let guarded = Guarded::new(&daemon);
    let tmpfs = onto_tmpfs(&mut daemon, 4 << 20);
    let mut acknowledged = BTreeMap::from([(guarded.id, "guarded".to_owned())]);
    for n in 0..5 {
        let owner = format!("ro-{n}");
        let view = allocate(&daemon, &owner).expect("allocate");
        acknowledged.insert(view.id, owner);
    }

    // Linux does not make a filesystem read-only while a file on it is open for writing
    // (the daemon's store): the remount is refused and the daemon goes on.
    let under_the_daemon = tmpfs.remount(true);
    let busy = under_the_daemon
        .as_ref()
        .expect_err("a filesystem with the open store was made read-only");
    assert!(busy.contains("busy"), "{busy}");
    let view = allocate(&daemon, "still-writable").expect("the store is still writable");
    acknowledged.insert(view.id, "still-writable".to_owned());

    // Stopped, the directory is made read-only: the daemon refuses to start, naming the
    // file and the cause, and the kernel enforces meanwhile.
    assert!(daemon.stop());
    tmpfs.remount(true).expect("remount read-only");
    let printed = daemon
        .try_spawn()
        .expect_err("the daemon started on a read-only store");
    let store = daemon.state_dir().join(STORE_FILE);
    assert!(
        printed.contains(&format!("opening the store at {}", store.display())),
        "{printed}"
    );
    assert!(printed.contains("Read-only file system"), "{printed}");
    guarded.assert_enforced(&daemon, "with the store read-only");

    tmpfs.remount(false).expect("remount read-write");
    daemon.spawn();
    assert_kept(&daemon, &acknowledged);
    guarded.assert_enforced(&daemon, "after the store was writable again");
    // The daemon stopped, its tmpfs unmounted, then its directory removed: removing a
    // directory with a mount in it fails and leaves it behind.
    let _stopped = daemon.stop();
    drop(tmpfs);
    drop(daemon);
    report(
        "store",
        "The state directory (a tmpfs) was remounted read-only under the running daemon, then with the daemon stopped, and the daemon started on it.",
        "The remount under the daemon was refused by the kernel (the store is open for writing) and changes went on; on the read-only directory the daemon refused to start, naming the store and EROFS, while the kernel kept enforcing; read-write again, every acknowledged allocation was there and the kernel maps equalled the store.",
        &serde_json::json!({ "acknowledged": acknowledged.len() }),
    );
}

#[test]
fn a_store_deleted_under_the_daemon_is_put_back_and_one_deleted_before_a_start_is_refused() {
    if !require_privileges!() {
        return;
    }
    let mut daemon = Daemon::start(43_000, 43_099);
    let guarded = Guarded::new(&daemon);
    let mut acknowledged = BTreeMap::from([(guarded.id, "guarded".to_owned())]);
    for n in 0..5 {
        let owner = format!("before-{n}");
        let view = allocate(&daemon, &owner).expect("allocate");
        acknowledged.insert(view.id, owner);
    }
    let state = daemon.state_dir();
    let store = state.join(STORE_FILE);

    // `rm -rf` of the state directory under the running daemon: the daemon puts its open
    // copy back within a second or two, says so in its log and `status`, and goes on.
    fs::remove_dir_all(&state).expect("rm -rf the state directory");
    let deleted_at = Instant::now();
    assert!(
        eventually(Duration::from_secs(10), || store.exists()),
        "the store was not put back:\n{}",
        daemon.log()
    );
    let put_back_after = deleted_at.elapsed();
    assert!(
        eventually(Duration::from_secs(5), || daemon
            .log()
            .contains("was deleted while the daemon ran and was put back")),
        "{}",
        daemon.log()
    );
    let status = daemon.cli_ok(None, &["status"]);
    assert!(
        status.contains("was deleted while the daemon ran"),
        "{status}"
    );
    for n in 0..5 {
        let owner = format!("after-{n}");
        let view = allocate(&daemon, &owner).expect("allocate after the deletion");
        acknowledged.insert(view.id, owner);
    }
    // No clean shutdown: what is on disk must hold it all.
    daemon.kill9();
    daemon.spawn();
    assert_kept(&daemon, &acknowledged);
    guarded.assert_enforced(&daemon, "after the store was put back");

    // Deleted while no daemon runs: a start would make an empty store and free every port
    // the kernel enforces, so it is refused with what to do; the kernel enforces meanwhile.
    assert!(daemon.stop());
    let saved = daemon.dir.path().join("backup.redb");
    fs::copy(&store, &saved).expect("a backup");
    fs::remove_dir_all(&state).expect("rm -rf the state directory");
    let printed = daemon
        .try_spawn()
        .expect_err("the daemon started on a deleted store");
    assert!(
        printed.contains(&format!(
            "the store {} is missing or empty",
            store.display()
        )),
        "{printed}"
    );
    assert!(
        printed.contains("Restore the store from a backup"),
        "{printed}"
    );
    assert!(!store.exists(), "the refused start made a store");
    guarded.assert_enforced(&daemon, "with the store deleted");
    assert_eq!(
        daemon.kernel_policies(),
        acknowledged.keys().copied().collect(),
        "the refused start changed the kernel"
    );

    // Restored from the backup, it starts with everything.
    fs::create_dir_all(&state).expect("the state directory");
    fs::copy(&saved, &store).expect("restore the backup");
    daemon.spawn();
    assert_kept(&daemon, &acknowledged);
    report(
        "store",
        "The state directory was deleted (rm -rf) under the running daemon, changes were made, and the daemon was killed with kill -9 and started again; then the directory was deleted with the daemon stopped and the daemon started.",
        "The daemon put the store file back from its open copy, said so in its log and in status, and took changes on; after kill -9 every acknowledged allocation was there and the kernel maps equalled the store. Started with the store deleted, it refused, naming the store and what to do, without touching the kernel, which kept enforcing; restored from a backup, it started with everything.",
        &serde_json::json!({
            "put_back_after_ms": put_back_after.as_millis(),
            "acknowledged": acknowledged.len(),
        }),
    );
}

/// The store's bytes `good` cut short, emptied, and with 8 bytes flipped at offsets over
/// the whole file (the header, and a few bytes into each page), each named.
fn damages(good: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut damages: Vec<(String, Vec<u8>)> = vec![
        ("emptied".to_owned(), Vec::new()),
        ("cut to 100 bytes".to_owned(), good[..100].to_vec()),
        ("cut to one page".to_owned(), good[..4096].to_vec()),
        ("cut in half".to_owned(), good[..good.len() / 2].to_vec()),
        (
            "cut by one byte".to_owned(),
            good[..good.len() - 1].to_vec(),
        ),
    ];
    let offsets = [0, 9, 40, 64, 200, 300, 600, 1000, 2000].into_iter().chain(
        (4096..good.len())
            .step_by(4096)
            .flat_map(|page| [page, page + 200]),
    );
    for offset in offsets.filter(|offset| offset + 8 <= good.len()) {
        let mut flipped = good.to_vec();
        for byte in &mut flipped[offset..offset + 8] {
            *byte ^= 0xff;
        }
        damages.push((format!("8 bytes flipped at {offset}"), flipped));
    }
    damages
}

#[test]
fn a_damaged_store_is_refused_with_what_to_do_and_never_starts_short() {
    if !require_privileges!() {
        return;
    }
    // A long quarantine, so that the released ports stay Closed through every start.
    let mut daemon = Daemon::start_with_ports(43_000, 43_099, "quarantine = \"1h\"");
    let guarded = Guarded::new(&daemon);
    let mut acknowledged = BTreeMap::from([(guarded.id, "guarded".to_owned())]);
    for n in 0..30 {
        let owner = format!("damaged-{n}");
        let view = allocate(&daemon, &owner).expect("allocate");
        acknowledged.insert(view.id, owner);
    }
    // Some released, so that the file has pages of older versions too.
    let released: Vec<PortId> = acknowledged
        .iter()
        .filter(|(_, owner)| owner.starts_with("damaged-2"))
        .map(|(id, _)| *id)
        .collect();
    for id in released.iter().copied() {
        daemon.api(|client| client.release(id)).expect("release");
    }
    assert!(
        eventually(Duration::from_secs(10), || daemon
            .allocations()
            .values()
            .filter(|view| view.status == portgate::model::PortStatus::Closed)
            .count()
            == released.len()),
        "the released ports did not close"
    );
    let expected = summary(&daemon.assert_consistent());
    assert!(daemon.stop());
    let store = daemon.state_dir().join(STORE_FILE);
    let good = fs::read(&store).expect("read the store");

    // Every damage at the stress size; at the CI size the cuts, the header and three pages
    // (a start takes about a second each).
    let all = damages(&good);
    let damages: Vec<_> = if portgate_tests::stress::stressed() {
        all
    } else {
        let pages = all.len() - 14;
        all.into_iter()
            .enumerate()
            .filter(|(n, _)| *n < 7 || [14, 14 + pages / 2, 14 + pages - 1].contains(n))
            .map(|(_, damage)| damage)
            .collect()
    };
    let (mut refused, mut harmless) = (0_u32, 0_u32);
    for (damage, bytes) in &damages {
        fs::write(&store, bytes).expect("damage the store");
        if let Err(printed) = daemon.try_spawn() {
            refused += 1;
            assert!(
                printed.contains(&store.display().to_string()),
                "{damage}: the error does not name the file:\n{printed}"
            );
            assert!(
                printed.contains("restore it from a backup")
                    || printed.contains("Restore the store from a backup"),
                "{damage}: the error does not say what to do:\n{printed}"
            );
            assert!(
                !printed.contains("panicked"),
                "{damage}: the daemon panicked:\n{printed}"
            );
            assert_eq!(
                daemon.kernel_policies(),
                expected.keys().copied().collect(),
                "{damage}: the refused start changed the kernel"
            );
        } else {
            // A flip in bytes no commit uses: it starts with everything.
            harmless += 1;
            assert_eq!(
                summary(&daemon.assert_consistent()),
                expected,
                "{damage}: the daemon started with other allocations"
            );
            assert!(daemon.stop());
        }
        guarded.assert_enforced(&daemon, damage);
        fs::write(&store, &good).expect("put the good store back");
    }
    daemon.spawn();
    assert_eq!(summary(&daemon.assert_consistent()), expected);
    let status = daemon.api(Client::status).expect("status");
    assert!(status.store.contains(&store.display().to_string()));
    report(
        "store",
        "The store file was emptied, cut short at four lengths, or had 8 bytes flipped at offsets over the whole file (header and every page), each before a start of the daemon.",
        "Every damage either was refused at start with an error naming the file and saying to restore it from a backup (never a panic, the kernel untouched and enforcing) or, for bytes no commit uses, started with exactly the allocations it had; none started with fewer.",
        &serde_json::json!({
            "damages": damages.len(),
            "refused": refused,
            "harmless": harmless,
            "file_bytes": good.len(),
        }),
    );
}
