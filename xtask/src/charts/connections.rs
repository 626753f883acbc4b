//! Sections 2 and 3's chart: connections per second and CPU per connection of no gate,
//! portgate and nftables (median of rounds, the rounds' spread and each round), with the
//! share of portgate's CPU that its own programs take in the kernel (from the kernel's
//! run-time statistics; nftables' rules have no such counter, so only their whole CPU per
//! connection shows).

use anyhow::Result;
use plotters::{
    prelude::*,
    style::text_anchor::{HPos, Pos, VPos},
};

use super::{
    draw::{self, Area, Key, Mark, empty, headroom, legend, number, svg},
    results::{Missing, Report, Rounds},
};

/// The chart's file name.
pub const FILE: &str = "connections.svg";

/// The set-ups, as the bench binary names them.
const SETUPS: [&str; 3] = ["no gate", "portgate", "nftables"];

/// The set-up whose CPU bar carries the gate's kernel time.
const PORTGATE: usize = 1;

/// The sections drawn, each a group of bars.
const SECTIONS: [u8; 2] = [2, 3];

/// A median of rounds and the rounds.
struct Bar {
    median: f64,
    rounds: Vec<f64>,
}

/// One section's bars.
struct Group {
    label: String,
    rate: Vec<Option<Bar>>,
    cpu: Vec<Option<Bar>>,
    /// The gate's kernel time per connection, us.
    kernel: Option<Bar>,
}

/// Reads section `number`'s bars; what is missing goes to `notes`.
fn group(report: &Report, number: u8, title: &str, notes: &mut Vec<String>) -> Group {
    let label = format!(
        "{number}. {}",
        title
            .strip_prefix("Connection setup rate ")
            .unwrap_or(title)
    );
    let mut keep = |got: Result<Bar, Missing>| match got {
        Ok(bar) => Some(bar),
        Err(missing) => {
            notes.push(format!("{number}. {missing}"));
            None
        }
    };
    let rate = SETUPS
        .iter()
        .map(|setup| {
            keep(bar(
                report,
                number,
                &format!("Connections/s, {setup} (median of rounds)"),
                1.0,
            ))
        })
        .collect();
    let cpu = SETUPS
        .iter()
        .map(|setup| {
            let name = format!("CPU per connection, {setup} (client + server + kernel, median)");
            keep(bar(report, number, &name, 1.0))
        })
        .collect();
    // In ns: drawn in us, beside the CPU per connection.
    let name = "Gate's kernel time per connection, all its programs (median)";
    let kernel = keep(bar(report, number, name, 1e-3));
    Group {
        label,
        rate,
        cpu,
        kernel,
    }
}

/// The figure `name` of section `number` as a bar, its values times `scale`.
fn bar(report: &Report, number: u8, name: &str, scale: f64) -> Result<Bar, Missing> {
    let (median, raw) = report.measured::<Rounds>(number, name)?;
    Ok(Bar {
        median: median * scale,
        rounds: raw.rounds.iter().map(|value| value * scale).collect(),
    })
}

/// Draws the chart as SVG.
pub fn chart(report: &Report) -> Result<String> {
    let mut notes = Vec::new();
    let mut groups = Vec::new();
    for number in SECTIONS {
        match report.section_title(number) {
            Some(title) => groups.push(group(report, number, title, &mut notes)),
            None => notes.push(format!("Section {number} is not in this run")),
        }
    }
    let title = "Connection set-up over loopback: no gate, portgate, nftables";
    svg((1200, 600), title, &report.caption(), &notes, |area| {
        if groups.is_empty() {
            return empty(
                area,
                "The connection set-up rate (sections 2 and 3) is not in this run",
            );
        }
        let (width, _) = area.dim_in_pixel();
        let (plots, keys) = area.split_horizontally(width - 230);
        let panels = plots.split_evenly((1, 2));
        bars(
            &panels[0],
            "Connections per second (wall clock)",
            "connections/s",
            &groups,
            |group| &group.rate,
            false,
        )?;
        bars(
            &panels[1],
            "CPU per connection (client + server + kernel)",
            "us per connection",
            &groups,
            |group| &group.cpu,
            true,
        )?;
        let mut entries: Vec<Key> = SETUPS
            .iter()
            .enumerate()
            .map(|(i, setup)| Key::new(*setup, draw::colour(i), Mark::Box))
            .collect();
        entries.push(Key::new(
            "the gate's programs",
            RGBColor(40, 40, 40),
            Mark::Box,
        ));
        entries.push(Key::new("in the kernel (bpf_stats)", BLACK, Mark::Nothing));
        let remarks = [
            "bars: median of rounds",
            "whiskers: min-max of rounds",
            "dots: each round",
        ];
        legend(&keys, &entries, &remarks)
    })
}

/// The x position of set-up `setup`'s bar in group `group`, and the bars' half width.
fn centre(group: usize, setup: usize) -> f64 {
    #[expect(clippy::cast_precision_loss, reason = "small indices")]
    let (group, setup) = (group as f64, setup as f64);
    group + 0.2 + 0.3 * setup
}
const HALF: f64 = 0.12;

/// One panel of bars: a group per section, a bar per set-up; `kernel` overlays the gate's
/// kernel time on portgate's bar.
fn bars(
    area: &Area<'_>,
    caption: &str,
    y_desc: &str,
    groups: &[Group],
    pick: fn(&Group) -> &[Option<Bar>],
    kernel: bool,
) -> Result<()> {
    let values: Vec<&[Option<Bar>]> = groups.iter().map(pick).collect();
    let top = headroom(
        values
            .iter()
            .copied()
            .flatten()
            .flatten()
            .flat_map(|bar| bar.rounds.iter().copied().chain([bar.median]))
            .fold(0.0, f64::max),
    );
    #[expect(clippy::cast_precision_loss, reason = "a few groups")]
    let width = groups.len() as f64;
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (draw::FONT, 16))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(72)
        .build_cartesian_2d(0.0..width, 0.0..top)
        .map_err(draw::drawing)?;
    draw::mesh(&mut chart)
        .disable_x_mesh()
        .y_desc(y_desc)
        // Labels at every half: each group's at its middle bar, none elsewhere.
        .x_labels(2 * groups.len() + 1)
        .x_label_formatter(&|x| {
            if (x.fract() - 0.5).abs() > 1e-6 {
                return String::new();
            }
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "a group index"
            )]
            let g = x.floor().max(0.0) as usize;
            groups
                .get(g)
                .map(|group| group.label.clone())
                .unwrap_or_default()
        })
        .draw()
        .map_err(draw::drawing)?;
    let above = Pos::new(HPos::Center, VPos::Bottom);
    for (g, group) in values.iter().enumerate() {
        for (s, bar) in group.iter().enumerate() {
            let c = centre(g, s);
            let Some(bar) = bar else {
                let style = (draw::FONT, 12).into_font().color(&BLACK).pos(above);
                chart
                    .draw_series([Text::new("n/a", (c, top * 0.02), style)])
                    .map_err(draw::drawing)?;
                continue;
            };
            let colour = draw::colour(s);
            let (low, high) = bar
                .rounds
                .iter()
                .fold((bar.median, bar.median), |(l, h), &r| (l.min(r), h.max(r)));
            chart
                .draw_series([Rectangle::new(
                    [(c - HALF, 0.0), (c + HALF, bar.median)],
                    colour.mix(0.8).filled(),
                )])
                .map_err(draw::drawing)?;
            if kernel
                && s == PORTGATE
                && let Some(k) = &groups[g].kernel
            {
                overlay(&mut chart, c, bar.median, k.median)?;
            }
            chart
                .draw_series([ErrorBar::new_vertical(
                    c,
                    low,
                    bar.median,
                    high,
                    BLACK.stroke_width(1),
                    10,
                )])
                .map_err(draw::drawing)?;
            chart
                .draw_series(
                    bar.rounds
                        .iter()
                        .map(|&r| Circle::new((c + HALF * 0.6, r), 2, BLACK.filled())),
                )
                .map_err(draw::drawing)?;
            let style = (draw::FONT, 11).into_font().color(&BLACK).pos(above);
            chart
                .draw_series([Text::new(
                    number(bar.median),
                    (c, high + top * 0.015),
                    style,
                )])
                .map_err(draw::drawing)?;
        }
    }
    Ok(())
}

/// The top `kernel` us of portgate's CPU bar (of height `cpu`), dark, with its value.
fn overlay(chart: &mut draw::Chart<'_, '_>, c: f64, cpu: f64, kernel: f64) -> Result<()> {
    let bottom = (cpu - kernel).max(0.0);
    chart
        .draw_series([Rectangle::new(
            [(c - HALF, bottom), (c + HALF, cpu)],
            RGBColor(40, 40, 40).filled(),
        )])
        .map_err(draw::drawing)?;
    let style = (draw::FONT, 11)
        .into_font()
        .color(&WHITE)
        .pos(Pos::new(HPos::Center, VPos::Center));
    chart
        .draw_series([Text::new(
            number(kernel),
            (c, f64::midpoint(bottom, cpu)),
            style,
        )])
        .map_err(draw::drawing)?;
    Ok(())
}
