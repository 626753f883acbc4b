//! What the kernel enforces for a port, and why it drops a packet.

use std::fmt;

use portgate_common::reason;
use serde::{Deserialize, Serialize};

use super::{access::PortAccessControl, owner::OwnerCgroup, port::PortStatus};

/// A port's policy: what the kernel enforces for one port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortPolicy {
    /// Active, Draining or Closed (Available ports have no policy).
    pub status: PortStatus,
    /// Who may connect.
    pub access: PortAccessControl,
    /// Who may bind the port; `None` lets anyone bind it.
    pub owner: Option<OwnerCgroup>,
    /// Which allocation of the port this is (see [`crate::model::Allocation::policy`]):
    /// the kernel counts each epoch's connection slots apart, so connections left from an
    /// earlier allocation never count against a later one's `max_connections`.
    #[serde(default)]
    pub epoch: u32,
    /// The host port (in the host's namespace) that a container runtime forwards to this
    /// one with DNAT: the kernel judges and counts the connections XDP sees there as this
    /// port's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published: Option<u16>,
}

impl Default for PortPolicy {
    fn default() -> Self {
        Self {
            status: PortStatus::Active,
            access: PortAccessControl::default(),
            owner: None,
            epoch: 0,
            published: None,
        }
    }
}

impl From<PortAccessControl> for PortPolicy {
    /// An Active port with `access` and no owner cgroup.
    fn from(access: PortAccessControl) -> Self {
        Self {
            access,
            ..Self::default()
        }
    }
}

/// Why the gate dropped a packet; the codes are [`portgate_common::reason`]'s.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// The port is managed but not allocated.
    Unallocated,
    /// The port is Draining or Closed.
    Draining,
    /// The source is not in the allowlist.
    NotAllowed,
    /// No unexpired grant for the source.
    AuthRequired,
    /// The port holds `max_connections` already.
    ConnLimit,
}

impl DropReason {
    /// Every reason, in code order.
    pub const ALL: [Self; reason::DROP_COUNT] = [
        Self::Unallocated,
        Self::Draining,
        Self::NotAllowed,
        Self::AuthRequired,
        Self::ConnLimit,
    ];

    /// The stable numeric code.
    #[must_use]
    pub const fn code(self) -> u8 {
        match self {
            Self::Unallocated => reason::UNALLOCATED,
            Self::Draining => reason::DRAINING,
            Self::NotAllowed => reason::NOT_ALLOWED,
            Self::AuthRequired => reason::AUTH_REQUIRED,
            Self::ConnLimit => reason::CONN_LIMIT,
        }
    }

    /// The reason of a code.
    #[must_use]
    pub const fn from_code(code: u8) -> Option<Self> {
        match code {
            reason::UNALLOCATED => Some(Self::Unallocated),
            reason::DRAINING => Some(Self::Draining),
            reason::NOT_ALLOWED => Some(Self::NotAllowed),
            reason::AUTH_REQUIRED => Some(Self::AuthRequired),
            reason::CONN_LIMIT => Some(Self::ConnLimit),
            _ => None,
        }
    }

    /// The name used in JSON, metrics and messages.
    #[must_use]
    pub const fn name(self) -> &'static str {
        reason::name(self.code())
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
