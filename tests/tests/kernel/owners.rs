//! Owners that come and go, through the daemon: a port whose owner cgroup is removed drains
//! (or, with `on_owner_exit = "keep"`, stays) and is counted by `status`; a port whose
//! network namespace is deleted closes and leaves the kernel at once; ownership handed to
//! a new cgroup moves who may bind, inside the port's namespace; and a port of another
//! namespace is reserved in that namespace's `ip_local_reserved_ports`, given back after
//! quarantine and on uninstall.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::PathBuf,
    time::Duration,
};

use portgate::{
    api::{AllocRequest, AllocationView, OwnerSpec},
    client::Client,
    gate::Gate,
    host::port_ranges::PortRanges,
    model::{HostPort, PortId, PortStatus, Protocol},
    paths::{IP_LOCAL_RESERVED_PORTS, STORE_FILE},
    store::{RedbStore, Store as _},
};
use portgate_tests::{
    common::{NetNs, TestCgroup, allowlist, eventually},
    daemon::Daemon,
    require_privileges,
};

/// Long enough for the daemon to look at owners (every second) and take the step, on a
/// loaded machine.
const WITHIN: Duration = Duration::from_secs(15);

/// Allocates a TCP port owned by `owner` (a child of the daemon's cgroup), in `netns` when
/// given, on `port` when given.
fn allocate(
    daemon: &Daemon,
    owner: &TestCgroup,
    netns: Option<&NetNs>,
    port: Option<u16>,
) -> AllocationView {
    let request = AllocRequest {
        owner: "svc".to_owned(),
        cgroup: Some(owner.path().to_owned()),
        netns: netns.map(|ns| PathBuf::from("/run/netns").join(ns.name())),
        port,
        ..AllocRequest::default()
    };
    daemon
        .api(|client| client.alloc(&request))
        .expect("allocate a port")
}

fn status_of(daemon: &Daemon, id: PortId) -> Option<PortStatus> {
    daemon.allocations().get(&id).map(|view| view.status)
}

fn owner_gone(daemon: &Daemon) -> u64 {
    daemon.api(Client::status).expect("status").owner_gone
}

/// `bind()` of TCP `port` on loopback inside `ns`, by a process in `cgroup`: the errno of
/// a refusal.
fn bind_in(ns: &NetNs, cgroup: &TestCgroup, port: u16) -> Result<(), Option<i32>> {
    ns.run(|| {
        let _inside = cgroup.enter();
        TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
            .map(drop)
            .map_err(|err| err.raw_os_error())
    })
}

fn reserved(ns: &NetNs) -> PortRanges {
    ns.sysctl(IP_LOCAL_RESERVED_PORTS)
        .trim_end()
        .parse()
        .expect("the reserved ports")
}

#[test]
fn a_port_whose_owner_cgroup_is_removed_drains_and_is_counted() {
    if !require_privileges!() {
        return;
    }
    // A long quarantine, so that the drained port is still there to count.
    let daemon = Daemon::start_with_ports(41_500, 41_509, "quarantine = \"60s\"");
    let leaving = daemon.cgroup.child("leaving");
    let staying = daemon.cgroup.child("staying");
    let orphan = allocate(&daemon, &leaving, None, None).id;
    let kept = allocate(&daemon, &staying, None, None).id;
    assert_eq!(owner_gone(&daemon), 0);

    drop(leaving);
    assert!(
        eventually(WITHIN, || status_of(&daemon, orphan)
            != Some(PortStatus::Active)),
        "the port did not drain:\n{}",
        daemon.log()
    );
    // No connection held it: Draining goes Closed at the next lifecycle tick (the owner
    // check and the tick are two steps, so Draining may be seen in between).
    assert!(
        eventually(WITHIN, || status_of(&daemon, orphan)
            == Some(PortStatus::Closed)),
        "the drained port did not close: {:?}\n{}",
        status_of(&daemon, orphan),
        daemon.log()
    );
    assert_eq!(status_of(&daemon, kept), Some(PortStatus::Active));
    assert_eq!(owner_gone(&daemon), 1);
    let metrics = daemon.api(Client::metrics).expect("metrics");
    assert!(
        metrics.contains("portgate_ports_owner_gone 1\n"),
        "{metrics}"
    );
    assert!(
        daemon.log().contains("owner cgroup removed: draining"),
        "logged as a lifecycle step:\n{}",
        daemon.log()
    );
    let printed = daemon.cli_ok(None, &["status"]);
    assert!(
        printed.contains("1 port(s) whose owner cgroup no longer exists"),
        "{printed}"
    );
}

#[test]
fn with_on_owner_exit_keep_the_port_stays_active_and_is_counted() {
    if !require_privileges!() {
        return;
    }
    let daemon = Daemon::start_with_ports(41_510, 41_519, "on_owner_exit = \"keep\"");
    let leaving = daemon.cgroup.child("leaving");
    let orphan = allocate(&daemon, &leaving, None, None).id;
    drop(leaving);
    assert!(
        eventually(WITHIN, || owner_gone(&daemon) == 1),
        "the port was not counted:\n{}",
        daemon.log()
    );
    assert_eq!(status_of(&daemon, orphan), Some(PortStatus::Active));
    // The owner comes back in a new cgroup and is handed the port.
    let back = daemon.cgroup.child("back");
    let spec = OwnerSpec {
        cgroup: Some(back.path().to_owned()),
        ..OwnerSpec::default()
    };
    daemon
        .api(|client| client.set_owner(orphan, &spec))
        .expect("PATCH owner");
    assert!(
        eventually(WITHIN, || owner_gone(&daemon) == 0),
        "still counted after a new owner"
    );
    assert_eq!(status_of(&daemon, orphan), Some(PortStatus::Active));
}

#[test]
fn a_port_whose_namespace_is_deleted_closes_and_leaves_the_kernel() {
    if !require_privileges!() {
        return;
    }
    let daemon = Daemon::start(41_520, 41_529);
    let container = NetNs::new();
    let owner = daemon.cgroup.child("container");
    let request = AllocRequest {
        owner: "web".to_owned(),
        cgroup: Some(owner.path().to_owned()),
        netns: Some(PathBuf::from("/run/netns").join(container.name())),
        port: Some(80),
        publish: Some(HostPort::Auto),
        allow: vec!["10.0.0.0/8".parse().expect("a prefix")],
        max_conns: Some(4),
        ..AllocRequest::default()
    };
    let held = daemon
        .api(|client| client.alloc(&request))
        .expect("allocate port 80 in the test namespace");
    let id = held.id;
    assert!(!id.netns.is_host());
    let host_side = PortId::new(held.published.expect("a published port"), Protocol::Tcp);
    let gate = Gate::open(daemon.pins.path()).expect("the daemon's gate");
    assert!(gate.policy(id).expect("policy").is_some());
    assert_eq!(
        gate.published().expect("published").get(&host_side),
        Some(&id)
    );
    assert_eq!(
        gate.allowlists().expect("allowlists").get(&id),
        Some(&allowlist(&["10.0.0.0/8"]))
    );

    drop(container);
    assert!(
        eventually(WITHIN, || daemon.allocations()[&id]
            .timeline
            .netns_gone_at
            .is_some()),
        "the namespace's end was not noticed:\n{}",
        daemon.log()
    );
    let closed = &daemon.allocations()[&id];
    assert_eq!(closed.status, PortStatus::Closed);
    assert_eq!(
        gate.policy(id).expect("policy"),
        None,
        "policy record removed"
    );
    assert!(
        !gate
            .published()
            .expect("published")
            .contains_key(&host_side)
    );
    assert!(!gate.allowlists().expect("allowlists").contains_key(&id));
    assert!(!gate.all_slots().expect("slots").contains_key(&id));
    // Quarantine still holds the host port it published.
    let taken = AllocRequest {
        owner: "other".to_owned(),
        port: Some(host_side.port),
        ..AllocRequest::default()
    };
    assert!(daemon.api(|client| client.alloc(&taken)).is_err());
    assert!(
        eventually(WITHIN, || !daemon.allocations().contains_key(&id)),
        "freed after quarantine"
    );
    daemon
        .api(|client| client.alloc(&taken))
        .expect("the host port is free again");
}

#[test]
fn ownership_handed_to_a_new_cgroup_moves_who_may_bind_in_the_ports_namespace() {
    if !require_privileges!() {
        return;
    }
    let daemon = Daemon::start(41_530, 41_539);
    let container = NetNs::new();
    let old = daemon.cgroup.child("old");
    let new = daemon.cgroup.child("new");
    let held = allocate(&daemon, &old, Some(&container), Some(8081));
    assert_eq!(bind_in(&container, &old, 8081), Ok(()));
    assert_eq!(bind_in(&container, &new, 8081), Err(Some(libc::EPERM)));
    let spec = OwnerSpec {
        cgroup: Some(new.path().to_owned()),
        ..OwnerSpec::default()
    };
    let moved = daemon
        .api(|client| client.set_owner(held.id, &spec))
        .expect("PATCH owner");
    assert_eq!(moved.cgroup.as_deref(), Some(new.path()));
    assert_eq!(bind_in(&container, &new, 8081), Ok(()));
    assert_eq!(bind_in(&container, &old, 8081), Err(Some(libc::EPERM)));
}

#[test]
fn a_port_of_another_namespace_is_reserved_there_until_freed_or_uninstalled() {
    if !require_privileges!() {
        return;
    }
    let mut daemon = Daemon::start(41_540, 41_549);
    let container = NetNs::new();
    let owner = daemon.cgroup.child("container");
    assert!(!reserved(&container).contains(8080));
    let tcp = allocate(&daemon, &owner, Some(&container), Some(8080)).id;
    let udp_request = AllocRequest {
        owner: "svc".to_owned(),
        netns: Some(PathBuf::from("/run/netns").join(container.name())),
        port: Some(8080),
        proto: Some(Protocol::Udp),
        ..AllocRequest::default()
    };
    let udp = daemon
        .api(|client| client.alloc(&udp_request))
        .expect("allocate UDP 8080 there too")
        .id;
    assert!(reserved(&container).contains(8080));
    assert!(
        !reserved(&daemon.ns).contains(8080),
        "the daemon's own namespace is left alone"
    );

    // Released and freed, the TCP port leaves the reservation to the UDP one.
    daemon.api(|client| client.release(tcp)).expect("release");
    assert!(
        eventually(WITHIN, || !daemon.allocations().contains_key(&tcp)),
        "freed after quarantine"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(reserved(&container).contains(8080), "UDP 8080 holds it");
    daemon.api(|client| client.release(udp)).expect("release");
    assert!(
        eventually(WITHIN, || !reserved(&container).contains(8080)),
        "given back once no allocation holds it:\n{}",
        daemon.log()
    );

    // What is still reserved at uninstall is given back, and the record cleared.
    allocate(&daemon, &owner, Some(&container), Some(9090));
    assert!(reserved(&container).contains(9090));
    assert!(daemon.stop(), "stopped on SIGTERM:\n{}", daemon.log());
    daemon.uninstall();
    assert!(!reserved(&container).contains(9090));
    let store =
        RedbStore::open(&daemon.dir.path().join("state").join(STORE_FILE)).expect("open the store");
    let record = store.load().expect("load the store").host;
    assert!(record.netns_reserved_ports.is_empty(), "{record:?}");
    assert!(record.reserved_ports_added.is_empty(), "{record:?}");
}
