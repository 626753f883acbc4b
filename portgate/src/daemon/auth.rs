//! Who is calling: the peer credentials of the API socket, and the admin group.

use nix::unistd::{Gid, Group, Uid, User};
use tokio::net::UnixStream;

use crate::manager::Actor;

/// The caller at the other end of an API connection (`SO_PEERCRED`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    /// uid, `None` when the kernel could not tell (treated as nobody's: no rights).
    pub uid: Option<u32>,
    /// Primary gid.
    pub gid: Option<u32>,
    /// pid.
    pub pid: Option<i32>,
}

impl Peer {
    /// A caller whose credentials are unknown: it has no rights.
    #[must_use]
    pub const fn nobody() -> Self {
        Self {
            uid: None,
            gid: None,
            pid: None,
        }
    }
}

impl Peer {
    /// The peer at the other end of an API connection, as the kernel tells it.
    #[must_use]
    pub fn of(stream: &UnixStream) -> Self {
        match stream.peer_cred() {
            Ok(cred) => Self {
                uid: Some(cred.uid()),
                gid: Some(cred.gid()),
                pid: cred.pid(),
            },
            Err(err) => {
                log::warn!("peer credentials of an API connection: {err}");
                Self::nobody()
            }
        }
    }
}

/// The admin group: its members (and root) may do everything.
#[derive(Clone, Debug)]
pub struct AdminGroup {
    name: String,
    gid: Option<Gid>,
}

impl AdminGroup {
    /// Looks the group up; a missing group leaves root as the only admin (logged).
    #[must_use]
    pub fn resolve(name: &str) -> Self {
        let gid = match Group::from_name(name) {
            Ok(Some(group)) => Some(group.gid),
            Ok(None) => {
                log::warn!(
                    "admin group {name:?} does not exist: only root is admin (create it with `groupadd {name}`)"
                );
                None
            }
            Err(err) => {
                log::warn!("looking up admin group {name:?}: {err}; only root is admin");
                None
            }
        };
        Self {
            name: name.to_owned(),
            gid,
        }
    }

    /// The group's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The group's id, when it exists.
    #[must_use]
    pub const fn gid(&self) -> Option<Gid> {
        self.gid
    }

    /// What `peer` may do: root and members of the group (primary or listed) are admins.
    /// The group database is read at each call, so membership changes apply at once.
    #[must_use]
    pub fn actor(&self, peer: &Peer) -> Option<Actor> {
        let uid = peer.uid?;
        if uid == 0 {
            return Some(Actor::Admin);
        }
        let Some(gid) = self.gid else {
            return Some(Actor::User(uid));
        };
        if peer.gid == Some(gid.as_raw()) {
            return Some(Actor::Admin);
        }
        let member = match (User::from_uid(Uid::from_raw(uid)), Group::from_gid(gid)) {
            (Ok(Some(user)), Ok(Some(group))) => user.gid == gid || group.mem.contains(&user.name),
            _ => false,
        };
        Some(if member {
            Actor::Admin
        } else {
            Actor::User(uid)
        })
    }
}
