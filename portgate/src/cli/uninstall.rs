//! `portgate uninstall`: takes portgate out of the kernel.

use std::path::PathBuf;

use clap::Args;

use crate::paths;

/// Detach portgate's programs and remove its pins.
#[derive(Debug, Args)]
pub struct UninstallArgs {
    /// The configuration file (it names the pin directory and the cgroup).
    #[arg(long, value_name = "FILE", help = format!("The configuration file, which names the pin directory and the cgroup [default: {}]", paths::DEFAULT_CONFIG))]
    pub config: Option<PathBuf>,
}

/// Runs `portgate uninstall`.
pub fn run(args: UninstallArgs) -> anyhow::Result<()> {
    crate::daemon::uninstall(args.config)
}
