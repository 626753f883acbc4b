//! An allocation: the durable record of one held port, and the request that makes one.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{
    access::PortAccessControl,
    owner::Owner,
    policy::PortPolicy,
    port::{NetnsId, NetnsInfo, PortId, PortStatus, Protocol},
};

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

/// When an allocation's lifecycle steps happened, and when its lease runs out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Timeline {
    /// When it was allocated.
    #[schema(value_type = u64)]
    pub allocated_at: UnixMillis,
    /// The lease length, when the allocation has one.
    #[serde(with = "humantime_serde", default)]
    #[schema(value_type = Option<String>, example = "1h")]
    pub ttl: Option<Duration>,
    /// When the lease runs out (Active goes Draining then).
    #[schema(value_type = Option<u64>)]
    pub lease_expires_at: Option<UnixMillis>,
    /// When it went Draining.
    #[schema(value_type = Option<u64>)]
    pub draining_since: Option<UnixMillis>,
    /// When it went Closed; it becomes Available once quarantine has passed.
    #[schema(value_type = Option<u64>)]
    pub closed_at: Option<UnixMillis>,
    /// When its network namespace was found gone: it went Closed then, and nothing of it
    /// stays in the kernel while it waits out quarantine. Absent while the namespace lives
    /// (and always for the host's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<u64>)]
    pub netns_gone_at: Option<UnixMillis>,
}

impl Timeline {
    /// Allocated at `now`, with a lease of `ttl` when given.
    #[must_use]
    pub fn starting(now: UnixMillis, ttl: Option<Duration>) -> Self {
        Self {
            allocated_at: now,
            ttl,
            lease_expires_at: ttl.map(|ttl| add_duration(now, ttl)),
            draining_since: None,
            closed_at: None,
            netns_gone_at: None,
        }
    }
}

/// One allocated port: the durable record the store keeps.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    /// The port.
    pub id: PortId,
    /// The port's namespace, when it is not the host's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<NetnsInfo>,
    /// The host port a container runtime forwards to this one (DNAT), held for it in the
    /// host's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published: Option<u16>,
    /// Who holds it.
    pub owner: Owner,
    /// Its access control.
    pub access: PortAccessControl,
    /// Active, Draining or Closed (an Available port has no allocation).
    pub status: PortStatus,
    /// Its lifecycle's times.
    #[serde(flatten)]
    pub timeline: Timeline,
}

impl Allocation {
    /// Its namespace's label; `None` for the host's.
    #[must_use]
    pub fn netns_label(&self) -> Option<&str> {
        self.netns.as_ref().map(|netns| netns.label.as_str())
    }

    /// The kernel policy this allocation asks for; `None` once its namespace is gone (no
    /// socket can use the port, and the allocation only holds its number, and a published
    /// host port, through quarantine). Its epoch is the allocation time's low 32 bits
    /// (milliseconds): the same for every change of one allocation, different for the
    /// port's next allocation (unless it comes a multiple of 49.7 days later to the
    /// millisecond).
    #[must_use]
    pub fn policy(&self) -> Option<PortPolicy> {
        if self.timeline.netns_gone_at.is_some() {
            return None;
        }
        Some(PortPolicy {
            status: self.status,
            access: self.access.clone(),
            owner: self.owner.cgroup.clone(),
            #[expect(
                clippy::cast_possible_truncation,
                reason = "the epoch is the low 32 bits"
            )]
            epoch: self.timeline.allocated_at as u32,
            published: self.published,
        })
    }
}

/// What an allocation asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllocationRequest {
    /// Who will hold the port.
    pub owner: Owner,
    /// A specific port, or `None` for any free one.
    pub port: Option<u16>,
    /// The protocol.
    pub protocol: Protocol,
    /// The access control to start with.
    pub access: PortAccessControl,
    /// A lease length; `None` holds the port until it is released.
    pub ttl: Option<Duration>,
    /// The port's namespace, found by the caller; `None` for the host's.
    pub netns: Option<NetnsRef>,
    /// The host port to publish the port on, for a container runtime's DNAT.
    pub publish: Option<HostPort>,
}

/// A namespace other than the host's, as a request names it once it has been found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetnsRef {
    /// Its cookie.
    pub id: NetnsId,
    /// Its label and inode, kept with the allocation.
    pub info: NetnsInfo,
    /// A path that opens it now (`/run/netns/NAME`, `/proc/PID/ns/net`): where its
    /// sockets are read and its reserved ports written.
    pub path: std::path::PathBuf,
}

/// The host port of a published port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostPort {
    /// Any free port of the managed range.
    Auto,
    /// This port of the managed range.
    #[serde(untagged)]
    Port(u16),
}

/// As serde spells it: the string `auto`, or a port number (`#[serde(untagged)]`, which
/// the schema derive does not read).
impl utoipa::PartialSchema for HostPort {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, SchemaType, Type};
        OneOfBuilder::new()
            .item(
                ObjectBuilder::new()
                    .schema_type(SchemaType::Type(Type::String))
                    .enum_values(Some(["auto"])),
            )
            .item(
                ObjectBuilder::new()
                    .schema_type(SchemaType::Type(Type::Integer))
                    .minimum(Some(0))
                    .maximum(Some(u16::MAX)),
            )
            .description(Some(
                "`auto` (any free port of the managed range) or a port of the managed range",
            ))
            .into()
    }
}

impl utoipa::ToSchema for HostPort {}

impl AllocationRequest {
    /// Any free TCP port of the host's namespace for `owner`, no policy, no lease.
    #[must_use]
    pub fn new(owner: &str) -> Self {
        Self {
            owner: Owner::named(owner),
            port: None,
            protocol: Protocol::Tcp,
            access: PortAccessControl::default(),
            ttl: None,
            netns: None,
            publish: None,
        }
    }
}

impl From<&str> for AllocationRequest {
    fn from(owner: &str) -> Self {
        Self::new(owner)
    }
}

/// The specification's state of one port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortState {
    /// The port.
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

/// An allocation with every field set, for tests of what stores and shows allocations.
#[cfg(test)]
pub(crate) fn sample_allocation(port: u16, protocol: Protocol) -> Allocation {
    use super::{Owner, OwnerCgroup};

    Allocation {
        id: PortId::new(port, protocol),
        netns: None,
        published: None,
        owner: Owner {
            name: format!("service-{port}"),
            uid: Some(1000),
            cgroup: Some(OwnerCgroup {
                path: "/sys/fs/cgroup/service.slice".into(),
                id: 4242,
                level: 1,
            }),
        },
        access: PortAccessControl {
            allowed_ips: [
                "10.0.0.0/8".parse().unwrap(),
                "2001:db8::/32".parse().unwrap(),
            ]
            .into_iter()
            .collect(),
            max_connections: 16,
            require_authentication: true,
        },
        status: PortStatus::Active,
        timeline: Timeline {
            allocated_at: 1_700_000_000_000,
            ttl: Some(std::time::Duration::from_hours(1)),
            lease_expires_at: Some(1_700_003_600_000),
            draining_since: None,
            closed_at: None,
            netns_gone_at: None,
        },
    }
}
