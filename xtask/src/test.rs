//! `cargo xtask test`: the project's one test command (CI runs exactly this).
//!
//! Set-up first (toolchain, host checks), then the unit tests, then the kernel tests on one
//! thread (they share the kernel), then a summary that says how many kernel tests ran.

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use clap::Args;

use crate::setup;

/// Options of `cargo xtask test`.
#[derive(Debug, Args)]
pub struct TestArgs {
    /// Only the unit tests.
    #[arg(long, conflicts_with = "kernel")]
    pub unit: bool,
    /// Only the kernel tests.
    #[arg(long)]
    pub kernel: bool,
    /// Also the opt-in tests with a real podman container (sets `PORTGATE_TEST_PODMAN=1`;
    /// the set-up installs podman, runc and busybox-static).
    #[arg(long)]
    pub podman: bool,
    /// Passed to the test binaries (a name filter, `--nocapture`, ...).
    #[arg(last = true)]
    pub passthrough: Vec<String>,
}

/// Totals over every test binary of one `cargo test` run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Tests that passed (skipped ones included: libtest counts them as passed).
    pub passed: u64,
    /// Tests that failed.
    pub failed: u64,
    /// Tests marked `#[ignore]`.
    pub ignored: u64,
    /// Tests that printed `SKIPPED:` (no privileges, CI unset).
    pub skipped: u64,
}

impl Totals {
    /// Adds what one line of libtest output says.
    pub fn read_line(&mut self, line: &str) {
        // libtest may have printed "test name ... " on the same line before it.
        if line.contains("SKIPPED: ") {
            self.skipped += 1;
        }
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(label), Some(count)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(count) = count.parse::<u64>() else {
                continue;
            };
            match label {
                "passed" => self.passed += count,
                "failed" => self.failed += count,
                "ignored" => self.ignored += count,
                _ => {}
            }
        }
    }

    /// Adds the totals of another run.
    pub fn add(&mut self, other: &Self) {
        self.passed += other.passed;
        self.failed += other.failed;
        self.ignored += other.ignored;
        self.skipped += other.skipped;
    }

    /// Tests that ran their kernel part.
    #[must_use]
    pub const fn ran(&self) -> u64 {
        self.passed.saturating_sub(self.skipped) + self.failed
    }
}

/// Runs `cargo xtask test`.
pub fn run(args: &TestArgs) -> Result<()> {
    setup::toolchain(false)?;
    let mut problems = setup::host_checks(true);
    problems.extend(setup::test_tools(true));
    if args.podman {
        problems.extend(setup::podman_tools(true));
    }
    let in_ci = std::env::var_os("CI").is_some();
    if !problems.is_empty() {
        let list = problems.join("\n  - ");
        if in_ci && !args.unit {
            bail!("CI is set and the kernel tests cannot run here:\n  - {list}");
        }
        println!("warning: the kernel tests will be skipped:\n  - {list}");
    }

    let mut failed = false;
    if !args.kernel {
        let mut unit = cargo_test(
            &["-p", "portgate", "-p", "portgate-common", "-p", "xtask"],
            &args.passthrough,
            &[],
        )?;
        // The test crate's own unit tests (fixtures, the benchmark binary's helpers).
        unit.add(&cargo_test(
            &["-p", "portgate-tests", "--lib", "--bins"],
            &args.passthrough,
            &[],
        )?);
        println!(
            "unit tests: {} passed, {} failed, {} ignored",
            unit.passed, unit.failed, unit.ignored
        );
        failed |= unit.failed > 0;
    }
    if !args.unit {
        // The daemon tests run the `portgate` binary (as the daemon, and as the CLI of
        // other users): build it first, so that they never run a stale one.
        crate::setup::status("cargo", &["build", "-p", "portgate", "--bins"])?;
        let mut test_args = vec!["--test-threads=1".to_owned()];
        test_args.extend(args.passthrough.iter().cloned());
        // The API test runs the schemathesis the set-up installed.
        let schemathesis = setup::schemathesis_path()?.to_string_lossy().into_owned();
        let mut env = vec![("PORTGATE_SCHEMATHESIS", schemathesis.as_str())];
        if args.podman {
            env.push(("PORTGATE_TEST_PODMAN", "1"));
        }
        let kernel = cargo_test(
            &["-p", "portgate-tests", "--test", "kernel"],
            &test_args,
            &env,
        )?;
        println!(
            "kernel tests: {} ran ({} passed, {} failed), {} skipped, {} ignored",
            kernel.ran(),
            kernel.passed - kernel.skipped,
            kernel.failed,
            kernel.skipped,
            kernel.ignored
        );
        failed |= kernel.failed > 0;
        if in_ci && kernel.ran() == 0 {
            bail!("CI is set and no kernel test ran");
        }
    }
    if failed {
        bail!("tests failed");
    }
    Ok(())
}

/// Runs `cargo test <packages> -- <test_args>` (with `env` set for the tests), streaming
/// its output and counting results.
pub fn cargo_test(packages: &[&str], test_args: &[String], env: &[(&str, &str)]) -> Result<Totals> {
    let mut command = Command::new(env!("CARGO"));
    command.envs(env.iter().copied());
    let mut child = command
        .arg("test")
        .args(packages)
        .arg("--")
        .args(test_args)
        .stdout(Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let stdout = child.stdout.take().context("cargo test's output")?;
    let mut totals = Totals::default();
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test's output")?;
        println!("{line}");
        totals.read_line(&line);
    }
    let status = child.wait().context("waiting for cargo test")?;
    if !status.success() && totals.failed == 0 {
        bail!("cargo test {} failed ({status})", packages.join(" "));
    }
    Ok(totals)
}

#[cfg(test)]
mod tests {
    use super::Totals;

    #[test]
    fn sums_results_over_binaries_and_counts_skips() {
        let output = "\
running 3 tests
test allowlist ... SKIPPED: allowlist: CAP_BPF missing: run as root
ok
test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s
running 2 tests
test result: FAILED. 1 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.2s
";
        let mut totals = Totals::default();
        for line in output.lines() {
            totals.read_line(line);
        }
        assert_eq!(
            totals,
            Totals {
                passed: 4,
                failed: 1,
                ignored: 1,
                skipped: 1,
            }
        );
        assert_eq!(totals.ran(), 4);
    }
}
