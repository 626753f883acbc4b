//! The `portgate` command line: clap derive, one module per verb.

pub mod maps;
pub mod table;

use clap::{Parser, Subcommand, ValueEnum};

/// How results are printed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns for people.
    #[default]
    Table,
    /// JSON for programs.
    Json,
}

/// portgate: hands out ports to owners and enforces each port's policy in the kernel.
#[derive(Debug, Parser)]
#[command(name = "portgate", version, about)]
pub struct Cli {
    /// Output format.
    #[arg(
        short = 'o',
        long = "output",
        global = true,
        value_enum,
        default_value_t
    )]
    pub output: OutputFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The verbs.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show the live kernel maps (no daemon needed).
    Maps(maps::MapsArgs),
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Maps(args) => maps::run(&args, cli.output),
    }
}
