//! The calls on ports: allocate, list, show, release and drain, renew, change access,
//! grant, check.

use std::net::IpAddr;

use axum::{body::Bytes, extract::rejection::BytesRejection, http::StatusCode, response::Response};

use super::{
    ApiError, App, Caller, PortCall, json_body,
    openapi::{
        BadRequest, Busy, Conflict, Failed, Forbidden, MapFull, NotAllocated, PortParams, TooLarge,
        examples,
    },
    placement,
};
use crate::{
    api::{
        AllocRequest, AllocationView, CheckResponse, GrantInfoView, GrantRequest, OwnerSpec,
        RenewRequest,
    },
    daemon::audit::AuditParams,
    manager::PortError,
    model::{AccessChange, Allocation, AllocationRequest, NetnsId, Owner, PortId, Protocol},
};

type Body = Result<Bytes, BytesRejection>;

/// Allocates a port.
#[utoipa::path(
    post,
    path = "/v1/ports",
    tag = "allocation",
    operation_id = "alloc",
    request_body(content = AllocRequest, example = examples::alloc_request),
    responses(
        (status = 201, description = "The allocation", body = AllocationView, example = examples::allocation),
        BadRequest, Forbidden, Conflict, TooLarge, Failed, Busy, MapFull,
    ),
)]
pub(super) async fn alloc(caller: Caller, body: Body) -> Response {
    caller
        .answer("alloc", StatusCode::CREATED, async |audit| {
            let actor = caller.actor()?;
            let request: AllocRequest = json_body(body)?;
            audit.params = alloc_params(&request);
            let protocol = request.proto.unwrap_or(Protocol::Tcp);
            audit.id = request.port.map(|port| PortId::new(port, protocol));
            let placement = placement::resolve(&request.owner_spec(), actor)?;
            if let (Some(port), Some(netns)) = (request.port, &placement.netns) {
                audit.id = Some(PortId {
                    netns: netns.id,
                    ..PortId::new(port, protocol)
                });
            }
            let request = AllocationRequest {
                owner: Owner {
                    cgroup: placement.owner,
                    ..Owner::named(&request.owner)
                },
                port: request.port,
                protocol,
                access: request.access(),
                ttl: request.ttl,
                netns: placement.netns,
                publish: request.publish,
            };
            let allocation = caller.app.manager.allocate(request, actor).await?;
            audit.id = Some(allocation.id);
            Ok(AllocationView::new(&allocation, 0))
        })
        .await
}

/// What an allocation request asks for, as its audit record shows it.
fn alloc_params(request: &AllocRequest) -> AuditParams {
    let (allow, allow_count) = AuditParams::prefixes(request.allow.iter());
    AuditParams {
        owner: Some(AuditParams::text(&request.owner)),
        allow,
        allow_count,
        max_connections: request.max_conns,
        require_auth: request.require_auth.then_some(true),
        ttl: request.ttl.map(AuditParams::duration),
        publish: request.publish,
        ..owner_params(&request.owner_spec())
    }
}

/// The owner (cgroup, process, container, namespace) a request names, as its audit record
/// shows it.
fn owner_params(spec: &OwnerSpec) -> AuditParams {
    AuditParams {
        cgroup: spec.cgroup.as_deref().map(AuditParams::path),
        owner_pid: spec.pid,
        container: spec.container.as_deref().map(AuditParams::text),
        netns_path: spec.netns.as_deref().map(AuditParams::path),
        ..AuditParams::default()
    }
}

/// Every allocation.
#[utoipa::path(
    get,
    path = "/v1/ports",
    tag = "allocation",
    operation_id = "list",
    responses(
        (status = 200, description = "Every allocation", body = Vec<AllocationView>, example = examples::allocations),
        Busy,
    ),
)]
pub(super) async fn list(caller: Caller) -> Response {
    caller
        .answer("list", StatusCode::OK, async |_| {
            Ok(caller
                .app
                .manager
                .allocations()
                .await
                .iter()
                .map(|(held, connections)| AllocationView::new(held, *connections))
                .collect::<Vec<_>>())
        })
        .await
}

/// One allocation.
#[utoipa::path(
    get,
    path = "/v1/ports/{port}",
    tag = "allocation",
    operation_id = "show",
    params(PortParams),
    responses(
        (status = 200, description = "The allocation", body = AllocationView, example = examples::allocation),
        BadRequest, NotAllocated, Failed, Busy,
    ),
)]
pub(super) async fn show(call: PortCall) -> Response {
    call.answer("show", StatusCode::OK, async |app, id, _, _| {
        let held = app
            .manager
            .allocation(id)
            .await
            .ok_or(PortError::NotAllocated(id))?;
        let state = app.manager.get_state(id).await;
        Ok(AllocationView::new(&held, state.connections))
    })
    .await
}

/// `DELETE /v1/ports/{port}` and `POST .../drain` are the one release: the port goes
/// Draining. The audit log names the action asked for.
async fn release_as(call: PortCall, action: &'static str) -> Response {
    call.change(action, StatusCode::OK, async |app, actor, id, _| {
        let held = app.manager.release(id, actor).await?;
        Ok(view(app, id, &held).await)
    })
    .await
}

/// Releases a port: it goes Draining (as `drain`).
#[utoipa::path(
    delete,
    path = "/v1/ports/{port}",
    tag = "allocation",
    operation_id = "release",
    params(PortParams),
    responses(
        (status = 200, description = "The allocation, now draining", body = AllocationView, example = examples::draining),
        BadRequest, Forbidden, NotAllocated, Failed, Busy, MapFull,
    ),
)]
pub(super) async fn release(call: PortCall) -> Response {
    release_as(call, "release").await
}

/// Drains a port: no new connections (as `release`).
#[utoipa::path(
    post,
    path = "/v1/ports/{port}/drain",
    tag = "management",
    operation_id = "drain",
    params(PortParams),
    responses(
        (status = 200, description = "The allocation, now draining", body = AllocationView, example = examples::draining),
        BadRequest, Forbidden, NotAllocated, Failed, Busy, MapFull,
    ),
)]
pub(super) async fn drain(call: PortCall) -> Response {
    release_as(call, "drain").await
}

/// Renews a port's lease (an empty body keeps its length).
#[utoipa::path(
    post,
    path = "/v1/ports/{port}/renew",
    tag = "allocation",
    operation_id = "renew",
    params(PortParams),
    request_body(content = Option<RenewRequest>, description = "The new lease; none (an empty body) keeps its length", example = examples::renew_request),
    responses(
        (status = 200, description = "The allocation with its new lease", body = AllocationView, example = examples::allocation),
        BadRequest, Forbidden, NotAllocated, TooLarge, Failed, Busy,
    ),
)]
pub(super) async fn renew(call: PortCall, body: Body) -> Response {
    call.change("renew", StatusCode::OK, async |app, actor, id, audit| {
        let request: RenewRequest = if body.as_ref().is_ok_and(Bytes::is_empty) {
            RenewRequest::default()
        } else {
            json_body(body)?
        };
        audit.params.ttl = request.ttl.map(AuditParams::duration);
        let held = app.manager.renew(id, request.ttl, actor).await?;
        Ok(view(app, id, &held).await)
    })
    .await
}

/// Changes a port's access control.
#[utoipa::path(
    patch,
    path = "/v1/ports/{port}/access",
    tag = "security",
    operation_id = "access",
    params(PortParams),
    request_body(content = AccessChange, example = examples::access_change),
    responses(
        (status = 200, description = "The allocation with its new access control", body = AllocationView, example = examples::allocation),
        BadRequest, Forbidden, NotAllocated, TooLarge, Failed, Busy, MapFull,
    ),
)]
pub(super) async fn access(call: PortCall, body: Body) -> Response {
    call.change("access", StatusCode::OK, async |app, actor, id, audit| {
        let change: AccessChange = json_body(body)?;
        let (allow, allow_count) = AuditParams::prefixes(change.allow.iter());
        let (remove, remove_count) = AuditParams::prefixes(change.remove.iter());
        audit.params = AuditParams {
            allow,
            allow_count,
            remove,
            remove_count,
            max_connections: change.max_connections,
            require_auth: change.require_authentication,
            ..AuditParams::default()
        };
        let held = app.manager.set_access(id, change, actor).await?;
        Ok(view(app, id, &held).await)
    })
    .await
}

/// Moves a port to a new owner cgroup.
///
/// `PATCH /v1/ports/{port}/owner`: moves the port to the cgroup a request names (a
/// container restarted into a new cgroup). A process or container named must be in the
/// port's own namespace.
#[utoipa::path(
    patch,
    path = "/v1/ports/{port}/owner",
    tag = "security",
    operation_id = "owner",
    params(PortParams),
    request_body(content = OwnerSpec, example = examples::owner_spec),
    responses(
        (status = 200, description = "The allocation with its new owner", body = AllocationView, example = examples::allocation),
        BadRequest, Forbidden, NotAllocated, TooLarge, Failed, Busy, MapFull,
    ),
)]
pub(super) async fn owner(call: PortCall, body: Body) -> Response {
    call.change("owner", StatusCode::OK, async |app, actor, id, audit| {
        let spec: OwnerSpec = json_body(body)?;
        audit.params = owner_params(&spec);
        spec.check_new_owner()
            .map_err(|message| ApiError::bad("invalid_port_request", message))?;
        let placement = placement::resolve(&spec, actor)?;
        let Some(cgroup) = placement.owner else {
            // check_new_owner made sure one is named, and every one names a cgroup.
            return Err(ApiError::bad(
                "invalid_port_request",
                "name the new owner: cgroup, pid or container",
            ));
        };
        let named_netns = placement.netns.as_ref().map_or(NetnsId::HOST, |netns| netns.id);
        if (spec.pid.is_some() || spec.container.is_some()) && named_netns != id.netns {
            return Err(ApiError::Port(PortError::InvalidPortRequest(format!(
                "the process or container named is in another network namespace than port {id}: name one in the port's namespace, or give its cgroup"
            ))));
        }
        let held = app.manager.set_owner(id, cgroup, actor).await?;
        Ok(view(app, id, &held).await)
    })
    .await
}

/// Grants a source address new connections to a port that requires authentication.
#[utoipa::path(
    post,
    path = "/v1/ports/{port}/grants",
    tag = "security",
    operation_id = "grant",
    params(PortParams),
    request_body(content = GrantRequest, example = examples::grant_request),
    responses(
        (status = 204, description = "Granted"),
        BadRequest, Forbidden, NotAllocated, TooLarge, Failed, Busy, MapFull,
    ),
)]
pub(super) async fn grant(call: PortCall, body: Body) -> Response {
    call.change(
        "grant",
        StatusCode::NO_CONTENT,
        async |app, actor, id, audit| {
            let request: GrantRequest = json_body(body)?;
            audit.addr = Some(request.ip);
            audit.params.ttl = Some(AuditParams::duration(request.ttl));
            Ok(app
                .manager
                .grant(id, request.ip, request.ttl, actor)
                .await?)
        },
    )
    .await
}

/// A port's grants.
#[utoipa::path(
    get,
    path = "/v1/ports/{port}/grants",
    tag = "security",
    operation_id = "grants",
    params(PortParams),
    responses(
        (status = 200, description = "Its grants", body = Vec<GrantInfoView>, example = examples::grants),
        BadRequest, Forbidden, NotAllocated, Failed, Busy,
    ),
)]
pub(super) async fn grants(call: PortCall) -> Response {
    let actor = call.caller.actor();
    call.answer("grants", StatusCode::OK, async |app, id, _, _| {
        let grants = app.manager.grants(id, actor?).await?;
        Ok(grants
            .into_iter()
            .map(|grant| GrantInfoView {
                ip: grant.addr,
                expires_in: grant.expires_in,
                issued_by: grant.issued_by.map(|by| by.to_string()),
            })
            .collect::<Vec<_>>())
    })
    .await
}

/// Revokes a source address's grant.
#[utoipa::path(
    delete,
    path = "/v1/ports/{port}/grants",
    tag = "security",
    operation_id = "revoke_grant",
    params(
        PortParams,
        ("ip" = String, Query, description = "The source address", example = "192.0.2.10"),
    ),
    responses(
        (status = 204, description = "Revoked"),
        BadRequest, Forbidden, NotAllocated, Failed, Busy,
    ),
)]
pub(super) async fn revoke_grant(call: PortCall) -> Response {
    let actor = call.caller.actor();
    call.answer(
        "revoke",
        StatusCode::NO_CONTENT,
        async |app, id, query, _| {
            let ip = query_ip(&query)?;
            Ok(app.manager.revoke_grant(id, ip, actor?).await?)
        },
    )
    .await
}

/// The `?ip=ADDR` of a request.
fn query_ip(query: &std::collections::HashMap<String, String>) -> Result<IpAddr, ApiError> {
    let raw = query
        .get("ip")
        .ok_or_else(|| ApiError::bad("missing_ip", "give the source address as ?ip=ADDR"))?;
    raw.parse().map_err(|_| {
        ApiError::bad(
            "invalid_ip",
            format!("{raw:?} is not an IP address: give an IPv4 or IPv6 address"),
        )
    })
}

/// Whether a new connection from a source address would get in.
#[utoipa::path(
    get,
    path = "/v1/ports/{port}/check",
    tag = "security",
    operation_id = "check",
    params(
        PortParams,
        ("ip" = String, Query, description = "The source address", example = "192.0.2.10"),
    ),
    responses(
        (status = 200, description = "The verdict", body = CheckResponse, example = examples::check),
        BadRequest, Busy,
    ),
)]
pub(super) async fn check(call: PortCall) -> Response {
    call.answer("check", StatusCode::OK, async |app, id, query, _| {
        let ip = query_ip(&query)?;
        let (allowed, reason, message) = match app.manager.refusal(id, ip).await {
            None => (true, None, None),
            Some((reason, err)) => (false, Some(reason.name().to_owned()), Some(err.to_string())),
        };
        Ok(CheckResponse {
            id,
            ip,
            allowed,
            reason,
            message,
            warning: app.manager.proxy_warning_of(id).await,
        })
    })
    .await
}

/// The view of a port the manager just changed, with its connections open now.
async fn view(app: &App, id: PortId, held: &Allocation) -> AllocationView {
    let connections = app.manager.get_state(id).await.connections;
    AllocationView::new(held, connections)
}
