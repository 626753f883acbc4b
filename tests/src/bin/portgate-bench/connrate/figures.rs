//! Sections 2 and 3's figures from their rounds: the rates and CPU per connection of each
//! set-up (medians of rounds), their ratios within each round, and the checks that every
//! connection was accepted and seen by the gate.

use std::time::Duration;

use serde_json::json;

use super::{Plan, Round, Setup};
use crate::{
    bpf_stats::{self, RoundCost},
    report::{Figure, median},
};

/// A per-round number of a set-up: the wall-clock rate, or connections per CPU-second.
#[derive(Clone, Copy)]
enum Metric {
    Rate,
    PerCpuSecond,
}

impl Metric {
    fn of(self, round: &Round) -> Option<f64> {
        let load = &round.report.as_ref()?.load;
        match self {
            Self::Rate => Some(load.rate),
            Self::PerCpuSecond if load.process_cpu_s > 0.0 => {
                #[expect(clippy::cast_precision_loss, reason = "a count far below 2^52")]
                let made = load.measured_connections as f64;
                Some(made / load.process_cpu_s)
            }
            Self::PerCpuSecond => None,
        }
    }

    /// The values of `setup`, one per round that ran.
    fn values(self, all: &[Round], setup: Setup) -> Vec<f64> {
        all.iter()
            .filter(|r| r.setup == setup)
            .filter_map(|r| self.of(r))
            .collect()
    }

    /// `top / bottom` within each round where both ran: slow drift and the load of other
    /// work on the machine cancel out better than in a ratio of medians.
    fn ratios(self, all: &[Round], top: Setup, bottom: Setup) -> Vec<f64> {
        let rounds = all
            .iter()
            .map(|r| r.number)
            .max()
            .map_or(0, |last| last + 1);
        (0..rounds)
            .filter_map(|round| {
                let find = |setup: Setup| {
                    all.iter()
                        .find(|r| r.number == round && r.setup == setup)
                        .and_then(|r| self.of(r))
                };
                match (find(top), find(bottom)) {
                    (Some(top), Some(bottom)) if bottom > 0.0 => Some(top / bottom),
                    _ => None,
                }
            })
            .collect()
    }
}

/// A ratio's target: its words and its bound.
type RatioTarget = Option<(&'static str, f64)>;

/// The targets of the ratios: portgate within 3% of no gate, ahead of nftables.
const RATIOS: [(Setup, Setup, RatioTarget); 3] = [
    (
        Setup::Portgate,
        Setup::NoGate,
        Some((">= 0.97 (ours: within 3% of no gate)", 0.97)),
    ),
    (Setup::Nftables, Setup::NoGate, None),
    (
        Setup::Portgate,
        Setup::Nftables,
        Some(("> 1 (ours: ahead of nftables)", 1.0)),
    ),
];

fn meets(target: RatioTarget, value: f64) -> bool {
    match target {
        Some((text, bound)) if text.starts_with('>') && !text.starts_with(">=") => value > bound,
        Some((_, bound)) => value >= bound,
        None => true,
    }
}

#[expect(clippy::too_many_lines, reason = "one figure after another")]
pub(super) fn figures(
    section: &str,
    all: &[Round],
    configuration: &serde_json::Value,
    rounds_raw: &serde_json::Value,
    plan: &Plan,
    gate_setup: &Result<Duration, String>,
    stats_error: Option<&str>,
) -> Vec<Figure> {
    let first_error = |setup: Setup| -> String {
        all.iter()
            .filter(|r| r.setup == setup)
            .find_map(|r| r.error.clone())
            .unwrap_or_else(|| "no round ran".to_owned())
    };
    let mut figures = Vec::new();
    for setup in Setup::ALL {
        let values = Metric::Rate.values(all, setup);
        let name = format!("Connections/s, {} (median of rounds)", setup.label());
        figures.push(match median(&values) {
            Some(value) => {
                let mut figure = Figure::measured(section, name, value, "conn/s");
                if setup == Setup::Portgate {
                    figure = figure.target(">= 10,000 conn/s (spec)", |v| v >= 10_000.0);
                }
                let mut raw = json!({ "rounds": values });
                if setup == Setup::NoGate {
                    raw["configuration"] = configuration.clone();
                }
                figure.raw(raw)
            }
            None => Figure::failed(section, name, first_error(setup)),
        });
    }
    let ratio_figure = |metric: Metric, top: Setup, bottom: Setup, target, name: String| {
        let values = metric.ratios(all, top, bottom);
        let Some(value) = median(&values) else {
            let why = [top, bottom]
                .into_iter()
                .find(|setup| metric.values(all, *setup).is_empty())
                .map_or_else(|| "no round with both".to_owned(), first_error);
            let mut figure = Figure::failed(section, name, why);
            if let Some((text, _)) = target {
                figure = figure.target(text, |_| false);
            }
            return figure;
        };
        let mut figure = Figure::measured(section, name, value, "x");
        if let Some((text, _)) = target {
            figure = figure.target(text, |v| meets(target, v));
        }
        figure.raw(json!({
            "per_round": values,
            "how": "median over rounds of the ratio within each round",
        }))
    };
    for (top, bottom, target) in RATIOS {
        let name = format!("Rate ratio {} / {}", top.label(), bottom.label());
        figures.push(ratio_figure(Metric::Rate, top, bottom, target, name));
    }
    // The machine is shared (other work takes CPU at random moments), so the same figures
    // per CPU-second of the benchmark process: what each set-up costs, whatever the load.
    for setup in Setup::ALL {
        let values = Metric::PerCpuSecond.values(all, setup);
        let name = format!(
            "CPU per connection, {} (client + server + kernel, median)",
            setup.label()
        );
        figures.push(match median(&values) {
            Some(value) => Figure::measured(section, name, 1e6 / value, "us").raw(json!({
                "rounds_us": values.iter().map(|v| 1e6 / v).collect::<Vec<_>>(),
                "how": "CPU time of the benchmark process (all threads, user + system; the kernel's loopback work runs in them) over the measured time, per connection made",
            })),
            None => Figure::failed(section, name, first_error(setup)),
        });
    }
    for (top, bottom, target) in [RATIOS[0], RATIOS[2]] {
        let name = format!(
            "Connections per CPU-second ratio {} / {}",
            top.label(),
            bottom.label()
        );
        figures.push(ratio_figure(
            Metric::PerCpuSecond,
            top,
            bottom,
            target,
            name,
        ));
    }
    figures.extend(kernel_figures(section, all, stats_error));

    // Every connection accepted everywhere, and each gate saw them.
    let failures: u64 = all
        .iter()
        .filter_map(|r| r.report.as_ref())
        .map(|r| r.load.failures)
        .sum();
    let mut problems: Vec<String> = Vec::new();
    for r in all {
        let Some(report) = &r.report else { continue };
        let load = &report.load;
        if load.accepted != load.connections {
            problems.push(format!(
                "round {} {}: the server accepted {} of {} connections",
                r.number + 1,
                r.setup.label(),
                load.accepted,
                load.connections
            ));
        }
        if r.setup == Setup::Portgate
            && (r.gate_accepted != Some(load.connections + load.failures)
                || r.gate_dropped != Some(0))
        {
            problems.push(format!(
                "round {} portgate: the gate accepted {:?} and dropped {:?} for {} connects",
                r.number + 1,
                r.gate_accepted,
                r.gate_dropped,
                load.connections + load.failures
            ));
        }
        if let Some(hits) = &report.nft_hits {
            let dropped =
                hits.not_allowed + hits.not_allowed_v6 + hits.conn_limit + hits.unallocated;
            if dropped != 0 || hits.passed < load.connections {
                problems.push(format!(
                    "round {} nftables: the rules dropped {dropped} packets and passed {} for {} connections",
                    r.number + 1,
                    hits.passed,
                    load.connections
                ));
            }
        }
    }
    let name = "Failed connects, all rounds and set-ups";
    #[expect(clippy::cast_precision_loss, reason = "a small count")]
    let mut figure = Figure::measured(section, name, failures as f64, "connects")
        .target("0, and every gate passed every connection", |v| {
            v == 0.0 && problems.is_empty()
        })
        .raw(json!({ "problems": problems, "rounds": rounds_raw }));
    if all.iter().all(|r| r.report.is_none()) {
        figure = Figure::failed(section, name, "no round ran");
    }
    figures.push(figure);

    // The cost of writing the policy, for the section with a large one.
    if plan.ports.len() > 1 {
        let name = "portgate: writing the policies (set_policy, all ports)";
        figures.push(match gate_setup {
            Ok(took) => Figure::measured(section, name, took.as_secs_f64(), "s"),
            Err(err) => Figure::failed(section, name, err),
        });
        let loads: Vec<f64> = all
            .iter()
            .filter_map(|r| r.report.as_ref()?.nft_load_s)
            .collect();
        let name = "nftables: loading the ruleset (nft -f, median of rounds)";
        figures.push(match median(&loads) {
            Some(value) => {
                Figure::measured(section, name, value, "s").raw(json!({ "rounds": loads }))
            }
            None => Figure::failed(section, name, first_error(Setup::Nftables)),
        });
    }
    figures
}

/// The gate's own kernel time per connection (see [`crate::bpf_stats`]), beside no gate's
/// CPU per connection of the same round.
fn kernel_figures(section: &str, all: &[Round], stats_error: Option<&str>) -> Vec<Figure> {
    let costs: Vec<RoundCost<'_>> = all
        .iter()
        .filter(|r| r.setup == Setup::Portgate)
        .filter_map(|r| {
            let load = &r.report.as_ref()?.load;
            let no_gate_cpu_ns = all
                .iter()
                .find(|other| other.number == r.number && other.setup == Setup::NoGate)
                .and_then(|other| other.report.as_ref())
                .map(|other| 1e3 * other.load.process_cpu_us_per_connection);
            Some(RoundCost {
                connects: load.connections + load.failures,
                programs: r.kernel.as_ref()?,
                no_gate_cpu_ns,
            })
        })
        .collect();
    bpf_stats::figures(section, &costs, stats_error)
}
