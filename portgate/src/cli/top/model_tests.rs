use std::time::{Duration, Instant};

use super::{EVENT_BUFFER, Link, PortRow, Reading, SortColumn, Top};
use crate::{
    api::{AllocationView, EventView, StatusView},
    model::{
        DropCounts, PortId, PortMetrics, PortReport, PortStatus, Protocol, sample_allocation,
        sample_metrics,
    },
};

fn status(warnings: &[&str]) -> StatusView {
    serde_json::from_value(serde_json::json!({
        "version": "0.1.0", "pid": 7, "uptime_secs": 5, "min_port": 20000, "max_port": 20009,
        "reserved_ports": [], "kernel_gate": true, "pin_dir": "/sys/fs/bpf/t",
        "attachments": [], "store": "redb", "usage": [], "unexplained_listeners": [],
        "warnings": warnings,
    }))
    .expect("a status")
}

fn allocation(port: u16, owner: &str, connections: u64, limit: u32) -> AllocationView {
    let mut held = sample_allocation(port, Protocol::Tcp);
    held.owner.name = owner.to_owned();
    held.access.max_connections = limit;
    AllocationView::new(&held, connections)
}

fn report(port: u16, accepted: u64, not_allowed: u64, conn_limit: u64) -> PortReport {
    let counters = PortMetrics {
        accepted,
        dropped: DropCounts {
            not_allowed,
            conn_limit,
            ..DropCounts::default()
        },
        ..PortMetrics::default()
    };
    let held = sample_allocation(port, Protocol::Tcp);
    PortReport {
        id: held.id,
        published: None,
        status: PortStatus::Active,
        access: held.access,
        owner_cgroup: None,
        grants: Vec::new(),
        counters,
    }
}

fn reading(allocations: Vec<AllocationView>, reports: Vec<PortReport>) -> Reading {
    Reading {
        allocations,
        reports,
        status: status(&[]),
    }
}

fn event(time: u64, port: u16) -> EventView {
    EventView {
        time,
        id: PortId::from(port),
        netns_label: None,
        addr: "127.0.0.2".parse().expect("an address"),
        reason: "not_allowed".to_owned(),
        hook: "cgroup_skb".to_owned(),
        cgroup_id: 0,
        pid: 0,
    }
}

fn ports(top: &Top) -> Vec<u16> {
    top.rows().iter().map(|row| row.id.port).collect()
}

#[test]
fn rates_are_counter_deltas_per_second_between_reads() {
    let start = Instant::now();
    let mut top = Top::new();
    top.observe(
        reading(
            vec![allocation(20001, "web", 1, 4)],
            vec![report(20001, 10, 2, 0)],
        ),
        start,
    );
    let row = &top.rows()[0];
    assert_eq!(
        (row.accept_rate, row.drop_rates),
        (None, None),
        "one read: no rate"
    );
    assert_eq!(top.drop_totals(), None);

    top.observe(
        reading(
            vec![allocation(20001, "web", 3, 4)],
            vec![report(20001, 14, 8, 1)],
        ),
        start + Duration::from_secs(2),
    );
    let row = &top.rows()[0];
    assert_eq!(row.owner.as_deref(), Some("web"));
    assert_eq!((row.connections, row.limit), (3, 4));
    assert_eq!(row.accept_rate, Some(2.0));
    // unallocated, draining, not_allowed, auth_required, conn_limit
    assert_eq!(row.drop_rates, Some([0.0, 0.0, 3.0, 0.0, 0.5]));
    assert_eq!(row.drop_rate(), Some(3.5));
    assert_eq!(top.drop_totals(), Some([0.0, 0.0, 3.0, 0.0, 0.5]));
    assert_eq!(top.drop_counts(), [0, 0, 8, 0, 1]);
}

#[test]
fn a_counter_that_went_down_has_no_rate() {
    let start = Instant::now();
    let mut top = Top::new();
    top.observe(reading(vec![], vec![report(20001, 10, 5, 0)]), start);
    // The daemon started again: its counters start from zero.
    top.observe(
        reading(vec![], vec![report(20001, 1, 1, 0)]),
        start + Duration::from_secs(1),
    );
    let row = &top.rows()[0];
    assert_eq!((row.accept_rate, row.drop_rates), (None, None));
    // Unallocated: no owner, the kernel's status and connections.
    assert_eq!(row.owner, None);
    top.observe(
        reading(vec![], vec![report(20001, 3, 1, 0)]),
        start + Duration::from_secs(2),
    );
    assert_eq!(top.rows()[0].accept_rate, Some(2.0));
}

#[test]
fn totals_add_every_ports_rates() {
    let start = Instant::now();
    let mut top = Top::new();
    let both = |n: u64| {
        reading(
            vec![allocation(20001, "a", 0, 0), allocation(20002, "b", 0, 0)],
            vec![report(20001, 0, n, 0), report(20002, 0, 0, 2 * n)],
        )
    };
    top.observe(both(0), start);
    top.observe(both(4), start + Duration::from_secs(4));
    assert_eq!(top.drop_totals(), Some([0.0, 0.0, 1.0, 0.0, 2.0]));
    assert_eq!(top.drop_counts(), [0, 0, 4, 0, 8]);
}

#[test]
fn an_allocation_without_counters_has_a_row() {
    let mut top = Top::new();
    top.observe(
        reading(vec![allocation(20003, "new", 0, 9)], vec![]),
        Instant::now(),
    );
    let rows: &[PortRow] = top.rows();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].owner.as_deref(), Some("new"));
    assert_eq!(rows[0].limit, 9);
    assert_eq!(rows[0].counters, PortMetrics::default());
}

#[test]
fn sorting_by_a_column_then_again_reverses() {
    let start = Instant::now();
    let mut top = Top::new();
    let views = vec![
        allocation(20001, "zeta", 1, 0),
        allocation(20002, "alpha", 5, 0),
        allocation(20003, "mid", 3, 0),
    ];
    top.observe(reading(views.clone(), vec![]), start);
    assert_eq!(ports(&top), [20001, 20002, 20003], "by port at first");
    top.sort_by(SortColumn::Owner);
    assert_eq!(ports(&top), [20002, 20003, 20001]);
    top.sort_by(SortColumn::Connections);
    assert_eq!(ports(&top), [20001, 20003, 20002]);
    top.sort_by(SortColumn::Connections);
    assert_eq!(top.sort(), (SortColumn::Connections, true));
    assert_eq!(ports(&top), [20002, 20003, 20001]);
    top.reverse();
    assert_eq!(ports(&top), [20001, 20003, 20002]);
    // The order holds across reads.
    top.observe(reading(views, vec![]), start + Duration::from_secs(1));
    assert_eq!(ports(&top), [20001, 20003, 20002]);
    assert_eq!(SortColumn::of_key('d'), Some(SortColumn::DropRate));
    assert_eq!(SortColumn::of_key('x'), None);
}

#[test]
fn sorting_by_drop_rate_puts_ports_without_a_rate_last() {
    let start = Instant::now();
    let mut top = Top::new();
    top.observe(
        reading(vec![], vec![report(20001, 0, 0, 0), report(20002, 0, 0, 0)]),
        start,
    );
    top.observe(
        reading(
            vec![],
            vec![
                report(20001, 0, 1, 0),
                report(20002, 0, 9, 0),
                report(20003, 0, 0, 0),
            ],
        ),
        start + Duration::from_secs(1),
    );
    top.sort_by(SortColumn::DropRate);
    top.reverse();
    assert_eq!(ports(&top), [20002, 20001, 20003]);
}

#[test]
fn events_newest_first_bounded_and_no_replay_after_a_reconnection() {
    let mut top = Top::new();
    for time in 1..=3 {
        top.event(event(time, 20001));
    }
    let times = |top: &Top| top.events().map(|event| event.time).collect::<Vec<_>>();
    assert_eq!(times(&top), [3, 2, 1]);
    // The stream broke and was opened again: the daemon sends what it holds first.
    top.events_reopened();
    for time in [1, 2, 3, 4] {
        top.event(event(time, 20001));
    }
    assert_eq!(times(&top), [4, 3, 2, 1]);
    for time in 0..(2 * EVENT_BUFFER as u64) {
        top.event(event(100 + time, 20002));
    }
    assert_eq!(top.events().count(), EVENT_BUFFER);
    assert_eq!(
        top.events().next().map(|event| event.time),
        Some(99 + 2 * EVENT_BUFFER as u64)
    );
}

#[test]
fn a_failed_read_keeps_the_rows_and_says_why() {
    let mut top = Top::new();
    let mut first = reading(vec![allocation(20001, "web", 0, 0)], vec![]);
    first.status = status(&["the range overlaps the ephemeral range"]);
    top.observe(first, Instant::now());
    top.lost("cannot connect to the daemon".to_owned());
    assert_eq!(
        top.link(),
        &Link::Down("cannot connect to the daemon".to_owned())
    );
    assert_eq!(ports(&top), [20001]);
    assert_eq!(
        top.status().map(|status| status.warnings.clone()),
        Some(vec!["the range overlaps the ephemeral range".to_owned()])
    );
    top.observe(reading(vec![], vec![]), Instant::now());
    assert_eq!(top.link(), &Link::Up);
    assert!(top.rows().is_empty());
    // Every field of the sample counts: the totals read each reason.
    let mut sampled = report(20001, 0, 0, 0);
    sampled.counters = sample_metrics();
    top.observe(reading(vec![], vec![sampled]), Instant::now());
    assert_eq!(top.drop_counts(), [3, 4, 5, 6, 7]);
}
