//! A port's identity and status.

use std::{fmt, str::FromStr};

use portgate_common::{proto, status};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A managed transport protocol.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema,
)]
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

/// A network namespace as a port's identity names it: its netns cookie (what the kernel
/// keys it by, never given to two namespaces while the system runs), or
/// [`NetnsId::HOST`] for the host's own, the namespace the daemon runs in.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    ToSchema,
)]
#[serde(transparent)]
#[schema(example = 4_026_532_001_u64)]
pub struct NetnsId(pub u64);

impl NetnsId {
    /// The host's namespace: the default wherever a port is named.
    pub const HOST: Self = Self(portgate_common::HOST_NETNS);

    /// What views, `?netns=` and `--netns` call the host's namespace.
    pub const HOST_NAME: &str = "host";

    /// Whether this is the host's namespace.
    #[must_use]
    pub const fn is_host(&self) -> bool {
        self.0 == Self::HOST.0
    }

    /// How views name this namespace (a NETNS column, the `netns` metric label): `host`
    /// for the host's, else `label` when it is known, else the cookie. Each is a name
    /// `--netns` takes back.
    #[must_use]
    pub fn name(self, label: Option<&str>) -> String {
        match label {
            _ if self.is_host() => Self::HOST_NAME.to_owned(),
            Some(label) => label.to_owned(),
            None => self.0.to_string(),
        }
    }
}

impl fmt::Display for NetnsId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_host() {
            f.write_str(Self::HOST_NAME)
        } else {
            write!(f, "netns cookie {}", self.0)
        }
    }
}

/// What people and the daemon know a namespace other than the host's by: the label it is
/// shown with and the inode it is found again by (its cookie is in the [`PortId`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NetnsInfo {
    /// Stable and readable: the name under /run/netns, the container's id, else
    /// `net:[INODE]`.
    pub label: String,
    /// The namespace's nsfs inode (`net:[INODE]`); inodes are reused once a namespace
    /// is gone, so the cookie confirms a match.
    pub inode: u64,
}

/// One managed port, (network namespace, protocol, port): what allocations, policies,
/// grants and counters are keyed by, on every layer.
///
/// A bare port number means TCP in the host's namespace (`--proto` defaults to tcp and the
/// namespace to the host's wherever a port is named).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema,
)]
pub struct PortId {
    /// The network namespace; absent in JSON for the host's.
    #[serde(default, skip_serializing_if = "NetnsId::is_host")]
    pub netns: NetnsId,
    /// The port number.
    #[schema(maximum = 65535)]
    pub port: u16,
    /// The transport protocol.
    pub protocol: Protocol,
}

impl PortId {
    /// (port, protocol) in the host's namespace.
    #[must_use]
    pub const fn new(port: u16, protocol: Protocol) -> Self {
        Self {
            netns: NetnsId::HOST,
            port,
            protocol,
        }
    }
}

impl PortId {
    /// How the CLI names this port after a verb: `80`, with `--proto udp` and `--netns
    /// NAME` (the namespace's `label` when known, else its cookie) when they are not the
    /// defaults.
    #[must_use]
    pub fn cli_args(&self, label: Option<&str>) -> String {
        let mut args = self.port.to_string();
        if self.protocol != Protocol::Tcp {
            args.push_str(" --proto ");
            args.push_str(self.protocol.name());
        }
        if !self.netns.is_host() {
            args.push_str(" --netns ");
            args.push_str(&self.netns.name(label));
        }
        args
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
        write!(f, "{}/{}", self.port, self.protocol)?;
        if !self.netns.is_host() {
            write!(f, " ({})", self.netns)?;
        }
        Ok(())
    }
}

/// The specification's port status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
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
