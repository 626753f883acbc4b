//! What a benchmark run reports: figures (measured, or failed with the reason), each with
//! the target it is read against, rendered as a markdown table and kept as JSON.

use std::{fmt::Write as _, time::Duration};

use serde::Serialize;

/// One figure of the report.
#[derive(Clone, Debug, Serialize)]
pub struct Figure {
    /// The benchmark's section (`1. In-kernel verdict`, ...).
    pub section: String,
    /// What was measured, in words.
    pub name: String,
    /// The value, or why there is none.
    pub outcome: Outcome,
    /// The target this figure is read against, and whether it was met.
    pub target: Option<Target>,
    /// The raw numbers behind the figure (samples, rounds, settings).
    pub raw: serde_json::Value,
    /// How the rounds behind a median spread, when the value is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spread: Option<Spread>,
    /// What the figure is and how it is measured, printed below the section's table.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// How the per-round values behind a median spread.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Spread {
    /// The rounds.
    pub rounds: usize,
    /// The smallest value of a round.
    pub min: f64,
    /// The largest value of a round.
    pub max: f64,
    /// `(max - min) / median`.
    pub relative: f64,
}

impl Spread {
    /// The median of `values` and their spread; `None` when there are none.
    pub fn of(values: &[f64]) -> Option<(f64, Self)> {
        let median = median(values)?;
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let spread = Self {
            rounds: values.len(),
            min,
            max,
            relative: if median == 0.0 {
                f64::NAN
            } else {
                (max - min) / median.abs()
            },
        };
        Some((median, spread))
    }
}

/// A figure's value, or the failure that left it without one.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// A value from a real run.
    Measured {
        /// The number.
        value: f64,
        /// Its unit (`ns/packet`, `conn/s`, `ms`, `MiB`, `x`).
        unit: String,
    },
    /// A correctness run (a load test) that passed.
    Passed {
        /// How big it was, how long it took.
        detail: String,
    },
    /// The set-up or the run failed; the figure is reported, not left out.
    Failed {
        /// What went wrong.
        error: String,
    },
}

/// A target from the issue or the specification.
#[derive(Clone, Debug, Serialize)]
pub struct Target {
    /// The target in words (`< 50 ms (spec)`, `>= 20,000/s (ours)`).
    pub text: String,
    /// Whether the figure meets it.
    pub met: bool,
}

impl Figure {
    /// A measured figure.
    pub fn measured(section: &str, name: impl Into<String>, value: f64, unit: &str) -> Self {
        Self {
            section: section.to_owned(),
            name: name.into(),
            outcome: Outcome::Measured {
                value,
                unit: unit.to_owned(),
            },
            target: None,
            raw: serde_json::Value::Null,
            spread: None,
            note: None,
        }
    }

    /// A correctness run that passed.
    pub fn passed(section: &str, name: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            section: section.to_owned(),
            name: name.into(),
            outcome: Outcome::Passed {
                detail: detail.into(),
            },
            target: None,
            raw: serde_json::Value::Null,
            spread: None,
            note: None,
        }
    }

    /// A figure whose set-up or run failed.
    pub fn failed(section: &str, name: impl Into<String>, error: impl std::fmt::Display) -> Self {
        Self {
            section: section.to_owned(),
            name: name.into(),
            outcome: Outcome::Failed {
                error: format!("{error:#}"),
            },
            target: None,
            raw: serde_json::Value::Null,
            spread: None,
            note: None,
        }
    }

    /// The figure read against a target: `met` says whether the value meets it.
    #[must_use]
    pub fn target(mut self, text: &str, met: impl FnOnce(f64) -> bool) -> Self {
        let met = match self.outcome {
            Outcome::Measured { value, .. } => met(value),
            Outcome::Passed { .. } => true,
            Outcome::Failed { .. } => false,
        };
        self.target = Some(Target {
            text: text.to_owned(),
            met,
        });
        self
    }

    /// The raw numbers behind the figure.
    #[must_use]
    pub fn raw(mut self, raw: serde_json::Value) -> Self {
        self.raw = raw;
        self
    }

    /// The spread of the rounds whose median the figure is, shown beside it.
    #[must_use]
    pub fn spread(mut self, spread: Spread) -> Self {
        self.spread = Some(spread);
        self
    }

    /// What the figure is and how it is measured, in a sentence below the table.
    #[must_use]
    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.note = Some(note.into());
        self
    }
}

/// The machine a run was made on.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    /// `uname -r`.
    pub kernel: String,
    /// CPU model (from /proc/cpuinfo).
    pub cpu: String,
    /// Online CPUs.
    pub cpus: usize,
    /// Memory (`MemTotal`) in MiB.
    pub memory_mib: u64,
}

impl Machine {
    /// Reads this machine's description.
    pub fn this() -> Self {
        let kernel = nix::sys::utsname::uname()
            .map(|uts| uts.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|line| line.strip_prefix("model name"))
            .and_then(|rest| rest.split_once(':'))
            .map(|(_, model)| model.trim().to_owned())
            .unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_kib: u64 = meminfo
            .lines()
            .find_map(|line| line.strip_prefix("MemTotal:"))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse().ok())
            .unwrap_or_default();
        Self {
            kernel,
            cpu,
            cpus: std::thread::available_parallelism().map_or(0, usize::from),
            memory_mib: memory_kib / 1024,
        }
    }
}

/// One run's report.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// When the run started (RFC 3339, UTC).
    pub started: String,
    /// How long it took.
    #[serde(with = "humantime_serde_secs")]
    pub took: Duration,
    /// The command that made it.
    pub command: String,
    /// Whether it was the short run (`--quick`).
    pub quick: bool,
    /// The machine.
    pub machine: Machine,
    /// Every figure, in the order measured.
    pub figures: Vec<Figure>,
}

mod humantime_serde_secs {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(took: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(took.as_secs_f64())
    }
}

impl Report {
    /// The report as markdown: the machine, then one table per section.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let m = &self.machine;
        let _ = writeln!(
            out,
            "Run {} ({}, {:.0} s) on Linux {}, {} x {}, {} MiB.\n\nCommand: `{}`\n",
            self.started,
            if self.quick { "quick" } else { "full" },
            self.took.as_secs_f64(),
            m.kernel,
            m.cpus,
            m.cpu,
            m.memory_mib,
            self.command
        );
        let mut sections: Vec<&str> = Vec::new();
        for figure in &self.figures {
            if !sections.contains(&figure.section.as_str()) {
                sections.push(&figure.section);
            }
        }
        for section in sections {
            let _ = writeln!(out, "### {section}\n");
            let _ = writeln!(out, "| Benchmark | Result | Target | Met |");
            let _ = writeln!(out, "|---|---:|---|:-:|");
            for figure in self.figures.iter().filter(|f| f.section == section) {
                let result = match (&figure.outcome, &figure.spread) {
                    (Outcome::Measured { value, unit }, Some(spread)) => format!(
                        "{} {unit} (min–max {}–{}, spread {}%, {} rounds)",
                        number(*value),
                        number(spread.min),
                        number(spread.max),
                        number(100.0 * spread.relative),
                        spread.rounds
                    ),
                    (Outcome::Measured { value, unit }, None) => {
                        format!("{} {unit}", number(*value))
                    }
                    (Outcome::Passed { detail }, _) => format!("passed ({detail})"),
                    (Outcome::Failed { error }, _) => {
                        format!(
                            "**failed**: {}",
                            error.replace('|', "\\|").replace('\n', " ")
                        )
                    }
                };
                let (target, met) = figure.target.as_ref().map_or(("", ""), |t| {
                    (t.text.as_str(), if t.met { "yes" } else { "**no**" })
                });
                let _ = writeln!(out, "| {} | {result} | {target} | {met} |", figure.name);
            }
            out.push('\n');
            for figure in self.figures.iter().filter(|f| f.section == section) {
                if let Some(note) = &figure.note {
                    let _ = writeln!(out, "- *{}*: {note}", figure.name);
                }
            }
            if self
                .figures
                .iter()
                .any(|f| f.section == section && f.note.is_some())
            {
                out.push('\n');
            }
        }
        out
    }
}

/// A number with three significant digits at most after the point, thousands separated.
pub fn number(value: f64) -> String {
    if !value.is_finite() {
        return value.to_string();
    }
    // Three significant digits below 100 (0.00213 ms, not 0.00), whole numbers above.
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a small count of decimals"
    )]
    let decimals = if value.abs() >= 100.0 || value == 0.0 {
        0
    } else {
        (2.0 - value.abs().log10().floor()).clamp(0.0, 6.0) as usize
    };
    let text = format!("{value:.decimals$}");
    let (whole, fraction) = text
        .split_once('.')
        .map_or((text.as_str(), None), |(w, f)| (w, Some(f)));
    let (sign, digits) = whole.strip_prefix('-').map_or(("", whole), |d| ("-", d));
    let mut grouped = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    match fraction {
        Some(fraction) => format!("{sign}{grouped}.{fraction}"),
        None => format!("{sign}{grouped}"),
    }
}

/// The median, or `None` when there are no values.
pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    Some(if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        f64::midpoint(sorted[mid - 1], sorted[mid])
    })
}

/// Latency percentiles of a set of samples.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Percentiles {
    /// Samples.
    pub count: usize,
    /// Median, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Largest, ms.
    pub max_ms: f64,
}

impl Percentiles {
    /// Percentiles of `samples` (sorted here).
    pub fn of(samples: &mut [Duration]) -> Self {
        samples.sort_unstable();
        let at = |q: f64| -> f64 {
            if samples.is_empty() {
                return f64::NAN;
            }
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                clippy::cast_precision_loss,
                reason = "an index into the samples"
            )]
            let index = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
            samples[index].as_secs_f64() * 1e3
        };
        Self {
            count: samples.len(),
            p50_ms: at(0.50),
            p99_ms: at(0.99),
            max_ms: at(1.0),
        }
    }
}

/// Runs `total` operations spread over `tasks` concurrent tokio tasks: `operation(task, i)`
/// makes the `i`th operation of task `task`, timed until its future completes. Returns the
/// wall time of the whole run and every operation's latency; the first failure ends it.
pub async fn run_concurrently<F, Fut>(
    tasks: usize,
    total: usize,
    operation: F,
) -> anyhow::Result<(Duration, Vec<Duration>)>
where
    F: Fn(usize, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let operation = std::sync::Arc::new(operation);
    let start = std::time::Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for task in 0..tasks {
        let operation = std::sync::Arc::clone(&operation);
        let share = total / tasks + usize::from(task < total % tasks);
        set.spawn(async move {
            let mut samples = Vec::with_capacity(share);
            for i in 0..share {
                let begun = std::time::Instant::now();
                operation(task, i).await?;
                samples.push(begun.elapsed());
            }
            anyhow::Ok(samples)
        });
    }
    let mut samples = Vec::with_capacity(total);
    while let Some(done) = set.join_next().await {
        samples.extend(done??);
    }
    Ok((start.elapsed(), samples))
}

/// A timed run of `count` operations: its rate and latencies, and the raw numbers.
pub struct Timed {
    /// Operations per second.
    pub rate: f64,
    /// Latency percentiles.
    pub latency: Percentiles,
    /// Count, seconds, latencies and the run's settings, for the report's JSON.
    pub raw: serde_json::Value,
}

impl Timed {
    /// The figures of a run that took `elapsed` with these per-operation `samples`.
    pub fn of(elapsed: Duration, samples: &mut [Duration], settings: &serde_json::Value) -> Self {
        let count = samples.len();
        let latency = Percentiles::of(samples);
        #[expect(clippy::cast_precision_loss, reason = "a count of operations")]
        let rate = count as f64 / elapsed.as_secs_f64();
        let raw = serde_json::json!({
            "count": count,
            "seconds": elapsed.as_secs_f64(),
            "latency": latency,
            "settings": settings,
        });
        Self { rate, latency, raw }
    }

    /// Its figures: `<what>: <noun>/s` read against `min_rate`, p50 and p99 against
    /// `max_ms` (each a target's text and its bound).
    pub fn figures(
        &self,
        section: &str,
        what: &str,
        noun: &str,
        min_rate: (&str, f64),
        max_ms: (&str, f64),
    ) -> Vec<Figure> {
        let mut figures = vec![
            Figure::measured(section, format!("{what}: {noun}/s"), self.rate, "/s")
                .target(min_rate.0, |v| v >= min_rate.1)
                .raw(self.raw.clone()),
        ];
        for (name, value) in [("p50", self.latency.p50_ms), ("p99", self.latency.p99_ms)] {
            figures.push(
                Figure::measured(section, format!("{what}: {name}"), value, "ms")
                    .target(max_ms.0, |v| v < max_ms.1)
                    .raw(self.raw.clone()),
            );
        }
        figures
    }
}

#[cfg(test)]
mod tests {
    use super::{median, number};

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn numbers_are_grouped_and_rounded() {
        assert_eq!(number(1_234_567.4), "1,234,567");
        assert_eq!(number(123.4), "123");
        assert_eq!(number(12.345), "12.3");
        assert_eq!(number(1.2345), "1.23");
        assert_eq!(number(0.002_134), "0.00213");
        assert_eq!(number(0.0), "0");
        assert_eq!(number(-4321.0), "-4,321");
    }
}
