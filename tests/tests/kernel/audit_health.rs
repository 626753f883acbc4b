//! The audit log and the daemon's own health, on the real daemon: the log rotates under a
//! small bound while requests keep coming, its total stays bounded and no record is torn;
//! records carry what each request asked for; a full disk under the log fails no request,
//! loses no change, is counted and logged once, and the log resumes when space returns;
//! and `/metrics` shows errors by category, each kernel map's fill, the store's commit
//! times and the process's own CPU and memory.

use std::{
    collections::BTreeSet,
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use portgate::{
    api::{AllocRequest, AllocationView, GrantRequest, RenewRequest},
    model::{AccessChange, PortId},
};
use portgate_tests::{
    common::{eventually, tmpfs::Tmpfs},
    daemon::Daemon,
    require_privileges,
    stress::{report, size},
};
use serde_json::{Value, json};

/// Sets `[daemon]` keys of the daemon's configuration (after `kernel_log`, which every
/// test daemon's configuration has) and restarts it with them.
fn restart_with(daemon: &mut Daemon, lines: &str) {
    daemon.set_config("kernel_log", &format!("false\n{lines}"));
    assert!(
        daemon.stop(),
        "the daemon stopped on SIGTERM:\n{}",
        daemon.log()
    );
    daemon.spawn();
}

/// The audit log's files, live first, then `.1`, `.2`, ...: each one's size, mode and
/// records; every line must be a whole JSON record.
fn audit_files(live: &Path) -> Vec<(u64, u32, Vec<Value>)> {
    let mut files = Vec::new();
    for n in 0.. {
        let path = if n == 0 {
            live.to_owned()
        } else {
            PathBuf::from(format!("{}.{n}", live.display()))
        };
        let Ok(text) = fs::read_to_string(&path) else {
            break;
        };
        assert!(
            text.is_empty() || text.ends_with('\n'),
            "{} ends inside a record",
            path.display()
        );
        let records = text
            .lines()
            .map(|line| {
                serde_json::from_str(line).unwrap_or_else(|err| {
                    panic!("a torn record in {}: {err}: {line}", path.display())
                })
            })
            .collect();
        let mode = fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        files.push((text.len() as u64, mode, records));
    }
    files
}

/// The value of one series (`name` or `name{labels}`) in a Prometheus text.
fn series(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// The value of a series that counts (an integer in the text).
fn count(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

fn metrics(daemon: &Daemon) -> String {
    daemon
        .api(portgate::client::Client::metrics)
        .expect("GET /metrics")
}

/// Allocates any port for `owner`; expects success.
fn allocate(daemon: &Daemon, owner: &str) -> AllocationView {
    let request = AllocRequest {
        owner: owner.to_owned(),
        ..AllocRequest::default()
    };
    daemon
        .api(|client| client.alloc(&request))
        .unwrap_or_else(|err| panic!("allocating for {owner}: {err}"))
}

#[test]
fn the_audit_log_rotates_under_load_within_its_bound_and_no_record_is_torn() {
    const MAX_BYTES: u64 = 8192;
    const KEEP: u64 = 3;
    if !require_privileges!() {
        return;
    }
    // Released ports wait out a 3 s quarantine: the stress size's hundreds of allocations
    // a second need a wider range (each daemon has a namespace of its own).
    let mut daemon = Daemon::start(47_000, size(47_199, 48_999));
    restart_with(
        &mut daemon,
        &format!("audit_max_bytes = {MAX_BYTES}\naudit_keep = {KEEP}"),
    );
    let rounds = size(40, 400);
    let threads = 4;
    let started = Instant::now();
    std::thread::scope(|scope| {
        for thread in 0..threads {
            let daemon = &daemon;
            scope.spawn(move || {
                for round in 0..rounds {
                    let owner = format!("rot-{thread}-{round}");
                    let held = allocate(daemon, &owner);
                    let change = AccessChange {
                        allow: ["10.1.0.0/16".parse().unwrap()].into_iter().collect(),
                        ..AccessChange::default()
                    };
                    daemon
                        .api(|client| client.access(held.id, &change))
                        .expect("change its access");
                    daemon
                        .api(|client| client.release(held.id))
                        .expect("release");
                }
            });
        }
    });
    let elapsed = started.elapsed();
    let files = audit_files(&daemon.audit_log);
    let requests = 3 * threads * rounds;
    let total: u64 = files.iter().map(|(bytes, _, _)| bytes).sum();
    let records: usize = files.iter().map(|(_, _, records)| records.len()).sum();
    assert_eq!(
        files.len() as u64,
        KEEP + 1,
        "the live file and {KEEP} rotated ones, the oldest dropped"
    );
    for (bytes, mode, _) in &files {
        assert!(*bytes <= MAX_BYTES, "a file of {bytes} bytes");
        assert_eq!(*mode, 0o600);
    }
    assert!(total <= (KEEP + 1) * MAX_BYTES);
    // The newest records are kept: each thread's last release.
    let owners_released: BTreeSet<u64> = files[0]
        .2
        .iter()
        .chain(&files[1].2)
        .filter(|record| record["action"] == "release")
        .filter_map(|record| record["port"].as_u64())
        .collect();
    assert!(!owners_released.is_empty());
    report(
        "audit",
        &format!(
            "{threads} clients made {requests} requests (allocate, change access, release) against an audit log bounded at {MAX_BYTES} bytes with {KEEP} rotated files"
        ),
        "the log rotated with every file within the bound and mode 0600, the oldest dropped, every line a whole JSON record",
        &json!({
            "requests": requests,
            "seconds": elapsed.as_secs_f64(),
            "files": files.len(),
            "bytes_on_disk": total,
            "bound_bytes": (KEEP + 1) * MAX_BYTES,
            "records_kept": records,
        }),
    );
}

#[test]
fn audit_records_carry_what_each_request_asked_for() {
    if !require_privileges!() {
        return;
    }
    let daemon = Daemon::start(47_200, 47_299);
    let allow: Vec<ipnet::IpNet> = (0..40_u32)
        .map(|i| format!("10.{i}.0.0/16").parse().unwrap())
        .collect();
    let request = AllocRequest {
        owner: "fields".to_owned(),
        allow: allow.clone(),
        max_conns: Some(9),
        require_auth: true,
        ttl: Some(Duration::from_mins(10)),
        ..AllocRequest::default()
    };
    let held = daemon
        .api(|client| client.alloc(&request))
        .expect("allocate");
    let grant = GrantRequest {
        ip: "192.0.2.7".parse().unwrap(),
        ttl: Duration::from_secs(90),
    };
    daemon
        .api(|client| client.grant(held.id, &grant))
        .expect("grant");
    let renewal = RenewRequest {
        ttl: Some(Duration::from_mins(20)),
    };
    daemon
        .api(|client| client.renew(held.id, &renewal))
        .expect("renew");
    let change = AccessChange {
        remove: allow[..3].iter().copied().collect(),
        max_connections: Some(4),
        ..AccessChange::default()
    };
    daemon
        .api(|client| client.access(held.id, &change))
        .expect("change access");
    let records = daemon.audit();
    let find = |action: &str| {
        records
            .iter()
            .find(|record| record["action"] == action && record["port"] == held.id.port)
            .unwrap_or_else(|| panic!("no {action} record in {records:#?}"))
    };
    let allocated = find("alloc");
    assert_eq!(allocated["owner"], "fields");
    assert_eq!(allocated["allow_count"], 40);
    assert_eq!(allocated["allow"].as_array().unwrap().len(), 16);
    assert_eq!(allocated["allow"][0], "10.0.0.0/16");
    assert_eq!(allocated["max_connections"], 9);
    assert_eq!(allocated["require_auth"], true);
    assert_eq!(allocated["ttl"], "10m");
    let grant = find("grant");
    assert_eq!(grant["addr"], "192.0.2.7");
    assert_eq!(grant["ttl"], "1m 30s");
    assert_eq!(find("renew")["ttl"], "20m");
    let access = find("access");
    assert_eq!(access["remove_count"], 3);
    assert_eq!(access["max_connections"], 4);
    assert!(access.get("allow").is_none(), "{access}");
    let bytes = serde_json::to_string(allocated).unwrap().len();
    report(
        "audit",
        "an allocation with 40 prefixes, a grant, a renewal and an access change were audited",
        "each record carries the request's parameters: the first 16 prefixes and their count, the limit, the grant's address and TTL, the lease",
        &json!({ "alloc_record_bytes": bytes }),
    );
}

fn audit_errors(daemon: &Daemon) -> u64 {
    count(
        &metrics(daemon),
        "portgate_errors_total{category=\"audit\"}",
    )
    .expect("the audit errors series")
}

#[test]
fn a_full_disk_under_the_audit_log_fails_no_request_and_the_log_resumes() {
    if !require_privileges!() {
        return;
    }
    let tmpfs = Tmpfs::in_temp_dir(256 << 10);
    let live = tmpfs.path().join("audit.log");
    let mut daemon = Daemon::start(47_300, size(47_499, 48_999));
    daemon.set_config("audit_log", &format!("{:?}", live.display().to_string()));
    restart_with(&mut daemon, "audit_max_bytes = 1048576");
    daemon.audit_log.clone_from(&live);
    assert_eq!(audit_errors(&daemon), 0);
    let (filler, _) = tmpfs.fill();

    let requests = size(40, 200);
    let mut held = Vec::new();
    for i in 0..requests {
        held.push(allocate(&daemon, &format!("full-{i}")).id);
    }
    let errors = audit_errors(&daemon);
    let full_records = |records: &[Value], prefix: &str| {
        records
            .iter()
            .filter(|record| {
                record["owner"]
                    .as_str()
                    .is_some_and(|owner| owner.starts_with(prefix))
            })
            .count()
    };
    let written = full_records(&daemon.audit(), "full-");
    assert!(errors > 0, "no audit error counted");
    assert_eq!(
        written as u64 + errors,
        requests,
        "every request has a whole record or a counted error"
    );
    // The changes stand, in the kernel too.
    let policies = daemon.kernel_policies();
    assert!(held.iter().all(|id| policies.contains(id)));
    let failures_logged = daemon.log().matches("not written").count();
    assert_eq!(
        failures_logged,
        1,
        "one message, not one per record:\n{}",
        daemon.log()
    );

    fs::remove_file(&filler).expect("free the space");
    let after = 5;
    for i in 0..after {
        held.push(allocate(&daemon, &format!("after-{i}")).id);
    }
    let files = audit_files(&live);
    assert_eq!(
        full_records(&files[0].2, "after-"),
        after,
        "the records resumed"
    );
    assert!(daemon.log().contains("written again"), "{}", daemon.log());

    // Every acknowledged change is in the store: a restart finds them all.
    assert!(daemon.stop());
    daemon.spawn();
    let allocated: BTreeSet<PortId> = daemon.allocations().into_keys().collect();
    assert!(held.iter().all(|id| allocated.contains(id)));
    assert!(held.iter().all(|id| daemon.kernel_policies().contains(id)));
    report(
        "audit",
        &format!(
            "{requests} allocations were asked for while the audit log's disk (a 256 KiB tmpfs) was full, then {after} more once space was freed"
        ),
        "every allocation succeeded and was in the kernel and the store after a restart; every request had either a whole record (those that still fit in the file's last page) or a count in portgate_errors_total{category=\"audit\"}, logged once; the log resumed when space returned",
        &json!({
            "requests_on_full_disk": requests,
            "records_written": written,
            "audit_errors_counted": errors,
            "error_messages_logged": failures_logged,
            "records_after_space_returned": after,
        }),
    );
}

#[test]
fn metrics_show_the_daemons_own_health() {
    if !require_privileges!() {
        return;
    }
    let daemon = Daemon::start(47_500, 47_699);
    let ports: u64 = size(20, 200);
    for i in 0..ports {
        allocate(&daemon, &format!("health-{i}"));
    }
    // The maps are counted at most every 5 s: wait for a count after the allocations.
    let policy = "portgate_map_entries{map=\"PG_POLICY\"}";
    let mut text = String::new();
    let mut counting_scrape = Duration::ZERO;
    let counted = eventually(Duration::from_secs(30), || {
        let started = Instant::now();
        text = metrics(&daemon);
        counting_scrape = started.elapsed();
        count(&text, policy) == Some(ports)
    });
    // The next scrape within 5 s takes the count made for that one.
    let started = Instant::now();
    let _cached = metrics(&daemon);
    let cached_scrape = started.elapsed();
    assert!(counted, "{policy} never {ports}:\n{text}");
    assert_eq!(
        series(&text, "portgate_map_capacity{map=\"PG_POLICY\"}"),
        Some(f64::from(portgate_common::capacity::POLICIES))
    );
    for map in [
        "PG_GRANTS",
        "PG_COUNTERS",
        "PG_SLOTS",
        "PG_PENDING",
        "PG_ALLOW",
    ] {
        let entries = series(&text, &format!("portgate_map_entries{{map=\"{map}\"}}"));
        assert!(entries.is_some(), "no fill of {map}:\n{text}");
    }
    for category in ["store", "kernel", "audit", "fleet", "host", "api"] {
        let errors = count(
            &text,
            &format!("portgate_errors_total{{category=\"{category}\"}}"),
        );
        assert_eq!(errors, Some(0), "{category}:\n{text}");
    }
    let commits = count(&text, "portgate_store_commit_duration_seconds_count").unwrap_or(0);
    let commit_seconds = series(&text, "portgate_store_commit_duration_seconds_sum").unwrap_or(0.0);
    assert!(commits >= 1, "{text}");
    let cpu = series(&text, "process_cpu_seconds_total").unwrap_or(0.0);
    let rss = series(&text, "process_resident_memory_bytes").unwrap_or(0.0);
    let fds = series(&text, "process_open_fds").unwrap_or(0.0);
    assert!(cpu > 0.0, "{text}");
    assert!(rss > 1_000_000.0, "{text}");
    assert!(fds > 0.0, "{text}");
    report(
        "health",
        &format!("{ports} ports were allocated and /metrics scraped"),
        "the policy map's fill equals the ports allocated; every error category is shown at 0; the store's commit times, the daemon's CPU time, resident memory and open descriptors are shown",
        &json!({
            "ports": ports,
            "policy_entries": count(&text, policy),
            "store_commits": commits,
            "mean_commit_ms": 1000.0 * commit_seconds / f64::from(u32::try_from(commits.max(1)).unwrap_or(u32::MAX)),
            "cpu_seconds": cpu,
            "rss_mib": rss / f64::from(1 << 20),
            "open_fds": fds,
            "scrape_counting_maps_ms": counting_scrape.as_secs_f64() * 1000.0,
            "scrape_with_cached_count_ms": cached_scrape.as_secs_f64() * 1000.0,
        }),
    );
}
