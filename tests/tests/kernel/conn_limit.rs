//! The connection limit: held under a burst of simultaneous connects, slots freed on FIN,
//! half-close and RST; a retransmitted SYN takes no second slot and a handshake that never
//! completes gives its slot back.

use std::{
    net::TcpStream,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::Duration,
};

use portgate::{
    gate::{GateSettings, PacketHook},
    model::{PortAccessControl, PortId, PortPolicy, Protocol},
};
use portgate_common::reason;
use portgate_tests::{
    common::{
        CONNECT_WITHIN, LOCAL, PinDir, REFUSED_WITHIN, connect_from, eventually,
        gate::{LoopbackPort, MIN_PORT, install, settings},
        loopback,
        packet::{DESTINATION, tcp_syn},
        pin_to_cpu0, reset,
    },
    require_privileges,
};

#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, told in order")]
fn connection_limit_holds_under_a_burst_and_frees_slots_on_close_and_reset() {
    const LIMIT: u32 = 20;
    const BURST: usize = 200;
    if !require_privileges!() {
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
    // Waits until the full port has one slot free again, which `what` freed.
    let one_slot_freed = |what: &str| {
        let id = PortId::from(port);
        assert!(
            eventually(Duration::from_secs(3), || {
                gate.slots(id).expect("slots").established == u64::from(LIMIT) - 1
            }),
            "{what} frees the slot: {:?}",
            gate.slots(id)
        );
    };

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
    one_slot_freed("FIN");
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
    one_slot_freed("a half-close, once the server closes,");
    drop(half_closed);
    held.push(
        fixture
            .connect(LOCAL, CONNECT_WITHIN)
            .expect("the slot freed by a half-close takes a new connection"),
    );
    // A reset frees a slot.
    reset(held.pop().expect("a held connection"));
    one_slot_freed("RST");
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
fn a_retransmitted_syn_takes_no_second_slot_and_an_unfinished_handshake_gives_its_slot_back() {
    if !require_privileges!() {
        return;
    }
    pin_to_cpu0();
    let pins = PinDir::new();
    let mut gate = install(&GateSettings {
        pending_ttl: Duration::from_millis(300),
        ..settings(&pins)
    });
    let port = MIN_PORT + 1;
    gate.set_policy(
        PortId::new(port, Protocol::Tcp),
        &PortPolicy {
            access: PortAccessControl {
                max_connections: 1,
                ..PortAccessControl::default()
            },
            ..PortPolicy::default()
        },
    )
    .expect("set policy");
    // Both programs loaded (and verified, which takes a while) before the sequence below:
    // XDP hands its count over to cgroup_skb for HANDOFF_WINDOW_NS only.
    let outside = tcp_syn([198, 18, 0, 9].into(), DESTINATION, 40_009, MIN_PORT - 1);
    for hook in [PacketHook::Xdp, PacketHook::CgroupSkb] {
        gate.test_run(hook, &outside, 1).expect("test run");
    }
    let first = tcp_syn([198, 18, 0, 1].into(), DESTINATION, 40_000, port);
    for hook in [PacketHook::Xdp, PacketHook::CgroupSkb, PacketHook::Xdp] {
        let outcome = gate.test_run(hook, &first, 1).expect("test run");
        assert!(
            outcome.passed,
            "the SYN and its retransmissions pass ({hook:?})"
        );
    }
    assert_eq!(
        gate.slots(PortId::from(port)).expect("slots").slots,
        1,
        "one slot for one 4-tuple"
    );
    let counters = gate
        .counters(PortId::new(port, Protocol::Tcp))
        .expect("counters")
        .total;
    assert_eq!(counters.accepted, 1, "accepted once");

    let second = tcp_syn([198, 18, 0, 2].into(), DESTINATION, 40_001, port);
    assert!(
        !gate
            .test_run(PacketHook::Xdp, &second, 1)
            .expect("test run")
            .passed,
        "the port is full while the first handshake is pending"
    );
    // The first handshake never completes: after the TTL its reservation is released
    // by the next SYN that finds the port full.
    thread::sleep(Duration::from_millis(500));
    assert!(
        gate.test_run(PacketHook::Xdp, &second, 1)
            .expect("test run")
            .passed,
        "the expired reservation was released"
    );
    assert_eq!(gate.slots(PortId::from(port)).expect("slots").slots, 1);
    assert!(gate.stats().expect("stats").pending_sweeps >= 1);
}

#[test]
fn a_new_allocation_of_a_port_does_not_inherit_the_last_ones_connections() {
    if !require_privileges!() {
        return;
    }
    let port = MIN_PORT + 12;
    let id = PortId::from(port);
    let policy = |epoch| PortPolicy {
        access: PortAccessControl {
            max_connections: 1,
            ..PortAccessControl::default()
        },
        epoch,
        ..PortPolicy::default()
    };
    let mut fixture = LoopbackPort::new(port, &policy(1));
    let one_established = |gate: &portgate::gate::Gate| {
        assert!(
            eventually(Duration::from_secs(3), || gate
                .slots(id)
                .expect("slots")
                .established
                == 1),
            "one connection counted: {:?}",
            gate.slots(id)
        );
    };
    let old = fixture
        .connect(LOCAL, CONNECT_WITHIN)
        .expect("the first allocation's connection");
    one_established(&fixture.gate);
    // The port is allocated again (a new epoch) while that connection lives on.
    fixture.gate.set_policy(id, &policy(2)).expect("reallocate");
    assert_eq!(fixture.gate.slots(id).expect("slots").established, 0);
    let new = fixture
        .connect(LOCAL, CONNECT_WITHIN)
        .expect("the new allocation has its whole limit");
    let gate = &fixture.gate;
    one_established(gate);
    // The old connection closing leaves the new allocation's count alone.
    drop(old);
    thread::sleep(Duration::from_millis(300));
    assert_eq!(gate.slots(id).expect("slots").established, 1);
    assert!(
        fixture.connect(LOCAL, REFUSED_WITHIN).is_err(),
        "the new connection holds the only slot"
    );
    drop(new);
    assert!(eventually(Duration::from_secs(3), || gate
        .slots(id)
        .expect("slots")
        == portgate_common::ConnSlots {
            last_sweep_ns: 0,
            ..Default::default()
        }));
}
