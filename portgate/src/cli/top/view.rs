//! How `portgate top` draws its [`Top`] on a terminal frame: a header line, the ports'
//! table, the drops by reason over every port, the daemon's warnings, the deny events
//! (newest first) and a footer with the keys.

use std::time::Duration;

use ratatui::{
    Frame,
    layout::{Constraint, Layout},
    style::{Modifier, Style, Stylize as _},
    text::Line,
    widgets::{Block, Paragraph, Row, Table},
};

use super::model::{DropRates, Link, PortRow, SortColumn, Top};
use crate::{
    cli::{events, format},
    model::DropReason,
};

/// Most warning lines shown (the rest: `portgate status`).
const MAX_WARNINGS: usize = 3;

/// Draws the whole view; `interval` is how often the daemon is read.
pub fn draw(frame: &mut Frame, top: &Top, interval: Duration) {
    let warnings: Vec<Line> = top
        .status()
        .map(|status| status.warnings.as_slice())
        .unwrap_or_default()
        .iter()
        .take(MAX_WARNINGS)
        .map(|warning| Line::from(format!("warning: {warning}")).yellow())
        .collect();
    let warning_lines = u16::try_from(warnings.len()).unwrap_or(0);
    let [header, ports, drops, warned, deny, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(4),
        Constraint::Length(1),
        Constraint::Length(warning_lines),
        Constraint::Length(12),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    frame.render_widget(Paragraph::new(header_line(top, interval)), header);
    frame.render_widget(ports_table(top), ports);
    frame.render_widget(Paragraph::new(drops_line(top)), drops);
    frame.render_widget(Paragraph::new(warnings), warned);
    let lines: Vec<Line> = std::iter::once(Line::from(events::header()).bold())
        .chain(top.events().map(|event| Line::from(events::row(event))))
        .collect();
    frame.render_widget(
        Paragraph::new(lines).block(Block::bordered().title(" deny events, newest first ")),
        deny,
    );
    frame.render_widget(Paragraph::new(footer_line(top)), footer);
}

/// The daemon, the read interval and the sort order; or why the daemon does not answer.
fn header_line(top: &Top, interval: Duration) -> Line<'static> {
    let every = format!("every {}", humantime::format_duration(interval));
    match (top.link(), top.status()) {
        (Link::Down(why), _) => {
            Line::from(format!("daemon unreachable, trying again {every}: {why}")).red()
        }
        (Link::Up, Some(status)) => Line::from(format!(
            "portgate top: daemon {} pid {}, up {}, range {}-{}, {every}",
            status.version,
            status.pid,
            format::duration(Duration::from_secs(status.uptime_secs)),
            status.min_port,
            status.max_port,
        ))
        .bold(),
        (Link::Up, None) => Line::from(format!("portgate top: reading the daemon {every}")),
    }
}

/// One row per port, under a header that marks the sort column.
fn ports_table(top: &Top) -> Table<'static> {
    let (sorted, reverse) = top.sort();
    let arrow = if reverse { "v" } else { "^" };
    let title = |column: SortColumn, name: &str| {
        if column == sorted {
            format!("{name}{arrow}")
        } else {
            name.to_owned()
        }
    };
    let header = Row::new([
        title(SortColumn::Port, "PORT"),
        "PROTO".to_owned(),
        "NETNS".to_owned(),
        title(SortColumn::Owner, "OWNER"),
        title(SortColumn::Status, "STATUS"),
        title(SortColumn::Connections, "CONNS/LIMIT"),
        title(SortColumn::AcceptRate, "CONN/S"),
        title(SortColumn::DropRate, "DROP/S"),
        "DROPS BY REASON: COUNT (PER SECOND)".to_owned(),
    ])
    .style(Style::new().add_modifier(Modifier::REVERSED));
    let rows = top.rows().iter().map(port_cells).map(Row::new);
    Table::new(
        rows,
        [
            Constraint::Length(6),
            Constraint::Length(5),
            Constraint::Length(12),
            Constraint::Length(16),
            Constraint::Length(9),
            Constraint::Length(11),
            Constraint::Length(7),
            Constraint::Length(7),
            Constraint::Fill(1),
        ],
    )
    .header(header)
}

/// The cells of a port's row.
fn port_cells(row: &PortRow) -> [String; 9] {
    let limit = match row.limit {
        0 => "-".to_owned(),
        limit => limit.to_string(),
    };
    let by_reason: Vec<String> = DropReason::ALL
        .iter()
        .enumerate()
        .filter_map(|(index, &reason)| {
            let count = row.counters.dropped.get(reason);
            (count > 0).then(|| {
                let rate = rate(row.drop_rates.map(|rates| rates[index]));
                format!("{reason} {count} ({rate})")
            })
        })
        .collect();
    [
        row.id.port.to_string(),
        row.id.protocol.to_string(),
        row.netns.clone(),
        row.owner.clone().unwrap_or_else(|| "-".to_owned()),
        row.status.to_string(),
        format!("{}/{limit}", row.connections),
        rate(row.accept_rate),
        rate(row.drop_rate()),
        if by_reason.is_empty() {
            "-".to_owned()
        } else {
            by_reason.join(", ")
        },
    ]
}

/// Every port's drops by reason: count, and per second between the last two reads.
fn drops_line(top: &Top) -> Line<'static> {
    let counts = top.drop_counts();
    let rates: Option<DropRates> = top.drop_totals();
    let parts: Vec<String> = DropReason::ALL
        .iter()
        .enumerate()
        .map(|(index, reason)| {
            let rate = rate(rates.map(|rates| rates[index]));
            format!("{reason} {} ({rate})", counts[index])
        })
        .collect();
    Line::from(format!("all ports' drops: {}", parts.join("  ")))
}

/// The keys, and the sort order.
fn footer_line(top: &Top) -> Line<'static> {
    let (sorted, reverse) = top.sort();
    let keys: Vec<String> = SortColumn::ALL
        .iter()
        .map(|column| format!("{} {}", column.key(), column.name()))
        .collect();
    let order = if reverse { "descending" } else { "ascending" };
    Line::from(format!(
        "q quit | sort: {} | r reverse | sorted by {} {order}",
        keys.join("  "),
        sorted.name()
    ))
    .reversed()
}

/// A rate with one decimal, `-` before there is one.
fn rate(per_second: Option<f64>) -> String {
    per_second.map_or_else(|| "-".to_owned(), |rate| format!("{rate:.1}/s"))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ratatui::{Terminal, backend::TestBackend};

    use super::draw;
    use crate::cli::top::model::{Link, Top};

    fn screen(top: &Top) -> String {
        let mut terminal = Terminal::new(TestBackend::new(150, 30)).expect("a test terminal");
        terminal
            .draw(|frame| draw(frame, top, Duration::from_secs(1)))
            .expect("drawn");
        let buffer = terminal.backend().buffer();
        buffer
            .content()
            .chunks(usize::from(buffer.area.width))
            .map(|line| {
                line.iter()
                    .map(ratatui::buffer::Cell::symbol)
                    .collect::<String>()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn an_empty_view_shows_its_frame_and_keys() {
        let mut top = Top::new();
        let text = screen(&top);
        assert!(
            text.contains("portgate top: reading the daemon every 1s"),
            "{text}"
        );
        assert!(text.contains("PORT^"), "{text}");
        assert!(text.contains("deny events, newest first"), "{text}");
        assert!(text.contains("q quit"), "{text}");
        top.lost("cannot connect".to_owned());
        assert_eq!(top.link(), &Link::Down("cannot connect".to_owned()));
        let text = screen(&top);
        assert!(
            text.contains("daemon unreachable, trying again every 1s: cannot connect"),
            "{text}"
        );
    }
}
