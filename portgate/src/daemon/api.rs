//! The local API's handlers: HTTP + JSON over the Unix socket (routes in [`crate::api`]).
//!
//! Every request is authorized from the socket's peer credentials, timed into the latency
//! histogram, and written to the audit log with its outcome. Bad input (JSON, ports,
//! addresses, durations) is refused with a 4xx and an [`ErrorBody`] before the manager is
//! asked, so it changes nothing.

use std::{collections::HashMap, net::IpAddr, path::Path, sync::Arc, time::Instant};

use axum::{
    Json, Router,
    body::{Body, Bytes},
    extract::Request,
    extract::{
        ConnectInfo, DefaultBodyLimit, Path as UrlPath, Query, State, rejection::BytesRejection,
    },
    http::{StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use futures_util::stream;
use serde::{Serialize, de::DeserializeOwned};

use super::{
    App,
    audit::{AuditRecord, now_rfc3339},
    auth::Peer,
};
use crate::{
    api::{
        AllocRequest, AllocationView, CheckResponse, ErrorBody, EventView, GrantRequest,
        MAX_BODY_BYTES, RangeUsage, RenewRequest, StatusView,
    },
    host,
    manager::{Actor, PortError},
    model::{
        AccessChange, AllocationRequest, Owner, OwnerCgroup, PortId, PortStatus, Protocol,
        UnknownProtocol,
    },
};

/// The API router.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/ports", post(alloc).get(list))
        .route("/v1/ports/{port}", get(show).delete(release))
        .route("/v1/ports/{port}/drain", post(drain))
        .route("/v1/ports/{port}/renew", post(renew))
        .route("/v1/ports/{port}/access", axum::routing::patch(access))
        .route("/v1/ports/{port}/grants", post(grant))
        .route("/v1/ports/{port}/check", get(check))
        .route("/v1/stats", get(stats))
        .route("/v1/events", get(events))
        .route("/v1/status", get(status))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(run_to_completion))
        .with_state(app)
}

/// A failed request.
#[derive(Debug)]
pub enum ApiError {
    /// The manager refused it.
    Port(PortError),
    /// The request itself is wrong.
    Bad {
        /// HTTP status.
        status: StatusCode,
        /// The error body.
        body: ErrorBody,
    },
}

impl ApiError {
    fn bad(code: &str, message: impl Into<String>) -> Self {
        Self::Bad {
            status: StatusCode::BAD_REQUEST,
            body: ErrorBody::bad_request(code, message),
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            Self::Port(err) => {
                StatusCode::from_u16(err.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
            }
            Self::Bad { status, .. } => *status,
        }
    }

    fn code(&self) -> String {
        match self {
            Self::Port(err) => err.code().to_owned(),
            Self::Bad { body, .. } => body.error.code.clone(),
        }
    }

    fn into_response(self) -> Response {
        let status = self.status();
        let body = match self {
            Self::Port(err) => ErrorBody::of(&err),
            Self::Bad { body, .. } => body,
        };
        (status, Json(body)).into_response()
    }
}

impl From<PortError> for ApiError {
    fn from(err: PortError) -> Self {
        Self::Port(err)
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// What the audit record of a request names.
struct Audit {
    action: &'static str,
    id: Option<PortId>,
    started: Instant,
}

impl Audit {
    fn new(action: &'static str) -> Self {
        Self {
            action,
            id: None,
            started: Instant::now(),
        }
    }
}

impl App {
    /// Audits, times and answers a request.
    fn finish<T: Serialize>(
        &self,
        peer: &Peer,
        audit: &Audit,
        ok: StatusCode,
        result: ApiResult<T>,
    ) -> Response {
        let (status, code, response) = match result {
            Ok(value) => (ok, "ok".to_owned(), (ok, Json(value)).into_response()),
            Err(err) => (err.status(), err.code(), err.into_response()),
        };
        self.answered(peer, audit, status, &code);
        response
    }

    fn answered(&self, peer: &Peer, audit: &Audit, status: StatusCode, code: &str) {
        self.manager
            .monitor()
            .record_api_latency(audit.action, audit.started.elapsed().as_secs_f64());
        let proto = audit.id.map(|id| id.protocol.to_string());
        self.audit.record(&AuditRecord {
            time: now_rfc3339(),
            uid: peer.uid,
            pid: peer.pid,
            action: audit.action,
            port: audit.id.map(|id| id.port),
            proto: proto.as_deref(),
            result: code,
            status: status.as_u16(),
        });
    }

    fn actor(&self, peer: &Peer) -> ApiResult<Actor> {
        self.admin.actor(peer).ok_or_else(|| {
            ApiError::Port(PortError::AccessDenied(
                "the caller's credentials could not be read from the socket".to_owned(),
            ))
        })
    }

    /// Who asks to change which port: the caller's rights and the URL's port (recorded in
    /// the audit record).
    fn port_change(
        &self,
        peer: &Peer,
        port: &str,
        query: QueryMap,
        audit: &mut Audit,
    ) -> ApiResult<(Actor, PortId)> {
        let actor = self.actor(peer)?;
        let id = self.port_id(port, &query_map(query)?)?;
        audit.id = Some(id);
        Ok((actor, id))
    }

    /// The port of a URL, checked against the managed range.
    fn port_id(&self, raw: &str, query: &HashMap<String, String>) -> ApiResult<PortId> {
        let port: u16 = raw.parse().map_err(|_| {
            ApiError::bad(
                "invalid_port",
                format!("{raw:?} is not a port number: give 1-65535"),
            )
        })?;
        let config = self.manager.config();
        if !(config.min_port..=config.max_port).contains(&port) {
            return Err(ApiError::Port(PortError::InvalidPortRequest(format!(
                "port {port} is outside the managed range {}-{}: see `portgate status`",
                config.min_port, config.max_port
            ))));
        }
        Ok(PortId::new(port, protocol(query)?))
    }
}

fn protocol(query: &HashMap<String, String>) -> ApiResult<Protocol> {
    match query.get("proto") {
        None => Ok(Protocol::Tcp),
        Some(name) => name
            .parse()
            .map_err(|err: UnknownProtocol| ApiError::bad("invalid_proto", err.to_string())),
    }
}

/// Decodes a JSON body, with a message naming the field that is wrong.
fn json_body<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> ApiResult<T> {
    let bytes = body.map_err(|rejection| ApiError::Bad {
        status: rejection.status(),
        body: ErrorBody::bad_request(
            "bad_body",
            format!(
                "{}: a request body may have at most {MAX_BODY_BYTES} bytes",
                rejection.body_text()
            ),
        ),
    })?;
    let mut decoder = serde_json::Deserializer::from_slice(&bytes);
    serde_path_to_error::deserialize(&mut decoder).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        ApiError::bad(
            "bad_json",
            if path == "." {
                format!("the request body is not valid: {inner}")
            } else {
                format!("the request body's field {path} is not valid: {inner}")
            },
        )
    })
}

type QueryMap = Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>;

fn query_map(query: QueryMap) -> ApiResult<HashMap<String, String>> {
    query
        .map(|Query(map)| map)
        .map_err(|rejection| ApiError::bad("bad_query", rejection.body_text()))
}

async fn not_found(ConnectInfo(peer): ConnectInfo<Peer>, State(app): State<Arc<App>>) -> Response {
    let audit = Audit::new("unknown_route");
    app.finish::<()>(
        &peer,
        &audit,
        StatusCode::OK,
        Err(ApiError::Bad {
            status: StatusCode::NOT_FOUND,
            body: ErrorBody::bad_request(
                "unknown_route",
                "no such API route: see the routes in the portgate docs (crate::api)",
            ),
        }),
    )
}

/// Runs every request's handler to completion (the change, its audit record and its
/// latency) even if the client goes away meanwhile: axum drops a handler whose connection
/// closes, and a change half-way (made but not yet audited, or not yet undone after a
/// failed commit) must not be abandoned.
async fn run_to_completion(request: Request, next: Next) -> Response {
    tokio::spawn(next.run(request)).await.unwrap_or_else(|err| {
        ApiError::Port(PortError::state(
            "the request did not finish; see the daemon's log",
            Some(Box::new(err)),
        ))
        .into_response()
    })
}

async fn method_not_allowed(
    ConnectInfo(peer): ConnectInfo<Peer>,
    State(app): State<Arc<App>>,
) -> Response {
    let audit = Audit::new("wrong_method");
    app.finish::<()>(
        &peer,
        &audit,
        StatusCode::OK,
        Err(ApiError::Bad {
            status: StatusCode::METHOD_NOT_ALLOWED,
            body: ErrorBody::bad_request(
                "method_not_allowed",
                "this route does not take that method: see the routes in the portgate docs (crate::api)",
            ),
        }),
    )
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

async fn alloc(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let mut audit = Audit::new("alloc");
    let result = async {
        let actor = app.actor(&peer)?;
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
        let allocation = app.manager.allocate(request, actor).await?;
        audit.id = Some(allocation.id);
        Ok(AllocationView::new(&allocation, 0))
    }
    .await;
    app.finish(&peer, &audit, StatusCode::CREATED, result)
}

async fn list(State(app): State<Arc<App>>, ConnectInfo(peer): ConnectInfo<Peer>) -> Response {
    let audit = Audit::new("list");
    let views: Vec<AllocationView> = app
        .manager
        .allocations()
        .await
        .iter()
        .map(|(held, connections)| AllocationView::new(held, *connections))
        .collect();
    app.finish(&peer, &audit, StatusCode::OK, Ok(views))
}

async fn show(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    UrlPath(port): UrlPath<String>,
    query: QueryMap,
) -> Response {
    let mut audit = Audit::new("show");
    let result = async {
        let id = app.port_id(&port, &query_map(query)?)?;
        audit.id = Some(id);
        let held = app
            .manager
            .allocation(id)
            .await
            .ok_or(PortError::NotAllocated(id))?;
        let state = app.manager.get_state(id).await;
        Ok(AllocationView::new(&held, state.connections))
    }
    .await;
    app.finish(&peer, &audit, StatusCode::OK, result)
}

/// `DELETE /v1/ports/{port}` and `POST .../drain`: the port goes Draining. Both actions
/// are the one release; the audit log names the one asked for.
async fn release_as(
    app: &App,
    peer: &Peer,
    action: &'static str,
    port: &str,
    query: QueryMap,
) -> Response {
    let mut audit = Audit::new(action);
    let result = async {
        let (actor, id) = app.port_change(peer, port, query, &mut audit)?;
        let held = app.manager.release(id, actor).await?;
        let connections = app.manager.get_state(id).await.connections;
        Ok(AllocationView::new(&held, connections))
    }
    .await;
    app.finish(peer, &audit, StatusCode::OK, result)
}

async fn release(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    UrlPath(port): UrlPath<String>,
    query: QueryMap,
) -> Response {
    release_as(&app, &peer, "release", &port, query).await
}

async fn drain(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    UrlPath(port): UrlPath<String>,
    query: QueryMap,
) -> Response {
    release_as(&app, &peer, "drain", &port, query).await
}

async fn renew(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    UrlPath(port): UrlPath<String>,
    query: QueryMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let mut audit = Audit::new("renew");
    let result = async {
        let (actor, id) = app.port_change(&peer, &port, query, &mut audit)?;
        let request: RenewRequest = if body.as_ref().is_ok_and(Bytes::is_empty) {
            RenewRequest::default()
        } else {
            json_body(body)?
        };
        let held = app.manager.renew(id, request.ttl, actor).await?;
        Ok(AllocationView::new(&held, 0))
    }
    .await;
    app.finish(&peer, &audit, StatusCode::OK, result)
}

async fn access(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    UrlPath(port): UrlPath<String>,
    query: QueryMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let mut audit = Audit::new("access");
    let result = async {
        let (actor, id) = app.port_change(&peer, &port, query, &mut audit)?;
        let change: AccessChange = json_body(body)?;
        let held = app.manager.set_access(id, change, actor).await?;
        let connections = app.manager.get_state(id).await.connections;
        Ok(AllocationView::new(&held, connections))
    }
    .await;
    app.finish(&peer, &audit, StatusCode::OK, result)
}

async fn grant(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    UrlPath(port): UrlPath<String>,
    query: QueryMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let mut audit = Audit::new("grant");
    let result = async {
        let (actor, id) = app.port_change(&peer, &port, query, &mut audit)?;
        let request: GrantRequest = json_body(body)?;
        app.manager
            .grant(id, request.ip, request.ttl, actor)
            .await?;
        Ok(())
    }
    .await;
    match result {
        Ok(()) => {
            app.answered(&peer, &audit, StatusCode::NO_CONTENT, "ok");
            StatusCode::NO_CONTENT.into_response()
        }
        Err(err) => app.finish::<()>(&peer, &audit, StatusCode::OK, Err(err)),
    }
}

async fn check(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    UrlPath(port): UrlPath<String>,
    query: QueryMap,
) -> Response {
    let mut audit = Audit::new("check");
    let result = async {
        let query = query_map(query)?;
        let id = app.port_id(&port, &query)?;
        audit.id = Some(id);
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
    }
    .await;
    app.finish(&peer, &audit, StatusCode::OK, result)
}

async fn stats(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    query: QueryMap,
) -> Response {
    let mut audit = Audit::new("stats");
    let result = async {
        let query = query_map(query)?;
        let only = match query.get("port") {
            Some(port) => Some(app.port_id(port, &query)?),
            None => None,
        };
        audit.id = only;
        match only {
            Some(id) => Ok(app.manager.report(id).await?.into_iter().collect()),
            None => Ok(app.manager.reports().await?),
        }
    }
    .await;
    app.finish(&peer, &audit, StatusCode::OK, result)
}

async fn events(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    query: QueryMap,
) -> Response {
    let audit = Audit::new("events");
    let query = match query_map(query) {
        Ok(query) => query,
        Err(err) => return app.finish::<()>(&peer, &audit, StatusCode::OK, Err(err)),
    };
    let follow = matches!(query.get("follow").map(String::as_str), Some("true" | "1"));
    let receiver = app.manager.monitor().subscribe();
    let recent: Vec<Bytes> = app
        .manager
        .monitor()
        .recent_events()
        .iter()
        .map(|(time, event)| json_line(&EventView::new(event, *time)))
        .collect();
    app.answered(&peer, &audit, StatusCode::OK, "ok");
    let head = stream::iter(recent.into_iter().map(Ok::<_, std::io::Error>));
    let body = if follow {
        let shutdown = app.shutdown.clone();
        let tail = stream::unfold(
            (receiver, shutdown),
            |(mut receiver, mut shutdown)| async move {
                loop {
                    tokio::select! {
                        event = receiver.recv() => match event {
                            Ok((time, event)) => {
                                let line = json_line(&EventView::new(&event, time));
                                return Some((Ok(line), (receiver, shutdown)));
                            }
                            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                            Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                        },
                        _ = shutdown.changed() => return None,
                    }
                }
            },
        );
        Body::from_stream(futures_util::StreamExt::chain(head, tail))
    } else {
        Body::from_stream(head)
    };
    ([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response()
}

fn json_line(value: &impl Serialize) -> Bytes {
    let mut line = serde_json::to_vec(value).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

async fn status(State(app): State<Arc<App>>, ConnectInfo(peer): ConnectInfo<Peer>) -> Response {
    let audit = Audit::new("status");
    let result = async {
        let allocations = app.manager.allocations().await;
        let free = app.manager.free_ports().await;
        let usage = free
            .iter()
            .map(|&(protocol, free)| {
                let count = |status: PortStatus| {
                    allocations
                        .iter()
                        .filter(|(held, _)| held.id.protocol == protocol && held.status == status)
                        .count() as u64
                };
                RangeUsage {
                    proto: protocol,
                    active: count(PortStatus::Active),
                    draining: count(PortStatus::Draining),
                    closed: count(PortStatus::Closed),
                    free,
                }
            })
            .collect();
        let config = app.manager.config();
        Ok(StatusView {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            uptime_secs: app.started.elapsed().as_secs(),
            min_port: config.min_port,
            max_port: config.max_port,
            reserved_ports: config.reserved_ports.clone(),
            kernel_gate: app.manager.has_gate().await,
            pin_dir: app.config.daemon.pin_dir.clone(),
            attachments: app.manager.attachments().await?,
            store: app.manager.store().describe(),
            usage,
            unexplained_listeners: app.start_report.unexplained_listeners.clone(),
            warnings: app.warnings.clone(),
        })
    }
    .await;
    app.finish(&peer, &audit, StatusCode::OK, result)
}

async fn metrics(State(app): State<Arc<App>>, ConnectInfo(peer): ConnectInfo<Peer>) -> Response {
    let audit = Audit::new("metrics");
    match app.manager.metrics_text().await {
        Ok(text) => {
            app.answered(&peer, &audit, StatusCode::OK, "ok");
            metrics_response(text)
        }
        Err(err) => app.finish::<()>(&peer, &audit, StatusCode::OK, Err(err.into())),
    }
}

/// A Prometheus text exposition answer.
#[must_use]
pub fn metrics_response(text: String) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// The router of the metrics address (`GET /metrics`, no credentials: bind it to loopback).
pub fn metrics_router(app: Arc<App>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(app): State<Arc<App>>| async move {
                match app.manager.metrics_text().await {
                    Ok(text) => metrics_response(text),
                    Err(err) => ApiError::Port(err).into_response(),
                }
            }),
        )
        .with_state(app)
}
