//! A port's policy in userspace terms, and its translation to the kernel's map records.

use std::{fmt, net::IpAddr, str::FromStr};

use indexmap::IndexSet;
use ipnet::IpNet;
use portgate_common::{AddrKey, Policy, family, policy_flags, proto, reason, status};
use serde::{Deserialize, Serialize};

/// A managed transport protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// Both protocols.
    pub const ALL: [Self; 2] = [Self::Tcp, Self::Udp];

    /// The IP protocol number the kernel maps use.
    #[must_use]
    pub const fn number(self) -> u8 {
        match self {
            Self::Tcp => proto::TCP,
            Self::Udp => proto::UDP,
        }
    }

    /// The protocol of an IP protocol number, if it is managed.
    #[must_use]
    pub const fn from_number(number: u8) -> Option<Self> {
        match number {
            proto::TCP => Some(Self::Tcp),
            proto::UDP => Some(Self::Udp),
            _ => None,
        }
    }
}

impl Protocol {
    /// Its name in JSON, metrics and messages: `tcp` or `udp`.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown protocol name.
#[derive(Debug, thiserror::Error)]
#[error("unknown protocol {0:?}: use tcp or udp")]
pub struct UnknownProtocol(pub String);

impl FromStr for Protocol {
    type Err = UnknownProtocol;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Self::Tcp),
            "udp" => Ok(Self::Udp),
            _ => Err(UnknownProtocol(s.to_owned())),
        }
    }
}

/// The specification's port status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PortStatus {
    /// Not allocated (no policy in the kernel).
    Available,
    /// Allocated and taking new connections.
    Active,
    /// No new connections; established ones continue.
    Draining,
    /// No connections; waiting out quarantine.
    Closed,
}

impl PortStatus {
    /// The kernel's status code; `None` for Available, which has no policy record.
    #[must_use]
    pub const fn code(self) -> Option<u32> {
        match self {
            Self::Available => None,
            Self::Active => Some(status::ACTIVE),
            Self::Draining => Some(status::DRAINING),
            Self::Closed => Some(status::CLOSED),
        }
    }

    /// The status of a kernel status code.
    #[must_use]
    pub const fn from_code(code: u32) -> Option<Self> {
        match code {
            status::ACTIVE => Some(Self::Active),
            status::DRAINING => Some(Self::Draining),
            status::CLOSED => Some(Self::Closed),
            _ => None,
        }
    }
}

impl fmt::Display for PortStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Available => "available",
            Self::Active => "active",
            Self::Draining => "draining",
            Self::Closed => "closed",
        })
    }
}

/// The cgroup that owns a port: only it and its descendants may bind the port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerCgroup {
    /// cgroup id: the inode number of the cgroup's directory in the cgroup2 mount.
    pub id: u64,
    /// Depth below the cgroup2 root (the root is level 0).
    pub level: u32,
}

/// A port's allowlist: the source prefixes allowed to connect; empty allows every source.
///
/// A set: each prefix is kept once, truncated to its network (`10.0.0.9/8` is
/// `10.0.0.0/8`), so adding, removing and finding a prefix cost the same however long the
/// list is. Prefixes keep the order they were added in, which is the order the API shows.
/// Two allowlists are equal when they hold the same prefixes, in any order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Allowlist(IndexSet<IpNet>);

impl Allowlist {
    /// How many prefixes it holds.
    #[must_use]
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether it holds no prefix (every source is allowed).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The prefixes, in the order they were added.
    #[must_use]
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &IpNet> {
        self.0.iter()
    }

    /// Whether it holds `prefix` (truncated to its network first).
    #[must_use]
    pub fn contains(&self, prefix: &IpNet) -> bool {
        self.0.contains(&prefix.trunc())
    }

    /// Adds `prefix` (truncated); `false` when it was there already.
    pub fn insert(&mut self, prefix: IpNet) -> bool {
        self.0.insert(prefix.trunc())
    }

    /// Keeps only the prefixes `keep` says yes to, in one pass.
    pub fn retain(&mut self, mut keep: impl FnMut(&IpNet) -> bool) {
        self.0.retain(|prefix| keep(prefix));
    }

    /// Whether `addr` falls in one of its prefixes (of its own address family).
    #[must_use]
    pub fn covers(&self, addr: IpAddr) -> bool {
        self.0.iter().any(|prefix| prefix.contains(&addr))
    }
}

impl FromIterator<IpNet> for Allowlist {
    fn from_iter<I: IntoIterator<Item = IpNet>>(prefixes: I) -> Self {
        Self(prefixes.into_iter().map(|prefix| prefix.trunc()).collect())
    }
}

impl Extend<IpNet> for Allowlist {
    fn extend<I: IntoIterator<Item = IpNet>>(&mut self, prefixes: I) {
        self.0
            .extend(prefixes.into_iter().map(|prefix| prefix.trunc()));
    }
}

impl<'a> IntoIterator for &'a Allowlist {
    type Item = &'a IpNet;
    type IntoIter = indexmap::set::Iter<'a, IpNet>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl<'de> Deserialize<'de> for Allowlist {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Vec::<IpNet>::deserialize(deserializer).map(Self::from_iter)
    }
}

/// A port's policy: what the kernel enforces for one (port, protocol).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortPolicy {
    /// Active, Draining or Closed (Available ports have no policy).
    pub status: PortStatus,
    /// Source prefixes allowed to reach the port; empty allows every source.
    pub allow: Allowlist,
    /// Most TCP connections at once; 0 is unlimited.
    pub max_connections: u32,
    /// New connections need an unexpired grant for their source address.
    pub require_authentication: bool,
    /// Who may bind the port; `None` lets anyone bind it.
    pub owner: Option<OwnerCgroup>,
}

impl Default for PortPolicy {
    fn default() -> Self {
        Self {
            status: PortStatus::Active,
            allow: Allowlist::default(),
            max_connections: 0,
            require_authentication: false,
            owner: None,
        }
    }
}

impl PortPolicy {
    /// The kernel record for this policy; `None` when the status is Available.
    #[must_use]
    pub fn to_kernel(&self) -> Option<Policy> {
        let status = self.status.code()?;
        let mut flags = 0;
        if !self.allow.is_empty() {
            flags |= policy_flags::ALLOWLIST;
        }
        if self.require_authentication {
            flags |= policy_flags::REQUIRE_AUTH;
        }
        let (owner_cgroup, owner_level) = match self.owner {
            Some(owner) => {
                flags |= policy_flags::OWNER;
                (owner.id, owner.level)
            }
            None => (0, 0),
        };
        Some(Policy {
            status,
            flags,
            max_connections: self.max_connections,
            owner_level,
            owner_cgroup,
        })
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

/// The address bytes and family of `addr` as the kernel keys store them.
#[must_use]
pub fn addr_bytes(addr: IpAddr) -> (u8, [u8; 16]) {
    let mut bytes = [0; 16];
    match addr {
        IpAddr::V4(v4) => {
            bytes[..4].copy_from_slice(&v4.octets());
            (family::V4, bytes)
        }
        IpAddr::V6(v6) => (family::V6, v6.octets()),
    }
}

/// The address stored in a key's bytes.
#[must_use]
pub fn addr_from_bytes(family_code: u8, bytes: [u8; 16]) -> IpAddr {
    if family_code == family::V4 {
        IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]])
    } else {
        IpAddr::from(bytes)
    }
}

/// The key of `addr` for (port, protocol): a grants-map key, or an allowlist LPM key's data.
#[must_use]
pub fn addr_key(port: u16, protocol: Protocol, addr: IpAddr) -> AddrKey {
    let (family, addr) = addr_bytes(addr);
    AddrKey {
        port,
        proto: protocol.number(),
        family,
        addr,
    }
}

/// The LPM prefix length and key data of an allowlist prefix for (port, protocol).
#[must_use]
pub fn allow_key(port: u16, protocol: Protocol, prefix: IpNet) -> (u32, AddrKey) {
    let prefix = prefix.trunc();
    (
        AddrKey::PREFIX_BITS + u32::from(prefix.prefix_len()),
        addr_key(port, protocol, prefix.addr()),
    )
}
