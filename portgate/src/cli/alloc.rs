//! `portgate alloc`: asks the daemon for a port.

use std::{path::PathBuf, time::Duration};

use clap::Args;
use ipnet::IpNet;

use super::{OutputFormat, format, parse_prefix, protocol_parser};
use crate::{api::AllocRequest, client::Client, model::Protocol};

/// Allocate a port (any free one unless --port is given) and print its number, so that
/// `PORT=$(portgate alloc --owner web)` works.
#[derive(Debug, Args)]
pub struct AllocArgs {
    /// The owner's name (a service, tenant or container).
    #[arg(long, value_name = "NAME")]
    pub owner: String,
    /// A specific port instead of any free one.
    #[arg(long, value_name = "N")]
    pub port: Option<u16>,
    /// The protocol [default: tcp].
    #[arg(long, value_name = "PROTO", value_parser = protocol_parser())]
    pub proto: Option<Protocol>,
    /// Only processes in this cgroup2 directory (and below) may bind the port.
    #[arg(long, value_name = "PATH", conflicts_with = "pid")]
    pub cgroup: Option<PathBuf>,
    /// Only processes in this process's cgroup (and below) may bind the port.
    #[arg(long, value_name = "PID")]
    pub pid: Option<u32>,
    /// A source allowed to connect: CIDR or bare IP; repeat for more. None allows every source.
    #[arg(long = "allow", value_name = "CIDR", value_parser = parse_prefix)]
    pub allow: Vec<IpNet>,
    /// Most TCP connections at once; unlimited when absent or 0. Refused for UDP.
    #[arg(long, value_name = "N")]
    pub max_conns: Option<u32>,
    /// New connections need a grant (`portgate grant`) for their source.
    #[arg(long)]
    pub require_auth: bool,
    /// Lease length ("30s", "5m", "2h"); renew it with `portgate renew`. The port is held
    /// until released when absent.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub ttl: Option<Duration>,
}

impl AllocArgs {
    /// The API request these arguments ask for.
    #[must_use]
    pub fn request(&self) -> AllocRequest {
        AllocRequest {
            owner: self.owner.clone(),
            port: self.port,
            proto: self.proto,
            cgroup: self.cgroup.clone(),
            pid: self.pid,
            allow: self.allow.clone(),
            max_conns: self.max_conns,
            require_auth: self.require_auth,
            ttl: self.ttl,
        }
    }
}

/// Runs `portgate alloc`: prints the port alone, or the allocation as JSON.
pub async fn run(client: &Client, args: &AllocArgs, output: OutputFormat) -> anyhow::Result<()> {
    let view = client.alloc(&args.request()).await?;
    match output {
        OutputFormat::Table => println!("{}", view.id.port),
        OutputFormat::Json => format::print_json(&view)?,
    }
    Ok(())
}
