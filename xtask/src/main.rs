//! portgate's developer tasks: `cargo xtask setup | test | stress | bench | fuzz | run | lint`.

mod bench;
mod charts;
mod fuzz;
mod lint;
mod run;
mod setup;
mod shape;
mod stress;
mod test;

use clap::{Parser, Subcommand};

/// Developer tasks for portgate.
#[derive(Debug, Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install what the build needs (rust-src, bpf-linker) and check the host.
    Setup(setup::SetupArgs),
    /// Set up, then run the unit tests and the kernel tests.
    Test(test::TestArgs),
    /// The adversarial suite at its larger size (floods, faults, hostile clients), then
    /// every fuzz target for a while; writes RELIABILITY.md from what it measured.
    Stress(stress::StressArgs),
    /// Set up (nftables too), build in release mode, run the load tests bigger and the
    /// benchmarks; prints a markdown table and writes JSON and SVG charts under
    /// `target/bench/` (`--charts-from FILE`: only the charts of a saved run).
    Bench(bench::BenchArgs),
    /// Fuzz the parsers for a while (cargo-fuzz on nightly, installed when missing); a
    /// failing input fails the run and is kept under `fuzz/artifacts/`.
    Fuzz(fuzz::FuzzArgs),
    /// Set up, build, and run the `portgate` binary with the given arguments.
    Run(run::RunArgs),
    /// Check formatting, run clippy on every crate (the kernel crate on nightly), and check
    /// the code's shape: layers, file sizes, function lengths.
    Lint,
}

fn main() -> std::process::ExitCode {
    let result = match Cli::parse().command {
        Command::Setup(args) => setup::run(&args),
        Command::Test(args) => test::run(&args),
        Command::Stress(args) => stress::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Fuzz(args) => fuzz::run(&args),
        Command::Run(args) => run::run(&args),
        Command::Lint => lint::run(),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
