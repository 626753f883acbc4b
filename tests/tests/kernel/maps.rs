//! The gate's maps read back: what `portgate maps` shows, and whole-map reads in batches
//! equal to reads entry by entry. Driven with `BPF_PROG_TEST_RUN`; attaches nothing.

use std::{
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use portgate::{
    gate::{Gate, GateSettings, PacketHook},
    model::{PortAccessControl, PortId, PortPolicy, Protocol},
};
use portgate_tests::{
    common::{
        PinDir, allowlist,
        gate::{MIN_PORT, install, settings},
        packet::{DESTINATION, tcp_syn},
        pin_to_cpu0,
    },
    require_privileges,
};

#[test]
fn the_maps_report_reads_the_live_state_back() {
    if !require_privileges!() {
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
fn whole_map_reads_in_batches_equal_entry_by_entry_reads() {
    // More entries than one batch (4,096) holds, in every map read in batches.
    const FIRST: u16 = 23_000;
    const LAST: u16 = 29_999;
    if !require_privileges!() {
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
    let slots = gate.all_slots().expect("slots in batches");
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
}
