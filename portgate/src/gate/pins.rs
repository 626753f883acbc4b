//! The links a running daemon holds, so that its pins are not what keeps the gate attached
//! while it runs, and puts back when they are removed under it.
//!
//! A link pinned in bpffs stays attached while its pin or any file descriptor on it
//! exists. A gate that only pinned its links would be detached, and every port open, the
//! moment someone removes the pin directory (`rm -rf /sys/fs/bpf/portgate`). So a daemon's
//! [`Gate`] holds a descriptor on each of its maps and links as well (`Held`), and
//! [`Gate::restore_pins`] pins again, from what this
//! process holds, every map and link whose pin is gone, so that the next daemon (and the
//! CLI's inspection) finds them.
//!
//! aya 0.14 lends no descriptor of its links (`FdLink` has no `AsFd`), so this module gets
//! and pins them with the `bpf()` syscall itself: `BPF_OBJ_GET`, `BPF_OBJ_PIN`, and
//! `BPF_OBJ_GET_INFO_BY_FD` to see whether a cgroup link is still attached to a cgroup.

use std::{
    collections::BTreeMap,
    ffi::CString,
    fs, io,
    os::{
        fd::{AsFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    },
    path::{Path, PathBuf},
};

use aya_obj::generated::{bpf_attr, bpf_cmd, bpf_link_info, bpf_link_type};

use super::{
    CGROUP_LINKS, Gate, GateError, SKB_LINK, SKB_SK_LINK,
    batch::{bpf, raw_fd},
    paths,
};
use crate::host::{self, HostError};

/// Descriptors on the gate's pinned objects, by path under the pin directory
/// (`maps/PG_POLICY`, `links/sock_ops`, ...).
#[derive(Debug, Default)]
pub(super) struct Held(BTreeMap<PathBuf, OwnedFd>);

/// What [`Gate::restore_pins`] pinned again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PinsRestored {
    /// Maps pinned again.
    pub maps: usize,
    /// Links pinned again.
    pub links: usize,
    /// Whether the pin directory itself had to be made again.
    pub dir: bool,
}

impl PinsRestored {
    /// Whether anything was missing.
    #[must_use]
    pub const fn any(&self) -> bool {
        self.maps > 0 || self.links > 0 || self.dir
    }
}

/// The gate's cgroup links, as [`Gate::cgroup_links`] finds them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CgroupLinks {
    /// Links the kernel detached because their cgroup was removed.
    pub detached: Vec<String>,
    /// Links attached to another cgroup than the one asked about (by its id).
    pub elsewhere: Vec<(String, u64)>,
}

impl CgroupLinks {
    /// Whether every cgroup link is attached to the cgroup asked about.
    #[must_use]
    pub fn attached(&self) -> bool {
        self.detached.is_empty() && self.elsewhere.is_empty()
    }
}

/// The pin names of the gate's cgroup links.
fn is_cgroup_link(name: &str) -> bool {
    name == SKB_LINK || name == SKB_SK_LINK || CGROUP_LINKS.iter().any(|(_, link)| *link == name)
}

impl Gate {
    /// Holds a descriptor on every pinned map and link of this gate not held yet, so that
    /// removing a pin detaches or frees nothing while this handle lives.
    pub(super) fn hold_pins(&mut self) -> Result<(), GateError> {
        for sub in [paths::MAPS_SUBDIR, paths::LINKS_SUBDIR] {
            let dir = self.pin_dir.join(sub);
            let entries = fs::read_dir(&dir).map_err(HostError::io("listing", &dir))?;
            for entry in entries {
                let entry = entry.map_err(HostError::io("listing", &dir))?;
                let relative = Path::new(sub).join(entry.file_name());
                if self.held.0.contains_key(&relative) {
                    continue;
                }
                let path = entry.path();
                let fd = obj_get(&path).map_err(HostError::io("opening the pin", &path))?;
                self.held.0.insert(relative, fd);
            }
        }
        Ok(())
    }

    /// Pins again, from the descriptors this handle holds, every map and link whose pin
    /// is gone (the pin directory removed, or a file in it), making the directories (and
    /// mounting bpffs) as needed. Enforcement never stopped: the held descriptors kept the
    /// programs attached; this is for the next daemon and the CLI, which find the gate by
    /// its pins.
    pub fn restore_pins(&mut self) -> Result<PinsRestored, GateError> {
        let mut restored = PinsRestored::default();
        let dirs = [paths::MAPS_SUBDIR, paths::LINKS_SUBDIR].map(|sub| self.pin_dir.join(sub));
        if dirs.iter().any(|dir| !dir.is_dir()) {
            restored.dir = !self.pin_dir.is_dir();
            host::mounts::prepare_pin_dir(&self.pin_dir)?;
            for dir in &dirs {
                fs::create_dir_all(dir).map_err(HostError::io("creating", dir))?;
            }
        }
        for (relative, fd) in &self.held.0 {
            let path = self.pin_dir.join(relative);
            if path.symlink_metadata().is_ok() {
                continue;
            }
            obj_pin(fd.as_fd(), &path).map_err(HostError::io("pinning again", &path))?;
            if relative.starts_with(paths::MAPS_SUBDIR) {
                restored.maps += 1;
            } else {
                restored.links += 1;
            }
        }
        Ok(restored)
    }

    /// Where the gate's cgroup links are attached, against the cgroup2 directory
    /// `cgroup`: detached ones (their cgroup was removed) and ones attached elsewhere
    /// (`cgroup` was removed and made again: a new cgroup with the same path).
    pub fn cgroup_links(&self, cgroup: &Path) -> Result<CgroupLinks, GateError> {
        // A cgroup2 directory's inode number is the cgroup's id.
        let wanted = fs::metadata(cgroup).ok().map(|meta| meta.ino());
        let mut links = CgroupLinks::default();
        for (relative, fd) in &self.held.0 {
            let Ok(name) = relative.strip_prefix(paths::LINKS_SUBDIR) else {
                continue;
            };
            let name = name.to_string_lossy();
            if !is_cgroup_link(&name) {
                continue;
            }
            let path = self.pin_dir.join(relative);
            match link_cgroup_id(fd.as_fd()).map_err(HostError::io("reading the link", &path))? {
                None => links.detached.push(name.into_owned()),
                Some(id) if Some(id) != wanted => links.elsewhere.push((name.into_owned(), id)),
                Some(_) => {}
            }
        }
        Ok(links)
    }

    /// Attaches the cgroup programs to `cgroup` again after their links were detached
    /// or left on a removed cgroup ([`Gate::cgroup_links`]): lets go of the old links,
    /// removes their pins, and attaches anew.
    pub fn reattach_cgroup(&mut self, cgroup: &Path) -> Result<(), GateError> {
        let old: Vec<PathBuf> = self
            .held
            .0
            .keys()
            .filter(|relative| {
                relative
                    .strip_prefix(paths::LINKS_SUBDIR)
                    .is_ok_and(|name| is_cgroup_link(&name.to_string_lossy()))
            })
            .cloned()
            .collect();
        for relative in old {
            self.held.0.remove(&relative);
            let path = self.pin_dir.join(&relative);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(HostError::io("unpinning", &path)(source).into()),
            }
        }
        self.attach_cgroup(cgroup)
    }
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path with a NUL byte"))
}

/// A new descriptor on the object pinned at `path` (`BPF_OBJ_GET`).
fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let path = c_path(path)?;
    // SAFETY: bpf_attr is a plain C union of integers; all zero is its empty value.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: writing the object-pinning member of the union, as BPF_OBJ_GET reads it.
    let obj = unsafe { &mut attr.__bindgen_anon_4 };
    obj.pathname = path.as_ptr() as u64;
    // SAFETY: the path is a NUL-terminated string that outlives the call.
    let fd = unsafe { bpf(bpf_cmd::BPF_OBJ_GET, &mut attr) }?;
    let fd = i32::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: BPF_OBJ_GET returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Pins the object behind `fd` at `path` (`BPF_OBJ_PIN`).
fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let path = c_path(path)?;
    let raw_fd = raw_fd(fd)?;
    // SAFETY: bpf_attr is a plain C union of integers; all zero is its empty value.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: writing the object-pinning member of the union, as BPF_OBJ_PIN reads it.
    let obj = unsafe { &mut attr.__bindgen_anon_4 };
    obj.pathname = path.as_ptr() as u64;
    obj.bpf_fd = raw_fd;
    // SAFETY: the path is a NUL-terminated string that outlives the call.
    unsafe { bpf(bpf_cmd::BPF_OBJ_PIN, &mut attr) }.map(drop)
}

/// The id of the cgroup a cgroup link is attached to: `None` once the kernel detached it
/// (its cgroup was removed), or for a link of another kind.
fn link_cgroup_id(fd: BorrowedFd<'_>) -> io::Result<Option<u64>> {
    // SAFETY: bpf_link_info is plain C data; all zero is its empty value.
    let mut info: bpf_link_info = unsafe { std::mem::zeroed() };
    let raw_fd = raw_fd(fd)?;
    // SAFETY: bpf_attr is a plain C union of integers; all zero is its empty value.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: writing the info member of the union, as BPF_OBJ_GET_INFO_BY_FD reads it.
    let query = unsafe { &mut attr.info };
    query.bpf_fd = raw_fd;
    query.info_len = u32::try_from(std::mem::size_of::<bpf_link_info>())
        .map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?;
    query.info = std::ptr::from_mut(&mut info) as u64;
    // SAFETY: `info` is as large as `info_len` says and outlives the call.
    unsafe { bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr) }?;
    if info.type_ != bpf_link_type::BPF_LINK_TYPE_CGROUP as u32 {
        return Ok(None);
    }
    // SAFETY: the kernel filled in the cgroup member for a cgroup link.
    let cgroup_id = unsafe { info.__bindgen_anon_1.cgroup.cgroup_id };
    Ok((cgroup_id != 0).then_some(cgroup_id))
}
