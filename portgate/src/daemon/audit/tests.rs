//! The audit log's rotation, its bound on disk, whole records under concurrent writers,
//! failures counted, and the request's parameters in a record.

use std::{os::unix::fs::PermissionsExt as _, path::Path, sync::Arc, time::Duration};

use ipnet::IpNet;
use prometheus_client::metrics::counter::Counter;

use super::{AUDIT_PREFIXES, AUDIT_TEXT_BYTES, AuditLog, AuditParams, AuditRecord, Rotation};

fn record(action: &str, params: AuditParams) -> AuditRecord<'_> {
    AuditRecord {
        time: super::now_rfc3339(),
        uid: Some(0),
        pid: Some(1),
        action,
        port: Some(20001),
        proto: Some("tcp"),
        netns: None,
        result: "ok",
        status: 200,
        key: None,
        addr: None,
        grant_for: None,
        count: None,
        params,
    }
}

/// Every file of the log (live first, then `.1`, `.2`, ...) with its lines, each of which
/// must be a whole JSON record.
fn files(log: &AuditLog) -> Vec<(u64, Vec<serde_json::Value>)> {
    let mut out = Vec::new();
    for path in std::iter::once(log.path().to_owned()).chain((1..).map(|n| log.rotated(n))) {
        let Ok(text) = std::fs::read_to_string(&path) else {
            break;
        };
        assert!(
            text.is_empty() || text.ends_with('\n'),
            "{}",
            path.display()
        );
        let lines = text
            .lines()
            .map(|line| serde_json::from_str(line).expect("a whole JSON record"))
            .collect();
        out.push((text.len() as u64, lines));
    }
    out
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn the_log_rotates_and_keeps_its_bound_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let rotation = Rotation {
        max_bytes: 4096,
        keep: 3,
    };
    let log = AuditLog::open(&dir.path().join("audit.log"), rotation, Counter::default()).unwrap();
    for _ in 0..1000 {
        log.record(&record("alloc", AuditParams::default()));
    }
    let files = files(&log);
    assert_eq!(files.len(), 4, "the live file and 3 rotated ones");
    assert!(
        !log.rotated(4).exists(),
        "the oldest is dropped, not kept as .4"
    );
    for (n, (size, lines)) in files.iter().enumerate() {
        assert!(*size <= rotation.max_bytes, "file {n}: {size} bytes");
        assert!(!lines.is_empty(), "file {n} is empty");
    }
    for n in 1..=3 {
        assert_eq!(mode(&log.rotated(n)), 0o600);
    }
    assert_eq!(mode(log.path()), 0o600);
}

#[test]
fn concurrent_writers_leave_whole_records_and_lose_none_within_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let rotation = Rotation {
        max_bytes: 64 << 10,
        keep: 100,
    };
    let log = Arc::new(
        AuditLog::open(&dir.path().join("audit.log"), rotation, Counter::default()).unwrap(),
    );
    let threads: Vec<_> = (0..8_u16)
        .map(|thread| {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for i in 0..500_u16 {
                    let mut params = AuditParams {
                        owner: Some(format!("thread-{thread}-record-{i}")),
                        ..AuditParams::default()
                    };
                    // Records of different sizes.
                    params.container = Some("c".repeat(usize::from(i % 200)));
                    log.record(&record("alloc", params));
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    let files = files(&log);
    assert!(files.len() > 2, "rotated: {} files", files.len());
    let mut owners: Vec<String> = files
        .iter()
        .flat_map(|(_, lines)| lines)
        .map(|line| line["owner"].as_str().unwrap().to_owned())
        .collect();
    owners.sort();
    owners.dedup();
    assert_eq!(owners.len(), 8 * 500, "every record, once");
    assert!(files.iter().all(|(size, _)| *size <= rotation.max_bytes));
}

#[test]
fn a_failed_write_is_counted_and_the_request_goes_on() {
    // /dev/full refuses every write with ENOSPC, as a full disk does.
    let failures = Counter::default();
    let log = AuditLog::open(
        Path::new("/dev/full"),
        Rotation {
            max_bytes: 1 << 20,
            keep: 1,
        },
        failures.clone(),
    )
    .unwrap();
    for _ in 0..10 {
        log.record(&record("alloc", AuditParams::default()));
    }
    assert_eq!(failures.get(), 10);
}

#[test]
fn a_record_carries_the_parameters_given_and_only_those() {
    let allow: Vec<IpNet> = (0..1000_u32)
        .map(|i| IpNet::new(std::net::Ipv4Addr::from(0x0a00_0000 + (i << 8)).into(), 24).unwrap())
        .collect();
    let (first, count) = AuditParams::prefixes(allow.iter());
    let params = AuditParams {
        owner: Some(AuditParams::text(&"é".repeat(1000))),
        allow: first,
        allow_count: count,
        max_connections: Some(7),
        require_auth: Some(true),
        ttl: Some(AuditParams::duration(Duration::from_mins(5))),
        ..AuditParams::default()
    };
    let line = serde_json::to_value(record("alloc", params)).unwrap();
    assert_eq!(line["allow"].as_array().unwrap().len(), AUDIT_PREFIXES);
    assert_eq!(line["allow"][1], "10.0.1.0/24");
    assert_eq!(line["allow_count"], 1000);
    assert_eq!(line["max_connections"], 7);
    assert_eq!(line["require_auth"], true);
    assert_eq!(line["ttl"], "5m");
    let owner = line["owner"].as_str().unwrap();
    assert!(owner.len() <= AUDIT_TEXT_BYTES && owner.len() >= AUDIT_TEXT_BYTES - 1);
    for absent in [
        "remove",
        "remove_count",
        "cgroup",
        "node",
        "publish",
        "any_source",
    ] {
        assert!(line.get(absent).is_none(), "{absent} written: {line}");
    }
    let plain = serde_json::to_value(record("list", AuditParams::default())).unwrap();
    assert_eq!(
        plain.as_object().unwrap().keys().count(),
        8,
        "time, uid, pid, action, port, proto, result, status and nothing else: {plain}"
    );
    assert_eq!(AuditParams::prefixes([].iter()), (None, None));
}
