//! A test server for the client and the CLI: a router on a socket of its own.

use std::collections::HashMap;

use axum::{Json, Router, extract::Query, http::StatusCode, routing::get};

use super::Client;
use crate::{
    api::{AllocationView, ErrorBody, NetnsView},
    model::{NetnsId, PortAccessControl, PortId, PortStatus, Protocol, Timeline},
};

/// Serves `router` on a socket in a new temporary directory (kept while the directory
/// lives) and returns a client of it.
pub(crate) async fn serve(router: axum::Router) -> (tempfile::TempDir, Client) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let socket = dir.path().join("portgate.sock");
    let listener = tokio::net::UnixListener::bind(&socket).expect("binding the test socket");
    tokio::spawn(async move {
        axum::serve(listener, router)
            .await
            .expect("serving the test router");
    });
    (dir, Client::new(socket))
}

/// An Active allocation of `port`/tcp owned by `web`.
pub(crate) fn view(port: u16) -> AllocationView {
    AllocationView {
        id: PortId::new(port, Protocol::Tcp),
        netns_label: None,
        published: None,
        status: PortStatus::Active,
        owner: "web".to_owned(),
        owner_uid: Some(1000),
        cgroup: None,
        access: PortAccessControl {
            allowed_ips: ["10.0.0.0/8".parse().expect("a prefix")]
                .into_iter()
                .collect(),
            max_connections: 5,
            require_authentication: false,
        },
        timeline: Timeline {
            allocated_at: 1_700_000_000_000,
            ttl: Some(std::time::Duration::from_mins(5)),
            lease_expires_at: Some(1_700_000_300_000),
            draining_since: None,
            closed_at: None,
            netns_gone_at: None,
        },
        connections: 2,
    }
}

/// A stand-in for `GET /v1/netns`: `net:[4026532999]` is the namespace 4097; nothing else.
pub(crate) fn netns_route() -> Router {
    Router::new().route(
        "/v1/netns",
        get(|Query(query): Query<HashMap<String, String>>| async move {
            match query["name"].as_str() {
                "net:[4026532999]" => Ok(Json(NetnsView {
                    netns: NetnsId(4097),
                    label: "net:[4026532999]".to_owned(),
                })),
                name => Err((
                    StatusCode::NOT_FOUND,
                    Json(ErrorBody::bad_request(
                        "unknown_netns",
                        format!("no allocation's namespace is labelled {name:?}"),
                    )),
                )),
            }
        }),
    )
}
