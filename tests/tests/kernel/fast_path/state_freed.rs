//! Per-connection state freed with its sockets: many connections, closed with FIN or RST,
//! leave no map bigger than a warm-up did; a bare ACK that reaches the listener without a
//! handshake takes no slot.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Mutex, PoisonError},
    thread,
    time::{Duration, Instant},
};

use portgate::model::{PortAccessControl, PortPolicy};
use portgate_tests::{
    common::{
        CONNECT_WITHIN, LOCAL, REFUSED_WITHIN, allowlist, connect_from, eventually,
        gate::{MIN_PORT, map_entries},
        loopback,
        packet::{PacketSpec, build_packet},
        recording::Serve,
        reset,
    },
    require_privileges,
};

use super::{Served, v4};

/// Makes connections `range` to `served` on `threads` threads: connection `n` from source
/// `127.1.(n / 250 % 250).(n % 250 + 1)` (so that no source runs out of ephemeral ports
/// through `TIME_WAIT`), closed with a FIN, or with a RST every third. Returns the connects
/// that failed.
fn connect_and_close(
    served: &Served,
    range: std::ops::Range<usize>,
    threads: usize,
) -> Vec<String> {
    let failures = Mutex::new(Vec::new());
    let port = served.id.port;
    served.ns.run(|| {
        thread::scope(|scope| {
            for first in 0..threads {
                let (range, failures) = (range.clone(), &failures);
                scope.spawn(move || {
                    for n in (range.start + first..range.end).step_by(threads) {
                        let source = source_of(n);
                        match connect_from(source, loopback(port), CONNECT_WITHIN) {
                            Ok(stream) if n % 3 == 0 => reset(stream),
                            Ok(stream) => drop(stream),
                            Err(err) => failures
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .push(format!("connection {n} from {source}: {err}")),
                        }
                    }
                });
            }
        });
    });
    failures
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner)
}

fn source_of(n: usize) -> IpAddr {
    let host = u8::try_from(n % 250 + 1).expect("a host number");
    let subnet = u8::try_from(n / 250 % 250).expect("a subnet number");
    v4(1, subnet, host)
}

/// 100,000 connections to a port with an allowlist and a limit, opened and closed (FIN,
/// or RST every third), leave no more entries in any map userspace can walk than a warm-up
/// of a few left (counter rows appear at first use); every map is told apart by its type.
/// Socket-local storage cannot be walked, so instead the port's slots go back to zero, no
/// reservation is left, the gate-wide statistics show no connection left untracked, and
/// the port counts each connection accepted exactly once. The last ACK of a teardown that
/// reaches the listener after the server's socket has gone (the kernel answers it with a
/// RST) is no connection either: it must not take a slot.
///
/// The sources are spread over 250 x 250 addresses of `127.1.0.0/16`, so that no source
/// runs short of ephemeral ports through `TIME_WAIT`; the limit is above what four threads
/// ever hold, so that no connect waits for a slot (the limit itself is `conn_limit`'s).
/// About 5 s of connections in a debug build on two cores.
#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, told in order")]
fn connections_free_their_state_with_their_sockets() {
    const CONNECTIONS: usize = 100_000;
    const WARM_UP: usize = 200;
    const THREADS: usize = 4;
    const LIMIT: u32 = 4_000;
    if !require_privileges!() {
        return;
    }
    let policy = PortPolicy {
        access: PortAccessControl {
            allowed_ips: allowlist(&["127.1.0.0/16"]),
            max_connections: LIMIT,
            ..PortAccessControl::default()
        },
        ..PortPolicy::default()
    };
    let served = Served::new(MIN_PORT + 92, &policy, Serve::Close);

    // Warm-up: the port's counter rows, its deny-event limiter and the like appear now.
    let failures = connect_and_close(&served, 0..WARM_UP, THREADS);
    assert!(failures.is_empty(), "warm-up connects failed: {failures:?}");
    served.ns.run(|| {
        thread::scope(|scope| {
            for _ in 0..2 {
                scope.spawn(|| {
                    assert!(
                        connect_from(v4(2, 0, 1), loopback(served.id.port), REFUSED_WITHIN)
                            .is_err(),
                        "a source outside the allowlist is refused"
                    );
                });
            }
        });
    });
    assert!(
        served.all_closed(Duration::from_secs(20)),
        "the warm-up's connections close: {}",
        served.slot_state()
    );
    let before = map_entries(served.pins.path());

    let begun = Instant::now();
    let failures = connect_and_close(&served, WARM_UP..WARM_UP + CONNECTIONS, THREADS);
    println!(
        "{CONNECTIONS} connections on {THREADS} threads in {:?}; the server accepted {}",
        begun.elapsed(),
        served.server.count()
    );
    assert!(
        failures.is_empty(),
        "{} of {CONNECTIONS} connects failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    assert!(
        served.all_closed(Duration::from_secs(20)),
        "every connection leaves the port's active count when its socket closes: {}",
        served.slot_state()
    );
    // A handshake the server never completed (its last ACK lost to a full accept queue,
    // its client gone) holds its reservation until that expires and a later handshake
    // sweeps it: one more connection once it has expired.
    let mut extra = 0;
    if served
        .gate
        .reservations()
        .expect("reservations")
        .contains_key(&served.id)
    {
        thread::sleep(
            Duration::from_nanos(
                portgate_common::defaults::PENDING_TTL_NS
                    + portgate_common::defaults::SWEEP_INTERVAL_NS,
            ) + Duration::from_millis(200),
        );
        let end = WARM_UP + CONNECTIONS;
        let failures = connect_and_close(&served, end..end + 1, 1);
        assert!(
            failures.is_empty(),
            "the sweeping connect failed: {failures:?}"
        );
        extra = 1;
        assert!(
            served.all_closed(Duration::from_secs(20)),
            "the sweeping connection closes: {}",
            served.slot_state()
        );
    }
    let slots_freed = served.no_slot_held();

    let after = map_entries(served.pins.path());
    println!(
        "entries after the warm-up and at the end: {:?} -> {:?}; not walked (by type): {:?}",
        before.counted, after.counted, after.not_iterable
    );
    let grown: Vec<_> = after
        .counted
        .iter()
        .filter(|(name, count)| before.counted.get(*name) != Some(count))
        .map(|(name, count)| (name, before.counted.get(name), count))
        .collect();
    assert!(
        grown.is_empty(),
        "maps whose entries changed over {CONNECTIONS} connections (name, after the warm-up, \
         at the end): {grown:?}; {}",
        served.slot_state()
    );
    assert_eq!(
        before.not_iterable, after.not_iterable,
        "the same maps, of the same types"
    );
    assert!(
        slots_freed,
        "every slot is given back: {}",
        served.slot_state()
    );
    assert_eq!(
        served
            .gate
            .reservations()
            .expect("reservations")
            .get(&served.id),
        None,
        "no reservation left"
    );

    let stats = served.gate.stats().expect("stats");
    assert_eq!(
        (
            stats.sockets_full,
            stats.unreserved,
            stats.pending_full,
            stats.pending_port_full
        ),
        (0, 0, 0, 0),
        "no connection left untracked (no socket storage, or established without a \
         reservation) and no handshake refused for want of room: {stats:?}"
    );
    let counters = served.gate.counters(served.id).expect("counters").total;
    assert_eq!(
        counters.accepted,
        (WARM_UP + CONNECTIONS + extra) as u64,
        "every connection accepted exactly once, and nothing else: {}",
        served.slot_state()
    );
}

/// A bare ACK that reaches the listening socket with no handshake behind it takes no slot
/// and counts no acceptance (the kernel answers it with a RST). The last ACK of a teardown
/// that arrives after the server's socket has gone is such an ACK:
/// [`connections_free_their_state_with_their_sockets`] meets some by chance, this test
/// sends one every time, from a raw socket.
#[test]
fn an_ack_without_a_handshake_takes_no_slot() {
    if !require_privileges!() {
        return;
    }
    let policy = PortPolicy {
        access: PortAccessControl {
            allowed_ips: allowlist(&["127.1.0.0/16"]),
            max_connections: 4,
            ..PortAccessControl::default()
        },
        ..PortPolicy::default()
    };
    let served = Served::new(MIN_PORT + 93, &policy, Serve::Close);
    let frame = build_packet(&PacketSpec {
        syn: false,
        ack: true,
        seq: 1_000,
        ..PacketSpec::syn(v4(1, 0, 9), LOCAL, 40_000, served.id.port)
    });
    // From the IP header on: a raw IPPROTO_RAW socket sends it as it is (IP_HDRINCL).
    let packet = &frame[14..];
    served.ns.run(|| {
        let socket = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::RAW,
            Some(socket2::Protocol::from(libc::IPPROTO_RAW)),
        )
        .expect("a raw socket");
        socket
            .send_to(packet, &SocketAddr::new(LOCAL, 0).into())
            .expect("send the ACK");
    });
    assert!(
        eventually(Duration::from_secs(2), || served
            .gate
            .counters(served.id)
            .expect("counters")
            .total
            .packets
            >= 1),
        "the gate saw the ACK"
    );
    // The rest of the same program run: microseconds.
    thread::sleep(Duration::from_millis(200));
    assert_eq!(
        served
            .gate
            .counters(served.id)
            .expect("counters")
            .total
            .accepted,
        0,
        "an ACK is no new connection: {}",
        served.slot_state()
    );
    assert_eq!(
        served.gate.slots(served.id).expect("slots").slots,
        0,
        "an ACK without a handshake holds no slot: {}",
        served.slot_state()
    );
}
