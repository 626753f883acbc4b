//! A small tmpfs for one test: a disk that fills up, or that is made read-only.

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
};

use nix::mount::{MntFlags, MsFlags};

/// A tmpfs mounted for one test; unmounted when dropped, even when the test fails (lazily,
/// so that a daemon still holding a file in it cannot keep it mounted).
pub struct Tmpfs {
    path: PathBuf,
    /// The temporary directory it is mounted on, when it made one: removed after the
    /// unmount.
    _dir: Option<tempfile::TempDir>,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` bytes (mode 0700, as the daemon makes its directories) on
    /// `path`, made when missing.
    pub fn mount(path: &Path, size: u64) -> Self {
        fs::create_dir_all(path).expect("the mount point");
        Self::mount_on(path, size);
        Self {
            path: path.to_owned(),
            _dir: None,
        }
    }

    /// Mounts a tmpfs of `size` bytes on a new temporary directory.
    pub fn in_temp_dir(size: u64) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("portgate-test-tmpfs-")
            .tempdir()
            .expect("temporary directory");
        Self::mount_on(dir.path(), size);
        Self {
            path: dir.path().to_owned(),
            _dir: Some(dir),
        }
    }

    fn mount_on(path: &Path, size: u64) {
        nix::mount::mount(
            Some("tmpfs"),
            path,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(format!("size={size},mode=0700").as_str()),
        )
        .unwrap_or_else(|err| panic!("mounting a tmpfs on {}: {err}", path.display()));
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Remounts it read-only or read-write; the kernel's refusal as text.
    pub fn remount(&self, read_only: bool) -> Result<(), String> {
        let mut flags = MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        if read_only {
            flags |= MsFlags::MS_RDONLY;
        }
        nix::mount::mount(None::<&str>, &self.path, None::<&str>, flags, None::<&str>)
            .map_err(|err| err.to_string())
    }

    /// Fills it: a file written until the disk refuses more. Returns the file and how many
    /// bytes it took.
    pub fn fill(&self) -> (PathBuf, u64) {
        let path = self.path.join("filler");
        let mut file = fs::File::create(&path).expect("create the filler");
        let block = vec![0xa5_u8; 4096];
        let mut bytes = 0_u64;
        while let Ok(written) = file.write(&block) {
            if written == 0 {
                break;
            }
            bytes += written as u64;
        }
        (path, bytes)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if let Err(err) = nix::mount::umount2(&self.path, MntFlags::MNT_DETACH) {
            eprintln!("clean-up: unmounting {}: {err}", self.path.display());
        }
    }
}
