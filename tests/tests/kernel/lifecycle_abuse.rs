//! A port's lifecycle abused through the real daemon: `kill -9` at every step of allocate,
//! release and drain (a request started, the daemon killed after a varying delay, started
//! again: every acknowledged change is there and nothing is half-applied), and thousands of
//! allocate/release cycles that leave the kernel maps, the store, the daemon's file
//! descriptors and its memory where they were.

use std::{
    collections::BTreeMap,
    fs, thread,
    time::{Duration, Instant},
};

use portgate::{
    api::{AllocRequest, AllocationView},
    client::Client,
    gate::Gate,
    model::{PortId, PortStatus},
};
use portgate_common::status;
use portgate_tests::{
    common::{eventually, gate::map_entries},
    daemon::Daemon,
    require_privileges,
    stress::{report, size},
};

/// What a request killed in flight must have left, by what it was and whether it was
/// acknowledged.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Expect {
    /// Allocated to this owner and acknowledged: Active.
    Held(String),
    /// Released or drained and acknowledged: no longer Active (Draining, Closed or freed).
    Gone,
    /// An allocation to this owner that was not acknowledged: Active with that owner, or
    /// absent.
    MaybeHeld(String),
    /// A release or drain that was not acknowledged: Active, or no longer.
    Either,
}

/// The step a request takes.
#[derive(Clone, Copy, Debug)]
enum Step {
    Allocate,
    Release,
    Drain,
}

/// The kernel's status code for `status`.
fn kernel_code(status: PortStatus) -> u32 {
    match status {
        PortStatus::Active => status::ACTIVE,
        PortStatus::Draining => status::DRAINING,
        _ => status::CLOSED,
    }
}

/// Every port's allocation in the store agrees with its policy in the kernel, status
/// included (nothing half-applied), and each expectation holds.
fn assert_whole(daemon: &Daemon, expected: &BTreeMap<PortId, Expect>, when: &str) {
    // A port released or drained goes Closed at the next tick (no connections hold it) and
    // stays so (an hour's quarantine): read the store and the kernel once nothing moves.
    assert!(
        eventually(Duration::from_secs(10), || daemon
            .allocations()
            .values()
            .all(|view| view.status != PortStatus::Draining)),
        "{when}: a port stayed Draining"
    );
    let held = daemon.assert_consistent();
    let kernel = Gate::open(daemon.pins.path())
        .expect("open the pinned gate")
        .policies()
        .expect("read the policies");
    for (id, view) in &held {
        assert_eq!(
            kernel[id].status,
            kernel_code(view.status),
            "{when}: {id} is {:?} in the store and not in the kernel",
            view.status
        );
    }
    for (id, expect) in expected {
        let now = held.get(id);
        let ok = match expect {
            Expect::Held(owner) => {
                now.is_some_and(|view| &view.owner == owner && view.status == PortStatus::Active)
            }
            Expect::Gone => now.is_none_or(|view| view.status != PortStatus::Active),
            Expect::MaybeHeld(owner) => now.is_none_or(|view| &view.owner == owner),
            Expect::Either => true,
        };
        assert!(ok, "{when}: {id} expected {expect:?}, found {now:?}");
    }
}

#[test]
fn kill_9_at_every_step_of_allocate_release_and_drain_loses_nothing_half_applies_nothing() {
    if !require_privileges!() {
        return;
    }
    let mut daemon = Daemon::start_with_ports(44_000, 44_199, "quarantine = \"1h\"");
    let iterations = size(9_u32, 90);
    let mut expected: BTreeMap<PortId, Expect> = BTreeMap::new();
    let (mut acknowledged, mut cut) = (0_u32, 0_u32);
    for n in 0..iterations {
        let step = [Step::Allocate, Step::Release, Step::Drain][(n % 3) as usize];
        // 0 to 25 ms, spread over the iterations: before, during and after the commit.
        let delay = Duration::from_micros(u64::from(n * 7_919 % 25_000));
        let target = match step {
            Step::Allocate => None,
            Step::Release | Step::Drain => {
                let owner = format!("target-{n}");
                let request = AllocRequest {
                    owner: owner.clone(),
                    ..AllocRequest::default()
                };
                let view = daemon
                    .api(|client| client.alloc(&request))
                    .expect("allocate the target");
                expected.insert(view.id, Expect::Held(owner));
                Some(view.id)
            }
        };
        let owner = format!("killed-{n}");
        let allocation = AllocRequest {
            owner: owner.clone(),
            ..AllocRequest::default()
        };
        let outcome: Result<AllocationView, String> = thread::scope(|scope| {
            let request = scope.spawn(|| {
                let result = match (step, target) {
                    (Step::Allocate, _) => daemon.api(|client| client.alloc(&allocation)),
                    (Step::Release, Some(id)) => daemon.api(|client| client.release(id)),
                    (Step::Drain, Some(id)) => daemon.api(|client| client.drain(id)),
                    _ => unreachable!("a release or drain has a target"),
                };
                result.map_err(|err| err.to_string())
            });
            thread::sleep(delay);
            daemon.kill9();
            request.join().expect("the request thread")
        });
        match (step, outcome) {
            (Step::Allocate, Ok(view)) => {
                acknowledged += 1;
                expected.insert(view.id, Expect::Held(owner.clone()));
            }
            (Step::Allocate, Err(_)) => {
                cut += 1;
                // Any port it may have taken: found after the restart.
            }
            (_, Ok(_)) => {
                acknowledged += 1;
                expected.insert(target.expect("a target"), Expect::Gone);
            }
            (_, Err(_)) => {
                cut += 1;
                expected.insert(target.expect("a target"), Expect::Either);
            }
        }
        daemon.spawn();
        if matches!(step, Step::Allocate) {
            // An allocation cut short either took a port whole, for its owner, or nothing.
            for (id, view) in daemon.allocations() {
                if view.owner == owner {
                    expected
                        .entry(id)
                        .or_insert_with(|| Expect::MaybeHeld(owner.clone()));
                }
            }
        }
        assert_whole(
            &daemon,
            &expected,
            &format!("after kill -9 #{n} ({step:?}, {delay:?})"),
        );
    }
    report(
        "lifecycle",
        "A request to allocate, release or drain was started and the daemon killed with kill -9 after 0 to 25 ms, in turn, then started again, each time.",
        "Every acknowledged allocation was Active with its owner and every acknowledged release or drain had left Active; a request cut short was applied whole or not at all; the kernel's policies, statuses included, equalled the store, and each port was counted once as allocated or free.",
        &serde_json::json!({
            "kills": iterations,
            "acknowledged_before_kill": acknowledged,
            "cut_short": cut,
        }),
    );
}

/// Open file descriptors of process `pid`.
fn open_fds(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the daemon's descriptors")
        .count()
}

/// Resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("the daemon's status")
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// What one look at the daemon finds: map entries by map, its allocations, descriptors
/// and memory.
#[derive(Debug)]
struct Usage {
    maps: BTreeMap<String, usize>,
    stored: usize,
    fds: usize,
    rss_kib: u64,
}

/// The daemon's usage once every released port has left quarantine: none allocated, in
/// memory (the list) and on disk (the store's count in `status`, written a moment later).
fn settled_usage(daemon: &Daemon) -> Usage {
    let settled = eventually(Duration::from_secs(30), || {
        daemon.allocations().is_empty()
            && daemon
                .api(Client::status)
                .expect("status")
                .store
                .contains("(0 allocations)")
    });
    assert!(
        settled,
        "released ports did not leave quarantine: {} left, store: {}",
        daemon.allocations().len(),
        daemon.api(Client::status).expect("status").store
    );
    let pid = daemon.pid().expect("the daemon runs");
    Usage {
        maps: map_entries(daemon.pins.path()).counted,
        stored: daemon.allocations().len(),
        fds: open_fds(pid),
        rss_kib: rss_kib(pid),
    }
}

/// Allocates and releases one port `cycles` times through the API.
fn cycle(daemon: &Daemon, cycles: u32, label: &str) -> Duration {
    let started = Instant::now();
    for n in 0..cycles {
        let request = AllocRequest {
            owner: format!("{label}-{n}"),
            ..AllocRequest::default()
        };
        let view = daemon
            .api(|client| client.alloc(&request))
            .expect("allocate");
        daemon
            .api(|client| client.release(view.id))
            .expect("release");
    }
    started.elapsed()
}

#[test]
fn thousands_of_allocate_release_cycles_leave_maps_store_fds_and_memory_as_they_were() {
    if !require_privileges!() {
        return;
    }
    // No quarantine: a released port is free at the next lifecycle tick.
    let daemon = Daemon::start_with_ports(44_200, 44_999, "quarantine = \"0s\"");
    let cycles = size(1_000_u32, 10_000);
    cycle(&daemon, 200, "warm-up");
    let before = settled_usage(&daemon);
    let took = cycle(&daemon, cycles, "cycle");
    let after = settled_usage(&daemon);

    assert_eq!(after.maps, before.maps, "map entries changed");
    assert_eq!(after.stored, 0);
    // Descriptors: exactly as many, once the client connections have been closed.
    let pid = daemon.pid().expect("the daemon runs");
    assert!(
        eventually(Duration::from_secs(10), || open_fds(pid) <= before.fds),
        "descriptors grew from {} to {}",
        before.fds,
        open_fds(pid)
    );
    // Memory: generous (allocator arenas and redb's page cache grow in steps), reported.
    let grown_kib = after.rss_kib.saturating_sub(before.rss_kib);
    assert!(
        grown_kib < 64 * 1024,
        "RSS grew by {grown_kib} KiB over {cycles} cycles ({} -> {} KiB)",
        before.rss_kib,
        after.rss_kib
    );
    let entries_before: usize = before.maps.values().sum();
    report(
        "lifecycle",
        &format!(
            "{cycles} allocate/release cycles through the API, one at a time, after 200 to warm up, with no quarantine."
        ),
        "Once the released ports were freed, every kernel map had as many entries as before, the store held no allocation (status agreeing), the daemon had no more open descriptors than before, and its resident memory grew by less than 64 MiB.",
        &serde_json::json!({
            "cycles": cycles,
            "seconds": took.as_secs_f64(),
            "cycles_per_second": f64::from(cycles) / took.as_secs_f64(),
            "map_entries_before": entries_before,
            "map_entries_after": after.maps.values().sum::<usize>(),
            "store_records_after": after.stored,
            "fds_before": before.fds,
            "fds_after": open_fds(pid),
            "rss_kib_before": before.rss_kib,
            "rss_kib_after": after.rss_kib,
        }),
    );
}

/// Where the distribution's libfaketime (`faketime` package) puts the library that fakes
/// the wall clock of a dynamically linked program (`cargo xtask setup` installs it).
const LIBFAKETIME: [&str; 3] = [
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
    "/usr/lib/faketime/libfaketimeMT.so.1",
];

/// Milliseconds since the epoch on the real clock.
fn real_now_ms() -> i64 {
    i64::try_from(portgate::model::now_millis()).expect("a time")
}

/// The allocation of `id`.
fn view_of(daemon: &Daemon, id: PortId) -> Option<AllocationView> {
    daemon.allocations().remove(&id)
}

#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, told in order")]
fn a_wall_clock_stepped_an_hour_forward_and_back_moves_no_lease_quarantine_or_grant() {
    if !require_privileges!() {
        return;
    }
    let Some(library) = LIBFAKETIME
        .into_iter()
        .find(|path| fs::metadata(path).is_ok())
    else {
        portgate_tests::common::cannot_run(
            "lifecycle_abuse::a_wall_clock_stepped_an_hour",
            "libfaketime is missing: run `cargo xtask setup` (apt-get install faketime)",
        );
        return;
    };
    // The daemon's wall clock (CLOCK_REALTIME) is this file's offset from the real one,
    // read at every call; its monotonic clock, and the kernel's, are left alone. The
    // machine's clock is never touched.
    let mut daemon = Daemon::start(44_000, 44_099);
    assert!(daemon.stop());
    let offset = daemon.dir.path().join("faketime");
    fs::write(&offset, "+0\n").expect("the clock offset");
    daemon.set_env("LD_PRELOAD", library);
    daemon.set_env("FAKETIME_TIMESTAMP_FILE", &offset.to_string_lossy());
    daemon.set_env("FAKETIME_NO_CACHE", "1");
    daemon.set_env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
    daemon.spawn();

    let allocate = |owner: &str, ttl: Option<Duration>, require_auth: bool| {
        let request = AllocRequest {
            owner: owner.to_owned(),
            ttl,
            require_auth,
            ..AllocRequest::default()
        };
        daemon
            .api(|client| client.alloc(&request))
            .expect("allocate")
    };
    let long = allocate("long", Some(Duration::from_hours(2)), false).id;
    let short = allocate("short", Some(Duration::from_mins(30)), false).id;
    let guarded = allocate("guarded", None, true).id;
    let grant = |ip: &str, ttl: u64| {
        let request = portgate::api::GrantRequest {
            ip: ip.parse().expect("an address"),
            ttl: Duration::from_secs(ttl),
        };
        daemon
            .api(|client| client.grant(guarded, &request))
            .expect("grant");
    };
    grant("127.0.0.1", 120);
    let grants_left = || -> BTreeMap<String, Duration> {
        daemon
            .api(|client| client.grants(guarded))
            .expect("grants")
            .into_iter()
            .map(|grant| (grant.ip.to_string(), grant.expires_in))
            .collect()
    };

    // An hour forward.
    fs::write(&offset, "+1h\n").expect("step the clock forward");
    thread::sleep(Duration::from_secs(1));
    let forward = allocate("after-forward", None, false);
    let skew = i64::try_from(forward.timeline.allocated_at).expect("a time") - real_now_ms();
    assert!(
        (3_540_000..3_660_000).contains(&skew),
        "the daemon's clock is not an hour ahead (libfaketime not in effect?): {skew} ms"
    );
    assert_eq!(
        view_of(&daemon, long).map(|view| view.status),
        Some(PortStatus::Active),
        "a lease with two hours left expired when the clock stepped an hour forward"
    );
    let left = grants_left();
    assert!(
        left.get("127.0.0.1")
            .is_some_and(|left| *left > Duration::from_secs(100)),
        "a grant (kept on the monotonic clock) moved with the wall clock: {left:?}"
    );
    let short_after_forward = view_of(&daemon, short).expect("the short lease");
    assert_eq!(
        short_after_forward.status,
        PortStatus::Active,
        "a lease with 30 minutes left expired when the clock stepped an hour forward"
    );

    // A port released now goes Closed, and its quarantine (3 s) must end in about 3 s
    // whatever the clock does meanwhile.
    let released = allocate("released", None, false).id;
    daemon
        .api(|client| client.release(released))
        .expect("release");
    assert!(
        eventually(Duration::from_secs(10), || view_of(&daemon, released)
            .is_some_and(|view| view.status == PortStatus::Closed)),
        "the released port did not close"
    );
    let closed_at = Instant::now();

    // Two hours back: an hour behind the real clock.
    fs::write(&offset, "-1h\n").expect("step the clock back");
    thread::sleep(Duration::from_secs(1));
    let back = allocate("after-back", None, false);
    let skew = i64::try_from(back.timeline.allocated_at).expect("a time") - real_now_ms();
    assert!(
        (-3_660_000..-3_540_000).contains(&skew),
        "the daemon's clock is not an hour behind: {skew} ms"
    );
    for id in [long, short] {
        assert_eq!(
            view_of(&daemon, id).map(|view| view.status),
            Some(PortStatus::Active),
            "{id} left Active when the clock stepped back"
        );
    }
    // Moved by the step as measured (to within the readings' milliseconds).
    let end_after_back = view_of(&daemon, short)
        .and_then(|view| view.timeline.lease_expires_at)
        .expect("a lease");
    let end_after_forward = short_after_forward
        .timeline
        .lease_expires_at
        .expect("a lease");
    assert!(
        (end_after_forward - 2 * 3_600_000).abs_diff(end_after_back) < 1_000,
        "the lease's end did not move with the clock: {end_after_forward} then {end_after_back}"
    );
    assert!(
        eventually(Duration::from_secs(15), || view_of(&daemon, released)
            .is_none()),
        "a 3 s quarantine outlasted the clock stepped back"
    );
    let quarantine_lasted = closed_at.elapsed();
    // A short grant still ends on time.
    grant("127.0.0.2", 3);
    let granted_at = Instant::now();
    assert!(
        eventually(Duration::from_secs(15), || !grants_left()
            .contains_key("127.0.0.2")),
        "a 3 s grant outlived the clock stepped back"
    );
    let grant_lasted = granted_at.elapsed();
    assert!(grant_lasted >= Duration::from_secs(2), "{grant_lasted:?}");
    // The audit log's times follow the daemon's clock.
    let audited = daemon.audit();
    let last = audited
        .last()
        .and_then(|record| record["time"].as_str())
        .expect("an audit time");
    let audited_at = humantime::parse_rfc3339(last).expect("an RFC 3339 time");
    let audited_skew = std::time::SystemTime::now()
        .duration_since(audited_at)
        .unwrap_or_default();
    assert!(
        audited_skew > Duration::from_secs(3_500),
        "the audit time {last} is not the daemon's clock"
    );

    // kill -9 and a start on the stepped clock: everything is there, kernel equal to store.
    let before: BTreeMap<PortId, String> = daemon
        .allocations()
        .into_iter()
        .map(|(id, view)| (id, view.owner))
        .collect();
    daemon.kill9();
    daemon.spawn();
    let after: BTreeMap<PortId, String> = daemon
        .assert_consistent()
        .into_iter()
        .map(|(id, view)| (id, view.owner))
        .collect();
    assert_eq!(after, before);
    assert_eq!(
        view_of(&daemon, short).map(|view| view.status),
        Some(PortStatus::Active),
        "the moved lease was not written to the store"
    );
    report(
        "lifecycle",
        "The daemon ran under libfaketime, its wall clock stepped an hour forward and then two hours back (an hour behind), with leases of 2 h and 30 min, a port released into a 3 s quarantine, an authentication grant of 120 s and then one of 3 s, then was killed with kill -9 and started on the stepped clock.",
        "Both leases stayed Active through both steps, their ends moved with the clock so that each kept the time it had left, also after kill -9; a 3 s quarantine begun before the step back ended within seconds; grants, kept on the monotonic clock, neither lost nor gained time; new allocations and the audit log took the daemon's clock; the kernel maps equalled the store.",
        &serde_json::json!({
            "quarantine_3s_lasted_ms": quarantine_lasted.as_millis(),
            "grant_3s_lasted_ms": grant_lasted.as_millis(),
        }),
    );
    fs::write(&offset, "+0\n").expect("the clock back to real");
}
