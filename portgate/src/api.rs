//! The local API's wire types: HTTP + JSON over the daemon's Unix socket. The daemon
//! serves them ([`crate::daemon`]); the CLI sends them ([`crate::client`]).
//!
//! Routes (all JSON; `proto` defaults to tcp, `netns` to the host's namespace: give a
//! namespace's cookie, as `GET /v1/netns` finds it, or `host`):
//! - `POST /v1/ports` [`AllocRequest`] → 201 [`AllocationView`]
//! - `GET /v1/ports` → `[AllocationView]`; `GET /v1/ports/{port}?proto=&netns=` →
//!   [`AllocationView`]
//! - `DELETE /v1/ports/{port}?proto=&netns=` (release), `POST /v1/ports/{port}/drain?...`,
//!   `POST /v1/ports/{port}/renew?...` [`RenewRequest`] → [`AllocationView`]
//! - `PATCH /v1/ports/{port}/access?...` [`AccessChange`] → [`AllocationView`]
//! - `PATCH /v1/ports/{port}/owner?...` [`OwnerSpec`] → [`AllocationView`]
//! - `POST /v1/ports/{port}/grants?...` [`GrantRequest`] → 204
//! - `GET /v1/ports/{port}/check?ip=&proto=&netns=` → [`CheckResponse`]
//! - `GET /v1/netns?name=` → [`NetnsView`]: the namespace a name given on the command line
//!   means (an allocation's label, a cookie, or a path); 404 `unknown_netns` when none
//! - `GET /v1/stats[?port=&proto=&netns=]` → `[PortReport]` (the keys of `portgate maps`)
//!
//! Views flatten the model's types ([`crate::model`]) under the spellings of
//! [`crate::model::spelling`]: the API shows `port` and `proto`, `allow` and
//! `require_auth`, as it always has.
//! - `GET /v1/events[?follow=true]` → [`EventView`] JSON lines
//! - `GET /v1/status` → [`StatusView`]; `GET /metrics` → Prometheus text
//! - `GET /v1/openapi.json` → the `OpenAPI` document of every route, with examples
//!   (`docs/openapi.json`; see `docs/api.md`)
//!
//! Errors answer a 4xx/5xx status with [`ErrorBody`].

pub mod checks;

use std::{net::IpAddr, path::PathBuf, time::Duration};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use self::checks::decode_body;
#[doc(no_inline)]
pub use crate::model::{AccessChange, PortReport};
use crate::{
    gate::DenyEventRecord,
    host::sockets::Listener,
    manager::{ErrorCategory, PortError},
    model::{
        Allocation, HostPort, NetnsId, PortAccessControl, PortId, PortStatus, Protocol, Timeline,
        UnixMillis, spelling,
    },
    text::error_chain,
};

/// The most bytes a request body may have (an allowlist of 10,000 IPv6 prefixes fits).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// `POST /v1/ports`: what `portgate alloc` asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AllocRequest {
    /// Owner name.
    pub owner: String,
    /// A specific port; any free one when absent.
    #[serde(default)]
    #[schema(maximum = 65535)]
    pub port: Option<u16>,
    /// Protocol (tcp when absent).
    #[serde(default)]
    pub proto: Option<Protocol>,
    /// The owner's cgroup2 directory (bind ownership).
    #[serde(default)]
    #[schema(value_type = Option<String>, example = "/sys/fs/cgroup/web.slice")]
    pub cgroup: Option<PathBuf>,
    /// A process whose cgroup owns the port, in whose network namespace the port is.
    #[serde(default)]
    #[schema(format = Int64, maximum = 4_294_967_295_u32)]
    pub pid: Option<u32>,
    /// A container (docker, podman, containerd, CRI-O) or Kubernetes pod, by id: its cgroup
    /// owns the port, which is in its network namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// The port's network namespace (`/run/netns/NAME`, `/proc/PID/ns/net`); the host's
    /// when no namespace is named (here, or through `pid` or `container`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "/run/netns/web")]
    pub netns: Option<PathBuf>,
    /// Publish the port on a host port (`"auto"` or a port of the managed range) that a
    /// container runtime forwards to it with DNAT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish: Option<HostPort>,
    /// Allowed source prefixes; empty allows every source.
    #[serde(default)]
    #[schema(value_type = Vec<String>, example = json!(["10.0.0.0/8"]))]
    pub allow: Vec<IpNet>,
    /// Connection limit (0 or absent: unlimited). `max_connections` is accepted too, as
    /// in the access change.
    #[serde(default, alias = "max_connections")]
    #[schema(format = Int64, maximum = 4_294_967_295_u32)]
    pub max_conns: Option<u32>,
    /// New connections need a grant. `require_authentication` is accepted too.
    #[serde(default, alias = "require_authentication")]
    pub require_auth: bool,
    /// Lease length ("30s", "5m"); none holds the port until released.
    #[serde(default, with = "humantime_serde")]
    #[schema(value_type = Option<String>, example = "1h")]
    pub ttl: Option<Duration>,
}

impl AllocRequest {
    /// Who owns the port and where it is.
    #[must_use]
    pub fn owner_spec(&self) -> OwnerSpec {
        OwnerSpec {
            cgroup: self.cgroup.clone(),
            pid: self.pid,
            container: self.container.clone(),
            netns: self.netns.clone(),
        }
    }

    /// The access control it asks for.
    #[must_use]
    pub fn access(&self) -> PortAccessControl {
        PortAccessControl {
            allowed_ips: self.allow.iter().copied().collect(),
            max_connections: self.max_conns.unwrap_or(0),
            require_authentication: self.require_auth,
        }
    }
}

/// How a request names a port's owner cgroup and network namespace: at most one of
/// `cgroup`, `pid` and `container`; `netns` alone or beside `cgroup`.
///
/// `PATCH /v1/ports/{port}/owner` takes it (without `netns`) to move a port to a new owner
/// cgroup, as when a container restarts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OwnerSpec {
    /// The owner's cgroup2 directory.
    #[serde(default)]
    #[schema(value_type = Option<String>, example = "/sys/fs/cgroup/web.slice")]
    pub cgroup: Option<PathBuf>,
    /// A process: its cgroup, and its network namespace.
    #[serde(default)]
    #[schema(format = Int64, maximum = 4_294_967_295_u32)]
    pub pid: Option<u32>,
    /// A container or pod: its cgroup, and its network namespace.
    #[serde(default)]
    pub container: Option<String>,
    /// A network namespace path.
    #[serde(default)]
    #[schema(value_type = Option<String>, example = "/run/netns/web")]
    pub netns: Option<PathBuf>,
}

/// `POST /v1/ports/{port}/renew`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    /// New lease length; the allocation's own when absent.
    #[serde(default, with = "humantime_serde")]
    #[schema(value_type = Option<String>, example = "1h")]
    pub ttl: Option<Duration>,
}

/// `POST /v1/ports/{port}/grants`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GrantRequest {
    /// The source address that authenticated.
    #[schema(value_type = String, example = "192.0.2.10")]
    pub ip: IpAddr,
    /// How long the grant lasts.
    #[serde(with = "humantime_serde")]
    #[schema(value_type = String, example = "10m")]
    pub ttl: Duration,
}

/// `GET /v1/ports/{port}/grants`: one grant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct GrantInfoView {
    /// The address it lets in.
    #[schema(value_type = String, example = "192.0.2.10")]
    pub ip: IpAddr,
    /// How long it still lasts.
    #[serde(with = "humantime_serde")]
    #[schema(value_type = String, example = "9m 58s")]
    pub expires_in: Duration,
    /// Who issued it (`administrator`, `uid N`, `key NAME`); absent when unknown (issued
    /// before the daemon last started).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issued_by: Option<String>,
}

/// A port a client key may open: `{"port": 5432, "proto": "tcp"}` (`proto` defaults to
/// TCP).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyPort {
    /// The port.
    #[schema(maximum = 65535)]
    pub port: u16,
    /// Its protocol.
    #[serde(default = "tcp")]
    pub proto: Protocol,
}

const fn tcp() -> Protocol {
    Protocol::Tcp
}

/// `POST /v1/keys`: a new client key for the knock (administrators only).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyRequestBody {
    /// Its name.
    pub name: String,
    /// The ports it may open; none: any port that requires authentication.
    #[serde(default)]
    pub ports: Vec<KeyPort>,
    /// The longest grant a knock with it gets.
    #[serde(with = "humantime_serde", default = "default_key_max_ttl")]
    #[schema(value_type = String, example = "5m")]
    pub max_ttl: Duration,
    /// Whether a knock may name the address its grant is for (clients behind NAT).
    #[serde(default)]
    pub any_source: bool,
}

/// The longest grant of a key made without `max_ttl`: 5 minutes.
#[must_use]
pub const fn default_key_max_ttl() -> Duration {
    Duration::from_mins(5)
}

/// A client key as the API shows it: never its secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct KeyView {
    /// Its name.
    pub name: String,
    /// The ports it may open; none: any port that requires authentication.
    pub ports: Vec<KeyPort>,
    /// The longest grant a knock with it gets.
    #[serde(with = "humantime_serde")]
    #[schema(value_type = String, example = "5m")]
    pub max_ttl: Duration,
    /// Whether a knock may name the address its grant is for.
    pub any_source: bool,
    /// When it was made (milliseconds since the epoch).
    pub created_at: u64,
}

/// `POST /v1/keys`' answer: the key, and the key file its client keeps, shown this once.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct KeyCreated {
    /// The key.
    #[serde(flatten)]
    pub key: KeyView,
    /// The key file's text (`portgate knock --key-file`).
    pub key_file: String,
}

impl std::fmt::Debug for KeyCreated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key file holds the secret: never printed.
        f.debug_struct("KeyCreated")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// An allocation as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AllocationView {
    /// The port (keys `port`, `proto`, and `netns` with the namespace's cookie when it is
    /// not the host's).
    #[serde(flatten, with = "spelling::PortIdFields")]
    #[schema(value_type = spelling::PortIdFields)]
    pub id: PortId,
    /// The namespace's label (its name under /run/netns, the container's id, or
    /// `net:[INODE]`); absent for the host's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns_label: Option<String>,
    /// The host port it is published on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(maximum = 65535)]
    pub published: Option<u16>,
    /// Active, Draining or Closed.
    pub status: PortStatus,
    /// Owner name.
    pub owner: String,
    /// uid of the local user that allocated it (`None`: root, the admin group or the daemon).
    #[schema(format = Int64, maximum = 4_294_967_295_u32)]
    pub owner_uid: Option<u32>,
    /// Owner cgroup directory, when bind ownership is enforced.
    #[schema(value_type = Option<String>, example = "/sys/fs/cgroup/web.slice")]
    pub cgroup: Option<PathBuf>,
    /// Its access control (keys `allow`, `max_connections`, `require_auth`).
    #[serde(flatten, with = "spelling::AccessFields")]
    #[schema(value_type = spelling::AccessFields)]
    pub access: PortAccessControl,
    /// When it was allocated, its lease, when it went Draining and Closed (milliseconds
    /// since the epoch).
    #[serde(flatten)]
    pub timeline: Timeline,
    /// Established connections now.
    pub connections: u64,
}

impl AllocationView {
    /// The view of an allocation with `connections` open.
    #[must_use]
    pub fn new(held: &Allocation, connections: u64) -> Self {
        Self {
            id: held.id,
            netns_label: held.netns_label().map(str::to_owned),
            published: held.published,
            status: held.status,
            owner: held.owner.name.clone(),
            owner_uid: held.owner.uid,
            cgroup: held.owner.cgroup.as_ref().map(|owner| owner.path.clone()),
            access: held.access.clone(),
            timeline: held.timeline,
            connections,
        }
    }
}

/// `GET /v1/netns?name=`: the namespace a name means.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NetnsView {
    /// Its cookie: what `?netns=` takes (0 for the host's).
    pub netns: NetnsId,
    /// How views name it: `host`, an allocation's label, or the label found for a path.
    pub label: String,
}

/// `GET /v1/ports/{port}/check`: would a new connection from `ip` get in?
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CheckResponse {
    /// The port (keys `port`, `proto`).
    #[serde(flatten, with = "spelling::PortIdFields")]
    #[schema(value_type = spelling::PortIdFields)]
    pub id: PortId,
    /// Source address checked.
    #[schema(value_type = String, example = "192.0.2.10")]
    pub ip: IpAddr,
    /// Whether it gets in.
    pub allowed: bool,
    /// The drop reason when it does not (`not_allowed`, `conn_limit`, ...).
    pub reason: Option<String>,
    /// Why, for a person.
    pub message: Option<String>,
    /// Something that makes the answer less than it seems: the port is published through a
    /// userland proxy, so the container sees the proxy's address, not `ip`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// A deny event as the API sends it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EventView {
    /// When the daemon read it (ms since the epoch).
    #[schema(value_type = u64)]
    pub time: UnixMillis,
    /// The port (keys `port`, `proto`, and `netns` when it is not the host's).
    #[serde(flatten, with = "spelling::PortIdFields")]
    #[schema(value_type = spelling::PortIdFields)]
    pub id: PortId,
    /// The label of the port's namespace, when it is not the host's and an allocation
    /// names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns_label: Option<String>,
    /// Source address (bind denials: the address bound).
    #[schema(value_type = String, example = "192.0.2.10")]
    pub addr: IpAddr,
    /// Reason (`not_allowed`, ..., `bind_denied`).
    pub reason: String,
    /// Hook that decided.
    pub hook: String,
    /// Bind denials: the caller's cgroup id.
    pub cgroup_id: u64,
    /// Bind denials: the caller's pid.
    #[schema(format = Int64, maximum = 4_294_967_295_u32)]
    pub pid: u32,
}

impl EventView {
    /// The view of a kernel event read at `time`, its namespace labelled `netns_label`.
    #[must_use]
    pub fn new(event: &DenyEventRecord, time: UnixMillis, netns_label: Option<String>) -> Self {
        Self {
            time,
            id: event.id,
            netns_label,
            addr: event.addr,
            reason: event.reason.to_owned(),
            hook: event.hook.to_owned(),
            cgroup_id: event.cgroup_id,
            pid: event.pid,
        }
    }
}

/// How full the range is, per protocol.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
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
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StatusView {
    /// The daemon's version.
    pub version: String,
    /// The daemon's pid.
    #[schema(format = Int64, maximum = 4_294_967_295_u32)]
    pub pid: u32,
    /// Seconds since it started.
    pub uptime_secs: u64,
    /// Managed range.
    #[schema(maximum = 65535)]
    pub min_port: u16,
    /// Managed range.
    #[schema(maximum = 65535)]
    pub max_port: u16,
    /// Reserved ports inside it.
    pub reserved_ports: Vec<u16>,
    /// Whether the kernel gate is driven.
    pub kernel_gate: bool,
    /// bpffs pin directory.
    #[schema(value_type = String, example = "/sys/fs/bpf/portgate")]
    pub pin_dir: PathBuf,
    /// Attached programs (link pins).
    pub attachments: Vec<String>,
    /// The store.
    pub store: String,
    /// Usage per protocol.
    pub usage: Vec<RangeUsage>,
    /// Allocated ports whose owner cgroup no longer exists (whatever `[ports]
    /// on_owner_exit` did with them: Draining, or still Active until given a new owner).
    #[serde(default)]
    pub owner_gone: u64,
    /// Listeners on managed ports that no allocation explains (found at start).
    pub unexplained_listeners: Vec<Listener>,
    /// Warnings (configuration, ephemeral range overlap).
    pub warnings: Vec<String>,
    /// Where this node stands in its fleet (fleet mode only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<FleetView>,
}

/// `POST /v1/fleet/repair`: the repair pass for a dead node (administrators only).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RepairRequest {
    /// The dead node's name.
    pub node: String,
}

/// `POST /v1/fleet/repair`'s answer: the ports taken over and released.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RepairView {
    /// The node repaired.
    pub node: String,
    /// Its ports, now draining under this node.
    pub released: Vec<PortId>,
}

/// A live node of the fleet (`GET /v1/fleet/nodes`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NodeView {
    /// Its name.
    pub node: String,
    /// Its portgate version.
    pub version: String,
    /// When it joined (milliseconds since the epoch).
    pub joined_at: u64,
}

/// A node's place in its fleet, as `status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FleetView {
    /// This node's name.
    pub node: String,
    /// Whether the node has applied a list of the fleet since it started (until then it
    /// enforces what its local store held).
    pub joined: bool,
    /// Whether etcd answered the last request.
    pub reachable: bool,
    /// The etcd revision applied to this node's kernel.
    pub revision: i64,
    /// How many revisions behind the latest one it heard of.
    pub behind: i64,
}

/// An error answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"error": {"code": "not_allocated", "category": "allocation", "message": "port 20050/tcp is not allocated: see `portgate list`"}}))]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable code (`range_exhausted`, `access_denied`, `bad_request`, ...).
    pub code: String,
    /// The specification's category, when the manager produced it.
    pub category: Option<ErrorCategory>,
    /// One line: what was wrong and what to do.
    pub message: String,
}

impl ErrorBody {
    /// The body of a manager error: its message with every cause.
    #[must_use]
    pub fn of(err: &PortError) -> Self {
        Self {
            error: ErrorDetail {
                code: err.code().to_owned(),
                category: Some(err.category()),
                message: error_chain(err),
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

#[cfg(test)]
mod tests {
    use super::{AllocationView, CheckResponse, EventView, NetnsView};
    use crate::model::{
        GrantView, NetnsId, NetnsInfo, PortAccessControl, PortId, PortReport, PortStatus, Protocol,
        sample_allocation, sample_metrics,
    };

    /// Answers as the API has always spelled them: the views flatten the model's types, and
    /// must not change a byte of what clients read.
    const VIEW: &str = r#"{"port":20001,"proto":"tcp","status":"active","owner":"service-20001","owner_uid":1000,"cgroup":"/sys/fs/cgroup/service.slice","allow":["10.0.0.0/8","2001:db8::/32"],"max_connections":16,"require_auth":true,"allocated_at":1700000000000,"ttl":"1h","lease_expires_at":1700003600000,"draining_since":null,"closed_at":null,"connections":3}"#;
    const REPORT: &str = r#"{"port":20001,"proto":"udp","status":"draining","allow":["10.0.0.0/8","2001:db8::/32"],"max_connections":7,"require_auth":true,"owner_cgroup":42,"grants":[{"addr":"192.0.2.1","expires_in_ms":900}],"accepted":1,"active":2,"dropped":{"unallocated":3,"draining":4,"not_allowed":5,"auth_required":6,"conn_limit":7},"bind_denied":8,"packets":9,"bytes":10}"#;
    const CHECK: &str = r#"{"port":20001,"proto":"tcp","ip":"192.0.2.1","allowed":false,"reason":"not_allowed","message":"m"}"#;
    const EVENT: &str = r#"{"time":5,"port":20001,"proto":"udp","addr":"::1","reason":"conn_limit","hook":"xdp","cgroup_id":0,"pid":0}"#;

    /// Encodes `value`, checks it against `expected`, and decodes `expected` back to it.
    fn same_bytes<T>(value: &T, expected: &str)
    where
        T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        assert_eq!(serde_json::to_string(value).unwrap(), expected);
        assert_eq!(&serde_json::from_str::<T>(expected).unwrap(), value);
    }

    #[test]
    fn an_error_answer_carries_every_cause_once() {
        let err = crate::manager::PortError::state(
            "the change to 20001/tcp was not saved and was undone",
            Some(Box::new(std::io::Error::other("no space left on device"))),
        );
        let body = super::ErrorBody::of(&err);
        assert_eq!(body.error.code, "state_tracking");
        assert_eq!(
            body.error.message,
            "keeping state: the change to 20001/tcp was not saved and was undone: no space left on device"
        );
    }

    #[test]
    fn views_keep_the_apis_spelling() {
        let stored = sample_allocation(20001, Protocol::Tcp);
        same_bytes(&AllocationView::new(&stored, 3), VIEW);
        let report = PortReport {
            id: PortId::new(20001, Protocol::Udp),
            published: None,
            status: PortStatus::Draining,
            access: PortAccessControl {
                max_connections: 7,
                ..stored.access.clone()
            },
            owner_cgroup: Some(42),
            grants: vec![GrantView {
                addr: "192.0.2.1".parse().unwrap(),
                expires_in_ms: 900,
            }],
            counters: sample_metrics(),
        };
        same_bytes(&report, REPORT);
        let check = CheckResponse {
            id: PortId::new(20001, Protocol::Tcp),
            ip: "192.0.2.1".parse().unwrap(),
            allowed: false,
            reason: Some("not_allowed".into()),
            message: Some("m".into()),
            warning: None,
        };
        same_bytes(&check, CHECK);
        let event = EventView {
            time: 5,
            id: PortId::new(20001, Protocol::Udp),
            netns_label: None,
            addr: "::1".parse().unwrap(),
            reason: "conn_limit".into(),
            hook: "xdp".into(),
            cgroup_id: 0,
            pid: 0,
        };
        same_bytes(&event, EVENT);
    }

    /// A port of another namespace: its cookie as `netns`, its label beside it, and the
    /// host port it is published on.
    #[test]
    fn views_name_another_namespace() {
        let mut stored = sample_allocation(80, Protocol::Tcp);
        stored.id.netns = NetnsId(4097);
        stored.netns = Some(NetnsInfo {
            label: "web1".into(),
            inode: 4_026_532_000,
        });
        stored.published = Some(20080);
        let view = serde_json::to_value(AllocationView::new(&stored, 0)).unwrap();
        assert_eq!(view["netns"], 4097);
        assert_eq!(view["netns_label"], "web1");
        assert_eq!(view["published"], 20080);
        assert_eq!(view["port"], 80);

        let netns: NetnsView = serde_json::from_str(r#"{"netns":4097,"label":"web1"}"#).unwrap();
        assert_eq!(netns.netns, NetnsId(4097));
        assert_eq!(NetnsId(4097).name(Some("web1")), "web1");
        assert_eq!(NetnsId(4097).name(None), "4097");
        assert_eq!(NetnsId::HOST.name(Some("web1")), "host");
    }
}
