//! How the API, the CLI's JSON and `portgate maps` spell the model's fields.
//!
//! A view flattens a model type with one of these (`#[serde(flatten, with = "...")]`):
//! the concept keeps one type on every layer, the store keeps the specification's field
//! names, and the JSON users read keeps its own (`proto`, `allow`, `require_auth`).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{
    access::{Allowlist, PortAccessControl},
    port::{NetnsId, PortId, Protocol},
};

/// [`PortId`] as the keys `port`, `proto` and `netns` (the namespace's cookie, absent for
/// the host's).
#[derive(Serialize, Deserialize, ToSchema)]
#[serde(remote = "PortId")]
pub struct PortIdFields {
    #[serde(default, skip_serializing_if = "NetnsId::is_host")]
    netns: NetnsId,
    #[schema(maximum = 65535)]
    port: u16,
    #[serde(rename = "proto")]
    protocol: Protocol,
}

/// [`PortAccessControl`] as the keys `allow`, `max_connections` and `require_auth`.
#[derive(Serialize, Deserialize, ToSchema)]
#[serde(remote = "PortAccessControl")]
pub struct AccessFields {
    #[serde(rename = "allow")]
    allowed_ips: Allowlist,
    #[schema(format = Int64, maximum = 4_294_967_295_u32)]
    max_connections: u32,
    #[serde(rename = "require_auth")]
    require_authentication: bool,
}
