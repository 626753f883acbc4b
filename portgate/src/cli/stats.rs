//! `portgate stats`: counters and policy through the daemon.

use std::collections::BTreeMap;

use clap::Args;

use super::{OutputFormat, format, maps::report_table, netns_labels, port_id, protocol_parser};
use crate::{client::Client, model::Protocol};

/// Show counters and policy of every port, or of one: the columns and JSON keys of
/// `portgate maps`, through the daemon.
#[derive(Debug, Args)]
pub struct StatsArgs {
    /// Only this port.
    #[arg(value_name = "PORT")]
    pub port: Option<u16>,
    /// The port's protocol [default: tcp].
    #[arg(long, value_name = "PROTO", requires = "port", value_parser = protocol_parser())]
    pub proto: Option<Protocol>,
    /// The port's network namespace, as `--netns` of the other verbs names it [default:
    /// the host's].
    #[arg(long, value_name = "NAME", requires = "port")]
    pub netns: Option<String>,
}

/// Runs `portgate stats`.
pub async fn run(client: &Client, args: &StatsArgs, output: OutputFormat) -> anyhow::Result<()> {
    let port = match args.port {
        Some(port) => {
            let proto = args.proto.unwrap_or(Protocol::Tcp);
            Some(port_id(client, port, proto, args.netns.as_deref()).await?)
        }
        None => None,
    };
    let reports = client.stats(port).await?;
    match output {
        OutputFormat::Table => {
            let labels = if reports.iter().all(|report| report.id.netns.is_host()) {
                BTreeMap::new()
            } else {
                netns_labels(client).await?
            };
            print!("{}", report_table(&reports, &labels));
        }
        OutputFormat::Json => format::print_json(&reports)?,
    }
    Ok(())
}
