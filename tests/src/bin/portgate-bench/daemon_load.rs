//! Section 6: the daemon's resident memory and CPU with 10,000 allocated ports, idle and
//! while connections to one of them are made as fast as the client can.
//!
//! The daemon is the real `portgate daemon` (the tests' harness: its own namespace, cgroup,
//! pin directory and state directory). The ports are allocated through its API; the
//! server listens in a child of the daemon's cgroup, in the daemon's namespace, on one of
//! them, and the load is [`crate::loadgen`]'s.

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use ipnet::IpNet;
use portgate::{
    api::AllocRequest,
    gate::Gate,
    model::{PortId, Protocol},
};
use portgate_common::hook;
use portgate_tests::daemon::Daemon;
use serde_json::json;

use crate::{
    Options,
    loadgen::{self, LoadShape, clock_tick},
    report::Figure,
};

/// The section's title.
pub const SECTION: &str = "6. Daemon under connection load";

const MIN_PORT: u16 = 20_000;
/// The managed range holds more than the allocated ports, as a real one would.
const MAX_PORT: u16 = 30_999;
const PORTS: u16 = 10_000;
/// The port the server listens on.
const MEASURED: u16 = 25_000;
const MAX_CONNECTIONS: u32 = 1_000;
/// Concurrent API clients while allocating.
const API_CLIENTS: usize = 16;
/// Our target, and the specification's.
const OURS_MIB: f64 = 32.0;
const SPEC_BYTES: f64 = 128e6;

/// Memory and CPU of a process, from /proc.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Sample {
    /// `VmRSS`, MiB.
    pub rss_mib: f64,
    /// `VmHWM` (peak RSS so far), MiB.
    pub hwm_mib: f64,
    /// utime + stime, seconds.
    pub cpu_s: f64,
}

impl Sample {
    #[expect(clippy::cast_precision_loss, reason = "kB and clock ticks as decimals")]
    pub fn of(pid: u32) -> Result<Self> {
        let process = procfs::process::Process::new(i32::try_from(pid)?)
            .with_context(|| format!("/proc/{pid}"))?;
        let status = process
            .status()
            .with_context(|| format!("reading /proc/{pid}/status"))?;
        let stat = process
            .stat()
            .with_context(|| format!("reading /proc/{pid}/stat"))?;
        let mib = |kib: Option<u64>| -> Result<f64> {
            kib.map(|kib| kib as f64 / 1024.0)
                .ok_or_else(|| anyhow!("no memory figures in /proc/{pid}/status"))
        };
        Ok(Self {
            rss_mib: mib(status.vmrss)?,
            hwm_mib: mib(status.vmhwm)?,
            cpu_s: (stat.utime + stat.stime) as f64 / clock_tick(),
        })
    }
}

/// Section 6.
pub fn under_load(options: &Options) -> Vec<Figure> {
    match measure(options) {
        Ok(figures) => figures,
        Err(err) => vec![Figure::failed(SECTION, "the whole section", err)],
    }
}

#[expect(clippy::too_many_lines, reason = "the section's steps, in order")]
fn measure(options: &Options) -> Result<Vec<Figure>> {
    let load_for = Duration::from_secs(options.pick(10, 3));
    let idle_for = Duration::from_secs(options.pick(5, 2));
    let daemon = Daemon::start(MIN_PORT, MAX_PORT);
    let pid = daemon
        .pid()
        .ok_or_else(|| anyhow!("the daemon is not running"))?;
    let started = Sample::of(pid)?;

    // 10,000 ports through the API, API_CLIENTS requests at a time.
    eprintln!("portgate-bench: allocating {PORTS} ports through the API");
    let clock = Instant::now();
    let errors = Mutex::new(Vec::<String>::new());
    thread::scope(|scope| {
        for client in 0..API_CLIENTS {
            let (daemon, errors) = (&daemon, &errors);
            scope.spawn(move || {
                let mine = (0..PORTS).filter(|i| usize::from(*i) % API_CLIENTS == client);
                for i in mine {
                    if let Err(err) = allocate(daemon, MIN_PORT + i)
                        && let Ok(mut errors) = errors.lock()
                    {
                        errors.push(err.to_string());
                    }
                }
            });
        }
    });
    let allocating = clock.elapsed();
    let errors = errors.into_inner().unwrap_or_default();
    if !errors.is_empty() {
        bail!(
            "{} of {PORTS} allocations failed, the first: {}",
            errors.len(),
            errors[0]
        );
    }
    let allocated = Sample::of(pid)?;

    // Idle with 10,000 ports: let the daemon settle, then measure over `idle_for`.
    thread::sleep(Duration::from_secs(1));
    let idle_start = Sample::of(pid)?;
    thread::sleep(idle_for);
    let idle_end = Sample::of(pid)?;
    let idle_cpu = 100.0 * (idle_end.cpu_s - idle_start.cpu_s) / idle_for.as_secs_f64();

    // The load, with the daemon's memory sampled every 100 ms.
    eprintln!(
        "portgate-bench: connecting to {MEASURED} for {} s",
        load_for.as_secs()
    );
    let gate = Gate::open(daemon.pins.path()).context("opening the daemon's gate")?;
    let counters_before = gate.counters(PortId::new(MEASURED, Protocol::Tcp))?;
    let server_cgroup = daemon.cgroup.child("bench-server");
    let shape = LoadShape {
        client_threads: 2,
        server_threads: 1,
        warmup: Duration::from_millis(250),
        measure: load_for,
    };
    let stop = AtomicBool::new(false);
    let peak_rss = Mutex::new(0.0_f64);
    let load_start = Sample::of(pid)?;
    let load_clock = Instant::now();
    let outcome = thread::scope(|scope| {
        scope.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                if let (Ok(sample), Ok(mut peak)) = (Sample::of(pid), peak_rss.lock()) {
                    *peak = peak.max(sample.rss_mib);
                }
                thread::sleep(Duration::from_millis(100));
            }
        });
        let outcome = daemon.ns.run(|| -> Result<_> {
            let addr = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), MEASURED);
            let listener = {
                let _inside = server_cgroup.enter();
                loadgen::listen(addr).with_context(|| format!("listening on {addr}"))?
            };
            Ok(loadgen::run(&listener, addr, shape))
        });
        stop.store(true, Ordering::Relaxed);
        outcome
    })?;
    let load_wall = load_clock.elapsed();
    let load_end = Sample::of(pid)?;
    let counters_after = gate.counters(PortId::new(MEASURED, Protocol::Tcp))?;
    drop(gate);
    drop(server_cgroup);
    let load_cpu = 100.0 * (load_end.cpu_s - load_start.cpu_s) / load_wall.as_secs_f64();
    let peak_rss = peak_rss
        .into_inner()
        .unwrap_or_default()
        .max(load_end.rss_mib);
    // VmHWM trails VmRSS by the kernel's batched RSS accounting: the peak is the larger.
    let high_water = load_end
        .hwm_mib
        .max(peak_rss)
        .max(idle_end.rss_mib)
        .max(allocated.rss_mib);
    let skb = usize::from(hook::SKB);
    let gate_accepted = counters_after.hooks[skb].accepted - counters_before.hooks[skb].accepted;
    let gate_dropped = counters_after.hooks[skb].dropped.iter().sum::<u64>()
        - counters_before.hooks[skb].dropped.iter().sum::<u64>();
    let view = daemon
        .api(|client| client.show(PortId::new(MEASURED, Protocol::Tcp)))
        .map_err(|err| err.to_string());

    let raw = json!({
        "ports_allocated": PORTS,
        "managed_range": format!("{MIN_PORT}-{MAX_PORT}"),
        "each_port": format!("allow [10.<i>/28, 127.0.0.0/8], max_conns {MAX_CONNECTIONS}, no owner cgroup"),
        "allocation": format!("POST /v1/ports, {API_CLIENTS} concurrent clients"),
        "allocating_s": allocating.as_secs_f64(),
        "samples": {
            "started": started,
            "allocated": allocated,
            "idle_start": idle_start,
            "idle_end": idle_end,
            "load_start": load_start,
            "load_end": load_end,
        },
        "idle_s": idle_for.as_secs_f64(),
        "idle_cpu_percent": idle_cpu,
        "load": outcome,
        "load_shape": shape,
        "load_wall_s": load_wall.as_secs_f64(),
        "gate_accepted": gate_accepted,
        "gate_dropped": gate_dropped,
        "port_view": view,
    });
    let mut problems = Vec::new();
    if outcome.failures > 0 || gate_dropped > 0 {
        problems.push(format!(
            "{} connects failed, the gate dropped {gate_dropped} packets",
            outcome.failures
        ));
    }
    if gate_accepted != outcome.connections + outcome.failures {
        problems.push(format!(
            "the gate accepted {gate_accepted} connections of {}",
            outcome.connections + outcome.failures
        ));
    }
    let mut figures = vec![
        Figure::measured(
            SECTION,
            "Daemon RSS, idle with 10,000 allocated ports",
            idle_end.rss_mib,
            "MiB",
        )
        .target("< 32 MiB (ours)", |v| v < OURS_MIB)
        .raw(raw),
        Figure::measured(
            SECTION,
            "Daemon RSS, peak during the connection load (sampled every 100 ms)",
            peak_rss,
            "MiB",
        )
        .target("< 32 MiB (ours)", |v| v < OURS_MIB),
        Figure::measured(
            SECTION,
            "Daemon peak RSS over the whole run (VmHWM, allocation included)",
            high_water,
            "MiB",
        )
        .target("< 128 MB (spec)", |v| v * 1024.0 * 1024.0 < SPEC_BYTES),
        Figure::measured(
            SECTION,
            "Daemon CPU during the connection load (% of one core)",
            load_cpu,
            "%",
        )
        .raw(json!({ "idle_cpu_percent": idle_cpu })),
        Figure::measured(
            SECTION,
            "Connection rate during the load (2 client threads, RST close)",
            outcome.rate,
            "conn/s",
        )
        .target("every connect accepted by the gate", |_| {
            problems.is_empty()
        })
        .raw(json!({ "problems": problems })),
        Figure::measured(
            SECTION,
            "Allocating 10,000 ports through the API",
            allocating.as_secs_f64(),
            "s",
        ),
    ];
    if let Err(err) = view {
        figures.push(Figure::failed(
            SECTION,
            "the measured port after the load",
            format!("GET /v1/ports/{MEASURED}: {err}"),
        ));
    }
    drop(daemon);
    Ok(figures)
}

/// `POST /v1/ports` for `port`.
fn allocate(daemon: &Daemon, port: u16) -> Result<()> {
    let index = u32::from(port - MIN_PORT);
    // A /28 of 10/8 of its own per port.
    let own = Ipv4Addr::from(0x0a00_0000 | (index << 4));
    let request = AllocRequest {
        owner: "bench".to_owned(),
        port: Some(port),
        allow: vec![
            IpNet::new(own.into(), 28)?,
            IpNet::new(Ipv4Addr::new(127, 0, 0, 0).into(), 8)?,
        ],
        max_conns: Some(MAX_CONNECTIONS),
        ..AllocRequest::default()
    };
    daemon
        .api(|client| client.alloc(&request))
        .with_context(|| format!("allocating {port}"))?;
    Ok(())
}
