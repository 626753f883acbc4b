//! What the running kernel grants this process: its release, the capabilities, the
//! locked-memory limit, the network namespace and the monotonic clock.

use std::{fs, os::unix::fs::MetadataExt as _, path::Path};

use super::HostError;
use crate::paths;

/// The oldest kernel portgate runs on: 5.15 LTS. The helpers it needs arrived earlier
/// (ring buffer 5.8, atomic fetch-and-add and compare-and-exchange 5.12,
/// `bpf_for_each_map_elem` 5.13, cgroup bind and `sock_ops` hooks, BPF links for cgroups 5.7);
/// 5.15 is the oldest long-term release with all of them.
pub const MIN_VERSION: (u32, u32) = (5, 15);

/// Fails when the running kernel is older than [`MIN_VERSION`].
pub fn check_version() -> Result<(), HostError> {
    let path = Path::new(paths::OS_RELEASE);
    let release = fs::read_to_string(path).map_err(HostError::io("reading", path))?;
    let release = release.trim().to_owned();
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|part| part.parse::<u32>().unwrap_or(0));
    let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    if version < MIN_VERSION {
        return Err(HostError::KernelTooOld { found: release });
    }
    Ok(())
}

/// The capabilities the gate needs that this process lacks (`CAP_BPF`, `CAP_NET_ADMIN`,
/// `CAP_SYS_ADMIN`), read from the effective set in `/proc/self/status`.
#[must_use]
pub fn missing_capabilities() -> Vec<&'static str> {
    const NEEDED: [(u32, &str); 3] = [
        (39, "CAP_BPF"),
        (12, "CAP_NET_ADMIN"),
        (21, "CAP_SYS_ADMIN"),
    ];
    let effective = fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .unwrap_or(0);
    NEEDED
        .iter()
        .filter(|(bit, _)| effective & (1 << bit) == 0)
        .map(|(_, name)| *name)
        .collect()
}

/// Lifts the locked-memory limit, which kernels before 5.11 charge BPF maps against (later
/// kernels charge the memory cgroup). Best effort: where the limit cannot be raised, map
/// creation on an old kernel reports the real failure.
pub fn raise_memlock_limit() {
    use nix::sys::resource::{RLIM_INFINITY, Resource, getrlimit, setrlimit};
    if setrlimit(Resource::RLIMIT_MEMLOCK, RLIM_INFINITY, RLIM_INFINITY).is_ok() {
        return;
    }
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_MEMLOCK) {
        let _ignored = setrlimit(Resource::RLIMIT_MEMLOCK, hard, hard);
    }
}

/// The inode of the calling thread's network namespace, which names it in pin paths.
pub fn current_netns_inode() -> Result<u64, HostError> {
    fs::metadata(paths::THREAD_NETNS)
        .map(|meta| meta.ino())
        .map_err(HostError::io("reading", Path::new(paths::THREAD_NETNS)))
}

/// `CLOCK_MONOTONIC` now, in nanoseconds: the clock of grant expiries and event times.
#[must_use]
pub fn monotonic_now_ns() -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available");
    u64::try_from(now.tv_sec()).unwrap_or(0) * 1_000_000_000
        + u64::try_from(now.tv_nsec()).unwrap_or(0)
}
