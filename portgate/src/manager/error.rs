//! The manager's one error type, in the specification's categories.
//!
//! Errors stay typed until the edge: the API turns [`PortError::http_status`] into a status
//! code and the message into text with its causes ([`crate::text::error_chain`]), the CLI
//! prints that. Every message says what was wrong and what to do; a lower error it wraps is
//! its `#[source]`, not text in its message.

use std::net::IpAddr;

use crate::{
    gate::GateError,
    model::{DropReason, PortId},
};

/// A lower error a [`PortError`] wraps.
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

/// The specification's error categories.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
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
    #[error("configuration: {message}")]
    Configuration {
        /// What is wrong and what to do.
        message: String,
        /// The error found in it, if another one.
        #[source]
        cause: Option<Cause>,
    },
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
    /// Counters could not be read or encoded.
    #[error("reading counters: {what}")]
    MetricCollection {
        /// What was being read.
        what: &'static str,
        /// Why it failed.
        #[source]
        cause: Cause,
    },
    /// State could not be kept: the kernel maps or the store refused a change.
    #[error("keeping state: {message}")]
    StateTracking {
        /// What was not kept, and what to do.
        message: String,
        /// The refusal, when a lower layer gave one.
        #[source]
        cause: Option<Cause>,
    },
    /// The host could not be inspected (sockets, sysctls, cgroups).
    #[error("inspecting the host: {what}")]
    ResourceMonitoring {
        /// What was being read or written.
        what: String,
        /// Why it failed.
        #[source]
        cause: Cause,
    },
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
            | Self::Configuration { .. }
            | Self::KernelMapFull { .. } => ErrorCategory::Allocation,
            Self::AccessDenied(_)
            | Self::AuthenticationFailed { .. }
            | Self::LimitExceeded { .. }
            | Self::PolicyViolation(_) => ErrorCategory::Security,
            Self::MetricCollection { .. }
            | Self::StateTracking { .. }
            | Self::ResourceMonitoring { .. }
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
            Self::Configuration { .. } => "configuration",
            Self::KernelMapFull { .. } => "kernel_map_full",
            Self::AccessDenied(_) => "access_denied",
            Self::AuthenticationFailed { .. } => "authentication_failed",
            Self::LimitExceeded { .. } => "limit_exceeded",
            Self::PolicyViolation(_) => "policy_violation",
            Self::MetricCollection { .. } => "metric_collection",
            Self::StateTracking { .. } => "state_tracking",
            Self::ResourceMonitoring { .. } => "resource_monitoring",
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
            Self::Configuration { .. }
            | Self::MetricCollection { .. }
            | Self::StateTracking { .. }
            | Self::ResourceMonitoring { .. }
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
                id.cli_args(None)
            )),
            DropReason::AuthRequired => Self::AuthenticationFailed { id, addr },
            DropReason::ConnLimit => Self::LimitExceeded { id, addr, max },
        }
    }
}

impl PortError {
    /// State that could not be kept (`message` says what and what to do), because of
    /// `cause` when a lower layer refused it.
    #[must_use]
    pub fn state(message: impl Into<String>, cause: Option<Cause>) -> Self {
        Self::StateTracking {
            message: message.into(),
            cause,
        }
    }

    /// The host could not be read or changed (`what` was being done).
    #[must_use]
    pub fn host(what: impl Into<String>, cause: impl Into<Cause>) -> Self {
        Self::ResourceMonitoring {
            what: what.into(),
            cause: cause.into(),
        }
    }

    /// The kernel's counters could not be read.
    #[must_use]
    pub fn counters(cause: GateError) -> Self {
        Self::MetricCollection {
            what: "the kernel maps",
            cause: Box::new(cause),
        }
    }

    /// A configuration that does not hold: `message` says why and what to do.
    #[must_use]
    pub fn configuration(message: impl Into<String>, cause: Option<Cause>) -> Self {
        Self::Configuration {
            message: message.into(),
            cause,
        }
    }
}

impl From<GateError> for PortError {
    /// The kernel refused a change: a full map is its own error (507), anything else is
    /// state that could not be kept.
    fn from(err: GateError) -> Self {
        match err {
            GateError::MapFull { map, capacity } => Self::KernelMapFull { map, capacity },
            other => Self::state(
                "the kernel refused the change, which was not made (see the daemon's log, and `portgate status` for the gate)",
                Some(Box::new(other)),
            ),
        }
    }
}

/// The manager's result.
pub type Result<T, E = PortError> = std::result::Result<T, E>;
