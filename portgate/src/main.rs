//! The `portgate` binary: parses the command line, runs the verb and turns the result into
//! an exit code ([`cli::EXIT_OK`], [`cli::EXIT_DENIED`], [`cli::EXIT_FAILURE`]); a failure is
//! one line on stderr, `portgate: <what was wrong>: <what to do>`.

use std::{ffi::OsString, process::ExitCode};

use clap::{Parser as _, error::ErrorKind};
use portgate::cli::{self, Cli};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args: Vec<OsString> = std::env::args_os().collect();
    let cli = match Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        // --help, --version, and the full help when no verb is given: clap prints them.
        Err(err)
            if !err.use_stderr()
                || err.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand =>
        {
            err.exit()
        }
        Err(err) => {
            eprintln!("portgate: {}", cli::usage_line(&err, &args));
            return ExitCode::from(cli::EXIT_FAILURE);
        }
    };
    match cli::run(cli) {
        Ok(outcome) => outcome.into(),
        Err(err) => {
            eprintln!("portgate: {}", cli::failure_line(&err));
            ExitCode::from(cli::EXIT_FAILURE)
        }
    }
}
