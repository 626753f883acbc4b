//! A port's whole life, end to end through the CLI: allocated with an allowlist and a
//! limit, allowed, denied and limited connections, `check`, `stats`, `/metrics` and
//! `events`, drained, released, closed, quarantined and allocated again; SIGTERM leaves
//! enforcement in place.

use std::{collections::BTreeSet, net::IpAddr, time::Duration};

use portgate::{
    api::{AllocationView, EventView},
    client::Client,
    model::{PortId, PortReport, PortStatus, Protocol},
};
use portgate_tests::{
    common::{
        CONNECT_WITHIN, EchoServer, LOCAL, OTHER_LOCAL, REFUSED_WITHIN, allowlist, connect_from,
        echo, eventually, listen_in, loopback,
    },
    daemon::{Daemon, stderr},
    require_privileges,
};

#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, told in order")]
fn end_to_end_through_the_cli() {
    if !require_privileges!() {
        return;
    }
    let daemon = Daemon::start(42_000, 42_009);
    let held: AllocationView = daemon.cli_json(
        None,
        &[
            "alloc",
            "--owner",
            "e2e",
            "--allow",
            "127.0.0.1",
            "--max-conns",
            "2",
        ],
    );
    let port = held.id.port;
    let port_arg = port.to_string();
    assert_eq!(held.access.allowed_ips, allowlist(&["127.0.0.1/32"]));
    let addr = loopback(port);
    let server = daemon
        .ns
        .run(|| EchoServer::serve(listen_in(&daemon.cgroup, addr)));
    let connect =
        |from: IpAddr, within: Duration| daemon.ns.run(|| connect_from(from, addr, within));

    // Allowed, up to the limit.
    let mut first = connect(LOCAL, CONNECT_WITHIN).expect("an allowed source gets in");
    let mut second = connect(LOCAL, CONNECT_WITHIN).expect("a second connection gets in");
    echo(&mut first, b"one").expect("echo");
    echo(&mut second, b"two").expect("echo");
    assert!(
        eventually(Duration::from_secs(3), || daemon
            .cli_json::<AllocationView>(None, &["show", &port_arg])
            .connections
            == 2),
        "two connections shown"
    );
    // A renewal's answer counts them too (it said 0 once).
    let renewed: AllocationView = daemon.cli_json(None, &["renew", &port_arg, "--ttl", "10m"]);
    assert_eq!(renewed.connections, 2, "the renewal's answer: {renewed:?}");
    assert!(
        connect(LOCAL, REFUSED_WITHIN).is_err(),
        "a third is over the limit"
    );
    assert!(
        connect(OTHER_LOCAL, REFUSED_WITHIN).is_err(),
        "a source outside the allowlist"
    );

    // `check` says the same as the kernel: exit 1 with the reason.
    let denied = daemon.cli(None, &["check", &port_arg, "127.0.0.2"]);
    assert_eq!(denied.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&denied.stdout).contains("not_allowed"),
        "{denied:?}"
    );
    let limited = daemon.cli(None, &["check", &port_arg, "127.0.0.1"]);
    assert_eq!(limited.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&limited.stdout).contains("conn_limit"),
        "{limited:?}"
    );

    // Counters, through the daemon (JSON keys as `portgate maps`) and Prometheus.
    let stats: Vec<PortReport> = daemon.cli_json(None, &["stats", &port_arg]);
    let stats = &stats[0];
    assert_eq!(stats.id.port, port);
    assert_eq!(stats.counters.accepted, 2, "{stats:?}");
    assert_eq!(stats.counters.active, 2, "{stats:?}");
    assert!(stats.counters.dropped.not_allowed >= 1, "{stats:?}");
    assert!(stats.counters.dropped.conn_limit >= 1, "{stats:?}");
    let metrics = daemon.api(Client::metrics).expect("GET /metrics");
    assert!(
        metrics.contains(&format!(
            r#"portgate_port_accepted_total{{port="{port}",proto="tcp",netns="host"}} 2"#
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("portgate_api_request_duration_seconds"),
        "{metrics}"
    );
    let events: Vec<EventView> = daemon
        .cli_ok(None, &["-o", "json", "events"])
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON event line"))
        .collect();
    assert!(
        events
            .iter()
            .any(|event| event.id.port == port && event.reason == "not_allowed"),
        "{events:?}"
    );

    // Drain: established connections go on, new ones are refused.
    daemon.cli_ok(None, &["drain", &port_arg]);
    assert_eq!(
        daemon
            .cli_json::<AllocationView>(None, &["show", &port_arg])
            .status,
        PortStatus::Draining
    );
    echo(&mut first, b"still here").expect("an established connection survives a drain");
    assert!(
        connect(LOCAL, REFUSED_WITHIN).is_err(),
        "no new connection while draining"
    );

    // Release (a no-op on a draining port: it is released already); Closed once the last
    // connection ends; quarantine (3 s) refuses it to everyone; then Available.
    let released: AllocationView = daemon.cli_json(None, &["release", &port_arg]);
    assert_eq!(released.status, PortStatus::Draining);
    drop(first);
    drop(second);
    assert!(
        eventually(Duration::from_secs(5), || daemon
            .allocations()
            .get(&held.id)
            .is_some_and(|view| view.status == PortStatus::Closed)),
        "the port did not close when its connections ended: {:?}",
        daemon.allocations()
    );
    let quarantined = daemon.cli(None, &["alloc", "--owner", "early", "--port", &port_arg]);
    assert!(!quarantined.status.success());
    assert!(
        stderr(&quarantined).contains("quarantine"),
        "{}",
        stderr(&quarantined)
    );
    assert!(
        eventually(Duration::from_secs(10), || !daemon
            .allocations()
            .contains_key(&held.id)),
        "the port was not freed after quarantine: {:?}",
        daemon.allocations()
    );
    drop(server);
    let again: AllocationView =
        daemon.cli_json(None, &["alloc", "--owner", "next", "--port", &port_arg]);
    assert_eq!(again.id.port, port);
    assert_eq!(again.owner, "next");
    assert_eq!(
        daemon.kernel_policies(),
        BTreeSet::from([PortId::new(port, Protocol::Tcp)])
    );

    // SIGTERM leaves enforcement in place.
    let mut daemon = daemon;
    assert!(
        daemon.stop(),
        "the daemon stops cleanly on SIGTERM:\n{}",
        daemon.log()
    );
    assert_eq!(
        daemon.kernel_policies(),
        BTreeSet::from([PortId::new(port, Protocol::Tcp)])
    );
}
