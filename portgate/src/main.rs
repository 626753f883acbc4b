//! The `portgate` binary: parses the command line and prints failures as one line.

use clap::Parser as _;
use portgate::cli::{self, Cli};

fn main() -> std::process::ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    match cli::run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            let causes: Vec<String> = err.chain().map(ToString::to_string).collect();
            eprintln!("portgate: {}", causes.join(": "));
            std::process::ExitCode::FAILURE
        }
    }
}
