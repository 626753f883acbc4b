//! What the kernel counted for a port, and the report that shows it with its policy.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{
    access::PortAccessControl,
    policy::DropReason,
    port::{PortId, PortStatus},
    spelling,
};

/// Drops by reason, with the spec's names as keys.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DropCounts {
    /// No allocation.
    pub unallocated: u64,
    /// Draining or Closed.
    pub draining: u64,
    /// Source not in the allowlist.
    pub not_allowed: u64,
    /// No unexpired grant.
    pub auth_required: u64,
    /// At `max_connections`.
    pub conn_limit: u64,
}

impl DropCounts {
    /// The count of one reason.
    #[must_use]
    pub const fn get(&self, reason: DropReason) -> u64 {
        match reason {
            DropReason::Unallocated => self.unallocated,
            DropReason::Draining => self.draining,
            DropReason::NotAllowed => self.not_allowed,
            DropReason::AuthRequired => self.auth_required,
            DropReason::ConnLimit => self.conn_limit,
        }
    }

    /// The count of one reason, to change it.
    pub const fn get_mut(&mut self, reason: DropReason) -> &mut u64 {
        match reason {
            DropReason::Unallocated => &mut self.unallocated,
            DropReason::Draining => &mut self.draining,
            DropReason::NotAllowed => &mut self.not_allowed,
            DropReason::AuthRequired => &mut self.auth_required,
            DropReason::ConnLimit => &mut self.conn_limit,
        }
    }
}

/// The specification's metrics of one port, as the kernel counts them over every hook.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PortMetrics {
    /// New connections let in.
    pub accepted: u64,
    /// Established TCP connections now.
    pub active: u64,
    /// Drops by reason.
    pub dropped: DropCounts,
    /// Refused binds.
    pub bind_denied: u64,
    /// Packets judged.
    pub packets: u64,
    /// Bytes judged.
    pub bytes: u64,
}

/// Counters with every field set (each its own number), for tests of what shows them.
#[cfg(test)]
pub(crate) fn sample_metrics() -> PortMetrics {
    PortMetrics {
        accepted: 1,
        active: 2,
        dropped: DropCounts {
            unallocated: 3,
            draining: 4,
            not_allowed: 5,
            auth_required: 6,
            conn_limit: 7,
        },
        bind_denied: 8,
        packets: 9,
        bytes: 10,
    }
}

/// A grant as shown to a person.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct GrantView {
    /// Source address granted.
    #[schema(value_type = String, example = "192.0.2.10")]
    pub addr: IpAddr,
    /// Milliseconds until it expires; 0 when expired.
    pub expires_in_ms: u64,
}

/// One port's live state in the kernel: policy, allowlist, grants, counters and active
/// connections (what `portgate maps` and `GET /v1/stats` show).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PortReport {
    /// The port (keys `port`, `proto`, and `netns`, the namespace's cookie, when it is
    /// not the host's).
    #[serde(flatten, with = "spelling::PortIdFields")]
    #[schema(value_type = spelling::PortIdFields)]
    pub id: PortId,
    /// The host port it is published on (the kernel judges that host port as this one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(maximum = 65535)]
    pub published: Option<u16>,
    /// Status; `available` for a managed port without policy that still has counters.
    pub status: PortStatus,
    /// Its access control (keys `allow`, `max_connections`, `require_auth`).
    #[serde(flatten, with = "spelling::AccessFields")]
    #[schema(value_type = spelling::AccessFields)]
    pub access: PortAccessControl,
    /// Owner cgroup id; `None` when anyone may bind.
    pub owner_cgroup: Option<u64>,
    /// Unexpired and expired grants.
    pub grants: Vec<GrantView>,
    /// Counters and active connections (keys `accepted`, `active`, `dropped`,
    /// `bind_denied`, `packets`, `bytes`).
    #[serde(flatten)]
    pub counters: PortMetrics,
}
