//! Fleet mode's shared store (issue #14, in progress) against a real etcd on loopback:
//! nodes claiming ports at once never hold one twice, a release racing a change of the
//! same port lets exactly one through, a watch sees every change and reports a compaction,
//! a paused etcd fails requests instead of hanging them, and a node's liveness key goes
//! with its lease.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use portgate::{
    config::ClusterConfig,
    fleet::{Fleet, FleetError, FleetEvent, NodeInfo},
    model::{
        Allocation, Owner, PortAccessControl, PortId, PortStatus, Protocol, Timeline, now_millis,
    },
};
use portgate_tests::{common::eventually, etcd::EtcdServer, require_privileges};

/// The range the tests' fleets share.
const RANGE: (u16, u16) = (47_000, 47_031);

/// An allocation of `port` as a node would claim it.
fn allocation(port: u16) -> Allocation {
    Allocation {
        id: PortId::new(port, Protocol::Tcp),
        netns: None,
        published: None,
        owner: Owner::named("web"),
        access: PortAccessControl::default(),
        status: PortStatus::Active,
        timeline: Timeline::starting(now_millis(), None),
    }
}

/// The cluster section of a node of `etcd`, with a short request deadline.
fn cluster(etcd: &EtcdServer) -> ClusterConfig {
    ClusterConfig {
        timeout: Duration::from_secs(2),
        ..ClusterConfig::new(vec![etcd.endpoint()])
    }
}

/// Node `name` of `etcd`'s fleet, connected.
async fn node(etcd: &EtcdServer, name: &str) -> Fleet {
    Fleet::connect(&cluster(etcd), name, RANGE)
        .await
        .unwrap_or_else(|err| panic!("connecting node {name}: {err}"))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime")
}

#[test]
fn sixty_four_claims_from_three_nodes_at_once_never_hold_a_port_twice() {
    if !require_privileges!() {
        return;
    }
    let etcd = EtcdServer::start();
    runtime().block_on(async {
        let mut nodes = Vec::new();
        for name in ["a", "b", "c"] {
            nodes.push(Arc::new(node(&etcd, name).await));
        }
        // 64 claimants for 32 ports, each from a random offset, as the allocator probes.
        let size = RANGE.1 - RANGE.0 + 1;
        let mut tasks = Vec::new();
        for claimant in 0..64_u16 {
            let node = Arc::clone(&nodes[usize::from(claimant % 3)]);
            tasks.push(tokio::spawn(async move {
                let start = rand::random::<u16>() % size;
                for step in 0..size {
                    let port = RANGE.0 + (start + step) % size;
                    match node.claim(&allocation(port), 1).await {
                        Ok(_) => return Some(port),
                        Err(FleetError::Taken { .. }) => {}
                        Err(other) => panic!("claiming {port}: {other}"),
                    }
                }
                None
            }));
        }
        let mut won = Vec::new();
        for task in tasks {
            if let Some(port) = task.await.expect("a claimant") {
                won.push(port);
            }
        }
        let distinct: BTreeSet<u16> = won.iter().copied().collect();
        assert_eq!(distinct.len(), won.len(), "a port held twice: {won:?}");
        assert_eq!(won.len(), usize::from(size), "every port claimed once");
        let listed = nodes[0].list().await.expect("list");
        assert_eq!(listed.held.len(), usize::from(size));
        let owners: BTreeSet<&str> = listed
            .held
            .iter()
            .map(|held| held.record.node.as_str())
            .collect();
        assert_eq!(owners.len(), 3, "each node won some: {owners:?}");
    });
}

#[test]
fn a_release_racing_a_change_of_the_same_port_lets_exactly_one_through() {
    if !require_privileges!() {
        return;
    }
    let etcd = EtcdServer::start();
    runtime().block_on(async {
        let a = node(&etcd, "a").await;
        let b = node(&etcd, "b").await;
        for port in RANGE.0..RANGE.0 + 16 {
            let held = allocation(port);
            let revision = a.claim(&held, 1).await.expect("claim");
            let mut drained = held.clone();
            drained.status = PortStatus::Draining;
            let (released, changed) =
                tokio::join!(a.release(held.id, revision), b.update(&drained, revision));
            assert!(
                released.is_ok() != changed.is_ok(),
                "{port}: exactly one wins: {released:?} / {changed:?}"
            );
            let loser = released.err().or(changed.err());
            assert_eq!(loser, Some(FleetError::Changed(held.id)));
        }
    });
}

#[test]
fn a_watch_sees_claims_changes_and_releases_and_reports_a_compaction() {
    if !require_privileges!() {
        return;
    }
    let etcd = EtcdServer::start();
    runtime().block_on(async {
        let a = node(&etcd, "a").await;
        let b = node(&etcd, "b").await;
        let listed = b.list().await.expect("list");
        assert!(listed.held.is_empty());
        let mut watch = b.watch(listed.revision + 1).await.expect("watch");
        let mut held = allocation(RANGE.0);
        let claimed = a.claim(&held, 1).await.expect("claim");
        held.access.max_connections = 5;
        let changed = a.update(&held, claimed).await.expect("update");
        a.release(held.id, changed).await.expect("release");
        let mut seen = Vec::new();
        while seen.len() < 3 {
            let events = tokio::time::timeout(Duration::from_secs(10), watch.next())
                .await
                .expect("events within 10 s")
                .expect("a watch batch");
            seen.extend(events);
        }
        assert!(
            matches!(&seen[0], FleetEvent::Put(put) if put.revision == claimed && put.record.node == "a")
        );
        assert!(
            matches!(&seen[1], FleetEvent::Put(put) if put.record.allocation.access.max_connections == 5)
        );
        assert!(matches!(seen[2], FleetEvent::Deleted(id, _) if id == held.id));

        // A watch from a revision etcd compacted away says so: the node lists again.
        for port in RANGE.0..RANGE.0 + 4 {
            a.claim(&allocation(port), 1).await.expect("claim");
        }
        let latest = a.list().await.expect("list").revision;
        a.compact(latest).await.expect("compact");
        let mut stale = b.watch(listed.revision + 1).await.expect("watch");
        let answer = tokio::time::timeout(Duration::from_secs(10), stale.next())
            .await
            .expect("an answer within 10 s");
        assert!(
            matches!(answer, Err(FleetError::Compacted(revision)) if revision > listed.revision),
            "{answer:?}"
        );
    });
}

#[test]
fn a_paused_etcd_fails_requests_within_their_deadline_and_they_work_again_after() {
    if !require_privileges!() {
        return;
    }
    let etcd = EtcdServer::start();
    runtime().block_on(async {
        let a = node(&etcd, "a").await;
        a.claim(&allocation(RANGE.0), 1).await.expect("claim");
        etcd.pause();
        let refused = tokio::time::timeout(
            Duration::from_secs(30),
            a.claim(&allocation(RANGE.0 + 1), 1),
        )
        .await
        .expect("the request fails instead of hanging");
        assert!(
            matches!(refused, Err(FleetError::Unreachable(_))),
            "{refused:?}"
        );
        etcd.resume();
        // Another port: etcd may still take the claim that got no answer.
        let mut again = Err(FleetError::Unreachable(String::new()));
        for _ in 0..20 {
            again = a.claim(&allocation(RANGE.0 + 2), 1).await;
            if !matches!(again, Err(FleetError::Unreachable(_))) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        again.expect("etcd answers again after SIGCONT");
    });
}

#[test]
fn a_nodes_liveness_key_lives_with_its_lease() {
    if !require_privileges!() {
        return;
    }
    let etcd = EtcdServer::start();
    let rt = runtime();
    let a = rt.block_on(node(&etcd, "a"));
    let info = NodeInfo {
        node: "a".to_owned(),
        version: "test".to_owned(),
        joined_at: now_millis(),
    };
    let liveness = rt
        .block_on(a.join(Duration::from_secs(2), &info))
        .expect("join");
    // Kept alive past several lease periods.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(rt.block_on(a.nodes()).expect("nodes"), vec![info]);
    drop(liveness);
    assert!(
        eventually(Duration::from_secs(15), || rt
            .block_on(a.nodes())
            .is_ok_and(|nodes| nodes.is_empty())),
        "the key goes a lease after the keep-alive stops"
    );
}

#[test]
fn with_authentication_on_the_right_password_gets_in_and_a_wrong_one_is_refused() {
    if !require_privileges!() {
        return;
    }
    let etcd = EtcdServer::start();
    let files = tempfile::tempdir().expect("a directory for the password files");
    runtime().block_on(async {
        let mut admin = etcd_client::Client::connect([etcd.endpoint()], None)
            .await
            .expect("connect");
        admin.user_add("root", "root-pw", None).await.expect("root");
        admin
            .user_grant_role("root", "root")
            .await
            .expect("root's role");
        admin
            .user_add("portgate", "s3cret", None)
            .await
            .expect("user");
        admin
            .user_grant_role("portgate", "root")
            .await
            .expect("user's role");
        admin.auth_enable().await.expect("authentication on");
        let with_password = |password: &str| {
            let file = files.path().join(format!("{password}.txt"));
            std::fs::write(&file, format!("{password}\n")).expect("a password file");
            ClusterConfig {
                username: Some("portgate".to_owned()),
                password_file: Some(file),
                ..cluster(&etcd)
            }
        };
        let node = Fleet::connect(&with_password("s3cret"), "a", RANGE)
            .await
            .expect("the right password");
        node.claim(&allocation(RANGE.0), 1)
            .await
            .expect("a claim as that user");
        let wrong = Fleet::connect(&with_password("guess"), "b", RANGE).await;
        assert!(wrong.is_err(), "a wrong password is refused");
        let anonymous = Fleet::connect(&cluster(&etcd), "c", RANGE)
            .await
            .expect("connecting is lazy without a user");
        assert!(
            anonymous.claim(&allocation(RANGE.0 + 1), 1).await.is_err(),
            "no user, no claim"
        );
    });
}
