//! Where a request puts a port: the cgroup that owns it and the network namespace it is in,
//! found from what the request names (a cgroup, a process, a container or pod, a namespace
//! path).

use std::path::{Path, PathBuf};

use super::{ApiError, ApiResult};
use crate::{
    api::OwnerSpec,
    host::{self, containers, netns},
    manager::{Actor, PortError},
    model::{NetnsId, NetnsInfo, NetnsRef, OwnerCgroup},
};

/// What a request names, once found.
#[derive(Debug, Default)]
pub(super) struct Placement {
    /// The namespace, when it is not the host's.
    pub netns: Option<NetnsRef>,
    /// The owner cgroup, when one is named.
    pub owner: Option<OwnerCgroup>,
}

/// Finds the owner cgroup and the namespace `spec` names, once its shape checks out
/// ([`OwnerSpec::check`]: at most one of `cgroup`, `pid` and `container` names the owner;
/// `netns` names the namespace only beside `cgroup` or alone, a process and a container
/// having their own). Only an admin may name a namespace other than the host's.
pub(super) fn resolve(spec: &OwnerSpec, actor: Actor) -> ApiResult<Placement> {
    spec.check().map_err(|message| invalid(&message))?;
    let (cgroup, found_netns) = match (&spec.cgroup, spec.pid, &spec.container) {
        (Some(path), _, _) => (Some(path.clone()), None),
        (None, Some(pid), _) => {
            let cgroup = host::cgroups::of_pid(pid).map_err(|err| {
                invalid(&format!(
                    "the cgroup of process {pid} could not be found ({err}): give a running process of this host's pid namespace, or --cgroup"
                ))
            })?;
            let (path, found) = netns::of_pid(pid).map_err(|err| {
                invalid(&format!("the network namespace of process {pid}: {err}"))
            })?;
            (Some(cgroup), Some((path, found)))
        }
        (None, None, Some(id)) => {
            let (cgroup, found) = container(id)?;
            (Some(cgroup), found)
        }
        (None, None, None) => (None, None),
    };
    let found_netns = match (found_netns, &spec.netns) {
        (Some(found), _) => Some(found),
        (None, Some(path)) => Some((
            path.clone(),
            netns::open(path).map_err(|err| invalid(&err.to_string()))?,
        )),
        (None, None) => None,
    };
    let netns = match found_netns {
        Some((path, found)) => not_the_hosts(path, found)?,
        None => None,
    };
    if netns.is_some() && actor != Actor::Admin {
        return Err(ApiError::Port(PortError::AccessDenied(
            "only an admin may place a port in another network namespace than the host's: ask an admin to allocate it".to_owned(),
        )));
    }
    let owner = match cgroup {
        Some(path) => Some(owner_cgroup(&path, actor)?),
        None => None,
    };
    Ok(Placement { netns, owner })
}

/// The cgroup of container or pod `id`, and its namespace (through a process in it; none
/// when it has no process, as between a pod's containers starting).
fn container(id: &str) -> ApiResult<(PathBuf, Option<(PathBuf, netns::Netns)>)> {
    let root = host::cgroups::root()
        .map_err(|err| ApiError::Port(PortError::host("finding the cgroup2 mount", err)))?;
    let found = containers::find(&root, id).map_err(|err| invalid(&err.to_string()))?;
    let pid = containers::any_pid(&found.cgroup)
        .map_err(|err| invalid(&format!("the processes of container {id}: {err}")))?
        .ok_or_else(|| {
            invalid(&format!(
                "{} {} has no running process, so its network namespace cannot be found: start it first",
                found.runtime, found.id
            ))
        })?;
    let (path, mut found_netns) = netns::of_pid(pid)
        .map_err(|err| invalid(&format!("the network namespace of container {id}: {err}")))?;
    // Named by the container, shown by its id (rather than a runtime's name for it under
    // /run/netns, such as podman's `netns-<uuid>`).
    found_netns.label = short_id(&found.id);
    Ok((found.cgroup, Some((path, found_netns))))
}

/// A container id as people see it: docker's and podman's 12 characters; a pod's uid whole.
fn short_id(id: &str) -> String {
    if id.len() == 64 && id.bytes().all(|byte| byte.is_ascii_hexdigit()) {
        id[..12].to_owned()
    } else {
        id.to_owned()
    }
}

/// `None` when `found` is the daemon's own namespace (the host's), else its reference.
pub(super) fn not_the_hosts(path: PathBuf, found: netns::Netns) -> ApiResult<Option<NetnsRef>> {
    let own = netns::host()
        .map_err(|err| ApiError::Port(PortError::host("reading the daemon's namespace", err)))?;
    if found.cookie == own.cookie {
        return Ok(None);
    }
    Ok(Some(NetnsRef {
        id: NetnsId(found.cookie),
        info: NetnsInfo {
            label: found.label,
            inode: found.inode,
        },
        path,
    }))
}

/// The owner cgroup at `path`; a user may name only a cgroup delegated to them.
fn owner_cgroup(path: &Path, actor: Actor) -> ApiResult<OwnerCgroup> {
    // One open of the directory gives the owner, id and level together (no symlink race).
    let info = host::cgroups::info(path);
    if let Actor::User(uid) = actor {
        // The same answer whatever the reason, so that it does not tell which paths exist.
        if !info.as_ref().is_ok_and(|info| info.owner_uid == uid) {
            return Err(ApiError::Port(PortError::AccessDenied(format!(
                "{} is not a cgroup delegated to uid {uid}: name a cgroup directory you own, or ask an admin to allocate",
                path.display()
            ))));
        }
    }
    let info = info.map_err(|err| invalid(&format!("{err}: give a cgroup2 directory")))?;
    Ok(OwnerCgroup {
        path: info.path,
        id: info.id,
        level: info.level,
    })
}

fn invalid(message: &str) -> ApiError {
    ApiError::Port(PortError::InvalidPortRequest(message.to_owned()))
}
