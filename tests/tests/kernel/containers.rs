//! Containers, without a container runtime: each "container" is a network namespace, a
//! child cgroup and a veth to a bridge in a namespace playing the host, whose DNAT rule
//! publishes a container port on a host port. The gate is installed from the host's
//! namespace, with its cgroup programs on the containers' parent cgroup and (for published
//! ports) XDP on the host's end of the client's link.
//!
//! Needs: root, bpffs, BTF, cgroup2, iproute2, nftables, and a kernel whose `cgroup_skb`
//! may call `bpf_get_netns_cookie` (6.15 or later).

use std::{
    io::{self, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::Path,
    sync::{
        Arc, Barrier,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use ipnet::IpNet;
use portgate::{
    api::AllocRequest,
    client::Client as ApiClient,
    gate::{Gate, GateSettings, SkbNetns},
    model::{HostPort, NetnsId, OwnerCgroup, PortAccessControl, PortId, PortPolicy, Protocol},
};
use portgate_common::{hook, reason};
use portgate_tests::{
    common::{
        CONNECT_WITHIN, NetNs, REFUSED_WITHIN, TestCgroup, connect_from,
        container::{Client, Host, Publish, TestContainer, accept_within},
        eventually,
        gate::{MIN_PORT, install, settings},
    },
    daemon::Daemon,
    require_privileges,
};

use portgate_tests::common::PinDir;

/// The port both containers serve.
const PORT: u16 = 80;

/// The namespace of a test container, as the gate keys it.
fn netns_of(container: &TestContainer<'_>) -> NetnsId {
    let path = Path::new("/run/netns").join(container.ns.name());
    NetnsId(
        portgate::host::netns::open(&path)
            .expect("the container's namespace")
            .cookie,
    )
}

/// The owner record of a test cgroup.
fn owner(cgroup: &TestCgroup) -> OwnerCgroup {
    OwnerCgroup {
        path: cgroup.path().to_owned(),
        id: cgroup.id(),
        level: cgroup.level(),
    }
}

/// A policy allowing `sources` (each a single address), at most `max` connections, owned
/// by `cgroup`, published on `published` when given.
fn policy(sources: &[IpAddr], max: u32, cgroup: &TestCgroup, published: Option<u16>) -> PortPolicy {
    PortPolicy {
        access: PortAccessControl {
            allowed_ips: sources.iter().map(|source| IpNet::from(*source)).collect(),
            max_connections: max,
            require_authentication: false,
        },
        owner: Some(owner(cgroup)),
        published,
        ..PortPolicy::default()
    }
}

/// Serves `listener` until `stop`: each connection gets `greeting`, then its input echoed.
fn serve(listener: TcpListener, greeting: &'static [u8], stop: Arc<AtomicBool>) {
    thread::spawn(move || {
        while !stop.load(Ordering::SeqCst) {
            let Some((mut stream, _)) = accept_within(&listener, Duration::from_millis(200)) else {
                continue;
            };
            thread::spawn(move || {
                if stream.write_all(greeting).is_err() {
                    return;
                }
                let mut buffer = [0; 64];
                while let Ok(read) = stream.read(&mut buffer) {
                    if read == 0 || stream.write_all(&buffer[..read]).is_err() {
                        break;
                    }
                }
            });
        }
    });
}

/// The greeting a server sends first.
fn greeting_of(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut greeting = [0; 1];
    stream.read_exact(&mut greeting)?;
    Ok(greeting.to_vec())
}

/// Stops the servers when dropped, so that a failing test does not leave them running.
struct StopServers(Arc<AtomicBool>);

impl Drop for StopServers {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[test]
fn two_containers_serve_port_80_each_under_its_own_policy() {
    if !require_privileges!() {
        return;
    }
    two_containers_on_port_80(SkbNetns::Cookie, "cgroup_skb_ingress");
}

/// The same with the `cgroup_skb` fallback of kernels before 6.15, which finds a packet's
/// namespace in its socket's storage.
#[test]
fn two_containers_serve_port_80_with_the_socket_storage_fallback() {
    if !require_privileges!() {
        return;
    }
    two_containers_on_port_80(SkbNetns::SocketStorage, "cgroup_skb_ingress_sk");
}

#[expect(clippy::too_many_lines, reason = "one scenario, told in order")]
fn two_containers_on_port_80(skb_netns: SkbNetns, skb_link: &str) {
    let pins = PinDir::new();
    let host = Host::new();
    let (a, b) = (TestContainer::new(&host), TestContainer::new(&host));
    let client = Client::new(&host);
    let stranger = host.cgroup().child("stranger");
    let settings = GateSettings {
        skb_netns,
        ..settings(&pins)
    };
    let mut gate: Gate = host.ns.run(|| install(&settings));
    gate.attach_cgroup(host.cgroup().path())
        .expect("attach to the containers' parent cgroup");
    assert!(
        gate.attachments()
            .expect("attachments")
            .iter()
            .any(|name| name == skb_link),
        "the cgroup_skb program asked for is attached"
    );
    let (id_a, id_b) = (
        PortId {
            netns: netns_of(&a),
            ..PortId::new(PORT, Protocol::Tcp)
        },
        PortId {
            netns: netns_of(&b),
            ..PortId::new(PORT, Protocol::Tcp)
        },
    );
    assert_ne!(id_a, id_b, "one port number, two ports");
    // A lets the client in, up to 1 connection; B lets only an address nobody has.
    let nobody: IpAddr = Ipv4Addr::new(198, 51, 100, 7).into();
    gate.set_policy(id_a, &policy(&[client.addr()], 1, &a.cgroup, None))
        .expect("policy of A");
    gate.set_policy(id_b, &policy(&[nobody], 0, &b.cgroup, None))
        .expect("policy of B");

    // Each container's own cgroup binds its port 80; a third cgroup in A's namespace
    // cannot, and neither can A's cgroup in B's namespace.
    let stop = Arc::new(AtomicBool::new(false));
    let _stop = StopServers(Arc::clone(&stop));
    serve(a.listen(PORT), b"A", Arc::clone(&stop));
    serve(b.listen(PORT), b"B", Arc::clone(&stop));
    let bind_in = |container: &TestContainer<'_>, cgroup: &TestCgroup| {
        container.ns.run(|| {
            let _inside = cgroup.enter();
            // Another address than the server's, so only the gate can refuse it.
            TcpListener::bind(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), PORT)).map(drop)
        })
    };
    let refused = bind_in(&a, &stranger).expect_err("a third cgroup binds A's port 80");
    assert_eq!(refused.kind(), io::ErrorKind::PermissionDenied, "{refused}");
    let refused = bind_in(&b, &a.cgroup).expect_err("A's cgroup binds B's port 80");
    assert_eq!(refused.kind(), io::ErrorKind::PermissionDenied, "{refused}");
    assert_eq!(gate.counters(id_a).expect("counters").total.bind_denied, 1);
    assert_eq!(gate.counters(id_b).expect("counters").total.bind_denied, 1);

    // Published on two host ports (the DNAT only: this test's gate judges in the
    // containers, after it).
    let (host_a, host_b) = (MIN_PORT + 80, MIN_PORT + 81);
    let _pa = Publish::new(&host, host_a, &a, PORT);
    let _pb = Publish::new(&host, host_b, &b, PORT);
    let mut first = client.connect(host_a).expect("the client reaches A");
    assert_eq!(greeting_of(&mut first).expect("A's greeting"), b"A");
    // A holds its one connection: the next is refused by A's limit, in A's namespace.
    let second = client.ns.run(|| {
        connect_from(
            client.addr(),
            SocketAddr::new(client.host_addr(), host_a),
            REFUSED_WITHIN,
        )
    });
    assert!(second.is_err(), "A's limit of 1 let a second connection in");
    // B's allowlist does not hold the client's address.
    let to_b = client.ns.run(|| {
        connect_from(
            client.addr(),
            SocketAddr::new(client.host_addr(), host_b),
            REFUSED_WITHIN,
        )
    });
    assert!(to_b.is_err(), "B's allowlist let the client in");
    drop(first);

    let (counters_a, counters_b) = (
        gate.counters(id_a).expect("counters of A"),
        gate.counters(id_b).expect("counters of B"),
    );
    let skb_a = counters_a.hooks[usize::from(hook::SKB)];
    let skb_b = counters_b.hooks[usize::from(hook::SKB)];
    assert_eq!(skb_a.accepted, 1, "A accepted one connection: {skb_a:?}");
    assert!(skb_a.dropped_for(reason::CONN_LIMIT) >= 1, "{skb_a:?}");
    assert_eq!(skb_a.dropped_for(reason::NOT_ALLOWED), 0, "{skb_a:?}");
    assert_eq!(skb_b.accepted, 0, "{skb_b:?}");
    assert!(skb_b.dropped_for(reason::NOT_ALLOWED) >= 1, "{skb_b:?}");
    assert_eq!(skb_b.dropped_for(reason::CONN_LIMIT), 0, "{skb_b:?}");
    // Nothing was counted under the host's port 80 or the host ports: the DNAT's ports
    // are not allocations of their own.
    for port in [PORT, host_a, host_b] {
        assert_eq!(
            gate.counters(PortId::new(port, Protocol::Tcp))
                .expect("counters")
                .total
                .packets,
            0,
            "the host's {port} counted packets"
        );
    }
    assert!(
        eventually(CONNECT_WITHIN, || gate.slots(id_a).expect("slots").slots
            == 0),
        "A's slot is given back when its connection closes"
    );
    drop(gate);
    portgate::gate::uninstall(pins.path()).expect("uninstall");
}

#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, told in order")]
fn a_published_port_is_one_allocation_at_both_hooks() {
    const CONNECTS: usize = 200;
    const LIMIT: u32 = 5;
    if !require_privileges!() {
        return;
    }
    let pins = PinDir::new();
    let host = Host::new();
    let container = TestContainer::new(&host);
    let client = Client::new(&host);
    let outsider = Client::new(&host);
    let host_port = MIN_PORT + 80;
    let mut gate: Gate = host.ns.run(|| install(&settings(&pins)));
    gate.attach_cgroup(host.cgroup().path())
        .expect("attach to the containers' parent cgroup");
    // XDP where the clients' packets arrive on the host, before the DNAT.
    host.ns.run(|| {
        for interface in [client.host_if(), outsider.host_if()] {
            gate.attach_xdp(interface, NetnsId::HOST, aya::programs::XdpMode::default())
                .expect("attach XDP to the host's end of a client link");
        }
    });
    let id = PortId {
        netns: netns_of(&container),
        ..PortId::new(PORT, Protocol::Tcp)
    };
    gate.set_policy(
        id,
        &policy(&[client.addr()], LIMIT, &container.cgroup, Some(host_port)),
    )
    .expect("policy of the published port");
    assert_eq!(
        gate.published().expect("published ports"),
        [(PortId::new(host_port, Protocol::Tcp), id)].into(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let _stop = StopServers(Arc::clone(&stop));
    serve(container.listen(PORT), b"C", Arc::clone(&stop));
    let _publish = Publish::new(&host, host_port, &container, PORT);

    // The allowlist judges the client's own address: the outsider is refused at XDP.
    let refused = outsider.ns.run(|| {
        connect_from(
            outsider.addr(),
            SocketAddr::new(outsider.host_addr(), host_port),
            REFUSED_WITHIN,
        )
    });
    assert!(refused.is_err(), "an address outside the allowlist got in");

    // 200 connects at once: exactly LIMIT get in and hold their connection.
    let barrier = Barrier::new(CONNECTS);
    let held: Vec<TcpStream> = client.ns.run(|| {
        thread::scope(|scope| {
            let attempts: Vec<_> = (0..CONNECTS)
                .map(|_| {
                    scope.spawn(|| {
                        barrier.wait();
                        let to = SocketAddr::new(client.host_addr(), host_port);
                        let mut stream = connect_from(client.addr(), to, CONNECT_WITHIN).ok()?;
                        // In only once the server has answered: the connection is its.
                        greeting_of(&mut stream).ok()?;
                        Some(stream)
                    })
                })
                .collect();
            attempts
                .into_iter()
                .filter_map(|attempt| attempt.join().expect("a connecting thread"))
                .collect()
        })
    });
    assert_eq!(
        held.len(),
        LIMIT as usize,
        "{} of {CONNECTS} simultaneous connects got in, the limit is {LIMIT}",
        held.len()
    );
    let slots = gate.slots(id).expect("slots");
    assert_eq!(
        (slots.slots, slots.established),
        (u64::from(LIMIT), u64::from(LIMIT)),
        "{slots:?}"
    );

    // One set of counters, under the container's port, whichever hook counted: the
    // accepted connections are what the clients saw, counted once.
    let counters = gate.counters(id).expect("counters");
    assert_eq!(counters.total.accepted, u64::from(LIMIT), "{counters:?}");
    assert!(
        counters.total.dropped_for(reason::CONN_LIMIT) >= (CONNECTS as u64 - u64::from(LIMIT)),
        "every refused connect was counted at least once: {counters:?}"
    );
    assert!(
        counters.total.dropped_for(reason::NOT_ALLOWED) >= 1,
        "the outsider: {counters:?}"
    );
    assert!(
        counters.hooks[usize::from(hook::XDP)].packets > 0,
        "XDP judged the host port as the container's: {counters:?}"
    );
    for port in [
        PortId::new(host_port, Protocol::Tcp),
        PortId::new(PORT, Protocol::Tcp),
    ] {
        assert_eq!(
            gate.counters(port).expect("counters").total.packets,
            0,
            "{port} counted packets of its own"
        );
    }

    // All closed: every slot comes back, none twice.
    drop(held);
    assert!(
        eventually(CONNECT_WITHIN, || {
            let slots = gate.slots(id).expect("slots");
            slots.slots == 0 && slots.established == 0
        }),
        "slots left after every connection closed: {:?}",
        gate.slots(id)
    );
    assert_eq!(
        gate.reservations().expect("reservations").get(&id),
        None,
        "no reservation left"
    );
    drop(gate);
    portgate::gate::uninstall(pins.path()).expect("uninstall");
}

/// A process listening on a published port's host port is a userland proxy: the
/// container sees its address, so `status` and `check` warn that the allowlist judges the
/// proxy.
#[test]
fn a_published_port_behind_a_userland_proxy_is_a_warning() {
    if !require_privileges!() {
        return;
    }
    let daemon = Daemon::start(46_300, 46_309);
    let container = NetNs::new();
    let host_port = 46_305;
    let request = AllocRequest {
        owner: "web".to_owned(),
        port: Some(PORT),
        netns: Some(Path::new("/run/netns").join(container.name())),
        publish: Some(HostPort::Port(host_port)),
        allow: vec!["192.0.2.1/32".parse().expect("a prefix")],
        ..AllocRequest::default()
    };
    let view = daemon
        .api(|client| client.alloc(&request))
        .expect("allocate the container's port");
    assert_eq!(view.published, Some(host_port));
    let audited = daemon.audit();
    let alloc = audited
        .iter()
        .rev()
        .find(|record| record["action"] == "alloc")
        .expect("the allocation's audit record");
    assert_eq!(alloc["netns"], view.id.netns.0, "{alloc}");
    let proxied = |warnings: &[String]| {
        warnings
            .iter()
            .any(|warning| warning.contains("userland proxy"))
    };
    let status = daemon.api(ApiClient::status).expect("status");
    assert!(!proxied(&status.warnings), "{:?}", status.warnings);
    let source: IpAddr = "192.0.2.1".parse().expect("an address");
    let answer = daemon
        .api(|client| client.check(view.id, source))
        .expect("check");
    assert!(answer.allowed && answer.warning.is_none(), "{answer:?}");

    // A proxy takes the host port in the host's (the daemon's) namespace.
    let _proxy = daemon.ns.run(|| {
        TcpListener::bind(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), host_port))
            .expect("a proxy binds the published host port")
    });
    let status = daemon.api(ApiClient::status).expect("status");
    assert!(proxied(&status.warnings), "{:?}", status.warnings);
    let answer = daemon
        .api(|client| client.check(view.id, source))
        .expect("check");
    assert!(
        answer
            .warning
            .as_deref()
            .is_some_and(|warning| warning.contains("userland proxy")),
        "{answer:?}"
    );
}
