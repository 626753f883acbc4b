//! Section 7: the specification's load tests (`tests/tests/kernel/load.rs`), run bigger than in
//! `cargo xtask test`. `cargo xtask bench` runs them (they are tests: they assert
//! correctness, not time) and hands their results to this binary to report.

use std::path::Path;

use anyhow::{Context as _, Result};

use crate::report::Figure;

/// The section's title.
pub const SECTION: &str = "7. Load tests (correctness under load, scaled up)";

/// The figures for the results `cargo xtask bench` wrote to `path`.
pub fn figures(path: &Path) -> Vec<Figure> {
    read(path).unwrap_or_else(|err| vec![Figure::failed(SECTION, "load tests", err)])
}

fn read(path: &Path) -> Result<Vec<Figure>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let results: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let scale = results["scale"].as_u64().unwrap_or_default();
    let seconds = results["seconds"].as_f64().unwrap_or_default();
    let tests = results["tests"].as_array().cloned().unwrap_or_default();
    if tests.is_empty() || results["skipped"].as_u64().unwrap_or_default() > 0 {
        anyhow::bail!(
            "the load tests did not run ({}; {} skipped)",
            results["status"].as_str().unwrap_or("?"),
            results["skipped"]
        );
    }
    Ok(tests
        .iter()
        .map(|test| {
            let name = format!("{} (scale {scale})", test["name"].as_str().unwrap_or("?"));
            let figure = if test["passed"].as_bool() == Some(true) {
                Figure::passed(
                    SECTION,
                    name,
                    format!("all {} tests: {seconds:.0} s", tests.len()),
                )
            } else {
                Figure::failed(SECTION, name, "the test failed: see its output above")
            };
            figure.raw(results.clone())
        })
        .collect())
}
