//! The records every layer shares: a port's identity, its owner, its access control, its
//! allocation and policy, and what its counters say.
//!
//! Each concept has one type here. The store keeps these records as they are; the kernel
//! gate writes [`PortPolicy`]; the manager changes [`Allocation`]s; the API and
//! `portgate maps` show them through views that flatten them, spelled as in
//! [`spelling`]. Nothing here imports another of portgate's modules.

mod access;
mod allocation;
mod client_key;
mod metrics;
mod owner;
mod policy;
mod port;
pub mod spelling;

pub use self::{
    access::{AccessChange, Allowlist, PortAccessControl},
    allocation::{
        Allocation, AllocationRequest, HostPort, NetnsRef, PortState, Timeline, UnixMillis,
        add_duration, now_millis,
    },
    client_key::{CLIENT_KEY_BYTES, ClientKey, GrantIssued, Issuer},
    metrics::{DropCounts, GrantView, PortMetrics, PortReport},
    owner::{Owner, OwnerCgroup},
    policy::{DropReason, PortPolicy},
    port::{NetnsId, NetnsInfo, PortId, PortStatus, Protocol, UnknownProtocol},
};
#[cfg(test)]
pub(crate) use self::{allocation::sample_allocation, metrics::sample_metrics};
