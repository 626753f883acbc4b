//! `cargo xtask run`: set up what is missing, build, and run `portgate` (by default the
//! daemon on the default configuration: the quickstart).

use anyhow::{Context as _, Result, bail};
use clap::Args;

use crate::setup;

/// Options of `cargo xtask run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Arguments for `portgate` (default: `daemon`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

/// Runs `cargo xtask run`.
pub fn run(args: &RunArgs) -> Result<()> {
    setup::toolchain(false)?;
    let problems = setup::host_checks(true);
    if !problems.is_empty() {
        bail!(
            "the host is not ready for portgate:\n  - {}",
            problems.join("\n  - ")
        );
    }
    setup::status("cargo", &["build", "--release", "-p", "portgate"])?;
    let arguments: Vec<&str> = if args.args.is_empty() {
        vec!["daemon"]
    } else {
        args.args.iter().map(String::as_str).collect()
    };
    let binary =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/portgate");
    let status = std::process::Command::new(&binary)
        .args(&arguments)
        .status()
        .with_context(|| format!("running {}", binary.display()))?;
    if !status.success() {
        bail!("portgate exited with {status}");
    }
    Ok(())
}
