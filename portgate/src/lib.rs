//! portgate: hands out ports to owners and enforces each port's policy in the kernel with eBPF.
//!
//! The library is what the daemon and the CLI call: [`gate`] loads, attaches and drives the
//! kernel programs and their pinned maps; [`verdict`] is the same packet verdict in plain
//! Rust; [`policy`] holds the types both speak; [`host`] finds what the host provides and
//! reads its sockets and port sysctls.

pub mod api;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod gate;
pub mod host;
pub mod manager;
pub mod paths;
pub mod policy;
pub mod report;
pub mod store;
pub mod verdict;
