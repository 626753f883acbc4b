//! The container fixtures on their own, without the gate: containers on a host's bridge
//! serving the same port, reached from a client namespace through the host's DNAT with the
//! client's own address, a burst of connects through it, and nothing left behind. And,
//! opt-in (`PORTGATE_TEST_PODMAN=1`), a real podman container that the fixtures imitate:
//! its published port, its cgroup2 directory and its own network namespace.

use std::{
    fs,
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::unix::fs::MetadataExt as _,
    panic::{self, AssertUnwindSafe},
    path::PathBuf,
    sync::{Barrier, Mutex},
    thread,
    time::Instant,
};

use portgate_tests::{
    common::{
        CONNECT_WITHIN, EchoServer, REFUSED_WITHIN, connect_from,
        container::{Client, Host, Publish, TestContainer, accept_within},
        echo, eventually, loopback, output,
        podman::{
            CONTAINER_PORT, INDEX_HTML, PodmanContainer, PodmanImage, cgroup_pids, free_port,
            http_get, netns_of, podman,
        },
    },
    require_podman, require_privileges,
};

const PORT_A: u16 = 18_080;
const PORT_B: u16 = 18_081;

/// Sends `greeting` from the server's side of a connection and reads it on the client's,
/// then the other way: both directions cross the DNAT.
fn exchange(client: &mut TcpStream, served: &mut TcpStream, greeting: &[u8]) -> io::Result<()> {
    served.set_read_timeout(Some(CONNECT_WITHIN))?;
    served.write_all(greeting)?;
    let mut heard = vec![0; greeting.len()];
    client.read_exact(&mut heard)?;
    assert_eq!(
        heard, greeting,
        "the client hears the container it was sent to"
    );
    client.write_all(b"thanks")?;
    let mut back = [0; 6];
    served.read_exact(&mut back)?;
    assert_eq!(&back, b"thanks");
    Ok(())
}

#[test]
fn each_published_port_reaches_its_own_container_on_the_same_port() {
    if !require_privileges!() {
        return;
    }
    let host = Host::new();
    let a = TestContainer::new(&host);
    let b = TestContainer::new(&host);
    // Both serve port 80, each in its own namespace and cgroup.
    let listeners = [a.listen(80), b.listen(80)];
    let _published = [
        Publish::new(&host, PORT_A, &a, 80),
        Publish::new(&host, PORT_B, &b, 80),
    ];
    let client = Client::new(&host);
    let root = portgate::host::cgroups::root().expect("cgroup2 mount");

    for (container, listener) in [&a, &b].into_iter().zip(&listeners) {
        let listening = container
            .ns
            .exec("ss", &["-Htln", "--cgroup", "sport = :80"]);
        let cgroup = container.cgroup.path();
        let relative = cgroup.strip_prefix(&root).expect("below the cgroup2 mount");
        // ss names a cgroup by its path below /sys/fs/cgroup, and by its id where the
        // cgroup2 mount is elsewhere (as on hybrid hosts).
        let by_path = format!("cgroup:/{}", relative.display());
        let by_id = format!("cgroup:unreachable:{:x}", container.cgroup.id());
        assert!(
            listening.contains(&by_path) || listening.contains(&by_id),
            "the listener of {} is in its cgroup {}: {listening}",
            container.addr(),
            cgroup.display()
        );
        assert_eq!(
            listener.local_addr().expect("address").port(),
            80,
            "both containers listen on port 80"
        );
    }

    for (port, served_by, idle) in [(PORT_A, 0, 1), (PORT_B, 1, 0)] {
        let mut stream = client
            .connect(port)
            .unwrap_or_else(|err| panic!("connect to the host's {port}: {err}"));
        let (mut served, _) = accept_within(&listeners[served_by], CONNECT_WITHIN)
            .unwrap_or_else(|| panic!("the container published on {port} accepts"));
        let greeting = format!("container {served_by} on host port {port}");
        exchange(&mut stream, &mut served, greeting.as_bytes()).expect("the exchange");
        assert!(
            accept_within(&listeners[idle], REFUSED_WITHIN).is_none(),
            "the other container saw no connection for host port {port}"
        );
    }
}

#[test]
fn the_container_sees_the_clients_own_address() {
    if !require_privileges!() {
        return;
    }
    let host = Host::new();
    let container = TestContainer::new(&host);
    let listener = container.listen(80);
    let published = Publish::new(&host, PORT_A, &container, 80);
    let client = Client::new(&host);

    let stream = client.connect(PORT_A).expect("connect through the DNAT");
    let (served, peer) = accept_within(&listener, CONNECT_WITHIN).expect("the container accepts");
    assert_eq!(
        peer.ip(),
        client.addr(),
        "no masquerade: the container sees the client"
    );
    assert_eq!(peer, stream.local_addr().expect("the client's address"));
    assert_eq!(
        served.local_addr().expect("the container's address"),
        published.to(),
        "the container is reached at its own address and port"
    );
    assert_eq!(
        stream.peer_addr().expect("the client's peer"),
        SocketAddr::new(client.host_addr(), PORT_A),
        "the client sees the host's address and published port"
    );
}

#[test]
fn two_hundred_simultaneous_connects_pass_the_dnat() {
    const BURST: usize = 200;
    if !require_privileges!() {
        return;
    }
    let host = Host::new();
    let container = TestContainer::new(&host);
    let server = EchoServer::serve(container.listen(80));
    let _published = Publish::new(&host, PORT_A, &container, 80);
    let client = Client::new(&host);
    let (from, to) = (client.addr(), SocketAddr::new(client.host_addr(), PORT_A));

    let started = Instant::now();
    let failures: Vec<String> = client.ns.run(|| {
        let barrier = Barrier::new(BURST);
        thread::scope(|scope| {
            let connects: Vec<_> = (0..BURST)
                .map(|i| {
                    let barrier = &barrier;
                    scope.spawn(move || {
                        barrier.wait();
                        let mut stream = connect_from(from, to, CONNECT_WITHIN)
                            .map_err(|err| format!("connect {i}: {err}"))?;
                        echo(&mut stream, format!("hello {i}").as_bytes())
                            .map_err(|err| format!("echo {i}: {err}"))
                    })
                })
                .collect();
            connects
                .into_iter()
                .filter_map(|connect| connect.join().expect("a connecting thread").err())
                .collect()
        })
    });
    assert!(
        failures.is_empty(),
        "{} of {BURST} connects through the DNAT failed (in {:?}): {failures:?}",
        failures.len(),
        started.elapsed()
    );
    drop(server);
}

/// What a topology made: its namespaces, cgroups and the nft table of a publish.
#[derive(Default)]
struct Made {
    namespaces: Vec<String>,
    cgroups: Vec<PathBuf>,
}

#[test]
fn nothing_is_left_after_the_guards_drop_even_in_a_panic() {
    if !require_privileges!() {
        return;
    }
    let made = Mutex::new(Made::default());
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
        let host = Host::new();
        let container = TestContainer::new(&host);
        let client = Client::new(&host);
        {
            // A publish dropped while its host lives takes its table with it.
            let publish = Publish::new(&host, PORT_A, &container, 80);
            let table = publish.table().to_owned();
            assert!(host.ns.nft(&["list", "tables"]).contains(&table));
            drop(publish);
            let tables = host.ns.nft(&["list", "tables"]);
            assert!(!tables.contains(&table), "{table} is gone: {tables}");
        }
        let _publish = Publish::new(&host, PORT_A, &container, 80);
        let mut made = made.lock().expect("not poisoned");
        made.namespaces = [&host.ns, &container.ns, &client.ns]
            .map(|ns| ns.name().to_owned())
            .to_vec();
        made.cgroups = vec![
            host.cgroup().path().to_owned(),
            container.cgroup.path().to_owned(),
        ];
        for name in &made.namespaces {
            assert!(
                listed_namespaces().contains(name),
                "{name} exists meanwhile"
            );
        }
        drop(made);
        panic!("on purpose: the guards drop while this unwinds");
    }));
    assert!(outcome.is_err(), "the topology panicked on purpose");

    let made = made.into_inner().expect("not poisoned");
    assert_eq!(
        made.namespaces.len(),
        3,
        "the topology got as far as its names"
    );
    let listed = listed_namespaces();
    for name in &made.namespaces {
        assert!(
            !listed.contains(name),
            "namespace {name} is gone: {listed:?}"
        );
    }
    for cgroup in &made.cgroups {
        assert!(!cgroup.exists(), "cgroup {} is gone", cgroup.display());
    }
}

/// The names `ip netns list` shows (each line is `NAME` or `NAME (id: N)`).
fn listed_namespaces() -> Vec<String> {
    output("ip", &["netns", "list"])
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn podman_serves_a_published_port() {
    if !require_podman!() {
        return;
    }
    let started = Instant::now();
    let image = PodmanImage::build();
    let port = free_port();
    let container = PodmanContainer::run(&image, port);

    // Loopback to a published port: netavark DNATs it in the host's nat output chain.
    let mut response = Err(io::Error::other("not fetched"));
    assert!(
        eventually(CONNECT_WITHIN, || {
            response = http_get(loopback(port));
            response.is_ok()
        }),
        "httpd answers on 127.0.0.1:{port}: {response:?}"
    );
    let response = response.expect("a response");
    assert!(
        response.starts_with("HTTP/1.")
            && response.lines().next().is_some_and(|l| l.contains(" 200 ")),
        "200 OK: {response}"
    );
    assert!(
        response.ends_with(INDEX_HTML),
        "the image's page: {response}"
    );

    let address = podman(&[
        "inspect",
        "--format",
        "{{.NetworkSettings.IPAddress}}",
        container.id(),
    ]);
    let to = format!("{address}:{CONTAINER_PORT}");
    let ruleset = output("nft", &["list", "ruleset"]);
    let dnat = ruleset
        .lines()
        .find(|line| line.contains(&format!("dport {port} ")) && line.contains(&to))
        .unwrap_or_else(|| panic!("a DNAT of {port} to {to} in the host's ruleset: {ruleset}"))
        .trim()
        .to_owned();

    let cgroup = container.cgroup();
    assert_eq!(
        cgroup,
        container.expected_cgroup(),
        "podman's cgroup layout"
    );
    let pids = cgroup_pids(&cgroup);
    assert!(!pids.is_empty(), "{} has processes", cgroup.display());
    let own = fs::metadata("/proc/thread-self/ns/net")
        .expect("the test's namespace")
        .ino();
    for &pid in &pids {
        assert_ne!(
            netns_of(pid),
            own,
            "process {pid} has a namespace of its own"
        );
    }
    let container_netns = netns_of(pids[0]);
    println!(
        "podman: container {} at {address}, cgroup {}, pids {pids:?}, netns {container_netns} \
         (the test's {own}), DNAT rule `{dnat}`, served after {:?}",
        container.id(),
        cgroup.display(),
        started.elapsed()
    );

    drop(container);
    assert!(
        eventually(CONNECT_WITHIN, || !cgroup.exists()),
        "{} is removed with the container",
        cgroup.display()
    );
    let name = image.name().to_owned();
    drop(image);
    let exists = std::process::Command::new("podman")
        .args(["image", "exists", &name])
        .status()
        .expect("podman image exists");
    assert!(!exists.success(), "the image {name} is removed");
    println!("podman: done in {:?}", started.elapsed());
}
