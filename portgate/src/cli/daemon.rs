//! `portgate daemon` runs the daemon in this process; `portgate uninstall` takes portgate
//! out of the kernel. Both read the daemon's configuration file.

use std::path::PathBuf;

use clap::Args;

use crate::paths;

/// The daemon's configuration file.
#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// The configuration file (it names the socket, the pin directory and the cgroup).
    #[arg(long, value_name = "FILE", help = format!("The configuration file, which names the socket, the pin directory and the cgroup [default: {}]", paths::DEFAULT_CONFIG))]
    pub config: Option<PathBuf>,
}

/// Runs `portgate daemon`: load and attach the kernel programs, serve the API.
pub fn run(args: ConfigArgs) -> anyhow::Result<()> {
    crate::daemon::run(args.config)
}

/// Runs `portgate uninstall`: detach portgate's programs, remove its pins, give back the
/// reserved ports.
pub fn uninstall(args: ConfigArgs) -> anyhow::Result<()> {
    crate::daemon::uninstall(args.config)
}
