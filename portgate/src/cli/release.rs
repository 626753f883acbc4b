//! `portgate release`: gives a port back.

use clap::Args;

use super::{OutputFormat, PortArg, format};
use crate::{api::AllocationView, client::Client, model::PortStatus};

/// Release a port: it takes no new connections, closes once its connections end (or after
/// the drain timeout) and becomes available again after quarantine.
#[derive(Debug, Args)]
pub struct ReleaseArgs {
    /// The port.
    #[command(flatten)]
    pub port: PortArg,
}

/// Runs `portgate release`.
pub async fn run(client: &Client, args: &ReleaseArgs, output: OutputFormat) -> anyhow::Result<()> {
    let view = client.release(args.port.id()).await?;
    match output {
        OutputFormat::Table => println!("{}", wind_down_line(&view, "released")),
        OutputFormat::Json => format::print_json(&view)?,
    }
    Ok(())
}

/// What became of a port that was released or drained (`how`).
pub(super) fn wind_down_line(view: &AllocationView, how: &str) -> String {
    let id = view.id;
    match view.status {
        PortStatus::Draining => format!(
            "{id} draining ({how}); closes when its connections end or after the drain timeout"
        ),
        PortStatus::Closed => {
            format!("{id} closed; it becomes available again after quarantine")
        }
        status @ (PortStatus::Active | PortStatus::Available) => format!(
            "{id} is still {status}: the daemon did not release it; see `portgate show {}`",
            view.id.port
        ),
    }
}
