//! `portgate access`: changes a port's access control.

use clap::{ArgGroup, Args};
use ipnet::IpNet;

use super::{OutputFormat, PortArg, format, parse_prefix};
use crate::{client::Client, model::AccessChange};

/// Change a port's allowlist, connection limit or authentication requirement; what is not
/// named stays as it is.
#[derive(Debug, Args)]
#[command(group(
    ArgGroup::new("change")
        .required(true)
        .multiple(true)
        .args(["allow", "remove", "max_conns", "require_auth"])
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
}

impl AccessArgs {
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

/// Runs `portgate access`: prints the port's access control as it now is.
pub async fn run(client: &Client, args: &AccessArgs, output: OutputFormat) -> anyhow::Result<()> {
    let view = client
        .access(args.port.id(client).await?, &args.change())
        .await?;
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
