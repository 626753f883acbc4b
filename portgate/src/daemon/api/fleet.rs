//! `/v1/fleet`: the live nodes of the fleet, and the repair pass for a dead one (fleet
//! mode only).

use axum::{http::StatusCode, response::Response};

use super::{Caller, json_body};
use crate::api::{NodeView, RepairRequest, RepairView};

type Body = Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>;

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
