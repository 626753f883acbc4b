//! portgate's privileged integration tests against the real kernel.
//!
//! The tests are in `tests/`: `differential.rs` (kernel verdict against the userspace
//! verdict with `BPF_PROG_TEST_RUN`) and `enforcement.rs` (real sockets in test network
//! namespaces and cgroups); `tests/common/` holds their RAII guards and packet builder.
//! Run them with `cargo xtask test`.
