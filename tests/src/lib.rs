//! portgate's privileged integration tests against the real kernel.
//!
//! The tests are in `tests/`: `differential.rs` (kernel verdict against the userspace
//! verdict with `BPF_PROG_TEST_RUN`), `gate_state.rs` (the gate's maps and their
//! bookkeeping), `enforcement.rs` (real sockets in test network namespaces and cgroups),
//! `daemon.rs` (the `portgate` daemon and CLI end to end: authorization, bad input,
//! `kill -9`, the lifecycle) and `host.rs` (sysctls and socket tables inside a test
//! namespace); `tests/common/` holds their RAII guards and packet builder.
//! Run them with `cargo xtask test`.
