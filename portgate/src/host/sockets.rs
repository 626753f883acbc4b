//! The live sockets of the calling thread's network namespace, from its procfs socket
//! tables (`/proc/thread-self/net/{tcp,tcp6,udp,udp6}`), and the [`SocketTable`] through
//! which the manager reads them: [`ProcfsSockets`] on a host, [`CachedSockets`] to share one
//! read among many allocations, a fake in unit tests.

use std::{
    collections::BTreeSet,
    fs::File,
    io,
    net::{IpAddr, SocketAddr},
    ops::RangeInclusive,
    path::PathBuf,
    sync::{Mutex, PoisonError, TryLockError},
    time::{Duration, Instant},
};

use procfs::{
    FromReadSI, ProcError,
    net::{TcpNetEntries, TcpNetEntry, TcpState, UdpNetEntries, UdpNetEntry},
};

use super::HostError;
use crate::{model::Protocol, paths};

/// A socket that takes traffic on a local port: a TCP socket in LISTEN, or a bound UDP socket.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    serde::Serialize,
    serde::Deserialize,
    utoipa::ToSchema,
)]
pub struct Listener {
    /// The local port.
    #[schema(maximum = 65535)]
    pub port: u16,
    /// Its protocol.
    pub protocol: Protocol,
    /// The local address (`0.0.0.0` or `::` when bound to every address).
    #[schema(value_type = String, example = "0.0.0.0")]
    pub addr: IpAddr,
    /// The socket owner's uid.
    #[schema(format = Int64, maximum = 4_294_967_295_u32)]
    pub uid: u32,
    /// The socket's inode, which `/proc/<pid>/fd` links name as `socket:[inode]`: the way
    /// to find the process holding it.
    pub inode: u64,
}

/// The local ports in `range` that a `protocol` socket holds, in this thread's network
/// namespace, from the IPv4 and IPv6 socket tables.
///
/// For TCP every entry counts, whatever its state: `LISTEN`, `ESTABLISHED` and the closing
/// states, `SYN_RECV` and `TIME_WAIT` all keep the port from a new plain `bind()`
/// (`EADDRINUSE`), and a port in use locally is not free to hand out. For UDP every entry is
/// a bound socket, connected or not.
///
/// Not seen: a TCP socket that is bound but neither listening nor connected. The kernel's
/// table lists only its listening and established hashes, not the bind hash, so such a
/// socket holds its port invisibly; a failed `bind()` stays the final word.
///
/// Cost: the kernel's, almost all of it. Each TCP table is a walk of the whole established
/// hash, however few sockets it holds (262144 buckets on a 24 GiB host: about 1 ms a table),
/// plus about 0.6 µs a row to print and 0.35 µs to parse; the UDP tables are quick when
/// small but grow faster than linearly (each page of output restarts the kernel's walk).
/// Measured: TCP 2.2 ms with 1 socket, 3.2 ms with 1000, 13 ms with 10000; UDP 0.04 ms with
/// none, 1.3 ms with 1000, 9 ms with 4000. Fine once per allocation; to place many ports,
/// call once with the whole range and pick from the set.
pub fn bound_ports(
    protocol: Protocol,
    range: RangeInclusive<u16>,
) -> Result<BTreeSet<u16>, HostError> {
    Ok(ports_in(&sockets(protocol)?, &range))
}

/// The listeners on ports in `range`, in this thread's network namespace, sorted: TCP sockets
/// in LISTEN and every bound UDP socket (a connected one too: it still receives on its port).
pub fn listeners(
    protocol: Protocol,
    range: RangeInclusive<u16>,
) -> Result<Vec<Listener>, HostError> {
    Ok(listeners_in(&sockets(protocol)?, protocol, &range))
}

/// One socket-table row, reduced to what portgate asks of it.
#[derive(Clone, Copy, Debug)]
struct Socket {
    local: SocketAddr,
    listening: bool,
    uid: u32,
    inode: u64,
}

impl From<TcpNetEntry> for Socket {
    fn from(entry: TcpNetEntry) -> Self {
        Self {
            local: entry.local_address,
            listening: entry.state == TcpState::Listen,
            uid: entry.uid,
            inode: entry.inode,
        }
    }
}

impl From<UdpNetEntry> for Socket {
    fn from(entry: UdpNetEntry) -> Self {
        Self {
            local: entry.local_address,
            // UDP has no listen(): a socket in the table is bound and receives.
            listening: true,
            uid: entry.uid,
            inode: entry.inode,
        }
    }
}

fn sockets(protocol: Protocol) -> Result<Vec<Socket>, HostError> {
    let mut sockets = Vec::new();
    match protocol {
        Protocol::Tcp => {
            for (path, ipv6) in [(paths::PROC_NET_TCP, false), (paths::PROC_NET_TCP6, true)] {
                if let Some(TcpNetEntries(entries)) = read_table(path, ipv6)? {
                    sockets.extend(entries.into_iter().map(Socket::from));
                }
            }
        }
        Protocol::Udp => {
            for (path, ipv6) in [(paths::PROC_NET_UDP, false), (paths::PROC_NET_UDP6, true)] {
                if let Some(UdpNetEntries(entries)) = read_table(path, ipv6)? {
                    sockets.extend(entries.into_iter().map(Socket::from));
                }
            }
        }
    }
    Ok(sockets)
}

/// Reads and parses one socket table with procfs's parser. `None` when an `ipv6` table does
/// not exist: IPv6 is disabled, so there are no such sockets.
///
/// No bigger read buffer than procfs's: the kernel hands out a socket table at most a page
/// per `read()` whatever the buffer, and 8 KiB, 64 KiB and 256 KiB buffers timed the same.
fn read_table<T: FromReadSI>(path: &str, ipv6: bool) -> Result<Option<T>, HostError> {
    let table_error = |source| HostError::SocketTable {
        path: PathBuf::from(path),
        source,
    };
    let file = match File::open(path) {
        Ok(file) => file,
        Err(err) if ipv6 && err.kind() == io::ErrorKind::NotFound => {
            return Ok(None);
        }
        Err(err) => return Err(table_error(ProcError::from(err))),
    };
    T::from_read(file, procfs::current_system_info())
        .map(Some)
        .map_err(table_error)
}

fn ports_in(sockets: &[Socket], range: &RangeInclusive<u16>) -> BTreeSet<u16> {
    sockets
        .iter()
        .map(|socket| socket.local.port())
        .filter(|port| range.contains(port))
        .collect()
}

fn listeners_in(
    sockets: &[Socket],
    protocol: Protocol,
    range: &RangeInclusive<u16>,
) -> Vec<Listener> {
    let mut found: Vec<Listener> = sockets
        .iter()
        .filter(|socket| socket.listening && range.contains(&socket.local.port()))
        .map(|socket| Listener {
            port: socket.local.port(),
            protocol,
            addr: socket.local.ip(),
            uid: socket.uid,
            inode: socket.inode,
        })
        .collect();
    found.sort_unstable();
    found
}

// ---- the table the manager reads ----

/// Where the manager learns which ports have a live socket.
pub trait SocketTable: Send + Sync {
    /// The ports in `range` that have a socket of `protocol` bound (see [`bound_ports`]).
    fn bound_ports(
        &self,
        protocol: Protocol,
        range: RangeInclusive<u16>,
    ) -> Result<BTreeSet<u16>, HostError>;

    /// The listeners on ports in `range`, sorted (see [`listeners`]).
    fn listeners(
        &self,
        protocol: Protocol,
        range: RangeInclusive<u16>,
    ) -> Result<Vec<Listener>, HostError>;

    /// The bound ports when they are known without reading the tables (a snapshot still
    /// fresh); `None` when a read is needed.
    fn fresh(&self, _protocol: Protocol, _range: RangeInclusive<u16>) -> Option<BTreeSet<u16>> {
        None
    }
}

/// The live sockets of the calling thread's network namespace, read afresh from procfs on
/// every call ([`bound_ports`], [`listeners`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcfsSockets;

impl SocketTable for ProcfsSockets {
    fn bound_ports(
        &self,
        protocol: Protocol,
        range: RangeInclusive<u16>,
    ) -> Result<BTreeSet<u16>, HostError> {
        bound_ports(protocol, range)
    }

    fn listeners(
        &self,
        protocol: Protocol,
        range: RangeInclusive<u16>,
    ) -> Result<Vec<Listener>, HostError> {
        listeners(protocol, range)
    }
}

/// A [`SocketTable`] that reuses a snapshot of the whole range for `max_age`.
///
/// Reading the socket tables costs milliseconds (the kernel walks its whole connection
/// hash), so a daemon taking many allocations shares one snapshot among them. A range scan
/// may then miss a socket bound in the last `max_age`; the owner's `bind()` fails and it
/// allocates again. A request for one named port always reads afresh, and so does every
/// request for listeners (made once, at start-up).
pub struct CachedSockets<T> {
    inner: T,
    max_age: Duration,
    snapshots: Mutex<Vec<Snapshot>>,
}

/// One protocol's bound ports in one range, and when they were read.
struct Snapshot {
    protocol: Protocol,
    range: RangeInclusive<u16>,
    taken: Instant,
    bound: BTreeSet<u16>,
}

impl<T: SocketTable> CachedSockets<T> {
    /// Wraps `inner`, reusing a range's snapshot for `max_age`.
    pub const fn new(inner: T, max_age: Duration) -> Self {
        Self {
            inner,
            max_age,
            snapshots: Mutex::new(Vec::new()),
        }
    }
}

impl<T: SocketTable> SocketTable for CachedSockets<T> {
    fn fresh(&self, protocol: Protocol, range: RangeInclusive<u16>) -> Option<BTreeSet<u16>> {
        // Never waits: the lock is held while the tables are read, and the caller is an
        // async worker. Busy means a read is under way; the caller then waits for it on a
        // blocking thread.
        let snapshots = match self.snapshots.try_lock() {
            Ok(snapshots) => snapshots,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => return None,
        };
        snapshots
            .iter()
            .find(|snapshot| {
                snapshot.protocol == protocol
                    && snapshot.range == range
                    && snapshot.taken.elapsed() < self.max_age
            })
            .map(|snapshot| snapshot.bound.clone())
    }

    fn bound_ports(
        &self,
        protocol: Protocol,
        range: RangeInclusive<u16>,
    ) -> Result<BTreeSet<u16>, HostError> {
        if range.start() == range.end() {
            return self.inner.bound_ports(protocol, range);
        }
        let mut snapshots = self
            .snapshots
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(snapshot) = snapshots.iter().find(|snapshot| {
            snapshot.protocol == protocol
                && snapshot.range == range
                && snapshot.taken.elapsed() < self.max_age
        }) {
            return Ok(snapshot.bound.clone());
        }
        // Read under the lock: concurrent allocations wait for one read, not one each.
        let bound = self.inner.bound_ports(protocol, range.clone())?;
        snapshots.retain(|snapshot| snapshot.protocol != protocol || snapshot.range != range);
        snapshots.push(Snapshot {
            protocol,
            range,
            taken: Instant::now(),
            bound: bound.clone(),
        });
        Ok(bound)
    }

    fn listeners(
        &self,
        protocol: Protocol,
        range: RangeInclusive<u16>,
    ) -> Result<Vec<Listener>, HostError> {
        self.inner.listeners(protocol, range)
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::{Ipv4Addr, TcpListener, UdpSocket},
        sync::Arc,
    };

    use super::*;

    // ---- live sockets ----

    /// Rows as the kernel prints them: a listener, an accepted connection on its port, a
    /// `TIME_WAIT` left by an outgoing connection, a request socket (`SYN_RECV`), and an IPv6
    /// listener. Addresses are all-zero so the rows read the same on either byte order.
    const TCP_TABLE: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 4242 1 0000000000000000 100 0 0 10 0
   1: 00000000:1F90 00000000:D431 01 00000000:00000000 02:00000A1E 00000000  1000        0 4243 2 0000000000000000 20 4 30 10 -1
   2: 00000000:9C41 00000000:1F90 06 00000000:00000000 03:00001234 00000000     0        0 0 3 0000000000000000
   3: 00000000:9C42 00000000:D432 03 00000000:00000000 01:00000064 00000000     0        0 0 1 0000000000000000
";
    const TCP6_TABLE: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:1F91 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000    33        0 5151 1 0000000000000000 100 0 0 10 0
";

    fn fixture_sockets() -> Vec<Socket> {
        let si = procfs::current_system_info();
        let mut sockets = Vec::new();
        for table in [TCP_TABLE, TCP6_TABLE] {
            let TcpNetEntries(entries) =
                TcpNetEntries::from_read(table.as_bytes(), si).expect("parse the fixture");
            sockets.extend(entries.into_iter().map(Socket::from));
        }
        sockets
    }

    #[test]
    fn every_tcp_state_holds_its_port() {
        let sockets = fixture_sockets();
        assert_eq!(
            ports_in(&sockets, &(0..=65535)),
            BTreeSet::from([8080, 8081, 40001, 40002])
        );
        assert_eq!(
            ports_in(&sockets, &(8081..=40001)),
            BTreeSet::from([8081, 40001])
        );
    }

    #[test]
    fn only_tcp_listen_rows_are_listeners() {
        let found = listeners_in(&fixture_sockets(), Protocol::Tcp, &(0..=65535));
        assert_eq!(
            found,
            [
                Listener {
                    port: 8080,
                    protocol: Protocol::Tcp,
                    addr: Ipv4Addr::UNSPECIFIED.into(),
                    uid: 1000,
                    inode: 4242,
                },
                Listener {
                    port: 8081,
                    protocol: Protocol::Tcp,
                    addr: std::net::Ipv6Addr::UNSPECIFIED.into(),
                    uid: 33,
                    inode: 5151,
                },
            ]
        );
    }

    fn socket_inode(fd: impl std::os::fd::AsFd) -> u64 {
        nix::sys::stat::fstat(fd).expect("fstat the socket").st_ino
    }

    #[test]
    fn bound_ports_sees_a_live_tcp_listener() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a listener");
        let port = listener.local_addr().expect("its address").port();
        let bound = bound_ports(Protocol::Tcp, port..=port).expect("bound TCP ports");
        assert_eq!(bound, BTreeSet::from([port]));
        // The range is a filter: the whole table minus this port does not name it.
        let below = bound_ports(Protocol::Tcp, 0..=port - 1).expect("bound TCP ports");
        assert!(!below.contains(&port));
    }

    #[test]
    fn bound_ports_sees_a_live_ipv6_tcp_listener() {
        let listener = match TcpListener::bind((std::net::Ipv6Addr::LOCALHOST, 0)) {
            Ok(listener) => listener,
            Err(err) => {
                eprintln!("no IPv6 loopback here ({err}): only the IPv4 tables are tested");
                return;
            }
        };
        let port = listener.local_addr().expect("its address").port();
        let bound = bound_ports(Protocol::Tcp, port..=port).expect("bound TCP ports");
        assert!(bound.contains(&port));
    }

    #[test]
    fn bound_ports_sees_a_live_udp_socket() {
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a UDP socket");
        let port = socket.local_addr().expect("its address").port();
        let bound = bound_ports(Protocol::Udp, port..=port).expect("bound UDP ports");
        assert_eq!(bound, BTreeSet::from([port]));
    }

    #[test]
    fn listeners_report_a_live_tcp_listener_with_its_uid_and_inode() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a listener");
        let port = listener.local_addr().expect("its address").port();
        let found = listeners(Protocol::Tcp, port..=port).expect("TCP listeners");
        assert_eq!(
            found,
            [Listener {
                port,
                protocol: Protocol::Tcp,
                addr: Ipv4Addr::LOCALHOST.into(),
                uid: nix::unistd::geteuid().as_raw(),
                inode: socket_inode(&listener),
            }]
        );
    }

    #[test]
    fn listeners_report_a_live_udp_socket_with_its_uid_and_inode() {
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a UDP socket");
        let port = socket.local_addr().expect("its address").port();
        let found = listeners(Protocol::Udp, port..=port).expect("UDP listeners");
        assert_eq!(
            found,
            [Listener {
                port,
                protocol: Protocol::Udp,
                addr: Ipv4Addr::LOCALHOST.into(),
                uid: nix::unistd::geteuid().as_raw(),
                inode: socket_inode(&socket),
            }]
        );
    }

    #[test]
    fn a_connected_tcp_socket_holds_its_port_but_is_no_listener() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a listener");
        let client = std::net::TcpStream::connect(listener.local_addr().expect("its address"))
            .expect("connect");
        let port = client.local_addr().expect("client address").port();
        let bound = bound_ports(Protocol::Tcp, port..=port).expect("bound TCP ports");
        assert_eq!(bound, BTreeSet::from([port]));
        let found = listeners(Protocol::Tcp, port..=port).expect("TCP listeners");
        assert!(found.is_empty(), "{found:?}");
    }

    // ---- the cached table ----

    /// Sockets the test says are bound.
    #[derive(Clone, Default)]
    struct FakeSockets(Arc<Mutex<BTreeSet<u16>>>);

    impl SocketTable for FakeSockets {
        fn bound_ports(
            &self,
            _protocol: Protocol,
            range: RangeInclusive<u16>,
        ) -> Result<BTreeSet<u16>, HostError> {
            let bound = self.0.lock().unwrap();
            Ok(bound.range(range).copied().collect())
        }

        fn listeners(
            &self,
            protocol: Protocol,
            range: RangeInclusive<u16>,
        ) -> Result<Vec<Listener>, HostError> {
            let bound = self.bound_ports(protocol, range)?;
            Ok(bound
                .into_iter()
                .map(|port| Listener {
                    port,
                    protocol,
                    addr: Ipv4Addr::UNSPECIFIED.into(),
                    uid: 0,
                    inode: u64::from(port),
                })
                .collect())
        }
    }

    #[test]
    fn cached_sockets_share_a_range_snapshot_and_read_one_port_afresh() {
        let fake = FakeSockets::default();
        let bound = |table: &CachedSockets<FakeSockets>, protocol, range| {
            table.bound_ports(protocol, range).unwrap()
        };
        let cached = CachedSockets::new(fake.clone(), Duration::from_mins(1));
        assert!(bound(&cached, Protocol::Tcp, 1..=10).is_empty());
        fake.0.lock().unwrap().insert(5);
        // Within max_age the range is answered from the snapshot...
        assert!(bound(&cached, Protocol::Tcp, 1..=10).is_empty());
        // ...but one named port, another protocol or another range is read afresh.
        assert!(bound(&cached, Protocol::Tcp, 5..=5).contains(&5));
        assert!(bound(&cached, Protocol::Udp, 1..=10).contains(&5));
        assert!(bound(&cached, Protocol::Tcp, 1..=9).contains(&5));
        // Listeners are never cached.
        let found = cached.listeners(Protocol::Tcp, 1..=10).unwrap();
        assert_eq!(
            found
                .iter()
                .map(|listener| listener.port)
                .collect::<Vec<_>>(),
            [5]
        );
        let expired = CachedSockets::new(fake, Duration::ZERO);
        assert!(bound(&expired, Protocol::Tcp, 1..=10).contains(&5));
    }
}
