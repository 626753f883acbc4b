//! The manager's operations, on an in-memory store and no kernel: authorization, access
//! changes, bounds per port and per user, a store that refuses a change, reopening.

use std::{collections::BTreeSet, net::IpAddr, ops::RangeInclusive, sync::Arc, time::Duration};

use super::{Actor, MAX_ALLOWED_IPS, MAX_GRANTS_PER_PORT, PortError, PortManager, Transition};
use crate::{
    config::{OwnerExit, PortConfig},
    host::{
        HostError,
        sockets::{Listener, SocketTable},
    },
    model::{
        AccessChange, AllocationRequest, NetnsId, NetnsInfo, Owner, OwnerCgroup, PortAccessControl,
        PortId, PortStatus, Protocol, sample_allocation,
    },
    store::{
        Change, Commit, HostChanges, MemoryStore, NetnsReservedPort, Store, StoreError, StoredState,
    },
};

/// A host with no live socket: the manager's unit tests never read this machine's /proc.
struct NoSockets;

impl SocketTable for NoSockets {
    fn bound_ports(&self, _: Protocol, _: RangeInclusive<u16>) -> Result<BTreeSet<u16>, HostError> {
        Ok(BTreeSet::new())
    }

    fn listeners(&self, _: Protocol, _: RangeInclusive<u16>) -> Result<Vec<Listener>, HostError> {
        Ok(Vec::new())
    }
}

pub(super) fn config() -> PortConfig {
    PortConfig {
        min_port: 40_000,
        max_port: 40_099,
        quarantine: Duration::ZERO,
        ..PortConfig::default()
    }
}

/// A manager over `store` (holding what it holds), with no gate.
pub(super) fn open(config: PortConfig, store: Arc<dyn Store>) -> PortManager {
    let stored = store.load().unwrap();
    PortManager::open(config, store, stored, None, Arc::new(NoSockets))
        .unwrap()
        .0
}

pub(super) fn manager(config: PortConfig) -> PortManager {
    open(config, Arc::new(MemoryStore::default()))
}

pub(super) fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

#[tokio::test]
async fn authentication_is_needed_until_a_grant() {
    let manager = manager(config());
    let held = manager
        .allocate(
            AllocationRequest {
                access: PortAccessControl {
                    require_authentication: true,
                    ..PortAccessControl::default()
                },
                ..AllocationRequest::new("db")
            },
            Actor::User(1000),
        )
        .await
        .unwrap();
    let err = manager
        .validate_connection(held.id, ip("192.0.2.1"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, PortError::AuthenticationFailed { .. }),
        "{err}"
    );
    // Another user may not grant on it; its maker may.
    let err = manager
        .grant(
            held.id,
            ip("192.0.2.1"),
            Duration::from_mins(1),
            Actor::User(1001),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, PortError::AccessDenied(_)), "{err}");
    manager
        .grant(
            held.id,
            ip("192.0.2.1"),
            Duration::from_mins(1),
            Actor::User(1000),
        )
        .await
        .unwrap();
    manager
        .validate_connection(held.id, ip("192.0.2.1"))
        .await
        .unwrap();
}

#[tokio::test]
async fn users_change_only_their_own_allocations() {
    let manager = manager(config());
    let held = manager
        .allocate(AllocationRequest::new("mine"), Actor::User(1000))
        .await
        .unwrap();
    assert_eq!(held.owner.uid, Some(1000));
    let err = manager
        .release(held.id, Actor::User(1001))
        .await
        .unwrap_err();
    assert!(matches!(err, PortError::AccessDenied(_)), "{err}");
    assert_eq!(err.http_status(), 403);
    let change = AccessChange {
        max_connections: Some(3),
        ..AccessChange::default()
    };
    assert!(
        manager
            .set_access(held.id, change.clone(), Actor::User(1001))
            .await
            .is_err()
    );
    let changed = manager
        .set_access(held.id, change, Actor::User(1000))
        .await
        .unwrap();
    assert_eq!(changed.access.max_connections, 3);
    manager.release(held.id, Actor::Admin).await.unwrap();
}

#[tokio::test]
async fn access_changes_add_and_remove_prefixes_and_refuse_oversized_allowlists() {
    let manager = manager(config());
    let held = manager
        .allocate(AllocationRequest::new("a"), Actor::Admin)
        .await
        .unwrap();
    let changed = manager
        .set_access(
            held.id,
            AccessChange {
                allow: ["10.0.0.9/8", "2001:db8::/32"]
                    .iter()
                    .map(|prefix| prefix.parse().unwrap())
                    .collect(),
                ..AccessChange::default()
            },
            Actor::Admin,
        )
        .await
        .unwrap();
    assert_eq!(changed.access.allowed_ips.len(), 2);
    assert_eq!(
        changed
            .access
            .allowed_ips
            .iter()
            .next()
            .unwrap()
            .to_string(),
        "10.0.0.0/8"
    );
    let removal = AccessChange {
        remove: ["10.0.0.0/8".parse().unwrap()].into_iter().collect(),
        ..AccessChange::default()
    };
    let changed = manager
        .set_access(held.id, removal.clone(), Actor::Admin)
        .await
        .unwrap();
    assert_eq!(changed.access.allowed_ips.len(), 1);
    let err = manager
        .set_access(held.id, removal, Actor::Admin)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("is not in the allowlist"), "{err}");
    let huge: crate::model::Allowlist = (0..=MAX_ALLOWED_IPS)
        .map(|n| {
            let n = u32::try_from(n).unwrap();
            ipnet::IpNet::V4(
                ipnet::Ipv4Net::new(std::net::Ipv4Addr::from(0x0a00_0000 | n), 32).unwrap(),
            )
        })
        .collect();
    let err = manager
        .set_access(
            held.id,
            AccessChange {
                allow: huge,
                ..AccessChange::default()
            },
            Actor::Admin,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, PortError::PolicyViolation(_)), "{err}");
    assert_eq!(
        manager
            .allocation(held.id)
            .await
            .unwrap()
            .access
            .allowed_ips
            .len(),
        1
    );
}

/// A store whose disk is gone.
struct BrokenStore;

impl Store for BrokenStore {
    fn load(&self) -> Result<StoredState, StoreError> {
        Ok(StoredState::default())
    }

    fn submit(&self, _changes: Vec<Change>) -> Commit {
        let (sender, commit) = Commit::channel();
        let _sent = sender.send(Err(StoreError::Transaction {
            op: "committing",
            message: "no space left on device".to_owned(),
        }));
        commit
    }

    fn describe(&self) -> String {
        "broken".to_owned()
    }
}

#[tokio::test]
async fn a_change_the_store_refuses_is_undone() {
    let manager = open(config(), Arc::new(BrokenStore));
    let err = manager
        .allocate(
            AllocationRequest {
                port: Some(40_010),
                ..AllocationRequest::new("a")
            },
            Actor::Admin,
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not saved"), "{err}");
    let id = PortId::new(40_010, Protocol::Tcp);
    assert_eq!(manager.get_state(id).await.status, PortStatus::Available);
    assert!(matches!(
        manager.validate_connection(id, ip("10.0.0.1")).await,
        Err(PortError::NotAllocated(_))
    ));
    assert_eq!(manager.free_ports().await[0].1, 100);
    // Memory and kernel may now differ from the store: nothing more is taken.
    let err = manager
        .allocate(AllocationRequest::new("b"), Actor::Admin)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("until the daemon restarts"),
        "{err}"
    );
}

#[tokio::test]
async fn a_user_holds_at_most_max_ports_per_user() {
    let manager = manager(PortConfig {
        max_ports_per_user: 2,
        ..config()
    });
    for _ in 0..2 {
        manager
            .allocate(AllocationRequest::new("a"), Actor::User(1000))
            .await
            .unwrap();
    }
    let err = manager
        .allocate(AllocationRequest::new("a"), Actor::User(1000))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("max_ports_per_user = 2"), "{err}");
    // Other users and admins are not held to it.
    manager
        .allocate(AllocationRequest::new("b"), Actor::User(1001))
        .await
        .unwrap();
    manager
        .allocate(AllocationRequest::new("admin"), Actor::Admin)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_manager_reopened_on_the_same_store_has_every_acknowledged_allocation() {
    let store = Arc::new(MemoryStore::default());
    let manager = open(config(), store.clone());
    let mut ports = Vec::new();
    for n in 0..10 {
        ports.push(
            manager
                .allocate_port(format!("o{n}").as_str())
                .await
                .unwrap(),
        );
    }
    manager.release_port(ports[0]).await.unwrap();
    drop(manager);
    let stored = store.load().unwrap();
    let (again, report) =
        PortManager::open(config(), store, stored, None, Arc::new(NoSockets)).unwrap();
    assert_eq!(report.restored, 10);
    assert_eq!(again.get_state(ports[0]).await.status, PortStatus::Draining);
    for port in &ports[1..] {
        assert_eq!(again.get_state(*port).await.status, PortStatus::Active);
    }
    assert_eq!(again.free_ports().await[0].1, 90);
}

#[tokio::test]
async fn grants_and_prefixes_are_bounded_per_port_and_per_user() {
    let manager = manager(config());
    let user = Actor::User(1000);
    let prefixes = |count: u32, base: u32| -> crate::model::Allowlist {
        (0..count)
            .map(|n| {
                ipnet::IpNet::V4(
                    ipnet::Ipv4Net::new(std::net::Ipv4Addr::from(base + n), 32).unwrap(),
                )
            })
            .collect()
    };
    let allowing = |owner: &str, allowed_ips| AllocationRequest {
        access: PortAccessControl {
            allowed_ips,
            ..PortAccessControl::default()
        },
        ..AllocationRequest::new(owner)
    };
    let first = manager
        .allocate(allowing("a", prefixes(6_000, 0x0a00_0000)), user)
        .await
        .unwrap();
    // 6,000 + 6,000 is over one user's budget of 10,000 prefixes, on a new port...
    let err = manager
        .allocate(allowing("b", prefixes(6_000, 0x0b00_0000)), user)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("allowlist prefixes over its ports"),
        "{err}"
    );
    // ...and by adding to another port; an admin is not held to it.
    let second = manager
        .allocate(AllocationRequest::new("c"), user)
        .await
        .unwrap();
    let change = AccessChange {
        allow: prefixes(4_001, 0x0c00_0000),
        ..AccessChange::default()
    };
    assert!(
        manager
            .set_access(second.id, change.clone(), user)
            .await
            .is_err()
    );
    manager
        .set_access(second.id, change, Actor::Admin)
        .await
        .unwrap();
    // Grants: at most a day, at most MAX_GRANTS_PER_PORT per port.
    let err = manager
        .grant(first.id, ip("10.0.0.1"), Duration::from_hours(25), user)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("out of bounds"), "{err}");
    for n in 0..MAX_GRANTS_PER_PORT {
        let addr = IpAddr::from(std::net::Ipv4Addr::from(
            0xc000_0200 + u32::try_from(n).unwrap(),
        ));
        manager
            .grant(first.id, addr, Duration::from_mins(1), user)
            .await
            .unwrap();
    }
    let err = manager
        .grant(first.id, ip("198.51.100.1"), Duration::from_mins(1), user)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("grants, the most a port may"),
        "{err}"
    );
}

#[tokio::test]
async fn a_connection_limit_on_udp_is_refused_not_ignored() {
    let manager = manager(config());
    let limited = PortAccessControl {
        max_connections: 4,
        ..PortAccessControl::default()
    };
    let err = manager
        .allocate(
            AllocationRequest {
                protocol: Protocol::Udp,
                access: limited.clone(),
                ..AllocationRequest::new("a")
            },
            Actor::Admin,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, PortError::PolicyViolation(_)), "{err}");
    assert!(err.to_string().contains("UDP"), "{err}");
    assert!(manager.allocations().await.is_empty(), "nothing allocated");
    let held = manager
        .allocate(
            AllocationRequest {
                protocol: Protocol::Udp,
                ..AllocationRequest::new("a")
            },
            Actor::Admin,
        )
        .await
        .unwrap();
    let err = manager
        .set_access(
            held.id,
            AccessChange {
                max_connections: Some(4),
                ..AccessChange::default()
            },
            Actor::Admin,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, PortError::PolicyViolation(_)), "{err}");
    assert_eq!(
        manager.allocation(held.id).await.unwrap().access,
        held.access
    );
    // TCP takes the same limit.
    manager
        .allocate(
            AllocationRequest {
                access: limited,
                ..AllocationRequest::new("a")
            },
            Actor::Admin,
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn metrics_name_a_ports_namespace_by_its_label() {
    let mut inside = crate::model::sample_allocation(80, Protocol::Tcp);
    inside.id.netns = crate::model::NetnsId(4097);
    inside.netns = Some(crate::model::NetnsInfo {
        label: "web1".to_owned(),
        inode: 4_026_532_999,
    });
    let store = MemoryStore::with_state(StoredState {
        allocations: vec![
            crate::model::sample_allocation(40_001, Protocol::Tcp),
            inside,
        ],
        ..StoredState::default()
    });
    let manager = open(config(), Arc::new(store));

    let text = manager.metrics_text().await.unwrap();

    for series in [
        r#"portgate_port_accepted_total{port="40001",proto="tcp",netns="host"} 0"#,
        r#"portgate_port_accepted_total{port="80",proto="tcp",netns="web1"} 0"#,
        r#"portgate_port_dropped_total{port="80",proto="tcp",netns="web1",reason="conn_limit"} 0"#,
    ] {
        assert!(text.contains(series), "{series} in\n{text}");
    }
}

/// A directory standing in for an owner cgroup (its inode is the id).
fn owner_dir(dir: &tempfile::TempDir, name: &str) -> OwnerCgroup {
    use std::os::unix::fs::MetadataExt as _;
    let path = dir.path().join(name);
    std::fs::create_dir(&path).unwrap();
    OwnerCgroup {
        id: std::fs::metadata(&path).unwrap().ino(),
        path,
        level: 1,
    }
}

fn owned_by(name: &str, cgroup: &OwnerCgroup) -> AllocationRequest {
    AllocationRequest {
        owner: Owner {
            cgroup: Some(cgroup.clone()),
            ..Owner::named(name)
        },
        ..AllocationRequest::new(name)
    }
}

#[tokio::test]
async fn a_port_whose_owner_cgroup_is_removed_drains_or_stays_and_is_counted() {
    for exit in [OwnerExit::Drain, OwnerExit::Keep] {
        let store = Arc::new(MemoryStore::default());
        let config = PortConfig {
            on_owner_exit: exit,
            ..config()
        };
        let manager = open(config, store.clone());
        let dir = tempfile::tempdir().unwrap();
        let (leaving, staying) = (owner_dir(&dir, "leaving"), owner_dir(&dir, "staying"));
        let orphan = manager
            .allocate(owned_by("orphan", &leaving), Actor::Admin)
            .await
            .unwrap()
            .id;
        let kept = manager
            .allocate(owned_by("kept", &staying), Actor::Admin)
            .await
            .unwrap()
            .id;
        assert!(manager.check_owners().await.unwrap().is_empty());
        assert_eq!(manager.owner_gone().await, 0);

        std::fs::remove_dir(&leaving.path).unwrap();
        let steps = manager.check_owners().await.unwrap();
        let (expected_steps, expected) = match exit {
            OwnerExit::Drain => (vec![Transition::OwnerGone(orphan)], PortStatus::Draining),
            OwnerExit::Keep => (Vec::new(), PortStatus::Active),
        };
        assert_eq!(steps, expected_steps, "{exit:?}");
        let stored = |id: PortId| {
            let allocations = store.load().unwrap().allocations;
            allocations.into_iter().find(|held| held.id == id).unwrap()
        };
        assert_eq!(stored(orphan).status, expected, "{exit:?}: durable");
        assert_eq!(stored(kept).status, PortStatus::Active, "{exit:?}");
        assert_eq!(
            manager.owner_gone().await,
            1,
            "{exit:?}: counted either way"
        );
        let metrics = manager.metrics_text().await.unwrap();
        assert!(
            metrics.contains("portgate_ports_owner_gone 1\n"),
            "{metrics}"
        );
        assert!(manager.check_owners().await.unwrap().is_empty(), "once");

        if exit == OwnerExit::Keep {
            // Handed to a cgroup that lives, the port's owner is no longer gone.
            manager
                .set_owner(orphan, staying.clone(), Actor::Admin)
                .await
                .unwrap();
            manager.check_owners().await.unwrap();
            assert_eq!(manager.owner_gone().await, 0);
        }
        assert_eq!(
            manager.allocation(kept).await.unwrap().status,
            PortStatus::Active
        );
    }
}

#[tokio::test]
async fn a_port_whose_namespace_is_gone_closes_and_its_reserved_ports_are_forgotten() {
    // A namespace no process has (no nsfs inode is 1): gone while the daemon was down.
    let netns = NetnsId(u64::MAX - 7);
    let mut held = sample_allocation(80, Protocol::Tcp);
    held.id.netns = netns;
    held.netns = Some(NetnsInfo {
        label: "gone".to_owned(),
        inode: 1,
    });
    held.owner.cgroup = None;
    held.timeline.lease_expires_at = None;
    let id = held.id;
    let reserved = NetnsReservedPort {
        netns,
        inode: 1,
        port: 80,
    };
    let store = Arc::new(MemoryStore::with_state(StoredState {
        allocations: vec![held],
        host: HostChanges {
            netns_reserved_ports: vec![reserved],
            ..HostChanges::default()
        },
        keys: Vec::new(),
        grants: Vec::new(),
    }));
    let manager = open(
        PortConfig {
            quarantine: Duration::from_mins(1),
            ..config()
        },
        store.clone(),
    );
    assert_eq!(
        manager.check_owners().await.unwrap(),
        [Transition::NetnsGone(id)]
    );
    let closed = manager.allocation(id).await.unwrap();
    assert_eq!(closed.status, PortStatus::Closed);
    assert!(closed.timeline.netns_gone_at.is_some());
    assert_eq!(closed.policy(), None, "nothing of it stays in the kernel");
    let stored = store.load().unwrap();
    assert_eq!(stored.allocations, [closed], "kept through quarantine");
    assert!(
        stored.host.netns_reserved_ports.is_empty(),
        "the namespace took its reserved ports with it"
    );
    assert!(manager.check_owners().await.unwrap().is_empty(), "once");
    assert!(manager.tick().await.unwrap().is_empty(), "in quarantine");
}
