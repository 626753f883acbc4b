//! The gate's own kernel time per connection in sections 2 and 3, from the kernel's BPF
//! run-time statistics.
//!
//! The rounds' wall-clock rates swing by ±15% on a shared machine, more than the 3% they
//! are read against. While `kernel.bpf_stats_enabled` is 1, the kernel counts for every
//! program how often it ran and for how long (`run_cnt` and `run_time_ns` of
//! `bpf_prog_info`). Read before and after each portgate round, they give the time the
//! gate's programs took per connection, which other work on the machine hardly moves.
//! The statistics cost each program run two clock reads, so they are on for the
//! connection rounds only.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
};

use anyhow::{Context as _, Result};
use portgate::gate::Gate;
use serde::Serialize;
use serde_json::json;

use crate::report::{Figure, Spread};

/// The sysctl that turns the run-time statistics on (`kernel.bpf_stats_enabled`).
const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// How the gate's program names begin. The kernel keeps the first 15 bytes of a name
/// (`portgate_sockops` is listed as `portgate_sockop`), so this is matched, not the names.
pub const PROGRAM_PREFIX: &str = "portgate_";

/// Rounds below which a min–max is too few to state a spread by.
pub const MIN_ROUNDS: usize = 5;

/// Keeps `kernel.bpf_stats_enabled` at 1 while it lives, and puts the previous value
/// back when dropped, on an error or a panic too.
pub struct StatsEnabled {
    previous: String,
}

impl StatsEnabled {
    /// Turns the statistics on.
    pub fn new() -> Result<Self> {
        let previous = fs::read_to_string(STATS_SYSCTL)
            .with_context(|| format!("reading {STATS_SYSCTL}"))?
            .trim()
            .to_owned();
        fs::write(STATS_SYSCTL, "1").with_context(|| format!("writing 1 to {STATS_SYSCTL}"))?;
        Ok(Self { previous })
    }
}

impl Drop for StatsEnabled {
    fn drop(&mut self) {
        if let Err(err) = fs::write(STATS_SYSCTL, &self.previous) {
            eprintln!(
                "portgate-bench: could not put {STATS_SYSCTL} back to {}: {err}; write it by hand",
                self.previous
            );
        }
    }
}

/// How often a program ran and for how long, as the kernel counts it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ProgramRuns {
    /// Runs (`run_cnt`).
    pub runs: u64,
    /// Time in the program, ns (`run_time_ns`).
    pub ns: u64,
}

/// The programs one gate loaded, by kernel id, under their names in the object.
///
/// By id, not by name: within the benchmark one gate is loaded at a time (each section
/// drops its gate before the next), but programs are machine-wide, and the kernel tests,
/// a daemon or another benchmark on the same machine load programs of the same names.
#[derive(Clone, Debug, Default)]
pub struct GatePrograms(BTreeMap<u32, String>);

impl GatePrograms {
    /// The loaded programs of `gate` whose names begin with [`PROGRAM_PREFIX`].
    pub fn of(gate: &mut Gate) -> Self {
        Self(
            gate.ebpf_mut()
                .programs()
                .filter(|(name, _)| name.starts_with(PROGRAM_PREFIX))
                // A program of the object that was never loaded has no info.
                .filter_map(|(name, program)| Some((program.info().ok()?.id(), name.to_owned())))
                .collect(),
        )
    }

    /// Each program's counters now, by name.
    pub fn read(&self) -> BTreeMap<String, ProgramRuns> {
        let mut read = BTreeMap::new();
        // Other processes load and free programs meanwhile: one freed between the listing
        // and the look-up is an error of its own, and none of ours.
        for info in aya::programs::loaded_programs().flatten() {
            let Some(name) = self.0.get(&info.id()) else {
                continue;
            };
            // The kernel's (truncated) name must fit ours, in case the id was reused.
            let kernel_name = info.name();
            if kernel_name.starts_with(PROGRAM_PREFIX.as_bytes())
                && name.as_bytes().starts_with(kernel_name)
            {
                let ns = u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX);
                let runs = info.run_count();
                read.insert(name.clone(), ProgramRuns { runs, ns });
            }
        }
        read
    }
}

/// What each program did between `before` and `after`.
pub fn since(
    before: &BTreeMap<String, ProgramRuns>,
    after: &BTreeMap<String, ProgramRuns>,
) -> BTreeMap<String, ProgramRuns> {
    after
        .iter()
        .map(|(name, now)| {
            let then = before.get(name).copied().unwrap_or_default();
            let runs = now.runs.saturating_sub(then.runs);
            let ns = now.ns.saturating_sub(then.ns);
            (name.clone(), ProgramRuns { runs, ns })
        })
        .collect()
}

/// One round's programs in words, for the progress lines.
pub fn summary(programs: &BTreeMap<String, ProgramRuns>, connects: u64) -> String {
    let per_conn = |value: u64| ratio(value, connects);
    let total: u64 = programs.values().map(|p| p.ns).sum();
    let each: Vec<String> = programs
        .iter()
        .filter(|(_, p)| p.runs > 0)
        .map(|(name, p)| {
            format!(
                "{name} {:.2} x {:.0} ns",
                per_conn(p.runs),
                ratio(p.ns, p.runs)
            )
        })
        .collect();
    format!(
        "kernel {:.0} ns/conn ({})",
        per_conn(total),
        each.join(", ")
    )
}

/// `top / bottom` of two counts.
#[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
fn ratio(top: u64, bottom: u64) -> f64 {
    top as f64 / bottom as f64
}

/// A portgate round as the kernel counted it.
pub struct RoundCost<'a> {
    /// Connects in the round: the counters cover all of it, warm-up and failures included.
    pub connects: u64,
    /// The gate's programs over the round.
    pub programs: &'a BTreeMap<String, ProgramRuns>,
    /// No gate's CPU time per connection in the same round, ns.
    pub no_gate_cpu_ns: Option<f64>,
}

/// What the total is and how it is measured, below the table.
const NOTE: &str = "time the kernel spent in the gate's programs (each loaded program of \
    the section's gate whose name begins with `portgate_`, by program id) per connect, from \
    `run_time_ns` and `run_cnt` of `bpf_prog_info` read before and after each portgate \
    round, with `kernel.bpf_stats_enabled` on for the connection rounds only; other work on \
    the machine hardly moves it, unlike the wall-clock rate. Each run's time includes a \
    clock read and the cache misses of a real connection, so it is above section 1's \
    warm-loop ns per packet. The ratio divides it by no gate's CPU per connection of the \
    same round";

/// The figures of a section's portgate rounds: per program its runs per connection, ns
/// per run and ns per connection; the total ns per connection; and the total over no
/// gate's CPU per connection, with its spread read against the gap it reports.
/// `unavailable` says why there are no counters, when there are none.
pub fn figures(section: &str, rounds: &[RoundCost<'_>], unavailable: Option<&str>) -> Vec<Figure> {
    let rounds: Vec<&RoundCost<'_>> = rounds.iter().filter(|r| r.connects > 0).collect();
    let names: BTreeSet<&String> = rounds
        .iter()
        .flat_map(|r| r.programs.iter())
        .filter(|(_, p)| p.runs > 0)
        .map(|(name, _)| name)
        .collect();
    let total_name = "Gate's kernel time per connection, all its programs (median)";
    if names.is_empty() {
        let why = unavailable.unwrap_or(if rounds.is_empty() {
            "no portgate round ran"
        } else {
            "the kernel counted no run of the gate's programs"
        });
        return vec![Figure::failed(section, total_name, why).note(NOTE)];
    }
    let mut figures = Vec::new();
    for name in names {
        let program = |r: &RoundCost<'_>| r.programs.get(name).copied().unwrap_or_default();
        let runs: Vec<f64> = rounds
            .iter()
            .map(|r| ratio(program(r).runs, r.connects))
            .collect();
        let per_run: Vec<f64> = rounds
            .iter()
            .map(|r| program(r))
            .filter(|p| p.runs > 0)
            .map(|p| ratio(p.ns, p.runs))
            .collect();
        let per_conn: Vec<f64> = rounds
            .iter()
            .map(|r| ratio(program(r).ns, r.connects))
            .collect();
        for (what, values, unit) in [
            ("runs per connection", runs, "runs"),
            ("ns per run", per_run, "ns"),
            ("ns per connection", per_conn, "ns"),
        ] {
            figures.push(median_figure(
                section,
                format!("Kernel: {name}, {what} (median)"),
                &values,
                unit,
            ));
        }
    }
    let totals: Vec<f64> = rounds
        .iter()
        .map(|r| ratio(r.programs.values().map(|p| p.ns).sum(), r.connects))
        .collect();
    figures.push(median_figure(section, total_name.to_owned(), &totals, "ns").note(NOTE));
    figures.extend(ratio_figures(section, &rounds, &totals));
    figures
}

/// The total over no gate's CPU per connection, in percent, and whether its spread is
/// below it (the gap between portgate and no gate that it reports).
fn ratio_figures(section: &str, rounds: &[&RoundCost<'_>], totals: &[f64]) -> Vec<Figure> {
    let percents: Vec<f64> = rounds
        .iter()
        .zip(totals)
        .filter_map(|(r, total)| Some(100.0 * total / r.no_gate_cpu_ns.filter(|ns| *ns > 0.0)?))
        .collect();
    let name = "Gate's kernel time / no gate's CPU per connection (median of rounds)";
    let Some((median, spread)) = Spread::of(&percents) else {
        return vec![Figure::failed(
            section,
            name,
            "no round with both a portgate and a no-gate measurement",
        )];
    };
    let ratio = Figure::measured(section, name, median, "%")
        .spread(spread)
        .target("< 3% (ours: within the 3% budget)", |v| v < 3.0)
        .raw(json!({ "rounds_percent": percents }));
    let width = spread.max - spread.min;
    let enough = spread.rounds >= MIN_ROUNDS;
    let target = if enough {
        "< the ratio (the gap it reports is resolved)".to_owned()
    } else {
        format!(
            "< the ratio, over >= {MIN_ROUNDS} rounds: {} are too few to state a spread (--quick)",
            spread.rounds
        )
    };
    let check = Figure::measured(
        section,
        "Spread of that ratio (max - min of rounds)",
        width,
        "points",
    )
    .target(&target, |v| enough && v < median)
    .raw(json!({ "min_percent": spread.min, "max_percent": spread.max, "median_percent": median }));
    vec![ratio, check]
}

/// The median of `values` with their spread.
fn median_figure(section: &str, name: String, values: &[f64], unit: &str) -> Figure {
    match Spread::of(values) {
        Some((median, spread)) => Figure::measured(section, name, median, unit)
            .spread(spread)
            .raw(json!({ "rounds": values })),
        None => Figure::failed(section, name, "no round ran the program"),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::{ProgramRuns, RoundCost, figures, since};
    use crate::report::Outcome;

    fn runs(pairs: &[(&str, u64, u64)]) -> BTreeMap<String, ProgramRuns> {
        pairs
            .iter()
            .map(|(name, runs, ns)| {
                (
                    (*name).to_owned(),
                    ProgramRuns {
                        runs: *runs,
                        ns: *ns,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn since_subtracts_per_program() {
        let before = runs(&[("portgate_skb", 10, 1_000)]);
        let after = runs(&[("portgate_skb", 30, 3_000), ("portgate_bind4", 1, 50)]);
        assert_eq!(
            since(&before, &after),
            runs(&[("portgate_skb", 20, 2_000), ("portgate_bind4", 1, 50)])
        );
    }

    #[test]
    fn per_connection_figures() {
        let programs = runs(&[("portgate_skb", 200, 20_000), ("portgate_bind6", 0, 0)]);
        let round = RoundCost {
            connects: 100,
            programs: &programs,
            no_gate_cpu_ns: Some(10_000.0),
        };
        let got = figures("s", &[round], None);
        let values: Vec<(String, f64)> = got
            .iter()
            .filter_map(|f| match f.outcome {
                Outcome::Measured { value, .. } => Some((f.name.clone(), value)),
                _ => None,
            })
            .collect();
        let value = |start: &str| {
            values
                .iter()
                .find(|(name, _)| name.starts_with(start))
                .map(|(_, v)| *v)
        };
        assert_eq!(value("Kernel: portgate_skb, runs"), Some(2.0));
        assert_eq!(value("Kernel: portgate_skb, ns per run"), Some(100.0));
        assert_eq!(value("Kernel: portgate_skb, ns per conn"), Some(200.0));
        assert_eq!(
            value("Kernel: portgate_bind6"),
            None,
            "idle programs are left out"
        );
        assert_eq!(value("Gate's kernel time per"), Some(200.0));
        assert_eq!(value("Gate's kernel time /"), Some(2.0));
    }
}
