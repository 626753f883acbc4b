//! `portgate knock`: asks a daemon's knock listener to open a port to this client, signed
//! with a key file (see `portgate::knock` for the datagram).

use std::{
    fs,
    net::{IpAddr, SocketAddr, ToSocketAddrs as _},
    os::unix::fs::PermissionsExt as _,
    path::PathBuf,
    time::Duration,
};

use anyhow::Context as _;
use clap::Args;

use super::{OutputFormat, format, protocol_parser};
use crate::{
    knock::{self, DEFAULT_PORT, GrantFor, KeyFile, KnockRequest},
    model::Protocol,
};

/// Knock: send one signed datagram asking for PORT to be opened to this client. The daemon
/// never answers; connect to the port to learn whether it worked.
#[derive(Debug, Args)]
pub struct KnockArgs {
    /// The host running the daemon.
    #[arg(value_name = "HOST")]
    pub host: String,
    /// The port to open.
    #[arg(value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub port: u16,
    /// Its protocol.
    #[arg(long, value_name = "PROTO", default_value = "tcp", value_parser = protocol_parser())]
    pub proto: Protocol,
    /// The key file `portgate key add` printed.
    #[arg(long, value_name = "FILE")]
    pub key_file: PathBuf,
    /// The daemon's knock listener port.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_PORT)]
    pub knock_port: u16,
    /// How long the grant should last ("30s", "5m"; the key's most caps it).
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
    /// The address the grant is for, when the daemon sees this client through a NAT (the
    /// key must allow any source). By default this host's own address on the way to the
    /// daemon, signed (none for a key made with `--any-source`).
    #[arg(long = "for", value_name = "IP", conflicts_with = "behind_nat")]
    pub address: Option<IpAddr>,
    /// Sign no address: the grant goes to the address the datagram arrives from, for a
    /// client behind a NAT. Weaker: whoever holds the datagram back on the way and sends it
    /// first gets the grant. The default for a key made with `--any-source`.
    #[arg(long)]
    pub behind_nat: bool,
}

/// What `portgate knock -o json` prints.
#[derive(Debug, serde::Serialize)]
struct Knocked {
    listener: SocketAddr,
    key: String,
    port: u16,
    proto: Protocol,
    #[serde(with = "humantime_serde")]
    ttl: Duration,
    #[serde(skip_serializing_if = "Option::is_none")]
    address: Option<IpAddr>,
}

/// Runs `portgate knock`.
pub fn run(args: &KnockArgs, output: OutputFormat) -> anyhow::Result<()> {
    let text = fs::read_to_string(&args.key_file)
        .with_context(|| format!("reading the key file {}", args.key_file.display()))?;
    let key_file = KeyFile::parse(&text)
        .with_context(|| format!("reading the key file {}", args.key_file.display()))?;
    if let Ok(meta) = fs::metadata(&args.key_file)
        && meta.permissions().mode() & 0o077 != 0
    {
        eprintln!(
            "warning: {} can be read by others than its owner: chmod 600 it",
            args.key_file.display()
        );
    }
    // IPv4 first: a listener on 0.0.0.0 (the documented set-up) takes nothing over IPv6.
    let addresses: Vec<SocketAddr> = (args.host.as_str(), args.knock_port)
        .to_socket_addrs()
        .with_context(|| format!("resolving {}", args.host))?
        .collect();
    let listener = addresses
        .iter()
        .find(|addr| addr.is_ipv4())
        .or_else(|| addresses.first())
        .copied()
        .with_context(|| format!("{} has no address", args.host))?;
    // A key made for any source is for a client behind a NAT: its own address is not the
    // one the daemon sees, so it signs none unless told which.
    let grant_for = match (args.address, args.behind_nat || key_file.any_source) {
        (Some(addr), _) => GrantFor::Address(addr),
        (None, true) => GrantFor::Arrival,
        (None, false) => GrantFor::ThisHost,
    };
    let request = KnockRequest {
        protocol: args.proto,
        port: args.port,
        ttl: args.ttl,
        grant_for,
    };
    let sent = knock::knock(listener, &key_file, &request)
        .with_context(|| format!("knocking at {listener}"))?;
    match output {
        OutputFormat::Table => println!(
            "knocked at {listener} with key {} for {}/{} for {}, for {} (no answer comes: connect to the port)",
            sent.key_name,
            args.port,
            args.proto,
            format::duration(sent.ttl),
            sent.address.map_or_else(
                || "the address it arrives from".to_owned(),
                |addr| addr.to_string()
            )
        ),
        OutputFormat::Json => format::print_json(&Knocked {
            listener,
            key: sent.key_name,
            port: sent.port,
            proto: sent.protocol,
            ttl: sent.ttl,
            address: sent.address,
        })?,
    }
    Ok(())
}
