//! Section 8: fleet mode. Three release daemons in network namespaces of their own on one
//! etcd (its own namespace too, over veth pairs; the distribution's etcd with its default
//! fsync): allocations through the daemons' APIs with 1, 8 and 64 clients spread over the
//! three, each answered once etcd took the claim and the node applied it; and how long a
//! policy changed through one node takes to reach the other two nodes' kernels.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use portgate::{
    api::AllocRequest,
    client::Client,
    model::{AccessChange, PortId, Protocol},
};
use portgate_tests::fleet::Fleet;
use serde_json::json;

use crate::{
    Options,
    allocation::{api_run, runtime},
    report::{Figure, Percentiles, Timed},
};

/// The section's title.
pub const SECTION: &str = "8. Fleet (etcd, three nodes)";

/// The fleet's range.
const RANGE: (u16, u16) = (10_000, 31_999);

/// Runs section 8.
pub fn run(options: &Options) -> Vec<Figure> {
    let Ok(fleet) = std::panic::catch_unwind(|| Fleet::start(RANGE)) else {
        return vec![Figure::failed(
            SECTION,
            "the fleet",
            "etcd or a daemon did not start (see the panic above)",
        )];
    };
    let runtime = runtime();
    let sockets: Vec<std::path::PathBuf> = fleet
        .daemons
        .iter()
        .map(|daemon| daemon.socket.clone())
        .collect();
    let mut figures = Vec::new();
    for (clients, total) in [
        (1, options.pick(1_000, 200)),
        (8, options.pick(3_000, 800)),
        (64, options.pick(4_000, 1_500)),
    ] {
        let what = format!("fleet allocation, {clients} client(s) over 3 nodes");
        match runtime.block_on(api_run(&sockets, clients, total)) {
            Ok((elapsed, mut samples)) => figures.extend(
                Timed::of(
                    elapsed,
                    &mut samples,
                    &json!({"clients": clients, "nodes": 3, "etcd": "3.4, one member, fsync",
                            "connection": "one per request"}),
                )
                .figures(
                    SECTION,
                    &what,
                    "allocations",
                    (">= 1,000/s (spec, one host)", 1_000.0),
                    ("< 50 ms (spec, one host)", 50.0),
                ),
            ),
            Err(err) => figures.push(Figure::failed(SECTION, what, err)),
        }
    }
    let rounds = options.pick(100, 30);
    match runtime.block_on(propagation(&fleet, rounds)) {
        Ok(mut samples) => {
            let latency = Percentiles::of(&mut samples);
            figures.push(
                Figure::measured(
                    SECTION,
                    "policy propagation to the other nodes' kernels, p50",
                    latency.p50_ms,
                    "ms",
                )
                .raw(json!({"rounds": rounds, "polled": "each node's stats API, every 1 ms"})),
            );
            figures.push(Figure::measured(
                SECTION,
                "policy propagation to the other nodes' kernels, p99",
                latency.p99_ms,
                "ms",
            ));
        }
        Err(err) => figures.push(Figure::failed(SECTION, "policy propagation", err)),
    }
    figures
}

/// `rounds` policy changes through node a, each timed until both other nodes' kernels
/// hold it (as their stats, read from their pinned maps, say).
async fn propagation(fleet: &Fleet, rounds: usize) -> Result<Vec<Duration>> {
    let clients: Vec<Client> = fleet
        .daemons
        .iter()
        .map(|daemon| Client::new(&daemon.socket))
        .collect();
    let made = clients[0]
        .alloc(&AllocRequest {
            owner: "fleet-bench-policy".to_owned(),
            ..AllocRequest::default()
        })
        .await
        .context("allocating the port whose policy changes")?;
    let id = PortId::new(made.id.port, Protocol::Tcp);
    let mut samples = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let limit = u32::try_from(round % 1_000).unwrap_or(0) + 1;
        let change = AccessChange {
            max_connections: Some(limit),
            ..AccessChange::default()
        };
        let started = Instant::now();
        clients[0].access(id, &change).await.context("the change")?;
        for other in &clients[1..] {
            loop {
                let held = other.stats(Some(id)).await.ok().and_then(|reports| {
                    reports.first().map(|report| report.access.max_connections)
                });
                if held == Some(limit) {
                    break;
                }
                if started.elapsed() > Duration::from_secs(30) {
                    bail!("round {round}: the change did not reach a node in 30 s");
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        samples.push(started.elapsed());
    }
    Ok(samples)
}
