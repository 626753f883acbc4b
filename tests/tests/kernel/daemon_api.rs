//! The daemon's API: authorization by the caller's uid (through the CLI run as other
//! users) with its audit log, cgroups a user may name, bad requests refused with a 4xx
//! and no change to the store or the kernel, and the names `--netns` takes.

use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    os::unix::net::UnixStream,
    time::Duration,
};

use portgate::{
    api::{AllocRequest, AllocationView, ErrorBody},
    client::ClientError,
    model::{AccessChange, PortId, PortStatus, Protocol},
};
use portgate_tests::{
    common::{NetNs, allowlist},
    daemon::{Daemon, stderr},
    require_privileges,
};

/// uids of two ordinary local users (no passwd entry needed: the kernel reports the uid).
const USER_A: u32 = 65_534;
const USER_B: u32 = 65_533;

#[test]
fn api_authorizes_by_peer_uid() {
    if !require_privileges!() {
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
    if !require_privileges!() {
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
    if !require_privileges!() {
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
        // A query that selects nothing is still checked.
        (
            "GET",
            "/v1/stats?proto=sctp",
            Vec::new(),
            400,
            "invalid_proto",
        ),
        (
            "GET",
            "/v1/stats?netns=web",
            Vec::new(),
            400,
            "invalid_netns",
        ),
        ("GET", "/v1/events?follow=yes", Vec::new(), 400, "bad_query"),
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

#[test]
fn a_port_of_another_namespace_is_named_by_label_cookie_or_path() {
    if !require_privileges!() {
        return;
    }
    let daemon = Daemon::start(46_200, 46_209);
    let other = NetNs::new();
    let path = format!("/run/netns/{}", other.name());
    let host: AllocationView = daemon.cli_json(None, &["alloc", "--owner", "on-host"]);
    let inside: AllocationView = daemon.cli_json(
        None,
        &[
            "alloc",
            "--owner",
            "inside",
            "--netns",
            &path,
            "--publish",
            "auto:80",
        ],
    );
    assert_eq!(inside.id.port, 80);
    assert!(!inside.id.netns.is_host());
    assert_eq!(inside.netns_label.as_deref(), Some(other.name()));
    let published = inside.published.expect("a host port");

    // Its label, its cookie and its path name it.
    let cookie = inside.id.netns.0.to_string();
    for name in [other.name(), cookie.as_str(), path.as_str()] {
        let shown: AllocationView = daemon.cli_json(None, &["show", "80", "--netns", name]);
        assert_eq!(shown.id, inside.id, "--netns {name}");
    }
    // `host` is the daemon's own namespace.
    let port = host.id.port.to_string();
    let shown: AllocationView = daemon.cli_json(None, &["show", &port, "--netns", "host"]);
    assert_eq!(shown.id, host.id);
    // A name nothing has says where to look; a user may not name a path.
    let unknown = daemon.cli(None, &["show", "80", "--netns", "no-such-ns"]);
    assert!(!unknown.status.success());
    assert!(
        stderr(&unknown).contains("NETNS column of `portgate list`"),
        "{}",
        stderr(&unknown)
    );
    let by_user = daemon.cli(Some(USER_A), &["show", "80", "--netns", &path]);
    assert!(
        stderr(&by_user).contains("only an admin may name a namespace by path"),
        "{}",
        stderr(&by_user)
    );
    daemon.cli_ok(Some(USER_A), &["show", "80", "--netns", other.name()]);

    // The views name it: a NETNS column, the metrics' netns label.
    let list = daemon.cli_ok(None, &["list"]);
    let header = list.lines().next().unwrap_or_default();
    assert!(header.starts_with("PORT   PROTO  NETNS"), "{list}");
    assert!(
        list.lines().any(|line| line
            .split_whitespace()
            .take(3)
            .eq(["80", "tcp", other.name()])),
        "{list}"
    );
    let pins = daemon.pins.path().display().to_string();
    let maps = daemon.cli_ok(None, &["maps", "--pin-dir", &pins]);
    assert!(
        maps.lines().any(|line| line.split_whitespace().take(4).eq([
            "80",
            "tcp",
            other.name(),
            &published.to_string()
        ])),
        "{maps}"
    );
    let line = format!(
        "published {published}/tcp (host) -> 80/tcp in netns {}",
        other.name()
    );
    assert!(maps.lines().any(|shown| shown == line), "{line} in {maps}");
    let metrics = daemon
        .api(portgate::client::Client::metrics)
        .expect("GET /metrics");
    let series = format!(
        r#"portgate_port_accepted_total{{port="80",proto="tcp",netns="{}"}} 0"#,
        other.name()
    );
    assert!(metrics.contains(&series), "{series} in {metrics}");

    daemon.cli_ok(None, &["release", "80", "--netns", other.name()]);
    // With no connection it goes on to Closed at the lifecycle's next tick (200 ms), which
    // a loaded machine may reach before the next request.
    let status = daemon.allocations()[&inside.id].status;
    assert!(
        matches!(status, PortStatus::Draining | PortStatus::Closed),
        "released: {status:?}"
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
