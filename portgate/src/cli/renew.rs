//! `portgate renew`: extends a port's lease.

use std::time::Duration;

use clap::Args;

use super::{OutputFormat, PortArg, format};
use crate::{api::RenewRequest, client::Client, model::now_millis};

/// Renew a port's lease, for --ttl or the length it was allocated with.
#[derive(Debug, Args)]
pub struct RenewArgs {
    /// The port.
    #[command(flatten)]
    pub port: PortArg,
    /// New lease length ("30s", "5m"); the allocation's own when absent.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub ttl: Option<Duration>,
}

/// Runs `portgate renew`.
pub async fn run(client: &Client, args: &RenewArgs, output: OutputFormat) -> anyhow::Result<()> {
    let request = RenewRequest { ttl: args.ttl };
    let view = client.renew(args.port.id(client).await?, &request).await?;
    let port = format::port(view.id, view.netns_label.as_deref());
    match output {
        OutputFormat::Table => match view.timeline.lease_expires_at {
            Some(at) => println!(
                "{port} lease renewed: expires {}",
                format::expiry(at, now_millis())
            ),
            None => println!("{port} has no lease: it is held until released"),
        },
        OutputFormat::Json => format::print_json(&view)?,
    }
    Ok(())
}
