//! What outlives a process and what a new start adopts or refuses: enforcement without a
//! handle, re-adoption with counters intact and an uninstall that leaves nothing; pins of
//! another layout refused; a daemon killed with `kill -9` under load losing and doubling
//! nothing; a second daemon on the same pins, and a configuration that would drop an
//! allocation, refused before the kernel is touched.

use std::{
    collections::BTreeSet,
    fs, thread,
    time::{Duration, Instant},
};

use portgate::{
    api::AllocRequest,
    gate::Gate,
    model::{PortId, PortStatus, Protocol},
};
use portgate_common::reason;
use portgate_tests::{
    common::{
        EchoServer, LOCAL, NetNs, OTHER_LOCAL, PinDir, REFUSED_WITHIN, TestCgroup, allowing,
        connect_from, echo, eventually,
        gate::{MIN_PORT, install, settings},
        listen_in, loopback,
    },
    daemon::{Daemon, stderr},
    require_privileges,
};

#[test]
fn enforcement_outlives_the_handle_and_uninstall_removes_everything() {
    if !require_privileges!() {
        return;
    }
    let pins = PinDir::new();
    let cgroup = TestCgroup::new();
    let ns = NetNs::new();
    let port = MIN_PORT + 50;
    // Programs of other gates on this machine (a running portgate, another test process)
    // are not this test's to judge.
    let others = our_programs();
    {
        let mut gate = ns.run(|| install(&settings(&pins)));
        gate.attach_cgroup(cgroup.path()).expect("attach");
        gate.set_policy(
            PortId::new(port, Protocol::Tcp),
            &allowing(&["127.0.0.1/32"]),
        )
        .expect("set policy");
    }
    // No handle left in this process: the pins hold everything.
    let server = ns.run(|| EchoServer::serve(listen_in(&cgroup, loopback(port))));
    let connect = |from| ns.run(|| connect_from(from, loopback(port), REFUSED_WITHIN));
    let mut ok = connect(LOCAL).expect("allowed without a handle");
    echo(&mut ok, b"pinned").expect("echo");
    assert!(
        connect(OTHER_LOCAL).is_err(),
        "still enforced without a handle"
    );

    // Adopted from the same namespace: the host's stays the same.
    let gate = ns.run(|| install(&settings(&pins)));
    let counters = gate
        .counters(PortId::new(port, Protocol::Tcp))
        .expect("counters")
        .total;
    assert_eq!(counters.accepted, 1, "counters survive re-adoption");
    assert!(counters.dropped_for(reason::NOT_ALLOWED) >= 1);
    assert_eq!(
        gate.attachments().expect("attachments"),
        [
            "cgroup_bind4",
            "cgroup_bind6",
            "cgroup_skb_ingress",
            "sock_ops"
        ],
        "adopted, not attached twice"
    );
    let policy = gate
        .policy(PortId::new(port, Protocol::Tcp))
        .expect("policy")
        .expect("the policy survived");
    assert_eq!(policy.status, portgate_common::status::ACTIVE);
    drop(gate);
    drop(ok);

    let attached: Vec<u32> = our_programs()
        .into_iter()
        .filter(|id| !others.contains(id))
        .collect();
    assert!(
        attached.len() >= 4,
        "the four cgroup programs, held by their pinned links"
    );
    portgate::gate::uninstall(pins.path()).expect("uninstall");
    assert!(!pins.path().exists(), "nothing left pinned");
    assert!(
        eventually(Duration::from_secs(5), || our_programs()
            .iter()
            .all(|id| !attached.contains(id))),
        "uninstall detached and freed every program"
    );
    let mut free = connect(OTHER_LOCAL).expect("after uninstall nothing is enforced");
    echo(&mut free, b"free").expect("echo");
    drop(server);
}

/// Ids of the loaded BPF programs with portgate's names (the kernel keeps 15 characters).
fn our_programs() -> Vec<u32> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|program| {
            program
                .name_as_str()
                .is_some_and(|name| name.starts_with("portgate_"))
        })
        .map(|program| program.id())
        .collect()
}

#[test]
fn pins_of_another_layout_are_refused_not_adopted() {
    if !require_privileges!() {
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

#[test]
fn kill_9_during_concurrent_allocations_loses_nothing_and_doubles_nothing() {
    const CLIENTS: usize = 8;
    if !require_privileges!() {
        return;
    }
    let mut daemon = Daemon::start(41_200, 44_999);
    // 8 clients allocate over the API as fast as they can; each remembers what was
    // acknowledged (an answer with the port), and stops at the first failure. The daemon is
    // killed in the middle of the load.
    let acknowledged: Vec<(u16, String)> = thread::scope(|scope| {
        let clients: Vec<_> = (0..CLIENTS)
            .map(|client| {
                let daemon = &daemon;
                scope.spawn(move || {
                    let mut acknowledged = Vec::new();
                    let deadline = Instant::now() + Duration::from_secs(20);
                    for n in 0..400 {
                        if Instant::now() > deadline {
                            break;
                        }
                        let request = AllocRequest {
                            owner: format!("c{client}-{n}"),
                            ..AllocRequest::default()
                        };
                        let Ok(view) = daemon.api(|api| api.alloc(&request)) else {
                            break; // the daemon is gone (or the answer was cut off)
                        };
                        acknowledged.push((view.id.port, request.owner));
                    }
                    acknowledged
                })
            })
            .collect();
        assert!(
            eventually(Duration::from_secs(20), || daemon.allocations().len()
                >= 300),
            "allocations did not start"
        );
        daemon.kill9();
        clients
            .into_iter()
            .flat_map(|client| client.join().expect("client thread"))
            .collect()
    });
    assert!(!acknowledged.is_empty());
    let ports: BTreeSet<u16> = acknowledged.iter().map(|(port, _)| *port).collect();
    assert_eq!(
        ports.len(),
        acknowledged.len(),
        "a port was acknowledged twice"
    );

    // A policy in the kernel that no commit explains (as after a kill between the kernel
    // write and the commit): the restart must take it out.
    let orphan = (41_200..=44_999)
        .rev()
        .find(|port| !ports.contains(port))
        .expect("a port nobody was given");
    Gate::open(daemon.pins.path())
        .expect("open the pinned gate")
        .set_policy(
            PortId::new(orphan, Protocol::Tcp),
            &portgate::model::PortPolicy::default(),
        )
        .expect("write an orphan policy");

    daemon.spawn();
    let after = daemon.allocations();
    for (port, owner) in &acknowledged {
        let held = after
            .get(&PortId::from(*port))
            .unwrap_or_else(|| panic!("acknowledged {port} ({owner}) was lost"));
        assert_eq!(&held.owner, owner, "port {port} changed hands");
        assert_eq!(held.status, PortStatus::Active);
    }
    // At most one unacknowledged allocation per client was in flight.
    assert!(
        after.len() <= acknowledged.len() + CLIENTS,
        "{} > {}",
        after.len(),
        acknowledged.len()
    );
    // The kernel maps equal the store.
    let kernel = daemon.kernel_policies();
    let stored: BTreeSet<PortId> = after.keys().copied().collect();
    assert_eq!(kernel, stored);
    let restart = daemon
        .log()
        .lines()
        .find(|line| line.contains("stale kernel policies"))
        .unwrap_or_default()
        .to_owned();
    if !after.contains_key(&PortId::from(orphan)) {
        assert!(
            !kernel.contains(&PortId::from(orphan)),
            "the orphan policy stayed"
        );
        assert!(!restart.contains("removed 0 stale"), "{restart}");
    }
    eprintln!(
        "kill -9 test: {} acknowledged before the kill, {} allocations after restart; {restart}",
        acknowledged.len(),
        after.len()
    );
}

#[test]
fn a_second_daemon_on_the_same_pins_is_refused_and_changes_nothing() {
    if !require_privileges!() {
        return;
    }
    let daemon = Daemon::start(41_350, 41_399);
    let first = AllocRequest {
        owner: "first".to_owned(),
        port: Some(41_360),
        ..AllocRequest::default()
    };
    daemon
        .api(|client| client.alloc(&first))
        .expect("allocate 41360");
    // Another socket and another (empty) store, the same pins: it would remove the first
    // daemon's policies if it got as far as reconciling.
    let text = fs::read_to_string(&daemon.config).expect("config");
    let second = daemon.dir.path().join("second.toml");
    let second_state = daemon.dir.path().join("second-state");
    let second_socket = daemon.dir.path().join("second.sock");
    let text = text
        .lines()
        .map(|line| {
            if line.starts_with("state_dir =") {
                format!("state_dir = \"{}\"", second_state.display())
            } else if line.starts_with("socket =") {
                format!("socket = \"{}\"", second_socket.display())
            } else if line.starts_with("metrics_listen =") {
                "metrics_listen = \"\"".to_owned()
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    fs::write(&second, text).expect("second config");
    let output = daemon
        .daemon_command_with(&second)
        .output()
        .expect("run the second daemon");
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("another portgate daemon is using the pins"),
        "{}",
        stderr(&output)
    );
    assert_eq!(
        daemon.kernel_policies(),
        BTreeSet::from([PortId::new(41_360, Protocol::Tcp)])
    );
    assert_eq!(daemon.allocations()[&PortId::from(41_360)].owner, "first");
}

#[test]
fn a_configuration_that_drops_an_allocation_is_refused_before_the_kernel_is_touched() {
    if !require_privileges!() {
        return;
    }
    let mut daemon = Daemon::start(41_300, 41_349);
    let top = AllocRequest {
        owner: "top".to_owned(),
        port: Some(41_340),
        ..AllocRequest::default()
    };
    let held = daemon
        .api(|client| client.alloc(&top))
        .expect("allocate 41340");
    assert_eq!(held.id.port, 41_340);
    assert!(daemon.stop());
    daemon.set_config("max_port", "41309");
    let printed = daemon.spawn_failing();
    assert!(printed.contains("no longer allows"), "{printed}");
    assert!(printed.contains("41340"), "{printed}");
    // The gate still manages the old range and still enforces the allocation.
    let gate = Gate::open(daemon.pins.path()).expect("open the gate");
    let config = gate.config().expect("gate config");
    assert_eq!((config.min_port, config.max_port), (41_300, 41_349));
    assert!(gate.policy(PortId::from(41_340)).expect("policy").is_some());
    drop(gate);
    daemon.set_config("max_port", "41349");
    daemon.spawn();
    assert_eq!(daemon.allocations()[&held.id].owner, "top");
}
