//! End-to-end enforcement on the real kernel: test namespaces joined by veth pairs, child
//! cgroups made by the test, real sockets. Needs root (`CAP_BPF`, `CAP_NET_ADMIN`,
//! `CAP_SYS_ADMIN`), cgroup v2, bpffs, iproute2. Run on one test thread.

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::Duration,
};

use portgate::{
    host::kernel::monotonic_now_ns,
    model::{OwnerCgroup, PortAccessControl, PortId, PortPolicy, PortStatus, Protocol},
};
use portgate_common::{hook, reason};
use portgate_tests::common::{
    CONNECT_WITHIN, EchoServer, LOCAL, NetNs, OTHER_LOCAL, PinDir, REFUSED_WITHIN, TestCgroup,
    Veth, allowlist, connect_from, echo, eventually,
    gate::{LoopbackPort, MAX_PORT, MIN_PORT, install, settings},
    listen_in, loopback, require_privileges, reset,
};

#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, told in order")]
fn allowlist_is_enforced_by_cgroup_skb_and_by_xdp() {
    if !require_privileges("allowlist_is_enforced_by_cgroup_skb_and_by_xdp") {
        return;
    }
    let pins = PinDir::new();
    let cgroup = TestCgroup::new();
    let server_ns = NetNs::new();
    let client_ns = NetNs::new();
    let veth = Veth::new(&server_ns, &client_ns);
    veth.add_to_b(&client_ns, 3);
    let mut gate = install(&settings(&pins));
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
        gate.attach_xdp(&veth.a_name, aya::programs::XdpMode::default())
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

#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, told in order")]
fn connection_limit_holds_under_a_burst_and_frees_slots_on_close_and_reset() {
    const LIMIT: u32 = 20;
    const BURST: usize = 200;
    if !require_privileges(
        "connection_limit_holds_under_a_burst_and_frees_slots_on_close_and_reset",
    ) {
        return;
    }
    let port = MIN_PORT + 10;
    let fixture = LoopbackPort::new(
        port,
        &PortPolicy {
            access: PortAccessControl {
                max_connections: LIMIT,
                ..PortAccessControl::default()
            },
            ..PortPolicy::default()
        },
    );
    let (gate, ns) = (&fixture.gate, &fixture.ns);

    // Watch the established count while the burst runs.
    let highest = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let mut held = ns.run(|| {
        thread::scope(|scope| {
            let watcher = {
                let (highest, done) = (highest.clone(), done.clone());
                scope.spawn(move || {
                    while !done.load(Ordering::Relaxed) {
                        let established =
                            gate.slots(PortId::from(port)).expect("slots").established;
                        highest.fetch_max(established, Ordering::Relaxed);
                        thread::sleep(Duration::from_millis(1));
                    }
                })
            };
            let attempts: Vec<_> = (0..BURST)
                .map(|_| {
                    scope.spawn(move || {
                        connect_from(LOCAL, loopback(port), Duration::from_millis(1_500)).ok()
                    })
                })
                .collect();
            let held: Vec<TcpStream> = attempts
                .into_iter()
                .filter_map(|attempt| attempt.join().expect("connect thread"))
                .collect();
            done.store(true, Ordering::Relaxed);
            watcher.join().expect("watcher");
            held
        })
    });
    assert_eq!(
        held.len(),
        LIMIT as usize,
        "exactly max_connections of {BURST} simultaneous connects succeed"
    );
    assert!(
        highest.load(Ordering::Relaxed) <= u64::from(LIMIT),
        "never more than max_connections established"
    );
    assert!(eventually(Duration::from_secs(2), || gate
        .slots(PortId::from(port))
        .expect("slots")
        .established
        == u64::from(LIMIT)));
    let counters = gate
        .counters(PortId::new(port, Protocol::Tcp))
        .expect("counters")
        .total;
    assert_eq!(counters.accepted, u64::from(LIMIT));
    assert!(counters.dropped_for(reason::CONN_LIMIT) >= (BURST - LIMIT as usize) as u64);

    // A graceful close frees a slot.
    drop(held.pop());
    assert!(
        eventually(Duration::from_secs(3), || gate
            .slots(PortId::from(port))
            .expect("slots")
            .established
            == u64::from(LIMIT) - 1),
        "FIN frees the slot: {:?}",
        gate.slots(PortId::from(port))
    );
    held.push(
        fixture
            .connect(LOCAL, CONNECT_WITHIN)
            .expect("the freed slot takes a new connection"),
    );
    // A half-close: the server reads end-of-file and closes its side, which frees the slot.
    let half_closed = held.pop().expect("a held connection");
    half_closed
        .shutdown(std::net::Shutdown::Write)
        .expect("half-close");
    assert!(
        eventually(Duration::from_secs(3), || gate
            .slots(PortId::from(port))
            .expect("slots")
            .established
            == u64::from(LIMIT) - 1),
        "a half-close frees the slot once the server closes: {:?}",
        gate.slots(PortId::from(port))
    );
    drop(half_closed);
    held.push(
        fixture
            .connect(LOCAL, CONNECT_WITHIN)
            .expect("the slot freed by a half-close takes a new connection"),
    );
    // A reset frees a slot.
    reset(held.pop().expect("a held connection"));
    assert!(
        eventually(Duration::from_secs(3), || gate
            .slots(PortId::from(port))
            .expect("slots")
            .established
            == u64::from(LIMIT) - 1),
        "RST frees the slot: {:?}",
        gate.slots(PortId::from(port))
    );
    held.push(
        ns.run(|| connect_from(LOCAL, loopback(port), CONNECT_WITHIN))
            .expect("the slot freed by RST takes a new connection"),
    );
    assert!(
        ns.run(|| connect_from(LOCAL, loopback(port), REFUSED_WITHIN))
            .is_err(),
        "full again"
    );
    drop(held);
    assert!(
        eventually(Duration::from_secs(3), || gate
            .slots(PortId::from(port))
            .expect("slots")
            == portgate_common::ConnSlots {
                last_sweep_ns: gate.slots(PortId::from(port)).expect("slots").last_sweep_ns,
                ..Default::default()
            }),
        "every slot and established count back to 0, no drift: {:?}",
        gate.slots(PortId::from(port))
    );
}

#[test]
fn draining_port_refuses_new_connections_and_keeps_established_ones() {
    if !require_privileges("draining_port_refuses_new_connections_and_keeps_established_ones") {
        return;
    }
    let port = MIN_PORT + 20;
    let mut fixture = LoopbackPort::new(port, &PortPolicy::default());
    let mut established = fixture
        .connect(LOCAL, CONNECT_WITHIN)
        .expect("connect while Active");
    echo(&mut established, b"before").expect("echo while Active");

    fixture
        .gate
        .set_policy(
            PortId::new(port, Protocol::Tcp),
            &PortPolicy {
                status: PortStatus::Draining,
                ..PortPolicy::default()
            },
        )
        .expect("drain");
    assert!(
        fixture.connect(LOCAL, REFUSED_WITHIN).is_err(),
        "a Draining port refuses new connections"
    );
    for round in 0..20 {
        echo(
            &mut established,
            format!("while draining {round}").as_bytes(),
        )
        .expect("the established connection keeps exchanging data");
    }
    let counters = fixture
        .gate
        .counters(PortId::new(port, Protocol::Tcp))
        .expect("counters")
        .total;
    assert!(counters.dropped_for(reason::DRAINING) >= 1);
    assert_eq!(
        fixture
            .gate
            .slots(PortId::from(port))
            .expect("slots")
            .established,
        1
    );
}

#[test]
fn grants_admit_until_they_expire() {
    if !require_privileges("grants_admit_until_they_expire") {
        return;
    }
    let port = MIN_PORT + 30;
    let mut fixture = LoopbackPort::new(
        port,
        &PortPolicy {
            access: PortAccessControl {
                require_authentication: true,
                ..PortAccessControl::default()
            },
            ..PortPolicy::default()
        },
    );
    let connect = |fixture: &LoopbackPort, from| fixture.connect(from, REFUSED_WITHIN);

    assert!(connect(&fixture, LOCAL).is_err(), "no grant: refused");
    let now = monotonic_now_ns();
    let gate = &mut fixture.gate;
    gate.add_grant(
        PortId::new(port, Protocol::Tcp),
        LOCAL,
        now + 60_000_000_000,
    )
    .expect("grant");
    gate.add_grant(
        PortId::new(port, Protocol::Tcp),
        OTHER_LOCAL,
        now.saturating_sub(1),
    )
    .expect("expired grant");
    let mut ok = connect(&fixture, LOCAL).expect("an unexpired grant admits");
    echo(&mut ok, b"granted").expect("echo");
    assert!(
        connect(&fixture, OTHER_LOCAL).is_err(),
        "an expired grant does not admit"
    );
    fixture
        .gate
        .remove_grant(PortId::new(port, Protocol::Tcp), LOCAL)
        .expect("revoke");
    assert!(
        connect(&fixture, LOCAL).is_err(),
        "a revoked grant does not admit"
    );
    let counters = fixture
        .gate
        .counters(PortId::new(port, Protocol::Tcp))
        .expect("counters")
        .total;
    assert!(counters.dropped_for(reason::AUTH_REQUIRED) >= 3);
    assert_eq!(counters.accepted, 1);
}

#[test]
fn bind_follows_the_owner_cgroup_tree() {
    if !require_privileges("bind_follows_the_owner_cgroup_tree") {
        return;
    }
    let pins = PinDir::new();
    let parent = TestCgroup::new();
    let owner = parent.child("owner");
    let owner_child = owner.child("worker");
    let other = parent.child("other");
    let ns = NetNs::new();
    let mut gate = install(&settings(&pins));
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

#[test]
fn enforcement_outlives_the_handle_and_uninstall_removes_everything() {
    if !require_privileges("enforcement_outlives_the_handle_and_uninstall_removes_everything") {
        return;
    }
    let pins = PinDir::new();
    let cgroup = TestCgroup::new();
    let ns = NetNs::new();
    let port = MIN_PORT + 50;
    // Programs of other gates on this machine (a running portgate, another test process)
    // are not this test's to judge.
    let others = our_programs();
    {
        let mut gate = install(&settings(&pins));
        gate.attach_cgroup(cgroup.path()).expect("attach");
        gate.set_policy(
            PortId::new(port, Protocol::Tcp),
            &PortPolicy {
                access: PortAccessControl {
                    allowed_ips: allowlist(&["127.0.0.1/32"]),
                    ..PortAccessControl::default()
                },
                ..PortPolicy::default()
            },
        )
        .expect("set policy");
    }
    // No handle left in this process: the pins hold everything.
    let server = ns.run(|| EchoServer::serve(listen_in(&cgroup, loopback(port))));
    let connect = |from| ns.run(|| connect_from(from, loopback(port), REFUSED_WITHIN));
    let mut ok = connect(LOCAL).expect("allowed without a handle");
    echo(&mut ok, b"pinned").expect("echo");
    assert!(
        connect(OTHER_LOCAL).is_err(),
        "still enforced without a handle"
    );

    let gate = install(&settings(&pins));
    let counters = gate
        .counters(PortId::new(port, Protocol::Tcp))
        .expect("counters")
        .total;
    assert_eq!(counters.accepted, 1, "counters survive re-adoption");
    assert!(counters.dropped_for(reason::NOT_ALLOWED) >= 1);
    assert_eq!(
        gate.attachments().expect("attachments"),
        [
            "cgroup_bind4",
            "cgroup_bind6",
            "cgroup_skb_ingress",
            "sock_ops"
        ],
        "adopted, not attached twice"
    );
    let policy = gate
        .policy(PortId::new(port, Protocol::Tcp))
        .expect("policy")
        .expect("the policy survived");
    assert_eq!(policy.status, portgate_common::status::ACTIVE);
    drop(gate);
    drop(ok);

    let attached: Vec<u32> = our_programs()
        .into_iter()
        .filter(|id| !others.contains(id))
        .collect();
    assert!(
        attached.len() >= 4,
        "the four cgroup programs, held by their pinned links"
    );
    portgate::gate::uninstall(pins.path()).expect("uninstall");
    assert!(!pins.path().exists(), "nothing left pinned");
    assert!(
        eventually(Duration::from_secs(5), || our_programs()
            .iter()
            .all(|id| !attached.contains(id))),
        "uninstall detached and freed every program"
    );
    let mut free = connect(OTHER_LOCAL).expect("after uninstall nothing is enforced");
    echo(&mut free, b"free").expect("echo");
    drop(server);
}

/// Ids of the loaded BPF programs with portgate's names (the kernel keeps 15 characters).
fn our_programs() -> Vec<u32> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|program| {
            program
                .name_as_str()
                .is_some_and(|name| name.starts_with("portgate_"))
        })
        .map(|program| program.id())
        .collect()
}

#[test]
fn udp_datagrams_follow_the_allowlist_each_counted() {
    const SENT: usize = 5;
    if !require_privileges("udp_datagrams_follow_the_allowlist_each_counted") {
        return;
    }
    let pins = PinDir::new();
    let cgroup = TestCgroup::new();
    let ns = NetNs::new();
    let mut gate = install(&settings(&pins));
    gate.attach_cgroup(cgroup.path()).expect("attach");
    let port = MIN_PORT + 60;
    gate.set_policy(
        PortId::new(port, Protocol::Udp),
        &PortPolicy {
            access: PortAccessControl {
                allowed_ips: allowlist(&["127.0.0.1/32"]),
                ..PortAccessControl::default()
            },
            ..PortPolicy::default()
        },
    )
    .expect("set policy");
    let replies = ns.run(|| {
        let server = {
            let _inside = cgroup.enter();
            std::net::UdpSocket::bind(loopback(port)).expect("bind the UDP server")
        };
        // Quiet for longer than the dropped datagrams take to send, so it is still
        // there (and cgroup_skb still sees them) until the end.
        server
            .set_read_timeout(Some(Duration::from_millis(1_500)))
            .expect("timeout");
        let echo_server = thread::spawn(move || {
            let mut buffer = [0u8; 64];
            // Bounded: it stops at the first quiet 1.5 s.
            while let Ok((n, from)) = server.recv_from(&mut buffer) {
                let _sent = server.send_to(&buffer[..n], from);
            }
        });
        let mut replies = [0usize; 2];
        for (slot, source) in [LOCAL, OTHER_LOCAL].into_iter().enumerate() {
            let client =
                std::net::UdpSocket::bind(SocketAddr::new(source, 0)).expect("bind the client");
            client
                .set_read_timeout(Some(Duration::from_millis(200)))
                .expect("timeout");
            for round in 0..SENT {
                client
                    .send_to(format!("datagram {round}").as_bytes(), loopback(port))
                    .expect("send");
                let mut buffer = [0u8; 64];
                if client.recv_from(&mut buffer).is_ok() {
                    replies[slot] += 1;
                }
            }
        }
        echo_server.join().expect("UDP echo server");
        replies
    });
    assert_eq!(
        replies,
        [SENT, 0],
        "allowed source answered, the other dropped"
    );
    let counters = gate
        .counters(PortId::new(port, Protocol::Udp))
        .expect("counters")
        .total;
    assert_eq!(
        counters.accepted, SENT as u64,
        "every datagram is a new connection"
    );
    assert_eq!(counters.dropped_for(reason::NOT_ALLOWED), SENT as u64);
}
