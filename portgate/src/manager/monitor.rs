//! The specification's `PortMonitor`: per-port counters from the kernel, the deny-event
//! stream, and the Prometheus metrics.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
};

use prometheus_client::{
    collector::Collector,
    encoding::{
        DescriptorEncoder, EncodeLabel as _, EncodeLabelSet, EncodeMetric as _, LabelSetEncoder,
    },
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::ConstGauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio::sync::broadcast;

use super::{
    PortError, Result, State,
    health::{Health, HealthCollector, HealthSnapshot, ProcessCollector},
};
use crate::{
    gate::{DenyEventRecord, GateStats},
    model::{DropReason, PortId, PortMetrics, PortStatus, Protocol, UnixMillis, now_millis},
};

/// The deny events kept for `portgate events` (the newest are kept).
pub const RECENT_EVENTS: usize = 1024;

/// One allocated port as a scrape shows it.
#[derive(Clone, Debug)]
pub struct PortSample {
    /// The port.
    pub id: PortId,
    /// Its namespace's `netns` label ([`NetnsId::name`](crate::model::NetnsId::name)):
    /// `host`, or its allocation's label.
    pub netns: String,
    /// Its status.
    pub status: PortStatus,
    /// Its connection limit (`max_connections`); 0: none.
    pub max_connections: u32,
    /// Its counters.
    pub metrics: PortMetrics,
}

/// What one scrape shows about the ports: filled in by the manager, encoded by the monitor.
#[derive(Clone, Debug, Default)]
pub struct PortsSnapshot {
    /// Each allocated port.
    pub ports: Vec<PortSample>,
    /// New connections dropped on managed ports without an allocation, per protocol.
    pub unallocated_drops: Vec<(Protocol, u64)>,
    /// Ports that can be handed out now, per protocol.
    pub free: Vec<(Protocol, u64)>,
    /// The gate-wide statistics (lost deny events, reservations refused and swept,
    /// packets and connections the gate could not read or count).
    pub gate: GateStats,
    /// Handshakes on limited ports holding a reservation now.
    pub handshakes_in_flight: u64,
    /// Allocated ports whose owner cgroup no longer exists.
    pub owner_gone: u64,
    /// The daemon's own health: the kernel maps' fill and the process's figures.
    pub health: HealthSnapshot,
}

/// What a scrape shows of `state`, read from the kernel in one pass per map: each
/// allocation's status and counters, the drops on ports no allocation explains, the free
/// ports, and the lost events.
pub(super) fn snapshot(state: &State) -> Result<PortsSnapshot> {
    let mut snapshot = PortsSnapshot::default();
    let mut counted = match state.gate.as_ref() {
        Some(gate) => gate.all_counters().map_err(PortError::counters)?,
        None => std::collections::BTreeMap::new(),
    };
    let connections = state.all_connections();
    for held in state.allocator.allocations() {
        let counters = counted.remove(&held.id).unwrap_or_default();
        let active = connections.of(held.id);
        snapshot.ports.push(PortSample {
            id: held.id,
            netns: held.id.netns.name(held.netns_label()),
            status: held.status,
            max_connections: held.access.max_connections,
            metrics: counters.metrics(active),
        });
    }
    // Ports without an allocation that were knocked on (scans): one total per protocol,
    // not a series per port a scanner tried.
    let mut unallocated = [0_u64; 2];
    for (id, counters) in counted {
        let slot = usize::from(id.protocol == Protocol::Udp);
        unallocated[slot] += counters
            .total
            .dropped_for(portgate_common::reason::UNALLOCATED);
    }
    snapshot.unallocated_drops = vec![
        (Protocol::Tcp, unallocated[0]),
        (Protocol::Udp, unallocated[1]),
    ];
    snapshot.free = super::free_ports(&state.allocator);
    if let Some(gate) = state.gate.as_ref() {
        snapshot.gate = gate.stats().map_err(PortError::counters)?;
    }
    snapshot.handshakes_in_flight = connections.in_flight();
    snapshot.owner_gone = state.owner_gone();
    Ok(snapshot)
}

/// The warnings `status` shows for what the gate counted since it was installed: every
/// one of them means connections were refused, or counted wrong, for want of room.
#[must_use]
pub fn gate_warnings(stats: &GateStats) -> Vec<String> {
    use portgate_common::capacity::{PENDING, PENDING_PER_PORT};
    let mut warnings = Vec::new();
    if stats.pending_full > 0 {
        warnings.push(format!(
            "the kernel's reservation map was full: {} handshakes on ports with a connection limit were refused as conn_limit (room for {PENDING} in flight over all ports; a SYN flood at several limited ports fills it)",
            stats.pending_full
        ));
    }
    if stats.pending_port_full > 0 {
        warnings.push(format!(
            "{} handshakes were refused as conn_limit because their port already had {PENDING_PER_PORT} in flight (a SYN flood at that port)",
            stats.pending_port_full
        ));
    }
    if stats.sockets_full > 0 {
        warnings.push(format!(
            "{} established connections could not be tracked (the kernel could not make their socket storage: out of memory): they hold no slot and are not counted as active",
            stats.sockets_full
        ));
    }
    if stats.unreserved > 0 {
        warnings.push(format!(
            "{} connections on ports with a connection limit were established without passing cgroup_skb, and are not counted",
            stats.unreserved
        ));
    }
    warnings
}

/// API actions, as the latency histogram's label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct ActionLabel {
    action: String,
}

/// The labels of `portgate_auth_total`: `ok`, or `refused` with its reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KnockLabel {
    result: &'static str,
    reason: &'static str,
}

/// Counters, events and metrics.
#[derive(Debug)]
pub struct PortMonitor {
    registry: Registry,
    snapshot: Arc<Mutex<PortsSnapshot>>,
    allocations: Counter,
    lease_expiries: Counter,
    api_latency: Family<ActionLabel, Histogram>,
    knocks: Family<KnockLabel, Counter>,
    gate_watch: super::GateWatch,
    events: broadcast::Sender<(UnixMillis, DenyEventRecord)>,
    recent: Mutex<VecDeque<(UnixMillis, DenyEventRecord)>>,
    pub(super) health: Arc<Health>,
    /// The process's figures, unprefixed (`process_cpu_seconds_total`, ...).
    process: Registry,
}

impl Default for PortMonitor {
    fn default() -> Self {
        Self::new()
    }
}

impl PortMonitor {
    /// A monitor with every metric registered and no events yet.
    #[must_use]
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("portgate");
        let allocations = Counter::default();
        registry.register(
            "allocations",
            "Ports allocated since the daemon started",
            allocations.clone(),
        );
        let lease_expiries = Counter::default();
        registry.register(
            "lease_expiries",
            "Leases that ran out (the port went Draining)",
            lease_expiries.clone(),
        );
        let api_latency = Family::<ActionLabel, Histogram>::new_with_constructor(|| {
            // 10 us .. ~0.3 s
            Histogram::new(exponential_buckets(0.000_01, 2.0, 16))
        });
        registry.register(
            "api_request_duration_seconds",
            "Time to answer an API request, by action",
            api_latency.clone(),
        );
        let knocks = Family::<KnockLabel, Counter>::default();
        registry.register(
            "auth",
            "Knocks received, accepted (reason \"none\") or refused, by reason",
            knocks.clone(),
        );
        let gate_watch = super::GateWatch::default();
        gate_watch.register(&mut registry);
        let snapshot = Arc::new(Mutex::new(PortsSnapshot::default()));
        registry.register_collector(Box::new(PortsCollector {
            snapshot: Arc::clone(&snapshot),
        }));
        let health = Arc::new(Health::new());
        registry.register_collector(Box::new(HealthCollector {
            health: Arc::clone(&health),
            snapshot: Arc::clone(&snapshot),
        }));
        let mut process = Registry::default();
        process.register_collector(Box::new(ProcessCollector {
            snapshot: Arc::clone(&snapshot),
        }));
        let (events, _) = broadcast::channel(RECENT_EVENTS);
        Self {
            registry,
            snapshot,
            allocations,
            lease_expiries,
            api_latency,
            knocks,
            gate_watch,
            events,
            recent: Mutex::new(VecDeque::with_capacity(RECENT_EVENTS)),
            health,
            process,
        }
    }

    /// The gate's watch: pins put back, the cgroup attachment.
    #[must_use]
    pub const fn gate_watch(&self) -> &super::GateWatch {
        &self.gate_watch
    }

    /// Counts an allocation.
    pub fn record_allocation(&self) {
        self.allocations.inc();
    }

    /// Counts a knock: `"ok"`, or the reason it was refused.
    pub fn record_knock(&self, outcome: &'static str) {
        let label = if outcome == "ok" {
            KnockLabel {
                result: "accepted",
                reason: "none",
            }
        } else {
            KnockLabel {
                result: "refused",
                reason: outcome,
            }
        };
        self.knocks.get_or_create(&label).inc();
    }

    /// Counts a lease expiry.
    pub fn record_lease_expiry(&self) {
        self.lease_expiries.inc();
    }

    /// Records how long an API request took.
    pub fn record_api_latency(&self, action: &str, seconds: f64) {
        self.api_latency
            .get_or_create(&ActionLabel {
                action: action.to_owned(),
            })
            .observe(seconds);
    }

    /// Takes a deny event from the kernel: stamped with the time it was read, kept for
    /// `portgate events`, sent to followers.
    pub fn record_event(&self, event: DenyEventRecord) {
        let event = (now_millis(), event);
        {
            let mut recent = self
                .recent
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if recent.len() == RECENT_EVENTS {
                recent.pop_front();
            }
            recent.push_back(event.clone());
        }
        // No follower is not an error.
        let _ignored = self.events.send(event);
    }

    /// The deny events kept, oldest first, with the time each was read.
    #[must_use]
    pub fn recent_events(&self) -> Vec<(UnixMillis, DenyEventRecord)> {
        self.recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }

    /// Every deny event from now on.
    #[must_use]
    pub fn subscribe(&self) -> broadcast::Receiver<(UnixMillis, DenyEventRecord)> {
        self.events.subscribe()
    }

    /// The Prometheus text exposition of every metric, with the ports as in `snapshot`.
    pub fn encode(&self, snapshot: PortsSnapshot) -> Result<String, std::fmt::Error> {
        let mut guard = self
            .snapshot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *guard = snapshot;
        let mut text = String::new();
        // The collector locks the snapshot itself: release it first.
        drop(guard);
        prometheus_client::encoding::text::encode_registry(&mut text, &self.registry)?;
        prometheus_client::encoding::text::encode_registry(&mut text, &self.process)?;
        prometheus_client::encoding::text::encode_eof(&mut text)?;
        Ok(text)
    }
}

/// Encodes the per-port families from the latest snapshot at each scrape.
#[derive(Debug)]
struct PortsCollector {
    snapshot: Arc<Mutex<PortsSnapshot>>,
}

type Labels = Vec<(&'static str, String)>;

/// A port's labels, `port`, `proto` and `netns` in that order (then `reason` where a family
/// has one), encoded without allocating (a scrape writes 11 series per port).
#[derive(Clone, Copy, Debug)]
struct PortLabels<'a> {
    port: u16,
    proto: &'static str,
    netns: &'a str,
}

impl<'a> PortLabels<'a> {
    fn of(sample: &'a PortSample) -> Self {
        Self {
            port: sample.id.port,
            proto: sample.id.protocol.name(),
            netns: &sample.netns,
        }
    }
}

impl EncodeLabelSet for PortLabels<'_> {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> Result<(), std::fmt::Error> {
        ("port", self.port).encode(encoder.encode_label())?;
        ("proto", self.proto).encode(encoder.encode_label())?;
        ("netns", self.netns).encode(encoder.encode_label())
    }
}

/// A per-port counter family: name, help, and how to read it.
type CounterFamily = (&'static str, &'static str, fn(&PortMetrics) -> u64);

/// The per-port counters exported as plain families.
const PORT_COUNTERS: [CounterFamily; 4] = [
    ("port_accepted", "New connections let in, per port", |m| {
        m.accepted
    }),
    ("port_bytes", "Bytes judged, per port", |m| m.bytes),
    ("port_packets", "Packets judged, per port", |m| m.packets),
    ("port_bind_denied", "bind() calls refused, per port", |m| {
        m.bind_denied
    }),
];

/// A per-port gauge family: name, help, and how to read it.
type GaugeFamily = (&'static str, &'static str, fn(&PortSample) -> u64);

/// The per-port gauges.
const PORT_GAUGES: [GaugeFamily; 2] = [
    (
        "port_active_connections",
        "Established TCP connections, per port",
        |sample| sample.metrics.active,
    ),
    (
        "port_max_connections",
        "The most TCP connections each port holds at once (its max_connections; 0: no limit)",
        |sample| u64::from(sample.max_connections),
    ),
];

fn gauge(value: impl TryInto<i64>) -> ConstGauge<i64> {
    ConstGauge::new(value.try_into().unwrap_or(i64::MAX))
}

impl PortsCollector {
    fn encode_ports(
        snapshot: &PortsSnapshot,
        encoder: &mut DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        let ports = &snapshot.ports;
        for (name, help, value) in PORT_COUNTERS {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for sample in ports {
                let labels = PortLabels::of(sample);
                ConstCounter::new(value(&sample.metrics)).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "port_dropped",
            "Packets of new connections dropped, per port and reason",
            None,
            MetricType::Counter,
        )?;
        for sample in ports {
            for reason in DropReason::ALL {
                let labels = (PortLabels::of(sample), [("reason", reason.name())]);
                ConstCounter::new(sample.metrics.dropped.get(reason))
                    .encode(family.encode_family(&labels)?)?;
            }
        }
        for (name, help, value) in PORT_GAUGES {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for sample in ports {
                gauge(value(sample)).encode(family.encode_family(&PortLabels::of(sample))?)?;
            }
        }
        Ok(())
    }

    fn encode_range(
        snapshot: &PortsSnapshot,
        encoder: &mut DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        let proto = |protocol: &Protocol| vec![("proto", protocol.to_string())];
        let allocated = Protocol::ALL.into_iter().flat_map(|protocol| {
            [PortStatus::Active, PortStatus::Draining, PortStatus::Closed].map(|status| {
                let count = snapshot
                    .ports
                    .iter()
                    .filter(|sample| sample.id.protocol == protocol && sample.status == status)
                    .count();
                let labels = vec![
                    ("proto", protocol.to_string()),
                    ("status", status.to_string()),
                ];
                (labels, u64::try_from(count).unwrap_or(u64::MAX))
            })
        });
        encode_values(
            encoder,
            (
                "allocated_ports",
                "Allocated ports, per protocol and status",
            ),
            MetricType::Gauge,
            allocated,
        )?;
        encode_values(
            encoder,
            (
                "free_ports",
                "Ports that can be allocated now, per protocol",
            ),
            MetricType::Gauge,
            snapshot
                .free
                .iter()
                .map(|(protocol, free)| (proto(protocol), *free)),
        )?;
        encode_values(
            encoder,
            (
                "ports_owner_gone",
                "Allocated ports whose owner cgroup no longer exists",
            ),
            MetricType::Gauge,
            [(Labels::new(), snapshot.owner_gone)],
        )?;
        encode_values(
            encoder,
            (
                "unallocated_dropped",
                "New connections dropped on managed ports without an allocation, per protocol",
            ),
            MetricType::Counter,
            snapshot
                .unallocated_drops
                .iter()
                .map(|(protocol, drops)| (proto(protocol), *drops)),
        )?;
        encode_values(
            encoder,
            ("events_lost", "Deny events not delivered, by cause"),
            MetricType::Counter,
            [
                ("ring_full", snapshot.gate.events_lost_full),
                ("rate_limited", snapshot.gate.events_rate_limited),
            ]
            .map(by_cause),
        )?;
        Self::encode_gate(snapshot, encoder)
    }

    /// The gate-wide statistics: reservations, their refusals and sweeps, and what the
    /// kernel dropped or left uncounted for want of room or of readable headers.
    fn encode_gate(
        snapshot: &PortsSnapshot,
        encoder: &mut DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        let gate = &snapshot.gate;
        let none = || Labels::new();
        encode_values(
            encoder,
            (
                "handshakes_in_flight",
                "Handshakes on ports with a connection limit holding a reservation",
            ),
            MetricType::Gauge,
            [(none(), snapshot.handshakes_in_flight)],
        )?;
        encode_values(
            encoder,
            (
                "handshakes_refused",
                "Handshakes refused (as conn_limit) for want of room for their reservation, by cause",
            ),
            MetricType::Counter,
            [
                ("map_full", gate.pending_full),
                ("port_share_full", gate.pending_port_full),
            ]
            .map(by_cause),
        )?;
        encode_values(
            encoder,
            (
                "reservation_sweeps",
                "Sweeps of expired handshake reservations",
            ),
            MetricType::Counter,
            [(none(), gate.pending_sweeps)],
        )?;
        encode_values(
            encoder,
            (
                "unparsable_dropped",
                "TCP and UDP packets dropped because their ports could not be read",
            ),
            MetricType::Counter,
            [(none(), gate.unparsable)],
        )?;
        encode_values(
            encoder,
            (
                "connections_uncounted",
                "Established connections the gate could not count, by cause",
            ),
            MetricType::Counter,
            [
                ("socket_storage_failed", gate.sockets_full),
                ("unreserved", gate.unreserved),
            ]
            .map(by_cause),
        )
    }
}

/// A value under its `cause` label.
fn by_cause((cause, count): (&str, u64)) -> (Labels, u64) {
    (vec![("cause", cause.to_owned())], count)
}

/// One family (`name`, `help`) of plain values, each under its labels: gauges or counters.
fn encode_values(
    encoder: &mut DescriptorEncoder,
    (name, help): (&str, &str),
    kind: MetricType,
    values: impl IntoIterator<Item = (Labels, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in values {
        let metric = family.encode_family(&labels)?;
        if let MetricType::Counter = kind {
            ConstCounter::new(value).encode(metric)?;
        } else {
            gauge(value).encode(metric)?;
        }
    }
    Ok(())
}

impl Collector for PortsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshot = self
            .snapshot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Self::encode_ports(&snapshot, &mut encoder)?;
        Self::encode_range(&snapshot, &mut encoder)
    }
}

#[cfg(test)]
mod tests;
