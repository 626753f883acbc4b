//! The cgroup2 hierarchy: where it is mounted, a directory's id, level and owner, and the
//! cgroup of a process.

use std::{
    fs,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use super::{HostError, mounts};

/// The cgroup2 mount point (here `/sys/fs/cgroup/unified`, on most hosts `/sys/fs/cgroup`).
pub fn root() -> Result<PathBuf, HostError> {
    mounts::find("cgroup2")?.ok_or(HostError::NoCgroup2)
}

/// A cgroup2 directory's id (its inode number) and level (depth below the mount).
pub fn id_and_level(path: &Path) -> Result<(u64, u32), HostError> {
    let root = root()?;
    let canonical = path
        .canonicalize()
        .map_err(HostError::io("resolving", path))?;
    let relative = canonical
        .strip_prefix(&root)
        .map_err(|_| HostError::NotACgroup {
            path: path.to_owned(),
            root: root.clone(),
        })?;
    if !canonical.join("cgroup.procs").exists() {
        return Err(HostError::NotACgroup {
            path: path.to_owned(),
            root,
        });
    }
    let meta = fs::metadata(&canonical).map_err(HostError::io("reading", &canonical))?;
    let level = u32::try_from(relative.components().count()).unwrap_or(u32::MAX);
    Ok((meta.ino(), level))
}

/// Whether the cgroup with id `id`, found at `path`, is gone: nothing is at `path` any more,
/// or something else is (a cgroup made again at the same path is another cgroup, with a
/// new id). `None` when that cannot be told (the path cannot be read for another reason).
///
/// One `stat(2)`, without reading the mount table, so that the daemon can ask it of every
/// owner cgroup often: `path` is the resolved path an [`info`] gave, and a cgroup2 id is
/// its directory's inode number, never reused while the system runs.
#[must_use]
pub fn is_gone(path: &Path, id: u64) -> Option<bool> {
    match fs::symlink_metadata(path) {
        Ok(meta) => Some(!meta.is_dir() || meta.ino() != id),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Some(true),
        Err(_) => None,
    }
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
pub fn info(path: &Path) -> Result<CgroupInfo, HostError> {
    let root = root()?;
    let not_a_cgroup = || HostError::NotACgroup {
        path: path.to_owned(),
        root: root.clone(),
    };
    let dir = fs::File::open(path).map_err(HostError::io("opening", path))?;
    let meta = dir.metadata().map_err(HostError::io("reading", path))?;
    if !meta.is_dir() {
        return Err(not_a_cgroup());
    }
    let fd_link = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
    let resolved = fs::read_link(&fd_link).map_err(HostError::io("resolving", path))?;
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
pub fn of_pid(pid: u32) -> Result<PathBuf, HostError> {
    let file = PathBuf::from(format!("/proc/{pid}/cgroup"));
    let text = fs::read_to_string(&file).map_err(HostError::io("reading", &file))?;
    let relative = text
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .ok_or_else(|| HostError::NotACgroup {
            path: file,
            root: PathBuf::from("(cgroup v2)"),
        })?;
    Ok(root()?.join(relative.trim_start_matches('/')))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::is_gone;

    #[test]
    fn a_directory_removed_or_made_again_is_gone() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("owner");
        std::fs::create_dir(&path).expect("make the directory");
        let id = std::fs::metadata(&path).expect("its inode").ino();
        assert_eq!(is_gone(&path, id), Some(false));
        assert_eq!(
            is_gone(&path, id + 1),
            Some(true),
            "another directory there"
        );
        std::fs::remove_dir(&path).expect("remove it");
        assert_eq!(is_gone(&path, id), Some(true));
        std::fs::write(&path, "").expect("a file where it was");
        assert_eq!(is_gone(&path, id), Some(true), "a file is not the cgroup");
    }
}
