//! `cargo xtask bench`: set-up (nftables included), release builds, the specification's
//! load tests at a larger scale, then the benchmark binary, which prints the markdown table
//! and writes it with the raw numbers as JSON under `target/bench/`; then the charts of the
//! run ([`crate::charts`]) beside them. `--charts-from FILE` draws the charts of a saved
//! run beside FILE, without running anything.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use clap::Args;

use crate::{charts, setup, test::Totals};

/// Options of `cargo xtask bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// The short run (a few minutes): fewer repeats, rounds and seconds.
    #[arg(long)]
    pub quick: bool,
    /// Only these benchmark sections (1-8), comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<u8>,
    /// Run nothing: draw the charts of the run saved in FILE (a `latest.json`) as SVG files
    /// beside it.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["quick", "only"])]
    pub charts_from: Option<PathBuf>,
}

/// Where the report goes.
const OUT_DIR: &str = "target/bench";

/// How much bigger than in `cargo xtask test` the load tests run.
const LOAD_SCALE_FULL: u32 = 10;
const LOAD_SCALE_QUICK: u32 = 3;

/// Runs `cargo xtask bench`.
pub fn run(args: &BenchArgs) -> Result<()> {
    if let Some(results) = &args.charts_from {
        return charts(results);
    }
    setup::toolchain(false)?;
    let problems = setup::host_checks(true);
    if !problems.is_empty() {
        bail!(
            "the benchmarks need the kernel parts:\n  - {}",
            problems.join("\n  - ")
        );
    }
    if let Some(problem) = setup::bench_tools() {
        println!("warning: {problem}");
    }
    setup::status("cargo", &["build", "--release", "-p", "portgate", "--bins"])?;
    setup::status(
        "cargo",
        &[
            "build",
            "--release",
            "-p",
            "portgate-tests",
            "--bin",
            "portgate-bench",
        ],
    )?;
    let target = workspace_target()?;
    fs::create_dir_all(OUT_DIR).with_context(|| format!("creating {OUT_DIR}"))?;

    let mut command_line = vec!["cargo".to_owned(), "xtask".to_owned(), "bench".to_owned()];
    if args.quick {
        command_line.push("--quick".to_owned());
    }
    if !args.only.is_empty() {
        let only: Vec<String> = args.only.iter().map(u8::to_string).collect();
        command_line.push(format!("--only={}", only.join(",")));
    }

    let mut bench = Command::new(target.join("release").join("portgate-bench"));
    bench
        .arg("--out")
        .arg(OUT_DIR)
        .arg("--command")
        .arg(command_line.join(" "))
        .env("PORTGATE_BIN", target.join("release").join("portgate"));
    if args.quick {
        bench.arg("--quick");
    }
    if !args.only.is_empty() {
        let only: Vec<String> = args.only.iter().map(u8::to_string).collect();
        bench.arg(format!("--only={}", only.join(",")));
    }
    if args.only.is_empty() || args.only.contains(&7) {
        let scale = if args.quick {
            LOAD_SCALE_QUICK
        } else {
            LOAD_SCALE_FULL
        };
        let results = PathBuf::from(OUT_DIR).join("load-tests.json");
        load_tests(scale, &target, &results)?;
        bench.arg("--load-tests").arg(&results);
    }
    let status = bench.status().context("running portgate-bench")?;
    if !status.success() {
        bail!("portgate-bench failed ({status})");
    }
    charts(&PathBuf::from(OUT_DIR).join("latest.json"))
}

/// Draws the charts of the run saved in `results` beside it.
fn charts(results: &Path) -> Result<()> {
    for path in charts::draw_beside(results)? {
        println!("chart: {}", path.display());
    }
    Ok(())
}

/// The cargo target directory.
fn workspace_target() -> Result<PathBuf> {
    let metadata = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .context("running cargo metadata")?;
    let metadata: serde_json::Value =
        serde_json::from_slice(&metadata.stdout).context("reading cargo metadata")?;
    metadata["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .context("cargo metadata names no target directory")
}

/// Runs the load tests at `scale` (release build) and writes what each did to `results`
/// as JSON: `{"scale": n, "seconds": s, "tests": [{"name": .., "passed": ..}]}`.
fn load_tests(scale: u32, target: &Path, results: &Path) -> Result<()> {
    println!("load tests at scale {scale} ...");
    let clock = Instant::now();
    let mut child = Command::new(env!("CARGO"))
        .args([
            "test",
            "--release",
            "-p",
            "portgate-tests",
            "--test",
            "kernel",
            "--",
            "load::",
            "--test-threads=1",
        ])
        .env("PORTGATE_LOAD_SCALE", scale.to_string())
        .env("PORTGATE_BIN", target.join("release").join("portgate"))
        .stdout(Stdio::piped())
        .spawn()
        .context("running the load tests")?;
    let stdout = child.stdout.take().context("the load tests' output")?;
    let mut totals = Totals::default();
    let mut tests = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading the load tests' output")?;
        println!("{line}");
        totals.read_line(&line);
        if let Some(rest) = line.strip_prefix("test ")
            && let Some((name, verdict)) = rest.rsplit_once(" ... ")
        {
            tests.push(serde_json::json!({"name": name, "passed": verdict.trim() == "ok"}));
        }
    }
    let status = child.wait().context("waiting for the load tests")?;
    let json = serde_json::json!({
        "scale": scale,
        "seconds": clock.elapsed().as_secs_f64(),
        "status": status.to_string(),
        "skipped": totals.skipped,
        "tests": tests,
    })
    .to_string();
    fs::write(results, json).with_context(|| format!("writing {}", results.display()))?;
    Ok(())
}
