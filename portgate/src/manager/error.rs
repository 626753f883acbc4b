//! The manager's one error type, in the specification's categories.
//!
//! Errors stay typed until the edge: the API turns [`PortError::http_status`] into a status
//! code, the CLI prints the message. Every message says what was wrong and what to do.

use std::net::IpAddr;

use crate::model::DropReason;
use crate::model::PortId;

/// The specification's error categories.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCategory {
    /// Handing out ports.
    Allocation,
    /// Who may do what.
    Security,
    /// Counters, state and events.
    Monitoring,
}

/// What went wrong in the port manager.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    // ---- allocation ----
    /// The port asked for is held or bound by something else.
    #[error("port {id} is unavailable: {why}; ask for another port or leave --port out")]
    PortUnavailable {
        /// The port.
        id: PortId,
        /// Why it cannot be handed out.
        why: String,
    },
    /// Every port of the range is allocated, reserved, quarantined or bound.
    #[error(
        "no free {protocol} port in {min}-{max}: release ports, wait for quarantine, or widen [ports] min_port/max_port"
    )]
    RangeExhausted {
        /// The protocol asked for.
        protocol: crate::model::Protocol,
        /// Lowest managed port.
        min: u16,
        /// Highest managed port.
        max: u16,
    },
    /// The request itself is wrong (a port outside the range, an empty owner, ...).
    #[error("{0}")]
    InvalidPortRequest(String),
    /// The named port has no allocation.
    #[error("port {0} is not allocated: see `portgate list`")]
    NotAllocated(PortId),
    /// The configuration is wrong.
    #[error("configuration: {0}")]
    Configuration(String),
    /// A kernel map has no room left for the change.
    #[error(
        "the kernel's {map} map is full ({capacity} entries): release ports, remove allowlist prefixes, or let grants expire, then retry"
    )]
    KernelMapFull {
        /// The map's name.
        map: &'static str,
        /// Its capacity.
        capacity: u32,
    },

    // ---- security ----
    /// The caller may not do this.
    #[error("access denied: {0}")]
    AccessDenied(String),
    /// The source has no unexpired authentication grant.
    #[error("{addr} may not connect to {id}: authentication required (no unexpired grant)")]
    AuthenticationFailed {
        /// The port.
        id: PortId,
        /// The source.
        addr: IpAddr,
    },
    /// The port holds its maximum of connections.
    #[error("{addr} may not connect to {id}: connection limit reached ({max} at once)")]
    LimitExceeded {
        /// The port.
        id: PortId,
        /// The source.
        addr: IpAddr,
        /// The limit.
        max: u32,
    },
    /// The policy refuses it (allowlist, status), or a policy change is not allowed.
    #[error("{0}")]
    PolicyViolation(String),

    // ---- monitoring ----
    /// Counters could not be read.
    #[error("reading counters: {0}")]
    MetricCollection(String),
    /// State could not be kept: the kernel maps or the store refused a change.
    #[error("keeping state: {0}")]
    StateTracking(String),
    /// The host could not be inspected (sockets, sysctls, cgroups).
    #[error("inspecting the host: {0}")]
    ResourceMonitoring(String),
    /// Events or the audit log could not be written or read.
    #[error("event log: {0}")]
    EventLogging(String),
}

impl PortError {
    /// The specification's category.
    #[must_use]
    pub const fn category(&self) -> ErrorCategory {
        match self {
            Self::PortUnavailable { .. }
            | Self::RangeExhausted { .. }
            | Self::InvalidPortRequest(_)
            | Self::NotAllocated(_)
            | Self::Configuration(_)
            | Self::KernelMapFull { .. } => ErrorCategory::Allocation,
            Self::AccessDenied(_)
            | Self::AuthenticationFailed { .. }
            | Self::LimitExceeded { .. }
            | Self::PolicyViolation(_) => ErrorCategory::Security,
            Self::MetricCollection(_)
            | Self::StateTracking(_)
            | Self::ResourceMonitoring(_)
            | Self::EventLogging(_) => ErrorCategory::Monitoring,
        }
    }

    /// A stable `snake_case` code for programs (the API's `error.code`).
    #[must_use]
    pub const fn code(&self) -> &'static str {
        match self {
            Self::PortUnavailable { .. } => "port_unavailable",
            Self::RangeExhausted { .. } => "range_exhausted",
            Self::InvalidPortRequest(_) => "invalid_port_request",
            Self::NotAllocated(_) => "not_allocated",
            Self::Configuration(_) => "configuration",
            Self::KernelMapFull { .. } => "kernel_map_full",
            Self::AccessDenied(_) => "access_denied",
            Self::AuthenticationFailed { .. } => "authentication_failed",
            Self::LimitExceeded { .. } => "limit_exceeded",
            Self::PolicyViolation(_) => "policy_violation",
            Self::MetricCollection(_) => "metric_collection",
            Self::StateTracking(_) => "state_tracking",
            Self::ResourceMonitoring(_) => "resource_monitoring",
            Self::EventLogging(_) => "event_logging",
        }
    }

    /// The HTTP status the API answers with.
    #[must_use]
    pub const fn http_status(&self) -> u16 {
        match self {
            Self::PortUnavailable { .. } | Self::RangeExhausted { .. } => 409,
            Self::InvalidPortRequest(_) | Self::PolicyViolation(_) => 400,
            Self::NotAllocated(_) => 404,
            Self::AccessDenied(_) | Self::AuthenticationFailed { .. } => 403,
            Self::LimitExceeded { .. } => 429,
            Self::KernelMapFull { .. } => 507,
            Self::Configuration(_)
            | Self::MetricCollection(_)
            | Self::StateTracking(_)
            | Self::ResourceMonitoring(_)
            | Self::EventLogging(_) => 500,
        }
    }

    /// The error of a connection the verdict drops.
    #[must_use]
    pub fn connection_refused(id: PortId, addr: IpAddr, reason: DropReason, max: u32) -> Self {
        match reason {
            DropReason::Unallocated => Self::NotAllocated(id),
            DropReason::Draining => Self::PolicyViolation(format!(
                "{addr} may not connect to {id}: the port is draining or closed (no new connections)"
            )),
            DropReason::NotAllowed => Self::AccessDenied(format!(
                "{addr} may not connect to {id}: not in the port's allowlist (add it with `portgate access {} --allow CIDR`)",
                id.port
            )),
            DropReason::AuthRequired => Self::AuthenticationFailed { id, addr },
            DropReason::ConnLimit => Self::LimitExceeded { id, addr, max },
        }
    }
}

impl From<crate::gate::GateError> for PortError {
    fn from(err: crate::gate::GateError) -> Self {
        match err {
            crate::gate::GateError::MapFull { map, capacity } => {
                Self::KernelMapFull { map, capacity }
            }
            other => Self::StateTracking(format!(
                "{other}; the change was not made (see the daemon's log, and `portgate status` for the gate)"
            )),
        }
    }
}

/// The manager's result.
pub type Result<T, E = PortError> = std::result::Result<T, E>;
