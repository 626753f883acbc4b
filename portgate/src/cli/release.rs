//! `portgate release` and `portgate drain`: the port takes no new connections, closes once
//! its connections end (or after the drain timeout) and becomes available again after
//! quarantine. The two verbs do the same; each is its own action in the audit log.

use clap::Args;

use super::{OutputFormat, PortArg, format};
use crate::{api::AllocationView, client::Client, model::PortStatus};

/// The port to release or drain.
#[derive(Debug, Args)]
pub struct ReleaseArgs {
    /// The port.
    #[command(flatten)]
    pub port: PortArg,
}

/// Which of the two verbs was asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    /// `portgate release`.
    Release,
    /// `portgate drain`.
    Drain,
}

/// Runs `portgate release` or `portgate drain`.
pub async fn run(
    client: &Client,
    args: &ReleaseArgs,
    verb: Verb,
    output: OutputFormat,
) -> anyhow::Result<()> {
    let id = args.port.id(client).await?;
    let (view, how) = match verb {
        Verb::Release => (client.release(id).await?, "released"),
        Verb::Drain => (client.drain(id).await?, "no new connections"),
    };
    match output {
        OutputFormat::Table => println!("{}", wind_down_line(&view, how)),
        OutputFormat::Json => format::print_json(&view)?,
    }
    Ok(())
}

/// What became of a port that was released or drained (`how`).
fn wind_down_line(view: &AllocationView, how: &str) -> String {
    let label = view.netns_label.as_deref();
    let id = format::port(view.id, label);
    match view.status {
        PortStatus::Draining => format!(
            "{id} draining ({how}); closes when its connections end or after the drain timeout"
        ),
        PortStatus::Closed => {
            format!("{id} closed; it becomes available again after quarantine")
        }
        status @ (PortStatus::Active | PortStatus::Available) => format!(
            "{id} is still {status}: the daemon did not release it; see `portgate show {}`",
            view.id.cli_args(label)
        ),
    }
}
