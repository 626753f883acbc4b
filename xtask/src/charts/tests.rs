//! The charts drawn from a small run (`testdata/small.json`: a few cases of sections 1, 2
//! and 4, some failed, section 3 left out), from a run without those sections, and from the
//! committed full run, each read back as XML.

use std::path::{Path, PathBuf};

use super::{Report, draw};

/// The small run.
fn small() -> Report {
    serde_json::from_str(include_str!("testdata/small.json")).expect("the fixture is a report")
}

/// Every `<text>` of an SVG, after checking that it is well-formed XML with an `<svg>` root.
fn texts(svg: &str) -> Vec<String> {
    let document = roxmltree::Document::parse(svg).expect("the chart is well-formed XML");
    assert_eq!(document.root_element().tag_name().name(), "svg");
    document
        .descendants()
        .filter(|node| node.has_tag_name("text"))
        .filter_map(|node| node.text().map(str::to_owned))
        .collect()
}

/// The texts of the chart named `file` of `report`.
fn chart_texts(report: &Report, file: &str) -> Vec<String> {
    let charts = draw(report).expect("the charts draw");
    let (_, svg) = charts
        .iter()
        .find(|(name, _)| *name == file)
        .unwrap_or_else(|| panic!("no chart {file}"));
    texts(svg)
}

fn has(texts: &[String], wanted: &str) -> bool {
    texts.iter().any(|text| text.contains(wanted))
}

#[track_caller]
fn assert_has(texts: &[String], wanted: &[&str]) {
    for w in wanted {
        assert!(has(texts, w), "no text {w:?} in {texts:#?}");
    }
}

#[test]
fn a_small_run_draws_every_chart_with_its_series_labels_and_caption() {
    let report = small();
    let caption = "Run 2026-11-29T20:06:01Z (full, 750 s) on Linux 6.18.44-test, 2 x Test CPU";
    let prefixes = chart_texts(&report, "verdict-prefixes.svg");
    assert_has(
        &prefixes,
        &[
            "IPv4",
            "pass",
            "not_allowed",
            "ns per packet",
            "1,000",
            "1 port",
            "10,000 ports",
            caption,
        ],
    );
    // Off the grid: XDP, deny events off.
    assert!(!has(&prefixes, "XDP"));
    let ports = chart_texts(&report, "verdict-ports.svg");
    assert_has(
        &ports,
        &[
            "allocated ports (log scale)",
            "1 prefix",
            "1,000 prefixes",
            "10,000",
        ],
    );
    let connections = chart_texts(&report, "connections.svg");
    assert_has(
        &connections,
        &[
            "no gate",
            "portgate",
            "nftables",
            "connections/s",
            "us per connection",
            "60,727",
            "51,942",
            "36.9",
            "3.42",
            "2. over loopback",
            caption,
        ],
    );
    let allocation = chart_texts(&report, "allocation.svg");
    assert_has(
        &allocation,
        &[
            "allocations per second",
            "latency, ms",
            "concurrent clients (log scale)",
            "1,646",
            "6,670",
            "p99 latency (right axis)",
            caption,
        ],
    );
    // The in-process rate has no clients: not on the chart.
    assert!(!has(&allocation, "72,604"));
}

#[test]
fn failed_figures_are_said_where_they_would_be() {
    let report = small();
    let connections = chart_texts(&report, "connections.svg");
    assert_has(
        &connections,
        &[
            "2. Connections/s, nftables (median of rounds): failed: nft: command not found",
            "2. CPU per connection, nftables (client + server + kernel, median): failed",
            "n/a",
            "Section 3 is not in this run",
        ],
    );
    let prefixes = chart_texts(&report, "verdict-prefixes.svg");
    assert_has(
        &prefixes,
        &[
            "cgroup_skb IPv4 pass at 10,000 ports x 1,000 prefixes: failed: BPF_PROG_TEST_RUN: Operation not permitted",
        ],
    );
    let allocation = chart_texts(&report, "allocation.svg");
    assert_has(
        &allocation,
        &["4. daemon API, durable, 64 client(s): allocations/s: failed: the daemon did not start"],
    );
}

#[test]
fn a_run_without_the_sections_says_so_in_each_chart() {
    let mut report = small();
    report.figures.clear();
    assert_has(
        &chart_texts(&report, "verdict-prefixes.svg"),
        &["The in-kernel verdict (section 1) is not in this run"],
    );
    assert_has(
        &chart_texts(&report, "connections.svg"),
        &["The connection set-up rate (sections 2 and 3) is not in this run"],
    );
    assert_has(
        &chart_texts(&report, "allocation.svg"),
        &["Allocation (section 4) is not in this run"],
    );
}

#[test]
fn every_figure_of_a_section_failed_is_said() {
    let mut report = small();
    report
        .figures
        .retain(|figure| figure.section.starts_with("1. "));
    for figure in &mut report.figures {
        figure.outcome = super::results::Outcome::Failed {
            error: "no kernel".to_owned(),
        };
    }
    assert_has(
        &chart_texts(&report, "verdict-ports.svg"),
        &[
            "No case of the in-kernel verdict (section 1) was measured",
            "failed: no kernel",
        ],
    );
}

/// The committed run behind BENCHMARKS.md's tables and its charts.
fn committed() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/bench/bench-2026-11-29T200601Z.json")
}

#[test]
fn the_committed_charts_are_those_of_the_committed_run() {
    let results = committed();
    let report = Report::read(&results).expect("the committed run reads");
    for (file, svg) in draw(&report).expect("the charts draw") {
        texts(&svg);
        let path = results.with_file_name(file);
        let committed = std::fs::read_to_string(&path)
            .unwrap_or_else(|err| panic!("reading {}: {err}", path.display()));
        assert!(
            committed == svg,
            "{} is not what the charts' code draws now: run `cargo xtask bench --charts-from docs/bench/bench-2026-11-29T200601Z.json` and commit the result",
            path.display()
        );
    }
}
