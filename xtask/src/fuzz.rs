//! `cargo xtask fuzz`: runs the fuzz targets under `fuzz/` with cargo-fuzz (libFuzzer and
//! address sanitizer, on nightly), installing cargo-fuzz first when it is missing. Long runs
//! belong here, not in `cargo xtask test`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail};
use clap::Args;

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
    for target in &chosen {
        fuzz(&fuzz_dir, target, args.seconds)?;
    }
    Ok(())
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

/// Fuzzes one target for `seconds`. libFuzzer grows `fuzz/corpus/<target>/` (not
/// committed) from it and the committed seeds in `fuzz/seeds/<target>/`; a failing input is
/// written under `fuzz/artifacts/<target>/` and fails the run.
fn fuzz(fuzz_dir: &Path, target: &str, seconds: u32) -> Result<()> {
    let corpus: PathBuf = ["corpus", target].iter().collect();
    std::fs::create_dir_all(fuzz_dir.join(&corpus))
        .with_context(|| format!("creating fuzz/{}", corpus.display()))?;
    let mut command = Command::new("cargo");
    command
        .current_dir(fuzz_dir)
        .args(["+nightly", "fuzz", "run", target])
        .arg(&corpus);
    let seeds: PathBuf = ["seeds", target].iter().collect();
    if fuzz_dir.join(&seeds).is_dir() {
        command.arg(&seeds);
    }
    command.arg("--").arg(format!("-max_total_time={seconds}"));
    println!("fuzzing {target} for {seconds} s");
    let status = command.status().context("running cargo fuzz")?;
    if !status.success() {
        bail!("fuzz target {target} failed ({status}): see fuzz/artifacts/{target}/");
    }
    Ok(())
}
