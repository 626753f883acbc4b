//! `portgate completions`: shell completion scripts.

use clap::{Args, CommandFactory as _};
use clap_complete::Shell;

use super::Cli;

/// Print a completion script for SHELL on stdout, e.g.
/// `portgate completions bash > /etc/bash_completion.d/portgate`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum, value_name = "SHELL")]
    pub shell: Shell,
}

/// Runs `portgate completions`.
pub fn run(args: &CompletionsArgs) -> anyhow::Result<()> {
    clap_complete::generate(
        args.shell,
        &mut Cli::command(),
        "portgate",
        &mut std::io::stdout(),
    );
    Ok(())
}
