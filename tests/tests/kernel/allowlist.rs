//! Allowlists: enforced by `cgroup_skb` and by XDP on real sockets between test
//! namespaces (a connection both hooks see is accepted once), and 100,000 prefixes on one
//! port, with a full allowlist map refusing a change whole.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener},
    time::Duration,
};

use portgate::{
    gate::PacketHook,
    model::{Allowlist, PortAccessControl, PortId, PortPolicy, Protocol},
};
use portgate_common::{hook, reason};
use portgate_tests::{
    common::{
        CONNECT_WITHIN, EchoServer, NetNs, PinDir, REFUSED_WITHIN, TestCgroup, Veth, connect_from,
        echo, eventually,
        gate::{MIN_PORT, install, settings},
        listen_in,
        packet::{DESTINATION, tcp_syn},
        pin_to_cpu0,
    },
    require_privileges,
};

#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, told in order")]
fn allowlist_is_enforced_by_cgroup_skb_and_by_xdp() {
    if !require_privileges!() {
        return;
    }
    let pins = PinDir::new();
    let cgroup = TestCgroup::new();
    let server_ns = NetNs::new();
    let client_ns = NetNs::new();
    let veth = Veth::new(&server_ns, &client_ns);
    veth.add_to_b(&client_ns, 3);
    // The server's namespace is the gate's host namespace: its ports are the host's.
    let mut gate = server_ns.run(|| install(&settings(&pins)));
    gate.attach_cgroup(cgroup.path())
        .expect("attach to the test cgroup");
    let mut events = gate.events().expect("event stream");

    // Port A: the server socket is in the cgroup, so cgroup_skb judges it.
    let port_a = MIN_PORT + 1;
    // Port B: the server socket is outside the cgroup: only XDP can refuse.
    let port_b = MIN_PORT + 2;
    for port in [port_a, port_b] {
        gate.set_policy(
            PortId::new(port, Protocol::Tcp),
            &PortPolicy {
                access: PortAccessControl {
                    allowed_ips: [
                        ipnet::IpNet::new(veth.v4(2), 32).expect("prefix"),
                        ipnet::IpNet::new(veth.v6(2), 128).expect("prefix"),
                    ]
                    .into_iter()
                    .collect(),
                    ..PortAccessControl::default()
                },
                ..PortPolicy::default()
            },
        )
        .expect("set policy");
    }
    let (server_a, server_b) = server_ns.run(|| {
        let a = listen_in(
            &cgroup,
            SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port_a),
        );
        let b = TcpListener::bind(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port_b))
            .expect("bind outside the cgroup");
        (EchoServer::serve(a), EchoServer::serve(b))
    });

    // From client host `from` to the server's address of the same family on `port`.
    let attempt = |from: IpAddr, port: u16, within: Duration| {
        let server = if from.is_ipv4() {
            veth.v4(1)
        } else {
            veth.v6(1)
        };
        connect_from(from, SocketAddr::new(server, port), within)
    };
    let exchange = |from: IpAddr, port: u16| {
        let mut stream = attempt(from, port, CONNECT_WITHIN)?;
        echo(&mut stream, format!("hello from {from}").as_bytes())
    };

    // cgroup_skb alone.
    client_ns.run(|| {
        exchange(veth.v4(2), port_a).expect("an allowed IPv4 source connects and talks");
        exchange(veth.v6(2), port_a).expect("an allowed IPv6 source connects and talks");
        assert!(
            attempt(veth.v4(3), port_a, REFUSED_WITHIN).is_err(),
            "a source outside the allowlist is dropped by cgroup_skb"
        );
        // Nothing but XDP could refuse port B, and XDP is not attached yet.
        attempt(veth.v4(3), port_b, CONNECT_WITHIN)
            .expect("without XDP, port B is reachable from anywhere");
    });
    let counters = gate
        .counters(PortId::new(port_a, Protocol::Tcp))
        .expect("counters");
    let skb = counters.hooks[usize::from(hook::SKB)];
    assert_eq!(skb.accepted, 2, "two connections accepted by cgroup_skb");
    assert!(skb.dropped_for(reason::NOT_ALLOWED) >= 1);

    // Now XDP on the server's end of the veth as well.
    server_ns.run(|| {
        gate.attach_xdp(
            &veth.a_name,
            portgate::model::NetnsId::HOST,
            aya::programs::XdpMode::default(),
        )
        .expect("attach XDP to the test veth");
    });
    let before = gate
        .counters(PortId::new(port_a, Protocol::Tcp))
        .expect("counters");
    client_ns.run(|| {
        for source in [veth.v4(3), veth.v6(3)] {
            assert!(
                attempt(source, port_b, REFUSED_WITHIN).is_err(),
                "XDP drops {source}, outside the allowlist"
            );
        }
        for source in [veth.v4(2), veth.v6(2)] {
            exchange(source, port_a)
                .expect("an allowed source still connects through XDP and cgroup_skb");
        }
    });
    // Every connection closed: the dual-stack socket's IPv4-mapped peers were matched to
    // their SYNs' reservations, so no slot is left behind.
    assert!(
        eventually(Duration::from_secs(3), || {
            let slots = gate.slots(PortId::from(port_a)).expect("slots");
            slots.slots == 0 && slots.established == 0
        }),
        "slots back to zero: {:?}",
        gate.slots(PortId::from(port_a))
    );
    let after = gate
        .counters(PortId::new(port_a, Protocol::Tcp))
        .expect("counters");
    assert_eq!(
        after.total.accepted,
        before.total.accepted + 2,
        "a connection both hooks see is accepted once"
    );
    assert_eq!(
        after.hooks[usize::from(hook::XDP)].accepted,
        before.hooks[usize::from(hook::XDP)].accepted + 2,
        "XDP judged them"
    );
    let xdp_b = gate
        .counters(PortId::new(port_b, Protocol::Tcp))
        .expect("counters")
        .hooks[usize::from(hook::XDP)];
    assert!(
        xdp_b.dropped_for(reason::NOT_ALLOWED) >= 1,
        "XDP counted its drop"
    );

    let denied = events.drain();
    for (port, hook_name) in [(port_a, "cgroup_skb"), (port_b, "xdp")] {
        assert!(
            denied.iter().any(|event| event.id.port == port
                && event.reason == "not_allowed"
                && event.hook == hook_name
                && event.addr == veth.v4(3)),
            "a not_allowed event from {} on port {port} by {hook_name}: {denied:?}",
            veth.v4(3)
        );
    }
    drop((server_a, server_b));
}

/// `count` distinct IPv4 /32 prefixes under 10.0.0.0/8.
fn many_prefixes(count: u32) -> Allowlist {
    (0..count)
        .map(|i| {
            let [_, b, c, d] = i.to_be_bytes();
            ipnet::IpNet::new(IpAddr::V4(Ipv4Addr::new(10, b, c, d)), 32).expect("prefix")
        })
        .collect()
}

#[test]
fn a_hundred_thousand_prefixes_on_one_port_and_a_full_map_changes_nothing() {
    const PREFIXES: u32 = 100_000;
    if !require_privileges!() {
        return;
    }
    pin_to_cpu0();
    let pins = PinDir::new();
    let mut gate = install(&settings(&pins));
    let port = MIN_PORT + 5;
    let policy = PortPolicy {
        access: PortAccessControl {
            allowed_ips: many_prefixes(PREFIXES),
            ..PortAccessControl::default()
        },
        ..PortPolicy::default()
    };
    gate.set_policy(PortId::new(port, Protocol::Tcp), &policy)
        .expect("100,000 prefixes fit");
    for (i, expected) in [
        (0, true),
        (PREFIXES / 2, true),
        (PREFIXES - 1, true),
        (PREFIXES, false),
    ] {
        let [_, b, c, d] = i.to_be_bytes();
        let passed = gate
            .test_run(
                PacketHook::Xdp,
                &tcp_syn(
                    [10, b, c, d].into(),
                    DESTINATION,
                    43_000 + (i % 1000) as u16,
                    port,
                ),
                1,
            )
            .expect("test run")
            .passed;
        assert_eq!(passed, expected, "prefix number {i}");
    }

    // Another port asking for more than is left: refused whole, naming the map.
    let other = MIN_PORT + 6;
    let too_many = PortPolicy {
        access: PortAccessControl {
            allowed_ips: many_prefixes(portgate_common::capacity::ALLOW_PREFIXES - PREFIXES + 1),
            ..PortAccessControl::default()
        },
        ..PortPolicy::default()
    };
    match gate.set_policy(PortId::new(other, Protocol::Tcp), &too_many) {
        Err(portgate::gate::GateError::MapFull { map, capacity }) => {
            assert_eq!(map, portgate_common::map_names::ALLOW);
            assert_eq!(capacity, portgate_common::capacity::ALLOW_PREFIXES);
        }
        other => panic!("expected MapFull, got {other:?}", other = other.err()),
    }
    assert_eq!(
        gate.policy(PortId::new(other, Protocol::Tcp))
            .expect("policy"),
        None,
        "no policy written"
    );
    let lists = gate.allowlists().expect("allowlists");
    assert!(
        !lists.contains_key(&PortId::new(other, Protocol::Tcp)),
        "no prefix left behind"
    );
    assert_eq!(
        lists
            .get(&PortId::new(port, Protocol::Tcp))
            .map(Allowlist::len),
        Some(PREFIXES as usize),
        "the first port's allowlist is intact"
    );
}
