//! The `portgate` binary: parses the command line, runs the verb and turns the result into
//! an exit code ([`cli::EXIT_OK`], [`cli::EXIT_DENIED`], [`cli::EXIT_FAILURE`]); a failure is
//! one line on stderr, `portgate: <what was wrong>: <what to do>`.

use std::{ffi::OsString, process::ExitCode};

use clap::{Parser as _, error::ErrorKind};
use portgate::cli::{self, Cli};

fn main() -> ExitCode {
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
    let daemon = matches!(cli.command, cli::Command::Daemon(_));
    // The daemon says what it does at info; the CLI only warns.
    let level = if daemon { "info" } else { "warn" };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level)).init();
    if !daemon {
        // `portgate list | head` ends quietly, like other tools, instead of panicking on a
        // closed pipe. The daemon keeps Rust's default (ignored), so a client that goes
        // away mid-answer is an error on that connection, not the daemon's death.
        // SAFETY: nothing else runs yet; setting a signal's disposition is process-wide.
        let _previous = unsafe {
            nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGPIPE,
                nix::sys::signal::SigHandler::SigDfl,
            )
        };
    }
    match cli::run(cli) {
        Ok(outcome) => outcome.into(),
        Err(err) => {
            eprintln!("portgate: {}", cli::failure_line(&err));
            ExitCode::from(cli::EXIT_FAILURE)
        }
    }
}
