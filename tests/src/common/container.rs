//! Containers made of plain kernel objects, for the tests of port policy per network
//! namespace: a [`Host`] namespace (the daemon's, in a test) with a bridge, [`TestContainer`]s
//! on that bridge, each with its own namespace and cgroup, a [`Client`] namespace routed to
//! the host, and [`Publish`]ed ports, DNAT rules in the host that send a host port to a
//! container as `podman run -p` does, without the masquerade, so that a container sees the
//! client's own address.
//!
//! Nothing here uses the gate: only namespaces, links, routes and nft. Every address is a
//! test address inside the namespaces these guards make (`198.19.<n>.0/24` on the bridge,
//! a [`Veth`]'s `198.18.<m>.0/24` to the client). The guards borrow their [`Host`], so it
//! is dropped last; dropping a namespace removes its links and nft tables with it.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    process::Command,
    sync::atomic::{AtomicU8, AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use super::{CONNECT_WITHIN, NetNs, TestCgroup, Veth, connect_from, unique};

/// The name of a container's end of its veth, inside its own namespace (as podman names it).
pub const CONTAINER_IF: &str = "eth0";
/// The backlog of [`TestContainer::listen`]: room for a burst of connects through a DNAT
/// while the server is slow to accept (a loaded machine).
pub const LISTEN_BACKLOG: i32 = 1024;

static BRIDGE_SUBNETS: AtomicU32 = AtomicU32::new(0);

/// A network namespace playing the host: a bridge `198.19.<n>.1/24` that the containers
/// hang off, IPv4 forwarding on (in this namespace only), and a parent cgroup for the
/// containers' cgroups (as podman's `libpod_parent`).
pub struct Host {
    /// The host's namespace.
    pub ns: NetNs,
    bridge: String,
    subnet: u8,
    next_container: AtomicU8,
    cgroup: TestCgroup,
}

impl Host {
    /// A new namespace with its bridge up and addressed, forwarding on.
    pub fn new() -> Self {
        let ns = NetNs::new();
        let subnet =
            u8::try_from(BRIDGE_SUBNETS.fetch_add(1, Ordering::Relaxed) % 250).unwrap_or(0) + 1;
        let bridge = unique("pgbr");
        ns.ip(&["link", "add", &bridge, "type", "bridge"]);
        ns.ip(&[
            "addr",
            "add",
            &format!("198.19.{subnet}.1/24"),
            "dev",
            &bridge,
        ]);
        ns.ip(&["link", "set", &bridge, "up"]);
        // Per namespace: `run_elsewhere` refuses to write the machine's own.
        ns.set_sysctl("/proc/sys/net/ipv4/ip_forward", "1");
        ns.set_sysctl("/proc/sys/net/ipv4/conf/all/forwarding", "1");
        Self {
            ns,
            bridge,
            subnet,
            next_container: AtomicU8::new(2),
            cgroup: TestCgroup::new(),
        }
    }

    /// The bridge's name, in the host's namespace.
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// The bridge's address: the containers' default gateway.
    pub fn bridge_addr(&self) -> IpAddr {
        Ipv4Addr::new(198, 19, self.subnet, 1).into()
    }

    /// The cgroup the containers' cgroups are made in.
    pub fn cgroup(&self) -> &TestCgroup {
        &self.cgroup
    }

    fn next_container_addr(&self) -> Ipv4Addr {
        let host = self.next_container.fetch_add(1, Ordering::Relaxed);
        assert!(host < 255, "a test host holds at most 253 containers");
        Ipv4Addr::new(198, 19, self.subnet, host)
    }
}

/// A container on a [`Host`]: its own namespace and a cgroup below the host's, joined to
/// the host's bridge by a veth (`eth0` inside, `198.19.<n>.<k>/24`, default route via the
/// bridge). Two containers can serve the same port: each has its own namespace.
pub struct TestContainer<'h> {
    /// The container's namespace.
    pub ns: NetNs,
    /// The container's cgroup: its servers' sockets belong to it.
    pub cgroup: TestCgroup,
    host: &'h Host,
    host_if: String,
    addr: Ipv4Addr,
}

impl<'h> TestContainer<'h> {
    /// A new container on `host`'s bridge.
    pub fn new(host: &'h Host) -> Self {
        let ns = NetNs::new();
        let cgroup = host.cgroup.child(&unique("ctr"));
        let addr = host.next_container_addr();
        let host_if = unique("pgvc");
        host.ns.ip(&[
            "link",
            "add",
            &host_if,
            "type",
            "veth",
            "peer",
            "name",
            CONTAINER_IF,
            "netns",
            ns.name(),
        ]);
        host.ns
            .ip(&["link", "set", &host_if, "master", &host.bridge]);
        host.ns.ip(&["link", "set", &host_if, "up"]);
        ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", CONTAINER_IF]);
        ns.ip(&["link", "set", CONTAINER_IF, "up"]);
        ns.ip(&[
            "route",
            "add",
            "default",
            "via",
            &host.bridge_addr().to_string(),
        ]);
        Self {
            ns,
            cgroup,
            host,
            host_if,
            addr,
        }
    }

    /// The container's address on the bridge.
    pub fn addr(&self) -> IpAddr {
        self.addr.into()
    }

    /// The name of the host's end of the container's veth (a port of the bridge).
    pub fn host_if(&self) -> &str {
        &self.host_if
    }

    /// The host the container is on.
    pub fn host(&self) -> &'h Host {
        self.host
    }

    /// A TCP listener on `0.0.0.0:port` made inside the container's namespace and cgroup
    /// (so the cgroup programs of the container see its connections), as
    /// [`super::listen_in`] makes one but with a backlog of [`LISTEN_BACKLOG`]: std's
    /// `bind` listens with 128, which a burst of connects can overflow.
    pub fn listen(&self, port: u16) -> TcpListener {
        let addr = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port);
        self.ns.run(|| {
            let _inside = self.cgroup.enter();
            let socket = socket2::Socket::new(
                socket2::Domain::IPV4,
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )
            .expect("a TCP socket");
            socket.set_reuse_address(true).expect("SO_REUSEADDR");
            socket
                .bind(&addr.into())
                .unwrap_or_else(|err| panic!("bind {addr} in the container: {err}"));
            socket
                .listen(LISTEN_BACKLOG)
                .unwrap_or_else(|err| panic!("listen on {addr} in the container: {err}"));
            socket.into()
        })
    }
}

/// A client namespace linked to a [`Host`] by its own [`Veth`] (`198.18.<m>.2` here,
/// `198.18.<m>.1` on the host's end), with its default route via the host.
pub struct Client<'h> {
    /// The client's namespace.
    pub ns: NetNs,
    veth: Veth,
    host: &'h Host,
}

impl<'h> Client<'h> {
    /// A new client of `host`.
    pub fn new(host: &'h Host) -> Self {
        let ns = NetNs::new();
        let veth = Veth::new(&host.ns, &ns);
        ns.ip(&["route", "add", "default", "via", &veth.v4(1).to_string()]);
        Self { ns, veth, host }
    }

    /// The client's own address: the source the host and the containers see.
    pub fn addr(&self) -> IpAddr {
        self.veth.v4(2)
    }

    /// The host's address on the client's link: where published ports are reached.
    pub fn host_addr(&self) -> IpAddr {
        self.veth.v4(1)
    }

    /// The host's end of the client's veth, in the host's namespace: where an XDP program
    /// sees the client's packets arrive.
    pub fn host_if(&self) -> &str {
        &self.veth.a_name
    }

    /// The client's end, in the client's namespace.
    pub fn client_if(&self) -> &str {
        &self.veth.b_name
    }

    /// The host this client is linked to.
    pub fn host(&self) -> &'h Host {
        self.host
    }

    /// Connects from the client's namespace and address to the host's `port` within
    /// [`CONNECT_WITHIN`].
    pub fn connect(&self, port: u16) -> io::Result<TcpStream> {
        let to = SocketAddr::new(self.host_addr(), port);
        self.ns
            .run(|| connect_from(self.addr(), to, CONNECT_WITHIN))
    }
}

/// A published port: an nft table of its own in the host's namespace, whose prerouting
/// chain sends TCP to a local address on `host_port` to `container:container_port`, as
/// podman's `-p` does, but without masquerade or SNAT, so the container sees the client's
/// address. Dropping it deletes the table (the host's namespace going away would as well).
pub struct Publish<'h> {
    host: &'h Host,
    table: String,
    host_port: u16,
    to: SocketAddr,
}

impl<'h> Publish<'h> {
    /// Publishes `container`'s TCP `container_port` on the host's `host_port`.
    pub fn new(
        host: &'h Host,
        host_port: u16,
        container: &TestContainer<'h>,
        container_port: u16,
    ) -> Self {
        let table = unique("pgdnat");
        let to = SocketAddr::new(container.addr(), container_port);
        host.ns.nft(&["add", "table", "ip", &table]);
        host.ns.nft(&[&format!(
            "add chain ip {table} prerouting {{ type nat hook prerouting priority dstnat; }}"
        )]);
        host.ns.nft(&[&format!(
            "add rule ip {table} prerouting fib daddr type local tcp dport {host_port} dnat to {to}"
        )]);
        Self {
            host,
            table,
            host_port,
            to,
        }
    }

    /// The nft table (family `ip`) in the host's namespace.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The port published on the host.
    pub fn host_port(&self) -> u16 {
        self.host_port
    }

    /// Where the host sends it: the container's address and port.
    pub fn to(&self) -> SocketAddr {
        self.to
    }
}

impl Drop for Publish<'_> {
    fn drop(&mut self) {
        // Reported, never raised: a panic in a drop during a test's panic would abort.
        let result = Command::new("ip")
            .args(["netns", "exec", self.host.ns.name(), "nft", "delete"])
            .args(["table", "ip", &self.table])
            .output();
        match result {
            Ok(output) if output.status.success() => {}
            Ok(output) => eprintln!(
                "clean-up: deleting nft table {} in {}: {}",
                self.table,
                self.host.ns.name(),
                String::from_utf8_lossy(&output.stderr).trim()
            ),
            Err(err) => eprintln!("clean-up: running nft: {err}"),
        }
    }
}

/// Accepts one connection on `listener` within `timeout` (polling, so a test never hangs
/// on a connection that does not come), or returns `None`. The stream returned blocks.
pub fn accept_within(listener: &TcpListener, timeout: Duration) -> Option<(TcpStream, SocketAddr)> {
    listener
        .set_nonblocking(true)
        .expect("non-blocking listener");
    let deadline = Instant::now() + timeout;
    let accepted = loop {
        match listener.accept() {
            Ok(accepted) => break Some(accepted),
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    break None;
                }
                thread::sleep(Duration::from_millis(5));
            }
            Err(err) => panic!("accept: {err}"),
        }
    };
    let _ignored = listener.set_nonblocking(false);
    accepted.inspect(|(stream, _)| {
        stream.set_nonblocking(false).expect("blocking stream");
    })
}
