//! Section 4's chart: durable allocations per second through the daemon's API against the
//! number of concurrent clients, with each run's p50 and p99 latency on a second axis; the
//! run with 99% of the range allocated as separate marks at its number of clients.

use anyhow::Result;
use plotters::prelude::*;

use super::{
    draw::{self, Area, Dash, Key, Mark, count, empty, headroom, legend, svg},
    results::{Report, Timed},
};

/// The chart's file name.
pub const FILE: &str = "allocation.svg";

/// The colours of the rate, the p99 and the p50.
const RATE: usize = 0;
const P99: usize = 3;
const P50: usize = 1;

/// Marks the run made with the range nearly full (the bench's name for it).
const NEARLY_FULL: &str = "99% allocated";

/// One timed run: clients, allocations/s, latency.
struct Run {
    clients: u32,
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// Section 4's API runs, as (the runs over an empty range, the nearly full one), and a
/// note for each that failed.
fn runs(report: &Report) -> (Vec<Run>, Vec<Run>, Vec<String>) {
    let (mut runs, mut full, mut notes) = (Vec::new(), Vec::new(), Vec::new());
    for figure in report.section(4) {
        if !figure.name.starts_with("daemon API") || !figure.name.ends_with(": allocations/s") {
            continue;
        }
        let read = figure
            .value()
            .and_then(|rate| Ok((rate, figure.raw_as::<Timed>()?)));
        match read {
            Ok((rate, timed)) => {
                let run = Run {
                    clients: timed.settings.clients,
                    rate,
                    p50_ms: timed.latency.p50_ms,
                    p99_ms: timed.latency.p99_ms,
                };
                if figure.name.contains(NEARLY_FULL) {
                    full.push(run);
                } else {
                    runs.push(run);
                }
            }
            Err(missing) => notes.push(format!("4. {missing}")),
        }
    }
    runs.sort_by_key(|run| run.clients);
    (runs, full, notes)
}

/// Draws the chart as SVG.
pub fn chart(report: &Report) -> Result<String> {
    let (runs, full, notes) = runs(report);
    let title = "Durable allocation through the daemon's API against concurrent clients";
    svg((1200, 600), title, &report.caption(), &notes, |area| {
        if runs.is_empty() && full.is_empty() {
            let why = if report.section(4).next().is_none() {
                "Allocation (section 4) is not in this run"
            } else {
                "No allocation run through the API was measured: see below"
            };
            return empty(area, why);
        }
        let (width, _) = area.dim_in_pixel();
        let (plot_area, legend_area) = area.split_horizontally(width - 260);
        plot(&plot_area, &runs, &full)?;
        let entries = [
            Key::new(
                "allocations/s (left axis)",
                draw::colour(RATE),
                Mark::Line(Dash::Solid),
            ),
            Key::new(
                "p99 latency (right axis)",
                draw::colour(P99),
                Mark::Line(Dash::Solid),
            ),
            Key::new(
                "p50 latency (right axis)",
                draw::colour(P50),
                Mark::Line(Dash::Dashed),
            ),
        ];
        let mut remarks = vec!["each allocation durable", "(redb, fsync per group commit)"];
        if !full.is_empty() {
            remarks.extend(["", "triangles: the same with 99%", "of the range allocated"]);
        }
        legend(&legend_area, &entries, &remarks)
    })
}

/// The rates on the left axis, the latencies on the right, against clients on a log scale.
fn plot(area: &Area<'_>, runs: &[Run], full: &[Run]) -> Result<()> {
    let (rate_colour, p99_colour, p50_colour) =
        (draw::colour(RATE), draw::colour(P99), draw::colour(P50));
    let all = || runs.iter().chain(full);
    let x = |run: &Run| f64::from(run.clients.max(1)).log2();
    let mut keys: Vec<f64> = all().map(x).collect();
    keys.sort_by(f64::total_cmp);
    keys.dedup();
    let (low, high) = (keys[0] - 0.5, keys[keys.len() - 1] + 0.5);
    let rate_top = headroom(all().map(|run| run.rate).fold(0.0, f64::max));
    // More room above the latencies than the rates: their lines stay apart.
    let latency_top = 1.4 * headroom(all().map(|run| run.p99_ms).fold(0.0, f64::max));
    let mut chart = ChartBuilder::on(area)
        .margin(12)
        .x_label_area_size(50)
        .y_label_area_size(72)
        .right_y_label_area_size(64)
        .build_cartesian_2d(low..high, 0.0..rate_top)
        .map_err(draw::drawing)?
        .set_secondary_coord(low..high, 0.0..latency_top);
    draw::mesh(&mut chart)
        .x_desc("concurrent clients (log scale)")
        .y_desc("allocations per second")
        .x_labels(16)
        .x_label_formatter(&|x| draw::power_label(2.0, *x))
        .draw()
        .map_err(draw::drawing)?;
    chart
        .configure_secondary_axes()
        .y_desc("latency, ms")
        .y_label_formatter(&|y| draw::tick(*y))
        .label_style((draw::FONT, 12))
        .axis_desc_style((draw::FONT, 13))
        .draw()
        .map_err(draw::drawing)?;
    let rates: Vec<(f64, f64)> = runs.iter().map(|run| (x(run), run.rate)).collect();
    let p99: Vec<(f64, f64)> = runs.iter().map(|run| (x(run), run.p99_ms)).collect();
    let p50: Vec<(f64, f64)> = runs.iter().map(|run| (x(run), run.p50_ms)).collect();
    draw::line(&mut chart, &rates, rate_colour, Dash::Solid)?;
    let style = (draw::FONT, 11).into_font().color(&BLACK);
    chart
        .draw_series(rates.iter().map(|&(at, rate)| {
            Text::new(
                count(rate),
                (at + 0.06, rate + rate_top * 0.015),
                style.clone(),
            )
        }))
        .map_err(draw::drawing)?;
    for (points, colour, dash) in [
        (p99, p99_colour, Dash::Solid),
        (p50, p50_colour, Dash::Dashed),
    ] {
        let stroke = colour.stroke_width(2);
        match dash {
            Dash::Solid => chart.draw_secondary_series(LineSeries::new(points.clone(), stroke)),
            _ => chart.draw_secondary_series(DashedLineSeries::new(points.clone(), 8, 5, stroke)),
        }
        .map_err(draw::drawing)?;
        chart
            .draw_secondary_series(points.iter().map(|&at| Circle::new(at, 3, colour.filled())))
            .map_err(draw::drawing)?;
    }
    chart
        .draw_series(
            full.iter()
                .map(|run| TriangleMarker::new((x(run), run.rate), 7, rate_colour.stroke_width(2))),
        )
        .map_err(draw::drawing)?;
    chart
        .draw_secondary_series(
            full.iter().map(|run| {
                TriangleMarker::new((x(run), run.p99_ms), 7, p99_colour.stroke_width(2))
            }),
        )
        .map_err(draw::drawing)?;
    Ok(())
}
