//! The gate's kernel state driven with `BPF_PROG_TEST_RUN`: connection-slot reservations
//! (retransmitted SYNs, handshakes that never complete), the deny-event rate limit, and
//! what `portgate maps` reads back. Needs root, bpffs, BTF. Attaches nothing.

use std::{
    net::{IpAddr, Ipv4Addr},
    thread,
    time::Duration,
};

use portgate::{
    gate::{Gate, GateSettings, PacketHook},
    model::{Allowlist, PortAccessControl, PortId, PortPolicy, Protocol},
};
use portgate_tests::common::{
    PinDir, allowlist,
    gate::{MIN_PORT, install, settings},
    packet::{DESTINATION, tcp_syn},
    pin_to_cpu0, require_privileges,
};

#[test]
fn a_retransmitted_syn_takes_no_second_slot_and_an_unfinished_handshake_gives_its_slot_back() {
    if !require_privileges("a_retransmitted_syn_takes_no_second_slot") {
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
fn a_flood_of_denials_is_rate_limited_and_the_rest_counted() {
    const LIMIT: u32 = 50;
    const FLOOD: u32 = 5_000;
    if !require_privileges("a_flood_of_denials_is_rate_limited_and_the_rest_counted") {
        return;
    }
    pin_to_cpu0();
    let pins = PinDir::new();
    let mut gate = install(&GateSettings {
        events_per_sec: LIMIT,
        ..settings(&pins)
    });
    let mut events = gate.events().expect("event stream");
    let port = MIN_PORT + 2;
    // Unallocated: every SYN is denied.
    let outcome = gate
        .test_run(
            PacketHook::Xdp,
            &tcp_syn([203, 0, 113, 9].into(), DESTINATION, 40_000, port),
            FLOOD,
        )
        .expect("test run");
    assert!(!outcome.passed);
    let delivered = events.drain();
    let stats = gate.stats().expect("stats");
    let counters = gate
        .counters(PortId::new(port, Protocol::Tcp))
        .expect("counters")
        .total;
    assert_eq!(
        counters.dropped_for(portgate_common::reason::UNALLOCATED),
        u64::from(FLOOD)
    );
    // The window may roll over once during the run.
    assert!(
        (LIMIT as usize..=2 * LIMIT as usize).contains(&delivered.len()),
        "about {LIMIT} events per second reach userspace, got {}",
        delivered.len()
    );
    assert_eq!(
        delivered.len() as u64 + stats.events_rate_limited + stats.events_lost_full,
        u64::from(FLOOD),
        "every denial is either delivered or counted as lost"
    );
    assert!(delivered.iter().all(|event| event.id.port == port
        && event.reason == "unallocated"
        && event.addr == IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9))));
}

#[test]
fn the_maps_report_reads_the_live_state_back() {
    if !require_privileges("the_maps_report_reads_the_live_state_back") {
        return;
    }
    pin_to_cpu0();
    let pins = PinDir::new();
    let mut gate = install(&settings(&pins));
    let port = MIN_PORT + 3;
    gate.set_policy(
        PortId::new(port, Protocol::Tcp),
        &PortPolicy {
            access: PortAccessControl {
                allowed_ips: allowlist(&["198.18.0.0/24", "fd00::/8"]),
                max_connections: 7,
                require_authentication: true,
            },
            ..PortPolicy::default()
        },
    )
    .expect("set policy");
    let now = portgate::host::kernel::monotonic_now_ns();
    gate.add_grant(
        PortId::new(port, Protocol::Tcp),
        IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)),
        now + 60_000_000_000,
    )
    .expect("grant");
    let mut passes = |source: [u8; 4], sport: u16| {
        let frame = tcp_syn(source.into(), DESTINATION, sport, port);
        gate.test_run(PacketHook::Xdp, &frame, 1)
            .expect("run")
            .passed
    };
    assert!(passes([198, 18, 0, 1], 41_000));
    assert!(!passes([203, 0, 113, 1], 41_001));
    assert!(!passes([198, 18, 0, 2], 41_002));

    // What `portgate maps` prints, from a handle that only opens the pins.
    let reader = Gate::open(pins.path()).expect("open the pinned maps");
    let reports = reader.reports().expect("reports");
    let row = reports
        .iter()
        .find(|row| row.id == PortId::new(port, Protocol::Tcp))
        .expect("the port is listed");
    assert_eq!(row.status, portgate::model::PortStatus::Active);
    assert_eq!(row.access.allowed_ips.len(), 2);
    assert_eq!(row.access.max_connections, 7);
    assert!(row.access.require_authentication);
    assert_eq!(row.grants.len(), 1);
    assert_eq!(row.counters.accepted, 1);
    assert_eq!(row.counters.dropped.not_allowed, 1);
    assert_eq!(row.counters.dropped.auth_required, 1);
    assert_eq!(row.counters.packets, 3);
    let json = serde_json::to_value(row).expect("json");
    for key in [
        "port",
        "proto",
        "status",
        "allow",
        "max_connections",
        "require_auth",
        "owner_cgroup",
        "accepted",
        "active",
        "dropped",
        "bind_denied",
        "packets",
        "bytes",
    ] {
        assert!(json.get(key).is_some(), "JSON has {key}: {json}");
    }
    for reason in [
        "unallocated",
        "draining",
        "not_allowed",
        "auth_required",
        "conn_limit",
    ] {
        assert!(json["dropped"].get(reason).is_some(), "dropped.{reason}");
    }
    assert!(
        Gate::open(&pins.path().join("absent")).is_err(),
        "opening a directory with no pins fails instead of creating maps"
    );
}

#[test]
fn deny_events_stream_asynchronously() {
    if !require_privileges("deny_events_stream_asynchronously") {
        return;
    }
    pin_to_cpu0();
    let pins = PinDir::new();
    let mut gate = install(&settings(&pins));
    let mut events = gate.events().expect("event stream");
    let port = MIN_PORT + 4;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let event = runtime.block_on(async {
        let waiting = tokio::spawn(async move {
            tokio::time::timeout(Duration::from_secs(5), events.next()).await
        });
        // The stream is registered and waiting before the denial happens.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !gate
                .test_run(
                    PacketHook::CgroupSkb,
                    &tcp_syn([203, 0, 113, 7].into(), DESTINATION, 42_000, port),
                    1
                )
                .expect("test run")
                .passed
        );
        waiting.await.expect("the waiting task")
    });
    let event = event
        .expect("an event within 5 s")
        .expect("a readable event");
    assert_eq!(event.id, PortId::new(port, Protocol::Tcp));
    assert_eq!(event.reason, "unallocated");
    assert_eq!(event.hook, "cgroup_skb");
    assert_eq!(event.addr, IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7)));
}

#[test]
fn pins_of_another_layout_are_refused_not_adopted() {
    if !require_privileges("pins_of_another_layout_are_refused_not_adopted") {
        return;
    }
    let good = PinDir::new();
    let mut gate = install(&settings(&good));
    // A pin directory whose PG_CONFIG is in fact a map of another shape.
    let odd = PinDir::new();
    let maps = odd.path().join(portgate::paths::MAPS_SUBDIR);
    std::fs::create_dir_all(&maps).expect("maps directory");
    gate.ebpf_mut()
        .map(portgate_common::map_names::STATS)
        .expect("the stats map")
        .pin(maps.join(portgate_common::map_names::CONFIG))
        .expect("pin it under the config map's name");
    let refused = Gate::install(&settings(&odd));
    match refused {
        Err(portgate::gate::GateError::IncompatiblePin {
            found, expected, ..
        }) => {
            assert_ne!(found, expected);
        }
        Err(other) => panic!("expected IncompatiblePin, got {other}"),
        Ok(_) => panic!("a pin of another layout was adopted"),
    }
    let created: Vec<_> = std::fs::read_dir(&maps)
        .expect("list maps")
        .filter_map(Result::ok)
        .map(|entry| entry.file_name())
        .collect();
    assert_eq!(
        created.len(),
        1,
        "nothing was created next to the odd pin: {created:?}"
    );
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
    if !require_privileges("a_hundred_thousand_prefixes_on_one_port") {
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

#[test]
fn whole_map_reads_in_batches_equal_entry_by_entry_reads() {
    // More entries than one batch (4,096) holds, in every map read in batches.
    const FIRST: u16 = 23_000;
    const LAST: u16 = 29_999;
    if !require_privileges("whole_map_reads_in_batches_equal_entry_by_entry_reads") {
        return;
    }
    pin_to_cpu0();
    let pins = PinDir::new();
    let mut gate = install(&GateSettings {
        min_port: FIRST,
        max_port: LAST,
        events_per_sec: 10,
        pending_ttl: Duration::from_mins(1),
        ..settings(&pins)
    });
    for port in FIRST..=LAST {
        let policy = PortPolicy {
            access: PortAccessControl {
                allowed_ips: allowlist(&["198.18.0.0/16"]),
                max_connections: u32::from(port % 7) + 1,
                ..PortAccessControl::default()
            },
            ..PortPolicy::default()
        };
        gate.set_policy(PortId::new(port, Protocol::Tcp), &policy)
            .expect("set the policy");
        // Every third port takes a connection slot; the others count a refusal.
        let source = if port % 3 == 0 {
            [198, 18, 0, 1]
        } else {
            [192, 0, 2, 1]
        };
        gate.test_run(
            PacketHook::CgroupSkb,
            &tcp_syn(source.into(), DESTINATION, 40_000, port),
            1,
        )
        .expect("test run");
    }

    let policies = gate.policies().expect("policies in batches");
    assert_eq!(policies.len(), usize::from(LAST - FIRST) + 1);
    let counters = gate.all_counters().expect("counters in batches");
    assert_eq!(counters.len(), usize::from(LAST - FIRST) + 1);
    let slots = gate.all_slots(FIRST..=LAST).expect("slots in batches");
    assert_eq!(slots.len(), usize::from(LAST - FIRST) + 1);
    for port in FIRST..=LAST {
        let id = PortId::new(port, Protocol::Tcp);
        assert_eq!(
            policies.get(&id).copied(),
            gate.policy(id).expect("policy"),
            "policy of {port}"
        );
        assert_eq!(
            counters.get(&id).copied().unwrap_or_default(),
            gate.counters(id).expect("counters"),
            "counters of {port}"
        );
        let one = gate.slots(id).expect("slots");
        assert_eq!(slots.get(&id), Some(&one), "slots of {port}");
        assert_eq!(one.slots, u64::from(port % 3 == 0), "slots of {port}");
    }
    // A range that starts at 0 and one that ends at the array's last index.
    assert_eq!(gate.all_slots(0..=9).expect("slots").len(), 10);
    assert_eq!(gate.all_slots(65_530..=65_535).expect("slots").len(), 6);
}
