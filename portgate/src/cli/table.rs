//! The one small table type every CLI listing uses.

use std::fmt;

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
}
