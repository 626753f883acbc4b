//! Tests of the allocator: claims, bound ports, lifecycle timers, published ports.
use std::{collections::BTreeSet, time::Duration};

use super::{Bound, Gone, PortAllocator, Transition};
use crate::{
    config::PortConfig,
    manager::error::PortError,
    model::{
        AllocationRequest, HostPort, NetnsId, NetnsInfo, NetnsRef, Owner, OwnerCgroup, PortId,
        PortStatus, Protocol,
    },
};

/// No port has a live socket.
const NOTHING_BOUND: Bound = Bound {
    netns: BTreeSet::new(),
    host: BTreeSet::new(),
};

fn config(min: u16, max: u16) -> PortConfig {
    PortConfig {
        min_port: min,
        max_port: max,
        timeout: Duration::from_secs(30),
        quarantine: Duration::from_secs(10),
        ..PortConfig::default()
    }
}

fn allocator(config: PortConfig) -> PortAllocator {
    PortAllocator::from_config(config).unwrap()
}

fn status_of(allocator: &PortAllocator, id: PortId) -> PortStatus {
    allocator
        .allocation(id)
        .map_or(PortStatus::Available, |held| held.status)
}

fn request(owner: &str, port: Option<u16>) -> AllocationRequest {
    AllocationRequest {
        port,
        ..AllocationRequest::new(owner)
    }
}

#[test]
fn a_specific_port_is_handed_out_once() {
    let mut allocator = allocator(config(20_000, 20_009));
    let held = allocator
        .claim(request("a", Some(20_005)), 1_000, &NOTHING_BOUND)
        .unwrap();
    assert_eq!(held.id, PortId::new(20_005, Protocol::Tcp));
    assert_eq!(held.status, PortStatus::Active);
    let err = allocator
        .claim(request("b", Some(20_005)), 1_000, &NOTHING_BOUND)
        .unwrap_err();
    assert!(matches!(err, PortError::PortUnavailable { .. }), "{err}");
    assert!(err.to_string().contains("held by a"), "{err}");
    // The same number for UDP is another port.
    let udp = AllocationRequest {
        protocol: Protocol::Udp,
        ..request("b", Some(20_005))
    };
    assert_eq!(
        allocator
            .claim(udp, 1_000, &NOTHING_BOUND)
            .unwrap()
            .id
            .protocol,
        Protocol::Udp
    );
}

#[test]
fn out_of_range_and_reserved_ports_are_refused() {
    let mut allocator = allocator(PortConfig {
        reserved_ports: vec![20_003],
        ..config(20_000, 20_009)
    });
    let err = allocator
        .claim(request("a", Some(19_999)), 0, &NOTHING_BOUND)
        .unwrap_err();
    assert!(matches!(err, PortError::InvalidPortRequest(_)), "{err}");
    assert!(
        err.to_string()
            .contains("outside the managed range 20000-20009")
    );
    let err = allocator
        .claim(request("a", Some(20_003)), 0, &NOTHING_BOUND)
        .unwrap_err();
    assert!(err.to_string().contains("reserved"), "{err}");
    // Random allocation never lands on the reserved port.
    let ports: BTreeSet<u16> = (0..9)
        .map(|_| {
            allocator
                .claim(request("a", None), 0, &NOTHING_BOUND)
                .unwrap()
                .id
                .port
        })
        .collect();
    assert_eq!(ports.len(), 9);
    assert!(!ports.contains(&20_003));
}

#[test]
fn an_exhausted_range_is_a_clear_error() {
    let mut allocator = allocator(config(20_000, 20_003));
    for _ in 0..4 {
        allocator
            .claim(request("a", None), 0, &NOTHING_BOUND)
            .unwrap();
    }
    let err = allocator
        .claim(request("a", None), 0, &NOTHING_BOUND)
        .unwrap_err();
    assert!(matches!(err, PortError::RangeExhausted { .. }), "{err}");
    assert!(
        err.to_string().contains("no free tcp port in 20000-20003"),
        "{err}"
    );
    assert_eq!(allocator.free_count(Protocol::Tcp), 0);
    assert_eq!(allocator.free_count(Protocol::Udp), 4);
}

#[test]
fn random_probes_then_a_scan_find_the_last_free_ports_at_99_percent() {
    let mut allocator = allocator(PortConfig {
        max_retries: 4,
        ..config(20_000, 29_999)
    });
    for _ in 0..9_900 {
        allocator
            .claim(request("bulk", None), 0, &NOTHING_BOUND)
            .unwrap();
    }
    assert_eq!(allocator.free_count(Protocol::Tcp), 100);
    // With 1% free, 4 probes mostly miss: the scan must find every remaining port.
    let mut last = BTreeSet::new();
    for _ in 0..100 {
        last.insert(
            allocator
                .claim(request("tail", None), 0, &NOTHING_BOUND)
                .unwrap()
                .id
                .port,
        );
    }
    assert_eq!(last.len(), 100);
    assert!(matches!(
        allocator.claim(request("x", None), 0, &NOTHING_BOUND),
        Err(PortError::RangeExhausted { .. })
    ));
}

#[test]
fn a_bound_port_is_skipped() {
    let mut allocator = allocator(config(20_000, 20_002));
    let ports = BTreeSet::from([20_000, 20_002]);
    let bound = Bound {
        netns: ports.clone(),
        host: ports,
    };
    let err = allocator
        .claim(request("a", Some(20_000)), 0, &bound)
        .unwrap_err();
    assert!(err.to_string().contains("already bound"), "{err}");
    for _ in 0..3 {
        // Only 20001 is neither allocated nor bound.
        let held = allocator.claim(request("a", None), 0, &bound);
        if let Ok(held) = held {
            assert_eq!(held.id.port, 20_001);
        } else {
            assert!(matches!(held, Err(PortError::RangeExhausted { .. })));
        }
    }
}

#[test]
fn leases_expire_into_draining_and_renew_pushes_them_out() {
    let mut allocator = allocator(config(20_000, 20_009));
    let held = allocator
        .claim(
            AllocationRequest {
                ttl: Some(Duration::from_secs(5)),
                ..request("a", Some(20_001))
            },
            1_000,
            &NOTHING_BOUND,
        )
        .unwrap();
    assert_eq!(held.timeline.lease_expires_at, Some(6_000));
    allocator.renew(held.id, None, 4_000).unwrap();
    assert_eq!(
        allocator
            .allocation(held.id)
            .unwrap()
            .timeline
            .lease_expires_at,
        Some(9_000)
    );
    assert!(allocator.tick(8_999, |_| 1).steps.is_empty());
    let renewed = allocator.allocation(held.id).unwrap().clone();
    // Expired with a connection open: Draining, not yet Closed.
    let ticked = allocator.tick(9_000, |_| 1);
    assert_eq!(ticked.steps, vec![Transition::LeaseExpired(held.id)]);
    assert_eq!(ticked.before, vec![renewed], "what it was before the tick");
    assert_eq!(status_of(&allocator, held.id), PortStatus::Draining);
    let err = allocator.renew(held.id, None, 9_001).unwrap_err();
    assert!(err.to_string().contains("cannot be renewed"), "{err}");
    // A port without a lease has nothing to renew.
    let plain = allocator
        .claim(request("b", None), 0, &NOTHING_BOUND)
        .unwrap();
    assert!(allocator.renew(plain.id, None, 0).is_err());
    assert!(
        allocator
            .renew(plain.id, Some(Duration::from_secs(1)), 0)
            .is_ok()
    );
}

#[test]
fn the_lifecycle_runs_active_draining_closed_quarantine_available() {
    let mut allocator = allocator(config(20_000, 20_000));
    let id = allocator
        .claim(request("a", None), 0, &NOTHING_BOUND)
        .unwrap()
        .id;
    allocator
        .set_status_at(id, PortStatus::Draining, 1_000)
        .unwrap();
    // One connection open: stays Draining until the drain timeout (30 s).
    assert!(allocator.tick(2_000, |_| 1).steps.is_empty());
    assert_eq!(
        allocator.tick(31_000, |_| 1).steps,
        vec![Transition::Closed(id)]
    );
    assert_eq!(status_of(&allocator, id), PortStatus::Closed);
    // Quarantine (10 s): not free yet, and not allocatable.
    assert!(allocator.tick(40_999, |_| 0).steps.is_empty());
    assert!(
        allocator
            .claim(request("b", None), 40_999, &NOTHING_BOUND)
            .is_err()
    );
    let err = allocator
        .claim(request("b", Some(20_000)), 40_999, &NOTHING_BOUND)
        .unwrap_err();
    assert!(err.to_string().contains("quarantine"), "{err}");
    assert_eq!(
        allocator.tick(41_000, |_| 0).steps,
        vec![Transition::Freed(id)]
    );
    assert_eq!(status_of(&allocator, id), PortStatus::Available);
    let again = allocator
        .claim(request("b", None), 41_000, &NOTHING_BOUND)
        .unwrap();
    assert_eq!(again.id, id);
    assert_eq!(again.owner.name, "b");
}

#[test]
fn draining_closes_when_the_last_connection_ends() {
    let mut allocator = allocator(PortConfig {
        quarantine: Duration::ZERO,
        ..config(20_000, 20_000)
    });
    let id = allocator
        .claim(request("a", None), 0, &NOTHING_BOUND)
        .unwrap()
        .id;
    allocator
        .set_status_at(id, PortStatus::Draining, 0)
        .unwrap();
    assert!(allocator.tick(100, |_| 2).steps.is_empty());
    // No connections and no quarantine: closed and freed in one step.
    assert_eq!(
        allocator.tick(200, |_| 0).steps,
        vec![Transition::Closed(id), Transition::Freed(id)]
    );
    assert_eq!(allocator.free_count(Protocol::Tcp), 1);
}

#[test]
fn a_closed_port_is_not_reopened() {
    let mut allocator = allocator(config(20_000, 20_000));
    let id = allocator
        .claim(request("a", None), 0, &NOTHING_BOUND)
        .unwrap()
        .id;
    allocator.set_status_at(id, PortStatus::Closed, 0).unwrap();
    let err = allocator
        .set_status_at(id, PortStatus::Active, 1)
        .unwrap_err();
    assert!(err.to_string().contains("cannot go active"), "{err}");
}

#[test]
fn requests_are_checked() {
    let mut allocator = allocator(config(20_000, 20_009));
    let err = allocator
        .claim(request(" ", None), 0, &NOTHING_BOUND)
        .unwrap_err();
    assert!(err.to_string().contains("owner name is empty"), "{err}");
    let err = allocator
        .claim(
            AllocationRequest {
                ttl: Some(Duration::ZERO),
                ..request("a", None)
            },
            0,
            &NOTHING_BOUND,
        )
        .unwrap_err();
    assert!(err.to_string().contains("TTL of 0"), "{err}");
    assert_eq!(allocator.free_count(Protocol::Tcp), 10);
}

/// A request for `owner`, owned by the cgroup with id `cgroup`.
fn owned(owner: &str, cgroup: u64) -> AllocationRequest {
    AllocationRequest {
        owner: Owner {
            cgroup: Some(OwnerCgroup {
                path: format!("/sys/fs/cgroup/{owner}").into(),
                id: cgroup,
                level: 1,
            }),
            ..Owner::named(owner)
        },
        ..AllocationRequest::new(owner)
    }
}

/// `request` for `port` in the namespace with cookie `cookie`.
fn in_netns(cookie: u64, port: u16, request: AllocationRequest) -> AllocationRequest {
    AllocationRequest {
        netns: Some(NetnsRef {
            id: NetnsId(cookie),
            info: NetnsInfo {
                label: format!("c{cookie}"),
                inode: 4_026_532_000 + cookie,
            },
            path: "/run/netns/unused".into(),
        }),
        port: Some(port),
        ..request
    }
}

#[test]
fn owners_gone_drain_their_ports_and_a_namespace_gone_closes_its_own() {
    let mut allocator = allocator(config(20_000, 20_009));
    let mut claim = |request| allocator.claim(request, 0, &NOTHING_BOUND).unwrap().id;
    let orphan = claim(owned("orphan", 7));
    let kept = claim(owned("kept", 8));
    let container = claim(in_netns(
        5,
        80,
        AllocationRequest {
            publish: Some(HostPort::Auto),
            ..owned("container", 9)
        },
    ));
    let draining = claim(in_netns(5, 81, owned("container", 9)));
    let elsewhere = claim(in_netns(6, 80, owned("other", 10)));
    allocator
        .set_status_at(draining, PortStatus::Draining, 500)
        .unwrap();
    assert_eq!(
        allocator.free_count(Protocol::Tcp),
        7,
        "one host port published"
    );
    let gone = Gone {
        cgroups: [7, 9].into(),
        netns: [NetnsId(5)].into(),
    };

    // Owners kept: only the namespace's ports close, whatever their status.
    let ticked = allocator.take_gone(&gone, false, 1_000);
    assert_eq!(
        ticked.steps,
        [
            Transition::NetnsGone(container),
            Transition::NetnsGone(draining)
        ]
    );
    assert_eq!(ticked.before.len(), 2);
    for id in [container, draining] {
        let held = allocator.allocation(id).unwrap();
        assert_eq!(held.status, PortStatus::Closed);
        assert_eq!(held.timeline.closed_at, Some(1_000));
        assert_eq!(held.timeline.netns_gone_at, Some(1_000));
        assert_eq!(held.policy(), None, "nothing of it stays in the kernel");
    }
    let drained = allocator.allocation(draining).unwrap();
    assert_eq!(drained.timeline.draining_since, Some(500));
    assert_eq!(
        allocator.free_count(Protocol::Tcp),
        7,
        "the published host port is held through quarantine"
    );
    assert!(gone.owns(allocator.allocation(orphan).unwrap()));
    assert!(!gone.owns(allocator.allocation(kept).unwrap()));
    assert_eq!(status_of(&allocator, orphan), PortStatus::Active);
    assert!(allocator.take_gone(&gone, false, 1_100).steps.is_empty());

    // Owners drained: the Active port whose owner is gone goes Draining, once.
    let ticked = allocator.take_gone(&gone, true, 2_000);
    assert_eq!(ticked.steps, [Transition::OwnerGone(orphan)]);
    assert_eq!(status_of(&allocator, orphan), PortStatus::Draining);
    assert_eq!(status_of(&allocator, kept), PortStatus::Active);
    assert_eq!(status_of(&allocator, elsewhere), PortStatus::Active);
    assert!(allocator.take_gone(&gone, true, 2_100).steps.is_empty());

    // Quarantine (10 s from closing) frees the namespace's ports and the host port.
    let ticked = allocator.tick(11_000, |_| 0);
    assert_eq!(
        ticked.steps,
        [
            Transition::Closed(orphan),
            Transition::Freed(container),
            Transition::Freed(draining)
        ]
    );
    assert_eq!(allocator.free_count(Protocol::Tcp), 8);
}
