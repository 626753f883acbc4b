//! `portgate grants` and `portgate revoke`: a port's grants, who issued each, and
//! withdrawing one.

use std::net::IpAddr;

use clap::Args;

use super::{OutputFormat, PortArg, format};
use crate::client::Client;

/// List a port's grants: the address, how long it still lasts, and who issued it.
#[derive(Debug, Args)]
pub struct GrantsArgs {
    /// The port.
    #[command(flatten)]
    pub port: PortArg,
}

/// Withdraw a port's grant for an address at once.
#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// The port.
    #[command(flatten)]
    pub port: PortArg,
    /// The address whose grant goes.
    #[arg(value_name = "IP")]
    pub ip: IpAddr,
}

/// Runs `portgate grants`.
pub async fn run(client: &Client, args: &GrantsArgs, output: OutputFormat) -> anyhow::Result<()> {
    let id = args.port.id(client).await?;
    let grants = client.grants(id).await?;
    match output {
        OutputFormat::Table => {
            println!("{:<40} {:<12} ISSUED BY", "ADDRESS", "EXPIRES IN");
            for grant in &grants {
                println!(
                    "{:<40} {:<12} {}",
                    grant.ip,
                    format::duration(grant.expires_in),
                    grant
                        .issued_by
                        .as_deref()
                        .unwrap_or("unknown (before a restart)")
                );
            }
        }
        OutputFormat::Json => format::print_json(&grants)?,
    }
    Ok(())
}

/// Runs `portgate revoke`.
pub async fn revoke(
    client: &Client,
    args: &RevokeArgs,
    output: OutputFormat,
) -> anyhow::Result<()> {
    let id = args.port.id(client).await?;
    client.revoke_grant(id, args.ip).await?;
    if output == OutputFormat::Table {
        println!(
            "revoked the grant of {} on {}",
            args.ip,
            format::port(id, args.port.netns.as_deref())
        );
    }
    Ok(())
}
