//! `portgate grant`: lets an authenticated source in.

use std::{net::IpAddr, time::Duration};

use clap::Args;

use super::{OutputFormat, PortArg, format};
use crate::{
    api::GrantRequest,
    client::Client,
    model::{PortId, spelling},
};

/// Grant a source that has authenticated: new connections from it pass a port that
/// requires authentication until the grant expires.
#[derive(Debug, Args)]
pub struct GrantArgs {
    /// The port.
    #[command(flatten)]
    pub port: PortArg,
    /// The source address that authenticated.
    #[arg(value_name = "IP")]
    pub ip: IpAddr,
    /// How long the grant lasts ("30s", "5m").
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
}

/// What `portgate grant -o json` prints: the grant made.
#[derive(Debug, serde::Serialize)]
struct GrantMade {
    #[serde(flatten, with = "spelling::PortIdFields")]
    id: PortId,
    ip: IpAddr,
    #[serde(with = "humantime_serde")]
    ttl: Duration,
}

/// Runs `portgate grant`.
pub async fn run(client: &Client, args: &GrantArgs, output: OutputFormat) -> anyhow::Result<()> {
    let id = args.port.id(client).await?;
    let request = GrantRequest {
        ip: args.ip,
        ttl: args.ttl,
    };
    client.grant(id, &request).await?;
    match output {
        OutputFormat::Table => println!(
            "granted {} on {} for {}",
            args.ip,
            format::port(id, args.port.netns.as_deref()),
            format::duration(args.ttl)
        ),
        OutputFormat::Json => format::print_json(&GrantMade {
            id,
            ip: args.ip,
            ttl: args.ttl,
        })?,
    }
    Ok(())
}
