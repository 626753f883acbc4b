//! `portgate grant`: lets an authenticated source in.

use std::{net::IpAddr, time::Duration};

use clap::Args;

use super::{OutputFormat, PortArg, format};
use crate::{api::GrantRequest, client::Client};

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
    port: u16,
    proto: crate::model::Protocol,
    ip: IpAddr,
    #[serde(with = "humantime_serde")]
    ttl: Duration,
}

/// Runs `portgate grant`.
pub async fn run(client: &Client, args: &GrantArgs, output: OutputFormat) -> anyhow::Result<()> {
    let PortArg { port, proto } = args.port;
    let request = GrantRequest {
        ip: args.ip,
        ttl: args.ttl,
    };
    client.grant(args.port.id(), &request).await?;
    match output {
        OutputFormat::Table => println!(
            "granted {} on {} for {}",
            args.ip,
            args.port.id(),
            format::duration(args.ttl)
        ),
        OutputFormat::Json => format::print_json(&GrantMade {
            port,
            proto,
            ip: args.ip,
            ttl: args.ttl,
        })?,
    }
    Ok(())
}
