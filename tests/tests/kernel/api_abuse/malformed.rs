//! Hundreds of malformed requests over the raw socket, each answered 4xx/5xx or closed,
//! with nothing changed in the store or the kernel.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::Shutdown,
    os::unix::net::UnixStream,
    path::Path,
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

use portgate::{
    api::{AllocRequest, MAX_BODY_BYTES},
    daemon::api::connections::HEADER_TIMEOUT,
    gate::Gate,
    model::PortReport,
};
use portgate_tests::{daemon::Daemon, require_privileges, stress::report};
use rand::{Rng as _, SeedableRng as _, rngs::SmallRng};
use serde_json::json;

use super::{request, statuses, whole_answer};

/// One malformed request: its name, its bytes, and whether the client then closes its
/// sending side (the request is incomplete: the daemon would otherwise wait for the rest).
struct Case {
    name: String,
    bytes: Vec<u8>,
    close_after: bool,
}

impl Case {
    fn new(name: impl Into<String>, bytes: impl Into<Vec<u8>>) -> Self {
        Self {
            name: name.into(),
            bytes: bytes.into(),
            close_after: false,
        }
    }

    fn incomplete(name: impl Into<String>, bytes: impl Into<Vec<u8>>) -> Self {
        Self {
            close_after: true,
            ..Self::new(name, bytes)
        }
    }
}

/// The malformed requests: methods, paths, header lines, bodies, lengths, encodings and
/// protocols, on routes that change things (`held` is an allocated port).
#[expect(clippy::too_many_lines, reason = "a table of cases")]
fn malformed_cases(held: u16) -> Vec<Case> {
    let mut cases = Vec::new();
    let routes = [
        "/v1/ports".to_owned(),
        format!("/v1/ports/{held}"),
        format!("/v1/ports/{held}/access"),
        format!("/v1/ports/{held}/grants"),
        format!("/v1/ports/{held}/owner"),
        "/v1/keys".to_owned(),
    ];
    // Methods no route takes, and names that are not methods.
    for method in [
        "PUT",
        "TRACE",
        "CONNECT",
        "FOO",
        "G3T",
        "get",
        "DELETE\u{0}",
    ] {
        for route in &routes {
            let line = format!("{method} {route} HTTP/1.1");
            cases.push(Case::new(
                format!("method {method:?} {route}"),
                request(&line, &["Host: portgate", "Content-Length: 0"], b""),
            ));
        }
    }
    // Paths with no route, bad port numbers, bad queries and bad encodings.
    let paths = [
        "/".to_owned(),
        "*".to_owned(),
        "//v1//ports".to_owned(),
        "/v1/ports/../keys/x".to_owned(),
        "/v1/ports/%00".to_owned(),
        "/v1/ports/%ff%fe".to_owned(),
        "/v1/ports/-1".to_owned(),
        "/v1/ports/0".to_owned(),
        "/v1/ports/65536".to_owned(),
        "/v1/ports/99999999999999999999999".to_owned(),
        format!("/v1/ports/{held}?proto=sctp"),
        format!("/v1/ports/{held}?netns=not-a-cookie"),
        format!("/v1/ports/{held}?proto=%zz"),
        format!("/v1/ports/{held}/nothing"),
        "/v2/ports".to_owned(),
        format!("/v1/ports/{}", "9".repeat(4000)),
        format!("/{}", "a/".repeat(20_000)),
    ];
    for path in &paths {
        for method in ["DELETE", "POST"] {
            cases.push(Case::new(
                format!("{method} path {}", &path[..path.len().min(40)]),
                request(
                    &format!("{method} {path} HTTP/1.1"),
                    &["Host: portgate", "Content-Length: 2"],
                    b"{}",
                ),
            ));
        }
    }
    // Request lines that are not HTTP/1.
    for (name, bytes) in [
        ("HTTP/0.9", b"GET /v1/ports\r\n".to_vec()),
        (
            "HTTP/2 preface",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
        ),
        (
            "HTTP/3.0",
            b"POST /v1/ports HTTP/3.0\r\nHost: x\r\n\r\n".to_vec(),
        ),
        (
            "HTTP/1.2",
            b"POST /v1/ports HTTP/1.2\r\nHost: x\r\n\r\n".to_vec(),
        ),
        ("no version", b"POST /v1/ports\r\nHost: x\r\n\r\n".to_vec()),
        (
            "lower-case version",
            b"POST /v1/ports http/1.1\r\n\r\n".to_vec(),
        ),
        ("tabs", b"POST\t/v1/ports\tHTTP/1.1\r\n\r\n".to_vec()),
        ("empty line first", b"\r\n\r\n\r\n".to_vec()),
        (
            "TLS hello",
            vec![
                0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
            ],
        ),
        ("NULs", vec![0; 64]),
        ("high bytes", vec![0xff; 64]),
    ] {
        cases.push(Case::incomplete(format!("line {name}"), bytes));
    }
    // Header lines that are not headers, and heads too large.
    let huge_value = format!("X-Big: {}", "v".repeat(70_000));
    let many: Vec<String> = (0..200).map(|n| format!("X-H{n}: {n}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let header_sets: Vec<(&str, Vec<&str>)> = vec![
        ("no colon", vec!["Host portgate"]),
        ("space before colon", vec!["Host : portgate"]),
        ("bad name", vec!["Ho(st: portgate"]),
        ("empty name", vec![": portgate"]),
        ("NUL in value", vec!["Host: port\u{0}gate"]),
        ("folded", vec!["Host: portgate", " folded: on"]),
        ("huge header", vec![huge_value.as_str()]),
        ("200 headers", many),
        (
            "two lengths",
            vec!["Content-Length: 2", "Content-Length: 3"],
        ),
        (
            "length and chunked",
            vec!["Content-Length: 2", "Transfer-Encoding: chunked"],
        ),
        ("negative length", vec!["Content-Length: -2"]),
        ("length not a number", vec!["Content-Length: two"]),
        (
            "length overflows",
            vec!["Content-Length: 99999999999999999999999"],
        ),
        ("length with sign", vec!["Content-Length: +2"]),
        ("unknown coding", vec!["Transfer-Encoding: gzip"]),
        ("chunked twice", vec!["Transfer-Encoding: chunked, chunked"]),
        ("chunked not last", vec!["Transfer-Encoding: chunked, gzip"]),
    ];
    for (name, headers) in &header_sets {
        for route in &routes[..3] {
            cases.push(Case::incomplete(
                format!("header {name} {route}"),
                request(&format!("POST {route} HTTP/1.1"), headers, b"{}"),
            ));
        }
    }
    // Bodies that are not what the route takes, on every route that changes something.
    let bodies: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("not JSON", b"{not json".to_vec()),
        ("invalid UTF-8", b"{\"owner\":\"\xff\xfe\"}".to_vec()),
        (
            "UTF-16",
            "{\"owner\":\"x\"}"
                .encode_utf16()
                .flat_map(u16::to_le_bytes)
                .collect(),
        ),
        ("BOM", b"\xef\xbb\xbf{\"owner\":".to_vec()),
        ("null", b"null".to_vec()),
        ("array", b"[]".to_vec()),
        ("number", b"12345678901234567890123456789".to_vec()),
        ("deep", [vec![b'['; 100_000], vec![b']'; 100_000]].concat()),
        (
            "unknown field",
            br#"{"owner":"x","colour":"red","allow":"nope"}"#.to_vec(),
        ),
        (
            "wrong types",
            br#"{"owner":7,"port":"80","max_connections":-1}"#.to_vec(),
        ),
        (
            "bad prefix",
            br#"{"owner":"x","allow":["10.0.0.0/99"]}"#.to_vec(),
        ),
        ("bad ip", br#"{"ip":"999.1.1.1","ttl":"1m"}"#.to_vec()),
        (
            "bad ttl",
            br#"{"owner":"x","ttl":"forever","ip":"192.0.2.1"}"#.to_vec(),
        ),
        (
            "NUL owner",
            b"{\"owner\":\"a\\u0000b\",\"port\":1}".to_vec(),
        ),
        ("trailing garbage", br#"{"owner":"x","port":1}}}"#.to_vec()),
        // Each a whole body the route would take, then more.
        (
            "valid, then garbage",
            br#"{"owner":"trailing"} garbage"#.to_vec(),
        ),
        (
            "valid twice",
            br#"{"max_connections":3}{"max_connections":4}"#.to_vec(),
        ),
        ("huge", vec![b' '; MAX_BODY_BYTES + 1]),
    ];
    for (name, body) in &bodies {
        for route in [&routes[0], &routes[2], &routes[3], &routes[4], &routes[5]] {
            let method = if route.ends_with("access") || route.ends_with("owner") {
                "PATCH"
            } else {
                "POST"
            };
            let length = format!("Content-Length: {}", body.len());
            cases.push(Case::new(
                format!("body {name} {method} {route}"),
                request(
                    &format!("{method} {route} HTTP/1.1"),
                    &["Host: portgate", "Content-Type: application/json", &length],
                    body,
                ),
            ));
        }
    }
    // Lengths that lie, and chunked bodies that are garbage.
    let lies: Vec<(&str, Vec<u8>)> = vec![
        (
            "length longer than the body",
            request(
                "POST /v1/ports HTTP/1.1",
                &["Content-Length: 500"],
                br#"{"owner":"x"}"#,
            ),
        ),
        (
            "length shorter than the body",
            request(
                "POST /v1/ports HTTP/1.1",
                &["Content-Length: 5"],
                br#"{"owner":"lie"}"#,
            ),
        ),
        (
            "length far beyond the limit",
            request(
                "POST /v1/ports HTTP/1.1",
                &["Content-Length: 10000000000"],
                b"{}",
            ),
        ),
        (
            "chunk size not hex",
            request(
                "POST /v1/ports HTTP/1.1",
                &["Transfer-Encoding: chunked"],
                b"zz\r\n{}\r\n0\r\n\r\n",
            ),
        ),
        (
            "chunk size overflows",
            request(
                "POST /v1/ports HTTP/1.1",
                &["Transfer-Encoding: chunked"],
                b"ffffffffffffffffffff\r\n{}\r\n0\r\n\r\n",
            ),
        ),
        (
            "chunk without CRLF",
            request(
                "POST /v1/ports HTTP/1.1",
                &["Transfer-Encoding: chunked"],
                b"2\r\n{}XX0\r\n\r\n",
            ),
        ),
        (
            "chunk longer than said",
            request(
                "POST /v1/ports HTTP/1.1",
                &["Transfer-Encoding: chunked"],
                b"1\r\n{\"owner\":\"x\"}\r\n0\r\n\r\n",
            ),
        ),
        (
            "chunk extension garbage",
            request(
                "POST /v1/ports HTTP/1.1",
                &["Transfer-Encoding: chunked"],
                b"2;\x01\x02\r\n{}\r\n0\r\n\r\n",
            ),
        ),
        (
            "chunks past the limit",
            request(
                "POST /v1/ports HTTP/1.1",
                &["Transfer-Encoding: chunked"],
                &chunked_spaces(MAX_BODY_BYTES + 4096),
            ),
        ),
        (
            "chunked, no end",
            request(
                "POST /v1/ports HTTP/1.1",
                &["Transfer-Encoding: chunked"],
                b"2\r\n{}\r\n",
            ),
        ),
        (
            "head never ends",
            b"POST /v1/ports HTTP/1.1\r\nHost: portgate\r\nContent-Len".to_vec(),
        ),
    ];
    for (name, bytes) in lies {
        cases.push(Case::incomplete(format!("lie {name}"), bytes));
    }
    // Random bytes, after a request line or alone (a fixed seed: the same every run).
    let mut rng = SmallRng::seed_from_u64(15);
    for n in 0..30 {
        let len = rng.random_range(1..2048);
        let mut noise: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        if n % 2 == 0 {
            noise = [b"POST /v1/ports HTTP/1.1\r\n".to_vec(), noise].concat();
        }
        cases.push(Case::incomplete(format!("noise {n}"), noise));
    }
    cases
}

/// A chunked body of `len` spaces, in 64 KiB chunks, with its end.
fn chunked_spaces(len: usize) -> Vec<u8> {
    let mut body = Vec::new();
    let mut left = len;
    while left > 0 {
        let chunk = left.min(64 * 1024);
        body.extend_from_slice(format!("{chunk:x}\r\n").as_bytes());
        body.extend(std::iter::repeat_n(b' ', chunk));
        body.extend_from_slice(b"\r\n");
        left -= chunk;
    }
    body.extend_from_slice(b"0\r\n\r\n");
    body
}

/// What the daemon did with one request: the statuses it answered (none: it closed).
fn send_case(socket: &Path, case: &Case) -> Vec<u16> {
    let mut stream = UnixStream::connect(socket).expect("connect to the daemon");
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .expect("read timeout");
    // The daemon may answer and close before it has read everything.
    let _sent = stream.write_all(&case.bytes);
    if case.close_after {
        let _closed = stream.shutdown(Shutdown::Write);
    }
    let mut answer = Vec::new();
    let deadline = Instant::now() + HEADER_TIMEOUT + Duration::from_secs(10);
    let mut buf = [0_u8; 16 * 1024];
    while Instant::now() < deadline {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                answer.extend_from_slice(&buf[..n]);
                // One whole answer is enough: the connection may stay open for the next.
                if whole_answer(&answer) {
                    break;
                }
            }
            // An answer that is whole and followed by nothing for a while is the last.
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if !answer.is_empty() {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    assert!(
        Instant::now() < deadline,
        "{}: the daemon neither answered nor closed",
        case.name
    );
    statuses(&answer)
}

/// What a malformed request could have changed: every allocation as the API lists it, and
/// every port's record in the kernel maps (policy, allowlist, grants, counters).
fn state_of(daemon: &Daemon) -> (serde_json::Value, Vec<PortReport>) {
    let listed =
        serde_json::to_value(daemon.allocations().into_values().collect::<Vec<_>>()).expect("JSON");
    let kernel = Gate::open(daemon.pins.path())
        .expect("open the pinned gate")
        .reports()
        .expect("read the kernel maps");
    (listed, kernel)
}

#[test]
fn malformed_requests_are_refused_and_change_nothing() {
    if !require_privileges!() {
        return;
    }
    let daemon = Daemon::start(47_000, 47_049);
    let kept = AllocRequest {
        owner: "kept".to_owned(),
        allow: vec!["192.0.2.0/24".parse().expect("prefix")],
        ..AllocRequest::default()
    };
    let held = daemon
        .api(|client| client.alloc(&kept))
        .expect("allocate a port");
    let before = state_of(&daemon);
    let cases = malformed_cases(held.id.port);
    let started = Instant::now();
    // A few clients at once, each taking the next case.
    let next = Mutex::new(cases.iter());
    let outcomes = Mutex::new(Vec::new());
    thread::scope(|scope| {
        for _ in 0..8 {
            scope.spawn(|| {
                loop {
                    let Some(case) = next.lock().expect("cases").next() else {
                        return;
                    };
                    let statuses = send_case(&daemon.socket, case);
                    outcomes
                        .lock()
                        .expect("outcomes")
                        .push((case.name.clone(), statuses));
                }
            });
        }
    });
    let outcomes = outcomes.into_inner().expect("outcomes");
    let elapsed = started.elapsed();
    let mut answered = 0;
    let mut closed = 0;
    for (name, statuses) in &outcomes {
        assert!(
            statuses.iter().all(|status| (400..600).contains(status)),
            "{name}: answered {statuses:?}"
        );
        if std::env::var_os("PORTGATE_TEST_VERBOSE").is_some() {
            eprintln!("{name}: {statuses:?}");
        }
        if statuses.is_empty() {
            closed += 1;
        } else {
            answered += 1;
        }
    }
    eprintln!(
        "{} cases in {elapsed:?}: {answered} answered, {closed} closed",
        outcomes.len()
    );
    assert!(outcomes.len() >= 200, "only {} cases", outcomes.len());
    assert_eq!(
        state_of(&daemon),
        before,
        "a malformed request changed something"
    );
    // And the daemon still answers a well-formed request.
    assert_eq!(daemon.allocations().len(), 1);
    report(
        "api",
        &format!(
            "{} malformed requests over the raw socket, 8 clients at once: methods, paths, header lines, Content-Length lies, chunked garbage, invalid UTF-8 and JSON, heads over 64 KiB and bodies over 1 MiB, HTTP/0.9, HTTP/2 and TLS prefaces, random bytes",
            outcomes.len()
        ),
        "each was answered 4xx/5xx or its connection closed; the allocations and the kernel maps were the same afterwards, and the daemon kept answering",
        &json!({
            "requests": outcomes.len(),
            "answered_4xx_5xx": answered,
            "closed_unanswered": closed,
            "seconds": elapsed.as_secs_f64(),
        }),
    );
}
