//! The API's `OpenAPI` 3.1 document: derived from the wire types ([`crate::api`]) and the
//! `#[utoipa::path]` of every handler, served at `GET /v1/openapi.json` and kept in
//! `docs/openapi.json`. The unit test below fails when the two differ; regenerate the file
//! with `PORTGATE_BLESS=1 cargo test -p portgate --lib openapi`.

use axum::{http::StatusCode, response::Response};
use utoipa::{IntoParams, OpenApi, openapi};

use super::{Caller, fleet, keys, namespace, ports, reads};
use crate::{
    api::{
        AllocRequest, AllocationView, CheckResponse, ErrorBody, ErrorDetail, EventView, FleetView,
        GrantInfoView, GrantRequest, KeyCreated, KeyPort, KeyRequestBody, KeyView, NetnsView,
        NodeView, OwnerSpec, RangeUsage, RenewRequest, RepairRequest, RepairView, StatusView,
    },
    model::{AccessChange, Protocol},
};

pub mod examples;

/// How the API is reached and who may do what: the document's description.
const DESCRIPTION: &str = "portgate's local API: HTTP/1.1 and JSON on the daemon's Unix socket \
(`[daemon] socket`, by default `/run/portgate/portgate.sock`), for example \
`curl --unix-socket /run/portgate/portgate.sock http://localhost/v1/ports`.

**Authentication** is the socket's peer credentials (`SO_PEERCRED`): there is no token. \
root and the members of the admin group (`[daemon] admin_group`, by default `portgate`) are \
administrators and may do everything. Any other local user may read every view (ports, \
stats, status, events, checks, metrics, namespaces by label or cookie, this document), \
allocate ports in the host's namespace for itself (its uid becomes the port's `owner_uid`; \
an owner cgroup must be a directory delegated to it) and change, renew, release, grant on \
and move only the ports it allocated. Only administrators may place a port in another \
network namespace, name a namespace by path, manage client keys and repair the fleet. A \
caller whose credentials cannot be read has no rights.

**Errors** answer a 4xx or 5xx status with an `ErrorBody`: `{\"error\": {\"code\", \
\"category\", \"message\"}}`; `code` is stable, `message` says what was wrong and what to do. \
Every request is audited. Every route may also answer `503 too_many_connections` when the \
caller holds too many connections at once.

**Ports** are named by the path's `{port}` with `?proto=` (tcp when absent) and `?netns=` \
(the namespace's cookie, as `GET /v1/netns` finds it, or `host`, the default).";

/// The document: every route of [`super::router`].
#[derive(OpenApi)]
#[openapi(
    info(
        title = "portgate",
        description = DESCRIPTION,
        license(name = "MIT OR Apache-2.0", identifier = "MIT OR Apache-2.0"),
    ),
    servers((url = "http://localhost", description = "the daemon's Unix socket")),
    paths(
        ports::alloc,
        ports::list,
        ports::show,
        ports::release,
        ports::drain,
        ports::renew,
        ports::access,
        ports::owner,
        ports::grant,
        ports::grants,
        ports::revoke_grant,
        ports::check,
        namespace::find,
        keys::add,
        keys::list,
        keys::revoke,
        fleet::nodes,
        fleet::repair,
        reads::stats,
        reads::events,
        reads::status,
        reads::metrics,
        openapi_json,
    ),
    components(schemas(
        AllocRequest,
        AllocationView,
        AccessChange,
        OwnerSpec,
        RenewRequest,
        GrantRequest,
        GrantInfoView,
        CheckResponse,
        NetnsView,
        KeyRequestBody,
        KeyPort,
        KeyView,
        KeyCreated,
        NodeView,
        RepairRequest,
        RepairView,
        EventView,
        StatusView,
        RangeUsage,
        FleetView,
        ErrorBody,
        ErrorDetail,
    )),
    tags(
        (name = "ports", description = "Allocations and their policy"),
        (name = "keys", description = "Client keys of the knock (administrators only)"),
        (name = "fleet", description = "The fleet (fleet mode only)"),
        (name = "views", description = "What the daemon and the kernel hold"),
    ),
)]
struct ApiDoc;

/// The query of a call on one port: its protocol and namespace.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[expect(
    dead_code,
    reason = "read by the document only: handlers read the query map"
)]
pub(super) struct PortQuery {
    /// The protocol (tcp when absent).
    proto: Option<Protocol>,
    /// The namespace: its cookie (`netns` of the views), or `host` (the default).
    #[param(value_type = Option<String>, pattern = "^(host|[0-9]+)$", example = "host")]
    netns: Option<String>,
}

/// The API's `OpenAPI` document.
#[must_use]
pub fn document() -> openapi::OpenApi {
    ApiDoc::openapi()
}

/// The document as `docs/openapi.json` holds it: pretty JSON with a final newline.
#[must_use]
pub fn document_json() -> String {
    let mut text = document()
        .to_pretty_json()
        .unwrap_or_else(|err| format!("{{\"error\": \"{err}\"}}"));
    text.push('\n');
    text
}

/// `GET /v1/openapi.json`: this document, for every caller.
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    tag = "views",
    operation_id = "openapi",
    responses(
        (status = 200, description = "The OpenAPI document", content_type = "application/json", body = Object),
        (status = 503, description = "Too many connections (`too_many_connections`)", body = ErrorBody),
    ),
)]
pub(super) async fn openapi_json(caller: Caller) -> Response {
    caller
        .answer("openapi", StatusCode::OK, async |_| Ok(document()))
        .await
}

#[cfg(test)]
mod tests;
