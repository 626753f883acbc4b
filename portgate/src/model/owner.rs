//! Who holds a port.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Who made an allocation: the name it was given, the local user that asked, and the
/// cgroup that may bind the port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// The owner's name (a service, tenant or container).
    pub name: String,
    /// The uid of the API caller that made the allocation; `None` when made in-process.
    pub uid: Option<u32>,
    /// The owner's cgroup, when bind ownership is enforced.
    pub cgroup: Option<OwnerCgroup>,
}

impl Owner {
    /// An owner called `name`, made in-process, without a cgroup.
    #[must_use]
    pub fn named(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            uid: None,
            cgroup: None,
        }
    }
}

/// The cgroup that owns a port: only it and its descendants may bind the port.
///
/// The kernel knows it by `id` and `level`; people by its `path`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "StoredOwnerCgroup", into = "StoredOwnerCgroup")]
pub struct OwnerCgroup {
    /// The cgroup2 directory, every symlink resolved.
    pub path: PathBuf,
    /// cgroup id: the inode number of the directory.
    pub id: u64,
    /// Depth below the cgroup2 root (the root is level 0).
    pub level: u32,
}

/// How an [`OwnerCgroup`] is written in the store: the path, and the kernel's identity
/// nested beside it (the layout of store schema 1).
#[derive(Serialize, Deserialize)]
struct StoredOwnerCgroup {
    path: PathBuf,
    cgroup: StoredCgroupId,
}

#[derive(Serialize, Deserialize)]
struct StoredCgroupId {
    id: u64,
    level: u32,
}

impl From<StoredOwnerCgroup> for OwnerCgroup {
    fn from(stored: StoredOwnerCgroup) -> Self {
        Self {
            path: stored.path,
            id: stored.cgroup.id,
            level: stored.cgroup.level,
        }
    }
}

impl From<OwnerCgroup> for StoredOwnerCgroup {
    fn from(owner: OwnerCgroup) -> Self {
        Self {
            path: owner.path,
            cgroup: StoredCgroupId {
                id: owner.id,
                level: owner.level,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_owner_cgroup_is_stored_in_schema_1s_layout() {
        let owner = OwnerCgroup {
            path: "/sys/fs/cgroup/web.slice".into(),
            id: 4242,
            level: 1,
        };
        let text = serde_json::to_string(&owner).unwrap();
        assert_eq!(
            text,
            r#"{"path":"/sys/fs/cgroup/web.slice","cgroup":{"id":4242,"level":1}}"#
        );
        assert_eq!(serde_json::from_str::<OwnerCgroup>(&text).unwrap(), owner);
    }
}
