//! Facts about the host, one module each: the live sockets ([`sockets`]), the port sysctls
//! ([`sysctls`]) and the port lists they hold ([`port_ranges`]), the cgroup2 hierarchy
//! ([`cgroups`]), the mount table and bpffs ([`mounts`]), what the running kernel grants
//! this process ([`kernel`]), the network namespaces ([`netns`]), and the containers and pods
//! in the cgroup tree ([`containers`]).
//!
//! The socket tables and the port sysctls are those of the calling thread's network
//! namespace; [`netns::enter`] runs code in another. [`HostError`] is every way a fact can
//! fail to be read or changed, except that [`netns`] and [`containers`] have their own errors
//! ([`netns::NetnsError`], [`containers::ContainerError`]).

pub mod cgroups;
pub mod containers;
pub mod kernel;
pub mod mounts;
pub mod netns;
pub mod port_ranges;
pub mod sockets;
pub mod sysctls;

use std::{
    io,
    path::{Path, PathBuf},
};

use procfs::ProcError;

use self::port_ranges::ParsePortRangesError;
use crate::paths;

/// A problem with the host: a fact that could not be read or changed, or something missing
/// that keeps portgate from working.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// A socket table under `/proc/thread-self/net` could not be read or parsed.
    #[error("reading the socket table {path}; portgate needs procfs mounted at /proc")]
    SocketTable {
        /// The table read.
        path: PathBuf,
        /// The cause.
        #[source]
        source: ProcError,
    },
    /// A sysctl file could not be read.
    #[error("reading {path}; portgate needs procfs mounted at /proc")]
    ReadSysctl {
        /// The file read.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A sysctl holds more than portgate reads in one go.
    #[error(
        "{path} holds more than {max} bytes, more than portgate reads: shorten the value \
         (merge neighbouring ports into ranges)"
    )]
    SysctlTooLong {
        /// The file read.
        path: PathBuf,
        /// The most bytes read.
        max: usize,
    },
    /// A sysctl file could not be written.
    #[error(
        "writing {value:?} to {path}; run portgate as root (CAP_NET_ADMIN over its \
         network namespace) with /proc/sys mounted read-write"
    )]
    WriteSysctl {
        /// The file written.
        path: PathBuf,
        /// What was being written.
        value: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The ephemeral port range is not two ports, low then high.
    #[error(
        "{path} holds {value:?}, not two ports low then high: set it with \
         `sysctl -w net.ipv4.ip_local_port_range=\"32768 60999\"`"
    )]
    BadPortRange {
        /// The file read.
        path: PathBuf,
        /// What it held.
        value: String,
    },
    /// The reserved ports are not a list of ports and ranges.
    #[error(
        "{path} holds {value:?}; set it to a valid list with \
         `sysctl -w net.ipv4.ip_local_reserved_ports=...`"
    )]
    BadReservedPorts {
        /// The file read.
        path: PathBuf,
        /// What it held.
        value: String,
        /// What is wrong with it.
        #[source]
        source: ParsePortRangesError,
    },
    /// The mount table could not be read.
    #[error("reading {path}")]
    Mounts {
        /// The file read.
        path: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// No cgroup2 file system is mounted.
    #[error(
        "no cgroup2 mount in {}: mount cgroup v2 (e.g. `mount -t cgroup2 none /sys/fs/cgroup`)",
        paths::PROC_MOUNTS
    )]
    NoCgroup2,
    /// A path is not a directory of the cgroup2 mount.
    #[error("{path} is not a cgroup2 directory under {root}")]
    NotACgroup {
        /// The path given.
        path: PathBuf,
        /// The cgroup2 mount.
        root: PathBuf,
    },
    /// A file-system call failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The kernel is older than portgate supports.
    #[error(
        "kernel {found} is too old: portgate needs Linux {}.{} or later",
        kernel::MIN_VERSION.0,
        kernel::MIN_VERSION.1
    )]
    KernelTooOld {
        /// The running kernel's release.
        found: String,
    },
    /// A system call failed.
    #[error("{call}")]
    Syscall {
        /// The call's name.
        call: &'static str,
        /// The cause.
        #[source]
        source: nix::Error,
    },
}

impl HostError {
    /// The error of a file-system call that failed `op` (`"opening"`, ...) on `path`, to
    /// hand to `map_err`.
    pub fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Self + 'a {
        move |source| Self::Io {
            op,
            path: path.to_owned(),
            source,
        }
    }
}
