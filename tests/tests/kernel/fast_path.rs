//! Established connections and policy changes (issue #12): a connection whose source leaves
//! the allowlist is cut at its next packet while an allowed one carries on; an allowlist
//! replaced whole under 64 concurrent clients never admits a source neither list has; and
//! the per-connection state of many connections (connect, then close or reset) is freed
//! with their sockets, so no map grows with the number of connections, nor does a bare
//! ACK that reaches the listener without a handshake take a slot.
//!
//! Real sockets on the loopback of a test namespace, sources spread over `127.x.y.z` (all
//! on `lo`), the server in a test cgroup with the gate's cgroup programs attached to it.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, TcpStream},
    sync::{
        Barrier, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use portgate::{
    gate::{Gate, GateSettings},
    model::{PortAccessControl, PortId, PortPolicy, Protocol},
};
use portgate_common::reason;
use portgate_tests::{
    common::{
        CONNECT_WITHIN, NetNs, PinDir, REFUSED_WITHIN, TestCgroup, allowing, allowlist,
        connect_from, echo, eventually,
        gate::{MIN_PORT, map_entries, settings},
        listen_in, loopback,
        recording::{RecordingServer, Serve, give_up_unacknowledged_after},
        reset,
    },
    require_privileges,
};

mod state_freed;

/// One TCP port on `127.0.0.1` inside a test namespace, under a gate installed there,
/// served by a [`RecordingServer`] whose listener is in a test cgroup. Fields drop in
/// order: the server first, the pins last.
struct Served {
    server: RecordingServer,
    gate: Gate,
    ns: NetNs,
    _cgroup: TestCgroup,
    pins: PinDir,
    id: PortId,
}

impl Served {
    fn new(port: u16, policy: &PortPolicy, serve: Serve) -> Self {
        let pins = PinDir::new();
        let cgroup = TestCgroup::new();
        let ns = NetNs::new();
        let settings: GateSettings = settings(&pins);
        // The namespace is the gate's host namespace: its ports are the host's.
        let mut gate = ns.run(|| Gate::install(&settings).expect("install the gate"));
        gate.attach_cgroup(cgroup.path())
            .expect("attach to the test cgroup");
        let id = PortId::new(port, Protocol::Tcp);
        gate.set_policy(id, policy).expect("set policy");
        let server = ns.run(|| {
            let listener = listen_in(&cgroup, loopback(port));
            // A backlog for bursts of concurrent clients (std listens with 128).
            socket2::SockRef::from(&listener)
                .listen(4096)
                .expect("a longer backlog");
            RecordingServer::serve(listener, serve)
        });
        Self {
            server,
            gate,
            ns,
            _cgroup: cgroup,
            pins,
            id,
        }
    }

    fn connect(&self, from: IpAddr, within: Duration) -> std::io::Result<TcpStream> {
        self.ns
            .run(|| connect_from(from, loopback(self.id.port), within))
    }

    fn dropped_not_allowed(&self) -> u64 {
        self.gate
            .counters(self.id)
            .expect("counters")
            .total
            .dropped_for(reason::NOT_ALLOWED)
    }

    /// Waits (bounded) until the port counts no active connection: every socket closed.
    fn all_closed(&self, within: Duration) -> bool {
        eventually(within, || {
            self.gate.slots(self.id).expect("slots").established == 0
        })
    }

    /// Waits (bounded, briefly: a closing socket gives back its slot right after it
    /// leaves the active count) until the port holds no slot.
    fn no_slot_held(&self) -> bool {
        eventually(Duration::from_secs(2), || {
            self.gate.slots(self.id).expect("slots").slots == 0
        })
    }

    /// What a failure to get the slots back shows: the slots, the reservations in flight,
    /// the gate-wide statistics and the maps' entries.
    fn slot_state(&self) -> String {
        format!(
            "{:?}; reservations {:?}; {:?}; {:?}",
            self.gate.slots(self.id),
            self.gate.reservations(),
            self.gate.stats(),
            map_entries(self.pins.path()).counted
        )
    }
}

fn v4(a: u8, b: u8, c: u8) -> IpAddr {
    Ipv4Addr::new(127, a, b, c).into()
}

#[test]
fn an_established_connection_whose_source_leaves_the_allowlist_is_cut_at_its_next_packet() {
    if !require_privileges!() {
        return;
    }
    let (removed, kept) = (v4(0, 0, 2), v4(0, 0, 3));
    let mut served = Served::new(
        MIN_PORT + 90,
        &allowing(&["127.0.0.2/32", "127.0.0.3/32"]),
        Serve::Echo,
    );
    let mut cut = served
        .connect(removed, CONNECT_WITHIN)
        .expect("a connection from a source in the allowlist");
    let mut carries_on = served
        .connect(kept, CONNECT_WITHIN)
        .expect("a connection from the other source in the allowlist");
    echo(&mut cut, b"before").expect("the first connection works");
    echo(&mut carries_on, b"before").expect("the second connection works");
    let cut_on_server = served
        .server
        .from_peer(cut.local_addr().expect("client address"))
        .expect("the server accepted the first connection");
    assert_eq!(cut_on_server.received(), 6);
    let dropped_before = served.dropped_not_allowed();

    // One source leaves the allowlist while both connections are established.
    let id = served.id;
    served
        .gate
        .set_policy(id, &allowing(&["127.0.0.3/32"]))
        .expect("take 127.0.0.2 off the allowlist");

    echo(&mut carries_on, b"after").expect("a source still allowed keeps its connection");
    // The client's next segment and its retransmissions are dropped by `cgroup_skb` on
    // the way in: never acknowledged, so the client gives up (TCP_USER_TIMEOUT) instead
    // of retransmitting for the default fifteen minutes.
    give_up_unacknowledged_after(&cut, Duration::from_secs(2)).expect("TCP_USER_TIMEOUT");
    cut.set_read_timeout(Some(Duration::from_mins(1)))
        .expect("read timeout");
    cut.write_all(b"after")
        .expect("the write is only queued: it fails later, if at all");
    let answer = cut.read(&mut [0; 16]);
    let err = answer.expect_err("no answer to data sent after the source was removed");
    assert_eq!(
        err.raw_os_error(),
        Some(libc::ETIMEDOUT),
        "the client aborted the connection because nothing it sent was acknowledged \
         (not a reset, not a read timeout): {err}"
    );
    assert_eq!(
        cut_on_server.received(),
        6,
        "the server never received what was sent after the change"
    );
    assert!(
        served.dropped_not_allowed() > dropped_before,
        "the dropped segments were counted as not allowed"
    );

    // The change was judged per source, not a port that stopped working.
    echo(&mut carries_on, b"still").expect("the allowed connection still works");
    assert!(
        served.connect(removed, REFUSED_WITHIN).is_err(),
        "a new connection from the removed source is refused"
    );
    let mut new = served
        .connect(kept, CONNECT_WITHIN)
        .expect("a new connection from the source still allowed");
    echo(&mut new, b"new").expect("and it works");
    // Allowed again, the source gets in again.
    served
        .gate
        .set_policy(id, &allowing(&["127.0.0.2/32", "127.0.0.3/32"]))
        .expect("put 127.0.0.2 back");
    let mut back = served
        .connect(removed, CONNECT_WITHIN)
        .expect("a connection from the source allowed again");
    echo(&mut back, b"back").expect("and it works");
}

/// Where a source is listed: in the old allowlist only, the new one only, both, neither.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Listed {
    OldOnly,
    NewOnly,
    Both,
    Neither,
}

/// Four sources of each kind. The lists hold them under prefixes of other lengths too
/// (a /24 in one list, /32s in the other), and each list has 200 other prefixes of its
/// own, so that a replacement is hundreds of writes.
fn sources() -> Vec<(IpAddr, Listed)> {
    let mut out = Vec::new();
    for host in 1..=4 {
        out.push((v4(0, 1, host), Listed::OldOnly));
        out.push((v4(0, 2, host), Listed::NewOnly));
        out.push((v4(0, 3, host), Listed::Both));
        out.push((v4(0, 4, host), Listed::Neither));
    }
    out
}

fn replacement_lists() -> (PortPolicy, PortPolicy) {
    let list = |own: &[&str], padding: u8| {
        let mut prefixes: Vec<String> = own.iter().map(|prefix| (*prefix).to_owned()).collect();
        prefixes.extend((0..200).map(|n| format!("10.{padding}.{}.{}/32", n / 100, n % 100)));
        let prefixes: Vec<&str> = prefixes.iter().map(String::as_str).collect();
        PortPolicy {
            access: PortAccessControl {
                allowed_ips: allowlist(&prefixes),
                ..PortAccessControl::default()
            },
            ..PortPolicy::default()
        }
    };
    let old = list(
        &[
            "127.0.1.0/24",
            "127.0.3.1/32",
            "127.0.3.2/32",
            "127.0.3.3/32",
            "127.0.3.4/32",
        ],
        1,
    );
    let new = list(&["127.0.2.0/24", "127.0.3.0/24"], 2);
    (old, new)
}

/// What the clients saw, per kind of source: (connected, not connected).
type Outcomes = BTreeMap<Listed, (u64, u64)>;

/// Connects from every source at once under `served`'s current policy and asserts who
/// gets in: the sources of the list in force (the old one when `old_in_force`), and only
/// they.
fn expect_in_force(served: &Served, which: &str, old_in_force: bool) {
    let port = served.id.port;
    let admitted: Vec<_> = served.ns.run(|| {
        thread::scope(|scope| {
            let attempts: Vec<_> = sources()
                .into_iter()
                .map(|(source, kind)| {
                    let admitted = match kind {
                        Listed::OldOnly => old_in_force,
                        Listed::NewOnly => !old_in_force,
                        Listed::Both => true,
                        Listed::Neither => false,
                    };
                    let within = if admitted {
                        CONNECT_WITHIN
                    } else {
                        REFUSED_WITHIN
                    };
                    scope.spawn(move || {
                        let got_in = connect_from(source, loopback(port), within)
                            .map(reset)
                            .is_ok();
                        (source, kind, admitted, got_in)
                    })
                })
                .collect();
            attempts
                .into_iter()
                .map(|attempt| attempt.join().expect("a connect thread"))
                .collect()
        })
    });
    for (source, kind, admitted, got_in) in admitted {
        assert_eq!(
            got_in,
            admitted,
            "under the {which} list, {source} ({kind:?}) is {}",
            if admitted { "admitted" } else { "refused" }
        );
    }
}

/// Old: {old-only, both}; new: {new-only, both}. 64 clients connect from all four kinds of
/// source while another thread replaces the old list with the new one and back, whole
/// (one `set_policy` each), as fast as it can. Judged at the server, which records the
/// peer of every connection it accepts: no source of neither list ever gets in, and every
/// connect from a source of both lists does.
#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, told in order")]
fn an_allowlist_replaced_whole_under_concurrent_clients_admits_only_its_sources() {
    const CLIENTS: usize = 64;
    // Replacements go on until this many connects from sources in both lists have
    // succeeded, within the bounds below.
    const CONNECTED_FROM_BOTH: u64 = 1_000;
    const REPLACEMENTS: u32 = 100_000;
    const REPLACING_FOR: Duration = Duration::from_secs(20);
    const ATTEMPTS_PER_CLIENT: usize = 2_000;
    // A source in one list only may be refused; a refused connect waits this long.
    const ONE_LIST_WITHIN: Duration = Duration::from_millis(300);
    if !require_privileges!() {
        return;
    }
    let (old, new) = replacement_lists();
    let served = Served::new(MIN_PORT + 91, &old, Serve::Close);
    let listed = |wanted: Listed| {
        sources()
            .into_iter()
            .filter(move |(_, kind)| *kind == wanted)
            .map(|(source, _)| source)
    };
    expect_in_force(&served, "old", true);

    let mut gate = Gate::open(served.pins.path()).expect("a second handle on the pins");
    let start = Barrier::new(CLIENTS + 1);
    let done = AtomicBool::new(false);
    let connected_from_both = AtomicU64::new(0);
    let outcomes: Mutex<Outcomes> = Mutex::new(BTreeMap::new());
    let failures: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let all = sources();
    let begun = Instant::now();
    let replacements = served.ns.run(|| {
        thread::scope(|scope| {
            for client in 0..CLIENTS {
                let (start, done, outcomes, failures, all, connected_from_both) = (
                    &start,
                    &done,
                    &outcomes,
                    &failures,
                    &all,
                    &connected_from_both,
                );
                let port = served.id.port;
                scope.spawn(move || {
                    start.wait();
                    let mut seen: Outcomes = BTreeMap::new();
                    for attempt in 0..ATTEMPTS_PER_CLIENT {
                        if done.load(Ordering::Relaxed) {
                            break;
                        }
                        let (source, kind) = all[(client + attempt) % all.len()];
                        let within = if kind == Listed::Both {
                            CONNECT_WITHIN
                        } else {
                            ONE_LIST_WITHIN
                        };
                        let row = seen.entry(kind).or_default();
                        match connect_from(source, loopback(port), within) {
                            Ok(stream) => {
                                row.0 += 1;
                                if kind == Listed::Both {
                                    connected_from_both.fetch_add(1, Ordering::Relaxed);
                                }
                                reset(stream);
                            }
                            Err(err) => {
                                row.1 += 1;
                                if kind == Listed::Both {
                                    failures
                                        .lock()
                                        .unwrap_or_else(PoisonError::into_inner)
                                        .push(format!("{source}: {err}"));
                                }
                            }
                        }
                    }
                    let mut outcomes = outcomes.lock().unwrap_or_else(PoisonError::into_inner);
                    for (kind, (connected, not)) in seen {
                        let row = outcomes.entry(kind).or_default();
                        row.0 += connected;
                        row.1 += not;
                    }
                });
            }
            start.wait();
            let mut replacements = 0;
            while connected_from_both.load(Ordering::Relaxed) < CONNECTED_FROM_BOTH
                && replacements < REPLACEMENTS
                && begun.elapsed() < REPLACING_FOR
            {
                let policy = if replacements.is_multiple_of(2) {
                    &new
                } else {
                    &old
                };
                gate.set_policy(served.id, policy)
                    .expect("replace the allowlist");
                replacements += 1;
            }
            done.store(true, Ordering::Relaxed);
            replacements
        })
    });
    let outcomes = outcomes
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner);
    let failures = failures
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner);
    println!(
        "{replacements} replacements in {:?}; (connected, not) per kind of source: {outcomes:?}",
        begun.elapsed()
    );

    let accepted = served.server.accepted();
    let intruders: Vec<_> = accepted
        .iter()
        .filter(|accepted| listed(Listed::Neither).any(|source| source == accepted.peer.ip()))
        .map(|accepted| accepted.peer)
        .collect();
    assert!(
        intruders.is_empty(),
        "the server accepted {} connections from sources in neither list: {:?}",
        intruders.len(),
        &intruders[..intruders.len().min(10)]
    );
    assert_eq!(
        outcomes.get(&Listed::Neither).map_or(0, |row| row.0),
        0,
        "no client from a source in neither list connected"
    );
    assert!(
        failures.is_empty(),
        "{} connects from sources in both lists failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    let from_both = outcomes.get(&Listed::Both).map_or(0, |row| row.0);
    assert!(
        from_both > 0,
        "no connect from a source in both lists ran while the list was replaced"
    );
    assert!(
        accepted
            .iter()
            .filter(|accepted| listed(Listed::Both).any(|source| source == accepted.peer.ip()))
            .count() as u64
            >= from_both,
        "the server accepted every connection of a source in both lists"
    );
    // The last replacement is in force, whole.
    expect_in_force(&served, "last", replacements.is_multiple_of(2));
}
