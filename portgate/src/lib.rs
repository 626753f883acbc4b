//! portgate: hands out ports to owners and enforces each port's policy in the kernel with eBPF.
//!
//! The library is what the daemon and the CLI call. Its modules are layers, each using only
//! the ones below it (`docs/ARCHITECTURE.md`; `cargo xtask lint` checks it), from the bottom:
//! [`paths`] and [`text`]; [`model`] (the records every layer shares) and [`config`];
//! [`host`] (what the host provides); [`gate`] (the kernel programs and their pinned maps),
//! [`store`], [`fleet`] (the store fleet mode shares through etcd), [`verdict`] (the same
//! packet verdict in plain Rust) and [`knock`]; [`manager`]; [`api`];
//! [`daemon`] and [`client`]; [`cli`].

pub mod api;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod fleet;
pub mod gate;
pub mod host;
pub mod knock;
pub mod manager;
pub mod model;
pub mod paths;
pub mod store;
pub mod text;
pub mod verdict;
