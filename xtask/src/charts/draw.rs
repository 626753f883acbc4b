//! What every chart shares: the SVG frame (title, the run's caption, notes of what is
//! missing), colours, line styles, a legend, the text of numbers.
//!
//! Text is written as SVG `<text>` by plotters' SVG backend, so no font is read: plotters
//! only estimates text widths for its layout, which is why the margins here are generous.

use anyhow::Result;
use plotters::{
    chart::MeshStyle,
    coord::{Shift, types::RangedCoordf64},
    prelude::*,
    style::text_anchor::{HPos, Pos, VPos},
};

/// A drawing area of an SVG chart, in pixels.
pub type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// The font family of every text.
pub const FONT: &str = "sans-serif";

/// Colours of series, in order (a colour-blind-safe set, as in common plotting tools).
const COLOURS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// The colour of series `index`.
pub fn colour(index: usize) -> RGBColor {
    COLOURS[index % COLOURS.len()]
}

/// Pixels per character of text of `size` px, on the wide side, for fitting text.
fn char_width(size: u32) -> f64 {
    f64::from(size) * 0.56
}

/// `text` cut to fit `width` px at `size` px.
pub fn fit(text: &str, width: u32, size: u32) -> String {
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a small count of characters"
    )]
    let room = (f64::from(width) / char_width(size)) as usize;
    if text.chars().count() <= room {
        return text.to_owned();
    }
    let cut: String = text.chars().take(room.saturating_sub(1)).collect();
    format!("{cut}…")
}

/// Draws a chart of `size` px as SVG: `title` on top, `notes` (what is missing or failed)
/// and `caption` (the run) at the bottom, and `body` in between.
pub fn svg(
    size: (u32, u32),
    title: &str,
    caption: &str,
    notes: &[String],
    body: impl FnOnce(&Area<'_>) -> Result<()>,
) -> Result<String> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, size).into_drawing_area();
        root.fill(&WHITE).map_err(drawing)?;
        let (top, rest) = root.split_vertically(44);
        text(
            &top,
            title,
            (size.0 / 2, 24),
            20,
            Pos::new(HPos::Center, VPos::Center),
        )?;
        let bottom_height = 30 + 18 * u32::try_from(notes.len()).unwrap_or(u32::MAX / 32);
        let (middle, bottom) = rest.split_vertically(size.1 - 44 - bottom_height);
        body(&middle)?;
        let left = Pos::new(HPos::Left, VPos::Center);
        let mut y: i32 = 10;
        for note in notes {
            text(
                &bottom,
                &fit(note, size.0 - 30, 13),
                (15, y.unsigned_abs()),
                13,
                left,
            )?;
            y += 18;
        }
        let grey = (FONT, 12)
            .into_font()
            .color(&RGBColor(90, 90, 90))
            .pos(left);
        bottom
            .draw(&Text::new(fit(caption, size.0 - 30, 12), (15, y + 6), grey))
            .map_err(drawing)?;
        root.present().map_err(drawing)?;
    }
    Ok(out)
}

/// Draws `message` in the middle of `area`: a panel with nothing to show says why.
pub fn empty(area: &Area<'_>, message: &str) -> Result<()> {
    let (width, height) = area.dim_in_pixel();
    area.draw(&Rectangle::new(
        [(5, 5), (width.cast_signed() - 5, height.cast_signed() - 5)],
        RGBColor(200, 200, 200).stroke_width(1),
    ))
    .map_err(drawing)?;
    text(
        area,
        &fit(message, width.saturating_sub(20), 15),
        (width / 2, height / 2),
        15,
        Pos::new(HPos::Center, VPos::Center),
    )
}

/// Draws `content` at `at` (pixels) in black.
pub fn text(area: &Area<'_>, content: &str, at: (u32, u32), size: u32, pos: Pos) -> Result<()> {
    let style = (FONT, size).into_font().color(&BLACK).pos(pos);
    let at = (
        i32::try_from(at.0).unwrap_or(i32::MAX),
        i32::try_from(at.1).unwrap_or(i32::MAX),
    );
    area.draw(&Text::new(content.to_owned(), at, style))
        .map_err(drawing)
}

/// How a line is drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dash {
    /// Unbroken.
    Solid,
    /// Dashes.
    Dashed,
    /// Dots.
    Dotted,
}

impl Dash {
    /// The style of the `index`th value of a second dimension.
    pub fn nth(index: usize) -> Self {
        [Self::Solid, Self::Dashed, Self::Dotted][index % 3]
    }
}

/// What a legend entry shows before its words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mark {
    /// A line of this style.
    Line(Dash),
    /// A filled box (a bar).
    Box,
    /// Nothing: the entry is a remark.
    Nothing,
}

/// One entry of a legend.
#[derive(Clone, Debug)]
pub struct Key {
    /// The words.
    pub label: String,
    /// The colour.
    pub colour: RGBColor,
    /// What is drawn before the words.
    pub mark: Mark,
}

impl Key {
    /// An entry.
    pub fn new(label: impl Into<String>, colour: RGBColor, mark: Mark) -> Self {
        Self {
            label: label.into(),
            colour,
            mark,
        }
    }
}

/// Draws `keys` top-down in `area`, then, after a blank line, `remarks` (how to read the
/// chart), a line each.
pub fn legend(area: &Area<'_>, keys: &[Key], remarks: &[&str]) -> Result<()> {
    let (width, _) = area.dim_in_pixel();
    let mut y: i32 = 40;
    for key in keys {
        let style = key.colour.stroke_width(3);
        match key.mark {
            Mark::Nothing => {}
            Mark::Box => area
                .draw(&Rectangle::new(
                    [(10, y - 6), (34, y + 6)],
                    key.colour.filled(),
                ))
                .map_err(drawing)?,
            Mark::Line(Dash::Solid) => area
                .draw(&PathElement::new(vec![(10, y), (34, y)], style))
                .map_err(drawing)?,
            Mark::Line(Dash::Dashed) => {
                for x in [10, 24] {
                    area.draw(&PathElement::new(vec![(x, y), (x + 8, y)], style))
                        .map_err(drawing)?;
                }
            }
            Mark::Line(Dash::Dotted) => {
                for x in [11, 18, 25, 32] {
                    area.draw(&Circle::new((x, y), 2, key.colour.filled()))
                        .map_err(drawing)?;
                }
            }
        }
        let indent = if key.mark == Mark::Nothing { 10 } else { 42 };
        text(
            area,
            &fit(&key.label, width.saturating_sub(indent + 4), 13),
            (indent, u32::try_from(y).unwrap_or_default()),
            13,
            Pos::new(HPos::Left, VPos::Center),
        )?;
        y += 22;
    }
    let left = Pos::new(HPos::Left, VPos::Center);
    for remark in remarks {
        y += 22;
        let at = (10, u32::try_from(y).unwrap_or_default());
        text(
            area,
            &fit(remark, width.saturating_sub(14), 13),
            at,
            13,
            left,
        )?;
    }
    Ok(())
}

/// A chart over `f64` coordinates.
pub type Chart<'a, 'b> =
    ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// The label of `x` on an axis of `base`-logarithms: `base^x` at whole `x`, none between.
pub fn power_label(base: f64, x: f64) -> String {
    if (x - x.round()).abs() > 1e-6 {
        return String::new();
    }
    count(base.powf(x.round()))
}

/// Draws `points` as a line of `colour` in `dash`, with a dot at each point.
pub fn line(
    chart: &mut Chart<'_, '_>,
    points: &[(f64, f64)],
    colour: RGBColor,
    dash: Dash,
) -> Result<()> {
    let style = colour.stroke_width(2);
    match dash {
        Dash::Solid => chart.draw_series(LineSeries::new(points.to_vec(), style)),
        Dash::Dashed => chart.draw_series(DashedLineSeries::new(points.to_vec(), 8, 5, style)),
        Dash::Dotted => {
            chart.draw_series(DottedLineSeries::new(points.to_vec(), 0, 7, move |at| {
                Circle::new(at, 2, colour.filled())
            }))
        }
    }
    .map_err(drawing)?;
    chart
        .draw_series(points.iter().map(|&at| Circle::new(at, 3, colour.filled())))
        .map_err(drawing)?;
    Ok(())
}

/// A whole number with thousands separated (`100,000`).
pub fn count(value: f64) -> String {
    let digits = format!("{:.0}", value.abs());
    let mut grouped = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    if value < 0.0 {
        format!("-{grouped}")
    } else {
        grouped
    }
}

/// A number with three significant digits, whole above 100 (`3.42`, `36.9`, `51,942`).
pub fn number(value: f64) -> String {
    if !value.is_finite() || value.abs() >= 100.0 || value == 0.0 {
        return count(value);
    }
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a small count of decimals"
    )]
    let decimals = (2.0 - value.abs().log10().floor()).clamp(0.0, 6.0) as usize;
    format!("{value:.decimals$}")
}

/// A value axis' tick label: whole numbers grouped, others with the decimals they need
/// (`0.5`, `2.5`, not `2.50`).
pub fn tick(value: f64) -> String {
    if (value - value.round()).abs() < 1e-9 {
        return count(value);
    }
    let text = format!("{value:.3}");
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// [`tick`] as plotters' label formatter, which hands a reference.
#[expect(
    clippy::trivially_copy_pass_by_ref,
    reason = "plotters' formatter signature"
)]
fn tick_label(value: &f64) -> String {
    tick(*value)
}

/// The mesh of `chart` in the style of every chart: a light grid (the data stands out),
/// value labels by [`tick`]; the caller adds the axes' descriptions and draws it.
pub fn mesh<'a, 'b, 'c>(
    chart: &'c mut Chart<'a, 'b>,
) -> MeshStyle<'a, 'c, RangedCoordf64, RangedCoordf64, SVGBackend<'b>> {
    let mut mesh = chart.configure_mesh();
    mesh.y_label_formatter(&tick_label)
        .light_line_style(RGBColor(243, 243, 243))
        .bold_line_style(RGBColor(215, 215, 215))
        .label_style((FONT, 12))
        .axis_desc_style((FONT, 13));
    mesh
}

/// The top of a value axis that shows `max` with room above it for labels.
pub fn headroom(max: f64) -> f64 {
    if max.is_finite() && max > 0.0 {
        max * 1.18
    } else {
        1.0
    }
}

/// A drawing error of plotters, as the task's error.
pub fn drawing<E: std::error::Error + Send + Sync + 'static>(
    err: DrawingAreaErrorKind<E>,
) -> anyhow::Error {
    anyhow::Error::new(err).context("drawing a chart")
}
