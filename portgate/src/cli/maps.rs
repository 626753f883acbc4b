//! `portgate maps`: the live kernel maps, read straight from the pins.

use std::{collections::BTreeMap, fmt::Write as _, path::PathBuf, time::Duration};

use clap::Args;

use super::{
    OutputFormat, format,
    table::{NETNS, PUBLISHED, Table, published_cell},
};
use crate::{
    client::Client,
    gate::Gate,
    model::{NetnsId, PortId, PortReport},
    paths,
};

/// Show every managed port's policy, allowlist, grants, counters and active connections,
/// read from the pinned maps (no daemon needed).
#[derive(Debug, Args)]
pub struct MapsArgs {
    /// The bpffs directory holding portgate's pins.
    #[arg(long, default_value = paths::DEFAULT_PIN_DIR, env = "PORTGATE_PIN_DIR")]
    pub pin_dir: PathBuf,
}

/// How long `maps` waits for the daemon's labels of namespaces before it shows cookies.
const LABELS_WITHIN: Duration = Duration::from_secs(2);

/// Runs `portgate maps`. Ports of other namespaces than the host's are shown with the
/// labels the daemon's allocations give them when the daemon answers (through `client`),
/// else with their cookies.
pub fn run(client: &Client, args: &MapsArgs, output: OutputFormat) -> anyhow::Result<()> {
    let gate = Gate::open(&args.pin_dir)?;
    let reports = gate.reports()?;
    match output {
        OutputFormat::Json => format::print_json(&reports)?,
        OutputFormat::Table => {
            let config = gate.config()?;
            println!(
                "managed range {}-{}  pins {}",
                config.min_port,
                config.max_port,
                args.pin_dir.display()
            );
            let published = gate.published()?;
            let labels = if reports.iter().all(|report| report.id.netns.is_host())
                && published.values().all(|home| home.netns.is_host())
            {
                BTreeMap::new()
            } else {
                labels_if_daemon(client)
            };
            print!("{}", report_table(&reports, &labels));
            print!("{}", published_lines(&published, &labels));
            let stats = gate.stats()?;
            println!(
                "events lost: {} (ring full), {} (rate limited)",
                stats.events_lost_full, stats.events_rate_limited
            );
            println!(
                "handshakes refused for room: {} (map full), {} (port's share full); sweeps {}; unreadable packets dropped {}; connections uncounted {} (socket storage failed), {} (unreserved)",
                stats.pending_full,
                stats.pending_port_full,
                stats.pending_sweeps,
                stats.unparsable,
                stats.sockets_full,
                stats.unreserved
            );
            for warning in crate::manager::gate_warnings(&stats) {
                println!("warning: {warning}");
            }
        }
    }
    Ok(())
}

/// The labels of namespaces as the daemon's allocations give them, when it answers within
/// [`LABELS_WITHIN`]; none when it does not (`maps` needs no daemon).
fn labels_if_daemon(client: &Client) -> BTreeMap<NetnsId, String> {
    super::on_daemon(async {
        Ok(
            tokio::time::timeout(LABELS_WITHIN, super::netns_labels(client))
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default(),
        )
    })
    .unwrap_or_default()
}

/// The host sides of published ports, one line each: the host port the kernel judges as the
/// port of another namespace it forwards to (`published 20080/tcp (host) -> 80/tcp in
/// netns web1`).
fn published_lines(
    published: &BTreeMap<PortId, PortId>,
    labels: &BTreeMap<NetnsId, String>,
) -> String {
    let mut out = String::new();
    for (host_side, home) in published {
        let _infallible = writeln!(
            out,
            "published {} (host) -> {}",
            format::port(*host_side, None),
            format::port(*home, labels.get(&home.netns).map(String::as_str))
        );
    }
    out
}

/// The table of port reports that `portgate maps` and `portgate stats` print, namespaces
/// named by `labels` (else by cookie).
#[must_use]
pub fn report_table(reports: &[PortReport], labels: &BTreeMap<NetnsId, String>) -> Table {
    let mut table = Table::new(&[
        "PORT", "PROTO", NETNS, PUBLISHED, "STATUS", "ALLOW", "MAXCONN", "AUTH", "OWNER",
        "ACCEPTED", "ACTIVE", "UNALLOC", "DRAINING", "NOTALLOW", "AUTHREQ", "CONNLIM", "BINDDENY",
        "PACKETS", "BYTES",
    ]);
    for port in reports {
        let label = labels.get(&port.id.netns).map(String::as_str);
        table.row(vec![
            port.id.port.to_string(),
            port.id.protocol.to_string(),
            port.id.netns.name(label),
            published_cell(port.published),
            port.status.to_string(),
            format::allow_cell(&port.access.allowed_ips),
            format::limit(port.access.max_connections, "-"),
            if port.access.require_authentication {
                format!("yes({} grants)", port.grants.len())
            } else {
                "no".to_owned()
            },
            port.owner_cgroup
                .map_or_else(|| "any".to_owned(), |id| id.to_string()),
            port.counters.accepted.to_string(),
            port.counters.active.to_string(),
            port.counters.dropped.unallocated.to_string(),
            port.counters.dropped.draining.to_string(),
            port.counters.dropped.not_allowed.to_string(),
            port.counters.dropped.auth_required.to_string(),
            port.counters.dropped.conn_limit.to_string(),
            port.counters.bind_denied.to_string(),
            port.counters.packets.to_string(),
            port.counters.bytes.to_string(),
        ]);
    }
    table.port_columns()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::{published_lines, report_table};
    use crate::model::{
        NetnsId, PortAccessControl, PortId, PortMetrics, PortReport, PortStatus, Protocol,
    };

    fn report(id: PortId, published: Option<u16>) -> PortReport {
        PortReport {
            id,
            published,
            status: PortStatus::Active,
            access: PortAccessControl::default(),
            owner_cgroup: None,
            grants: Vec::new(),
            counters: PortMetrics::default(),
        }
    }

    const INSIDE: PortId = PortId {
        netns: NetnsId(4097),
        port: 80,
        protocol: Protocol::Tcp,
    };

    #[test]
    fn host_ports_alone_have_no_netns_column() {
        let table = report_table(&[report(PortId::from(20001), None)], &BTreeMap::new());
        let header = table.to_string();
        let header = header.lines().next().unwrap();
        assert!(
            header.starts_with("PORT   PROTO  STATUS  ALLOW"),
            "{header}"
        );
    }

    #[test]
    fn another_namespace_shows_its_label_else_its_cookie() {
        let reports = [
            report(PortId::from(20001), None),
            report(INSIDE, Some(20080)),
            report(
                PortId {
                    netns: NetnsId(4098),
                    ..INSIDE
                },
                None,
            ),
        ];
        let labels = BTreeMap::from([(NetnsId(4097), "web1".to_owned())]);
        let table = report_table(&reports, &labels).to_string();
        let cells: Vec<Vec<&str>> = table
            .lines()
            .map(|line| line.split_whitespace().take(5).collect())
            .collect();
        assert_eq!(
            cells,
            [
                ["PORT", "PROTO", "NETNS", "PUBLISHED", "STATUS"],
                ["20001", "tcp", "host", "-", "active"],
                ["80", "tcp", "web1", "20080", "active"],
                ["80", "tcp", "4098", "-", "active"],
            ]
        );
    }

    #[test]
    fn published_host_ports_point_at_their_namespace() {
        let published = BTreeMap::from([(PortId::from(20080), INSIDE)]);
        let labels = BTreeMap::from([(NetnsId(4097), "web1".to_owned())]);
        assert_eq!(
            published_lines(&published, &labels),
            "published 20080/tcp (host) -> 80/tcp in netns web1\n"
        );
        assert_eq!(
            published_lines(&published, &BTreeMap::new()),
            "published 20080/tcp (host) -> 80/tcp in netns 4097\n"
        );
    }
}
