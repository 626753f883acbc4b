//! The nftables equivalent of a portgate policy, from the distribution's `nft`.
//!
//! One table, `inet portgate_bench`, with an `input` hook chain that sends each managed
//! port through a verdict map to a chain of its own; each port's chain drops sources
//! outside the port's allowlist (an interval set of its prefixes; IPv6 is dropped, as the
//! benchmark's allowlists are IPv4 only), then new connections over the port's limit
//! (`ct count over N`), then counts and accepts. New connections to other ports of the
//! managed range are dropped, as portgate drops them for unallocated ports. The rules
//! are only ever loaded inside a network namespace the benchmark made.

use std::{
    fmt::Write as _,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// The table's name.
pub const TABLE: &str = "portgate_bench";

/// One managed port as nftables sees it.
#[derive(Clone, Debug)]
pub struct NftPort {
    /// The port.
    pub port: u16,
    /// Its allowlist.
    pub allow: Vec<Ipv4Net>,
    /// Its connection limit.
    pub max_connections: u32,
}

/// The ruleset (for `nft -f`) equivalent to `ports` over the managed range `min..=max`.
pub fn ruleset(ports: &[NftPort], min: u16, max: u16) -> String {
    let mut out = String::with_capacity(ports.len() * (300 + 20 * 100));
    let _ = writeln!(out, "table inet {TABLE} {{");
    for port in ports {
        let _ = write!(
            out,
            "  set allow_{} {{ type ipv4_addr; flags interval; elements = {{ ",
            port.port
        );
        for (i, prefix) in port.allow.iter().enumerate() {
            let separator = if i == 0 { "" } else { ", " };
            let _ = write!(out, "{separator}{prefix}");
        }
        let _ = writeln!(out, " }} }}");
    }
    let _ = writeln!(
        out,
        "  chain input {{\n    type filter hook input priority filter; policy accept;"
    );
    let _ = write!(out, "    tcp dport vmap {{ ");
    for (i, port) in ports.iter().enumerate() {
        let separator = if i == 0 { "" } else { ", " };
        let _ = write!(out, "{separator}{} : jump port_{}", port.port, port.port);
    }
    let _ = writeln!(out, " }}");
    let _ = writeln!(
        out,
        "    tcp dport {min}-{max} ct state new counter drop comment \"unallocated\"\n  }}"
    );
    for port in ports {
        let p = port.port;
        let _ = writeln!(
            out,
            "  chain port_{p} {{\n    ip saddr != @allow_{p} counter drop comment \"not_allowed\"\n    meta nfproto ipv6 counter drop comment \"not_allowed_v6\"\n    ct state new ct count over {} counter drop comment \"conn_limit\"\n    counter accept comment \"passed\"\n  }}",
            port.max_connections
        );
    }
    out.push_str("}\n");
    out
}

/// `nft --version`, or why nft cannot be used.
pub fn version() -> Result<String> {
    let output = Command::new("nft")
        .arg("--version")
        .output()
        .context("running `nft --version` (install the distribution's nftables package: `apt-get install nftables`)")?;
    if !output.status.success() {
        bail!(
            "`nft --version` failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Loads `file` with `nft -f` into the calling process's network namespace; returns how
/// long it took.
pub fn load(file: &Path) -> Result<Duration> {
    let start = Instant::now();
    let output = Command::new("nft")
        .arg("-f")
        .arg(file)
        .output()
        .context("running nft -f")?;
    let took = start.elapsed();
    if !output.status.success() {
        bail!(
            "nft -f {} failed: {}",
            file.display(),
            String::from_utf8_lossy(&output.stderr)
                .lines()
                .take(5)
                .collect::<Vec<_>>()
                .join(" / ")
        );
    }
    Ok(took)
}

/// Deletes the table in the calling process's network namespace; returns how long it took.
/// Done before a round's namespace goes, so that the kernel does not tear a large ruleset
/// down in the background while the next round is measured.
pub fn unload() -> Result<Duration> {
    let start = Instant::now();
    let output = Command::new("nft")
        .args(["delete", "table", "inet", TABLE])
        .output()
        .context("running nft delete table")?;
    if !output.status.success() {
        bail!(
            "nft delete table failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(start.elapsed())
}

/// Packet counts of one rule, by its comment.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RuleHits {
    /// Packets to unmanaged ports of the range (`input` chain).
    pub unallocated: u64,
    /// Packets from sources outside the allowlist.
    pub not_allowed: u64,
    /// IPv6 packets (dropped).
    pub not_allowed_v6: u64,
    /// New connections over the limit.
    pub conn_limit: u64,
    /// Packets accepted by the port's chain.
    pub passed: u64,
}

/// The counters of `port`'s chain (and the `input` chain's drop), in the calling
/// process's network namespace.
pub fn hits(port: u16) -> Result<RuleHits> {
    let mut hits = RuleHits::default();
    for chain in ["input".to_owned(), format!("port_{port}")] {
        let output = Command::new("nft")
            .args(["-j", "list", "chain", "inet", TABLE, &chain])
            .output()
            .context("running nft -j list chain")?;
        if !output.status.success() {
            bail!(
                "nft list chain {chain} failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        let listing: serde_json::Value =
            serde_json::from_slice(&output.stdout).context("nft's JSON listing")?;
        let items = listing["nftables"].as_array().cloned().unwrap_or_default();
        for item in items {
            let rule = &item["rule"];
            let Some(comment) = rule["comment"].as_str() else {
                continue;
            };
            let packets = rule["expr"]
                .as_array()
                .into_iter()
                .flatten()
                .find_map(|expr| expr["counter"]["packets"].as_u64())
                .unwrap_or(0);
            match comment {
                "unallocated" => hits.unallocated = packets,
                "not_allowed" => hits.not_allowed = packets,
                "not_allowed_v6" => hits.not_allowed_v6 = packets,
                "conn_limit" => hits.conn_limit = packets,
                "passed" => hits.passed = packets,
                _ => {}
            }
        }
    }
    Ok(hits)
}

#[cfg(test)]
mod tests {
    use super::{NftPort, ruleset};

    #[test]
    fn a_port_gets_its_set_chain_and_map_entry() {
        let text = ruleset(
            &[NftPort {
                port: 20_001,
                allow: vec!["127.0.0.1/32".parse().expect("prefix")],
                max_connections: 1000,
            }],
            20_000,
            29_999,
        );
        assert!(text.contains("set allow_20001 {"));
        assert!(text.contains("elements = { 127.0.0.1/32 }"));
        assert!(text.contains("tcp dport vmap { 20001 : jump port_20001 }"));
        assert!(text.contains("ct count over 1000"));
        assert!(text.contains("tcp dport 20000-29999 ct state new counter drop"));
    }
}
