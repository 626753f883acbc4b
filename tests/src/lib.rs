//! portgate's privileged integration tests against the real kernel, and the fixtures they
//! share with the benchmarks.
//!
//! The tests are in `tests/`: `differential.rs` (kernel verdict against the userspace
//! verdict with `BPF_PROG_TEST_RUN`), `gate_state.rs` (the gate's maps and their
//! bookkeeping), `enforcement.rs` (real sockets in test network namespaces and cgroups),
//! `daemon.rs` (the `portgate` daemon and CLI end to end: authorization, bad input,
//! `kill -9`, the lifecycle), `host.rs` (sysctls and socket tables inside a test
//! namespace) and `load.rs` (the specification's load tests).
//! Run them with `cargo xtask test`.
//!
//! This library holds what they share: [`common`] (the privilege gate, RAII guards for
//! cgroups, namespaces, veth pairs and pin directories, the packet builder) and [`daemon`]
//! (a `portgate daemon` child process in its own namespace, cgroup and pin directory).
//! The benchmarks (`src/bin/portgate-bench`, run by `cargo xtask bench`) use both.

#![allow(
    clippy::must_use_candidate,
    clippy::return_self_not_must_use,
    clippy::new_without_default,
    reason = "test fixtures: each `new` makes something in the kernel, never a default"
)]

pub mod common;
pub mod daemon;
