//! `portgate maps`: the live kernel maps, read straight from the pins.

use std::path::PathBuf;

use clap::Args;

use super::{OutputFormat, format, table::Table};
use crate::{gate::Gate, model::PortReport, paths};

/// Show every managed port's policy, allowlist, grants, counters and active connections,
/// read from the pinned maps (no daemon needed).
#[derive(Debug, Args)]
pub struct MapsArgs {
    /// The bpffs directory holding portgate's pins.
    #[arg(long, default_value = paths::DEFAULT_PIN_DIR, env = "PORTGATE_PIN_DIR")]
    pub pin_dir: PathBuf,
}

/// Runs `portgate maps`.
pub fn run(args: &MapsArgs, output: OutputFormat) -> anyhow::Result<()> {
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
            print!("{}", report_table(&reports));
            let stats = gate.stats()?;
            println!(
                "events lost: {} (ring full), {} (rate limited)",
                stats.events_lost_full, stats.events_rate_limited
            );
            println!(
                "handshakes refused for room: {} (map full), {} (port's share full); sweeps {}; unreadable packets dropped {}; connections uncounted {} (socket map full), {} (unreserved)",
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

/// The table of port reports that `portgate maps` and `portgate stats` print.
#[must_use]
pub fn report_table(reports: &[PortReport]) -> Table {
    let mut table = Table::new(&[
        "PORT", "PROTO", "STATUS", "ALLOW", "MAXCONN", "AUTH", "OWNER", "ACCEPTED", "ACTIVE",
        "UNALLOC", "DRAINING", "NOTALLOW", "AUTHREQ", "CONNLIM", "BINDDENY", "PACKETS", "BYTES",
    ]);
    for port in reports {
        table.row(vec![
            port.id.port.to_string(),
            port.id.protocol.to_string(),
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
    table
}
