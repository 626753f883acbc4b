//! `portgate-bench`: portgate's benchmarks, side by side with no gate and with nftables.
//!
//! Run it with `cargo xtask bench [--quick]`, which builds it in release mode with the
//! `portgate` binary and runs it as root. Each section is measured on the real kernel, in
//! test cgroups, network namespaces and pin directories of its own (the same RAII guards as
//! the kernel tests). A section that fails is reported as failed, with the reason. The
//! report is printed as markdown and written, with the raw numbers, as JSON under
//! `target/bench/`.

mod allocation;
mod bpf_stats;
mod checks;
mod connrate;
mod daemon_load;
mod fleet;
mod load;
mod loadgen;
mod nft;
mod report;
mod verdict;

use std::{
    fs,
    panic::{AssertUnwindSafe, catch_unwind},
    path::PathBuf,
    time::{Instant, SystemTime},
};

use anyhow::{Context as _, Result};
use clap::Parser;
use portgate_tests::common::require_privileges;
use report::{Figure, Machine, Report};

/// portgate's benchmarks.
#[derive(Debug, Parser)]
#[command(name = "portgate-bench")]
struct Cli {
    /// The short run: fewer repeats, rounds and seconds (a few minutes in all).
    #[arg(long)]
    quick: bool,
    /// Only these sections (1-8; 7 is the load tests'); all when absent.
    #[arg(long, value_delimiter = ',')]
    only: Vec<u8>,
    /// Where the JSON and markdown go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// The load tests' results (JSON from `cargo xtask bench`), reported as section 7.
    #[arg(long)]
    load_tests: Option<PathBuf>,
    /// The command line to record in the report (`cargo xtask bench` passes its own).
    #[arg(long)]
    command: Option<String>,
    /// Internal: run one round of sections 2 and 3 (a JSON spec) in this process.
    #[arg(long, hide = true)]
    round: Option<String>,
}

/// What every section is told about the run.
#[derive(Clone, Debug)]
pub struct Options {
    /// The short run.
    pub quick: bool,
}

impl Options {
    /// `full` in a full run, `quick` in a quick one.
    pub fn pick<T>(&self, full: T, quick: T) -> T {
        if self.quick { quick } else { full }
    }
}

/// One section: its number, title and body.
type Section = (u8, &'static str, fn(&Options) -> Vec<Figure>);

/// The sections, in the order they run.
const SECTIONS: &[Section] = &[
    (1, verdict::SECTION, verdict::run),
    (2, connrate::SECTION_LOOPBACK, connrate::loopback),
    (3, connrate::SECTION_SCALE, connrate::at_scale),
    (4, "4. Allocation", allocation::run),
    (5, "5. Checks, metrics scrape, `portgate maps`", checks::run),
    (6, daemon_load::SECTION, daemon_load::under_load),
    (8, fleet::SECTION, fleet::run),
];

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("portgate-bench: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    if let Some(spec) = &cli.round {
        return connrate::child(spec);
    }
    // The benchmarks need the kernel; without it there is nothing to report.
    anyhow::ensure!(
        require_privileges("portgate-bench"),
        "the benchmarks need root and the kernel features the tests need"
    );
    let options = Options { quick: cli.quick };
    let started = SystemTime::now();
    let clock = Instant::now();
    let mut figures = Vec::new();
    for &(number, title, body) in SECTIONS {
        if !cli.only.is_empty() && !cli.only.contains(&number) {
            continue;
        }
        eprintln!("portgate-bench: {title} ...");
        let section_clock = Instant::now();
        match catch_unwind(AssertUnwindSafe(|| body(&options))) {
            Ok(mut got) => figures.append(&mut got),
            Err(panic) => {
                let why = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_else(|| "panicked".to_owned());
                figures.push(Figure::failed(title, "the whole section", why));
            }
        }
        eprintln!(
            "portgate-bench: {title}: {:.1} s",
            section_clock.elapsed().as_secs_f64()
        );
    }
    if let Some(path) = &cli.load_tests {
        figures.extend(load::figures(path));
    }
    let report = Report {
        started: humantime::format_rfc3339_seconds(started).to_string(),
        took: clock.elapsed(),
        command: cli
            .command
            .unwrap_or_else(|| std::env::args().collect::<Vec<_>>().join(" ")),
        quick: cli.quick,
        machine: Machine::this(),
        figures,
    };
    let markdown = report.markdown();
    print!("{markdown}");
    fs::create_dir_all(&cli.out).with_context(|| format!("creating {}", cli.out.display()))?;
    let stamp = report.started.replace(':', "");
    let json = serde_json::to_string_pretty(&report)?;
    for (name, text) in [
        (format!("bench-{stamp}.json"), &json),
        ("latest.json".to_owned(), &json),
        ("latest.md".to_owned(), &markdown),
    ] {
        let path = cli.out.join(name);
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    eprintln!("portgate-bench: written to {}", cli.out.display());
    Ok(())
}
