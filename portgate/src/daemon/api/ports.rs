//! The calls on ports: allocate, list, show, release and drain, renew, change access,
//! grant, check.

use std::net::IpAddr;

use axum::{body::Bytes, extract::rejection::BytesRejection, http::StatusCode, response::Response};

use super::{ApiError, Caller, PortCall, json_body, placement};
use crate::{
    api::{
        AllocRequest, AllocationView, CheckResponse, GrantInfoView, GrantRequest, OwnerSpec,
        RenewRequest,
    },
    daemon::audit::AuditParams,
    manager::PortError,
    model::{AccessChange, AllocationRequest, NetnsId, Owner, PortId, Protocol},
};

type Body = Result<Bytes, BytesRejection>;

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
        let connections = app.manager.get_state(id).await.connections;
        Ok(AllocationView::new(&held, connections))
    })
    .await
}

pub(super) async fn release(call: PortCall) -> Response {
    release_as(call, "release").await
}

pub(super) async fn drain(call: PortCall) -> Response {
    release_as(call, "drain").await
}

pub(super) async fn renew(call: PortCall, body: Body) -> Response {
    call.change("renew", StatusCode::OK, async |app, actor, id, audit| {
        let request: RenewRequest = if body.as_ref().is_ok_and(Bytes::is_empty) {
            RenewRequest::default()
        } else {
            json_body(body)?
        };
        audit.params.ttl = request.ttl.map(AuditParams::duration);
        let held = app.manager.renew(id, request.ttl, actor).await?;
        Ok(AllocationView::new(&held, 0))
    })
    .await
}

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
        let connections = app.manager.get_state(id).await.connections;
        Ok(AllocationView::new(&held, connections))
    })
    .await
}

/// `PATCH /v1/ports/{port}/owner`: moves the port to the cgroup a request names (a
/// container restarted into a new cgroup). A process or container named must be in the
/// port's own namespace.
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
        let connections = app.manager.get_state(id).await.connections;
        Ok(AllocationView::new(&held, connections))
    })
    .await
}

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
