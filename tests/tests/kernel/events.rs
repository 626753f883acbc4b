//! Deny events: the per-port rate limit with every suppressed event counted, and the
//! asynchronous event stream. Driven with `BPF_PROG_TEST_RUN`; attaches nothing.

use std::{
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use portgate::{
    gate::{GateSettings, PacketHook},
    model::{PortId, Protocol},
};
use portgate_tests::{
    common::{
        PinDir,
        gate::{MIN_PORT, install, settings},
        packet::{DESTINATION, tcp_syn},
        pin_to_cpu0,
    },
    require_privileges,
};

#[test]
fn a_flood_of_denials_is_rate_limited_and_the_rest_counted() {
    const LIMIT: u32 = 50;
    const FLOOD: u32 = 5_000;
    if !require_privileges!() {
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
fn deny_events_stream_asynchronously() {
    if !require_privileges!() {
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
