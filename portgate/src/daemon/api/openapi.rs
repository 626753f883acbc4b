//! The API's `OpenAPI` 3.1 document: derived from the wire types ([`crate::api`]) and the
//! `#[utoipa::path]` of every handler, served at `GET /v1/openapi.json` and kept in
//! `docs/openapi.json`. The unit test below fails when the two differ; regenerate the file
//! with `PORTGATE_BLESS=1 cargo test -p portgate --lib openapi`.

use axum::{http::StatusCode, response::Response};
use utoipa::{IntoParams, IntoResponses, OpenApi, openapi};

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
    // The specification's five parts of the API.
    tags(
        (name = "allocation", description = "Ports handed out and given back: allocate, list, show, renew a lease, release"),
        (name = "security", description = "Who may bind and connect: access rules, the owner, grants, client keys of the knock (administrators only), and the check of a source"),
        (name = "monitoring", description = "What the kernel counted and refused, and the daemon's state"),
        (name = "management", description = "Draining a port, namespaces' names, the fleet (fleet mode only), this document"),
        (name = "metrics", description = "The Prometheus exposition"),
    ),
)]
struct ApiDoc;

/// Declares an error answer of the document: a status, what it means, and the
/// [`ErrorBody`] it carries (read by the document only).
macro_rules! error_answer {
    ($($(#[$doc:meta])* $name:ident = $status:literal, $description:literal;)*) => {
        $(
            $(#[$doc])*
            #[derive(IntoResponses)]
            #[response(status = $status, description = $description)]
            #[expect(dead_code, reason = "read by the document only: handlers answer ApiError")]
            pub(super) struct $name(ErrorBody);
        )*
    };
}

error_answer! {
    /// A request that is wrong: its body, its port, its query, or what it asks for.
    BadRequest = 400, "The request is wrong (`bad_json`, `invalid_port`, `invalid_proto`, `invalid_netns`, `bad_query`, `invalid_ip`, `missing_ip`, `invalid_port_request`, `policy_violation`)";
    /// A caller without the right.
    Forbidden = 403, "The caller may not do this (`access_denied`)";
    /// A port that is not allocated.
    NotAllocated = 404, "No such allocation (`not_allocated`)";
    /// A port that cannot be had.
    Conflict = 409, "The port is taken, or the range is full (`port_unavailable`, `range_exhausted`)";
    /// A body over [`crate::api::MAX_BODY_BYTES`].
    TooLarge = 413, "The body is larger than 1 MiB (`bad_body`)";
    /// A failure of the daemon, its store or the kernel.
    Failed = 500, "The daemon could not keep its state or read the kernel (`state_tracking`, `metric_collection`, `resource_monitoring`, `configuration`)";
    /// A caller over its connection limits (any route).
    Busy = 503, "Too many connections (`too_many_connections`)";
    /// A kernel map with no room left.
    MapFull = 507, "A kernel map is full (`kernel_map_full`)";
}

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

/// The parameters of a call on one port: the path's `{port}`, then [`PortQuery`].
pub(super) struct PortParams;

impl IntoParams for PortParams {
    fn into_params(
        _: impl Fn() -> Option<openapi::path::ParameterIn>,
    ) -> Vec<openapi::path::Parameter> {
        use utoipa::openapi::{
            Required,
            path::{ParameterBuilder, ParameterIn},
            schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type},
        };
        let port = ParameterBuilder::new()
            .name("port")
            .parameter_in(ParameterIn::Path)
            .required(Required::True)
            .description(Some("The port"))
            .schema(Some(
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int32)))
                    .minimum(Some(1))
                    .maximum(Some(u16::MAX)),
            ))
            .build();
        let mut params = vec![port];
        params.extend(PortQuery::into_params(|| Some(ParameterIn::Query)));
        params
    }
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
    tag = "management",
    operation_id = "openapi",
    responses(
        (status = 200, description = "The OpenAPI document", content_type = "application/json", body = Object),
        Busy,
    ),
)]
pub(super) async fn openapi_json(caller: Caller) -> Response {
    caller
        .answer("openapi", StatusCode::OK, async |_| Ok(document()))
        .await
}

#[cfg(test)]
mod tests;
