//! `portgate access`: changes a port's access control, or moves it to a new owner.

use std::path::PathBuf;

use clap::{ArgGroup, Args};
use ipnet::IpNet;

use super::{OutputFormat, PortArg, format, parse_prefix};
use crate::{api::OwnerSpec, client::Client, model::AccessChange};

/// Change a port's allowlist, connection limit or authentication requirement (what is not
/// named stays as it is), or move it to a new owner cgroup (a container restarted into a
/// new cgroup): --cgroup, --pid or --container, alone.
#[derive(Debug, Args)]
#[command(group(
    ArgGroup::new("change")
        .required(true)
        .multiple(true)
        .args(["allow", "remove", "max_conns", "require_auth", "cgroup", "pid", "container"])
))]
pub struct AccessArgs {
    /// The port.
    #[command(flatten)]
    pub port: PortArg,
    /// A source to add to the allowlist: CIDR or bare IP; repeat for more.
    #[arg(long, value_name = "CIDR", value_parser = parse_prefix)]
    pub allow: Vec<IpNet>,
    /// A prefix to take out of the allowlist; repeat for more. An empty allowlist allows
    /// every source.
    #[arg(long, value_name = "CIDR", value_parser = parse_prefix)]
    pub remove: Vec<IpNet>,
    /// New connection limit (0 is unlimited); TCP only.
    #[arg(long, value_name = "N")]
    pub max_conns: Option<u32>,
    /// Whether new connections need a grant.
    #[arg(long, value_name = "true|false")]
    pub require_auth: Option<bool>,
    /// The new owner: only processes in this cgroup2 directory (and below) may bind the
    /// port from now on.
    #[arg(
        long,
        value_name = "PATH",
        conflicts_with_all = ["pid", "container", "allow", "remove", "max_conns", "require_auth"]
    )]
    pub cgroup: Option<PathBuf>,
    /// The new owner: this process's cgroup (the process must be in the port's namespace).
    #[arg(
        long,
        value_name = "PID",
        conflicts_with_all = ["container", "allow", "remove", "max_conns", "require_auth"]
    )]
    pub pid: Option<u32>,
    /// The new owner: this container's or pod's cgroup (it must be in the port's
    /// namespace).
    #[arg(
        long,
        value_name = "ID",
        conflicts_with_all = ["allow", "remove", "max_conns", "require_auth"]
    )]
    pub container: Option<String>,
}

impl AccessArgs {
    /// The new owner these arguments name, if they name one.
    #[must_use]
    pub fn owner(&self) -> Option<OwnerSpec> {
        (self.cgroup.is_some() || self.pid.is_some() || self.container.is_some()).then(|| {
            OwnerSpec {
                cgroup: self.cgroup.clone(),
                pid: self.pid,
                container: self.container.clone(),
                netns: None,
            }
        })
    }

    /// The change these arguments ask for.
    #[must_use]
    pub fn change(&self) -> AccessChange {
        AccessChange {
            allow: self.allow.iter().copied().collect(),
            remove: self.remove.iter().copied().collect(),
            max_connections: self.max_conns,
            require_authentication: self.require_auth,
        }
    }
}

/// Runs `portgate access`: prints the port's access control (or owner) as it now is.
pub async fn run(client: &Client, args: &AccessArgs, output: OutputFormat) -> anyhow::Result<()> {
    let id = args.port.id(client).await?;
    if let Some(owner) = args.owner() {
        let view = client.set_owner(id, &owner).await?;
        match output {
            OutputFormat::Table => println!(
                "{} owner: {}",
                format::port(view.id, view.netns_label.as_deref()),
                view.cgroup
                    .as_ref()
                    .map_or_else(|| "any".to_owned(), |cgroup| cgroup.display().to_string()),
            ),
            OutputFormat::Json => format::print_json(&view)?,
        }
        return Ok(());
    }
    let view = client.access(id, &args.change()).await?;
    match output {
        OutputFormat::Table => println!(
            "{} access: allow {}; max conns {}; require auth {}",
            format::port(view.id, view.netns_label.as_deref()),
            format::allow_cell(&view.access.allowed_ips),
            format::limit(view.access.max_connections, "unlimited"),
            format::yes_no(view.access.require_authentication),
        ),
        OutputFormat::Json => format::print_json(&view)?,
    }
    Ok(())
}
