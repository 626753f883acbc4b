//! `portgate key add|list|revoke`: client keys for the knock (administrators only).

use std::time::Duration;

use clap::{Args, Subcommand};

use super::{OutputFormat, format};
use crate::{
    api::{KeyPort, KeyRequestBody, KeyView, default_key_max_ttl},
    client::Client,
    model::Protocol,
};

/// Client keys for the knock.
#[derive(Debug, Args)]
pub struct KeyArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: KeyAction,
}

/// `portgate key` verbs.
#[derive(Debug, Subcommand)]
pub enum KeyAction {
    /// Make a key and print its key file, once: give it to the client, which keeps it
    /// secret (mode 0600).
    Add(KeyAddArgs),
    /// List the keys (never their secrets).
    List,
    /// Revoke a key: its knocks are refused from now on, and its grants withdrawn.
    Revoke {
        /// The key's name.
        #[arg(value_name = "NAME")]
        name: String,
    },
}

/// `portgate key add`.
#[derive(Debug, Args)]
pub struct KeyAddArgs {
    /// The key's name (1 to 64 letters, digits, '.', '_', '-').
    #[arg(value_name = "NAME")]
    pub name: String,
    /// A port it may open, as PORT or PORT/udp; repeat for more [default: any port that
    /// requires authentication].
    #[arg(long = "port", value_name = "PORT[/PROTO]", value_parser = parse_key_port)]
    pub ports: Vec<KeyPort>,
    /// The longest grant a knock with it gets ("30s", "5m").
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub max_ttl: Option<Duration>,
    /// Let a knock name the address its grant is for (clients behind NAT); otherwise the
    /// grant goes to the address the knock comes from.
    #[arg(long)]
    pub any_source: bool,
}

/// `PORT` or `PORT/PROTO`.
fn parse_key_port(text: &str) -> Result<KeyPort, String> {
    let (port, proto) = match text.split_once('/') {
        Some((port, proto)) => (
            port,
            proto.parse::<Protocol>().map_err(|err| err.to_string())?,
        ),
        None => (text, Protocol::Tcp),
    };
    let port: u16 =
        port.parse().ok().filter(|&port| port != 0).ok_or_else(|| {
            format!("{text:?}: give a port from 1 to 65535, optionally /tcp or /udp")
        })?;
    Ok(KeyPort { port, proto })
}

/// Runs `portgate key`.
pub async fn run(client: &Client, args: &KeyArgs, output: OutputFormat) -> anyhow::Result<()> {
    match &args.action {
        KeyAction::Add(add) => {
            let created = client
                .add_key(&KeyRequestBody {
                    name: add.name.clone(),
                    ports: add.ports.clone(),
                    max_ttl: add.max_ttl.unwrap_or_else(default_key_max_ttl),
                    any_source: add.any_source,
                })
                .await?;
            match output {
                // The key file itself, ready to be redirected into a file.
                OutputFormat::Table => print!("{}", created.key_file),
                OutputFormat::Json => format::print_json(&created)?,
            }
        }
        KeyAction::List => {
            let keys = client.keys().await?;
            match output {
                OutputFormat::Table => print_table(&keys),
                OutputFormat::Json => format::print_json(&keys)?,
            }
        }
        KeyAction::Revoke { name } => {
            client.revoke_key(name).await?;
            if output == OutputFormat::Table {
                println!("revoked key {name}");
            }
        }
    }
    Ok(())
}

fn print_table(keys: &[KeyView]) {
    println!(
        "{:<24} {:<10} {:<10} PORTS",
        "NAME", "MAX TTL", "ANY SOURCE"
    );
    for key in keys {
        let ports = if key.ports.is_empty() {
            "any requiring authentication".to_owned()
        } else {
            key.ports
                .iter()
                .map(|port| format!("{}/{}", port.port, port.proto))
                .collect::<Vec<_>>()
                .join(",")
        };
        println!(
            "{:<24} {:<10} {:<10} {ports}",
            key.name,
            format::duration(key.max_ttl),
            if key.any_source { "yes" } else { "no" }
        );
    }
}
