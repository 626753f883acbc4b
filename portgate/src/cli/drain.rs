//! `portgate drain`: stops new connections to a port.

use clap::Args;

use super::{OutputFormat, PortArg, format, release::wind_down_line};
use crate::client::Client;

/// Drain a port: no new connections; established ones continue until they end (or the
/// drain timeout), then the port closes and is freed as after a release.
#[derive(Debug, Args)]
pub struct DrainArgs {
    /// The port.
    #[command(flatten)]
    pub port: PortArg,
}

/// Runs `portgate drain`.
pub async fn run(client: &Client, args: &DrainArgs, output: OutputFormat) -> anyhow::Result<()> {
    let view = client.drain(args.port.id()).await?;
    match output {
        OutputFormat::Table => println!("{}", wind_down_line(&view, "no new connections")),
        OutputFormat::Json => format::print_json(&view)?,
    }
    Ok(())
}
