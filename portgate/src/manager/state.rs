//! The manager's typed records: what a port is, who holds it, under which policy.
//!
//! An [`Allocation`] is what the store keeps, one record per allocated (port, protocol);
//! [`PortState`] is the specification's view of one port.

use std::{fmt, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use crate::policy::{Allowlist, OwnerCgroup, PortPolicy};
pub use crate::policy::{PortStatus, Protocol};

/// One managed port of one protocol: what allocations, policies and counters are keyed by.
///
/// A bare port number means TCP (`--proto` defaults to tcp wherever a port is named).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PortId {
    /// The port number.
    pub port: u16,
    /// The transport protocol.
    pub protocol: Protocol,
}

impl PortId {
    /// (port, protocol).
    #[must_use]
    pub const fn new(port: u16, protocol: Protocol) -> Self {
        Self { port, protocol }
    }
}

impl From<u16> for PortId {
    fn from(port: u16) -> Self {
        Self::new(port, Protocol::Tcp)
    }
}

impl From<(u16, Protocol)> for PortId {
    fn from((port, protocol): (u16, Protocol)) -> Self {
        Self::new(port, protocol)
    }
}

impl fmt::Display for PortId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.port, self.protocol)
    }
}

/// The specification's access control of a port.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortAccessControl {
    /// Source prefixes allowed to connect; empty allows every source.
    pub allowed_ips: Allowlist,
    /// Most TCP connections at once; 0 is unlimited.
    pub max_connections: u32,
    /// New connections need an unexpired authentication grant for their source.
    pub require_authentication: bool,
}

/// The cgroup that owns a port (it and its descendants may bind it), as given and as the
/// kernel knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerCgroupRef {
    /// The cgroup2 directory.
    pub path: PathBuf,
    /// Its id (inode number) and level.
    pub cgroup: OwnerCgroup,
}

/// Who made an allocation: the name it was given and the local user that asked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// The owner's name (a service, tenant or container).
    pub name: String,
    /// The uid of the API caller that made the allocation; `None` when made in-process.
    pub uid: Option<u32>,
    /// The owner's cgroup, when bind ownership is enforced.
    pub cgroup: Option<OwnerCgroupRef>,
}

/// Milliseconds since the Unix epoch: the store's clock, so timers survive restarts.
pub type UnixMillis = u64;

/// The current wall-clock time in [`UnixMillis`].
#[must_use]
pub fn now_millis() -> UnixMillis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
        })
}

/// `millis` plus `duration`, saturating.
#[must_use]
pub fn add_duration(millis: UnixMillis, duration: Duration) -> UnixMillis {
    millis.saturating_add(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX))
}

/// One allocated (port, protocol): the durable record the store keeps.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    /// The port and protocol.
    pub id: PortId,
    /// Who holds it.
    pub owner: Owner,
    /// Its access control.
    pub access: PortAccessControl,
    /// Active, Draining or Closed (an Available port has no allocation).
    pub status: PortStatus,
    /// When it was allocated.
    pub allocated_at: UnixMillis,
    /// The lease length, when the allocation has one.
    #[serde(with = "humantime_serde", default)]
    pub ttl: Option<Duration>,
    /// When the lease runs out (Active goes Draining then).
    pub lease_expires_at: Option<UnixMillis>,
    /// When it went Draining.
    pub draining_since: Option<UnixMillis>,
    /// When it went Closed; it becomes Available once quarantine has passed.
    pub closed_at: Option<UnixMillis>,
}

impl Allocation {
    /// The kernel policy this allocation asks for.
    #[must_use]
    pub fn policy(&self) -> PortPolicy {
        PortPolicy {
            status: self.status,
            allow: self.access.allowed_ips.clone(),
            max_connections: self.access.max_connections,
            require_authentication: self.access.require_authentication,
            owner: self.owner.cgroup.as_ref().map(|owner| owner.cgroup),
        }
    }
}

/// The specification's state of one port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortState {
    /// The port and protocol.
    pub port: PortId,
    /// Available, Active, Draining or Closed.
    pub status: PortStatus,
    /// When it was allocated (`None` when Available).
    pub allocated_at: Option<UnixMillis>,
    /// Its owner's name (`None` when Available).
    pub owner: Option<String>,
    /// Connections open now (from the kernel; 0 without it).
    pub connections: u64,
}
