//! The daemon's own health in its metrics: the errors it handled, by where they came from;
//! how full each kernel map is; how long the store takes to commit; and the process's own
//! CPU time, memory and descriptors, under the names Prometheus gives every process
//! (`process_cpu_seconds_total`, `process_resident_memory_bytes`, ...).

use std::{
    sync::{Arc, Mutex, OnceLock, PoisonError},
    time::{Duration, Instant},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        gauge::ConstGauge,
        histogram::Histogram,
    },
};

use super::{PortManager, PortMonitor, Result, State, monitor::PortsSnapshot};
use crate::{gate::MapFill, text::Chain};

/// How long one count of the kernel maps' entries serves scrapes: counting walks every
/// map once, so scrapes closer together than this see the same figures.
pub const MAP_FILL_MAX_AGE: Duration = Duration::from_secs(5);

/// Where an error the daemon handled came from: `portgate_errors_total{category}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorSource {
    /// The store refused or failed a commit.
    Store,
    /// The kernel refused a change, or its maps or events could not be read.
    Kernel,
    /// An audit record could not be written.
    Audit,
    /// The fleet's etcd could not be reached or followed.
    Fleet,
    /// The host could not be read (owner cgroups, namespaces, reserved ports).
    Host,
    /// A request was answered with a 5xx: the daemon failed it.
    Api,
}

impl ErrorSource {
    /// Every source, in the order the metric lists them.
    pub const ALL: [Self; 6] = [
        Self::Store,
        Self::Kernel,
        Self::Audit,
        Self::Fleet,
        Self::Host,
        Self::Api,
    ];

    /// Its `category` label.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Store => "store",
            Self::Kernel => "kernel",
            Self::Audit => "audit",
            Self::Fleet => "fleet",
            Self::Host => "host",
            Self::Api => "api",
        }
    }
}

/// The process's own figures, read from `/proc/self`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ProcessStats {
    /// CPU time, user and system, in seconds.
    pub cpu_seconds: f64,
    /// Resident memory in bytes.
    pub resident_bytes: u64,
    /// Virtual memory in bytes.
    pub virtual_bytes: u64,
    /// Open file descriptors.
    pub open_fds: u64,
    /// The most it may open (its soft limit); 0 when unlimited.
    pub max_fds: u64,
    /// When it started, in seconds since the epoch.
    pub start_time_seconds: f64,
}

impl ProcessStats {
    /// The figures of this process now; `None` when `/proc/self` cannot be read.
    #[must_use]
    #[expect(
        clippy::cast_precision_loss,
        reason = "clock ticks and seconds since boot are far below 2^52"
    )]
    pub fn read() -> Option<Self> {
        let me = procfs::process::Process::myself().ok()?;
        let stat = me.stat().ok()?;
        let ticks = procfs::ticks_per_second() as f64;
        let max_fds = me
            .limits()
            .ok()
            .map_or(0, |limits| match limits.max_open_files.soft_limit {
                procfs::process::LimitValue::Value(max) => max,
                procfs::process::LimitValue::Unlimited => 0,
            });
        let boot = procfs::boot_time_secs().unwrap_or(0) as f64;
        Some(Self {
            cpu_seconds: (stat.utime + stat.stime) as f64 / ticks,
            resident_bytes: stat.rss.saturating_mul(procfs::page_size()),
            virtual_bytes: stat.vsize,
            open_fds: me.fd_count().map_or(0, |count| count as u64),
            max_fds,
            start_time_seconds: boot + stat.starttime as f64 / ticks,
        })
    }
}

/// What a scrape shows of the daemon's health besides its counters: the kernel maps' fill
/// (none without the gate) and the process's figures.
#[derive(Clone, Debug, Default)]
pub struct HealthSnapshot {
    /// Each bounded kernel map's entries and capacity.
    pub maps: Vec<MapFill>,
    /// The process.
    pub process: ProcessStats,
}

/// The errors counted, the store's commit latency, and the last count of the maps.
#[derive(Debug)]
pub(super) struct Health {
    errors: [Counter; ErrorSource::ALL.len()],
    /// The store's, once the manager has one that times its commits.
    commit_latency: OnceLock<Histogram>,
    /// The last count of the maps' entries, and when it was made.
    map_fill: Mutex<Option<(Instant, Vec<MapFill>)>>,
}

impl Health {
    pub(super) fn new() -> Self {
        Self {
            errors: Default::default(),
            commit_latency: OnceLock::new(),
            map_fill: Mutex::new(None),
        }
    }

    /// The counter of errors from `source` (shared: incrementing a clone counts).
    pub(super) fn errors(&self, source: ErrorSource) -> &Counter {
        let index = ErrorSource::ALL
            .iter()
            .position(|known| *known == source)
            .unwrap_or_default();
        &self.errors[index]
    }

    /// Shows `histogram` (the store's commit times) from now on; the first one given
    /// stays.
    pub(super) fn watch_commits(&self, histogram: Histogram) {
        let _ = self.commit_latency.set(histogram);
    }

    /// The maps' fill: the last count while it is younger than [`MAP_FILL_MAX_AGE`],
    /// else a new one by `count` (`None`: nothing to count, or it failed).
    pub(super) fn map_fill(&self, count: impl FnOnce() -> Option<Vec<MapFill>>) -> Vec<MapFill> {
        let mut last = self.map_fill.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((at, fill)) = last.as_ref()
            && at.elapsed() < MAP_FILL_MAX_AGE
        {
            return fill.clone();
        }
        let fill = count().unwrap_or_default();
        *last = Some((Instant::now(), fill.clone()));
        fill
    }
}

impl PortMonitor {
    /// Counts an error the daemon handled (`portgate_errors_total{category}`).
    pub fn record_error(&self, source: ErrorSource) {
        self.health.errors(source).inc();
    }

    /// The counter of errors from `source`, for a part of the daemon that counts its own
    /// (the audit log).
    #[must_use]
    pub fn error_counter(&self, source: ErrorSource) -> Counter {
        self.health.errors(source).clone()
    }

    /// Shows the store's commit times (`portgate_store_commit_duration_seconds`).
    pub fn watch_commits(&self, histogram: Histogram) {
        self.health.watch_commits(histogram);
    }
}

impl PortManager {
    /// The Prometheus text exposition.
    pub async fn metrics_text(&self) -> Result<String> {
        let mut snapshot = {
            let state = self.state.lock().await;
            let mut snapshot = super::monitor::snapshot(&state)
                .inspect_err(|_| self.monitor.record_error(ErrorSource::Kernel))?;
            snapshot.health.maps = self.map_fill(&state);
            snapshot
        };
        snapshot.health.process = ProcessStats::read().unwrap_or_default();
        self.monitor
            .encode(snapshot)
            .map_err(|err| super::PortError::MetricCollection {
                what: "the metrics text",
                cause: Box::new(err),
            })
    }

    /// The kernel maps' fill, counted again when the last count is older than
    /// [`MAP_FILL_MAX_AGE`]; none without the gate, or when they cannot be read.
    pub(super) fn map_fill(&self, state: &State) -> Vec<MapFill> {
        self.monitor.health.map_fill(|| {
            let gate = state.gate.as_ref()?;
            gate.map_fill()
                .inspect_err(|err| {
                    self.monitor.record_error(ErrorSource::Kernel);
                    log::warn!("counting the kernel maps' entries: {}", Chain(err));
                })
                .ok()
        })
    }
}

/// Encodes the `portgate_` families of health at each scrape.
#[derive(Debug)]
pub(super) struct HealthCollector {
    pub(super) health: Arc<Health>,
    pub(super) snapshot: Arc<Mutex<PortsSnapshot>>,
}

impl Collector for HealthCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "errors",
            "Errors the daemon handled, by where they came from",
            None,
            MetricType::Counter,
        )?;
        for (source, counter) in ErrorSource::ALL.iter().zip(&self.health.errors) {
            ConstCounter::new(counter.get())
                .encode(family.encode_family(&[("category", source.name())])?)?;
        }
        let empty;
        let commits = if let Some(histogram) = self.health.commit_latency.get() {
            histogram
        } else {
            empty = crate::store::commit_histogram();
            &empty
        };
        commits.encode(encoder.encode_descriptor(
            "store_commit_duration_seconds",
            "Time to write and sync one store transaction (a group of changes)",
            None,
            MetricType::Histogram,
        )?)?;
        let snapshot = self.snapshot.lock().unwrap_or_else(PoisonError::into_inner);
        for (name, help, value) in [
            (
                "map_entries",
                "Entries in each bounded kernel map (PG_ALLOW_PREFIXES: the allowlist prefixes in its tries)",
                (|fill| fill.entries) as fn(&MapFill) -> u64,
            ),
            (
                "map_capacity",
                "The most entries each bounded kernel map holds",
                |fill| fill.capacity,
            ),
        ] {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for fill in &snapshot.health.maps {
                ConstGauge::new(i64::try_from(value(fill)).unwrap_or(i64::MAX))
                    .encode(family.encode_family(&[("map", fill.map)])?)?;
            }
        }
        Ok(())
    }
}

/// Encodes the process's figures, unprefixed, as every Prometheus client names them.
#[derive(Debug)]
pub(super) struct ProcessCollector {
    pub(super) snapshot: Arc<Mutex<PortsSnapshot>>,
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let process = self
            .snapshot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .health
            .process;
        ConstCounter::new(process.cpu_seconds).encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            None,
            MetricType::Counter,
        )?)?;
        for (name, help, value) in [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                process.resident_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                process.virtual_bytes,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors",
                process.open_fds,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors (0: unlimited)",
                process.max_fds,
            ),
        ] {
            ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX))
                .encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)?;
        }
        ConstGauge::new(process.start_time_seconds).encode(encoder.encode_descriptor(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds",
            None,
            MetricType::Gauge,
        )?)
    }
}
