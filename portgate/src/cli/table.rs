//! The one small table type every CLI listing uses.

use std::fmt;

use crate::model::NetnsId;

/// The column of a port's namespace: its label, `host` for the host's.
pub const NETNS: &str = "NETNS";
/// The column of the host port a port is published on.
pub const PUBLISHED: &str = "PUBLISHED";
/// The PUBLISHED cell of a port that is not published.
const NOT_PUBLISHED: &str = "-";

/// The PUBLISHED cell: the host port, or `-`.
#[must_use]
pub fn published_cell(published: Option<u16>) -> String {
    published.map_or_else(|| NOT_PUBLISHED.to_owned(), |port| port.to_string())
}

/// Rows of text under a header, printed with aligned columns.
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column names.
    #[must_use]
    pub fn new(header: &[&str]) -> Self {
        Self {
            header: header.iter().map(|name| (*name).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row (missing cells print empty, extra cells are dropped).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Takes out the [`NETNS`] column when every port is the host's, and [`PUBLISHED`] when
    /// none is published: every table of ports shows them only when a row needs them.
    #[must_use]
    pub fn port_columns(self) -> Self {
        self.without_blank(NETNS, NetnsId::HOST_NAME)
            .without_blank(PUBLISHED, NOT_PUBLISHED)
    }

    /// Takes out the column `name` when every row has `blank` in it: how a listing shows a
    /// column only some rows need (NETNS, PUBLISHED) only when one of them is there.
    #[must_use]
    fn without_blank(mut self, name: &str, blank: &str) -> Self {
        let Some(index) = self.header.iter().position(|column| column == name) else {
            return self;
        };
        if self
            .rows
            .iter()
            .all(|row| row.get(index).is_none_or(|cell| cell == blank))
        {
            self.header.remove(index);
            for row in &mut self.rows {
                if index < row.len() {
                    row.remove(index);
                }
            }
        }
        self
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut widths: Vec<usize> = self.header.iter().map(String::len).collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let empty = String::new();
        for row in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::new();
            for (index, width) in widths.iter().enumerate() {
                let cell = row.get(index).unwrap_or(&empty);
                if index > 0 {
                    line.push_str("  ");
                }
                line.push_str(cell);
                if index + 1 < widths.len() {
                    line.push_str(&" ".repeat(width.saturating_sub(cell.chars().count())));
                }
            }
            writeln!(f, "{}", line.trim_end())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Table;

    #[test]
    fn aligns_columns() {
        let mut table = Table::new(&["PORT", "STATUS"]);
        table.row(vec!["20000".into(), "active".into()]);
        table.row(vec!["8".into(), "draining".into()]);
        assert_eq!(
            table.to_string(),
            "PORT   STATUS\n20000  active\n8      draining\n"
        );
    }

    #[test]
    fn netns_shows_only_beside_another_namespace() {
        let mut table = Table::new(&["PORT", "NETNS", "STATUS"]);
        table.row(vec!["20000".into(), "host".into(), "active".into()]);
        let table = table.port_columns();
        assert_eq!(table.to_string(), "PORT   STATUS\n20000  active\n");

        let mut table = Table::new(&["PORT", "NETNS", "STATUS"]);
        table.row(vec!["20000".into(), "host".into(), "active".into()]);
        table.row(vec!["80".into(), "web1".into(), "active".into()]);
        let table = table.port_columns();
        assert_eq!(
            table.to_string(),
            "PORT   NETNS  STATUS\n20000  host   active\n80     web1   active\n"
        );
    }
}
