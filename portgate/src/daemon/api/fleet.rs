//! `/v1/fleet`: the live nodes of the fleet, and the repair pass for a dead one (fleet
//! mode only).

use axum::{http::StatusCode, response::Response};

use super::{
    Caller, json_body,
    openapi::{Busy, Forbidden, MapFull, TooLarge, examples},
};
use crate::api::{ErrorBody, NodeView, RepairRequest, RepairView};

type Body = Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>;

/// The live nodes of the fleet.
#[utoipa::path(
    get,
    path = "/v1/fleet/nodes",
    tag = "management",
    operation_id = "fleet_nodes",
    responses(
        (status = 200, description = "The live nodes", body = Vec<NodeView>, example = examples::nodes),
        (status = 400, description = "This daemon is not in fleet mode (`invalid_port_request`)", body = ErrorBody),
        (status = 500, description = "etcd could not be reached (`state_tracking`)", body = ErrorBody),
        Busy,
    ),
)]
pub(super) async fn nodes(caller: Caller) -> Response {
    caller
        .answer("fleet_nodes", StatusCode::OK, async |_| {
            Ok(caller
                .app
                .manager
                .fleet_nodes()
                .await?
                .into_iter()
                .map(|info| NodeView {
                    node: info.node,
                    version: info.version,
                    joined_at: info.joined_at,
                })
                .collect::<Vec<_>>())
        })
        .await
}

/// The repair pass for a dead node: its ports are taken over and released.
#[utoipa::path(
    post,
    path = "/v1/fleet/repair",
    tag = "management",
    operation_id = "fleet_repair",
    request_body(content = RepairRequest, example = examples::repair_request),
    responses(
        (status = 200, description = "The ports taken over and released", body = RepairView, example = examples::repair),
        (status = 400, description = "The request is wrong, the node is this one or alive, or this daemon is not in fleet mode (`bad_json`, `invalid_port_request`, `policy_violation`)", body = ErrorBody),
        (status = 500, description = "etcd could not be reached (`state_tracking`)", body = ErrorBody),
        Forbidden, TooLarge, Busy, MapFull,
    ),
)]
pub(super) async fn repair(caller: Caller, body: Body) -> Response {
    caller
        .answer("fleet_repair", StatusCode::OK, async |audit| {
            let request: RepairRequest = json_body(body)?;
            audit.params.node = Some(crate::daemon::audit::AuditParams::text(&request.node));
            // The second look comes a lease later: a node that is only slow renews by then.
            let confirm_after = caller
                .app
                .config
                .cluster
                .as_ref()
                .map(|cluster| cluster.lease)
                .unwrap_or_default();
            let released = caller
                .app
                .manager
                .repair_fleet_node(&request.node, confirm_after, caller.actor()?)
                .await?;
            Ok(RepairView {
                node: request.node,
                released,
            })
        })
        .await
}
