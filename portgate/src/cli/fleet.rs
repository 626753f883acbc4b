//! `portgate fleet nodes|repair`: fleet mode's nodes, and the repair pass for a dead one.

use clap::{Args, Subcommand};

use super::{OutputFormat, format};
use crate::{api::RepairRequest, client::Client};

/// The fleet (fleet mode only).
#[derive(Debug, Args)]
pub struct FleetArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: FleetAction,
}

/// `portgate fleet` verbs.
#[derive(Debug, Subcommand)]
pub enum FleetAction {
    /// List the live nodes (those whose liveness keys are in etcd).
    Nodes,
    /// Repair the fleet after a node died: once the node is seen gone twice, a lease
    /// apart, take over the ports it wrote last and release them (administrators only).
    Repair {
        /// The dead node's name.
        #[arg(value_name = "NODE")]
        node: String,
    },
}

/// Runs `portgate fleet`.
pub async fn run(client: &Client, args: &FleetArgs, output: OutputFormat) -> anyhow::Result<()> {
    match &args.action {
        FleetAction::Nodes => {
            let nodes = client.fleet_nodes().await?;
            match output {
                OutputFormat::Json => format::print_json(&nodes)?,
                OutputFormat::Table => {
                    println!("{:<24} {:<10} JOINED", "NODE", "VERSION");
                    for node in &nodes {
                        let joined = std::time::UNIX_EPOCH
                            + std::time::Duration::from_millis(node.joined_at);
                        println!(
                            "{:<24} {:<10} {}",
                            node.node,
                            node.version,
                            humantime::format_rfc3339_seconds(joined)
                        );
                    }
                }
            }
        }
        FleetAction::Repair { node } => {
            let repaired = client
                .fleet_repair(&RepairRequest { node: node.clone() })
                .await?;
            match output {
                OutputFormat::Json => format::print_json(&repaired)?,
                OutputFormat::Table => {
                    println!(
                        "node {} is gone: took over and released {} port(s)",
                        repaired.node,
                        repaired.released.len()
                    );
                    for id in &repaired.released {
                        println!("  {id} draining");
                    }
                }
            }
        }
    }
    Ok(())
}
