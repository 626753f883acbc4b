//! Reservations are a shared resource, so no port can take them from another: a port
//! without a limit takes none, a port with one holds at most its share
//! (`capacity::PENDING_PER_PORT`), a full map is counted, sweeps run at most once per
//! interval gate-wide, and a sweep never frees a reservation made while it runs (test-run
//! threads on both CPUs).
//!
//! Needs: root, bpffs, BTF. SYNs are handed to XDP with `BPF_PROG_TEST_RUN`; only the
//! daemon's test attaches (to its test cgroup), to show a flood as a `status` warning.

use std::{
    net::{IpAddr, Ipv4Addr},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use portgate::{
    api::AllocRequest,
    client::Client,
    gate::{Gate, GateSettings, PacketHook},
    model::{PortAccessControl, PortId, PortPolicy, Protocol},
};
use portgate_common::{capacity, defaults, reason};
use portgate_tests::{
    common::{
        PinDir,
        gate::{MIN_PORT, install, settings},
        packet::{DESTINATION, tcp_syn},
        pin_to_cpu, pin_to_cpu0,
    },
    daemon::Daemon,
    require_privileges,
};

fn limited(max_connections: u32) -> PortPolicy {
    PortAccessControl {
        max_connections,
        ..PortAccessControl::default()
    }
    .into()
}

/// The `n`th distinct source of a flood: its address and port.
fn source(n: u32) -> (IpAddr, u16) {
    let [a, b, c, _] = n.to_be_bytes();
    // 2^16 addresses in 10.0.0.0/8 times 1,000 source ports.
    let addr = IpAddr::V4(Ipv4Addr::new(10, a, b, c));
    let sport = 10_000 + u16::try_from(n % 1_000).expect("below 1,000");
    (addr, sport)
}

/// Test-runs SYNs from sources `from..to` at `port` through XDP; returns how many passed.
fn flood(gate: &mut Gate, port: u16, from: u32, to: u32) -> u32 {
    let mut passed = 0;
    for n in from..to {
        let (addr, sport) = source(n);
        let frame = tcp_syn(addr, DESTINATION, sport, port);
        if gate
            .test_run(PacketHook::Xdp, &frame, 1)
            .expect("test run")
            .passed
        {
            passed += 1;
        }
    }
    passed
}

fn long_ttl(pins: &PinDir) -> GateSettings {
    // Longer than the test: nothing expires, so every reservation must still be there.
    GateSettings {
        pending_ttl: Duration::from_hours(1),
        ..settings(pins)
    }
}

#[test]
fn a_syn_flood_at_one_port_leaves_the_other_ports_their_reservations() {
    const FLOOD: u32 = 70_000;
    if !require_privileges!() {
        return;
    }
    pin_to_cpu0();
    let pins = PinDir::new();
    let mut gate = install(&long_ttl(&pins));
    let unlimited = MIN_PORT + 30;
    let small = MIN_PORT + 31;
    let greedy: Vec<u16> = (MIN_PORT + 40..MIN_PORT + 57).collect();
    gate.set_policy(
        PortId::new(unlimited, Protocol::Tcp),
        &PortPolicy::default(),
    )
    .expect("set policy");
    gate.set_policy(PortId::new(small, Protocol::Tcp), &limited(3))
        .expect("set policy");
    for port in &greedy {
        gate.set_policy(PortId::new(*port, Protocol::Tcp), &limited(1_000_000))
            .expect("set policy");
    }

    // More SYNs than the map holds, at a port without a limit: all pass, none reserves.
    assert_eq!(flood(&mut gate, unlimited, 0, FLOOD), FLOOD);
    assert_eq!(
        gate.reservations()
            .expect("reservations")
            .get(&PortId::new(unlimited, Protocol::Tcp)),
        None,
        "a port without a limit takes no reservation"
    );
    assert_eq!(
        flood(&mut gate, small, 0, 4),
        3,
        "the limited port still admits"
    );

    // A port with a huge limit holds at most its share.
    let share = capacity::PENDING_PER_PORT;
    assert_eq!(flood(&mut gate, greedy[0], 0, share + 100), share);
    let stats = gate.stats().expect("stats");
    assert_eq!(stats.pending_port_full, 100, "{stats:?}");

    // Sixteen such ports fill the map: the rest is refused, and counted.
    let per_port = share;
    for port in &greedy[1..16] {
        flood(&mut gate, *port, 0, per_port);
    }
    let in_flight: u64 = gate.reservations().expect("reservations").values().sum();
    assert_eq!(in_flight, u64::from(capacity::PENDING), "the map is full");
    let started = Instant::now();
    let before = gate.stats().expect("stats");
    assert_eq!(flood(&mut gate, greedy[16], 0, 2_000), 0);
    let after = gate.stats().expect("stats");
    assert_eq!(after.pending_full - before.pending_full, 2_000);
    let counters = gate
        .counters(PortId::new(greedy[16], Protocol::Tcp))
        .expect("counters")
        .total;
    assert_eq!(counters.dropped_for(reason::CONN_LIMIT), 2_000);
    // Each refusal may ask for a sweep; at most one runs per interval, gate-wide.
    let intervals = started.elapsed().as_nanos() / u128::from(defaults::SWEEP_INTERVAL_NS);
    let sweeps = u128::from(after.pending_sweeps - before.pending_sweeps);
    assert!(
        sweeps <= intervals + 1,
        "{sweeps} sweeps in {intervals} sweep intervals"
    );
    drop(gate);
    portgate::gate::uninstall(pins.path()).expect("uninstall");
}

#[test]
fn a_sweep_never_frees_a_reservation_made_while_it_runs() {
    const RESERVED: u32 = 3_000;
    const FULL_PORTS: u16 = 32;
    if !require_privileges!() {
        return;
    }
    assert!(
        thread::available_parallelism().map_or(1, usize::from) >= 2,
        "this test runs one thread per CPU on two CPUs"
    );
    let pins = PinDir::new();
    let mut gate = install(&long_ttl(&pins));
    let target = MIN_PORT + 60;
    let full: Vec<u16> = (MIN_PORT + 61..MIN_PORT + 61 + FULL_PORTS).collect();
    gate.set_policy(PortId::new(target, Protocol::Tcp), &limited(1_000_000))
        .expect("set policy");
    for port in &full {
        gate.set_policy(PortId::new(*port, Protocol::Tcp), &limited(1))
            .expect("set policy");
        assert_eq!(flood(&mut gate, *port, 0, 1), 1, "fill port {port}");
    }
    let before = gate.stats().expect("stats");
    let done = AtomicBool::new(false);
    let reserved = thread::scope(|scope| {
        // CPU 0: SYNs at full ports, each refusal asking for a sweep.
        let sweeper = scope.spawn(|| {
            pin_to_cpu(0);
            let mut gate = Gate::open(pins.path()).expect("open the gate");
            let mut n = 1;
            let deadline = Instant::now() + Duration::from_secs(20);
            while !done.load(Ordering::Relaxed) && Instant::now() < deadline {
                for port in &full {
                    flood(&mut gate, *port, n, n + 1);
                }
                n += 1;
            }
        });
        // CPU 1: reservations at the target port while the sweeps run.
        let reserver = scope.spawn(|| {
            pin_to_cpu(1);
            let mut gate = Gate::open(pins.path()).expect("open the gate");
            let mut passed = 0;
            for n in 0..RESERVED {
                passed += flood(&mut gate, target, n, n + 1);
                if n % 100 == 0 {
                    // Let a sweep interval pass now and then, so sweeps keep coming.
                    thread::sleep(Duration::from_millis(5));
                }
            }
            done.store(true, Ordering::Relaxed);
            passed
        });
        sweeper.join().expect("sweeper thread");
        reserver.join().expect("reserver thread")
    });
    let after = gate.stats().expect("stats");
    assert!(
        after.pending_sweeps > before.pending_sweeps,
        "sweeps ran during the test"
    );
    assert_eq!(reserved, RESERVED, "every SYN at the target port passed");
    let id = PortId::new(target, Protocol::Tcp);
    assert_eq!(
        gate.reservations().expect("reservations").get(&id).copied(),
        Some(u64::from(RESERVED)),
        "no sweep freed a live reservation"
    );
    assert_eq!(gate.slots(id).expect("slots").slots, u64::from(RESERVED));
    drop(gate);
    portgate::gate::uninstall(pins.path()).expect("uninstall");
}

#[test]
fn a_port_flooded_past_its_share_is_a_status_warning_and_a_metric() {
    const OVER: u32 = 10;
    if !require_privileges!() {
        return;
    }
    pin_to_cpu0();
    let daemon = Daemon::start(41_400, 41_409);
    let request = AllocRequest {
        owner: "flooded".to_owned(),
        max_conns: Some(1_000_000),
        ..AllocRequest::default()
    };
    let held = daemon
        .api(|client| client.alloc(&request))
        .expect("allocate the port");
    let before = daemon.api(Client::status).expect("status").warnings;
    assert!(
        !before.iter().any(|warning| warning.contains("handshakes")),
        "{before:?}"
    );
    // The daemon's gate, handed SYNs from another handle on its pins.
    let mut gate = Gate::open(daemon.pins.path()).expect("open the daemon's gate");
    let share = capacity::PENDING_PER_PORT;
    assert_eq!(flood(&mut gate, held.id.port, 0, share + OVER), share);
    drop(gate);
    let status = daemon.api(Client::status).expect("status");
    assert!(
        status
            .warnings
            .iter()
            .any(|warning| warning.starts_with(&format!("{OVER} handshakes were refused"))),
        "{:?}",
        status.warnings
    );
    let metrics = daemon.api(Client::metrics).expect("metrics");
    assert!(
        metrics.contains(&format!(
            "portgate_handshakes_refused_total{{cause=\"port_share_full\"}} {OVER}\n"
        )),
        "{metrics}"
    );
}
