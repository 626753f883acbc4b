//! The metrics text held to its golden file, and the gate's warnings.

use super::{PortMonitor, PortSample, PortsSnapshot, gate_warnings};
use crate::gate::GateStats;
use crate::manager::health::{ErrorSource, HealthSnapshot, ProcessStats};
use crate::model::{NetnsId, PortId, PortMetrics, PortStatus, Protocol, sample_metrics};

/// The exposition as portgate writes it (`testdata/metrics.txt`): names, help, labels
/// and their order (`port`, `proto`, `netns`, then `reason`), with a port of the host's
/// namespace, and one of a container's beside a host port of the same number.
#[test]
fn the_exposition_keeps_its_bytes() {
    let sample = |id: PortId, netns: &str, status, metrics| PortSample {
        id,
        netns: netns.to_owned(),
        status,
        max_connections: if netns == "host" && id.port == 20001 {
            3
        } else {
            0
        },
        metrics,
    };
    let snapshot = PortsSnapshot {
        ports: vec![
            sample(
                PortId::new(20001, Protocol::Tcp),
                "host",
                PortStatus::Active,
                sample_metrics(),
            ),
            sample(
                PortId::new(20002, Protocol::Udp),
                "host",
                PortStatus::Draining,
                PortMetrics::default(),
            ),
            sample(
                PortId {
                    netns: NetnsId(4097),
                    ..PortId::new(20001, Protocol::Tcp)
                },
                "3f2a9c1b0d4e",
                PortStatus::Active,
                PortMetrics {
                    accepted: 31,
                    ..PortMetrics::default()
                },
            ),
        ],
        unallocated_drops: vec![(Protocol::Tcp, 11), (Protocol::Udp, 12)],
        free: vec![(Protocol::Tcp, 13), (Protocol::Udp, 14)],
        gate: GateStats {
            events_lost_full: 15,
            events_rate_limited: 16,
            pending_full: 17,
            sockets_full: 18,
            pending_sweeps: 19,
            pending_port_full: 20,
            unparsable: 21,
            unreserved: 22,
        },
        handshakes_in_flight: 23,
        owner_gone: 24,
        health: HealthSnapshot {
            maps: vec![crate::gate::MapFill {
                map: "PG_POLICY",
                entries: 3,
                capacity: 262_144,
            }],
            process: ProcessStats {
                cpu_seconds: 1.5,
                resident_bytes: 25,
                virtual_bytes: 26,
                open_fds: 27,
                max_fds: 28,
                start_time_seconds: 29.0,
            },
        },
    };
    let monitor = PortMonitor::new();
    monitor.record_error(ErrorSource::Audit);
    monitor.error_counter(ErrorSource::Store).inc();
    let text = monitor.encode(snapshot).unwrap();
    assert_eq!(text, include_str!("../testdata/metrics.txt"));
}

#[test]
fn a_full_reservation_map_is_a_warning() {
    assert!(gate_warnings(&GateStats::default()).is_empty());
    let warnings = gate_warnings(&GateStats {
        pending_full: 3,
        pending_port_full: 4,
        ..GateStats::default()
    });
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(warnings[0].contains("reservation map was full: 3 handshakes"));
    assert!(warnings[1].starts_with("4 handshakes were refused"));
}
