//! The knock (issue #13): a real daemon in a test namespace with its knock listener on, a
//! port that requires authentication, a client key made through the CLI; a client is
//! dropped until it knocks, its grant is listed with its key and can be withdrawn alone,
//! the same datagram is refused the second time, and a revoked key's grant is withdrawn.

use std::{
    net::{SocketAddr, UdpSocket},
    time::Duration,
};

use portgate::{
    knock::{self, GrantFor, KeyFile, KnockRequest},
    model::Protocol,
};
use portgate_tests::{
    common::{
        CONNECT_WITHIN, EchoServer, LOCAL, OTHER_LOCAL, REFUSED_WITHIN, connect_from, eventually,
        listen_in, loopback,
    },
    daemon::Daemon,
    require_privileges,
    stress::{report, size},
};

/// The knock listener's port, in the daemon's namespace.
pub(crate) const LISTENER: u16 = 62_201;

#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, told in order")]
fn a_knock_opens_a_port_once_and_a_revoked_key_closes_it() {
    if !require_privileges!() {
        return;
    }
    let (daemon, port, _server) = knocking_daemon(41_700);
    let connect = |within| {
        daemon
            .ns
            .run(|| connect_from(LOCAL, loopback(port), within))
    };
    assert!(connect(REFUSED_WITHIN).is_err(), "no grant: dropped");

    let key_file = daemon.cli_ok(
        None,
        &[
            "key",
            "add",
            "client-1",
            "--port",
            &port.to_string(),
            "--max-ttl",
            "1m",
        ],
    );
    let key_file = KeyFile::parse(&key_file).expect("the CLI prints a key file");
    assert_eq!(key_file.name, "client-1");
    let listener = SocketAddr::new(LOCAL, LISTENER);
    let request = KnockRequest {
        protocol: Protocol::Tcp,
        port,
        ttl: Duration::from_mins(10),
        grant_for: GrantFor::ThisHost,
    };
    let sent = daemon
        .ns
        .run(|| knock::knock(listener, &key_file, &request))
        .expect("knock");
    assert!(
        eventually(CONNECT_WITHIN, || connect(REFUSED_WITHIN).is_ok()),
        "after the knock the client gets in:\n{}",
        daemon.log()
    );

    // Grants are objects: listed with their issuer, withdrawn one by one.
    let listed = daemon.cli_ok(None, &["grants", &port.to_string()]);
    assert!(
        listed.contains("127.0.0.1") && listed.contains("key client-1"),
        "{listed}"
    );
    daemon.cli_ok(None, &["revoke", &port.to_string(), "127.0.0.1"]);
    assert!(connect(REFUSED_WITHIN).is_err(), "revoked: dropped again");
    daemon
        .ns
        .run(|| knock::knock(listener, &key_file, &request))
        .expect("knock");
    assert!(
        eventually(CONNECT_WITHIN, || connect(REFUSED_WITHIN).is_ok()),
        "a new knock (a new nonce) opens it again"
    );

    // The same datagram again: refused, and audited as a replay.
    let replay = knock::encode(&sent, &key_file.key).expect("encode");
    daemon.ns.run(|| {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
        socket.send_to(&replay, listener).expect("send");
    });
    let audited = |result: &str| {
        daemon
            .audit()
            .iter()
            .filter(|record| record["action"] == "knock" && record["result"] == result)
            .count()
    };
    assert!(
        eventually(CONNECT_WITHIN, || audited("replayed") == 1),
        "the replay is audited: {:?}",
        daemon.audit()
    );
    assert_eq!(audited("ok"), 2, "two knocks accepted");

    // A knock with another key's secret under this name: a bad signature.
    let forged = KeyFile {
        name: "client-1".to_owned(),
        key: knock::Key([9; knock::KEY_BYTES]),
        any_source: false,
    };
    daemon
        .ns
        .run(|| knock::knock(listener, &forged, &request))
        .expect("knock");
    assert!(eventually(CONNECT_WITHIN, || audited("bad_signature") == 1));

    // Counted by reason, as the metrics show them.
    let metrics = daemon
        .api(portgate::client::Client::metrics)
        .expect("metrics");
    for (result, reason, count) in [
        ("accepted", "none", 2),
        ("refused", "replayed", 1),
        ("refused", "bad_signature", 1),
    ] {
        let line =
            format!("portgate_auth_total{{result=\"{result}\",reason=\"{reason}\"}} {count}");
        assert!(metrics.contains(&line), "{line} in:\n{metrics}");
    }

    // Revoked: the grant goes with the key.
    let listed = daemon.cli_ok(None, &["key", "list"]);
    assert!(listed.contains("client-1"), "{listed}");
    assert!(
        !listed.contains(&hex_of(&key_file)),
        "a secret is never listed"
    );
    daemon.cli_ok(None, &["key", "revoke", "client-1"]);
    assert!(
        connect(REFUSED_WITHIN).is_err(),
        "the revoked key's grant is withdrawn"
    );
    daemon
        .ns
        .run(|| knock::knock(listener, &key_file, &request))
        .expect("knock");
    assert!(eventually(CONNECT_WITHIN, || audited("unknown_key") == 1));
    assert!(
        connect(REFUSED_WITHIN).is_err(),
        "a revoked key opens nothing"
    );
}

/// The hexadecimal key of a key file, as it would show if listed.
fn hex_of(key_file: &KeyFile) -> String {
    key_file
        .to_text()
        .lines()
        .find_map(|line| line.strip_prefix("key = \""))
        .map(|rest| rest.trim_end_matches('"').to_owned())
        .unwrap_or_default()
}

#[test]
fn keys_and_live_grants_survive_a_restart_and_a_flood_of_bad_knocks_leaves_the_api_answering() {
    if !require_privileges!() {
        return;
    }
    let bad = size(100_000, 1_000_000);
    let (mut daemon, port, _server) = knocking_daemon(41_710);
    let key_file = KeyFile::parse(&daemon.cli_ok(
        None,
        &["key", "add", "client-2", "--port", &port.to_string()],
    ))
    .expect("a key file");
    let listener = SocketAddr::new(LOCAL, LISTENER);
    let request = KnockRequest {
        protocol: Protocol::Tcp,
        port,
        ttl: Duration::from_mins(5),
        grant_for: GrantFor::ThisHost,
    };
    daemon
        .ns
        .run(|| knock::knock(listener, &key_file, &request))
        .expect("knock");
    assert!(eventually(CONNECT_WITHIN, || connect_to(
        &daemon,
        port,
        REFUSED_WITHIN
    )
    .is_ok()));

    // A restart keeps the key (in the store) and the grant (in the pinned kernel map).
    assert!(daemon.stop());
    daemon.spawn();
    assert!(
        connect_to(&daemon, port, CONNECT_WITHIN).is_ok(),
        "the grant outlived the daemon"
    );
    let listed = daemon.cli_ok(None, &["key", "list"]);
    assert!(listed.contains("client-2"), "{listed}");
    let grants = daemon.cli_ok(None, &["grants", &port.to_string()]);
    assert!(
        grants.contains("127.0.0.1") && grants.contains("key client-2"),
        "the grant and who issued it outlived the daemon: {grants}"
    );

    // A flood of bad datagrams from one source: rate-limited, and the API still answers.
    let sent = flood(&daemon, &[LOCAL], bad);
    // After the flood (its source's bucket refills in 2 s), a good knock still works.
    std::thread::sleep(Duration::from_secs(3));
    daemon.cli_ok(None, &["revoke", &port.to_string(), "127.0.0.1"]);
    assert!(connect_to(&daemon, port, REFUSED_WITHIN).is_err());
    daemon
        .ns
        .run(|| knock::knock(listener, &key_file, &request))
        .expect("knock");
    assert!(
        eventually(CONNECT_WITHIN, || connect_to(&daemon, port, REFUSED_WITHIN)
            .is_ok()),
        "a good knock gets through after the flood:\n{}",
        daemon.log()
    );
    let refused = daemon
        .audit()
        .iter()
        .filter(|record| record["action"] == "knock" && record["result"] != "ok")
        .count();
    println!("{sent} bad datagrams sent, {refused} refusals audited");
    assert!(
        refused > 0,
        "the flood's first datagrams were refused and audited"
    );
    assert!(
        refused < 1_000,
        "a flood's datagrams beyond its share are counted, not audited one by one: {refused}"
    );
    report(
        "api",
        "Bad knock datagrams (80 bytes of junk) flooded at the knock listener from one source.",
        "The API kept answering, the refusals beyond the source's share were counted rather than audited, and a good knock got through after the flood.",
        &serde_json::json!({ "sent": sent, "audited_one_by_one": refused }),
    );
}

/// A third loopback address, neither a knock's source nor the one it names.
const THIRD_LOCAL: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 3));

/// A daemon on ports `first..=first + 9` with its knock listener on, and the port
/// `first + 3`, which requires authentication, served by an echo server in the daemon's
/// cgroup: the daemon, the port and the server.
pub(crate) fn knocking_daemon(first: u16) -> (Daemon, u16, EchoServer) {
    let mut daemon = Daemon::start(first, first + 9);
    assert!(daemon.stop());
    daemon.set_config("listen", &format!("\"127.0.0.1:{LISTENER}\""));
    daemon.spawn();
    let port = first + 3;
    require_auth(&daemon, port);
    let server = daemon
        .ns
        .run(|| EchoServer::serve(listen_in(&daemon.cgroup, loopback(port))));
    (daemon, port, server)
}

/// Sends `each` bad datagrams from each of `sources` to the knock listener; returns how
/// many were sent, once the API has answered after them.
fn flood(daemon: &Daemon, sources: &[std::net::IpAddr], each: usize) -> usize {
    let listener = SocketAddr::new(LOCAL, LISTENER);
    let sent = daemon.ns.run(|| {
        let mut sent = 0;
        for &source in sources {
            let socket = UdpSocket::bind((source, 0)).expect("bind a flood source");
            for i in 0..each {
                let junk = [u8::try_from(i % 251).unwrap_or(0); 80];
                if socket.send_to(&junk, listener).is_ok() {
                    sent += 1;
                }
            }
        }
        sent
    });
    assert!(sent > 0, "no datagram sent");
    let status = daemon.cli_ok(None, &["status"]);
    assert!(
        status.contains("attachments"),
        "the API answers after the flood: {status}"
    );
    sent
}

/// Allocates `port`, requiring authentication.
fn require_auth(daemon: &Daemon, port: u16) {
    daemon.cli_ok(
        None,
        &[
            "alloc",
            "--owner",
            "db",
            "--port",
            &port.to_string(),
            "--require-auth",
        ],
    );
}

/// A TCP connection from loopback to `port` in the daemon's namespace, within `within`.
fn connect_to(
    daemon: &Daemon,
    port: u16,
    within: Duration,
) -> std::io::Result<std::net::TcpStream> {
    daemon
        .ns
        .run(|| connect_from(LOCAL, loopback(port), within))
}

#[test]
fn a_key_made_for_any_source_grants_the_address_its_knock_names_and_no_other_key_may() {
    if !require_privileges!() {
        return;
    }
    let (daemon, port, _server) = knocking_daemon(41_720);
    let from = |source| {
        daemon
            .ns
            .run(|| connect_from(source, loopback(port), REFUSED_WITHIN))
    };
    let key = |name: &str, extra: &[&str]| {
        let mut args = vec!["key", "add", name];
        args.extend_from_slice(extra);
        KeyFile::parse(&daemon.cli_ok(None, &args)).expect("a key file")
    };
    let natted = key("behind-nat", &["--any-source"]);
    let plain = key("plain", &[]);
    let listener = SocketAddr::new(LOCAL, LISTENER);
    let asking_for = |address| KnockRequest {
        protocol: Protocol::Tcp,
        port,
        ttl: Duration::from_mins(1),
        grant_for: GrantFor::Address(address),
    };
    // The knock comes from 127.0.0.1 and names 127.0.0.2: the grant is for 127.0.0.2.
    daemon
        .ns
        .run(|| knock::knock(listener, &natted, &asking_for(OTHER_LOCAL)))
        .expect("knock");
    assert!(
        eventually(CONNECT_WITHIN, || from(OTHER_LOCAL).is_ok()),
        "the named address gets in"
    );
    assert!(from(LOCAL).is_err(), "the knock's own source does not");
    // A key without --any-source may name no address but the datagram's own source.
    daemon
        .ns
        .run(|| knock::knock(listener, &plain, &asking_for(THIRD_LOCAL)))
        .expect("knock");
    assert!(eventually(CONNECT_WITHIN, || {
        daemon
            .audit()
            .iter()
            .any(|record| record["result"] == "address_not_allowed" && record["key"] == "plain")
    }));
    assert!(from(LOCAL).is_err(), "nothing granted to it");
}

#[test]
fn refused_knocks_are_audited_and_counted_by_reason() {
    if !require_privileges!() {
        return;
    }
    let (daemon, covered, _server) = knocking_daemon(41_730);
    let other = covered + 1;
    require_auth(&daemon, other);
    let key_file = KeyFile::parse(&daemon.cli_ok(
        None,
        &["key", "add", "client-3", "--port", &covered.to_string()],
    ))
    .expect("a key file");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let signed = |port: u16, timestamp: u64, nonce: u8| {
        let knock = knock::Knock {
            key_name: key_file.name.clone(),
            protocol: Protocol::Tcp,
            port,
            ttl: Duration::from_mins(1),
            timestamp,
            nonce: [nonce; 16],
            address: None,
        };
        knock::encode(&knock, &key_file.key).expect("encode")
    };
    let cases: [(&str, Vec<u8>); 5] = [
        ("stale", signed(covered, now - 3_600, 1)),
        ("future", signed(covered, now + 3_600, 2)),
        ("not_covered", signed(other, now, 3)),
        ("truncated", signed(covered, now, 4)[..40].to_vec()),
        ("oversized", vec![1; 200]),
    ];
    let listener = SocketAddr::new(LOCAL, LISTENER);
    daemon.ns.run(|| {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
        for (_, datagram) in &cases {
            socket.send_to(datagram, listener).expect("send");
        }
    });
    let audited = || -> Vec<String> {
        daemon
            .audit()
            .iter()
            .filter(|record| record["action"] == "knock")
            .filter_map(|record| record["result"].as_str().map(str::to_owned))
            .collect()
    };
    assert!(
        eventually(CONNECT_WITHIN, || audited().len() == cases.len()),
        "every knock audited: {:?}",
        audited()
    );
    let metrics = daemon
        .api(portgate::client::Client::metrics)
        .expect("metrics");
    for (reason, _) in &cases {
        assert!(
            audited().iter().any(|result| result == reason),
            "{reason}: {:?}",
            audited()
        );
        let line = format!("portgate_auth_total{{result=\"refused\",reason=\"{reason}\"}} 1");
        assert!(metrics.contains(&line), "{line} in:\n{metrics}");
    }
}

/// 100,000 bad datagrams from 1,000 loopback sources: most are held back by the
/// listener's and the sources' limits, the audit log holds every refusal looked at either
/// one by one or in a `not_audited` count (exactly what `portgate_auth_total` counted),
/// the API answers, and a good knock from another source gets through afterwards.
#[test]
fn a_flood_from_many_sources_is_held_to_the_listeners_rate_and_accounted_for() {
    if !require_privileges!() {
        return;
    }
    let (daemon, port, _server) = knocking_daemon(41_740);
    let key_file = KeyFile::parse(&daemon.cli_ok(
        None,
        &["key", "add", "client-5", "--port", &port.to_string()],
    ))
    .expect("a key file");
    let listener = SocketAddr::new(LOCAL, LISTENER);
    let sources: Vec<std::net::IpAddr> = (1..=4_u8)
        .flat_map(|third| (1..=250_u8).map(move |fourth| [127, 9, third, fourth].into()))
        .collect();
    let sent = flood(&daemon, &sources, size(100, 1_000));
    // Bad datagrams from a source of their own until one is audited: the socket delivers
    // in order, so the flood was looked at before it (how long that takes does not matter).
    let last_source = |record: &serde_json::Value| record["addr"] == "127.0.0.5";
    assert!(
        eventually(CONNECT_WITHIN, || {
            daemon.ns.run(|| {
                UdpSocket::bind("127.0.0.5:0")
                    .expect("bind")
                    .send_to(&[7; 80], listener)
                    .expect("send");
            });
            std::thread::sleep(Duration::from_millis(200));
            daemon.audit().iter().any(last_source)
        }),
        "a bad datagram after the flood is audited"
    );
    // Every refusal looked at is in the audit log, one by one or in a count (the counts are
    // written within a second).
    let tally = || tally(&daemon);
    assert!(
        eventually(CONNECT_WITHIN, || {
            let (looked_at, _, one_by_one, in_counts) = tally();
            one_by_one + in_counts == looked_at
        }),
        "every refusal looked at is in the audit log, one by one or counted: (looked at, held back, one by one, in counts) = {:?}",
        tally()
    );
    let (looked_at, held_back, one_by_one, in_counts) = tally();
    println!(
        "{sent} sent; {looked_at} looked at, {held_back} held back; {one_by_one} audited one by one, {in_counts} in counts"
    );
    assert!(looked_at > 0 && held_back > 0, "{:?}", tally());
    // How many were written one by one depends on how fast this machine looked at them
    // (100 a second); the sum above does not.
    daemon
        .ns
        .run(|| {
            knock::knock(
                listener,
                &key_file,
                &KnockRequest {
                    protocol: Protocol::Tcp,
                    port,
                    ttl: Duration::from_mins(1),
                    grant_for: GrantFor::ThisHost,
                },
            )
        })
        .expect("knock");
    assert!(
        eventually(CONNECT_WITHIN, || connect_to(&daemon, port, REFUSED_WITHIN)
            .is_ok()),
        "a good knock gets through after the flood:\n{}",
        daemon.log()
    );
    report(
        "api",
        "Bad knock datagrams flooded from 1,000 sources at once.",
        "The listener's and the sources' limits held most back; every refusal it looked at is in the audit log, one by one or in a `not_audited` count, equal to the metric; a good knock got through after.",
        &serde_json::json!({
            "sent": sent,
            "looked_at": looked_at,
            "held_back": held_back,
            "audited_one_by_one": one_by_one,
            "in_counts": in_counts,
        }),
    );
}

/// What the daemon made of bad knocks: (looked at, held back by the limits, audited one by
/// one, in `not_audited` counts).
fn tally(daemon: &Daemon) -> (u64, u64, u64, u64) {
    let metrics = daemon
        .api(portgate::client::Client::metrics)
        .expect("metrics");
    let counted = |reason: &str| -> u64 {
        let prefix = format!("portgate_auth_total{{result=\"refused\",reason=\"{reason}\"}} ");
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .map_or(0, |value| value.trim().parse().expect("a count"))
    };
    let knocks: Vec<serde_json::Value> = daemon
        .audit()
        .into_iter()
        .filter(|record| record["action"] == "knock")
        .collect();
    let one_by_one = knocks
        .iter()
        .filter(|record| record["result"] != "not_audited")
        .count();
    (
        counted("malformed") + counted("version") + counted("truncated"),
        counted("rate_limited") + counted("listener_busy"),
        u64::try_from(one_by_one).expect("count"),
        knocks
            .iter()
            .filter_map(|record| record["count"].as_u64())
            .sum(),
    )
}
