//! The daemon on the real kernel: its API's authorization by peer uid, bad input refused
//! without a trace, durability across `kill -9`, and the whole lifecycle through the CLI.
//!
//! Each test runs `portgate daemon` as a child process inside its own network namespace,
//! attached to its own child cgroup, pinning under its own bpffs directory, with its state,
//! socket and audit log in its own temporary directory. Needs: root (BPF, cgroups, netns),
//! iproute2, and the `portgate` binary built next to the test binary (`cargo xtask test`
//! builds it; `PORTGATE_BIN` overrides the path).

use std::{
    collections::BTreeSet,
    fs,
    io::{Read as _, Write as _},
    net::IpAddr,
    os::unix::net::UnixStream,
    process::Output,
    thread,
    time::{Duration, Instant},
};

use portgate::{
    api::{AllocRequest, AllocationView, ErrorBody, EventView},
    client::{Client, ClientError},
    gate::Gate,
    host::port_ranges::PortRanges,
    model::{AccessChange, PortId, PortReport, PortStatus, Protocol},
};
use portgate_tests::{
    common::{
        CONNECT_WITHIN, EchoServer, LOCAL, OTHER_LOCAL, REFUSED_WITHIN, allowlist, connect_from,
        echo, eventually, listen_in, loopback, require_privileges,
    },
    daemon::Daemon,
};

/// uids of two ordinary local users (no passwd entry needed: the kernel reports the uid).
const USER_A: u32 = 65_534;
const USER_B: u32 = 65_533;

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn api_authorizes_by_peer_uid() {
    if !require_privileges("api_authorizes_by_peer_uid") {
        return;
    }
    // "adm" exists on Debian-like systems; its gid makes a caller an admin.
    let adm = nix::unistd::Group::from_name("adm")
        .expect("group database")
        .expect("group adm");
    let daemon = Daemon::start_with(41_000, 41_049, "adm");
    // Any local user may allocate; the allocation records its uid.
    let mine: AllocationView = daemon.cli_json(Some(USER_A), &["alloc", "--owner", "a-web"]);
    let port = mine.id.port.to_string();
    assert_eq!(mine.owner_uid, Some(USER_A));
    // Another user may read it, but not change or release it.
    daemon.cli_ok(Some(USER_B), &["show", &port]);
    for args in [
        vec!["release", port.as_str()],
        vec!["drain", port.as_str()],
        vec!["access", port.as_str(), "--max-conns", "1"],
        vec!["grant", port.as_str(), "192.0.2.1"],
    ] {
        let output = daemon.cli(Some(USER_B), &args);
        assert!(
            !output.status.success(),
            "{args:?} as another user succeeded"
        );
        assert!(
            stderr(&output).contains("access denied"),
            "{args:?}: {}",
            stderr(&output)
        );
    }
    assert_eq!(
        daemon.allocations()[&mine.id].status,
        PortStatus::Active,
        "a refused change changed nothing"
    );
    // Its maker may change it; root may release anyone's.
    daemon.cli_ok(Some(USER_A), &["access", &port, "--max-conns", "3"]);
    let theirs: AllocationView = daemon.cli_json(Some(USER_B), &["alloc", "--owner", "b-db"]);
    let their_port = theirs.id.port.to_string();
    let output = daemon.cli(Some(USER_A), &["release", &their_port]);
    assert!(!output.status.success());
    daemon.cli_ok(None, &["release", &their_port]);
    // A member of the admin group (here by its primary gid) may change anyone's.
    let admin = daemon.cli_as(
        Some((USER_B, adm.gid.as_raw())),
        &["access", &port, "--max-conns", "4"],
    );
    assert!(admin.status.success(), "{}", stderr(&admin));
    daemon.cli_ok(Some(USER_A), &["release", &port]);

    // Every request is in the audit log with the caller's uid and its outcome.
    let records = daemon.audit();
    let has = |uid: u32, action: &str, result: &str| {
        records.iter().any(|record| {
            record["uid"].as_u64() == Some(u64::from(uid))
                && record["action"] == action
                && record["result"] == result
        })
    };
    assert!(has(USER_A, "alloc", "ok"), "{records:?}");
    assert!(has(USER_B, "release", "access_denied"), "{records:?}");
    assert!(has(0, "release", "ok"), "{records:?}");
    assert!(
        records
            .iter()
            .all(|record| record["time"].is_string() && record["pid"].is_u64())
    );
}

#[test]
fn users_name_only_cgroups_delegated_to_them_as_owners() {
    if !require_privileges("users_name_only_cgroups_delegated_to_them_as_owners") {
        return;
    }
    let daemon = Daemon::start(41_050, 41_099);
    // A user may name only a cgroup delegated to it as the owner, and never learns
    // whether another path exists.
    let root_cgroup = daemon.cgroup.path().display().to_string();
    for path in [root_cgroup.as_str(), "/no/such/cgroup"] {
        let output = daemon.cli(Some(USER_A), &["alloc", "--owner", "x", "--cgroup", path]);
        assert!(!output.status.success());
        assert!(
            stderr(&output).contains(&format!("{path} is not a cgroup delegated to uid")),
            "{}",
            stderr(&output)
        );
    }
    let delegated = daemon.cgroup.child("delegated");
    nix::unistd::chown(
        delegated.path(),
        Some(nix::unistd::Uid::from_raw(USER_A)),
        None,
    )
    .expect("delegate the cgroup");
    let owned: AllocationView = daemon.cli_json(
        Some(USER_A),
        &[
            "alloc",
            "--owner",
            "x",
            "--cgroup",
            &delegated.path().display().to_string(),
        ],
    );
    assert_eq!(owned.cgroup.as_deref(), Some(delegated.path()));
    daemon.cli_ok(Some(USER_A), &["release", &owned.id.port.to_string()]);
    let relative = AllocRequest {
        owner: "x".to_owned(),
        cgroup: Some("relative/path".into()),
        ..AllocRequest::default()
    };
    let refused = daemon
        .api(|client| client.alloc(&relative))
        .expect_err("a relative cgroup path is refused");
    assert!(
        refused.to_string().contains("not an absolute path"),
        "{refused}"
    );
}

#[test]
#[expect(clippy::too_many_lines, reason = "a table of cases, then one check")]
fn bad_requests_are_refused_and_change_nothing() {
    if !require_privileges("bad_requests_are_refused_and_change_nothing") {
        return;
    }
    let daemon = Daemon::start(41_100, 41_149);
    let too_many: Vec<String> = (0..10_001)
        .map(|n| format!("10.{}.{}.0/24", n / 256, n % 256))
        .collect();
    let oversized_allowlist =
        serde_json::to_vec(&serde_json::json!({ "owner": "x", "allow": too_many })).unwrap();
    let huge_body = vec![b' '; 2 * 1024 * 1024];
    let cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        ("POST", "/v1/ports", b"{not json".to_vec(), 400, "bad_json"),
        (
            "POST",
            "/v1/ports",
            br#"{"owner":"x","colour":"red"}"#.to_vec(),
            400,
            "bad_json",
        ),
        (
            "POST",
            "/v1/ports",
            br#"{"owner":"x","port":70000}"#.to_vec(),
            400,
            "bad_json",
        ),
        (
            "POST",
            "/v1/ports",
            br#"{"owner":"x","port":80}"#.to_vec(),
            400,
            "invalid_port_request",
        ),
        (
            "POST",
            "/v1/ports",
            br#"{"owner":""}"#.to_vec(),
            400,
            "invalid_port_request",
        ),
        (
            "POST",
            "/v1/ports",
            br#"{"owner":"x","allow":["10.0.0.0/33"]}"#.to_vec(),
            400,
            "bad_json",
        ),
        (
            "POST",
            "/v1/ports",
            br#"{"owner":"x","ttl":"soon"}"#.to_vec(),
            400,
            "bad_json",
        ),
        (
            "POST",
            "/v1/ports",
            oversized_allowlist,
            400,
            "policy_violation",
        ),
        ("POST", "/v1/ports", huge_body, 413, "bad_body"),
        ("GET", "/v1/ports/abc", Vec::new(), 400, "invalid_port"),
        ("GET", "/v1/ports/70000", Vec::new(), 400, "invalid_port"),
        ("GET", "/v1/ports/41120", Vec::new(), 404, "not_allocated"),
        (
            "DELETE",
            "/v1/ports/41120",
            Vec::new(),
            404,
            "not_allocated",
        ),
        (
            "DELETE",
            "/v1/ports/22",
            Vec::new(),
            400,
            "invalid_port_request",
        ),
        (
            "DELETE",
            "/v1/ports/41120?proto=sctp",
            Vec::new(),
            400,
            "invalid_proto",
        ),
        (
            "GET",
            "/v1/ports/41120/check?ip=not-an-ip",
            Vec::new(),
            400,
            "invalid_ip",
        ),
        ("GET", "/v1/nothing-here", Vec::new(), 404, "unknown_route"),
        ("PUT", "/v1/ports", Vec::new(), 405, "method_not_allowed"),
    ];
    for (method, path, body, status, code) in cases {
        let (got, answer) = send_raw(&daemon, method, path, &body);
        assert_eq!(got, status, "{method} {path}: {answer:?}");
        assert_eq!(answer.error.code, code, "{method} {path}: {answer:?}");
        let message = &answer.error.message;
        assert!(
            !message.is_empty() && !message.contains('\n'),
            "{method} {path}: {answer:?}"
        );
    }
    // Changes to an allocated port with bad bodies leave it as it was.
    let kept = AllocRequest {
        owner: "kept".to_owned(),
        allow: vec!["192.0.2.0/24".parse().expect("prefix")],
        ..AllocRequest::default()
    };
    let held = daemon
        .api(|client| client.alloc(&kept))
        .expect("allocate a port");
    let (status, answer) = send_raw(
        &daemon,
        "PATCH",
        &format!("/v1/ports/{}/access", held.id.port),
        br#"{"allow":["192.0.2.0/24"],"max_connections":"many"}"#,
    );
    assert_eq!(status, 400, "{answer:?}");
    let oversized = AccessChange {
        allow: (0..10_000)
            .map(|n| format!("10.{}.{}.0/24", n / 256, n % 256).parse().unwrap())
            .collect(),
        ..AccessChange::default()
    };
    let refused = daemon.api(|client| client.access(held.id, &oversized));
    let Err(ClientError::Daemon { status, code, .. }) = refused else {
        panic!("an oversized allowlist was not refused: {refused:?}");
    };
    assert_eq!((status, code.as_str()), (400, "policy_violation"));
    let absent = AccessChange {
        remove: allowlist(&["198.51.100.0/24"]),
        ..AccessChange::default()
    };
    let refused = daemon.api(|client| client.access(held.id, &absent));
    let Err(ClientError::Daemon {
        status, message, ..
    }) = refused
    else {
        panic!("removing an absent prefix was not refused: {refused:?}");
    };
    assert_eq!(status, 400, "{message}");
    assert!(message.contains("not in the allowlist"), "{message}");
    let shown = daemon
        .api(|client| client.show(held.id))
        .expect("show the port");
    assert_eq!(shown.access.allowed_ips, allowlist(&["192.0.2.0/24"]));
    assert_eq!(shown.access.max_connections, 0);
    // Exactly one allocation, in the store and in the kernel.
    assert_eq!(daemon.allocations().len(), 1);
    assert_eq!(
        daemon.kernel_policies(),
        BTreeSet::from([PortId::new(held.id.port, Protocol::Tcp)])
    );
}

/// Sends one request, written by hand, over the daemon's socket and reads the error it
/// answers: (HTTP status, error body). The one place that does not use the typed client:
/// what is wrong with these requests is in their bytes.
fn send_raw(daemon: &Daemon, method: &str, path: &str, body: &[u8]) -> (u16, ErrorBody) {
    let mut stream = UnixStream::connect(&daemon.socket).expect("connect to the daemon");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: portgate\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .expect("send the request head");
    // The daemon may answer (413) before the whole body is sent.
    let _sent = stream.write_all(body);
    let mut answer = Vec::new();
    let _read = stream.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    let (head, error) = answer
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("{method} {path}: not an HTTP answer: {answer:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("{method} {path}: no HTTP status in {head:?}"));
    let error = serde_json::from_str(error)
        .unwrap_or_else(|err| panic!("{method} {path}: not an error body ({err}): {answer:?}"));
    (status, error)
}

#[test]
fn kill_9_during_concurrent_allocations_loses_nothing_and_doubles_nothing() {
    const CLIENTS: usize = 8;
    if !require_privileges("kill_9_during_concurrent_allocations_loses_nothing_and_doubles_nothing")
    {
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
    if !require_privileges("a_second_daemon_on_the_same_pins_is_refused_and_changes_nothing") {
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
    if !require_privileges(
        "a_configuration_that_drops_an_allocation_is_refused_before_the_kernel_is_touched",
    ) {
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

/// Other programs' reserved ports survive the daemon's install and its uninstall, however
/// long the list: the kernel answers a read of `ip_local_reserved_ports` that does not
/// start at offset 0 with EOF, so a value read in pieces came back cut after 32 bytes.
#[test]
fn other_programs_reserved_ports_survive_install_and_uninstall() {
    const RESERVED: &str = portgate::paths::IP_LOCAL_RESERVED_PORTS;
    if !require_privileges("other_programs_reserved_ports_survive_install_and_uninstall") {
        return;
    }
    let mut daemon = Daemon::start(41_100, 41_149);
    daemon.stop();
    daemon.uninstall();
    // The case reported (41 bytes) and a list longer than a page: every seventh port.
    let long: Vec<String> = (0..1_200_u16)
        .map(|n| (1_024 + 7 * n).to_string())
        .collect();
    let long = long.join(",");
    assert!(long.len() > 4_096);
    for others in ["10000-10099,11000-11099,12000,45000-45099", long.as_str()] {
        daemon.ns.set_sysctl(RESERVED, &format!("{others}\n"));
        let before = daemon.ns.sysctl(RESERVED);
        assert_eq!(before.trim_end(), others, "the kernel's own spelling");
        daemon.spawn();
        let during: PortRanges = daemon.ns.sysctl(RESERVED).trim_end().parse().unwrap();
        let others_set: PortRanges = others.parse().unwrap();
        let managed: PortRanges = std::iter::once(41_100..=41_149).collect();
        assert_eq!(
            during,
            others_set.union(&managed),
            "installed over {others:?}"
        );
        assert!(
            daemon.stop(),
            "the daemon stopped on SIGTERM:\n{}",
            daemon.log()
        );
        daemon.uninstall();
        assert_eq!(
            daemon.ns.sysctl(RESERVED),
            before,
            "uninstalled over {others:?}"
        );
    }
}

#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, told in order")]
fn end_to_end_through_the_cli() {
    if !require_privileges("end_to_end_through_the_cli") {
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
            r#"portgate_port_accepted_total{{port="{port}",proto="tcp"}} 2"#
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
