//! Fleet mode end to end (issue #14, in progress): three daemons (three network
//! namespaces, cgroups and pin directories) on one etcd, which runs in a namespace of its
//! own and reaches each daemon over a veth pair.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use portgate::{
    api::AllocationView,
    model::{AccessChange, PortId, Protocol},
};
use portgate_tests::{common::eventually, daemon::Daemon, fleet::Fleet, require_privileges};

/// The range the fleet shares.
const RANGE: (u16, u16) = (47_100, 47_199);

/// How long a change may take to reach every node before a test gives up (a bound for
/// the test, not the figure: the benchmarks measure it).
const CONVERGE_WITHIN: Duration = portgate_tests::fleet::CONVERGE_WITHIN;

/// The host ports a daemon holds.
fn ports(daemon: &Daemon) -> BTreeSet<u16> {
    daemon
        .api(portgate::client::Client::list)
        .unwrap_or_default()
        .iter()
        .map(|view: &AllocationView| view.id.port)
        .collect()
}

/// Allocates a port through `daemon`'s CLI; the port, or what it said.
fn allocate(daemon: &Daemon) -> Result<u16, String> {
    let output = daemon.cli(None, &["alloc", "--owner", "fleet-test"]);
    if output.status.success() {
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .map_err(|err| format!("{err}"))
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

#[test]
fn sixty_four_allocations_over_three_nodes_never_hand_out_a_port_twice() {
    if !require_privileges!() {
        return;
    }
    let fleet = Fleet::start(RANGE);
    let won: Vec<u16> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..64)
            .map(|i| {
                let daemon = &fleet.daemons[i % 3];
                scope.spawn(move || allocate(daemon))
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().expect("an allocation thread"))
            .collect::<Result<Vec<u16>, String>>()
            .expect("every allocation succeeds")
    });
    let distinct: BTreeSet<u16> = won.iter().copied().collect();
    assert_eq!(distinct.len(), 64, "a port handed out twice: {won:?}");
    for daemon in &fleet.daemons {
        assert!(
            eventually(CONVERGE_WITHIN, || ports(daemon) == distinct),
            "every node holds the fleet's 64 ports: {:?}",
            ports(daemon)
        );
    }
}

#[test]
fn a_policy_changed_through_one_node_is_enforced_by_the_others_kernels() {
    if !require_privileges!() {
        return;
    }
    let fleet = Fleet::start(RANGE);
    let port = allocate(&fleet.daemons[0]).expect("allocate");
    let id = PortId::new(port, Protocol::Tcp);
    for daemon in &fleet.daemons {
        assert!(eventually(CONVERGE_WITHIN, || ports(daemon).contains(&port)));
    }
    let change = AccessChange {
        max_connections: Some(7),
        ..AccessChange::default()
    };
    let changed = Instant::now();
    fleet.daemons[0]
        .api(|client| client.access(id, &change))
        .expect("change the policy through node a");
    for daemon in &fleet.daemons[1..] {
        // What the node's kernel holds for the port (the daemon reads its pinned maps).
        let enforced = || {
            daemon
                .api(|client| client.stats(Some(id)))
                .ok()
                .and_then(|reports| reports.first().map(|report| report.access.max_connections))
                == Some(7)
        };
        assert!(
            eventually(CONVERGE_WITHIN, enforced),
            "the change reached this node's kernel:\n{}",
            daemon.log()
        );
    }
    println!(
        "policy change enforced by both other nodes' kernels after {:?} (this run, polled)",
        changed.elapsed()
    );
}

#[test]
fn with_etcd_stopped_allocations_are_refused_and_connections_still_judged_then_all_converge() {
    // (and a node restarted meanwhile enforces its local store)
    if !require_privileges!() {
        return;
    }
    let mut fleet = Fleet::start(RANGE);
    let before = allocate(&fleet.daemons[0]).expect("allocate");
    for daemon in &fleet.daemons {
        assert!(eventually(CONVERGE_WITHIN, || ports(daemon).contains(&before)));
    }
    fleet.etcd.pause();
    let refused = allocate(&fleet.daemons[1]).expect_err("refused while etcd is stopped");
    assert!(refused.contains("etcd"), "a clear error: {refused}");
    // A node restarted while etcd is stopped starts from its local store and enforces it.
    assert!(fleet.daemons[2].stop());
    fleet.daemons[2].spawn();
    let status = fleet.daemons[2].cli_ok(None, &["status"]);
    assert!(status.contains("enforcing the local store"), "{status}");
    assert!(ports(&fleet.daemons[2]).contains(&before));
    // The kernel still holds and judges what it was given.
    let check = fleet.daemons[2].cli(None, &["check", &before.to_string(), "127.0.0.1"]);
    assert!(
        check.status.success(),
        "the port's policy still lets loopback in: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    fleet.etcd.resume();
    let after = {
        let mut got = Err(String::new());
        let deadline = Instant::now() + CONVERGE_WITHIN;
        while Instant::now() < deadline {
            got = allocate(&fleet.daemons[1]);
            if got.is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        got.expect("allocations work again after SIGCONT")
    };
    let expected: BTreeSet<u16> = [before, after].into_iter().collect();
    for daemon in &fleet.daemons {
        assert!(
            eventually(CONVERGE_WITHIN, || ports(daemon) == expected),
            "all three converge: {:?}",
            ports(daemon)
        );
    }
}

#[test]
fn a_node_killed_and_restarted_catches_up() {
    if !require_privileges!() {
        return;
    }
    let mut fleet = Fleet::start(RANGE);
    fleet.daemons[2].kill9();
    let made = allocate(&fleet.daemons[0]).expect("allocate while a node is down");
    fleet.daemons[2].spawn();
    assert!(
        eventually(CONVERGE_WITHIN, || ports(&fleet.daemons[2]).contains(&made)),
        "the restarted node has the allocation made while it was down:\n{}",
        fleet.daemons[2].log()
    );
}

#[test]
fn an_allocation_racing_the_release_of_its_port_gets_it_once_freed_and_only_then() {
    if !require_privileges!() {
        return;
    }
    let fleet = Fleet::start(RANGE);
    let port = allocate(&fleet.daemons[0]).expect("allocate");
    for daemon in &fleet.daemons {
        assert!(eventually(CONVERGE_WITHIN, || ports(daemon).contains(&port)));
    }
    let released = Instant::now();
    fleet.daemons[0].cli_ok(None, &["release", &port.to_string()]);
    // Node b asks for the same port over and over while node a drains, closes and frees
    // it (quarantine 3 s): refused until it is free, then handed to b once.
    let mut refusals = 0;
    let deadline = released + CONVERGE_WITHIN;
    let got = loop {
        assert!(
            Instant::now() < deadline,
            "the port was never handed to node b"
        );
        let output = fleet.daemons[1].cli(
            None,
            &["alloc", "--owner", "racer", "--port", &port.to_string()],
        );
        if output.status.success() {
            break released.elapsed();
        }
        refusals += 1;
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(refusals > 0, "handed out while it was still held");
    println!("port {port} handed to node b {got:?} after its release ({refusals} refusals before)");
    for daemon in &fleet.daemons {
        assert!(
            eventually(CONVERGE_WITHIN, || daemon
                .api(portgate::client::Client::list)
                .is_ok_and(|views| views.len() == 1
                    && views[0].id.port == port
                    && views[0].owner == "racer")),
            "every node holds the port for its new owner"
        );
    }
}

#[test]
fn a_dead_nodes_ports_stay_until_the_repair_pass_confirms_it_is_gone_then_are_freed() {
    if !require_privileges!() {
        return;
    }
    let fleet = Fleet::start(RANGE);
    let made: BTreeSet<u16> = (0..2)
        .map(|_| allocate(&fleet.daemons[2]).expect("allocate on node c"))
        .collect();
    for daemon in &fleet.daemons {
        assert!(eventually(CONVERGE_WITHIN, || ports(daemon) == made));
    }
    fleet.daemons[2].kill9();
    // Its lease (6 s) still holds: the node counts as alive, and nothing is repaired.
    let early = fleet.daemons[0].cli(None, &["fleet", "repair", "node-c"]);
    assert!(!early.status.success(), "repaired while its lease holds");
    assert!(
        String::from_utf8_lossy(&early.stderr).contains("alive"),
        "{}",
        String::from_utf8_lossy(&early.stderr)
    );
    assert_eq!(ports(&fleet.daemons[1]), made, "a dead node's ports stay");
    let gone = || {
        !fleet.daemons[0]
            .cli_ok(None, &["fleet", "nodes"])
            .contains("node-c")
    };
    assert!(
        eventually(CONVERGE_WITHIN, gone),
        "node c's liveness key went"
    );
    let repaired = fleet.daemons[0].cli_ok(None, &["fleet", "repair", "node-c"]);
    assert!(repaired.contains("released 2 port(s)"), "{repaired}");
    // Drained, closed and freed (quarantine 3 s) by node a, on every live node.
    for daemon in &fleet.daemons[..2] {
        assert!(
            eventually(CONVERGE_WITHIN, || ports(daemon).is_empty()),
            "the dead node's ports are freed: {:?}\n{}",
            ports(daemon),
            daemon.log()
        );
    }
}
