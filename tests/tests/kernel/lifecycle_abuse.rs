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
    let mut daemon = Daemon::start(44_000, 44_199);
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
