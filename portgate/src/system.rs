//! Facts about the host: mounts, cgroups, network namespaces, resource limits.

use std::{
    fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use crate::paths;

/// A problem with the host that keeps the gate from working.
#[derive(Debug, thiserror::Error)]
pub enum SystemError {
    /// The mount table could not be read.
    #[error("reading {path}: {source}")]
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
    #[error("{op} {path}: {source}")]
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
    #[error("kernel {found} is too old: portgate needs Linux {}.{} or later", MIN_KERNEL.0, MIN_KERNEL.1)]
    KernelTooOld {
        /// The running kernel's release.
        found: String,
    },
    /// A system call failed.
    #[error("{call}: {source}")]
    Syscall {
        /// The call's name.
        call: &'static str,
        /// The cause.
        #[source]
        source: nix::Error,
    },
}

/// The oldest kernel portgate runs on: 5.15 LTS. The helpers it needs arrived earlier
/// (ring buffer 5.8, atomic fetch-and-add and compare-and-exchange 5.12,
/// `bpf_for_each_map_elem` 5.13, cgroup bind and `sock_ops` hooks, BPF links for cgroups 5.7);
/// 5.15 is the oldest long-term release with all of them.
pub const MIN_KERNEL: (u32, u32) = (5, 15);

/// Fails when the running kernel is older than [`MIN_KERNEL`].
pub fn check_kernel() -> Result<(), SystemError> {
    let path = Path::new(paths::OS_RELEASE);
    let release = fs::read_to_string(path).map_err(|source| SystemError::Io {
        op: "reading",
        path: path.to_owned(),
        source,
    })?;
    let release = release.trim().to_owned();
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|part| part.parse::<u32>().unwrap_or(0));
    let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    if version < MIN_KERNEL {
        return Err(SystemError::KernelTooOld { found: release });
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

/// The first mount point of file-system type `fstype` in the mount table.
pub fn find_mount(fstype: &str) -> Result<Option<PathBuf>, SystemError> {
    let table = fs::read_to_string(paths::PROC_MOUNTS).map_err(|source| SystemError::Mounts {
        path: paths::PROC_MOUNTS,
        source,
    })?;
    Ok(table.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_device, mount_point, kind) = (fields.next()?, fields.next()?, fields.next()?);
        (kind == fstype).then(|| PathBuf::from(unescape_mount_path(mount_point)))
    }))
}

/// The mount table escapes space, tab, newline and backslash as octal.
fn unescape_mount_path(raw: &str) -> String {
    raw.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// The cgroup2 mount point (here `/sys/fs/cgroup/unified`, on most hosts `/sys/fs/cgroup`).
pub fn cgroup2_root() -> Result<PathBuf, SystemError> {
    find_mount("cgroup2")?.ok_or(SystemError::NoCgroup2)
}

/// A cgroup2 directory's id (its inode number) and level (depth below the mount).
pub fn cgroup_id_and_level(path: &Path) -> Result<(u64, u32), SystemError> {
    let root = cgroup2_root()?;
    let canonical = path.canonicalize().map_err(|source| SystemError::Io {
        op: "resolving",
        path: path.to_owned(),
        source,
    })?;
    let relative = canonical
        .strip_prefix(&root)
        .map_err(|_| SystemError::NotACgroup {
            path: path.to_owned(),
            root: root.clone(),
        })?;
    if !canonical.join("cgroup.procs").exists() {
        return Err(SystemError::NotACgroup {
            path: path.to_owned(),
            root,
        });
    }
    let meta = fs::metadata(&canonical).map_err(|source| SystemError::Io {
        op: "reading",
        path: canonical.clone(),
        source,
    })?;
    let level = u32::try_from(relative.components().count()).unwrap_or(u32::MAX);
    Ok((meta.ino(), level))
}

/// A cgroup2 directory as found by one open of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupInfo {
    /// The directory, with every symlink resolved.
    pub path: PathBuf,
    /// Its id (inode number).
    pub id: u64,
    /// Its depth below the cgroup2 mount.
    pub level: u32,
    /// The uid owning the directory (a cgroup delegated to a user is owned by it).
    pub owner_uid: u32,
}

/// Opens `path` once and reads everything about the cgroup from that open directory, so a
/// symlink swapped meanwhile cannot make the owner checked differ from the cgroup used.
pub fn cgroup_info(path: &Path) -> Result<CgroupInfo, SystemError> {
    let root = cgroup2_root()?;
    let not_a_cgroup = || SystemError::NotACgroup {
        path: path.to_owned(),
        root: root.clone(),
    };
    let dir = fs::File::open(path).map_err(|source| SystemError::Io {
        op: "opening",
        path: path.to_owned(),
        source,
    })?;
    let meta = dir.metadata().map_err(|source| SystemError::Io {
        op: "reading",
        path: path.to_owned(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(not_a_cgroup());
    }
    let fd_link = PathBuf::from(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&dir)
    ));
    let resolved = fs::read_link(&fd_link).map_err(|source| SystemError::Io {
        op: "resolving",
        path: path.to_owned(),
        source,
    })?;
    let relative = resolved.strip_prefix(&root).map_err(|_| not_a_cgroup())?;
    if !resolved.join("cgroup.procs").exists() {
        return Err(not_a_cgroup());
    }
    Ok(CgroupInfo {
        level: u32::try_from(relative.components().count()).unwrap_or(u32::MAX),
        path: resolved,
        id: meta.ino(),
        owner_uid: meta.uid(),
    })
}

/// The cgroup2 directory of a process, from `/proc/PID/cgroup`.
pub fn cgroup_of_pid(pid: u32) -> Result<PathBuf, SystemError> {
    let file = PathBuf::from(format!("/proc/{pid}/cgroup"));
    let text = fs::read_to_string(&file).map_err(|source| SystemError::Io {
        op: "reading",
        path: file.clone(),
        source,
    })?;
    let relative = text
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .ok_or_else(|| SystemError::NotACgroup {
            path: file,
            root: PathBuf::from("(cgroup v2)"),
        })?;
    Ok(cgroup2_root()?.join(relative.trim_start_matches('/')))
}

/// Makes sure bpffs is mounted at [`paths::BPFFS_MOUNT`] when `pin_dir` lies under it, and
/// creates `pin_dir`.
pub fn prepare_pin_dir(pin_dir: &Path) -> Result<(), SystemError> {
    let bpffs = Path::new(paths::BPFFS_MOUNT);
    if pin_dir.starts_with(bpffs) && !is_bpffs(bpffs)? {
        fs::create_dir_all(bpffs).map_err(|source| SystemError::Io {
            op: "creating",
            path: bpffs.to_owned(),
            source,
        })?;
        nix::mount::mount(
            Some("bpffs"),
            bpffs,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|source| SystemError::Syscall {
            call: "mount(bpffs)",
            source,
        })?;
    }
    fs::create_dir_all(pin_dir).map_err(|source| SystemError::Io {
        op: "creating",
        path: pin_dir.to_owned(),
        source,
    })
}

fn is_bpffs(path: &Path) -> Result<bool, SystemError> {
    let table = fs::read_to_string(paths::PROC_MOUNTS).map_err(|source| SystemError::Mounts {
        path: paths::PROC_MOUNTS,
        source,
    })?;
    Ok(table.lines().any(|line| {
        let mut fields = line.split_whitespace();
        matches!((fields.next(), fields.next(), fields.next()),
            (Some(_), Some(mount_point), Some("bpf")) if Path::new(mount_point) == path)
    }))
}

/// The inode of the calling thread's network namespace, which names it in pin paths.
pub fn current_netns_inode() -> Result<u64, SystemError> {
    fs::metadata(paths::THREAD_NETNS)
        .map(|meta| meta.ino())
        .map_err(|source| SystemError::Io {
            op: "reading",
            path: PathBuf::from(paths::THREAD_NETNS),
            source,
        })
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

/// `CLOCK_MONOTONIC` now, in nanoseconds: the clock of grant expiries and event times.
#[must_use]
pub fn monotonic_now_ns() -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available");
    u64::try_from(now.tv_sec()).unwrap_or(0) * 1_000_000_000
        + u64::try_from(now.tv_nsec()).unwrap_or(0)
}
