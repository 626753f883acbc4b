//! Section 4: allocation. In-process (the `PortManager` library with a memory store and the
//! daemon's cached socket table, no kernel gate), and through a real daemon's API with 1, 8
//! and 64 concurrent clients, each allocation durable (redb, fsync) before it is answered;
//! both also at 99% of the range allocated.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use portgate::{
    api::AllocRequest,
    client::Client,
    config::PortConfig,
    host::sockets::{CachedSockets, ProcfsSockets},
    manager::{Actor, PortManager},
    model::AllocationRequest,
    store::{MemoryStore, StoredState},
};
use portgate_tests::daemon::Daemon;
use serde_json::json;

use crate::{
    Options,
    daemon_load::Sample,
    report::{Figure, Timed, run_concurrently},
};

const SECTION: &str = "4. Allocation";

/// The daemon's range for the API figures: below the ephemeral range of its namespace.
const API_RANGE: (u16, u16) = (10_000, 31_999);

/// Runs section 4.
pub fn run(options: &Options) -> Vec<Figure> {
    let mut figures = Vec::new();
    let runtime = runtime();
    figures.extend(
        runtime
            .block_on(in_process(options))
            .unwrap_or_else(|err| vec![Figure::failed(SECTION, "in-process allocation", err)]),
    );
    figures.extend(through_api(&runtime, options));
    figures
}

/// A runtime like the daemon's and the CLI's.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The manager as the daemon builds it, minus the gate and the durable store.
pub fn in_process_manager(min_port: u16, max_port: u16) -> Result<PortManager> {
    let config = PortConfig {
        min_port,
        max_port,
        ..PortConfig::default()
    };
    let (manager, _) = PortManager::open(
        config,
        Arc::new(MemoryStore::default()),
        StoredState::default(),
        None,
        Arc::new(CachedSockets::new(
            ProcfsSockets,
            portgate::daemon::SOCKET_SNAPSHOT_AGE,
        )),
    )?;
    Ok(manager)
}

/// Allocates `count` ports one after another, timing each.
async fn allocate_timed(manager: &PortManager, count: usize) -> Result<Vec<Duration>> {
    let mut samples = Vec::with_capacity(count);
    for i in 0..count {
        let start = Instant::now();
        manager
            .allocate(AllocationRequest::new(&format!("bench-{i}")), Actor::Admin)
            .await
            .with_context(|| format!("allocation number {i}"))?;
        samples.push(start.elapsed());
    }
    Ok(samples)
}

async fn in_process(options: &Options) -> Result<Vec<Figure>> {
    let mut figures = Vec::new();
    // An empty range of 50,000 ports.
    let count = options.pick(20_000, 5_000);
    let manager = in_process_manager(10_000, 59_999)?;
    let start = Instant::now();
    let mut samples = allocate_timed(&manager, count).await?;
    let elapsed = start.elapsed();
    figures.extend(rate_figures(
        "in-process",
        elapsed,
        &mut samples,
        &json!({"range": "10000-59999", "store": "memory", "gate": false}),
    ));

    // The same range 99% allocated: time the allocations that take it from 99% to full.
    let manager = in_process_manager(10_000, 59_999)?;
    let size = 50_000;
    let prefill = size * 99 / 100;
    allocate_timed(&manager, prefill).await?;
    let start = Instant::now();
    let mut samples = allocate_timed(&manager, size - prefill).await?;
    let elapsed = start.elapsed();
    figures.extend(rate_figures(
        "in-process, 99% allocated",
        elapsed,
        &mut samples,
        &json!({"range": "10000-59999", "allocated_before": prefill, "store": "memory"}),
    ));
    Ok(figures)
}

/// allocs/s, p50 and p99 of one run, read against the specification's targets.
fn rate_figures(
    what: &str,
    elapsed: Duration,
    samples: &mut [Duration],
    settings: &serde_json::Value,
) -> Vec<Figure> {
    Timed::of(elapsed, samples, settings).figures(
        SECTION,
        what,
        "allocations",
        (">= 1,000/s (spec)", 1_000.0),
        ("< 50 ms (spec)", 50.0),
    )
}

/// Allocations through the API of release daemons: `clients` tasks, client `n` through
/// the daemon at `sockets[n % len]`, each with its own connection per request (as the CLI
/// does), `total` allocations in all.
pub async fn api_run(
    sockets: &[std::path::PathBuf],
    clients: usize,
    total: usize,
) -> Result<(Duration, Vec<Duration>)> {
    let sockets = sockets.to_vec();
    run_concurrently(clients, total, move |client_number, i| {
        let client = Client::new(&sockets[client_number % sockets.len()]);
        async move {
            let request = AllocRequest {
                owner: format!("bench-{client_number}-{i}"),
                ..AllocRequest::default()
            };
            client
                .alloc(&request)
                .await
                .with_context(|| format!("client {client_number}, allocation {i}"))?;
            Ok(())
        }
    })
    .await
}

fn through_api(runtime: &tokio::runtime::Runtime, options: &Options) -> Vec<Figure> {
    let Ok(daemon) = std::panic::catch_unwind(|| Daemon::start(API_RANGE.0, API_RANGE.1)) else {
        return vec![Figure::failed(
            SECTION,
            "daemon API",
            "the daemon did not start (see the panic above)",
        )];
    };
    let size = usize::from(API_RANGE.1 - API_RANGE.0) + 1;
    let mut figures = Vec::new();
    let mut allocated = 0;
    for (clients, total) in [
        (1, options.pick(3_000, 500)),
        (8, options.pick(8_000, 2_000)),
        (64, options.pick(10_000, 3_000)),
    ] {
        let what = format!("daemon API, durable, {clients} client(s)");
        let before = daemon.pid().and_then(|pid| Sample::of(pid).ok());
        match runtime.block_on(api_run(
            std::slice::from_ref(&daemon.socket),
            clients,
            total,
        )) {
            Ok((elapsed, mut samples)) => {
                let after = daemon.pid().and_then(|pid| Sample::of(pid).ok());
                let mut got = rate_figures(
                    &what,
                    elapsed,
                    &mut samples,
                    &json!({"clients": clients, "allocated_before": allocated, "range_size": size,
                           "store": "redb, fsync per group commit", "connection": "one per request"}),
                );
                if clients == 64 {
                    got[0] = got[0]
                        .clone()
                        .target(">= 20,000/s (ours)", |v| v >= 20_000.0);
                    got[2] = got[2].clone().target("< 2 ms (ours)", |v| v < 2.0);
                }
                figures.extend(got);
                // The daemon's own CPU per allocation: what it could do on cores of its own
                // (the clients share this machine's cores with it).
                if let (Some(before), Some(after)) = (before, after) {
                    #[expect(clippy::cast_precision_loss, reason = "a count of allocations")]
                    let per_allocation = (after.cpu_s - before.cpu_s) / total as f64;
                    figures.push(
                        Figure::measured(
                            SECTION,
                            format!("{what}: daemon CPU per allocation"),
                            per_allocation * 1e6,
                            "us",
                        )
                        .raw(json!({"daemon_cpu_s": after.cpu_s - before.cpu_s,
                                    "allocations": total})),
                    );
                }
            }
            Err(err) => figures.push(Figure::failed(SECTION, what, err)),
        }
        allocated += total;
    }

    // Fill to 99% (untimed), then time the last 1% with 8 clients.
    let prefill = size * 99 / 100;
    let what = "daemon API, durable, 8 clients, 99% allocated";
    let result = runtime
        .block_on(api_run(
            std::slice::from_ref(&daemon.socket),
            64,
            prefill.saturating_sub(allocated),
        ))
        .and_then(|_| {
            runtime.block_on(api_run(
                std::slice::from_ref(&daemon.socket),
                8,
                size - prefill,
            ))
        });
    match result {
        Ok((elapsed, mut samples)) => figures.extend(rate_figures(
            what,
            elapsed,
            &mut samples,
            &json!({"clients": 8, "allocated_before": prefill, "range_size": size}),
        )),
        Err(err) => figures.push(Figure::failed(SECTION, what, err)),
    }
    figures
}
