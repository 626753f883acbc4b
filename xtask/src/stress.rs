//! `cargo xtask stress`: the adversarial suite at its larger size, and `RELIABILITY.md`.
//!
//! It runs the adversarial kernel tests with `PORTGATE_STRESS=1` (each picks its larger
//! size: more requests, longer floods, more cycles) and `PORTGATE_REPORT` naming a file the
//! tests append their findings to (`portgate_tests::stress::report`: what was tried, what
//! held, the figures measured), then every fuzz target for a bounded time (`cargo xtask
//! fuzz`), and writes `RELIABILITY.md` from what this run measured. A failed test or fuzz
//! target fails the run; the report is written all the same and says so.

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use clap::Args;
use serde_json::Value;

use crate::{fuzz, setup, test};

/// The adversarial kernel test modules (libtest filters) the stress run runs.
pub const MODULES: [&str; 7] = [
    "api_abuse::",
    "audit_health::",
    "floods::",
    "store_faults::",
    "lifecycle_abuse::",
    "gate_faults::",
    "knock::",
];

/// The report's sections, in order: (section name in the findings, heading).
const SECTIONS: [(&str, &str); 8] = [
    ("api", "Bad and hostile API clients"),
    ("floods", "Floods"),
    ("store", "Store faults"),
    ("kernel", "Kernel-side faults"),
    ("lifecycle", "Lifecycle"),
    ("audit", "Audit log"),
    ("health", "The daemon's own health"),
    ("fuzzing", "Fuzzing"),
];

/// Options of `cargo xtask stress`.
#[derive(Debug, Args)]
pub struct StressArgs {
    /// Seconds to fuzz each target (0: no fuzzing).
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u32).range(0..=86_400))]
    pub fuzz_seconds: u32,
    /// Where to write the report.
    #[arg(long, default_value = "RELIABILITY.md")]
    pub output: PathBuf,
}

/// Runs `cargo xtask stress`.
pub fn run(args: &StressArgs) -> Result<()> {
    setup::toolchain(false)?;
    let problems = setup::host_checks(true);
    if !problems.is_empty() {
        bail!(
            "the stress run needs the kernel tests, which cannot run here:\n  - {}",
            problems.join("\n  - ")
        );
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out_dir = root.join("target/stress");
    fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let findings_path = out_dir.join("findings.jsonl");
    let _none = fs::remove_file(&findings_path);
    let started = Instant::now();

    setup::status("cargo", &["build", "-p", "portgate", "--bins"])?;
    let mut test_args: Vec<String> = MODULES.iter().map(|&module| module.to_owned()).collect();
    test_args.push("--test-threads=1".to_owned());
    let findings = findings_path.to_string_lossy().into_owned();
    let kernel = test::cargo_test(
        &["-p", "portgate-tests", "--test", "kernel"],
        &test_args,
        &[("PORTGATE_STRESS", "1"), ("PORTGATE_REPORT", &findings)],
    )?;
    let tests_took = started.elapsed();

    let fuzzing = if args.fuzz_seconds > 0 {
        let fuzz_started = Instant::now();
        let outcome = fuzz::run(&fuzz::FuzzArgs {
            seconds: args.fuzz_seconds,
            targets: Vec::new(),
        });
        Some((outcome, fuzz_started.elapsed()))
    } else {
        None
    };

    let run = Run {
        kernel,
        tests_secs: tests_took.as_secs(),
        fuzz_seconds: args.fuzz_seconds,
        fuzz_failed: fuzzing
            .as_ref()
            .and_then(|(outcome, _)| outcome.as_ref().err().map(|err| format!("{err:#}"))),
        total_secs: started.elapsed().as_secs(),
    };
    let findings = read_findings(&findings_path)?;
    let fuzz_summary = fs::read_to_string(root.join("target/fuzz/summary.json"))
        .ok()
        .and_then(|text| serde_json::from_str::<Value>(&text).ok());
    let text = render(&run, &findings, fuzz_summary.as_ref(), &machine());
    let output = if args.output.is_absolute() {
        args.output.clone()
    } else {
        root.join(&args.output)
    };
    fs::write(&output, text).with_context(|| format!("writing {}", output.display()))?;
    println!("wrote {}", output.display());
    if run.kernel.failed > 0 || run.kernel.ran() == 0 {
        bail!(
            "the stress run failed: {} kernel tests failed, {} ran",
            run.kernel.failed,
            run.kernel.ran()
        );
    }
    if let Some(failure) = run.fuzz_failed {
        bail!("the stress run failed: fuzzing: {failure}");
    }
    Ok(())
}

/// What the run did, for the report's head.
struct Run {
    kernel: test::Totals,
    tests_secs: u64,
    fuzz_seconds: u32,
    fuzz_failed: Option<String>,
    total_secs: u64,
}

/// One finding a test reported.
#[derive(Debug, serde::Deserialize)]
struct Finding {
    section: String,
    tried: String,
    held: String,
    figures: Value,
    stress: bool,
}

fn read_findings(path: &Path) -> Result<Vec<Finding>> {
    let Ok(text) = fs::read_to_string(path) else {
        return Ok(Vec::new());
    };
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            serde_json::from_str(line)
                .with_context(|| format!("a finding in {}: {line}", path.display()))
        })
        .collect()
}

/// The machine and build the run was on: date, commit, kernel, CPUs.
fn machine() -> String {
    let run = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map_or_else(
                || "?".to_owned(),
                |out| String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            )
    };
    format!(
        "{} UTC, commit {}, Linux {}, {} CPUs",
        run("date", &["-u", "+%Y-%m-%d %H:%M"]),
        run("git", &["rev-parse", "--short", "HEAD"]),
        run("uname", &["-r"]),
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get)
    )
}

/// Figures as `key: value` pairs on one line.
fn figures_line(figures: &Value) -> String {
    match figures {
        Value::Object(map) => map
            .iter()
            .map(|(key, value)| format!("{key} {}", plain(value)))
            .collect::<Vec<_>>()
            .join(" · "),
        Value::Null => String::new(),
        other => plain(other),
    }
}

fn plain(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Number(number) => number
            .as_f64()
            .filter(|float| float.fract() != 0.0)
            .map_or_else(|| number.to_string(), |float| format!("{float:.2}")),
        other => other.to_string(),
    }
}

/// The report's text.
fn render(run: &Run, findings: &[Finding], fuzz: Option<&Value>, machine: &str) -> String {
    let mut text = String::new();
    let _ = writeln!(
        text,
        "# Reliability\n\nWhat portgate's adversarial suite tried on a real kernel, and what held. \
         This file is written by `cargo xtask stress` (do not edit it by hand: run it again); \
         the same tests run at a smaller size in `cargo xtask test`, which CI runs.\n\n\
         Run: {machine}. Kernel tests at stress size: {} ran, {} failed, in {} s; \
         fuzzing {} s per target; {} s in all.\n",
        run.kernel.ran(),
        run.kernel.failed,
        run.tests_secs,
        run.fuzz_seconds,
        run.total_secs
    );
    if run.kernel.failed > 0 {
        let _ = writeln!(
            text,
            "**{} tests FAILED in this run**: what they would have reported is missing below.\n",
            run.kernel.failed
        );
    }
    if let Some(failure) = &run.fuzz_failed {
        let _ = writeln!(text, "**Fuzzing FAILED in this run**: {failure}\n");
    }
    for (section, heading) in SECTIONS {
        let _ = writeln!(text, "## {heading}\n");
        let mut any = false;
        for finding in findings.iter().filter(|finding| finding.section == section) {
            any = true;
            let size = if finding.stress { "" } else { " (CI size)" };
            let _ = writeln!(
                text,
                "- **Tried{size}:** {}\n  **Held:** {}",
                finding.tried, finding.held
            );
            let figures = figures_line(&finding.figures);
            if !figures.is_empty() {
                let _ = writeln!(text, "  *Measured:* {figures}");
            }
        }
        if section == "fuzzing" {
            any |= render_fuzz(&mut text, run, fuzz);
        }
        if !any {
            let _ = writeln!(text, "Nothing was reported in this section by this run.");
        }
        text.push('\n');
    }
    text
}

/// The fuzzing table from `target/fuzz/summary.json` (`cargo xtask fuzz`'s: an object
/// whose `targets` are one object per target); whether there was one.
fn render_fuzz(text: &mut String, run: &Run, fuzz: Option<&Value>) -> bool {
    if run.fuzz_seconds == 0 {
        let _ = writeln!(text, "Not run (`--fuzz-seconds 0`).");
        return true;
    }
    let Some(Value::Array(targets)) = fuzz.and_then(|summary| summary.get("targets")) else {
        return false;
    };
    let _ = writeln!(
        text,
        "Every fuzz target for {} s (libFuzzer with the address sanitizer, from the seeds in \
         `fuzz/seeds/`; what each target checks is in `docs/fuzzing.md`):\n\n\
         | target | inputs run | seconds | crashes | coverage | features | corpus |\n\
         |---|---:|---:|---:|---:|---:|---:|",
        run.fuzz_seconds
    );
    for target in targets {
        let cell = |key: &str| target.get(key).map_or_else(String::new, plain);
        let _ = writeln!(
            text,
            "| `{}` | {} | {} | {} | {} | {} | {} |",
            cell("target"),
            cell("runs"),
            cell("seconds"),
            cell("crashes"),
            cell("coverage"),
            cell("features"),
            cell("corpus")
        );
    }
    true
}

#[cfg(test)]
mod tests {
    use super::{Finding, Run, figures_line, render};

    #[test]
    fn a_finding_lands_in_its_section_with_its_figures() {
        let run = Run {
            kernel: crate::test::Totals {
                passed: 3,
                ..crate::test::Totals::default()
            },
            tests_secs: 10,
            fuzz_seconds: 0,
            fuzz_failed: None,
            total_secs: 12,
        };
        let findings = [Finding {
            section: "floods".to_owned(),
            tried: "A SYN flood.".to_owned(),
            held: "The limit.".to_owned(),
            figures: serde_json::json!({"syns": 1000, "p99_ms": 2.5}),
            stress: true,
        }];
        let text = render(&run, &findings, None, "today");
        let floods = text.find("## Floods").expect("the section");
        let tried = text.find("**Tried:** A SYN flood.").expect("the finding");
        assert!(
            tried > floods && text[tried..].contains("p99_ms 2.50 · syns 1000"),
            "{text}"
        );
        assert!(text.contains("3 ran, 0 failed"), "{text}");
        assert_eq!(figures_line(&serde_json::json!({"a": "b"})), "a b");
    }
}
