//! The local API's wire types: HTTP + JSON over the daemon's Unix socket. The daemon
//! serves them ([`crate::daemon`]); the CLI sends them ([`crate::client`]).
//!
//! Routes (all JSON; `proto` defaults to tcp):
//! - `POST /v1/ports` [`AllocRequest`] → 201 [`AllocationView`]
//! - `GET /v1/ports` → `[AllocationView]`; `GET /v1/ports/{port}?proto=` → [`AllocationView`]
//! - `DELETE /v1/ports/{port}?proto=` (release), `POST /v1/ports/{port}/drain?proto=`,
//!   `POST /v1/ports/{port}/renew?proto=` [`RenewRequest`] → [`AllocationView`]
//! - `PATCH /v1/ports/{port}/access?proto=` [`crate::manager::AccessChange`] → [`AllocationView`]
//! - `POST /v1/ports/{port}/grants?proto=` [`GrantRequest`] → 204
//! - `GET /v1/ports/{port}/check?ip=&proto=` → [`CheckResponse`]
//! - `GET /v1/stats[?port=&proto=]` → `[PortReport]` (the keys of `portgate maps`)
//! - `GET /v1/events[?follow=true]` → [`EventView`] JSON lines
//! - `GET /v1/status` → [`StatusView`]; `GET /metrics` → Prometheus text
//!
//! Errors answer a 4xx/5xx status with [`ErrorBody`].

use std::{net::IpAddr, path::PathBuf, time::Duration};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{
    gate::DenyEventRecord,
    host::sockets::Listener,
    manager::{Allocation, ErrorCategory, PortError, PortId, PortStatus, Protocol, UnixMillis},
};

/// The most bytes a request body may have (an allowlist of 10,000 IPv6 prefixes fits).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// `POST /v1/ports`: what `portgate alloc` asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllocRequest {
    /// Owner name.
    pub owner: String,
    /// A specific port; any free one when absent.
    #[serde(default)]
    pub port: Option<u16>,
    /// Protocol (tcp when absent).
    #[serde(default)]
    pub proto: Option<Protocol>,
    /// The owner's cgroup2 directory (bind ownership).
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
    /// A process whose cgroup owns the port.
    #[serde(default)]
    pub pid: Option<u32>,
    /// Allowed source prefixes; empty allows every source.
    #[serde(default)]
    pub allow: Vec<IpNet>,
    /// Connection limit (0 or absent: unlimited). `max_connections` is accepted too, as
    /// in the access change.
    #[serde(default, alias = "max_connections")]
    pub max_conns: Option<u32>,
    /// New connections need a grant. `require_authentication` is accepted too.
    #[serde(default, alias = "require_authentication")]
    pub require_auth: bool,
    /// Lease length ("30s", "5m"); none holds the port until released.
    #[serde(default, with = "humantime_serde")]
    pub ttl: Option<Duration>,
}

/// `POST /v1/ports/{port}/renew`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    /// New lease length; the allocation's own when absent.
    #[serde(default, with = "humantime_serde")]
    pub ttl: Option<Duration>,
}

/// `POST /v1/ports/{port}/grants`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantRequest {
    /// The source address that authenticated.
    pub ip: IpAddr,
    /// How long the grant lasts.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
}

/// An allocation as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocationView {
    /// Port.
    pub port: u16,
    /// Protocol.
    pub proto: Protocol,
    /// Active, Draining or Closed.
    pub status: PortStatus,
    /// Owner name.
    pub owner: String,
    /// uid of the local user that allocated it (`None`: root, the admin group or the daemon).
    pub owner_uid: Option<u32>,
    /// Owner cgroup directory, when bind ownership is enforced.
    pub cgroup: Option<PathBuf>,
    /// Allowed source prefixes; empty allows every source.
    pub allow: Vec<IpNet>,
    /// Connection limit; 0 is unlimited.
    pub max_connections: u32,
    /// New connections need a grant.
    pub require_auth: bool,
    /// When it was allocated (ms since the epoch).
    pub allocated_at: UnixMillis,
    /// Lease length.
    #[serde(with = "humantime_serde")]
    pub ttl: Option<Duration>,
    /// When the lease runs out.
    pub lease_expires_at: Option<UnixMillis>,
    /// When it went Draining.
    pub draining_since: Option<UnixMillis>,
    /// When it went Closed.
    pub closed_at: Option<UnixMillis>,
    /// Established connections now.
    pub connections: u64,
}

impl AllocationView {
    /// The view of an allocation with `connections` open.
    #[must_use]
    pub fn new(held: &Allocation, connections: u64) -> Self {
        Self {
            port: held.id.port,
            proto: held.id.protocol,
            status: held.status,
            owner: held.owner.name.clone(),
            owner_uid: held.owner.uid,
            cgroup: held.owner.cgroup.as_ref().map(|owner| owner.path.clone()),
            allow: held.access.allowed_ips.iter().copied().collect(),
            max_connections: held.access.max_connections,
            require_auth: held.access.require_authentication,
            allocated_at: held.allocated_at,
            ttl: held.ttl,
            lease_expires_at: held.lease_expires_at,
            draining_since: held.draining_since,
            closed_at: held.closed_at,
            connections,
        }
    }

    /// The port and protocol.
    #[must_use]
    pub const fn id(&self) -> PortId {
        PortId::new(self.port, self.proto)
    }
}

/// `GET /v1/ports/{port}/check`: would a new connection from `ip` get in?
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckResponse {
    /// Port.
    pub port: u16,
    /// Protocol.
    pub proto: Protocol,
    /// Source address checked.
    pub ip: IpAddr,
    /// Whether it gets in.
    pub allowed: bool,
    /// The drop reason when it does not (`not_allowed`, `conn_limit`, ...).
    pub reason: Option<String>,
    /// Why, for a person.
    pub message: Option<String>,
}

/// A deny event as the API sends it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventView {
    /// When the daemon read it (ms since the epoch).
    pub time: UnixMillis,
    /// Port.
    pub port: u16,
    /// Protocol.
    pub proto: Protocol,
    /// Source address (bind denials: the address bound).
    pub addr: IpAddr,
    /// Reason (`not_allowed`, ..., `bind_denied`).
    pub reason: String,
    /// Hook that decided.
    pub hook: String,
    /// Bind denials: the caller's cgroup id.
    pub cgroup_id: u64,
    /// Bind denials: the caller's pid.
    pub pid: u32,
}

impl EventView {
    /// The view of a kernel event read at `time`.
    #[must_use]
    pub fn new(event: &DenyEventRecord, time: UnixMillis) -> Self {
        Self {
            time,
            port: event.port,
            proto: event.protocol,
            addr: event.addr,
            reason: event.reason.to_owned(),
            hook: event.hook.to_owned(),
            cgroup_id: event.cgroup_id,
            pid: event.pid,
        }
    }
}

/// How full the range is, per protocol.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeUsage {
    /// Protocol.
    pub proto: Protocol,
    /// Active allocations.
    pub active: u64,
    /// Draining allocations.
    pub draining: u64,
    /// Closed allocations in quarantine.
    pub closed: u64,
    /// Ports that can be allocated.
    pub free: u64,
}

/// `GET /v1/status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusView {
    /// The daemon's version.
    pub version: String,
    /// The daemon's pid.
    pub pid: u32,
    /// Seconds since it started.
    pub uptime_secs: u64,
    /// Managed range.
    pub min_port: u16,
    /// Managed range.
    pub max_port: u16,
    /// Reserved ports inside it.
    pub reserved_ports: Vec<u16>,
    /// Whether the kernel gate is driven.
    pub kernel_gate: bool,
    /// bpffs pin directory.
    pub pin_dir: PathBuf,
    /// Attached programs (link pins).
    pub attachments: Vec<String>,
    /// The store.
    pub store: String,
    /// Usage per protocol.
    pub usage: Vec<RangeUsage>,
    /// Listeners on managed ports that no allocation explains (found at start).
    pub unexplained_listeners: Vec<Listener>,
    /// Warnings (configuration, ephemeral range overlap).
    pub warnings: Vec<String>,
}

/// An error answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable code (`range_exhausted`, `access_denied`, `bad_request`, ...).
    pub code: String,
    /// The specification's category, when the manager produced it.
    pub category: Option<ErrorCategory>,
    /// One line: what was wrong and what to do.
    pub message: String,
}

impl ErrorBody {
    /// The body of a manager error.
    #[must_use]
    pub fn of(err: &PortError) -> Self {
        Self {
            error: ErrorDetail {
                code: err.code().to_owned(),
                category: Some(err.category()),
                message: err.to_string(),
            },
        }
    }

    /// A request the API could not take (bad JSON, bad parameter, unknown route).
    #[must_use]
    pub fn bad_request(code: &str, message: impl Into<String>) -> Self {
        Self {
            error: ErrorDetail {
                code: code.to_owned(),
                category: None,
                message: message.into(),
            },
        }
    }
}
