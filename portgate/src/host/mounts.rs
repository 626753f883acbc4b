//! The mount table (`/proc/self/mounts`), and the bpffs mount the pin directory needs.

use std::{
    fs,
    path::{Path, PathBuf},
};

use super::HostError;
use crate::paths;

/// The first mount point of file-system type `fstype` in the mount table.
pub fn find(fstype: &str) -> Result<Option<PathBuf>, HostError> {
    let table = read_table()?;
    Ok(table.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_device, mount_point, kind) = (fields.next()?, fields.next()?, fields.next()?);
        (kind == fstype).then(|| PathBuf::from(unescape_path(mount_point)))
    }))
}

/// The mount table escapes space, tab, newline and backslash as octal.
fn unescape_path(raw: &str) -> String {
    raw.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// Makes sure bpffs is mounted at [`paths::BPFFS_MOUNT`] when `pin_dir` lies under it, and
/// creates `pin_dir`.
pub fn prepare_pin_dir(pin_dir: &Path) -> Result<(), HostError> {
    let bpffs = Path::new(paths::BPFFS_MOUNT);
    if pin_dir.starts_with(bpffs) && !is_bpffs(bpffs)? {
        fs::create_dir_all(bpffs).map_err(HostError::io("creating", bpffs))?;
        nix::mount::mount(
            Some("bpffs"),
            bpffs,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|source| HostError::Syscall {
            call: "mount(bpffs)",
            source,
        })?;
    }
    fs::create_dir_all(pin_dir).map_err(HostError::io("creating", pin_dir))
}

fn is_bpffs(path: &Path) -> Result<bool, HostError> {
    let table = read_table()?;
    Ok(table.lines().any(|line| {
        let mut fields = line.split_whitespace();
        matches!((fields.next(), fields.next(), fields.next()),
            (Some(_), Some(mount_point), Some("bpf")) if Path::new(mount_point) == path)
    }))
}

fn read_table() -> Result<String, HostError> {
    fs::read_to_string(paths::PROC_MOUNTS).map_err(|source| HostError::Mounts {
        path: paths::PROC_MOUNTS,
        source,
    })
}
