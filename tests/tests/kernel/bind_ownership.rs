//! Bind ownership: `bind()` on an owned port succeeds from the owner cgroup and its
//! children only, refusals counted and reported.

use std::net::{Ipv6Addr, SocketAddr, TcpListener};

use portgate::model::{OwnerCgroup, PortId, PortPolicy, Protocol};
use portgate_tests::{
    common::{
        NetNs, PinDir, TestCgroup,
        gate::{MAX_PORT, MIN_PORT, install, settings},
        loopback,
    },
    require_privileges,
};

#[test]
fn bind_follows_the_owner_cgroup_tree() {
    if !require_privileges!() {
        return;
    }
    let pins = PinDir::new();
    let parent = TestCgroup::new();
    let owner = parent.child("owner");
    let owner_child = owner.child("worker");
    let other = parent.child("other");
    let ns = NetNs::new();
    let mut gate = ns.run(|| install(&settings(&pins)));
    gate.attach_cgroup(parent.path())
        .expect("attach to the test cgroup");
    let mut events = gate.events().expect("event stream");
    let owned_port = MIN_PORT + 40;
    let open = MIN_PORT + 41;
    let unallocated = MIN_PORT + 42;
    gate.set_policy(
        PortId::new(owned_port, Protocol::Tcp),
        &PortPolicy {
            owner: Some(OwnerCgroup {
                path: owner.path().to_owned(),
                id: owner.id(),
                level: owner.level(),
            }),
            ..PortPolicy::default()
        },
    )
    .expect("set owned_port policy");
    gate.set_policy(PortId::new(open, Protocol::Tcp), &PortPolicy::default())
        .expect("set open policy");

    let bind_tcp = |cgroup: &TestCgroup, port: u16| {
        ns.run(|| {
            let _inside = cgroup.enter();
            TcpListener::bind(loopback(port)).map(drop)
        })
    };
    let bind_udp = |cgroup: &TestCgroup, port: u16| {
        ns.run(|| {
            let _inside = cgroup.enter();
            std::net::UdpSocket::bind(loopback(port)).map(drop)
        })
    };
    let eperm = |result: std::io::Result<()>| result.err().and_then(|err| err.raw_os_error());

    bind_tcp(&owner, owned_port).expect("the owner cgroup binds its port");
    bind_tcp(&owner_child, owned_port).expect("a child of the owner binds its port");
    assert_eq!(
        eperm(bind_tcp(&other, owned_port)),
        Some(libc::EPERM),
        "another cgroup is refused with EPERM"
    );
    bind_tcp(&other, open).expect("a port without owner binds from anywhere");
    assert_eq!(
        eperm(bind_tcp(&other, unallocated)),
        Some(libc::EPERM),
        "an unallocated managed port is refused"
    );
    assert_eq!(
        eperm(bind_udp(&owner, owned_port)),
        Some(libc::EPERM),
        "the allocation is for TCP only"
    );
    let bind_tcp6 = |cgroup: &TestCgroup, port: u16| {
        ns.run(|| {
            let _inside = cgroup.enter();
            TcpListener::bind(SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port)).map(drop)
        })
    };
    bind_tcp6(&owner_child, owned_port).expect("bind6: a child of the owner binds its port");
    assert_eq!(
        eperm(bind_tcp6(&other, owned_port)),
        Some(libc::EPERM),
        "bind6: another cgroup is refused with EPERM"
    );
    bind_tcp(&other, MAX_PORT + 500).expect("a port outside the range is untouched");
    bind_tcp(&other, 0).expect("port 0 is never refused");

    let denied_owned = gate
        .counters(PortId::new(owned_port, Protocol::Tcp))
        .expect("counters")
        .total;
    assert_eq!(
        denied_owned.bind_denied, 2,
        "one bind4 and one bind6 refusal"
    );
    let denied_udp = gate
        .counters(PortId::new(owned_port, Protocol::Udp))
        .expect("counters")
        .total;
    assert_eq!(denied_udp.bind_denied, 1);
    let binds: Vec<_> = events
        .drain()
        .into_iter()
        .filter(|event| event.reason == "bind_denied")
        .collect();
    assert_eq!(binds.len(), 4, "one event per refused bind: {binds:?}");
    let from_other = binds
        .iter()
        .find(|event| event.id == PortId::new(owned_port, Protocol::Tcp))
        .expect("the refused bind of the owned_port port");
    assert_eq!(from_other.cgroup_id, other.id());
    assert_eq!(from_other.pid, std::process::id());
}
