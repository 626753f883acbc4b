//! `portgate stats`: counters and policy through the daemon.

use clap::Args;

use super::{OutputFormat, format, maps::report_table, protocol_parser};
use crate::{
    client::Client,
    model::{PortId, Protocol},
};

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
}

/// Runs `portgate stats`.
pub async fn run(client: &Client, args: &StatsArgs, output: OutputFormat) -> anyhow::Result<()> {
    let port = args
        .port
        .map(|port| PortId::new(port, args.proto.unwrap_or(Protocol::Tcp)));
    let reports = client.stats(port).await?;
    match output {
        OutputFormat::Table => print!("{}", report_table(&reports)),
        OutputFormat::Json => format::print_json(&reports)?,
    }
    Ok(())
}
