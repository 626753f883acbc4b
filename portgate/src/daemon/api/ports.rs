//! The calls on ports: allocate, list, show, release and drain, renew, change access,
//! grant, check.

use std::{net::IpAddr, path::Path};

use axum::{body::Bytes, extract::rejection::BytesRejection, http::StatusCode, response::Response};

use super::{ApiError, ApiResult, Caller, PortCall, json_body};
use crate::{
    api::{AllocRequest, AllocationView, CheckResponse, GrantRequest, RenewRequest},
    host,
    manager::{Actor, PortError},
    model::{AccessChange, AllocationRequest, Owner, OwnerCgroup, PortId, Protocol},
};

type Body = Result<Bytes, BytesRejection>;

pub(super) async fn alloc(caller: Caller, body: Body) -> Response {
    caller
        .answer("alloc", StatusCode::CREATED, async |audit| {
            let actor = caller.actor()?;
            let request: AllocRequest = json_body(body)?;
            let protocol = request.proto.unwrap_or(Protocol::Tcp);
            audit.id = request.port.map(|port| PortId::new(port, protocol));
            let request = AllocationRequest {
                owner: Owner {
                    cgroup: owner_cgroup(&request, actor)?,
                    ..Owner::named(&request.owner)
                },
                port: request.port,
                protocol,
                access: request.access(),
                ttl: request.ttl,
            };
            let allocation = caller.app.manager.allocate(request, actor).await?;
            audit.id = Some(allocation.id);
            Ok(AllocationView::new(&allocation, 0))
        })
        .await
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
    call.answer("show", StatusCode::OK, async |app, id, _| {
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
    call.change(action, StatusCode::OK, async |app, actor, id| {
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
    call.change("renew", StatusCode::OK, async |app, actor, id| {
        let request: RenewRequest = if body.as_ref().is_ok_and(Bytes::is_empty) {
            RenewRequest::default()
        } else {
            json_body(body)?
        };
        let held = app.manager.renew(id, request.ttl, actor).await?;
        Ok(AllocationView::new(&held, 0))
    })
    .await
}

pub(super) async fn access(call: PortCall, body: Body) -> Response {
    call.change("access", StatusCode::OK, async |app, actor, id| {
        let change: AccessChange = json_body(body)?;
        let held = app.manager.set_access(id, change, actor).await?;
        let connections = app.manager.get_state(id).await.connections;
        Ok(AllocationView::new(&held, connections))
    })
    .await
}

pub(super) async fn grant(call: PortCall, body: Body) -> Response {
    call.change("grant", StatusCode::NO_CONTENT, async |app, actor, id| {
        let request: GrantRequest = json_body(body)?;
        Ok(app
            .manager
            .grant(id, request.ip, request.ttl, actor)
            .await?)
    })
    .await
}

pub(super) async fn check(call: PortCall) -> Response {
    call.answer("check", StatusCode::OK, async |app, id, query| {
        let raw = query
            .get("ip")
            .ok_or_else(|| ApiError::bad("missing_ip", "give the source address as ?ip=ADDR"))?;
        let ip: IpAddr = raw.parse().map_err(|_| {
            ApiError::bad(
                "invalid_ip",
                format!("{raw:?} is not an IP address: give an IPv4 or IPv6 address"),
            )
        })?;
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
        })
    })
    .await
}

/// Resolves the owner cgroup of a request: `--cgroup PATH` or `--pid PID`.
fn owner_cgroup(request: &AllocRequest, actor: Actor) -> ApiResult<Option<OwnerCgroup>> {
    let path = match (&request.cgroup, request.pid) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad(
                "invalid_port_request",
                "give either cgroup or pid, not both",
            ));
        }
        (Some(path), None) => {
            if !path.is_absolute() {
                return Err(ApiError::Port(PortError::InvalidPortRequest(format!(
                    "cgroup {} is not an absolute path: give the cgroup2 directory, e.g. /sys/fs/cgroup/my.slice",
                    path.display()
                ))));
            }
            path.clone()
        }
        (None, Some(pid)) => {
            host::cgroups::of_pid(pid).map_err(|err| {
                ApiError::Port(PortError::InvalidPortRequest(format!(
                    "the cgroup of process {pid} could not be found ({err}): give a running process of this host's pid namespace, or --cgroup"
                )))
            })?
        }
        (None, None) => return Ok(None),
    };
    // One open of the directory gives the owner, id and level together (no symlink race).
    let info = host::cgroups::info(Path::new(&path));
    if let Actor::User(uid) = actor {
        // The same answer whatever the reason, so that it does not tell which paths exist.
        if !info.as_ref().is_ok_and(|info| info.owner_uid == uid) {
            return Err(ApiError::Port(PortError::AccessDenied(format!(
                "{} is not a cgroup delegated to uid {uid}: name a cgroup directory you own, or ask an admin to allocate",
                path.display()
            ))));
        }
    }
    let info = info.map_err(|err| {
        ApiError::Port(PortError::InvalidPortRequest(format!(
            "{err}: give a cgroup2 directory"
        )))
    })?;
    Ok(Some(OwnerCgroup {
        path: info.path,
        id: info.id,
        level: info.level,
    }))
}
