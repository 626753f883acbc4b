//! portgate's privileged integration tests against the real kernel, and the fixtures they
//! share with the benchmarks.
//!
//! The tests are one binary, `tests/kernel/`, one module per feature: `allowlist`,
//! `conn_limit`, `draining`, `grants`, `bind_ownership`, `udp` (real sockets in test
//! network namespaces and cgroups, or `BPF_PROG_TEST_RUN`), `events` and `maps` (the gate's
//! deny events and maps), `restart` (what outlives a process, `kill -9`, adoption of pins),
//! `daemon_api` (authorization by uid, bad requests), `lifecycle` (a port's life end to
//! end through the CLI), `host` (sysctls and socket tables inside a test namespace),
//! `differential` (kernel verdict against the userspace verdict) and `load` (the
//! specification's load tests). Run them with `cargo xtask test`; `cargo xtask test
//! --kernel -- <module>` runs one feature.
//!
//! This library holds what they share: [`common`] (the privilege gate, RAII guards for
//! cgroups, namespaces, veth pairs and pin directories, sockets and listeners, the packet
//! builder, gates installed by a test) and [`daemon`] (a `portgate daemon` child process in
//! its own namespace, cgroup and pin directory, with the typed API client). The benchmarks
//! (`src/bin/portgate-bench`, run by `cargo xtask bench`) use both.

#![allow(
    clippy::must_use_candidate,
    clippy::return_self_not_must_use,
    clippy::new_without_default,
    reason = "test fixtures: each `new` makes something in the kernel, never a default"
)]

pub mod common;
pub mod daemon;
pub mod etcd;
pub mod fleet;
pub mod stress;

/// Whether the calling test can run its kernel part: [`common::require_privileges`] under
/// the test's own name, as libtest prints it (`allowlist::allowlist_is_enforced_...`). The
/// name comes from where the macro is expanded, so no test spells its own. A kernel test
/// starts with `if !require_privileges!() { return; }`.
#[macro_export]
macro_rules! require_privileges {
    () => {
        $crate::common::require_privileges($crate::test_name!())
    };
}

/// The calling test's name as libtest prints it (`allowlist::allowlist_is_enforced_...`),
/// found from where the macro is expanded: what the `require_*!` gates print and fail with.
#[macro_export]
macro_rules! test_name {
    () => {{
        fn here() {}
        // `kernel::allowlist::the_test::here`: the crate, the test's path, this function.
        let path = ::std::any::type_name_of_val(&here);
        let test = path.strip_suffix("::here").unwrap_or(path);
        test.split_once("::").map_or(test, |(_crate, test)| test)
    }};
}
