//! Sizes and figures shared by the adversarial tests (`cargo xtask test`) and their larger
//! run (`cargo xtask stress`).
//!
//! A test picks its size with [`size`]: the CI size normally, the stress size when
//! `PORTGATE_STRESS=1` (set by `cargo xtask stress`). It writes what it tried and what held
//! with [`report`]: one JSON line per figure, appended to the file `PORTGATE_REPORT` names
//! (nothing when it is unset). `cargo xtask stress` reads those lines back and writes
//! `RELIABILITY.md` from them, so the report says what this machine measured, never what a
//! test expected.

use std::{
    fs::OpenOptions,
    io::Write as _,
    sync::{Mutex, PoisonError},
};

use serde::Serialize;

/// The variable that turns on the stress sizes.
pub const STRESS_ENV: &str = "PORTGATE_STRESS";
/// The variable naming the report file the figures are appended to.
pub const REPORT_ENV: &str = "PORTGATE_REPORT";

/// Whether this is a stress run (`PORTGATE_STRESS=1`).
pub fn stressed() -> bool {
    std::env::var(STRESS_ENV).is_ok_and(|value| value == "1")
}

/// `ci` normally, `stress` in a stress run.
pub fn size<T>(ci: T, stress: T) -> T {
    if stressed() { stress } else { ci }
}

/// One line of the report.
#[derive(Debug, Serialize)]
struct Line<'a, F: Serialize> {
    /// The report's section (`fuzzing`, `api`, `floods`, `store`, `kernel`, `lifecycle`,
    /// `audit`, `health`).
    section: &'a str,
    /// What was tried, as one sentence a reader understands alone.
    tried: &'a str,
    /// What held, as one sentence.
    held: &'a str,
    /// The figures measured (any JSON object).
    figures: &'a F,
    /// Whether it ran at the stress size.
    stress: bool,
}

/// Appends one finding to the report file, when `PORTGATE_REPORT` names one. `tried` and
/// `held` are sentences (the report prints them as written); `figures` is what was
/// measured, for example `serde_json::json!({"requests": 240, "p99_ms": 3.1})`.
///
/// A test calls this after its assertions passed, so the report lists only what held.
pub fn report<F: Serialize>(section: &str, tried: &str, held: &str, figures: &F) {
    static WRITER: Mutex<()> = Mutex::new(());
    let Ok(path) = std::env::var(REPORT_ENV) else {
        return;
    };
    let line = Line {
        section,
        tried,
        held,
        figures,
        stress: stressed(),
    };
    let mut text = serde_json::to_string(&line).expect("a report line is JSON");
    text.push('\n');
    let _guard = WRITER.lock().unwrap_or_else(PoisonError::into_inner);
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap_or_else(|err| panic!("report file {path}: {err}"));
    file.write_all(text.as_bytes())
        .unwrap_or_else(|err| panic!("report file {path}: {err}"));
}

/// The `p`-th percentile (0–100) of `samples`, sorted in place; `None` when there are none.
pub fn percentile(samples: &mut [std::time::Duration], p: f64) -> Option<std::time::Duration> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_unstable();
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "an index into a slice far shorter than 2^52"
    )]
    let index = ((p / 100.0) * (samples.len() - 1) as f64).round() as usize;
    Some(samples[index.min(samples.len() - 1)])
}
