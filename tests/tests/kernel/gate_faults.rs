//! Kernel-side faults under a running daemon (issue #15): its pin directory removed, and
//! the cgroup its gate is attached to removed and made again. Neither may leave the gate
//! silently open: the daemon holds its links, pins them again by itself, attaches to the
//! cgroup again when it exists, and says so in its log, its metrics and `status`. And a
//! full kernel map (grants) refuses the change as its own error and admits no one more.

use std::{fs, path::Path, time::Instant};

use portgate::{
    gate::GateError,
    host::kernel::monotonic_now_ns,
    model::{PortAccessControl, PortId, PortPolicy, Protocol},
};
use portgate_common::{capacity, map_names};
use portgate_tests::{
    common::{
        CONNECT_WITHIN, EchoServer, LOCAL, OTHER_LOCAL, REFUSED_WITHIN, connect_from, echo,
        eventually,
        gate::{LoopbackPort, MIN_PORT},
        listen_in, loopback,
    },
    daemon::Daemon,
    require_privileges,
    stress::report,
};

/// The daemon's port `port`, allocated with an allowlist of 127.0.0.1 alone, and a server
/// on it in the daemon's cgroup.
fn allow_local_only(daemon: &Daemon, port: u16) -> EchoServer {
    daemon.cli_ok(
        None,
        &[
            "alloc",
            "--owner",
            "faults",
            "--port",
            &port.to_string(),
            "--allow",
            "127.0.0.1/32",
        ],
    );
    daemon
        .ns
        .run(|| EchoServer::serve(listen_in(&daemon.cgroup, loopback(port))))
}

/// Whether `from` connects to `port` in the daemon's namespace.
fn connects(daemon: &Daemon, from: std::net::IpAddr, port: u16) -> bool {
    let within = if from == LOCAL {
        CONNECT_WITHIN
    } else {
        REFUSED_WITHIN
    };
    daemon
        .ns
        .run(|| connect_from(from, loopback(port), within))
        .is_ok()
}

/// The names of the pins in `dir` (empty when it is gone).
fn pins_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The value of the metric line starting with `name ` (0 when absent).
fn metric(daemon: &Daemon, name: &str) -> f64 {
    let text = daemon
        .api(portgate::client::Client::metrics)
        .expect("metrics");
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn a_removed_pin_directory_leaves_the_gate_enforcing_and_is_pinned_again() {
    if !require_privileges!() {
        return;
    }
    let mut daemon = Daemon::start(41_900, 41_909);
    let port = 41_903;
    let _server = allow_local_only(&daemon, port);
    assert!(
        connects(&daemon, LOCAL, port),
        "the allowed source connects"
    );
    assert!(!connects(&daemon, OTHER_LOCAL, port), "another is dropped");
    let maps_dir = daemon.pins.path().join("maps");
    let links_dir = daemon.pins.path().join("links");
    let links = pins_in(&links_dir);
    assert!(links.iter().any(|link| link == "sock_ops"), "{links:?}");
    assert_eq!(pins_in(&maps_dir).len(), map_names::ALL.len());

    let removed = Instant::now();
    fs::remove_dir_all(daemon.pins.path()).expect("rm -rf the pin directory");
    // At once, before the daemon can have noticed: the links it holds keep the gate on.
    assert!(
        !connects(&daemon, OTHER_LOCAL, port),
        "with its pins gone the gate still drops a source outside the allowlist"
    );
    assert!(connects(&daemon, LOCAL, port), "and admits the allowed one");

    let back = eventually(CONNECT_WITHIN, || {
        pins_in(&links_dir) == links && pins_in(&maps_dir).len() == map_names::ALL.len()
    });
    let restored_after = removed.elapsed();
    assert!(
        back,
        "the daemon pins its maps and links again: {:?} {:?}\n{}",
        pins_in(&links_dir),
        pins_in(&maps_dir),
        daemon.log()
    );
    assert!(
        daemon.log().contains("pinned again"),
        "and says so in its log:\n{}",
        daemon.log()
    );
    let status = daemon.cli_ok(None, &["status"]);
    assert!(
        status.contains("pins were removed while the daemon ran"),
        "status says so: {status}"
    );
    let restored = metric(&daemon, "portgate_gate_pins_restored_total");
    assert!(
        restored
            >= f64::from(u32::try_from(map_names::ALL.len() + links.len()).expect("a few pins")),
        "every pin is counted: {restored}"
    );
    assert!(!connects(&daemon, OTHER_LOCAL, port), "still dropped");

    // The pins are the real ones: with the daemon stopped they alone keep the gate on,
    // and the next daemon adopts them with the port's policy.
    assert!(daemon.stop(), "the daemon stops cleanly:\n{}", daemon.log());
    assert!(
        !connects(&daemon, OTHER_LOCAL, port),
        "with no daemon, the pins put back keep the gate on"
    );
    daemon.spawn();
    assert!(connects(&daemon, LOCAL, port));
    assert!(!connects(&daemon, OTHER_LOCAL, port));
    assert_eq!(pins_in(&links_dir), links, "nothing attached twice");
    report(
        "kernel",
        "The pin directory of a running daemon removed with `rm -rf` (maps and links), then the daemon stopped and started again.",
        "The gate kept dropping a source outside the allowlist throughout (the daemon holds its links); every pin was put back by the daemon, logged, counted and shown in `status`; the next daemon adopted them.",
        &serde_json::json!({
            "pins_restored": restored,
            "restored_within_ms": restored_after.as_millis(),
        }),
    );
}

#[test]
fn a_removed_cgroup_is_reported_and_attached_again_once_made_again() {
    if !require_privileges!() {
        return;
    }
    let daemon = Daemon::start(41_910, 41_919);
    let port = 41_913;
    let server = allow_local_only(&daemon, port);
    assert!(!connects(&daemon, OTHER_LOCAL, port));
    drop(server);

    let cgroup = daemon.cgroup.path().to_owned();
    fs::remove_dir(&cgroup).expect("remove the daemon's (empty) cgroup");
    let reported = eventually(CONNECT_WITHIN, || {
        metric(&daemon, "portgate_gate_detached") >= 1.0
    });
    assert!(
        reported,
        "a metric says the gate is detached:\n{}",
        daemon.log()
    );
    let status = daemon.cli_ok(None, &["status"]);
    assert!(
        status.contains("not attached to cgroup"),
        "status says so: {status}"
    );
    assert!(daemon.log().contains("was removed"), "{}", daemon.log());

    let made_again = Instant::now();
    fs::create_dir(&cgroup).expect("make the cgroup again");
    let reattached = eventually(CONNECT_WITHIN, || {
        metric(&daemon, "portgate_gate_reattached_total") >= 1.0
            && metric(&daemon, "portgate_gate_detached") == 0.0
    });
    let reattached_after = made_again.elapsed();
    assert!(reattached, "attached again:\n{}", daemon.log());
    let _server = daemon
        .ns
        .run(|| EchoServer::serve(listen_in(&daemon.cgroup, loopback(port))));
    assert!(
        connects(&daemon, LOCAL, port),
        "the allowed source connects"
    );
    assert!(
        !connects(&daemon, OTHER_LOCAL, port),
        "a server in the cgroup made again is behind the gate"
    );
    let status = daemon.cli_ok(None, &["status"]);
    assert!(!status.contains("not attached to cgroup"), "{status}");
    report(
        "kernel",
        "The cgroup the daemon's gate is attached to removed under it, then made again at the same path.",
        "The daemon reported the gate detached (log, `portgate_gate_detached`, `status`) and attached it again to the new cgroup by itself; a server there was behind the allowlist again.",
        &serde_json::json!({ "reattached_within_ms": reattached_after.as_millis() }),
    );
}

#[test]
fn a_full_grant_map_refuses_the_grant_and_admits_no_one_without_one() {
    if !require_privileges!() {
        return;
    }
    let port = MIN_PORT + 35;
    let id = PortId::new(port, Protocol::Tcp);
    let mut fixture = LoopbackPort::new(
        port,
        &PortPolicy {
            access: PortAccessControl {
                require_authentication: true,
                ..PortAccessControl::default()
            },
            ..PortPolicy::default()
        },
    );
    let expires = monotonic_now_ns() + 600_000_000_000;
    fixture
        .gate
        .add_grant(id, OTHER_LOCAL, expires)
        .expect("a grant before the map is full");
    // The rest of the map: addresses in 10.0.0.0/8, one grant each.
    let mut filled = 1_u32;
    let full = loop {
        let addr = std::net::Ipv4Addr::from(0x0a00_0000 + filled).into();
        match fixture.gate.add_grant(id, addr, expires) {
            Ok(()) => filled += 1,
            Err(err) => break err,
        }
        assert!(filled <= capacity::GRANTS, "more grants than the map holds");
    };
    assert!(
        matches!(full, GateError::MapFull { .. }),
        "a full map is its own error: {full}"
    );
    assert_eq!(filled, capacity::GRANTS, "the map holds its capacity");
    let refused = fixture.gate.add_grant(id, LOCAL, expires);
    assert!(
        matches!(refused, Err(GateError::MapFull { .. })),
        "one more grant is refused as a full map: {refused:?}"
    );
    let manager_error = portgate::manager::PortError::from(refused.expect_err("refused"));
    assert_eq!(manager_error.http_status(), 507, "{manager_error}");
    assert!(
        fixture.connect(LOCAL, REFUSED_WITHIN).is_err(),
        "the source whose grant was refused is dropped: the gate fails closed"
    );
    let mut granted = fixture
        .connect(OTHER_LOCAL, CONNECT_WITHIN)
        .expect("a grant made before the map filled still admits");
    echo(&mut granted, b"granted").expect("echo");
    report(
        "kernel",
        "The kernel's grant map filled to its capacity, then one more grant asked for.",
        "The grant was refused as a full map (HTTP 507 from the manager); the source without it stayed dropped (auth_required) and the grants already made kept admitting.",
        &serde_json::json!({ "grants": filled }),
    );
}
