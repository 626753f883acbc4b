//! Section 5: `validate_connection` checks/s (in-process and through the daemon's API), the
//! time of one metrics scrape, of `portgate maps` and of an access change of 10,000
//! prefixes, each with 10,000 allocated ports holding 100 prefixes each, every port with a
//! counter row in the kernel.

use std::{
    net::{IpAddr, Ipv4Addr},
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use ipnet::IpNet;
use portgate::{
    api::AllocRequest,
    client::Client,
    gate::{Gate, PacketHook},
    manager::Actor,
    manager::MAX_ALLOWED_IPS,
    model::{AccessChange, AllocationRequest, Allowlist, PortAccessControl, PortId},
};
use portgate_tests::{
    common::packet::tcp_syn,
    daemon::{Daemon, portgate_bin},
};
use serde_json::json;

use crate::{
    Options,
    allocation::{in_process_manager, runtime},
    report::{Figure, Percentiles, Timed, run_concurrently},
};

const SECTION: &str = "5. Checks, metrics scrape, `portgate maps` (10,000 ports)";

/// Ports allocated, and prefixes in each one's allowlist.
const PORTS: u16 = 10_000;
const PREFIXES: u32 = 100;
/// The daemon's range: exactly the ports allocated.
const MIN_PORT: u16 = 20_000;

/// The allowlist of the `index`th port: 100 disjoint /24s in 10.0.0.0/8, all its own.
fn allowlist(index: u16) -> Allowlist {
    (0..PREFIXES)
        .map(|i| {
            let n = u32::from(index) * PREFIXES + i;
            let [_, a, b, _] = (n << 8).to_be_bytes();
            IpNet::new(IpAddr::V4(Ipv4Addr::new(10, a, b, 0)), 24).expect("a /24")
        })
        .collect()
}

/// An address in the last prefix of the `index`th port's allowlist (the verdict's worst
/// case when the list is scanned in order).
fn allowed_source(index: u16) -> IpAddr {
    let n = u32::from(index) * PREFIXES + PREFIXES - 1;
    let [_, a, b, _] = (n << 8).to_be_bytes();
    IpAddr::V4(Ipv4Addr::new(10, a, b, 7))
}

/// Runs section 5.
pub fn run(options: &Options) -> Vec<Figure> {
    let runtime = runtime();
    let mut figures = runtime
        .block_on(in_process(options))
        .unwrap_or_else(|err| vec![Figure::failed(SECTION, "in-process checks", err)]);
    figures.extend(with_daemon(&runtime, options));
    figures
}

async fn in_process(options: &Options) -> Result<Vec<Figure>> {
    let manager = Arc::new(in_process_manager(MIN_PORT, MIN_PORT + PORTS - 1)?);
    for index in 0..PORTS {
        let mut request = AllocationRequest::new(&format!("bench-{index}"));
        request.port = Some(MIN_PORT + index);
        request.access = PortAccessControl {
            allowed_ips: allowlist(index),
            max_connections: 1_000,
            require_authentication: false,
        };
        manager.allocate(request, Actor::Admin).await?;
    }
    let checks = options.pick(200_000, 50_000);
    let mut figures = Vec::new();
    for tasks in [1_usize, 8] {
        let manager = Arc::clone(&manager);
        let (elapsed, mut samples) = run_concurrently(tasks, checks, move |task, i| {
            let manager = Arc::clone(&manager);
            async move {
                let index = spread(task, i);
                manager
                    .validate_connection(MIN_PORT + index, allowed_source(index))
                    .await
                    .context("an allowed source was refused")?;
                Ok(())
            }
        })
        .await?;
        figures.extend(check_figures(
            &format!("in-process validate_connection, {tasks} task(s)"),
            elapsed,
            &mut samples,
            &json!({"tasks": tasks, "ports": PORTS, "prefixes_per_port": PREFIXES,
                   "source": "in the last prefix of the port's allowlist", "gate": false}),
        ));
    }
    Ok(figures)
}

fn check_figures(
    what: &str,
    elapsed: Duration,
    samples: &mut [Duration],
    settings: &serde_json::Value,
) -> Vec<Figure> {
    Timed::of(elapsed, samples, settings).figures(
        SECTION,
        what,
        "checks",
        (">= 5,000/s (spec)", 5_000.0),
        ("< 20 ms (spec)", 20.0),
    )
}

/// Allocates the 10,000 ports through the API (64 clients) and gives every port a counter
/// row by test-running one refused SYN to it.
async fn fill(daemon: &Daemon) -> Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    let clients: u16 = 64;
    for client_number in 0..clients {
        let client = Client::new(&daemon.socket);
        tasks.spawn(async move {
            for index in (client_number..PORTS).step_by(usize::from(clients)) {
                let request = AllocRequest {
                    owner: format!("bench-{index}"),
                    port: Some(MIN_PORT + index),
                    allow: allowlist(index).iter().copied().collect(),
                    max_conns: Some(1_000),
                    ..AllocRequest::default()
                };
                client
                    .alloc(&request)
                    .await
                    .with_context(|| format!("allocating {}", MIN_PORT + index))?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}

/// The times of the access changes that add 10,000 prefixes and of those that take them
/// out again.
struct AccessChangeTimes {
    adding: Vec<Duration>,
    removing: Vec<Duration>,
}

/// `rounds` times: replaces the first port's 100 prefixes with 10,000 others (/24s in
/// 11.0.0.0/8), then puts the 100 back, timing each `PATCH /v1/ports/{port}/access`.
async fn access_change_times(daemon: &Daemon, rounds: usize) -> Result<AccessChangeTimes> {
    let client = Client::new(&daemon.socket);
    let id = PortId::from(MIN_PORT);
    let small = allowlist(0);
    let large: Allowlist = (0..u32::try_from(MAX_ALLOWED_IPS)?)
        .map(|n| {
            let [_, _, a, b] = n.to_be_bytes();
            IpNet::new(IpAddr::V4(Ipv4Addr::new(11, a, b, 0)), 24).expect("a /24")
        })
        .collect();
    let mut times = AccessChangeTimes {
        adding: Vec::with_capacity(rounds),
        removing: Vec::with_capacity(rounds),
    };
    for _ in 0..rounds {
        for (remove, allow) in [(&small, &large), (&large, &small)] {
            let change = AccessChange {
                allow: allow.clone(),
                remove: remove.clone(),
                ..AccessChange::default()
            };
            let begun = Instant::now();
            let view = client.access(id, &change).await?;
            let took = begun.elapsed();
            ensure!(
                view.access.allowed_ips == *allow,
                "the access change left {} prefixes, not {}",
                view.access.allowed_ips.len(),
                allow.len()
            );
            if allow.len() > small.len() {
                times.adding.push(took);
            } else {
                times.removing.push(took);
            }
        }
    }
    Ok(times)
}

fn touch_counters(daemon: &Daemon) -> Result<()> {
    let mut gate = Gate::open(daemon.pins.path())?;
    for index in 0..PORTS {
        let packet = tcp_syn(
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            40_000,
            MIN_PORT + index,
        );
        if gate.test_run(PacketHook::CgroupSkb, &packet, 1)?.passed {
            bail!(
                "a SYN from outside the allowlist passed port {}",
                MIN_PORT + index
            );
        }
    }
    Ok(())
}

fn with_daemon(runtime: &tokio::runtime::Runtime, options: &Options) -> Vec<Figure> {
    let Ok(daemon) = std::panic::catch_unwind(|| Daemon::start(MIN_PORT, MIN_PORT + PORTS - 1))
    else {
        return vec![Figure::failed(
            SECTION,
            "daemon with 10,000 ports",
            "the daemon did not start (see the panic above)",
        )];
    };
    let set_up = Instant::now();
    if let Err(err) = runtime
        .block_on(fill(&daemon))
        .and_then(|()| touch_counters(&daemon))
    {
        return vec![Figure::failed(SECTION, "daemon with 10,000 ports", err)];
    }
    let set_up = set_up.elapsed();
    let mut figures = Vec::new();

    // Checks through the API: 8 clients, one connection per request as the CLI does.
    let checks = options.pick(20_000, 5_000);
    let what = "daemon API check, 8 clients";
    match runtime.block_on(api_checks(&daemon, 8, checks)) {
        Ok((elapsed, mut samples)) => figures.extend(check_figures(
            what,
            elapsed,
            &mut samples,
            &json!({"clients": 8, "ports": PORTS, "prefixes_per_port": PREFIXES, "gate": true,
                   "set_up_seconds": set_up.as_secs_f64()}),
        )),
        Err(err) => figures.push(Figure::failed(SECTION, what, err)),
    }

    // One scrape of /metrics (over the API socket), several times.
    let scrapes = options.pick(30, 10);
    let what = "one metrics scrape (/metrics, 10,000 ports)";
    match runtime.block_on(scrape_times(&daemon, scrapes)) {
        Ok((mut samples, bytes)) => {
            let latency = Percentiles::of(&mut samples);
            figures.push(
                Figure::measured(SECTION, what, latency.p50_ms, "ms (p50)")
                    .target("< 5 ms (spec)", |v| v < 5.0)
                    .raw(json!({"latency": latency, "bytes": bytes,
                                "series": "10 per port: accepted, bytes, packets, bind_denied, 5 drop reasons, active"})),
            );
        }
        Err(err) => figures.push(Figure::failed(SECTION, what, err)),
    }

    // One port's metrics (the specification's get_metrics) through the API.
    let what = "one port's metrics (GET /v1/stats?port=, 10,000 ports)";
    match runtime.block_on(port_stats_times(&daemon, options.pick(2_000, 500))) {
        Ok(mut samples) => {
            let latency = Percentiles::of(&mut samples);
            figures.push(
                Figure::measured(SECTION, what, latency.p99_ms, "ms (p99)")
                    .target("< 5 ms (spec)", |v| v < 5.0)
                    .raw(json!({"latency": latency})),
            );
        }
        Err(err) => figures.push(Figure::failed(SECTION, what, err)),
    }

    // An access change of 10,000 prefixes: one port's 100 replaced by 10,000 others, and
    // back, each timed from the request to the answer (kernel and store included).
    match runtime.block_on(access_change_times(&daemon, options.pick(10, 3))) {
        Ok(times) => {
            for (what, mut samples) in [
                (
                    "access change adding 10,000 prefixes (PATCH, 10,000 ports)",
                    times.adding,
                ),
                (
                    "access change removing 10,000 prefixes (PATCH, 10,000 ports)",
                    times.removing,
                ),
            ] {
                let latency = Percentiles::of(&mut samples);
                figures.push(
                    Figure::measured(SECTION, what, latency.p50_ms, "ms (p50)")
                        .target("< 50 ms (issue #9)", |v| v < 50.0)
                        .raw(json!({"latency": latency, "rounds": samples.len()})),
                );
            }
        }
        Err(err) => figures.push(Figure::failed(
            SECTION,
            "access change of 10,000 prefixes",
            err,
        )),
    }

    // `portgate maps`: the whole CLI process, reading the pins.
    let what = "`portgate maps` (10,000 ports, whole process)";
    match maps_times(&daemon, options.pick(10, 3)) {
        Ok(mut samples) => {
            let latency = Percentiles::of(&mut samples);
            figures.push(
                Figure::measured(SECTION, what, latency.p50_ms, "ms (p50)")
                    .raw(json!({"latency": latency})),
            );
        }
        Err(err) => figures.push(Figure::failed(SECTION, what, err)),
    }
    figures
}

async fn api_checks(
    daemon: &Daemon,
    clients: usize,
    total: usize,
) -> Result<(Duration, Vec<Duration>)> {
    let socket = daemon.socket.clone();
    run_concurrently(clients, total, move |client_number, i| {
        let client = Client::new(&socket);
        async move {
            let index = spread(client_number, i);
            let answer = client
                .check(PortId::from(MIN_PORT + index), allowed_source(index))
                .await?;
            if !answer.allowed {
                bail!(
                    "an allowed source was refused by check on {}",
                    MIN_PORT + index
                );
            }
            Ok(())
        }
    })
    .await
}

/// The port (an index below [`PORTS`]) of task `task`'s `i`th check: the tasks walk the
/// ports at different offsets.
fn spread(task: usize, i: usize) -> u16 {
    #[expect(clippy::cast_possible_truncation, reason = "modulo PORTS")]
    let index = ((i * 7 + task * 13) % usize::from(PORTS)) as u16;
    index
}

async fn scrape_times(daemon: &Daemon, scrapes: usize) -> Result<(Vec<Duration>, usize)> {
    let client = Client::new(&daemon.socket);
    let mut samples = Vec::with_capacity(scrapes);
    let mut bytes = 0;
    for _ in 0..scrapes {
        let begun = Instant::now();
        let text = client.metrics().await?;
        samples.push(begun.elapsed());
        bytes = text.len();
        if !text.contains(&format!("port=\"{}\"", MIN_PORT + PORTS - 1)) {
            bail!("the scrape lacks the last port");
        }
    }
    Ok((samples, bytes))
}

async fn port_stats_times(daemon: &Daemon, count: usize) -> Result<Vec<Duration>> {
    let client = Client::new(&daemon.socket);
    let mut samples = Vec::with_capacity(count);
    for i in 0..count {
        #[expect(clippy::cast_possible_truncation, reason = "modulo PORTS")]
        let port = MIN_PORT + ((i * 7) % usize::from(PORTS)) as u16;
        let begun = Instant::now();
        let reports = client.stats(Some(PortId::from(port))).await?;
        samples.push(begun.elapsed());
        if reports.len() != 1 || reports[0].id.port != port {
            bail!(
                "GET /v1/stats?port={port} answered {} reports",
                reports.len()
            );
        }
    }
    Ok(samples)
}

fn maps_times(daemon: &Daemon, runs: usize) -> Result<Vec<Duration>> {
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let begun = Instant::now();
        let status = Command::new(portgate_bin())
            .arg("maps")
            .arg("--pin-dir")
            .arg(daemon.pins.path())
            .stdout(Stdio::null())
            .status()
            .context("running portgate maps")?;
        samples.push(begun.elapsed());
        if !status.success() {
            bail!("portgate maps failed ({status})");
        }
    }
    Ok(samples)
}
