//! `portgate daemon`: runs the daemon in this process.

use std::path::PathBuf;

use clap::Args;

use crate::paths;

/// Run the daemon: load and attach the kernel programs, serve the API on its socket.
#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// The configuration file.
    #[arg(long, value_name = "FILE", help = format!("The configuration file [default: {}]", paths::DEFAULT_CONFIG))]
    pub config: Option<PathBuf>,
}

/// Runs `portgate daemon`.
pub fn run(args: DaemonArgs) -> anyhow::Result<()> {
    crate::daemon::run(args.config)
}
