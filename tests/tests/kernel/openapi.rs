//! The API reference against the daemon: `GET /v1/openapi.json` is the committed
//! `docs/openapi.json`, and schemathesis, an independent client generating requests from
//! that document, finds no 5xx and no answer that breaks it.
//!
//! Safety: schemathesis sends arbitrary values to a daemon running as root. Its requests go
//! through a loopback bridge whose connections are made as `nobody` (65534), so the daemon
//! treats every one as an ordinary user's: it refuses what would reach outside the test
//! (a namespace path or another namespace, a cgroup not delegated to the caller, client
//! keys, the fleet repair) with 403, reads a named process's or container's cgroup and
//! namespace only to refuse them, and changes only ports of the test daemon's own range,
//! in its own namespace, cgroup and pin directory. A user's requests cannot run programs
//! or write outside the daemon's state directory.

use std::{
    io::{Read as _, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use portgate_tests::{common::bridge::UnixBridge, daemon::Daemon, require_privileges};

/// The user schemathesis's requests come from: an ordinary one, with no passwd entry
/// needed (the kernel reports the uid).
const NOBODY: (u32, u32) = (65_534, 65_534);
/// Test cases per operation and phase: enough to reach every parameter and status, small
/// enough for a debug build on a loaded machine.
const MAX_EXAMPLES: &str = "25";

/// `docs/openapi.json`.
fn committed_document() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json")
}

/// The schemathesis to run: `PORTGATE_SCHEMATHESIS`, else the venv `cargo xtask setup`
/// makes. `None` when it is missing (the test is skipped, or fails under CI).
fn schemathesis() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("PORTGATE_SCHEMATHESIS") {
        return Some(PathBuf::from(path));
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cache")))?;
    let path = cache.join("portgate/schemathesis/bin/schemathesis");
    path.exists().then_some(path)
}

/// A `GET` of `path` on the daemon's socket, as root: the answer's status line and body.
fn get(socket: &Path, path: &str) -> (String, String) {
    let mut stream = UnixStream::connect(socket).expect("the daemon's socket");
    stream
        .set_read_timeout(Some(Duration::from_mins(1)))
        .expect("read timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("answer");
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head.lines().next().unwrap_or_default().to_owned();
    (status, body.to_owned())
}

#[test]
fn the_daemon_serves_its_document_and_keeps_to_it() {
    if !require_privileges!() {
        return;
    }
    let Some(schemathesis) = schemathesis() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "schemathesis is missing: run `cargo xtask setup` or set PORTGATE_SCHEMATHESIS (CI is set, so this fails)"
        );
        println!("SKIPPED: openapi: schemathesis is missing (cargo xtask setup installs it)");
        return;
    };
    let daemon = Daemon::start(48_600, 48_615);

    let (status, served) = get(&daemon.socket, "/v1/openapi.json");
    assert!(status.contains(" 200 "), "{status}: {served}");
    let committed = std::fs::read_to_string(committed_document()).expect("docs/openapi.json");
    let served: serde_json::Value = serde_json::from_str(&served).expect("JSON document");
    let committed: serde_json::Value = serde_json::from_str(&committed).expect("JSON file");
    assert!(
        served == committed,
        "the daemon serves another document than docs/openapi.json: regenerate the file (see docs/api.md)"
    );

    let bridge = UnixBridge::start(&daemon.socket, Some(NOBODY));
    let config =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kernel/openapi/schemathesis.toml");
    let report = tempfile::tempdir().expect("report directory");
    let output = Command::new(&schemathesis)
        .arg("--config-file")
        .arg(&config)
        .arg("run")
        .arg(committed_document())
        .args(["--url", &format!("http://{}", bridge.addr())])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,\
             response_headers_conformance,response_schema_conformance,negative_data_rejection",
            "--max-examples",
            MAX_EXAMPLES,
            "--phases",
            "examples,coverage,fuzzing",
            "--workers",
            "1",
            "--seed",
            "16",
            "--request-timeout",
            "30",
            "--max-time",
            "60",
            "--suppress-health-check",
            "too_slow,filter_too_much",
            "--no-color",
            "--report",
            "junit",
        ])
        .arg("--report-dir")
        .arg(report.path())
        // Its cache (`.schemathesis/`) goes with the report, not into the source tree.
        .current_dir(report.path())
        .stdin(Stdio::null())
        .output()
        .expect("schemathesis runs");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    println!("{printed}");
    assert!(
        output.status.success(),
        "schemathesis found answers that break docs/openapi.json ({}): see its output above; the daemon's log:\n{}",
        output.status,
        daemon.log()
    );
    drop(bridge);
    daemon.assert_consistent();
}
