//! `cargo xtask fuzz`: runs the fuzz targets under `fuzz/` with cargo-fuzz (libFuzzer and
//! address sanitizer, on nightly), installing cargo-fuzz first when it is missing. Long runs
//! belong here, not in `cargo xtask test`.
//!
//! Every target runs, even after one fails; then one line per target says what it did,
//! `fuzz: <target>: <runs> runs in <secs> s, <n> crashes` (libFuzzer's final statistics),
//! and `target/fuzz/summary.json` holds the same figures with the coverage reached, for
//! `cargo xtask stress` to read.

use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use clap::Args;
use serde_json::json;

use crate::setup;

/// The cargo-fuzz release `cargo xtask fuzz` installs (built with `--locked`).
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Options of `cargo xtask fuzz`.
#[derive(Debug, Args)]
pub struct FuzzArgs {
    /// Seconds to fuzz each target (1..=86400).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u32).range(1..=86_400))]
    pub seconds: u32,
    /// The targets to run (default: every one in `fuzz/fuzz_targets/`).
    pub targets: Vec<String>,
}

/// Runs `cargo xtask fuzz`.
pub fn run(args: &FuzzArgs) -> Result<()> {
    setup::toolchain(false)?;
    cargo_fuzz()?;
    let fuzz_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let known = targets(&fuzz_dir)?;
    let chosen = if args.targets.is_empty() {
        known.clone()
    } else {
        args.targets.clone()
    };
    for target in &chosen {
        if !known.contains(target) {
            bail!(
                "no fuzz target {target:?}: the targets are {}",
                known.join(", ")
            );
        }
    }
    let mut summaries = Vec::new();
    for target in &chosen {
        summaries.push(fuzz(&fuzz_dir, target, args.seconds)?);
    }
    for summary in &summaries {
        println!("{}", summary.line());
    }
    let path = fuzz_dir.join("../target/fuzz/summary.json");
    std::fs::create_dir_all(path.parent().unwrap_or(&fuzz_dir))
        .with_context(|| format!("creating the directory of {}", path.display()))?;
    let json = json!({
        "seconds_per_target": args.seconds,
        "targets": summaries.iter().map(Summary::json).collect::<Vec<_>>(),
    });
    std::fs::write(&path, serde_json::to_string_pretty(&json)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    println!("fuzz: summary in target/fuzz/summary.json");
    let failed: Vec<&str> = summaries
        .iter()
        .filter(|summary| !summary.passed)
        .map(|summary| summary.target.as_str())
        .collect();
    if !failed.is_empty() {
        bail!(
            "fuzz targets failed: {}: see fuzz/artifacts/<target>/ and docs/fuzzing.md",
            failed.join(", ")
        );
    }
    Ok(())
}

/// What one target's run did.
#[derive(Debug, Default)]
struct Summary {
    target: String,
    /// Inputs run (`stat::number_of_executed_units`).
    runs: u64,
    /// Seconds fuzzed.
    seconds: u64,
    /// Failing inputs written under `fuzz/artifacts/<target>/` by this run.
    crashes: usize,
    /// Coverage (`cov:`) and features (`ft:`) at the last status line, and the corpus.
    coverage: u64,
    features: u64,
    corpus: u64,
    passed: bool,
}

impl Summary {
    /// The summary line, and the coverage reached on the next (indented) line.
    fn line(&self) -> String {
        format!(
            "fuzz: {}: {} runs in {} s, {} crashes\n  coverage {}, features {}, corpus {}",
            self.target,
            self.runs,
            self.seconds,
            self.crashes,
            self.coverage,
            self.features,
            self.corpus
        )
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "target": self.target,
            "runs": self.runs,
            "seconds": self.seconds,
            "crashes": self.crashes,
            "coverage": self.coverage,
            "features": self.features,
            "corpus": self.corpus,
            "passed": self.passed,
        })
    }

    /// Takes in one line of libFuzzer's output.
    fn read(&mut self, line: &str) {
        if let Some(runs) = line.strip_prefix("stat::number_of_executed_units:") {
            self.runs = runs.trim().parse().unwrap_or(self.runs);
        } else if let Some(done) = line.strip_prefix("Done ") {
            // "Done 12345 runs in 61 second(s)"
            if let Some(seconds) = done.split_whitespace().nth(3) {
                self.seconds = seconds.parse().unwrap_or(self.seconds);
            }
        } else if line.starts_with('#') && line.contains(" cov: ") {
            // "#1024 NEW cov: 812 ft: 2048 corp: 64/2Kb ..."
            let mut words = line.split_whitespace();
            while let Some(word) = words.next() {
                let slot = match word {
                    "cov:" => &mut self.coverage,
                    "ft:" => &mut self.features,
                    "corp:" => &mut self.corpus,
                    _ => continue,
                };
                if let Some(value) = words.next().and_then(|v| v.split('/').next()) {
                    *slot = value.parse().unwrap_or(*slot);
                }
            }
        }
    }
}

/// Installs cargo-fuzz unless `cargo fuzz` already answers.
fn cargo_fuzz() -> Result<()> {
    let installed = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|out| out.status.success());
    if installed {
        println!("ok: cargo-fuzz");
        return Ok(());
    }
    setup::status(
        "cargo",
        &[
            "install",
            "cargo-fuzz",
            "--locked",
            "--version",
            CARGO_FUZZ_VERSION,
        ],
    )?;
    println!("installed: cargo-fuzz {CARGO_FUZZ_VERSION}");
    Ok(())
}

/// The fuzz targets: the file stems in `fuzz/fuzz_targets/`, sorted.
fn targets(fuzz_dir: &Path) -> Result<Vec<String>> {
    let dir = fuzz_dir.join("fuzz_targets");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "rs")
            && let Some(stem) = path.file_stem().and_then(|stem| stem.to_str())
        {
            names.push(stem.to_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// The files in `dir` (none when it does not exist).
fn files_in(dir: &Path) -> BTreeSet<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| entries.flatten().map(|entry| entry.path()).collect())
        .unwrap_or_default()
}

/// Fuzzes one target for `seconds` and says what it did. libFuzzer grows
/// `fuzz/corpus/<target>/` (not committed) from it and the committed seeds in
/// `fuzz/seeds/<target>/`; a failing input is written under `fuzz/artifacts/<target>/`
/// and fails the run.
fn fuzz(fuzz_dir: &Path, target: &str, seconds: u32) -> Result<Summary> {
    let corpus: PathBuf = ["corpus", target].iter().collect();
    std::fs::create_dir_all(fuzz_dir.join(&corpus))
        .with_context(|| format!("creating fuzz/{}", corpus.display()))?;
    // Built first, so that the time measured is the fuzzing's.
    let built = Command::new("cargo")
        .current_dir(fuzz_dir)
        .args(["+nightly", "fuzz", "build", target])
        .status()
        .context("running cargo fuzz build")?;
    if !built.success() {
        bail!("fuzz target {target} does not build ({built})");
    }
    let artifacts = fuzz_dir.join("artifacts").join(target);
    let before = files_in(&artifacts);
    let mut command = Command::new("cargo");
    command
        .current_dir(fuzz_dir)
        .args(["+nightly", "fuzz", "run", target])
        .arg(&corpus);
    let seeds: PathBuf = ["seeds", target].iter().collect();
    if fuzz_dir.join(&seeds).is_dir() {
        command.arg(&seeds);
    }
    command
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg("-print_final_stats=1")
        .stderr(Stdio::piped());
    println!("fuzzing {target} for {seconds} s");
    let started = Instant::now();
    let mut child = command.spawn().context("running cargo fuzz")?;
    let mut summary = Summary {
        target: target.to_owned(),
        ..Summary::default()
    };
    if let Some(stderr) = child.stderr.take() {
        let mut echo = std::io::stderr();
        for line in BufReader::new(stderr).lines() {
            let line = line.context("reading libFuzzer's output")?;
            let _ = writeln!(echo, "{line}");
            summary.read(&line);
        }
    }
    let status = child.wait().context("waiting for cargo fuzz")?;
    if summary.seconds == 0 {
        summary.seconds = started.elapsed().as_secs();
    }
    summary.crashes = files_in(&artifacts).difference(&before).count();
    summary.passed = status.success();
    if !summary.passed {
        summary.crashes = summary.crashes.max(1);
        eprintln!("fuzz target {target} failed ({status}): see fuzz/artifacts/{target}/");
    }
    Ok(summary)
}
