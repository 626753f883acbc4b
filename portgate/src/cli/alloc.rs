//! `portgate alloc`: asks the daemon for a port.

use std::{path::PathBuf, time::Duration};

use clap::Args;
use ipnet::IpNet;

use super::{OutputFormat, format, parse_prefix, protocol_parser};
use crate::{
    api::AllocRequest,
    client::Client,
    model::{HostPort, Protocol},
};

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
    #[arg(long, value_name = "PATH", conflicts_with_all = ["pid", "container"])]
    pub cgroup: Option<PathBuf>,
    /// Only processes in this process's cgroup (and below) may bind the port, which is in
    /// the process's network namespace.
    #[arg(long, value_name = "PID", conflicts_with_all = ["container", "netns"])]
    pub pid: Option<u32>,
    /// A container (docker, podman, containerd, CRI-O; a unique id prefix of 12 or more
    /// characters) or a Kubernetes pod (its uid): its cgroup owns the port, which is in its
    /// network namespace.
    #[arg(long, value_name = "ID", conflicts_with = "netns")]
    pub container: Option<String>,
    /// The port's network namespace: /run/netns/NAME or /proc/PID/ns/net [default: the
    /// host's].
    #[arg(long, value_name = "PATH")]
    pub netns: Option<PathBuf>,
    /// Publish the port on a host port that the container runtime forwards to it (DNAT):
    /// HOST:PORT, where HOST is a port of the managed range or `auto`, and PORT the
    /// container's (then --port may be left out).
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_publish)]
    pub publish: Option<(HostPort, u16)>,
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
            port: self.port.or(self.publish.map(|(_, port)| port)),
            proto: self.proto,
            cgroup: self.cgroup.clone(),
            pid: self.pid,
            container: self.container.clone(),
            netns: self.netns.clone(),
            publish: self.publish.map(|(host, _)| host),
            allow: self.allow.clone(),
            max_conns: self.max_conns,
            require_auth: self.require_auth,
            ttl: self.ttl,
        }
    }
}

/// `HOST:PORT` of `--publish`: HOST a port or `auto`, PORT the container's port.
fn parse_publish(raw: &str) -> Result<(HostPort, u16), String> {
    let (host, port) = raw
        .split_once(':')
        .ok_or_else(|| format!("{raw:?} is not HOST:PORT: give e.g. 18080:80 or auto:80"))?;
    let host = if host == "auto" {
        HostPort::Auto
    } else {
        HostPort::Port(host.parse().map_err(|_| {
            format!("{host:?} is not a host port: give a port of the managed range, or auto")
        })?)
    };
    let port = port
        .parse()
        .ok()
        .filter(|port| *port != 0)
        .ok_or_else(|| format!("{port:?} is not a container port: give 1-65535"))?;
    Ok((host, port))
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
