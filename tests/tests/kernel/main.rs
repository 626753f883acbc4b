//! portgate's kernel tests: one module per feature, all in this one test binary, as aya
//! lays out its integration tests. `cargo xtask test --kernel -- <module>` runs one
//! feature (a libtest filter matches the module path: `allowlist::`, `load::`, ...).
//!
//! Every test makes its own cgroups, network namespaces, veth pairs and pin directories
//! (the guards of [`portgate_tests::common`]) and needs root (`CAP_BPF`, `CAP_NET_ADMIN`,
//! `CAP_SYS_ADMIN`), cgroup v2, bpffs, BTF and iproute2; without them it prints `SKIPPED`,
//! and fails when `CI` is set. The daemon's tests run the `portgate` binary built next to
//! this one (`cargo xtask test` builds it; `PORTGATE_BIN` overrides the path). They share
//! the kernel: run them on one thread.

mod allowlist;
mod allowlist_change;
mod api_abuse;
mod audit_health;
mod bind_ownership;
mod conn_limit;
mod containers;
mod daemon_api;
mod differential;
mod draining;
mod events;
mod fast_path;
mod fleet;
mod fleet_daemons;
mod floods;
mod gate_faults;
mod grants;
mod handshakes;
mod host;
mod kernel_log;
mod knock;
mod lifecycle;
mod lifecycle_abuse;
mod load;
mod maps;
mod monitoring;
mod owners;
mod parsing;
mod podman;
mod reservations;
mod restart;
mod store_faults;
mod topology;
mod udp;
