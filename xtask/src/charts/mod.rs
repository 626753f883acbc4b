//! The charts of a benchmark run, drawn as SVG from its results (`latest.json`): the
//! in-kernel verdict against prefixes and ports, the connection rate and CPU per connection
//! of no gate, portgate and nftables with the gate's own kernel time, and the allocation
//! rate against the number of clients. `cargo xtask bench` draws them after its run, and
//! `cargo xtask bench --charts-from FILE` from a saved run, beside the results file.
//!
//! A chart whose figures the run does not have, or has as failed, is still drawn, and says
//! so where the figure would be.

mod allocation;
mod connections;
mod draw;
mod results;
#[cfg(test)]
mod tests;
mod verdict;

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

pub use results::Report;
use verdict::Against;

/// Every chart of `report`: its file name and its SVG.
pub fn draw(report: &Report) -> Result<Vec<(&'static str, String)>> {
    Ok(vec![
        (
            Against::Prefixes.file(),
            verdict::chart(report, Against::Prefixes)?,
        ),
        (
            Against::Ports.file(),
            verdict::chart(report, Against::Ports)?,
        ),
        (connections::FILE, connections::chart(report)?),
        (allocation::FILE, allocation::chart(report)?),
    ])
}

/// Reads the results at `results` and writes every chart beside it; returns their paths.
pub fn draw_beside(results: &Path) -> Result<Vec<PathBuf>> {
    let report = Report::read(results)?;
    let dir = results.parent().unwrap_or_else(|| Path::new("."));
    let mut written = Vec::new();
    for (file, svg) in draw(&report)? {
        let path = dir.join(file);
        fs::write(&path, svg).with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}
