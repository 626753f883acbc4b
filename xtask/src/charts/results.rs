//! A benchmark run's results as `portgate-bench` writes them (`target/bench/latest.json`,
//! made by `tests/src/bin/portgate-bench/report.rs`), read back into typed structs, and the
//! look-ups the charts make in them.
//!
//! The figures are found by their section's number and their name, the names the bench
//! binary gives them. A figure that is not in the file (a section left out with `--only`,
//! or renamed since) or that failed comes back as a [`Missing`] that says which, so that a
//! chart can say so in place of the figure.

use std::{fmt, path::Path};

use anyhow::{Context as _, Result};
use serde::{Deserialize, de::DeserializeOwned};

/// One run's report (`Report` in the bench binary's `report.rs`).
#[derive(Clone, Debug, Deserialize)]
pub struct Report {
    /// When the run started (RFC 3339, UTC).
    pub started: String,
    /// How long it took, in seconds.
    pub took: f64,
    /// The command that made it.
    pub command: String,
    /// Whether it was the short run (`--quick`).
    pub quick: bool,
    /// The machine it ran on.
    pub machine: Machine,
    /// Every figure, in the order measured.
    pub figures: Vec<Figure>,
}

/// The machine a run was made on.
#[derive(Clone, Debug, Deserialize)]
pub struct Machine {
    /// `uname -r`.
    pub kernel: String,
    /// CPU model.
    pub cpu: String,
    /// Online CPUs.
    pub cpus: usize,
    /// Memory in MiB.
    pub memory_mib: u64,
}

/// One figure of the report (its target and note are not drawn).
#[derive(Clone, Debug, Deserialize)]
pub struct Figure {
    /// The section's title, which starts with its number (`2. Connection setup ...`).
    pub section: String,
    /// What was measured, in words.
    pub name: String,
    /// The value, or why there is none.
    pub outcome: Outcome,
    /// The numbers behind the figure; their shape depends on the figure.
    #[serde(default)]
    pub raw: serde_json::Value,
}

/// A figure's value, or the failure that left it without one.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// A value from a real run.
    Measured {
        /// The number (its unit is in the figure's name and axis).
        value: f64,
    },
    /// A correctness run that passed (drawn nowhere).
    Passed {},
    /// The set-up or the run failed.
    Failed {
        /// What went wrong.
        error: String,
    },
}

/// Why a chart has no value for a figure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Missing {
    /// The run did not measure it (its section was left out, or the name changed).
    NotInRun(String),
    /// The run measured it and it failed.
    Failed(String, String),
    /// It is there but its numbers are not of the expected shape.
    Unreadable(String, String),
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotInRun(what) => write!(f, "{what}: not in this run"),
            Self::Failed(what, error) => write!(f, "{what}: failed: {error}"),
            Self::Unreadable(what, error) => write!(f, "{what}: unreadable: {error}"),
        }
    }
}

impl Report {
    /// Reads a report written by `portgate-bench`.
    pub fn read(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not a report of portgate-bench (target/bench/latest.json)",
                path.display()
            )
        })
    }

    /// The figures of section `number`.
    pub fn section(&self, number: u8) -> impl Iterator<Item = &Figure> {
        let prefix = format!("{number}. ");
        self.figures
            .iter()
            .filter(move |figure| figure.section.starts_with(&prefix))
    }

    /// The title of section `number` without its number, when the run has it.
    pub fn section_title(&self, number: u8) -> Option<&str> {
        let prefix = format!("{number}. ");
        self.figures
            .iter()
            .find_map(|figure| figure.section.strip_prefix(&prefix))
    }

    /// The figure of section `number` named `name`.
    pub fn figure(&self, number: u8, name: &str) -> Result<&Figure, Missing> {
        self.section(number)
            .find(|figure| figure.name == name)
            .ok_or_else(|| Missing::NotInRun(name.to_owned()))
    }

    /// The measured value of a figure and its raw numbers read as `T`.
    pub fn measured<T: DeserializeOwned>(
        &self,
        number: u8,
        name: &str,
    ) -> Result<(f64, T), Missing> {
        let figure = self.figure(number, name)?;
        let value = figure.value()?;
        Ok((value, figure.raw_as()?))
    }

    /// The run in a line: when, how, where.
    pub fn caption(&self) -> String {
        let m = &self.machine;
        format!(
            "Run {} ({}, {:.0} s) on Linux {}, {} x {}, {} MiB: `{}`",
            self.started,
            if self.quick { "quick" } else { "full" },
            self.took,
            m.kernel,
            m.cpus,
            m.cpu,
            m.memory_mib,
            self.command
        )
    }
}

impl Figure {
    /// The measured value, or why there is none.
    pub fn value(&self) -> Result<f64, Missing> {
        match &self.outcome {
            Outcome::Measured { value, .. } => Ok(*value),
            Outcome::Failed { error } => Err(Missing::Failed(self.name.clone(), error.clone())),
            Outcome::Passed { .. } => Err(Missing::Unreadable(
                self.name.clone(),
                "a pass, not a number".to_owned(),
            )),
        }
    }

    /// The raw numbers read as `T`.
    pub fn raw_as<T: DeserializeOwned>(&self) -> Result<T, Missing> {
        T::deserialize(&self.raw)
            .map_err(|err| Missing::Unreadable(self.name.clone(), err.to_string()))
    }
}

/// The raw numbers of a figure that is the median of rounds: `{"rounds": [...]}`, or
/// `{"rounds_us": [...]}` for CPU per connection.
#[derive(Clone, Debug, Deserialize)]
pub struct Rounds {
    /// One value per round.
    #[serde(alias = "rounds_us")]
    pub rounds: Vec<f64>,
}

/// One case of section 1 (`verdict.rs` in the bench binary).
#[derive(Clone, Debug, Deserialize)]
pub struct VerdictCase {
    /// `cgroup_skb` or `XDP`.
    pub hook: String,
    /// `IPv4` or `IPv6`.
    pub family: String,
    /// The verdict the packet gets (`pass`, `not_allowed`, ...).
    pub verdict: String,
    /// Ports allocated in the gate.
    pub allocated_ports: u32,
    /// Prefixes in the measured port's allowlist.
    pub prefixes_on_port: u32,
    /// Prefixes in every port's allowlist together.
    pub prefixes_in_trie: u32,
    /// The gate's deny-event rate; 0 is off.
    pub events_per_sec: u32,
    /// The kernel's ns per run, one per timed run (absent when the case failed).
    #[serde(default)]
    pub samples_ns_per_run: Vec<f64>,
}

impl VerdictCase {
    /// Whether the case is one of the grid of ports x prefixes: `cgroup_skb`, deny events
    /// on, and every other port listing one prefix (the bench's control case lists none,
    /// which its trie's size tells: `prefixes + ports - 1` otherwise).
    pub fn on_grid(&self) -> bool {
        self.hook == "cgroup_skb"
            && self.events_per_sec > 0
            && u64::from(self.prefixes_in_trie)
                == u64::from(self.prefixes_on_port) + u64::from(self.allocated_ports) - 1
    }
}

/// The raw numbers of an allocation-rate figure (`Timed` in the bench binary).
#[derive(Clone, Debug, Deserialize)]
pub struct Timed {
    /// Latency percentiles.
    pub latency: Latency,
    /// The run's settings.
    pub settings: Settings,
}

/// Latency percentiles, in milliseconds.
#[derive(Clone, Copy, Debug, Deserialize)]
pub struct Latency {
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
}

/// The settings of a timed run the charts read.
#[derive(Clone, Copy, Debug, Deserialize)]
pub struct Settings {
    /// Concurrent clients.
    pub clients: u32,
}
