//! Section 1's charts: the in-kernel verdict's ns per packet (`BPF_PROG_TEST_RUN` on
//! `cgroup_skb`) against the prefixes of the port's allowlist and against the allocated
//! ports, one line per verdict, one panel per address family.
//!
//! Only the grid of ports x prefixes is drawn (deny events on, every other port listing one
//! prefix); the bench's extra cases at one size (XDP, deny events off, the other ports
//! without allowlists) stay in the tables of BENCHMARKS.md.

use anyhow::Result;
use plotters::prelude::*;

use super::{
    draw::{self, Area, Dash, Key, Mark, count, empty, headroom, legend, line, svg},
    results::{Missing, Report, VerdictCase},
};

/// What the x axis is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Against {
    /// The prefixes in the measured port's allowlist; a line per count of ports.
    Prefixes,
    /// The allocated ports; a line per count of prefixes.
    Ports,
}

impl Against {
    /// The chart's file name.
    pub fn file(self) -> &'static str {
        match self {
            Self::Prefixes => "verdict-prefixes.svg",
            Self::Ports => "verdict-ports.svg",
        }
    }

    fn x(self, case: &VerdictCase) -> u32 {
        match self {
            Self::Prefixes => case.prefixes_on_port,
            Self::Ports => case.allocated_ports,
        }
    }

    /// The other dimension, which picks the line's dashes.
    fn other(self, case: &VerdictCase) -> u32 {
        match self {
            Self::Prefixes => case.allocated_ports,
            Self::Ports => case.prefixes_on_port,
        }
    }

    fn x_desc(self) -> &'static str {
        match self {
            Self::Prefixes => "prefixes in the port's allowlist (log scale)",
            Self::Ports => "allocated ports (log scale)",
        }
    }

    fn other_label(self, n: u32) -> String {
        let (one, many) = match self {
            Self::Prefixes => ("port", "ports"),
            Self::Ports => ("prefix", "prefixes"),
        };
        format!(
            "{} {}",
            count(f64::from(n)),
            if n == 1 { one } else { many }
        )
    }

    fn title(self) -> &'static str {
        match self {
            Self::Prefixes => {
                "In-kernel verdict against the allowlist's prefixes (cgroup_skb, BPF_PROG_TEST_RUN)"
            }
            Self::Ports => {
                "In-kernel verdict against the allocated ports (cgroup_skb, BPF_PROG_TEST_RUN)"
            }
        }
    }
}

/// One measured case: its median and the range of its timed runs.
struct Measured {
    case: VerdictCase,
    median: f64,
    min: f64,
    max: f64,
}

/// Section 1's grid cases that were measured, and a note for each that failed.
fn grid(report: &Report) -> (Vec<Measured>, Vec<String>) {
    let mut measured = Vec::new();
    let mut notes = Vec::new();
    for figure in report.section(1) {
        // The section's other figures (the spreads) are not cases.
        let Ok(case) = figure.raw_as::<VerdictCase>() else {
            continue;
        };
        if !case.on_grid() {
            continue;
        }
        match figure.value() {
            Ok(median) => {
                let min = case
                    .samples_ns_per_run
                    .iter()
                    .copied()
                    .fold(median, f64::min);
                let max = case
                    .samples_ns_per_run
                    .iter()
                    .copied()
                    .fold(median, f64::max);
                measured.push(Measured {
                    case,
                    median,
                    min,
                    max,
                });
            }
            Err(Missing::Failed(_, error)) => notes.push(format!(
                "{} {} {} at {} ports x {} prefixes: failed: {error}",
                case.hook,
                case.family,
                case.verdict,
                count(f64::from(case.allocated_ports)),
                count(f64::from(case.prefixes_on_port))
            )),
            Err(missing) => notes.push(missing.to_string()),
        }
    }
    (measured, notes)
}

/// The distinct values of `key` over `items`, in the order first met.
fn distinct<T, K: PartialEq>(items: &[T], key: impl Fn(&T) -> K) -> Vec<K> {
    let mut seen = Vec::new();
    for item in items {
        let k = key(item);
        if !seen.contains(&k) {
            seen.push(k);
        }
    }
    seen
}

/// Draws the chart of section 1 against `against` as SVG.
pub fn chart(report: &Report, against: Against) -> Result<String> {
    let (measured, notes) = grid(report);
    svg(
        (1200, 600),
        against.title(),
        &report.caption(),
        &notes,
        |area| {
            if measured.is_empty() {
                let why = if report.section(1).next().is_none() {
                    "The in-kernel verdict (section 1) is not in this run"
                } else {
                    "No case of the in-kernel verdict (section 1) was measured: see below"
                };
                return empty(area, why);
            }
            let families = distinct(&measured, |m| m.case.family.clone());
            let verdicts = distinct(&measured, |m| m.case.verdict.clone());
            let mut others = distinct(&measured, |m| against.other(&m.case));
            others.sort_unstable();
            let (width, _) = area.dim_in_pixel();
            let (plots, keys) = area.split_horizontally(width - 230);
            let top = headroom(measured.iter().map(|m| m.max).fold(0.0, f64::max));
            for (panel, family) in plots
                .split_evenly((1, families.len()))
                .iter()
                .zip(&families)
            {
                let mine: Vec<&Measured> = measured
                    .iter()
                    .filter(|m| &m.case.family == family)
                    .collect();
                self::panel(panel, family, &mine, against, &verdicts, &others, top)?;
            }
            let mut entries: Vec<Key> = verdicts
                .iter()
                .enumerate()
                .map(|(i, verdict)| {
                    // The bench's `pass` is an established flow's segment (a SYN that
                    // passes is `new connection`).
                    let label = match verdict.as_str() {
                        "pass" => "pass (established flow)",
                        other => other,
                    };
                    Key::new(label, draw::colour(i), Mark::Line(Dash::Solid))
                })
                .collect();
            entries.push(Key::new("", BLACK, Mark::Nothing));
            entries.extend(others.iter().enumerate().map(|(i, &n)| {
                Key::new(
                    against.other_label(n),
                    RGBColor(80, 80, 80),
                    Mark::Line(Dash::nth(i)),
                )
            }));
            let remarks = ["points: median of the timed", "runs; bars: their min-max"];
            legend(&keys, &entries, &remarks)
        },
    )
}

/// One family's panel: a line per verdict and value of the other dimension.
fn panel(
    area: &Area<'_>,
    family: &str,
    measured: &[&Measured],
    against: Against,
    verdicts: &[String],
    others: &[u32],
    top: f64,
) -> Result<()> {
    let mut xs: Vec<f64> = measured
        .iter()
        .map(|m| f64::from(against.x(&m.case)).log10())
        .collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    let (low, high) = (xs[0] - 0.4, xs[xs.len() - 1] + 0.4);
    let mut chart = ChartBuilder::on(area)
        .caption(family, (draw::FONT, 17))
        .margin(12)
        .x_label_area_size(50)
        .y_label_area_size(64)
        .build_cartesian_2d(low..high, 0.0..top)
        .map_err(draw::drawing)?;
    draw::mesh(&mut chart)
        .x_desc(against.x_desc())
        .y_desc("ns per packet")
        .x_labels(12)
        .x_label_formatter(&|x| draw::power_label(10.0, *x))
        .draw()
        .map_err(draw::drawing)?;
    for (v, verdict) in verdicts.iter().enumerate() {
        for (o, &other) in others.iter().enumerate() {
            let mut points: Vec<&&Measured> = measured
                .iter()
                .filter(|m| &m.case.verdict == verdict && against.other(&m.case) == other)
                .collect();
            points.sort_by_key(|m| against.x(&m.case));
            let at = |m: &Measured| f64::from(against.x(&m.case)).log10();
            let line_points: Vec<(f64, f64)> = points.iter().map(|m| (at(m), m.median)).collect();
            line(&mut chart, &line_points, draw::colour(v), Dash::nth(o))?;
            chart
                .draw_series(points.iter().filter(|m| m.max > m.min).map(|m| {
                    ErrorBar::new_vertical(at(m), m.min, m.median, m.max, draw::colour(v), 8)
                }))
                .map_err(draw::drawing)?;
        }
    }
    Ok(())
}
