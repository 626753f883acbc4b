//! portgate: hands out ports to owners and enforces each port's policy in the kernel with eBPF.
//!
//! The library is what the daemon and the CLI call: [`gate`] loads, attaches and drives the
//! kernel programs and their pinned maps; [`verdict`] is the same packet verdict in plain
//! Rust; [`model`] holds the records every layer shares; [`host`] finds what the host
//! provides.

pub mod api;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod gate;
pub mod host;
pub mod manager;
pub mod model;
pub mod paths;
pub mod store;
pub mod text;
pub mod verdict;
